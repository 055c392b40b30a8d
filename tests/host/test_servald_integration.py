"""servald end to end: real servald processes in network namespaces (serval/topology.py).

The topology: one LAN with a router `r` and hosts `c` (client), `s1`, `s2`, `s3` (instances).
Tests drive servald through its control API directly (serval/control.py), so they exercise
exactly what the library and the translator use.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serval.control import ControlClient, Frame
from serval.core.ids import ServiceID

REPO = Path(__file__).resolve().parents[2]
DOMAIN_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
STARTUP_TIMEOUT_S = 15.0

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def _topology_module() -> Any:
    from serval import topology

    return topology


class Servald:
    """One servald process in a host namespace."""

    def __init__(self, host: Any, workdir: Path, wrapper: tuple[str, ...] = (),
                 **config: Any) -> None:
        self.host = host
        self.wrapper = wrapper
        self.path = workdir / f"{host.name}.yaml"
        self.config = {"domain_key": DOMAIN_KEY, "log_level": "info", **config}
        self.path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"{host.name}.log"
        self.process: subprocess.Popen[Any] | None = None

    @property
    def socket_path(self) -> str:
        return str(self.host.control_socket)

    def start(self) -> Servald:
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        env = self.host.env()
        env["PYTHONPATH"] = str(REPO)
        log = self.log_path.open("ab")
        self.process = self.host.popen(
            [*self.wrapper, sys.executable, "-m", "serval.host.daemon", "--config", str(self.path),
             "--control-socket", self.socket_path],
            env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"servald on {self.host.name} exited: {self.log()}")
            with contextlib.suppress(OSError), ControlClient(self.socket_path) as client:
                client.request("status")
                return self
            time.sleep(0.05)
        raise RuntimeError(f"servald on {self.host.name} did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def client(self) -> ControlClient:
        return ControlClient(self.socket_path)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.request(op, **fields).message)

    def counters(self) -> dict[str, int]:
        return dict(self.request("counters")["counters"])

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode


class Listener:
    """A `listen` control connection with a thread that echoes every accepted stream."""

    def __init__(self, daemon: Servald, service: str, weight: int = 1, tag: bytes = b"") -> None:
        self.client = daemon.client()
        self.client.request("listen", service=service, type="stream", backlog=128,
                            weight=weight)
        self.tag = tag
        self.accepted = 0
        self.accept_events: list[dict[str, Any]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self.client.next_event(timeout_s=0.2)
            except OSError:
                if self.client.closed:
                    return
                continue
            if frame.message.get("event") != "accept":
                continue
            self.accepted += 1
            self.accept_events.append(frame.message)
            sock = socket.socket(fileno=frame.fds[0])
            threading.Thread(target=self._echo, args=(sock,), daemon=True).start()

    def _echo(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                if self.tag:
                    sock.sendall(self.tag)
                while data := sock.recv(65536):
                    sock.sendall(data)

    def close(self) -> None:
        self._stop = True
        self.client.close()
        self._thread.join(timeout=5)


def connect(daemon: Servald, service: str, timeout_s: float = 5.0,
            mode: str | None = None) -> tuple[socket.socket, dict[str, Any]]:
    fields: dict[str, Any] = {"service": service, "type": "stream", "timeout_s": timeout_s}
    if mode is not None:
        fields["mode"] = mode
    with daemon.client() as client:
        frame: Frame = client.call("connect", fields, wait_s=timeout_s + 5)
    assert len(frame.fds) == 1
    return socket.socket(fileno=frame.fds[0]), dict(frame.message)


def roundtrip(sock: socket.socket, payload: bytes, tag_bytes: int = 0) -> bytes:
    sock.settimeout(10)
    tag = b""
    while len(tag) < tag_bytes:
        chunk = sock.recv(tag_bytes - len(tag))
        assert chunk, "peer closed before its tag"
        tag += chunk
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "peer closed early"
        received += chunk
    assert received == payload
    return tag


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    topology = _topology_module()
    spec = topology.TopologySpec(hosts=("c", "s1", "s2", "s3"), routers=("r",),
                                 lans=(topology.LanSpec("lan", ("r", "c", "s1", "s2", "s3")),))
    with topology.Topology(spec) as topo:
        yield topo


@pytest.fixture(scope="module")
def stack(lan: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Servald]]:
    workdir = tmp_path_factory.mktemp("servald")
    router_address = str(lan["r"].address(version=4))
    daemons = {"r": Servald(lan["r"], workdir, router=True).start()}
    for name in ("c", "s1", "s2", "s3"):
        daemons[name] = Servald(lan[name], workdir, routers=[router_address]).start()
    yield daemons
    for daemon in daemons.values():
        daemon.stop()


# --------------------------------------------------------------------------------------------
# tests


def test_smoke_status_answers_on_every_host(stack: dict[str, Servald]) -> None:
    router = stack["r"].request("status")
    assert router["role"] == "router"
    host = stack["c"].request("status")
    assert host["role"] == "host" and host["mode"] == "infrastructure"
    assert host["routers"] == [f"{stack['r'].host.address(version=4)}:54325"]
    mode = os.stat(stack["c"].socket_path).st_mode & 0o777
    assert mode == 0o600


def test_connect_through_router_repair_mode(stack: dict[str, Servald]) -> None:
    listener = Listener(stack["s1"], "echo.one", tag=b"s1")
    try:
        wait_until(lambda: _instances_registered(stack["r"],
                                                 {str(stack["s1"].host.address(version=4))}),
                   5, "registration at the router")
        before = stack["r"].counters()
        sock, reply = connect(stack["c"], "echo.one", mode="repair")
        with sock:
            assert reply["mode"] == "repair"
            assert reply["peer"]["address"] == str(stack["s1"].host.address(version=4))
            assert roundtrip(sock, os.urandom(200_000), tag_bytes=2) == b"s1"
            # The data path is direct: the TCP peer is the instance, not the router.
            assert sock.getpeername()[0] == str(stack["s1"].host.address(version=4))
            listed = {f["flow"]: f for f in stack["c"].request("flows")["flows"]}
            entry = listed[reply["flow"]]
            assert entry["state"] == "established" and entry["mode"] == "repair"
            assert (entry["local"]["address"], entry["local"]["port"]) == sock.getsockname()
            assert (entry["remote"]["address"], entry["remote"]["port"]) == sock.getpeername()
        after = stack["r"].counters()
        assert after.get("router.syn_forwarded", 0) - before.get("router.syn_forwarded", 0) >= 1
        assert after.get("router.unexpected", 0) == before.get("router.unexpected", 0)
        wait_until(lambda: listener.accepted == 1, 5, "accept event")
    finally:
        listener.close()


@pytest.mark.parametrize("mode", ["repair", "handshake"])
def test_origin_and_source_reach_the_accept_event(stack: dict[str, Servald], mode: str) -> None:
    # What a translator passes for PROXY protocol v2: its legacy client's address rides in
    # the SYN's ORIGIN extension through the router to the instance's accept event; the
    # client's own serviceID (connect's `source`) becomes the accept event's peer.service.
    listener = Listener(stack["s3"], f"echo.origin.{mode}")
    try:
        wait_until(lambda: _instances_registered(stack["r"],
                                                 {str(stack["s3"].host.address(version=4))}),
                   5, "registration at the router")
        cases = [
            ({"addr": "198.51.100.23", "port": 40123}, {"addr": "198.51.100.23", "port": 40123}),
            ({"addr": "2001:db8::7", "port": 443}, {"addr": "2001:db8::7", "port": 443}),
            ({"addr": "::ffff:203.0.113.9", "port": 1}, {"addr": "203.0.113.9", "port": 1}),
            (None, None),
        ]
        for count, (proxy, expected) in enumerate(cases, start=1):
            fields: dict[str, Any] = {"service": f"echo.origin.{mode}", "mode": mode,
                                      "timeout_s": 5.0, "source": "translator.example"}
            if proxy is not None:
                fields["proxy"] = proxy
            with stack["c"].client() as client:
                frame = client.call("connect", fields, wait_s=10)
            socket.socket(fileno=frame.fds[0]).close()
            assert frame.message["mode"] == mode
            wait_until(lambda n=count: len(listener.accept_events) == n,
                       5, "accept event")
            event = listener.accept_events[-1]
            assert event["proxy"] == expected
            assert event["peer"]["service"] == str(ServiceID.parse("translator.example"))
            assert event["peer"]["address"] == str(stack["c"].host.address(version=4))
        with stack["c"].client() as client:
            for bad in ({"addr": "not-an-address", "port": 1}, {"addr": "192.0.2.1", "port": 0},
                        {"addr": "192.0.2.1"}, "192.0.2.1:80"):
                with pytest.raises(OSError) as caught:
                    client.call("connect", {"service": f"echo.origin.{mode}", "proxy": bad},
                                wait_s=10)
                assert caught.value.errno == errno.EINVAL, bad
    finally:
        listener.close()


def test_handshake_mode(stack: dict[str, Servald]) -> None:
    listener = Listener(stack["s2"], "echo.hs", tag=b"s2")
    try:
        wait_until(lambda: any(r["address"] == str(stack["s2"].host.address(version=4))
                               for r in stack["r"].request("registrations")
                               .get("registrations", [])), 5, "registration")
        sock, reply = connect(stack["c"], "echo.hs", mode="handshake")
        with sock:
            assert reply["mode"] == "handshake"
            assert roundtrip(sock, b"x" * 100_000, tag_bytes=2) == b"s2"
    finally:
        listener.close()


def test_datagrams_through_router_with_reply(stack: dict[str, Servald]) -> None:
    server = stack["s3"].client()
    client = stack["c"].client()
    try:
        server.request("dgram_bind", service="dgram.echo")
        wait_until(lambda: any(r["address"] == str(stack["s3"].host.address(version=4))
                               for r in stack["r"].request("registrations")
                               .get("registrations", [])), 5, "datagram registration")
        client.request("dgram_bind")
        client.request("sendto", service="dgram.echo",
                       data=base64.b64encode(b"ping").decode())
        event = server.next_event(timeout_s=5).message
        assert event["event"] == "datagram"
        assert base64.b64decode(event["data"]) == b"ping"
        source = event["source"]
        server.request("sendto", service=source["service"], address=source["address"],
                       data=base64.b64encode(b"pong").decode())
        reply = client.next_event(timeout_s=5).message
        assert base64.b64decode(reply["data"]) == b"pong"
    finally:
        server.close()
        client.close()


def _registered(router: Servald, service_prefix: str | None = None) -> list[dict[str, Any]]:
    return list(router.request("registrations").get("registrations", []))


def _instances_registered(router: Servald, addresses: set[str]) -> bool:
    present = {r["address"] for r in _registered(router)}
    return addresses <= present


def test_weighted_anycast_spreads_connections(stack: dict[str, Servald]) -> None:
    weights = {"s1": 1, "s2": 2, "s3": 1}
    listeners = [Listener(stack[name], "echo.weighted", weight=w) for name, w in weights.items()]
    try:
        addresses = {str(stack[n].host.address(version=4)): n for n in weights}
        wait_until(lambda: _instances_registered(stack["r"], set(addresses)), 5,
                   "three registrations")
        total = 1200
        seen: dict[str, int] = dict.fromkeys(weights, 0)
        with stack["c"].client() as client:
            for _ in range(total):
                frame = client.call("connect", {"service": "echo.weighted", "timeout_s": 5.0},
                                    wait_s=10)
                socket.socket(fileno=frame.fds[0]).close()
                seen[addresses[frame.message["peer"]["address"]]] += 1
        for name, weight in weights.items():
            share = seen[name] / total
            # Within 5 percentage points of weight / sum(weights).
            assert abs(share - weight / 4) < 0.05, seen
        wait_until(lambda: sum(li.accepted for li in listeners) == total, 10, "all accepts")
    finally:
        for listener in listeners:
            listener.close()


def test_kill9_instance_fails_over_within_3s(stack: dict[str, Servald]) -> None:
    victim = stack["s2"]
    survivor_listener = Listener(stack["s1"], "echo.kill", tag=b"s1")
    victim_listener = Listener(victim, "echo.kill", tag=b"s2")
    s1_address = str(stack["s1"].host.address(version=4))
    s2_address = str(victim.host.address(version=4))
    try:
        wait_until(lambda: _instances_registered(stack["r"], {s1_address, s2_address}), 5,
                   "both instances registered")
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        # A client connecting at once still succeeds: a SYN that went to the dead instance
        # is retransmitted and re-resolved by the router.
        for _ in range(5):
            sock, reply = connect(stack["c"], "echo.kill", timeout_s=8)
            with sock:
                assert reply["peer"]["address"] == s1_address
                assert roundtrip(sock, b"still here", tag_bytes=2) == b"s1"
        wait_until(lambda: s2_address not in {r["address"] for r in _registered(stack["r"])},
                   3.0 - (time.monotonic() - killed_at), "dead registration expired within 3 s")
        # From now on no new connection goes to the dead instance (first SYN answered).
        for _ in range(10):
            sock, reply = connect(stack["c"], "echo.kill", timeout_s=2)
            sock.close()
            assert reply["peer"]["address"] == s1_address
    finally:
        survivor_listener.close()
        with contextlib.suppress(Exception):
            victim_listener.close()
        if victim.process is not None and victim.process.poll() is not None:
            victim.start()


def test_repair_falls_back_to_handshake_without_net_admin(
    lan: Any, stack: dict[str, Servald], tmp_path: Path
) -> None:
    # s3's servald loses CAP_NET_ADMIN: it cannot build repair sockets, so it answers repair
    # SYNs in handshake mode, and the client follows.
    s3 = stack["s3"]
    s3.stop()
    weak = Servald(lan["s3"], tmp_path, wrapper=("setpriv", "--bounding-set", "-net_admin",
                                                 "--inh-caps", "-net_admin", "--"),
                   routers=[str(lan["r"].address(version=4))]).start()
    listener = Listener(weak, "echo.weak", tag=b"s3")
    try:
        assert weak.request("status")["data_plane"]["repair"].startswith("unavailable")
        wait_until(lambda: _instances_registered(stack["r"],
                                                 {str(lan["s3"].address(version=4))}),
                   5, "weak registration")
        sock, reply = connect(stack["c"], "echo.weak", mode="repair")
        with sock:
            assert reply["mode"] == "handshake"
            assert roundtrip(sock, b"y" * 50_000, tag_bytes=2) == b"s3"
        assert stack["c"].counters().get("stream.fallback_by_server", 0) >= 1
        # And the other way round: a client without repair falls back on its own.
        listener2 = Listener(stack["s1"], "echo.fromweak", tag=b"s1")
        try:
            wait_until(lambda: _instances_registered(stack["r"],
                                                     {str(lan["s1"].address(version=4))}),
                       5, "s1 registration")
            sock, reply = connect(weak, "echo.fromweak", mode="repair")
            with sock:
                assert reply["mode"] == "handshake"
                assert roundtrip(sock, b"z" * 10_000, tag_bytes=2) == b"s1"
            assert weak.counters().get("stream.fallback_to_handshake", 0) >= 1
        finally:
            listener2.close()
    finally:
        listener.close()
        weak.stop()
        s3.start()


def test_no_listener_gets_no_answer_and_times_out(stack: dict[str, Servald]) -> None:
    before = stack["s1"].counters()
    with pytest.raises(TimeoutError):
        connect(stack["c"], "nobody.listens.here", timeout_s=1.0)
    # The router had no registration: it dropped the SYN without answering.
    assert stack["r"].counters().get("router.syn_no_route", 0) >= 1
    assert stack["s1"].counters().get("stream.synacks_sent", 0) == \
        before.get("stream.synacks_sent", 0)


def test_garbage_is_counted_and_changes_nothing(stack: dict[str, Servald]) -> None:
    from serval.core import wire
    from serval.core.ids import ServiceID
    from serval.core.wire import ControlExt, ControlFlags, RegisterExt, RegisterOp, SalPacket

    router, host = stack["r"], stack["s1"]
    router_address = str(router.host.address(version=4))
    host_address = str(host.host.address(version=4))
    registrations_before = _registered(router)
    router_before = router.counters()
    host_before = host.counters()
    valid_syn = wire.encode(SalPacket(
        src_flow=7, dst_flow=0, control=ControlExt(ControlFlags.SYN, 1, 0, bytes(8)),
        services=(wire.ServiceExt(ServiceID.parse("x.y")),)))
    spoofed_synack = wire.encode(SalPacket(
        src_flow=9, dst_flow=12345,
        control=ControlExt(ControlFlags.SYN | ControlFlags.ACK, 1, 2, bytes(8))))
    unsigned_registration = wire.encode(SalPacket(
        src_flow=0, dst_flow=0, protocol=wire.Protocol.CONTROL,
        register=RegisterExt(RegisterOp.REGISTER, ServiceID.parse("evil.service"),
                             wire.IPv4Address(host_address),  # type: ignore[attr-defined]
                             1, 0, 3, int(time.time() * 1e6))))

    def attack() -> None:
        rng = __import__("random").Random(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for target in (router_address, host_address):
                for _ in range(200):
                    sock.sendto(rng.randbytes(rng.randrange(0, 300)), (target, 54325))
                for cut in range(1, len(valid_syn)):
                    sock.sendto(valid_syn[:cut], (target, 54325))
                sock.sendto(spoofed_synack, (target, 54325))
                sock.sendto(unsigned_registration, (target, 54325))

    stack["c"].host.call(attack)
    # Garbage on the control socket: bad JSON, a wrong type, an unknown op, a bad length.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(host.socket_path)
    raw.sendall(b"\x00\x00\x00\x05nope!")
    raw.sendall(b"\x00\x00\x00\x0d{\"op\": 5.5} ")
    raw.sendall(b"\x00\x00\x00\x19{\"op\":\"bogus\",\"id\":1}    ")
    raw.sendall(b"\xff\xff\xff\xffgarbage")
    raw.settimeout(5)
    with contextlib.suppress(OSError):
        while raw.recv(65536):
            pass
    raw.close()

    def grew(counters: dict[str, int], before: dict[str, int], name: str) -> int:
        return counters.get(name, 0) - before.get(name, 0)

    wait_until(lambda: grew(router.counters(), router_before, "sal.malformed") >= 200, 5,
               "router counted malformed packets")
    router_after = router.counters()
    host_after = host.counters()
    assert grew(host_after, host_before, "sal.malformed") >= 200
    assert grew(router_after, router_before,
                "router.registrations_rejected.unauthenticated") >= 1
    assert grew(host_after, host_before, "control.bad_frames") >= 3
    assert {r["address"] for r in _registered(router)} == \
        {r["address"] for r in registrations_before}
    assert not any(r["service"] == str(ServiceID.parse("evil.service"))
                   for r in _registered(router))
    # Both daemons still serve.
    listener = Listener(host, "echo.after.garbage", tag=b"ok")
    try:
        wait_until(lambda: _instances_registered(router, {host_address}), 5, "registration")
        sock, _ = connect(stack["c"], "echo.after.garbage")
        with sock:
            assert roundtrip(sock, b"alive", tag_bytes=2) == b"ok"
    finally:
        listener.close()


def test_sigterm_unregisters_and_exits_cleanly(lan: Any, stack: dict[str, Servald],
                                               tmp_path: Path) -> None:
    extra = Servald(lan["s3"], tmp_path, routers=[str(lan["r"].address(version=4))])
    stack["s3"].stop()
    try:
        extra.start()
        listener = Listener(extra, "echo.term")
        address = str(lan["s3"].address(version=4))
        wait_until(lambda: _instances_registered(stack["r"], {address}), 5, "registration")
        assert extra.stop(signal.SIGTERM) == 0
        # UNREGISTER was sent on the way out: gone at once, not after the lifetime.
        wait_until(lambda: address not in {r["address"] for r in _registered(stack["r"])},
                   1.0, "unregistration")
        assert not os.path.exists(extra.socket_path)
        listener.close()
    finally:
        stack["s3"].start()


# --------------------------------------------------------------------------------------------
# two routers


@pytest.fixture(scope="module")
def two_routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Servald]]:
    topology = _topology_module()
    spec = topology.TopologySpec(hosts=("c", "s"), routers=("ra", "rb"),
                                 lans=(topology.LanSpec("lan", ("ra", "rb", "c", "s")),))
    workdir = tmp_path_factory.mktemp("servald2")
    with topology.Topology(spec) as topo:
        routers = [str(topo["ra"].address(version=4)), str(topo["rb"].address(version=4))]
        daemons = {
            "ra": Servald(topo["ra"], workdir, router=True).start(),
            "rb": Servald(topo["rb"], workdir, router=True).start(),
            "c": Servald(topo["c"], workdir, routers=routers).start(),
            "s": Servald(topo["s"], workdir, routers=routers).start(),
        }
        try:
            yield daemons
        finally:
            for daemon in daemons.values():
                daemon.stop()


def test_two_routers_one_killed_connections_go_on(two_routers: dict[str, Servald]) -> None:
    d = two_routers
    listener = Listener(d["s"], "echo.ha", tag=b"ok")
    s_address = str(d["s"].host.address(version=4))
    try:
        wait_until(lambda: _instances_registered(d["ra"], {s_address})
                   and _instances_registered(d["rb"], {s_address}), 5, "registered at both")
        # The client picks a router at random for each SYN (equal default routes), so a
        # handful of connections can all land on one router (6 did, 1 run in 32). Keep
        # connecting until both have forwarded; 40 all on one side is a 1-in-2^39 chance.
        used = [0, 0]
        for _ in range(40):
            sock, _ = connect(d["c"], "echo.ha")
            sock.close()
            used = [d[r].counters().get("router.syn_forwarded", 0) for r in ("ra", "rb")]
            if all(u > 0 for u in used):
                break
        assert all(u > 0 for u in used), used  # anycast across the routers
        d["ra"].stop(signal.SIGKILL)
        started = time.monotonic()
        for _ in range(10):
            sock, _ = connect(d["c"], "echo.ha", timeout_s=5)
            with sock:
                assert roundtrip(sock, b"hello", tag_bytes=2) == b"ok"
        # Failover costs at most a few SYN retransmissions, not a timeout per connection.
        assert time.monotonic() - started < 5
    finally:
        listener.close()


# --------------------------------------------------------------------------------------------
# ad-hoc


@pytest.fixture(scope="module")
def adhoc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Servald]]:
    topology = _topology_module()
    spec = topology.TopologySpec.lan("a", "b", "n")
    workdir = tmp_path_factory.mktemp("servald3")
    with topology.Topology(spec) as topo:
        daemons = {name: Servald(topo[name], workdir).start() for name in ("a", "b", "n")}
        try:
            yield daemons
        finally:
            for daemon in daemons.values():
                daemon.stop()


def test_adhoc_hosts_reach_each_others_services(adhoc: dict[str, Servald]) -> None:
    assert adhoc["a"].request("status")["mode"] == "ad-hoc"
    on_b = Listener(adhoc["b"], "adhoc.b", tag=b"bb")
    on_a = Listener(adhoc["a"], "adhoc.a", tag=b"aa")
    try:
        sock, reply = connect(adhoc["a"], "adhoc.b")
        with sock:
            assert reply["peer"]["address"] == str(adhoc["b"].host.address(version=4))
            # Repair works without a router too (its MTU lookup once went to the broadcast
            # address, failed with EACCES, and every ad-hoc connection fell back).
            assert reply["mode"] == "repair"
            assert roundtrip(sock, b"over broadcast", tag_bytes=2) == b"bb"
        sock, _ = connect(adhoc["b"], "adhoc.a", mode="handshake")
        with sock:
            assert roundtrip(sock, b"and back", tag_bytes=2) == b"aa"
        # The bystander saw the broadcast SYNs and stayed silent.
        bystander = adhoc["n"].counters()
        assert bystander.get("stream.synacks_sent", 0) == 0
        assert bystander.get("stream.syn_no_listener", 0) >= 1
    finally:
        on_a.close()
        on_b.close()


def test_adhoc_datagrams(adhoc: dict[str, Servald]) -> None:
    server = adhoc["b"].client()
    client = adhoc["a"].client()
    try:
        server.request("dgram_bind", service="adhoc.dgram")
        client.request("sendto", service="adhoc.dgram", data=base64.b64encode(b"hi").decode())
        event = server.next_event(timeout_s=5).message
        assert base64.b64decode(event["data"]) == b"hi"
        server.request("sendto", service=event["source"]["service"],
                       address=event["source"]["address"],
                       data=base64.b64encode(b"ho").decode())
        assert base64.b64decode(client.next_event(timeout_s=5).message["data"]) == b"ho"
    finally:
        server.close()
        client.close()


# --------------------------------------------------------------------------------------------
# the library against servald, and hand-made SYNs


def test_library_sockets_through_servald(stack: dict[str, Servald]) -> None:
    import serval

    server = serval.socket(serval.SOCK_STREAM, control_socket=stack["s1"].socket_path)
    try:
        server.bind("lib.echo")
        server.listen(8)
        wait_until(lambda: _instances_registered(stack["r"],
                                                 {str(stack["s1"].host.address(version=4))}),
                   5, "registration")
        result: dict[str, Any] = {}

        def serve() -> None:
            conn, peer = server.accept()
            with conn:
                result["peer"] = peer
                data = conn.recv(100)
                conn.sendall(data.upper())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with serval.socket(serval.SOCK_STREAM,
                           control_socket=stack["c"].socket_path) as client:
            client.settimeout(10)
            client.connect("lib.echo")
            client.sendall(b"hello serval")
            assert client.recv(100) == b"HELLO SERVAL"
        thread.join(10)
        assert result["peer"] is not None
    finally:
        server.close()


def _hand_syn(flow: int, nonce: bytes, service: str, address: str, port: int,
              mode: int = 1) -> bytes:
    from serval.core import wire
    from serval.core.ids import ServiceID
    from serval.core.wire import ControlExt, ControlFlags, EstablishMode, SalPacket, TransportExt

    return wire.encode(SalPacket(
        src_flow=flow, dst_flow=0,
        control=ControlExt(ControlFlags.SYN, 1000, 0, nonce),
        services=(wire.ServiceExt(ServiceID.parse(service)),),
        transport=TransportExt(EstablishMode(mode), isn=12345, mss=1400, window_scale=7,
                               sack=True, timestamps=True, window=64000,
                               address=wire.IPv4Address(address),  # type: ignore[attr-defined]
                               port=port)))


def test_duplicate_syn_and_abandoned_half_open(stack: dict[str, Servald]) -> None:
    """Duplicates of one SYN get the same SYN-ACK and never a second socket; the frozen
    socket of a SYN never ACKed is dropped silently after the half-open timeout."""
    from serval.core import wire

    host = stack["s2"]
    listener = Listener(host, "half.open")
    target = str(host.host.address(version=4))
    client_address = str(stack["c"].host.address(version=4))
    before = host.counters()
    try:
        def exchange() -> list[bytes]:
            answers: list[bytes] = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                syn = _hand_syn(4242, b"\x01" * 8, "half.open", client_address, 40001)
                for _ in range(3):
                    sock.sendto(syn, (target, 54325))
                    with contextlib.suppress(TimeoutError):
                        answers.append(sock.recvfrom(2048)[0])
            return answers

        answers = stack["c"].host.call(exchange)
        assert len(answers) >= 3
        decoded = [wire.decode(a) for a in answers[:3]]
        assert len({(int(p.src_flow), p.control.verno) for p in decoded  # type: ignore[union-attr]
                    }) == 1
        after = host.counters()
        assert after.get("stream.synacks_sent", 0) - before.get("stream.synacks_sent", 0) == 1
        wait_until(lambda: host.counters().get("stream.half_open_aborts", 0)
                   > before.get("stream.half_open_aborts", 0), 6, "half-open abort")
        assert listener.accepted == 0
    finally:
        listener.close()


def test_full_accept_queue_answers_rst(stack: dict[str, Servald]) -> None:
    from serval.core import wire
    from serval.core.wire import ControlFlags

    host = stack["s2"]
    client = host.client()
    client.request("listen", service="tiny.queue", type="stream", backlog=1)
    target = str(host.host.address(version=4))
    client_address = str(stack["c"].host.address(version=4))
    try:
        def exchange() -> list[wire.SalPacket]:
            replies: list[wire.SalPacket] = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                for flow, port in ((501, 40101), (502, 40102)):
                    sock.sendto(_hand_syn(flow, bytes([flow % 256]) * 8, "tiny.queue",
                                          client_address, port), (target, 54325))
                    replies.append(wire.decode(sock.recvfrom(2048)[0]))
            return replies

        first, second = stack["c"].host.call(exchange)
        assert first.flags & ControlFlags.SYN and first.flags & ControlFlags.ACK
        assert second.flags & ControlFlags.RST and int(second.dst_flow) == 502
        assert host.counters().get("stream.accept_queue_full", 0) >= 1
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# IPv6 and DELAY


@pytest.fixture(scope="module")
def v6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Servald]]:
    topology = _topology_module()
    spec = topology.TopologySpec(hosts=("c", "s"), routers=("r",),
                                 lans=(topology.LanSpec("lan", ("r", "c", "s")),))
    workdir = tmp_path_factory.mktemp("servald6")
    with topology.Topology(spec) as topo:
        router = f"[{topo['r'].address(version=6)}]"
        daemons = {
            "r": Servald(topo["r"], workdir, router=True).start(),
            "c": Servald(topo["c"], workdir, routers=[router]).start(),
            "s": Servald(topo["s"], workdir, routers=[router]).start(),
        }
        try:
            yield daemons
        finally:
            for daemon in daemons.values():
                daemon.stop()


@pytest.mark.parametrize("mode", ["repair", "handshake"])
def test_ipv6_router_and_data_path(v6: dict[str, Servald], mode: str) -> None:
    listener = Listener(v6["s"], f"v6.echo.{mode}", tag=b"v6")
    s_address = str(v6["s"].host.address(version=6))
    try:
        wait_until(lambda: _instances_registered(v6["r"], {s_address}), 5,
                   "IPv6 registration")
        sock, reply = connect(v6["c"], f"v6.echo.{mode}", mode=mode)
        with sock:
            assert sock.family == socket.AF_INET6
            assert reply["mode"] == mode
            assert sock.getpeername()[0] == s_address
            assert roundtrip(sock, os.urandom(70_000), tag_bytes=2) == b"v6"
    finally:
        listener.close()


def test_delay_rule_holds_syns_for_the_controller(v6: dict[str, Servald]) -> None:
    router = v6["r"]
    listener = Listener(v6["s"], "held.service")
    try:
        wait_until(lambda: _instances_registered(router, {str(v6["s"].host.address(version=6))}),
                   5, "registration")
        router.request("rule_add", service="held.service", kind="delay", priority=100)
        with pytest.raises(TimeoutError):
            connect(v6["c"], "held.service", timeout_s=0.6)
        held = router.request("delay_list")["packets"]
        assert held and all(p["kind"] == "syn" for p in held)
        router.request("delay_drop", packet=held[0]["packet"])
        router.request("rule_remove", service="held.service", kind="delay")
        remaining = router.request("delay_list")["packets"]
        assert held[0]["packet"] not in {p["packet"] for p in remaining}
        for packet in remaining:
            router.request("delay_release", packet=packet["packet"])
        sock, _ = connect(v6["c"], "held.service", timeout_s=5)
        sock.close()
    finally:
        listener.close()


def test_four_tuple_conflict_is_refused_for_a_retry(stack: dict[str, Servald]) -> None:
    """Two SYNs announcing the same client TCP endpoint: the second cannot get its repair
    socket (the 4-tuple is taken) and is answered REFUSE (RST|NACK), echoing its nonce, so
    the client retries from another port."""
    from serval.core import wire
    from serval.core.wire import ControlFlags

    host = stack["s1"]
    listener = Listener(host, "conflict.service")
    target = str(host.host.address(version=4))
    client_address = str(stack["c"].host.address(version=4))
    try:
        def exchange() -> list[wire.SalPacket]:
            replies: list[wire.SalPacket] = []
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2.0)
                for flow, nonce in ((601, b"\x06" * 8), (602, b"\x07" * 8)):
                    sock.sendto(_hand_syn(flow, nonce, "conflict.service", client_address,
                                          40601), (target, 54325))
                    while True:
                        reply = wire.decode(sock.recvfrom(2048)[0])
                        if int(reply.dst_flow) == flow:
                            replies.append(reply)
                            break
            return replies

        first, second = stack["c"].host.call(exchange)
        assert first.flags & ControlFlags.SYN and first.flags & ControlFlags.ACK
        assert second.flags & ControlFlags.RST and second.flags & ControlFlags.NACK
        assert second.control is not None and second.control.nonce == b"\x07" * 8
        # The REFUSE layout of docs/protocol.md: from no flow, acknowledging the SYN (verno
        # 1000), naming the service; the client trusts it by the echoed nonce and this ackno.
        assert second.src_flow == 0 and int(second.dst_flow) == 602
        assert second.control.ackno == 1001
        assert second.destination_service is not None
        assert host.counters().get("stream.refuse_tuple_conflict", 0) >= 1
    finally:
        listener.close()


@pytest.mark.parametrize("mode", ["repair", "handshake"])
def test_service_on_the_same_host(stack: dict[str, Servald], mode: str) -> None:
    listener = Listener(stack["s3"], f"local.{mode}", tag=b"me")
    try:
        before = stack["r"].counters().get("router.syn_forwarded", 0)
        sock, reply = connect(stack["s3"], f"local.{mode}", mode=mode)
        with sock:
            assert reply["mode"] == mode
            assert roundtrip(sock, b"to myself", tag_bytes=2) == b"me"
        # Resolved locally: the router never saw it.
        assert stack["r"].counters().get("router.syn_forwarded", 0) == before
    finally:
        listener.close()


def test_registration_follows_an_address_change(tmp_path: Path) -> None:
    topology = _topology_module()
    spec = topology.TopologySpec(hosts=("c", "s"), routers=("r",),
                                 lans=(topology.LanSpec("lan", ("r", "c", "s")),))
    with topology.Topology(spec) as topo:
        router_address = str(topo["r"].address(version=4))
        daemons = {
            "r": Servald(topo["r"], tmp_path, router=True).start(),
            "c": Servald(topo["c"], tmp_path, routers=[router_address]).start(),
            "s": Servald(topo["s"], tmp_path, routers=[router_address]).start(),
        }
        try:
            listener = Listener(daemons["s"], "moving.service", tag=b"mv")
            old = str(topo["s"].address(version=4))
            wait_until(lambda: _instances_registered(daemons["r"], {old}), 5, "registration")
            new = str(topo.add_address("s", "lan"))
            topo.remove_address("s", old)
            wait_until(lambda: {r["address"] for r in _registered(daemons["r"])} == {new}, 8,
                       "registration moved to the new address")
            sock, reply = connect(daemons["c"], "moving.service")
            with sock:
                assert reply["peer"]["address"] == new
                assert roundtrip(sock, b"found you", tag_bytes=2) == b"mv"
            listener.close()
        finally:
            for daemon in daemons.values():
                daemon.stop()


def test_weight_change_affects_only_new_connections(stack: dict[str, Servald]) -> None:
    first = Listener(stack["s1"], "echo.reweigh", weight=1, tag=b"s1")
    second = Listener(stack["s2"], "echo.reweigh", weight=1, tag=b"s2")
    s1, s2 = (str(stack[n].host.address(version=4)) for n in ("s1", "s2"))
    try:
        wait_until(lambda: _instances_registered(stack["r"], {s1, s2}), 5, "registrations")
        old_sock, old_reply = connect(stack["c"], "echo.reweigh")
        stack["s2"].request("rule_modify", service="echo.reweigh", kind="demux", weight=4)
        wait_until(lambda: any(r["address"] == s2 and r["weight"] == 4
                               for r in _registered(stack["r"])), 5, "new weight at router")
        seen = {s1: 0, s2: 0}
        with stack["c"].client() as client:
            for _ in range(400):
                frame = client.call("connect", {"service": "echo.reweigh", "timeout_s": 5.0},
                                    wait_s=10)
                socket.socket(fileno=frame.fds[0]).close()
                seen[frame.message["peer"]["address"]] += 1
        assert abs(seen[s2] / 400 - 0.8) < 0.08, seen
        # The connection made before the change is untouched.
        with old_sock:
            tag = b"s1" if old_reply["peer"]["address"] == s1 else b"s2"
            assert roundtrip(old_sock, b"old one", tag_bytes=2) == tag
    finally:
        first.close()
        second.close()
