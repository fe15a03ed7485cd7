"""`topk`: send the k largest-magnitude entries of (gradient + residual) as (int32 index, fp32
value) pairs; the rest stays in the residual. k is a fixed fraction of the buffer, so every rank
sends the same number of pairs and an even all-gather suffices (gloo's list all-gather rejects
uneven sizes). With k = all it is the exact all-reduce."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.compression.base import Compressor, Segment


class TopKCompression(Compressor):
    kind = "topk"
    options = ("topk_ratio",)

    def __init__(self, warmup_steps: int = 0, topk_ratio: float = 0.01) -> None:
        super().__init__(warmup_steps)
        self.topk_ratio = topk_ratio

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.numel()
        k = min(n, max(1, math.ceil(self.topk_ratio * n)))
        index_K = x.abs().topk(k, sorted=False).indices
        value_K = x[index_K]
        sent = torch.zeros_like(x).index_copy_(0, index_K, value_K)
        index_PK = self._all_gather(index_K.to(torch.int32), group)
        value_PK = self._all_gather(value_K, group)
        # Rank order, entry by entry: with k = all this is the all-reduce's own sum.
        total = torch.zeros_like(x).index_add_(0, index_PK.view(-1).long(), value_PK.view(-1))
        return sent, total
