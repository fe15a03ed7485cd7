"""Small building blocks shared by attention, dense and MoE layers.

Shape legend: B batch, S sequence, H heads, D model dim, F hidden dim, R rotary dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`normed * weight` (weight starts at 1), or with `zero_centered` (Qwen3-Next's RMSNorm)
    `normed * (1 + weight)` (weight starts at 0: model/init.py)."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 mean-of-squares loses too much precision.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            # 1 + weight in fp32, as Qwen3-Next does: in bf16 a small weight would round away.
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_tables(rotary_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, R/2] for rotary position embedding."""
    inv_freq_R2 = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles_SR2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_R2)
    return angles_SR2.cos().float(), angles_SR2.sin().float()


def apply_rope(x_BSHR: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's rotary dims by position-dependent angles."""
    seq_len = x_BSHR.shape[1]
    cos = cos_SR2[:seq_len, None, :].to(x_BSHR.dtype)
    sin = sin_SR2[:seq_len, None, :].to(x_BSHR.dtype)
    x1, x2 = x_BSHR.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
