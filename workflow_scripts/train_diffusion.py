"""Entry script of rule train_diffusion: train (or resume) the class-conditional diffusion model."""

from cfaudit.diffusion.training import run_training
from cfaudit.runtime import resolve_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    import torch

    torch.set_num_threads(max(1, smk.threads))
    device = resolve_device(smk.params.compute["device"], smk.params.compute["allow_cpu_fallback"])
    # resources.train_diffusion.gpus (the scheduler's `gpu` resource) > 1: one DDP process per GPU under torchrun
    world_size = max(1, int(getattr(smk.resources, "gpu", 1) or 1))
    run_training(pack=smk.input.pack, pack_index=smk.input.index, split=smk.input.split,
                 checkpoint_out=smk.output.checkpoint, loss_csv=smk.output.loss, loss_png=smk.output.curve,
                 cfg=smk.params.diffusion, image_size=smk.params.image_size, seed=smk.params.seed, device=device,
                 world_size=world_size, threads=smk.threads)
