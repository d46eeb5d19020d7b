"""The bound: seconds per image for `bits_per_dim` over all T steps, and the fast estimate's time and error.

python benchmarks/bench_bpd.py [--quick] [--model FOLDER] [--out benchmarks/results/bpd.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, machine, print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="a trained pipeline folder (default: an untrained digits UNet)")
    parser.add_argument("--out", default="benchmarks/results/bpd.json")
    args = parser.parse_args()
    from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet
    from ddpm_hub.data import ImageDataset, load_digits_dataset, validate_images

    torch.manual_seed(0)
    if args.model:
        pipeline = DDPMPipeline.from_pretrained(args.model)
    else:
        scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100 if args.quick else 1000)
        pipeline = DDPMPipeline(unet=create_unet("digits"), scheduler=scheduler)
    pipeline.unet.eval()
    n = 16 if args.quick else 100
    test = load_digits_dataset()["test"].cast_column("image", __import__("datasets").Image(decode=False))
    images, _, _ = validate_images(ImageDataset(test, "image", 8, 1), progress=False)
    images = images[:n]
    rows = []
    with PeakRSS() as mem:
        start = time.perf_counter()
        full = pipeline.bits_per_dim(images, batch_size=n, generator=torch.Generator().manual_seed(0), progress=False)
        full_s = time.perf_counter() - start
    full_mean = float(full.total.mean())
    rows.append(
        {
            "method": f"full (T={len(pipeline.scheduler)})",
            "bits_per_dim": full_mean,
            "s_per_image": full_s / n,
            "stderr": 0.0,
            "abs_error": 0.0,
            "peak_rss_mib": mem.peak_mib,
        }
    )
    for k in (8, 32) if args.quick else (8, 32, 128):
        with PeakRSS() as mem:
            start = time.perf_counter()
            est = pipeline.bits_per_dim(
                images, batch_size=n, estimate=True, num_samples=k, generator=torch.Generator().manual_seed(1)
            )
            est_s = time.perf_counter() - start
        stderr = float((est.stderr**2).sum().sqrt() / n)
        rows.append(
            {
                "method": f"estimate (K={k})",
                "bits_per_dim": float(est.total.mean()),
                "s_per_image": est_s / n,
                "stderr": stderr,
                "abs_error": abs(float(est.total.mean()) - full_mean),
                "peak_rss_mib": mem.peak_mib,
            }
        )
    print_table(
        f"Bits/dim of {n} held-out digits",
        rows,
        ["method", "bits_per_dim", "stderr", "abs_error", "s_per_image", "peak_rss_mib"],
    )
    write_json(args.out, {"machine": machine(), "num_images": n, "rows": rows})


if __name__ == "__main__":
    main()
