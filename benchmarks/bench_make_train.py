"""Time the README's main job as a user runs it.

The command is `accelerate launch --num_processes 1 training/train.py --preset digits` (what `make train` runs).

Runs the command in a fresh output folder with the user's environment (no OMP_NUM_THREADS exported, as in a plain
shell), and reports wall time, training images/s (median of the logged values), the torch threads the run chose
(from its metrics.json, where the trainer records them) and the cores it kept busy (CPU time of the process tree
/ wall time). `--max_train_steps N` shortens the run for a before/after comparison; `--script` and `--pythonpath`
point it at another checkout (e.g. an older commit installed with `pip install --target`).

    python benchmarks/bench_make_train.py                          # the full `make train` run
    python benchmarks/bench_make_train.py --max_train_steps 300    # a short segment
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import machine, matmul_gflops, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_make_train(
    script: Path, max_train_steps: int | None, pythonpath: str | None, extra: list[str], keep: str | None = None
) -> dict:
    """One run of the README command; returns wall time, images/s, threads and busy cores (`keep`: copy the
    output folder there)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddpm-digits"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(script),
                   "--preset", "digits", "--output_dir", str(out), *extra]  # fmt: skip
        if max_train_steps:
            command += ["--max_train_steps", str(max_train_steps)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        metrics = json.loads((out / "metrics.json").read_text())
        if keep:
            import shutil

            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(out, keep, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    rates = [h["images_per_s"] for h in metrics.get("history", []) if "images_per_s" in h]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "steps": metrics["steps"],
        "wall_s": round(wall, 1),
        "images_per_s": round(statistics.median(rates[1:] or rates), 1),
        "torch_threads": metrics.get("cpu_threads", "not recorded"),
        "busy_cores": round(cpu / wall, 2),
        "metrics": metrics.get("metrics", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_train_steps", type=int, default=None, help="shorten the run (default: the preset's)")
    parser.add_argument("--script", default=str(REPO / "training" / "train.py"))
    parser.add_argument("--pythonpath", default=None, help="where that checkout's ddpm_hub is installed")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--keep", default=None, help="copy the trained output folder here (without checkpoints)")
    parser.add_argument("extra", nargs="*", help="more training flags, after --")
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 steps without evaluations")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "make_train.json"))
    args = parser.parse_args()
    extra: list[str] = list(args.extra)
    steps = args.max_train_steps
    if args.quick:
        steps = 20
        extra += ["--final_bpd", "none", "--num_eval_images", "0", "--num_quality_samples", "0", "--logging_steps", "5",
                 "--eval_steps", "1000"]  # fmt: skip
    # The machine's speed right before the run: wall times of runs on different days compare through this rate.
    torch.set_num_threads(os.cpu_count() or 1)
    gflops = round(matmul_gflops(), 1)
    torch.set_num_threads(1)
    row = {"label": args.label, **run_make_train(Path(args.script), steps, args.pythonpath, extra, args.keep),
           "matmul_gflops": gflops}  # fmt: skip
    rows = [row]
    columns = ["label", "steps", "wall_s", "images_per_s", "torch_threads", "busy_cores", "matmul_gflops"]
    print_table("make train (README command)", rows, columns)
    print("metrics:", json.dumps(row["metrics"]))
    write_json(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
