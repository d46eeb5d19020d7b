"""Inference pipelines (installed as `ddpm_hub.pipelines`)."""

from .pipeline_ddpm import DDPMPipeline

__all__ = ["DDPMPipeline"]
