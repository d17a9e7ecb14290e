"""The embedded demo end to end (wall time, peak resident memory of the process tree) and the per-rule table
of Snakemake's ``benchmark:`` files."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[3]


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory (MB) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        rss[int(entry.name)] = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024


def run_demo(cores: int, snakemake: str) -> tuple[dict, pd.DataFrame]:
    """The embedded default (this repo's config.yaml) in a fresh working directory: wall seconds, peak RSS, rules."""
    with tempfile.TemporaryDirectory(prefix="cfaudit-demo-") as work:
        cmd = [snakemake, "--snakefile", str(REPO / "Snakefile"), "--configfile", str(REPO / "config.yaml"),
               "--directory", work, "--cores", str(cores), "--workflow-profile", "none", "--quiet", "rules"]
        peak = [0.0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
                done.wait(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        log, _ = proc.communicate()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        if proc.returncode != 0:
            raise RuntimeError(f"the demo run failed (exit {proc.returncode}):\n{log[-4000:]}")
        rules = rule_table(Path(work) / "benchmarks")
    return {"value": round(wall, 1), "unit": "s", "peak_rss_mb": round(peak[0]), "cores": cores}, rules


def rule_table(bench_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per rule from Snakemake's `benchmark:` TSVs (shards summed): wall s, CPU s, max RSS MB, jobs."""
    rows = []
    for f in sorted(Path(bench_dir).rglob("*.tsv")):
        t = pd.read_csv(f, sep="\t")
        rule = re.sub(r"_\d+$", "", f.stem)  # shard jobs: <rule>_<shard>.tsv
        rows.append({"rule": rule, "s": float(t["s"].iloc[-1]), "cpu_s": float(t["cpu_time"].iloc[-1]),
                     "max_rss_mb": float(pd.to_numeric(t["max_rss"], errors="coerce").fillna(0).iloc[-1])})
    if not rows:
        raise FileNotFoundError(f"no benchmark .tsv files under {bench_dir}: run the pipeline first")
    df = pd.DataFrame(rows)
    out = df.groupby("rule", sort=False).agg(jobs=("s", "size"), wall_s=("s", "sum"), cpu_s=("cpu_s", "sum"),
                                             max_rss_mb=("max_rss_mb", "max")).reset_index()
    return out.sort_values("wall_s", ascending=False).round(1)
