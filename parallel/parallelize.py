"""`parallelize()`: build this rank's part of the model for a parallel layout.

Order (each step only sees the plain model plus what earlier steps did):
  1. build the whole model on the meta device (no memory, layout-independent parameter names);
  2. pipeline parallel: keep only this rank's stages (pruned copies, same parameter names);
  3. expert parallel: shard experts over "ep", install the all-to-all dispatcher;
  4. tensor parallel: DTensor plans over "tp" (+ sequence parallel);
  5. activation checkpointing (none | full | selective), as hooks: parameter names unchanged;
  6. data parallel: FSDP2 over "dp" (experts over "edp"), still on meta;
  7. materialise (`to_empty`) and `init_weights(seed)`: every rank computes the single-process
     initial values and keeps its slice, so all layouts start from the same weights;
  8. DDP (if chosen instead of FSDP) wraps the materialised model, its gradient sync going through
     the configured compressor; MoE token counts are summed over "dp" for the global-batch
     balancing loss and the expert-bias update;
  9. pipeline schedule over the stage modules.
With `parallel.engine=deepspeed` steps 6 and 8 are left out: `ParallelModel.wrap_optimizer` hands
the model to DeepSpeed's ZeRO with the optimizer (parallel/deepspeed_engine.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model import ModelConfig, Transformer
from model.moe import MoE
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compression import Compressor, compressor_from_config
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_ddp, apply_fsdp, clip_grads_, sync_expert_grads
from parallel.dims import Meshes, ParallelDims
from parallel.expert import apply_expert_parallel


@dataclass
class ParallelModel:
    """This rank's model chunks and the layout they live in; what the trainer steps through."""

    parts: list[nn.Module]  # one per pipeline stage held by this rank (FSDP/DDP-wrapped Transformers)
    stage_ids: list[int]
    num_stages: int
    dims: ParallelDims
    meshes: Meshes | None
    dp_engine: str = "fsdp"
    schedule: object | None = None  # torch.distributed.pipelining schedule when pp > 1
    pipeline_loss: object | None = None  # its loss callable (holds the step's token denominator)
    compressor: Compressor | None = None  # DDP's gradient sync (dense hook + expert sync)
    _moe: list[MoE] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._moe = [m for part in self.parts for m in part.modules() if isinstance(m, MoE)]

    @property
    def transformers(self) -> list[Transformer]:
        return [p.module if isinstance(p, DistributedDataParallel) else p for p in self.parts]

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def finish_grad_sync(self) -> None:
        """After the step's backward: DDP leaves expert gradients to us (FSDP reduced everything)."""
        if self.compressor is not None:
            for model in self.transformers:
                sync_expert_grads(model, self.meshes, self.compressor)

    def second_moment_source(self) -> Callable[[nn.Parameter], torch.Tensor | None] | None:
        """For the optimizer, with `parallel.compression.second_moment=factored`: parameter -> the
        compressor's estimate of its squared gradient this step (None while it sends exact sums)."""
        compressor = self.compressor
        if compressor is None or not compressor.factored_second_moment:
            return None
        # The compressor keys by name in the unwrapped model, as the DDP hook and expert sync do.
        names = {p: name for model in self.transformers for name, p in model.named_parameters()}
        return lambda p: compressor.second_moments.get(names[p])

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    # What the step does through the data-parallel engine (the DeepSpeed engine overrides these).
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grads_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global gradient norm of `max_norm` (0 = no clipping); returns the norm."""
        return clip_grads_(self.parameters(), max_norm, self.group("pp"))

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def group(self, name: str) -> dist.ProcessGroup | None:
        """Process group of a mesh dimension, or None when that dimension has size 1."""
        if self.meshes is None or getattr(self.dims, name) == 1:
            return None
        return getattr(self.meshes, name).get_group()

    # MoE bookkeeping across this rank's stages.
    def set_aux_loss_scale(self, scale: float) -> None:
        for moe in self._moe:
            moe.aux_loss_scale = scale

    def end_of_step(self) -> None:
        for moe in self._moe:
            moe.end_of_step()

    def moe_stats(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for model in self.transformers:
            stats.update(model.moe_stats())
        return stats

    def step_aux_loss(self) -> torch.Tensor:
        """Sum over this rank's MoE layers of their aux losses accumulated during the step."""
        return sum((moe.step_aux_loss for moe in self._moe), torch.zeros(()))


def _all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor, group=group)
    return tensor


def parallelize(
    model_cfg: ModelConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    meshes: Meshes | None,
    device: torch.device,
    seed: int,
    num_microbatches: int,
    init_params: bool = True,
) -> ParallelModel:
    """`init_params=False` leaves the parameters unset (every rank would otherwise compute the
    full initial value of every tensor) for a caller that loads all of them next."""
    with torch.device("meta"):
        model = Transformer(model_cfg)  # 1
    stages: list[tuple[int, nn.Module]] = [(0, model)]
    num_stages = 1
    if dims.pp > 1:  # 2
        from parallel.pipeline import split_model

        stages = split_model(model, meshes.pp_rank, dims.pp, pcfg)
        num_stages = dims.pp * pcfg.pp_stages_per_rank
    dp_engine = "deepspeed" if pcfg.engine == "deepspeed" else pcfg.dp_engine
    compressor = None
    if dims.dp > 1 and dp_engine in ("ddp", "deepspeed"):  # deepspeed: the experts' sync only
        compressor = compressor_from_config(pcfg.compression)
    parts = []
    for _, part in stages:
        if dims.ep > 1:
            apply_expert_parallel(part, meshes.ep)  # 3
        if dims.tp > 1:
            from parallel.tensor import apply_tensor_parallel

            apply_tensor_parallel(part, meshes.tp, pcfg.sequence_parallel)  # 4
        apply_activation_checkpointing(part, pcfg.activation_checkpointing)  # 5
        if dims.dp > 1 and dp_engine == "fsdp":
            apply_fsdp(part, meshes)  # 6
        part.to_empty(device=device)  # 7
        part.init_weights(seed, params=init_params)
        if dims.dp > 1:
            dp_group = meshes.dp.get_group()
            for moe in (m for m in part.modules() if isinstance(m, MoE)):
                moe.reduce_counts = functools.partial(_all_reduce_sum, group=dp_group)  # 8
            if dp_engine == "ddp":
                part = apply_ddp(part, meshes, compressor)
        parts.append(part)
    pm_cls = ParallelModel
    if dp_engine == "deepspeed":  # the engine itself comes with the optimizer (wrap_optimizer)
        from parallel.deepspeed_engine import DeepSpeedParallelModel

        pm_cls = functools.partial(DeepSpeedParallelModel, zero_stage=pcfg.zero_stage)
    pm = pm_cls(parts, [s for s, _ in stages], num_stages, dims, meshes, dp_engine, compressor=compressor)
    if dims.pp > 1:  # 9
        from parallel.pipeline import TokenNormalizedLoss, build_schedule

        last = pm.transformers[pm.stage_ids.index(num_stages - 1)] if pm.has_last_stage else None
        pm.pipeline_loss = TokenNormalizedLoss(last)
        pm.schedule = build_schedule(
            list(zip(pm.stage_ids, parts)),
            num_stages,
            meshes.pp.get_group(),
            pcfg,
            num_microbatches,
            pm.pipeline_loss,
            device,
        )
    return pm
