"""Transformer pieces: RoPE, GQA, MLA, MTP, layout-independent init."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, ModelConfig, Transformer
from model.attention import GroupedQueryAttention
from model.config import MLAConfig, MoEConfig
from model.layers import apply_rope, rope_tables


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=16),
    )
    base.update(overrides)
    return ModelConfig(**base)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qs = apply_rope(q.expand(1, 16, 1, 8), cos, sin)[0, m, 0]
        ks = apply_rope(k.expand(1, 16, 1, 8), cos, sin)[0, n, 0]
        return qs @ ks

    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(score(3, 3), q @ k)  # equal positions: rotation cancels
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_preserves_norm():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 16, 3, 8)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_gqa_with_kv_heads_equal_heads_is_multi_head_attention():
    cfg = tiny_config(num_kv_heads=4)
    attn = GroupedQueryAttention(cfg)
    x = torch.randn(2, 10, 32)
    cos, sin = rope_tables(8, 32, 10000.0)
    B, S, hd = 2, 10, 8
    q = apply_rope(attn.wq(x).view(B, S, 4, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, S, 4, hd), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, S, 4, hd).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_gqa_shares_each_kv_head_across_its_query_group():
    cfg = tiny_config(num_kv_heads=2)
    gqa = GroupedQueryAttention(cfg)
    mha = GroupedQueryAttention(tiny_config(num_kv_heads=4))
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # MHA with each kv head duplicated for the two query heads of its group.
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(1, 7, 32)
    cos, sin = rope_tables(8, 32, 10000.0)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-5)


def test_model_is_causal():
    model = Transformer(tiny_config())
    model.init_weights(0)
    model.eval()
    tokens = torch.randint(0, 64, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 64
    h1 = model.tok_embeddings(tokens)
    h2 = model.tok_embeddings(changed)
    for layer in model.layers.values():
        h1, h2 = layer(h1, model.rope_cos, model.rope_sin), layer(h2, model.rope_cos, model.rope_sin)
    torch.testing.assert_close(h1[:, :8], h2[:, :8])
    assert not torch.allclose(h1[:, 8:], h2[:, 8:])


def test_mla_model_trains_one_step():
    cfg = tiny_config(
        attention="mla",
        mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    )
    model = Transformer(cfg)
    model.init_weights(0)
    tokens = torch.randint(0, 64, (2, 17))
    out = model(tokens[:, :-1], tokens[:, 1:])
    (out.ce_sum / out.num_tokens).backward()
    assert model.layers["0"].attention.wkv_b.weight.grad.abs().sum() > 0
    assert out.num_tokens == 32


def test_mtp_loss_predicts_further_ahead_and_ignores_the_tail():
    cfg = tiny_config(mtp_depth=2)
    model = Transformer(cfg)
    model.init_weights(0)
    model.eval()
    tokens = torch.randint(0, 64, (2, 11))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    out = model(inputs, labels)

    # Recompute depth by depth by hand.
    h = model.tok_embeddings(inputs)
    for layer in model.layers.values():
        h = layer(h, model.rope_cos, model.rope_sin)
    expected = torch.zeros(())
    for depth, module in enumerate(model.mtp, start=1):
        nxt = F.pad(inputs[:, depth:], (0, depth))
        h, normed = module(h, model.tok_embeddings(nxt), model.rope_cos, model.rope_sin)
        logits = model.logits(normed)[:, : 10 - depth]
        target = tokens[:, 1 + depth :]  # depth d at position i predicts token i + d + 1
        expected = expected + F.cross_entropy(logits.reshape(-1, 64), target.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.mtp_ce_sum, expected / 2)


def test_ignored_labels_do_not_count():
    model = Transformer(tiny_config())
    model.init_weights(0)
    tokens = torch.randint(0, 64, (1, 9))
    labels = tokens[:, 1:].clone()
    full = model(tokens[:, :-1], labels)
    labels[0, 4:] = IGNORE_INDEX
    part = model(tokens[:, :-1], labels)
    assert part.num_tokens == 4 and full.num_tokens == 8
    assert part.ce_sum < full.ce_sum


def test_init_depends_only_on_seed_and_parameter_name():
    cfg = tiny_config(mtp_depth=1)
    a = Transformer(cfg)
    a.init_weights(7)
    with torch.device("meta"):
        b = Transformer(cfg)
    b.to_empty(device="cpu")
    b.init_weights(7)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    # A model with fewer layers shares the surviving layers' weights exactly (pipeline stages).
    short = Transformer(tiny_config(num_layers=1))
    short.init_weights(7)
    torch.testing.assert_close(short.layers["0"].attention.wq.weight, a.layers["0"].attention.wq.weight)
    c = Transformer(cfg)
    c.init_weights(8)
    assert not torch.equal(c.tok_embeddings.weight, a.tok_embeddings.weight)


def test_first_k_dense_and_moe_layer_frequency():
    cfg = tiny_config(num_layers=6, first_k_dense=1, moe_layer_freq=2)
    model = Transformer(cfg)
    kinds = ["moe" if hasattr(layer, "moe") else "dense" for layer in model.layers.values()]
    assert kinds == ["dense", "moe", "dense", "moe", "dense", "moe"]
