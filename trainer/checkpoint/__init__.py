"""Sharded, atomic, verified checkpoints (see `manager.py` for the directory protocol) and the
`python -m trainer.checkpoint` command (list, verify, convert)."""

from trainer.checkpoint.manager import (
    CheckpointWriter,
    latest_valid,
    restore,
    restore_latest,
    state_bytes,
)
from trainer.checkpoint.safety import CheckpointError, check_free_space, scan_step_dirs, step_dirs, verify
from trainer.checkpoint.state import (
    CompressorState,
    RNGState,
    ShardedModelOptimizer,
    Stateful,
    TrainProgress,
    model_optimizer_part,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriter",
    "CompressorState",
    "RNGState",
    "ShardedModelOptimizer",
    "Stateful",
    "TrainProgress",
    "check_free_space",
    "latest_valid",
    "model_optimizer_part",
    "restore",
    "restore_latest",
    "scan_step_dirs",
    "state_bytes",
    "step_dirs",
    "verify",
]
