"""Shared benchmark helpers: timing medians, peak RSS sampling, the machine's matmul rate, UNet FLOPs, tables."""

from __future__ import annotations

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


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
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
