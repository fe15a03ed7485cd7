"""Bad configs and bad data fail early with one line that names the field (and exit code 2 from
the CLI), never with a traceback deep inside the model or the data reader."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sampling import quick_sample
from trainer.compose import load_config
from trainer.errors import ConfigError
from trainer.setup import build_data

# (overrides, the dotted field the message must name)
BAD_CONFIGS = [
    (["model.moe.top_k=99"], "model.moe.top_k"),
    (["model.moe.top_k=0"], "model.moe.top_k"),
    (["model.dim=0"], "model.dim"),
    (["model.num_layers=-1"], "model.num_layers"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["model.dim=130"], "model.dim"),  # not divisible by num_heads=4 with head_dim=0
    (["model.moe.num_groups=3"], "model.moe.num_groups"),
    (["model.moe.num_groups=4", "model.moe.topk_groups=5"], "model.moe.topk_groups"),
    (["model.moe.num_groups=4", "model.moe.topk_groups=1", "model.moe.top_k=3"], "model.moe.top_k"),
    (["model.moe.score_func=relu"], "model.moe.score_func"),
    (["model.moe.drop_policy=random"], "model.moe.drop_policy"),
    (["model.moe.aux_loss_scope=batch"], "model.moe.aux_loss_scope"),
    (["model.moe.capacity_factor=-1"], "model.moe.capacity_factor"),
    (["model.attention=flash"], "model.attention"),
    (["model.attention=mla", "model.mla.qk_rope_head_dim=63"], "model.mla.qk_rope_head_dim"),
    (["model.first_k_dense=5"], "model.first_k_dense"),
    (["model.mtp_depth=-1"], "model.mtp_depth"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.warmup_steps=500"], "optim.warmup_steps"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode"),
    (["logging.heatmap_every=-1"], "logging.heatmap_every"),
    (["logging.straggler_every=-5"], "logging.straggler_every"),
    (["checkpoint.verify=md5"], "checkpoint.verify"),
    (["train.device=tpu"], "train.device"),
    (["train.steps=0"], "train.steps"),
    (["train.global_batch_size=10"], "train.global_batch_size"),  # micro_batch_size=4
    (["data.micro_batch_size=0"], "data.micro_batch_size"),
    (["data.seq_len=1024"], "data.seq_len"),  # model.max_seq_len=512
    (["data.sources=[{path:'/nonexistent/moeforge/ds'}]"], "data.sources[0].path"),
    (["data.sources=[{path:'/tmp',format:csv}]"], "data.sources[0].format"),
    (["parallel.backend=mpi"], "parallel.backend"),
    (["parallel.tp=3"], "parallel.tp"),
    (["parallel.ep=2"], "parallel.ep"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["fault.max_rollbacks=-1"], "fault.max_rollbacks"),
    (["fault.collective_timeout_s=0"], "fault.collective_timeout_s"),
    # composition errors (Hydra/OmegaConf), reduced to one line on the field
    (["model.foo=1"], "model.foo"),
    (["model.dim=abc"], "model.dim"),
    (["recipe=nope"], "recipe"),
    (["model=nope"], "model"),
    (["optim.lr=1e-3,2e-3"], "optim.lr"),
    (["model.dim=[1"], "model.dim"),
    (["run.dir=${nope}"], "run.dir"),
]


def _assert_one_line(err: ConfigError, field: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    assert field in msg, msg


@pytest.mark.parametrize(
    ("overrides", "field"), quick_sample(BAD_CONFIGS, [" ".join(o) for o, _ in BAD_CONFIGS])
)
def test_bad_config_names_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    _assert_one_line(info.value, field)


def test_default_config_is_valid() -> None:
    load_config([])


@pytest.fixture
def dataset_copy(small_dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(small_dataset, out)
    return out


def _corrupt_shard(ds: Path) -> None:
    shard = sorted((ds / "train").glob("*.parquet"))[0]
    shard.write_bytes(b"\x00" * shard.stat().st_size)  # same size: the parquet reader must notice


def _truncate_shard(ds: Path) -> None:
    shard = sorted((ds / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])


BAD_DATA = [
    ("missing metadata", lambda ds: (ds / "metadata.json").unlink(), [], "data.sources[0].path"),
    (
        "corrupt metadata",
        lambda ds: (ds / "metadata.json").write_text("{not json"),
        [],
        "data.sources[0].path",
    ),
    ("corrupt shard", _corrupt_shard, [], "data.sources[0].path"),
    ("truncated shard", _truncate_shard, [], "data.sources[0].path"),
    (
        "missing shard",
        lambda ds: sorted((ds / "train").glob("*.parquet"))[0].unlink(),
        [],
        "data.sources[0].path",
    ),
    ("vocab too small", lambda ds: None, ["model.vocab_size=100"], "model.vocab_size"),
]


@pytest.mark.parametrize(("case", "damage", "extra", "field"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_names_field(dataset_copy: Path, case: str, damage, extra: list[str], field: str) -> None:
    damage(dataset_copy)
    overrides = [
        f"data.sources=[{{path:'{dataset_copy}'}}]",
        "data.seq_len=32",
        "data.micro_batch_size=2",
        *extra,
    ]
    with pytest.raises(ConfigError) as info:
        build_data(load_config([*overrides, "train.global_batch_size=2"]), seed=0)
    _assert_one_line(info.value, field)


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("arg", "field"), [("model.moe.top_k=99", "model.moe.top_k"), ("model.foo=1", "model.foo")]
)
@pytest.mark.slow
def test_cli_config_error_is_one_line_exit_2(arg: str, field: str, tmp_path: Path) -> None:
    proc = _run_cli([arg, f"run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moeforge: config error: ") and field in lines[0]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not (tmp_path / "run").exists()  # failed before Hydra made the run directory


def test_every_numeric_field_has_a_range() -> None:
    """A new int/float config field must get a row in the table, or it would skip validation."""
    from data.config import DataSourceConfig
    from trainer.validate_fields import FIELD_RANGES, numeric_fields

    job = load_config([])
    # Fill the optional and list fields so that the walk sees them.
    job.data.sources = [DataSourceConfig(path="x")]
    job.cluster.cpus_per_gpu = 4
    job.model.mlp_only_layers, job.parallel.pp_layers_per_stage = [0], [2, 2]
    keys = {key for key, _, _ in numeric_fields(job)}
    assert keys == set(FIELD_RANGES), sorted(keys ^ set(FIELD_RANGES))


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.weight_decay=-inf", "optim.weight_decay"),
        ("model.moe.aux_loss_coef=nan", "model.moe.aux_loss_coef"),
        ("fault.collective_timeout_s=inf", "fault.collective_timeout_s"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
        ("cluster.nodes=0", "cluster.nodes"),
        ("cluster.rdzv_port=70000", "cluster.rdzv_port"),
        ("cluster.gpu_memory_gb=nan", "cluster.gpu_memory_gb"),
        ("parallel.zero_stage=4", "parallel.zero_stage"),
        ("parallel.dp=-3", "parallel.dp"),
    ],
)
def test_field_table_refuses(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)
