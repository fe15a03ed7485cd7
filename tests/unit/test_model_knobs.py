"""Architecture knobs of released Hugging Face MoE models, each checked against transformers' own
module: qkv_bias (Qwen2-MoE), qk_norm_scope=projection (OLMoE), attention_output_gate,
partial_rotary_factor and norm_zero_centered (Qwen3-Next), shared_expert_gate (Qwen2-MoE,
Qwen3-Next), weights_on_input (Llama 4).

Each test builds the transformers module from its config class at tiny sizes, gives it random
weights of O(1) activations, copies them into ours by hand, and compares outputs in fp64 (and, for
the MoE layers, the chosen experts). Then: parameter counts, validation, and that every knob off
leaves today's model alone.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeAttention,
    Qwen2MoeRotaryEmbedding,
    Qwen2MoeSparseMoeBlock,
)
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextAttention,
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
    Qwen3NextSparseMoeBlock,
)

from launch.memory import layer_split
from model import Transformer
from model.attention import GroupedQueryAttention
from model.config import MLAConfig, ModelConfig, MoEConfig
from model.layers import RMSNorm, rope_tables
from model.moe import MoE
from model.moe.dispatch import capacity_keep_mask, expert_capacity
from model.params import count_params
from tests.sampling import quick_sample
from trainer.compose import load_config
from trainer.errors import ConfigError

DIM, HEADS, KV_HEADS, SEQ = 32, 4, 2, 11
EXPERTS, TOP_K, EXPERT_HIDDEN, SHARED_HIDDEN = 6, 2, 16, 24


def model_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=DIM,
        num_layers=2,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        ffn_hidden=48,
        max_seq_len=16,
        moe=MoEConfig(num_experts=EXPERTS, top_k=TOP_K, moe_ffn_hidden=EXPERT_HIDDEN, aux_loss_coef=0.0),
    )
    base.update(overrides)
    return ModelConfig(**base)


def moe_config(**overrides) -> MoEConfig:
    base = dict(
        num_experts=EXPERTS,
        top_k=TOP_K,
        moe_ffn_hidden=EXPERT_HIDDEN,
        num_shared_experts=1,
        shared_ffn_hidden=SHARED_HIDDEN,
        aux_loss_coef=0.0,
    )
    base.update(overrides)
    return MoEConfig(**base)


def hf_config(cls, **kwargs):
    cfg = cls(num_hidden_layers=1, max_position_embeddings=16, **kwargs)
    cfg._attn_implementation = "sdpa"  # causal without a mask (is_causal=True, attention_mask=None)
    cfg._experts_implementation = "eager"  # the reference per-expert loop
    return cfg


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """fp64 weights of O(1) activations: std 1/sqrt(fan in) for matrices and expert banks
    (fan in = last dim: right for nn.Linear and roughly right for the banks), and +-0.5 around
    their init for norm weights and biases, so a weight of 1 (or 0) hides nothing."""
    gen = torch.Generator().manual_seed(seed)
    module.double()
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.ndim == 1:
            p.add_(0.5 * noise)
        else:
            p.copy_(noise / p.shape[-1] ** 0.5)
    return module


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def hf_rope(rotary_cls, cfg, x_BSD: torch.Tensor):
    """transformers' (cos, sin) [1, S, R] for positions 0..S-1, and the same values as our
    tables [S, R/2] (the two halves of HF's cos/sin are equal)."""
    cos, sin = rotary_cls(cfg)(x_BSD, torch.arange(x_BSD.shape[1])[None])
    half = cos.shape[-1] // 2
    return (cos, sin), (cos[0, :, :half], sin[0, :, :half])


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype == torch.float64
    assert theirs.abs().max() > 0.1  # O(1): a tolerance of 1e-10 means something
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-10)


@torch.no_grad()
def copy_attention(ours: GroupedQueryAttention, theirs: torch.nn.Module) -> None:
    ours.double()
    pairs = {
        "wq": "q_proj",
        "wk": "k_proj",
        "wv": "v_proj",
        "wo": "o_proj",
        "q_norm": "q_norm",
        "k_norm": "k_norm",
    }
    for mine, hf in pairs.items():
        if getattr(ours, mine) is None:
            continue
        our_params = dict(getattr(ours, mine).named_parameters())
        hf_params = dict(getattr(theirs, hf).named_parameters())
        assert our_params.keys() == hf_params.keys(), (mine, hf)  # e.g. both with a bias, or neither
        for name, p in our_params.items():
            p.copy_(hf_params[name])


# ---- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [KV_HEADS, HEADS])
def test_qkv_bias_matches_qwen2_moe_attention(num_kv_heads):
    hf_cfg = hf_config(
        Qwen2MoeConfig,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        qkv_bias=True,
    )
    theirs = randomize_(Qwen2MoeAttention(hf_cfg, layer_idx=0))
    assert theirs.q_proj.bias is not None and theirs.o_proj.bias is None
    ours = GroupedQueryAttention(model_config(num_kv_heads=num_kv_heads, qkv_bias=True))
    copy_attention(ours, theirs)
    x = inputs()
    hf_cos_sin, (cos, sin) = hf_rope(Qwen2MoeRotaryEmbedding, hf_cfg, x)
    assert_same(ours(x, cos, sin), theirs(x, hf_cos_sin, None)[0])


def test_projection_qk_norm_matches_olmoe_attention():
    hf_cfg = hf_config(OlmoeConfig, hidden_size=DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    theirs = randomize_(OlmoeAttention(hf_cfg, layer_idx=0))
    assert theirs.q_norm.weight.shape == (HEADS * DIM // HEADS,)  # over the whole projection
    cfg = model_config(qk_norm=True, qk_norm_scope="projection", norm_eps=hf_cfg.rms_norm_eps)
    ours = GroupedQueryAttention(cfg)
    copy_attention(ours, theirs)
    x = inputs()
    hf_cos_sin, (cos, sin) = hf_rope(OlmoeRotaryEmbedding, hf_cfg, x)
    assert_same(ours(x, cos, sin), theirs(x, hf_cos_sin, None)[0])


@pytest.mark.parametrize("partial_rotary_factor", [0.25, 0.5, 1.0])
def test_gated_attention_with_partial_rope_and_zero_centered_qk_norm_matches_qwen3_next(
    partial_rotary_factor,
):
    head_dim = 16
    hf_cfg = hf_config(
        Qwen3NextConfig,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": partial_rotary_factor,
        },
    )
    theirs = randomize_(Qwen3NextAttention(hf_cfg, layer_idx=0))
    cfg = model_config(
        head_dim=head_dim,
        qk_norm=True,
        attention_output_gate=True,
        partial_rotary_factor=partial_rotary_factor,
        norm_zero_centered=True,
        norm_eps=hf_cfg.rms_norm_eps,
    )
    ours = GroupedQueryAttention(cfg)
    assert ours.wq.weight.shape == (HEADS * 2 * head_dim, DIM)
    assert ours.rotary_dim == int(head_dim * partial_rotary_factor)
    copy_attention(ours, theirs)
    x = inputs()
    hf_cos_sin, (cos, sin) = hf_rope(Qwen3NextRotaryEmbedding, hf_cfg, x)
    assert cos.shape[-1] == ours.rotary_dim // 2
    assert_same(ours(x, cos, sin), theirs(x, hf_cos_sin, None)[0])

    # The model's own tables are HF's rotary embedding at the rotary dim (ours: fp64 angles then fp32).
    model = Transformer(cfg)
    assert model.rope_cos.shape == (cfg.max_seq_len, ours.rotary_dim // 2)
    torch.testing.assert_close(model.rope_cos[:SEQ].double(), cos, rtol=0.0, atol=1e-6)
    torch.testing.assert_close(model.rope_sin[:SEQ].double(), sin, rtol=0.0, atol=1e-6)


def test_output_gate_keeps_whole_heads_in_each_column_shard():
    """Column-parallel wq (tp=2) gives each rank a contiguous half of wq's rows: with the gate
    laid out per head as [query_h, gate_h], that half computes exactly its heads' attention."""
    cfg = model_config(num_kv_heads=HEADS, head_dim=DIM // HEADS, attention_output_gate=True, qkv_bias=True)
    full = randomize_(GroupedQueryAttention(cfg))
    x = inputs()
    cos, sin = (t.double() for t in rope_tables(cfg.rotary_dim, cfg.max_seq_len, cfg.rope_theta))
    halves = []
    for rank in range(2):
        shard = GroupedQueryAttention(replace(cfg, num_heads=HEADS // 2, num_kv_heads=HEADS // 2)).double()
        with torch.no_grad():
            for name in ("wq", "wk", "wv"):
                getattr(shard, name).weight.copy_(getattr(full, name).weight.chunk(2, dim=0)[rank])
                getattr(shard, name).bias.copy_(getattr(full, name).bias.chunk(2, dim=0)[rank])
            shard.wo.weight.copy_(full.wo.weight.chunk(2, dim=1)[rank])
        halves.append(shard(x, cos, sin))
    torch.testing.assert_close(halves[0] + halves[1], full(x, cos, sin), rtol=0.0, atol=1e-12)


# ---- norms ----------------------------------------------------------------------------------


def test_zero_centered_rms_norm_matches_qwen3_next():
    theirs = randomize_(Qwen3NextRMSNorm(DIM, eps=1e-6))
    ours = RMSNorm(DIM, 1e-6, zero_centered=True).double()
    assert torch.equal(ours.weight, torch.zeros(DIM, dtype=torch.float64))  # starts at 0, as HF's
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    x = inputs()
    assert_same(ours(x), theirs(x))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_zero_centered_norms_everywhere_start_as_the_default_model(attention):
    """Every RMSNorm (blocks, final, q/k, MLA's, MTP's) is zero-centered and starts at 0, so at
    init the model is the default model: same loss from the same seed."""
    mla = MLAConfig(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    cfg = model_config(attention=attention, mla=mla, qk_norm=True, mtp_depth=1, first_k_dense=1)
    centered = Transformer(replace(cfg, norm_zero_centered=True))
    default = Transformer(cfg)
    centered.init_weights(3)
    default.init_weights(3)
    norms = {n: m for n, m in centered.named_modules() if isinstance(m, RMSNorm)}
    assert norms.keys() == {n for n, m in default.named_modules() if isinstance(m, RMSNorm)}
    assert any(".q_norm" in n for n in norms) and any("mtp.0.enorm" in n for n in norms)
    for name, norm in norms.items():
        assert norm.zero_centered and torch.equal(norm.weight, torch.zeros_like(norm.weight)), name
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    a, b = centered(tokens[:, :-1], tokens[:, 1:]), default(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(a.ce_sum, b.ce_sum, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(a.mtp_ce_sum, b.mtp_ce_sum, rtol=1e-6, atol=0.0)


# ---- MoE ------------------------------------------------------------------------------------


@torch.no_grad()
def copy_shared(ours: MoE, theirs_mlp: torch.nn.Module) -> None:
    ours.shared_experts.w1.weight.copy_(theirs_mlp.gate_proj.weight)
    ours.shared_experts.w3.weight.copy_(theirs_mlp.up_proj.weight)
    ours.shared_experts.w2.weight.copy_(theirs_mlp.down_proj.weight)


def chosen_mask(experts_TK: torch.Tensor) -> torch.Tensor:
    return torch.zeros(experts_TK.shape[0], EXPERTS, dtype=torch.bool).scatter_(1, experts_TK, True)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize(
    "config_cls, block_cls",
    [(Qwen2MoeConfig, Qwen2MoeSparseMoeBlock), (Qwen3NextConfig, Qwen3NextSparseMoeBlock)],
    ids=["qwen2_moe", "qwen3_next"],
)
def test_shared_expert_gate_matches_hf_sparse_moe_block(config_cls, block_cls, norm_topk_prob):
    hf_cfg = hf_config(
        config_cls,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=EXPERT_HIDDEN,
        shared_expert_intermediate_size=SHARED_HIDDEN,
        norm_topk_prob=norm_topk_prob,
    )
    theirs = randomize_(block_cls(hf_cfg))
    cfg = model_config(moe=moe_config(shared_expert_gate=True, norm_topk_prob=norm_topk_prob))
    ours = MoE(cfg).double().eval()
    assert dict(ours.named_parameters())["shared_expert_gate.weight"].shape == (1, DIM)
    F = EXPERT_HIDDEN
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.gate.weight)
        # HF: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F], applied as x @ W^T.
        ours.experts.w1.copy_(theirs.experts.gate_up_proj[:, :F, :].transpose(1, 2))
        ours.experts.w3.copy_(theirs.experts.gate_up_proj[:, F:, :].transpose(1, 2))
        ours.experts.w2.copy_(theirs.experts.down_proj.transpose(1, 2))
        copy_shared(ours, theirs.shared_expert)
        ours.shared_expert_gate.weight.copy_(theirs.shared_expert_gate.weight)
    x = inputs()
    x_TD = x.view(-1, DIM)
    _, _, hf_experts_TK = theirs.gate(x_TD)
    our_experts_TK = ours.router(x_TD).experts_TK
    assert torch.equal(chosen_mask(our_experts_TK), chosen_mask(hf_experts_TK))
    assert chosen_mask(our_experts_TK).any(0).all()  # every expert gets tokens: routing is not trivial
    assert_same(ours(x), theirs(x))


@pytest.mark.parametrize("top_k", [1, 2])
def test_weights_on_input_matches_llama4_moe(top_k):
    hf_cfg = hf_config(
        Llama4TextConfig,
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=DIM // HEADS,
        num_local_experts=EXPERTS,
        num_experts_per_tok=top_k,
        intermediate_size=EXPERT_HIDDEN,  # each routed expert and the shared expert
    )
    theirs = randomize_(Llama4TextMoe(hf_cfg))
    moe = moe_config(
        top_k=top_k,
        score_func="sigmoid",
        norm_topk_prob=False,
        shared_ffn_hidden=EXPERT_HIDDEN,
        weights_on_input=True,
    )
    ours = MoE(model_config(moe=moe)).double().eval()
    F = EXPERT_HIDDEN
    with torch.no_grad():
        ours.router.gate.weight.copy_(theirs.router.weight)
        # HF: gate_up_proj [E, D, 2F] (gate columns first), down_proj [E, F, D], applied as x @ W.
        ours.experts.w1.copy_(theirs.experts.gate_up_proj[:, :, :F])
        ours.experts.w3.copy_(theirs.experts.gate_up_proj[:, :, F:])
        ours.experts.w2.copy_(theirs.experts.down_proj)
        copy_shared(ours, theirs.shared_expert)
    x = inputs()
    x_TD = x.view(-1, DIM)
    hf_scores_TE, _ = theirs.router(x_TD)
    our_experts_TK = ours.router(x_TD).experts_TK
    assert torch.equal(chosen_mask(our_experts_TK), hf_scores_TE > 0)
    assert chosen_mask(our_experts_TK).any(0).all()
    hf_out, _ = theirs(x)
    assert_same(ours(x).view(-1, DIM), hf_out)
    # Sensitivity: weighting the expert outputs instead is a different function.
    ours.cfg = replace(ours.cfg, weights_on_input=False)
    assert (ours(x).view(-1, DIM) - hf_out).abs().max() > 1e-3


def test_weights_on_input_drops_copies_past_capacity():
    cfg = model_config(moe=moe_config(weights_on_input=True, capacity_factor=0.5, num_shared_experts=0))
    layer = randomize_(MoE(cfg)).eval()
    x = inputs()
    x_TD = x.view(-1, DIM)
    routing = layer.router(x_TD)
    capacity = expert_capacity(x_TD.shape[0], TOP_K, EXPERTS, 0.5)
    keep_TK = capacity_keep_mask(routing.experts_TK, routing.weights_TK, EXPERTS, capacity, "probs")
    assert not keep_TK.all()
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    expected = torch.zeros_like(x_TD)
    for t, k in keep_TK.nonzero().tolist():
        e, h = routing.experts_TK[t, k], x_TD[t] * routing.weights_TK[t, k].double()
        expected[t] += (torch.nn.functional.silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
    torch.testing.assert_close(layer(x).view(-1, DIM), expected, rtol=0.0, atol=1e-12)


# ---- parameter counts -----------------------------------------------------------------------

ALL_ON = dict(
    qkv_bias=True,
    qk_norm=True,
    attention_output_gate=True,
    partial_rotary_factor=0.5,
    norm_zero_centered=True,
)
KNOB_CONFIGS = {
    "qkv_bias": dict(qkv_bias=True),
    "qk_norm_projection": dict(qk_norm=True, qk_norm_scope="projection"),
    "attention_output_gate": dict(attention_output_gate=True),
    "partial_rotary_factor": dict(partial_rotary_factor=0.25),
    "norm_zero_centered": dict(norm_zero_centered=True, qk_norm=True),
    "shared_expert_gate": dict(moe=moe_config(shared_expert_gate=True)),
    "weights_on_input": dict(moe=moe_config(weights_on_input=True)),
    "all": dict(ALL_ON, moe=moe_config(shared_expert_gate=True, weights_on_input=True)),
    "all_projection_norm": dict(
        ALL_ON, qk_norm_scope="projection", moe=moe_config(shared_expert_gate=True, weights_on_input=True)
    ),
}


@pytest.mark.parametrize("knobs", list(KNOB_CONFIGS.values()), ids=list(KNOB_CONFIGS))
def test_count_params_counts_every_new_parameter(knobs):
    cfg = model_config(num_layers=3, first_k_dense=1, mtp_depth=1, **knobs)
    with torch.device("meta"):
        model = Transformer(cfg)
    named = dict(model.named_parameters())
    assert count_params(cfg, include_mtp=True)[0] == sum(p.numel() for p in named.values())
    total, active = count_params(cfg)
    assert total == sum(p.numel() for n, p in named.items() if not n.startswith("mtp."))
    expert = 3 * DIM * EXPERT_HIDDEN
    assert total - active == 2 * (EXPERTS - TOP_K) * expert  # two MoE layers; the gate is active


@pytest.mark.parametrize("knobs", [KNOB_CONFIGS["all"], {}], ids=["all", "none"])
def test_memory_estimate_splits_the_new_parameters_as_tensor_parallelism_does(knobs):
    """launch/memory.py's tp=2 share of a block: norms, the router and the shared-expert gate
    replicated (parallel/tensor.py), the rest of the dense part (biases included) halved."""
    cfg = model_config(**knobs)
    with torch.device("meta"):
        block = Transformer(cfg).layers["1"]
    replicated = ("norm", "router", "shared_expert_gate")
    expected = sum(
        p.numel() if any(r in n for r in replicated) else p.numel() // 2
        for n, p in block.named_parameters()
        if not n.startswith("moe.experts.")
    )
    assert layer_split(cfg, 1, tp=2, ep=1).dense == expected


def test_knobs_run_forward_and_backward_in_a_model():
    cfg = model_config(mtp_depth=1, **KNOB_CONFIGS["all"])
    model = Transformer(cfg)
    model.init_weights(0)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    (out.ce_sum + out.mtp_ce_sum).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert torch.equal(model.layers["1"].attention.wq.bias, torch.zeros(2 * HEADS * DIM // HEADS))


# ---- validation -----------------------------------------------------------------------------

BAD_CONFIGS = [
    (1, ["model.qk_norm_scope=heads"], "model.qk_norm_scope"),
    (1, ["model.partial_rotary_factor=0"], "model.partial_rotary_factor"),
    (1, ["model.partial_rotary_factor=1.5"], "model.partial_rotary_factor"),
    (1, ["model.partial_rotary_factor=0.1"], "model.partial_rotary_factor"),  # int(32 * 0.1) = 3: odd
    (1, ["model.partial_rotary_factor=0.01"], "model.partial_rotary_factor"),  # 0 rotary dims
    (1, ["model.attention=mla", "model.qkv_bias=true"], "model.qkv_bias"),
    (1, ["model.attention=mla", "model.attention_output_gate=true"], "model.attention_output_gate"),
    (1, ["model.attention=mla", "model.partial_rotary_factor=0.5"], "model.partial_rotary_factor"),
    (
        1,
        ["model.moe.shared_expert_gate=true", "model.moe.num_shared_experts=0"],
        "model.moe.shared_expert_gate",
    ),
    (1, ["model.qkv_bias=maybe"], "model.qkv_bias"),  # booleans: typed by the config schema
    (1, ["model.attention_output_gate=maybe"], "model.attention_output_gate"),
    (1, ["model.norm_zero_centered=maybe"], "model.norm_zero_centered"),
    (1, ["model.moe.weights_on_input=maybe"], "model.moe.weights_on_input"),
    (1, ["model.partial_rotary_factor=quarter"], "model.partial_rotary_factor"),
    (2, ["parallel.tp=2", "model.qk_norm=true", "model.qk_norm_scope=projection"], "model.qk_norm_scope"),
    (1, ["model.nope_layer_interval=-1"], "model.nope_layer_interval"),
    (1, ["model.rope_scaling.type=dynamic"], "model.rope_scaling.type"),  # not supported: refused
    (  # the default max_seq_len 512 / 3 is no whole pretraining context, and none is given
        1,
        ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=3.0"],
        "model.rope_scaling.original_max_seq_len",
    ),
    (1, ["model.attention_chunk_size=-8"], "model.attention_chunk_size"),
    (1, ["model.sliding_window=-1"], "model.sliding_window"),
    (1, ["model.clip_qkv=-1.0"], "model.clip_qkv"),
    (1, ["model.attn_floor_scale=0"], "model.attn_floor_scale"),
    (1, ["model.mlp_only_layers=[9]"], "model.mlp_only_layers"),  # 4 layers
    (
        1,
        ["model.linear_attention.full_attention_interval=-2"],
        "model.linear_attention.full_attention_interval",
    ),
    (
        1,
        ["model.linear_attention.full_attention_interval=2", "model.linear_attention.num_value_heads=3"],
        "model.linear_attention.num_value_heads",
    ),
    (
        1,
        ["model.linear_attention.full_attention_interval=2", "model.linear_attention.chunk_size=0"],
        "model.linear_attention.chunk_size",
    ),
    (
        2,
        [
            "parallel.tp=2",
            "model.linear_attention.full_attention_interval=2",
            "model.linear_attention.num_key_heads=3",
            "model.linear_attention.num_value_heads=6",
        ],
        "model.linear_attention.num_key_heads",
    ),
]


@pytest.mark.parametrize(
    "world_size, overrides, field", quick_sample(BAD_CONFIGS, [" ".join(o) for _, o, _ in BAD_CONFIGS])
)
def test_bad_knob_names_the_field(world_size, overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides, world_size=world_size)
    message = str(err.value)
    assert field in message and "\n" not in message, message


def test_good_knobs_validate():
    load_config(["model.qk_norm=true", "model.qk_norm_scope=projection"], world_size=2)  # tp=1
    load_config(
        [
            "model.qkv_bias=true",
            "model.qk_norm=true",
            "model.attention_output_gate=true",
            "model.partial_rotary_factor=0.25",
            "model.norm_zero_centered=true",
            "model.moe.shared_expert_gate=true",
            "model.moe.weights_on_input=true",
            "parallel.tp=2",
        ],
        world_size=2,
    )


# ---- every knob off: today's model ----------------------------------------------------------


def test_knobs_off_keep_parameter_names():
    cfg = model_config(
        qk_norm=True, first_k_dense=1, mtp_depth=1, moe=moe_config(num_shared_experts=1, shared_ffn_hidden=0)
    )
    attention = [
        "attention_norm.weight",
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "attention.wo.weight",
        "attention.q_norm.weight",
        "attention.k_norm.weight",
        "ffn_norm.weight",
    ]
    dense = ["feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight"]
    moe = [
        "moe.router.gate.weight",
        "moe.experts.w1",
        "moe.experts.w3",
        "moe.experts.w2",
        "moe.shared_experts.w1.weight",
        "moe.shared_experts.w3.weight",
        "moe.shared_experts.w2.weight",
    ]
    expected = (
        ["tok_embeddings.weight"]
        + [f"layers.0.{n}" for n in attention + dense]
        + [f"layers.1.{n}" for n in attention + moe]
        + ["norm.weight", "output.weight", "mtp.0.hnorm.weight", "mtp.0.enorm.weight", "mtp.0.proj.weight"]
        + [f"mtp.0.block.{n}" for n in attention + moe]
        + ["mtp.0.norm.weight"]
    )
    model = Transformer(cfg)
    assert [n for n, _ in model.named_parameters()] == expected
    attn = model.layers["0"].attention
    assert attn.wq.bias is None and attn.wq.weight.shape == (HEADS * DIM // HEADS, DIM)
    assert attn.rotary_dim == DIM // HEADS and model.rope_cos.shape == (cfg.max_seq_len, DIM // HEADS // 2)
    assert all(not m.zero_centered for m in model.modules() if isinstance(m, RMSNorm))
    assert model.layers["1"].moe.shared_expert_gate is None
