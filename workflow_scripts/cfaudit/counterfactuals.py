"""The counterfactual contract every generator writes and every consumer (scoring, panels, metrics) reads.

Per generator: PNGs at the generator's output size, and an index CSV with one row per (anchor, target):
``anchor_id, anchor_label, target_label, generator, path, shard, settings`` (settings: JSON of the knobs
that made it). Work is split into shards: shard ``i`` of ``n`` takes anchors ``i, i+n, i+2n, ...`` of
results/data/anchors.csv, so every anchor lands in exactly one shard whatever ``n`` is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cfaudit.files import write_csv

INDEX_COLUMNS = ["anchor_id", "anchor_label", "target_label", "generator", "path", "shard", "settings"]
TARGETS = (0, 1)  # benign, malignant


def shard_anchors(anchors: pd.DataFrame, shard: int, n_shards: int) -> pd.DataFrame:
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return anchors.iloc[shard::n_shards].reset_index(drop=True)


def image_path(out_dir: str | os.PathLike, anchor_id: str, target: int) -> Path:
    return Path(out_dir) / f"{anchor_id}_to{int(target)}.png"


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Save one uint8 (H,W,3) image; written to a temporary name first so a kill leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


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


def write_index(rows: list[dict], path: str | os.PathLike) -> pd.DataFrame:
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
