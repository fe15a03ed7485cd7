"""Sharded, atomic, verified checkpoints (see `manager.py` for the directory protocol) and the
`python -m trainer.checkpoint` command (list, verify, convert)."""

from trainer.checkpoint.manager import (
    CheckpointWriter,
    latest_valid,
    restore,
    step_dirs,
    verify,
)
from trainer.checkpoint.state import (
    CompressorState,
    RNGState,
    ShardedModelOptimizer,
    Stateful,
    TrainProgress,
    model_optimizer_part,
)

__all__ = [
    "CheckpointWriter",
    "CompressorState",
    "RNGState",
    "ShardedModelOptimizer",
    "Stateful",
    "TrainProgress",
    "latest_valid",
    "model_optimizer_part",
    "restore",
    "step_dirs",
    "verify",
]
