"""One tiny transformers model per family, with the released values of every architecture knob
moeforge supports (sizes shrunk). Each case: the transformers config class, causal-LM class and
config keyword arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import transformers as T


@dataclass(frozen=True)
class Case:
    config_class: type
    model_class: type
    kwargs: dict[str, Any]

    def config(self, **overrides: Any):
        return self.config_class(**{**self.kwargs, **overrides})


TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

CASES: dict[str, Case] = {
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, theta 1e6, eps 1e-5, no sliding window.
    "mixtral": Case(
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(
            TINY,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            router_aux_loss_coef=0.02,
            max_position_embeddings=256,
        ),
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts top-8 renormalised, head_dim 128 = 2 x hidden/heads, per-head
    # q/k norms, theta 1e6, eps 1e-6, every layer MoE (decoder_sparse_step 1, no mlp_only_layers).
    "qwen3_moe": Case(
        T.Qwen3MoeConfig,
        T.Qwen3MoeForCausalLM,
        dict(
            TINY,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            router_aux_loss_coef=0.001,
            max_position_embeddings=256,
        ),
    ),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts top-4 not renormalised, a gated shared expert 4x an
    # expert's width (5632 = 4 x 1408), q/k/v biases, MHA (16 kv heads of 16), theta 1e6.
    "qwen2_moe": Case(
        T.Qwen2MoeConfig,
        T.Qwen2MoeForCausalLM,
        dict(
            TINY,
            num_key_value_heads=4,
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=64,
            num_experts=12,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            qkv_bias=True,
            decoder_sparse_step=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            router_aux_loss_coef=0.001,
            max_position_embeddings=256,
        ),
    ),
    # allenai/OLMoE-1B-7B-0924: 64 experts top-8 not renormalised, q/k norms over the whole
    # projections, MHA, no clip_qkv, theta 1e4, eps 1e-5. pad_token_id (1 in the release) is left
    # out: transformers' Embedding(padding_idx) zeroes that row's gradient, a training detail.
    "olmoe": Case(
        T.OlmoeConfig,
        T.OlmoeForCausalLM,
        dict(
            TINY,
            num_key_value_heads=4,
            intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            clip_qkv=None,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            router_aux_loss_coef=0.01,
            max_position_embeddings=256,
            pad_token_id=None,
            eos_token_id=None,
        ),
    ),
    # Qwen/Qwen3-Next-80B-A3B: 512 experts top-10 renormalised, a gated shared expert as wide as
    # an expert, gated attention, partial RoPE 0.25, zero-centred norms, head_dim 256 = 2 x
    # hidden/heads, theta 1e7; 3 Gated DeltaNet layers (16 q/k heads, 32 value heads of 128) per
    # full-attention layer.
    "qwen3_next": Case(
        T.Qwen3NextConfig,
        T.Qwen3NextForCausalLM,
        dict(
            TINY,
            head_dim=16,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=16,
            num_experts_per_tok=10,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_hidden_layers=4,
            layer_types=None,  # transformers' default from full_attention_interval, as released
            full_attention_interval=4,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
            router_aux_loss_coef=0.001,
            max_position_embeddings=256,
        ),
    ),
    # deepseek-ai/DeepSeek-V2: MLA with q_lora_rank (1536 of 5120), 160 experts top-6 of the best 3 of
    # 8 groups (group_limited_greedy, softmax, not renormalised), routed_scaling_factor 16, 2 shared
    # experts, first layer dense, theta 1e4, eps 1e-6. YaRN is refused, so plain RoPE here.
    "deepseek_v2": Case(
        T.DeepseekV2Config,
        T.DeepseekV2ForCausalLM,
        dict(
            TINY,
            num_key_value_heads=4,  # MLA: one latent expanded to every head
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=32,
            num_experts_per_tok=6,
            n_shared_experts=2,
            topk_method="group_limited_greedy",
            n_group=8,
            topk_group=3,
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            first_k_dense_replace=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=256,
        ),
    ),
    # deepseek-ai/DeepSeek-V2-Lite: queries projected directly (q_lora_rank null), 64 experts top-6
    # greedy (one group), routed_scaling_factor 1, 2 shared experts, first layer dense.
    "deepseek_v2_lite": Case(
        T.DeepseekV2Config,
        T.DeepseekV2ForCausalLM,
        dict(
            TINY,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=16,
            num_experts_per_tok=6,
            n_shared_experts=2,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            first_k_dense_replace=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=256,
        ),
    ),
    # deepseek-ai/DeepSeek-V3: MLA with q_lora_rank, 256 experts top-8 of the best 4 of 8 groups
    # (noaux_tc: sigmoid scores + e_score_correction_bias for selection, groups by their best two),
    # renormalised, routed_scaling_factor 2.5, 1 shared expert, first 3 layers dense, interleaved
    # RoPE, theta 1e4, eps 1e-6. No MTP layer: transformers saves none (num_nextn_predict_layers 1).
    "deepseek_v3": Case(
        T.DeepseekV3Config,
        T.DeepseekV3ForCausalLM,
        dict(
            TINY,
            num_hidden_layers=5,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=32,
            num_experts_per_tok=8,
            n_shared_experts=1,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=3,
            rope_interleave=True,
            num_nextn_predict_layers=1,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            max_position_embeddings=256,
        ),
    ),
    # meta-llama/Llama-4-Maverick-17B-128E: 128 experts top-1 (sigmoid weight on the expert input),
    # a shared expert, MoE every 2nd layer, dense layers 2x an expert's width (16384 / 8192), GQA
    # 40/8 heads of 128, theta 5e5, eps 1e-5, iRoPE: every 4th layer NoPE with temperature-tuned
    # queries, the RoPE layers chunked (8192), no qk norm. Chunk and floor scale shrunk so that a
    # 12-token test sequence crosses both.
    "llama4_text": Case(
        T.Llama4TextConfig,
        T.Llama4ForCausalLM,
        dict(
            TINY,
            num_hidden_layers=4,
            head_dim=8,
            intermediate_size=16,
            intermediate_size_mlp=32,
            num_local_experts=16,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layers=None,
            no_rope_layer_interval=4,
            use_qk_norm=False,
            attention_chunk_size=5,
            attn_temperature_tuning=True,
            floor_scale=4,
            attn_scale=0.1,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            router_aux_loss_coef=0.001,
            max_position_embeddings=256,
        ),
    ),
}


def variant(base: str, **changes: Any) -> Case:
    """A released config with one knob changed, to test that knob where the release leaves it off."""
    return dataclasses.replace(CASES[base], kwargs={**CASES[base].kwargs, **changes})


# Mixtral's config carries `sliding_window` (null in the releases; Mistral-7B used 4096): on,
# shrunk below the test's 12 tokens.
CASES["mixtral_sliding_window"] = variant("mixtral", sliding_window=5)
# Qwen3-MoE with dense layers that are not a 'first k, then every n-th' pattern.
CASES["qwen3_moe_mlp_only_layers"] = variant("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[1, 3])
# OLMoE with `clip_qkv` on (O(1) activations need a small bound to clip anything).
CASES["olmoe_clip_qkv"] = variant("olmoe", clip_qkv=1.5)
# meta-llama/Llama-4-Scout-17B-16E: as Maverick, but every layer MoE and the weightless L2 qk
# norm on the RoPE layers.
CASES["llama4_scout"] = variant("llama4_text", interleave_moe_layer_step=1, use_qk_norm=True)
