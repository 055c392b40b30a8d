"""Serval sockets with the Python socket surface, talking to servald over its control API.

Theory of operation
-------------------
A `serval.socket` is a small state machine over two kinds of kernel object:

- a **control connection** to servald (`serval.control.ControlClient`), used to ask for
  things: `connect` (answered with the connected TCP fd), `listen` (after which servald pushes
  one ``accept`` event with an fd per new connection), `dgram_bind` and `sendto` (after which
  servald pushes ``datagram`` events);
- for a **connected stream socket**, the real kernel TCP socket servald built (repair or
  handshake mode, see docs) and passed with SCM_RIGHTS. All stream I/O goes straight to it
  with plain syscalls: `fileno()` returns it, so it is pollable, spliceable and as fast as any
  TCP socket. The control connection used to set it up is closed.

`fileno()` therefore means: the TCP fd for a connected stream socket; the control connection
for a listener or a datagram socket (it becomes readable when servald pushes an accept or a
datagram, so select/poll work; events read while waiting for a `sendto` answer are queued in
user space, see `pending()`); -1 before anything was opened.

Blocking behaviour follows the stdlib: `settimeout(None)` blocks, `settimeout(t)` raises
TimeoutError after t seconds, `setblocking(False)` raises BlockingIOError instead of waiting.
A non-blocking `connect()` sends the request and raises BlockingIOError(EINPROGRESS); the
socket's `fileno()` (the control connection meanwhile) becomes *readable* when servald has
answered, and calling `connect()` again completes it (EALREADY while still pending). When it
completes, `fileno()` becomes the TCP fd.

Errors are the usual exceptions (ConnectionRefusedError, TimeoutError, OSError with errno,
...) and at the same time `serval.errors.ServalError`; their message names the serviceID.

Migration (docs/migration.md)
-----------------------------
When servald offers it (``"migratable": true`` in the connect reply or accept event), a
connected stream socket opens one more control connection and sends ``watch`` with its fd.
One agent thread per process serves all such connections: on ``park`` it closes the socket's
`_Gate` (stream calls in progress are woken through a pipe and wait; bytes already queued are
read into the gate, to be returned first), acknowledges, and on ``swap`` installs the new
socket under the same fd number (dup3); reads go on at once, writes after ``resume``. So a
thread blocked in recv() sleeps through a migration and continues on the new socket. Watched
sockets do their waiting in `_Gate.call` (poll on the socket and the wake pipe), never inside
the stdlib call. ``$SERVAL_MIGRATION=0`` opts out.

servald hands the watcher the flow's sealed state (watch answer, every ``resume``); the watch
keeps the latest. If servald dies, a parked socket is resumed at once and the agent tries,
every 0.2-0.5 s for up to ``$SERVAL_ADOPT_WINDOW_S`` (60 s), to hand the flow back to a
restarted servald (op ``adopt`` with the state and a duplicate of the fd); the flow can then
migrate again. `socket.watch_status()` says whether a stream is watched and was adopted.
`socket._adopt_fd` remains for engines that drive their own swap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import os
import select
import selectors
import socket as _stdsocket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from serval.control import (
    DEFAULT_REPLY_TIMEOUT_S,
    ControlClient,
    Frame,
    close_fds,
    get_field,
    get_optional_field,
    os_error,
)
from serval.core.ids import ServiceID
from serval.errors import ControlProtocolError, ServalError, ServiceIDError
from serval.host.repair import in_repair_mode

__all__ = [
    "MAX_DATAGRAM_BYTES",
    "SOCK_DGRAM",
    "SOCK_STREAM",
    "ConnectionInfo",
    "ServalAddress",
    "ServiceLike",
    "WatchStatus",
    "create_connection",
    "socket",
    "to_service",
]

SOCK_STREAM = _stdsocket.SOCK_STREAM
SOCK_DGRAM = _stdsocket.SOCK_DGRAM

# Largest unconnected datagram: its base64 form plus the JSON around it must fit in one
# 64 KiB control frame (65536 * 3/4 = 49152, minus room for the keys and a 64-digit ID).
MAX_DATAGRAM_BYTES = 48000
DEFAULT_BACKLOG = 128
# servald answers a connect within the timeout it was given; this margin covers the control
# round trip and the daemon's own scheduling, so its ETIMEDOUT (naming the service) wins.
CONNECT_REPLY_MARGIN_S = 2.0

ServiceLike = ServiceID | str


class ServalAddress(NamedTuple):
    """The Serval name of one end: its serviceID (None when it has none, e.g. a client) and
    the IP address of its host. `instance` says which host served a `connect`."""

    service: ServiceID | None
    address: str | None
    instance: str | None = None


@dataclass(frozen=True)
class ConnectionInfo:
    """What servald reported about a connected stream: flow, both ends, establishment mode."""

    flow: int | None
    peer: ServalAddress
    service: ServiceID | None  # the service we connected to / accepted on
    local: tuple[str, int] | None  # the kernel TCP endpoints of the real socket
    remote: tuple[str, int] | None
    mode: str | None  # "repair" or "handshake"
    proxy: Mapping[str, Any] | None = None  # translator: the original client, when given
    migratable: bool = False  # servald can migrate it: whoever owns the fd may `watch` it

    @classmethod
    def from_message(cls, message: Mapping[str, Any], service: ServiceID | None) -> ConnectionInfo:
        peer = message.get("peer")
        peer_map: Mapping[str, Any] = peer if isinstance(peer, Mapping) else {}
        service_text = message.get("service")
        if isinstance(service_text, str):
            service = _parse_reported(service_text, "service")
        proxy = message.get("proxy")
        return cls(
            flow=get_optional_field(message, "flow", int),
            peer=ServalAddress(
                _parse_reported(peer_map.get("service"), "peer.service"),
                _optional_str(peer_map, "address"),
                _optional_str(peer_map, "instance"),
            ),
            service=service,
            local=_endpoint(message.get("local"), "local"),
            remote=_endpoint(message.get("remote"), "remote"),
            mode=get_optional_field(message, "mode", str),
            proxy=proxy if isinstance(proxy, Mapping) else None,
            migratable=message.get("migratable") is True,
        )


def _optional_str(message: Mapping[str, Any], name: str) -> str | None:
    return get_optional_field(message, name, str)


def _parse_reported(text: object, name: str) -> ServiceID | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ControlProtocolError(f"field {name!r} must be a serviceID string", framing_lost=False)
    try:
        return ServiceID.parse(text)
    except ServiceIDError as exc:
        raise ControlProtocolError(f"field {name!r}: {exc}", framing_lost=False) from exc


def _endpoint(value: object, name: str) -> tuple[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ControlProtocolError(f"field {name!r} must be an object", framing_lost=False)
    return get_field(value, "address", str), get_field(value, "port", int)


# -- migration: park, swap, resume (docs/migration.md) ----------------------------------------

MIGRATION_ENV = "SERVAL_MIGRATION"  # "0": never watch (no migration, one control connection less)
PARK_QUIESCE_S = 0.5  # an application call leaves the kernel within this (it polls the wake pipe)
MAX_DRAIN_READS = 4096
DRAIN_CHUNK_BYTES = 1 << 20

# Handing a flow back to a restarted servald (op ``adopt``, docs/control-api.md): how long to
# keep trying after the watch connection ended (``$SERVAL_ADOPT_WINDOW_S`` overrides; 0 turns
# it off), the pause between attempts (growing from the first to the last value), how long one
# attempt may wait for servald's answer, and how long a socket the dead servald left frozen
# (TCP_REPAIR on: it fails every read and write) stays parked waiting for the restarted one
# to thaw it before the stream is failed.
ADOPT_WINDOW_ENV = "SERVAL_ADOPT_WINDOW_S"
DEFAULT_ADOPT_WINDOW_S = 60.0
ADOPT_FIRST_RETRY_S = 0.2
ADOPT_MAX_RETRY_S = 0.5
ADOPT_BACKOFF_FACTOR = 1.5
ADOPT_REPLY_TIMEOUT_S = 5.0
HOLD_FROZEN_S = 30.0
# servald's answers that say this state will never be taken (another key, another socket,
# the flow live already, no TCP_REPAIR there): stop trying. Anything else is tried again.
ADOPT_FINAL_ERRNOS = frozenset({errno.EINVAL, errno.EEXIST, errno.ENOTSOCK, errno.ENOTCONN,
                                errno.EOPNOTSUPP})


def adopt_window_s() -> float:
    """How long a watch tries to hand its flow back after losing servald."""
    text = os.environ.get(ADOPT_WINDOW_ENV)
    if text is None:
        return DEFAULT_ADOPT_WINDOW_S
    try:
        return max(0.0, float(text))
    except ValueError:
        return DEFAULT_ADOPT_WINDOW_S


class AdoptSchedule:
    """When to try the next `adopt` after losing servald: bounded backoff, bounded total."""

    def __init__(self, now: float) -> None:
        self.deadline = now + adopt_window_s()
        self.pause_s = ADOPT_FIRST_RETRY_S
        self.next_at = now + self.pause_s

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def failed(self, now: float) -> None:
        self.pause_s = min(self.pause_s * ADOPT_BACKOFF_FACTOR, ADOPT_MAX_RETRY_S)
        self.next_at = now + self.pause_s


def adopt_gives_up(exc: BaseException) -> bool:
    """Whether a failed `adopt` is final (else: servald not back yet, try again)."""
    return isinstance(exc, OSError) and exc.errno in ADOPT_FINAL_ERRNOS


def abort_on_close(fd: int) -> None:
    """The stream lost bytes: make its close a reset, so the peer cannot take the end of a
    stream with a hole in it for a clean end."""
    try:
        with _stdsocket.socket(fileno=os.dup(fd)) as sock:
            sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER,
                            struct.pack("ii", 1, 0))
    except OSError:
        pass


INTERRUPTED_MIGRATION = "servald died between the swap and the resume of a migration " \
    "(bytes the peer lacks died with it)"
FROZEN_TOO_LONG = f"servald died during a migration and left the socket frozen; no " \
    f"restarted servald took it back within {HOLD_FROZEN_S:g} s"


@dataclass(frozen=True)
class WatchStatus:
    """Whether servald can migrate a connected stream now, and what happened so far."""

    watched: bool  # a control connection to servald watches the flow
    migrations: int  # moves completed under this socket
    adoptions: int  # times a restarted servald took the flow back (op adopt)
    state_kept: bool  # we hold a sealed state to hand back after a servald restart


class _Gate:
    """Parks one connected stream's I/O while servald migrates it.

    States: ``open``; ``parking`` (no new system call may start; calls in progress are woken
    through the wake pipe and leave); ``parked`` (the socket is frozen: nothing touches it);
    ``reading`` (swapped: reads go on, writes wait for the bytes the peer lacks, which servald
    writes first); back to ``open``. Bytes read while parking (the input is already locked,
    so this ends) are kept here and served before anything new.
    """

    def __init__(self, sock: _stdsocket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cond = threading.Condition()
        self.state = "open"
        self.active = 0
        self.buffer = bytearray()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.migrations = 0

        self.failure: str | None = None  # set with state "failed": every call raises

    def blocks(self, writing: bool) -> bool:
        return self.state in ("parking", "parked") or (writing and self.state == "reading")

    # -- the agent's side ----------------------------------------------------------------------

    def park(self) -> None:
        with self.cond:
            self.state = "parking"
            try:
                os.write(self.wake_w, b"p")
            except BlockingIOError:
                pass
            deadline = time.monotonic() + PARK_QUIESCE_S
            while self.active and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            for _ in range(MAX_DRAIN_READS):
                try:
                    chunk = self.sock.recv(DRAIN_CHUNK_BYTES, _stdsocket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # e.g. reset: the application will see it on its next call
                if not chunk:
                    break
                self.buffer += chunk
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self.state = "parked"

    def swap(self, new_fd: int) -> None:
        with self.cond:
            # dup3: same fd number, close-on-exec kept; the file's O_NONBLOCK came along.
            os.dup2(new_fd, self.fd, inheritable=False)
            os.close(new_fd)
            self.migrations += 1
            self.state = "reading"
            self.cond.notify_all()

    def resume(self) -> None:
        with self.cond:
            self.state = "open"
            self.cond.notify_all()

    def fail(self, reason: str) -> None:
        """The stream cannot go on intact: every call from now on raises ECONNABORTED."""
        abort_on_close(self.fd)
        with self.cond:
            self.state = "failed"
            self.failure = reason
            self.buffer.clear()
            self.cond.notify_all()
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            os.write(self.wake_w, b"f")  # a call waiting in poll() leaves and sees it

    def close(self) -> None:
        with self.cond:
            if self.state != "failed":
                self.state = "open"
            self.cond.notify_all()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the application's side ----------------------------------------------------------------

    def call(self, writing: bool, attempt: Any, timeout: float | None, what: str) -> Any:
        """Run `attempt()` (a non-blocking system call) under the gate, waiting for the socket
        (readiness or the end of a migration) as the socket's timeout says."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.cond:
                if self.failure is not None:
                    raise os_error(errno.ECONNABORTED, f"{what}: {self.failure}")
                while self.blocks(writing):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if timeout == 0.0:
                        raise os_error(errno.EAGAIN, f"{what}: migration in progress")
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError("timed out")
                    self.cond.wait(remaining)
                if self.failure is not None:
                    raise os_error(errno.ECONNABORTED, f"{what}: {self.failure}")
                if not writing and self.buffer:
                    return None  # the caller serves from the buffer
                self.active += 1
            try:
                try:
                    return attempt()
                except (BlockingIOError, InterruptedError):
                    if timeout == 0.0:
                        raise
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("timed out") from None
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT if writing else select.POLLIN)
                poller.register(self.wake_r, select.POLLIN)
                poller.poll(None if remaining is None else remaining * 1000)
            finally:
                with self.cond:
                    self.active -= 1
                    self.cond.notify_all()

    def take(self, size: int, peek: bool) -> bytes:
        with self.cond:
            data = bytes(self.buffer[:size])
            if not peek:
                del self.buffer[:size]
            return data


class _Watch:
    """One connected stream's `watch` connection to servald (see `_MigrationAgent`).

    It keeps the flow's latest sealed state (from the watch answer and every ``resume``).
    When the connection ends while the socket is open -- servald died -- the agent resumes
    a parked socket at once and then, for up to `adopt_window_s`, tries to hand the flow
    back to a restarted servald (`try_adopt`); the new connection then serves its
    migrations. Without a state (a servald without the hand-back) the socket just carries
    on unwatched, as before.
    """

    def __init__(self, gate: _Gate, control: ControlClient, flow: int,
                 state: str | None) -> None:
        self.gate = gate
        self.control: ControlClient | None = control
        self.control_path = control.path
        self.flow = flow
        self.state = state
        self.adoptions = 0
        self.schedule: AdoptSchedule | None = None  # set while trying to adopt
        self.hold_until: float | None = None  # parked on a frozen socket, waiting for adopt
        # `released` (the application closed or detached the socket) is set under `lock`
        # before the fd is closed, so `try_adopt` never duplicates a closed or reused number.
        self.lock = threading.Lock()
        self.released = False

    @property
    def watching(self) -> bool:
        control = self.control
        return control is not None and not control.closed

    def status(self) -> WatchStatus:
        return WatchStatus(self.watching, self.gate.migrations, self.adoptions,
                           self.state is not None)

    def keep_state(self, message: Mapping[str, Any]) -> None:
        state = message.get("state")
        if isinstance(state, str) and state:
            self.state = state

    def service(self) -> bool:
        """Handle what servald pushed; False when the connection is gone."""
        control = self.control
        if control is None:
            return False
        while True:
            try:
                frame = control.poll_event()
            except (OSError, ServalError):
                return False
            if frame is None:
                return not control.closed
            message = frame.message
            phase = message.get("phase") if message.get("event") == "migration" else None
            try:
                if phase == "park":
                    self.gate.park()
                    control.call("migration_ack", {"flow": self.flow, "phase": "park"})
                elif phase == "swap" and len(frame.fds) == 1:
                    self.gate.swap(frame.fds.pop())
                elif phase == "resume":
                    self.keep_state(message)
                    self.gate.resume()
            except (OSError, ServalError):
                return False  # servald is gone: `lost` leaves nothing parked
            finally:
                close_fds(frame.fds)

    def lost(self, now: float) -> None:
        """The watch connection ended. A parked socket goes on at once (unless the dead
        servald left it frozen: then only a restarted one can thaw it), and the hand-back
        starts if we have a state."""
        control, self.control = self.control, None
        if control is not None:
            control.close()
        gate = self.gate
        if gate.state == "reading":
            gate.fail(INTERRUPTED_MIGRATION)
            return
        keep_trying = self.state is not None and not self.released and adopt_window_s() > 0
        if gate.state in ("parking", "parked"):
            if keep_trying and in_repair_mode(gate.fd):
                self.hold_until = now + HOLD_FROZEN_S
            else:
                gate.resume()
        self.schedule = AdoptSchedule(now) if keep_trying else None

    def try_adopt(self) -> bool | None:
        """Hand the flow back to servald: True adopted, False not yet (servald not back),
        None never (refused for good, or the socket is gone)."""
        assert self.state is not None
        try:
            control = ControlClient(self.control_path, reply_timeout_s=ADOPT_REPLY_TIMEOUT_S)
        except (OSError, ServalError):
            return False
        with self.lock:
            if self.released:
                control.close()
                return None
            try:
                copy = os.dup(self.gate.fd)
            except OSError:
                control.close()
                return None
        try:
            answer = control.call("adopt", {"state": self.state}, fds=[copy])
        except (OSError, ServalError) as exc:
            control.close()
            return None if adopt_gives_up(exc) else False
        finally:
            os.close(copy)  # servald holds its own copy now (or refused it)
        close_fds(answer.fds)
        self.keep_state(answer.message)
        self.control = control
        self.adoptions += 1
        self.schedule = None
        if self.hold_until is not None:  # servald thawed the socket: it goes on
            self.hold_until = None
            self.gate.resume()
        return True

    def give_up(self, reason: str | None = None) -> None:
        """No servald took the flow back: it carries on unwatched (or fails if frozen)."""
        self.schedule = None
        self.state = None
        if self.hold_until is not None:
            self.hold_until = None
            self.gate.fail(reason or FROZEN_TOO_LONG)

    def release(self) -> None:
        """The application closes (or detaches) the socket: never touch its fd again."""
        with self.lock:
            self.released = True

    def close(self) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.close()
        self.gate.close()


class _MigrationAgent:
    """One thread per process serving every watch: parks and resumes sockets even while the
    application is not in a call (an idle socket must not hold a migration up), and hands
    flows back to a restarted servald (`_Watch.try_adopt`)."""

    _instance: _MigrationAgent | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: list[tuple[str, _Watch]] = []
        self._adopting: set[_Watch] = set()  # lost servald, trying to hand the flow back
        self._thread = threading.Thread(target=self._run, name="serval-migration",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _MigrationAgent:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def add(self, watch: _Watch) -> None:
        self._change("add", watch)

    def remove(self, watch: _Watch) -> None:
        self._change("remove", watch)

    def _change(self, what: str, watch: _Watch) -> None:
        with self._lock:
            self._pending.append((what, watch))
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass

    def _run(self) -> None:
        while True:
            for key, _mask in self._selector.select(timeout=self._next_timeout()):
                watch = key.data
                if watch is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                if not watch.service():
                    self._lost(watch)
            with self._lock:
                pending, self._pending = self._pending, []
            for what, watch in pending:
                if what == "add":
                    self._register(watch)
                elif what == "remove":
                    self._unregister(watch)
                    self._adopting.discard(watch)
                    watch.close()
            self._adopt_due()

    def _register(self, watch: _Watch) -> None:
        control = watch.control
        if control is None or control.closed:
            return
        try:
            self._selector.register(control.fileno(), selectors.EVENT_READ, watch)
        except (KeyError, ValueError, OSError):
            return
        if not watch.service():  # events that arrived with the watch (adopt) answer
            self._lost(watch)

    def _unregister(self, watch: _Watch) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is watch:
                self._selector.unregister(key.fileobj)

    def _lost(self, watch: _Watch) -> None:
        self._unregister(watch)  # before the fd closes: its number may be reused
        watch.lost(time.monotonic())
        if watch.schedule is not None:
            self._adopting.add(watch)

    def _next_timeout(self) -> float | None:
        times = [t for watch in self._adopting
                 for t in (watch.schedule.next_at if watch.schedule else None, watch.hold_until)
                 if t is not None]
        return None if not times else max(0.0, min(times) - time.monotonic())

    def _adopt_due(self) -> None:
        for watch in list(self._adopting):
            now = time.monotonic()
            if watch.hold_until is not None and now >= watch.hold_until:
                self._adopting.discard(watch)
                watch.give_up(FROZEN_TOO_LONG)
                continue
            schedule = watch.schedule
            if schedule is None:
                self._adopting.discard(watch)
                continue
            if now < schedule.next_at:
                continue
            outcome = watch.try_adopt()
            now = time.monotonic()
            if outcome is True:
                self._adopting.discard(watch)
                self._register(watch)
            elif outcome is None or schedule.expired(now):
                self._adopting.discard(watch)
                watch.give_up()
            else:
                schedule.failed(now)


def _start_watch(sock: _stdsocket.socket, flow: int | None,
                 control_path: str | None) -> tuple[_Gate, _Watch] | None:
    """Ask servald to include this socket in its flow's migrations; None when it cannot
    (no TCP_REPAIR there, an old servald) or when $SERVAL_MIGRATION is "0"."""
    if flow is None or os.environ.get(MIGRATION_ENV, "1") == "0":
        return None
    gate = _Gate(sock)
    try:
        control = ControlClient(control_path)
    except (OSError, ServalError):
        gate.close()
        return None
    try:
        answer = control.call("watch", {"events": ["migration"], "flow": flow},
                              fds=[sock.fileno()])
    except (OSError, ServalError):
        # Migration is an extra: without it the stream works exactly as before.
        control.close()
        gate.close()
        return None
    close_fds(answer.fds)
    state = answer.message.get("state")
    watch = _Watch(gate, control, flow, state if isinstance(state, str) and state else None)
    _MigrationAgent.get().add(watch)
    return gate, watch


def to_service(service: ServiceLike) -> ServiceID:
    """A serviceID from a `ServiceID` or any text form `ServiceID.parse` accepts."""
    if isinstance(service, ServiceID):
        return service
    if isinstance(service, str):
        return ServiceID.parse(service)
    raise TypeError(f"a serviceID must be a ServiceID or str, not {type(service).__name__}")


def _subject(service: ServiceLike) -> str:
    """How error messages name a service: as the user wrote it."""
    return f"service {service}"


class socket:  # lower-case like socket.socket: used as `serval.socket(...)`
    """A Serval socket: `serval.socket(serval.SOCK_STREAM)` or `serval.socket(serval.SOCK_DGRAM)`.

    `control_socket` overrides the control socket path ($SERVAL_CONTROL_SOCKET, then
    /run/serval/servald.sock).
    """

    def __init__(self, type: int = SOCK_STREAM, *, control_socket: str | None = None) -> None:
        if type not in (SOCK_STREAM, SOCK_DGRAM):
            raise ValueError(f"serval sockets are SOCK_STREAM or SOCK_DGRAM, not {type!r}")
        self._type = type
        self._control_path = control_socket
        self._timeout: float | None = _stdsocket.getdefaulttimeout()
        self._lock = threading.RLock()
        self._control: ControlClient | None = None
        self._sock: _stdsocket.socket | None = None  # connected stream: the real TCP socket
        self._bound: ServiceID | None = None
        self._listening = False
        self._peer: ServalAddress | None = None
        self._connecting: tuple[int, ServiceLike, ServiceID] | None = None
        self._closed = False
        self._accepted = False
        self.info: ConnectionInfo | None = None  # connected streams: what servald reported
        self._gate: _Gate | None = None  # connected and watched: migrations park its I/O
        self._watch: _Watch | None = None

    # -- identity ---------------------------------------------------------------------------------

    @property
    def type(self) -> int:
        return self._type

    def fileno(self) -> int:
        """The TCP fd when connected, the control connection for listeners and datagram
        sockets (readable when an accept/datagram is pending), -1 otherwise."""
        if self._sock is not None:
            return self._sock.fileno()
        if self._control is not None:
            return self._control.fileno()
        return -1

    def getsockname(self) -> ServalAddress:
        """Our serviceID (bound, listening, or the one a connection was accepted on) and,
        when connected, our host's address."""
        self._check_open()
        if self.info is None:
            return ServalAddress(self._bound, None)
        local_address = self.info.local[0] if self.info.local else None
        return ServalAddress(self.info.service if self._accepted else self._bound, local_address)

    def watch_status(self) -> WatchStatus:
        """Whether servald can migrate this connected stream now (it is watched), how many
        moves and servald restarts (hand-backs) it went through."""
        watch = self._watch
        if watch is None:
            return WatchStatus(False, 0, 0, False)
        return watch.status()

    def getpeername(self) -> ServalAddress:
        """The peer's serviceID and address (ENOTCONN when not connected)."""
        self._check_open()
        if self._peer is None:
            raise os_error(errno.ENOTCONN, "serval socket is not connected")
        return self._peer

    # -- timeouts ---------------------------------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None:
            timeout = float(timeout)
            if timeout < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = timeout
        if self._sock is not None:
            self._sock.settimeout(self._kernel_timeout())

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    # -- stream: client ---------------------------------------------------------------------------

    def connect(self, service: ServiceLike, *, mode: str | None = None) -> None:
        """Connect to a service. `mode` forces ``repair`` or ``handshake`` establishment."""
        with self._lock:
            self._check_open()
            if self._type == SOCK_DGRAM:
                self._peer = ServalAddress(to_service(service), None)
                self._ensure_dgram_bound()
                return
            if self._sock is not None:
                raise os_error(errno.EISCONN, f"serval socket is already connected to {self._peer}")
            if self._connecting is not None:
                self._continue_connect()
                return
            if self._listening:
                raise os_error(errno.EINVAL, "a listening serval socket cannot connect")
            target = to_service(service)
            fields: dict[str, Any] = {"service": str(target), "type": "stream"}
            if self._bound is not None:
                # Bound first: the SYN names our serviceID (SOURCE extension), and the peer's
                # accept reports it as the connection's source service.
                fields["source"] = str(self._bound)
            if self._timeout:
                fields["timeout_s"] = self._timeout
            if mode is not None:
                fields["mode"] = mode
            control = ControlClient(self._control_path)
            self._control = control
            try:
                request_id = control.start("connect", fields)
            except BaseException:
                self._drop_control()
                raise
            self._connecting = (request_id, service, target)
            if self._timeout == 0.0:
                raise os_error(errno.EINPROGRESS, f"{_subject(service)}: connect in progress")
            self._continue_connect()

    def connect_ex(self, service: ServiceLike) -> int:
        """Like connect, but returns an errno (0 on success) instead of raising OSError."""
        try:
            self.connect(service)
        except OSError as exc:
            return exc.errno if exc.errno is not None else errno.EIO
        return 0

    def _continue_connect(self) -> None:
        assert self._connecting is not None and self._control is not None
        request_id, service, target = self._connecting
        if self._timeout == 0.0 and not self._control.answered(request_id):
            raise os_error(errno.EALREADY, f"{_subject(service)}: connect still in progress")
        wait_s = None if self._timeout is None else self._timeout + CONNECT_REPLY_MARGIN_S
        try:
            frame = self._control.finish(request_id, wait_s=wait_s, subject=_subject(service))
        except BaseException:
            self._connecting = None
            self._drop_control()
            raise
        self._connecting = None
        # The control connection has done its job (see the migration seam in the module doc).
        self._drop_control()
        self._become_connected(frame, target, accepted=False)

    def _become_connected(self, frame: Frame, service: ServiceID | None, *, accepted: bool) -> None:
        if len(frame.fds) != 1:
            close_fds(frame.fds)
            raise ControlProtocolError(f"expected one TCP fd from servald, got {len(frame.fds)}")
        try:
            info = ConnectionInfo.from_message(frame.message, service)
        except BaseException:
            close_fds(frame.fds)
            raise
        sock = _stdsocket.socket(fileno=frame.fds[0])
        self._sock = sock
        self.info = info
        watched = _start_watch(sock, info.flow, self._control_path) \
            if info.migratable else None
        if watched is not None:
            self._gate, self._watch = watched
        sock.settimeout(self._kernel_timeout())
        self._accepted = accepted
        peer = info.peer
        if not accepted and peer.service is None:
            peer = peer._replace(service=service)
        self._peer = peer

    # -- stream: server ---------------------------------------------------------------------------

    def bind(self, service: ServiceLike) -> None:
        """Bind to a serviceID. Streams register it at `listen()`; datagrams at once."""
        with self._lock:
            self._check_open()
            if self._bound is not None:
                raise os_error(errno.EINVAL, f"serval socket is already bound to {self._bound}")
            target = to_service(service)
            if self._type == SOCK_DGRAM:
                self._dgram_bind(target, service)
            else:
                self._bound = target

    def listen(
        self, backlog: int = DEFAULT_BACKLOG, *, weight: int = 1, priority: int = 0
    ) -> None:
        """Start serving the bound serviceID; `weight` and `priority` steer anycast to us."""
        with self._lock:
            self._check_open()
            if self._type != SOCK_STREAM:
                raise os_error(errno.EOPNOTSUPP, "listen() needs a SOCK_STREAM serval socket")
            if self._bound is None:
                raise os_error(errno.EDESTADDRREQ, "bind() a serviceID before listen()")
            if self._listening:
                return
            control = ControlClient(self._control_path)
            self._control = control
            fields = {
                "service": str(self._bound),
                "type": "stream",
                "backlog": max(1, min(int(backlog), 65535)),
                "weight": weight,
                "priority": priority,
            }
            try:
                control.call("listen", fields, subject=_subject(self._bound))
            except BaseException:
                self._drop_control()
                raise
            self._listening = True

    def accept(self) -> tuple[socket, ServalAddress]:
        """The next connection and the peer's (serviceID, address)."""
        self._check_open()
        control = self._control
        if not self._listening or control is None:
            raise os_error(errno.EINVAL, "accept() needs a listening serval socket")
        subject = _subject(self._bound) if self._bound else "listener"
        while True:
            frame = self._next_event(control, subject)
            if frame.message.get("event") != "accept":
                close_fds(frame.fds)  # not ours to handle (future event kinds)
                continue
            conn = socket(SOCK_STREAM, control_socket=self._control_path)
            conn.settimeout(_stdsocket.getdefaulttimeout())
            conn._become_connected(frame, self._bound, accepted=True)
            return conn, conn.getpeername()

    def _next_event(self, control: ControlClient, subject: str) -> Frame:
        # No socket lock is held while waiting: like a kernel socket, one thread may block
        # in accept()/recvfrom() while another sends or closes (close wakes it with EBADF).
        if self._timeout == 0.0:
            frame = control.poll_event()
            if frame is None:
                raise os_error(errno.EAGAIN, f"{subject}: nothing pending")
            return frame
        return control.next_event(self._timeout)

    def pending(self) -> int:
        """Events (accepts, datagrams) already read into user space and not yet taken."""
        return 0 if self._control is None else self._control.pending_events

    # -- stream I/O: straight to the kernel TCP socket --------------------------------------------

    def _stream(self) -> _stdsocket.socket:
        if self._sock is None:
            self._check_open()
            raise os_error(errno.ENOTCONN, "serval socket is not connected")
        return self._sock

    def _kernel_timeout(self) -> float | None:
        """The timeout of the kernel socket object. A watched socket does its own waiting
        (`_Gate.call` polls the socket and the wake pipe), so its calls must never block or
        poll inside the stdlib: a positive timeout becomes a non-blocking file there."""
        if self._gate is None or self._timeout is None:
            return self._timeout
        return 0.0

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        if self._type == SOCK_DGRAM:
            return self.sendto(data, self._dgram_peer())
        sock = self._stream()
        gate = self._gate
        if gate is None:
            return sock.send(data, flags)
        sent: int = gate.call(True, lambda: sock.send(data, flags | _stdsocket.MSG_DONTWAIT),
                              self._timeout, "send")
        return sent

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        if self._type == SOCK_DGRAM:
            self.sendto(data, self._dgram_peer())
            return
        if self._gate is None:
            self._stream().sendall(data, flags)
            return
        view = memoryview(data).cast("B")
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while view:
                if deadline is not None and timeout:
                    self._timeout = max(deadline - time.monotonic(), 1e-6)
                view = view[self.send(view, flags):]
        finally:
            self._timeout = timeout

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._type == SOCK_DGRAM:
            return self.recvfrom(bufsize)[0]
        sock = self._stream()
        gate = self._gate
        if gate is None:
            return sock.recv(bufsize, flags)
        data: bytes | None = gate.call(
            False, lambda: sock.recv(bufsize, flags | _stdsocket.MSG_DONTWAIT), self._timeout,
            "recv")
        if data is None:  # bytes drained while parking come first
            return gate.take(bufsize, bool(flags & _stdsocket.MSG_PEEK))
        return data

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, flags: int = 0) -> int:
        if self._type == SOCK_DGRAM:
            data, _ = self.recvfrom(nbytes or len(buffer))
            memoryview(buffer)[: len(data)] = data
            return len(data)
        if self._gate is None:
            return self._stream().recv_into(buffer, nbytes, flags)
        data = self.recv(nbytes or len(buffer), flags)
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def shutdown(self, how: int) -> None:
        self._stream().shutdown(how)

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self._stream().setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> int | bytes:
        if buflen:
            return self._stream().getsockopt(level, option, buflen)
        return self._stream().getsockopt(level, option)

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        """A file object on the TCP socket (as socket.makefile)."""
        return self._stream().makefile(mode, buffering, **kwargs)  # type: ignore[call-overload]

    # -- datagrams ----------------------------------------------------------------------------

    def _dgram_peer(self) -> ServalAddress:
        if self._peer is None:
            raise os_error(errno.EDESTADDRREQ, "serval datagram socket has no default peer")
        return self._peer

    def _dgram_bind(self, target: ServiceID | None, named: ServiceLike | None) -> None:
        if self._control is None:
            self._control = ControlClient(self._control_path)
        fields = {} if target is None else {"service": str(target)}
        subject = _subject(named) if named is not None else "datagram autobind"
        try:
            frame = self._control.call("dgram_bind", fields, subject=subject)
        except BaseException:
            if self._bound is None:
                self._drop_control()
            raise
        reported = _parse_reported(frame.message.get("service"), "service")
        self._bound = reported if reported is not None else target

    def _ensure_dgram_bound(self) -> ControlClient:
        if self._bound is None:
            self._dgram_bind(None, None)
        assert self._control is not None
        return self._control

    def sendto(
        self, data: bytes | bytearray | memoryview, address: ServiceLike | ServalAddress
    ) -> int:
        """Send one unconnected datagram to a service, resolved hop by hop.

        `address` may be a `ServalAddress` from `recvfrom`: its host address then goes along
        as a hint, so replies reach an autobound (unregistered) sender directly.
        """
        with self._lock:
            self._check_open()
            if self._type != SOCK_DGRAM:
                raise os_error(errno.EOPNOTSUPP, "sendto() needs a SOCK_DGRAM serval socket")
            hint: str | None = None
            if isinstance(address, ServalAddress):
                if address.service is None:
                    raise os_error(errno.EDESTADDRREQ, f"{address} has no serviceID to send to")
                service: ServiceLike = address.service
                hint = address.address
            else:
                service = address
            target = to_service(service)
            payload = bytes(data)
            if len(payload) > MAX_DATAGRAM_BYTES:
                raise os_error(
                    errno.EMSGSIZE,
                    f"{_subject(service)}: datagram of {len(payload)} bytes is larger than "
                    f"{MAX_DATAGRAM_BYTES}",
                )
            control = self._ensure_dgram_bound()
        fields: dict[str, Any] = {
            "service": str(target),
            "data": base64.b64encode(payload).decode("ascii"),
        }
        if hint is not None:
            fields["address"] = hint
        # servald answers a sendto at once (resolution is hop by hop, nothing waits for the
        # peer); the floor keeps a short socket timeout from abandoning a healthy request.
        wait_s = DEFAULT_REPLY_TIMEOUT_S if self._timeout is None else max(self._timeout, 1.0)
        control.call("sendto", fields, wait_s=wait_s, subject=_subject(service))
        return len(payload)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, ServalAddress]:
        """The next datagram (cut to `bufsize`, like UDP) and its sender."""
        self._check_open()
        if self._type != SOCK_DGRAM:
            data = self._stream().recv(bufsize, flags)
            return data, self.getpeername()
        control = self._control
        if self._bound is None or control is None:
            raise os_error(errno.EINVAL, "bind() or sendto() before recvfrom()")
        subject = _subject(self._bound)
        while True:
            frame = self._next_event(control, subject)
            close_fds(frame.fds)
            if frame.message.get("event") != "datagram":
                continue
            return self._parse_datagram(frame.message, bufsize)

    def recvfrom_into(
        self, buffer: bytearray | memoryview, nbytes: int = 0, flags: int = 0
    ) -> tuple[int, ServalAddress]:
        data, source = self.recvfrom(nbytes or len(buffer), flags)
        memoryview(buffer)[: len(data)] = data
        return len(data), source

    @staticmethod
    def _parse_datagram(message: Mapping[str, Any], bufsize: int) -> tuple[bytes, ServalAddress]:
        source = get_field(message, "source", dict)
        try:
            data = base64.b64decode(get_field(message, "data", str), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ControlProtocolError(f"datagram 'data' is not base64: {exc}") from exc
        sender = ServalAddress(
            _parse_reported(source.get("service"), "source.service"),
            _optional_str(source, "address"),
        )
        return data[:bufsize], sender

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; a listener or datagram binding ends with its control connection."""
        self._closed = True
        self._drop_control()
        self._drop_watch()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._listening = False
        self._connecting = None

    def detach(self) -> int:
        """For a connected stream: give up the TCP fd without closing it (returns it)."""
        sock = self._stream()
        self._drop_watch()  # whoever takes the fd over drives its migrations (`watch`)
        self._sock = None
        self._closed = True
        return sock.detach()

    def _drop_watch(self) -> None:
        watch, self._watch = self._watch, None
        self._gate = None
        if watch is not None:
            watch.release()  # before the fd closes: a hand-back in progress must not dup it
            # The agent thread closes the watch connection (servald then drops its copy of
            # the socket) and the gate: it may be in the middle of parking this very socket.
            _MigrationAgent.get().remove(watch)

    def _drop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control.close()

    def _check_open(self) -> None:
        if self._closed:
            raise os_error(errno.EBADF, "serval socket is closed")

    def __enter__(self) -> socket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Like the stdlib socket: an unreferenced socket releases its fds.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        kind = "SOCK_STREAM" if self._type == SOCK_STREAM else "SOCK_DGRAM"
        if self._closed:
            state = "closed"
        elif self._sock is not None:
            state = f"connected fd={self._sock.fileno()} peer={self._peer}"
        elif self._listening:
            state = f"listening on {self._bound}"
        elif self._bound is not None:
            state = f"bound to {self._bound}"
        else:
            state = "unconnected"
        return f"<serval.socket {kind} {state}>"

    # -- migration seam (see the module docstring) --------------------------------------------

    def _adopt_fd(self, new_fd: int) -> None:
        """Install `new_fd` (a rebuilt TCP socket) under this socket's fd number and close it.

        dup3 replaces the old file atomically, so a thread blocked on the number never sees a
        closed or foreign fd; close-on-exec stays set (servald-passed fds carry it) and the
        blocking mode, a file-status flag of the new file, is applied again. Parking and
        resuming the socket's own I/O around this belongs to the migration work.
        """
        sock = self._stream()
        if new_fd == sock.fileno():
            return
        os.dup2(new_fd, sock.fileno(), inheritable=False)
        os.close(new_fd)
        sock.settimeout(self._timeout)


def create_connection(
    service: ServiceLike,
    timeout: float | None = None,
    *,
    mode: str | None = None,
    control_socket: str | None = None,
) -> socket:
    """Connect a new stream socket to `service` (as socket.create_connection)."""
    sock = socket(SOCK_STREAM, control_socket=control_socket)
    try:
        sock.settimeout(timeout)
        sock.connect(service, mode=mode)
    except BaseException:
        sock.close()
        raise
    return sock
