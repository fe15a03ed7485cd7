"""Activation checkpointing: a checkpointed transformer block keeps only its input from the forward
pass and recomputes its activations in its backward, trading one extra forward for memory.

Modes (`parallel.activation_checkpointing`):
  none       keep every activation;
  full       checkpoint every `TransformerBlock` (also the MTP modules' blocks): each block keeps its
             input, and the backward rebuilds one block's activations at a time (~1/3 more compute);
  selective  checkpoint every second block (odd block indices), as torchtitan's layer-wise selective
             AC with its default `selective_ac_option="2"`: half the saving for half the recompute.
             (torchtitan's other flavour, an op-level save list, is not implemented.)
A block's index is its layer index, and num_layers + d for the d-th MTP block, so which blocks are
checkpointed does not depend on the pipeline split; `launch/memory.py` uses the same rule.

How: the block's `forward` becomes `torch.utils.checkpoint.checkpoint(original forward, ...)`
(non-reentrant) on that instance; the module tree stays as it is. `checkpoint_wrapper` would insert
`_checkpoint_wrapped_module.` into every parameter name, and names are what `init_weights(seed)`,
the optimizer groups and DCP checkpoints key on. FSDP2's hooks still run around the block's call
(its pre-backward unshard covers the recompute). torch's composable `checkpoint` hooks would also
keep the names, but its recompute context can be entered only once, and zero-bubble pipeline
schedules run a block's backward in two passes (input, then weight gradients).

What the recompute must not do differently from the original forward:
- change module state: MoE layers add the micro-batch's expert load and aux loss to step buffers
  in their forward; the block's buffers are saved before the recompute and restored after it, so
  nothing is counted twice;
- stop early: torch can stop a recompute once every saved tensor is rebuilt, but how many tensors a
  block saves depends on the data (an expert that got no tokens saves none), so ranks could stop
  at different points and skip a collective (the expert-parallel all-to-all, the dp all-reduce of
  token counts) that a peer still issues. Early stop is therefore off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.transformer import Transformer

AC_MODES = ("none", "full", "selective")


def is_checkpointed(mode: str, block_index: int) -> bool:
    """Whether block `block_index` (layer index; num_layers + d for MTP depth d) is checkpointed."""
    return mode == "full" or (mode == "selective" and block_index % 2 == 1)


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Checkpoint this (pipeline-stage) model's blocks according to `mode` (one of `AC_MODES`)."""
    blocks = [(int(i), block) for i, block in model.layers.items()]
    blocks += [(model.cfg.num_layers + d, mtp.block) for d, mtp in enumerate(model.mtp)]
    for index, block in blocks:
        if is_checkpointed(mode, index):
            block.forward = _checkpointed(block.forward, _RecomputeContext(block))


def _checkpointed(forward: Callable[..., torch.Tensor], recompute: _RecomputeContext) -> Callable:
    def run(*args: torch.Tensor) -> torch.Tensor:
        return checkpoint(
            forward,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), recompute),
            early_stop=False,
        )

    return run


class _RecomputeContext:
    """Around each recompute of `module`'s forward: restore its buffers afterwards. Re-enterable
    (zero-bubble schedules recompute a block once per backward pass)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(buf, buf.clone()) for buf in self.module.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []
