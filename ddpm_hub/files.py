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
