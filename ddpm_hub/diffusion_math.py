"""The Gaussian diffusion formulas of Ho et al. 2020 as plain functions of alpha-bar values.

Every formula lives here once. The scheduler's `step` (sampling, Algorithm 2) calls these with the float32
scalars of a (possibly strided) timestep pair; the training loss and the variational bound call them with
float64 tables gathered per example. Shapes: images are `[N, C, H, W]`; coefficients are scalars or
tensors that broadcast against them (`[N, 1, 1, 1]`).
"""

from __future__ import annotations

import math

import torch

from .choices import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES  # noqa: F401  (re-exported)


def split_model_output(
    model_output: torch.Tensor, channels: int, variance_type: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The learned-variance output contract, in one place: (mean part `[N, C, ...]`, variance part or None).

    A learned variance type needs 2C output channels (the mean, then the variance); a fixed type reads the
    first C channels, so a learned-variance model can still be sampled with a fixed variance (or by DDIM,
    DPM-Solver, ...). Any other channel count is an error naming both numbers.
    """
    out = model_output.shape[1]
    if variance_type in LEARNED_VARIANCE_TYPES:
        if out != 2 * channels:
            raise ValueError(
                f"variance_type={variance_type!r} needs a model with 2 x {channels} output channels (mean and "
                f"variance), got {out}: double the UNet's out_channels"
            )
        mean_part, var_part = torch.split(model_output, channels, dim=1)
        return mean_part, var_part
    if out == 2 * channels:
        return model_output[:, :channels], None
    if out != channels:
        raise ValueError(
            f"the model output has {out} channels but the sample has {channels}; expected {channels} (or "
            f"{2 * channels} for a learned-variance model)"
        )
    return model_output, None


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: `[N, ...] -> [N]`."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def broadcast_to_sample(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Reshape per-example values `[N]` to `[N, 1, ..., 1]` so they broadcast against `sample`."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (sample.ndim - 1)))


def q_sample(
    original_samples: torch.Tensor, noise: torch.Tensor, sqrt_alpha_prod: torch.Tensor, sqrt_one_minus_alpha_prod
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: the closed form of q(x_t | x_0), eq. (4)."""
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def predict_original_sample(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    beta_prod_t: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x_0 from the model output: eq. (15) for epsilon, the output itself for sample, and
    x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v for v_prediction (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
    raise ValueError(
        f"prediction_type given as {prediction_type} must be one of `epsilon`, `sample` or"
        " `v_prediction`  for the DDPMScheduler."
    )


def posterior_mean(
    pred_original_sample: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0), eq. (7), for any pair of timesteps t > t-1 (strided or not)."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    return pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample


def posterior_variance(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, the variance of q(x_{t-1} | x_t, x_0), eq. (7)."""
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t


def learned_range_log_variance(
    model_var_values: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor
) -> torch.Tensor:
    """Improved DDPM eq. (15): log Sigma = v log beta_t + (1 - v) log beta~_t with v = (output + 1) / 2."""
    frac = (model_var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


# ---------------------------------------------------------------------------------------------------------------
# Likelihood terms (nats per element); the bound in `likelihood.py` averages them over dimensions and converts.
# ---------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats (closed form)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used for the published DDPM numbers."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _log_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, without cancellation in either tail.

    Right of zero both CDFs approach 1, so use the mirrored survival functions Phi(-lower) - Phi(-upper) there.
    """
    mirrored = lower > 0
    hi = torch.where(mirrored, -lower, upper)
    lo = torch.where(mirrored, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    # log(e^a - e^b) = a + log(1 - e^(b - a)), with log1p(-exp(.)) written as log(-expm1(.)) for accuracy.
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    cdf: str = "exact",
    min_prob: float = 1e-12,
    num_bins: int = 256,
) -> torch.Tensor:
    """log p(x) per element, in nats, of a Gaussian discretized into `num_bins` bins of width 2/(num_bins-1) on [-1, 1].

    The data decoder L_0 of Ho et al. 2020, eq. (13): `x` holds bin centres (uint8 data rescaled to [-1, 1]); the
    edge bins reach to -inf and +inf; probabilities are floored at `min_prob`. `cdf="exact"` uses the exact normal
    CDF in log space; `cdf="tanh"` reproduces the research code (tanh approximation, direct differences).
    """
    if x.shape != means.shape:
        raise ValueError(f"x and means must have the same shape, got {tuple(x.shape)} and {tuple(means.shape)}")
    half_bin = 1.0 / (num_bins - 1)
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (x - means + half_bin)
    lower = inv_stdv * (x - means - half_bin)
    if cdf == "tanh":
        cdf_plus = approx_standard_normal_cdf(upper)
        cdf_min = approx_standard_normal_cdf(lower)
        log_cdf_plus = torch.log(cdf_plus.clamp(min=min_prob))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=min_prob))
        log_mid = torch.log((cdf_plus - cdf_min).clamp(min=min_prob))
    elif cdf == "exact":
        floor = math.log(min_prob) if min_prob > 0 else -math.inf
        log_cdf_plus = torch.special.log_ndtr(upper).clamp(min=floor)
        log_one_minus_cdf_min = torch.special.log_ndtr(-lower).clamp(min=floor)
        log_mid = _log_cdf_difference(upper, lower).clamp(min=floor)
    else:
        raise ValueError(f"cdf must be 'exact' or 'tanh', got {cdf!r}")
    edge = 1.0 - half_bin  # centres below -edge / above +edge are the two outermost bins
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_mid))
