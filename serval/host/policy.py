"""Interface policy on multi-homed hosts: which address a flow uses, and routing that obeys it.

Theory of operation
-------------------
servald's YAML may rank the host's interfaces (section `interfaces`, parsed by
`parse_interfaces`):

    interfaces:
      - name: eth0        # an interface name or an fnmatch pattern ("wl*")
        preference: 100   # higher is better
        cost: 1           # lower is better among equal preferences (e.g. metered links)
      - name: wwan*
        preference: 10
        cost: 5
    migration:
      automatic: true     # move flows off an address that disappears
      policy: true        # move flows back when a preferred interface returns
      hold_down_s: 2.0    # a returning interface must stay up this long first
      source_routing: true

`InterfaceSelector` turns that into decisions over a `netmon.NetSnapshot`:

* `choose(snapshot, peer)`: the address a new flow (or a flow that must leave its address)
  should use towards `peer`: usable (interface up, global scope, not tentative), of the
  peer's family, with a route to the peer *from that source*, best ranked first. Unlisted
  interfaces rank below listed ones (preference 0, cost 0), then by name and address, so the
  choice is deterministic.
* `preferred_over(snapshot, current, peer)`: a strictly better address than `current`, if
  one exists (the policy trigger).

`SourceRouting` makes the choice real on a weak-host-model kernel: without it, a packet from
a2 towards a peer leaves through whichever interface the main table picks for the peer, not
a2's (tcp-repair-migration.md P9). For every interface with a usable address it keeps a table
(TABLE_BASE + ifindex) holding the main table's routes through that interface, and one rule
per address, `from ADDRESS lookup TABLE`. `sync(snapshot)` converges rules and tables to the
snapshot, touching only what it owns (its priority and table range), so it can run after
every change and at start after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serval.core.wire import Address
from serval.errors import ConfigError

if TYPE_CHECKING:
    from serval.host.netmon import AddressInfo, NetSnapshot

__all__ = [
    "DEFAULT_HOLD_DOWN_S",
    "RULE_PRIORITY",
    "TABLE_BASE",
    "InterfacePreference",
    "InterfaceSelector",
    "MigrationPolicy",
    "SourceRouting",
    "parse_interfaces",
    "parse_migration_policy",
    "reaches",
]

DEFAULT_HOLD_DOWN_S = 2.0
MAX_HOLD_DOWN_S = 3600.0
PREFERENCE_RANGE = (-1_000_000, 1_000_000)
COST_RANGE = (0.0, 1e9)
# Our rules sit just above the main table's (32766) so they win for the addresses they name
# and leave everything else alone; our tables live in a private range.
RULE_PRIORITY = 1000
TABLE_BASE = 0x5E70000  # + ifindex
TABLE_SPAN = 0x10000
PROBE_PORT = 9  # connecting a UDP socket sends nothing: a route lookup only


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class InterfacePreference:
    """One ranked interface (or pattern) from the YAML."""

    name: str  # interface name or fnmatch pattern
    preference: int = 0  # higher is better
    cost: float = 0.0  # lower is better

    def matches(self, ifname: str) -> bool:
        return fnmatch.fnmatchcase(ifname, self.name)


@dataclass(frozen=True)
class MigrationPolicy:
    """The `interfaces` and `migration` sections of servald's YAML."""

    interfaces: tuple[InterfacePreference, ...] = ()
    automatic: bool = True
    policy: bool = True
    hold_down_s: float = DEFAULT_HOLD_DOWN_S
    source_routing: bool = False


def _where(source: str, path: str) -> str:
    return f"{source}: {path}"


def parse_interfaces(raw: object, source: str = "<config>",
                     path: str = "interfaces") -> tuple[InterfacePreference, ...]:
    """The `interfaces` list; ConfigError naming the file and entry on anything wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{_where(source, path)}: expected a list of interfaces")
    result: list[InterfacePreference] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        here = f"{path}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{_where(source, here)}: expected a mapping with 'name'")
        unknown = set(entry) - {"name", "preference", "cost"}
        if unknown:
            raise ConfigError(f"{_where(source, here)}: unknown key(s) "
                              f"{', '.join(sorted(map(str, unknown)))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ConfigError(f"{_where(source, here)}.name: expected an interface name or "
                              "pattern (1-64 characters)")
        if name in seen:
            raise ConfigError(f"{_where(source, here)}.name: {name!r} listed twice")
        seen.add(name)
        preference = entry.get("preference", 0)
        if isinstance(preference, bool) or not isinstance(preference, int) or \
                not PREFERENCE_RANGE[0] <= preference <= PREFERENCE_RANGE[1]:
            raise ConfigError(f"{_where(source, here)}.preference: expected an integer in "
                              f"{PREFERENCE_RANGE[0]}..{PREFERENCE_RANGE[1]}")
        cost = entry.get("cost", 0)
        if isinstance(cost, bool) or not isinstance(cost, int | float) or \
                not COST_RANGE[0] <= float(cost) <= COST_RANGE[1]:
            raise ConfigError(f"{_where(source, here)}.cost: expected a number in "
                              f"{COST_RANGE[0]:g}..{COST_RANGE[1]:g}")
        result.append(InterfacePreference(name, preference, float(cost)))
    return tuple(result)


def parse_migration_policy(interfaces: object, migration: object,
                           source: str = "<config>") -> MigrationPolicy:
    """Both sections together (either may be absent)."""
    ranked = parse_interfaces(interfaces, source)
    if migration is None:
        return MigrationPolicy(interfaces=ranked)
    if not isinstance(migration, Mapping):
        raise ConfigError(f"{_where(source, 'migration')}: expected a mapping")
    known = {"automatic", "policy", "hold_down_s", "source_routing"}
    unknown = set(migration) - known
    if unknown:
        raise ConfigError(f"{_where(source, 'migration')}: unknown key(s) "
                          f"{', '.join(sorted(map(str, unknown)))}")
    flags: dict[str, bool] = {}
    for key in ("automatic", "policy", "source_routing"):
        value = migration.get(key, MigrationPolicy.__dataclass_fields__[key].default)
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, 'migration.' + key)}: expected true or false")
        flags[key] = value
    hold = migration.get("hold_down_s", DEFAULT_HOLD_DOWN_S)
    if isinstance(hold, bool) or not isinstance(hold, int | float) or \
            not 0 <= float(hold) <= MAX_HOLD_DOWN_S:
        raise ConfigError(f"{_where(source, 'migration.hold_down_s')}: expected seconds in "
                          f"0..{MAX_HOLD_DOWN_S:g}")
    return MigrationPolicy(interfaces=ranked, hold_down_s=float(hold), **flags)


# --------------------------------------------------------------------------------------------
# choosing addresses


def reaches(source: Address, destination: Address) -> bool:
    """Whether the kernel has a route from `source` to `destination` (policy rules included).

    A UDP socket bound to `source` and connected to `destination` performs exactly the route
    lookup a packet from there would; nothing is sent. Runs in the calling thread's netns.
    """
    if source.version != destination.version:
        return False
    family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(source), 0))
            probe.connect((str(destination), PROBE_PORT))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class _Rank:
    listed: bool
    preference: int
    cost: float


class InterfaceSelector:
    """Ranks the host's addresses by the configured interface preference and cost."""

    def __init__(self, policy: MigrationPolicy) -> None:
        self.policy = policy

    def _rank(self, ifname: str) -> _Rank:
        for entry in self.policy.interfaces:  # first match wins, in YAML order
            if entry.matches(ifname):
                return _Rank(True, entry.preference, entry.cost)
        return _Rank(False, 0, 0.0)

    def sort_key(self, info: AddressInfo) -> tuple[int, int, float, str, int, str]:
        rank = self._rank(info.ifname)
        # Best first: listed, high preference, low cost; then stable tie-breakers.
        return (0 if rank.listed else 1, -rank.preference, rank.cost, info.ifname,
                info.address.version, str(info.address))

    def rank(self, candidates: Iterable[AddressInfo]) -> list[AddressInfo]:
        return sorted(candidates, key=self.sort_key)

    def better(self, candidate: AddressInfo, current: AddressInfo) -> bool:
        """Strictly better by the configuration (names and addresses do not count)."""
        return self.sort_key(candidate)[:3] < self.sort_key(current)[:3]

    def candidates(self, snapshot: NetSnapshot, peer: Address,
                   exclude: Iterable[Address] = ()) -> list[AddressInfo]:
        excluded = set(exclude)
        usable = [info for info in snapshot.usable_addresses()
                  if info.address.version == peer.version and info.address not in excluded]
        return [info for info in self.rank(usable) if reaches(info.address, peer)]

    def choose(self, snapshot: NetSnapshot, peer: Address,
               exclude: Iterable[Address] = ()) -> AddressInfo | None:
        """The best usable address towards `peer`, or None."""
        found = self.candidates(snapshot, peer, exclude)
        return found[0] if found else None

    def preferred_over(self, snapshot: NetSnapshot, current: Address,
                       peer: Address) -> AddressInfo | None:
        """A usable address strictly better than `current` towards `peer`, or None."""
        info = snapshot.addresses.get(current)
        best = self.choose(snapshot, peer, exclude=(current,))
        if best is None:
            return None
        if info is None or not snapshot.is_usable(info):
            return best
        return best if self.better(best, info) else None


# --------------------------------------------------------------------------------------------
# source-based routing


@dataclass
class _Owned:
    rules: set[tuple[int, str, int]] = field(default_factory=set)  # (family, address, table)
    tables: set[int] = field(default_factory=set)


class SourceRouting:
    """Per-interface tables and `from ADDRESS` rules kept in line with the snapshot.

    Needs CAP_NET_ADMIN. Uses pyroute2's asyncio API in the calling loop's namespace.
    """

    def __init__(self, *, priority: int = RULE_PRIORITY, table_base: int = TABLE_BASE) -> None:
        self.priority = priority
        self.table_base = table_base
        self._owned = _Owned()
        self.errors = 0

    def table_for(self, ifindex: int) -> int:
        return self.table_base + ifindex % TABLE_SPAN

    async def sync(self, snapshot: NetSnapshot) -> None:
        """Converge rules and tables to the usable addresses of `snapshot`."""
        from pyroute2 import AsyncIPRoute

        wanted_rules: set[tuple[int, str, int]] = set()
        by_interface: dict[int, list[AddressInfo]] = {}
        for info in snapshot.usable_addresses():
            family = int(socket.AF_INET6 if info.address.version == 6 else socket.AF_INET)
            wanted_rules.add((family, str(info.address), self.table_for(info.ifindex)))
            by_interface.setdefault(info.ifindex, []).append(info)
        async with AsyncIPRoute() as ipr:
            for ifindex in by_interface:
                await self._sync_table(ipr, ifindex)
            for rule_family, address, table in wanted_rules - self._owned.rules:
                await self._rule(ipr, "add", rule_family, address, table)
            for rule_family, address, table in self._owned.rules - wanted_rules:
                await self._rule(ipr, "del", rule_family, address, table)
            for table in self._owned.tables - {self.table_for(i) for i in by_interface}:
                await self._flush_table(ipr, table)
        self._owned.rules = wanted_rules
        self._owned.tables = {self.table_for(i) for i in by_interface}

    async def close(self) -> None:
        """Remove every rule and table this object installed."""
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            for family, address, table in self._owned.rules:
                await self._rule(ipr, "del", family, address, table)
            for table in self._owned.tables:
                await self._flush_table(ipr, table)
        self._owned = _Owned()

    async def _rule(self, ipr: Any, command: str, family: int, address: str,
                    table: int) -> None:
        bits = 128 if family == socket.AF_INET6 else 32
        try:
            await ipr.rule(command, family=family, src=address, src_len=bits, table=table,
                           priority=self.priority)
        except Exception as exc:  # NetlinkError: EEXIST on add, ENOENT on del are fine
            if getattr(exc, "code", None) not in (errno.EEXIST, errno.ENOENT):
                self.errors += 1

    async def _routes(self, ipr: Any, table: int, oif: int | None = None) -> list[Any]:
        found: list[Any] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(Exception):
                async for route in await ipr.route("dump", family=family, table=table):
                    if route.get("table") != table and route.get("RTA_TABLE") != table:
                        continue
                    if oif is not None and route.get("RTA_OIF") != oif:
                        continue
                    found.append(route)
        return found

    async def _sync_table(self, ipr: Any, ifindex: int) -> None:
        """The interface's table := the main table's routes through that interface."""
        table = self.table_for(ifindex)
        wanted = {_route_key(r): r for r in await self._routes(ipr, 254, ifindex)
                  if _copyable(r)}
        present = {_route_key(r): r for r in await self._routes(ipr, table)}
        for key in present.keys() - wanted.keys():
            await self._route(ipr, "del", present[key], table)
        for key in wanted.keys() - present.keys():
            await self._route(ipr, "add", wanted[key], table)

    async def _flush_table(self, ipr: Any, table: int) -> None:
        for route in await self._routes(ipr, table):
            await self._route(ipr, "del", route, table)

    async def _route(self, ipr: Any, command: str, route: Any, table: int) -> None:
        spec: dict[str, Any] = {"family": route["family"], "table": table,
                                "dst_len": route["dst_len"]}
        destination = route.get("RTA_DST")
        if destination is not None:
            spec["dst"] = destination
        for attribute, name in (("RTA_GATEWAY", "gateway"), ("RTA_OIF", "oif"),
                                ("RTA_PRIORITY", "priority"), ("RTA_PREFSRC", "prefsrc")):
            value = route.get(attribute)
            if value is not None:
                spec[name] = value
        if command == "add":
            spec["scope"] = route.get("scope", 0)
            spec["proto"] = route.get("proto", 3)
        try:
            await ipr.route(command, **spec)
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.EEXIST, errno.ESRCH, errno.ENOENT):
                self.errors += 1


_RTN_UNICAST = 1


def _copyable(route: Any) -> bool:
    """Unicast routes only: local/broadcast/multicast entries live in other tables anyway."""
    return route.get("type", _RTN_UNICAST) == _RTN_UNICAST and route.get("RTA_OIF") is not None


def _route_key(route: Any) -> tuple[object, ...]:
    return (route["family"], route.get("RTA_DST"), route["dst_len"], route.get("RTA_GATEWAY"),
            route.get("RTA_OIF"), route.get("RTA_PRIORITY"))

