"""Entry script of rule gan_counterfactuals: benign and malignant counterfactuals of one shard of the anchors."""

from cfaudit.config import run_settings
from cfaudit.gan.generate import generate_shard
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    generate_shard(smk.input.checkpoint, smk.input.classifier, smk.input.pack, smk.input.index, smk.input.anchors,
                   int(smk.wildcards.shard), smk.params.n_shards, smk.output.images,
                   run_settings(smk.params.gan, smk.config, "gan"), device, out_index=smk.output.index)
