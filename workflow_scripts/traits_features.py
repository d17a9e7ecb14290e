"""Entry script of rule traits_features: segmentation and features of anchors, originals, counterfactuals."""

from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.stage import features_step

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = smk.params
    table = features_step(smk.input.anchors, smk.input.pack_index, smk.input.split, list(smk.input.indexes),
                          list(p.generators),
                          {"originals": p.originals, "segmentation": p.segmentation, "colours": p.colours, "skin": p.skin},
                          smk.output.features, workers=smk.threads)
    write_job_provenance(smk, [smk.output.features], started, read=table["path"])
    log.info("wrote %s (%d images)", smk.output.features, len(table))
