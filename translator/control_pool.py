"""A pool of control-API connections to servald for concurrent ``connect`` requests.

servald answers the requests of one control connection in order, and a ``connect`` takes a SAL
round trip (or up to its timeout), so connects of different clients must travel on different
control connections or one slow service would stall every other client. The pool keeps idle
connections for reuse (a unix-socket connect per client is cheap, but not free at thousands of
connections per second) and opens more on demand.

An idle connection may have died with a servald restart. Before reuse it is polled: readable
while idle means EOF (or garbage), and it is dropped. A request that still fails because the
connection was lost (servald died between the poll and the write) is retried once on a fresh
connection, since nothing was done on servald's side.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Mapping
from typing import Any

from serval.control import AsyncControlClient, Frame
from serval.errors import (
    ControlProtocolError,
    ServalConnectionAbortedError,
    ServalError,
)
from translator.stack import StackError

MAX_IDLE_CONNECTIONS = 64


class ControlPool:
    """Control connections to one servald control socket."""

    def __init__(self, path: str, max_idle: int = MAX_IDLE_CONNECTIONS) -> None:
        self.path = path
        self._max_idle = max_idle
        self._idle: list[AsyncControlClient] = []
        self.opened = 0

    def retarget(self, path: str) -> None:
        """Point the pool at another control socket (stack reconfigured)."""
        if path != self.path:
            self.path = path
            self.clear()

    def clear(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _open(self) -> AsyncControlClient:
        try:
            client = await AsyncControlClient.connect(self.path)
        except OSError as exc:
            raise StackError(f"servald unavailable at {self.path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        self.opened += 1
        return client

    def _take_idle(self) -> AsyncControlClient | None:
        while self._idle:
            client = self._idle.pop()
            if client.channel.closed:
                continue
            try:
                readable = bool(select.select([client.channel.sock], [], [], 0)[0])
            except (OSError, ValueError):
                readable = True
            if readable:  # EOF or an unsolicited frame on an idle connection: not usable
                client.close()
                continue
            return client
        return None

    def _release(self, client: AsyncControlClient) -> None:
        if client.channel.closed:
            return
        if len(self._idle) >= self._max_idle:
            client.close()
        else:
            self._idle.append(client)

    async def call(
        self,
        op: str,
        fields: Mapping[str, Any],
        *,
        wait_s: float,
        subject: str | None = None,
    ) -> Frame:
        """One request on a pooled connection; raises StackError when servald cannot be
        reached, the mapped ServalOSError when servald answered with an error."""
        reused = self._take_idle()
        client = reused if reused is not None else await self._open()
        for attempt in (1, 2):
            try:
                frame = await client.call(op, fields, wait_s=wait_s, subject=subject)
            except ServalConnectionAbortedError:
                client.close()
                if attempt == 1 and reused is not None:
                    client = await self._open()  # the idle one was stale: try a fresh one
                    reused = None
                    continue
                raise
            except (ServalError, OSError):
                # An error answer leaves the connection usable (the client closes it itself
                # on timeouts and protocol errors).
                self._release(client)
                raise
            except BaseException:
                # Cancelled mid-request: the reply may still come and would be taken for the
                # answer to the next request. Drop the connection.
                client.close()
                raise
            self._release(client)
            return frame
        raise AssertionError("unreachable")


def connect_error_reason(exc: BaseException) -> str:
    """A short, stable label for a failed connect (metrics label and log field)."""
    if isinstance(exc, StackError):
        return "servald_unavailable"
    if isinstance(exc, ControlProtocolError):
        return "protocol_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, ServalConnectionAbortedError):
        return "servald_aborted"
    if isinstance(exc, ConnectionAbortedError):
        return "aborted"
    if isinstance(exc, OSError) and exc.errno:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "unreachable"
        return errno.errorcode.get(exc.errno, "error").lower()
    return "error"
