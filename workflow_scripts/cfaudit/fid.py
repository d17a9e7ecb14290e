"""Realism of counterfactuals: FID and KID with pytorch-fid's Inception, or the classifier-feature FD.

* Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is placed by :func:`place_weights`
  (rule place_fid_weights) from a configured local file or URL into ``<torch_home>/hub/checkpoints/``, where
  ``torch.hub`` finds it without a download (pytorch-fid 0.3.0, src/pytorch_fid/inception.py, loads the weights with
  ``torch.hub.load_state_dict_from_url``, which uses a file already there). The model code is pytorch-fid's own
  ``InceptionV3`` (FID-Inception blocks, resize to 299 bilinear, [0,1] -> [-1,1]).
* When the weights cannot be had (no network, no local file), the stage reports the Fréchet distance and
  KID on an oracle's penultimate features (``clf.features`` of a classifier that no generator used, see
  :mod:`cfaudit.oracles`) instead. Those are NOT FID/KID and are labelled ``oracle-feature FD`` /
  ``oracle-feature KID`` everywhere, with the reason. Only with no oracle configured does it fall back to the
  audited classifier's features (``classifier-feature FD``), which favour images optimised against it.
* The Fréchet distance is computed here with symmetric eigendecompositions:
  ``|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2)``. pytorch-fid's ``calculate_frechet_distance``
  calls ``scipy.linalg.sqrtm(..., disp=False)``; SciPy 1.17 deprecates and 1.18 removes ``sqrtm``'s ``disp``
  argument (``sqrtm`` itself stays), so that call fails on SciPy >= 1.18.
* KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y/d + 1)^3`` over random subsets (Bińkowski
  et al. 2018), mean and standard deviation over the subsets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from cfaudit.files import atomic_output, atomic_write_text, sha256_file
from cfaudit.weights import RetriesExhausted, RetryPolicy, download

log = logging.getLogger("cfaudit.fid")

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HASH_PREFIX = "6726825d"  # torch.hub convention: the file name carries the sha256 prefix
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID = "FID"
KID = "KID"
CLF_FD = "classifier-feature FD"
CLF_KID = "classifier-feature KID"
ORACLE_FD = "oracle-feature FD"
ORACLE_KID = "oracle-feature KID"
METRIC_NAMES = {"fid": (FID, KID), "classifier": (CLF_FD, CLF_KID), "oracle": (ORACLE_FD, ORACLE_KID)}


class FIDWeightsMissing(RuntimeError):
    """The FID-Inception weights are not in TORCH_HOME; run rule place_fid_weights / set metrics.fid.weights_*."""


def weights_target(torch_home: str | os.PathLike) -> Path:
    return Path(torch_home) / "hub" / "checkpoints" / WEIGHTS_FILE


# ----------------------------------------------------------------------------------------------------------
# Placing the weights
# ----------------------------------------------------------------------------------------------------------
def place_weights(torch_home: str | os.PathLike, weights_path: str = "", url: str = "", check_hash: bool = True,
                  timeout: float = 60.0) -> dict:
    """Put the FID-Inception weights at ``<torch_home>/hub/checkpoints/<WEIGHTS_FILE>``; never raises for
    an unobtainable file. Returns the status record written to fid_weights.json:
    ``{available, path, sha256, hash_verified, source, reason, attempts}``.

    Order: ``weights_path`` (copied), a file already in place (kept), ``url`` (downloaded with
    ``timeout``, one attempt: :func:`cfaudit.weights.download`). With ``check_hash`` the file's sha256 must start with ``6726825d`` (pytorch-fid's
    release); a mismatching file is refused (removed from TORCH_HOME) and the reason recorded.
    """
    dst = weights_target(torch_home)
    dst.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[str] = []

    def verified(source: str) -> dict | None:
        digest = sha256_file(dst)
        ok = digest.startswith(WEIGHTS_HASH_PREFIX)
        if check_hash and not ok:
            attempts.append(f"{source}: sha256 {digest[:12]}… does not start with {WEIGHTS_HASH_PREFIX} "
                            "(not pytorch-fid's release file); set metrics.fid.check_hash: false to use it anyway")
            dst.unlink()
            return None
        return {"available": True, "path": str(dst), "sha256": digest, "hash_verified": ok, "source": source,
                "reason": "", "attempts": attempts}

    if weights_path:
        src = Path(weights_path)
        if src.is_file():
            with atomic_output(dst) as tmp:
                shutil.copyfile(src, tmp)
            if rec := verified(f"local file {src}"):
                return rec
        else:
            attempts.append(f"metrics.fid.weights_path {src} does not exist")
    elif dst.is_file():
        if rec := verified(f"already in {dst.parent}"):
            return rec
    if url:
        try:
            download(url, dst, policy=RetryPolicy(retries=0), timeout_s=timeout, logger=log)
            if rec := verified(f"downloaded from {url}"):
                return rec
        except Exception as err:  # noqa: BLE001 - any failure to download means "not available"
            problem = err.last if isinstance(err, RetriesExhausted) else f"{type(err).__name__}: {err}"
            attempts.append(f"download from {url} failed: {problem}")
    elif not weights_path:
        attempts.append("neither metrics.fid.weights_path nor metrics.fid.weights_url is set")
    reason = ("FID-Inception weights unavailable (" + "; ".join(attempts) + "). Put "
              f"{WEIGHTS_FILE} somewhere and set metrics.fid.weights_path, or allow the download from "
              "metrics.fid.weights_url, then rerun with `-R place_fid_weights`")
    return {"available": False, "path": None, "sha256": None, "hash_verified": False, "source": None,
            "reason": reason, "attempts": attempts}


def write_status(status: dict, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(status, indent=2))


# ----------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_home(path: str | os.PathLike):
    """Temporarily point TORCH_HOME (torch.hub's cache) at ``path``."""
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(Path(path).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = old


def fid_inception(home: str | os.PathLike, dims: int = 2048, device="cpu"):
    """pytorch-fid's ``InceptionV3`` for ``dims``-dimensional features, weights from ``home`` (no download)."""
    import torch
    from pytorch_fid.inception import InceptionV3

    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"metrics.fid.dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    target = weights_target(home)
    if not target.is_file():
        raise FIDWeightsMissing(f"{target} is missing; run rule place_fid_weights (metrics.fid.weights_path / "
                                "weights_url)")
    with torch_home(home):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=True, normalize_input=True)
    model = model.eval().to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def fid_inception_net():
    """pytorch-fid's FID-Inception network (the structure ``pytorch_fid.inception.fid_inception_v3`` builds) with
    torchvision's initialisation and no weights loaded; that function downloads its weights, so the structure is
    written out here for the benchmark (speed does not depend on the weights) and for the tests' seeded weights."""
    from pytorch_fid import inception as pi

    net = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pi.FIDInceptionE_1(1280)
    net.Mixed_7c = pi.FIDInceptionE_2(2048)
    return net


def batched_features(images: np.ndarray, batch_size: int, device, forward, scale: float, offset: float) -> np.ndarray:
    """(N, D) float64 of ``forward(x)`` over uint8 (N, H, W, 3) images, batch by batch without gradients;
    x = pixels / scale - offset as float (N, 3, H, W) on ``device`` (channels_last on a GPU)."""
    import torch

    from cfaudit.data.pack import uint8_to_float

    out = []
    dev = torch.device(device)
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[i:i + batch_size])).to(dev)
            x = uint8_to_float(x, scale, offset)
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(forward(x).flatten(1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def inception_features(model, images: np.ndarray, batch_size: int = 32, device="cpu") -> np.ndarray:
    """(N, dims) float64 features of uint8 (N, H, W, 3) images from :func:`fid_inception` ([0, 1] input)."""
    import torch.nn.functional as F

    def forward(x):
        f = model(x)[0]
        return F.adaptive_avg_pool2d(f, (1, 1)) if f.shape[-1] != 1 or f.shape[-2] != 1 else f

    return batched_features(images, batch_size, device, forward, 255.0, 0.0)


def classifier_features(clf, images: np.ndarray, batch_size: int = 32, device="cpu") -> np.ndarray:
    """(N, D) penultimate features of the audited classifier (``clf.features`` on [-1, 1] images)."""
    return batched_features(images, batch_size, device, clf.features, 127.5, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------
def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (covariances PSD)."""
    # Kept instead of pytorch-fid's calculate_frechet_distance: that passes sqrtm's `disp` argument, which SciPy
    # 1.18 removes; a general sqrtm of the non-symmetric S1 S2 also returns complex round-off that pytorch-fid has
    # to discard, while eigh of the symmetric S1^1/2 S2 S1^1/2 is real, and fd_to_reference reuses S1^1/2.
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum(), 0.0))


def fd_to_reference(reference: np.ndarray):
    """``fd(feats)``: the Fréchet distance of feature sets (N, D) to one fixed reference set, for many subsets.

    Tr sqrt(S_r^1/2 S S_r^1/2) has the non-zero eigenvalues of the N x N matrix B S_r B^T / (N - 1) (B = the
    centred ``feats``; C C^T and C^T C with C = B S_r^1/2 share them), so for N < D each call costs O(N D^2)
    instead of the O(D^3) of two D x D products and an eigendecomposition: a paired bootstrap of 2,048-d
    Inception features over a few hundred counterfactuals takes seconds instead of an hour on a CPU.
    """
    ref = np.asarray(reference, dtype=np.float64)
    ref_mu, ref_cov = feature_stats(ref)
    ref_trace, ref_sqrt = float(np.trace(ref_cov)), []

    def fd(feats: np.ndarray) -> float:
        f = np.asarray(feats, dtype=np.float64)
        n, b = len(f), f - f.mean(axis=0)
        if n <= f.shape[1]:
            m = b @ ref_cov @ b.T / (n - 1)
        else:
            ref_sqrt or ref_sqrt.append(_psd_sqrt(ref_cov))
            m = ref_sqrt[0] @ np.cov(f, rowvar=False) @ ref_sqrt[0]
        ev = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
        d = ref_mu - f.mean(axis=0)
        return float(max(d @ d + ref_trace + (b * b).sum() / (n - 1) - 2 * np.sqrt(ev).sum(), 0.0))

    return fd


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D); got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fd_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """``(mean, std, subset_size)`` of the unbiased polynomial-kernel MMD^2 over random subsets.

    When the subsets are the whole sets (``subset_size`` >= both sizes) there is one distinct subset: the
    value is computed once and the std is nan (no spread to report)."""
    f1 = np.asarray(f1, np.float64)
    f2 = np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = f1.shape[1]
    whole = m == len(f1) == len(f2)
    if whole:
        subsets = 1
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2 * kxy.mean())
    return float(vals.mean()), (np.nan if whole else float(vals.std())), m


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3), PIL bicubic; unchanged when already that size."""
    from PIL import Image

    images = np.asarray(images)
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def load_pngs(paths, size: int) -> np.ndarray:
    """Read RGB images and bring them to ``size`` x ``size`` (PIL bicubic)."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            out.append(np.asarray(im))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def subsample(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subset of ``n`` out of ``n_total`` (all when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, n, replace=False))


def class_matched_size(real_labels: np.ndarray, set_labels: dict[str, np.ndarray], n: int) -> int:
    """Images per class when every set and the real reference are drawn with the same number of images of each
    class (the counterfactuals' targets are balanced): min(n // classes, the rarest class in any set)."""
    classes = sorted(set(np.unique(real_labels)) | set().union(*(np.unique(v) for v in set_labels.values())))
    counts = [int((lab == c).sum()) for lab in [real_labels, *set_labels.values()] for c in classes]
    return int(min([n // max(len(classes), 1)] + counts))


def stratified_subsample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` seeded picks from every class present in ``labels``."""
    picks = [np.flatnonzero(labels == c)[subsample(int((labels == c).sum()), per_class, rng)] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def realism_table(real: np.ndarray, sets: dict[str, np.ndarray], extract, *, mode: str, n: int, seed: int,
                  kid_subsets: int, kid_subset_size: int, resolution: int, implementation: str,
                  note: str = "", real_labels: np.ndarray | None = None,
                  set_labels: dict[str, np.ndarray] | None = None,
                  features_out: dict | None = None) -> "pd.DataFrame":
    """FD and KID of every image set in ``sets`` against ``real`` at ONE common N.

    ``real`` and each set: uint8 (N, resolution, resolution, 3). ``extract(images) -> (N, D)`` features.
    ``mode``: "fid" (rows FID / KID), "oracle" (oracle-feature FD / KID) or "classifier" (classifier-feature
    FD / KID: the audited classifier's features, not independent of classifier-guided generators).
    ``features_out``: {set name ("__real__" = the reference): None}; filled with every image's features of those sets.
    Without labels N is ``min(n, len(real), every set's size)`` and each set (and the real set) is subsampled to
    N with a seeded generator. With ``real_labels`` and ``set_labels`` (a label per image: the target for
    counterfactuals) every set and the real reference are drawn class-matched, the same number m of images of
    each class (N = m x classes): a generator whose counterfactuals do reach the other class is then compared
    with real images of that class, instead of with the eval split's class mix (mostly benign in ISIC).
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    matched = real_labels is not None and set_labels is not None
    labels = {"__real__": real_labels, **(set_labels or {})}
    if matched:
        per_class = class_matched_size(np.asarray(real_labels), {k: np.asarray(v) for k, v in set_labels.items()}, n)
        if per_class < 2:
            raise ValueError(f"class-matched realism needs at least 2 images of each class in every set and in the real "
                             f"eval images (got {per_class}); set metrics.fid.reference: eval")
        n_used = per_class * len(np.unique(real_labels))
        reference = f"class-matched: {per_class} images per class"
    else:
        sizes = [len(real)] + [len(v) for v in sets.values()]
        n_used = int(min([n] + sizes))
        if n_used < 2:
            raise ValueError(f"realism metrics need at least 2 images per set; sizes {sizes}")
        reference = "the eval split's class mix"

    def draw(name: str, total: int) -> np.ndarray:
        if matched:
            return stratified_subsample(np.asarray(labels[name]), per_class, rng)
        return subsample(total, n_used, rng)

    def features(name: str, images: np.ndarray) -> np.ndarray:
        """The subsample's features; for a set named in ``features_out`` every image's features are extracted once
        (eval mode: per image), kept there, and subsampled (same draw, same numbers)."""
        idx = draw(name, len(images))
        if features_out is None or name not in features_out:
            return extract(images[idx])
        features_out[name] = extract(images)
        return features_out[name][idx]

    real_feats = features("__real__", real)
    fd_name, kid_name = METRIC_NAMES[mode]
    rows = []
    for pos, (name, images) in enumerate(sets.items()):
        feats = features(name, images)
        fd = fd_from_features(real_feats, feats)
        k_mean, k_std, k_m = kid(real_feats, feats, kid_subsets, kid_subset_size, seed + 1 + pos)
        common = {"set": name, "n_real": n_used, "n_generated": n_used, "n_available": len(images),
                  "feature_dims": real_feats.shape[1], "resolution": resolution, "reference": reference,
                  "implementation": implementation, "note": note}
        rows.append({**common, "metric": fd_name, "value": fd, "std": np.nan, "kid_subset_size": np.nan})
        rows.append({**common, "metric": kid_name, "value": k_mean, "std": k_std, "kid_subset_size": k_m})
    cols = ["set", "metric", "value", "std", "n_real", "n_generated", "n_available", "feature_dims", "resolution",
            "kid_subset_size", "reference", "implementation", "note"]
    return pd.DataFrame(rows, columns=cols)
