"""One writer per folder: the OS lock on the output folder itself (training, export, push), refused at once naming
the holder's PID, gone with its process (`kill -9` included), and never fooled by a deleted, replaced, planted or
unwritable lock file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_ARGS, RESUME_ARGS, TRAIN, run_train, subprocess_env

from ddpm_hub.output_lock import OutputLockedError, acquire, release

HOLDER = """
import sys, time
from ddpm_hub.output_lock import acquire
acquire(sys.argv[1], "training")
print("locked", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_naming_the_pid_and_the_lock_dies_with_kill_9(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"in use by PID {holder.pid} \(training\)"):
            acquire(tmp_path, "export")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert acquire(tmp_path, "export")  # no stale lock after kill -9
    assert acquire(tmp_path, "push")  # re-entrant within a process
    release(tmp_path)
    release(tmp_path)


def test_a_second_trainer_on_the_same_output_dir_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_train([*RESUME_ARGS, "--output_dir", str(out)], tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2
    assert f"in use by PID {holder.pid} (training)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()


def test_push_cli_refuses_a_folder_another_process_writes(tmp_path, trained):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(trained)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "ddpm_hub", "push", "--folder", str(trained), "--repo_id",
                               "org/x"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0 and f"in use by PID {holder.pid}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


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
    assert folder.absolute() not in output_lock._held and folder.resolve() not in output_lock._held
