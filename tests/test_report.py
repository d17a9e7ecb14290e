"""Provenance sidecars, dry-run scoping of metric settings, and the HTML report.

Fast tests run the metric and figure rules through the real snakemake CLI on synthetic upstream files
(``--allowed-rules`` keeps Snakemake from rebuilding the upstream stages). The slow tests run the real
pipeline on a tiny config (only the targets this stage needs) and check that changing a metrics-only key
reschedules only metric rules and that ``snakemake --report`` builds with captions, git commit and config hash.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cfaudit.config import load_config
from cfaudit.files import sha256_file
from cfaudit.provenance import code_version, config_sha256, file_record, read_record, write_provenance
from test_metrics import synthetic_scores

REPO = Path(__file__).resolve().parents[1]
METRIC_RULES = {"place_fid_weights", "table1", "closeness", "realism", "curve_figures", "score_histograms",
                "loss_figure", "realism_figure"}


def snakemake(workdir: Path, configfile: Path, targets, *extra, check=True):
    """The real snakemake CLI; targets come first (--configfile and --allowed-rules take several values)."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--cores", "2", "--workflow-profile", "none", *extra, "--configfile", str(configfile)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def scheduled_rules(output: str) -> set[str]:
    """Rule names from the 'Job stats' table of a (dry) run."""
    m = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal", output, re.S)
    return {line.split()[0] for line in m.group(1).splitlines() if line.strip()} if m else set()


# ---------------------------------------------------------------------------------------------------------
# Provenance unit tests
# ---------------------------------------------------------------------------------------------------------
def test_provenance_records_inputs_config_code_and_times(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("x\n1\n")
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "1.png").write_bytes(b"one")
    out = tmp_path / "fig.png"
    out.write_bytes(b"png")
    cfg = {"metrics": {"figures": {"dpi": 100}}, "seed": 1}
    side = write_provenance(out, [a, d], {"figures": {"dpi": 100}}, "some_rule", "2026-01-01T00:00:00+00:00",
                            read=[a], full_config=cfg)
    rec = json.loads(side.read_text())
    assert side.name == "fig.png.prov.json" and rec["rule"] == "some_rule"
    assert rec["inputs"][0] == {"path": str(a), "sha256": sha256_file(a), "bytes": a.stat().st_size}
    assert rec["inputs"][1]["kind"] == "directory" and rec["inputs"][1]["n_files"] == 1
    assert rec["output_sha256"] == sha256_file(out)
    assert rec["config"] == {"figures": {"dpi": 100}} and rec["config_sha256"] == config_sha256(cfg)
    assert set(rec["code"]) >= {"commit", "dirty"} and rec["packages"]["numpy"]
    assert rec["started"] < rec["finished"] and "host" in rec["device"]
    assert rec["read"]["files"][0]["sha256"] == sha256_file(a)
    # a directory's digest changes with any file below it; the config hash ignores key order
    before = file_record(d)["sha256"]
    (d / "1.png").write_bytes(b"two")
    assert file_record(d)["sha256"] != before
    assert config_sha256({"a": 1, "b": {"c": 2}}) == config_sha256({"b": {"c": 2}, "a": 1})
    many = read_record([a] * 3, max_listed=0)
    assert many["n_files"] == 1 and "files" not in many


# ---------------------------------------------------------------------------------------------------------
# Metric and figure rules on synthetic upstream files (fast)
# ---------------------------------------------------------------------------------------------------------
def write_upstream(workdir: Path) -> dict[str, Path]:
    """results/scores/scores.csv, results/data/anchors.csv, results/classifier/classifier.json (the contracts)."""
    scores, anchors = synthetic_scores(12, seed=4)
    paths = {"scores": workdir / "results/scores/scores.csv", "anchors": workdir / "results/data/anchors.csv",
             "spec": workdir / "results/classifier/classifier.json"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    scores.to_csv(paths["scores"], index=False)
    anchors.to_csv(paths["anchors"], index=False)
    paths["spec"].write_text(json.dumps({"threshold": 0.5, "score_space": "softmax", "name": "toy"}))
    return paths


def test_figure_sidecars_list_the_checksums_of_their_real_inputs(tmp_path):
    ups = write_upstream(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"counterfactuals": {"generators": ["gan", "diffusion"]},
                                   "metrics": {"bootstrap": {"resamples": 30}, "figures": {"dpi": 60},
                                               "oracles": {"models": []}}}))
    targets = ["results/figures/pr_gan.png", "results/figures/score_histograms.png", "results/metrics/table1.csv"]
    snakemake(tmp_path, cfg, targets, "--allowed-rules", "curve_figures", "score_histograms", "table1")
    for fig, rule in (("pr_gan.png", "curve_figures"), ("roc_gan.png", "curve_figures"),
                      ("score_histograms.png", "score_histograms")):
        rec = json.loads((tmp_path / "results/figures" / f"{fig}.prov.json").read_text())
        assert rec["rule"] == rule
        got = {r["path"]: r["sha256"] for r in rec["inputs"]}
        want = {str(p.relative_to(tmp_path)): sha256_file(p) for p in ups.values()}
        assert got == want, fig  # exactly the files the figure was made from, with their checksums
        assert rec["output_sha256"] == sha256_file(tmp_path / "results/figures" / fig)
        assert rec["config"]["figures"]["dpi"] == 60
        assert re.fullmatch(r"[0-9a-f]{64}", rec["config_sha256"])
    table = pd.read_csv(tmp_path / "results/metrics/table1.csv")
    assert list(dict.fromkeys(table["group"])) == ["original", "gan", "diffusion"]
    assert (tmp_path / "results/metrics/table1.md.prov.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# The real pipeline on a tiny config (slow: needs the classifier, diffusion and scoring stages)
# ---------------------------------------------------------------------------------------------------------
TINY = {
    "seed": 7,
    "image_size": 32,
    "dataset": {"source": "synthetic", "synthetic": {"n_images": 24, "malignant_fraction": 0.5, "size": 40}},
    "split": {"eval_fraction": 0.34, "max_anchors": 4},
    "counterfactuals": {"shards": 1, "generators": ["diffusion"]},
    "classifier": {"trained": {"input_size": 32, "epochs": 1}},
    "diffusion": {"epochs": 1, "T": 20, "n_feat": 8, "counterfactual": {"steps": 2}},
    "metrics": {"bootstrap": {"resamples": 50}, "fid": {"weights_url": "", "kid_subsets": 5}},
}
TARGETS = ["results/metrics/table1.csv", "results/metrics/closeness.csv", "results/metrics/fid.csv",
           "results/figures/fid.png", "results/figures/training_loss.png", "results/figures/pr_diffusion.png",
           "results/figures/score_histograms.png", "results/metrics/judges.html"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    missing = [s for s in ("classifier", "scoring", "diffusion") if not (REPO / "rules" / f"{s}.smk").exists()]
    if missing:
        pytest.skip(f"upstream stages not in this checkout yet: {missing}")
    work = tmp_path_factory.mktemp("tiny_run")
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    snakemake(work, cfg, TARGETS)
    return work, cfg


def _variant(work: Path, name: str, change: dict) -> Path:
    from cfaudit.config import deep_update

    cfg = json.loads(json.dumps(TINY))
    deep_update(cfg, change)
    path = work / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_pipeline_outputs_and_fallback_labelling(tiny_run):
    work, _ = tiny_run
    table = pd.read_csv(work / "results/metrics/table1.csv")
    assert list(dict.fromkeys(table["group"])) == ["original", "diffusion"]
    fid = pd.read_csv(work / "results/metrics/fid.csv")
    status = json.loads((work / "resources/torch_home/fid_weights.json").read_text())
    assert status["available"] is False
    assert set(fid["metric"]) == {"oracle-feature FD", "oracle-feature KID"}  # an oracle's features, not the audited
    assert fid["note"].str.startswith("FID absent").all() and (fid["n_real"] == fid["n_real"].iloc[0]).all()
    rec = json.loads((work / "results/figures/pr_diffusion.png.prov.json").read_text())
    scores = work / "results/scores/scores.csv"
    assert {"path": "results/scores/scores.csv", "sha256": sha256_file(scores),
            "bytes": scores.stat().st_size} in rec["inputs"]


@pytest.mark.slow
def test_metric_only_settings_reschedule_only_metric_rules(tiny_run):
    work, _ = tiny_run
    cases = [({"metrics": {"bootstrap": {"resamples": 60}}}, {"table1", "closeness", "judges"}),
             ({"metrics": {"figures": {"dpi": 80}}}, {"curve_figures", "score_histograms", "loss_figure",
                                                     "realism_figure"}),
             ({"metrics": {"fid": {"n": 100}}}, {"realism", "realism_figure", "judges"})]
    for i, (change, expected) in enumerate(cases):
        proc = snakemake(work, _variant(work, f"v{i}.yaml", change), TARGETS, "-n")
        assert scheduled_rules(proc.stdout) == expected, (change, proc.stdout[-3000:])
    # the unchanged config schedules nothing
    assert "Nothing to be done" in snakemake(work, tiny_run[1], TARGETS, "-n").stdout


@pytest.mark.slow
def test_report_builds_with_captions_commit_and_config_hash(tiny_run):
    work, cfg = tiny_run
    snakemake(work, cfg, TARGETS, "--report", "report.html", "--report-metadata",
              str(REPO / "rules/report/metadata.yaml"))
    html = (work / "report.html").read_text()
    commit = code_version()["commit"]
    if commit:
        assert commit in html
    assert config_sha256(load_config(REPO / "config.yaml", cfg)) in html
    block = html[html.index('<script id="results">'):]
    results = json.loads(block[block.index("{"):block.index("</script>")].strip().rstrip(";"))
    for name in ("table1.html", "fid.html", "closeness.html", "judges.html", "pr_diffusion.png", "roc_diffusion.png",
                 "score_histograms.png", "training_loss.png", "fid.png"):
        entry = next(v for k, v in results.items() if k.endswith(name))
        assert len(entry["caption"]) > 200, name  # a caption saying what it shows and how it was made
    assert "oracle-feature" in html and "cfaudit: counterfactual audit" in html
