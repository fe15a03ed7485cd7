"""DeepSpeed as the data-parallel engine (`parallel.engine=deepspeed`): ZeRO stage 1 (optimizer
state partitioned over "dp") or 2 (gradients too) for the dense parameters, composed with our expert
parallelism. Data parallelism only: pp = tp = 1, dp >= 2 (`trainer/layout.py` checks it).

Who does what:
- dense parameters (attention, dense FFNs, shared experts, routers, norms, embeddings) go to
  `deepspeed.initialize` with a torch AdamW (DeepSpeed's FusedAdam/CPUAdam compile C++ on first
  use); ZeRO sums their gradients over "dp" and steps its partition of them.
- routed experts are hidden from DeepSpeed: their gradients are summed over "edp" by
  `sync_expert_grads` through the configured compressor (DeepSpeed-MoE syncs experts over its
  expert-data-parallel group the same way; with ep consecutive ranks per group, its groups and ours
  coincide), and a second torch AdamW steps them. AdamW is per-parameter, so the split is exact;
  the expert optimizer state is replicated over "edp", not ZeRO-partitioned.
- `DeepSpeedOptimizer` is what the trainer, the LR scheduler and checkpoints hold: the native
  optimizer's param groups (decay, no decay) over every parameter. `step()` hands their
  hyper-parameters to the two AdamWs and steps both.

What makes it match the native engine step for step:
- sums, not means: `gradient_allreduce_op="sum"`, because every rank's loss is already divided by
  the global token count (trainer/step.py);
- gradient accumulation stays ours: DeepSpeed is told 1 step, the accumulation boundary is set per
  micro-batch (`maybe_no_grad_sync`), and `backward` passes `scale_wrt_gas=False`;
- clipping by the global norm of dense + expert gradients: ZeRO's norm (of the gradients it holds)
  is replaced by that global norm, so its clipping and its skip of a non-finite step act on the same
  number as the native `clip_grads_`; the experts are clipped here by the same factor;
- DeepSpeed broadcasts every parameter of the module it wraps from rank 0 when it starts; experts
  differ per ep rank (and c10d broadcast rejects DTensors), so they are detached while it wraps.

The DeepSpeed 1-bit optimizers (1-bit Adam, 0/1 Adam, 1-bit LAMB) are gone from DeepSpeed 0.19.8:
gradient compression is `parallel.compression`, applied on this engine to the expert-data-parallel
sync (ZeRO reduces the dense gradients itself). Checkpoints: `trainer/checkpoint/deepspeed.py`.
`deepspeed` is imported only when this engine is built (the import takes seconds).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from model.moe import GroupedExperts
from parallel.data_parallel import _expert_parameters, grad_norm
from parallel.parallelize import ParallelModel

ZERO_STAGES = (1, 2)


def deepspeed_config(zero_stage: int) -> dict[str, Any]:
    """The DeepSpeed config: only what differs from its defaults, each for a reason above."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the trainer feeds the micro-batches
        "gradient_accumulation_steps": 1,  # the trainer accumulates (boundary set per micro-batch)
        "gradient_allreduce_op": "sum",
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW
        "steps_per_print": None,
        "log_level": "warning",
    }


@contextlib.contextmanager
def _experts_detached(model: nn.Module) -> Iterator[None]:
    """Take the routed-expert parameters out of `model` for the duration (same order back)."""
    taken = []
    for module in (m for m in model.modules() if isinstance(m, GroupedExperts)):
        for name in list(module._parameters):
            taken.append((module, name, module._parameters.pop(name)))
    try:
        yield
    finally:
        for module, name, param in taken:
            module.register_parameter(name, param)


def _split_groups(groups: list[dict[str, Any]], keep: set[int]) -> list[dict[str, Any]]:
    """The same param groups (hyper-parameters and all), restricted to parameters in `keep`."""
    return [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [p for p in g["params"] if id(p) in keep]}
        for g in groups
    ]


class DeepSpeedOptimizer(torch.optim.Optimizer):
    """The native AdamW's param groups over every parameter, executed by ZeRO (dense parameters,
    inside `engine`) and a torch AdamW (experts). Call `clip_grads_` once per step, before `step`
    or, to skip the update, before `zero_grad` alone."""

    def __init__(self, native: torch.optim.Optimizer, model: nn.Module, zero_stage: int) -> None:
        import deepspeed

        super().__init__(native.param_groups, native.defaults)
        self.expert_params = [p for _, p in _expert_parameters(model)]
        expert_ids = {id(p) for p in self.expert_params}
        dense_ids = {id(p) for p in model.parameters()} - expert_ids
        self.experts = torch.optim.AdamW(_split_groups(self.param_groups, expert_ids))
        with _experts_detached(model):
            self.engine, self.zero, _, _ = deepspeed.initialize(
                model=model,
                optimizer=torch.optim.AdamW(_split_groups(self.param_groups, dense_ids)),
                config=deepspeed_config(zero_stage),
                dist_init_required=False,  # torchrun's process group (parallel/dims.py)
            )
        self._dense_norm = self.zero.scaled_global_norm
        self._global_norm: torch.Tensor | None = None  # set by clip_grads_, consumed by step
        # ZeRO computes its clip factor and its overflow check from this norm inside `step()`.
        self.zero.scaled_global_norm = lambda norm_type=2: self._global_norm

    def clip_grads_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of dense + expert gradients (returned); scale them so it is at most
        `max_norm` (0 = no clipping), the experts here and the dense ones inside ZeRO's step."""
        experts = grad_norm(self.expert_params, None)
        dense = self._dense_norm().to(experts.device, torch.float32)  # an all-reduce over "dp"
        self._global_norm = torch.linalg.vector_norm(torch.stack([dense, experts.float()]))
        self.zero.clip_grad = max_norm  # ZeRO divides by (norm + 1e-6) / max_norm when that is > 1
        if max_norm > 0:
            scale = min(1.0, max_norm / (float(self._global_norm) + 1e-6))  # as clip_grads_
            if scale < 1.0:
                for p in self.expert_params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return self._global_norm

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        assert closure is None and self._global_norm is not None, "call clip_grads_ first"
        for group, zero_group, expert_group in zip(
            self.param_groups, self.zero.param_groups, self.experts.param_groups
        ):
            hyper = {k: v for k, v in group.items() if k != "params"}  # the scheduler's lr, ...
            zero_group.update(hyper)
            expert_group.update(hyper)
        self.engine.step()
        self.experts.step()
        self._global_norm = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._global_norm is not None:
            # A skipped step: ZeRO still holds the reduced dense gradients. A non-finite norm
            # makes its step drop them without an update (its overflow path).
            self._global_norm = torch.tensor(math.nan)
            self.engine.step()
            self._global_norm = None
        self.experts.zero_grad(set_to_none=set_to_none)


@dataclass
class DeepSpeedParallelModel(ParallelModel):
    """A `ParallelModel` whose data parallelism is a DeepSpeed engine (one stage: pp = 1). Until
    `wrap_optimizer` creates the engine, `parts` holds the plain Transformer; after, the engine."""

    zero_stage: int = 1
    optimizer: DeepSpeedOptimizer | None = None
    _models: list[nn.Module] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._models = list(self.parts)

    @property
    def transformers(self) -> list[nn.Module]:
        return self._models

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> DeepSpeedOptimizer:
        self.optimizer = DeepSpeedOptimizer(optimizer, self._models[0], self.zero_stage)
        self.parts = [self.optimizer.engine]  # forward through the engine: it resets ZeRO's hooks
        return self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already per global token and the accumulation is ours: no division.
        self.optimizer.engine.backward(loss, scale_wrt_gas=False)

    def clip_grads_(self, max_norm: float) -> torch.Tensor:
        return self.optimizer.clip_grads_(max_norm)
