"""TCP_REPAIR primitives: establishment, conflicts, port allocation, freeze/dump/rebuild."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serval.errors import RepairError
from serval.host import repair
from serval.host.ports import ClientPortAllocator, read_reserved_ports
from serval.host.repair import RepairWindow, TransportParams
from serval.topology import Host, Topology

SERVICE_PORT = 7000
TRANSFER_BYTES = 4 << 20
IO_TIMEOUT_S = 30.0
NARROW_PORT_RANGE = (40000, 40999)  # 1000 ports: bind(0) runs out after 1000 TIME-WAITs
MANY_CONNECTIONS = 2500
RST_COUNTERS = ("Tcp.OutRsts", "TcpExt.TCPAbortOnData", "TcpExt.TCPAbortOnClose",
                "TcpExt.TCPAbortOnTimeout", "TcpExt.TCPAbortFailed")

# --------------------------------------------------------------------------------------------
# helpers


def _addresses(a: Host, b: Host, version: int) -> tuple[str, str]:
    return str(a.address(version=version)), str(b.address(version=version))


def _params(host: Host, local: str, remote: str, rng: random.Random) -> TransportParams:
    with host.enter():
        return repair.own_transport_params(local, remote, rng)


def _establish(client: Host, server: Host, version: int, rng: random.Random, *,
               client_params: TransportParams | None = None,
               server_params: TransportParams | None = None,
               client_port: int = 0) -> tuple[socket.socket, socket.socket]:
    """The SAL's sequence without the SAL: server socket built (frozen) before the client
    completes and releases; the server is released last."""
    client_ip, server_ip = _addresses(client, server, version)
    own = client_params or _params(client, client_ip, server_ip, rng)
    peer = server_params or _params(server, server_ip, client_ip, rng)
    with client.enter():
        client_sock = repair.prepare_client_socket(client_ip, client_port)
    port = client_sock.getsockname()[1]
    try:
        with server.enter():
            server_sock = repair.build_server_socket(server_ip, SERVICE_PORT, peer, own,
                                                     client_ip, port)
    except BaseException:
        client_sock.close()
        raise
    try:
        repair.complete_socket(client_sock, own, peer, server_ip, SERVICE_PORT)
    except BaseException:
        repair.discard(server_sock)
        raise
    repair.release(server_sock)
    return client_sock, server_sock


def _send_and_receive(sock: socket.socket, data: bytes, expected: int) -> str:
    """Send `data` on one thread while receiving `expected` bytes; sha256 of what came in."""
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    digest = hashlib.sha256()
    received = 0
    sock.settimeout(IO_TIMEOUT_S)
    while received < expected:
        chunk = sock.recv(min(1 << 20, expected - received))
        assert chunk, f"connection closed after {received} of {expected} bytes"
        digest.update(chunk)
        received += len(chunk)
    sender.join(IO_TIMEOUT_S)
    assert not sender.is_alive()
    return digest.hexdigest()


def _exchange(left: socket.socket, right: socket.socket, size: int, seed: int) -> None:
    """Both directions at once, sha256-verified."""
    rng = random.Random(seed)
    to_right, to_left = rng.randbytes(size), rng.randbytes(size)
    result: dict[str, str] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("right", _send_and_receive(right, to_left, size)),
        daemon=True)
    thread.start()
    got_left = _send_and_receive(left, to_right, size)
    thread.join(IO_TIMEOUT_S)
    assert got_left == hashlib.sha256(to_left).hexdigest()
    assert result["right"] == hashlib.sha256(to_right).hexdigest()


def _resets(host: Host) -> dict[str, int]:
    counters = host.net_counters()
    return {name: counters.get(name, 0) for name in RST_COUNTERS}


def _no_resets(*hosts: Host) -> None:
    for host in hosts:
        assert _resets(host) == dict.fromkeys(RST_COUNTERS, 0), host.name


# --------------------------------------------------------------------------------------------
# pure parts (no root needed)


def test_repair_window_right_edge_wraps() -> None:
    window = RepairWindow(snd_wl1=1, snd_wnd=2, max_window=3, rcv_wnd=0x20, rcv_wup=0xFFFFFFF0)
    assert window.right_edge == 0x10
    assert RepairWindow.unpack(window.pack()) == window


def test_seq_diff_is_signed_modulo_2_32() -> None:
    assert repair.seq_diff(5, 0xFFFFFFFB) == 10
    assert repair.seq_diff(0xFFFFFFFB, 5) == -10


def _fake_sysctls(tmp_path: Path, rmem: str, scaling: int = 1, sack: int = 1,
                  timestamps: int = 1) -> Path:
    (tmp_path / "ipv4").mkdir()
    (tmp_path / "core").mkdir()
    (tmp_path / "ipv4/tcp_rmem").write_text(rmem)
    (tmp_path / "core/rmem_max").write_text("212992")
    (tmp_path / "ipv4/tcp_window_scaling").write_text(str(scaling))
    (tmp_path / "ipv4/tcp_sack").write_text(str(sack))
    (tmp_path / "ipv4/tcp_timestamps").write_text(str(timestamps))
    return tmp_path


@pytest.mark.parametrize(("rmem", "scaling", "wscale"), [
    ("4096 131072 33554432", 1, 10),
    ("4096 131072 6291456", 1, 7),
    ("4096 131072 6291456", 0, None),
])
def test_own_params_follow_the_kernel_formulas(tmp_path: Path, rmem: str, scaling: int,
                                               wscale: int | None) -> None:
    # Towards 127.0.0.1 the route MTU is lo's (about 64 KiB), so the window, tcp_rmem[1] / 2
    # = 65536 rounded down to whole segments, is exactly one MSS.
    sysctls = _fake_sysctls(tmp_path, rmem, scaling, timestamps=1)
    params = repair.own_transport_params("127.0.0.1", "127.0.0.1", random.Random(3),
                                         sysctl_dir=sysctls)
    # lo's MTU minus 40 is ~65000, more than setsockopt(TCP_MAXSEG) accepts: clamped.
    assert repair.route_mtu("127.0.0.1", "127.0.0.1") - 40 > repair.TCP_MAXSEG_MAX
    assert params.mss == repair.TCP_MAXSEG_MAX
    assert params.window_scale == wscale  # ilog2(max(tcp_rmem[2], rmem_max)) - 15
    assert params.window == 65536 // params.mss * params.mss
    assert params.sack and params.timestamps
    assert params.tsval is not None and params.tsval & 1 == 0
    assert 0 <= params.isn < 1 << 32


def test_own_params_without_timestamps_have_no_tsval(tmp_path: Path) -> None:
    sysctls = _fake_sysctls(tmp_path, "4096 131072 6291456", sack=0, timestamps=0)
    params = repair.own_transport_params("127.0.0.1", "127.0.0.1", random.Random(3),
                                         sysctl_dir=sysctls)
    assert not params.sack and not params.timestamps and params.tsval is None


def test_port_allocator_is_sequential_per_destination() -> None:
    allocator = ClientPortAllocator(random.Random(7), (1000, 1009))
    first = [allocator.allocate("10.0.0.1", ("10.0.0.2", 80)) for _ in range(10)]
    assert sorted(first) == list(range(1000, 1010))  # whole range, no repeats
    assert all(b == (a + 1 - 1000) % 10 + 1000 for a, b in itertools.pairwise(first))
    # A different destination has its own sequence and may reuse the same ports.
    other = allocator.allocate("10.0.0.1", ("10.0.0.3", 80))
    assert 1000 <= other <= 1009
    with pytest.raises(RepairError) as excinfo:
        allocator.allocate("10.0.0.1", ("10.0.0.2", 80))
    assert excinfo.value.errno == errno.EADDRNOTAVAIL
    allocator.release("10.0.0.1", first[3], ("10.0.0.2", 80))
    assert allocator.allocate("10.0.0.1", ("10.0.0.2", 80)) == first[3]
    assert allocator.live("10.0.0.1", ("10.0.0.2", 80)) == 10


def test_port_allocator_skips_live_and_reserved_ports() -> None:
    allocator = ClientPortAllocator(random.Random(1), (2000, 2004), frozenset({2001, 2003}))
    ports = {allocator.allocate("::1") for _ in range(3)}
    assert ports == {2000, 2002, 2004}


def test_reserved_ports_parse(tmp_path: Path) -> None:
    path = tmp_path / "reserved"
    path.write_text("8080,9000-9002\n")
    assert read_reserved_ports(path) == frozenset({8080, 9000, 9001, 9002})
    path.write_text("\n")
    assert read_reserved_ports(path) == frozenset()


# --------------------------------------------------------------------------------------------
# establishment across namespaces


@pytest.mark.netns
@pytest.mark.parametrize("version", [4, 6])
def test_repair_connection_matches_a_handshaked_one(pair: Topology, version: int) -> None:
    a, b = pair["a"], pair["b"]
    a_ip, b_ip = _addresses(a, b, version)
    rng = random.Random(version)
    client, server = _establish(a, b, version, rng)
    try:
        _exchange(client, server, TRANSFER_BYTES, seed=version)
        # The same link with a kernel handshake, for comparison.
        with b.enter():
            family = socket.AF_INET6 if version == 6 else socket.AF_INET
            listener = socket.create_server((b_ip, SERVICE_PORT + 1), family=family)
        with a.enter():
            handshaked = socket.create_connection((b_ip, SERVICE_PORT + 1), timeout=5)
        accepted, _ = listener.accept()
        _exchange(handshaked, accepted, 1 << 20, seed=9)
        for repaired, kernel in ((client, handshaked), (server, accepted)):
            got, want = repair.tcp_info(repaired), repair.tcp_info(kernel)
            assert got.state == repair.TCP_ESTABLISHED
            assert got.sack and got.timestamps and got.window_scaling
            assert (got.options, got.snd_wscale, got.rcv_wscale, got.snd_mss) == (
                want.options, want.snd_wscale, want.rcv_wscale, want.snd_mss)
        assert repair.tcp_info(client).snd_mss == (1448 if version == 4 else 1428)
        for sock in (handshaked, accepted, listener):
            sock.close()
        # FIN from the client closes normally: the server reads EOF, the client ends in
        # TIME-WAIT and the server in CLOSED, exactly as with a handshaked connection.
        client_port = client.getsockname()[1]
        client.close()
        server.settimeout(IO_TIMEOUT_S)
        assert server.recv(1) == b""
        server.close()
        time.sleep(0.05)  # let the last ACK land
        a_states = a.run(["ss", "-Htan", f"sport = :{client_port}"]).stdout
        assert "TIME-WAIT" in a_states
        assert b.run(["ss", "-Htan", f"sport = :{SERVICE_PORT}"]).stdout.strip() == ""
        _no_resets(a, b)
        assert a.net_counters()["Tcp.EstabResets"] == 0
        assert b.net_counters()["Tcp.EstabResets"] == 0
        assert a_ip != b_ip
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_window_scaling_off_on_one_side(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    a.sysctl("ipv4/tcp_window_scaling", 0)
    rng = random.Random(11)
    a_ip, b_ip = _addresses(a, b, 4)
    own = _params(a, a_ip, b_ip, rng)
    assert own.window_scale is None and own.window <= 65535
    client, server = _establish(a, b, 4, rng, client_params=own)
    try:
        _exchange(client, server, 1 << 20, seed=4)
        for sock in (client, server):
            info = repair.tcp_info(sock)
            assert (info.snd_wscale, info.rcv_wscale) == (0, 0)
            # What the peer advertises is unscaled. (tcpi_rcv_wnd, the kernel's own idea,
            # grows past 65535 with autotuning, exactly as on a handshaked connection.)
            assert info.snd_wnd <= 65535
        _no_resets(a, b)
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_sack_and_timestamps_off(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    a.sysctl("ipv4/tcp_sack", 0)
    a.sysctl("ipv4/tcp_timestamps", 0)
    client, server = _establish(a, b, 4, random.Random(12))
    try:
        _exchange(client, server, 1 << 20, seed=5)
        for sock in (client, server):
            info = repair.tcp_info(sock)
            assert not info.sack and not info.timestamps
            # Full 1460-byte segments on the wire (more than 1448 on average): there is no
            # timestamp option to make room for. (b's tcpi_snd_mss still reads 1448: its
            # repair connect() counted the option its sysctl allows into tcp_header_len;
            # tcp_current_mss() corrects that per send, so it is only cosmetic.)
            assert info.bytes_sent / info.data_segs_out > 1448
        _no_resets(a, b)
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_route_mtu_towards_the_lan_broadcast_address(pair: Topology) -> None:
    """Ad-hoc mode's first hop is the LAN broadcast address: the MTU lookup must answer (with
    the interface's MTU) rather than fail with EACCES and push servald into handshake mode."""
    a = pair["a"]
    a_ip = str(a.address(version=4))
    lan = next(i for i in a.interfaces[0].addresses if i.version == 4)
    broadcast = str(lan.network.broadcast_address)
    with a.enter():
        mtu = repair.route_mtu(a_ip, broadcast)
        params = repair.own_transport_params(a_ip, broadcast, random.Random(5))
    assert mtu == 1500  # veth default
    assert params.mss == 1460


@pytest.mark.netns
def test_loopback_connection_with_the_clamped_mss(pair: Topology) -> None:
    """Both ends on 127.0.0.1 (a service on the same host): lo's MTU gives an MSS that
    TCP_MAXSEG refuses unless clamped; with the clamp the repair connection works."""
    a = pair["a"]
    rng = random.Random(21)
    with a.enter():
        own = repair.own_transport_params("127.0.0.1", "127.0.0.1", rng)
        peer = repair.own_transport_params("127.0.0.1", "127.0.0.1", rng)
        assert own.mss == peer.mss == repair.TCP_MAXSEG_MAX
        client = repair.prepare_client_socket("127.0.0.1")
        server = repair.build_server_socket("127.0.0.1", SERVICE_PORT, peer, own, "127.0.0.1",
                                            client.getsockname()[1])
        try:
            repair.complete_socket(client, own, peer, "127.0.0.1", SERVICE_PORT)
            repair.release(server)
            assert repair.tcp_info(client).snd_mss <= repair.TCP_MAXSEG_MAX
            _exchange(client, server, 1 << 20, seed=22)
        finally:
            client.close()
            server.close()


@pytest.mark.netns
def test_frozen_server_is_silent_and_takes_data_before_release(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    rng = random.Random(13)
    a_ip, b_ip = _addresses(a, b, 4)
    own, peer = _params(a, a_ip, b_ip, rng), _params(b, b_ip, a_ip, rng)
    with a.enter():
        client = repair.prepare_client_socket(a_ip)
    sent_before = b.net_counters()["Ip.OutRequests"]
    with b.enter():
        server = repair.build_server_socket(b_ip, SERVICE_PORT, peer, own, a_ip,
                                            client.getsockname()[1])
    try:
        assert b.net_counters()["Ip.OutRequests"] == sent_before  # nothing on the wire
        repair.complete_socket(client, own, peer, b_ip, SERVICE_PORT)
        client.sendall(b"first data")  # the implicit SAL ACK
        assert select.select([server], [], [], IO_TIMEOUT_S)[0] == [server]
        repair.release(server)
        assert server.recv(100) == b"first data"
        server.sendall(b"reply")
        client.settimeout(IO_TIMEOUT_S)
        assert client.recv(100) == b"reply"
        _no_resets(a, b)
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_listener_can_rebind_the_port_of_released_connections(pair: Topology) -> None:
    """release() sets SO_REUSEADDR again (notes 4b pitfall 11): a restarted SO_REUSEADDR
    listener can bind the service port while repair-built connections use it."""
    a, b = pair["a"], pair["b"]
    client, server = _establish(a, b, 4, random.Random(17))
    try:
        def listen() -> socket.socket:
            with b.enter():
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((b.ipv4, SERVICE_PORT))
                listener.listen()
            except BaseException:
                listener.close()
                raise
            return listener

        listen().close()
        # Without the fix (leaving repair mode reset sk_reuse to "no"), the bind conflicts.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        with pytest.raises(OSError) as excinfo:
            listen()
        assert excinfo.value.errno == errno.EADDRINUSE
        _exchange(client, server, 1 << 12, seed=17)
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_live_4_tuple_conflict_raises_repair_error(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    rng = random.Random(14)
    a_ip, b_ip = _addresses(a, b, 4)
    client, server = _establish(a, b, 4, rng)
    port = client.getsockname()[1]
    try:
        own, peer = _params(a, a_ip, b_ip, rng), _params(b, b_ip, a_ip, rng)
        # Server side: the same client endpoint again.
        with b.enter(), pytest.raises(RepairError) as server_error:
            repair.build_server_socket(b_ip, SERVICE_PORT, peer, own, a_ip, port)
        assert (server_error.value.step, server_error.value.errno) == (
            "connect", errno.EADDRNOTAVAIL)
        # Client side: a repair bind shares the port, and connect() catches the conflict.
        with a.enter():
            second = repair.prepare_client_socket(a_ip, port)
        with pytest.raises(RepairError) as client_error:
            repair.complete_socket(second, own, peer, b_ip, SERVICE_PORT)
        assert client_error.value.errno == errno.EADDRNOTAVAIL
        assert second.fileno() == -1  # closed on failure
        _exchange(client, server, 1 << 16, seed=6)  # the live one is unharmed
        _no_resets(a, b)
    finally:
        client.close()
        server.close()


@pytest.mark.netns
@pytest.mark.parametrize("timestamps", [True, False])
def test_time_wait_reuse_depends_on_timestamps(pair: Topology, timestamps: bool) -> None:
    """With timestamps a client TIME-WAIT of the same 4-tuple is recycled by the repair
    connect(); without them it is a conflict (EADDRNOTAVAIL): the premise of the allocator."""
    a, b = pair["a"], pair["b"]
    if not timestamps:
        a.sysctl("ipv4/tcp_timestamps", 0)
    rng = random.Random(15)
    client, server = _establish(a, b, 4, rng)
    port = client.getsockname()[1]
    _exchange(client, server, 1 << 12, seed=7)
    client.close()  # client closes first: TIME-WAIT on a
    server.settimeout(IO_TIMEOUT_S)
    assert server.recv(1) == b""
    server.close()
    time.sleep(0.05)
    assert "TIME-WAIT" in a.run(["ss", "-Htan", f"sport = :{port}"]).stdout
    if timestamps:
        again_client, again_server = _establish(a, b, 4, rng, client_port=port)
        try:
            _exchange(again_client, again_server, 1 << 12, seed=8)
            assert a.net_counters()["TcpExt.TWRecycled"] >= 1
        finally:
            again_client.close()
            again_server.close()
    else:
        with pytest.raises(RepairError) as excinfo:
            _establish(a, b, 4, rng, client_port=port)
        assert excinfo.value.errno == errno.EADDRNOTAVAIL
    _no_resets(a, b)


def _connection_loop(a: Host, b: Host, count: int, rng: random.Random,
                     allocator: ClientPortAllocator | None) -> tuple[int, int, RepairError | None]:
    """Up to `count` short connections (ping / pong, client closes first). Returns
    (connections made, 4-tuple conflicts retried, the error that stopped the loop)."""
    a_ip, b_ip = _addresses(a, b, 4)
    own = _params(a, a_ip, b_ip, rng)
    peer = _params(b, b_ip, a_ip, rng)
    remote = (b_ip, SERVICE_PORT)
    conflicts = 0
    for made in range(count):
        for _attempt in range(10):
            port = allocator.allocate(a_ip, remote) if allocator else 0
            fresh_own = dataclasses.replace(own, isn=rng.getrandbits(32))
            fresh_peer = dataclasses.replace(peer, isn=rng.getrandbits(32))
            try:
                client, server = _establish(a, b, 4, rng, client_params=fresh_own,
                                            server_params=fresh_peer, client_port=port)
            except RepairError as exc:
                if allocator is None:
                    return made, conflicts, exc
                assert exc.errno == errno.EADDRNOTAVAIL, exc
                allocator.release(a_ip, port, remote)  # and try the next port
                conflicts += 1
                continue
            break
        else:
            raise AssertionError("10 conflicts in a row")
        client.sendall(b"ping")
        assert server.recv(16) == b"ping"
        server.sendall(b"pong")
        assert client.recv(16) == b"pong"
        client.close()
        assert server.recv(16) == b""
        server.close()
        if allocator:
            allocator.release(a_ip, port, remote)
    return count, conflicts, None


@pytest.mark.netns
def test_port_allocator_outlasts_bind0(pair: Topology, capsys: pytest.CaptureFixture[str]) -> None:
    """bind(0) runs out once every port of the range sits in TIME-WAIT; the allocator keeps
    going (timestamps on: TIME-WAITs are recycled). The rate is reported, not asserted."""
    a, b = pair["a"], pair["b"]
    a.sysctl("ipv4/ip_local_port_range", f"{NARROW_PORT_RANGE[0]} {NARROW_PORT_RANGE[1]}")
    range_size = NARROW_PORT_RANGE[1] - NARROW_PORT_RANGE[0] + 1
    rng = random.Random(16)
    with a.enter():
        allocator = ClientPortAllocator.from_sysctl(rng)
    assert allocator.port_range == NARROW_PORT_RANGE

    started = time.perf_counter()
    made, conflicts, error = _connection_loop(a, b, MANY_CONNECTIONS, rng, allocator)
    elapsed = time.perf_counter() - started
    assert (made, error) == (MANY_CONNECTIONS, None)
    assert a.net_counters()["TcpExt.TWRecycled"] >= MANY_CONNECTIONS - range_size
    _no_resets(a, b)

    # Baseline: bind(0) on a fresh range of the same size (the one above is all TIME-WAIT).
    a.sysctl("ipv4/ip_local_port_range", "50000 50999")
    made_bind0, _, error = _connection_loop(a, b, MANY_CONNECTIONS, rng, None)
    assert made_bind0 == range_size
    assert error is not None and (error.step, error.errno) == ("bind", errno.EADDRINUSE)
    _no_resets(a, b)
    with capsys.disabled():
        print(f"\n[repair] port allocator: {MANY_CONNECTIONS} connections over a "
              f"{range_size}-port range at {MANY_CONNECTIONS / elapsed:.0f} connections/s "
              f"(in-process, both ends, {conflicts} conflicts); bind(0) stopped after "
              f"{made_bind0} (EADDRINUSE)")


# --------------------------------------------------------------------------------------------
# migration


class _App(threading.Thread):
    """One application end: sends `outgoing` and receives `expected` bytes on a non-blocking
    socket, parking outside any system call when asked (notes 6.1)."""

    def __init__(self, sock: socket.socket, outgoing: bytes, expected: int) -> None:
        super().__init__(daemon=True)
        sock.setblocking(False)
        self.sock = sock
        self.outgoing = memoryview(outgoing)
        self.expected = expected
        self.received = 0
        self.digest = hashlib.sha256()
        self.park_requested = threading.Event()
        self.parked = threading.Event()
        self.resumed = threading.Event()
        self.prefix = memoryview(b"")  # bytes to send before any new data after a resume
        self.error: BaseException | None = None

    def park(self) -> None:
        self.park_requested.set()
        assert self.parked.wait(IO_TIMEOUT_S), "application did not park"

    def resume(self, pending: bytes = b"") -> None:
        self.prefix = memoryview(pending)
        self.park_requested.clear()
        self.parked.clear()
        self.resumed.set()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + IO_TIMEOUT_S
            while self.received < self.expected or self.outgoing or self.prefix:
                assert time.monotonic() < deadline, "transfer did not finish"
                if self.park_requested.is_set():
                    self.parked.set()
                    self.resumed.wait(IO_TIMEOUT_S)
                    self.resumed.clear()
                    continue
                writing = bool(self.prefix or self.outgoing)
                readable, writable, _ = select.select(
                    [self.sock], [self.sock] if writing else [], [], 0.01)
                if readable:
                    chunk = self.sock.recv(1 << 18)
                    assert chunk or self.received == self.expected, "unexpected EOF"
                    self.digest.update(chunk)
                    self.received += len(chunk)
                if writable:
                    buffer = self.prefix if self.prefix else self.outgoing
                    try:
                        sent = self.sock.send(buffer[: 1 << 18])
                    except BlockingIOError:
                        continue
                    if self.prefix:
                        self.prefix = self.prefix[sent:]
                    else:
                        self.outgoing = self.outgoing[sent:]
        except BaseException as exc:
            self.error = exc


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + IO_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _start_transfer(left: socket.socket, right: socket.socket, size: int,
                    seed: int) -> tuple[_App, _App, bytes, bytes]:
    rng = random.Random(seed)
    to_right, to_left = rng.randbytes(size), rng.randbytes(size)
    left_app, right_app = _App(left, to_right, size), _App(right, to_left, size)
    left_app.start()
    right_app.start()
    return left_app, right_app, to_right, to_left


def _finish_transfer(left_app: _App, right_app: _App, to_right: bytes, to_left: bytes) -> None:
    for app in (left_app, right_app):
        app.join(IO_TIMEOUT_S)
        assert not app.is_alive(), "transfer did not finish"
        if app.error is not None:
            raise app.error
    assert left_app.digest.hexdigest() == hashlib.sha256(to_left).hexdigest()
    assert right_app.digest.hexdigest() == hashlib.sha256(to_right).hexdigest()


@pytest.mark.netns
@pytest.mark.parametrize("version", [4, 6])
def test_migration_round_trip(pair: Topology, version: int) -> None:
    """Both ends freeze and dump, both rebuild on a new address of a, commit in the RST-free
    order (notes 3.5), the old address is deleted, and the transfer completes intact."""
    a, b = pair["a"], pair["b"]
    client, server = _establish(a, b, version, random.Random(20 + version))
    old_a = client.getsockname()[0]
    new_a = str(pair.add_address("a", "a-b", version=version))
    a_app, b_app, to_b, to_a = _start_transfer(client, server, 16 << 20, seed=version)
    try:
        _wait_for(lambda: a_app.received >= (16 << 20) * 2 // 5, "40% of the transfer")
        a_app.park()
        b_app.park()
        # A: freeze + dump, "send RSYN" (its rcv_nxt and window edge).
        repair.freeze(client)
        a_state = repair.dump(client)
        # B: freeze + dump, build its new socket (still in repair mode), "send RSYN-ACK".
        repair.freeze(server)
        b_state = repair.dump(server)
        a_port = a_state.local[1]
        with b.enter():
            b_new = repair.rebuild(b_state, b_state.local, (new_a, a_port),
                                   a_state.rcv_nxt, a_state.window_edge)
        # A: build, swap, unfreeze; its pending bytes go first when the application resumes.
        with a.enter():
            a_new = repair.rebuild(a_state, (new_a, a_port), a_state.remote,
                                   b_state.rcv_nxt, b_state.window_edge)
        # Parked mid-transfer, so there is queued data to carry (typically megabytes).
        assert a_state.recv_queue or b_state.recv_queue
        for new, state, peer_state in ((a_new, a_state, b_state), (b_new, b_state, a_state)):
            delivered = repair.seq_diff(peer_state.rcv_nxt, state.snd_una)
            assert new.pending == state.send_queue[delivered:]
        client_fd = client.fileno()
        a_pending = repair.commit(a_new, client_fd, write_pending=False)
        assert client.fileno() == client_fd
        a_app.resume(a_pending)
        # B: "on the ACK": swap, unfreeze, write pending bytes (A is reading by now).
        repair.commit(b_new, server.fileno())
        b_app.resume()
        pair.remove_address("a", old_a)
        _finish_transfer(a_app, b_app, to_b, to_a)
    finally:
        a_app.resume()
        b_app.resume()
    assert client.getsockname()[0] == new_a
    assert server.getpeername()[0] == new_a
    info = repair.tcp_info(client)
    assert info.snd_mss == (1448 if version == 4 else 1428)  # not 524 (P1)
    assert (info.snd_wscale, info.rcv_wscale) == (a_state.snd_wscale, a_state.rcv_wscale)
    assert client.getblocking() is False  # O_NONBLOCK carried over to the new file
    _no_resets(a, b)
    # The old sockets were released in repair mode: counted, but nothing was sent.
    assert a.net_counters()["Tcp.EstabResets"] == 1
    assert b.net_counters()["Tcp.EstabResets"] == 1
    client.close()
    server.close()


@pytest.mark.netns
def test_rollback_resumes_the_old_socket(pair: Topology) -> None:
    a, b = pair["a"], pair["b"]
    client, server = _establish(a, b, 4, random.Random(30))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a_app, b_app, to_b, to_a = _start_transfer(client, server, 8 << 20, seed=30)
    try:
        _wait_for(lambda: a_app.received >= 2 << 20, "2 MiB")
        a_app.park()
        repair.freeze(client)
        state = repair.dump(client)
        assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, (1).to_bytes(4, "little")) in \
            state.socket_options
        # A peer rcv_nxt outside [snd_una, write_seq] means the two dumps disagree.
        bogus = (state.snd_una - 1) & repair.SEQ_MASK
        with a.enter(), pytest.raises(RepairError) as excinfo:
            repair.rebuild(state, state.local, state.remote, bogus, bogus + 1000)
        assert excinfo.value.errno == errno.EPROTO
        repair.rollback(client, state)
        a_app.resume()
        _finish_transfer(a_app, b_app, to_b, to_a)
    finally:
        a_app.resume()
    _no_resets(a, b)
    assert a.net_counters()["Tcp.EstabResets"] == 0
    client.close()
    server.close()


@pytest.mark.netns
def test_dump_needs_a_frozen_socket(pair: Topology) -> None:
    client, server = _establish(pair["a"], pair["b"], 4, random.Random(31))
    try:
        with pytest.raises(RepairError) as excinfo:
            repair.dump(client)
        assert excinfo.value.step == "dump"
        _exchange(client, server, 1 << 12, seed=31)  # untouched
    finally:
        client.close()
        server.close()


@pytest.mark.netns
def test_thaw_orphan_undoes_a_freeze_whose_servald_died(pair: Topology) -> None:
    """What `adopt` finds on a socket whose servald died mid-migration: the input lock and
    repair mode are removed, and the connection carries data both ways again."""
    a, b = pair["a"], pair["b"]
    _, b_ip = _addresses(a, b, 4)
    with b.enter():
        listener = socket.create_server((b_ip, SERVICE_PORT))
    with a.enter():
        client = socket.create_connection((b_ip, SERVICE_PORT), timeout=IO_TIMEOUT_S)
    server, _ = listener.accept()
    listener.close()
    try:
        assert not repair.in_repair_mode(client) and repair.thaw_orphan(client) is None
        with a.enter():
            repair.freeze(client)  # ... and the servald that froze it is gone
        assert repair.in_repair_mode(client)
        with a.enter():
            assert repair.thaw_orphan(client) == "input lock and repair mode"
        assert not repair.in_repair_mode(client)
        client.sendall(b"after")
        server.settimeout(IO_TIMEOUT_S)
        assert server.recv(100) == b"after"
        server.sendall(b"back")
        assert client.recv(100) == b"back"
        _no_resets(a, b)
    finally:
        client.close()
        server.close()
