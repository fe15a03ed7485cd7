"""One optimizer step's forward/backward with gradient accumulation, and validation.

Loss normalisation: the step's loss is
    sum over micro-batches (ce_sum + mtp_loss_coef * mtp_ce_sum) / (label tokens in the whole step)
so k micro-batches give exactly the gradient of one batch k times larger, whatever the number of
ignored labels in each. The denominator is counted up front from the step's batches (later, under
data parallelism, it is all-reduced over the dp group once per step). MoE aux/z losses are not
in this sum: the model adds their gradient itself, weighted by `set_aux_loss_scale(1 / k)`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from data import Batch
from model import Transformer
from trainer.setup import count_label_tokens

Autocast = Callable[[], AbstractContextManager]


@dataclass
class StepLosses:
    """Per-token losses of one step, kept as tensors so that reading them (a sync) is optional."""

    ce: torch.Tensor
    mtp: torch.Tensor
    aux: float  # mean over micro-batches of the model's coef-weighted aux + z losses
    mtp_coef: float
    num_label_tokens: int
    num_input_tokens: int

    @property
    def total(self) -> torch.Tensor:
        return self.ce + self.mtp_coef * self.mtp + self.aux


def forward_backward(
    model: Transformer, batches: list[Batch], *, mtp_coef: float, device: torch.device, autocast: Autocast
) -> StepLosses:
    """Accumulate the step's gradients into `.grad`; the caller clips and steps the optimizer."""
    num_label_tokens = count_label_tokens(batches)
    denom = max(num_label_tokens, 1)
    model.set_aux_loss_scale(1.0 / len(batches))  # the step's aux loss = mean over micro-batches
    ce_sum = torch.zeros((), device=device)
    mtp_sum = torch.zeros((), device=device)
    aux = 0.0
    for batch in batches:
        tokens_BS = batch.tokens.to(device, non_blocking=True)
        labels_BS = batch.labels.to(device, non_blocking=True)
        with autocast():
            out = model(tokens_BS, labels_BS)
        ((out.ce_sum + mtp_coef * out.mtp_ce_sum) / denom).backward()
        ce_sum += out.ce_sum.detach()
        mtp_sum += out.mtp_ce_sum.detach()
        aux += out.aux_loss
    return StepLosses(
        ce=ce_sum / denom,
        mtp=mtp_sum / denom,
        aux=aux / len(batches),
        mtp_coef=mtp_coef,
        num_label_tokens=num_label_tokens,
        num_input_tokens=sum(b.tokens.numel() for b in batches),
    )


@torch.no_grad()
def evaluate(model: Transformer, batches: list[Batch], *, device: torch.device, autocast: Autocast) -> float:
    """Mean cross-entropy per label token over `batches` (eval mode: no jitter, no load stats)."""
    was_training = model.training
    model.eval()
    ce_sum = torch.zeros((), device=device, dtype=torch.float64)
    num_tokens = 0
    try:
        for batch in batches:
            with autocast():
                out = model(batch.tokens.to(device), batch.labels.to(device))
            ce_sum += out.ce_sum.double()
            num_tokens += out.num_tokens
    finally:
        model.train(was_training)
    return float(ce_sum) / max(num_tokens, 1)
