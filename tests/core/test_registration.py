"""Registration soft state: hosts announce instances, routers hold them with expiry.

Every packet crosses a real encode/decode round trip, as it would on the wire.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from serval.core import wire
from serval.core.ids import ServiceID
from serval.core.registration import (
    DEFAULT_LIFETIME_S,
    DEFAULT_REFRESH_INTERVAL_S,
    LocalService,
    Registrar,
    RegistrationAction,
    RegistrationResult,
    RegistrationTable,
    RejectReason,
)
from serval.core.service_table import RuleKind, ServiceTable, Target, TargetKey
from serval.core.wire import Address, Protocol, RegisterExt, RegisterOp, SalPacket
from serval.errors import RegistrationError

DOMAIN_KEY = b"domain key of the test datacenter"
WRONG_KEY = b"a key an attacker made up itself"
T0 = 1_750_000_000.0  # wall-clock seconds: sequences are wall-clock microseconds

WEB = ServiceID.parse("web.example/64")
DB = ServiceID.parse("db.example")
HOST_A = IPv4Address("192.0.2.10")
HOST_B = IPv4Address("198.51.100.20")
ROUTER_1 = IPv4Address("192.0.2.1")
ROUTER_2 = IPv6Address("2001:db8::1")


def over_the_wire(packet: SalPacket) -> SalPacket:
    return wire.decode(wire.encode(packet))


def snapshot(router: RegistrationTable, table: ServiceTable) -> object:
    """Everything a registration can change: the table, the records and the next deadline."""
    return (
        [e.to_dict() for e in table.entries()],
        router.records(),
        router.next_deadline(),
    )


def deliver(
    router: RegistrationTable, packets: Sequence[tuple[Address, SalPacket]], now: float
) -> list[RegistrationResult]:
    return [router.receive(over_the_wire(p), HOST_A, now) for _, p in packets]


def forward_targets(table: ServiceTable, service: ServiceID) -> dict[object, tuple[int, int]]:
    entry = table.get(service)
    if entry is None:
        return {}
    return {
        t.target.destination: (t.target.weight, t.target.priority)
        for t in entry.targets
        if t.target.kind is RuleKind.FORWARD
    }


@pytest.fixture
def table() -> ServiceTable:
    return ServiceTable()


@pytest.fixture
def router(table: ServiceTable) -> RegistrationTable:
    return RegistrationTable(table, DOMAIN_KEY)


@pytest.fixture
def host() -> Registrar:
    return Registrar([LocalService(WEB, HOST_A, weight=5, priority=3)], [ROUTER_1], DOMAIN_KEY)


def register_packet(
    *,
    sequence: int,
    op: RegisterOp = RegisterOp.REGISTER,
    service: ServiceID = WEB,
    address: IPv4Address = HOST_A,
    weight: int = 1,
    lifetime_s: int = 3,
    previous_address: IPv4Address | None = None,
    key: bytes = DOMAIN_KEY,
) -> SalPacket:
    ext = RegisterExt(op, service, address, weight, 0, lifetime_s, sequence, previous_address)
    packet = SalPacket(0, 0, Protocol.CONTROL, register=ext)
    return over_the_wire(wire.sign(packet, key, 1))


# -- registering, refreshing, expiring --------------------------------------------------------


def test_register_installs_a_forward_target_with_the_announced_weight_and_priority(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    packets = host.due(T0)
    assert [destination for destination, _ in packets] == [ROUTER_1]
    [result] = deliver(router, packets, T0)
    assert result.action is RegistrationAction.INSTALLED
    assert result.record is not None
    assert result.record.expires_at == T0 + DEFAULT_LIFETIME_S
    assert forward_targets(table, WEB) == {HOST_A: (5, 3)}
    found = table.resolve(ServiceID(WEB.value), random.Random(1))
    assert found is not None and found.destination == HOST_A
    assert router.next_deadline() == T0 + DEFAULT_LIFETIME_S


def test_defaults_refresh_every_second_with_a_three_second_lifetime() -> None:
    assert DEFAULT_REFRESH_INTERVAL_S == 1.0
    assert DEFAULT_LIFETIME_S == 3


def test_the_host_refreshes_every_interval_and_the_router_extends_the_expiry(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, host.due(T0), T0)
    assert host.next_deadline() == T0 + 1.0
    assert host.due(T0 + 0.5) == []
    results = deliver(router, host.due(T0 + 1.0), T0 + 1.0)
    assert [r.action for r in results] == [RegistrationAction.REFRESHED]
    assert router.expire(T0 + DEFAULT_LIFETIME_S) == []  # the first lifetime has passed
    assert router.next_deadline() == T0 + 1.0 + DEFAULT_LIFETIME_S
    assert forward_targets(table, WEB) == {HOST_A: (5, 3)}


def test_a_dead_instance_expires_within_the_lifetime_of_its_last_refresh(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    now = T0
    while now < T0 + 5:  # the host lives five seconds, refreshing on schedule
        deliver(router, host.due(now), now)
        now += 0.25
    last_refresh = T0 + 5 - 1.0
    deadline = router.next_deadline()
    assert deadline == last_refresh + DEFAULT_LIFETIME_S
    assert router.expire(deadline - 0.001) == []
    assert forward_targets(table, WEB) == {HOST_A: (5, 3)}
    [expired] = router.expire(deadline)
    assert (expired.service, expired.address) == (WEB, HOST_A)
    assert table.get(WEB) is None
    assert len(router) == 0
    assert router.next_deadline() is None


def test_refresh_carries_changed_weight_and_priority(
    router: RegistrationTable, table: ServiceTable
) -> None:
    router.receive(register_packet(sequence=int(T0 * 1e6), weight=2), HOST_A, T0)
    result = router.receive(register_packet(sequence=int(T0 * 1e6) + 1, weight=9), HOST_A, T0)
    assert result.action is RegistrationAction.REFRESHED
    assert forward_targets(table, WEB) == {HOST_A: (9, 0)}


def test_requested_lifetimes_are_capped_by_the_router(table: ServiceTable) -> None:
    router = RegistrationTable(table, DOMAIN_KEY, max_lifetime_s=10)
    result = router.receive(register_packet(sequence=int(T0 * 1e6), lifetime_s=600), HOST_A, T0)
    assert result.record is not None and result.record.expires_at == T0 + 10


def test_each_router_gets_each_service() -> None:
    routers: dict[Address, ServiceTable] = {ROUTER_1: ServiceTable(), ROUTER_2: ServiceTable()}
    registration_tables = {r: RegistrationTable(t, DOMAIN_KEY) for r, t in routers.items()}
    host = Registrar(
        [LocalService(WEB, HOST_A), LocalService(DB, HOST_A)], list(routers), DOMAIN_KEY
    )
    packets = host.due(T0)
    assert len(packets) == 4
    for destination, packet in packets:
        result = registration_tables[destination].receive(over_the_wire(packet), HOST_A, T0)
        assert result.action is RegistrationAction.INSTALLED
    for table in routers.values():
        assert [e.prefix for e in table.entries()] == sorted(
            [WEB, DB], key=lambda s: (s.value, s.prefix_bits)
        )


def test_unregister_withdraws_at_once(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, host.due(T0), T0)
    host.remove(WEB)
    [(destination, packet)] = host.due(T0 + 0.1)
    assert destination == ROUTER_1
    assert packet.register is not None and packet.register.op is RegisterOp.UNREGISTER
    [result] = deliver(router, [(destination, packet)], T0 + 0.1)
    assert result.action is RegistrationAction.REMOVED
    assert table.get(WEB) is None
    assert router.records() == []
    assert router.next_deadline() is None
    assert host.due(T0 + 5) == []  # withdrawn for good, sent once
    assert host.next_deadline() is None


def test_unregister_of_an_unknown_instance_changes_nothing(
    router: RegistrationTable, table: ServiceTable
) -> None:
    before = snapshot(router, table)
    result = router.receive(
        register_packet(sequence=int(T0 * 1e6), op=RegisterOp.UNREGISTER), HOST_A, T0
    )
    assert result.action is RegistrationAction.NOT_REGISTERED
    assert snapshot(router, table) == before


# -- moving to a new address ----------------------------------------------------------------


class GapWatchingTable(ServiceTable):
    """Records the FORWARD destinations of WEB after every change made to the table."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[set[object]] = []

    def _after(self) -> None:
        self.states.append(set(forward_targets(self, WEB)))

    def add(self, service: ServiceID, target: Target) -> None:
        super().add(service, target)
        self._after()

    def remove(self, service: ServiceID, target_key: TargetKey):  # type: ignore[no-untyped-def]
        result = super().remove(service, target_key)
        self._after()
        return result

    def replace(self, service: ServiceID, old_key: TargetKey, new_target: Target):  # type: ignore[no-untyped-def]
        result = super().replace(service, old_key, new_target)
        self._after()
        return result


def test_reregistration_from_a_new_address_moves_the_target_without_a_gap(
    host: Registrar,
) -> None:
    table = GapWatchingTable()
    router = RegistrationTable(table, DOMAIN_KEY)
    deliver(router, host.due(T0), T0)
    table.resolve(ServiceID(WEB.value), random.Random(1), packet_bytes=80)
    assert host.change_address(HOST_A, HOST_B, T0 + 0.4) == [WEB]
    packets = host.due(T0 + 0.4)  # due at once, not at the next refresh
    [(_, packet)] = packets
    assert packet.register is not None
    assert (packet.register.address, packet.register.previous_address) == (HOST_B, HOST_A)
    table.states.clear()
    [result] = deliver(router, packets, T0 + 0.4)
    assert result.action is RegistrationAction.MOVED
    assert forward_targets(table, WEB) == {HOST_B: (5, 3)}
    assert table.states, "the move changed the table"
    assert all(state & {HOST_A, HOST_B} for state in table.states), table.states
    assert [(r.address, r.expires_at) for r in router.records()] == [
        (HOST_B, T0 + 0.4 + DEFAULT_LIFETIME_S)
    ]
    # The instance's counters moved with it.
    moved = table.get_target(WEB, TargetKey(RuleKind.FORWARD, HOST_B))
    assert moved is not None and moved.bytes == 80


def test_previous_address_is_repeated_for_one_lifetime_then_dropped(host: Registrar) -> None:
    host.due(T0)
    host.change_address(HOST_A, HOST_B, T0 + 0.5)
    previous = []
    now = T0 + 0.5
    while now < T0 + 6:
        previous += [p.register.previous_address for _, p in host.due(now)]  # type: ignore[union-attr]
        now += 0.5
    assert previous[:3] == [HOST_A, HOST_A, HOST_A]
    assert previous[-1] is None


def test_a_lost_move_is_repaired_by_the_next_refresh(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, host.due(T0), T0)
    host.change_address(HOST_A, HOST_B, T0 + 0.2)
    host.due(T0 + 0.2)  # lost
    [result] = deliver(router, host.due(T0 + 1.2), T0 + 1.2)
    assert result.action is RegistrationAction.MOVED
    assert forward_targets(table, WEB) == {HOST_B: (5, 3)}


def test_a_move_the_router_never_saw_the_start_of_installs_the_new_address(
    router: RegistrationTable, table: ServiceTable
) -> None:
    packet = register_packet(sequence=int(T0 * 1e6), address=HOST_B, previous_address=HOST_A)
    result = router.receive(packet, HOST_B, T0)
    assert result.action is RegistrationAction.INSTALLED
    assert forward_targets(table, WEB) == {HOST_B: (1, 0)}


# -- what must change nothing ------------------------------------------------------------------


def test_a_registration_signed_with_the_wrong_key_changes_nothing(
    router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, Registrar([LocalService(WEB, HOST_A)], [ROUTER_1], DOMAIN_KEY).due(T0), T0)
    before = snapshot(router, table)
    spoofer = Registrar([LocalService(WEB, HOST_B, weight=1000)], [ROUTER_1], WRONG_KEY)
    results = deliver(router, spoofer.due(T0 + 0.5), T0 + 0.5)
    assert [(r.action, r.reason) for r in results] == [
        (RegistrationAction.REJECTED, RejectReason.UNAUTHENTICATED)
    ]
    assert not results[0].accepted
    assert snapshot(router, table) == before
    # A forged UNREGISTER cannot withdraw the real instance either.
    forged = register_packet(
        sequence=int((T0 + 0.6) * 1e6), op=RegisterOp.UNREGISTER, key=WRONG_KEY
    )
    assert router.receive(forged, HOST_B, T0 + 0.6).reason is RejectReason.UNAUTHENTICATED
    assert snapshot(router, table) == before


def test_a_packet_altered_after_signing_or_unsigned_changes_nothing(
    router: RegistrationTable, table: ServiceTable
) -> None:
    signed = register_packet(sequence=int(T0 * 1e6), weight=1)
    assert signed.register is not None
    altered = dataclasses.replace(signed.register, weight=900)
    tampered = dataclasses.replace(signed, register=altered)
    unsigned = dataclasses.replace(signed, auth=None)
    other_key_id = dataclasses.replace(signed, auth=wire.AuthExt(7, signed.auth.tag))  # type: ignore[union-attr]
    for packet in (tampered, unsigned, other_key_id):
        result = router.receive(packet, HOST_A, T0)
        assert result.reason is RejectReason.UNAUTHENTICATED, result
    assert snapshot(router, table) == ([], [], None)


def test_a_replayed_registration_changes_nothing(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    first = host.due(T0)
    deliver(router, first, T0)
    latest = host.due(T0 + 1)
    deliver(router, latest, T0 + 1)
    before = snapshot(router, table)
    for captured in (latest, first):  # an exact replay, then an older capture
        results = deliver(router, captured, T0 + 1.5)
        assert [(r.action, r.reason) for r in results] == [
            (RegistrationAction.REJECTED, RejectReason.REPLAYED)
        ]
        assert snapshot(router, table) == before


def test_a_replay_after_unregister_does_not_resurrect_the_instance(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    captured = host.due(T0)
    deliver(router, captured, T0)
    host.remove(WEB)
    deliver(router, host.due(T0 + 0.5), T0 + 0.5)
    router.expire(T0 + 1)
    results = deliver(router, captured, T0 + 1)
    assert results[0].reason is RejectReason.REPLAYED
    assert snapshot(router, table) == ([], [], None)


def test_a_replay_of_the_old_address_after_a_move_is_rejected(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    captured = host.due(T0)
    deliver(router, captured, T0)
    host.change_address(HOST_A, HOST_B, T0 + 0.5)
    deliver(router, host.due(T0 + 0.5), T0 + 0.5)
    before = snapshot(router, table)
    assert deliver(router, captured, T0 + 0.7)[0].reason is RejectReason.REPLAYED
    assert snapshot(router, table) == before


def test_registrations_from_outside_the_clock_skew_are_rejected_as_stale(
    router: RegistrationTable, table: ServiceTable
) -> None:
    old = register_packet(sequence=int((T0 - 31) * 1e6))
    future = register_packet(sequence=int((T0 + 31) * 1e6))
    assert router.receive(old, HOST_A, T0).reason is RejectReason.STALE
    assert router.receive(future, HOST_A, T0).reason is RejectReason.STALE
    assert snapshot(router, table) == ([], [], None)
    # ... and an old capture stays rejected once the router has forgotten its sequence.
    captured = register_packet(sequence=int(T0 * 1e6))
    router.receive(captured, HOST_A, T0)
    router.expire(T0 + 100)
    assert router.receive(captured, HOST_A, T0 + 100).reason is RejectReason.STALE


def test_a_restarted_host_is_accepted_without_any_saved_counter(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, host.due(T0), T0)
    restarted = Registrar([LocalService(WEB, HOST_A, weight=5, priority=3)], [ROUTER_1], DOMAIN_KEY)
    [result] = deliver(router, restarted.due(T0 + 0.3), T0 + 0.3)
    assert result.action is RegistrationAction.REFRESHED


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"service": ServiceID.parse("default")}, "prefix length 0"),
        ({"address": IPv4Address("224.0.0.1")}, "register.address"),
        ({"address": IPv4Address("0.0.0.0")}, "register.address"),
        ({"lifetime_s": 0}, "register.lifetime_s"),
        ({"previous_address": HOST_A}, "equals register.address"),
    ],
)
def test_malformed_registrations_change_nothing(
    router: RegistrationTable, table: ServiceTable, changes: dict[str, Any], field: str
) -> None:
    ext = dataclasses.replace(
        RegisterExt(RegisterOp.REGISTER, WEB, HOST_A, 1, 0, 3, int(T0 * 1e6)), **changes
    )
    unsigned = SalPacket(0, 0, Protocol.CONTROL, register=ext)
    packet = over_the_wire(wire.sign(unsigned, DOMAIN_KEY, 1))
    result = router.receive(packet, HOST_A, T0)
    assert result.reason is RejectReason.MALFORMED
    assert field in result.detail
    assert snapshot(router, table) == ([], [], None)


def test_a_packet_without_a_register_extension_is_malformed(router: RegistrationTable) -> None:
    packet = wire.sign(SalPacket(0, 0, Protocol.CONTROL), DOMAIN_KEY, 1)
    assert router.receive(packet, HOST_A, T0).reason is RejectReason.MALFORMED


def test_a_registration_never_takes_over_a_hand_made_rule(
    router: RegistrationTable, table: ServiceTable
) -> None:
    table.add(WEB, Target.forward(HOST_A, weight=50, priority=9))
    before = snapshot(router, table)
    result = router.receive(register_packet(sequence=int(T0 * 1e6)), HOST_A, T0)
    assert result.reason is RejectReason.CONFLICT
    assert snapshot(router, table) == before


def test_an_operator_removed_rule_is_reinstalled_by_the_next_refresh(
    host: Registrar, router: RegistrationTable, table: ServiceTable
) -> None:
    deliver(router, host.due(T0), T0)
    table.remove(WEB, TargetKey(RuleKind.FORWARD, HOST_A))
    assert deliver(router, host.due(T0 + 1), T0 + 1)[0].action is RegistrationAction.REFRESHED
    assert forward_targets(table, WEB) == {HOST_A: (5, 3)}
    # Expiring a record whose rule an operator removed again is harmless.
    table.remove(WEB, TargetKey(RuleKind.FORWARD, HOST_A))
    assert [r.address for r in router.expire(T0 + 10)] == [HOST_A]
    assert router.records() == []


# -- host side details -------------------------------------------------------------------------


def test_sequences_strictly_increase_even_when_the_clock_stalls_or_steps_back() -> None:
    host = Registrar([LocalService(WEB, HOST_A), LocalService(DB, HOST_A)], [ROUTER_1], DOMAIN_KEY)
    sequences = [p.register.sequence for _, p in host.due(T0)]  # type: ignore[union-attr]
    sequences += [p.register.sequence for _, p in host.due(T0 + 1)]  # type: ignore[union-attr]
    sequences += [p.register.sequence for _, p in host.due(T0 + 0.5)]  # type: ignore[union-attr]
    sequences += [p.register.sequence for _, p in host.due(T0 + 2)]  # type: ignore[union-attr]
    assert sequences == sorted(set(sequences))
    assert sequences[0] == int(T0 * 1_000_000)


def test_jitter_only_ever_brings_refreshes_forward() -> None:
    host = Registrar([LocalService(WEB, HOST_A)], [ROUTER_1], DOMAIN_KEY, random.Random(4))
    now, gaps = T0, []
    host.due(now)
    for _ in range(200):
        deadline = host.next_deadline()
        assert deadline is not None
        gaps.append(deadline - now)
        now = deadline
        assert len(host.due(now)) == 1
    assert all(0.9 <= gap <= 1.0 for gap in gaps)
    assert len({round(gap, 6) for gap in gaps}) > 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"refresh_interval_s": 3.0, "lifetime_s": 3}, "refresh_interval_s"),
        ({"refresh_interval_s": 0.0}, "refresh_interval_s"),
        ({"lifetime_s": 0}, "lifetime_s"),
        ({"jitter_fraction": 1.0}, "jitter_fraction"),
    ],
)
def test_registrar_settings_that_would_let_registrations_lapse_are_refused(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(RegistrationError, match=message):
        Registrar([], [ROUTER_1], DOMAIN_KEY, **kwargs)  # type: ignore[arg-type]


def test_registrar_refuses_duplicate_unknown_and_out_of_range_services(host: Registrar) -> None:
    with pytest.raises(RegistrationError, match=f"{WEB}: already registered"):
        host.add(LocalService(WEB, HOST_B))
    with pytest.raises(RegistrationError, match=f"{DB}: not registered"):
        host.remove(DB)
    with pytest.raises(RegistrationError, match="weight must be"):
        host.add(LocalService(DB, HOST_A, weight=0))
    with pytest.raises(RegistrationError, match="not a unicast address"):
        host.add(LocalService(DB, IPv4Address("0.0.0.0")))
    assert [local.service for local in host.services()] == [WEB]
    with pytest.raises(RegistrationError, match="at least 16 bytes"):
        Registrar([], [ROUTER_1], b"short")
