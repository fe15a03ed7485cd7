"""Bad inputs at the config and launch edges: `python -m trainer` overrides (numbers, enums,
paths, sizes that cannot fit, a run directory held by a live job), `launch.plan`, `launch.sbatch`
and the launch scripts. See harness.py for what every case must satisfy."""

from __future__ import annotations

import atexit
import fcntl
from pathlib import Path

import pytest

from tests.edges.conftest import BASE
from tests.edges.harness import Case, case, params, run_case


def trainer(id: str, overrides: str, names: str, **kw: object) -> Case:
    return case(id, "trainer", [*BASE, *overrides.split()], names, **kw)


def _hold_lock(ws: Path) -> None:
    """A live job holding the run's lock (this process, on its own open file: flock conflicts
    between open files, not only processes); released when the test process exits."""
    f = open(ws / "run" / ".lock", "w")  # noqa: SIM115 - held until exit
    f.write('{"pid": 4242, "host": "node7", "since": 0, "argv": []}\n')
    f.flush()
    fcntl.flock(f, fcntl.LOCK_EX)
    atexit.register(f.close)


NUMBERS = [
    trainer("lr-nan", "optim.lr=nan", "optim.lr"),
    trainer("lr-inf", "optim.lr=inf", "optim.lr"),
    trainer("lr-negative", "optim.lr=-0.1", "optim.lr"),
    trainer("weight-decay-minus-inf", "optim.weight_decay=-inf", "optim.weight_decay"),
    trainer("aux-loss-nan", "model.moe.aux_loss_coef=nan", "model.moe.aux_loss_coef"),
    trainer("beta2-one", "optim.beta2=1.0", "optim.beta2"),
    trainer("grad-clip-nan", "optim.grad_clip=nan", "optim.grad_clip"),
    trainer("seed-negative", "train.seed=-1", "train.seed"),
    trainer("seed-too-big", "train.seed=4294967296", "train.seed"),
    trainer("steps-zero", "train.steps=0", "train.steps"),
    trainer("log-every-zero", "train.log_every=0", "train.log_every"),
    trainer("keep-last-zero", "checkpoint.keep_last=0", "checkpoint.keep_last"),
    trainer("timeout-inf", "fault.collective_timeout_s=inf", "fault.collective_timeout_s"),
    trainer("val-fraction-one", "data.val_fraction=1.0", "data.val_fraction"),
    trainer("experts-zero", "model.moe.num_experts=0", "model.moe.num_experts"),
    trainer("top-k-above-experts", "model.moe.top_k=9", "model.moe.top_k"),
    trainer("seq-len-above-max", "data.seq_len=4096", "data.seq_len"),
    trainer(
        "rope-factor-below-one",
        "model.rope_scaling.type=linear model.rope_scaling.factor=0.5",
        "model.rope_scaling.factor",
    ),
    trainer("zero-stage-4", "parallel.zero_stage=4", "parallel.zero_stage"),
    trainer("dp-minus-3", "parallel.dp=-3", "parallel.dp"),
    trainer("topk-ratio-zero", "parallel.compression.topk_ratio=0", "parallel.compression.topk_ratio"),
    trainer("source-weight-nan", "data.sources=[{path:'{ds}',weight:nan}]", "data.sources[0].weight"),
    trainer("port-too-big", "cluster.rdzv_port=70000", "cluster.rdzv_port"),
    trainer("nodes-zero", "cluster.nodes=0", "cluster.nodes"),
]
ENUMS_AND_TYPES = [
    trainer("attention-unknown", "model.attention=flash", "model.attention"),
    trainer("schedule-unknown", "optim.schedule=linear", "optim.schedule"),
    trainer("wandb-mode-unknown", "logging.wandb_mode=cloud", "logging.wandb_mode"),
    trainer("device-unknown", "train.device=tpu", "train.device"),
    trainer("rope-scaling-dynamic", "model.rope_scaling.type=dynamic", "model.rope_scaling.type"),
    trainer("steps-not-a-number", "train.steps=abc", "train.steps"),
    trainer("bool-not-a-bool", "checkpoint.resume=maybe", "checkpoint.resume"),
    trainer("unknown-key", "model.moe.num_expert=8", "model.moe.num_expert"),
    trainer("cluster-time-garbage", "cluster.time=abc", "cluster.time"),
    trainer("cluster-time-minutes-60", "cluster.time=1:60:00", "cluster.time"),
    trainer("partition-with-a-command", "cluster.partition='gpu;reboot'", "cluster.partition"),
    trainer("override-unparsable", "optim.lr=1e-3)", "optim.lr"),
    trainer("tp-above-world", "parallel.tp=2", "parallel.tp"),
    trainer("world-size-mismatch", "parallel.tp=2", "parallel", env={"WORLD_SIZE": "3"}),
]
SIZES = [
    trainer("a-million-experts", "model.moe.num_experts=1000000", "model"),
    trainer("vocab-1e10", "model.vocab_size=10000000000", "model"),
]
PATHS = [
    trainer("run-dir-is-a-file", "run.dir={ws}/file", "run.dir"),
    trainer("run-dir-dangling-link", "run.dir={ws}/dangling", "run.dir"),
    trainer("run-dir-unwritable", "run.dir=/proc/moeforge/run", "run.dir"),
    trainer("checkpoint-dir-is-a-file", "checkpoint.dir={ws}/file", "checkpoint.dir"),
    trainer("checkpoint-dir-under-a-file", "checkpoint.dir={ws}/file/ckpt", "checkpoint.dir"),
    trainer("checkpoint-dir-dangling-link", "checkpoint.dir={ws}/dangling", "checkpoint.dir"),
    trainer("cache-dir-is-a-file", "data.sources=[] data.cache_dir={ws}/file", "data.cache_dir"),
    trainer("cache-dir-dangling-link", "data.sources=[] data.cache_dir={ws}/dangling", "data.cache_dir"),
    trainer("cache-dir-unwritable", "data.sources=[] data.cache_dir=/proc/moeforge", "data.cache_dir"),
    trainer("export-under-a-file", "checkpoint.export_hf={ws}/file/hf", "checkpoint.export_hf"),
    trainer("run-dir-held-by-a-live-job", "", "node7", setup=_hold_lock),
    trainer(
        "wandb-online-without-credentials",
        "logging.wandb_mode=online",
        "logging.wandb_mode",
        env={"WANDB_API_KEY": "", "NETRC": "/nonexistent", "HOME": "/nonexistent"},
    ),
]
LAUNCH = [
    case("plan-nodes-zero", "launch.plan", "recipe=mixtral_8x7b cluster.nodes=0", "cluster.nodes"),
    case("plan-gpu-memory-nan", "launch.plan", "cluster.gpu_memory_gb=nan", "cluster.gpu_memory_gb"),
    case("plan-bad-override", "launch.plan", "model.dimm=3", "model.dimm"),
    case("sbatch-time-garbage", "launch.sbatch", "cluster.gpus_per_node=2 cluster.time=abc", "cluster.time"),
    case("sbatch-output-nowhere", "launch.sbatch", "-o {ws}/file/x.sh cluster.gpus_per_node=2", "--output"),
    case("sbatch-nodes-zero", "launch.sbatch", "cluster.nodes=0", "cluster.nodes"),
    case(
        "one-node-script-world-size-mismatch",
        "bash",
        ["launch/train_one_node.sh", *BASE, "parallel.tp=2"],
        "parallel",
        env={"NPROC": "3"},
        subprocess=True,
    ),
    case("trainer-subprocess-lr-nan", "trainer", [*BASE, "optim.lr=nan"], "optim.lr", subprocess=True),
]


@pytest.mark.parametrize("c", params(NUMBERS, ENUMS_AND_TYPES, SIZES, PATHS, LAUNCH))
def test_bad_config_or_launch_input_is_one_line_and_writes_nothing(
    c: Case, ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_case(c, ws, capfd, monkeypatch)
