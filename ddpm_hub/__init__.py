"""ddpm-hub: Denoising Diffusion Probabilistic Models (Ho et al. 2020) as a first-class diffusers extension."""

from .likelihood import BitsPerDim, bits_per_dim, bits_per_dim_estimate, prior_bpd, vlb_terms_bpd
from .losses import simple_loss, training_losses, training_target
from .models import UNET_PRESETS, count_parameters, create_unet, unet_config
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput
from .timestep_sampling import LossSecondMomentSampler, UniformSampler, make_timestep_sampler

__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline lives in the top-level `pipelines/` folder (installed as ddpm_hub.pipelines); import it lazily
    # so that `import ddpm_hub` stays light and free of import cycles.
    if name == "DDPMPipeline":
        from .pipelines import DDPMPipeline

        return DDPMPipeline
    raise AttributeError(f"module 'ddpm_hub' has no attribute {name!r}")


__all__ = [
    "BitsPerDim",
    "DDPMPipeline",
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
