"""servald's side of the control API (docs/control-api.md): the unix socket and its sessions.

Theory of operation
-------------------
`ControlServer` owns the listening unix stream socket: created root-only (mode 0600 unless
`control_socket_mode` says otherwise; the umask is tightened around bind() so the socket never
exists with looser permissions, even for an instant), refusing to start if another servald
answers on the same path, removing a stale file left by a crash.

Each accepted connection becomes a `ControlSession` with one reader task. Requests are handled
one after another in arrival order (a client has one request outstanding at a time; a long
`connect` only delays its own connection). Events pushed by servald (accept, datagram,
migration) go through the same `AsyncFrameChannel`, which serialises whole frames.

Bad input never stops the daemon: a well-delimited frame with bad JSON, a wrong field type or
an unknown op gets an EINVAL error response; a frame whose length is wrong (the framing is
lost) closes that connection only. Both are counted and logged rate-limited. Resources a
session owns (listeners, datagram bindings, watches) are released when it closes: the
`on_close` callbacks registered by the request handler run exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from serval.control import AsyncFrameChannel, Message, close_fds, validate_request
from serval.errors import ControlProtocolError, ServalError, ServalOSError
from serval.host.log import Counters, RateLimitedLog

CONTROL_LISTEN_BACKLOG = 256


class OpError(ServalOSError):
    """A request that fails with an errno code (answered as an error response).

    Built with `OpError(errno.EINVAL, "message naming the field or serviceID")`.
    """


RequestHandler = Callable[["ControlSession", str, Message], Awaitable[tuple[Message, list[int]]]]


def error_code(errno_: int | None) -> str:
    if errno_ is None:
        return "EIO"
    return errno.errorcode.get(errno_, "EIO")


class ControlSession:
    """One client connection: its channel, identity, and the resources it owns."""

    def __init__(self, session_id: int, channel: AsyncFrameChannel, peer_pid: int | None) -> None:
        self.session_id = session_id
        self.channel = channel
        self.peer_pid = peer_pid
        self.client_name: str | None = None
        # fds that came with the request being handled; a handler that keeps one removes it
        # from this list, the rest are closed after the request (`watch` passes the socket).
        self.received_fds: list[int] = []
        self._on_close: list[Callable[[], None]] = []
        self.closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` once when the session ends (listener removal, unbinding, ...)."""
        if self.closed:
            callback()
        else:
            self._on_close.append(callback)

    def remove_on_close(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._on_close.remove(callback)

    async def push_event(self, event: Message, fds: list[int] | None = None) -> bool:
        """Send an event; False when the session is gone (the caller keeps its fds)."""
        if self.closed or self.channel.closed:
            return False
        try:
            await self.channel.write_frame(event, fds or [])
        except (OSError, ServalError):
            return False
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            with contextlib.suppress(Exception):
                callback()
        self.channel.close()


class ControlServer:
    """Accepts control connections and feeds their requests to `handler`."""

    def __init__(
        self,
        path: str,
        mode: int,
        handler: RequestHandler,
        counters: Counters,
        bad_input: RateLimitedLog,
        log: Any,
    ) -> None:
        self.path = path
        self._mode = mode
        self._handler = handler
        self._counters = counters
        self._bad_input = bad_input
        self._log = log
        self._sock: socket.socket | None = None
        self._sessions: dict[int, ControlSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the socket (raises OSError / ServalError with the path on failure)."""
        self._loop = loop
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        sock.listen(CONTROL_LISTEN_BACKLOG)
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._accept_ready)

    def _remove_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise OpError(errno.EEXIST, f"{self.path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody answers: left behind by a crashed servald
            return
        finally:
            probe.close()
        raise OpError(errno.EADDRINUSE,
                      f"another servald is already serving the control socket {self.path}")

    async def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for session in list(self._sessions.values()):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # -- connections -----------------------------------------------------------------------------

    def _accept_ready(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._bad_input.warning("control_accept_failed", error=str(exc))
                return
            peer_pid: int | None = None
            with contextlib.suppress(OSError):
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                peer_pid = int.from_bytes(creds[:4], "little")
            session = ControlSession(next(self._ids), AsyncFrameChannel(conn), peer_pid)
            self._sessions[session.session_id] = session
            self._counters.inc("control.connections")
            task = asyncio.get_running_loop().create_task(self._serve(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: ControlSession) -> None:
        try:
            while True:
                try:
                    frame = await session.channel.read_frame()
                except ControlProtocolError as exc:
                    self._garbage(session, str(exc))
                    if getattr(exc, "framing_lost", True):
                        return
                    await self._reply_error(session, None, errno.EINVAL, str(exc))
                    continue
                except OSError:
                    return
                if frame is None:
                    return
                session.received_fds = list(frame.fds)
                try:
                    await self._dispatch(session, frame.message)
                finally:
                    close_fds(session.received_fds)  # whatever the handler did not take
                    session.received_fds = []
        finally:
            self._sessions.pop(session.session_id, None)
            session.close()

    async def _dispatch(self, session: ControlSession, message: Message) -> None:
        request_id = message.get("id") if isinstance(message.get("id"), int) else None
        try:
            op, request_id = validate_request(message)
        except ControlProtocolError as exc:
            self._garbage(session, str(exc))
            await self._reply_error(session, request_id, errno.EINVAL, str(exc))
            return
        self._counters.inc(f"control.op.{op}" if len(op) <= 32 else "control.op.long_name")
        fds: list[int] = []
        try:
            result, fds = await self._handler(session, op, message)
        except ControlProtocolError as exc:
            self._garbage(session, f"{op}: {exc}")
            await self._reply_error(session, request_id, errno.EINVAL, f"{op}: {exc}")
            return
        except OSError as exc:
            await self._reply_error(session, request_id, exc.errno,
                                    exc.strerror if exc.strerror else str(exc))
            return
        except ServalError as exc:
            await self._reply_error(session, request_id, errno.EINVAL, str(exc))
            return
        except Exception as exc:  # a bug in one op must not take the daemon down
            self._log.exception("control_op_failed", op=op)
            await self._reply_error(session, request_id, errno.EIO, f"{op}: internal error: {exc}")
            return
        try:
            await session.channel.write_frame({**result, "id": request_id, "ok": True}, fds)
        except (OSError, ServalError):
            self._counters.inc("control.reply_failed")
        finally:
            close_fds(fds)  # the kernel holds its own references for the receiver

    def _garbage(self, session: ControlSession, reason: str) -> None:
        self._counters.inc("control.bad_frames")
        self._bad_input.warning("control_bad_frame", session=session.session_id,
                                pid=session.peer_pid, reason=reason[:200])

    async def _reply_error(
        self, session: ControlSession, request_id: int | None, errno_: int | None, text: str
    ) -> None:
        response: Message = {
            "ok": False,
            "error": {"code": error_code(errno_), "message": text[:4000]},
        }
        response["id"] = request_id if request_id is not None else 0
        with contextlib.suppress(OSError, ServalError):
            await session.channel.write_frame(response)
