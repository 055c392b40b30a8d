"""The shared namespace topology helper: building, routing, running code, teardown."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serval.topology import (
    CONTROL_SOCKET_ENV,
    NETNS_DIR,
    AsyncTopology,
    CommandError,
    Host,
    LanSpec,
    LinkSpec,
    Shaping,
    Topology,
    TopologySpec,
    cleanup_stale,
)

TopologyFactory = Callable[..., Topology]  # the `topology` fixture of tests/conftest.py

CONNECT_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _listen(host: Host, address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with host.enter():
        return socket.create_server((address, port), family=family)


def _roundtrip(client_host: Host, listener: socket.socket, address: str, port: int,
               source: str | None = None) -> str:
    """Connect from `client_host` (optionally from `source`), echo one message; the peer
    address the server saw."""
    with client_host.enter():
        client = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S,
                                          source_address=(source, 0) if source else None)
    with client:
        listener.settimeout(CONNECT_TIMEOUT_S)
        accepted, peer = listener.accept()
        with accepted:
            client.sendall(b"hello")
            assert accepted.recv(5) == b"hello"
    return str(peer[0])


def _gone(topology: Topology) -> bool:
    return (not any((NETNS_DIR / name).exists() for name in topology.namespaces)
            and not topology.state_dir.exists())


# --------------------------------------------------------------------------------------------
# spec validation (no root needed)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hosts": ("A",)}, "must match"),
    ({"hosts": ("a", "a")}, "duplicate"),
    ({"hosts": ("a",), "routers": ("a",)}, "duplicate"),
    ({"hosts": ("a",), "lans": (LanSpec("l", ("a", "x")),)}, "unknown host 'x'"),
    ({"hosts": ("a", "b"), "links": (LinkSpec("a", "a"),)}, "to itself"),
    ({"hosts": ("a", "b"), "lans": (LanSpec("a-b", ("a", "b")),),
      "links": (LinkSpec("a", "b"),)}, "unique"),
])
def test_spec_rejects_mistakes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopologySpec(**kwargs)  # type: ignore[arg-type]


def test_shaping_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="loss_pct"):
        Shaping(loss_pct=101)
    with pytest.raises(ValueError, match="tc rate"):
        Shaping(rate="fast")
    assert Shaping(rate="1gbit").rate == "1gbit"


def test_spec_helpers_accept_lists() -> None:
    spec = TopologySpec(hosts=["a", "b"], links=[LinkSpec("a", "b")])  # type: ignore[arg-type]
    assert spec.hosts == ("a", "b") and isinstance(spec.links, tuple)
    assert TopologySpec.pair().links[0] == LinkSpec("a", "b")
    assert TopologySpec.lan("x", "y", "z").lans[0].hosts == ("x", "y", "z")


# --------------------------------------------------------------------------------------------
# built topologies


@pytest.mark.netns
def test_pair_connects_over_ipv4_and_ipv6(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    assert re.fullmatch(r"svt[0-9a-f]{6}", pair.id)
    assert a.netns == f"{pair.id}-a" and (NETNS_DIR / a.netns).exists()
    assert [i.name for i in a.interfaces] == ["eth0"]
    assert a.ipv4 == "10.77.1.1" and b.ipv4 == "10.77.1.2"
    assert a.ipv6 == "fd77:0:0:1::1" and b.ipv6 == "fd77:0:0:1::2"
    for address in (b.ipv4, b.ipv6):
        with _listen(b, address, 5000) as listener:
            seen = _roundtrip(a, listener, address, 5000)
        assert seen in (a.ipv4, a.ipv6)
    # Per-host servald control socket and environment.
    assert a.control_socket.parent.is_dir()
    assert a.control_socket.is_relative_to(pair.state_dir)
    assert a.control_socket != b.control_socket
    assert a.env()[CONTROL_SOCKET_ENV] == str(a.control_socket)
    printed = a.run([sys.executable, "-c",
                     f"import os; print(os.environ['{CONTROL_SOCKET_ENV}'])"]).stdout
    assert printed.strip() == str(a.control_socket)


@pytest.mark.netns
def test_routers_forward_and_plain_hosts_do_not(topology: TopologyFactory) -> None:
    # a and b on different LANs, joined by router r; c hangs off a, which does not forward.
    spec = TopologySpec(hosts=("a", "b", "c"), routers=("r",),
                        lans=(LanSpec("lan1", ("a", "r")), LanSpec("lan2", ("r", "b"))),
                        links=(LinkSpec("a", "c"),))
    topo = topology(spec)
    a, b, c, r = topo["a"], topo["b"], topo["c"], topo["r"]
    assert r.sysctl("ipv4/ip_forward") == "1" and a.sysctl("ipv4/ip_forward") == "0"
    routes = a.run(["ip", "route"]).stdout
    assert f"10.77.2.0/24 via {r.address('lan1')}" in routes
    for version in (4, 6):
        address = str(b.address(version=version))
        with _listen(b, address, 5001) as listener:
            seen = _roundtrip(a, listener, address, 5001)
        assert seen == str(a.address("lan1", version))  # routed, not NATed
    # c reaches a (same link) but has no route beyond it: a is not a router.
    with _listen(a, str(a.address("a-c")), 5002) as listener:
        _roundtrip(c, listener, str(a.address("a-c")), 5002)
    with c.enter(), pytest.raises(OSError) as excinfo:
        socket.create_connection((b.ipv4, 5001), timeout=CONNECT_TIMEOUT_S)
    assert excinfo.value.errno == errno.ENETUNREACH


@pytest.mark.netns
def test_routes_through_a_chain_of_routers(topology: TopologyFactory) -> None:
    # a - lan1 - r1 - (link) - r2 - lan2 - b: two routed hops each way, IPv4 and IPv6.
    spec = TopologySpec(hosts=("a", "b"), routers=("ra", "rb"),
                        lans=(LanSpec("lan1", ("a", "ra")), LanSpec("lan2", ("rb", "b"))),
                        links=(LinkSpec("ra", "rb", name="core"),))
    topo = topology(spec)
    a, b = topo["a"], topo["b"]
    for version in (4, 6):
        address = str(b.address(version=version))
        with _listen(b, address, 5010) as listener:
            assert _roundtrip(a, listener, address, 5010) == str(a.address(version=version))
    # rb reaches lan1 through ra's address on the core link.
    core = topo.segment("core")
    assert f"{topo.segment('lan1').ipv4_subnet} via {topo['ra'].address('core')}" in \
        topo["rb"].run(["ip", "route"]).stdout
    assert str(core.ipv4_subnet) == "10.77.3.0/24"


@pytest.mark.netns
def test_run_popen_and_teardown_remove_everything() -> None:
    topo = Topology.build(TopologySpec.lan("a", "b", "c"))
    try:
        a = topo["a"]
        result = a.run(["ip", "-o", "link", "show", "eth0"])
        assert "eth0" in result.stdout
        with pytest.raises(CommandError, match="does not exist"):
            a.run(["ip", "link", "show", "nosuchdev"])
        assert a.run(["false"], check=False).returncode == 1
        sleeper = a.popen(["sleep", "600"])
        assert sleeper.poll() is None
        # The process really is inside the namespace (once `ip netns exec` has switched).
        target = _netns_inode(str(NETNS_DIR / a.netns))
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while _netns_inode(f"/proc/{sleeper.pid}/ns/net") != target:
            assert time.monotonic() < deadline, "popen'ed process never entered the namespace"
            time.sleep(0.01)
        assert topo.segment("lan").bridge == "br1"
        assert topo.namespaces[-1].endswith("-_sw")
    finally:
        topo.close()
    assert sleeper.wait(5) is not None
    assert _gone(topo)
    topo.close()  # idempotent


@pytest.mark.netns
def test_teardown_after_an_exception() -> None:
    topo: Topology | None = None
    with pytest.raises(RuntimeError, match="boom"), Topology.build(TopologySpec.pair()) as built:
        topo = built
        raise RuntimeError("boom")
    assert topo is not None and _gone(topo)


@pytest.mark.netns
def test_cleanup_stale_removes_only_dead_owners(pair: Topology) -> None:
    # A "crashed run": builds a topology and dies without any teardown (os._exit skips
    # atexit).
    script = textwrap.dedent("""
        import os
        from serval.topology import Topology, TopologySpec
        topo = Topology.build(TopologySpec.pair())
        print(" ".join(topo.namespaces), flush=True)
        os._exit(0)
    """)
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=60, check=True).stdout.split()
    assert crashed and all((NETNS_DIR / name).exists() for name in crashed)
    # A namespace that only looks like ours (no owner record): never touched.
    foreign = "svt0badc0-x"
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        removed = cleanup_stale()
        assert set(crashed) <= set(removed)
        assert not any((NETNS_DIR / name).exists() for name in crashed)
        assert (NETNS_DIR / foreign).exists()
        assert all((NETNS_DIR / name).exists() for name in pair.namespaces)  # live: kept
        assert not set(pair.namespaces) & set(removed)
    finally:
        subprocess.run(["ip", "netns", "delete", foreign], check=True)


@pytest.mark.netns
def test_enter_call_and_thread(pair: Topology) -> None:
    a = pair["a"]
    outside = _netns_inode("/proc/thread-self/ns/net")
    with a.enter():
        assert _netns_inode("/proc/thread-self/ns/net") == _netns_inode(str(NETNS_DIR / a.netns))
        with pair["b"].enter():  # nesting restores the outer one
            assert _netns_inode("/proc/thread-self/ns/net") != outside
        assert _netns_inode("/proc/thread-self/ns/net") == _netns_inode(str(NETNS_DIR / a.netns))
    assert _netns_inode("/proc/thread-self/ns/net") == outside

    def interfaces() -> list[str]:
        return [line.split(":")[0].strip()
                for line in Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]]

    assert sorted(a.call(interfaces)) == ["eth0", "lo"]
    with pytest.raises(ZeroDivisionError):
        a.call(lambda: 1 // 0)
    thread = a.thread(threading.current_thread)
    assert thread.result().name == f"netns:{a.netns}"


@pytest.mark.netns
def test_sysctl_and_counters_are_per_namespace(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    root_value = Path("/proc/sys/net/ipv4/tcp_sack").read_text().strip()
    a.sysctl("ipv4/tcp_sack", 0 if root_value == "1" else 1)
    assert a.sysctl("ipv4/tcp_sack") != root_value
    assert b.sysctl("ipv4/tcp_sack") == root_value
    assert Path("/proc/sys/net/ipv4/tcp_sack").read_text().strip() == root_value
    before = b.net_counters()["Tcp.PassiveOpens"]
    with _listen(b, b.ipv4, 5003) as listener:
        _roundtrip(a, listener, b.ipv4, 5003)
    assert b.net_counters()["Tcp.PassiveOpens"] == before + 1
    assert a.net_counters()["Tcp.ActiveOpens"] >= 1


@pytest.mark.netns
def test_addresses_can_be_added_and_removed_at_runtime(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    first = a.ipv4
    second = str(pair.add_address("a", "a-b"))
    assert second == "10.77.1.3"  # next free one of the segment
    assert a.addresses(4) == [pair["a"].address(version=4), pair["a"].addresses(4)[1]]
    v6 = str(pair.add_address("a", "eth0", version=6))
    with _listen(b, b.ipv4, 5004) as listener:
        assert _roundtrip(a, listener, b.ipv4, 5004, source=second) == second
    pair.remove_address("a", first)
    # promote_secondaries: the other address of the subnet survives its primary.
    assert a.ipv4 == second
    assert second in a.run(["ip", "-4", "addr", "show", "eth0"]).stdout
    with _listen(a, second, 5005) as listener:
        assert _roundtrip(b, listener, second, 5005) == b.ipv4
    with _listen(a, v6, 5006) as listener:
        _roundtrip(b, listener, v6, 5006)
    with pytest.raises(LookupError):
        pair.remove_address("a", first)


@pytest.mark.netns
def test_link_down_and_up(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    pair.set_link("a", "a-b", up=False)
    with a.enter(), pytest.raises(OSError):
        socket.create_connection((b.ipv4, 5007), timeout=1)
    pair.set_link("a", "a-b", up=True)
    with _listen(b, b.ipv4, 5007) as listener:
        _roundtrip(a, listener, b.ipv4, 5007)
    assert a.ipv6 in a.run(["ip", "-6", "addr", "show", "eth0"]).stdout  # kept while down


@pytest.mark.netns
def test_policy_routing_helpers(topology: TopologyFactory) -> None:
    topo = topology(TopologySpec(hosts=("a", "b"), links=(LinkSpec("a", "b", name="one"),
                                                          LinkSpec("a", "b", name="two"))))
    a = topo["a"]
    topo.add_route("a", "10.99.0.0/24", str(topo["b"].address("two")), table=102)
    topo.add_rule("a", str(a.address("two")), table=102, priority=1000)
    assert "10.99.0.0/24 via 10.77.2.2" in a.run(["ip", "route", "show", "table", "102"]).stdout
    assert "from 10.77.2.1 lookup 102" in a.run(["ip", "rule"]).stdout


@pytest.mark.netns
def test_shaping_installs_tbf_and_loses_packets(topology: TopologyFactory) -> None:
    topo = topology(TopologySpec.pair(shaping=Shaping(rate="20mbit", loss_pct=20.0)))
    a, b = topo["a"], topo["b"]
    for host in (a, b):
        qdisc = host.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in qdisc and "rate 20Mbit" in qdisc
    count = 1000
    with b.enter():
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a.enter():
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: keep them all
        receiver.bind((b.ipv4, 5008))
        for sequence in range(count):
            sender.sendto(sequence.to_bytes(4, "big"), (b.ipv4, 5008))
            if sequence % 20 == 19:
                # Paced, so that only the nftables loss rule drops datagrams, never a full tbf
                # queue (a burst of 1000 overflowed it on a loaded CI machine).
                time.sleep(0.002)
        received = 0
        receiver.settimeout(1.0)
        try:
            while True:
                receiver.recv(16)
                received += 1
        except TimeoutError:
            pass
    # Binomial(1000, 0.8): mean 800, sd 12.6; the bounds are 8 sd away.
    assert 700 < received < 900
    assert re.search(r"packets [1-9]\d* bytes \d+ drop", b.run(["nft", "list", "ruleset"]).stdout)
    stats = a.run(["tc", "-s", "qdisc", "show", "dev", "eth0"]).stdout
    assert re.search(r"Sent [1-9]\d* bytes", stats)


@pytest.mark.netns
def test_async_api() -> None:
    async def main() -> list[str]:
        async with AsyncTopology.build(TopologySpec.pair()) as topo:
            new = await topo.add_address("b", "a-b")
            listener = _listen(topo["b"], str(new), 5009)
            with listener:
                seen = await asyncio.to_thread(_roundtrip, topo["a"], listener, str(new), 5009)
            assert seen == topo["a"].ipv4
            namespaces = topo.namespaces
            assert all((NETNS_DIR / name).exists() for name in namespaces)
        return namespaces

    namespaces = asyncio.run(main())
    assert not any((NETNS_DIR / name).exists() for name in namespaces)
