"""Sampling speed: seconds per denoising step of our DDPMPipeline against stock diffusers.DDPMPipeline with the
same weights and seed, the pipeline's overhead over bare UNet forwards, and a check that the images agree.

    python benchmarks/bench_sample.py [--quick] [--model FOLDER] [--out benchmarks/results/sample.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, machine, matmul_gflops, median_time, print_table, unet_flops, write_json  # noqa: E402


def run_case(name: str, unet, batch: int, steps: int, repeats: int, rate: float) -> list[dict]:
    import diffusers

    from ddpm_hub import DDPMPipeline, DDPMScheduler

    unet = unet.eval()
    scheduler_config = DDPMScheduler().config
    ours = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
    stock = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_config(scheduler_config))
    for p in (ours, stock):
        p.set_progress_bar_config(disable=True)

    def sample(pipeline):
        g = torch.Generator().manual_seed(0)
        return pipeline(batch_size=batch, generator=g, num_inference_steps=steps, output_type="np").images

    a, b = sample(ours), sample(stock)
    max_diff = float(np.abs(a - b).max())
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor(500)

    def bare():
        with torch.inference_mode():
            for _ in range(steps):
                unet(x, t)

    flops = unet_flops(unet, batch, backward=False)
    floor = flops / (rate * 1e9)  # seconds per step at the matmul rate
    rows = []
    timings = {}
    for label, fn in (("stock", lambda: sample(stock)), ("ours", lambda: sample(ours)), ("bare unet", bare)):
        with PeakRSS() as mem:
            timing = median_time(fn, repeats, warmup=1)
        per_step = timing["median"] / steps
        timings[label] = per_step
        rows.append(
            {
                "model": name,
                "batch": batch,
                "path": label,
                "s_per_step": per_step,
                "spread": f"{timing['min'] / steps:.3g}-{timing['max'] / steps:.3g}",
                "floor_fraction": floor / per_step,
                "peak_rss_mib": mem.peak_mib,
                "max_abs_diff": max_diff,
            }
        )
    rows[1]["speedup_vs_stock"] = timings["stock"] / timings["ours"]
    rows[1]["overhead_vs_bare"] = timings["ours"] / timings["bare unet"] - 1
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default=None, help="a trained pipeline folder to use for the digits rows")
    parser.add_argument("--out", default="benchmarks/results/sample.json")
    args = parser.parse_args()
    from diffusers import UNet2DModel

    from ddpm_hub import create_unet

    torch.manual_seed(0)
    rate = matmul_gflops(1024 if args.quick else 2048)
    digits = UNet2DModel.from_pretrained(args.model, subfolder="unet") if args.model else create_unet("digits")
    cases = (
        [("digits", digits, 1, 20, 3), ("digits", digits, 1000, 3, 2), ("cifar10", None, 1, 3, 1)]
        if args.quick
        else [
            ("digits", digits, 1, 100, 5),
            ("digits", digits, 8, 100, 5),
            ("digits", digits, 1000, 10, 3),
            ("cifar10", None, 1, 10, 3),
            ("cifar10", None, 8, 5, 3),
        ]
    )
    rows = []
    cifar = None
    for name, unet, batch, steps, repeats in cases:
        if name == "cifar10":
            cifar = cifar or create_unet("cifar10")
            unet = cifar
        rows += run_case(name, unet, batch, steps, repeats, rate)
    print_table(
        f"Sampling, seconds per denoising step (matmul {rate:.0f} GFLOP/s)",
        rows,
        [
            "model",
            "batch",
            "path",
            "s_per_step",
            "spread",
            "speedup_vs_stock",
            "overhead_vs_bare",
            "floor_fraction",
            "max_abs_diff",
            "peak_rss_mib",
        ],
    )
    write_json(args.out, {"machine": machine(), "matmul_gflops": rate, "rows": rows})


if __name__ == "__main__":
    main()
