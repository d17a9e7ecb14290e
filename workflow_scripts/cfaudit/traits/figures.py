"""Figures of the trait analysis (matplotlib, Agg). Each function returns a Figure; the caller saves it and
writes its provenance sidecar.

- ``differences_figure``: per top feature, the paired differences (counterfactual - anchor) of every
  generator and direction as a violin + jittered strip, with the mean and its bootstrap CI.
- ``examples_figure``: for one generator, per top feature, the anchor | counterfactual pairs with the
  largest change in the direction of the effect, lesion outlines drawn (anchor: green, CF: yellow).
- ``originals_figure``: malignant vs benign originals for the features that separate them most.
- ``segmentation_figure``: anchors with their lesion outline and quality flags (segmentation check).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cfaudit.traits.analysis import DESCRIPTIONS, load_rgb
from cfaudit.traits.features import MASK_FEATURES
from cfaudit.traits.segmentation import SegmentationSettings, segment
from cfaudit.traits.statistics import DIRECTION, paired_frame

COLOURS = {1: "#c0392b", 0: "#2e86c1"}  # malignant target, benign target


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _message_figure(text: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


FAMILIES = {
    "size": ["area", "diameter", "feret_max", "major_axis", "minor_axis"],
    "asymmetry": ["asymmetry", "asymmetry_major", "asymmetry_minor"],
    "border": ["compactness", "solidity", "convexity"],
    "colour": ["n_colours", "has_blue_grey", "has_white", "has_red", "colour_sd", "frac_light_brown", "frac_dark_brown",
               "frac_black", "frac_blue_grey", "frac_white", "frac_red"],
    "tone": ["lesion_lightness", "contrast"],
    "skin": ["skin_ita", "skin_redness"],
    "hair": ["hair"],
    "ink": ["ink", "ink_lesion"],
    "ruler": ["ruler"],
    "change": ["change_inside_share"],
}
FAMILY_OF = {f: fam for fam, feats in FAMILIES.items() for f in feats}


def diverse_top(scores: pd.Series, k: int) -> list[str]:
    """The k best-scoring features, the best of each family (size, asymmetry, border, colour, ...) first, so
    k panels do not all show the same trait measured five ways; remaining slots by score."""
    order = list(scores.sort_values(ascending=False).index)
    picked, seen = [], set()
    for f in order:
        fam = FAMILY_OF.get(f, f)
        if fam not in seen:
            picked.append(f)
            seen.add(fam)
    picked = picked[:k]
    picked += [f for f in order if f not in picked][: k - len(picked)]
    return sorted(picked, key=order.index)


def top_features(paired: pd.DataFrame, k: int, generator: str | None = None) -> list[str]:
    """k features with the largest |rank-biserial| (Holm-significant first) in the 'all' stratum, diverse."""
    sub = paired[paired["stratum"] == "all"]
    if generator is not None:
        sub = sub[sub["generator"] == generator]
    if not len(sub):
        return []
    score = sub.assign(_s=sub["significant"].astype(int) * 10 + sub["rank_biserial"].abs().fillna(0))
    return diverse_top(score.groupby("feature")["_s"].max(), k)


def differences_figure(features: pd.DataFrame, paired: pd.DataFrame, k: int, require_segmentation: bool, seed: int):
    feats = top_features(paired, k)
    if not feats:
        return _message_figure("No counterfactuals were analysed: no paired differences to show.")
    plt = _plt()
    gens = sorted(paired["generator"].unique())
    groups = [(g, t) for g in gens for t in (1, 0)]
    ncol = min(3, len(feats))
    nrow = int(np.ceil(len(feats) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    rng = np.random.default_rng(seed)
    pairs = {(g, t): paired_frame(features, g, t, feats, require_segmentation) for g, t in groups}
    for ax, f in zip(axes.ravel(), feats):
        for x, (g, t) in enumerate(groups):
            p = pairs[(g, t)]
            d = (p[f"{f}_cf"] - p[f"{f}_anchor"]).to_numpy(float)
            d = d[np.isfinite(d)]
            if d.size == 0:
                continue
            if d.size > 2 and np.ptp(d) > 0:
                vp = ax.violinplot([d], positions=[x], widths=0.8, showextrema=False)
                for body in vp["bodies"]:
                    body.set_facecolor(COLOURS[t])
                    body.set_alpha(0.25)
            ax.scatter(x + rng.uniform(-0.15, 0.15, d.size), d, s=6, color=COLOURS[t], alpha=0.6, lw=0)
            row = paired[(paired["generator"] == g) & (paired["target_label"] == t) & (paired["stratum"] == "all") & (paired["feature"] == f)]
            if len(row):
                r = row.iloc[0]
                ax.errorbar([x], [r["mean_diff"]], yerr=[[max(0, r["mean_diff"] - r["ci_low"])] if np.isfinite(r["ci_low"]) else [0],
                                                         [max(0, r["ci_high"] - r["mean_diff"])] if np.isfinite(r["ci_high"]) else [0]],
                            fmt="D", color="black", ms=4, capsize=3)
                if r["significant"]:
                    ax.annotate("*", (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=14)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g}\n→{DIRECTION[t][:3]}" for g, t in groups], fontsize=7)
        ax.set_title(DESCRIPTIONS.get(f, f), fontsize=8)
        ax.set_ylabel(f"Δ {f} (CF − anchor)", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(feats):]:
        ax.axis("off")
    fig.suptitle("Paired differences counterfactual − anchor (◆ mean, bar = bootstrap CI, * Holm-significant)\n"
                 "red: toward malignant, blue: toward benign", fontsize=9)
    fig.tight_layout()
    return fig


def examples_figure(features: pd.DataFrame, paired: pd.DataFrame, generator: str, k: int, n_examples: int,
                    require_segmentation: bool, seg: SegmentationSettings):
    feats = top_features(paired, k, generator)
    if not feats:
        return _message_figure(f"No paired differences for generator {generator}.")
    plt = _plt()
    fig, axes = plt.subplots(len(feats), n_examples, figsize=(2.6 * n_examples, 1.55 * len(feats) + 0.6), squeeze=False)
    sub = paired[(paired["generator"] == generator) & (paired["stratum"] == "all")]
    for i, f in enumerate(feats):
        fam = sub[sub["feature"] == f]
        best = fam.loc[fam["rank_biserial"].abs().fillna(0).idxmax()]
        t, sign = int(best["target_label"]), np.sign(best["mean_diff"]) or 1.0
        p = paired_frame(features, generator, t, [f], require_segmentation)
        p["d"] = p[f"{f}_cf"] - p[f"{f}_anchor"]
        p = p[np.isfinite(p["d"])].sort_values("d", ascending=sign < 0).head(n_examples)
        rows = features.set_index("image_id")
        cf_rows = features[(features["role"] == "counterfactual") & (features["generator"] == generator)
                           & (features["target_label"] == t)].set_index("anchor_id")
        for j in range(n_examples):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(p):
                continue
            a_id = p.iloc[j]["anchor_id"]
            a_img = load_rgb(rows.loc[a_id, "path"])
            c_img = load_rgb(cf_rows.loc[a_id, "path"], size=(a_img.shape[1], a_img.shape[0]))
            gap = np.full((a_img.shape[0], max(2, a_img.shape[1] // 32), 3), 255, np.uint8)
            ax.imshow(np.concatenate([a_img, gap, c_img], axis=1))
            offset = a_img.shape[1] + gap.shape[1]
            for img, colour, dx in ((a_img, "lime", 0), (c_img, "yellow", offset)):
                res = segment(img, seg)
                if res.mask.any():
                    ax.contour(np.arange(img.shape[1]) + dx, np.arange(img.shape[0]), res.mask, [0.5], colors=[colour], linewidths=0.7)
            ax.set_title(f"{a_id}: Δ{f} = {p.iloc[j]['d']:+.3g}", fontsize=6)
        axes[i, 0].text(-0.05, 0.5, f"{f}\n→{DIRECTION[t]}", transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{generator}: anchor | counterfactual pairs with the largest change per top feature "
                 "(outline: anchor green, counterfactual yellow)", fontsize=8)
    fig.tight_layout()
    return fig


def originals_figure(features: pd.DataFrame, label_stats: pd.DataFrame, k: int, require_segmentation: bool):
    if not len(label_stats) or label_stats["cliffs_delta"].isna().all():
        return _message_figure("Originals of both classes are needed for the malignant-vs-benign comparison.")
    plt = _plt()
    ls = label_stats.assign(_s=label_stats["significant"].astype(int) * 10 + label_stats["cliffs_delta"].abs().fillna(0))
    feats = diverse_top(ls.set_index("feature")["_s"], k)
    orig = features[features["role"].isin(["anchor", "original"])].drop_duplicates("image_id")
    if require_segmentation:
        orig_ok = orig[orig["seg_ok"].astype(bool)]
    ncol = min(3, len(feats))
    nrow = int(np.ceil(len(feats) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
    for ax, f in zip(axes.ravel(), feats):
        src = orig_ok if require_segmentation and f in MASK_FEATURES else orig
        data = [src.loc[src["anchor_label"] == c, f].dropna().to_numpy(float) for c in (0, 1)]
        for x, d in enumerate(data):
            if d.size > 2 and np.ptp(d) > 0:
                vp = ax.violinplot([d], positions=[x], widths=0.8, showextrema=False, showmedians=True)
                for body in vp["bodies"]:
                    body.set_facecolor(COLOURS[x])
                    body.set_alpha(0.35)
            elif d.size:
                ax.scatter(np.full(d.size, x), d, s=6, color=COLOURS[x])
        r = label_stats.set_index("feature").loc[f]
        ax.set_xticks([0, 1])
        ax.set_xticklabels([f"benign\n(n={data[0].size})", f"malignant\n(n={data[1].size})"], fontsize=7)
        ax.set_title(f"{DESCRIPTIONS.get(f, f)}\nCliff's δ = {r['cliffs_delta']:+.2f}, p_Holm = {r['p_holm']:.2g}", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(feats):]:
        ax.axis("off")
    fig.suptitle("Originals: features that separate malignant from benign most (violin + median)", fontsize=9)
    fig.tight_layout()
    return fig


def segmentation_figure(features: pd.DataFrame, n: int, seg: SegmentationSettings, seed: int):
    anchors = features[features["role"] == "anchor"]
    if not len(anchors):
        return _message_figure("No anchors to show.")
    plt = _plt()
    pick = anchors.sample(min(n, len(anchors)), random_state=seed % 2**32).sort_values("image_id")
    ncol = min(8, len(pick))
    nrow = int(np.ceil(len(pick) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.7 * ncol, 1.85 * nrow), squeeze=False)
    for ax, r in zip(axes.ravel(), pick.itertuples()):
        img = load_rgb(r.path)
        res = segment(img, seg)
        ax.imshow(img)
        if res.mask.any():
            ax.contour(res.mask, [0.5], colors=["lime" if res.ok else "red"], linewidths=0.8)
        if res.hair.any():
            ax.contour(res.hair, [0.5], colors=["cyan"], linewidths=0.4)
        if res.ink.any():
            ax.contour(res.ink, [0.5], colors=["magenta"], linewidths=0.4)
        ax.set_title(f"{r.image_id} ({'mal' if r.anchor_label else 'ben'})\n{','.join(res.flags) or 'ok'}", fontsize=5)
        ax.axis("off")
    for ax in axes.ravel()[len(pick):]:
        ax.axis("off")
    fig.suptitle("Lesion segmentation of anchors (green: usable, red: quality flag; cyan: hair, magenta: ink)", fontsize=8)
    fig.tight_layout()
    return fig
