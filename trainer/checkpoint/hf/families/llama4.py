"""Llama 4 text models (meta-llama/Llama-4-Maverick-17B-128E, Llama-4-Scout-17B-16E), as
`llama4_text` configs that `Llama4ForCausalLM` loads: GQA with complex-number RoPE (adjacent
pairs, permuted into our two halves), MoE layers every `interleave_moe_layer_step` layers (or
the `moe_layers` list). A MoE layer takes the sigmoid of each token's top-k router logits as
weights, multiplies them into the expert *input* (weights_on_input) and adds one shared expert
that sees every token. Dense layers are `intermediate_size_mlp` wide, routed and shared experts
`intermediate_size`. The Hub holds experts only fused, in our own orientation ([E, D, 2F] and
[E, F, D]); transformers knows no per-expert Llama 4 layout, so neither do we.

Refused in one line, not supported yet: NoPE layers (a 0 in `no_rope_layers`: Llama 4's iRoPE;
`attn_temperature_tuning` only scales the queries of those, so without them it has no effect),
`use_qk_norm` (a weightless L2 norm of q and k on the RoPE layers), chunked attention with a
chunk shorter than max_position_embeddings, attention biases, and RoPE scaling (`hf.rope`).
Released Scout and Maverick use NoPE layers and chunked attention, so they do not import yet.
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
        num_layers, max_pos = common["num_layers"], common["max_seq_len"]
        hf.expect("attention_bias", (False,), "q/k/v/o projections have no bias")
        hf.expect("use_qk_norm", (False,), "Llama 4's weightless L2 norm of q and k is not supported yet")
        hf.ignore("for_llm_compressor")  # a flag for a quantisation tool

        # transformers' defaults: every no_rope_layer_interval-th layer NoPE, RoPE layers chunked.
        interval = hf.get_int("no_rope_layer_interval", 4)
        uses_rope = hf.get("no_rope_layers", None) or [
            int((i + 1) % interval != 0) for i in range(num_layers)
        ]
        uses_rope = _int_list(hf, "no_rope_layers", uses_rope)
        if len(uses_rope) < num_layers:
            raise hf.error("no_rope_layers", f"has {len(uses_rope)} entries, num_hidden_layers={num_layers}")
        nope = [i for i, r in enumerate(uses_rope[:num_layers]) if not r]
        if nope:
            raise hf.error(
                "no_rope_layers",
                f"makes layers {nope} NoPE layers (Llama 4's iRoPE): not supported yet; nothing was written",
            )
        hf.ignore("attn_temperature_tuning", "floor_scale", "attn_scale")  # they act on NoPE layers only
        chunk = hf.get("attention_chunk_size", None)
        types = hf.get("layer_types", None) or [
            "chunked_attention" if chunk is not None else "full_attention" for _ in range(num_layers)
        ]
        if len(types) != num_layers or set(types) - set(ATTENTION_TYPES):
            raise hf.error("layer_types", f"={types!r} must list {num_layers} of {ATTENTION_TYPES}")
        if "chunked_attention" in types:
            if chunk is None or chunk < max_pos:
                raise hf.error(
                    "attention_chunk_size",
                    f"={chunk!r} < max_position_embeddings={max_pos}: chunked (local) attention is not supported "
                    "yet; nothing was written",
                )
            notes.append(
                f"attention_chunk_size={chunk}: chunked attention is full attention up to {chunk} tokens; "
                "sequences longer than that would attend differently"
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
        first_k, freq = base.moe_layer_pattern(hf, set(moe_layers), num_layers, "moe_layers")

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
            first_k_dense=first_k,
            moe_layer_freq=freq,
            **common,
        )

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        num_layers = cfg.num_layers
        return {
            **base.common_config_to_hf(cfg, self),
            "attention_bias": False,
            "use_qk_norm": False,
            "no_rope_layers": [1] * num_layers,
            "attention_chunk_size": None,
            "layer_types": ["full_attention"] * num_layers,
            "attn_temperature_tuning": False,
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
