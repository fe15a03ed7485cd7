"""Dry run: print the plan of a job on a cluster, or refuse it with the reason; optionally suggest a
layout that fits.

    python -m launch.plan recipe=mixtral_8x7b cluster.nodes=4 cluster.gpus_per_node=8
    python -m launch.plan recipe=mixtral_8x7b cluster.nodes=4 cluster.gpus_per_node=8 --suggest
    python -m launch.plan recipe=deepseek_v3 cluster.nodes=64 cluster.gpus_per_node=8 cluster.gpu_memory_gb=141

The plan: the parallel layout (validated by trainer/layout.py exactly as the trainer will), the
parameters per rank (total/active of the model, compute and held per pipeline rank), a memory
estimate per GPU with its parts (formulas in launch/memory.py), and the exact launch commands (the
torchrun line of every node and the sbatch script). Exit 0 when it fits, 2 with one line
`moeforge: plan refused: ...` when it does not.

`--suggest` (or `cluster.suggest=true`) tries every (pp, dp, tp, ep) with pp * dp * tp = world size
that the validator accepts (tp within a node), each with every activation-checkpointing mode, and
picks, among those whose estimate fits, the one with the least pipeline and tensor parallelism
(they cost bubbles and per-layer collectives), then the least recompute (none, then selective, then
full: about 1/6 and 1/3 more compute, but no communication), then the least expert parallelism
(all-to-all volume), then the lowest peak memory.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from launch.commands import (
    sbatch_script,
    split_overrides,
    submitit_preview,
    torchrun_command,
    world_size,
)
from launch.memory import GIB, RankMemory, estimate, worst_rank
from model.params import count_params
from parallel.activation_checkpoint import AC_MODES
from parallel.dims import ParallelDims
from trainer.compose import compose_config, to_job_config
from trainer.config import JobConfig
from trainer.errors import ConfigError
from trainer.layout import num_microbatches, parallel_dims
from trainer.validate import check_cluster, validate
from trainer.validate_fields import check_fields

RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}  # cheapest first


@dataclasses.dataclass
class Candidate:
    dims: ParallelDims
    activation_checkpointing: str
    ranks: list[RankMemory]

    @property
    def peak(self) -> float:
        return worst_rank(self.ranks).peak

    def overrides(self) -> list[str]:
        d = self.dims
        return [
            f"parallel.pp={d.pp}",
            f"parallel.dp={d.dp}",
            f"parallel.tp={d.tp}",
            f"parallel.ep={d.ep}",
            f"parallel.activation_checkpointing={self.activation_checkpointing}",
        ]


def with_layout(job: JobConfig, dims: ParallelDims, activation_checkpointing: str) -> JobConfig:
    p = dataclasses.replace(
        job.parallel,
        pp=dims.pp,
        dp=dims.dp,
        tp=dims.tp,
        ep=dims.ep,
        activation_checkpointing=activation_checkpointing,
    )
    if dims.pp != job.parallel.pp:  # an explicit split belongs to the recipe's own pp
        p = dataclasses.replace(p, pp_layers_per_stage=[])
    return dataclasses.replace(job, parallel=p)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(job: JobConfig) -> list[Candidate]:
    """Every valid layout of the cluster's world size and checkpointing mode, with its estimate."""
    ws, out = world_size(job.cluster), []
    for tp in _divisors(min(ws, job.cluster.gpus_per_node)):
        for pp in _divisors(ws // tp):
            dp = ws // (tp * pp)
            for ep in _divisors(dp):
                dims = ParallelDims(dp=dp, tp=tp, pp=pp, ep=ep)
                for ac in AC_MODES:
                    trial = with_layout(job, dims, ac)
                    try:
                        validate(trial, ws)
                    except ConfigError:
                        break  # the mode is not what makes a layout invalid
                    out.append(Candidate(dims, ac, estimate(trial, dims)))
    return out


def suggest(job: JobConfig) -> tuple[Candidate | None, Candidate | None]:
    """(best fitting layout by the module docstring's criterion, the lowest-memory layout)."""
    limit = job.cluster.gpu_memory_gb * GIB
    found = candidates(job)
    fitting = [c for c in found if c.peak <= limit]
    best = min(
        fitting,
        key=lambda c: (
            c.dims.pp * c.dims.tp,
            c.dims.tp,
            RECOMPUTE_ORDER[c.activation_checkpointing],
            c.dims.ep,
            c.peak,
        ),
        default=None,
    )
    return best, min(found, key=lambda c: c.peak, default=None)


def _gib(x: float) -> str:
    return f"{x / GIB:6.1f} GiB"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def describe(job: JobConfig, dims: ParallelDims) -> list[str]:
    m, c = job.model, job.cluster
    total, active = count_params(m)
    k = num_microbatches(job, dims.dp)
    lines = [
        f"job       {job.run.name}: model {m.name}, {_b(total)} total / {_b(active)} active parameters",
        f"cluster   {c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {world_size(c)} ranks, "
        f"{c.gpu_memory_gb:g} GB per GPU",
        f"layout    pp={dims.pp} dp={dims.dp} tp={dims.tp} ep={dims.ep} (expert-data-parallel "
        f"{dims.edp}), dp engine {job.parallel.dp_engine}, pp schedule {job.parallel.pp_schedule}, "
        f"sequence parallel {job.parallel.sequence_parallel and dims.tp > 1}, "
        f"activation checkpointing {job.parallel.activation_checkpointing}",
        f"batch     {job.train.global_batch_size} sequences of {job.data.seq_len} tokens per step = "
        f"{k} micro-batch(es) of {job.data.micro_batch_size} per data-parallel rank",
        "precision fp32 master weights + grads + AdamW m, v (16 B per held parameter); activations "
        + ("bf16 (autocast)" if dims.pp == 1 else "fp32 (pipeline schedules run without autocast)"),
        "",
        "per GPU, by pipeline rank (params: compute = this rank's tp/ep/pp slice, held = after FSDP)",
        "  pp  layers   params compute / active / held   weights    grads  optimizer  fsdp-buf"
        "  bf16-copies  activations (mb in flight)     peak",
    ]
    for r in estimate(job, dims):
        span = f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-"
        lines.append(
            f"  {r.pp_rank:>2}  {span:>6}   {_b(r.compute_params):>8} / {_b(r.active_params):>8} / "
            f"{_b(r.held_params):>8}  {_gib(r.weights)} {_gib(r.grads)} {_gib(r.optimizer)} "
            f"{_gib(r.fsdp_buffers)}   {_gib(r.weight_copies)}   {_gib(r.activations)} "
            f"({r.micro_batches_in_flight:g})   {_gib(r.peak)}"
        )
    return lines


def commands(job: JobConfig, overrides: Sequence[str]) -> list[str]:
    c = job.cluster
    lines = ["", "launch (on every node; MASTER_ADDR = the first node's address):"]
    lines.append("  " + torchrun_command(c, overrides))
    lines += ["", "sbatch script (python -m launch.sbatch ... > job.sbatch; sbatch job.sbatch):", ""]
    lines += ["  " + ln if ln else "" for ln in sbatch_script(job, overrides).splitlines()]
    hydra = ["python -m trainer -m hydra/launcher=submitit_slurm", *overrides, *_cluster_overrides(c)]
    lines += [
        "",
        "or through Hydra's submitit launcher (pip install 'moeforge[slurm]'):",
        "  " + " ".join(hydra),
    ]
    try:
        preview = submitit_preview([*overrides, *_cluster_overrides(c)])
    except ImportError:
        preview = "  (hydra-submitit-launcher not installed: no preview)"
    else:
        preview = "\n".join("  " + ln if ln else "" for ln in preview.splitlines())
    lines += ["", "which submits (rendered by submitit):", "", preview]
    return lines


def _cluster_overrides(c) -> list[str]:
    out = [f"cluster.nodes={c.nodes}", f"cluster.gpus_per_node={c.gpus_per_node}", f"cluster.time={c.time}"]
    if c.partition:
        out.append(f"cluster.partition={c.partition}")
    if c.account:
        out.append(f"cluster.account={c.account}")
    return out


def plan(argv: Sequence[str]) -> int:
    want_suggest = "--suggest" in argv
    argv = [a for a in argv if a != "--suggest"]
    overrides, _ = split_overrides(argv)
    try:
        job = to_job_config(compose_config(argv))
        check_fields(job)  # the full validation needs the layout, which --suggest may choose
        check_cluster(job)
    except ConfigError as e:
        return _refuse(f"config error: {e}")
    ws = world_size(job.cluster)
    limit = job.cluster.gpu_memory_gb * GIB
    if want_suggest or job.cluster.suggest:
        best, lowest = suggest(job)
        if best is None:
            why = "no valid (pp, dp, tp, ep) layout"
            if lowest is not None:
                top = worst_rank(lowest.ranks)
                why = (
                    f"no layout fits {job.cluster.gpu_memory_gb:g} GB: the lowest estimate is "
                    f"{top.peak / GIB:.1f} GiB at pp={lowest.dims.pp} dp={lowest.dims.dp} "
                    f"tp={lowest.dims.tp} ep={lowest.dims.ep} activation checkpointing "
                    f"{lowest.activation_checkpointing} ({top.activations / GIB:.1f} GiB of it activations, "
                    f"{top.static / GIB:.1f} GiB weights+grads+optimizer+FSDP buffers): use more nodes "
                    "or a shorter data.seq_len"
                )
            return _refuse(why)
        print(
            "suggested layout (fits; least pp*tp, then least tp, then least recompute, then least ep, "
            "then lowest memory): " + " ".join(best.overrides())
        )
        overrides = [o for o in overrides if not o.startswith("parallel.") or "pp_" in o] + best.overrides()
        job = with_layout(job, best.dims, best.activation_checkpointing)
    try:
        validate(job, ws)
    except ConfigError as e:
        return _refuse(f"invalid layout for {ws} ranks: {e}")
    dims = parallel_dims(job, ws)
    print("\n".join(describe(job, dims)))
    top = worst_rank(estimate(job, dims))
    print("\n".join(commands(job, overrides)))
    if top.peak > limit:
        return _refuse(
            f"pipeline rank {top.pp_rank} needs an estimated {top.peak / GIB:.1f} GiB > "
            f"cluster.gpu_memory_gb={job.cluster.gpu_memory_gb:g} (activations {top.activations / GIB:.1f} "
            f"GiB, weights+grads+optimizer {top.static / GIB:.1f} GiB); try --suggest"
        )
    print(f"\nfits: peak {top.peak / GIB:.1f} GiB of {job.cluster.gpu_memory_gb:g} GB per GPU")
    return 0


def _refuse(reason: str) -> int:
    print(f"moeforge: plan refused: {reason}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(plan(sys.argv[1:]))
