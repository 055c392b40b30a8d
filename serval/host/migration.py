"""The migration engine: moves live stream flows to a new address, both ends at once.

Theory of operation
-------------------
A flow is migrated by the SAL (RSYN / RSYN-ACK / ACK, serval/core/flow.py) while the two
kernel TCP sockets behind it are frozen, dumped and rebuilt on the new 4-tuple with
TCP_REPAIR (serval/host/repair.py). The recipe and all its pitfalls are
/work/shared/notes/tcp-repair-migration.md ("the notes"); this module is its runtime: it
orders the socket steps around the SAL messages so that no kernel ever sends an RST
(notes section 3.5):

| step | initiator I                                  | responder R                          |
|------|----------------------------------------------|--------------------------------------|
| 1    | input lock, park app (it drains the receive  |                                      |
|      | queue), freeze + dump S_I, RSYN              |                                      |
| 2    |                                              | input lock, park, freeze + dump S_R, |
|      |                                              | rebuild N_R (kept in repair mode),   |
|      |                                              | RSYN-ACK                             |
| 3    | rebuild N_I, commit (swap + unfreeze), *then*|                                      |
|      | send the final ACK (held until N_I exists)   |                                      |
| 4    |                                              | on the ACK, or on the first segment  |
|      |                                              | reaching N_R: commit                 |

The input lock (the drop-all filter of repair.freeze) comes *before* parking so that the
application can read its receive queue empty while nothing new arrives: the dump then copies
almost nothing and the rebuild restores nothing (dropped segments are re-sent by the peer as
its pending bytes). After its commit each side hands the socket back in two steps: `swap`
(the new socket is in place: reading may resume at once) and, once the bytes the peer lacks
(`pending`, notes 3.3 step 10) have been written, `resume` (writing may resume: the pending
bytes must precede anything new). Writing them while the application already reads is what
keeps two parked ends with full queues from waiting on each other. If the peer moves again
while they are still being written (its application parked, so they cannot drain), its
request interrupts the write and the remainder rides along with the next migration's pending
bytes, after everything the socket itself still holds.

Only the send queue's contents (megabytes under load) are needed after the commit and nothing
before it: each end dumps everything else, sends its SAL message, and copies the send queue
while that message is in flight (the answer is handled on this same loop, so it cannot
overtake the copy; the copy usually ends before the answer arrives). A thread copying it
instead was measured too: no better through servald, worse with two engines in one process
(GIL), and a race with a rollback to reason about. Every step is time-stamped into the record's
`timeline` (benchmarks/migration_bench.py lines both ends up to show where a pause goes).

The old socket is not released at the swap: it lingers OLD_SOCKET_LINGER_S, deaf (its drop
filter) and mute (SO_MARK routed to a blackhole rule, see `prepare`), so segments that the
peer's old socket sent before its freeze find a socket and vanish rather than draw an RST.

Anything that fails before the swap rolls back to the old socket, which is intact (frozen and
filtered): a failed dump or rebuild (the responder answers RSYN-NACK), a refusal, a timeout
(the Flow's: 3 s for the initiator, 6 s for the responder), an abort from the peer. A lost
final ACK is covered twice: the responder polls its new socket's segment counter (the
initiator only sends on the new 4-tuple after its commit, so any segment there is an
implicit ACK, `Flow.data_arrived`), and the Flow retransmits the RSYN-ACK, which the
initiator answers with the final ACK again.

One migration per flow runs at a time. A per-flow worker takes jobs in order: the peer's
requests first, then our own moves. When RSYNs cross, the Flow's tie-break makes the loser
report MigrationFailed(YIELDED) followed at once by MigrationRequested: the loser, still
frozen, answers the winner with the dump it already holds (nothing moved under the locks)
and retries its own move afterwards. Repeated moves are just successive jobs.

The application side of a flow is an `AppSocket`: in-process (the test harness, the library
when it embeds the engine) it parks threads and returns the application's own fd number, so
`commit` dup3s straight onto it; across processes (servald and the library or a relay
engine) `park` returns servald's copy of the socket received over the control connection,
and `swap` passes the new one back (the library dup3s it onto its own number).

Every migration, at either end, writes one structured log line (event "migration": flow,
role, outcome, old and new addresses, pause, frozen time, bytes re-sent, queue sizes) and
updates the counters (`MigrationEngine.counters`).

Threading: everything runs on one asyncio loop, in the network namespace the sockets live in
(repair.rebuild creates sockets in the calling thread's namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import ipaddress
import os
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from serval.core.flow import (
    Event,
    Flow,
    FlowState,
    MigrationCompleted,
    MigrationFailed,
    MigrationFailure,
    MigrationRequested,
    MigrationState,
)
from serval.core.wire import Address, ControlFlags, MigrateExt, SalPacket
from serval.errors import FlowStateError, RepairError
from serval.host import repair

__all__ = [
    "IMPLICIT_ACK_POLL_S",
    "MIGRATION_GUARD_S",
    "PARK_TIMEOUT_S",
    "PENDING_WRITE_TIMEOUT_S",
    "AppSocket",
    "CounterSink",
    "ManagedFlow",
    "MigrationEngine",
    "MigrationRecord",
    "Outcome",
    "Role",
    "SendFunction",
    "tune_process_memory",
]

PARK_TIMEOUT_S = 1.0  # an application that does not park within this is not migrated
PENDING_WRITE_TIMEOUT_S = 60.0  # the peer's application stopped reading for this long: abort
IMPLICIT_ACK_POLL_S = 0.001  # responder: how often the new socket is checked for segments
# Safety net over the Flow's own timers (3 s initiator, 6 s responder): a job never waits
# longer than this for its outcome, whatever happens to packets or timers.
MIGRATION_GUARD_S = 10.0
YIELD_RETRIES = 3  # our move lost the tie-break this often: give up
MAX_QUEUED_JOBS = 16  # per flow; further requests are refused at once
# glibc serves allocations above its mmap threshold with fresh mappings, so every dump (and
# every pending-bytes buffer) of a few MB paid for its page faults again: measured on the
# 2-vCPU test VM, a 3.8 MB send-queue dump took 15-30 ms that way and 1.2-2.8 ms once large
# blocks stay on the heap. See `tune_process_memory`.
MALLOC_MMAP_THRESHOLD_BYTES = 64 << 20
MALLOC_TRIM_THRESHOLD_BYTES = 256 << 20
HEAP_WARM_BYTES = 16 << 20
# The old socket outlives the swap by this much, deaf (its drop filter) and mute (MUTE_MARK is
# routed to a blackhole), so segments the peer's old socket sent before its freeze -- still in
# queues on the path -- find a socket and vanish instead of drawing an RST from our kernel.
# Measured: with 50 ms of shaper queue, releasing at once cost 6 RSTs per move and back.
OLD_SOCKET_LINGER_S = 2.0
MUTE_MARK = 0x5E7A1D  # SO_MARK of lingering old sockets
MUTE_RULE_PRIORITY = 900  # `fwmark MUTE_MARK blackhole`, ahead of any table lookup
_SO_MARK = 36
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


# --------------------------------------------------------------------------------------------
# the seams


class AppSocket(Protocol):
    """The application end of one flow's kernel TCP socket, as the engine drives it.

    `acquire` returns a file descriptor for the socket (the application's open file, or a
    copy of it) that stays valid until `resume` returns; the engine never closes it. The
    engine then locks the socket's input (nothing new arrives) and calls `park`: the
    application may first read what is already queued -- every byte it drains is one the dump
    need not copy and the rebuild need not restore -- then stops every system call on the
    socket. `swap` says the socket under the fd was replaced (reads may resume); `resume` lets
    the application write again. After a rollback `resume` follows `park` directly, and it
    also follows a failed `acquire` or `park`.
    """

    async def acquire(self) -> int: ...

    async def park(self) -> None: ...

    async def swap(self, fd: int) -> None: ...

    async def resume(self) -> None: ...


class CounterSink(Protocol):
    """Where counters also go (servald's `Counters`)."""

    def inc(self, name: str, amount: int = 1) -> None: ...


# send(packet, destination, source): one SAL packet, from `source` when it is given (after a
# migration control packets must leave from the new address, which may be the only one left).
SendFunction = Callable[[SalPacket, Address, Address | None], None]


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class Outcome(enum.Enum):
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"  # failed before the swap; the old socket carries on
    ABORTED = "aborted"  # failed after the swap (pending bytes could not be written)
    SKIPPED = "skipped"  # nothing to do (already there, flow closing, busy, not parked)


@dataclass(frozen=True)
class MigrationRecord:
    """What one migration did at one end (also the structured log line)."""

    flow: int
    role: Role
    outcome: Outcome
    reason: str | None
    old_local: tuple[str, int] | None
    new_local: tuple[str, int] | None
    old_remote: tuple[str, int] | None
    new_remote: tuple[str, int] | None
    pause_ms: float  # park requested -> application writes again
    frozen_ms: float  # freeze -> unfreeze (commit or rollback)
    bytes_resent: int  # bytes the peer lacked, written after the swap
    recv_queue_bytes: int
    send_queue_bytes: int
    started_at: float  # loop time
    timeline: tuple[tuple[str, float], ...] = ()  # (step, ms after the start)

    @property
    def completed(self) -> bool:
        return self.outcome is Outcome.COMPLETED

    def to_dict(self) -> dict[str, Any]:
        def endpoint(value: tuple[str, int] | None) -> str | None:
            if value is None:
                return None
            host = f"[{value[0]}]" if ":" in value[0] else value[0]
            return f"{host}:{value[1]}"

        return {
            "flow": self.flow,
            "role": self.role.value,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "old": endpoint(self.old_local),
            "new": endpoint(self.new_local),
            "peer_old": endpoint(self.old_remote),
            "peer_new": endpoint(self.new_remote),
            "pause_ms": round(self.pause_ms, 3),
            "frozen_ms": round(self.frozen_ms, 3),
            "bytes_resent": self.bytes_resent,
            "recv_queue_bytes": self.recv_queue_bytes,
            "send_queue_bytes": self.send_queue_bytes,
            # Where the pause went: monotonic start (s; CLOCK_MONOTONIC is shared by every
            # process and namespace, so both ends' timelines line up) and each step's ms
            # after it.
            "started_at": round(self.started_at, 6),
            "timeline": dict(self.timeline),
        }


# --------------------------------------------------------------------------------------------
# per-flow state


@dataclass(eq=False)
class _Move:
    """Our own move to `address`, requested through `MigrationEngine.migrate`."""

    address: Address
    future: asyncio.Future[MigrationRecord]
    yields_left: int = YIELD_RETRIES
    requested_at: float = 0.0  # loop time of the request


@dataclass(eq=False)
class _PeerRequest:
    info: MigrateExt
    new_peer_address: Address
    received_at: float = 0.0  # loop time the RSYN was handled


@dataclass(eq=False)
class _Frozen:
    """A parked application and its frozen (and usually dumped) socket."""

    fd: int
    parked_at: float
    window: repair.RepairWindow | None = None
    frozen_at: float = 0.0
    state: repair.SocketState | None = None
    marks: list[tuple[str, float]] = field(default_factory=list)  # (step, loop time)


@dataclass(eq=False)
class _Attempt:
    """One migration in flight at this end: what the event handlers need."""

    role: Role
    frozen: _Frozen
    outcome: asyncio.Future[tuple[Outcome, str | None]]
    old_local: tuple[str, int] | None
    old_remote: tuple[str, int] | None
    new_local: tuple[str, int] | None = None
    new_remote: tuple[str, int] | None = None
    rebuilt: repair.RebuiltSocket | None = None  # responder: N_R, waiting in repair mode
    pending: bytes | memoryview = b""
    unfrozen_at: float | None = None
    poll: asyncio.TimerHandle | None = None
    reader_fd: int | None = None  # N_R watched for EPOLLIN (its restored queue was empty)
    yielded: bool = False
    # responder: the old send queue could not be copied after the RSYN-ACK left (never seen:
    # the socket is frozen); the bytes the initiator lacks are gone, so the commit resets.
    send_queue_lost: bool = False


@dataclass(eq=False)
class ManagedFlow:
    """One established stream flow under the engine: its Flow, socket and application."""

    flow: Flow
    app: AppSocket
    local: tuple[str, int] | None  # the kernel TCP socket's current 4-tuple
    remote: tuple[str, int] | None
    on_event: Callable[[ManagedFlow, Event], None] | None = None
    migrations: int = 0
    records: deque[MigrationRecord] = field(default_factory=lambda: deque(maxlen=32))
    jobs: deque[_Move | _PeerRequest] = field(default_factory=deque)
    attempt: _Attempt | None = None
    worker: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float | None = None
    suppress_final_ack_until: float = 0.0
    closed: bool = False
    # Pending bytes a peer's request interrupted (its application was parked for it, so they
    # could not drain): carried into the next migration, or written before `resume`.
    leftover: bytes = b""
    needs_resume: bool = False
    interrupt: asyncio.Event | None = None

    @property
    def flow_id(self) -> int:
        return int(self.flow.local_flow)

    @property
    def busy(self) -> bool:
        return self.attempt is not None or bool(self.jobs)

    def describe(self) -> dict[str, Any]:
        return {
            "flow": self.flow_id,
            "state": self.flow.state.value,
            "migration_state": self.flow.migration_state.value,
            "local": None if self.local is None else
            {"address": self.local[0], "port": self.local[1]},
            "remote": None if self.remote is None else
            {"address": self.remote[0], "port": self.remote[1]},
            "sal_local": None if self.flow.local_address is None else str(self.flow.local_address),
            "sal_peer": None if self.flow.peer_address is None else str(self.flow.peer_address),
            "migrations": self.migrations,
        }


# --------------------------------------------------------------------------------------------
# the engine


class MigrationEngine:
    """Migrates the stream flows handed to it with `adopt`, as initiator and as responder."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: SendFunction,
        *,
        counters: CounterSink | None = None,
        log: Any = None,
        tune_memory: bool = True,
    ) -> None:
        """`tune_memory`: call `tune_process_memory()` (process-wide, once)."""
        self._loop = loop
        self._send = send
        self._sink = counters
        self._log = log if log is not None else structlog.get_logger("servald").bind(
            component="migration")
        self._flows: dict[int, ManagedFlow] = {}
        self.counters: Counter[str] = Counter()
        self._closing = False
        self._mute_ready = False
        # fd of a lingering old socket -> (its 4-tuple, the timer that closes it)
        self._lingering: dict[int, tuple[tuple[tuple[str, int], tuple[str, int]],
                                         asyncio.TimerHandle]] = {}
        if tune_memory:
            tune_process_memory()

    # -- bookkeeping ---------------------------------------------------------------------------

    def adopt(
        self,
        flow: Flow,
        app: AppSocket,
        *,
        local: tuple[str, int] | None = None,
        remote: tuple[str, int] | None = None,
        on_event: Callable[[ManagedFlow, Event], None] | None = None,
    ) -> ManagedFlow:
        """Take over an established flow: from now on its packets go to `handle_packet`,
        its timers run here, and it can migrate. `on_event` receives the Flow events that
        are not about migration (PeerClosed, Closed, Reset, ...)."""
        flow_id = int(flow.local_flow)
        if flow_id in self._flows:
            raise ValueError(f"flow {flow_id} is already managed")
        managed = ManagedFlow(flow, app, local, remote, on_event)
        self._flows[flow_id] = managed
        self._pump(managed)
        return managed

    async def prepare(self) -> bool:
        """Install the blackhole rule for MUTE_MARK (both families; needs CAP_NET_ADMIN).

        Without it old sockets are released at the swap, as the notes do, and a straggler of
        the old path can draw an RST. Idempotent; True when old sockets can linger.
        """
        from pyroute2 import AsyncIPRoute

        installed = 0
        async with AsyncIPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    await ipr.rule("add", family=family, fwmark=MUTE_MARK, fwmask=0xFFFFFFFF,
                                   action="FR_ACT_BLACKHOLE", priority=MUTE_RULE_PRIORITY)
                    installed += 1
                except Exception as exc:
                    if getattr(exc, "code", None) == errno.EEXIST:
                        installed += 1
                    else:
                        self._log.warning("migration_mute_rule_failed", error=repr(exc),
                                          family=int(family))
        self._mute_ready = installed == 2
        return self._mute_ready

    def forget(self, flow_id: int) -> ManagedFlow | None:
        """Stop managing a flow (it closed). A migration in progress is abandoned."""
        managed = self._flows.pop(flow_id, None)
        if managed is None:
            return None
        managed.closed = True
        if managed.timer is not None:
            managed.timer.cancel()
            managed.timer = None
        if managed.attempt is not None:
            # Mid-migration: never leave the socket frozen behind (a no-op once committed).
            self._rollback(managed.attempt)
            managed.attempt = None
        if managed.worker is not None:
            managed.worker.cancel()
        for job in managed.jobs:
            if isinstance(job, _Move) and not job.future.done():
                job.future.cancel()
        managed.jobs.clear()
        return managed

    def get(self, flow_id: int) -> ManagedFlow | None:
        return self._flows.get(flow_id)

    def flows(self) -> list[ManagedFlow]:
        return list(self._flows.values())

    def flows_on(self, address: Address) -> list[ManagedFlow]:
        """Flows whose SAL or TCP local address is `address` (what an address loss moves)."""
        text = str(address)
        return [m for m in self._flows.values()
                if m.flow.local_address == address or (m.local is not None and
                                                        m.local[0] == text)]

    def owns(self, flow_id: int) -> bool:
        return flow_id in self._flows

    def close(self) -> None:
        self._closing = True
        for flow_id in list(self._flows):
            self.forget(flow_id)
        for fd in list(self._lingering):
            self._release_old(fd)

    # -- old sockets ---------------------------------------------------------------------------

    def _commit(self, rebuilt: repair.RebuiltSocket, fd: int,
                old_tuple: tuple[tuple[str, int], tuple[str, int]] | None
                ) -> bytes | memoryview:
        """repair.commit onto `fd`, keeping the old socket alive (deaf and mute) a while."""
        old = os.dup(fd) if self._mute_ready and old_tuple is not None else None
        try:
            pending = repair.commit(rebuilt, fd, write_pending=False)
        except BaseException:
            if old is not None:
                os.close(old)
            raise
        if old is not None and old_tuple is not None:
            if _set_mark(old, MUTE_MARK):
                timer = self._loop.call_later(OLD_SOCKET_LINGER_S, self._release_old, old)
                self._lingering[old] = (old_tuple, timer)
            else:
                self._count("mute_failed")
                os.close(old)
        return pending

    def _release_old(self, fd: int) -> None:
        entry = self._lingering.pop(fd, None)
        if entry is not None:
            entry[1].cancel()
            os.close(fd)  # still in repair mode: no FIN, no RST

    def _make_room(self, local: tuple[str, int], remote: tuple[str, int]) -> None:
        """A lingering old socket holding the 4-tuple we are about to rebuild goes now (a flow
        moving back within the linger time), or the repair connect() would hit EADDRNOTAVAIL."""
        for fd, (four_tuple, _timer) in list(self._lingering.items()):
            if four_tuple == (local, remote):
                self._count("linger_cut_short")
                self._release_old(fd)

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount
        if self._sink is not None:
            self._sink.inc(f"migration.{name}", amount)

    # -- SAL input -----------------------------------------------------------------------------

    def handle_packet(self, packet: SalPacket, source: Address) -> bool:
        """A SAL packet for one of our flows (by destination flowID); False if not ours."""
        managed = self._flows.get(int(packet.dst_flow))
        if managed is None:
            return False
        managed.flow.handle_packet(packet, source, self._loop.time())
        self._pump(managed)
        return True

    def _pump(self, managed: ManagedFlow) -> None:
        """Handle the Flow's events, *then* send what it produced, then re-arm its timer.

        Events first: the initiator's final ACK is produced together with MigrationCompleted
        and must not leave before the new socket exists and has been swapped in (step 3).
        """
        flow = managed.flow
        while (event := flow.next_event()) is not None:
            self._on_event(managed, event)
        now = self._loop.time()
        for packet, destination in flow.datagrams_to_send(now):
            if destination is None:
                continue  # a SYN: never produced by an established flow
            final_ack = _is_final_ack(packet)
            if final_ack and now < managed.suppress_final_ack_until:
                self._count("final_ack_suppressed")
                continue
            self._send(packet, destination, flow.local_address)
            if final_ack and managed.attempt is not None:
                managed.attempt.frozen.marks.append(("final_ack_sent", self._loop.time()))
        self._arm_timer(managed)

    def _arm_timer(self, managed: ManagedFlow) -> None:
        when = None if managed.closed else managed.flow.get_timer()
        if when == managed.timer_at and (when is None or managed.timer is not None):
            return
        if managed.timer is not None:
            managed.timer.cancel()
            managed.timer = None
        managed.timer_at = when
        if when is not None:
            managed.timer = self._loop.call_at(when, self._on_timer, managed)

    def _on_timer(self, managed: ManagedFlow) -> None:
        managed.timer = None
        managed.timer_at = None
        if managed.closed:
            return
        managed.flow.handle_timer(self._loop.time())
        self._pump(managed)

    # -- Flow events ---------------------------------------------------------------------------

    def _on_event(self, managed: ManagedFlow, event: Event) -> None:
        attempt = managed.attempt
        if isinstance(event, MigrationRequested):
            self._on_requested(managed, event)
        elif isinstance(event, MigrationCompleted):
            if attempt is None or (attempt.role is Role.INITIATOR) != event.initiator:
                self._count("unexpected_completion")
                self._log.warning("migration_unexpected_completion", flow=managed.flow_id,
                                  initiator=event.initiator)
                return
            if event.initiator:
                self._initiator_commit(managed, attempt, event.peer_migrate)
            else:
                self._responder_commit(managed, attempt)
        elif isinstance(event, MigrationFailed):
            if not event.initiator and (attempt is None or attempt.role is not Role.RESPONDER):
                _drop_peer_requests(managed)  # settled before its job even started
                return
            if attempt is None or (attempt.role is Role.INITIATOR) != event.initiator:
                return
            if event.reason is MigrationFailure.YIELDED:
                # The winner's RSYN follows at once (MigrationRequested): answered by the
                # same job with the dump we hold, so no rollback in between.
                attempt.yielded = True
            _settle(attempt, Outcome.ROLLED_BACK, event.reason.value)
        elif managed.on_event is not None:
            managed.on_event(managed, event)

    def _on_requested(self, managed: ManagedFlow, event: MigrationRequested) -> None:
        request = _PeerRequest(event.peer_migrate, event.new_peer_address, self._loop.time())
        # The Flow answers one RSYN at a time: a queued older request is void now.
        _drop_peer_requests(managed)
        attempt = managed.attempt
        if attempt is not None and attempt.yielded:
            # Crossing RSYNs, we lost: answer now, still frozen (see the module docstring).
            self._answer_request(managed, attempt.frozen, request)
            return
        if len(managed.jobs) >= MAX_QUEUED_JOBS:
            self._count("refused_busy")
            self._refuse(managed)
            return
        managed.jobs.appendleft(request)  # the peer is waiting: before our own moves
        if managed.interrupt is not None:
            # Our last migration's pending bytes cannot drain while the peer's application
            # is parked for this very request: stop writing them and answer first.
            managed.interrupt.set()
        self._ensure_worker(managed)

    # -- requests ------------------------------------------------------------------------------

    async def migrate(self, flow_id: int, new_address: Address) -> MigrationRecord:
        """Move our end of `flow_id` to `new_address` (an address of this host).

        Returns the record of the attempt (`record.completed`); never raises for a migration
        that fails: the flow carries on where it was. KeyError if the flow is not managed.
        """
        managed = self._flows[flow_id]
        future: asyncio.Future[MigrationRecord] = self._loop.create_future()
        if len(managed.jobs) >= MAX_QUEUED_JOBS:
            return self._skipped(managed, Role.INITIATOR, "too many migrations queued")
        managed.jobs.append(_Move(new_address, future, requested_at=self._loop.time()))
        self._ensure_worker(managed)
        return await asyncio.shield(future)

    def _skipped(self, managed: ManagedFlow, role: Role, reason: str) -> MigrationRecord:
        self._count("skipped")
        return MigrationRecord(managed.flow_id, role, Outcome.SKIPPED, reason, managed.local,
                               None, managed.remote, None, 0.0, 0.0, 0, 0, 0,
                               self._loop.time())

    def _ensure_worker(self, managed: ManagedFlow) -> None:
        if managed.worker is None or managed.worker.done():
            managed.worker = self._loop.create_task(self._work(managed))

    async def _work(self, managed: ManagedFlow) -> None:
        while not managed.closed:
            if not managed.jobs:
                if not managed.needs_resume:
                    return
                try:
                    await self._flush(managed)
                except (OSError, TimeoutError) as exc:
                    self._count("flush_failed")
                    self._log.warning("migration_flush_failed", flow=managed.flow_id,
                                      error=repr(exc))
                    managed.needs_resume = False
                continue
            job = managed.jobs.popleft()
            try:
                if isinstance(job, _PeerRequest):
                    await self._respond(managed, job, None)
                    continue
                record = await self._initiate(managed, job)
                # None: requeued behind the peer's migration (same future, answered later).
                if record is not None and not job.future.done():
                    job.future.set_result(record)
            except asyncio.CancelledError:
                if isinstance(job, _Move) and not job.future.done():
                    job.future.cancel()
                raise
            except Exception as exc:  # a bug must not kill the flow's worker silently
                self._count("internal_error")
                self._log.exception("migration_internal_error", flow=managed.flow_id,
                                    error=repr(exc))
                if isinstance(job, _Move) and not job.future.done():
                    job.future.set_exception(exc)

    # -- initiator -----------------------------------------------------------------------------

    async def _initiate(self, managed: ManagedFlow, move: _Move) -> MigrationRecord | None:
        """Our own move. None: requeued behind the peer's migration (retried later)."""
        flow = managed.flow
        started = self._loop.time()
        if flow.state is not FlowState.CONNECTED:
            return self._skipped(managed, Role.INITIATOR, f"flow is {flow.state.value}")
        if managed.local is not None and managed.local[0] == str(move.address) and \
                flow.local_address == move.address:
            return self._skipped(managed, Role.INITIATOR, "already there")
        if flow.migration_state is not MigrationState.RSYN_INITIAL:
            if not any(isinstance(job, _PeerRequest) for job in managed.jobs):
                return self._skipped(managed, Role.INITIATOR,
                                     f"flow is in {flow.migration_state.value}")
            # The peer's RSYN is being answered; its job runs first, ours after it.
            self._requeue(managed, move)
            return None
        frozen = await self._park(managed)
        if frozen is None:
            return self._skipped(managed, Role.INITIATOR, "application did not park")
        if managed.jobs and isinstance(managed.jobs[0], _PeerRequest):
            # The peer moved while we were parking: answer it with this park, then retry.
            request = managed.jobs.popleft()
            assert isinstance(request, _PeerRequest)
            await self._respond(managed, request, frozen)
            self._requeue(managed, move)
            return None
        frozen.marks.insert(0, ("requested", move.requested_at))
        attempt = _Attempt(Role.INITIATOR, frozen, self._loop.create_future(),
                           managed.local, managed.remote)
        managed.attempt = attempt
        try:
            # The send queue's contents are read once the RSYN is out (below).
            state = self._freeze_and_dump(managed, frozen, send_queue=False)
            if state is None:
                return await self._finish(managed, attempt, started, Outcome.ROLLED_BACK,
                                          "dump failed")
            new_local = (str(move.address), state.local[1])
            attempt.new_local = new_local
            info = MigrateExt(rcv_nxt=state.rcv_nxt, window_edge=state.window_edge,
                              address=move.address, port=state.local[1])
            try:
                flow.migrate(move.address, info, self._loop.time())
            except FlowStateError as exc:
                self._rollback(attempt)
                return await self._finish(managed, attempt, started, Outcome.ROLLED_BACK,
                                          str(exc))
            self._count("initiated")
            self._pump(managed)
            frozen.marks.append(("rsyn_sent", self._loop.time()))
            # While the RSYN is in flight (nothing of ours can run before this returns: the
            # RSYN-ACK is handled on this loop), the megabytes only needed after the commit.
            if not self._read_send_queue(managed, frozen):
                with contextlib.suppress(FlowStateError):
                    flow.abandon_migration(self._loop.time())  # the peer rolls back now
                _settle(attempt, Outcome.ROLLED_BACK, "send queue unreadable")
                self._pump(managed)
            outcome, reason = await self._await_outcome(attempt)
            if attempt.yielded and outcome is not Outcome.COMPLETED:
                return await self._after_yield(managed, move, attempt)
            if outcome is not Outcome.COMPLETED:
                self._rollback(attempt)
            return await self._finish(managed, attempt, started, outcome, reason)
        finally:
            if managed.attempt is attempt:
                managed.attempt = None

    def _requeue(self, managed: ManagedFlow, move: _Move) -> None:
        if managed.closed:
            move.future.cancel()
            return
        # After any peer request already queued, before later moves of our own.
        index = sum(1 for job in managed.jobs if isinstance(job, _PeerRequest))
        managed.jobs.insert(index, move)

    async def _after_yield(self, managed: ManagedFlow, move: _Move,
                           attempt: _Attempt) -> MigrationRecord | None:
        """We lost the tie-break: the winner's migration was answered by `_answer_request`
        (same park, same dump); see it through, then retry our own move."""
        self._count("yielded")
        responder = managed.attempt
        if responder is not None and responder is not attempt and \
                responder.role is Role.RESPONDER:
            try:
                outcome, reason = await self._await_outcome(responder)
                if outcome is not Outcome.COMPLETED:
                    self._rollback(responder)
                await self._finish(managed, responder, attempt.frozen.parked_at, outcome,
                                   reason)
            finally:
                if managed.attempt is responder:
                    managed.attempt = None
        else:
            # The winner's request never came (the Flow always sends it right after the
            # refusal, but a frozen socket must never be left behind).
            self._rollback(attempt)
            await self._finish(managed, attempt, attempt.frozen.parked_at,
                               Outcome.ROLLED_BACK, "yielded")
        move.yields_left -= 1
        if move.yields_left <= 0 or managed.closed:
            return self._skipped(managed, Role.INITIATOR, "lost the tie-break repeatedly")
        self._requeue(managed, move)
        return None

    def _initiator_commit(self, managed: ManagedFlow, attempt: _Attempt,
                          peer: MigrateExt) -> None:
        """RSYN-ACK received: rebuild and swap *before* the final ACK leaves (step 3)."""
        state = attempt.frozen.state
        assert state is not None and attempt.new_local is not None
        attempt.frozen.marks.append(("rsyn_ack", self._loop.time()))
        new_remote = (str(peer.address), peer.port)
        attempt.new_remote = new_remote
        try:
            self._make_room(attempt.new_local, new_remote)
            rebuilt = repair.rebuild(state, attempt.new_local, new_remote, peer.rcv_nxt,
                                     peer.window_edge)
            attempt.frozen.marks.append(("rebuilt", self._loop.time()))
            attempt.pending = _joined(self._commit(rebuilt, attempt.frozen.fd,
                                                   (state.local, state.remote)),
                                      managed.leftover)
            managed.leftover = b""  # after everything the old socket held
        except (RepairError, OSError) as exc:
            # Too late to refuse: the responder has built N_R. The final ACK must never leave
            # (it would make R switch to a 4-tuple nobody serves): abandoning withdraws it
            # (`_pump` sends only after the events) and sends R an abort, so R rolls back now.
            self._count("rebuild_failed")
            try:
                managed.flow.abandon_migration(self._loop.time())
            except FlowStateError:  # never: the final ACK is still in the Flow's outbox
                managed.suppress_final_ack_until = self._loop.time() + MIGRATION_GUARD_S
            _settle(attempt, Outcome.ROLLED_BACK, f"rebuild failed: {exc}")
            return
        attempt.unfrozen_at = self._loop.time()
        attempt.frozen.marks.append(("committed", attempt.unfrozen_at))
        managed.local, managed.remote = attempt.new_local, new_remote
        _settle(attempt, Outcome.COMPLETED, None)

    # -- responder -----------------------------------------------------------------------------

    async def _respond(self, managed: ManagedFlow, request: _PeerRequest,
                       frozen: _Frozen | None) -> MigrationRecord:
        started = self._loop.time() if frozen is None else frozen.parked_at
        flow = managed.flow
        if flow.migration_state is not MigrationState.RSYN_RECV:
            # Settled meanwhile (the initiator gave up, or the flow closed).
            return self._skipped(managed, Role.RESPONDER, "request no longer pending")
        if frozen is None:
            frozen = await self._park(managed)
            if frozen is None:
                self._refuse(managed)
                return self._skipped(managed, Role.RESPONDER, "application did not park")
        frozen.marks.insert(0, ("rsyn_received", request.received_at))
        attempt = self._answer_request(managed, frozen, request)
        try:
            outcome, reason = await self._await_outcome(attempt)
            if outcome is not Outcome.COMPLETED:
                self._rollback(attempt)
            return await self._finish(managed, attempt, started, outcome, reason)
        finally:
            if managed.attempt is attempt:
                managed.attempt = None

    def _answer_request(self, managed: ManagedFlow, frozen: _Frozen,
                        request: _PeerRequest) -> _Attempt:
        """Freeze and dump (unless already done), build N_R, answer RSYN-ACK (step 2)."""
        attempt = _Attempt(Role.RESPONDER, frozen, self._loop.create_future(),
                           managed.local, managed.remote)
        managed.attempt = attempt
        flow = managed.flow
        if flow.migration_state is not MigrationState.RSYN_RECV:
            _settle(attempt, Outcome.ROLLED_BACK, "request no longer pending")
            return attempt
        # The send queue's contents are read once the RSYN-ACK is out (below).
        state = frozen.state if frozen.state is not None else \
            self._freeze_and_dump(managed, frozen, send_queue=False)
        if state is None:
            self._refuse(managed)
            _settle(attempt, Outcome.ROLLED_BACK, "dump failed")
            return attempt
        info = request.info
        new_remote = (str(info.address), info.port)
        attempt.new_local, attempt.new_remote = state.local, new_remote
        try:
            self._make_room(state.local, new_remote)
            attempt.rebuilt = repair.rebuild(state, state.local, new_remote, info.rcv_nxt,
                                             info.window_edge)
            frozen.marks.append(("rebuilt", self._loop.time()))
        except (RepairError, OSError) as exc:
            self._count("rebuild_failed")
            self._refuse(managed)
            _settle(attempt, Outcome.ROLLED_BACK, f"rebuild failed: {exc}")
            return attempt
        local_address = ipaddress.ip_address(state.local[0])
        answer = MigrateExt(rcv_nxt=state.rcv_nxt, window_edge=state.window_edge,
                            address=local_address, port=state.local[1])
        try:
            flow.accept_migration(answer, self._loop.time())
        except FlowStateError as exc:
            repair.discard(attempt.rebuilt)
            attempt.rebuilt = None
            _settle(attempt, Outcome.ROLLED_BACK, str(exc))
            return attempt
        self._count("answered")
        frozen.marks.append(("rsyn_ack_sent", self._loop.time()))
        attempt.poll = self._loop.call_later(IMPLICIT_ACK_POLL_S, self._poll_new_socket,
                                             managed, attempt)
        if not state.recv_queue:
            # Nothing restored into N_R, so it turns readable exactly when the initiator's
            # first data lands: the implicit ACK at once, not at the next poll.
            attempt.reader_fd = attempt.rebuilt.fileno()
            self._loop.add_reader(attempt.reader_fd, self._poll_new_socket, managed, attempt)
        self._pump(managed)
        # While the RSYN-ACK is in flight: the bytes N_R writes after its commit. Nothing can
        # commit before this returns (the final ACK is handled on this loop), and the copy
        # (1-2 ms for a few MB on the test VM) is usually done before the final ACK arrives.
        if self._read_send_queue(managed, frozen):
            assert frozen.state is not None
            attempt.rebuilt.attach_send_queue(frozen.state)
        else:
            attempt.send_queue_lost = True
        return attempt

    def _poll_new_socket(self, managed: ManagedFlow, attempt: _Attempt) -> None:
        """Lost final ACK: a segment on N_R proves the initiator switched (implicit ACK)."""
        if attempt.poll is not None:
            attempt.poll.cancel()
            attempt.poll = None
        if attempt.outcome.done() or managed.closed or attempt.rebuilt is None:
            self._stop_reader(attempt)
            return
        try:
            arrived = repair.tcp_info(attempt.rebuilt).segs_in > 0
        except OSError:
            arrived = False
        if arrived:
            self._count("implicit_ack")
            managed.flow.data_arrived(self._loop.time())
            self._pump(managed)
        if not attempt.outcome.done():
            attempt.poll = self._loop.call_later(IMPLICIT_ACK_POLL_S, self._poll_new_socket,
                                                 managed, attempt)

    def _stop_reader(self, attempt: _Attempt) -> None:
        if attempt.reader_fd is not None:
            self._loop.remove_reader(attempt.reader_fd)
            attempt.reader_fd = None

    def _responder_commit(self, managed: ManagedFlow, attempt: _Attempt) -> None:
        """Final ACK (or data on N_R): swap N_R in (step 4)."""
        attempt.frozen.marks.append(("final_ack", self._loop.time()))
        self._stop_reader(attempt)
        rebuilt, attempt.rebuilt = attempt.rebuilt, None
        if attempt.poll is not None:
            attempt.poll.cancel()
            attempt.poll = None
        if rebuilt is None:
            _settle(attempt, Outcome.ROLLED_BACK, "no rebuilt socket")
            return
        state = attempt.frozen.state
        try:
            attempt.pending = _joined(
                self._commit(rebuilt, attempt.frozen.fd,
                             (state.local, state.remote) if state else None),
                managed.leftover)
            managed.leftover = b""
        except (RepairError, OSError) as exc:
            # The initiator has switched; nothing consistent is left to return to.
            self._count("commit_failed")
            repair.discard(rebuilt)
            _settle(attempt, Outcome.ABORTED, f"commit failed: {exc}")
            return
        attempt.unfrozen_at = self._loop.time()
        attempt.frozen.marks.append(("committed", attempt.unfrozen_at))
        managed.local, managed.remote = attempt.new_local, attempt.new_remote
        if attempt.send_queue_lost:
            _abort_socket(attempt.frozen.fd)  # an error, not a silently shortened stream
            _settle(attempt, Outcome.ABORTED, "send queue unreadable")
            return
        _settle(attempt, Outcome.COMPLETED, None)

    def _refuse(self, managed: ManagedFlow) -> None:
        with contextlib.suppress(FlowStateError):
            managed.flow.refuse_migration(self._loop.time())
            self._count("refused")
        self._pump(managed)

    # -- shared steps --------------------------------------------------------------------------

    async def _park(self, managed: ManagedFlow) -> _Frozen | None:
        """Input lock, then park (the application drains what is queued meanwhile)."""
        parked_at = self._loop.time()
        fd: int | None = None
        try:
            async with asyncio.timeout(PARK_TIMEOUT_S):
                fd = await managed.app.acquire()
                repair.lock_input(fd)
                locked_at = self._loop.time()
                await managed.app.park()
        except (TimeoutError, OSError) as exc:
            self._count("park_failed")
            self._log.warning("migration_park_failed", flow=managed.flow_id, error=repr(exc))
            if fd is not None:
                with contextlib.suppress(OSError):
                    repair.unlock_input(fd)
            with contextlib.suppress(Exception):
                await managed.app.resume()
            return None
        frozen = _Frozen(fd, parked_at)
        frozen.marks.append(("input_locked", locked_at))
        frozen.marks.append(("parked", self._loop.time()))
        return frozen

    def _read_send_queue(self, managed: ManagedFlow, frozen: _Frozen) -> bool:
        """Complete a dump made with send_queue=False (False: it failed, counted)."""
        if frozen.state is None or frozen.state.send_queue_size is None:
            return True
        try:
            frozen.state = repair.read_send_queue(frozen.fd, frozen.state)
        except RepairError as exc:
            self._count("dump_failed")
            self._log.warning("migration_dump_failed", flow=managed.flow_id, error=str(exc))
            return False
        frozen.marks.append(("send_queue_read", self._loop.time()))
        return True

    def _freeze_and_dump(self, managed: ManagedFlow, frozen: _Frozen, *,
                         send_queue: bool = True) -> repair.SocketState | None:
        try:
            frozen.window = repair.freeze(frozen.fd)
        except RepairError as exc:
            self._count("freeze_failed")
            self._log.warning("migration_freeze_failed", flow=managed.flow_id, error=str(exc))
            return None
        frozen.frozen_at = self._loop.time()
        frozen.marks.append(("frozen", frozen.frozen_at))
        try:
            frozen.state = repair.dump(frozen.fd, frozen.window, send_queue=send_queue)
            frozen.marks.append(("dumped", self._loop.time()))
        except RepairError as exc:
            self._count("dump_failed")
            self._log.warning("migration_dump_failed", flow=managed.flow_id, error=str(exc))
            with contextlib.suppress(RepairError):
                repair.rollback(frozen.fd)
            frozen.window = None
            return None
        if managed.local is None:
            managed.local, managed.remote = frozen.state.local, frozen.state.remote
        return frozen.state

    def _rollback(self, attempt: _Attempt) -> None:
        self._stop_reader(attempt)
        if attempt.rebuilt is not None:
            repair.discard(attempt.rebuilt)  # silent: still in repair mode
            attempt.rebuilt = None
        if attempt.poll is not None:
            attempt.poll.cancel()
            attempt.poll = None
        frozen = attempt.frozen
        if attempt.unfrozen_at is not None:
            return  # already committed (or rolled back)
        if frozen.window is None:
            with contextlib.suppress(OSError):  # parked with the input lock, never frozen
                repair.unlock_input(frozen.fd)
            attempt.unfrozen_at = self._loop.time()
            return
        try:
            repair.rollback(frozen.fd, frozen.state)
        except RepairError as exc:
            self._count("rollback_failed")
            self._log.error("migration_rollback_failed", error=str(exc))
        attempt.unfrozen_at = self._loop.time()
        frozen.window = None

    async def _await_outcome(self, attempt: _Attempt) -> tuple[Outcome, str | None]:
        try:
            async with asyncio.timeout(MIGRATION_GUARD_S):
                return await asyncio.shield(attempt.outcome)
        except TimeoutError:
            self._count("guard_timeout")
            return Outcome.ROLLED_BACK, "no outcome within the guard time"

    async def _finish(self, managed: ManagedFlow, attempt: _Attempt, started: float,
                      outcome: Outcome, reason: str | None) -> MigrationRecord:
        """Hand the socket back (swap, pending bytes, resume) and record the migration."""
        frozen = attempt.frozen
        frozen.marks.append(("finishing", self._loop.time()))
        to_write: bytes | memoryview = b""
        if outcome is not Outcome.COMPLETED:
            # the old socket goes on: what an earlier migration left unwritten goes first
            to_write, managed.leftover = managed.leftover, b""
        remainder = b""
        try:
            if outcome is Outcome.COMPLETED:
                await managed.app.swap(frozen.fd)
                frozen.marks.append(("swapped", self._loop.time()))
                to_write = attempt.pending
            remainder = await self._write_pending(frozen.fd, to_write, managed)
            if not remainder:
                frozen.marks.append(("pending_written", self._loop.time()))
        except (OSError, TimeoutError) as exc:
            outcome, reason = Outcome.ABORTED, f"pending bytes not written: {exc!r}"
            _abort_socket(frozen.fd)
        if remainder:
            managed.leftover, managed.needs_resume = remainder, True
        else:
            managed.needs_resume = False
            try:
                await managed.app.resume()
                frozen.marks.append(("resumed", self._loop.time()))
            except Exception as exc:
                self._log.warning("migration_resume_failed", flow=managed.flow_id,
                                  error=repr(exc))
        now = self._loop.time()
        state = frozen.state
        unfrozen_at = attempt.unfrozen_at if attempt.unfrozen_at is not None else now
        record = MigrationRecord(
            flow=managed.flow_id, role=attempt.role, outcome=outcome, reason=reason,
            old_local=attempt.old_local, new_local=attempt.new_local,
            old_remote=attempt.old_remote, new_remote=attempt.new_remote,
            pause_ms=(now - started) * 1000,
            frozen_ms=(unfrozen_at - frozen.frozen_at) * 1000 if frozen.frozen_at else 0.0,
            bytes_resent=len(attempt.pending),
            recv_queue_bytes=len(state.recv_queue) if state is not None else 0,
            send_queue_bytes=state.send_queue_bytes if state is not None else 0,
            started_at=started,
            timeline=tuple((step, round((at - started) * 1000, 3)) for step, at in frozen.marks))
        managed.records.append(record)
        if outcome is Outcome.COMPLETED:
            managed.migrations += 1
            self._count(f"completed_{attempt.role.value}")
            self._count("bytes_resent", len(attempt.pending))
        else:
            self._count(outcome.value)
        fields = record.to_dict()
        if outcome is Outcome.COMPLETED:
            self._log.info("migration", **fields)
        else:
            self._log.warning("migration", **fields)
        return record

    async def _flush(self, managed: ManagedFlow) -> None:
        """Write what an interrupted hand-back left, then let the application write again."""
        fd = await managed.app.acquire()
        remainder = await self._write_pending(fd, managed.leftover, managed)
        managed.leftover = remainder
        if not remainder:
            managed.needs_resume = False
            await managed.app.resume()

    async def _write_pending(self, fd: int, data: bytes | memoryview,
                             managed: ManagedFlow) -> bytes:
        """Write the bytes the peer lacks without blocking the loop (reads already resumed).

        Returns what is left unwritten when a request of the peer interrupts (see
        `_on_requested`); b"" when everything went out.
        """
        if not data:
            return b""
        interrupt = managed.interrupt = asyncio.Event()
        if managed.jobs and isinstance(managed.jobs[0], _PeerRequest):
            interrupt.set()
        try:
            with _NowaitSender(fd) as sender:
                return await self._write_all(fd, sender, memoryview(data), interrupt,
                                             self._loop.time() + PENDING_WRITE_TIMEOUT_S)
        finally:
            managed.interrupt = None

    async def _write_all(self, fd: int, sender: _NowaitSender, view: memoryview,
                         interrupt: asyncio.Event, deadline: float) -> bytes:
        total = len(view)
        while view:
            sent = sender.send(view)
            view = view[sent:]
            if not view:
                break
            if interrupt.is_set():
                self._count("pending_write_interrupted")
                return bytes(view)
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(view)} of {total} pending bytes not written")
            writable: asyncio.Future[None] = self._loop.create_future()

            def ready(future: asyncio.Future[None] = writable) -> None:
                if not future.done():
                    future.set_result(None)

            self._loop.add_writer(fd, ready)
            interrupted: asyncio.Future[Any] = asyncio.ensure_future(interrupt.wait())
            waiting: set[asyncio.Future[Any]] = {writable, interrupted}
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                interrupted.cancel()
                self._loop.remove_writer(fd)
        return b""


# --------------------------------------------------------------------------------------------
# helpers


_memory_tuned = False


def tune_process_memory(warm_bytes: int = HEAP_WARM_BYTES) -> bool:
    """Keep large allocations on the (pre-faulted) heap: dumps copy megabytes per migration.

    Raises glibc's mmap and trim thresholds (mallopt) so blocks of a few MB are reused instead
    of being mapped and faulted in afresh each time, and touches `warm_bytes` once so the
    first migration does not pay either. Process-wide and idempotent; the cost is that up to
    MALLOC_TRIM_THRESHOLD_BYTES of freed heap stays mapped. False where mallopt is missing
    (not glibc): everything still works, just slower.
    """
    global _memory_tuned
    if _memory_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES))
    if ok and warm_bytes > 0:
        warm = bytearray(warm_bytes)  # zero-filled: every page touched, then freed to heap
        del warm
    _memory_tuned = ok
    return ok


def _joined(pending: bytes | memoryview, leftover: bytes) -> bytes | memoryview:
    """The pending bytes of a commit, then what an interrupted hand-back left (a copy only
    in that rare case: pending bytes are megabytes)."""
    return bytes(pending) + leftover if leftover else pending


def _settle(attempt: _Attempt, outcome: Outcome, reason: str | None) -> None:
    if not attempt.outcome.done():
        attempt.outcome.set_result((outcome, reason))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.send.restype = ctypes.c_ssize_t
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32]


def _set_mark(fd: int, mark: int) -> bool:
    value = ctypes.c_uint32(mark)
    return bool(_libc.setsockopt(fd, socket.SOL_SOCKET, _SO_MARK, ctypes.byref(value),
                                 ctypes.sizeof(value)) == 0)


def _drop_peer_requests(managed: ManagedFlow) -> None:
    for job in [j for j in managed.jobs if isinstance(j, _PeerRequest)]:
        managed.jobs.remove(job)


def _is_final_ack(packet: SalPacket) -> bool:
    control = packet.control
    return control is not None and control.flags == ControlFlags.ACK and packet.auth is not None


_SEND_CHUNK_BYTES = 1 << 20
_LINGER_RESET = bytes(ctypes.c_int(1)) + bytes(ctypes.c_int(0))  # l_onoff=1, l_linger=0


class _NowaitSender:
    """Non-blocking sends on a raw fd, whatever its file's O_NONBLOCK (shared with the
    application, so it is never changed). A socket object on a dup of the fd sends straight
    from the caller's buffer with the GIL released; that is not possible under a global
    default timeout (the socket constructor would set O_NONBLOCK on the shared open file), so
    then each chunk is copied for a libc call instead."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._sock: socket.socket | None = None
        if socket.getdefaulttimeout() is None:
            self._sock = socket.socket(fileno=os.dup(fd))

    def __enter__(self) -> _NowaitSender:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, data: memoryview) -> int:
        """Bytes taken (0 when the send buffer is full)."""
        chunk = data[:_SEND_CHUNK_BYTES]
        if self._sock is not None:
            try:
                return self._sock.send(chunk, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return 0
        buffer = (ctypes.c_char * len(chunk)).from_buffer_copy(chunk)
        count = _libc.send(self._fd, buffer, len(chunk),
                           socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        if count < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return int(count)


def _abort_socket(fd: int) -> None:
    """Reset a connection whose byte stream can no longer be kept intact: the application
    gets an error instead of a silently shortened stream."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()

