"""Checkpoints: round trip of every part, atomic directory protocol, keep-last, detection of
incomplete or corrupt checkpoints with fallback to the previous valid one, no unpickling, the CLI."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.checkpoint_state import make_state, params, save, two_checkpoints
from trainer.checkpoint import (
    CheckpointWriter,
    TrainProgress,
    latest_valid,
    restore,
    step_dirs,
)
from trainer.errors import ConfigError


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_restores_every_part(tmp_path: Path, async_save: bool) -> None:
    state = make_state(0)
    save(tmp_path, 1, state, async_save=async_save)
    expected_next = (torch.rand(3), random.random())
    fresh = make_state(1)
    step, path = latest_valid(tmp_path, report=pytest.fail)
    assert (step, path.name) == (1, "step-1")
    restore(fresh, path)
    for a, b in zip(params(state), params(fresh)):
        assert torch.equal(a, b)
    sa = state["model_optimizer"].optimizer.state_dict()["state"]
    sb = fresh["model_optimizer"].optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert fresh["scheduler"].last_epoch == 1 and fresh["progress"] == TrainProgress(0, 12)  # make_state(0)'s
    assert torch.equal(torch.rand(3), expected_next[0]) and random.random() == expected_next[1]


def test_async_save_captures_the_step_it_was_called_at(tmp_path: Path) -> None:
    state = make_state(0)
    before = params(state)
    writer = CheckpointWriter(tmp_path, keep_last=0, async_save=True)
    writer.save(1, state, {})
    with torch.no_grad():  # training goes on while the save runs
        for p in state["model_optimizer"].container.parameters():
            p.add_(1.0)
    writer.wait()
    fresh = make_state(1)
    restore(fresh, latest_valid(tmp_path, report=pytest.fail)[1])
    assert all(torch.equal(a, b) for a, b in zip(before, params(fresh)))


def test_manifest_latest_and_keep_last(tmp_path: Path) -> None:
    state = make_state()
    for step in (2, 4, 6, 8):
        save(tmp_path, step, state, keep_last=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [6, 8]
    assert (tmp_path / "latest").read_text().strip() == "step-8"
    manifest = json.loads((tmp_path / "step-8" / "manifest.json").read_text())
    assert manifest["step"] == 8 and manifest["tokens"] == 80
    assert {"sharded/.metadata.json", "scheduler.pt", "rng-rank0.pt"} <= set(manifest["files"])
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    assert latest_valid(tmp_path / "none", report=pytest.fail) is None


def _truncate(path: Path) -> None:
    victim = path / "sharded" / "__0_0.distcp"
    victim.write_bytes(victim.read_bytes()[:-10])


def _flip_byte(path: Path) -> None:
    victim = path / "sharded" / "__0_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


def _drop_manifest(path: Path) -> None:
    (path / "manifest.json").unlink()


def _stale_tmp(path: Path) -> None:
    # A save killed before its rename: step-6.tmp exists (newest), step-4 is intact.
    (path.parent / "step-6.tmp" / "sharded").mkdir(parents=True)
    (path.parent / "step-6.tmp" / "scheduler.pt").write_bytes(b"half")


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "flipped_byte": (_flip_byte, "checksum"),
    "missing_manifest": (_drop_manifest, "no manifest.json"),
    "stale_tmp": (_stale_tmp, "incomplete"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_reported_and_resume_falls_back(tmp_path: Path, kind: str) -> None:
    good, _ = two_checkpoints(tmp_path, 2, 4)
    damage, expected_word = CORRUPTIONS[kind]
    damage(tmp_path / "step-4")

    reports: list[str] = []
    found = latest_valid(tmp_path, report=reports.append)
    expected_step = 4 if kind == "stale_tmp" else 2  # a stale .tmp is newer than the intact step-4
    assert found is not None and found[0] == expected_step
    assert len(reports) == 1 and "\n" not in reports[0] and expected_word in reports[0], reports
    if expected_step == 2:
        fresh = make_state(1)
        restore(fresh, found[1])
        assert all(torch.equal(a, b) for a, b in zip(good, params(fresh)))


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path, 1, make_state(0))
    assert not list(tmp_path.rglob(".metadata"))  # DCP's pickled index is not written

    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint file was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    restore(make_state(1), latest_valid(tmp_path, report=pytest.fail)[1])


def test_shape_mismatch_is_one_line(tmp_path: Path) -> None:
    save(tmp_path, 1, make_state())
    other = make_state(hidden=16)
    with pytest.raises(ConfigError, match=r"checkpoint.dir.*0.weight of shape \[8, 4\].*\[16, 4\]"):
        restore(other, tmp_path / "step-1")


@pytest.mark.slow
def test_cli_list_verify_convert(tmp_path: Path) -> None:
    state = make_state(0)
    save(tmp_path, 1, state)
    save(tmp_path, 2, state)
    _flip_byte(tmp_path / "step-1")
    cli = [sys.executable, "-m", "trainer.checkpoint"]
    listing = subprocess.run([*cli, "list", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "step-2" in listing.stdout and "<- latest" in listing.stdout
    verify = subprocess.run([*cli, "verify", str(tmp_path)], capture_output=True, text=True)
    assert verify.returncode == 1 and "step-1" in verify.stdout and "checksum" in verify.stdout
    out = tmp_path / "model.pt"
    subprocess.run([*cli, "convert", str(tmp_path / "step-2"), str(out)], check=True, capture_output=True)
    weights = torch.load(out, weights_only=True)
    model = state["model_optimizer"].container[0]
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_compressor_residuals_round_trip_only_at_the_same_layout() -> None:
    from parallel.compression import build_compressor
    from trainer.checkpoint import CompressorState

    saved = build_compressor("topk", topk_ratio=0.25)
    saved.all_reduce_sum(torch.randn(8, 4), None, "w")  # leaves 3/4 of the entries unsent
    saved.step()
    state = CompressorState(saved, (2, 1, 1, 2)).state_dict()
    same, other = build_compressor("topk", topk_ratio=0.25), build_compressor("topk", topk_ratio=0.25)
    CompressorState(same, (2, 1, 1, 2)).load_state_dict(state)
    CompressorState(other, (4, 1, 1, 2)).load_state_dict(state)
    assert (
        torch.equal(same.residuals["w"], saved.residuals["w"]) and same.residuals["w"].count_nonzero() == 24
    )
    assert other.residuals == {} and other.steps_done == same.steps_done == 1
