"""Token sources: documents exposed as one flat token stream with an EOD token after each document.

A `TokenStream` has `num_tokens`, `eod_id` and `gather(positions) -> tokens`. Readers:
- `ParquetTokens(split_dir)`: a split written by `python -m data.prepare`, checked against
  metadata.json (missing, truncated or corrupt shards are a DataError naming the file). Shards
  are read memory-mapped and their list column's values taken zero-copy, then copied once into
  one EOD-interleaved int32 array: Parquet decoding has put the tokens in RAM anyway, and a flat
  array makes every sample a plain slice.
- `MegatronTokens(prefix, eod_id)`: a Megatron-LM `.bin/.idx` indexed dataset, parsed by
  megatron-core's `IndexedDataset` (an optional extra, imported lazily). The `.bin` may be far
  larger than RAM, so it stays memory-mapped and `gather` inserts EODs through a per-document
  table instead of materialising the stream.

Both check on open that every token id and the EOD id lie in [0, vocab_size) of the dataset (the
trainer then checks model.vocab_size >= it), so no batch can index past the embedding: Parquet
from the per-shard min/max_token_id of metadata.json (computed once on open for datasets prepared
before they were recorded), Megatron with one min/max pass over the memory map.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import DataError, reprepare_hint

FORMAT_VERSION = 1  # of the prepared-dataset layout; data.prepare writes it, readers check it


class TokenStream:
    """A materialised stream: `tokens` already holds the EODs."""

    def __init__(self, tokens: np.ndarray, eod_id: int) -> None:
        self.tokens, self.eod_id = tokens, eod_id
        self.num_tokens = len(tokens)

    def gather(self, pos: np.ndarray) -> np.ndarray:
        """Tokens (int64) at stream positions `pos` (any shape, each in [0, num_tokens))."""
        return self.tokens[pos].astype(np.int64)


class DocumentStream(TokenStream):
    """Documents tokens[doc_offset[d] : doc_offset[d] + doc_len[d]], each followed by `eod_id`
    unless it already ends with it (Megatron's preprocess_data.py --append-eod)."""

    def __init__(self, tokens: np.ndarray, doc_offset: np.ndarray, doc_len: np.ndarray, eod_id: int) -> None:
        self.tokens, self.eod_id = tokens, eod_id
        self.doc_offset, self.doc_len = doc_offset.astype(np.int64), doc_len.astype(np.int64)
        nonempty = self.doc_len > 0
        ends_with_eod = np.zeros(len(doc_len), dtype=bool)
        ends_with_eod[nonempty] = tokens[(self.doc_offset + self.doc_len - 1)[nonempty]] == eod_id
        stream_len = self.doc_len + ~ends_with_eod
        self.doc_start = np.concatenate([[0], np.cumsum(stream_len)[:-1]]).astype(np.int64)
        self.num_tokens = int(stream_len.sum())

    def gather(self, pos: np.ndarray) -> np.ndarray:
        doc = np.searchsorted(self.doc_start, pos, side="right") - 1
        off = pos - self.doc_start[doc]
        inside = off < self.doc_len[doc]  # else: the EOD slot after the document
        out = np.full(pos.shape, self.eod_id, dtype=np.int64)
        out[inside] = self.tokens[(self.doc_offset[doc] + off)[inside]]
        return out


def _check_int(
    value: object, name: str, *, low: int = 0, high: int | None = None, nullable: bool = False
) -> None:
    """`value` (metadata field `name`) is an int in [low, high); a ValueError names the field else."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is {value!r} ({type(value).__name__}), expected an int")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} is {value}, expected an int in {bound}")


def _check_split(name: str, split: object) -> None:
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        raise ValueError(f"splits.{name} needs a 'shards' list")
    shards = split["shards"]
    for i, sh in enumerate(shards):
        where = f"splits.{name}.shards[{i}]"
        if not isinstance(sh, dict) or not isinstance(sh.get("file"), str) or not sh["file"]:
            raise ValueError(f"{where} needs a file name")
        if Path(sh["file"]).name != sh["file"] or sh["file"] in (".", ".."):
            # A downloaded dataset must not make us read outside its split directory.
            raise ValueError(f"{where}.file {sh['file']!r} is not a plain file name in the split directory")
        for key in ("bytes", "num_docs", "num_tokens"):
            _check_int(sh.get(key), f"{where}.{key}")
        # Optional: written since the id-range check; older datasets get them computed on open.
        for key in ("min_token_id", "max_token_id"):
            if key in sh:
                _check_int(sh[key], f"{where}.{key}", low=-(2**63), nullable=True)
    for key in ("num_docs", "num_tokens"):
        _check_int(split.get(key), f"splits.{name}.{key}")
        if sum(sh[key] for sh in shards) != split[key]:
            raise ValueError(f"split {name!r}: {key} disagrees with the sum over its shards")


def read_metadata(dataset_dir: Path) -> dict:
    """metadata.json of a prepared dataset, checked for the fields and sums the readers rely on."""
    path = Path(dataset_dir) / "metadata.json"
    if not Path(dataset_dir).is_dir():
        what = "is not a directory" if Path(dataset_dir).exists() else "does not exist"
        raise DataError(f"data: dataset dir {dataset_dir} {what}; create it with python -m data.prepare")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("expected a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {meta.get('format_version')}, this reader wants {FORMAT_VERSION}"
            )
        # The stream is int32, so the vocab must fit it.
        _check_int(meta.get("vocab_size"), "vocab_size", low=1, high=2**31)
        _check_int(meta.get("eod_id"), "eod_id", high=meta["vocab_size"])
        if not isinstance(meta.get("splits"), dict) or "train" not in meta["splits"]:
            raise ValueError("splits needs a 'train' entry")
        for name, split in meta["splits"].items():
            _check_split(name, split)
    except FileNotFoundError:
        raise DataError(f"data: {path} is missing; {reprepare_hint(dataset_dir)}") from None
    except (OSError, ValueError) as e:
        raise DataError(
            f"data: {path} is invalid ({type(e).__name__}: {e}); {reprepare_hint(dataset_dir)}"
        ) from None
    return meta


def _is_token_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type in (pa.int32(), pa.int64())


def _type_name(t: pa.DataType) -> str:
    """`list<float>` rather than Arrow's `list<element: float>`: the form the messages expect."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_type_name(t.value_type)}>"
    return str(t)


def _read_shard(path: Path, expected: dict, dataset_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(values, offsets) per Arrow chunk of one shard, validated against its metadata entry."""
    hint = reprepare_hint(dataset_dir)
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise DataError(f"data: shard {path} {what}; {hint}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"data: shard {path} is empty (0 bytes); {hint}")
    if size != expected["bytes"]:
        raise DataError(
            f"data: shard {path} has {size} bytes, metadata.json says {expected['bytes']}; {hint}"
        )
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data: shard {path} is corrupt ({reason}); {hint}") from None
    if "tokens" not in table.column_names:
        raise DataError(f"data: shard {path} has no column 'tokens' (it has {table.column_names}); {hint}")
    column = table.column("tokens")
    if not _is_token_list(column.type):
        raise DataError(
            f"data: shard {path} column 'tokens' has type {_type_name(column.type)}, expected list<int32> or "
            f"list<int64> (one list of token ids per document); {hint}"
        )
    chunks = [c for c in column.chunks if len(c)]
    if column.null_count or any(c.values.null_count for c in chunks):
        raise DataError(f"data: shard {path} column 'tokens' holds nulls; {hint}")
    # Zero-copy: the list column's flat values buffer and its offsets, as numpy views.
    values = [c.values.to_numpy(zero_copy_only=True) for c in chunks]
    offsets = [c.offsets.to_numpy(zero_copy_only=True) for c in chunks]
    num_docs, num_tokens = sum(len(o) - 1 for o in offsets), sum(int(o[-1] - o[0]) for o in offsets)
    if (num_docs, num_tokens) != (expected["num_docs"], expected["num_tokens"]):
        raise DataError(
            f"data: shard {path} holds {num_docs} docs / {num_tokens} tokens, metadata.json says "
            f"{expected['num_docs']} / {expected['num_tokens']}; {hint}"
        )
    return values, offsets


def _check_id_range(lo: int | None, hi: int | None, vocab_size: int, where: str, fix: str) -> None:
    """Token ids [lo, hi] must index an embedding of vocab_size rows (None, None: no tokens)."""
    if lo is not None and lo < 0:
        raise DataError(f"data: {where} holds token id {lo}; token ids must be >= 0; {fix}")
    if hi is not None and hi >= vocab_size:
        raise DataError(
            f"data: {where} holds token id {hi}, outside its vocab_size {vocab_size} (ids 0..{vocab_size - 1}); {fix}"
        )


def _shard_id_range(
    values: list[np.ndarray], offsets: list[np.ndarray], entry: dict
) -> tuple[int | None, int | None]:
    """(min, max) token id of a shard: metadata.json's, else (datasets prepared before they were
    recorded) computed once here, which is cheap next to the copy into the stream."""
    if "min_token_id" in entry and "max_token_id" in entry:
        return entry["min_token_id"], entry["max_token_id"]
    used = [v[o[0] : o[-1]] for v, o in zip(values, offsets) if o[-1] > o[0]]
    if not used:
        return None, None
    return min(int(u.min()) for u in used), max(int(u.max()) for u in used)


class ParquetTokens(TokenStream):
    """One split (`DIR/train` or `DIR/val`) of a dataset made by `python -m data.prepare`."""

    def __init__(self, split_dir: str | Path) -> None:
        split_dir = Path(split_dir)
        dataset_dir = split_dir.parent
        meta = read_metadata(dataset_dir)
        split = meta["splits"].get(split_dir.name)
        if split is None:
            raise DataError(
                f"data: {dataset_dir}/metadata.json has no split {split_dir.name!r}; {reprepare_hint(dataset_dir)}"
            )
        if split["num_tokens"] == 0:
            raise DataError(f"data: split {split_dir} has no tokens; prepare it with more input files")
        eod_id = int(meta["eod_id"])
        stream = np.full(split["num_tokens"] + split["num_docs"], eod_id, dtype=np.int32)
        end = 0  # stream position after the last copied document and its EOD
        vocab_size = int(meta["vocab_size"])
        for shard in split["shards"]:
            path = split_dir / shard["file"]
            values, offsets = _read_shard(path, shard, dataset_dir)
            # Checked before the copy: an int64 id past the int32 range would wrap silently there.
            lo, hi = _shard_id_range(values, offsets, shard)
            _check_id_range(lo, hi, vocab_size, f"shard {path}", reprepare_hint(dataset_dir))
            for v, o in zip(values, offsets):
                doc_len = np.diff(o)
                # token t of the chunk goes to end + t + (its document's index): one EOD slot per document
                dest = end + np.arange(o[-1] - o[0]) + np.repeat(np.arange(len(doc_len)), doc_len)
                stream[dest] = v[o[0] : o[-1]]
                end += int(o[-1] - o[0]) + len(doc_len)
        super().__init__(stream, eod_id)
        self.metadata, self.path, self.num_docs = meta, split_dir, split["num_docs"]
        self.vocab_size = vocab_size


def _megatron_index(prefix: str):  # -> megatron's _IndexReader
    """Parse `<prefix>.idx` with megatron-core's IndexedDataset (imported here: an optional extra)."""
    try:
        with warnings.catch_warnings():  # megatron.core's import warns about absent GPU extras
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise DataError(
            f"data: reading the Megatron dataset {prefix} needs megatron-core; pip install 'moeforge[megatron]'"
        ) from None

    class _Indexed(IndexedDataset):
        def __del__(self) -> None:
            # Megatron's __del__ raises (and prints a traceback) on a half-built object.
            if hasattr(self, "bin_reader") and hasattr(self, "index"):
                super().__del__()

    return _Indexed(prefix, mmap=True).index


def _read_sidecar(sidecar: Path) -> dict:
    """`<prefix>.json` ({"eod_id": N, "vocab_size": V}, both optional), or {} if absent."""
    if not sidecar.exists():
        return {}
    try:
        side = json.loads(sidecar.read_text())
        if not isinstance(side, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as e:
        raise DataError(f"data: sidecar {sidecar} is not valid JSON ({e}); fix or delete it") from None
    try:
        if "vocab_size" in side:
            _check_int(side["vocab_size"], "vocab_size", low=1)
        if "eod_id" in side:
            _check_int(side["eod_id"], "eod_id")
    except ValueError as e:
        raise DataError(f"data: sidecar {sidecar}: {e}; fix or delete it") from None
    return side


_ID_RANGE_CHUNK = 1 << 26  # tokens per step: min and max read each chunk once from disk, not twice


@functools.lru_cache(maxsize=32)
def _id_range(bin_path: str, dtype: str, size: int, mtime_ns: int) -> tuple[int | None, int | None]:
    """(min, max) token id of a Megatron .bin, None for an empty one: one vectorised pass over the
    memory map (disk-bound: ~1 min per 100 GB). Cached on (path, size, mtime) because the loader
    opens a source up to three times (vocab size, train, val)."""
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    if len(tokens) == 0:
        return None, None
    lo, hi = int(tokens[0]), int(tokens[0])
    for start in range(0, len(tokens), _ID_RANGE_CHUNK):
        chunk = tokens[start : start + _ID_RANGE_CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


class MegatronTokens(DocumentStream):
    """A Megatron `.bin/.idx` dataset at `prefix`; documents joined with an EOD token.

    The EOD id comes from `eod_id` if >= 0, else from the sidecar `<prefix>.json`
    ({"eod_id": N, "vocab_size": V}), written by whoever tokenized the data. Documents already
    ending with it (Megatron's preprocess_data.py --append-eod) get no second EOD. vocab_size is
    the sidecar's (every token id and the EOD must lie below it), else max(max token id, EOD) + 1.
    """

    def __init__(self, prefix: str | Path, eod_id: int = -1) -> None:
        prefix = str(prefix)
        bin_path, idx_path, sidecar = Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".json")
        for p in (bin_path, idx_path):
            if not p.is_file():
                what = "is not a file" if p.exists() else "is missing"
                raise DataError(
                    f"data: Megatron dataset file {p} {what}; check the source path prefix {prefix}"
                )
            if p.stat().st_size == 0:
                raise DataError(f"data: Megatron dataset file {p} is empty (0 bytes); rebuild it")
        side = _read_sidecar(sidecar)
        eod_id = eod_id if eod_id >= 0 else side.get("eod_id", -1)
        if eod_id < 0:
            raise DataError(
                f"data: no EOD token id for Megatron dataset {prefix}; set the source's eod_id or write "
                f'{sidecar} with {{"eod_id": N, "vocab_size": V}}'
            )
        try:
            index = _megatron_index(prefix)
            tokens = np.memmap(bin_path, dtype=index.dtype, mode="r")
        except DataError:
            raise
        except Exception as e:  # megatron's parser fails on damaged files with assert/struct/numpy errors
            raise DataError(
                f"data: Megatron dataset {idx_path} is corrupt ({type(e).__name__}: {e}); rebuild it"
            ) from None
        # A document is a run of sequences; in a .bin they lie back to back, so token offsets are
        # cumulative sequence lengths taken at the document boundaries.
        seq_start = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
        if seq_start[-1] != len(tokens):
            raise DataError(
                f"data: Megatron file {bin_path} holds {len(tokens)} tokens, {idx_path} says {seq_start[-1]}; rebuild it"
            )
        doc_bounds = seq_start[np.asarray(index.document_indices, dtype=np.int64)]
        super().__init__(tokens, doc_bounds[:-1], np.diff(doc_bounds), eod_id)
        self.path = Path(prefix)
        try:
            st = bin_path.stat()
            lo, hi = _id_range(str(bin_path), np.dtype(index.dtype).str, st.st_size, st.st_mtime_ns)
        except OSError as e:
            raise DataError(
                f"data: cannot read Megatron file {bin_path} ({e.strerror or e}); check it"
            ) from None
        if "vocab_size" in side:
            self.vocab_size = side["vocab_size"]
            fix = f"fix vocab_size in {sidecar} or rebuild {bin_path}"
            if eod_id >= self.vocab_size:
                raise DataError(
                    f"data: EOD token id {eod_id} of Megatron dataset {prefix} is outside the vocab_size "
                    f"{self.vocab_size} of {sidecar}; set the source's eod_id to a token below it or fix the sidecar"
                )
        else:  # the ids are the vocab: the trainer checks model.vocab_size covers them
            self.vocab_size, fix = max(hi if hi is not None else 0, eod_id) + 1, f"rebuild {bin_path}"
        _check_id_range(lo, hi, self.vocab_size, f"Megatron file {bin_path}", fix)
