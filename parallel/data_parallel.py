"""Data parallelism: FSDP2 (`fully_shard`, the default) or DDP (whose gradient sync goes through a
`parallel/compression` compressor), plus the gradient-norm helper that understands the resulting
mix of sharded and replicated gradients.

Gradients are SUMMED over data-parallel ranks, never averaged: each rank's loss is already
divided by the step's global token count (trainer/step.py), so the sum is the gradient of the
global loss. Dense parameters are reduced over "dp"; experts over "edp" (= dp / ep), because each
expert's gradient already holds the contributions of every token its ep group routed to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from model.moe import GroupedExperts
from parallel.compression import Compressor, compression_hook
from parallel.dims import Meshes


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks (also inside MTP modules): the unit of FSDP sharding."""
    from model.transformer import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def apply_fsdp(model: nn.Module, meshes: Meshes) -> None:
    """Shard per block (parameters all-gathered just in time, freed after use); experts get
    their own FSDP group on "edp" so their gradients are reduced over the right ranks."""
    for block in _blocks(model):
        if meshes.ep.size() > 1:  # without ep, experts are ordinary dense parameters of the block
            for experts in (m for m in block.modules() if isinstance(m, GroupedExperts)):
                fully_shard(experts, mesh=meshes.edp)
        fully_shard(block, mesh=meshes.dp)
    if getattr(model, "output", None) is not None:
        # Its own unit: under pipeline parallelism the loss calls it after the stage's forward.
        fully_shard(model.output, mesh=meshes.dp)
    fully_shard(model, mesh=meshes.dp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Plain SUM reduce-scatter (a divide factor other than the group size would need
            # PREMUL_SUM, which gloo lacks).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed-expert weight, named as in `model.named_parameters()`."""
    return [
        (f"{module_name}.{name}", param)
        for module_name, module in model.named_modules()
        if isinstance(module, GroupedExperts)
        for name, param in module.named_parameters()
    ]


def apply_ddp(model: nn.Module, meshes: Meshes, compressor: Compressor) -> DistributedDataParallel:
    """Replicate over "dp"; every dense gradient bucket is summed through `compressor` (a DDP comm
    hook). Expert weights are left out of DDP, with or without expert parallelism, and summed over
    "edp" by `sync_expert_grads` after the backward pass: there the compressor sees whole experts
    (so `moe_selective` can skip the ones that got no tokens), not DDP's arbitrary buckets."""
    expert_names = [name for name, _ in _expert_parameters(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    ddp = DistributedDataParallel(model, process_group=meshes.dp.get_group(), broadcast_buffers=False)
    ddp.register_comm_hook(meshes.dp.get_group(), compression_hook(compressor, model))
    return ddp


def sync_expert_grads(model: nn.Module, meshes: Meshes, compressor: Compressor) -> None:
    """DDP path only (FSDP reduces experts itself): sum each expert weight's gradient (this rank's
    experts: `[E_local, ...]`) over its expert-data-parallel replicas, through `compressor`."""
    group = meshes.edp.get_group() if meshes.edp.size() > 1 else None
    if group is None:
        return
    for name, param in _expert_parameters(model):
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            grad.copy_(compressor.all_reduce_sum_experts(grad, group, name))


@contextlib.contextmanager
def maybe_no_grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-batch of a step (gradient accumulation)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        yield
    elif isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    elif hasattr(model, "set_gradient_accumulation_boundary"):  # a DeepSpeed engine
        model.set_gradient_accumulation_boundary(sync)
        yield
    else:
        yield


def grad_norm(params: Iterable[nn.Parameter], pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global L2 norm of all gradients. DTensor gradients are grouped by (mesh, placements) so
    each group costs one reduction; pipeline stages then sum their squares."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else ("local",)
            groups.setdefault(key, []).append(g)
    squares = []
    for grads in groups.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total_sq = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def clip_grads_(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm` (0 = no clipping); returns the
    norm before clipping."""
    norm = grad_norm(params, pp_group)
    if max_norm > 0:
        scale = min(1.0, max_norm / (float(norm) + 1e-6))  # one host sync per step
        if scale < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
    return norm
