"""The workspace every bad-input case starts from, built once and copied per case: a prepared
dataset (`ds`), a run trained for 2 steps with its checkpoint (`run`), a regular file (`file`) and
a dangling symlink (`dangling`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The trainer overrides of the workspace's run; cases add theirs after these.
BASE = [
    "recipe=tiny_cpu",
    "model.vocab_size=512",
    "model.dim=64",
    "model.ffn_hidden=128",
    "model.moe.moe_ffn_hidden=64",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.val_batches=1",
    "train.global_batch_size=4",
    "train.steps=2",
    "optim.warmup_steps=1",
    "logging.progress=false",
    "logging.wandb_mode=disabled",
    "run.dir={run}",
    "data.sources=[{path:'{ds}'}]",
]


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path) -> Path:
    from tests.edges.harness import fill
    from trainer.compose import load_config
    from trainer.trainer import Trainer

    ws = tmp_path_factory.mktemp("edges") / "ws"
    ws.mkdir()
    shutil.copytree(small_dataset, ws / "ds")
    Trainer(load_config([fill(a, ws) for a in BASE])).train()
    (ws / "file").write_text("a regular file\n")
    os.symlink(ws / "nowhere", ws / "dangling")
    return ws


@pytest.fixture
def ws(workspace_template: Path, tmp_path: Path) -> Path:
    """A private copy of the workspace (its absolute paths rewritten: the checkpoint's config
    names the template's run dir, which no case reads)."""
    out = tmp_path / "ws"
    shutil.copytree(workspace_template, out, symlinks=True)
    os.remove(out / "dangling")
    os.symlink(out / "nowhere", out / "dangling")
    return out
