"""The one timing helper of the benchmarks: warm up, synchronise the device, repeat, keep the best."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA calls return before the kernels finish); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Best wall seconds and least process CPU seconds of one timed call."""

    seconds: float
    cpu_seconds: float

    def rate(self, n: float) -> float:
        """Items per second when one call handles ``n`` items."""
        return n / self.seconds


def timed(fn: Callable, device, repeats: int = 1, warmup: Callable | None = None) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup()`` (default: one untimed ``fn()``, which also pays for
    lazy initialisation, cuDNN autotuning and compilation); the device is synchronised around every timed call,
    so queued GPU work is counted where it was issued."""
    (warmup or fn)()
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        sync_device(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return Timing(best, cpu)
