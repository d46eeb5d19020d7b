"""One evaluation path, shared by the trainer (during training and at the end), `python -m ddpm_hub evaluate` and
the benchmarks: the held-out bound (given the label, and without it), samples of the held-out class mix, and their
quality in the shipped digits classifiers' features (8x8 digits) or Inception's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .labels import has_null_label


def class_mix(labels: torch.Tensor, num_samples: int) -> torch.Tensor:
    """`num_samples` class ids that ask for the held-out `labels` in turn: samples with the held-out class mix."""
    return labels.repeat(-(-num_samples // len(labels)))[:num_samples]


def inception_scores(real: torch.Tensor, fake: torch.Tensor, which=("fid", "kid"), batch_size: int = 256) -> dict:
    """Inception FID / KID (with its std) / Inception score of uint8 `fake` against uint8 `real` (torch-fidelity),
    features taken `batch_size` images at a time."""
    from . import metrics

    out: dict[str, float] = {}
    if "fid" in which:
        out["fid"] = metrics.frechet_inception_distance(real.split(batch_size), fake.split(batch_size))
    if "kid" in which:
        out["kid"], out["kid_std"] = metrics.kernel_inception_distance(real.split(batch_size), fake.split(batch_size))
    if "inception_score" in which:
        out["inception_score"], out["inception_score_std"] = metrics.inception_score(fake.split(batch_size))
    return out


def bound(pipeline, images: torch.Tensor, mode: str = "full", batch_size: int = 64, seed: int = 0,
          num_samples: int | None = None, class_labels: torch.Tensor | None = None):  # fmt: skip
    """(bits/dim given `class_labels`, unconditional bits/dim or None) of uint8 `images` `[N, C, H, W]`: the full bound
    (`full`, all T terms) or its stratified estimate (`estimate`). The unconditional (null-label) bound is measured
    for labelled images of a model with a null label, from the same noise: their gap is what the label tells."""
    from .pipelines.pipeline_class_conditional import ids_by_design

    if mode not in ("full", "estimate"):
        raise ValueError(f"mode must be 'full' or 'estimate', got {mode!r}")
    with_null = has_null_label(class_labels is not None, pipeline.config.get("cond_drop_prob"))
    results = []
    for labels in (class_labels, None) if with_null else (class_labels,):
        g = torch.Generator().manual_seed(seed)  # the same noise for both bounds
        with ids_by_design():  # the labels here are class ids
            samples = {} if num_samples is None else {"num_samples": num_samples}  # else the pipeline's default
            out = pipeline.bits_per_dim(images, batch_size=batch_size, generator=g, estimate=mode == "estimate",
                                        class_labels=labels, **samples)  # fmt: skip
        results.append(out)
    return results[0], (results[1] if with_null else None)


@contextmanager
def ema_weights(model: torch.nn.Module, ema=None) -> Iterator[torch.nn.Module]:
    """Inside the block `model` holds the EMA weights (if `ema` is given) and is in eval mode; on exit, even
    after an error, its training weights and mode come back."""
    was_training = model.training
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        if ema is not None:
            ema.restore(model.parameters())


def held_out_bpd(
    pipeline,
    images: torch.Tensor,
    mode: str = "full",
    batch_size: int = 64,
    seed: int = 0,
    num_samples: int = 16,
    class_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out bits/dim of uint8 `images` `[N, C, H, W]` (`bound`), under the keys of metrics.json and the card:
    `held_out_bits_per_dim` (full) or `held_out_bits_per_dim_estimate` with its `_stderr`, and with labels of a model
    with a null label the `held_out_unconditional_...` bound as well."""
    given, unconditional = bound(pipeline, images, mode, batch_size, seed, num_samples, class_labels)
    results = _bpd_keys(given, mode, "held_out_")
    if unconditional is not None:
        results.update(_bpd_keys(unconditional, mode, "held_out_unconditional_"))
    return results


def _bpd_keys(out, mode: str, prefix: str) -> dict[str, float]:
    if mode == "full":
        return {f"{prefix}bits_per_dim": float(out.total.mean())}
    return {f"{prefix}bits_per_dim_estimate": float(out.total.mean()),
            f"{prefix}bits_per_dim_stderr": out.mean_stderr()}  # fmt: skip


def sample_quality(
    pipeline,
    held_out: torch.Tensor,
    num_samples: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 256,
    num_seeds: int = 1,
    held_out_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> dict[str, float]:
    """Sample quality of `num_samples` samples against uint8 held-out images. 8x8 grayscale digits: in both shipped
    digits classifiers' features (`metrics.digits_quality`), the mean over seeds `seed`.. `seed + num_seeds - 1`
    and, with several seeds, the 95% t-interval half-widths of FID and KID (`_ci95`; KID only with it). Other data:
    Inception FID at `seed` when torch-fidelity is installed, else nothing (logged). With `held_out_labels` (a
    conditional model) the samples ask for the held-out labels in turn (the same class mix) at `guidance_scale`, and
    for the digits `digits_class_accuracy` is the fraction that the digits classifier assigns to the requested
    class."""
    import logging

    from . import metrics
    from .sampling import sample_uint8

    c, h, w = held_out.shape[1:]
    labels = None if held_out_labels is None else class_mix(held_out_labels, num_samples)
    if (c, h, w) == (1, 8, 8):
        seeds = range(seed, seed + num_seeds)
        digit_labels = labels is not None and getattr(pipeline, "id2label", None) == {i: str(i) for i in range(10)}
        report = metrics.sample_quality_report(pipeline, held_out, num_samples=num_samples,
                                               num_inference_steps=num_inference_steps, seeds=seeds,
                                               batch_size=batch_size, class_labels=labels,
                                               guidance_scale=guidance_scale)  # fmt: skip
        out: dict[str, float] = {}
        for space in report["spaces"]:
            for metric in CARD_QUALITY_METRICS:
                stat = report["summary"][f"{space}_{metric}"]
                if metric in WITH_INTERVAL_ONLY and num_seeds == 1:
                    continue  # its spread at one seed is as large as the value: not a number to quote
                out[f"{space}_{metric}"] = stat["mean"]
                if metric in ("fid", *WITH_INTERVAL_ONLY) and num_seeds > 1:
                    out[f"{space}_{metric}_ci95"] = stat["half_width"]
        if digit_labels:
            out["digits_class_accuracy"] = report["summary"]["digits_class_accuracy"]["mean"]
        return out
    try:
        check_training_quality(held_out)
    except RuntimeError as exc:
        logging.getLogger(__name__).warning("no FID/KID of the samples: %s", exc)
        return {}
    fake = sample_uint8(pipeline, num_samples, num_inference_steps, seed, batch_size, class_labels=labels,
                        guidance_scale=guidance_scale)  # fmt: skip
    return {"fid": inception_scores(held_out, fake, which=("fid",))["fid"]}  # KID: no interval at one seed


CARD_QUALITY_METRICS = ("fid", "kid", "precision", "recall", "class_error")  # per digits space, in metrics.json
# KID near 0 spreads over seeds by more than its value: quoted only with its 95% interval (several seeds)
WITH_INTERVAL_ONLY = ("kid",)


# The metric that picks the best checkpoint during training (lower is better). For the embedded digits: FID in the
# convolutional digits classifier's features, the independent yardstick (its own train split; more discriminative
# than the 64-unit MLP's space, which once ranked a recipe best that the conv space ranks worse at every seed).
DIGITS_SELECTION_METRIC = "digits_conv_fid"


INCEPTION_SELECTION_METRIC = "fid"


def is_digits_shape(images: torch.Tensor) -> bool:
    """True for `[N, 1, 8, 8]` images: the shipped digits classifiers' input."""
    return tuple(images.shape[1:]) == (1, 8, 8)


def selection_metric(held_out: torch.Tensor) -> str:
    """The name of the training-time quality metric that ranks checkpoints for images like `held_out`."""
    return DIGITS_SELECTION_METRIC if is_digits_shape(held_out) else INCEPTION_SELECTION_METRIC


def check_training_quality(held_out: torch.Tensor) -> None:
    """RuntimeError (one line) when `training_quality` cannot run on such images: Inception needs torch-fidelity."""
    if is_digits_shape(held_out):
        return
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        c, h, w = held_out.shape[1:]
        raise RuntimeError(
            f"FID/KID of {c}x{h}x{w} images use Inception features, which need torch-fidelity: pip install "
            "torch-fidelity (its Inception weights are downloaded once); the shipped digits features fit 1x8x8 only"
        ) from None


def training_quality(
    pipeline,
    held_out: torch.Tensor,
    num_samples: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 256,
    held_out_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> dict[str, float]:
    """The during-training quality of `pipeline`'s samples (seeded: the same initial noise at every call) against
    uint8 `held_out`: `digits_quality` in both digits spaces for 8x8 digits, else Inception `fid`/`kid`.
    Contains `selection_metric(held_out)`. A conditional model is asked for the held-out labels in turn (the same
    class mix) at `guidance_scale`, as `sample_quality` does."""
    from . import metrics
    from .sampling import sample_uint8

    labels = None if held_out_labels is None else class_mix(held_out_labels, num_samples)
    fake = sample_uint8(pipeline, num_samples, num_inference_steps, seed, batch_size, class_labels=labels,
                        guidance_scale=guidance_scale)  # fmt: skip
    if is_digits_shape(held_out):
        return metrics.digits_quality(held_out, fake)
    scores = inception_scores(held_out, fake)
    return {"fid": scores["fid"], "kid": scores["kid"]}


