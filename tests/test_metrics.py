"""Table 1 metrics against hand-computed cases and scikit-learn, the bootstrap, closeness, and Table 1 on a
synthetic scores table (no upstream stage needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, precision_score, recall_score, roc_auc_score

from cfaudit import metrics as M
from cfaudit.metrics_stage import make_closeness, make_table1


# ---------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_sweep_and_best_f1_hand_computed():
    # sklearn's textbook case; thresholds 0.1 / 0.35 / 0.4 / 0.8 give F1 2/3, 4/5, 1/2, 2/3
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    sweep = M.threshold_sweep(y, s)
    assert sweep["threshold"].tolist() == [0.1, 0.35, 0.4, 0.8]
    assert np.allclose(sweep["f1"], [2 / 3, 4 / 5, 1 / 2, 2 / 3])
    assert np.allclose(sweep["precision"], [0.5, 2 / 3, 0.5, 1.0])
    assert np.allclose(sweep["recall"], [1, 1, 0.5, 0.5])
    thr, reason = M.best_f1_threshold(y, s)
    assert thr == 0.35 and reason == ""
    at = M.metrics_at(y, s, thr)
    assert at["accuracy"] == 0.75 and at["f1"] == pytest.approx(0.8) and at["recall"] == 1.0
    assert M.auroc(y, s) == (0.75, "")


def test_ties_in_scores_and_in_f1():
    # tied scores form one threshold; F1 2/3 at both 0.5 and 0.9 -> the lowest threshold wins
    y, s = [0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]
    sweep = M.threshold_sweep(y, s)
    assert sweep["threshold"].tolist() == [0.5, 0.9]
    assert sweep[["tp", "fp"]].values.tolist() == [[2, 2], [1, 0]]
    assert M.best_f1_threshold(y, s)[0] == 0.5
    assert M.auroc(y, s)[0] == pytest.approx(0.75)  # tie pairs count 1/2
    # predictions use score >= threshold: all tied scores are positive
    assert M.metrics_at(y, s, 0.5)["recall"] == 1.0
    # the fixed threshold is strict (score > t)
    assert M.metrics_at(y, s, 0.5, strict=True)["recall"] == 0.5


def test_one_class_present():
    thr, reason = M.best_f1_threshold([0, 0, 0], [0.2, 0.5, 0.9])
    assert math.isnan(thr) and "no positive" in reason
    auc, reason = M.auroc([0, 0, 0], [0.2, 0.5, 0.9])
    assert math.isnan(auc) and "only class 0" in reason
    # all positive: the lowest score predicts everything positive, F1 = 1
    assert M.best_f1_threshold([1, 1], [0.3, 0.7])[0] == 0.3
    assert math.isnan(M.auroc([1, 1], [0.3, 0.7])[0])
    stats = M.group_statistics(np.array([0, 0, 0]), np.array([0.2, 0.5, 0.9]), 0.5)
    assert math.isnan(stats["f1_best_f1"]) and math.isnan(stats["auroc"])
    assert stats["accuracy_fixed"] == pytest.approx(2 / 3)  # 0.9 > 0.5 is the one error


def test_perfect_separation():
    y, s = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    stats = M.group_statistics(np.array(y), np.array(s), fixed_threshold=0.8)
    assert stats["threshold_best_f1"] == 0.8
    for k in ("accuracy_best_f1", "precision_best_f1", "recall_best_f1", "f1_best_f1", "auroc"):
        assert stats[k] == 1.0, k
    assert stats["recall_fixed"] == 0.5 and stats["precision_fixed"] == 1.0  # 0.8 > 0.8 is false


def test_input_contract_errors_say_what_is_wrong():
    with pytest.raises(M.MetricInputError, match="labels must be 0"):
        M.best_f1_threshold([0, 2], [0.1, 0.2])
    with pytest.raises(M.MetricInputError, match="3 entries but score has 2"):
        M.auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(M.MetricInputError, match="not finite"):
        M.threshold_sweep([0, 1], [0.1, np.nan])


def test_best_f1_reproduces_sklearn_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(3, 80))
        y = rng.integers(0, 2, n)
        if y.sum() == 0 or y.sum() == n:
            continue
        s = np.round(rng.normal(size=n) + y * rng.random(), 1)  # rounding makes ties
        thr, _ = M.best_f1_threshold(y, s)
        p, r, t = precision_recall_curve(y, s)
        p, r = p[:-1], r[:-1]  # drop the (P=1, R=0) point: sklearn gives it no threshold
        f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)
        assert f1_score(y, s >= thr) == pytest.approx(f.max(), abs=1e-12)
        assert thr == t[np.flatnonzero(f >= f.max() - 1e-12)[0]]  # lowest among (float-)tied best F1s
        got = M.metrics_at(y, s, thr)
        pred = s >= thr
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert got["precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
        assert got["recall"] == pytest.approx(recall_score(y, pred, zero_division=0))
        assert got["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
        assert M.auroc(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_flip_stats_hand_computed():
    # anchors: benign 0.2 (correct), benign 0.7 (wrong), malignant 0.9 (correct), malignant 0.8 (correct)
    lab = [0, 0, 1, 1]
    s0 = [0.2, 0.7, 0.9, 0.8]
    to_benign = [0.1, 0.1, 0.3, 0.6]
    to_malig = [0.6, 0.9, 0.95, 0.9]
    out = M.flip_stats(lab, s0, to_benign, to_malig, threshold=0.5)
    assert out["n_correct_benign_anchors"] == 1 and out["n_correct_malignant_anchors"] == 2
    assert out["flip_rate_b2m"] == 1.0  # 0.6 > 0.5
    assert out["flip_rate_m2b"] == 0.5  # 0.3 flips, 0.6 does not
    assert out["delta_score_b2m"] == pytest.approx(0.4)
    assert out["delta_score_m2b"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)


# ---------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    s = rng.normal(size=80) + y

    def stat(idx):
        return M.group_statistics(y[idx], s[idx], 0.5)

    a = M.bootstrap(stat, 80, 300, seed=11)
    b = M.bootstrap(stat, 80, 300, seed=11)
    c = M.bootstrap(stat, 80, 300, seed=12)
    assert all((a[k].low, a[k].high) == (b[k].low, b[k].high) for k in a)
    assert any((a[k].low, a[k].high) != (c[k].low, c[k].high) for k in a)
    for k in ("f1_best_f1", "accuracy_fixed", "auroc", "recall_fixed"):
        assert a[k].low <= a[k].estimate <= a[k].high, k
        assert a[k].high - a[k].low > 0.01, k
    assert a["auroc"].estimate == pytest.approx(roc_auc_score(y, s))
    # a mean's percentile interval is close to the normal one
    x = rng.normal(size=200)
    m = M.bootstrap(lambda i: {"mean": x[i].mean()}, 200, 2000, seed=3)["mean"]
    se = x.std(ddof=1) / np.sqrt(200)
    assert m.low == pytest.approx(x.mean() - 1.96 * se, abs=0.35 * se)
    assert m.high == pytest.approx(x.mean() + 1.96 * se, abs=0.35 * se)


def test_bootstrap_drops_undefined_resamples():
    y = np.array([0] * 9 + [1])  # many resamples have no positive
    s = np.linspace(0, 1, 10)
    ci = M.bootstrap(lambda i: {"auroc": M.auroc(y[i], s[i])[0]}, 10, 200, seed=0)["auroc"]
    assert 0 < ci.valid < 200


# ---------------------------------------------------------------------------------------------------------
# Table 1 from a synthetic scores table
# ---------------------------------------------------------------------------------------------------------
def synthetic_scores(n_anchors=30, seed=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"IMG_{i:03d}" for i in range(n_anchors)]
    labels = rng.integers(0, 2, n_anchors)
    orig = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, n_anchors), 0, 1)
    rows = [{"image_id": i, "generator": "original", "target_label": int(lab), "anchor_label": int(lab),
             "path": f"results/data/images/{i}.png", "score": sc} for i, lab, sc in zip(ids, labels, orig)]
    for gen, strength in (("gan", 0.45), ("diffusion", 0.15)):
        for i, lab, sc in zip(ids, labels, orig):
            for t in (0, 1):
                cf = np.clip(sc + (strength if t else -strength) + rng.normal(0, 0.1), 0, 1)
                rows.append({"image_id": i, "generator": gen, "target_label": t, "anchor_label": int(lab),
                             "path": f"results/counterfactuals/{gen}/shard_0/{i}_to{t}.png", "score": cf})
    anchors = pd.DataFrame({"image_id": ids, "label": labels, "png": [f"results/data/images/{i}.png" for i in ids]})
    return pd.DataFrame(rows), anchors


def test_table1_on_synthetic_scores(tmp_path):
    scores, anchors = synthetic_scores()
    scores.to_csv(tmp_path / "scores.csv", index=False)
    anchors.to_csv(tmp_path / "anchors.csv", index=False)
    (tmp_path / "classifier.json").write_text(json.dumps({"threshold": 0.5, "score_space": "softmax", "name": "toy"}))
    out = {k: tmp_path / f"table1.{k}" for k in ("csv", "md", "html")}
    table = make_table1(tmp_path / "scores.csv", tmp_path / "anchors.csv", tmp_path / "classifier.json",
                        ["gan", "diffusion"], {"resamples": 200, "level": 0.95}, 5, out["csv"], out["md"], out["html"])
    assert list(dict.fromkeys(table["group"])) == ["original", "gan", "diffusion"]
    back = pd.read_csv(out["csv"])
    assert set(M.METRICS) - set(back["metric"]) == set()
    assert back[back.group == "original"]["metric"].str.startswith("flip").sum() == 0  # no flips for originals
    # the point estimates are the plain metrics on the full data
    gan = scores[scores.generator == "gan"]
    est = table.set_index(["group", "metric"])["estimate"]
    assert est["gan", "auroc"] == pytest.approx(roc_auc_score(gan.target_label, gan.score))
    thr = est["gan", "threshold_best_f1"]
    assert est["gan", "f1_best_f1"] == pytest.approx(f1_score(gan.target_label, gan.score >= thr))
    assert est["original", "accuracy_fixed"] == pytest.approx(
        accuracy_score(anchors.label, scores[scores.generator == "original"].score > 0.5))
    ok = table["ci_low"].notna()
    assert ((table.loc[ok, "ci_low"] <= table.loc[ok, "estimate"] + 1e-12)
            & (table.loc[ok, "estimate"] <= table.loc[ok, "ci_high"] + 1e-12)).mean() > 0.9
    assert (table.loc[table.group == "gan", "n_units"] == 30).all()
    assert (table.loc[table.group == "gan", "n_images"] == 60).all()
    md = out["md"].read_text()
    assert "| metric | original | gan | diffusion |" in md and "[" in md
    assert "<table>" in out["html"].read_text()
    # same seed -> same file
    again = make_table1(tmp_path / "scores.csv", tmp_path / "anchors.csv", tmp_path / "classifier.json",
                        ["gan", "diffusion"], {"resamples": 200, "level": 0.95}, 5, out["csv"], out["md"], out["html"])
    pd.testing.assert_frame_equal(table, again)


def test_table1_refuses_a_missing_generator_and_mismatched_score_space(tmp_path):
    scores, anchors = synthetic_scores(8)
    with pytest.raises(M.MetricInputError, match="no rows for generator 'guided'"):
        M.table1(M.attach_anchor_ids(scores), ["guided"], 0.5, 20, 0)
    scores["score_space"] = "logit"
    scores.to_csv(tmp_path / "scores.csv", index=False)
    anchors.to_csv(tmp_path / "anchors.csv", index=False)
    (tmp_path / "spec.json").write_text(json.dumps({"threshold": 0.5, "score_space": "softmax"}))
    with pytest.raises(ValueError, match="logit"):
        make_table1(tmp_path / "scores.csv", tmp_path / "anchors.csv", tmp_path / "spec.json", ["gan"],
                    {"resamples": 20, "level": 0.95}, 0, *(tmp_path / f"t.{e}" for e in ("csv", "md", "html")))


def test_anchor_ids_from_file_names():
    scores, anchors = synthetic_scores(4)
    cf = scores.generator != "original"
    scores.loc[cf, "image_id"] = [f"x{i}" for i in range(cf.sum())]  # ids that name no anchor
    got = M.attach_anchor_ids(scores, anchors["image_id"])
    assert (got.loc[cf, "anchor_id"] == got.loc[cf, "path"].str.extract(r"(IMG_\d+)_to")[0]).all()


# ---------------------------------------------------------------------------------------------------------
# Closeness
# ---------------------------------------------------------------------------------------------------------
def test_ssim_hand_computed():
    a = np.full((16, 16), 0.2)
    b = np.full((16, 16), 0.6)
    c1 = 0.01 ** 2
    assert M.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1))
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3))
    assert M.ssim(x, x) == pytest.approx(1.0)
    assert M.ssim(x, np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)) > M.ssim(x, rng.random(x.shape))


def test_closeness_hand_computed():
    a = np.zeros((8, 8, 3), np.uint8)
    c = a.copy()
    c[:2, :, 0] = 255  # a quarter of the pixels fully changed in one channel
    m = M.closeness(a, c, tolerance=8)
    assert m["frac_changed"] == 0.25
    assert m["l1"] == pytest.approx(0.25 / 3)
    assert m["l2"] == pytest.approx(np.sqrt(0.25 / 3))
    c2 = a + 5  # below the tolerance
    assert M.closeness(a, c2, tolerance=8)["frac_changed"] == 0.0
    with pytest.raises(M.MetricInputError):
        M.closeness(a, np.zeros((4, 4, 3), np.uint8))


def test_make_closeness_compares_at_the_anchor_size(tmp_path):
    rng = np.random.default_rng(0)
    rows, anchors = [], []
    for i in range(4):
        yy, xx = np.mgrid[0:16, 0:16]
        a = np.stack([xx * 8 + i, yy * 8, (xx + yy) * 4], -1).astype(np.uint8)  # smooth: resizing barely changes it
        Image.fromarray(a).save(tmp_path / f"A{i}.png")
        anchors.append({"image_id": f"A{i}", "label": i % 2, "png": str(tmp_path / f"A{i}.png")})
        for t in (0, 1):
            cf = a if t == 0 else 255 - a
            Image.fromarray(cf).resize((32, 32), Image.NEAREST).save(tmp_path / f"A{i}_to{t}.png")  # 2x size
            rows.append({"anchor_id": f"A{i}", "anchor_label": i % 2, "target_label": t, "generator": "g",
                         "path": str(tmp_path / f"A{i}_to{t}.png"), "shard": 0, "settings": "{}"})
    pd.DataFrame(anchors).to_csv(tmp_path / "anchors.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)
    cfg = {"size": None, "pixel_change_tolerance": 8, "ssim_window": 7, "ssim_sigma": 1.5}
    summary, read = make_closeness({"g": tmp_path / "index.csv"}, tmp_path / "anchors.csv", cfg,
                                   {"resamples": 50, "level": 0.95}, 0, tmp_path / "c.csv", tmp_path / "p.csv",
                                   tmp_path / "c.html")
    per = pd.read_csv(tmp_path / "p.csv")
    assert (per["compared_at"] == 16).all()
    same = per[per.target_label == 0]  # the anchor itself at twice the size
    assert (same["l1"] < 0.01).all() and (same["frac_changed"] < 0.1).all() and (same["ssim"] > 0.97).all()
    assert (per.loc[per.target_label == 1, "frac_changed"] > 0.9).all()
    s = summary.set_index(["direction", "metric"])["estimate"]
    assert s["to benign", "ssim"] > 0.97 and s["to malignant", "ssim"] < 0.5
    assert len(read) == 4 + 8
