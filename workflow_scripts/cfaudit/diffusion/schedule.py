"""The linear beta schedule in the seed's indexing (github.com/howellx/derm_audit, after
TeaPearce/Conditional_Diffusion_MNIST script.py's ``ddpm_schedules``).

The seed (after TeaPearce's conditional-MNIST code) keeps T + 1 entries ``beta_t = b1 + (b2 - b1) t / T`` for
t = 0..T, ``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (so alpha_bar_0 = 1 - b1, not 1), trains on t drawn from
1..T and samples t = T..1. diffusers' linear schedule instead has T entries indexed 0..T-1; passing
``diffusers_kwargs()`` (num_train_timesteps = T + 1, trained_betas = these betas) makes a diffusers scheduler's
index t mean exactly the same noise level as this schedule's t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LinearSchedule:
    T: int = 400
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: torch.Tensor = field(init=False, repr=False)
    alphas: torch.Tensor = field(init=False, repr=False)
    alpha_bar: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.T < 1:
            raise ValueError(f"config key 'diffusion.T' must be >= 1, got {self.T}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < diffusion.beta_start < diffusion.beta_end < 1; got {self.beta_start}, {self.beta_end}")
        t = torch.arange(0, self.T + 1, dtype=torch.float64)
        betas = self.beta_start + (self.beta_end - self.beta_start) * t / self.T
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        object.__setattr__(self, "betas", betas.float())
        object.__setattr__(self, "alphas", alphas.float())
        object.__setattr__(self, "alpha_bar", alpha_bar.float())

    @classmethod
    def from_config(cls, cfg: dict) -> "LinearSchedule":
        return cls(int(cfg["T"]), float(cfg["beta_start"]), float(cfg["beta_end"]))

    def as_dict(self) -> dict:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def diffusers_kwargs(self) -> dict:
        """Arguments for a diffusers scheduler so that its timestep index t equals this schedule's t."""
        return {"num_train_timesteps": self.T + 1, "trained_betas": self.betas.double().tolist()}

    def _gather(self, table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=table.device).long()
        v = table[t].to(device=like.device, dtype=torch.float32)
        return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (t scalar or per sample)."""
        ab = self._gather(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps, uniform on 1..T (the seed's range)."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=device)

    def t_start(self, strength: float) -> int:
        """SDEdit's anchor step: round(strength * T), at least 1."""
        if not 0 < strength <= 1:
            raise ValueError(f"config key 'diffusion.counterfactual.strength' must be in (0, 1], got {strength}")
        return max(1, min(self.T, int(round(strength * self.T))))
