"""Hugging Face import and export throughput against the disk's own bandwidth, and the memory
each rank needs to import at a parallel layout. One run:

    .venv/bin/python -m benchmarks.hf_interop [--params 1e9] [--ranks 4] [--dtype bfloat16] [--keep]

1. a Mixtral-shaped HF checkpoint of about `--params` parameters in `--dtype`, written straight
   as safetensors shards in the Hub's per-expert layout with its index and `config.json` (random
   values; built without transformers, timed apart, compared with nothing);
2. disk write (fsync) and cold read of as many bytes (`benchmarks.checkpoint.disk_bandwidth`);
3. import in one process: `plan_import` + `load_full` into fp32, the training dtype;
4. export of that state back to `--dtype`: `plan_export` + `export` (sharded safetensors, fsync),
   then compared with the original tensors bit for bit (bf16 -> fp32 -> bf16 is exact);
5. import on `--ranks` gloo ranks as dp=ep=ranks with FSDP: each rank builds its part with
   `parallelize` (as training does), then `load_into`; per rank: bytes read, seconds, memory, and a
   position-weighted checksum of what it loaded against the one-process import.
Before every timed read the files are evicted from the page cache (`posix_fadvise(DONTNEED)`);
bytes actually fetched from the disk (`/proc/self/io` read_bytes) say whether the read was cold.
Throughput is checkpoint bytes on disk / seconds, in GB/s (1e9), with the step's CPU seconds and the
seconds it sat runnable waiting for a core (`/proc/thread-self/schedstat`: other jobs on a shared
machine); the rest of its wall time it waited for the disk or for other ranks. Memory: VmHWM reset before the
step (`/proc/self/clear_refs`) for the exact peak, and a 10 ms sampler of RssAnon / RssFile (the
safetensors memory maps count as RssFile: page cache, reclaimable, not the process's own memory).
Everything is written under a temp dir that is deleted at the end (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import resource
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from benchmarks.checkpoint import dir_bytes, disk_bandwidth, evict
from benchmarks.common import format_table
from model.config import ModelConfig, MoEConfig
from model.params import count_params
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import parallelize
from tests.distributed.harness import run_ranks
from trainer.checkpoint.hf import plan_export, plan_import
from trainer.checkpoint.hf.convert import export, load_full, load_into
from trainer.checkpoint.hf.safetensors_io import INDEX, HFCheckpoint

FAMILY = "mixtral"
SEED = 0
GB = 1e9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_config(params: float) -> ModelConfig:
    """A Mixtral shape (16 layers, 8 experts top-2, head_dim 128, 4 query heads per kv head,
    vocab 32000) whose width grows as params^(1/3) and expert hidden size fills the rest."""
    layers, experts, vocab = 16, 8, 32000
    dim = 256 * max(1, round(4 * (params / 1e9) ** (1 / 3)))
    heads = max(1, dim // 128)

    def cfg(hidden: int) -> ModelConfig:
        moe = MoEConfig(num_experts=experts, top_k=2, moe_ffn_hidden=hidden, score_func="softmax")
        return ModelConfig(
            name="mixtral-bench",
            vocab_size=vocab,
            dim=dim,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=max(1, heads // 4),
            ffn_hidden=hidden,
            max_seq_len=4096,
            rope_theta=1e6,
            norm_eps=1e-5,
            moe=moe,
        )

    rest = params - count_params(cfg(0))[0]
    hidden = 128 * max(1, round(rest / (layers * experts * 3 * dim) / 128))
    return cfg(hidden)


# ---- measuring -----------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+)", text, re.M)}


def runqueue_seconds() -> float:
    """Seconds the calling thread has spent runnable but waiting for a core (other processes)."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9


def disk_read_bytes() -> int:
    """Bytes this process caused to be fetched from the storage layer (page faults on memory maps
    included): what a cold read must add up to."""
    return int(re.search(r"^read_bytes: (\d+)", Path("/proc/self/io").read_text(), re.M).group(1))


@dataclass
class Watch:
    """Seconds, disk bytes fetched and memory of one step: `with Watch() as w: ...`."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system, all threads
    queued_seconds: float = 0.0  # the calling thread runnable, waiting for a core; the rest of the
    # wall time not on a core is waiting for the disk or for other ranks
    disk_bytes: int = 0
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)  # VmHWM (exact), sampled RssAnon / RssFile
    after: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> Watch:
        # Give freed heap back to the OS first, so that reused pages do not hide a rise.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.before = proc_status()
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._io = disk_read_bytes()
        self._cpu = time.process_time()
        self._queued = runqueue_seconds()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak[k], v)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu
        self.queued_seconds = runqueue_seconds() - self._queued
        self.disk_bytes = disk_read_bytes() - self._io
        self._stop.set()
        self._thread.join()
        self.after = proc_status()
        for k, v in self.after.items():
            self.peak[k] = max(self.peak[k], v)

    def rise(self, key: str) -> int:
        """Peak during the step minus the value before it."""
        return self.peak[key] - self.before[key]


def checksum(t: torch.Tensor, offsets: tuple[int, ...]) -> float:
    """Sum of t's values weighted by a function of each value's global position (t is the block
    at `offsets` of a larger tensor): blocks of one tensor add up to the whole tensor's checksum,
    and a value in the wrong place changes it."""
    x = t.double()
    for d, (offset, size) in enumerate(zip(offsets, t.shape)):
        weight = 1 + ((torch.arange(offset, offset + size, dtype=torch.float64) + d) % 7) / 7
        x = x * weight.view([-1] + [1] * (t.dim() - 1 - d))
    return float(x.sum())


# ---- 1. the checkpoint ---------------------------------------------------------------------------


def build_checkpoint(cfg: ModelConfig, out: Path, dtype: torch.dtype, shard_bytes: int) -> int:
    """The HF directory `plan_export` describes, written without transformers: per-expert
    safetensors shards of random values, the index, config.json. Returns the shard count."""
    plan, hf_config = plan_export(cfg, FAMILY)
    shapes = {name: links[0].hf_shape for name, links in plan.links_by_hf().items()}
    size = torch.finfo(dtype).bits // 8
    shards: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * size
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(SEED)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.empty(shapes[n], dtype=dtype).normal_(0.0, 0.02, generator=gen) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(s) for s in shapes.values()) * size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = {**hf_config, "dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in out.iterdir():  # fsync'd: dirty pages cannot be evicted from the page cache
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    return len(shards)


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (or exist in one directory only) between two HF directories."""
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    if ca.names() != cb.names():
        return sorted(set(ca.names()) ^ set(cb.names()))
    return [n for n in ca.names() if not torch.equal(ca.read(n), cb.read(n))]


# ---- 5. one rank of the distributed import -------------------------------------------------------


def local_blocks(
    models: list[torch.nn.Module], keys: set[str]
) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """key -> (global offsets, local tensor) of what this rank holds of each loaded tensor."""
    out = {}
    for model in models:
        for key, value in model.state_dict().items():
            if key not in keys:
                continue
            if isinstance(value, DTensor):
                (chunk,) = value.__create_chunk_list__()  # what DCP itself asks the reader for
                local = value.to_local()
                assert tuple(local.shape) == tuple(chunk.sizes), key
                out[key] = (tuple(chunk.offsets), local)
            else:
                out[key] = ((0,) * value.dim(), value)
    return out


def rank_import(hf_dir: str, ranks: int) -> dict:
    """On each rank: build this rank's part of the model (dp=ep=ranks, FSDP), load it from the
    HF checkpoint; what it read, how long, what memory it took, checksums of what it holds."""
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork over exec into ru_maxrss.
    peak_so_far = proc_status()["VmHWM"]
    dims = ParallelDims(dp=ranks, ep=ranks)
    meshes = build_meshes(dims, "cpu")
    plan, ckpt = plan_import(hf_dir)
    with Watch() as build:
        pm = parallelize(  # as training from an import does: no random init first
            plan.cfg, ParallelConfig(dp=ranks, ep=ranks), dims, meshes, torch.device("cpu"), SEED, 1,
            init_params=False,
        )  # fmt: skip
    keys = {link.ours for link in plan.links}
    local_bytes = sum(t.numel() * t.element_size() for _, t in local_blocks(pm.transformers, keys).values())
    if dist.get_rank() == 0:
        evict(Path(hf_dir))
    dist.barrier()
    with Watch() as w:
        nbytes = load_into(pm.transformers, plan, ckpt)
    dist.barrier()
    del ckpt  # unmaps the shards
    checksums = [
        [k, list(off), checksum(t, off)] for k, (off, t) in local_blocks(pm.transformers, keys).items()
    ]
    peak = max(peak_so_far, build.peak["VmHWM"], w.peak["VmHWM"], proc_status()["VmHWM"])
    return {
        "build_s": build.seconds,
        "rss_start": build.before["VmRSS"],
        "build_peak": build.peak["VmHWM"],
        "load_s": w.seconds,
        "load_cpu_s": w.cpu_seconds,
        "load_queued_s": w.queued_seconds,
        "bytes_read": nbytes,
        "disk_bytes": w.disk_bytes,
        "local_param_bytes": local_bytes,
        "rss_before": w.before["VmRSS"],
        "load_rise": w.rise("VmHWM"),
        "load_rise_anon": w.rise("RssAnon"),
        "load_rise_file": w.rise("RssFile"),
        "peak": peak,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checksums": checksums,
    }


# ---- the run -------------------------------------------------------------------------------------


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}"


def cold(disk: int, expected: int) -> str:
    return "yes" if disk >= 0.9 * expected else f"no ({disk / max(expected, 1):.0%} from disk)"


def distributed_checksums_match(reference: dict[str, float], per_rank: list[dict]) -> list[str]:
    """Keys whose blocks, summed over ranks (replicated blocks once), miss the one-process value."""
    got: dict[str, float] = {}
    seen = set()
    for r in per_rank:
        for key, offsets, value in r["checksums"]:
            if (key, tuple(offsets)) not in seen:
                seen.add((key, tuple(offsets)))
                got[key] = got.get(key, 0.0) + value
    return [k for k, v in reference.items() if not math.isclose(got.get(k, math.nan), v, rel_tol=1e-9)]


def throughput_row(name: str, nbytes: int, disk_bw: float, w: Watch | None, cold_read: str) -> list[str]:
    if w is None:  # the disk itself
        return [name, _gb(disk_bw), "1.00", "-", "-", "-", "-"]
    bw = nbytes / w.seconds
    cells = [f"{w.seconds:.2f}", f"{w.cpu_seconds:.2f}", f"{w.queued_seconds:.2f}"]
    return [name, _gb(bw), f"{bw / disk_bw:.2f}", *cells, cold_read]


def print_report(args: argparse.Namespace, r: dict) -> None:
    size, per_rank, imp, exp = r["size"], r["per_rank"], r["import"], r["export"]
    # The ranks as one: the slowest rank's seconds, CPU and queued seconds summed over ranks.
    ranks = Watch(
        seconds=max(p["load_s"] for p in per_rank),
        cpu_seconds=sum(p["load_cpu_s"] for p in per_rank),
        queued_seconds=sum(p["load_queued_s"] for p in per_rank),
    )
    n = args.ranks
    rows = [
        throughput_row("disk write (fsync)", size, r["write_bw"], None, "-"),
        throughput_row(
            f"export, 1 process (fp32 -> {args.dtype} shards, fsync)",
            r["export_size"],
            r["write_bw"],
            exp,
            "-",
        ),
        throughput_row("disk read (cold)", size, r["read_bw"], None, "-"),
        throughput_row(
            "import, 1 process (plan_import + load_full -> fp32)",
            size,
            r["read_bw"],
            imp,
            cold(imp.disk_bytes, size),
        ),
        throughput_row(
            f"import, {n} ranks dp{n} ep{n} FSDP (load_into)",
            size,
            r["read_bw"],
            ranks,
            cold(sum(p["disk_bytes"] for p in per_rank), size),
        ),
    ]
    print(
        f"GB/s = checkpoint bytes on disk / seconds (1e9 B), disk measured with {_gb(size)} GB in the same "
        f"run; CPU s = user + system; queued s = runnable, waiting for a core (other processes); for the "
        f"{n} ranks: the slowest rank's seconds, CPU and queued summed over ranks. torch "
        f"{torch.__version__}, {os.cpu_count()} cores, {args.threads} thread(s) in the one-process rows; "
        f"1-min load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
    )
    print(format_table(["operation", "GB/s", "vs disk", "seconds", "CPU s", "queued s", "cold read"], rows))
    print(
        f"one-process memory: import peak +{_gb(imp.rise('VmHWM'))} GB RSS (anon +{_gb(imp.rise('RssAnon'))}"
        f", file-mapped +{_gb(imp.rise('RssFile'))}) for a {_gb(r['state_bytes'])} GB fp32 state; export "
        f"peak +{_gb(exp.rise('VmHWM'))} GB (anon +{_gb(exp.rise('RssAnon'))}) for {_gb(r['export_size'])} "
        "GB written"
    )
    differ = r["export_differ"]
    print("export round trip: " + (f"{len(differ)} differ: {differ[:3]}" if differ else "bit-identical"))

    io_rows, mem_rows = [], []
    for i, p in enumerate(per_rank):
        load_peak = p["rss_before"] + p["load_rise"]
        io_rows.append(
            [
                i,
                _gb(p["bytes_read"]),
                f"{p['bytes_read'] / size:.3f}",
                _gb(p["disk_bytes"]),
                f"{p['load_s']:.2f}",
                f"{p['load_cpu_s']:.2f}",
                f"{p['load_queued_s']:.2f}",
                _gb(p["bytes_read"] / p["load_s"]),
            ]
        )
        mem_rows.append(
            [
                i,
                _gb(p["rss_start"]),
                f"{p['build_s']:.1f}",
                _gb(p["build_peak"]),
                _gb(p["local_param_bytes"]),
                _gb(p["rss_before"]),
                f"+{_gb(p['load_rise'])}",
                f"+{_gb(p['load_rise_anon'])}",
                f"+{_gb(p['load_rise_file'])}",
                _gb(load_peak),
                _gb(load_peak - p["rss_start"]),
                _gb(p["local_param_bytes"] + r["largest"]),
                _gb(p["peak"]),
                _gb(p["maxrss"]),
            ]
        )
    print(f"\nimport on {n} gloo ranks, 1 thread each ({r['ranks_wall']:.0f} s with spawning), GB:")
    header = ["rank", "read", "of ckpt", "from disk", "load_into s", "CPU s", "queued s", "GB/s"]
    print(format_table(header, io_rows))
    print(
        f"\nmemory per rank, GB. budget = local params + the largest tensor ({_gb(r['largest'])} GB fp32); "
        "start = interpreter, torch and gloo before parallelize; rise = peak during load_into - before "
        "(anon / file: sampled every 10 ms; file = the memory-mapped shards, page cache); rank peak = VmHWM "
        "over the rank's life; ru_maxrss also counts the parent's RSS at fork (Linux keeps it over exec):"
    )
    header = [
        "rank",
        "RSS start",
        "parallelize s",
        "parallelize peak",
        "local params",
        "RSS before load",
        "load rise",
        "anon",
        "file",
        "load peak",
        "load peak - start",
        "budget",
        "rank peak",
        "ru_maxrss",
    ]
    print(format_table(header, mem_rows))
    wrong = r["checksums_wrong"]
    print(
        "distributed import vs the one-process import (position-weighted checksums): "
        + (f"{len(wrong)} tensors differ: {wrong[:3]}" if wrong else "every tensor matches")
    )


def run(args: argparse.Namespace, cfg: ModelConfig, root: Path) -> dict:
    dtype = DTYPES[args.dtype]
    hf_dir, export_dir = root / "hf", root / "export"
    r: dict = {"load": [os.getloadavg()[0]]}
    start = time.perf_counter()
    num_shards = build_checkpoint(cfg, hf_dir, dtype, args.shard_mib * 2**20)
    r["size"] = size = dir_bytes(hf_dir)
    print(
        f"{cfg.name}: D={cfg.dim}, {cfg.num_layers} layers, {cfg.moe.num_experts} experts of hidden "
        f"{cfg.moe.moe_ffn_hidden}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}: "
        f"{count_params(cfg)[0] / 1e9:.3f}B parameters, {_gb(size)} GB in {args.dtype} as {num_shards} "
        f"shards, built in {time.perf_counter() - start:.1f} s (random values; not measured)",
        flush=True,
    )
    r["write_bw"], r["read_bw"] = disk_bandwidth(root, size)

    evict(hf_dir)
    with Watch() as r["import"]:
        plan, ckpt = plan_import(str(hf_dir))
        state = load_full(plan, ckpt, torch.float32)
        del ckpt  # unmaps the shards
    reference = {k: checksum(v, (0,) * v.dim()) for k, v in state.items()}
    r["state_bytes"] = sum(v.numel() * v.element_size() for v in state.values())
    r["largest"] = max(v.numel() for v in state.values()) * 4  # in fp32, as the ranks hold it

    with Watch() as r["export"]:
        plan, hf_config = plan_export(cfg, FAMILY)
        export(plan, hf_config, state.__getitem__, export_dir, dtype)
    del state
    r["export_size"] = dir_bytes(export_dir)
    r["export_differ"] = same_tensors(hf_dir, export_dir)

    start = time.perf_counter()
    r["per_rank"] = run_ranks(args.ranks, rank_import, str(hf_dir), args.ranks)
    r["ranks_wall"] = time.perf_counter() - start
    r["checksums_wrong"] = distributed_checksums_match(reference, r["per_rank"])
    r["load"].append(os.getloadavg()[0])
    return r


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1e9, help="model size (1e8 for a smoke run)")
    p.add_argument("--ranks", type=int, default=4, help="gloo ranks of the distributed import (dp=ep=ranks)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the HF checkpoints")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of the one-process import/export (2 on 2 cores shared with other jobs "
        "ran the conversions several times slower: each op waits for the descheduled thread)",
    )
    p.add_argument("--shard-mib", type=int, default=1024, help="shard size of the built checkpoint")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (prints where)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.params)
    if cfg.moe.num_experts % args.ranks:
        raise ValueError(f"--ranks={args.ranks} must divide the {cfg.moe.num_experts} experts (ep=ranks)")
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="moeforge-hf-bench-"))
    try:
        print_report(args, run(args, cfg, root))
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
