"""Training speed of the `small` UNet preset on 32x32 RGB images, next to the stock diffusers example's UNet.

The data: an image folder of 32x32 crops of the two photographs scikit-learn ships (`china.jpg`, `flower.jpg`,
CC BY 2.0, see sklearn/datasets/images/README.txt), at random positions and scales. Both UNets train in this process
on the same batches (one AdamW step of L_simple each), timed as medians over repeats, so the ratio between them is
what to read (absolute numbers depend on the machine). Then the real trainer runs the README's command on the
folder with no --unet_preset (which picks `small` for 32x32) and its steps/s is read from its metrics.

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
    parser.add_argument("--images", type=int, default=2000, help="crops in the RGB folder")
    parser.add_argument("--trainer_steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few repeats, a short trainer run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.images, args.trainer_steps = 1, 64, 4
    torch.set_num_threads(args.threads)
    from ddpm_hub.models import unet_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = rgb_crops_folder(Path(tmp) / "rgb", args.images)
        from PIL import Image

        files = sorted((folder / "train").glob("*.png"))[: args.batch_size]
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        configs = {"small (ddpm-hub default for 32x32)": unet_config("small", sample_size=32, in_channels=3),
                   "stock diffusers example": {"sample_size": 32, "in_channels": 3, "out_channels": 3,
                                               **STOCK_EXAMPLE_UNET}}  # fmt: skip
        for name, config in configs.items():
            timing = step_time(config, batch, args.repeats)
            rows.append({"unet": name, "parameters": timing["parameters"], "step_s": timing["median"],
                         "steps_per_s": 1 / timing["median"], "min_s": timing["min"], "max_s": timing["max"]})
        rows[0]["speedup_vs_stock"] = rows[1]["step_s"] / rows[0]["step_s"]
        trainer = trainer_steps_per_second(folder, args.trainer_steps, args.batch_size, args.threads)
    result = {"machine": machine(), "batch_size": args.batch_size, "threads": args.threads, "rows": rows,
              "trainer": trainer, "data": f"{args.images} 32x32 crops of scikit-learn's sample images (CC BY 2.0)"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table(f"one training step, 32x32 RGB, batch {args.batch_size}, {args.threads} threads", rows,
                ["unet", "parameters", "step_s", "steps_per_s", "speedup_vs_stock"])
    print(f"\ntrainer (README command, no --unet_preset): {trainer['steps_per_s']:.2f} steps/s over "
          f"{trainer['steps']} steps of batch {trainer['batch_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
