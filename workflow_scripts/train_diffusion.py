"""Entry script of rule train_diffusion: train (or resume) the class-conditional diffusion model."""

from cfaudit.config import run_settings
from cfaudit.diffusion.stage import run_training
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    # resources.train_diffusion.gpus (the scheduler's `gpu` resource) > 1: one DDP process per GPU under torchrun
    world_size = max(1, int(getattr(smk.resources, "gpu", 1) or 1))
    run_training(pack=smk.input.pack, pack_index=smk.input.index, split=smk.input.split,
                 checkpoint_out=smk.output.checkpoint, loss_csv=smk.output.loss, loss_png=smk.output.curve,
                 cfg=run_settings(smk.params.diffusion, smk.config, "diffusion"), image_size=smk.params.image_size, seed=smk.params.seed, device=device,
                 world_size=world_size, threads=smk.threads)
