"""Entry script of rule traits_features: segmentation and features of the originals or of one generator's
counterfactuals."""

from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.stage import features_step

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    part = smk.wildcards.part
    generators = [] if part == "original" else [part]
    table = features_step(smk.input.anchors, smk.input.pack_index, smk.input.split, list(smk.input.indexes),
                          generators, dict(smk.params.features), smk.output.features, workers=smk.threads, part=part)
    write_job_provenance(smk, [smk.output.features], started, read=table["path"])
    log.info("wrote %s (%d images)", smk.output.features, len(table))
