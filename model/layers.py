"""Small building blocks shared by attention, dense and MoE layers.

Shape legend: B batch, S sequence, H heads, D model dim, F hidden dim, R rotary dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import RopeScalingConfig


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


def rope_tables(
    rotary_dim: int, max_seq_len: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, R/2] for rotary position embedding, with the context extension of
    `scaling` (as transformers' `rope_parameters`: linear, llama3 or yarn)."""
    inv_freq_R2 = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    gain = 1.0
    if scaling is not None and scaling.type != "none":
        inv_freq_R2, gain = _scaled_inv_freq(inv_freq_R2, rotary_dim, max_seq_len, theta, scaling)
    angles_SR2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq_R2)
    return (angles_SR2.cos() * gain).float(), (angles_SR2.sin() * gain).float()


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _scaled_inv_freq(
    inv_freq_R2: torch.Tensor, rotary_dim: int, max_seq_len: int, theta: float, s: RopeScalingConfig
) -> tuple[torch.Tensor, float]:
    """(scaled inverse frequencies, cos/sin gain), matching transformers' modeling_rope_utils."""
    factor = s.factor
    original = s.original_max_seq_len or max_seq_len / factor
    if s.type == "linear":
        return inv_freq_R2 / factor, 1.0
    if s.type == "llama3":
        # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between
        # blended by where the wavelength falls relative to the pretraining context.
        wavelen_R2 = 2 * math.pi / inv_freq_R2
        smooth_R2 = (original / wavelen_R2 - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended_R2 = (1 - smooth_R2) * inv_freq_R2 / factor + smooth_R2 * inv_freq_R2
        kept_R2 = torch.where(wavelen_R2 < original / s.high_freq_factor, inv_freq_R2, blended_R2)
        return torch.where(wavelen_R2 > original / s.low_freq_factor, inv_freq_R2 / factor, kept_R2), 1.0
    assert s.type == "yarn", s.type  # validated in trainer/validate.py

    # YaRN: dims that turn more than beta_fast times over the pretraining context keep their
    # frequency (extrapolation), fewer than beta_slow times are interpolated, a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    ramp_R2 = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq_R2 = inv_freq_R2 / factor * ramp_R2 + inv_freq_R2 * (1 - ramp_R2)
    gain = s.attention_factor
    if not gain:
        both = s.mscale and s.mscale_all_dim
        gain = (
            _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
            if both
            else _yarn_mscale(factor)
        )
    return inv_freq_R2, gain


def softmax_scale_multiplier(scaling: RopeScalingConfig) -> float:
    """MLA's extra softmax-scale factor under YaRN with mscale_all_dim (DeepSeek-V2/V3), else 1."""
    if scaling.type != "yarn" or not scaling.mscale_all_dim:
        return 1.0
    return _yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def apply_rope(x_BSHR: torch.Tensor, cos_SR2: torch.Tensor, sin_SR2: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's rotary dims by position-dependent angles."""
    seq_len = x_BSHR.shape[1]
    cos = cos_SR2[:seq_len, None, :].to(x_BSHR.dtype)
    sin = sin_SR2[:seq_len, None, :].to(x_BSHR.dtype)
    x1, x2 = x_BSHR.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
