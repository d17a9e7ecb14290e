"""Scoring throughput: images/s of :func:`cfaudit.scoring.score_paths` (decode + resize + forward) at the
classifier's input size, with random weights (they do not change the speed).

    python -m cfaudit.benchmark.scoring --n 128 --arch deepderm --device cpu --batch-size 32 --threads 2 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cfaudit.benchmark.timing import timed
from cfaudit.classifiers import AuditedClassifier, build_arch, build_deepderm, describe_preprocessing
from cfaudit.scoring import BACKENDS, score_paths


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
        t = timed(lambda: score_paths(clf, paths, batch_size, backend, workers, bf16), dev, repeats,
                  warmup=lambda: score_paths(clf, paths[:batch_size], batch_size, backend, workers, bf16))
    return {"arch": arch, "input_size": size, "n_images": n, "source_size": image_size if not images_dir else "files",
            "batch_size": batch_size, "device": str(dev), "threads": torch.get_num_threads(), "workers": workers,
            "backend": backend, "bf16": bf16 and dev.type == "cuda", "seconds": round(t.seconds, 3),
            "images_per_s": round(t.rate(n), 2), "cpu_seconds": round(t.cpu_seconds, 3),
            "images_per_cpu_s": round(n / max(t.cpu_seconds, 1e-9), 2), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cfaudit.benchmark.scoring",
                                 description="Scoring benchmark: images/s incl. decode + resize to the classifier input.")
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
