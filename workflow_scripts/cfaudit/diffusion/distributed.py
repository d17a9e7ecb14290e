"""Multi-process training of the diffusion model: torch DistributedDataParallel launched by torchrun.

``launch_training(world_size, **train_kwargs)`` runs ``python -m torch.distributed.run --standalone
--nproc_per_node=N -m cfaudit.diffusion.distributed ARGS.json`` and returns rank 0's summary. Each process gets
one GPU (nccl) or, on a CPU-only machine, a share of the cores (gloo): the CPU path exists so that the
multi-process code is tested without GPUs. Every rank draws the same random numbers for the whole global batch
and trains on its slice (cfaudit.diffusion.training.draw_step / rank_slice), so N processes give the weights of
one process with the same global batch, up to floating-point summation order.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from cfaudit.diffusion.training import LOSS_COLUMNS, train_diffusion

log = logging.getLogger("cfaudit.diffusion")
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def launch_training(world_size: int, *, device, threads: int = 1, **train_kwargs) -> dict:
    """Train with ``world_size`` DDP processes (a subprocess group under torchrun); returns rank 0's summary."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"resources.train_diffusion.gpus = {world_size} but {torch.cuda.device_count()} GPU(s) are "
                           "visible to this job: ask the scheduler for that many GPUs (the profiles pass `gpu`) or "
                           "lower resources.train_diffusion.gpus")
    with tempfile.TemporaryDirectory(prefix="cfaudit-ddp-") as tmp:
        args = Path(tmp) / "args.json"
        summary = Path(tmp) / "summary.json"
        kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in train_kwargs.items()}
        args.write_text(json.dumps({"kwargs": kwargs, "device": device.type, "summary": str(summary)}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(max(1, threads // world_size))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "cfaudit.diffusion.distributed", str(args)]
        log.info("launching %d DDP training processes (%s): %s", world_size,
                 "nccl, one GPU each" if device.type == "cuda" else "gloo on the CPU", " ".join(cmd))
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not summary.exists():
            raise RuntimeError(f"distributed diffusion training failed (torchrun exit status {proc.returncode}); the "
                               "ranks' errors are above in this log. A rerun resumes from the last checkpoint.")
        res = json.loads(summary.read_text())
    res["history"] = pd.DataFrame(res["history"], columns=LOSS_COLUMNS)
    return res


def _worker(args_path: str) -> None:
    """One torchrun rank: join the process group, train on this rank's slices, rank 0 writes the summary."""
    spec = json.loads(Path(args_path).read_text())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = spec["device"] == "cuda"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank {rank}: %(message)s")
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        res = train_diffusion(**spec["kwargs"], device=device, rank=rank, world=world)
        if rank == 0:
            res = {**res, "history": res["history"].to_dict(orient="records")}
            Path(spec["summary"]).write_text(json.dumps(res, default=str))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
