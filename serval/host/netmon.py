"""Address and link monitoring (netlink, pyroute2 asyncio) and the migration triggers.

Theory of operation
-------------------
`NetMonitor` keeps a `NetSnapshot` of the host's links and addresses: a full dump at start,
then RTM_NEWLINK / RTM_DELLINK / RTM_NEWADDR / RTM_DELADDR notifications applied as they
come. Netlink multicast is lossy: when the socket's receive buffer overflows the kernel
drops notifications and the next read fails with ENOBUFS. Then, and every
RESYNC_INTERVAL_S as a safety net, the monitor dumps everything again and diffs the result
against what it knew, so its consumers see the same `NetChange`s either way (a resync is
never a reason to miss a removed address). Changes are delivered in batches, one per netlink
read, to the `on_change` callback.

An address is *usable* when its interface is up and running, its scope is global, it is not
tentative or failed duplicate address detection, and it is not loopback, link-local or
multicast (`NetSnapshot.is_usable`).

`MigrationTriggers` turns changes into migrations (serval-protocol.md section 6.1, here in
user space and driven by the configured policy rather than by kernel routing alone):

* **automatic**: a flow whose local address is no longer usable (deleted, or its interface
  went down) moves at once to the best usable address that still has a route to the peer
  (`policy.InterfaceSelector.choose`); if there is none, it stays and is retried on the next
  change;
* **policy**: when an interface ranked above the one a flow uses has been usable for
  `hold_down_s` (so a flapping link does not drag flows back and forth), flows move to it.

Before deciding, the triggers bring source-based routing (`policy.SourceRouting`) in line
with the new snapshot, so the reachability check and the moved flow both use the new
address's own interface. One evaluation runs at a time; changes arriving meanwhile schedule
exactly one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog

from serval.core.wire import Address
from serval.host.migration import MigrationEngine, MigrationRecord, Outcome
from serval.host.policy import InterfaceSelector, MigrationPolicy, SourceRouting

__all__ = [
    "RESYNC_INTERVAL_S",
    "AddressInfo",
    "ChangeKind",
    "LinkInfo",
    "MigrationTriggers",
    "NetChange",
    "NetMonitor",
    "NetSnapshot",
]

RESYNC_INTERVAL_S = 60.0  # full dump even without ENOBUFS: netlink may drop silently
REOPEN_BACKOFF_S = (0.1, 5.0)  # after an unexpected netlink error: first and longest wait
MAX_CONCURRENT_MIGRATIONS = 32
RETRY_UNMOVED_S = 1.0  # a flow left on an unusable address is looked at again this often
MAX_RETRY_ROUNDS = 60  # ... for at most this many rounds without a change

_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_RT_SCOPE_UNIVERSE = 0


# --------------------------------------------------------------------------------------------
# the snapshot


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    flags: int
    since: float  # monotonic time it was first seen in its current up/down state

    @property
    def up(self) -> bool:
        return bool(self.flags & _IFF_UP) and bool(self.flags & _IFF_RUNNING)


@dataclass(frozen=True)
class AddressInfo:
    address: Address
    prefixlen: int
    ifindex: int
    ifname: str
    scope: int
    flags: int
    since: float  # monotonic time it was first seen (or its interface came up)


class ChangeKind(enum.Enum):
    ADDRESS_ADDED = "address_added"
    ADDRESS_REMOVED = "address_removed"
    LINK_UP = "link_up"
    LINK_DOWN = "link_down"


@dataclass(frozen=True)
class NetChange:
    kind: ChangeKind
    ifindex: int
    ifname: str
    address: Address | None = None


@dataclass
class NetSnapshot:
    links: dict[int, LinkInfo]
    addresses: dict[Address, AddressInfo]

    def is_usable(self, info: AddressInfo) -> bool:
        link = self.links.get(info.ifindex)
        address = info.address
        return (link is not None and link.up and info.scope == _RT_SCOPE_UNIVERSE
                and not info.flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED)
                and not address.is_loopback and not address.is_link_local
                and not address.is_multicast and not address.is_unspecified)

    def usable_addresses(self) -> list[AddressInfo]:
        return [info for info in self.addresses.values() if self.is_usable(info)]

    def usable(self, address: Address) -> bool:
        info = self.addresses.get(address)
        return info is not None and self.is_usable(info)

    def usable_since(self, info: AddressInfo) -> float:
        """Since when the address has been usable (the later of it and its link coming up)."""
        link = self.links.get(info.ifindex)
        return max(info.since, link.since if link is not None else info.since)

    def copy(self) -> NetSnapshot:
        return NetSnapshot(dict(self.links), dict(self.addresses))


def diff(old: NetSnapshot, new: NetSnapshot) -> list[NetChange]:
    """What happened between two snapshots, as the notifications would have said it."""
    changes: list[NetChange] = []
    for index, link in new.links.items():
        before = old.links.get(index)
        if (before is None or not before.up) and link.up:
            changes.append(NetChange(ChangeKind.LINK_UP, index, link.name))
        elif before is not None and before.up and not link.up:
            changes.append(NetChange(ChangeKind.LINK_DOWN, index, link.name))
    for index, link in old.links.items():
        if index not in new.links and link.up:
            changes.append(NetChange(ChangeKind.LINK_DOWN, index, link.name))
    for address, info in old.addresses.items():
        if address not in new.addresses or new.addresses[address].ifindex != info.ifindex:
            changes.append(NetChange(ChangeKind.ADDRESS_REMOVED, info.ifindex, info.ifname,
                                     address))
    for address, info in new.addresses.items():
        if address not in old.addresses or old.addresses[address].ifindex != info.ifindex:
            changes.append(NetChange(ChangeKind.ADDRESS_ADDED, info.ifindex, info.ifname,
                                     address))
    return changes


# --------------------------------------------------------------------------------------------
# the monitor


def _groups() -> int:
    from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

    return int(RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)


class NetMonitor:
    """The host's links and addresses, kept current from netlink (see module docstring)."""

    def __init__(
        self,
        on_change: Callable[[Sequence[NetChange], NetSnapshot], None],
        *,
        rcvbuf_bytes: int | None = None,
        resync_interval_s: float = RESYNC_INTERVAL_S,
        log: Any = None,
    ) -> None:
        self._on_change = on_change
        self._rcvbuf_bytes = rcvbuf_bytes
        self._resync_interval_s = resync_interval_s
        self._log = log if log is not None else structlog.get_logger("servald").bind(
            component="netmon")
        self.snapshot = NetSnapshot({}, {})
        self.counters: Counter[str] = Counter()
        self._ipr: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._resync_lock = asyncio.Lock()

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, then dump (in that order: nothing can fall between the two)."""
        await self._open()
        await self.resync(notify=False)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._close_socket()

    async def _open(self) -> None:
        from pyroute2 import AsyncIPRoute

        self._ipr = AsyncIPRoute()
        await self._ipr.bind(groups=_groups())
        if self._rcvbuf_bytes is not None:
            self._ipr.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf_bytes)

    def _close_socket(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff = REOPEN_BACKOFF_S[0]
        next_resync = time.monotonic() + self._resync_interval_s
        while not self._closed:
            try:
                timeout = max(0.0, next_resync - time.monotonic())
                async with asyncio.timeout(timeout):
                    batch = [msg async for msg in self._ipr.get()]
                self._apply_batch(batch)
                backoff = REOPEN_BACKOFF_S[0]
            except TimeoutError:
                self.counters["periodic_resyncs"] += 1
                await self.resync()
                next_resync = time.monotonic() + self._resync_interval_s
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Notifications were dropped: what we know may be wrong in any way.
                    self.counters["overflows"] += 1
                    self._log.info("netlink_overflow_resync")
                    await self.resync()
                    next_resync = time.monotonic() + self._resync_interval_s
                    continue
                await self._recover(exc, backoff)
                backoff = min(backoff * 2, REOPEN_BACKOFF_S[1])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a netlink error message, a parse error
                await self._recover(exc, backoff)
                backoff = min(backoff * 2, REOPEN_BACKOFF_S[1])

    async def _recover(self, exc: BaseException, backoff: float) -> None:
        self.counters["errors"] += 1
        self._log.warning("netlink_error", error=repr(exc), retry_in_s=backoff)
        await asyncio.sleep(backoff)
        if self._closed:
            return
        self._close_socket()
        await self._open()
        await self.resync()

    def _apply_batch(self, batch: list[Any]) -> None:
        changes: list[NetChange] = []
        now = time.monotonic()
        for message in batch:
            self.counters["messages"] += 1
            changes.extend(self._apply(message, now))
        if changes:
            self._notify(changes)

    def _apply(self, message: Any, now: float) -> list[NetChange]:
        event = message.get("event")
        snapshot = self.snapshot
        if event == "RTM_NEWLINK":
            link = _link_of(message, now)
            before = snapshot.links.get(link.index)
            if before is not None and before.up == link.up:
                link = replace(link, since=before.since)
            snapshot.links[link.index] = link
            renamed = [replace(info, ifname=link.name)
                       for info in snapshot.addresses.values()
                       if info.ifindex == link.index and info.ifname != link.name]
            for info in renamed:
                snapshot.addresses[info.address] = info
            if (before is None or not before.up) and link.up:
                return [NetChange(ChangeKind.LINK_UP, link.index, link.name)]
            if before is not None and before.up and not link.up:
                return [NetChange(ChangeKind.LINK_DOWN, link.index, link.name)]
            return []
        if event == "RTM_DELLINK":
            index = int(message.get("index", 0))
            gone = snapshot.links.pop(index, None)
            changes = []
            if gone is not None and gone.up:
                changes.append(NetChange(ChangeKind.LINK_DOWN, index, gone.name))
            for info in [i for i in snapshot.addresses.values() if i.ifindex == index]:
                del snapshot.addresses[info.address]
                changes.append(NetChange(ChangeKind.ADDRESS_REMOVED, index, info.ifname,
                                         info.address))
            return changes
        if event in ("RTM_NEWADDR", "RTM_DELADDR"):
            entry = _address_of(message, snapshot, now)
            if entry is None:
                return []
            if event == "RTM_NEWADDR":
                before_address = snapshot.addresses.get(entry.address)
                if before_address is not None and before_address.ifindex == entry.ifindex:
                    snapshot.addresses[entry.address] = replace(entry,
                                                                since=before_address.since)
                    return []  # a flags update (e.g. DAD finished): not a new address
                snapshot.addresses[entry.address] = entry
                return [NetChange(ChangeKind.ADDRESS_ADDED, entry.ifindex, entry.ifname,
                                  entry.address)]
            known = snapshot.addresses.get(entry.address)
            if known is None or known.ifindex != entry.ifindex:
                return []
            del snapshot.addresses[entry.address]
            return [NetChange(ChangeKind.ADDRESS_REMOVED, entry.ifindex, entry.ifname,
                              entry.address)]
        return []

    async def resync(self, *, notify: bool = True) -> list[NetChange]:
        """Dump links and addresses; deliver (and return) the difference to what we knew."""
        async with self._resync_lock:
            from pyroute2 import AsyncIPRoute

            now = time.monotonic()
            fresh = NetSnapshot({}, {})
            # A separate socket: the subscribed one may still hold stale notifications.
            async with AsyncIPRoute() as ipr:
                async for message in await ipr.get_links():
                    link = _link_of(message, now)
                    fresh.links[link.index] = link
                async for message in await ipr.get_addr():
                    info = _address_of(message, fresh, now)
                    if info is not None:
                        fresh.addresses[info.address] = info
            old = self.snapshot
            for index, link in fresh.links.items():  # keep the times of unchanged state
                before = old.links.get(index)
                if before is not None and before.up == link.up:
                    fresh.links[index] = replace(link, since=before.since)
            for address, info in fresh.addresses.items():
                before_address = old.addresses.get(address)
                if before_address is not None and before_address.ifindex == info.ifindex:
                    fresh.addresses[address] = replace(info, since=before_address.since)
            changes = diff(old, fresh)
            self.snapshot = fresh
            self.counters["resyncs"] += 1
            if notify and changes:
                self._notify(changes)
            return changes

    def _notify(self, changes: list[NetChange]) -> None:
        self.counters["changes"] += len(changes)
        try:
            self._on_change(changes, self.snapshot)
        except Exception as exc:  # a consumer's bug must not stop the monitor
            self.counters["consumer_errors"] += 1
            self._log.exception("netmon_consumer_error", error=repr(exc))


def _link_of(message: Any, now: float) -> LinkInfo:
    return LinkInfo(index=int(message.get("index", 0)),
                    name=str(message.get("IFLA_IFNAME") or ""),
                    flags=int(message.get("flags", 0)), since=now)


def _address_of(message: Any, snapshot: NetSnapshot, now: float) -> AddressInfo | None:
    # IFA_LOCAL is the local address; IFA_ADDRESS is the peer's on point-to-point links.
    text = message.get("IFA_LOCAL") or message.get("IFA_ADDRESS")
    if not text:
        return None
    try:
        address = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    index = int(message.get("index", 0))
    link = snapshot.links.get(index)
    flags = int(message.get("IFA_FLAGS") or message.get("flags", 0))
    return AddressInfo(address=address, prefixlen=int(message.get("prefixlen", 0)),
                       ifindex=index, ifname=link.name if link is not None else
                       str(message.get("IFA_LABEL") or ""), scope=int(message.get("scope", 0)),
                       flags=flags, since=now)


# --------------------------------------------------------------------------------------------
# the triggers


class MigrationTriggers:
    """Moves flows when addresses go away (automatic) or better interfaces return (policy)."""

    def __init__(
        self,
        engine: MigrationEngine,
        policy: MigrationPolicy,
        *,
        routing: SourceRouting | None = None,
        on_addresses_changed: Callable[[NetSnapshot], None] | None = None,
        log: Any = None,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.selector = InterfaceSelector(policy)
        self.routing = routing
        self._on_addresses_changed = on_addresses_changed
        self._log = log if log is not None else structlog.get_logger("servald").bind(
            component="migration_triggers")
        self.counters: Counter[str] = Counter()
        self.snapshot = NetSnapshot({}, {})
        self._dirty = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._retry_rounds = 0
        self.records: list[MigrationRecord] = []

    def start(self, snapshot: NetSnapshot) -> None:
        self.snapshot = snapshot.copy()
        self._worker = asyncio.get_running_loop().create_task(self._work())
        self._dirty.set()  # routing and any flow stranded before we started

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.routing is not None:
            with contextlib.suppress(Exception):
                await self.routing.close()

    # NetMonitor's on_change
    def on_change(self, changes: Sequence[NetChange], snapshot: NetSnapshot) -> None:
        self.snapshot = snapshot.copy()
        self.counters["change_batches"] += 1
        self._retry_rounds = 0
        loop = asyncio.get_running_loop()
        if self.policy.policy and any(c.kind in (ChangeKind.ADDRESS_ADDED, ChangeKind.LINK_UP)
                                      for c in changes):
            # Look again once the newcomer has been up for the hold-down time.
            self._timers = [t for t in self._timers if not t.cancelled()]
            self._timers.append(loop.call_later(self.policy.hold_down_s + 0.01,
                                                self._dirty.set))
        self._dirty.set()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                stranded = await self.evaluate()
            except Exception as exc:
                self.counters["errors"] += 1
                self._log.exception("migration_trigger_error", error=repr(exc))
                stranded = 0
            if stranded and self._retry_rounds < MAX_RETRY_ROUNDS:
                # Nowhere to go yet (no route, peer unreachable): look again shortly.
                self._retry_rounds += 1
                self._timers.append(loop.call_later(RETRY_UNMOVED_S, self._dirty.set))

    async def evaluate(self) -> int:
        """One pass: routing, then automatic and policy moves. Returns the flows stranded."""
        snapshot = self.snapshot
        if self.routing is not None:
            await self.routing.sync(snapshot)
        if self._on_addresses_changed is not None:
            self._on_addresses_changed(snapshot)
        moves: list[tuple[int, Address, str]] = []
        stranded = 0
        now = time.monotonic()
        for managed in self.engine.flows():
            if managed.busy or managed.closed or managed.local is None:
                continue
            current = ipaddress.ip_address(managed.local[0])
            peer = ipaddress.ip_address(managed.remote[0]) if managed.remote else \
                managed.flow.peer_address
            if peer is None:
                continue
            if not snapshot.usable(current):
                if not self.policy.automatic:
                    continue
                choice = self.selector.choose(snapshot, peer, exclude=(current,))
                if choice is None:
                    stranded += 1
                    continue
                moves.append((managed.flow_id, choice.address, "automatic"))
            elif self.policy.policy and self.policy.interfaces:
                better = self.selector.preferred_over(snapshot, current, peer)
                if better is not None and \
                        now - snapshot.usable_since(better) >= self.policy.hold_down_s:
                    moves.append((managed.flow_id, better.address, "policy"))
        if moves:
            await self._run(moves)
        return stranded

    async def _run(self, moves: list[tuple[int, Address, str]]) -> None:
        limit = asyncio.Semaphore(MAX_CONCURRENT_MIGRATIONS)

        async def one(flow_id: int, address: Address, trigger: str) -> None:
            async with limit:
                self.counters[f"{trigger}_started"] += 1
                try:
                    record = await self.engine.migrate(flow_id, address)
                except KeyError:
                    return  # the flow closed meanwhile
                self.records.append(record)
                del self.records[:-256]
                outcome = "completed" if record.outcome is Outcome.COMPLETED else "failed"
                self.counters[f"{trigger}_{outcome}"] += 1
                self._log.info("migration_trigger", trigger=trigger, flow=flow_id,
                               to=str(address), outcome=record.outcome.value)

        await asyncio.gather(*(one(*move) for move in moves))
