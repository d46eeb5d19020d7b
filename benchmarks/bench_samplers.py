"""Sample quality per sampler and step count on a trained digits model, and the fastest sampler that is as good.

For DDPM at 1000/250/100 steps and every other sampler of `ddpm_hub.choices.SAMPLERS` (each scheduler class of
`diffusers.DDPMScheduler._compatibles`, plus DPM-Solver++ 3M and Karras sigmas) at 10, 20, 50 and 100 steps:
`--num_samples` samples at each seed of `--seeds` (a seed gives every sampler the same initial noise: paired),
scored against the 300 held-out digits in both shipped classifier spaces (`digits_mlp`, `digits_conv`: FID, KID,
precision, recall, class-frequency error; mean and 95% t-interval over seeds, and the paired difference from
DDPM-1000), and seconds per 1000 images. A grid per sampler at its usual step count goes to `docs/figures/samplers/`.
The recommendation is the (sampler, steps) with the fewest UNet calls whose mean FID is within 10% of DDPM-1000's in
both spaces (ties: the better conv FID).

    python benchmarks/bench_samplers.py --model outputs/ddpm-digits [--num_samples 1000 --seeds 0 1 2 3] [--quick]
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
SPACES = ("digits_mlp", "digits_conv")


def recommend(rows: list[dict], reference: dict) -> dict | None:
    """The fewest UNet calls whose mean FID is within 10% of `reference`'s (DDPM-1000's) in every space; among
    equally many calls, the best conv FID (their times differ by noise only)."""
    two_calls = ("Heun", "KDPM2", "DPMSolverSDE")  # two UNet calls per step
    good = [r for r in rows if all(r[f"{s}_fid"] <= 1.1 * reference[f"{s}_fid"] for s in SPACES)]
    calls = lambda r: r["steps"] * (2 if r["scheduler"].startswith(two_calls) else 1)  # noqa: E731
    return min(good, key=lambda r: (calls(r), r["digits_conv_fid"])) if good else None


def summarize_row(row: dict, per_seed: list[dict], reference: list[dict] | None) -> None:
    """Add each metric's mean (plain key), 95% t half-width (`_ci95`) and, paired by seed, the difference from the
    reference's (`_minus_ref`, `_minus_ref_ci95`)."""
    from ddpm_hub.metrics import mean_interval

    for key in per_seed[0]:
        if key == "seed":
            continue
        stat = mean_interval([r[key] for r in per_seed])
        row[key], row[f"{key}_ci95"] = stat["mean"], stat["half_width"]
        if reference is not None and key.endswith("_fid"):
            diff = mean_interval([r[key] - q[key] for r, q in zip(per_seed, reference, strict=True)])
            row[f"{key}_minus_ref"], row[f"{key}_minus_ref_ci95"] = diff["mean"], diff["half_width"]


def main() -> None:
    from PIL import Image

    from ddpm_hub import DDPMPipeline
    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.digits_features import digits_arrays
    from ddpm_hub.metrics import digits_quality
    from ddpm_hub.plots import image_grid
    from ddpm_hub.sampling import sample_uint8, with_sampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "outputs" / "ddpm-digits"))
    parser.add_argument("--num_samples", type=int, default=1000, help="per seed, drawn in batches of --batch_size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--batch_size", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="*", default=[10, 20, 50, 100])
    parser.add_argument("--ddpm_steps", type=int, nargs="*", default=[1000, 250, 100])
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="a tiny model trained here, 3 samplers, seconds")
    parser.add_argument("--samplers", nargs="*", default=None, help="a subset of the samplers (default: all)")
    parser.add_argument("--diffusers_defaults", action="store_true",
                        help="build each scheduler as plain `X.from_config(config)` does, without ddpm_hub's settings "
                        "(lambda_min_clipped on the cosine schedule): what a user's own scheduler gets")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "samplers.json"))
    parser.add_argument("--figures", default=str(REPO / "docs" / "figures" / "samplers"))
    args = parser.parse_args()
    names = args.samplers or list(SAMPLERS)
    if args.quick:
        from ddpm_hub import DDPMScheduler, create_unet

        torch.manual_seed(0)
        pipeline = DDPMPipeline(unet=create_unet("tiny"), scheduler=DDPMScheduler())
        names, args.steps, args.num_samples, ddpm_steps = ["ddpm", "ddim", "dpm"], [5], 20, [20]
        args.seeds = args.seeds[:2]
        figures = None
    else:
        pipeline = DDPMPipeline.from_pretrained(args.model)
        ddpm_steps = args.ddpm_steps
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline.to(device)
    real, _ = digits_arrays("test")
    rows, per_seed = [], {}
    ref_key = ("ddpm", max(ddpm_steps)) if "ddpm" in names else None
    order = [(n, s) for n in names for s in (ddpm_steps if n == "ddpm" else args.steps)]
    if ref_key in order:  # the reference first, so that every row can be paired with it
        order.remove(ref_key)
        order.insert(0, ref_key)
    for name, steps in order:
        sampler = with_sampler(pipeline, name)
        if args.diffusers_defaults and name != "ddpm":
            import diffusers

            plain = getattr(diffusers, SAMPLERS[name].scheduler).from_config(pipeline.scheduler.config,
                                                                            **SAMPLERS[name].config)  # fmt: skip
            sampler = type(pipeline)(unet=pipeline.unet, scheduler=plain)
        row = {"sampler": name, "scheduler": SAMPLERS[name].scheduler, "note": SAMPLERS[name].note, "steps": steps,
               "scheduler_config": {k: v for k, v in sampler.scheduler.config.items() if k == "lambda_min_clipped"}}
        scores = []
        try:
            for seed in args.seeds:
                start = time.perf_counter()
                fake = sample_uint8(sampler, args.num_samples, steps, seed=seed, batch_size=args.batch_size)
                seconds = time.perf_counter() - start
                scores.append({"seed": seed, "s_per_1000": seconds * 1000 / args.num_samples,
                               **digits_quality(real, fake)})  # fmt: skip
        except Exception as exc:  # a scheduler that fails at this step count: a row saying so
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
            print(rows[-1], flush=True)
            continue
        per_seed[(name, steps)] = scores
        summarize_row(row, scores, per_seed.get(ref_key) if (name, steps) != ref_key else None)
        row["per_seed"] = scores
        print(f"{name} {steps}: FID " + ", ".join(f"{s} {row[f'{s}_fid']:.3f}" for s in SPACES), flush=True)
        rows.append(row)
        if figures is not None and steps == SAMPLERS[name].steps:
            tiles = [Image.fromarray(x[0].numpy()) for x in fake[:64]]
            image_grid(tiles, upscale=4).save(figures / f"{name}_{steps}.png")
    measured = [r for r in rows if "error" not in r]
    labels = {"fid": "FID", "precision": "P", "recall": "R", "class_error": "class err", "fid_minus_ref": "FID - ref"}
    table = []
    for r in rows:  # cells: mean +- 95% t half-width over seeds
        cells = {k: r.get(k, "") for k in ("sampler", "note", "steps", "error")}
        cells["s per 1000"] = r.get("s_per_1000", "")
        for metric, label in labels.items():
            for s in SPACES:
                key = f"{s}_{metric}"
                if key in r:
                    cells[f"{label} {s.removeprefix('digits_')}"] = f"{r[key]:.3g} +- {r[key + '_ci95']:.2g}"
        table.append(cells)
    columns = ["sampler", "note", "steps", "s per 1000"] + [f"{label} {s.removeprefix('digits_')}"
               for label in labels.values() for s in SPACES] + ["error"]  # fmt: skip
    print_table(f"Sampler quality ({args.num_samples} samples x seeds {args.seeds}, digits-classifier metrics vs 300 "
                "held-out digits, mean +- 95% t half-width" + (f"; FID - ref: paired difference from DDPM-"
                f"{max(ddpm_steps)})" if ref_key else ")"), table, columns)  # fmt: skip
    payload = {"machine": machine(), "device": str(device), "num_samples": args.num_samples, "seeds": args.seeds,
               "rows": rows}  # fmt: skip
    if ref_key is None or ref_key not in per_seed:
        write_json(args.out, payload)
        return
    reference = next(r for r in measured if (r["sampler"], r["steps"]) == ref_key)
    best = recommend(measured, reference)
    fids = ", ".join(f"{s} {reference[f'{s}_fid']:.3f}" for s in SPACES)
    if best is None:
        print(f"DDPM-{ref_key[1]} FID {fids}; no sampler is within 10% of it in both spaces")
    else:
        print(f"DDPM-{ref_key[1]} FID {fids}; fewest steps within 10% in both spaces: {best['sampler']} "
              f"{best['steps']} steps (FID " + ", ".join(f"{s} {best[f'{s}_fid']:.3f}" for s in SPACES) +
              f", {best['s_per_1000']:.1f} s per 1000 images)")  # fmt: skip
    write_json(args.out, {**payload, "reference_fid": {s: reference[f"{s}_fid"] for s in SPACES},
                          "recommended": best and {k: v for k, v in best.items() if k != "per_seed"}})  # fmt: skip


if __name__ == "__main__":
    main()
