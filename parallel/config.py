"""Parallel layout configuration. `dp = -1` means "whatever the world size leaves over".

world_size = pp * dp * tp; expert parallelism is carved out of dp (each expert lives on one of
`ep` ranks; its gradients are synced over the dp // ep expert-data-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.compression.base import CompressionConfig


@dataclass
class ParallelConfig:
    dp: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    dp_engine: str = "fsdp"  # fsdp (FSDP2 fully_shard) | ddp (replicated; gradient compression hooks in)
    # Compressed gradient sync (dp_engine=ddp): DDP comm hook for dense parameters, and the
    # expert-data-parallel sync of expert weights.
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded along the sequence
    activation_checkpointing: str = "none"  # none | full | selective (parallel/activation_checkpoint.py)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble
    pp_stages_per_rank: int = 1  # > 1 for interleaved schedules (virtual stages)
    # Optional explicit split: layers per stage (pp * pp_stages_per_rank entries); default: even.
    pp_layers_per_stage: list[int] = field(default_factory=list)
