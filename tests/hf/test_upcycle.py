"""Upcycling a dense transformers checkpoint (Llama, Qwen3) into a MoE: at step 0 the MoE's
logits equal the dense model's (transformers' own class), also with fine-grained experts cut
from slices of the dense MLP; then it trains, and the experts of a group drift apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T

from model.transformer import Transformer
from tests.hf.reference import o1_init_
from trainer.checkpoint.hf.convert import load_full
from trainer.checkpoint.hf.job import plan_for_model
from trainer.checkpoint.hf.plan import plan_import
from trainer.errors import ConfigError

DENSE = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 8}),
}


def dense_checkpoint(family: str, path) -> torch.nn.Module:
    config_class, model_class, extra = DENSE[family]
    config = config_class(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager", **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = o1_init_(model_class(config).eval())
    model.save_pretrained(path)
    return model.double()


def upcycled(path, num_experts: int, top_k: int, granularity: int, first_k_dense: int = 0) -> Transformer:
    dense_cfg = plan_import(str(path))[0].cfg
    moe = dataclasses.replace(
        dense_cfg.moe,
        num_experts=num_experts,
        top_k=top_k,
        moe_ffn_hidden=dense_cfg.ffn_hidden // granularity,
    )
    cfg = dataclasses.replace(dense_cfg, moe=moe, first_k_dense=first_k_dense)
    plan, ckpt = plan_for_model(cfg, path)
    model = Transformer(cfg).double()
    model.load_state_dict(load_full(plan, ckpt, torch.float64), strict=False)
    return model


@pytest.mark.parametrize("family", sorted(DENSE))
@pytest.mark.parametrize(("num_experts", "top_k", "granularity"), [(8, 2, 1), (8, 4, 2), (16, 4, 4)])
def test_upcycled_logits_equal_the_dense_model(family, num_experts, top_k, granularity, tmp_path) -> None:
    dense = dense_checkpoint(family, tmp_path / "dense")
    moe = upcycled(tmp_path / "dense", num_experts, top_k, granularity)
    assert len(moe.moe_layers()) == 2
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe.logits(moe(ids)), dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_upcycled_model_trains_and_its_experts_diverge(tmp_path) -> None:
    dense_checkpoint("llama", tmp_path / "dense")
    model = upcycled(tmp_path / "dense", num_experts=8, top_k=4, granularity=2).train()
    first = model.layers["0"].moe.experts.w1.detach().clone()
    assert torch.equal(first[0], first[2])  # two copies of the same dense slice
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(15):
        out = model(ids[:, :-1], ids[:, 1:])
        loss = out.ce_sum / out.num_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    w1 = model.layers["0"].moe.experts.w1.detach()
    assert not torch.equal(w1[0], w1[2])


def test_upcycling_refuses_what_it_cannot_make_exact(tmp_path) -> None:
    dense_checkpoint("llama", tmp_path / "dense")
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        upcycled(tmp_path / "dense", num_experts=8, top_k=3, granularity=2)
    with pytest.raises(ConfigError, match="model.moe.moe_ffn_hidden"):
        upcycled(tmp_path / "dense", num_experts=8, top_k=2, granularity=3)
