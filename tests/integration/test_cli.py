"""End to end through the real entry points: `python -m trainer recipe=tiny_cpu ...` trains, logs,
checkpoints and prints a summary, and a second run with more steps resumes where the first
stopped; `torchrun -m trainer` does the same on 4 ranks, resuming at another parallel layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_train_then_resume(tmp_path: Path, default_corpus_cache: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*SMALL, f"run.dir={run_dir}", f"data.cache_dir={default_corpus_cache}"]

    first = run_trainer([*common, "train.steps=6", "logging.wandb_mode=offline"], tmp_path)
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
    assert list((run_dir / "wandb").glob("offline-run-*"))

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
    first = run_torchrun(4, [*common, "parallel=pp2_ep2", "train.steps=4"], tmp_path)
    assert "layout dp=2 ep=2 tp=1 pp=2" in first.stdout
    assert first.stdout.count("moeforge run summary") == 1  # rank 0 only
    val = records(run_dir, "val")
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-4"

    second = run_torchrun(4, [*common, "parallel.tp=2", "parallel.ep=2", "train.steps=6"], tmp_path)
    assert "layout dp=2 ep=2 tp=2 pp=1" in second.stdout
    assert "resumed from" in second.stdout and "steps            4 -> 6" in second.stdout
    assert records(run_dir, "train")[-1]["step"] == 6
