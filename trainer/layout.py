"""The parallel layout of a job: data-parallel size, micro-batches per step, and the divisibility
checks that must hold before any process group exists (world size = dp * tp * pp, experts by ep,
heads by tp, layers by pp). Extended by the distributed issue; single process today.
"""

from __future__ import annotations

from parallel.dims import ParallelDims
from trainer.config import JobConfig
from trainer.errors import bad_value
from trainer.validate_helpers import divides, one_of, positive

BACKENDS = ("auto", "gloo", "nccl")


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    """`parallel.dp`, with -1 resolved to what the world size leaves after tp and pp."""
    p = cfg.parallel
    return p.dp if p.dp != -1 else world_size // max(1, p.tp * p.pp)


def parallel_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    """The validated layout as numbers (`check_layout` has run)."""
    p = cfg.parallel
    return ParallelDims(dp=data_parallel_size(cfg, world_size), tp=p.tp, pp=p.pp, ep=p.ep)


def num_microbatches(cfg: JobConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""
    return cfg.train.global_batch_size // (cfg.data.micro_batch_size * dp_size)


def check_layout(cfg: JobConfig, world_size: int) -> None:
    """Raise `ConfigError` if the layout cannot be built from `world_size` ranks."""
    p, m = cfg.parallel, cfg.model
    positive(p, "parallel", ("tp", "pp", "ep"))
    one_of("parallel.backend", p.backend, BACKENDS)
    if p.dp == 0 or p.dp < -1:
        raise bad_value("parallel.dp", p.dp, "must be >= 1 or -1 (the rest of the world size)", "set dp=-1")
    if world_size % (p.tp * p.pp):
        raise bad_value(
            "parallel.tp",
            p.tp,
            f"* parallel.pp={p.pp} must divide the world size {world_size}",
            "change tp/pp or the rank count",
        )
    dp = data_parallel_size(cfg, world_size)
    if dp * p.tp * p.pp != world_size:
        raise bad_value(
            "parallel.dp",
            p.dp,
            f"* tp={p.tp} * pp={p.pp} must equal the world size {world_size}",
            "set parallel.dp=-1",
        )
    divides(
        "parallel.dp", dp, "parallel.ep", p.ep, "experts are sharded within dp: use an ep that divides dp"
    )
    divides(
        "model.moe.num_experts", m.moe.num_experts, "parallel.ep", p.ep, "use an ep that divides num_experts"
    )
    divides("model.num_heads", m.num_heads, "parallel.tp", p.tp, "use a tp that divides num_heads")
    if m.attention == "gqa":
        divides(
            "model.num_kv_heads", m.num_kv_heads, "parallel.tp", p.tp, "use a tp that divides num_kv_heads"
        )
    if m.num_layers < p.pp:
        raise bad_value(
            "parallel.pp", p.pp, f"must be <= model.num_layers={m.num_layers}", "use fewer pipeline stages"
        )
