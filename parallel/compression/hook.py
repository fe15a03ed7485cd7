"""The DDP communication hook that routes each gradient bucket through a `Compressor`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from parallel.compression.base import Compressor, Segment


def compression_hook(compressor: Compressor, module: nn.Module) -> Callable:
    """A DDP comm hook `(group, bucket) -> Future[Tensor]` returning the SUM (not the mean) of the
    bucket over `group`. `module` is the model DDP wraps: its parameter names key the residuals,
    so they survive DDP's bucket rebuild after the first iteration and checkpoint restarts.
    Register with `ddp.register_comm_hook(group, compression_hook(compressor, model))`."""
    names = {param: name for name, param in module.named_parameters()}

    def hook(group, bucket):  # unannotated: DDP rejects postponed (string) annotations
        segments = [Segment(names[p], p.shape) for p in bucket.parameters()]
        # Blocking collectives, issued in bucket order on every rank (DDP launches buckets in
        # index order), so several buckets cannot interleave differently across ranks.
        total = compressor.all_reduce_sum_segments(bucket.buffer(), group, segments)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(total)
        return future

    return hook
