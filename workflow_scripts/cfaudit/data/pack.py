"""The packed dataset: one uint8 array (N, H, W, 3) plus an index table, and the pixel-range conversions.

Training and generation read the pack (one file, memory-mappable, cheap to put on the GPU whole);
scoring reads the saved PNGs, the pixels a reader sees.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

PACK_INDEX_COLUMNS = ["row", "image_id", "label", "png"]


def load_pack(pack_path: str | os.PathLike, index_path: str | os.PathLike, split_path=None, split: str | None = None):
    """Return ``(images uint8 (N,H,W,3), index DataFrame)``, optionally restricted to one split.

    ``split_path`` is results/data/split.csv (image_id, label, split); ``split`` is "train" or "eval".
    The returned index keeps the pack's ``row`` so rows can be traced back.
    """
    images = np.load(pack_path, mmap_mode="r")
    index = pd.read_csv(index_path)
    if len(index) != images.shape[0]:
        raise ValueError(f"{index_path} has {len(index)} rows but {pack_path} holds {images.shape[0]} images; rerun rule resize")
    if split_path is not None:
        sp = pd.read_csv(split_path)[["image_id", "split"]]
        index = index.merge(sp, on="image_id", how="inner")
        if split is not None:
            index = index[index["split"] == split]
        index = index.sort_values("row").reset_index(drop=True)
    return np.ascontiguousarray(images[index["row"].to_numpy()]), index


# ----------------------------------------------------------------------------------------------------------
# Pixel ranges: the package's only uint8 <-> float conversions (generators, classifiers, FID, judges, metrics)
# ----------------------------------------------------------------------------------------------------------
def uint8_to_float(images, scale: float = 127.5, offset: float = 1.0):
    """uint8 (N,H,W,3) array or tensor -> float32 torch tensor (N,3,H,W) = pixels / scale - offset, on the tensor's
    device: [-1, 1] by default (generators and classifiers), [0, 1] with ``uint8_to_unit`` (Inception)."""
    import torch

    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    return t.permute(0, 3, 1, 2).float().div(scale).sub(offset)


def uint8_to_unit(images):
    """uint8 (N,H,W,3) array or tensor -> float32 torch tensor (N,3,H,W) in [0, 1]."""
    return uint8_to_float(images, 255.0, 0.0)


def float_to_uint8_tensor(x):
    """float tensor (N,3,H,W) in [-1, 1] -> uint8 tensor (N,3,H,W) on the same device, rounded and clipped."""
    import torch

    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(dtype=torch.uint8)


def float_to_uint8(x) -> np.ndarray:
    """float tensor (N,3,H,W) in [-1, 1] -> uint8 numpy (N,H,W,3), rounded and clipped (what a PNG stores)."""
    return float_to_uint8_tensor(x).permute(0, 2, 3, 1).cpu().numpy()


def unit_float(images) -> np.ndarray:
    """uint8 array -> float64 array in [0, 1] (same shape): the intensities of the closeness and budget metrics."""
    return np.asarray(images).astype(np.float64) / 255.0


def round_to_uint8(values) -> np.ndarray:
    """float array in 8-bit units -> uint8 array: rounded half to even, clipped to [0, 255]."""
    return np.clip(np.round(values), 0, 255).astype(np.uint8)
