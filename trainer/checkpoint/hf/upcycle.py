"""Upcycling: a MoE model whose every expert starts as the dense model's MLP (Komatsuzaki et al.),
or as a slice of it for fine-grained experts (granular upcycling).

With granularity G (dense hidden = G * expert hidden), expert e holds hidden slice e % G of the
dense MLP, and copy e // G: the experts come in groups of G slices that together are one dense
MLP. The router rows are random per copy and equal within a group ("virtual group" routing),
so under softmax top-k with k a multiple of G every chosen group is chosen whole, with equal
weights that sum to 1 over the chosen groups; scaling each slice's down projection by G then
makes the layer output exactly the dense MLP's at step 0. Training breaks the ties: the slices
of a group receive different gradients.
"""

from __future__ import annotations

import dataclasses

import torch

from model.config import ModelConfig
from trainer.checkpoint.hf.mapping import Link
from trainer.checkpoint.hf.plan import ConversionPlan, architecture_differences
from trainer.checkpoint.hf.safetensors_io import conversion_error

ROUTER_SEED = 20_240_601


def check_upcycle(target: ModelConfig, dense: ModelConfig, source: str) -> int:
    """The granularity G, after checking `target` is `dense` with MoE layers; one line if not."""
    moe = target.moe
    as_dense = dataclasses.replace(target, first_k_dense=target.num_layers, ffn_hidden=dense.ffn_hidden)
    diffs = architecture_differences(dense, as_dense)
    if diffs:
        field = diffs[0]
        raise conversion_error(
            field, f"differs from the dense checkpoint {source} (upcycling keeps everything but the MLPs)"
        )
    if target.ffn_hidden != dense.ffn_hidden:
        raise conversion_error(
            "model.ffn_hidden",
            f"={target.ffn_hidden} must equal the dense intermediate_size {dense.ffn_hidden} (dense layers are copied)",
        )
    if dense.ffn_hidden % moe.moe_ffn_hidden:
        raise conversion_error(
            "model.moe.moe_ffn_hidden",
            f"={moe.moe_ffn_hidden} must divide the dense intermediate_size {dense.ffn_hidden} (granular upcycling)",
        )
    granularity = dense.ffn_hidden // moe.moe_ffn_hidden
    rules = (
        (
            moe.num_experts % granularity == 0,
            "model.moe.num_experts",
            f"a multiple of the granularity {granularity}",
        ),
        (moe.top_k % granularity == 0, "model.moe.top_k", f"a multiple of the granularity {granularity}"),
        (
            moe.score_func == "softmax" and moe.norm_topk_prob,
            "model.moe.score_func",
            "softmax with norm_topk_prob=true",
        ),
        (moe.num_shared_experts == 0, "model.moe.num_shared_experts", "0"),
        (
            moe.num_groups == 1 and not moe.expert_bias,
            "model.moe.num_groups",
            "1 (no group-limited routing, no expert bias)",
        ),
    )
    for ok, field, need in rules:
        if not ok:
            raise conversion_error(field, f"must be {need} to upcycle {source} exactly")
    return granularity


def upcycle_plan(dense_plan: ConversionPlan, target: ModelConfig, granularity: int) -> ConversionPlan:
    """The dense plan with each MoE layer's MLP links replaced by expert links to its slices."""
    G, E, d, f = granularity, target.moe.num_experts, target.dim, target.moe.moe_ffn_hidden
    F = dense_plan.cfg.ffn_hidden
    moe_layers = {i for i in range(target.num_layers) if target.is_moe_layer(i)}
    links = [
        ln
        for ln in dense_plan.links
        if not any(ln.ours.startswith(f"layers.{i}.feed_forward.") for i in moe_layers)
    ]
    synthetic: dict[str, torch.Tensor] = {}
    for i in sorted(moe_layers):
        hf, ours = f"model.layers.{i}.mlp", f"layers.{i}.moe"
        for e in range(E):
            rows = slice((e % G) * f, (e % G + 1) * f)
            links += [
                Link(f"{ours}.experts.w1", f"{hf}.gate_proj.weight", (F, d), (e,), (rows,), transpose=True),
                Link(f"{ours}.experts.w3", f"{hf}.up_proj.weight", (F, d), (e,), (rows,), transpose=True),
                Link(
                    f"{ours}.experts.w2",
                    f"{hf}.down_proj.weight",
                    (d, F),
                    (e,),
                    (slice(None), rows),
                    transpose=True,
                    scale=float(G),
                ),
            ]
        router = f"<upcycle>.layers.{i}.router"
        gen = torch.Generator().manual_seed(ROUTER_SEED + i)
        copies = torch.randn(E // G, d, generator=gen) * target.init_std
        synthetic[router] = copies.repeat_interleave(G, dim=0)
        links.append(Link(f"{ours}.router.gate.weight", router, (E, d)))
    notes = [
        *dense_plan.notes,
        f"upcycled: {len(moe_layers)} MoE layers x {E} experts from the dense MLPs (granularity {G})",
    ]
    return ConversionPlan(target, dense_plan.family, dense_plan.layout, links, notes, synthetic)
