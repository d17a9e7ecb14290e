"""Entry script of rule realism: FID/KID (pytorch-fid Inception) or, without its weights, an oracle's feature FD/KID."""

from pathlib import Path

from cfaudit.config import run_settings
from cfaudit.metrics_stage import make_realism
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    indexes = dict(zip(smk.params.generators, smk.input.indexes))
    feature_spec = smk.input.feature_spec[0] if len(smk.input.feature_spec) else None
    _, info = make_realism(smk.input.status, indexes, smk.input.pack, smk.input.pack_index, smk.input.split,
                           smk.input.anchors, smk.input.spec, feature_spec,
                           run_settings(smk.params.fid, smk.config, "metrics.fid"), smk.params.seed,
                           smk.params.resolution, device, Path(smk.input.status).parent, smk.output.csv,
                           smk.output.html, smk.output.features)
    read = info.pop("read_files")
    write_job_provenance(smk, [smk.output.csv, smk.output.html], started, extra={"realism": info}, read=read)
