"""A checkpoint saved at one parallel layout resumes at others: a change of pipeline stages, of
expert parallelism, and of world size. The next step's loss equals the uninterrupted run's."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.data_parallel import clip_grads_
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import ParallelModel, parallelize
from tests.distributed.harness import run_ranks
from tests.distributed.test_layouts import (
    LAYOUTS,
    MICRO_BATCHES,
    OPTIM,
    SEED,
    Layout,
    global_batches,
    model_config,
)
from trainer.checkpoint import CheckpointWriter, ShardedModelOptimizer, latest_valid, restore
from trainer.optim import build_optimizer
from trainer.step import forward_backward

pytestmark = pytest.mark.slow

SAVED_AT = "dp2_ep2"  # 4 ranks: dp=4 with experts over ep=2
SAVE_STEP = 2
RESUME_AT = {"pp2_ep2": 4, "ep4": 4, "tp2": 2}  # layout -> world size


def build(layout: Layout) -> tuple[ParallelModel, torch.optim.Optimizer]:
    dims = ParallelDims(dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep)
    meshes = build_meshes(dims, "cpu") if dims.distributed else None
    pcfg = ParallelConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep, pp_schedule=layout.schedule)
    k = MICRO_BATCHES // layout.dp
    # Micro-batch balancing loss: the global-batch scope sums counts over the micro-batches the dp
    # ranks process together, so its value (not the checkpoint) depends on dp by definition.
    pm = parallelize(model_config(1.0, "micro_batch"), pcfg, dims, meshes, torch.device("cpu"), SEED, k)
    return pm, build_optimizer(torch.nn.ModuleList(pm.parts), OPTIM)


def step(pm: ParallelModel, optimizer: torch.optim.Optimizer, index: int) -> float:
    dp_rank = pm.meshes.dp_rank if pm.meshes else 0
    batches = global_batches()[index]
    mine = [batches[i * pm.dims.dp + dp_rank] for i in range(MICRO_BATCHES // pm.dims.dp)]
    losses = forward_backward(pm, mine, mtp_coef=0.0, device=torch.device("cpu"), autocast=nullcontext)
    clip_grads_(pm.parameters(), OPTIM.grad_clip, pm.group("pp"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pm.end_of_step()
    return float(losses.total)


def train_and_save(ckpt_dir: str) -> list[float]:
    pm, optimizer = build(LAYOUTS[SAVED_AT])
    losses = []
    for i in range(SAVE_STEP + 1):
        if i == SAVE_STEP:
            writer = CheckpointWriter(ckpt_dir, keep_last=0)
            writer.save(SAVE_STEP, {"model_optimizer": ShardedModelOptimizer(pm.parts, optimizer)}, {})
        losses.append(step(pm, optimizer, i))
    dist.barrier()
    return losses


def resume_and_step(ckpt_dir: str, names: list[str]) -> dict[str, float]:
    results = {}
    for name in names:
        pm, optimizer = build(LAYOUTS[name])
        _, path = latest_valid(ckpt_dir, report=print)
        restore({"model_optimizer": ShardedModelOptimizer(pm.parts, optimizer)}, path)
        results[name] = step(pm, optimizer, SAVE_STEP)
        dist.barrier()
    return results


def test_resume_at_other_layouts(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "ckpt")
    uninterrupted = run_ranks(LAYOUTS[SAVED_AT].world_size, train_and_save, ckpt)[0]
    by_world: dict[int, list[str]] = {}
    for name, world in RESUME_AT.items():
        by_world.setdefault(world, []).append(name)
    for world, names in by_world.items():
        resumed = run_ranks(world, resume_and_step, ckpt, names)[0]
        for name in names:
            assert resumed[name] == pytest.approx(uninterrupted[SAVE_STEP], rel=1e-5, abs=0), name
