"""Time to quality on the embedded digits: train for a wall-clock budget, evaluate at fixed wall-clock points.

Each configuration is a base recipe (`--base`: the `digits` preset, or the recipe it replaced) with one lever
changed. Training runs in-process with the real Trainer (`optimizer_step`, the run's own thread policy) at the
recipe's learning rate after warm-up (its cosine decay is planned over 100,000 steps: under 0.1% of it happens in
a 5-minute run); the clock stops during evaluations.
At every point (`--every` seconds of training) the EMA weights are measured on the 300 held-out digits:
- held-out bits/dim, the stratified estimate (L_0..L_10 exact + 16 strata; the same draws at every point),
- digits-classifier FID/KID (`ddpm_hub.digits_features`, not Inception FID; `digits_fid` is the MLP's space, plus
  the CNN's FID and class-frequency error) of `--num_samples` (1000) samples
  drawn with the package's default sampler (DPM-Solver++ 2M, 10 steps: about 5 s per 1000 on this CPU), against
  the held-out digits.
Prints a table, writes JSON and a PNG of the curves.

    python benchmarks/bench_time_to_quality.py                 # the digits preset and the recipes before it
    python benchmarks/bench_time_to_quality.py --base batch_128_lr_1e-3 \
        --levers baseline fixed_variance old_recipe batch_64_lr_2e-3      # docs/benchmarks.md, first table
    python benchmarks/bench_time_to_quality.py --base old_recipe --num_samples 500 --sampler_steps 20 \
        --out benchmarks/results/time_to_quality_levers.json \
        --figure docs/figures/time_to_quality_levers.png --levers baseline lr_2e-3 ...   # docs/benchmarks.md, levers
    python benchmarks/bench_time_to_quality.py --quick         # CI smoke: 2 levers, seconds
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

# Base recipes. `digits` is the preset as shipped (ddpm_hub/config.py: v-prediction, learned-range variance with the
# hybrid loss, batch 64, lr 2e-3, warm-up 100, EMA 0.999 with warm-up, cosine betas, uniform timesteps, channels
# 32/64). `batch_128_lr_1e-3` is the same at batch 128 and lr 1e-3. `old_recipe` is the epsilon-prediction recipe
# (epsilon prediction, fixed variance, L_simple, batch 128, lr 1e-3).
OLD_RECIPE = {"prediction_type": "epsilon", "variance_type": "fixed_small", "loss_type": "simple",
              "train_batch_size": 128, "learning_rate": 1e-3}  # fmt: skip
BASES: dict[str, dict] = {
    "digits": {},
    "batch_128_lr_1e-3": {"train_batch_size": 128, "learning_rate": 1e-3},
    "old_recipe": OLD_RECIPE,
}

# One lever at a time, on top of the base.
LEVERS: dict[str, dict] = {
    "baseline": {},
    "old_recipe": OLD_RECIPE,
    "fixed_variance": {"variance_type": "fixed_small", "loss_type": "simple"},
    "epsilon": {"prediction_type": "epsilon"},
    "hybrid": {"variance_type": "learned_range", "loss_type": "hybrid"},
    "batch_64_lr_2e-3": {"train_batch_size": 64, "learning_rate": 2e-3},
    "lr_2e-3": {"learning_rate": 2e-3},
    "lr_5e-4": {"learning_rate": 5e-4},
    "warmup_500": {"lr_warmup_steps": 500},
    "batch_64": {"train_batch_size": 64},
    "batch_256": {"train_batch_size": 256},
    "ema_0.995": {"ema_max_decay": 0.995},
    "ema_0.9999": {"ema_max_decay": 0.9999},
    "linear_betas": {"beta_schedule": "linear"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "min_snr_5": {"snr_gamma": 5.0},
    "importance_t": {"timestep_sampling": "importance"},
    "width_16_32": {"model_config_name_or_path": "width:16,32"},
    "width_64_128": {"model_config_name_or_path": "width:64,128"},
}


def make_trainer(lever: dict, out_dir: str, max_steps: int):
    """The real Trainer for the digits preset with `lever` (base and lever merged) applied."""
    from ddpm_hub.training.trainer import Trainer

    from ddpm_hub.config import build_config
    from ddpm_hub.models import unet_config

    values = {"preset": "digits", "output_dir": out_dir, "logger": "none", "max_train_steps": max_steps,
              "num_eval_images": 0, "final_bpd": "none", "num_quality_samples": 0}  # fmt: skip
    values.update(lever)
    width = values.pop("model_config_name_or_path", None)
    if width and width.startswith("width:"):
        channels = tuple(int(c) for c in width[6:].split(","))
        config = dict(unet_config("digits"), block_out_channels=channels, norm_num_groups=min(16, channels[0]))
        path = Path(out_dir).with_suffix(".unet.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        import json

        path.write_text(json.dumps(config))
        values["model_config_name_or_path"] = str(path)
    return Trainer(build_config(values))


def evaluate(trainer, num_samples: int, sampler_steps: int) -> dict[str, float]:
    """Held-out bits/dim estimate and digits FID/KID of the EMA weights (default sampler, `sampler_steps`)."""
    from ddpm_hub.evaluation import ema_weights, held_out_bpd
    from ddpm_hub.metrics import digits_fid_kid, digits_quality
    from ddpm_hub.sampling import sample_uint8, with_sampler

    pipeline = trainer.ema_pipeline()
    with ema_weights(pipeline.unet, trainer.ema):
        bpd = held_out_bpd(pipeline, trainer.data.held_out, "estimate", 300, seed=0, num_samples=16)
        fake = sample_uint8(with_sampler(pipeline, "dpm"), num_samples, sampler_steps, seed=0, batch_size=1000)
    quality = digits_fid_kid(trainer.data.held_out, fake)  # digits_mlp, under the keys of the earlier rounds
    conv = digits_quality(trainer.data.held_out, fake, ("digits_conv",))
    return {"bpd": bpd["held_out_bits_per_dim_estimate"], **quality, "digits_conv_fid": conv["digits_conv_fid"],
            "digits_conv_class_error": conv["digits_conv_class_error"]}


def run_lever(
    name: str, lever: dict, budget: float, every: float, num_samples: int, sampler_steps: int, tmp: str
) -> list[dict]:
    """Train one configuration for `budget` seconds, evaluating every `every` seconds of training."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    trainer = make_trainer(lever, f"{tmp}/{name}", max_steps=100_000)
    batches = trainer.batches()
    points, trained, next_point = [], 0.0, every
    while trained < budget - 1e-9:
        start = time.perf_counter()
        while time.perf_counter() - start < next_point - trained:
            trainer.optimizer_step(batches)
        trained += time.perf_counter() - start
        row = {"lever": name, "seconds": round(trained), "steps": trainer.global_step, "num_samples": num_samples,
               "sampler_steps": sampler_steps,
               **evaluate(trainer, num_samples, sampler_steps)}  # fmt: skip
        print(row, flush=True)
        points.append(row)
        next_point += every
    return points


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels against training seconds: FID and bits/dim, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for lever in dict.fromkeys(r["lever"] for r in rows):
        points = [r for r in rows if r["lever"] == lever]
        style = {"linewidth": 2.5, "color": "black"} if lever == "baseline" else {"linewidth": 1}
        axes[0].plot([p["seconds"] for p in points], [p["digits_fid"] for p in points], label=lever, **style)
        axes[1].plot([p["seconds"] for p in points], [p["bpd"] for p in points], label=lever, **style)
    n, steps = rows[0].get("num_samples", 500), rows[0].get("sampler_steps", 20)
    axes[0].set_ylabel(f"digits-classifier FID ({n} samples, DPM-Solver++ {steps})")
    axes[1].set_ylabel("held-out bits/dim (estimate)")
    for ax in axes:
        ax.set_xlabel("training seconds (2-core CPU)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per configuration")
    parser.add_argument("--baseline_budget", type=float, default=300.0, help="training seconds of the baseline")
    parser.add_argument("--every", type=float, default=60.0, help="evaluate every N training seconds")
    parser.add_argument("--base", default="digits", choices=list(BASES), help="the recipe the levers change")
    parser.add_argument("--levers", nargs="*", default=["baseline", "fixed_variance", "old_recipe"],
                        choices=list(LEVERS))  # fmt: skip
    parser.add_argument("--full_budget", nargs="*", default=["baseline", "fixed_variance", "old_recipe"],
                        help="levers that get --baseline_budget instead of --budget")  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--sampler_steps", type=int, default=None, help="default: the default sampler's steps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "time_to_quality.json"))
    parser.add_argument("--figure", default=str(REPO / "docs" / "figures" / "time_to_quality.png"))
    args = parser.parse_args()
    if args.quick:
        args.budget, args.every, args.levers, args.num_samples = 4.0, 2.0, ["baseline", "old_recipe"], 50
        args.baseline_budget = 4.0
        args.figure = str(Path(tempfile.mkdtemp()) / "ttq.png")
    from ddpm_hub.choices import SAMPLERS

    steps = args.sampler_steps or SAMPLERS["dpm"].steps
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.levers:
            budget = args.baseline_budget if name in args.full_budget else args.budget
            lever = {**BASES[args.base], **LEVERS[name]}
            rows += run_lever(name, lever, budget, args.every, args.num_samples, steps, tmp)
    print_table(f"Time to quality (budget {args.budget:.0f} s, eval every {args.every:.0f} s)", rows,
                ["lever", "seconds", "steps", "bpd", "digits_fid", "digits_kid", "digits_conv_fid",
                 "digits_conv_class_error"])  # fmt: skip
    plot(rows, Path(args.figure), f"Time to quality on the embedded digits (base: {args.base}), one lever at a time")
    write_json(args.out, {"machine": machine(), "threads": torch.get_num_threads(), "budget": args.budget,
                          "baseline_budget": args.baseline_budget, "base": {args.base: BASES[args.base]},
                          "levers": {k: LEVERS[k] for k in args.levers}, "rows": rows})  # fmt: skip
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
