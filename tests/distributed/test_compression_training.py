"""The tiny MoE trained on 4 gloo ranks (dp4 with experts over ep2, DDP engine) through the
production path with each gradient compressor: the dense DDP hook and the expert-data-parallel
expert sync both go through it.

Lossless settings (`none`, `topk` with k = all, and any compressor during its warm-up) must match
the single-process reference of `test_layouts.py` step for step on its random tokens; every lossy
one must learn a learnable sequence (counting modulo the vocabulary, from random starts) about as
well as `none`, while sending the fraction of bytes its algorithm promises. All cases
share one spawned job (process start-up dominates on 2 cores).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

from data import Batch
from parallel.compression import CompressionConfig
from parallel.config import ParallelConfig
from parallel.data_parallel import clip_grads_
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import parallelize
from tests.distributed.harness import run_ranks
from tests.distributed.test_layouts import (
    MICRO_BATCH,
    MICRO_BATCHES,
    OPTIM,
    SEED,
    SEQ,
    global_batches,
    model_config,
    reference,
)
from trainer.config import OptimConfig
from trainer.optim import build_optimizer
from trainer.step import forward_backward

pytestmark = pytest.mark.slow

DP, EP = 4, 2
CASES = {
    "none": CompressionConfig(kind="none"),
    "topk_all": CompressionConfig(kind="topk", topk_ratio=1.0),
    "int8_warmup": CompressionConfig(kind="int8", warmup_steps=100),
    "bf16": CompressionConfig(kind="bf16"),
    "powersgd": CompressionConfig(
        kind="powersgd", rank=4, warmup_steps=2
    ),  # top-k and PowerSGD: warm-up, as advised
    "powersgd_int8": CompressionConfig(kind="powersgd", rank=4, factor_bits=8, chunk_size=32, warmup_steps=2),
    "powersgd_int8_factored": CompressionConfig(
        kind="powersgd", rank=4, factor_bits=8, chunk_size=32, warmup_steps=2, second_moment="factored"
    ),
    "topk": CompressionConfig(kind="topk", topk_ratio=0.05, warmup_steps=2),
    "sign": CompressionConfig(kind="sign"),
    "int8": CompressionConfig(kind="int8", chunk_size=256),
    "moe_selective": CompressionConfig(kind="moe_selective", chunk_size=256),
}
LOSSLESS = ("none", "topk_all", "int8_warmup")
# Bytes on the wire per step relative to `none` (an fp32 all-reduce: 2(p-1)/p * 4n bytes per rank).
# bf16 and PowerSGD all-reduce their payloads. int8 (and PowerSGD's int8 factors) take two phases of
# 1 byte per entry: 1/4, plus a scale per chunk and the zeros padding each parameter to whole chunks
# (this model's norm weights are 64 entries; PowerSGD's factors, a few hundred, get chunks of 32).
# sign and topk all-gather theirs ((p-1) * b bytes), so their ratio is p * b / 8n: 1/16 for sign,
# p * ratio for topk at p = 4.
MAX_BYTES_RATIO = {
    "bf16": 0.5,
    "powersgd": 0.5,
    "powersgd_int8": 0.25,
    "powersgd_int8_factored": 0.3,  # + the bf16 row and column sums of the squared gradients
    "topk": 0.2,
    "sign": 0.0625,
    "int8": 0.3,
    "moe_selective": 0.3,
}


LEARN_STEPS, LEARN_OPTIM = 20, OptimConfig(lr=1e-2, weight_decay=0.0, grad_clip=1.0)


def counting_batches() -> list[list[Batch]]:
    """Per step, MICRO_BATCHES micro-batches of sequences start, start+1, ... (mod the vocab)."""
    g = torch.Generator().manual_seed(SEED)
    vocab = model_config(0.0).vocab_size
    steps = []
    for _ in range(LEARN_STEPS):
        start = torch.randint(0, vocab, (MICRO_BATCHES, MICRO_BATCH, 1), generator=g)
        tokens = (start + torch.arange(SEQ + 1)) % vocab
        steps.append([Batch(t[:, :-1].clone(), t[:, 1:].clone()) for t in tokens])
    return steps


def train_all() -> dict:
    results = {}
    for name, cfg in CASES.items():
        if name in LOSSLESS:
            results[name] = train(cfg, global_batches(), OPTIM)
        else:
            results[name] = train(cfg, counting_batches(), LEARN_OPTIM)
    results["none_learn"] = train(CASES["none"], counting_batches(), LEARN_OPTIM)
    return results


def train(compression: CompressionConfig, steps: list[list[Batch]], optim: OptimConfig) -> dict:
    dims = ParallelDims(dp=DP, ep=EP)
    meshes = build_meshes(dims, "cpu")
    pcfg = ParallelConfig(dp=DP, ep=EP, dp_engine="ddp", compression=compression)
    k = MICRO_BATCHES // DP
    pm = parallelize(model_config(0.0), pcfg, dims, meshes, torch.device("cpu"), SEED, k)
    optimizer = build_optimizer(
        torch.nn.ModuleList(pm.parts), optim, second_moments=pm.second_moment_source()
    )
    losses, ratios = [], []
    for batches in steps:
        mine = [batches[i * DP + meshes.dp_rank] for i in range(k)]
        step = forward_backward(pm, mine, mtp_coef=0.0, device=torch.device("cpu"), autocast=nullcontext)
        clip_grads_(pm.parameters(), optim.grad_clip, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        comm = pm.compressor.step()
        pm.end_of_step()
        losses.append(float(step.total))
        ratios.append(comm["comm_bytes"] / comm["comm_bytes_uncompressed"])
    replicas = torch.cat([p.detach().reshape(-1) for p in pm.transformers[0].parameters() if p.dim() < 3])
    dist.barrier()
    return {"losses": losses, "bytes_ratio": ratios, "dense_params": replicas}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(DP, train_all)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_settings_match_the_single_process_reference(results, name):
    want = reference(DP, 0.0)["losses"]
    torch.testing.assert_close(
        torch.tensor(results[0][name]["losses"]), torch.tensor(want), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("name", sorted(MAX_BYTES_RATIO))
def test_each_compressor_trains_and_sends_fewer_bytes(results, name):
    got, none = results[0][name], results[0]["none_learn"]
    # Data-parallel replicas stay identical: every rank decodes the same sum.
    for other in results[1:]:
        assert torch.equal(other[name]["dense_params"], got["dense_params"]), f"{name}: replicas diverged"
    print(name, "bytes ratio after warm-up:", got["bytes_ratio"][-1])
    # At least 80% of the uncompressed run's loss reduction (mean of the last 3 steps vs the first).
    drop, none_drop = (r["losses"][0] - sum(r["losses"][-3:]) / 3 for r in (got, none))
    assert none_drop > 1.0, none["losses"]
    assert drop > 0.8 * none_drop, f"{name}: {got['losses']} vs none {none['losses']}"
    assert got["bytes_ratio"][-1] <= MAX_BYTES_RATIO[name], f"{name}: {got['bytes_ratio']}"  # after warm-up
    if name.startswith("powersgd_int8"):  # int8 factors: well under the fp32 ones' bytes
        assert got["bytes_ratio"][-1] < 0.5 * results[0]["powersgd"]["bytes_ratio"][-1]
