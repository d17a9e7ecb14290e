"""The HTML report's front page and tables.

``snakemake --report results/report.html --report-metadata rules/report/metadata.yaml`` shows the git
commit and the config hash on the report's landing page: rules/metrics.smk calls :func:`export_run_identity`
while the workflow is parsed (same process as the report), and the YTE template rules/report/metadata.yaml
reads the values back from the environment. Tables are written as small standalone HTML files so the
report shows them inline with their captions.
"""

from __future__ import annotations

import html
import os

import numpy as np
import pandas as pd

from cfaudit.provenance import code_version, config_sha256

ENV_COMMIT = "CFAUDIT_GIT_COMMIT"
ENV_DIRTY = "CFAUDIT_GIT_DIRTY"
ENV_CONFIG = "CFAUDIT_CONFIG_SHA256"


def run_identity(config: dict) -> dict:
    """``{git_commit, git_dirty, config_sha256}`` of this checkout and (validated, defaults-filled) config."""
    code = code_version()
    commit = code.get("commit") or f"none ({code.get('note', 'unknown')})"
    dirty = code.get("dirty")
    return {"git_commit": commit, "git_dirty": "unknown" if dirty is None else ("yes" if dirty else "no"),
            "config_sha256": config_sha256(config)}


def export_run_identity(config: dict) -> dict:
    """Put :func:`run_identity` into the environment for the report's metadata template."""
    ident = run_identity(config)
    os.environ[ENV_COMMIT] = ident["git_commit"]
    os.environ[ENV_DIRTY] = ident["git_dirty"]
    os.environ[ENV_CONFIG] = ident["config_sha256"]
    return ident


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
