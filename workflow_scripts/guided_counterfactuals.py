"""Entry script of rule guided_counterfactuals: classifier-guided counterfactuals of one shard of the eval anchors."""

from cfaudit.guided import run_guided_shard
from cfaudit.runtime import resolve_device, script_logging, seed_everything

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    import torch

    torch.set_num_threads(max(1, smk.threads))
    seed_everything(smk.params.seed)  # the images draw only from per-anchor generators; this pins anything else
    device = resolve_device(smk.params.compute["device"], smk.params.compute["allow_cpu_fallback"])
    run_guided_shard(checkpoint=smk.input.checkpoint, classifier_spec=smk.input.classifier, pack=smk.input.pack,
                     pack_index=smk.input.index, anchors_csv=smk.input.anchors, out_index=smk.output.index,
                     out_dir=smk.params.out_dir, shard=smk.params.shard, n_shards=smk.params.n_shards,
                     cfg=smk.params.guided, seed=smk.params.seed, device=device, precision=smk.params.precision,
                     channels_last=smk.params.channels_last, generator=smk.params.generator)
