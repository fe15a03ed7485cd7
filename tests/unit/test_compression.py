"""Gradient compressors in one process: the compress/decode math, error feedback, state, registry.

`group=None` is a group of one: the full compress -> aggregate path runs without a process group
(the sum over one rank is that rank's decoded contribution)."""

from __future__ import annotations

import math

import pytest
import torch

from parallel.compression import (
    COMPRESSORS,
    CompressionConfig,
    PowerSGDCompression,
    Segment,
    build_compressor,
    compressor_from_config,
)
from parallel.compression.quantize import dequantize_int8, pack_bits, quantize_int8, unpack_bits

LOSSY = {
    "topk": {"topk_ratio": 0.1},
    "sign": {},
    "int8": {"chunk_size": 64},
    "powersgd": {"rank": 2},
    "moe_selective": {"chunk_size": 64},
}


def grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(16, 12, generator=gen), "b": torch.randn(12, generator=gen)}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_sign_packing_round_trip(n):
    bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), bits)
    # Same layout as numpy.packbits (most significant bit first).
    if n == 9:
        manual = [int("".join("1" if b else "0" for b in bits[:8].tolist()), 2), 128 * int(bits[8])]
        assert packed.tolist() == manual


def test_int8_quantization_error_bound():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 1000)
    q, scale_C = quantize_int8(x, chunk_size=128)
    assert q.dtype == torch.int8 and q.numel() == 1000 and scale_C.numel() == 8  # 1 scale per 128
    error = (dequantize_int8(q, scale_C, 128) - x).abs()
    bound_C = torch.stack([chunk.abs().max() for chunk in x.split(128)]) / 254
    assert (error <= bound_C.repeat_interleave(128)[:1000] * (1 + 1e-6)).all()
    assert torch.equal(dequantize_int8(*quantize_int8(torch.zeros(10), 4), 4), torch.zeros(10))


def test_powersgd_exact_on_rank_r_matrix():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)  # rank 3
    psgd = PowerSGDCompression(rank=3)
    total = psgd.all_reduce_sum(m, None, "m")
    torch.testing.assert_close(total, m, rtol=0, atol=1e-5 * m.abs().max().item())
    assert psgd.residuals["m"].abs().max() < 1e-5 * m.abs().max()
    # 1-D tensors and matrices too small to gain are sent as they are.
    bias, small = torch.randn(30), torch.randn(3, 4)
    assert torch.equal(psgd.all_reduce_sum(bias, None, "b"), bias)
    assert torch.equal(psgd.all_reduce_sum(small, None, "s"), small)


def test_powersgd_int8_factors_feed_their_rounding_back():
    """Rank-3 matrix, int8 factors: the sum is exact up to int8 rounding, and that rounding stays in
    the residual (sum + residual = gradient). Their bytes are checked on real ranks."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)
    psgd = PowerSGDCompression(rank=3, factor_bits=8, chunk_size=64)
    total = psgd.all_reduce_sum(m, None, "m")
    torch.testing.assert_close(total, m, rtol=0, atol=0.02 * m.abs().max().item())
    assert not torch.equal(total, PowerSGDCompression(rank=3).all_reduce_sum(m, None, "m"))  # it rounds
    torch.testing.assert_close(total + psgd.residuals["m"], m, rtol=0, atol=1e-6 * m.abs().max().item())


def test_powersgd_int8_factors_scale_each_column_on_its_own():
    """Factor columns follow the singular values; a column 1000x weaker than its neighbour keeps
    int8 precision (error <= its own max / 254), as it would not under one scale for both."""
    g = torch.Generator().manual_seed(4)
    factor = torch.stack([1000 * torch.randn(64, generator=g), torch.randn(64, generator=g)], dim=-1)
    sent, summed, _, _ = PowerSGDCompression(rank=2, factor_bits=8)._sum([factor.unsqueeze(0)], [], None)
    weak, weak_decoded = factor[:, 1], summed[0][0, :, 1]
    assert (weak_decoded - weak).abs().max() <= weak.abs().max() / 254 * 1.0001
    assert torch.equal(sent[0], summed[0])  # one rank: what it sends is the sum


def test_factored_second_moment_of_the_local_gradient():
    """second_moment=factored: row and column sums of the squared gradient (before compression and
    error feedback), rebuilt as their rank-1 product: exact for a rank-1 square, per expert for a
    bank, whole for 1-D tensors; only while compressing, and cleared by step()."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(24, 1, generator=g), torch.randn(1, 16, generator=g)
    bank_EDF = torch.randn(3, 1, 8, generator=g) * torch.randn(3, 6, 1, generator=g)  # rank 1 each
    bias = torch.randn(16, generator=g)
    comp = build_compressor("topk", warmup_steps=1, second_moment="factored", topk_ratio=0.1)
    comp.all_reduce_sum(a @ b, None, "w")
    assert comp.second_moments == {}  # warm-up: the sum is exact, Adam squares it itself
    comp.step()
    for key, grad in (("w", a @ b), ("experts.w1", bank_EDF), ("bias", bias)):
        comp.all_reduce_sum(grad, None, key)
        torch.testing.assert_close(comp.second_moments[key], grad**2, rtol=2**-7, atol=0)  # bf16 sums
    comp.step()
    assert comp.second_moments == {}


def test_powersgd_compresses_each_expert_of_a_bank_on_its_own():
    """[E, d, f] expert weights: E independent rank-r problems, so each expert's rank-2 gradient
    is exact (one rank-2 factorisation of the [E, d*f] view could not be), and an expert with no
    tokens (zero gradient) stays zero while the others are reconstructed."""
    g = torch.Generator().manual_seed(2)
    bank_EDF = torch.randn(4, 24, 2, generator=g) @ torch.randn(4, 2, 16, generator=g)
    bank_EDF[1] = 0.0  # as a [4, 24 * 16] matrix the bank has rank 3
    psgd = PowerSGDCompression(rank=2)
    total = psgd.all_reduce_sum_experts(bank_EDF, None, "experts.w1")
    torch.testing.assert_close(total, bank_EDF, rtol=0, atol=1e-5 * bank_EDF.abs().max().item())


def test_powersgd_recovers_from_a_zero_gradient():
    psgd = PowerSGDCompression(rank=2)
    psgd.all_reduce_sum(torch.zeros(20, 10), None, "m")  # e.g. an expert that saw no token
    g = torch.Generator().manual_seed(1)
    m = torch.randn(20, 2, generator=g) @ torch.randn(2, 10, generator=g)
    # A rank-2 matrix is reconstructed exactly up to fp32 rounding, relative to its scale.
    torch.testing.assert_close(psgd.all_reduce_sum(m, None, "m"), m, rtol=0, atol=1e-5 * m.abs().max().item())


def test_powersgd_initial_q_is_deterministic():
    a, b = PowerSGDCompression(rank=2, seed=3), PowerSGDCompression(rank=2, seed=3)
    assert torch.equal(a._initial_q("layers.0.w", 1, 10), b._initial_q("layers.0.w", 1, 10))
    assert not torch.equal(a._initial_q("layers.0.w", 1, 10), a._initial_q("layers.1.w", 1, 10))


@pytest.mark.parametrize("kind", sorted(LOSSY))
def test_error_feedback_conserves_the_gradient(kind):
    """Over steps, everything sent plus the current residual is the sum of the true gradients."""
    comp = build_compressor(kind, **LOSSY[kind])
    sent_sum = {k: torch.zeros_like(v) for k, v in grads(0).items()}
    true_sum = {k: torch.zeros_like(v) for k, v in grads(0).items()}
    for step in range(5):
        for key, g in grads(step).items():
            sent_sum[key] += comp.all_reduce_sum_experts(g, None, key)
            true_sum[key] += g
        comp.step()
    lossy = False
    for key in true_sum:
        torch.testing.assert_close(sent_sum[key] + comp.residuals[key], true_sum[key], rtol=0, atol=1e-5)
        lossy |= comp.residuals[key].abs().max() > 1e-3
    assert lossy, "compression should leave something in the residual"


def test_error_feedback_on_a_flat_bucket_keys_each_parameter():
    comp = build_compressor("topk", topk_ratio=0.25)
    g = grads(0)
    segments = [Segment("w", g["w"].shape), Segment("b", g["b"].shape)]
    flat = torch.cat([g["w"].reshape(-1), g["b"]])
    total = comp.all_reduce_sum_segments(flat, None, segments)
    assert comp.residuals["w"].shape == g["w"].shape and comp.residuals["b"].shape == g["b"].shape
    torch.testing.assert_close(
        total + torch.cat([comp.residuals["w"].reshape(-1), comp.residuals["b"]]), flat
    )


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_warmup_is_uncompressed_and_counted(kind):
    comp = build_compressor(kind, warmup_steps=2)
    for step in range(2):
        g = grads(step)["w"]
        assert torch.equal(comp.all_reduce_sum(g, None, "w"), g)
        assert not comp.residuals
        assert comp.step() == {"comm_bytes": 0, "comm_bytes_uncompressed": 0}  # group of one
    assert comp.compressing and comp.steps_done == 2


@pytest.mark.parametrize("kind", sorted(LOSSY))
def test_state_dict_round_trip(kind, tmp_path):
    comp = build_compressor(kind, warmup_steps=1, **LOSSY[kind])
    for step in range(3):
        for key, g in grads(step).items():
            comp.all_reduce_sum(g, None, key)
        comp.step()
    torch.save(comp.state_dict(), tmp_path / "c.pt")
    restored = build_compressor(kind, warmup_steps=1, **LOSSY[kind])
    restored.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    assert restored.steps_done == 3 and restored.residuals.keys() == comp.residuals.keys()
    for key in comp.residuals:
        assert torch.equal(restored.residuals[key], comp.residuals[key])
    # The restored compressor continues exactly like the original one.
    for key, g in grads(3).items():
        assert torch.equal(restored.all_reduce_sum(g, None, key), comp.all_reduce_sum(g, None, key))


def test_moe_selective_skips_inactive_experts():
    comp = build_compressor("moe_selective", chunk_size=16)
    g_E = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(0))
    g_E[1] = 0  # no tokens: inferred from the zero gradient
    total = comp.all_reduce_sum_experts(g_E, None, "experts.w1", active_E=None)
    assert comp.last_synced_E.tolist() == [True, False, True, True]
    assert torch.equal(total[1], torch.zeros(8, 6))
    # Explicit mask: expert 3 is skipped, and keeps its whole gradient (+ residual) for later.
    before = comp.residuals["experts.w1"][3].clone()
    total = comp.all_reduce_sum_experts(g_E, None, "experts.w1", torch.tensor([True, False, True, False]))
    assert torch.equal(total[3], torch.zeros(8, 6))
    torch.testing.assert_close(comp.residuals["experts.w1"][3], before + g_E[3])
    # A norm threshold above every expert's norm skips them all.
    comp = build_compressor("moe_selective", threshold=1e9)
    assert torch.equal(comp.all_reduce_sum_experts(g_E, None, "w"), torch.zeros_like(g_E))
    torch.testing.assert_close(comp.residuals["w"], g_E)


def test_registry_and_config():
    assert set(COMPRESSORS) == {"none", "bf16", "powersgd", "topk", "sign", "int8", "moe_selective"}
    for kind in COMPRESSORS:
        comp = compressor_from_config(CompressionConfig(kind=kind, warmup_steps=3))
        assert comp.kind == kind and comp.warmup_steps == 3
    assert compressor_from_config(CompressionConfig(kind="powersgd", rank=7)).rank == 7
    assert compressor_from_config(CompressionConfig(kind="powersgd", factor_bits=8)).factor_bits == 8
    with pytest.raises(ValueError, match=r"kind='onebit_adam'.*bf16.*topk"):
        build_compressor("onebit_adam")
    with pytest.raises(ValueError, match=r"kind='nope'.*moe_selective"):
        compressor_from_config(CompressionConfig(kind="nope"))
    with pytest.raises(ValueError, match=r"topk takes .*topk_ratio.*not \['rank'\]"):
        build_compressor("topk", rank=2)
