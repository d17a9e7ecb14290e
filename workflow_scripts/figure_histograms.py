"""Entry script of rule score_histograms: classifier scores per target (per label for the originals)."""

from cfaudit.metrics_stage import make_histograms
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    make_histograms(smk.input.scores, smk.input.anchors, smk.input.spec, smk.params.generators, smk.output.png,
                    smk.params.figures["hist_bins"], smk.params.figures["dpi"])
    write_job_provenance(smk, [smk.output.png], started)
