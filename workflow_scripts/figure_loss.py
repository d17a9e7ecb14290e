"""Entry script of rule loss_figure: training-loss curves of the generators that train here (seed Figure 6)."""

from cfaudit.metrics_stage import make_loss_figure
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    paths = {name: smk.input.get(name) for name in smk.params.models}
    missing = make_loss_figure(paths, smk.output.png, smk.params.figures["dpi"])
    for name, reason in missing.items():
        log.info("no loss curve for %s: %s", name, reason)
    write_job_provenance(smk, [smk.output.png], started, extra={"not_plotted": missing})
