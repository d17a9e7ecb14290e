"""Run-time plumbing shared by every entry script: logging into the rule's log, seeding (and sub-seeds), device
choice."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sys
import traceback
from pathlib import Path

import numpy as np

log = logging.getLogger("cfaudit")


@contextlib.contextmanager
def script_logging(log_path: str | os.PathLike | None):
    """Send the package's log records (and any traceback) to the rule's ``log:`` file and to stderr.

    A failure is logged with its traceback before it propagates, so the log file says why a job died.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(logging.INFO)
    try:
        yield log
    except BaseException:
        log.error("failed:\n%s", traceback.format_exc())
        raise
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch from one config value; return a NumPy generator for local draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # torch is a dependency; this only keeps data-only tools importable without it
        pass
    return np.random.default_rng(seed)


def derive_seed(*parts) -> int:
    """A stable 63-bit sub-seed named by ``parts`` (e.g. ``(seed, "epoch", 3)`` or ``(seed, anchor_id)``): the first
    8 bytes (little-endian) of the sha256 of ``":".join(map(str, parts))``, halved to fit torch's manual_seed.

    The package's one seed derivation: the value depends only on the names, never on the order or number of
    other draws, so an anchor's noise does not change with its batch or shard and an epoch's order does not
    change on resume."""
    key = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


class NoGPUError(RuntimeError):
    """A GPU was requested (``compute.device: cuda``) and none is visible."""


def resolve_device(requested: str = "auto", allow_cpu_fallback: bool = True):
    """Pick the torch device for a rule and log what the job can see.

    ``auto`` takes the GPU when one is visible, else the CPU. ``cuda`` demands a GPU: without one it
    fails fast (a cluster job that silently ran on the CPU would take days) unless
    ``allow_cpu_fallback`` is set, in which case it says so loudly and uses the CPU.
    """
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    has_gpu = torch.cuda.is_available()
    log.info("CUDA_VISIBLE_DEVICES=%s, torch.cuda.is_available()=%s", visible, has_gpu)
    if requested == "cpu":
        return torch.device("cpu")
    if has_gpu:
        dev = torch.device("cuda")
        log.info("using GPU: %s", torch.cuda.get_device_name(dev))
        return dev
    if requested == "cuda" and not allow_cpu_fallback:
        raise NoGPUError(
            f"compute.device is 'cuda' but no GPU is visible (CUDA_VISIBLE_DEVICES={visible}). "
            "Submit this rule to a GPU queue (see README, 'Running on a cluster'), or set "
            "compute.allow_cpu_fallback: true to run it on the CPU deliberately."
        )
    if requested == "cuda":
        log.warning("no GPU visible; compute.allow_cpu_fallback is true, so running on the CPU")
    return torch.device("cpu")


def job_device(compute: dict, threads: int):
    """The device of a rule's job from config ``compute`` (:func:`resolve_device`), with torch's CPU threads set to
    the job's ``threads`` (what the scheduler granted)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return resolve_device(compute["device"], compute["allow_cpu_fallback"])
