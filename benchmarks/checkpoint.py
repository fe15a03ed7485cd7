"""Checkpoint save and load throughput against the disk's own bandwidth, and how long training is
blocked by an async save. One process, one run:

    .venv/bin/python -m benchmarks.checkpoint [--params-m 40] [--dir /path/on/the/disk] [--repeats 3]

- disk write: `--params-m` worth of checkpoint bytes written to one file with fsync;
- disk read: that file read back after `posix_fadvise(DONTNEED)` evicted it from the page cache;
- save (sync): `CheckpointWriter.save` of model + AdamW state: DCP shards, small parts, sha256 of
  every file, fsync, manifest, atomic rename;
- load: `latest_valid` (sizes + sha256 of every file) + `restore`, with the checkpoint's files
  evicted from the page cache first;
- async save: the time `save()` blocks the training thread (staging copies of the tensors), and
  the time until the background write completes.
Throughput is checkpoint bytes on disk / seconds; medians over `--repeats`, the disk measured
between the saves so that both see the same conditions.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import format_table
from trainer.checkpoint import CheckpointWriter, ShardedModelOptimizer, latest_valid, restore


def make_state(params_m: float) -> dict:
    """A stack of square layers with ~params_m million parameters, with AdamW state (3x bytes)."""
    width = 1024
    layers = max(1, round(params_m * 1e6 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return {"model_optimizer": ShardedModelOptimizer([model], optimizer)}


def evict(path: Path) -> None:
    """Drop the files' pages from the page cache so the next read comes from the disk."""
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_bandwidth(root: Path, nbytes: int) -> tuple[float, float]:
    data = os.urandom(1 << 24)
    path = root / "bandwidth.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(data))):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    written = path.stat().st_size
    evict(path)
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return written / write_s, written / read_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params-m", type=float, default=40.0, help="model size, millions of parameters")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="moeforge-ckpt-bench-"))
    try:
        state = make_state(args.params_m)
        saves, loads, blocked, background, write_bws, read_bws = [], [], [], [], [], []
        size = 0
        for i in range(args.repeats):
            if size:  # the disk measured in the same conditions as each save, interleaved
                write_bw, read_bw = disk_bandwidth(root, size)
                write_bws.append(write_bw)
                read_bws.append(read_bw)
            ckpt = root / f"run{i}"
            writer = CheckpointWriter(ckpt, keep_last=1)
            start = time.perf_counter()
            path = writer.save(1, state, {})
            saves.append(time.perf_counter() - start)
            evict(path)
            start = time.perf_counter()
            restore(state, latest_valid(ckpt, report=print)[1])
            loads.append(time.perf_counter() - start)
            size = dir_bytes(path)

            async_writer = CheckpointWriter(root / f"async{i}", keep_last=1, async_save=True)
            start = time.perf_counter()
            async_writer.save(1, state, {})
            blocked.append(time.perf_counter() - start)
            async_writer.wait()
            background.append(time.perf_counter() - start)
        write_bw, read_bw = disk_bandwidth(root, size)
        write_bw = statistics.median([*write_bws, write_bw])
        read_bw = statistics.median([*read_bws, read_bw])
        save_s, load_s = statistics.median(saves), statistics.median(loads)
        rows = [
            ["disk write (fsync)", f"{write_bw / 2**20:,.0f}", "1.00", "-"],
            [
                "checkpoint save (sync)",
                f"{size / save_s / 2**20:,.0f}",
                f"{size / save_s / write_bw:.2f}",
                f"{save_s:.2f}",
            ],
            ["disk read (cold)", f"{read_bw / 2**20:,.0f}", "1.00", "-"],
            [
                "checkpoint load (verify + restore)",
                f"{size / load_s / 2**20:,.0f}",
                f"{size / load_s / read_bw:.2f}",
                f"{load_s:.2f}",
            ],
        ]
        print(
            f"checkpoint of {args.params_m:g}M parameters + AdamW state: {size / 2**20:,.0f} MiB on disk; "
            f"median of {args.repeats}; torch {torch.__version__}, {os.cpu_count()} cores"
        )
        print(format_table(["operation", "MiB/s", "vs disk", "seconds"], rows))
        print(
            f"async save: training blocked {statistics.median(blocked):.3f} s per save "
            f"(sync save: {save_s:.2f} s); background write done after {statistics.median(background):.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
