"""The SAL flow state machine: one end of a Serval connection, sans-IO.

Theory of operation
-------------------
A `Flow` is one end of a SAL connection. It never touches a socket, a clock or global
randomness: the caller feeds it decoded packets (`handle_packet`), local decisions (`close`,
`migrate`, `accept_migration`, ...) and timer expiries (`handle_timer`), always with the current
time `now` in seconds, and pulls what it produced:

* `datagrams_to_send(now)` -> `[(packet, destination)]`. `destination` is the address of the
  peer's SAL port, or None for a SYN, which the caller resolves through its service table (a
  retransmitted SYN is resolved again, so anycast may pick another instance). Packets go out from
  `flow.local_address` when it is set (after `migrate` it is the new address).
* `next_event()` -> the next `Event` (dataclasses below) or None.
* `get_timer()` -> the absolute time `handle_timer` wants to be called at, or None.

Passive opens are handled by `serval.core.listener.Listener`, which creates one Flow per SYN.

The machine is written as TABLES, after h11's `_state.py`: `FLOW_TRANSITIONS` maps
(state, input) to the next state and `MIGRATION_TRANSITIONS` does the same for the orthogonal
migration sub-state. Local calls that are not in a table raise `FlowStateError` and change
nothing. Received packets that are not acceptable in the current state are dropped and counted
in `flow.counters`; they change nothing either. docs/protocol.md ("State machine") has the
same tables and the packet sequences.

Control sequence space (Serval's, serval-protocol.md section 3.3)
----------------------------------------------------------------
Each end numbers its control packets with `verno`. SYN, SYN-ACK, FIN and RSYN consume one
number; ACK, RSYN-ACK, the refusal (RSYN-NACK), the migration abort (NACK) and RST consume none
and carry `verno = snd_nxt`. `ackno` is the next verno expected from the peer. A consuming packet
is accepted when `rcv_nxt <= verno < rcv_nxt + CONTROL_WINDOW` (serial arithmetic: gaps are
allowed because an abandoned RSYN may never have arrived); any other packet when its verno is
within CONTROL_WINDOW of `rcv_nxt`. An older consuming packet is a duplicate: the latest one is
answered again (a FIN re-ACKed, an RSYN given its stored answer), older ones are dropped.

Reliability. Consuming packets wait in a small ordered queue and are sent stop-and-wait: the
head is transmitted (its verno is assigned at that moment, so a queued packet that is cancelled
before it leaves costs no number) and retransmitted on the RTO until acknowledged. The original
kept a single slot in which a new packet overwrote the queued one (a FIN replaced an in-flight
RSYN and inherited its flags); here a FIN queued during a migration is simply sent after the
RSYN's answer, so each packet keeps one meaning and the migration cannot be cancelled by a close.
An RSYN is retired only by its answer (RSYN-ACK or RSYN-NACK), never by a plain ACK, so the end
always learns whether its migration was accepted.

RTO: Jacobson/Karels (RFC 6298) from control round trips, Karn's rule (no sample from a
retransmitted packet), initial INITIAL_RTO_S = 250 ms (measured, tcp-repair-migration.md
section 4b; the original's 3 s made a lost SYN cost 3 s), clamped to [MIN_RTO_S, MAX_RTO_S],
doubled on every retransmission timeout until the next valid sample. A SYN gives up after
SYN_MAX_RETRANSMITS retransmissions (HandshakeTimeout), a SYN-ACK REQUEST_LIFETIME_S after the
SYN arrived, a FIN after CONTROL_MAX_RETRANSMITS (ControlTimeout), an RSYN MIGRATION_TIMEOUT_S
after `migrate` (MigrationFailed).

Security (serval-protocol.md sections 6.4 and 11)
-------------------------------------------------
flowIDs, nonces and initial vernos are drawn from the caller's `random.Random` (a daemon passes
`random.SystemRandom()`). Every control packet after the SYN / SYN-ACK must carry the peer's nonce
-- RST included, which the original exempted. An RST may instead echo *our* nonce: that is what a
host that lost the flow can send (it copies the nonce of the packet it rejects), and an
off-path attacker knows neither nonce. RSYN, RSYN-ACK, RSYN-NACK, the migration abort and the
final migration ACK carry an `AuthExt` (key id FLOW_KEY_ID) under the per-flow key
`wire.flow_key(client nonce, server nonce, client flow, server flow, domain_key)`; a packet
whose nonce, authenticator, flowIDs or verno is wrong is dropped and counted and changes nothing.
A replayed RSYN is old (verno below `rcv_nxt`) and is ignored; a duplicate of the RSYN being
answered is answered again only towards the address the first copy came from.

Migration (serval-protocol.md section 6, tcp-repair-migration.md section 3)
--------------------------------------------------------------------------
Initiator I, responder R:
1. I: `migrate(new_address, info)` -> RSYN(info) from the new address. Sub-state RSYN_SENT.
2. R: MigrationRequested(info, I's new address); the runtime freezes and rebuilds, then calls
   `accept_migration(R's info)` -> RSYN-ACK, retransmitted until step 4, or
   `refuse_migration()` -> RSYN-NACK. Sub-state RSYN_RECV.
3. I on the RSYN-ACK: MigrationCompleted(initiator=True, R's info), sends the final ACK.
4. R on the final ACK, or on `data_arrived()` (data reached the new socket, so I has switched):
   switches its destination to I's new address, MigrationCompleted(initiator=False).
Timeouts roll back: I after MIGRATION_TIMEOUT_S, R after MIGRATION_RESPONDER_TIMEOUT_S (longer,
so R never gives up while I can still complete). An RSYN-ACK that I cannot match to a live
migration (it gave up already) is answered with an authenticated abort so R rolls back at once;
one for the migration I completed last is answered with the final ACK again (lost final ACK).

Both ends at once. When RSYNs cross, the end whose (flowID, nonce) is lower yields: the winner
refuses the loser's RSYN with an RSYN-NACK and carries on; the loser, in RSYN_SENT_RECV, holds the
winner's RSYN until that refusal arrives, then reports MigrationFailed(YIELDED) followed by
MigrationRequested for the winner's migration. So the runtime only ever runs one migration per
flow at a time, and no RSYN is left unanswered on the wire: a stale RSYN can never be taken for
a new one later. A loser whose RSYN had not left yet (queued behind a FIN) just cancels it.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from serval.core import wire
from serval.core.ids import FlowID, ServiceID, new_nonce
from serval.core.wire import (
    Address,
    ControlExt,
    ControlFlags,
    MigrateExt,
    Protocol,
    SalPacket,
    ServiceExt,
    SourceExt,
    TransportExt,
)
from serval.errors import FlowStateError

__all__ = [
    "CONTROL_MAX_RETRANSMITS",
    "CONTROL_WINDOW",
    "FIN_WAIT2_TIMEOUT_S",
    "FLOW_KEY_ID",
    "FLOW_TRANSITIONS",
    "INITIAL_RTO_S",
    "MAX_RTO_S",
    "MIGRATION_RESPONDER_TIMEOUT_S",
    "MIGRATION_TIMEOUT_S",
    "MIGRATION_TRANSITIONS",
    "MIN_RTO_S",
    "REQUEST_LIFETIME_S",
    "RESTORE_VERNO_SKIP",
    "SYN_MAX_RETRANSMITS",
    "TIME_WAIT_S",
    "Closed",
    "Connected",
    "ConnectionRefused",
    "ControlTimeout",
    "Datagram",
    "Event",
    "Flow",
    "FlowCounters",
    "FlowExport",
    "FlowInput",
    "FlowState",
    "HandshakeTimeout",
    "MigrationCompleted",
    "MigrationFailed",
    "MigrationFailure",
    "MigrationInput",
    "MigrationRequested",
    "MigrationState",
    "PeerClosed",
    "Reset",
    "export_flow",
    "reset_for",
    "restore_flow",
]

# -- constants ---------------------------------------------------------------------------------

INITIAL_RTO_S = 0.25  # before any RTT sample; a SYN is retried at 0.25, 0.75, 1.75, 3.75 s ...
MIN_RTO_S = 0.2
MAX_RTO_S = 60.0
RTO_GRANULARITY_S = 0.001  # G of RFC 6298: the floor of the variance term
SYN_MAX_RETRANSMITS = 6  # 0.25 * (2**7 - 1) = 31.75 s before HandshakeTimeout
CONTROL_MAX_RETRANSMITS = 8  # FIN: at least 0.2 * 511 = 102 s before ControlTimeout
REQUEST_LIFETIME_S = 3.0  # server: a SYN not completed by then is aborted (the original's 3 s)
MIGRATION_TIMEOUT_S = 3.0  # initiator rolls back without an answer (measured recipe, 3 s)
MIGRATION_RESPONDER_TIMEOUT_S = 6.0  # responder waits longer than the initiator can complete
TIME_WAIT_S = 10.0  # re-ACKs a retransmitted FIN; flowIDs are random, so no reuse hazard
FIN_WAIT2_TIMEOUT_S = 60.0  # the original's SAL_FIN_TIMEOUT
CONTROL_WINDOW = 1 << 16  # acceptable verno distance from rcv_nxt (gaps: abandoned RSYNs)
FLOW_KEY_ID = 0  # AuthExt key id of the per-flow key

_SEQ_MOD = 1 << 32
_SEQ_HALF = 1 << 31

Datagram = tuple[SalPacket, Address | None]

_SYN = ControlFlags.SYN
_RSYN = ControlFlags.RSYN
_ACK = ControlFlags.ACK
_NACK = ControlFlags.NACK
_RST = ControlFlags.RST
_FIN = ControlFlags.FIN


def _seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit serial-number arithmetic, as a signed value."""
    return ((a - b + _SEQ_HALF) % _SEQ_MOD) - _SEQ_HALF


def _seq_add(a: int, n: int) -> int:
    return (a + n) % _SEQ_MOD


# -- states and tables -------------------------------------------------------------------------


class FlowState(enum.Enum):
    """SAL connection states (the original's, named like TCP's; LISTEN lives in Listener)."""

    CLOSED = "CLOSED"
    REQUEST = "REQUEST"  # SYN sent (active open)
    RESPOND = "RESPOND"  # SYN-ACK sent (passive open), waiting for the ACK or data
    CONNECTED = "CONNECTED"
    FIN_WAIT1 = "FIN_WAIT1"  # our FIN sent, not acknowledged
    FIN_WAIT2 = "FIN_WAIT2"  # our FIN acknowledged, waiting for the peer's
    CLOSING = "CLOSING"  # FINs crossed; waiting for the ACK of ours
    TIME_WAIT = "TIME_WAIT"  # both FINs done; lingers to re-ACK a retransmitted FIN
    CLOSE_WAIT = "CLOSE_WAIT"  # the peer's FIN received, ours not sent
    LAST_ACK = "LAST_ACK"  # ours sent after the peer's; waiting for its ACK


class FlowInput(enum.Enum):
    """What drives `FLOW_TRANSITIONS`: local calls, accepted packets, timers."""

    CONNECT = "connect"  # local: send a SYN
    RESPOND = "respond"  # local (listener): answer a received SYN with a SYN-ACK
    SYNACK_RECEIVED = "SYN-ACK received"
    HANDSHAKE_ACKED = "handshake acked"  # our SYN-ACK acknowledged: ACK, any later packet, data
    CLOSE = "close"  # local: orderly close, queue a FIN
    FIN_RECEIVED = "FIN received"
    FIN_ACKED = "FIN acked"
    RESET = "RST received"
    ABORT = "abort"  # local: send RST, forget the flow
    GIVE_UP = "retransmissions exhausted"
    TIMER = "state timer expired"  # TIME_WAIT or FIN_WAIT2 ran out


_S = FlowState
_I = FlowInput

FLOW_TRANSITIONS: dict[tuple[FlowState, FlowInput], FlowState] = {
    # Opening.
    (_S.CLOSED, _I.CONNECT): _S.REQUEST,
    (_S.CLOSED, _I.RESPOND): _S.RESPOND,
    (_S.REQUEST, _I.SYNACK_RECEIVED): _S.CONNECTED,
    (_S.REQUEST, _I.CLOSE): _S.CLOSED,  # nothing to tell anyone yet
    (_S.RESPOND, _I.HANDSHAKE_ACKED): _S.CONNECTED,
    # Orderly close (FIN consumes a verno and is retransmitted until acknowledged).
    (_S.CONNECTED, _I.CLOSE): _S.FIN_WAIT1,
    (_S.CONNECTED, _I.FIN_RECEIVED): _S.CLOSE_WAIT,
    (_S.FIN_WAIT1, _I.FIN_ACKED): _S.FIN_WAIT2,
    (_S.FIN_WAIT1, _I.FIN_RECEIVED): _S.CLOSING,  # simultaneous close
    (_S.FIN_WAIT2, _I.FIN_RECEIVED): _S.TIME_WAIT,
    (_S.FIN_WAIT2, _I.TIMER): _S.CLOSED,
    (_S.CLOSING, _I.FIN_ACKED): _S.TIME_WAIT,
    (_S.TIME_WAIT, _I.TIMER): _S.CLOSED,
    (_S.CLOSE_WAIT, _I.CLOSE): _S.LAST_ACK,
    (_S.LAST_ACK, _I.FIN_ACKED): _S.CLOSED,
    # Giving up on an unacknowledged SYN, SYN-ACK or FIN.
    (_S.REQUEST, _I.GIVE_UP): _S.CLOSED,
    (_S.RESPOND, _I.GIVE_UP): _S.CLOSED,
    (_S.FIN_WAIT1, _I.GIVE_UP): _S.CLOSED,
    (_S.CLOSING, _I.GIVE_UP): _S.CLOSED,
    (_S.LAST_ACK, _I.GIVE_UP): _S.CLOSED,
}
# RST sent: from every state but CLOSED straight to CLOSED. RST received: the same, except in
# TIME_WAIT, which ignores it (RFC 1337): the flow has completed, and a stray RST -- e.g. a
# host's answer to a duplicate of our last ACK arriving after the peer closed -- must not turn
# that into a reset.
for _state in FlowState:
    if _state is not FlowState.CLOSED:
        FLOW_TRANSITIONS[(_state, _I.ABORT)] = _S.CLOSED
        if _state is not FlowState.TIME_WAIT:
            FLOW_TRANSITIONS[(_state, _I.RESET)] = _S.CLOSED
del _state

# States in which the flow is synchronized with its peer: migration may start or be answered.
_SYNCHRONIZED = frozenset(
    {_S.CONNECTED, _S.FIN_WAIT1, _S.FIN_WAIT2, _S.CLOSING, _S.CLOSE_WAIT, _S.LAST_ACK}
)


class MigrationState(enum.Enum):
    """The migration sub-state, orthogonal to FlowState (the original's `sal_state`)."""

    RSYN_INITIAL = "RSYN_INITIAL"  # no migration in progress
    RSYN_SENT = "RSYN_SENT"  # we are moving: our RSYN is unanswered
    RSYN_RECV = "RSYN_RECV"  # the peer is moving: we answer its RSYN
    RSYN_SENT_RECV = "RSYN_SENT_RECV"  # RSYNs crossed, we lost the tie-break: ours awaits its
    # refusal while the peer's is held, to be answered once ours is settled


class MigrationInput(enum.Enum):
    MIGRATE = "migrate"  # local
    PEER_RSYN = "peer RSYN accepted"
    CROSSED_WON = "crossing RSYN, we win"  # peer's RSYN refused, ours goes on
    CROSSED_LOST = "crossing RSYN, we yield"  # peer's RSYN held until ours is refused
    OWN_DONE = "RSYN-ACK received"
    OWN_FAILED = "own migration failed"  # refused, timed out, yielded, cancelled
    PEER_DONE = "final ACK or data on the new path"
    PEER_FAILED = "peer migration failed"  # refused by us, timed out, aborted by the peer
    CLEAR = "flow closed"


_M = MigrationState
_MI = MigrationInput

MIGRATION_TRANSITIONS: dict[tuple[MigrationState, MigrationInput], MigrationState] = {
    (_M.RSYN_INITIAL, _MI.MIGRATE): _M.RSYN_SENT,
    (_M.RSYN_INITIAL, _MI.PEER_RSYN): _M.RSYN_RECV,
    (_M.RSYN_SENT, _MI.OWN_DONE): _M.RSYN_INITIAL,
    (_M.RSYN_SENT, _MI.OWN_FAILED): _M.RSYN_INITIAL,
    (_M.RSYN_SENT, _MI.CROSSED_WON): _M.RSYN_SENT,
    (_M.RSYN_SENT, _MI.CROSSED_LOST): _M.RSYN_SENT_RECV,
    (_M.RSYN_RECV, _MI.PEER_DONE): _M.RSYN_INITIAL,
    (_M.RSYN_RECV, _MI.PEER_FAILED): _M.RSYN_INITIAL,
    (_M.RSYN_SENT_RECV, _MI.OWN_DONE): _M.RSYN_RECV,  # then the held RSYN is released
    (_M.RSYN_SENT_RECV, _MI.OWN_FAILED): _M.RSYN_RECV,  # the normal case: the winner refused
}
for _mstate in MigrationState:
    MIGRATION_TRANSITIONS[(_mstate, _MI.CLEAR)] = _M.RSYN_INITIAL
del _mstate


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """The handshake completed. `peer_transport` is what the peer announced (None: no transport
    parameters, e.g. a datagram flow); `peer_address` is its SAL address."""

    peer_address: Address
    peer_transport: TransportExt | None
    peer_flow: int


@dataclass(frozen=True)
class ConnectionRefused:
    """Our SYN was answered with an RST (no listener, backlog full, refused by the server)."""


@dataclass(frozen=True)
class HandshakeTimeout:
    """The SYN (client) or SYN-ACK (server) was never answered; the flow is CLOSED."""


@dataclass(frozen=True)
class PeerClosed:
    """The peer's FIN arrived: it will send no more."""


@dataclass(frozen=True)
class Closed:
    """Both FINs are done (or FIN_WAIT2 ran out); the flow is CLOSED."""


@dataclass(frozen=True)
class Reset:
    """A valid RST arrived; the flow is CLOSED."""


@dataclass(frozen=True)
class ControlTimeout:
    """Our FIN was never acknowledged; the flow is CLOSED."""


@dataclass(frozen=True)
class MigrationRequested:
    """The peer moved (RSYN). Answer with `accept_migration` or `refuse_migration`."""

    peer_migrate: MigrateExt
    new_peer_address: Address


@dataclass(frozen=True)
class MigrationCompleted:
    """A migration finished. As initiator: `peer_migrate` is the responder's RSYN-ACK info and
    our new address is `local_address`. As responder: `peer_migrate` is the initiator's RSYN
    info and `peer_address` its new address, now our destination."""

    initiator: bool
    local_address: Address | None
    peer_address: Address | None
    peer_migrate: MigrateExt


class MigrationFailure(enum.Enum):
    TIMEOUT = "timeout"  # no answer in time (either role)
    REFUSED = "refused"  # the peer answered RSYN-NACK
    YIELDED = "yielded"  # RSYNs crossed and the peer won the tie-break
    ABORTED = "aborted"  # responder: the initiator gave up (abort NACK) or moved again


@dataclass(frozen=True)
class MigrationFailed:
    """A migration was rolled back; `initiator` says whether it was ours."""

    initiator: bool
    reason: MigrationFailure


Event = (
    Connected
    | ConnectionRefused
    | HandshakeTimeout
    | PeerClosed
    | Closed
    | Reset
    | ControlTimeout
    | MigrationRequested
    | MigrationCompleted
    | MigrationFailed
)


@dataclass
class FlowCounters:
    """Per-flow counters; everything dropped is counted under why."""

    packets_received: int = 0
    packets_sent: int = 0
    retransmissions: int = 0
    rtt_samples: int = 0
    bad_nonce: int = 0
    bad_auth: int = 0
    bad_flow: int = 0  # wrong src/dst flowID
    out_of_window: int = 0  # verno too far from rcv_nxt
    invalid_ack: int = 0  # acknowledges something never sent
    duplicates: int = 0  # retransmitted consuming packets answered again
    stale: int = 0  # old packets dropped
    ignored: int = 0  # well-formed but meaningless in the current state
    extra_synacks: int = 0  # SYN-ACKs from a second instance, reset


# -- internal records --------------------------------------------------------------------------


class _Kind(enum.Enum):
    SYN = "SYN"
    SYN_ACK = "SYN-ACK"
    FIN = "FIN"
    RSYN = "RSYN"


@dataclass(eq=False)
class _Control:
    """A consuming control packet in the ordered retransmission queue."""

    kind: _Kind
    max_retransmits: int
    deadline: float | None = None  # absolute give-up time
    migrate: MigrateExt | None = None
    verno: int | None = None  # assigned at first transmission
    transmissions: int = 0
    first_sent_at: float = 0.0
    timer_at: float | None = None


@dataclass(eq=False)
class _OwnMigration:
    entry: _Control
    old_local_address: Address | None
    new_local_address: Address
    deadline: float


@dataclass(eq=False)
class _PeerMigration:
    verno: int  # of the peer's RSYN
    info: MigrateExt
    new_peer_address: Address
    deadline: float
    answered: bool = False
    transmissions: int = 0
    first_sent_at: float = 0.0
    retransmit_at: float | None = None


class _RequestOwner(TypingProtocol):
    """The Listener, notified when a request flow leaves RESPOND / its pending state."""

    def _request_finished(self, flow: Flow) -> None: ...


def reset_for(packet: SalPacket) -> SalPacket | None:
    """The RST a host sends for a packet that matches no flow, or None.

    It echoes the offending packet's nonce -- the only nonce a host without the flow knows,
    and one an off-path attacker cannot know -- and acknowledges the packet's verno. An RST is
    never answered, nor is a pure ACK: it asks for nothing, and the usual stray ACK is a
    duplicate of the last one of a flow that has just closed.
    """
    control = packet.control
    if control is None or control.flags & _RST or control.flags == _ACK:
        return None
    consumed = 1 if _consumes(control.flags) else 0
    return SalPacket(
        src_flow=packet.dst_flow,
        dst_flow=packet.src_flow,
        protocol=packet.protocol,
        control=ControlExt(
            flags=_RST | _ACK,
            verno=control.ackno if control.flags & _ACK else 0,
            ackno=_seq_add(control.verno, consumed),
            nonce=control.nonce,
        ),
    )


def _consumes(flags: ControlFlags) -> bool:
    """Whether a packet with these flags takes a verno (SYN, SYN-ACK, FIN, RSYN)."""
    if flags & (_SYN | _FIN):
        return True
    return bool(flags & _RSYN) and not flags & _ACK


# -- the flow ----------------------------------------------------------------------------------


class Flow:
    """One end of a SAL connection. Create with `Flow.connect` or through a `Listener`."""

    def __init__(
        self,
        *,
        service: ServiceID,
        rng: random.Random,
        now: float,
        protocol: Protocol = Protocol.TCP,
        local_transport: TransportExt | None = None,
        local_address: Address | None = None,
        peer_address: Address | None = None,
        domain_key: bytes = b"",
        is_client: bool = True,
    ) -> None:
        self.service = service
        self.protocol = protocol
        self.local_flow = FlowID.random(rng)
        self.local_nonce = new_nonce(rng)
        self.local_transport = local_transport
        self.local_address = local_address
        self.peer_address = peer_address
        self.peer_flow = 0
        self.peer_nonce: bytes | None = None
        self.peer_transport: TransportExt | None = None
        self.is_client = is_client
        self.counters = FlowCounters()
        self.created_at = now

        self._state = FlowState.CLOSED
        self._closed_by: FlowInput | None = None  # what moved the flow to CLOSED
        self._migration_state = MigrationState.RSYN_INITIAL
        self._domain_key = domain_key
        self._key: bytes | None = None

        self._iss = rng.getrandbits(32)
        self._snd_una = self._iss
        self._snd_nxt = self._iss
        self._rcv_nxt = 0
        self._last_rcv_verno: int | None = None

        self._queue: deque[_Control] = deque()
        self._outbox: list[Datagram] = []
        self._events: deque[Event] = deque()

        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = INITIAL_RTO_S
        self._state_timer_at: float | None = None

        self._own: _OwnMigration | None = None
        self._peer_migration: _PeerMigration | None = None
        self._held: _PeerMigration | None = None
        self._rsyn_answer: tuple[int, SalPacket, Address] | None = None
        self._last_completed_rsyn: int | None = None
        # Our last completed migration until the runtime has taken its final ACK: what
        # `abandon_migration` needs to take it back (the final ACK, the address we left).
        self._uncommitted: tuple[SalPacket, Address | None] | None = None

        self._owner: _RequestOwner | None = None
        self._syn_trail: SourceExt | None = None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        service: ServiceID,
        local_transport: TransportExt | None,
        now: float,
        rng: random.Random,
        *,
        peer_address: Address | None = None,
        local_address: Address | None = None,
        protocol: Protocol = Protocol.TCP,
        domain_key: bytes = b"",
    ) -> Flow:
        """Active open: a new flow in REQUEST with its SYN ready in `datagrams_to_send`.

        `peer_address` is an advisory address: the SYN goes straight there instead of being
        resolved. `domain_key` must match the peer's for migration packets to verify.
        """
        flow = cls(
            service=service,
            rng=rng,
            now=now,
            protocol=protocol,
            local_transport=local_transport,
            local_address=local_address,
            peer_address=peer_address,
            domain_key=domain_key,
            is_client=True,
        )
        flow._transition(FlowInput.CONNECT)
        flow._queue.append(_Control(_Kind.SYN, SYN_MAX_RETRANSMITS))
        flow._pump(now)
        return flow

    @classmethod
    def _from_syn(
        cls,
        packet: SalPacket,
        source: Address,
        now: float,
        rng: random.Random,
        *,
        domain_key: bytes,
        local_address: Address | None,
        owner: _RequestOwner | None,
    ) -> Flow:
        """Passive side: the request flow for a SYN (CLOSED until `_respond`)."""
        control = packet.control
        service = packet.destination_service
        assert control is not None and service is not None  # checked by the Listener
        peer_address = packet.source.addresses[0] if packet.source is not None else source
        flow = cls(
            service=service,
            rng=rng,
            now=now,
            protocol=packet.protocol,
            local_address=local_address,
            peer_address=peer_address,
            domain_key=domain_key,
            is_client=False,
        )
        flow.peer_flow = int(packet.src_flow)
        flow.peer_nonce = control.nonce
        flow.peer_transport = packet.transport
        flow._rcv_nxt = _seq_add(control.verno, 1)
        flow._last_rcv_verno = control.verno
        flow._owner = owner
        if (
            packet.source is not None
            and local_address is not None
            and len(packet.source.addresses) < wire.SOURCE_MAX_ADDRESSES
        ):
            # Serval's SYN-ACK carries the SOURCE trail with the server's address appended.
            flow._syn_trail = SourceExt((*packet.source.addresses, local_address))
        flow._derive_key()
        return flow

    # -- queries -------------------------------------------------------------------------------

    @property
    def state(self) -> FlowState:
        return self._state

    @property
    def migration_state(self) -> MigrationState:
        return self._migration_state

    @property
    def is_closed(self) -> bool:
        return self._state is FlowState.CLOSED

    @property
    def rto(self) -> float:
        """The current retransmission timeout in seconds (after any backoff)."""
        return self._rto

    @property
    def srtt(self) -> float | None:
        """Smoothed control round-trip time, None before the first sample."""
        return self._srtt

    def __repr__(self) -> str:
        return (
            f"Flow({self.local_flow}->{self.peer_flow}, {self._state.value}, "
            f"{self._migration_state.value})"
        )

    # -- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Packets to send, each with its destination (None: resolve the SYN's service)."""
        self._pump(now)
        return self._take_datagrams()

    def _take_datagrams(self) -> list[Datagram]:
        out, self._outbox = self._outbox, []
        self._uncommitted = None  # its final ACK (if any) is on its way now
        self.counters.packets_sent += len(out)
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When `handle_timer` must next run (absolute seconds), or None."""
        candidates: list[float] = []
        if self._queue and self._queue[0].timer_at is not None:
            candidates.append(self._queue[0].timer_at)
        if self._state_timer_at is not None:
            candidates.append(self._state_timer_at)
        if self._own is not None:
            candidates.append(self._own.deadline)
        migration = self._peer_migration
        if migration is not None:
            candidates.append(migration.deadline)
            if migration.retransmit_at is not None:
                candidates.append(migration.retransmit_at)
        return min(candidates) if candidates else None

    # -- local calls ---------------------------------------------------------------------------

    def close(self, now: float) -> None:
        """Orderly close: queue a FIN (CONNECTED, CLOSE_WAIT) or drop an unanswered SYN."""
        new_state = self._transition(FlowInput.CLOSE)
        if new_state is FlowState.CLOSED:
            self._enter_closed()
            return
        self._queue.append(_Control(_Kind.FIN, CONTROL_MAX_RETRANSMITS))
        self._pump(now)

    def abort(self, now: float) -> None:
        """Send an RST (when the peer is known) and forget the flow. No event follows."""
        self._require(FlowInput.ABORT)
        self._send_reset()
        self._transition(FlowInput.ABORT)
        self._enter_closed()

    def migrate(self, new_local_address: Address, migrate_info: MigrateExt, now: float) -> None:
        """Start moving this end to `new_local_address`: an RSYN carrying `migrate_info`."""
        if self._state not in _SYNCHRONIZED:
            raise FlowStateError(
                f"flow {self.local_flow}: migrate is illegal in state {self._state.value}"
            )
        self._migration_transition(MigrationInput.MIGRATE)
        entry = _Control(_Kind.RSYN, 1 << 30, deadline=now + MIGRATION_TIMEOUT_S)
        entry.migrate = migrate_info
        self._own = _OwnMigration(
            entry=entry,
            old_local_address=self.local_address,
            new_local_address=new_local_address,
            deadline=now + MIGRATION_TIMEOUT_S,
        )
        # Control packets leave from the new address from now on: the old one may be gone.
        self.local_address = new_local_address
        self._queue.append(entry)
        self._pump(now)

    def accept_migration(self, local_info: MigrateExt, now: float) -> None:
        """Answer the peer's RSYN with an RSYN-ACK carrying our `local_info`."""
        migration = self._peer_migration
        if migration is None or migration.answered:
            raise FlowStateError(
                f"flow {self.local_flow}: no migration request to accept "
                f"(migration state {self._migration_state.value})"
            )
        migration.answered = True
        migration.transmissions = 1
        migration.first_sent_at = now
        migration.retransmit_at = now + self._rto
        answer = self._sign(
            self._build(
                _RSYN | _ACK,
                self._snd_nxt,
                ackno=_seq_add(migration.verno, 1),
                migrate=local_info,
            )
        )
        self._rsyn_answer = (migration.verno, answer, migration.new_peer_address)
        self._send(answer, migration.new_peer_address)

    def abandon_migration(self, now: float) -> None:
        """Give up our own migration: the runtime could not carry it out (a dump or rebuild
        failed, ...). Allowed after `migrate` until the RSYN-ACK, and after the RSYN-ACK
        (MigrationCompleted) as long as its final ACK has not been taken from
        `datagrams_to_send` -- i.e. while nothing has been sent on the new path, so the
        responder cannot have switched. The final ACK is withdrawn, `local_address` goes back
        to the old address, and once our RSYN has left the peer gets an authenticated abort,
        so it rolls back at once instead of after MIGRATION_RESPONDER_TIMEOUT_S (if the abort
        is lost, its next RSYN-ACK retransmission draws another). No event: the runtime
        decided this itself. A peer RSYN held behind ours is released (MigrationRequested).
        """
        own = self._own
        if own is not None:
            verno = own.entry.verno
            if own.entry in self._queue:
                self._queue.remove(own.entry)
            self._own = None
            self.local_address = own.old_local_address
            self._migration_transition(MigrationInput.OWN_FAILED)
            if verno is not None:
                self._send_abort(verno)
            self._release_held(now)
            self._pump(now)
            return
        uncommitted = self._uncommitted
        last = self._last_completed_rsyn
        if uncommitted is None or last is None or not any(
            packet is uncommitted[0] for packet, _ in self._outbox
        ):
            raise FlowStateError(
                f"flow {self.local_flow}: no migration of ours to abandon (migration state "
                f"{self._migration_state.value}; a final ACK already sent cannot be taken back)"
            )
        self._outbox = [item for item in self._outbox if item[0] is not uncommitted[0]]
        self._uncommitted = None
        self._last_completed_rsyn = None  # a retransmitted RSYN-ACK now draws an abort
        self.local_address = uncommitted[1]
        self._send_abort(last)

    def refuse_migration(self, now: float) -> None:
        """Answer the peer's RSYN with an RSYN-NACK; the peer rolls back."""
        migration = self._peer_migration
        if migration is None or migration.answered:
            raise FlowStateError(
                f"flow {self.local_flow}: no migration request to refuse "
                f"(migration state {self._migration_state.value})"
            )
        self._send_refusal(migration.verno, migration.new_peer_address)
        self._peer_migration = None
        self._migration_transition(MigrationInput.PEER_FAILED)

    def data_arrived(self, now: float) -> None:
        """The runtime saw data on this flow's (new) kernel socket.

        In RESPOND it stands for the lost handshake ACK; while answering a migration it stands
        for the lost final ACK (the initiator only sends on the new path once it switched).
        Otherwise it changes nothing.
        """
        if self._state is FlowState.RESPOND and self._queue:
            # No RTT sample: when the data left says nothing about the SYN-ACK round trip.
            self._queue.popleft()
            self._snd_una = self._snd_nxt
            self._handshake_acked()
        elif self._peer_migration is not None and self._peer_migration.answered:
            self._complete_peer_migration(now)
        self._pump(now)

    # -- timers --------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        if self._state_timer_at is not None and now >= self._state_timer_at:
            self._state_timer_at = None
            self._transition(FlowInput.TIMER)
            self._enter_closed()
            self._events.append(Closed())
            return
        own = self._own
        if own is not None and now >= own.deadline:
            self._fail_own_migration(MigrationFailure.TIMEOUT, now, notify_peer=True)
        migration = self._peer_migration
        if migration is not None:
            if now >= migration.deadline:
                self._peer_migration = None
                self._rsyn_answer = None
                self._migration_transition(MigrationInput.PEER_FAILED)
                self._events.append(MigrationFailed(False, MigrationFailure.TIMEOUT))
            elif migration.retransmit_at is not None and now >= migration.retransmit_at:
                self._retransmit_rsyn_answer(migration, now)
        if self._queue:
            head = self._queue[0]
            if head.timer_at is not None and now >= head.timer_at:
                self._on_retransmission_timeout(head, now)
        self._pump(now)

    # -- packets -------------------------------------------------------------------------------

    def handle_packet(self, packet: SalPacket, source: Address, now: float) -> None:
        """Process one decoded SAL packet that arrived from `source` for this flow."""
        self.counters.packets_received += 1
        control = packet.control
        if control is None or packet.dst_flow != self.local_flow:
            self.counters.bad_flow += 1
            return
        if self._state is FlowState.CLOSED:
            self.counters.ignored += 1
            return
        if self._state is FlowState.REQUEST:
            self._handle_in_request(packet, control, source, now)
        elif control.flags & _SYN:
            self._handle_late_synack(packet, control, source)
        else:
            self._handle_synchronized(packet, control, source, now)
        self._pump(now)

    def _handle_in_request(
        self, packet: SalPacket, control: ControlExt, source: Address, now: float
    ) -> None:
        flags = control.flags
        if flags & _RST:
            # Refusal: only the host that saw our SYN knows our nonce and our verno.
            if control.nonce != self.local_nonce:
                self.counters.bad_nonce += 1
                return
            if not flags & _ACK or control.ackno != self._snd_nxt:
                self.counters.invalid_ack += 1
                return
            self._transition(FlowInput.RESET)
            self._enter_closed()
            self._events.append(ConnectionRefused())
            return
        if flags & (_SYN | _ACK) != _SYN | _ACK or flags & (_RSYN | _FIN | _NACK):
            self.counters.ignored += 1
            return
        if control.ackno != self._snd_nxt:
            self.counters.invalid_ack += 1
            return
        if packet.src_flow == 0:
            self.counters.bad_flow += 1
            return
        syn = self._queue.popleft()
        self._sample_rtt(syn, now)
        self._snd_una = self._snd_nxt
        self.peer_flow = int(packet.src_flow)
        self.peer_nonce = control.nonce
        self.peer_transport = packet.transport
        self.peer_address = packet.source.addresses[-1] if packet.source is not None else source
        self._rcv_nxt = _seq_add(control.verno, 1)
        self._last_rcv_verno = control.verno
        self._derive_key()
        self._transition(FlowInput.SYNACK_RECEIVED)
        self._send_handshake_ack()
        self._events.append(Connected(self.peer_address, self.peer_transport, self.peer_flow))

    def _handle_late_synack(self, packet: SalPacket, control: ControlExt, source: Address) -> None:
        """A SYN-ACK after the handshake: our peer's duplicate, or a second instance's."""
        if (
            not self.is_client
            or control.flags & (_SYN | _ACK | _RST) != _SYN | _ACK
            or control.ackno != _seq_add(self._iss, 1)
        ):
            self.counters.ignored += 1
            return
        if packet.src_flow == self.peer_flow:
            if control.nonce != self.peer_nonce:
                self.counters.bad_nonce += 1
                return
            # Our handshake ACK was lost (or the SYN-ACK duplicated): ACK again.
            self.counters.duplicates += 1
            self._send_handshake_ack()
            return
        # A retransmitted SYN was re-resolved to another instance, which answered too. Reset
        # it so it releases its pending socket now instead of after REQUEST_LIFETIME_S; it
        # accepts our nonce because it is the peer nonce it learned from our SYN.
        self.counters.extra_synacks += 1
        rst = SalPacket(
            src_flow=self.local_flow,
            dst_flow=packet.src_flow,
            protocol=self.protocol,
            control=ControlExt(
                flags=_RST | _ACK,
                verno=control.ackno,
                ackno=_seq_add(control.verno, 1),
                nonce=self.local_nonce,
            ),
        )
        self._send(rst, packet.source.addresses[-1] if packet.source is not None else source)

    def _handle_synchronized(
        self, packet: SalPacket, control: ControlExt, source: Address, now: float
    ) -> None:
        flags = control.flags
        if packet.src_flow != self.peer_flow:
            self.counters.bad_flow += 1
            return
        nonce_ok = control.nonce == self.peer_nonce or (
            bool(flags & _RST) and control.nonce == self.local_nonce
        )
        if not nonce_ok:
            self.counters.bad_nonce += 1
            return
        if (flags & (_RSYN | _NACK) or packet.auth is not None) and not self._auth_ok(packet):
            self.counters.bad_auth += 1
            return
        distance = _seq_diff(control.verno, self._rcv_nxt)
        if _consumes(flags):
            if distance < 0:
                self._handle_duplicate(packet, control, source)
                return
            if distance >= CONTROL_WINDOW:
                self.counters.out_of_window += 1
                return
        elif not -CONTROL_WINDOW <= distance < CONTROL_WINDOW:
            self.counters.out_of_window += 1
            return
        if flags & _RST:
            if (self._state, FlowInput.RESET) not in FLOW_TRANSITIONS:
                self.counters.ignored += 1  # TIME_WAIT
                return
            self._transition(FlowInput.RESET)
            self._enter_closed()
            self._events.append(Reset())
            return
        if flags & _ACK and not self._process_ack(control.ackno, now):
            return
        if self._state is FlowState.CLOSED:  # our FIN's ACK completed LAST_ACK
            return
        if self._state is FlowState.RESPOND:
            # Nothing but the acknowledgement of our SYN-ACK moves a request flow on.
            self.counters.ignored += 1
            return
        if flags & _FIN:
            self._handle_fin(control, now)
        elif flags & _RSYN:
            if not flags & _ACK:
                self._handle_rsyn(packet, control, source, now)
            elif flags & _NACK:
                self._handle_refusal(control, now)
            else:
                self._handle_rsyn_ack(packet, control, source, now)
        elif flags & _NACK:
            self._handle_abort(control)
        elif packet.auth is not None and flags == _ACK:
            self._handle_final_ack(control, now)

    def _handle_duplicate(self, packet: SalPacket, control: ControlExt, source: Address) -> None:
        if control.verno != self._last_rcv_verno:
            self.counters.stale += 1
            return
        if control.flags & _FIN:
            self.counters.duplicates += 1
            self._send_pure_ack()
            return
        answer = self._rsyn_answer
        if answer is not None and answer[0] == control.verno and answer[2] == source:
            self.counters.duplicates += 1
            self._send(answer[1], answer[2])
            return
        self.counters.stale += 1

    def _process_ack(self, ackno: int, now: float) -> bool:
        """Retire what `ackno` acknowledges. False: it acknowledges the unsent (drop packet)."""
        if _seq_diff(ackno, self._snd_nxt) > 0:
            self.counters.invalid_ack += 1
            return False
        if _seq_diff(ackno, self._snd_una) <= 0:
            return True  # nothing new
        self._snd_una = ackno
        while self._queue:
            head = self._queue[0]
            if head.verno is None or _seq_diff(head.verno, ackno) >= 0:
                break
            if head.kind is _Kind.RSYN:
                break  # retired only by its answer (RSYN-ACK or RSYN-NACK)
            self._queue.popleft()
            self._sample_rtt(head, now)
            if head.kind is _Kind.SYN_ACK:
                self._handshake_acked()
            elif head.kind is _Kind.FIN:
                self._fin_acked(now)
        return True

    def _handle_fin(self, control: ControlExt, now: float) -> None:
        if (self._state, FlowInput.FIN_RECEIVED) not in FLOW_TRANSITIONS:
            self.counters.ignored += 1
            return
        self._rcv_nxt = _seq_add(control.verno, 1)
        self._last_rcv_verno = control.verno
        self._send_pure_ack()
        new_state = self._transition(FlowInput.FIN_RECEIVED)
        self._events.append(PeerClosed())
        self._after_close_step(new_state, now)

    # -- migration, receiving side -------------------------------------------------------------

    def _handle_rsyn(
        self, packet: SalPacket, control: ControlExt, source: Address, now: float
    ) -> None:
        info = packet.migrate
        if info is None or self._state not in _SYNCHRONIZED:
            self.counters.ignored += 1
            return
        state = self._migration_state
        if state in (MigrationState.RSYN_RECV, MigrationState.RSYN_SENT_RECV):
            # Busy with the peer's previous RSYN: not consumed, so the peer retransmits it
            # and it is taken once the previous one is settled either way.
            self.counters.ignored += 1
            return
        request = _PeerMigration(
            verno=control.verno,
            info=info,
            new_peer_address=source,
            deadline=now + MIGRATION_RESPONDER_TIMEOUT_S,
        )
        own = self._own
        if state is MigrationState.RSYN_SENT and own is not None:
            if own.entry.verno is None:
                # Ours never left (queued behind a FIN): the peer cannot know it, so cancel.
                self._fail_own_migration(MigrationFailure.YIELDED, now)
            elif self._wins_tiebreak():
                self._consume(control.verno)
                self._send_refusal(control.verno, source)
                self._migration_transition(MigrationInput.CROSSED_WON)
                return
            else:
                self._consume(control.verno)
                self._held = request
                self._migration_transition(MigrationInput.CROSSED_LOST)
                return
        self._consume(control.verno)
        self._start_peer_migration(request)

    def _handle_rsyn_ack(
        self, packet: SalPacket, control: ControlExt, source: Address, now: float
    ) -> None:
        own = self._own
        if (
            own is not None
            and own.entry.verno is not None
            and control.ackno == _seq_add(own.entry.verno, 1)
        ):
            if packet.migrate is None:
                self.counters.ignored += 1
                return
            self._retire_own_entry(own, now)
            self._last_completed_rsyn = own.entry.verno
            self._own = None
            self._migration_transition(MigrationInput.OWN_DONE)
            final_ack = self._send_final_ack()
            self._uncommitted = (
                None if final_ack is None else (final_ack, own.old_local_address)
            )
            self._events.append(
                MigrationCompleted(True, self.local_address, self.peer_address, packet.migrate)
            )
            self._release_held(now)
            return
        last = self._last_completed_rsyn
        if last is not None and control.ackno == _seq_add(last, 1):
            self.counters.duplicates += 1
            self._send_final_ack()  # ours was lost: the responder is still waiting
            return
        # An answer to an RSYN we gave up on: tell the responder to roll back now.
        self.counters.stale += 1
        self._send_abort(_seq_add(control.ackno, -1), source)

    def _handle_refusal(self, control: ControlExt, now: float) -> None:
        own = self._own
        if own is None or own.entry.verno is None or control.ackno != _seq_add(own.entry.verno, 1):
            self.counters.stale += 1
            return
        reason = (
            MigrationFailure.YIELDED
            if self._migration_state is MigrationState.RSYN_SENT_RECV
            else MigrationFailure.REFUSED
        )
        self._retire_own_entry(own, now)
        self._fail_own_migration(reason, now)

    def _handle_abort(self, control: ControlExt) -> None:
        migration = self._peer_migration
        if migration is None or not migration.answered or control.verno != migration.verno:
            self.counters.stale += 1
            return
        self._peer_migration = None
        self._rsyn_answer = None
        self._migration_transition(MigrationInput.PEER_FAILED)
        self._events.append(MigrationFailed(False, MigrationFailure.ABORTED))

    def _handle_final_ack(self, control: ControlExt, now: float) -> None:
        migration = self._peer_migration
        # Sent after the RSYN, so its verno is past it: older final ACKs cannot be replayed.
        if (
            migration is None
            or not migration.answered
            or _seq_diff(control.verno, migration.verno) < 1
        ):
            self.counters.stale += 1
            return
        self._complete_peer_migration(now)

    def _start_peer_migration(self, request: _PeerMigration) -> None:
        self._peer_migration = request
        self._migration_transition(MigrationInput.PEER_RSYN)
        self._events.append(MigrationRequested(request.info, request.new_peer_address))

    def _release_held(self, now: float) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        # The held request waited on our own migration; its clock starts now.
        held.deadline = now + MIGRATION_RESPONDER_TIMEOUT_S
        self._peer_migration = held
        self._events.append(MigrationRequested(held.info, held.new_peer_address))

    def _complete_peer_migration(self, now: float) -> None:
        migration = self._peer_migration
        assert migration is not None
        if migration.transmissions == 1:
            self._add_rtt_sample(now - migration.first_sent_at)
        self.peer_address = migration.new_peer_address
        self._peer_migration = None
        self._rsyn_answer = None
        self._migration_transition(MigrationInput.PEER_DONE)
        self._events.append(
            MigrationCompleted(False, self.local_address, self.peer_address, migration.info)
        )

    def _retransmit_rsyn_answer(self, migration: _PeerMigration, now: float) -> None:
        answer = self._rsyn_answer
        if answer is None:
            migration.retransmit_at = None
            return
        self._rto = min(self._rto * 2, MAX_RTO_S)
        migration.transmissions += 1
        migration.retransmit_at = now + self._rto
        self.counters.retransmissions += 1
        self._send(answer[1], answer[2])

    # -- migration, initiating side ------------------------------------------------------------

    def _wins_tiebreak(self) -> bool:
        """Crossing RSYNs: the end with the lower (flowID, nonce) yields. Both ends compare
        the same two pairs, so exactly one wins; nonces settle equal flowIDs."""
        assert self.peer_nonce is not None
        return (int(self.local_flow), self.local_nonce) > (self.peer_flow, self.peer_nonce)

    def _retire_own_entry(self, own: _OwnMigration, now: float) -> None:
        if own.entry in self._queue:
            self._queue.remove(own.entry)
            self._sample_rtt(own.entry, now)

    def _fail_own_migration(
        self, reason: MigrationFailure, now: float, *, notify_peer: bool = False
    ) -> None:
        """`notify_peer`: we give up unanswered (timeout). The peer may have got the RSYN
        and be answering it with RSYN-ACKs that do not reach us: the abort makes it roll
        back now rather than after MIGRATION_RESPONDER_TIMEOUT_S."""
        own = self._own
        assert own is not None
        if notify_peer and own.entry.verno is not None:
            self._send_abort(own.entry.verno)
        if own.entry in self._queue:
            self._queue.remove(own.entry)
        self._own = None
        self.local_address = own.old_local_address
        self._migration_transition(MigrationInput.OWN_FAILED)
        self._events.append(MigrationFailed(True, reason))
        self._release_held(now)

    def _send_refusal(self, rsyn_verno: int, destination: Address) -> None:
        refusal = self._sign(
            self._build(_RSYN | _ACK | _NACK, self._snd_nxt, ackno=_seq_add(rsyn_verno, 1))
        )
        self._rsyn_answer = (rsyn_verno, refusal, destination)
        self._send(refusal, destination)

    def _send_final_ack(self) -> SalPacket | None:
        if self.peer_address is None:
            return None
        final_ack = self._sign(self._build(_ACK, self._snd_nxt))
        self._send(final_ack, self.peer_address)
        return final_ack

    def _send_abort(self, rsyn_verno: int, destination: Address | None = None) -> None:
        """The migration abort: the RSYN numbered `rsyn_verno` is given up."""
        target = destination if destination is not None else self.peer_address
        if target is not None:
            self._send(self._sign(self._build(_ACK | _NACK, rsyn_verno)), target)

    # -- close helpers -------------------------------------------------------------------------

    def _fin_acked(self, now: float) -> None:
        new_state = self._transition(FlowInput.FIN_ACKED)
        self._after_close_step(new_state, now)

    def _after_close_step(self, new_state: FlowState, now: float) -> None:
        if new_state is FlowState.CLOSED:
            self._enter_closed()
            self._events.append(Closed())
        elif new_state is FlowState.TIME_WAIT:
            self._state_timer_at = now + TIME_WAIT_S
        elif new_state is FlowState.FIN_WAIT2:
            self._state_timer_at = now + FIN_WAIT2_TIMEOUT_S

    def _handshake_acked(self) -> None:
        self._transition(FlowInput.HANDSHAKE_ACKED)
        assert self.peer_address is not None
        self._events.append(Connected(self.peer_address, self.peer_transport, self.peer_flow))
        if self._owner is not None:
            self._owner._request_finished(self)

    def _enter_closed(self) -> None:
        self._queue.clear()
        self._state_timer_at = None
        self._own = None
        self._peer_migration = None
        self._held = None
        self._rsyn_answer = None
        self._migration_transition(MigrationInput.CLEAR)
        if self._owner is not None:
            self._owner._request_finished(self)

    # -- retransmission ------------------------------------------------------------------------

    def _on_retransmission_timeout(self, head: _Control, now: float) -> None:
        expired = head.deadline is not None and now >= head.deadline
        if expired or head.transmissions > head.max_retransmits:
            self._give_up(head, now)
            return
        self._rto = min(self._rto * 2, MAX_RTO_S)  # RFC 6298 5.5: back off
        head.transmissions += 1
        head.timer_at = self._timer_for(head, now)
        self.counters.retransmissions += 1
        self._transmit(head)

    def _give_up(self, head: _Control, now: float) -> None:
        if head.kind is _Kind.RSYN:
            self._fail_own_migration(MigrationFailure.TIMEOUT, now, notify_peer=True)
            return
        if head.kind is _Kind.SYN_ACK:
            # The client may believe it is connected (all our SYN-ACKs or its ACKs lost):
            # tell it, rather than leave it half-open (tcp-repair-migration.md pitfall 7).
            self._send_reset()
        self._transition(FlowInput.GIVE_UP)
        self._enter_closed()
        if head.kind in (_Kind.SYN, _Kind.SYN_ACK):
            self._events.append(HandshakeTimeout())
        else:
            self._events.append(ControlTimeout())

    def _timer_for(self, entry: _Control, now: float) -> float:
        timer = now + self._rto
        if entry.deadline is not None:
            timer = min(timer, entry.deadline)
        return timer

    def _pump(self, now: float) -> None:
        """Send the queue head if it has never been sent (stop-and-wait)."""
        if not self._queue or self._state is FlowState.CLOSED:
            return
        head = self._queue[0]
        if head.verno is not None:
            return
        head.verno = self._snd_nxt
        self._snd_nxt = _seq_add(self._snd_nxt, 1)
        head.transmissions = 1
        head.first_sent_at = now
        head.timer_at = self._timer_for(head, now)
        self._transmit(head)

    def _transmit(self, entry: _Control) -> None:
        assert entry.verno is not None
        if entry.kind is _Kind.SYN:
            packet = SalPacket(
                src_flow=self.local_flow,
                dst_flow=0,
                protocol=self.protocol,
                control=ControlExt(_SYN, entry.verno, 0, self.local_nonce),
                services=(ServiceExt(self.service),),
                transport=self.local_transport,
            )
            # None: resolve again on every (re)transmission, unless an advisory address.
            self._send(packet, self.peer_address)
            return
        assert self.peer_address is not None
        if entry.kind is _Kind.SYN_ACK:
            packet = self._build(_SYN | _ACK, entry.verno, transport=self.local_transport)
            if self._syn_trail is not None:
                packet = dataclasses.replace(packet, source=self._syn_trail)
        elif entry.kind is _Kind.FIN:
            packet = self._build(_FIN | _ACK, entry.verno)
        else:
            packet = self._sign(self._build(_RSYN, entry.verno, migrate=entry.migrate))
        self._send(packet, self.peer_address)

    # -- RTT estimation ------------------------------------------------------------------------

    def _sample_rtt(self, entry: _Control, now: float) -> None:
        if entry.transmissions == 1:  # Karn: a retransmitted packet's ACK is ambiguous
            self._add_rtt_sample(now - entry.first_sent_at)

    def _add_rtt_sample(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        self.counters.rtt_samples += 1
        if self._srtt is None:
            self._srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        rto = self._srtt + max(RTO_GRANULARITY_S, 4 * self._rttvar)
        self._rto = min(max(rto, MIN_RTO_S), MAX_RTO_S)

    # -- packet building -----------------------------------------------------------------------

    def _build(
        self,
        flags: ControlFlags,
        verno: int,
        *,
        ackno: int | None = None,
        transport: TransportExt | None = None,
        migrate: MigrateExt | None = None,
        services: tuple[ServiceExt, ...] = (),
    ) -> SalPacket:
        return SalPacket(
            src_flow=self.local_flow,
            dst_flow=self.peer_flow,
            protocol=self.protocol,
            control=ControlExt(
                flags, verno, self._rcv_nxt if ackno is None else ackno, self.local_nonce
            ),
            services=services,
            transport=transport,
            migrate=migrate,
        )

    def _send(self, packet: SalPacket, destination: Address | None) -> None:
        self._outbox.append((packet, destination))

    def _send_reset(self) -> None:
        if self.peer_nonce is None or self.peer_address is None:
            return  # REQUEST: nobody knows this flow yet
        # A server that has not seen its SYN-ACK acknowledged echoes the client's nonce: the
        # client may still be in REQUEST, where that is the only nonce it can check.
        unsynchronized = not self.is_client and self._state in (_S.CLOSED, _S.RESPOND)
        nonce = self.peer_nonce if unsynchronized else self.local_nonce
        rst = self._build(_RST | _ACK, self._snd_nxt)
        assert rst.control is not None
        rst = dataclasses.replace(rst, control=dataclasses.replace(rst.control, nonce=nonce))
        self._send(rst, self.peer_address)

    def _send_pure_ack(self) -> None:
        if self.peer_address is not None:
            self._send(self._build(_ACK, self._snd_nxt), self.peer_address)

    def _send_handshake_ack(self) -> None:
        # Carries SERVICE like Serval's, so a runtime can route it to the listener by service.
        assert self.peer_address is not None
        ack = self._build(_ACK, self._snd_nxt, services=(ServiceExt(self.service),))
        self._send(ack, self.peer_address)

    def _derive_key(self) -> None:
        assert self.peer_nonce is not None
        if self.is_client:
            client_nonce, server_nonce = self.local_nonce, self.peer_nonce
            client_flow, server_flow = int(self.local_flow), self.peer_flow
        else:
            client_nonce, server_nonce = self.peer_nonce, self.local_nonce
            client_flow, server_flow = self.peer_flow, int(self.local_flow)
        self._key = wire.flow_key(
            client_nonce, server_nonce, client_flow, server_flow, domain_key=self._domain_key
        )

    def _sign(self, packet: SalPacket) -> SalPacket:
        assert self._key is not None
        return wire.sign(packet, self._key, FLOW_KEY_ID)

    def _auth_ok(self, packet: SalPacket) -> bool:
        if self._key is None or packet.auth is None or packet.auth.key_id != FLOW_KEY_ID:
            return False
        return wire.verify(packet, self._key)

    def _consume(self, verno: int) -> None:
        self._rcv_nxt = _seq_add(verno, 1)
        self._last_rcv_verno = verno

    # -- the tables ----------------------------------------------------------------------------

    def _require(self, flow_input: FlowInput) -> FlowState:
        new_state = FLOW_TRANSITIONS.get((self._state, flow_input))
        if new_state is None:
            raise FlowStateError(
                f"flow {self.local_flow}: {flow_input.value} is illegal in state "
                f"{self._state.value}"
            )
        return new_state

    def _transition(self, flow_input: FlowInput) -> FlowState:
        new_state = self._require(flow_input)
        self._state = new_state
        if new_state is FlowState.CLOSED:
            self._closed_by = flow_input
        return new_state

    def _migration_transition(self, migration_input: MigrationInput) -> MigrationState:
        new_state = MIGRATION_TRANSITIONS.get((self._migration_state, migration_input))
        if new_state is None:
            raise FlowStateError(
                f"flow {self.local_flow}: {migration_input.value} is illegal in migration "
                f"state {self._migration_state.value}"
            )
        self._migration_state = new_state
        return new_state

    # -- listener hooks ------------------------------------------------------------------------

    def _respond(self, local_transport: TransportExt | None, now: float) -> None:
        """Listener: answer the SYN this request flow was made from."""
        self._transition(FlowInput.RESPOND)
        self.local_transport = local_transport
        self._queue.append(
            _Control(
                _Kind.SYN_ACK,
                1 << 30,
                deadline=self.created_at + REQUEST_LIFETIME_S,
            )
        )
        self._pump(now)

    def _refuse(self) -> None:
        """Listener: the runtime refused this request (still CLOSED): RST, forget it."""
        assert self._state is FlowState.CLOSED and not self.is_client
        self._send_reset()
        self._enter_closed()

    def _resend_synack(self) -> None:
        """Listener: a duplicate SYN arrived; answer with the very same SYN-ACK."""
        if self._state is not FlowState.RESPOND or not self._queue:
            return
        head = self._queue[0]
        if head.kind is _Kind.SYN_ACK and head.verno is not None:
            head.transmissions += 1  # Karn: the ACK may now answer either copy
            self.counters.duplicates += 1
            self._transmit(head)


# -- hand-back of an established flow (servald restarts) ----------------------------------------

# A restored flow numbers its next control packets this far past the exported snd_nxt: the
# export may be older than the last packets the flow sent (a migration whose updated export
# never reached the socket's owner). The peer accepts consuming packets up to CONTROL_WINDOW
# ahead of its rcv_nxt (gaps are legal: abandoned RSYNs), but drops ones it has seen as stale.
RESTORE_VERNO_SKIP = 256


@dataclass(frozen=True)
class FlowExport:
    """What an established flow needs to go on in another process (servald restarted).

    Only the settled state of a CONNECTED flow with no migration in flight: identities,
    nonces, addresses, the control sequence numbers and the RTT estimate. The per-flow key is
    not part of it: it is derived again from the nonces, flowIDs and the domain key.
    """

    service: ServiceID
    protocol: int
    is_client: bool
    local_flow: int
    peer_flow: int
    local_nonce: bytes
    peer_nonce: bytes
    local_address: Address | None
    peer_address: Address | None
    iss: int
    snd_nxt: int
    rcv_nxt: int
    last_rcv_verno: int | None
    srtt: float | None
    rttvar: float


def export_flow(flow: Flow) -> FlowExport:
    """The hand-back state of a CONNECTED flow (FlowStateError otherwise)."""
    if flow.state is not FlowState.CONNECTED or flow.peer_nonce is None:
        raise FlowStateError(
            f"flow {flow.local_flow}: only a connected flow can be exported "
            f"(state {flow.state.value})"
        )
    return FlowExport(
        service=flow.service,
        protocol=int(flow.protocol),
        is_client=flow.is_client,
        local_flow=int(flow.local_flow),
        peer_flow=flow.peer_flow,
        local_nonce=flow.local_nonce,
        peer_nonce=flow.peer_nonce,
        local_address=flow.local_address,
        peer_address=flow.peer_address,
        iss=flow._iss,
        snd_nxt=flow._snd_nxt,
        rcv_nxt=flow._rcv_nxt,
        last_rcv_verno=flow._last_rcv_verno,
        srtt=flow._srtt,
        rttvar=flow._rttvar,
    )


def restore_flow(export: FlowExport, *, rng: random.Random, now: float,
                 domain_key: bytes = b"") -> Flow:
    """A CONNECTED flow continuing `export`: same flowIDs, nonces and key, migration idle.

    Its next control packet is numbered RESTORE_VERNO_SKIP past the exported snd_nxt (see
    there); what the peer sends is accepted as usual (a stale rcv_nxt only widens what counts
    as new, within CONTROL_WINDOW).
    """
    flow = Flow(
        service=export.service,
        rng=rng,
        now=now,
        protocol=Protocol(export.protocol),
        local_address=export.local_address,
        peer_address=export.peer_address,
        domain_key=domain_key,
        is_client=export.is_client,
    )
    flow.local_flow = FlowID(export.local_flow)
    flow.local_nonce = export.local_nonce
    flow.peer_flow = int(FlowID(export.peer_flow))
    flow.peer_nonce = export.peer_nonce
    flow._state = FlowState.CONNECTED
    flow._iss = export.iss
    flow._snd_nxt = flow._snd_una = _seq_add(export.snd_nxt, RESTORE_VERNO_SKIP)
    flow._rcv_nxt = export.rcv_nxt
    flow._last_rcv_verno = export.last_rcv_verno
    if export.srtt is not None:
        flow._srtt = export.srtt
        flow._rttvar = export.rttvar
        rto = export.srtt + max(RTO_GRANULARITY_S, 4 * export.rttvar)
        flow._rto = min(max(rto, MIN_RTO_S), MAX_RTO_S)
    flow._derive_key()
    return flow
