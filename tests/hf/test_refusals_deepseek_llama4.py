"""What the DeepSeek-V2, DeepSeek-V3 and Llama 4 adapters refuse: a `config.json` edited after
`save_pretrained` to a value moeforge cannot express fails in one line naming the field (import
plans before it reads or writes anything). Also what they accept: Hub-era DeepSeek fields, a
DeepSeek-V3 checkpoint without its MTP layer, Llama 4's MoE layers from the interleave step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.hf.reference import assert_refused, edited, save_families
from trainer.checkpoint.hf.families import PER_EXPERT
from trainer.checkpoint.hf.plan import plan_export, plan_import
from trainer.errors import ConfigError

FAMILIES = ("deepseek_v2", "deepseek_v3", "llama4_text")
# RoPE scaling types moeforge does not apply, and a yarn block with a llama3 key.
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
YARN_LLAMA3_KEY = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "low_freq_factor": 1.0,
}
LONGROPE = {"rope_type": "longrope", "rope_theta": 5e5, "short_factor": [1.0], "long_factor": [4.0]}
# (family, config.json edits (None = delete the field), the field the error must name)
REFUSALS = [
    ("deepseek_v2", {"rope_parameters": DYNAMIC}, "rope_parameters.rope_type"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),  # transformers ignores it
    ("deepseek_v2", {"n_group": 5}, "n_group"),  # does not divide 32 experts
    ("deepseek_v2", {"topk_group": 9}, "topk_group"),  # more than n_group=8
    ("deepseek_v2", {"num_experts_per_tok": 13}, "num_experts_per_tok"),  # 3 groups of 4 hold 12
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),  # DeepSeek: layer 2 only; transformers: 1, 2
    ("deepseek_v2", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v2", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),  # the latent norms stay at 1e-6
    ("deepseek_v2", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v2", {"q_lora_rank": None}, "q_lora_rank"),  # absent: transformers builds rank 1536
    ("deepseek_v2", {"n_shared_experts": 0}, "n_shared_experts"),
    ("deepseek_v2", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ("deepseek_v3", {"rope_parameters": YARN_LLAMA3_KEY}, "rope_parameters.low_freq_factor"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method"),  # transformers routes noaux_tc anyway
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave"),
    ("deepseek_v3", {"n_group": 32}, "n_group"),  # one expert per group: no best two
    ("deepseek_v3", {"topk_group": 0}, "topk_group"),
    ("llama4_text", {"no_rope_layers": [1, 0, 1, 1]}, "no_rope_layers"),  # not every n-th layer
    ("llama4_text", {"no_rope_layers": [1, 1]}, "no_rope_layers"),  # fewer entries than layers
    ("llama4_text", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),  # NoPE layer chunked
    ("llama4_text", {"layer_types": ["sliding_attention"] * 4}, "layer_types"),
    ("llama4_text", {"rope_parameters": LONGROPE}, "rope_parameters.rope_type"),
    ("llama4_text", {"attention_bias": True}, "attention_bias"),
    ("llama4_text", {"moe_layers": [0, 9]}, "moe_layers"),  # past the last layer
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, object]:
    return save_families(tmp_path_factory, FAMILIES)


@pytest.mark.parametrize(
    ("family", "edits", "field"), REFUSALS, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_config_refused_naming_the_field(family, edits, field, saved, tmp_path) -> None:
    assert_refused(edited(saved[family], tmp_path / "hf", edits), f"config.json: {field}")


def test_deepseek_v3_mtp_layer_refused(saved, tmp_path) -> None:
    """A checkpoint that holds its MTP layer (model.layers.{num_hidden_layers}.*): refused, since
    our MTP module would read another hidden state; without one, imported with mtp_depth 0."""
    plan, _ = plan_import(str(saved["deepseek_v3"]))
    assert plan.cfg.mtp_depth == 0 and any("num_nextn_predict_layers=1" in n for n in plan.notes)
    path = edited(saved["deepseek_v3"], tmp_path / "hf", {})
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.5.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="config.json: num_nextn_predict_layers.*model.layers.5.eh_proj"):
        plan_import(str(path))


def test_export_refuses_what_the_family_cannot_hold(saved) -> None:
    """plan_export re-reads the config it would write: MTP modules have no deepseek_v3 field
    (it writes none), a softmax router none in Llama 4, an expert bias none in DeepSeek-V2."""
    v3, _ = plan_import(str(saved["deepseek_v3"]))
    with pytest.raises(ConfigError, match="model.mtp_depth"):
        plan_export(dataclasses.replace(v3.cfg, mtp_depth=1), "deepseek_v3")
    llama4, _ = plan_import(str(saved["llama4_text"]))
    softmax = dataclasses.replace(llama4.cfg.moe, score_func="softmax")
    with pytest.raises(ConfigError, match="model.moe.score_func"):
        plan_export(dataclasses.replace(llama4.cfg, moe=softmax), "llama4_text")
    with pytest.raises(ConfigError, match="model.moe.expert_bias"):
        plan_export(v3.cfg, "deepseek_v2")


def test_llama4_per_expert_layout_refused(saved) -> None:
    plan, _ = plan_import(str(saved["llama4_text"]))
    with pytest.raises(ConfigError, match="layout.*fused"):
        plan_export(plan.cfg, "llama4_text", PER_EXPERT)


def test_hub_fields_accepted(saved, tmp_path) -> None:
    """DeepSeek's own config.json fields (balancing loss, routing names transformers leaves to
    its code), Llama 4's MoE layers from the interleave step alone (no `moe_layers`)."""
    hub = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "ep_size": 1}
    hub |= {"aux_loss_alpha": 0.001, "seq_aux": True, "head_dim": None, "qk_head_dim": None}
    plan, _ = plan_import(str(edited(saved["deepseek_v3"], tmp_path / "v3", hub)))
    moe = plan.cfg.moe
    assert (moe.aux_loss_coef, moe.aux_loss_scope, moe.expert_bias) == (0.001, "sequence", True)
    assert (moe.num_groups, moe.topk_groups, moe.score_func, plan.cfg.first_k_dense) == (8, 4, "sigmoid", 3)
    hub = {"scoring_func": "softmax", "moe_layer_freq": 1, "aux_loss_alpha": 0.001, "seq_aux": False}
    plan, _ = plan_import(str(edited(saved["deepseek_v2"], tmp_path / "v2", hub)))
    assert (plan.cfg.moe.num_groups, plan.cfg.moe.aux_loss_scope, plan.cfg.mla.q_lora_rank) == (
        8,
        "micro_batch",
        24,
    )
    path = edited(saved["llama4_text"], tmp_path / "l4", {"moe_layers": None, "layer_types": None})
    plan, _ = plan_import(str(path))
    assert [i for i in range(4) if plan.cfg.is_moe_layer(i)] == [1, 3]
    assert (plan.cfg.ffn_hidden, plan.cfg.moe.moe_ffn_hidden, plan.cfg.moe.weights_on_input) == (32, 16, True)
