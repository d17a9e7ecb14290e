"""Benchmarks. ``python -m cfaudit.benchmark`` (:mod:`.suite`): every figure of the performance targets in one run,
printed and appended to BENCHMARKS.md with the device, precision, batch size, model size, date and code version.

    python -m cfaudit.benchmark                  # the GPU figures on a GPU (CPU-sized stand-ins without one)
    python -m cfaudit.benchmark --demo           # + the embedded demo end to end (wall time, peak memory, per rule)
    python -m cfaudit.benchmark --rules benchmarks   # + the per-rule table of a finished run's benchmark: files
    python -m cfaudit.benchmark --quick          # smoke sizes: checks that every figure is produced (the test)

Figures (random weights and data: speed does not depend on them):
  peak            a large matmul (bf16 on a GPU, fp32 on the CPU): the measured hardware limit MFU is taken against
  train_*         the seed's ContextUnet at 256 px (n_feat 128): plain fp32 eager at the seed's batch 8 (the
                  baseline), bf16 + channels_last at batch 64, and the same under torch.compile; the library UNet
                  (64 M parameters); model FLOPs per image counted by torch's FlopCounterMode, training = 3 x forward
  data_path       the share of a training step spent on the data path (index the uint8 pack on the device, convert,
                  flip, draw noise): 1 - share is the upper bound on GPU starvation by data
  cf_*            SDEdit counterfactuals (both targets, CFG) with the fast sampler and the seed's 320-step ancestral path
  score / fid     DeepDerm (Inception-v3) scoring and pytorch-fid feature extraction at 299, PNG decode + resize included
  demo            `snakemake --cores 2` of the embedded default in a fresh directory: wall time, peak resident memory
                  of the whole process tree, and the per-rule table of its benchmark: files

Single-stage benchmarks: ``python -m cfaudit.benchmark.diffusion`` (training and SDEdit throughput of a config,
:mod:`.diffusion`), ``python -m cfaudit.benchmark.scoring`` (scoring images/s, :mod:`.scoring`). All of them time
with :func:`cfaudit.benchmark.timing.timed` (warm-up, device synchronisation, best of the repeats); the demo run and
the per-rule table are in :mod:`.demo`.
"""

import importlib

# name -> submodule; loaded on first use, so that `python -m cfaudit.benchmark.scoring` (or .diffusion) does not
# import the whole suite before running its own module
_EXPORTS = {"rule_table": "demo", "run_demo": "demo", "tree_rss_mb": "demo", "TARGETS": "suite",
            "forward_flops": "suite", "main": "suite", "markdown": "suite", "run": "suite", "Timing": "timing",
            "sync_device": "timing", "timed": "timing"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cfaudit.benchmark.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cfaudit.benchmark' has no attribute {name!r}")
