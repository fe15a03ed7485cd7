"""Dense Llama-style families (Llama, Mistral, Qwen2, Qwen3): imported as all-dense models, and
the sources of upcycling (`upcycle.py`)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link


class DenseFamily(base.Family):
    dense = True
    moe_counterpart: str  # the MoE family an upcycled model of this one exports as
    default_theta = 10000.0

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        hf.expect("attention_bias", (False,), "only q/k/v biases are supported")
        if hf.get("use_sliding_window", False):
            raise hf.error("use_sliding_window", "=true: sliding-window attention is not supported yet")
        if "use_sliding_window" in hf.raw:  # Qwen: the window size only counts when switched on
            hf.ignore("sliding_window", "max_window_layers")
        hf.expect("sliding_window", (), "sliding-window attention is not supported yet")
        hf.expect(
            "layer_types", ([*["full_attention"] * hf.get_int("num_hidden_layers")],), "only full attention"
        )
        common = base.common_config(hf, self.default_theta)
        return ModelConfig(
            name=self.model_type,
            ffn_hidden=hf.get_int("intermediate_size"),
            first_k_dense=common["num_layers"],
            **self.extra_from_hf(hf),
            **common,
        )

    def extra_from_hf(self, hf: HFConfig) -> dict[str, Any]:
        return {}

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        return {**base.common_config_to_hf(cfg, self), "intermediate_size": cfg.ffn_hidden}

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i)
            links += base.swiglu_links(
                f"layers.{i}.feed_forward", f"model.layers.{i}.mlp", cfg.dim, cfg.ffn_hidden
            )
        return links


class Llama(DenseFamily):
    model_type, architecture, moe_counterpart = "llama", "LlamaForCausalLM", "mixtral"


class Mistral(Llama):
    model_type, architecture = "mistral", "MistralForCausalLM"


class Qwen3(DenseFamily):
    model_type, architecture, moe_counterpart = "qwen3", "Qwen3ForCausalLM", "qwen3_moe"

    def extra_from_hf(self, hf: HFConfig) -> dict[str, Any]:
        return {"qk_norm": True}


class Qwen2(DenseFamily):
    model_type, architecture, moe_counterpart = "qwen2", "Qwen2ForCausalLM", "qwen2_moe"

    def extra_from_hf(self, hf: HFConfig) -> dict[str, Any]:
        return {"qkv_bias": True}
