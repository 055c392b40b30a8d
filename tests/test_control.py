"""Control-API framing and clients over real unix sockets (socketpair and a tiny fake servald)."""

from __future__ import annotations

import array
import asyncio
import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serval import control
from serval.control import (
    MAX_FRAME_BYTES,
    AsyncControlClient,
    AsyncFrameChannel,
    ControlClient,
    Frame,
    FrameDecoder,
    encode_frame,
    error_from_response,
    get_field,
    recv_frame,
    send_frame,
)
from serval.errors import ControlProtocolError, ServalError, ServalOSError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def raw_frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def pipe_has_no_other_writer(read_fd: int) -> bool:
    """After closing our own write end: EOF means every copy (e.g. a passed fd) is closed."""
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 1) == b""
    except BlockingIOError:
        return False


# ---------------------------------------------------------------- sync framing


def test_round_trip_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    send_frame(a, {"op": "status", "id": 7, "text": "héllo"})
    frame = recv_frame(b)
    assert frame == Frame({"op": "status", "id": 7, "text": "héllo"}, [])


def test_fd_passed_is_usable_and_declared(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    read_end, write_end = os.pipe()
    try:
        send_frame(a, {"event": "accept"}, fds=[write_end])
        frame = recv_frame(b)
        assert frame is not None
        assert frame.message == {"event": "accept", "fds": 1}
        (received,) = frame.fds
        assert received not in (read_end, write_end)
        assert os.get_inheritable(received) is False  # MSG_CMSG_CLOEXEC
        os.write(received, b"through the passed fd")
        os.close(received)
        assert os.read(read_end, 100) == b"through the passed fd"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_recv_frame_reads_exactly_one_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(encode_frame({"n": 1}) + encode_frame({"n": 2}))
    first = recv_frame(b)
    assert first is not None and first.message == {"n": 1}
    # The second frame is still in the kernel: the socket stays pollable for it.
    b.setblocking(False)
    assert len(b.recv(100, socket.MSG_PEEK)) == len(encode_frame({"n": 2}))
    b.settimeout(5)
    second = recv_frame(b)
    assert second is not None and second.message == {"n": 2}


def test_clean_eof_returns_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert recv_frame(b) is None


@pytest.mark.parametrize("length", [0, MAX_FRAME_BYTES + 1, 0xFFFFFFFF])
def test_bad_length_loses_framing(pair: tuple[socket.socket, socket.socket], length: int) -> None:
    a, b = pair
    a.sendall(struct.pack("!I", length) + b"{}")
    with pytest.raises(ControlProtocolError, match="bad frame length") as info:
        recv_frame(b)
    assert info.value.framing_lost


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"x": NaN}', "not JSON"),
        (b'{"id": true}', "'id' must be int"),
        (b'{"id": 1.5}', "'id' must be int"),
        (b'{"op": 3}', "'op' must be str"),
        (b'{"ok": "yes"}', "'ok' must be bool"),
        (b'{"fds": -1}', "'fds' out of range"),
    ],
)
def test_garbage_body_keeps_framing(
    pair: tuple[socket.socket, socket.socket], body: bytes, match: str
) -> None:
    a, b = pair
    a.sendall(raw_frame(body) + encode_frame({"after": True}))
    with pytest.raises(ControlProtocolError, match=match) as info:
        recv_frame(b)
    assert not info.value.framing_lost
    # The frame was well delimited, so the next one is still readable.
    following = recv_frame(b)
    assert following is not None and following.message == {"after": True}


def test_truncated_header(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\x00\x00")
    a.close()
    with pytest.raises(ControlProtocolError, match="truncated frame"):
        recv_frame(b)


def test_truncated_body(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(raw_frame(b'{"op": "status", "id": 1}')[:10])
    a.close()
    with pytest.raises(ControlProtocolError, match=r"truncated frame: .* after 10 of 29 bytes"):
        recv_frame(b)


def test_stall_mid_frame_is_a_protocol_error(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "FRAME_COMPLETION_TIMEOUT_S", 0.2)
    a, b = pair
    a.sendall(raw_frame(b'{"op": "status"}')[:6])
    with pytest.raises(ControlProtocolError, match="stalled"):
        recv_frame(b)
    assert b.gettimeout() == 5  # the caller's timeout is restored


def test_timeout_before_first_byte_consumes_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.settimeout(0.05)
    with pytest.raises(TimeoutError):
        recv_frame(b)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_frame(b)
    a.sendall(encode_frame({"late": 1}))
    b.settimeout(5)
    frame = recv_frame(b)
    assert frame is not None and frame.message == {"late": 1}


def test_undeclared_fds_are_rejected_and_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    read_end, write_end = os.pipe()
    try:
        send_with_fds(a, raw_frame(b'{"event": "accept"}'), [write_end])
        with pytest.raises(ControlProtocolError, match="declares 0 fds but 1 arrived"):
            recv_frame(b)
        os.close(write_end)
        write_end = -1
        assert pipe_has_no_other_writer(read_end)  # the received copy was closed, not leaked
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_declared_fds_missing(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(raw_frame(b'{"event": "accept", "fds": 1}'))
    with pytest.raises(ControlProtocolError, match="declares 1 fds but 0 arrived"):
        recv_frame(b)


def test_fds_sent_with_the_body_instead_of_the_header(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    body = b'{"event": "accept", "fds": 1}'
    read_end, write_end = os.pipe()
    try:
        a.sendall(struct.pack("!I", len(body)))
        send_with_fds(a, body, [write_end])
        with pytest.raises(ControlProtocolError, match="not sent with a frame header"):
            recv_frame(b)
        os.close(write_end)
        write_end = -1
        assert pipe_has_no_other_writer(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_encode_rejects_oversize_and_non_json() -> None:
    with pytest.raises(ControlProtocolError, match="exceeds the 65536-byte limit"):
        encode_frame({"data": "x" * MAX_FRAME_BYTES})
    with pytest.raises(ControlProtocolError, match="JSON-serializable"):
        encode_frame({"data": object()})
    with pytest.raises(ControlProtocolError, match="JSON-serializable"):
        encode_frame({"x": float("nan")})
    biggest = encode_frame({"d": "x" * (MAX_FRAME_BYTES - len('{"d":""}'))})
    assert len(biggest) == MAX_FRAME_BYTES + 4


def test_largest_frame_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    message = {"d": "y" * (MAX_FRAME_BYTES - len('{"d":""}'))}
    sender = threading.Thread(target=send_frame, args=(a, message))
    sender.start()
    frame = recv_frame(b)
    sender.join()
    assert frame is not None and frame.message == message


# ---------------------------------------------------------------- the decoder's fd attribution


def test_decoder_attributes_fds_in_a_read_spanning_frames() -> None:
    """One read = tail of frame 1 + whole frame 2 (with fds): they belong to frame 2."""
    one = encode_frame({"n": 1})
    two = encode_frame({"n": 2}, fd_count=2)
    decoder = FrameDecoder()
    decoder.feed(one[:3])
    decoder.feed(one[3:] + two, [101, 102])
    assert decoder.next_frame() == Frame({"n": 1}, [])
    assert decoder.next_frame() == Frame({"n": 2, "fds": 2}, [101, 102])
    assert decoder.next_frame() is None
    decoder.eof()


def test_decoder_holds_fds_for_a_frame_still_incomplete() -> None:
    one = encode_frame({"n": 1})
    two = encode_frame({"n": 2}, fd_count=1)
    decoder = FrameDecoder()
    decoder.feed(one + two[:5], [55])  # read stopped inside frame 2 (partial fd chunk)
    assert decoder.next_frame() == Frame({"n": 1}, [])
    assert decoder.next_frame() is None
    decoder.feed(two[5:])
    assert decoder.next_frame() == Frame({"n": 2, "fds": 1}, [55])


def test_decoder_after_framing_loss_stays_broken() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ControlProtocolError):
        decoder.next_frame()
    with pytest.raises(ControlProtocolError):
        decoder.feed(encode_frame({"n": 1}))


def test_get_field_types() -> None:
    message: dict[str, Any] = {"n": 3, "flag": True, "f": 2, "s": "x"}
    assert get_field(message, "n", int) == 3
    assert get_field(message, "f", float) == 2
    with pytest.raises(ControlProtocolError, match="'flag' must be int"):
        get_field(message, "flag", int)
    with pytest.raises(ControlProtocolError, match="missing field 'service'"):
        get_field(message, "service", str)


# ---------------------------------------------------------------- errors and paths


def test_error_codes_map_to_builtin_exceptions() -> None:
    refused = error_from_response({"code": "ECONNREFUSED", "message": "no instance"}, "web.example")
    assert isinstance(refused, ConnectionRefusedError)
    assert isinstance(refused, ServalError)
    assert refused.errno == errno.ECONNREFUSED
    assert "web.example: no instance" in str(refused)
    timeout = error_from_response({"code": "ETIMEDOUT", "message": "service web.example: none"})
    assert isinstance(timeout, TimeoutError)
    named = error_from_response({"code": "ETIMEDOUT", "message": "web.example: x"}, "web.example")
    assert str(named).count("web.example") == 1
    invalid = error_from_response({"code": "EINVAL", "message": "bad weight"})
    assert type(invalid) is ServalOSError and invalid.errno == errno.EINVAL
    odd = error_from_response({"code": "NOT_AN_ERRNO", "message": "strange"})
    assert odd.errno is None and "NOT_AN_ERRNO" in str(odd)


def test_control_socket_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(control.CONTROL_SOCKET_ENV, raising=False)
    assert control.control_socket_path() == "/run/serval/servald.sock"
    monkeypatch.setenv(control.CONTROL_SOCKET_ENV, "/tmp/from-env.sock")
    assert control.control_socket_path() == "/tmp/from-env.sock"
    assert control.control_socket_path("/tmp/explicit.sock") == "/tmp/explicit.sock"


def test_no_servald_names_the_socket_path(tmp_path: Path) -> None:
    missing = tmp_path / "servald.sock"
    with pytest.raises(FileNotFoundError, match=f"servald is not running.*{missing}") as info:
        ControlClient(str(missing))
    assert isinstance(info.value, ServalError)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(missing))  # bound, never listening: what a crashed servald leaves behind
    try:
        with pytest.raises(ConnectionRefusedError, match=str(missing)):
            ControlClient(str(missing))
    finally:
        stale.close()


# ---------------------------------------------------------------- ControlClient vs a fake server

Handler = Callable[[socket.socket], None]


@pytest.fixture
def fake_servald(tmp_path: Path) -> Iterator[Callable[[Handler], str]]:
    """Serve ONE connection with `handler` (a script of frames) on a unix socket."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> str:
        path = str(tmp_path / f"fake{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with conn:
                handler(conn)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


def test_client_request_response_and_queued_events(
    fake_servald: Callable[[Handler], str],
) -> None:
    seen: list[dict[str, Any]] = []

    def script(conn: socket.socket) -> None:
        frame = recv_frame(conn)
        assert frame is not None
        seen.append(frame.message)
        send_frame(conn, {"event": "datagram", "data": "aGk="})  # pushed before the answer
        send_frame(conn, {"id": frame.message["id"], "ok": True, "version": "1"})
        recv_frame(conn)  # wait for the client to close

    with ControlClient(fake_servald(script)) as client:
        response = client.request("hello", client="test")
        assert response.message["version"] == "1"
        assert client.pending_events == 1
        event = client.next_event(timeout_s=1)
        assert event.message == {"event": "datagram", "data": "aGk="}
    assert seen[0]["op"] == "hello" and seen[0]["client"] == "test"
    assert isinstance(seen[0]["id"], int)


def test_client_raises_mapped_error(fake_servald: Callable[[Handler], str]) -> None:
    def script(conn: socket.socket) -> None:
        frame = recv_frame(conn)
        assert frame is not None
        error = {"code": "ECONNREFUSED", "message": "no listener answered"}
        send_frame(conn, {"id": frame.message["id"], "ok": False, "error": error})
        recv_frame(conn)

    with ControlClient(fake_servald(script)) as client:
        with pytest.raises(ConnectionRefusedError, match=r"service web\.example: no listener"):
            client.call("connect", {"service": "web.example"}, subject="service web.example")
        assert not client.closed  # an error answer does not end the connection


def test_client_rejects_malformed_response(fake_servald: Callable[[Handler], str]) -> None:
    def script(conn: socket.socket) -> None:
        frame = recv_frame(conn)
        assert frame is not None
        send_frame(conn, {"id": frame.message["id"], "ok": False, "error": "nope"})
        recv_frame(conn)

    client = ControlClient(fake_servald(script))
    with pytest.raises(ControlProtocolError, match="'error' must be dict"):
        client.request("status")
    assert client.closed


def test_client_rejects_mismatched_id(fake_servald: Callable[[Handler], str]) -> None:
    def script(conn: socket.socket) -> None:
        frame = recv_frame(conn)
        assert frame is not None
        send_frame(conn, {"id": frame.message["id"] + 1, "ok": True})
        recv_frame(conn)

    client = ControlClient(fake_servald(script))
    with pytest.raises(ControlProtocolError, match="answers no request"):
        client.request("status")
    assert client.closed


def test_client_reports_servald_going_away(fake_servald: Callable[[Handler], str]) -> None:
    def script(conn: socket.socket) -> None:
        recv_frame(conn)  # and close without answering

    client = ControlClient(fake_servald(script))
    with pytest.raises(ConnectionAbortedError, match="closed the control connection"):
        client.request("status")


def test_client_reply_timeout(fake_servald: Callable[[Handler], str]) -> None:
    done = threading.Event()

    def script(conn: socket.socket) -> None:
        recv_frame(conn)
        done.wait(10)

    client = ControlClient(fake_servald(script), reply_timeout_s=0.1)
    try:
        expected = r"web\.example: no answer from servald within 0\.1 s"
        with pytest.raises(TimeoutError, match=expected):
            client.call("connect", {"service": "x"}, subject="web.example")
    finally:
        done.set()
        client.close()


def test_late_answer_after_a_timeout_is_dropped(fake_servald: Callable[[Handler], str]) -> None:
    """A timed-out request is abandoned; its late answer (and fd) does not confuse the next."""
    go = threading.Event()
    read_end, write_end = os.pipe()

    def script(conn: socket.socket) -> None:
        first = recv_frame(conn)
        assert first is not None
        assert go.wait(10)
        send_frame(conn, {"id": first.message["id"], "ok": True, "late": True}, [write_end])
        second = recv_frame(conn)
        assert second is not None
        send_frame(conn, {"id": second.message["id"], "ok": True, "second": True})
        recv_frame(conn)

    client = ControlClient(fake_servald(script), reply_timeout_s=0.1)
    try:
        with pytest.raises(TimeoutError):
            client.request("connect", service="x")
        go.set()
        answer = client.call("status", {}, wait_s=5)
        assert answer.message["second"] is True and answer.fds == []
        os.close(write_end)
        write_end = -1
        assert pipe_has_no_other_writer(read_end)  # the late answer's fd was closed
    finally:
        client.close()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_client_receives_fd_in_response(fake_servald: Callable[[Handler], str]) -> None:
    left, right = socket.socketpair()

    def script(conn: socket.socket) -> None:
        frame = recv_frame(conn)
        assert frame is not None
        send_frame(conn, {"id": frame.message["id"], "ok": True, "flow": "1"}, [right.fileno()])
        recv_frame(conn)

    try:
        with ControlClient(fake_servald(script)) as client:
            response = client.request("connect", service="x", type="stream")
            assert response.message["fds"] == 1
            with socket.socket(fileno=response.fds[0]) as received:
                received.sendall(b"ping")
                assert left.recv(4) == b"ping"
    finally:
        left.close()
        right.close()


# ---------------------------------------------------------------- asyncio


def test_async_channel_round_trip_with_fds_and_partial_writes() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # force partial writes
        writer = AsyncFrameChannel(a)
        reader = AsyncFrameChannel(b)
        pipes = [os.pipe() for _ in range(3)]
        big = "z" * (MAX_FRAME_BYTES - 100)
        try:
            got: dict[int, Frame] = {}

            async def read_four() -> None:
                for _ in range(4):
                    frame = await reader.read_frame()
                    assert frame is not None
                    got[frame.message["n"]] = frame

            # Several tasks write at once while the reader drains: every frame must arrive
            # whole and in one piece, with its own fds.
            await asyncio.wait_for(
                asyncio.gather(
                    *(writer.write_frame({"n": i, "big": big}, [pipes[i][1]]) for i in range(3)),
                    writer.write_frame({"n": 99}),
                    read_four(),
                ),
                10,
            )
            assert got[99].fds == []
            for i in range(3):
                assert got[i].message["big"] == big
                (fd,) = got[i].fds
                os.write(fd, f"pipe {i}".encode())
                os.close(fd)
                assert os.read(pipes[i][0], 10) == f"pipe {i}".encode()
            writer.close()
            assert await reader.read_frame() is None
        finally:
            reader.close()
            writer.close()
            for r, w in pipes:
                os.close(r)
                os.close(w)

    asyncio.run(main())


def test_async_channel_garbage_and_truncation() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        reader = AsyncFrameChannel(b)
        a.sendall(raw_frame(b"{oops") + encode_frame({"ok": True}) + b"\x00\x01")
        a.close()
        with pytest.raises(ControlProtocolError, match="not JSON") as info:
            await reader.read_frame()
        assert not info.value.framing_lost
        frame = await reader.read_frame()
        assert frame is not None and frame.message == {"ok": True}
        with pytest.raises(ControlProtocolError, match="truncated frame"):
            await reader.read_frame()
        reader.close()

    asyncio.run(main())


def test_async_channel_close_wakes_a_blocked_reader() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        channel = AsyncFrameChannel(b)
        reader = asyncio.ensure_future(channel.read_frame())
        await asyncio.sleep(0.05)
        assert not reader.done()
        channel.close()
        with pytest.raises(OSError) as info:
            await asyncio.wait_for(reader, 2)
        assert info.value.errno == errno.EBADF
        a.close()

    asyncio.run(main())


def test_async_client_against_async_server(tmp_path: Path) -> None:
    path = str(tmp_path / "async.sock")

    async def serve(conn: socket.socket) -> None:
        channel = AsyncFrameChannel(conn)
        while (frame := await channel.read_frame()) is not None:
            op, request_id = control.validate_request(frame.message)
            if op == "status":
                await channel.write_frame({"id": request_id, "ok": True, "role": "host"})
            else:
                error = {"code": "ETIMEDOUT", "message": f"service {frame.message['service']}"}
                await channel.write_frame({"id": request_id, "ok": False, "error": error})
        channel.close()

    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        client_task = asyncio.ensure_future(AsyncControlClient.connect(path))
        conn, _ = await loop.sock_accept(listener)
        server_task = asyncio.ensure_future(serve(conn))
        client = await client_task
        status = await client.request("status")
        assert status.message["role"] == "host"
        with pytest.raises(TimeoutError, match=r"service web\.example"):
            await client.request("connect", service="web.example")
        client.close()
        await asyncio.wait_for(server_task, 5)
        listener.close()

    asyncio.run(main())


def test_message_json_is_compact() -> None:
    frame = encode_frame({"op": "status", "id": 1})
    assert json.loads(frame[4:]) == {"op": "status", "id": 1}
    assert b" " not in frame[4:]
