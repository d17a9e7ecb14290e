"""Scoring: the audited classifier's verdict on every original and counterfactual, from the saved 8-bit files.

One long table, results/scores/scores.csv, one row per image:

``image_id`` (the anchor's id for a counterfactual), ``generator`` ("original" for the real images),
``target_label`` (ground truth for originals, the requested class for counterfactuals: 0 benign,
1 malignant), ``anchor_label`` (the anchor's ground truth), ``path`` (the PNG scored), ``score`` (in the
configured score space), ``logit`` (raw positive-class logit), ``prob`` (softmax probability of the
positive class), ``pred`` (score > threshold), ``classifier``, ``score_space``, ``preprocessing``.

Images are decoded and resized in a thread pool (PIL releases the GIL), one batch ahead of the model.
``python -m cfaudit.scoring --benchmark`` prints images/s at 299 including decode and resize.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from cfaudit.classifiers import AuditedClassifier

SCORE_COLUMNS = ["image_id", "generator", "target_label", "anchor_label", "path", "score", "logit", "prob", "pred",
                 "classifier", "score_space", "preprocessing"]
ORIGINAL = "original"
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
    autocast = bf16 and device.type == "cuda"
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
            x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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


# ----------------------------------------------------------------------------------------------------------
# Benchmark: python -m cfaudit.scoring --benchmark
# ----------------------------------------------------------------------------------------------------------
def benchmark_paths(n: int, image_size: int, images_dir: str, tmp: str) -> list[str]:
    """``n`` image paths for a throughput benchmark: real JPEG/PNG files from ``images_dir`` (cycled), else smooth
    synthetic PNGs of ``image_size`` written to the folder ``tmp``."""
    if images_dir:
        files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise FileNotFoundError(f"no .jpg/.png images in {images_dir}")
        return [str(files[i % len(files)]) for i in range(n)]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    paths = []
    for i in range(n):
        c = rng.uniform(0, 255, 3)
        img = np.clip(c[None, None] * (0.6 + 0.4 * np.sin(6 * xx + i)[..., None] * np.cos(5 * yy)[..., None])
                      + rng.normal(0, 8, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
        p = os.path.join(tmp, f"b{i:05d}.png")
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def benchmark(n: int = 128, image_size: int = 256, arch: str = "deepderm", batch_size: int = 32, device: str = "cpu",
              workers: int = 2, backend: str = "pil", images_dir: str = "", bf16: bool = False, repeats: int = 1) -> dict:
    """Images/s of :func:`score_paths` (decode + resize + forward) with a randomly initialised classifier.

    Uses real JPEG/PNG files from ``images_dir`` when given (cycled to ``n``), else writes ``n`` smooth
    synthetic PNGs of ``image_size`` to a temporary folder. Weights do not change the speed.
    """
    import tempfile

    from cfaudit.classifiers import AuditedClassifier, build_arch, build_deepderm, describe_preprocessing

    if arch == "deepderm":
        net, size, norm, ti = build_deepderm(), 299, "imagenet", True
    else:
        net, size, norm, ti = build_arch(arch, 2), image_size, "minus_one_one", False
    spec = {"kind": "benchmark", "name": arch, "arch": arch, "input_size": size, "resize_size": size, "num_classes": 2,
            "positive_index": 1, "score_space": "softmax", "threshold": 0.5, "normalization": norm, "transform_input": ti}
    spec["preprocessing"] = describe_preprocessing(spec)
    dev = torch.device(device)
    clf = AuditedClassifier(net, spec).to(dev)
    if dev.type == "cuda":
        clf = clf.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        paths = benchmark_paths(n, image_size, images_dir, tmp)
        score_paths(clf, paths[:batch_size], batch_size, backend, workers, bf16)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best, cpu = float("inf"), float("inf")
        for _ in range(repeats):
            t0, c0 = time.time(), time.process_time()
            score_paths(clf, paths, batch_size, backend, workers, bf16)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.time() - t0)
            cpu = min(cpu, time.process_time() - c0)
    return {"arch": arch, "input_size": size, "n_images": n, "source_size": image_size if not images_dir else "files",
            "batch_size": batch_size, "device": str(dev), "threads": torch.get_num_threads(), "workers": workers,
            "backend": backend, "bf16": bf16 and dev.type == "cuda", "seconds": round(best, 3),
            "images_per_s": round(n / best, 2), "cpu_seconds": round(cpu, 3),
            "images_per_cpu_s": round(n / max(cpu, 1e-9), 2), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Scoring benchmark: images/s incl. decode + resize to the classifier input.")
    ap.add_argument("--benchmark", action="store_true", required=True)
    ap.add_argument("--n", type=int, default=128, help="images to score")
    ap.add_argument("--image-size", type=int, default=256, help="side of the synthetic source PNGs")
    ap.add_argument("--images", default="", help="score real files from this folder instead (e.g. ../shared/data/isic2017_256/images)")
    ap.add_argument("--arch", default="deepderm", help="deepderm (Inception-v3 at 299) or a torchvision name")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--workers", type=int, default=2, help="decode threads")
    ap.add_argument("--backend", choices=BACKENDS, default="pil")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = benchmark(a.n, a.image_size, a.arch, a.batch_size, a.device, a.workers, a.backend, a.images, a.bf16, a.repeats)
    print(" ".join(f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
