"""DDPM scheduler: the forward process, the reverse step and the training-side tables of Ho et al. 2020.

A drop-in for `diffusers.DDPMScheduler` (same config keys, defaults, timesteps, `step` outputs and random draws,
same saved `scheduler_config.json`), written on `SchedulerMixin, ConfigMixin`. It also owns the float64 tables
that the loss and the variational bound need, so the schedule is defined in one place.

Deliberate deviations from diffusers 0.42 (where diffusers is wrong), documented in the README:
- `variance_type="fixed_large_log"`: diffusers takes the square root of log(beta_t) (negative) and returns NaN;
  here the noise scale is exp(0.5 * log beta_t) = sqrt(beta_t), the same as `fixed_large`.
- `variance_type="learned"`: diffusers treats the extra output channels as a raw variance and takes its square
  root (NaN for any negative network output); here they are the log-variance, as in improved DDPM (`LEARNED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import diffusion_math as dm

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Output of `step`: x_{t-1} and the predicted x_0, both `[N, C, H, W]`."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class DiffusionTables:
    """Float64 per-timestep tables of the full T-step chain (index 0 is t = 1 of the paper)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The beta_t sequence (float32, bit-identical to diffusers) for a named schedule or explicit betas."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        # Ho et al. 2020, Sec. 4: beta_1 = 1e-4 to beta_T = 0.02, linear.
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        # Latent diffusion: linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Improved DDPM eq. (17): cosine alpha-bar, betas capped at 0.999.
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    elif beta_schedule == "sigmoid":
        # GeoDiff sigmoid schedule.
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    else:
        # diffusers raises NotImplementedError here; keep the same exception type for drop-in compatibility.
        error = NotImplementedError(
            f"{beta_schedule} is not implemented for {DDPMScheduler}: use one of 'linear', 'scaled_linear', "
            "'squaredcos_cap_v2', 'laplace', 'sigmoid', or pass trained_betas"
        )
        raise error
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Denoising diffusion probabilistic model scheduler (Ho et al. 2020), compatible with diffusers'.

    Config keys, defaults and behaviour match `diffusers.DDPMScheduler` (see the module docstring for the two
    documented deviations). Besides sampling (`set_timesteps`, `step`) and training (`add_noise`, `get_velocity`),
    it exposes the training-side maths: `q_posterior_mean_variance`, `p_mean_variance` and `predict_start`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: VarianceType = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t, float32 as in diffusers
        self.one = torch.tensor(1.0)

        # standard deviation of the initial noise distribution: x_T ~ N(0, I)
        self.init_noise_sigma = 1.0

        # setable values
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())

        self.variance_type = variance_type
        self._tables: dict[tuple[torch.device, torch.dtype], DiffusionTables] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Sampling side (diffusers API)
    # ------------------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM does not scale the model input; kept for interchangeability with other schedulers."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps of the reverse chain: `num_inference_steps` spaced by `timestep_spacing`
        (Table 2 of Lin et al. 2023), or explicit descending `timesteps`."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")

        if timesteps is not None:
            for i in range(1, len(timesteps)):
                if timesteps[i] >= timesteps[i - 1]:
                    raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[0] >= self.config.num_train_timesteps:
                raise ValueError(
                    f"`timesteps` must start before `self.config.train_timesteps`: {self.config.num_train_timesteps}."
                )
            timesteps = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise TypeError("set_timesteps needs `num_inference_steps` or `timesteps`; both were None.")
            if num_inference_steps > self.config.num_train_timesteps:
                raise ValueError(
                    f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
                    f" {self.config.num_train_timesteps} as the unet model trained with this scheduler can only handle"
                    f" maximal {self.config.num_train_timesteps} timesteps."
                )
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
            timesteps = self._spaced_timesteps(num_inference_steps)

        self.timesteps = torch.from_numpy(timesteps).to(device)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int64 timesteps for the configured `timestep_spacing`."""
        num_train_timesteps = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            step_ratio = num_train_timesteps // num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
            return timesteps + self.config.steps_offset
        if spacing == "trailing":
            step_ratio = num_train_timesteps / num_inference_steps
            return np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
        raise ValueError(
            f"{spacing} is not supported. Please make sure to choose one of 'linspace', 'leading' or 'trailing'."
        )

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep that follows `timestep` in the reverse chain (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def _alpha_prods(self, t: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(abar_t, abar_prev) for a timestep of the current chain; abar_prev = 1 after the last step."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        return alpha_prod_t, alpha_prod_t_prev

    def _get_variance(
        self,
        t: int | torch.Tensor,
        predicted_variance: torch.Tensor | None = None,
        variance_type: VarianceType | None = None,
    ) -> torch.Tensor:
        """What diffusers' `_get_variance` returns for `variance_type`: a variance, except a standard deviation
        for `fixed_small_log` and a log-variance for `fixed_large_log`, `learned` and `learned_range`."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t)
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # beta~_t, eq. (7); we take its log below, so clamp it away from 0 (it is 0 at the last step).
        variance = torch.clamp(dm.posterior_variance(alpha_prod_t, alpha_prod_t_prev), min=1e-20)

        variance_type = variance_type or self.config.variance_type
        if variance_type == "fixed_small":
            return variance
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            return dm.learned_range_log_variance(predicted_variance, torch.log(variance), torch.log(current_beta_t))
        return variance  # diffusers falls through with the posterior variance for unknown names

    def _noise_std(self, t: int | torch.Tensor, predicted_variance: torch.Tensor | None) -> torch.Tensor:
        """sigma_t of p(x_{t-1} | x_t) used to scale the step's noise."""
        value = self._get_variance(t, predicted_variance=predicted_variance)
        if self.variance_type == "fixed_small_log":
            return value  # already a standard deviation
        if self.variance_type in ("learned", "learned_range", "fixed_large_log"):
            return torch.exp(0.5 * value)  # log-variance
        return value**0.5

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Imagen): clamp x_0 to the per-image percentile s, divide by s."""
        dtype = sample.dtype
        batch_size, channels, *remaining_dims = sample.shape
        if dtype not in (torch.float32, torch.float64):
            sample = sample.float()  # quantile needs float; clamp is not implemented for CPU half
        sample = sample.reshape(batch_size, channels * np.prod(remaining_dims))
        abs_sample = sample.abs()
        s = torch.quantile(abs_sample, self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value)  # s = 1 is plain clipping to [-1, 1]
        s = s.unsqueeze(1)
        sample = torch.clamp(sample, -s, s) / s
        return sample.reshape(batch_size, channels, *remaining_dims).to(dtype)

    def _clip_or_threshold(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._threshold_sample(pred_original_sample)
        if self.config.clip_sample:
            return pred_original_sample.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_original_sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One reverse step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Algorithm 2, line 4), with the same random draws
        as diffusers for the same generator. `model_output` has C channels, or 2C with learned variances."""
        t = timestep
        model_output, predicted_variance = dm.split_model_output(model_output, sample.shape[1], self.variance_type)

        # 1. alphas, betas of the (possibly strided) pair t -> prev_t
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t)
        beta_prod_t = 1 - alpha_prod_t

        # 2. predicted x_0, eq. (15)
        pred_original_sample = dm.predict_original_sample(
            model_output, sample, alpha_prod_t, beta_prod_t, self.config.prediction_type
        )
        # 3. clip or threshold the predicted x_0
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # 4-5. posterior mean mu~_t(x_t, x_0), eq. (7)
        pred_prev_sample = dm.posterior_mean(pred_original_sample, sample, alpha_prod_t, alpha_prod_t_prev)

        # 6. add sigma_t z, z ~ N(0, I), on every step but the last one (Algorithm 2, line 3: z = 0 when the step
        # lands on x_0). diffusers tests `t > 0`, which also noises the final image when trailing spacing or
        # steps_offset >= 1 makes the last timestep positive: our one deliberate difference in `step`.
        variance = 0
        if self.previous_timestep(t) >= 0:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            variance = self._noise_std(t, predicted_variance) * variance_noise
        pred_prev_sample = pred_prev_sample + variance

        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    # ------------------------------------------------------------------------------------------------------------
    # Training side
    # ------------------------------------------------------------------------------------------------------------

    def _sqrt_alpha_terms(self, reference: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) per example, shaped to broadcast against `reference`."""
        # Keep the table on the data's device so later calls do not copy it again (as diffusers does).
        self.alphas_cumprod = self.alphas_cumprod.to(device=reference.device)
        alphas_cumprod = self.alphas_cumprod.to(dtype=reference.dtype)
        timesteps = timesteps.to(reference.device)
        sqrt_alpha_prod = dm.broadcast_to_sample(alphas_cumprod[timesteps] ** 0.5, reference)
        sqrt_one_minus_alpha_prod = dm.broadcast_to_sample((1 - alphas_cumprod[timesteps]) ** 0.5, reference)
        return sqrt_alpha_prod, sqrt_one_minus_alpha_prod

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form, eq. (4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._sqrt_alpha_terms(original_samples, timesteps)
        return dm.q_sample(original_samples, noise, sqrt_alpha_prod, sqrt_one_minus_alpha_prod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the v-prediction target (Salimans & Ho 2022)."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._sqrt_alpha_terms(sample, timesteps)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def tables(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> DiffusionTables:
        """Per-timestep tables of the full chain in float64 (then cast), as in the research code.

        Following improved-diffusion's variance table: the posterior log-variance at t = 1 (index 0), where
        beta~_1 = 0, is replaced by that of t = 2 ("clipped"); `fixed_large` uses beta~_2 at t = 1 as well.
        """
        key = (torch.device(device), dtype)
        if key not in self._tables:
            betas = self.betas.to(torch.float64)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
            post_var = dm.posterior_variance(alphas_cumprod, alphas_cumprod_prev)
            clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(post_var) > 1 else post_var
            log_betas = torch.log(torch.cat([clipped[:1], betas[1:]]))
            self._tables[key] = DiffusionTables(
                betas=betas.to(device, dtype),
                alphas_cumprod=alphas_cumprod.to(device, dtype),
                alphas_cumprod_prev=alphas_cumprod_prev.to(device, dtype),
                posterior_variance=post_var.to(device, dtype),
                posterior_log_variance_clipped=torch.log(clipped).to(device, dtype),
                log_betas=log_betas.to(device, dtype),
            )
        return self._tables[key]

    def _gather(self, table: torch.Tensor, timesteps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return dm.broadcast_to_sample(table[timesteps.to(table.device).long()], reference)

    def q_mean_variance(
        self, x_start: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0), eq. (4)."""
        tab = self.tables(x_start.device)
        abar = self._gather(tab.alphas_cumprod, timesteps, x_start)
        return abar.sqrt() * x_start, (1 - abar).expand_as(x_start), torch.log1p(-abar).expand_as(x_start)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), eq. (6)-(7), on the full chain."""
        tab = self.tables(x_t.device)
        abar = self._gather(tab.alphas_cumprod, timesteps, x_t)
        abar_prev = self._gather(tab.alphas_cumprod_prev, timesteps, x_t)
        mean = dm.posterior_mean(x_start, x_t, abar, abar_prev)
        var = self._gather(tab.posterior_variance, timesteps, x_t).expand_as(x_t)
        log_var = self._gather(tab.posterior_log_variance_clipped, timesteps, x_t).expand_as(x_t)
        return mean, var, log_var

    def split_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance part or None) of a model output for this scheduler's variance type."""
        return dm.split_model_output(model_output, sample.shape[1], self.config.variance_type)

    def model_log_variance(
        self, var_part: torch.Tensor | None, timesteps: torch.Tensor, reference: torch.Tensor
    ) -> torch.Tensor:
        """log Sigma_theta(x_t, t) of p(x_{t-1} | x_t) on the full chain, for the configured variance type."""
        tab = self.tables(reference.device)
        vtype = self.config.variance_type
        if vtype in ("fixed_small", "fixed_small_log"):
            return self._gather(tab.posterior_log_variance_clipped, timesteps, reference).expand_as(reference)
        if vtype in ("fixed_large", "fixed_large_log"):
            return self._gather(tab.log_betas, timesteps, reference).expand_as(reference)
        if vtype == "learned":
            return var_part
        if vtype == "learned_range":
            min_log = self._gather(tab.posterior_log_variance_clipped, timesteps, reference)
            max_log = self._gather(torch.log(tab.betas), timesteps, reference)
            return dm.learned_range_log_variance(var_part, min_log, max_log)
        raise ValueError(f"unknown variance_type {vtype!r}; choose one of {dm.VARIANCE_TYPES}")

    def predict_start(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, clip_denoised: bool = False
    ) -> torch.Tensor:
        """x_0 predicted from the (mean part of the) model output at full-chain timesteps, eq. (15)."""
        tab = self.tables(x_t.device)
        abar = self._gather(tab.alphas_cumprod, timesteps, x_t)
        x0 = dm.predict_original_sample(model_output, x_t, abar, 1 - abar, self.config.prediction_type)
        return self._clip_or_threshold(x0) if clip_denoised else x0

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean mu_theta (eq. 7 applied to the predicted x_0), variance, log-variance, x_0.

        `model_output` is `[N, C, H, W]`, or `[N, 2C, H, W]` for learned variances; `timesteps` index the full
        T-step chain (0-based). Returns `mean`, `variance`, `log_variance`, `pred_original_sample`.
        """
        mean_part, var_part = self.split_model_output(model_output, x_t)
        log_variance = self.model_log_variance(var_part, timesteps, x_t)
        x0 = self.predict_start(mean_part, x_t, timesteps, clip_denoised=clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, timesteps)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_original_sample": x0,
        }
