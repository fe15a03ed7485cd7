"""Two torchrun agents on this machine acting as two nodes, started through
launch/train_multi_node.sh (c10d rendezvous), for tests/launch/test_multinode.py (loopback) and
tests/launch/test_netns.py (one network namespace per agent)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.fault.launch import TINY

REPO = Path(__file__).resolve().parents[2]
# The fault tests' 4-rank tiny job, its dp 4 spread over the two nodes with experts over 2 of them.
SMALL = [*TINY, "parallel.ep=2"]


@dataclass
class Node:
    """How one agent is started: a command prefix (e.g. `ip netns exec NAME`) and extra env."""

    prefix: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(
    args: list[str],
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    master_addr: str = "127.0.0.1",
    nodes: Sequence[Node] = (Node(), Node()),
) -> list[str]:
    """Start both agents, wait for both; return their outputs (each asserted to exit 0)."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "NNODES": "2",
        "NPROC": "2",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(free_port()),
        "RDZV_ID": f"test-{os.getpid()}",
        **(extra_env or {}),
    }
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [*node.prefix, "bash", str(REPO / "launch/train_multi_node.sh"), *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**env, **node.env},
            cwd=tmp_path,
        )
        for node, log in zip(nodes, logs)
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


def assert_trained_three_steps(outs: list[str], run_dir: Path) -> None:
    """The SMALL run with train.steps=3 went through on 2 x 2 ranks."""
    text = "".join(outs)
    assert "layout dp=4 ep=2 tp=1 pp=1" in text
    assert text.count("moeforge run summary") == 1  # global rank 0 only, on one of the agents
    assert train_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-3"
