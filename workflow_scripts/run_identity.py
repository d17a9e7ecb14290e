"""Entry script of rule run_identity: results/run_identity.json and the report's landing page."""

from cfaudit.report import write_run_identity
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    identity = write_run_identity(dict(smk.config), smk.input.template, smk.output.identity, smk.output.front_page)
    log.info("commit %s (uncommitted changes: %s), config sha256 %s", identity["git_commit"], identity["git_dirty"],
             identity["config_sha256"])
