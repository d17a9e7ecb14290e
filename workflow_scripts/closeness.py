"""Entry script of rule closeness: L1, L2, SSIM and share of changed pixels of each counterfactual vs its anchor."""

from cfaudit.metrics_stage import make_closeness
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    indexes = dict(zip(smk.params.generators, smk.input.indexes))
    _, read = make_closeness(indexes, smk.input.anchors, smk.params.closeness, smk.params.bootstrap, smk.params.seed,
                             smk.output.summary, smk.output.per_image, smk.output.html)
    write_job_provenance(smk, [smk.output.summary, smk.output.per_image, smk.output.html], started, read=read)
