"""Gated DeltaNet (model/linear_attention.py): the chunked delta rule equals the token-by-token
one, the layer equals transformers' Qwen3NextGatedDeltaNet, and a hybrid Transformer trains and
initialises."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from model import Transformer
from model.config import LinearAttentionConfig, ModelConfig, MoEConfig
from model.linear_attention import GatedDeltaNet, chunk_gated_delta_rule, recurrent_gated_delta_rule

DIM, KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM, KERNEL, SEQ = 32, 2, 4, 8, 6, 4, 11


def delta_rule_inputs(seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = torch.nn.functional.normalize(randn(2, seq_len, KEY_HEADS, KEY_DIM), dim=-1) * KEY_DIM**-0.5
    k = torch.nn.functional.normalize(randn(2, seq_len, KEY_HEADS, KEY_DIM), dim=-1)
    v = randn(2, seq_len, VALUE_HEADS, VALUE_DIM)
    g = -torch.nn.functional.softplus(randn(2, seq_len, VALUE_HEADS))  # log decay <= 0
    beta = torch.sigmoid(randn(2, seq_len, VALUE_HEADS))
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


@pytest.mark.parametrize("seq_len,chunk_size", [(3, 4), (8, 4), (11, 4), (13, 16), (17, 8)])
def test_chunked_equals_recurrent_with_gradients(seq_len: int, chunk_size: int) -> None:
    args = delta_rule_inputs(seq_len)
    ours = chunk_gated_delta_rule(*args, chunk_size=chunk_size)
    ref = recurrent_gated_delta_rule(*args)
    assert ours.shape == (2, seq_len, VALUE_HEADS, VALUE_DIM) and ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=0.0, atol=1e-6)
    cotangent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    grads = torch.autograd.grad((ours * cotangent).sum(), args)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), args)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, ref_grad, rtol=0.0, atol=1e-6)


def model_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=DIM,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=16, aux_loss_coef=0.0),
        linear_attention=LinearAttentionConfig(
            full_attention_interval=2,
            num_key_heads=KEY_HEADS,
            num_value_heads=VALUE_HEADS,
            key_head_dim=KEY_DIM,
            value_head_dim=VALUE_DIM,
            conv_kernel=KERNEL,
            chunk_size=4,
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


@torch.no_grad()
def hf_layer() -> Qwen3NextGatedDeltaNet:
    """transformers' layer with fp64 weights of O(1) activations: std 1/sqrt(fan in) for matrices
    (the conv's fan in is its kernel), and +-0.5 around their init for the vectors."""
    cfg = Qwen3NextConfig(
        hidden_size=DIM,
        num_hidden_layers=1,
        linear_num_key_heads=KEY_HEADS,
        linear_num_value_heads=VALUE_HEADS,
        linear_key_head_dim=KEY_DIM,
        linear_value_head_dim=VALUE_DIM,
        linear_conv_kernel_dim=KERNEL,
        layer_types=["linear_attention"],
    )
    layer = Qwen3NextGatedDeltaNet(cfg, layer_idx=0).double()
    gen = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.copy_(p + 0.5 * noise if p.ndim == 1 else noise / p.shape[-1] ** 0.5)
    return layer


@torch.no_grad()
def copy_from_hf(ours: GatedDeltaNet, hf: Qwen3NextGatedDeltaNet) -> None:
    """De-interleave HF's fused projections, grouped per key head: in_proj_qkvz rows are
    [q_g, k_g, v_g (H/G heads), z_g (H/G heads)] for each key head g, in_proj_ba rows [b_g, a_g]."""
    reps, key_width = VALUE_HEADS // KEY_HEADS, KEY_HEADS * KEY_DIM
    qkvz = hf.in_proj_qkvz.weight.view(KEY_HEADS, 2 * KEY_DIM + 2 * reps * VALUE_DIM, DIM)
    q, k, v, z = qkvz.split([KEY_DIM, KEY_DIM, reps * VALUE_DIM, reps * VALUE_DIM], dim=1)
    b, a = hf.in_proj_ba.weight.view(KEY_HEADS, 2 * reps, DIM).split([reps, reps], dim=1)
    for name, w in dict(wq=q, wk=k, wv=v, wz=z, wb=b, wa=a).items():
        getattr(ours, name).weight.copy_(w.reshape(-1, DIM))
    conv_q, conv_k, conv_v = hf.conv1d.weight[:, 0].split([key_width, key_width, VALUE_HEADS * VALUE_DIM])
    ours.conv_q.copy_(conv_q), ours.conv_k.copy_(conv_k), ours.conv_v.copy_(conv_v)
    ours.A_log.copy_(hf.A_log), ours.dt_bias.copy_(hf.dt_bias)
    ours.out_norm.weight.copy_(hf.norm.weight), ours.wo.weight.copy_(hf.out_proj.weight)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_gated_deltanet_matches_transformers(dtype: torch.dtype, atol: float) -> None:
    hf = hf_layer()
    # Zero-centred norms elsewhere must not touch the gated norm (plain weight * normed, as HF).
    ours = GatedDeltaNet(model_config(norm_zero_centered=True, norm_eps=hf.layer_norm_epsilon)).double()
    copy_from_hf(ours, hf)
    hf, ours = hf.to(dtype), ours.to(dtype)
    x = torch.randn(2, SEQ, DIM, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours, None, None)
    ref = hf(x_hf, attention_mask=None)
    assert out.dtype == ref.dtype == dtype and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0.0, atol=atol)
    cotangent = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (out * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    # HF runs its delta rule in fp32 even for fp64 inputs, so fp64 agrees to fp32 rounding only:
    # the tolerance is relative to the gradient's scale (~10 here).
    scale = x_hf.grad.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=0.0, atol=atol * scale)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_hybrid_transformer_trains_and_initialises(zero_centered: bool) -> None:
    cfg = model_config(norm_zero_centered=zero_centered)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    linear, full = model.layers["0"].attention, model.layers["1"].attention
    assert isinstance(linear, GatedDeltaNet) and not isinstance(full, GatedDeltaNet)
    assert torch.equal(linear.out_norm.weight, torch.ones(VALUE_DIM))
    norm_init = torch.zeros(DIM) if zero_centered else torch.ones(DIM)
    assert torch.equal(model.layers["0"].attention_norm.weight, norm_init)
    A = linear.A_log.exp()
    assert ((A >= 1.0) & (A <= 16.0)).all() and A.unique().numel() == VALUE_HEADS
    dt = torch.nn.functional.softplus(linear.dt_bias)
    assert ((dt > 0.999e-3) & (dt < 1.001e-1)).all()
    assert 0.2 < linear.conv_v.std() < 0.8  # 1/sqrt(kernel) = 0.5
    # Layout independence: the same name and seed give the same values in a fresh model.
    again = Transformer(replace(cfg))
    again.init_weights(seed=0)
    assert torch.equal(again.layers["0"].attention.A_log, linear.A_log)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, labels_BS=tokens).ce_sum
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("wq", "conv_q", "conv_v", "A_log", "dt_bias", "out_norm.weight", "wo"):
        grad = linear.get_parameter(f"{name}.weight" if name.startswith("w") else name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
