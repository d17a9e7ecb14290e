"""Entry script of rule table1: Table 1 (CSV, Markdown, HTML) with bootstrap intervals."""

from cfaudit.metrics_stage import make_table1
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    make_table1(smk.input.scores, smk.input.anchors, smk.input.spec, smk.params.generators, smk.params.bootstrap,
                smk.params.seed, smk.output.csv, smk.output.md, smk.output.html,
                dict(zip(smk.params.oracles, smk.input.oracle_scores)), dict(zip(smk.params.oracles, smk.input.oracle_specs)))
    write_job_provenance(smk, [smk.output.csv, smk.output.md, smk.output.html], started)
