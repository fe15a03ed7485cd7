"""Run a function on N real gloo ranks (separate processes) and collect each rank's result.

`run_ranks(world_size, fn, *args)` spawns `world_size` processes; each initialises the default
gloo process group over loopback, calls `fn(*args)` (a module-level function, so it can be
imported by the child), and saves its return value (tensors, numbers, lists, dicts) for the parent,
which loads it with `weights_only=True`. A rank that raises fails the whole call with its traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # Ranks share 2 cores: one intra-op thread each avoids oversubscription and keeps runs repeatable.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
