"""Checkpoints of the diffusion model: atomic saves, loading for resume and for generation, GPU backend tuning
(the precision choice is cfaudit.precision).

A checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``):
``format, spec, schedule, model, ema, ema_updates, optimizer, step, total_steps, rng, epoch_loss, history,
fingerprint, train_config, seed, precision, device``. The final checkpoint (results/diffusion/checkpoint.pt)
and the rolling resume state (results/diffusion/train_state.pt) have the same layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.files import save_torch, sha256_file
from cfaudit.models import model_from_spec

FORMAT = "cfaudit-diffusion-v1"


def tune_backend(device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on a GPU (no effect on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomic, byte-reproducible ``torch.save`` (:func:`cfaudit.files.save_torch`)."""
    return save_torch(state, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusion checkpoint {path} does not exist; run rule train_diffusion first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and what to do
        raise RuntimeError(f"cannot read diffusion checkpoint {path} ({err}); delete it and rerun rule train_diffusion") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not a cfaudit diffusion checkpoint (format {FORMAT}); rerun rule train_diffusion")
    return state


def load_generator(path: str | os.PathLike, device, use_ema: bool = True, channels_last: bool = False):
    """(model in eval mode on ``device``, schedule, meta) from a checkpoint; meta has spec, sha256, step."""
    state = load_checkpoint(path)
    if use_ema and state.get("ema") is None:
        raise ValueError(f"diffusion.counterfactual.use_ema is true but {path} has no EMA weights (trained with "
                         "diffusion.ema_decay 0); set diffusion.counterfactual.use_ema: false or train with ema_decay > 0")
    model = model_from_spec(state["spec"])
    model.load_state_dict(state["ema"] if use_ema else state["model"])
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    schedule = LinearSchedule(**state["schedule"])
    meta = {"spec": state["spec"], "step": state["step"], "sha256": sha256_file(path), "weights": "ema" if use_ema else "raw",
            "train_precision": state.get("precision")}
    return model, schedule, meta
