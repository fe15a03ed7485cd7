"""Optimizer, learning-rate schedule and gradient clipping.

AdamW with weight decay only on matrices (>= 2-D) that are neither embeddings nor norm weights;
the LR schedule is a `LambdaLR` over a plain closure (so its state dict holds only counters, and
a resumed run follows the *current* config's schedule): linear warmup, then `cosine` to
`lr * min_lr_ratio`, `wsd` (warmup-stable-decay) or `constant`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from trainer.config import OptimConfig


def weight_decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Parameter names (as in `named_parameters`) with and without weight decay.

    Decayed: >= 2-D weights (linear layers, stacked expert weights `[E, D, F]`, router).
    Not decayed: biases, norm weights, and embedding tables (also when tied to the output head).
    """
    exempt: set[int] = set()
    for module in model.modules():
        is_embedding_or_norm = isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()
        if is_embedding_or_norm:
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(name)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str = "cpu") -> torch.optim.AdamW:
    decay, no_decay = weight_decay_split(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device_type == "cuda",  # fused kernels are CUDA-only; plain for-each on CPU
    )


def lr_factor_fn(cfg: OptimConfig, steps: int) -> Callable[[int], float]:
    """`step -> lr multiplier` for optimizer steps 0 .. steps-1; the last step reaches the minimum.

    Warmup: step i < warmup uses (i + 1) / warmup, so step warmup-1 is at the full lr.
    cosine: from 1 at step `warmup` to `min_lr_ratio` at step `steps - 1`.
    wsd: 1 until the last `round(decay_fraction * steps)` steps, then linear down to `min_lr_ratio`.
    """
    warmup, min_ratio, schedule = cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule
    decay_steps = max(1, round(cfg.decay_fraction * steps))
    decay_start = max(warmup, steps - decay_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / max(1, steps - decay_start))
            return 1.0 - (1.0 - min_ratio) * progress
        raise ValueError(f"unknown schedule {schedule!r}")  # validate() rejects it first

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(cfg, steps))


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by global L2 norm (max_norm <= 0: measure only). Returns the pre-clip norm as a tensor,
    so the caller decides when to pay the device sync of `.item()`."""
    grads = [p for p in params if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)


def apply_config(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig
) -> None:
    """After loading a checkpoint: the current config's hyperparameters win over the saved ones
    (a run resumed with more steps or another lr follows the new schedule from the next step).
    With an unchanged config this rewrites the same values, so a resume stays bitwise exact."""
    for group, weight_decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(initial_lr=cfg.lr, weight_decay=weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
