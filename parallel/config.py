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
    # native (torch: dp_engine above) | deepspeed (ZeRO for dense parameters, our expert sync and
    # optimizer for experts: parallel/deepspeed_engine.py; dp_engine is then not used)
    engine: str = "native"
    zero_stage: int = 1  # engine=deepspeed: 1 (optimizer state partitioned over dp) | 2 (+ gradients)
    # Compressed gradient sync: with dp_engine=ddp the DDP comm hook for dense parameters and the
    # expert-data-parallel sync of expert weights; with engine=deepspeed the expert sync only.
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    sequence_parallel: bool = True  # with tp > 1: norms and residual stream sharded along the sequence
    activation_checkpointing: str = "none"  # none | full | selective (parallel/activation_checkpoint.py)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble
    pp_stages_per_rank: int = 1  # > 1 for interleaved schedules (virtual stages)
    # Optional explicit split: layers per stage (pp * pp_stages_per_rank entries); default: even.
    pp_layers_per_stage: list[int] = field(default_factory=list)
