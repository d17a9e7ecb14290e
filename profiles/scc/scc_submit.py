#!/usr/bin/env python3
"""Submit one Snakemake job to Grid Engine with Boston University SCC's conventions (cluster-generic).

Snakemake (snakemake-executor-plugin-cluster-generic) calls ``scc_submit.py JOBSCRIPT``; the job's rule,
threads and resources are in the ``# properties = {...}`` line of JOBSCRIPT. This prints the Grid Engine
job id (the only thing on stdout) after running an explicit qsub line:

    qsub -terse -cwd -V -j y -S /bin/bash -N cfaudit.<rule> -o logs/cluster/<rule>/<name>.$JOB_ID.log
         [-P <project>] [-pe omp <threads>] -l h_rt=<runtime> -l mem_per_core=<mem_mb/threads>M
         [-l gpus=<gpu> -l gpu_c=<gpu_c> [-l gpu_memory=<gpu_memory>]] [<sge_extra>] <script>

Resources read (rules declare them via job_resources()/job_threads(); the profile's default-resources
fill the rest): threads -> -pe omp (omitted for 1 slot), runtime (minutes) -> h_rt, mem_mb (the whole
job) -> mem_per_core, gpu -> gpus (+ gpu_c, optional gpu_memory), sge_project or $SCC_PROJECT -> -P,
sge_extra -> appended verbatim (e.g. "-l avx" or "-q myqueue").

The submitted script is the job script plus one EXIT trap that writes the job's exit code to
.snakemake/scc_status/<JOB_ID>.exit, so scc_status.py knows success/failure without waiting for
qacct; a job that Grid Engine kills (qdel, h_rt, memory) writes nothing and is judged by qacct.
Every qsub line is appended to logs/cluster/submit.log.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

LOG_ROOT = Path("logs/cluster")
STATUS_DIR = Path(".snakemake/scc_status")
NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


class SubmitError(RuntimeError):
    pass


def read_properties(jobscript: str) -> dict:
    text = Path(jobscript).read_text()
    m = re.search(r"^# properties = (.*)$", text, flags=re.M)
    if not m:
        raise SubmitError(f"{jobscript}: no '# properties = ...' line (not a Snakemake job script?)")
    return json.loads(m.group(1))


def _int(value, what: str) -> int | None:
    if value in (None, "", "None"):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise SubmitError(f"resource {what}={value!r} is not a number") from None


def h_rt(minutes: int) -> str:
    return f"{minutes // 60}:{minutes % 60:02d}:00"


def mem_per_core(mem_mb: int, slots: int) -> str:
    """SCC memory request per slot in MB, rounded up: the job may use slots x mem_per_core in total.

    Grid Engine compares it with each node's memory per core (SCC nodes: 3G ... 28G), so a job whose
    mem_mb / threads exceeds the largest node never starts: give such a rule more threads instead.
    """
    return f"{max(1, math.ceil(mem_mb / slots))}M"


def job_name(props: dict) -> str:
    base = props.get("rule") or f"group.{props.get('groupid', 'job')}"
    wc = props.get("wildcards") or {}
    if wc:
        base += "." + ".".join(str(v) for v in wc.values())
    name = "cfaudit." + NAME_BAD.sub("_", base)
    return name[:200]


def qsub_args(props: dict, env: dict | None = None) -> list[str]:
    """The qsub options for a job's properties (pure; unit-tested)."""
    env = os.environ if env is None else env
    res = props.get("resources") or {}
    threads = max(1, int(props.get("threads") or 1))
    name = job_name(props)
    rule_dir = props.get("rule") or "group"
    args = ["-terse", "-cwd", "-V", "-j", "y", "-S", "/bin/bash", "-N", name,
            "-o", f"{LOG_ROOT}/{rule_dir}/{name}.$JOB_ID.log"]

    project = res.get("sge_project") or env.get("SCC_PROJECT")
    if project:
        args += ["-P", str(project)]
    if threads > 1:
        args += ["-pe", "omp", str(threads)]
    runtime = _int(res.get("runtime"), "runtime")
    if runtime:
        args += ["-l", f"h_rt={h_rt(runtime)}"]
    mem = _int(res.get("mem_mb"), "mem_mb")
    if mem:
        args += ["-l", f"mem_per_core={mem_per_core(mem, threads)}"]
    gpus = _int(res.get("gpu"), "gpu") or 0
    if gpus > 0:
        args += ["-l", f"gpus={gpus}"]
        if res.get("gpu_c") not in (None, "", "None"):
            args += ["-l", f"gpu_c={res['gpu_c']}"]
        if res.get("gpu_memory") not in (None, "", "None"):
            args += ["-l", f"gpu_memory={res['gpu_memory']}"]
    extra = res.get("sge_extra")
    if extra:
        args += shlex.split(str(extra))
    return args


def wrapped_script(jobscript: str, status_dir: Path) -> Path:
    """Copy of the job script with an EXIT trap recording the exit code (Grid Engine spools the copy)."""
    text = Path(jobscript).read_text()
    lines = text.splitlines(keepends=True)
    shebang = lines[0] if lines and lines[0].startswith("#!") else "#!/bin/bash\n"
    body = lines[1:] if lines and lines[0].startswith("#!") else lines
    exit_file = f"{status_dir.resolve()}/$JOB_ID.exit"
    trap = f"trap 'echo $? > \"{exit_file}\"' EXIT\n"
    out = status_dir / ("job." + Path(jobscript).name)
    out.write_text(shebang.replace("/bin/sh", "/bin/bash") + trap + "".join(body))
    out.chmod(0o755)
    return out


def attempt_of(jobscript: str) -> str:
    m = re.search(r"--attempt[ =](\d+)", Path(jobscript).read_text())
    return m.group(1) if m else "?"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: scc_submit.py JOBSCRIPT (called by snakemake's cluster-generic executor)", file=sys.stderr)
        return 2
    jobscript = argv[1]
    try:
        props = read_properties(jobscript)
        args = qsub_args(props)
    except SubmitError as e:
        print(f"scc_submit.py: {e}", file=sys.stderr)
        return 2
    rule_dir = LOG_ROOT / (props.get("rule") or "group")
    rule_dir.mkdir(parents=True, exist_ok=True)
    STATUS_DIR.mkdir(parents=True, exist_ok=True)
    script = wrapped_script(jobscript, STATUS_DIR)
    cmd = ["qsub", *args, str(script)]
    if not (props.get("resources") or {}).get("sge_project") and not os.environ.get("SCC_PROJECT"):
        print("scc_submit.py: no project (-P): set SCC_PROJECT or the resource sge_project if your "
              "account belongs to several SCC projects", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = shlex.join(cmd)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    if proc.returncode != 0:
        with open(LOG_ROOT / "submit.log", "a") as fh:
            fh.write(f"{stamp}\tFAILED\trule={props.get('rule')}\tattempt={attempt_of(jobscript)}\t{line}\n")
        print(f"scc_submit.py: qsub failed (exit {proc.returncode}): {proc.stderr.strip()}\n  {line}", file=sys.stderr)
        return proc.returncode
    jobid = proc.stdout.strip().splitlines()[0].split(".")[0] if proc.stdout.strip() else ""
    if not jobid.isdigit():
        print(f"scc_submit.py: cannot read a job id from qsub output {proc.stdout!r}", file=sys.stderr)
        return 1
    with open(LOG_ROOT / "submit.log", "a") as fh:
        fh.write(f"{stamp}\t{jobid}\trule={props.get('rule')}\tattempt={attempt_of(jobscript)}\t{line}\n")
    print(jobid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
