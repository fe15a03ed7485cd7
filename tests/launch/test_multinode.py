"""Two torchrun agents on this machine act as two nodes (c10d rendezvous on 127.0.0.1), started
through launch/train_multi_node.sh: the tiny recipe trains as 2 nodes x 2 ranks, and a rank killed
mid-run (MOEFORGE_FAULT, trainer/fault.py) is restarted by the agents' restart policy
(--max-restarts 1) and the run resumes from its newest checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "recipe=tiny_cpu",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.val_batches=1",
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.val_every=0",
    "optim.warmup_steps=1",
    "model.vocab_size=512",
    "parallel.ep=2",  # dp 4 over the two nodes, experts sharded over 2 of them
    "logging.progress=false",
    "logging.wandb_mode=disabled",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> list[str]:
    """Start both agents, wait for both; return their outputs (each asserted to exit 0)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "NNODES": "2",
        "NPROC": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{os.getpid()}",
        **(extra_env or {}),
    }
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            ["bash", str(REPO / "launch/train_multi_node.sh"), *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
        for log in logs
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    return outs


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_two_agents_train_as_two_nodes(tmp_path: Path, small_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, f"run.dir={run_dir}", f"data.sources=[{{path:'{small_dataset}'}}]", "train.steps=3"]
    outs = two_nodes(args, tmp_path)
    text = "".join(outs)
    assert "layout dp=4 ep=2 tp=1 pp=1" in text
    assert text.count("moeforge run summary") == 1  # global rank 0 only, on one of the agents
    assert train_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-3"


@pytest.mark.slow
def test_killed_rank_is_restarted_and_resumes(tmp_path: Path, small_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        f"run.dir={run_dir}",
        f"data.sources=[{{path:'{small_dataset}'}}]",
        "train.steps=5",
        "checkpoint.save_every=2",
        "--max-restarts",
        "1",
    ]
    # SIGKILL global rank 1 in step 3 of the first attempt; step-2 is the newest checkpoint then.
    outs = two_nodes(args, tmp_path, {"MOEFORGE_FAULT": "kill@step=3,rank=1"})
    text = "".join(outs)
    assert "injecting fault kill@step=3 on rank 1" in text
    assert "resumed from" in text and "steps            2 -> 5" in text
    steps = train_steps(run_dir)
    assert steps[-3:] == [3, 4, 5] and steps.count(3) == 1  # step 3 never completed before the kill
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-5"
