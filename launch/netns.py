"""Two simulated hosts on one machine: Linux network namespaces joined by a veth pair, each end
with its own address, optionally rate-limited and delayed with `tc`. Needs root (CAP_SYS_ADMIN and
CAP_NET_ADMIN); `netns_available()` finds out by trying.

    python -m launch.netns check                        # can this machine do it? which shaping?
    python -m launch.netns up --rate 1gbit --delay 0.5ms  # create a pair and leave it up
    python -m launch.netns down [NAME ...]              # remove pairs (default: those whose creator exited)

    with netns_pair(rate="1gbit", delay="0.5ms") as pair:
        subprocess.run([*pair.a.exec_prefix(), sys.executable, "server.py", pair.a.addr])
        subprocess.run([*pair.b.exec_prefix(), sys.executable, "client.py", pair.a.addr])

Shaping goes on the egress of both veth ends, so both directions see it: `netem rate R delay D`.
Kernels without sch_netem (this project's CI VM has none) get `tbf rate R` instead, and no delay:
`NetnsPair.shaping` says what was applied, and a warning says what was not.

Distributed jobs across the pair: gloo must bind the veth (`GLOO_SOCKET_IFNAME=<ifname>`, else
it resolves the machine's hostname to an address that does not exist in the namespace); torchrun
must advertise the veth address (`--local-addr`, or `PET_LOCAL_ADDR`) and, as the c10d endpoint
is not one of the machine's hostname addresses, be told which agent hosts the store
(`--rdzv-conf is_host=true` on the first namespace's agent). `Host.torchrun_env` sets all of it;
tests/launch/test_netns.py uses it.

Names are `mf<pid>x<n>a` / `mf<pid>x<n>b` for both the namespace and its veth end (15 characters
at most, the interface-name limit), so `down` can tell leftovers of exited processes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_NAME = re.compile(r"^mf(\d+)x(\d+)[ab]$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$")
_DELAY = re.compile(r"^\d+(?:\.\d+)?(us|ms|s)$")
_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
}
_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (message: the command and its error)."""


@dataclass(frozen=True)
class Host:
    """One end of the pair: a namespace, its veth interface and that interface's address."""

    netns: str
    ifname: str
    addr: str

    def exec_prefix(self) -> list[str]:
        return exec_prefix(self.netns)

    def torchrun_env(self, hosts_store: bool) -> dict[str, str]:
        """Environment for a torchrun agent on this host (module docstring); `hosts_store` on the
        agent whose address is the rendezvous endpoint."""
        return {
            "GLOO_SOCKET_IFNAME": self.ifname,
            "NCCL_SOCKET_IFNAME": self.ifname,
            "PET_LOCAL_ADDR": self.addr,  # torchrun --local-addr
            "PET_RDZV_CONF": f"is_host={str(hosts_store).lower()}",  # torchrun --rdzv-conf
        }


@dataclass(frozen=True)
class NetnsPair:
    a: Host
    b: Host
    shaping: str  # what tc applied on each veth end ("none", "netem rate ... delay ...", "tbf ...")


def exec_prefix(netns: str) -> list[str]:
    """Prepend to a command to run it inside namespace `netns`."""
    return ["ip", "netns", "exec", netns]


def rate_bits_per_s(rate: str) -> float:
    """A tc rate (`1gbit`, `500mbit`, `10mbps` = megabytes/s) in bits per second."""
    match = _RATE.match(rate)
    if not match:
        raise ValueError(f"rate {rate!r}: expected a number and one of {', '.join(_RATE_UNITS)} (tc units)")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")


def create_pair(rate: str | None = None, delay: str | None = None, subnet: str = "10.77.0") -> NetnsPair:
    """Create two namespaces joined by a veth pair (`<subnet>.1/24` and `<subnet>.2/24`), loopback
    up in each, shaped by `rate` / `delay` if given. The caller removes it (`remove_pair`);
    `netns_pair()` does that for you. On failure, whatever was created is removed."""
    if rate is not None:
        rate_bits_per_s(rate)  # validate before touching the system
    if delay is not None and not _DELAY.match(delay):
        raise ValueError(f"delay {delay!r}: expected a number and us, ms or s (e.g. 0.5ms)")
    base = f"mf{os.getpid()}x{next(_counter)}"
    a, b = (Host(base + side, base + side, f"{subnet}.{i}") for i, side in ((1, "a"), (2, "b")))
    try:
        for host in (a, b):
            _run("ip", "netns", "add", host.netns)
        # Both ends are created directly inside their namespaces: nothing is left in the root one.
        _run(
            "ip",
            "link",
            "add",
            a.ifname,
            "netns",
            a.netns,
            "type",
            "veth",
            "peer",
            "name",
            b.ifname,
            "netns",
            b.netns,
        )
        for host in (a, b):
            _run("ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _run("ip", "-n", host.netns, "link", "set", host.ifname, "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        shaping = _shape(a, b, rate, delay)
    except BaseException:
        _remove(a.netns, b.netns)
        raise
    return NetnsPair(a, b, shaping)


def _shape(a: Host, b: Host, rate: str | None, delay: str | None) -> str:
    if rate is None and delay is None:
        return "none"
    netem = ["netem", *(["rate", rate] if rate else []), *(["delay", delay] if delay else [])]
    try:
        for host in (a, b):
            _run("tc", "-n", host.netns, "qdisc", "add", "dev", host.ifname, "root", *netem)
        return " ".join(netem)
    except NetnsError as e:
        if "unknown" not in str(e).lower():
            raise
        if rate is None:
            raise NetnsError(f"{e}: a delay needs the kernel's sch_netem") from e
    # No sch_netem: a token bucket limits the rate; a burst of ~4 ms of traffic (at least 16 KiB)
    # keeps the average exact without stalling on single large (GSO) packets.
    burst = max(16384, math.ceil(rate_bits_per_s(rate) / 8 * 0.004))
    tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
    for host in (a, b):
        _run("tc", "-n", host.netns, "qdisc", "add", "dev", host.ifname, "root", *tbf)
    if delay:
        warnings.warn(
            f"this kernel has no sch_netem: rate limited to {rate} by tbf, delay {delay} not applied",
            stacklevel=3,
        )
        return f"tbf rate {rate} (no delay: the kernel has no sch_netem)"
    return f"tbf rate {rate}"


def remove_pair(pair: NetnsPair) -> None:
    """Delete both namespaces (the veth pair goes with them)."""
    _remove(pair.a.netns, pair.b.netns)


def _remove(*names: str) -> None:
    # `ip netns del` of a missing namespace fails harmlessly; ignore it so teardown always finishes.
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def netns_pair(
    rate: str | None = None, delay: str | None = None, subnet: str = "10.77.0"
) -> Iterator[NetnsPair]:
    """`create_pair` for the duration of a `with` block; removed on exit, also if the interpreter
    exits first (atexit). Processes still running inside keep their namespace alive until they end."""
    pair = create_pair(rate, delay, subnet)
    cleanup = functools.partial(remove_pair, pair)  # its own object: unregister only this one
    atexit.register(cleanup)
    try:
        yield pair
    finally:
        cleanup()
        atexit.unregister(cleanup)


@functools.cache
def netns_available() -> tuple[bool, str]:
    """(True, "") if this process can create (and remove) a namespace pair; else (False, why)."""
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` command is not installed"
    try:
        with netns_pair():
            pass
    except NetnsError as e:
        return False, f"{e} (needs root, or CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    return True, ""


def leftover_namespaces() -> list[str]:
    """Namespaces named by this module whose creating process has exited."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [n for n in names if (m := _NAME.match(n)) and not _alive(int(m.group(1)))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.netns", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="try to create a shaped pair; say what works")
    up = sub.add_parser("up", help="create a pair and leave it up")
    up.add_argument("--rate", help="e.g. 1gbit (tc units)")
    up.add_argument("--delay", help="e.g. 0.5ms")
    up.add_argument("--subnet", default="10.77.0", help="first three octets (default 10.77.0)")
    down = sub.add_parser("down", help="remove pairs")
    down.add_argument(
        "names", nargs="*", help="namespaces to remove (default: leftovers of exited processes)"
    )
    args = parser.parse_args(argv)

    if args.command == "check":
        ok, why = netns_available()
        if not ok:
            print(f"network namespaces: unavailable: {why}")
            return 1
        with warnings.catch_warnings(record=True), netns_pair(rate="1gbit", delay="0.5ms") as pair:
            print(f"network namespaces: available; shaping 1gbit + 0.5ms gives: {pair.shaping}")
        return 0
    if args.command == "up":
        pair = create_pair(args.rate, args.delay, args.subnet)
        for host in (pair.a, pair.b):
            print(
                f"{host.netns}  dev {host.ifname}  addr {host.addr}  run: {' '.join(host.exec_prefix())} CMD"
            )
        print(f"shaping: {pair.shaping}")
        print(f"remove: python -m launch.netns down {pair.a.netns} {pair.b.netns}")
        return 0
    names = args.names or leftover_namespaces()
    _remove(*names)
    print("removed: " + (" ".join(names) or "nothing"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (NetnsError, ValueError) as e:
        print(f"moeforge: netns: {e}", file=sys.stderr)
        sys.exit(2)
