"""Hand-back of an established flow (export_flow / restore_flow), in memory.

A restored flow stands for a restarted servald: the peer keeps its original Flow and must
accept the restored one's migrations (and the other way round) without noticing anything,
even when the export is older than the flow's last migration.
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address

import pytest

from serval.core import wire
from serval.core.flow import (
    RESTORE_VERNO_SKIP,
    Flow,
    FlowState,
    MigrationCompleted,
    MigrationRequested,
    MigrationState,
    export_flow,
    restore_flow,
)
from serval.core.ids import ServiceID
from serval.core.listener import ConnectionRequest, Listener
from serval.core.wire import Address, MigrateExt, SalPacket
from serval.errors import FlowStateError
from serval.sim import make_transport

SERVICE = ServiceID.from_name("export.example")
CLIENT, CLIENT_NEW, CLIENT_NEWER = (IPv4Address(f"10.0.0.{n}") for n in (1, 11, 21))
SERVER, SERVER_NEW = IPv4Address("10.0.0.2"), IPv4Address("10.0.0.12")
DOMAIN_KEY = bytes(range(32))
T0 = 1000.0


def deliver(sender: Flow | Listener, receiver: Flow, source: Address, now: float) -> None:
    for packet, _ in sender.datagrams_to_send(now):
        receiver.handle_packet(wire.decode(wire.encode(packet)), source, now)


def establish(seed: int) -> tuple[Flow, Flow, random.Random]:
    rng = random.Random(seed)
    client = Flow.connect(SERVICE, make_transport(rng, CLIENT, 40000), T0, rng,
                          local_address=CLIENT, domain_key=DOMAIN_KEY)
    listener = Listener(SERVICE, 8, domain_key=DOMAIN_KEY)
    for packet, _ in client.datagrams_to_send(T0):
        listener.handle_packet(wire.decode(wire.encode(packet)), CLIENT, T0, rng,
                               local_address=SERVER)
    event = listener.next_event()
    assert isinstance(event, ConnectionRequest)
    listener.respond(event.flow, make_transport(rng, SERVER, 7000), T0)
    deliver(listener, client, SERVER, T0)  # SYN-ACK
    for packet, _ in client.datagrams_to_send(T0):  # ACK
        listener.handle_packet(wire.decode(wire.encode(packet)), CLIENT, T0, rng,
                               local_address=SERVER)
    server = listener.accept()
    assert server is not None
    assert client.state is FlowState.CONNECTED and server.state is FlowState.CONNECTED
    for flow in (client, server):
        while flow.next_event() is not None:
            pass
    return client, server, rng


def info(address: Address) -> MigrateExt:
    return MigrateExt(rcv_nxt=1234, window_edge=1234 + 65535, address=address, port=7000)


def move(initiator: Flow, responder: Flow, new_address: Address, now: float) -> None:
    """One complete migration of `initiator` to `new_address`, packet by packet."""
    old_responder_address = responder.local_address
    assert old_responder_address is not None
    initiator.migrate(new_address, info(new_address), now)
    deliver(initiator, responder, new_address, now)  # RSYN
    request = responder.next_event()
    assert isinstance(request, MigrationRequested), request
    responder.accept_migration(info(old_responder_address), now)
    deliver(responder, initiator, old_responder_address, now)  # RSYN-ACK
    done = initiator.next_event()
    assert isinstance(done, MigrationCompleted) and done.initiator, done
    deliver(initiator, responder, new_address, now)  # final ACK
    finished = responder.next_event()
    assert isinstance(finished, MigrationCompleted) and not finished.initiator, finished
    assert responder.peer_address == new_address
    assert initiator.migration_state is MigrationState.RSYN_INITIAL
    assert responder.migration_state is MigrationState.RSYN_INITIAL


def restored(flow: Flow, seed: int, export_of: Flow | None = None) -> Flow:
    """`flow` as a restarted servald rebuilds it (from `export_of`'s export if given)."""
    export = export_flow(export_of if export_of is not None else flow)
    return restore_flow(export, rng=random.Random(seed), now=T0 + 5, domain_key=DOMAIN_KEY)


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_restored_flow_migrates_both_ways_with_the_untouched_peer(side: str) -> None:
    client, server, _ = establish(1)
    if side == "client":
        client = restored(client, 2)
        assert client.is_client and int(client.local_flow) == int(server.peer_flow)
        mover, other, new, other_new = client, server, CLIENT_NEW, SERVER_NEW
    else:
        server = restored(server, 2)
        mover, other, new, other_new = server, client, SERVER_NEW, CLIENT_NEW
    assert mover.state is FlowState.CONNECTED
    move(mover, other, new, T0 + 6)  # the restored end initiates
    move(other, mover, other_new, T0 + 7)  # the untouched peer initiates
    assert other.counters.bad_auth == 0 and mover.counters.bad_auth == 0


def test_a_stale_export_still_migrates() -> None:
    """The export predates a migration (its update never reached the owner): the restored
    flow's vernos are behind what the peer has seen, and RESTORE_VERNO_SKIP covers it."""
    client, server, _ = establish(3)
    stale = export_flow(client)
    move(client, server, CLIENT_NEW, T0 + 1)
    move(server, client, SERVER_NEW, T0 + 2)
    again = restore_flow(stale, rng=random.Random(4), now=T0 + 3, domain_key=DOMAIN_KEY)
    # A restarted servald takes the current addresses from the socket; the sequence numbers
    # are what the stale export knew.
    again.local_address, again.peer_address = CLIENT_NEW, SERVER_NEW
    move(again, server, CLIENT_NEWER, T0 + 4)
    move(server, again, SERVER, T0 + 5)
    assert RESTORE_VERNO_SKIP > 2


def test_a_restored_flow_with_another_domain_key_cannot_migrate() -> None:
    client, server, _ = establish(5)
    wrong = restore_flow(export_flow(client), rng=random.Random(6), now=T0,
                         domain_key=bytes(32))
    wrong.migrate(CLIENT_NEW, info(CLIENT_NEW), T0 + 1)
    deliver(wrong, server, CLIENT_NEW, T0 + 1)
    assert server.next_event() is None
    assert server.counters.bad_auth == 1


def test_only_connected_flows_export() -> None:
    rng = random.Random(7)
    connecting = Flow.connect(SERVICE, make_transport(rng, CLIENT, 40000), T0, rng,
                              local_address=CLIENT)
    with pytest.raises(FlowStateError, match="only a connected flow"):
        export_flow(connecting)
    client, _server, _ = establish(8)
    client.close(T0 + 1)
    with pytest.raises(FlowStateError, match="FIN_WAIT1"):
        export_flow(client)


def test_restored_flow_acks_with_the_peers_packets() -> None:
    """What the peer sends after the restore (a FIN) is taken as usual."""
    client, server, _ = establish(9)
    client = restored(client, 10)
    server.close(T0 + 6)
    deliver(server, client, SERVER, T0 + 6)
    assert client.state is FlowState.CLOSE_WAIT
    packets: list[tuple[SalPacket, Address | None]] = client.datagrams_to_send(T0 + 6)
    assert packets and packets[0][1] == SERVER
