"""A small training state (model + AdamW + scheduler + RNG + progress) and the save helper the
checkpoint tests share; `seed` makes two states differ everywhere, progress included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import CheckpointWriter, RNGState, ShardedModelOptimizer, TrainProgress
from trainer.config import OptimConfig
from trainer.optim import build_optimizer, build_scheduler


def make_state(seed: int = 0, hidden: int = 8) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Linear(hidden, 2))
    cfg = OptimConfig(lr=1e-2, warmup_steps=1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps=10)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return {
        "model_optimizer": ShardedModelOptimizer([model], opt),
        "scheduler": sched,
        "rng": RNGState(),
        "progress": TrainProgress(seed, 12),
    }


def save(root: Path, step: int, state: dict[str, Any], keep_last: int = 0, async_save: bool = False) -> Path:
    writer = CheckpointWriter(root, keep_last, async_save)
    path = writer.save(step, state, {"tokens": step * 10})
    writer.wait()
    return path


def params(state: dict[str, Any]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state["model_optimizer"].container.parameters()]


def two_checkpoints(root: Path, older: int = 1, newer: int = 2) -> tuple[list[torch.Tensor], Path]:
    """Checkpoints `older` and `newer` with different weights; returns the older one's weights and
    the newer one's directory (for damaging it and checking that resume falls back)."""
    state = make_state(1)
    save(root, older, state)
    first = params(state)
    with torch.no_grad():
        for p in state["model_optimizer"].container.parameters():
            p.add_(1.0)
    return first, save(root, newer, state)
