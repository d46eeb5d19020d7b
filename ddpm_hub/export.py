"""Turning trained weights into a shareable model: EMA swap-in, sample grids, held-out bits/dim, the pipeline
folder with its model card and metrics, and the push. The trainer and the command line share these functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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


def sample_grid(pipeline, num_images: int, num_inference_steps: int, seed: int = 0, batch_size: int = 64):
    """A grid (PIL) of `num_images` samples drawn with a fixed seed, so that grids of one run are comparable."""
    from PIL import Image

    from .plots import image_grid
    from .sampling import sample_uint8

    images = sample_uint8(pipeline, num_images, num_inference_steps, seed, batch_size).permute(0, 2, 3, 1).numpy()
    tiles = [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in images]
    return image_grid(tiles, upscale=grid_upscale(tiles[0].height))


def held_out_bpd(
    pipeline,
    images: torch.Tensor,
    mode: str = "full",
    batch_size: int = 64,
    seed: int = 0,
    num_samples: int = 16,
) -> dict[str, float]:
    """Held-out bits/dim of uint8 `images` `[N, C, H, W]`: `full` (all T terms) or `estimate` (stratified, with
    its standard error). Keys name what was measured, as they appear in metrics.json and the card."""
    g = torch.Generator().manual_seed(seed)
    if mode == "full":
        out = pipeline.bits_per_dim(images, batch_size=batch_size, generator=g)
        return {"held_out_bits_per_dim": float(out.total.mean())}
    if mode != "estimate":
        raise ValueError(f"mode must be 'full' or 'estimate', got {mode!r}")
    out = pipeline.bits_per_dim(images, batch_size=batch_size, generator=g, estimate=True, num_samples=num_samples)
    return {
        "held_out_bits_per_dim_estimate": float(out.total.mean()),
        "held_out_bits_per_dim_stderr": out.mean_stderr(),
    }


def sample_quality(
    pipeline, held_out: torch.Tensor, num_samples: int, num_inference_steps: int, seed: int = 0, batch_size: int = 256
) -> dict[str, float]:
    """FID/KID of `num_samples` samples against uint8 held-out images: in the shipped digits classifier's
    features for 8x8 grayscale digits, in Inception's when torch-fidelity is installed, else nothing (logged)."""
    import logging

    from . import metrics
    from .sampling import sample_uint8

    c, h, w = held_out.shape[1:]
    digits = (c, h, w) == (1, 8, 8)
    if not digits:
        try:
            metrics.check_inception_available()
        except RuntimeError as exc:
            logging.getLogger(__name__).warning("no sample-quality metric: %s", exc)
            return {}
    fake = sample_uint8(pipeline, num_samples, num_inference_steps, seed, batch_size)
    if digits:
        return metrics.digits_fid_kid(held_out, fake)
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
    `metrics.json` (`result` plus the metrics). Returns the folder."""
    from .pipelines import DDPMPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    if grid is not None:
        grid.save(folder / "samples.png")
    metrics = dict(metrics or {})
    card = model_card(description, metrics, description.repo_id or str(folder), grid is not None,
                      model_name=description.repo_id or folder.name)  # fmt: skip
    card.save(folder / "README.md")
    payload = {**(result or {}), "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(payload, indent=1) + "\n")
    return folder


def publish(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Push a model folder's pipeline files to the Hub (see `hub_push.push_pipeline_folder`); returns the URL."""
    from .hub_push import push_pipeline_folder

    return push_pipeline_folder(folder, repo_id, token=token, private=private)
