"""DCP storage without pickle: the checkpoint's index is JSON, and only tensors go through DCP.

`torch.distributed.checkpoint` pickles its `.metadata` index and any non-tensor value it saves;
loading either would run arbitrary code from a checkpoint file. `JsonFileSystemWriter` writes
the same index as `.metadata.json`; `JsonFileSystemReader` reads it back. Callers put only
tensors in DCP state dicts (everything else goes in small `weights_only` files or the manifest).
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

METADATA_FILE = ".metadata.json"


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
    return metadata_from_json(json.loads((sharded_dir / METADATA_FILE).read_text()))


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
        props = TensorProperties(dtype=getattr(torch, t["dtype"]))
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
