"""One writer per output folder: an OS lock (`fcntl.flock`) on the folder itself, plus `FOLDER/.ddpm_hub.lock`
naming the writer's PID for the messages of those it turns away.

Locking the folder (not a file in it) means that deleting or replacing the lock file by hand never lets a second
writer in, and that a folder renamed or deleted mid-run is noticed (`check_held`) instead of being recreated. The
kernel drops the lock when its process ends, however it ends (`kill -9` included), so a lock is never stale. The
PID file is created afresh (`O_EXCL | O_NOFOLLOW`), so a link planted at its path is replaced, never written
through. Readers (a push) take a shared lock and write nothing. Within one process the lock is re-entrant: the
trainer holds it and its own export and push pass through.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .faults import fault_point

LOCK_NAME = ".ddpm_hub.lock"


@dataclass
class _Hold:
    fd: int  # the folder, opened and flock-ed
    depth: int
    pid_fd: int | None  # the PID file this process wrote, kept open (its inode cannot be reused meanwhile)
    made_folder: bool


_held: dict[Path, _Hold] = {}


class OutputLockedError(RuntimeError):
    """Another process is writing into the folder (the message names its PID), or the folder cannot be locked."""


class OutputFolderMovedError(OutputLockedError):
    """The locked folder was renamed or deleted while this process wrote into it."""


def _holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return "another process"
    try:
        text = os.read(fd, 200).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return f"PID {text}" if text else "another process"


def _disk_hint(exc: OSError) -> str:
    return " (is the disk full?)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""


def _write_pid_file(path: Path, purpose: str) -> int:
    """Create `path` afresh holding this process's PID and return its descriptor, kept open until release: whatever
    was there (a stale file, a planted link) is unlinked first, and the new file is opened with O_EXCL | O_NOFOLLOW,
    so nothing outside the folder is written."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a folder at that path (EISDIR/EPERM)
        raise OutputLockedError(f"{path}: the folder's lock file cannot be opened ({exc.strerror}): remove it if "
                                "it is not a plain file, or choose another folder") from None  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, f"{os.getpid()} ({purpose})\n".encode())
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def acquire(folder: str | Path, purpose: str, create: bool = True, shared: bool = False) -> bool:
    """Lock `folder` for this process, or raise OutputLockedError at once naming the holder. `shared=True` is a
    reader's lock (a push): it excludes writers, not other readers, and writes nothing. With `create=False` a
    missing folder is not locked (nothing can be read from it); returns whether the lock is held."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:
        check_held(folder)
        _held[folder].depth += 1
        return True
    made_folder = not folder.exists()
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, a read-only parent, a full disk: one line, never a traceback
            raise OutputLockedError(f"{folder} cannot be used as a folder ({exc.strerror}{_disk_hint(exc)}): "
                                    "choose another folder") from None  # fmt: skip
    elif not folder.is_dir():
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if not create:
            return False
        raise OutputLockedError(f"{folder} cannot be opened ({exc.strerror}): choose another folder") from None
    path = folder / LOCK_NAME
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputLockedError(
            f"{folder} is in use by {_holder(path)} (another training, export, push or sample run on the same "
            "folder): wait for it to finish or stop it, or choose another folder"
        ) from None
    pid_fd = None
    if not shared:
        try:
            pid_fd = _write_pid_file(path, purpose)
        except OSError as exc:
            os.close(fd)
            _remove_if_made(folder, made_folder and create)
            raise OutputLockedError(f"{path}: cannot be written ({exc.strerror}{_disk_hint(exc)}): free some space "
                                    "or choose another folder") from None  # fmt: skip
        except OutputLockedError:
            os.close(fd)
            raise
    _held[folder] = _Hold(fd, 1, pid_fd, made_folder and create)
    fault_point("lock.acquired")
    return True


def check_held(folder: str | Path) -> None:
    """Raise OutputFolderMovedError when the folder this process locked is no longer at its path (renamed or
    deleted mid-run): writing on would recreate the path, unlocked, beside the moved run."""
    folder = Path(folder).resolve() if Path(folder).resolve() in _held else Path(folder).absolute()
    hold = _held.get(folder)
    if hold is None:
        return
    locked = os.fstat(hold.fd)
    try:
        now = os.stat(folder)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (locked.st_dev, locked.st_ino):
        raise OutputFolderMovedError(
            f"{folder} was renamed or deleted while this process wrote into it; stopping instead of recreating it "
            "(what was written so far is wherever the folder went): move it back and resume, or start afresh"
        )


def _remove_if_made(folder: Path, made: bool) -> None:
    if made:
        try:
            folder.rmdir()  # only if empty
        except OSError:  # the run wrote something: keep it
            pass


def release(folder: str | Path) -> None:
    """Undo one `acquire` of `folder` by this process; the lock is dropped with the last one, and its PID file
    removed (if it is still the one this process wrote), so a run leaves no lock file behind. A folder that this
    process created and left empty (a run refused before it wrote anything) is removed too."""
    folder = Path(folder).resolve()
    hold = _held.get(folder)
    if hold is None:
        return
    hold.depth -= 1
    if hold.depth > 0:
        return
    del _held[folder]
    path = folder / LOCK_NAME
    if hold.pid_fd is not None:
        try:
            ours, there = os.fstat(hold.pid_fd), os.lstat(path)
            if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino):
                path.unlink()
        except OSError:  # gone, or a read-only folder: the lock dies with the descriptor anyway
            pass
        os.close(hold.pid_fd)
    os.close(hold.fd)  # closing the descriptor releases the flock
    _remove_if_made(folder, hold.made_folder)


class OutputLock:
    """`with OutputLock(folder, "export"):` holds the folder's lock for the block (`shared=True` for readers)."""

    def __init__(self, folder: str | Path, purpose: str, create: bool = True, shared: bool = False):
        self.folder, self.purpose, self.create, self.shared = folder, purpose, create, shared
        self.held = False

    def __enter__(self) -> OutputLock:
        self.held = acquire(self.folder, self.purpose, self.create, self.shared)
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            release(self.folder)
