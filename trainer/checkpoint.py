"""Checkpoints: one directory per step, written atomically, loaded without unpickling objects.

The state is a dict of named parts, each with `state_dict()` / `load_state_dict()` (model,
optimizer, scheduler, data loader, rng, progress). A later issue swaps the file format for
sharded `torch.distributed.checkpoint`; the shape of `state` and the directory protocol stay:

    <dir>/step-N.tmp/   written first: one `<part>.pt` per part, then `manifest.json` last
    <dir>/step-N/       the .tmp directory renamed (atomic on POSIX) once complete
    <dir>/latest        text file naming the newest complete step directory

Loading uses `torch.load(weights_only=True)`, so parts may hold only tensors and plain
containers of int/float/str/bool/None; RNG states are stored as tensors for that reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trainer.errors import ConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"


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
    """Write `state` as `<ckpt_dir>/step-<step>/`, point `latest` at it, keep the newest `keep_last`."""
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a save that was killed
    tmp.mkdir()
    for name, part in state.items():
        torch.save(part.state_dict(), tmp / f"{name}.pt")
    manifest = {"step": step, "parts": sorted(state), **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / LATEST, final.name + "\n")
    if keep_last > 0:
        for _, old in step_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(ckpt_dir: str | Path) -> tuple[int, Path, dict[str, Any]] | None:
    """(step, path, {part: state dict}) of the newest complete checkpoint, or None if there is none."""
    root = Path(ckpt_dir)
    complete = dict((p.name, (s, p)) for s, p in step_dirs(root))
    if not complete:
        return None
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
    step, path = complete.get(named) or max(complete.values())
    manifest = json.loads((path / MANIFEST).read_text())
    parts = {
        name: torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        for name in manifest["parts"]
    }
    return step, path, parts


def restore(state: dict[str, Stateful], loaded: dict[str, Any], path: Path) -> None:
    """Load each part; model shapes are checked first so a mismatch is one readable line."""
    missing = sorted(set(state) - set(loaded))
    if missing:
        raise ConfigError(
            "checkpoint.dir", f"checkpoint.dir: {path} lacks parts {missing} (set checkpoint.resume=false)"
        )
    if "model" in state:
        check_model_shapes(state["model"].state_dict(), loaded["model"], path)
    for name, part in state.items():
        part.load_state_dict(loaded[name])


def check_model_shapes(expected: dict[str, Any], saved: dict[str, Any], path: Path) -> None:
    fix = "point checkpoint.dir/run.dir elsewhere or set checkpoint.resume=false"
    for key in sorted(set(expected) ^ set(saved)):
        where = "the config's model" if key in expected else "the checkpoint"
        raise ConfigError(
            "checkpoint.dir", f"checkpoint.dir: {path} does not fit model: only {where} has '{key}' ({fix})"
        )
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(saved[key].shape):
            raise ConfigError(
                "checkpoint.dir",
                f"checkpoint.dir: {path} has {key} of shape {list(saved[key].shape)} but the config builds "
                f"{list(tensor.shape)} ({fix})",
            )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
