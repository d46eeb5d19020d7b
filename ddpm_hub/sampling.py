"""Named samplers (`choices.SAMPLERS`) on a pipeline, and drawing many images as uint8 for metrics and files."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .choices import SAMPLERS

# Where sqrt(alphabar) at t = T-1 is below 1e-3 (the cosine schedule: 5e-5), a deterministic sampler's x0 estimate of
# an epsilon model, x0 = (x - sigma eps) / alpha, multiplies any error of eps by its inverse: a start there gives noise
# from a model whose eps is 0.1% off. DPM-Solver singlestep always starts at T-1; the others do with "linspace" or
# "trailing" spacing (a saved ddpm_hub model has "leading": a start at T - T/n). DPM-Solver gets diffusers'
# `lambda_min_clipped` (its docstring: "critical for cosine (squaredcos_cap_v2) noise schedule"), which starts the
# solver where log(alpha/sigma) >= the value: -3 here, a gain of at most e^3 = 20 at the first step (t = 967 of 1000;
# leading-spacing DPM-Solver++ starts at t = 900, a gain of 6.4). diffusers' example value for DeepFloyd IF, -5.1 (a
# gain of 165), left DPM-Solver singlestep at FID 10.8 / 28.0 on the digits, -3 gives 2.5 / 5.5 (docs/benchmarks.md,
# sample quality per sampler). The other deterministic samplers get "leading" spacing. Set only there: elsewhere
# the timesteps stay as diffusers makes them. The stochastic samplers (NOISE_TOLERANT) are not affected.
COSINE_LAMBDA_CLIPPED = ("DPMSolverSinglestepScheduler", "DPMSolverMultistepScheduler")
COSINE_LAMBDA_MIN = -3.0


def _start_fix(cls: type, config: Any) -> dict[str, Any]:
    """The option that keeps sampler `cls` built from `config` from starting an epsilon model at t = T-1 where
    sqrt(alphabar) < 1e-3 (none where it does not start there, or where its fresh noise outweighs the error)."""
    from .pipelines.pipeline_class_conditional import NOISE_TOLERANT
    from .scheduling_ddpm import DDPMScheduler

    if cls.__name__ in NOISE_TOLERANT or config.get("prediction_type", "epsilon") != "epsilon":
        return {}
    if float(DDPMScheduler.from_config(config).alphas_cumprod[-1]) ** 0.5 >= 1e-3:
        return {}
    if cls.__name__ in COSINE_LAMBDA_CLIPPED:
        starts_at_end = cls.__name__ == "DPMSolverSinglestepScheduler" or config.get("timestep_spacing") != "leading"
        return {"lambda_min_clipped": COSINE_LAMBDA_MIN} if starts_at_end else {}
    default = inspect.signature(cls.__init__).parameters.get("timestep_spacing")
    spacing = config.get("timestep_spacing", default.default if default is not None else None)
    return {"timestep_spacing": "leading"} if spacing in ("linspace", "trailing") else {}


def build_scheduler(name: str, config: Any, seed: int = 0):
    """The scheduler of sampler `name` built from a (DDPM) scheduler config, as `X.from_config(config)` does
    (`seed` seeds DPM-Solver-SDE's Brownian noise, which does not come from the pipeline's generator)."""
    import diffusers

    from .scheduling_ddpm import DDPMScheduler

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    sampler = SAMPLERS[name]
    # As the saved pipeline holds it: a scheduler made in memory marks the options left at their defaults, and
    # `from_config` would then take the sampler's own defaults for them (DPM-Solver's "linspace" spacing for the
    # model's "leading": a start at t=999; on the cosine schedule that sampled one model at FID 30 instead of 2.5).
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    cls = DDPMScheduler if name == "ddpm" else getattr(diffusers, sampler.scheduler)
    extra: dict[str, Any] = {"noise_sampler_seed": seed} if sampler.scheduler == "DPMSolverSDEScheduler" else {}
    extra.update(_start_fix(cls, {**config, **sampler.config}))
    return cls.from_config(config, **sampler.config, **extra)


def with_sampler(pipeline, name: str):
    """A pipeline sharing `pipeline`'s UNet (and class names) whose scheduler is sampler `name` (the original is
    left as it was)."""
    from .pipelines.pipeline_class_conditional import LABEL_CONFIG

    labels = {k: pipeline.config[k] for k in LABEL_CONFIG if k in pipeline.config}
    return type(pipeline)(unet=pipeline.unet, scheduler=build_scheduler(name, pipeline.scheduler.config), **labels)


def sample_uint8(
    pipeline,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """`num_images` samples as uint8 `[N, C, H, W]` (the rounding of the PIL output), drawn batch by batch from
    one seeded generator; of class `class_labels[i]` (int64 `[N]`) with `guidance_scale` for a conditional model."""
    from .pipelines.pipeline_class_conditional import ids_by_design

    pipeline.set_progress_bar_config(disable=not progress)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    conditional = {}
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        if class_labels is not None:
            conditional = {"class_labels": class_labels[start:start + n], "guidance_scale": guidance_scale}
        with ids_by_design():  # the labels here are class ids
            images = pipeline(batch_size=n, generator=generator, num_inference_steps=num_inference_steps,
                              output_type="pt", **conditional).images  # fmt: skip
        out.append((images * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


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
