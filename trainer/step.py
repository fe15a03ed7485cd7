"""One optimizer step's forward/backward (with gradient accumulation and any parallel layout), and
validation.

Loss normalisation: the step's loss is
    sum over all micro-batches of all data-parallel ranks of (ce_sum + mtp_loss_coef * mtp_ce_sum)
    / (label tokens in the whole global batch)
so any layout, and any split into micro-batches, gives the gradient of the same global loss. The
denominator is counted up front and summed over "dp" once per step; gradients are then summed
(not averaged) over data-parallel ranks. MoE aux/z losses are not in this sum: the model adds
their gradient itself, weighted by `set_aux_loss_scale(1 / (micro-batches * dp))`, i.e. the mean
over the global batch's micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data import Batch
from model import IGNORE_INDEX
from parallel.data_parallel import maybe_no_grad_sync
from parallel.parallelize import ParallelModel

Autocast = Callable[[], AbstractContextManager]


@dataclass
class StepLosses:
    """Per-token losses of one step over the global batch (already reduced over ranks)."""

    ce: torch.Tensor
    mtp: torch.Tensor
    aux: torch.Tensor  # mean over the global batch's micro-batches of the coef-weighted aux + z losses
    mtp_coef: float
    num_label_tokens: int  # global
    num_input_tokens: int  # this data-parallel rank's

    @property
    def total(self) -> torch.Tensor:
        return self.ce + self.mtp_coef * self.mtp + self.aux


def _sum_over(tensor: torch.Tensor, *groups: dist.ProcessGroup | None) -> torch.Tensor:
    for group in groups:
        if group is not None:
            dist.all_reduce(tensor, group=group)
    return tensor


def count_label_tokens(batches: list[Batch]) -> int:
    """Non-ignored labels in micro-batches (one host sync)."""
    return int(sum((b.labels != IGNORE_INDEX).sum() for b in batches))


def forward_backward(
    pm: ParallelModel, batches: list[Batch], *, mtp_coef: float, device: torch.device, autocast: Autocast
) -> StepLosses:
    """Accumulate the step's gradients into `.grad`; the caller clips and steps the optimizer."""
    dp_group, pp_group = pm.group("dp"), pm.group("pp")
    num_label_tokens = int(_sum_over(torch.tensor(float(count_label_tokens(batches))), dp_group))
    denom = max(num_label_tokens, 1)
    pm.set_aux_loss_scale(1.0 / (len(batches) * pm.dims.dp))
    if pm.schedule is not None:
        ce_sum = _pipeline_forward_backward(pm, batches, denom, device)
        mtp_sum = torch.zeros((), device=device)  # MTP is not combined with pipeline parallelism
    else:
        ce_sum, mtp_sum = _accumulate(pm, batches, denom, mtp_coef, device, autocast)
    pm.finish_grad_sync()
    # For logging: sum over dp (each rank's share of the global batch) and over pipeline stages
    # (only the last holds the CE; each holds the aux losses of its own layers).
    sums = torch.stack([ce_sum.float().cpu(), mtp_sum.float().cpu(), pm.step_aux_loss().float().cpu()])
    ce, mtp, aux = _sum_over(sums, dp_group, pp_group).unbind()
    return StepLosses(
        ce=ce / denom,
        mtp=mtp / denom,
        aux=aux / (len(batches) * pm.dims.dp),
        mtp_coef=mtp_coef,
        num_label_tokens=num_label_tokens,
        num_input_tokens=sum(b.tokens.numel() for b in batches),
    )


def _accumulate(
    pm: ParallelModel,
    batches: list[Batch],
    denom: int,
    mtp_coef: float,
    device: torch.device,
    autocast: Autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    model = pm.parts[0]
    ce_sum = torch.zeros((), device=device)
    mtp_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # Gradients are reduced over data-parallel ranks only after the last micro-batch.
        with maybe_no_grad_sync(model, sync=i == len(batches) - 1):
            with autocast():
                out = model(
                    batch.tokens.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
                )
            pm.backward((out.ce_sum + mtp_coef * out.mtp_ce_sum) / denom)
        ce_sum += out.ce_sum.detach()
        mtp_sum += out.mtp_ce_sum.detach()
    return ce_sum, mtp_sum


def _pipeline_forward_backward(
    pm: ParallelModel, batches: list[Batch], denom: int, device: torch.device
) -> torch.Tensor:
    """The schedule splits the concatenated batch back into the same micro-batches."""
    from parallel.pipeline import run_step

    pm.pipeline_loss.denominator = denom
    tokens = torch.cat([b.tokens for b in batches]).to(device)
    labels = torch.cat([b.labels for b in batches]).to(device)
    losses = run_step(pm.schedule, tokens, labels, pm.has_first_stage, pm.has_last_stage)
    if not pm.has_last_stage:
        return torch.zeros((), device=device)
    return torch.stack([loss.detach() for loss in losses]).sum() * denom


@torch.no_grad()
def evaluate(pm: ParallelModel, batches: list[Batch], *, device: torch.device, autocast: Autocast) -> float:
    """Mean cross-entropy per label token over every data-parallel rank's `batches` (eval mode:
    no jitter, no load statistics)."""
    pm.train(False)
    try:
        if pm.schedule is not None:
            ce_sum = _pipeline_evaluate(pm, batches, device)
        else:
            ce_sum = torch.zeros((), dtype=torch.float64)
            for batch in batches:
                with autocast():
                    out = pm.parts[0](batch.tokens.to(device), batch.labels.to(device))
                ce_sum += out.ce_sum.double().cpu()
    finally:
        pm.train(True)
    totals = torch.stack([ce_sum.double().cpu(), torch.tensor(float(count_label_tokens(batches)))])
    ce_total = _sum_over(totals[:1].clone(), pm.group("dp"), pm.group("pp"))
    tokens_total = _sum_over(totals[1:].clone(), pm.group("dp"))
    return float(ce_total) / max(float(tokens_total), 1.0)


def _pipeline_evaluate(pm: ParallelModel, batches: list[Batch], device: torch.device) -> torch.Tensor:
    """Forward-only through the schedule in chunks of its micro-batch count; a short last chunk is
    padded with copies whose labels are all ignored (they add nothing)."""
    from parallel.pipeline import run_eval

    k = pm.schedule._n_microbatches
    pm.pipeline_loss.denominator = 1
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(batches), k):
        chunk = batches[start : start + k]
        padding = [Batch(chunk[0].tokens, torch.full_like(chunk[0].labels, IGNORE_INDEX))] * (k - len(chunk))
        chunk = chunk + padding
        tokens = torch.cat([b.tokens for b in chunk]).to(device)
        labels = torch.cat([b.labels for b in chunk]).to(device)
        losses = run_eval(pm.schedule, tokens, labels, pm.has_first_stage, pm.has_last_stage)
        if pm.has_last_stage:
            total += sum(float(loss) for loss in losses)
    return total
