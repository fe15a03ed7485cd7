"""Impossible parallel layouts fail at validation, before any process group exists, with one line
naming the field to change."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.sampling import quick_sample
from trainer.compose import load_config
from trainer.errors import ConfigError

# (world size, overrides, the dotted field the message must name)
BAD_LAYOUTS = [
    (3, ["parallel.tp=2"], "parallel.tp"),  # 3 ranks cannot hold tp=2
    (4, ["parallel.dp=3"], "parallel.dp"),  # dp * tp * pp != world size
    (4, ["parallel.ep=3", "data.micro_batch_size=4"], "parallel.dp"),  # ep must divide dp
    (2, ["parallel.ep=4", "data.micro_batch_size=4"], "parallel.dp"),  # ep > dp
    (6, ["parallel.ep=6", "data.micro_batch_size=1", "train.global_batch_size=12"], "model.moe.num_experts"),
    (8, ["parallel.tp=8", "model.num_heads=4"], "model.num_heads"),  # heads % tp
    (4, ["parallel.tp=4"], "model.num_kv_heads"),  # tiny_moe has 2 kv heads
    (8, ["parallel.pp=8"], "parallel.pp"),  # more stages than layers (4)
    (2, ["parallel.pp=2", "parallel.pp_layers_per_stage=[1,2]"], "parallel.pp_layers_per_stage"),
    (
        2,
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=3"],
        "parallel.pp_layers_per_stage",
    ),  # 6 stages > 4 layers
    (2, ["parallel.pp=2", "parallel.pp_stages_per_rank=2"], "parallel.pp_stages_per_rank"),  # 1f1b: one
    (2, ["parallel.pp=2", "parallel.pp_schedule=zbv"], "parallel.pp_stages_per_rank"),  # V needs two
    (2, ["parallel.pp=2", "parallel.pp_schedule=chimera"], "parallel.pp_schedule"),
    (2, ["parallel.pp=4", "parallel.dp=1", "data.micro_batch_size=8"], "parallel.tp"),  # world 2, pp 4
    (
        4,
        ["parallel.pp=4", "train.global_batch_size=16", "data.micro_batch_size=8"],
        "train.global_batch_size",
    ),
    (
        4,
        [
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_stages_per_rank=2",
            "data.micro_batch_size=2",
            "train.global_batch_size=12",
        ],
        "train.global_batch_size",
    ),  # 3 micro-batches per rank: not a multiple of pp
    (2, ["parallel.pp=2", "model.mtp_depth=1"], "model.mtp_depth"),
    (2, ["parallel.tp=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
    (2, ["parallel.tp=2", "parallel.dp_engine=ddp"], "parallel.dp_engine"),
    (2, ["parallel.dp_engine=zero3"], "parallel.dp_engine"),
    (2, ["parallel.tp=2", "data.seq_len=255"], "data.seq_len"),  # sequence parallel splits seq by tp
    (2, ["parallel.backend=mpi"], "parallel.backend"),
    (2, ["parallel.dp_engine=ddp", "parallel.compression.kind=onebit_adam"], "parallel.compression.kind"),
    (2, ["parallel.compression.kind=topk"], "parallel.compression.kind"),  # fsdp cannot compress
    (
        2,
        ["parallel.dp_engine=ddp", "parallel.compression.kind=topk", "parallel.compression.topk_ratio=0"],
        "parallel.compression.topk_ratio",
    ),
    (
        2,
        ["parallel.dp_engine=ddp", "parallel.compression.kind=powersgd", "parallel.compression.rank=0"],
        "parallel.compression.rank",
    ),
    (
        2,
        [
            "parallel.dp_engine=ddp",
            "parallel.compression.kind=powersgd",
            "parallel.compression.factor_bits=4",
        ],
        "parallel.compression.factor_bits",
    ),
    (
        2,
        ["parallel.dp_engine=ddp", "parallel.compression.second_moment=exact"],
        "parallel.compression.second_moment",
    ),
    (  # nothing to correct without a lossy compressor
        2,
        ["parallel.dp_engine=ddp", "parallel.compression.second_moment=factored"],
        "parallel.compression.second_moment",
    ),
    (
        2,
        ["parallel.dp_engine=ddp", "parallel.compression.warmup_steps=-1"],
        "parallel.compression.warmup_steps",
    ),
    (2, ["parallel.engine=megatron"], "parallel.engine"),
    (4, ["parallel.engine=deepspeed", "parallel.tp=2", "data.micro_batch_size=8"], "parallel.engine"),
    (4, ["parallel.engine=deepspeed", "parallel.pp=2"], "parallel.engine"),
    (2, ["parallel.engine=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage"),
    (1, ["parallel.engine=deepspeed"], "parallel.engine"),  # no data parallelism
    (  # dp / ep = 1: no expert sync to compress, and ZeRO's dense reduction is not compressed
        2,
        ["parallel.engine=deepspeed", "parallel.ep=2", "parallel.compression.kind=sign"],
        "parallel.compression.kind",
    ),
    (2, ["optim.name=onebit_adam"], "optim.name"),  # DeepSpeed's 1-bit optimizers are gone
    (2, ["optim.name=ZeroOneAdam"], "optim.name"),
    (2, ["optim.name=onebitlamb"], "optim.name"),
]


@pytest.mark.parametrize("world_size, overrides, field", quick_sample(BAD_LAYOUTS))
def test_bad_layout_names_the_field(world_size, overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides, world_size=world_size)
    message = str(err.value)
    assert err.value.field == field, message
    assert field in message and "\n" not in message


@pytest.mark.parametrize(
    "world_size, overrides",
    [
        (2, ["parallel.ep=2", "data.micro_batch_size=4"]),
        (4, ["parallel.tp=2", "parallel.ep=2", "data.micro_batch_size=8"]),
        (2, ["parallel.pp=2"]),
        (8, ["parallel.pp=2", "parallel.ep=2", "data.micro_batch_size=2"]),
        (4, ["parallel.ep=2", "parallel.dp_engine=ddp", "parallel.compression.kind=moe_selective"]),
        (4, ["parallel.engine=deepspeed", "parallel.ep=2", "parallel.compression.kind=sign"]),
        (2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    ],
)
def test_good_layouts_pass(world_size, overrides):
    load_config(overrides, world_size=world_size)


def test_a_deepspeed_onebit_optimizer_points_to_the_sign_compressor():
    with pytest.raises(ConfigError, match=r"parallel\.compression\.kind=sign"):
        load_config(["optim.name=onebit_adam"], world_size=2)


@pytest.mark.slow
def test_cli_rejects_a_layout_before_any_process_group():
    """WORLD_SIZE says 4 ranks but no rendezvous exists: if validation did not stop first, joining
    the process group would hang or fail with a traceback."""
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "parallel.ep=3", "data.micro_batch_size=4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.dp" in lines[0] and "parallel.ep=3" in lines[0], result.stderr
