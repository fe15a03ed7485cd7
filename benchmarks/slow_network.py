"""A launcher for `benchmarks/compression.py --slow-network`: the job's ranks split over two
simulated hosts (network namespaces joined by a rate-limited, delayed link, `launch/netns.py`), one
torchrun agent per host started through `launch/train_multi_node.sh`, meeting at the first host's
address."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks.compression import Launcher
from launch.netns import netns_available, netns_pair

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def two_host_launcher(
    world: int, rate: str, delay: str, env: dict[str, str]
) -> Iterator[tuple[Launcher, str]]:
    """Sets up the two hosts, yields (`launch(trainer_args, cwd)`, the shaping tc applied), tears
    the hosts down."""
    available, why = netns_available()
    if not available:
        raise SystemExit(f"--slow-network needs network namespaces, which this process cannot create: {why}")
    runs = itertools.count()
    with netns_pair(rate=rate, delay=delay) as pair:
        print(f"two hosts {pair.a.addr} and {pair.b.addr}, link shaping: {pair.shaping}", file=sys.stderr)

        def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
            common = {
                **env,
                "PYTHON": sys.executable,
                "NNODES": "2",
                "NPROC": str(world // 2),
                "MASTER_ADDR": pair.a.addr,
                "MASTER_PORT": "29511",
                "RDZV_ID": f"bench-{os.getpid()}-{next(runs)}",
            }
            procs, logs = [], []
            for host in (pair.a, pair.b):
                host_env = {**common, **host.torchrun_env(hosts_store=host is pair.a)}
                cmd = [*host.exec_prefix(), "bash", str(ROOT / "launch/train_multi_node.sh"), *args]
                # Files, not pipes: one agent blocked on a full pipe would stall the other's collectives.
                logs.append(cwd / f"agent-{host.netns}.log")
                with logs[-1].open("w") as log:
                    procs.append(
                        subprocess.Popen(cmd, cwd=cwd, env=host_env, stdout=log, stderr=subprocess.STDOUT)
                    )
            code = max(p.wait() for p in procs)
            output = "".join(log.read_text() for log in logs)
            return subprocess.CompletedProcess(cmd, code, output, output)

        yield launch, pair.shaping
