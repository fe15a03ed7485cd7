"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B): gated attention (q_proj also yields a sigmoid gate per
head), partial RoPE (a quarter of each head by default), zero-centred RMSNorms (1 + weight)
everywhere, per-head q/k norms, softmax top-k renormalised, and a shared expert with a sigmoid
gate in every MoE layer. Its Gated DeltaNet (linear attention) layers are not supported yet, so
only checkpoints whose `layer_types` are all full attention import (the released ones are not)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link

DEFAULT_PARTIAL_ROTARY = 0.25  # what Qwen3NextConfig assumes when config.json does not say
# Sizes of the Gated DeltaNet layers only: no effect once every layer is full attention.
LINEAR_ATTENTION_FIELDS = (
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads",
)  # fmt: skip


class Qwen3Next(base.Family):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        hf.expect("attention_bias", (False,), "it biases o_proj too; moeforge has q/k/v biases only")
        base.refuse_sliding_window(hf)
        num_layers = hf.get_int("num_hidden_layers")
        self._refuse_linear_attention(hf, num_layers)
        hf.ignore(*LINEAR_ATTENTION_FIELDS)
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
            moe=moe,
            **placement,
            **common,
        )

    @staticmethod
    def _refuse_linear_attention(hf: HFConfig, num_layers: int) -> None:
        """`layer_types`, or when absent transformers' default from `full_attention_interval`
        (every 4th layer full attention, the others Gated DeltaNet)."""
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
        other = [i for i, t in enumerate(types) if t != "full_attention"]
        if other:
            raise hf.error(
                field,
                f"makes layers {other} {types[other[0]]!r}: only 'full_attention' layers are supported, "
                "Gated DeltaNet (linear attention) is not yet; nothing was written",
            )

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        hf = base.common_config_to_hf(cfg, self)
        # Always written: absent, transformers would assume 0.25.
        hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        return {
            **hf,
            **base.qwen_moe_to_hf(cfg),
            **base.gated_shared_expert_to_hf(cfg, self),
            "attention_bias": False,
            "layer_types": ["full_attention"] * cfg.num_layers,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        # Zero-centred norms: the weights are stored as the model uses them (1 + w), no shift.
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i)
            links += base.mlp_links(cfg, i, layout, shared_expert=True)
        return links
