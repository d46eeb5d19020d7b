"""Pictures where people would rather look than read: forward/reverse strips, noise schedules, VLB terms.

Strips are PIL images (no plotting library needed); curves use matplotlib's Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .scheduling_ddpm import DDPMScheduler


def _to_pil(x: torch.Tensor, scale: int) -> Image.Image:
    """[-1, 1] `[C, H, W]` -> PIL, enlarged `scale` times with nearest-neighbour (keeps pixels visible)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    image = Image.fromarray(arr)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def _strip(rows: Sequence[Sequence[torch.Tensor]], labels: Sequence[str], scale: int) -> Image.Image:
    """Rows of images side by side with a label above each column."""
    tiles = [[_to_pil(x, scale) for x in row] for row in rows]
    w, h = tiles[0][0].size
    pad, label_h = 4, 14
    canvas = Image.new("RGB", (len(tiles[0]) * (w + pad) + pad, len(tiles) * (h + pad) + pad + label_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((pad + j * (w + pad), 1), label, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            canvas.paste(tile.convert("RGB"), (pad + j * (w + pad), label_h + pad + i * (h + pad)))
    return canvas


def image_grid(
    images: Sequence[Image.Image], upscale: int = 1, pad: int | None = None, cols: int | None = None
) -> Image.Image:
    """A grid of PIL images (near-square, or `cols` per row), each enlarged `upscale` times (nearest), `pad` grey
    pixels between (default: 2 when enlarged, so that small tiles stay apart; 0 otherwise)."""
    pad = (2 if upscale > 1 else 0) if pad is None else pad
    cols = cols or max(1, int(np.ceil(np.sqrt(len(images)))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].width * upscale, images[0].height * upscale
    grey = 96 if images[0].mode in ("L", "1", "P") else (96,) * len(images[0].getbands())
    canvas = Image.new(images[0].mode, (cols * (w + pad) + pad, rows * (h + pad) + pad), grey)
    for k, image in enumerate(images):
        tile = image.resize((w, h), Image.Resampling.NEAREST) if upscale != 1 else image
        canvas.paste(tile, (pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)))
    return canvas


def forward_process_strip(
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    timesteps: Sequence[int] = (0, 50, 100, 200, 400, 600, 800, 999),
    generator: torch.Generator | None = None,
    scale: int = 4,
) -> Image.Image:
    """x_0 -> x_t ~ q(x_t | x_0) (eq. 4) at chosen t, one row per image in `images` ([N, C, H, W] in [-1, 1])."""
    noise = torch.randn(images.shape, generator=generator)
    rows = []
    for x0, eps in zip(images, noise, strict=True):
        row = [x0]
        for t in timesteps:
            row.append(scheduler.add_noise(x0[None], eps[None], torch.tensor([t]))[0])
        rows.append(row)
    return _strip(rows, ["x0"] + [f"t={t}" for t in timesteps], scale)


def reverse_process_strip(
    samples: Sequence[torch.Tensor],
    pred_x0: Sequence[torch.Tensor],
    timesteps: Sequence[int],
    columns: int = 8,
    scale: int = 4,
) -> Image.Image:
    """x_T -> x_0 (top row) and the predicted x_0 at the same steps (bottom row), for the first image."""
    idx = np.linspace(0, len(samples) - 1, columns).round().astype(int)
    top = [samples[i][0] for i in idx]
    bottom = [pred_x0[i][0] for i in idx] if pred_x0 else top
    return _strip([top, bottom], [f"t={int(timesteps[i])}" for i in idx], scale)


def schedules_plot(path: str | Path, num_train_timesteps: int = 1000) -> Path:
    """alpha-bar_t against t for the linear (Ho et al.) and cosine (Nichol & Dhariwal) schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for name in ("linear", "squaredcos_cap_v2", "scaled_linear", "sigmoid"):
        s = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=name)
        ax.plot(np.arange(num_train_timesteps), s.alphas_cumprod.numpy(), label=name)
    ax.set_xlabel("t")
    ax.set_ylabel(r"$\bar\alpha_t$")
    ax.set_title("Noise schedules: signal kept at step t")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def vlb_terms_plot(terms: torch.Tensor, path: str | Path, title: str = "Per-step VLB terms") -> Path:
    """Mean over images of the bound's terms L_t (bits/dim) against t, on a log scale: `terms` is `[N, T]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = terms.double().mean(dim=0).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.semilogy(np.arange(len(mean)), np.maximum(mean, 1e-12))
    ax.set_xlabel("t (0 = decoder L_0)")
    ax.set_ylabel("bits/dim")
    ax.set_title(f"{title} (total {mean.sum():.3f} bits/dim without the prior)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
