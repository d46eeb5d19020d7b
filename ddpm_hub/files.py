"""Writing files without ever writing through a link: what ddpm-hub writes lands inside the folder it names.

A link planted at a path we write (`samples/step-0000010.png -> ~/.bashrc`) is replaced, never followed: files are
written to a fresh temporary file (`O_EXCL | O_NOFOLLOW`) beside the target and renamed over it, which also means a
failure (a full disk) leaves the previous file or none, never a partial one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


def open_new(path: str | Path) -> BinaryIO:
    """A new file at `path` for writing: whatever is there (a stale file, a planted link) is unlinked first and the
    file is created with O_EXCL | O_NOFOLLOW, so nothing but a new file inside its folder is written."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "wb")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """Write `path` by calling `write(file)` on a new temporary file beside it, then renaming it over `path`
    (a link at `path` is replaced, not followed). On any failure the temporary file is removed and `path` is as
    it was. Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_new(tmp) as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_atomic` for a UTF-8 text file."""
    return write_atomic(path, lambda fh: fh.write(text.encode()))


def save_image_atomic(image, path: str | Path, format: str = "PNG") -> Path:
    """Save a PIL image with `write_atomic`."""
    return write_atomic(path, lambda fh: image.save(fh, format=format))


def default_dir_mode() -> int:
    """The mode a new folder gets under this process's umask (0o755 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o777 & ~umask


def make_private_dir(path: str | Path) -> Path:
    """Create a staging folder only this user can write into (mode 700), so that no other user can plant a link
    in it while it is written; `open_up` gives it the usual mode once it is checked and complete."""
    path = Path(path)
    path.mkdir(mode=0o700)
    return path


def open_up(path: str | Path) -> None:
    """Give a private staging folder the usual mode of a new folder (before it is renamed into place)."""
    os.chmod(path, default_dir_mode())


def first_link(folder: str | Path) -> Path | None:
    """The first symbolic link inside `folder` (at any depth), or None: a written folder must hold none."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            return path
    return None


class NotARegularFile(OSError):
    """A path inside a folder that is a symbolic link (or passes through one), a hard link, or not a file."""


def open_inside(folder: str | Path, relative: str | Path) -> BinaryIO:
    """Open `folder/relative` for reading, following no link on the way (each folder and the file are opened with
    O_NOFOLLOW, relative to the one before, so a link swapped in after any check is refused here too), and refuse a
    file with other hard links (its content lives elsewhere as well). NotARegularFile names the path otherwise."""
    import stat

    parts = Path(relative).parts
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | (0 if last else os.O_DIRECTORY)
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                where = Path(folder, *parts[: i + 1])
                raise NotARegularFile(exc.errno, f"{where} is a symbolic link or not a regular file") from None
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            why = f"has {info.st_nlink} hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
            raise NotARegularFile(f"{Path(folder, relative)} {why}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def linked_folders(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """The entries `folder/NAME` among `names` that are symbolic links (folders a writer would write through)."""
    return [Path(folder) / name for name in names if (Path(folder) / name).is_symlink()]


def unlink_planted_links(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove the symbolic links among `folder/NAME` for each relative `name` (files about to be rewritten), and
    any link among their parent folders inside `folder`; returns them. Only links go: their targets are kept."""
    folder = Path(folder)
    removed = []
    for name in names:
        rel = Path(name)
        for part in [*reversed(rel.parents), rel]:
            if part == Path("."):
                continue
            if (folder / part).is_symlink():
                logger.warning("replacing the symbolic link %s (its target %s is not written)", folder / part,
                               os.readlink(folder / part))  # fmt: skip
                (folder / part).unlink()
                removed.append(folder / part)
                break
    return removed
