"""Reading any image a user may hand us as 8-bit RGB, and resizing it to the working resolution.

Handles EXIF orientation, CMYK, greyscale, palette, alpha and 16-bit files. Files that cannot be decoded
(truncated, corrupt, not an image) raise ``UnreadableImage``; the resize stage quarantines them with the
reason instead of crashing or dropping them silently.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from cfaudit.data.pack import PACK_INDEX_COLUMNS, round_to_uint8
from cfaudit.files import atomic_output, write_csv

RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "box": Image.BOX}
QUARANTINE_COLUMNS = ["image_id", "path", "reason"]


class UnreadableImage(ValueError):
    pass


def _to_8bit_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = round_to_uint8(arr / top * 255.0)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(round_to_uint8(arr), "L").convert("RGB")  # already in [0, 255]
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def load_rgb8(path: str | os.PathLike, background=(255, 255, 255)) -> Image.Image:
    """Open ``path`` fully decoded as 8-bit RGB with EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
            return _to_8bit_rgb(img, background)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err


def resize_square(img: Image.Image, size: int, mode: str = "crop", resample: str = "lanczos") -> Image.Image:
    """crop: scale the shorter side to ``size`` and centre-crop; squash: stretch to ``size`` x ``size``."""
    flt = RESAMPLE[resample]
    if mode == "squash":
        return img.resize((size, size), flt)
    if mode != "crop":
        raise ValueError(f"resize.mode must be 'crop' or 'squash', not {mode!r}")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), flt)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _process_one(args):
    image_id, src, dst, size, mode, resample, background = args
    try:
        img = resize_square(load_rgb8(src, background), size, mode, resample)
    except UnreadableImage as err:
        return image_id, None, str(err)
    with atomic_output(dst) as tmp:
        img.save(tmp, format="PNG")
    return image_id, np.asarray(img, dtype=np.uint8), ""


def resize_dataset(ground_truth: pd.DataFrame, out_dir, pack_path, index_path, quarantine_path, *, size: int,
                   mode: str = "crop", resample: str = "lanczos", background=(255, 255, 255), workers: int = 1,
                   log=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Resize every ground-truth image into ``out_dir`` and pack them; return ``(index, quarantine)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(r.image_id, r.path, out_dir / f"{r.image_id}.png", size, mode, resample, tuple(background))
            for r in ground_truth.itertuples()]
    results = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_process_one, jobs, chunksize=16))
    else:
        results = [_process_one(j) for j in jobs]
    labels = dict(zip(ground_truth["image_id"], ground_truth["label"]))
    paths = dict(zip(ground_truth["image_id"], ground_truth["path"]))
    good = [(i, arr) for i, arr, _ in results if arr is not None]
    bad = [{"image_id": i, "path": paths[i], "reason": reason} for i, arr, reason in results if arr is None]
    if log:
        for b in bad:
            log.warning("quarantined %s (%s): %s", b["image_id"], b["path"], b["reason"])
    if not good:
        raise UnreadableImage(f"none of the {len(jobs)} images could be read; see {quarantine_path}")
    pack = np.stack([arr for _, arr in good])
    index = pd.DataFrame({"row": np.arange(len(good)), "image_id": [i for i, _ in good],
                          "label": [int(labels[i]) for i, _ in good],
                          "png": [str(out_dir / f"{i}.png") for i, _ in good]}, columns=PACK_INDEX_COLUMNS)
    with atomic_output(pack_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, pack)
    write_csv(index, index_path)
    quarantine = pd.DataFrame(bad, columns=QUARANTINE_COLUMNS)
    write_csv(quarantine, quarantine_path)
    return index, quarantine
