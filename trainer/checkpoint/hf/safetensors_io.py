"""Hugging Face checkpoint directories on disk: `config.json` plus safetensors weights, one file
or several with a `model.safetensors.index.json`.

`HFCheckpoint` opens a directory and reads any slice of any tensor without loading the rest
(safetensors memory-maps, so a rank reads only the bytes it asks for). `write_sharded` streams
tensors into shards of bounded size with the index that `from_pretrained` expects, into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable
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


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]  # name, shape, dtype
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
}


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    files: dict[str, str],
    max_shard_bytes: int = 5 * 2**30,
    add_files: Callable[[Path], object] | None = None,
    replace: bool = False,
) -> dict[str, int]:
    """Write `tensors` (yielded in the order of `specs`, which say their shapes and dtypes up
    front) as safetensors shards with an index, and `files` (name -> text) beside them
    (`add_files(tmp)` may copy more), into `out_dir`. Streamed: since every shard's header is
    known before its first tensor exists, each tensor is written as it comes and dropped, so at
    most one is in memory. Everything goes to `out_dir.tmp` first, renamed at the end: a
    directory named `out_dir` is always complete. An existing `out_dir` is an error unless
    `replace` (an earlier export), then it is swapped out only once the new one is complete.
    Returns {shard file: bytes}."""
    if out_dir.exists() and not replace:
        raise conversion_error(str(out_dir), "exists already (choose a new directory); nothing was written")
    shards = _assign_shards(specs, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stream = iter(tensors)
    for shard, file in zip(shards, names):
        with open(tmp / file, "wb") as f:
            f.write(_safetensors_header(shard))
            for name, shape, dtype in shard:
                got, tensor = next(stream)
                assert got == name and tuple(tensor.shape) == shape and tensor.dtype == dtype, (got, name)
                f.write(tensor.contiguous().view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
    assert next(stream, None) is None, "more tensors than specs"
    weight_map = {name: file for shard, file in zip(shards, names) for name, _, _ in shard}
    total = sum(_nbytes(spec) for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
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
    return {file: (out_dir / file).stat().st_size for file in names}


def _nbytes(spec: TensorSpec) -> int:
    _, shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def _assign_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most `max_shard_bytes` (a larger tensor: alone)."""
    assert len({name for name, _, _ in specs}) == len(specs), "a tensor name written twice"
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + _nbytes(spec) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += _nbytes(spec)
    return shards


def _safetensors_header(shard: list[TensorSpec]) -> bytes:
    """The safetensors header: u64 little-endian length, then JSON (name -> dtype, shape, byte
    range in the data section), space-padded to a multiple of 8."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        name, shape, dtype = spec
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + _nbytes(spec)],
        }
        offset += _nbytes(spec)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
