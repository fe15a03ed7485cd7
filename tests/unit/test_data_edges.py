"""data/ at its edges, as a new user meets them: token ids outside the vocab, Parquet columns of
the wrong type, empty or misplaced files, metadata.json with wrong field types, and
`python -m data.prepare` given a bad --vocab-size or an --output it cannot write. Each is one
DataError line naming the file (or field) and the fix; prepare's main exits 2 with one stderr
line and leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data.prepare as prep
from data import DataError, build_train_loader
from data.config import DataConfig, DataSourceConfig
from data.dataset import MegatronTokens, ParquetTokens

HINT = "re-run python -m data.prepare"


def _copy(small_dataset: Path, tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    shutil.copytree(small_dataset, ds)
    return ds


def _meta(ds: Path) -> dict:
    return json.loads((ds / "metadata.json").read_text())


def _write_meta(ds: Path, meta: dict) -> None:
    (ds / "metadata.json").write_text(json.dumps(meta))


def _put_shard(ds: Path, tokens: pa.Array, *, id_range: bool = True) -> Path:
    """Replace train shard 0 with a one-column table `tokens`; metadata.json then agrees with it in
    size (and, for a list column, counts and id range; without `id_range`, as before it was recorded)."""
    path = ds / "train" / "shard-00000.parquet"
    pq.write_table(pa.table({"tokens": tokens}), path)
    meta = _meta(ds)
    split = meta["splits"]["train"]
    entry = split["shards"][0]
    entry["bytes"] = path.stat().st_size
    if pa.types.is_list(tokens.type):
        flat = tokens.flatten().to_numpy()
        entry.update(num_docs=len(tokens), num_tokens=len(flat))
        entry.update(min_token_id=int(flat.min()), max_token_id=int(flat.max()))
        for key in ("num_docs", "num_tokens"):
            split[key] = sum(sh[key] for sh in split["shards"])
    if not id_range:
        for sh in split["shards"]:
            del sh["min_token_id"], sh["max_token_id"]
    _write_meta(ds, meta)
    return path


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# ---- token id range ----------------------------------------------------------------------------


def test_prepare_records_each_shards_token_id_range(small_dataset: Path) -> None:
    for name, split in _meta(small_dataset)["splits"].items():
        for sh in split["shards"]:
            col = pq.read_table(small_dataset / name / sh["file"]).column("tokens").combine_chunks()
            flat = col.flatten().to_numpy()
            assert (sh["min_token_id"], sh["max_token_id"]) == (int(flat.min()), int(flat.max()))


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "old-metadata"])
@pytest.mark.parametrize("bad_id", [512, -3], ids=["at-vocab", "negative"])
def test_parquet_token_id_outside_vocab_is_refused_on_open(
    small_dataset: Path, tmp_path: Path, recorded: bool, bad_id: int
) -> None:
    ds = _copy(small_dataset, tmp_path)  # vocab 512: ids 0..511
    shard = _put_shard(ds, pa.array([[1, 2, 3], [4, bad_id, 5]], pa.list_(pa.int32())), id_range=recorded)
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), f"token id {bad_id}", HINT)


def test_int64_id_past_int32_is_refused_not_wrapped(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    shard = _put_shard(ds, pa.array([[1, 2**32 + 7]], pa.list_(pa.int64())), id_range=False)
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), f"token id {2**32 + 7}", "vocab_size 512")


def test_old_metadata_without_id_range_still_opens(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    meta = _meta(ds)
    for split in meta["splits"].values():
        for sh in split["shards"]:
            del sh["min_token_id"], sh["max_token_id"]
    _write_meta(ds, meta)
    np.testing.assert_array_equal(
        ParquetTokens(ds / "train").tokens, ParquetTokens(small_dataset / "train").tokens
    )


def test_list_int64_column_is_accepted(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    _put_shard(ds, pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int64())))
    assert ParquetTokens(ds / "train").tokens[:7].tolist() == [1, 2, 3, 0, 4, 5, 0]  # EOD id 0


def test_parquet_eod_id_outside_vocab_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    _write_meta(ds, {**_meta(ds), "eod_id": 512})
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(ds / "metadata.json"), "eod_id is 512", HINT)


def _write_megatron(prefix: Path, docs: list[list[int]], sidecar: dict | None = None) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    if sidecar is not None:
        Path(f"{prefix}.json").write_text(json.dumps(sidecar))


def test_megatron_token_id_above_sidecar_vocab_is_refused(tmp_path: Path) -> None:
    _write_megatron(tmp_path / "m", [[1, 2, 3], [4, 100, 5]], {"eod_id": 0, "vocab_size": 100})
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m")
    _one_line(
        e, f"{tmp_path}/m.bin", "token id 100", "vocab_size 100", f"fix vocab_size in {tmp_path}/m.json"
    )


def test_megatron_negative_token_id_is_refused(tmp_path: Path) -> None:
    _write_megatron(tmp_path / "m", [[1, -2, 3]], {"eod_id": 0})
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m")
    _one_line(e, f"{tmp_path}/m.bin", "token id -2", "must be >= 0")


@pytest.mark.parametrize("from_config", [False, True], ids=["sidecar-eod", "config-eod"])
def test_megatron_eod_id_outside_vocab_is_refused(tmp_path: Path, from_config: bool) -> None:
    side = {"vocab_size": 100} if from_config else {"vocab_size": 100, "eod_id": 100}
    _write_megatron(tmp_path / "m", [[1, 2, 3]], side)
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m", eod_id=100 if from_config else -1)
    _one_line(e, f"{tmp_path}/m", "EOD token id 100", "vocab_size 100", "set the source's eod_id")


def test_megatron_without_sidecar_vocab_covers_its_ids_and_eod(tmp_path: Path) -> None:
    _write_megatron(tmp_path / "m", [[1, 2, 30]])
    assert MegatronTokens(tmp_path / "m", eod_id=50).vocab_size == 51  # what model.vocab_size must cover
    assert MegatronTokens(tmp_path / "m", eod_id=5).vocab_size == 31


@pytest.mark.parametrize(
    "side", [{"eod_id": "0"}, {"eod_id": 0, "vocab_size": 12.5}], ids=["str-eod", "float-vocab"]
)
def test_megatron_sidecar_field_of_wrong_type_is_refused(tmp_path: Path, side: dict) -> None:
    _write_megatron(tmp_path / "m", [[1, 2, 3]], side)
    field = "vocab_size" if "vocab_size" in side else "eod_id"
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m")
    _one_line(e, f"{tmp_path}/m.json", field, "expected an int", "fix or delete it")


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_megatron_zero_byte_file_is_refused(tmp_path: Path, suffix: str) -> None:
    _write_megatron(tmp_path / "m", [[1, 2, 3]], {"eod_id": 0})
    Path(f"{tmp_path}/m{suffix}").write_bytes(b"")
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m")
    _one_line(e, f"{tmp_path}/m{suffix}", "is empty (0 bytes)", "rebuild it")


# ---- Parquet schema and files ------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, found",
    [
        (pa.array([1, 2, 3], pa.int32()), "type int32"),
        (pa.array([[1.0, 2.0]], pa.list_(pa.float32())), "type list<float>"),
        (pa.array([1.5, 2.5], pa.float64()), "type double"),
        (pa.array([[1, 2]], pa.list_(pa.int16())), "type list<int16>"),
    ],
    ids=["flat-int", "list-float", "float", "list-int16"],
)
def test_token_column_of_wrong_type_is_refused(
    small_dataset: Path, tmp_path: Path, tokens: pa.Array, found: str
) -> None:
    ds = _copy(small_dataset, tmp_path)
    shard = _put_shard(ds, tokens)
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), "column 'tokens'", found, "expected list<int32> or list<int64>", HINT)


def test_shard_without_tokens_column_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    shard = ds / "train" / "shard-00000.parquet"
    pq.write_table(pa.table({"ids": pa.array([[1, 2]], pa.list_(pa.int32()))}), shard)
    meta = _meta(ds)
    meta["splits"]["train"]["shards"][0]["bytes"] = shard.stat().st_size
    _write_meta(ds, meta)
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), "no column 'tokens'", "['ids']", HINT)


@pytest.mark.parametrize("metadata_agrees", [False, True], ids=["size-mismatch", "metadata-says-0"])
def test_zero_byte_shard_is_refused(small_dataset: Path, tmp_path: Path, metadata_agrees: bool) -> None:
    ds = _copy(small_dataset, tmp_path)
    shard = ds / "train" / "shard-00000.parquet"
    shard.write_bytes(b"")
    if metadata_agrees:
        meta = _meta(ds)
        meta["splits"]["train"]["shards"][0]["bytes"] = 0
        _write_meta(ds, meta)
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), "is empty (0 bytes)", HINT)


def test_shard_that_is_a_directory_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    ds = _copy(small_dataset, tmp_path)
    shard = ds / "train" / "shard-00000.parquet"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(DataError) as e:
        ParquetTokens(ds / "train")
    _one_line(e, str(shard), "is not a file", HINT)


def test_dataset_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").write_text("not a dir")
    with pytest.raises(DataError) as e:
        ParquetTokens(tmp_path / "ds" / "train")
    _one_line(e, str(tmp_path / "ds"), "is not a directory", "python -m data.prepare")


def _set(meta: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("vocab_size", "512", "vocab_size is '512' (str)"),
        ("vocab_size", 2**31, "vocab_size is 2147483648"),
        ("eod_id", True, "eod_id is True (bool)"),
        ("splits", [], "splits needs a 'train' entry"),
        ("splits.train.shards", 3, "splits.train needs a 'shards' list"),
        ("splits.train.shards.0.num_docs", 10.0, "splits.train.shards[0].num_docs is 10.0 (float)"),
        ("splits.train.shards.0.file", None, "splits.train.shards[0] needs a file name"),
        ("splits.train.shards.0.max_token_id", "9", "splits.train.shards[0].max_token_id is '9'"),
        ("splits.train.num_tokens", -1, "splits.train.num_tokens is -1"),
    ],
)
def test_metadata_field_of_wrong_type_is_refused(
    small_dataset: Path, tmp_path: Path, field: str, value: object, named: str
) -> None:
    ds = _copy(small_dataset, tmp_path)
    meta = _meta(ds)
    _set(meta, field, value)
    _write_meta(ds, meta)
    with pytest.raises(DataError) as e:
        build_train_loader(DataConfig(sources=[DataSourceConfig(str(ds))], seq_len=16), seed=0)
    _one_line(e, str(ds / "metadata.json"), "is invalid", named, HINT)


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), "1"], ids=["inf", "nan", "str"])
def test_non_finite_source_weight_is_refused(small_dataset: Path, weight: object) -> None:
    with pytest.raises(DataError) as e:
        build_train_loader(DataConfig(sources=[DataSourceConfig(str(small_dataset), weight=weight)]), seed=0)
    _one_line(e, "sources[0]", "weights must be finite and > 0")


# ---- python -m data.prepare --------------------------------------------------------------------


def _tree(root: Path) -> list[tuple[str, str]]:
    """Every path under root with a hash of its content (files) or 'dir': what a run wrote."""
    return sorted(
        (str(p.relative_to(root)), "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
    )


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    for i in range(3):
        (tmp_path / "corpus" / f"doc{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"doc{i}.txt").write_text(f"document {i}: some words to tokenize\n" * 5)
    return str(tmp_path / "corpus" / "*.txt")


def _refused(argv: list[str], root: Path, capsys: pytest.CaptureFixture) -> str:
    """Run prepare's main: exit code 2, one stderr line, no traceback, nothing written under root."""
    before = _tree(root)
    try:
        rc = prep.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _tree(root) == before
    return err


@pytest.mark.parametrize("size", ["0", "-5", "100"])
def test_prepare_refuses_a_vocab_size_below_the_byte_alphabet(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture, size: str
) -> None:
    err = _refused(
        ["--input", corpus, "--output", str(tmp_path / "ds"), "--vocab-size", size], tmp_path, capsys
    )
    assert f"vocab size {size} " in err and "at least 257" in err and "--vocab-size 257" in err


def test_prepare_usage_error_is_one_line(tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture) -> None:
    err = _refused(
        ["--input", corpus, "--output", str(tmp_path / "ds"), "--vocab-size", "abc"], tmp_path, capsys
    )
    assert "--vocab-size: invalid int value: 'abc'" in err and "see --help" in err


def test_prepare_refuses_output_under_a_regular_file(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "somefile").write_text("x")
    out = tmp_path / "somefile" / "sub" / "ds"
    err = _refused(["--input", corpus, "--output", str(out)], tmp_path, capsys)
    assert f"--output {out}" in err and f"{tmp_path}/somefile is a file, not a directory" in err


def test_prepare_refuses_output_in_a_read_only_dir(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kw):  # root ignores mode bits: make the refusal real for any uid
        if Path(path).is_relative_to(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        err = _refused(["--input", corpus, "--output", str(ro / "new" / "ds")], tmp_path, capsys)
    finally:
        ro.chmod(0o755)
    assert f"--output {ro}/new/ds cannot be created (Permission denied" in err and "writable --output" in err


def test_prepare_os_error_midway_leaves_nothing_behind(
    tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(table, where, *args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(prep.pq, "write_table", full_disk)
    out = tmp_path / "new" / "deeper" / "ds"  # parents that prepare makes are removed again
    err = _refused(["--input", corpus, "--output", str(out), "--vocab-size", "300"], tmp_path, capsys)
    assert (
        f"preparing --output {out} failed (No space left on device: " in err and "nothing was written" in err
    )


def test_unwritable_default_corpus_cache_is_refused(tmp_path: Path) -> None:
    (tmp_path / "somefile").write_text("x")
    with pytest.raises(DataError) as e:
        build_train_loader(DataConfig(cache_dir=str(tmp_path / "somefile" / "cache")), seed=0)
    _one_line(e, f"{tmp_path}/somefile/cache", "set data.cache_dir to a writable directory")
