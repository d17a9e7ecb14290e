"""Training of the class-conditional noise predictor (MSE on eps, label dropout for classifier-free guidance).

GPU-ready: bf16 autocast, channels_last, the whole uint8 training pack on the device (random flips done there),
one seeded device generator for every random draw of a step (timesteps, noise, label dropout, flips) and a
per-epoch permutation derived from (seed, epoch). The resume state (model, optimizer, EMA, that generator's
state, the step, the epoch's partial loss and the loss history) is written atomically every
``checkpoint_every`` steps to results/diffusion/train_state.pt, which is not a rule output, so Snakemake does
not delete it when a killed job is rerun. A rerun with the same training inputs (config fingerprint + data
checksums) continues from that step; on the CPU it reaches exactly the weights of an uninterrupted run (on a
GPU, up to cuDNN's non-deterministic kernels).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd
import torch

from cfaudit.data.pack import load_pack, uint8_to_float
from cfaudit.diffusion.checkpoint import FORMAT, load_checkpoint, resolve_precision, save_checkpoint, tune_backend
from cfaudit.diffusion.samplers import autocast
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.files import sha256_file, write_csv
from cfaudit.models import NULL_LABEL, model_from_spec, model_spec, n_parameters
from cfaudit.provenance import without_timings

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


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()[:8], "little") >> 1


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
    main_rank = rank == 0
    tune_backend(device)
    tcfg = train_config(cfg)
    checkpoint_every = int(cfg.get("checkpoint_every", 0) if checkpoint_every is None else checkpoint_every)
    log_every = int(cfg.get("log_every", 50) if log_every is None else log_every)
    precision, amp_dtype = resolve_precision(tcfg["precision"], device)
    channels_last = bool(tcfg["channels_last"])
    schedule = LinearSchedule.from_config(tcfg)
    spec = model_spec(tcfg, image_size)

    images, index = load_pack(pack, pack_index, split, "train")
    if len(index) == 0:
        raise ValueError(f"no training images in {split}; check split.eval_fraction and the data stage")
    if images.shape[1] != image_size or images.shape[2] != image_size:
        raise ValueError(f"{pack} holds {images.shape[1]}x{images.shape[2]} images but image_size is {image_size}; rerun rule resize")
    labels = index["label"].astype(int).to_numpy()
    if set(labels) - {0, 1}:
        raise ValueError(f"labels in {pack_index} must be 0/1; found {sorted(set(labels))}")
    n = len(labels)
    bs = min(int(tcfg["batch_size"]), n)
    steps_per_epoch = math.ceil(n / bs)
    epochs = int(tcfg["epochs"])
    total = epochs * steps_per_epoch
    data_sha = {"pack": sha256_file(pack), "split": sha256_file(split)}
    fp = fingerprint(tcfg, spec, seed, data_sha, device)

    torch.manual_seed(seed)
    model = model_from_spec(spec).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=float(tcfg["lr"]))
    ema = EMA(model, tcfg["ema_decay"]) if float(tcfg["ema_decay"]) > 0 else None
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "train"))
    step, epoch_sum, epoch_n, history = 0, 0.0, 0, []

    state_path = Path(state_path)
    if state_path.exists():  # every rank resumes from the same state
        state = load_checkpoint(state_path, map_location=device)
        if state.get("fingerprint") == fp:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.model.load_state_dict(state["ema"])
                ema.updates = int(state["ema_updates"])
            gen.set_state(state["rng"]["train"].cpu())
            torch.set_rng_state(state["rng"]["torch_cpu"].cpu())
            if device.type == "cuda" and state["rng"].get("torch_cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["torch_cuda"].cpu(), device)
            step, epoch_sum, epoch_n = int(state["step"]), float(state["epoch_loss"][0]), int(state["epoch_loss"][1])
            history = list(state["history"])
            log.info("resuming from %s at step %d/%d", state_path, step, total)
        else:
            log.warning("ignoring %s: it was written for other training settings or data (fingerprint differs); "
                        "starting from step 0", state_path)
    resumed_from = step

    data, on_device = _place_data(images, device)
    ylab = torch.tensor(labels.tolist(), dtype=torch.long, device=device)
    net = model
    if world > 1:
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and device.type == "cuda":  # batch statistics over the global batch, as on one GPU
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif has_bn and main_rank:
            log.warning("%s has BatchNorm layers and SyncBatchNorm needs GPUs: on %d CPU processes each normalises "
                        "over its own part of the batch, so the weights differ from a one-process run", spec["arch"], world)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    log.info("diffusion training: %s, %.2f M parameters, %d px, %d train images (%d malignant), batch %d, %d epochs = %d "
             "steps, T=%d, %s%s, data on %s, device %s", spec["arch"], n_parameters(model) / 1e6, image_size, n,
             int(labels.sum()), bs, epochs, total, schedule.T, precision, ", channels_last" if channels_last else "",
             device if on_device else "host (pinned)", device if world == 1 else f"{world} x {device.type} (DDP)")

    def state_dict() -> dict:
        return {
            "format": FORMAT, "spec": spec, "schedule": schedule.as_dict(), "model": model.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None, "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": opt.state_dict(), "step": step, "total_steps": total,
            "rng": {"train": gen.get_state(), "torch_cpu": torch.get_rng_state(),
                    "torch_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "epoch_loss": [epoch_sum, epoch_n], "history": history, "fingerprint": fp, "train_config": tcfg,
            "seed": seed, "precision": precision, "device": device.type, "data_sha256": data_sha,
        }

    run_sum = torch.zeros((), device=device)
    run_n, last_logged, t_log = 0, step, time.perf_counter()
    t_epoch = time.perf_counter()

    def step_epoch(s: int) -> int:
        return min((max(s, 1) - 1) // steps_per_epoch, epochs - 1)

    def flush():
        """Sync the running loss (one device sync), check it is finite, log a progress line."""
        nonlocal run_sum, run_n, epoch_sum, epoch_n, last_logged, t_log
        if run_n == 0:
            return
        if world > 1:
            torch.distributed.all_reduce(run_sum)
        s = float(run_sum)
        if not math.isfinite(s):
            raise NonFiniteLossError(
                f"diffusion training loss is {s} between steps {last_logged + 1} and {step} (lr {opt.param_groups[0]['lr']:.3g}, "
                f"precision {precision}). The last good state is {state_path if state_path.exists() else 'not saved yet'}. "
                "Lower diffusion.lr, or set diffusion.precision: fp32, and rerun (a changed setting starts a fresh run)."
            )
        epoch_sum += s
        epoch_n += run_n
        dt = time.perf_counter() - t_log
        log.info("step %d/%d epoch %d/%d loss %.5f lr %.3g %.1f images/s", step, total, step_epoch(step) + 1, epochs,
                 s / run_n, opt.param_groups[0]["lr"], run_n / max(dt, 1e-9))
        run_sum = torch.zeros((), device=device)
        run_n, last_logged, t_log = 0, step, time.perf_counter()

    t_train = time.perf_counter()
    images_seen = 0
    model.train()
    for epoch in range(step // steps_per_epoch, epochs):
        lr = _lr_at(tcfg, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        perm = epoch_permutation(seed, epoch, n).to(device if on_device else "cpu")
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            idx_all = perm[b * bs:(b + 1) * bs]
            n_b = idx_all.shape[0]
            draws = draw_step(gen, n_b, (3, image_size, image_size), tcfg, schedule, device)
            sl, weight = rank_slice(n_b, rank, world)
            idx, draws = idx_all[sl], draws.part(sl)
            batch = data[idx]
            if not on_device:
                batch = batch.to(device, non_blocking=True)
            x0 = uint8_to_float(batch)
            x0 = x0.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            x0 = apply_flips(x0, draws)
            y = ylab[idx.to(ylab.device)]
            y = torch.where(draws.drop, torch.full_like(y, NULL_LABEL), y)
            x_t = schedule.q_sample(x0, draws.t, draws.noise)
            with autocast(device, amp_dtype):
                pred = net(x_t, draws.t, y)
            # sum of per-image MSEs over this rank's images / global batch: DDP's mean over ranks of world x this
            # is the gradient of the global batch's mean loss (== F.mse_loss on one process)
            per_image = (pred.float() - draws.noise).pow(2).flatten(1).mean(1)
            local_sum = per_image.sum() * weight
            opt.zero_grad(set_to_none=True)
            (local_sum * (world / n_b)).backward()
            opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
            images_seen += n_b
            run_sum += local_sum.detach()
            run_n += n_b
            if (log_every and step % log_every == 0) or b == steps_per_epoch - 1:
                flush()
            if b == steps_per_epoch - 1:  # epoch done: its row joins the history before any checkpoint of this step
                history.append({"epoch": epoch + 1, "step": step, "loss": epoch_sum / max(epoch_n, 1), "lr": lr,
                                "images": epoch_n, "seconds": round(time.perf_counter() - t_epoch, 3)})
                log.info("epoch %d/%d mean loss %.5f", epoch + 1, epochs, history[-1]["loss"])
                epoch_sum, epoch_n, t_epoch = 0.0, 0, time.perf_counter()
            if checkpoint_every and step % checkpoint_every == 0 and step < total:
                flush()
                if main_rank:
                    save_checkpoint(state_dict(), state_path)
                    log.info("checkpoint at step %d -> %s", step, state_path)
            if on_step is not None:
                on_step(step)

    elapsed = time.perf_counter() - t_train
    if main_rank:
        final = state_dict()
        final["history"] = without_timings(final["history"])
        save_checkpoint(final, checkpoint_out)
        if state_path.exists():
            state_path.unlink()
    ips = images_seen / elapsed if images_seen else float("nan")
    log.info("trained %d steps (%d this run, %.1f images/s) -> %s", step, step - resumed_from, ips, checkpoint_out)
    return {"history": pd.DataFrame(history, columns=LOSS_COLUMNS), "steps": step, "resumed_from": resumed_from,
            "images_per_s": ips, "precision": precision, "parameters": n_parameters(model), "spec": spec,
            "fingerprint": fp, "on_device": on_device, "world_size": world}


def write_loss_outputs(history: pd.DataFrame, loss_csv, loss_png, title: str = "") -> None:
    """The per-epoch loss table and the loss-curve figure (seed Figure 6: MSE on eps vs epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(history, loss_csv)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(history["epoch"], history["loss"], marker="o", ms=3, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (MSE on noise)")
    ax.set_title(title or "Diffusion training loss vs epochs")
    if len(history) and (history["loss"] > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(loss_png).with_name(f".{Path(loss_png).name}.part.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, loss_png)


def run_training(*, pack, pack_index, split, checkpoint_out, loss_csv, loss_png, cfg: dict, image_size: int, seed: int,
                 device, rule: str = "train_diffusion", on_step=None, world_size: int = 1, threads: int = 1) -> dict:
    """Entry point of rule train_diffusion: train/resume, then the loss table + figure, each with provenance.

    ``world_size`` > 1 trains with that many DDP processes under torchrun (cfaudit.diffusion.distributed).
    """
    from cfaudit.provenance import now, write_provenance

    started = now()
    state_path = Path(checkpoint_out).with_name("train_state.pt")
    kwargs = dict(pack=pack, pack_index=pack_index, split=split, checkpoint_out=checkpoint_out, state_path=state_path,
                  cfg=cfg, image_size=image_size, seed=seed)
    if world_size > 1:
        from cfaudit.diffusion.distributed import launch_training

        res = launch_training(world_size, device=device, threads=threads, **kwargs)
    else:
        res = train_diffusion(**kwargs, device=device, on_step=on_step)
    spec = res["spec"]
    title = (f"Diffusion training loss vs epochs\n({spec['arch']}, {res['parameters'] / 1e6:.2f} M parameters, "
             f"{image_size} px, T={cfg['T']})")
    write_loss_outputs(res["history"], loss_csv, loss_png, title)
    slice_ = {"diffusion": train_config(cfg), "image_size": image_size, "seed": seed}
    extra = {"training": {"steps": res["steps"], "resumed_from_step": res["resumed_from"], "precision": res["precision"],
                          "images_per_s_this_run": res["images_per_s"], "parameters": res["parameters"],
                          "fingerprint": res["fingerprint"], "data_on_device": res["on_device"],
                          "processes": res["world_size"]}}
    for out in (checkpoint_out, loss_csv, loss_png):
        write_provenance(out, [pack, pack_index, split], slice_, rule, started, extra)
    return res
