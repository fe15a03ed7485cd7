"""data/: prepare -> Parquet/Megatron token streams -> packed, shuffled, blended, rank-sharded,
resumable micro-batches, and the DataError raised for every kind of bad input."""

from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

import data.prepare as prep
from data import DataError, build_train_loader, build_val_batches, dataset_vocab_size
from data.blending import blend_schedule
from data.config import DataConfig, DataSourceConfig
from data.dataset import MegatronTokens, ParquetTokens
from data.packing import PackedSamples

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return class if else".split()


def _write_corpus(root: Path, num_files: int = 16) -> dict[str, str]:
    rng = random.Random(0)
    texts = {}
    for i in range(num_files):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(20, 60))
        ]
        text = f"# doc {i} héllo ✓\n" + "\n".join(lines) + "\n"
        path = root / f"sub{i % 3}" / f"file{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        texts[path.relative_to(root).as_posix()] = text
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, _write_corpus(root)


@pytest.fixture(scope="module")
def dataset(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "ds"
    files = sorted(root.rglob("*.txt"))
    prep.prepare(files, out, vocab_size=400, val_fraction=0.25, seed=7, shard_tokens=3000)
    return out


def _docs(split_dir: Path) -> list[list[int]]:
    meta = json.loads((split_dir.parent / "metadata.json").read_text())
    shards = meta["splits"][split_dir.name]["shards"]
    return [d for s in shards for d in pq.read_table(split_dir / s["file"]).column("tokens").to_pylist()]


def _cfg(ds: Path, **kw) -> DataConfig:
    return DataConfig(
        sources=[DataSourceConfig(path=str(ds))], **{"seq_len": 32, "micro_batch_size": 4, **kw}
    )


def _take(loader, n: int) -> list[torch.Tensor]:
    return [next(loader).tokens for _ in range(n)]


# ---- prepare ---------------------------------------------------------------------------------


def test_prepare_round_trip_and_split(dataset: Path, corpus: tuple[Path, dict[str, str]]) -> None:
    _, texts = corpus
    tok = Tokenizer.from_file(str(dataset / "tokenizer.json"))
    decoded = {s: [tok.decode(d) for d in _docs(dataset / s)] for s in ("train", "val")}
    assert sorted(decoded["train"] + decoded["val"]) == sorted(texts.values())  # every doc, exactly
    assert decoded["val"] and not set(decoded["train"]) & set(decoded["val"])
    expected_val = {t for rel, t in texts.items() if prep.split_of(rel, 7, 0.25) == "val"}
    assert set(decoded["val"]) == expected_val  # the hash of the relative path decides


def test_metadata(dataset: Path, corpus: tuple[Path, dict[str, str]]) -> None:
    meta = json.loads((dataset / "metadata.json").read_text())
    tok = Tokenizer.from_file(str(dataset / meta["tokenizer"]))
    assert meta["format_version"] == prep.FORMAT_VERSION
    assert meta["eod_id"] == tok.token_to_id("<|eod|>") and meta["vocab_size"] == tok.get_vocab_size()
    assert meta["sources"]["num_files"] == len(corpus[1])
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens forced several shards
    for split in ("train", "val"):
        docs = _docs(dataset / split)
        info = meta["splits"][split]
        assert (info["num_docs"], info["num_tokens"]) == (len(docs), sum(map(len, docs)))
        for shard in info["shards"]:
            assert (dataset / split / shard["file"]).stat().st_size == shard["bytes"]
    assert not list(dataset.parent.glob("ds.tmp-*"))


def test_prepare_is_deterministic(dataset: Path, corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    files = sorted(corpus[0].rglob("*.txt"), reverse=True)  # input order must not matter
    prep.prepare(files, tmp_path / "again", vocab_size=400, val_fraction=0.25, seed=7, shard_tokens=3000)
    for split in ("train", "val"):
        assert _docs(tmp_path / "again" / split) == _docs(dataset / split)
    other = {rel: prep.split_of(rel, 8, 0.25) for rel in corpus[1]}
    assert other != {rel: prep.split_of(rel, 7, 0.25) for rel in corpus[1]}  # the seed changes the split


def test_prepare_refuses_existing_output_and_cleans_up(
    dataset: Path, corpus, tmp_path: Path, monkeypatch
) -> None:
    files = sorted(corpus[0].rglob("*.txt"))
    with pytest.raises(DataError, match=str(dataset)):
        prep.prepare(files, dataset, vocab_size=400, val_fraction=0.25, seed=7)

    def boom(*args, **kw):
        raise KeyboardInterrupt  # an interrupted prepare

    monkeypatch.setattr(prep, "train_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(files, tmp_path / "out", vocab_size=400, val_fraction=0.25, seed=7)
    assert list(tmp_path.iterdir()) == []  # neither a half-written dataset nor its tmp dir


def test_cli_on_real_stdlib_files(tmp_path: Path, capsys) -> None:
    pattern = f"{sysconfig.get_paths()['stdlib']}/json/*.py"
    rc = prep.main(
        ["--input", pattern, "--output", str(tmp_path / "j"), "--vocab-size", "512", "--val-fraction", "0.2"]
    )
    assert rc == 0 and "train" in capsys.readouterr().out
    tok = Tokenizer.from_file(str(tmp_path / "j" / "tokenizer.json"))
    texts = {p.read_text() for p in Path(pattern).parent.glob("*.py")}
    assert {tok.decode(d) for s in ("train", "val") for d in _docs(tmp_path / "j" / s)} == texts
    assert prep.main(["--input", str(tmp_path / "nothing*"), "--output", str(tmp_path / "x")]) == 2
    assert "no input files" in capsys.readouterr().err


@pytest.mark.slow
def test_default_corpus_is_prepared_once_under_concurrency(tmp_path: Path, monkeypatch) -> None:
    files = sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
    assert len(prep.default_corpus_files()) > 300 and all("site-packages" not in str(f) for f in files)
    monkeypatch.setattr(prep, "default_corpus_files", lambda: files)
    calls, real = [], prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = DataConfig(cache_dir=str(tmp_path), tokenizer_vocab_size=300)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(prep.ensure_default_corpus(cfg))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "metadata.json").is_file()
    assert (
        results[0].name.startswith("stdlib-py")
        and dataset_vocab_size(DataConfig(cache_dir=str(tmp_path))) > 0
    )


# ---- streams and packing ---------------------------------------------------------------------


def test_parquet_stream_interleaves_eod(dataset: Path) -> None:
    stream = ParquetTokens(dataset / "train")
    docs = _docs(dataset / "train")
    expected = np.concatenate([np.array(d + [stream.eod_id]) for d in docs])
    assert stream.num_tokens == len(expected) and stream.num_docs == len(docs)
    np.testing.assert_array_equal(stream.gather(np.arange(len(expected))), expected)


def test_packing_windows(dataset: Path) -> None:
    stream = ParquetTokens(dataset / "train")
    S = 32
    packed = PackedSamples(stream, S)
    assert len(packed) == (stream.num_tokens - 1) // S
    flat = stream.gather(np.arange(stream.num_tokens))
    w = packed.windows(np.array([0, 1, len(packed) - 1]))
    np.testing.assert_array_equal(w[1], flat[S : 2 * S + 1])
    assert w[0][-1] == w[1][0]  # consecutive windows overlap by one token
    batch = next(build_train_loader(_cfg(dataset, seq_len=S), seed=0))
    assert batch.tokens.shape == (4, S) and batch.tokens.dtype == torch.int64
    assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])  # labels are inputs shifted by one


# ---- order, resume, ranks, blending ------------------------------------------------------------


def test_order_deterministic_and_epochs_are_permutations(dataset: Path) -> None:
    cfg = _cfg(dataset, micro_batch_size=1)
    a, b, c = (build_train_loader(cfg, seed=s) for s in (1, 1, 2))
    n = a.samples.epoch_len
    seq_a = _take(a, 2 * n)
    assert all(torch.equal(x, y) for x, y in zip(seq_a, _take(b, 2 * n)))
    assert not all(torch.equal(x, y) for x, y in zip(seq_a, _take(c, 2 * n)))
    packed = a.samples.sources[0]
    every = {tuple(w[:-1]) for w in packed.windows(np.arange(n))}
    epoch0, epoch1 = [{tuple(t[0].tolist()) for t in seq_a[e * n : (e + 1) * n]} for e in (0, 1)]
    assert epoch0 == every == epoch1  # each epoch reads every sample once
    assert [t[0].tolist() for t in seq_a[:n]] != [t[0].tolist() for t in seq_a[n:]]  # reshuffled


@pytest.mark.parametrize("steps", [3, "epoch"])
def test_resume_matches_uninterrupted(dataset: Path, steps) -> None:
    cfg = _cfg(dataset, micro_batch_size=5)
    ref = build_train_loader(cfg, seed=3)
    # "epoch": stop just before an epoch boundary so that the next batches straddle it
    k = ref.samples.epoch_len // 5 if steps == "epoch" else steps
    expected = _take(ref, k + 3)
    first = build_train_loader(cfg, seed=3)
    _take(first, k)
    state = first.state_dict()
    assert all(isinstance(v, int) for v in state.values()) and state["consumed_samples"] == 5 * k
    resumed = build_train_loader(cfg, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, y) for x, y in zip(_take(resumed, 3), expected[k:]))


def test_dp_ranks_interleave_single_process_sequence(dataset: Path) -> None:
    cfg = _cfg(dataset)
    single = _take(build_train_loader(cfg, seed=5), 8)
    ranks = [_take(build_train_loader(cfg, seed=5, dp_rank=r, dp_size=2), 4) for r in range(2)]
    for k in range(4):
        for r in range(2):
            assert torch.equal(ranks[r][k], single[k * 2 + r])
    # a dp=1 state continues at dp=2: the cursor is global
    one = build_train_loader(cfg, seed=5)
    _take(one, 4)
    two = [build_train_loader(cfg, seed=5, dp_rank=r, dp_size=2) for r in range(2)]
    for r, loader in enumerate(two):
        loader.load_state_dict(one.state_dict())
        assert torch.equal(next(loader).tokens, single[4 + r])


def test_val_batches_deterministic_and_sharded(dataset: Path) -> None:
    cfg = _cfg(dataset, val_batches=3)
    single = build_val_batches(cfg)
    assert len(single) == 3 and all(
        torch.equal(x.tokens, y.tokens) for x, y in zip(single, build_val_batches(cfg))
    )
    wide = build_val_batches(_cfg(dataset, val_batches=6))
    r1 = build_val_batches(cfg, dp_rank=1, dp_size=2)
    assert all(torch.equal(r1[k].tokens, wide[2 * k + 1].tokens) for k in range(3))
    val_flat = ParquetTokens(dataset / "val").gather(np.arange(33))
    assert single[0].tokens[0].tolist() == val_flat[:32].tolist()  # no shuffle: starts at the start


def test_blend_schedule_shares_track_weights() -> None:
    weights = [0.5, 0.3, 0.2]
    source, pick = blend_schedule([5, 3, 2], 1000)
    counts = np.zeros(3)
    for n, s in enumerate(source, start=1):
        counts[s] += 1
        assert np.abs(counts - n * np.array(weights)).max() <= 1.5
    for s in range(3):
        np.testing.assert_array_equal(pick[source == s], np.arange((source == s).sum()))


def _write_megatron(prefix: Path, docs: list[list[int]], sidecar: dict | None = None) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in docs:  # two sequences per document: documents, not sequences, get the EOD
        half = len(doc) // 2
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [half, len(doc) - half])
    builder.finalize(str(prefix) + ".idx")
    if sidecar is not None:
        Path(str(prefix) + ".json").write_text(json.dumps(sidecar))


@pytest.mark.slow
def test_megatron_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 900, rng.integers(5, 40)).tolist() for _ in range(30)] + [[5, 6, 0]]
    _write_megatron(tmp_path / "m", docs, {"eod_id": 0, "vocab_size": 1000})
    stream = MegatronTokens(tmp_path / "m")
    expected = np.concatenate([d + [0] for d in docs[:-1]] + [docs[-1]])  # one already ends with EOD
    np.testing.assert_array_equal(stream.gather(np.arange(stream.num_tokens)), expected)
    assert stream.vocab_size == 1000 and MegatronTokens(tmp_path / "m", eod_id=7).eod_id == 7
    with pytest.raises(DataError, match="eod_id"):
        _write_megatron(tmp_path / "bare", docs)
        MegatronTokens(tmp_path / "bare")


def test_megatron_only_holds_out_validation_tail(tmp_path: Path) -> None:
    _write_megatron(tmp_path / "m", [list(range(1, 200))] * 10, {"eod_id": 0, "vocab_size": 200})
    cfg = DataConfig(
        sources=[DataSourceConfig(str(tmp_path / "m"), format="megatron")],
        seq_len=16,
        micro_batch_size=2,
        val_fraction=0.1,
        val_batches=2,
    )
    loader = build_train_loader(cfg, seed=0)
    total = (2000 - 1) // 16
    held = int(total * 0.1)
    assert loader.samples.epoch_len == total - held
    val = build_val_batches(cfg)
    start = (total - held) * 16
    np.testing.assert_array_equal(
        val[0].tokens[0].numpy(), loader.samples.sources[0].stream.gather(np.arange(start, start + 16))
    )
    assert dataset_vocab_size(cfg) == 200


def test_blending_parquet_and_megatron_shares(dataset: Path, tmp_path: Path) -> None:
    # Megatron tokens >= 1000 tell its samples apart from the parquet ones (vocab 400).
    _write_megatron(tmp_path / "m", [list(range(1000, 1100))] * 20, {"eod_id": 1999, "vocab_size": 2000})
    cfg = DataConfig(
        sources=[
            DataSourceConfig(str(dataset), weight=3.0),
            DataSourceConfig(str(tmp_path / "m"), 1.0, "megatron"),
        ],
        seq_len=32,
        micro_batch_size=8,
        val_batches=1,
    )
    loader = build_train_loader(cfg, seed=0)
    tokens = torch.cat(_take(loader, 50))
    share = (tokens.min(dim=1).values >= 1000).float().mean().item()
    assert abs(share - 0.25) <= 1.5 / len(tokens)
    assert dataset_vocab_size(cfg) == 2000 and build_val_batches(cfg)[0].tokens.max() < 400  # val: parquet's


# ---- errors ------------------------------------------------------------------------------------


def _broken_copy(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    return ds, ds / "train" / "shard-00001.parquet"


def _edit_metadata(ds: Path, **fields) -> None:
    meta = json.loads((ds / "metadata.json").read_text())
    (ds / "metadata.json").write_text(json.dumps({**meta, **fields}))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _bad_magic(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-4] + b"XXXX")  # same size, not Parquet any more


@pytest.mark.parametrize(
    "damage, named, reason",
    [
        (lambda ds, shard: shutil.rmtree(ds), "ds", "does not exist"),
        (lambda ds, shard: (ds / "metadata.json").unlink(), "metadata.json", "missing"),
        (lambda ds, shard: (ds / "metadata.json").write_text("{not json"), "metadata.json", "invalid"),
        (lambda ds, shard: _edit_metadata(ds, format_version=99), "metadata.json", "format_version 99"),
        (lambda ds, shard: shard.unlink(), "shard-00001.parquet", "missing"),
        (lambda ds, shard: _truncate(shard), "shard-00001.parquet", "bytes"),
        (lambda ds, shard: _bad_magic(shard), "shard-00001.parquet", "corrupt"),
    ],
    ids=["no-dir", "no-metadata", "bad-json", "new-version", "no-shard", "truncated", "corrupt"],
)
def test_damaged_dataset_raises_one_line_data_error(
    dataset: Path, tmp_path: Path, damage, named, reason
) -> None:
    ds, shard = _broken_copy(dataset, tmp_path)
    damage(ds, shard)
    with pytest.raises(DataError) as e:
        build_train_loader(_cfg(ds), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and named in msg and reason in msg and str(tmp_path) in msg


def test_config_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{dataset}.*too few for one sample of seq_len 100000"):
        build_train_loader(_cfg(dataset, seq_len=100_000), seed=0)
    with pytest.raises(DataError, match="weight 0"):
        build_train_loader(DataConfig(sources=[DataSourceConfig(str(dataset), weight=0)]), seed=0)
    with pytest.raises(DataError, match=f"{tmp_path}/none.bin is missing"):
        build_train_loader(
            DataConfig(sources=[DataSourceConfig(str(tmp_path / "none"), format="megatron")]), seed=0
        )
    with pytest.raises(DataError, match="samples per epoch"):
        build_train_loader(_cfg(dataset), seed=0).load_state_dict(
            build_train_loader(_cfg(dataset, seq_len=16), seed=0).state_dict()
        )


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda p: Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-4]), "m.bin"),
        (lambda p: Path(f"{p}.idx").write_bytes(b"x" * 64), "m.idx"),
        (lambda p: Path(f"{p}.idx").write_bytes(Path(f"{p}.idx").read_bytes()[:20]), "m.idx"),
        (lambda p: Path(f"{p}.json").write_text("[1, 2]"), "m.json"),
    ],
    ids=["short-bin", "garbage-idx", "truncated-idx", "bad-sidecar"],
)
def test_damaged_megatron_raises_one_line_data_error(tmp_path: Path, monkeypatch, damage, named) -> None:
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    _write_megatron(tmp_path / "m", [[1, 2, 3, 4]] * 5, {"eod_id": 0})
    damage(tmp_path / "m")
    with pytest.raises(DataError) as e:
        MegatronTokens(tmp_path / "m")
    assert "\n" not in str(e.value) and f"{tmp_path}/{named}" in str(e.value)
    del e
    gc.collect()  # megatron's own __del__ must not fail (and print a traceback) on the half-built dataset
    assert unraisable == []


def test_prepare_with_given_tokenizer(
    dataset: Path, corpus: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    files = sorted(corpus[0].rglob("*.txt"))
    meta = prep.prepare(
        files, tmp_path / "t", vocab_size=0, val_fraction=0.25, seed=7, tokenizer=dataset / "tokenizer.json"
    )
    assert meta["eod_id"] == json.loads((dataset / "metadata.json").read_text())["eod_id"]
    assert _docs(tmp_path / "t" / "train") == _docs(dataset / "train")
