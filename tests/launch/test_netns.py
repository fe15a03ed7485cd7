"""Two simulated hosts (launch/netns.py): namespaces joined by a link come up with their own
addresses, carry a TCP connection, are rate-limited and delayed (by netem, or by tbf and the
userspace delay line over TUN devices where the kernel has no sch_netem), and are gone afterwards,
delay line included; the tiny recipe trains as 2 nodes x 2 ranks with each torchrun agent in its
own namespace. Skipped only where this process may not create namespaces (not root / no
CAP_NET_ADMIN)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import delay_line, netns
from launch.netns import (
    Host,
    NetnsError,
    NetnsPair,
    create_pair,
    delay_seconds,
    netns_available,
    netns_pair,
    rate_bits_per_s,
)
from tests.launch.nodes import REPO, SMALL, Node, assert_trained_three_steps, two_nodes

AVAILABLE, WHY = netns_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}"),
]  # launch end to end: the quick subset leaves it out

# Runs in namespace b: connect to a's server, send `size` bytes, print the seconds it took.
CLIENT = """
import socket, sys, time
addr, size = sys.argv[1], int(sys.argv[2])
with socket.create_connection((addr, 5001), timeout=20) as s:
    start = time.perf_counter()
    s.sendall(bytes(size))
    s.shutdown(socket.SHUT_WR)
    assert s.recv(16) == b"done"
    print(time.perf_counter() - start)
"""
# Runs in namespace a: receive everything, acknowledge.
SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], 5001)) as srv:
    print("listening", flush=True)
    conn, peer = srv.accept()
    with conn:
        n = 0
        while chunk := conn.recv(1 << 16):
            n += len(chunk)
        conn.sendall(b"done")
    print(peer[0], n)
"""
# Runs in namespace a: echo what arrives (Nagle off: one-byte messages must not wait).
ECHO = """
import socket, sys
with socket.create_server((sys.argv[1], 5002)) as srv:
    print("listening", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while msg := conn.recv(64):
            conn.sendall(msg)
"""
# Runs in namespace b: `count` one-byte round trips to a's echo server; print the median seconds.
PING = """
import socket, statistics, sys, time
with socket.create_connection((sys.argv[1], 5002), timeout=20) as s:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        s.sendall(b"x")
        assert s.recv(64) == b"x"
        rtts.append(time.perf_counter() - start)
    print(statistics.median(rtts))
"""
# Runs on its own: creates a pair with a delay, says its delay line's pid and names, waits.
CREATOR = """
from launch.netns import create_pair
pair = create_pair(delay="1ms")
print(pair.forwarder.pid if pair.forwarder else "none", pair.a.netns, pair.b.netns, flush=True)
input()
"""


def client_server(pair: NetnsPair, server_code: str, client_code: str, *args: str) -> tuple[str, str]:
    """Run `server_code` in a (it prints "listening" when ready), then `client_code` in b, both
    given a's address; (client's output, server's output)."""
    server = subprocess.Popen(
        [*pair.a.exec_prefix(), sys.executable, "-c", server_code, pair.a.addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.run(
            [*pair.b.exec_prefix(), sys.executable, "-c", client_code, pair.a.addr, *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        return client.stdout, server.communicate(timeout=30)[0]
    finally:
        if server.poll() is None:
            server.kill()


def send_between(pair: NetnsPair, size: int) -> tuple[float, str]:
    """Send `size` bytes from b to a over the link; (client's seconds, server's output)."""
    seconds, received = client_server(pair, SERVER, CLIENT, str(size))
    return float(seconds), received


def round_trip(pair: NetnsPair, count: int = 50) -> float:
    """Median seconds of a one-byte TCP round trip from b to a and back."""
    return float(client_server(pair, ECHO, PING, str(count))[0])


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_pair_carries_tcp_between_its_addresses_and_is_removed_afterwards() -> None:
    with netns_pair() as pair:
        assert pair.shaping == "none"
        assert pair.a.netns in namespaces() and pair.b.netns in namespaces()
        _, received = send_between(pair, 1 << 20)
        assert received.split() == [pair.b.addr, str(1 << 20)]  # arrived from b's own address
        # Each namespace sees only loopback and its own veth end, not the machine's interfaces.
        links = subprocess.run(
            [*pair.a.exec_prefix(), "ip", "-o", "link"], capture_output=True, text=True
        ).stdout
        assert [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()] == [
            "lo",
            pair.a.ifname,
        ]
    assert pair.a.netns not in namespaces() and pair.b.netns not in namespaces()


def qdisc(host: Host) -> str:
    return subprocess.run(
        ["tc", "-n", host.netns, "qdisc", "show", "dev", host.ifname], capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize("delay", [None, "0.5ms"])
def test_rate_limit_is_applied_on_both_ends_and_holds(delay: str | None) -> None:
    """Alone (on the veth) and with a delay (on the TUN devices where the delay line applies it)."""
    rate, size = "40mbit", 2_000_000  # 5 MB/s: 2 MB take 0.4 s (unshaped: a few ms)
    with netns_pair(rate=rate, delay=delay) as pair:
        kind = pair.shaping.split()[0]  # netem, or tbf where the kernel has no sch_netem
        for host in (pair.a, pair.b):
            assert f"qdisc {kind}" in qdisc(host) and "rate 40Mbit" in qdisc(host), qdisc(host)
        seconds, _ = send_between(pair, size)
    print(f"\n{pair.shaping}: {size / 1e6:.0f} MB in {seconds:.3f} s")
    expected = size * 8 / rate_bits_per_s(rate)
    assert 0.8 * expected < seconds < 3 * expected


def test_delay_is_applied_to_both_directions() -> None:
    delay = "2ms"  # well above the machine's own round trip, even on a busy machine
    with netns_pair(delay=delay) as pair:
        rtt = round_trip(pair)
    print(f"\n{pair.shaping}: median round trip {rtt * 1e3:.2f} ms")
    assert pair.shaping in (
        "netem delay 2ms",
        "userspace delay 2ms (TUN forwarder; the kernel has no sch_netem)",
    )
    # Once each way; the delay line adds its own forwarding time (a fraction of a ms, when idle).
    assert 2 * delay_seconds(delay) <= rtt < 2 * delay_seconds(delay) + 3e-3


def test_without_delay_the_round_trip_stays_short() -> None:
    with netns_pair() as pair:
        rtt = round_trip(pair)
    print(f"\nunshaped: median round trip {rtt * 1e3:.3f} ms")
    assert rtt < 1e-3


def forwarder_of(pair: NetnsPair) -> subprocess.Popen:
    if pair.forwarder is None:
        pytest.skip(f"no delay line here: {pair.shaping}")
    return pair.forwarder


def gone(pid: int, within_s: float = 0.0) -> bool:
    """Whether process `pid` no longer exists (reaped), waiting up to `within_s` for it."""
    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def children() -> set[int]:
    """Pids of this process's children, zombies included."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(stat.parent.name))
    return pids


def test_delay_line_is_stopped_with_the_pair() -> None:
    with netns_pair(rate="1gbit", delay="0.5ms") as pair:
        forwarder = forwarder_of(pair)
        assert forwarder.poll() is None
        assert delay_line.running_in(pair.b.netns) == [forwarder.pid]
    assert forwarder.returncode is not None and gone(forwarder.pid)
    assert pair.a.netns not in namespaces() and pair.b.netns not in namespaces()


def test_failed_setup_stops_the_delay_line_and_removes_the_namespaces(monkeypatch) -> None:
    started: list[subprocess.Popen] = []
    real_start = delay_line.start

    def start(*args, **kwargs) -> subprocess.Popen:
        started.append(real_start(*args, **kwargs))
        return started[-1]

    def fail(*args) -> str:
        raise NetnsError("injected failure after the delay line started")

    before = namespaces()
    monkeypatch.setattr(delay_line, "start", start)
    monkeypatch.setattr(netns, "_shape", fail)
    with pytest.raises(NetnsError, match="injected"):
        create_pair(rate="1gbit", delay="0.5ms")
    assert namespaces() == before
    if not started:
        pytest.skip("sch_netem applies the delay here: no delay line")
    assert started[0].returncode is not None and gone(started[0].pid)


def test_delay_line_that_cannot_attach_says_why_and_exits() -> None:
    before = children()
    with pytest.raises(delay_line.DelayLineError, match="did not start: .*mfnonexistent"):
        delay_line.start(("mfnonexistent", "tun0"), ("mfnonexistent", "tun1"), 1e-3)
    assert children() == before


def test_delay_line_exits_when_its_creator_is_killed() -> None:
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    pid, *names = creator.stdout.readline().split()
    try:
        creator.kill()  # no cleanup runs: only the EOF on the delay line's stdin tells it
        creator.wait()
        if pid == "none":
            pytest.skip("sch_netem applies the delay here: no delay line")
        assert gone(int(pid), within_s=5)
    finally:
        subprocess.run([sys.executable, "-m", "launch.netns", "down", *names], cwd=REPO, capture_output=True)


def test_up_leaves_the_delay_line_running_until_down() -> None:
    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.netns", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = cli("up", "--delay", "1ms")
    a, b = (Host(*host) for host in re.findall(r"^(\S+)  dev (\S+)  addr (\S+)", out, re.MULTILINE))
    try:
        pid = re.search(r"delay line: pid (\d+)", out)
        if pid is None:
            pytest.skip(f"no delay line here: {out}")
        assert not gone(int(pid.group(1)))  # outlived `up`
        assert round_trip(NetnsPair(a, b, "1ms"), count=10) >= 2e-3  # and carries the delayed link
    finally:
        cli("down", a.netns, b.netns)
    assert gone(int(pid.group(1)), within_s=5)
    assert a.netns not in namespaces() and b.netns not in namespaces()


@pytest.mark.slow
def test_two_namespaces_train_as_two_nodes(tmp_path: Path, small_dataset: Path) -> None:
    """The loopback run of tests/launch/test_multinode.py, but each agent (and its two ranks) in
    its own namespace, reaching the other only over the veth pair: the rendezvous store lives at
    a's address, hosted by a's agent; each agent advertises its own address; gloo binds the veth."""
    run_dir = tmp_path / "run"
    args = [*SMALL, f"run.dir={run_dir}", f"data.sources=[{{path:'{small_dataset}'}}]", "train.steps=3"]
    with netns_pair() as pair:
        nodes = [Node(h.exec_prefix(), h.torchrun_env(hosts_store=h is pair.a)) for h in (pair.a, pair.b)]
        start = time.perf_counter()
        outs = two_nodes(args, tmp_path, master_addr=pair.a.addr, nodes=nodes)
        seconds = time.perf_counter() - start
        stats = json.loads(
            subprocess.run(
                ["ip", "-n", pair.a.netns, "-j", "-s", "link", "show", "dev", pair.a.ifname],
                capture_output=True,
                text=True,
            ).stdout
        )[0]["stats64"]
    assert_trained_three_steps(outs, run_dir)
    # The gradient all-reduces of a 2M-parameter model crossed the veth both ways (MBs, not KBs).
    sent, received = stats["tx"]["bytes"], stats["rx"]["bytes"]
    print(
        f"\n2 namespaces x 2 ranks: {seconds:.1f} s, veth a sent {sent / 1e6:.1f} MB, got {received / 1e6:.1f} MB"
    )
    assert min(sent, received) > 10e6
