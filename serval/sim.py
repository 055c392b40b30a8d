"""An in-memory SAL network for protocol tests: hosts and service routers under a fake clock.

Theory of operation
-------------------
`Network` owns the clock (`now`, wall-clock-like seconds, because registrations check clock
skew), one seeded `random.Random` for everything the network decides, and an event heap of
datagrams in flight. Nodes exchange ENCODED bytes: every send runs `wire.encode`, every delivery
`wire.decode`, so the codec is on every path. Each datagram is independently lost, duplicated
and delayed (latency plus, with probability `reorder`, up to `reorder_delay_s` extra, which
reorders it behind later ones) according to `LinkConditions`; tests can also drop chosen packets
with filters. `run_until(t)` delivers datagrams and fires node timers in time order.

`Router` is a service router: it accepts signed registrations into a `RegistrationTable` over
its `ServiceTable`, expires them, and forwards SYNs (the only flow packets it ever sees) by
weighted anycast, appending to the SOURCE trail, never forwarding to an address already on the
trail and dropping a SYN that comes back to it (a loop). A DELAY rule holds the SYN and notifies
the `controller`; `release(id)` resolves it again, `drop_delayed(id)` discards it.

`Host` runs Flows and Listeners the way servald would: demultiplex by destination flowID, then
listeners' request flows, then SYNs by the local service table (DEMUX), and answer anything else
with `reset_for`. It plays the runtime too: it answers ConnectionRequest with `respond` (or
refuses), MigrationRequested with `accept_migration` (or refuses), accepts connections at once,
registers its services with its routers through a `Registrar`, and keeps a log of every event.
`send_data_on_connect` models a client-first application: the client's first data reaches the
server's pending socket through TCP's own retransmissions (`Network.send_data`), which completes
the request even when every handshake ACK is lost (the implicit ACK).
"""

from __future__ import annotations

import abc
import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from serval.core import wire
from serval.core.flow import (
    Connected,
    Datagram,
    Event,
    Flow,
    MigrationCompleted,
    MigrationFailed,
    MigrationFailure,
    MigrationRequested,
    reset_for,
)
from serval.core.ids import ServiceID
from serval.core.listener import ConnectionRequest, Listener, ListenerEvent
from serval.core.registration import LocalService, Registrar, RegistrationTable
from serval.core.service_table import RuleKind, ServiceTable, Target
from serval.core.wire import (
    Address,
    ControlFlags,
    EstablishMode,
    MigrateExt,
    SalPacket,
    SourceExt,
    TransportExt,
)
from serval.errors import WireFormatError

START_TIME = 1_700_000_000.0  # registrations compare sequence times with `now`: keep it real
DOMAIN_KEY = b"netsim domain key, 32 bytes long"
DATA_RTO_S = 0.2  # simulated TCP retransmission interval for `send_data`
SERVER_PORT = 7000
MAX_STEPS = 2_000_000  # a run that needs more is a livelock in the code under test

PacketFilter = Callable[[Address, Address, SalPacket], bool]  # True: drop the packet


@dataclass
class LinkConditions:
    latency_s: float = 0.005
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay_s: float = 0.02


@dataclass(frozen=True)
class Transmission:
    """One datagram handed to the network (before loss), decoded back from its bytes."""

    time: float
    source: Address
    destination: Address
    packet: SalPacket


@dataclass
class NetworkCounters:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    filtered: int = 0
    duplicated: int = 0
    reordered: int = 0
    unreachable: int = 0  # destination address not attached at delivery time


class Node(abc.ABC):
    """Something attached to the network at one or more addresses."""

    name: str

    @abc.abstractmethod
    def receive(self, data: bytes, source: Address, destination: Address) -> None:
        """One datagram for `destination` (one of this node's addresses) arrived."""

    def next_timer(self) -> float | None:
        return None

    def on_timer(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Called when `next_timer()` <= now."""

    def on_data(self, flow_id: int) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Simulated TCP data for local flow `flow_id` arrived."""


class Network:
    def __init__(self, seed: int = 0, conditions: LinkConditions | None = None) -> None:
        self.now = START_TIME
        self.seed = seed
        self.rng = random.Random(seed)
        self.conditions = conditions or LinkConditions()
        self.counters = NetworkCounters()
        self.log: list[Transmission] = []
        self._nodes: list[Node] = []
        self._by_address: dict[Address, Node] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._filters: list[PacketFilter] = []

    # -- topology ------------------------------------------------------------------------------

    def node_rng(self, name: str) -> random.Random:
        return random.Random(f"{self.seed}/{name}")

    def add_node(self, node: Node) -> None:
        self._nodes.append(node)

    def attach(self, node: Node, address: Address) -> None:
        if address in self._by_address:
            raise ValueError(f"{address} is already attached to {self._by_address[address].name}")
        self._by_address[address] = node

    def detach(self, address: Address) -> None:
        del self._by_address[address]

    # -- filters -------------------------------------------------------------------------------

    def add_filter(self, packet_filter: PacketFilter) -> PacketFilter:
        self._filters.append(packet_filter)
        return packet_filter

    def remove_filter(self, packet_filter: PacketFilter) -> None:
        self._filters.remove(packet_filter)

    def drop_matching(self, predicate: PacketFilter, count: int = 1) -> PacketFilter:
        """Drop the next `count` packets matching `predicate`, then let them pass."""
        remaining = [count]

        def packet_filter(source: Address, destination: Address, packet: SalPacket) -> bool:
            if remaining[0] > 0 and predicate(source, destination, packet):
                remaining[0] -= 1
                return True
            return False

        return self.add_filter(packet_filter)

    # -- sending -------------------------------------------------------------------------------

    def send(self, source: Address, destination: Address, data: bytes) -> None:
        """Hand one encoded datagram to the network (subject to loss, duplication, delay)."""
        self.counters.sent += 1
        packet = wire.decode(data)  # what the receiver will see; also checks the encoding
        self.log.append(Transmission(self.now, source, destination, packet))
        if any(f(source, destination, packet) for f in list(self._filters)):
            self.counters.filtered += 1
            return
        conditions = self.conditions
        copies = 1
        if conditions.duplicate and self.rng.random() < conditions.duplicate:
            copies = 2
            self.counters.duplicated += 1
        for _ in range(copies):
            if conditions.loss and self.rng.random() < conditions.loss:
                self.counters.lost += 1
                continue
            delay = conditions.latency_s
            if conditions.reorder and self.rng.random() < conditions.reorder:
                delay += self.rng.uniform(0, conditions.reorder_delay_s)
                self.counters.reordered += 1
            self._schedule(self.now + delay, self._deliver_callback(source, destination, data))

    def inject(self, source: Address, destination: Address, packet: SalPacket) -> None:
        """Send a packet as if from `source` (an attacker, a stale duplicate...)."""
        self.send(source, destination, wire.encode(packet))

    def send_data(self, source: Address, destination: Address, flow_id: int) -> None:
        """Simulated TCP data towards local flow `flow_id` at `destination`: lost copies are
        retransmitted every DATA_RTO_S, so it arrives (if the address still exists)."""
        attempts = 0
        while self.conditions.loss and self.rng.random() < self.conditions.loss:
            attempts += 1
        deliver_at = self.now + self.conditions.latency_s + attempts * DATA_RTO_S

        def deliver() -> None:
            node = self._by_address.get(destination)
            if node is not None:
                node.on_data(flow_id)

        self._schedule(deliver_at, deliver)

    def _deliver_callback(
        self, source: Address, destination: Address, data: bytes
    ) -> Callable[[], None]:
        def deliver() -> None:
            node = self._by_address.get(destination)
            if node is None:
                self.counters.unreachable += 1
                return
            self.counters.delivered += 1
            node.receive(data, source, destination)

        return deliver

    def _schedule(self, at: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (at, next(self._sequence), callback))

    # -- running -------------------------------------------------------------------------------

    def run_until(self, end: float) -> None:
        for _ in range(MAX_STEPS):
            next_packet = self._heap[0][0] if self._heap else float("inf")
            timers = [(t, n) for n in self._nodes if (t := n.next_timer()) is not None]
            next_timer = min((t for t, _ in timers), default=float("inf"))
            at = min(next_packet, next_timer)
            if at > end:
                self.now = max(self.now, end)
                return
            self.now = max(self.now, at)
            if next_packet <= next_timer:
                _, _, callback = heapq.heappop(self._heap)
                callback()
            else:
                for timer, node in timers:
                    if timer <= self.now:
                        node.on_timer()
        raise RuntimeError(f"no progress after {MAX_STEPS} steps at t={self.now - START_TIME}")

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    @property
    def elapsed(self) -> float:
        return self.now - START_TIME

    def transmissions(self, predicate: Callable[[Transmission], bool]) -> list[Transmission]:
        return [t for t in self.log if predicate(t)]


def make_transport(rng: random.Random, address: Address, port: int) -> TransportExt:
    """Typical Linux announcements (tcp-repair-migration.md section 4b) with a random ISN."""
    return TransportExt(
        mode=EstablishMode.REPAIR,
        isn=rng.getrandbits(32),
        mss=1460,
        window_scale=7,
        sack=True,
        timestamps=True,
        window=64240,
        address=address,
        port=port,
    )


def is_pure_syn(packet: SalPacket) -> bool:
    return packet.flags & (ControlFlags.SYN | ControlFlags.ACK) == ControlFlags.SYN


def has_flags(packet: SalPacket, flags: ControlFlags) -> bool:
    """Exactly these flags."""
    return packet.control is not None and packet.control.flags == flags


# -- hosts -----------------------------------------------------------------------------------


@dataclass
class HostCounters:
    malformed: int = 0
    resets_sent: int = 0
    unroutable: int = 0
    dropped_syns: int = 0  # SYN for no local listener


@dataclass(frozen=True)
class LoggedEvent:
    time: float
    flow_id: int
    event: Event | ListenerEvent


class Host(Node):
    """A SAL host: flows, listeners, a service table, a registrar, and runtime policies."""

    def __init__(
        self,
        net: Network,
        name: str,
        address: Address,
        *,
        routers: tuple[Address, ...] = (),
        domain_key: bytes = b"",
    ) -> None:
        self.net = net
        self.name = name
        self.addresses: list[Address] = [address]
        self.routers = routers
        self.rng = net.node_rng(name)
        self.domain_key = domain_key  # per-flow key derivation (wire.flow_key)
        self.table = ServiceTable()
        for router in routers:
            self.table.add(ServiceID.parse("default"), Target.forward(router))
        self.flows: dict[int, Flow] = {}
        self.finished: dict[int, Flow] = {}
        self.listeners: dict[ServiceID, Listener] = {}
        self.accepted: dict[ServiceID, list[Flow]] = {}
        self.aborted_requests: list[Flow] = []
        self.registrar: Registrar | None = None
        self.registering = True
        self.events: list[LoggedEvent] = []
        self.counters = HostCounters()
        # Runtime policies.
        self.refuse_requests = False
        self.answer_requests = True  # False: leave ConnectionRequests unanswered
        self.refuse_migrations = False
        self.answer_migrations = True  # False: leave MigrationRequested unanswered
        self.send_data_on_connect = False
        self.retry_yielded_migrations = True  # migrate again once the peer's move is done
        self._migration_targets: dict[int, Address] = {}  # flowID -> last migrate() target
        self._yielded: dict[int, Address] = {}  # flowID -> where we still want to go
        self._ports = itertools.count(40000)
        net.add_node(self)
        net.attach(self, address)

    @property
    def address(self) -> Address:
        return self.addresses[0]

    # -- addresses -----------------------------------------------------------------------------

    def add_address(self, address: Address) -> None:
        self.addresses.append(address)
        self.net.attach(self, address)

    def remove_address(self, address: Address) -> None:
        self.addresses.remove(address)
        self.net.detach(address)

    # -- application calls ---------------------------------------------------------------------

    def connect(self, service: ServiceID, *, peer_address: Address | None = None) -> Flow:
        transport = make_transport(self.rng, self.address, next(self._ports))
        flow = Flow.connect(
            service,
            transport,
            self.net.now,
            self.rng,
            peer_address=peer_address,
            local_address=self.address,
            domain_key=self.domain_key,
        )
        self.flows[int(flow.local_flow)] = flow
        self._service()
        return flow

    def listen(
        self,
        service: ServiceID,
        *,
        backlog: int = 128,
        weight: int = 1,
        priority: int = 0,
        register: bool = True,
    ) -> Listener:
        listener = Listener(service, backlog, domain_key=self.domain_key)
        self.listeners[service] = listener
        self.accepted[service] = []
        self.table.add(service, Target.demux(service, priority=1000))
        if register and self.routers:
            local = LocalService(service, self.address, weight=weight, priority=priority)
            if self.registrar is None:
                self.registrar = Registrar([local], self.routers, DOMAIN_KEY, self.rng)
            else:
                self.registrar.add(local)
        return listener

    def migrate(self, flow: Flow, new_address: Address) -> MigrateExt:
        """Move `flow`'s end to `new_address` (attached first if it is new)."""
        if new_address not in self.addresses:
            self.add_address(new_address)
        info = self._migrate_info(flow, new_address)
        flow.migrate(new_address, info, self.net.now)
        self._migration_targets[int(flow.local_flow)] = new_address
        self._service()
        return info

    def close(self, flow: Flow) -> None:
        flow.close(self.net.now)
        self._service()

    def abort(self, flow: Flow) -> None:
        flow.abort(self.net.now)
        self._service()

    def data_arrived(self, flow: Flow) -> None:
        flow.data_arrived(self.net.now)
        self._service()

    # -- queries -------------------------------------------------------------------------------

    def events_of(self, flow: Flow) -> list[Event | ListenerEvent]:
        return [e.event for e in self.events if e.flow_id == int(flow.local_flow)]

    def event_types(self, flow: Flow) -> list[type]:
        return [type(e) for e in self.events_of(flow)]

    def all_flows(self) -> list[Flow]:
        return [*self.flows.values(), *self.finished.values()]

    # -- Node ----------------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, destination: Address) -> None:
        now = self.net.now
        try:
            packet = wire.decode(data)
        except WireFormatError:
            self.counters.malformed += 1
            return
        if packet.register is not None or packet.control is None:
            self.counters.malformed += 1
            return
        flow_id = int(packet.dst_flow)
        flow = self.flows.get(flow_id)
        if flow is not None:
            flow.handle_packet(packet, source, now)
        elif flow_id and (owner := self._listener_owning(flow_id)) is not None:
            owner.handle_packet(packet, source, now, self.rng, local_address=destination)
        elif is_pure_syn(packet) and flow_id == 0:
            listener = self._listener_for(packet)
            if listener is None:
                self.counters.dropped_syns += 1  # the client retransmits (or is re-resolved)
            else:
                listener.handle_packet(packet, source, now, self.rng, local_address=destination)
        else:
            rst = reset_for(packet)
            if rst is not None:
                self.counters.resets_sent += 1
                self.net.send(destination, source, wire.encode(rst))
        self._service()

    def on_data(self, flow_id: int) -> None:
        now = self.net.now
        flow = self.flows.get(flow_id)
        if flow is not None:
            flow.data_arrived(now)
        elif (owner := self._listener_owning(flow_id)) is not None:
            owner.data_arrived(flow_id, now)
        self._service()

    def next_timer(self) -> float | None:
        candidates = [t for f in self.flows.values() if (t := f.get_timer()) is not None]
        candidates += [t for lst in self.listeners.values() if (t := lst.get_timer()) is not None]
        if self.registrar is not None and self.registering:
            deadline = self.registrar.next_deadline()
            if deadline is not None:
                candidates.append(max(deadline, self.net.now))
        return min(candidates, default=None)

    def on_timer(self) -> None:
        now = self.net.now
        for flow in list(self.flows.values()):
            timer = flow.get_timer()
            if timer is not None and timer <= now:
                flow.handle_timer(now)
        for listener in self.listeners.values():
            timer = listener.get_timer()
            if timer is not None and timer <= now:
                listener.handle_timer(now)
        if self.registrar is not None and self.registering:
            deadline = self.registrar.next_deadline()
            if deadline is not None and deadline <= now:
                for router, packet in self.registrar.due(now):
                    self.net.send(self.address, router, wire.encode(packet))
        self._service()

    # -- the runtime ---------------------------------------------------------------------------

    def _listener_owning(self, flow_id: int) -> Listener | None:
        for listener in self.listeners.values():
            if listener.owns(flow_id):
                return listener
        return None

    def _listener_for(self, packet: SalPacket) -> Listener | None:
        service = packet.destination_service
        if service is None:
            return None
        resolution = self.table.resolve(service, self.rng)
        if resolution is None or resolution.kind is not RuleKind.DEMUX:
            return None
        key = resolution.destination
        assert isinstance(key, ServiceID)
        return self.listeners.get(key)

    def _service(self) -> None:
        """Run the runtime's reactions until quiet, then send everything produced."""
        now = self.net.now
        for _ in range(1000):
            progressed = False
            for service, listener in self.listeners.items():
                while (listener_event := listener.next_event()) is not None:
                    progressed = True
                    self._on_listener_event(listener, listener_event)
                while (accepted := listener.accept()) is not None:
                    progressed = True
                    self.flows[int(accepted.local_flow)] = accepted
                    self.accepted[service].append(accepted)
            for flow in list(self.flows.values()):
                while (event := flow.next_event()) is not None:
                    progressed = True
                    self._on_flow_event(flow, event)
            if not progressed:
                break
        for listener in self.listeners.values():
            self._send_all(listener.datagrams_to_send(now))
        for flow_id, flow in list(self.flows.items()):
            self._send_all(flow.datagrams_to_send(now), flow)
            if flow.is_closed:
                del self.flows[flow_id]
                self.finished[flow_id] = flow

    def _on_listener_event(self, listener: Listener, event: ListenerEvent) -> None:
        now = self.net.now
        self.events.append(LoggedEvent(now, int(event.flow.local_flow), event))
        if isinstance(event, ConnectionRequest):
            if not self.answer_requests:
                return
            if self.refuse_requests:
                listener.refuse(event.flow, now)
                return
            local = event.flow.local_address or self.address
            listener.respond(event.flow, make_transport(self.rng, local, SERVER_PORT), now)
        else:
            self.aborted_requests.append(event.flow)

    def _on_flow_event(self, flow: Flow, event: Event) -> None:
        now = self.net.now
        self.events.append(LoggedEvent(now, int(flow.local_flow), event))
        if isinstance(event, MigrationRequested):
            if not self.answer_migrations:
                return
            if self.refuse_migrations:
                flow.refuse_migration(now)
            else:
                local = flow.local_address or self.address
                flow.accept_migration(self._migrate_info(flow, local), now)
        elif isinstance(event, MigrationFailed):
            if event.reason is MigrationFailure.YIELDED and self.retry_yielded_migrations:
                # The rollback restored the old address; remember where we were going.
                wanted = self._migration_targets[int(flow.local_flow)]
                self._yielded[int(flow.local_flow)] = wanted
        elif isinstance(event, MigrationCompleted) and not event.initiator:
            retry = self._yielded.pop(int(flow.local_flow), None)
            if retry is not None:
                flow.migrate(retry, self._migrate_info(flow, retry), now)
        elif isinstance(event, Connected) and flow.is_client and self.send_data_on_connect:
            source = flow.local_address or self.address
            self.net.send_data(source, event.peer_address, event.peer_flow)

    def _migrate_info(self, flow: Flow, address: Address) -> MigrateExt:
        port = flow.local_transport.port if flow.local_transport is not None else 0
        return MigrateExt(
            rcv_nxt=self.rng.getrandbits(32),
            window_edge=self.rng.getrandbits(32),
            address=address,
            port=port,
        )

    def _send_all(self, datagrams: list[Datagram], flow: Flow | None = None) -> None:
        for packet, destination in datagrams:
            source = self._source_for(packet, flow)
            if destination is None:
                destination = self._resolve(packet)
                if destination is None:
                    self.counters.unroutable += 1
                    continue
            self.net.send(source, destination, wire.encode(packet))

    def _source_for(self, packet: SalPacket, flow: Flow | None) -> Address:
        owner = flow if flow is not None else self.flows.get(int(packet.src_flow))
        if owner is not None:
            address = owner.local_address
            if address is not None and address in self.addresses:
                return address
        return self.address

    def _resolve(self, packet: SalPacket) -> Address | None:
        service = packet.destination_service
        if service is None:
            return None
        resolution = self.table.resolve(service, self.rng)
        if resolution is None:
            return None
        if resolution.kind is RuleKind.FORWARD:
            destination = resolution.destination
            assert isinstance(destination, IPv4Address)
            return destination
        if resolution.kind is RuleKind.DEMUX:
            return self.address  # a local listener: loop back through the network
        return None


# -- routers ---------------------------------------------------------------------------------


@dataclass
class RouterCounters:
    forwarded: int = 0
    loops: int = 0
    no_route: int = 0
    dropped: int = 0  # DROP rules and DELAY verdicts
    delayed: int = 0
    unexpected: int = 0  # anything but SYNs and registrations: routers never see flows
    registrations: int = 0
    rejected_registrations: int = 0
    malformed: int = 0


@dataclass
class DelayedSyn:
    packet: SalPacket
    source: Address
    destination: Address
    size: int


@dataclass
class Router(Node):
    net: Network
    name: str
    address: Address
    domain_key: bytes = DOMAIN_KEY
    controller: Callable[[int, ServiceID], None] | None = None
    table: ServiceTable = field(default_factory=ServiceTable)
    counters: RouterCounters = field(default_factory=RouterCounters)
    delayed: dict[int, DelayedSyn] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = self.net.node_rng(self.name)
        self.registrations = RegistrationTable(self.table, self.domain_key)
        self._delay_ids = itertools.count(1)
        self.net.add_node(self)
        self.net.attach(self, self.address)

    def receive(self, data: bytes, source: Address, destination: Address) -> None:
        try:
            packet = wire.decode(data)
        except WireFormatError:
            self.counters.malformed += 1
            return
        if packet.register is not None:
            result = self.registrations.receive(packet, source, self.net.now)
            if result.accepted:
                self.counters.registrations += 1
            else:
                self.counters.rejected_registrations += 1
            return
        if not is_pure_syn(packet) or packet.dst_flow != 0:
            self.counters.unexpected += 1
            return
        self._forward(DelayedSyn(packet, source, destination, len(data)))

    def release(self, delay_id: int) -> None:
        """Controller verdict RELEASE: resolve the held SYN again, as if just received."""
        self._forward(self.delayed.pop(delay_id))

    def drop_delayed(self, delay_id: int) -> None:
        del self.delayed[delay_id]
        self.counters.dropped += 1

    def next_timer(self) -> float | None:
        return self.registrations.next_deadline()

    def on_timer(self) -> None:
        self.registrations.expire(self.net.now)

    def _forward(self, syn: DelayedSyn) -> None:
        packet = syn.packet
        trail = packet.source.addresses if packet.source is not None else ()
        if syn.destination in trail:
            self.counters.loops += 1  # it came back to us
            return
        new_trail = (*trail, syn.destination) if trail else (syn.source, syn.destination)
        if len(new_trail) > wire.SOURCE_MAX_ADDRESSES:
            self.counters.loops += 1
            return
        service = packet.destination_service
        if service is None:
            self.counters.no_route += 1
            return
        resolution = self.table.resolve(
            service,
            self.rng,
            exclude=frozenset(new_trail),
            packet_bytes=syn.size,
            now=self.net.now,
        )
        if resolution is None:
            self.counters.no_route += 1
            return
        if resolution.kind is RuleKind.FORWARD:
            target = resolution.destination
            assert isinstance(target, IPv4Address)
            forwarded = dataclasses.replace(packet, source=SourceExt(new_trail))
            self.counters.forwarded += 1
            # Only the destination is rewritten: the client's address stays the source.
            self.net.send(syn.source, target, wire.encode(forwarded))
        elif resolution.kind is RuleKind.DELAY:
            delay_id = next(self._delay_ids)
            self.delayed[delay_id] = syn
            self.counters.delayed += 1
            if self.controller is not None:
                self.controller(delay_id, service)
        else:
            self.counters.dropped += 1
