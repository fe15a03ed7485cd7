"""Tensor parallelism (Megatron-style) and sequence parallelism as DTensor plans over the "tp" mesh.

`apply_tensor_parallel(model, tp_mesh, sequence_parallel)` rewrites the parameters of a
meta-device `Transformer` (or one pipeline stage of it) into DTensors and installs the hooks that
redistribute activations; the model code itself stays single-device. `to_empty()` and
`init_weights(seed)` follow, giving every rank its slice of the single-process weights.

The plan, per module (SP = sequence parallel; "seq" below is Shard(1) with SP, else Replicate):
- `tok_embeddings`: vocab-sharded (RowwiseParallel); each rank looks up the ids in its vocab
  range and the partial sums are reduce-scattered over the sequence (SP) or all-reduced.
- attention: the input is all-gathered over the sequence (SP); heads are split over ranks
  (q/k/v or MLA's `wq`/`wq_b`/`wkv_b` column-parallel, `wo` row-parallel), so attention itself
  is local; `wo`'s partial sums are reduce-scattered (SP) or all-reduced. The attention code
  reads head counts from the tensors, so it runs on the local heads unchanged.
  GQA `q_norm`/`k_norm` (one weight over head_dim, shared by all heads) become Replicate
  DTensors treating the head dim as the sharded one: each rank sees only its heads, so their
  gradient is a partial sum that DTensor all-reduces. A norm over the whole projection
  (`qk_norm_scope=projection`) would need a reduction over ranks: tp > 1 rejects it. q/k/v
  biases (`qkv_bias`) are sharded with their columns. With `attention_output_gate`, `wq`'s
  output is laid out per head as [query_h, gate_h], so its column shards are still whole heads.
  MLA's low-rank `wq_a`/`q_norm`/`wkv_a`/`kv_norm` stay plain and run replicated on every rank.
  The rotary key slice of `wkv_a`'s output is shared by all heads and each rank back-propagates
  only through its own heads, so its gradient is all-reduced by a hook (Megatron's "copy to
  tensor-parallel region"); the latent slice's gradient is already complete (all-reduced where
  it enters column-parallel `wkv_b`).
- Gated DeltaNet (Qwen3-Next's linear attention): split by heads like GQA, see
  `_gated_deltanet_plan`; its recurrence runs per head, so no collective inside.
- dense FFN (SwiGLU): `w1`/`w3` column-parallel, `w2` row-parallel; same communication as
  attention (all-gather in, reduce-scatter out under SP; one all-reduce out without).
- MoE: the router and the routed experts stay replicated over tp: every tp rank routes and
  computes all tokens of its data-parallel shard. Experts are already sharded by expert
  parallelism (carved out of dp), routing is per token, and splitting each small fine-grained
  expert again by tp would add two collectives per expert GEMM for little memory. Under SP the
  MoE input is all-gathered over the sequence and its output cut back to this rank's chunk (no
  communication; the backward all-gathers the gradient). Because every tp rank computes the
  same routed output from the same tokens, router and expert gradients come out complete and
  identical on every tp rank, and so do the aux losses (no tp reduction needed). The cost is
  redundant routed compute on the tp ranks; the alternative (route only the local sequence
  chunk, then all-reduce router/expert gradients over tp) would also change the micro-batch
  balancing loss, which is computed from the tokens a layer sees. Shared experts are an
  ordinary SwiGLU: column/row-parallel with a replicated (all-reduced) output, added to the
  routed output. Their gate (`shared_expert_gate`, Linear(D, 1)) stays a plain replicated
  module like the router: it reads the same full-sequence plain input and scales the replicated
  shared output, so its gradient comes out complete and identical on every tp rank.
- norms (`attention_norm`, `ffn_norm`, final `norm`): SequenceParallel under SP (weights become
  Replicate DTensors, their gradients are all-reduced over tp); plain replicated otherwise.
- `output`: column-parallel over the vocab, input all-gathered over the sequence (SP), logits
  all-gathered over the vocab (Replicate) so the single-device cross-entropy runs unchanged.
  `loss_parallel()` over vocab-sharded logits would avoid that all-gather (the largest
  activation of the model); kept simple here.
- MTP modules: `block` gets the block plan above. Without SP `hnorm`/`enorm`/`proj`/`norm` are
  plain and run replicated (full sequence on every rank). With SP their inputs (the last
  block's output and the token embedding) are sequence chunks: the norms get SequenceParallel
  and `proj` is column-parallel from an all-gathered input back to a sequence chunk
  (Shard(-1) -> Shard(1) all-to-all), so the MTP block sees the same layout as a main block.

Under SP the residual stream between blocks (and what a pipeline stage sends to the next) is
this rank's sequence chunk [B, S/tp, D], a plain tensor; the sequence length must divide by tp.
Tied embeddings are not supported with tp > 1 (the config validator rejects them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from model.config import ModelConfig
from model.linear_attention import GatedDeltaNet
from model.transformer import MTPModule, Transformer, TransformerBlock


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (on the meta device, possibly a pipeline stage) over `tp_mesh` in place."""
    if tp_mesh.size() == 1:
        return
    cfg = model.cfg
    assert not cfg.tie_embeddings, "tied embeddings with tp > 1 are rejected by the config validator"
    seq = Shard(1) if sequence_parallel else Replicate()

    if model.tok_embeddings is not None:
        parallelize_module(
            model.tok_embeddings, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
        )
    for block in model.layers.values():
        _parallelize_block(block, tp_mesh, cfg, sequence_parallel)
    if model.norm is not None and sequence_parallel:
        # Local output: a pipeline's last stage returns a plain tensor; `output` re-annotates it.
        parallelize_module(model.norm, tp_mesh, SequenceParallel(use_local_output=True))
    if model.output is not None:
        parallelize_module(
            model.output,
            tp_mesh,
            # Full logits on every rank (an all-gather over the vocab): see the module docstring.
            ColwiseParallel(input_layouts=seq, output_layouts=Replicate()),
        )
    for mtp in model.mtp if model.mtp is not None else ():
        _parallelize_mtp(mtp, tp_mesh, cfg, sequence_parallel)


def _parallelize_block(
    block: TransformerBlock, tp_mesh: DeviceMesh, cfg: ModelConfig, sequence_parallel: bool
) -> None:
    seq = Shard(1) if sequence_parallel else Replicate()
    mla = cfg.attention == "mla"
    plan: dict[str, object] = {}
    if sequence_parallel:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    # Without SP this only wraps the input as a Replicate DTensor, so the q/k/v input gradients
    # are summed locally and all-reduced once. MLA's replicated low-rank projections are plain
    # modules and need a plain input.
    plan["attention"] = PrepareModuleInput(
        input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None), use_local_output=mla
    )  # Gated DeltaNet: like GQA (every projection column-parallel from this input)
    plan["attention.wo"] = RowwiseParallel(output_layouts=seq)
    attention = block.attention
    if isinstance(attention, GatedDeltaNet):
        plan.update(_gated_deltanet_plan(attention, tp_mesh))
    elif mla:
        plan["attention.wq" if attention.wq is not None else "attention.wq_b"] = ColwiseParallel()
        plan["attention.wkv_b"] = ColwiseParallel()
        attention.wkv_a.register_forward_hook(_RopeKeyGradAllReduce.hook(attention.kv_lora_rank, tp_mesh))
    else:
        plan["attention.wq"] = ColwiseParallel()
        plan["attention.wk"] = ColwiseParallel()
        plan["attention.wv"] = ColwiseParallel()
        if attention.q_norm is not None:
            # Applied to [B, S, heads, head_dim] with local heads: treat dim 2 as the sharded one.
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)

    if hasattr(block, "moe"):
        if sequence_parallel:
            # Routed part replicated over tp: gather the whole sequence in, keep our chunk out.
            plan["moe"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(Shard(1),),
                use_local_output=True,
            )
        if block.moe.shared_experts is not None:
            plan["moe.shared_experts"] = PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)
            )
            plan["moe.shared_experts.w1"] = ColwiseParallel()
            plan["moe.shared_experts.w3"] = ColwiseParallel()
            # Replicated output: it is added to the routed output, a plain full tensor.
            plan["moe.shared_experts.w2"] = RowwiseParallel(output_layouts=Replicate())
    else:
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        plan["feed_forward.w1"] = ColwiseParallel()
        plan["feed_forward.w3"] = ColwiseParallel()
        plan["feed_forward.w2"] = RowwiseParallel(output_layouts=seq)
    parallelize_module(block, tp_mesh, plan)


def _gated_deltanet_plan(attention: GatedDeltaNet, tp_mesh: DeviceMesh) -> dict[str, object]:
    """Heads split over ranks as in GQA: the q/k/v/z and beta/decay projections column-parallel
    (whole heads: each rank holds num_key_heads / tp key heads and their value-head groups, so the
    recurrence is local), `wo` row-parallel. The per-head parameters (the depthwise convs, A_log,
    dt_bias) become Shard(0) DTensors that the module reads locally; the gated output norm (one
    weight over a head's width, shared by all heads) is treated like the GQA q/k norms."""
    for name in ("conv_q", "conv_k", "conv_v", "A_log", "dt_bias"):
        param = getattr(attention, name)
        sharded = distribute_tensor(param.data, tp_mesh, [Shard(0)], src_data_rank=None)
        setattr(attention, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    plan: dict[str, object] = {
        f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv", "wz", "wb", "wa")
    }
    plan["attention.out_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def _parallelize_mtp(mtp: MTPModule, tp_mesh: DeviceMesh, cfg: ModelConfig, sequence_parallel: bool) -> None:
    _parallelize_block(mtp.block, tp_mesh, cfg, sequence_parallel)
    if not sequence_parallel:
        return  # hnorm/enorm/proj/norm see the full sequence on every rank: plain, replicated
    plan = {
        # Both inputs are sequence chunks; the norms' outputs stay Shard(1) DTensors through cat.
        "hnorm": SequenceParallel(),
        "enorm": SequenceParallel(),
        # All-gather the sequence, project with output columns sharded, then all-to-all back
        # to a sequence chunk (Shard(-1) -> Shard(1)): the layout the block's residual expects.
        "proj": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1)),
        "norm": SequenceParallel(use_local_output=True),
    }
    parallelize_module(mtp, tp_mesh, plan)


class _RopeKeyGradAllReduce(torch.autograd.Function):
    """Identity on MLA's `wkv_a` output [..., kv_lora_rank + rope_dim]; in backward, all-reduces
    the gradient of the rotary-key slice over tp (every head uses it, each rank holds some heads)."""

    @staticmethod
    def forward(ctx, kv_a: torch.Tensor, kv_lora_rank: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.kv_lora_rank, ctx.group = kv_lora_rank, group
        return kv_a.view_as(kv_a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        latent_grad, rope_grad = grad.split([ctx.kv_lora_rank, grad.shape[-1] - ctx.kv_lora_rank], dim=-1)
        rope_grad = rope_grad.contiguous()
        dist.all_reduce(rope_grad, group=ctx.group)
        return torch.cat([latent_grad, rope_grad], dim=-1), None, None

    @staticmethod
    def hook(kv_lora_rank: int, tp_mesh: DeviceMesh):
        group = tp_mesh.get_group()

        def forward_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            return _RopeKeyGradAllReduce.apply(output, kv_lora_rank, group)

        return forward_hook
