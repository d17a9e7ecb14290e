"""Artefacts and a planted shortcut: do the counterfactuals add things that are not the lesion?

Two parts, both read by the trait stage:

* :func:`artefact_table` — for every generator and direction, where each artefact trait (hair, marker ink, ruler
  ticks, measured outside the lesion: cfaudit.traits.features.ARTEFACT_FEATURES) ranks among all traits by effect
  (the order of ranked.md: Holm-significant first, then |rank-biserial r|, then |d_z|), beside the originals'
  malignant-vs-benign difference of the same trait. On ISIC this shows whether a generator paints rulers or ink
  where the classifier's training data had them.
* :func:`cue_effect` — with a planted shortcut (cfaudit.data.shortcut), whether adding the cue to the anchors (and
  nothing else: cfaudit.traits.control.render_with_nuisances) raises each classifier's malignant score: the
  audited classifier, and oracles trained on clean or on shortcut data. A generator's counterfactuals that add
  the cue are explained only if the classifiers that took no part in making them agree that the cue matters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats

from cfaudit.traits.analysis import fmt_number
from cfaudit.traits.features import ARTEFACT_FEATURES, FEATURES
from cfaudit.traits.statistics import DIRECTION, PRIOR_OF, VS_PRIOR, ranked

RETENTION_KEYS = ["generator", "target_label", "feature"]
RETENTION_COLUMNS = [*RETENTION_KEYS, "anchors_with", "kept_median", "kept_half_share"]
RANK_COLUMNS = [*RETENTION_KEYS, "planted", "rank", "n_traits", "n", "mean_diff", "ci_low", "ci_high", "rank_biserial",
                "d_z", "p_holm", "significant", "originals_diff", "originals_p_holm", "originals_significant"]
ARTEFACT_COLUMNS = RANK_COLUMNS + RETENTION_COLUMNS[len(RETENTION_KEYS):]
# The traits that show a planted cue: the marking itself, and for ink also its colour painted into the lesion.
CUE_FEATURES = {"ink": ("ink", "ink_lesion"), "ruler": ("ruler",), "hair": ("hair",), "none": ()}
EFFECT_COLUMNS = ["classifier", "role", "train_data", "placement", "n", "score_without", "score_with", "mean_delta",
                  "ci_low", "ci_high", "share_raised", "p_wilcoxon"]
# Where the cue is added for the cue-effect check. 'as planted': where the shortcut pack draws it (the marking on the
# skin). For ink also 'lesion centre': the same dot on the lesion, which tells a classifier that learned the marking
# from one that reacts to a violet colour anywhere (the colour a generator may paint into the lesion: `ink_lesion`).
CUE_PLACEMENTS = {"ink": ("as planted", "lesion centre"), "ruler": ("as planted",), "hair": ("as planted",)}


def trait_ranking(paired: pd.DataFrame, generator: str, target: int, stratum: str = "all") -> pd.DataFrame:
    """The traits (no change measures) of one generator, direction and stratum in ranked.md's order, with a 1-based
    rank."""
    r = ranked(paired, generator, target, stratum)
    r = r[r["feature"].isin(FEATURES)].reset_index(drop=True)
    return r.assign(rank=np.arange(1, len(r) + 1))


def artefact_retention(features: pd.DataFrame) -> pd.DataFrame:
    """Can a generator carry an artefact at all? Per generator x direction x artefact: the anchors that have it
    (their value > 0), the median share of it their counterfactuals keep (counterfactual / anchor) and the share of
    them that keep at least half. A generator that erases an artefact in both directions cannot show a classifier
    relying on it, so its absence from a ranking says nothing (RETENTION_COLUMNS)."""
    anchors = features[features["role"] == "anchor"].drop_duplicates("image_id").set_index("image_id")
    cfs = features[features["role"] == "counterfactual"]
    rows = []
    for (g, target), part in cfs.groupby(["generator", "target_label"], sort=True):
        for feature in ARTEFACT_FEATURES:
            base = anchors[feature].reindex(part["anchor_id"]).to_numpy(float)
            has = base > 0
            kept = part[feature].to_numpy(float)[has] / base[has]
            rows.append({"generator": g, "target_label": int(target), "feature": feature, "anchors_with": int(has.sum()),
                         "kept_median": float(np.median(kept)) if has.any() else np.nan,
                         "kept_half_share": float((kept >= 0.5).mean()) if has.any() else np.nan})
    return pd.DataFrame(rows, columns=RETENTION_COLUMNS)


def artefact_table(paired: pd.DataFrame, label_stats: pd.DataFrame | None, cue: str = "none",
                   features: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per generator x direction x artefact trait (``cue`` marks the planted one); ARTEFACT_COLUMNS, the
    retention columns (:func:`artefact_retention`) filled when the per-image ``features`` are given."""
    originals = label_stats.set_index("feature") if label_stats is not None and len(label_stats) else None
    rows = []
    for g in sorted(paired["generator"].unique()) if len(paired) else []:
        for target in (1, 0):
            r = trait_ranking(paired, g, target)
            for feature in ARTEFACT_FEATURES:
                hit = r[r["feature"] == feature]
                if not len(hit):
                    continue
                row = hit.iloc[0]
                o = originals.loc[feature] if originals is not None and feature in originals.index else None
                rows.append({"generator": g, "target_label": target, "feature": feature,
                             "planted": feature in CUE_FEATURES[cue],
                             "rank": int(row["rank"]), "n_traits": len(r), "n": int(row["n"]),
                             **{k: row[k] for k in ("mean_diff", "ci_low", "ci_high", "rank_biserial", "d_z", "p_holm")},
                             "significant": bool(row["significant"]),
                             "originals_diff": np.nan if o is None else float(o["mean_diff"]),
                             "originals_p_holm": np.nan if o is None else float(o["p_holm"]),
                             "originals_significant": False if o is None else bool(o["significant"])})
    table = pd.DataFrame(rows, columns=RANK_COLUMNS)
    kept = artefact_retention(features) if features is not None else pd.DataFrame(columns=RETENTION_COLUMNS)
    return table.merge(kept.astype({"target_label": int}), on=RETENTION_KEYS, how="left")[ARTEFACT_COLUMNS]


def cue_pair_images(anchors: pd.DataFrame, metadata: pd.DataFrame, cue: str, *, seed: int, synth_size: int,
                    image_size: int, hair_count: int, resize_mode: str, resample: str,
                    placement: str = "as planted") -> tuple[np.ndarray, np.ndarray]:
    """Every anchor re-rendered without and with the cue (at ``placement``, one of CUE_PLACEMENTS[cue]), all else
    as rendered: two uint8 (N, H, W, 3) arrays."""
    from cfaudit.data.images import resize_square
    from cfaudit.data.shortcut import nuisances_with_cue
    from cfaudit.traits.control import render_with_nuisances, traits_from_row

    if placement not in CUE_PLACEMENTS.get(cue, ()):
        raise ValueError(f"cue {cue!r} cannot be placed at {placement!r}; one of {list(CUE_PLACEMENTS.get(cue, ()))}")
    meta = metadata.set_index(metadata["image_id"].astype(str))
    out = {False: [], True: []}
    for image_id in anchors["image_id"].astype(str):
        t = traits_from_row(meta.loc[image_id])
        for present in (False, True):
            img = render_with_nuisances(t, seed, synth_size, **nuisances_with_cue(t, cue, present, hair_count),
                                        ink_at_lesion_centre=present and placement == "lesion centre")
            out[present].append(np.asarray(resize_square(Image.fromarray(img, "RGB"), image_size, resize_mode, resample)))
    return np.stack(out[False]), np.stack(out[True])


def cue_effect_table(score: dict, anchors: pd.DataFrame, metadata: pd.DataFrame, cue: str, roles: dict,
                     train_data: dict, *, render: dict, resamples: int, seed: int, level: float = 0.95) -> pd.DataFrame:
    """:func:`cue_effect` for every placement of ``cue`` (CUE_PLACEMENTS), one table. ``score``: {classifier: a
    function of uint8 images -> scores}; ``render``: the keyword arguments of :func:`cue_pair_images` but the
    placement (seed, synth_size, image_size, hair_count, resize_mode, resample)."""
    tables = []
    for placement in CUE_PLACEMENTS[cue]:
        without, with_cue = cue_pair_images(anchors, metadata, cue, placement=placement, **render)
        tables.append(cue_effect({name: f(without) for name, f in score.items()},
                                 {name: f(with_cue) for name, f in score.items()}, roles, train_data,
                                 resamples=resamples, seed=seed, level=level, placement=placement))
    return pd.concat(tables, ignore_index=True)


def cue_effect(without: dict, with_cue: dict, roles: dict, train_data: dict, *, resamples: int, seed: int,
               level: float = 0.95, placement: str = "as planted") -> pd.DataFrame:
    """Per classifier: its mean malignant score of the anchors without and with the cue, the paired mean
    difference with a percentile-bootstrap interval (anchors resampled), the share of anchors whose score rose,
    and the Wilcoxon signed-rank p. ``without`` / ``with_cue``: {classifier: scores in anchor order}; ``placement``
    (where the cue was added) is recorded in every row."""
    from cfaudit.metrics import bootstrap

    rows = []
    for name in without:
        a, b = np.asarray(without[name], float), np.asarray(with_cue[name], float)
        d = b - a
        ci = bootstrap(lambda idx: {"mean": float(d[idx].mean())}, len(d), resamples, seed, level)["mean"]
        p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
        rows.append({"classifier": name, "role": roles[name], "train_data": train_data[name], "placement": placement,
                     "n": len(d),
                     "score_without": float(a.mean()), "score_with": float(b.mean()), "mean_delta": float(d.mean()),
                     "ci_low": ci.low, "ci_high": ci.high, "share_raised": float((d > 0).mean()), "p_wilcoxon": p})
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def ranking_line(paired: pd.DataFrame, generator: str, cue: str, top: int = 5, stratum: str = "all") -> str:
    """A table row '| generator | traits | 1. `a` ↑*, 2. ... |' for the malignant-ward counterfactuals, the planted
    cue's traits marked. ``stratum`` vs_prior: the counterfactuals against the generator's prior alone."""
    r = trait_ranking(paired, generator, 1, stratum)
    if stratum == VS_PRIOR:
        generator = f"{generator} − {PRIOR_OF[generator]} (what the classifier added)"
    if not len(r):
        return f"| {generator} | 0 | no pairs toward malignant |"
    cue_traits = CUE_FEATURES[cue]
    shown = pd.concat([r.head(top), r.iloc[top:][r.iloc[top:]["feature"].isin(cue_traits)]])

    def item(row):
        arrow = "↑" if row["mean_diff"] > 0 else ("↓" if row["mean_diff"] < 0 else "=")
        star = "\\*" if row["significant"] else ""
        mark = " **(planted cue)**" if row["feature"] in cue_traits else ""
        return f"{int(row['rank'])}. `{row['feature']}` {arrow}{star}{mark}"

    return f"| {generator} | {len(r)} | " + ", ".join(item(row) for _, row in shown.iterrows()) + " |"


def artefact_markdown(paired: pd.DataFrame, table: pd.DataFrame, cue: str = "none", effect: pd.DataFrame | None = None) -> list[str]:
    """The 'Artefacts' section of ranked.md (and, with a planted cue, the shortcut check)."""
    out = ["## Artefacts: hair, marker ink and ruler ticks outside the lesion, marker-ink colour inside it", "",
           "Rank of each artefact trait among all traits by effect (ranked.md's order; \\* = Holm-significant), its "
           "change counterfactual − anchor, and beside it the originals' malignant − benign difference (a "
           "classifier can only have learned an artefact that goes with the class in its training data). 'kept': of "
           "the anchors that have the artefact, the share whose counterfactual keeps at least half of it (median "
           "share kept) — a generator that erases an artefact in both directions cannot show a reliance on it.", "",
           "| generator | direction | trait | rank | mean Δ [95% CI] | p_Holm | originals: malignant − benign (p_Holm) | kept (median) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        star = " **\\***" if r.significant else ""
        mark = " (planted cue)" if r.planted else ""
        kept = "–" if not r.anchors_with > 0 else f"{r.kept_half_share:.0%} of {int(r.anchors_with)} ({fmt_number(r.kept_median)})"
        out.append(f"| {r.generator} | → {DIRECTION[r.target_label]} | `{r.feature}`{mark}{star} | {r.rank} of {r.n_traits} | "
                   f"{fmt_number(r.mean_diff)} [{fmt_number(r.ci_low)}, {fmt_number(r.ci_high)}] | {fmt_number(r.p_holm)} | "
                   f"{fmt_number(r.originals_diff)} ({fmt_number(r.originals_p_holm)}) | {kept} |")
    out.append("")
    if cue == "none":
        return out
    out += [f"## Planted shortcut: `{cue}`", "",
            f"The audited classifier was trained where `{cue}` goes with malignancy (dataset.synthetic.shortcut). "
            "Traits ranked by effect in the counterfactuals toward malignant (top 5, and the cue's traits "
            f"({', '.join(f'`{f}`' for f in CUE_FEATURES[cue])}) where they rank lower), against the anchors; for the "
            "guided generator also against its prior alone (the same sampler without the classifier), which leaves "
            "only what the classifier's gradient added:", ""]
    out += ["| generator | traits | ranked by effect toward malignant (\\* = Holm-significant) |", "|---|---|---|"]
    for g in sorted(table["generator"].unique()):
        out.append(ranking_line(paired, g, cue))
        if len(paired) and ((paired["generator"] == g) & (paired["stratum"] == VS_PRIOR)).any():
            out.append(ranking_line(paired, g, cue, stratum=VS_PRIOR))
    out.append("")
    if effect is not None and len(effect):
        out += ["Does the cue raise the malignant score? Each anchor re-rendered with and without the cue, nothing "
                "else changed; paired difference of each classifier's score (oracles only judge). 'as planted': the "
                "cue where the shortcut put it; 'lesion centre' (ink): the same dot on the lesion — a classifier that "
                "learned the marking reacts to the first, one that reads violet as a lesion colour to the second.", "",
                "| classifier | role | trained on | cue added | anchors | score without → with | mean Δ [95% CI] | raised | p (Wilcoxon) |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {e.classifier} | {e.role} | {e.train_data} | {e.placement} | {e.n} | {fmt_number(e.score_without)} → {fmt_number(e.score_with)} | "
                f"{fmt_number(e.mean_delta)} [{fmt_number(e.ci_low)}, {fmt_number(e.ci_high)}] | {e.share_raised:.0%} | {fmt_number(e.p_wilcoxon)} |"
                for e in effect.itertuples()]
        out.append("")
    return out
