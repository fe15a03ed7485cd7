"""OLMoE (allenai/OLMoE-1B-7B-0924): every layer MoE, softmax top-k (not renormalised in the
release), q/k RMSNorms over the whole q and k projections (before the split into heads), then `clip_qkv`
(null in the release) clamping q, k and v."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, MoEConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link


class OLMoE(base.Family):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        hf.expect("attention_bias", (False,), "it biases o_proj too; moeforge has q/k/v biases only")
        hf.expect("sliding_window", (), "sliding-window attention is not supported yet")
        dim, heads = hf.get_int("hidden_size"), hf.get_int("num_attention_heads")
        # transformers sizes the q/k norms from hidden_size / heads whatever head_dim says.
        hf.expect("head_dim", (dim // heads,), "OLMoE's q/k norms need head_dim = hidden_size / heads")
        common = base.common_config(hf, default_theta=10000.0)
        top_k, hidden = hf.get_int("num_experts_per_tok"), hf.get_int("intermediate_size")
        moe = MoEConfig(
            num_experts=base.num_experts_of(hf),
            top_k=top_k,
            moe_ffn_hidden=hidden,
            score_func="softmax",
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=base.aux_coef_from_hf(
                float(hf.get("router_aux_loss_coef", 0.01)), top_k, common["num_layers"], notes
            ),
        )
        return ModelConfig(
            name="olmoe",
            ffn_hidden=hidden,
            qk_norm=True,
            qk_norm_scope="projection",
            clip_qkv=float(hf.get("clip_qkv", 0.0)),
            moe=moe,
            **common,
        )

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        return {
            **base.common_config_to_hf(cfg, self),
            "intermediate_size": cfg.moe.moe_ffn_hidden,
            "num_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "norm_topk_prob": cfg.moe.norm_topk_prob,
            "router_aux_loss_coef": base.aux_coef_to_hf(cfg),
            "attention_bias": False,
            "clip_qkv": cfg.clip_qkv or None,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i) + base.mlp_links(cfg, i, layout)
        return links
