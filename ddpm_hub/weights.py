"""Naming what is wrong with a weights folder before a loader guesses: a damaged safetensors file (truncated,
bad header) is reported as damaged, not as missing, and pickled-only weights as refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path


class WeightsError(OSError):
    """A weights file that cannot be used; the message names the file and what is wrong with it."""


def check_safetensors_file(path: Path) -> None:
    """Read the header and sizes of one .safetensors file (no tensors): WeightsError if it is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path}: damaged safetensors file (truncated: {size} bytes, shorter than its header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise WeightsError(
                f"{path}: damaged safetensors file (truncated or bad header: the header claims {header_len} bytes, "
                f"the file has {size})"
            )
        try:
            header = json.loads(fh.read(header_len))
            ends = [int(meta["data_offsets"][1]) for key, meta in header.items() if key != "__metadata__"]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise WeightsError(f"{path}: damaged safetensors file (bad header: {type(exc).__name__}: {exc})") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise WeightsError(f"{path}: damaged safetensors file (truncated: {size} bytes of {expected})")
    _check_with_safetensors(path)


def _check_with_safetensors(path: Path) -> None:
    """safetensors' own header validation (dtypes, shapes, contiguous offsets), without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise WeightsError(f"{path}: damaged safetensors file (bad header: {detail})") from None


def diagnose_weights(folder: Path) -> None:
    """Check every safetensors file in a model folder (e.g. `unet/`); missing folders are left to the loader."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(path)
