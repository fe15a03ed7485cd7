"""Gated DeltaNet, Qwen3-Next's linear attention, in plain PyTorch (no FLA kernels).

Each value head keeps a [K, V] state that decays by exp(g_t) and is corrected towards v_t by a
delta-rule step of size beta_t:  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
o_t = S_t^T q_t. Each q/k head serves H/G consecutive value heads. Head counts are read from the
projected tensors and per-head parameters through `_local`, so tensor parallelism can shard the
projections and those parameters by heads (dim 0) and each rank runs its heads unchanged.
Shape legend: B batch, S sequence, D model dim, G q/k heads, H value heads, K q/k head dim,
V value head dim, W conv kernel, N chunks, C chunk size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from model.config import ModelConfig


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter that tensor parallelism may have made a DTensor."""
    return p.to_local() if isinstance(p, DTensor) else p


def _core_dtype(x: torch.Tensor) -> torch.dtype:
    # The recurrence runs in fp32 (as HF and FLA do): bf16 states drift over long sequences.
    return torch.promote_types(x.dtype, torch.float32)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _causal_conv_silu(x_BSC: torch.Tensor, w_CW: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution over the sequence (channel c sees positions t-W+1..t), then SiLU."""
    seq_len, width = x_BSC.shape[1], w_CW.shape[1]
    out_BCS = F.conv1d(x_BSC.transpose(1, 2), w_CW.unsqueeze(1), padding=width - 1, groups=w_CW.shape[0])
    return F.silu(out_BCS[..., :seq_len]).transpose(1, 2)


def recurrent_gated_delta_rule(
    q_BSGK: torch.Tensor,
    k_BSGK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor,
) -> torch.Tensor:
    """The reference: the update above, token by token. q/k come normalised and scaled; returns o_BSHV."""
    reps = v_BSHV.shape[2] // k_BSGK.shape[2]
    q_BSHK, k_BSHK = (x.repeat_interleave(reps, dim=2) for x in (q_BSGK, k_BSGK))
    B, S, H, K = q_BSHK.shape
    state_BHKV = v_BSHV.new_zeros(B, H, K, v_BSHV.shape[-1])
    outs = []
    for t in range(S):
        k_BHK, decay_BH11 = k_BSHK[:, t], g_BSH[:, t].exp()[..., None, None]
        state_BHKV = state_BHKV * decay_BH11
        delta_BHV = (v_BSHV[:, t] - torch.einsum("bhkv,bhk->bhv", state_BHKV, k_BHK)) * beta_BSH[
            :, t, :, None
        ]
        state_BHKV = state_BHKV + k_BHK[..., :, None] * delta_BHV[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state_BHKV, q_BSHK[:, t]))
    return torch.stack(outs, dim=1)


def chunk_gated_delta_rule(
    q_BSGK: torch.Tensor,
    k_BSGK: torch.Tensor,
    v_BSHV: torch.Tensor,
    g_BSH: torch.Tensor,
    beta_BSH: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """The same result in chunks of C tokens: inside a chunk, the delta-rule corrections u ("new
    values") solve one unit lower-triangular system (the WY / UT transform); only the state crosses
    chunks. With cumulative in-chunk log decay c_i and start state S0:
      u_i = beta_i (v_i - e^{c_i} S0^T k_i - sum_{j<i} e^{c_i - c_j} (k_i . k_j) u_j)
      o_i = e^{c_i} S0^T q_i + sum_{j<=i} e^{c_i - c_j} (q_i . k_j) u_j
      S_C = e^{c_C} S0 + sum_j e^{c_C - c_j} k_j u_j^T.
    The sequence is padded to a multiple of C with g = beta = 0 (no decay, no update)."""
    reps = v_BSHV.shape[2] // k_BSGK.shape[2]
    q_BSHK, k_BSHK = (x.repeat_interleave(reps, dim=2) for x in (q_BSGK, k_BSGK))
    B, S, H, K = q_BSHK.shape
    C, pad = chunk_size, -S % chunk_size

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, *] -> [B, H, N, C, *]
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q, k, v, g_BHNC, beta_BHNC = (chunked(x) for x in (q_BSHK, k_BSHK, v_BSHV, g_BSH, beta_BSH))
    cum_BHNC = g_BHNC.cumsum(-1)
    upper_CC = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    # decay_ij = e^{c_i - c_j} for j <= i, else 0 (masked before exp: no overflow)
    decay_BHNCC = (cum_BHNC[..., :, None] - cum_BHNC[..., None, :]).masked_fill(upper_CC, float("-inf")).exp()
    k_beta = k * beta_BHNC[..., None]
    # (I + A) u = beta v - beta e^{c} k S0, A strictly lower; solve once for both right-hand sides.
    system = torch.eye(C, dtype=q.dtype, device=q.device) + (
        (k_beta @ k.transpose(-1, -2)) * decay_BHNCC
    ).tril(-1)
    rhs = torch.cat([v * beta_BHNC[..., None], k_beta * cum_BHNC.exp()[..., None]], dim=-1)
    u0_BHNCV, w_BHNCK = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True).split(
        [v.shape[-1], K], dim=-1
    )
    attn_BHNCC = (q @ k.transpose(-1, -2)) * decay_BHNCC
    q_decayed = q * cum_BHNC.exp()[..., None]
    k_to_end = k * (cum_BHNC[..., -1:] - cum_BHNC).exp()[..., None]
    chunk_decay_BHN = cum_BHNC[..., -1].exp()
    state_BHKV = v.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for n in range(q.shape[2]):
        u_BHCV = u0_BHNCV[:, :, n] - w_BHNCK[:, :, n] @ state_BHKV
        outs.append(q_decayed[:, :, n] @ state_BHKV + attn_BHNCC[:, :, n] @ u_BHCV)
        state_BHKV = (
            state_BHKV * chunk_decay_BHN[:, :, n, None, None] + k_to_end[:, :, n].transpose(-1, -2) @ u_BHCV
        )
    return torch.stack(outs, dim=2).reshape(B, H, -1, v.shape[-1])[:, :, :S].transpose(1, 2)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's V dims in the core's precision, `weight * normed` with the weight
    starting at 1 even in zero-centred models (as Qwen3-Next's RMSNormGated; its silu(z) gate is
    applied by the caller, so tensor parallelism can treat this like the GQA q/k norms)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_core_dtype(x))
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(h.dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention token mixer. Projections kept separate (HF fuses them per key
    head as in_proj_qkvz / in_proj_ba) so that column sharding hands each rank whole heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        la = cfg.linear_attention
        self.key_head_dim, self.value_head_dim, self.chunk_size = (
            la.key_head_dim,
            la.value_head_dim,
            la.chunk_size,
        )
        key_width, value_width = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
        self.wq = nn.Linear(cfg.dim, key_width, bias=False)
        self.wk = nn.Linear(cfg.dim, key_width, bias=False)
        self.wv = nn.Linear(cfg.dim, value_width, bias=False)
        self.wz = nn.Linear(cfg.dim, value_width, bias=False)  # output gate
        self.wb = nn.Linear(cfg.dim, la.num_value_heads, bias=False)  # beta = sigmoid(b)
        self.wa = nn.Linear(cfg.dim, la.num_value_heads, bias=False)  # decay input
        self.conv_q = nn.Parameter(torch.empty(key_width, la.conv_kernel))
        self.conv_k = nn.Parameter(torch.empty(key_width, la.conv_kernel))
        self.conv_v = nn.Parameter(torch.empty(value_width, la.conv_kernel))
        self.A_log = nn.Parameter(torch.zeros(la.num_value_heads))
        self.dt_bias = nn.Parameter(torch.ones(la.num_value_heads))
        self.out_norm = HeadRMSNorm(la.value_head_dim, cfg.norm_eps)
        self.wo = nn.Linear(value_width, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        del cos, sin  # no positional encoding: the recurrence and the conv are causal by construction
        B, S, _ = x_BSD.shape
        dk, dv, dtype = self.key_head_dim, self.value_head_dim, _core_dtype(x_BSD)
        q_BSGK = _causal_conv_silu(self.wq(x_BSD), _local(self.conv_q)).view(B, S, -1, dk).to(dtype)
        k_BSGK = _causal_conv_silu(self.wk(x_BSD), _local(self.conv_k)).view(B, S, -1, dk).to(dtype)
        v_BSHV = _causal_conv_silu(self.wv(x_BSD), _local(self.conv_v)).view(B, S, -1, dv).to(dtype)
        q_BSGK, k_BSGK = _l2norm(q_BSGK) * dk**-0.5, _l2norm(k_BSGK)
        beta_BSH = torch.sigmoid(self.wb(x_BSD).to(dtype))
        a_BSH = self.wa(x_BSD).to(dtype) + _local(self.dt_bias).to(dtype)
        g_BSH = -_local(self.A_log).to(dtype).exp() * F.softplus(a_BSH)  # log decay, <= 0
        o_BSHV = chunk_gated_delta_rule(q_BSGK, k_BSGK, v_BSHV, g_BSH, beta_BSH, self.chunk_size)
        z_BSHV = self.wz(x_BSD).view(B, S, -1, dv)
        gated_BSHV = self.out_norm(o_BSHV) * F.silu(z_BSHV.to(dtype))
        return self.wo(gated_BSHV.to(x_BSD.dtype).reshape(B, S, -1))
