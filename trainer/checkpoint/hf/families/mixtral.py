"""Mixtral (mistralai/Mixtral-8x7B, 8x22B): every layer MoE, softmax top-k renormalised;
`sliding_window` (null in the releases) as moeforge's sliding-window attention."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, MoEConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link


class Mixtral(base.Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        common = base.common_config(hf, default_theta=1e6)
        top_k, num_layers = hf.get_int("num_experts_per_tok"), common["num_layers"]
        hidden = hf.get_int("intermediate_size")
        moe = MoEConfig(
            num_experts=hf.get_int("num_local_experts"),
            top_k=top_k,
            moe_ffn_hidden=hidden,
            score_func="softmax",
            norm_topk_prob=True,
            router_jitter=float(hf.get("router_jitter_noise", 0.0)),
            aux_loss_coef=base.aux_coef_from_hf(
                float(hf.get("router_aux_loss_coef", 0.0)), top_k, num_layers, notes
            ),
        )
        window = hf.get_int("sliding_window", 0)
        return ModelConfig(name="mixtral", ffn_hidden=hidden, moe=moe, sliding_window=window, **common)

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        return {
            **base.common_config_to_hf(cfg, self),
            "intermediate_size": cfg.moe.moe_ffn_hidden,
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "router_jitter_noise": cfg.moe.router_jitter,
            "router_aux_loss_coef": base.aux_coef_to_hf(cfg),
            "sliding_window": cfg.sliding_window or None,
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        moe = "block_sparse_moe" if layout == base.PER_EXPERT else "mlp"
        names = ("w1", "w3", "w2") if layout == base.PER_EXPERT else ("gate_proj", "up_proj", "down_proj")
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i)
            links.append(
                Link(
                    f"layers.{i}.moe.router.gate.weight",
                    f"model.layers.{i}.{moe}.gate.weight",
                    (cfg.moe.num_experts, cfg.dim),
                )
            )
            links += base.expert_links(cfg, i, f"model.layers.{i}.{moe}.experts", layout, names)
        return links
