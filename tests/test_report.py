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

from cfaudit.files import sha256_file
from cfaudit.provenance import config_sha256, file_record, read_record, write_provenance
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


def test_device_record_loads_torch_only_when_asked():
    """A light job (figures, tables) never loads torch just to write its sidecar (~2 s of each job's time); the run
    identity asks for it, so the report still names the GPU and torch's CUDA build. In a fresh interpreter."""
    code = ("import sys; from cfaudit.provenance import device_info; a = device_info(); "
            "loaded = 'torch' in sys.modules; b = device_info(query_torch=True); "
            "print(loaded, 'torch_cuda' in a, a['gpu'], 'torch_cuda' in b, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO / "workflow_scripts").stdout.split()
    assert out == ["False", "False", "None", "True", "True"], out


# ---------------------------------------------------------------------------------------------------------
# Metric and figure rules on synthetic upstream files (fast)
# ---------------------------------------------------------------------------------------------------------
def write_upstream(workdir: Path) -> dict[str, Path]:
    """results/scores/{original,gan,diffusion}.csv and scores.csv (their concatenation), results/data/anchors.csv,
    results/classifier/classifier.json (the contracts)."""
    scores, anchors = synthetic_scores(12, seed=4)
    paths = {"anchors": workdir / "results/data/anchors.csv", "spec": workdir / "results/classifier/classifier.json"}
    paths |= {g: workdir / f"results/scores/{g}.csv" for g in dict.fromkeys(scores["generator"])}
    paths["scores"] = workdir / "results/scores/scores.csv"  # written last: newer than its parts
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    anchors.to_csv(paths["anchors"], index=False)
    paths["spec"].write_text(json.dumps({"threshold": 0.5, "score_space": "softmax", "name": "toy"}))
    for g, part in scores.groupby("generator", sort=False):
        part.to_csv(paths[g], index=False)
    scores.to_csv(paths["scores"], index=False)
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
        read = ("original", "gan", "anchors", "spec") if rule == "curve_figures" else ("scores", "anchors", "spec")
        want = {str(ups[k].relative_to(tmp_path)): sha256_file(ups[k]) for k in read}
        assert got == want, fig  # exactly the files the figure was made from, with their checksums
        assert rec["output_sha256"] == sha256_file(tmp_path / "results/figures" / fig)
        assert rec["config"]["figures"]["dpi"] == 60
        assert re.fullmatch(r"[0-9a-f]{64}", rec["config_sha256"])
    table = pd.read_csv(tmp_path / "results/metrics/table1.csv")
    assert list(dict.fromkeys(table["group"])) == ["original", "gan", "diffusion"]
    assert (tmp_path / "results/metrics/table1.md.prov.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# The real pipeline (the session's tiny run of every stage, tests/conftest.py); the rerun scope of metric settings,
# the report in a browser and its captions: tests/test_rerun.py
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_outputs_and_fallback_labelling(all_stages_run):
    work = all_stages_run
    table = pd.read_csv(work / "results/metrics/table1.csv")
    assert list(dict.fromkeys(table["group"])) == ["original", "gan", "diffusion", "guided", "guided_noclf", "pgd"]
    fid = pd.read_csv(work / "results/metrics/fid.csv")
    status = json.loads((work / "resources/torch_home/fid_weights.json").read_text())
    assert status["available"] is False
    assert set(fid["metric"]) == {"oracle-feature FD", "oracle-feature KID"}  # an oracle's features, not the audited
    assert fid["note"].str.startswith("FID absent").all() and (fid["n_real"] == fid["n_real"].iloc[0]).all()
    rec = json.loads((work / "results/figures/pr_diffusion.png.prov.json").read_text())
    for part in ("original", "diffusion"):  # the figure reads the originals' and its generator's scores only
        scores = work / f"results/scores/{part}.csv"
        assert {"path": f"results/scores/{part}.csv", "sha256": sha256_file(scores),
                "bytes": scores.stat().st_size} in rec["inputs"]


def test_parsing_the_workflow_runs_no_subprocess(tmp_path):
    """No git (or any program) while the Snakefile is parsed: cluster jobs re-parse it. A `git` on PATH that leaves a
    mark shows whether parsing called it; the run identity comes from rule run_identity at run time."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text(f"#!/bin/sh\necho called >> {tmp_path / 'git_called'}\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--cores", "1", "--workflow-profile", "none"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run_identity" in proc.stdout and not (tmp_path / "git_called").exists()
