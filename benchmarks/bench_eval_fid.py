"""The cost of `--eval_fid_steps`: seconds per during-training evaluation (sampling + FID/KID/precision/recall in both
digits spaces) for the `digits` preset's UNet at `--eval_fid_samples` samples with the preset's sampler; median of 3.

python benchmarks/bench_eval_fid.py [--quick] [--samples 300] [--out benchmarks/results/eval_fid.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matmul_gflops, median_time, print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30 samples, one repeat (a smoke run)")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/eval_fid.json")
    args = parser.parse_args()
    from ddpm_hub.training.components import make_scheduler, resolve_unet_config
    from diffusers import UNet2DModel

    from ddpm_hub import DDPMPipeline
    from ddpm_hub.config import build_config
    from ddpm_hub.data import ImageDataset, load_digits_dataset, validate_images
    from ddpm_hub.evaluation import training_quality
    from ddpm_hub.sampling import with_sampler

    cfg = build_config({"preset": "digits"})
    torch.manual_seed(0)
    unet = UNet2DModel(**resolve_unet_config(cfg, 1)[0]).eval()  # untrained: the cost does not depend on the weights
    pipeline = with_sampler(DDPMPipeline(unet=unet, scheduler=make_scheduler(cfg)), cfg.sampler)
    test = load_digits_dataset()["test"]
    held_out, _, _ = validate_images(ImageDataset(test, "image", 8, 1), progress=False)
    samples = 30 if args.quick else args.samples
    repeats = 1 if args.quick else 3

    def evaluate() -> None:
        training_quality(pipeline, held_out, samples, cfg.sampling_steps, cfg.seed, cfg.eval_batch_size * 4)

    timing = median_time(evaluate, repeats=repeats, warmup=1)
    row = {"preset": "digits", "sampler": cfg.sampler, "steps": cfg.sampling_steps, "samples": samples,
           "num_real": len(held_out), "torch_threads": torch.get_num_threads(),
           "matmul_gflops": round(matmul_gflops(), 1), **timing}  # fmt: skip
    print_table(f"One --eval_fid_steps evaluation (median of {repeats})", [row], list(row))
    write_json(args.out, {"machine": machine(), "rows": [row]})


if __name__ == "__main__":
    main()
