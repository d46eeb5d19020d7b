"""Crashes at every named write boundary, clean stops on SIGTERM/SIGINT, and one writer per folder, on real
training processes: every interrupted run resumes with `latest` to the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_ARGS, TRAIN, run_train, subprocess_env
from safetensors.torch import load_file

from ddpm_hub import checkpoints as ckpt
from ddpm_hub import faults

ARGS = [*FAST_ARGS, "--max_train_steps", "16", "--checkpointing_steps", "4", "--checkpoints_total_limit", "1",
        "--lr_warmup_steps", "3"]  # fmt: skip

# The order in which one run passes the points (prune first runs at step 8, when a second checkpoint is written),
# so that a chain of runs, each killed at the next point and resumed with `latest`, reaches every one of them.
CHAIN = [
    "lock.acquired",
    "lock.acquired:sigterm,signal.checkpoint_saved",  # a signal during set-up: stop after step 1, killed after
    "checkpoint.staging.created",
    "checkpoint.state.saved",
    "checkpoint.rng.saved",
    "checkpoint.trainer_state.saved",
    "checkpoint.manifest.before_tmp",
    "checkpoint.manifest.after_tmp",
    "checkpoint.manifest.after_replace",
    "checkpoint.finalize.before_rename",
    "checkpoint.finalize.after_rename",
    "checkpoint.prune.before_rename",
    "checkpoint.prune.mid_delete",
    "checkpoint.prune.after_delete",
    "export.staging.pipeline_saved",
    "export.staging.card_saved",
    "export.commit.index_removed",
    "export.commit.before_index",
    "export.commit.done",
]
# With --keep_best_checkpoint (evaluations leave the training itself unchanged: the same reference weights): the
# pointer to the best checkpoint, written after each checkpoint and rewritten from the trainer state at a resume.
BEST_ARGS = [*ARGS, "--eval_fid_steps", "4", "--eval_fid_samples", "16", "--keep_best_checkpoint"]
BEST_CHAIN = ["checkpoint.best.pointer_tmp", "checkpoint.best.pointer_replaced"]


def _spec(link: str) -> str:
    """`a` -> `a:kill`; `a:sigterm,b` -> `a:sigterm,b:kill`."""
    return ",".join(item if ":" in item else f"{item}:kill" for item in link.split(","))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(reference: Path, out: Path) -> None:
    a, b = _weights(reference), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_train([*ARGS, "--output_dir", str(tmp / "run")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _run_chain(links: list[str], out: Path, tmp_path: Path, base: list[str] = ARGS) -> None:
    """Kill a run at each link's point in turn (each run resumes with `latest`), then finish without faults."""
    args = [*base, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    for link in links:
        proc = run_train(args, tmp_path, DDPM_HUB_FAULT=_spec(link))
        assert proc.returncode == -signal.SIGKILL, f"{link} not reached: rc {proc.returncode}\n{proc.stderr[-2000:]}"
        for path in (out / "checkpoints").glob("checkpoint-*"):  # what a crash leaves: staging, or sound checkpoints
            if not path.name.endswith(".tmp"):
                ckpt.verify(path)
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p for p in out.rglob("*.tmp")], "a crash's leftovers were not cleaned up"


def test_chain_covers_every_fault_point():
    covered = {item.split(":")[0] for link in CHAIN + BEST_CHAIN for item in link.split(",")}
    covered.add("overwrite.marked")  # tests/test_reliability_attacks.py, killed during an overwriting start
    assert covered == set(faults.POINTS)


@pytest.mark.slow
def test_kill_at_every_fault_point_then_resume_gives_identical_weights(tmp_path, reference):
    _run_chain(CHAIN, tmp_path / "run", tmp_path)
    _assert_same_weights(reference, tmp_path / "run")  # BEST_CHAIN: the test below


@pytest.mark.slow
def test_kill_while_naming_the_best_checkpoint_then_resume_keeps_it_and_gives_identical_weights(tmp_path, reference):
    out = tmp_path / "run"
    _run_chain(BEST_CHAIN, out, tmp_path, BEST_ARGS)
    _assert_same_weights(reference, out)
    latest = ckpt.latest_valid(out / "checkpoints")
    best = ckpt.read_trainer_state(latest)["best_quality"]
    pointer = ckpt.read_best_pointer(out / "checkpoints")
    assert pointer == {**best, "checkpoint": f"checkpoint-{best['step']}"}
    ckpt.verify(out / "checkpoints" / pointer["checkpoint"])


def test_kill_while_writing_the_manifest_and_while_pruning_then_resume_gives_identical_weights(tmp_path, reference):
    """The fast subset of the sweep above: the two boundaries whose leftovers used to block every later resume."""
    _run_chain(["checkpoint.manifest.after_tmp", "checkpoint.prune.mid_delete"], tmp_path / "run", tmp_path)
    _assert_same_weights(reference, tmp_path / "run")


def _start(args: list[str], tmp_path: Path, launcher: list[str] | None = None, threads: int = 2) -> subprocess.Popen:
    """The trainer as a child process (through `accelerate launch` when `launcher` is given); the thread count
    must equal the reference run's, or the weights differ in the last bits."""
    prefix = [sys.executable, "-m", "accelerate.commands.launch", *(launcher or [])] if launcher is not None else [
        sys.executable]
    return subprocess.Popen([*prefix, str(TRAIN), *args], cwd=tmp_path, env=subprocess_env(tmp_path, threads),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _signal_after_first_checkpoint(child: subprocess.Popen, out: Path, sig: int, times: int = 1) -> str:
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(out / "checkpoints"):
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-3000:]
        time.sleep(0.01)
    for _ in range(times):
        child.send_signal(sig)
    _, err = child.communicate(timeout=300)
    return err


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    args = [*ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    err = _signal_after_first_checkpoint(_start(args, tmp_path), out, signal.SIGTERM)
    assert "received SIGTERM" in err and "Traceback" not in err, err[-3000:]
    info = ckpt.latest_valid(out / "checkpoints")
    assert f"stopped at step {info.step} by a signal; checkpoint {info.path}" in err
    assert "--resume_from_checkpoint latest" in err
    assert not (out / "model_index.json").exists()
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(reference, out)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_exits_130_and_resumes_exactly(tmp_path, reference):
    out = tmp_path / "run"
    args = [*ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    child = _start(args, tmp_path)
    err = _signal_after_first_checkpoint(child, out, signal.SIGINT)
    assert child.returncode == 130 and "KeyboardInterrupt" not in err, err[-3000:]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_accelerate_launch_stops_all_ranks_at_one_step_and_resumes_exactly(tmp_path, processes):
    launcher = ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", *(["--multi_gpu"] if processes > 1 else [])]  # fmt: skip
    reference = tmp_path / "reference"
    proc = run_train([*ARGS, "--output_dir", str(reference)], tmp_path, launcher=launcher, threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    args = [*ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    launched = _start(args, tmp_path, launcher=launcher, threads=1)
    err = _signal_after_first_checkpoint(launched, out, signal.SIGTERM)
    assert launched.returncode == 143, err[-3000:]
    info = ckpt.latest_valid(out / "checkpoints")  # every rank wrote its state into the same step's checkpoint
    assert sorted(p.name for p in info.path.glob("rng_state_*")) == [f"rng_state_{r}.safetensors"
                                                                     for r in range(processes)]  # fmt: skip
    proc = run_train(args, tmp_path, launcher=launcher, threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(reference, out)


HOLDER = """
import sys, time
from ddpm_hub.output_lock import acquire
acquire(sys.argv[1], "training")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_trainer_on_the_same_output_dir_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_train([*ARGS, "--output_dir", str(out)], tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2
    assert f"in use by PID {holder.pid} (training)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()
