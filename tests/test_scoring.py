"""Scoring of originals and counterfactuals from the saved 8-bit files, the seed's panels, the benchmark,
and the score rule inside a real snakemake run."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cfaudit import classifiers as C
from cfaudit.counterfactuals import index_rows, save_png, write_index
from cfaudit.data.pack import uint8_to_float
from cfaudit.panels import panel_name, run_panels
from cfaudit.benchmark.scoring import benchmark
from cfaudit.scoring import SCORE_COLUMNS, run_scoring, scoring_jobs

torch.set_num_threads(1)
SCORING = {"originals": "anchors", "batch_size": 4, "resize_backend": "pil", "bf16": False, "workers": 2}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A miniature results/ tree: 8 originals (5 eval, 4 of them anchors), a classifier, one generator's
    counterfactuals (at a different size than the originals, as a generator may write)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    ids = [f"IMG_{i}" for i in range(8)]
    labels = [0, 1, 0, 1, 0, 1, 1, 0]
    imgs = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    rows = []
    for i, (a, lbl) in enumerate(zip(ids, labels)):
        p = f"results/data/images/{a}.png"
        save_png(imgs[i], p)
        rows.append({"row": i, "image_id": a, "label": lbl, "png": p})
    pack_index = pd.DataFrame(rows)
    pack_index.to_csv("pack_index.csv", index=False)
    split = pd.DataFrame({"image_id": ids, "label": labels, "split": ["train"] * 3 + ["eval"] * 5})
    split.to_csv("split.csv", index=False)
    anchors = pack_index[pack_index["image_id"].isin(ids[3:7])][["image_id", "label", "png"]]
    anchors.to_csv("anchors.csv", index=False)
    out = "results/counterfactuals/gan"
    cf_rows = []
    for t in (0, 1):
        for a in anchors["image_id"]:
            save_png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), f"{out}/shard_0/{a}_to{t}.png")
        cf_rows += index_rows(anchors["image_id"], anchors["label"], t, "gan", f"{out}/shard_0", 0, {"w": 1})
    write_index(cf_rows, f"{out}/index.csv")
    torch.manual_seed(0)
    net = C.build_arch("resnet18", 2)
    torch.save(net.state_dict(), "model.pt")
    spec = C.make_spec("trained", name="trained_resnet18", arch="resnet18", weights="model.pt", input_size=32,
                       score_space="softmax", threshold=0.5)
    C.write_spec(spec, "classifier.json")
    return {"imgs": imgs, "anchors": anchors, "ids": ids, "labels": labels}


def test_scores_table(workspace):
    df = run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv",
                     {"gan": "results/counterfactuals/gan/index.csv"}, "results/scores/scores.csv", SCORING, "cpu")
    assert list(df.columns) == SCORE_COLUMNS
    assert df.groupby("generator").size().to_dict() == {"original": 4, "gan": 8}
    back = pd.read_csv("results/scores/scores.csv")
    assert len(back) == 12 and set(back["classifier"]) == {"trained_resnet18"}
    orig = back[back["generator"] == "original"].set_index("image_id")
    assert orig["target_label"].to_dict() == dict(zip(workspace["anchors"]["image_id"], workspace["anchors"]["label"]))
    cf = back[back["generator"] == "gan"]
    assert sorted(cf["target_label"].tolist()) == [0] * 4 + [1] * 4
    assert (cf["anchor_label"].to_numpy() == cf["image_id"].map(orig["anchor_label"]).to_numpy()).all()
    # scores of originals equal the classifier on the packed pixels (the saved PNG is lossless)
    clf = C.load_classifier("classifier.json")
    rows = [workspace["ids"].index(a) for a in orig.index]
    with torch.no_grad():
        p = clf.prob_malignant(uint8_to_float(workspace["imgs"][rows])).numpy()
    assert np.allclose(orig["prob"].to_numpy(), p, atol=1e-5)
    assert np.allclose(back["score"], back["prob"]) and ((back["score"] > 0.5).astype(int) == back["pred"]).all()
    side = json.loads(open("results/scores/scores.csv.prov.json").read())
    assert side["rule"] == "score" and side["n_rows"] == {"gan": 8, "original": 4}
    assert any(i["path"] == "classifier.json" and len(i["sha256"]) == 64 for i in side["inputs"])


def test_scores_do_not_depend_on_the_thread_count(workspace):
    """resources.schema.yaml gives the score rules one thread by default on that ground: the same table, byte for
    byte, with 1 and 2 torch threads and 1 or 2 decode workers."""
    written = []
    for threads in (1, 2):
        out = f"results/scores/t{threads}.csv"
        run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv",
                    {"gan": "results/counterfactuals/gan/index.csv"}, out, dict(SCORING, workers=0), "cpu",
                    threads=threads)
        written.append(open(out, "rb").read())
    torch.set_num_threads(1)
    assert written[0] == written[1]


def test_logit_space_eval_originals_and_torch_backend(workspace):
    spec = json.loads(open("classifier.json").read())
    spec["score_space"] = "logit"
    C.write_spec(spec, "classifier.json")
    cfg = dict(SCORING, originals="eval", resize_backend="torch")
    df = run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv", {}, "s.csv", cfg, "cpu")
    assert len(df) == 5 and set(df["generator"]) == {"original"}
    assert np.allclose(df["score"], df["logit"]) and set(df["score_space"]) == {"logit"}
    assert df["preprocessing"].iloc[0].startswith("8-bit file -> [-1,1] -> torch")
    pil = run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv", {}, "p.csv",
                      dict(cfg, resize_backend="pil"), "cpu")
    assert np.allclose(pil["logit"], df["logit"], atol=1e-4)  # 32 px images at input 32: both are the identity


def test_missing_counterfactual_file_is_named(workspace):
    idx = pd.read_csv("results/counterfactuals/gan/index.csv")
    gone = idx["path"].iloc[2]
    import os

    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=re.escape(gone)):
        scoring_jobs(pd.read_csv("anchors.csv"), pd.read_csv("pack_index.csv"), pd.read_csv("split.csv"),
                     {"gan": "results/counterfactuals/gan/index.csv"})


def test_panels_and_contact_sheet(workspace, tmp_path):
    run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv",
                {"gan": "results/counterfactuals/gan/index.csv"}, "scores.csv", SCORING, "cpu")
    settings = {"tile_size": 64, "sheet_tile_size": 32, "sheet_max_anchors": 3}
    table = run_panels("scores.csv", "anchors.csv", "gan", "panels/gan/combined", "panels/gan/contact_sheet.png", settings)
    scores = pd.read_csv("scores.csv")
    files = sorted(p.name for p in (tmp_path / "panels/gan/combined").glob("combined_*.png"))
    assert len(files) == 4
    for index, a in enumerate(workspace["anchors"].itertuples()):
        s = scores[scores["image_id"] == a.image_id]
        expect = panel_name(index, a.label, s[s.generator == "original"]["score"].iloc[0],
                            s[(s.generator == "gan") & (s.target_label == 0)]["score"].iloc[0],
                            s[(s.generator == "gan") & (s.target_label == 1)]["score"].iloc[0])
        assert expect in files
        assert re.fullmatch(r"combined_\d{5}_[01]_-?\d+\.\d{3}_-?\d+\.\d{3}_-?\d+\.\d{3}\.png", expect)
    with Image.open(tmp_path / "panels/gan/combined" / files[0]) as im:
        assert im.size[0] > 3 * 64 and im.size[1] > 64
        # the middle tile shows the benign counterfactual, not the anchor
        arr = np.asarray(im)
    assert arr.std() > 10
    with Image.open("panels/gan/contact_sheet.png") as sheet:
        assert sheet.size[1] > 3 * 32 and sheet.size[1] < 4 * 40 + 60  # 3 anchors shown
    side = json.loads(open("panels/gan/contact_sheet.png.prov.json").read())
    assert side["n_anchors_shown"] == 3 and side["n_panels"] == 4
    assert len(table) == 4


def test_panels_name_missing_counterfactual(workspace):
    run_scoring("classifier.json", "anchors.csv", "pack_index.csv", "split.csv",
                {"gan": "results/counterfactuals/gan/index.csv"}, "scores.csv", SCORING, "cpu")
    s = pd.read_csv("scores.csv")
    first = workspace["anchors"]["image_id"].iloc[0]
    s[~((s.generator == "gan") & (s.image_id == first) & (s.target_label == 1))].to_csv("scores.csv", index=False)
    with pytest.raises(ValueError, match=rf"lack an original or a counterfactual .* 'gan'.*{first}"):
        run_panels("scores.csv", "anchors.csv", "gan", "p", "p/sheet.png",
                   {"tile_size": 32, "sheet_tile_size": 16, "sheet_max_anchors": None})


def test_benchmark_runs():
    r = benchmark(n=6, image_size=40, arch="resnet18", batch_size=4, device="cpu", workers=1)
    assert r["n_images"] == 6 and r["images_per_s"] > 0 and r["input_size"] == 40


@pytest.mark.slow
def test_score_rules_in_snakemake(all_stages_run):
    """The session's run of every stage: one scoring job per generator, joined into scores.csv."""
    work = all_stages_run
    df = pd.read_csv(work / "results/scores/scores.csv")
    anchors = pd.read_csv(work / "results/data/anchors.csv")
    assert list(df.columns) == SCORE_COLUMNS
    assert list(dict.fromkeys(df["generator"])) == ["original", "gan", "diffusion", "guided", "guided_noclf", "pgd"]
    assert sorted(df.loc[df["generator"] == "original", "image_id"]) == sorted(anchors["image_id"])
    parts = [pd.read_csv(work / f"results/scores/{g}.csv") for g in dict.fromkeys(df["generator"])]
    assert pd.concat(parts, ignore_index=True).equals(df)
    assert json.loads((work / "results/scores/gan.csv.prov.json").read_text())["rule"] == "score"
    spec = json.loads((work / "results/classifier/classifier.json").read_text())
    assert spec["kind"] == "trained" and spec["input_size"] == 32 and "auroc" in spec["provenance"]["trained"]
    assert (work / "results/scores/scores.csv.prov.json").exists()
    assert (work / "results/classifier/trained/heldout.json.prov.json").exists()
