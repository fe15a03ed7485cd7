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

# parameter -> this step's estimate of its squared (summed) gradient, or None to use grad ** 2
SecondMoments = Callable[[nn.Parameter], torch.Tensor | None]


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


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device_type: str = "cpu",
    second_moments: SecondMoments | None = None,
) -> torch.optim.AdamW:
    """AdamW; with `second_moments` (a gradient compressor's factored statistics) the variant whose
    second moment is fed them."""
    decay, no_decay = weight_decay_split(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": cfg.weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    if second_moments is not None:
        return SampledVarianceAdamW(
            groups, second_moments, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
        )
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


class SampledVarianceAdamW(torch.optim.AdamW):
    """AdamW whose second moment averages `second_moments(p)` instead of `p.grad ** 2` where the
    source has an estimate (`parallel.compression.second_moment=factored`: the squared gradient as
    it was before compression). The first moment still follows the gradient the optimizer is
    given. Same update formula and state (`step`, `exp_avg`, `exp_avg_sq`) as torch's AdamW, so
    checkpoints are interchangeable; plain for-each math on local shards of DTensor parameters."""

    def __init__(self, params: Iterable, second_moments: SecondMoments, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.second_moments = second_moments

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                param, grad = _local(p), _local(p.grad)
                exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                sample = self.second_moments(p)
                if sample is None:  # e.g. during the compressor's warm-up: the gradient is exact
                    sample = grad * grad
                assert sample.shape == grad.shape, (
                    f"second moment {tuple(sample.shape)} for {tuple(grad.shape)}"
                )
                param.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).add_(sample, alpha=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                param.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (elementwise math needs no communication), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t
