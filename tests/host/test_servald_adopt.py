"""Flow-state hand-back: the seal (serval/host/flowstate.py) and servald's `adopt` and
`unwatch` ops, the latter with real servald processes in network namespaces.

The full story -- a relayed transfer whose servald is killed, restarted, takes the flow back
and migrates it -- is tests/translator/test_translator_adopt.py; here are the refusals: a
forged, truncated, altered or foreign state, a socket that does not match, a flow that is
still live. servald must answer each with a clear error and keep serving.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from serval.control import ControlClient
from serval.core.flow import FlowExport
from serval.core.ids import ServiceID
from serval.errors import ServalOSError
from serval.host import flowstate
from serval.topology import Host, Topology

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SERVICE = "adopt.servald.test"
DOMAIN_KEY = "ad0be5ad0be5ad0be5ad0be5ad0be5ad0be5ad0be5ad0be5ad0be5ad0be5ad0b"
START_TIMEOUT_S = 20.0
KEY = bytes(range(32))


# -- the seal (no privileges needed) ----------------------------------------------------------


def sample_state(flow: int = 4242) -> flowstate.SealedFlow:
    export = FlowExport(
        service=ServiceID.from_name(SERVICE), protocol=6, is_client=True, local_flow=flow,
        peer_flow=99, local_nonce=b"\x01" * 8, peer_nonce=b"\x02" * 8,
        local_address=IPv4Address("10.0.0.1"), peer_address=IPv4Address("10.0.0.2"),
        iss=7, snd_nxt=9, rcv_nxt=11, last_rcv_verno=10, srtt=0.002, rttvar=0.001)
    return flowstate.SealedFlow(export, "client", "repair", ("10.0.0.1", 40000),
                                ("10.0.0.2", 7000))


def test_a_sealed_state_opens_to_what_was_sealed() -> None:
    state = sample_state()
    text = flowstate.seal(KEY, state)
    assert flowstate.open_sealed(KEY, text) == state
    assert len(text) < flowstate.MAX_SEALED_BYTES


def flip(text: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda t: flip(t, 40), "seal does not verify"),  # the payload altered
    (lambda t: flip(t, -1), "seal does not verify"),  # the tag altered
    (lambda t: t[:-12], "seal does not verify"),  # truncated
    (lambda t: t[:20], "truncated"),
    (lambda t: flip(t, 0), "version"),
    (lambda t: "not base64!", "base64"),
    (lambda t: "", "non-empty string"),
    (lambda t: "A" * (flowstate.MAX_SEALED_BYTES + 1), "more than"),
    (lambda t: flowstate.seal(bytes(32), sample_state()), "seal does not verify"),  # foreign
])
def test_a_damaged_or_foreign_state_is_refused(mangle: Any, message: str) -> None:
    with pytest.raises(flowstate.SealedStateError, match=message):
        flowstate.open_sealed(KEY, mangle(flowstate.seal(KEY, sample_state())))


def test_the_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = str(tmp_path / "servald.sock.flowkey")
    key, created = flowstate.load_or_create_key(path)
    assert created and len(key) == flowstate.FLOW_KEY_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert flowstate.load_or_create_key(path) == (key, False)
    # Readable by others: not trusted, replaced (what it sealed stops verifying).
    os.chmod(path, 0o644)
    replaced, created = flowstate.load_or_create_key(path)
    assert created and replaced != key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Not a key at all.
    Path(path).write_bytes(b"short")
    os.chmod(path, 0o600)
    assert flowstate.load_or_create_key(path)[1] is True


# -- servald (namespaces, real processes) -----------------------------------------------------


class Servald:
    """One servald in a host's namespace, on a control socket of its own."""

    def __init__(self, host: Host, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir
        self.socket_path = str(workdir / f"{host.name}-servald.sock")
        self.config_path = workdir / f"{host.name}.yaml"
        self.config_path.write_text(json.dumps({"domain_key": DOMAIN_KEY, "log_level": "info"}))
        self.log_path = workdir / f"{host.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        env = self.host.env()
        env["PYTHONPATH"] = str(REPOSITORY_ROOT)
        with self.log_path.open("ab") as log:
            self.process = self.host.popen(
                [sys.executable, "-m", "serval.host.daemon", "--config", str(self.config_path),
                 "--control-socket", self.socket_path],
                env=env, cwd=str(REPOSITORY_ROOT), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, f"servald exited: {self.log()}"
            with contextlib.suppress(OSError), ControlClient(self.socket_path) as client:
                client.request("status")
                return
            assert time.monotonic() < deadline, f"servald did not start: {self.log()}"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with ControlClient(self.socket_path) as client:
            return dict(client.request(op, **fields).message)

    def watched(self) -> dict[int, dict[str, Any]]:
        return {int(f["flow"]): f for f in self.request("flows")["flows"] if f.get("watched")}


@dataclass
class Stream:
    """A stream a -> b; the test process holds both sockets and both watch connections."""

    client_flow: int
    client_sock: socket.socket
    server_sock: socket.socket
    client_watch: ControlClient
    server_watch: ControlClient
    listener: ControlClient
    client_state: str

    def close(self) -> None:
        for closable in (self.client_watch, self.server_watch, self.listener,
                         self.client_sock, self.server_sock):
            closable.close()


@pytest.fixture
def servalds(pair: Topology, tmp_path: Path) -> Iterator[tuple[Servald, Servald]]:
    started: list[Servald] = []
    try:
        for name in ("a", "b"):
            started.append(Servald(pair[name], tmp_path))
        yield started[0], started[1]
    finally:
        for daemon in started:
            daemon.stop()


def open_stream(a: Servald, b: Servald) -> Stream:
    listener = ControlClient(b.socket_path)
    listener.request("listen", service=SERVICE, type="stream", backlog=8)
    with ControlClient(a.socket_path) as client:
        reply = client.call("connect", {"service": SERVICE, "type": "stream", "timeout_s": 10.0})
    assert reply.message["migratable"] is True
    client_flow = int(reply.message["flow"])
    client_sock = socket.socket(fileno=reply.fds[0])
    accept = listener.next_event(10.0)
    server_flow = int(accept.message["flow"])
    server_sock = socket.socket(fileno=accept.fds[0])
    client_watch, server_watch = ControlClient(a.socket_path), ControlClient(b.socket_path)
    answer = client_watch.call("watch", {"events": ["migration"], "flow": client_flow},
                               fds=[client_sock.fileno()]).message
    server_watch.call("watch", {"events": ["migration"], "flow": server_flow},
                      fds=[server_sock.fileno()])
    assert isinstance(answer.get("state"), str)
    return Stream(client_flow, client_sock, server_sock, client_watch, server_watch, listener,
                  answer["state"])


def adopt(daemon: Servald, state: object, fds: list[int]) -> dict[str, Any]:
    with ControlClient(daemon.socket_path) as client:
        return dict(client.call("adopt", {"state": state}, fds=fds).message)


def refused(daemon: Servald, state: object, fds: list[int], code: int, message: str) -> None:
    with pytest.raises(ServalOSError, match=message) as caught:
        adopt(daemon, state, fds)
    assert caught.value.errno == code


@pytest.mark.netns
def test_adopt_refuses_bad_states_and_sockets_and_servald_stays_up(
        servalds: tuple[Servald, Servald]) -> None:
    a, b = servalds
    stream = open_stream(a, b)
    try:
        state, fd = stream.client_state, stream.client_sock.fileno()
        refused(a, flip(state, 30), [fd], errno.EINVAL, "seal does not verify")
        refused(a, state[:-40], [fd], errno.EINVAL, "seal does not verify")
        refused(a, base64.urlsafe_b64encode(os.urandom(300)).decode(), [fd], errno.EINVAL,
                "adopt: state")
        refused(a, 12345, [fd], errno.EINVAL, "non-empty string")
        refused(a, state, [], errno.EINVAL, "fds=1")
        # The right state with the wrong socket: the other end's (its 4-tuple is reversed).
        refused(a, state, [stream.server_sock.fileno()], errno.EINVAL, "does not match|names")
        with socket.socket() as unconnected:
            refused(a, state, [unconnected.fileno()], errno.ENOTCONN, "not a connected")
        with open(os.devnull) as not_a_socket:
            refused(a, state, [not_a_socket.fileno()], errno.ENOTSOCK, "not a socket")
        # All correct, but the flow is live here (its watch is open).
        refused(a, state, [fd], errno.EEXIST, "already live")
        # b's servald did not issue it (another key).
        refused(b, state, [fd], errno.EINVAL, "seal does not verify")
        status = a.request("status")
        assert status["flows"]["watched"] == 1 and status["flows"]["adopted"] == 0
        assert status["counters"]["migration.adopt_refused"] >= 5
        assert state not in a.log()  # never logged
    finally:
        stream.close()


@pytest.mark.netns
def test_unwatch_releases_a_flow_and_only_its_watcher_may(
        servalds: tuple[Servald, Servald]) -> None:
    a, b = servalds
    stream = open_stream(a, b)
    try:
        flow = stream.client_flow
        assert flow in a.watched()
        with ControlClient(a.socket_path) as stranger, \
                pytest.raises(ServalOSError, match="not watched by this connection"):
            stranger.request("unwatch", flow=flow)
        assert stream.client_watch.request("unwatch", flow=flow).message["flow"] == flow
        assert flow not in a.watched()
        with pytest.raises(ServalOSError, match="not watched") as caught:
            stream.client_watch.request("unwatch", flow=flow)
        assert caught.value.errno == errno.ENOENT
        # Released: the flow is no longer servald's, so it can be handed back (as after a
        # restart) on the very same connection, which then watches it again.
        answer = stream.client_watch.call("adopt", {"state": stream.client_state},
                                          fds=[stream.client_sock.fileno()]).message
        assert answer["flow"] == flow and isinstance(answer["state"], str)
        assert a.watched()[flow]["adopted"] is True
        # The socket still carries bytes both ways.
        stream.client_sock.sendall(b"ping")
        assert stream.server_sock.recv(4) == b"ping"
    finally:
        stream.close()
    wait_s = time.monotonic() + 10
    while a.watched() and time.monotonic() < wait_s:
        time.sleep(0.05)
    assert not a.watched(), "closing the connection released the adopted flow"


@pytest.mark.netns
def test_a_restarted_servald_takes_the_flow_back(servalds: tuple[Servald, Servald]) -> None:
    """(Migrating it afterwards, both ways: tests/translator/test_translator_adopt.py.)"""
    a, b = servalds
    stream = open_stream(a, b)
    try:
        flow = stream.client_flow
        listed = a.watched()[flow]
        a.kill()
        stream.client_watch.close()
        a.start()
        assert flow not in a.watched()
        # The peer's side never noticed: still watched, still connected.
        assert b.watched()
        watch = ControlClient(a.socket_path)
        try:
            answer = watch.call("adopt", {"state": stream.client_state},
                                fds=[stream.client_sock.fileno()]).message
            assert answer["flow"] == flow
            now = a.watched()[flow]
            assert now["adopted"] is True and now["state"] == "CONNECTED"
            assert now["local"] == listed["local"] and now["remote"] == listed["remote"]
            assert now["role"] == "client" and now["mode"] == listed["mode"]
            # A second copy of the same state is refused now that the flow is live.
            refused(a, stream.client_state, [stream.client_sock.fileno()], errno.EEXIST,
                    "already live")
            assert a.request("status")["counters"]["migration.adopted"] == 1
        finally:
            watch.close()
        # A servald whose key is gone (another host, or the file deleted) refuses it.
        a.stop()
        os.unlink(flowstate.key_path_for(a.socket_path))
        a.start()
        refused(a, stream.client_state, [stream.client_sock.fileno()], errno.EINVAL,
                "seal does not verify")
    finally:
        stream.close()


@pytest.mark.netns
def test_a_socket_left_frozen_by_a_dead_servald_is_thawed(
        servalds: tuple[Servald, Servald]) -> None:
    """servald killed in the middle of a migration: the application's socket is still input-
    locked, in repair mode, its send window zeroed. adopt puts it back to work."""
    from serval.host import repair

    a, b = servalds
    stream = open_stream(a, b)
    try:
        stream.server_sock.sendall(b"before")
        assert stream.client_sock.recv(6) == b"before"
        repair.freeze(stream.client_sock)  # what the dead servald's _park + freeze left
        a.kill()
        stream.client_watch.close()
        stream.server_sock.sendall(b"while frozen")  # dropped by the filter, re-sent later
        a.start()
        answer = adopt(a, stream.client_state, [stream.client_sock.fileno()])
        assert answer["thawed"] is True
        assert a.request("status")["counters"]["migration.adopt_thawed"] == 1
        stream.client_sock.settimeout(10)
        stream.server_sock.settimeout(10)
        received = b""
        while len(received) < len(b"while frozen"):
            received += stream.client_sock.recv(64)
        assert received == b"while frozen"
        stream.client_sock.sendall(b"after")
        assert stream.server_sock.recv(5) == b"after"
    finally:
        stream.close()
