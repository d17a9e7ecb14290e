"""Entry script of rule realism_figure: FID (or classifier-feature FD) and KID per generator (seed Figure 11)."""

from cfaudit.metrics_stage import make_realism_figure
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    make_realism_figure(smk.input.csv, smk.output.png, smk.params.figures["dpi"])
    write_job_provenance(smk, [smk.output.png], started)
