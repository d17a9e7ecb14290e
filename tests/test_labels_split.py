"""Ground-truth rules (ISIC diagnosis_1, legacy column, contradictions) and the stratified split."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cfaudit.data.labels import LabelError, binary_label, build_ground_truth, isic_label
from cfaudit.data.split import SplitError, choose_anchors, stratified_split


@pytest.mark.parametrize(
    "d1, bm, label, reason",
    [
        ("Malignant", None, 1, ""),
        ("Benign", "", 0, ""),
        ("Indeterminate", None, None, "indeterminate"),
        ("", "malignant", 1, ""),  # legacy fallback
        (None, "benign", 0, ""),
        ("", "", None, "missing label"),
        ("Benign", "malignant", None, "contradictory"),
    ],
)
def test_isic_label_rules(d1, bm, label, reason):
    got, why = isic_label(d1, bm)
    assert got == label
    assert why.startswith(reason)


def test_binary_label_accepts_words_and_digits():
    assert binary_label("1") == (1, "")
    assert binary_label(0) == (0, "")
    assert binary_label("Malignant") == (1, "")
    assert binary_label("2")[0] is None


def _images(folder, ids):
    folder.mkdir(exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / f"{i}.jpg")


def test_isic_metadata_to_ground_truth_counts_exclusions(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(7)]
    _images(tmp_path / "img", ids[:6])  # the 7th file is missing
    meta = pd.DataFrame({
        "isic_id": ids,
        "diagnosis_1": ["Malignant", "Benign", "Indeterminate", "", "Benign", "Benign", "Malignant"],
        "benign_malignant": ["", "", "", "malignant", "malignant", "", ""],
        "copyright_license": ["CC-0"] * 7,
    })
    gt, ex, report = build_ground_truth(meta, tmp_path / "img", "isic", id_column="isic_id", label_column=None)
    assert list(gt["image_id"]) == [ids[0], ids[1], ids[3], ids[5]]
    assert list(gt["label"]) == [1, 0, 1, 0]
    assert gt["sha256"].str.len().eq(64).all()
    assert report["excluded_by_reason"] == {"indeterminate": 1, "contradictory": 1, "file not found in " + str(tmp_path / "img"): 1}
    assert report["included"] == 4 and report["malignant"] == 2


def test_duplicate_ids_with_different_labels_are_excluded(tmp_path):
    _images(tmp_path, ["a", "b"])
    meta = pd.DataFrame({"id": ["a", "a", "b", "b"], "y": ["1", "0", "0", "0"]})
    gt, ex, _ = build_ground_truth(meta, tmp_path, "folder", id_column="id", label_column="y")
    assert list(gt["image_id"]) == ["b"]
    assert ex["reason"].str.startswith("contradictory").sum() == 1


def test_missing_columns_are_named(tmp_path):
    meta = pd.DataFrame({"id": ["a"], "y": ["1"]})
    with pytest.raises(LabelError, match="no label column 'label'"):
        build_ground_truth(meta, tmp_path, "folder", id_column="id", label_column="label", metadata_name="labels.csv")
    with pytest.raises(LabelError, match="diagnosis_1"):
        build_ground_truth(meta, tmp_path, "isic", id_column="id", label_column=None)


def _index(n0, n1):
    ids = [f"I{i:03d}" for i in range(n0 + n1)]
    return pd.DataFrame({"row": range(n0 + n1), "image_id": ids, "label": [0] * n0 + [1] * n1})


def test_split_is_stratified_seeded_and_order_independent():
    idx = _index(70, 30)
    a = stratified_split(idx, 0.3, seed=5)
    b = stratified_split(idx.sample(frac=1, random_state=1), 0.3, seed=5)
    c = stratified_split(idx, 0.3, seed=6)
    assert a.equals(b)
    assert not a.equals(c)
    ev = a[a["split"] == "eval"]
    assert (ev["label"] == 0).sum() == 21 and (ev["label"] == 1).sum() == 9


@pytest.mark.parametrize("n0, n1", [(10, 0), (10, 1), (0, 5)])
def test_split_refuses_a_class_that_cannot_be_on_both_sides(n0, n1):
    with pytest.raises(SplitError, match="benign|malignant"):
        stratified_split(_index(n0, n1), 0.3, seed=1)


def test_tiny_classes_keep_one_image_on_each_side():
    sp = stratified_split(_index(2, 2), 0.9, seed=1)
    assert sp.groupby(["split", "label"]).size().to_dict() == {("eval", 0): 1, ("eval", 1): 1, ("train", 0): 1, ("train", 1): 1}


def test_anchor_subset_is_stratified_and_within_eval():
    sp = stratified_split(_index(140, 60), 0.5, seed=2)
    anchors = choose_anchors(sp, 20, seed=2)
    assert len(anchors) == 20
    assert anchors["label"].sum() == 6
    assert set(anchors["image_id"]) <= set(sp.loc[sp["split"] == "eval", "image_id"])
    assert choose_anchors(sp, None, seed=2)["image_id"].tolist() == sorted(sp.loc[sp["split"] == "eval", "image_id"])


# ----------------------------------------------------------------------------------------------------------
# Grouped split: several images per lesion (HAM10000 / ISIC 2019-2020 lesion_id) never straddle the split
# ----------------------------------------------------------------------------------------------------------
def lesion_metadata(tmp_path, n_lesions=60, seed=3):
    """A labels CSV with 1-5 images per lesion (one label per lesion) and the image files it names."""
    rng = np.random.default_rng(seed)
    rows = []
    for lesion in range(n_lesions):
        label = int(lesion % 3 == 0)
        for k in range(int(rng.integers(1, 6))):
            rows.append({"image_id": f"IMG_{lesion:03d}_{k}", "lesion_id": f"HAM_{lesion:04d}", "label": label})
    meta = pd.DataFrame(rows)
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in meta["image_id"]:
        Image.new("RGB", (8, 8), (100, 80, 60)).save(tmp_path / "img" / f"{i}.png")
    return meta


def test_grouped_split_keeps_every_lesion_on_one_side_and_stays_stratified(tmp_path):
    from cfaudit.data.split import grouped_stratified_split, split_report

    meta = lesion_metadata(tmp_path)
    gt, _, report = build_ground_truth(meta.astype(str), tmp_path / "img", "folder", id_column="image_id",
                                       label_column="label")
    assert report["group_column"] == "lesion_id" and report["groups"] == 60
    assert report["images_in_largest_group"] == meta["lesion_id"].value_counts().max() > 1
    split = grouped_stratified_split(gt, gt["group_id"], 0.3, seed=5)
    assert (split.groupby("group_id")["split"].nunique() == 1).all()
    for c in (0, 1):
        n = int((split["label"] == c).sum())
        n_eval = int(((split["label"] == c) & (split["split"] == "eval")).sum())
        assert abs(n_eval - round(0.3 * n)) <= 2, (c, n, n_eval)  # stratified up to the size of a lesion
    assert split.equals(grouped_stratified_split(gt.sample(frac=1, random_state=1), gt.sample(frac=1, random_state=1)["group_id"], 0.3, 5))
    rep = split_report(split, "lesion_id")
    assert rep["groups_on_both_sides"] == 0 and rep["groups"]["train"] + rep["groups"]["eval"] == 60


def test_group_column_settings(tmp_path):
    meta = lesion_metadata(tmp_path, n_lesions=6).astype(str)
    kw = {"id_column": "image_id", "label_column": "label"}
    gt, _, report = build_ground_truth(meta, tmp_path / "img", "folder", group_column="", **kw)
    assert report["group_column"] is None and (gt["group_id"] == gt["image_id"]).all()
    with pytest.raises(LabelError, match=r"split.group_column is 'patient'.*no such column"):
        build_ground_truth(meta, tmp_path / "img", "folder", group_column="patient", **kw)
    no_lesions = meta.assign(lesion_id="")
    assert build_ground_truth(no_lesions, tmp_path / "img", "folder", **kw)[2]["group_column"] is None


def test_grouped_split_that_cannot_keep_a_class_on_both_sides_says_why():
    from cfaudit.data.split import grouped_stratified_split

    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(8)], "label": [1, 1, 1, 0, 0, 0, 0, 0]})
    groups = pd.Series(["m", "m", "m", "b1", "b2", "b3", "b4", "b5"])  # every malignant image is one lesion
    with pytest.raises(SplitError, match="no malignant image on the eval side"):
        grouped_stratified_split(index, groups, 0.3, 0)
