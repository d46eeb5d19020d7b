"""Exporting a model folder (the pipeline in safetensors, its card, samples and metrics) crash-safely, and pushing it.
The trainer and the command line share these functions; what they measure comes from `evaluation`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .faults import fault_point
from .files import first_link, make_private_dir, open_up
from .hub import ModelDescription, model_card
from .labels import label_config
from .pipelines.pipeline_ddpm import REMOTE_CODE_FILES

EXPORT_STAGING = ".pipeline.tmp"
# What an export writes (the code files: what `DDPMPipeline.save_pretrained` writes for stock diffusers'
# custom_pipeline); model_index.json, which makes a folder load as a pipeline, is moved in last.
PIPELINE_ITEMS = ("unet", "scheduler", *REMOTE_CODE_FILES, "samples.png", "README.md", "metrics.json")


class ExportError(OSError):
    """The pipeline could not be written; the message names the folder. The folder never half-loads."""


def export_pipeline(
    folder: str | Path,
    unet: torch.nn.Module,
    scheduler,
    description: ModelDescription,
    metrics: dict[str, float] | None = None,
    grid=None,
    result: dict[str, Any] | None = None,
) -> Path:
    """Write a complete model folder: the pipeline (safetensors), `samples.png`, `README.md` (model card) and
    `metrics.json` (`result` plus the metrics). Everything is written to a fresh staging folder inside `folder`
    and then moved into place, `model_index.json` last: a failure (a full disk) leaves either the previous
    pipeline or a folder that does not load as one, never a half pipeline, and is an ExportError naming the folder.
    Holds the folder's lock meanwhile. Returns the folder."""
    from safetensors import SafetensorError

    from .checkpoints import storage_hint
    from .output_lock import OutputLock

    folder = Path(folder)
    with OutputLock(folder, "export"):
        staging = recover_export(folder)
        try:
            make_private_dir(staging)  # mode 700 while written: no other user can plant a link in it
            _write_pipeline(staging, folder, unet, scheduler, description, metrics, grid, result)
            link = first_link(staging)
            if link is not None:
                raise ExportError(f"{link}: a symbolic link appeared in the pipeline being written (another process "
                                  "is planting links in the folder); nothing was exported")  # fmt: skip
            open_up(staging)
            _commit_pipeline(staging, folder)
        except (OSError, SafetensorError) as exc:
            hint = storage_hint(exc, folder)  # before the staging's removal frees space
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportError(f"could not write the pipeline to {folder}: {exc}{hint}") from None
    return folder


def recover_export(folder: Path) -> Path:
    """Remove what an interrupted export left in `folder` (its staging and replaced-item folders); returns the
    (now absent) staging path."""
    from .checkpoints import remove_tree

    for leftover in [folder / EXPORT_STAGING, *folder.glob(".*.old.tmp")]:
        remove_tree(leftover, ignore_errors=True)
    return folder / EXPORT_STAGING


def _commit_pipeline(staging: Path, folder: Path) -> None:
    """Move the staged pipeline into `folder`, model_index.json last (so the folder loads only when complete)."""
    from .checkpoints import fsync_dir

    (folder / "model_index.json").unlink(missing_ok=True)
    fault_point("export.commit.index_removed")
    for name in PIPELINE_ITEMS:
        target, new = folder / name, staging / name
        old = folder / f".{name}.old.tmp"
        if target.exists():
            os.replace(target, old)
        if new.exists():
            os.replace(new, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    fault_point("export.commit.before_index")
    os.replace(staging / "model_index.json", folder / "model_index.json")
    fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)
    fault_point("export.commit.done")


def _write_pipeline(
    staging: Path,
    folder: Path,
    unet: torch.nn.Module,
    scheduler,
    description: ModelDescription,
    metrics: dict[str, float] | None,
    grid,
    result: dict[str, Any] | None,
) -> None:
    from .pipelines import DDPMPipeline

    labels = {}
    if description.class_names is not None:
        labels = label_config(description.class_names, description.hparams.get("cond_drop_prob"),
                              description.guidance_scale)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=scheduler, **labels).save_pretrained(staging)
    fault_point("export.staging.pipeline_saved")
    if grid is not None:
        grid.save(staging / "samples.png")
    metrics = dict(metrics or {})
    card = model_card(description, metrics, description.repo_id or str(folder), grid is not None,
                      model_name=description.repo_id or folder.name)  # fmt: skip
    card.save(staging / "README.md")
    payload = {**(result or {}), "metrics": metrics}
    (staging / "metrics.json").write_text(json.dumps(payload, indent=1) + "\n")
    fault_point("export.staging.card_saved")


def publish(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Push a model folder's pipeline files to the Hub (see `hub_push.push_pipeline_folder`), holding the folder's
    shared (reader's) lock so that no trainer writes into it meanwhile; returns the URL."""
    from .hub_push import check_repo_id, push_pipeline_folder
    from .output_lock import OutputLock

    check_repo_id(repo_id)
    with OutputLock(folder, "push", create=False, shared=True):
        return push_pipeline_folder(folder, repo_id, token=token, private=private)
