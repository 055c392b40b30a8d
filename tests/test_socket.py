"""The serval socket library (serval.socket, serval.asyncio).

Two halves:
- argument handling and the control-API conversation, against a scripted fake servald on a
  unix socket (it passes real socketpair fds, so the I/O the library does is real);
- real behaviour through real servald processes in network namespaces (``netns``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import select
import socket as stdsocket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import serval
import serval.asyncio
from serval.control import ControlClient, recv_frame, send_frame
from serval.core.ids import ServiceID
from serval.errors import ServalError
from serval.socket import MAX_DATAGRAM_BYTES, ServalAddress

REPO = Path(__file__).resolve().parents[1]
SERVICE = "echo.test"
SERVICE_ID = ServiceID.parse(SERVICE)
SERVALD_START_TIMEOUT_S = 20.0


# ==========================================================================================
# a scripted fake servald
# ==========================================================================================

Script = Callable[[stdsocket.socket], None]


@dataclass
class FakeServald:
    """Serves each incoming control connection with the next script, in a thread."""

    path: str
    scripts: list[Script] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def expect(self, op: str, conn: stdsocket.socket) -> dict[str, Any]:
        frame = recv_frame(conn)
        assert frame is not None, f"client closed before sending {op}"
        self.requests.append(frame.message)
        assert frame.message["op"] == op, frame.message
        return frame.message

    def answer(self, conn: stdsocket.socket, request: dict[str, Any], fds: tuple[int, ...] = (),
               **fields: Any) -> None:
        send_frame(conn, {"id": request["id"], "ok": True, **fields}, fds)

    def fail(self, conn: stdsocket.socket, request: dict[str, Any], code: str, text: str) -> None:
        error = {"code": code, "message": text}
        send_frame(conn, {"id": request["id"], "ok": False, "error": error})


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeServald]:
    path = str(tmp_path / "fake-servald.sock")
    listener = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.1)
    server = FakeServald(path)
    stop = threading.Event()

    def serve(conn: stdsocket.socket, script: Script) -> None:
        with conn:
            try:
                script(conn)
            except BaseException as exc:
                server.errors.append(exc)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            script = server.scripts.pop(0)
            thread = threading.Thread(target=serve, args=(conn, script), daemon=True)
            thread.start()
            server._threads.append(thread)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    yield server
    stop.set()
    acceptor.join(5)
    for thread in server._threads:
        thread.join(10)
    listener.close()
    if server.errors:
        raise server.errors[0]


def wait_closed(conn: stdsocket.socket) -> None:
    """Block until the client closes its control connection (EOF)."""
    assert recv_frame(conn) is None


CONNECT_ANSWER = {
    "flow": 1234,
    "local": {"address": "10.0.0.1", "port": 40000},
    "remote": {"address": "10.0.0.2", "port": 50000},
    "mode": "repair",
    "peer": {"service": str(SERVICE_ID), "address": "10.0.0.2", "instance": "10.0.0.2"},
}


# ==========================================================================================
# stream client
# ==========================================================================================


def test_a_bound_stream_names_its_service_as_the_source(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, _ = tcp_pair
    client_service = ServiceID.parse("client.example")

    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("connect", conn)
        fake.answer(conn, request, (ours.fileno(),), **CONNECT_ANSWER)
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(serval.SOCK_STREAM, control_socket=fake.path) as sock:
        sock.settimeout(3)
        sock.bind("client.example")
        sock.connect(SERVICE)
        assert fake.requests[0]["source"] == str(client_service)
        assert sock.getsockname().service == client_service


def test_connect_uses_the_passed_tcp_fd(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, theirs = tcp_pair

    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("connect", conn)
        fake.answer(conn, request, (ours.fileno(),), **CONNECT_ANSWER)
        wait_closed(conn)  # the library drops the control connection once connected

    fake.scripts.append(script)
    with serval.socket(serval.SOCK_STREAM, control_socket=fake.path) as sock:
        sock.settimeout(3)
        sock.connect(SERVICE, mode="handshake")
        assert fake.requests[0] == {
            "op": "connect", "id": fake.requests[0]["id"], "service": str(SERVICE_ID),
            "type": "stream", "timeout_s": 3.0, "mode": "handshake",
        }
        # fileno() is a real TCP socket: the peer of `theirs`.
        raw = stdsocket.socket(fileno=os.dup(sock.fileno()))
        with raw:
            assert raw.type == stdsocket.SOCK_STREAM
            assert raw.getpeername() == theirs.getsockname()
        sock.sendall(b"x" * 100_000)
        got = bytearray()
        while len(got) < 100_000:
            got += theirs.recv(65536)
        theirs.sendall(b"reply")
        buffer = bytearray(5)
        assert sock.recv_into(buffer) == 5 and buffer == b"reply"
        assert sock.getpeername() == ServalAddress(SERVICE_ID, "10.0.0.2", "10.0.0.2")
        assert sock.getsockname() == ServalAddress(None, "10.0.0.1")
        assert sock.info is not None
        assert sock.info.flow == 1234 and sock.info.mode == "repair"
        assert sock.info.remote == ("10.0.0.2", 50000)
        assert sock.gettimeout() == 3.0


def test_connect_refused_names_the_service(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("connect", conn)
        fake.fail(conn, request, "ECONNREFUSED", "no instance accepted")
        wait_closed(conn)

    fake.scripts.append(script)
    sock = serval.socket(control_socket=fake.path)
    with pytest.raises(ConnectionRefusedError, match=r"service echo\.test: no instance") as info:
        sock.connect(SERVICE)
    assert isinstance(info.value, ServalError) and info.value.errno == errno.ECONNREFUSED
    assert sock.fileno() == -1  # the failed attempt left nothing open
    sock.close()


def test_connect_ex_returns_errno(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        fake.fail(conn, fake.expect("connect", conn), "ETIMEDOUT", "service echo.test: no answer")

    fake.scripts.append(script)
    with serval.socket(control_socket=fake.path) as sock:
        assert sock.connect_ex(SERVICE) == errno.ETIMEDOUT


def test_connect_timeout_when_servald_is_silent(
    fake: FakeServald, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serval.socket` is the class; the module of the same name is reached through sys.modules.
    monkeypatch.setattr(sys.modules["serval.socket"], "CONNECT_REPLY_MARGIN_S", 0.1)
    release = threading.Event()

    def script(conn: stdsocket.socket) -> None:
        fake.expect("connect", conn)
        release.wait(10)

    fake.scripts.append(script)
    with serval.socket(control_socket=fake.path) as sock:
        sock.settimeout(0.2)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"service echo\.test: no answer"):
            sock.connect(SERVICE)
        assert time.monotonic() - started < 2
        assert sock.fileno() == -1  # nothing left open
    release.set()


def test_nonblocking_connect_completes_when_readable(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, theirs = tcp_pair
    go = threading.Event()

    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("connect", conn)
        go.wait(10)
        fake.answer(conn, request, (ours.fileno(),), **CONNECT_ANSWER)
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(control_socket=fake.path) as sock:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            sock.connect(SERVICE)
        assert info.value.errno == errno.EINPROGRESS
        deadline = time.monotonic() + 5
        while not fake.requests:  # the request is on its way (the fake records it)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "timeout_s" not in fake.requests[0]  # non-blocking: servald's own timeout
        with pytest.raises(BlockingIOError) as again:
            sock.connect(SERVICE)
        assert again.value.errno == errno.EALREADY
        go.set()
        readable, _, _ = select.select([sock.fileno()], [], [], 5)
        assert readable, "the pending connect's fileno must become readable"
        sock.connect(SERVICE)  # completes
        theirs.sendall(b"hi")
        deadline = time.monotonic() + 5
        while True:
            try:
                assert sock.recv(2) == b"hi"
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.01)


def test_no_servald_names_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    sock = serval.socket(control_socket=str(missing))
    with pytest.raises(FileNotFoundError, match=f"servald is not running.*{missing}"):
        sock.connect(SERVICE)
    sock.close()


def test_environment_variable_selects_the_control_socket(
    fake: FakeServald, monkeypatch: pytest.MonkeyPatch
) -> None:
    def script(conn: stdsocket.socket) -> None:
        fake.fail(conn, fake.expect("connect", conn), "ECONNREFUSED", "nobody")

    fake.scripts.append(script)
    monkeypatch.setenv("SERVAL_CONTROL_SOCKET", fake.path)
    with serval.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(SERVICE)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="SOCK_STREAM or SOCK_DGRAM"):
        serval.socket(stdsocket.SOCK_RAW)
    sock = serval.socket()
    with pytest.raises(ValueError, match="looks like hex"):
        sock.connect("abcdef0123456789abcdef0123456789abcdef")
    with pytest.raises(TypeError, match="ServiceID or str"):
        sock.connect(1234)  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        sock.recv(10)
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as info:
        sock.getpeername()
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as info:
        sock.listen()
    assert info.value.errno == errno.EDESTADDRREQ
    sock.close()
    with pytest.raises(OSError) as info:
        sock.connect(SERVICE)
    assert info.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="out of range"):
        serval.socket().settimeout(-1)


# ==========================================================================================
# stream server
# ==========================================================================================


def test_listen_and_accept(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, theirs = tcp_pair
    push = threading.Event()
    closed = threading.Event()

    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("listen", conn)
        fake.answer(conn, request, service=str(SERVICE_ID))
        push.wait(10)
        send_frame(conn, {"event": "something-new"})  # unknown events are skipped
        send_frame(conn, {
            "event": "accept", "flow": 9, "service": str(SERVICE_ID),
            "local": {"address": "10.0.0.2", "port": 50000},
            "remote": {"address": "10.0.0.1", "port": 40000}, "mode": "repair",
            "peer": {"service": None, "address": "10.0.0.1"}, "proxy": None,
        }, [ours.fileno()])
        wait_closed(conn)
        closed.set()

    fake.scripts.append(script)
    listener = serval.socket(serval.SOCK_STREAM, control_socket=fake.path)
    listener.bind(SERVICE_ID)
    listener.listen(16, weight=3, priority=2)
    request = fake.requests[0]
    assert (request["service"], request["backlog"], request["weight"], request["priority"]) == (
        str(SERVICE_ID), 16, 3, 2)
    assert listener.getsockname() == ServalAddress(SERVICE_ID, None)

    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.settimeout(0.05)
    with pytest.raises(TimeoutError):
        listener.accept()

    push.set()
    assert select.select([listener], [], [], 5)[0], "listener fileno must poll readable"
    listener.settimeout(5)
    conn, peer = listener.accept()
    assert peer == ServalAddress(None, "10.0.0.1")
    assert conn.getsockname() == ServalAddress(SERVICE_ID, "10.0.0.2")
    assert conn.gettimeout() is None
    conn.sendall(b"accepted")
    assert theirs.recv(8) == b"accepted"
    conn.close()
    listener.close()  # ends the listen connection: servald withdraws the service
    assert closed.wait(5)


def test_close_wakes_a_thread_blocked_in_accept(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        fake.answer(conn, fake.expect("listen", conn), service=str(SERVICE_ID))
        wait_closed(conn)

    fake.scripts.append(script)
    listener = serval.socket(control_socket=fake.path)
    listener.bind(SERVICE)
    listener.listen()
    outcome: list[BaseException] = []

    def blocked_accept() -> None:
        try:
            listener.accept()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked_accept)
    thread.start()
    time.sleep(0.2)  # let it block
    listener.close()
    thread.join(5)
    assert not thread.is_alive(), "accept() did not wake up on close()"
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EBADF, outcome


def test_listen_error_names_the_service(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        request = fake.expect("listen", conn)
        fake.fail(conn, request, "EADDRINUSE", f"service {SERVICE_ID}: already listening")

    fake.scripts.append(script)
    with serval.socket(control_socket=fake.path) as sock:
        sock.bind(SERVICE)
        with pytest.raises(OSError, match="already listening") as info:
            sock.listen()
        assert info.value.errno == errno.EADDRINUSE
        assert sock.fileno() == -1


# ==========================================================================================
# datagrams
# ==========================================================================================


def test_datagram_bind_sendto_recvfrom(fake: FakeServald) -> None:
    source = {"service": str(SERVICE_ID), "address": "10.0.0.9"}

    def script(conn: stdsocket.socket) -> None:
        bind = fake.expect("dgram_bind", conn)
        fake.answer(conn, bind, service=str(ServiceID.parse("dg.test")))
        sendto = fake.expect("sendto", conn)
        # A datagram arrives while the library waits for the sendto answer: it gets queued.
        send_frame(conn, {"event": "datagram", "source": source,
                          "data": base64.b64encode(b"first").decode()})
        fake.answer(conn, sendto, service=sendto["service"])
        send_frame(conn, {"event": "datagram", "source": source,
                          "data": base64.b64encode(b"second datagram").decode()})
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(serval.SOCK_DGRAM, control_socket=fake.path) as sock:
        sock.bind("dg.test")
        assert sock.getsockname().service == ServiceID.parse("dg.test")
        assert sock.sendto(b"\x00\xffpayload", ServalAddress(SERVICE_ID, "10.0.0.9")) == 9
        sent = fake.requests[1]
        assert base64.b64decode(sent["data"]) == b"\x00\xffpayload"
        assert sent["address"] == "10.0.0.9" and sent["service"] == str(SERVICE_ID)
        assert sock.pending() == 1
        sock.settimeout(5)
        assert sock.recvfrom(100) == (b"first", ServalAddress(SERVICE_ID, "10.0.0.9"))
        assert sock.recvfrom(6) == (b"second", ServalAddress(SERVICE_ID, "10.0.0.9"))  # cut
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recvfrom(100)
        with pytest.raises(OSError) as info:
            sock.sendto(b"x" * (MAX_DATAGRAM_BYTES + 1), SERVICE)
        assert info.value.errno == errno.EMSGSIZE and "echo.test" in str(info.value)


def test_sendto_while_another_thread_is_blocked_in_recvfrom(fake: FakeServald) -> None:
    """Like a UDP socket: a receiving thread does not hold up a sending one."""
    sent = threading.Event()

    def script(conn: stdsocket.socket) -> None:
        fake.answer(conn, fake.expect("dgram_bind", conn), service=str(SERVICE_ID))
        sendto = fake.expect("sendto", conn)
        fake.answer(conn, sendto, service=sendto["service"])
        assert sent.wait(10)
        send_frame(conn, {"event": "datagram", "source": {"service": None, "address": "h"},
                          "data": base64.b64encode(b"late").decode()})
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(serval.SOCK_DGRAM, control_socket=fake.path) as sock:
        sock.bind(SERVICE)
        sock.settimeout(10)
        got: list[tuple[bytes, ServalAddress]] = []
        receiver = threading.Thread(target=lambda: got.append(sock.recvfrom(100)))
        receiver.start()
        time.sleep(0.1)  # the receiver is now the one reading the control connection
        started = time.monotonic()
        sock.sendto(b"out", "other.test")  # answered while the receiver reads: it files it
        assert time.monotonic() - started < 5
        sent.set()
        receiver.join(10)
        assert got == [(b"late", ServalAddress(None, "h"))]


def test_datagram_sendto_autobinds_and_connect_sets_default_peer(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        bind = fake.expect("dgram_bind", conn)
        assert "service" not in bind
        fake.answer(conn, bind, service="ab" * 32)
        sendto = fake.expect("sendto", conn)
        fake.answer(conn, sendto, service=sendto["service"])
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(serval.SOCK_DGRAM, control_socket=fake.path) as sock:
        with pytest.raises(OSError) as info:
            sock.send(b"no peer")
        assert info.value.errno == errno.EDESTADDRREQ
        sock.connect(SERVICE)
        assert sock.getsockname().service == ServiceID.parse("ab" * 32)
        sock.send(b"to the default peer")
        assert fake.requests[1]["service"] == str(SERVICE_ID)
        assert "address" not in fake.requests[1]


# ==========================================================================================
# asyncio helpers
# ==========================================================================================


def test_asyncio_open_connection_and_start_server(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, theirs = tcp_pair
    server_side, client_side = stdsocket.socketpair()
    listener_closed = threading.Event()

    def listen_script(conn: stdsocket.socket) -> None:
        fake.answer(conn, fake.expect("listen", conn), service=str(SERVICE_ID))
        send_frame(conn, {"event": "accept", "flow": 5, "service": str(SERVICE_ID),
                          "peer": {"service": None, "address": "10.0.0.7"}},
                   [server_side.fileno()])
        wait_closed(conn)
        listener_closed.set()

    def connect_script(conn: stdsocket.socket) -> None:
        request = fake.expect("connect", conn)
        assert request["timeout_s"] == 2
        fake.answer(conn, request, (ours.fileno(),), **CONNECT_ANSWER)
        wait_closed(conn)

    fake.scripts.extend([listen_script, connect_script])

    async def main() -> None:
        handled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            info = serval.asyncio.connection_info(writer)
            writer.write(await reader.readexactly(4) + b" " + str(info.peer.address).encode())
            await writer.drain()
            writer.close()
            handled.set_result(str(info.service))

        server = await serval.asyncio.start_server(handler, SERVICE, weight=4,
                                                   control_socket=fake.path)
        assert fake.requests[0]["weight"] == 4 and server.is_serving()
        client_side.sendall(b"ping")
        assert await asyncio.wait_for(handled, 5) == str(SERVICE_ID)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        assert not server.is_serving()

        _reader, writer = await serval.asyncio.open_connection(
            SERVICE, timeout_s=2, control_socket=fake.path)
        assert serval.asyncio.connection_info(writer).flow == 1234
        writer.write(b"to the passed fd")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())
    client_side.settimeout(5)
    assert client_side.recv(100) == b"ping 10.0.0.7"
    assert listener_closed.wait(5)
    theirs.settimeout(5)
    assert theirs.recv(100) == b"to the passed fd"
    server_side.close()
    client_side.close()


def test_asyncio_connect_error_names_the_service(fake: FakeServald) -> None:
    def script(conn: stdsocket.socket) -> None:
        fake.fail(conn, fake.expect("connect", conn), "ECONNREFUSED", "refused")

    fake.scripts.append(script)

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError, match=r"service echo\.test: refused"):
            await serval.asyncio.open_connection(SERVICE, control_socket=fake.path)

    asyncio.run(main())


# ==========================================================================================
# the migration seam
# ==========================================================================================


def test_adopt_fd_keeps_the_fd_number(
    fake: FakeServald, tcp_pair: tuple[stdsocket.socket, stdsocket.socket]
) -> None:
    ours, theirs = tcp_pair

    def script(conn: stdsocket.socket) -> None:
        fake.answer(conn, fake.expect("connect", conn), (ours.fileno(),), **CONNECT_ANSWER)
        wait_closed(conn)

    fake.scripts.append(script)
    with serval.socket(control_socket=fake.path) as sock:
        sock.connect(SERVICE)
        ours.close()  # the library now holds the only reference to that TCP socket
        number = sock.fileno()
        sock.settimeout(0.2)
        new_left, new_right = stdsocket.socketpair()
        with new_right:
            sock._adopt_fd(new_left.detach())
            assert sock.fileno() == number
            assert os.get_inheritable(number) is False
            sock.sendall(b"after the swap")
            assert new_right.recv(100) == b"after the swap"
            with pytest.raises(TimeoutError):  # the timeout still applies to the new socket
                sock.recv(1)
        # The old connection was really released: its peer sees EOF.
        theirs.settimeout(2)
        assert theirs.recv(1) == b""


# ==========================================================================================
# real servald in network namespaces
# ==========================================================================================


@dataclass
class ServaldHost:
    host: Any
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def control(self) -> str:
        return str(self.host.control_socket)

    @property
    def address(self) -> str:
        return str(self.host.ipv4)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def start_servald(host: Any, workdir: Path, *extra: str,
                  config: dict[str, Any] | None = None) -> ServaldHost:
    """Start servald in `host`'s namespace with its own control socket; wait until it answers.

    `config` is written as its YAML file; `extra` are more command-line flags.
    """
    Path(host.control_socket).parent.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"servald-{host.name}.log"
    if config is not None:
        config_path = workdir / f"servald-{host.name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        extra = ("--config", str(config_path), *extra)
    env = host.env()
    env["PYTHONPATH"] = str(REPO)
    with log_path.open("ab") as log:
        process = host.popen(
            [sys.executable, "-m", "serval.host.daemon", "--control-socket",
             str(host.control_socket), "--log-level", "info", *extra],
            env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    daemon = ServaldHost(host, process, log_path)
    deadline = time.monotonic() + SERVALD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"servald on {host.name} exited: {daemon.log()}")
        with contextlib.suppress(OSError), ControlClient(daemon.control) as client:
            client.request("status")
            return daemon
        time.sleep(0.05)
    raise RuntimeError(f"servald on {host.name} did not answer: {daemon.log()}")


@pytest.fixture
def serval_pair(topology: Any, tmp_path: Path) -> tuple[ServaldHost, ServaldHost]:
    """Hosts a and b on one link, servald on both (ad-hoc mode: no router)."""
    from serval.topology import TopologySpec

    topo = topology(TopologySpec.pair("a", "b"))
    return start_servald(topo["a"], tmp_path), start_servald(topo["b"], tmp_path)


def _echo_server(listener: serval.socket, count: int) -> list[ServalAddress]:
    """Accept `count` connections; echo each to EOF. Returns the peers."""
    peers: list[ServalAddress] = []
    for _ in range(count):
        try:
            conn, peer = listener.accept()
        except OSError:
            return peers  # the listener was closed (the test failed before connecting)
        peers.append(peer)
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
    return peers


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["repair", "handshake"])
def test_stream_through_servald(serval_pair: tuple[ServaldHost, ServaldHost], mode: str) -> None:
    a, b = serval_pair
    listener = serval.socket(serval.SOCK_STREAM, control_socket=b.control)
    listener.bind(SERVICE)
    listener.listen()
    listener.settimeout(20)
    server = threading.Thread(target=lambda: peers.extend(_echo_server(listener, 1)))
    peers: list[ServalAddress] = []
    server.start()
    payload = os.urandom(1 << 20)
    try:
        with serval.socket(serval.SOCK_STREAM, control_socket=a.control) as sock:
            sock.settimeout(10)
            sock.connect(SERVICE, mode=mode)
            assert sock.info is not None and sock.info.mode == mode
            assert sock.getpeername() == ServalAddress(SERVICE_ID, b.address, b.address)
            raw = stdsocket.socket(fileno=os.dup(sock.fileno()))
            with raw:  # a real kernel TCP socket between the two hosts
                assert raw.getpeername()[0] == b.address and raw.getsockname()[0] == a.address
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = bytearray()
            while len(echoed) < len(payload):
                chunk = sock.recv(1 << 16)
                assert chunk, "connection closed early"
                echoed += chunk
            sender.join()
            assert echoed == payload
            sock.shutdown(stdsocket.SHUT_WR)
            assert sock.recv(1) == b""
        server.join(10)
        assert peers and peers[0].address == a.address
    finally:
        listener.close()


@pytest.mark.netns
def test_repair_stream_through_a_router(topology: Any, tmp_path: Path) -> None:
    """Infrastructure mode, the default repair data plane: the socket the library gets is a
    TCP connection servald built with TCP_REPAIR, directly between client and instance."""
    from serval.topology import LanSpec, TopologySpec

    topo = topology(TopologySpec(hosts=("c", "s"), routers=("r",),
                                 lans=(LanSpec("lan", ("c", "s", "r")),)))
    key = {"domain_key": "42" * 32}
    router = start_servald(topo["r"], tmp_path, "--router", config=key)
    routers = ("--router-addr", router.address)
    client = start_servald(topo["c"], tmp_path, *routers, config=key)
    server = start_servald(topo["s"], tmp_path, *routers, config=key)
    with serval.socket(control_socket=server.control) as listener:
        listener.bind("routed.test")
        listener.listen()
        deadline = time.monotonic() + 10
        while True:  # wait until the router holds s's registration
            with ControlClient(router.control) as control:
                held = control.request("registrations").message.get("registrations", [])
            if any(r["service"] == str(ServiceID.parse("routed.test")) for r in held):
                break
            assert time.monotonic() < deadline, "registration never reached the router"
            time.sleep(0.1)
        with serval.create_connection("routed.test", 10, mode="repair",
                                      control_socket=client.control) as sock:
            assert sock.info is not None and sock.info.mode == "repair", sock.info
            assert sock.getpeername().address == server.address
            listener.settimeout(10)
            conn, peer = listener.accept()
            with conn:
                assert peer.address == client.address
                sock.sendall(b"through repair")
                conn.settimeout(5)
                assert conn.recv(100) == b"through repair"
                conn.sendall(b"and back")
                sock.settimeout(5)
                assert sock.recv(100) == b"and back"


@pytest.mark.netns
def test_connect_to_a_service_nobody_serves_times_out(
    serval_pair: tuple[ServaldHost, ServaldHost],
) -> None:
    a, _ = serval_pair
    with serval.socket(control_socket=a.control) as sock:
        sock.settimeout(1.0)
        started = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            sock.connect("nobody.test")
        assert str(ServiceID.parse("nobody.test")) in str(info.value) or "nobody.test" in str(
            info.value)
        assert isinstance(info.value, ServalError)
        assert time.monotonic() - started < 5


@pytest.mark.netns
def test_second_listener_for_a_service_is_refused(
    serval_pair: tuple[ServaldHost, ServaldHost],
) -> None:
    _, b = serval_pair
    with serval.socket(control_socket=b.control) as first:
        first.bind(SERVICE)
        first.listen()
        with serval.socket(control_socket=b.control) as second:
            second.bind(SERVICE)
            with pytest.raises(OSError) as info:
                second.listen()
            assert info.value.errno == errno.EADDRINUSE
    # Closing the first listener withdrew the service: it can be served again.
    with serval.socket(control_socket=b.control) as third:
        third.bind(SERVICE)
        third.listen()


@pytest.mark.netns
def test_datagrams_between_hosts(serval_pair: tuple[ServaldHost, ServaldHost]) -> None:
    a, b = serval_pair
    with serval.socket(serval.SOCK_DGRAM, control_socket=b.control) as server, \
            serval.socket(serval.SOCK_DGRAM, control_socket=a.control) as client:
        server.bind("dgram.test")
        server.settimeout(10)
        client.settimeout(10)
        received: list[tuple[bytes, ServalAddress]] = []
        deadline = time.monotonic() + 10
        while not received:  # datagrams are unreliable: retry until one lands
            client.sendto(b"ping", "dgram.test")
            readable, _, _ = select.select([server], [], [], 0.5)
            if readable or server.pending():
                received.append(server.recvfrom(100))
            assert time.monotonic() < deadline, "no datagram arrived"
        data, source = received[0]
        assert data == b"ping" and source.address == a.address
        assert source.service == client.getsockname().service
        server.sendto(b"pong", source)  # the reply goes to the autobound sender
        assert client.recvfrom(100) == (b"pong", ServalAddress(ServiceID.parse("dgram.test"),
                                                               b.address))


@pytest.mark.netns
def test_asyncio_helpers_through_servald(serval_pair: tuple[ServaldHost, ServaldHost]) -> None:
    a, b = serval_pair

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            info = serval.asyncio.connection_info(writer)
            line = await reader.readline()
            writer.write(line.upper() + f"from {info.peer.address}\n".encode())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await serval.asyncio.start_server(handle, "async.test", control_socket=b.control)
        async with server:
            assert server.is_serving()
            reader, writer = await serval.asyncio.open_connection(
                "async.test", timeout_s=10, control_socket=a.control)
            info = serval.asyncio.connection_info(writer)
            assert info.peer.address == b.address
            writer.write(b"hello\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), 10) == b"HELLO\n"
            assert await asyncio.wait_for(reader.readline(), 10) == (
                f"from {a.address}\n".encode())
            writer.close()
            await writer.wait_closed()
        assert not server.is_serving()
        # The service is gone once the server closed: connecting now fails (servald may time
        # out or see the set-up reset, depending on how far b got), naming the service.
        with pytest.raises(OSError, match=r"async\.test") as failure:
            await serval.asyncio.open_connection("async.test", timeout_s=0.5,
                                                 control_socket=a.control)
        assert isinstance(failure.value, TimeoutError | ConnectionError)

    asyncio.run(main())


@pytest.mark.netns
def test_real_socket_timeouts(serval_pair: tuple[ServaldHost, ServaldHost]) -> None:
    a, b = serval_pair
    with serval.socket(control_socket=b.control) as listener:
        listener.bind(SERVICE)
        listener.listen()
        with serval.create_connection(SERVICE, 10, control_socket=a.control) as sock:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                sock.settimeout(0.1)
                with pytest.raises(TimeoutError):
                    sock.recv(1)
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
                conn.sendall(b"z")
                sock.settimeout(5)
                assert sock.recv(1) == b"z"
