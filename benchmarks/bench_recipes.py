"""Recipe study on the embedded digits with paired seeds: which training recipe gives the best samples, and by how much.

Each recipe is the `digits` preset plus option overrides (RECIPES below), trained with the project's own Trainer
(`training/train.py`), one process per recipe, `--jobs` at once (each with `--threads` CPU threads; the device is
accelerate's: CUDA when there is one). Each trained pipeline is then sampled at every seed of `--seeds` with every
sampler of `--samplers` (DPM-Solver++ 10 and 20 steps, DDPM 1000 steps): `--num_samples` images per seed in one
batch, from a CPU generator seeded with the seed, so a seed gives every recipe the same initial noise (paired). The
samples are scored against the 300 held-out digits in both shipped classifier spaces (`digits_mlp`, `digits_conv`:
FID, KID, precision, recall, class-frequency error, classifier score; `ddpm_hub.metrics.digits_quality`).

Outputs in `--out DIR`: `recipe_NAME.json` per recipe as soon as it finishes (a time-out keeps the finished ones),
the pipelines in `models/NAME` (or `--models_dir`), worker logs in `logs/`, and `summary.json` + `summary.md`: per
recipe the mean and 95% t-interval over seeds, and per seed the difference from `--baseline` (paired) with its
t-interval.

    python benchmarks/bench_recipes.py --out outputs/recipes --jobs 6                 # default recipes, train + score
    python benchmarks/bench_recipes.py --recipes digits digits_fast eps_fixed_b64_1600 --out outputs/recipes
    python benchmarks/bench_recipes.py --models outputs/ddpm-digits outputs/old --out outputs/eval   # no training
    python benchmarks/bench_recipes.py --summarize outputs/recipes                   # tables from finished JSONs
    python benchmarks/bench_recipes.py --quick --out /tmp/recipes                     # CPU smoke test: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# Recipes are the `digits` preset (epsilon-prediction, fixed variance, L_simple, 3,000 steps of batch 128 at lr 2e-3,
# cosine decay: 384,000 images) plus overrides; `digits_fast` is that preset (v-prediction, learned-range variance
# with the hybrid loss, 1,600 steps of batch 64 at lr 2e-3: 102,400 images). The `_1600`/`_800` candidates cost
# about as much as `digits_fast`.
EPS_FIXED = {"prediction_type": "epsilon", "variance_type": "fixed_small", "loss_type": "simple"}
EPS_HYBRID = {"prediction_type": "epsilon", "variance_type": "learned_range", "loss_type": "hybrid"}
V_FIXED = {"prediction_type": "v_prediction", "variance_type": "fixed_small", "loss_type": "simple"}
B64 = {"train_batch_size": 64, "learning_rate": 2e-3, "max_train_steps": 1600}
RECIPES: dict[str, dict[str, Any]] = {
    "digits": {},
    "eps_fixed_b128_3000_lr1e-3": {"learning_rate": 1e-3},  # the baseline of the study
    "digits_fast": {"preset": "digits_fast"},
    "digits_fast_3200": {"preset": "digits_fast", "max_train_steps": 3200},
    "eps_fixed_b64_1600": {**EPS_FIXED, **B64},
    "eps_fixed_b64_1600_lr1e-3": {**EPS_FIXED, **B64, "learning_rate": 1e-3},
    "eps_fixed_b64_3200": {**EPS_FIXED, **B64, "max_train_steps": 3200},
    "eps_fixed_b128_800": {"max_train_steps": 800},
    "eps_fixed_b128_800_lr1e-3": {"max_train_steps": 800, "learning_rate": 1e-3},
    "eps_hybrid_b64_1600": {**EPS_HYBRID, **B64},
    "v_fixed_b64_1600": {**V_FIXED, **B64},
}
BASELINE = "eps_fixed_b128_3000_lr1e-3"
DEFAULT_RECIPES = list(RECIPES)
# What every run leaves out: periodic grids, estimates and checkpoints (they cost time and change nothing trained).
QUIET = {"logger": "none", "num_eval_images": 0, "num_quality_samples": 0, "save_images_steps": 10**9,
         "eval_steps": 10**9, "checkpointing_steps": 10**9, "overwrite_output_dir": True}  # fmt: skip
QUICK = {"unet_preset": "tiny", "max_train_steps": 20, "lr_warmup_steps": 5}  # the smoke test's tiny runs
SUMMARY_METRICS = ("fid", "kid", "precision", "recall", "class_error", "classifier_score")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_sampler(text: str) -> tuple[str, int]:
    """'dpm:10' -> ('dpm', 10)."""
    name, _, steps = text.partition(":")
    from ddpm_hub.choices import SAMPLERS

    if name not in SAMPLERS or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"expected SAMPLER:STEPS with a sampler of {sorted(SAMPLERS)}, got {text!r}")
    return name, int(steps)


# ------------------------------------------------------------------------------------------------------------------
# One worker process: train a recipe (or take a trained folder), then score its samples
# ------------------------------------------------------------------------------------------------------------------


def train_recipe(name: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Train recipe `name` with the project's Trainer into `models/NAME`; returns what was trained and how long."""
    from ddpm_hub.training.trainer import Trainer

    from ddpm_hub.config import build_config

    values = {"preset": "digits", **RECIPES[name], **QUIET, "output_dir": str(Path(plan["models_dir"]) / name),
              "final_bpd": plan["final_bpd"], "num_cpu_threads": plan["threads"]}  # fmt: skip
    if plan["quick"]:
        values.update(QUICK)
    if plan.get("max_train_steps"):
        values["max_train_steps"] = plan["max_train_steps"]
    cfg = build_config(values)
    start = time.perf_counter()
    result = Trainer(cfg).run()
    seconds = time.perf_counter() - start
    return {"overrides": RECIPES[name], "config": cfg.to_dict(), "train_seconds": seconds, "steps": result["steps"],
            "images_seen": result["steps"] * cfg.train_batch_size, "device": result["device"],
            "train_metrics": result.get("metrics", {}), "model": values["output_dir"]}  # fmt: skip


def score_model(folder: str, plan: dict[str, Any], name: str) -> dict[str, Any]:
    """Samples of the pipeline in `folder` at every (sampler, seed) of the plan, scored in both digits spaces."""
    import torch

    from ddpm_hub import DDPMPipeline
    from ddpm_hub.digits_features import digits_arrays
    from ddpm_hub.metrics import digits_quality
    from ddpm_hub.sampling import sample_uint8, with_sampler

    device = torch.device(plan["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = DDPMPipeline.from_pretrained(folder).to(device)
    real, _ = digits_arrays("test")
    out: dict[str, Any] = {}
    for sampler, steps in plan["samplers"]:
        rows = []
        for seed in plan["seeds"]:
            start = time.perf_counter()
            fake = sample_uint8(with_sampler(pipeline, sampler), plan["num_samples"], steps, seed, plan["num_samples"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            sample_seconds = time.perf_counter() - start
            rows.append({"seed": seed, "sample_seconds": sample_seconds, **digits_quality(real, fake)})
            log(f"{name}: {sampler}-{steps} seed {seed}: conv FID {rows[-1]['digits_conv_fid']:.3f}, "
                f"mlp FID {rows[-1]['digits_mlp_fid']:.3f} ({sample_seconds:.1f} s sampling)")  # fmt: skip
        out[f"{sampler}-{steps}"] = rows
    return {"device_eval": str(device), "num_samples": plan["num_samples"], "num_real": len(real),
            "seeds": plan["seeds"], "scores": out}  # fmt: skip


def worker(name: str, plan_path: str) -> int:
    """Train (unless the plan gives a folder) and score one recipe; write `recipe_NAME.json`."""
    import torch

    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(plan["threads"])
    record: dict[str, Any] = {"recipe": name}
    start = time.perf_counter()
    if name in plan.get("models", {}):
        record.update(model=plan["models"][name], trained_here=False)
    else:
        log(f"{name}: training {RECIPES[name] or 'the digits preset as it is'}")
        record.update(train_recipe(name, plan), trained_here=True)
        log(f"{name}: trained {record['steps']} steps in {record['train_seconds']:.1f} s on {record['device']}")
    eval_start = time.perf_counter()
    record.update(score_model(record["model"], plan, name))
    record["eval_seconds"] = time.perf_counter() - eval_start
    record["wall_seconds"] = time.perf_counter() - start
    path = Path(plan["out"]) / f"recipe_{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"{name}: done in {record['wall_seconds']:.1f} s ({path})")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# The summary: means and t-intervals over seeds, paired differences from the baseline
# ------------------------------------------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]], baseline: str | None) -> dict[str, Any]:
    """Per recipe and sampler: every metric's mean_interval over seeds, and (paired by seed) its difference from
    the baseline recipe's."""
    from ddpm_hub.metrics import mean_interval

    by_name = {r["recipe"]: r for r in records}
    base = by_name.get(baseline) if baseline else None
    out: dict[str, Any] = {"baseline": baseline if base else None, "recipes": {}}
    for record in records:
        entry: dict[str, Any] = {k: record.get(k) for k in ("train_seconds", "steps", "images_seen", "device",
                                                            "model", "overrides")}  # fmt: skip
        entry["held_out_bpd"] = (record.get("train_metrics") or {}).get("held_out_bits_per_dim_estimate")
        for sampler, rows in record["scores"].items():
            metrics = [k for k in rows[0] if k not in ("seed", "sample_seconds")]
            stats = {m: mean_interval([row[m] for row in rows]) for m in metrics}
            stats["sample_seconds"] = mean_interval([row["sample_seconds"] for row in rows])
            diffs = {}
            if base is not None and record is not base and sampler in base["scores"]:
                theirs = {row["seed"]: row for row in base["scores"][sampler]}
                paired = [row for row in rows if row["seed"] in theirs]
                if paired:
                    diffs = {m: mean_interval([row[m] - theirs[row["seed"]][m] for row in paired]) for m in metrics}
            entry[sampler] = {"stats": stats, "minus_baseline": diffs}
        out["recipes"][record["recipe"]] = entry
    return out


def _cell(stat: dict[str, float] | None, signed: bool = False) -> str:
    if not stat:
        return ""
    mean, half = stat["mean"], stat["half_width"]
    text = f"{mean:+.3g}" if signed else f"{mean:.3g}"
    if stat["n"] > 1:
        text += f" ± {half:.2g}"
        if signed and (mean - half > 0 or mean + half < 0):
            text = f"**{text}**"  # the interval excludes 0
    return text


def markdown(summary: dict[str, Any], samplers: list[str], spaces: list[str], meta: dict[str, Any]) -> str:
    """Tables: per sampler, each recipe's mean ± 95% t half-width, then its paired difference from the baseline."""
    lines = [f"# Recipe study: {meta['num_samples']} samples x seeds {meta['seeds']} per point, against the "
             f"{meta['num_real']} held-out digits; mean ± 95% t-interval half-width over seeds", ""]  # fmt: skip
    names = {"fid": "FID", "kid": "KID", "precision": "P", "recall": "R", "class_error": "class err",
             "classifier_score": "cls score"}  # fmt: skip
    columns = [(s, m) for m in SUMMARY_METRICS for s in spaces]
    header = " | ".join(f"{names[m]} {s.removeprefix('digits_')}" for s, m in columns)
    for sampler in samplers:
        lines += [f"## {sampler}", "", f"| recipe | train s | images | bits/dim | {header} |",
                  "|---|---|---|---|" + "---|" * len(columns)]  # fmt: skip
        for recipe, entry in summary["recipes"].items():
            if sampler not in entry:
                continue
            cells = [_cell(entry[sampler]["stats"].get(f"{s}_{m}")) for s, m in columns]
            train_s = f"{entry['train_seconds']:.0f}" if entry.get("train_seconds") else ""
            bpd = f"{entry['held_out_bpd']:.3f}" if entry.get("held_out_bpd") else ""
            lines.append(f"| {recipe} | {train_s} | {entry.get('images_seen') or ''} | {bpd} | " + " | ".join(cells)
                         + " |")  # fmt: skip
        if summary["baseline"]:
            lines += ["", f"{sampler}, minus `{summary['baseline']}` at the same seed (bold: the interval excludes 0)",
                      "", f"| recipe | {header} |", "|---|" + "---|" * len(columns)]  # fmt: skip
            for recipe, entry in summary["recipes"].items():
                diffs = entry.get(sampler, {}).get("minus_baseline")
                if diffs:
                    cells = [_cell(diffs.get(f"{s}_{m}"), signed=True) for s, m in columns]
                    lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_summary(out: Path, baseline: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """Read every `recipe_*.json` in `out`, write `summary.json` and `summary.md`, print the tables."""
    from ddpm_hub.digits_features import SPACES

    try:
        from common import machine  # needs psutil, which a bare GPU box may lack
    except ImportError:
        import platform

        import torch

        def machine() -> dict[str, Any]:
            gpu = {"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}
            return {"cpu": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, **gpu}

    records = [json.loads(p.read_text()) for p in sorted(out.glob("recipe_*.json"))]
    if not records:
        raise SystemExit(f"error: no recipe_*.json in {out}: nothing finished")
    plan_path = out / "plan.json"
    order = json.loads(plan_path.read_text()).get("recipes", []) if plan_path.is_file() else []
    records.sort(key=lambda r: order.index(r["recipe"]) if r["recipe"] in order else len(order))
    samplers = list(dict.fromkeys(s for r in records for s in r["scores"]))
    meta = {"num_samples": records[0]["num_samples"], "num_real": records[0]["num_real"],
            "seeds": records[0]["seeds"], **meta}  # fmt: skip
    summary = {"machine": machine(), **meta, **summarize(records, baseline)}
    text = markdown(summary, samplers, list(SPACES), meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    log(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return summary


# ------------------------------------------------------------------------------------------------------------------
# The driver: one worker process per recipe, --jobs at a time
# ------------------------------------------------------------------------------------------------------------------


def run_workers(names: list[str], plan_path: Path, out: Path, jobs: int, threads: int) -> list[str]:
    """Run a worker per name, at most `jobs` at once; returns the names that failed (their log tails printed)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the digits are embedded: never wait on a network
        env.setdefault(offline, "1")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(names), {}, []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            err = open(out / "logs" / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--plan", str(plan_path)]
            running[name] = (subprocess.Popen(cmd, env=env, stderr=err), err)
            log(f"started {name} (pid {running[name][0].pid})")
        time.sleep(0.5)
        for name, (proc, err) in list(running.items()):
            if proc.poll() is None:
                continue
            err.close()
            del running[name]
            if proc.returncode:
                failed.append(name)
                tail = (out / "logs" / f"{name}.log").read_text()[-3000:]
                log(f"{name} FAILED (exit {proc.returncode}); end of its log:\n{tail}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES), help="default: " +
                        " ".join(DEFAULT_RECIPES))  # fmt: skip
    parser.add_argument("--models", nargs="+", default=None, help="score these trained pipeline folders instead "
                        "(named by folder name; no training)")  # fmt: skip
    parser.add_argument("--summarize", default=None, metavar="DIR", help="only re-write the summary of DIR")
    parser.add_argument("--baseline", default=BASELINE, help="the recipe the differences are taken from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--num_samples", type=int, default=1000, help="samples per seed, drawn in one batch")
    parser.add_argument("--samplers", type=parse_sampler, nargs="+", default=None,
                        help="SAMPLER:STEPS (default: dpm:10 dpm:20 ddpm:1000)")  # fmt: skip
    parser.add_argument("--final_bpd", default="estimate", choices=("estimate", "full", "none"),
                        help="held-out bits/dim of each trained model (written to its recipe JSON)")  # fmt: skip
    parser.add_argument("--max_train_steps", type=int, default=None, help="override every recipe's steps (smoke runs)")
    parser.add_argument("--jobs", type=int, default=None, help="recipes at once (default: all, at most 8)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per recipe process")
    parser.add_argument("--device", default=None, help="sampling device (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 tiny recipes, 20 steps, 2 seeds, 50 "
                        "samples, DDPM 20 steps")  # fmt: skip
    parser.add_argument("--out", default=str(REPO / "outputs" / "recipes"))
    parser.add_argument("--models_dir", default=None, help="where the trained pipelines go (default: OUT/models)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.plan)
    if args.summarize:
        write_summary(Path(args.summarize), args.baseline, {})
        return 0

    samplers = args.samplers or [("dpm", 10), ("dpm", 20), ("ddpm", 1000)]
    names = args.recipes or DEFAULT_RECIPES
    models: dict[str, str] = {}
    if args.quick:
        names = args.recipes or [BASELINE, "digits_fast"]
        args.seeds, args.num_samples, args.final_bpd = args.seeds[:2], 50, "none"
        samplers = args.samplers or [("dpm", 10), ("dpm", 20), ("ddpm", 20)]
    if args.models:
        for folder in args.models:
            if not (Path(folder) / "model_index.json").is_file():
                parser.error(f"--models {folder}: not a pipeline folder (no model_index.json)")
        models = {Path(f).resolve().name: str(Path(f).resolve()) for f in args.models}
        if len(models) != len(args.models):
            parser.error("--models: give folders with distinct names (the names label the results)")
        names = list(models)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("recipe_*.json"):
        stale.unlink()  # a summary must not mix runs
    plan = {"out": str(out), "quick": args.quick, "seeds": args.seeds, "num_samples": args.num_samples,
            "samplers": samplers, "final_bpd": args.final_bpd, "threads": args.threads, "device": args.device,
            "models": models, "recipes": names, "max_train_steps": args.max_train_steps,
            "models_dir": str(Path(args.models_dir).resolve() if args.models_dir else out / "models")}  # fmt: skip
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    jobs = args.jobs or min(len(names), 8)
    log(f"{len(names)} recipe(s) {names}, {jobs} at once x {args.threads} threads; seeds {args.seeds}, "
        f"{args.num_samples} samples, samplers {samplers}; out {out}")  # fmt: skip
    start = time.perf_counter()
    failed = run_workers(names, plan_path, out, jobs, args.threads)
    log(f"all workers ended in {time.perf_counter() - start:.1f} s" + (f"; FAILED: {failed}" if failed else ""))
    baseline = args.baseline if args.baseline in names else names[0]
    write_summary(out, baseline, {"recipes_failed": failed, "wall_seconds": time.perf_counter() - start,
                                  "jobs": jobs, "threads": args.threads, "quick": args.quick})  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
