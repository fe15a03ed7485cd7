"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B): gated attention (q_proj also yields a sigmoid gate per
head), partial RoPE (a quarter of each head by default), zero-centred RMSNorms (1 + weight)
everywhere, per-head q/k norms, softmax top-k renormalised, and a shared expert with a sigmoid
gate in every MoE layer. Three of every four layers are Gated DeltaNet (linear attention):
`layer_types`, or transformers' default from `full_attention_interval`, becomes our
`linear_attention.full_attention_interval`; its fused projections `in_proj_qkvz` / `in_proj_ba`
are grouped per key head ([q_g, k_g, v_g, z_g] and [b_g, a_g]) and split into our per-head
`wq`/`wk`/`wv`/`wz`/`wb`/`wa`, its conv over [q|k|v] channels into `conv_q`/`conv_k`/`conv_v`."""

from __future__ import annotations

from typing import Any

from model.config import LinearAttentionConfig, ModelConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link

DEFAULT_PARTIAL_ROTARY = 0.25  # what Qwen3NextConfig assumes when config.json does not say


class Qwen3Next(base.Family):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        hf.expect("attention_bias", (False,), "it biases o_proj too; moeforge has q/k/v biases only")
        base.refuse_sliding_window(hf)
        num_layers = hf.get_int("num_hidden_layers")
        linear = self._linear_attention(hf, num_layers)
        rope = hf.raw.get("rope_parameters") or {}
        partial_given = "partial_rotary_factor" in rope or hf.raw.get("partial_rotary_factor") is not None
        # Required: absent, transformers would assume 2 kv heads and head_dim 256, not what
        # common_config assumes (multi-head, hidden / heads).
        hf.get_int("num_key_value_heads")
        hf.get_int("head_dim")
        common = base.common_config(hf, default_theta=10000.0)
        if not partial_given:
            common["partial_rotary_factor"] = DEFAULT_PARTIAL_ROTARY
        moe, placement = base.qwen_moe(
            hf, notes, num_layers, hf.get_int("num_experts"), True, **base.gated_shared_expert(hf)
        )
        return ModelConfig(
            name="qwen3_next",
            ffn_hidden=hf.get_int("intermediate_size"),
            qk_norm=True,
            attention_output_gate=True,
            norm_zero_centered=True,
            linear_attention=linear,
            moe=moe,
            **placement,
            **common,
        )

    @staticmethod
    def _linear_attention(hf: HFConfig, num_layers: int) -> LinearAttentionConfig:
        """`layer_types`, or when absent transformers' default from `full_attention_interval`
        (every 4th layer full attention, the others Gated DeltaNet), as our interval."""
        interval = hf.get_int("full_attention_interval", 4)
        if hf.raw.get("layer_types") is not None:
            field, types = "layer_types", hf.get("layer_types")
        elif interval < 1:
            raise hf.error("full_attention_interval", f"={interval} must be >= 1; nothing was written")
        else:
            field = "full_attention_interval"
            types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
            ]
        if not isinstance(types, list) or len(types) != num_layers:
            raise hf.error(
                field,
                f"={types!r} must list one type per layer (num_hidden_layers={num_layers}); nothing was written",
            )
        unknown = sorted(set(types) - {"full_attention", "linear_attention"})
        if unknown:
            raise hf.error(field, f"has layer type {unknown[0]!r}; nothing was written")
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        ours = full[0] + 1 if full else 0  # the interval that the first full-attention layer implies
        if not full or full != list(range(ours - 1, num_layers, ours)):
            raise hf.error(
                field,
                f"makes layers {full} full attention: moeforge expresses 'every n-th layer full attention, "
                "the others Gated DeltaNet' only; nothing was written",
            )
        fields = dict(
            num_key_heads=hf.get_int("linear_num_key_heads", 16),
            num_value_heads=hf.get_int("linear_num_value_heads", 32),
            key_head_dim=hf.get_int("linear_key_head_dim", 128),
            value_head_dim=hf.get_int("linear_value_head_dim", 128),
            conv_kernel=hf.get_int("linear_conv_kernel_dim", 4),
        )
        if ours == 1:  # every layer full attention: the linear-attention sizes have no effect
            return LinearAttentionConfig()
        if fields["num_value_heads"] % fields["num_key_heads"]:
            raise hf.error("linear_num_value_heads", "must be a multiple of linear_num_key_heads")
        return LinearAttentionConfig(full_attention_interval=ours, **fields)

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        hf = base.common_config_to_hf(cfg, self)
        # Always written: absent, transformers would assume 0.25.
        hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        return {
            **hf,
            **base.qwen_moe_to_hf(cfg),
            **base.gated_shared_expert_to_hf(cfg, self),
            "attention_bias": False,
            "layer_types": [
                "linear_attention" if cfg.is_linear_attention_layer(i) else "full_attention"
                for i in range(cfg.num_layers)
            ],
            "full_attention_interval": cfg.linear_attention.full_attention_interval or 1,
            "linear_num_key_heads": cfg.linear_attention.num_key_heads,
            "linear_num_value_heads": cfg.linear_attention.num_value_heads,
            "linear_key_head_dim": cfg.linear_attention.key_head_dim,
            "linear_value_head_dim": cfg.linear_attention.value_head_dim,
            "linear_conv_kernel_dim": cfg.linear_attention.conv_kernel,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        # Zero-centred norms: the weights are stored as the model uses them (1 + w), no shift.
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            mixer = (
                gated_deltanet_links(cfg, i) if cfg.is_linear_attention_layer(i) else base.gqa_links(cfg, i)
            )
            links += base.block_norm_links(cfg, i) + mixer
            links += base.mlp_links(cfg, i, layout, shared_expert=True)
        return links


def gated_deltanet_links(cfg: ModelConfig, i: int) -> list[Link]:
    """One Gated DeltaNet layer: HF's fused projections hold, per key head g, the rows
    [q_g (dk), k_g (dk), v_g (r*dv), z_g (r*dv)] and [b_g (r), a_g (r)], r = value heads per key
    head; our projections hold whole heads in order, so each group is a block of each of ours."""
    la, d = cfg.linear_attention, cfg.dim
    hk, dk, dv = la.num_key_heads, la.key_head_dim, la.value_head_dim
    r = la.num_value_heads // hk
    key, value = hk * dk, la.num_value_heads * dv
    ours, hf = f"layers.{i}.attention", f"model.layers.{i}.linear_attn"
    qkvz, ba = (2 * key + 2 * value, d), (2 * la.num_value_heads, d)
    links = []
    for g in range(hk):
        start = g * (2 * dk + 2 * r * dv)
        for name, offset, rows in (
            ("wq", 0, dk),
            ("wk", dk, dk),
            ("wv", 2 * dk, r * dv),
            ("wz", 2 * dk + r * dv, r * dv),
        ):
            block = (slice(g * rows, (g + 1) * rows),)
            hf_block = (slice(start + offset, start + offset + rows),)
            links.append(Link(f"{ours}.{name}.weight", f"{hf}.in_proj_qkvz.weight", qkvz, block, hf_block))
        for name, offset in (("wb", 0), ("wa", r)):
            block = (slice(g * r, (g + 1) * r),)
            hf_block = (slice(g * 2 * r + offset, g * 2 * r + offset + r),)
            links.append(Link(f"{ours}.{name}.weight", f"{hf}.in_proj_ba.weight", ba, block, hf_block))
    conv = (2 * key + value, 1, la.conv_kernel)
    for name, start, rows in (("conv_q", 0, key), ("conv_k", key, key), ("conv_v", 2 * key, value)):
        links.append(Link(f"{ours}.{name}", f"{hf}.conv1d.weight", conv, (), (slice(start, start + rows), 0)))
    return links + [
        Link(f"{ours}.A_log", f"{hf}.A_log", (la.num_value_heads,)),
        Link(f"{ours}.dt_bias", f"{hf}.dt_bias", (la.num_value_heads,)),
        Link(f"{ours}.out_norm.weight", f"{hf}.norm.weight", (dv,)),
        Link(f"{ours}.wo.weight", f"{hf}.out_proj.weight", (d, value)),
    ]
