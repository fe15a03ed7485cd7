"""Every parallel layout trains exactly like one process.

For each layout, 5 optimizer steps of a tiny MoE (fp32, global-batch aux loss, z-loss and expert
bias on; with and without capacity dropping) run on real gloo ranks through the production path
(`parallelize` -> `forward_backward` -> `clip_grads_` -> AdamW -> `end_of_step`). The reference is
written here independently: one plain `Transformer` doing gradient accumulation over the same
micro-batches (rank r's k-th micro-batch is global micro-batch k*dp + r). The global-batch aux loss
is defined over the micro-batches processed together by the dp ranks, so the reference gets those
counts from a forward-only pre-pass. Per-step losses must agree within 1e-5 relative and the
parameters after step 1 within 1e-5; a deliberately wrong reduction group must be caught.

A Qwen3-Next-shaped model (Gated DeltaNet and gated full-attention layers, zero-centred norms,
partial RoPE, a gated shared expert) runs the same comparison at dp2 x ep2, tp2 and pp2.

Layouts of one world size share one spawned job (process start-up dominates on 2 cores).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data import Batch
from model import Transformer
from model.config import LinearAttentionConfig, ModelConfig, MoEConfig
from model.moe import MoE
from parallel.config import ParallelConfig
from parallel.data_parallel import clip_grads_
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import parallelize
from tests.distributed.harness import run_ranks
from trainer.config import OptimConfig
from trainer.optim import build_optimizer
from trainer.step import forward_backward

pytestmark = pytest.mark.slow

STEPS, MICRO_BATCHES, MICRO_BATCH, SEQ, SEED = 5, 8, 2, 16, 7
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, eps=1e-6, grad_clip=1.0)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    schedule: str = "1f1b"
    stages_per_rank: int = 1
    dp_engine: str = "fsdp"
    ac: str = "none"  # activation checkpointing

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


LAYOUTS = {
    "dp2": Layout(dp=2),
    "ep2": Layout(dp=2, ep=2),
    "dp2_ddp": Layout(dp=2, dp_engine="ddp"),
    "tp2": Layout(tp=2),
    "pp2_1f1b": Layout(pp=2),
    "pp2_interleaved": Layout(pp=2, schedule="interleaved_1f1b", stages_per_rank=2),
    "pp2_ac_full": Layout(pp=2, ac="full"),
    "ep2_ac_selective": Layout(dp=2, ep=2, ac="selective"),  # recompute repeats the all-to-alls
    "ep4": Layout(dp=4, ep=4),
    "dp2_ep2": Layout(dp=4, ep=2),
    "dp2_ep2_ddp": Layout(dp=4, ep=2, dp_engine="ddp"),
    "tp2_ep2": Layout(dp=2, ep=2, tp=2),
    "pp2_ep2": Layout(dp=2, ep=2, pp=2),
    "pp2_tp2": Layout(pp=2, tp=2),
    "pp2_dp2_ep2": Layout(dp=4, ep=2, pp=2),
    "tp2_dp2_ep2": Layout(dp=4, ep=2, tp=2),
}
CAPACITY = {"dropless": 0.0, "capacity": 1.0}
QWEN3_NEXT_LAYOUTS = ("dp2_ep2", "tp2", "pp2_1f1b")  # dropless only


def model_config(
    capacity_factor: float, aux_loss_scope: str = "global_batch", arch: str = "moe"
) -> ModelConfig:
    if arch == "qwen3_next":
        return qwen3_next_config()
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        moe_ffn_hidden=16,
        num_shared_experts=1,
        capacity_factor=capacity_factor,
        aux_loss_coef=0.01,
        aux_loss_scope=aux_loss_scope,
        z_loss_coef=1e-3,
        expert_bias=True,
        bias_update_rate=1e-2,
    )
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=SEQ,
        first_k_dense=1,
        init_std=0.1,
        moe=moe,
    )


def qwen3_next_config() -> ModelConfig:
    """Layers 0 and 2 Gated DeltaNet (two chunks of 8 per sequence), 1 and 3 gated attention; each
    pipeline stage holds one of each; tp2 splits every kind of head in two."""
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        moe_ffn_hidden=16,
        num_shared_experts=1,
        shared_expert_gate=True,
        aux_loss_coef=0.01,
        aux_loss_scope="global_batch",
        z_loss_coef=1e-3,
    )
    linear = LinearAttentionConfig(
        full_attention_interval=2,
        num_key_heads=2,
        num_value_heads=4,
        key_head_dim=8,
        value_head_dim=8,
        chunk_size=8,
    )
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_hidden=48,
        max_seq_len=SEQ,
        qk_norm=True,
        attention_output_gate=True,
        partial_rotary_factor=0.5,
        norm_zero_centered=True,
        init_std=0.1,
        linear_attention=linear,
        moe=moe,
    )


def global_batches() -> list[list[Batch]]:
    """Per step, the global batch as MICRO_BATCHES micro-batches in global order."""
    g = torch.Generator().manual_seed(SEED)
    steps = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 64, (MICRO_BATCHES, MICRO_BATCH, SEQ + 1), generator=g)
        steps.append([Batch(t[:, :-1].clone(), t[:, 1:].clone()) for t in tokens])
    return steps


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


# ---- on the ranks ----------------------------------------------------------------------------


WRONG_GROUP_CASE = "dp2_ep2"  # also run with MoE counts reduced over "ep" instead of "dp"


def train_layouts(names: list[str]) -> dict:
    results = {}
    for name in names:
        for cap_name, capacity in CAPACITY.items():
            results[f"{name}-{cap_name}"] = train_layout(LAYOUTS[name], capacity)
        if name == WRONG_GROUP_CASE:
            results[f"{name}-wrong_group"] = train_layout(LAYOUTS[name], 0.0, counts_mesh="ep")
        if name in QWEN3_NEXT_LAYOUTS:
            results[f"{name}-qwen3_next"] = train_layout(LAYOUTS[name], 0.0, arch="qwen3_next")
    return results


def train_layout(layout: Layout, capacity_factor: float, counts_mesh: str = "dp", arch: str = "moe") -> dict:
    dims = ParallelDims(dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep)
    meshes = build_meshes(dims, "cpu")
    pcfg = ParallelConfig(
        dp=layout.dp,
        tp=layout.tp,
        pp=layout.pp,
        ep=layout.ep,
        pp_schedule=layout.schedule,
        pp_stages_per_rank=layout.stages_per_rank,
        dp_engine=layout.dp_engine,
        activation_checkpointing=layout.ac,
    )
    k = MICRO_BATCHES // layout.dp
    cfg = model_config(capacity_factor, arch=arch)
    pm = parallelize(cfg, pcfg, dims, meshes, torch.device("cpu"), SEED, k)
    if counts_mesh != "dp":  # a plausible-looking bug: counts summed over the wrong group
        group = getattr(meshes, counts_mesh).get_group()
        for moe in pm._moe:
            moe.reduce_counts = lambda c, group=group: _summed(c, group)
    optimizer = build_optimizer(torch.nn.ModuleList(pm.parts), OPTIM)
    dp_rank = meshes.dp_rank
    losses, params = [], {}
    for step, batches in enumerate(global_batches()):
        mine = [batches[i * layout.dp + dp_rank] for i in range(k)]
        step_losses = forward_backward(
            pm, mine, mtp_coef=0.0, device=torch.device("cpu"), autocast=nullcontext
        )
        clip_grads_(pm.parameters(), OPTIM.grad_clip, pm.group("pp"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pm.end_of_step()
        losses.append(float(step_losses.total))
        if step == 0:
            for part in pm.transformers:
                params.update({n: full(p.detach()).clone() for n, p in part.named_parameters()})
    dist.barrier()
    return {"losses": losses, "params": params}


def _summed(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


# ---- the single-process reference --------------------------------------------------------------


def reference(dp: int, capacity_factor: float, arch: str = "moe") -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config(capacity_factor, arch=arch))
    model.init_weights(SEED)
    optimizer = build_optimizer(model, OPTIM)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    losses, params = [], {}
    for step, batches in enumerate(global_batches()):
        group_counts = _counts_per_dp_group(model, moes, batches, dp)
        model.set_aux_loss_scale(1.0 / len(batches))
        num_tokens = sum(b.labels.numel() for b in batches)
        ce = 0.0
        for i, batch in enumerate(batches):
            for moe, counts in zip(moes, group_counts[i // dp]):
                moe.reduce_counts = lambda _local, counts=counts: counts.clone()
            out = model(batch.tokens, batch.labels)
            (out.ce_sum / num_tokens).backward()
            ce += float(out.ce_sum)
        aux = float(sum(m.step_aux_loss for m in moes)) / len(batches)
        for moe in moes:
            moe.reduce_counts = None  # the step's own accumulated counts already cover every rank
        clip_grads_(list(model.parameters()), OPTIM.grad_clip, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.end_of_step()
        losses.append(ce / num_tokens + aux)
        if step == 0:
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "params": params}


@torch.no_grad()
def _counts_per_dp_group(model: Transformer, moes: list[MoE], batches: list[Batch], dp: int) -> list:
    """Per group of dp micro-batches (processed together by the dp ranks), each MoE layer's routed
    token counts summed over the group: what the ranks' all-reduce produces."""
    captured: list[torch.Tensor] = []
    hooks = [
        m.router.register_forward_hook(
            lambda _m, _i, routing: captured.append(torch.bincount(routing.experts_TK.flatten(), minlength=4))
        )
        for m in moes
    ]
    model.eval()
    groups = []
    for start in range(0, len(batches), dp):
        total = None
        for batch in batches[start : start + dp]:
            captured.clear()
            model(batch.tokens, batch.labels)
            counts = [c.float() for c in captured]
            total = counts if total is None else [a + b for a, b in zip(total, counts)]
        groups.append(total)
    model.train()
    for h in hooks:
        h.remove()
    return groups


# ---- the comparison ---------------------------------------------------------------------------


def by_world_size() -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, layout in LAYOUTS.items():
        groups.setdefault(layout.world_size, []).append(name)
    return groups


@pytest.fixture(scope="module")
def layout_results() -> dict:
    results = {}
    for world_size, names in by_world_size().items():
        per_rank = run_ranks(world_size, train_layouts, names)
        for case in per_rank[0]:
            merged = {"losses": per_rank[0][case]["losses"], "params": {}}
            for rank_result in per_rank:  # pipeline stages hold different parameters
                merged["params"].update(rank_result[case]["params"])
            results[case] = merged
    return results


@pytest.mark.parametrize("capacity", sorted(CAPACITY))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(layout_results, name, capacity):
    got = layout_results[f"{name}-{capacity}"]
    want = reference(LAYOUTS[name].dp, CAPACITY[capacity])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    assert got["params"].keys() == want["params"].keys()
    for pname, value in want["params"].items():
        torch.testing.assert_close(got["params"][pname], value, rtol=0, atol=1e-5, msg=pname)


@pytest.mark.parametrize("name", QWEN3_NEXT_LAYOUTS)
def test_qwen3_next_layout_matches_single_process(layout_results, name):
    got = layout_results[f"{name}-qwen3_next"]
    want = reference(LAYOUTS[name].dp, 0.0, arch="qwen3_next")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=0)
    assert got["params"].keys() == want["params"].keys()
    assert any(".conv_q" in n for n in want["params"])  # the linear-attention layers are there
    for pname, value in want["params"].items():
        torch.testing.assert_close(got["params"][pname], value, rtol=0, atol=1e-5, msg=pname)


def test_counts_reduced_over_the_wrong_group_are_caught(layout_results):
    """Summing the balancing-loss counts over "ep" instead of "dp" still trains with a plausible
    loss, but the gradients (hence parameters) differ: the comparison above would catch it."""
    got = layout_results[f"{WRONG_GROUP_CASE}-wrong_group"]
    want = reference(LAYOUTS[WRONG_GROUP_CASE].dp, 0.0)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=0.05, atol=0)
    worst = max((got["params"][n] - v).abs().max().item() for n, v in want["params"].items())
    assert worst > 1e-4
