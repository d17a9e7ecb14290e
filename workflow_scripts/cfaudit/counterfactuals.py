"""The counterfactual contract every generator writes and every consumer (scoring, panels, metrics) reads, and
the shard runner of the diffusion-based generators (SDEdit, guided).

Per generator: PNGs at the generator's output size, and an index CSV with one row per (anchor, target):
``anchor_id, anchor_label, target_label, generator, path, shard, settings`` (settings: JSON of the knobs
that made it). Work is split into shards: shard ``i`` of ``n`` takes anchors ``i, i+n, i+2n, ...`` of
results/data/anchors.csv, so every anchor lands in exactly one shard whatever ``n`` is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from cfaudit.files import atomic_output, write_csv
from cfaudit.runtime import derive_seed

INDEX_COLUMNS = ["anchor_id", "anchor_label", "target_label", "generator", "path", "shard", "settings"]
TARGETS = (0, 1)  # benign, malignant
log = logging.getLogger("cfaudit.counterfactuals")


def shard_anchors(anchors: pd.DataFrame, shard: int, n_shards: int) -> pd.DataFrame:
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return anchors.iloc[shard::n_shards].reset_index(drop=True)


def image_path(out_dir: str | os.PathLike, anchor_id: str, target: int) -> Path:
    return Path(out_dir) / f"{anchor_id}_to{int(target)}.png"


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Save one uint8 (H,W,3) image; written to a temporary name first so a kill leaves no half file."""
    with atomic_output(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG")


def index_rows(anchor_ids, anchor_labels, target: int, generator: str, out_dir, shard: int, settings: dict) -> list[dict]:
    s = json.dumps(settings, sort_keys=True)
    return [
        {
            "anchor_id": a,
            "anchor_label": int(lbl),
            "target_label": int(target),
            "generator": generator,
            "path": str(image_path(out_dir, a, target)),
            "shard": shard,
            "settings": s,
        }
        for a, lbl in zip(anchor_ids, anchor_labels)
    ]


def write_index(rows: list[dict] | pd.DataFrame, path: str | os.PathLike) -> pd.DataFrame:
    """Write the index columns of ``rows`` (dicts or a DataFrame) as the shard's index CSV."""
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    write_csv(df, path)
    return df


def gather(index_paths, out_path: str | os.PathLike, anchors: pd.DataFrame | None = None) -> pd.DataFrame:
    """Concatenate shard indexes; with ``anchors`` given, check both targets exist for every anchor."""
    df = pd.concat([pd.read_csv(p) for p in index_paths], ignore_index=True)
    if anchors is not None:
        want = {(a, t) for a in anchors["image_id"] for t in TARGETS}
        have = set(zip(df["anchor_id"], df["target_label"]))
        missing = sorted(want - have)
        if missing:
            raise ValueError(f"{len(missing)} (anchor, target) pairs missing from the shards, e.g. {missing[:3]}")
    df = df.sort_values(["anchor_id", "target_label"]).reset_index(drop=True)
    write_csv(df, out_path)
    return df


# ----------------------------------------------------------------------------------------------------------
# The shard runner of the diffusion-based generators
# ----------------------------------------------------------------------------------------------------------
def anchor_seed(seed: int, anchor_id: str) -> int:
    """The noise seed of one anchor: a stable 63-bit seed independent of its position, batch and shard (both targets
    of the anchor share it)."""
    return derive_seed(int(seed), anchor_id)


def fresh_image_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` created and emptied of PNGs: a rerun with other anchors must not leave old images behind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        os.remove(stale)
    return out_dir


def read_anchor_pixels(pack_path, pack_index_path, anchor_ids) -> np.ndarray:
    """uint8 (N,H,W,3) of the given anchors, read from the memory-mapped pack by image id."""
    index = pd.read_csv(pack_index_path)
    row_of = dict(zip(index["image_id"].astype(str), index["row"]))
    missing = [a for a in anchor_ids if a not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} anchors are not in {pack_index_path} (e.g. {missing[:3]}); "
                         "anchors.csv and the pack come from different data runs: rerun the data stage")
    pack = np.load(pack_path, mmap_mode="r")
    return np.ascontiguousarray(pack[[row_of[a] for a in anchor_ids]])


def shard_inputs(anchors: pd.DataFrame, shard: int, n_shards: int, pack_path, pack_index_path, out_dir,
                 image_size: int) -> tuple[list[str], list[int], np.ndarray | None]:
    """Anchor ids, labels and uint8 pixels of shard ``shard`` (None when it has no anchors), with ``out_dir`` made
    fresh (:func:`fresh_image_dir`); the pack's image size must be the diffusion model's."""
    fresh_image_dir(out_dir)
    mine = shard_anchors(anchors, shard, n_shards)
    ids = mine["image_id"].astype(str).tolist()
    labels = mine["label"].astype(int).tolist()
    if not ids:
        log.warning("shard %d of %d has no anchors (%d anchors in all)", shard, n_shards, len(anchors))
        return ids, labels, None
    pixels = read_anchor_pixels(pack_path, pack_index_path, ids)
    if pixels.shape[1] != image_size:
        raise ValueError(f"the pack holds {pixels.shape[1]} px images but the diffusion checkpoint was trained at "
                         f"{image_size} px; rerun rule train_diffusion (image_size changed?)")
    return ids, labels, pixels


# generate(anchor pixels uint8 (B,H,W,3), anchor seeds) -> per target in TARGETS: (uint8 images (B,H,W,3), extra
# index columns (B rows) or None)
BatchGenerator = Callable[[np.ndarray, list], list]


def write_shard(generate: BatchGenerator, ids: list[str], labels: list[int], pixels: np.ndarray | None, *, out_dir,
                shard: int, generator: str, settings: dict, batch_size: int, seed: int,
                batch_note: Callable[[pd.DataFrame], str] | None = None) -> tuple[pd.DataFrame, float]:
    """Counterfactuals of one shard's anchors toward both targets, batch by batch: PNGs in ``out_dir`` and the
    index rows (plus the generator's extra columns), target-major in shard order; returns (rows, seconds).

    Each anchor's seed is :func:`anchor_seed` of its id, so its images do not depend on the batch or the shard.
    ``batch_note(extra columns of the batch, both targets)`` adds to the progress line.
    """
    frames: dict[int, list[pd.DataFrame]] = {t: [] for t in TARGETS}
    t_begin, done = time.perf_counter(), 0
    for lo in range(0, len(ids), batch_size):
        batch_ids, batch_labels = ids[lo:lo + batch_size], labels[lo:lo + batch_size]
        outputs = generate(pixels[lo:lo + batch_size], [anchor_seed(seed, a) for a in batch_ids])
        for target, (images, extra) in zip(TARGETS, outputs):
            for a, img in zip(batch_ids, images):
                save_png(img, image_path(out_dir, a, target))
            rows = pd.DataFrame(index_rows(batch_ids, batch_labels, target, generator, out_dir, shard, settings))
            frames[target].append(rows if extra is None else pd.concat([rows, extra.reset_index(drop=True)], axis=1))
        done += len(batch_ids)
        note = batch_note(pd.concat([e for _, e in outputs])) if batch_note else ""
        log.info("shard %d: %d/%d anchors (%.2f anchors/s, %d images)%s", shard, done, len(ids),
                 done / max(time.perf_counter() - t_begin, 1e-9), len(TARGETS) * done, note)
    parts = [f for t in TARGETS for f in frames[t]]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=INDEX_COLUMNS)
    return df, time.perf_counter() - t_begin
