"""The data stage through the real snakemake CLI on tiny configs."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import scheduled_jobs, write_config

pytestmark = pytest.mark.slow
DATA_TARGET = ["results/data/anchors.csv"]


def test_embedded_data_stage_and_rerun_only_what_a_resize_change_touches(tmp_path, tiny_config, run_snakemake):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config)
    run_snakemake(tmp_path, cfg, DATA_TARGET)
    pack = np.load(tmp_path / "results/data/pack.npy")
    n = tiny_config["dataset"]["synthetic"]["n_images"]
    assert pack.shape == (n, 32, 32, 3)
    split = pd.read_csv(tmp_path / "results/data/split.csv")
    assert set(split["split"]) == {"train", "eval"}
    anchors = pd.read_csv(tmp_path / "results/data/anchors.csv")
    assert len(anchors) == tiny_config["split"]["max_anchors"] and set(anchors["label"]) == {0, 1}
    assert json.loads((tmp_path / "results/data/label_report.json").read_text())["included"] == n
    for log in ("synthetic_dataset", "ground_truth", "resize", "split", "anchors"):
        assert (tmp_path / "logs/data" / f"{log}.log").stat().st_size > 0

    # nothing to do when nothing changed
    assert scheduled_jobs(run_snakemake(tmp_path, cfg, DATA_TARGET, ["-n"])) == {}
    # a resize setting reruns resize and what depends on it, not the download/generation or labelling
    tiny_config["resize"] = {"mode": "squash"}
    cfg2 = write_config(tmp_path / "tiny2.yaml", tiny_config)
    jobs = scheduled_jobs(run_snakemake(tmp_path, cfg2, DATA_TARGET, ["-n"]))
    assert jobs == {"resize": 1, "split": 1, "anchors": 1}


def test_folder_source_on_real_isic_images(tmp_path, shared_data, run_snakemake):
    root = shared_data / "isic2017_256"
    labels = pd.read_csv(root / "labels.csv")
    subset = pd.concat([labels[labels.label == 0].head(14), labels[labels.label == 1].head(6)]).astype({"label": object})
    subset.loc[subset.index[0], "label"] = "unknown"  # a bad label is excluded and counted, not fatal
    subset.to_csv(tmp_path / "labels.csv", index=False)
    cfg = write_config(tmp_path / "folder.yaml", {
        "image_size": 32,
        "dataset": {"source": "folder", "folder": {"images": str(root), "labels": str(tmp_path / "labels.csv"),
                                                    "id_column": "isic_id", "label_column": "label", "file_column": "file"}},
        "split": {"eval_fraction": 0.3, "max_anchors": None},
    })
    run_snakemake(tmp_path, cfg, DATA_TARGET)
    gt = pd.read_csv(tmp_path / "results/data/ground_truth.csv")
    report = json.loads((tmp_path / "results/data/label_report.json").read_text())
    assert len(gt) == 19 and report["excluded"] == 1 and report["malignant"] == 6
    assert np.load(tmp_path / "results/data/pack.npy").shape == (19, 32, 32, 3)


def test_single_class_dataset_fails_with_a_clear_message(tmp_path, tiny_config, run_snakemake):
    root = tmp_path / "imgs"
    root.mkdir()
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (40, 30), (120 + i, 80, 60)).save(root / f"X{i}.jpg")
    pd.DataFrame({"isic_id": [f"X{i}" for i in range(6)], "label": [0] * 6}).to_csv(tmp_path / "l.csv", index=False)
    cfg = write_config(tmp_path / "one.yaml", {"image_size": 16, "dataset": {"source": "folder", "folder": {
        "images": str(root), "labels": str(tmp_path / "l.csv")}}})
    proc = run_snakemake(tmp_path, cfg, DATA_TARGET, check=False)
    assert proc.returncode != 0
    log = (tmp_path / "logs/data/split.log").read_text()
    assert "0 malignant image(s)" in log and "label_report.json" in log
    assert (tmp_path / "results/data/pack.npy").exists()  # what was computed is kept


def test_folder_source_with_lesion_ids_splits_by_lesion(tmp_path, run_snakemake):
    """HAM10000-style labels (several images per lesion_id): the rules keep each lesion on one side and say so."""
    from test_labels_split import lesion_metadata

    meta = lesion_metadata(tmp_path, n_lesions=30)
    meta.to_csv(tmp_path / "labels.csv", index=False)
    cfg = write_config(tmp_path / "lesions.yaml", {
        "image_size": 16, "split": {"eval_fraction": 0.3, "max_anchors": None},
        "dataset": {"source": "folder", "folder": {"images": str(tmp_path / "img"), "labels": str(tmp_path / "labels.csv"),
                                                    "id_column": "image_id", "label_column": "label"}}})
    run_snakemake(tmp_path, cfg, DATA_TARGET)
    split = pd.read_csv(tmp_path / "results/data/split.csv").merge(meta[["image_id", "lesion_id"]], on="image_id")
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all() and set(split["split"]) == {"train", "eval"}
    report = json.loads((tmp_path / "results/data/split_report.json").read_text())
    assert report["group_column"] == "lesion_id" and report["groups_on_both_sides"] == 0
    assert report["groups"]["train"] + report["groups"]["eval"] == 30
    labels = json.loads((tmp_path / "results/data/label_report.json").read_text())
    assert labels["groups"] == 30 and labels["group_column"] == "lesion_id"
