"""Attacks on the checkpoint folder found by a tester: each test is a defect that was fixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_ARGS, TRAIN, run_train, subprocess_env

from ddpm_hub import checkpoints as ckpt


def _make(root: Path, step: int) -> Path:
    staging = ckpt.fresh_staging(root, step)
    (staging / "unet").mkdir()
    (staging / "unet" / "model.safetensors").write_bytes(b"weights" * 100)
    (staging / "optimizer.bin").write_bytes(b"opt" * 10)
    return ckpt.finalize(root, step, epoch=step // 10)


def _victim(tmp_path: Path) -> Path:
    """A folder outside the checkpoints (other storage, another run) with files that must survive."""
    victim = tmp_path / "elsewhere"
    (victim / "unet").mkdir(parents=True)
    for name in ("keep.txt", "optimizer.bin", "checkpoint.json", "unet/model.safetensors"):
        (victim / name).write_text("precious")
    return victim


def test_pruning_a_symlinked_checkpoint_removes_the_link_and_never_a_file_of_its_target(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    victim = _victim(tmp_path)
    (root / "checkpoint-5").symlink_to(victim, target_is_directory=True)  # checkpoints moved to other storage
    for step in (10, 20):
        _make(root, step)
    removed = ckpt.prune(root, total_limit=2)
    assert [p.name for p in removed] == ["checkpoint-5"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-10", "checkpoint-20"]  # no link, no leftover
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == [
        "checkpoint.json", "keep.txt", "optimizer.bin", "unet", "unet/model.safetensors"]
    assert ckpt.resolve_latest(root).step == 20


def test_symlinked_leftovers_are_unlinked_without_touching_their_targets(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    victim = _victim(tmp_path)
    before = sorted(p.read_text() for p in victim.rglob("*") if p.is_file())
    (root / "checkpoint-7.deleting.tmp").symlink_to(victim, target_is_directory=True)
    (root / "checkpoint-8.tmp").symlink_to(victim, target_is_directory=True)
    (root / "checkpoint-9").symlink_to(victim, target_is_directory=True)
    assert {p.name for p in ckpt.recover(root)} == {"checkpoint-7.deleting.tmp", "checkpoint-8.tmp"}
    ckpt.remove_checkpoint(root / "checkpoint-9")
    _make(root, 8)  # a staging folder that is a link is replaced by a real one
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-8"]
    assert not (root / "checkpoint-8").is_symlink()
    assert sorted(p.read_text() for p in victim.rglob("*") if p.is_file()) == before


def test_a_write_that_failed_on_a_full_disk_says_so_even_without_an_errno(tmp_path, monkeypatch):
    """torch's writer reports a full disk as `RuntimeError: [enforce fail ...] unexpected pos 64 vs 0` (no errno):
    the free space left where it wrote decides, and only where it is true."""
    import shutil
    from collections import namedtuple

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 4096))
    assert ckpt.storage_hint(torch_error, tmp_path) == " (is the disk full?)"
    assert ckpt.storage_hint(torch_error) == ""  # no folder: nothing to measure
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    assert ckpt.storage_hint(torch_error, tmp_path) == ""
    assert ckpt.storage_hint(ValueError("bad value"), tmp_path) == ""


def test_safetensors_rust_io_errors_get_the_storage_hint():
    """safetensors raises `SafetensorError` whose text carries the OS error number, not an errno attribute."""
    from safetensors import SafetensorError

    assert ckpt.storage_hint(SafetensorError("Error while serializing: I/O error: File too large (os error 27)")) == (
        " (a file size limit was reached)")
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert ckpt.storage_hint(full) == " (is the disk full?)"
    denied = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert ckpt.storage_hint(denied) == ""


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
    resumed = subprocess.run([*prefix, str(TRAIN), *args, "--resume_from_checkpoint", "latest"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from ddpm_hub import DDPMPipeline

    DDPMPipeline.from_pretrained(out)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 9


def test_a_lock_path_that_is_a_folder_or_an_output_folder_that_is_a_file_is_a_one_line_error(tmp_path):
    from ddpm_hub.output_lock import LOCK_NAME, OutputLockedError, acquire

    run = tmp_path / "run"
    (run / LOCK_NAME).mkdir(parents=True)  # tampered: the lock path is a folder
    with pytest.raises(OutputLockedError, match="lock file cannot be opened.*remove it") as caught:
        acquire(run, "training")
    assert "\n" not in str(caught.value)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputLockedError, match="cannot be used as a folder.*choose another folder"):
        acquire(tmp_path / "file", "training")
    proc = subprocess.run([sys.executable, str(TRAIN), *FAST_ARGS, "--output_dir", str(run)], capture_output=True,
                          text=True, env=subprocess_env(tmp_path), cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir: {run / LOCK_NAME}")


def _try_lock_in_another_process(folder: Path, shared: bool = False) -> str:
    code = ("import sys\nfrom ddpm_hub.output_lock import acquire, OutputLockedError\n"
            f"try:\n    acquire({str(folder)!r}, 'other', shared={shared})\n    print('held')\n"
            "except OutputLockedError as e:\n    print('locked:', e)\n")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout


def test_the_lock_survives_deletion_or_replacement_of_its_file_and_readers_share_it(tmp_path):
    """The lock is on the folder itself: deleting or replacing `.ddpm_hub.lock` by hand never lets a second writer
    in. A reader (push) takes a shared lock, writes nothing, and still keeps writers out."""
    from ddpm_hub.output_lock import LOCK_NAME, acquire, release

    folder = tmp_path / "run"
    folder.mkdir()
    assert acquire(folder, "training")
    assert (folder / LOCK_NAME).read_text().startswith(f"{os.getpid()} (training)")
    (folder / LOCK_NAME).unlink()  # deleted by hand
    assert _try_lock_in_another_process(folder).startswith("locked:")
    (folder / LOCK_NAME).write_text("forged")  # replaced by hand: ours is not the file there, so release keeps it
    assert _try_lock_in_another_process(folder).startswith("locked:")
    release(folder)
    assert (folder / LOCK_NAME).read_text() == "forged"
    assert _try_lock_in_another_process(folder) == "held\n"

    (folder / LOCK_NAME).unlink()
    assert acquire(folder, "push", create=False, shared=True)
    assert not (folder / LOCK_NAME).exists()  # a reader writes nothing
    assert _try_lock_in_another_process(folder, shared=True) == "held\n"  # readers share
    assert "in use by" in _try_lock_in_another_process(folder)  # writers wait
    release(folder)


def test_a_link_planted_at_the_lock_path_is_replaced_never_written_through(tmp_path):
    from ddpm_hub.output_lock import LOCK_NAME, acquire, release

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).symlink_to(victim)
    assert acquire(folder, "training")
    assert victim.read_text() == "precious"
    assert not (folder / LOCK_NAME).is_symlink() and str(os.getpid()) in (folder / LOCK_NAME).read_text()
    release(folder)
    assert victim.read_text() == "precious" and not (folder / LOCK_NAME).exists()


def test_a_full_disk_at_the_lock_is_one_line_naming_the_path(tmp_path, monkeypatch):
    import errno

    from ddpm_hub import output_lock

    folder = tmp_path / "run"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_lock.os, "write", full)
    with pytest.raises(output_lock.OutputLockedError) as caught:
        output_lock.acquire(folder, "training")
    message = str(caught.value)
    assert "\n" not in message and str(folder / output_lock.LOCK_NAME) in message and "is the disk full?" in message
    assert not folder.exists()  # the folder it made is removed again
    assert output_lock._held == {}


def _main(argv: list[str]) -> int:
    """The trainer's entry point in this process, with accelerate's process-wide state reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState
    from ddpm_hub.training.train import main

    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_links_planted_in_the_output_folder_are_never_written_through(tmp_path, capsys):
    """A link at a file the trainer writes (the lock, a sample grid) is replaced, never followed; a linked
    subfolder it writes into (checkpoints/, samples/, logs/) is refused before anything is written."""
    from PIL import Image

    from ddpm_hub.output_lock import LOCK_NAME

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "step-0000002.png").symlink_to(victim)
    (out / LOCK_NAME).symlink_to(victim)
    args = [*FAST_ARGS, "--max_train_steps", "2", "--num_eval_images", "1", "--save_images_steps", "2",
            "--num_inference_steps", "2"]  # fmt: skip
    assert _main([*args, "--output_dir", str(out)]) == 0
    assert victim.read_text() == "precious"
    grid = out / "samples" / "step-0000002.png"
    assert not grid.is_symlink() and Image.open(grid).size[0] > 0
    for name in ("checkpoints", "samples", "logs"):
        elsewhere, linked = tmp_path / f"elsewhere-{name}", tmp_path / f"linked-{name}"
        elsewhere.mkdir()
        linked.mkdir()
        (linked / name).symlink_to(elsewhere)
        capsys.readouterr()
        assert _main([*args, "--output_dir", str(linked)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: --output_dir: {linked / name} is a symbolic link; the trainer never writes through "
                       "links: remove it (or make it a real folder), or choose another --output_dir")  # fmt: skip
        assert list(elsewhere.iterdir()) == []


def test_an_output_folder_renamed_mid_run_stops_the_run_instead_of_being_recreated(tmp_path, monkeypatch, capsys):
    from ddpm_hub.training import trainer as train_module

    out, moved = tmp_path / "run", tmp_path / "moved"
    log_metrics = train_module.Trainer.log_metrics

    def rename_at_step_1(self):
        log_metrics(self)
        if self.global_step == 1:
            out.rename(moved)

    monkeypatch.setattr(train_module.Trainer, "log_metrics", rename_at_step_1)
    code = _main([*FAST_ARGS, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {out} was renamed or deleted while this process wrote into it"), errors
    assert not out.exists() and moved.is_dir()  # never recreated at the old path


def test_a_kill_during_an_overwriting_start_never_lets_latest_resume_the_replaced_run(tmp_path, capsys):
    """--overwrite_output_dir marks the earlier run's checkpoints before it checks anything (and deletes them once
    every check passed): killed in between, `latest` refuses them, `latest_or_new` starts afresh; a refused start
    leaves them as they were. A changed seed on resume is refused unless asked (--resume_changed_run)."""
    out = tmp_path / "run"
    base = [*FAST_ARGS, "--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", str(out)]
    assert run_train(base, tmp_path).returncode == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]

    refused = _main([*base, "--overwrite_output_dir", "--seed", "1", "--class_conditional", "--class_column", "image"])
    assert refused == 2 and not ckpt.replaced(out / "checkpoints")  # a refused start changes nothing

    new = [*base, "--overwrite_output_dir", "--seed", "1"]
    proc = run_train(new, tmp_path, DDPM_HUB_FAULT="overwrite.marked:kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt.replaced(out / "checkpoints") and (out / "checkpoints" / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert _main([*base, "--seed", "1", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "belong to an earlier run that an --overwrite_output_dir run was replacing when it was interrupted" in err

    # the earlier run's own command, seed changed: refused unless asked
    (out / "checkpoints" / ckpt.REPLACED_MARKER).unlink()
    assert _main([*base, "--max_train_steps", "3", "--seed", "1", "--resume_from_checkpoint", "latest"]) == 2
    assert "belongs to a run with --seed 0 (now 1)" in capsys.readouterr().err
    ckpt.mark_replaced(out / "checkpoints", 1)
    assert _main([*base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest_or_new"]) == 0
    assert not ckpt.replaced(out / "checkpoints")
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


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
