"""Crash-safe training checkpoints: `output_dir/checkpoints/checkpoint-{step}` with a verified manifest.

A checkpoint is written into a fresh temporary folder, then a manifest (`checkpoint.json`: step, epoch, and the
SHA-256 and size of every file) is written last, and the folder is renamed into place. A folder without a
valid manifest, whose files do not match it, or whose name disagrees with its step is never chosen as "latest":
the previous good checkpoint is used instead, with a warning. Old checkpoints are renamed to `*.deleting.tmp`
before they are deleted, and `recover` removes any `*.tmp` folder a crash left behind before a run writes.
Every write boundary is a named fault point (`ddpm_hub.faults`), so tests can crash at each one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .faults import fault_point
from .files import first_link, make_private_dir, open_new, open_up
from .labels import CLASS_LABELS_FILE

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
RUN_RECORD = "training_run.json"  # what the model card of a checkpoint says (data, license, metrics so far)
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder or file."""


class CheckpointVanishedError(CheckpointError):
    """A checkpoint folder (or a file its manifest lists) that disappeared while it was being loaded: a running
    trainer pruned it, or someone deleted it; nothing is wrong with the checkpoint format."""


@dataclass
class CheckpointInfo:
    """A checkpoint folder and what its manifest says."""

    path: Path
    step: int
    epoch: int
    files: frozenset[str] = field(default_factory=frozenset)  # the files the manifest lists (relative paths)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"))


def fsync_dir(path: Path) -> None:
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
    fault_point("checkpoint.manifest.before_tmp")
    with open_new(tmp) as fh:
        fh.write(json.dumps(manifest, indent=1).encode())
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("checkpoint.manifest.after_tmp")
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    fault_point("checkpoint.manifest.after_replace")


def verify(folder: Path) -> CheckpointInfo:
    """Check a checkpoint against its manifest; CheckpointError naming the bad file otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}; the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, epoch, files = int(manifest["step"]), int(manifest["epoch"]), dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    named = _named_step(folder)
    if named is not None and named != step:
        raise CheckpointError(f"{manifest_path}: says step {step} but the folder is {folder.name}; not a checkpoint "
                              "this trainer wrote")
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
    for path in _files(folder):
        if str(path.relative_to(folder)) not in files:
            raise CheckpointError(f"{path}: not in the manifest of checkpoint {folder} (added after it was written)")
    return CheckpointInfo(path=folder, step=step, epoch=epoch, files=frozenset(files))


def _named_step(folder: Path) -> int | None:
    """N of a folder named `checkpoint-N`, else None (a checkpoint copied under another name is allowed)."""
    suffix = folder.name[len(PREFIX):] if folder.name.startswith(PREFIX) else ""
    return int(suffix) if suffix.isdigit() else None


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of `folder`, None when it is not there: a folder renamed away (pruning renames before it
    deletes) or replaced by another of the same name has another identity."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def vanished(folder: Path, what: Path | None = None) -> CheckpointVanishedError:
    """The error for checkpoint `folder` (or its file `what`) that disappeared while it was being loaded."""
    return CheckpointVanishedError(
        f"{what or folder} disappeared while loading (removed by a running trainer's pruning of old checkpoints?): "
        "load a newer checkpoint or the final pipeline"
    )


@contextmanager
def loading(folder: Path):
    """Run a load of checkpoint `folder`; it yields a set to which the load adds the files the manifest lists
    (`CheckpointInfo.files`, once verified). An error raised once the folder had gone (or been replaced by another
    of its name) since the load began, or a file-not-found of a listed file (it existed when the checkpoint was
    verified), is a CheckpointVanishedError: a checkpoint pruned by a running trainer mid-load is not a damaged,
    incomplete or older one. A load that ends after the folder went is one too, as what it read last (the card,
    the class names) may be missing. A folder not there when the load began, or a file missing from the start
    (say, an older version's checkpoint), keeps its own message."""
    folder = Path(folder)
    start = _identity(folder)
    listed: set[str] = set()
    try:
        yield listed
    except CheckpointVanishedError:
        raise
    except Exception as exc:
        if start is not None and _identity(folder) != start:
            raise vanished(folder) from exc
        missing = getattr(exc, "filename", None) if isinstance(exc, FileNotFoundError) else None
        if missing is not None and start is not None:
            try:
                name = str(Path(os.fsdecode(missing)).relative_to(folder))
            except ValueError:
                name = None
            if name in listed:
                raise vanished(folder, folder / name) from exc
        raise
    if start is not None and _identity(folder) != start:
        raise vanished(folder)


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


def resolve_latest(root: Path, allow_new: bool = False) -> CheckpointInfo | None:
    """The newest valid checkpoint; None when there are none at all (or none valid and `allow_new`), else an
    error naming the rejected ones: a resume must never silently become a fresh run."""
    info = latest_valid(root)
    rejected = list_checkpoints(root)
    if info is not None or not rejected or allow_new:
        return info
    names = ", ".join(p.name for p in rejected)
    raise CheckpointError(
        f"--resume_from_checkpoint latest: no valid checkpoint under {root} (rejected: {names}; the warnings above "
        "say why); pass --resume_from_checkpoint latest_or_new to start afresh, or a checkpoint folder"
    )


def recover(root: Path) -> list[Path]:
    """Remove the `*.tmp` folders (staging, half-deleted checkpoints) a crash left under `root`; call it while
    holding the output folder's lock, before anything is written."""
    root = Path(root)
    removed = sorted(root.glob(f"{PREFIX}*.tmp")) if root.is_dir() else []
    for path in removed:
        logger.warning("removing %s, left by an interrupted run", path)
        remove_tree(path, ignore_errors=True)
        if path.exists() or path.is_symlink():
            raise CheckpointError(f"{path}: left by an interrupted run and cannot be removed; delete it by hand")
    return removed


def staging_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place."""
    return Path(root) / f"{PREFIX}{step}.tmp"


def fresh_staging(root: Path, step: int) -> Path:
    """An empty staging folder for checkpoint `step`: anything an earlier attempt left there is removed first."""
    staging = staging_dir(root, step)
    remove_tree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    make_private_dir(staging)  # mode 700 while written: no other user can plant a link in it
    fault_point("checkpoint.staging.created")
    return staging


def finalize(root: Path, step: int, epoch: int) -> Path:
    """Write the manifest into the staging folder and rename it to `checkpoint-{step}` (atomic on one filesystem)."""
    staging = staging_dir(root, step)
    link = first_link(staging)
    if link is not None:  # planted while it was written: what was written through it is not a checkpoint
        raise CheckpointError(f"{link}: a symbolic link appeared in the checkpoint being written (another process "
                              "is planting links in the output folder); this checkpoint is not kept")  # fmt: skip
    write_manifest(staging, step, epoch)
    open_up(staging)
    final = Path(root) / f"{PREFIX}{step}"
    if final.exists():
        remove_checkpoint(final)
    fault_point("checkpoint.finalize.before_rename")
    os.replace(staging, final)
    fault_point("checkpoint.finalize.after_rename")
    fsync_dir(Path(root))
    return final


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Delete a folder we wrote; a symbolic link (say, a checkpoint moved to other storage) loses only the link,
    never a file of its target."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def remove_checkpoint(path: Path) -> None:
    """Rename first (atomic), then delete: a crash mid-delete leaves a `.tmp` folder, never a half checkpoint."""
    trash = path.with_name(path.name + ".deleting.tmp")
    remove_tree(trash)  # left by an earlier crash mid-delete: renaming onto it would fail
    if path.is_symlink():  # only the link goes: its target is not ours to delete
        logger.warning("removing the link %s (its target %s is kept)", path, os.readlink(path))
        path.unlink()
        return
    fault_point("checkpoint.prune.before_rename")
    os.replace(path, trash)
    files = sorted(p for p in trash.rglob("*") if p.is_file())
    for file in files[: len(files) // 2]:
        file.unlink()
    fault_point("checkpoint.prune.mid_delete")
    shutil.rmtree(trash, ignore_errors=True)
    fault_point("checkpoint.prune.after_delete")


def prune(root: Path, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints so that the `total_limit` newest remain, and `keep` (the best checkpoint) if it
    is older; leftover staging folders go too."""
    removed = recover(root)
    if total_limit is None:
        return removed
    checkpoints = list_checkpoints(root)
    old = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in [p for p in old if keep is None or p.name != Path(keep).name]:
        remove_checkpoint(path)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------------------------
# The best checkpoint by the during-training quality metric: a regular checkpoint named by `best.json`
# ------------------------------------------------------------------------------------------------------------------

BEST_POINTER = "best.json"


def write_best_pointer(root: Path, best: dict) -> Path:
    """Write `root/best.json` (`step`, `checkpoint`, `metric`, `value`, ...) atomically (temporary file, fsync,
    rename). It only names the checkpoint: the trainer state of every checkpoint holds the same record, and a
    resume rewrites this file from it, so a crash between the two never loses or confuses the best."""
    root = Path(root)
    payload = {**best, "checkpoint": f"{PREFIX}{best['step']}"}
    tmp = root / (BEST_POINTER + ".tmp")
    with open_new(tmp) as fh:  # a link planted at the path is replaced, never written through
        fh.write(json.dumps(payload, indent=1, sort_keys=True).encode())
        fh.flush()
        os.fsync(fh.fileno())
    fault_point("checkpoint.best.pointer_tmp")
    os.replace(tmp, root / BEST_POINTER)
    fsync_dir(root)
    fault_point("checkpoint.best.pointer_replaced")
    return root / BEST_POINTER


def read_best_pointer(root: Path) -> dict | None:
    """What `best.json` under `root` says, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / BEST_POINTER).read_text())
    except (OSError, ValueError):
        return None


def remove_best_pointer(root: Path) -> None:
    """Delete `best.json` (and its temporary file): the run it described is gone."""
    (Path(root) / BEST_POINTER).unlink(missing_ok=True)
    (Path(root) / (BEST_POINTER + ".tmp")).unlink(missing_ok=True)


REPLACED_MARKER = "REPLACED_BY_A_NEW_RUN"  # the checkpoints beside it are an earlier run's, condemned by a new one


def mark_replaced(root: Path, by_pid: int) -> Path:
    """Before an --overwrite_output_dir run checks anything: mark the earlier run's checkpoints under `root` as
    replaced, so that a kill before they are deleted never lets `latest` resume them as if nothing had happened."""
    path = Path(root) / REPLACED_MARKER
    with open_new(path) as fh:
        fh.write(f"an --overwrite_output_dir run (PID {by_pid}) is replacing the checkpoints here\n".encode())
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(Path(root))
    return path


def replaced(root: Path) -> bool:
    """Whether an --overwrite_output_dir start marked the checkpoints under `root` as replaced (`mark_replaced`)."""
    return (Path(root) / REPLACED_MARKER).is_file()


def unmark_replaced(root: Path, by_pid: int | None = None) -> None:
    """Remove the mark: the earlier run's checkpoints are deleted, or (`by_pid`: only the mark of that process) the
    new run was refused before it deleted anything, which leaves them as they were."""
    path = Path(root) / REPLACED_MARKER
    if by_pid is not None:
        try:
            if f"(PID {by_pid})" not in path.read_text():
                return
        except OSError:
            return
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------------
# The state we own, without pickle: RNG states and trainer state as safetensors + JSON
# ------------------------------------------------------------------------------------------------------------------

TRAINER_STATE = "trainer_state.json"
TIMESTEP_SAMPLER_STATE = "timestep_sampler.safetensors"


def rng_state_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rng_state_{rank}.safetensors"


def save_rng_state(folder: Path, rank: int, step: int) -> Path:
    """This rank's Python, NumPy, torch CPU (and CUDA) RNG states as safetensors: restorable without unpickling."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python_state": torch.tensor(words, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    metadata = {"step": str(step), "python_version": str(version), "python_gauss_next": repr(gauss_next),
                "numpy_kind": kind, "numpy_pos": str(pos), "numpy_has_gauss": str(has_gauss),
                "numpy_cached_gaussian": repr(float(cached))}  # fmt: skip
    path = rng_state_file(folder, rank)
    save_file(tensors, path, metadata=metadata)
    fault_point("checkpoint.rng.saved")
    return path


def load_rng_state(folder: Path, rank: int, step: int) -> None:
    """Restore what `save_rng_state` wrote; CheckpointError naming the file if it is missing or unusable."""
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    path = rng_state_file(folder, rank)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this rank's RNG state cannot be restored, so the resume would not "
                              "be exact (a checkpoint from another number of processes or an older version?)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        if int(meta["step"]) != step:
            raise ValueError(f"it is the state of step {meta['step']}, not {step}")
        gauss = None if meta["python_gauss_next"] == "None" else float(meta["python_gauss_next"])
        random.setstate((int(meta["python_version"]), tuple(tensors["python_state"].tolist()), gauss))
        np.random.set_state((meta["numpy_kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                             int(meta["numpy_pos"]), int(meta["numpy_has_gauss"]),
                             float(meta["numpy_cached_gaussian"])))  # fmt: skip
        torch.set_rng_state(tensors["torch_cpu"])
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            cuda = [tensors[f"torch_cuda_{i}"] for i in range(count) if f"torch_cuda_{i}" in tensors]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)
    except Exception as exc:  # a damaged or foreign file: never a silent, inexact resume
        raise CheckpointError(f"{path}: cannot restore the RNG state ({type(exc).__name__}: {exc})") from None


def write_trainer_state(folder: Path, state: dict, sampler_state: dict | None = None) -> None:
    """The trainer's own state: step, epoch, run config (JSON) and the timestep sampler's history (safetensors)."""
    from safetensors.torch import save_file

    if sampler_state:
        save_file({k: v.contiguous() for k, v in sampler_state.items()}, Path(folder) / TIMESTEP_SAMPLER_STATE)
    (Path(folder) / TRAINER_STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    fault_point("checkpoint.trainer_state.saved")


def read_trainer_state(info: CheckpointInfo) -> dict:
    """The trainer state of a verified checkpoint; CheckpointError unless its step and epoch match the manifest's."""
    path = info.path / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        step, epoch = int(state["step"]), int(state["epoch"])
    except FileNotFoundError:
        if TRAINER_STATE in info.files:  # it was there when the checkpoint was verified
            raise vanished(info.path, path) from None
        raise CheckpointError(f"{path}: missing (a checkpoint from an older version?); cannot resume from it") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if (step, epoch) != (info.step, info.epoch):
        raise CheckpointError(
            f"{path}: step {step}, epoch {epoch} disagree with the manifest's step {info.step}, epoch {info.epoch}"
        )
    return state


def read_timestep_sampler_state(folder: Path) -> dict:
    """The saved timestep-sampler tensors ({} for samplers without state)."""
    from safetensors.torch import load_file

    path = Path(folder) / TIMESTEP_SAMPLER_STATE
    return load_file(path) if path.is_file() else {}


PICKLED_STATE = ("custom_checkpoint_*.pkl", "random_states_*.pkl")


def check_no_pickled_state(folder: Path) -> None:
    """Our checkpoints hold no pickled RNG or custom state; one that does is refused, naming the file."""
    for pattern in PICKLED_STATE:
        for path in sorted(Path(folder).glob(pattern)):
            raise CheckpointError(
                f"{path}: pickled state this trainer never writes or loads (an older version's checkpoint, or "
                "tampered); resume from a checkpoint written by this version"
            )


def check_accelerate_files(folder: Path) -> None:
    """accelerate's optimizer/scheduler/scaler files load with torch's `weights_only` unpickler (no code can run);
    try each first, so that one that cannot be restored is an error naming it."""
    import torch

    for path in sorted([*Path(folder).glob("*.bin"), *Path(folder).glob("*.pt")]):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{path}: cannot be restored safely ({type(exc).__name__}: {detail})") from None


FULL_BELOW_BYTES = 1 << 20  # a write that failed with less free space than this ran out of it


def storage_hint(exc: BaseException, folder: Path | None = None) -> str:
    """' (is the disk full?)' when `exc` (or its cause) is a full disk or quota, or when the write into `folder`
    failed with almost no free space left there (torch's writer reports a full disk without an errno); a size-limit
    note for EFBIG; else '': the suffix is only added where it is true."""
    import errno

    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "errno", None)
        text = str(seen)
        if code is None and (rust := re.search(r"\(os error (\d+)\)", text)):  # safetensors' Rust I/O errors
            code = int(rust.group(1))
        if code in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in text or "QuotaExceeded" in text:
            return " (is the disk full?)"
        if code == errno.EFBIG or "FileTooLarge" in text:
            return " (a file size limit was reached)"
        seen = seen.__cause__ or seen.__context__
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free < FULL_BELOW_BYTES:
                return " (is the disk full?)"
        except OSError:
            pass
    return ""


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
    folder = Path(folder)
    with loading(folder) as listed:  # pruned by a running trainer mid-load: said so, not "older version"
        listed.update(verify(folder).files)
        subfolder = CHECKPOINT_WEIGHTS[weights]
        if not (folder / subfolder).is_dir():
            if weights == "ema":
                raise CheckpointError(f"{folder} has no EMA weights (trained with --use_ema false): use weights='raw'")
            raise CheckpointError(f"{folder}/{subfolder} is missing")
        diagnose_weights(folder / subfolder)
        if weights == "ema":
            unet, _ = load_ema_unet(folder / subfolder)
        else:  # local only: a folder gone mid-load must not become a Hub lookup
            unet = UNet2DModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(checkpoint_scheduler_dir(folder), local_files_only=True)
        labels_file = folder / CLASS_LABELS_FILE  # a class-conditional run's class names and label dropout
        listed_labels = CLASS_LABELS_FILE in listed
        labels = json.loads(labels_file.read_text()) if listed_labels or labels_file.is_file() else {}
        from .pipelines.pipeline_class_conditional import LABEL_CONFIG

        labels = {k: v for k, v in labels.items() if k in LABEL_CONFIG} if isinstance(labels, dict) else {}
        pipeline = pipeline_cls(unet=unet, scheduler=scheduler, **labels)
        pipeline.model_card_text = checkpoint_model_card(folder, weights)
    return pipeline


def checkpoint_model_card(folder: Path, weights: str = "ema") -> str | None:
    """The card of a checkpoint from its `training_run.json` (data, license, EMA metrics so far), or None for a
    checkpoint written without one (the pipeline's generic card is used then)."""
    from dataclasses import fields

    from .hub import ModelDescription, model_card

    try:
        record = json.loads((Path(folder) / RUN_RECORD).read_text())
        known = {f.name for f in fields(ModelDescription)}
        description = ModelDescription(**{k: v for k, v in record["description"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    description.ema = weights == "ema"
    description.repo_id = None
    metrics = record.get("ema_metrics", {}) if weights == "ema" else {}  # measured with the EMA weights
    name = f"{Path(folder).name} ({'EMA' if weights == 'ema' else 'raw'} weights)"
    return str(model_card(description, metrics, str(folder), has_samples=False, model_name=name))



def load_ema_unet(folder: Path):
    """(UNet2DModel with the EMA weights of a `unet_ema/` folder, the EMA's own settings). EMAModel saves its
    settings (decay, optimization_step, ...) into the UNet config; they are split off here, so that diffusers does
    not warn that UNet2DModel does not expect them."""
    import inspect

    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    config = dict(UNet2DModel.load_config(str(folder), local_files_only=True))
    accepted = set(inspect.signature(UNet2DModel.__init__).parameters)
    ema_settings = {k: config.pop(k) for k in list(config) if not k.startswith("_") and k not in accepted}
    unet = UNet2DModel.from_config(config)
    weights = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    unet.load_state_dict(load_file(weights), strict=True)
    return unet.eval(), ema_settings
