"""Model configuration: the shape of a decoder-only MoE transformer.

Plain dataclasses (no Hydra imports) so the model package stays usable on its own; the trainer
registers them in Hydra's ConfigStore and validates them before any work (`trainer/validate.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values share a low-rank latent."""

    q_lora_rank: int = 0  # 0: queries projected directly, no low-rank bottleneck
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128


@dataclass
class RopeScalingConfig:
    """Context extension of RoPE's frequencies (transformers' `rope_parameters`/`rope_scaling`)."""

    type: str = "none"  # none | linear | llama3 | yarn
    factor: float = 1.0  # how much longer the context is than at pretraining
    original_max_seq_len: int = 0  # llama3/yarn: the pretraining context (0: max_seq_len / factor)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are scaled ...
    high_freq_factor: float = 4.0  # ... below original / high_freq_factor kept, in between blended
    beta_fast: float = 32.0  # yarn: dims rotating more than beta_fast times are kept ...
    beta_slow: float = 1.0  # ... fewer than beta_slow times interpolated, in between ramped
    truncate: bool = True  # yarn: round the ramp's ends to whole dims
    # yarn: cos/sin scaled by attention_factor (0: derived from factor, mscale, mscale_all_dim as
    # in the YaRN paper); with mscale_all_dim the softmax scale is also multiplied by
    # (0.1 * mscale_all_dim * ln(factor) + 1)^2 (DeepSeek-V3's MLA).
    attention_factor: float = 0.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0


@dataclass
class LinearAttentionConfig:
    """Gated DeltaNet layers (Qwen3-Next): linear attention with a delta-rule state update."""

    # Every full_attention_interval-th layer is full attention, the others Gated DeltaNet
    # (Qwen3-Next: 4); 0 = no linear-attention layers.
    full_attention_interval: int = 0
    num_key_heads: int = 16
    num_value_heads: int = 32  # a multiple of num_key_heads: each q/k head serves a group of v heads
    key_head_dim: int = 128
    value_head_dim: int = 128
    conv_kernel: int = 4  # short causal depthwise convolution over q, k and v
    chunk_size: int = 64  # sequence chunk of the chunked (WY) form; no effect on the result


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    moe_ffn_hidden: int = 256  # hidden size of one routed expert (fine-grained experts: small)
    num_shared_experts: int = 0
    shared_ffn_hidden: int = 0  # 0: num_shared_experts * moe_ffn_hidden
    score_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    router_jitter: float = 0.0  # multiplicative input noise in training (Switch), 0 = off
    num_groups: int = 1  # group-limited routing: experts split into groups ...
    topk_groups: int = 1  # ... and only the best `topk_groups` groups may be chosen
    capacity_factor: float = 0.0  # 0 = dropless; else capacity = ceil(cf * tokens * k / E)
    drop_policy: str = "probs"  # probs: drop lowest-weight assignments | position: drop latest tokens
    aux_loss_coef: float = 0.01
    aux_loss_scope: str = "micro_batch"  # micro_batch | sequence | global_batch
    z_loss_coef: float = 0.0
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    bias_update_rate: float = 1e-3
    # Shared experts' output scaled per token by sigmoid(Linear(dim, 1)(x)) (Qwen2-MoE, Qwen3-Next).
    shared_expert_gate: bool = False
    # Scale each routed copy by its weight *before* its expert and sum the outputs unweighted
    # (Llama 4); default: weight the expert outputs.
    weights_on_input: bool = False


@dataclass
class ModelConfig:
    name: str = "tiny_moe"
    vocab_size: int = 8192
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: dim // num_heads
    ffn_hidden: int = 768  # dense SwiGLU hidden size (dense layers)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    attention: str = "gqa"  # gqa | mla
    qk_norm: bool = False  # RMSNorm on the queries and keys (GQA)
    # head: over each head's head_dim (Qwen3) | projection: over the whole q and the whole k
    # projection, before the split into heads (OLMoE; needs tp=1)
    qk_norm_scope: str = "head"
    qkv_bias: bool = False  # biases on wq/wk/wv, never on wo (Qwen2-MoE); GQA
    # Qwen3-Next's gated attention: wq also yields a gate per head, laid out per head as
    # [query_h, gate_h]; the attention output (before wo) is multiplied by sigmoid(gate). GQA.
    attention_output_gate: bool = False
    # RoPE on the first int(head_dim * factor) dims of each q/k head, the rest pass through
    # (Qwen3-Next: 0.25). GQA; MLA has its own qk_rope_head_dim.
    partial_rotary_factor: float = 1.0
    # Every RMSNorm scales by (1 + weight), weight initialised to 0 (Qwen3-Next)
    norm_zero_centered: bool = False
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Llama 4's iRoPE: every nope_layer_interval-th layer uses no RoPE (4); 0 = RoPE everywhere.
    nope_layer_interval: int = 0
    # Llama 4, NoPE layers only: queries scaled by 1 + attn_scale * ln(1 + floor((pos + 1) / floor_scale)).
    attn_temperature_tuning: bool = False
    attn_floor_scale: int = 8192
    attn_scale: float = 0.1
    # Llama 4, RoPE layers only: attention within aligned chunks of this many tokens; 0 = off.
    attention_chunk_size: int = 0
    # Llama 4, RoPE layers only: weightless RMS ("L2") norm of q and k per head, after RoPE.
    qk_l2_norm: bool = False
    sliding_window: int = 0  # each token attends to itself and the previous window-1; 0 = off
    clip_qkv: float = 0.0  # clamp q, k, v projections to [-clip, clip] (OLMoE); 0 = off
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    linear_attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    first_k_dense: int = 0  # the first k layers use a dense MLP (DeepSeek-V3: 3)
    moe_layer_freq: int = 1  # layer i >= first_k_dense is MoE when (i + 1) % freq == 0 (Llama 4: 2)
    mlp_only_layers: list[int] = field(default_factory=list)  # further dense layers (Qwen)
    tie_embeddings: bool = False
    mtp_depth: int = 0  # multi-token prediction modules (DeepSeek-V3: 1)
    mtp_loss_coef: float = 0.3
    init_std: float = 0.02
    # Published parameter counts in billions, for recipes of released models; 0 = not stated.
    published_total_b: float = 0.0
    published_active_b: float = 0.0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each query/key head that RoPE rotates (the size of the rope tables)."""
        if self.attention == "mla":
            return self.mla.qk_rope_head_dim
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            layer_idx >= self.first_k_dense
            and (layer_idx + 1) % self.moe_layer_freq == 0
            and layer_idx not in self.mlp_only_layers
        )

    def is_linear_attention_layer(self, layer_idx: int) -> bool:
        interval = self.linear_attention.full_attention_interval
        return interval > 0 and (layer_idx + 1) % interval != 0

    def uses_rope(self, layer_idx: int) -> bool:
        return self.nope_layer_interval == 0 or (layer_idx + 1) % self.nope_layer_interval != 0
