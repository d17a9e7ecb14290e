"""Entry script of rule train_gan: train the GAN baseline against the audited classifier (resumable)."""

import torch

from cfaudit.gan.training import run_train_gan
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import resolve_device, script_logging, seed_everything

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    torch.set_num_threads(smk.threads)
    seed = smk.params.seed
    seed_everything(seed)
    device = resolve_device(smk.params.compute["device"], smk.params.compute["allow_cpu_fallback"])
    record = run_train_gan(smk.input.pack, smk.input.index, smk.input.split, smk.input.classifier,
                           smk.output.checkpoint, smk.output.loss, smk.output.curve, smk.params.gan, seed, device,
                           smk.params.work_dir)
    write_job_provenance(smk, [smk.output.loss, smk.output.curve, smk.output.checkpoint], started, extra={"training": record})
    log.info("GAN trained: %s", record)
