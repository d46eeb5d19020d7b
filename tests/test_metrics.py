"""FID / IS code path through torchmetrics, offline, with a small feature extractor made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from ddpm_hub.metrics import frechet_inception_distance, inception_score


class MeanColour(torch.nn.Module):
    """A tiny deterministic 'feature extractor': per-channel means and variances of uint8 images."""

    num_features = 6  # torchmetrics reads this to size its statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.var(dim=(2, 3))], dim=1)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_closed_form_and_orders_distributions():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    close = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    far = torch.rand(64, 3, 8, 8, generator=g) * 0.3  # floats in [0, 1]: dark images
    extractor = MeanColour()
    fid_close = frechet_inception_distance([real[:32], real[32:]], [close], feature=extractor)
    fid_far = frechet_inception_distance([real], [far], feature=extractor)
    assert 0 <= fid_close < fid_far
    ref = _reference_fid(extractor(real).double().numpy(), extractor(close).double().numpy())
    assert fid_close == pytest.approx(ref, rel=1e-3, abs=1e-5)
    gray = real[:, :1]
    assert frechet_inception_distance([gray], [gray], feature=extractor) == pytest.approx(0.0, abs=1e-4)


class Logits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        return torch.stack([x.mean(dim=(1, 2, 3)) * 10, -x.mean(dim=(1, 2, 3)) * 10, x.std(dim=(1, 2, 3))], 1)


def test_inception_score_code_path():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = inception_score([images[:20], images[20:]], feature=Logits(), splits=2)
    assert 1.0 <= mean <= 3.0 and std >= 0
