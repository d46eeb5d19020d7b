"""Training losses and the variational bound of Ho et al. 2020 (Sec. 3, eq. 5) in bits/dim.

The bound L = L_T + sum_{t>1} L_{t-1} + L_0 is computed per example from a `DDPMScheduler`, which owns the
schedule; every term here is reported in bits per dimension (nats / (C*H*W * ln 2)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import diffusion_math as dm
from .scheduling_ddpm import DDPMScheduler

LOSS_TYPES = ("simple", "hybrid", "vlb")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: `[N, ...] -> [N]`."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, C, H, W]` in 0..255 -> float `[N, C, H, W]` bin centres in [-1, 1] (x / 127.5 - 1)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be a uint8 tensor of 0..255 pixel values, got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    return images.to(torch.float64) / 127.5 - 1.0


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


# ------------------------------------------------------------------------------------------------------------------
# The bound's terms
# ------------------------------------------------------------------------------------------------------------------


def prior_bpd(scheduler: DDPMScheduler, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per example, in bits/dim. It has no learned parameters."""
    t_last = torch.full((x_start.shape[0],), len(scheduler) - 1, device=x_start.device, dtype=torch.long)
    mean, _, log_var = scheduler.q_mean_variance(x_start.to(torch.float64), t_last)
    kl = dm.normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
    return mean_flat(kl) / math.log(2.0)


def vlb_terms_bpd(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    clip_denoised: bool = False,
    cdf: str = "exact",
) -> dict[str, torch.Tensor]:
    """The bound's term L_{t-1} per example in bits/dim, for full-chain 0-based `timesteps`.

    For t > 1 (index > 0): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) of two diagonal Gaussians (eq. 5);
    for t = 1 (index 0): the discretized Gaussian decoder NLL -log p(x_0 | x_1) (eq. 13). Returns `output`
    (the term, `[N]`) and `pred_original_sample`.
    """
    x_start64, x_t64 = x_start.to(torch.float64), x_t.to(torch.float64)
    true_mean, _, true_log_var = scheduler.q_posterior_mean_variance(x_start64, x_t64, timesteps)
    out = scheduler.p_mean_variance(model_output.to(torch.float64), x_t64, timesteps, clip_denoised=clip_denoised)
    kl = mean_flat(dm.normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    decoder_nll = -mean_flat(
        dm.discretized_gaussian_log_likelihood(x_start64, out["mean"], 0.5 * out["log_variance"], cdf=cdf)
    ) / math.log(2.0)
    first = timesteps.to(kl.device) == 0
    return {"output": torch.where(first, decoder_nll, kl), "pred_original_sample": out["pred_original_sample"]}


def _stop_mean_gradient(model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """Improved DDPM Sec. 3.1: L_vlb trains only the variance, so detach the mean channels."""
    mean_part, var_part = torch.split(model_output, channels, dim=1)
    return torch.cat([mean_part.detach(), var_part], dim=1)


def training_losses(
    scheduler: DDPMScheduler,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    loss_type: str = "simple",
    vlb_weight: float = 0.001,
    x_t: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example losses `[N]` (float32) for one batch of Algorithm 1.

    - `simple`: L_simple, the MSE to the prediction target (Ho et al. eq. 14).
    - `hybrid`: L_simple + vlb_weight * T * L_t with the mean's gradient stopped in the bound term
      (improved DDPM eq. 16, lambda = 0.001); needs learned variances for the bound term to train anything.
    - `vlb`: T * L_t, an unbiased one-sample estimate of the whole bound in bits/dim.
    `x_t` (the model's input) is recomputed with the scheduler's `add_noise` when not given.
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


# ------------------------------------------------------------------------------------------------------------------
# Timestep sampling
# ------------------------------------------------------------------------------------------------------------------


class UniformSampler:
    """t ~ U{0..T-1} with unit importance weights (Algorithm 1, line 3)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch_size` timesteps and their loss weights 1 / (T p(t))."""
        w = self.weights()
        p = w / w.sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores the loss history."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling of t with p(t) proportional to sqrt(E[L_t^2]) over the last `history` losses
    (improved DDPM eq. 18), uniform until every t has a full history, mixed with `uniform_prob` of uniform."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> torch.Tensor:
        if not self.warmed_up():
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = torch.sqrt((self.loss_history**2).mean(dim=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (gathered from all ranks, so every rank keeps the same history)."""
        for t, loss in zip(timesteps.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.loss_counts[t] == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = state["loss_history"].clone().to(torch.float64)
        self.loss_counts = state["loss_counts"].clone().to(torch.long)


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """`uniform` or `importance` (loss second moment)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "importance":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"timestep_sampling must be 'uniform' or 'importance', got {name!r}")


# ------------------------------------------------------------------------------------------------------------------
# Bits/dim of uint8 images
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class BitsPerDim:
    """Per-image bound in bits/dim: `total = prior + kl + decoder`; `terms[:, i]` is L at 0-based index i
    (i = 0 the decoder L_0, i > 0 the KL L_i); for the fast estimate `stderr` is the estimate's standard error."""

    total: torch.Tensor
    prior: torch.Tensor
    kl: torch.Tensor
    decoder: torch.Tensor
    terms: torch.Tensor | None = None
    stderr: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)


def _check_images(images: torch.Tensor, batch_size: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of uint8 [N, C, H, W], got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got dtype {images.dtype} shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def bits_per_dim(
    model_fn: ModelFn,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clip_denoised: bool | None = None,
    cdf: str = "exact",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> BitsPerDim:
    """The full variational bound (Ho et al. eq. 5) of uint8 `images` `[N, C, H, W]`, per image, in bits/dim.

    Runs `model_fn(x_t, t) -> model_output` at all T timesteps. `noise[t]` (`[T, N, C, H, W]`, optional) is the
    eps drawn for 0-based timestep t; otherwise it is drawn from `generator`. `clip_denoised` defaults to the
    scheduler's `clip_sample` (the bound of the sampler you run). Returns `BitsPerDim` with `terms` `[N, T]`.
    """
    _check_images(images, batch_size)
    num_timesteps = len(scheduler)
    n = images.shape[0]
    if noise is not None and tuple(noise.shape) != (num_timesteps, *images.shape):
        raise ValueError(
            f"noise must have shape {(num_timesteps, *images.shape)} [T, N, C, H, W], got {tuple(noise.shape)}"
        )
    if clip_denoised is None:
        clip_denoised = bool(scheduler.config.clip_sample)
    device = torch.device(device) if device is not None else images.device
    terms = torch.zeros(n, num_timesteps, dtype=torch.float64)
    prior = torch.zeros(n, dtype=torch.float64)
    bar = tqdm(total=n * num_timesteps, desc="bits/dim", unit="step", disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x_start = uint8_to_model_range(images[start:stop]).to(device)
        x_start_model = x_start.float()
        for t in range(num_timesteps - 1, -1, -1):
            timesteps = torch.full((stop - start,), t, device=device, dtype=torch.long)
            if noise is not None:
                eps = noise[t, start:stop].to(device=device, dtype=torch.float32)
            else:
                eps = torch.randn(x_start_model.shape, generator=generator, dtype=torch.float32).to(device)
            x_t = scheduler.add_noise(x_start_model, eps, timesteps)
            model_output = model_fn(x_t, timesteps)
            out = vlb_terms_bpd(scheduler, model_output, x_start, x_t, timesteps, clip_denoised, cdf)
            terms[start:stop, t] = out["output"].cpu()
            bar.update(stop - start)
        prior[start:stop] = prior_bpd(scheduler, x_start).cpu()
    bar.close()
    kl = terms[:, 1:].sum(dim=1)
    decoder = terms[:, 0]
    return BitsPerDim(total=prior + kl + decoder, prior=prior, kl=kl, decoder=decoder, terms=terms)


@torch.no_grad()
def bits_per_dim_estimate(
    model_fn: ModelFn,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    num_samples: int = 32,
    num_exact: int = 10,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    clip_denoised: bool | None = None,
    cdf: str = "exact",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> BitsPerDim:
    """A fast unbiased estimate of `bits_per_dim` for evaluation during training.

    The prior, the decoder L_0 and the first `num_exact` KL terms (where most of the bound sits: L_1 alone is
    often a sixth of it) are computed exactly; the remaining KL terms are estimated by stratified sampling, one
    uniform timestep per image in each of `num_samples` equal strata, scaled by the stratum sizes (unbiased).
    `stderr` treats the strata as independent draws of the sum, which overstates the true error.
    """
    _check_images(images, batch_size)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a standard error, got {num_samples}")
    num_timesteps = len(scheduler)
    if clip_denoised is None:
        clip_denoised = bool(scheduler.config.clip_sample)
    device = torch.device(device) if device is not None else images.device
    n = images.shape[0]
    exact_stop = min(num_timesteps, 1 + max(num_exact, 0))  # exact terms at 0-based indices [0, exact_stop)
    edges = torch.linspace(exact_stop, num_timesteps, num_samples + 1).floor().long()
    edges = torch.unique_consecutive(edges)
    kl_exact = torch.zeros(n, dtype=torch.float64)
    kl_rest = torch.zeros(n, dtype=torch.float64)
    kl_se = torch.zeros(n, dtype=torch.float64)
    decoder = torch.zeros(n, dtype=torch.float64)
    prior = torch.zeros(n, dtype=torch.float64)

    def term(x_start: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(x_start.shape, generator=generator, dtype=torch.float32).to(device)
        x_t = scheduler.add_noise(x_start.float(), eps, t)
        return vlb_terms_bpd(scheduler, model_fn(x_t, t), x_start, x_t, t, clip_denoised, cdf)["output"].cpu()

    for start in tqdm(range(0, n, batch_size), desc="bits/dim (estimate)", disable=not progress):
        stop = min(start + batch_size, n)
        x_start = uint8_to_model_range(images[start:stop]).to(device)
        m = stop - start
        decoder[start:stop] = term(x_start, torch.zeros(m, dtype=torch.long, device=device))
        for t in range(1, exact_stop):
            kl_exact[start:stop] += term(x_start, torch.full((m,), t, dtype=torch.long, device=device))
        if len(edges) > 1:
            sums = []
            for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
                t = torch.randint(lo, hi, (m,), generator=generator).to(device)
                sums.append(term(x_start, t) * (hi - lo))
            strata = torch.stack(sums, dim=1)  # [m, K]: each column estimates its stratum's sum
            k = strata.shape[1]
            kl_rest[start:stop] = strata.sum(dim=1)
            if k > 1:
                kl_se[start:stop] = (strata * k).std(dim=1) / math.sqrt(k)
        prior[start:stop] = prior_bpd(scheduler, x_start).cpu()
    kl = kl_exact + kl_rest
    return BitsPerDim(total=prior + kl + decoder, prior=prior, kl=kl, decoder=decoder, stderr=kl_se)
