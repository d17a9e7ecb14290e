"""File-level steps of the judges: read the upstream contracts, call :mod:`cfaudit.judges`, write the tables.

* :func:`make_diagnostics` (rule diagnostics): per counterfactual and per anchor, the audited classifier's score
  after each transform of :data:`cfaudit.judges.TRANSFORMS`, the out-of-gamut share and the high-frequency ratio
  of the change.
* :func:`make_judges` (rule judges): "Are the counterfactuals semantic?": per generator and direction the audited
  and oracle flip rates, transfer, survival, gamut, realism and closeness, paired differences between generators,
  a verdict per generator, and the checks of guided against the GAN, SDEdit and PGD (:func:`criteria_table`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cfaudit import judges as J
from cfaudit.files import write_csv
from cfaudit.files import atomic_write_text
from cfaudit.judges_sources import unmet_sources
from cfaudit.metrics_stage import comparable_pair, read_scores, read_spec, real_reference_index
from cfaudit.names import ORIGINAL

log = logging.getLogger("cfaudit.judges")


# ----------------------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------------------
def _transformed_scores(clf, images: list[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """{transform: audited score of each transformed image} ('plain': untransformed), through the scoring stage's
    own preprocessing."""
    import torch

    from cfaudit.scoring import score_paths

    out = {}
    for name in ("plain", *J.TRANSFORMS):
        batch = images if name == "plain" else [J.transform(im, name) for im in images]
        logits = torch.from_numpy(score_paths(clf, batch, batch_size, "pil", 1))
        out[name] = clf.score(logits).numpy().astype(np.float64)
    return out


def make_diagnostics(spec_path, index_paths: dict, anchors_path, pack, pack_index, split, cfg: dict, device,
                     out_per_image, out_gamut) -> pd.DataFrame:
    """diagnostics_per_image.csv: one row per anchor (generator 'original') and per counterfactual."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.data.pack import load_pack
    from cfaudit.counterfactuals import read_anchor_pixels
    from cfaudit.scoring import load_raw  # here, not at the top: scoring loads torch, which the judges job never needs

    clf = load_classifier(spec_path, device)
    anchors = pd.read_csv(anchors_path)
    anchors["image_id"] = anchors["image_id"].astype(str)
    anchor_px = dict(zip(anchors["image_id"], read_anchor_pixels(pack, pack_index, anchors["image_id"].tolist())))
    ref_ids = set(real_reference_index(split, anchors_path)["image_id"].astype(str))
    real, real_index = load_pack(pack, pack_index, split, "eval")
    gamut = J.gamut_range(real[real_index["image_id"].astype(str).isin(ref_ids).to_numpy()])
    tol, cutoff = int(cfg["pixel_change_tolerance"]), float(cfg["hf_cutoff"])
    frames = []
    jobs = [(ORIGINAL, anchors.assign(anchor_id=anchors["image_id"], anchor_label=anchors["label"],
                                      target_label=anchors["label"], path=anchors["png"]))]
    jobs += [(g, pd.read_csv(p).assign(anchor_id=lambda d: d["anchor_id"].astype(str))) for g, p in index_paths.items()]
    for gen, rows in jobs:
        images = [anchor_px[a] if gen == ORIGINAL else load_raw(p) for a, p in zip(rows["anchor_id"], rows["path"])]
        scores = _transformed_scores(clf, images, int(cfg["batch_size"]))  # as stored, each at its own size
        pairs = [comparable_pair(anchor_px[a], im, cfg.get("size")) for a, im in zip(rows["anchor_id"], images)]
        gam = [J.out_of_gamut_share(a, im, gamut, tol) for a, im in pairs]
        df = pd.DataFrame({"generator": gen, "anchor_id": rows["anchor_id"].to_numpy(),
                           "anchor_label": rows["anchor_label"].astype(int).to_numpy(),
                           "target_label": rows["target_label"].astype(int).to_numpy(),
                           "out_of_gamut_share": [g[0] for g in gam], "n_changed_pixels": [g[1] for g in gam],
                           "hf_ratio": [J.high_frequency_ratio(a, im, cutoff) for a, im in pairs],
                           "compared_at": [a.shape[0] for a, _ in pairs]})
        for name, s in scores.items():
            df[f"score_{name}"] = s
        if gen == ORIGINAL:  # real pixels outside the real range: the baseline of the gamut judge
            light, chroma = J.lightness_chroma(np.stack([a for a, _ in pairs]))
            outside = ((light < gamut["L_low"]) | (light > gamut["L_high"]) | (chroma < gamut["C_low"])
                       | (chroma > gamut["C_high"]))
            df["out_of_gamut_share"] = outside.reshape(len(images), -1).mean(axis=1)
        frames.append(df)
    per_image = pd.concat(frames, ignore_index=True)
    write_csv(per_image, out_per_image)
    Path(out_gamut).write_text(json.dumps({**gamut, "threshold": clf.threshold, "classifier": clf.name,
                                           "pixel_change_tolerance": tol, "hf_cutoff": cutoff,
                                           "compared_at": cfg.get("size") or "anchor size"}, indent=2))
    log.info("diagnostics: %d rows; real gamut L* [%.1f, %.1f], C* [%.1f, %.1f]", len(per_image), gamut["L_low"],
             gamut["L_high"], gamut["C_low"], gamut["C_high"])
    return per_image


# ----------------------------------------------------------------------------------------------------------
# The judges table
# ----------------------------------------------------------------------------------------------------------
def _row(generator, direction, metric, judge, values: dict, note: str = "") -> dict:
    return {"generator": generator, "direction": direction, "metric": metric, "judge": judge, **values, "note": note}


def _survival(per_image: pd.DataFrame, flips: pd.DataFrame, generator: str, threshold: float) -> pd.DataFrame:
    """``flips`` (audited, per anchor and direction) with a 0/1 survival column per transform (nan if no flip)."""
    d = per_image[per_image["generator"] == generator].set_index(["anchor_id", "target_label"])
    out = flips.copy()
    target = out["direction"].map({k: v[1] for k, v in J.DIRECTIONS.items()})
    keys = list(zip(out["anchor_id"], target))
    for name in J.TRANSFORMS:
        s = d[f"score_{name}"].reindex(keys).to_numpy(float)
        on_target = np.where(target.to_numpy() == 1, s > threshold, ~(s > threshold)).astype(float)
        out[name] = np.where(out["flipped"] == 1, on_target, np.nan)
    return out


def generator_rows(gen: str, audited: pd.DataFrame, oracles: dict[str, pd.DataFrame], consensus: pd.DataFrame,
                   survival: pd.DataFrame, per_image: pd.DataFrame, closeness: pd.DataFrame | None,
                   boot: dict, seed: int) -> list[dict]:
    """The judges' rows of one generator, per direction."""
    level, res = boot["level"], boot["resamples"]
    rows = []
    for k, direction in enumerate(J.DIRECTIONS):
        src, tgt = J.DIRECTIONS[direction]
        a = audited[audited["direction"] == direction]
        aud = J.rate_row(a["flipped"], level)
        rows.append(_row(gen, direction, "audited flip rate", "audited", aud))
        for name, df in oracles.items():
            o = df[df["direction"] == direction]
            rows.append(_row(gen, direction, "oracle flip rate", name, J.rate_row(o["flipped"], level)))
            rows.append(_row(gen, direction, "oracle score change toward target", name,
                             J.mean_row(o["delta"], res, seed + 10 * k + 1, level)))
        c = consensus[consensus["direction"] == direction]
        mean = J.mean_row(c["flipped"], res, seed + 10 * k + 2, level)
        rows.append(_row(gen, direction, "oracle flip rate", "mean of oracles", mean,
                         "per anchor: share of the oracles that got the anchor right and flip"))
        rows.append(_row(gen, direction, "oracle score change toward target", "mean of oracles",
                         J.mean_row(c["delta"], res, seed + 10 * k + 3, level)))
        ratio = mean["estimate"] / aud["estimate"] if aud["estimate"] and np.isfinite(aud["estimate"]) else math.nan
        rows.append(_row(gen, direction, "transfer ratio", "mean of oracles / audited",
                         {"estimate": ratio, "ci_low": math.nan, "ci_high": math.nan, "n": aud["n"], "interval": ""}))
        s = survival[survival["direction"] == direction]
        for name in J.TRANSFORMS:
            rows.append(_row(gen, direction, f"flip survival ({name})", "audited", J.rate_row(s[name], level),
                             "share of audited flips still flips after the transform"))
        d = per_image[(per_image["generator"] == gen) & (per_image["anchor_label"] == src)
                      & (per_image["target_label"] == tgt)]
        rows.append(_row(gen, direction, "out-of-gamut share", "pixels",
                         J.mean_row(d["out_of_gamut_share"], res, seed + 10 * k + 4, level),
                         "share of changed pixels with L* or C* outside the real images' 0.5-99.5 % range"))
        rows.append(_row(gen, direction, "high-frequency ratio", "pixels",
                         J.mean_row(d["hf_ratio"], res, seed + 10 * k + 5, level),
                         "HF share of the change / HF share of the anchor (1 = as smooth as the image)"))
        if closeness is not None:
            cl = closeness[(closeness["generator"] == gen) & (closeness["anchor_label"] == src)
                           & (closeness["target_label"] == tgt)]
            rows.append(_row(gen, direction, "L1 to the anchor", "pixels",
                             J.mean_row(cl["l1"], res, seed + 10 * k + 6, level)))
    return rows


def anchor_bootstrap(ids_a, ids_b, anchors, difference, resamples: int, seed: int, level: float) -> dict:
    """``difference(rows_a, rows_b)`` (row indices of the two generators' units) with a percentile bootstrap over
    ``anchors``: a resampled anchor brings all its units of both generators, so a generator's units need not pair
    one to one with the other's."""
    from cfaudit.metrics import bootstrap

    ids_a, ids_b = np.asarray(ids_a).astype(str), np.asarray(ids_b).astype(str)
    rows_a = [np.flatnonzero(ids_a == x) for x in anchors]
    rows_b = [np.flatnonzero(ids_b == x) for x in anchors]

    def stat(idx):
        return {"d": difference(np.concatenate([rows_a[i] for i in idx]), np.concatenate([rows_b[i] for i in idx]))}

    return J.bootstrap_row(bootstrap(stat, len(anchors), resamples, seed, level)["d"], len(anchors))


def fd_paired_difference(features: dict, a: str, b: str, resamples: int, seed: int, level: float) -> dict:
    """FD(a) - FD(b) against the reference features, all counterfactuals of each generator, with a percentile
    bootstrap over the anchors both generators share (an anchor brings all its counterfactuals)."""
    from cfaudit.fid import fd_to_reference

    fd = fd_to_reference(features["reference"])
    fa, fb = np.asarray(features[f"gen:{a}"], np.float64), np.asarray(features[f"gen:{b}"], np.float64)
    ida, idb = features[f"anchor:{a}"].astype(str), features[f"anchor:{b}"].astype(str)
    shared = sorted(set(ida) & set(idb))
    return anchor_bootstrap(ida, idb, shared, lambda sa, sb: fd(fa[sa]) - fd(fb[sb]), resamples, seed, level)


def mean_difference(a: pd.DataFrame, b: pd.DataFrame, resamples: int, seed: int, level: float) -> dict:
    """Mean of a's ``value`` minus mean of b's over each one's own finite units (columns ``anchor_id``, ``value``),
    with a bootstrap over the anchors either has: the difference of the two pooled means the checks of gamut and
    survival compare, and how sure it is, where the units (changed pixels' shares, flips) do not pair."""
    a, b = a[np.isfinite(a["value"].astype(float))], b[np.isfinite(b["value"].astype(float))]
    va, vb = a["value"].to_numpy(float), b["value"].to_numpy(float)

    def difference(sa, sb):
        return float(va[sa].mean() - vb[sb].mean()) if len(sa) and len(sb) else math.nan

    anchors = sorted(set(a["anchor_id"].astype(str)) | set(b["anchor_id"].astype(str)))
    return anchor_bootstrap(a["anchor_id"], b["anchor_id"], anchors, difference, resamples, seed, level)


def unit_values(per_image: pd.DataFrame, survivals: dict) -> dict:
    """{metric: {generator: (anchor_id, value)}} for the mean differences: each counterfactual toward the other
    class's out-of-gamut share, and each audited flip's survival averaged over the transforms."""
    cross = per_image[per_image["anchor_label"] != per_image["target_label"]]
    gamut = {g: pd.DataFrame({"anchor_id": d["anchor_id"].astype(str), "value": d["out_of_gamut_share"]})
             for g, d in cross.groupby("generator")}
    survival = {g: pd.DataFrame({"anchor_id": s["anchor_id"].astype(str),
                                 "value": s[list(J.TRANSFORMS)].mean(axis=1, skipna=False)})
                for g, s in survivals.items()}
    return {"out-of-gamut share": gamut, "flip survival (mean of 3)": survival}


def comparison_pairs(generators: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs whose paired differences are reported: every method vs the PGD control, and guided vs the
    other generators."""
    pairs = [(g, "pgd") for g in generators if g != "pgd" and "pgd" in generators]
    if "guided" in generators:
        pairs += [("guided", g) for g in generators if g not in ("guided", "pgd")]
    return list(dict.fromkeys(pairs))


def _paired(values: dict, a: str, b: str, key: list[str], column: str, boot: dict, seed: int) -> dict:
    m = values[a][key + [column]].merge(values[b][key + [column]], on=key, suffixes=("_a", "_b"))
    return J.paired_difference(m[f"{column}_a"], m[f"{column}_b"], boot["resamples"], seed, boot["level"])


def difference_rows(pairs, consensus: dict, closeness: pd.DataFrame | None, features: dict | None, boot: dict,
                    seed: int, fd_resamples: int, units: dict | None = None) -> list[dict]:
    """Paired differences a - b: mean oracle flip rate (per direction and both), L1, and for guided, the method
    under test, the judge's FD (each resample costs an eigendecomposition) and the differences of the means of
    ``units`` (:func:`unit_values`: out-of-gamut share, flip survival)."""
    rows = []
    l1 = ({g: d.assign(direction=np.where(d["target_label"] == 1, "b2m", "m2b"))
           for g, d in closeness[closeness["anchor_label"] != closeness["target_label"]].groupby("generator")}
          if closeness is not None else {})
    for p, (a, b) in enumerate(pairs):
        s = seed + 100 * (p + 1)
        for k, direction in enumerate([*J.DIRECTIONS, "both"]):
            ca = consensus[a] if direction == "both" else consensus[a][consensus[a]["direction"] == direction]
            cb = consensus[b] if direction == "both" else consensus[b][consensus[b]["direction"] == direction]
            res = _paired({a: ca, b: cb}, a, b, ["anchor_id", "direction"], "flipped", boot, s + k)
            rows.append({"a": a, "b": b, "direction": direction, "metric": "mean oracle flip rate", **res})
            if a in l1 and b in l1:
                la = l1[a] if direction == "both" else l1[a][l1[a]["direction"] == direction]
                lb = l1[b] if direction == "both" else l1[b][l1[b]["direction"] == direction]
                res = _paired({a: la, b: lb}, a, b, ["anchor_id", "direction"], "l1", boot, s + 10 + k)
                rows.append({"a": a, "b": b, "direction": direction, "metric": "L1 to the anchor", **res})
        if a == "guided" and features is not None and f"gen:{a}" in features and f"gen:{b}" in features:
            res = fd_paired_difference(features, a, b, fd_resamples, s + 50, boot["level"])
            rows.append({"a": a, "b": b, "direction": "all counterfactuals", "metric": "judge-feature FD", **res})
        for k, (metric, values) in enumerate((units or {}).items() if a == "guided" else []):
            if a in values and b in values:
                res = mean_difference(values[a], values[b], boot["resamples"], s + 60 + k, boot["level"])
                rows.append({"a": a, "b": b, "direction": "both", "metric": metric, **res})
    return rows


def _realism_rows(realism_csv) -> list[dict]:
    """The judge-feature FD/KID of each set from fid.csv (one number per generator, both directions)."""
    if realism_csv is None:
        return []
    t = pd.read_csv(realism_csv, keep_default_na=False, na_values=[""])
    return [_row(r["set"], "both", r["metric"], "realism", {"estimate": r["value"], "ci_low": math.nan,
                                                           "ci_high": math.nan, "n": r["n_real"], "interval": ""},
                 f"vs {r['reference']} ({r.get('reference_images', 'eval')})") for _, r in t.iterrows()]


def _long_row(long: pd.DataFrame, gen: str, direction: str, metric: str, judge: str) -> pd.Series | None:
    """The row of the long table for one generator, direction, metric and judge (None if absent)."""
    r = long[(long["generator"] == gen) & (long["direction"] == direction) & (long["metric"] == metric)
             & (long["judge"] == judge)]
    return r.iloc[0] if len(r) else None


def _diff_row(diffs: pd.DataFrame, a: str, b: str, direction: str, metric: str) -> pd.Series | None:
    """The paired difference a − b of one metric and direction (None if absent)."""
    if not len(diffs):
        return None
    r = diffs[(diffs["a"] == a) & (diffs["b"] == b) & (diffs["direction"] == direction) & (diffs["metric"] == metric)]
    return r.iloc[0] if len(r) else None


def _pooled(rows: pd.DataFrame, gen: str, metric: str, judge: str) -> float:
    """Mean over the two directions of a metric's estimates, weighted by their n."""
    r = rows[(rows["generator"] == gen) & (rows["metric"] == metric) & (rows["judge"] == judge)
             & (rows["direction"].isin(list(J.DIRECTIONS)))]
    r = r[np.isfinite(r["estimate"].astype(float)) & (r["n"] > 0)]
    return float(np.average(r["estimate"], weights=r["n"])) if len(r) else math.nan


def _fd_metric(long: pd.DataFrame) -> str | None:
    """The realism rule's FD metric name in ``long`` (oracle-feature FD, or FID when pytorch-fid ran)."""
    return next((m for m in long["metric"].unique() if str(m).endswith("FD") or m == "FID"), None)


def generator_numbers(long: pd.DataFrame, gen: str) -> dict:
    """The pooled numbers the summary and the criteria compare: survival (mean over transforms of the audited
    flips' survival), out-of-gamut share, HF ratio, L1 (both directions, weighted by n) and the realism FD."""
    fd = _long_row(long, gen, "both", _fd_metric(long), "realism")
    surv = [_pooled(long, gen, f"flip survival ({t})", "audited") for t in J.TRANSFORMS]
    return {"survival": float(np.nanmean(surv)) if np.isfinite(surv).any() else math.nan,
            "out-of-gamut": _pooled(long, gen, "out-of-gamut share", "pixels"),
            "HF ratio": _pooled(long, gen, "high-frequency ratio", "pixels"),
            "L1": _pooled(long, gen, "L1 to the anchor", "pixels"),
            "FD": math.nan if fd is None else float(fd["estimate"])}


def summary_table(long: pd.DataFrame, diffs: pd.DataFrame, generators: list[str],
                  full_fd: dict | None = None) -> pd.DataFrame:
    """One row per generator: the numbers a reader compares, and the verdict. ``full_fd``: {generator: FD of all
    its counterfactuals to all reference images} beside the realism rule's class-matched subsample FD (a few
    outlying counterfactuals can dominate an FD, and a subsample may or may not contain them)."""
    def est(gen, direction, metric, judge):
        r = _long_row(long, gen, direction, metric, judge)
        if r is None:
            return "—"
        if not np.isfinite(r["ci_low"]):
            return f"{r['estimate']:.3g}"
        return f"{r['estimate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"

    real_oog = _pooled(long, ORIGINAL, "out-of-gamut share", "pixels")
    fd_metric = _fd_metric(long)
    out = []
    for gen in generators:
        pgd = _diff_row(diffs, gen, "pgd", "both", "mean oracle flip rate")
        vs_pgd = None if pgd is None else pgd.to_dict()
        num = generator_numbers(long, gen)
        oracle = _pooled(long, gen, "oracle flip rate", "mean of oracles")
        row = {"generator": gen}
        for d, arrow in J.ARROWS.items():
            row[f"audited flip {arrow}"] = est(gen, d, "audited flip rate", "audited")
            row[f"oracle flip {arrow}"] = est(gen, d, "oracle flip rate", "mean of oracles")
        row["survival (mean of 3)"] = f"{num['survival']:.2f}" if np.isfinite(num["survival"]) else "n/a"
        row["out-of-gamut"] = f"{num['out-of-gamut']:.3f}" if np.isfinite(num["out-of-gamut"]) else "n/a"
        row["HF ratio"] = f"{num['HF ratio']:.2f}"
        row[fd_metric or "FD"] = est(gen, "both", fd_metric, "realism") if fd_metric else "—"
        if full_fd is not None:
            row["FD, all images"] = f"{full_fd[gen]:.3g}" if gen in full_fd else "—"
        row["L1"] = f"{num['L1']:.4f}"
        row["verdict"] = J.verdict(gen, vs_pgd, num["survival"], num["out-of-gamut"], real_oog, oracle)
        out.append(row)
    return pd.DataFrame(out)


CRITERIA_COLUMNS = ["criterion", "direction", "guided", "other", "paired difference [95 % CI]", "met"]


def criteria_table(long: pd.DataFrame, diffs: pd.DataFrame, generators: list[str]) -> pd.DataFrame:
    """Does the method under test (``guided``) beat the baselines on every independent check? One row per check:
    mean oracle flip rate >= the GAN's and above the PGD control's (paired interval above 0), per direction; the
    realism FD <= the GAN's and <= SDEdit's (``diffusion``); L1 to the anchor and out-of-gamut share <= the GAN's;
    flip survival >= the GAN's. 'met' compares the estimates (above PGD: the interval's lower end > 0); the paired
    interval says how sure that is. Checks whose generators did not run are left out; empty without guided."""
    if "guided" not in generators:
        return pd.DataFrame(columns=CRITERIA_COLUMNS)

    def rate(gen, direction):
        r = _long_row(long, gen, direction, "oracle flip rate", "mean of oracles")
        return math.nan if r is None else float(r["estimate"])

    def paired(b, direction, metric):
        return _diff_row(diffs, "guided", b, direction, metric)

    def row(criterion, direction, mine, other, d, met):
        ci = "—" if d is None else f"{d['estimate']:+.3g} [{d['ci_low']:+.3g}, {d['ci_high']:+.3g}]"
        met_text = "n/a" if not (np.isfinite(mine) and np.isfinite(other)) else ("yes" if met else "no")
        return [criterion, direction, f"{mine:.3g}", f"{other:.3g}", ci, met_text]

    rows, numbers = [], {g: generator_numbers(long, g) for g in generators}
    for direction in J.DIRECTIONS:
        if "gan" in generators:
            mine, other = rate("guided", direction), rate("gan", direction)
            rows.append(row("oracle flip rate ≥ the GAN's", J.ARROWS[direction], mine, other,
                            paired("gan", direction, "mean oracle flip rate"), mine >= other))
        if "pgd" in generators:
            d = paired("pgd", direction, "mean oracle flip rate")
            rows.append(row("oracle flip rate above PGD's (interval above 0)", J.ARROWS[direction],
                            rate("guided", direction), rate("pgd", direction), d, d is not None and d["ci_low"] > 0))
    g = numbers["guided"]
    for other, label in (("gan", "the GAN's"), ("diffusion", "SDEdit's")):
        if other in generators:
            rows.append(row(f"realism FD ≤ {label}", "both", g["FD"], numbers[other]["FD"],
                            paired(other, "all counterfactuals", "judge-feature FD"), g["FD"] <= numbers[other]["FD"]))
    if "gan" in generators:
        o = numbers["gan"]
        rows.append(row("L1 to the anchor ≤ the GAN's", "both", g["L1"], o["L1"],
                        paired("gan", "both", "L1 to the anchor"), g["L1"] <= o["L1"]))
        rows.append(row("out-of-gamut share ≤ the GAN's", "both", g["out-of-gamut"], o["out-of-gamut"],
                        paired("gan", "both", "out-of-gamut share"), g["out-of-gamut"] <= o["out-of-gamut"]))
        rows.append(row("flip survival ≥ the GAN's", "both", g["survival"], o["survival"],
                        paired("gan", "both", "flip survival (mean of 3)"), g["survival"] >= o["survival"]))
    return pd.DataFrame(rows, columns=CRITERIA_COLUMNS)


def make_judges(scores_path, anchors_path, spec_path, oracle_scores: dict, oracle_specs: dict, diagnostics_path,
                closeness_path, realism_csv, features_path, generators, boot: dict, seed: int, fd_resamples: int,
                out_csv, out_diff, out_md, out_html,
                guided_index_path=None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """judges.csv (long), judges_differences.csv (paired a - b), judges.md / judges.html (summary + verdicts);
    ``guided_index_path``: guided's index.csv, whose sampler columns say how the pairs behind an unmet check were
    made."""
    thr = float(read_spec(spec_path)["threshold"])
    scores = read_scores(scores_path, anchors_path)
    oracle_tabs = {n: read_scores(p, anchors_path) for n, p in oracle_scores.items()}
    specs = {n: read_spec(p) for n, p in oracle_specs.items()}
    oracle_thr = {n: float(spec["threshold"]) for n, spec in specs.items()}
    per_image = pd.read_csv(diagnostics_path, dtype={"anchor_id": str})
    closeness = pd.read_csv(closeness_path, dtype={"anchor_id": str}) if closeness_path else None
    rows, consensus, survivals = [], {}, {}
    for pos, gen in enumerate(generators):
        audited = J.per_anchor_flips(scores, gen, thr)
        per_oracle = {n: J.per_anchor_flips(t, gen, oracle_thr[n]) for n, t in oracle_tabs.items()}
        consensus[gen] = J.oracle_consensus(per_oracle) if per_oracle else audited.iloc[0:0]
        survival = survivals[gen] = _survival(per_image, audited, gen, thr)
        rows += generator_rows(gen, audited, per_oracle, consensus[gen], survival, per_image, closeness, boot,
                               seed + 1000 * (pos + 1))
    orig = per_image[per_image["generator"] == ORIGINAL]
    for k, (direction, (src, _)) in enumerate(J.DIRECTIONS.items()):
        d = orig[orig["anchor_label"] == src]
        right = (d["score_plain"] > thr) == (src == 1)
        for name in J.TRANSFORMS:
            ok = (d[f"score_{name}"] > thr) == (src == 1)
            rows.append(_row(ORIGINAL, direction, f"correct after ({name})", "audited",
                             J.rate_row(ok[right].astype(float), boot["level"]),
                             "share of the correctly classified anchors of this class still correct after the transform"))
        rows.append(_row(ORIGINAL, direction, "out-of-gamut share", "pixels",
                         J.mean_row(d["out_of_gamut_share"], boot["resamples"], seed + 7 + k, boot["level"]),
                         "share of ALL pixels of the real anchors outside the range (the judge's false-alarm rate)"))
    rows += _realism_rows(realism_csv)
    long = pd.DataFrame(rows)
    features = dict(np.load(features_path, allow_pickle=False)) if features_path else None
    diffs = pd.DataFrame(difference_rows(comparison_pairs(list(generators)), consensus, closeness, features, boot,
                                         seed, fd_resamples, unit_values(per_image, survivals)),
                         columns=["a", "b", "direction", "metric", "estimate", "ci_low", "ci_high", "n", "interval"])
    full_fd = None
    if features is not None:
        from cfaudit.fid import fd_from_features

        full_fd = {g: fd_from_features(features["reference"], features[f"gen:{g}"]) for g in generators
                   if f"gen:{g}" in features}
    summary = summary_table(long, diffs, list(generators), full_fd)
    write_csv(long, out_csv)
    write_csv(diffs, out_diff)
    notes = judges_notes(specs, boot)
    criteria = criteria_table(long, diffs, list(generators))
    index = pd.read_csv(guided_index_path, dtype={"anchor_id": str}) if guided_index_path else None
    sources = unmet_sources(criteria, per_image, features, survivals, consensus, index)
    atomic_write_text(out_md, judges_markdown(summary, diffs, notes, criteria, [text for text, _ in sources]))
    atomic_write_text(out_html, judges_html(summary, diffs, notes, criteria, sources, scores))
    log.info("judges: %s", dict(zip(summary["generator"], summary["verdict"])))
    return long, diffs, summary


def judges_html(summary: pd.DataFrame, diffs: pd.DataFrame, notes: list[str], criteria: pd.DataFrame,
                sources: list, scores: pd.DataFrame) -> str:
    """judges.html: the summary, the checks with the lines behind each unmet one and thumbnails (anchor | guided
    counterfactual) of the first images each line names, and the paired differences."""
    import html

    from cfaudit.judges_sources import thumbnails_html
    from cfaudit.report import table_html

    def section(table, title, table_notes=None):
        return table_html(table, title, table_notes).split("<body>", 1)[1].replace("</body></html>", "")

    diff_view = diffs.assign(value=[f"{e:+.3f} [{lo:+.3f}, {hi:+.3f}]" for e, lo, hi in
                                    zip(diffs["estimate"], diffs["ci_low"], diffs["ci_high"])])
    body = ""
    if len(criteria):
        body += section(criteria, CRITERIA_TITLE, [CRITERIA_NOTE])
        if sources:
            body += f"<p class='note'>{html.escape(SOURCES_TITLE)}:</p>"
            body += "".join(f"<p class='note'>• {html.escape(text)}</p>{thumbnails_html(pairs, scores)}"
                            for text, pairs in sources)
    body += section(diff_view[["a", "b", "direction", "metric", "value", "n"]],
                    "Paired differences a − b (bootstrap over anchors)")
    return table_html(summary, "Are the counterfactuals semantic?", notes).replace("</body></html>", body + "</body></html>")


def judges_notes(specs: dict, boot: dict) -> list[str]:
    """The table's footnotes; ``specs``: {oracle name: its spec (oracle.json)}."""
    names = []
    for n, spec in specs.items():
        auroc = spec.get("provenance", {}).get("oracle", {}).get("auroc", math.nan)
        names.append(f"{n} ({spec.get('arch')}, input {spec.get('input_size')}, held-out AUROC {auroc:.3f})")
    return [
        "Oracles (trained on the train split, never used by a generator): " + ("; ".join(names) or "none") + ".",
        "Flip rates: Wilson 95 % intervals; an oracle counts an anchor only if it classifies it correctly. 'oracle "
        "flip' is the mean over oracles per anchor. Transfer ratio = oracle flip / audited flip.",
        "Survival: share of the audited classifier's flips that stay flips after JPEG q75, Gaussian blur sigma 0.5 px, "
        "a 1-pixel shift (mean of the three). Out-of-gamut: share of changed pixels whose CIELAB L* or C* lies "
        "outside the 0.5-99.5 % range of real non-anchor eval images. HF ratio: high-frequency energy share of the "
        "change over that of the anchor (about 1 = as smooth as the image; pixel noise scores several times more).",
        "Realism: the realism rule's FD (class-matched subsample at one N, see fid.csv; its 'real train (reference)' "
        "row is the real-vs-real floor) and 'FD, all images': every counterfactual against every reference image in "
        "the same features. A few outlying counterfactuals can dominate an FD; when the two disagree, look at them.",
        f"Differences: paired by anchor, {boot['resamples']}-resample percentile bootstrap (FD: fewer, see the CSV). "
        "Verdict: 'semantic' only when the oracle flip rate exceeds the PGD control's with the interval above 0. "
        "How far above PGD any generator can get depends on the oracles: with the embedded data, python -m "
        "cfaudit.ceiling scores the true trait change and PGD at its budget (docs/judges.md; on the demo, PGD "
        "transfers benign -> malignant as often as the true change, so that direction cannot be won there).",
    ]


CRITERIA_TITLE = "Does guided beat the baselines on every independent check?"
CRITERIA_NOTE = ("'met' compares the estimates ('above PGD': the paired interval lies above 0); the paired "
                 "interval (guided − other, bootstrap over anchors; for the FD, of the FD over all images; for "
                 "gamut and survival, of the difference of the two means, a resampled anchor bringing all its "
                 "counterfactuals or flips) says how sure that is. A 'no' is a result, not an error: "
                 "docs/judges.md says why a check can be out of reach (the ceiling) and what to look at; the lines "
                 "below name the counterfactuals behind each 'no'.")


SOURCES_TITLE = "Where the unmet checks come from (cfaudit.judges_sources; the counterfactuals to look at)"


def _markdown_table(table: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|---" * len(table.columns) + "|"]
    return lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]


def judges_markdown(summary: pd.DataFrame, diffs: pd.DataFrame, notes: list[str],
                    criteria: pd.DataFrame | None = None, sources: list[str] = ()) -> str:
    lines = ["# Are the counterfactuals semantic?", ""] + _markdown_table(summary)
    if criteria is not None and len(criteria):
        lines += ["", f"## {CRITERIA_TITLE}", ""] + _markdown_table(criteria) + ["", CRITERIA_NOTE]
        if sources:
            lines += ["", f"{SOURCES_TITLE}:", ""] + [f"- {s}" for s in sources]
    lines += ["", "## Paired differences a − b", "", "| a | b | direction | metric | estimate [95 % CI] | n |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r.a} | {r.b} | {r.direction} | {r.metric} | {r.estimate:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
              f"| {r.n} |" for r in diffs.itertuples(index=False)]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
