"""Provenance sidecars: every table and figure a user reads gets ``<file>.prov.json`` beside it.

A sidecar records the rule, the inputs with sha256, the config values the output depends on, the code
version (git commit + dirty flag, read at run time, never a rule param, so it does not trigger reruns),
package versions, the device and start/end times.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from cfaudit.files import atomic_write_text, sha256_file

PACKAGES = ("cfaudit", "snakemake", "torch", "torchvision", "numpy", "pandas", "pillow", "scikit-learn",
            "scipy", "pytorch-fid", "diffusers", "isic-cli", "matplotlib")
CODE_DIR = Path(__file__).resolve().parent


TIMING_KEYS = ("seconds", "images_per_s")


def without_timings(rows: list[dict]) -> list[dict]:
    """History rows without wall-clock measurements: what goes into a final checkpoint, so that the same
    training gives the same file (timings stay in the loss tables and the sidecars)."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_version(path: Path = CODE_DIR) -> dict:
    """Git commit of the checkout holding the code, and whether it has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return {"commit": None, "dirty": None, "note": "not a git checkout"}
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": True, "note": "git checkout without any commit yet"}
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


def device_info(query_torch: bool = False) -> dict:
    """The machine a job ran on. torch (its CUDA build, the GPU) is asked only when the job already loaded it, or
    when ``query_torch``: a job that never imported torch computed on the CPU, and importing torch (~2 s) only to
    write this record was most of the time of the pipeline's ~40 light jobs."""
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is None and query_torch:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None:
        info["torch_cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    else:
        info["gpu"] = None
        info["torch"] = "not loaded by this job (it computed on the CPU)"
    info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return info


def config_sha256(config: dict) -> str:
    """sha256 of the configuration as canonical JSON (sorted keys): the run's config hash."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def files_digest(records: list[dict]) -> str:
    """One sha256 over ``path sha256`` lines of file records (order-independent: sorted by path)."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r["path"]):
        h.update(f"{r['path']}\t{r['sha256']}\n".encode())
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """``{path, sha256, bytes}`` of a file; a directory gets ``n_files``, ``bytes`` and a ``sha256`` over
    the sorted (relative path, file sha256) pairs of everything below it, so any change shows."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        recs = [{"path": str(f.relative_to(p)), "sha256": sha256_file(f)} for f in files]
        return {"path": str(p), "kind": "directory", "n_files": len(files),
                "bytes": sum(f.stat().st_size for f in files), "sha256": files_digest(recs)}
    if not p.exists():
        return {"path": str(p), "sha256": None, "note": "missing when the sidecar was written"}
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def read_record(paths, max_listed: int = 200) -> dict:
    """Files a job read beyond its declared inputs (e.g. the PNGs an index CSV names): their count, one
    digest over all, and each file's sha256 when there are at most ``max_listed`` of them."""
    unique = sorted({str(p) for p in paths})
    recs = [file_record(p) for p in unique]
    out = {"n_files": len(recs), "sha256": files_digest([r for r in recs if r.get("sha256")])}
    if len(recs) <= max_listed:
        out["files"] = recs
    return out


def sidecar_path(output: str | os.PathLike) -> Path:
    return Path(f"{output}.prov.json")


def write_provenance(output, inputs, config_slice: dict, rule: str, started: str, extra: dict | None = None,
                     *, read=None, full_config: dict | None = None) -> Path:
    """Write ``<output>.prov.json``; ``inputs`` is an iterable of paths (files or directories).

    ``read``: further files the job read (see :func:`read_record`); ``full_config``: the whole run
    configuration, recorded as its hash (``config_sha256``) beside the values the output depends on.
    The sidecar also records the output's own sha256, so a sidecar can be matched to its file.
    """
    out_path = Path(output)
    record = {
        "output": str(output),
        "output_sha256": sha256_file(out_path) if out_path.is_file() else None,
        "rule": rule,
        "inputs": [file_record(p) for p in inputs],
        "config": config_slice,
        "config_sha256": config_sha256(full_config) if full_config is not None else None,
        "code": code_version(),
        "packages": package_versions(),
        "device": device_info(),
        "started": started,
        "finished": now(),
    }
    if read is not None:
        record["read"] = read_record(read)
    if extra:
        record.update(extra)
    path = sidecar_path(output)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str))
    return path


def write_job_provenance(smk, outputs, started: str, extra: dict | None = None, read=None) -> list[Path]:
    """Sidecars for outputs of a running Snakemake job: its rule, all its declared inputs, its params (the
    config values it depends on) and the hash of the whole configuration."""
    params = {k: v for k, v in dict(smk.params.items()).items()}
    return [write_provenance(o, snakemake_inputs(smk), params, smk.rule, started, extra, read=read,
                             full_config=dict(smk.config)) for o in outputs]


def snakemake_inputs(smk) -> list[str]:
    """All input paths of a running Snakemake job (flattening named lists)."""
    out: list[str] = []
    for item in smk.input:
        out.extend([item] if isinstance(item, str) else list(item))
    return out
