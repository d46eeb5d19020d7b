"""Quality per compute and per step count on the embedded digits.

1. Our `digits` preset (its full recipe) and the stock diffusers example recipe (batch 16, lr 1e-4, cosine, EMA,
   linear betas, its UNet) trained on the same digits train split for the same wall-clock; then held-out bits/dim
   and sample grids of both, side by side.
2. Samples of our model at 1000 DDPM steps against 50 and 100 steps of DDIM and DPM-Solver.

Sample quality on digits is measured with a scikit-learn digit classifier trained on the train split:
"recognizable" = mean max class probability, "digits IS" = exp(E KL(p(y|x) || p(y))), and the Frechet distance
between samples and the held-out images in pixel space (64 dimensions).

    python benchmarks/bench_quality.py [--quick] [--minutes 10] [--out benchmarks/results/quality.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STOCK_UNET = {  # the stock example's UNet shape, scaled to 8x8 grayscale (about 1.6M parameters)
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": (64, 128),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}


def digits_arrays():
    from ddpm_hub.data import load_digits_dataset

    dd = load_digits_dataset()
    to = lambda ds: np.stack([np.asarray(im) for im in ds["image"]])[:, None]  # noqa: E731
    return to(dd["train"]), np.asarray(dd["train"]["label"]), to(dd["test"])


def classifier(train: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(train.reshape(len(train), -1) / 255.0, labels)


def sample_quality(samples: np.ndarray, clf, held_out: np.ndarray) -> dict[str, float]:
    """samples: uint8 [N, 1, 8, 8]."""
    from scipy import linalg

    x = samples.reshape(len(samples), -1) / 255.0
    p = clf.predict_proba(x)
    marginal = p.mean(0, keepdims=True)
    inception = float(np.exp((p * (np.log(p + 1e-12) - np.log(marginal + 1e-12))).sum(1).mean()))
    y = held_out.reshape(len(held_out), -1) / 255.0
    ridge = 1e-6 * np.eye(x.shape[1])  # some digit pixels are always 0: keep the covariances invertible
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False) + ridge, np.cov(y, rowvar=False) + ridge
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    return {
        "recognizable": float(p.max(1).mean()),
        "digits_is": inception,
        "pixel_fd": fd,
        "mean_intensity": float(x.mean()),
    }


def train_ours(out: Path, minutes: float, quick: bool) -> float:
    args = [
        sys.executable,
        str(REPO / "training" / "train.py"),
        "--preset",
        "digits",
        "--output_dir",
        str(out),
        "--logger",
        "none",
        "--num_eval_images",
        "0",
        "--final_bpd",
        "none",
        "--num_quality_samples",
        "0",
        "--save_images_steps",
        "1000000",
        "--eval_steps",
        "1000000",
        "--checkpointing_steps",
        "1000000",
    ]
    if quick:
        args += ["--max_train_steps", "60", "--lr_warmup_steps", "10"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def train_stock(out: Path, seconds: float, train: np.ndarray) -> int:
    """diffusers' examples/unconditional_image_generation recipe (defaults) for `seconds` of wall-clock."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = UNet2DModel(**STOCK_UNET)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    steps_guess = 100_000
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps_guess)
    ema = EMAModel(
        model.parameters(),
        decay=0.9999,
        use_ema_warmup=True,
        inv_gamma=1.0,
        power=0.75,
        model_cls=UNet2DModel,
        model_config=model.config,
    )
    data = torch.from_numpy(train).float() / 127.5 - 1
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, drop_last=True)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for clean in loader:
            noise = torch.randn(clean.shape)
            timesteps = torch.randint(0, 1000, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(model(noisy, timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema.step(model.parameters())
            step += 1
            if time.perf_counter() - start >= seconds:
                break
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model.parameters())
    DDPMPipeline(unet=ema_model, scheduler=noise_scheduler).save_pretrained(out)
    return step


def samples_of(folder: Path, n: int, steps: int, scheduler: str = "ddpm") -> np.ndarray:
    from ddpm_hub.cli import load_pipeline

    pipeline = load_pipeline(str(folder), scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=n, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np"
    ).images
    return (images.transpose(0, 3, 1, 2) * 255).round().astype(np.uint8)


def save_grid(samples: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ddpm_hub.plots import image_grid

    tiles = [Image.fromarray(s[0]) for s in samples[:64]]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(tiles, upscale=4, pad=2).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the stock recipe cap")
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--ours", default=None, help="reuse an already trained digits pipeline folder")
    parser.add_argument("--steps_only", action="store_true", help="only the step-count comparison of --ours")
    parser.add_argument("--figure_prefix", default="", help="prefix of the step-count grid file names")
    args = parser.parse_args()
    from ddpm_hub import DDPMPipeline

    torch.set_num_threads(2)
    train, labels, held = digits_arrays()
    clf = classifier(train, labels)
    n = 16 if args.quick else 256
    n_bpd = 16 if args.quick else 300
    figures = Path(args.figures) if not args.quick else Path(tempfile.mkdtemp())
    rows, step_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir = Path(args.ours) if args.ours else Path(tmp) / "ours"
        if args.steps_only and not args.ours:
            parser.error("--steps_only needs --ours FOLDER")
        ours_seconds = 0.0 if args.ours else train_ours(ours_dir, args.minutes, args.quick)
        budget = 20.0 if args.quick else (ours_seconds if ours_seconds else args.minutes * 60)
        budget = min(budget, args.minutes * 60)
        stock_dir = Path(tmp) / "stock"
        stock_steps = train_stock(stock_dir, budget, train)
        held_t = torch.from_numpy(held[:n_bpd])
        sample_steps = 50 if args.quick else 1000
        for name, folder, seconds in (
            ("ours (digits preset)", ours_dir, ours_seconds),
            ("stock example recipe", stock_dir, budget),
        ):
            pipeline = DDPMPipeline.from_pretrained(folder)
            pipeline.unet.eval()
            bpd = pipeline.bits_per_dim(
                held_t, batch_size=n_bpd, generator=torch.Generator().manual_seed(0), progress=False
            )
            samples = samples_of(folder, n, sample_steps)
            if not args.steps_only:
                save_grid(samples, figures / f"quality_{'ours' if name.startswith('ours') else 'stock'}.png")
            rows.append(
                {
                    "recipe": name,
                    "train_seconds": seconds,
                    "held_out_bpd": float(bpd.total.mean()),
                    **sample_quality(samples, clf, held),
                }
            )
        if not args.steps_only:
            rows[1]["steps"] = stock_steps
        for scheduler, steps in (("ddpm", sample_steps), ("ddim", 50), ("ddim", 100), ("dpm", 50), ("dpm", 100)):
            if args.quick and steps == 100:
                continue
            start = time.perf_counter()
            samples = samples_of(ours_dir, n, steps, scheduler)
            step_rows.append(
                {
                    "scheduler": scheduler,
                    "steps": steps,
                    "seconds": time.perf_counter() - start,
                    **sample_quality(samples, clf, held),
                }
            )
            save_grid(samples, figures / f"steps_{args.figure_prefix}{scheduler}_{steps}.png")
    print_table(
        "Quality per compute (same wall-clock)",
        rows,
        ["recipe", "train_seconds", "held_out_bpd", "recognizable", "digits_is", "pixel_fd", "mean_intensity"],
    )
    print_table(
        "Quality per step count (our model)",
        step_rows,
        ["scheduler", "steps", "seconds", "recognizable", "digits_is", "pixel_fd"],
    )
    data_quality = sample_quality(held, clf, held)
    print(f"\nheld-out images themselves: {json.dumps(data_quality)}")
    write_json(
        args.out,
        {"machine": machine(), "per_compute": rows, "per_steps": step_rows, "held_out_reference": data_quality},
    )


if __name__ == "__main__":
    main()
