"""The parallel layout of a job: data-parallel size, micro-batches per step, and the divisibility
checks that must hold before any process group exists (world size = dp * tp * pp, experts by ep,
heads by tp, layers and micro-batches by pp, and features that do not combine with a dimension).
"""

from __future__ import annotations

from parallel.activation_checkpoint import AC_MODES
from parallel.dims import ParallelDims
from trainer.config import JobConfig
from trainer.errors import bad_value
from trainer.validate_helpers import divides, one_of

BACKENDS = ("auto", "gloo", "nccl")
DP_ENGINES = ("fsdp", "ddp")
ENGINES = ("native", "deepspeed")


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
    one_of("parallel.backend", p.backend, BACKENDS)
    one_of("parallel.activation_checkpointing", p.activation_checkpointing, AC_MODES)
    if p.dp == 0:  # < -1 is refused by the field table (trainer/validate_fields.py)
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
    _check_pipeline(cfg, world_size)
    _check_engine(cfg, dp)
    _check_combinations(cfg)


def _check_pipeline(cfg: JobConfig, world_size: int) -> None:
    """Schedule, stages per rank, layer split and micro-batch count of pipeline parallelism."""
    from parallel.pipeline import SCHEDULES, SINGLE_STAGE_SCHEDULES, stage_layers

    p, m = cfg.parallel, cfg.model
    one_of("parallel.pp_schedule", p.pp_schedule, tuple(SCHEDULES))
    if p.pp_schedule in SINGLE_STAGE_SCHEDULES and p.pp_stages_per_rank != 1:
        raise bad_value(
            "parallel.pp_stages_per_rank",
            p.pp_stages_per_rank,
            f"must be 1 for pp_schedule={p.pp_schedule}",
            "use an interleaved schedule (interleaved_1f1b) for several stages per rank",
        )
    if SCHEDULES[p.pp_schedule][1] == "v" and p.pp_stages_per_rank != 2:
        raise bad_value(
            "parallel.pp_stages_per_rank",
            p.pp_stages_per_rank,
            f"must be 2 for the V-shaped pp_schedule={p.pp_schedule}",
            "set parallel.pp_stages_per_rank=2",
        )
    num_stages = p.pp * p.pp_stages_per_rank
    if p.pp_layers_per_stage or num_stages > 1:
        try:
            stage_layers(m.num_layers, num_stages, list(p.pp_layers_per_stage) or None)
        except ValueError as e:
            raise bad_value(
                "parallel.pp_layers_per_stage",
                list(p.pp_layers_per_stage),
                f"does not split model.num_layers={m.num_layers} into pp * pp_stages_per_rank = "
                f"{num_stages} stages of >= 1 layer",
                "give one positive count per stage summing to num_layers, or [] for an even split",
            ) from e
    dp = data_parallel_size(cfg, world_size)
    per_step = cfg.data.micro_batch_size * dp
    if p.pp > 1 and cfg.train.global_batch_size % per_step == 0:
        k = cfg.train.global_batch_size // per_step
        if k < p.pp or (p.pp_schedule not in SINGLE_STAGE_SCHEDULES and k % p.pp):
            raise bad_value(
                "train.global_batch_size",
                cfg.train.global_batch_size,
                f"gives {k} micro-batches per rank; pipeline pp={p.pp} ({p.pp_schedule}) needs at least pp"
                + ("" if p.pp_schedule in SINGLE_STAGE_SCHEDULES else " and a multiple of pp"),
                f"use a global batch of a multiple of data.micro_batch_size * dp * pp = {per_step * p.pp}",
            )


def _check_combinations(cfg: JobConfig) -> None:
    """Features that do not (yet) combine with some parallel dimensions."""
    p, m = cfg.parallel, cfg.model
    one_of("parallel.dp_engine", p.dp_engine, DP_ENGINES)
    if p.pp > 1 and m.mtp_depth > 0:
        raise bad_value(
            "model.mtp_depth",
            m.mtp_depth,
            f"> 0 is not supported with parallel.pp={p.pp}",
            "set model.mtp_depth=0 or parallel.pp=1",
        )
    if m.tie_embeddings and (p.pp > 1 or p.tp > 1):
        raise bad_value(
            "model.tie_embeddings",
            True,
            f"is not supported with parallel.pp={p.pp} / tp={p.tp}",
            "set model.tie_embeddings=false",
        )
    if p.tp > 1 and m.linear_attention.full_attention_interval > 0:
        divides(
            "model.linear_attention.num_key_heads",
            m.linear_attention.num_key_heads,
            "parallel.tp",
            p.tp,
            "tensor parallelism splits the Gated DeltaNet heads: pick a tp that divides them",
        )
    if p.tp > 1 and m.attention == "gqa" and m.qk_norm and m.qk_norm_scope == "projection":
        raise bad_value(
            "model.qk_norm_scope",
            m.qk_norm_scope,
            f"normalises over all heads, which parallel.tp={p.tp} splits over ranks",
            "use parallel.tp=1 or model.qk_norm_scope=head",
        )
    if p.dp_engine == "ddp" and (p.pp > 1 or p.tp > 1):
        raise bad_value(
            "parallel.dp_engine",
            "ddp",
            f"supports data and expert parallelism only (pp={p.pp}, tp={p.tp})",
            "use parallel.dp_engine=fsdp with tensor or pipeline parallelism",
        )
    _check_compression(cfg)
    if p.tp > 1 and p.sequence_parallel:
        divides(
            "data.seq_len",
            cfg.data.seq_len,
            "parallel.tp",
            p.tp,
            "sequence parallelism splits the sequence over tp ranks: use a seq_len divisible by tp "
            "or parallel.sequence_parallel=false",
        )


def _check_compression(cfg: JobConfig) -> None:
    """`parallel.compression`: a known algorithm with options in range, on the DDP engine (FSDP's
    reduce-scatter has no hook for it)."""
    from parallel.compression import COMPRESSORS

    p, c = cfg.parallel, cfg.parallel.compression
    one_of("parallel.compression.kind", c.kind, tuple(COMPRESSORS))
    one_of("parallel.compression.factor_bits", str(c.factor_bits), ("8", "32"))
    one_of("parallel.compression.second_moment", c.second_moment, ("compressed", "factored"))
    if c.second_moment == "factored" and (c.kind == "none" or p.engine == "deepspeed"):
        raise bad_value(
            "parallel.compression.second_moment",
            c.second_moment,
            "feeds Adam the statistics of a lossy compressor on the native engine",
            "set parallel.compression.kind (e.g. powersgd) with parallel.engine=native, or second_moment=compressed",
        )
    if c.kind != "none" and p.dp_engine != "ddp" and p.engine != "deepspeed":
        raise bad_value(
            "parallel.compression.kind",
            c.kind,
            f"needs parallel.dp_engine=ddp (it is {p.dp_engine}: FSDP's reduce-scatter cannot be compressed)",
            "set parallel.dp_engine=ddp, or parallel.engine=deepspeed, or parallel.compression.kind=none",
        )


def _check_engine(cfg: JobConfig, dp: int) -> None:
    """`parallel.engine=deepspeed` (parallel/deepspeed_engine.py): ZeRO-1/2 data parallelism with
    our expert parallelism, on >= 2 data-parallel ranks, and nothing else."""
    p = cfg.parallel
    one_of("parallel.engine", p.engine, ENGINES)
    if p.engine != "deepspeed":
        return
    from parallel.deepspeed_engine import ZERO_STAGES

    if p.pp > 1 or p.tp > 1:
        raise bad_value(
            "parallel.engine",
            p.engine,
            f"supports data and expert parallelism only (pp={p.pp}, tp={p.tp})",
            "use parallel.engine=native with tensor or pipeline parallelism",
        )
    if p.zero_stage not in ZERO_STAGES:
        raise bad_value(
            "parallel.zero_stage",
            p.zero_stage,
            "is not supported by parallel.engine=deepspeed",
            "use 1 (optimizer state partitioned over dp) or 2 (gradients too)",
        )
    if dp < 2:
        raise bad_value(
            "parallel.engine",
            p.engine,
            f"needs data parallelism (dp={dp})",
            "run on >= 2 ranks, or use parallel.engine=native",
        )
    if p.compression.kind != "none" and dp // p.ep == 1:
        raise bad_value(
            "parallel.compression.kind",
            p.compression.kind,
            f"with parallel.engine=deepspeed compresses only the experts' gradient sync (ZeRO reduces "
            f"the dense gradients itself), and over dp / ep = {dp} / {p.ep} = 1 rank there is none",
            "set parallel.compression.kind=none, or an ep smaller than dp",
        )
