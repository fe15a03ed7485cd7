"""RoPE scaling (linear, llama3, yarn): our cos/sin tables equal transformers' rotary embedding,
and tiny DeepSeek-V3 (yarn, with mscale_all_dim scaling MLA's softmax) and Llama (llama3)
checkpoints import with the same fp64 logits and export back to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from model.config import RopeScalingConfig
from model.layers import rope_tables
from model.transformer import Transformer
from tests.hf.cases import CASES, TINY
from tests.hf.reference import o1_init_
from trainer.checkpoint.hf import export_state_dict, import_checkpoint

# DeepSeek-V3's released yarn values.
DEEPSEEK_V3_YARN = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
DEEPSEEK_V3_YARN.update(mscale=1.0, mscale_all_dim=1.0)
UNIT_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    | dict(low_freq_factor=1.0, high_freq_factor=4.0),
    "yarn_deepseek_v3": {"rope_type": "yarn", **DEEPSEEK_V3_YARN},
    "yarn_mscale_differs": {"rope_type": "yarn", **DEEPSEEK_V3_YARN, "mscale": 0.707},
    "yarn_derived_attention_factor": dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=2048
    ),
    "yarn_no_truncate": dict(
        rope_type="yarn", factor=16.0, original_max_position_embeddings=4096, truncate=False
    ),
}
TO_OURS = {"original_max_position_embeddings": "original_max_seq_len"}


@pytest.mark.parametrize("name", sorted(UNIT_CASES))
def test_tables_match_transformers(name: str) -> None:
    params = {"rope_theta": 10000.0, **UNIT_CASES[name]}
    dim, seq = 64, 4096
    config = T.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=dim, rope_parameters=params)
    rotary = T.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, seq, dim)
    ref_cos, ref_sin = rotary(x, torch.arange(seq)[None])
    fields = {TO_OURS.get(k, k): v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    scaling = RopeScalingConfig(type=params["rope_type"], **fields)
    cos, sin = rope_tables(dim, seq, 10000.0, scaling)
    # transformers computes the frequencies in fp32: angles up to ~4096 rad carry ~2e-4 of error.
    torch.testing.assert_close(cos, ref_cos[0, :, : dim // 2], atol=1e-3, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0, :, : dim // 2], atol=1e-3, rtol=0)
    # Short positions, where fp32 angles are exact enough to pin the scaling down.
    torch.testing.assert_close(cos[:64], ref_cos[0, :64, : dim // 2], atol=5e-6, rtol=0)
    torch.testing.assert_close(sin[:64], ref_sin[0, :64, : dim // 2], atol=5e-6, rtol=0)


def _deepseek_v3_yarn():
    # The released yarn block with a smaller factor and context, so max_position_embeddings stays small.
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, **DEEPSEEK_V3_YARN}
    rope.update(factor=4.0, original_max_position_embeddings=64)
    kwargs = {**CASES["deepseek_v3"].kwargs, "rope_parameters": rope, "max_position_embeddings": 256}
    return T.DeepseekV3Config, T.DeepseekV3ForCausalLM, kwargs


def _llama3():
    rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, original_max_position_embeddings=32)
    rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    kwargs = dict(
        TINY, intermediate_size=48, rms_norm_eps=1e-5, rope_parameters=rope, max_position_embeddings=256
    )
    return T.LlamaConfig, T.LlamaForCausalLM, kwargs


E2E = {"deepseek_v3_yarn": _deepseek_v3_yarn, "llama_llama3": _llama3}


@pytest.mark.parametrize("name", sorted(E2E))
def test_import_and_export_match_transformers(name: str, tmp_path) -> None:
    config_class, model_class, kwargs = E2E[name]()
    # Eager kernels: the grouped-mm experts path has no fp64.
    config = config_class(**kwargs, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(0)
    ref = o1_init_(model_class(config).eval(), 0)
    ref.save_pretrained(tmp_path / "hf")
    ref = ref.double()
    cfg, state, _ = import_checkpoint(tmp_path / "hf", torch.float64)
    assert cfg.rope_scaling.type == config.rope_parameters["rope_type"]
    ours = Transformer(cfg).to(torch.float64)
    ours.load_state_dict(state, strict=False)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        torch.testing.assert_close(ours.logits(ours.eval()(ids)), ref_logits, atol=1e-5, rtol=1e-5)

    export_state_dict(cfg, state, tmp_path / "out", config.model_type)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert {k: v for k, v in written.items() if k != "truncate"} == {
        k: v for k, v in config.rope_parameters.items() if k != "type"
    }
    eager = dict(attn_implementation="eager", experts_implementation="eager")
    back = model_class.from_pretrained(tmp_path / "out", **eager).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref_logits, atol=1e-5, rtol=1e-5)
