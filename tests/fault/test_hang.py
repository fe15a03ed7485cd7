"""Acceptance 4: one rank of a 4-rank job stops participating; the others are blocked in a
collective. Within `fault.collective_timeout_s` every rank still alive ends with one line naming
its rank and the phase it was stuck in, torchrun exits non-zero, and no process is left behind."""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
import pytest

from tests.fault.launch import tiny_job, torchrun

TIMEOUT_S = 10
PHASE = r"step 3: (?:forward/backward|grad norm/optimizer)"
STUCK = rf"moeforge: rank (\d) stuck in ({PHASE}) for {TIMEOUT_S} s \(collective timeout\); aborting"
FAILED = rf"moeforge: rank (\d) failed in ({PHASE}): .*Connection closed by peer.*"  # its peer ended


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.mark.slow
def test_a_rank_that_stops_participating_ends_the_job_with_one_line(
    tmp_path: Path, small_dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    args = tiny_job(
        run_dir, small_dataset, "parallel=pp2_ep2", "train.steps=6", f"fault.collective_timeout_s={TIMEOUT_S}"
    )
    start = time.monotonic()
    proc = torchrun(4, args, tmp_path, faults="hang@step=3,rank=2", timeout=120)
    elapsed = time.monotonic() - start

    assert proc.returncode != 0
    assert "moeforge: injecting fault hang@step=3 on rank 2" in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moeforge: rank")]
    # The rank that stopped is stuck in its forward/backward and times out first; the others wait
    # for it in the next phase's collectives and time out too, or see it exit, or are stopped by
    # torchrun first.
    assert f"moeforge: rank 2 stuck in step 3: forward/backward for {TIMEOUT_S} s" in proc.stderr, lines
    assert all(re.fullmatch(STUCK, line) or re.fullmatch(FAILED, line) for line in lines), lines
    # Start-up (~10 s on 2 cores) + 2 steps + the timeout + torchrun's teardown; a hang is 120 s.
    assert elapsed < 30 + TIMEOUT_S + 15, elapsed
    assert not processes_mentioning(str(run_dir)), "processes of the job are still running"
