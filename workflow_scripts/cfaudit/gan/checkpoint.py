"""GAN checkpoints: the published DeGrave et al. layout, this project's own training checkpoints, and placing
downloaded weights.

A checkpoint file is a dict ``{generator, discriminator, d_opt, g_opt, epoch}`` of state dicts, optimiser
states and the index of the last finished epoch (the published files, Zenodo record 10049217). The
``generator`` entry uses the reference code's module names (``layer2``, ``layer5.layer1``,
``resblocks.3.layer4`` ...; the full list is tests/fixtures/checkpoint_keys/derm_audit_generator_299.txt).
This project's :class:`~cfaudit.gan.networks.Generator` names its modules differently (``stem``, ``down.0``,
``blocks.3.conv2`` ...); :func:`published_name` maps one onto the other. Checkpoints written by
``train_gan`` use the same published layout for ``generator`` (so one loader reads both) and add a
``cfaudit`` entry with the architecture, the training history and the state needed to resume.

Files are read with ``torch.load(weights_only=True)``, which executes no pickled code: the published files
hold only tensors, dicts, lists, numbers and strings (optimiser states included), so this works. Loading
with ``weights_only=False`` happens only when ``gan.pretrained.trust_pickle`` is set, after the sha256 check.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
import zipfile
from pathlib import Path

import torch

from cfaudit.files import save_torch, sha256_file
from cfaudit.gan.networks import PUBLISHED_ARCH, Discriminator, Generator, GeneratorArch
from cfaudit.weights import RetryPolicy, place_verified, state_dict_mismatch

log = logging.getLogger("cfaudit.gan")

CHECKPOINT_ENTRIES = ("generator", "discriminator", "d_opt", "g_opt", "epoch")
FORMAT_VERSION = 1

# own module prefix -> published module prefix (applied to the start of a state-dict key)
_SUBLAYER = {"conv": "layer1", "norm": "layer2"}
_BLOCK = {"conv1": "layer1", "norm1": "layer2", "conv2": "layer4", "norm2": "layer5"}


class GANCheckpointError(RuntimeError):
    """A GAN checkpoint is unreadable or does not match the generator; the message names file and keys."""


def published_name(own_key: str) -> str:
    """Published (reference-code) name of one of this project's generator state-dict keys."""
    m = re.fullmatch(r"stem\.(conv|norm)\.(.+)", own_key)
    if m:
        return f"{'layer2' if m.group(1) == 'conv' else 'layer3'}.{m.group(2)}"
    m = re.fullmatch(r"(down|up)\.([01])\.(conv|norm)\.(.+)", own_key)
    if m:
        layer = {("down", "0"): "layer5", ("down", "1"): "layer6", ("up", "0"): "layer7", ("up", "1"): "layer8"}
        return f"{layer[m.group(1), m.group(2)]}.{_SUBLAYER[m.group(3)]}.{m.group(4)}"
    m = re.fullmatch(r"blocks\.(\d+)\.(conv1|norm1|conv2|norm2)\.(.+)", own_key)
    if m:
        return f"resblocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"head\.conv\.(.+)", own_key)
    if m:
        return f"layer10.{m.group(1)}"
    raise KeyError(f"generator key '{own_key}' has no published counterpart")


def to_published(state: dict) -> dict:
    """This project's generator state dict renamed to the published layout (for saving)."""
    return {published_name(k): v for k, v in state.items()}


def from_published(state: dict, arch: GeneratorArch, source: str = "<checkpoint>") -> dict:
    """Map a published-layout generator state dict onto ``Generator(arch)``'s names, strictly.

    Raises GANCheckpointError naming every missing, unexpected and mis-shaped key (published names).
    """
    if not isinstance(state, dict):
        raise GANCheckpointError(f"{source}: the 'generator' entry is a {type(state).__name__}, not a state dict")
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        model = Generator(arch)
    expected = {published_name(k): (k, v) for k, v in model.state_dict().items()}
    mismatch = state_dict_mismatch({p: v for p, (_, v) in expected.items()}, state)
    if mismatch:
        raise GANCheckpointError(
            f"{source}: the 'generator' state dict does not match the generator architecture "
            f"(base_channels={arch.base_channels}, n_blocks={arch.n_blocks}, n_bins={arch.n_bins}; "
            f"{len(expected)} tensors expected, the file has {len(state)}). {mismatch.describe()}. "
            "A published DeGrave et al. generator needs the published architecture (64 channels, 9 residual "
            "blocks, 10 bins); check that the file is a generator checkpoint of that layout "
            "(tests/fixtures/checkpoint_keys/derm_audit_generator_299.txt)."
        )
    return {own: state[p] for p, (own, _) in expected.items()}


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Read a checkpoint dict with ``torch.load(weights_only=True)`` (or, opted in, ``weights_only=False``)."""
    path = Path(path)
    if not path.exists():
        raise GANCheckpointError(f"GAN checkpoint not found: {path}. Run the gan stage (rule train_gan, or "
                                 f"place_gan_weights with gan.source: pretrained).")
    size = path.stat().st_size
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise GANCheckpointError(
                f"torch.load(weights_only=True) refused {path}: it holds pickled Python objects beyond tensors "
                f"and plain containers ({str(err)[:300]}). Loading it would execute code from the file. If you "
                f"trust its source (its sha256 was checked against gan.pretrained.sha256), set "
                f"gan.pretrained.trust_pickle: true to load it with weights_only=False."
            ) from None
        log.warning("%s: weights_only=True refused the file; loading with weights_only=False because "
                    "gan.pretrained.trust_pickle is true", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise GANCheckpointError(
            f"cannot read GAN checkpoint {path} ({size} bytes): truncated or not a PyTorch file "
            f"({type(err).__name__}: {str(err)[:200]}). Delete it and rerun the rule that made it."
        ) from None
    if not isinstance(obj, dict) or "generator" not in obj:
        what = f"a dict with entries {sorted(obj)[:10]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise GANCheckpointError(
            f"{path} is {what}; a GAN checkpoint is a dict with entries {list(CHECKPOINT_ENTRIES)} "
            f"(the generator's state dict under 'generator')."
        )
    return obj


def arch_of(ckpt: dict, default: GeneratorArch | None = None) -> GeneratorArch:
    """The generator architecture a checkpoint declares (this project's files) or ``default`` / the published one."""
    meta = ckpt.get("cfaudit")
    if isinstance(meta, dict) and "arch" in meta:
        return GeneratorArch(**meta["arch"])
    return default or PUBLISHED_ARCH


def load_generator(path: str | os.PathLike, arch: GeneratorArch | None = None, device="cpu",
                   trust_pickle: bool = False) -> tuple[Generator, dict]:
    """Build the generator a checkpoint holds and load its weights strictly.

    ``arch``: the expected architecture; None = what the file declares, else the published one.
    Returns ``(generator, info)`` with info = epoch, arch, sha256, file, and the file's ``cfaudit`` metadata.
    """
    ckpt = read_checkpoint(path, trust_pickle)
    declared = arch_of(ckpt)
    if arch is not None and "cfaudit" in ckpt and declared != arch:
        raise GANCheckpointError(f"{path} holds a generator with {declared}, but {arch} was expected")
    arch = arch or declared
    own = from_published(ckpt["generator"], arch, source=str(path))
    gen = Generator(arch)
    gen.load_state_dict(own, strict=True)
    gen.to(device)
    meta = ckpt.get("cfaudit") if isinstance(ckpt.get("cfaudit"), dict) else {}
    info = {
        "file": str(path),
        "sha256": sha256_file(path),
        "epoch": ckpt.get("epoch"),
        "arch": arch.as_dict(),
        "layout": "cfaudit" if meta else "published",
        "im_size": meta.get("im_size"),
        "classifier": meta.get("classifier"),
    }
    return gen, info


def checkpoint_dict(generator: Generator, discriminator: Discriminator, g_opt, d_opt, epoch: int,
                    meta: dict) -> dict:
    """The published checkpoint layout plus this project's ``cfaudit`` metadata entry."""
    return {
        "generator": to_published({k: v.detach().cpu() for k, v in generator.state_dict().items()}),
        "discriminator": {k: v.detach().cpu() for k, v in discriminator.state_dict().items()},
        "d_opt": d_opt.state_dict(),
        "g_opt": g_opt.state_dict(),
        "epoch": int(epoch),
        "cfaudit": {"format_version": FORMAT_VERSION, "arch": generator.arch.as_dict(), **meta},
    }


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """Write atomically (a kill during the save leaves the previous file intact) and byte-reproducibly."""
    return save_torch(ckpt, path)


# ------------------------------------------------------------------------------------------------------------
# Placing published weights
# ------------------------------------------------------------------------------------------------------------
def place_weights(dest: str | os.PathLike, sha256: str, url: str = "", local_path: str = "", retries: int = 4,
                  timeout_s: float = 120.0, sleep=time.sleep) -> Path:
    """Copy ``local_path`` (when it exists) or download ``url`` to ``dest``, sha256-verified
    (:func:`cfaudit.weights.place_verified`: nothing is placed on a mismatch; an empty ``sha256`` fails with the
    file's digest in the message, to paste into config after checking the file's origin)."""
    return place_verified(
        dest, sha256=sha256, local_path=local_path, url=url, what="gan.pretrained", error=GANCheckpointError,
        policy=RetryPolicy(retries=retries), timeout_s=timeout_s, sleep=sleep, logger=log,
        hint="E.g. gan.pretrained.url: https://zenodo.org/records/10049217/files/deepderm_isic.pth (the generator "
             "trained against DeepDerm on ISIC).")
