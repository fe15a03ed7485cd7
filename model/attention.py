"""Causal self-attention: grouped-query attention (GQA) and multi-head latent attention (MLA).

Head counts are read from the projected tensors (`view(B, S, -1, hd)`), not stored, so tensor
parallelism can shard the projections by heads without touching this code.
Shape legend: B batch, S sequence, H query heads, K key/value heads, D model dim, E head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import RMSNorm, apply_rope, softmax_scale_multiplier


def causal_mask(seq_len: int, chunk_size: int, window: int, device: torch.device) -> torch.Tensor | None:
    """[S, S] boolean mask (True = attend) for causal attention restricted to aligned chunks
    (Llama 4's chunked attention) and/or to the last `window` tokens (sliding window); None when
    neither applies, so plain causal attention keeps SDPA's fused causal path."""
    chunk = chunk_size if 0 < chunk_size < seq_len else 0
    window = window if 0 < window < seq_len else 0
    if not chunk and not window:
        return None
    q_S1 = torch.arange(seq_len, device=device)[:, None]
    k_1S = torch.arange(seq_len, device=device)[None, :]
    allowed_SS = k_1S <= q_S1
    if chunk:
        allowed_SS &= (q_S1 // chunk) == (k_1S // chunk)
    if window:
        allowed_SS &= q_S1 - k_1S < window
    return allowed_SS


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's "L2" qk norm: x / rms(x) over the head dim, in fp32, no weight."""
    x_fp32 = x.float()
    return (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def query_temperature(seq_len: int, floor_scale: float, scale: float, device: torch.device) -> torch.Tensor:
    """Llama 4's attention temperature tuning on NoPE layers: queries at position p scaled by
    1 + scale * ln(1 + floor((p + 1) / floor_scale)), so long-range attention stays sharp. [S, 1, 1]"""
    pos_S = torch.arange(seq_len, device=device, dtype=torch.float32)
    factor_S = torch.log1p(torch.floor((pos_S + 1.0) / floor_scale)) * scale + 1.0
    return factor_S[:, None, None]


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hd = self.head_dim = cfg.resolved_head_dim
        self.output_gate = cfg.attention_output_gate
        q_out = cfg.num_heads * hd * (2 if self.output_gate else 1)  # + a gate per head
        self.wq = nn.Linear(cfg.dim, q_out, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.num_heads * hd, cfg.dim, bias=False)
        self.norm_over_heads = cfg.qk_norm_scope == "projection"
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            widths = (cfg.num_heads * hd, cfg.num_kv_heads * hd) if self.norm_over_heads else (hd, hd)
            self.q_norm, self.k_norm = (RMSNorm(w, cfg.norm_eps, cfg.norm_zero_centered) for w in widths)
        self.rotary_dim = cfg.rotary_dim
        self.clip_qkv = cfg.clip_qkv
        self.use_rope = cfg.uses_rope(layer_idx)
        self.norm_eps = cfg.norm_eps
        # Llama 4: the L2 qk norm and chunked attention act on RoPE layers, temperature tuning on
        # NoPE layers (iRoPE: local attention with positions, global attention without).
        self.l2_qk_norm = cfg.qk_l2_norm and self.use_rope
        self.chunk_size = cfg.attention_chunk_size if self.use_rope else 0
        self.temperature = (
            (cfg.attn_floor_scale, cfg.attn_scale)
            if cfg.attn_temperature_tuning and not self.use_rope
            else None
        )
        self.sliding_window = cfg.sliding_window

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        hd = self.head_dim
        gate_BSHE = None
        if self.output_gate:
            # Per head [query_h, gate_h] (Qwen3-Next): column-parallel wq still splits whole heads.
            q_BSHE, gate_BSHE = self.wq(x_BSD).view(B, S, -1, 2 * hd).chunk(2, dim=-1)
        else:
            q_BSHE = self.wq(x_BSD).view(B, S, -1, hd)
        k_BSKE = self.wk(x_BSD).view(B, S, -1, hd)
        v_BSKE = self.wv(x_BSD).view(B, S, -1, hd)
        if self.q_norm is not None and self.norm_over_heads:
            # OLMoE: one norm over the whole projection (all heads), as before the split into heads.
            q_BSHE = self.q_norm(q_BSHE.flatten(2)).view_as(q_BSHE)
            k_BSKE = self.k_norm(k_BSKE.flatten(2)).view_as(k_BSKE)
        elif self.q_norm is not None:
            q_BSHE, k_BSKE = self.q_norm(q_BSHE), self.k_norm(k_BSKE)
        if self.clip_qkv:  # OLMoE: after the qk norm, before RoPE
            q_BSHE, k_BSKE, v_BSKE = (
                t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q_BSHE, k_BSKE, v_BSKE)
            )
        if self.use_rope:
            q_BSHE, k_BSKE = self._rope(q_BSHE, cos, sin), self._rope(k_BSKE, cos, sin)
        if self.l2_qk_norm:
            q_BSHE, k_BSKE = (
                weightless_rms_norm(q_BSHE, self.norm_eps),
                weightless_rms_norm(k_BSKE, self.norm_eps),
            )
        if self.temperature is not None:
            q_BSHE = (q_BSHE * query_temperature(S, *self.temperature, q_BSHE.device)).to(q_BSHE.dtype)
        mask_SS = causal_mask(S, self.chunk_size, self.sliding_window, x_BSD.device)
        out_BHSE = F.scaled_dot_product_attention(
            q_BSHE.transpose(1, 2),
            k_BSKE.transpose(1, 2),
            v_BSKE.transpose(1, 2),
            attn_mask=mask_SS,
            is_causal=mask_SS is None,
            enable_gqa=q_BSHE.shape[2] != k_BSKE.shape[2],
        )
        out_BSHE = out_BHSE.transpose(1, 2)
        if gate_BSHE is not None:
            out_BSHE = out_BSHE * torch.sigmoid(gate_BSHE)
        return self.wo(out_BSHE.reshape(B, S, -1))

    def _rope(self, x_BSHE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        if r == self.head_dim:
            return apply_rope(x_BSHE, cos, sin)
        # Partial rotary (Qwen3-Next): only the first r dims of each head rotate.
        return torch.cat([apply_rope(x_BSHE[..., :r], cos, sin), x_BSHE[..., r:]], dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA, in its training form: the KV latent is expanded per head (no weight
    absorption, which only pays off for decoding with a latent KV cache)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        mla, heads = cfg.mla, cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        if mla.q_lora_rank > 0:
            self.wq_a = nn.Linear(cfg.dim, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, cfg.norm_eps, cfg.norm_zero_centered)
            self.wq_b = nn.Linear(mla.q_lora_rank, heads * qk_head_dim, bias=False)
            self.wq = None
        else:
            self.wq = nn.Linear(cfg.dim, heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, mla.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, cfg.norm_eps, cfg.norm_zero_centered)
        self.wkv_b = nn.Linear(mla.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(heads * self.v_dim, cfg.dim, bias=False)
        # YaRN with mscale_all_dim (DeepSeek-V3) also sharpens the softmax.
        self.scale = softmax_scale_multiplier(cfg.rope_scaling) / math.sqrt(qk_head_dim)

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope_BSHE, q_pe_BSHE = q.view(B, S, -1, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        latent_BSL, k_pe_BSE = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # The rotary part of the key is shared by all heads: one rotated vector per position.
        k_pe_BS1E = apply_rope(k_pe_BSE.unsqueeze(2), cos, sin)
        kv_BSHE = self.wkv_b(self.kv_norm(latent_BSL)).view(B, S, -1, self.nope_dim + self.v_dim)
        k_nope_BSHE, v_BSHE = kv_BSHE.split([self.nope_dim, self.v_dim], dim=-1)
        num_heads = k_nope_BSHE.shape[2]
        q_BSHE = torch.cat([q_nope_BSHE, apply_rope(q_pe_BSHE, cos, sin)], dim=-1)
        k_BSHE = torch.cat([k_nope_BSHE, k_pe_BS1E.expand(-1, -1, num_heads, -1)], dim=-1)
        out_BHSE = F.scaled_dot_product_attention(
            q_BSHE.transpose(1, 2),
            k_BSHE.transpose(1, 2),
            v_BSHE.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
        )
        return self.wo(out_BHSE.transpose(1, 2).reshape(B, S, -1))


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of layer `layer_idx`: Gated DeltaNet on Qwen3-Next's linear-attention
    layers, else the configured softmax attention."""
    if cfg.is_linear_attention_layer(layer_idx):
        from model.linear_attention import GatedDeltaNet

        return GatedDeltaNet(cfg)
    return {"gqa": GroupedQueryAttention, "mla": MultiHeadLatentAttention}[cfg.attention](cfg, layer_idx)
