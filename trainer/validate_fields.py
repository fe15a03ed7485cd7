"""Every numeric field of the job config, checked from one table before anything else.

`FIELD_RANGES` names the range of each int/float field (a test checks that no field is missing,
so a new field cannot skip validation). Floats must also be finite: `optim.lr=nan` or `inf` would
otherwise train silently into NaNs. The cross-field rules (top_k <= num_experts, divisibility,
layouts) stay in `trainer/validate.py` and `trainer/layout.py`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainer.errors import bad_value

INF = math.inf


@dataclass(frozen=True)
class Range:
    low: float = 0.0
    high: float = INF
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == INF:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return (
            f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        )


POSITIVE = Range(low_open=True)  # > 0
NON_NEGATIVE = Range()  # >= 0
AT_LEAST_ONE = Range(1)
UNIT = Range(0.0, 1.0)  # [0, 1]
UNIT_OPEN_LOW = Range(0.0, 1.0, low_open=True)  # (0, 1]
BELOW_ONE = Range(0.0, 1.0, high_open=True)  # [0, 1)
SEED = Range(0, 2**32 - 1)  # numpy's and torch's seed range
PORT = Range(1, 65535)

FIELD_RANGES: dict[str, Range] = {
    # model
    "model.vocab_size": AT_LEAST_ONE,
    "model.dim": AT_LEAST_ONE,
    "model.num_layers": AT_LEAST_ONE,
    "model.num_heads": AT_LEAST_ONE,
    "model.num_kv_heads": AT_LEAST_ONE,
    "model.head_dim": NON_NEGATIVE,  # 0: dim // num_heads
    "model.ffn_hidden": NON_NEGATIVE,  # > 0 when the model has dense layers (validate.py)
    "model.max_seq_len": AT_LEAST_ONE,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.partial_rotary_factor": UNIT_OPEN_LOW,
    "model.rope_scaling.factor": Range(1.0),
    "model.rope_scaling.original_max_seq_len": NON_NEGATIVE,
    "model.rope_scaling.low_freq_factor": POSITIVE,
    "model.rope_scaling.high_freq_factor": POSITIVE,
    "model.rope_scaling.beta_fast": POSITIVE,
    "model.rope_scaling.beta_slow": POSITIVE,
    "model.rope_scaling.attention_factor": NON_NEGATIVE,  # 0: derived from the factor
    "model.rope_scaling.mscale": NON_NEGATIVE,
    "model.rope_scaling.mscale_all_dim": NON_NEGATIVE,
    "model.nope_layer_interval": NON_NEGATIVE,
    "model.attn_floor_scale": AT_LEAST_ONE,
    "model.attn_scale": NON_NEGATIVE,
    "model.attention_chunk_size": NON_NEGATIVE,
    "model.sliding_window": NON_NEGATIVE,
    "model.clip_qkv": NON_NEGATIVE,
    "model.mla.q_lora_rank": NON_NEGATIVE,
    "model.mla.kv_lora_rank": AT_LEAST_ONE,
    "model.mla.qk_nope_head_dim": NON_NEGATIVE,
    "model.mla.qk_rope_head_dim": AT_LEAST_ONE,
    "model.mla.v_head_dim": AT_LEAST_ONE,
    "model.moe.num_experts": AT_LEAST_ONE,
    "model.moe.top_k": AT_LEAST_ONE,
    "model.moe.moe_ffn_hidden": AT_LEAST_ONE,
    "model.moe.num_shared_experts": NON_NEGATIVE,
    "model.moe.shared_ffn_hidden": NON_NEGATIVE,
    "model.moe.routed_scaling_factor": POSITIVE,
    "model.moe.router_jitter": NON_NEGATIVE,
    "model.moe.num_groups": AT_LEAST_ONE,
    "model.moe.topk_groups": AT_LEAST_ONE,
    "model.moe.capacity_factor": NON_NEGATIVE,  # 0: no capacity limit
    "model.moe.aux_loss_coef": NON_NEGATIVE,
    "model.moe.z_loss_coef": NON_NEGATIVE,
    "model.moe.bias_update_rate": NON_NEGATIVE,
    "model.linear_attention.full_attention_interval": NON_NEGATIVE,  # 0: no linear-attention layers
    "model.linear_attention.num_key_heads": AT_LEAST_ONE,
    "model.linear_attention.num_value_heads": AT_LEAST_ONE,
    "model.linear_attention.key_head_dim": AT_LEAST_ONE,
    "model.linear_attention.value_head_dim": AT_LEAST_ONE,
    "model.linear_attention.conv_kernel": AT_LEAST_ONE,
    "model.linear_attention.chunk_size": AT_LEAST_ONE,
    "model.first_k_dense": NON_NEGATIVE,
    "model.moe_layer_freq": AT_LEAST_ONE,
    "model.mlp_only_layers": NON_NEGATIVE,  # each index; < num_layers is checked in validate.py
    "model.mtp_depth": NON_NEGATIVE,
    "model.mtp_loss_coef": NON_NEGATIVE,
    "model.init_std": POSITIVE,
    "model.published_total_b": NON_NEGATIVE,  # recipes' published sizes, for the recipe tests
    "model.published_active_b": NON_NEGATIVE,
    # data
    "data.sources.weight": POSITIVE,
    "data.sources.eod_id": Range(-1),  # -1: the sidecar <path>.json names it
    "data.seq_len": AT_LEAST_ONE,
    "data.micro_batch_size": AT_LEAST_ONE,
    "data.tokenizer_vocab_size": AT_LEAST_ONE,
    "data.val_fraction": BELOW_ONE,
    "data.val_batches": NON_NEGATIVE,
    # parallel (-1: as many as the world size allows; the layout rules are in trainer/layout.py)
    "parallel.dp": Range(-1),
    "parallel.tp": AT_LEAST_ONE,
    "parallel.pp": AT_LEAST_ONE,
    "parallel.ep": AT_LEAST_ONE,
    "parallel.zero_stage": Range(0, 3),
    "parallel.compression.warmup_steps": NON_NEGATIVE,
    "parallel.compression.rank": AT_LEAST_ONE,
    "parallel.compression.seed": SEED,
    "parallel.compression.factor_bits": Range(1, 32),
    "parallel.compression.topk_ratio": UNIT_OPEN_LOW,
    "parallel.compression.chunk_size": AT_LEAST_ONE,
    "parallel.compression.threshold": NON_NEGATIVE,
    "parallel.pp_stages_per_rank": AT_LEAST_ONE,
    "parallel.pp_layers_per_stage": NON_NEGATIVE,
    # optim
    "optim.lr": POSITIVE,
    "optim.min_lr_ratio": UNIT,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": BELOW_ONE,
    "optim.beta2": BELOW_ONE,
    "optim.eps": POSITIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.decay_fraction": UNIT,
    # train
    "train.steps": AT_LEAST_ONE,
    "train.global_batch_size": AT_LEAST_ONE,
    "train.seed": SEED,
    "train.log_every": AT_LEAST_ONE,
    "train.val_every": NON_NEGATIVE,
    # checkpoint, fault, logging
    "checkpoint.save_every": NON_NEGATIVE,
    "checkpoint.keep_last": AT_LEAST_ONE,
    "fault.max_consecutive_skips": NON_NEGATIVE,
    "fault.max_rollbacks": NON_NEGATIVE,
    "fault.collective_timeout_s": POSITIVE,
    "logging.heatmap_every": NON_NEGATIVE,
    "logging.straggler_every": NON_NEGATIVE,
    # cluster (read by launch/)
    "cluster.nodes": AT_LEAST_ONE,
    "cluster.gpus_per_node": AT_LEAST_ONE,
    "cluster.gpu_memory_gb": POSITIVE,
    "cluster.cpus_per_gpu": AT_LEAST_ONE,
    "cluster.rdzv_port": PORT,
    "cluster.max_restarts": NON_NEGATIVE,
}


def numeric_fields(node: Any, prefix: str = "") -> Iterator[tuple[str, str, float]]:
    """(table key, display name, value) of every int/float in a config tree; list items share
    their list's key (`data.sources.weight`) and are shown with their index (`data.sources[1].weight`)."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        yield from _values(value, key, key, hints[f.name])


def _values(value: Any, key: str, shown: str, hint: Any) -> Iterator[tuple[str, str, float]]:
    if dataclasses.is_dataclass(value):
        for k, s, v in numeric_fields(value):
            yield f"{key}.{k}", f"{shown}.{s}", v
    elif isinstance(value, (list, tuple)):
        item_hint = (typing.get_args(hint) or (Any,))[0]
        for i, item in enumerate(value):
            yield from _values(item, key, f"{shown}[{i}]", item_hint)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, shown, value


def _has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type hint; interpolations resolve after the schema's type check,
    so `model.mlp_only_layers='${now:%f}'` arrives here as a string."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint)


def check_types(node: Any, prefix: str = "") -> None:
    """Raise `ConfigError` for the first field whose value is not of its declared type."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, name, hint = getattr(node, f.name), f"{prefix}{f.name}", hints[f.name]
        if not _has_type(value, hint):
            want = hint.__name__ if isinstance(hint, type) else str(hint)
            raise bad_value(name, repr(value), f"is not of type {want}", f"give a {want}")
        if dataclasses.is_dataclass(value):
            check_types(value, f"{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_types(item, f"{name}[{i}].")


def check_fields(cfg: Any) -> None:
    """Raise `ConfigError` for the first field of the wrong type, or numeric field that is not
    finite or not in its range."""
    check_types(cfg)
    for key, shown, value in numeric_fields(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_value(shown, value, "is not a finite number", "set a real value")
        allowed = FIELD_RANGES.get(key)
        if allowed is not None and value not in allowed:
            raise bad_value(shown, value, f"must be {allowed}", f"set a value {allowed}")
