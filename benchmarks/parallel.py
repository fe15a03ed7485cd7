"""Parallel layouts on gloo ranks: step time, tokens/s, bytes per collective kind, communication share.

Run from the repository root (about 2-3 minutes on 2 CPU cores):

    python -m benchmarks.parallel [--json PATH] [--layouts "1 rank,dp2,ep2"] [--warmup 2 --steps 5]

The table goes to stdout; the profiler's "USDT: profiler_start/stop" lines go to stderr.

Every layout trains the same thing: the quickstart's tiny MoE (`recipes/model/tiny_moe.yaml`: dim
128, 4 layers, 8 experts top-2 + 1 shared, vocab 4096), fp32, seq_len 256, a global batch of 16
random (seeded) sequences as 4 micro-batches of 4; data-parallel rank r gets global micro-batches
r, r + dp, ... One step is the production path: `forward_backward` -> `clip_grads_` -> AdamW ->
`end_of_step`. "1 rank" is one process without a process group using `--threads` intra-op threads
(default 2: the whole machine); every rank of a multi-rank layout runs one thread
(`torch.set_num_threads(1)`, set by `tests.distributed.harness.run_ranks`), so all layouts share
the same 2 cores. With 4 ranks on 2 cores the machine is oversubscribed: read the 4-rank rows as
"what the communication costs", not as scaling.

Step time: each step starts after a barrier; its time is the slowest rank's; the median over the
timed steps after `--warmup` steps is reported. tokens/s = global tokens per step / step time.

Bytes: while the timed steps run, the collective entry points are wrapped and count the payload
this rank hands to them: all-reduce the tensor, all-gather and reduce-scatter their input,
all-to-all its input (the part a rank keeps for itself included), p2p the tensors of sends
(receives are the peers' sends), broadcast the tensor. Wrapped: in `torch.distributed` (and its
`distributed_c10d` module, where its own functions look each other up) `all_reduce`,
`all_gather_single` (FSDP2's all-gather), `all_gather_into_tensor`, `all_gather`,
`reduce_scatter_single` (FSDP2's reduce-scatter), `reduce_scatter_tensor`, `reduce_scatter`,
`all_to_all_single`, `all_to_all`, `broadcast`, `isend` (pipelining's `P2POp`s call it, also
from `batch_isend_irecv`) and `send`; in `torch.distributed._functional_collectives` (DTensor:
tensor parallel, expert-sharded weights, the grad-norm reduction) `all_reduce`,
`all_gather_single`, `all_gather_tensor`, `reduce_scatter_single`, `reduce_scatter_tensor`,
`all_to_all_single`, `broadcast` and the autograd variants, also where `parallel.expert` imported
`all_to_all_single_autograd` by name. Only the outermost wrapped call on a thread counts (one
entry point calling another is one collective). The backward of the autograd variants runs in
C++, out of reach of Python wrappers: a gradient hook on their output counts it (the backward of
an all-to-all is an all-to-all of the output's gradient). The table shows MB per step summed over
all ranks ("<0.01": the small host-side reductions, e.g. token and expert counts); the JSON also
has each rank's numbers and call counts. These are payloads, not wire bytes: a ring all-gather
moves (n - 1) / n of the gathered tensor per rank, and gloo runs a reduce-scatter as an
all-reduce of the whole input (its profiler events say `gloo:all_reduce`).

Communication share: `torch.profiler` records `--profile-steps` extra steps (after the timed ones,
so the profiler's overhead stays out of the step time). Gloo runs every collective on its own
worker threads and records a `gloo:<op>` event from the moment the op is issued until it
completes. The share is the length of the union of those intervals (barriers excluded) divided by
the profiled steps' wall time, on rank 0: the fraction of the step during which rank 0 had a
collective in flight. It is an upper bound on the time communication costs: overlapped
communication (FSDP prefetching, async p2p) counts although compute runs beside it, time queued
behind an earlier collective counts, and on an oversubscribed machine it includes waiting for
slower ranks to arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from omegaconf import OmegaConf

import parallel.expert
from benchmarks.common import format_table
from data import Batch
from model.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.data_parallel import clip_grads_
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import parallelize
from tests.distributed.harness import run_ranks
from trainer.config import OptimConfig
from trainer.optim import build_optimizer
from trainer.step import forward_backward

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "model" / "tiny_moe.yaml"
SEQ_LEN, MICRO_BATCH, NUM_MICRO_BATCHES, SEED = 256, 4, 4, 0
OPTIM = OptimConfig(lr=1e-3, grad_clip=1.0)
KINDS = ("all_to_all", "all_reduce", "reduce_scatter", "all_gather", "p2p", "broadcast")


LAYOUTS = {
    "1 rank": ParallelDims(),
    "dp2": ParallelDims(dp=2),
    "ep2": ParallelDims(dp=2, ep=2),
    "dp4 (ep4)": ParallelDims(dp=4, ep=4),
    "dp2 x ep2": ParallelDims(dp=4, ep=2),
    "tp2 x ep2": ParallelDims(tp=2, dp=2, ep=2),
    "pp2 x ep2": ParallelDims(pp=2, dp=2, ep=2),
}


# ---- counting bytes ---------------------------------------------------------------------------


def _nbytes(t: torch.Tensor | list[torch.Tensor]) -> int:
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size()


def _arg(pos: int, name: str) -> Callable[[tuple, dict], int]:
    """Payload = bytes of the argument at `pos` (or passed as keyword `name`)."""
    return lambda args, kwargs: _nbytes(kwargs[name] if name in kwargs else args[pos])


# (module, function name, kind, payload). Autograd variants are marked by name ("_autograd").
ENTRY_POINTS = [
    (c10d, "all_reduce", "all_reduce", _arg(0, "tensor")),
    (c10d, "all_gather_single", "all_gather", _arg(1, "input_tensor")),
    (c10d, "all_gather_into_tensor", "all_gather", _arg(1, "input_tensor")),
    (c10d, "all_gather", "all_gather", _arg(1, "tensor")),
    (c10d, "reduce_scatter_single", "reduce_scatter", _arg(1, "input")),
    (c10d, "reduce_scatter_tensor", "reduce_scatter", _arg(1, "input")),
    (c10d, "reduce_scatter", "reduce_scatter", _arg(1, "input_list")),
    (c10d, "all_to_all_single", "all_to_all", _arg(1, "input")),
    (c10d, "all_to_all", "all_to_all", _arg(1, "input_tensor_list")),
    (c10d, "broadcast", "broadcast", _arg(0, "tensor")),
    (c10d, "isend", "p2p", _arg(0, "tensor")),
    (c10d, "send", "p2p", _arg(0, "tensor")),
    (funcol, "all_reduce", "all_reduce", _arg(0, "self")),
    (funcol, "all_reduce_coalesced", "all_reduce", _arg(0, "self")),
    (funcol, "all_gather_single", "all_gather", _arg(0, "self")),
    (funcol, "all_gather_tensor", "all_gather", _arg(0, "self")),
    (funcol, "all_gather_single_autograd", "all_gather", _arg(0, "self")),
    (funcol, "all_gather_tensor_autograd", "all_gather", _arg(0, "self")),
    (funcol, "all_gather_into_tensor_coalesced", "all_gather", _arg(0, "self")),
    (funcol, "reduce_scatter_single", "reduce_scatter", _arg(0, "self")),
    (funcol, "reduce_scatter_tensor", "reduce_scatter", _arg(0, "self")),
    (funcol, "reduce_scatter_single_autograd", "reduce_scatter", _arg(0, "self")),
    (funcol, "reduce_scatter_tensor_autograd", "reduce_scatter", _arg(0, "self")),
    (funcol, "reduce_scatter_tensor_coalesced", "reduce_scatter", _arg(0, "inputs")),
    (funcol, "all_to_all_single", "all_to_all", _arg(0, "self")),
    (funcol, "all_to_all_single_autograd", "all_to_all", _arg(0, "self")),
    (funcol, "broadcast", "broadcast", _arg(0, "self")),
]
# The backward of an autograd collective: all-gather <-> reduce-scatter, all-to-all <-> itself.
BACKWARD_KIND = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_to_all": "all_to_all"}
# Modules that hold their own reference to an entry point (`from ... import name`).
ALIASES = [dist, parallel.expert]


class CommCounter:
    """While entered, counts the payload bytes (and calls) handed to each collective kind."""

    def __init__(self) -> None:
        self.bytes = dict.fromkeys(KINDS, 0)
        self.calls = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()  # gradient hooks may run on autograd threads
        self._depth = threading.local()
        self._undo: list[tuple[object, str, object]] = []

    def add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.bytes[kind] += nbytes
            self.calls[kind] += 1

    def _wrap(
        self, fn: Callable, kind: str, payload: Callable[[tuple, dict], int], autograd: bool
    ) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "n", 0)
            if depth == 0:  # the outermost entry point is the collective; inner calls are its parts
                self.add(kind, payload(args, kwargs))
            self._depth.n = depth + 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth.n = depth
            if autograd and depth == 0 and isinstance(out, torch.Tensor) and out.requires_grad:
                back = BACKWARD_KIND[kind]
                out.register_hook(lambda grad: self.add(back, _nbytes(grad)))
            return out

        return wrapper

    def __enter__(self) -> CommCounter:
        for module, name, kind, payload in ENTRY_POINTS:
            original = getattr(module, name, None)
            if original is None:  # not in this torch version
                continue
            wrapper = self._wrap(original, kind, payload, name.endswith("_autograd"))
            # Same wrapper everywhere the function is reachable: `batch_isend_irecv` tells sends
            # from receives by `op.op is isend`, and P2POps are built with `dist.isend`.
            for holder in [module, *ALIASES]:
                if getattr(holder, name, None) is original:
                    setattr(holder, name, wrapper)
                    self._undo.append((holder, name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for holder, name, original in reversed(self._undo):
            setattr(holder, name, original)
        self._undo.clear()


def comm_seconds(prof: torch.profiler.profile) -> float:
    """Length of the union of the profiled `gloo:*` intervals (barriers excluded)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.name.startswith("gloo:") and "barrier" not in e.name
    )
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


# ---- one layout on this rank --------------------------------------------------------------------


def model_config() -> ModelConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(RECIPE))
    return OmegaConf.to_object(cfg)


def global_batches(steps: int, vocab_size: int) -> list[list[Batch]]:
    """Per step, the global batch as NUM_MICRO_BATCHES micro-batches (the same on every rank)."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (NUM_MICRO_BATCHES, MICRO_BATCH, SEQ_LEN + 1), generator=g)
        out.append([Batch(t[:, :-1].clone(), t[:, 1:].clone()) for t in tokens])
    return out


def run_layout(layout: ParallelDims, warmup: int, steps: int, profile_steps: int) -> dict:
    """Train `warmup + steps + profile_steps` steps; this rank's step times, bytes, comm share."""
    dims = ParallelDims(dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep)
    distributed = dims.distributed
    meshes = build_meshes(dims, "cpu") if distributed else None
    pcfg = ParallelConfig(dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep)
    cpu = torch.device("cpu")
    k = NUM_MICRO_BATCHES // layout.dp
    cfg = model_config()
    pm = parallelize(cfg, pcfg, dims, meshes, cpu, SEED, k)
    optimizer = build_optimizer(torch.nn.ModuleList(pm.parts), OPTIM)
    dp_rank = meshes.dp_rank if distributed else 0

    def step(batches: list[Batch]) -> float:
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        mine = [batches[i * layout.dp + dp_rank] for i in range(k)]
        forward_backward(pm, mine, mtp_coef=0.0, device=cpu, autocast=nullcontext)
        clip_grads_(pm.parameters(), OPTIM.grad_clip, pm.group("pp"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pm.end_of_step()
        return time.perf_counter() - start

    data = global_batches(warmup + steps + profile_steps, cfg.vocab_size)
    for batches in data[:warmup]:
        step(batches)
    with CommCounter() as counter:
        times = [step(batches) for batches in data[warmup : warmup + steps]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = sum(step(batches) for batches in data[warmup + steps :])
    if distributed:
        dist.barrier()
    return {
        "step_s": times,
        "bytes_per_step": {kind: b / steps for kind, b in counter.bytes.items()},
        "calls_per_step": {kind: c / steps for kind, c in counter.calls.items()},
        "comm_share": comm_seconds(prof) / profiled,
        "num_params": sum(p.numel() for p in pm.parameters()),
    }


def run_layouts(names: list[str], warmup: int, steps: int, profile_steps: int) -> dict:
    """On each rank: every layout of one world size, in one spawned job."""
    return {name: run_layout(LAYOUTS[name], warmup, steps, profile_steps) for name in names}


# ---- the report --------------------------------------------------------------------------------


def summarise(name: str, per_rank: list[dict]) -> dict:
    step_s = statistics.median(max(ts) for ts in zip(*(r["step_s"] for r in per_rank)))
    tokens = NUM_MICRO_BATCHES * MICRO_BATCH * SEQ_LEN
    return {
        "layout": name,
        **asdict(LAYOUTS[name]),
        "ranks": LAYOUTS[name].world_size,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "bytes_per_step": {kind: sum(r["bytes_per_step"][kind] for r in per_rank) for kind in KINDS},
        "comm_share_rank0": per_rank[0]["comm_share"],
        "per_rank": per_rank,
    }


def _megabytes(nbytes: float) -> str:
    return "<0.01" if 0 < nbytes < 1e4 else f"{nbytes / 1e6:.2f}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names from LAYOUTS")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (bytes counted over these)")
    p.add_argument("--profile-steps", type=int, default=2, help="extra profiled steps (comm share)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the 1-rank baseline")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    names = [n.strip() for n in args.layouts.split(",")]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    by_world: dict[int, list[str]] = {}
    for name in names:
        by_world.setdefault(LAYOUTS[name].world_size, []).append(name)
    sched = (args.warmup, args.steps, args.profile_steps)
    load_before = os.getloadavg()[0]
    results: dict[str, dict] = {}
    for world_size, group in sorted(by_world.items()):
        if world_size == 1:
            torch.set_num_threads(args.threads)
            per_rank = [run_layouts(group, *sched)]
        else:  # layouts of one world size share one spawned job: process start-up is slow
            per_rank = run_ranks(world_size, run_layouts, group, *sched)
        for name in group:
            results[name] = summarise(name, [r[name] for r in per_rank])
    rows_out = [results[n] for n in names]
    load_after = os.getloadavg()[0]

    base = results.get("1 rank")
    shown = [k for k in KINDS if k != "broadcast" or any(r["bytes_per_step"][k] for r in rows_out)]
    header = [
        "layout",
        "ranks",
        "ms/step",
        "tokens/s",
        "vs 1 rank",
        *[f"{k} MB" for k in shown],
        "comm share",
    ]
    rows = []
    for r in rows_out:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mbs = [_megabytes(r["bytes_per_step"][k]) for k in shown]
        share = f"{r['comm_share_rank0']:.0%}" if r["ranks"] > 1 else "-"
        rows.append(
            [
                r["layout"],
                r["ranks"],
                f"{r['step_s'] * 1e3:.0f}",
                f"{r['tokens_per_s']:,.0f}",
                ratio,
                *mbs,
                share,
            ]
        )
    cfg = model_config()
    print(
        f"Parallel layouts, one training step of {cfg.name} (D={cfg.dim}, {cfg.num_layers} layers, "
        f"E={cfg.moe.num_experts} top-{cfg.moe.top_k}, V={cfg.vocab_size}), fp32, global batch "
        f"{NUM_MICRO_BATCHES}x{MICRO_BATCH} seqs x {SEQ_LEN} tokens, gloo on CPU; 1 rank: "
        f"{args.threads} threads, multi-rank: 1 thread per rank; median of {args.steps} steps after "
        f"{args.warmup} warm-up (slowest rank per step); MB/step summed over ranks; comm share on "
        f"rank 0 over {args.profile_steps} profiled steps; torch {torch.__version__}"
    )
    print(format_table(header, rows))
    # Other processes on the machine skew the comparison: the world sizes run one after another.
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} cores")
    if args.json:
        meta = {
            "threads_1rank": args.threads,
            "load_before_after": [load_before, load_after],
            "seq_len": SEQ_LEN,
            "micro_batch": MICRO_BATCH,
        }
        meta |= {"micro_batches": NUM_MICRO_BATCHES, "warmup": args.warmup, "steps": args.steps}
        args.json.write_text(json.dumps({"config": meta, "layouts": rows_out}, indent=2))


if __name__ == "__main__":
    main()
