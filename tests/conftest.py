"""Shared test set-up: offline Hub settings, thread limits and helpers to run the trainer in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The Hub endpoint must be set before huggingface_hub is first imported: point every Hub call of the test
# process at a local server (tests/hub_server.py) on a port reserved now, never at the internet.
with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    HUB_PORT = _sock.getsockname()[1]
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("HF_TOKEN", None)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"

# Two cores: one process at a time uses both; subprocess runs get explicit thread counts.
torch.set_num_threads(2)

FAST_ARGS = [
    "--unet_preset",
    "tiny",
    "--logger",
    "none",
    "--logging_steps",
    "1",
    "--save_images_steps",
    "100000",
    "--eval_steps",
    "100000",
    "--num_eval_images",
    "0",
    "--final_bpd",
    "none",
    "--num_quality_samples",
    "0",
    "--train_batch_size",
    "32",
]


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
        command,
        cwd=tmp_path,
        env=subprocess_env(tmp_path, threads, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def train_in_process(args: list[str], trackers: list | None = None) -> dict:
    """Run the trainer in this process (as `accelerate launch` would run it on one process) and return its result.
    accelerate's process-wide state is reset afterwards, so tests with other settings can follow."""
    from accelerate.state import AcceleratorState, GradientState
    from ddpm_hub.training.train import train

    from ddpm_hub.config import parse_args

    cfg = parse_args(args)
    try:
        return train(cfg, trackers=trackers)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(2)


@pytest.fixture
def fast_args() -> list[str]:
    return list(FAST_ARGS)


@pytest.fixture(scope="session")
def _hub_server():
    from hub_server import HubServer

    server = HubServer(port=HUB_PORT).start()
    yield server
    server.stop()


@pytest.fixture
def hub(_hub_server):
    """The local Hub server with fresh state for this test."""
    _hub_server.reset()
    yield _hub_server
    _hub_server.reset()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps by the real trainer (shared by the tests that need a pipeline)."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    args = [
        *FAST_ARGS,
        "--output_dir",
        str(out),
        "--max_train_steps",
        "3",
        "--num_eval_images",
        "4",
        "--num_inference_steps",
        "10",
        "--checkpointing_steps",
        "2",
    ]
    proc = run_train(args, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
