"""Rule train_diffusion's entry point: train in this process or under torchrun, then the loss table and figure.

Its own module because it picks between the one-process trainer (cfaudit.diffusion.training) and the DDP
launcher (cfaudit.diffusion.distributed), which itself imports the trainer: keeping the choice here leaves no
import cycle between the two.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cfaudit.diffusion.distributed import launch_training
from cfaudit.diffusion.training import train_config, train_diffusion
from cfaudit.files import write_csv
from cfaudit.provenance import now, write_provenance


def write_loss_outputs(history: pd.DataFrame, loss_csv, loss_png, title: str = "") -> None:
    """The per-epoch loss table and the loss-curve figure (seed Figure 6: MSE on eps vs epoch, log y)."""
    from cfaudit.figures import loss_figure

    write_csv(history, loss_csv)
    loss_figure({title or "Diffusion training loss vs epochs": (history[["epoch", "loss"]], "")}, loss_png, dpi=120,
                panel_title="{name}", ylabel="training loss (MSE on noise)")


def run_training(*, pack, pack_index, split, checkpoint_out, loss_csv, loss_png, cfg: dict, image_size: int, seed: int,
                 device, rule: str = "train_diffusion", on_step=None, world_size: int = 1, threads: int = 1) -> dict:
    """Entry point of rule train_diffusion: train/resume, then the loss table + figure, each with provenance.

    ``world_size`` > 1 trains with that many DDP processes under torchrun (cfaudit.diffusion.distributed).
    """
    started = now()
    state_path = Path(checkpoint_out).with_name("train_state.pt")
    kwargs = dict(pack=pack, pack_index=pack_index, split=split, checkpoint_out=checkpoint_out, state_path=state_path,
                  cfg=cfg, image_size=image_size, seed=seed)
    if world_size > 1:
        res = launch_training(world_size, device=device, threads=threads, **kwargs)
    else:
        res = train_diffusion(**kwargs, device=device, on_step=on_step)
    spec = res["spec"]
    title = (f"Diffusion training loss vs epochs\n({spec['arch']}, {res['parameters'] / 1e6:.2f} M parameters, "
             f"{image_size} px, T={cfg['T']})")
    write_loss_outputs(res["history"], loss_csv, loss_png, title)
    slice_ = {"diffusion": train_config(cfg), "image_size": image_size, "seed": seed}
    extra = {"training": {"steps": res["steps"], "resumed_from_step": res["resumed_from"], "precision": res["precision"],
                          "images_per_s_this_run": res["images_per_s"], "parameters": res["parameters"],
                          "fingerprint": res["fingerprint"], "data_on_device": res["on_device"],
                          "processes": res["world_size"]}}
    for out in (checkpoint_out, loss_csv, loss_png):
        write_provenance(out, [pack, pack_index, split], slice_, rule, started, extra)
    return res
