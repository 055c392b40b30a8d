"""Library applications keep their streams migratable across a servald restart.

A blocking-socket client (`serval.socket`) on host a and an asyncio server
(`serval.asyncio.start_server`) on host b exchange a paced bulk transfer each way through two
real servalds. Mid-transfer a's servald is killed with SIGKILL and started again (same config,
same control socket): the client's library hands its flow back (op ``adopt`` with the sealed
state servald gave it, and a duplicate of its fd), and the new servald then moves the flow to
another address. Then the same on b, for the asyncio server (whose state must be the one the
first move handed it: the move changed its socket's 4-tuple). Both transfers must arrive
byte-exact (sha256), no kernel may count a reset, and each application must report its stream
watched again, adopted once and swapped twice (each move swaps both ends). The applications
contain no migration code: the library does it underneath them (library_apps.py).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from library_apps import app_result, start_app

from serval.control import Frame, close_fds, recv_frame, send_frame
from serval.host.migration_lab import (
    ServaldProcess,
    assert_no_resets,
)
from serval.socket import WatchStatus
from serval.topology import Shaping, Topology, TopologySpec

# 200 MiB each way at 100 Mbit/s: ~17 s, room for two kills, restarts and moves in flight.
BULK_BYTES = 200 << 20
RATE = "100mbit"
APP_TIMEOUT_S = 150.0
WATCH_TIMEOUT_S = 15.0
ADOPT_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------------------------
# the test


class Servalds:
    """One servald per host, which the test may kill and start again (same config and
    control socket: the restarted one reuses the flow-state key beside the socket)."""

    def __init__(self, topology: Topology, workdir: Path) -> None:
        self.topology = topology
        self.workdir = workdir
        self.running: dict[str, ServaldProcess] = {}
        self.old: list[ServaldProcess] = []

    def start(self, name: str) -> ServaldProcess:
        daemon = ServaldProcess(self.topology[name], self.workdir)
        self.running[name] = daemon
        return daemon

    def kill(self, name: str) -> None:
        daemon = self.running.pop(name)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        self.old.append(daemon)

    def stop(self) -> None:
        for daemon in (*self.running.values(), *self.old):
            daemon.stop()


@pytest.fixture
def servalds(topology: Callable[..., Topology], tmp_path: Path) -> Iterator[Servalds]:
    topo = topology(TopologySpec.pair(shaping=Shaping(rate=RATE)))
    daemons = Servalds(topo, tmp_path)
    try:
        daemons.start("a")
        daemons.start("b")
        yield daemons
    finally:
        daemons.stop()


def _watched(daemon: ServaldProcess) -> list[dict[str, Any]]:
    try:
        flows: list[dict[str, Any]] = daemon.request("flows")["flows"]
    except OSError:
        return []
    return [flow for flow in flows if flow.get("watched")]


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill_restart_adopt_move(daemons: Servalds, name: str, flow: int, to: str) -> None:
    """SIGKILL the host's servald, start it again, wait for the application's library to hand
    `flow` back, then move the flow to `to`."""
    daemons.kill(name)
    time.sleep(0.5)  # the application goes on without servald meanwhile
    daemon = daemons.start(name)
    _wait_for(lambda: any(f["flow"] == flow and f.get("adopted") for f in _watched(daemon)),
              f"the library on {name} to hand flow {flow} back", ADOPT_TIMEOUT_S)
    assert daemon.request("status")["counters"]["migration.adopted"] == 1
    moved = daemon.servalctl("migrate", "flow", str(flow), "--to", to)
    assert moved["outcome"] == "completed", moved


def _wait_moved(daemon: ServaldProcess, flow: int, count: int) -> None:
    """Until `daemon` has finished its part of the `count`-th move of `flow` (its record
    comes after the ``resume``: killing it before then would cut a move in half)."""
    _wait_for(lambda: any(f["flow"] == flow and f.get("migrations") == count
                          for f in _watched(daemon)),
              f"flow {flow} to finish move {count}", ADOPT_TIMEOUT_S)


@pytest.mark.netns
def test_blocking_and_asyncio_applications_hand_flows_back_after_servald_restarts(
        servalds: Servalds) -> None:
    topo = servalds.topology
    a, b = topo["a"], topo["b"]
    new_a, new_b = str(topo.add_address("a", "a-b")), str(topo.add_address("b", "a-b"))
    server = start_app(b, "asyncio-server", BULK_BYTES, 2, 1, APP_TIMEOUT_S)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    client = start_app(a, "blocking-client", BULK_BYTES, 1, 2, APP_TIMEOUT_S)
    try:
        flows: dict[str, int] = {}

        def both_watched() -> bool:
            for name in ("a", "b"):
                watched = _watched(servalds.running[name])
                if len(watched) != 1:
                    return False
                flows[name] = int(watched[0]["flow"])
            return True

        _wait_for(both_watched, "both streams to be watched", WATCH_TIMEOUT_S)
        time.sleep(0.5)  # data in flight
        _kill_restart_adopt_move(servalds, "a", flows["a"], new_a)
        _wait_moved(servalds.running["a"], flows["a"], 1)
        _wait_moved(servalds.running["b"], flows["b"], 1)  # the peer's end moved too
        assert client.poll() is None and server.poll() is None  # all of it mid-transfer
        _kill_restart_adopt_move(servalds, "b", flows["b"], new_b)
        _wait_moved(servalds.running["b"], flows["b"], 1)  # a new servald counts afresh
        _wait_moved(servalds.running["a"], flows["a"], 2)
        assert client.poll() is None and server.poll() is None
        client_result = app_result(client, APP_TIMEOUT_S)
        server_result = app_result(server, APP_TIMEOUT_S)
    finally:
        for process in (client, server):
            if process.poll() is None:
                process.kill()
                process.wait(10)
    # Each move changes both ends' sockets (the peer's follows the new address): 2 swaps each.
    expected = {"received": BULK_BYTES, "ok": True, "errors": [], "watched": True,
                "migrations": 2, "adoptions": 1}
    assert client_result == expected, client_result
    assert server_result == expected, server_result
    assert_no_resets(a, b)


# --------------------------------------------------------------------------------------------
# the hand-back conversation, against a scripted fake servald (no privileges needed)


class FakeServald:
    """Serves each control connection with the next script (a thread per connection)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scripts: list[Callable[[socket.socket], None]] = []
        self.errors: list[BaseException] = []
        self.adopted: list[tuple[dict[str, Any], tuple[Any, Any]]] = []  # request, 4-tuple
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            if not self.scripts:  # "servald is still down": nobody answers
                conn.close()
                continue
            conn.settimeout(10)
            thread = threading.Thread(target=self._serve, args=(conn, self.scripts.pop(0)),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, script: Callable[[socket.socket], None]) -> None:
        with conn:
            try:
                script(conn)
            except BaseException as exc:
                self.errors.append(exc)

    def expect(self, conn: socket.socket, op: str) -> Frame:
        frame = recv_frame(conn)
        assert frame is not None, f"client closed before sending {op}"
        assert frame.message["op"] == op, frame.message
        return frame

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        for thread in self._threads:
            thread.join(10)
        self._listener.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeServald]:
    server = FakeServald(str(tmp_path / "fake-servald.sock"))
    try:
        yield server
    finally:
        server.close()
    if server.errors:
        raise server.errors[0]


FLOW = 1234
CONNECT_ANSWER = {
    "flow": FLOW, "migratable": True, "mode": "repair",
    "local": {"address": "127.0.0.1", "port": 1}, "remote": {"address": "127.0.0.1", "port": 2},
    "peer": {"service": None, "address": "127.0.0.1", "instance": "127.0.0.1"},
}


def _answer(conn: socket.socket, request: Frame, **fields: Any) -> None:
    send_frame(conn, {"id": request.message["id"], "ok": True, **fields})


def _serve_connect(fake: FakeServald, ours: socket.socket) -> None:
    def connect(conn: socket.socket) -> None:
        request = fake.expect(conn, "connect")
        send_frame(conn, {"id": request.message["id"], "ok": True, **CONNECT_ANSWER},
                   [ours.fileno()])
        assert recv_frame(conn) is None  # the library drops it once connected

    fake.scripts.append(connect)


def _serve_watch_then_die_parked(fake: FakeServald, parked: threading.Event) -> None:
    """servald answers the watch with state S1, parks the socket, and dies."""
    def watch(conn: socket.socket) -> None:
        request = fake.expect(conn, "watch")
        close_fds(request.fds)
        _answer(conn, request, events=["migration"], flow=FLOW, state="S1")
        send_frame(conn, {"event": "migration", "flow": FLOW, "phase": "park"})
        ack = fake.expect(conn, "migration_ack")
        _answer(conn, ack)
        parked.set()
        time.sleep(0.3)  # the application is parked meanwhile

    fake.scripts.append(watch)


def _serve_adopt(fake: FakeServald, adopted: threading.Event) -> None:
    """The restarted servald: takes the flow back, then hands out a newer state."""
    def adopt(conn: socket.socket) -> None:
        request = fake.expect(conn, "adopt")
        assert len(request.fds) == 1
        with socket.socket(fileno=request.fds[0]) as sock:
            fake.adopted.append((dict(request.message),
                                 (sock.getsockname(), sock.getpeername())))
        _answer(conn, request, events=["migration"], flow=FLOW, state="S2", thawed=False)
        adopted.set()
        assert recv_frame(conn) is None  # until the application closes the socket

    fake.scripts.append(adopt)


def test_a_blocking_socket_resumes_and_hands_its_flow_back(
        fake: FakeServald, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    import serval

    ours, theirs = tcp_pair
    parked, adopted = threading.Event(), threading.Event()
    _serve_connect(fake, ours)
    _serve_watch_then_die_parked(fake, parked)
    sock = serval.create_connection("adopt.library.test", timeout=5, control_socket=fake.path)
    try:
        assert sock.watch_status().state_kept
        assert parked.wait(5)
        # servald is down (no script: connections are refused) and the socket parked: once
        # the watch connection ends, the socket goes on at once.
        theirs.sendall(b"while servald is down")
        assert sock.recv(64) == b"while servald is down"
        sock.sendall(b"back")
        assert theirs.recv(64) == b"back"
        assert not sock.watch_status().watched
        time.sleep(0.6)  # a few refused attempts
        _serve_adopt(fake, adopted)
        assert adopted.wait(10)
        request, (local, remote) = fake.adopted[0]
        assert request["state"] == "S1"
        assert (local, remote) == (ours.getsockname(), theirs.getsockname())
        deadline = time.monotonic() + 5
        while sock.watch_status().adoptions != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.watch_status() == WatchStatus(watched=True, migrations=0, adoptions=1,
                                                  state_kept=True)
        theirs.sendall(b"after")
        assert sock.recv(64) == b"after"
    finally:
        sock.close()


def test_an_asyncio_stream_resumes_and_hands_its_flow_back(
        fake: FakeServald, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    import serval.asyncio

    ours, theirs = tcp_pair
    parked, adopted = threading.Event(), threading.Event()
    _serve_connect(fake, ours)
    _serve_watch_then_die_parked(fake, parked)

    async def application() -> None:
        reader, writer = await serval.asyncio.open_connection("adopt.library.test",
                                                              control_socket=fake.path)
        try:
            async with asyncio.timeout(15):
                while not parked.is_set():
                    await asyncio.sleep(0.01)
                theirs.sendall(b"while servald is down")
                assert await reader.readexactly(21) == b"while servald is down"
                writer.write(b"back")
                await writer.drain()
                assert theirs.recv(64) == b"back"
                await asyncio.sleep(0.6)
                _serve_adopt(fake, adopted)
                while serval.asyncio.watch_status(writer).adoptions != 1:
                    await asyncio.sleep(0.02)
                assert serval.asyncio.watch_status(writer) == WatchStatus(
                    watched=True, migrations=0, adoptions=1, state_kept=True)
                theirs.sendall(b"after")
                assert await reader.readexactly(5) == b"after"
        finally:
            writer.close()

    theirs.settimeout(5)
    asyncio.run(application())
    request, (local, remote) = fake.adopted[0]
    assert request["state"] == "S1"
    assert (local, remote) == (ours.getsockname(), theirs.getsockname())


def test_without_a_state_the_socket_carries_on_unwatched(
        fake: FakeServald, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A servald without the hand-back: nothing to adopt, nothing tried."""
    import serval

    ours, theirs = tcp_pair
    watched = threading.Event()
    _serve_connect(fake, ours)

    def watch(conn: socket.socket) -> None:
        request = fake.expect(conn, "watch")
        close_fds(request.fds)
        _answer(conn, request, events=["migration"], flow=FLOW)
        watched.set()

    fake.scripts.append(watch)
    with serval.create_connection("adopt.library.test", timeout=5,
                                  control_socket=fake.path) as sock:
        assert watched.wait(5)
        time.sleep(0.8)  # a retry would have come by now
        _serve_adopt(fake, threading.Event())  # never used
        theirs.sendall(b"still")
        assert sock.recv(64) == b"still"
        assert sock.watch_status() == WatchStatus(False, 0, 0, False)
    assert fake.scripts, "the library tried to adopt without a state"
    fake.scripts.clear()

