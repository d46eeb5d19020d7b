"""One-GPU check, ready to run: the CIFAR-10 UNet training step (stock diffusers example-style step vs our trainer's
step) in fp32, bf16 autocast, bf16 + channels_last and bf16 + channels_last + torch.compile; sampling seconds per
step at batch 1 and 256; peak memory. Prints a table and writes JSON. Sized to finish in under 8 minutes on one
H100-class GPU; `--dry-run` runs the same code on tiny sizes on a CPU in seconds (part of the test suite).

    python benchmarks/gpu_check.py [--dry-run] [--skip_compile] [--out benchmarks/results/gpu_check.json]

Targets: ours >= 1.3x the stock step at batch 128 and >= 21 training steps/s at batch 128 (the paper's
TPU v3-8 rate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import stock_step_fn  # noqa: E402
from common import benchmark_trainer, machine, median_time, print_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

MODES = {  # name: (mixed precision, channels_last, compile mode or False)
    "fp32": ("no", False, False),
    "bf16": ("bf16", False, False),
    "bf16+channels_last": ("bf16", True, False),
    "bf16+channels_last+compile": ("bf16", True, "default"),
    "bf16+channels_last+compile(reduce-overhead)": ("bf16", True, "reduce-overhead"),
}


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; each mode needs its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()


def our_trainer(preset: str, resolution: int, batch: int, mode: tuple[str, bool, bool], out_dir: str):
    """Our real Trainer (the stock example's objective, random images of the model's shape) in `mode`, and a
    function doing one update."""
    precision, channels_last, compiled = mode
    return benchmark_trainer(preset, resolution, batch, out_dir, random_data=True, mixed_precision=precision,
                             channels_last=channels_last, compile=bool(compiled),
                             compile_mode=compiled or "default")  # fmt: skip


def stock_in_mode(trainer, batch: int, mode: tuple[str, bool, bool]):
    """The stock example-style step on the same UNet, under the same accelerator (precision, compile)."""
    _, channels_last, compiled = mode
    unet = trainer.accelerator.unwrap_model(trainer.unet, keep_torch_compile=False)
    step = stock_step_fn(unet, trainer.accelerator, batch, channels_last=channels_last, compiled=compiled)
    return step


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(fn, repeats: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = median_time(fn, repeats, warmup=3, device=device)
    return {**t, "peak_mib": peak_mib(device)}


def sampling_rows(trainer, batches: list[int], steps: int, device: torch.device, dry: bool) -> list[dict]:
    """Seconds per denoising step of our pipeline (DDPM scheduler), fp32 and bf16 weights."""
    from ddpm_hub.pipelines import DDPMPipeline

    from ddpm_hub.scheduling_ddpm import DDPMScheduler

    unet = trainer.accelerator.unwrap_model(trainer.unet, keep_torch_compile=False).eval()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        pipeline = DDPMPipeline(unet=unet.to(dtype), scheduler=DDPMScheduler()).to(device)
        pipeline.set_progress_bar_config(disable=True)
        for batch in batches:
            def run(pipeline=pipeline, batch=batch):
                pipeline(batch_size=batch, num_inference_steps=steps, output_type="pt")

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = median_time(run, 1 if dry else 3, warmup=1, device=device)
            rows.append({"what": "sampling", "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                         "s_per_step": t["median"] / steps, "peak_mib": peak_mib(device)})  # fmt: skip
    unet.to(torch.float32)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any device (seconds on a CPU)")
    parser.add_argument("--skip_compile", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the stock example's default)
        torch.backends.cudnn.allow_tf32 = False
    dry = args.dry_run
    preset, resolution, batch = ("tiny", 8, 4) if dry else ("cifar10", 32, args.batch)
    repeats = 2 if dry else args.repeats
    modes = {k: MODES[k] for k in args.modes if not (MODES[k][2] and (args.skip_compile or dry))}
    rows: list[dict] = []
    trainer = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, mode in modes.items():
            reset_accelerate()
            ours, trainer = our_trainer(preset, resolution, batch, mode, f"{tmp}/{name}")
            stock = stock_in_mode(trainer, batch, mode)
            for path, fn in (("stock", stock), ("ours", ours)):
                t = timed(fn, repeats, device)
                rows.append({"what": "train step", "mode": name, "path": path, "batch": batch,
                             "steps_per_s": 1 / t["median"], "images_per_s": batch / t["median"],
                             "spread_steps_per_s": f"{1 / t['max']:.3g}-{1 / t['min']:.3g}",
                             "peak_mib": t["peak_mib"], "elapsed_s": time.perf_counter() - start})  # fmt: skip
                print(rows[-1], flush=True)
            rows[-1]["ours_vs_stock_same_mode"] = rows[-1]["steps_per_s"] / rows[-2]["steps_per_s"]
        stock_fp32 = next((r for r in rows if r["mode"] == "fp32" and r["path"] == "stock"), {}).get("steps_per_s")
        for r in rows:
            if r["path"] == "ours" and stock_fp32:
                r["ours_vs_stock_fp32"] = r["steps_per_s"] / stock_fp32
        reset_accelerate()
        ours, trainer = our_trainer(preset, resolution, 4 if dry else 128, MODES["fp32"], f"{tmp}/sampling")
        sample_rows = sampling_rows(trainer, [1, 4] if dry else [1, 256], 3 if dry else 20, device, dry)
    train_cols = ["mode", "path", "batch", "steps_per_s", "images_per_s", "spread_steps_per_s",
                  "ours_vs_stock_same_mode", "ours_vs_stock_fp32", "peak_mib"]  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(f"Training step, {preset} UNet, batch {batch} ({name})", rows, train_cols)
    print_table(f"Sampling, {preset} UNet ({name})", sample_rows, ["batch", "dtype", "s_per_step", "peak_mib"])
    best = max((r for r in rows if r["path"] == "ours"), key=lambda r: r["steps_per_s"])
    summary = {"device": name, "best_mode": best["mode"], "best_steps_per_s": best["steps_per_s"],
               "best_vs_stock_fp32": best.get("ours_vs_stock_fp32"), "target_steps_per_s": 21.0,
               "target_vs_stock": 1.3, "elapsed_s": time.perf_counter() - start}  # fmt: skip
    print("summary:", summary)
    write_json(args.out, {"machine": machine(), "device": name, "dry_run": dry, "rows": rows + sample_rows,
                          "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
