"""DCP storage without pickle: the checkpoint's index is JSON, and only tensors go through DCP.

`torch.distributed.checkpoint` pickles its `.metadata` index and any non-tensor value it saves;
loading either would run arbitrary code from a checkpoint file. `JsonFileSystemWriter` writes
the same index as `.metadata.json`; `JsonFileSystemReader` reads it back, after `check_index`
has checked its every field, and that each data file it names lies inside the sharded directory
and is long enough. Callers put only tensors in DCP state dicts (everything else goes in small
`weights_only` files or the manifest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from trainer.checkpoint.safety import CheckpointError, contained, is_int, read_json

METADATA_FILE = ".metadata.json"
# The dtypes a checkpoint may name, by a fixed table: never `getattr(torch, <string from a file>)`.
_DTYPE_NAMES = "float64 float32 float16 bfloat16 complex64 complex128 int64 int32 int16 int8 uint8 bool"
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in [*_DTYPE_NAMES.split(), "float8_e4m3fn", "float8_e5m2"]
}


class JsonFileSystemWriter(FileSystemWriter):
    def finish(self, metadata: Metadata, results: list) -> None:
        storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        tmp = Path(self.path) / (METADATA_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(metadata_to_json(metadata, storage_data), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(self.path) / METADATA_FILE)


class JsonFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_json_metadata(Path(self.path))
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


def read_json_metadata(sharded_dir: Path) -> Metadata:
    """The DCP index of `sharded_dir`, checked (`check_index`) before anything trusts it."""
    if sharded_dir.is_symlink():
        raise CheckpointError(sharded_dir.parent, f"{sharded_dir.name}/ is a symbolic link")
    obj = read_json(sharded_dir, METADATA_FILE, "file")
    check_index(obj, sharded_dir)
    return metadata_from_json(obj)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def metadata_to_json(md: Metadata, storage_data: dict[MetadataIndex, _StorageInfo]) -> dict[str, Any]:
    tensors = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise TypeError(f"checkpoint value {fqn!r} is not a tensor; only tensors are stored sharded")
        tensors[fqn] = {
            "dtype": _dtype_name(entry.properties.dtype),
            "size": list(entry.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in entry.chunks],
        }
    storage = [
        {
            "fqn": idx.fqn,
            "offset": None if idx.offset is None else list(idx.offset),
            "index": idx.index,
            "path": info.relative_path,
            "byte_offset": info.offset,
            "length": info.length,
        }
        for idx, info in storage_data.items()
    ]
    planner = {k: list(v) for k, v in (md.planner_data or {}).items()}
    return {"version": md.version, "tensors": tensors, "storage": storage, "planner": planner}


def metadata_from_json(obj: dict[str, Any]) -> Metadata:
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, t in obj["tensors"].items():
        chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in t["chunks"]]
        props = TensorProperties(dtype=DTYPES[t["dtype"]])
        state_dict_metadata[fqn] = TensorStorageMetadata(props, torch.Size(t["size"]), chunks)
    storage_data = {
        MetadataIndex(
            s["fqn"], None if s["offset"] is None else torch.Size(s["offset"]), s["index"]
        ): _StorageInfo(s["path"], s["byte_offset"], s["length"])
        for s in obj["storage"]
    }
    planner = {k: tuple(v) for k, v in obj["planner"].items()}
    return Metadata(
        state_dict_metadata=state_dict_metadata,
        planner_data=planner,
        storage_data=storage_data,
        version=obj["version"],
    )


def _ints(value: Any, length: int | None = None) -> bool:
    return isinstance(value, list) and all(is_int(v) for v in value) and length in (None, len(value))


def check_index(obj: Any, sharded_dir: Path) -> None:
    """Refuse (CheckpointError) a DCP index whose shape is not what `metadata_to_json` writes, or
    whose storage entries leave `sharded_dir` or reach past the end of their file."""
    root, index = sharded_dir.parent, f"{sharded_dir.name}/{METADATA_FILE}"

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(root, f"{index}: {problem}")

    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
        raise bad("has no 'tensors' object")
    if not isinstance(obj.get("storage"), list) or not isinstance(obj.get("planner"), dict):
        raise bad("has no 'storage' list or no 'planner' object")
    if "version" not in obj or not isinstance(obj["version"], (str, type(None))):
        raise bad("'version' is not a string")
    for fqn, t in obj["tensors"].items():
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or t["dtype"] not in DTYPES:
            raise bad(
                f"tensor {fqn!r} has dtype {t.get('dtype') if isinstance(t, dict) else t!r}, not a known one"
            )
        size, chunks = t.get("size"), t.get("chunks")
        if not _ints(size) or not isinstance(chunks, list):
            raise bad(f"tensor {fqn!r}: size is not a list of integers or chunks not a list")
        for chunk in chunks:
            ok = isinstance(chunk, list) and len(chunk) == 2 and all(_ints(c, len(size)) for c in chunk)
            if not ok or any(o + n > d for o, n, d in zip(chunk[0], chunk[1], size)):
                raise bad(f"tensor {fqn!r} has a chunk {chunk!r} that is not [offsets, sizes] within {size}")
    for k, v in obj["planner"].items():
        if not isinstance(v, list) or not all(isinstance(p, (str, int)) for p in v):
            raise bad(f"planner entry {k!r} is not a list of keys")
    sizes: dict[str, int] = {}
    for i, s in enumerate(obj["storage"]):
        if not isinstance(s, dict) or not isinstance(s.get("fqn"), str) or s["fqn"] not in obj["tensors"]:
            raise bad(f"storage entry {i} names no tensor of the index")
        if not (s.get("offset") is None or _ints(s["offset"])) or not (
            s.get("index") is None or is_int(s["index"])
        ):
            raise bad(f"storage entry {i}: offset/index are not integers")
        if not is_int(s.get("byte_offset")) or not is_int(s.get("length")):
            raise bad(f"storage entry {i}: byte_offset/length are not integers >= 0")
        rel = s.get("path")
        if not isinstance(rel, str) or rel not in sizes:
            try:
                file = contained(sharded_dir, rel, "storage path")
            except CheckpointError as e:
                raise bad(e.problem) from None
            if not file.is_file():
                raise bad(f"storage entry {i} names {rel!r}, which is missing")
            sizes[rel] = file.stat().st_size
        if s["byte_offset"] + s["length"] > sizes[rel]:
            raise bad(
                f"storage entry {i} reaches byte {s['byte_offset'] + s['length']} of {rel}, which has "
                f"{sizes[rel]} (truncated?)"
            )


def storage_files(sharded_dir: Path) -> dict[str, int]:
    """Each data file the (checked) index of `sharded_dir` names, with the extent it needs."""
    metadata = read_json_metadata(sharded_dir)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed
