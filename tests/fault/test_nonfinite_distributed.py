"""A NaN on one rank only skips the step on every rank; too many skips stop a torchrun job with
one line from `python -m trainer` (exit code 1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.fault.launch import tiny_job, torchrun


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_everywhere_then_the_job_stops(
    tmp_path: Path, small_dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_job(
        run_dir,
        small_dataset,
        "parallel.ep=2",  # dp2, experts over ep2
        "train.steps=6",
        "checkpoint.save_every=2",
        "fault.max_consecutive_skips=2",
        "fault.max_rollbacks=0",
    )
    proc = torchrun(2, args, tmp_path, faults="nan@step=3,rank=1;nan@step=4,rank=1", timeout=120)
    assert proc.returncode != 0
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("moeforge: training stopped:")]
    assert stopped == [
        "moeforge: training stopped: 2 non-finite steps in a row at step 4 after 0 rollbacks "
        "(fault.max_rollbacks=0); stopping (lower optim.lr, check the data, or raise fault.max_rollbacks)"
    ], proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    # Rank 0 (which writes the metrics) had finite values of its own and skipped too.
    assert train[2]["skipped_steps"] == 0 and math.isfinite(train[2]["loss"])
    assert train[3]["skipped_steps"] == 1 and not math.isfinite(train[3]["grad_norm"])
