"""Mixed precision in one place: which autocast dtype a stage runs under, and the context that applies it.

Every stage that runs a network (diffusion training and sampling, guided sampling, the GAN, classifier training,
scoring, the benchmarks) turns its ``precision`` setting into ``(name, amp_dtype)`` with :func:`resolve_precision`
and wraps its forward passes in :func:`autocast`. bf16 (not fp16) because it needs no loss scaling; losses and
the outputs that are compared or written are cast back to float32 by the callers.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("cfaudit")

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device, *, key: str = "diffusion.precision",
                      cpu_bf16: bool = True) -> tuple[str, torch.dtype | None]:
    """``("bf16", torch.bfloat16)`` for autocast, or ``("fp32", None)``. auto = bf16 on a GPU, fp32 on the CPU.

    An explicit bf16 on the CPU autocasts there too when ``cpu_bf16`` (the diffusion stages: a user may want the
    GPU's numerics on a laptop); with ``cpu_bf16=False`` it falls back to fp32 with a warning (the GAN, whose
    CPU runs exist for tests and should not be slowed by CPU bf16 kernels). ``key`` names the config key in the
    error for an unknown value.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"config key '{key}': {precision!r} is not one of {PRECISIONS}")
    on_gpu = torch.device(device).type == "cuda"
    if precision == "bf16" and not on_gpu and not cpu_bf16:
        log.warning("%s is bf16 but the device is %s: running in fp32", key, device)
        return "fp32", None
    if precision == "bf16" or (precision == "auto" and on_gpu):
        return "bf16", torch.bfloat16
    return "fp32", None


def autocast(device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` to ``amp_dtype`` on ``device``'s type, or a no-op context when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
