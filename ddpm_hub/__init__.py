"""ddpm-hub: Denoising Diffusion Probabilistic Models (Ho et al. 2020) as a first-class diffusers extension.

Names are imported lazily on first use, so that `import ddpm_hub` (and `python -m ddpm_hub --help`) stays fast
and free of torch/diffusers imports until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BitsPerDim": ".likelihood",
    "bits_per_dim": ".likelihood",
    "bits_per_dim_estimate": ".likelihood",
    "prior_bpd": ".likelihood",
    "vlb_terms_bpd": ".likelihood",
    "simple_loss": ".losses",
    "training_losses": ".losses",
    "training_target": ".losses",
    "UNET_PRESETS": ".models",
    "count_parameters": ".models",
    "create_unet": ".models",
    "unet_config": ".models",
    "DDPMScheduler": ".scheduling_ddpm",
    "DDPMSchedulerOutput": ".scheduling_ddpm",
    "LossSecondMomentSampler": ".timestep_sampling",
    "UniformSampler": ".timestep_sampling",
    "make_timestep_sampler": ".timestep_sampling",
    # The pipeline lives in the top-level `pipelines/` folder, installed as ddpm_hub.pipelines.
    "DDPMPipeline": ".pipelines",
    "DDPMImg2ImgPipeline": ".pipelines.pipeline_editing",
    "DDPMInpaintPipeline": ".pipelines.pipeline_editing",
    "DDPMInterpolationPipeline": ".pipelines.pipeline_editing",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpm_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
