"""Training of the class-conditional noise predictor (MSE on eps, label dropout for classifier-free guidance).

GPU-ready: bf16 autocast, channels_last, the whole uint8 training pack on the device (random flips done there),
one seeded device generator for every random draw of a step (timesteps, noise, label dropout, flips) and a
per-epoch permutation derived from (seed, epoch). The resume state (model, optimizer, EMA, that generator's
state, the step, the epoch's partial loss and the loss history) is written atomically every
``checkpoint_every`` steps to results/diffusion/train_state.pt, which is not a rule output, so Snakemake does
not delete it when a killed job is rerun. A rerun with the same training inputs (config fingerprint + data
checksums) continues from that step; on the CPU it reaches exactly the weights of an uninterrupted run (on a
GPU, up to cuDNN's non-deterministic kernels).

:func:`train_diffusion` is :func:`plan_training` (settings and data checked, fingerprinted) and the named steps
of :class:`DiffusionTrainer`. The rule's entry point, which may hand the run to torchrun instead
(cfaudit.diffusion.distributed), is cfaudit.diffusion.stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch

from cfaudit.data.pack import load_pack, uint8_to_float
from cfaudit.diffusion.checkpoint import FORMAT, load_checkpoint, save_checkpoint, tune_backend
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.files import sha256_file
from cfaudit.models import NULL_LABEL, model_from_spec, model_spec, n_parameters
from cfaudit.precision import autocast, resolve_precision
from cfaudit.provenance import without_timings
from cfaudit.runtime import derive_seed

log = logging.getLogger("cfaudit.diffusion")

# Keys of the ``diffusion:`` section that change the trained weights (fingerprinted; rule params).
TRAIN_KEYS = ("model", "n_feat", "bottleneck", "unet_channels", "unet_layers_per_block", "unet_attention", "unet_norm_groups",
              "unet_dropout", "T", "beta_start", "beta_end", "epochs", "batch_size", "lr", "lr_decay", "label_dropout",
              "ema_decay", "flips", "precision", "channels_last", "seed")
LOSS_COLUMNS = ["epoch", "step", "loss", "lr", "images", "seconds"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def train_config(cfg: dict) -> dict:
    """The training part of the ``diffusion:`` section (no counterfactual or logging knobs)."""
    missing = [k for k in TRAIN_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"config section 'diffusion' lacks {missing}; validate the config (cfaudit.config.validate_config)")
    return {k: copy.deepcopy(cfg[k]) for k in TRAIN_KEYS}


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


class EMA:
    """Exponential moving average of the weights (buffers such as BatchNorm statistics are copied).

    The decay warms up as min(decay, (1 + n) / (10 + n)) so that short runs are not dominated by the init.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [p for p in self.model.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)


def _lr_at(cfg: dict, epoch: int) -> float:
    """The seed's schedule: lr * (1 - epoch / epochs), set at the start of each epoch ('linear'), or constant."""
    if cfg["lr_decay"] == "linear":
        return float(cfg["lr"]) * (1.0 - epoch / int(cfg["epochs"]))
    return float(cfg["lr"])


class StepDraws(NamedTuple):
    """Every random draw of one optimizer step, for the whole (global) batch."""

    hflip: torch.Tensor | None
    vflip: torch.Tensor | None
    drop: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor

    def part(self, sl: slice) -> "StepDraws":
        return StepDraws(*(None if v is None else v[sl] for v in self))


def draw_step(gen: torch.Generator, n: int, image_shape: tuple, tcfg: dict, schedule: LinearSchedule,
              device: torch.device) -> StepDraws:
    """The step's draws in a fixed order (flips, label dropout, timesteps, noise) for all ``n`` images of the global
    batch: every DDP rank draws the same numbers and takes its own slice, so N processes train exactly like one."""
    rand = lambda: torch.rand(n, generator=gen, device=device) < 0.5  # noqa: E731
    hflip = rand() if tcfg["flips"] in ("horizontal", "both") else None
    vflip = rand() if tcfg["flips"] == "both" else None
    drop = torch.rand(n, generator=gen, device=device) < float(tcfg["label_dropout"])
    t = schedule.sample_t(n, gen, device)
    noise = torch.randn((n, *image_shape), generator=gen, device=device)
    return StepDraws(hflip, vflip, drop, t, noise)


def apply_flips(x: torch.Tensor, draws: StepDraws) -> torch.Tensor:
    if draws.hflip is not None:
        x = torch.where(draws.hflip[:, None, None, None], x.flip(3), x)
    if draws.vflip is not None:
        x = torch.where(draws.vflip[:, None, None, None], x.flip(2), x)
    return x


def rank_slice(n: int, rank: int, world: int) -> tuple[slice, float]:
    """This rank's contiguous part of a global batch of n, and its loss weight (0 for the stand-in image a rank
    computes when n < world, so that every rank still joins the gradient all-reduce)."""
    lo, hi = rank * n // world, (rank + 1) * n // world
    return (slice(lo, hi), 1.0) if hi > lo else (slice(0, 1), 0.0)


def _place_data(images, device: torch.device) -> tuple[torch.Tensor, bool]:
    """The uint8 pack on the device when it fits comfortably (< 30 % of free GPU memory), else pinned host memory."""
    data = torch.from_numpy(images)
    if device.type != "cuda":
        return data, True
    free, _ = torch.cuda.mem_get_info(device)
    if data.numel() < 0.3 * free:
        return data.to(device), True
    log.warning("training pack (%.1f GB) does not fit comfortably on the GPU (%.1f GB free); streaming batches from "
                "pinned host memory", data.numel() / 1e9, free / 1e9)
    return data.pin_memory(), False


def fingerprint(tcfg: dict, spec: dict, seed: int, data_sha: dict, device: torch.device) -> str:
    blob = json.dumps({"train": tcfg, "spec": spec, "seed": seed, "data": data_sha, "device": device.type}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _training_images(pack, pack_index, split, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train split's uint8 images (N, H, W, 3) and 0/1 labels, checked against the configured image size."""
    images, index = load_pack(pack, pack_index, split, "train")
    if len(index) == 0:
        raise ValueError(f"no training images in {split}; check split.eval_fraction and the data stage")
    if images.shape[1] != image_size or images.shape[2] != image_size:
        raise ValueError(f"{pack} holds {images.shape[1]}x{images.shape[2]} images but image_size is {image_size}; rerun rule resize")
    labels = index["label"].astype(int).to_numpy()
    if set(labels) - {0, 1}:
        raise ValueError(f"labels in {pack_index} must be 0/1; found {sorted(set(labels))}")
    return images, labels


@dataclass(frozen=True)
class Plan:
    """What one run trains and on what: the settings, the training images, the sizes and the resume fingerprint."""

    tcfg: dict
    spec: dict
    schedule: LinearSchedule
    precision: str
    amp_dtype: torch.dtype | None
    seed: int
    image_size: int
    images: np.ndarray
    labels: np.ndarray
    batch: int
    data_sha: dict
    fingerprint: str
    device: torch.device

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def epochs(self) -> int:
        return int(self.tcfg["epochs"])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.batch)

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def channels_last(self) -> bool:
        return bool(self.tcfg["channels_last"])


def plan_training(pack, pack_index, split, cfg: dict, image_size: int, seed: int, device: torch.device) -> Plan:
    """Set-up: validate the settings and the data, and fingerprint them (a resume needs the same fingerprint)."""
    tcfg = train_config(cfg)
    precision, amp_dtype = resolve_precision(tcfg["precision"], device)
    schedule = LinearSchedule.from_config(tcfg)
    spec = model_spec(tcfg, image_size)
    images, labels = _training_images(pack, pack_index, split, image_size)
    data_sha = {"pack": sha256_file(pack), "split": sha256_file(split)}
    return Plan(tcfg, spec, schedule, precision, amp_dtype, seed, image_size, images, labels,
                min(int(tcfg["batch_size"]), len(labels)), data_sha, fingerprint(tcfg, spec, seed, data_sha, device),
                device)


def _distributed(model: torch.nn.Module, device: torch.device, world: int, main_rank: bool, arch: str):
    """(model, the DistributedDataParallel wrapper that trains it); BatchNorm synchronised over the ranks on GPUs."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and device.type == "cuda":  # batch statistics over the global batch, as on one GPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif has_bn and main_rank:
        log.warning("%s has BatchNorm layers and SyncBatchNorm needs GPUs: on %d CPU processes each normalises "
                    "over its own part of the batch, so the weights differ from a one-process run", arch, world)
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class DiffusionTrainer:
    """One run in named steps: set-up (the constructor: seeded weights, optimiser, EMA, the step generator),
    :meth:`resume`, :meth:`place` (data on the device, DDP), :meth:`run` (epochs of :meth:`train_step`, a
    :meth:`save_state` every ``checkpoint_every`` steps) and :meth:`finish`. The attributes that change (weights,
    optimiser, EMA, generator, step, the epoch's partial loss, the history) are exactly what the resume file holds.
    """

    def __init__(self, plan: Plan, state_path, *, checkpoint_every: int, log_every: int, rank: int = 0, world: int = 1):
        self.plan, self.device, self.state_path = plan, plan.device, Path(state_path)
        self.checkpoint_every, self.log_every, self.rank, self.world = checkpoint_every, log_every, rank, world
        torch.manual_seed(plan.seed)
        self.model = model_from_spec(plan.spec).to(self.device)
        if plan.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=float(plan.tcfg["lr"]))
        self.ema = EMA(self.model, plan.tcfg["ema_decay"]) if float(plan.tcfg["ema_decay"]) > 0 else None
        self.gen = torch.Generator(device=self.device).manual_seed(derive_seed(plan.seed, "train"))
        self.step, self.epoch_sum, self.epoch_n, self.history = 0, 0.0, 0, []
        self.resumed_from, self.images_seen = 0, 0

    def resume(self) -> None:
        """Continue from the resume file when it was written for this fingerprint (every rank reads the same)."""
        if not self.state_path.exists():
            return
        state = load_checkpoint(self.state_path, map_location=self.device)
        if state.get("fingerprint") != self.plan.fingerprint:
            log.warning("ignoring %s: it was written for other training settings or data (fingerprint differs); "
                        "starting from step 0", self.state_path)
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
            self.ema.updates = int(state["ema_updates"])
        self.gen.set_state(state["rng"]["train"].cpu())
        torch.set_rng_state(state["rng"]["torch_cpu"].cpu())
        if self.device.type == "cuda" and state["rng"].get("torch_cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["torch_cuda"].cpu(), self.device)
        self.step, self.epoch_sum, self.epoch_n = int(state["step"]), float(state["epoch_loss"][0]), int(state["epoch_loss"][1])
        self.history = list(state["history"])
        self.resumed_from = self.step
        log.info("resuming from %s at step %d/%d", self.state_path, self.step, self.plan.total)

    def place(self) -> None:
        """The training pack and labels on the device, the model wrapped for DDP when world > 1."""
        p = self.plan
        self.data, self.on_device = _place_data(p.images, self.device)
        self.ylab = torch.tensor(p.labels.tolist(), dtype=torch.long, device=self.device)
        if self.world > 1:
            self.model, self.net = _distributed(self.model, self.device, self.world, self.rank == 0, p.spec["arch"])
        log.info("diffusion training: %s, %.2f M parameters, %d px, %d train images (%d malignant), batch %d, %d epochs = "
                 "%d steps, T=%d, %s%s, data on %s, device %s", p.spec["arch"], n_parameters(self.model) / 1e6,
                 p.image_size, p.n, int(p.labels.sum()), p.batch, p.epochs, p.total, p.schedule.T, p.precision,
                 ", channels_last" if p.channels_last else "", self.device if self.on_device else "host (pinned)",
                 self.device if self.world == 1 else f"{self.world} x {self.device.type} (DDP)")

    def state_dict(self) -> dict:
        """The checkpoint / resume file (layout: cfaudit.diffusion.checkpoint)."""
        p, ema = self.plan, self.ema
        return {
            "format": FORMAT, "spec": p.spec, "schedule": p.schedule.as_dict(), "model": self.model.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None, "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": self.opt.state_dict(), "step": self.step, "total_steps": p.total,
            "rng": {"train": self.gen.get_state(), "torch_cpu": torch.get_rng_state(),
                    "torch_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "epoch_loss": [self.epoch_sum, self.epoch_n], "history": self.history, "fingerprint": p.fingerprint,
            "train_config": p.tcfg, "seed": p.seed, "precision": p.precision, "device": self.device.type,
            "data_sha256": p.data_sha,
        }

    def _reset_meter(self) -> None:
        self.run_sum = torch.zeros((), device=self.device)
        self.run_n, self.last_logged, self.t_log = 0, self.step, time.perf_counter()

    def flush(self) -> None:
        """Sync the running loss (one device sync), check it is finite, add it to the epoch's, log a progress line."""
        if self.run_n == 0:
            return
        if self.world > 1:
            torch.distributed.all_reduce(self.run_sum)
        s, lr = float(self.run_sum), self.opt.param_groups[0]["lr"]
        if not math.isfinite(s):
            raise NonFiniteLossError(
                f"diffusion training loss is {s} between steps {self.last_logged + 1} and {self.step} (lr {lr:.3g}, "
                f"precision {self.plan.precision}). The last good state is "
                f"{self.state_path if self.state_path.exists() else 'not saved yet'}. "
                "Lower diffusion.lr, or set diffusion.precision: fp32, and rerun (a changed setting starts a fresh run)."
            )
        self.epoch_sum += s
        self.epoch_n += self.run_n
        p, dt = self.plan, time.perf_counter() - self.t_log
        epoch = min((max(self.step, 1) - 1) // p.steps_per_epoch, p.epochs - 1)
        log.info("step %d/%d epoch %d/%d loss %.5f lr %.3g %.1f images/s", self.step, p.total, epoch + 1, p.epochs,
                 s / self.run_n, lr, self.run_n / max(dt, 1e-9))
        self._reset_meter()

    def train_step(self, idx_all: torch.Tensor) -> None:
        """One optimizer step on the global batch ``idx_all`` (this rank trains on its slice of it)."""
        p, world, n_b = self.plan, self.world, idx_all.shape[0]
        draws = draw_step(self.gen, n_b, (3, p.image_size, p.image_size), p.tcfg, p.schedule, self.device)
        sl, weight = rank_slice(n_b, self.rank, world)
        idx, draws = idx_all[sl], draws.part(sl)
        batch = self.data[idx]
        if not self.on_device:
            batch = batch.to(self.device, non_blocking=True)
        x0 = uint8_to_float(batch)
        x0 = x0.contiguous(memory_format=torch.channels_last if p.channels_last else torch.contiguous_format)
        x0 = apply_flips(x0, draws)
        y = self.ylab[idx.to(self.ylab.device)]
        y = torch.where(draws.drop, torch.full_like(y, NULL_LABEL), y)
        x_t = p.schedule.q_sample(x0, draws.t, draws.noise)
        with autocast(self.device, p.amp_dtype):
            pred = self.net(x_t, draws.t, y)
        # sum of per-image MSEs over this rank's images / global batch: DDP's mean over ranks of world x this
        # is the gradient of the global batch's mean loss (== F.mse_loss on one process)
        per_image = (pred.float() - draws.noise).pow(2).flatten(1).mean(1)
        local_sum = per_image.sum() * weight
        self.opt.zero_grad(set_to_none=True)
        (local_sum * (world / n_b)).backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.images_seen += n_b
        self.run_sum += local_sum.detach()
        self.run_n += n_b

    def save_state(self) -> None:
        """Flush the running loss (a non-finite one stops before any save), then rank 0 writes the resume file."""
        self.flush()
        if self.rank == 0:
            save_checkpoint(self.state_dict(), self.state_path)
            log.info("checkpoint at step %d -> %s", self.step, self.state_path)

    def run_epoch(self, epoch: int, on_step: Callable[[int], None] | None) -> None:
        """The epoch's remaining steps (all of them unless resumed mid-epoch); its row joins the history."""
        p = self.plan
        lr = _lr_at(p.tcfg, epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
        perm = epoch_permutation(p.seed, epoch, p.n).to(self.device if self.on_device else "cpu")
        last = p.steps_per_epoch - 1
        for b in range(self.step - epoch * p.steps_per_epoch, p.steps_per_epoch):
            self.train_step(perm[b * p.batch:(b + 1) * p.batch])
            if (self.log_every and self.step % self.log_every == 0) or b == last:
                self.flush()
            if b == last:  # epoch done: its row joins the history before any checkpoint of this step
                self.history.append({"epoch": epoch + 1, "step": self.step, "loss": self.epoch_sum / max(self.epoch_n, 1),
                                     "lr": lr, "images": self.epoch_n, "seconds": round(time.perf_counter() - self.t_epoch, 3)})
                log.info("epoch %d/%d mean loss %.5f", epoch + 1, p.epochs, self.history[-1]["loss"])
                self.epoch_sum, self.epoch_n, self.t_epoch = 0.0, 0, time.perf_counter()
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < p.total:
                self.save_state()
            if on_step is not None:
                on_step(self.step)

    def run(self, on_step: Callable[[int], None] | None = None) -> float:
        """Train the remaining epochs; returns the seconds it took."""
        self._reset_meter()
        self.t_epoch = t_train = time.perf_counter()
        self.model.train()
        for epoch in range(self.step // self.plan.steps_per_epoch, self.plan.epochs):
            self.run_epoch(epoch, on_step)
        return time.perf_counter() - t_train

    def finish(self, checkpoint_out, elapsed: float) -> dict:
        """Rank 0 writes the final checkpoint (history without timings) and drops the resume file; the summary."""
        if self.rank == 0:
            final = self.state_dict()
            final["history"] = without_timings(final["history"])
            save_checkpoint(final, checkpoint_out)
            if self.state_path.exists():
                self.state_path.unlink()
        ips = self.images_seen / elapsed if self.images_seen else float("nan")
        log.info("trained %d steps (%d this run, %.1f images/s) -> %s", self.step, self.step - self.resumed_from, ips,
                 checkpoint_out)
        return {"history": pd.DataFrame(self.history, columns=LOSS_COLUMNS), "steps": self.step,
                "resumed_from": self.resumed_from, "images_per_s": ips, "precision": self.plan.precision,
                "parameters": n_parameters(self.model), "spec": self.plan.spec, "fingerprint": self.plan.fingerprint,
                "on_device": self.on_device, "world_size": self.world}


def train_diffusion(*, pack, pack_index, split, checkpoint_out, state_path, cfg: dict, image_size: int, seed: int,
                    device, checkpoint_every: int | None = None, log_every: int | None = None,
                    on_step: Callable[[int], None] | None = None, rank: int = 0, world: int = 1) -> dict:
    """Train (or resume) and write the final checkpoint; returns a summary with the loss history.

    ``checkpoint_every`` / ``log_every`` default to the config's. ``on_step(step)`` is called after every
    optimizer step (and after any checkpoint of that step); raising in it simulates a kill. Raises
    NonFiniteLossError as soon as a logged loss is NaN/inf, before any checkpoint of the broken weights is written.
    ``rank``/``world``: this process's place in an initialised torch.distributed group (cfaudit.diffusion.distributed):
    the model is wrapped in DistributedDataParallel, each rank trains on its slice of every global batch of
    ``batch_size`` images, and only rank 0 writes files.
    """
    device = torch.device(device)
    tune_backend(device)
    checkpoint_every = int(cfg.get("checkpoint_every", 0) if checkpoint_every is None else checkpoint_every)
    log_every = int(cfg.get("log_every", 50) if log_every is None else log_every)
    plan = plan_training(pack, pack_index, split, cfg, image_size, seed, device)
    trainer = DiffusionTrainer(plan, state_path, checkpoint_every=checkpoint_every, log_every=log_every, rank=rank,
                               world=world)
    trainer.resume()
    trainer.place()
    elapsed = trainer.run(on_step)
    return trainer.finish(checkpoint_out, elapsed)
