"""Interrupted runs, on real training processes: a kill at every named fault point and SIGKILL at random moments,
clean stops on SIGTERM, SIGINT and SIGHUP (also through `accelerate launch`, and at the launcher's death); every
interrupted run resumes with `latest` to the uninterrupted run's weights, bit for bit. Also: the fault points are
declared where they are used, and every test the fault table of docs/reliability.md names exists."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST_ARGS, REPO, RESUME_ARGS, TRAIN, run_train, subprocess_env, unet_weights

from ddpm_hub import checkpoints as ckpt
from ddpm_hub import faults

# -- fault points ------------------------------------------------------------------------------------------------------


def _points_in_source() -> set[str]:
    found = set()
    for path in [*(REPO / "ddpm_hub").rglob("*.py"), *(REPO / "training").rglob("*.py")]:
        found |= set(re.findall(r'fault_point\("([^"]+)"\)', path.read_text()))
    return found


def test_every_fault_point_in_the_code_is_declared_and_every_declared_one_is_used():
    assert _points_in_source() == set(faults.POINTS)


def test_fault_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("checkpoint.manifest.after_tmp")
    monkeypatch.setenv(faults.ENV, "checkpoint.manifest.after_tmp:raise:2")
    monkeypatch.setattr(faults, "_counts", {})
    faults.fault_point("checkpoint.manifest.before_tmp")  # another point
    faults.fault_point("checkpoint.manifest.after_tmp")  # first pass: not yet
    with pytest.raises(OSError, match="injected fault at checkpoint.manifest.after_tmp"):
        faults.fault_point("checkpoint.manifest.after_tmp")
    monkeypatch.setenv(faults.ENV, "no.such.point:kill")
    with pytest.raises(ValueError, match="DDPM_HUB_FAULT"):
        faults.fault_point("checkpoint.manifest.after_tmp")


def test_every_test_the_fault_table_names_exists():
    page = (REPO / "docs" / "reliability.md").read_text()
    table = page[page.index("| fault | what happens | test |"):].split("\n\n")[0]
    named = set(re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", table))
    defined = {(path.name, name) for path in (REPO / "tests").glob("test_*.py")
               for name in re.findall(r"def (test_\w+)", path.read_text())}  # fmt: skip
    assert len(named) >= 20 and named <= defined, named - defined


# -- a kill at every fault point ---------------------------------------------------------------------------------------


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
BEST_ARGS = [*RESUME_ARGS, "--eval_fid_steps", "4", "--eval_fid_samples", "16", "--keep_best_checkpoint"]


BEST_CHAIN = ["checkpoint.best.pointer_tmp", "checkpoint.best.pointer_replaced"]


def _spec(link: str) -> str:
    """`a` -> `a:kill`; `a:sigterm,b` -> `a:sigterm,b:kill`."""
    return ",".join(item if ":" in item else f"{item}:kill" for item in link.split(","))


def _assert_same_weights(reference: Path, out: Path) -> None:
    a, b = unet_weights(reference), unet_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run_train([*RESUME_ARGS, "--output_dir", str(tmp / "run")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _run_chain(links: list[str], out: Path, tmp_path: Path, base: list[str] = RESUME_ARGS) -> None:
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
    covered.add("overwrite.marked")  # tests/test_resume.py, killed during an overwriting start
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


# -- SIGKILL at random moments -----------------------------------------------------------------------------------------


KILL_ARGS = [
    *FAST_ARGS,
    "--max_train_steps",
    "40",
    "--checkpointing_steps",
    "4",
    "--checkpoints_total_limit",
    "3",
    "--lr_warmup_steps",
    "3",
]


def _assert_checkpoints_sound(root: Path) -> None:
    """Every folder that looks like a finished checkpoint verifies; only staging folders may be partial."""
    if not root.exists():
        return
    for path in root.iterdir():
        if path.name.endswith(".tmp"):
            continue
        ckpt.verify(path)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    reference = tmp_path / "reference"
    proc = run_train([*KILL_ARGS, "--output_dir", str(reference)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(1234)
    command = [sys.executable, str(TRAIN), *KILL_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    env = subprocess_env(tmp_path)
    kills = {"random": 0, "during_save": 0, "after_save": 0}
    modes = ["during_save", "random", "after_save", "random", "during_save", "random", "after_save", "during_save"]
    completed = False
    for mode in modes + ["none"] * 3:
        before = (
            {p.name for p in (out / "checkpoints").glob("checkpoint-*")} if (out / "checkpoints").exists() else set()
        )
        child = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        killed = False
        while child.poll() is None and time.monotonic() < deadline and mode != "none":
            names = (
                {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
                if (out / "checkpoints").exists()
                else set()
            )
            staging = any(n.endswith(".tmp") for n in names)
            new_final = {n for n in names - before if not n.endswith(".tmp")}
            trigger = (
                (mode == "during_save" and staging)
                or (mode == "after_save" and new_final)
                or (mode == "random" and (names - before) and rng.random() < 0.05)
            )
            if trigger:
                child.send_signal(signal.SIGKILL)
                child.wait()
                kills[mode] += 1
                killed = True
                break
            time.sleep(0.002)
        if not killed:
            _, err = child.communicate(timeout=300)
            assert child.returncode == 0, err.decode()[-3000:]
            completed = True
        _assert_checkpoints_sound(out / "checkpoints")
        info = ckpt.latest_valid(out / "checkpoints")
        assert info is None or info.path.name == f"checkpoint-{info.step}"
        if completed:
            break
    assert completed
    assert sum(kills.values()) >= 5, kills
    assert kills["during_save"] >= 1, kills
    reference_weights, resumed_weights = unet_weights(reference), unet_weights(out)
    assert all(torch.equal(reference_weights[k], resumed_weights[k]) for k in reference_weights)
    (tmp_path / "kills.json").write_text(json.dumps(kills))


# -- signals -----------------------------------------------------------------------------------------------------------


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
    args = [*RESUME_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
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
    args = [*RESUME_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
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
    proc = run_train([*RESUME_ARGS, "--output_dir", str(reference)], tmp_path, launcher=launcher, threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    args = [*RESUME_ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    launched = _start(args, tmp_path, launcher=launcher, threads=1)
    err = _signal_after_first_checkpoint(launched, out, signal.SIGTERM)
    assert launched.returncode == 143, err[-3000:]
    info = ckpt.latest_valid(out / "checkpoints")  # every rank wrote its state into the same step's checkpoint
    assert sorted(p.name for p in info.path.glob("rng_state_*")) == [f"rng_state_{r}.safetensors"
                                                                     for r in range(processes)]  # fmt: skip
    proc = run_train(args, tmp_path, launcher=launcher, threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_weights(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [None, 2], ids=["python", "accelerate-launch-2-processes"])
def test_sigterm_during_the_final_evaluation_stops_with_143_and_a_resume_exports(tmp_path, processes):
    """The final step's checkpoint is written before the final evaluation; a signal there abandons the evaluation
    and export at once (exit 143, no pipeline, no traceback on any rank) and `latest` then evaluates and exports
    from that checkpoint. With 2 processes the signal goes to `accelerate launch`, which forwards it to both ranks
    while rank 0 evaluates and rank 1 waits for it."""
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--max_train_steps", "9", "--checkpointing_steps", "4", "--final_bpd", "full",
            "--output_dir", str(out)]  # fmt: skip
    prefix = [sys.executable]
    if processes:
        prefix += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = subprocess_env(tmp_path, 1 if processes else 2)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        child = subprocess.Popen([*prefix, str(TRAIN), *args], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                 stderr=err)  # fmt: skip
        while "final evaluation and export of step 9" not in log.read_text():  # after checkpoint-9 was saved
            assert child.poll() is None, log.read_text()[-3000:]
            time.sleep(0.01)
        time.sleep(0.2)  # inside the full bound over the held-out digits (seconds)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=300)
    text = log.read_text()
    assert child.returncode == 143, text[-3000:]
    assert f"saved checkpoint {out / 'checkpoints' / 'checkpoint-9'}" in text
    assert "Traceback" not in text and "during the final evaluation/export" in text, text[-3000:]
    assert not (out / "model_index.json").exists()
    if processes:
        info = ckpt.latest_valid(out / "checkpoints")
        assert info.path.name == "checkpoint-9"
        assert sorted(p.name for p in info.path.glob("rng_state_*")) == [f"rng_state_{r}.safetensors"
                                                                         for r in range(processes)]  # fmt: skip
    # the resumed run computes the full bound (300 digits x 1000 steps): minutes on a loaded 2-core machine
    resumed = subprocess.run([*prefix, str(TRAIN), *args, "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from ddpm_hub import DDPMPipeline

    DDPMPipeline.from_pretrained(out)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 9


def test_sighup_saves_a_checkpoint_like_sigterm_and_nohup_runs_on(tmp_path):
    """A closed terminal (SIGHUP) stops the run cleanly: a checkpoint of the finished step, exit 129. A run started
    with nohup (SIGHUP ignored) is left alone."""
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--max_train_steps", "3", "--checkpointing_steps", "100", "--output_dir", str(out)]
    proc = run_train(args, tmp_path, DDPM_HUB_FAULT="lock.acquired:sighup")
    assert proc.returncode == 128 + signal.SIGHUP, proc.stderr[-2000:]
    assert "received SIGHUP" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-1"]

    nohup = subprocess.run(
        [sys.executable, str(TRAIN), *args, "--output_dir", str(tmp_path / "nohup")], cwd=tmp_path,
        env=subprocess_env(tmp_path, DDPM_HUB_FAULT="lock.acquired:sighup"), capture_output=True, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN), timeout=300,
    )  # fmt: skip
    assert nohup.returncode == 0, nohup.stderr[-2000:]
    assert json.loads((tmp_path / "nohup" / "metrics.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_kill_9_of_accelerate_launch_stops_its_child_with_a_checkpoint(tmp_path):
    """The launcher's death (kill -9: no forwarding) reaches the training process as a SIGHUP from the kernel: it
    saves a checkpoint and exits instead of training on as an orphan."""
    import psutil

    out = tmp_path / "run"
    args = [*FAST_ARGS, "--max_train_steps", "100000", "--checkpointing_steps", "100000", "--output_dir", str(out)]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), *args],
        cwd=tmp_path, env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        child = None
        while time.monotonic() < deadline and child is None:
            time.sleep(1)
            kids = psutil.Process(launcher.pid).children()
            if kids and (out / ".ddpm_hub.lock").exists():  # set-up has started: a signal now stops after step 1
                child = kids[0]
        assert child is not None, "the trainer did not start"
        time.sleep(3)
        launcher.kill()
        launcher.wait()
        gone, alive = psutil.wait_procs([child], timeout=120)
        assert not alive, "the trainer went on as an orphan"
        saved = ckpt.list_checkpoints(out / "checkpoints")
        assert len(saved) == 1
        ckpt.verify(saved[0])
    finally:
        for proc in psutil.Process().children(recursive=True):
            proc.kill()


def test_stop_request_ignores_the_launchers_forwarded_repeat_and_exits_at_a_real_second_signal(monkeypatch):
    from ddpm_hub import stopping

    exits = []
    monkeypatch.setattr(stopping.os, "_exit", exits.append)
    stop = stopping.StopRequest()
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C: no KeyboardInterrupt, a request
        assert stop.signum == signal.SIGINT and stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGTERM)  # accelerate launch forwarding it at once: the same request
        assert exits == [] and stop.exit_code == 130
        monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request: exit at once, without a checkpoint
        assert exits == [128 + signal.SIGTERM]
    finally:
        stop.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
