"""Classifier-free guidance on the embedded digits: train a preset (`--preset`, default `digits`, the `make train`
recipe) with `--class_conditional` (labels and 10% label dropout), then for each guidance scale measure how often
samples are of the requested class and what guidance costs in sample quality, in both digits feature spaces.

For each scale (default 0 = the unconditional model, 1 = the conditional one, 2, 3, 5) and each of `--seeds`
(default 4; a seed gives every scale the same initial noise), `--num_samples` images per class with the package's
default sampler (DPM-Solver++ 2M, 10 steps):
- class accuracy: the share that each shipped digits classifier (`ddpm_hub.digits_features`: the MLP, 98.0%, and
  the CNN, 98.7% accurate on the held-out digits) assigns to the requested class,
- FID/KID, precision and recall in each classifier's features (not Inception) of all samples against the 300
  held-out digits, and FID per class against that class's ~30 held-out digits (noisy from 30 references: compare
  it across scales only),
and once, the held-out bits/dim estimate given the label and without it (the null label; same noise).
Each number is the mean over seeds with a 95% t-interval. The recommended scale is the one of lowest CNN-space FID
among those whose samples both classifiers find >= 99% of the requested class. Prints a table, writes JSON and an
accuracy-vs-FID figure (both spaces). Runs on CUDA when available.

    python benchmarks/bench_guidance.py                       # the full measurement (docs/benchmarks.md)
    python benchmarks/bench_guidance.py --model outputs/ddpm-digits-cond   # evaluate a trained model (or checkpoint)
    python benchmarks/bench_guidance.py --quick               # CI smoke: a few steps and samples
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.99


def train_conditional(out_dir: str, max_steps: int | None, quick: bool, preset: str = "digits"):
    """Train the digits preset with --class_conditional (the real Trainer.run, no final evaluation); returns the
    trainer and the training wall time in seconds."""
    from accelerate.state import AcceleratorState, GradientState
    from ddpm_hub.training.trainer import Trainer

    from ddpm_hub.config import build_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    values = {"preset": preset, "class_conditional": True, "output_dir": out_dir, "logger": "none",
              "overwrite_output_dir": True, "final_bpd": "none", "num_quality_samples": 0, "num_eval_images": 0}
    if max_steps:
        values.update(max_train_steps=max_steps, lr_warmup_steps=min(100, max_steps // 4))
    if quick:
        values.update(checkpointing_steps=10_000, eval_steps=10_000, save_images_steps=10_000)
    trainer = Trainer(build_config(values))
    start = time.perf_counter()
    trainer.run()
    return trainer, time.perf_counter() - start


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 300 held-out digits as uint8 `[300, 1, 8, 8]` and their labels `[300]`."""
    import numpy as np

    from ddpm_hub.data import load_digits_dataset

    test = load_digits_dataset()["test"]
    images = torch.from_numpy(np.stack([np.asarray(im) for im in test["image"]])[:, None])
    return images, torch.tensor(test["label"])


SPACES = ("digits_mlp", "digits_conv")
TABLE = ("guidance_scale", "digits_mlp_accuracy", "digits_conv_accuracy", "digits_mlp_fid", "digits_conv_fid",
         "digits_mlp_per_class_fid_mean", "digits_conv_per_class_fid_mean", "digits_conv_precision",
         "digits_conv_recall")  # fmt: skip


def measure_seed(pipeline, held_out, held_labels, scale: float, per_class: int, steps: int, seed: int) -> dict:
    """Class accuracy (both classifiers), FID/KID/precision/recall in both spaces overall, and FID per class, of
    `per_class` guided samples of every class from one seed's initial noise."""
    from ddpm_hub import metrics
    from ddpm_hub.sampling import sample_uint8

    num_classes = pipeline.unet.config.num_class_embeds - 1
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    fake = sample_uint8(pipeline, len(labels), steps, seed, batch_size=500, class_labels=labels,
                        guidance_scale=scale)  # fmt: skip
    quality = metrics.digits_quality(held_out, fake, SPACES)
    row: dict = {f"{space}_accuracy": metrics.digits_class_accuracy(fake, labels, space) for space in SPACES}
    for space in SPACES:
        for name in ("fid", "kid", "precision", "recall"):
            row[f"{space}_{name}"] = quality[f"{space}_{name}"]
        per_class = [metrics.digits_quality(held_out[held_labels == c], fake[labels == c], (space,))[f"{space}_fid"]
                     for c in range(num_classes)]  # fmt: skip
        row[f"{space}_per_class_fid"] = per_class
        row[f"{space}_per_class_fid_mean"] = sum(per_class) / num_classes
    return row


def measure_scale(pipeline, held_out, held_labels, scale: float, per_class: int, steps: int,
                  seeds: list[int]) -> dict:  # fmt: skip
    """`measure_seed` at each seed (the same initial noise at every scale: paired), with mean +- 95% interval."""
    from ddpm_hub.metrics import mean_interval

    per_seed = [measure_seed(pipeline, held_out, held_labels, scale, per_class, steps, s) for s in seeds]
    row: dict = {"guidance_scale": scale, "samples_per_seed": per_class * (pipeline.unet.config.num_class_embeds - 1),
                 "seeds": seeds, "per_seed": per_seed}  # fmt: skip
    for name, value in per_seed[0].items():
        if isinstance(value, float):
            stat = mean_interval([r[name] for r in per_seed])
            row[name], row[f"{name}_half_width"] = stat["mean"], stat["half_width"]
    return row


def recommend(rows: list[dict]) -> float:
    """The scale of lowest CNN-space FID among those whose samples both classifiers find >= 99% of the requested
    class (mean over seeds); else the most accurate one."""
    good = [r for r in rows if min(r[f"{s}_accuracy"] for s in SPACES) >= TARGET_ACCURACY]
    if good:
        return min(good, key=lambda r: r["digits_conv_fid"])["guidance_scale"]
    return max(rows, key=lambda r: min(r[f"{s}_accuracy"] for s in SPACES))["guidance_scale"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Class accuracy against digits FID, one point per guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, space, name in zip(axes, SPACES, ("MLP", "CNN"), strict=True):
        fids, accs = [r[f"{space}_fid"] for r in rows], [100 * r[f"{space}_accuracy"] for r in rows]
        ax.errorbar(fids, accs, xerr=[r[f"{space}_fid_half_width"] for r in rows],
                    yerr=[100 * r[f"{space}_accuracy_half_width"] for r in rows], fmt="o-", color="black",
                    capsize=3)  # fmt: skip
        for i, (r, x, y) in enumerate(zip(rows, fids, accs, strict=True)):
            ax.annotate(f"scale {r['guidance_scale']:g}: {y:.1f}%", (x, y), textcoords="offset points",
                        xytext=(6, -12 if i % 2 else 6), fontsize=8)  # fmt: skip
        ax.axhline(100 * TARGET_ACCURACY, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"FID in the digits {name}'s features (lower is better)")
        ax.set_ylabel(f"requested class, by the {name} (%)")
        ax.set_ylim(0, 108)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--num_samples", type=int, default=100, help="samples per class and scale")
    parser.add_argument("--preset", default="digits", help="the training preset, trained with --class_conditional")
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--bpd_samples", type=int, default=32, help="strata of the bits/dim estimate")
    parser.add_argument("--output_dir", default=None, help="keep the trained pipeline here (default: a temp dir)")
    parser.add_argument("--model", default=None, help="evaluate this pipeline or checkpoint folder (no training)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="sampling seeds (each gives every scale the same initial noise)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guidance.json"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "guidance.png"))
    args = parser.parse_args()
    if args.quick:
        args.scales, args.num_samples, args.max_train_steps, args.bpd_samples = [0.0, 1.0, 3.0], 6, 20, 4
        args.seeds = args.seeds[:2]
        args.figure = str(Path(tempfile.mkdtemp()) / "guidance.png")
    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.evaluation import ema_weights, held_out_bpd
    from ddpm_hub.sampling import with_sampler

    steps = SAMPLERS["dpm"].steps
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from ddpm_hub import DDPMPipeline

            pipeline, ema, trained = DDPMPipeline.from_pretrained(args.model), None, {"model": args.model}
            pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
            held, held_labels = held_out_digits()
        else:
            trainer, train_seconds = train_conditional(args.output_dir or f"{tmp}/run", args.max_train_steps,
                                                       args.quick, args.preset)  # fmt: skip
            print(f"trained {trainer.global_step} steps in {train_seconds:.0f} s on {trainer.accelerator.device}")
            trained = {"device": str(trainer.accelerator.device), "train_steps": trainer.global_step,
                       "train_seconds": train_seconds}  # fmt: skip
            held, held_labels = trainer.data.held_out, trainer.data.held_out_labels
            pipeline, ema = trainer.ema_pipeline(), trainer.ema
        with ema_weights(pipeline.unet, ema):
            sampler = with_sampler(pipeline, "dpm")
            sampler.scheduler.set_timesteps(steps)  # recorded: a start at t=999 is what sampled badly on one GPU run
            timesteps = [int(t) for t in sampler.scheduler.timesteps]
            rows = []
            for scale in args.scales:
                rows.append(measure_scale(sampler, held, held_labels, scale, args.num_samples, steps, args.seeds))
                print(f"scale {scale:g}: " + ", ".join(f"{k} {rows[-1][k]:.4g}" for k in TABLE[1:]), flush=True)
            bpd_images, bpd_labels = (held[:50], held_labels[:50]) if args.quick else (held, held_labels)
            bpd = held_out_bpd(pipeline, bpd_images, "estimate", 300, args.seeds[0], args.bpd_samples, bpd_labels)
    recommended = recommend(rows)
    print_table(f"Classifier-free guidance on the digits ({args.num_samples} samples per class x {len(args.seeds)} "
                f"seeds, DPM-Solver++ {steps} steps; mean over seeds; recommended scale {recommended:g})", rows,
                list(TABLE))  # fmt: skip
    print_table("Held-out bits/dim (estimate), given the label and without it", [bpd], list(bpd))
    plot(rows, Path(args.figure), f"Guidance scales {', '.join(f'{s:g}' for s in args.scales)}: class accuracy "
         f"vs FID, {args.num_samples}/class x {len(args.seeds)} seeds (mean, 95% interval)")  # fmt: skip
    write_json(args.out, {"machine": machine(), **trained, "sampler": "dpm", "sampler_steps": steps,
                          "sampler_timesteps": timesteps, "sampler_config": dict(sampler.scheduler.config),
                          "recommended_guidance_scale": recommended, "target_accuracy": TARGET_ACCURACY,
                          "bits_per_dim": bpd, "rows": rows})  # fmt: skip
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
