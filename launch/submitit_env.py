"""A Hydra callback that turns a SLURM task started by the submitit launcher into a torch rank.

`python -m trainer -m hydra/launcher=submitit_slurm ...` (recipes/hydra/launcher/submitit_slurm.yaml)
starts `cluster.gpus_per_node` tasks on each of `cluster.nodes` nodes and runs the Hydra job in
every one of them, without torchrun. Before the job starts, this callback exports what torchrun
would have: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and
MASTER_PORT (`cluster.rdzv_port`), so `init_process_group("env://")` in the trainer just works.
Registered for every job in recipes/config.yaml; a no-op outside a submitit SLURM task, and under
torchrun (RANK already set).
"""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def slurm_torch_env(environ: dict[str, str], port: int) -> dict[str, str]:
    """The torch env:// variables of this SLURM task, from SLURM's own (via submitit)."""
    from submitit import JobEnvironment

    job = JobEnvironment()
    return {
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": environ.get("MASTER_PORT", str(port)),
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
    }


class SlurmTorchEnv(Callback):
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
            return
        # Not submitit's TorchDistributedEnvironment().export(): it also narrows
        # CUDA_VISIBLE_DEVICES to one GPU, while the trainer selects cuda:LOCAL_RANK itself.
        os.environ.update(slurm_torch_env(dict(os.environ), int(config.cluster.rdzv_port)))
