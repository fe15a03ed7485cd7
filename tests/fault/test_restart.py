"""Acceptance 1: a 4-rank run (pp2 x dp2, experts over ep2) killed with SIGKILL at a random step,
or while a checkpoint is being written, and restarted by `torchrun --max-restarts=1` ends with
every model and optimizer tensor bitwise equal to an uninterrupted run of the same length.

The step is drawn at random; MOEFORGE_FAULT_SEED=<seed> (printed) repeats a draw."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.fault.launch import TINY, checkpoint_tensors, torchrun

STEPS, SAVE_EVERY = 8, 2


def job(run_dir: Path, dataset: Path) -> list[str]:
    return [
        *TINY,
        f"run.dir={run_dir}",
        f"data.sources=[{{path:'{dataset}'}}]",
        "parallel=pp2_ep2",
        f"train.steps={STEPS}",
        f"checkpoint.save_every={SAVE_EVERY}",
    ]


def draw(choices: list[int], what: str) -> int:
    seed = int(os.environ.get("MOEFORGE_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    choice = random.Random(seed).choice(choices)
    print(f"{what} {choice} (MOEFORGE_FAULT_SEED={seed} repeats it)")
    return choice


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    proc = torchrun(4, job(root / "run", small_dataset), root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return checkpoint_tensors(root / "run" / "checkpoints" / f"step-{STEPS}")


def killed_and_restarted(tmp_path: Path, dataset: Path, faults: str, resumed: int) -> dict[str, torch.Tensor]:
    proc = torchrun(4, job(tmp_path / "run", dataset), tmp_path, faults=faults, max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    action = faults.split(",")[0]
    assert f"moeforge: injecting fault {action} on rank 1" in proc.stderr  # it did die once
    if resumed:  # the second attempt went on from the newest complete checkpoint
        assert f"step-{resumed} (step {resumed})" in proc.stdout, proc.stdout
    return checkpoint_tensors(tmp_path / "run" / "checkpoints" / f"step-{STEPS}")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any(k.startswith("model.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.slow
def test_kill_at_a_random_step_then_restart_is_bitwise_exact(
    tmp_path: Path, small_dataset: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    step = draw(list(range(1, STEPS + 1)), "SIGKILL rank 1 in step")
    last_save = (step - 1) // SAVE_EVERY * SAVE_EVERY  # step N dies before its own save
    restarted = killed_and_restarted(tmp_path, small_dataset, f"kill@step={step},rank=1", last_save)
    assert_bitwise_equal(uninterrupted, restarted)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_then_restart_is_bitwise_exact(
    tmp_path: Path, small_dataset: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    """Rank 1 dies after writing its shards of checkpoint N, before the manifest: the partial
    `step-N.tmp` must not be resumed from; the previous checkpoint is."""
    step = draw(list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)), "SIGKILL rank 1 while saving step")
    restarted = killed_and_restarted(tmp_path, small_dataset, f"kill@save={step},rank=1", step - SAVE_EVERY)
    assert_bitwise_equal(uninterrupted, restarted)


COMPRESSED_RESTARTS = {
    "topk": (["parallel.compression.kind=topk", "parallel.compression.topk_ratio=0.05"], 0.25),
    # + PowerSGD's warm-start Q, int8 factors, and the optimizer fed factored second moments
    "powersgd_int8_factored": (
        [
            "parallel.compression.kind=powersgd",
            "parallel.compression.factor_bits=8",
            "parallel.compression.second_moment=factored",
        ],
        0.5,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(COMPRESSED_RESTARTS))
def test_compressed_run_restarts_bitwise_exact_with_its_error_feedback(
    tmp_path: Path, small_dataset: Path, setting: str
) -> None:
    """A compressor with error feedback over DDP (dp4, experts over ep2): each rank's unsent
    residual is in its `compressor-rank<r>.pt`, so a run killed after a checkpoint and restarted
    continues exactly; restarting the residuals from zero would change every later update."""
    options, max_ratio = COMPRESSED_RESTARTS[setting]
    compressed = [
        "parallel.pp=1",
        "parallel.ep=2",
        "parallel.dp_engine=ddp",
        "parallel.compression.warmup_steps=1",
        *options,
    ]
    runs = {}
    for name, faults in (("uninterrupted", ""), ("restarted", "kill@step=5,rank=1")):
        run_dir = tmp_path / name
        proc = torchrun(
            4, [*job(run_dir, small_dataset), *compressed], tmp_path, faults=faults, max_restarts=1
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = checkpoint_tensors(run_dir / "checkpoints" / f"step-{STEPS}")
    assert "step-4 (step 4)" in proc.stdout, proc.stdout  # the restart resumed from step 4
    saved = tmp_path / "uninterrupted" / "checkpoints" / f"step-{STEPS}"
    residuals = torch.load(saved / "compressor-rank1.pt", weights_only=True)["residuals"]
    assert residuals and all(r.abs().sum() > 0 for r in residuals.values())
    assert_bitwise_equal(runs["uninterrupted"], runs["restarted"])
    records = [
        json.loads(line) for line in (tmp_path / "restarted" / "metrics.jsonl").read_text().splitlines()
    ]
    ratios = [r["comm_ratio"] for r in records if r["kind"] == "train"]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), steps  # the steps redone after the restart appear once
    assert ratios[0] == 1.0 and 0 < ratios[-1] < max_ratio  # warm-up uncompressed, then compressed
