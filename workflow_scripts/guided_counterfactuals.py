"""Entry script of rule guided_counterfactuals: classifier-guided counterfactuals of one shard of the eval anchors."""

from cfaudit.config import run_settings
from cfaudit.guided import run_guided_shard
from cfaudit.runtime import job_device, script_logging, seed_everything

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    seed_everything(smk.params.seed)  # the images draw only from per-anchor generators; this pins anything else
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    run_guided_shard(checkpoint=smk.input.checkpoint, classifier_spec=smk.input.classifier, pack=smk.input.pack,
                     pack_index=smk.input.index, anchors_csv=smk.input.anchors, out_index=smk.output.index,
                     out_dir=smk.output.images, shard=int(smk.wildcards.shard), n_shards=smk.params.n_shards,
                     cfg=run_settings(smk.params.guided, smk.config, "guided"), seed=smk.params.seed, device=device,
                     precision=smk.params.precision, channels_last=smk.params.channels_last,
                     generator=smk.wildcards.generator, robust_spec=getattr(smk.input, "robust", None))
