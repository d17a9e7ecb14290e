"""Scoring: the audited classifier's verdict on every original and counterfactual, from the saved 8-bit files.

One long table, results/scores/scores.csv, one row per image:

``image_id`` (the anchor's id for a counterfactual), ``generator`` ("original" for the real images),
``target_label`` (ground truth for originals, the requested class for counterfactuals: 0 benign,
1 malignant), ``anchor_label`` (the anchor's ground truth), ``path`` (the PNG scored), ``score`` (in the
configured score space), ``logit`` (raw positive-class logit), ``prob`` (softmax probability of the
positive class), ``pred`` (score > threshold), ``classifier``, ``score_space``, ``preprocessing``.

Images are decoded and resized in a thread pool (PIL releases the GIL), one batch ahead of the model.
``python -m cfaudit.benchmark.scoring`` prints images/s at 299 including decode and resize.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cfaudit.classifiers import AuditedClassifier
from cfaudit.data.pack import uint8_to_float
from cfaudit.names import ORIGINAL
from cfaudit.precision import autocast, resolve_precision

SCORE_COLUMNS = ["image_id", "generator", "target_label", "anchor_label", "path", "score", "logit", "prob", "pred",
                 "classifier", "score_space", "preprocessing"]
BACKENDS = ("pil", "torch")


# ----------------------------------------------------------------------------------------------------------
# What to score
# ----------------------------------------------------------------------------------------------------------
def scoring_jobs(anchors: pd.DataFrame, pack_index: pd.DataFrame, split: pd.DataFrame,
                 cf_indexes: dict[str, str | os.PathLike], originals: str = "anchors",
                 include_originals: bool = True) -> pd.DataFrame:
    """Rows (image_id, generator, target_label, anchor_label, path) for the originals (unless
    ``include_originals`` is false) + every counterfactual of ``cf_indexes``."""
    if originals == "anchors":
        orig = anchors[["image_id", "label"]]
    elif originals == "eval":
        orig = split.loc[split["split"] == "eval", ["image_id", "label"]]
    else:
        raise ValueError(f"classifier.scoring.originals must be 'anchors' or 'eval', not {originals!r}")
    orig = orig.merge(pack_index[["image_id", "png"]], on="image_id", how="left")
    lost = orig.loc[orig["png"].isna(), "image_id"].tolist()
    if lost:
        raise ValueError(f"{len(lost)} originals have no PNG in the pack index (e.g. {lost[:3]}); rerun rule resize")
    parts = [pd.DataFrame({"image_id": orig["image_id"], "generator": ORIGINAL, "target_label": orig["label"].astype(int),
                           "anchor_label": orig["label"].astype(int), "path": orig["png"]})][:int(include_originals)]
    for gen, index_path in cf_indexes.items():
        cf = pd.read_csv(index_path)
        need = {"anchor_id", "anchor_label", "target_label", "path"}
        if not need <= set(cf.columns):
            raise ValueError(f"{index_path} lacks columns {sorted(need - set(cf.columns))} (see cfaudit/counterfactuals.py)")
        parts.append(pd.DataFrame({"image_id": cf["anchor_id"], "generator": gen,
                                   "target_label": cf["target_label"].astype(int),
                                   "anchor_label": cf["anchor_label"].astype(int), "path": cf["path"]}))
    jobs = pd.concat(parts, ignore_index=True)
    missing = [p for p in jobs["path"] if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images to score are missing, e.g. {missing[:3]}; rerun the stage that wrote them")
    return jobs


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------
def _open(source) -> Image.Image:
    """A PIL image from a file path or a uint8 (H, W, 3) array (the judges score transformed images in memory)."""
    return Image.fromarray(source) if isinstance(source, np.ndarray) else Image.open(source)


def load_pil_cropped(path, resize_size: int, crop_size: int) -> np.ndarray:
    """The weights' authors' pipeline on the 8-bit file (or uint8 array): RGB -> Resize(resize_size) ->
    CenterCrop(crop_size) (torchvision on a PIL image: bilinear with PIL's antialiasing) -> uint8 (crop, crop, 3)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    with _open(path) as im:
        im = im.convert("RGB")
        if min(im.size) != resize_size:
            im = TF.resize(im, [resize_size], interpolation=InterpolationMode.BILINEAR)
        if im.size != (crop_size, crop_size):
            im = TF.center_crop(im, [crop_size, crop_size])
        return np.asarray(im, dtype=np.uint8)


def load_raw(path) -> np.ndarray:
    with _open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def backend_description(clf: AuditedClassifier, backend: str) -> str:
    if backend == "pil":
        text = (f"8-bit file -> PIL Resize({clf.resize_size}, bilinear) -> CenterCrop({clf.input_size}) -> "
                f"[-1,1] -> {clf.normalization}")
        if clf.spec.get("transform_input"):
            text += " -> transform_input=True"
        return text
    return f"8-bit file -> [-1,1] -> torch: {clf.preprocessing}"


def decode_ahead(paths: list, batch_size: int, load, workers: int):
    """Yield (start, list of uint8 arrays) per batch, decoding the next batch while the caller computes."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        starts = list(range(0, len(paths), batch_size))
        pending = None
        for k, s in enumerate(starts):
            if pending is None:
                pending = [pool.submit(load, p) for p in paths[s:s + batch_size]]
            current = pending
            nxt = starts[k + 1] if k + 1 < len(starts) else None
            pending = [pool.submit(load, p) for p in paths[nxt:nxt + batch_size]] if nxt is not None else None
            yield s, [f.result() for f in current]


@torch.no_grad()
def score_paths(clf: AuditedClassifier, paths: list, batch_size: int = 64, backend: str = "pil", workers: int = 2,
                bf16: bool = False) -> np.ndarray:
    """Logits (N, num_classes) of the classifier on the image files ``paths``, in order."""
    if backend not in BACKENDS:
        raise ValueError(f"resize backend {backend!r} is not one of {BACKENDS}")
    device = next(clf.parameters()).device
    _, amp = resolve_precision("auto" if bf16 else "fp32", device)  # bf16 on a GPU only
    out = np.zeros((len(paths), clf.num_classes), dtype=np.float32)
    if backend == "pil":
        def load(p):
            return load_pil_cropped(p, clf.resize_size, clf.input_size)
    else:
        load = load_raw
    for start, arrays in decode_ahead(list(paths), batch_size, load, workers):
        # torch backend: images of different sizes go through the model in same-size groups
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        for members in groups.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in members])).to(device, non_blocking=True)
            x = uint8_to_float(x)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = clf.forward_cropped(x) if backend == "pil" else clf(x)
            out[[start + i for i in members]] = logits.float().cpu().numpy()
    return out


def score_frame(clf: AuditedClassifier, jobs: pd.DataFrame, batch_size: int = 64, backend: str = "pil",
                workers: int = 2, bf16: bool = False) -> pd.DataFrame:
    logits = torch.from_numpy(score_paths(clf, jobs["path"].tolist(), batch_size, backend, workers, bf16))
    df = jobs.copy()
    if len(df):
        score = clf.score(logits)
        df["score"] = score.numpy().astype(np.float64)
        df["logit"] = logits[:, clf.positive_index].numpy().astype(np.float64)
        df["prob"] = torch.softmax(logits, 1)[:, clf.positive_index].numpy().astype(np.float64)
        df["pred"] = clf.decide(score).numpy().astype(int)
    else:
        for c in ("score", "logit", "prob", "pred"):
            df[c] = pd.Series(dtype=float)
    df["classifier"] = clf.name
    df["score_space"] = clf.score_space
    df["preprocessing"] = backend_description(clf, backend)
    return df[SCORE_COLUMNS]


def run_scoring(spec, anchors, pack_index, split, cf_indexes: dict, out_scores, scoring: dict, device,
                threads: int = 1, log=None, originals: bool = True, rule: str = "score") -> pd.DataFrame:
    """Rules score / score_oracle: load the classifier, score the originals (``originals``) and the
    counterfactuals of ``cf_indexes``, write the table + its sidecar."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.files import write_csv
    from cfaudit.provenance import now, write_provenance

    started = now()
    torch.set_num_threads(max(1, threads))
    clf = load_classifier(spec, device)
    jobs = scoring_jobs(pd.read_csv(anchors), pd.read_csv(pack_index), pd.read_csv(split), cf_indexes,
                        scoring["originals"], include_originals=originals)
    workers = scoring["workers"] or max(1, threads)
    t0 = time.time()
    df = score_frame(clf, jobs, scoring["batch_size"], scoring["resize_backend"], workers, scoring["bf16"])
    seconds = time.time() - t0
    write_csv(df, out_scores)
    counts = df.groupby("generator").size().to_dict()
    if log:
        log.info("scored %d images with %s on %s in %.1f s (%.1f img/s): %s", len(df), clf.name, device, seconds,
                 len(df) / max(seconds, 1e-9), counts)
    write_provenance(out_scores, [spec, anchors, pack_index, split, *cf_indexes.values()],
                     {"classifier.scoring": scoring, "classifier": {k: clf.spec[k] for k in
                      ("kind", "name", "arch", "input_size", "positive_index", "score_space", "threshold", "sha256")}},
                     rule=rule, started=started,
                     extra={"n_rows": counts, "seconds": round(seconds, 2), "torch_device": str(device)})
    return df
