"""Shared test set-up: offline Hub settings, thread limits and helpers to run the trainer in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"

# Two cores: one process at a time uses both; subprocess runs get explicit thread counts.
torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FAST_ARGS = [
    "--unet_preset", "tiny", "--logger", "none", "--logging_steps", "1", "--save_images_steps", "100000",
    "--eval_steps", "100000", "--num_eval_images", "0", "--final_bpd", "none", "--train_batch_size", "32",
]  # fmt: skip


def subprocess_env(tmp_path: Path, threads: int = 2, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_train(
    args: list[str], tmp_path: Path, launcher: list[str] | None = None, threads: int = 2, timeout: int = 600, **env
) -> subprocess.CompletedProcess:
    """Run training/train.py (through `accelerate launch` when `launcher` is given) and capture its output."""
    if launcher is None:
        command = [sys.executable, str(TRAIN), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(TRAIN), *args]
    return subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(tmp_path, threads, **env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.fixture
def fast_args() -> list[str]:
    return list(FAST_ARGS)
