"""Sample-quality metrics (FID, Inception Score) through torchmetrics, with a pluggable feature extractor.

By default torchmetrics uses the standard Inception-v3 statistics (its weights come with torch-fidelity and
must be available locally or downloadable). Tests and offline users pass their own `feature` module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
        metric = FrechetInceptionDistance(feature=feature, normalize=False)
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
        metric = InceptionScore(feature=feature, splits=splits, normalize=False)
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
        metric = KernelInceptionDistance(feature=feature, subset_size=min(subset_size, n), normalize=False)
    except (ModuleNotFoundError, RuntimeError, OSError) as exc:
        raise RuntimeError(f"KID with the standard Inception features needs torch-fidelity: {exc}") from exc
    for batch in real:
        metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


def digits_fid_kid(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID and KID in the features of the shipped digits classifier (`digits_features`): uint8 `[N, 1, 8, 8]`.
    Comparable between models on the embedded digits; not Inception FID."""
    from .digits_features import DigitsFeatures, load_digits_classifier

    feature = DigitsFeatures(load_digits_classifier())
    fid = frechet_inception_distance([real], [fake], feature=feature)
    kid, _ = kernel_inception_distance([real], [fake], feature=feature)
    return {"digits_fid": fid, "digits_kid": kid}


def digits_class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of uint8 `[N, 1, 8, 8]` digit images that the shipped digits classifier assigns to their
    requested class `labels` `[N]` (class id = digit): how well a conditional model follows its labels."""
    from .digits_features import load_digits_classifier

    with torch.no_grad():
        predicted = load_digits_classifier()(images).argmax(dim=1)
    return float((predicted == labels.to(predicted.device)).float().mean())


def check_inception_available() -> None:
    """Fail before any sampling when the Inception metrics cannot run (torch-fidelity missing)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "Inception FID/KID/IS need torch-fidelity and its Inception weights: pip install torch-fidelity "
            "(the weights are downloaded once); for the embedded digits use --digits_fid instead"
        ) from exc
