"""Passive open: a Listener takes the SYNs for one service and turns them into Flows, sans-IO.

Theory of operation
-------------------
The runtime hands the listener every SYN that its service table DEMUXes to it, and every
packet addressed to a flow the listener `owns` (a request not yet completed, or a connection
not yet `accept`ed). For each new SYN the listener creates a request `Flow` (state CLOSED, peer
parameters known) and emits `ConnectionRequest(flow)`. The runtime builds its end of the data
connection -- in repair mode a TCP_REPAIR socket that stays silent until released
(tcp-repair-migration.md section 4b) -- and answers `respond(flow, local_transport)`, which
sends the SYN-ACK (state RESPOND), or `refuse(flow)`, which sends an RST. Either way the
listener never blocks: everything comes out of `datagrams_to_send`, `next_event`, `get_timer`.

A request completes (CONNECTED, into the accept queue, `accept()` returns it) on the handshake
ACK, on any later control packet that acknowledges the SYN-ACK, or on `data_arrived(flow_id)`:
data on the pending socket proves the client got the SYN-ACK (the implicit ACK of pitfall 6).
The SYN-ACK is retransmitted at 250 ms, doubling; a request not completed REQUEST_LIFETIME_S
after its SYN is aborted (`RequestAborted`, reason TIMEOUT) and the client is sent an RST
(pitfall 7: it may believe it is connected). A request the runtime never answers is dropped
silently after the same time.

Duplicates (pitfall 8). Requests are keyed by the client's (flowID, nonce): both are random and
a retransmitted SYN repeats both. A duplicate SYN for a pending request is answered with the
very same SYN-ACK (same flowID, verno, nonce and transport parameters), never a second
connection; once the request completed, duplicates are ignored for COMPLETED_MEMORY_S after the
first SYN (longer than a client keeps retransmitting it).

Admission. A SYN is refused with an RST echoing the client's nonce (so the client, still in
REQUEST, can trust it and fail fast with ConnectionRefused) when the accept queue holds
`backlog` connections, or when `max_pending` requests are already in progress.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict, deque
from dataclasses import dataclass

from serval.core.flow import REQUEST_LIFETIME_S, Datagram, Flow, FlowInput, FlowState, reset_for
from serval.core.ids import ServiceID
from serval.core.wire import Address, ControlFlags, SalPacket, TransportExt
from serval.errors import FlowStateError

__all__ = [
    "COMPLETED_MEMORY_S",
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_PENDING",
    "AbortReason",
    "ConnectionRequest",
    "Listener",
    "ListenerCounters",
    "ListenerEvent",
    "RequestAborted",
]

DEFAULT_BACKLOG = 128
DEFAULT_MAX_PENDING = 500  # the original's DEFAULT_MAX_REQUEST_QLEN
COMPLETED_MEMORY_S = 60.0  # > 31.75 s, the longest a client retransmits one SYN


class AbortReason(enum.Enum):
    TIMEOUT = "timeout"  # SYN-ACK never acknowledged, or the runtime never answered
    RESET = "reset"  # the client reset it (e.g. another instance answered first)


@dataclass(frozen=True)
class ConnectionRequest:
    """A new SYN: answer with `Listener.respond` or `Listener.refuse`.

    `flow.peer_transport`, `flow.peer_address`, `flow.service` and `flow.local_flow` describe it.
    """

    flow: Flow


@dataclass(frozen=True)
class RequestAborted:
    """A responded request died before completing: release its pending socket silently."""

    flow: Flow
    reason: AbortReason


ListenerEvent = ConnectionRequest | RequestAborted


@dataclass
class ListenerCounters:
    syns: int = 0  # new requests
    duplicate_syns: int = 0  # answered with the stored SYN-ACK (or ignored while unanswered)
    late_syns: int = 0  # duplicates after completion, ignored
    refused_full: int = 0  # RST: accept queue or request queue full
    refused: int = 0  # RST: the runtime refused
    completed: int = 0
    aborted: int = 0
    ignored: int = 0  # not a SYN and not for a flow of ours


_PeerKey = tuple[int, bytes]


class Listener:
    """The passive side of one service: request queue, accept queue, duplicate SYN memory."""

    def __init__(
        self,
        service: ServiceID,
        backlog: int = DEFAULT_BACKLOG,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        domain_key: bytes = b"",
    ) -> None:
        if backlog < 1 or max_pending < 1:
            raise ValueError(
                f"{service}: backlog and max_pending must be at least 1, "
                f"got {backlog} and {max_pending}"
            )
        self.service = service
        self.backlog = backlog
        self.max_pending = max_pending
        self.counters = ListenerCounters()
        self._domain_key = domain_key
        self._pending: dict[int, Flow] = {}  # local flowID -> request (CLOSED or RESPOND)
        self._by_peer: dict[_PeerKey, Flow] = {}
        self._unanswered: dict[int, float] = {}  # local flowID -> drop-by time
        self._queued: dict[int, Flow] = {}  # accept queue, in completion order
        self._completed: OrderedDict[_PeerKey, float] = OrderedDict()  # key -> forget-at
        self._finished: list[Flow] = []  # request flows that left RESPOND, to settle
        self._outbox: list[Datagram] = []
        self._events: deque[ListenerEvent] = deque()

    # -- queries -------------------------------------------------------------------------------

    def owns(self, flow_id: int) -> bool:
        """Whether packets for local flowID `flow_id` must be given to this listener."""
        return flow_id in self._pending or flow_id in self._queued

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def accept_queue_length(self) -> int:
        self._settle()
        return len(self._queued)

    # -- inputs --------------------------------------------------------------------------------

    def handle_packet(
        self,
        packet: SalPacket,
        source: Address,
        now: float,
        rng: random.Random,
        *,
        local_address: Address | None = None,
    ) -> bool:
        """Take a SYN for our service or a packet for one of our flows; False if neither.

        `local_address` is the address the packet arrived at; with it the SYN-ACK carries the
        SOURCE trail with that address appended, as Serval's does.
        """
        control = packet.control
        if control is None:
            self.counters.ignored += 1
            return False
        flow = self._pending.get(int(packet.dst_flow)) or self._queued.get(int(packet.dst_flow))
        if flow is not None:
            flow.handle_packet(packet, source, now)
            self._settle()
            return True
        if (
            control.flags & (ControlFlags.SYN | ControlFlags.ACK | ControlFlags.RST)
            != (ControlFlags.SYN)
            or packet.dst_flow != 0
        ):
            self.counters.ignored += 1
            return False
        self._handle_syn(packet, source, now, rng, local_address)
        return True

    def _handle_syn(
        self,
        packet: SalPacket,
        source: Address,
        now: float,
        rng: random.Random,
        local_address: Address | None,
    ) -> None:
        control = packet.control
        assert control is not None
        if packet.src_flow == 0 or packet.destination_service is None:
            self.counters.ignored += 1
            return
        self._forget_completed(now)
        key = (int(packet.src_flow), control.nonce)
        existing = self._by_peer.get(key)
        if existing is not None:
            self.counters.duplicate_syns += 1
            existing._resend_synack()
            self._collect(existing, now)
            return
        if key in self._completed:
            self.counters.late_syns += 1
            return
        if len(self._queued) >= self.backlog or len(self._pending) >= self.max_pending:
            self.counters.refused_full += 1
            rst = reset_for(packet)
            if rst is not None:
                client = packet.source.addresses[0] if packet.source is not None else source
                self._outbox.append((rst, client))
            return
        flow = Flow._from_syn(
            packet,
            source,
            now,
            rng,
            domain_key=self._domain_key,
            local_address=local_address,
            owner=self,
        )
        self.counters.syns += 1
        flow_id = int(flow.local_flow)
        self._pending[flow_id] = flow
        self._by_peer[key] = flow
        self._unanswered[flow_id] = now + REQUEST_LIFETIME_S
        self._events.append(ConnectionRequest(flow))

    def respond(self, flow: Flow, local_transport: TransportExt | None, now: float) -> None:
        """Answer a `ConnectionRequest`: send the SYN-ACK with our transport parameters."""
        flow_id = int(flow.local_flow)
        if flow_id not in self._unanswered:
            raise FlowStateError(
                f"{self.service}: flow {flow.local_flow} is not an unanswered request"
            )
        del self._unanswered[flow_id]
        flow._respond(local_transport, now)
        self._collect(flow, now)

    def refuse(self, flow: Flow, now: float) -> None:
        """Answer a `ConnectionRequest` with an RST (the runtime could not build its end)."""
        flow_id = int(flow.local_flow)
        if flow_id not in self._unanswered:
            raise FlowStateError(
                f"{self.service}: flow {flow.local_flow} is not an unanswered request"
            )
        self.counters.refused += 1
        self._forget(flow)
        flow._refuse()
        self._collect(flow, now)

    def data_arrived(self, flow_id: int, now: float) -> bool:
        """Data reached the pending socket of request `flow_id`: it completes (implicit ACK)."""
        flow = self._pending.get(flow_id) or self._queued.get(flow_id)
        if flow is None:
            return False
        flow.data_arrived(now)
        self._settle()
        return True

    def close(self, now: float) -> None:
        """Stop listening: reset every pending request and every connection not accepted."""
        for flow in [*self._pending.values(), *self._queued.values()]:
            unanswered = int(flow.local_flow) in self._unanswered
            self._forget(flow)
            self._queued.pop(int(flow.local_flow), None)
            if unanswered:
                flow._refuse()
            elif not flow.is_closed:
                flow.abort(now)
            self._collect(flow, now)
        self._unanswered.clear()
        self._finished.clear()

    # -- outputs -------------------------------------------------------------------------------

    def accept(self) -> Flow | None:
        """The oldest completed connection, now the caller's (its events carry Connected)."""
        self._settle()
        if not self._queued:
            return None
        flow_id = next(iter(self._queued))
        flow = self._queued.pop(flow_id)
        flow._owner = None
        return flow

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        self._settle()
        for flow in [*self._pending.values(), *self._queued.values()]:
            self._collect(flow, now)
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ListenerEvent | None:
        self._settle()
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        self._settle()
        candidates = list(self._unanswered.values())
        for flow in [*self._pending.values(), *self._queued.values()]:
            timer = flow.get_timer()
            if timer is not None:
                candidates.append(timer)
        return min(candidates) if candidates else None

    def handle_timer(self, now: float) -> None:
        for flow_id, drop_at in list(self._unanswered.items()):
            if now >= drop_at:
                # Never answered by the runtime: forget it silently; a retransmitted SYN makes
                # a fresh request.
                flow = self._pending[flow_id]
                self._forget(flow)
                self.counters.aborted += 1
        for flow in [*self._pending.values(), *self._queued.values()]:
            timer = flow.get_timer()
            if timer is not None and now >= timer:
                flow.handle_timer(now)
        self._settle()
        self._forget_completed(now)

    # -- internals -----------------------------------------------------------------------------

    def _request_finished(self, flow: Flow) -> None:
        """Flow hook: a request flow completed or closed. Settled at the next entry point, so
        that the flow has finished its own bookkeeping (events, outbox) first."""
        self._finished.append(flow)

    def _settle(self) -> None:
        finished, self._finished = self._finished, []
        for flow in finished:
            flow_id = int(flow.local_flow)
            if flow_id not in self._pending:
                continue
            self._forget(flow)
            self._outbox.extend(flow._take_datagrams())
            if flow.state is FlowState.CLOSED:
                self.counters.aborted += 1
                closed_by = flow._closed_by
                reason = AbortReason.RESET if closed_by is FlowInput.RESET else AbortReason.TIMEOUT
                self._events.append(RequestAborted(flow, reason))
            else:
                self.counters.completed += 1
                self._queued[flow_id] = flow
                assert flow.peer_nonce is not None
                self._completed[(flow.peer_flow, flow.peer_nonce)] = (
                    flow.created_at + COMPLETED_MEMORY_S
                )

    def _forget(self, flow: Flow) -> None:
        flow_id = int(flow.local_flow)
        self._pending.pop(flow_id, None)
        self._unanswered.pop(flow_id, None)
        if flow.peer_nonce is not None:
            key = (flow.peer_flow, flow.peer_nonce)
            if self._by_peer.get(key) is flow:
                del self._by_peer[key]

    def _collect(self, flow: Flow, now: float) -> None:
        self._outbox.extend(flow.datagrams_to_send(now))

    def _forget_completed(self, now: float) -> None:
        # Insertion order is completion order; forget-at is SYN time + constant, so it is
        # nearly monotonic: stop at the first entry still to be remembered.
        while self._completed:
            key, forget_at = next(iter(self._completed.items()))
            if forget_at > now:
                break
            del self._completed[key]
