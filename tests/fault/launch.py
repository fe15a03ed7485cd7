"""`torchrun -m trainer` for the fault tests: with `--max-restarts`, a fault spec in MOEFORGE_FAULT,
this checkout on PYTHONPATH, and a wall-clock limit; the result is returned, not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# A 4-rank job small enough for 2 CPU cores: 2 micro-batches per rank per step.
TINY = [
    "recipe=tiny_cpu",
    "model.vocab_size=512",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.val_batches=1",
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.val_every=0",
    "optim.warmup_steps=2",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
]


def tiny_job(run_dir: Path, dataset: Path, *overrides: str) -> list[str]:
    """TINY on `dataset`, writing to `run_dir`, with `overrides` (the layout, steps, faults)."""
    return [*TINY, f"run.dir={run_dir}", f"data.sources=[{{path:'{dataset}'}}]", *overrides]


def torchrun(
    nproc: int, args: list[str], cwd: Path, *, faults: str = "", max_restarts: int = 0, timeout: float = 300
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "MOEFORGE_FAULT": faults,
        # Without it a restarted attempt can read the dead attempt's gloo addresses from the store
        # torchrun shares with the workers, and fails in init_process_group (pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        "-m",
        "trainer",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's sharded part (model and optimizer state), as full tensors
    read in this one process: `python -m trainer.checkpoint convert` does the same for the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from trainer.checkpoint.manager import SHARDED
    from trainer.checkpoint.storage import JsonFileSystemReader, read_json_metadata

    metadata = read_json_metadata(step_dir / SHARDED)
    tensors = {
        fqn: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(tensors, storage_reader=JsonFileSystemReader(step_dir / SHARDED), no_dist=True)
    return tensors
