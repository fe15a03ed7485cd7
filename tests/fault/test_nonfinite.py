"""Non-finite steps in one process: a NaN step is skipped (no update, counted, the data cursor
moves on), K skips in a row roll back to the last checkpoint, too many rollbacks stop the run; plus
the fault-injection spec parser and the watchdog's exit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, fault
from trainer.compose import load_config
from trainer.fault import FaultError, parse_faults
from trainer.trainer import Trainer


def cfg(run_dir: Path, dataset: Path, steps: int, *extra: str):
    return load_config(
        [
            f"data.sources=[{{path:'{dataset}'}}]",
            "data.seq_len=32",
            "data.micro_batch_size=2",
            "data.val_batches=1",
            "train.global_batch_size=4",
            f"train.steps={steps}",
            "train.log_every=1",
            "train.val_every=0",
            "optim.warmup_steps=1",
            "model.vocab_size=512",
            "model.dim=32",
            "model.num_layers=2",
            "model.ffn_hidden=64",
            "model.moe.num_experts=4",
            "model.moe.moe_ffn_hidden=16",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
            f"run.dir={run_dir}",
            *extra,
        ]
    )


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch):
    def set_faults(spec: str) -> None:
        monkeypatch.setenv(fault.ENV, spec)
        fault.reset_injection()

    yield set_faults
    fault.reset_injection()


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.pm.parts[0].state_dict().items()}


def test_nan_step_is_skipped(tmp_path: Path, small_dataset: Path, inject) -> None:
    inject("nan@step=2")
    trainer = Trainer(cfg(tmp_path, small_dataset, 4))
    assert not trainer.train_step().skipped
    before, lr_step = params(trainer), trainer.scheduler.last_epoch
    adam_steps = [float(s["step"]) for s in trainer.optimizer.state.values()]
    cursor = trainer.train_loader.state_dict()["consumed_samples"]

    result = trainer.train_step()
    assert result.skipped and not torch.isfinite(result.losses.total)
    assert trainer.progress.step == 2 and trainer.progress.skipped_steps == 1
    after = params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"
    assert trainer.scheduler.last_epoch == lr_step  # the LR schedule runs on updates
    assert [float(s["step"]) for s in trainer.optimizer.state.values()] == adam_steps
    assert all(p.grad is None for p in trainer.pm.parameters())
    assert trainer.train_loader.state_dict()["consumed_samples"] == cursor + 4  # the batch is gone

    assert not trainer.train_step().skipped  # the next step trains again
    assert all(torch.isfinite(v).all() for v in params(trainer).values())
    assert trainer.progress.state_dict()["skipped_steps"] == 1  # saved with the checkpoint


@pytest.mark.slow
def test_consecutive_skips_roll_back_and_keep_the_data_cursor(
    tmp_path: Path, small_dataset: Path, inject, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject("nan@step=4;nan@step=5")
    job = cfg(
        tmp_path,
        small_dataset,
        8,
        "checkpoint.save_every=2",
        "checkpoint.keep_last=10",
        "fault.max_consecutive_skips=2",
    )
    rolled_back: list[tuple[Path, dict[str, torch.Tensor]]] = []
    rollback = Trainer.rollback

    def spy(self: Trainer) -> Path:
        path = rollback(self)
        rolled_back.append((path, params(self)))
        return path

    monkeypatch.setattr(Trainer, "rollback", spy)
    trainer = Trainer(job)
    summary = trainer.train()

    # Steps 4 and 5 skipped -> no checkpoint at step 4 (mid-streak) -> back to step-2, then 3..8.
    assert summary.final_step == 8 and trainer.progress.rollbacks == 1
    assert trainer.progress.skipped_steps == 2
    [(path, weights)] = rolled_back
    assert path.name == "step-2"  # step 4 was not saved while skipping
    reference = Trainer(job)
    checkpoint.restore(reference.state(), path)  # what step-2 holds
    assert all(torch.equal(weights[k], v) for k, v in params(reference).items())
    # 5 batches, rollback, 6 more (steps 3..8): the bad batches were not replayed.
    assert trainer.train_loader.state_dict()["consumed_samples"] == 11 * 4
    assert all(torch.isfinite(v).all() for v in params(trainer).values())
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    last = [json.loads(line) for line in lines if '"kind": "train"' in line][-1]
    assert (last["step"], last["skipped_steps"], last["rollbacks"]) == (8, 2, 1)


def test_too_many_rollbacks_stop_with_one_line(tmp_path: Path, small_dataset: Path, inject) -> None:
    inject("nan@step=3;nan@step=4")
    job = cfg(
        tmp_path,
        small_dataset,
        6,
        "checkpoint.save_every=2",
        "fault.max_consecutive_skips=1",
        "fault.max_rollbacks=1",
    )
    with pytest.raises(FaultError) as err:
        Trainer(job).train()
    message = str(err.value)
    assert "\n" not in message and "fault.max_rollbacks=1" in message and "step 4" in message


def test_fault_specs() -> None:
    assert parse_faults("kill@step=7,rank=1; nan@step=3;kill@save=4,attempt=1") == [
        fault.Fault("kill", "step", 7, rank=1),
        fault.Fault("nan", "step", 3),
        fault.Fault("kill", "save", 4, attempt=1),
    ]
    for bad in ("explode@step=1", "nan@save=2", "kill@step=x", "kill@step=1,color=red", "kill"):
        with pytest.raises(ValueError, match="MOEFORGE_FAULT") as err:
            parse_faults(bad)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_watchdog_ends_a_stuck_process_with_one_line() -> None:
    code = (
        "import time\n"
        "from trainer.fault import Watchdog\n"
        "with Watchdog(0.5, rank=3) as w:\n"
        "    w.pet('step 1: forward/backward')\n"
        "    w.pet('step 2: forward/backward')\n"
        "    time.sleep(30)\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == fault.EXIT_STUCK and time.monotonic() - start < 20
    assert proc.stderr.strip() == (
        "moeforge: rank 3 stuck in step 2: forward/backward for 0.5 s (collective timeout); aborting"
    )


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops(tmp_path: Path, small_dataset: Path) -> None:
    """A preempted run (SIGTERM) saves a valid checkpoint of the step it reached and exits 0; the
    same command then resumes from there."""
    import signal
    import subprocess
    import sys
    import time

    from trainer.checkpoint import latest_valid

    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "trainer",
        "recipe=tiny_cpu",
        f"run.dir={run_dir}",
        f"data.sources=[{{path:'{small_dataset}'}}]",
        "model.vocab_size=512",
        "data.seq_len=32",
        "data.micro_batch_size=2",
        "train.global_batch_size=2",
        "train.steps=100000",
        "train.log_every=1",
        "train.val_every=0",
        "data.val_batches=1",
        "optim.warmup_steps=1",
        "logging.progress=false",
        "logging.wandb_mode=disabled",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"train"') < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "preempted" in out
    found = latest_valid(run_dir / "checkpoints", report=pytest.fail)
    assert found is not None and 3 <= found[0] < 100000
