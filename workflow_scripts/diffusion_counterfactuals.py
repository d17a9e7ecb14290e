"""Entry script of rule diffusion_counterfactuals: SDEdit counterfactuals of one shard of the eval anchors."""

from cfaudit.config import run_settings
from cfaudit.diffusion.sdedit import run_counterfactual_shard
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    run_counterfactual_shard(checkpoint=smk.input.checkpoint, pack=smk.input.pack, pack_index=smk.input.index,
                             anchors_csv=smk.input.anchors, out_index=smk.output.index, out_dir=smk.output.images,
                             shard=int(smk.wildcards.shard), n_shards=smk.params.n_shards,
                             cf=run_settings(smk.params.counterfactual, smk.config, "diffusion.counterfactual"),
                             seed=smk.params.seed, device=device, precision=smk.params.precision,
                             channels_last=smk.params.channels_last)
