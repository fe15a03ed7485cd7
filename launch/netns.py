"""Two simulated hosts on one machine: Linux network namespaces joined by a link, each end with
its own address, optionally rate-limited and delayed. Needs root (CAP_SYS_ADMIN and
CAP_NET_ADMIN); `netns_available()` finds out by trying.

    python -m launch.netns check                        # can this machine do it? which shaping?
    python -m launch.netns up --rate 1gbit --delay 0.5ms  # create a pair and leave it up
    python -m launch.netns down [NAME ...]              # remove pairs (default: those whose creator exited)

    with netns_pair(rate="1gbit", delay="0.5ms") as pair:
        subprocess.run([*pair.a.exec_prefix(), sys.executable, "server.py", pair.a.addr])
        subprocess.run([*pair.b.exec_prefix(), sys.executable, "client.py", pair.a.addr])

The link is a veth pair, shaped on the egress of both ends, so both directions see it:
`netem rate R delay D`. Kernels without sch_netem (this project's CI VM has none) limit a rate
with `tbf` instead, and a delay is applied in userspace: the namespaces are then joined by a TUN
device in each and a forwarder process between them that holds each packet for the delay
(`launch/delay_line.py`), with `tbf` on the TUN devices for the rate. `NetnsPair.shaping` says
what was applied. The forwarder lives as long as the pair: `remove_pair` stops it, and it exits
by itself if its creator dies; after `up`, it runs as a daemon until `down`.

Distributed jobs across the pair: gloo must bind the pair's interface (`GLOO_SOCKET_IFNAME=<ifname>`,
else it resolves the machine's hostname to an address that does not exist in the namespace); torchrun
must advertise the interface's address (`--local-addr`, or `PET_LOCAL_ADDR`) and, as the c10d endpoint
is not one of the machine's hostname addresses, be told which agent hosts the store
(`--rdzv-conf is_host=true` on the first namespace's agent). `Host.torchrun_env` sets all of it;
tests/launch/test_netns.py uses it.

Names are `mf<pid>x<n>a` / `mf<pid>x<n>b` for both the namespace and its interface (15 characters
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
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from launch import delay_line

_NAME = re.compile(r"^mf(\d+)x(\d+)[ab]$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
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
_DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
# The delay line moves packets in Python, at a cost per packet: at the usual MTU of 1500, 1 Gbit/s
# is 83k packets/s, about its ceiling (measured on a busy 2-core VM: 0.8-1.0 Gbit/s). Near TUN's
# largest MTU (65535) a packet carries 43x more: 3.3-3.8 Gbit/s there, and the rate is tbf's.
_TUN_MTU = 64000
_counter = itertools.count()


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (message: the command and its error)."""


@dataclass(frozen=True)
class Host:
    """One end of the pair: a namespace, its interface (veth or TUN) and that interface's address."""

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
    shaping: str  # what was applied ("none", "netem rate ... delay ...", "tbf ... + userspace delay ...")
    # The forwarder joining the TUN devices where the delay is applied in userspace, else None.
    forwarder: subprocess.Popen | None = field(default=None, repr=False, compare=False)


def exec_prefix(netns: str) -> list[str]:
    """Prepend to a command to run it inside namespace `netns`."""
    return ["ip", "netns", "exec", netns]


def rate_bits_per_s(rate: str) -> float:
    """A tc rate (`1gbit`, `500mbit`, `10mbps` = megabytes/s) in bits per second."""
    match = _RATE.match(rate)
    if not match:
        raise ValueError(f"rate {rate!r}: expected a number and one of {', '.join(_RATE_UNITS)} (tc units)")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def delay_seconds(delay: str) -> float:
    """A tc delay (`500us`, `0.5ms`, `1s`) in seconds."""
    match = _DELAY.match(delay)
    if not match:
        raise ValueError(f"delay {delay!r}: expected a number and us, ms or s (e.g. 0.5ms)")
    return float(match.group(1)) * _DELAY_UNITS[match.group(2)]


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")


def create_pair(
    rate: str | None = None, delay: str | None = None, subnet: str = "10.77.0", daemon: bool = False
) -> NetnsPair:
    """Create two namespaces joined by a link (`<subnet>.1/24` and `<subnet>.2/24`), loopback up in
    each, shaped by `rate` / `delay` if given. The caller removes it (`remove_pair`);
    `netns_pair()` does that for you. On failure, whatever was created is removed. `daemon`: a
    delay line (module docstring) outlives this process; `down` stops it."""
    if rate is not None:
        rate_bits_per_s(rate)  # validate before touching the system
    if delay is not None:
        delay_seconds(delay)
    base = f"mf{os.getpid()}x{next(_counter)}"
    a, b = (Host(base + side, base + side, f"{subnet}.{i}") for i, side in ((1, "a"), (2, "b")))
    forwarder = None
    try:
        for host in (a, b):
            _run("ip", "netns", "add", host.netns)
        netem = (rate is not None or delay is not None) and _has_netem(a.netns)
        tun = delay is not None and not netem
        if tun:
            for host in (a, b):
                _run("ip", "-n", host.netns, "tuntap", "add", "dev", host.ifname, "mode", "tun")
                _run("ip", "-n", host.netns, "link", "set", host.ifname, "mtu", str(_TUN_MTU))
        else:  # both ends created directly inside their namespaces: nothing is left in the root one
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
        if tun:
            try:
                forwarder = delay_line.start(
                    (a.netns, a.ifname), (b.netns, b.ifname), delay_seconds(delay), daemon
                )
            except delay_line.DelayLineError as e:
                raise NetnsError(str(e)) from e
        shaping = _shape(a, b, rate, delay, netem, tun)
    except BaseException:
        if forwarder is not None:
            delay_line.stop(forwarder)
        _remove(a.netns, b.netns)
        raise
    return NetnsPair(a, b, shaping, forwarder)


def _has_netem(netns: str) -> bool:
    """Whether the kernel has sch_netem: try it on the loopback of `netns` (then remove it)."""
    probe = subprocess.run(
        ["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "netem"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        _run("tc", "-n", netns, "qdisc", "del", "dev", "lo", "root")
        return True
    if "unknown" in probe.stderr.lower():  # "Specified qdisc kind is unknown."
        return False
    raise NetnsError(f"`tc qdisc add dev lo root netem` in {netns} failed: {probe.stderr.strip()}")


def _shape(a: Host, b: Host, rate: str | None, delay: str | None, netem: bool, tun: bool) -> str:
    """Add the qdiscs on both interfaces; say what the link applies."""
    if netem:
        qdisc = ["netem", *(["rate", rate] if rate else []), *(["delay", delay] if delay else [])]
        for host in (a, b):
            _run("tc", "-n", host.netns, "qdisc", "add", "dev", host.ifname, "root", *qdisc)
        return " ".join(qdisc)
    applied = []
    if rate is not None:
        # A token bucket; a burst of ~4 ms of traffic keeps the average exact without stalling on
        # single large packets. tbf drops a packet bigger than its burst unless it can split it
        # into MTU-sized segments: 16 KiB is enough on the veth (MTU 1500), not on the TUN devices.
        min_burst = 65536 if tun else 16384
        burst = max(min_burst, math.ceil(rate_bits_per_s(rate) / 8 * 0.004))
        tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        for host in (a, b):
            _run("tc", "-n", host.netns, "qdisc", "add", "dev", host.ifname, "root", *tbf)
        applied.append(f"tbf rate {rate}")
    if tun:
        applied.append(f"userspace delay {delay} (TUN forwarder; the kernel has no sch_netem)")
    return " + ".join(applied) or "none"


def remove_pair(pair: NetnsPair) -> None:
    """Stop the pair's delay line if any; delete both namespaces (their interfaces go with them)."""
    if pair.forwarder is not None:
        delay_line.stop(pair.forwarder)
    _remove(pair.a.netns, pair.b.netns)


def _remove(*names: str) -> None:
    # `ip netns del` of a missing namespace fails harmlessly; ignore it so teardown always finishes.
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _stop_daemons(*names: str) -> None:
    """Stop the delay lines `up` left running in these namespaces (they hold them alive)."""
    for name in names:
        for pid in delay_line.running_in(name):
            os.kill(pid, signal.SIGTERM)


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
        with netns_pair(rate="1gbit", delay="0.5ms") as pair:
            print(f"network namespaces: available; shaping 1gbit + 0.5ms gives: {pair.shaping}")
        return 0
    if args.command == "up":
        pair = create_pair(args.rate, args.delay, args.subnet, daemon=True)
        for host in (pair.a, pair.b):
            print(
                f"{host.netns}  dev {host.ifname}  addr {host.addr}  run: {' '.join(host.exec_prefix())} CMD"
            )
        print(f"shaping: {pair.shaping}")
        if pair.forwarder is not None:
            print(f"delay line: pid {pair.forwarder.pid}, runs until `down`")
        print(f"remove: python -m launch.netns down {pair.a.netns} {pair.b.netns}")
        return 0
    names = args.names or leftover_namespaces()
    _stop_daemons(*names)
    _remove(*names)
    print("removed: " + (" ".join(names) or "nothing"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (NetnsError, ValueError) as e:
        print(f"moeforge: netns: {e}", file=sys.stderr)
        sys.exit(2)
