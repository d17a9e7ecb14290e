"""Cluster profiles (profiles/scc, profiles/slurm) proven against real schedulers on this machine's loopback.

The `cluster` tests install SLURM and Grid Engine from the Debian packages (tests/cluster/install.sh),
start a private single-node SLURM (munged, slurmctld, slurmd) and a single-node Grid Engine (qmaster,
execd) with a FAKE GPU and SCC-like complexes (tests/cluster/*_up.sh), run the tiny pipeline through
each profile the way a user types it, check what was submitted and what the scheduler granted, check
that a job the scheduler kills fails its Snakemake job (and is retried with more memory), and stop
exactly the daemons they started (tests/cluster/down.sh). They are skipped, with the reason, only where
the packages cannot be installed (not root, no apt, no network/mirror).

The fast tests at the bottom need no scheduler: the qsub line builder, the status script against
recorded Grid Engine output, and the profiles' static promises.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_CONFIG

HARNESS = REPO / "tests" / "cluster"
PROFILES = REPO / "profiles"

# What each scheduler must build. Short on purpose (every entry is a cluster job on a 2-core CI machine):
# the data stage, plus the first GPU rule (train_classifier: its script calls resolve_device). When
# stages are renamed or added, edit these constants, not the checks below.
TARGETS = ["results/data/anchors.csv", "results/classifier/trained/heldout.json"]
# Heavy rules and what the test config asks for them. resize gets MORE threads than this machine has
# cores: a submit line with fewer slots means something capped the rule's threads on the submit host.
RULE_RESOURCES = {
    "resize": {"threads": 3, "mem_mb": 3000, "runtime": 7, "gpus": 0},
    "train_classifier": {"threads": 2, "mem_mb": 2000, "runtime": 9, "gpus": 1},
}
GPU_RULE = "train_classifier"
KILL_RULE, KILL_TARGET = "resize", "results/data/pack.npy"  # the job the scheduler kills (then retried)
SGE_PROJECT = "cfaudit_test"  # defined by sge_up.sh; the profile reads $SCC_PROJECT


def cluster_config() -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    # The scheduler hands out a FAKE GPU (no device behind it): GPU rules demand a GPU (device cuda, as a
    # real cluster preset would) but may fall back to the CPU deliberately, loudly logged.
    cfg["compute"] = {"device": "cuda", "allow_cpu_fallback": True}
    cfg["resources"] = copy.deepcopy(RULE_RESOURCES)
    cfg["classifier"] = {"trained": {"input_size": 32, "epochs": 1, "batch_size": 16}}
    return cfg


def sh(cmd, env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def wait_until(what: str, fn, timeout: float, every: float = 0.5):
    t0 = time.monotonic()
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def cluster_state():
    """Install the packages once (skip if impossible); a state dir whose daemons are stopped at the end."""
    t0 = time.monotonic()
    proc = sh(["bash", str(HARNESS / "install.sh")], timeout=420, check=False)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().replace("CANNOT-INSTALL: ", "cannot install SLURM/Grid Engine: "))
    assert proc.returncode == 0, f"install.sh failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"[cluster] install: {time.monotonic() - t0:.1f}s ({proc.stdout.strip()})")
    state = Path(tempfile.mkdtemp(prefix="cfaudit-cluster."))  # /tmp: the munge user must traverse it
    state.chmod(0o755)
    try:
        yield state
    finally:
        t0 = time.monotonic()
        down = sh(["bash", str(HARNESS / "down.sh"), str(state)], timeout=180, check=False)
        print(f"[cluster] down: {time.monotonic() - t0:.1f}s\n{down.stdout}{down.stderr}")
        assert down.returncode == 0, f"down.sh could not stop every daemon:\n{down.stdout}\n{down.stderr}"
        for line in (state / "pids.stopped").read_text().splitlines():
            name, pid = line.split()
            assert not Path(f"/proc/{pid}/cmdline").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", \
                f"{name} ({pid}) still running after down.sh"
        shutil.rmtree(state, ignore_errors=True)  # kept (logs, configs) only when stopping failed


def base_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def sge_env(cluster_state, tmp_path_factory):
    t0 = time.monotonic()
    sh(["bash", str(HARNESS / "sge_up.sh"), str(cluster_state)], timeout=180)
    print(f"[cluster] Grid Engine up: {time.monotonic() - t0:.1f}s")
    # The one-time link of the README, in a private XDG config dir: `snakemake --profile scc` as typed.
    xdg = tmp_path_factory.mktemp("xdg")
    (xdg / "snakemake").mkdir()
    (xdg / "snakemake" / "scc").symlink_to(PROFILES / "scc")
    return base_env(SGE_ROOT="/var/lib/gridengine", SGE_CELL="default", XDG_CONFIG_HOME=str(xdg),
                    SCC_PROJECT=SGE_PROJECT, SCC_STATUS_GRACE="10")


@pytest.fixture(scope="module")
def slurm_env(cluster_state):
    t0 = time.monotonic()
    sh(["bash", str(HARNESS / "slurm_up.sh"), str(cluster_state)], timeout=180)
    print(f"[cluster] SLURM up: {time.monotonic() - t0:.1f}s")
    return base_env(SLURM_CONF=str(cluster_state / "slurm" / "slurm.conf"))


def snakemake_cmd(workdir: Path, profile_args: list[str], targets, extra=()) -> list[str]:
    """The user's command line (from the repo's Snakefile, profiles/default auto-loaded as usual)."""
    cfg = workdir / "cluster_config.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(cluster_config(), sort_keys=False))
    return [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), *profile_args, *extra, "--configfile", str(cfg)]


def assert_outputs(workdir: Path, log: Path, rc: int):
    assert rc == 0, f"snakemake through the profile failed ({rc}); tail of {log}:\n{log.read_text()[-5000:]}"
    missing = [t for t in TARGETS if not (workdir / t).exists()]
    assert not missing, f"outputs missing after a successful run: {missing}"


# ----------------------------------------------------------------------------------------- Grid Engine
SGE_SPEED = ["--seconds-between-status-checks", "2"]  # the profile's 30 s suits SCC, not a 2-minute test


def submit_lines(workdir: Path) -> list[dict]:
    """Parsed logs/cluster/submit.log written by profiles/scc/scc_submit.py."""
    out = []
    for line in (workdir / "logs/cluster/submit.log").read_text().splitlines():
        stamp, jobid, rule, attempt, cmd = line.split("\t")
        out.append({"jobid": jobid, "rule": rule.split("=", 1)[1], "attempt": attempt.split("=", 1)[1],
                    "argv": shlex.split(cmd), "line": cmd})
    return out


def opts(argv: list[str]) -> dict[str, list[str]]:
    """-l/-pe/-P values of a qsub argv: {'-l': ['h_rt=...', ...], '-pe': ['omp 3'], ...}."""
    found: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-pe":
            found.setdefault(a, []).append(f"{argv[i + 1]} {argv[i + 2]}")
            i += 3
            continue
        if a in ("-l", "-P", "-N", "-o"):
            found.setdefault(a, []).append(argv[i + 1])
            i += 2
            continue
        found.setdefault(a, []).append("")
        i += 1
    return found


@pytest.fixture(scope="module")
def pipeline_runs(sge_env, slurm_env, tmp_path_factory):
    """The tiny pipeline through both profiles AT THE SAME TIME (the runs mostly wait on status polling).

    Grid Engine: `snakemake --profile scc` exactly as typed after the README's link (profiles/default is
    loaded too, as for a user). SLURM: `--workflow-profile profiles/slurm` (the other documented form).
    """
    specs = {
        "sge": (sge_env, ["--profile", "scc"], SGE_SPEED),
        "slurm": (slurm_env, ["--workflow-profile", str(PROFILES / "slurm")], SLURM_SPEED),
    }
    started, t0 = {}, time.monotonic()
    for name, (env, profile_args, speed) in specs.items():
        wd = tmp_path_factory.mktemp(f"{name}_run")
        log = wd / "snakemake.out"
        fh = open(log, "w")
        proc = subprocess.Popen(snakemake_cmd(wd, profile_args, TARGETS, speed), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=wd, stdin=subprocess.DEVNULL)
        started[name] = (proc, fh, wd, log)
    runs = {}
    for name, (proc, fh, wd, log) in started.items():
        try:
            rc = proc.wait(timeout=max(1.0, 480 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        fh.close()
        runs[name] = (wd, log, rc)
        print(f"[cluster] {name} pipeline run finished after {time.monotonic() - t0:.1f}s (rc {rc})")
    return runs


@pytest.fixture(scope="module")
def sge_run(pipeline_runs):
    return pipeline_runs["sge"]


@pytest.mark.cluster
@pytest.mark.slow
def test_scc_profile_runs_pipeline_on_grid_engine(sge_run, sge_env):
    wd, log, rc = sge_run
    assert_outputs(wd, log, rc)
    lines = submit_lines(wd)
    rules = {x["rule"] for x in lines}
    assert {"synthetic_dataset", "resize", "split", "anchors", GPU_RULE} <= rules, rules
    for x in lines:
        o = opts(x["argv"])
        print(f"[cluster] qsub {x['rule']}: {x['line']}")
        assert "-V" in o and "-cwd" in o, x["line"]  # environment exported
        assert o["-P"] == [SGE_PROJECT], x["line"]
        assert o["-o"][0].startswith(f"logs/cluster/{x['rule']}/"), x["line"]
        want = RULE_RESOURCES.get(x["rule"], {"threads": 1, "runtime": 60, "mem_mb": 2000, "gpus": 0})
        slots = want["threads"]
        if slots > 1:
            assert o.get("-pe") == [f"omp {slots}"], (
                f"{x['rule']} declares {slots} threads but was submitted with {o.get('-pe')}: something capped "
                f"its threads on the submit host (profiles/default must not set `cores`)\n{x['line']}")
        else:
            assert "-pe" not in o, x["line"]
        rt = want["runtime"]
        assert f"h_rt={rt // 60}:{rt % 60:02d}:00" in o["-l"], x["line"]
        per_core = -(-want["mem_mb"] // slots)
        assert f"mem_per_core={per_core}M" in o["-l"], x["line"]
        gpu = [v for v in o["-l"] if v.startswith(("gpus=", "gpu_c="))]
        assert gpu == (["gpus=1", "gpu_c=8.0"] if want["gpus"] else []), x["line"]
        # ... and what Grid Engine granted (accounting record of the finished job)
        acct = sh(["qacct", "-j", x["jobid"]], env=sge_env).stdout
        assert re.search(rf"^slots\s+{slots}\s*$", acct, re.M), acct
        assert re.search(r"^exit_status\s+0\s*$", acct, re.M), acct
        if want["gpus"]:
            assert re.search(r"^category\s.*gpus=1", acct, re.M), acct
        assert list((wd / "logs/cluster" / x["rule"]).glob(f"*.{x['jobid']}.log")), f"no cluster log for {x}"
    # the GPU rule checked for a GPU at start and, told it may, fell back to the CPU
    gpu_log = (wd / "logs/classifier/train_classifier.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=" in gpu_log and "allow_cpu_fallback is true" in gpu_log, gpu_log[-2000:]


@pytest.mark.cluster
@pytest.mark.slow
def test_scc_job_killed_by_grid_engine_fails_and_is_retried_with_more_memory(sge_run, sge_env):
    """qdel (the scheduler removes the job; no exit code, no accounting record) -> reported failed -> the
    profile's retry resubmits it with attempt-scaled memory -> the run completes."""
    wd, log, rc = sge_run
    assert rc == 0, "needs the pipeline run of the previous test"
    host = sh(["hostname", "-s"]).stdout.strip()
    n_before = len(submit_lines(wd))
    sh(["qmod", "-d", f"all.q@{host}"], env=sge_env)  # keep the job queued so it is deleted before it runs
    out = wd / "kill.out"
    cmd = snakemake_cmd(wd, ["--profile", "scc"], [KILL_TARGET], [*SGE_SPEED, "--forcerun", KILL_RULE, "--retries", "1"])
    t0 = time.monotonic()
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=sge_env, cwd=wd, stdin=subprocess.DEVNULL)
    try:
        first = wait_until("the first submission", lambda: submit_lines(wd)[n_before:], 90)[0]
        assert first["rule"] == KILL_RULE and first["attempt"] == "1", first
        sh(["qdel", first["jobid"]], env=sge_env)
        t_kill = time.monotonic()
        second = wait_until("the resubmission after the kill", lambda: submit_lines(wd)[n_before + 1:], 120)[0]
        print(f"[cluster] Grid Engine: killed job {first['jobid']} reported failed and resubmitted after "
              f"{time.monotonic() - t_kill:.1f}s")
        sh(["qmod", "-e", f"all.q@{host}"], env=sge_env)
        rc2 = proc.wait(timeout=180)
    finally:
        sh(["qmod", "-e", f"all.q@{host}"], env=sge_env, check=False)
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    print(f"[cluster] Grid Engine kill + retry run: {time.monotonic() - t0:.1f}s")
    assert rc2 == 0, text[-4000:]
    assert re.search(rf"Error in rule {KILL_RULE}", text) and "scc_status.py: job" in text, text[-4000:]
    assert second["rule"] == KILL_RULE and second["attempt"] == "2", second
    mem = [next(v for v in opts(x["argv"])["-l"] if v.startswith("mem_per_core=")) for x in (first, second)]
    per_core = -(-RULE_RESOURCES[KILL_RULE]["mem_mb"] // RULE_RESOURCES[KILL_RULE]["threads"])
    assert mem == [f"mem_per_core={per_core}M", f"mem_per_core={-(-2 * RULE_RESOURCES[KILL_RULE]['mem_mb'] // RULE_RESOURCES[KILL_RULE]['threads'])}M"], (
        f"attempt 2 must ask for twice the memory of attempt 1 (job_resources() in rules/common.smk scales "
        f"mem_mb by the attempt): {mem}")


# ------------------------------------------------------------------------------------------------ SLURM
# The plugin's first check comes after 40 s by default, then every 10 s more; --verbose logs the sbatch lines.
SLURM_SPEED = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2", "--verbose"]


def slurm_jobs(env) -> list[dict]:
    """Every job slurmctld still knows (MinJobAge=300 keeps finished ones), as scontrol's key=value."""
    out = sh(["scontrol", "show", "job", "-o"], env=env, check=False).stdout
    jobs = []
    for line in out.splitlines():
        if "JobId=" in line:
            jobs.append(dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)))
    return jobs


def sbatch_lines(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for m in re.finditer(r"^sbatch call: (sbatch .*?) --wrap=", text, re.M):
        rule = re.search(r"--comment (?:')?rule_(\w+)", m.group(1)).group(1)
        found.setdefault(rule, []).append(m.group(1))
    return found


@pytest.fixture(scope="module")
def slurm_run(pipeline_runs):
    return pipeline_runs["slurm"]


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_profile_runs_pipeline(slurm_run, slurm_env):
    wd, log, rc = slurm_run
    assert_outputs(wd, log, rc)
    calls = sbatch_lines(log.read_text())
    jobs = {j["Comment"].removeprefix("rule_"): j for j in slurm_jobs(slurm_env) if j.get("Comment", "").startswith("rule_")}
    assert {"synthetic_dataset", "resize", "split", "anchors", GPU_RULE} <= set(calls), sorted(calls)
    for rule, lines in calls.items():
        line = lines[-1]
        print(f"[cluster] sbatch {rule}: {line}")
        want = RULE_RESOURCES.get(rule, {"threads": 1, "runtime": 60, "mem_mb": 2000, "gpus": 0})
        assert f"--cpus-per-task={want['threads']}" in line, line
        assert f"-t {want['runtime']}" in line and f"--mem {want['mem_mb']}" in line, line
        assert ("--gpus=1" in line) == bool(want["gpus"]), line
        assert f"-p {'gpu' if want['gpus'] else 'cpu'}" in line, line  # partitions.yaml: GPU jobs -> gpu
        j = jobs[rule]  # what slurmctld granted
        assert j["JobState"] == "COMPLETED", j
        assert j["NumCPUs"] == str(want["threads"]) and j["Partition"] == ("gpu" if want["gpus"] else "cpu"), j
        assert j["MinMemoryNode"] == f"{want['mem_mb']}M", j
        assert ("gpu:1" in j.get("TresPerJob", "")) == bool(want["gpus"]), j
        assert list((wd / "logs/slurm" / f"rule_{rule}").rglob(f"{j['JobId']}.log")), f"no SLURM log for {rule}"
    gpu_log = (wd / "logs/classifier/train_classifier.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=0" in gpu_log, gpu_log[-2000:]  # SLURM handed the job its (fake) GPU
    assert "allow_cpu_fallback is true" in gpu_log, gpu_log[-2000:]


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_job_cancelled_by_scheduler_fails_and_is_retried_with_more_memory(slurm_run, slurm_env):
    wd, log, rc = slurm_run
    assert rc == 0, "needs the pipeline run of the previous test"
    part = "gpu" if RULE_RESOURCES[KILL_RULE]["gpus"] else "cpu"
    known = {j["JobId"] for j in slurm_jobs(slurm_env)}

    def new_jobs():
        return [j for j in slurm_jobs(slurm_env) if j["JobId"] not in known and j.get("Comment") == f"rule_{KILL_RULE}"]

    sh(["scontrol", "update", f"PartitionName={part}", "State=DOWN"], env=slurm_env)  # queued, never started
    out = wd / "kill.out"
    cmd = snakemake_cmd(wd, ["--workflow-profile", str(PROFILES / "slurm")], [KILL_TARGET],
                        [*SLURM_SPEED, "--forcerun", KILL_RULE, "--retries", "1"])
    t0 = time.monotonic()
    with open(out, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=slurm_env, cwd=wd, stdin=subprocess.DEVNULL)
    try:
        first = wait_until("the first submission", new_jobs, 90)[0]
        sh(["scancel", first["JobId"]], env=slurm_env)
        t_kill = time.monotonic()
        second = wait_until("the resubmission after the cancel", lambda: [j for j in new_jobs() if j["JobId"] != first["JobId"]], 120)[0]
        print(f"[cluster] SLURM: cancelled job {first['JobId']} reported failed and resubmitted after {time.monotonic() - t_kill:.1f}s")
        sh(["scontrol", "update", f"PartitionName={part}", "State=UP"], env=slurm_env)
        rc2 = proc.wait(timeout=180)
    finally:
        sh(["scontrol", "update", f"PartitionName={part}", "State=UP"], env=slurm_env, check=False)
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    print(f"[cluster] SLURM cancel + retry run: {time.monotonic() - t0:.1f}s")
    assert rc2 == 0, text[-4000:]
    assert re.search(rf"Error in rule {KILL_RULE}", text) and "CANCELLED" in text, text[-4000:]
    mem = [j["MinMemoryNode"] for j in (first, second)]
    base = RULE_RESOURCES[KILL_RULE]["mem_mb"]
    assert mem == [f"{base}M", f"{2 * base}M"], (
        f"attempt 2 must ask for twice the memory of attempt 1 (job_resources() in rules/common.smk scales "
        f"mem_mb by the attempt): {mem}")


# ------------------------------------------------------------------------- fast: no scheduler needed
sys.path.insert(0, str(PROFILES / "scc"))
sys.dont_write_bytecode, _dwb = True, sys.dont_write_bytecode  # no __pycache__ inside the profile folder
import scc_status  # noqa: E402
import scc_submit  # noqa: E402

sys.dont_write_bytecode = _dwb

SGE_OUT = HARNESS / "sge_outputs"  # recorded from Grid Engine 8.1.9 (tests/cluster/sge_up.sh)


def test_qsub_line_follows_scc_conventions():
    gpu = {"rule": "train_gan", "threads": 4, "wildcards": {},
           "resources": {"mem_mb": 16000, "runtime": 720, "gpu": 1, "gpu_c": "8.0", "gpu_memory": "40G"}}
    args = scc_submit.qsub_args(gpu, env={"SCC_PROJECT": "melanoma"})
    line = " ".join(args)
    assert "-V" in args and "-cwd" in args and "-P melanoma" in line and "-pe omp 4" in line
    assert "-l h_rt=12:00:00" in line and "-l mem_per_core=4000M" in line
    assert "-l gpus=1 -l gpu_c=8.0 -l gpu_memory=40G" in line
    assert "-o logs/cluster/train_gan/cfaudit.train_gan.$JOB_ID.log" in line
    cpu = {"rule": "split", "threads": 1, "wildcards": {"i": "0"}, "resources": {"mem_mb": 2000, "runtime": 60, "gpu_c": "8.0"}}
    line = " ".join(scc_submit.qsub_args(cpu, env={}))
    assert "-pe" not in line and "gpu" not in line and "-P" not in line  # gpu_c only matters with gpus
    assert "-N cfaudit.split.0" in line and "-l h_rt=1:00:00" in line and "-l mem_per_core=2000M" in line
    extra = {"rule": "x", "threads": 2, "resources": {"mem_mb": 1000, "sge_project": "p2", "sge_extra": "-l avx -q long"}}
    line = " ".join(scc_submit.qsub_args(extra, env={"SCC_PROJECT": "melanoma"}))
    assert "-P p2" in line and line.endswith("-l avx -q long") and "mem_per_core=500M" in line
    with pytest.raises(scc_submit.SubmitError, match="runtime"):
        scc_submit.qsub_args({"rule": "x", "resources": {"runtime": "soon"}}, env={})


@pytest.fixture
def fake_sge(tmp_path, monkeypatch):
    """qstat/qacct/qdel on PATH that print recorded Grid Engine output."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()

    def install(qstat: str | None, qacct: str | None, qstat_rc: int = 0):
        (bin_ / "qstat").write_text(f"#!/bin/sh\n{'cat ' + shlex.quote(qstat) if qstat else ':'}\nexit {qstat_rc}\n")
        (bin_ / "qacct").write_text(f"#!/bin/sh\n" + (f"cat {shlex.quote(qacct)}\n" if qacct else
                                    "echo 'error: job id $2 not found' >&2; exit 1\n"))
        (bin_ / "qdel").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/qdel.log\n")
        for f in bin_.iterdir():
            f.chmod(0o755)

    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return install


def test_status_reads_qstat_exit_file_qacct_and_gives_up_on_vanished_jobs(fake_sge, tmp_path, monkeypatch):
    states = str(SGE_OUT / "qstat_states.txt")
    fake_sge(states, None)
    assert scc_status.status("24") == "running"  # qw
    assert scc_status.status("23") == "failed"  # Eqw: never runs -> deleted
    assert (tmp_path / "qdel.log").read_text().split() == ["23"]
    fake_sge(None, str(SGE_OUT / "qacct_success.txt"))
    assert scc_status.status("22") == "success"
    for rec in ("qacct_qdel_running.txt", "qacct_h_rt.txt", "qacct_exit3.txt"):
        fake_sge(None, str(SGE_OUT / rec))
        assert scc_status.status("19") == "failed", rec
    exit_dir = tmp_path / ".snakemake/scc_status"
    exit_dir.mkdir(parents=True)
    (exit_dir / "31.exit").write_text("0\n")
    (exit_dir / "32.exit").write_text("1\n")
    fake_sge(None, None)
    assert scc_status.status("31") == "success" and scc_status.status("32") == "failed"
    monkeypatch.setenv("SCC_STATUS_GRACE", "30")
    assert scc_status.status("40", now=1000.0) == "running"  # vanished, no record yet: grace
    assert scc_status.status("40", now=1020.0) == "running"
    assert scc_status.status("40", now=1031.0) == "failed"
    fake_sge(None, None, qstat_rc=1)  # qmaster unreachable: cannot tell, ask again later
    assert scc_status.status("41") == "running"
    proc = subprocess.run([sys.executable, str(PROFILES / "scc/scc_status.py"), "24"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "running\n"  # one word, exit 0: what cluster-generic needs


def test_profiles_are_wired_as_documented():
    scc = yaml.safe_load((PROFILES / "scc/config.yaml").read_text())
    assert scc["executor"] == "cluster-generic" and scc["retries"] >= 1
    for key in ("cluster-generic-submit-cmd", "cluster-generic-status-cmd"):
        script = PROFILES / "scc" / scc[key]  # snakemake resolves a bare file name in the profile folder
        assert script.is_file() and os.access(script, os.X_OK), script
    slurm = yaml.safe_load((PROFILES / "slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["slurm-status-command"] == "squeue"
    assert (PROFILES / "slurm" / slurm["slurm-partition-config"]).is_file()


def test_default_profile_holds_no_cluster_settings():
    """profiles/default is loaded for every run and wins over --profile key by key (snakemake 9.27.1,
    observed; docs: snakemake.readthedocs.io, Executing → Command line → Profiles): anything
    there that shapes submissions silently overrides the cluster profiles. `cores` caps every rule's
    threads at the SUBMIT host's core count (-pe omp / --cpus-per-task shrink)."""
    default = yaml.safe_load((PROFILES / "default/config.yaml").read_text()) or {}
    cluster_keys = {"cores", "jobs", "executor", "default-resources", "set-resources", "set-threads", "resources",
                    "retries", "latency-wait", "max-threads", "local-cores", "config", "configfile", "configfiles"}
    cluster_keys |= {k for k in default if k.startswith(("cluster-generic-", "slurm-"))}
    bad = sorted(cluster_keys & set(default))
    assert not bad, f"profiles/default/config.yaml sets {bad}: these override --profile scc/slurm silently"
