"""Llama 4 text models (meta-llama/Llama-4-Maverick-17B-128E, Llama-4-Scout-17B-16E), as
`llama4_text` configs that `Llama4ForCausalLM` loads: GQA with complex-number RoPE (adjacent
pairs, permuted into our two halves), MoE layers every `interleave_moe_layer_step` layers (or
the `moe_layers` list). A MoE layer takes the sigmoid of each token's top-k router logits as
weights, multiplies them into the expert *input* (weights_on_input) and adds one shared expert
that sees every token. Dense layers are `intermediate_size_mlp` wide, routed and shared experts
`intermediate_size`. The Hub holds experts only fused, in our own orientation ([E, D, 2F] and
[E, F, D]); transformers knows no per-expert Llama 4 layout, so neither do we.

iRoPE as released: a NoPE layer every `no_rope_layer_interval` layers (nope_layer_interval),
attention temperature tuning of those layers' queries, chunked attention and the weightless L2
qk norm on the RoPE layers. Refused in one line: NoPE or chunked layer sets that are not that
regular pattern, attention biases.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig, MoEConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link
from trainer.checkpoint.hf.safetensors_io import conversion_error

ATTENTION_TYPES = ("full_attention", "chunked_attention")


def _int_list(hf: HFConfig, key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise hf.error(key, f"={value!r} must be a list of integers")
    return value


class Llama4(base.Family):
    model_type = "llama4_text"
    architecture = "Llama4ForCausalLM"
    native_layout = base.FUSED
    layouts = (base.FUSED,)

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        common = base.common_config(hf, default_theta=500000.0)
        num_layers = common["num_layers"]
        hf.expect("attention_bias", (False,), "q/k/v/o projections have no bias")
        qk_l2_norm = bool(hf.get("use_qk_norm", False))
        hf.ignore("for_llm_compressor")  # a flag for a quantisation tool
        nope_interval = self._nope_interval(hf, num_layers)

        # transformers' default layer_types: the RoPE layers chunked when a chunk size is set.
        chunk = hf.get("attention_chunk_size", None)
        types = hf.get("layer_types", None) or [
            "chunked_attention"
            if chunk is not None and (nope_interval == 0 or (i + 1) % nope_interval)
            else "full_attention"
            for i in range(num_layers)
        ]
        if len(types) != num_layers or set(types) - set(ATTENTION_TYPES):
            raise hf.error("layer_types", f"={types!r} must list {num_layers} of {ATTENTION_TYPES}")
        rope_layers = [i for i in range(num_layers) if nope_interval == 0 or (i + 1) % nope_interval]
        chunked = [i for i, t in enumerate(types) if t == "chunked_attention"]
        if chunked and chunked != rope_layers:
            raise hf.error(
                "layer_types",
                f"chunks layers {chunked}: moeforge chunks exactly the RoPE layers {rope_layers}; nothing was written",
            )
        if chunked and chunk is None:
            raise hf.error("attention_chunk_size", "is missing but layer_types has chunked_attention layers")
        tuning = bool(hf.get("attn_temperature_tuning", False)) and nope_interval > 0
        knobs = dict(
            nope_layer_interval=nope_interval,
            qk_l2_norm=qk_l2_norm,
            attention_chunk_size=int(chunk) if chunked else 0,
            attn_temperature_tuning=tuning,
            attn_floor_scale=hf.get_int("floor_scale", 8192),
            attn_scale=float(hf.get("attn_scale", 0.1)),
        )

        step = hf.get_int("interleave_moe_layer_step", 1)
        if step < 1:
            raise hf.error("interleave_moe_layer_step", f"={step} must be >= 1")
        moe_layers = hf.get("moe_layers", None)  # when given, it overrides the step
        if moe_layers is None:
            moe_layers = list(range(step - 1, num_layers, step))
        moe_layers = _int_list(hf, "moe_layers", moe_layers)
        if not all(0 <= i < num_layers for i in moe_layers):
            raise hf.error("moe_layers", f"={moe_layers} must be layer indices below {num_layers}")
        placement = base.moe_layer_pattern(set(moe_layers), num_layers)

        top_k = hf.get_int("num_experts_per_tok")
        hidden = hf.get_int("intermediate_size")
        moe = MoEConfig(
            num_experts=hf.get_int("num_local_experts"),
            top_k=top_k,
            moe_ffn_hidden=hidden,
            num_shared_experts=1,
            score_func="sigmoid",
            norm_topk_prob=False,
            weights_on_input=True,
            router_jitter=float(hf.get("router_jitter_noise", 0.0)),
            aux_loss_coef=base.aux_coef_from_hf(
                float(hf.get("router_aux_loss_coef", 0.0)), top_k, len(set(moe_layers)), notes
            ),
        )
        return ModelConfig(
            name=self.model_type,
            ffn_hidden=hf.get_int("intermediate_size_mlp"),
            moe=moe,
            **placement,
            **knobs,
            **common,
        )

    @staticmethod
    def _nope_interval(hf: HFConfig, num_layers: int) -> int:
        """`no_rope_layers` (1 = RoPE, 0 = NoPE; transformers' default: a NoPE layer every
        `no_rope_layer_interval` layers) as moeforge's `nope_layer_interval` (0 = RoPE everywhere)."""
        interval = hf.get_int("no_rope_layer_interval", 4)
        if interval < 1:
            raise hf.error("no_rope_layer_interval", f"={interval} must be >= 1")
        given = hf.get("no_rope_layers", None)
        uses_rope = (
            _int_list(hf, "no_rope_layers", given)
            if given
            else [int((i + 1) % interval != 0) for i in range(num_layers)]
        )
        if len(uses_rope) < num_layers:
            raise hf.error("no_rope_layers", f"has {len(uses_rope)} entries, num_hidden_layers={num_layers}")
        nope = [i for i in range(num_layers) if not uses_rope[i]]
        if not nope:
            return 0
        step = nope[0] + 1
        if nope != list(range(step - 1, num_layers, step)):
            raise hf.error(
                "no_rope_layers",
                f"makes layers {nope} NoPE: moeforge expresses a NoPE layer every n-th layer only; nothing was written",
            )
        return step

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        num_layers = cfg.num_layers
        return {
            **base.common_config_to_hf(cfg, self),
            "attention_bias": False,
            "use_qk_norm": cfg.qk_l2_norm,
            "no_rope_layers": [int(cfg.uses_rope(i)) for i in range(num_layers)],
            "attention_chunk_size": cfg.attention_chunk_size or None,
            "layer_types": [
                "chunked_attention" if cfg.attention_chunk_size and cfg.uses_rope(i) else "full_attention"
                for i in range(num_layers)
            ],
            "attn_temperature_tuning": cfg.attn_temperature_tuning,
            "floor_scale": cfg.attn_floor_scale,
            "attn_scale": cfg.attn_scale,
            "intermediate_size_mlp": cfg.ffn_hidden,
            "intermediate_size": cfg.moe.moe_ffn_hidden,
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "moe_layers": [i for i in range(num_layers) if cfg.is_moe_layer(i)],
            "interleave_moe_layer_step": cfg.moe_layer_freq,
            "router_jitter_noise": cfg.moe.router_jitter,
            "router_aux_loss_coef": base.aux_coef_to_hf(cfg),
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        moe = cfg.moe
        if layout not in self.layouts and any(cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
            raise conversion_error(
                "layout",
                f"={layout!r}: Llama 4 checkpoints hold their experts fused (gate_up_proj [E, D, 2F]); "
                "nothing was written",
            )
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + base.gqa_links(cfg, i, interleaved_rope=True)
            hf = f"model.layers.{i}.feed_forward"
            if not cfg.is_moe_layer(i):
                links += base.swiglu_links(f"layers.{i}.feed_forward", hf, cfg.dim, cfg.ffn_hidden)
                continue
            links.append(
                Link(f"layers.{i}.moe.router.gate.weight", f"{hf}.router.weight", (moe.num_experts, cfg.dim))
            )
            links += base.expert_links(cfg, i, f"{hf}.experts", base.FUSED, fused_in_out=True)
            shared = moe.shared_ffn_hidden or moe.num_shared_experts * moe.moe_ffn_hidden
            links += base.swiglu_links(
                f"layers.{i}.moe.shared_experts", f"{hf}.shared_expert", cfg.dim, shared
            )
        return links
