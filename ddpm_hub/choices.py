"""The named choices of the project in one light module (no torch import), shared by the maths, the training
config and the command line: schedules, prediction and variance types, losses, and the samplers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
LOSS_TYPES = ("simple", "hybrid", "vlb")


@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler class with config overrides, as one named sampler, and its usual step count."""

    scheduler: str
    steps: int
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# Every scheduler of `diffusers.DDPMScheduler._compatibles` (DPMSolverSDE needs the optional torchsde), each run
# through the pipeline's canonical loop. `ddpm` is ddpm_hub's own DDPMScheduler.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler("DDPMScheduler", 1000, note="Algorithm 2, ancestral"),
    "ddim": Sampler("DDIMScheduler", 50),
    "pndm": Sampler("PNDMScheduler", 50),
    "lms": Sampler("LMSDiscreteScheduler", 50),
    "euler": Sampler("EulerDiscreteScheduler", 50),
    "euler_ancestral": Sampler("EulerAncestralDiscreteScheduler", 50),
    "heun": Sampler("HeunDiscreteScheduler", 50),
    "kdpm2": Sampler("KDPM2DiscreteScheduler", 50),
    "kdpm2_ancestral": Sampler("KDPM2AncestralDiscreteScheduler", 50),
    "dpm": Sampler("DPMSolverMultistepScheduler", 10, {"algorithm_type": "dpmsolver++", "solver_order": 2},
                   note="DPM-Solver++ 2M; the default: DDPM-1000's quality in 10 steps (README)"),
    "dpm_3m": Sampler("DPMSolverMultistepScheduler", 20, {"algorithm_type": "dpmsolver++", "solver_order": 3},
                      note="DPM-Solver++ 3M"),
    "dpm_karras": Sampler("DPMSolverMultistepScheduler", 20,
                          {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                          note="DPM-Solver++ 2M, Karras sigmas"),
    # lower_order_final=True is what diffusers switches to in set_timesteps anyway (with a warning) for its default
    # final_sigmas_type "zero": the same steps, said once here instead of at every call
    "dpm_singlestep": Sampler("DPMSolverSinglestepScheduler", 20, {"lower_order_final": True}),
    "deis": Sampler("DEISMultistepScheduler", 20),
    "unipc": Sampler("UniPCMultistepScheduler", 20),
    "edm_euler": Sampler("EDMEulerScheduler", 50),
    "dpm_sde": Sampler("DPMSolverSDEScheduler", 20, note="needs torchsde"),
}  # fmt: skip

# Samplers the pipeline runs exactly as diffusers does (tested) but the command line does not offer, because they
# failed the quality check on the trained digits model (benchmarks/bench_samplers.py, README table).
NOT_OFFERED: dict[str, str] = {
    "edm_euler": "EDM preconditioning does not fit a DDPM-parameterised model: digits FID 158-186 at 10-50 steps",
    "dpm_karras": "Karras sigmas on the cosine schedule (sigma_max ~ 2e4) map most steps to the same timestep 998 and "
    "diffusers 0.42 then raises IndexError (its own loop too); on the linear schedule it runs",
}
OFFERED = tuple(name for name in SAMPLERS if name not in NOT_OFFERED)

# The sampler of grids, metrics, cards and the CLI unless one is named (measured: docs/benchmarks.md, sample quality
# per sampler).
DEFAULT_SAMPLER = "dpm"
# The options that make a run's scheduler (its saved scheduler_config.json): fixed for the run (resuming.py), taken
# from a pretrained pipeline when fine-tuning (training/components.py).
DIFFUSION_OPTIONS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                     "variance_type", "clip_sample")  # fmt: skip
