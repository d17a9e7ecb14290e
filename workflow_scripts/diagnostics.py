"""Entry script of rule diagnostics: survival of the audited classifier's verdicts, gamut and high frequencies."""

from cfaudit.judges_stage import make_diagnostics
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    device = job_device(smk.config["compute"], smk.threads)  # not a param: no rerun on a device change
    indexes = dict(zip(smk.params.generators, smk.input.indexes))
    make_diagnostics(smk.input.spec, indexes, smk.input.anchors, smk.input.pack, smk.input.pack_index, smk.input.split,
                     {**smk.params.diagnostics, "batch_size": smk.config["metrics"]["judges"]["diagnostics"]["batch_size"]},
                     device, smk.output.per_image, smk.output.gamut)
    write_job_provenance(smk, [smk.output.per_image], started)
