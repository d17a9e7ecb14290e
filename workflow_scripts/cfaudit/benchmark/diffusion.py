"""Throughput benchmark of the diffusion stage: training images/s and SDEdit counterfactual anchors/s.

    python -m cfaudit.benchmark.diffusion                                  # the embedded config (config.yaml)
    python -m cfaudit.benchmark.diffusion --configfile presets/seed.yaml   # overlay a preset, as snakemake does
    python -m cfaudit.benchmark.diffusion --model unet2d --image-size 256 --batch-size 64 --device cuda

Random weights and random images (speed does not depend on them); the same code paths as the rules
(training step with autocast/channels_last/flips/label dropout/EMA, and ``sdedit`` with guidance and the
configured sampler). Prints model size, precision, batch sizes and device with each figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from cfaudit.benchmark.timing import timed
from cfaudit.config import load_config
from cfaudit.data.pack import uint8_to_float
from cfaudit.diffusion.checkpoint import tune_backend
from cfaudit.diffusion.samplers import make_sampler
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.diffusion.sdedit import sdedit
from cfaudit.diffusion.training import EMA, apply_flips, draw_step
from cfaudit.models import NULL_LABEL, model_from_spec, model_spec, n_parameters
from cfaudit.precision import autocast, resolve_precision

REPO_CONFIG = Path(__file__).resolve().parents[3] / "config.yaml"


def bench_training(model, schedule, cfg, image_size, batch_size, steps, warmup, device, amp_dtype, channels_last) -> float:
    """Training images/s: ``steps`` timed steps of the rule's step (after ``warmup`` untimed ones)."""
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (max(batch_size, 8), image_size, image_size, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (data.shape[0],), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ema = EMA(model, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    model.train()

    def run(n_steps: int) -> None:
        for _ in range(n_steps):
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=device)
            x0 = uint8_to_float(data[idx])
            x0 = x0.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            d = draw_step(gen, batch_size, tuple(x0.shape[1:]), cfg, schedule, device)
            x0 = apply_flips(x0, d)
            y = torch.where(d.drop, torch.full_like(labels[idx], NULL_LABEL), labels[idx])
            with autocast(device, amp_dtype):
                pred = model(schedule.q_sample(x0, d.t, d.noise), d.t, y)
            loss = F.mse_loss(pred.float(), d.noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model)

    return timed(lambda: run(steps), device, warmup=lambda: run(warmup)).rate(steps * batch_size)


def bench_counterfactuals(model, schedule, cf, image_size, batch_size, batches, device, amp_dtype, channels_last) -> float:
    """SDEdit anchors/s (both targets) over ``batches`` timed batches, after a one-anchor, two-step warm-up."""
    model.eval()
    x0 = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    seeds = list(range(batch_size))
    kw = dict(strength=cf["strength"], guidance=cf["guidance"], sampler=cf["sampler"], steps=cf["steps"],
              amp_dtype=amp_dtype, channels_last=channels_last)

    def warmup():
        sdedit(model, schedule, x0[:1], seeds[:1], **{**kw, "strength": min(cf["strength"], 2 / schedule.T)})

    def run():
        for _ in range(batches):
            sdedit(model, schedule, x0, seeds, **kw)

    return timed(run, device, warmup=warmup).rate(batches * batch_size)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cfaudit.benchmark.diffusion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", action="append", default=[], help="config overlay(s) on top of config.yaml")
    ap.add_argument("--base-config", default=str(REPO_CONFIG), help="base config (default: the repo's config.yaml)")
    ap.add_argument("--model", choices=["contextunet", "unet2d"])
    ap.add_argument("--n-feat", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int, help="training batch size")
    ap.add_argument("--cf-batch-size", type=int, help="anchors per counterfactual batch")
    ap.add_argument("--sampler", choices=["ddpm", "ddim", "dpmsolver"])
    ap.add_argument("--steps", type=int, help="ddim/dpmsolver denoising steps")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: compute.device)")
    ap.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up training steps")
    ap.add_argument("--cf-batches", type=int, default=1, help="timed counterfactual batches")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-cf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)

    config = load_config(a.base_config, *a.configfile)
    cfg = copy.deepcopy(config["diffusion"])
    cf = cfg["counterfactual"]
    for key, val in (("model", a.model), ("n_feat", a.n_feat), ("batch_size", a.batch_size), ("precision", a.precision)):
        if val is not None:
            cfg[key] = val
    for key, val in (("batch_size", a.cf_batch_size), ("sampler", a.sampler), ("steps", a.steps)):
        if val is not None:
            cf[key] = val
    image_size = a.image_size or config["image_size"]
    if a.threads:
        torch.set_num_threads(a.threads)
    req = a.device or config["compute"]["device"]
    device = torch.device("cuda" if req in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if req == "cuda" and device.type != "cuda":
        print("warning: --device cuda requested but no GPU is visible; running on the CPU", file=sys.stderr)
    tune_backend(device)
    precision, amp_dtype = resolve_precision(cfg["precision"], device)
    channels_last = bool(cfg["channels_last"])
    schedule = LinearSchedule.from_config(cfg)
    torch.manual_seed(0)
    spec = model_spec(cfg, image_size)
    model = model_from_spec(spec).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = {"arch": spec["arch"], "parameters_m": round(n_parameters(model) / 1e6, 3), "image_size": image_size,
           "device": dev_name, "precision": precision, "channels_last": channels_last, "spec": spec}
    print(f"diffusion benchmark: {spec['arch']} {out['parameters_m']:.2f} M parameters, {image_size} px, device {dev_name}, "
          f"precision {precision}{', channels_last' if channels_last else ''}, torch {torch.__version__}")
    if not a.skip_train:
        ips = bench_training(model, schedule, cfg, image_size, cfg["batch_size"], a.train_steps, a.warmup, device, amp_dtype,
                             channels_last)
        out.update(train_images_per_s=round(ips, 2), train_batch_size=cfg["batch_size"])
        print(f"training: {ips:.2f} images/s (batch {cfg['batch_size']}, {a.train_steps} timed steps, Adam"
              f"{', EMA' if cfg['ema_decay'] > 0 else ''})")
    if not a.skip_cf:
        t0 = schedule.t_start(cf["strength"])
        n_steps = len(make_sampler(cf["sampler"], schedule, cf["steps"]).timesteps(t0))
        aps = bench_counterfactuals(model, schedule, cf, image_size, cf["batch_size"], a.cf_batches, device, amp_dtype,
                                    channels_last)
        branches = 2 if cf["guidance"] else 1
        out.update(cf_anchors_per_s=round(aps, 3), cf_batch_size=cf["batch_size"], sampler=cf["sampler"],
                   denoising_steps=n_steps, guidance=cf["guidance"])
        print(f"counterfactuals: {aps:.3f} anchors/s = {2 * aps:.3f} images/s (sampler {cf['sampler']}, {n_steps} steps "
              f"from t0={t0} of T={schedule.T}, w={cf['guidance']:g}, batch {cf['batch_size']} anchors x 2 targets x "
              f"{branches} guidance branch{'es' if branches > 1 else ''})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
