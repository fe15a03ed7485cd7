"""The model + optimizer checkpoint part of the DeepSpeed engine (`parallel/deepspeed_engine.py`),
in the native format: a checkpoint saved by either engine loads in the other, at any layout.

Same keys, shapes and placements as `ShardedModelOptimizer` writes with torch's `get_state_dict`:
model tensors by parameter name (experts as DTensors over "ep"), and per parameter the AdamW
state `exp_avg`, `exp_avg_sq`, `step`. What it costs instead: ZeRO keeps each dense parameter's
AdamW state in flat partitions over "dp", so a save gathers every dense state tensor whole on every
rank (one all-reduce per tensor; for that moment the memory ZeRO saved is spent), and a load
copies each rank's slice back. The experts' AdamW is a plain torch one; its state is used as is.
DeepSpeed's own checkpoint format (`engine.save_checkpoint`) is not used.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state, get_model_state_dict

from parallel.deepspeed_engine import DeepSpeedOptimizer
from trainer.checkpoint.state import ShardedModelOptimizer, _strip

ADAM_TENSORS = ("exp_avg", "exp_avg_sq")  # ZeRO partitions these; `step` is one per param group


class DeepSpeedModelOptimizer(ShardedModelOptimizer):
    """`ShardedModelOptimizer`'s checkpoint part for a `DeepSpeedOptimizer` over `parts`."""

    def __init__(self, parts: list[nn.Module], optimizer: DeepSpeedOptimizer) -> None:
        super().__init__(parts, optimizer)
        self.names = {id(p): _strip(n) for n, p in self.container.named_parameters()}
        expert_ids = {id(p) for p in optimizer.expert_params}
        # Dense parameters of each param group, in ZeRO's group order.
        self.dense = [[p for p in g["params"] if id(p) not in expert_ids] for g in optimizer.param_groups]

    def sharded_state(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        opt = self.optimizer
        self._ensure_optimizer_state()
        optim: dict[str, Any] = {self.names[id(p)]: opt.experts.state[p] for p in opt.expert_params}
        for params, flat in zip(self.dense, opt.zero.single_partition_of_fp32_groups):
            step = opt.zero.optimizer.state[flat]["step"]
            for p in params:
                optim[self.names[id(p)]] = {
                    **{key: safe_get_full_optimizer_state(p, key) for key in ADAM_TENSORS},
                    "step": step.clone(),
                }
        model = {_strip(k): v for k, v in get_model_state_dict(self.container).items()}
        return {"model": model, "optimizer": optim}

    def groups_state(self) -> list[dict[str, Any]]:
        return [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [self.names[id(p)] for p in g["params"]],
            }
            for g in self.optimizer.param_groups
        ]

    def load(self, sharded: dict[str, Any], groups: list[dict[str, Any]]) -> None:
        """DCP has loaded the model and the expert state in place, and the dense state into the
        whole tensors `sharded_state()` gathered: copy this rank's slices of those into ZeRO."""
        from deepspeed.utils import safe_set_full_optimizer_state

        opt = self.optimizer
        opt.zero.refresh_fp32_params()  # ZeRO's fp32 master copy of the weights just loaded
        for params, flat in zip(self.dense, opt.zero.single_partition_of_fp32_groups):
            for p in params:
                for key in ADAM_TENSORS:
                    safe_set_full_optimizer_state(p, sharded["optimizer"][self.names[id(p)]][key], key)
            if params:
                saved_step = sharded["optimizer"][self.names[id(params[0])]]["step"]
                opt.zero.optimizer.state[flat]["step"].copy_(saved_step)
        for group, saved in zip(opt.param_groups, groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def _ensure_optimizer_state(self) -> None:
        """Before the first step (a resume) neither AdamW has state yet: create it as torch's
        `get_state_dict` does for the native engine (a step with zero gradients and lr 0), so DCP
        has tensors of the right shapes to load into. Then (re)link ZeRO's per-parameter views of
        it: ZeRO links them once, after its first param group's first step, so the views of the
        other groups stay empty."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        opt, zero = self.optimizer, self.optimizer.zero
        _init_optim_state(opt.experts)
        _init_optim_state(zero.optimizer)
        for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)
