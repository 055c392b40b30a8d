"""The service table: longest-prefix match over serviceIDs, priorities and weighted anycast.

Theory of operation
-------------------
Every host and service router resolves the first packet of a flow (a SYN, an unconnected
datagram) by looking its destination serviceID up in this table (serval-protocol.md section 4).

* **Entries** are keyed by a serviceID prefix of any length 0..256 bits (MSB-first from byte 0).
  They live in a path-compressed binary trie over the prefix bits, so a lookup visits only the
  nodes where stored prefixes branch (about log2(entries) of them), not 256 single-bit nodes.
* **Targets.** An entry holds targets, each a rule of one `RuleKind`:
  FORWARD (to a SAL address), DEMUX (to a local listener, any hashable key), DELAY (hold the
  packet for a controller) or DROP. A target is identified inside its entry by its
  `TargetKey` = (kind, destination); DELAY and DROP have no destination, so an entry has at most
  one of each. Every target has a `weight` (>= 1) and a `priority` (higher wins).
* **Resolution.** The targets of an entry are grouped by priority. Only the highest-priority set
  that still has a *usable* target serves (a target is unusable when its destination is in
  `exclude`: a SOURCE-trail address, i.e. a loop, or an instance the caller saw fail). Inside that
  set one target is drawn at random with probability weight / sum(weights), from the caller's
  `random.Random`. If no set of the longest matching entry has a usable target, the next shorter
  matching prefix is tried. The original Serval looked only at the top set of the longest match
  and had no fallback at all (serval-protocol.md section 11); a dead or looping instance then
  black-holed the service until its rule was removed.
* **ALL mode** (`resolve_all`) returns every usable target of that same set (multicast).

Differences from the original on purpose (serval-protocol.md sections 4 and 11): `modify` keeps
what it is not given (the original reset priority and weight), `remove` works for every rule kind,
weights below 1 are an error rather than silently coerced, and every error names the serviceID.

The table is sans-IO: no clock (pass `now` to get `last_used` stamps), no global randomness.
"""

from __future__ import annotations

import enum
import random
from bisect import bisect_right
from collections.abc import Collection, Hashable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, NamedTuple

from serval.core.ids import SERVICE_ID_BITS, ServiceID
from serval.errors import ServiceTableError

__all__ = [
    "EntryInfo",
    "Resolution",
    "RuleKind",
    "ServiceTable",
    "Target",
    "TargetInfo",
    "TargetKey",
]


class RuleKind(enum.Enum):
    """What a target does with a packet that resolves to it."""

    FORWARD = "forward"  # send to another SAL host (destination = its Address)
    DEMUX = "demux"  # deliver to a local listener (destination = the listener's key)
    DELAY = "delay"  # hold the packet and ask a controller (no destination)
    DROP = "drop"  # discard (no destination)


_KINDS_WITH_DESTINATION = frozenset({RuleKind.FORWARD, RuleKind.DEMUX})


class TargetKey(NamedTuple):
    """Identifies one target inside an entry: its kind and destination (None for DELAY/DROP)."""

    kind: RuleKind
    destination: Hashable = None


@dataclass(frozen=True)
class Target:
    """A rule to install: kind, destination, weight (>= 1) and priority (higher wins)."""

    kind: RuleKind
    destination: Hashable = None  # Address for FORWARD, listener key for DEMUX, else None
    weight: int = 1
    priority: int = 0

    @property
    def key(self) -> TargetKey:
        return TargetKey(self.kind, self.destination)

    @classmethod
    def forward(
        cls, address: IPv4Address | IPv6Address, *, weight: int = 1, priority: int = 0
    ) -> Target:
        return cls(RuleKind.FORWARD, address, weight, priority)

    @classmethod
    def demux(cls, listener: Hashable, *, weight: int = 1, priority: int = 0) -> Target:
        return cls(RuleKind.DEMUX, listener, weight, priority)

    @classmethod
    def delay(cls, *, weight: int = 1, priority: int = 0) -> Target:
        return cls(RuleKind.DELAY, None, weight, priority)

    @classmethod
    def drop(cls, *, weight: int = 1, priority: int = 0) -> Target:
        return cls(RuleKind.DROP, None, weight, priority)


@dataclass(frozen=True)
class Resolution:
    """The outcome of a lookup: which entry matched and which of its targets was chosen."""

    prefix: ServiceID  # the matching entry's prefix (may be shorter than the one looked up)
    kind: RuleKind
    target: Target

    @property
    def destination(self) -> Hashable:
        return self.target.destination


def _json_value(value: object) -> object:
    """Destinations as JSON-friendly values: addresses and other objects as text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


@dataclass(frozen=True)
class TargetInfo:
    """A snapshot of one target with its counters (for listings and removal reports)."""

    target: Target
    packets: int  # packets resolved to this target (for DROP: packets dropped)
    bytes: int  # sum of the `packet_bytes` passed with those resolutions
    last_used: float | None  # `now` of the latest resolution that passed one, else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.target.kind.value,
            "destination": _json_value(self.target.destination),
            "weight": self.target.weight,
            "priority": self.target.priority,
            "packets": self.packets,
            "bytes": self.bytes,
            "last_used": self.last_used,
        }


@dataclass(frozen=True)
class EntryInfo:
    """A snapshot of one entry: prefix, hit counter, targets by priority (highest first)."""

    prefix: ServiceID
    hits: int  # resolutions this entry served
    targets: tuple[TargetInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "service": self.prefix.value.hex(),
            "prefix_bits": self.prefix.prefix_bits,
            "hits": self.hits,
            "targets": [target.to_dict() for target in self.targets],
        }


# -- internal mutable state ------------------------------------------------------------------


class _TargetState:
    __slots__ = ("bytes", "destination", "kind", "last_used", "packets", "priority", "weight")

    def __init__(self, target: Target) -> None:
        self.kind = target.kind
        self.destination = target.destination
        self.weight = target.weight
        self.priority = target.priority
        self.packets = 0
        self.bytes = 0
        self.last_used: float | None = None

    @property
    def key(self) -> TargetKey:
        return TargetKey(self.kind, self.destination)

    def snapshot(self) -> Target:
        return Target(self.kind, self.destination, self.weight, self.priority)

    def info(self) -> TargetInfo:
        return TargetInfo(self.snapshot(), self.packets, self.bytes, self.last_used)

    def count(self, packet_bytes: int, now: float | None) -> None:
        self.packets += 1
        self.bytes += packet_bytes
        if now is not None:
            self.last_used = now


class _PrioritySet:
    """Targets of one priority, in insertion order, with cumulative weights for the draw."""

    __slots__ = ("cumulative", "priority", "targets", "total")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.targets: list[_TargetState] = []
        self.cumulative: list[int] = []
        self.total = 0

    def reweigh(self) -> None:
        running = 0
        cumulative = []
        for target in self.targets:
            running += target.weight
            cumulative.append(running)
        self.cumulative = cumulative
        self.total = running

    def usable(self, exclude: Collection[Hashable]) -> list[_TargetState]:
        if not exclude:
            return self.targets
        return [t for t in self.targets if t.destination is None or t.destination not in exclude]

    def choose(self, rng: random.Random, exclude: Collection[Hashable]) -> _TargetState | None:
        if not exclude:
            # Fast path: precomputed cumulative weights, one draw and a bisection.
            return self.targets[bisect_right(self.cumulative, rng.randrange(self.total))]
        usable = self.usable(exclude)
        if not usable:
            return None
        if len(usable) == len(self.targets):
            return self.targets[bisect_right(self.cumulative, rng.randrange(self.total))]
        draw = rng.randrange(sum(t.weight for t in usable))
        for target in usable:
            draw -= target.weight
            if draw < 0:
                return target
        raise AssertionError("weighted draw ran past the last target")  # pragma: no cover


class _Entry:
    __slots__ = ("hits", "prefix", "sets", "targets")

    def __init__(self, prefix: ServiceID) -> None:
        self.prefix = prefix
        self.targets: dict[TargetKey, _TargetState] = {}
        self.sets: list[_PrioritySet] = []  # priority descending, never an empty set
        self.hits = 0

    def attach(self, state: _TargetState) -> None:
        for index, priority_set in enumerate(self.sets):
            if priority_set.priority == state.priority:
                break
            if priority_set.priority < state.priority:
                priority_set = _PrioritySet(state.priority)
                self.sets.insert(index, priority_set)
                break
        else:
            priority_set = _PrioritySet(state.priority)
            self.sets.append(priority_set)
        priority_set.targets.append(state)
        priority_set.reweigh()

    def detach(self, state: _TargetState) -> None:
        for index, priority_set in enumerate(self.sets):
            if priority_set.priority == state.priority:
                priority_set.targets.remove(state)
                if priority_set.targets:
                    priority_set.reweigh()
                else:
                    del self.sets[index]
                return
        raise AssertionError("target not in its priority set")  # pragma: no cover

    def info(self) -> EntryInfo:
        ordered = tuple(t.info() for s in self.sets for t in s.targets)
        return EntryInfo(self.prefix, self.hits, ordered)


class _Node:
    """A trie node: the first `bits` bits of a serviceID as the integer `key`.

    Nodes without an entry exist only where two stored prefixes branch, so they always have two
    children (path compression).
    """

    __slots__ = ("bits", "children", "entry", "key")

    def __init__(self, bits: int, key: int, entry: _Entry | None = None) -> None:
        self.bits = bits
        self.key = key
        self.entry = entry
        self.children: list[_Node | None] = [None, None]


def _as_int(service: ServiceID) -> int:
    return int.from_bytes(service.value, "big")


def _key_of(service: ServiceID) -> int:
    """The significant bits of `service` as an integer of `prefix_bits` bits."""
    return _as_int(service) >> (SERVICE_ID_BITS - service.prefix_bits)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ServiceTable:
    """Longest-prefix-match service table with priority sets and weighted anycast."""

    def __init__(self) -> None:
        self._root = _Node(0, 0)
        self._count = 0
        self.resolutions = 0  # lookups that found a target
        self.misses = 0  # lookups that found none

    # -- installing and removing rules -----------------------------------------------------

    def add(self, service: ServiceID, target: Target) -> None:
        """Install `target` on the entry for exactly `service` (creating the entry).

        Raises `ServiceTableError` for an invalid target or one whose key is already there.
        """
        self._validate(service, target)
        entry = self._entry_for(service)
        if entry is not None and target.key in entry.targets:
            raise ServiceTableError(
                f"{service}: duplicate target {_describe(target.key)} (modify or remove it first)"
            )
        if entry is None:
            entry = self._insert(service)
        state = _TargetState(target)
        entry.targets[target.key] = state
        entry.attach(state)

    def modify(
        self,
        service: ServiceID,
        target_key: TargetKey,
        *,
        weight: int | None = None,
        priority: int | None = None,
    ) -> TargetInfo:
        """Change weight and/or priority of one target; what is not given is kept."""
        entry, state = self._require(service, target_key)
        current = state.snapshot()
        updated = Target(
            current.kind,
            current.destination,
            current.weight if weight is None else weight,
            current.priority if priority is None else priority,
        )
        self._validate(service, updated)
        entry.detach(state)
        state.weight = updated.weight
        state.priority = updated.priority
        entry.attach(state)
        return state.info()

    def replace(self, service: ServiceID, old_key: TargetKey, new_target: Target) -> TargetInfo:
        """Swap one target for another in place, in one step, keeping its counters.

        Used when an instance moves to a new address: no moment exists where neither the old
        nor the new target is installed. Raises if `old_key` is absent or the new key exists.
        """
        entry, state = self._require(service, old_key)
        self._validate(service, new_target)
        if new_target.key != old_key and new_target.key in entry.targets:
            raise ServiceTableError(
                f"{service}: duplicate target {_describe(new_target.key)} (cannot replace "
                f"{_describe(old_key)} with it)"
            )
        entry.detach(state)
        del entry.targets[old_key]
        state.kind = new_target.kind
        state.destination = new_target.destination
        state.weight = new_target.weight
        state.priority = new_target.priority
        entry.targets[new_target.key] = state
        entry.attach(state)
        return state.info()

    def remove(self, service: ServiceID, target_key: TargetKey) -> TargetInfo:
        """Remove one target of any kind; the entry goes when its last target does.

        Returns the removed target with its final counters.
        """
        entry, state = self._require(service, target_key)
        entry.detach(state)
        del entry.targets[target_key]
        if not entry.targets:
            self._delete(service)
        return state.info()

    def remove_entry(self, service: ServiceID) -> EntryInfo:
        """Remove the entry for exactly `service` with all its targets; returns its final state."""
        entry = self._entry_for(service)
        if entry is None:
            raise ServiceTableError(f"{service}: no service-table entry for this prefix")
        self._delete(service)
        return entry.info()

    # -- queries ----------------------------------------------------------------------------

    def get(self, service: ServiceID) -> EntryInfo | None:
        """The entry for exactly this prefix (not a longest-prefix match), or None."""
        entry = self._entry_for(service)
        return None if entry is None else entry.info()

    def get_target(self, service: ServiceID, target_key: TargetKey) -> TargetInfo | None:
        entry = self._entry_for(service)
        if entry is None:
            return None
        state = entry.targets.get(target_key)
        return None if state is None else state.info()

    def entries(self) -> list[EntryInfo]:
        """Every entry in a stable order: bit-string order of the prefixes, shorter first."""
        return [node.entry.info() for node in self._walk() if node.entry is not None]

    def __len__(self) -> int:
        return self._count

    def __contains__(self, service: object) -> bool:
        return isinstance(service, ServiceID) and self._entry_for(service) is not None

    # -- resolution -------------------------------------------------------------------------

    def resolve(
        self,
        service: ServiceID,
        rng: random.Random,
        *,
        exclude: Collection[Hashable] = frozenset(),
        packet_bytes: int = 0,
        now: float | None = None,
    ) -> Resolution | None:
        """Choose one target for `service` by weighted anycast, or None if nothing is usable.

        `exclude` holds destinations (FORWARD addresses, DEMUX listener keys) to skip. The
        chosen target's packet/byte counters and the entry's hit counter are incremented;
        `last_used` is stamped when `now` is given.
        """
        for entry in self._matches(service):
            for priority_set in entry.sets:
                state = priority_set.choose(rng, exclude)
                if state is not None:
                    state.count(packet_bytes, now)
                    entry.hits += 1
                    self.resolutions += 1
                    return Resolution(entry.prefix, state.kind, state.snapshot())
        self.misses += 1
        return None

    def resolve_all(
        self,
        service: ServiceID,
        *,
        exclude: Collection[Hashable] = frozenset(),
        packet_bytes: int = 0,
        now: float | None = None,
    ) -> tuple[Resolution, ...]:
        """ALL mode: every usable target of the set `resolve` would draw from (may be empty)."""
        for entry in self._matches(service):
            for priority_set in entry.sets:
                usable = priority_set.usable(exclude)
                if usable:
                    for state in usable:
                        state.count(packet_bytes, now)
                    entry.hits += 1
                    self.resolutions += 1
                    return tuple(Resolution(entry.prefix, s.kind, s.snapshot()) for s in usable)
        self.misses += 1
        return ()

    def _matches(self, service: ServiceID) -> list[_Entry]:
        """Entries whose prefix contains `service`, longest prefix first.

        Only prefixes no longer than the looked-up one match: `service` itself may be a
        prefix, and its bits past `prefix_bits` are unknown, not zero.
        """
        value = _as_int(service)
        limit = service.prefix_bits
        found: list[_Entry] = []
        node: _Node | None = self._root
        while node is not None and node.bits <= limit:
            if value >> (SERVICE_ID_BITS - node.bits) != node.key:
                break
            if node.entry is not None:
                found.append(node.entry)
            if node.bits == SERVICE_ID_BITS:
                break
            node = node.children[(value >> (SERVICE_ID_BITS - 1 - node.bits)) & 1]
        found.reverse()
        return found

    # -- trie maintenance -------------------------------------------------------------------

    def _entry_for(self, service: ServiceID) -> _Entry | None:
        bits, key = service.prefix_bits, _key_of(service)
        node: _Node | None = self._root
        while node is not None and node.bits <= bits:
            if key >> (bits - node.bits) != node.key:
                return None
            if node.bits == bits:
                return node.entry
            node = node.children[(key >> (bits - node.bits - 1)) & 1]
        return None

    def _insert(self, service: ServiceID) -> _Entry:
        """Create the (absent) entry for `service`, adding or splitting trie nodes."""
        bits, key = service.prefix_bits, _key_of(service)
        entry = _Entry(service)
        self._count += 1
        node = self._root
        while True:
            # Invariant: `node` is a prefix of the new key.
            if node.bits == bits:
                node.entry = entry
                return entry
            branch = (key >> (bits - node.bits - 1)) & 1
            child = node.children[branch]
            if child is None:
                node.children[branch] = _Node(bits, key, entry)
                return entry
            shared = min(child.bits, bits)
            child_head = child.key >> (child.bits - shared)
            new_head = key >> (bits - shared)
            if child_head == new_head:
                if child.bits <= bits:
                    node = child
                    continue
                # The new prefix lies between `node` and `child`.
                new = _Node(bits, key, entry)
                new.children[(child.key >> (child.bits - bits - 1)) & 1] = child
                node.children[branch] = new
                return entry
            # The two diverge after `common` bits: add a branching node there.
            common = shared - (child_head ^ new_head).bit_length()
            fork = _Node(common, key >> (bits - common))
            new = _Node(bits, key, entry)
            new_branch = (key >> (bits - common - 1)) & 1
            fork.children[new_branch] = new
            fork.children[1 - new_branch] = child
            node.children[branch] = fork
            return entry

    def _delete(self, service: ServiceID) -> None:
        """Drop the entry for `service` and the trie nodes that no longer carry anything."""
        bits, key = service.prefix_bits, _key_of(service)
        path: list[_Node] = []
        node: _Node | None = self._root
        while node is not None:
            path.append(node)
            if node.bits == bits:
                break
            node = node.children[(key >> (bits - node.bits - 1)) & 1]
        target = path[-1]
        assert target.bits == bits and target.entry is not None
        target.entry = None
        self._count -= 1
        # Splice out nodes that now carry no entry and branch no more (never the root).
        for depth in range(len(path) - 1, 0, -1):
            current = path[depth]
            if current.entry is not None:
                return
            kids = [c for c in current.children if c is not None]
            if len(kids) == 2:
                return
            parent = path[depth - 1]
            slot = 0 if parent.children[0] is current else 1
            parent.children[slot] = kids[0] if kids else None

    def _walk(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            for child in (node.children[1], node.children[0]):
                if child is not None:
                    stack.append(child)

    def _require(self, service: ServiceID, target_key: TargetKey) -> tuple[_Entry, _TargetState]:
        entry = self._entry_for(service)
        if entry is None:
            raise ServiceTableError(f"{service}: no service-table entry for this prefix")
        state = entry.targets.get(target_key)
        if state is None:
            known = ", ".join(_describe(k) for k in entry.targets) or "none"
            raise ServiceTableError(
                f"{service}: no target {_describe(target_key)} (targets: {known})"
            )
        return entry, state

    @staticmethod
    def _validate(service: ServiceID, target: Target) -> None:
        if not isinstance(service, ServiceID):
            raise ServiceTableError(f"service must be a ServiceID, got {service!r}")
        if not isinstance(target.kind, RuleKind):
            raise ServiceTableError(
                f"{service}: unknown rule kind {target.kind!r} "
                f"(one of {', '.join(k.value for k in RuleKind)})"
            )
        if target.kind is RuleKind.FORWARD and not isinstance(
            target.destination, IPv4Address | IPv6Address
        ):
            raise ServiceTableError(
                f"{service}: a FORWARD target needs an IP address, got {target.destination!r}"
            )
        if target.kind is RuleKind.DEMUX:
            if target.destination is None:
                raise ServiceTableError(f"{service}: a DEMUX target needs a listener key")
            try:
                hash(target.destination)
            except TypeError:
                raise ServiceTableError(
                    f"{service}: DEMUX listener key must be hashable, got {target.destination!r}"
                ) from None
        if target.kind not in _KINDS_WITH_DESTINATION and target.destination is not None:
            raise ServiceTableError(
                f"{service}: a {target.kind.name} target has no destination, "
                f"got {target.destination!r}"
            )
        if not _is_int(target.weight) or target.weight < 1:
            raise ServiceTableError(
                f"{service}: weight must be an integer >= 1, got {target.weight!r} "
                f"for {_describe(target.key)}"
            )
        if not _is_int(target.priority):
            raise ServiceTableError(
                f"{service}: priority must be an integer, got {target.priority!r} "
                f"for {_describe(target.key)}"
            )


def _describe(key: TargetKey) -> str:
    kind = key.kind.name if isinstance(key.kind, RuleKind) else repr(key.kind)
    return kind if key.destination is None else f"{kind} {key.destination}"
