"""Classifier-guided diffusion counterfactuals (DiME / FastDiME / MaskDiME style) on the trained diffusion model.

For each (anchor, target) pair, with the per-anchor noise of :mod:`cfaudit.diffusion.sdedit` (both targets and
every retry share it):

1. SDEdit start: ``x_{t0} = sqrt(abar_t0) a + sqrt(1 - abar_t0) n0`` with ``t0 = round(strength * T)``.
2. Every step t -> t' of the configured sampler (ddpm / ddim / dpmsolver, :mod:`cfaudit.diffusion.samplers`):
   classifier-free guided ``eps`` toward the target (weight ``cfg_guidance``), one-step clean estimate
   ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (clamped to [-1, 1]), and on that estimate — the UNet is
   NOT differentiated (FastDiME) — the gradient ``g`` of ``CE(clf(x0), target) + l1_weight * mean|x0 - a|``, the
   classifier's own differentiable resize taking x0 to its input size. Optionally (``consensus``) only the
   classifier-gradient components whose sign agrees with the model's class direction ``eps(y) - eps(null)`` are
   kept; ``normalize_gradient`` rescales g per image to unit RMS (``rms``) or unit largest magnitude (``max``: no
   pixel moves by more than the scale in one step).
3. The sampler's step is taken with the guided eps and its result (the sampler's mean, plus its noise for ddpm)
   is moved by ``-scale * c * g``: ``c = sqrt(abar_t')`` for ``scale_mode: fixed`` (the clean content of x_t'
   moves by -scale g) or ``c = 1 - abar_t / abar_t'`` for ``variance`` (the step's fixed_large variance Sigma;
   for ddpm exactly beta_t: DiME's ``mu - s Sigma g``).
4. Mask (optional, from step ``mask.start`` on): ``m = dilate(mean_c |x0 - r| > threshold)``; outside it
   ``x_t' = q_sample(a, t', n0)`` (the anchor's own noising path with the fixed starting noise; the anchor itself
   at the end), so the final image equals the anchor wherever the mask is 0. The reference r is the anchor
   (``mask.reference: anchor``, MaskDiME) or (``other_class``) the estimate of a second chain run alongside with
   the same start, sampler, noise and mask, CFG toward the *other* class and no classifier term (DiffEdit's
   contrast of two conditionings, Couairon et al., ICLR 2023). With ``anchor`` whatever the prior redraws
   differently from the anchor is kept — including the erasure of a small mark it cannot render; with
   ``other_class`` only what the target class and the classifier's gradient change is, the anchor elsewhere.
5. Early stop: once the classifier's score of the estimate x0 is past its threshold with ``margin`` on the target
   side, that image's classifier guidance stops; it then finishes with plain (CFG + mask) denoising, or
   (``finish: x0``) returns that estimate. With ``resume`` (finish denoise) the stopped image's estimate is still
   scored every step and guidance resumes while it is back on the source side of the threshold (hysteresis: early,
   blurry estimates may cross the threshold long before the sharp image does).
6. Projection (optional, ``project``; ACE's filter, Jeanneret et al., CVPR 2023): the guided image is noised again
   to ``round(project.strength * T)`` with fresh per-pair noise and denoised toward the target by the prior alone
   (CFG, no classifier), only inside the region it changed (channel-summed |x - a| over its per-image maximum >
   ``project.threshold``, dilated); outside, the pixels follow the anchor's noising path and end as the anchor.
   The prior thereby removes the high-frequency, off-manifold part of the change and keeps what it can render.
7. Ladder: a pair whose final (projected) 8-bit image is not on the target side of the threshold is regenerated from the
   start, same noise, with the next ``scales`` entry (and ``strengths`` entry, when listed: a deeper SDEdit
   start) and an early-stop margin wider by ``retry_margin``, up to
   ``max_retries`` times (the last attempt is kept).

The classifier's gradient is per image (losses are summed, the network is frozen, batch norm in eval mode), so a
pair's image depends only on its anchor, target, seed and scale — not on the batch, the shard or the retries of
other pairs.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cfaudit.counterfactuals import INDEX_COLUMNS, TARGETS, shard_inputs, write_shard
from cfaudit.data.pack import float_to_uint8, uint8_to_float
from cfaudit.diffusion.samplers import denoise, guided_eps, make_sampler
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.diffusion.sdedit import AnchorNoise
from cfaudit.files import write_csv
from cfaudit.models import NULL_LABEL
from cfaudit.precision import autocast
from cfaudit.runtime import derive_seed

GENERATOR = "guided"
OUTCOME_COLUMNS = ["flipped", "scale", "attempts", "guided_steps", "steps", "early_stopped", "final_score", "mask_fraction"]
log = logging.getLogger("cfaudit.guided")


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------
def check_settings(cfg: dict) -> None:
    """Refuse a ``guided:`` section that cannot work, naming the key (the schema checks types and ranges)."""
    if not cfg["scales"]:
        raise ValueError("config key 'guided.scales' must list at least one guidance scale")
    if any(s < 0 for s in cfg["scales"]):
        raise ValueError(f"config key 'guided.scales' must be non-negative, got {cfg['scales']}")
    if cfg["scale_mode"] not in ("fixed", "variance"):
        raise ValueError(f"config key 'guided.scale_mode': {cfg['scale_mode']!r} is not one of fixed, variance")
    if cfg.get("gradient_through", "x0") not in ("x0", "unet"):
        raise ValueError(f"config key 'guided.gradient_through': {cfg['gradient_through']!r} is not one of x0, unet")
    if cfg["early_stop"]["finish"] not in ("denoise", "x0"):
        raise ValueError(f"config key 'guided.early_stop.finish': {cfg['early_stop']['finish']!r} is not one of denoise, x0")


def check_margins(cfg: dict, threshold: float, score_space: str) -> None:
    """Refuse early-stop margins that the classifier's score can never pass. A softmax score lies in [0, 1], so on
    every attempt of the ladder (margin ``margin + k * retry_margin``) ``threshold ± margin`` must stay inside
    (0, 1); otherwise that attempt's early stop can never fire and its guidance silently runs every step at its
    (larger) scale. A logit score has no bound."""
    es = cfg["early_stop"]
    if score_space != "softmax":
        return
    for k in range(len(ladder_scales(cfg))):
        stop = attempt_early_stop(cfg, k)
        m = stop["margin"]
        if stop["enabled"] and (threshold + m >= 1.0 or threshold - m <= 0.0):
            raise ValueError(
                f"config keys 'guided.early_stop.margin' ({es['margin']:g}) + {k} x 'guided.early_stop.retry_margin' "
                f"({es.get('retry_margin', 0.0):g}) = {m:g}: with the classifier's threshold {threshold:g} on a softmax "
                f"score in [0, 1], attempt {k + 1} of the ladder could never stop early (it needs a score above "
                f"{threshold + m:g} or at most {threshold - m:g}); lower them so that threshold ± margin stays inside "
                "(0, 1) on every attempt (1 + guided.max_retries), or set 'guided.early_stop.on_retries: false' for "
                "retries that guide every step")


def attempt_early_stop(cfg: dict, k: int) -> dict:
    """The ``early_stop`` settings of attempt k of the ladder: its margin (:func:`ladder_margins`), and off on the
    retries (k >= 1) with ``on_retries: false`` — a retry then guides every step at its larger scale."""
    es = cfg["early_stop"]
    on = bool(es["enabled"]) and (k == 0 or bool(es.get("on_retries", True)))
    return {**es, "margin": ladder_margins(cfg)[k], "enabled": on}


def ladder_scales(cfg: dict) -> list[float]:
    """The scales actually tried: the first 1 + max_retries entries of the ladder."""
    return [float(s) for s in cfg["scales"][: 1 + int(cfg["max_retries"])]]


def ladder_strengths(cfg: dict) -> list[float]:
    """SDEdit start of each attempt: ``strengths[k]`` (the last entry beyond the list), or ``strength`` throughout."""
    listed = [float(s) for s in cfg.get("strengths") or []]
    return [listed[min(k, len(listed) - 1)] if listed else float(cfg["strength"]) for k in range(len(ladder_scales(cfg)))]


def ladder_margins(cfg: dict) -> list[float]:
    """Early-stop margin of each attempt: ``margin + k * retry_margin`` on retry k (a failed image's blurry early
    estimates may already look like the target; a wider margin on the retry makes the guidance engage)."""
    es = cfg["early_stop"]
    return [float(es["margin"]) + k * float(es.get("retry_margin", 0.0)) for k in range(len(ladder_scales(cfg)))]


def target_log_prob(logits: torch.Tensor, targets: torch.Tensor, positive_index: int) -> torch.Tensor:
    """log P(target side): log p_positive for target 1 (malignant), log(1 - p_positive) for target 0."""
    logp = torch.log_softmax(logits.float(), dim=1)
    pos = logp[:, positive_index]
    others = torch.cat([logp[:, :positive_index], logp[:, positive_index + 1:]], dim=1)
    neg = torch.logsumexp(others, dim=1)
    return torch.where(targets.bool(), pos, neg)


def on_target_side(score: torch.Tensor, targets: torch.Tensor, threshold: float, margin: float = 0.0) -> torch.Tensor:
    """True where the classifier decides the target (``score > threshold`` = malignant, as ``decide``) with a margin."""
    return torch.where(targets.bool(), score > threshold + margin, score <= threshold - margin)


def dilate(m: torch.Tensor, radius: int) -> torch.Tensor:
    """A (N,1,H,W) 0/1 mask dilated by a (2r+1)² max filter."""
    return F.max_pool2d(m, kernel_size=2 * radius + 1, stride=1, padding=radius) if radius > 0 else m


def change_mask(x0: torch.Tensor, anchor: torch.Tensor, threshold: float, dilation: int, max_fraction: float = 1.0,
                smooth: int = 0, push: torch.Tensor | None = None) -> torch.Tensor:
    """(N,1,H,W) float mask: channel-mean |x0 - anchor| > threshold, dilated by a (2r+1)² max filter.

    ``push``: also where ``x0 - push`` passes the threshold. ``smooth`` > 0: the change is first averaged over a
    (2s+1)² window (DiffEdit thresholds a smoothed, coarse difference map), so a region opens where the change is
    dense, not where isolated pixels jump. ``max_fraction`` < 1: at most that share of each image's pixels before
    dilation — the threshold is raised to the image's (1 - max_fraction) quantile of the change."""
    d = (x0 - anchor).abs().mean(dim=1, keepdim=True)
    if push is not None:
        d = torch.maximum(d, (x0 - push - anchor).abs().mean(dim=1, keepdim=True))
    if smooth > 0:
        d = F.avg_pool2d(d, kernel_size=2 * smooth + 1, stride=1, padding=smooth, count_include_pad=False)
    thr = torch.full((d.shape[0], 1, 1, 1), float(threshold), device=d.device)
    if max_fraction < 1.0:
        q = torch.quantile(d.flatten(1).float(), 1.0 - float(max_fraction), dim=1).view(-1, 1, 1, 1)
        thr = torch.maximum(thr, q)
    return dilate((d > thr).float(), dilation)


def relative_change_mask(x: torch.Tensor, anchor: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """ACE's mask: channel-summed |x - anchor| over its per-image maximum > threshold, dilated (zero where x == a)."""
    d = (x - anchor).abs().sum(dim=1, keepdim=True)
    peak = d.flatten(1).amax(1).view(-1, 1, 1, 1)
    return dilate(((d > threshold * peak) & (peak > 0)).float(), dilation)


def anchor_path(schedule: LinearSchedule, anchor: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """The anchor noised to step t with the fixed starting noise; the anchor itself at t = 0 (the clean end)."""
    return anchor if t <= 0 else schedule.q_sample(anchor, t, noise)


def shift_coefficient(schedule: LinearSchedule, t: int, t_prev: int, mode: str) -> float:
    """c in ``x_t' -= scale * c * g``: sqrt(abar_t') (fixed) or the step's variance 1 - abar_t / abar_t' (variance)."""
    ab_t = float(schedule.alpha_bar[t])
    ab_prev = float(schedule.alpha_bar[max(t_prev, 0)])
    if mode == "fixed":
        return math.sqrt(ab_prev)
    return 1.0 - ab_t / ab_prev


def shared_draw(draw):
    """A noise function whose first call draws from ``draw`` and whose later calls return that same draw: the
    guided chain and the reference chain of ``mask.reference`` take one step with the same noise."""
    drawn = []

    def once():
        if not drawn:
            drawn.append(draw())
        return drawn[0]
    return once


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k % 4 quarter turns, then a horizontal flip for k >= 4)."""
    y = torch.rot90(x, k % 4, dims=(2, 3))
    return y.flip(3) if k >= 4 else y


def eot_noise(seeds, step: int, view: int, shape, device) -> torch.Tensor:
    """Standard-normal noise of one EOT view for each pair, from the pair's own seed (not the batch's)."""
    gens = [torch.Generator().manual_seed(derive_seed(s, "eot", step, view)) for s in seeds]
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


def eot_logits(clf, x: torch.Tensor, eot: dict | None, noise_seeds, step: int, amp_dtype=None):
    """Logits of the clean view (view 0) and of the EOT views 1..views-1 (dihedral symmetry k of x plus Gaussian
    noise of std ``noise_std`` in [-1, 1] units, seeded per pair), as a list in view order.

    Expectation over transformations (Athalye et al., ICML 2018; DVCE's ``aug_num`` views, Augustin et al.
    2022): a direction that raises the target under every view is a property of the image, not of one pixel
    grid. Flips, quarter turns and noise are none of the judges' perturbations (JPEG, blur, shift)."""
    views = int((eot or {}).get("views", 1))
    std = float((eot or {}).get("noise_std", 0.0))
    out = []
    for k in range(views):
        v = x if k == 0 else dihedral(x, k % 8)
        if k and std > 0:
            v = v + std * eot_noise(noise_seeds, step, k, x.shape[1:], x.device)
        with autocast(x.device, amp_dtype):
            out.append(clf(v).float())
    return out


def cone_project(v: torch.Tensor, axis: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """DVCE's cone projection (Augustin et al., NeurIPS 2022): each image's ``v`` turned toward its ``axis`` in the
    plane the two span until the angle between them is at most ``angle_deg``; the norm of ``v`` is kept.

    A ``v`` already inside the cone is returned unchanged; one pointing exactly away from the axis (no plane) or a
    zero axis gives the axis direction (resp. ``v``). Per image: (N, ...) tensors, angle in (0, 90)."""
    vf, af = v.flatten(1).float(), axis.flatten(1).float()
    v_norm = vf.norm(dim=1, keepdim=True)
    a_norm = af.norm(dim=1, keepdim=True)
    u = af / a_norm.clamp_min(1e-30)
    along = (vf * u).sum(1, keepdim=True)
    perp = vf - along * u
    p_norm = perp.norm(dim=1, keepdim=True)
    plane = p_norm > 1e-6 * v_norm  # else v is (numerically) along the axis line: no plane to turn in
    w = perp / p_norm.clamp_min(1e-30)
    alpha = math.radians(float(angle_deg))
    rim = torch.where(plane, v_norm * (math.cos(alpha) * u + math.sin(alpha) * w), v_norm * u)
    inside = (along >= math.cos(alpha) * v_norm) | (a_norm == 0)
    return torch.where(inside, vf, rim).view_as(v).to(v.dtype)


def classifier_gradient(clf, x0: torch.Tensor, anchor: torch.Tensor, targets: torch.Tensor, *, l1_weight: float,
                        normalize: str = "none", class_direction: torch.Tensor | None = None, amp_dtype=None,
                        eot: dict | None = None, noise_seeds=None, step: int = 0, through=None, cone=None):
    """Gradient of ``CE(clf(x0), target) + l1_weight * mean|x0 - anchor|`` w.r.t. the estimate x0, and the scores.

    ``normalize``: "rms" (unit root-mean-square per image), "max" (unit largest |g| per image) or "none".
    Returns (g, score): g (N,3,H,W) float32, score (N,) in the classifier's score space (of x0, before the step).
    ``class_direction`` (eps(y) - eps(null)): keep only the classifier-gradient components agreeing with it in sign.
    ``eot`` ({views, noise_std}): the CE is averaged over views (:func:`eot_logits`); the score is view 0's.
    ``through`` = (x_t, estimate, gain): the CE is taken on ``estimate(x_t)`` (the UNet's differentiable one-step
    estimate) and differentiated w.r.t. x_t, times ``gain`` (sqrt(abar_t), so a scale means what it means for x0).
    ``cone`` = (robust model, angle): the classifier term becomes the robust model's CE gradient (one view) turned
    to within ``angle`` degrees of the audited classifier's (:func:`cone_project`), with the audited gradient's norm
    (so ``l1_weight`` weighs the same against it); the score stays the audited classifier's.
    """
    leaf = (x0 if through is None else through[0]).detach().float().requires_grad_(True)
    with torch.enable_grad():
        x = leaf if through is None else through[1](leaf)
        view_logits = eot_logits(clf, x, eot, noise_seeds, step, amp_dtype)
        logits = view_logits[0]
        ce = torch.stack([-target_log_prob(v, targets, clf.positive_index) for v in view_logits]).mean(0)
        (g_cls,) = torch.autograd.grad(ce.sum(), leaf, retain_graph=cone is not None)
        if cone is not None:
            robust, angle = cone
            with autocast(x.device, amp_dtype):
                logits_r = robust(x).float()
            (g_rob,) = torch.autograd.grad(-target_log_prob(logits_r, targets, robust.positive_index).sum(), leaf)
            norm = g_cls.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            turned = cone_project(g_rob, g_cls, angle)
            g_cls = turned * norm / turned.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
    if through is not None:
        g_cls = g_cls * float(through[2])
        x = x0
    if class_direction is not None:
        g_cls = g_cls * (torch.sign(g_cls) == torch.sign(class_direction)).float()
    n_pix = x[0].numel()
    g = g_cls + (l1_weight / n_pix) * torch.sign(x.detach().float() - anchor)
    if normalize == "rms":
        g = g / g.pow(2).flatten(1).mean(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
    elif normalize == "max":
        g = g / g.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    elif normalize != "none":
        raise ValueError(f"config key 'guided.normalize_gradient': {normalize!r} is not one of rms, max, none")
    return g.detach(), clf.score(logits.detach())


# ----------------------------------------------------------------------------------------------------------
# One attempt at one scale
# ----------------------------------------------------------------------------------------------------------
def guided_sample(model, schedule: LinearSchedule, clf, anchors: torch.Tensor, targets: torch.Tensor, seeds, cfg: dict,
                  scale: float, *, amp_dtype=None, channels_last: bool = False, trace: list | None = None, robust=None):
    """Guided counterfactuals of ``anchors`` (P,3,H,W in [-1,1]) toward ``targets`` (P,) with one guidance scale.

    ``seeds``: one noise seed per pair (pairs of one anchor share it). Returns (images (P,3,H,W) float, info dict of
    per-pair tensors: guided_steps, early_stopped, mask_fraction) and the number of denoising steps.
    ``trace`` (tests): a list that receives, per step, {t, t_prev, x (after the step), mask or None, path}.
    ``robust``: the robust auxiliary classifier of ``cone`` (required when ``cfg['cone']['enabled']``).
    """
    run = GuidedRun(model, schedule, clf, anchors, targets, seeds, cfg, scale, amp_dtype, channels_last, robust)
    x = run.x_start
    for i in range(len(run.ts)):
        x = run.step(i, x, trace)
    return run.finish(x)


class GuidedRun:
    """One :func:`guided_sample` call (steps 1-5 of the module docstring): the pairs' fixed inputs, the sampler, and
    the per-pair state that the steps update (tensors of length P on the anchors' device)."""

    def __init__(self, model, schedule: LinearSchedule, clf, anchors: torch.Tensor, targets: torch.Tensor, seeds,
                 cfg: dict, scale: float, amp_dtype=None, channels_last: bool = False, robust=None):
        self.model, self.schedule, self.clf, self.cfg, self.scale = model, schedule, clf, cfg, scale
        self.cone = None
        if cfg.get("cone", {}).get("enabled", False):
            if robust is None:
                raise ValueError("config key 'guided.cone.enabled' is true but no robust classifier was given "
                                 "(rule train_robust_classifier writes it)")
            self.cone = (robust, float(cfg["cone"]["angle"]))
        mcfg = cfg["mask"]  # threshold, dilation, cap and smoothing of every change mask of this run
        self.mask_args = (float(mcfg["threshold"]), int(mcfg["dilation"]), float(mcfg.get("max_fraction", 1.0)),
                          int(mcfg.get("smooth", 0)))
        self.amp_dtype, self.channels_last = amp_dtype, channels_last
        self.a = anchors.float()
        device = self.a.device
        self.targets = targets.to(device=device, dtype=torch.long)
        p = self.a.shape[0]
        # 1. the SDEdit start with each anchor's fixed starting noise n0 (also the anchor's path outside the mask)
        noise = AnchorNoise(seeds, self.a.shape[1:], device)
        t0 = schedule.t_start(cfg["strength"])
        self.n0 = noise.draw()
        self.x_start = schedule.q_sample(self.a, t0, self.n0)
        self.smp = make_sampler(cfg["sampler"], schedule, cfg["steps"])
        self.ts = self.smp.timesteps(t0)
        self.smp.reset()
        self.noise_fn = noise.draw if self.smp.stochastic else None
        self.mask_from = int(math.floor(float(cfg["mask"]["start"]) * len(self.ts)))
        # mask.reference other_class: a chain toward the other class without the classifier term runs alongside
        # (its own sampler state, the same start, noise and mask); the mask is where its estimate and the guided one
        # differ (DiffEdit's contrast of two conditionings)
        self.ref = None
        if cfg["mask"].get("reference", "anchor") == "other_class":
            self.ref = {"x": self.x_start.clone(), "smp": make_sampler(cfg["sampler"], schedule, cfg["steps"]),
                        "labels": 1 - self.targets}
            self.ref["smp"].reset()
        self.guide_until = int(math.ceil(float(cfg.get("guide_until", 1.0)) * len(self.ts)))  # steps that may be guided
        self.seeds = list(seeds)
        ecfg = cfg["early_stop"]
        self.resume = bool(ecfg["enabled"]) and bool(ecfg.get("resume", False)) and ecfg["finish"] == "denoise"
        self.guiding = torch.full((p,), scale > 0, dtype=torch.bool, device=device)
        self.paused = torch.zeros(p, dtype=torch.bool, device=device)  # early-stopped: target reached with the margin
        self.frozen = torch.zeros(p, dtype=torch.bool, device=device)  # finish: x0 -> image fixed at its estimate
        self.guided_steps = torch.zeros(p, dtype=torch.long, device=device)
        self.mask_frac = torch.ones(p, device=device)
        self.out = torch.empty_like(self.a)

    @torch.no_grad()
    def estimate(self, x: torch.Tensor, t: int, labels: torch.Tensor | None = None):
        """2. The CFG eps toward ``labels`` (the targets by default), the model's class direction eps(y) - eps(null)
        (``consensus`` only, else None) and the clamped one-step clean estimate x0."""
        w = float(self.cfg["cfg_guidance"])
        args = (self.amp_dtype, self.channels_last)
        labels = self.targets if labels is None else labels
        if self.cfg["consensus"]:
            e_c = guided_eps(self.model, x, t, labels, 0.0, *args)
            e_u = guided_eps(self.model, x, t, torch.full_like(labels, NULL_LABEL), 0.0, *args)
            eps, direction = (1.0 + w) * e_c - w * e_u, e_c - e_u
        else:
            eps, direction = guided_eps(self.model, x, t, labels, w, *args), None
        ab = float(self.schedule.alpha_bar[t])
        return eps, direction, ((x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)).clamp(-1.0, 1.0)

    def unet_estimate(self, t: int, idx: torch.Tensor):
        """(estimate, gain) for ``gradient_through: unet``: x_t -> the CFG one-step clean estimate of the pairs ``idx``
        with autograd through the UNet (unclamped, as DVCE's clip_denoised=False), and sqrt(abar_t)."""
        ab = float(self.schedule.alpha_bar[t])
        w, targets = float(self.cfg["cfg_guidance"]), self.targets[idx]

        def estimate(xt):
            eps = guided_eps(self.model, xt, t, targets, w, self.amp_dtype, self.channels_last)
            return (xt - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
        return estimate, math.sqrt(ab)

    def classifier_term(self, i: int, x: torch.Tensor, t: int, x0: torch.Tensor, direction, m):
        """2. + 5. The classifier gradient g on the estimate (zero for the pairs not guided this step) and the indices
        of the pairs whose classifier term was evaluated; the early stop is decided on the same scores. From step
        ``guide_until`` on, no pair is guided: the prior alone finishes the image (an unguided tail)."""
        g = torch.zeros_like(self.a)
        # pairs whose classifier term is evaluated this step: paused ones too when guidance may resume
        watch = ~self.frozen & ((self.guiding | self.paused) if self.resume else self.guiding & ~self.paused)
        idx = torch.nonzero(watch).flatten()
        if not len(idx) or i >= self.guide_until:
            return g, idx[:0]
        through = None
        if self.cfg.get("gradient_through", "x0") == "unet":
            through = (x[idx], *self.unet_estimate(t, idx))
        gi, score = classifier_gradient(self.clf, x0[idx], self.a[idx], self.targets[idx],
                                        l1_weight=float(self.cfg["l1_weight"]),
                                        normalize=str(self.cfg["normalize_gradient"]),
                                        class_direction=direction[idx] if direction is not None else None,
                                        amp_dtype=self.amp_dtype, eot=self.cfg.get("eot"),
                                        noise_seeds=[self.seeds[j] for j in idx.tolist()], step=i, through=through,
                                        cone=self.cone)
        if self.cfg["early_stop"]["enabled"]:
            on = self.early_stop(idx, score, x0, m)
            gi[~on] = 0.0
            self.guided_steps[idx[on]] += 1
        else:
            self.guided_steps[idx] += 1
        g[idx] = gi
        return g, idx

    def early_stop(self, idx: torch.Tensor, score: torch.Tensor, x0: torch.Tensor, m) -> torch.Tensor:
        """5. Pause the watched pairs ``idx`` whose estimate is past the threshold with the margin (with ``finish: x0``
        their image becomes that estimate), resume paused ones back on the source side; True where still guided."""
        ecfg, threshold, targets = self.cfg["early_stop"], self.clf.threshold, self.targets[idx]
        newly = on_target_side(score, targets, threshold, float(ecfg["margin"])) & ~self.paused[idx]
        if self.resume:  # a paused image whose estimate fell back to the source side is guided again
            back = self.paused[idx] & ~on_target_side(score, targets, threshold)
            self.paused[idx[back]] = False
        self.paused[idx[newly]] = True
        stop = idx[newly]
        if ecfg["finish"] == "x0" and len(stop):
            est = x0[stop]
            if m is not None:
                est = m[stop] * est + (1.0 - m[stop]) * self.a[stop]
                self.mask_frac[stop] = m[stop].flatten(1).mean(1)
            self.out[stop] = est
            self.frozen[stop] = True
        return ~self.paused[idx]

    def contrast_term(self, i: int, x: torch.Tensor, t: int, t_prev: int, x0: torch.Tensor, x0_r: torch.Tensor,
                      direction, masked: bool, shift: float):
        """4. + 2. with ``mask.reference: other_class``: (mask, classifier gradient, guided pairs).

        The classifier sees the image this step leads to — the estimate inside the contrast mask m0 (where it
        differs from the other class's estimate x0_r), the anchor outside — and the mask then also takes in where
        its push (the step's move ``shift * g`` of x_t', in clean-image units) moves the estimate past the
        threshold. Without that, a detail that both chains redraw alike (a small mark the prior cannot render)
        stays the anchor's for good, and a classifier that needs it gone could never have it removed."""
        m0 = change_mask(x0, x0_r, *self.mask_args) if masked else None
        seen = x0 if m0 is None else m0 * x0 + (1.0 - m0) * self.a
        g, idx = self.classifier_term(i, x, t, seen, direction, m0)
        if m0 is None or not len(idx):
            return m0, g, idx
        ab_prev = float(self.schedule.alpha_bar[t_prev]) if t_prev > 0 else 1.0
        push = shift / math.sqrt(ab_prev)
        return change_mask(x0, x0_r, *self.mask_args, push=push * g), g, idx  # m0 and where the push passes thr

    def step(self, i: int, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        """One step t -> t' of every pair: estimate, mask (4.), classifier term, the sampler's step moved by
        ``-scale * c * g`` (3.), the anchor's path outside the mask; returns x_t'. With a reference chain
        (``mask.reference: other_class``) it takes the same step toward the other class without the classifier term
        and with the same mask."""
        ts, mcfg = self.ts, self.cfg["mask"]
        t, t_prev = ts[i], (ts[i + 1] if i + 1 < len(ts) else 0)
        eps, direction, x0 = self.estimate(x, t)
        masked = bool(mcfg["enabled"]) and i >= self.mask_from
        eps_r, shift = None, self.scale * shift_coefficient(self.schedule, t, t_prev, self.cfg["scale_mode"])
        if self.ref is None:
            m = change_mask(x0, self.a, *self.mask_args) if masked else None
            g, idx = self.classifier_term(i, x, t, x0, direction, m)
        else:
            eps_r, x0_r = self.estimate(self.ref["x"], t, self.ref["labels"])[::2]
            m, g, idx = self.contrast_term(i, x, t, t_prev, x0, x0_r, direction, masked, shift)
        with torch.no_grad():
            noise_fn = shared_draw(self.noise_fn) if self.noise_fn is not None else None
            x_next = self.smp.step(x, eps, i, ts, noise_fn)
            if len(idx):
                x_next = x_next - shift * g
            xr_next = self.ref["smp"].step(self.ref["x"], eps_r, i, ts, noise_fn) if self.ref else None
            path = None
            if m is not None:
                path = anchor_path(self.schedule, self.a, t_prev, self.n0)
                x_next = m * x_next + (1.0 - m) * path
                xr_next = None if xr_next is None else m * xr_next + (1.0 - m) * path
                live = ~self.frozen
                self.mask_frac[live] = m[live].flatten(1).mean(1)
            if self.ref:
                self.ref["x"] = xr_next
        if trace is not None:
            trace.append({"t": t, "t_prev": t_prev, "x": x_next.detach().clone(), "mask": None if m is None else m.clone(),
                          "path": None if path is None else path.clone()})
        return x_next

    def finish(self, x: torch.Tensor):
        """The images (frozen pairs keep their early-stop estimate), the per-pair info and the number of steps."""
        live = ~self.frozen
        self.out[live] = x[live]
        mask_fraction = self.mask_frac if self.cfg["mask"]["enabled"] else torch.ones_like(self.mask_frac)
        info = {"guided_steps": self.guided_steps, "early_stopped": self.paused, "mask_fraction": mask_fraction}
        return self.out.clamp(-1.0, 1.0), info, len(self.ts)


@torch.no_grad()
def project(model, schedule: LinearSchedule, x: torch.Tensor, anchors: torch.Tensor, targets: torch.Tensor, seeds,
            cfg: dict, *, amp_dtype=None, channels_last: bool = False) -> torch.Tensor:
    """6. Re-noise the guided images ``x`` to ``project.strength`` and denoise them toward ``targets`` with the
    prior alone (CFG weight ``cfg_guidance``, the guided sampler with ``project.steps`` steps), inside the changed
    region only (:func:`relative_change_mask`); the anchor outside it. Each pair's noise comes from its own seed."""
    pcfg = cfg["project"]
    m = relative_change_mask(x, anchors, float(pcfg["threshold"]), int(pcfg["dilation"]))
    t_r = schedule.t_start(float(pcfg["strength"]))
    noise = AnchorNoise([derive_seed(s, "project") for s in seeds], x.shape[1:], x.device)
    n = noise.draw()
    smp = make_sampler(cfg["sampler"], schedule, int(pcfg["steps"]))
    x_t = m * schedule.q_sample(x.float(), t_r, n) + (1.0 - m) * schedule.q_sample(anchors, t_r, n)
    out = denoise(model, smp, x_t, targets, t_r, float(cfg["cfg_guidance"]), noise.draw if smp.stochastic else None,
                  amp_dtype, channels_last, keep=(m, lambda t: anchor_path(schedule, anchors, t, n)))
    return out.clamp(-1.0, 1.0)  # the anchor outside the mask: keep's last step pastes anchor_path(0) = the anchor


@torch.no_grad()
def final_scores(clf, images_uint8: np.ndarray, device, amp_dtype=None) -> torch.Tensor:
    """The classifier's score of the saved 8-bit images (what the scoring stage sees)."""
    x = uint8_to_float(torch.from_numpy(images_uint8)).to(device)
    with autocast(x.device, amp_dtype):
        logits = clf(x)
    return clf.score(logits.float())


# ----------------------------------------------------------------------------------------------------------
# The ladder: retry failures with the next scale
# ----------------------------------------------------------------------------------------------------------
def guided_ladder(model, schedule: LinearSchedule, clf, anchors: torch.Tensor, targets: torch.Tensor, seeds, cfg: dict, *,
                  amp_dtype=None, channels_last: bool = False, robust=None):
    """Counterfactuals of P pairs with retries along the scale ladder.

    Returns (uint8 images (P,H,W,3), outcome DataFrame with OUTCOME_COLUMNS, one row per pair in input order).
    """
    device = anchors.device
    p = anchors.shape[0]
    images = np.zeros((p, anchors.shape[2], anchors.shape[3], 3), dtype=np.uint8)
    rec = {k: [None] * p for k in OUTCOME_COLUMNS}
    todo = np.arange(p)
    for k, scale in enumerate(ladder_scales(cfg)):
        sel = torch.as_tensor(todo, device=device)
        cfg_k = {**cfg, "strength": ladder_strengths(cfg)[k], "early_stop": attempt_early_stop(cfg, k)}
        imgs, info, n_steps = guided_sample(model, schedule, clf, anchors[sel], targets[sel], [seeds[j] for j in todo], cfg_k,
                                            scale, amp_dtype=amp_dtype, channels_last=channels_last, robust=robust)
        if cfg.get("project", {}).get("enabled", False):
            imgs = project(model, schedule, imgs, anchors[sel].float(), targets[sel], [seeds[j] for j in todo], cfg,
                           amp_dtype=amp_dtype, channels_last=channels_last)
        u8 = float_to_uint8(imgs)
        score = final_scores(clf, u8, device, amp_dtype)
        ok = on_target_side(score, targets[sel].to(device), clf.threshold).cpu().numpy()
        for n, j in enumerate(todo):
            images[j] = u8[n]
            rec["flipped"][j] = bool(ok[n])
            rec["scale"][j] = scale
            rec["attempts"][j] = k + 1
            rec["guided_steps"][j] = int(info["guided_steps"][n])
            rec["steps"][j] = int(n_steps)
            rec["early_stopped"][j] = bool(info["early_stopped"][n])
            rec["final_score"][j] = float(score[n])
            rec["mask_fraction"][j] = round(float(info["mask_fraction"][n]), 4)
        todo = todo[~ok]
        if not len(todo):
            break
    return images, pd.DataFrame(rec, columns=OUTCOME_COLUMNS)


# ----------------------------------------------------------------------------------------------------------
# Files: one shard of the eval anchors
# ----------------------------------------------------------------------------------------------------------
def guided_settings(cfg: dict, seed: int, schedule: LinearSchedule, meta: dict, clf, robust=None) -> dict:
    """Everything that made the images, recorded in the index ``settings`` column."""
    t0 = schedule.t_start(cfg["strength"])
    steps = len(make_sampler(cfg["sampler"], schedule, cfg["steps"]).timesteps(t0))
    return {
        "method": "classifier-guided sdedit (x0-estimate gradient, FastDiME-style)", **cfg, "seed": int(seed),
        "t_start": t0, "T": schedule.T, "denoising_steps": steps, "scales_tried": ladder_scales(cfg),
        "margins_tried": ladder_margins(cfg), "strengths_tried": ladder_strengths(cfg),
        "weights": "ema" if cfg["use_ema"] else "raw", "arch": meta["spec"]["arch"], "checkpoint_sha256": meta.get("sha256", ""),
        "precision": meta.get("precision", ""), "classifier": clf.name, "classifier_sha256": clf.spec.get("sha256", ""),
        "classifier_input_size": clf.input_size, "score_space": clf.score_space, "threshold": clf.threshold,
        "noise": "per-anchor, shared by both targets and all retries",
        **({"robust_classifier": robust.name, "robust_classifier_sha256": robust.spec.get("sha256", "")} if robust else {}),
    }


def run_shard(model, schedule: LinearSchedule, meta: dict, clf, anchors: pd.DataFrame, pack_path, pack_index_path, out_dir,
              shard: int, n_shards: int, cfg: dict, seed: int, device, amp_dtype=None, channels_last: bool = False,
              generator: str = GENERATOR, robust=None):
    """Write both targets' guided counterfactuals of shard ``shard`` (:func:`cfaudit.counterfactuals.write_shard`);
    return (index DataFrame with the outcome columns, seconds)."""
    check_settings(cfg)
    ids, labels, pixels = shard_inputs(anchors, shard, n_shards, pack_path, pack_index_path, out_dir,
                                       meta["spec"]["image_size"])

    def generate(batch_pixels, seeds):
        b = len(seeds)
        x0 = uint8_to_float(torch.from_numpy(batch_pixels)).to(device)
        # pairs, target-major: [all anchors -> target 0, all anchors -> target 1]
        targets = torch.tensor(list(TARGETS), device=device, dtype=torch.long).repeat_interleave(b)
        images, outcome = guided_ladder(model, schedule, clf, x0.repeat(len(TARGETS), 1, 1, 1), targets,
                                        seeds * len(TARGETS), cfg, amp_dtype=amp_dtype, channels_last=channels_last,
                                        robust=robust)
        return [(images[k * b:(k + 1) * b], outcome.iloc[k * b:(k + 1) * b]) for k in range(len(TARGETS))]

    df, seconds = write_shard(generate, ids, labels, pixels, out_dir=out_dir, shard=shard, generator=generator,
                              settings=guided_settings(cfg, seed, schedule, meta, clf, robust), batch_size=int(cfg["batch_size"]),
                              seed=seed, batch_note=batch_note)
    if not len(df):
        df = pd.DataFrame(columns=INDEX_COLUMNS + OUTCOME_COLUMNS)
    df = df.sort_values(["target_label", "anchor_id"], kind="stable").reset_index(drop=True)
    return df[INDEX_COLUMNS + OUTCOME_COLUMNS], seconds


def batch_note(outcome: pd.DataFrame) -> str:
    """The tail of a batch's progress line: the share of its pairs on the target side and the scales used."""
    return (f"; this batch: {100 * float(outcome['flipped'].mean()):.0f}% on the target side, scales used "
            f"{outcome['scale'].value_counts().sort_index().to_dict()}")


def run_guided_shard(*, checkpoint, classifier_spec, pack, pack_index, anchors_csv, out_index, out_dir, shard: int,
                     n_shards: int, cfg: dict, seed: int, device, precision: str = "auto", channels_last: bool = False,
                     rule: str = "guided_counterfactuals", generator: str = GENERATOR, robust_spec=None) -> pd.DataFrame:
    """Entry point of rule guided_counterfactuals: load generator + classifier, write one shard's PNGs + index."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.diffusion.checkpoint import load_generator
    from cfaudit.precision import resolve_precision
    from cfaudit.provenance import now, write_provenance

    started = now()
    check_settings(cfg)
    device = torch.device(device)
    prec, amp_dtype = resolve_precision(precision, device)
    try:
        model, schedule, meta = load_generator(checkpoint, device, use_ema=bool(cfg["use_ema"]), channels_last=channels_last)
    except ValueError as err:
        raise ValueError(str(err).replace("diffusion.counterfactual.use_ema", "guided.use_ema")) from None
    meta["precision"] = prec
    clf = load_classifier(classifier_spec, device)
    check_margins(cfg, clf.threshold, clf.score_space)
    robust = load_classifier(robust_spec, device) if robust_spec else None
    anchors = pd.read_csv(anchors_csv)
    log.info("guided: %s (%s weights, step %d), s=%.3g -> t0=%d of T=%d, sampler %s (%d steps), CFG w=%g, scales %s (%s, "
             "normalized: %s), l1 %g, mask %s, consensus %s, cone %s, early stop %s; classifier %s (input %d, %s, "
             "threshold %g); %s, shard %d/%d", meta["spec"]["arch"], meta["weights"], meta["step"], cfg["strength"],
             schedule.t_start(cfg["strength"]), schedule.T, cfg["sampler"], cfg["steps"], cfg["cfg_guidance"],
             ladder_scales(cfg), cfg["scale_mode"], cfg["normalize_gradient"], cfg["l1_weight"], cfg["mask"],
             cfg["consensus"], cfg.get("cone", {}), cfg["early_stop"], clf.name, clf.input_size, clf.score_space, clf.threshold, prec, shard, n_shards)
    df, dt = run_shard(model, schedule, meta, clf, anchors, pack, pack_index, out_dir, shard, n_shards, cfg, seed, device,
                       amp_dtype=amp_dtype, channels_last=channels_last, generator=generator, robust=robust)
    write_csv(df, out_index)
    n_anchors = len(df) // len(TARGETS)
    summary = {"anchors_per_s": n_anchors / max(dt, 1e-9), "checkpoint_sha256": meta["sha256"],
               "on_target_side": float(df["flipped"].mean()) if len(df) else float("nan"),
               "mean_attempts": float(df["attempts"].mean()) if len(df) else float("nan")}
    log.info("shard %d: %d anchors x 2 targets in %.1f s (%.2f anchors/s), %.1f%% on the target side -> %s", shard,
             n_anchors, dt, summary["anchors_per_s"], 100 * summary["on_target_side"], out_index)
    write_provenance(out_index, [checkpoint, classifier_spec, *([robust_spec] if robust_spec else []), pack, pack_index,
                                 anchors_csv],
                     {"guided": cfg, "seed": seed, "precision": prec, "shard": shard, "n_shards": n_shards},
                     rule, started, summary)
    return df
