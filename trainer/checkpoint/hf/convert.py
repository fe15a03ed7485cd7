"""Moving tensors: HF checkpoint -> our model (any layout, each rank reading only its slices), and
our model (a DCP checkpoint or a state dict) -> an HF directory, streamed tensor by tensor.

Import goes through `torch.distributed.checkpoint.load` with `HFStorageReader`: DCP works out,
for every parameter of every rank (FSDP shards, TP shards, EP expert shards, pipeline stages),
which region of the full tensor that rank holds; the reader answers each request through the
plan's links with safetensors slice reads. So the import at a layout is exactly the import of
one process, cut the way that layout cuts it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from trainer.checkpoint.hf.mapping import Region, read_ours, write_hf
from trainer.checkpoint.hf.plan import ConversionPlan, our_shapes, required_keys
from trainer.checkpoint.hf.safetensors_io import HFCheckpoint, write_sharded


class HFStorageReader(StorageReader):
    """Presents an HF checkpoint to DCP as if it were one of ours: one chunk per tensor of our
    state dict (full shape), each read assembled from the linked HF slices."""

    def __init__(self, plan: ConversionPlan, ckpt: HFCheckpoint, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.plan, self.ckpt, self.dtype = plan, ckpt, dtype
        self.shapes = our_shapes(plan.cfg)
        self.by_ours = plan.links_by_ours()
        self.bytes_read = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entries = {}
        for key in sorted(required_keys(self.plan.cfg, self.shapes) & set(self.by_ours)):
            size = torch.Size(self.shapes[key])
            chunk = ChunkStorageMetadata(torch.Size([0] * len(size)), size)
            entries[key] = TensorStorageMetadata(TensorProperties(dtype=self.dtype), size, [chunk])
        return Metadata(state_dict_metadata=entries)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_region(self, key: str, region: Region, out: torch.Tensor | None = None) -> torch.Tensor:
        """Our tensor `key` over `region`, assembled into `out` (allocated if None): the one copy
        from the memory-mapped file, converting the dtype on the way."""
        if out is None:
            out = torch.empty([hi - lo for lo, hi in region], dtype=self.dtype)
        for link in self.by_ours[key]:
            piece = read_ours(link, self.shapes[key], region, self._read_hf)
            if piece is not None:
                dest, values = piece
                out[dest] = values
        return out

    def _read_hf(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if name in self.plan.synthetic:
            return self.plan.synthetic[name][index]
        values = self.ckpt.read(name, index)
        self.bytes_read += values.numel() * values.element_size()
        return values

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            key = item.storage_index.fqn
            region = tuple((o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
            target = planner.resolve_tensor(item).detach()
            self.read_region(key, region, out=target)
            planner.commit_tensor(item, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut


def load_into(models: list[torch.nn.Module], plan: ConversionPlan, ckpt: HFCheckpoint) -> int:
    """Fill the model parts of this rank (plain, pipeline-pruned, FSDP/TP/EP-sharded) from the
    HF checkpoint; collective under torch.distributed. Returns the bytes this rank read."""
    reader = HFStorageReader(plan, ckpt)
    wanted = set(reader.read_metadata().state_dict_metadata)
    state = {k: v for model in models for k, v in model.state_dict().items() if k in wanted}
    try:
        dcp.load(state, storage_reader=reader)  # in place: state_dict() values share the parameters' storage
    finally:
        ckpt.close()  # unmap the shards: the pages this rank touched would stay in its RSS
    return reader.bytes_read


def load_full(
    plan: ConversionPlan, ckpt: HFCheckpoint, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Our whole state dict from the HF checkpoint, in one process."""
    reader = HFStorageReader(plan, ckpt, dtype)
    try:
        return {
            key: reader.read_region(key, tuple((0, n) for n in reader.shapes[key]))
            for key in reader.read_metadata().state_dict_metadata
        }
    finally:
        ckpt.close()


def hf_tensors(
    plan: ConversionPlan, get_ours: Callable[[str], torch.Tensor], dtype: torch.dtype, cache_size: int = 4
) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors, one at a time, built from our tensors (fetched through a small LRU cache,
    since consecutive HF tensors mostly come from the same few of ours)."""
    cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def ours(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = get_ours(key)
            if len(cache) > cache_size:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    for name, links in plan.links_by_hf().items():
        out = torch.empty(links[0].hf_shape, dtype=dtype)
        for link in links:
            write_hf(link, ours(link.ours), out)
        yield name, out


def export(
    plan: ConversionPlan,
    hf_config: dict[str, Any],
    get_ours: Callable[[str], torch.Tensor],
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_from: Path | None = None,
    replace: bool = False,
) -> dict[str, int]:
    """Write the HF directory `out_dir` (complete or absent: see `write_sharded`), with the
    tokenizer files found at `tokenizer_from` (a prepared dataset or an HF model directory)."""
    from data.tokenizer import copy_tokenizer_files

    config = {
        **hf_config,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": _transformers_version(),
    }
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
    add_files = (lambda tmp: copy_tokenizer_files(tokenizer_from, tmp)) if tokenizer_from else None
    specs = [(name, links[0].hf_shape, dtype) for name, links in plan.links_by_hf().items()]
    tensors = hf_tensors(plan, get_ours, dtype)
    return write_sharded(out_dir, specs, tensors, files, max_shard_bytes, add_files, replace)


def _transformers_version() -> str:
    """For config.json, without importing transformers (a second of an export)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def dcp_tensor_source(sharded_dir: Path) -> Callable[[str], torch.Tensor]:
    """Our full tensors out of a DCP checkpoint, one key at a time, in this one process."""
    from trainer.checkpoint.storage import JsonFileSystemReader, read_json_metadata

    metadata = read_json_metadata(sharded_dir).state_dict_metadata

    def get(key: str) -> torch.Tensor:
        meta = metadata[f"model.{key}"]
        state = {f"model.{key}": torch.empty(tuple(meta.size), dtype=meta.properties.dtype)}
        dcp.load(state, storage_reader=JsonFileSystemReader(sharded_dir), no_dist=True)
        return state[f"model.{key}"]

    return get
