"""A disk that fills during a 2-rank save (issue 14): the write fails on rank 1 with ENOSPC after
its shards are written; every rank stops with one line naming checkpoint.dir and the cause, the
half-written step is removed, and the previous checkpoint stays the valid latest one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.launch import tiny_job, torchrun
from trainer.checkpoint import latest_valid, verify


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, small_dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_job(run_dir, small_dataset, "parallel.ep=2", "train.steps=4", "checkpoint.save_every=2")
    proc = torchrun(2, args, tmp_path, faults="enospc@save=4,rank=1")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("moeforge: config error")]
    assert len(ours) == 1, proc.stderr[-3000:]
    assert "checkpoint.dir" in ours[0] and "No space left on device" in ours[0] and "step 4" in ours[0], ours
    # Our workers print no traceback (torchrun's own failure report follows our line).
    assert "trainer/checkpoint" not in proc.stderr and "OSError" not in proc.stderr, proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / "step-4.tmp").exists() and not (ckpts / "step-4").exists()
    found = latest_valid(ckpts, report=pytest.fail)
    assert found is not None and found[0] == 2 and verify(found[1]) is None
    assert (ckpts / "latest").read_text().strip() == "step-2"
