"""Table 1 metrics: pure functions over label / score arrays, and the seeded percentile bootstrap.

Input contract (every function that takes ``y_true, score``):

* ``y_true``: 1-D array-like of 0/1 integers (1 = malignant). For originals it is the ground-truth label,
  for counterfactuals the TARGET label (the seed report's Table 1 protocol; docs/methods.md).
* ``score``: 1-D array-like of finite floats of the same length, in the classifier's score space
  (softmax probability of malignancy or raw malignant logit); larger = more malignant.

Conventions (recorded in table1.csv's ``rule`` column):

* best-F1 threshold: every distinct score is a candidate threshold, prediction is ``score >= threshold``
  (exactly scikit-learn's ``precision_recall_curve`` without its final (P=1, R=0) point, which has no
  threshold); among tied best F1s the LOWEST threshold wins (``np.argmax`` over sklearn's ascending order).
  With no positive label F1 is 0 at every threshold and the best-F1 threshold is undefined (nan + reason).
* fixed threshold: the classifier's own operating point from classifier.json, prediction ``score >
  threshold`` (DDI's evaluation code and ``AuditedClassifier.decide``).
* precision / recall / F1 with an empty denominator are 0.0 (scikit-learn's ``zero_division=0``).
* AUROC with one class present is nan with the reason (scikit-learn 1.9 warns and returns nan).
* flips: on anchors the classifier classified correctly at its fixed threshold, the share whose
  counterfactual toward the OTHER class is classified as that class; benign→malignant (b2m) on correct
  benign anchors with their target-1 counterfactual, malignant→benign (m2b) on correct malignant anchors
  with their target-0 counterfactual. The change in target score on the same anchors is
  ``score(cf) - score(anchor)`` for b2m and ``score(anchor) - score(cf)`` for m2b (positive = toward target).
* bootstrap: percentile interval over resampled UNITS (anchors for counterfactuals, so both
  counterfactuals of an anchor stay together; images for originals), seeded, every statistic recomputed in
  every resample (the best-F1 threshold included); resamples where a statistic is undefined are dropped
  and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from cfaudit.data.pack import unit_float
from cfaudit.names import ORIGINAL

TABLE_COLUMNS = ["group", "ground_truth", "metric", "estimate", "ci_low", "ci_high", "ci_level", "resamples",
                 "resamples_valid", "n_units", "n_images", "rule", "note"]
# Order and description of every Table 1 row; the descriptions feed table1.md and the report captions.
METRICS = {
    "threshold_best_f1": "best-F1 threshold (full sweep, score >= t)",
    "accuracy_best_f1": "accuracy at the best-F1 threshold",
    "precision_best_f1": "precision at the best-F1 threshold",
    "recall_best_f1": "recall at the best-F1 threshold",
    "f1_best_f1": "F1 at the best-F1 threshold",
    "threshold_fixed": "classifier's fixed threshold (score > t)",
    "accuracy_fixed": "accuracy at the fixed threshold",
    "precision_fixed": "precision at the fixed threshold",
    "recall_fixed": "recall at the fixed threshold",
    "f1_fixed": "F1 at the fixed threshold",
    "auroc": "AUROC",
    "flip_rate_b2m": "flip rate benign→malignant (correct benign anchors)",
    "flip_rate_m2b": "flip rate malignant→benign (correct malignant anchors)",
    "delta_score_b2m": "mean change in target score, benign→malignant",
    "delta_score_m2b": "mean change in target score, malignant→benign",
    "n_correct_benign_anchors": "correctly classified benign anchors (b2m denominator)",
    "n_correct_malignant_anchors": "correctly classified malignant anchors (m2b denominator)",
}
FLIP_METRICS = ("flip_rate_b2m", "flip_rate_m2b", "delta_score_b2m", "delta_score_m2b",
                "n_correct_benign_anchors", "n_correct_malignant_anchors")


class MetricInputError(ValueError):
    """Labels / scores break the input contract; the message says which array and how."""


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------
def check_binary(y_true, score, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(y_true, score)`` per the module contract; returns (int8 labels, float64 scores)."""
    where = f" ({name})" if name else ""
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise MetricInputError(f"y_true and score must be 1-D{where}; got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise MetricInputError(f"y_true has {len(y)} entries but score has {len(s)}{where}")
    if len(y) == 0:
        raise MetricInputError(f"no rows to evaluate{where}")
    if not np.all(np.isin(y, (0, 1))):
        bad = sorted(set(np.unique(y).tolist()) - {0, 1})[:5]
        raise MetricInputError(f"labels must be 0 (benign) or 1 (malignant){where}; found {bad}")
    if not np.all(np.isfinite(s)):
        raise MetricInputError(f"{int((~np.isfinite(s)).sum())} scores are not finite{where}")
    return y.astype(np.int8), s


# ----------------------------------------------------------------------------------------------------------
# Threshold sweep and confusion metrics
# ----------------------------------------------------------------------------------------------------------
def _sweep(y: np.ndarray, s: np.ndarray):
    """(thresholds, tp, fp, precision, recall, f1) in DESCENDING threshold order, for checked arrays."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last_of_run]
    fps = (last_of_run + 1) - tps
    pos = int(tps[-1])
    precision = tps / (tps + fps)
    recall = tps / pos if pos else np.full(len(tps), np.nan)
    f1 = 2 * tps / (tps + fps + pos)
    return s_sorted[last_of_run], tps, fps, precision, recall, f1


def threshold_sweep(y_true, score) -> pd.DataFrame:
    """Precision, recall and F1 at every distinct score used as threshold (``score >= threshold``).

    Rows are in ascending threshold order, matching ``sklearn.metrics.precision_recall_curve`` minus its
    final (P=1, R=0) point. With no positive label, recall is nan and F1 is 0.
    """
    y, s = check_binary(y_true, score)
    thr, tps, fps, precision, recall, f1 = _sweep(y, s)
    pos = int(y.sum())
    out = pd.DataFrame({"threshold": thr, "tp": tps, "fp": fps, "fn": pos - tps,
                        "precision": precision, "recall": recall, "f1": f1})
    return out.iloc[::-1].reset_index(drop=True)


def best_f1_threshold(y_true, score) -> tuple[float, str]:
    """``(threshold, reason)``: the best-F1 threshold of the full sweep; nan + reason when undefined."""
    y, s = check_binary(y_true, score)
    if y.sum() == 0:
        return math.nan, "no positive label: F1 is 0 at every threshold"
    thr, *_, f1 = _sweep(y, s)
    # ascending order, first maximum = lowest threshold among ties (sklearn order + np.argmax)
    return float(thr[::-1][int(np.argmax(f1[::-1]))]), ""


def confusion_metrics(y_true, y_pred) -> dict:
    """Accuracy, precision, recall, F1 of 0/1 predictions (empty denominators give 0.0, as sklearn)."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    fn = int(np.sum(y & ~p))
    tn = int(np.sum(~y & ~p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return {"accuracy": (tp + tn) / len(y), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def metrics_at(y_true, score, threshold: float, strict: bool = False) -> dict:
    """Confusion metrics predicting ``score > threshold`` (strict) or ``score >= threshold``."""
    y, s = check_binary(y_true, score)
    if not np.isfinite(threshold):
        return {k: math.nan for k in ("accuracy", "precision", "recall", "f1")}
    pred = s > threshold if strict else s >= threshold
    return confusion_metrics(y, pred)


def auroc(y_true, score) -> tuple[float, str]:
    """``(AUROC, reason)``; nan and the reason when only one class is present.

    Computed as the Mann-Whitney statistic with mid-ranks for ties (identical to
    ``sklearn.metrics.roc_auc_score``, which the tests check, and fast enough for the bootstrap).
    """
    from scipy.stats import rankdata

    y, s = check_binary(y_true, score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan, f"only class {int(y[0])} present: AUROC undefined"
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)), ""


# ----------------------------------------------------------------------------------------------------------
# Flip statistics
# ----------------------------------------------------------------------------------------------------------
def flip_stats(anchor_label, anchor_score, cf_score_to_benign, cf_score_to_malignant, threshold: float) -> dict:
    """Flip rates and mean change in target score per direction (module docstring), one row per anchor.

    ``cf_score_to_benign`` / ``cf_score_to_malignant``: the score of the anchor's target-0 / target-1
    counterfactual (nan where that counterfactual is missing). Anchors are "correct" when
    ``(anchor_score > threshold) == anchor_label``.
    """
    lab = np.asarray(anchor_label).astype(int)
    s0 = np.asarray(anchor_score, dtype=float)
    c0 = np.asarray(cf_score_to_benign, dtype=float)
    c1 = np.asarray(cf_score_to_malignant, dtype=float)
    if not (len(lab) == len(s0) == len(c0) == len(c1)):
        raise MetricInputError("anchor_label, anchor_score and the two counterfactual score arrays differ in length")
    correct = (s0 > threshold) == (lab == 1)
    b = correct & (lab == 0) & np.isfinite(c1)
    m = correct & (lab == 1) & np.isfinite(c0)

    def mean(x):
        return float(np.mean(x)) if len(x) else math.nan

    return {
        "flip_rate_b2m": mean(c1[b] > threshold),
        "flip_rate_m2b": mean(~(c0[m] > threshold)),
        "delta_score_b2m": mean(c1[b] - s0[b]),
        "delta_score_m2b": mean(s0[m] - c0[m]),
        "n_correct_benign_anchors": int(b.sum()),
        "n_correct_malignant_anchors": int(m.sum()),
    }


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    resamples: int
    valid: int


def bootstrap(statistic: Callable[..., Mapping[str, float]], n_units: int | tuple[int, ...], resamples: int,
              seed: int | np.random.Generator, level: float = 0.95) -> dict[str, Interval]:
    """Seeded percentile bootstrap of every number ``statistic`` returns: the package's only bootstrap.

    ``statistic(idx)`` gets an int array of unit indices (``np.arange(n_units)`` for the estimate, a
    resample with replacement otherwise) and returns ``{name: value}``. Each resample draws ``n_units``
    indices from ``np.random.default_rng(seed)`` (a Generator passed as ``seed`` is used as it is, so several
    calls can share one stream); the interval is the ``(1-level)/2`` and ``(1+level)/2`` percentiles of the
    finite resampled values (nan if none).

    Strata (``n_units`` a tuple of sizes, e.g. malignant and benign images): each stratum is resampled within
    itself and ``statistic`` gets one index array per stratum; all resamples of a stratum are drawn before the
    next stratum's.
    """
    sizes = (int(n_units),) if np.ndim(n_units) == 0 else tuple(int(n) for n in n_units)
    if min(sizes) < 1:
        raise MetricInputError("bootstrap needs at least one unit")
    if not 0 < level < 1:
        raise MetricInputError(f"confidence level must be in (0, 1), got {level}")
    point = dict(statistic(*(np.arange(n) for n in sizes)))
    rng = np.random.default_rng(seed)
    draws = {k: np.full(resamples, np.nan) for k in point}
    for r, idx in enumerate(_resamples(rng, sizes, resamples)):
        vals = statistic(*idx)
        for k in point:
            draws[k][r] = vals.get(k, math.nan)
    out = {}
    for k, est in point.items():
        d = draws[k][np.isfinite(draws[k])]
        lo, hi = percentile_interval(d, level)
        out[k] = Interval(float(est), lo, hi, resamples, int(len(d)))
    return out


def _resamples(rng: np.random.Generator, sizes: tuple[int, ...], resamples: int):
    """Index arrays of each resample, one per stratum. One stratum is drawn resample by resample (the same
    stream as one (resamples, n) draw, without holding it); several are drawn stratum by stratum."""
    if len(sizes) == 1:
        for _ in range(resamples):
            yield (rng.integers(0, sizes[0], sizes[0]),)
        return
    blocks = [rng.integers(0, n, (resamples, n)) for n in sizes]
    for r in range(resamples):
        yield tuple(b[r] for b in blocks)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The ``(1-level)/2`` and ``(1+level)/2`` percentiles of ``values`` (all finite); nan, nan when empty."""
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------
# Table 1
# ----------------------------------------------------------------------------------------------------------
def group_statistics(y_true, score, fixed_threshold: float) -> dict:
    """Every classification number of one Table 1 column (module conventions); nan where undefined."""
    thr, _ = best_f1_threshold(y_true, score)
    best = metrics_at(y_true, score, thr, strict=False)
    fixed = metrics_at(y_true, score, fixed_threshold, strict=True)
    out = {"threshold_best_f1": thr}
    out.update({f"{k}_best_f1": best[k] for k in ("accuracy", "precision", "recall", "f1")})
    out["threshold_fixed"] = float(fixed_threshold)
    out.update({f"{k}_fixed": fixed[k] for k in ("accuracy", "precision", "recall", "f1")})
    out["auroc"] = auroc(y_true, score)[0]
    return out


def _reasons(y, s) -> str:
    notes = [r for r in (best_f1_threshold(y, s)[1], auroc(y, s)[1]) if r]
    return "; ".join(notes)


def anchor_table(scores: pd.DataFrame, generator: str) -> pd.DataFrame:
    """One row per anchor with a counterfactual of ``generator``: anchor_id, anchor_label, anchor_score,
    cf_score_to_benign, cf_score_to_malignant (nan where missing).

    ``scores`` is results/scores/scores.csv with an ``anchor_id`` column (see :func:`attach_anchor_ids`).
    """
    orig = scores[scores["generator"] == ORIGINAL].drop_duplicates("image_id").set_index("image_id")["score"]
    cf = scores[scores["generator"] == generator]
    wide = cf.pivot_table(index="anchor_id", columns="target_label", values="score", aggfunc="first")
    labels = cf.groupby("anchor_id")["anchor_label"].first()
    out = pd.DataFrame({"anchor_id": wide.index, "anchor_label": labels.reindex(wide.index).to_numpy()})
    out["anchor_score"] = orig.reindex(wide.index).to_numpy()
    out["cf_score_to_benign"] = wide[0].to_numpy() if 0 in wide else np.nan
    out["cf_score_to_malignant"] = wide[1].to_numpy() if 1 in wide else np.nan
    missing = out["anchor_score"].isna()
    if missing.any():
        raise MetricInputError(
            f"{int(missing.sum())} anchors of generator '{generator}' have no score as an original in the scores "
            f"table (e.g. {out.loc[missing, 'anchor_id'].iloc[0]}); the scoring stage must score every anchor")
    return out.reset_index(drop=True)


def attach_anchor_ids(scores: pd.DataFrame, anchors: Iterable[str] | None = None) -> pd.DataFrame:
    """Add ``anchor_id`` to the counterfactual rows of the scores table (originals: their own image_id).

    Uses an ``anchor_id`` column when the scoring stage wrote one; otherwise the image_id if it names an
    anchor; otherwise the counterfactual contract's file name ``<anchor_id>_to<target>.png``.
    """
    df = scores.copy()
    if "anchor_id" in df.columns and df["anchor_id"].notna().all():
        return df
    known = set(anchors) if anchors is not None else set(df.loc[df["generator"] == ORIGINAL, "image_id"])
    ids = []
    for gen, img, path, tgt in zip(df["generator"], df["image_id"].astype(str), df["path"].astype(str),
                                   df["target_label"]):
        if gen == ORIGINAL or img in known:
            ids.append(img)
            continue
        stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for cand in (img, stem):
            suffix = f"_to{int(tgt)}"
            if cand.endswith(suffix) and cand[: -len(suffix)] in known:
                ids.append(cand[: -len(suffix)])
                break
        else:
            raise MetricInputError(
                f"cannot tell which anchor the {gen} counterfactual image_id={img!r} path={path!r} belongs to: "
                "scores.csv needs an anchor_id column, or image ids / file names <anchor_id>_to<target>")
    df["anchor_id"] = ids
    return df


def table1(scores: pd.DataFrame, generators: list[str], fixed_threshold: float, resamples: int, seed: int,
           level: float = 0.95) -> pd.DataFrame:
    """Long-format Table 1 (``TABLE_COLUMNS``): originals (ground truth) + each generator (target label).

    ``scores``: the scores table with ``anchor_id`` (:func:`attach_anchor_ids`). Each group gets its own
    bootstrap stream (``seed`` + group position) so adding a generator leaves the others' intervals alone.
    """
    rows = []
    need = {"generator", "image_id", "target_label", "score"}
    if missing := need - set(scores.columns):
        raise MetricInputError(f"scores table lacks columns {sorted(missing)}")
    orig = scores[scores["generator"] == ORIGINAL].drop_duplicates("image_id").reset_index(drop=True)
    if orig.empty:
        raise MetricInputError("scores table has no 'original' rows: Table 1 needs the originals' scores")
    groups = [(ORIGINAL, "ground-truth label", None)] + [(g, "target label", g) for g in generators]
    for pos, (group, truth, gen) in enumerate(groups):
        if gen is None:
            y = orig["target_label"].to_numpy().astype(int)
            s = orig["score"].to_numpy(float)

            def stat(idx, y=y, s=s):
                return group_statistics(y[idx], s[idx], fixed_threshold)

            n_units = n_images = len(orig)
            note = _reasons(y, s)
        else:
            cf = scores[scores["generator"] == gen]
            if cf.empty:
                raise MetricInputError(f"scores table has no rows for generator '{gen}' (configured in "
                                       "counterfactuals.generators); rerun the scoring stage")
            at = anchor_table(scores, gen)
            y = np.r_[np.zeros(len(at), int), np.ones(len(at), int)]
            s = np.r_[at["cf_score_to_benign"].to_numpy(), at["cf_score_to_malignant"].to_numpy()]
            present = np.isfinite(s)
            unit = np.r_[np.arange(len(at)), np.arange(len(at))]
            lab, s0 = at["anchor_label"].to_numpy(int), at["anchor_score"].to_numpy(float)
            c0, c1 = at["cf_score_to_benign"].to_numpy(float), at["cf_score_to_malignant"].to_numpy(float)

            def stat(idx, y=y, s=s, present=present, unit=unit, n=len(at), lab=lab, s0=s0, c0=c0, c1=c1):
                sel = np.r_[idx, idx + n]
                sel = sel[present[sel]]
                out = group_statistics(y[sel], s[sel], fixed_threshold)
                out.update(flip_stats(lab[idx], s0[idx], c0[idx], c1[idx], fixed_threshold))
                return out

            n_units, n_images = len(at), int(present.sum())
            note = _reasons(y[present], s[present])
        ci = bootstrap(stat, n_units, resamples, seed + pos, level)
        wilson_flip_intervals(ci, level)
        for metric in METRICS:
            if metric not in ci:
                continue
            iv = ci[metric]
            rule = ("score >= t" if metric.endswith("best_f1") else "score > t; Wilson interval"
                    if metric.startswith("flip") else "score > t" if metric.endswith("fixed")
                    or metric.startswith("n_correct") else "")
            row_note = note if metric in ("threshold_best_f1", "auroc") or metric.endswith("best_f1") else ""
            if metric == "threshold_fixed":
                row_note = "set by the classifier (classifier.json); not estimated"
            rows.append({"group": group, "ground_truth": truth, "metric": metric, "estimate": iv.estimate,
                         "ci_low": iv.low, "ci_high": iv.high, "ci_level": level, "resamples": iv.resamples,
                         "resamples_valid": iv.valid, "n_units": n_units, "n_images": n_images, "rule": rule,
                         "note": row_note})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (no continuity correction); (nan, nan) for n = 0.

    Unlike a bootstrap, 13/13 gives [0.772, 1.000] rather than [1, 1]: the interval says how little 13 trials
    can show.
    """
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k={k} must lie in [0, n={n}]")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (rounding would give 1 - 1e-16)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def wilson_flip_intervals(ci: dict, level: float) -> None:
    """Replace the bootstrap intervals of the flip rates by Wilson score intervals (in place): a bootstrap of
    13/13 flips gives [1, 1], as if 13 trials could prove a rate of 1; Wilson gives [0.77, 1]."""
    for rate, count in (("flip_rate_b2m", "n_correct_benign_anchors"), ("flip_rate_m2b", "n_correct_malignant_anchors")):
        if rate in ci and count in ci:
            n = int(round(ci[count].estimate))
            est = ci[rate].estimate
            k = int(round(est * n)) if n and np.isfinite(est) else 0
            lo, hi = wilson_interval(k, n, level)
            ci[rate] = Interval(est, lo, hi, 0, 0)


def _fmt(x: float, integer: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if integer else f"{x:.3f}"


def table1_wide(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as one row per metric (its description) x one column per group, ``estimate [low, high]``."""
    groups = list(dict.fromkeys(table["group"]))
    rows = []
    extra = [m for m in dict.fromkeys(table["metric"]) if m not in METRICS]  # e.g. the oracle rows of the judges
    for metric, desc in [*METRICS.items(), *((m, m) for m in extra)]:
        sub = table[table["metric"] == metric].set_index("group")
        if sub.empty:
            continue
        integer = metric.startswith("n_correct")
        row = {"metric": desc}
        for g in groups:
            if g not in sub.index:
                row[g] = "—"
                continue
            r = sub.loc[g]
            no_interval = metric == "threshold_fixed" or not (np.isfinite(r["ci_low"]) or np.isfinite(r["ci_high"]))
            row[g] = (_fmt(r["estimate"], integer) if no_interval and np.isfinite(r["estimate"]) else
                      _fmt(r["estimate"]) if metric == "threshold_fixed" else
                      f"{_fmt(r['estimate'], integer)} [{_fmt(r['ci_low'], integer)}, {_fmt(r['ci_high'], integer)}]")
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric"] + groups)


def table1_notes(table: pd.DataFrame) -> list[str]:
    """Per-group sizes and the reasons for undefined numbers, as sentences."""
    counts = table.drop_duplicates("group").set_index("group")
    notes = ["Images per column: " + ", ".join(
        f"{g} {int(r['n_images'])} ({int(r['n_units'])} bootstrap units)" for g, r in counts.iterrows()) + "."]
    reasons = [f"{g}: {n}" for g, n in table[["group", "note"]].itertuples(index=False)
               if isinstance(n, str) and n and not n.startswith("set by")]
    return notes + list(dict.fromkeys(reasons))


def table1_markdown(table: pd.DataFrame, title: str = "Table 1", footnotes: Iterable[str] = ()) -> str:
    """Readable Table 1: one row per metric, one column per group, ``estimate [low, high]``."""
    wide = table1_wide(table)
    level = float(table["ci_level"].iloc[0]) if len(table) else 0.95
    lines = [f"# {title}", "",
             f"Estimate [{level:.0%} interval: percentile bootstrap over anchors; Wilson score for flip rates]; "
             "originals against their ground-truth "
             "label, counterfactuals against their target label.", ""]
    lines.append("| " + " | ".join(wide.columns) + " |")
    lines.append("|---|" + "---|" * (len(wide.columns) - 1))
    for row in wide.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
    lines += [f"- {n}" for n in table1_notes(table)]
    lines += [f"- {f}" for f in footnotes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Closeness of a counterfactual to its anchor
# ----------------------------------------------------------------------------------------------------------
def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004) of two images (H, W) or (H, W, C) in the same range, channels averaged.

    Gaussian window (``window`` taps, ``sigma``, normalised to sum 1), statistics over the 'valid' region (no
    padding). The local moments are Gaussian-weighted averages: variance ``w*(x^2) - (w*x)^2`` and covariance
    ``w*(xy) - (w*x)(w*y)``, with no N/(N-1) sample-covariance factor (as in Wang et al.'s reference MATLAB
    ``ssim_index.m``; scikit-image's ``use_sample_covariance=False``). Windows larger than the image are shrunk.
    """
    # Hand-written instead of scikit-image's structural_similarity or torchmetrics' SSIM: neither package is a
    # dependency of the pipeline or its cluster environment, and these few lines of SciPy filtering are cheaper to
    # keep than a new pinned package.
    from scipy.ndimage import correlate1d

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise MetricInputError(f"SSIM needs images of one shape; got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    window = min(window, a.shape[0], a.shape[1])
    w = _gaussian_window(window, sigma)
    crop = window // 2

    def filt(x):
        for axis in (0, 1):
            x = correlate1d(x, w, axis=axis, mode="reflect")
        h, wd = x.shape[:2]
        return x[crop:h - (window - 1 - crop), crop:wd - (window - 1 - crop)]

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a ** 2
    sbb = filt(b * b) - mu_b ** 2
    sab = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def closeness(anchor: np.ndarray, cf: np.ndarray, tolerance: int = 8, ssim_window: int = 11,
              ssim_sigma: float = 1.5) -> dict:
    """Closeness of one counterfactual to its anchor; both uint8 (H, W, 3) at the SAME size.

    L1 = mean |Δ|, L2 = root-mean-square Δ, on intensities scaled to [0, 1]; SSIM on [0, 1] images;
    ``frac_changed`` = share of pixels whose largest channel difference exceeds ``tolerance`` (8-bit levels).
    """
    a = np.asarray(anchor)
    c = np.asarray(cf)
    if a.shape != c.shape or a.ndim != 3:
        raise MetricInputError(f"anchor and counterfactual must be (H, W, 3) of one size; got {a.shape}, {c.shape}")
    af, cf_ = unit_float(a), unit_float(c)
    d = cf_ - af
    changed = np.abs(c.astype(np.int16) - a.astype(np.int16)).max(axis=-1) > tolerance
    return {"l1": float(np.abs(d).mean()), "l2": float(np.sqrt((d ** 2).mean())),
            "ssim": ssim(af, cf_, 1.0, ssim_window, ssim_sigma), "frac_changed": float(changed.mean())}


CLOSENESS_METRICS = ("l1", "l2", "ssim", "frac_changed")


def closeness_summary(per_image: pd.DataFrame, resamples: int, seed: int, level: float = 0.95) -> pd.DataFrame:
    """Mean of each closeness metric per generator and direction (all / to benign / to malignant), with a
    bootstrap interval over anchors. ``per_image`` columns: generator, anchor_id, target_label + metrics."""
    rows = []
    for pos, (gen, sub) in enumerate(per_image.groupby("generator", sort=False)):
        for direction, part in (("all", sub), ("to benign", sub[sub["target_label"] == 0]),
                                ("to malignant", sub[sub["target_label"] == 1])):
            if part.empty:
                continue
            anchors = part["anchor_id"].drop_duplicates().to_numpy()
            pos_of = {a: i for i, a in enumerate(anchors)}
            unit = part["anchor_id"].map(pos_of).to_numpy()
            members = [np.flatnonzero(unit == i) for i in range(len(anchors))]
            vals = {m: part[m].to_numpy(float) for m in CLOSENESS_METRICS}

            def stat(idx, members=members, vals=vals):
                sel = np.concatenate([members[i] for i in idx])
                return {m: float(v[sel].mean()) for m, v in vals.items()}

            ci = bootstrap(stat, len(anchors), resamples, seed + pos, level)
            for m in CLOSENESS_METRICS:
                iv = ci[m]
                rows.append({"generator": gen, "direction": direction, "metric": m, "estimate": iv.estimate,
                             "ci_low": iv.low, "ci_high": iv.high, "ci_level": level, "resamples": resamples,
                             "n_images": len(part), "n_anchors": len(anchors)})
    return pd.DataFrame(rows)
