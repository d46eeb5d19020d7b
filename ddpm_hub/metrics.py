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
