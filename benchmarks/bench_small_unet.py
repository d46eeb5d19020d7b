"""Training speed of the `small` UNet preset on 32x32 RGB images, next to the stock diffusers example's UNet and to
`small` with two residual blocks per level (down to 8x8, its design before: what the one-block design was chosen over).

The data: an image folder of 32x32 crops of the two photographs scikit-learn ships (`china.jpg`, `flower.jpg`,
CC BY 2.0, see sklearn/datasets/images/README.txt), at random positions and scales: 2,000 to train on, 256 held out.
Every UNet trains in this process on the same batches (one AdamW step of L_simple each), timed as medians over
repeats, so the ratios between them are what to read (absolute numbers depend on the machine). Then each trains for
the same wall time (`--budget_s`, batch 16, lr 2e-4) and its L_simple on the held-out crops at fixed (t, noise) pairs
says which learns more per second. Last, the real trainer runs the README's command on the folder with no
--unet_preset (which picks `small` for 32x32) and its steps/s is read from its metrics.

    python benchmarks/bench_small_unet.py --out benchmarks/results/small_unet.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, median_time, print_table

# diffusers' examples/unconditional_image_generation/train_unconditional.py builds this UNet when no config is given
STOCK_EXAMPLE_UNET = {
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
}


def two_blocks_per_level(resolution: int = 32, channels: int = 3) -> dict:
    """`small` as it was designed before: two residual blocks per level, halving down to 8x8, attention there."""
    from ddpm_hub.models import SMALL_WIDTHS, small_unet_config

    levels = 1
    while levels < len(SMALL_WIDTHS) and resolution % 2**levels == 0 and resolution // 2**levels >= 8:
        levels += 1
    down = tuple("AttnDownBlock2D" if i == levels - 1 else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i == 0 else "UpBlock2D" for i in range(levels))
    return {**small_unet_config(resolution, channels), "layers_per_block": 2,
            "block_out_channels": SMALL_WIDTHS[:levels], "down_block_types": down, "up_block_types": up}  # fmt: skip


def rgb_crops_folder(root: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """`root/train/img_NNNN.png`: `count` random crops (side 48-192 px, resized to `size`) of scikit-learn's two
    sample photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB uint8 arrays
    rng = np.random.default_rng(seed)
    train = root / "train"
    train.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(48, 193))
        y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        crop.save(train / f"img_{i:04d}.png")
    return root


def step_time(config: dict, batch: torch.Tensor, repeats: int) -> dict:
    """Median seconds of one training step (forward, L_simple, backward, AdamW) of a UNet2DModel of `config`."""
    from diffusers import UNet2DModel

    from ddpm_hub.models import count_parameters

    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)
    generator = torch.Generator().manual_seed(0)

    def step():
        noise = torch.randn(batch.shape, generator=generator)
        t = torch.randint(0, 1000, (len(batch),), generator=generator)
        loss = (unet(batch + noise, t).sample - noise).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = median_time(step, repeats, warmup=2)
    return {"parameters": count_parameters(unet), **timing}


def loss_after(config: dict, train: torch.Tensor, held: torch.Tensor, budget_s: float) -> dict:
    """Train a UNet of `config` for `budget_s` seconds of wall time (batch 16, AdamW lr 2e-4, L_simple on the linear
    schedule) and return its steps and its L_simple on `held` at fixed (t, noise) pairs."""
    from diffusers import DDPMScheduler, UNet2DModel

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    fixed = torch.Generator().manual_seed(123)
    held_noise = torch.randn(held.shape, generator=fixed)
    held_t = torch.randint(0, 1000, (len(held),), generator=fixed)
    held_x = scheduler.add_noise(held, held_noise, held_t)
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-4, foreach=True)
    generator, steps, start = torch.Generator().manual_seed(0), 0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        x0 = train[torch.randint(0, len(train), (16,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (16,), generator=generator)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    with torch.no_grad():
        errors = [(unet(held_x[i : i + 64], held_t[i : i + 64]).sample - held_noise[i : i + 64]).pow(2).mean()
                  for i in range(0, len(held), 64)]  # fmt: skip
    return {"budget_s": budget_s, "steps": steps, "held_out_loss": float(torch.stack(errors).mean())}


def trainer_steps_per_second(folder: Path, steps: int, batch_size: int, threads: int) -> dict:
    """The README's command on the folder (no --unet_preset: `small` is chosen for 32x32); steps/s from its log."""
    out, train = folder / "run", Path(__file__).parents[1] / "training" / "train.py"
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(train),
               "--train_data_dir", str(folder), "--resolution", "32", "--train_batch_size", str(batch_size),
               "--max_train_steps", str(steps), "--logging_steps", str(steps), "--num_eval_images", "0",
               "--final_bpd", "none", "--num_quality_samples", "0", "--logger", "none", "--output_dir", str(out),
               "--num_cpu_threads", str(threads)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    wall = time.perf_counter() - start
    history = json.loads((out / "metrics.json").read_text())["history"]
    images_per_s = [h["images_per_s"] for h in history if "images_per_s" in h][-1]
    return {"steps": steps, "batch_size": batch_size, "steps_per_s": images_per_s / batch_size, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="small_unet.json")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2 on a 2-core machine)")
    parser.add_argument("--images", type=int, default=2000, help="crops in the RGB folder to train on")
    parser.add_argument("--held_out", type=int, default=256, help="crops held out for the equal-time loss")
    parser.add_argument("--budget_s", type=float, default=240, help="wall time each UNet trains for its loss")
    parser.add_argument("--trainer_steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repeats, a short trainer run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.images, args.held_out, args.trainer_steps, args.budget_s = 1, 64, 16, 4, 2
    torch.set_num_threads(args.threads)
    from ddpm_hub.models import unet_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = rgb_crops_folder(Path(tmp) / "rgb", args.images + args.held_out)
        from PIL import Image

        files = sorted((folder / "train").glob("*.png"))
        crops = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
        crops = crops.permute(0, 3, 1, 2).float() / 127.5 - 1
        train, held = crops[: args.images], crops[args.images :]
        for f in files[args.images :]:  # the trainer trains on the same 2,000 crops
            f.unlink()
        batch = train[: args.batch_size]
        configs = {"small (ddpm-hub default for 32x32)": unet_config("small", sample_size=32, in_channels=3),
                   "small with two blocks per level (down to 8x8)": two_blocks_per_level(32, 3),
                   "stock diffusers example": {"sample_size": 32, "in_channels": 3, "out_channels": 3,
                                               **STOCK_EXAMPLE_UNET}}  # fmt: skip
        for name, config in configs.items():
            timing = step_time(config, batch, args.repeats)
            rows.append({"unet": name, "parameters": timing["parameters"], "step_s": timing["median"],
                         "steps_per_s": 1 / timing["median"], "min_s": timing["min"], "max_s": timing["max"]})
            print(rows[-1], flush=True)
        for row, config in zip(rows, configs.values(), strict=True):
            row["speedup_vs_stock"] = rows[-1]["step_s"] / row["step_s"]
            trained = loss_after(config, train, held, args.budget_s)
            row.update(steps_in_budget=trained["steps"], held_out_loss=trained["held_out_loss"])
            print(row, flush=True)
        trainer = trainer_steps_per_second(folder, args.trainer_steps, args.batch_size, args.threads)
    result = {"machine": machine(), "batch_size": args.batch_size, "threads": args.threads, "rows": rows,
              "budget_s": args.budget_s, "trainer": trainer,
              "data": f"{args.images} (+{args.held_out} held out) 32x32 crops of scikit-learn's sample images "
                      "(CC BY 2.0)"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(f"one training step, 32x32 RGB, batch {args.batch_size}, {args.threads} threads", rows,
                ["unet", "parameters", "step_s", "steps_per_s", "speedup_vs_stock", "steps_in_budget",
                 "held_out_loss"])  # fmt: skip
    print(f"\ntrainer (README command, no --unet_preset): {trainer['steps_per_s']:.2f} steps/s over "
          f"{trainer['steps']} steps of batch {trainer['batch_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
