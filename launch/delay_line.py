"""A userspace delay line between two network namespaces, for kernels without sch_netem.

`launch/netns.py` joins its two namespaces with a TUN device in each (made by `ip tuntap add`)
and starts this forwarder, which holds both TUN file descriptors and moves every packet read from
one to the other once it has waited the delay, so each direction sees the one-way delay. Rate
limiting stays in the kernel (`tbf` on the egress of each TUN device); this only delays.

    proc = start(("ns_a", "tun_a"), ("ns_b", "tun_b"), delay_s=0.0005)  # returns once attached
    ...
    stop(proc)

It runs as its own process (`python -m launch.delay_line NETNS_A IFNAME_A NETNS_B IFNAME_B
DELAY_S [--daemon]`), in its own session so a Ctrl-C aimed at the caller does not cut the link
before the caller's cleanup. Unless `--daemon`, it exits when its stdin reaches EOF: once the
caller, and any process it forked since (they share the pipe), closed it or died. A daemon runs
until SIGTERM. Either stays in the second namespace, where `running_in()` finds it.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import os
import select
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from time import monotonic

CLONE_NEWNET = 0x40000000  # <sched.h>
TUNSETIFF = 0x400454CA  # <linux/if_tun.h>: _IOW('T', 202, int)
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000  # L3 device; packets without the 4-byte protocol header
MAX_PACKET = 65535  # the largest MTU a TUN device accepts
READ_BATCH = 64  # packets read from one device per wake-up, so the other is not starved
STARTUP_TIMEOUT_S = 30
_MODULE = "launch.delay_line"
_ROOT = Path(__file__).resolve().parents[1]


class DelayLineError(RuntimeError):
    """The forwarder did not start (message: its reason)."""


def start(a: tuple[str, str], b: tuple[str, str], delay_s: float, daemon: bool = False) -> subprocess.Popen:
    """Start a delay line between TUN devices `a` and `b`, each (namespace, interface name);
    returns once both are attached. Raises DelayLineError, with the forwarder's reason, if not."""
    proc = subprocess.Popen(
        [sys.executable, "-m", _MODULE, *a, *b, repr(delay_s), *(["--daemon"] if daemon else [])],
        cwd=_ROOT,  # so that `-m launch.delay_line` imports without the package being installed
        stdin=subprocess.DEVNULL if daemon else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if daemon else None,
        text=True,
        start_new_session=True,
    )
    answered, _, _ = select.select([proc.stdout], [], [], STARTUP_TIMEOUT_S)
    line = proc.stdout.readline().strip() if answered else f"no answer in {STARTUP_TIMEOUT_S} s"
    if line != "ready":
        stop(proc)
        raise DelayLineError(f"delay line did not start: {line.removeprefix('error: ') or 'it exited'}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a delay line started by `start` and reap it."""
    proc.terminate()
    proc.communicate()  # waits, and closes our ends of its pipes


def running_in(netns: str) -> list[int]:
    """Pids of the delay lines living in namespace `netns` (a daemon stays in its second one)."""
    listing = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [int(pid) for pid in listing.split() if _is_delay_line(int(pid))]


def _is_delay_line(pid: int) -> bool:
    try:
        return _MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:  # exited meanwhile
        return False


def attach(netns: str, ifname: str) -> int:
    """Enter namespace `netns` and open its TUN device `ifname` (non-blocking). A TUN file belongs
    to the namespace it was opened in, so the caller stays in `netns` afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{netns}") as ns:  # where `ip netns add` mounts it
        if libc.setns(ns.fileno(), CLONE_NEWNET):
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def forward(fd_a: int, fd_b: int, delay_s: float, lifeline: int | None) -> None:
    """Move packets both ways, each after `delay_s`, until `lifeline` (a fd) becomes readable."""
    # Per input device: where its packets go, and a FIFO of (due time, packet). The delay is the
    # same for every packet, so due times grow along each FIFO: the head is the next one due.
    routes = {fd_a: (fd_b, collections.deque()), fd_b: (fd_a, collections.deque())}
    watched = [fd_a, fd_b] if lifeline is None else [fd_a, fd_b, lifeline]
    while True:
        heads = [queue[0][0] for _, queue in routes.values() if queue]
        # select, not poll: its timeout has microsecond resolution, poll's rounds up to 1 ms.
        timeout = max(0.0, min(heads) - monotonic()) if heads else None
        readable, _, _ = select.select(watched, [], [], timeout)
        if lifeline in readable:  # nothing is ever written to it: this is EOF
            return
        now = monotonic()
        for fd in readable:
            queue = routes[fd][1]
            for _ in range(READ_BATCH):
                try:
                    queue.append((now + delay_s, os.read(fd, MAX_PACKET)))
                except BlockingIOError:
                    break
        for out_fd, queue in routes.values():
            while queue and queue[0][0] <= now:
                os.write(out_fd, queue.popleft()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("netns_a")
    parser.add_argument("ifname_a")
    parser.add_argument("netns_b")
    parser.add_argument("ifname_b")
    parser.add_argument("delay_s", type=float, help="one-way delay in seconds")
    parser.add_argument("--daemon", action="store_true", help="ignore stdin; run until SIGTERM")
    args = parser.parse_args(argv)
    try:
        fd_a = attach(args.netns_a, args.ifname_a)
        fd_b = attach(args.netns_b, args.ifname_b)  # last: we stay in b, where running_in() looks
    except OSError as e:
        print(f"error: {e}", flush=True)
        return 1
    print("ready", flush=True)
    forward(fd_a, fd_b, args.delay_s, lifeline=None if args.daemon else sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
