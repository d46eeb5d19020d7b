"""Sample-quality metrics: FID, KID and Inception Score through torchmetrics with a pluggable feature extractor;
precision/recall (Kynkaanniemi et al. 2019), class-frequency error and classifier score of feature vectors; and the
digits report in both shipped classifier spaces (`digits_quality`, `sample_quality_report` over paired seeds).

By default torchmetrics uses the standard Inception-v3 statistics (its weights come with torch-fidelity and
must be available locally or downloadable). Tests and offline users pass their own `feature` module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

# Every metric here is computed from this process's images only: torchmetrics would otherwise all-gather its states
# across the ranks of an initialised torch.distributed group in `compute()`, and hang when only the main process
# evaluates (the trainer's evaluations and final metrics under `accelerate launch --num_processes 2`).
LOCAL = {"sync_on_compute": False}


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 `[N, C, H, W]` or float in [0, 1]; return uint8 with 3 channels (Inception expects RGB)."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images


def frechet_inception_distance(
    real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], feature: int | torch.nn.Module = 2048
) -> float:
    """FID between batches of real and generated images (uint8 or [0, 1] float, `[N, C, H, W]`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=False, **LOCAL)
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise RuntimeError(
            "FID with the standard Inception features needs torch-fidelity and its Inception weights "
            f"(pip install torch-fidelity; the weights are downloaded once): {exc}"
        ) from exc
    for batch in real:
        metric.update(_as_uint8(batch), real=True)
    for batch in fake:
        metric.update(_as_uint8(batch), real=False)
    return float(metric.compute())


def inception_score(fake: Iterable[torch.Tensor], feature: str | torch.nn.Module = "logits_unbiased", splits: int = 10):
    """Inception Score (mean, std) of generated images; `feature` may be a module returning class logits."""
    from torchmetrics.image.inception import InceptionScore

    try:
        metric = InceptionScore(feature=feature, splits=splits, normalize=False, **LOCAL)
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise RuntimeError(f"Inception Score needs torch-fidelity and its Inception weights: {exc}") from exc
    for batch in fake:
        metric.update(_as_uint8(batch))
    mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(
    real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor], feature: int | torch.nn.Module = 2048,
    subset_size: int = 100,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between real and generated images (uint8 or [0, 1] float, `[N, C, H, W]`)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = [_as_uint8(b) for b in real], [_as_uint8(b) for b in fake]
    n = min(sum(len(b) for b in real), sum(len(b) for b in fake))
    try:
        metric = KernelInceptionDistance(feature=feature, subset_size=min(subset_size, n), normalize=False,
                                         **LOCAL)
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise RuntimeError(f"KID with the standard Inception features needs torch-fidelity: {exc}") from exc
    for batch in real:
        metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def digits_fid_kid(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID and KID in the features of the shipped digits MLP (`digits_mlp`): uint8 `[N, 1, 8, 8]`.
    Comparable between models on the embedded digits; not Inception FID. `digits_quality` gives every space."""
    from .digits_features import DigitsFeatures, cached_digits_classifier

    feature = DigitsFeatures(cached_digits_classifier("digits_mlp"))
    fid = frechet_inception_distance([real], [fake], feature=feature)
    kid, _ = kernel_inception_distance([real], [fake], feature=feature)
    return {"digits_fid": fid, "digits_kid": kid}


# ------------------------------------------------------------------------------------------------------------------
# Metrics of given feature vectors (any feature space), and the digits report in both shipped spaces
# ------------------------------------------------------------------------------------------------------------------


class _GivenFeatures(torch.nn.Module):
    """Feeds precomputed feature vectors `[N, D]` through torchmetrics' FID/KID as their "feature extractor"."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance of the Gaussians fitted to feature vectors `[N, D]` (FID's formula, torchmetrics' code)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]), **LOCAL)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets of `subset_size`, seeded) of feature vectors `[N, D]`
    (torchmetrics' cubic-kernel MMD). Default and cap: the smaller set's size (with 300 held-out digits, subsets of
    100 leave the mean several times noisier than subsets of all 300)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size or len(real), len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size,
                                         **LOCAL)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator: seed them, leave it be
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _knn_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of `features` `[N, D]` to its k-th nearest other row (itself excluded)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} feature vectors, got {k}")
    return torch.cat([torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(chunk)])


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each point `[M, D]`, whether it lies within `radii[j]` of some centre `j` (`[N, D]`, `[N]`)."""
    return torch.cat([(torch.cdist(block, centres) <= radii).any(dim=1) for block in points.split(chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of generated feature vectors (Kynkaanniemi et al. 2019), `[N, D]` each.

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour in the set.
    Precision: the fraction of fakes inside the real manifold (fidelity); recall: the fraction of reals inside the
    fake manifold (diversity). Distances in float64."""
    real, fake = real.double(), fake.double()
    precision = _inside_any_ball(fake, real, _knn_radii(real, k, chunk), chunk).double().mean()
    recall = _inside_any_ball(real, fake, _knn_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def class_frequency_error(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> float:
    """Total-variation distance (0 = same mix, 1 = disjoint) between the classifier-predicted class frequencies of
    the samples and of the real images: how far the samples' class mix is from the data's."""
    classes = max(real_logits.shape[1], fake_logits.shape[1])
    p_real = torch.bincount(real_logits.argmax(1), minlength=classes).double() / len(real_logits)
    p_fake = torch.bincount(fake_logits.argmax(1), minlength=classes).double() / len(fake_logits)
    return float(0.5 * (p_real - p_fake).abs().sum())


def classifier_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))): the Inception Score formula with a digits classifier's logits `[N, classes]`
    (one split; at most the number of classes, high when samples are confidently classified and classes balanced)."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(len(logits)), dtype=torch.float64))
    return float(torch.exp((log_p.exp() * (log_p - log_marginal)).sum(1).mean()))


DIGITS_METRICS = ("fid", "kid", "precision", "recall", "class_error", "classifier_score")


def digits_quality(
    real: torch.Tensor,
    fake: torch.Tensor,
    spaces: Sequence[str] = ("digits_mlp", "digits_conv"),
    k: int = 3,
    kid_subset_size: int | None = None,
) -> dict[str, float]:
    """Sample quality of uint8 digits `fake` against `real` (`[N, 1, 8, 8]`) in each shipped classifier space:
    `{space}_{metric}` for the metrics of `DIGITS_METRICS` (FID, KID, precision, recall at `k`, class-frequency
    error, classifier score). KID: seeded subsets of `kid_subset_size` (default: all of the smaller set)."""
    from .digits_features import cached_digits_classifier

    results: dict[str, float] = {}
    for space in spaces:
        classifier = cached_digits_classifier(space)
        with torch.no_grad():
            f_real, f_fake = classifier.features(real.cpu()).double(), classifier.features(fake.cpu()).double()
            l_real, l_fake = classifier.head(f_real.float()), classifier.head(f_fake.float())
        precision, recall = precision_recall(f_real, f_fake, k)
        results.update({
            f"{space}_fid": frechet_distance(f_real, f_fake),
            f"{space}_kid": kernel_distance(f_real, f_fake, kid_subset_size)[0],
            f"{space}_precision": precision,
            f"{space}_recall": recall,
            f"{space}_class_error": class_frequency_error(l_real, l_fake),
            f"{space}_classifier_score": classifier_score(l_fake),
        })  # fmt: skip
    return results


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and the half-width of the Student-t confidence interval of the mean (0 for one value)."""
    import math

    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "half_width": half, "n": n}


def sample_quality_report(
    source: Any,
    real: torch.Tensor,
    spaces: Sequence[str] = ("digits_mlp", "digits_conv"),
    num_samples: int | None = None,
    num_inference_steps: int | None = None,
    seeds: Sequence[int] = (0,),
    batch_size: int = 1000,
    k: int = 3,
    progress: bool = False,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> dict[str, Any]:
    """`digits_quality` of a pipeline's samples at each seed (`num_samples` per seed, `num_inference_steps` of its
    scheduler; each seed gives the same initial noise to every model: paired), or of given uint8 images (`source`
    a tensor: one set). A conditional pipeline samples class `class_labels[i]` (int64 `[num_samples]`) at
    `guidance_scale`, and `digits_class_accuracy` (the share the digits classifier assigns to the requested class)
    joins the metrics. Returns `per_seed` (list of metric dicts), `summary` (metric -> `mean_interval`), `spaces`,
    `num_samples`, `num_real`, `seeds`, `k`."""
    if isinstance(source, torch.Tensor):
        sets, seeds = [source], []
    else:
        from .sampling import sample_uint8

        if not num_samples or not num_inference_steps:
            raise ValueError("sampling a pipeline needs num_samples and num_inference_steps")
        sets = (sample_uint8(source, num_samples, num_inference_steps, s, batch_size, progress, class_labels,
                             guidance_scale) for s in seeds)  # fmt: skip
    per_seed = []
    for fake in sets:
        row = digits_quality(real, fake, spaces, k)
        if class_labels is not None:
            row["digits_class_accuracy"] = digits_class_accuracy(fake, class_labels)
        per_seed.append(row)
    summary = {name: mean_interval([row[name] for row in per_seed]) for name in per_seed[0]}
    return {"spaces": list(spaces), "num_samples": num_samples if seeds else len(source), "num_real": len(real),
            "seeds": list(seeds), "k": k, "per_seed": per_seed, "summary": summary}  # fmt: skip


METRIC_LABELS = {"fid": "FID", "kid": "KID (raw, not x 1000)", "precision": "precision (k={k})",
                 "recall": "recall (k={k})", "class_error": "class-frequency error",
                 "classifier_score": "classifier score (max 10)"}  # fmt: skip


def quality_table(report: dict[str, Any]) -> str:
    """A `sample_quality_report` as a markdown table: one row per metric, one column per feature space, each cell
    the mean over seeds (with the 95% t-interval half-width when there are several seeds)."""
    seeds = len(report["seeds"]) or 1
    lines = [f"{report['num_samples']} samples x {seeds} seed(s) against {report['num_real']} real images"
             + ("; mean +- 95% t-interval half-width over seeds" if seeds > 1 else ""), "",
             "| metric | " + " | ".join(report["spaces"]) + " |", "|---|" + "---|" * len(report["spaces"])]  # fmt: skip
    for metric, label in METRIC_LABELS.items():
        cells = []
        for space in report["spaces"]:
            stat = report["summary"][f"{space}_{metric}"]
            cells.append(f"{stat['mean']:.4g}" + (f" +- {stat['half_width']:.2g}" if seeds > 1 else ""))
        lines.append(f"| {label.format(k=report['k'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def digits_class_accuracy(images: torch.Tensor, labels: torch.Tensor, space: str = "digits_mlp") -> float:
    """The fraction of uint8 `[N, 1, 8, 8]` digit images that the shipped digits classifier of `space` assigns to
    their requested class `labels` `[N]` (class id = digit): how well a conditional model follows its labels."""
    from .digits_features import cached_digits_classifier

    with torch.no_grad():
        predicted = cached_digits_classifier(space)(images.cpu()).argmax(dim=1)
    return float((predicted == labels.cpu()).float().mean())


def check_inception_available() -> None:
    """Fail before any sampling when the Inception metrics cannot run (torch-fidelity missing)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "Inception FID/KID/IS need torch-fidelity and its Inception weights: pip install torch-fidelity "
            "(the weights are downloaded once); for the embedded digits use --digits_fid instead"
        ) from exc
