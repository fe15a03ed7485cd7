"""Gradient compression on the embedded corpus: validation loss and bytes on the wire per compressor.

Run from the repository root:

    python -m benchmarks.compression [--steps 100] [--settings "none,topk 1%"] [--json PATH]
    python -m benchmarks.compression --slow-network [--rate 1gbit --delay 0.5ms] [--steps 30]

Every setting trains the quickstart's tiny MoE (`recipe=tiny_cpu`) through the real entry point
(`torchrun -m trainer`) on 4 gloo ranks as dp4 with experts over ep2, on the DDP engine (the one
whose gradient sync goes through the compressor), with the same seed, data and steps; only
`parallel.compression` differs. Reported per setting, from the run's `metrics.jsonl`:
- final validation loss, and its gap to `none` (relative);
- bytes on the wire per step relative to `none`, after warm-up (the compressor counts what its
  collectives send, per rank: dense DDP buckets and expert weights over "edp");
- median step time of the timed steps (the first `--warmup-steps` excluded), slowest rank not
  singled out: rank 0's wall time per step, which waits for every collective.

`--slow-network` runs the same settings as two "hosts" of 2 ranks each: two Linux network
namespaces joined by a link rate-limited and delayed (`launch/netns.py`; set up before and torn
down after, whatever happens): by `tc netem` on a veth pair, or, where the kernel has no
`sch_netem` (this project's CI VM), by `tbf` and a userspace delay line between two TUN devices;
the output says which. Only traffic between the hosts crosses the limited link,
as on a real cluster where ranks of one node talk over shared memory or NVLink. It needs root (or
CAP_NET_ADMIN) and says so if it lacks the privilege.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import format_table

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, GLOBAL_BATCH, WORLD, DP = 256, 16, 4, 4
WARMUP = 10  # optimizer steps sent uncompressed first (PowerSGD and top-k need them)
SETTINGS: dict[str, list[str]] = {
    "none": ["parallel.compression.kind=none"],
    "bf16": ["parallel.compression.kind=bf16"],
    "int8": ["parallel.compression.kind=int8"],
    "moe_selective": ["parallel.compression.kind=moe_selective"],
    "sign": ["parallel.compression.kind=sign", f"parallel.compression.warmup_steps={WARMUP}"],
    "topk 1%": [
        "parallel.compression.kind=topk",
        "parallel.compression.topk_ratio=0.01",
        f"parallel.compression.warmup_steps={WARMUP}",
    ],
    "powersgd r4": [
        "parallel.compression.kind=powersgd",
        "parallel.compression.rank=4",
        f"parallel.compression.warmup_steps={WARMUP}",
    ],
    # int8 factors cost 1/4 of fp32 ones: rank 16 for the bytes of rank 4.
    **{
        f"powersgd r{rank} int8": [
            "parallel.compression.kind=powersgd",
            f"parallel.compression.rank={rank}",
            "parallel.compression.factor_bits=8",
            f"parallel.compression.warmup_steps={WARMUP}",
        ]
        for rank in (16, 32)
    },
    # Adam's second moment from the factored statistics of the uncompressed local gradients.
    "powersgd r12 int8 factored-v": [
        "parallel.compression.kind=powersgd",
        "parallel.compression.rank=12",
        "parallel.compression.factor_bits=8",
        "parallel.compression.second_moment=factored",
        f"parallel.compression.warmup_steps={WARMUP}",
    ],
}

Launcher = Callable[[list[str], Path], subprocess.CompletedProcess]


def job_args(run_dir: Path, steps: int, setting: list[str]) -> list[str]:
    return [
        "recipe=tiny_cpu",
        f"run.dir={run_dir}",
        "parallel.pp=1",
        "parallel.ep=2",
        "parallel.dp_engine=ddp",
        f"data.seq_len={SEQ_LEN}",
        f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.val_every=0",
        "checkpoint.save_every=0",
        "logging.progress=false",
        "logging.wandb_mode=disabled",
        *setting,
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def local_torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """All 4 ranks on this host, over loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    return subprocess.run(
        [*cmd, "-m", "trainer", *args], cwd=cwd, env=environment(), capture_output=True, text=True
    )


def summarize(run_dir: Path, warmup_steps: int) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    timed = [r for r in train if r["step"] > warmup_steps]
    tokens_per_rank_step = GLOBAL_BATCH * SEQ_LEN / DP
    return {
        "val_loss": [r for r in records if r["kind"] == "val"][-1]["val/loss"],
        "bytes_per_step": statistics.mean(r["comm_bytes"] for r in timed),
        "bytes_ratio": statistics.mean(r["comm_ratio"] for r in timed),
        "step_s": statistics.median(tokens_per_rank_step / r["tokens_per_s"] for r in timed),
    }


def run_settings(names: list[str], steps: int, warmup_steps: int, launch: Launcher) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="moeforge-compression-") as tmp:
        for name in names:
            run_dir = Path(tmp) / name.replace(" ", "_").replace("%", "pct")
            proc = launch(job_args(run_dir, steps, SETTINGS[name]), Path(tmp))
            if proc.returncode != 0:
                ours = [line for line in proc.stderr.splitlines() if line.startswith("moeforge")]
                why = "\n".join([*ours, proc.stderr[-2000:]])
                raise SystemExit(f"{name}: the run failed (exit {proc.returncode}):\n{why}")
            results[name] = summarize(run_dir, warmup_steps)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict]) -> str:
    none = results.get("none")
    rows = []
    for name, r in results.items():
        gap = f"{100 * (r['val_loss'] / none['val_loss'] - 1):+.2f}%" if none else "n/a"
        rel = r["bytes_per_step"] / none["bytes_per_step"] if none else r["bytes_ratio"]
        speed = f"{none['step_s'] / r['step_s']:.2f}x" if none else "n/a"
        rows.append(
            [
                name,
                f"{r['val_loss']:.4f}",
                gap,
                f"{r['bytes_per_step'] / 2**20:.2f}",
                f"{100 * rel:.2f}%",
                f"{r['step_s']:.3f}",
                speed,
            ]
        )
    header = [
        "setting",
        "val loss",
        "gap to none",
        "MiB/step/rank",
        "bytes vs none",
        "step s",
        "speed vs none",
    ]
    return format_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 100; 30 slow-network)"
    )
    parser.add_argument("--warmup-steps", type=int, default=WARMUP, help="steps left out of bytes and time")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    parser.add_argument("--slow-network", action="store_true", help="two network namespaces, tc-limited link")
    parser.add_argument("--rate", default="1gbit", help="link rate (tc syntax), with --slow-network")
    parser.add_argument("--delay", default="0.5ms", help="one-way link delay, with --slow-network")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = [n.strip() for n in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    if args.slow_network:
        from benchmarks.slow_network import two_host_launcher

        steps = args.steps or 30
        with two_host_launcher(WORLD, args.rate, args.delay, environment()) as (launch, shaping):
            results = run_settings(names, steps, args.warmup_steps, launch)
        where = f"2 hosts x 2 ranks, link shaping: {shaping}"
    else:
        steps = args.steps or 100
        results = run_settings(names, steps, args.warmup_steps, local_torchrun)
        where = "4 ranks on one host (loopback)"
    print(f"tiny_cpu, dp4 x ep2, DDP engine, {steps} steps, {where}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "where": where, "results": results}, indent=1))


if __name__ == "__main__":
    main()
