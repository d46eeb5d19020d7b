"""Training losses of one batch (Algorithm 1): L_simple (Ho et al. eq. 14), the hybrid loss and L_vlb of
improved DDPM. Per-example values `[N]` in float32; the bound's terms come from `likelihood.vlb_terms_bpd`.
"""

from __future__ import annotations

import torch

from . import diffusion_math as dm
from .choices import LOSS_TYPES
from .diffusion_math import mean_flat
from .likelihood import vlb_terms_bpd
from .scheduling_ddpm import DDPMScheduler

# ------------------------------------------------------------------------------------------------------------------
# L_simple (Algorithm 1) and its targets
# ------------------------------------------------------------------------------------------------------------------


def training_target(
    scheduler: DDPMScheduler, x_start: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network regresses: eps (Algorithm 1), x_0 for `sample`, v for `v_prediction`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x_start
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x_start, noise, timesteps)
    raise ValueError(f"prediction_type must be one of {dm.PREDICTION_TYPES}, got {prediction_type!r}")


def simple_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_simple per example: mean squared error over C*H*W, computed in float32. Shape `[N]`."""
    return mean_flat((model_output.float() - target.float()) ** 2)


def _stop_mean_gradient(model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """Improved DDPM Sec. 3.1: L_vlb trains only the variance, so detach the mean channels."""
    mean_part, var_part = dm.split_model_output(model_output, channels, "learned")
    return torch.cat([mean_part.detach(), var_part], dim=1)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example min-SNR-gamma weights `[N]` (Hang et al. 2023), as diffusers' example trainers compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def training_losses(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    loss_type: str = "simple",
    vlb_weight: float = 0.001,
    x_t: torch.Tensor | None = None,
    snr_gamma: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example losses `[N]` (float32) for one batch of Algorithm 1.

    - `simple`: L_simple, the MSE to the prediction target (Ho et al. eq. 14).
    - `hybrid`: L_simple + vlb_weight * T * L_t with the mean's gradient stopped in the bound term
      (improved DDPM eq. 16, lambda = 0.001); needs learned variances for the bound term to train anything.
    - `vlb`: T * L_t, an unbiased one-sample estimate of the whole bound in bits/dim.
    `x_t` (the model's input) is recomputed with the scheduler's `add_noise` when not given. `snr_gamma` weights
    the MSE term by min-SNR-gamma (Hang et al. 2023): min(SNR_t, gamma) / SNR_t for epsilon, / (SNR_t + 1) for
    v, min(SNR_t, gamma) for x_0 prediction, with SNR_t = abar_t / (1 - abar_t) from diffusers' `compute_snr`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    channels = x_start.shape[1]
    mean_part, _ = scheduler.split_model_output(model_output, x_start)
    if x_t is None:
        x_t = scheduler.add_noise(x_start, noise, timesteps)
    num_timesteps = len(scheduler)
    losses: dict[str, torch.Tensor] = {}
    if loss_type in ("simple", "hybrid"):
        losses["mse"] = simple_loss(mean_part, training_target(scheduler, x_start, noise, timesteps))
        if snr_gamma is not None:
            losses["mse"] = losses["mse"] * min_snr_weights(scheduler, timesteps, snr_gamma)
    if loss_type in ("hybrid", "vlb"):
        vlb_input = model_output
        if loss_type == "hybrid" and model_output.shape[1] == 2 * channels:
            vlb_input = _stop_mean_gradient(model_output, channels)
        elif loss_type == "hybrid":
            vlb_input = model_output.detach()  # fixed variance: the bound term has nothing left to train
        terms = vlb_terms_bpd(scheduler, vlb_input, x_start, x_t, timesteps)
        losses["vb"] = (terms["output"] * num_timesteps).float()
    if loss_type == "simple":
        losses["loss"] = losses["mse"]
    elif loss_type == "hybrid":
        losses["loss"] = losses["mse"] + vlb_weight * losses["vb"]
    else:
        losses["loss"] = losses["vb"]
    return losses
