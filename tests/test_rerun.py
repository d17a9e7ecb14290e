"""Snakemake as the contract, on one real tiny run of every stage (all five generators, one oracle, traits, report):

* rerun scope: for each row of the "Rerunning stale stages" table in docs/reproducibility.md, `snakemake -n` with
  that one edit schedules exactly the rules the table lists (the docs are checked against the DAG, not the other
  way round);
  changing every run-only setting at once (cfaudit.config.RUN_ONLY_KEYS) schedules nothing;
* declared outputs: `--list-untracked` finds nothing under results/ beyond the insides of declared directory()
  outputs, and `--delete-all-output` leaves no file of the pipeline behind;
* the same numbers twice: rerunning everything after `--delete-all-output` gives byte-identical tables, images and
  arrays;
* the report renders: the landing page and the Table 1 page in headless Chromium show the run identity and the
  tables as text (screenshots saved beside the run).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ALL_STAGES_TINY, REPO, scheduled_jobs, snakemake, write_config

from cfaudit.config import RUN_ONLY_KEYS, deep_update, get, load_config

pytestmark = pytest.mark.slow

RESULT_SUFFIXES = (".csv", ".md", ".html", ".png", ".npy", ".npz", ".pt", ".json")
# Files that record when or how long something ran (not results): left out of the byte comparison.
TIMED = re.compile(r"(\.prov\.json|run_identity\.json|report_front_page\.rst|heldout\.json|history\.csv|"
                   r"diffusion/loss\.csv|gan/loss\.csv|fid_weights\.json)$")


def run(work: Path, *extra: str, config: Path | None = None, check: bool = True):
    return snakemake(work, config or work / "tiny.yaml", extra_args=["--max-threads", "1", *extra], check=check)


@pytest.fixture
def finished(all_stages_run) -> Path:
    return all_stages_run


# ---------------------------------------------------------------------------------------------------------
# Rerun scope, checked against the README's table
# ---------------------------------------------------------------------------------------------------------
def readme_rerun_table() -> list[tuple[str, object, dict[str, int | None]]]:
    """(dotted key, new value, {rule: job count or None}) of each row of docs/reproducibility.md's "Rerunning stale
    stages" (the README's table until the README was shortened)."""
    text = (REPO / "docs" / "reproducibility.md").read_text()
    section = text[text.index("## Rerunning stale stages"):]
    section = section[:section.index("\n## ", 5)]
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\| `([\w.]+): (.+?)` \| (.+?) \|$", line)
        if m:
            rules = {r: int(n) if n else None for r, n in re.findall(r"`(\w+)`(?: ×(\d+))?", m.group(3))}
            rows.append((m.group(1), yaml.safe_load(m.group(2)), rules))
    return rows


def variant(work: Path, name: str, change: dict) -> Path:
    cfg = deep_update(copy.deepcopy(ALL_STAGES_TINY), change)
    return write_config(work / name, cfg)


def dotted(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def changed_value(value):
    """Another valid value of a run-only setting (used to change them all at once)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value


def run_only_edit(config: dict) -> dict:
    edit = {"compute": {"device": "cpu", "allow_cpu_fallback": True},
            "resources": {name: {"threads": 1, "mem_mb": r["mem_mb"] + 1, "runtime": r["runtime"] + 1}
                          for name, r in config["resources"].items()}}
    for key in RUN_ONLY_KEYS:
        if key not in ("compute", "resources"):
            deep_update(edit, dotted(key, changed_value(get(config, key))))
    return edit


def test_the_readme_table_covers_the_issue_s_settings():
    keys = {k for k, _, _ in readme_rerun_table()}
    assert len(keys) >= 12
    assert {"compute.device", "diffusion.log_every", "metrics.figures.dpi", "diffusion.counterfactual.guidance",
            "classifier.trained.epochs", "gan.train.epochs", "guided.scales", "split.max_anchors",
            "counterfactuals.generators", "resize.mode", "metrics.bootstrap.resamples"} <= keys
    readme = (REPO / "docs" / "reproducibility.md").read_text()
    missing = [k for k in RUN_ONLY_KEYS if f"`{k}`" not in readme]
    assert not missing, f"README's run-only list lacks {missing}"


def test_an_unchanged_config_schedules_nothing(finished):
    assert scheduled_jobs(run(finished, "-n")) == {}


@pytest.mark.parametrize("key, value, rules", readme_rerun_table(), ids=lambda x: x if isinstance(x, str) else "")
def test_one_setting_reruns_exactly_the_rules_the_readme_lists(finished, key, value, rules):
    cfg = variant(finished, f"edit_{key}.yaml", dotted(key, value))
    jobs = scheduled_jobs(run(finished, "-n", config=cfg))
    scheduled = {r: n for r, n in jobs.items() if r not in ("all", "run_identity")}
    assert set(scheduled) == set(rules), f"{key}: {value!r} schedules {scheduled}, README says {rules}"
    counted = {r: n for r, n in rules.items() if n is not None}
    assert counted == {r: scheduled[r] for r in counted}, f"{key}: {value!r} job counts {scheduled}"
    assert ("run_identity" in jobs) == bool(rules)  # the run's record follows any rerun, and only a rerun


def test_every_run_only_setting_at_once_schedules_nothing(finished):
    edit = run_only_edit(load_config(REPO / "config.yaml", finished / "tiny.yaml"))
    proc = run(finished, "-n", config=variant(finished, "run_only.yaml", edit))
    assert scheduled_jobs(proc) == {}, proc.stdout[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Declared outputs, delete-all-output, the same numbers twice
# ---------------------------------------------------------------------------------------------------------
def declared_outputs(work: Path) -> tuple[set[str], list[str]]:
    """(files, directories) the DAG declares as outputs, from `snakemake --summary`."""
    proc = run(work, "--summary")
    files, dirs = set(), []
    for line in proc.stdout.splitlines()[1:]:
        path = line.split("\t")[0]
        if path and (work / path).is_dir():
            dirs.append(path.rstrip("/") + "/")
        elif path:
            files.add(path)
    return files, dirs


def result_digests(work: Path) -> dict[str, str]:
    out = {}
    for p in sorted((work / "results").rglob("*")):
        rel = str(p.relative_to(work))
        if p.is_file() and p.suffix in RESULT_SUFFIXES and not TIMED.search(rel):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_outputs_are_declared_cleaned_and_reproduced_byte_for_byte(finished, tmp_path):
    untracked = [line for line in run(finished, "--list-untracked").stdout.splitlines() if line.startswith("results/")]
    _, dirs = declared_outputs(finished)
    # Snakemake's --list-untracked does not look inside directory() outputs (dag.py list_untracked): those are
    # declared, so they are not untracked.
    undeclared = [p for p in untracked if not any(p.startswith(d) for d in dirs)]
    assert not undeclared, f"files under results/ that no rule declares: {undeclared}"
    assert any(d.startswith("results/counterfactuals/guided/shard_0/images") for d in dirs)

    first = result_digests(finished)
    assert len(first) > 150 and any(k.endswith("_to1.png") for k in first)
    saved = tmp_path / "first_run"
    shutil.copytree(finished / "results", saved / "results")
    run(finished, "--delete-all-output")
    left = [str(p.relative_to(finished)) for p in (finished / "results").rglob("*") if p.is_file()]
    left += [str(p.relative_to(finished)) for p in (finished / "resources").rglob("*") if p.is_file()]
    assert not left, f"--delete-all-output left pipeline files behind: {left[:20]}"

    run(finished)
    second = result_digests(finished)
    assert second.keys() == first.keys()
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, f"the same config gave different bytes in {differ}"


# ---------------------------------------------------------------------------------------------------------
# The report in a real browser
# ---------------------------------------------------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=600)
    path = shutil.which("chromium")
    if not path:
        pytest.fail("headless Chromium is needed for the report check: apt-get install chromium")
    return path


def browser(page: Path, out_dir: Path, name: str, script: str = "") -> tuple[str, str]:
    """(visible text, DOM) of ``page`` after its scripts ran (plus ``script``), and a screenshot ``name``.png."""
    if script:
        html = page.read_text()
        at = html.rindex("</body>")  # the last one: the report's scripts hold "</body>" in strings too
        html = f"{html[:at]}<script>{script}</script>{html[at:]}"
        page = page.with_name(f"{name}.html")
        page.write_text(html)
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={out_dir / 'profile'}",
            "--window-size=1400,1000", "--virtual-time-budget=5000"]
    subprocess.run([*args, f"--screenshot={out_dir / (name + '.png')}", page.as_uri()], capture_output=True,
                   timeout=120)
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)), dom


def test_report_renders_identity_and_tables_in_a_browser(finished):
    if not (finished / "results/metrics/table1.html").exists():
        run(finished)
    run(finished, "--report", "results/report.html")
    html = (finished / "results/report.html").read_text()
    block = html[html.index('<script id="results">'):]
    results = json.loads(block[block.index("{"):block.index("</script>")].strip().rstrip(";"))
    for name in ("table1.html", "judges.html", "fid.html", "closeness.html", "pr_diffusion.png", "roc_gan.png",
                 "score_histograms.png", "training_loss.png", "fid.png", "ranked.html"):
        entry = next(v for k, v in results.items() if k.endswith(name))
        assert len(entry["caption"]) > 200, name  # a caption saying what it shows and how it was made
    identity = json.loads((finished / "results/run_identity.json").read_text())
    landing, _ = browser(finished / "results/report.html", finished, "report_landing")
    assert "Run identity" in landing and identity["config_sha256"] in landing
    assert identity["git_commit"] in landing and f"uncommitted changes {identity['git_dirty']}" in landing
    assert "WHOLE" not in landing and "ENCODING" not in landing  # no docutils parts dict instead of values
    assert (finished / "report_landing.png").stat().st_size > 10_000

    # the Table 1 page: category "1. Table 1" with the table opened, as a click on its eye icon does
    table1 = next(k for k in results if k.endswith("table1.html"))
    show = (f"setTimeout(function(){{app.showCategory('1. Table 1'); app.setView({{navbarMode: 'subcategory', "
            f"category: '1. Table 1', subcategory: 'Other', content: 'html', "
            f"contentPath: results['{table1}'].data_uri, resultPath: '{table1}'}});}}, 500);")
    page, dom = browser(finished / "results/report.html", finished, "report_table1", show)
    assert "1. Table 1" in page and "Are the counterfactuals semantic?" in page and "Table 1" in page
    shown = re.search(r'<iframe[^>]*src="data:text/html;[^"]*?base64,([^"]+)"', dom)
    assert shown, "the Table 1 page shows no table"
    table_text = re.sub(r"<[^>]+>", " ", base64.b64decode(shown.group(1)).decode())
    assert "AUROC" in table_text and "flip rate benign→malignant" in table_text and "guided_noclf" in table_text
    assert (finished / "report_table1.png").stat().st_size > 10_000
