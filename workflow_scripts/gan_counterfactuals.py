"""Entry script of rule gan_counterfactuals: benign and malignant counterfactuals of one shard of the anchors."""

import torch

from cfaudit.gan.generate import generate_shard
from cfaudit.runtime import resolve_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    torch.set_num_threads(smk.threads)
    device = resolve_device(smk.params.compute["device"], smk.params.compute["allow_cpu_fallback"])
    generate_shard(smk.input.checkpoint, smk.input.classifier, smk.input.pack, smk.input.index, smk.input.anchors,
                   smk.params.shard, smk.params.n_shards, smk.params.out_dir, smk.params.gan, device)
