"""Model FLOPs per token and peak device throughput, for TFLOP/s and MFU.

Convention (as in torchtitan / PaLM appendix B): per trained token,
    6 * (active_params - input_embedding_params)      # forward 2N + backward 4N matmul FLOPs
  + 12 * num_layers * seq_len * attn_dim              # QK^T and AV, forward + backward
where active_params counts the parameters one token touches (top_k routed + shared experts,
from `model.params.count_params`), the input embedding table is excluded (a lookup, not a matmul;
with tied embeddings it is kept, because the output head multiplies by it), and attn_dim is the
summed head size num_heads * head_dim (MLA: num_heads * mean(qk head dim, v head dim)). The
attention term ignores causal masking, as the usual MFU numbers do, and counts full-attention
layers only: a Gated DeltaNet layer adds a term linear in the sequence (see
`linear_attention_flops_per_token`). MTP modules are included only
as far as `count_params` counts them.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig

# Dense bf16 peak per device (no sparsity), FLOP/s.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM / NVL
    "H200": 989e12,
}


def attention_dim(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        qk = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim
        return cfg.num_heads * (qk + cfg.mla.v_head_dim) // 2
    return cfg.num_heads * cfg.resolved_head_dim


def linear_attention_flops_per_token(cfg: ModelConfig) -> float:
    """Gated DeltaNet's core (beyond its projections), forward + backward, per token: per value
    head a state read and a state update (dk*dv multiply-adds each) and, within a chunk of C
    tokens, q.k and (q.k).v against the chunk (C*(dk + dv)); 2 FLOPs per multiply-add, x3 for
    the backward. Linear in the sequence length: no seq_len term."""
    la = cfg.linear_attention
    per_head = 2 * la.key_head_dim * la.value_head_dim + la.chunk_size * (la.key_head_dim + la.value_head_dim)
    return 6.0 * la.num_value_heads * per_head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    from model.params import count_params

    _, active = count_params(cfg)
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    linear = sum(cfg.is_linear_attention_layer(i) for i in range(cfg.num_layers))
    mixing = 12.0 * (cfg.num_layers - linear) * seq_len * attention_dim(cfg)
    return 6.0 * (active - embedding) + mixing + linear * linear_attention_flops_per_token(cfg)


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU, unlisted GPU): MFU is omitted."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None
