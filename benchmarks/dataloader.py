"""Packed tokens/s of our loader vs a naive baseline, on the default corpus (the Python stdlib).

Run (prepares the default corpus into ~/.cache/moeforge on first use):
    python -m benchmarks.dataloader [--seq-len 256] [--micro-batch-size 8] [--batches 2000]

ours:  `build_train_loader`: memory-mapped Parquet copied once into an EOD-interleaved int32
       array, then one vectorised numpy gather of [B, S+1] windows per micro-batch.
naive: `read_table` without memory map, tokens as Python lists (EOD appended per document), a
       shuffled list of sample starts, one list slice per sample, `torch.tensor` per batch.
Both produce the same kind of shuffled [B, S] token/label batches. Timed calls are interleaved
(benchmarks.common) so that load from other processes falls on both alike; startup (build +
first batch) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import format_table, interleaved_medians
from data import Batch, build_train_loader
from data.config import DataConfig
from data.prepare import ensure_default_corpus


def naive_loader(dataset: Path, seq_len: int, batch: int, seed: int) -> Iterator[Batch]:
    meta = json.loads((dataset / "metadata.json").read_text())
    flat: list[int] = []
    for shard in meta["splits"]["train"]["shards"]:
        for doc in pq.read_table(dataset / "train" / shard["file"]).column("tokens").to_pylist():
            flat.extend(doc)
            flat.append(meta["eod_id"])
    starts = list(range(0, len(flat) - seq_len, seq_len))
    rng = random.Random(seed)
    while True:
        rng.shuffle(starts)
        for i in range(0, len(starts) - batch + 1, batch):
            windows = [flat[s : s + seq_len + 1] for s in starts[i : i + batch]]
            yield Batch(
                tokens=torch.tensor([w[:-1] for w in windows]), labels=torch.tensor([w[1:] for w in windows])
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=2000, help="timed micro-batches per loader")
    p.add_argument("--cache-dir", default=DataConfig.cache_dir)
    args = p.parse_args()
    cfg = DataConfig(cache_dir=args.cache_dir, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size)

    t0 = time.perf_counter()
    dataset = ensure_default_corpus(cfg)
    num_tokens = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["num_tokens"]
    print(f"corpus {dataset}: {num_tokens:,} train tokens ({time.perf_counter() - t0:.1f} s to ensure)")
    makers: dict[str, Callable[[], Iterator[Batch]]] = {
        "ours (mmap parquet, numpy gather)": lambda: build_train_loader(cfg, seed=0),
        "naive (python lists, per-sample slices)": lambda: naive_loader(
            dataset, cfg.seq_len, cfg.micro_batch_size, 0
        ),
    }
    loaders, startup = {}, {}
    for name, make in makers.items():
        t0 = time.perf_counter()
        loaders[name] = make()
        next(loaders[name])  # the naive generator reads its data on the first next()
        startup[name] = time.perf_counter() - t0
    per_batch = interleaved_medians(
        {name: (lambda it=it: next(it)) for name, it in loaders.items()}, warmup=10, iters=args.batches
    )
    tokens_per_batch = cfg.seq_len * cfg.micro_batch_size
    base = tokens_per_batch / per_batch[list(loaders)[-1]]
    rows = []
    for name in loaders:
        tps = tokens_per_batch / per_batch[name]
        rows.append(
            [
                name,
                f"{startup[name]:.2f}",
                f"{per_batch[name] * 1e6:.0f}",
                f"{tps:,.0f}",
                f"{tps / base:.1f}x",
            ]
        )
    print(
        f"seq_len {cfg.seq_len}, micro-batch {cfg.micro_batch_size}, median of {args.batches} micro-batches each"
    )
    print(format_table(["loader", "startup s", "us/batch", "tokens/s", "vs naive"], rows))


if __name__ == "__main__":
    main()
