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

One control connection carries every watch of the appliance (per servald control socket): the
``WatchHub``. Its reader task dispatches servald's events by flow and the answers by request
id; nothing it does waits for an answer (a park's ``migration_ack`` is sent and its answer
taken later), so one flow's move never holds up another's. When a pair ends its watch sends
``unwatch``, which releases servald's copy of the socket at once (before there was an
``unwatch`` op, each flow needed a connection of its own for that).

The ``watch`` request carries a duplicate of the Serval fd taken *before* the pair goes to the
relay: the engine may finish the pair and close its fd at any time, and the number could be
reused by another socket by the time the request is sent.

**servald restarts.** The pairs carry on (the relay owns their sockets); parked ones are resumed
at once, so a lost servald never freezes a connection. servald hands us each flow's sealed
state with the ``watch`` answer and with every ``resume`` (serval/host/flowstate.py); we keep
the latest. Once the supervisor sees servald come back (translator.stack.ServaldPresence) the
hub reconnects and hands every live flow back: op ``adopt`` with its state and a duplicate of
the relay's current Serval-side fd (``Connection.serval_fd``). The new servald re-creates the
flow, so both ends can migrate it again; the peer's servald notices nothing. One log line per
flow (``flow_adopted`` / ``flow_adopt_failed``) and the ``flow_adoptions`` metric count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

from serval.control import (
    AsyncFrameChannel,
    Frame,
    close_fds,
    error_from_response,
    os_error,
    validate_response,
)
from serval.errors import ControlProtocolError, ServalError
from serval.host.repair import in_repair_mode
from splice_ext import Side
from translator.relay import Connection, RelayPool
from translator.stack import servald_presence

WATCH_REPLY_TIMEOUT_S = 5.0
ACK_REPLY_TIMEOUT_S = 2.0
# After losing servald: how long to wait for the supervisor to report it back before trying
# anyway (an external servald may restart between two health probes), and the pause after an
# attempt that found it unreachable.
ADOPT_WAIT_S = 5.0
ADOPT_RETRY_PAUSE_S = 0.5
# A pair whose socket servald left frozen (it died mid-migration) stays parked this long for
# the restarted servald to thaw it (op adopt); then it is aborted: a frozen socket fails every
# read and write, so resuming it would only end the pair with an error.
HOLD_FROZEN_S = 30.0


def offers_migration(message: dict[str, Any]) -> bool:
    """Whether a connect reply / accept event lets us watch the flow."""
    return message.get("migratable") is True and isinstance(message.get("flow"), int) \
        and not isinstance(message.get("flow"), bool)


class WatchHub:
    """The control connection that carries every relayed flow's watch (one per servald)."""

    def __init__(self, relay: RelayPool, control_path: str, log: Any) -> None:
        self.relay = relay
        self.control_path = control_path
        self._log = log
        self._watches: dict[int, FlowWatch] = {}
        self._channel: AsyncFrameChannel | None = None
        self._ready: asyncio.Future[None] | None = None  # done while connected
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.connections = 0  # control connections opened (1 unless servald restarted)

    # -- life cycle --------------------------------------------------------------------------

    def add(self, watch: FlowWatch) -> None:
        """Watch `watch`'s flow (the request goes out as soon as the connection is up)."""
        self._watches[watch.flow] = watch
        if self._task is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"watch-hub {self.control_path}")
        self._spawn(self._watch(watch))

    def remove(self, watch: FlowWatch) -> None:
        """The pair ended: release servald's copy of its socket."""
        if self._watches.get(watch.flow) is not watch:
            return
        del self._watches[watch.flow]
        if watch.watching:
            watch.watching = False
            self._spawn(self._quietly("unwatch", {"flow": watch.flow}))

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._disconnect("closed")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        presence = servald_presence(self.control_path)
        first = True
        while not self._closed:
            epoch = presence.epoch
            try:
                channel = await self._connect()
            except OSError:
                await asyncio.sleep(ADOPT_RETRY_PAUSE_S)
                continue
            self._channel = channel
            self.connections += 1
            if self._ready is None or self._ready.done():
                self._ready = asyncio.get_running_loop().create_future()
            self._ready.set_result(None)
            if not first:
                self._spawn(self._adopt_all())
            first = False
            error = await self._read(channel)
            self._disconnect(error)
            # Wait for the supervisor to see servald (re)started; try anyway now and then.
            while not self._closed and not await presence.wait_back(epoch, ADOPT_WAIT_S):
                if presence.up:
                    break

    async def _connect(self) -> AsyncFrameChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.control_path)
        except OSError:
            sock.close()
            raise
        return AsyncFrameChannel(sock)

    async def _read(self, channel: AsyncFrameChannel) -> str | None:
        """Dispatch frames until the connection ends; what ended it (None: servald closed)."""
        while True:
            try:
                frame = await channel.read_frame()
            except (OSError, ControlProtocolError) as exc:
                return str(exc)
            if frame is None:
                return None
            message = frame.message
            if "id" in message:
                future = self._pending.pop(message["id"], None) \
                    if isinstance(message["id"], int) else None
                if future is None or future.done():
                    close_fds(frame.fds)
                else:
                    future.set_result(frame)
                continue
            try:
                watch = self._watches.get(message.get("flow"))  # type: ignore[arg-type]
                if message.get("event") == "migration" and watch is not None:
                    watch.handle(frame)
            except Exception:  # one flow's trouble must not end every watch
                self._log.exception("migration_event_failed", flow=message.get("flow"))
            finally:
                close_fds(frame.fds)

    def _disconnect(self, error: str | None) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        channel.close()
        if self._ready is not None and self._ready.done() and not self._closed:
            self._ready = asyncio.get_running_loop().create_future()  # the next connection
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(os_error(errno.ECONNABORTED, "servald closed the "
                                                                  "watch connection"))
        lost = [w for w in self._watches.values() if w.watching]
        for watch in self._watches.values():
            watch.watching = False
            watch.watch_lost()
        if lost and not self._closed:
            self._log.warning("migration_watches_lost", flows=len(lost), error=error,
                              control_socket=self.control_path)

    async def request(self, op: str, fields: Mapping[str, Any], *, fds: Sequence[int] = (),
                      wait_s: float = WATCH_REPLY_TIMEOUT_S) -> Frame:
        channel = self._channel
        if channel is None or channel.closed:
            raise os_error(errno.ECONNABORTED, f"{op}: no connection to servald")
        request_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await channel.write_frame({**fields, "op": op, "id": request_id}, fds)
        except OSError as exc:
            self._pending.pop(request_id, None)
            raise os_error(errno.ECONNABORTED, f"{op}: {exc}") from exc
        try:
            async with asyncio.timeout(wait_s):
                frame = await future
        except TimeoutError:
            self._pending.pop(request_id, None)
            raise os_error(errno.ETIMEDOUT, f"{op}: no answer from servald within {wait_s} s "
                                            f"({self.control_path})") from None
        validate_response(frame.message)
        if not frame.message["ok"]:
            close_fds(frame.fds)
            raise error_from_response(frame.message["error"], op)
        return frame

    async def _quietly(self, op: str, fields: Mapping[str, Any]) -> None:
        """A request whose answer nobody waits for (park acks, unwatch)."""
        try:
            frame = await self.request(op, fields, wait_s=ACK_REPLY_TIMEOUT_S)
            close_fds(frame.fds)
        except (OSError, ServalError) as exc:
            self._log.debug("watch_request_failed", op=op, flow=fields.get("flow"),
                            error=str(exc))

    def acknowledge_park(self, flow: int) -> None:
        self._spawn(self._quietly("migration_ack", {"flow": flow, "phase": "park"}))

    # -- watching and adopting ----------------------------------------------------------------

    async def _watch(self, watch: FlowWatch) -> None:
        try:
            ready = self._ready
            assert ready is not None
            async with asyncio.timeout(WATCH_REPLY_TIMEOUT_S):
                await asyncio.shield(ready)
            if watch.closed:
                return
            frame = await self.request("watch", {"events": ["migration"], "flow": watch.flow},
                                       fds=watch.fd_copies())
        except (OSError, ServalError, TimeoutError) as exc:
            if not watch.closed:
                self._log.warning("migration_watch_failed", flow=watch.flow,
                                  name=watch.connection.name, error=str(exc) or "timeout")
            return
        finally:
            watch.drop_fd_copy()  # servald holds its own copy now (or failed)
        watch.keep_state(frame.message)
        watch.watching = True
        if watch.closed:
            self.remove_late(watch)

    def remove_late(self, watch: FlowWatch) -> None:
        """A watch that succeeded after its pair had ended: release it at once."""
        if watch.watching:
            watch.watching = False
            self._spawn(self._quietly("unwatch", {"flow": watch.flow}))

    async def _adopt_all(self) -> None:
        watches = [w for w in self._watches.values()
                   if w.state is not None and not w.watching and w.pair_alive]
        await asyncio.gather(*(self._adopt(watch) for watch in watches))

    async def _adopt(self, watch: FlowWatch) -> None:
        connection = watch.connection
        fd = connection.serval_fd
        if fd is None or watch.state is None:
            return
        try:
            # The relay owns `fd` and may end the pair at any moment (and the number be
            # reused): servald checks that the socket is established and is the one the
            # state names, so a stale number is refused, never adopted.
            copy = os.dup(fd)
        except OSError as exc:
            watch.adopt_failed(f"relay fd: {exc}")
            return
        try:
            frame = await self.request("adopt", {"state": watch.state}, fds=[copy])
        except (OSError, ServalError) as exc:
            if getattr(exc, "errno", None) != errno.ECONNABORTED:  # else: next time
                watch.adopt_failed(str(exc))
            return
        finally:
            os.close(copy)
        watch.keep_state(frame.message)
        watch.watching = True
        if watch.closed:
            self.remove_late(watch)
            return
        watch.adopted()


class FlowWatch:
    """The migration watch of one relayed connection (its Serval side is `side`)."""

    def __init__(self, hub: WatchHub, connection: Connection, side: Side, fd_copy: int,
                 log: Any) -> None:
        assert connection.flow is not None
        self.hub = hub
        self.relay = hub.relay
        self.connection = connection
        self.flow: int = connection.flow
        self.side: Side = side
        self._fd_copy: int | None = fd_copy
        self._log = log
        self.closed = False
        self._parked_at: float | None = None
        self._swapped = False
        self._hold: asyncio.TimerHandle | None = None  # parked, frozen, waiting for adopt
        self.watching = False  # servald has the flow (watch or adopt answered)
        self.state: str | None = None  # the flow's latest sealed state (for op adopt)
        self.adoptions = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.hub.add(self)

    def close(self) -> None:
        """The pair ended (or the appliance stops): release servald's copy of the socket."""
        if self.closed:
            return
        self.closed = True
        self.drop_fd_copy()
        self._cancel_hold()
        self.hub.remove(self)

    def fd_copies(self) -> list[int]:
        return [] if self._fd_copy is None else [self._fd_copy]

    def drop_fd_copy(self) -> None:
        fd, self._fd_copy = self._fd_copy, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def pair_alive(self) -> bool:
        generation = self.connection.generation
        return not self.closed and generation is not None and \
            self.connection.pair_id in generation.connections

    def keep_state(self, message: Mapping[str, Any]) -> None:
        state = message.get("state")
        if isinstance(state, str) and state:
            self.state = state

    def adopted(self) -> None:
        connection = self.connection
        self.adoptions += 1
        self.relay.metrics.flow_adoptions.labels(*connection.labels, "adopted").inc()
        self._log.info("flow_adopted", flow=self.flow, role=connection.role,
                       name=connection.name, service=connection.service,
                       client=connection.client, migrations=connection.migrations)
        if self._hold is not None:  # servald thawed the socket: the pair goes on
            self._cancel_hold()
            self.unpark("thawed by the restarted servald")

    def adopt_failed(self, error: str) -> None:
        self.state = None  # not tried again
        connection = self.connection
        self.relay.metrics.flow_adoptions.labels(*connection.labels, "failed").inc()
        self._log.warning("flow_adopt_failed", flow=self.flow, role=connection.role,
                          name=connection.name, service=connection.service,
                          client=connection.client, error=error)

    # -- events ------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> None:
        message = frame.message
        phase = message.get("phase")
        self.keep_state(message)
        if phase == "park":
            self._park()
        elif phase == "swap":
            self._swap(frame)
        elif phase == "resume":
            self._resume()

    def _park(self) -> None:
        if not self.pair_alive:
            return  # no ack: servald gives up on the move, and the watch ends with the pair
        try:
            self.relay.park(self.connection)
        except (KeyError, ServalError) as exc:
            self._log.info("migration_park_failed", flow=self.flow, error=repr(exc))
            return
        self._parked_at = time.monotonic()
        self._swapped = False
        self.hub.acknowledge_park(self.flow)

    def _swap(self, frame: Frame) -> None:
        if len(frame.fds) != 1 or self._parked_at is None or not self.pair_alive:
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
        self.connection.serval_fd = new_fd
        self._swapped = True

    def _resume(self) -> None:
        parked_at = self._parked_at
        if parked_at is None:
            return
        self._parked_at = None
        migrated = self._swapped
        self._swapped = False
        if not self.pair_alive:
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

    def watch_lost(self) -> None:
        """servald is gone. A parked pair must not stay parked, and must not go on with a
        byte stream that may have lost bytes."""
        if self._parked_at is None:
            return
        if self._swapped:
            # Between the swap and the resume servald writes the bytes the peer lacks; they
            # died with it, so the stream may have a hole: reset it rather than corrupt it.
            self._parked_at = None
            self._log.error("migration_interrupted", flow=self.flow,
                            name=self.connection.name,
                            reason="servald died between the swap and the resume")
            self.relay.abort(self.connection, "migration-interrupted")
            return
        if self._frozen():
            # servald died after freezing the socket: only a restarted servald can thaw it.
            self._log.warning("migration_held", flow=self.flow, name=self.connection.name,
                              reason="socket left frozen; waiting for servald to adopt it",
                              hold_s=HOLD_FROZEN_S)
            self._hold = asyncio.get_running_loop().call_later(HOLD_FROZEN_S, self._hold_expired)
            return
        self.unpark("watch lost")

    def _frozen(self) -> bool:
        fd = self.connection.serval_fd
        return fd is not None and in_repair_mode(fd)

    def _hold_expired(self) -> None:
        self._hold = None
        self._parked_at = None
        self._log.error("migration_interrupted", flow=self.flow, name=self.connection.name,
                        reason=f"socket still frozen after {HOLD_FROZEN_S:g} s without servald")
        self.relay.abort(self.connection, "migration-interrupted")

    def _cancel_hold(self) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    def unpark(self, why: str) -> None:
        """Resume a parked pair (no migration will complete it)."""
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
    hub = relay.watch_hubs.get(control_path)
    if not isinstance(hub, WatchHub):
        hub = relay.watch_hubs[control_path] = WatchHub(relay, control_path, log)
    watch = FlowWatch(hub, connection, side, fd_copy, log)
    connection.watch = watch
    connection.serval_fd = serval_fd
    return watch
