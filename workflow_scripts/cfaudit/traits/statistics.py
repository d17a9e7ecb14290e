"""Statistics of the trait analysis: what the counterfactuals add or remove, and what separates the classes.

Paired analysis (per generator x target x stratum of anchors, one *family*):

- the unit is the anchor; the difference is ``counterfactual - anchor`` per feature (for
  ``change_inside_share`` the anchor's value is its lesion ``area``: the share of the change a uniform
  change would put inside the lesion; ``skin_ita`` and ``skin_redness`` compare both images on the same
  skin ring, see cfaudit.traits.analysis);
- pairs where the anchor's or the counterfactual's segmentation raised a quality flag are left out of the
  mask-based features when ``statistics.require_segmentation`` is true (the nuisances ``hair`` and ``ink`` keep them);
- effect sizes: paired Cohen's d_z = mean / sd (ddof 1; nan when sd is 0) and the matched-pairs
  rank-biserial correlation r = (R+ - R-) / (R+ + R-) over the non-zero differences (Kerby 2014);
- Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided, zero differences dropped, exact for <= 50
  untied pairs, normal approximation otherwise; p = 1 when every difference is 0), Holm step-down adjustment across the features of the family;
- percentile bootstrap CI of the mean difference, resampling anchors with replacement, seeded from
  ``seed`` and the family's names (``cfaudit.runtime.derive_seed``), the same resamples for every feature of the family.

Stratum ``vs_reconstruction`` (artefact-controlled): anchors of the opposite class only, and the reference is not
the anchor but the same generator's counterfactual of the same anchor toward its *own* label (same noise and
settings: a reconstruction). Regenerating an image changes it whatever the label (blur, border roughness); the
difference counterfactual − reconstruction keeps only what the change of label did. ``anchor_mean`` then holds the
reconstructions' mean; ``change_inside_share`` (defined against the anchor) is not part of this family.

Stratum ``vs_prior`` (generators in PRIOR_OF only: ``guided``): all anchors, and the reference is the generator's
prior alone (``guided_noclf``: the same sampler, strength, mask, CFG and noise with the classifier-gradient scale 0)
toward the same target. The difference keeps only what the audited classifier's gradient did — the regeneration
and the class-conditional prior's own notion of each class cancel. ``anchor_mean`` then holds the prior's mean. The
prior itself is measured (rule traits_features) but not analysed as a generator.

Unpaired analysis of the originals (malignant vs benign): difference of means (malignant - benign) with a
bootstrap CI (each class resampled separately), Cliff's delta (= rank-biserial of the Mann-Whitney U),
Mann-Whitney U two-sided p-values, Holm across features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from cfaudit.metrics import bootstrap
from cfaudit.names import ORIGINAL
from cfaudit.runtime import derive_seed
from cfaudit.traits.features import FEATURES, MASK_FEATURES, PAIRED_SKIN

DIRECTION = {0: "benign", 1: "malignant"}
PAIRED_COLUMNS = ["generator", "target_label", "direction", "stratum", "feature", "n", "anchor_mean", "cf_mean",
                  "mean_diff", "median_diff", "ci_low", "ci_high", "d_z", "rank_biserial", "p_wilcoxon", "p_holm",
                  "significant", "n_increase", "n_decrease", "bootstrap_seed", "resamples", "ci_level"]
LABEL_COLUMNS = ["stratum", "feature", "n_benign", "n_malignant", "benign_mean", "malignant_mean", "mean_diff",
                 "ci_low", "ci_high", "cliffs_delta", "p_mannwhitney", "p_holm", "significant", "bootstrap_seed",
                 "resamples", "ci_level"]
STRATA = {"all": None, "benign_anchors": 0, "malignant_anchors": 1}
VS_RECONSTRUCTION = "vs_reconstruction"
VS_PRIOR = "vs_prior"
# generator -> its prior alone (the same sampler without the classifier): the reference of stratum vs_prior
PRIOR_OF = {"guided": "guided_noclf"}
CHANGE_SHARE = "change_inside_share"


# ------------------------------------------------------------------------------------ basic statistics
def cohens_dz(d) -> float:
    d = np.asarray(d, float)
    if d.size < 2:
        return float("nan")
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else float("nan")


def rank_biserial_paired(d) -> float:
    """Matched-pairs rank-biserial correlation (R+ - R-) / (R+ + R-) over non-zero differences."""
    d = np.asarray(d, float)
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    r = stats.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def wilcoxon_p(d) -> float:
    """Two-sided Wilcoxon signed-rank p-value over the non-zero differences (Wilcox's zero handling):
    exact null distribution for up to 50 pairs without tied |d|, else the normal approximation with tie
    correction (scipy's permutation fallback for small tied samples costs seconds per test).
    1.0 when every difference is zero, nan without pairs."""
    d = np.asarray(d, float)
    if d.size == 0:
        return float("nan")
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    ties = np.unique(np.abs(d)).size < d.size
    method = "exact" if d.size <= 50 and not ties else "approx"
    return float(stats.wilcoxon(d, alternative="two-sided", method=method).pvalue)


def cliffs_delta(x, y) -> float:
    """P(X > Y) - P(X < Y) for independent samples (x = malignant, y = benign)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    u = stats.mannwhitneyu(x, y, alternative="two-sided").statistic
    return float(2 * u / (x.size * y.size) - 1)


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (nan entries stay nan and do not count in the family size)."""
    p = np.asarray(pvalues, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def bootstrap_mean_ci(diffs: np.ndarray, rng: np.random.Generator, resamples: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs of the column means of ``diffs`` (n, k), resampling rows (:func:`cfaudit.metrics.bootstrap`;
    one resample serves every column); nan values ignored."""
    diffs = np.asarray(diffs, float)
    n, k = diffs.shape
    if n < 2 or resamples <= 0:
        nan = np.full(k, np.nan)
        return nan, nan
    mean = np.nanmean if np.isnan(diffs).any() else np.mean
    ci = bootstrap(lambda idx: dict(enumerate(mean(diffs[idx], axis=0))), n, resamples, rng, level)
    return np.array([ci[j].low for j in range(k)]), np.array([ci[j].high for j in range(k)])


# ---------------------------------------------------------------------------------------------- pairs
def paired_frame(features: pd.DataFrame, generator: str, target: int, feature_names, require_segmentation: bool,
                 reference: str = "anchor") -> pd.DataFrame:
    """Reference rows joined to the generator's target counterfactual rows: columns ``<f>_anchor``, ``<f>_cf``.

    reference ``anchor``: the anchor itself; ``reconstruction``: the generator's counterfactual of the same anchor
    toward the other label (1 - target), for the anchors of label 1 - target; ``prior``: the counterfactual of the
    generator's prior alone (PRIOR_OF) of the same anchor toward the same target (see the module docstring).
    """
    counterfactuals = features[features["role"] == "counterfactual"]
    gen_rows = counterfactuals[counterfactuals["generator"] == generator]
    if reference == "reconstruction":
        anchors = gen_rows[(gen_rows["target_label"] == 1 - target) & (gen_rows["anchor_label"] == 1 - target)]
        anchors = anchors.set_index("anchor_id")
        feature_names = [f for f in feature_names if f != CHANGE_SHARE]
    elif reference == "prior":
        prior = counterfactuals[counterfactuals["generator"] == PRIOR_OF[generator]]
        anchors = prior[prior["target_label"] == target].set_index("anchor_id")
        feature_names = [f for f in feature_names if f != CHANGE_SHARE]
    else:
        anchors = features[features["role"] == "anchor"].set_index("anchor_id")
    cfs = gen_rows[gen_rows["target_label"] == target].set_index("anchor_id")
    common = anchors.index.intersection(cfs.index)
    a, c = anchors.loc[common], cfs.loc[common]
    out = pd.DataFrame({"anchor_id": common, "anchor_label": a["anchor_label"].to_numpy()})
    both_ok = a["seg_ok"].astype(bool).to_numpy() & c["seg_ok"].astype(bool).to_numpy()
    for f in feature_names:
        if f == CHANGE_SHARE:
            av, cv = a["area"].to_numpy(float), c[CHANGE_SHARE].to_numpy(float)
            ok = a["seg_ok"].astype(bool).to_numpy()
        elif f in PAIRED_SKIN and f"anchor_{f}" in c and reference == "anchor":
            # the anchor measured on the same skin ring as the counterfactual (analysis.paired_skin)
            av, cv = c[f"anchor_{f}"].to_numpy(float), c[f].to_numpy(float)
            ok = both_ok
        else:
            av, cv = a[f].to_numpy(float), c[f].to_numpy(float)
            ok = both_ok
        if require_segmentation and f in MASK_FEATURES + [CHANGE_SHARE]:
            av, cv = np.where(ok, av, np.nan), np.where(ok, cv, np.nan)
        out[f"{f}_anchor"], out[f"{f}_cf"] = av, cv
    return out


def paired_statistics(features: pd.DataFrame, *, seed: int, resamples: int = 2000, ci_level: float = 0.95,
                      alpha: float = 0.05, require_segmentation: bool = True, by_anchor_label: bool = True,
                      feature_names=None) -> pd.DataFrame:
    """One row per (generator, target, stratum, feature); see the module docstring."""
    names = list(feature_names or FEATURES + [CHANGE_SHARE])
    cf = features[features["role"] == "counterfactual"]
    present = set(cf["generator"].unique())
    ref_names = [f for f in names if f != CHANGE_SHARE]  # the families against another counterfactual
    rows = []
    for generator in sorted(present - set(PRIOR_OF.values())):  # a prior is only a reference
        for target in (1, 0):
            pairs = paired_frame(features, generator, target, names, require_segmentation)
            strata = STRATA if by_anchor_label else {"all": None}
            for stratum, label in strata.items():
                sub = pairs if label is None else pairs[pairs["anchor_label"] == label]
                rows += _family_rows(sub, names, generator, target, stratum, seed, resamples, ci_level, alpha)
            if by_anchor_label:
                rec = paired_frame(features, generator, target, names, require_segmentation, "reconstruction")
                rows += _family_rows(rec, ref_names, generator, target, VS_RECONSTRUCTION, seed, resamples, ci_level, alpha)
            if PRIOR_OF.get(generator) in present:
                prior = paired_frame(features, generator, target, names, require_segmentation, "prior")
                rows += _family_rows(prior, ref_names, generator, target, VS_PRIOR, seed, resamples, ci_level, alpha)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def _family_rows(pairs, names, generator, target, stratum, seed, resamples, ci_level, alpha) -> list[dict]:
    fseed = derive_seed(int(seed), generator, target, stratum)
    diffs = np.stack([pairs[f"{f}_cf"].to_numpy(float) - pairs[f"{f}_anchor"].to_numpy(float) for f in names], axis=1) \
        if len(pairs) else np.zeros((0, len(names)))
    lo, hi = bootstrap_mean_ci(diffs, np.random.default_rng(fseed), resamples, ci_level)
    rows = []
    for j, f in enumerate(names):
        ok = np.isfinite(diffs[:, j])
        d = diffs[ok, j]
        rows.append({
            "generator": generator, "target_label": target, "direction": DIRECTION[target], "stratum": stratum,
            "feature": f, "n": int(d.size),
            "anchor_mean": float(np.nanmean(pairs[f"{f}_anchor"].to_numpy(float)[ok])) if d.size else np.nan,
            "cf_mean": float(np.nanmean(pairs[f"{f}_cf"].to_numpy(float)[ok])) if d.size else np.nan,
            "mean_diff": float(d.mean()) if d.size else np.nan,
            "median_diff": float(np.median(d)) if d.size else np.nan,
            "ci_low": float(lo[j]), "ci_high": float(hi[j]),
            "d_z": cohens_dz(d), "rank_biserial": rank_biserial_paired(d) if d.size else np.nan,
            "p_wilcoxon": wilcoxon_p(d),
            "n_increase": int((d > 0).sum()), "n_decrease": int((d < 0).sum()),
            "bootstrap_seed": fseed, "resamples": resamples, "ci_level": ci_level,
        })
    adj = holm([r["p_wilcoxon"] for r in rows])
    for r, p in zip(rows, adj):
        r["p_holm"] = float(p)
        r["significant"] = bool(np.isfinite(p) and p < alpha)
    return rows


# ------------------------------------------------------------------------------------------ originals
def label_statistics(features: pd.DataFrame, *, seed: int, resamples: int = 2000, ci_level: float = 0.95,
                     alpha: float = 0.05, require_segmentation: bool = True, feature_names=None) -> pd.DataFrame:
    """Malignant vs benign originals (role ``original`` or ``anchor``; each image once)."""
    names = list(feature_names or FEATURES)
    orig = features[features["role"].isin(["original", "anchor"])].drop_duplicates("image_id")
    fseed = derive_seed(int(seed), ORIGINAL, "label")
    rng = np.random.default_rng(fseed)
    rows = []
    for f in names:
        vals = orig[f].to_numpy(float)
        if require_segmentation and f in MASK_FEATURES:
            vals = np.where(orig["seg_ok"].astype(bool).to_numpy(), vals, np.nan)
        lab = orig["anchor_label"].to_numpy()
        m, b = vals[(lab == 1) & np.isfinite(vals)], vals[(lab == 0) & np.isfinite(vals)]
        row = {"stratum": "originals", "feature": f, "n_benign": int(b.size), "n_malignant": int(m.size),
               "benign_mean": float(b.mean()) if b.size else np.nan,
               "malignant_mean": float(m.mean()) if m.size else np.nan,
               "bootstrap_seed": fseed, "resamples": resamples, "ci_level": ci_level}
        row["mean_diff"] = row["malignant_mean"] - row["benign_mean"]
        if m.size >= 2 and b.size >= 2:  # each class resampled within itself, one stream for every feature
            ci = bootstrap(lambda im, ib: {"d": m[im].mean() - b[ib].mean()}, (m.size, b.size), resamples, rng,
                           ci_level)["d"]
            row["ci_low"], row["ci_high"] = ci.low, ci.high
            row["cliffs_delta"] = cliffs_delta(m, b)
            same = np.ptp(np.concatenate([m, b])) == 0
            row["p_mannwhitney"] = 1.0 if same else float(stats.mannwhitneyu(m, b, alternative="two-sided").pvalue)
        else:
            row.update(ci_low=np.nan, ci_high=np.nan, cliffs_delta=np.nan, p_mannwhitney=np.nan)
        rows.append(row)
    adj = holm([r["p_mannwhitney"] for r in rows])
    for r, p in zip(rows, adj):
        r["p_holm"] = float(p)
        r["significant"] = bool(np.isfinite(p) and p < alpha)
    return pd.DataFrame(rows, columns=LABEL_COLUMNS)


# --------------------------------------------------------------------------------------------- ranking
def ranked(paired: pd.DataFrame, generator: str, target: int, stratum: str = "all") -> pd.DataFrame:
    """The family's features ranked: significant first, then by |rank-biserial|, then by |d_z|."""
    sub = paired[(paired["generator"] == generator) & (paired["target_label"] == target) & (paired["stratum"] == stratum)].copy()
    sub["_rb"] = sub["rank_biserial"].abs().fillna(0)
    sub["_dz"] = sub["d_z"].abs().fillna(0)
    sub = sub.sort_values(["significant", "_rb", "_dz"], ascending=[False, False, False])
    return sub.drop(columns=["_rb", "_dz"]).reset_index(drop=True)
