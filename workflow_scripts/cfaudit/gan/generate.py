"""GAN counterfactuals of the eval anchors, written to the counterfactual contract (cfaudit.counterfactuals).

Bin 0 gives the benign counterfactual (target 0), bin ``n_bins - 1`` the malignant one (target 1). Anchors
come from the pack at ``image_size`` and are resized (bicubic, antialiased) to the classifier's input size,
which is the size the generator works and writes at (299 for DeepDerm).

The generator runs in eval mode: batch norm uses its running statistics, so each counterfactual depends on
its anchor only. The reference inference script left the generator in train mode (batch statistics: an
image's output depends on the rest of its batch); ``gan.generate.mode: train`` reproduces that on request.
Either way the mode is recorded as ``generator_mode`` in every index row's settings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfaudit.counterfactuals import (TARGETS, image_path, index_rows, read_anchor_pixels, save_png, shard_anchors,
                                     write_index)
from cfaudit.data.pack import float_to_uint8
from cfaudit.gan.checkpoint import load_generator
from cfaudit.gan.networks import Generator
from cfaudit.gan.training import images_at

log = logging.getLogger("cfaudit.gan")

MODES = ("eval", "train")


def target_bin(target: int, n_bins: int) -> int:
    """Conditioning bin of a counterfactual target: 0 (benign) -> bin 0, 1 (malignant) -> the last bin."""
    if target not in TARGETS:
        raise ValueError(f"target {target} is not one of {TARGETS}")
    return 0 if target == 0 else n_bins - 1


@torch.no_grad()
def counterfactuals(generator: Generator, x: torch.Tensor, bin_index: int, batch_size: int = 16,
                    mode: str = "eval") -> torch.Tensor:
    """Generator outputs (N,3,H,W) in [-1,1] for images ``x`` (N,3,H,W) in [-1,1], all conditioned on ``bin_index``."""
    if mode not in MODES:
        raise ValueError(f"gan.generate.mode '{mode}' is not one of {MODES}")
    was_training = generator.training
    generator.train(mode == "train")
    try:
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            y = torch.full((len(xb),), bin_index, dtype=torch.long, device=xb.device)
            out.append(generator(xb, y).float())
        return torch.cat(out) if out else x[:0].clone()
    finally:
        generator.train(was_training)


def classifier_input_size(spec_path: str | os.PathLike) -> tuple[int, str]:
    """(input_size, name) from results/classifier/classifier.json (the classifier contract)."""
    spec_path = Path(spec_path)
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the classifier spec {spec_path} ({err}); run the classifier stage") from None
    if "input_size" not in spec:
        raise ValueError(f"classifier spec {spec_path} has no 'input_size'; rerun the classifier stage")
    return int(spec["input_size"]), str(spec.get("name", spec.get("kind", "classifier")))


def generate_shard(checkpoint, classifier_spec, pack, index, anchors_csv, shard: int, n_shards: int,
                   out_dir, gan_cfg: dict, device="cpu", out_index=None) -> pd.DataFrame:
    """Counterfactuals (both targets) for shard ``shard`` of ``n_shards`` of the anchors; writes PNGs into
    ``out_dir`` and the index to ``out_index`` (default ``<out_dir>/index.csv``); returns the index."""
    gen_cfg = gan_cfg["generate"]
    mode = gen_cfg["mode"]
    if mode == "train":
        log.warning("gan.generate.mode is 'train': batch norm uses batch statistics, so each counterfactual depends "
                    "on the other anchors in its batch (the reference script's behaviour)")
    size, clf_name = classifier_input_size(classifier_spec)
    trust = bool(gan_cfg["pretrained"]["trust_pickle"]) and gan_cfg["source"] == "pretrained"
    generator, info = load_generator(checkpoint, device=device, trust_pickle=trust)
    n_bins = generator.arch.n_bins
    if info.get("im_size") and int(info["im_size"]) != size:
        log.warning("the generator was trained at %s px; the classifier's input size is %d px", info["im_size"], size)

    anchors = shard_anchors(pd.read_csv(anchors_csv), shard, n_shards)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = read_anchor_pixels(pack, index, anchors["image_id"].astype(str).tolist())
    x = images_at(images, size, device) if len(images) else torch.empty(0, 3, size, size, device=device)

    settings_base = {
        "generator_mode": mode,
        "source": gan_cfg["source"],
        "checkpoint_sha256": info["sha256"],
        "checkpoint_epoch": info["epoch"],
        "checkpoint_layout": info["layout"],
        "arch": info["arch"],
        "size": size,
        "input_resize": "bicubic antialias from the pack" if images.shape[1:3] != (size, size) else "none",
        "batch_size": int(gen_cfg["batch_size"]),
        "classifier": clf_name,
    }
    rows: list[dict] = []
    for target in TARGETS:
        b = target_bin(target, n_bins)
        out = counterfactuals(generator, x, b, int(gen_cfg["batch_size"]), mode)
        pix = float_to_uint8(out) if len(out) else np.zeros((0, size, size, 3), np.uint8)
        for anchor_id, img in zip(anchors["image_id"], pix):
            save_png(img, image_path(out_dir, anchor_id, target))
        rows += index_rows(anchors["image_id"], anchors["label"], target, "gan", out_dir, shard,
                           {**settings_base, "bin": b, "n_bins": n_bins})
    df = write_index(rows, out_index or out_dir / "index.csv")
    log.info("shard %d/%d: %d anchors -> %d counterfactuals at %d px (generator in %s mode)",
             shard, n_shards, len(anchors), len(df), size, mode)
    return df
