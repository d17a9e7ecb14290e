"""The conda env for clusters carries exactly the pins of requirements.lock; ranges live in pyproject."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_conda_env_pins_equal_the_lock_file():
    lock = {l.strip().lower() for l in (REPO / "requirements.lock").read_text().splitlines()
            if l.strip() and not l.startswith("#")}
    env = yaml.safe_load((REPO / "envs" / "cfaudit.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {p.lower() for p in pip} == lock
    assert all("==" in p for p in lock)


def test_lock_pins_the_core_stack():
    lock = (REPO / "requirements.lock").read_text().lower()
    for name in ("snakemake==", "torch==", "torchvision==", "pytorch-fid==", "scipy==1.17", "isic-cli=="):
        assert name in lock
