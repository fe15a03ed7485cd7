"""One writer per run (issue 14): a run directory held by a live job refuses a second job, the
workers of a SIGKILLed torchrun agent stop instead of training on alone, and a time-dependent
`run.dir` (`${now:...}`) names one directory for every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault.launch import ROOT, TINY, checkpoint_tensors, torchrun
from tests.fault.test_restart import assert_bitwise_equal, job
from trainer.checkpoint import latest_valid, verify

LONG = 40  # steps: test_restart's job (pp2 x dp2, ep2, a checkpoint every 2) run long enough to be
# probed and killed mid-way


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _train_records(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0


def _torchrun_popen(nproc: int, args: list[str], cwd: Path) -> subprocess.Popen:
    """Output to files: orphaned workers must never block on a pipe nobody reads."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["--monitor-interval=0.5", "-m", "trainer", *args]
    with open(cwd / "first.out", "w") as out, open(cwd / "first.err", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)


def _listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkilled_agent_leaves_no_worker_behind_and_a_second_job_is_refused(
    tmp_path: Path, small_dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    args = [*job(run_dir, small_dataset), "fault.collective_timeout_s=20", f"train.steps={LONG}"]
    first = _torchrun_popen(4, args, tmp_path)
    deadline = time.time() + 240
    while _train_records(run_dir) < 3 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]

    # A second job on the live run's directory: one line, exit 2, nothing written.
    hydra_before = _listing(run_dir / ".hydra")
    second = subprocess.run(
        ["bash", "launch/train_one_node.sh", *args],
        cwd=ROOT,
        env={**os.environ, "NPROC": "4", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by a live job" in lines[0] and "Traceback" not in second.stderr, (
        lines
    )
    assert _listing(run_dir / ".hydra") == hydra_before

    workers = _children(first.pid)
    assert len(workers) == 4, workers
    first.send_signal(signal.SIGKILL)  # the agent only: nothing forwards a signal to its workers
    killed_at = time.time()
    bound_s = 20 + 15  # the collective timeout plus a step, its checkpoint and the exit, with margin
    while any(_alive(w) for w in workers) and time.time() < killed_at + bound_s:
        time.sleep(0.2)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their agent by {time.time() - killed_at:.0f} s"
    first.wait()
    assert "the torchrun agent" in (tmp_path / "first.err").read_text()

    # The workers checkpointed where they stopped; rerunning the same command finishes the run.
    found = latest_valid(run_dir / "checkpoints", report=pytest.fail)
    assert found is not None and 0 < found[0] < LONG and verify(found[1]) is None
    rerun = torchrun(4, args, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"step-{found[0]} (step {found[0]})" in rerun.stdout, rerun.stdout[-2000:]
    straight = torchrun(4, [*job(tmp_path / "straight", small_dataset), *args[-2:]], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_bitwise_equal(
        checkpoint_tensors(tmp_path / "straight" / "checkpoints" / f"step-{LONG}"),
        checkpoint_tensors(run_dir / "checkpoints" / f"step-{LONG}"),
    )


@pytest.mark.slow
def test_time_dependent_run_dir_is_one_directory_for_every_rank(tmp_path: Path, small_dataset: Path) -> None:
    """Each rank would resolve `${now:...}` itself, at its own microsecond: rank 0 resolves it once,
    and the checkpoint, with every rank's shards, lands in one directory that verify accepts."""
    args = [*TINY, "run.dir=runs/x_${now:%H%M%S_%f}", f"data.sources=[{{path:'{small_dataset}'}}]"]
    proc = torchrun(2, [*args, "parallel.ep=2", "train.steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    step = run_dir / "checkpoints" / "step-2"
    assert verify(step) is None
    assert sorted(p.name for p in (step / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    check = checkpoint_cli("verify", step)
    assert check.returncode == 0 and "ok" in check.stdout, check.stdout + check.stderr
    convert = checkpoint_cli("convert", step, tmp_path / "model.pt")
    assert convert.returncode == 0 and (tmp_path / "model.pt").is_file(), convert.stderr
    (step / "sharded" / "__1_0.distcp").unlink()  # one rank's shard lost (no shared file system)
    check = checkpoint_cli("verify", step)
    assert check.returncode == 1 and "__1_0.distcp" in check.stdout, check.stdout + check.stderr


def checkpoint_cli(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.checkpoint", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
