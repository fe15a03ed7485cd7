"""`moe_selective`: MoE-aware selective sync of expert gradients ("selective gradient upload").

Experts that received no tokens anywhere in the group this step (or whose gradient norm is below
`threshold`) skip the sync entirely: their (gradient + residual) stays in the residual, to be
sent on a later step when they are active again. The others are int8-quantized with error
feedback. Every rank must skip the same experts or the collectives would not match, so the
decision is taken on the result of one small all-reduce ([2, E] floats: how many ranks saw the
expert active, and the squared norms of gradient + residual), which is identical on all ranks.
Dense parameters (the DDP hook) use the plain int8 path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.compression.base import Segment, group_size
from parallel.compression.base import _all_reduce_bytes as all_reduce_bytes
from parallel.compression.quantize import Int8Compression, int8_sum


class MoESelectiveCompression(Int8Compression):
    kind = "moe_selective"
    options = ("chunk_size", "threshold")

    def __init__(
        self,
        warmup_steps: int = 0,
        second_moment: str = "compressed",
        chunk_size: int = 1024,
        threshold: float = 0.0,
    ) -> None:
        super().__init__(warmup_steps, second_moment, chunk_size)
        self.threshold = threshold
        self.last_synced_E: torch.Tensor | None = None  # which experts the last call synced

    def all_reduce_sum_experts(
        self,
        grad_E: torch.Tensor,
        group: dist.ProcessGroup | None,
        key: str,
        active_E: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`grad_E`: an expert weight's gradient `[E_local, ...]`. `active_E` (bool `[E_local]`):
        experts that saw tokens on this rank; by default, rows with a nonzero gradient (an expert
        that got no token has an exactly zero gradient). Ranks may disagree: an expert is synced
        if any rank saw it active."""
        E = grad_E.shape[0]
        x_EK = grad_E.float().reshape(E, -1)
        self.bytes_uncompressed += all_reduce_bytes(x_EK.numel() * 4, group_size(group))
        if not self.compressing:
            self.last_synced_E = torch.ones(E, dtype=torch.bool)
            return self._all_reduce(x_EK.clone(), group).view(grad_E.shape).to(grad_E.dtype)
        if active_E is None:
            active_E = x_EK.abs().amax(1) > 0
        x_EK = x_EK + self._residual([Segment(key, grad_E.shape)]).view(E, -1)
        agreed_2E = self._all_reduce(torch.stack([active_E.float(), x_EK.pow(2).sum(1)]), group)
        sync_E = (agreed_2E[0] > 0) & (agreed_2E[1].sqrt() >= self.threshold)
        sent_EK, total_EK = torch.zeros_like(x_EK), torch.zeros_like(x_EK)
        if bool(sync_E.any()):  # a host sync, as every skip decision must be
            synced_EK = x_EK[sync_E]
            sizes = [x_EK.shape[1]] * len(synced_EK)
            sent, total = int8_sum(self, synced_EK.reshape(-1), group, sizes, self.chunk_size)
            sent_EK[sync_E] = sent.view(-1, x_EK.shape[1])
            total_EK[sync_E] = total.view(-1, x_EK.shape[1])
        self.residuals[key] = (x_EK - sent_EK).view(grad_E.shape)
        self.last_synced_E = sync_E
        return total_EK.view(grad_E.shape).to(grad_E.dtype)
