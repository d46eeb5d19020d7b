"""A small classifier of the embedded 8x8 digits whose hidden features stand in for Inception's on this data.

Inception-v3 features mean nothing for 8x8 grayscale digits (and need a download), so sample quality on the
embedded digits is measured in the 64-d penultimate features of this MLP (64 -> 128 -> 64 -> 10), trained on the
digits **train** split only and shipped with the package as safetensors. FID/KID computed with it are
"digits-classifier FID/KID": comparable between models on this data, not with published Inception FIDs.

Regenerate the weights with `python -m ddpm_hub.digits_features` (seeded, about a second on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "assets" / "digits_classifier.safetensors"
NUM_FEATURES = 64


class DigitsClassifier(nn.Module):
    """MLP on 8x8 uint8 digits: `features(x)` `[N, 64]`, `forward(x)` class logits `[N, 10]`."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, NUM_FEATURES), nn.ReLU())
        self.head = nn.Linear(NUM_FEATURES, 10)

    @staticmethod
    def _prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 `[N, C, 8, 8]` (C = 1, or 3 identical channels as metrics pass them) -> float in [0, 1]."""
        if images.shape[-2:] != (8, 8):
            raise ValueError(f"the digits classifier takes 8x8 images, got {tuple(images.shape[-2:])}")
        x = images[:, :1].float()
        return x / 255.0 if images.dtype == torch.uint8 else x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitsFeatures(nn.Module):
    """The classifier's features as a torchmetrics feature extractor (FID/KID `feature=`)."""

    num_features = NUM_FEATURES

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


def load_digits_classifier() -> DigitsClassifier:
    """The shipped classifier (safetensors), in eval mode."""
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def train_digits_classifier(seed: int = 0, epochs: int = 200) -> DigitsClassifier:
    """Train the classifier on the digits train split (full-batch Adam, seeded)."""
    import numpy as np

    from .data import load_digits_dataset

    train = load_digits_dataset()["train"]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in train["image"]])[:, None])
    y = torch.tensor(train["label"])
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


if __name__ == "__main__":
    from safetensors.torch import save_file

    classifier = train_digits_classifier()
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, WEIGHTS)
    print(f"wrote {WEIGHTS}")
