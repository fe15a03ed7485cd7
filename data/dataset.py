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
"""

from __future__ import annotations

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


def read_metadata(dataset_dir: Path) -> dict:
    """metadata.json of a prepared dataset, checked for the fields and sums the readers rely on."""
    path = Path(dataset_dir) / "metadata.json"
    if not Path(dataset_dir).is_dir():
        raise DataError(
            f"data: dataset dir {dataset_dir} does not exist; create it with python -m data.prepare"
        )
    try:
        meta = json.loads(path.read_text())
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format_version {meta['format_version']}, this reader wants {FORMAT_VERSION}")
        _ = int(meta["vocab_size"]), int(meta["eod_id"]), meta["splits"]["train"]
        for name, split in meta["splits"].items():
            shards = split["shards"]
            if not all(isinstance(sh["file"], str) and isinstance(sh["bytes"], int) for sh in shards):
                raise ValueError(f"split {name!r}: shard entries need a file name and a byte size")
            for key in ("num_docs", "num_tokens"):
                if sum(int(sh[key]) for sh in shards) != split[key]:
                    raise ValueError(f"split {name!r}: {key} disagrees with the sum over its shards")
    except FileNotFoundError:
        raise DataError(f"data: {path} is missing; {reprepare_hint(dataset_dir)}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"data: {path} is invalid ({type(e).__name__}: {e}); {reprepare_hint(dataset_dir)}"
        ) from None
    return meta


def _read_shard(path: Path, expected: dict, dataset_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(values, offsets) per Arrow chunk of one shard, validated against its metadata entry."""
    hint = reprepare_hint(dataset_dir)
    if not path.is_file():
        raise DataError(f"data: shard {path} is missing; {hint}")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise DataError(
            f"data: shard {path} has {size} bytes, metadata.json says {expected['bytes']}; {hint}"
        )
    try:
        column = pq.read_table(path, columns=["tokens"], memory_map=True).column("tokens")
        # Zero-copy: the list column's flat values buffer and its offsets, as numpy views.
        chunks = [c for c in column.chunks if len(c)]
        values = [c.values.to_numpy(zero_copy_only=True) for c in chunks]
        offsets = [c.offsets.to_numpy(zero_copy_only=True) for c in chunks]
    except (pa.ArrowException, OSError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data: shard {path} is corrupt ({reason}); {hint}") from None
    num_docs, num_tokens = sum(len(o) - 1 for o in offsets), sum(int(o[-1] - o[0]) for o in offsets)
    if (num_docs, num_tokens) != (expected["num_docs"], expected["num_tokens"]):
        raise DataError(
            f"data: shard {path} holds {num_docs} docs / {num_tokens} tokens, metadata.json says "
            f"{expected['num_docs']} / {expected['num_tokens']}; {hint}"
        )
    return values, offsets


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
        for shard in split["shards"]:
            values, offsets = _read_shard(split_dir / shard["file"], shard, dataset_dir)
            for v, o in zip(values, offsets):
                doc_len = np.diff(o)
                # token t of the chunk goes to end + t + (its document's index): one EOD slot per document
                dest = end + np.arange(o[-1] - o[0]) + np.repeat(np.arange(len(doc_len)), doc_len)
                stream[dest] = v[o[0] : o[-1]]
                end += int(o[-1] - o[0]) + len(doc_len)
        super().__init__(stream, eod_id)
        self.metadata, self.path, self.num_docs = meta, split_dir, split["num_docs"]
        self.vocab_size = int(meta["vocab_size"])


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


class MegatronTokens(DocumentStream):
    """A Megatron `.bin/.idx` dataset at `prefix`; documents joined with an EOD token.

    The EOD id comes from `eod_id` if >= 0, else from the sidecar `<prefix>.json`
    ({"eod_id": N, "vocab_size": V}), written by whoever tokenized the data. Documents already
    ending with it (Megatron's preprocess_data.py --append-eod) get no second EOD. vocab_size is
    the sidecar's, else max token id + 1.
    """

    def __init__(self, prefix: str | Path, eod_id: int = -1) -> None:
        prefix = str(prefix)
        bin_path, idx_path, sidecar = Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".json")
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(
                    f"data: Megatron dataset file {p} is missing; check the source path prefix {prefix}"
                )
        side: dict = {}
        if sidecar.is_file():
            try:
                side = json.loads(sidecar.read_text())
                if not isinstance(side, dict):
                    raise ValueError("expected a JSON object")
            except (OSError, ValueError) as e:
                raise DataError(
                    f"data: sidecar {sidecar} is not valid JSON ({e}); fix or delete it"
                ) from None
        eod_id = eod_id if eod_id >= 0 else int(side.get("eod_id", -1))
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
        self.vocab_size = int(side.get("vocab_size", max(int(tokens.max(initial=0)), eod_id) + 1))
