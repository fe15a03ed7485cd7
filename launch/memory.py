"""Per-rank parameter counts and a memory estimate for a parallel layout, without building anything.

Used by the dry-run planner (`python -m launch.plan`); `tests/launch/test_plan.py` checks the
estimate against torch's own allocation count for the tiny recipe on CPU.

What one rank holds (its pipeline stages, its tp slice, its ep experts), from `model/params.py`:
- tp splits attention heads (MLA: only the per-head projections `wq`/`wq_b`, `wkv_b`, `wo`; the
  low-rank `wq_a`/`wkv_a` and their norms are replicated), dense FFNs, shared experts, the
  embedding (by vocab) and the output head; norms, the router and the routed experts are
  replicated over tp (parallel/tensor.py);
- ep splits the routed experts: num_experts / ep per rank;
- FSDP (`parallel.dp_engine=fsdp`) shards the dense part over dp and the rank's experts over
  dp / ep (so each rank holds 1 / dp of all experts); DDP keeps a full replica.
"compute" params are the rank's slice before FSDP sharding (what its kernels see); "held" params
are what stays resident (after FSDP sharding).

Precision policy (trainer/setup.py): fp32 master weights, fp32 gradients, fp32 AdamW m and v:
16 bytes per held parameter. On CUDA without pipeline parallelism the forward runs under bf16
autocast, so activations are 2 bytes per element and the bf16 weight copies the matmuls save for
backward add 2 bytes per compute parameter; the pipeline schedules and the CPU run in fp32
(4 bytes per activation element, no copies).

Activations: the tensors autograd saves in the forward, per token of a micro-batch and per layer,
read off the model code (bytes; `a` = activation element size, tp_sp = tp with sequence
parallelism else 1, h = head_dim, R = routed experts per token (top_k)):
  each RMSNorm (2 per layer)     4D/tp_sp (fp32 input) + 4D/tp_sp (fp32 normalised) + a*D (output)
  GQA attention                  a*(3*H*h + 2*Kv*h)/tp (q, k, v, out, wo's input) + 4*H/tp (lse)
                                 (+ a*H*h/tp: the output gate's sigmoid)
  MLA attention                  a*(q_lora + kv_lora + rope) + 8*(q_lora + kv_lora) (low-rank and
                                 their norms) + a*H*(2*(nope+rope) + 3*v)/tp + 4*H/tp
  router                         8E (fp32 logits, probs) + 16R (ids, weights)
  routed experts, per copy       a*(D + 4F + D) + 12 (input, w1 out, silu, w3 out, product,
                                 output before weighting; gather index, weight)
  shared experts / dense FFN     4a*F/tp (+ a*(D + 1): the shared-expert gate's operands)
  output head (last stage)       final norm + 4V (fp32 log-softmax) + 8V transient at the start
                                 of backward (gradients of the log-softmax output and input)
MoE layers see the whole sequence on every tp rank (the routed part is replicated over tp), so
their terms are not divided by tp. A rank holds several micro-batches' activations at once under
pipeline parallelism: 1F1B stage r holds min(k, pp - r) (k = micro-batches per step), GPipe and
looped BFS all k, interleaved schedules about pp - r + (pp - 1 - r) / v.

Activation checkpointing (`parallel.activation_checkpointing`, parallel/activation_checkpoint.py:
full = every block, selective = blocks with an odd index) changes what a checkpointed block keeps
per micro-batch in flight: only its input, the fp32 residual stream (4D/tp_sp per token), not
the terms above, nor (under autocast) the bf16 weight copies. Its backward recomputes one block of
one micro-batch at a time, so on top come the largest checkpointed block's activations for one
micro-batch and its bf16 weight copies. The embedding and output head are never checkpointed.

Peak per rank = weights + grads + optimizer states + FSDP buffers + max(activations + bf16 weight
copies, the CPU foreach-AdamW temporary of 4 bytes per held parameter), where the FSDP buffers
are three unsharded fp32 copies of the largest block (the block being computed, the one
prefetched, and its unsharded gradient before the reduce-scatter). Gradients are counted whole:
with gradient accumulation they exist from the second micro-batch on, when activations peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from model.params import layer_params, mtp_params
from parallel.activation_checkpoint import is_checkpointed
from parallel.dims import ParallelDims
from parallel.pipeline import SCHEDULES, stage_ids_for_rank, stage_layers
from trainer.config import JobConfig
from trainer.layout import num_microbatches

GIB = 1024**3


@dataclass(frozen=True)
class LayerSplit:
    """One block's parameters on one rank, before FSDP: sharded over tp or ep, or replicated."""

    dense: int  # attention, norms, router, shared experts / dense FFN (tp-split or replicated)
    experts: int  # this rank's routed experts (ep-split, replicated over tp)
    active_experts: int  # the routed expert parameters one token uses, on this rank's share

    @property
    def total(self) -> int:
        return self.dense + self.experts


def _attention_split(cfg: ModelConfig, layer_idx: int, tp: int, attention: int) -> int:
    if cfg.is_linear_attention_layer(layer_idx):
        # Gated DeltaNet: everything is per head (split) except the gated norm over one head.
        norm = cfg.linear_attention.value_head_dim
        return (attention - norm) // tp + norm
    if cfg.attention != "mla":
        # Per-head q/k norms are replicated (projection-wide ones need tp=1: trainer/layout.py).
        head_norms = 2 * cfg.resolved_head_dim if cfg.qk_norm and cfg.qk_norm_scope == "head" else 0
        return attention // tp + head_norms * (tp - 1) // tp
    m, d = cfg.mla, cfg.dim
    replicated = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
    if m.q_lora_rank > 0:
        replicated += d * m.q_lora_rank + m.q_lora_rank
    return replicated + (attention - replicated) // tp


def layer_split(cfg: ModelConfig, layer_idx: int, tp: int, ep: int, mtp: bool = False) -> LayerSplit:
    p = mtp_params(cfg) if mtp else layer_params(cfg, layer_idx)
    kind_idx = cfg.num_layers - 1 if mtp else layer_idx  # an MTP block is built like the last layer
    moe = cfg.is_moe_layer(kind_idx)
    # The router and the shared-expert gate are replicated over tp; the shared experts are split.
    router = cfg.moe.num_experts * cfg.dim if moe else 0
    if moe and cfg.moe.num_shared_experts > 0 and cfg.moe.shared_expert_gate:
        router += cfg.dim
    dense = p.norms + _attention_split(cfg, kind_idx, tp, p.attention) + router + (p.mlp - router) // tp
    if mtp:  # enorm/hnorm/norm replicated, proj [D, 2D] split over tp
        dense -= 2 * cfg.dim * cfg.dim * (tp - 1) // tp
    experts = p.experts // ep
    return LayerSplit(dense, experts, p.active_experts // ep if ep > 1 else p.active_experts)


def _per_token_layer_bytes(cfg: ModelConfig, layer_idx: int, a: int, tp: int, tp_sp: int) -> float:
    d, r, moe = cfg.dim, cfg.moe.top_k, cfg.is_moe_layer(layer_idx)
    norm = 8 * d / tp_sp + a * d
    if cfg.is_linear_attention_layer(layer_idx):
        la = cfg.linear_attention
        key, value = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
        # Saved per token: projections before and after the conv (q, k, v), z, beta and decay,
        # the fp32 core output and the gated-norm input; the chunked form's per-chunk state is
        # [Hv, dk, dv] every chunk_size tokens.
        per_token = a * (2 * (2 * key + value) + 2 * value + 2 * la.num_value_heads) + 8 * value
        state = 4 * la.num_value_heads * la.key_head_dim * la.value_head_dim / la.chunk_size
        attention = (per_token + state) / tp
    elif cfg.attention == "mla":
        m = cfg.mla
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        low_rank = m.q_lora_rank + m.kv_lora_rank
        attention = a * (low_rank + m.qk_rope_head_dim) + 8 * low_rank
        attention += a * cfg.num_heads * (2 * qk + 3 * v) / tp + 4 * cfg.num_heads / tp
    else:
        h = cfg.resolved_head_dim
        attention = a * (3 * cfg.num_heads * h + 2 * cfg.num_kv_heads * h) / tp + 4 * cfg.num_heads / tp
        if cfg.attention_output_gate:
            attention += a * cfg.num_heads * h / tp  # sigmoid(gate), saved for the gated product
    if moe:
        mc = cfg.moe
        shared = (
            (mc.shared_ffn_hidden or mc.num_shared_experts * mc.moe_ffn_hidden)
            if mc.num_shared_experts
            else 0
        )
        gate = a * (d + 1) if mc.num_shared_experts and mc.shared_expert_gate else 0
        ffn = (
            8 * mc.num_experts
            + 16 * r
            + r * (a * (2 * d + 4 * mc.moe_ffn_hidden) + 12)
            + 4 * a * shared / tp
            + gate
        )
    else:
        ffn = 4 * a * cfg.ffn_hidden / tp
    return 2 * norm + attention + ffn


def _head_bytes_per_token(cfg: ModelConfig, a: int, tp_sp: int) -> float:
    return 8 * cfg.dim / tp_sp + a * cfg.dim + 12 * cfg.vocab_size


def in_flight(schedule: str, pp: int, pp_rank: int, stages_per_rank: int, k: int) -> float:
    """Micro-batches whose activations pipeline rank `pp_rank` holds at its peak (module docstring)."""
    if pp == 1:
        return 1
    if schedule in ("gpipe", "looped_bfs"):
        return k
    if stages_per_rank > 1:
        return min(k, pp - pp_rank + (pp - 1 - pp_rank) / stages_per_rank)
    return min(k, pp - pp_rank)


@dataclass
class RankMemory:
    """The estimate for one pipeline rank (every dp/tp/ep rank of it looks alike)."""

    pp_rank: int
    layers: list[int]
    compute_params: int  # this rank's slice before FSDP sharding
    held_params: int  # resident after FSDP sharding
    active_params: int  # of the compute params, those one token touches (top_k of the experts)
    weights: float  # bytes
    grads: float
    optimizer: float
    fsdp_buffers: float
    weight_copies: float  # bf16 copies saved for backward under autocast
    activations: float  # incl. the working set of recomputing one checkpointed block
    step_temp: float  # CPU foreach AdamW temporary during optimizer.step
    micro_batches_in_flight: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.fsdp_buffers

    @property
    def peak(self) -> float:
        return self.static + max(self.activations + self.weight_copies, self.step_temp)


def estimate(cfg: JobConfig, dims: ParallelDims, device: str = "cuda") -> list[RankMemory]:
    """One `RankMemory` per pipeline rank, for `cfg` laid out as `dims` on `device` (cuda | cpu)."""
    m, p = cfg.model, cfg.parallel
    tp, ep, dp, pp = dims.tp, dims.ep, dims.dp, dims.pp
    tp_sp = tp if (tp > 1 and p.sequence_parallel) else 1
    autocast = device == "cuda" and pp == 1
    a = 2 if autocast else 4
    fsdp = p.dp_engine == "fsdp" and dp > 1
    shard = dp if fsdp else 1
    # FSDP shards a rank's experts (already 1/ep of them) over the edp = dp / ep ranks that hold
    # the same ones; without ep they are ordinary block parameters, sharded over dp.
    expert_shard = dims.edp if fsdp else 1
    v = p.pp_stages_per_rank
    stages = stage_layers(m.num_layers, pp * v, list(p.pp_layers_per_stage) or None)
    k = num_microbatches(cfg, dp)
    tokens = cfg.data.micro_batch_size * cfg.data.seq_len
    embed = m.vocab_size * m.dim // tp
    ranks = []
    ac = p.activation_checkpointing
    kept_input = 4 * m.dim / tp_sp  # what a checkpointed block keeps: its fp32 input, per token
    for r in range(pp):
        ids = stage_ids_for_rank(r, pp, v, p.pp_schedule) if pp > 1 else [0]
        layers = [i for s in ids for i in stages[s]]
        splits = [layer_split(m, i, tp, ep) for i in layers]
        # (block index, bytes per token it saves without checkpointing, its parameters here)
        blocks = [(i, _per_token_layer_bytes(m, i, a, tp, tp_sp), s.total) for i, s in zip(layers, splits)]
        first, last = 0 in ids, pp * v - 1 in ids
        extra, act = 0, 0.0
        if first:
            extra += embed
            act += 8  # token ids kept by the embedding
        if last:
            extra += (0 if m.tie_embeddings else embed) + m.dim
            act += _head_bytes_per_token(m, a, tp_sp)
            if m.mtp_depth:
                mtp = layer_split(m, m.num_layers - 1, tp, ep, mtp=True)
                splits += [mtp] * m.mtp_depth
                mtp_block = _per_token_layer_bytes(m, m.num_layers - 1, a, tp, tp_sp)
                blocks += [(m.num_layers + d, mtp_block, mtp.total) for d in range(m.mtp_depth)]
                act += m.mtp_depth * (_head_bytes_per_token(m, a, tp_sp) + 2 * a * m.dim)
        checkpointed = [(b, n) for i, b, n in blocks if is_checkpointed(ac, i)]
        act += sum(kept_input if is_checkpointed(ac, i) else b for i, b, _ in blocks)
        recompute_act = max((b for b, _ in checkpointed), default=0.0)
        compute = sum(s.total for s in splits) + extra
        active = sum(s.dense + s.active_experts for s in splits) + extra
        # bf16 copies: of every block that keeps its activations, and of the one being recomputed
        copied = compute - sum(n for _, n in checkpointed) + max((n for _, n in checkpointed), default=0)
        experts = sum(s.experts for s in splits)
        held = (compute - experts) / shard + experts / expert_shard
        flight = in_flight(p.pp_schedule, pp, r, v, k)
        largest_block = max((s.total for s in splits), default=0)
        ranks.append(
            RankMemory(
                pp_rank=r,
                layers=layers,
                compute_params=compute,
                held_params=round(held),
                active_params=active,
                weights=4 * held,
                grads=4 * held,
                optimizer=8 * held,
                fsdp_buffers=3 * 4 * largest_block if fsdp else 0.0,
                weight_copies=2 * copied if autocast else 0.0,
                activations=(act * flight + recompute_act) * tokens,
                step_temp=4 * held if device == "cpu" else 0.0,
                micro_batches_in_flight=flight,
            )
        )
    return ranks


def worst_rank(ranks: list[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda r: r.peak)


__all__ = ["GIB", "RankMemory", "estimate", "in_flight", "layer_split", "worst_rank", "SCHEDULES"]
