"""Two small classifiers of the embedded 8x8 digits whose hidden features stand in for Inception's on this data.

Inception-v3 features mean nothing for 8x8 grayscale digits (and need a download), so sample quality on the
embedded digits is measured in the penultimate features of two independent classifiers, both trained on the digits
**train** split only (never the 300 held-out digits) and shipped with the package as safetensors:

- `digits_mlp`: an MLP 64 -> 128 -> 64 -> 10, 64-d features; held-out accuracy 98.0% (294/300).
- `digits_conv`: a CNN (3x3 convs 1 -> 32 -> 32, pool, 32 -> 64, pool, linear 256 -> 128 -> 10), 128-d features,
  trained with random one-pixel shifts; held-out accuracy 98.7% (296/300).

Metrics in them ("digits-classifier FID/KID") are comparable between models on this data, not with published
Inception FIDs. Regenerate the weights with `OMP_NUM_THREADS=1 python -m ddpm_hub.digits_features [SPACE ...]`
(seeded; seconds on a CPU).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS = ASSETS / "digits_classifier.safetensors"  # digits_mlp
CONV_WEIGHTS = ASSETS / "digits_conv_classifier.safetensors"  # digits_conv
NUM_FEATURES = 64
CONV_NUM_FEATURES = 128
SPACES = ("digits_mlp", "digits_conv")  # the feature spaces of the digits metrics, by name


def _prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, C, 8, 8]` (C = 1, or 3 identical channels as metrics pass them) -> float `[N, 1, 8, 8]` in [0, 1]."""
    if images.shape[-2:] != (8, 8):
        raise ValueError(f"the digits classifiers take 8x8 images, got {tuple(images.shape[-2:])}")
    x = images[:, :1].float()
    return x / 255.0 if images.dtype == torch.uint8 else x


class DigitsClassifier(nn.Module):
    """MLP on 8x8 uint8 digits (`digits_mlp`): `features(x)` `[N, 64]`, `forward(x)` class logits `[N, 10]`."""

    num_features = NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, NUM_FEATURES), nn.ReLU())
        self.head = nn.Linear(NUM_FEATURES, 10)

    _prepare = staticmethod(_prepare)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(_prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitsConvClassifier(nn.Module):
    """CNN on 8x8 uint8 digits (`digits_conv`): `features(x)` `[N, 128]`, `forward(x)` class logits `[N, 10]`."""

    num_features = CONV_NUM_FEATURES

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 2 * 2, CONV_NUM_FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(CONV_NUM_FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(_prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DigitsFeatures(nn.Module):
    """A classifier's features as a torchmetrics feature extractor (FID/KID `feature=`), in float64."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


_MODELS = {"digits_mlp": (DigitsClassifier, WEIGHTS), "digits_conv": (DigitsConvClassifier, CONV_WEIGHTS)}


def _check_space(space: str) -> None:
    if space not in _MODELS:
        raise ValueError(f"unknown digits feature space {space!r}; choose from {', '.join(SPACES)}")


def load_digits_classifier(space: str = "digits_mlp") -> nn.Module:
    """The shipped classifier of feature space `space` (safetensors), in eval mode (a fresh copy per call)."""
    from safetensors.torch import load_file

    _check_space(space)
    cls, path = _MODELS[space]
    model = cls()
    model.load_state_dict(load_file(path))
    return model.eval()


@cache
def cached_digits_classifier(space: str) -> nn.Module:
    """`load_digits_classifier(space)`, loaded once per process (for metrics called many times; do not modify)."""
    return load_digits_classifier(space).requires_grad_(False)


def digits_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images `[N, 1, 8, 8]`, labels `[N]`) of the embedded digits' `train` or `test` split (fresh copies)."""
    images, labels = _digits_arrays(split)
    return images.clone(), labels.clone()


@cache
def _digits_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    from .data import load_digits_dataset

    ds = load_digits_dataset()[split]
    return torch.from_numpy(np.stack([np.asarray(im) for im in ds["image"]])[:, None]), torch.tensor(ds["label"])


def train_digits_classifier(seed: int = 0, epochs: int = 200) -> DigitsClassifier:
    """Train the MLP on the digits train split (full-batch Adam, seeded)."""
    x, y = digits_arrays("train")
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel along each axis (zero fill): a little translation invariance."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=generator)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, None, :, None].expand(-1, 1, 8, 10)
    x = padded.gather(2, rows)
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, None, :].expand(-1, 1, 8, 8)
    return x.gather(3, cols)


def train_digits_conv_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64) -> DigitsConvClassifier:
    """Train the CNN on the digits train split (Adam, mini-batches and random one-pixel shifts, all seeded)."""
    x, y = digits_arrays("train")
    x = x.float() / 255.0
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsConvClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(x) // batch_size))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(_random_shift(x[index], generator)), y[index])
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def held_out_accuracy(model: nn.Module) -> float:
    """Accuracy of a digits classifier on the 300 held-out (test split) digits."""
    x, y = digits_arrays("test")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


TRAINERS = {"digits_mlp": train_digits_classifier, "digits_conv": train_digits_conv_classifier}


if __name__ == "__main__":
    import sys

    from safetensors.torch import save_file

    for name in sys.argv[1:] or SPACES:
        _check_space(name)
        classifier = TRAINERS[name]()
        path = _MODELS[name][1]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
        print(f"wrote {path}: {name}, held-out accuracy {held_out_accuracy(classifier):.4f}")
