"""The seed's configuration as one DAG (presets/seed.yaml + presets/smoke_fullres.yaml, what `make smoke-fullres`
runs): 256 px generators, DeepDerm at 299 and the published GAN layout at 299, with random weights in the
published layouts placed through local_path + sha256. Checks the sizes each stage works at, DeepDerm's scores
against torchvision's Inception-v3 with DDI's own preprocessing, and that the weights used are the ones placed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import snakemake
from fixtures.random_weights import write_smoke_weights

REPO = Path(__file__).resolve().parents[1]
GENERATORS = ["gan", "diffusion", "guided"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke_fullres")
    digest = write_smoke_weights(work / "weights")
    configs = [str(REPO / "presets/seed.yaml"), str(REPO / "presets/smoke_fullres.yaml"),
               str(work / "weights/weights.yaml")]
    start = time.monotonic()
    snakemake(work, extra_args=["--configfile", *configs, "--max-threads", "1"])  # overlap the start-ups
    snakemake(work, extra_args=["--configfile", *configs, "--report", str(work / "report.html")])
    print(f"smoke_fullres: pipeline and report in {time.monotonic() - start:.0f} s")
    return work, digest


def _sizes(paths, work: Path) -> set:
    return {Image.open(work / p).size for p in paths}


@pytest.mark.slow
@pytest.mark.acceptance  # ~5 min: `make test-acceptance`, not `make test` (CI time)
def test_each_stage_works_at_its_documented_size(smoke_run):
    work, _ = smoke_run
    anchors = pd.read_csv(work / "results/data/anchors.csv")
    assert len(anchors) == 4 and _sizes(anchors["png"], work) == {(256, 256)}
    expected = {"gan": (299, 299), "diffusion": (256, 256), "guided": (256, 256)}  # GAN: the classifier's size
    panel_sizes = set()
    for gen in GENERATORS:
        index = pd.read_csv(work / f"results/counterfactuals/{gen}/index.csv")
        assert len(index) == 2 * len(anchors) and _sizes(index["path"], work) == {expected[gen]}, gen
        panels = sorted((work / f"results/panels/{gen}/combined").glob("combined_*.png"))
        assert len(panels) == len(anchors), gen
        panel_sizes |= {Image.open(p).size for p in panels}
    assert len(panel_sizes) == 1 and next(iter(panel_sizes))[0] > 3 * 256  # anchor | benign | malignant at 256
    closeness = pd.read_csv(work / "results/metrics/closeness_per_image.csv")
    assert set(closeness["compared_at"]) == {256} and set(closeness["generator"]) == set(GENERATORS)
    diagnostics = pd.read_csv(work / "results/metrics/diagnostics_per_image.csv")
    assert set(diagnostics["compared_at"]) == {256}
    fid = pd.read_csv(work / "results/metrics/fid.csv")
    assert set(fid["metric"]) >= {"FID", "KID"} and (fid["feature_dims"] == 2048).all()
    assert "resize to 299" in fid["implementation"].iloc[0] and fid["note"].str.contains("NOT pytorch-fid").all()
    traits = pd.read_csv(work / "results/traits/features.csv")
    assert set(GENERATORS) <= set(traits["generator"]) and traits["seg_ok"].any()
    table = pd.read_csv(work / "results/metrics/table1.csv")
    assert list(dict.fromkeys(table["group"])) == ["original", *GENERATORS]
    assert (table["classifier"] == "deepderm").all()
    assert (work / "report.html").stat().st_size > 100_000  # built (its content: tests/test_report.py)


@pytest.mark.slow
@pytest.mark.acceptance  # ~5 min: `make test-acceptance`, not `make test` (CI time)
def test_deepderm_scores_match_torchvision_with_ddi_preprocessing(smoke_run):
    """Scores of a 256 px and a 299 px counterfactual recomputed outside the pipeline: torchvision's Inception-v3
    (built as DDI builds DeepDerm) on Resize(299) -> CenterCrop(299) -> ToTensor -> ImageNet Normalize."""
    from torchvision import transforms
    from torchvision.models import inception_v3

    work, _ = smoke_run
    spec = json.loads((work / "results/classifier/classifier.json").read_text())
    assert (spec["input_size"], spec["normalization"], spec["transform_input"]) == (299, "imagenet", True)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    net.fc, net.AuxLogits.fc = torch.nn.Linear(2048, 2), torch.nn.Linear(768, 2)
    net.load_state_dict(torch.load(work / "weights/deepderm.pth", weights_only=True))
    prep = transforms.Compose([transforms.Resize(299), transforms.CenterCrop(299), transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    scores = pd.read_csv(work / "results/scores/scores.csv")
    rows = pd.concat([scores[scores["generator"] == g].head(1) for g in ("gan", "diffusion")])
    x = torch.stack([prep(Image.open(work / p).convert("RGB")) for p in rows["path"]])
    with torch.no_grad():
        logits = net.eval()(x)
    np.testing.assert_allclose(rows["logit"].to_numpy(), logits[:, 1].numpy(), atol=2e-3)
    np.testing.assert_allclose(rows["prob"].to_numpy(), torch.softmax(logits, 1)[:, 1].numpy(), atol=5e-4)
    assert scores["score"].std() > 0.01  # the calibrated random weights give image-dependent scores


@pytest.mark.slow
@pytest.mark.acceptance  # ~5 min: `make test-acceptance`, not `make test` (CI time)
def test_the_weights_used_are_the_ones_placed(smoke_run):
    work, digest = smoke_run
    spec = json.loads((work / "results/classifier/classifier.json").read_text())
    assert spec["sha256"] == digest["deepderm"] and spec["n_tensors"] == 580
    assert spec["provenance"]["source"]["local_path"] == str(work / "weights/deepderm.pth")
    placed = json.loads((work / "resources/gan/pretrained_generator.pth.prov.json").read_text())
    assert placed["output_sha256"] == digest["gan"] and placed["config"]["pretrained"]["sha256"] == digest["gan"]
    settings = pd.read_csv(work / "results/counterfactuals/gan/index.csv")["settings"].map(json.loads)
    assert {s["checkpoint_sha256"] for s in settings} == {digest["gan"]}
    assert {s["checkpoint_layout"] for s in settings} == {"published"}
    fid_status = json.loads((work / "resources/torch_home/fid_weights.json").read_text())
    assert fid_status["sha256"] == digest["fid"] and fid_status["hash_verified"] is False
