"""Analytic parameter counts of a `ModelConfig`: total and active, without building the model.

Instant even for 671B configs, so recipes can state and check their published sizes, and the
launcher's dry run can estimate memory. `tests/unit/test_recipes.py` pins these formulas to the
real module: on the meta device, `sum(p.numel() for p in model.parameters())` must equal the
total here exactly.

Conventions (they match how Mistral, Qwen, DeepSeek and Meta report their models):
- Everything that is an `nn.Parameter` counts: the input embedding, the output head (unless
  tied, then once), every RMSNorm weight, the router weight. Buffers (RoPE tables, the router's
  expert bias for aux-loss-free balancing) do not. Biases count (only `qkv_bias` has any).
- Active = the parameters one token touches: all of them except the routed experts it is not
  sent to. Per MoE layer only `top_k` of `num_experts` routed experts count; the router and the
  shared experts always do. By default the input embedding table counts whole, although a token
  reads one row of it: Mistral, Qwen and Meta count it so. DeepSeek does not (its README_WEIGHTS
  gives 36.6B active "including 0.9B for the output head"): `active_input_embedding=False`.
  With tied embeddings the table is also the output head and always counts.
- Multi-token-prediction modules are left out unless `include_mtp=True`: DeepSeek-V3's "671B
  total / 37B active" excludes its MTP module (the checkpoint's 685B includes it). The MTP
  modules share the embedding and the output head, so they add no embedding parameters here.
- The architecture knobs count where they live: q/k/v biases (`qkv_bias`) and the gated
  attention's doubled `wq` (`attention_output_gate`) in attention, the projection-wide q/k norms
  (`qk_norm_scope=projection`) at their width, the shared-expert gate (D weights) with the shared
  experts, which are always active. Gated DeltaNet layers (`linear_attention`) count their own
  mixer (`linear_attention_params`) in place of attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one transformer block. `experts` are the routed experts only."""

    norms: int
    attention: int
    mlp: int  # dense SwiGLU, or router + shared experts in an MoE layer
    experts: int  # all routed experts (0 in a dense layer)
    active_experts: int  # the top_k routed experts one token uses

    @property
    def total(self) -> int:
        return self.norms + self.attention + self.mlp + self.experts

    @property
    def active(self) -> int:
        return self.norms + self.attention + self.mlp + self.active_experts


def _swiglu(dim: int, hidden: int) -> int:
    return 3 * dim * hidden  # w1 [F, D], w3 [F, D], w2 [D, F]


def linear_attention_params(cfg: ModelConfig) -> int:
    """A Gated DeltaNet layer: q/k/v/z and beta/decay projections, depthwise convs over q, k, v,
    A_log and dt_bias per value head, the gated output norm (one head's width) and `wo`."""
    la, d = cfg.linear_attention, cfg.dim
    key, value = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
    projections = d * (2 * key + 2 * value + 2 * la.num_value_heads) + value * d
    return projections + (2 * key + value) * la.conv_kernel + 2 * la.num_value_heads + la.value_head_dim


def attention_params(cfg: ModelConfig, layer_idx: int = 0) -> int:
    """The token mixer of layer `layer_idx` (softmax attention or Gated DeltaNet)."""
    d = cfg.dim
    if cfg.is_linear_attention_layer(layer_idx):
        return linear_attention_params(cfg)
    if cfg.attention == "mla":
        m = cfg.mla
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank > 0:
            q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * cfg.num_heads * qk_head
        else:
            q = d * cfg.num_heads * qk_head
        kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + cfg.num_heads * m.v_head_dim * d
    hd = cfg.resolved_head_dim
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    wq_out = 2 * q_out if cfg.attention_output_gate else q_out  # + one gate per query dim
    bias = wq_out + 2 * kv_out if cfg.qkv_bias else 0
    qk_norm = 0
    if cfg.qk_norm:
        qk_norm = q_out + kv_out if cfg.qk_norm_scope == "projection" else 2 * hd
    return d * wq_out + 2 * d * kv_out + q_out * d + bias + qk_norm


def layer_params(cfg: ModelConfig, layer_idx: int) -> LayerParams:
    """Counts for block `layer_idx` (an MTP block uses the kind of the last layer)."""
    d, norms, attn = cfg.dim, 2 * cfg.dim, attention_params(cfg, layer_idx)
    if not cfg.is_moe_layer(layer_idx):
        return LayerParams(norms, attn, _swiglu(d, cfg.ffn_hidden), 0, 0)
    moe = cfg.moe
    router = moe.num_experts * d
    shared_hidden = moe.shared_ffn_hidden or moe.num_shared_experts * moe.moe_ffn_hidden
    shared = _swiglu(d, shared_hidden) if moe.num_shared_experts > 0 else 0
    if moe.num_shared_experts > 0 and moe.shared_expert_gate:
        shared += d  # Linear(D, 1)
    expert = _swiglu(d, moe.moe_ffn_hidden)
    return LayerParams(norms, attn, router + shared, moe.num_experts * expert, moe.top_k * expert)


def mtp_params(cfg: ModelConfig) -> LayerParams:
    """One MTP module: enorm, hnorm, proj [D, 2D], a block like the last layer, a final norm."""
    block = layer_params(cfg, cfg.num_layers - 1)
    extra = 3 * cfg.dim + 2 * cfg.dim * cfg.dim
    return LayerParams(block.norms + extra, block.attention, block.mlp, block.experts, block.active_experts)


def count_params(
    cfg: ModelConfig, include_mtp: bool = False, active_input_embedding: bool = True
) -> tuple[int, int]:
    """(total, active) parameter counts of `cfg`; see the module docstring for conventions."""
    table = cfg.vocab_size * cfg.dim
    embed = table * (1 if cfg.tie_embeddings else 2) + cfg.dim  # + the final norm
    layers = [layer_params(cfg, i) for i in range(cfg.num_layers)]
    if include_mtp:
        layers += [mtp_params(cfg)] * cfg.mtp_depth
    total = embed + sum(p.total for p in layers)
    active = embed + sum(p.active for p in layers)
    if not active_input_embedding and not cfg.tie_embeddings:
        active -= table
    return total, active


def format_params(cfg: ModelConfig, include_mtp: bool = False) -> str:
    """One line for logs and dry runs, e.g. `671.0B total, 37.6B active` (`M` below a billion)."""
    total, active = count_params(cfg, include_mtp)
    scale, unit = (1e9, "B") if total >= 1e9 else (1e6, "M")
    return f"{total / scale:.1f}{unit} total, {active / scale:.1f}{unit} active"
