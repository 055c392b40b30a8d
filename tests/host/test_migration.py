"""Migration across namespaces: the engine, two SAL nodes, real sockets, 200 MiB each way.

Every transfer moves 200 MiB in both directions at once and checks the sha256 and the byte
count at both ends (tests/host/test_migration_harness.py has the lab); every test checks that
neither kernel counted an RST (or any abort). Names say the scenario.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serval.core import wire
from serval.core.flow import FLOW_KEY_ID, MIGRATION_TIMEOUT_S
from serval.core.wire import ControlExt, ControlFlags, MigrateExt, SalPacket
from serval.host.migration import Outcome, Role
from serval.host.migration_lab import (
    DOMAIN_KEY,
    LabFlow,
    SalNode,
    assert_no_resets,
    establish,
    lab_nodes,
    wait_for,
)
from serval.topology import LanSpec, Shaping, Topology, TopologySpec

BULK_BYTES = 200 << 20
TRIGGER_FRACTION = 0.4  # migrate once this much has arrived at both ends
SHAPED_RATE = "1gbit"  # multi-move tests: 200 MiB then takes ~1.7 s, longer than all moves


@pytest.fixture
def shaped_pair(topology: Callable[..., Topology]) -> Topology:
    """a and b on one link shaped to SHAPED_RATE (tbf queues: 50 ms of stragglers too)."""
    return topology(TopologySpec.pair(shaping=Shaping(rate=SHAPED_RATE)))


def _start(lab: LabFlow, fraction: float = TRIGGER_FRACTION) -> None:
    lab.start()
    _wait_progress(lab, fraction)


def _wait_progress(lab: LabFlow, fraction: float) -> None:
    """Until both ends have received `fraction` of their bytes."""
    wait_for(lambda: min(lab.client_app.progress()[0], lab.server_app.progress()[0])
             >= lab.client_app.size * fraction, f"{fraction:.0%} of the transfer")


def _finish(lab: LabFlow) -> None:
    try:
        lab.finish()
    finally:
        lab.close()


def _endpoints(sock: socket.socket) -> tuple[str, str]:
    return str(sock.getsockname()[0]), str(sock.getpeername()[0])


def _completed(node: SalNode, flow: int, role: Role) -> list[float]:
    records = node.records(flow)
    assert records, "no migration was recorded"
    assert all(r.outcome is Outcome.COMPLETED for r in records), records
    assert {r.role for r in records} == {role}
    return [r.pause_ms for r in records]


def _wait_records(node: SalNode, flow: int, count: int) -> None:
    wait_for(lambda: len(node.records(flow)) >= count, f"{count} migration records", 10.0)


# --------------------------------------------------------------------------------------------
# the scenarios of the issue


@pytest.mark.netns
@pytest.mark.parametrize("version", [4, 6])
def test_client_moves_and_its_old_address_is_deleted(pair: Topology, tmp_path: Path,
                                                      version: int) -> None:
    a, b = pair["a"], pair["b"]
    old_a = str(a.address(version=version))
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, version, random.Random(version), BULK_BYTES, version,
                        str(tmp_path))
        new_a = str(pair.add_address("a", "a-b", version=version))
        _start(lab)
        record = node_a.migrate(lab.client_flow, new_a)
        assert record.outcome is Outcome.COMPLETED, record
        assert record.old_local is not None and record.old_local[0] == old_a
        assert record.new_local is not None and record.new_local[0] == new_a
        _wait_records(node_b, lab.server_flow, 1)
        pair.remove_address("a", old_a)
        # The sockets carry their new 4-tuple, the fd numbers never changed.
        assert _endpoints(lab.client_sock) == (new_a, str(b.address(version=version)))
        assert _endpoints(lab.server_sock)[1] == new_a
        _finish(lab)
        _completed(node_a, lab.client_flow, Role.INITIATOR)
        _completed(node_b, lab.server_flow, Role.RESPONDER)
        assert lab.client_app.parks == 1 and lab.server_app.parks == 1
    assert_no_resets(a, b)
    # The old sockets were released silently in repair mode: counted, nothing sent (notes 3.4).
    assert a.net_counters()["Tcp.EstabResets"] == 1
    assert b.net_counters()["Tcp.EstabResets"] == 1


@pytest.mark.netns
def test_server_moves(pair: Topology, tmp_path: Path) -> None:
    a, b = pair["a"], pair["b"]
    old_b = str(b.address(version=4))
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(11), BULK_BYTES, 11, str(tmp_path))
        new_b = str(pair.add_address("b", "a-b"))
        _start(lab)
        record = node_b.migrate(lab.server_flow, new_b)
        assert record.outcome is Outcome.COMPLETED, record
        _wait_records(node_a, lab.client_flow, 1)
        pair.remove_address("b", old_b)
        assert _endpoints(lab.server_sock)[0] == new_b
        assert _endpoints(lab.client_sock)[1] == new_b
        _finish(lab)
        _completed(node_b, lab.server_flow, Role.INITIATOR)
        _completed(node_a, lab.client_flow, Role.RESPONDER)
    assert_no_resets(a, b)


@pytest.mark.netns
def test_both_ends_move_at_once(shaped_pair: Topology, tmp_path: Path) -> None:
    """Crossing RSYNs: the Flow's tie-break makes one end yield, answer the other's move with
    the dump it already holds, then move itself. Both old addresses are deleted afterwards."""
    pair = shaped_pair
    a, b = pair["a"], pair["b"]
    old_a, old_b = str(a.address(version=4)), str(b.address(version=4))
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(12), BULK_BYTES, 12, str(tmp_path))
        new_a = str(pair.add_address("a", "a-b"))
        new_b = str(pair.add_address("b", "a-b"))
        _start(lab)
        moving_a = node_a.start_migration(lab.client_flow, new_a)
        moving_b = node_b.start_migration(lab.server_flow, new_b)
        record_a, record_b = moving_a.result(30), moving_b.result(30)
        assert record_a.outcome is Outcome.COMPLETED, record_a
        assert record_b.outcome is Outcome.COMPLETED, record_b
        _wait_records(node_a, lab.client_flow, 2)
        _wait_records(node_b, lab.server_flow, 2)
        pair.remove_address("a", old_a)
        pair.remove_address("b", old_b)
        assert _endpoints(lab.client_sock) == (new_a, new_b)
        assert _endpoints(lab.server_sock) == (new_b, new_a)
        _finish(lab)
        roles_a = [r.role for r in node_a.records(lab.client_flow)]
        roles_b = [r.role for r in node_b.records(lab.server_flow)]
        assert sorted(roles_a, key=str) == sorted(roles_b, key=str) == \
            [Role.INITIATOR, Role.RESPONDER]
        yielded = node_a.counters()["yielded"] + node_b.counters()["yielded"]
        assert yielded <= 1  # they crossed (1), or one had finished before the other began
    assert_no_resets(a, b)


@pytest.mark.netns
def test_five_moves_in_one_transfer(shaped_pair: Topology, tmp_path: Path) -> None:
    """a1 -> a2 -> a3 -> a1 (client), b1 -> b2 (server) and back to a2: alternating ends.
    Moving back to a1 happens within the old socket's linger time (its 4-tuple is reused)."""
    pair = shaped_pair
    a, b = pair["a"], pair["b"]
    a_addresses = [str(a.address(version=4)), str(pair.add_address("a", "a-b")),
                   str(pair.add_address("a", "a-b"))]
    b_addresses = [str(b.address(version=4)), str(pair.add_address("b", "a-b"))]
    moves = [("a", a_addresses[1]), ("b", b_addresses[1]), ("a", a_addresses[2]),
             ("a", a_addresses[0]), ("a", a_addresses[1])]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(13), BULK_BYTES, 13, str(tmp_path))
        _start(lab, 0.1)
        for index, (side, address) in enumerate(moves):
            _wait_progress(lab, 0.1 + 0.12 * index)
            node, flow = (node_a, lab.client_flow) if side == "a" else \
                (node_b, lab.server_flow)
            record = node.migrate(flow, address)
            assert record.outcome is Outcome.COMPLETED, (index, record)
        _wait_records(node_a, lab.client_flow, 5)
        _wait_records(node_b, lab.server_flow, 5)
        assert _endpoints(lab.client_sock) == (a_addresses[1], b_addresses[1])
        _finish(lab)
        assert lab.client_app.parks == lab.server_app.parks == 5
    assert_no_resets(a, b)
    assert a.net_counters()["Tcp.EstabResets"] == 5


@pytest.mark.netns
def test_back_to_back_moves(shaped_pair: Topology, tmp_path: Path) -> None:
    """Each end moves five times in a row, each move the moment the previous one returns.
    The responder of one move may still be writing the bytes its peer lacks when that peer
    parks for its next move (so they cannot drain): the new RSYN must interrupt that write,
    not wait behind it (it used to wait for the initiator's 3 s timeout)."""
    pair = shaped_pair
    a, b = pair["a"], pair["b"]
    a_addresses = [str(a.address(version=4)), str(pair.add_address("a", "a-b"))]
    b_addresses = [str(b.address(version=4)), str(pair.add_address("b", "a-b"))]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(19), BULK_BYTES, 19, str(tmp_path))
        _start(lab, 0.1)
        records = []
        for index in range(10):
            node, flow, addresses = ((node_b, lab.server_flow, b_addresses) if index < 5
                                     else (node_a, lab.client_flow, a_addresses))
            records.append(node.migrate(flow, addresses[(index % 5 + 1) % 2]))
        _finish(lab)
        assert [r.outcome for r in records] == [Outcome.COMPLETED] * 10, records
        assert max(r.pause_ms for r in records) < MIGRATION_TIMEOUT_S * 1000 / 3, \
            [round(r.pause_ms) for r in records]
    assert_no_resets(a, b)


# --------------------------------------------------------------------------------------------
# failures roll back


@pytest.mark.netns
def test_unanswered_migration_rolls_back_both_ends(pair: Topology, tmp_path: Path) -> None:
    """The new address cannot be answered (b has no route to it): the initiator gives up
    after MIGRATION_TIMEOUT_S, the responder after its own timeout; both resume their old
    sockets and the transfer completes intact on the old path."""
    a, b = pair["a"], pair["b"]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(14), BULK_BYTES, 14, str(tmp_path))
        stranded = str(pair.add_address("a", "a-b", "10.99.0.1/32"))
        _start(lab)
        started = time.monotonic()
        record = node_a.migrate(lab.client_flow, stranded)
        assert record.outcome is Outcome.ROLLED_BACK and record.reason == "timeout", record
        assert time.monotonic() - started >= MIGRATION_TIMEOUT_S
        _wait_records(node_b, lab.server_flow, 1)
        [answer] = node_b.records(lab.server_flow)
        assert answer.outcome is Outcome.ROLLED_BACK, answer
        assert _endpoints(lab.client_sock)[0] == str(a.address(version=4))
        _finish(lab)
    assert_no_resets(a, b)


@pytest.mark.netns
def test_refused_migration_rolls_back_at_once(shaped_pair: Topology, tmp_path: Path) -> None:
    """The responder cannot take part (its application does not park): it answers RSYN-NACK
    and the initiator resumes its old socket immediately, not after a timeout."""
    pair = shaped_pair
    a, b = pair["a"], pair["b"]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(15), BULK_BYTES, 15, str(tmp_path))
        new_a = str(pair.add_address("a", "a-b"))
        _start(lab)
        lab.server_app.refuse_park = True
        started = time.monotonic()
        record = node_a.migrate(lab.client_flow, new_a)
        assert record.outcome is Outcome.ROLLED_BACK and record.reason == "refused", record
        assert time.monotonic() - started < MIGRATION_TIMEOUT_S / 2
        assert node_b.counters()["refused"] == 1
        assert _endpoints(lab.client_sock)[0] == str(a.address(version=4))
        lab.server_app.refuse_park = False
        # And the flow can still move afterwards.
        assert node_a.migrate(lab.client_flow, new_a).outcome is Outcome.COMPLETED
        _finish(lab)
    assert_no_resets(a, b)


@pytest.mark.netns
def test_lost_final_ack_is_covered_by_data_on_the_new_socket(pair: Topology,
                                                           tmp_path: Path) -> None:
    a, b = pair["a"], pair["b"]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(16), BULK_BYTES, 16, str(tmp_path))
        new_a = str(pair.add_address("a", "a-b"))
        dropped: list[SalPacket] = []

        def drop_final_ack(packet: SalPacket, *_: object) -> bool:
            if packet.flags == ControlFlags.ACK and packet.auth is not None:
                dropped.append(packet)
                return True
            return False

        node_a.drop = drop_final_ack
        _start(lab)
        record = node_a.migrate(lab.client_flow, new_a)
        assert record.outcome is Outcome.COMPLETED, record
        _wait_records(node_b, lab.server_flow, 1)
        [answer] = node_b.records(lab.server_flow)
        assert answer.outcome is Outcome.COMPLETED
        assert len(dropped) == 1
        assert node_b.counters()["implicit_ack"] == 1
        # Completed by the first segment, not by the RSYN-ACK retransmission (>= 200 ms).
        answered = dict(answer.timeline)
        assert answered["committed"] - answered["rsyn_ack_sent"] < 150
        node_a.drop = None
        _finish(lab)
    assert_no_resets(a, b)


@pytest.mark.netns
def test_lost_rsyn_ack_is_recovered_by_retransmission(pair: Topology, tmp_path: Path) -> None:
    a, b = pair["a"], pair["b"]
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(17), BULK_BYTES, 17, str(tmp_path))
        new_a = str(pair.add_address("a", "a-b"))
        lost: list[SalPacket] = []

        def lose_first_rsyn_ack(packet: SalPacket, *_: object) -> bool:
            if packet.flags == ControlFlags.RSYN | ControlFlags.ACK and not lost:
                lost.append(packet)
                return True
            return False

        node_b.drop = lose_first_rsyn_ack
        _start(lab)
        record = node_a.migrate(lab.client_flow, new_a)
        assert record.outcome is Outcome.COMPLETED, record
        assert lost and node_a.flow_counters(lab.client_flow)["retransmissions"] >= 1
        _finish(lab)
    assert_no_resets(a, b)


# --------------------------------------------------------------------------------------------
# spoofing


def _rsyn_for(target: SalNode, flow_id: int, nonce: bytes, key: bytes | None,
              address: str, verno: int) -> bytes:
    """An RSYN towards `target`'s flow, as forged by someone who knows `nonce` (or not)."""
    engine = target.engine
    assert engine is not None
    managed = target.call(lambda: engine.get(flow_id))
    assert managed is not None
    flow = managed.flow
    packet = SalPacket(
        src_flow=flow.peer_flow, dst_flow=flow.local_flow,
        control=ControlExt(ControlFlags.RSYN, verno, 0, nonce),
        migrate=MigrateExt(rcv_nxt=1, window_edge=1 << 20,
                           address=ipaddress.ip_address(address), port=4444))
    if key is not None:
        packet = wire.sign(packet, key, FLOW_KEY_ID)
    return wire.encode(packet)


@pytest.fixture
def trio(topology: Callable[..., Topology]) -> Topology:
    """a and b, plus m (the attacker) on the same LAN (shaped: the transfer must outlast the
    forgeries and the real migration after them)."""
    return topology(TopologySpec(hosts=("a", "b", "m"), lans=(
        LanSpec("lan", ("a", "b", "m"), shaping=Shaping(rate=SHAPED_RATE)),)))


@pytest.mark.netns
def test_spoofed_and_replayed_rsyns_change_nothing(trio: Topology, tmp_path: Path) -> None:
    a, b, m = trio["a"], trio["b"], trio["m"]
    with lab_nodes(trio, "a", "b", "m") as (node_a, node_b, node_m):
        lab = establish(node_a, node_b, 4, random.Random(18), BULK_BYTES, 18, str(tmp_path))
        new_a = str(trio.add_address("a", "lan"))
        attacker = str(m.address(version=4))
        _start(lab, 0.2)
        engine_b = node_b.engine
        assert engine_b is not None
        flow_b = node_b.call(lambda: engine_b.get(lab.server_flow))
        assert flow_b is not None
        peer_nonce = node_b.call(lambda: flow_b.flow.peer_nonce)
        assert peer_nonce is not None
        target = b.address(version=4)

        def forge(nonce: bytes, key: bytes | None) -> bytes:
            # Nonce and authenticator are checked before the verno, so any verno will do.
            return _rsyn_for(node_b, lab.server_flow, nonce, key, attacker, 0)

        before = node_b.flow_counters(lab.server_flow)
        forgeries = [
            forge(random.Random(1).randbytes(8), None),  # off-path: guessed nonce, no auth
            forge(random.Random(2).randbytes(8), b"x" * 32),  # off-path, some key
            forge(peer_nonce, None),  # on-path observer: right nonce, no authenticator
            forge(peer_nonce, b"k" * 32),  # right nonce, wrong key
            forge(peer_nonce, DOMAIN_KEY),  # right nonce, the domain key itself: not the flow key
        ]
        for data in forgeries:
            node_m.send_raw(data, target, None, node_b.port)
        # Off-path host guessing flowIDs too.
        blind = SalPacket(src_flow=1234, dst_flow=5678,
                          control=ControlExt(ControlFlags.RSYN, 1, 0, bytes(8)))
        node_m.send_raw(wire.encode(blind), target, None, node_b.port)
        time.sleep(0.3)
        after = node_b.flow_counters(lab.server_flow)
        rejected = sum(after[k] - before[k] for k in ("bad_nonce", "bad_auth"))
        assert rejected == len(forgeries)
        assert node_b.received["no_such_flow"] >= 1
        assert node_b.counters()["answered"] == 0 and lab.server_app.parks == 0

        # A real migration, then its RSYN replayed, from the attacker and from a itself.
        assert node_a.migrate(lab.client_flow, new_a).outcome is Outcome.COMPLETED
        _wait_records(node_b, lab.server_flow, 1)
        assert _endpoints(lab.server_sock)[1] == new_a
        rsyns = [s for s in node_a.sent if s.packet.flags == ControlFlags.RSYN]
        assert len(rsyns) == 1
        replay = wire.encode(rsyns[0].packet)
        node_m.send_raw(replay, target, None, node_b.port)
        node_a.send_raw(replay, target, ipaddress.ip_address(new_a), node_b.port)
        time.sleep(0.3)
        assert node_b.counters()["answered"] == 1 and lab.server_app.parks == 1
        assert node_b.call(lambda: flow_b.remote) == (new_a, lab.client_tuple[0][1])
        final = node_b.flow_counters(lab.server_flow)
        assert final["stale"] - after["stale"] >= 2
        # A tampered copy of the real RSYN (attacker's address swapped in) fails its MAC.
        tampered = dataclasses.replace(
            rsyns[0].packet, migrate=dataclasses.replace(
                rsyns[0].packet.migrate, address=ipaddress.ip_address(attacker)))
        node_m.send_raw(wire.encode(tampered), target, None, node_b.port)
        time.sleep(0.2)
        assert node_b.flow_counters(lab.server_flow)["bad_auth"] == final["bad_auth"] + 1
        _finish(lab)
    assert_no_resets(a, b)
