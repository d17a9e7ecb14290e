"""The HTML report's front page and tables.

The landing page of ``snakemake --report results/report.html`` is ``results/report_front_page.rst``, written by
rule ``run_identity`` from the template rules/report/workflow.rst with the run's identity (git commit, dirty
flag, config sha256, package versions, device) appended as text. The identity is computed by that rule at run
time, never while the Snakefile is parsed (cluster jobs re-parse it). Snakemake 9's ``--report-metadata`` is
not used: it renders every string value through docutils' ``publish_parts`` and shows the resulting dict
("WHOLE ... ENCODING utf-8 ...") instead of the value. Tables are written as small standalone HTML files so the
report shows them inline with their captions.
"""

from __future__ import annotations

import html
import json
import os

import numpy as np
import pandas as pd

from cfaudit.files import atomic_write_text
from cfaudit.provenance import code_version, config_sha256, device_info, now, package_versions


def run_identity(config: dict) -> dict:
    """What identifies this run: git commit and dirty flag of the code, the (validated, defaults-filled)
    config's sha256, package versions, the device and when it was recorded."""
    code = code_version()
    dirty = code.get("dirty")
    return {"git_commit": code.get("commit") or f"none ({code.get('note', 'unknown')})",
            "git_dirty": "unknown" if dirty is None else ("yes" if dirty else "no"),
            "config_sha256": config_sha256(config), "packages": package_versions(),
            "device": device_info(query_torch=True), "recorded": now()}


def identity_rst(identity: dict) -> str:
    """The identity as an RST section for the report's landing page (plain text, no metadata dicts)."""
    rows = [("git commit", identity["git_commit"]), ("uncommitted changes", identity["git_dirty"]),
            ("config sha256", identity["config_sha256"]), ("recorded", identity["recorded"]),
            ("host", identity["device"].get("host")), ("GPU", identity["device"].get("gpu") or "none")]
    rows += [(name, version) for name, version in identity["packages"].items() if version]
    lines = ["", "", "Run identity", "------------", "",
             "Recorded by rule ``run_identity`` into ``results/run_identity.json``; each table and figure's "
             "``.prov.json`` sidecar records the same for the job that wrote it.", "",
             ".. list-table::", "   :widths: 25 75", ""]
    for key, value in rows:
        lines += [f"   * - {key}", f"     - ``{value}``"]
    return "\n".join(lines) + "\n"


def write_run_identity(config: dict, template: str | os.PathLike, identity_json, front_page) -> dict:
    """Write ``run_identity.json`` and the report's landing page (the template + the identity section)."""
    identity = run_identity(config)
    atomic_write_text(identity_json, json.dumps(identity, indent=2, default=str))
    with open(template, encoding="utf-8") as f:
        atomic_write_text(front_page, f.read().rstrip("\n") + identity_rst(identity))
    return identity


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def table_html(df: pd.DataFrame, title: str, notes: list[str] | None = None) -> str:
    """A standalone, dependency-free HTML page with one table (for the report)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>"
                     for row in df.itertuples(index=False))
    foot = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in (notes or []) if n)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;font-size:13px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 7px;text-align:right}} th{{background:#eee}}
td:first-child,th:first-child{{text-align:left}} .note{{color:#444;max-width:60em}}</style></head>
<body><h3>{html.escape(title)}</h3>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>{foot}</body></html>
"""
