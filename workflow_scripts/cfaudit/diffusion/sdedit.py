"""SDEdit counterfactuals (the seed's method): noise each anchor to step s*T, denoise towards each target label.

Randomness is per anchor, not per batch: anchor ``a`` draws all its noise from a generator seeded with
``anchor_seed(seed, a)``, and its benign and malignant counterfactuals share that noise (paired: the two
differ only through the label). So an anchor's images do not depend on the batch size, the shard count or
which other anchors are in its batch (BatchNorm runs in eval mode).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfaudit.counterfactuals import TARGETS, image_path, index_rows, save_png, shard_anchors, write_index
from cfaudit.data.pack import float_to_uint8, uint8_to_float
from cfaudit.diffusion.samplers import denoise, make_sampler
from cfaudit.diffusion.schedule import LinearSchedule

GENERATOR = "diffusion"
log = logging.getLogger("cfaudit.diffusion")


def anchor_seed(seed: int, anchor_id: str) -> int:
    """A stable 63-bit seed for one anchor (independent of its position, batch and shard)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{anchor_id}".encode()).digest()[:8], "little") >> 1


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


def read_anchor_pixels(pack_path, pack_index_path, anchor_ids) -> np.ndarray:
    """uint8 (N,H,W,3) of the given anchors, read from the memory-mapped pack by image id."""
    index = pd.read_csv(pack_index_path)
    row_of = dict(zip(index["image_id"].astype(str), index["row"]))
    missing = [a for a in anchor_ids if a not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} anchors are not in {pack_index_path} (e.g. {missing[:3]}); "
                         "anchors.csv and the pack come from different data runs: rerun the data stage")
    pack = np.load(pack_path, mmap_mode="r")
    return np.ascontiguousarray(pack[[row_of[a] for a in anchor_ids]])


def shard_inputs(anchors: pd.DataFrame, shard: int, n_shards: int, pack_path, pack_index_path, out_dir,
                 image_size: int) -> tuple[list[str], list[int], np.ndarray | None]:
    """Anchor ids, labels and uint8 pixels of shard ``shard`` (None when it has no anchors), with ``out_dir`` created
    and emptied of PNGs (a rerun with other anchors must not leave old images behind); the pack's image size must
    be the diffusion model's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        os.remove(stale)
    mine = shard_anchors(anchors, shard, n_shards)
    ids = mine["image_id"].astype(str).tolist()
    labels = mine["label"].astype(int).tolist()
    if not ids:
        log.warning("shard %d of %d has no anchors (%d anchors in all)", shard, n_shards, len(anchors))
        return ids, labels, None
    pixels = read_anchor_pixels(pack_path, pack_index_path, ids)
    if pixels.shape[1] != image_size:
        raise ValueError(f"the pack holds {pixels.shape[1]} px images but the diffusion checkpoint was trained at "
                         f"{image_size} px; rerun rule train_diffusion (image_size changed?)")
    return ids, labels, pixels


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
    """Write both targets' counterfactual PNGs for shard ``shard`` of ``anchors``; return (index rows, seconds generating)."""
    out_dir = Path(out_dir)
    ids, labels, pixels = shard_inputs(anchors, shard, n_shards, pack_path, pack_index_path, out_dir,
                                       meta["spec"]["image_size"])
    settings = counterfactual_settings(cf, seed, schedule, meta)
    rows = {t: [] for t in TARGETS}
    bs = int(cf["batch_size"])
    t_begin, done = time.perf_counter(), 0
    for lo in range(0, len(ids), bs):
        batch_ids = ids[lo:lo + bs]
        x0 = uint8_to_float(torch.from_numpy(pixels[lo:lo + bs])).to(device)
        seeds = [anchor_seed(seed, a) for a in batch_ids]
        out = sdedit(model, schedule, x0, seeds, strength=cf["strength"], guidance=cf["guidance"], sampler=cf["sampler"],
                     steps=cf["steps"], amp_dtype=amp_dtype, channels_last=channels_last)
        for k, target in enumerate(TARGETS):
            imgs = float_to_uint8(out[k])
            for a, img in zip(batch_ids, imgs):
                save_png(img, image_path(out_dir, a, target))
            rows[target].extend(index_rows(batch_ids, labels[lo:lo + bs], target, GENERATOR, out_dir, shard, settings))
        done += len(batch_ids)
        rate = done / max(time.perf_counter() - t_begin, 1e-9)
        log.info("shard %d: %d/%d anchors (%.2f anchors/s, %d images)", shard, done, len(ids), rate, 2 * done)
    return [r for t in TARGETS for r in rows[t]], time.perf_counter() - t_begin


def run_counterfactual_shard(*, checkpoint, pack, pack_index, anchors_csv, out_index, out_dir, shard: int, n_shards: int,
                             cf: dict, seed: int, device, precision: str = "auto", channels_last: bool = False,
                             rule: str = "diffusion_counterfactuals") -> pd.DataFrame:
    """Entry point of rule diffusion_counterfactuals: load the generator, write one shard's PNGs + index (+ provenance)."""
    from cfaudit.diffusion.checkpoint import load_generator, resolve_precision, tune_backend
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
