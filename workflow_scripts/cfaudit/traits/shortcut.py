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
from cfaudit.traits.statistics import DIRECTION, ranked

ARTEFACT_COLUMNS = ["generator", "target_label", "feature", "planted", "rank", "n_traits", "n", "mean_diff", "ci_low",
                    "ci_high", "rank_biserial", "d_z", "p_holm", "significant", "originals_diff", "originals_p_holm",
                    "originals_significant"]
# The traits that show a planted cue: the marking itself, and for ink also its colour painted into the lesion.
CUE_FEATURES = {"ink": ("ink", "ink_lesion"), "ruler": ("ruler",), "hair": ("hair",), "none": ()}
EFFECT_COLUMNS = ["classifier", "role", "train_data", "n", "score_without", "score_with", "mean_delta", "ci_low",
                  "ci_high", "share_raised", "p_wilcoxon"]


def trait_ranking(paired: pd.DataFrame, generator: str, target: int) -> pd.DataFrame:
    """The traits (no change measures) of one generator and direction in ranked.md's order, with a 1-based rank."""
    r = ranked(paired, generator, target)
    r = r[r["feature"].isin(FEATURES)].reset_index(drop=True)
    return r.assign(rank=np.arange(1, len(r) + 1))


def artefact_table(paired: pd.DataFrame, label_stats: pd.DataFrame | None, cue: str = "none") -> pd.DataFrame:
    """One row per generator x direction x artefact trait (``cue`` marks the planted one); ARTEFACT_COLUMNS."""
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
    return pd.DataFrame(rows, columns=ARTEFACT_COLUMNS)


def cue_pair_images(anchors: pd.DataFrame, metadata: pd.DataFrame, cue: str, *, seed: int, synth_size: int,
                    image_size: int, hair_count: int, resize_mode: str, resample: str) -> tuple[np.ndarray, np.ndarray]:
    """Every anchor re-rendered without and with the cue, all else as rendered: two uint8 (N, H, W, 3) arrays."""
    from cfaudit.data.images import resize_square
    from cfaudit.data.shortcut import nuisances_with_cue
    from cfaudit.traits.control import render_with_nuisances, traits_from_row

    meta = metadata.set_index(metadata["image_id"].astype(str))
    out = {False: [], True: []}
    for image_id in anchors["image_id"].astype(str):
        t = traits_from_row(meta.loc[image_id])
        for present in (False, True):
            img = render_with_nuisances(t, seed, synth_size, **nuisances_with_cue(t, cue, present, hair_count))
            out[present].append(np.asarray(resize_square(Image.fromarray(img, "RGB"), image_size, resize_mode, resample)))
    return np.stack(out[False]), np.stack(out[True])


def cue_effect(without: dict, with_cue: dict, roles: dict, train_data: dict, *, resamples: int, seed: int,
               level: float = 0.95) -> pd.DataFrame:
    """Per classifier: its mean malignant score of the anchors without and with the cue, the paired mean
    difference with a percentile-bootstrap interval (anchors resampled), the share of anchors whose score rose,
    and the Wilcoxon signed-rank p. ``without`` / ``with_cue``: {classifier: scores in anchor order}."""
    from cfaudit.metrics import bootstrap

    rows = []
    for name in without:
        a, b = np.asarray(without[name], float), np.asarray(with_cue[name], float)
        d = b - a
        ci = bootstrap(lambda idx: {"mean": float(d[idx].mean())}, len(d), resamples, seed, level)["mean"]
        p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
        rows.append({"classifier": name, "role": roles[name], "train_data": train_data[name], "n": len(d),
                     "score_without": float(a.mean()), "score_with": float(b.mean()), "mean_delta": float(d.mean()),
                     "ci_low": ci.low, "ci_high": ci.high, "share_raised": float((d > 0).mean()), "p_wilcoxon": p})
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def ranking_line(paired: pd.DataFrame, generator: str, cue: str, top: int = 5) -> str:
    """A table row '| generator | traits | 1. `a` ↑*, 2. ... |' for the malignant-ward counterfactuals, the planted
    cue's traits marked."""
    r = trait_ranking(paired, generator, 1)
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
           "classifier can only have learned an artefact that goes with the class in its training data).", "",
           "| generator | direction | trait | rank | mean Δ [95% CI] | p_Holm | originals: malignant − benign (p_Holm) |",
           "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        star = " **\\***" if r.significant else ""
        mark = " (planted cue)" if r.planted else ""
        out.append(f"| {r.generator} | → {DIRECTION[r.target_label]} | `{r.feature}`{mark}{star} | {r.rank} of {r.n_traits} | "
                   f"{fmt_number(r.mean_diff)} [{fmt_number(r.ci_low)}, {fmt_number(r.ci_high)}] | {fmt_number(r.p_holm)} | "
                   f"{fmt_number(r.originals_diff)} ({fmt_number(r.originals_p_holm)}) |")
    out.append("")
    if cue == "none":
        return out
    out += [f"## Planted shortcut: `{cue}`", "",
            f"The audited classifier was trained where `{cue}` goes with malignancy (dataset.synthetic.shortcut). "
            "Traits ranked by effect in the counterfactuals toward malignant (top 5, and the cue's traits "
            f"({', '.join(f'`{f}`' for f in CUE_FEATURES[cue])}) where they rank lower):", ""]
    out += ["| generator | traits | ranked by effect toward malignant (\\* = Holm-significant) |", "|---|---|---|"]
    out += [ranking_line(paired, g, cue) for g in sorted(table["generator"].unique())] + [""]
    if effect is not None and len(effect):
        out += ["Does the cue raise the malignant score? Each anchor re-rendered with and without the cue, nothing "
                "else changed; paired difference of each classifier's score (oracles only judge).", "",
                "| classifier | role | trained on | anchors | score without → with | mean Δ [95% CI] | raised | p (Wilcoxon) |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {e.classifier} | {e.role} | {e.train_data} | {e.n} | {fmt_number(e.score_without)} → {fmt_number(e.score_with)} | "
                f"{fmt_number(e.mean_delta)} [{fmt_number(e.ci_low)}, {fmt_number(e.ci_high)}] | {e.share_raised:.0%} | {fmt_number(e.p_wilcoxon)} |"
                for e in effect.itertuples()]
        out.append("")
    return out
