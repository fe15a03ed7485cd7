"""Checkpoint directories: written atomically by all ranks together, verified before use.

    <dir>/step-N.tmp/       written first by every rank:
        sharded/            DCP shards of the model + optimizer tensors, index in .metadata.json
        optimizer_groups.pt, scheduler.pt, data.pt, progress.pt   (rank 0; identical on all ranks)
        rng-rank<r>.pt, compressor-rank<r>.pt   (each rank: the parts that differ per rank)
        manifest.json       last: step, layout, config, every file with its size and sha256
    <dir>/step-N/           the .tmp directory renamed (atomic) after everything is fsynced
    <dir>/latest            names the newest complete checkpoint (written atomically)

A checkpoint is valid when its manifest parses (every field of the expected type), it is named
after the step its manifest records, every listed file has its size and checksum, and every data
file its DCP index names is listed and long enough. A checkpoint may come from elsewhere: no path
it names may leave its directory (`safety.contained`), and nothing is unpickled: tensors come
back through DCP with a JSON index, small parts with `torch.load(weights_only=True)`.

Resume (`restore_latest`) takes the newest valid checkpoint that also loads, and reports in one
line each newer one it had to skip, and each `step-*` entry it ignores (symbolic links, misnamed
ones). Saving and pruning never follow a symbolic link. A failed save (a full disk) is one line,
and leaves no `step-N.tmp` behind.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.safety import (  # noqa: F401 - the constants and check_free_space are re-exported
    FORMAT_VERSION,
    GROUPS,
    LATEST,
    MANIFEST,
    SHARDED,
    STEP_DIR,
    CheckpointError,
    check_free_space,
    contained,
    load_weights_only,
    one_line,
    scan_step_dirs,
    sha256_file,
    step_dirs,
    verify,
)
from trainer.checkpoint.state import ShardedModelOptimizer, Stateful
from trainer.checkpoint.storage import (
    JsonFileSystemReader,
    JsonFileSystemWriter,
    read_json_metadata,
)
from trainer.errors import ConfigError

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


def _attempt(
    fn: Callable[[], Any],
    to_error: Callable[[BaseException], ConfigError],
    group: dist.ProcessGroup | None = None,
) -> ConfigError | None:
    """Run `fn` on every rank, then agree (collective, in place of a barrier) on whether it failed
    anywhere: every rank gets the error to raise, so none is left blocked in a later collective."""
    error = None
    try:
        fn()
    except (ConfigError, OSError, CheckpointException) as e:  # DCP's is a BaseException
        error = to_error(e)
    if not dist.is_initialized():
        return error
    mine = None if error is None else _as_tuple(error)
    every: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if error is not None:
        return error
    rank, theirs = next(((r, m) for r, m in enumerate(every) if m is not None), (0, None))
    if theirs is None:
        return None
    if theirs[0] == "checkpoint":
        return CheckpointError(theirs[1], f"on rank {rank}: {theirs[2]}", theirs[3])
    return ConfigError("checkpoint.dir", f"on rank {rank}: {theirs[1]}")


def _as_tuple(error: ConfigError) -> tuple[str, ...]:
    if isinstance(error, CheckpointError):
        return ("checkpoint", str(error.where), error.problem, error.fix)
    return ("config", str(error))


def _why(e: BaseException) -> str:
    """What went wrong, in a few words: the OSError's reason, also when DCP wrapped it."""
    if isinstance(e, CheckpointException):
        inner = [exc for exc, _ in e.failures.values()]
        e = next((x for x in inner if isinstance(x, OSError)), inner[0] if inner else e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return one_line(e)


def _remove(path: Path) -> None:
    """Remove a directory we wrote; a symbolic link in its place is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


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
        phases = (
            lambda: self._prepare(tmp) if rank == 0 else None,
            lambda: self._write_files(step, tmp, snapshot, rank),
            lambda: self._commit(step, tmp, final, extra) if rank == 0 else None,
        )
        for phase in phases:
            error = _attempt(phase, lambda e: self._save_error(step, e), self.group)
            if error is not None:
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise error
        return final

    def _save_error(self, step: int, e: BaseException) -> ConfigError:
        return ConfigError(
            "checkpoint.dir",
            f"checkpoint.dir={self.root}: saving step {step} failed: {_why(e)}; its step-{step}.tmp is "
            "removed and the earlier checkpoints are untouched (free space there, lower "
            "checkpoint.keep_last, or point checkpoint.dir elsewhere)",
        )

    def _prepare(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # a leftover from a save that was killed
        tmp.mkdir()

    def _write_files(self, step: int, tmp: Path, snapshot: Snapshot, rank: int) -> None:
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

    def _commit(self, step: int, tmp: Path, final: Path, extra: dict[str, Any]) -> None:
        files = {
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
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
        _remove(final)
        os.replace(tmp, final)
        _write_atomic(self.root / LATEST, final.name + "\n")
        _fsync_dir(self.root)
        if self.keep_last > 0:  # real step directories only: a symbolic link is left alone
            for _, old in step_dirs(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # never write through a link planted there
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- finding and verifying ---------------------------------------------------------------------


def latest_valid(
    ckpt_dir: str | Path, report: Callable[[str], None], checksums: bool = True, below: int | None = None
) -> tuple[int, Path] | None:
    """The newest valid checkpoint (older than step `below`, if given), reporting in one line each
    newer one that is not, and each ignored `step-*` entry. Under torch.distributed, rank 0
    decides and tells the others."""
    choice: list[Any] = [None]
    if _rank() == 0:
        found, ignored = scan_step_dirs(ckpt_dir)
        for line in ignored if below is None else []:
            report(line)
        for step, path in reversed(found):
            if below is not None and step >= below:
                continue
            problem = verify(path, checksums)
            if problem is None:
                choice[0] = (step, str(path))
                break
            report(f"checkpoint {path} is not usable: {problem}; trying the previous one")
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else (choice[0][0], Path(choice[0][1]))


# ---- loading -----------------------------------------------------------------------------------


def restore_latest(
    state: dict[str, Stateful], ckpt_dir: str | Path, report: Callable[[str], None], checksums: bool = True
) -> tuple[int, Path] | None:
    """Restore the newest checkpoint that is valid and loads; one that is valid but cannot be
    loaded safely (a pickle, an unreadable part) is reported in one line and the previous one is
    tried, on every rank together. None when there is no valid checkpoint; a CheckpointError when
    none of the valid ones loads; a ConfigError when one does not fit the config (nor would older)."""
    return first_loadable(ckpt_dir, report, checksums, lambda path: restore(state, path))


def first_loadable(
    ckpt_dir: str | Path, report: Callable[[str], None], checksums: bool, load: Callable[[Path], None]
) -> tuple[int, Path] | None:
    """The newest valid checkpoint that `load` accepts (it raises CheckpointError to refuse one)."""
    below, newest = None, None
    while (found := latest_valid(ckpt_dir, report, checksums, below=below)) is not None:
        try:
            load(found[1])
            return found
        except CheckpointError as e:
            report(f"checkpoint {found[1]} cannot be loaded: {e.problem}; trying the previous one")
            below, newest = found[0], newest or e
    if newest is not None:
        raise CheckpointError(
            ckpt_dir,
            f"no checkpoint can be loaded; the newest, {newest.where}: {newest.problem}",
            "delete the checkpoints that cannot be loaded, or set checkpoint.resume=false",
        )
    return None


def restore(state: dict[str, Stateful], path: Path) -> None:
    """Load every part of `state` from the (verified) checkpoint at `path`. Collective: every file
    is read and checked before anything is loaded, and all ranks raise together, a CheckpointError
    when the checkpoint cannot be read safely, a ConfigError when it does not fit the config."""
    targets: dict[str, dict[str, Any]] = {}  # the sharded parts' own tensors, which DCP fills
    loaded: dict[str, Any] = {}

    def to_error(e: BaseException) -> ConfigError:
        return e if isinstance(e, ConfigError) else CheckpointError(path, f"cannot be read ({_why(e)})")

    def load_sharded() -> None:
        for target in targets.values():
            dcp.load(target, storage_reader=JsonFileSystemReader(path / SHARDED))

    for phase in (
        lambda: _read_parts(state, path, targets, loaded),
        load_sharded,
        lambda: _apply_parts(state, path, targets, loaded),
    ):
        if (error := _attempt(phase, to_error)) is not None:
            raise error


def _read_parts(
    state: dict[str, Stateful], path: Path, targets: dict[str, dict[str, Any]], loaded: dict[str, Any]
) -> None:
    for name, part in state.items():
        if isinstance(part, ShardedModelOptimizer):
            contained(path, SHARDED, "directory")
            targets[name] = part.sharded_state()
            check_model_shapes(targets[name]["model"], saved_shapes(path), path)
            loaded[name] = load_weights_only(path, GROUPS)
        elif _is_per_rank(part):
            rel = _per_rank_file(name, _rank())
            # Absent when resuming on more ranks: this rank keeps its fresh state.
            if os.path.lexists(path / rel):
                loaded[name] = load_weights_only(path, rel)
        else:
            rel = f"{name}.pt"
            if not os.path.lexists(path / rel):
                raise CheckpointError(path, f"has no {rel}", "set checkpoint.resume=false")
            loaded[name] = load_weights_only(path, rel)


def _apply_parts(
    state: dict[str, Stateful], path: Path, targets: dict[str, dict[str, Any]], loaded: dict[str, Any]
) -> None:
    for name, part in state.items():
        if name not in loaded:
            continue
        try:
            if name in targets:
                part.load(targets[name], loaded[name])  # type: ignore[attr-defined]
            else:
                part.load_state_dict(loaded[name])
        except ConfigError:
            raise
        except ValueError as e:  # the part refuses this state: e.g. a data position for other data
            fix = "point checkpoint.dir elsewhere, or set checkpoint.resume=false, or use another run.dir"
            raise ConfigError(
                "checkpoint.dir", f"checkpoint.dir: {path}: {str(e).removeprefix('data: ')} ({fix})"
            ) from e
        except (KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            file = GROUPS if name in targets else f"{name}.pt"
            raise CheckpointError(path, f"{file} does not hold a {name} state ({one_line(e)})") from None


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of the saved model tensors, from the JSON index."""
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


def state_bytes(state: dict[str, Stateful]) -> int:
    """About the bytes one checkpoint of `state` takes: every tensor of every part this rank
    saves, plus a little per file. Collective under torch.distributed: the sum over all ranks,
    which is what a shared `checkpoint.dir` receives (for `check_free_space`; replicated tensors,
    which DCP writes once, are counted on every rank: an over-estimate).

    The model + optimizer part is counted from the parameters (weights and AdamW's two moments),
    not from `sharded_state()`: on an optimizer that has not stepped yet, torch's `get_state_dict`
    creates its state with a zero-gradient step, which would change the run's first update."""
    total = 0
    for part in state.values():
        if isinstance(part, ShardedModelOptimizer):
            total += 3 * _tensor_bytes(list(part.container.parameters())) + (1 << 16)
        elif _is_per_rank(part) or _rank() == 0:
            total += _tensor_bytes(part.state_dict()) + (1 << 16)
    if dist.is_initialized():
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, total)
        total = sum(every)
    return total


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor: this rank's shard
        return local.numel() * local.element_size()
    return 0
