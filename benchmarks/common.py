"""Shared benchmark helpers: timing medians, peak RSS sampling, the machine's matmul rate, UNet FLOPs, tables."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: torch.device | None = None) -> dict:
    """Median and spread (min, max) of `repeats` timed calls after `warmup` untimed ones, in seconds."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": repeats}


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak_mib = self.peak / 2**20
        self.gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return False


def matmul_gflops(size: int = 2048, repeats: int = 5, device: torch.device | None = None) -> float:
    """The machine's sustained fp32 matmul rate (GFLOP/s), median of `repeats`."""
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    t = median_time(lambda: a @ b, repeats, warmup=2, device=device)["median"]
    return 2 * size**3 / t / 1e9


def unet_flops(unet: torch.nn.Module, batch: int, backward: bool) -> float:
    """FLOPs of one UNet forward (and backward) at `batch`, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=unet.device)
    t = torch.randint(0, 1000, (batch,), device=unet.device)
    with FlopCounterMode(display=False) as counter:
        out = unet(x, t).sample
        if backward:
            out.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {path}")


# The stock diffusers example's objective (epsilon, fixed variance, L_simple): a speed comparison with its step
# must do the same work, whatever the `digits` preset trains (v-prediction, learned variance, hybrid loss).
STOCK_OBJECTIVE = {"prediction_type": "epsilon", "variance_type": "fixed_small", "loss_type": "simple"}


def benchmark_trainer(
    unet_preset: str, resolution: int, batch: int, out_dir: str, random_data: bool = False, **options: Any
) -> tuple[Callable[[], None], Any]:
    """Our real Trainer on a UNet preset with the stock example's objective, and a function doing one update
    (`Trainer.optimizer_step`, what the training loop runs: micro-batches, EMA, step count). Data: the embedded
    digits converted to the model's shape, or (`random_data`) random uint8 images, which need no datasets install
    (a step's cost does not depend on the pixels). `options`: more training options (mixed precision,
    channels_last, compile, ...)."""
    import torch
    from ddpm_hub.training.trainer import Trainer
    from ddpm_hub.training.training_data import Data

    from ddpm_hub.config import build_config

    channels = 1 if unet_preset in ("digits", "tiny") else 3
    cfg = build_config({
        "preset": "digits", "unet_preset": unet_preset, "resolution": resolution, "channels": channels,
        "train_batch_size": batch, "logger": "none", "output_dir": out_dir, "max_train_steps": 100_000,
        "lr_warmup_steps": 0, "learning_rate": 1e-4, "num_eval_images": 0, "final_bpd": "none",
        "num_quality_samples": 0, **STOCK_OBJECTIVE, **options,
    })  # fmt: skip
    data = None
    if random_data:
        images = torch.randint(0, 256, (max(4 * batch, 512), channels, resolution, resolution), dtype=torch.uint8)
        data = Data(torch.utils.data.TensorDataset(images), None, len(images), 0, channels, "random images", None, None)
    trainer = Trainer(cfg, data=data)
    batches = trainer.batches()

    def step() -> None:
        trainer.optimizer_step(batches)

    return step, trainer
