"""Entry script of rule gather_traits_features: results/traits/features.csv from the per-part tables."""

from cfaudit.files import write_csv
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.stage import gather_features

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    table = gather_features(list(smk.input.parts), smk.input.anchors, list(smk.params.generators))
    write_csv(table, smk.output.features)
    write_job_provenance(smk, [smk.output.features], started, read=table["path"])  # the images the parts measured
    log.info("wrote %s (%d images)", smk.output.features, len(table))
