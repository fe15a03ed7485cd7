"""Pipeline parallelism on 2 gloo ranks gives the single-process run's losses and gradients.

All cases run in one spawn (a `run_ranks` call costs seconds of process start-up): each rank
builds the model on meta, keeps its stages, initialises them with the layout-independent seed and
runs one step of 4 micro-batches, then one evaluation pass. The reference is one process with
gradient accumulation over the same micro-batches. The MoE aux loss is on, so router gradients
on stages that never see the loss are checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from model.config import ModelConfig, MoEConfig
from model.transformer import IGNORE_INDEX, Transformer
from parallel.config import ParallelConfig
from parallel.pipeline import (
    TokenNormalizedLoss,
    build_schedule,
    run_eval,
    run_step,
    split_model,
    stage_ids_for_rank,
    stage_layers,
)
from tests.distributed.harness import run_ranks

CFG = ModelConfig(
    vocab_size=64,
    dim=32,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden=64,
    max_seq_len=16,
    moe=MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=16, num_shared_experts=1, aux_loss_coef=0.1),
)
SEED, K, B, S = 3, 4, 2, 16  # micro-batches, micro-batch size, sequence length
PP = 2

# id -> (pp_schedule, pp_stages_per_rank, pp_layers_per_stage)
CASES = {
    "1f1b": ("1f1b", 1, []),
    "gpipe": ("gpipe", 1, []),
    "1f1b_uneven_1_3": ("1f1b", 1, [1, 3]),
    "interleaved_1f1b": ("interleaved_1f1b", 2, []),
    "looped_bfs": ("looped_bfs", 2, []),
    "interleaved_zero_bubble": ("interleaved_zero_bubble", 2, []),
    "zbv": ("zbv", 2, []),
    "dualpipev": ("dualpipev", 2, []),
}


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (K * B, S + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX  # uneven label counts per micro-batch
    labels[5, -3:] = IGNORE_INDEX
    return tokens[:, :-1].contiguous(), labels


def pipeline_case(schedule: str, stages_per_rank: int, layout: list[int]) -> dict:
    pcfg = ParallelConfig(
        pp=PP, pp_schedule=schedule, pp_stages_per_rank=stages_per_rank, pp_layers_per_stage=layout
    )
    rank, num_stages = dist.get_rank(), PP * stages_per_rank
    with torch.device("meta"):
        model = Transformer(CFG)
    stages = split_model(model, rank, PP, pcfg)
    for _, module in stages:
        module.to_empty(device="cpu")
        module.init_weights(SEED)
        module.set_aux_loss_scale(1 / K)
        module.train()
    ids = [sid for sid, _ in stages]
    is_first, is_last = 0 in ids, num_stages - 1 in ids
    loss_fn = TokenNormalizedLoss(dict(stages).get(num_stages - 1))
    tokens, labels = make_batch()
    loss_fn.denominator = int((labels != IGNORE_INDEX).sum())
    pp_mesh = init_device_mesh("cpu", (PP,), mesh_dim_names=("pp",))
    sched = build_schedule(stages, num_stages, pp_mesh, pcfg, K, loss_fn, "cpu")

    losses = run_step(sched, tokens, labels, is_first, is_last)
    grads = {name: p.grad for _, m in stages for name, p in m.named_parameters()}
    counts = {name: b.clone() for _, m in stages for name, b in m.named_buffers() if ".step_" in name}
    for _, module in stages:
        module.eval()
    eval_losses = run_eval(sched, tokens, labels, is_first, is_last)
    # Back to training (shape inference runs again): the same step gives the same gradients.
    for _, module in stages:
        module.train()
        module.zero_grad()
    again = run_step(sched, tokens, labels, is_first, is_last)
    return {
        "stages": ids,
        "losses": losses,
        "grads": grads,
        "counts": counts,
        "eval_losses": eval_losses,
        "losses_again": again,
        "grads_again": {name: p.grad for _, m in stages for name, p in m.named_parameters()},
        "counts_again": {name: b for _, m in stages for name, b in m.named_buffers() if ".step_" in name},
    }


def all_cases() -> dict:
    return {case_id: pipeline_case(*args) for case_id, args in CASES.items()}


def reference(aux_loss_scale: float = 1 / K) -> dict:
    model = Transformer(CFG)
    model.init_weights(SEED)
    model.set_aux_loss_scale(aux_loss_scale)
    tokens, labels = make_batch()
    total = int((labels != IGNORE_INDEX).sum())
    losses = []
    for mb in range(K):
        out = model(tokens[mb * B : (mb + 1) * B], labels[mb * B : (mb + 1) * B])
        loss = out.ce_sum / total
        loss.backward()
        losses.append(loss.detach())
    counts = {name: b.clone() for name, b in model.named_buffers() if ".step_" in name}
    model.eval()
    with torch.no_grad():
        eval_losses = [
            model(tokens[mb * B : (mb + 1) * B], labels[mb * B : (mb + 1) * B]).ce_sum / total
            for mb in range(K)
        ]
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "counts": counts, "eval_losses": eval_losses}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 sums in another order: 1e-5 relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def results() -> tuple[dict, dict]:
    return run_ranks(PP, all_cases), reference()


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(CASES))
def test_pipeline_matches_single_process(results, case_id):
    ranks, ref = results
    per_rank = [r[case_id] for r in ranks]
    last = next(r for r in per_rank if max(r["stages"]) == PP * CASES[case_id][1] - 1)
    assert len(last["losses"]) == K
    for actual, expected in zip(last["losses"], ref["losses"]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(sum(last["losses"]), sum(ref["losses"]), rtol=1e-5, atol=0)
    for actual, expected in zip(last["eval_losses"], ref["eval_losses"]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(last["losses_again"], last["losses"], rtol=0, atol=0)

    grads = {name: g for r in per_rank for name, g in r["grads"].items()}
    assert sorted(grads) == sorted(ref["grads"]), "every parameter lives on exactly one stage"
    grads_again = {name: g for r in per_rank for name, g in r["grads_again"].items()}
    for name, expected in ref["grads"].items():
        assert grads[name] is not None, name
        assert_close(grads[name], expected)
        torch.testing.assert_close(grads_again[name], grads[name], rtol=0, atol=0)
    # Shape inference (again after eval) must not add to the per-step MoE buffers (expert counts
    # behind the load metrics and the expert bias, aux loss); nothing resets them between steps here.
    counts = {name: c for r in per_rank for name, c in r["counts"].items()}
    counts_again = {name: c for r in per_rank for name, c in r["counts_again"].items()}
    assert sorted(counts) == sorted(ref["counts"])
    for name, expected in ref["counts"].items():
        torch.testing.assert_close(counts[name], expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(counts_again[name], 2 * expected, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_aux_loss_reaches_first_stage_router(results):
    """The comparison above covers aux gradients only if they change the router gradient of a
    layer on stage 0 (which never sees the loss): check they do."""
    _, ref = results
    without_aux = reference(aux_loss_scale=0.0)["grads"]["layers.0.moe.router.gate.weight"]
    with_aux = ref["grads"]["layers.0.moe.router.gate.weight"]
    assert (with_aux - without_aux).abs().max() > 1e-3 * with_aux.abs().max()


def test_stage_layers_split():
    assert stage_layers(4, 2, []) == [[0, 1], [2, 3]]
    assert stage_layers(5, 2, []) == [[0, 1], [2, 3, 4]]
    assert [len(s) for s in stage_layers(10, 4, [])] == [2, 3, 3, 2]
    assert [len(s) for s in stage_layers(7, 4, [])] == [1, 2, 2, 2]
    assert stage_layers(4, 2, [1, 3]) == [[0], [1, 2, 3]]


@pytest.mark.parametrize("layout", [[2, 3], [4, 0], [1, 1, 2], [-1, 5]])
def test_bad_explicit_layout_raises(layout):
    with pytest.raises(ValueError, match="pp_layers_per_stage"):
        stage_layers(4, 2, layout)


def test_stage_ids_for_rank():
    assert stage_ids_for_rank(1, 2, 1, "1f1b") == [1]
    assert stage_ids_for_rank(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert stage_ids_for_rank(1, 4, 2, "zbv") == [1, 6]
    with pytest.raises(ValueError, match="pp_stages_per_rank"):
        stage_ids_for_rank(0, 2, 1, "zbv")
    with pytest.raises(ValueError, match="pp_schedule"):
        stage_ids_for_rank(0, 2, 1, "pipedream")
