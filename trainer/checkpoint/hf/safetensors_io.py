"""Hugging Face checkpoint directories on disk: `config.json` plus safetensors weights, one file
or several with a `model.safetensors.index.json`.

`HFCheckpoint` opens a directory and reads any slice of any tensor without loading the rest
(safetensors memory-maps, so a rank reads only the bytes it asks for). `write_sharded` streams
tensors into shards of bounded size with the index that `from_pretrained` expects, into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from trainer.errors import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def conversion_error(what: str, message: str) -> ConfigError:
    """One line naming the file, field or tensor (`what`) and what to do."""
    return ConfigError(what, f"{what}: {message}")


class HFCheckpoint:
    """A read-only view of an HF model directory: its config and where each tensor lives."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open  # the [hf] extra

        self._safe_open = safe_open
        self.path = Path(path)
        if not self.path.is_dir():
            raise conversion_error(str(self.path), "not a directory (pass a Hugging Face model directory)")
        config_path = self.path / CONFIG
        if not config_path.is_file():
            raise conversion_error(str(config_path), "missing (a Hugging Face model directory has one)")
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise conversion_error(str(config_path), f"is not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise conversion_error(str(config_path), "must hold a JSON object")
        self._open: dict[str, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.file_of = self._tensor_files()

    def _tensor_files(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise conversion_error(str(index), "has no readable 'weight_map'") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise conversion_error(
                        str(self.path / shard), f"missing: {index.name} lists it (the download is incomplete)"
                    )
            return dict(weight_map)
        if (self.path / SINGLE).is_file():
            return {name: SINGLE for name in self._handle(SINGLE).keys()}
        raise conversion_error(str(self.path), f"has neither {SINGLE} nor {INDEX}")

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = self._safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise conversion_error(
                    str(self.path / file), f"is not a readable safetensors file ({e})"
                ) from None
        return self._open[file]

    def close(self) -> None:
        """Drop the memory maps (reopened on the next read)."""
        self._open.clear()

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())
        return self._shapes[name]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """`tensor[index]`, reading only those bytes."""
        view = self._handle(self.file_of[name]).get_slice(name)
        return view[index] if index else view[:]


def write_sharded(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    files: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
    add_files: Callable[[Path], object] | None = None,
    replace: bool = False,
) -> dict[str, int]:
    """Write `tensors` (streamed: each is written and dropped before the next is asked for) as
    safetensors shards with an index, and `files` (name -> text) beside them (`add_files(tmp)`
    may copy more), into `out_dir`. Everything goes to `out_dir.tmp` first, renamed at the end:
    a directory named `out_dir` is always complete. An existing `out_dir` is an error unless
    `replace` (an earlier export), then it is swapped out only once the new one is complete.
    Returns {shard file: bytes}."""
    if out_dir.exists() and not replace:
        raise conversion_error(str(out_dir), "exists already (choose a new directory); nothing was written")
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    shard_paths: list[Path] = []
    total = 0

    def flush(batch: dict[str, torch.Tensor]) -> None:
        path = tmp / f"part-{len(shard_paths):05d}.safetensors"
        save_file(batch, str(path), metadata={"format": "pt"})
        shard_paths.append(path)
        weight_map.update({name: path.name for name in batch})

    batch: dict[str, torch.Tensor] = {}
    batch_bytes = 0
    for name, tensor in _unique(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if batch and batch_bytes + nbytes > max_shard_bytes:
            flush(batch)
            batch, batch_bytes = {}, 0
        batch[name] = tensor.contiguous()
        batch_bytes += nbytes
        total += nbytes
    if batch or not shard_paths:
        flush(batch)
    # Final names in from_pretrained's convention: model-00001-of-00003.safetensors.
    count = len(shard_paths)
    renamed = {p.name: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, p in enumerate(shard_paths)}
    for old, new in renamed.items():
        os.replace(tmp / old, tmp / new)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())},
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name, text in files.items():
        (tmp / name).write_text(text)
    if add_files is not None:
        add_files(tmp)
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {new: (out_dir / new).stat().st_size for new in renamed.values()}


def _unique(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[str] = set()
    for name, tensor in tensors:
        assert name not in seen, f"{name} written twice"
        seen.add(name)
        yield name, tensor
