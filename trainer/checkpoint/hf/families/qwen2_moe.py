"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): q/k/v biases, softmax top-k (not
renormalised in the releases), and in every MoE layer one shared expert whose output is scaled
per token by sigmoid(shared_expert_gate(x)); `decoder_sparse_step` and `mlp_only_layers` place
the MoE layers."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link


class Qwen2MoE(base.Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        base.refuse_sliding_window(hf)
        num_layers = hf.get_int("num_hidden_layers")
        hf.expect("layer_types", (["full_attention"] * num_layers,), "only full attention is supported")
        # Required: absent, transformers would not assume multi-head attention as common_config does.
        hf.get_int("num_key_value_heads")
        common = base.common_config(hf, default_theta=10000.0)
        moe, placement = base.qwen_moe(
            hf, notes, num_layers, base.num_experts_of(hf), False, **base.gated_shared_expert(hf)
        )
        return ModelConfig(
            name="qwen2_moe",
            ffn_hidden=hf.get_int("intermediate_size"),
            qkv_bias=bool(hf.get("qkv_bias", True)),  # absent from the Qwen1.5-MoE config: always on then
            moe=moe,
            **placement,
            **common,
        )

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        return {
            **base.common_config_to_hf(cfg, self),
            **base.qwen_moe_to_hf(cfg),
            **base.gated_shared_expert_to_hf(cfg, self),
            "qkv_bias": cfg.qkv_bias,
            "use_sliding_window": False,
            "layer_types": ["full_attention"] * cfg.num_layers,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i)
            links += base.mlp_links(cfg, i, layout, shared_expert=True)
        return links
