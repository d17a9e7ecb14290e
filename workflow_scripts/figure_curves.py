"""Entry script of rule curve_figures: PR and ROC curves of one generator with the originals for reference."""

from cfaudit.metrics_stage import make_curves
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    info = make_curves(list(smk.input.scores), smk.input.anchors, smk.input.spec, smk.wildcards.generator, smk.output.pr,
                       smk.output.roc, smk.params.figures["dpi"])
    write_job_provenance(smk, [smk.output.pr, smk.output.roc], started, extra={"plotted": info})
