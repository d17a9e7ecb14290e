"""File-level steps of the metrics stage: read the upstream contracts, call the pure functions in
metrics / fid / figures, write the outputs. One function per rule; entry scripts only add logging and
provenance. Upstream contracts read here:

* results/scores/scores.csv (cfaudit/scoring.py): image_id (the anchor's id for counterfactuals),
  generator ("original" for originals), target_label, anchor_label, path, score, ...
* results/counterfactuals/<g>/index.csv (cfaudit/counterfactuals.py): anchor_id, anchor_label,
  target_label, generator, path, ...
* results/data/anchors.csv: image_id, label, png
* results/classifier/classifier.json: threshold, score_space, name (cfaudit/classifiers.py)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cfaudit import metrics as M
from cfaudit.files import atomic_output, atomic_write_text, write_csv

log = logging.getLogger("cfaudit.metrics")


def read_spec(spec_path) -> dict:
    """threshold / score_space / name of the audited classifier from classifier.json (no torch import)."""
    p = Path(spec_path)
    if not p.is_file():
        raise FileNotFoundError(f"classifier spec {p} not found: run the classifier stage first (snakemake {p})")
    spec = json.loads(p.read_text())
    missing = [k for k in ("threshold", "score_space") if k not in spec]
    if missing:
        raise KeyError(f"classifier spec {p} lacks {missing}; rerun the classifier stage")
    return spec


def read_scores(scores_path, anchors_path=None) -> pd.DataFrame:
    """The scores table (one path, or several parts of it) with an ``anchor_id`` column (metrics.attach_anchor_ids)."""
    paths = [scores_path] if isinstance(scores_path, (str, os.PathLike)) else list(scores_path)
    scores = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    need = {"image_id", "generator", "target_label", "path", "score"}
    if missing := need - set(scores.columns):
        raise KeyError(f"{scores_path} lacks columns {sorted(missing)}; rerun the scoring stage")
    anchors = pd.read_csv(anchors_path)["image_id"].astype(str) if anchors_path else None
    scores["image_id"] = scores["image_id"].astype(str)
    return M.attach_anchor_ids(scores, anchors)


# ----------------------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------------------
def make_table1(scores_path, anchors_path, spec_path, generators, bootstrap: dict, seed: int,
                out_csv, out_md, out_html, oracle_scores: dict | None = None,
                oracle_specs: dict | None = None) -> pd.DataFrame:
    """Table 1; with ``oracle_scores`` / ``oracle_specs`` ({name: path}) also the independent judges' rows."""
    from cfaudit.report import table_html

    spec = read_spec(spec_path)
    scores = read_scores(scores_path, anchors_path)
    if "score_space" in scores.columns:
        spaces = set(scores["score_space"].dropna().astype(str))
        if spaces and spaces != {spec["score_space"]}:
            raise ValueError(f"{scores_path} holds scores in {sorted(spaces)} but {spec_path} says "
                             f"{spec['score_space']}; rerun the scoring stage")
    table = M.table1(scores, list(generators), float(spec["threshold"]), bootstrap["resamples"], seed,
                     bootstrap["level"])
    if oracle_scores:
        from cfaudit.judges import oracle_table1_rows

        tabs = {n: read_scores(p, anchors_path) for n, p in oracle_scores.items()}
        thr = {n: float(read_spec(p)["threshold"]) for n, p in (oracle_specs or {}).items()}
        extra = oracle_table1_rows(scores, float(spec["threshold"]), tabs, thr, list(generators), bootstrap, seed)
        table = pd.concat([table, extra], ignore_index=True)
    table.insert(2, "score_space", spec["score_space"])
    table.insert(3, "classifier", spec.get("name", ""))
    write_csv(table, out_csv)
    foot = [f"Classifier {spec.get('name', '?')}, score space {spec['score_space']}, fixed threshold "
            f"{spec['threshold']} (prediction score > threshold); best-F1 threshold from the full sweep "
            "(score >= threshold); flips counted on anchors the classifier got right at the fixed threshold.",
            f"{bootstrap['resamples']} bootstrap resamples, seed {seed}."]
    atomic_write_text(out_md, M.table1_markdown(table, footnotes=foot))
    atomic_write_text(out_html, table_html(M.table1_wide(table), "Table 1", M.table1_notes(table) + foot))
    log.info("Table 1: %d rows for groups %s", len(table), list(dict.fromkeys(table["group"])))
    return table


# ----------------------------------------------------------------------------------------------------------
# Closeness
# ----------------------------------------------------------------------------------------------------------
def _read_rgb(path, size: int | None):
    from PIL import Image

    with Image.open(path) as im:
        return comparable_pair(np.asarray(im.convert("RGB")), None, size)[0]


def comparable_pair(anchor: np.ndarray, other: np.ndarray | None, size: int | None):
    """(anchor, other) as uint8 arrays of one shape for pixel-by-pixel comparison (PIL bicubic).

    ``size`` (metrics.closeness.size) brings both to size x size; None keeps the anchor's size and brings
    ``other`` to it. Generators write at different sizes (a published GAN at the classifier's 299 px, the
    diffusion models at image_size): closeness and the diagnostics compare at the same, recorded size.
    """
    from PIL import Image

    def to(im, hw):
        return im if im.shape[:2] == hw else np.asarray(Image.fromarray(im).resize(hw[::-1], Image.BICUBIC))

    hw = anchor.shape[:2] if size is None else (int(size), int(size))
    return to(anchor, hw), (None if other is None else to(other, hw))


def make_closeness(index_paths: dict, anchors_path, cfg: dict, bootstrap: dict, seed: int, out_summary,
                   out_per_image, out_html=None) -> tuple[pd.DataFrame, list[str]]:
    """Per-image closeness of every counterfactual to its anchor + the per-generator summary.

    Returns (summary, files read). Both images are brought to ``cfg['size']`` (or the anchor's size).
    """
    anchors = pd.read_csv(anchors_path)
    anchors["image_id"] = anchors["image_id"].astype(str)
    if "png" not in anchors.columns:
        raise KeyError(f"{anchors_path} lacks the png column; rerun rule anchors")
    anchor_png = dict(zip(anchors["image_id"], anchors["png"]))
    rows, read = [], []
    cache: dict[str, np.ndarray] = {}
    for gen, ipath in index_paths.items():
        idx = pd.read_csv(ipath)
        idx["anchor_id"] = idx["anchor_id"].astype(str)
        for r in idx.itertuples(index=False):
            if r.anchor_id not in anchor_png:
                raise KeyError(f"{ipath}: anchor {r.anchor_id} is not in {anchors_path}; rerun the {gen} stage")
            a = cache.get(r.anchor_id)
            if a is None:
                a = cache[r.anchor_id] = _read_rgb(anchor_png[r.anchor_id], cfg["size"])
                read.append(anchor_png[r.anchor_id])
            c = comparable_pair(a, _read_rgb(r.path, None), None)[1]
            read.append(r.path)
            m = M.closeness(a, c, cfg["pixel_change_tolerance"], cfg["ssim_window"], cfg["ssim_sigma"])
            rows.append({"generator": gen, "anchor_id": r.anchor_id, "anchor_label": int(r.anchor_label),
                         "target_label": int(r.target_label), "path": r.path, "compared_at": a.shape[0], **m})
    per_image = pd.DataFrame(rows)
    if per_image.empty:
        raise ValueError("no counterfactuals to compare: the counterfactual indexes are empty")
    summary = M.closeness_summary(per_image, bootstrap["resamples"], seed, bootstrap["level"])
    summary["pixel_change_tolerance"] = cfg["pixel_change_tolerance"]
    summary["compared_at"] = int(per_image["compared_at"].iloc[0]) if cfg["size"] is None else cfg["size"]
    write_csv(per_image, out_per_image)
    write_csv(summary, out_summary)
    if out_html:
        from cfaudit.report import table_html

        wide = summary.assign(value=[f"{e:.4f} [{lo:.4f}, {hi:.4f}]" for e, lo, hi in
                                     zip(summary["estimate"], summary["ci_low"], summary["ci_high"])])
        wide = wide.pivot_table(index=["generator", "direction"], columns="metric", values="value",
                                aggfunc="first", sort=False).reset_index()
        atomic_write_text(out_html, table_html(wide, "Closeness of counterfactuals to their anchors", [
            "L1 = mean |difference|, L2 = root-mean-square difference (intensities in [0, 1]); SSIM with an "
            f"{cfg['ssim_window']}-tap Gaussian window (sigma {cfg['ssim_sigma']}); frac_changed = share of "
            f"pixels whose largest channel difference exceeds {cfg['pixel_change_tolerance']} levels.",
            f"Mean [{bootstrap['level']:.0%} bootstrap interval over anchors, {bootstrap['resamples']} resamples]."]))
    return summary, read


# ----------------------------------------------------------------------------------------------------------
# Realism (FID / KID or classifier-feature FD / KID)
# ----------------------------------------------------------------------------------------------------------
def real_reference_index(split_path, anchors_path) -> pd.DataFrame:
    """The real images every realism and gamut judge compares with: the eval split WITHOUT the anchors (a generator
    starts from its anchors, so a reference containing them rewards copying them)."""
    split = pd.read_csv(split_path)
    anchors = set(pd.read_csv(anchors_path)["image_id"].astype(str))
    ref = split[(split["split"] == "eval") & ~split["image_id"].astype(str).isin(anchors)]
    counts = ref["label"].value_counts().reindex([0, 1], fill_value=0)
    if counts.min() < 2:
        raise ValueError(f"the eval split has {counts[0]} benign and {counts[1]} malignant images that are not anchors "
                         f"({split_path}, {anchors_path}); the realism reference needs at least 2 of each: lower "
                         "split.max_anchors or raise split.eval_fraction")
    return ref.reset_index(drop=True)


def _feature_extractor(status: dict, feature_spec, spec_path, cfg: dict, device, torch_home):
    """(extract(images) -> features, mode, implementation, note): FID-Inception when its weights were placed, else an
    oracle's penultimate features, else (no oracle configured) the audited classifier's, labelled as such."""
    from cfaudit import fid as F

    if status.get("available"):
        import pytorch_fid

        model = F.fid_inception(torch_home, cfg["dims"], device)
        impl = (f"pytorch-fid {pytorch_fid.__version__} InceptionV3 (FID weights {status['path']}, sha256 "
                f"{status['sha256'][:16]}…, hash_verified={status['hash_verified']}), {cfg['dims']}-d block, "
                f"bilinear resize to 299; FD: cfaudit.fid.frechet_distance (eigh)")
        note = "" if status["hash_verified"] else ("weights NOT pytorch-fid's release file (hash not verified): "
                                                   "values are not comparable to published FIDs")
        return (lambda images: F.inception_features(model, images, cfg["batch_size"], device)), "fid", impl, note
    from cfaudit.classifiers import load_classifier

    absent = "FID absent: " + status.get("reason", "FID-Inception weights unavailable")
    clf = load_classifier(feature_spec or spec_path, device)
    mode = "oracle" if feature_spec else "classifier"
    who = ("oracle" if feature_spec else "AUDITED classifier (no oracle configured: NOT independent of guided "
           "generators)")
    impl = (f"penultimate features of the {who} {getattr(clf, 'name', '?')} ({getattr(clf, 'preprocessing', '')}); "
            "FD: cfaudit.fid.frechet_distance (eigh)")
    return (lambda images: F.classifier_features(clf, images, cfg["batch_size"], device)), mode, impl, absent


def make_realism(status_path, index_paths: dict, pack, pack_index, split, anchors_path, spec_path, feature_spec,
                 cfg: dict, seed: int, resolution: int, device, torch_home, out_csv, out_html=None,
                 out_features=None) -> tuple[pd.DataFrame, dict]:
    """fid.csv: FID/KID with pytorch-fid's Inception when its weights were placed, else the oracle-feature FD/KID
    with the reason FID is absent. The real reference is the eval split without the anchors; the train images
    at the same N give the real-vs-real floor. ``out_features`` (npz): every image's features (reference and each
    generator's counterfactuals with their anchor ids), for the judges' paired intervals. Returns (table, info)."""
    from cfaudit import fid as F
    from cfaudit.data.pack import load_pack

    status = json.loads(Path(status_path).read_text())
    ref_ids = set(real_reference_index(split, anchors_path)["image_id"].astype(str))
    real, real_index = load_pack(pack, pack_index, split, "eval")
    keep = real_index["image_id"].astype(str).isin(ref_ids).to_numpy()
    real, real_index = F.resize_uint8(real[keep], resolution), real_index[keep].reset_index(drop=True)
    sets: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    anchor_ids: dict[str, np.ndarray] = {}
    read = []
    for gen, ipath in index_paths.items():
        index = pd.read_csv(ipath)
        sets[gen] = F.load_pngs(index["path"].tolist(), resolution)
        labels[gen] = index["target_label"].to_numpy(int)
        anchor_ids[gen] = index["anchor_id"].astype(str).to_numpy(dtype=str)  # unicode: loads without pickle
        read += index["path"].tolist()
    if cfg["reference_train"]:
        train, train_index = load_pack(pack, pack_index, split, "train")
        if len(train) >= 2:
            sets["real train (reference)"] = F.resize_uint8(train, resolution)
            labels["real train (reference)"] = train_index["label"].to_numpy(int)
    matched = cfg["reference"] == "class_matched"
    extract, mode, impl, note = _feature_extractor(status, feature_spec, spec_path, cfg, device, torch_home)
    all_feats: dict = dict.fromkeys(["__real__", *index_paths])  # the sets whose per-image features are kept
    table = F.realism_table(real, sets, extract, mode=mode, n=cfg["n"], seed=seed, kid_subsets=cfg["kid_subsets"],
                            kid_subset_size=cfg["kid_subset_size"], resolution=resolution, implementation=impl,
                            note=note, real_labels=real_index["label"].to_numpy(int) if matched else None,
                            set_labels=labels if matched else None, features_out=all_feats)
    table["reference_images"] = "eval split without the anchors"
    write_csv(table, out_csv)
    if out_features:
        arrays = {"reference": all_feats["__real__"], "reference_label": real_index["label"].to_numpy(int)}
        for gen in index_paths:
            arrays[f"gen:{gen}"] = all_feats[gen]
            arrays[f"anchor:{gen}"] = anchor_ids[gen]
            arrays[f"target:{gen}"] = labels[gen]
        with atomic_output(out_features) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    if out_html:
        from cfaudit.report import table_html

        show = table[["set", "metric", "value", "std", "n_real", "n_generated", "feature_dims", "resolution"]]
        notes = [f"Implementation: {impl}.", f"Reference: {table['reference'].iloc[0]}, drawn from the eval images "
                 "that are not anchors." if len(table) else "",
                 "'real train (reference)' is the real-vs-real floor: what real images score at the same N. "
                 "N is the same for every row (the smallest set, capped at metrics.fid.n); FID-type numbers are "
                 "biased upward at small N and comparable only at the same N. KID: mean ± std over subsets."]
        atomic_write_text(out_html, table_html(show, "Realism of counterfactuals vs real eval images", [note] + notes))
    log.info("realism (%s): N=%d, %s", mode, int(table["n_real"].iloc[0]),
             dict(zip(table["set"] + " " + table["metric"], table["value"].round(4))))
    return table, {"mode": mode, "implementation": impl, "n": int(table["n_real"].iloc[0]), "note": note,
                   "weights": status, "read_files": read}


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def make_curves(scores_path, anchors_path, spec_path, generator: str, out_pr, out_roc, dpi: int) -> dict:
    from cfaudit import figures as FG

    spec = read_spec(spec_path)
    scores = read_scores(scores_path, anchors_path)
    if (scores["generator"] == generator).sum() == 0:
        raise ValueError(f"{scores_path} has no rows for generator '{generator}'; rerun the scoring stage")
    pr = FG.pr_figure(scores, generator, out_pr, spec["score_space"], dpi)
    roc = FG.roc_figure(scores, generator, out_roc, spec["score_space"], dpi)
    return {"pr": pr, "roc": roc}


def make_histograms(scores_path, anchors_path, spec_path, generators, out_png, bins: int, dpi: int) -> None:
    from cfaudit import figures as FG

    spec = read_spec(spec_path)
    scores = read_scores(scores_path, anchors_path)
    FG.score_histograms(scores, list(generators), out_png, float(spec["threshold"]), spec["score_space"], bins, dpi)


def make_loss_figure(loss_paths: dict, out_png, dpi: int) -> dict:
    """``loss_paths``: {name: path or None}; returns {name: reason} for records that could not be plotted."""
    from cfaudit import figures as FG

    losses = {name: FG.read_loss_csv(p) for name, p in loss_paths.items()}
    FG.loss_figure(losses, out_png, dpi)
    return {name: reason for name, (_, reason) in losses.items() if reason}


def make_realism_figure(fid_csv, out_png, dpi: int) -> None:
    from cfaudit import figures as FG

    table = pd.read_csv(fid_csv, keep_default_na=False, na_values=[""])
    note = str(table["note"].iloc[0]) if "note" in table.columns and len(table) and isinstance(table["note"].iloc[0], str) else ""
    FG.realism_figure(table, out_png, dpi, reason=note)
