"""`ParallelDims`: the parallel layout as numbers, and the one named DeviceMesh built from it.

Mesh axes, outermost first: ("pp", "edp", "ep", "tp"). Data parallelism is the flattened
("edp", "ep") axis "dp": dense parameters are sharded/replicated over "dp"; each expert lives on
one "ep" rank and its gradients are reduced over "edp" (= dp / ep). Components ask for these
meshes by name instead of building process groups. The layout is validated before any process
group exists, in `trainer/layout.py`; here it is assumed valid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert."""
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Meshes:
    """Sub-meshes of one root mesh; a dimension of size 1 still has its (trivial) mesh."""

    root: DeviceMesh
    pp: DeviceMesh
    dp: DeviceMesh
    edp: DeviceMesh
    ep: DeviceMesh
    tp: DeviceMesh
    dp_ep: DeviceMesh  # ("edp", "ep") as a 2-D mesh: the experts' data-parallel x expert layout

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self.pp.get_local_rank()


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    """Create the root mesh over all ranks (the default process group must exist)."""
    assert dist.is_initialized() and dist.get_world_size() == dims.world_size
    root = init_device_mesh(
        device_type, (dims.pp, dims.edp, dims.ep, dims.tp), mesh_dim_names=("pp", "edp", "ep", "tp")
    )
    dp = root["edp", "ep"]._flatten("dp")
    return Meshes(
        root=root,
        pp=root["pp"],
        dp=dp,
        edp=root["edp"],
        ep=root["ep"],
        tp=root["tp"],
        dp_ep=root["edp", "ep"],
    )


def init_distributed(dims: ParallelDims, backend: str, timeout_s: float = 600.0) -> Meshes:
    """Join the torchrun job (env:// rendezvous) and build the meshes. `backend` auto: NCCL when
    this process has a GPU, else gloo; each rank uses the GPU of its LOCAL_RANK. A collective
    blocked for `timeout_s` raises instead of hanging (the trainer passes
    `fault.collective_timeout_s` plus a margin: its watchdog reports the phase first)."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return build_meshes(dims, "cuda" if use_cuda else "cpu")
