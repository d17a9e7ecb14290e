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
        pytest.skip(f"real ISIC test images not found at {path} (set CFAUDIT_SHARED_DATA)")
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
