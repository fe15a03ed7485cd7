"""Gradient compressors on 2 real gloo ranks, checked against the exact all-reduce.

All cases share one spawned job (process start-up dominates on 2 cores); each test checks one
part of its results. Every rank's gradients come from a seed, so the parent can rebuild them and
compute the exact sums and the expected compressed results itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.compression import COMPRESSORS, build_compressor, compression_hook
from parallel.compression.quantize import dequantize_int8, quantize_int8
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2
LOSSY = {
    "topk": {"topk_ratio": 0.1},
    "sign": {},
    "int8": {"chunk_size": 64},
    "powersgd": {"rank": 2},
    "moe_selective": {"chunk_size": 64},
}
# Error feedback cases: each kind at its LOSSY options, plus PowerSGD with int8 factors.
EF_CASES = {kind: (kind, options) for kind, options in LOSSY.items()} | {
    "powersgd_int8": ("powersgd", {"rank": 2, "factor_bits": 8, "chunk_size": 64})
}
DDP_STEPS = 20
MB = 1 << 20


def grad(step: int, rank: int, shape: tuple[int, ...] = (24, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + rank))


def low_rank_grad(rank: int) -> torch.Tensor:
    """Rank-2 matrices sharing their column space across ranks: PowerSGD with r = 2 is lossless."""
    u = torch.randn(24, 2, generator=torch.Generator().manual_seed(77))
    return u @ torch.randn(2, 16, generator=torch.Generator().manual_seed(rank))


# ---- what each rank runs --------------------------------------------------------------------------


def aggregates(group: dist.ProcessGroup) -> dict:
    """Step 0 in warm-up, step 1 compressed, for every kind (topk at k = all and at 10%)."""
    rank, out = dist.get_rank(), {}
    settings = {kind: {} for kind in COMPRESSORS} | {
        "topk": {"topk_ratio": 1.0},
        "topk10": {"topk_ratio": 0.1},
    }
    for name, options in settings.items():
        comp = build_compressor(name.removesuffix("10"), warmup_steps=1, **options)
        warm = comp.all_reduce_sum(grad(0, rank), group, "w")
        comp.step()
        g = low_rank_grad(rank) if name == "powersgd" else grad(1, rank)
        out[name] = {"warmup": warm, "compressed": comp.all_reduce_sum(g, group, "w"), "bytes": comp.step()}
    return out


def error_feedback(group: dist.ProcessGroup) -> dict:
    """4 compressed steps: the sum of the aggregates and this rank's final residual."""
    out = {}
    for name, (kind, options) in EF_CASES.items():
        comp = build_compressor(kind, **options)
        total, roundings = torch.zeros(24, 16), 0.0
        for step in range(4):
            step_total = comp.all_reduce_sum_experts(grad(step, dist.get_rank()), group, "w")
            total += step_total
            roundings += float(step_total.abs().max()) / 254  # int8's phase 2, per entry at most
            comp.step()
        out[name] = {"total": total, "residual": comp.residuals["w"], "phase2_bound": roundings}
    return out


def plain_sum_hook(group, bucket):
    """The reference: DDP's bucket summed by one uncompressed all-reduce."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def ddp_training(group: dist.ProcessGroup) -> dict:
    """A tiny MLP in 2 DDP buckets (one before DDP rebuilds them after step 1) trained with each compressor through the comm hook."""
    rank, out = dist.get_rank(), {}
    gen = torch.Generator().manual_seed(5)
    w_true = torch.randn(32, 1, generator=gen)
    for kind in [*COMPRESSORS, "plain_sum_hook"]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        ddp = DistributedDataParallel(model, process_group=group, bucket_cap_mb=8 * 1024 / MB)
        comp = build_compressor(kind if kind in COMPRESSORS else "none", **LOSSY.get(kind, {}))
        hook = compression_hook(comp, model) if kind in COMPRESSORS else plain_sum_hook
        buckets = []

        def counting_hook(state, bucket, hook=hook, buckets=buckets):
            buckets[-1] += 1
            return hook(state, bucket)

        ddp.register_comm_hook(group, counting_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses, data = [], torch.Generator().manual_seed(100 + rank)
        for _ in range(DDP_STEPS):
            x = torch.randn(16, 32, generator=data)
            buckets.append(0)
            loss = (ddp(x) - torch.tanh(x @ w_true)).pow(2).sum() / (16 * WORLD)  # global mean
            loss.backward()
            opt.step()
            opt.zero_grad()
            comp.step()
            losses.append(loss.detach().clone())
        out[kind] = {
            "losses": torch.stack(losses),
            "buckets": buckets,
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "residual_keys": sorted(comp.residuals),
        }
    return out


def moe_selective(group: dist.ProcessGroup) -> dict:
    """Experts 1 and 3 get no tokens anywhere, expert 2 only on rank 1."""
    rank = dist.get_rank()
    g_E = grad(0, rank, (4, 8, 6))
    g_E[1] = 0
    g_E[3] = 0
    if rank == 0:
        g_E[2] = 0
    comp = build_compressor("moe_selective", chunk_size=16)
    total = comp.all_reduce_sum_experts(g_E, group, "experts.w1")  # active from nonzero rows
    out = {"total": total, "synced": comp.last_synced_E, "residual": comp.residuals["experts.w1"]}
    out["bytes"] = comp.step()
    comp.residuals["experts.w1"].zero_()
    comp.all_reduce_sum_experts(grad(0, rank, (4, 8, 6)), group, "experts.w1")  # all active
    out["bytes_all_active"] = comp.step()
    return out


def bytes_on_1m(group: dist.ProcessGroup) -> dict:
    """Bytes per step for 1M fp32 values (a 1000 x 1000 matrix; moe_selective: 8 experts of
    125000 values, 2 of them active)."""
    g = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in COMPRESSORS:
        comp = build_compressor(kind)
        if kind == "moe_selective":
            g_E = g.view(8, -1).clone()
            g_E[2:] = 0
            comp.all_reduce_sum_experts(g_E, group, "w")
        else:
            comp.all_reduce_sum(g, group, "w")
        out[kind] = comp.step()
    return out


def powersgd_int8_bytes_on_1m(group: dist.ProcessGroup) -> dict:
    comp = build_compressor("powersgd", factor_bits=8)
    comp.all_reduce_sum(torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0)), group, "w")
    return comp.step()


def run_all() -> dict:
    group = dist.group.WORLD
    return {
        "aggregates": aggregates(group),
        "error_feedback": error_feedback(group),
        "ddp": ddp_training(group),
        "moe_selective": moe_selective(group),
        "bytes_1m": bytes_on_1m(group),
        "bytes_1m_powersgd_int8": powersgd_int8_bytes_on_1m(group),
    }


# ---- checks in the parent -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(WORLD, run_all)


def test_warmup_and_lossless_settings_equal_the_exact_all_reduce(results):
    exact0 = grad(0, 0) + grad(0, 1)
    for name in results[0]["aggregates"]:
        for res in results:
            assert torch.equal(res["aggregates"][name]["warmup"], exact0), name
    exact1 = grad(1, 0) + grad(1, 1)
    for name in ("none", "topk"):  # topk with k = all
        for res in results:
            assert torch.equal(res["aggregates"][name]["compressed"], exact1), name
    low_rank = low_rank_grad(0) + low_rank_grad(1)
    for res in results:
        torch.testing.assert_close(res["aggregates"]["powersgd"]["compressed"], low_rank, rtol=0, atol=1e-5)


def test_compressed_aggregates_within_stated_bounds(results):
    g0, g1 = grad(1, 0), grad(1, 1)
    exact = g0 + g1
    agg = {name: results[0]["aggregates"][name]["compressed"] for name in results[0]["aggregates"]}
    for name in agg:  # every rank holds the same aggregate, bit for bit
        assert torch.equal(results[1]["aggregates"][name]["compressed"], agg[name]), name
    # bf16: two roundings of the inputs and one of the sum, each <= 2^-8 relative.
    assert ((agg["bf16"] - exact).abs() <= 2**-7 * (g0.abs() + g1.abs()) + 2**-8 * exact.abs()).all()
    # int8 (chunk 1024 > 384 values: one scale per rank), two phases: each rank's rounding
    # (<= max |g| / 254), then the rounding of their sum (<= its max / 254).
    decoded_sum = sum(dequantize_int8(*quantize_int8(g.reshape(-1), 1024), 1024) for g in (g0, g1))
    expected_int8 = dequantize_int8(*quantize_int8(decoded_sum, 1024), 1024).view(24, 16)
    torch.testing.assert_close(agg["int8"], expected_int8, rtol=0, atol=1e-6)
    bound = (g0.abs().max() + g1.abs().max()) / 254 + decoded_sum.abs().max() / 254
    assert ((agg["int8"] - exact).abs() <= bound * 1.0001).all()
    # sign: exactly the sum of each rank's sign(g) * mean |g|.
    expected_sign = sum(torch.where(g >= 0, 1.0, -1.0) * g.abs().mean() for g in (g0, g1))
    torch.testing.assert_close(agg["sign"], expected_sign)
    # topk 10%: exactly the sum of each rank's 39 largest entries.
    expected_topk = torch.zeros(384)
    for g in (g0, g1):
        idx = g.reshape(-1).abs().topk(39).indices
        expected_topk[idx] += g.reshape(-1)[idx]
    torch.testing.assert_close(agg["topk10"].reshape(-1), expected_topk)


def test_error_feedback_carries_the_residual_across_steps(results):
    """sum over steps of the aggregates + every rank's residual == sum of all true gradients, up to
    the rounding of int8's phase-2 sums (not fed back, so that restarts stay exact: quantize.py)."""
    true_sum = sum(grad(step, rank) for step in range(4) for rank in range(WORLD))
    for kind in EF_CASES:
        totals = [res["error_feedback"][kind]["total"] for res in results]
        assert torch.equal(totals[0], totals[1]), kind
        residuals = [res["error_feedback"][kind]["residual"] for res in results]
        assert all(r.abs().max() > 1e-3 for r in residuals), kind  # each rank carries its own
        two_phase_int8 = kind in ("int8", "moe_selective", "powersgd_int8")
        atol = results[0]["error_feedback"][kind]["phase2_bound"] * 1.0001 if two_phase_int8 else 1e-4
        torch.testing.assert_close(totals[0] + sum(residuals), true_sum, rtol=0, atol=atol)


def test_ddp_trains_with_each_compressor_over_several_buckets(results):
    for kind in COMPRESSORS:
        runs = [res["ddp"][kind] for res in results]
        assert runs[0]["buckets"][0] == 1 and set(runs[0]["buckets"][1:]) == {2}, runs[0]["buckets"]
        assert torch.equal(runs[0]["params"], runs[1]["params"]), f"{kind}: replicas diverged"
        global_loss = runs[0]["losses"] + runs[1]["losses"]
        first, last = global_loss[:3].mean(), global_loss[-3:].mean()
        assert last < 0.6 * first, f"{kind}: loss {first:.4f} -> {last:.4f}"
        # Residuals are keyed by parameter name, which survives DDP's bucket rebuild.
        expected_keys = (
            []
            if kind in ("none", "bf16")
            else ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
        )
        assert runs[0]["residual_keys"] == expected_keys, kind
    # `none` through our hook is a plain all-reduce sum, bit for bit.
    for res in results:
        assert torch.equal(res["ddp"]["none"]["params"], res["ddp"]["plain_sum_hook"]["params"])


def test_moe_selective_skips_experts_without_tokens(results):
    g0, g1 = grad(0, 0, (4, 8, 6)), grad(0, 1, (4, 8, 6))
    g0[[1, 2, 3]] = 0
    g1[[1, 3]] = 0
    for res in results:
        r = res["moe_selective"]
        assert r["synced"].tolist() == [True, False, True, False]
        assert torch.equal(r["total"], results[0]["moe_selective"]["total"])
        assert torch.equal(r["total"][[1, 3]], torch.zeros(2, 8, 6))
        # Two int8 roundings: each rank's (<= its max / 254), then their sum's (<= the sum's max / 254).
        max_sum = g0[[0, 2]].abs().amax((1, 2)) + g1[[0, 2]].abs().amax((1, 2))
        bound = max_sum / 254 * (2 + 1 / 254) * 1.0001
        assert ((r["total"][[0, 2]] - (g0 + g1)[[0, 2]]).abs() <= bound[:, None, None]).all()
        # Skipped experts keep (gradient + residual) for later; synced ones keep the int8 error.
        assert torch.equal(r["residual"][[1, 3]], torch.zeros(2, 8, 6))
        # Bytes: the [2, E] agreement all-reduce + int8 payload and one scale per 16 values,
        # for 2 of the 4 experts, against all 4.
        assert r["bytes"] == {
            "comm_bytes": 2 * 4 * 4 + 2 * 48 * (1 + 4 / 16),
            "comm_bytes_uncompressed": 4 * 48 * 4,
        }
        assert r["bytes_all_active"]["comm_bytes"] == 2 * 4 * 4 + 4 * 48 * (1 + 4 / 16)


def test_bytes_per_step_relative_to_none(results):
    counted = results[0]["bytes_1m"]
    none = counted["none"]["comm_bytes"]
    assert none == 4 * 1_000_000  # ring all-reduce at 2 ranks: 2 (p-1)/p * 4n
    ratios = {kind: c["comm_bytes"] / none for kind, c in counted.items()}
    assert all(c["comm_bytes_uncompressed"] == none for c in counted.values())
    print("bytes per step relative to none:", {k: round(v, 5) for k, v in ratios.items()})
    assert ratios["bf16"] == 0.5
    assert ratios["int8"] < 0.26 and ratios["sign"] < 1 / 31 and ratios["topk"] <= 0.02
    assert ratios["powersgd"] < 0.01 and ratios["moe_selective"] < 0.07
    # PowerSGD's int8 factors: a quarter of its fp32 ones (plus a scale per 1024 entries).
    int8_factors = results[0]["bytes_1m_powersgd_int8"]["comm_bytes"] / counted["powersgd"]["comm_bytes"]
    assert 0.25 <= int8_factors < 0.26, int8_factors
