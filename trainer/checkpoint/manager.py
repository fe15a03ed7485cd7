"""Checkpoint directories: written atomically by all ranks together, verified before use.

    <dir>/step-N.tmp/       written first by every rank:
        sharded/            DCP shards of the model + optimizer tensors, index in .metadata.json
        optimizer_groups.pt, scheduler.pt, data.pt, progress.pt   (rank 0; identical on all ranks)
        rng-rank<r>.pt, compressor-rank<r>.pt   (each rank: the parts that differ per rank)
        manifest.json       last: step, layout, config, every file with its size and sha256
    <dir>/step-N/           the .tmp directory renamed (atomic) after everything is fsynced
    <dir>/latest            names the newest complete checkpoint (written atomically)

A checkpoint is valid when its manifest parses and every listed file has its size and checksum.
Resume takes the newest valid one and reports each newer one it had to skip in one line. Nothing
is unpickled: tensors come back through DCP with a JSON index, small parts with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.state import ShardedModelOptimizer, Stateful
from trainer.checkpoint.storage import METADATA_FILE, JsonFileSystemReader, JsonFileSystemWriter
from trainer.errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
SHARDED = "sharded"
GROUPS = "optimizer_groups.pt"
FORMAT_VERSION = 1

# Called with the step once this rank's files are written, before the manifest and the rename:
# where fault injection (trainer/fault.py) kills a process to leave a half-written checkpoint.
after_shards_written: list[Callable[[int], None]] = []

# A single-process run saves and loads through DCP too (one code path); that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _is_per_rank(part: Stateful) -> bool:
    return getattr(part, "per_rank", False)


def _per_rank_file(name: str, rank: int) -> str:
    return f"{name}-rank{rank}.pt"


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- saving ------------------------------------------------------------------------------------


class Snapshot:
    """What one checkpoint writes, captured at the step it belongs to (so an async save can run
    while training goes on): the sharded tensors (staged to CPU when async) and the small parts."""

    def __init__(self, state: dict[str, Stateful], stage: bool) -> None:
        self.sharded: dict[str, Any] = {}
        self.small: dict[str, Any] = {}
        self.per_rank: dict[str, Any] = {}  # saved by every rank, as <name>-rank<r>.pt
        for name, part in state.items():
            if isinstance(part, ShardedModelOptimizer):
                sharded = part.sharded_state()
                self.sharded = _staged(sharded) if stage else sharded
                self.small[GROUPS] = part.groups_state()
            elif _is_per_rank(part):
                self.per_rank[name] = _staged(part.state_dict())
            else:
                self.small[f"{name}.pt"] = part.state_dict()


def _staged(tree: Any) -> Any:
    """Copies of every tensor (DTensors keep their layout), so training may overwrite the originals."""
    if isinstance(tree, dict):
        return {k: _staged(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    return tree


class CheckpointWriter:
    """Writes checkpoints of one run; with `async_save`, the writing runs on a background thread
    over its own gloo group while training continues, and `wait()` joins it."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, async_save: bool = False) -> None:
        self.root = Path(ckpt_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        # Collectives of a background save must not interleave with training's on the same group.
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, state: dict[str, Stateful], extra: dict[str, Any]) -> Path:
        self.wait()
        snapshot = Snapshot(state, stage=self.async_save)
        if not self.async_save:
            return self._write(step, snapshot, extra)
        self._thread = threading.Thread(
            target=self._write_catching, args=(step, snapshot, extra), daemon=True
        )
        self._thread.start()
        return self.root / f"step-{step}"

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_catching(self, step: int, snapshot: Snapshot, extra: dict[str, Any]) -> None:
        try:
            self._write(step, snapshot, extra)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e

    def _write(self, step: int, snapshot: Snapshot, extra: dict[str, Any]) -> Path:
        final, tmp = self.root / f"step-{step}", self.root / f"step-{step}.tmp"
        rank = _rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
            tmp.mkdir()
        _barrier(self.group)
        dcp.save(
            snapshot.sharded, storage_writer=JsonFileSystemWriter(tmp / SHARDED), process_group=self.group
        )
        for name, value in snapshot.per_rank.items():
            _save_file(value, tmp / _per_rank_file(name, rank))
        if rank == 0:
            for filename, value in snapshot.small.items():
                _save_file(value, tmp / filename)
        for hook in after_shards_written:
            hook(step)
        _barrier(self.group)
        if rank == 0:
            self._commit(step, tmp, final, extra)
        _barrier(self.group)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, extra: dict[str, Any]) -> None:
        files = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        world = dist.get_world_size() if dist.is_initialized() else 1
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world, **extra, "files": files}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp / SHARDED)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / LATEST, final.name + "\n")
        _fsync_dir(self.root)
        if self.keep_last > 0:
            for _, old in step_dirs(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- finding and verifying ---------------------------------------------------------------------


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Renamed (`step-N`) checkpoint directories, oldest first; `.tmp` leftovers are not listed."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong (one line)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    if f"{SHARDED}/{METADATA_FILE}" not in files:
        return f"manifest.json lists no {SHARDED}/{METADATA_FILE}"
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if checksums and _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    return None


def latest_valid(
    ckpt_dir: str | Path, report: Callable[[str], None], checksums: bool = True
) -> tuple[int, Path] | None:
    """The newest valid checkpoint, reporting in one line each newer one that is not (and stale
    `.tmp` directories). Under torch.distributed, rank 0 decides and tells the others."""
    choice: list[Any] = [None]
    if _rank() == 0:
        root = Path(ckpt_dir)
        for stale in sorted(root.glob("step-*.tmp")) if root.is_dir() else []:
            report(f"checkpoint {stale} is incomplete (a save that did not finish): ignored")
        for step, path in reversed(step_dirs(root)):
            problem = verify(path, checksums)
            if problem is None:
                choice[0] = (step, str(path))
                break
            report(f"checkpoint {path} is not usable: {problem}; trying the previous one")
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else (choice[0][0], Path(choice[0][1]))


# ---- loading -----------------------------------------------------------------------------------


def restore(state: dict[str, Stateful], path: Path) -> None:
    """Load every part of `state` from the (verified) checkpoint at `path`. Collective."""
    for name, part in state.items():
        if isinstance(part, ShardedModelOptimizer):
            sharded = part.sharded_state()
            check_model_shapes(sharded["model"], saved_shapes(path), path)
            dcp.load(sharded, storage_reader=JsonFileSystemReader(path / SHARDED))
            part.load(sharded, torch.load(path / GROUPS, weights_only=True))
        elif _is_per_rank(part):
            file = path / _per_rank_file(name, _rank())
            if file.is_file():  # absent when resuming on more ranks: this rank keeps its fresh state
                part.load_state_dict(torch.load(file, weights_only=True))
        else:
            file = path / f"{name}.pt"
            if not file.is_file():
                raise ConfigError(
                    "checkpoint.dir",
                    f"checkpoint.dir: {path} has no {file.name} (set checkpoint.resume=false)",
                )
            part.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of the saved model tensors, from the JSON index."""
    from trainer.checkpoint.storage import read_json_metadata

    metadata = read_json_metadata(path / SHARDED)
    prefix = "model."
    return {
        k[len(prefix) :]: tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith(prefix)
    }


def check_model_shapes(expected: dict[str, Any], saved: dict[str, tuple[int, ...]], path: Path) -> None:
    fix = "point checkpoint.dir/run.dir elsewhere or set checkpoint.resume=false"
    for key in sorted(set(expected) - set(saved)):
        raise ConfigError(
            "checkpoint.dir",
            f"checkpoint.dir: {path} does not fit model: the checkpoint lacks '{key}' ({fix})",
        )
    for key, tensor in expected.items():
        if tuple(tensor.shape) != saved[key]:
            raise ConfigError(
                "checkpoint.dir",
                f"checkpoint.dir: {path} has {key} of shape {list(saved[key])} but the config builds "
                f"{list(tensor.shape)} ({fix})",
            )
