"""The trait stage's driver: measure anchors, originals and counterfactuals into one table, and write the
ranked summary "what the malignant counterfactual adds / what the benign counterfactual removes".

features.csv has one row per image:
``image_id, role (anchor | original | counterfactual), anchor_id, anchor_label, generator ("original" for
originals and anchors), target_label (ground truth for originals, the target for counterfactuals), path,
seg_ok, seg_flags``, every feature of cfaudit.traits.features, and for counterfactuals the change
features against their anchor. A counterfactual is resized (Lanczos) to its anchor's size first. For a
counterfactual, ``skin_ita`` and ``skin_redness`` are measured on the ring around the union of its and its
anchor's lesion, and the anchor's values on that same ring are in ``anchor_skin_ita``/``anchor_skin_redness``
(the paired tests use them), so a grown or shrunk lesion does not move the skin ring.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cfaudit.names import ORIGINAL
from cfaudit.traits.control import GENERATOR as CONTROL
from cfaudit.traits.control import control_verdict
from cfaudit.traits.features import (CHANGE_FEATURES, FEATURES, PAIRED_SKIN, FeatureSettings, change_features,
                                     image_features, skin_features, skin_region)
from cfaudit.traits.segmentation import SegmentationSettings
from cfaudit.traits.statistics import CHANGE_SHARE, DIRECTION, PRIOR_OF, VS_PRIOR, VS_RECONSTRUCTION, ranked

log = logging.getLogger("cfaudit.traits")
ID_COLUMNS = ["image_id", "role", "anchor_id", "anchor_label", "generator", "target_label", "path", "seg_ok", "seg_flags"]

# Plain-language name and unit of every feature (tables, figures, README).
DESCRIPTIONS = {
    "area": "lesion area (share of image)",
    "diameter": "equivalent diameter (share of side)",
    "feret_max": "max Feret diameter (share of side)",
    "major_axis": "major axis (share of side)",
    "minor_axis": "minor axis (share of side)",
    "asymmetry": "asymmetry, mean of both principal axes (1 - IoU with mirror)",
    "asymmetry_major": "asymmetry about the major axis",
    "asymmetry_minor": "asymmetry about the minor axis",
    "compactness": "border compactness P²/(4πA)",
    "solidity": "solidity (area / convex hull area)",
    "convexity": "convexity (hull perimeter / perimeter)",
    "n_colours": "number of ABCD colours",
    "has_blue_grey": "blue-grey region present",
    "has_white": "white region present",
    "has_red": "red region present",
    "colour_sd": "colour variation inside lesion (ΔE)",
    "lesion_lightness": "mean lesion lightness L*",
    "contrast": "lesion-vs-skin contrast ΔE",
    "frac_light_brown": "share of lesion light brown",
    "frac_dark_brown": "share of lesion dark brown",
    "frac_black": "share of lesion black",
    "frac_blue_grey": "share of lesion blue-grey",
    "frac_white": "share of lesion white",
    "frac_red": "share of lesion red",
    "skin_ita": "skin tone ITA (°, higher = lighter)",
    "skin_redness": "surrounding-skin redness a*",
    "hair": "hair coverage outside the lesion (share)",
    "ink": "marker-ink coverage outside the lesion (share)",
    "ruler": "ruler ticks outside the lesion (count)",
    "ink_lesion": "marker-ink colour inside the lesion (share)",
    "change_mean": "mean change vs anchor (ΔE)",
    CHANGE_SHARE: "share of the change inside the anchor's lesion (anchor column: lesion area)",
}


def settings_from_config(traits_cfg: dict) -> tuple[SegmentationSettings, FeatureSettings]:
    """Segmentation and feature settings from the ``traits`` config section."""
    return (SegmentationSettings.from_config(traits_cfg.get("segmentation")),
            FeatureSettings.from_config(traits_cfg.get("colours"), traits_cfg.get("skin")))


def selected_features(traits_cfg: dict) -> list[str]:
    """Features in the paired tests: all of them plus the change share, minus statistics.exclude_features."""
    excluded = list(traits_cfg.get("statistics", {}).get("exclude_features", []))
    known = FEATURES + [CHANGE_SHARE]
    unknown = sorted(set(excluded) - set(known))
    if unknown:
        raise KeyError(f"config key 'traits.statistics.exclude_features' names unknown features {unknown}; known: {known}")
    return [f for f in known if f not in excluded]


def select_originals(pack_index: pd.DataFrame, split: pd.DataFrame, which: str) -> pd.DataFrame | None:
    """Originals for the malignant-vs-benign reference: None (anchors only), the eval split, or all images."""
    if which == "anchors":
        return None
    if which not in ("eval", "all"):
        raise ValueError(f"config key 'traits.originals' must be anchors, eval or all, not {which!r}")
    idx = pack_index[["image_id", "label", "png"]]
    if which == "eval":
        idx = idx[idx["image_id"].isin(split.loc[split["split"] == "eval", "image_id"])]
    return idx.reset_index(drop=True)


def load_rgb(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 RGB array of an image file, resized (Lanczos) to ``size`` = (width, height) when given."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image {p} listed in the inputs does not exist; rerun the rule that writes it")
    with Image.open(p) as im:
        im = im.convert("RGB")
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _measure_group(job):
    """One anchor (or original) and its counterfactuals: features of each, change of each vs the anchor."""
    anchor, cfs, seg_cfg, feat_cfg = job
    seg, feat = SegmentationSettings(**seg_cfg), FeatureSettings(**feat_cfg)
    img = load_rgb(anchor["path"])
    f, res = image_features(img, seg, feat)
    rows = [{**anchor, **f}]
    for cf in cfs:
        cimg = load_rgb(cf["path"], size=(img.shape[1], img.shape[0]))
        cf_f, cres = image_features(cimg, seg, feat)
        rows.append({**cf, **cf_f, **change_features(img, cimg, res.mask), **paired_skin(res, cres, feat)})
    return rows


def paired_skin(anchor, cf, feat: FeatureSettings) -> dict:
    """Skin tone and redness of a counterfactual and of its anchor on the SAME pixels: the ring around the
    union of both lesion masks (minus hair and dark corners of either). Measured on each image's own ring,
    a grown lesion would push the ring outward into darker, vignetted skin and fake a change of skin tone."""
    exclude = anchor.hair | cf.hair | anchor.ink | cf.ink | ~anchor.usable | ~cf.usable
    ring = skin_region(anchor.mask | cf.mask, exclude, feat)
    a, c = skin_features(anchor.lab, ring), skin_features(cf.lab, ring)
    return {**c, **{f"anchor_{k}": v for k, v in a.items()}}


def measure(anchors: pd.DataFrame, cf_index: pd.DataFrame | None = None, originals: pd.DataFrame | None = None,
            seg: SegmentationSettings | None = None, feat: FeatureSettings | None = None, workers: int = 1) -> pd.DataFrame:
    """The features table (module docstring). ``anchors``/``originals``: image_id, label, png;
    ``cf_index``: the counterfactual contract's index (anchor_id, anchor_label, target_label, generator, path)."""
    seg, feat = seg or SegmentationSettings(), feat or FeatureSettings()
    seg_cfg, feat_cfg = seg.__dict__, feat.__dict__
    cf_index = cf_index if cf_index is not None else pd.DataFrame(columns=["anchor_id", "anchor_label", "target_label", "generator", "path"])
    unknown = sorted(set(cf_index["anchor_id"]) - set(anchors["image_id"]))
    if unknown:
        raise ValueError(f"{len(unknown)} counterfactuals belong to anchors missing from anchors.csv, e.g. {unknown[:3]}")
    by_anchor = {a: g for a, g in cf_index.groupby("anchor_id")}
    jobs = []
    for a in anchors.itertuples(index=False):
        base = {"image_id": a.image_id, "role": "anchor", "anchor_id": a.image_id, "anchor_label": int(a.label),
                "generator": ORIGINAL, "target_label": int(a.label), "path": a.png}
        cfs = []
        for c in by_anchor.get(a.image_id, pd.DataFrame()).itertuples(index=False):
            cfs.append({"image_id": f"{c.anchor_id}_{c.generator}_to{int(c.target_label)}", "role": "counterfactual",
                        "anchor_id": c.anchor_id, "anchor_label": int(c.anchor_label), "generator": c.generator,
                        "target_label": int(c.target_label), "path": c.path})
        jobs.append((base, cfs, seg_cfg, feat_cfg))
    if originals is not None:
        extra = originals[~originals["image_id"].isin(anchors["image_id"])]
        for o in extra.itertuples(index=False):
            base = {"image_id": o.image_id, "role": ORIGINAL, "anchor_id": o.image_id, "anchor_label": int(o.label),
                    "generator": ORIGINAL, "target_label": int(o.label), "path": o.png}
            jobs.append((base, [], seg_cfg, feat_cfg))
    rows: list[dict] = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for i, r in enumerate(pool.map(_measure_group, jobs, chunksize=max(1, len(jobs) // (8 * workers)))):
                rows += r
                _progress(i, len(jobs))
    else:
        for i, job in enumerate(jobs):
            rows += _measure_group(job)
            _progress(i, len(jobs))
    df = pd.DataFrame(rows)
    cols = FEATURES + CHANGE_FEATURES + [f"anchor_{k}" for k in PAIRED_SKIN]
    for col in cols:
        if col not in df:
            df[col] = np.nan
    return df[ID_COLUMNS + cols]


def _progress(i: int, n: int) -> None:
    if (i + 1) % 200 == 0 or i + 1 == n:
        log.info("measured %d / %d anchors and originals (with their counterfactuals)", i + 1, n)


def segmentation_summary(features: pd.DataFrame) -> pd.DataFrame:
    """Share of images with a usable segmentation and counts of each flag, per role/generator."""
    rows = []
    for (role, gen), g in features.groupby(["role", "generator"]):
        flags = pd.Series([f for s in g["seg_flags"].fillna("") for f in str(s).split(";") if f])
        rows.append({"role": role, "generator": gen, "n": len(g), "ok_share": float(g["seg_ok"].astype(bool).mean()),
                     **{f"flag_{k}": int(v) for k, v in flags.value_counts().items()}})
    return pd.DataFrame(rows).fillna(0)


# ----------------------------------------------------------------------------------------- markdown
def fmt_number(x, nd=3):
    """A number for the trait tables: nd decimals, scientific notation below 10^-nd or from 10^4, – for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    ax = abs(float(x))
    if ax != 0 and (ax < 10 ** -nd or ax >= 1e4):
        return f"{x:.2e}"
    return f"{x:.{nd}f}"


def _agrees(row, label_stats: pd.DataFrame | None) -> str:
    """Does the change point the way malignant originals differ from benign ones (significantly)?"""
    if label_stats is None or row["feature"] not in set(label_stats["feature"]):
        return "–"
    ref = label_stats.set_index("feature").loc[row["feature"]]
    if not ref["significant"] or not np.isfinite(row["mean_diff"]) or row["mean_diff"] == 0:
        return "–"
    toward_malignant = np.sign(row["mean_diff"]) == np.sign(ref["mean_diff"])
    want = row["target_label"] == 1
    return "yes" if toward_malignant == want else "no"


def reconstruction_markdown(paired: pd.DataFrame, generator: str) -> list[str]:
    """The artefact-controlled comparison (stratum vs_reconstruction) of one generator, both directions side by side."""
    rec = paired[(paired["generator"] == generator) & (paired["stratum"] == VS_RECONSTRUCTION)]
    if not len(rec) or rec["n"].max() == 0:
        return []
    cols = {t: rec[rec["target_label"] == t].set_index("feature") for t in (1, 0)}
    out = ["### Against the same-label reconstruction (regeneration artefacts cancel)", "",
           "Benign anchors: malignant counterfactual − the generator's benign reconstruction of the same anchor "
           f"({int(cols[1]['n'].max()) if len(cols[1]) else 0} pairs); malignant anchors: benign counterfactual − "
           f"malignant reconstruction ({int(cols[0]['n'].max()) if len(cols[0]) else 0} pairs). Same tests, Holm per column.", "",
           "| feature | → malignant: mean Δ [95% CI] | p_Holm | → benign: mean Δ [95% CI] | p_Holm |", "|---|---|---|---|---|"]
    order = cols[1].assign(_r=cols[1]["rank_biserial"].abs().fillna(0)).sort_values("_r", ascending=False).index \
        if len(cols[1]) else cols[0].index
    for f in order:
        cells = []
        for t in (1, 0):
            cells += _delta_cells(cols[t], f)
        out.append(f"| {DESCRIPTIONS.get(f, f)} (`{f}`) | " + " | ".join(cells) + " |")
    return out + [""]


def _delta_cells(family: pd.DataFrame, feature: str) -> list[str]:
    """'mean Δ [CI] (star)' and 'p_Holm' of one feature of a family indexed by feature ('–' where it is absent)."""
    if feature not in family.index:
        return ["–", "–"]
    r = family.loc[feature]
    star = " **\\***" if r["significant"] else ""
    return [f"{fmt_number(r['mean_diff'])} [{fmt_number(r['ci_low'])}, {fmt_number(r['ci_high'])}]{star}", fmt_number(r["p_holm"])]


def prior_markdown(paired: pd.DataFrame, generator: str) -> list[str]:
    """What the audited classifier's gradient added (stratum vs_prior): the generator's counterfactual − its prior
    alone toward the same target, ranked as ranked.md ranks (by the malignant-ward column)."""
    fam = {t: ranked(paired, generator, t, VS_PRIOR) for t in (1, 0)}
    if not len(fam[1]) or fam[1]["n"].max() == 0:
        return []
    cols = {t: fam[t].set_index("feature") for t in (1, 0)}
    out = [f"### Against the prior alone: what the classifier's gradient added ({PRIOR_OF[generator]})", "",
           f"Per anchor, the counterfactual − the counterfactual of `{PRIOR_OF[generator]}` (the same sampler, strength, "
           "mask, CFG and noise without the classifier) toward the same target: regeneration and the diffusion model's "
           f"own idea of each class cancel ({int(fam[1]['n'].max())} pairs). Ranked as above by the malignant-ward "
           "column; same tests, Holm per column.", "",
           "| rank | feature | → malignant: mean Δ [95% CI] | r_rb | p_Holm | → benign: mean Δ [95% CI] | p_Holm |",
           "|---|---|---|---|---|---|---|"]
    for i, f in enumerate(fam[1]["feature"], start=1):
        malignant = _delta_cells(cols[1], f)
        out.append(f"| {i} | {DESCRIPTIONS.get(f, f)} (`{f}`) | {malignant[0]} | {fmt_number(cols[1].at[f, 'rank_biserial'], 2)} | "
                   f"{malignant[1]} | " + " | ".join(_delta_cells(cols[0], f)) + " |")
    return out + [""]


def ranked_markdown(paired: pd.DataFrame, label_stats: pd.DataFrame | None, alpha: float, features_table: pd.DataFrame | None = None,
                    extra: list[str] = ()) -> str:
    """ranked.md: per generator, the malignant and benign counterfactuals' changes ranked by effect size;
    ``extra`` lines (the artefact section) follow the introduction."""
    out = ["# Trait analysis: what the counterfactuals add and remove", "",
           "Paired differences counterfactual − anchor per feature (anchors are the unit). ↑ = the counterfactual "
           "has more of it, ↓ = less. Ranked by |rank-biserial r| (matched pairs) among Holm-significant features "
           f"(Wilcoxon signed-rank, α = {alpha}) first. CI = percentile bootstrap of the mean difference. "
           "'agrees' = the change points the way malignant originals differ from benign ones in this dataset "
           "(only where that difference is itself significant). Pairs with a segmentation quality flag are left "
           "out of mask-based features. Full numbers: paired_stats.csv; per-image values: features.csv.", "", *extra]
    if features_table is not None and len(features_table):
        s = segmentation_summary(features_table)
        out += ["## Segmentation quality", "", "| role | generator | images | usable masks |", "|---|---|---|---|"]
        out += [f"| {r.role} | {r.generator} | {r.n} | {r.ok_share:.0%} |" for r in s.itertuples()]
        out.append("")
    gens = sorted(paired["generator"].unique()) if len(paired) else []
    if not gens:
        out += ["## Counterfactuals", "", "No counterfactual generator was analysed (counterfactuals.generators is "
                "empty and no positive control ran); only the originals are compared below.", ""]
    for g in gens:
        out += [f"## Generator `{g}`", ""]
        if g == CONTROL:
            v = control_verdict(paired, g)
            out += ["Positive control: the anchors re-rendered with the planted traits shifted toward each class "
                    "(cfaudit.traits.control). Planted features recovered with the expected sign and Holm-significant: "
                    f"**{int(v['recovered'].sum())} of {len(v)}**"
                    + ("" if v["recovered"].all() else " (missed: " + ", ".join(
                        f"`{r.feature}` → {DIRECTION[r.target_label]}" for r in v[~v["recovered"]].itertuples()) + ")")
                    + ".", ""]
        for target, title in ((1, "What the malignant counterfactual adds (↑) or removes (↓)"),
                              (0, "What the benign counterfactual removes (↓) or adds (↑)")):
            r = ranked(paired, g, target)
            if not len(r):
                continue
            n = int(r["n"].max())
            out += [f"### {title}", "", f"{n} anchor pairs (all anchors).", "",
                    "| rank | feature | | mean Δ [95% CI] | anchor → CF mean | d_z | r_rb | p_Holm | agrees |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for i, row in r.iterrows():
                arrow = "↑" if row["mean_diff"] > 0 else ("↓" if row["mean_diff"] < 0 else "=")
                star = " **\\***" if row["significant"] else ""
                out.append(
                    f"| {i + 1} | {DESCRIPTIONS.get(row['feature'], row['feature'])} (`{row['feature']}`){star} | {arrow} | "
                    f"{fmt_number(row['mean_diff'])} [{fmt_number(row['ci_low'])}, {fmt_number(row['ci_high'])}] | "
                    f"{fmt_number(row['anchor_mean'])} → {fmt_number(row['cf_mean'])} | {fmt_number(row['d_z'], 2)} | "
                    f"{fmt_number(row['rank_biserial'], 2)} | {fmt_number(row['p_holm'])} | {_agrees(row, label_stats)} |")
            sig = r[r["significant"]]
            up = [f"`{f}`" for f in sig[sig["mean_diff"] > 0]["feature"]]
            down = [f"`{f}`" for f in sig[sig["mean_diff"] < 0]["feature"]]
            out += ["", f"**{DIRECTION[target].capitalize()} counterfactual — more:** {', '.join(up) or 'nothing significant'}; "
                    f"**less:** {', '.join(down) or 'nothing significant'}.", ""]
        out += reconstruction_markdown(paired, g)
        out += prior_markdown(paired, g)
    if label_stats is not None and len(label_stats):
        ls = label_stats.assign(_d=label_stats["cliffs_delta"].abs().fillna(0)).sort_values(["significant", "_d"], ascending=[False, False])
        nb, nm = int(ls["n_benign"].max()), int(ls["n_malignant"].max())
        out += ["## Originals: malignant vs benign (reference)", "",
                f"{nm} malignant and {nb} benign originals (at most; images with a segmentation flag are left out of "
                "mask-based features). Δ = malignant mean − benign mean; Cliff's δ; Mann–Whitney U, Holm.", "",
                "| feature | | benign mean | malignant mean | Δ [95% CI] | Cliff's δ | p_Holm |", "|---|---|---|---|---|---|---|"]
        for row in ls.itertuples():
            arrow = "↑" if row.mean_diff > 0 else ("↓" if row.mean_diff < 0 else "=")
            star = " **\\***" if row.significant else ""
            out.append(f"| {DESCRIPTIONS.get(row.feature, row.feature)} (`{row.feature}`){star} | {arrow} | {fmt_number(row.benign_mean)} | "
                       f"{fmt_number(row.malignant_mean)} | {fmt_number(row.mean_diff)} [{fmt_number(row.ci_low)}, {fmt_number(row.ci_high)}] | "
                       f"{fmt_number(row.cliffs_delta, 2)} | {fmt_number(row.p_holm)} |")
        out.append("")
    return "\n".join(out) + "\n"
