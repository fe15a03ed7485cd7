"""End to end through the real entry points: `python -m trainer recipe=tiny_cpu ...` trains, logs,
checkpoints and prints a summary, and a second run with more steps resumes where the first
stopped; `torchrun -m trainer` does the same on 4 ranks, resuming at another parallel layout."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.heatmap import render_expert_load

SMALL = [
    "recipe=tiny_cpu",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.val_batches=2",
    "train.global_batch_size=4",  # 2 micro-batches per step: gradient accumulation on the path
    "train.log_every=2",
    "train.val_every=3",
    "checkpoint.save_every=4",
    "optim.warmup_steps=2",
    "logging.progress=false",
]


def run_trainer(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline run's `.wandb` file: a 7-byte file header, then LevelDB-log
    framing (32 KiB blocks; each chunk has crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, pending, out = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(Record.FromString(pending))
            pending = b""
    return out


@pytest.mark.slow
def test_train_then_resume(tmp_path: Path, default_corpus_cache: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*SMALL, f"run.dir={run_dir}", f"data.cache_dir={default_corpus_cache}"]

    observe = ["logging.heatmap_every=3", "logging.straggler_every=3"]  # 1 process: no straggler report
    first = run_trainer([*common, "train.steps=6", "logging.wandb_mode=offline", *observe], tmp_path)
    assert "moeforge run summary" in first.stdout
    assert "steps            0 -> 6" in first.stdout
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 4, 6]
    for key in ("loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "tflops", "peak_mem_gib"):
        assert all(key in r for r in train), key
    assert "moe/load_imbalance_max" in train[-1] and "moe/layer0/load_max_over_mean" in train[-1]
    assert [r["step"] for r in records(run_dir, "val")] == [0, 3, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-6"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-4", "step-6"]
    assert " | MFU n/a | " in first.stdout  # every listed field, also where the device peak is unknown
    assert "expert load: " in first.stdout and "straggler" not in first.stdout
    assert [r["step"] for r in records(run_dir, "expert_load")] == [3, 6]
    with Image.open(run_dir / "expert_load.png") as png:  # the latest, step 6: 4 layers x 8 experts
        png.load()  # decodes the whole file: a truncated PNG fails here
        assert png.format == "PNG"
        assert png.size == render_expert_load(np.ones((4, 8)) / 8, list("0123"), 6).size
    assert json.loads((run_dir / "expert_load.json").read_text())["step"] == 6

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    wandb_run = wandb_records(run_file)
    (run_record,) = [r.run for r in wandb_run if r.HasField("run")]
    assert {"model", "parallel", "logging"} <= {u.key for u in run_record.config.update}
    history = [r.history for r in wandb_run if r.HasField("history")]
    keys = {item.key or "/".join(item.nested_key) for h in history for item in h.item}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops", "peak_mem_gib", "val/loss"} <= keys
    assert {"moe/load_imbalance_max", "moe/global_load_imbalance_max", "moe/expert_load/path"} <= keys
    assert len(list(run_file.parent.glob("files/media/images/moe/expert_load_*.png"))) == 2

    second = run_trainer([*common, "train.steps=8", "logging.wandb_mode=disabled"], tmp_path)
    assert "resumed from" in second.stdout and "steps            6 -> 8" in second.stdout
    assert [r["step"] for r in records(run_dir, "train")][4:] == [7, 8]  # appended, not restarted
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-8"


def run_torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [*torchrun, "-m", "trainer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_torchrun_four_ranks_then_resume_at_another_layout(tmp_path: Path, small_dataset: Path) -> None:
    """The quickstart's layout (pp2 x dp2, experts over ep2) through `torchrun -m trainer`; the
    sharded checkpoint then resumes on 4 ranks laid out as tp2 x dp2 (ep2)."""
    run_dir = tmp_path / "run"
    common = [
        *SMALL,
        f"run.dir={run_dir}",
        f"data.sources=[{{path:'{small_dataset}'}}]",
        "model.vocab_size=512",
        "train.global_batch_size=8",
        "logging.wandb_mode=disabled",
    ]
    observe = ["logging.heatmap_every=4", "logging.straggler_every=2"]
    first = run_torchrun(4, [*common, "parallel=pp2_ep2", "train.steps=4", *observe], tmp_path)
    assert "layout dp=2 ep=2 tp=1 pp=2" in first.stdout
    # Rank 0 holds layers 0-1 only; the heatmap has the other pipeline stage's layers too.
    heatmap = json.loads((run_dir / "expert_load.json").read_text())
    assert heatmap["step"] == 4 and heatmap["layers"] == ["0", "1", "2", "3"]
    np.testing.assert_allclose(np.sum(heatmap["fraction"], axis=1), 1.0, atol=1e-5)
    stragglers = records(run_dir, "straggler")
    assert [r["step"] for r in stragglers] == [2, 4] and first.stdout.count("straggler: rank ") == 2
    assert all(r["straggler/slowest_rank"] in range(4) and r["straggler/ratio"] >= 1.0 for r in stragglers)
    assert first.stdout.count("moeforge run summary") == 1  # rank 0 only
    val = records(run_dir, "val")
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"

    second = run_torchrun(4, [*common, "parallel.tp=2", "parallel.ep=2", "train.steps=6"], tmp_path)
    assert "layout dp=2 ep=2 tp=2 pp=1" in second.stdout
    assert "resumed from" in second.stdout and "steps            4 -> 6" in second.stdout
    assert records(run_dir, "train")[-1]["step"] == 6


@pytest.mark.slow
def test_torchrun_deepspeed_engine_then_resume_on_the_native_engine(
    tmp_path: Path, small_dataset: Path
) -> None:
    """`parallel.engine=deepspeed` (ZeRO-2, experts over ep2, 2 micro-batches per rank) through
    `torchrun -m trainer` on 4 ranks; its checkpoint then resumes on the native engine (FSDP)."""
    run_dir = tmp_path / "run"
    common = [
        *SMALL,
        f"run.dir={run_dir}",
        f"data.sources=[{{path:'{small_dataset}'}}]",
        "model.vocab_size=512",
        "train.global_batch_size=16",
        "logging.wandb_mode=disabled",
        "parallel.ep=2",
    ]
    deepspeed = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]
    first = run_torchrun(4, [*common, *deepspeed, "train.steps=4"], tmp_path)
    assert "layout dp=4 ep=2 tp=1 pp=1" in first.stdout and "2 micro-batches/step/rank" in first.stdout
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"

    second = run_torchrun(4, [*common, "train.steps=6"], tmp_path)
    assert "resumed from" in second.stdout and "steps            4 -> 6" in second.stdout
    val = records(run_dir, "val")
    assert val[-1]["val/loss"] < val[0]["val/loss"]
