"""Attacks on the checkpoint folder found by a tester: each test is a defect that was fixed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_ARGS, TRAIN, subprocess_env

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
