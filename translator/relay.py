"""The relay side of the appliance: splice_ext engines, connection records, canonical log lines.

Theory of operation
-------------------
Every relayed connection is a *pair* in a ``splice_ext.Relay``: side ``a`` is the connection's
client (the legacy client for a listener, the Serval peer for an exporter), side ``b`` its
server side. The engine owns both fds from ``add_pair`` on and reports the end of the pair as one
completion record on an eventfd, which the event loop watches; for each we log the canonical
``connection`` line, update the metrics and tell the owner (listener or exporter), which may
resume accepting.

Reload without dropping: the relay's parameters (workers, pipe size, half-close timeout) are
fixed for an engine's life, so a changed ``relay`` section starts a new *generation*: new pairs
go to the new engine, old pairs finish on the old one, which is stopped once it is empty.

Per-connection idle timeouts: listeners and exporters each have their own, but an engine has one.
So the engines run without an idle timeout and a sweep here (every IDLE_SWEEP_INTERVAL_S) reads
each pair's byte counters: a pair whose counters did not move for its timeout is closed
gracefully (``close_pair``: flush, FIN both ways). The same sweep feeds the byte counters of the
metrics, so long-lived connections show their traffic while it happens, not only when they end.

Migration (issue 6 item 5): ``park``, ``swap_fd`` and ``resume`` wrap the engine's calls per
connection; translator/migration.py drives them from servald's ``migration`` events, and the
connection's watch is closed here when its pair ends (releasing servald's copy of the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from splice_ext import Completion, Relay, Side, WorkerStats
from translator.config import RelayConfig
from translator.metrics import Metrics

IDLE_SWEEP_INTERVAL_S = 1.0
Role = Literal["listener", "exporter"]


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class Connection:
    """One relayed connection, from hand-off to the relay until its completion."""

    role: Role
    name: str
    service: str
    client: str  # side a's peer: "ip:port"
    server: str  # side b's peer: the Serval instance or the legacy server
    idle_timeout_s: float | None
    connect_s: float
    on_end: Callable[[Connection, str], None]
    flow: int | None = None
    mode: str | None = None
    original_client: str | None = None  # the legacy client behind a Serval peer (PROXY info)
    pair_id: int = -1
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    reported_up: int = 0  # bytes already counted in the metrics
    reported_down: int = 0
    seen_total: int = 0  # bytes moved or queued at the last sweep (idle detection)
    closing_reason: str | None = None  # our own reason when we ended it (idle-timeout, drain)
    migrations: int = 0
    generation: _Generation | None = None
    watch: Closable | None = None  # servald migration watch of the Serval side (migration.py)
    # The fd number of the Serval side inside the relay (the engine owns it; a migration's
    # swap changes it): what a watch hands back to a restarted servald (op adopt).
    serval_fd: int | None = None

    @property
    def labels(self) -> tuple[str, str, str]:
        return (self.role, self.name, self.service)


class _Generation:
    """One relay engine and the connections it carries."""

    def __init__(self, number: int, config: RelayConfig) -> None:
        self.number = number
        self.config = config
        self.relay = Relay(
            workers=config.effective_workers(),
            pipe_size=config.pipe_size,
            idle_timeout_s=None,  # per connection, by the sweep (module docstring)
            half_close_timeout_s=config.half_close_timeout_s,
        )
        self.connections: dict[int, Connection] = {}
        self.retired = False


class RelayPool:
    """The current relay engine (plus retiring ones) and every live connection."""

    def __init__(self, config: RelayConfig, metrics: Metrics, log: Any) -> None:
        self._metrics = metrics
        self._log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._generations: list[_Generation] = []
        self._numbers = 0
        self._config = config
        self._sweeper: asyncio.Task[None] | None = None
        self.completed = 0
        # translator.migration.WatchHub per servald control socket (closed by `stop`).
        self.watch_hubs: dict[str, Closable] = {}

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._new_generation(self._config)
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="relay-sweep")
        self._metrics.watch_relay(self.worker_stats)

    def _new_generation(self, config: RelayConfig) -> _Generation:
        assert self._loop is not None
        self._numbers += 1
        generation = _Generation(self._numbers, config)
        self._generations.append(generation)
        self._loop.add_reader(generation.relay.completion_fd(), self._on_completions, generation)
        self._log.debug("relay_started", generation=generation.number,
                        workers=generation.relay.workers, pipe_size=generation.relay.pipe_size)
        return generation

    @property
    def current(self) -> _Generation:
        return self._generations[-1]

    def reconfigure(self, config: RelayConfig) -> bool:
        """Apply a new relay section; True when a new engine generation was started."""
        if config == self._config:
            return False
        self._config = config
        old = self.current
        old.retired = True
        self._new_generation(config)
        self._log.info("relay_reconfigured", old_generation=old.number,
                       remaining_on_old=len(old.connections), workers=config.effective_workers(),
                       pipe_size=config.pipe_size)
        self._retire_if_empty(old)
        return True

    def stop(self) -> None:
        """Abort what is left (reason ``aborted``) and join every engine's workers."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for generation in list(self._generations):
            generation.relay.stop()
            self._on_completions(generation)
            self._drop(generation)
        for hub in self.watch_hubs.values():
            hub.close()
        self.watch_hubs.clear()

    # -- connections ---------------------------------------------------------------------------

    def add(self, connection: Connection, client_fd: int, server_fd: int) -> Connection:
        """Hand both fds to the current engine (it owns them from now on, even on error)."""
        generation = self.current
        try:
            connection.pair_id = generation.relay.add_pair(client_fd, server_fd)
        except Exception:
            for fd in (client_fd, server_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        connection.generation = generation
        connection.started = connection.last_activity = time.monotonic()
        generation.connections[connection.pair_id] = connection
        self._metrics.active.labels(*connection.labels).inc()
        return connection

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def active(self) -> int:
        return sum(len(g.connections) for g in self._generations)

    def connections(self) -> list[Connection]:
        return [c for g in self._generations for c in g.connections.values()]

    def close(self, connection: Connection, reason: str) -> bool:
        """Graceful end: flush bytes in flight, FIN both sides (completes later)."""
        generation = connection.generation
        if generation is None or connection.pair_id not in generation.connections:
            return False
        if connection.closing_reason is None:
            connection.closing_reason = reason
        return bool(generation.relay.close_pair(connection.pair_id))

    def abort(self, connection: Connection, reason: str) -> bool:
        generation = connection.generation
        if generation is None or connection.pair_id not in generation.connections:
            return False
        if connection.closing_reason is None:
            connection.closing_reason = reason
        return bool(generation.relay.abort_pair(connection.pair_id))

    def close_all(self, reason: str) -> int:
        return sum(self.close(c, reason) for c in self.connections())

    def abort_all(self, reason: str) -> int:
        return sum(self.abort(c, reason) for c in self.connections())

    # -- migration hook points (issue 6 item 5) -------------------------------------------------

    def park(self, connection: Connection) -> None:
        """Stop I/O on the pair (bytes in its pipes stay) before its Serval side moves."""
        assert connection.generation is not None
        connection.generation.relay.park(connection.pair_id)

    def swap_fd(self, connection: Connection, side: Side, new_fd: int) -> None:
        assert connection.generation is not None
        connection.generation.relay.swap_fd(connection.pair_id, side, new_fd)

    def resume(self, connection: Connection, migrated: bool = True) -> None:
        assert connection.generation is not None
        connection.generation.relay.resume(connection.pair_id)
        if migrated:
            connection.migrations += 1
            self._metrics.migrations.labels(*connection.labels).inc()

    # -- statistics ----------------------------------------------------------------------------

    def worker_stats(self) -> list[WorkerStats]:
        """Counters of the current engine's workers (metrics scrape thread: safe, lock-free)."""
        generations = list(self._generations)
        return generations[-1].relay.worker_stats() if generations else []

    def describe(self) -> dict[str, Any]:
        current = self.current
        return {
            "generation": current.number,
            "workers": current.relay.workers,
            "pipe_size": current.relay.pipe_size,
            "half_close_timeout_s": current.relay.half_close_timeout_s,
            "active": self.active,
            "retiring_generations": [
                {"generation": g.number, "active": len(g.connections)}
                for g in self._generations if g.retired
            ],
            "completed": self.completed,
        }

    # -- completions and the sweep ----------------------------------------------------------

    def _on_completions(self, generation: _Generation) -> None:
        for completion in generation.relay.read_completions():
            connection = generation.connections.pop(completion.pair_id, None)
            if connection is not None:
                self._finish(connection, completion)
        if generation.retired:
            self._retire_if_empty(generation)

    def _finish(self, connection: Connection, completion: Completion) -> None:
        self.completed += 1
        watch, connection.watch = connection.watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                watch.close()
        self._account_bytes(connection, completion.bytes_a_to_b, completion.bytes_b_to_a)
        reason: str = completion.reason
        if connection.closing_reason is not None and reason in ("closed", "aborted"):
            reason = connection.closing_reason
        labels = connection.labels
        self._metrics.active.labels(*labels).dec()
        self._metrics.ends.labels(*labels, reason).inc()
        self._log.info(
            "connection",
            role=connection.role,
            name=connection.name,
            service=connection.service,
            client=connection.client,
            original_client=connection.original_client,
            server=connection.server,
            flow=connection.flow,
            mode=connection.mode,
            connect_ms=round(connection.connect_s * 1000, 3),
            duration_s=round(completion.duration_s, 3),
            bytes_up=completion.bytes_a_to_b,
            bytes_down=completion.bytes_b_to_a,
            end=reason,
            errno=errno.errorcode.get(completion.errno) if completion.errno else None,
            migrations=connection.migrations,
        )
        with contextlib.suppress(Exception):
            connection.on_end(connection, reason)

    def _account_bytes(self, connection: Connection, up: int, down: int) -> None:
        labels = connection.labels
        if up > connection.reported_up:
            self._metrics.bytes.labels(*labels, "upstream").inc(up - connection.reported_up)
            connection.reported_up = up
        if down > connection.reported_down:
            self._metrics.bytes.labels(*labels, "downstream").inc(down - connection.reported_down)
            connection.reported_down = down

    def _retire_if_empty(self, generation: _Generation) -> None:
        if generation.retired and not generation.connections:
            generation.relay.stop()
            self._on_completions_final(generation)
            self._drop(generation)
            self._log.debug("relay_retired", generation=generation.number)

    def _on_completions_final(self, generation: _Generation) -> None:
        # Nothing should be left, but a record must never be lost.
        for completion in generation.relay.read_completions():
            connection = generation.connections.pop(completion.pair_id, None)
            if connection is not None:
                self._finish(connection, completion)

    def _drop(self, generation: _Generation) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(generation.relay.completion_fd())
        with contextlib.suppress(ValueError):
            self._generations.remove(generation)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(IDLE_SWEEP_INTERVAL_S)
            try:
                self.sweep(time.monotonic())
            except Exception:
                self._log.exception("relay_sweep_failed")

    def sweep(self, now: float) -> int:
        """Close pairs idle past their timeout and count their bytes; returns pairs closed."""
        closed = 0
        for generation in list(self._generations):
            for connection in list(generation.connections.values()):
                try:
                    stats = generation.relay.pair_stats(connection.pair_id)
                except KeyError:
                    continue  # completed; its record is on the way
                if stats.state == "parked":
                    connection.last_activity = now  # migrating: not idle
                    continue
                total = (stats.bytes_a_to_b + stats.bytes_b_to_a
                         + stats.queued_a_to_b + stats.queued_b_to_a)
                if total != connection.seen_total:
                    connection.seen_total = total
                    connection.last_activity = now
                self._account_bytes(connection, stats.bytes_a_to_b, stats.bytes_b_to_a)
                timeout = connection.idle_timeout_s
                idle = timeout is not None and now - connection.last_activity >= timeout
                if idle and connection.closing_reason is None and \
                        self.close(connection, "idle-timeout"):
                    closed += 1
        return closed
