"""Config validation, once, at the edge: every check raises `ConfigError` with one line that names
the dotted field, its value and the fix. Nothing downstream re-checks these (STYLE.md).

`validate(cfg, world_size)` is pure: no data reads, no process groups. The parallel-layout checks
live in `trainer/layout.py`; the data itself (readable shards, vocab size) is checked when it is
opened, in `trainer/setup.py:build_data`.
"""

from __future__ import annotations

import os
import re

import torch

from trainer.config import JobConfig
from trainer.errors import bad_value
from trainer.layout import check_layout, data_parallel_size
from trainer.validate_fields import check_fields
from trainer.validate_helpers import divides, fraction, one_of

SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")
ATTENTIONS = ("gqa", "mla")
QK_NORM_SCOPES = ("head", "projection")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw",)
# DeepSpeed's 1-bit Adam, 0/1 Adam and 1-bit LAMB (its config names, and ours with "_"): gone
# from DeepSpeed 0.19.8 (`deepspeed.runtime.fp16.onebit`); our sign compressor replaces them.
DEEPSPEED_ONEBIT = ("onebitadam", "zerooneadam", "onebitlamb")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
DATA_FORMATS = ("parquet", "megatron")
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Raise `ConfigError` for the first config value that cannot work at this world size."""
    check_fields(cfg)
    _check_model(cfg)
    _check_data(cfg)
    check_layout(cfg, world_size)
    _check_optim_and_train(cfg, world_size)
    _check_run(cfg)
    check_cluster(cfg)
    if cfg.checkpoint.init_from or cfg.checkpoint.export_hf:
        from trainer.checkpoint.hf.job import check_job  # reads config.json + safetensors headers only

        check_job(cfg.checkpoint, cfg.model)


def _check_model(cfg: JobConfig) -> None:
    m = cfg.model
    one_of("model.attention", m.attention, ATTENTIONS)
    if m.attention == "gqa":
        divides(
            "model.num_heads",
            m.num_heads,
            "model.num_kv_heads",
            m.num_kv_heads,
            "use a num_kv_heads that divides num_heads",
        )
    if m.head_dim == 0:
        divides(
            "model.dim",
            m.dim,
            "model.num_heads",
            m.num_heads,
            "change dim or num_heads, or set model.head_dim",
        )
    if m.first_k_dense > m.num_layers:
        raise bad_value(
            "model.first_k_dense",
            m.first_k_dense,
            f"must be <= model.num_layers={m.num_layers}",
            "lower first_k_dense",
        )
    has_dense = m.first_k_dense > 0 or m.moe_layer_freq > 1
    if has_dense and m.ffn_hidden <= 0:
        raise bad_value(
            "model.ffn_hidden", m.ffn_hidden, "must be > 0 (the model has dense layers)", "set ffn_hidden"
        )
    if m.attention == "mla":
        if m.mla.qk_rope_head_dim % 2:
            raise bad_value(
                "model.mla.qk_rope_head_dim",
                m.mla.qk_rope_head_dim,
                "must be even (RoPE rotates pairs)",
                "use an even size",
            )
    elif m.partial_rotary_factor == 1.0 and m.resolved_head_dim % 2:
        raise bad_value(
            "model.head_dim",
            m.resolved_head_dim,
            "must be even (RoPE rotates pairs)",
            "use an even head size",
        )
    _check_attention_options(cfg)
    _check_layer_kinds(cfg)
    if any(m.is_moe_layer(i) for i in range(m.num_layers)):
        _check_moe(cfg)


def _check_attention_options(cfg: JobConfig) -> None:
    """The attention options of released models (model/attention.py), all GQA-only; tp > 1 with a
    projection-wide q/k norm is rejected in trainer/layout.py."""
    m = cfg.model
    one_of("model.qk_norm_scope", m.qk_norm_scope, QK_NORM_SCOPES)
    if m.attention == "mla":
        for name in ("qkv_bias", "attention_output_gate"):
            if getattr(m, name):
                raise bad_value(f"model.{name}", True, "is for attention=gqa only", f"set model.{name}=false")
        if m.partial_rotary_factor != 1.0:
            raise bad_value(
                "model.partial_rotary_factor",
                m.partial_rotary_factor,
                "is for attention=gqa only (MLA rotates model.mla.qk_rope_head_dim dims)",
                "set model.partial_rotary_factor=1.0",
            )
        return
    if m.rotary_dim == 0 or m.rotary_dim % 2:
        raise bad_value(
            "model.partial_rotary_factor",
            m.partial_rotary_factor,
            f"gives int(head_dim={m.resolved_head_dim} * factor) = {m.rotary_dim} rotary dims, which "
            "must be even and > 0 (RoPE rotates pairs)",
            "pick a factor that gives an even number of dims",
        )


def _check_rope_scaling(cfg: JobConfig) -> None:
    """RoPE context extension (model/layers.py rope_tables): the fields its type reads."""
    rs, where = cfg.model.rope_scaling, "model.rope_scaling"
    one_of(f"{where}.type", rs.type, ROPE_SCALINGS)
    if rs.type == "none":
        return
    if (
        rs.type != "linear"
        and not rs.original_max_seq_len
        and not (cfg.model.max_seq_len / rs.factor).is_integer()
    ):
        # The pretraining context defaults to max_seq_len / factor; a fraction has no HF equivalent.
        raise bad_value(
            f"{where}.original_max_seq_len",
            rs.original_max_seq_len,
            f"defaults to model.max_seq_len / factor = {cfg.model.max_seq_len / rs.factor:g}, not a whole context",
            "set original_max_seq_len to the pretraining context length",
        )
    if rs.type == "llama3":
        if not rs.high_freq_factor > rs.low_freq_factor:
            raise bad_value(
                f"{where}.high_freq_factor",
                rs.high_freq_factor,
                f"must be > low_freq_factor={rs.low_freq_factor}",
                "raise high_freq_factor",
            )
    if rs.type == "yarn":
        if not rs.beta_fast > rs.beta_slow:
            raise bad_value(
                f"{where}.beta_fast", rs.beta_fast, f"must be > beta_slow={rs.beta_slow}", "raise beta_fast"
            )


def _check_layer_kinds(cfg: JobConfig) -> None:
    """Which layers are Gated DeltaNet, NoPE, chunked or windowed, and the dense-layer list."""
    m, la = cfg.model, cfg.model.linear_attention
    _check_rope_scaling(cfg)
    for i in m.mlp_only_layers:
        if not 0 <= i < m.num_layers:
            raise bad_value(
                "model.mlp_only_layers",
                m.mlp_only_layers,
                f"names layer {i}",
                f"use indices below {m.num_layers}",
            )
    if la.full_attention_interval == 0:
        return
    if la.num_value_heads % la.num_key_heads:
        raise bad_value(
            "model.linear_attention.num_value_heads",
            la.num_value_heads,
            f"is not a multiple of num_key_heads={la.num_key_heads} (each q/k head serves a group of v heads)",
            "pick a multiple",
        )


def _check_moe(cfg: JobConfig) -> None:
    e = cfg.model.moe
    if e.top_k > e.num_experts:
        raise bad_value(
            "model.moe.top_k",
            e.top_k,
            f"must be <= model.moe.num_experts={e.num_experts}",
            "lower top_k or add experts",
        )
    one_of("model.moe.score_func", e.score_func, SCORE_FUNCS)
    one_of("model.moe.drop_policy", e.drop_policy, DROP_POLICIES)
    one_of("model.moe.aux_loss_scope", e.aux_loss_scope, AUX_LOSS_SCOPES)
    if e.shared_expert_gate and e.num_shared_experts == 0:
        raise bad_value(
            "model.moe.shared_expert_gate",
            True,
            "gates the shared experts, but model.moe.num_shared_experts=0",
            "set model.moe.num_shared_experts >= 1 or model.moe.shared_expert_gate=false",
        )
    divides(
        "model.moe.num_experts",
        e.num_experts,
        "model.moe.num_groups",
        e.num_groups,
        "use a num_groups that divides num_experts",
    )
    if e.topk_groups > e.num_groups:
        raise bad_value(
            "model.moe.topk_groups",
            e.topk_groups,
            f"must be <= model.moe.num_groups={e.num_groups}",
            "change topk_groups",
        )
    reachable = e.topk_groups * (e.num_experts // e.num_groups)
    if e.top_k > reachable:
        raise bad_value(
            "model.moe.top_k",
            e.top_k,
            f"must be <= model.moe.topk_groups * experts per group = {reachable}",
            "raise topk_groups or lower top_k",
        )


def _check_data(cfg: JobConfig) -> None:
    d = cfg.data
    if d.seq_len > cfg.model.max_seq_len:
        raise bad_value(
            "data.seq_len",
            d.seq_len,
            f"must be <= model.max_seq_len={cfg.model.max_seq_len}",
            "shorten seq_len or raise max_seq_len",
        )
    if not d.sources and not d.cache_dir:
        raise bad_value("data.cache_dir", "''", "is empty", "set a directory for the prepared default corpus")
    for i, src in enumerate(d.sources):
        field = f"data.sources[{i}]"
        one_of(f"{field}.format", src.format, DATA_FORMATS)
        path = os.path.expanduser(src.path)
        if not src.path:
            raise bad_value(
                f"{field}.path", "''", "is empty", "point it at a prepared dataset (python -m data.prepare)"
            )
        missing = (
            [p for p in (path + ".bin", path + ".idx") if not os.path.exists(p)]
            if src.format == "megatron"
            else ([] if os.path.isdir(path) else [path])
        )
        if missing:
            problem = f"has no {missing[0]}" if src.format == "megatron" else "does not exist"
            raise bad_value(f"{field}.path", src.path, problem, "check the path or prepare the dataset")


def _check_optim_and_train(cfg: JobConfig, world_size: int) -> None:
    o, t = cfg.optim, cfg.train
    if o.name.lower().replace("_", "") in DEEPSPEED_ONEBIT:
        raise bad_value(
            "optim.name",
            o.name,
            "is a DeepSpeed 1-bit optimizer, which DeepSpeed 0.19.8 no longer ships",
            "use optim.name=adamw with parallel.compression.kind=sign: our 1-bit Adam-style sign "
            "compression with error feedback, on parallel.dp_engine=ddp or parallel.engine=deepspeed",
        )
    one_of("optim.name", o.name, OPTIMIZERS)
    one_of("optim.schedule", o.schedule, SCHEDULES)
    if o.schedule == "wsd":
        fraction("optim.decay_fraction", o.decay_fraction, low_open=True)
    one_of("train.device", t.device, DEVICES)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise bad_value(
            "train.device", t.device, "but no CUDA device is visible", "use train.device=auto or cpu"
        )
    if o.warmup_steps > t.steps:
        raise bad_value(
            "optim.warmup_steps", o.warmup_steps, f"must be <= train.steps={t.steps}", "shorten the warmup"
        )
    per_step = cfg.data.micro_batch_size * data_parallel_size(cfg, world_size)
    if t.global_batch_size % per_step:
        raise bad_value(
            "train.global_batch_size",
            t.global_batch_size,
            f"must be divisible by data.micro_batch_size * dp = {cfg.data.micro_batch_size} * "
            f"{data_parallel_size(cfg, world_size)} = {per_step}",
            f"use a multiple of {per_step}",
        )


def _check_run(cfg: JobConfig) -> None:
    c, lg = cfg.checkpoint, cfg.logging
    one_of("checkpoint.verify", c.verify, ("full", "size"))
    one_of("logging.wandb_mode", lg.wandb_mode, WANDB_MODES)
    for field, value in (("run.dir", cfg.run.dir), ("checkpoint.dir", c.dir)):
        if not value:
            raise bad_value(field, "''", "is empty", "set a directory")


# SLURM's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME = re.compile(r"^(\d+-\d+(:[0-5]?\d){0,2}|\d+(:[0-5]?\d){0,2})$")


def check_cluster(cfg: JobConfig) -> None:
    """The cluster fields that launch/ writes into torchrun lines and sbatch scripts."""
    c = cfg.cluster
    if not SLURM_TIME.match(str(c.time)):
        raise bad_value(
            "cluster.time", c.time, "is not a SLURM time limit", "use minutes, HH:MM:SS or D-HH:MM:SS"
        )
    for name in ("partition", "account"):
        value = getattr(c, name)
        if value is not None and not re.fullmatch(r"[\w.\-]+", str(value)):
            raise bad_value(
                f"cluster.{name}", repr(value), "is not a SLURM name", "use letters, digits, '.', '-', '_'"
            )
