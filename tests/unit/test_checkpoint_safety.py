"""Checkpoints read as untrusted: paths that leave the checkpoint are refused before anything
outside is opened, manifest and DCP index fields are type-checked, pickles are refused in one
line, resume skips links, misnamed and unloadable checkpoints, the CLI answers bad input in one
line with exit code 2, and a save that runs out of space is one line and leaves nothing behind."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.checkpoint_state import make_state, params, save, two_checkpoints
from trainer.checkpoint import (
    CheckpointError,
    ShardedModelOptimizer,
    TrainProgress,
    check_free_space,
    latest_valid,
    manager,
    restore,
    restore_latest,
    state_bytes,
    verify,
)
from trainer.checkpoint.__main__ import main as cli
from trainer.checkpoint.storage import JsonFileSystemWriter
from trainer.config import OptimConfig
from trainer.errors import ConfigError
from trainer.optim import build_optimizer

SHARD = "sharded/__0_0.distcp"
INDEX = "sharded/.metadata.json"


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def entry(file: Path) -> dict[str, Any]:
    return {"bytes": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}


def rehash(path: Path, rel: str) -> None:
    """Make the manifest agree with `rel` again, as a forger would."""
    edit_manifest(path, lambda m: m["files"].__setitem__(rel, entry(path / rel)))


def edit_index(path: Path, change) -> None:
    index = json.loads((path / INDEX).read_text())
    change(index)
    (path / INDEX).write_text(json.dumps(index))
    rehash(path, INDEX)


# ---- paths outside the checkpoint ----------------------------------------------------------------


def _manifest_dotdot(ckpt: Path, outside: Path) -> None:
    edit_manifest(ckpt, lambda m: m["files"].__setitem__("../../outside/shard", entry(outside / "shard")))


def _manifest_absolute(ckpt: Path, outside: Path) -> None:
    edit_manifest(ckpt, lambda m: m["files"].__setitem__(str(outside / "shard"), entry(outside / "shard")))


def _set_storage_paths(ckpt: Path, path: str) -> None:
    edit_index(ckpt, lambda index: [s.__setitem__("path", path) for s in index["storage"]])


def _index_dotdot(ckpt: Path, outside: Path) -> None:
    _set_storage_paths(ckpt, "../../../outside/shard")


def _index_absolute(ckpt: Path, outside: Path) -> None:
    _set_storage_paths(ckpt, str(outside / "shard"))


def _linked(ckpt: Path, rel: str, target: Path) -> None:
    victim = ckpt / rel
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    victim.symlink_to(target)


OUTSIDE = {  # each leaves the manifest's sizes and checksums right, so a naive check passes
    "manifest_dotdot": _manifest_dotdot,
    "manifest_absolute": _manifest_absolute,
    "index_dotdot": _index_dotdot,
    "index_absolute": _index_absolute,
    "linked_shard": lambda ckpt, outside: _linked(ckpt, SHARD, outside / "shard"),
    "linked_part": lambda ckpt, outside: _linked(ckpt, "progress.pt", outside / "progress.pt"),
    "linked_sharded_dir": lambda ckpt, outside: _linked(ckpt, "sharded", outside / "sharded"),
    "linked_manifest": lambda ckpt, outside: _linked(ckpt, "manifest.json", outside / "manifest.json"),
}


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The real path of every file opened from Python (builtins.open, io.open, os.open)."""
    seen: list[str] = []

    def recording(original):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                seen.append(os.path.realpath(file))
            return original(file, *args, **kwargs)

        return wrapper

    for owner, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    return seen


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_paths_outside_the_checkpoint_are_refused_without_opening_them(
    tmp_path: Path, kind: str, opened: list[str], capsys: pytest.CaptureFixture
) -> None:
    root, outside = tmp_path / "ckpt", tmp_path / "outside"
    first, ckpt = two_checkpoints(root)
    shutil.copytree(ckpt, outside)  # the real files, right sizes and checksums, outside
    shutil.copy(ckpt / SHARD, outside / "shard")
    OUTSIDE[kind](ckpt, outside)
    opened.clear()

    problem = verify(ckpt)
    assert problem is not None and "\n" not in problem
    assert any(w in problem for w in ("outside the checkpoint", "symbolic link", "absolute")), problem
    reports: list[str] = []
    fresh = make_state(5)
    assert restore_latest(fresh, root, reports.append) == (1, root / "step-1")
    assert len(reports) == 1 and "step-2" in reports[0] and problem in reports[0], reports
    assert all(torch.equal(a, b) for a, b in zip(first, params(fresh)))
    if not kind.startswith("manifest") and kind != "linked_manifest":  # restore reads no manifest
        with pytest.raises(CheckpointError) as refused:
            restore(make_state(5), ckpt)  # called directly, restore checks the paths it opens too
        assert "\n" not in str(refused.value) and "checkpoint.dir" in str(refused.value)

    assert cli(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{ckpt}: {problem}" in out and f"{root / 'step-1'}: ok" in out
    assert cli(["convert", str(ckpt), str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeforge: ") and not (tmp_path / "model.pt").exists()
    assert [p for p in opened if Path(p).is_relative_to(outside)] == []


# ---- manifest and index fields ------------------------------------------------------------------

MANIFEST_FIELDS = {
    "format_string": (lambda m: m.__setitem__("format", "1"), "format"),
    "format_newer": (lambda m: m.__setitem__("format", 7), "format 7"),
    "step_string": (lambda m: m.__setitem__("step", "2"), "step"),
    "world_size_zero": (lambda m: m.__setitem__("world_size", 0), "world_size"),
    "files_list": (lambda m: m.__setitem__("files", []), "files"),
    "bytes_negative": (lambda m: m["files"]["progress.pt"].__setitem__("bytes", -1), "progress.pt"),
    "sha_short": (lambda m: m["files"]["progress.pt"].__setitem__("sha256", "abc"), "progress.pt"),
    "layout_list": (lambda m: m.__setitem__("layout", [1]), "layout"),
    "not_an_object": (lambda m: m.clear() or m.__setitem__("x", 1), "format"),
}


@pytest.mark.parametrize("kind", sorted(MANIFEST_FIELDS))
def test_manifest_fields_are_type_checked(tmp_path: Path, kind: str) -> None:
    ckpt = save(tmp_path, 1, make_state())
    change, word = MANIFEST_FIELDS[kind]
    edit_manifest(ckpt, change)
    problem = verify(ckpt)
    assert problem is not None and "\n" not in problem and "manifest.json" in problem and word in problem


INDEX_FIELDS = {
    "dtype_not_a_dtype": (
        lambda i: next(iter(i["tensors"].values())).__setitem__("dtype", "Tensor"),
        "dtype",
    ),
    "dtype_dunder": (lambda i: next(iter(i["tensors"].values())).__setitem__("dtype", "__class__"), "dtype"),
    "dtype_list": (lambda i: next(iter(i["tensors"].values())).__setitem__("dtype", ["float32"]), "dtype"),
    "size_strings": (lambda i: next(iter(i["tensors"].values())).__setitem__("size", ["a"]), "size"),
    "chunk_outside": (
        lambda i: next(iter(i["tensors"].values()))["chunks"][0][0].__setitem__(0, 99),
        "chunk",
    ),
    "byte_offset_negative": (lambda i: i["storage"][0].__setitem__("byte_offset", -1), "byte_offset"),
    "length_past_the_file": (lambda i: i["storage"][0].__setitem__("length", 10**9), "reaches byte"),
    "fqn_unknown": (lambda i: i["storage"][0].__setitem__("fqn", "nope"), "names no tensor"),
    "tensors_list": (lambda i: i.__setitem__("tensors", []), "tensors"),
    "path_missing": (lambda i: i["storage"][0].__setitem__("path", "__9_9.distcp"), "missing"),
}


@pytest.mark.parametrize("kind", sorted(INDEX_FIELDS))
def test_dcp_index_fields_are_type_checked(tmp_path: Path, kind: str) -> None:
    ckpt = save(tmp_path, 1, make_state())
    change, word = INDEX_FIELDS[kind]
    edit_index(ckpt, change)
    problem = verify(ckpt)
    assert problem is not None and "\n" not in problem and ".metadata.json" in problem and word in problem
    with pytest.raises(CheckpointError, match=word):
        restore(make_state(), ckpt)


def test_verify_checks_every_shard_the_index_names(tmp_path: Path) -> None:
    ckpt = save(tmp_path, 1, make_state())
    edit_manifest(ckpt, lambda m: m["files"].pop(SHARD))  # rank 0 did not see this rank's shards
    assert verify(ckpt) == f"{INDEX} names {SHARD}, which manifest.json does not list"
    (ckpt / SHARD).unlink()
    assert "__0_0.distcp" in verify(ckpt) and "missing" in verify(ckpt)


def test_manifest_step_must_match_the_directory_name(tmp_path: Path) -> None:
    two_checkpoints(tmp_path)
    (tmp_path / "step-2").rename(tmp_path / "step-5")
    reports: list[str] = []
    assert latest_valid(tmp_path, reports.append) == (1, tmp_path / "step-1")
    assert len(reports) == 1 and "step-5" in reports[0] and "says step 2" in reports[0]


# ---- small parts that are not weights-only -------------------------------------------------------


class Payload:
    """Stands for arbitrary code in a pickle: it must never be rebuilt."""

    rebuilt = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        Payload.rebuilt = True


def _pickle_in(ckpt: Path, rel: str) -> None:
    torch.save({"step": 1, "tokens": 2, "payload": Payload()}, ckpt / rel)
    rehash(ckpt, rel)  # it verifies: the forger updated the manifest


def test_a_part_holding_pickled_objects_is_one_line(tmp_path: Path) -> None:
    ckpt = save(tmp_path, 1, make_state())
    _pickle_in(ckpt, "rng-rank0.pt")
    assert verify(ckpt) is None
    with pytest.raises(CheckpointError) as e:
        restore(make_state(), ckpt)
    message = str(e.value)
    assert "\n" not in message and message.startswith("checkpoint.dir: ") and "rng-rank0.pt" in message
    assert "is not a weights-only file (it holds pickled objects)" in message
    assert "checkpoint.resume=false" in message and not Payload.rebuilt


def test_an_unreadable_part_is_one_line(tmp_path: Path) -> None:
    ckpt = save(tmp_path, 1, make_state())
    (ckpt / "scheduler.pt").write_bytes((ckpt / "scheduler.pt").read_bytes()[:40])
    rehash(ckpt, "scheduler.pt")
    with pytest.raises(CheckpointError, match=r"scheduler.pt cannot be read \(") as e:
        restore(make_state(), ckpt)
    assert "\n" not in str(e.value)


def test_resume_falls_back_past_a_checkpoint_that_does_not_load(tmp_path: Path) -> None:
    first, ckpt = two_checkpoints(tmp_path)
    _pickle_in(ckpt, "progress.pt")
    reports: list[str] = []
    fresh = make_state(5)
    assert restore_latest(fresh, tmp_path, reports.append) == (1, tmp_path / "step-1")
    assert len(reports) == 1 and "step-2 cannot be loaded" in reports[0] and "progress.pt" in reports[0]
    assert all(torch.equal(a, b) for a, b in zip(first, params(fresh)))
    assert fresh["progress"] == TrainProgress(1, 12) and not Payload.rebuilt

    shutil.rmtree(tmp_path / "step-1")  # nothing left that loads: one line, not a fresh start
    with pytest.raises(CheckpointError, match="no checkpoint can be loaded.*progress.pt") as e:
        restore_latest(make_state(5), tmp_path, reports.append)
    assert "\n" not in str(e.value) and "checkpoint.resume=false" in str(e.value)
    assert restore_latest(make_state(5), tmp_path / "none", pytest.fail) is None


class OtherData:
    """A part that refuses the saved state, as the data loader does for another data config."""

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": torch.tensor(3)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise ValueError("data: the saved position is for other data")


@pytest.mark.parametrize("misfit", ["shapes", "data"])
def test_a_checkpoint_that_does_not_fit_the_config_stops_resume(tmp_path: Path, misfit: str) -> None:
    state = make_state()
    state["data"] = OtherData()
    save(tmp_path, 1, state)
    save(tmp_path, 2, state)
    fresh = make_state(hidden=16) if misfit == "shapes" else {**make_state(), "data": OtherData()}
    with pytest.raises(ConfigError) as e:  # an older checkpoint would not fit either: no fallback
        restore_latest(fresh, tmp_path, pytest.fail)
    assert not isinstance(e.value, CheckpointError) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"checkpoint.dir: {tmp_path / 'step-2'}")
    assert ("of shape" if misfit == "shapes" else ": the saved position is for other data (") in str(e.value)


# ---- step directories: links, names, pruning -----------------------------------------------------


def test_linked_and_misnamed_step_dirs_are_ignored_and_never_pruned_through(tmp_path: Path) -> None:
    root, precious = tmp_path / "ckpt", tmp_path / "precious"
    two_checkpoints(root)
    (root / "step-99").symlink_to(root / "step-1")
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    (root / "step-0").symlink_to(precious)
    shutil.copytree(root / "step-1", root / "step-03")
    reports: list[str] = []
    assert latest_valid(root, reports.append) == (2, root / "step-2")
    assert len(reports) == 3, reports
    assert any("step-99 is a symbolic link" in r for r in reports)
    assert any("step-03 is not named step-<N>" in r for r in reports)

    save(root, 3, make_state(), keep_last=1)
    assert latest_valid(root, lambda _: None) == (3, root / "step-3")
    assert (root / "step-99").is_symlink() and (root / "step-0").is_symlink()
    assert (precious / "keep.txt").read_text() == "mine" and (root / "step-03" / "manifest.json").is_file()
    assert not (root / "step-1").exists() and not (root / "step-2").exists()


# ---- the CLI's bad input -------------------------------------------------------------------------


def _cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    ckpt = tmp_path / "ckpt" / "step-1"
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hello")
    return {
        "missing": (["verify", str(tmp_path / "nope")], "does not exist"),
        "list_missing": (["list", str(tmp_path / "nope")], "does not exist"),
        "a_file": (["verify", str(tmp_path / "a_file")], "is a file"),
        "verify_empty": (["verify", str(tmp_path / "empty")], "no checkpoints in"),
        "out_dir_missing": (["convert", str(ckpt), str(tmp_path / "no" / "model.pt")], "does not exist"),
        "out_exists": (["convert", str(ckpt), str(tmp_path / "a_file")], "exists"),
        "convert_random_dir": (
            ["convert", str(tmp_path / "random"), str(tmp_path / "m.pt")],
            "not a checkpoint",
        ),
        "convert_parent": (["convert", str(ckpt.parent), str(tmp_path / "m.pt")], "name one, e.g."),
        "convert_a_file": (["convert", str(tmp_path / "a_file"), str(tmp_path / "m.pt")], "is a file"),
    }


CLI_BAD_INPUT = "missing list_missing a_file verify_empty out_dir_missing out_exists convert_random_dir"


@pytest.mark.parametrize("kind", [*CLI_BAD_INPUT.split(), "convert_parent", "convert_a_file"])
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture
) -> None:
    save(tmp_path / "ckpt", 1, make_state())
    args, word = _cli_cases(tmp_path)[kind]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeforge: ") and err.count("\n") == 1 and word in err, err
    assert (tmp_path / "a_file").read_text() == "x" and not (tmp_path / "m.pt").exists()


def test_cli_convert_that_fails_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ckpt = save(tmp_path / "ckpt", 1, make_state())
    out = tmp_path / "out" / "model.pt"
    out.parent.mkdir()

    def full_disk(obj: Any, f: Any) -> None:
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli(["convert", str(ckpt), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert list(out.parent.iterdir()) == []


# ---- disk space ----------------------------------------------------------------------------------


def _full_small_part(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj: Any, path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(manager, "_save_file", full)


def _full_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(JsonFileSystemWriter, "finish", full)


@pytest.mark.parametrize(
    ("where", "async_save"), [("small_part", False), ("shards", False), ("small_part", True)]
)
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, async_save: bool
) -> None:
    state = make_state()
    save(tmp_path, 1, state)
    {"small_part": _full_small_part, "shards": _full_shards}[where](monkeypatch)
    with pytest.raises(ConfigError) as e:
        save(tmp_path, 2, state, keep_last=1, async_save=async_save)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"checkpoint.dir={tmp_path}: saving step 2 failed")
    assert "No space left on device" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]
    assert (tmp_path / "latest").read_text().strip() == "step-1"
    assert latest_valid(tmp_path, pytest.fail) == (1, tmp_path / "step-1")


def test_free_space_check_and_estimate(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet"
    check_free_space(target, 1)
    with pytest.raises(ConfigError) as e:
        check_free_space(target, 1 << 60)
    message = str(e.value)
    assert message.startswith(f"checkpoint.dir={target}: ") and f"{1 << 60:,} bytes" in message
    assert "free" in message and "\n" not in message and not target.exists()
    state = make_state()
    on_disk = sum(f.stat().st_size for f in save(tmp_path / "c", 1, state).rglob("*") if f.is_file())
    assert on_disk <= state_bytes(state) <= 4 * on_disk + (1 << 20)


def test_state_bytes_leaves_a_fresh_optimizer_alone() -> None:
    """Measuring a run's checkpoint before its first step must not create the optimizer's state
    (torch's get_state_dict would, with a zero-gradient step, shifting AdamW's step count)."""
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, OptimConfig())
    assert state_bytes({"model_optimizer": ShardedModelOptimizer([model], opt)}) >= 3 * (4 * 2 + 2) * 4
    assert not opt.state and all(p.grad is None for p in model.parameters())
