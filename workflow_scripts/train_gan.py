"""Entry script of rule train_gan: train the GAN baseline against the audited classifier (resumable)."""

from cfaudit.config import run_settings
from cfaudit.gan.training import run_train_gan
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import job_device, script_logging, seed_everything

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    seed = smk.params.seed
    seed_everything(seed)
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    record = run_train_gan(smk.input.pack, smk.input.index, smk.input.split, smk.input.classifier,
                           smk.output.checkpoint, smk.output.loss, smk.output.curve,
                           run_settings(smk.params.gan, smk.config, "gan"), seed, device,
                           smk.params.work_dir)
    write_job_provenance(smk, [smk.output.loss, smk.output.curve, smk.output.checkpoint], started, extra={"training": record})
    log.info("GAN trained: %s", record)
