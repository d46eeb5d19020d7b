"""Sample quality per sampler and step count on a trained digits model, and the fastest sampler that is as good.

For DDPM at 1000/250/100 steps and every other sampler of `ddpm_hub.choices.SAMPLERS` (each scheduler class of
`diffusers.DDPMScheduler._compatibles`, plus DPM-Solver++ 3M and Karras sigmas) at 10, 20, 50 and 100 steps:
`--num_samples` samples (one seed), digits-classifier FID/KID against the 300 held-out digits, and seconds per
1000 images. A grid per sampler at its usual step count goes to `docs/figures/samplers/`. The recommendation is the
(sampler, steps) with the fewest UNet calls whose FID is within 10% of DDPM-1000's (ties: the better FID).

    python benchmarks/bench_samplers.py --model outputs/ddpm-digits [--num_samples 500] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def held_out_digits() -> torch.Tensor:
    import numpy as np

    from ddpm_hub.data import load_digits_dataset

    test = load_digits_dataset()["test"]
    return torch.from_numpy(np.stack([np.asarray(im) for im in test["image"]])[:, None])


def recommend(rows: list[dict], reference: float) -> dict:
    """The fewest UNet calls whose FID is within 10% of `reference` (DDPM-1000's); among equally many calls, the
    best FID (their times differ by noise only)."""
    two_calls = ("Heun", "KDPM2", "DPMSolverSDE")  # two UNet calls per step
    good = [r for r in rows if "digits_fid" in r and r["digits_fid"] <= 1.1 * reference]
    return min(good, key=lambda r: (r["steps"] * (2 if r["scheduler"].startswith(two_calls) else 1), r["digits_fid"]))


def main() -> None:
    from PIL import Image

    from ddpm_hub import DDPMPipeline
    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.metrics import digits_fid_kid
    from ddpm_hub.plots import image_grid
    from ddpm_hub.sampling import sample_uint8, with_sampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "ddpm-digits"))
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="*", default=[10, 20, 50, 100])
    parser.add_argument("--ddpm_steps", type=int, nargs="*", default=[1000, 250, 100])
    parser.add_argument("--quick", action="store_true", help="a tiny model trained here, 3 samplers, seconds")
    parser.add_argument("--samplers", nargs="*", default=None, help="a subset of the samplers (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "samplers.json"))
    parser.add_argument("--figures", default=str(REPO / "docs" / "figures" / "samplers"))
    args = parser.parse_args()
    names = args.samplers or list(SAMPLERS)
    if args.quick:
        from ddpm_hub import DDPMScheduler, create_unet

        pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler())
        names, args.steps, args.num_samples, ddpm_steps = ["ddpm", "ddim", "dpm"], [5], 20, [20]
        figures = None
    else:
        pipeline = DDPMPipeline.from_pretrained(args.model)
        ddpm_steps = args.ddpm_steps
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
    real = held_out_digits()
    rows = []
    for name in names:
        sampler = with_sampler(pipeline, name)
        for steps in ddpm_steps if name == "ddpm" else args.steps:
            start = time.perf_counter()
            try:
                fake = sample_uint8(sampler, args.num_samples, steps, seed=0, batch_size=1000)
            except Exception as exc:  # a scheduler that fails at this step count: a row saying so
                rows.append({"sampler": name, "scheduler": SAMPLERS[name].scheduler, "note": SAMPLERS[name].note,
                             "steps": steps, "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                print(rows[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            quality = digits_fid_kid(real, fake)
            row = {"sampler": name, "scheduler": SAMPLERS[name].scheduler, "note": SAMPLERS[name].note,
                   "steps": steps, "s_per_1000": seconds * 1000 / args.num_samples, **quality}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
            if figures is not None and steps == SAMPLERS[name].steps:
                tiles = [Image.fromarray(x[0].numpy()) for x in fake[:64]]
                image_grid(tiles, upscale=4).save(figures / f"{name}_{steps}.png")
    measured = [r for r in rows if "digits_fid" in r]
    print_table(f"Sampler quality ({args.num_samples} samples, digits-classifier FID/KID vs 300 held-out digits)",
                rows, ["sampler", "note", "steps", "s_per_1000", "digits_fid", "digits_kid", "error"])  # fmt: skip
    if "ddpm" not in names:
        write_json(args.out, {"machine": machine(), "num_samples": args.num_samples, "rows": rows})
        return
    reference = next(r for r in measured if r["sampler"] == "ddpm" and r["steps"] == max(ddpm_steps))["digits_fid"]
    best = recommend(measured, reference)
    print(f"DDPM-{max(ddpm_steps)} FID {reference:.3f}; fewest steps within 10%: {best['sampler']} "
          f"{best['steps']} steps (FID {best['digits_fid']:.3f}, {best['s_per_1000']:.1f} s per 1000 images)")
    write_json(args.out, {"machine": machine(), "num_samples": args.num_samples, "rows": rows,
                          "reference_fid": reference, "recommended": best})  # fmt: skip


if __name__ == "__main__":
    main()
