"""Classifier-free guidance on the embedded digits: train a preset (`--preset`, default `digits_fast`) with
`--class_conditional` (labels and 10% label dropout), then for each guidance scale measure how often samples are of
the requested class and what guidance costs in sample quality.

For each scale (default 0 = the unconditional model, 1 = the conditional one, 2, 3, 5), `--num_samples` images per
class with the package's default sampler (DPM-Solver++ 2M, 10 steps):
- class accuracy: the fraction that the shipped digits classifier (`ddpm_hub.digits_features`, 97% accurate on the
  held-out digits) assigns to the requested class,
- digits-classifier FID/KID (not Inception) of all samples against the 300 held-out digits, and per class against
  that class's ~30 held-out digits (per-class FID from 30 references is noisy; compare it across scales only),
and once, the held-out bits/dim estimate given the label and without it (the null label; same noise).
The recommended scale is the one of lowest FID among those reaching >= 99% accuracy. Prints a table, writes JSON
and an accuracy-vs-FID figure. Runs on CUDA when available.

    python benchmarks/bench_guidance.py                       # the full measurement (README)
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
sys.path.insert(0, str(REPO / "training"))
TARGET_ACCURACY = 0.99


def train_conditional(out_dir: str, max_steps: int | None, quick: bool, preset: str = "digits_fast"):
    """Train the digits preset with --class_conditional (the real Trainer.run, no final evaluation); returns the
    trainer and the training wall time in seconds."""
    from accelerate.state import AcceleratorState, GradientState
    from train import Trainer

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


def measure_scale(pipeline, held_out, held_labels, scale: float, per_class: int, steps: int, seed: int) -> dict:
    """Class accuracy and digits FID/KID (overall and per class) of `per_class` guided samples of every class."""
    from ddpm_hub import metrics
    from ddpm_hub.sampling import sample_uint8

    num_classes = pipeline.unet.config.num_class_embeds - 1  # checkpoints keep no class names
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    fake = sample_uint8(pipeline, len(labels), steps, seed, batch_size=500, class_labels=labels,
                        guidance_scale=scale)  # fmt: skip
    row = {"guidance_scale": scale, "num_samples": len(labels),
           "class_accuracy": metrics.digits_class_accuracy(fake, labels), **metrics.digits_fid_kid(held_out, fake)}
    per_class_rows = []
    for c in range(num_classes):
        real_c, fake_c = held_out[held_labels == c], fake[labels == c]
        quality = metrics.digits_fid_kid(real_c, fake_c)
        per_class_rows.append({"class": c, "accuracy": metrics.digits_class_accuracy(fake_c, labels[labels == c]),
                               "digits_fid": quality["digits_fid"], "digits_kid": quality["digits_kid"]})
    row["per_class"] = per_class_rows
    row["per_class_fid_mean"] = sum(r["digits_fid"] for r in per_class_rows) / num_classes
    return row


def recommend(rows: list[dict]) -> float:
    """The scale of lowest FID among those with >= 99% class accuracy (else the most accurate one)."""
    good = [r for r in rows if r["class_accuracy"] >= TARGET_ACCURACY]
    best = min(good, key=lambda r: r["digits_fid"]) if good else max(rows, key=lambda r: r["class_accuracy"])
    return best["guidance_scale"]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Class accuracy against digits FID, one point per guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    fids, accs = [r["digits_fid"] for r in rows], [100 * r["class_accuracy"] for r in rows]
    ax.plot(fids, accs, "o-", color="black")
    for r, x, y in zip(rows, fids, accs, strict=True):
        ax.annotate(f"scale {r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.axhline(100 * TARGET_ACCURACY, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("digits-classifier FID vs held-out (lower is better)")
    ax.set_ylabel("samples of the requested class (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    parser.add_argument("--num_samples", type=int, default=100, help="samples per class and scale")
    parser.add_argument("--preset", default="digits_fast", help="the training preset, trained with --class_conditional")
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--bpd_samples", type=int, default=32, help="strata of the bits/dim estimate")
    parser.add_argument("--output_dir", default=None, help="keep the trained pipeline here (default: a temp dir)")
    parser.add_argument("--model", default=None, help="evaluate this pipeline or checkpoint folder (no training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guidance.json"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "guidance.png"))
    args = parser.parse_args()
    if args.quick:
        args.scales, args.num_samples, args.max_train_steps, args.bpd_samples = [0.0, 1.0, 3.0], 6, 20, 4
        args.figure = str(Path(tempfile.mkdtemp()) / "guidance.png")
    from ddpm_hub.choices import SAMPLERS
    from ddpm_hub.export import ema_weights, held_out_bpd
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
            rows = [measure_scale(sampler, held, held_labels, s, args.num_samples, steps, args.seed)
                    for s in args.scales]  # fmt: skip
            bpd_images, bpd_labels = (held[:50], held_labels[:50]) if args.quick else (held, held_labels)
            bpd = held_out_bpd(pipeline, bpd_images, "estimate", 300, args.seed, args.bpd_samples, bpd_labels)
    for r in rows:
        print(r["guidance_scale"], [round(p["accuracy"], 3) for p in r["per_class"]], flush=True)
    recommended = recommend(rows)
    print_table(f"Classifier-free guidance on the digits ({args.num_samples} samples per class, DPM-Solver++ "
                f"{steps} steps; recommended scale {recommended:g})", rows,
                ["guidance_scale", "class_accuracy", "digits_fid", "digits_kid", "per_class_fid_mean"])  # fmt: skip
    print_table("Held-out bits/dim (estimate), given the label and without it", [bpd], list(bpd))
    plot(rows, Path(args.figure), f"Guidance scales {', '.join(f'{s:g}' for s in args.scales)}: class accuracy "
         f"vs digits FID ({args.num_samples}/class)")  # fmt: skip
    write_json(args.out, {"machine": machine(), **trained, "sampler": "dpm", "sampler_steps": steps,
                          "recommended_guidance_scale": recommended, "target_accuracy": TARGET_ACCURACY,
                          "bits_per_dim": bpd, "rows": rows})  # fmt: skip
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
