"""asyncio helpers for Serval streams: `open_connection`, `start_server`, `connect`.

They mirror `asyncio.open_connection` / `asyncio.start_server`, with a serviceID where those
take a host and port. servald is asked over a non-blocking control connection (the event loop
never blocks), and the streams are built on the real kernel TCP socket it passes, through
`asyncio.open_connection(sock=...)`: reads and writes are plain asyncio socket I/O.

The Serval identity of a stream (peer serviceID and address, flow, establishment mode) is
`connection_info(writer)`.

Migration (docs/migration.md): when servald offers it, each stream also gets a ``watch``
connection served on the stream's own loop (`_AsyncWatch`): park pauses the transport, hands
the queued bytes to the protocol and holds writes; swap installs the new socket under the
same fd number (dup3) and resumes reading, which registers the new file with epoll; resume
releases the held writes. The application sees nothing but a short pause. If servald dies,
the watch keeps the flow's sealed state and hands the flow back to the restarted servald (op
``adopt``, as `serval.socket` does); `watch_status(writer)` says whether a stream is watched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import os
import socket as _stdsocket
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from serval.control import AsyncControlClient, Frame, close_fds, control_socket_path, os_error
from serval.core.ids import ServiceID
from serval.errors import ControlProtocolError, ServalError
from serval.host.repair import in_repair_mode
from serval.socket import (
    ADOPT_REPLY_TIMEOUT_S,
    CONNECT_REPLY_MARGIN_S,
    DEFAULT_BACKLOG,
    FROZEN_TOO_LONG,
    HOLD_FROZEN_S,
    INTERRUPTED_MIGRATION,
    AdoptSchedule,
    ConnectionInfo,
    ServiceLike,
    WatchStatus,
    abort_on_close,
    adopt_gives_up,
    adopt_window_s,
    to_service,
)

__all__ = [
    "ClientConnectedCallback",
    "Server",
    "connect",
    "connection_info",
    "open_connection",
    "start_server",
    "watch_status",
]

STREAM_LIMIT_BYTES = 2**16  # asyncio's default StreamReader buffer limit

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]

_INFO: weakref.WeakKeyDictionary[asyncio.StreamWriter, ConnectionInfo] = (
    weakref.WeakKeyDictionary()
)


def connection_info(writer: asyncio.StreamWriter) -> ConnectionInfo:
    """The Serval identity of a stream opened by this module (KeyError for others)."""
    return _INFO[writer]


# -- migration ---------------------------------------------------------------------------------

DRAIN_CHUNK_BYTES = 1 << 20
MAX_DRAIN_READS = 4096
_WATCHES: set[_AsyncWatch] = set()
_WATCH_OF: weakref.WeakKeyDictionary[asyncio.StreamWriter, _AsyncWatch] = (
    weakref.WeakKeyDictionary()
)


class _AsyncWatch:
    """Takes part in servald's migrations of one asyncio stream (docs/migration.md).

    Everything happens on the stream's event loop. park: stop the transport reading, hand
    what is already queued to the protocol (the input is locked, so this ends), hold
    writes, unregister the transport's writer, acknowledge. swap: dup3 the new socket onto
    the transport's fd number and resume reading (which registers the new file with epoll:
    the old registration vanished with the old file). resume: writes flow again, held ones
    first. Needs the selector event loop's socket transport (the default on Linux).

    It keeps the flow's latest sealed state (watch answer, every ``resume``). When the watch
    connection ends while the stream is open (servald died), a parked stream goes on at once
    and the watch tries, with backoff for up to `adopt_window_s`, to hand the flow back to a
    restarted servald (op ``adopt``), then serves migrations on that new connection.
    """

    def __init__(self, client: AsyncControlClient, sock: _stdsocket.socket,
                 writer: asyncio.StreamWriter, flow: int, state: str | None) -> None:
        self.client: AsyncControlClient | None = client
        self.control_path = client.path
        self.sock = sock
        self.fd = sock.fileno()
        self.writer = writer
        self.flow = flow
        self.state = state
        self.migrations = 0
        self.adoptions = 0
        self._parked = False
        self._swapped = False
        self._frozen_hold = False  # parked on a socket a dead servald left frozen
        self._was_reading = False
        self._had_writer = False
        self._held: list[bytes] = []

    @staticmethod
    def supported(writer: asyncio.StreamWriter) -> bool:
        transport = writer.transport
        return all(hasattr(transport, name) for name in
                   ("pause_reading", "resume_reading", "is_reading", "_write_ready",
                    "_buffer")) and hasattr(asyncio.get_running_loop(), "_add_writer")

    @property
    def watching(self) -> bool:
        return self.client is not None and not self.client.channel.closed

    def status(self) -> WatchStatus:
        return WatchStatus(self.watching, self.migrations, self.adoptions,
                           self.state is not None)

    def _keep_state(self, message: Mapping[str, Any]) -> None:
        state = message.get("state")
        if isinstance(state, str) and state:
            self.state = state

    def _stream_gone(self) -> bool:
        return self.sock.fileno() < 0 or self.writer.transport.is_closing()

    async def run(self) -> None:
        closed = asyncio.ensure_future(self.writer.wait_closed())
        # An aborted stream ends wait_closed with its error: retrieved here, not logged.
        closed.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            while True:
                await self._serve(closed)
                if closed.done() or not self._lost():
                    return
                if not await self._adopt(closed):
                    return
        finally:
            closed.cancel()
            if self.client is not None:
                self.client.close()
            _WATCHES.discard(self)

    async def _serve(self, closed: asyncio.Future[None]) -> None:
        """Handle servald's events until the connection or the stream ends."""
        client = self.client
        assert client is not None
        while True:
            event = asyncio.ensure_future(client.next_event())
            waiting: set[asyncio.Future[Any]] = {event, closed}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                event.cancel()
                return  # the application closed the stream: servald drops its copy
            try:
                frame = event.result()
            except (OSError, ServalError):
                return
            if frame is None:
                return
            try:
                await self._handle(frame)
            except (OSError, ServalError):
                return  # servald is gone: `_lost` leaves nothing parked
            finally:
                close_fds(frame.fds)

    async def _handle(self, frame: Frame) -> None:
        if frame.message.get("event") != "migration":
            return
        phase = frame.message.get("phase")
        if phase == "park":
            self._park()
            assert self.client is not None
            await self.client.call("migration_ack", {"flow": self.flow, "phase": "park"})
        elif phase == "swap" and len(frame.fds) == 1:
            new_fd = frame.fds.pop()
            os.dup2(new_fd, self.fd, inheritable=False)  # dup3: same number, CLOEXEC kept
            os.close(new_fd)
            self.migrations += 1
            self._swapped = True
            if self._was_reading:
                transport: Any = self.writer.transport
                transport.resume_reading()  # EPOLL_CTL_ADD of the new file
        elif phase == "resume":
            self._keep_state(frame.message)
            self._resume()

    def _lost(self) -> bool:
        """servald is gone. A parked stream goes on at once -- unless it was swapped (the
        bytes the peer lacks died with servald: fail it rather than leave a hole) or the
        dead servald left it frozen (only a restarted servald can thaw it). True: try to
        hand the flow back."""
        client, self.client = self.client, None
        if client is not None:
            client.close()
        if self._stream_gone():
            return False
        if self._swapped:
            self._fail(INTERRUPTED_MIGRATION)
            return False
        keep_trying = self.state is not None and adopt_window_s() > 0
        if self._parked:
            if keep_trying and in_repair_mode(self.fd):
                self._frozen_hold = True
            else:
                self._resume()
        return keep_trying

    async def _adopt(self, closed: asyncio.Future[None]) -> bool:
        """Hand the flow back to a restarted servald; True when it took it."""
        now = time.monotonic()
        schedule = AdoptSchedule(now)
        hold_until = now + HOLD_FROZEN_S
        while True:
            pause = asyncio.ensure_future(asyncio.sleep(max(0.0, schedule.next_at - now)))
            waiting: set[asyncio.Future[Any]] = {pause, closed}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                pause.cancel()
                return False
            outcome = await self._try_adopt()
            if outcome is True:
                return True
            now = time.monotonic()
            if self._frozen_hold and (outcome is None or schedule.expired(now)
                                      or now >= hold_until):
                self._fail(FROZEN_TOO_LONG)
                return False
            if outcome is None or schedule.expired(now):
                self.state = None  # carries on unwatched
                return False
            schedule.failed(now)

    async def _try_adopt(self) -> bool | None:
        """One attempt: True adopted, False not yet (servald not back), None never."""
        assert self.state is not None
        try:
            client = await AsyncControlClient.connect(self.control_path)
        except (OSError, ServalError):
            return False
        if self._stream_gone():
            client.close()
            return None
        copy = os.dup(self.fd)  # the transport's socket is open: the number is still ours
        try:
            frame = await client.call("adopt", {"state": self.state}, fds=[copy],
                                      wait_s=ADOPT_REPLY_TIMEOUT_S)
        except (OSError, ServalError) as exc:
            client.close()
            return None if adopt_gives_up(exc) else False
        finally:
            os.close(copy)  # servald holds its own copy now (or refused it)
        close_fds(frame.fds)
        self._keep_state(frame.message)
        self.client = client
        self.adoptions += 1
        if self._frozen_hold:  # servald thawed the socket: the stream goes on
            self._frozen_hold = False
            self._resume()
        return True

    def _park(self) -> None:
        transport: Any = self.writer.transport
        loop: Any = asyncio.get_running_loop()
        self._parked = True
        self._swapped = False
        self._was_reading = transport.is_reading()
        if self._was_reading:
            transport.pause_reading()
        protocol = transport.get_protocol()
        for _ in range(MAX_DRAIN_READS if self._was_reading else 0):
            try:
                chunk = self.sock.recv(DRAIN_CHUNK_BYTES, _stdsocket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError, OSError):
                break
            if not chunk:
                break
            protocol.data_received(chunk)
        held = self._held

        def hold(data: bytes | bytearray | memoryview) -> None:
            held.append(bytes(data))

        transport.write = hold  # an instance attribute shadows the method until resume
        self._had_writer = bool(transport._buffer)
        if self._had_writer:
            loop._remove_writer(self.fd)

    def _resume(self) -> None:
        transport: Any = self.writer.transport
        self._parked = False
        self._swapped = False
        if "write" in vars(transport):
            del transport.write
        if self._was_reading and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()  # a move rolled back (no swap resumed it)
        self._was_reading = False
        if self._had_writer and transport._buffer:
            asyncio.get_running_loop()._add_writer(  # type: ignore[attr-defined]
                self.fd, transport._write_ready)
        self._had_writer = False
        held, self._held = self._held, []
        for data in held:
            transport.write(data)

    def _fail(self, reason: str) -> None:
        """The stream cannot go on intact: end it with an error (a reset, not a FIN)."""
        transport: Any = self.writer.transport
        if "write" in vars(transport):
            del transport.write
        self._held.clear()
        self._parked = self._swapped = self._frozen_hold = False
        abort_on_close(self.fd)
        error = os_error(errno.ECONNABORTED, reason)
        if hasattr(transport, "_force_close"):
            transport._force_close(error)  # the reader sees the error, not an EOF
        else:
            transport.abort()


def watch_status(writer: asyncio.StreamWriter) -> WatchStatus:
    """Whether servald can migrate a stream opened by this module now (it is watched), and
    how many moves and servald restarts (hand-backs) it went through."""
    watch = _WATCH_OF.get(writer)
    if watch is None:
        return WatchStatus(False, 0, 0, False)
    return watch.status()


async def _watch(sock: _stdsocket.socket, writer: asyncio.StreamWriter, info: ConnectionInfo,
                 control_path: str | None) -> None:
    """Start taking part in the stream's migrations when servald offers them."""
    if not info.migratable or info.flow is None or \
            os.environ.get("SERVAL_MIGRATION", "1") == "0":
        return
    if not _AsyncWatch.supported(writer):
        return
    try:
        client = await AsyncControlClient.connect(control_path)
    except (OSError, ServalError):
        return
    try:
        answer = await client.call("watch", {"events": ["migration"], "flow": info.flow},
                                   fds=[sock.fileno()])
    except (OSError, ServalError):
        client.close()
        return
    close_fds(answer.fds)
    state = answer.message.get("state")
    watch = _AsyncWatch(client, sock, writer, info.flow,
                        state if isinstance(state, str) and state else None)
    _WATCHES.add(watch)
    _WATCH_OF[writer] = watch
    asyncio.get_running_loop().create_task(watch.run())


def _socket_from(
    frame: Frame, service: ServiceID | None
) -> tuple[_stdsocket.socket, ConnectionInfo]:
    if len(frame.fds) != 1:
        close_fds(frame.fds)
        raise ControlProtocolError(f"expected one TCP fd from servald, got {len(frame.fds)}")
    try:
        info = ConnectionInfo.from_message(frame.message, service)
    except BaseException:
        close_fds(frame.fds)
        raise
    sock = _stdsocket.socket(fileno=frame.fds[0])
    sock.setblocking(False)
    return sock, info


async def connect(
    service: ServiceLike,
    *,
    timeout_s: float | None = None,
    mode: str | None = None,
    control_socket: str | None = None,
) -> tuple[_stdsocket.socket, ConnectionInfo]:
    """Ask servald for a connection; return the connected, non-blocking TCP socket.

    For code that drives the fd itself (the translator hands it to the splice engine).
    `timeout_s` None uses servald's configured connect timeout.
    """
    target = to_service(service)
    subject = f"service {service}"
    fields: dict[str, Any] = {"service": str(target), "type": "stream"}
    if timeout_s is not None:
        fields["timeout_s"] = timeout_s
    if mode is not None:
        fields["mode"] = mode
    client = await AsyncControlClient.connect(control_socket)
    try:
        wait_s = None if timeout_s is None else timeout_s + CONNECT_REPLY_MARGIN_S
        frame = await client.call("connect", fields, wait_s=wait_s, subject=subject)
    finally:
        client.close()
    sock, info = _socket_from(frame, target)
    if info.peer.service is None:
        info = dataclasses.replace(info, peer=info.peer._replace(service=target))
    return sock, info


async def open_connection(
    service: ServiceLike,
    *,
    timeout_s: float | None = None,
    mode: str | None = None,
    control_socket: str | None = None,
    limit: int = STREAM_LIMIT_BYTES,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to `service`; return (reader, writer) like `asyncio.open_connection`.

    Extra keyword arguments go to `asyncio.open_connection` (e.g. ``ssl``).
    """
    sock, info = await connect(
        service, timeout_s=timeout_s, mode=mode, control_socket=control_socket
    )
    try:
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit, **kwargs)
    except BaseException:
        sock.close()
        raise
    _INFO[writer] = info
    await _watch(sock, writer, info, control_socket)
    return reader, writer


class Server:
    """A listening Serval service, like `asyncio.Server` (returned by `start_server`).

    The listener lives as long as its control connection: `close()` ends it and servald
    withdraws the service at once (and its registrations with the routers).
    """

    def __init__(
        self,
        client: AsyncControlClient,
        service: ServiceID,
        handler: ClientConnectedCallback,
        limit: int,
        stream_kwargs: dict[str, Any],
    ) -> None:
        self.service = service
        self._client = client
        self._handler = handler
        self._limit = limit
        self._stream_kwargs = stream_kwargs
        self._handlers: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    @property
    def control_path(self) -> str:
        return self._client.path

    def is_serving(self) -> bool:
        return self._accept_task is not None and not self._accept_task.done()

    async def _accept_loop(self) -> None:
        try:
            while True:
                frame = await self._client.next_event()
                if frame is None:
                    return  # servald went away or we were closed
                if frame.message.get("event") != "accept":
                    close_fds(frame.fds)
                    continue
                try:
                    sock, info = _socket_from(frame, self.service)
                except ControlProtocolError:
                    continue  # one malformed event costs one connection, not the listener
                task = asyncio.get_running_loop().create_task(self._run_handler(sock, info))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
        finally:
            self._client.close()

    async def _run_handler(self, sock: _stdsocket.socket, info: ConnectionInfo) -> None:
        try:
            reader, writer = await asyncio.open_connection(
                sock=sock, limit=self._limit, **self._stream_kwargs
            )
        except BaseException:
            sock.close()
            raise
        _INFO[writer] = info
        await _watch(sock, writer, info, self._client.path)
        result = self._handler(reader, writer)
        if inspect.isawaitable(result):
            await result

    def close(self) -> None:
        """Stop accepting (the service is withdrawn); running handlers go on."""
        if self._accept_task is not None and not self._accept_task.done():
            self._accept_task.cancel()
        self._client.close()

    async def wait_closed(self) -> None:
        """Wait until the accept loop has ended (after `close()` or when servald went away)."""
        if self._accept_task is None:
            return
        # Awaiting the task, not an event its `finally` sets: a task cancelled before its
        # first step never runs that `finally`.
        await asyncio.wait({self._accept_task})  # unlike gather, never cancels the task
        self._client.close()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (it serves from `start_server` on)."""
        if self._accept_task is None:
            raise os_error(errno.EINVAL, "server is not started")
        await asyncio.wait({self._accept_task})

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<serval.asyncio.Server {self.service} serving={self.is_serving()}>"


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    service: ServiceLike,
    *,
    backlog: int = DEFAULT_BACKLOG,
    weight: int = 1,
    priority: int = 0,
    control_socket: str | None = None,
    limit: int = STREAM_LIMIT_BYTES,
    **kwargs: Any,
) -> Server:
    """Serve `service`: call `client_connected_cb(reader, writer)` for each connection.

    `weight` and `priority` steer the routers' anycast. Extra keyword arguments go to
    `asyncio.open_connection` for each accepted stream.
    """
    target = to_service(service)
    client = await AsyncControlClient.connect(control_socket_path(control_socket))
    fields = {
        "service": str(target),
        "type": "stream",
        "backlog": max(1, min(int(backlog), 65535)),
        "weight": weight,
        "priority": priority,
    }
    try:
        await client.call("listen", fields, subject=f"service {service}")
    except BaseException:
        client.close()
        raise
    server = Server(client, target, client_connected_cb, limit, kwargs)
    server._start()
    return server
