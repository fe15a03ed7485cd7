"""What the Qwen2-MoE, Qwen3-MoE, OLMoE and Qwen3-Next adapters refuse: a `config.json` edited
after `save_pretrained` to a value moeforge cannot express fails in one line naming the field
(import plans before it reads or writes anything). Also the layer placements and spellings they
do accept: dense layers from `mlp_only_layers` / `decoder_sparse_step`, Hub-era field names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.hf.cases import CASES
from tests.hf.reference import assert_refused, edited, o1_init_, save_families
from tests.hf.test_families import SEQ, ours_from, save
from trainer.checkpoint.hf import export_state_dict, import_checkpoint
from trainer.checkpoint.hf.plan import plan_export, plan_import
from trainer.errors import ConfigError

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "qwen3_next")
# (family, config.json edits (None = delete the field), the field the error must name)
REFUSALS = [
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
    ("qwen3_moe", {"mlp_only_layers": [1.5]}, "mlp_only_layers"),  # not layer indices
    ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe", {"num_experts": 8}, "num_local_experts"),  # disagrees with the saved alias
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ("olmoe", {"attention_bias": True}, "attention_bias"),
    ("olmoe", {"sliding_window": 4096}, "sliding_window"),
    ("olmoe", {"head_dim": 16}, "head_dim"),
    # full attention at layers 1, 2, 3: not 'every n-th layer'
    ("qwen3_next", {"layer_types": ["linear_attention"] + ["full_attention"] * 3}, "layer_types"),
    ("qwen3_next", {"layer_types": ["full_attention"] * 3}, "layer_types"),  # 4 layers
    ("qwen3_next", {"layer_types": ["linear_attention"] * 4}, "layer_types"),  # no full attention
    ("qwen3_next", {"layer_types": None, "full_attention_interval": 0}, "full_attention_interval"),
    ("qwen3_next", {"linear_num_value_heads": 3}, "linear_num_value_heads"),  # not a multiple of 2
    ("qwen3_next", {"attention_bias": True}, "attention_bias"),
    ("qwen3_next", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_next", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, object]:
    return save_families(tmp_path_factory, FAMILIES)


@pytest.mark.parametrize(
    ("family", "edits", "field"), REFUSALS, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_config_refused_naming_the_field(family, edits, field, saved, tmp_path) -> None:
    assert_refused(edited(saved[family], tmp_path / "hf", edits), f"config.json: {field}")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_next"])
def test_export_without_shared_expert_refused(family, saved) -> None:
    plan, _ = plan_import(str(saved[family]))
    moe = dataclasses.replace(
        plan.cfg.moe, num_shared_experts=0, shared_ffn_hidden=0, shared_expert_gate=False
    )
    with pytest.raises(ConfigError, match="model.moe.num_shared_experts"):
        plan_export(dataclasses.replace(plan.cfg, moe=moe), family)


def test_export_refuses_what_the_family_cannot_hold(saved) -> None:
    """plan_export re-reads the config it would write: a sigmoid router has no qwen3_moe field."""
    plan, _ = plan_import(str(saved["qwen3_moe"]))
    cfg = dataclasses.replace(plan.cfg, moe=dataclasses.replace(plan.cfg.moe, score_func="sigmoid"))
    with pytest.raises(ConfigError, match="model.moe.score_func"):
        plan_export(cfg, "qwen3_moe")


def test_hub_spellings_accepted(saved, tmp_path) -> None:
    """Hub config.json files predate transformers 5: `num_experts` (not its alias) in Qwen3-MoE,
    `rope_theta` at top level, Qwen3-Next's partial rotary factor left to its 0.25 default."""
    config = json.loads((saved["qwen3_moe"] / "config.json").read_text())
    path = edited(
        saved["qwen3_moe"],
        tmp_path / "q3",
        {"num_local_experts": None, "num_experts": config["num_local_experts"], "rope_parameters": None}
        | {"rope_theta": 1e6, "max_window_layers": 48, "sliding_window": None, "use_sliding_window": False},
    )
    plan, _ = plan_import(str(path))
    assert (plan.cfg.moe.num_experts, plan.cfg.rope_theta) == (16, 1e6)
    rope = {"rope_type": "default", "rope_theta": 1e7}
    path = edited(saved["qwen3_next"], tmp_path / "next", {"rope_parameters": rope})
    assert plan_import(str(path))[0].cfg.partial_rotary_factor == 0.25


@pytest.mark.parametrize(
    ("family", "overrides", "first_k_dense", "moe_layer_freq"),
    [("qwen2_moe", {"mlp_only_layers": [0]}, 1, 1), ("qwen3_moe", {"decoder_sparse_step": 2}, 0, 2)],
)
def test_dense_layers_imported_and_exported(
    family, overrides, first_k_dense, moe_layer_freq, tmp_path
) -> None:
    """Dense layers placed by `mlp_only_layers` / `decoder_sparse_step`: same logits as
    transformers, and the export places them the same way."""
    case = CASES[family]
    config = case.config(experts_implementation="eager", attn_implementation="eager", **overrides)
    torch.manual_seed(0)
    ref = o1_init_(case.model_class(config).eval())
    save(ref, tmp_path / "hf", "hub")
    ours, _ = ours_from(tmp_path / "hf")
    assert (ours.cfg.first_k_dense, ours.cfg.moe_layer_freq) == (first_k_dense, moe_layer_freq)
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.double()(input_ids=ids).logits
        torch.testing.assert_close(ours.logits(ours(ids)), want, atol=1e-5, rtol=1e-5)
    cfg, state, _ = import_checkpoint(tmp_path / "hf")
    export_state_dict(cfg, state, tmp_path / "out", family)
    back = case.model_class.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert [type(layer.mlp).__name__ for layer in back.model.layers] == [
        type(layer.mlp).__name__ for layer in ref.model.layers
    ]
