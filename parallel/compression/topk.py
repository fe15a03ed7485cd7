"""`topk`: send the k largest-magnitude entries of (gradient + residual) as (int32 index, fp32
value) pairs; the rest stays in the residual. k is a fixed fraction of each parameter (segment),
chosen per parameter so the result does not depend on how DDP grouped parameters into buckets
(it regroups them after the first iteration, and again after a restart). Every rank sends the
same number of pairs, so an even all-gather suffices (gloo's list all-gather rejects uneven
sizes). With k = all it is the exact all-reduce."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.compression.base import Compressor, Segment


class TopKCompression(Compressor):
    kind = "topk"
    options = ("topk_ratio",)

    def __init__(
        self, warmup_steps: int = 0, second_moment: str = "compressed", topk_ratio: float = 0.01
    ) -> None:
        super().__init__(warmup_steps, second_moment)
        self.topk_ratio = topk_ratio

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index_K = torch.cat([self._top_indices(part) + offset for part, offset in _split(x, segments)])
        value_K = x[index_K]
        sent = torch.zeros_like(x).index_copy_(0, index_K, value_K)
        index_PK = self._all_gather(index_K.to(torch.int32), group)
        value_PK = self._all_gather(value_K, group)
        # Rank order, entry by entry: with k = all this is the all-reduce's own sum.
        total = torch.zeros_like(x).index_add_(0, index_PK.view(-1).long(), value_PK.view(-1))
        return sent, total

    def _top_indices(self, x: torch.Tensor) -> torch.Tensor:
        k = min(x.numel(), max(1, math.ceil(self.topk_ratio * x.numel())))
        return x.abs().topk(k, sorted=False).indices


def _split(x: torch.Tensor, segments: list[Segment]) -> list[tuple[torch.Tensor, int]]:
    """(segment's slice of `x`, its offset) for each segment."""
    offsets = [0]
    for s in segments[:-1]:
        offsets.append(offsets[-1] + s.numel)
    return list(zip(x.split([s.numel for s in segments]), offsets))
