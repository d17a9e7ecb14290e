#!/usr/bin/env python3
"""Status of one Grid Engine job for snakemake's cluster-generic executor: prints running|success|failed.

Order of evidence:
1. ``qstat``: still listed -> running, except the error state (``Eqw``: it will never run) -> the job is
   deleted and reported failed.
2. ``.snakemake/scc_status/<id>.exit`` (written by the job's EXIT trap, see scc_submit.py): 0 -> success,
   anything else -> failed.
3. ``qacct -j <id>``: ``failed`` != 0 or ``exit_status`` != 0 -> failed (a job Grid Engine killed for
   h_rt / memory / qdel ends here: it had no chance to write its exit file), else success.
4. Gone from qstat with neither an exit file nor an accounting record (deleted while still queued, or the
   accounting record not flushed yet): running for SCC_STATUS_GRACE seconds (default 120), then failed.
   So a job the scheduler removes always fails its Snakemake job; nothing waits forever.

Always exits 0 with exactly one word on stdout (cluster-generic aborts the whole run otherwise); the
reason for a failure goes to stderr. A qstat that cannot reach the qmaster counts as "running".
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import time
from pathlib import Path

STATUS_DIR = Path(".snakemake/scc_status")


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"scc_status.py: {' '.join(cmd)}: {e}", file=sys.stderr)
        return None


def qstat_state(jobid: str) -> str | None:
    """The job's state letters from qstat ('qw', 'r', 'Eqw', ...), '' if not listed, None if qstat failed."""
    proc = run(["qstat", "-u", getpass.getuser()])  # own jobs only: a big cluster's full list is costly
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == jobid:
            return f[4]
    return ""


def parse_qacct(text: str) -> dict[str, str]:
    """Fields of the LAST record in `qacct -j` output (job ids can repeat after a counter wrap)."""
    records: list[dict[str, str]] = []
    for line in text.splitlines():
        if line.startswith("====="):
            records.append({})
            continue
        m = re.match(r"^(\w+)\s+(.*?)\s*$", line)
        if m:
            if not records:
                records.append({})
            records[-1][m.group(1)] = m.group(2)
    return records[-1] if records else {}


def verdict_from_qacct(fields: dict[str, str]) -> tuple[str, str]:
    failed = fields.get("failed", "0").split()[0]
    exit_status = fields.get("exit_status", "0").split()[0]
    if failed != "0" or exit_status != "0":
        return "failed", f"qacct: failed={fields.get('failed')} exit_status={fields.get('exit_status')}"
    return "success", ""


def finish(jobid: str, verdict: str, why: str = "") -> str:
    if verdict == "failed" and why:
        print(f"scc_status.py: job {jobid} failed: {why}", file=sys.stderr)
    for p in (STATUS_DIR / f"{jobid}.exit", STATUS_DIR / f"{jobid}.missing"):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return verdict


def status(jobid: str, now: float | None = None) -> str:
    now = time.time() if now is None else now
    state = qstat_state(jobid)
    if state is None:
        return "running"  # qmaster unreachable right now: ask again later
    if state:
        if "E" in state:
            run(["qdel", jobid])
            return finish(jobid, "failed", f"Grid Engine error state {state!r} (see `qstat -j {jobid}`); deleted it")
        return "running"

    exit_file = STATUS_DIR / f"{jobid}.exit"
    if exit_file.exists():
        code = exit_file.read_text().strip()
        return finish(jobid, "success" if code == "0" else "failed", f"job script exit code {code}")

    proc = run(["qacct", "-j", jobid], timeout=120)
    if proc is not None and proc.returncode == 0 and "exit_status" in proc.stdout:
        return finish(jobid, *verdict_from_qacct(parse_qacct(proc.stdout)))

    grace = float(os.environ.get("SCC_STATUS_GRACE", "120"))
    STATUS_DIR.mkdir(parents=True, exist_ok=True)
    missing = STATUS_DIR / f"{jobid}.missing"
    if not missing.exists():
        missing.write_text(str(now))
    first = float(missing.read_text().strip() or now)
    if now - first >= grace:
        return finish(jobid, "failed", f"left the queue {now - first:.0f}s ago with no exit code and no qacct "
                      "record (deleted by the scheduler or an admin before it ran?)")
    return "running"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: scc_status.py JOBID", file=sys.stderr)
        print("running")
        return 0
    jobid = argv[1].strip().split(".")[0]
    try:
        print(status(jobid))
    except Exception as e:  # never abort the whole Snakemake run over one status query
        print(f"scc_status.py: {type(e).__name__}: {e}", file=sys.stderr)
        print("running")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
