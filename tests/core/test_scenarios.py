"""Protocol scenarios over the in-memory network: what a Serval domain promises.

Every packet is encoded, carried, possibly lost, duplicated or reordered, and decoded
(serval/sim.py). Hosts register their services with a service router, which resolves
SYNs by weighted anycast; everything after the SYN goes directly between the two hosts.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest

from serval.core.flow import (
    TIME_WAIT_S,
    Closed,
    Connected,
    Flow,
    FlowState,
    MigrationCompleted,
    MigrationFailed,
    MigrationFailure,
    MigrationRequested,
    MigrationState,
    PeerClosed,
    Reset,
)
from serval.core.ids import ServiceID
from serval.core.listener import AbortReason, RequestAborted
from serval.core.registration import DEFAULT_LIFETIME_S
from serval.core.service_table import RuleKind, Target, TargetKey
from serval.core.wire import Address, ControlExt, ControlFlags, SalPacket
from serval.sim import (
    Host,
    LinkConditions,
    Network,
    Router,
    Transmission,
    has_flags,
    is_pure_syn,
)

SERVICE = ServiceID.from_name("web.example")
ROUTER = IPv4Address("10.0.0.1")
CLIENT = IPv4Address("10.0.2.1")
ATTACKER = IPv4Address("10.6.6.6")

SYN = ControlFlags.SYN
ACK = ControlFlags.ACK
RSYN = ControlFlags.RSYN
RST = ControlFlags.RST
NACK = ControlFlags.NACK


@dataclass
class World:
    net: Network
    router: Router
    servers: list[Host]
    client: Host

    def server_end(self, client_flow: Flow) -> Flow:
        """The one server flow accepted for `client_flow` (fails if none or several)."""
        [match] = [
            flow
            for server in self.servers
            for flow in server.accepted[SERVICE]
            if flow.peer_flow == client_flow.local_flow
        ]
        return match

    def server_of(self, flow: Flow) -> Host:
        [host] = [s for s in self.servers if flow in s.accepted[SERVICE]]
        return host


def state(flow: Flow) -> FlowState:
    """`flow.state` through a call: mypy would carry an earlier `is` narrowing across the
    flow's methods, which change it."""
    return flow.state


def migration_state(flow: Flow) -> MigrationState:
    return flow.migration_state


def build(
    seed: int = 0,
    *,
    weights: tuple[int, ...] = (3, 1),
    conditions: LinkConditions | None = None,
) -> World:
    """A router, one server instance per weight registering SERVICE, and a client."""
    net = Network(seed, conditions)
    router = Router(net, "router", ROUTER)
    servers = []
    for index, weight in enumerate(weights):
        server = Host(net, f"s{index + 1}", IPv4Address(f"10.0.1.{index + 1}"), routers=(ROUTER,))
        server.listen(SERVICE, weight=weight)
        servers.append(server)
    client = Host(net, "client", CLIENT, routers=(ROUTER,))
    net.run_for(2.5)  # registrations reach the router (refreshed every second)
    assert len(router.registrations) == len(weights)
    return World(net, router, servers, client)


def flags_of(packet: SalPacket) -> ControlFlags:
    assert packet.control is not None
    return packet.control.flags


def sent(world: World, source: Address, flags: ControlFlags) -> list[Transmission]:
    return world.net.transmissions(lambda t: t.source == source and has_flags(t.packet, flags))


# -- connecting --------------------------------------------------------------------------------


def test_connect_through_one_router_to_one_of_two_weighted_instances() -> None:
    world = build(seed=1, weights=(3, 1))
    flows = [world.client.connect(SERVICE) for _ in range(200)]
    world.net.run_for(2)

    assert all(state(flow) is FlowState.CONNECTED for flow in flows)
    per_instance = Counter(world.server_of(world.server_end(f)).name for f in flows)
    # Weighted anycast: 3/4 of the connections on s1 (binomial, 5 standard deviations).
    assert 120 <= per_instance["s1"] <= 180 and per_instance["s1"] + per_instance["s2"] == 200

    flow = flows[0]
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)
    [connected] = [e for e in world.client.events_of(flow) if isinstance(e, Connected)]
    assert connected.peer_address == server.address
    assert connected.peer_transport is not None and connected.peer_transport.port == 7000
    assert server_flow.peer_address == CLIENT
    assert server_flow.peer_transport == flow.local_transport

    # Late binding on the first packet only: the router saw SYNs (and registrations), the
    # SYN-ACKs and everything after went straight between the two hosts.
    assert world.router.counters.forwarded == 200
    assert world.router.counters.unexpected == 0
    for t in world.net.transmissions(lambda t: bool(t.packet.flags & ACK)):
        assert ROUTER not in (t.source, t.destination)
    syns = world.net.transmissions(lambda t: is_pure_syn(t.packet))
    from_client = [t for t in syns if t.destination == ROUTER]
    via_router = [t for t in syns if t.destination != ROUTER]
    assert len(from_client) == len(via_router) == 200
    assert all(t.packet.source is None for t in from_client)
    # The router kept the client's address as the source and appended itself to the trail.
    for t in via_router:
        assert t.source == CLIENT and t.packet.source is not None
        assert t.packet.source.addresses == (CLIENT, ROUTER)


def test_a_lost_syn_is_sent_again_after_250ms() -> None:
    world = build(seed=2)
    world.net.drop_matching(lambda s, d, p: s == CLIENT and is_pure_syn(p))
    start = world.net.now
    flow = world.client.connect(SERVICE)
    world.net.run_for(2)

    assert state(flow) is FlowState.CONNECTED
    syns = world.net.transmissions(lambda t: t.destination == ROUTER and is_pure_syn(t.packet))
    assert [round(t.time - start, 6) for t in syns] == [0, 0.25]
    assert syns[0].packet == syns[1].packet  # same flowID, verno and nonce
    world.server_end(flow)


def test_a_lost_synack_is_retransmitted_by_the_server() -> None:
    world = build(seed=3, weights=(1,))
    [server] = world.servers
    world.net.drop_matching(lambda s, d, p: s == server.address and has_flags(p, SYN | ACK))
    flow = world.client.connect(SERVICE)
    world.net.run_for(2)

    assert state(flow) is FlowState.CONNECTED
    synacks = sent(world, server.address, SYN | ACK)
    assert len(synacks) >= 2
    assert len({t.packet for t in synacks}) == 1  # the very same SYN-ACK every time
    assert len(server.accepted[SERVICE]) == 1
    assert world.server_end(flow).state is FlowState.CONNECTED


def test_a_duplicated_syn_makes_one_connection() -> None:
    world = build(seed=4, weights=(1,), conditions=LinkConditions(duplicate=1.0))
    [server] = world.servers
    flow = world.client.connect(SERVICE)
    world.net.run_for(2)

    assert state(flow) is FlowState.CONNECTED
    assert world.net.counters.duplicated > 0
    listener = server.listeners[SERVICE]
    assert listener.counters.syns == 1
    assert listener.counters.duplicate_syns + listener.counters.late_syns >= 1
    assert len(server.accepted[SERVICE]) == 1
    assert world.server_end(flow).state is FlowState.CONNECTED
    # Duplicated SYN-ACKs drew duplicated ACKs; nothing else happened to either end.
    assert world.client.event_types(flow) == [Connected]


def test_a_synack_from_a_second_instance_is_reset() -> None:
    """The SYN-ACK of s1 is lost twice; meanwhile the retransmitted SYN is resolved to s2."""
    world = build(seed=5, weights=(1,))
    [first] = world.servers
    second = Host(world.net, "s2", IPv4Address("10.0.1.2"), routers=(ROUTER,))
    second.listen(SERVICE, register=False)
    world.servers.append(second)
    world.net.drop_matching(lambda s, d, p: s == first.address and has_flags(p, SYN | ACK), 2)
    flow = world.client.connect(SERVICE)
    world.net.run_for(0.1)
    # s1 got the first SYN; now the router prefers s2 for the retransmission.
    world.router.table.add(SERVICE, Target.forward(second.address, priority=10))
    world.net.run_for(3)

    assert state(flow) is FlowState.CONNECTED and flow.peer_address == second.address
    assert world.server_end(flow) in second.accepted[SERVICE]
    assert first.accepted[SERVICE] == []
    [aborted] = [e for e in first.events if isinstance(e.event, RequestAborted)]
    assert isinstance(aborted.event, RequestAborted)
    assert aborted.event.reason is AbortReason.RESET
    assert flow.counters.extra_synacks == 1


# -- closing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_from_either_side(closer: str) -> None:
    world = build(seed=6)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)
    ends = {"client": (world.client, flow), "server": (server, server_flow)}
    first_host, first = ends[closer]
    second_host, second = ends["server" if closer == "client" else "client"]

    first_host.close(first)
    world.net.run_for(1)
    assert state(first) is FlowState.FIN_WAIT2 and state(second) is FlowState.CLOSE_WAIT
    assert second_host.event_types(second)[-1] is PeerClosed

    second_host.close(second)
    world.net.run_for(1)
    assert state(second) is FlowState.CLOSED and state(first) is FlowState.TIME_WAIT
    world.net.run_for(TIME_WAIT_S)
    assert state(first) is FlowState.CLOSED
    for host, end in ((first_host, first), (second_host, second)):
        assert host.event_types(end)[-2:] == [PeerClosed, Closed]
        assert end not in host.flows.values()  # the runtime forgot it


def test_simultaneous_close() -> None:
    world = build(seed=7)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)

    world.client.close(flow)
    server.close(server_flow)
    # One latency later the FINs have crossed, and neither has been acknowledged yet.
    world.net.run_for(world.net.conditions.latency_s * 1.5)
    assert state(flow) is FlowState.CLOSING and state(server_flow) is FlowState.CLOSING
    world.net.run_for(1)
    assert state(flow) is FlowState.TIME_WAIT and state(server_flow) is FlowState.TIME_WAIT
    world.net.run_for(TIME_WAIT_S + 1)
    assert state(flow) is FlowState.CLOSED and state(server_flow) is FlowState.CLOSED
    assert world.client.event_types(flow)[-2:] == [PeerClosed, Closed]
    assert server.event_types(server_flow)[-2:] == [PeerClosed, Closed]


def test_an_rst_with_a_wrong_nonce_is_ignored() -> None:
    world = build(seed=8)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)

    forged = SalPacket(
        src_flow=flow.local_flow,
        dst_flow=server_flow.local_flow,
        control=ControlExt(RST | ACK, 0, 0, b"\x13" * 8),
    )
    world.net.inject(ATTACKER, server.address, forged)
    world.net.run_for(1)
    assert state(server_flow) is FlowState.CONNECTED
    assert server_flow.counters.bad_nonce == 1

    world.client.abort(flow)  # the real client resets: that one counts
    world.net.run_for(1)
    assert state(server_flow) is FlowState.CLOSED
    assert server.event_types(server_flow)[-1] is Reset


# -- migration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mover", ["client", "server"])
def test_migration_of_either_end(mover: str) -> None:
    world = build(seed=9)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)
    ends = {"client": (world.client, flow), "server": (server, server_flow)}
    moving_host, moving = ends[mover]
    peer_host, peer = ends["server" if mover == "client" else "client"]
    old_address = moving_host.address
    new_address = IPv4Address("10.0.3.1")

    info = moving_host.migrate(moving, new_address)
    world.net.run_for(1)

    done = moving_host.events_of(moving)[-1]
    assert isinstance(done, MigrationCompleted) and done.initiator
    assert done.local_address == new_address and done.peer_address == peer_host.address
    assert done.peer_migrate.address == peer_host.address  # the responder's own endpoint
    requested, completed = peer_host.events_of(peer)[-2:]
    assert requested == MigrationRequested(info, new_address)
    assert isinstance(completed, MigrationCompleted) and not completed.initiator
    assert peer.peer_address == new_address and moving.local_address == new_address
    [rsyn] = sent(world, new_address, RSYN)  # the RSYN left from the new address
    assert rsyn.destination == peer_host.address

    # The old address disappears; the connection lives on at the new one.
    moving_host.remove_address(old_address)
    peer_host.close(peer)
    world.net.run_for(1)
    moving_host.close(moving)
    world.net.run_for(TIME_WAIT_S + 1)
    assert state(moving) is FlowState.CLOSED and state(peer) is FlowState.CLOSED
    assert moving_host.event_types(moving)[-1] is Closed
    assert peer_host.event_types(peer)[-1] is Closed


def test_both_ends_migrate_at_once() -> None:
    world = build(seed=10)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)
    client_new, server_new = IPv4Address("10.0.2.9"), IPv4Address("10.0.1.9")

    world.client.migrate(flow, client_new)
    server.migrate(server_flow, server_new)
    world.net.run_for(2)

    client_wins = (flow.local_flow, flow.local_nonce) > (
        server_flow.local_flow,
        server_flow.local_nonce,
    )
    loser_host, loser = (server, server_flow) if client_wins else (world.client, flow)
    failed = [e for e in loser_host.events_of(loser) if isinstance(e, MigrationFailed)]
    assert failed == [MigrationFailed(True, MigrationFailure.YIELDED)]
    # Both moves happened, one after the other: each end now talks to the other's new address.
    assert flow.local_address == client_new and flow.peer_address == server_new
    assert server_flow.local_address == server_new and server_flow.peer_address == client_new
    for host, end in ((world.client, flow), (server, server_flow)):
        completions = [e for e in host.events_of(end) if isinstance(e, MigrationCompleted)]
        assert sorted(c.initiator for c in completions) == [False, True]
        assert migration_state(end) is MigrationState.RSYN_INITIAL


def test_repeated_migration() -> None:
    world = build(seed=11)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)

    for hop in range(1, 5):
        old = world.client.address
        new = IPv4Address(f"10.0.4.{hop}")
        world.client.migrate(flow, new)
        world.net.run_for(1)
        world.client.remove_address(old)
        assert server_flow.peer_address == new
        assert world.client.event_types(flow)[-1] is MigrationCompleted
    completed = [e for e in server.events_of(server_flow) if isinstance(e, MigrationCompleted)]
    assert [c.peer_address for c in completed] == [IPv4Address(f"10.0.4.{i}") for i in range(1, 5)]

    server.close(server_flow)  # reaches the client at its fourth address
    world.net.run_for(1)
    assert state(flow) is FlowState.CLOSE_WAIT


def test_a_spoofed_or_replayed_rsyn_is_ignored() -> None:
    world = build(seed=12)
    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    server_flow = world.server_end(flow)
    server = world.server_of(server_flow)

    # A genuine migration, recorded on the wire.
    world.client.migrate(flow, IPv4Address("10.0.2.2"))
    world.net.run_for(1)
    [genuine] = sent(world, IPv4Address("10.0.2.2"), RSYN)
    assert genuine.packet.migrate is not None
    events_before = len(server.events_of(server_flow))

    # Forged: right flowIDs and even the right nonce (sniffed), but no valid authenticator.
    forged = dataclasses.replace(
        genuine.packet,
        migrate=dataclasses.replace(genuine.packet.migrate, address=ATTACKER),
    )
    world.net.inject(ATTACKER, server.address, forged)
    # Replayed: the genuine RSYN again, from the attacker.
    world.net.inject(ATTACKER, server.address, genuine.packet)
    world.net.run_for(1)

    assert server_flow.peer_address == IPv4Address("10.0.2.2")
    assert migration_state(server_flow) is MigrationState.RSYN_INITIAL
    assert len(server.events_of(server_flow)) == events_before
    assert server_flow.counters.bad_auth == 1 and server_flow.counters.stale == 1
    assert sent(world, server.address, RSYN | ACK)[-1].destination != ATTACKER


# -- service routers ---------------------------------------------------------------------------


def test_registration_expiry_and_re_registration() -> None:
    world = build(seed=13, weights=(1, 1))
    first, second = world.servers

    first.registering = False  # s1 stops refreshing (crashed, partitioned...)
    world.net.run_for(DEFAULT_LIFETIME_S + 1)
    assert [r.address for r in world.router.registrations.records()] == [second.address]
    flows = [world.client.connect(SERVICE) for _ in range(20)]
    world.net.run_for(1)
    assert all(world.server_of(world.server_end(f)) is second for f in flows)

    first.registering = True
    world.net.run_for(1.5)
    assert len(world.router.registrations) == 2
    flows = [world.client.connect(SERVICE) for _ in range(40)]
    world.net.run_for(1)
    chosen = Counter(world.server_of(world.server_end(f)).name for f in flows)
    assert chosen["s1"] > 0 and chosen["s2"] > 0


def test_a_delay_rule_holds_syns_until_the_controller_releases_them() -> None:
    world = build(seed=14)
    held: list[int] = []
    world.router.controller = lambda delay_id, service: held.append(delay_id)
    world.router.table.add(SERVICE, Target.delay(priority=100))

    flow = world.client.connect(SERVICE)
    world.net.run_for(1)
    assert state(flow) is FlowState.REQUEST
    assert len(held) == len(world.router.delayed) >= 3  # the SYN and its retransmissions

    # The controller decides: lift the rule, then release what it holds.
    world.router.table.remove(SERVICE, TargetKey(RuleKind.DELAY))
    for delay_id in held:
        world.router.release(delay_id)
    world.net.run_for(1)

    assert state(flow) is FlowState.CONNECTED
    assert world.router.delayed == {}
    world.server_end(flow)  # exactly one server connection, however many SYNs were released


# -- a bad network -----------------------------------------------------------------------------


def test_many_connections_complete_over_a_lossy_duplicating_reordering_network() -> None:
    conditions = LinkConditions(
        latency_s=0.005, loss=0.1, duplicate=0.05, reorder=0.2, reorder_delay_s=0.03
    )
    world = build(seed=15, conditions=conditions)
    clients = [world.client] + [
        Host(world.net, f"c{i}", IPv4Address(f"10.0.2.{i + 10}"), routers=(ROUTER,))
        for i in range(2)
    ]
    for client in clients:
        client.send_data_on_connect = True  # a client-first protocol: data acts as an ACK
    flows: list[tuple[Host, Flow]] = []
    for _ in range(20):
        for client in clients:
            flows.append((client, client.connect(SERVICE)))
        world.net.run_for(0.05)
    world.net.run_for(40)

    assert world.net.counters.lost > 0 and world.net.counters.duplicated > 0
    assert world.net.counters.reordered > 0
    for _, flow in flows:
        assert state(flow) is FlowState.CONNECTED
        assert world.server_end(flow).state is FlowState.CONNECTED
    accepted = [f for s in world.servers for f in s.accepted[SERVICE]]
    assert len(accepted) == len(flows)  # no duplicates, no orphans

    for client, flow in flows:
        client.close(flow)
    world.net.run_for(30)
    for server in world.servers:
        for server_flow in list(server.accepted[SERVICE]):
            assert state(server_flow) is FlowState.CLOSE_WAIT
            server.close(server_flow)
    world.net.run_for(60)
    for client, flow in flows:
        assert state(flow) is FlowState.CLOSED
        assert client.event_types(flow)[-1] is Closed
    for server_flow in accepted:
        assert state(server_flow) is FlowState.CLOSED
        assert world.server_of(server_flow).event_types(server_flow)[-1] is Closed
