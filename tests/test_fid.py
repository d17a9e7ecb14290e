"""FID / KID / classifier-feature FD: the Fréchet distance against closed forms, the weights placement, and
pytorch-fid's real InceptionV3 code with a SEEDED random-initialised FID-Inception staged offline under a
temporary TORCH_HOME (pytorch-fid's src/pytorch_fid/inception.py loads its weights with
torch.hub.load_state_dict_from_url, which uses a file already in $TORCH_HOME/hub/checkpoints), plus the fallback on the classifier's features when no weights exist."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cfaudit import fid as F
from cfaudit.metrics_stage import make_realism
from fixtures.random_weights import random_fid_inception_state_dict


# ---------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s
    assert F.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # diagonal covariances: sum over dims
    assert F.frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 0], np.diag([4.0, 16.0])) == pytest.approx(1 + 1 + 4)
    # general case against scipy's sqrtm formula (what pytorch-fid computes)
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 6)), rng.normal(size=(90, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = F.feature_stats(a)
    mu2, s2 = F.feature_stats(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert F.fd_from_features(a, a) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="shape mismatch"):
        F.frechet_distance([0, 0], np.eye(2), [0], np.eye(1))


@pytest.mark.parametrize("n", [12, 40, 300])  # fewer, as many and more samples than dimensions
def test_fd_to_reference_equals_the_full_formula_for_any_sample_size(n):
    rng = np.random.default_rng(n)
    ref = rng.normal(size=(250, 40)) @ rng.normal(size=(40, 40))
    feats = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 40)) + 0.3
    assert F.fd_to_reference(ref)(feats) == pytest.approx(F.fd_from_features(ref, feats), rel=1e-7)


def test_kid_is_about_zero_for_one_distribution_and_grows():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, _, m = F.kid(x, y, subsets=20, subset_size=100, seed=0)
    far, _, _ = F.kid(x, y + 1.0, subsets=20, subset_size=100, seed=0)
    assert m == 100 and abs(same) < 0.05 < far
    assert F.kid(x, y, 20, 100, seed=0) == F.kid(x, y, 20, 100, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Weights placement
# ---------------------------------------------------------------------------------------------------------
def test_place_weights_without_any_source_reports_why(tmp_path):
    st = F.place_weights(tmp_path / "th", "", "", True)
    assert not st["available"] and "neither" in st["reason"]
    st = F.place_weights(tmp_path / "th", str(tmp_path / "nope.pth"), "", True)
    assert not st["available"] and "does not exist" in st["reason"]
    # an unreachable URL (nothing listens on port 9 of loopback): no exception, a reason
    st = F.place_weights(tmp_path / "th", "", "http://127.0.0.1:9/pt_inception.pth", True, timeout=5)
    assert not st["available"] and "download from http://127.0.0.1:9" in st["reason"]
    assert not F.weights_target(tmp_path / "th").exists()


def test_place_weights_checks_the_release_hash(tmp_path):
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"not the release file")
    st = F.place_weights(tmp_path / "th", str(fake), "", check_hash=True)
    assert not st["available"] and "6726825d" in st["reason"]
    assert not F.weights_target(tmp_path / "th").exists()  # refused files are not left in TORCH_HOME
    st = F.place_weights(tmp_path / "th", str(fake), "", check_hash=False)
    assert st["available"] and st["hash_verified"] is False and F.weights_target(tmp_path / "th").is_file()
    # placed once: a later run without a source keeps it
    assert F.place_weights(tmp_path / "th", "", "", check_hash=False)["available"]


# ---------------------------------------------------------------------------------------------------------
# pytorch-fid's InceptionV3 with seeded random weights, staged offline
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def staged_weights(tmp_path_factory):
    """A seeded random FID-Inception state dict saved as a local weights file (never downloaded)."""
    path = tmp_path_factory.mktemp("fidw") / "random_fid_inception.pth"
    torch.save(random_fid_inception_state_dict(seed=0), path)
    return path


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        c = rng.random(3)
        blob = np.exp(-((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) / 0.05)
        out.append(np.clip((c[None, None] * 0.6 + 0.4 * blob[..., None] * rng.random(3)) * 255, 0, 255))
    return np.stack(out).astype(np.uint8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_distortion(tmp_path, staged_weights, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))  # the model must come from `home`, no download
    st = F.place_weights(home, str(staged_weights), "", check_hash=False)
    assert st["available"]
    model = F.fid_inception(home, 2048, "cpu")
    torch.set_num_threads(1)
    base = _images(8)
    feats = F.inception_features(model, base, batch_size=8)
    assert feats.shape == (8, 2048) and feats.std(axis=0).mean() > 1e-4  # not the ~1e-8 of default init
    assert F.fd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(5)
    fds = []
    for sigma in (10, 40, 100):
        noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
        fds.append(F.fd_from_features(feats, F.inception_features(model, noisy, batch_size=8)))
    assert 0 < fds[0] < fds[1] < fds[2], fds


def test_fid_inception_refuses_to_download(tmp_path):
    with pytest.raises(F.FIDWeightsMissing, match="place_fid_weights"):
        F.fid_inception(tmp_path / "empty_home")


# ---------------------------------------------------------------------------------------------------------
# The realism step on a synthetic pack: FID mode and classifier-feature fallback
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic_run(tmp_path):
    """pack.npy / pack_index.csv / split.csv, one generator's index + PNGs, and a random classifier spec."""
    from cfaudit.classifiers import build_arch, make_spec, write_spec

    imgs = _images(16, 32, seed=3)
    np.save(tmp_path / "pack.npy", imgs)
    ids = [f"I{i}" for i in range(16)]
    pd.DataFrame({"row": range(16), "image_id": ids, "label": [i % 2 for i in range(16)],
                  "png": [f"{i}.png" for i in ids]}).to_csv(tmp_path / "pack_index.csv", index=False)
    pd.DataFrame({"image_id": ids, "label": [i % 2 for i in range(16)],
                  "split": ["eval"] * 8 + ["train"] * 8}).to_csv(tmp_path / "split.csv", index=False)
    rows = []
    (tmp_path / "cf").mkdir()
    for i in range(4):
        for t in (0, 1):
            p = tmp_path / "cf" / f"I{i}_to{t}.png"
            Image.fromarray(255 - imgs[i] if t else imgs[i]).resize((48, 48)).save(p)
            rows.append({"anchor_id": f"I{i}", "anchor_label": i % 2, "target_label": t, "generator": "gan",
                         "path": str(p), "shard": 0, "settings": "{}"})
    pd.DataFrame(rows).to_csv(tmp_path / "index.csv", index=False)
    pd.DataFrame({"image_id": [f"I{i}" for i in range(4)], "label": [i % 2 for i in range(4)],
                  "png": [f"I{i}.png" for i in range(4)]}).to_csv(tmp_path / "anchors.csv", index=False)
    torch.manual_seed(0)
    net = build_arch("resnet18", 2)
    torch.save(net.state_dict(), tmp_path / "clf.pt")
    spec = make_spec("checkpoint", name="toy_resnet18", arch="resnet18", weights=tmp_path / "clf.pt", input_size=32)
    write_spec(spec, tmp_path / "classifier.json")
    return tmp_path


CFG = {"n": 2048, "dims": 2048, "batch_size": 16, "kid_subsets": 5, "kid_subset_size": 1000,
       "reference_train": True, "reference": "class_matched"}


def _run(d, status, feature_spec=None, **cfg):
    (d / "status.json").write_text(json.dumps(status))
    return make_realism(d / "status.json", {"gan": d / "index.csv"}, d / "pack.npy", d / "pack_index.csv",
                        d / "split.csv", d / "anchors.csv", d / "classifier.json", feature_spec, {**CFG, **cfg}, 0, 32,
                        "cpu", d / "torch_home", d / "fid.csv", d / "fid.html", d / "features.npz")


def test_realism_falls_back_to_classifier_features_and_says_so(synthetic_run):
    reason = "FID-Inception weights unavailable (no network)"
    table, info = _run(synthetic_run, {"available": False, "reason": reason})
    assert set(table["metric"]) == {"classifier-feature FD", "classifier-feature KID"}
    assert not table["metric"].str.fullmatch("FID|KID").any()
    assert (table["note"].str.contains("FID absent") & table["note"].str.contains("no network")).all()
    assert set(table["set"]) == {"gan", "real train (reference)"}
    # the reference is the eval split without the 4 anchors: 4 images, 2 per class, so N = 4 for every set
    assert (table["n_real"] == 4).all() and (table["n_generated"] == 4).all()  # one common N, recorded
    assert (table["reference"] == "class-matched: 2 images per class").all()
    assert table["implementation"].str.contains("AUDITED classifier").all()  # no oracle: labelled not independent
    assert table["implementation"].str.contains("toy_resnet18").all()
    assert (table["feature_dims"] == 512).all()  # resnet18's penultimate features
    assert info["mode"] == "classifier" and len(info["read_files"]) == 8
    html = (synthetic_run / "fid.html").read_text()
    assert "FID absent" in html and "classifier-feature FD" in html


def test_realism_uses_an_oracle_and_excludes_the_anchors(synthetic_run):
    from cfaudit.classifiers import build_arch, make_spec, write_spec

    torch.manual_seed(1)
    torch.save(build_arch("resnet34", 2).state_dict(), synthetic_run / "oracle.pt")
    write_spec(make_spec("trained", name="oracle_toy", arch="resnet34", weights=synthetic_run / "oracle.pt",
                         input_size=40), synthetic_run / "oracle.json")
    table, info = _run(synthetic_run, {"available": False, "reason": "offline"}, synthetic_run / "oracle.json")
    assert set(table["metric"]) == {"oracle-feature FD", "oracle-feature KID"} and info["mode"] == "oracle"
    assert table["implementation"].str.contains("oracle oracle_toy").all()
    assert not table["implementation"].str.contains("toy_resnet18").any()  # never the audited classifier
    feats = np.load(synthetic_run / "features.npz")
    assert feats["reference"].shape == (4, 512)  # I4..I7: the non-anchor eval images
    assert feats["gen:gan"].shape == (8, 512) and list(feats["anchor:gan"][:2]) == ["I0", "I0"]
    # the saved features are the ones the table's FD was computed from (class-matched N = all 4 here)
    fd = F.fd_from_features(feats["reference"], feats["gen:gan"][[0, 3, 4, 7]])  # targets 0,1,0,1 -> 2 per class
    assert np.isfinite(fd) and fd >= 0
    # non-anchor eval images of one class only: the reference cannot be class-matched, and the error says what to do
    split = pd.read_csv(synthetic_run / "split.csv")
    split.loc[split["image_id"].isin(["I5", "I7"]), "label"] = 0
    split.to_csv(synthetic_run / "split.csv", index=False)
    with pytest.raises(ValueError, match="lower split.max_anchors"):
        _run(synthetic_run, {"available": False, "reason": "offline"}, synthetic_run / "oracle.json")


def test_realism_uses_pytorch_fid_when_weights_are_placed(synthetic_run, staged_weights):
    torch.set_num_threads(1)
    status = F.place_weights(synthetic_run / "torch_home", str(staged_weights), "", check_hash=False)
    table, info = _run(synthetic_run, status, n=5, dims=192, reference="eval")  # small N, early block: quick
    assert set(table["metric"]) == {"FID", "KID"} and info["mode"] == "fid"
    # N = min(n=5, the 4 non-anchor eval images, each set): the anchors never enter the reference
    assert (table["n_real"] == 4).all() and (table["feature_dims"] == 192).all()
    assert table["implementation"].str.contains("pytorch-fid").all()
    assert table["note"].str.contains("NOT pytorch-fid's release").all()  # the random weights are flagged
    fid = table[table.metric == "FID"].set_index("set")["value"]
    assert fid["gan"] > 0 and np.isfinite(fid["real train (reference)"])


def test_class_matched_reference_compares_each_target_with_its_class():
    """Eval images 80 % benign; a perfect counterfactual set (half of each target, drawn from the real class
    distributions) is close to a class-matched reference and far from the eval mix."""
    rng = np.random.default_rng(0)

    def draw(labels):  # features: class mean 0 or 3 in every dimension, unit noise; the 'image' carries them
        return (np.asarray(labels)[:, None] * 3.0 + rng.normal(size=(len(labels), 4))).astype(np.float32)

    real_labels = np.array([0] * 400 + [1] * 100)
    cf_labels = np.array([0, 1] * 150)
    real, cf = draw(real_labels), draw(cf_labels)
    kw = dict(mode="classifier", n=2048, seed=1, kid_subsets=3, kid_subset_size=50, resolution=8, implementation="toy")
    matched = F.realism_table(real, {"cf": cf}, lambda x: x, real_labels=real_labels, set_labels={"cf": cf_labels}, **kw)
    mixed = F.realism_table(real, {"cf": cf}, lambda x: x, **kw)
    fd_m = matched.set_index("metric").loc["classifier-feature FD", "value"]
    fd_e = mixed.set_index("metric").loc["classifier-feature FD", "value"]
    assert matched["n_real"].iloc[0] == 200 and matched["reference"].iloc[0] == "class-matched: 100 images per class"
    assert mixed["n_real"].iloc[0] == 300 and mixed["reference"].iloc[0] == "the eval split's class mix"
    assert fd_m < 0.5 < 3 < fd_e  # mean shift 3 x (0.5 - 0.2) per dimension in the eval mix: FD ~ 4 x 0.81 + cov
    idx = F.stratified_subsample(real_labels, 100, np.random.default_rng(2))
    assert len(idx) == 200 and (real_labels[idx] == 1).sum() == 100 and np.all(np.diff(idx) > 0)
    with pytest.raises(ValueError, match="reference: eval"):
        F.realism_table(real, {"cf": cf}, lambda x: x, real_labels=real_labels, set_labels={"cf": np.zeros(300, int)}, **kw)
