"""The service table: longest-prefix match, priority sets, weighted anycast, fallback, rules."""

from __future__ import annotations

import json
import random
from collections import Counter
from ipaddress import IPv4Address, IPv6Address

import pytest

from serval.core.ids import SERVICE_ID_BITS, ServiceID
from serval.core.service_table import (
    Resolution,
    RuleKind,
    ServiceTable,
    Target,
    TargetKey,
)
from serval.errors import ServiceTableError

FULL_ID = ServiceID(bytes(range(0xA0, 0xC0)))  # 32 distinct bytes, plenty of 1 and 0 bits
A = IPv4Address("10.0.0.1")
B = IPv4Address("10.0.0.2")
C = IPv4Address("10.0.0.3")
D = IPv6Address("2001:db8::4")


def prefix(bits: int, service: ServiceID = FULL_ID) -> ServiceID:
    return service.with_prefix(bits)


def flip(service: ServiceID, bit: int) -> ServiceID:
    """`service` (full length) with bit `bit` inverted: it shares exactly `bit` leading bits."""
    as_int = int.from_bytes(service.value, "big") ^ (1 << (SERVICE_ID_BITS - 1 - bit))
    return ServiceID(as_int.to_bytes(32, "big"))


def address(n: int) -> IPv4Address:
    return IPv4Address(0x0A000000 + n)


def resolve(table: ServiceTable, service: ServiceID, **kwargs: object) -> Resolution:
    found = table.resolve(service, random.Random(1), **kwargs)  # type: ignore[arg-type]
    assert found is not None
    return found


# -- longest-prefix match --------------------------------------------------------------------

LENGTHS = [0, 1, 7, 8, 128, 255, 256]


@pytest.fixture
def nested() -> ServiceTable:
    """One entry per length in LENGTHS, all prefixes of FULL_ID, each forwarding to address(len)."""
    table = ServiceTable()
    for bits in LENGTHS:
        table.add(prefix(bits), Target.forward(address(bits)))
    return table


def test_full_id_resolves_to_the_longest_prefix(nested: ServiceTable) -> None:
    found = resolve(nested, FULL_ID)
    assert found.prefix == FULL_ID
    assert found.destination == address(256)


@pytest.mark.parametrize("bit", [0, 1, 6, 7, 8, 100, 128, 200, 254, 255])
def test_an_id_differing_at_a_bit_matches_the_longest_prefix_before_that_bit(
    nested: ServiceTable, bit: int
) -> None:
    expected_bits = max(length for length in LENGTHS if length <= bit)
    found = resolve(nested, flip(FULL_ID, bit))
    assert found.prefix == prefix(expected_bits)
    assert found.destination == address(expected_bits)


def test_removing_longer_prefixes_exposes_each_shorter_one_in_turn(nested: ServiceTable) -> None:
    for bits in sorted(LENGTHS, reverse=True):
        assert resolve(nested, FULL_ID).prefix.prefix_bits == bits
        nested.remove(prefix(bits), TargetKey(RuleKind.FORWARD, address(bits)))
    assert nested.resolve(FULL_ID, random.Random(1)) is None
    assert len(nested) == 0


def test_lookup_of_a_prefix_never_matches_longer_entries(nested: ServiceTable) -> None:
    # The bits past a looked-up prefix are unknown, so only entries no longer than it apply.
    assert resolve(nested, prefix(100)).prefix == prefix(8)
    assert resolve(nested, prefix(128)).prefix == prefix(128)
    assert resolve(nested, prefix(0)).prefix == prefix(0)


def test_without_a_default_entry_an_unrelated_id_misses() -> None:
    table = ServiceTable()
    table.add(prefix(8), Target.forward(A))
    assert table.resolve(flip(FULL_ID, 3), random.Random(1)) is None
    assert table.misses == 1
    assert table.resolutions == 0


def test_diverging_and_in_between_prefixes_are_all_found() -> None:
    table = ServiceTable()
    left = flip(FULL_ID, 40)
    table.add(prefix(64), Target.forward(A))  # FULL_ID side
    table.add(left.with_prefix(64), Target.forward(B))  # forks from the above at bit 40
    table.add(prefix(20), Target.forward(C))  # above the fork
    table.add(prefix(50), Target.forward(D))  # between the fork and the first entry
    assert resolve(table, FULL_ID).destination == A
    assert resolve(table, left).destination == B
    assert resolve(table, flip(FULL_ID, 55)).destination == D
    assert resolve(table, flip(FULL_ID, 45)).destination == C
    assert table.resolve(flip(FULL_ID, 10), random.Random(1)) is None


def test_trie_agrees_with_a_linear_scan_through_random_adds_and_removes() -> None:
    rng = random.Random(7)
    table = ServiceTable()
    installed: dict[ServiceID, IPv4Address] = {}
    # Few distinct leading bytes so that prefixes share, nest and fork a lot.
    bases = [ServiceID(bytes([b]) + rng.randbytes(31)) for b in (0x00, 0x01, 0x80, 0x81)]

    def random_id() -> ServiceID:
        return ServiceID(rng.choice(bases).value[:2] + rng.randbytes(30))

    for step in range(3000):
        if installed and rng.random() < 0.4:
            victim = rng.choice(sorted(installed, key=str))
            table.remove(victim, TargetKey(RuleKind.FORWARD, installed.pop(victim)))
        else:
            bits = rng.choice([0, 1, 2, 7, 8, 9, 15, 16, 17, 24, 64, 128, 255, 256])
            candidate = random_id().with_prefix(bits)
            if candidate not in installed:
                installed[candidate] = address(step)
                table.add(candidate, Target.forward(installed[candidate]))
        assert len(table) == len(installed)
        probe = random_id()
        matching = [p for p in installed if p.contains(probe)]
        found = table.resolve(probe, rng)
        if not matching:
            assert found is None
        else:
            best = max(matching, key=lambda p: p.prefix_bits)
            assert found is not None
            assert (found.prefix, found.destination) == (best, installed[best])
    assert [e.prefix for e in table.entries()] == sorted(
        installed, key=lambda p: "".join(str(p.bit(i)) for i in range(p.prefix_bits))
    )


# -- priorities, weights, fallback -----------------------------------------------------------


def test_only_the_highest_priority_set_serves() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=1))
    table.add(FULL_ID, Target.forward(B, priority=5))
    table.add(FULL_ID, Target.forward(C, priority=3))
    rng = random.Random(3)
    assert {table.resolve(FULL_ID, rng).destination for _ in range(200)} == {B}  # type: ignore[union-attr]
    table.remove(FULL_ID, TargetKey(RuleKind.FORWARD, B))
    assert {table.resolve(FULL_ID, rng).destination for _ in range(200)} == {C}  # type: ignore[union-attr]


def test_weighted_anycast_over_10000_resolutions_is_within_2_percent_of_the_weights() -> None:
    table = ServiceTable()
    weights: dict[IPv4Address | IPv6Address, int] = {A: 1, B: 2, C: 3, D: 4}
    for target_address, weight in weights.items():
        table.add(FULL_ID, Target.forward(target_address, weight=weight))
    rng = random.Random(20240601)
    draws = 10_000
    chosen = Counter(table.resolve(FULL_ID, rng).destination for _ in range(draws))  # type: ignore[union-attr]
    total_weight = sum(weights.values())
    for target_address, weight in weights.items():
        share = chosen[target_address] / draws
        assert share == pytest.approx(weight / total_weight, rel=0.02), (target_address, share)
    # The counters tell the same story as the draws.
    counted = {t.target.destination: t.packets for t in table.get(FULL_ID).targets}  # type: ignore[union-attr]
    assert counted == dict(chosen)


def test_weighted_choice_among_the_usable_targets_when_some_are_excluded() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, weight=1))
    table.add(FULL_ID, Target.forward(B, weight=3))
    table.add(FULL_ID, Target.forward(C, weight=100))
    rng = random.Random(5)
    chosen = Counter(
        table.resolve(FULL_ID, rng, exclude={C}).destination  # type: ignore[union-attr]
        for _ in range(4000)
    )
    assert set(chosen) == {A, B}
    assert chosen[B] / 4000 == pytest.approx(0.75, abs=0.03)


def test_same_seed_gives_the_same_choices() -> None:
    table = ServiceTable()
    for n in range(5):
        table.add(FULL_ID, Target.forward(address(n), weight=n + 1))
    first = [table.resolve(FULL_ID, random.Random(9)).destination for _ in range(3)]  # type: ignore[union-attr]
    rng_a, rng_b = random.Random(11), random.Random(11)
    run_a = [table.resolve(FULL_ID, rng_a).destination for _ in range(50)]  # type: ignore[union-attr]
    run_b = [table.resolve(FULL_ID, rng_b).destination for _ in range(50)]  # type: ignore[union-attr]
    assert run_a == run_b
    assert len(set(first)) == 1


def test_when_the_best_set_is_all_excluded_the_next_priority_set_serves() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=10))
    table.add(FULL_ID, Target.forward(B, priority=10))
    table.add(FULL_ID, Target.forward(C, priority=1))
    found = resolve(table, FULL_ID, exclude=frozenset({A, B}))
    assert (found.prefix, found.destination) == (FULL_ID, C)


def test_when_the_longest_entry_is_all_excluded_a_shorter_prefix_serves() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=10))
    table.add(FULL_ID, Target.forward(B, priority=1))
    table.add(prefix(128), Target.forward(C))
    table.add(prefix(0), Target.forward(D))
    found = resolve(table, FULL_ID, exclude={A, B})
    assert (found.prefix, found.destination) == (prefix(128), C)
    found = resolve(table, FULL_ID, exclude={A, B, C})
    assert (found.prefix, found.destination) == (prefix(0), D)
    assert table.resolve(FULL_ID, random.Random(1), exclude={A, B, C, D}) is None
    # Nothing was counted against the skipped targets.
    assert table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, A)).packets == 0  # type: ignore[union-attr]
    assert table.get(FULL_ID).hits == 0  # type: ignore[union-attr]


def test_drop_and_delay_cannot_be_excluded_and_stop_the_fallback() -> None:
    table = ServiceTable()
    table.add(prefix(8), Target.forward(A))
    table.add(prefix(64), Target.drop())
    found = resolve(table, FULL_ID, exclude={A, None})
    assert found.kind is RuleKind.DROP
    assert found.prefix == prefix(64)


def test_demux_targets_are_excluded_by_listener_key() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.demux("listener-1", priority=32000))
    table.add(FULL_ID, Target.forward(A))
    assert resolve(table, FULL_ID).kind is RuleKind.DEMUX
    found = resolve(table, FULL_ID, exclude={"listener-1"})
    assert (found.kind, found.destination) == (RuleKind.FORWARD, A)


def test_resolve_all_returns_every_usable_target_of_the_best_set() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=2))
    table.add(FULL_ID, Target.forward(B, priority=2))
    table.add(FULL_ID, Target.forward(C, priority=1))
    table.add(prefix(8), Target.forward(D))
    assert [r.destination for r in table.resolve_all(FULL_ID)] == [A, B]
    assert [r.destination for r in table.resolve_all(FULL_ID, exclude={A})] == [B]
    assert [r.destination for r in table.resolve_all(FULL_ID, exclude={A, B})] == [C]
    assert [r.destination for r in table.resolve_all(FULL_ID, exclude={A, B, C})] == [D]
    assert table.resolve_all(FULL_ID, exclude={A, B, C, D}) == ()
    assert table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, B)).packets == 2  # type: ignore[union-attr]


# -- installing, modifying, removing ----------------------------------------------------------


def test_modify_keeps_what_it_is_not_given() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, weight=7, priority=4))
    key = TargetKey(RuleKind.FORWARD, A)
    after_weight = table.modify(FULL_ID, key, weight=9)
    assert (after_weight.target.weight, after_weight.target.priority) == (9, 4)
    after_priority = table.modify(FULL_ID, key, priority=2)
    assert (after_priority.target.weight, after_priority.target.priority) == (9, 2)
    unchanged = table.modify(FULL_ID, key)
    assert (unchanged.target.weight, unchanged.target.priority) == (9, 2)


def test_modify_priority_moves_the_target_between_sets() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=5))
    table.add(FULL_ID, Target.forward(B, priority=1))
    assert resolve(table, FULL_ID).destination == A
    table.modify(FULL_ID, TargetKey(RuleKind.FORWARD, B), priority=9)
    assert resolve(table, FULL_ID).destination == B
    assert [t.target.destination for t in table.get(FULL_ID).targets] == [B, A]  # type: ignore[union-attr]


def test_modify_with_a_bad_weight_changes_nothing() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, weight=3, priority=1))
    with pytest.raises(ServiceTableError, match=str(FULL_ID)):
        table.modify(FULL_ID, TargetKey(RuleKind.FORWARD, A), weight=0, priority=8)
    target = table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, A))
    assert target is not None
    assert (target.target.weight, target.target.priority) == (3, 1)


@pytest.mark.parametrize(
    "target",
    [Target.forward(A), Target.demux(("tcp", 8080)), Target.delay(), Target.drop()],
    ids=["forward", "demux", "delay", "drop"],
)
def test_remove_works_for_every_rule_kind(target: Target) -> None:
    table = ServiceTable()
    table.add(prefix(16), target)
    table.add(prefix(16), Target.forward(B, priority=-1))
    removed = table.remove(prefix(16), target.key)
    assert removed.target == target
    assert table.get_target(prefix(16), target.key) is None
    assert resolve(table, FULL_ID).destination == B


def test_the_entry_goes_with_its_last_target_and_remove_entry_takes_all() -> None:
    table = ServiceTable()
    table.add(prefix(16), Target.forward(A))
    table.remove(prefix(16), TargetKey(RuleKind.FORWARD, A))
    assert prefix(16) not in table
    assert table.entries() == []
    table.add(prefix(16), Target.forward(A))
    table.add(prefix(16), Target.delay(priority=3))
    final = table.remove_entry(prefix(16))
    assert {t.target.kind for t in final.targets} == {RuleKind.FORWARD, RuleKind.DELAY}
    assert len(table) == 0
    assert table.resolve(FULL_ID, random.Random(1)) is None


def test_replace_swaps_a_target_in_place_keeping_its_counters() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, weight=4, priority=2))
    resolve(table, FULL_ID, packet_bytes=100)
    table.replace(FULL_ID, TargetKey(RuleKind.FORWARD, A), Target.forward(B, weight=4, priority=2))
    assert table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, A)) is None
    moved = table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, B))
    assert moved is not None
    assert (moved.packets, moved.bytes) == (1, 100)
    assert resolve(table, FULL_ID).destination == B


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (Target.forward(A, weight=0), "weight must be an integer >= 1"),
        (Target(RuleKind.FORWARD, A, weight=True), "weight must be an integer >= 1"),
        (Target(RuleKind.FORWARD, "10.0.0.1"), "needs an IP address"),
        (Target(RuleKind.DROP, A), "has no destination"),
        (Target(RuleKind.DEMUX, None), "needs a listener key"),
        (Target(RuleKind.DEMUX, ["unhashable"]), "must be hashable"),  # type: ignore[arg-type]
        (Target("bounce", A), "unknown rule kind"),  # type: ignore[arg-type]
        (Target.forward(A, priority=1.5), "priority must be an integer"),  # type: ignore[arg-type]
    ],
)
def test_invalid_targets_are_refused_naming_the_service(target: Target, message: str) -> None:
    table = ServiceTable()
    with pytest.raises(ServiceTableError, match=message) as raised:
        table.add(FULL_ID, target)
    assert str(FULL_ID) in str(raised.value)
    assert len(table) == 0


def test_duplicate_targets_are_refused_even_at_another_priority() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, priority=1))
    with pytest.raises(ServiceTableError, match=f"{FULL_ID}: duplicate target FORWARD 10.0.0.1"):
        table.add(FULL_ID, Target.forward(A, priority=2))
    table.add(FULL_ID, Target.drop())
    with pytest.raises(ServiceTableError, match="duplicate target DROP"):
        table.add(FULL_ID, Target.drop(priority=7))
    assert len(table.get(FULL_ID).targets) == 2  # type: ignore[union-attr]


def test_unknown_entries_and_targets_are_errors_naming_the_service() -> None:
    table = ServiceTable()
    with pytest.raises(ServiceTableError, match=f"{prefix(8)}: no service-table entry"):
        table.remove(prefix(8), TargetKey(RuleKind.DROP))
    with pytest.raises(ServiceTableError, match="no service-table entry"):
        table.remove_entry(prefix(8))
    table.add(prefix(8), Target.forward(A))
    with pytest.raises(ServiceTableError, match=r"no target DELAY \(targets: FORWARD 10.0.0.1\)"):
        table.remove(prefix(8), TargetKey(RuleKind.DELAY))
    with pytest.raises(ServiceTableError, match=r"no target FORWARD 10\.0\.0\.2"):
        table.modify(prefix(8), TargetKey(RuleKind.FORWARD, B), weight=2)
    # An exact-prefix operation does not fall back to a shorter entry.
    with pytest.raises(ServiceTableError, match="no service-table entry"):
        table.remove(prefix(9), TargetKey(RuleKind.FORWARD, A))


# -- counters and listing ---------------------------------------------------------------------


def test_counters_track_packets_bytes_last_use_and_entry_hits() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A))
    table.add(prefix(0), Target.drop())
    rng = random.Random(2)
    table.resolve(FULL_ID, rng, packet_bytes=60, now=100.0)
    table.resolve(FULL_ID, rng, packet_bytes=40)
    table.resolve(flip(FULL_ID, 0), rng, packet_bytes=1500, now=101.5)
    forward = table.get_target(FULL_ID, TargetKey(RuleKind.FORWARD, A))
    drop = table.get_target(prefix(0), TargetKey(RuleKind.DROP))
    assert forward is not None and drop is not None
    assert (forward.packets, forward.bytes, forward.last_used) == (2, 100, 100.0)
    assert (drop.packets, drop.bytes, drop.last_used) == (1, 1500, 101.5)
    assert [e.hits for e in table.entries()] == [1, 2]
    assert (table.resolutions, table.misses) == (3, 0)


def test_entries_are_listed_in_a_stable_order_and_serialise_to_json() -> None:
    table = ServiceTable()
    table.add(FULL_ID, Target.forward(A, weight=2, priority=1))
    table.add(FULL_ID, Target.demux(("udp", 53), priority=9))
    table.add(prefix(0), Target.forward(D))
    table.add(flip(FULL_ID, 0).with_prefix(1), Target.delay())
    table.add(prefix(1), Target.drop())
    listing = [e.to_dict() for e in table.entries()]
    # FULL_ID starts with a 1 bit, so its flipped /1 is "0" and sorts before FULL_ID's "1".
    expected_order = [("00", 0), ("00", 1), ("80", 1), (FULL_ID.value.hex()[:2], 256)]
    assert [(d["service"][:2], d["prefix_bits"]) for d in listing] == expected_order
    full = listing[-1]
    assert full["targets"] == [
        {"kind": "demux", "destination": "('udp', 53)", "weight": 1, "priority": 9,
         "packets": 0, "bytes": 0, "last_used": None},
        {"kind": "forward", "destination": "10.0.0.1", "weight": 2, "priority": 1,
         "packets": 0, "bytes": 0, "last_used": None},
    ]  # fmt: skip
    assert json.loads(json.dumps(listing)) == listing
    assert [e.to_dict() for e in table.entries()] == listing


def test_many_prefixes_resolve_correctly() -> None:
    # A table of a few thousand prefixes, as a router would hold (performance is measured in
    # benchmarks; here the point is correctness at that size).
    rng = random.Random(42)
    table = ServiceTable()
    services = [ServiceID(rng.randbytes(32), rng.choice([16, 24, 32, 64, 128, 256]))
                for _ in range(3000)]  # fmt: skip
    for n, service in enumerate(dict.fromkeys(services)):
        table.add(service, Target.forward(address(n)))
    for service in rng.sample(services, 200):
        probe = ServiceID(service.value)  # full length, inside the prefix
        found = table.resolve(probe, rng)
        assert found is not None
        assert found.prefix.contains(probe)
