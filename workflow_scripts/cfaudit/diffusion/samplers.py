"""Reverse-process samplers as small objects, plus classifier-free guidance.

* ``AncestralDDPM``: the seed's sampler with the correct posterior (Ho et al. 2020, arXiv:2006.11239,
  Algorithm 2; the seed report's Eq. 3 writes alpha_bar_t where alpha_t belongs): every step t = t_start..1,
  ``x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z`` ("fixed_large"
  variance), no noise on the last step. Equal to diffusers' DDPMScheduler(variance_type="fixed_large",
  clip_sample=False) with this schedule's betas (tests/test_diffusion.py checks one step to 1e-5).
* ``DDIM``: deterministic (eta = 0) on ``steps`` evenly spaced timesteps from t_start down; the last step
  lands on the clean image (alpha_bar = 1, like diffusers' ``set_alpha_to_one``).
* ``DPMSolver``: diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M, final sigma 0) on the same
  timesteps, with this schedule's betas.

Guidance: ``eps = (1 + w) eps(x, t, y) - w eps(x, t, null)``; w = 0 skips the unconditional pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch

from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.models import NULL_LABEL
from cfaudit.precision import autocast

SAMPLERS = ("ddpm", "ddim", "dpmsolver")


def ancestral_step(schedule: LinearSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, noise: torch.Tensor | None):
    """One ancestral DDPM step t -> t-1 (posterior mean + sqrt(beta_t) z; no noise when t == 1)."""
    # Hand-written although diffusers' DDPMScheduler(variance_type="fixed_large", clip_sample=False) gives the same
    # step for t >= 2 (tests/test_diffusion.py): at t = 1, the seed's last step, diffusers would still add
    # sqrt(beta_1) z (its noise-free step is t = 0, which the seed never takes), and it rebuilds beta_t as
    # 1 - alpha_bar_t / alpha_bar_{t-1} in float32, which cancels badly at small t.
    b, a, ab = float(schedule.betas[t]), float(schedule.alphas[t]), float(schedule.alpha_bar[t])
    mean = (x_t - (b / math.sqrt(1.0 - ab)) * eps) / math.sqrt(a)
    if t > 1 and noise is not None:
        return mean + math.sqrt(b) * noise
    return mean


def ddim_step(schedule: LinearSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int):
    """Deterministic DDIM step t -> t_prev (t_prev <= 0 means the clean image, alpha_bar = 1)."""
    ab = float(schedule.alpha_bar[t])
    ab_prev = float(schedule.alpha_bar[t_prev]) if t_prev > 0 else 1.0
    x0 = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps


def spaced_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from t_start down towards 0 (exclusive), unique, descending."""
    # Not a diffusers scheduler's set_timesteps(num_inference_steps): that spaces the steps over the whole schedule
    # (T down to 0) and SDEdit pipelines then drop the first (1 - strength) share, so their first step is not the
    # step the anchor was noised to and fewer than `steps` run. Here all `steps` start exactly at t_start (DDIM
    # and, through set_timesteps(timesteps=...), DPM-Solver use this list).
    steps = max(1, min(int(steps), t_start))
    ts = np.linspace(t_start, 0, steps + 1).round().astype(int)[:-1]
    return [int(t) for t in dict.fromkeys(ts.tolist()) if t >= 1]


class AncestralDDPM:
    name, stochastic = "ddpm", True

    def __init__(self, schedule: LinearSchedule, steps: int | None = None):
        self.schedule = schedule  # every step is taken: ``steps`` does not apply (the seed's sampler)

    def timesteps(self, t_start: int) -> list[int]:
        return list(range(t_start, 0, -1))

    def reset(self):
        pass

    def step(self, x, eps, i: int, ts: list[int], noise_fn: Callable[[], torch.Tensor] | None):
        t = ts[i]
        noise = noise_fn() if (t > 1 and noise_fn is not None) else None
        return ancestral_step(self.schedule, x, eps, t, noise)


class DDIM:
    name, stochastic = "ddim", False

    def __init__(self, schedule: LinearSchedule, steps: int):
        self.schedule, self.steps = schedule, steps

    def timesteps(self, t_start: int) -> list[int]:
        return spaced_timesteps(t_start, self.steps)

    def reset(self):
        pass

    def step(self, x, eps, i: int, ts: list[int], noise_fn=None):
        t_prev = ts[i + 1] if i + 1 < len(ts) else 0
        return ddim_step(self.schedule, x, eps, ts[i], t_prev)


class DPMSolver:
    """DPM-Solver++ (2M) through diffusers, on this schedule's betas and the same spaced timesteps."""

    name, stochastic = "dpmsolver", False

    def __init__(self, schedule: LinearSchedule, steps: int, order: int = 2):
        from diffusers import DPMSolverMultistepScheduler

        self.schedule, self.steps = schedule, steps
        self.scheduler = DPMSolverMultistepScheduler(
            **schedule.diffusers_kwargs(), solver_order=order, algorithm_type="dpmsolver++", prediction_type="epsilon",
            lower_order_final=True, final_sigmas_type="zero", thresholding=False,
        )
        self._ts: list[int] | None = None

    def timesteps(self, t_start: int) -> list[int]:
        return spaced_timesteps(t_start, self.steps)

    def reset(self):
        self._ts = None

    def step(self, x, eps, i: int, ts: list[int], noise_fn=None):
        if i == 0 or self._ts != ts:
            with warnings.catch_warnings():  # diffusers 0.42 calls np.array on a tensor (numpy 2 copy= notice)
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"diffusers\.")
                self.scheduler.set_timesteps(timesteps=ts, device=x.device)
            self._ts = list(ts)
        return self.scheduler.step(eps, ts[i], x).prev_sample


def make_sampler(name: str, schedule: LinearSchedule, steps: int):
    if name == "ddpm":
        return AncestralDDPM(schedule, steps)
    if name == "ddim":
        return DDIM(schedule, steps)
    if name == "dpmsolver":
        return DPMSolver(schedule, steps)
    raise ValueError(f"config key 'diffusion.counterfactual.sampler': unknown sampler {name!r}; choose one of {SAMPLERS}")


def guided_eps(model, x: torch.Tensor, t: int, labels: torch.Tensor, guidance: float,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """Classifier-free guided noise prediction (one batched forward of cond + uncond), in float32."""
    n = x.shape[0]
    if guidance:
        xin = torch.cat([x, x])
        yin = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    else:
        xin, yin = x, labels
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    tin = torch.full((xin.shape[0],), int(t), device=x.device, dtype=torch.long)
    with autocast(x.device, amp_dtype):
        e = model(xin, tin, yin)
    e = e.float()
    if not guidance:
        return e
    return (1.0 + guidance) * e[:n] - guidance * e[n:]


@torch.no_grad()
def denoise(model, sampler, x_t: torch.Tensor, labels: torch.Tensor, t_start: int, guidance: float,
            noise_fn: Callable[[], torch.Tensor] | None = None, amp_dtype=None, channels_last: bool = False,
            keep: tuple[torch.Tensor, Callable[[int], torch.Tensor]] | None = None) -> torch.Tensor:
    """Run ``sampler`` from x_t at step t_start down to a clean image, conditioned on ``labels``.

    ``keep`` = (mask m, known(t)): inpainting (RePaint, Lugmayr et al. 2022): after every step t -> t' the pixels
    where m is 0 are replaced by ``known(t')``, a known image noised to t' (the clean image at t' = 0)."""
    ts = sampler.timesteps(t_start)
    sampler.reset()
    x = x_t.float()
    for i, t in enumerate(ts):
        eps = guided_eps(model, x, t, labels, guidance, amp_dtype, channels_last)
        x = sampler.step(x, eps, i, ts, noise_fn)
        if keep is not None:
            m, known = keep
            x = m * x + (1.0 - m) * known(ts[i + 1] if i + 1 < len(ts) else 0)
    return x
