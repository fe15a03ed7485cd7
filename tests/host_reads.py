"""Counting host syncs on CPU: every Python read of a tensor's value (`.item()`, `.tolist()`,
`int()`, `float()`, `bool()`) is one, and would stall a CUDA stream until the GPU catches up."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextmanager
def counted_reads() -> Iterator[list[str]]:
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str):
        def read(self: torch.Tensor, *args: object):
            seen.append(name)
            return originals[name](self, *args)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
