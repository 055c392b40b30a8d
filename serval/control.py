"""Control-API framing and clients, shared by servald and every client (docs/control-api.md).

Theory of operation
-------------------
The control API is a unix stream socket. Every message is a *frame*: a 4-byte big-endian
length N (1 <= N <= 65536) followed by N bytes of UTF-8 JSON that must be an object. File
descriptors travel as SCM_RIGHTS ancillary data on the sendmsg that carries the frame's
header, and such a frame says so with ``"fds": K``.

Which frame do received fds belong to? On a unix stream socket Linux hands the fds of one
sendmsg to the recvmsg that reads the *first* byte of that sendmsg, and that recvmsg stops at
the end of the fd-carrying chunk (a read never spans two fd batches). A read may however
start with the tail of earlier frames. So a batch of fds received with the stream bytes
[start, end) belongs to the frame whose header starts inside [start, end) and which reaches
``end`` or beyond; any other batch is an error. `FrameDecoder` implements exactly that rule,
so both the exact-read sync path and the buffered asyncio path attribute fds correctly, and a
peer that sends fds without declaring them (or the other way round) is caught.

Layers in this module:

- sans-IO: `encode_frame`, `FrameDecoder` (bytes + fds in, `Frame` out), the validators
  (`validate_request`, `validate_response`, `get_field`, ...) and `error_from_response`,
  which maps an ``{"code": "ECONNREFUSED", ...}`` error to the matching builtin exception.
- sync: `send_frame`, `recv_frame`, `connect_control_socket`, `ControlClient`.
- asyncio: `AsyncFrameChannel` (servald's side and the async library) and
  `AsyncControlClient`.

Every malformed incoming frame raises `ControlProtocolError`, whose `framing_lost` says
whether the connection can go on (a well-delimited frame with bad JSON or a wrong field type)
or must be closed (a bad length, a truncated frame, fds that do not add up).
"""

from __future__ import annotations

import array
import asyncio
import collections
import enum
import errno
import itertools
import json
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

from serval.errors import (
    ControlProtocolError,
    ServalBlockingIOError,
    ServalBrokenPipeError,
    ServalConnectionAbortedError,
    ServalConnectionRefusedError,
    ServalConnectionResetError,
    ServalFileNotFoundError,
    ServalOSError,
    ServalPermissionError,
    ServalTimeoutError,
)

__all__ = [
    "CONTROL_SOCKET_ENV",
    "DEFAULT_CONTROL_SOCKET",
    "DEFAULT_REPLY_TIMEOUT_S",
    "FRAME_HEADER_BYTES",
    "MAX_FDS_PER_FRAME",
    "MAX_FRAME_BYTES",
    "AsyncControlClient",
    "AsyncFrameChannel",
    "ControlClient",
    "Frame",
    "FrameDecoder",
    "Message",
    "close_fds",
    "connect_control_socket",
    "control_socket_path",
    "encode_frame",
    "error_from_response",
    "get_field",
    "get_optional_field",
    "recv_frame",
    "send_frame",
    "validate_event",
    "validate_request",
    "validate_response",
]

Message = dict[str, Any]
T = TypeVar("T")

FRAME_HEADER = struct.Struct("!I")
FRAME_HEADER_BYTES = FRAME_HEADER.size
MAX_FRAME_BYTES = 65536
# Room for this many fds is reserved on every recvmsg; more in one frame is a protocol error
# (the kernel would truncate them with MSG_CTRUNC anyway). Every op passes at most one.
MAX_FDS_PER_FRAME = 16
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)

DEFAULT_CONTROL_SOCKET = "/run/serval/servald.sock"
CONTROL_SOCKET_ENV = "SERVAL_CONTROL_SOCKET"
# How long a client waits for servald to answer an ordinary request (status, listen, ...).
DEFAULT_REPLY_TIMEOUT_S = 10.0
# Once the first byte of a frame has arrived the rest is already in flight (frames are sent
# with one sendmsg); a peer that stalls this long mid-frame has lost the framing.
FRAME_COMPLETION_TIMEOUT_S = 5.0
# The buffered (asyncio) reader asks for this much per recvmsg.
_READ_CHUNK_BYTES = 256 * 1024

_ERRNO_NAME = re.compile(r"E[A-Z0-9]+")


class _Default(enum.Enum):
    """Sentinel type: "use the client's configured reply timeout"."""

    DEFAULT = enum.auto()


DEFAULT = _Default.DEFAULT


def control_socket_path(explicit: str | os.PathLike[str] | None = None) -> str:
    """The control socket path: `explicit` (--control-socket), else $SERVAL_CONTROL_SOCKET,
    else /run/serval/servald.sock."""
    if explicit is not None and os.fspath(explicit):
        return os.fspath(explicit)
    from_env = os.environ.get(CONTROL_SOCKET_ENV)
    if from_env:
        return from_env
    return DEFAULT_CONTROL_SOCKET


class Frame(NamedTuple):
    """One decoded frame: the JSON object and the fds that came with it (the caller owns them)."""

    message: Message
    fds: list[int]


def close_fds(fds: Iterable[int]) -> None:
    """Close received fds nobody is going to use (they would leak otherwise)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------------------
# sans-IO: encoding, decoding, validation
# --------------------------------------------------------------------------------------


def encode_frame(message: Mapping[str, Any], fd_count: int = 0) -> bytes:
    """Serialize one frame (header + JSON). Adds ``"fds": fd_count`` when fds go with it."""
    if fd_count < 0 or fd_count > MAX_FDS_PER_FRAME:
        raise ControlProtocolError(f"a frame carries 0..{MAX_FDS_PER_FRAME} fds, not {fd_count}")
    body_obj = dict(message)
    if fd_count:
        body_obj["fds"] = fd_count
    else:
        body_obj.pop("fds", None)
    try:
        body = json.dumps(body_obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ControlProtocolError(f"message is not JSON-serializable: {exc}") from exc
    data = body.encode("utf-8")
    if len(data) > MAX_FRAME_BYTES:
        raise ControlProtocolError(
            f"frame of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"
        )
    return FRAME_HEADER.pack(len(data)) + data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode_body(body: bytes) -> Message:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlProtocolError(f"frame is not UTF-8: {exc}", framing_lost=False) from exc
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ControlProtocolError(f"frame is not JSON: {exc}", framing_lost=False) from exc
    if not isinstance(obj, dict):
        raise ControlProtocolError(
            f"frame must be a JSON object, not {type(obj).__name__}", framing_lost=False
        )
    _check_envelope(obj)
    return obj


def _check_envelope(message: Message) -> None:
    """Types of the keys every frame may carry: id, fds, op, event, ok."""
    for key, kind in (("id", int), ("fds", int), ("op", str), ("event", str), ("ok", bool)):
        if key in message:
            value = message[key]
            if not _is_kind(value, kind):
                raise ControlProtocolError(
                    f"field {key!r} must be {kind.__name__}, got {type(value).__name__}",
                    framing_lost=False,
                )
    fds = message.get("fds", 0)
    if fds < 0 or fds > MAX_FDS_PER_FRAME:
        raise ControlProtocolError(f"field 'fds' out of range: {fds}", framing_lost=False)


def _is_kind(value: Any, kind: type[Any]) -> bool:
    # JSON true/false decode to bool, a subclass of int: an int field must not accept them.
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


class _FdBatch(NamedTuple):
    start: int  # stream offset of the first byte of the read that delivered the fds
    end: int  # stream offset just past that read
    fds: list[int]


class FrameDecoder:
    """Sans-IO frame decoder: `feed` it reads (bytes and the fds that came with them).

    `next_frame()` returns the next complete `Frame` or None. After a `ControlProtocolError`
    with `framing_lost` the decoder is dead: every later call raises again and `close()`
    closes the fds it still holds. The caller owns the fds of every returned frame.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # stream offset of _buffer[0]
        self._batches: collections.deque[_FdBatch] = collections.deque()
        self._broken: ControlProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        if self._broken is not None:
            close_fds(fds)
            raise self._broken
        start = self._offset + len(self._buffer)
        self._buffer += data
        if fds:
            if not data:
                close_fds(fds)
                self._fail("fds arrived without data")
            self._batches.append(_FdBatch(start, start + len(data), list(fds)))

    def next_frame(self) -> Frame | None:
        if self._broken is not None:
            raise self._broken
        if len(self._buffer) < FRAME_HEADER_BYTES:
            return None
        (length,) = FRAME_HEADER.unpack_from(self._buffer)
        if length < 1 or length > MAX_FRAME_BYTES:
            self._fail(f"bad frame length {length} (must be 1..{MAX_FRAME_BYTES})")
        total = FRAME_HEADER_BYTES + length
        if len(self._buffer) < total:
            return None
        frame_start = self._offset
        frame_end = frame_start + total
        owned: list[int] = []
        orphaned = False
        while self._batches:
            batch = self._batches[0]
            if batch.start <= frame_start < batch.end and frame_end >= batch.end:
                owned.extend(batch.fds)
            elif batch.end <= frame_end:
                # fds attached to bytes in which no frame header starts: the peer sent them
                # on the wrong sendmsg. We cannot tell whose they are.
                close_fds(batch.fds)
                orphaned = True
            else:
                break  # belongs to a later frame of the same read
            self._batches.popleft()
        body = bytes(self._buffer[FRAME_HEADER_BYTES:total])
        del self._buffer[:total]
        self._offset = frame_end
        if orphaned:
            close_fds(owned)
            self._fail("received fds that were not sent with a frame header")
        try:
            message = _decode_body(body)
        except ControlProtocolError:
            close_fds(owned)
            raise
        declared = message.get("fds", 0)
        if declared != len(owned):
            close_fds(owned)
            self._fail(f"frame declares {declared} fds but {len(owned)} arrived with it")
        return Frame(message, owned)

    def eof(self) -> None:
        """The peer closed: raise if a partial frame (or unclaimed fds) remain."""
        if self._broken is not None:
            raise self._broken
        if self._buffer:
            need = "?"
            if len(self._buffer) >= FRAME_HEADER_BYTES:
                need = str(FRAME_HEADER_BYTES + FRAME_HEADER.unpack_from(self._buffer)[0])
            self._fail(
                f"truncated frame: connection closed after {len(self._buffer)} of {need} bytes"
            )
        if self._batches:
            self._fail("received fds that were not sent with a frame header")

    def close(self) -> None:
        """Drop buffered data and close every fd not yet handed out."""
        while self._batches:
            close_fds(self._batches.popleft().fds)
        self._buffer.clear()

    def _fail(self, reason: str) -> Any:
        self._broken = ControlProtocolError(reason, framing_lost=True)
        self.close()
        raise self._broken


def get_field(message: Mapping[str, Any], name: str, kind: type[T]) -> T:
    """A required field of type `kind` (bool is not an int; an int is a float)."""
    if name not in message:
        raise ControlProtocolError(f"missing field {name!r}", framing_lost=False)
    value = message[name]
    if not _is_kind(value, kind):
        raise ControlProtocolError(
            f"field {name!r} must be {kind.__name__}, got {type(value).__name__}",
            framing_lost=False,
        )
    return cast(T, value)


def get_optional_field(message: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    """Like `get_field`, but absent or null gives None."""
    if message.get(name) is None:
        return None
    return get_field(message, name, kind)


def validate_request(message: Mapping[str, Any]) -> tuple[str, int]:
    """A request must carry ``op`` (str) and ``id`` (int); returns them."""
    return get_field(message, "op", str), get_field(message, "id", int)


def validate_response(message: Mapping[str, Any]) -> None:
    """A response carries ``id`` and ``ok``; a failed one a well-formed ``error`` object."""
    get_field(message, "id", int)
    if not get_field(message, "ok", bool):
        error = get_field(message, "error", dict)
        get_field(error, "code", str)
        get_field(error, "message", str)


def validate_event(message: Mapping[str, Any]) -> str:
    """An event carries ``event`` (str) and no ``id``; returns the event name."""
    if "id" in message:
        raise ControlProtocolError("an event must not carry 'id'", framing_lost=False)
    return get_field(message, "event", str)


_ERRNO_CLASSES: dict[int, type[ServalOSError]] = {
    errno.ECONNREFUSED: ServalConnectionRefusedError,
    errno.ECONNRESET: ServalConnectionResetError,
    errno.ECONNABORTED: ServalConnectionAbortedError,
    errno.ETIMEDOUT: ServalTimeoutError,
    errno.ENOENT: ServalFileNotFoundError,
    errno.EACCES: ServalPermissionError,
    errno.EPERM: ServalPermissionError,
    errno.EAGAIN: ServalBlockingIOError,
    errno.EINPROGRESS: ServalBlockingIOError,
    errno.EALREADY: ServalBlockingIOError,
    errno.EPIPE: ServalBrokenPipeError,
}


def os_error(errno_: int | None, message: str) -> ServalOSError:
    """A `ServalOSError` that is also the builtin subclass matching `errno_`."""
    if errno_ is None:
        return ServalOSError(message)
    return _ERRNO_CLASSES.get(errno_, ServalOSError)(errno_, message)


def error_from_response(error: Mapping[str, Any], subject: str | None = None) -> ServalOSError:
    """Map a response's ``error`` object to an exception; `subject` (e.g. the serviceID)
    prefixes the message unless servald's message already names it."""
    code = error.get("code")
    text = error.get("message")
    message = text if isinstance(text, str) and text else f"servald error {code}"
    if subject and subject not in message:
        message = f"{subject}: {message}"
    errno_: int | None = None
    if isinstance(code, str) and _ERRNO_NAME.fullmatch(code):
        value = getattr(errno, code, None)
        errno_ = value if isinstance(value, int) else None
    if errno_ is None and isinstance(code, str):
        message = f"{message} ({code})"
    return os_error(errno_, message)


# --------------------------------------------------------------------------------------
# sync I/O
# --------------------------------------------------------------------------------------


def _parse_ancillary(ancdata: list[tuple[int, int, bytes]], flags: int) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise ControlProtocolError(
            f"more than {MAX_FDS_PER_FRAME} fds in one read: ancillary data truncated"
        )
    return fds


def _recv_some(sock: socket.socket, max_bytes: int) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(max_bytes, _ANCILLARY_BYTES, socket.MSG_CMSG_CLOEXEC)
    return data, _parse_ancillary(ancdata, flags)


def send_frame(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one frame on a blocking (or timeout) socket, fds on the sendmsg with the header.

    The fds stay open on our side (the kernel duplicates them); close them when done.
    """
    data = encode_frame(message, len(fds))
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
    else:
        sock.sendall(data)


def recv_frame(sock: socket.socket) -> Frame | None:
    """Read exactly one frame from a blocking (or timeout) socket; None on a clean EOF.

    Reads never go past the frame, so whatever follows stays in the kernel and the socket
    stays pollable for it. The socket's timeout (or non-blocking mode) applies to the first
    byte only: then the rest must follow within FRAME_COMPLETION_TIMEOUT_S, or the framing is
    lost (ControlProtocolError). A TimeoutError/BlockingIOError before the first byte consumes
    nothing.
    """
    decoder = FrameDecoder()
    data, fds = _recv_some(sock, FRAME_HEADER_BYTES)
    if not data:
        close_fds(fds)
        return None
    saved_timeout = sock.gettimeout()
    sock.settimeout(FRAME_COMPLETION_TIMEOUT_S)
    try:
        decoder.feed(data, fds)
        got = len(data)
        while got < FRAME_HEADER_BYTES:
            data, fds = _recv_some(sock, FRAME_HEADER_BYTES - got)
            if not data:
                decoder.eof()
            decoder.feed(data, fds)
            got += len(data)
        frame = decoder.next_frame()  # validates the length before we wait for the body
        while frame is None:
            data, fds = _recv_some(sock, FRAME_HEADER_BYTES + _peek_length(decoder) - got)
            if not data:
                decoder.eof()
            decoder.feed(data, fds)
            got += len(data)
            frame = decoder.next_frame()
        return frame
    except TimeoutError as exc:
        decoder.close()
        raise ControlProtocolError(
            f"truncated frame: peer stalled mid-frame for {FRAME_COMPLETION_TIMEOUT_S} s"
        ) from exc
    except BaseException:
        decoder.close()
        raise
    finally:
        try:
            sock.settimeout(saved_timeout)
        except OSError:
            pass


def _peek_length(decoder: FrameDecoder) -> int:
    return int(FRAME_HEADER.unpack_from(decoder._buffer)[0])


def connect_control_socket(path: str | None = None, *, blocking: bool = True) -> socket.socket:
    """Connect to servald's control socket; failures say servald is not reachable at `path`."""
    resolved = control_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(resolved)
    except OSError as exc:
        sock.close()
        raise _control_connect_error(resolved, exc) from exc
    sock.setblocking(blocking)
    return sock


def _control_connect_error(path: str, exc: OSError) -> ServalOSError:
    hint = f"(set --control-socket or ${CONTROL_SOCKET_ENV} if servald uses another path)"
    if isinstance(exc, FileNotFoundError):
        return os_error(errno.ENOENT, f"servald is not running: no control socket at {path} {hint}")
    if isinstance(exc, ConnectionRefusedError):
        return os_error(
            errno.ECONNREFUSED,
            f"servald is not running: nothing listens on control socket {path} {hint}",
        )
    if isinstance(exc, PermissionError):
        return os_error(
            exc.errno,
            f"permission denied on servald control socket {path} (it is root-only unless "
            "servald's control_socket_mode allows more)",
        )
    return os_error(exc.errno, f"cannot reach servald at {path}: {exc.strerror or exc}")


def _wait_readable(sock: socket.socket, timeout_s: float | None) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        remaining_ms = None
        if deadline is not None:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
        if poller.poll(remaining_ms):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


# A connection-level failure, re-created as a fresh exception for every thread that meets it.
_Failure = tuple[type[Exception], int | None, str]


class ControlClient:
    """A blocking connection to servald: requests, responses and the events it pushes.

    `request(op, **fields)` sends a request and returns the successful response as a
    `Frame`; a failed one raises the exception matching its error code.

    Thread-safe in the way a socket is: one thread may wait for events (an accept, a
    datagram) while another sends requests on the same connection (a `sendto`). Whichever
    thread is reading when a frame arrives files it: answers by request id, events in a
    queue; the others wait on a condition variable. Nobody holds a lock while blocked in the
    kernel. A connection-level failure (servald gone, garbage) is raised in every waiter.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        reply_timeout_s: float | None = DEFAULT_REPLY_TIMEOUT_S,
    ) -> None:
        self.path = control_socket_path(path)
        self.reply_timeout_s = reply_timeout_s
        self._sock: socket.socket | None = connect_control_socket(self.path)
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False  # a thread is waiting on / reading from the socket
        self._waiting: set[int] = set()  # request ids whose answer someone will collect
        self._abandoned: set[int] = set()  # timed-out requests: their late answer is dropped
        self._responses: dict[int, Frame] = {}
        self._events: collections.deque[Frame] = collections.deque()
        self._failure: _Failure | None = None
        self._closing: socket.socket | None = None  # closed by the reader once out of poll

    def fileno(self) -> int:
        """The control connection's fd: readable when servald has pushed something."""
        sock = self._sock
        return -1 if sock is None else sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def pending_events(self) -> int:
        """Events already read (e.g. while waiting for an answer) and not yet taken."""
        with self._cond:
            return len(self._events)

    # -- requests ---------------------------------------------------------------------------------

    def request(self, op: str, /, **fields: Any) -> Frame:
        """Send ``{"op": op, **fields}``; return the successful response."""
        return self.call(op, fields)

    def call(
        self,
        op: str,
        fields: Mapping[str, Any],
        *,
        fds: Sequence[int] = (),
        wait_s: float | _Default | None = DEFAULT,
        subject: str | None = None,
    ) -> Frame:
        """`request` with control: fds to pass, how long to wait for the answer (None waits
        forever), and the subject (e.g. ``service web.example``) that error messages name."""
        request_id = self.start(op, fields, fds=fds)
        return self.finish(request_id, wait_s=wait_s, subject=subject or op)

    def start(self, op: str, fields: Mapping[str, Any], *, fds: Sequence[int] = ()) -> int:
        """Send a request without waiting; `finish` collects the answer. Returns its id."""
        with self._send_lock:
            sock = self._require_open()
            request_id = next(self._ids)
            with self._cond:
                self._waiting.add(request_id)
            try:
                send_frame(sock, {**fields, "op": op, "id": request_id}, fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                self._fail(ServalConnectionAbortedError, errno.ECONNABORTED,
                           self._lost_message(exc))
                raise self._failure_exception() from exc
            except TimeoutError as exc:
                self._fail(ServalTimeoutError, errno.ETIMEDOUT,
                           f"{op}: servald at {self.path} stopped reading")
                raise self._failure_exception() from exc
            return request_id

    def finish(
        self,
        request_id: int,
        *,
        wait_s: float | _Default | None = DEFAULT,
        subject: str | None = None,
    ) -> Frame:
        """Wait for the answer to request `request_id`; raise its error if it failed.

        After a timeout the request is abandoned: its answer, if it still comes, is dropped.
        """
        timeout = self.reply_timeout_s if isinstance(wait_s, _Default) else wait_s
        what = f"{subject or 'request'}: no answer from servald within {timeout} s"
        try:
            self._pump(lambda: request_id in self._responses, timeout, what)
        except BaseException:
            with self._cond:
                self._waiting.discard(request_id)
                if request_id in self._responses:
                    close_fds(self._responses.pop(request_id).fds)
                else:
                    self._abandoned.add(request_id)
            raise
        with self._cond:
            self._waiting.discard(request_id)
            frame = self._responses.pop(request_id)
        if not frame.message["ok"]:
            close_fds(frame.fds)
            raise error_from_response(frame.message["error"], subject)
        return frame

    def answered(self, request_id: int) -> bool:
        """Whether the answer to `request_id` is in, reading what is readable (never blocks)."""
        try:
            self._pump(lambda: request_id in self._responses, 0.0, "")
        except TimeoutError:
            return False
        return True

    # -- events -----------------------------------------------------------------------------------

    def next_event(self, timeout_s: float | None = None) -> Frame:
        """The next pushed event (queued ones first); TimeoutError after `timeout_s`."""
        self._pump(lambda: bool(self._events), timeout_s,
                   f"no event from servald within {timeout_s} s")
        with self._cond:
            return self._events.popleft()

    def poll_event(self) -> Frame | None:
        """An event if one is queued or already readable, without blocking."""
        try:
            return self.next_event(0.0)
        except TimeoutError:
            return None

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (servald drops whatever the connection owned, e.g. a listener).

        shutdown() first, so that a thread blocked waiting on it wakes up (with EBADF).
        """
        with self._cond:
            sock, self._sock = self._sock, None
            if sock is None:
                return
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if not self._reading:
                sock.close()
            else:
                self._closing = sock  # the reader closes it once it is out of the kernel
            for frame in (*self._events, *self._responses.values()):
                close_fds(frame.fds)
            self._events.clear()
            self._responses.clear()
            self._cond.notify_all()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the shared reader ------------------------------------------------------------------------

    def _pump(self, done: Callable[[], bool], timeout_s: float | None, what: str) -> None:
        """Return once `done()` holds (checked under the condition), reading frames as needed.

        Only one thread reads at a time; it files every frame it reads and wakes the others.
        A zero timeout still reads what is already readable.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._cond:
                while True:
                    if done():
                        return
                    self._raise_failure()
                    if not self._reading:
                        self._reading = True
                        sock = self._sock
                        assert sock is not None  # _raise_failure covers a closed connection
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise os_error(errno.ETIMEDOUT, f"{what} ({self.path})")
                    self._cond.wait(remaining)
            frame: Frame | None = None
            failure: _Failure | None = None
            timed_out = False
            try:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if _wait_readable(sock, remaining):
                    frame = recv_frame(sock)
                    if frame is None:
                        failure = (ServalConnectionAbortedError, errno.ECONNABORTED,
                                   self._lost_message(None))
                else:
                    timed_out = True
            except ControlProtocolError as exc:
                failure = (ControlProtocolError, None, str(exc))
            except OSError as exc:
                failure = (ServalConnectionAbortedError, errno.ECONNABORTED,
                           self._lost_message(exc))
            with self._cond:
                self._reading = False
                if frame is not None:
                    failure = self._file(frame) or failure
                if failure is not None:
                    self._fail(*failure)
                self._close_if_closing()
                self._cond.notify_all()
                if timed_out and not done():
                    raise os_error(errno.ETIMEDOUT, f"{what} ({self.path})")

    def _file(self, frame: Frame) -> _Failure | None:
        """File a frame under the condition; a malformed one is a connection failure."""
        message = frame.message
        try:
            if "id" in message:
                validate_response(message)
                request_id = message["id"]
                if request_id in self._waiting:
                    self._responses[request_id] = frame
                    return None
                close_fds(frame.fds)
                if request_id in self._abandoned:  # a late answer nobody waits for
                    self._abandoned.discard(request_id)
                    return None
                raise ControlProtocolError(f"response id {request_id} answers no request")
            validate_event(message)
            self._events.append(frame)
            return None
        except ControlProtocolError as exc:
            close_fds(frame.fds)
            return (ControlProtocolError, None, str(exc))

    def _fail(self, kind: type[Exception], errno_: int | None, message: str) -> None:
        """Record a connection-level failure (first one wins) and close."""
        with self._cond:
            if self._failure is None and self._sock is not None:
                self._failure = (kind, errno_, message)
        self.close()

    def _raise_failure(self) -> None:
        if self._failure is not None or self._sock is None:
            raise self._failure_exception()

    def _failure_exception(self) -> Exception:
        # A fresh exception per waiter: one instance raised in several threads would share
        # (and keep growing) its traceback.
        if self._failure is not None:
            kind, errno_, message = self._failure
            if issubclass(kind, ServalOSError):
                return kind(errno_, message)
            return kind(message)
        return os_error(errno.EBADF, f"control connection to {self.path} is closed")

    def _close_if_closing(self) -> None:
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.close()

    def _require_open(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise self._failure_exception()
        return sock

    def _lost_message(self, exc: OSError | None) -> str:
        detail = f": {exc.strerror or exc}" if exc is not None else ""
        return f"servald at {self.path} closed the control connection{detail}"


# --------------------------------------------------------------------------------------
# asyncio
# --------------------------------------------------------------------------------------


class AsyncFrameChannel:
    """Frames over a non-blocking unix stream socket in asyncio (servald and async clients).

    `read_frame()` returns the next `Frame` or None at a clean EOF, raising
    `ControlProtocolError` on garbage; one reader at a time. `write_frame()` may be called
    from several tasks: frames are written whole and in call order. asyncio's transports do
    not carry ancillary data, so this drives recvmsg/sendmsg itself with add_reader/add_writer.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder()
        self._eof = False
        self._write_lock = asyncio.Lock()
        self._closed = False
        # (future, fd, writable) of every task parked in _wait, so close() can wake them.
        self._waiters: set[tuple[asyncio.Future[None], int, bool]] = set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def read_frame(self) -> Frame | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            if self._eof:
                self._decoder.eof()
                return None
            self._check_open()
            try:
                data, fds = _recv_some(self.sock, _READ_CHUNK_BYTES)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except ConnectionResetError:
                data, fds = b"", []
            if not data:
                close_fds(fds)
                self._eof = True
                continue
            self._decoder.feed(data, fds)

    async def write_frame(self, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
        """Send one frame (fds with its header); the fds stay open on our side."""
        data = memoryview(encode_frame(message, len(fds)))
        async with self._write_lock:
            ancillary = []
            if fds:
                ancillary = [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                ]
            while data:
                self._check_open()
                try:
                    if ancillary:
                        sent = self.sock.sendmsg([data], ancillary)
                        ancillary = []  # the fds went with the first byte
                    else:
                        sent = self.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                data = data[sent:]

    def close(self) -> None:
        """Close; tasks waiting to read or write wake up with OSError(EBADF)."""
        if self._closed:
            return
        self._closed = True
        self._decoder.close()
        # Unregister from the loop *before* the fd number can be reused, then wake waiters.
        for future, fd, writable in list(self._waiters):
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)
            if not future.done():
                future.set_exception(os_error(errno.EBADF, "control channel is closed"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise os_error(errno.EBADF, "control channel is closed")

    async def _wait(self, *, writable: bool) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        if writable:
            self._loop.add_writer(fd, ready)
        else:
            self._loop.add_reader(fd, ready)
        waiter = (future, fd, writable)
        self._waiters.add(waiter)
        try:
            await future
        finally:
            self._waiters.discard(waiter)
            if not self._closed:  # close() already unregistered it
                if writable:
                    self._loop.remove_writer(fd)
                else:
                    self._loop.remove_reader(fd)


class AsyncControlClient:
    """The asyncio counterpart of `ControlClient` (one outstanding request at a time)."""

    def __init__(self, channel: AsyncFrameChannel, path: str) -> None:
        self.channel = channel
        self.path = path
        self._ids = itertools.count(1)
        self._events: collections.deque[Frame] = collections.deque()
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | None = None) -> AsyncControlClient:
        resolved = control_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, resolved)
        except OSError as exc:
            sock.close()
            raise _control_connect_error(resolved, exc) from exc
        return cls(AsyncFrameChannel(sock), resolved)

    async def request(self, op: str, /, **fields: Any) -> Frame:
        return await self.call(op, fields)

    async def call(
        self,
        op: str,
        fields: Mapping[str, Any],
        *,
        fds: Sequence[int] = (),
        wait_s: float | None = DEFAULT_REPLY_TIMEOUT_S,
        subject: str | None = None,
    ) -> Frame:
        async with self._lock:
            request_id = next(self._ids)
            try:
                await self.channel.write_frame({**fields, "op": op, "id": request_id}, fds)
            except (BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                raise self._lost(exc) from exc
            try:
                async with asyncio.timeout(wait_s):
                    while True:
                        frame = await self._read()
                        if "id" not in frame.message:
                            self._events.append(self._checked_event(frame))
                            continue
                        break
            except TimeoutError as exc:
                # The answer may still come; we cannot match it reliably any more.
                self.close()
                raise os_error(
                    errno.ETIMEDOUT,
                    f"{subject or op}: no answer from servald within {wait_s} s ({self.path})",
                ) from exc
            try:
                validate_response(frame.message)
                if frame.message["id"] != request_id:
                    raise ControlProtocolError(
                        f"response id {frame.message['id']} does not match request {request_id}"
                    )
            except ControlProtocolError:
                close_fds(frame.fds)
                self.close()
                raise
            if not frame.message["ok"]:
                close_fds(frame.fds)
                raise error_from_response(frame.message["error"], subject)
            return frame

    async def next_event(self) -> Frame | None:
        """The next pushed event; None when servald closed the connection."""
        if self._events:
            return self._events.popleft()
        while True:
            try:
                frame = await self._read()
            except ServalConnectionAbortedError:
                return None
            if "id" in frame.message:
                close_fds(frame.fds)
                continue
            return self._checked_event(frame)

    def close(self) -> None:
        self.channel.close()
        while self._events:
            close_fds(self._events.popleft().fds)

    async def _read(self) -> Frame:
        try:
            frame = await self.channel.read_frame()
        except ControlProtocolError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise self._lost(exc) from exc
        if frame is None:
            self.close()
            raise self._lost(None)
        return frame

    def _lost(self, exc: OSError | None) -> ServalOSError:
        detail = f": {exc.strerror or exc}" if exc is not None else ""
        return os_error(
            errno.ECONNABORTED, f"servald at {self.path} closed the control connection{detail}"
        )

    def _checked_event(self, frame: Frame) -> Frame:
        try:
            validate_event(frame.message)
        except ControlProtocolError:
            close_fds(frame.fds)
            self.close()
            raise
        return frame
