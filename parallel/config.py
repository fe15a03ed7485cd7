"""Parallel layout configuration. `dp = -1` means "whatever the world size leaves over"."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # carved out of dp: experts sharded over ep ranks, synced over dp // ep
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
