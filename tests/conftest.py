"""Shared test set-up: offline Hub settings, thread limits, and what more than one test file uses: the trainer run
in a subprocess or in this process, tiny models and runs, checkpoint folders, a recording tracker, one-line errors
and the Hub helpers (model-card snippets run as written)."""

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
from accelerate.tracking import GeneralTracker  # noqa: E402

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

# 16 steps with a checkpoint every 4 (only the newest kept) after 3 warm-up steps: the run that the interruption
# tests stop and resume (tests/test_faults.py) and the lock tests start on a held folder.
RESUME_ARGS = [*FAST_ARGS, "--max_train_steps", "16", "--checkpointing_steps", "4", "--checkpoints_total_limit", "1",
               "--lr_warmup_steps", "3"]  # fmt: skip

# The token the local Hub server (tests/hub_server.py) is told to accept: never a real one.
FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


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


def main_in_process(argv: list[str]) -> int:
    """The trainer's entry point in this process, with accelerate's process-wide state reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState
    from ddpm_hub.training.train import main

    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def quick_train(out: Path, *extra: str) -> dict:
    """A tiny in-process run into `out` with a checkpoint every 4 steps (`extra` sets the rest)."""
    return train_in_process([*FAST_ARGS, "--output_dir", str(out), "--checkpointing_steps", "4", *extra])


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The exported UNet weights of a run (or pipeline) folder."""
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def make_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A small finished checkpoint folder `checkpoint-{step}` under `root`, written as the trainer writes one."""
    from ddpm_hub import checkpoints as ckpt

    staging = ckpt.fresh_staging(root, step)
    (staging / "unet").mkdir()
    (staging / "unet" / "model.safetensors").write_bytes(payload * 100)
    (staging / "optimizer.bin").write_bytes(b"opt" * 10)
    return ckpt.finalize(root, step, epoch=step // 10)


def copy_checkpoint(run: Path, step: int, out: Path) -> Path:
    """Checkpoint `step` of the run folder `run`, copied into the run folder `out`."""
    import shutil

    target = out / "checkpoints" / f"checkpoint-{step}"
    shutil.copytree(run / "checkpoints" / f"checkpoint-{step}", target)
    return target


def random_unet(learned: bool = False, seed: int = 0, num_class_embeds: int | None = None):
    """A random tiny UNet with non-trivial outputs (its output layers are zero-initialised otherwise), in eval mode."""
    from ddpm_hub import create_unet

    torch.manual_seed(seed)
    unet = create_unet("tiny", learned_variance=learned, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def tiny_pipeline(T: int = 10):
    """A freshly initialised tiny `DDPMPipeline` (seed 0) with `T` training timesteps, progress bars off."""
    from ddpm_hub import DDPMPipeline, DDPMScheduler, create_unet

    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=create_unet("tiny").eval(), scheduler=DDPMScheduler(num_train_timesteps=T))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def export_pipeline_to(folder: Path, pipeline) -> Path:
    """`pipeline` exported to `folder` as the trainer exports its result: staged, with a card and metrics."""
    from ddpm_hub.export import ModelDescription, export_pipeline

    description = ModelDescription(hparams={}, num_parameters=1, channels=1, dataset_description="test data")
    return export_pipeline(folder, pipeline.unet, pipeline.scheduler, description, {"m": 1.0})


def sample_images(pipeline, seed: int = 0, steps: int = 20) -> np.ndarray:
    """Two images from a seeded CPU generator, as a float array."""
    return pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="np"
    ).images


def one_line_error(argv: list[str], capsys) -> str:
    """Run `python -m ddpm_hub ARGV` in this process; it must fail with exit status 2 and one line (diffusers'
    loading bar aside), which is returned."""
    from ddpm_hub.cli import main as cli

    try:
        code = cli(argv)
    except SystemExit as exc:
        code = exc.code
    raw = capsys.readouterr().err
    lines = [line for line in raw.replace("\r", "\n").splitlines()
             if line.strip() and "Loading pipeline components" not in line]  # fmt: skip
    assert code == 2 and len(lines) == 1 and "Traceback" not in raw, (argv, raw)
    return lines[0]


def card_snippet(card: str) -> str:
    """The usage snippet of a model card (its first Python block)."""
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def run_snippets(snippets: dict[str, str], tmp_path, token: str = FAKE_TOKEN) -> None:
    """Run each card's usage snippet verbatim, against the local Hub, in a fresh process with an empty cache."""
    import textwrap

    script = textwrap.dedent(f"""
        import json
        for repo, snippet in json.loads({json.dumps(json.dumps(snippets))}).items():
            scope = {{}}
            exec(snippet, scope)
            images = scope["images"]
            assert len(images) == 16 and images[0].size == (8, 8), (repo, images)
            print("ran", repo)
    """)
    env = subprocess_env(tmp_path, HF_HUB_OFFLINE="0", HF_TOKEN=token, HF_HOME=str(tmp_path / "fresh_home"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ran ") == len(snippets), proc.stdout


class RecordingTracker(GeneralTracker):
    """A custom accelerate tracker (what wandb, mlflow, ... plug into) that records what it is given."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.config: dict = {}
        self.logs: list[tuple[int | None, dict]] = []
        self.images: list[int | None] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logs.append((step, dict(values)))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        assert all(isinstance(v[0], np.ndarray) for v in values.values())
        self.images.append(step)

    def logged(self, key: str) -> dict[int, float]:
        return {step: values[key] for step, values in self.logs if key in values}


@pytest.fixture(autouse=True)
def _no_lock_outlives_its_test():
    """A test that leaves an output folder locked fails here, by name, instead of a later test that checks the
    locks (a leaked lock also keeps a descriptor open for the rest of the session)."""
    from ddpm_hub import output_lock

    before = set(output_lock._held)
    yield
    leaked = [folder for folder in output_lock._held if folder not in before]
    for folder in leaked:
        for _ in range(output_lock._held[folder].depth):
            output_lock.release(folder)
        hold = output_lock._held.pop(folder, None)  # a folder moved since: its key no longer resolves to itself
        for fd in (hold.fd, hold.pid_fd) if hold else ():
            if fd is not None:
                os.close(fd)
    assert not leaked, f"the test left these output folders locked: {leaked}"


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


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Path:
    """8 steps with checkpoints at 4 and 8, the base of the checkpoint-loading and resume tests."""
    out = tmp_path_factory.mktemp("short") / "run"
    quick_train(out, "--max_train_steps", "8", "--checkpoints_total_limit", "5")
    return out


@pytest.fixture(scope="session")
def trained_conditional(tmp_path_factory):
    """A tiny class-conditional digits model (learned variance, hybrid loss) trained by the real trainer."""
    out = tmp_path_factory.mktemp("conditional") / "run"
    args = [*FAST_ARGS, "--output_dir", str(out), "--max_train_steps", "3", "--class_conditional",
            "--variance_type", "learned_range", "--num_eval_images", "20", "--num_inference_steps", "4",
            "--final_bpd", "estimate", "--eval_bpd_samples", "4", "--num_quality_samples", "40",
            "--checkpointing_steps", "3"]  # fmt: skip
    train_in_process(args)
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Running the UNet (sampling, bits/dim) fails the test: checks must come first."""
    import diffusers

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(diffusers.UNet2DModel, "forward", forbidden)


@pytest.fixture
def model_1000(tmp_path) -> str:
    """A saved tiny pipeline with 1000 training timesteps (untrained)."""
    folder = tmp_path / "model"
    tiny_pipeline(T=1000).save_pretrained(folder)
    return str(folder)
