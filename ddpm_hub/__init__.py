"""ddpm-hub: Denoising Diffusion Probabilistic Models (Ho et al. 2020) as a first-class diffusers extension."""

from .likelihood import (
    BitsPerDim,
    LossSecondMomentSampler,
    UniformSampler,
    bits_per_dim,
    bits_per_dim_estimate,
    make_timestep_sampler,
    prior_bpd,
    simple_loss,
    training_losses,
    training_target,
    vlb_terms_bpd,
)
from .models import UNET_PRESETS, count_parameters, create_unet, unet_config
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

__version__ = "0.1.0"

__all__ = [
    "BitsPerDim",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "LossSecondMomentSampler",
    "UNET_PRESETS",
    "UniformSampler",
    "bits_per_dim",
    "bits_per_dim_estimate",
    "count_parameters",
    "create_unet",
    "make_timestep_sampler",
    "prior_bpd",
    "simple_loss",
    "training_losses",
    "training_target",
    "unet_config",
    "vlb_terms_bpd",
]
