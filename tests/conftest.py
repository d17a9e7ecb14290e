"""Shared fixtures: repo paths, the real ISIC test images, and a runner for the real snakemake CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real ISIC images (../shared/data beside the repo, or $CFAUDIT_SHARED_DATA); skip if absent."""
    path = Path(os.environ.get("CFAUDIT_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "isic2017_256" / "labels.csv").exists():
        pytest.skip(f"needs the real ISIC test images (isic2017_256/labels.csv) in ../shared/data beside the "
                    f"repository or in $CFAUDIT_SHARED_DATA; not found at {path}")
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path | None = None, targets=(), extra_args=(), check=True, env=None):
    """Run the real `snakemake` CLI on the repo's Snakefile in ``workdir``; returns CompletedProcess."""
    cmd = [
        sys.executable, "-m", "snakemake", *targets,  # targets first: --configfile takes several values
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--cores", "2",
        "--workflow-profile", "none",
    ]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    cmd += list(extra_args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=full_env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def run_snakemake():
    return snakemake


# A tiny embedded-data config every end-to-end test can start from (override keys per test).
TINY_CONFIG = {
    "seed": 7,
    "image_size": 32,
    "dataset": {"source": "synthetic", "synthetic": {"n_images": 40, "malignant_fraction": 0.5, "size": 48}},
    "split": {"eval_fraction": 0.3, "max_anchors": 6},
    "counterfactuals": {"shards": 2},
}


@pytest.fixture
def tiny_config(tmp_path) -> dict:
    import copy

    return copy.deepcopy(TINY_CONFIG)


def scheduled_jobs(proc) -> dict:
    """Parse the 'Job stats' table of a `snakemake -n` run into {rule: count} (empty: nothing to do)."""
    out, lines, started = {}, (proc.stdout + "\n" + proc.stderr).splitlines(), False
    for line in lines:
        if line.startswith("Job stats:"):
            started, out = True, {}
            continue
        if started:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
                out[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                started = False
    return out


# Every stage on the embedded data at 32 px (all five generators, two oracles, traits): ~70 jobs, about five
# minutes on 2 cores. Run once per session (all_stages_run) and shared by the tests of the rerun scope, declared
# outputs, determinism, the report and the judges' stage.
ALL_STAGES_TINY = {
    "seed": 7,
    "image_size": 32,
    "dataset": {"source": "synthetic", "synthetic": {"n_images": 40, "malignant_fraction": 0.5, "size": 48}},
    "split": {"eval_fraction": 0.3, "max_anchors": 6},
    "counterfactuals": {"shards": 2, "generators": ["gan", "diffusion", "guided", "guided_noclf", "pgd"]},
    "classifier": {"trained": {"input_size": 32, "epochs": 1}},
    "gan": {"train": {"epochs": 1}},
    "diffusion": {"epochs": 1, "T": 20, "n_feat": 8, "counterfactual": {"steps": 2}},
    "guided": {"steps": 3, "batch_size": 8, "cone": {"model": {"epochs": 1}}},
    "traits": {"statistics": {"bootstrap": 50}},
    "metrics": {"bootstrap": {"resamples": 50}, "fid": {"weights_url": "", "kid_subsets": 5},
                "judges": {"fd_resamples": 10, "pgd": {"steps": 5}},
                "oracles": {"models": [{"name": "r34", "arch": "resnet34", "seed": 71, "input_size": 40, "epochs": 1},
                                       {"name": "eff", "arch": "shufflenet_v2_x0_5", "seed": 72, "epochs": 1}]}},
}


@pytest.fixture(scope="session")
def all_stages_run(tmp_path_factory) -> Path:
    """A finished run of every stage on ALL_STAGES_TINY (config: <dir>/tiny.yaml); tests may dry-run variants
    in it, and a test that deletes its outputs must rerun it before returning."""
    work = tmp_path_factory.mktemp("all_stages")
    write_config(work / "tiny.yaml", ALL_STAGES_TINY)
    snakemake(work, work / "tiny.yaml", extra_args=["--max-threads", "1"])
    return work
