"""Provenance sidecars: every table and figure a user reads gets ``<file>.prov.json`` beside it.

A sidecar records the rule, the inputs with sha256, the config values the output depends on, the code
version (git commit + dirty flag, read at run time, never a rule param, so it does not trigger reruns),
package versions, the device and start/end times.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from cfaudit.files import sha256_file

PACKAGES = ("cfaudit", "snakemake", "torch", "torchvision", "numpy", "pandas", "pillow", "scikit-learn",
            "scipy", "pytorch-fid", "diffusers", "isic-cli", "matplotlib")
CODE_DIR = Path(__file__).resolve().parent


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_version(path: Path = CODE_DIR) -> dict:
    """Git commit of the checkout holding the code, and whether it has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "note": "not a git checkout"}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError) as err:
        return {"commit": None, "dirty": None, "note": f"git unavailable: {err}"}


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def device_info() -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def file_record(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": str(p), "kind": "directory", "n_files": len(files)}
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def sidecar_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.prov.json")


def write_provenance(output, inputs, config_slice: dict, rule: str, started: str, extra: dict | None = None) -> Path:
    """Write ``<output>.prov.json``; ``inputs`` is an iterable of paths (files or directories)."""
    record = {
        "output": str(output),
        "rule": rule,
        "inputs": [file_record(p) for p in inputs],
        "config": config_slice,
        "code": code_version(),
        "packages": package_versions(),
        "device": device_info(),
        "started": started,
        "finished": now(),
    }
    if extra:
        record.update(extra)
    path = sidecar_path(output)
    path.write_text(json.dumps(record, indent=2, sort_keys=False, default=str))
    return path


def snakemake_inputs(smk) -> list[str]:
    """All input paths of a running Snakemake job (flattening named lists)."""
    out: list[str] = []
    for item in smk.input:
        out.extend([item] if isinstance(item, str) else list(item))
    return out
