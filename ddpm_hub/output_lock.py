"""One writer per output folder: an OS lock (`fcntl.flock`) on `FOLDER/.ddpm_hub.lock`, which holds the owner's PID.

The kernel drops the lock when its process ends, however it ends (`kill -9` included), so a lock is never stale.
Within one process the lock is re-entrant: the trainer holds it and its own export and push pass through.
"""

from __future__ import annotations

import os
from pathlib import Path

from .faults import fault_point

LOCK_NAME = ".ddpm_hub.lock"
_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth) held by this process
_created: dict[Path, bool] = {}  # folder -> this process made the folder


class OutputLockedError(RuntimeError):
    """Another process is writing into the folder; the message names its PID."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    return f"PID {text}" if text else "another process"


def acquire(folder: str | Path, purpose: str, create: bool = True) -> bool:
    """Lock `folder` for this process, or raise OutputLockedError at once naming the holder. With `create=False`
    (readers such as a push) a missing or read-only folder is not locked (nothing can write into it); returns
    whether the lock is held."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:
        fd, depth = _held[folder]
        _held[folder] = (fd, depth + 1)
        return True
    made_folder = not folder.exists()
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, a read-only parent: a one-line error, never a traceback
            raise OutputLockedError(f"{folder} cannot be used as a folder ({exc.strerror}): choose another "
                                    "folder") from None  # fmt: skip
    elif not folder.is_dir():
        return False
    path = folder / LOCK_NAME
    for _ in range(100):  # a holder that releases unlinks the file: lock the file that the path names now
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if isinstance(exc, PermissionError) and not create:
                return False
            raise OutputLockedError(f"{path}: the folder's lock file cannot be opened ({exc.strerror}): remove it "
                                    "if it is not a plain file, or choose another folder") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by {_holder(path)} (another training, export or push into the same folder): "
                "wait for it to finish or stop it, or choose another folder"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # unlinked by its last holder between our open and our lock: open the path again
    else:
        raise OutputLockedError(f"{path}: the lock file keeps changing: choose another folder")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} ({purpose})\n".encode())
    _held[folder] = (fd, 1)
    _created[folder] = made_folder and create
    fault_point("lock.acquired")
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor `fd` is the file that `path` names now."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def release(folder: str | Path) -> None:
    """Undo one `acquire` of `folder` by this process; the lock is dropped with the last one, and its file removed
    (while still held: every `acquire` checks that the file it locked is still the one at the path), so a run
    leaves no lock file behind. A folder that this process created and left empty (a run refused before it wrote
    anything) is removed too, so that a failed start leaves no trace."""
    folder = Path(folder).resolve()
    if folder not in _held:
        return
    fd, depth = _held.pop(folder)
    if depth > 1:
        _held[folder] = (fd, depth - 1)
        return
    made_folder = _created.pop(folder, False)
    if _same_file(fd, folder / LOCK_NAME):
        try:
            (folder / LOCK_NAME).unlink()
        except OSError:  # a read-only folder: the file stays, harmlessly (the lock dies with the descriptor)
            pass
    os.close(fd)  # closing the descriptor releases the flock
    if made_folder:
        try:
            folder.rmdir()  # only if empty
        except OSError:  # the run wrote something: keep it
            pass


class OutputLock:
    """`with OutputLock(folder, "push"):` holds the folder's lock for the block."""

    def __init__(self, folder: str | Path, purpose: str, create: bool = True):
        self.folder, self.purpose, self.create = folder, purpose, create
        self.held = False

    def __enter__(self) -> OutputLock:
        self.held = acquire(self.folder, self.purpose, self.create)
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            release(self.folder)
