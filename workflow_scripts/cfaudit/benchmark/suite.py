"""The project's performance benchmark: every figure of the performance targets in one run (``python -m
cfaudit.benchmark``, see :mod:`cfaudit.benchmark`), printed and appended to BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfaudit.benchmark.demo import rule_table, run_demo
from cfaudit.benchmark.scoring import benchmark_paths
from cfaudit.benchmark.timing import timed

REPO = Path(__file__).resolve().parents[3]
RESULTS_FILE = REPO / "BENCHMARKS.md"
# Targets of the performance issue (GPU figures) and of the CPU demo.
TARGETS = {"train_seed_best": ">= 460 img/s (40 % of bf16 peak)", "train_unet64m": "> 158 img/s",
           "cf_fast": ">= 20 anchors/s", "score": ">= 3000 img/s", "fid_features": ">= 3000 img/s",
           "demo_wall": "<= 600 s", "demo_peak_rss": "<= 4096 MB"}


def measured_peak_flops(device: torch.device, quick: bool) -> tuple[float, str]:
    """FLOP/s of a square matmul (8192 bf16 on a GPU; 2048 fp32 on the CPU, 256 with --quick)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else (256 if quick else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else (3 if quick else 8)
    sec = timed(lambda: [a @ b for _ in range(reps)], device).seconds
    return 2 * n**3 * reps / sec, f"{n}^3 {str(dtype).removeprefix('torch.')} matmul"


def forward_flops(model, x, t, y) -> int:
    """Model FLOPs of one forward pass (FlopCounterMode: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return int(counter.get_total_flops())


def bench_train(arch_cfg: dict, image_size: int, batch: int, precision: str, compile_: bool, steps: int,
                device: torch.device, peak: float) -> dict:
    """Training img/s of one model setting (cfaudit.benchmark.diffusion.bench_training: the rule's step), FLOPs, MFU."""
    from cfaudit.config import validate_config
    from cfaudit.benchmark.diffusion import bench_training
    from cfaudit.diffusion.checkpoint import tune_backend
    from cfaudit.diffusion.schedule import LinearSchedule
    from cfaudit.models import NULL_LABEL, model_from_spec, model_spec, n_parameters
    from cfaudit.precision import resolve_precision

    cfg = validate_config({"diffusion": {**arch_cfg, "precision": precision, "channels_last": precision == "bf16",
                                         "ema_decay": 0.0, "batch_size": batch}})["diffusion"]
    tune_backend(device)
    _, amp = resolve_precision(precision, device)
    torch.manual_seed(0)
    model = model_from_spec(model_spec(cfg, image_size)).to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    probe = (torch.zeros(1, 3, image_size, image_size, device=device), torch.tensor([1], device=device),
             torch.tensor([NULL_LABEL], device=device))
    fwd = forward_flops(model, *probe)
    runner = torch.compile(model) if compile_ else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.perf_counter()
    ips = bench_training(runner, LinearSchedule.from_config(cfg), cfg, image_size, batch, steps, 3 if compile_ else 2,
                         device, amp, cfg["channels_last"])
    out = {"params_m": round(n_parameters(model) / 1e6, 2), "image_size": image_size, "batch": batch,
           "precision": precision + (", channels_last" if cfg["channels_last"] else "") + (", compile" if compile_ else ""),
           "value": round(ips, 2), "unit": "img/s", "gflops_fwd_per_img": round(fwd / 1e9, 2), "flops_fwd_per_img": fwd,
           "mfu": round(ips * 3 * fwd / peak, 5)}
    if compile_:
        out["note"] = f"incl. warm-up/compile {time.perf_counter() - t_compile:.0f} s"
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return out


def data_path_share(image_size: int, batch: int, n_pack: int, device: torch.device, step_seconds: float) -> float:
    """Seconds of the training data path per step (pack indexing, uint8 -> float, flips, all random draws) over a
    whole step's seconds."""
    from cfaudit.config import validate_config
    from cfaudit.data.pack import uint8_to_float
    from cfaudit.diffusion.schedule import LinearSchedule
    from cfaudit.diffusion.training import apply_flips, draw_step

    cfg = validate_config({"diffusion": {"flips": "both", "label_dropout": 0.1}})["diffusion"]
    schedule = LinearSchedule.from_config(cfg)
    data = torch.randint(0, 256, (n_pack, image_size, image_size, 3), dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    perm = torch.randperm(n_pack, device=device)

    def one():
        idx = perm[:batch]
        d = draw_step(gen, batch, (3, image_size, image_size), cfg, schedule, device)
        x = apply_flips(uint8_to_float(data[idx]).contiguous(memory_format=torch.channels_last), d)
        schedule.q_sample(x, d.t, d.noise)

    sec = timed(lambda: [one() for _ in range(10)], device).seconds / 10
    return sec / step_seconds


def bench_cf(arch_cfg: dict, image_size: int, n_anchors: int, sampler: str, steps: int, strength: float, precision: str,
             device: torch.device) -> dict:
    """SDEdit counterfactual anchors/s (both targets, CFG w=10): the rule's sdedit() on random weights."""
    from cfaudit.config import validate_config
    from cfaudit.diffusion.samplers import make_sampler
    from cfaudit.diffusion.schedule import LinearSchedule
    from cfaudit.diffusion.sdedit import sdedit
    from cfaudit.models import model_from_spec, model_spec, n_parameters
    from cfaudit.precision import resolve_precision

    cfg = validate_config({"diffusion": dict(arch_cfg)})["diffusion"]
    schedule = LinearSchedule.from_config(cfg)
    _, amp = resolve_precision(precision, device)
    cl = precision == "bf16"
    torch.manual_seed(0)
    model = model_from_spec(model_spec(cfg, image_size)).to(device).eval()
    if cl:
        model.to(memory_format=torch.channels_last)
    x0 = torch.rand(n_anchors, 3, image_size, image_size, device=device) * 2 - 1
    n_steps = len(make_sampler(sampler, schedule, steps).timesteps(schedule.t_start(strength)))
    sec = timed(lambda: sdedit(model, schedule, x0, list(range(n_anchors)), strength=strength, guidance=10.0,
                               sampler=sampler, steps=steps, amp_dtype=amp, channels_last=cl), device).seconds
    return {"params_m": round(n_parameters(model) / 1e6, 2), "image_size": image_size, "batch": n_anchors,
            "precision": precision, "value": round(n_anchors / sec, 3), "unit": "anchors/s",
            "note": f"{sampler} {n_steps} steps from s={strength}, 2 targets x 2 CFG branches; {sec / n_anchors:.3f} s/anchor"}


def bench_score(paths: list[str], batch: int, device: torch.device, workers: int) -> dict:
    """Images/s of DeepDerm scoring at 299 (cfaudit.benchmark.scoring.benchmark: decode + resize + forward) on ``paths``."""
    from cfaudit.classifiers import build_deepderm
    from cfaudit.models import n_parameters
    from cfaudit.benchmark.scoring import benchmark as score_benchmark

    bf16 = device.type == "cuda"
    r = score_benchmark(len(paths), 256, "deepderm", batch, str(device), workers, "torch" if bf16 else "pil",
                        str(Path(paths[0]).parent), bf16, repeats=2)
    return {"params_m": round(n_parameters(build_deepderm()) / 1e6, 2), "image_size": 299, "batch": batch,
            "precision": "bf16" if bf16 else "fp32", "value": r["images_per_s"], "unit": "img/s",
            "note": f"DeepDerm Inception-v3, {r['backend']} resize, {workers} decode threads"}


def bench_fid_features(paths: list[str], batch: int, device: torch.device, workers: int) -> dict:
    """pytorch-fid's InceptionV3 (pool3, random weights in its real layout) on decoded images: the same
    decode-ahead batching as scoring (cfaudit.scoring.decode_ahead), the resize to 299 inside pytorch-fid's model."""
    from cfaudit.fid import fid_inception, fid_inception_net, weights_target
    from cfaudit.models import n_parameters
    from cfaudit.precision import autocast, resolve_precision
    from cfaudit.scoring import decode_ahead, load_raw

    with tempfile.TemporaryDirectory() as home:
        target = weights_target(home)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(fid_inception_net().state_dict(), target)  # the real layout; speed does not depend on weights
        model = fid_inception(home, 2048, device)
    precision, amp = resolve_precision("auto", device)

    def run():
        for _, arrays in decode_ahead(paths, batch, load_raw, workers):
            x = torch.from_numpy(np.stack(arrays)).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            with torch.no_grad(), autocast(device, amp):
                model(x)

    sec = timed(run, device).seconds
    return {"params_m": round(n_parameters(model) / 1e6, 2), "image_size": 299, "batch": batch,
            "precision": precision, "value": round(len(paths) / sec, 2), "unit": "img/s",
            "note": f"pytorch-fid InceptionV3 pool3, {workers} decode threads"}


# ------------------------------------------------------------------------------------------------------- report

def environment(device: torch.device) -> dict:
    from cfaudit.provenance import code_version

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": name,
            "torch": torch.__version__, "code": code_version(), "host": platform.node()}


def markdown(env: dict, rows: list[dict], rules: pd.DataFrame | None) -> str:
    lines = [f"## {env['date']} — {env['device']}", "",
             f"torch {env['torch']}, code {(env['code'].get('commit') or '?')[:12]}{' (dirty)' if env['code'].get('dirty') else ''}, "
             f"host {env['host']}", "",
             "| figure | value | unit | target | precision | batch | params (M) | px | GFLOPs fwd/img | MFU | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else ""
        lines.append(f"| {r['figure']} | {r['value']} | {r['unit']} | {r.get('target', '')} | {r.get('precision', '')} "
                     f"| {r.get('batch', '')} | {r.get('params_m', '')} | {r.get('image_size', '')} | "
                     f"{r.get('gflops_fwd_per_img', '')} | {mfu} | {r.get('note', '')} |")
    if rules is not None:
        lines += ["", "Per rule (Snakemake `benchmark:` files; shards summed):", "",
                  "| rule | jobs | wall s | CPU s | max RSS MB |", "|---|---|---|---|---|"]
        lines += [f"| {r.rule} | {r.jobs} | {r.wall_s} | {r.cpu_s} | {r.max_rss_mb} |" for r in rules.itertuples()]
    return "\n".join(lines) + "\n\n"


def run(a) -> tuple[dict, list[dict], pd.DataFrame | None]:
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu, q = device.type == "cuda", a.quick
    env = environment(device)
    rows: list[dict] = []

    def add(figure, res):
        # the GPU targets are stated for an H100/H200 at full size; the demo's for 2 CPU cores
        if figure in TARGETS and ((gpu and not q) or figure.startswith("demo")):
            res = {**res, "target": TARGETS[figure]}
        rows.append({"figure": figure, **res})
        print(f"{figure:>18}: {res['value']} {res['unit']}  " + ", ".join(f"{k}={v}" for k, v in res.items()
                                                                          if k not in ("value", "unit")), flush=True)

    print(f"cfaudit benchmark on {env['device']}, torch {env['torch']}, {env['date']}", flush=True)
    peak, how = measured_peak_flops(device, q)
    add("peak", {"value": round(peak / 1e12, 3), "unit": "TFLOP/s", "flop_per_s": peak, "note": how})
    # the seed's ContextUnet (n_feat 128, 256 px) on a GPU; a CPU-sized stand-in (n_feat 32, 64 px) otherwise
    seed = {"model": "contextunet", "n_feat": 16 if q else (128 if gpu else 32)}
    px = 32 if q else (256 if gpu else 64)
    steps = 2 if q else (20 if gpu else 3)
    if not a.skip_train:
        base = bench_train(seed, px, 2 if q else 8, "fp32", False, steps, device, peak)
        add("train_seed_fp32", base)
        fast = [bench_train(seed, px, 4 if q else (64 if gpu else 16), "bf16" if gpu else "fp32", False, steps, device, peak)]
        if gpu and not a.no_compile:
            fast.append(bench_train(seed, px, 64, "bf16", True, steps, device, peak))
        best = max(fast, key=lambda r: r["value"])
        for r in fast:
            add("train_seed_" + ("compiled" if "compile" in r["precision"] else "fast"), r)
        add("train_seed_best", {**best, "note": f"{best['value'] / base['value']:.2f} x the plain fp32 eager loop at batch {base['batch']}"})
        # presets/strong.yaml's UNet2DModel (65 M parameters): the performance target's 64 M diffusers UNet2DModel
        unet = {"model": "unet2d", "unet_channels": [8, 8, 16] if q else [64, 128, 256, 384, 384],
                "unet_attention": [False, False, True] if q else [False, False, False, True, True],
                "unet_norm_groups": 4 if q else 32, "unet_layers_per_block": 1 if q else 2}
        add("train_unet64m", bench_train(unet, px, 2 if q else (64 if gpu else 4), "bf16" if gpu else "fp32",
                                         gpu and not a.no_compile, steps, device, peak))
        share = data_path_share(px, best["batch"], 64 if q else 2048, device, best["batch"] / best["value"])
        add("data_path", {"value": round(100 * share, 2), "unit": "% of step", "batch": best["batch"], "image_size": px,
                          "note": f"{'GPU' if gpu else 'CPU'} computing >= {100 * (1 - share):.1f} % of a step "
                                  f"(uint8 pack on the {device.type})"})
    if not a.skip_cf:
        n = 2 if q else (64 if gpu else 2)
        add("cf_fast", bench_cf(seed, px, n, "dpmsolver", 20 if not q else 3, 0.8, "bf16" if gpu else "fp32", device))
        add("cf_seed_ddpm320", bench_cf(seed, px, 2 if q else (8 if gpu else 1), "ddpm", 0, 0.8 if not q else 0.02,
                                        "fp32", device))
    if not a.skip_score:
        n = 8 if q else (8192 if gpu else 64)
        bs = 4 if q else (256 if gpu else 32)
        workers = min(16, os.cpu_count() or 1)
        with tempfile.TemporaryDirectory(prefix="cfaudit-bench-") as tmp:
            paths = benchmark_paths(n, 256, a.images, tmp)  # both figures read the same files
            add("score", bench_score(paths, bs, device, workers))
            add("fid_features", bench_fid_features(paths, bs, device, workers))
    rules = None
    if a.demo:
        demo, rules = run_demo(a.cores, a.snakemake)
        add("demo_wall", {"value": demo["value"], "unit": "s", "note": f"snakemake --cores {a.cores}, fresh directory"})
        add("demo_peak_rss", {"value": demo["peak_rss_mb"], "unit": "MB", "note": "whole process tree, sampled 2/s"})
    elif a.rules:
        rules = rule_table(a.rules)
    if rules is not None:
        print(rules.to_string(index=False))
    return env, rows, rules


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m cfaudit.benchmark", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--quick", action="store_true", help="smoke sizes (seconds on a CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-cf", action="store_true")
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--images", default="", help="real PNG/JPEG folder for the 299 px figures (default: synthetic PNGs)")
    ap.add_argument("--demo", action="store_true", help="also run the embedded demo end to end (minutes)")
    ap.add_argument("--cores", type=int, default=2, help="--cores of the demo run")
    beside = Path(sys.executable).parent / "snakemake"  # the venv's, also when its bin/ is not on PATH
    ap.add_argument("--snakemake", default=str(beside) if beside.exists() else (shutil.which("snakemake") or "snakemake"),
                    help="snakemake executable")
    ap.add_argument("--rules", default="", help="summarise the benchmark: files of a finished run in this folder")
    ap.add_argument("--results", default=str(RESULTS_FILE), help="markdown file the figures are appended to")
    ap.add_argument("--json", default="", help="also write the figures as JSON here")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    env, rows, rules = run(a)
    if not a.no_append:
        path = Path(a.results)
        if not path.exists():
            path.write_text("# Benchmark results\n\nAppended by `python -m cfaudit.benchmark` (see docs/development.md, Benchmarks).\n\n")
        with path.open("a") as fh:
            fh.write(markdown(env, rows, rules))
        print(f"appended to {path}")
    out = {"environment": env, "figures": rows, "rules": None if rules is None else rules.to_dict(orient="records")}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    return out
