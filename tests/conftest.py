"""Shared test set-up: offline Hub settings, thread limits and helpers to run the trainer in a subprocess."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
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


def pipeline_call_kwargs(call: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """A pipeline call described in JSON as its keyword arguments: `seed` (0 by default) becomes a CPU generator and
    a string `callback_on_step_end` the function of that name in `namespace`. The stock diffusers subprocess of
    `stock_diffusers_images` runs this very function, so both sides of a comparison make the same call."""
    import torch

    kwargs = dict(call)
    kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    if isinstance(kwargs.get("callback_on_step_end"), str):
        kwargs["callback_on_step_end"] = namespace[kwargs["callback_on_step_end"]]
    return kwargs


def stock_diffusers_images(
    cases: dict[str, tuple[str, dict[str, Any]]],
    tmp_path: Path,
    load: dict[str, Any] | None = None,
    setup: str = "",
    **env: str,
) -> dict[str, Any]:
    """Sample each case `key: (source, call)` with stock diffusers, in one subprocess where `import ddpm_hub` fails:
    `DiffusionPipeline.from_pretrained(source, **load)` (a folder or a Hub id), then
    `pipeline(**pipeline_call_kwargs(call))`. `setup` is Python source run first (the callbacks that calls name);
    what it puts in the `RECORD` dict during a case is kept under `key_<name>`. Returns per key the images, the
    pipeline's class under `key_pipeline` ("module.Class") and the scheduler's under `key_scheduler`. The
    subprocess uses this process's torch thread count: CPU float results depend on it, and compare bit for bit."""
    lines = [
        "from __future__ import annotations",
        "import json, sys",
        'sys.modules["ddpm_hub"] = None  # stock diffusers: ddpm_hub cannot be imported',
        "import numpy as np, torch, diffusers",
        "from typing import Any",
        inspect.getsource(pipeline_call_kwargs),
        "RECORD = {}",
        setup,
        f"cases = json.loads({json.dumps(json.dumps(cases))})",
        f"load = json.loads({json.dumps(json.dumps(load or {}))})",
        "out = {}",
        "for key, (source, call) in cases.items():",
        "    p = diffusers.DiffusionPipeline.from_pretrained(source, **load)",
        "    p.set_progress_bar_config(disable=True)",
        "    out[key] = p(**pipeline_call_kwargs(call, globals())).images",
        '    out[key + "_pipeline"] = np.array(f"{type(p).__module__}.{type(p).__name__}")',
        '    out[key + "_scheduler"] = np.array(type(p.scheduler).__name__)',
        '    out.update({f"{key}_{name}": np.array(value) for name, value in RECORD.items()})',
        "    RECORD.clear()",
        f"np.savez({str(tmp_path / 'stock.npz')!r}, **out)",
    ]
    env = subprocess_env(tmp_path, threads=torch.get_num_threads(), **env)
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(tmp_path / "stock.npz"))


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
