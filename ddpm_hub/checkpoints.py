"""Crash-safe training checkpoints: `output_dir/checkpoints/checkpoint-{step}` with a verified manifest.

A checkpoint is written into a temporary folder, then a manifest (`checkpoint.json`: step, epoch, and the
SHA-256 and size of every file) is written last, and the folder is renamed into place. A folder without a
valid manifest, or whose files do not match it, is never chosen as "latest": the previous good checkpoint is
used instead, with a warning. The step is read from the manifest, not parsed from the folder name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
PREFIX = "checkpoint-"
CLASS_LABELS_FILE = "class_labels.json"  # id2label and cond_drop_prob of a class-conditional run


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder or file."""


@dataclass
class CheckpointInfo:
    """A checkpoint folder and what its manifest says."""

    path: Path
    step: int
    epoch: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int, epoch: int) -> None:
    """Record the step and a checksum of every file, fsynced, as the last thing written into `folder`."""
    files = {}
    for path in _files(folder):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(path.relative_to(folder))] = {"sha256": _sha256(path), "size": path.stat().st_size}
    manifest = {"step": step, "epoch": epoch, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)


def verify(folder: Path) -> CheckpointInfo:
    """Check a checkpoint against its manifest; CheckpointError naming the bad file otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, epoch, files = int(manifest["step"]), int(manifest["epoch"]), dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from checkpoint {folder}")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"{path}: truncated or changed ({path.stat().st_size} bytes, expected {meta['size']})"
            )
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupted (checksum does not match the manifest)")
    return CheckpointInfo(path=folder, step=step, epoch=epoch)


def _manifest_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / MANIFEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under `root` (staging and deleting folders excluded), oldest first by manifest step;
    folders without a readable manifest (incomplete) sort first, so that they are pruned first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and not path.name.endswith(".tmp"):
            step = _manifest_step(path)
            found.append((-1 if step is None else step, path.name, path))
    return [p for _, _, p in sorted(found)]


def latest_valid(root: Path) -> CheckpointInfo | None:
    """The newest checkpoint that passes `verify`; older ones are tried, with a warning, when newer ones fail."""
    candidates = list_checkpoints(root)
    for path in candidates:
        if _manifest_step(path) is None:
            logger.warning("skipping bad checkpoint: %s has no readable %s (incompletely written)", path, MANIFEST)
    for path in reversed(candidates):
        if _manifest_step(path) is None:
            continue
        try:
            return verify(path)
        except CheckpointError as exc:
            logger.warning("skipping bad checkpoint: %s; falling back to the previous one", exc)
    return None


def staging_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return Path(root) / f"{PREFIX}{step}.tmp"


def finalize(root: Path, step: int, epoch: int) -> Path:
    """Write the manifest into the staging folder and rename it to `checkpoint-{step}` (atomic on one filesystem)."""
    staging = staging_dir(root, step)
    write_manifest(staging, step, epoch)
    final = Path(root) / f"{PREFIX}{step}"
    if final.exists():
        _remove(final)
    os.replace(staging, final)
    _fsync_dir(Path(root))
    return final


def _remove(path: Path) -> None:
    """Rename first (atomic), then delete: a crash mid-delete leaves a `.tmp` folder, never a half checkpoint."""
    trash = path.with_name(path.name + ".deleting.tmp")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `total_limit` remain; leftover staging folders go too."""
    removed = []
    for stale in Path(root).glob(f"{PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    if total_limit is None:
        return removed
    checkpoints = list_checkpoints(root)
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        _remove(path)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints are models: sample, evaluate and push them like pipeline folders
# ------------------------------------------------------------------------------------------------------------------

CHECKPOINT_WEIGHTS = {"ema": "unet_ema", "raw": "unet"}


def is_checkpoint(path: str | Path) -> bool:
    """True for a local training checkpoint folder (a manifest and a `unet/` folder)."""
    folder = Path(path)
    return folder.is_dir() and (folder / MANIFEST).is_file() and (folder / "unet").is_dir()


def checkpoint_scheduler_dir(folder: Path) -> Path:
    """The scheduler config of a checkpoint: its own `scheduler/`, or (older checkpoints) the run's final one."""
    for candidate in (folder / "scheduler", folder.parent.parent / "scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{folder}: no scheduler/scheduler_config.json in the checkpoint or in its run folder; it was written by an "
        "older version: copy the run's scheduler/ folder into it"
    )


def load_checkpoint_pipeline(pipeline_cls, folder: Path, weights: str = "ema"):
    """A pipeline from a verified `checkpoint-N` (EMA weights by default, `weights="raw"` for the raw ones)."""
    from diffusers import UNet2DModel

    from .scheduling_ddpm import DDPMScheduler
    from .weights import diagnose_weights

    if weights not in CHECKPOINT_WEIGHTS:
        raise ValueError(f"weights must be one of {sorted(CHECKPOINT_WEIGHTS)}, got {weights!r}")
    verify(folder)
    subfolder = CHECKPOINT_WEIGHTS[weights]
    if not (folder / subfolder).is_dir():
        if weights == "ema":
            raise CheckpointError(f"{folder} has no EMA weights (trained with --use_ema false): use weights='raw'")
        raise CheckpointError(f"{folder}/{subfolder} is missing")
    diagnose_weights(folder / subfolder)
    unet = UNet2DModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(checkpoint_scheduler_dir(folder))
    labels_file = folder / CLASS_LABELS_FILE  # a class-conditional run's class names and label dropout
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
    return pipeline_cls(unet=unet, scheduler=scheduler, **labels)
