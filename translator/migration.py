"""Migration of relayed connections: the relay takes part in servald's moves of its Serval side.

Theory of operation
-------------------
When servald offers migration (its ``connect`` reply or ``accept`` event says
``"migratable": true``), the Serval-side socket of a relayed pair is handed to servald with a
``watch`` request (docs/migration.md §5). servald then pushes ``migration`` events for that
flow and we drive the relay engine:

* ``park``: ``RelayPool.park`` (returns once the worker stopped touching the pair's fds; bytes
  already in its pipes stay there), then ``migration_ack`` — servald waits at most 1 s for it;
* ``swap`` (fds=1): the rebuilt socket replaces the pair's Serval side (``swap_fd``). It arrives
  under a new fd number in this process; the engine takes it over, removes the old socket from
  its epoll set and closes our copy of it. Closing is silent: the old socket is still in repair
  mode, and servald keeps its own duplicate lingering (deaf and mute) for a while anyway;
* ``resume``: ``RelayPool.resume`` — the pair continues, starting with what its pipes hold.
  A ``resume`` with no ``swap`` before it is a rolled-back move: the old socket goes on.

One control connection per watched flow, not one per appliance: servald lets a connection
watch several flows, but it keeps its copy of each watched socket until the *connection*
closes (there is no unwatch op), so a shared connection would pin every finished flow's socket
in servald for the appliance's lifetime. A dedicated connection is closed when its pair ends
(``RelayPool`` calls ``FlowWatch.close``), which releases servald's copy at once.

The ``watch`` request carries a duplicate of the Serval fd taken *before* the pair goes to the
relay: the engine may finish the pair and close its fd at any time, and the number could be
reused by another socket by the time the request is sent.

If the watch connection is lost (servald restarting) the pair carries on unmigratable; a
parked pair is resumed first so that a lost servald never freezes a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from serval.control import AsyncControlClient, Frame, close_fds
from serval.errors import ServalError
from splice_ext import Side
from translator.relay import Connection, RelayPool

WATCH_REPLY_TIMEOUT_S = 5.0
ACK_REPLY_TIMEOUT_S = 2.0


def offers_migration(message: dict[str, Any]) -> bool:
    """Whether a connect reply / accept event lets us watch the flow."""
    return message.get("migratable") is True and isinstance(message.get("flow"), int) \
        and not isinstance(message.get("flow"), bool)


class FlowWatch:
    """The migration watch of one relayed connection (its Serval side is `side`)."""

    def __init__(self, relay: RelayPool, connection: Connection, side: Side,
                 control_path: str, fd_copy: int, log: Any) -> None:
        assert connection.flow is not None
        self.relay = relay
        self.connection = connection
        self.flow: int = connection.flow
        self.side: Side = side
        self.control_path = control_path
        self._fd_copy: int | None = fd_copy
        self._log = log
        self._client: AsyncControlClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._parked_at: float | None = None
        self._swapped = False
        self.watching = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"watch-flow-{self.flow}")

    def close(self) -> None:
        """The pair ended (or the appliance stops): release servald's copy of the socket."""
        if self._closed:
            return
        self._closed = True
        self._drop_fd_copy()
        if self._client is not None:
            self._client.close()
        task = asyncio.current_task()
        if self._task is not None and self._task is not task and not self._task.done():
            self._task.cancel()

    def _drop_fd_copy(self) -> None:
        fd, self._fd_copy = self._fd_copy, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def _pair_alive(self) -> bool:
        generation = self.connection.generation
        return not self._closed and generation is not None and \
            self.connection.pair_id in generation.connections

    async def _run(self) -> None:
        try:
            self._client = await AsyncControlClient.connect(self.control_path)
            if self._closed:
                return
            assert self._fd_copy is not None
            await self._client.call("watch", {"events": ["migration"], "flow": self.flow},
                                    fds=[self._fd_copy], wait_s=WATCH_REPLY_TIMEOUT_S,
                                    subject=f"watch of flow {self.flow}")
            self._drop_fd_copy()  # servald holds its own copy now
            self.watching = True
            while not self._closed:
                frame = await self._client.next_event()
                if frame is None:
                    break
                try:
                    await self._handle(frame)
                finally:
                    close_fds(frame.fds)
        except asyncio.CancelledError:
            pass
        except (OSError, ServalError) as exc:
            if not self._closed:
                self._log.warning("migration_watch_lost", flow=self.flow,
                                  name=self.connection.name, error=str(exc))
        finally:
            self.watching = False
            self._drop_fd_copy()
            self._unpark("watch ended")
            if self._client is not None:
                self._client.close()

    # -- events ------------------------------------------------------------------------------

    async def _handle(self, frame: Frame) -> None:
        message = frame.message
        if message.get("event") != "migration" or message.get("flow") != self.flow:
            return
        phase = message.get("phase")
        if phase == "park":
            await self._park()
        elif phase == "swap":
            self._swap(frame)
        elif phase == "resume":
            self._resume()

    async def _park(self) -> None:
        if not self._pair_alive:
            return  # no ack: servald gives up on the move, and the watch closes with the pair
        try:
            self.relay.park(self.connection)
        except (KeyError, ServalError) as exc:
            self._log.info("migration_park_failed", flow=self.flow, error=repr(exc))
            return
        self._parked_at = time.monotonic()
        self._swapped = False
        assert self._client is not None
        await self._client.call("migration_ack", {"flow": self.flow, "phase": "park"},
                                wait_s=ACK_REPLY_TIMEOUT_S, subject=f"flow {self.flow}")

    def _swap(self, frame: Frame) -> None:
        if len(frame.fds) != 1 or self._parked_at is None or not self._pair_alive:
            self._log.warning("migration_swap_ignored", flow=self.flow, fds=len(frame.fds),
                              parked=self._parked_at is not None)
            return
        new_fd = frame.fds.pop()
        try:
            # The engine owns new_fd from here on, even when this raises (it stays parked).
            self.relay.swap_fd(self.connection, self.side, new_fd)
        except (KeyError, ValueError) as exc:
            with contextlib.suppress(OSError):
                os.close(new_fd)  # KeyError/ValueError: fd not taken
            self._log.warning("migration_swap_failed", flow=self.flow, error=repr(exc))
            return
        except (OSError, ServalError) as exc:
            self._log.error("migration_swap_failed", flow=self.flow, error=repr(exc))
            self.relay.abort(self.connection, "migration-failed")
            return
        self._swapped = True

    def _resume(self) -> None:
        parked_at = self._parked_at
        if parked_at is None:
            return
        self._parked_at = None
        migrated = self._swapped
        self._swapped = False
        if not self._pair_alive:
            return
        try:
            self.relay.resume(self.connection, migrated=migrated)
        except (KeyError, ServalError):
            return
        connection = self.connection
        self._log.info("migration", role=connection.role, name=connection.name,
                       service=connection.service, flow=self.flow, client=connection.client,
                       outcome="completed" if migrated else "rolled_back",
                       parked_ms=round((time.monotonic() - parked_at) * 1000, 3),
                       migrations=connection.migrations)

    def _unpark(self, why: str) -> None:
        """Never leave a pair parked behind a lost watch."""
        if self._parked_at is None:
            return
        self._parked_at = None
        try:
            self.relay.resume(self.connection, migrated=self._swapped)
        except (KeyError, ServalError):
            return  # the pair has ended (or the relay stopped): nothing is left parked
        self._log.warning("migration_unparked", flow=self.flow, reason=why)


def watch_flow(relay: RelayPool, connection: Connection, side: Side, control_path: str,
               serval_fd: int, log: Any) -> FlowWatch | None:
    """Before ``relay.add``: prepare a watch of the connection's flow (a dup of its Serval fd).
    Call ``start`` once the pair is in the relay."""
    if connection.flow is None or os.environ.get("SERVAL_MIGRATION", "1") == "0":
        return None
    try:
        fd_copy = os.dup(serval_fd)
    except OSError as exc:
        log.warning("migration_watch_failed", flow=connection.flow, error=str(exc))
        return None
    watch = FlowWatch(relay, connection, side, control_path, fd_copy, log)
    connection.watch = watch
    return watch
