"""How training timesteps are drawn: uniformly (Algorithm 1, line 3) or by importance (improved DDPM eq. 18).

A sampler returns timesteps with loss weights 1 / (T p(t)), so the weighted loss stays an unbiased estimate of
the uniform one. Samplers with a loss history are training state: the trainer checkpoints them.
"""

from __future__ import annotations

import torch


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
