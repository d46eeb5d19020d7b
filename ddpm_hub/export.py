"""Turning trained weights into a shareable model: EMA swap-in, sample grids, held-out bits/dim, the pipeline
folder with its model card and metrics, and the push. The trainer and the command line share these functions.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .faults import fault_point

EXPORT_STAGING = ".pipeline.tmp"
# What an export writes; model_index.json, which makes a folder load as a pipeline, is moved in last.
PIPELINE_ITEMS = ("unet", "scheduler", "pipeline.py", "samples.png", "README.md", "metrics.json")


class ExportError(OSError):
    """The pipeline could not be written; the message names the folder. The folder never half-loads."""


@contextmanager
def ema_weights(model: torch.nn.Module, ema=None) -> Iterator[torch.nn.Module]:
    """Inside the block `model` holds the EMA weights (if `ema` is given) and is in eval mode; on exit, even
    after an error, its training weights and mode come back."""
    was_training = model.training
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        if ema is not None:
            ema.restore(model.parameters())


def grid_upscale(resolution: int) -> int:
    """How much to enlarge small images in a grid so that people can see them (8x8 digits -> 8x)."""
    return max(1, 64 // resolution)


def sample_grid(
    pipeline, num_images: int, num_inference_steps: int, seed: int = 0, batch_size: int = 64,
    guidance_scale: float = 1.0,
):  # fmt: skip
    """A grid (PIL) of `num_images` samples drawn with a fixed seed, so that grids of one run are comparable.
    A class-conditional model gives one row per class (`ceil(num_images / classes)` images each, guided)."""
    from .plots import image_grid

    num_classes = pipeline.unet.config.get("num_class_embeds")
    labels, cols = None, None
    if num_classes is not None:
        cols = max(1, -(-num_images // (num_classes - 1)))
        labels = torch.arange(num_classes - 1).repeat_interleave(cols)
        num_images = len(labels)
    tiles = sample_tiles(pipeline, num_images, num_inference_steps, seed, batch_size, labels, guidance_scale)
    return image_grid(tiles, upscale=grid_upscale(tiles[0].height), cols=cols)


def sample_tiles(pipeline, num_images, num_inference_steps, seed=0, batch_size=64, class_labels=None,
                 guidance_scale=1.0) -> list:  # fmt: skip
    """`num_images` samples as PIL images (see `sampling.sample_uint8`)."""
    from PIL import Image

    from .sampling import sample_uint8

    images = sample_uint8(pipeline, num_images, num_inference_steps, seed, batch_size, class_labels=class_labels,
                          guidance_scale=guidance_scale).permute(0, 2, 3, 1).numpy()  # fmt: skip
    return [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in images]


def held_out_bpd(
    pipeline,
    images: torch.Tensor,
    mode: str = "full",
    batch_size: int = 64,
    seed: int = 0,
    num_samples: int = 16,
    class_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out bits/dim of uint8 `images` `[N, C, H, W]`: `full` (all T terms) or `estimate` (stratified, with
    its standard error). Keys name what was measured, as they appear in metrics.json and the card. With
    `class_labels` (a conditional model) the bound given the labels, and the unconditional (null-label) bound
    under `held_out_unconditional_...` keys, both from the same noise: their gap is what the label tells the model."""
    if mode not in ("full", "estimate"):
        raise ValueError(f"mode must be 'full' or 'estimate', got {mode!r}")
    results = _bpd(pipeline, images, mode, batch_size, seed, num_samples, class_labels, "held_out_")
    if class_labels is not None and pipeline.config.get("cond_drop_prob") != 0:
        results.update(_bpd(pipeline, images, mode, batch_size, seed, num_samples, None, "held_out_unconditional_"))
    return results


def _bpd(pipeline, images, mode, batch_size, seed, num_samples, class_labels, prefix) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    estimate = mode == "estimate"
    from .pipelines.pipeline_class_conditional import ids_by_design

    with ids_by_design():  # the labels here are class ids
        out = pipeline.bits_per_dim(images, batch_size=batch_size, generator=g, estimate=estimate,
                                    num_samples=num_samples, class_labels=class_labels)  # fmt: skip
    if not estimate:
        return {f"{prefix}bits_per_dim": float(out.total.mean())}
    return {f"{prefix}bits_per_dim_estimate": float(out.total.mean()),
            f"{prefix}bits_per_dim_stderr": out.mean_stderr()}  # fmt: skip


def sample_quality(
    pipeline,
    held_out: torch.Tensor,
    num_samples: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 256,
    num_seeds: int = 1,
    held_out_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> dict[str, float]:
    """Sample quality of `num_samples` samples against uint8 held-out images. 8x8 grayscale digits: in both shipped
    digits classifiers' features (`metrics.digits_quality`), the mean over seeds `seed`.. `seed + num_seeds - 1`
    and, with several seeds, FID's 95% t-interval half-width (`_fid_ci95`). Other data: Inception FID/KID at `seed`
    when torch-fidelity is installed, else nothing (logged). With `held_out_labels` (a conditional model) the
    samples ask for the held-out labels in turn (the same class mix) at `guidance_scale`, and for the digits
    `digits_class_accuracy` is the fraction that the digits classifier assigns to the requested class."""
    import logging

    from . import metrics
    from .sampling import sample_uint8

    c, h, w = held_out.shape[1:]
    labels = None
    if held_out_labels is not None:
        labels = held_out_labels.repeat(-(-num_samples // len(held_out_labels)))[:num_samples]
    if (c, h, w) == (1, 8, 8):
        seeds = range(seed, seed + num_seeds)
        digit_labels = labels is not None and getattr(pipeline, "id2label", None) == {i: str(i) for i in range(10)}
        report = metrics.sample_quality_report(pipeline, held_out, num_samples=num_samples,
                                               num_inference_steps=num_inference_steps, seeds=seeds,
                                               batch_size=batch_size, class_labels=labels,
                                               guidance_scale=guidance_scale)  # fmt: skip
        out: dict[str, float] = {}
        for space in report["spaces"]:
            for metric in CARD_QUALITY_METRICS:
                stat = report["summary"][f"{space}_{metric}"]
                out[f"{space}_{metric}"] = stat["mean"]
                if metric == "fid" and num_seeds > 1:
                    out[f"{space}_fid_ci95"] = stat["half_width"]
        if digit_labels:
            out["digits_class_accuracy"] = report["summary"]["digits_class_accuracy"]["mean"]
        return out
    try:
        metrics.check_inception_available()
    except RuntimeError as exc:
        logging.getLogger(__name__).warning("no sample-quality metric: %s", exc)
        return {}
    fake = sample_uint8(pipeline, num_samples, num_inference_steps, seed, batch_size, class_labels=labels,
                        guidance_scale=guidance_scale)  # fmt: skip
    fid = metrics.frechet_inception_distance(held_out.split(256), fake.split(256))
    kid, _ = metrics.kernel_inception_distance(held_out.split(256), fake.split(256))
    return {"fid": fid, "kid": kid}


CARD_QUALITY_METRICS = ("fid", "kid", "precision", "recall", "class_error")  # per digits space, in metrics.json


# The metric that picks the best checkpoint during training (lower is better). For the embedded digits: FID in the
# convolutional digits classifier's features, the independent yardstick (its own train split; more discriminative
# than the 64-unit MLP's space, which once ranked a recipe best that the conv space ranks worse at every seed).
DIGITS_SELECTION_METRIC = "digits_conv_fid"
INCEPTION_SELECTION_METRIC = "fid"


def is_digits_shape(images: torch.Tensor) -> bool:
    """True for `[N, 1, 8, 8]` images: the shipped digits classifiers' input."""
    return tuple(images.shape[1:]) == (1, 8, 8)


def selection_metric(held_out: torch.Tensor) -> str:
    """The name of the training-time quality metric that ranks checkpoints for images like `held_out`."""
    return DIGITS_SELECTION_METRIC if is_digits_shape(held_out) else INCEPTION_SELECTION_METRIC


def check_training_quality(held_out: torch.Tensor) -> None:
    """RuntimeError (one line) when `training_quality` cannot run on such images: Inception needs torch-fidelity."""
    if is_digits_shape(held_out):
        return
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        c, h, w = held_out.shape[1:]
        raise RuntimeError(
            f"FID/KID of {c}x{h}x{w} images use Inception features, which need torch-fidelity: pip install "
            "torch-fidelity (its Inception weights are downloaded once); the shipped digits features fit 1x8x8 only"
        ) from None


def training_quality(
    pipeline,
    held_out: torch.Tensor,
    num_samples: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 256,
    held_out_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> dict[str, float]:
    """The during-training quality of `pipeline`'s samples (seeded: the same initial noise at every call) against
    uint8 `held_out`: `digits_quality` in both digits spaces for 8x8 digits, else Inception `fid`/`kid`.
    Contains `selection_metric(held_out)`. A conditional model is asked for the held-out labels in turn (the same
    class mix) at `guidance_scale`, as `sample_quality` does."""
    from . import metrics
    from .sampling import sample_uint8

    labels = None
    if held_out_labels is not None:
        labels = held_out_labels.repeat(-(-num_samples // len(held_out_labels)))[:num_samples]
    fake = sample_uint8(pipeline, num_samples, num_inference_steps, seed, batch_size, class_labels=labels,
                        guidance_scale=guidance_scale)  # fmt: skip
    if is_digits_shape(held_out):
        return metrics.digits_quality(held_out, fake)
    fid = metrics.frechet_inception_distance(held_out.split(256), fake.split(256))
    kid, _ = metrics.kernel_inception_distance(held_out.split(256), fake.split(256))
    return {"fid": fid, "kid": kid}


@dataclass
class ModelDescription:
    """What the model card says about a model besides its metrics: data, size and the training options."""

    hparams: dict[str, Any]
    num_parameters: int
    channels: int
    dataset_description: str
    dataset_id: str | None = None
    data_license: str | None = None
    repo_id: str | None = None
    ema: bool | None = None
    sampler: str | None = None
    num_inference_steps: int = 1000
    class_names: list[str] | None = None
    guidance_scale: float = 1.0
    dataset_type: str | None = None  # the model-index's id-like token for data without a Hub id
    dataset_name: str | None = None  # the model-index's human name of the data
    eval_split: str | None = None  # the split the metrics were measured on


def model_card(description: ModelDescription, metrics: dict[str, float], source: str, has_samples: bool,
               model_name: str | None = None):
    """The ModelCard of a model described by `description` whose usage snippet loads `source` (repo id or
    folder)."""
    from .hub import render_model_card

    return render_model_card(
        hparams=description.hparams,
        metrics=metrics,
        repo_id=source,
        num_parameters=description.num_parameters,
        channels=description.channels,
        dataset_id=description.dataset_id,
        dataset_description=description.dataset_description,
        data_license=description.data_license,
        num_inference_steps=description.num_inference_steps,
        sampler=description.sampler,
        ema=description.ema,
        has_samples=has_samples,
        model_name=model_name,
        dataset_type=description.dataset_type,
        dataset_name=description.dataset_name,
        eval_split=description.eval_split,
        class_names=description.class_names,
        guidance_scale=description.guidance_scale,
    )


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
            staging.mkdir()
            _write_pipeline(staging, folder, unet, scheduler, description, metrics, grid, result)
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
        cond_drop_prob = description.hparams.get("cond_drop_prob")
        recommended = description.guidance_scale if cond_drop_prob != 0 else None
        labels = {"id2label": dict(enumerate(description.class_names)), "cond_drop_prob": cond_drop_prob,
                  "recommended_guidance_scale": recommended}  # fmt: skip
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
