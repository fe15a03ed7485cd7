"""Two torchrun agents on this machine act as two nodes (c10d rendezvous on 127.0.0.1), started
through launch/train_multi_node.sh: the tiny recipe trains as 2 nodes x 2 ranks, and a rank killed
mid-run (MOEFORGE_FAULT, trainer/fault.py) is restarted by the agents' restart policy
(--max-restarts 1) and the run resumes from its newest checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch.nodes import SMALL, assert_trained_three_steps, train_steps, two_nodes


@pytest.mark.slow
def test_two_agents_train_as_two_nodes(tmp_path: Path, small_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*SMALL, f"run.dir={run_dir}", f"data.sources=[{{path:'{small_dataset}'}}]", "train.steps=3"]
    assert_trained_three_steps(two_nodes(args, tmp_path), run_dir)


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
