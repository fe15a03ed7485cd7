"""Uncompressed baselines: `none` (the fp32 all-reduce) and `bf16` (half the bytes, no error
feedback, like torch's bf16-compress hook, which needs NCCL; gloo all-reduces bf16 itself)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.compression.base import Compressor, Segment


class NoCompression(Compressor):
    kind = "none"
    error_feedback = False

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self._all_reduce(x.clone(), group)


class BF16Compression(Compressor):
    """Cast, all-reduce in bf16, cast back. All-reduce rather than all-gather + fp32 sum: both
    measured ~5 ms for 1M values on 2 gloo ranks, and the all-reduce sends 2(p-1)/p * 2n bytes
    per rank against (p-1) * 2n for the gather, so it stays cheaper beyond 2 ranks."""

    kind = "bf16"
    error_feedback = False

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_bf16 = x.to(torch.bfloat16)
        return x_bf16.float(), self._all_reduce(x_bf16, group).float()
