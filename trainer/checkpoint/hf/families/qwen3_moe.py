"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, 235B-A22B): per-head q/k norms, explicit head_dim, softmax
top-k (renormalised when `norm_topk_prob`), no shared expert; `decoder_sparse_step` and
`mlp_only_layers` place the MoE layers."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link


class Qwen3MoE(base.Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        hf.expect("attention_bias", (False,), "it biases o_proj too; moeforge has q/k/v biases only")
        base.refuse_sliding_window(hf)
        # Required: absent, transformers would not assume multi-head attention as common_config does.
        hf.get_int("num_key_value_heads")
        common = base.common_config(hf, default_theta=10000.0)
        moe, placement = base.qwen_moe(hf, notes, common["num_layers"], base.num_experts_of(hf), False)
        return ModelConfig(
            name="qwen3_moe",
            ffn_hidden=hf.get_int("intermediate_size"),
            qk_norm=True,
            moe=moe,
            **placement,
            **common,
        )

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        return {
            **base.common_config_to_hf(cfg, self),
            **base.qwen_moe_to_hf(cfg),
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i) + base.mlp_links(cfg, i, layout)
        return links
