"""Unit tests of the SAL flow state machine and the listener, driven packet by packet.

Every packet crosses a real encode/decode round trip. `Pair` wires one client Flow and one
server Listener back to back, with no network: the test decides what is delivered, when.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from serval.core import wire
from serval.core.flow import (
    CONTROL_MAX_RETRANSMITS,
    CONTROL_WINDOW,
    FLOW_TRANSITIONS,
    INITIAL_RTO_S,
    MIGRATION_RESPONDER_TIMEOUT_S,
    MIGRATION_TIMEOUT_S,
    MIGRATION_TRANSITIONS,
    MIN_RTO_S,
    REQUEST_LIFETIME_S,
    SYN_MAX_RETRANSMITS,
    TIME_WAIT_S,
    Closed,
    Connected,
    ConnectionRefused,
    ControlTimeout,
    Event,
    Flow,
    FlowState,
    HandshakeTimeout,
    MigrationCompleted,
    MigrationFailed,
    MigrationFailure,
    MigrationRequested,
    MigrationState,
    PeerClosed,
    Reset,
    reset_for,
)
from serval.core.ids import ServiceID
from serval.core.listener import AbortReason, ConnectionRequest, Listener, RequestAborted
from serval.core.wire import Address, ControlExt, ControlFlags, MigrateExt, SalPacket
from serval.errors import FlowStateError
from serval.sim import make_transport

SERVICE = ServiceID.from_name("svc.example")
CLIENT = IPv4Address("10.0.0.1")
CLIENT_NEW = IPv4Address("10.0.0.11")
SERVER = IPv4Address("10.0.0.2")
SERVER_NEW = IPv4Address("10.0.0.12")
ATTACKER = IPv4Address("10.6.6.6")
T0 = 1000.0

SYN = ControlFlags.SYN
ACK = ControlFlags.ACK
FIN = ControlFlags.FIN
RST = ControlFlags.RST
RSYN = ControlFlags.RSYN
NACK = ControlFlags.NACK


def state(flow: Flow) -> FlowState:
    """`flow.state` through a call: mypy would carry an earlier `is` narrowing across the
    flow's methods, which change it."""
    return flow.state


def migration_state(flow: Flow) -> MigrationState:
    return flow.migration_state


def roundtrip(packet: SalPacket) -> SalPacket:
    return wire.decode(wire.encode(packet))


def flags_of(packet: SalPacket) -> ControlFlags:
    assert packet.control is not None
    return packet.control.flags


def control_of(packet: SalPacket) -> ControlExt:
    assert packet.control is not None
    return packet.control


def events(flow: Flow) -> list[Event]:
    out: list[Event] = []
    while (event := flow.next_event()) is not None:
        out.append(event)
    return out


def info(address: Address, rcv_nxt: int = 1234) -> MigrateExt:
    return MigrateExt(rcv_nxt=rcv_nxt, window_edge=rcv_nxt + 65535, address=address, port=7000)


class Pair:
    """A client flow and a server listener (then its accepted flow), back to back."""

    def __init__(self, seed: int = 0, *, backlog: int = 8) -> None:
        self.rng = random.Random(seed)
        self.now = T0
        self.client = Flow.connect(
            SERVICE,
            make_transport(self.rng, CLIENT, 40000),
            self.now,
            self.rng,
            local_address=CLIENT,
        )
        self.listener = Listener(SERVICE, backlog)
        self.server: Flow | None = None
        self.requests: list[Flow] = []

    # Outputs, decoded from their encoding.
    def from_client(self) -> list[tuple[SalPacket, Address | None]]:
        return [(roundtrip(p), d) for p, d in self.client.datagrams_to_send(self.now)]

    def from_server(self) -> list[tuple[SalPacket, Address | None]]:
        sender = self.server if self.server is not None else self.listener
        return [(roundtrip(p), d) for p, d in sender.datagrams_to_send(self.now)]

    # Deliveries.
    def to_server(
        self, packets: list[tuple[SalPacket, Address | None]], source: Address = CLIENT
    ) -> None:
        for packet, _ in packets:
            if self.server is not None:
                self.server.handle_packet(packet, source, self.now)
            else:
                self.listener.handle_packet(
                    packet, source, self.now, self.rng, local_address=SERVER
                )
                self._answer_requests()

    def to_client(
        self, packets: list[tuple[SalPacket, Address | None]], source: Address = SERVER
    ) -> None:
        for packet, _ in packets:
            self.client.handle_packet(packet, source, self.now)

    def _answer_requests(self) -> None:
        while (event := self.listener.next_event()) is not None:
            if isinstance(event, ConnectionRequest):
                self.requests.append(event.flow)
                self.listener.respond(event.flow, make_transport(self.rng, SERVER, 7000), self.now)

    def accept(self) -> Flow:
        flow = self.listener.accept()
        assert flow is not None
        self.server = flow
        return flow

    def establish(self) -> tuple[Flow, Flow]:
        self.to_server(self.from_client())  # SYN
        self.now += 0.01
        self.to_client(self.from_server())  # SYN-ACK
        self.now += 0.01
        self.to_server(self.from_client())  # ACK
        server = self.accept()
        assert state(self.client) is FlowState.CONNECTED
        assert state(server) is FlowState.CONNECTED
        events(self.client)
        events(server)
        return self.client, server

    def fire(self, flow: Flow | Listener) -> None:
        """Advance the clock to `flow`'s timer and run it."""
        timer = flow.get_timer()
        assert timer is not None
        self.now = timer
        flow.handle_timer(self.now)


def snapshot(flow: Flow) -> tuple[object, ...]:
    return (
        flow.state,
        flow.migration_state,
        flow.get_timer(),
        flow.peer_address,
        flow.local_address,
        dataclasses.astuple(flow.counters),
    )


# -- the tables --------------------------------------------------------------------------------


def test_every_state_can_reach_closed_and_closed_only_leaves_by_connect_or_respond() -> None:
    states = {s for s, _ in FLOW_TRANSITIONS} | set(FLOW_TRANSITIONS.values())
    assert states == set(FlowState)
    leaving_closed = {
        i for (s, i), t in FLOW_TRANSITIONS.items() if s is FlowState.CLOSED and t is not s
    }
    assert {i.value for i in leaving_closed} == {"connect", "respond"}


def test_docs_state_table_matches_the_code() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
    state_machine = doc.read_text().split("## State machine", 1)[1]
    rows = set(re.findall(r"^\| `(\w+)` \| (.+?) \| `(\w+)` \|", state_machine, re.M))
    flow_rows = {(s.value, i.value, t.value) for (s, i), t in FLOW_TRANSITIONS.items()}
    migration_rows = {(s.value, i.value, t.value) for (s, i), t in MIGRATION_TRANSITIONS.items()}
    assert flow_rows | migration_rows == rows


ILLEGAL_CALLS: dict[str, tuple[Callable[[Pair], Flow], Callable[[Flow, float], None]]] = {
    "close twice": (
        lambda p: _closed_once(p),
        lambda f, now: f.close(now),
    ),
    "migrate before connected": (
        lambda p: p.client,
        lambda f, now: f.migrate(CLIENT_NEW, info(CLIENT_NEW), now),
    ),
    "accept a migration nobody asked for": (
        lambda p: p.establish()[0],
        lambda f, now: f.accept_migration(info(CLIENT), now),
    ),
    "refuse a migration nobody asked for": (
        lambda p: p.establish()[0],
        lambda f, now: f.refuse_migration(now),
    ),
    "migrate twice": (
        lambda p: _migrating(p),
        lambda f, now: f.migrate(CLIENT, info(CLIENT), now),
    ),
    "abort a closed flow": (
        lambda p: _aborted(p),
        lambda f, now: f.abort(now),
    ),
    "abandon a migration that never started": (
        lambda p: p.establish()[0],
        lambda f, now: f.abandon_migration(now),
    ),
    "abandon a migration whose final ACK has left": (
        lambda p: _completed_migration(p),
        lambda f, now: f.abandon_migration(now),
    ),
}


def _completed_migration(pair: Pair) -> Flow:
    client, server = pair.establish()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    return client  # the test takes the final ACK from datagrams_to_send


def _closed_once(pair: Pair) -> Flow:
    client, _ = pair.establish()
    client.close(pair.now)
    return client


def _migrating(pair: Pair) -> Flow:
    client, _ = pair.establish()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    return client


def _aborted(pair: Pair) -> Flow:
    client, _ = pair.establish()
    client.abort(pair.now)
    return client


@pytest.mark.parametrize("name", sorted(ILLEGAL_CALLS))
def test_illegal_local_calls_raise_and_change_nothing(name: str) -> None:
    pair = Pair()
    setup, call = ILLEGAL_CALLS[name]
    flow = setup(pair)
    flow.datagrams_to_send(pair.now)
    events(flow)
    before = snapshot(flow)
    with pytest.raises(FlowStateError):
        call(flow, pair.now)
    assert snapshot(flow) == before
    assert flow.datagrams_to_send(pair.now) == []
    assert flow.next_event() is None


# -- active open -------------------------------------------------------------------------------


def test_connect_sends_a_syn_to_be_resolved() -> None:
    pair = Pair()
    [(syn, destination)] = pair.from_client()
    control = control_of(syn)
    assert destination is None  # resolved by the caller's service table
    assert control.flags == SYN and control.ackno == 0 and len(control.nonce) == 8
    assert syn.src_flow == pair.client.local_flow and syn.dst_flow == 0
    assert syn.destination_service == SERVICE
    assert syn.transport == pair.client.local_transport
    assert state(pair.client) is FlowState.REQUEST
    assert pair.client.get_timer() == T0 + INITIAL_RTO_S


def test_advisory_address_skips_resolution() -> None:
    rng = random.Random(1)
    flow = Flow.connect(SERVICE, None, T0, rng, peer_address=SERVER)
    [(_, destination)] = flow.datagrams_to_send(T0)
    assert destination == SERVER


def test_flow_ids_nonces_and_vernos_are_random() -> None:
    rng = random.Random(7)
    flows = [Flow.connect(SERVICE, None, T0, rng) for _ in range(50)]
    assert len({f.local_flow for f in flows}) == 50
    assert len({f.local_nonce for f in flows}) == 50
    vernos = {control_of(f.datagrams_to_send(T0)[0][0]).verno for f in flows}
    assert len(vernos) == 50


def test_syn_backs_off_from_250ms_and_gives_up() -> None:
    pair = Pair()
    [(first, _)] = pair.from_client()
    sent_at = [pair.now]
    while True:
        pair.fire(pair.client)
        out = pair.from_client()
        if not out:
            break
        [(syn, destination)] = out
        assert destination is None  # re-resolved every time
        assert syn == first  # same flowID, verno and nonce
        sent_at.append(pair.now)
    offsets = [round(t - T0, 6) for t in sent_at]
    assert offsets == [0, 0.25, 0.75, 1.75, 3.75, 7.75, 15.75]
    assert len(offsets) == SYN_MAX_RETRANSMITS + 1
    assert round(pair.now - T0, 6) == 31.75
    assert state(pair.client) is FlowState.CLOSED
    assert events(pair.client) == [HandshakeTimeout()]
    assert pair.client.get_timer() is None


def test_first_rtt_sample_sets_the_rto() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    pair.now += 0.1
    pair.to_client(pair.from_server())
    assert pair.client.srtt == pytest.approx(0.1)
    assert pair.client.rto == pytest.approx(0.3)  # srtt + 4 * srtt/2


def test_small_rtt_is_clamped_to_min_rto() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    pair.now += 0.001
    pair.to_client(pair.from_server())
    assert pair.client.rto == MIN_RTO_S


def test_karn_no_sample_from_a_retransmitted_syn() -> None:
    pair = Pair()
    pair.from_client()  # lost
    pair.fire(pair.client)  # retransmission, RTO backed off to 0.5
    pair.to_server(pair.from_client())
    pair.now += 0.01
    pair.to_client(pair.from_server())
    assert state(pair.client) is FlowState.CONNECTED
    assert pair.client.srtt is None
    assert pair.client.rto == 2 * INITIAL_RTO_S


def test_synack_with_wrong_ackno_changes_nothing() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    [(synack, _)] = pair.from_server()
    control = control_of(synack)
    forged = dataclasses.replace(
        synack, control=dataclasses.replace(control, ackno=control.ackno + 1)
    )
    before = snapshot(pair.client)
    pair.client.handle_packet(roundtrip(forged), SERVER, pair.now)
    assert state(pair.client) is FlowState.REQUEST
    assert snapshot(pair.client)[:5] == before[:5]
    assert pair.client.counters.invalid_ack == 1


def test_handshake_exchanges_transport_parameters_and_addresses() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    [connected] = events(pair.client)
    assert isinstance(connected, Connected)
    assert connected.peer_address == SERVER
    assert connected.peer_transport is not None and connected.peer_transport.port == 7000
    [(ack, destination)] = pair.from_client()
    assert flags_of(ack) == ACK and destination == SERVER
    assert ack.destination_service == SERVICE  # lets a runtime route it by service
    pair.to_server([(ack, destination)])
    server = pair.accept()
    [server_connected] = events(server)
    assert isinstance(server_connected, Connected)
    assert server_connected.peer_address == CLIENT
    assert server_connected.peer_transport == pair.client.local_transport
    assert server.peer_flow == pair.client.local_flow
    assert pair.client.peer_flow == server.local_flow


# -- passive open ------------------------------------------------------------------------------


def test_duplicate_syn_gets_the_same_synack_and_one_connection() -> None:
    pair = Pair()
    syn = pair.from_client()
    pair.to_server(syn)
    [(first, _)] = pair.from_server()
    pair.to_server(syn)
    [(second, _)] = pair.from_server()
    assert wire.encode(first) == wire.encode(second)
    assert pair.listener.pending_count == 1
    pair.to_client([(first, SERVER)])
    pair.to_client([(second, SERVER)])  # duplicate SYN-ACK: the client ACKs again
    acks = pair.from_client()
    assert len(acks) == 2
    pair.to_server(acks)  # duplicate ACKs: ignored
    pair.to_server(syn)  # late duplicate SYN after completion: ignored
    assert pair.from_server() == []
    assert pair.listener.accept() is not None
    assert pair.listener.accept() is None
    assert pair.listener.counters.late_syns == 1


def test_synack_is_retransmitted_then_the_request_aborts_at_3s() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    [(synack, _)] = pair.from_server()
    sent_at = [pair.now]
    while True:
        pair.fire(pair.listener)
        out = pair.from_server()
        if not flags_of(out[0][0]) & SYN:
            break
        assert out[0][0] == synack
        sent_at.append(pair.now)
    assert [round(t - T0, 6) for t in sent_at] == [0, 0.25, 0.75, 1.75]
    assert round(pair.now - T0, 6) == REQUEST_LIFETIME_S
    [(rst, destination)] = out
    # The client may think it is connected: it is told, with its own nonce and verno.
    assert flags_of(rst) & RST and destination == CLIENT
    assert control_of(rst).nonce == pair.client.local_nonce
    event = pair.listener.next_event()
    assert isinstance(event, RequestAborted) and event.reason is AbortReason.TIMEOUT
    assert pair.listener.pending_count == 0 and pair.listener.accept() is None


def test_lost_handshake_ack_is_resent_on_synack_retransmission() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    pair.from_client()  # the ACK is lost
    pair.fire(pair.listener)
    pair.to_client(pair.from_server())  # the retransmitted SYN-ACK
    pair.to_server(pair.from_client())  # ACK again
    assert pair.accept().state is FlowState.CONNECTED


def test_data_on_the_pending_socket_completes_the_request() -> None:
    pair = Pair()
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    pair.from_client()  # the ACK is lost
    [request] = pair.requests
    assert state(request) is FlowState.RESPOND
    assert pair.listener.data_arrived(int(request.local_flow), pair.now)
    server = pair.accept()
    assert server is request and state(server) is FlowState.CONNECTED
    assert isinstance(events(server)[0], Connected)


def test_full_backlog_refuses_with_an_rst_the_client_trusts() -> None:
    pair = Pair(backlog=1)
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    pair.to_server(pair.from_client())
    assert pair.listener.accept_queue_length == 1  # completed, not yet accepted
    other = Flow.connect(SERVICE, None, pair.now, pair.rng)
    [(syn, _)] = other.datagrams_to_send(pair.now)
    pair.listener.handle_packet(roundtrip(syn), CLIENT, pair.now, pair.rng)
    [(rst, destination)] = pair.from_server()
    assert destination == CLIENT and flags_of(rst) & RST
    other.handle_packet(roundtrip(rst), SERVER, pair.now)
    assert events(other) == [ConnectionRefused()]
    assert state(other) is FlowState.CLOSED
    assert pair.listener.counters.refused_full == 1


def test_refused_request_refuses_the_client() -> None:
    pair = Pair()
    [(syn, _)] = pair.from_client()
    pair.listener.handle_packet(syn, CLIENT, pair.now, pair.rng)
    event = pair.listener.next_event()
    assert isinstance(event, ConnectionRequest)
    pair.listener.refuse(event.flow, pair.now)
    with pytest.raises(FlowStateError):
        pair.listener.refuse(event.flow, pair.now)
    pair.to_client(pair.from_server())
    assert events(pair.client) == [ConnectionRefused()]
    assert pair.listener.pending_count == 0


def test_unanswered_request_is_forgotten_after_its_lifetime() -> None:
    pair = Pair()
    [(syn, _)] = pair.from_client()
    pair.listener.handle_packet(syn, CLIENT, pair.now, pair.rng)
    assert isinstance(pair.listener.next_event(), ConnectionRequest)
    assert pair.listener.get_timer() == T0 + REQUEST_LIFETIME_S
    pair.fire(pair.listener)
    assert pair.listener.pending_count == 0
    assert pair.from_server() == []  # silently: the client keeps retrying


def test_rst_in_request_needs_our_nonce_and_verno() -> None:
    pair = Pair()
    [(syn, _)] = pair.from_client()
    rst = reset_for(syn)
    assert rst is not None
    wrong_nonce = dataclasses.replace(
        rst, control=dataclasses.replace(control_of(rst), nonce=b"x" * 8)
    )
    wrong_ackno = dataclasses.replace(
        rst, control=dataclasses.replace(control_of(rst), ackno=control_of(rst).ackno + 5)
    )
    pair.client.handle_packet(roundtrip(wrong_nonce), ATTACKER, pair.now)
    pair.client.handle_packet(roundtrip(wrong_ackno), ATTACKER, pair.now)
    assert state(pair.client) is FlowState.REQUEST
    assert pair.client.counters.bad_nonce == 1 and pair.client.counters.invalid_ack == 1
    pair.client.handle_packet(roundtrip(rst), SERVER, pair.now)
    assert events(pair.client) == [ConnectionRefused()]


# -- nonces, flowIDs, vernos -------------------------------------------------------------------


def _established() -> tuple[Pair, Flow, Flow]:
    pair = Pair()
    client, server = pair.establish()
    return pair, client, server


def _from(
    flow: Flow, flags: ControlFlags, *, verno_delta: int = 0, nonce: bytes | None = None
) -> SalPacket:
    """A packet as `flow` would send it (its flowIDs, nonce, vernos), with changes."""
    packet = flow._build(flags, flow._snd_nxt + verno_delta)
    if nonce is not None:
        packet = dataclasses.replace(
            packet, control=dataclasses.replace(control_of(packet), nonce=nonce)
        )
    return roundtrip(packet)


def test_control_packet_with_wrong_nonce_changes_nothing() -> None:
    pair, client, server = _established()
    before = snapshot(server)
    server.handle_packet(_from(client, FIN | ACK, nonce=b"\x00" * 8), ATTACKER, pair.now)
    assert snapshot(server)[:5] == before[:5]
    assert server.counters.bad_nonce == 1
    assert server.datagrams_to_send(pair.now) == [] and server.next_event() is None


def test_rst_with_wrong_nonce_is_ignored_and_with_right_nonce_resets() -> None:
    pair, client, server = _established()
    server.handle_packet(_from(client, RST | ACK, nonce=b"\x01" * 8), ATTACKER, pair.now)
    assert state(server) is FlowState.CONNECTED and server.counters.bad_nonce == 1
    server.handle_packet(_from(client, RST | ACK), CLIENT, pair.now)
    assert state(server) is FlowState.CLOSED
    assert events(server) == [Reset()]


def test_rst_echoing_our_own_nonce_resets() -> None:
    """What a host that lost the flow sends back: it only knows the nonce it was sent."""
    pair, client, _ = _established()
    client.close(pair.now)
    [(fin, _)] = pair.from_client()
    rst = reset_for(fin)  # as if the server host had no such flow
    assert rst is not None
    client.handle_packet(roundtrip(rst), SERVER, pair.now)
    assert state(client) is FlowState.CLOSED and events(client) == [Reset()]


def test_packets_with_wrong_flow_ids_are_dropped() -> None:
    pair, client, server = _established()
    wrong_source = dataclasses.replace(_from(client, FIN | ACK), src_flow=12345)
    server.handle_packet(wrong_source, CLIENT, pair.now)
    wrong_destination = dataclasses.replace(_from(client, FIN | ACK), dst_flow=54321)
    server.handle_packet(wrong_destination, CLIENT, pair.now)
    assert state(server) is FlowState.CONNECTED and server.counters.bad_flow == 2


def test_fin_outside_the_window_is_dropped() -> None:
    pair, client, server = _established()
    server.handle_packet(_from(client, FIN | ACK, verno_delta=CONTROL_WINDOW), CLIENT, pair.now)
    assert state(server) is FlowState.CONNECTED and server.counters.out_of_window == 1


def test_ack_of_something_never_sent_drops_the_packet() -> None:
    pair, client, server = _established()
    packet = _from(client, FIN | ACK)
    bad = dataclasses.replace(
        packet, control=dataclasses.replace(control_of(packet), ackno=server._snd_nxt + 3)
    )
    server.handle_packet(roundtrip(bad), CLIENT, pair.now)
    assert state(server) is FlowState.CONNECTED and server.counters.invalid_ack == 1


def test_duplicate_fin_is_acked_again_but_processed_once() -> None:
    pair, client, server = _established()
    client.close(pair.now)
    fin = pair.from_client()
    pair.to_server(fin)
    pair.to_server(fin)
    acks = pair.from_server()
    assert [flags_of(p) for p, _ in acks] == [ACK, ACK]
    assert events(server) == [PeerClosed()]
    assert state(server) is FlowState.CLOSE_WAIT and server.counters.duplicates == 1


# -- close -------------------------------------------------------------------------------------


def test_orderly_close_walks_the_fin_states() -> None:
    pair, client, server = _established()
    client.close(pair.now)
    assert state(client) is FlowState.FIN_WAIT1
    [(fin, _)] = pair.from_client()
    assert flags_of(fin) == FIN | ACK
    pair.to_server([(fin, SERVER)])
    assert state(server) is FlowState.CLOSE_WAIT
    pair.to_client(pair.from_server())
    assert state(client) is FlowState.FIN_WAIT2
    server.close(pair.now)
    assert state(server) is FlowState.LAST_ACK
    pair.to_client(pair.from_server())
    assert state(client) is FlowState.TIME_WAIT
    assert client.get_timer() == pytest.approx(pair.now + TIME_WAIT_S)
    pair.to_server(pair.from_client())
    assert state(server) is FlowState.CLOSED
    assert events(server) == [PeerClosed(), Closed()]
    pair.fire(client)
    assert state(client) is FlowState.CLOSED
    assert events(client) == [PeerClosed(), Closed()]


def test_time_wait_reacks_a_retransmitted_fin() -> None:
    pair, client, server = _established()
    client.close(pair.now)
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    server.close(pair.now)
    fin = pair.from_server()
    pair.to_client(fin)
    pair.from_client()  # the last ACK is lost
    pair.fire(server)  # FIN retransmitted
    pair.to_client(pair.from_server())
    [(ack, _)] = pair.from_client()
    assert flags_of(ack) == ACK and state(client) is FlowState.TIME_WAIT
    pair.to_server([(ack, SERVER)])
    assert state(server) is FlowState.CLOSED


def test_simultaneous_close_goes_through_closing() -> None:
    pair, client, server = _established()
    client.close(pair.now)
    server.close(pair.now)
    client_fin, server_fin = pair.from_client(), pair.from_server()
    pair.to_server(client_fin)
    pair.to_client(server_fin)
    assert state(client) is FlowState.CLOSING and state(server) is FlowState.CLOSING
    pair.to_server(pair.from_client())
    pair.to_client(pair.from_server())
    assert state(client) is FlowState.TIME_WAIT and state(server) is FlowState.TIME_WAIT


def test_time_wait_ignores_rst() -> None:
    """RFC 1337: a stray RST must not turn a completed close into a reset."""
    pair, client, server = _established()
    client.close(pair.now)
    pair.to_server(pair.from_client())
    server.close(pair.now)
    pair.to_client(pair.from_server())
    assert state(client) is FlowState.TIME_WAIT
    [(last_ack, _)] = pair.from_client()
    assert events(client) == [PeerClosed()]
    echo = reset_for(_from(client, FIN | ACK))  # a host that lost the flow, echoing our nonce
    assert echo is not None
    client.handle_packet(roundtrip(echo), SERVER, pair.now)
    assert state(client) is FlowState.TIME_WAIT and client.next_event() is None
    assert reset_for(last_ack) is None  # and such a host does not answer a pure ACK anyway


def test_reset_for_answers_control_packets_but_never_an_rst() -> None:
    _, client, _ = _established()
    fin = _from(client, FIN | ACK)
    rst = reset_for(fin)
    assert rst is not None
    control = control_of(rst)
    assert control.flags == RST | ACK and control.nonce == client.local_nonce
    assert (rst.src_flow, rst.dst_flow) == (fin.dst_flow, fin.src_flow)
    assert control.ackno == control_of(fin).verno + 1  # a FIN consumes one verno
    assert reset_for(rst) is None


def test_unacknowledged_fin_gives_up() -> None:
    pair, client, _ = _established()
    client.close(pair.now)
    sends = len(pair.from_client())
    while client.get_timer() is not None:
        pair.fire(client)
        sends += len(pair.from_client())
    assert sends == CONTROL_MAX_RETRANSMITS + 1
    assert state(client) is FlowState.CLOSED
    assert events(client) == [ControlTimeout()]


def test_close_before_connected_sends_nothing() -> None:
    pair = Pair()
    pair.from_client()
    pair.client.close(pair.now)
    assert state(pair.client) is FlowState.CLOSED
    assert pair.from_client() == [] and pair.client.get_timer() is None


# -- migration ---------------------------------------------------------------------------------


def test_migration_exchange_packet_by_packet() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW, 111), pair.now)
    assert migration_state(client) is MigrationState.RSYN_SENT
    assert client.local_address == CLIENT_NEW
    [(rsyn, destination)] = pair.from_client()
    assert flags_of(rsyn) == RSYN and destination == SERVER and rsyn.auth is not None
    pair.to_server([(rsyn, destination)], source=CLIENT_NEW)
    assert events(server) == [MigrationRequested(info(CLIENT_NEW, 111), CLIENT_NEW)]
    assert migration_state(server) is MigrationState.RSYN_RECV
    server.accept_migration(info(SERVER, 222), pair.now)
    [(rsyn_ack, destination)] = pair.from_server()
    assert flags_of(rsyn_ack) == RSYN | ACK and destination == CLIENT_NEW
    assert server.peer_address == CLIENT  # not before the final ACK
    pair.to_client([(rsyn_ack, destination)])
    assert events(client) == [MigrationCompleted(True, CLIENT_NEW, SERVER, info(SERVER, 222))]
    [(final_ack, _)] = pair.from_client()
    assert flags_of(final_ack) == ACK and final_ack.auth is not None
    pair.to_server([(final_ack, SERVER)], source=CLIENT_NEW)
    assert server.peer_address == CLIENT_NEW
    assert events(server) == [MigrationCompleted(False, SERVER, CLIENT_NEW, info(CLIENT_NEW, 111))]
    assert migration_state(client) is migration_state(server) is MigrationState.RSYN_INITIAL


@pytest.mark.parametrize(
    "tamper",
    ["no auth", "wrong tag", "other flow key", "wrong nonce"],
)
def test_spoofed_rsyn_changes_nothing(tamper: str) -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    [(rsyn, _)] = pair.from_client()
    assert rsyn.auth is not None
    if tamper == "no auth":
        spoofed = dataclasses.replace(rsyn, auth=None)
    elif tamper == "wrong tag":
        spoofed = dataclasses.replace(rsyn, migrate=info(ATTACKER))  # tag no longer matches
    elif tamper == "other flow key":
        spoofed = wire.sign(dataclasses.replace(rsyn, migrate=info(ATTACKER)), b"k" * 32, 0)
    else:
        spoofed = dataclasses.replace(
            rsyn, control=dataclasses.replace(control_of(rsyn), nonce=b"\x07" * 8)
        )
    before = snapshot(server)
    server.handle_packet(roundtrip(spoofed), ATTACKER, pair.now)
    assert snapshot(server)[:5] == before[:5]
    assert server.next_event() is None and server.datagrams_to_send(pair.now) == []
    assert server.counters.bad_auth + server.counters.bad_nonce == 1


def test_replayed_rsyn_after_completion_changes_nothing() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    rsyn = pair.from_client()
    pair.to_server(rsyn, source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    events(server)
    pair.to_server(rsyn, source=ATTACKER)  # replay from elsewhere
    pair.to_server(rsyn, source=CLIENT_NEW)  # or from the same place
    assert server.peer_address == CLIENT_NEW
    assert migration_state(server) is MigrationState.RSYN_INITIAL
    assert server.next_event() is None and pair.from_server() == []


def test_duplicate_rsyn_gets_the_same_answer_only_towards_its_first_source() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    rsyn = pair.from_client()
    pair.to_server(rsyn, source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    [(answer, _)] = pair.from_server()
    pair.to_server(rsyn, source=ATTACKER)
    assert pair.from_server() == []
    pair.to_server(rsyn, source=CLIENT_NEW)
    [(again, destination)] = pair.from_server()
    assert again == answer and destination == CLIENT_NEW


def test_fin_queued_during_migration_waits_for_the_rsyn_answer() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    client.close(pair.now)
    [(rsyn, _)] = pair.from_client()  # only the RSYN: the FIN waits behind it
    pair.to_server([(rsyn, SERVER)], source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    out = pair.from_client()
    assert [flags_of(p) for p, _ in out] == [ACK, FIN | ACK]
    assert control_of(out[1][0]).verno == control_of(rsyn).verno + 1
    pair.to_server(out, source=CLIENT_NEW)
    assert state(server) is FlowState.CLOSE_WAIT and server.peer_address == CLIENT_NEW


def test_unanswered_rsyn_rolls_back_after_the_timeout() -> None:
    pair, client, _ = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    sends = len(pair.from_client())
    while migration_state(client) is MigrationState.RSYN_SENT:
        pair.fire(client)
        sends += len(pair.from_client())
    assert sends > 1  # retransmitted meanwhile
    assert round(pair.now - T0 - 0.02, 6) == MIGRATION_TIMEOUT_S
    assert events(client) == [MigrationFailed(True, MigrationFailure.TIMEOUT)]
    assert client.local_address == CLIENT and state(client) is FlowState.CONNECTED


def test_refused_migration_rolls_back_both_ends() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.refuse_migration(pair.now)
    assert migration_state(server) is MigrationState.RSYN_INITIAL
    pair.to_client(pair.from_server())
    assert events(client) == [MigrationFailed(True, MigrationFailure.REFUSED)]
    assert client.local_address == CLIENT and server.peer_address == CLIENT


def test_lost_final_ack_is_covered_by_data_on_the_new_path() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    pair.from_client()  # the final ACK is lost
    server.data_arrived(pair.now)
    assert server.peer_address == CLIENT_NEW
    assert isinstance(events(server)[-1], MigrationCompleted)


def test_lost_final_ack_is_resent_when_the_rsyn_ack_is_retransmitted() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    pair.from_client()  # the final ACK is lost
    pair.fire(server)  # RSYN-ACK retransmitted
    pair.to_client(pair.from_server())
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    assert server.peer_address == CLIENT_NEW
    assert migration_state(server) is MigrationState.RSYN_INITIAL


def test_responder_rolls_back_without_a_final_ack() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    start = pair.now
    server.accept_migration(info(SERVER), pair.now)
    while migration_state(server) is MigrationState.RSYN_RECV:
        pair.fire(server)
    assert pair.now == pytest.approx(start + MIGRATION_RESPONDER_TIMEOUT_S)
    assert events(server)[-1] == MigrationFailed(False, MigrationFailure.TIMEOUT)
    assert server.peer_address == CLIENT


def test_late_rsyn_ack_for_an_abandoned_migration_is_aborted() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    rsyn = pair.from_client()
    while migration_state(client) is MigrationState.RSYN_SENT:
        pair.fire(client)
    pair.from_client()
    events(client)
    pair.to_server(rsyn, source=CLIENT_NEW)  # arrives after the initiator gave up
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    [(abort, destination)] = pair.from_client()
    assert flags_of(abort) == ACK | NACK and abort.auth is not None
    pair.to_server([(abort, destination)], source=CLIENT)
    assert events(server)[-1] == MigrationFailed(False, MigrationFailure.ABORTED)
    assert server.peer_address == CLIENT
    assert client.next_event() is None and client.local_address == CLIENT


def test_crossing_rsyns_the_lower_flow_yields() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    server.migrate(SERVER_NEW, info(SERVER_NEW), pair.now)
    client_rsyn, server_rsyn = pair.from_client(), pair.from_server()
    pair.to_server(client_rsyn, source=CLIENT_NEW)
    pair.to_client(server_rsyn, source=SERVER_NEW)
    client_wins = (client.local_flow, client.local_nonce) > (server.local_flow, server.local_nonce)
    winner, loser = (client, server) if client_wins else (server, client)
    assert migration_state(winner) is MigrationState.RSYN_SENT
    assert migration_state(loser) is MigrationState.RSYN_SENT_RECV
    assert loser.next_event() is None  # holds the winner's RSYN until its own is refused
    # The winner refused the loser's RSYN; deliver that refusal.
    winner_out = pair.from_client() if client_wins else pair.from_server()
    assert [flags_of(p) for p, _ in winner_out] == [RSYN | ACK | NACK]
    if client_wins:
        pair.to_server(winner_out, source=CLIENT_NEW)
    else:
        pair.to_client(winner_out, source=SERVER_NEW)
    winner_new = CLIENT_NEW if client_wins else SERVER_NEW
    assert events(loser) == [
        MigrationFailed(True, MigrationFailure.YIELDED),
        MigrationRequested(info(winner_new), winner_new),
    ]
    assert migration_state(loser) is MigrationState.RSYN_RECV
    assert loser.local_address == (SERVER if client_wins else CLIENT)  # rolled back


def test_rsyn_queued_behind_a_fin_is_cancelled_by_a_crossing_rsyn() -> None:
    pair, client, server = _established()
    client.close(pair.now)
    pair.from_client()  # FIN in flight, not yet acknowledged
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    assert pair.from_client() == []  # the RSYN waits behind the FIN
    server.migrate(SERVER_NEW, info(SERVER_NEW), pair.now)
    pair.to_client(pair.from_server(), source=SERVER_NEW)
    assert events(client) == [
        MigrationFailed(True, MigrationFailure.YIELDED),
        MigrationRequested(info(SERVER_NEW), SERVER_NEW),
    ]
    assert migration_state(client) is MigrationState.RSYN_RECV


def test_an_rsyn_is_retired_only_by_its_answer() -> None:
    """A plain ACK covering the RSYN (here on the peer's FIN) must not end the retransmission:
    the initiator would never learn that the migration was accepted."""
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.close(pair.now)
    [(fin, _)] = pair.from_server()
    assert control_of(fin).ackno == client._snd_nxt  # it acknowledges the RSYN
    pair.to_client([(fin, SERVER)])
    pair.from_client()  # the client's ACK of that FIN
    server.accept_migration(info(SERVER), pair.now)
    pair.from_server()  # the RSYN-ACK is lost
    pair.fire(client)  # the RSYN is still retransmitted ...
    [(rsyn, _)] = pair.from_client()
    assert flags_of(rsyn) == RSYN
    pair.to_server([(rsyn, SERVER)], source=CLIENT_NEW)  # ... and draws the stored answer
    pair.to_client(pair.from_server())
    assert isinstance(events(client)[-1], MigrationCompleted)


def test_an_old_final_ack_cannot_complete_a_newer_migration() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    first_final_ack = pair.from_client()
    pair.to_server(first_final_ack, source=CLIENT_NEW)
    events(server)

    client.migrate(CLIENT, info(CLIENT), pair.now)  # and back again
    pair.to_server(pair.from_client(), source=CLIENT)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    second_final_ack = pair.from_client()
    pair.to_server(first_final_ack, source=ATTACKER)  # a replay: authentic, but old
    assert migration_state(server) is MigrationState.RSYN_RECV
    assert server.peer_address == CLIENT_NEW
    pair.to_server(second_final_ack, source=CLIENT)
    assert migration_state(server) is MigrationState.RSYN_INITIAL
    assert server.peer_address == CLIENT


# -- abandoning a migration (the runtime gives up) ---------------------------------------------


def _answered(pair: Pair, client: Flow, server: Flow) -> list[tuple[SalPacket, Address | None]]:
    """Client migrates, server answers: the RSYN-ACK, not yet delivered."""
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    assert isinstance(events(server)[-1], MigrationRequested)
    server.accept_migration(info(SERVER), pair.now)
    return pair.from_server()


def _migrates_cleanly(pair: Pair, client: Flow, server: Flow) -> None:
    """A later migration still completes at both ends."""
    pair.now += 0.1
    rsyn_ack = _answered(pair, client, server)
    pair.to_client(rsyn_ack)
    assert isinstance(events(client)[-1], MigrationCompleted)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    assert isinstance(events(server)[-1], MigrationCompleted)
    assert server.peer_address == CLIENT_NEW and client.local_address == CLIENT_NEW


def test_abandoning_before_the_rsyn_ack_aborts_the_responder_at_once() -> None:
    pair, client, server = _established()
    rsyn_ack = _answered(pair, client, server)
    client.abandon_migration(pair.now)
    assert client.local_address == CLIENT and client.next_event() is None
    assert migration_state(client) is MigrationState.RSYN_INITIAL
    [(abort, destination)] = pair.from_client()
    assert flags_of(abort) == ACK | NACK and abort.auth is not None and destination == SERVER
    pair.to_server([(abort, destination)], source=CLIENT)
    assert events(server) == [MigrationFailed(False, MigrationFailure.ABORTED)]
    assert migration_state(server) is MigrationState.RSYN_INITIAL
    assert server.peer_address == CLIENT
    # The RSYN-ACK that was in flight (reordered behind the abort) draws one more abort,
    # which the responder, already rolled back, ignores.
    pair.to_client(rsyn_ack)
    assert client.next_event() is None and client.local_address == CLIENT
    stale = server.counters.stale
    pair.to_server(pair.from_client(), source=CLIENT)
    assert server.counters.stale == stale + 1 and server.next_event() is None
    _migrates_cleanly(pair, client, server)


def test_abandoning_after_the_rsyn_ack_withdraws_the_final_ack() -> None:
    pair, client, server = _established()
    pair.to_client(_answered(pair, client, server))
    assert isinstance(events(client)[-1], MigrationCompleted)  # the runtime now fails to rebuild
    client.abandon_migration(pair.now)
    assert client.local_address == CLIENT
    [(abort, destination)] = pair.from_client()  # the abort, and no final ACK
    assert flags_of(abort) == ACK | NACK and destination == SERVER
    pair.to_server([(abort, destination)], source=CLIENT)
    assert events(server) == [MigrationFailed(False, MigrationFailure.ABORTED)]
    assert server.peer_address == CLIENT
    _migrates_cleanly(pair, client, server)


def test_a_lost_abort_is_sent_again_on_the_next_rsyn_ack() -> None:
    pair, client, server = _established()
    pair.to_client(_answered(pair, client, server))
    client.abandon_migration(pair.now)
    pair.from_client()  # the abort is lost
    pair.fire(server)  # the responder retransmits its RSYN-ACK
    [(retransmitted, destination)] = pair.from_server()
    assert flags_of(retransmitted) == RSYN | ACK
    pair.to_client([(retransmitted, destination)])
    [(abort, _)] = pair.from_client()  # an abort, not the withdrawn final ACK
    assert flags_of(abort) == ACK | NACK
    pair.to_server([(abort, SERVER)], source=CLIENT)
    assert events(server)[-1] == MigrationFailed(False, MigrationFailure.ABORTED)
    assert server.peer_address == CLIENT and pair.now - T0 < MIGRATION_RESPONDER_TIMEOUT_S


def test_a_duplicated_abort_changes_nothing() -> None:
    pair, client, server = _established()
    _answered(pair, client, server)
    client.abandon_migration(pair.now)
    [(abort, _)] = pair.from_client()
    pair.to_server([(abort, SERVER), (abort, SERVER)], source=CLIENT)
    assert events(server) == [MigrationFailed(False, MigrationFailure.ABORTED)]
    assert server.counters.stale == 1
    _migrates_cleanly(pair, client, server)


def test_an_abort_overtaking_the_rsyn_is_ignored_and_the_rsyn_ack_draws_another() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    rsyn = pair.from_client()
    client.abandon_migration(pair.now)
    abort = pair.from_client()
    pair.to_server(abort, source=CLIENT)  # arrives first: nothing to abort yet
    assert server.next_event() is None and server.counters.stale == 1
    pair.to_server(rsyn, source=CLIENT_NEW)
    assert isinstance(events(server)[-1], MigrationRequested)
    server.accept_migration(info(SERVER), pair.now)
    pair.to_client(pair.from_server())
    assert client.next_event() is None and client.local_address == CLIENT
    pair.to_server(pair.from_client(), source=CLIENT)
    assert events(server) == [MigrationFailed(False, MigrationFailure.ABORTED)]
    assert migration_state(server) is MigrationState.RSYN_INITIAL


def test_abandoning_releases_a_crossing_rsyn_held_behind_ours() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    server.migrate(SERVER_NEW, info(SERVER_NEW), pair.now)
    client_rsyn, server_rsyn = pair.from_client(), pair.from_server()
    pair.to_client(server_rsyn, source=SERVER_NEW)
    pair.to_server(client_rsyn, source=CLIENT_NEW)
    loser, winner_address = (
        (client, SERVER_NEW)
        if migration_state(client) is MigrationState.RSYN_SENT_RECV
        else (server, CLIENT_NEW)
    )
    assert migration_state(loser) is MigrationState.RSYN_SENT_RECV
    loser.abandon_migration(pair.now)  # its runtime gives up before the refusal arrives
    assert migration_state(loser) is MigrationState.RSYN_RECV
    assert events(loser) == [MigrationRequested(info(winner_address), winner_address)]


def test_an_initiator_that_times_out_aborts_the_responder_well_before_its_timeout() -> None:
    pair, client, server = _established()
    client.migrate(CLIENT_NEW, info(CLIENT_NEW), pair.now)
    pair.to_server(pair.from_client(), source=CLIENT_NEW)
    events(server)
    started = pair.now
    server.accept_migration(info(SERVER), pair.now)
    pair.from_server()  # every RSYN-ACK is lost on the way back
    while migration_state(client) is MigrationState.RSYN_SENT:
        pair.fire(client)
        out = pair.from_client()
        # RSYN retransmissions are duplicates to the server (answered, answers lost again)
        for packet, destination in out:
            if flags_of(packet) == RSYN:
                pair.to_server([(packet, destination)], source=CLIENT_NEW)
                pair.from_server()
            else:
                assert flags_of(packet) == ACK | NACK
                pair.to_server([(packet, destination)], source=CLIENT)
    assert events(client) == [MigrationFailed(True, MigrationFailure.TIMEOUT)]
    assert events(server) == [MigrationFailed(False, MigrationFailure.ABORTED)]
    assert pair.now - started == pytest.approx(MIGRATION_TIMEOUT_S, abs=0.05)
    assert pair.now - started < MIGRATION_RESPONDER_TIMEOUT_S
    assert server.peer_address == CLIENT and client.local_address == CLIENT
