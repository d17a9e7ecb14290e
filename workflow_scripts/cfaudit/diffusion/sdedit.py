"""SDEdit counterfactuals (the seed's method): noise each anchor to step s*T, denoise towards each target label.

Randomness is per anchor, not per batch: anchor ``a`` draws all its noise from a generator seeded with
``cfaudit.counterfactuals.anchor_seed(seed, a)``, and its benign and malignant counterfactuals share that noise
(paired: the two differ only through the label). So an anchor's images do not depend on the batch size, the shard count or
which other anchors are in its batch (BatchNorm runs in eval mode).
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from cfaudit.counterfactuals import TARGETS, shard_inputs, write_index, write_shard
from cfaudit.data.pack import float_to_uint8, uint8_to_float
from cfaudit.diffusion.samplers import denoise, make_sampler
from cfaudit.diffusion.schedule import LinearSchedule

GENERATOR = "diffusion"
log = logging.getLogger("cfaudit.diffusion")


class AnchorNoise:
    """Per-anchor generators; ``draw()`` returns one (B,3,H,W) standard-normal tensor, one slice per anchor."""

    def __init__(self, seeds, shape, device):
        self.shape, self.device = tuple(shape), torch.device(device)
        self.gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in self.gens])


@torch.no_grad()
def sdedit(model, schedule: LinearSchedule, x0: torch.Tensor, seeds, *, strength: float, guidance: float, sampler: str,
           steps: int, targets=TARGETS, amp_dtype=None, channels_last: bool = False) -> torch.Tensor:
    """Counterfactuals of anchors ``x0`` (B,3,H,W in [-1,1]) for each target: returns (len(targets), B, 3, H, W).

    x_{t0} = sqrt(alpha_bar_{t0}) x0 + sqrt(1 - alpha_bar_{t0}) eps with t0 = round(strength * T), then the
    sampler runs t0 -> 0 conditioned on the target with guidance weight ``guidance``.
    """
    b = x0.shape[0]
    k = len(targets)
    noise = AnchorNoise(seeds, x0.shape[1:], x0.device)
    t0 = schedule.t_start(strength)
    x_t = schedule.q_sample(x0.float(), t0, noise.draw())
    x = x_t.repeat(k, 1, 1, 1)  # target-major: [target 0 anchors..., target 1 anchors...]
    labels = torch.tensor(list(targets), device=x0.device, dtype=torch.long).repeat_interleave(b)
    smp = make_sampler(sampler, schedule, steps)
    noise_fn = (lambda: noise.draw().repeat(k, 1, 1, 1)) if smp.stochastic else None
    out = denoise(model, smp, x, labels, t0, guidance, noise_fn, amp_dtype, channels_last)
    return out.view(k, b, *x0.shape[1:])


def counterfactual_settings(cf: dict, seed: int, schedule: LinearSchedule, meta: dict) -> dict:
    """What made the images, recorded in the index ``settings`` column."""
    steps = len(make_sampler(cf["sampler"], schedule, cf["steps"]).timesteps(schedule.t_start(cf["strength"])))
    return {
        "method": "sdedit", "strength": cf["strength"], "t_start": schedule.t_start(cf["strength"]), "T": schedule.T,
        "guidance": cf["guidance"], "sampler": cf["sampler"], "denoising_steps": steps, "seed": int(seed),
        "weights": "ema" if cf["use_ema"] else "raw", "arch": meta["spec"]["arch"], "noise": "per-anchor, paired targets",
        "checkpoint_sha256": meta.get("sha256", ""), "precision": meta.get("precision", ""),
    }


def run_shard(model, schedule: LinearSchedule, meta: dict, anchors: pd.DataFrame, pack_path, pack_index_path, out_dir,
              shard: int, n_shards: int, cf: dict, seed: int, device, amp_dtype=None, channels_last: bool = False):
    """Write both targets' counterfactual PNGs for shard ``shard`` of ``anchors``
    (:func:`cfaudit.counterfactuals.write_shard`); return (index rows DataFrame, seconds generating)."""
    ids, labels, pixels = shard_inputs(anchors, shard, n_shards, pack_path, pack_index_path, out_dir,
                                       meta["spec"]["image_size"])

    def generate(batch_pixels, seeds):
        x0 = uint8_to_float(torch.from_numpy(batch_pixels)).to(device)
        out = sdedit(model, schedule, x0, seeds, strength=cf["strength"], guidance=cf["guidance"], sampler=cf["sampler"],
                     steps=cf["steps"], amp_dtype=amp_dtype, channels_last=channels_last)
        return [(float_to_uint8(out[k]), None) for k in range(len(TARGETS))]

    return write_shard(generate, ids, labels, pixels, out_dir=out_dir, shard=shard, generator=GENERATOR,
                       settings=counterfactual_settings(cf, seed, schedule, meta), batch_size=int(cf["batch_size"]),
                       seed=seed)


def run_counterfactual_shard(*, checkpoint, pack, pack_index, anchors_csv, out_index, out_dir, shard: int, n_shards: int,
                             cf: dict, seed: int, device, precision: str = "auto", channels_last: bool = False,
                             rule: str = "diffusion_counterfactuals") -> pd.DataFrame:
    """Entry point of rule diffusion_counterfactuals: load the generator, write one shard's PNGs + index (+ provenance)."""
    from cfaudit.diffusion.checkpoint import load_generator, tune_backend
    from cfaudit.precision import resolve_precision
    from cfaudit.provenance import now, write_provenance

    started = now()
    device = torch.device(device)
    tune_backend(device)
    prec, amp_dtype = resolve_precision(precision, device)
    model, schedule, meta = load_generator(checkpoint, device, use_ema=bool(cf["use_ema"]), channels_last=channels_last)
    meta["precision"] = prec
    anchors = pd.read_csv(anchors_csv)
    t0 = schedule.t_start(cf["strength"])
    log.info("SDEdit: %s (%s weights, step %d), s=%.3g -> t0=%d of T=%d, w=%g, sampler %s, %s, shard %d/%d",
             meta["spec"]["arch"], meta["weights"], meta["step"], cf["strength"], t0, schedule.T, cf["guidance"],
             cf["sampler"], prec, shard, n_shards)
    rows, dt = run_shard(model, schedule, meta, anchors, pack, pack_index, out_dir, shard, n_shards, cf, seed, device,
                         amp_dtype=amp_dtype, channels_last=channels_last)
    df = write_index(rows, out_index)
    n_anchors = len(rows) // 2
    log.info("shard %d: %d anchors x 2 targets in %.1f s (%.2f anchors/s) -> %s", shard, n_anchors, dt,
             n_anchors / max(dt, 1e-9), out_index)
    write_provenance(out_index, [checkpoint, pack, pack_index, anchors_csv],
                     {"diffusion.counterfactual": cf, "seed": seed, "precision": prec, "shard": shard, "n_shards": n_shards},
                     rule, started, {"anchors_per_s": n_anchors / max(dt, 1e-9), "checkpoint_sha256": meta["sha256"]})
    return df
