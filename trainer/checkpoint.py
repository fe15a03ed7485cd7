"""Checkpoints: one directory per step, written atomically by every rank together.

The state is a dict of named parts with `state_dict()` / `load_state_dict()`. The model and its
optimizer form one *sharded* part (`ShardedModelOptimizer`): every rank writes its own shards with
`torch.distributed.checkpoint` (DCP), keyed by layout-independent parameter names, so a run can
resume at another parallel layout. The other parts are small and identical on every rank
(scheduler, data-loader cursor, progress) and rank 0 writes them; RNG states are per rank.

    <dir>/step-N.tmp/   written first: sharded/ (DCP), <part>.pt, rng-rank<r>.pt, then manifest.json
    <dir>/step-N/       the .tmp directory renamed by rank 0 (atomic on POSIX) once all ranks are done
    <dir>/latest        text file naming the newest complete step directory

Small parts are loaded with `torch.load(weights_only=True)` (tensors and plain containers only).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
SHARDED = "sharded"

# A single-process run saves and loads through DCP too (one code path); that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class TrainProgress:
    """Optimizer steps taken and tokens trained on (all ranks), as a checkpoint part."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])


class RNGState:
    """Python, NumPy, torch CPU (and CUDA) generator states, all as tensors."""

    def state_dict(self) -> dict[str, Any]:
        version, py_state, gauss = random.getstate()
        np_state = np.random.get_state()
        sd: dict[str, Any] = {
            "python_version": version,
            "python_state": torch.tensor(py_state, dtype=torch.int64),
            "python_gauss": gauss,
            "numpy_state": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]),
            "numpy_gauss": float(np_state[4]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        random.setstate((sd["python_version"], tuple(sd["python_state"].tolist()), sd["python_gauss"]))
        np_key = sd["numpy_state"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", np_key, sd["numpy_pos"], sd["numpy_has_gauss"], sd["numpy_gauss"]))
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


class ShardedModelOptimizer:
    """The model (all of this rank's pipeline stages) and optimizer as one DCP-sharded part.

    Keys are the model's own parameter names (`layers.3.moe.experts.w1`), whatever the layout;
    the optimizer's state is keyed the same way. DCP reshards DTensors on load."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.container = nn.ModuleList(parts)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.container, self.optimizer)
        return {"model": _strip_part_prefix(model_sd), "optimizer": _strip_part_prefix(optim_sd)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        model_sd, optim_sd = get_state_dict(self.container, self.optimizer)
        to_full = {_strip(k): k for k in model_sd}
        set_state_dict(
            self.container,
            self.optimizer,
            model_state_dict={to_full[k]: v for k, v in sd["model"].items()},
            optim_state_dict=_add_part_prefix(sd["optimizer"], to_full),
        )


def _strip(key: str) -> str:
    return key.split(".", 1)[1]  # "0.layers.3.w" -> "layers.3.w" (the ModuleList index)


def _strip_part_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    if "state" in sd and "param_groups" in sd:  # optimizer: state keyed by FQN, groups list FQNs
        groups = [{**g, "params": [_strip(k) for k in g["params"]]} for g in sd["param_groups"]]
        return {"state": {_strip(k): v for k, v in sd["state"].items()}, "param_groups": groups}
    return {_strip(k): v for k, v in sd.items()}


def _add_part_prefix(sd: dict[str, Any], to_full: dict[str, str]) -> dict[str, Any]:
    groups = [{**g, "params": [to_full[k] for k in g["params"] if k in to_full]} for g in sd["param_groups"]]
    return {"state": {to_full[k]: v for k, v in sd["state"].items() if k in to_full}, "param_groups": groups}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed, with a manifest), oldest first; `.tmp` leftovers are ignored."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save(
    ckpt_dir: str | Path,
    step: int,
    state: dict[str, Stateful],
    keep_last: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `state` as `<ckpt_dir>/step-<step>/`, point `latest` at it, keep the newest `keep_last`.
    Collective: every rank calls it."""
    root = Path(ckpt_dir)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
        tmp.mkdir()
    _barrier()
    for name, part in state.items():
        if isinstance(part, ShardedModelOptimizer):
            dcp.save(part.state_dict(), checkpoint_id=tmp / SHARDED)
        elif isinstance(part, RNGState):
            torch.save(part.state_dict(), tmp / f"rng-rank{rank}.pt")
        elif rank == 0:
            torch.save(part.state_dict(), tmp / f"{name}.pt")
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        manifest = {"step": step, "parts": sorted(state), "world_size": world, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        if keep_last > 0:
            for _, old in step_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest(ckpt_dir: str | Path) -> tuple[int, Path] | None:
    """(step, path) of the newest complete checkpoint, or None if there is none."""
    root = Path(ckpt_dir)
    complete = dict((p.name, (s, p)) for s, p in step_dirs(root))
    if not complete:
        return None
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
    return complete.get(named) or max(complete.values())


def restore(state: dict[str, Stateful], path: Path) -> None:
    """Load each part of `state` from checkpoint `path`; model shapes are checked first against
    the checkpoint's metadata so a mismatch is one readable line. Collective for the sharded part."""
    manifest = json.loads((path / MANIFEST).read_text())
    missing = sorted(set(state) - set(manifest["parts"]))
    if missing:
        raise ConfigError(
            "checkpoint.dir", f"checkpoint.dir: {path} lacks parts {missing} (set checkpoint.resume=false)"
        )
    for name, part in state.items():
        if isinstance(part, ShardedModelOptimizer):
            sd = part.state_dict()
            check_model_shapes(sd["model"], _saved_shapes(path / SHARDED), path)
            dcp.load(sd, checkpoint_id=path / SHARDED)
            part.load_state_dict(sd)
        elif isinstance(part, RNGState):
            rng_file = path / f"rng-rank{_rank()}.pt"
            if rng_file.is_file():  # absent when resuming with more ranks: keep this rank's seed
                part.load_state_dict(torch.load(rng_file, weights_only=True))
        else:
            part.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))


def _saved_shapes(sharded_dir: Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of the saved model tensors, from DCP's metadata."""
    metadata = dcp.FileSystemReader(sharded_dir).read_metadata()
    prefix = "model."
    return {
        k[len(prefix) :]: tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith(prefix) and hasattr(v, "size")
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
