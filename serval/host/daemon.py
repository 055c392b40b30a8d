"""servald: the per-host Serval daemon (host role, ad-hoc mode, service-router role).

Theory of operation
-------------------
One asyncio event loop owns everything (DESIGN.md section 4):

* the SAL UDP port (sal.SalPort), whose datagrams are decoded here and dispatched: stream-flow
  packets to the StreamEngine (dataplane.py), registrations and forwardable first packets to
  the RouterRole (router.py) when this servald is a router, unconnected datagrams to the local
  datagram bindings;
* the service table (core/service_table.py): static rules from the YAML, the default rule
  (0/0 -> every configured router, or -> every interface's broadcast address in ad-hoc mode),
  and on a router the FORWARD targets of registrations. Local listeners and datagram bindings
  live in two separate demux tables, so a host never forwards a SYN that is not its own
  (`sal_forward` off, serval-protocol.md section 3.5) while a local connect still prefers a
  local instance;
* registrations: a host registers each listening service (and each explicitly bound datagram
  service) with every router (core/registration.Registrar, signed with the domain key);
* the control socket (control_server.py), whose operations are implemented in `_handle_op`.

Routers keep no per-flow state; hosts keep flows only while establishing them and for a short
linger afterwards (to re-ACK a duplicate SYN-ACK and ignore a duplicate SYN).

Robustness: every datagram is decoded strictly (core/wire.decode); anything malformed,
spoofed or unexpected is counted and logged rate-limited and changes no state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from serval.control import Message, get_field, get_optional_field
from serval.core import wire
from serval.core.flow import RESTORE_VERNO_SKIP, Flow, export_flow, restore_flow
from serval.core.ids import SERVICE_ID_BYTES, ServiceID
from serval.core.registration import LocalService, Registrar, RegistrationTable
from serval.core.service_table import RuleKind, ServiceTable, Target, TargetKey
from serval.core.wire import Address, Protocol, SalPacket, ServiceExt
from serval.errors import (
    ConfigError,
    FlowStateError,
    ServalError,
    ServiceIDError,
    ServiceTableError,
)
from serval.host import flowstate, repair
from serval.host.config import ServaldConfig, config_from_args, parse_endpoint
from serval.host.control_server import ControlServer, ControlSession, OpError
from serval.host.dataplane import (
    ConnectedStream,
    HandshakeAcceptor,
    KernelRepair,
    RepairBackend,
    StreamEngine,
    StreamListener,
    conntrack_advice,
)
from serval.host.log import Counters, RateLimitedLog, configure_logging, get_logger
from serval.host.migration import MigrationEngine, MigrationRecord, Outcome
from serval.host.netmon import MigrationTriggers, NetMonitor, NetSnapshot
from serval.host.policy import InterfaceSelector, SourceRouting
from serval.host.router import Forwarder, RouterRole, is_pure_syn, is_unconnected_datagram
from serval.host.sal import AddressBook, Received, SalPort

VERSION = "0.1.0"
ADDRESS_REFRESH_S = 2.0
SWEEP_INTERVAL_S = 0.25  # linger sweep, token expiry, registration expiry
DEFAULT_ROUTE_PRIORITY = 1  # like Serval's broadcast default rule (priority 1)
MAX_DATAGRAM_PAYLOAD_BYTES = 65000
DEFAULT_CONNECT_PRIORITY = 0
# Flows per `flows` answer (the op is paged: offset/limit/next); 200 flows stay below 64 KiB.
FLOWS_PAGE_DEFAULT = 100
FLOWS_PAGE_MAX = 200
PROFILE_ENV = "SERVALD_PROFILE"  # path ("{pid}" expands): run under cProfile, stats at exit


def _service_arg(message: Message, name: str = "service") -> ServiceID:
    text = get_field(message, name, str)
    try:
        return _parse_service(text)
    except ServiceIDError as exc:
        raise OpError(errno.EINVAL, f"field {name!r}: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _parse_service(text: str) -> ServiceID:
    # Every connect names its service as text; a name means a SHA-256 and a regex each time.
    # ServiceID is immutable, so parsed ones are shared (failures are not cached).
    return ServiceID.parse(text)


def _address_arg(text: str, field_name: str, default_port: int) -> Address:
    try:
        return parse_endpoint(text, default_port).address
    except ValueError as exc:
        raise OpError(errno.EINVAL, f"field {field_name!r}: {exc}") from None


def _origin_arg(message: Message) -> wire.OriginExt | None:
    """The connect op's optional `proxy` field, {addr, port}: the translator's legacy client,
    carried to the server in the SYN's ORIGIN extension (IPv4-mapped IPv6 unmapped)."""
    value = message.get("proxy")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OpError(errno.EINVAL, "field 'proxy' must be an object {addr, port}")
    address_text = value.get("addr", value.get("address"))
    port = value.get("port")
    if not isinstance(address_text, str):
        raise OpError(errno.EINVAL, "field 'proxy.addr' must be an IP address string")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise OpError(errno.EINVAL, f"field 'proxy.port' must be 1..65535, got {port!r}")
    try:
        address: Address = ip_address(address_text.split("%", 1)[0])
    except ValueError:
        raise OpError(errno.EINVAL,
                      f"field 'proxy.addr': {address_text[:64]!r} is not an IP address") from None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return wire.OriginExt(address, port)


@dataclass
class DatagramBinding:
    service: ServiceID
    session: ControlSession
    registered: bool


class Servald:
    """The daemon: wires the SAL port, tables, engines and the control server together."""

    def __init__(self, config: ServaldConfig) -> None:
        self.config = config
        self.log = get_logger(role="router" if config.router else "host")
        self.counters = Counters()
        self.bad_input = RateLimitedLog(self.log)
        self.rng = random.SystemRandom()
        self.addresses = AddressBook()
        self.table = ServiceTable()
        self.stream_demux = ServiceTable()
        self.dgram_demux = ServiceTable()
        self.listeners: dict[ServiceID, tuple[StreamListener, ControlSession]] = {}
        self.dgram_bindings: dict[ServiceID, DatagramBinding] = {}
        self.router_ports = {r.address: r.port for r in config.routers}
        self.sal = SalPort(config.port, config.listen_addresses, self._on_datagram,
                           self._on_sal_error)
        self.control = ControlServer(config.control_socket, config.control_socket_mode,
                                     self._handle_op, self.counters, self.bad_input, self.log)
        self.forwarder = Forwarder(self.table, self.rng, self.counters, self._send,
                                   self._port_of, self.addresses.is_broadcast, self.bad_input,
                                   time.time)
        registrations: RegistrationTable | None = None
        if config.router and config.domain_key is not None:
            registrations = RegistrationTable(self.table, config.domain_key,
                                              domain_key_id=config.domain_key_id)
        self.router_role: RouterRole | None = (
            RouterRole(self.forwarder, registrations, self.counters, self.log, self.bad_input,
                       time.time) if config.router else None
        )
        self.registrar: Registrar | None = None
        self.acceptor: HandshakeAcceptor | None = None
        self.engine: StreamEngine | None = None
        self.migration: MigrationEngine | None = None
        self.netmon: NetMonitor | None = None
        self.triggers: MigrationTriggers | None = None
        self.watched: dict[int, WatchedFlow] = {}  # flow -> its watch (migratable flows)
        # Seals the flow state handed to watchers (flowstate.py); None: no hand-back.
        self.flow_state_key: bytes | None = None
        self._stop = asyncio.Event()
        self._wake_registrar = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._default_targets: set[Address] = set()
        self.started_at = time.time()
        self.repair_note: str | None = None

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.addresses.refresh()
        settings, advice = conntrack_advice()
        if settings.get("nf_conntrack_tcp_loose") == "0":
            self.log.warning("conntrack", settings=settings, advice=advice)
        elif settings:
            self.log.info("conntrack", settings=settings, advice=advice)
        for note in self.sal.open(loop):
            self.log.info("sal_note", note=note)
        self.acceptor = HandshakeAcceptor(
            self.config.data_plane.handshake_port, self.config.timeouts.token_wait_s,
            self._handshake_verified, self._handshake_rejected, self.config.listen_addresses)
        try:
            for note in self.acceptor.open(loop):
                self.log.info("handshake_note", note=note)
        except OSError as exc:
            self.log.warning("handshake_listener_unavailable", error=str(exc),
                             port=self.config.data_plane.handshake_port)
            self.acceptor = None
        self.engine = StreamEngine(
            loop=loop, config=self.config, addresses=self.addresses, send=self._send,
            port_of=self._port_of, resolve=self._resolve_first_hops,
            repair=self._make_repair(), acceptor=self.acceptor, counters=self.counters,
            log=self.log, bad_input=self.bad_input, rng=self.rng)
        await self._start_migration(loop)
        self._load_flow_state_key()
        self._install_static_rules()
        self._sync_default_rules()
        if self.config.routers:
            self._make_registrar()
        self.control.open(loop)
        self._tasks = [
            loop.create_task(self._periodic()),
            loop.create_task(self._registration_loop()),
        ]
        self.log.info(
            "started", version=VERSION, pid=os.getpid(), port=self.config.port,
            control_socket=self.config.control_socket,
            routers=[str(r) for r in self.config.routers],
            mode="router" if self.config.router else (
                "infrastructure" if self.config.routers else "ad-hoc"),
            data_plane=self.config.data_plane.mode, repair=self.repair_note or "available",
            addresses=[str(a) for a in self.addresses.unicast()],
        )

    def _load_flow_state_key(self) -> None:
        """The key sealing flow states (flowstate.py): reused across restarts, so a restarted
        servald can take back the flows its predecessor handed out."""
        if not self.migratable:
            return
        path = flowstate.key_path_for(self.config.control_socket)
        try:
            self.flow_state_key, created = flowstate.load_or_create_key(path)
        except OSError as exc:
            self.log.warning("flow_state_key_unavailable", path=path, error=str(exc),
                             effect="flows cannot be adopted after a restart")
            return
        self.log.info("flow_state_key", path=path, created=created)

    def _make_repair(self) -> RepairBackend | None:
        try:
            return KernelRepair(self.rng)
        except OSError as exc:
            self.repair_note = f"unavailable: {exc}"
            self.log.warning("repair_unavailable", error=str(exc))
            return None

    def _make_registrar(self) -> None:
        if self.config.domain_key is None:
            self.log.warning("registration_disabled",
                             reason="no domain_key configured: routers would reject "
                                    "unauthenticated registrations")
            return
        self.registrar = Registrar(
            (), [r.address for r in self.config.routers], self.config.domain_key, self.rng,
            key_id=self.config.domain_key_id,
            refresh_interval_s=self.config.registration.refresh_s,
            lifetime_s=max(1, math.ceil(self.config.registration.lifetime_s)),
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        await self.start()
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        self.log.info("stopping")
        if self.registrar is not None:
            # Withdraw at once rather than letting routers time the instances out.
            for local in self.registrar.services():
                with contextlib.suppress(ServalError):
                    self.registrar.remove(local.service)
            self._send_registrations()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stop_migration()
        if self.engine is not None:
            self.engine.close()
        await self.control.close()
        if self.acceptor is not None:
            self.acceptor.close()
        self.sal.close()
        self.log.info("stopped", counters=self.counters.snapshot())

    async def _periodic(self) -> None:
        last_refresh = 0.0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            if now - last_refresh >= ADDRESS_REFRESH_S:
                last_refresh = now
                try:
                    if await self.addresses.refresh():
                        self._sync_default_rules()
                        self._follow_address_change()
                except Exception as exc:
                    self.bad_input.warning("address_refresh_failed", error=str(exc))
            if self.engine is not None:
                self.engine.sweep()
            if self.engine is not None:
                self.engine.expire_tokens()
            if self.router_role is not None:
                self.router_role.expire()

    async def _registration_loop(self) -> None:
        while True:
            wait_s = 0.5
            if self.registrar is not None:
                self._send_registrations()
                deadline = self.registrar.next_deadline()
                if deadline is not None:
                    wait_s = max(0.01, min(0.5, deadline - time.time()))
            if self.router_role is not None:
                nxt = self.router_role.expire()
                if nxt is not None:
                    wait_s = max(0.01, min(wait_s, nxt - time.time()))
            self._wake_registrar.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake_registrar.wait()

    def _send_registrations(self) -> None:
        assert self.registrar is not None
        for router, packet in self.registrar.due(time.time()):
            try:
                data = wire.encode(packet)
            except ServalError as exc:
                self.bad_input.warning("registration_encode_failed", error=str(exc))
                continue
            if self._send(data, router, self._port_of(router)):
                self.counters.inc("registrations.sent")

    # -- tables ----------------------------------------------------------------------------------

    def _install_static_rules(self) -> None:
        for rule in self.config.rules:
            kind = RuleKind(rule.kind)
            if kind is RuleKind.FORWARD:
                assert rule.address is not None
                target = Target.forward(rule.address, weight=rule.weight, priority=rule.priority)
                if rule.port != self.config.port:
                    self.router_ports[rule.address] = rule.port
            elif kind is RuleKind.DELAY:
                target = Target.delay(weight=rule.weight, priority=rule.priority)
            else:
                target = Target.drop(weight=rule.weight, priority=rule.priority)
            try:
                self.table.add(rule.service, target)
            except ServiceTableError as exc:
                raise ConfigError(f"{self.config.source}: rules: {exc}") from exc

    def _sync_default_rules(self) -> None:
        """0/0 -> every router (infrastructure) or every broadcast address (ad-hoc)."""
        if self.config.routers:
            wanted = {r.address for r in self.config.routers}
        elif not self.config.router and self.config.broadcast:
            wanted = set(self.addresses.broadcast_addresses())
        else:
            wanted = set()
        default = ServiceID(bytes(SERVICE_ID_BYTES), 0)
        for address in self._default_targets - wanted:
            with contextlib.suppress(ServiceTableError):
                self.table.remove(default, TargetKey(RuleKind.FORWARD, address))
        for address in wanted - self._default_targets:
            with contextlib.suppress(ServiceTableError):
                self.table.add(default, Target.forward(address, priority=DEFAULT_ROUTE_PRIORITY))
        self._default_targets = wanted

    def _port_of(self, address: Address) -> int:
        return self.router_ports.get(address, self.config.port)

    def _own_sal_address(self) -> Address | None:
        if self.config.routers:
            return self.addresses.source_for(self.config.routers[0].address)
        unicast = self.addresses.unicast()
        return unicast[0] if unicast else None

    def _resolve_first_hops(self, service: ServiceID,
                            exclude: set[Address]) -> list[tuple[Address, int]]:
        """Where a locally originated SYN goes: a local listener, else the service table."""
        if self.stream_demux.resolve(service, self.rng) is not None:
            own = self._own_sal_address()
            if own is None:
                return [(socket_loopback(), self.config.port)]
            return [(own, self.config.port)]
        assert self.engine is not None
        suspects = self.engine.suspected() - exclude
        resolution = self.table.resolve(service, self.rng, exclude=exclude | suspects)
        if resolution is None and suspects:
            resolution = self.table.resolve(service, self.rng, exclude=exclude)
        if resolution is None or resolution.kind is not RuleKind.FORWARD:
            if resolution is not None:
                self.counters.inc(f"stream.local_rule_{resolution.kind.value}")
            return []
        target = resolution.destination
        assert isinstance(target, IPv4Address | IPv6Address)
        if self.addresses.is_broadcast(target):
            # Ad-hoc: ask every LAN at once (like resolution mode ALL for the default rule).
            return [(b, self.config.port) for b in self.addresses.broadcast_addresses()
                    if b not in exclude] or [(target, self.config.port)]
        return [(target, self._port_of(target))]

    # -- SAL input -------------------------------------------------------------------------------

    def _send(self, data: bytes, address: Address, port: int) -> bool:
        return self.sal.send(data, address, port)

    def _on_sal_error(self, kind: str, exc: BaseException) -> None:
        self.counters.inc(f"sal.{kind}")
        if kind == "sal_handler_error":
            self.log.error(kind, error=repr(exc), exc_info=exc)
        else:
            self.bad_input.warning(kind, error=str(exc))

    def _on_datagram(self, rx: Received) -> None:
        self.counters.inc("sal.received")
        # Our own broadcasts (ad-hoc SYNs) loop back to us: drop them before decoding, which
        # would be half of an ad-hoc client's per-connection decoding work.
        if rx.destination is not None and self.addresses.is_own(rx.source) and (
            self.addresses.is_broadcast(rx.destination)
        ):
            self.counters.inc("sal.own_broadcast_ignored")
            return
        try:
            packet = wire.decode(rx.data)
        except ServalError as exc:
            self.counters.inc("sal.malformed")
            self.bad_input.warning("sal_malformed", source=f"{rx.source}:{rx.source_port}",
                                   bytes=len(rx.data), error=str(exc)[:200])
            return
        if packet.register is not None:
            if self.router_role is not None:
                self.router_role.handle(packet, rx)
            else:
                self.counters.inc("sal.registration_at_host")
                self.bad_input.warning("registration_at_host", source=str(rx.source))
            return
        if is_unconnected_datagram(packet):
            self._on_unconnected_datagram(packet, rx)
            return
        if packet.protocol is not Protocol.TCP:
            self.counters.inc("sal.unsupported_protocol")
            self.bad_input.warning("sal_unsupported_packet", source=str(rx.source),
                                   protocol=int(packet.protocol))
            return
        if is_pure_syn(packet):
            service = packet.destination_service
            if service is not None and self.stream_demux.resolve(service, self.rng) is not None:
                assert self.engine is not None
                self.engine.handle(packet, rx, self._find_listener)
                return
            if self.router_role is not None:
                self.router_role.handle(packet, rx)
                return
            self.counters.inc("stream.syn_no_listener")
            return
        if packet.dst_flow == 0:
            self.counters.inc("sal.no_flow")
            self.bad_input.warning("sal_packet_without_flow", source=str(rx.source))
            return
        assert self.engine is not None
        if self.migration is not None and self.migration.handle_packet(packet, rx.source):
            return  # an established, watched flow: the migration engine runs it
        if self.router_role is not None and not self.engine.owns(packet):
            # Routers never see SYN-ACKs, ACKs or data: a router counts them and drops them.
            self.router_role.handle(packet, rx)
            return
        self.engine.handle(packet, rx, self._find_listener)

    def _find_listener(self, service: ServiceID) -> StreamListener | None:
        resolution = self.stream_demux.resolve(service, self.rng)
        if resolution is None:
            return None
        key = resolution.destination
        assert isinstance(key, ServiceID)
        entry = self.listeners.get(key)
        return entry[0] if entry is not None else None

    # -- datagrams -------------------------------------------------------------------------------

    def _on_unconnected_datagram(self, packet: SalPacket, rx: Received) -> None:
        service = packet.destination_service
        assert service is not None
        local = self.dgram_demux.resolve(service, self.rng)
        if local is not None:
            binding = self.dgram_bindings.get(local.destination)  # type: ignore[call-overload]
            if binding is not None:
                source_address = packet.source.addresses[0] if packet.source else rx.source
                event: Message = {
                    "event": "datagram",
                    "source": {"service": str(packet.services[1].service),
                               "address": str(source_address)},
                    "data": base64.b64encode(packet.payload).decode("ascii"),
                }
                self.counters.inc("dgram.delivered")
                asyncio.get_running_loop().create_task(binding.session.push_event(event))
                return
        if self.router_role is not None:
            self.router_role.handle(packet, rx)
            return
        self.counters.inc("dgram.no_binding")

    async def _sendto(self, session: ControlSession, message: Message) -> Message:
        service = _service_arg(message)
        data_text = get_field(message, "data", str)
        try:
            payload = base64.b64decode(data_text, validate=True)
        except (binascii.Error, ValueError):
            raise OpError(errno.EINVAL, "field 'data': not valid base64") from None
        if not payload:
            raise OpError(errno.EINVAL, "field 'data': a datagram needs at least one byte")
        if len(payload) > MAX_DATAGRAM_PAYLOAD_BYTES:
            raise OpError(errno.EMSGSIZE, f"datagram of {len(payload)} bytes is larger than "
                                          f"{MAX_DATAGRAM_PAYLOAD_BYTES}")
        binding = self._binding_of(session)
        if binding is None:
            binding = self._bind_datagram(session, None)
        packet = SalPacket(src_flow=0, dst_flow=0, protocol=Protocol.UDP,
                           services=(ServiceExt(service), ServiceExt(binding.service)),
                           payload=payload)
        advisory = get_optional_field(message, "address", str)
        local = self.dgram_demux.resolve(service, self.rng)
        if advisory is None and local is not None:
            own = self._own_sal_address()
            rx = Received(wire.encode(packet), own or socket_loopback(), self.config.port,
                          own, 0)
            self._on_unconnected_datagram(packet, rx)
            return {"service": str(service)}
        if advisory is not None:
            target = _address_arg(advisory, "address", self.config.port)
            targets = [(target, self._port_of(target))]
        else:
            resolution = self.table.resolve(service, self.rng,
                                            packet_bytes=len(payload))
            if resolution is None:
                raise OpError(errno.EHOSTUNREACH, f"service {service}: no route")
            if resolution.kind is RuleKind.DROP:
                raise OpError(errno.EHOSTUNREACH, f"service {service}: dropped by rule")
            if resolution.kind is not RuleKind.FORWARD:
                raise OpError(errno.EAGAIN, f"service {service}: held by a DELAY rule")
            first = resolution.destination
            assert isinstance(first, IPv4Address | IPv6Address)
            if self.addresses.is_broadcast(first):
                targets = [(b, self.config.port) for b in self.addresses.broadcast_addresses()]
            else:
                targets = [(first, self._port_of(first))]
        data = wire.encode(packet)
        sent = sum(1 for address, port in targets if self._send(data, address, port))
        if not sent:
            raise OpError(errno.ENOBUFS, f"service {service}: datagram could not be sent")
        self.counters.inc("dgram.sent")
        return {"service": str(service)}

    def _binding_of(self, session: ControlSession) -> DatagramBinding | None:
        for binding in self.dgram_bindings.values():
            if binding.session is session:
                return binding
        return None

    def _bind_datagram(self, session: ControlSession, service: ServiceID | None
                       ) -> DatagramBinding:
        if self._binding_of(session) is not None:
            raise OpError(errno.EINVAL, "this control connection is already a datagram socket")
        register = service is not None
        if service is None:
            # Autobind: a random serviceID, not registered (replies use the advisory address).
            service = ServiceID(self.rng.randbytes(SERVICE_ID_BYTES))
        if service in self.dgram_bindings:
            raise OpError(errno.EADDRINUSE, f"service {service}: already bound on this host")
        self.dgram_demux.add(service, Target.demux(service))
        binding = DatagramBinding(service, session, register)
        self.dgram_bindings[service] = binding
        if register:
            self._register(service, 1, 0)

        def unbind() -> None:
            if self.dgram_bindings.get(service) is binding:
                del self.dgram_bindings[service]
                with contextlib.suppress(ServiceTableError):
                    self.dgram_demux.remove(service, TargetKey(RuleKind.DEMUX, service))
                if register:
                    self._unregister(service)

        session.on_close(unbind)
        return binding

    # -- registrations -----------------------------------------------------------------------------

    def _register(self, service: ServiceID, weight: int, priority: int) -> None:
        if self.registrar is None:
            return
        address = self._own_sal_address()
        if address is None:
            self.log.warning("registration_no_address", service=str(service))
            return
        try:
            self.registrar.add(LocalService(service, address, weight, priority))
        except ServalError as exc:
            self.log.warning("registration_failed", service=str(service), error=str(exc))
            return
        self._wake_registrar.set()

    def _follow_address_change(self) -> None:
        """Our address towards the routers changed: re-register in place (previous_address),
        so the routers swap the FORWARD target without a gap."""
        if self.registrar is None:
            return
        new = self._own_sal_address()
        if new is None:
            return
        old_addresses = {local.address for local in self.registrar.services()} - {new}
        for old in old_addresses:
            moved = self.registrar.change_address(old, new, time.time())
            if moved:
                self.log.info("registrations_moved", old=str(old), new=str(new),
                              services=[str(s) for s in moved])
        self._wake_registrar.set()

    def _unregister(self, service: ServiceID) -> None:
        if self.registrar is None:
            return
        with contextlib.suppress(ServalError):
            self.registrar.remove(service)
            self._wake_registrar.set()

    # -- stream listeners --------------------------------------------------------------------------

    def _listen(self, session: ControlSession, message: Message) -> Message:
        service = _service_arg(message)
        kind = get_optional_field(message, "type", str) or "stream"
        if kind != "stream":
            raise OpError(errno.EOPNOTSUPP, f"listen type {kind!r}: only 'stream' listens; "
                                            "use dgram_bind for datagrams")
        backlog = get_optional_field(message, "backlog", int) or \
            self.config.accept_backlog_default
        weight = get_optional_field(message, "weight", int) or 1
        priority = get_optional_field(message, "priority", int) or 0
        if not 1 <= backlog <= 65535 or not 1 <= weight <= 65535 or not 0 <= priority <= 65535:
            raise OpError(errno.EINVAL, "backlog and weight must be 1..65535, priority 0..65535")
        if service in self.listeners:
            raise OpError(errno.EADDRINUSE, f"service {service}: already listening on this host")
        backlog = min(backlog, self.config.max_pending_per_listener)

        async def deliver(stream: ConnectedStream) -> bool:
            origin = stream.origin
            event: Message = {
                "event": "accept",
                **stream.describe(),
                "service": str(stream.service),
                "peer": {"service": None if stream.peer_service is None else
                         str(stream.peer_service), "address": str(stream.peer_address)},
                "proxy": None if origin is None else
                {"addr": str(origin.address), "port": origin.port},
                "migratable": self.migratable,
            }
            return await session.push_event(event, [stream.sock.fileno()])

        assert self.engine is not None
        listener = self.engine.new_listener(service, backlog, weight, priority, deliver)
        self.stream_demux.add(service, Target.demux(service, priority=priority))
        self.listeners[service] = (listener, session)
        self._register(service, weight, priority)

        def close_listener() -> None:
            current = self.listeners.get(service)
            if current is None or current[0] is not listener:
                return
            del self.listeners[service]
            with contextlib.suppress(ServiceTableError):
                self.stream_demux.remove(service, TargetKey(RuleKind.DEMUX, service))
            self._unregister(service)
            if self.engine is not None:
                self.engine.drop_listener(listener)
            self.log.info("listener_closed", service=str(service))

        session.on_close(close_listener)
        self.log.info("listening", service=str(service), backlog=backlog, weight=weight)
        return {"service": str(service)}

    def _close_listener(self, session: ControlSession, message: Message) -> Message:
        service = _service_arg(message)
        current = self.listeners.get(service)
        if current is None or current[1] is not session:
            raise OpError(errno.ENOENT, f"service {service}: no listener of this connection")
        listener = current[0]
        del self.listeners[service]
        with contextlib.suppress(ServiceTableError):
            self.stream_demux.remove(service, TargetKey(RuleKind.DEMUX, service))
        self._unregister(service)
        if self.engine is not None:
            self.engine.drop_listener(listener)
        return {}

    def _handshake_verified(self, key: Any, sock: socket.socket) -> None:
        assert self.engine is not None
        self.engine.handshake_verified(int(key), sock)

    def _handshake_rejected(self, reason: str, peer: Address | None) -> None:
        self.counters.inc("stream.handshake_rejected")
        self.bad_input.warning("handshake_rejected", reason=reason,
                               peer=str(peer) if peer else None)

    # -- control operations ------------------------------------------------------------------------

    async def _handle_op(self, session: ControlSession, op: str,
                         message: Message) -> tuple[Message, list[int]]:
        if op == "connect":
            return await self._connect(message)
        if op == "sendto":
            return await self._sendto(session, message), []
        if op == "migrate_flow":
            return await self._migrate_flow(message), []
        if op == "migrate_interface":
            return await self._migrate_interface(message), []
        handler = _SIMPLE_OPS.get(op)
        if handler is None:
            raise OpError(errno.EINVAL, f"unknown op {op[:64]!r}")
        return handler(self, session, message), []

    async def _connect(self, message: Message) -> tuple[Message, list[int]]:
        service = _service_arg(message)
        kind = get_optional_field(message, "type", str) or "stream"
        if kind != "stream":
            raise OpError(errno.EOPNOTSUPP, f"connect type {kind!r}: connected datagram flows "
                                            "are not supported; use dgram_bind + sendto")
        timeout_s = get_optional_field(message, "timeout_s", float)
        if timeout_s is None:
            timeout_s = self.config.timeouts.connect_timeout_s
        if not 0 < timeout_s <= 3600:
            raise OpError(errno.EINVAL, f"field 'timeout_s' must be in (0, 3600], got "
                                        f"{timeout_s}")
        mode = get_optional_field(message, "mode", str) or \
            self.config.data_plane.mode_for(service)
        if mode not in ("repair", "handshake"):
            raise OpError(errno.EINVAL, f"field 'mode' must be repair or handshake, got {mode!r}")
        origin = _origin_arg(message)
        source_text = get_optional_field(message, "source", str)
        source = _service_arg(message, "source") if source_text is not None else None
        assert self.engine is not None
        stream = await self.engine.connect(service, mode, float(timeout_s), origin=origin,
                                           source_service=source)
        try:
            result: Message = {
                **stream.describe(),
                "peer": {"service": str(service), "address": str(stream.peer_address),
                         "instance": str(stream.peer_address)},
                "migratable": self.migratable,
            }
            return result, [stream.sock.fileno()]
        finally:
            # The control server sends the fd before this coroutine's caller closes it: we
            # detach the fd from the socket object so the reply's close_fds() owns it.
            stream.sock.detach()

    def op_hello(self, session: ControlSession, message: Message) -> Message:
        session.client_name = get_optional_field(message, "client", str)
        return {"version": VERSION, "host": [str(a) for a in self.addresses.unicast()],
                "pid": os.getpid()}

    def op_status(self, session: ControlSession, message: Message) -> Message:
        assert self.engine is not None
        return {
            "role": "router" if self.config.router else "host",
            "mode": "router" if self.config.router else (
                "infrastructure" if self.config.routers else "ad-hoc"),
            "version": VERSION,
            "pid": os.getpid(),
            "port": self.config.port,
            "addresses": [str(a) for a in self.addresses.unicast()],
            "routers": [str(r) for r in self.config.routers],
            "control_socket": self.config.control_socket,
            "data_plane": {"mode": self.config.data_plane.mode,
                           "fallback": self.config.data_plane.fallback,
                           "repair": self.repair_note or "available",
                           "handshake_port": self.acceptor.port if self.acceptor else None},
            "listeners": [str(s) for s in self.listeners],
            "datagram_bindings": len(self.dgram_bindings),
            "flows": {"establishing_client": self.engine.client_count(),
                      "establishing_server": self.engine.pending_count(),
                      "watched": len(self.watched),
                      "adopted": sum(1 for w in self.watched.values() if w.adopted)},
            "flow_state_handback": self.flow_state_key is not None,
            "sessions": self.control.session_count,
            "uptime_s": round(time.time() - self.started_at, 3),
            "counters": self.counters.snapshot(),
        }

    def op_services(self, session: ControlSession, message: Message) -> Message:
        rules = [e.to_dict() for e in self.table.entries()]
        for table, kind in ((self.stream_demux, "stream"), (self.dgram_demux, "dgram")):
            for entry in table.entries():
                info = entry.to_dict()
                info["local"] = kind
                rules.append(info)
        return {"rules": rules}

    def op_flows(self, session: ControlSession, message: Message) -> Message:
        assert self.engine is not None
        flows = self.engine.flows()
        if self.migration is not None:
            for managed in self.migration.flows():
                watched = self.watched.get(managed.flow_id)
                described = managed.describe()
                flows.append({
                    "flow": managed.flow_id,
                    "role": watched.role if watched else None,
                    "state": described["state"],
                    "service": str(managed.flow.service),
                    "mode": watched.mode if watched else None,
                    "local": described["local"],
                    "remote": described["remote"],
                    "peer": described["sal_peer"],
                    "migrations": managed.migrations,
                    "watched": True,
                    "adopted": watched.adopted if watched else False,
                })
        # Paged: a busy host has thousands of flows, a reply frame at most 64 KiB (~250 B a
        # flow). Ordered by flowID so that pages stay put while flows come and go.
        offset = get_optional_field(message, "offset", int) or 0
        limit = get_optional_field(message, "limit", int) or FLOWS_PAGE_DEFAULT
        if offset < 0 or not 1 <= limit <= FLOWS_PAGE_MAX:
            raise OpError(errno.EINVAL, f"flows: offset must be >= 0 and limit 1..{FLOWS_PAGE_MAX}")
        flows.sort(key=lambda f: int(f.get("flow") or 0))
        page = flows[offset:offset + limit]
        following = offset + len(page)
        return {"flows": page, "total": len(flows),
                "next": following if following < len(flows) else None}

    def op_registrations(self, session: ControlSession, message: Message) -> Message:
        result: Message = {}
        if self.router_role is not None and self.router_role.registrations is not None:
            result["registrations"] = [r.to_dict() for r in
                                       self.router_role.registrations.records()]
        if self.registrar is not None:
            result["registered"] = [
                {"service": str(s.service), "address": str(s.address), "weight": s.weight,
                 "priority": s.priority} for s in self.registrar.services()]
            result["routers"] = [str(r) for r in self.registrar.routers]
        return result

    def op_counters(self, session: ControlSession, message: Message) -> Message:
        counters = self.counters.snapshot()
        counters["sal.sent"] = self.sal.sent_datagrams
        counters["sal.send_failures"] = self.sal.send_failures
        return {"counters": counters}

    def _rule_target(self, message: Message, op: str) -> tuple[ServiceID, Target]:
        service = _service_arg(message)
        kind_text = get_field(message, "kind", str)
        try:
            kind = RuleKind(kind_text)
        except ValueError:
            raise OpError(errno.EINVAL, f"field 'kind': {kind_text!r} is not forward, delay or "
                                        "drop") from None
        if kind is RuleKind.DEMUX:
            raise OpError(errno.EINVAL, "demux rules come from listen/dgram_bind (rule_modify with "
                                        "kind demux changes a local listener's weight)")
        weight = get_optional_field(message, "weight", int)
        priority = get_optional_field(message, "priority", int)
        address: Address | None = None
        if kind is RuleKind.FORWARD:
            address_text = get_field(message, "address", str)
            try:
                endpoint = parse_endpoint(address_text, self.config.port)
            except ValueError as exc:
                raise OpError(errno.EINVAL, f"field 'address': {exc}") from None
            address = endpoint.address
            if endpoint.port != self.config.port:
                self.router_ports[address] = endpoint.port
        target = Target(kind, address, weight if weight is not None else 1,
                        priority if priority is not None else 0)
        return service, target

    def op_rule_add(self, session: ControlSession, message: Message) -> Message:
        service, target = self._rule_target(message, "rule_add")
        try:
            self.table.add(service, target)
        except ServiceTableError as exc:
            raise OpError(errno.EEXIST if "duplicate" in str(exc) else errno.EINVAL,
                          str(exc)) from None
        self.log.info("rule_added", service=str(service), kind=target.kind.value,
                      address=str(target.destination), weight=target.weight)
        return {}

    def op_rule_modify(self, session: ControlSession, message: Message) -> Message:
        if message.get("kind") == "demux":
            return self._modify_local_instance(message)
        service, target = self._rule_target(message, "rule_modify")
        try:
            info = self.table.modify(service, target.key,
                                     weight=get_optional_field(message, "weight", int),
                                     priority=get_optional_field(message, "priority", int))
        except ServiceTableError as exc:
            raise OpError(errno.ENOENT, str(exc)) from None
        self.log.info("rule_modified", service=str(service), kind=target.kind.value,
                      address=str(target.destination), weight=info.target.weight)
        return {"rule": info.to_dict()}

    def _modify_local_instance(self, message: Message) -> Message:
        """Change the weight / priority this host registers for one of its listeners.

        The routers' FORWARD targets follow at once (re-registration), so only connections
        resolved from now on see the new weight; established ones are untouched.
        """
        service = _service_arg(message)
        current = self.listeners.get(service)
        if current is None:
            raise OpError(errno.ENOENT, f"service {service}: no local listener to modify")
        listener = current[0]
        weight = get_optional_field(message, "weight", int)
        priority = get_optional_field(message, "priority", int)
        new_weight = listener.weight if weight is None else weight
        new_priority = listener.priority if priority is None else priority
        if not 1 <= new_weight <= 65535 or not 0 <= new_priority <= 65535:
            raise OpError(errno.EINVAL, "weight must be 1..65535 and priority 0..65535")
        listener.weight, listener.priority = new_weight, new_priority
        if self.registrar is not None:
            # UNREGISTER + REGISTER go out back to back in one batch, in sequence order.
            self._unregister(service)
            self._register(service, new_weight, new_priority)
        self.log.info("instance_modified", service=str(service), weight=new_weight,
                      priority=new_priority)
        return {"service": str(service), "weight": new_weight, "priority": new_priority}

    def op_rule_remove(self, session: ControlSession, message: Message) -> Message:
        service, target = self._rule_target(message, "rule_remove")
        try:
            info = self.table.remove(service, target.key)
        except ServiceTableError as exc:
            raise OpError(errno.ENOENT, str(exc)) from None
        return {"rule": info.to_dict()}

    def op_delay_list(self, session: ControlSession, message: Message) -> Message:
        return {"packets": [d.to_dict() for d in self.forwarder.delayed()]}

    def op_delay_release(self, session: ControlSession, message: Message) -> Message:
        packet_id = get_field(message, "packet", int)
        result = self.forwarder.release(packet_id)
        if result is None:
            raise OpError(errno.ENOENT, f"no held packet {packet_id}")
        return {"forwarded": result}

    def op_delay_drop(self, session: ControlSession, message: Message) -> Message:
        packet_id = get_field(message, "packet", int)
        if not self.forwarder.drop(packet_id):
            raise OpError(errno.ENOENT, f"no held packet {packet_id}")
        return {}

    def op_listen(self, session: ControlSession, message: Message) -> Message:
        return self._listen(session, message)

    def op_close_listener(self, session: ControlSession, message: Message) -> Message:
        return self._close_listener(session, message)

    def op_dgram_bind(self, session: ControlSession, message: Message) -> Message:
        text = get_optional_field(message, "service", str)
        service = _service_arg(message) if text is not None else None
        binding = self._bind_datagram(session, service)
        return {"service": str(binding.service)}

    def op_watch(self, session: ControlSession, message: Message) -> Message:
        events = message.get("events")
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise OpError(errno.EINVAL, "field 'events' must be a list of event names")
        flow = get_optional_field(message, "flow", int)
        if "migration" in events and flow is not None:
            return {"events": events, **self._watch_flow(session, flow)}
        return {"events": events}

    def op_migration_ack(self, session: ControlSession, message: Message) -> Message:
        flow = get_field(message, "flow", int)
        phase = get_field(message, "phase", str)
        watched = self.watched.get(flow)
        if watched is None or watched.session is not session:
            raise OpError(errno.ENOENT, f"flow {flow}: not watched by this connection")
        if phase != "park":
            raise OpError(errno.EINVAL, f"field 'phase': only 'park' is acknowledged, "
                                        f"got {phase!r}")
        watched.acknowledge_park()
        return {}

    # -- migration -------------------------------------------------------------------------------

    async def _start_migration(self, loop: asyncio.AbstractEventLoop) -> None:
        """The migration engine, and netlink monitoring driving its triggers."""
        assert self.engine is not None
        self.migration = MigrationEngine(loop, self._send_flow_packet, counters=self.counters,
                                         log=self.log.bind(component="migration"))
        if self.engine.repair is None:
            return  # nothing can be frozen or rebuilt without TCP_REPAIR
        await self.migration.prepare()
        policy = self.config.migration
        self.triggers = MigrationTriggers(
            self.migration, policy, routing=SourceRouting() if policy.source_routing else None,
            on_addresses_changed=self._addresses_changed,
            log=self.log.bind(component="migration_triggers"))
        monitor = NetMonitor(self.triggers.on_change, log=self.log.bind(component="netmon"))
        try:
            await monitor.start()
        except Exception as exc:
            self.log.warning("netmon_unavailable", error=repr(exc))
            self.triggers = None
            return
        self.netmon = monitor
        self.triggers.start(monitor.snapshot)

    async def _stop_migration(self) -> None:
        if self.triggers is not None:
            await self.triggers.close()
        if self.netmon is not None:
            await self.netmon.close()
        for flow in list(self.watched):
            self._unwatch(flow)
        if self.migration is not None:
            self.migration.close()

    def _send_flow_packet(self, packet: SalPacket, destination: Address,
                          source: Address | None) -> None:
        try:
            data = wire.encode(packet)
        except ServalError as exc:
            self.counters.inc("sal.encode_failed")
            self.bad_input.warning("sal_encode_failed", error=str(exc))
            return
        self.sal.send(data, destination, self._port_of(destination), source)

    def _addresses_changed(self, snapshot: NetSnapshot) -> None:
        """Netlink saw addresses change: follow at once (not at the next periodic refresh)."""
        asyncio.get_running_loop().create_task(self._refresh_addresses())

    async def _refresh_addresses(self) -> None:
        try:
            if await self.addresses.refresh():
                self._sync_default_rules()
                self._follow_address_change()
        except Exception as exc:
            self.bad_input.warning("address_refresh_failed", error=str(exc))

    @property
    def migratable(self) -> bool:
        """Whether streams of this servald can migrate: the client may `watch` them."""
        return self.migration is not None and self.engine is not None and \
            self.engine.repair is not None

    def _watch_flow(self, session: ControlSession, flow: int) -> Message:
        """The client owns the socket of an established flow and asks to take part in its
        migrations; the request carries the socket (fds=1), servald's copy from now on."""
        if self.migration is None or self.engine is None or self.engine.repair is None:
            raise OpError(errno.EOPNOTSUPP, "migration needs TCP_REPAIR (CAP_NET_ADMIN)")
        if len(session.received_fds) != 1:
            raise OpError(errno.EINVAL, f"watch of flow {flow}: the request must carry the "
                                        "flow's socket (fds=1)")
        fd = session.received_fds[0]
        local, remote = _established_endpoints(fd, f"watch of flow {flow}")
        taken = self.engine.take_established(flow)
        if taken is None:
            raise OpError(errno.ENOENT, f"flow {flow}: no established stream flow of this host "
                                        "to watch (unknown, failed, or already watched)")
        flow_object, role, mode = taken
        session.received_fds.remove(fd)
        self._manage(session, flow_object, fd, role, mode, local, remote)
        self.counters.inc("migration.watched")
        return self._watch_answer(flow)

    def _manage(self, session: ControlSession, flow_object: Flow, fd: int, role: str,
                mode: str, local: tuple[str, int], remote: tuple[str, int],
                adopted: bool = False) -> WatchedFlow:
        """The flow goes to the migration engine, `session` watching it (servald owns `fd`)."""
        assert self.migration is not None
        flow = int(flow_object.local_flow)
        watched = WatchedFlow(session, flow, fd, role, mode,
                              state_of=functools.partial(self._sealed_state, flow),
                              adopted=adopted)
        self.watched[flow] = watched
        self.migration.adopt(flow_object, watched, local=local, remote=remote)

        def release() -> None:
            self._unwatch(flow, watched)

        watched.on_session_close = release
        session.on_close(release)
        return watched

    def _watch_answer(self, flow: int) -> Message:
        answer: Message = {"flow": flow}
        state = self._sealed_state(flow)
        if state is not None:
            answer["state"] = state
        return answer

    def _sealed_state(self, flow: int) -> str | None:
        """The flow's current state, sealed for its watcher (None: not available)."""
        watched = self.watched.get(flow)
        managed = self.migration.get(flow) if self.migration is not None else None
        if self.flow_state_key is None or watched is None or managed is None or \
                managed.local is None or managed.remote is None:
            return None
        try:
            export = export_flow(managed.flow)
        except FlowStateError:
            return None  # closing: nothing left to hand back
        return flowstate.seal(self.flow_state_key, flowstate.SealedFlow(
            export, watched.role, watched.mode, managed.local, managed.remote))

    def _unwatch(self, flow: int, watched: WatchedFlow | None = None) -> bool:
        """Stop managing `flow` (only if `watched` is still its watch, when given)."""
        current = self.watched.get(flow)
        if current is None or (watched is not None and current is not watched):
            return False
        del self.watched[flow]
        if self.migration is not None:
            self.migration.forget(flow)
        if current.on_session_close is not None:
            current.session.remove_on_close(current.on_session_close)
            current.on_session_close = None
        current.close()
        return True

    def op_unwatch(self, session: ControlSession, message: Message) -> Message:
        flow = get_field(message, "flow", int)
        watched = self.watched.get(flow)
        if watched is None or watched.session is not session:
            raise OpError(errno.ENOENT, f"flow {flow}: not watched by this connection")
        self._unwatch(flow, watched)
        self.counters.inc("migration.unwatched")
        return {"flow": flow}

    def op_adopt(self, session: ControlSession, message: Message) -> Message:
        """Take back a flow a previous servald handed out (flowstate.py), with its socket."""
        if self.migration is None or self.engine is None or self.engine.repair is None:
            raise OpError(errno.EOPNOTSUPP, "adopt: migration needs TCP_REPAIR (CAP_NET_ADMIN)")
        if self.flow_state_key is None:
            raise OpError(errno.EOPNOTSUPP, "adopt: this servald has no flow-state key")
        if len(session.received_fds) != 1:
            raise OpError(errno.EINVAL, "adopt: the request must carry the flow's socket (fds=1)")
        try:
            sealed = flowstate.open_sealed(self.flow_state_key, message.get("state"))
        except flowstate.SealedStateError as exc:
            self.counters.inc("migration.adopt_refused")
            self.bad_input.warning("adopt_refused", reason=str(exc))
            raise OpError(errno.EINVAL, f"adopt: {exc}") from None
        flow = sealed.flow
        fd = session.received_fds[0]
        local, remote = _established_endpoints(fd, f"adopt of flow {flow}")
        if (local, remote) != (_canonical(sealed.local), _canonical(sealed.remote)):
            self.counters.inc("migration.adopt_refused")
            raise OpError(errno.EINVAL, f"adopt of flow {flow}: the socket is "
                                        f"{_endpoint_text(local)} -> {_endpoint_text(remote)}, "
                                        f"the state names {_endpoint_text(sealed.local)} -> "
                                        f"{_endpoint_text(sealed.remote)}")
        if flow in self.watched or self.migration.owns(flow):
            raise OpError(errno.EEXIST, f"adopt of flow {flow}: the flow is already live here")
        thawed = repair.thaw_orphan(fd)
        if thawed is not None:
            self.counters.inc("migration.adopt_thawed")
            self.log.warning("adopt_thawed", flow=flow, found=thawed,
                             note="the previous servald died during a migration of this flow")
        flow_object = restore_flow(sealed.export, rng=self.rng,
                                   now=asyncio.get_running_loop().time(),
                                   domain_key=self.config.domain_key or b"")
        session.received_fds.remove(fd)
        self._manage(session, flow_object, fd, sealed.role, sealed.mode, local, remote,
                     adopted=True)
        self.counters.inc("migration.adopted")
        self.log.info("flow_adopted", flow=flow, role=sealed.role, mode=sealed.mode,
                      service=str(sealed.export.service), local=_endpoint_text(local),
                      remote=_endpoint_text(remote), peer=str(sealed.export.peer_address),
                      verno_skip=RESTORE_VERNO_SKIP)
        return {"events": ["migration"], **self._watch_answer(flow), "thawed": thawed is not None}

    def _target_address(self, text: str, flow: int, version: int) -> Address:
        """`to` of migrate_flow: one of our addresses, or an interface (its best address)."""
        try:
            address: Address | None = ip_address(text)
        except ValueError:
            address = None
        if address is not None:
            if not self.addresses.is_own(address) and not (
                    self.netmon is not None and address in self.netmon.snapshot.addresses):
                raise OpError(errno.EADDRNOTAVAIL, f"flow {flow}: {address} is not an address "
                                                   "of this host")
            return address
        if self.netmon is None:
            raise OpError(errno.EOPNOTSUPP, "interface names need the netlink monitor")
        candidates = [info for info in self.netmon.snapshot.usable_addresses()
                      if info.ifname == text and info.address.version == version]
        if not candidates:
            raise OpError(errno.EADDRNOTAVAIL, f"flow {flow}: interface {text!r} has no usable "
                                               f"IPv{version} address")
        return InterfaceSelector(self.config.migration).rank(candidates)[0].address

    async def _migrate_flow(self, message: Message) -> Message:
        flow = get_field(message, "flow", int)
        to = get_field(message, "to", str)
        managed = self.migration.get(flow) if self.migration is not None else None
        if self.migration is None or managed is None:
            raise OpError(errno.ENOENT, f"flow {flow}: not a migratable flow of this host "
                                        "(established, and its socket watched)")
        version = 6 if managed.local is not None and ":" in managed.local[0] else 4
        address = self._target_address(to, flow, version)
        record = await self.migration.migrate(flow, address)
        return self._record_answer(record)

    async def _migrate_interface(self, message: Message) -> Message:
        """Every watched flow on interface `old` moves to interface `new` (`old == new`: the
        interface's address changed; flows still on an address it no longer has move)."""
        old = get_field(message, "old", str)
        new = get_field(message, "new", str)
        if self.migration is None or self.netmon is None:
            raise OpError(errno.EOPNOTSUPP, "migration needs TCP_REPAIR and netlink")
        snapshot = self.netmon.snapshot
        on_old = {info.address for info in snapshot.addresses.values() if info.ifname == old}
        moves: list[tuple[int, Address]] = []
        for managed in self.migration.flows():
            if managed.local is None:
                continue
            current = ip_address(managed.local[0])
            if (old != new and current in on_old) or (old == new and not snapshot.usable(current)):
                moves.append((managed.flow_id,
                              self._target_address(new, managed.flow_id, current.version)))
        migration = self.migration
        records = await asyncio.gather(*(migration.migrate(flow, address)
                                         for flow, address in moves))
        return {"flows": [self._record_answer(r, raise_failure=False) for r in records]}

    @staticmethod
    def _record_answer(record: MigrationRecord, raise_failure: bool = True) -> Message:
        answer: Message = record.to_dict()
        if raise_failure and record.outcome is not Outcome.COMPLETED:
            code = {"timeout": errno.ETIMEDOUT, "refused": errno.ECONNREFUSED,
                    "already there": errno.EALREADY}.get(record.reason or "", errno.EAGAIN)
            raise OpError(code, f"flow {record.flow}: migration {record.outcome.value}: "
                                f"{record.reason}")
        return answer



class WatchedFlow:
    """The migration engine's `AppSocket` for a flow whose socket a client watches.

    The client (the library, or an engine owning the fd such as the translator's relay)
    passed the socket with `watch`; this is servald's copy. `park` pushes a ``migration``
    event (phase ``park``) and waits for the client's `migration_ack`; `swap` pushes phase
    ``swap`` with the new socket (fds=1), which the client installs under its own fd number
    (dup3); `resume` pushes phase ``resume``.
    """

    def __init__(self, session: ControlSession, flow: int, fd: int, role: str,
                 mode: str, *, state_of: Callable[[], str | None] | None = None,
                 adopted: bool = False) -> None:
        self.session = session
        self.flow = flow
        self.fd = fd
        self.role = role
        self.mode = mode
        self.adopted = adopted  # taken back after a servald restart (op adopt)
        self._state_of = state_of
        self.on_session_close: Callable[[], None] | None = None  # servald's release hook
        self._parked: asyncio.Future[None] | None = None
        self._closed = False

    async def acquire(self) -> int:
        if self._closed or self.session.closed:
            raise OSError(errno.EPIPE, f"flow {self.flow}: the watching client is gone")
        return self.fd

    async def park(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked = future
        try:
            await self._push("park")
            await future
        finally:
            self._parked = None

    def acknowledge_park(self) -> None:
        if self._parked is not None and not self._parked.done():
            self._parked.set_result(None)

    async def swap(self, fd: int) -> None:
        await self._push("swap", [fd])

    async def resume(self) -> None:
        # A migration changes the 4-tuple, addresses and sequence numbers: the watcher gets
        # the flow's state again, so what it would hand back after a restart is current.
        state = self._state_of() if self._state_of is not None else None
        with contextlib.suppress(OSError):
            await self._push("resume", state=state)

    async def _push(self, phase: str, fds: list[int] | None = None,
                    state: str | None = None) -> None:
        event: Message = {"event": "migration", "flow": self.flow, "phase": phase}
        if state is not None:
            event["state"] = state
        if not await self.session.push_event(event, fds):
            raise OSError(errno.EPIPE, f"flow {self.flow}: the watching client is gone")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)


def _canonical(endpoint: tuple[str, int]) -> tuple[str, int]:
    """One spelling per address (IPv6 compressed, scope dropped), for comparing 4-tuples."""
    return str(ip_address(endpoint[0].split("%", 1)[0])), int(endpoint[1])


def _endpoint_text(endpoint: tuple[str, int]) -> str:
    host = f"[{endpoint[0]}]" if ":" in endpoint[0] else endpoint[0]
    return f"{host}:{endpoint[1]}"


TCP_STATE_ESTABLISHED = 1  # tcpi_state (first byte of struct tcp_info)


def _established_endpoints(fd: int, subject: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """The 4-tuple of an ESTABLISHED kernel TCP socket (OpError for anything else)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError as exc:
        raise OpError(errno.ENOTSOCK, f"{subject}: fd is not a socket: {exc}") from None
    with sock:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            raise OpError(errno.EINVAL, f"{subject}: fd is not a TCP socket")
        try:
            local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            raise OpError(errno.ENOTCONN, f"{subject}: fd is not a connected TCP socket") \
                from None
        if state != TCP_STATE_ESTABLISHED:
            raise OpError(errno.ENOTCONN, f"{subject}: fd is not an established TCP socket "
                                          f"(kernel TCP state {state})")
    return _canonical((str(local[0]), int(local[1]))), _canonical((str(remote[0]),
                                                                   int(remote[1])))


def socket_loopback() -> Address:
    return IPv4Address("127.0.0.1")


_SIMPLE_OPS: dict[str, Any] = {
    "hello": Servald.op_hello,
    "status": Servald.op_status,
    "services": Servald.op_services,
    "flows": Servald.op_flows,
    "registrations": Servald.op_registrations,
    "counters": Servald.op_counters,
    "rule_add": Servald.op_rule_add,
    "rule_modify": Servald.op_rule_modify,
    "rule_remove": Servald.op_rule_remove,
    "delay_list": Servald.op_delay_list,
    "delay_release": Servald.op_delay_release,
    "delay_drop": Servald.op_delay_drop,
    "listen": Servald.op_listen,
    "close_listener": Servald.op_close_listener,
    "dgram_bind": Servald.op_dgram_bind,
    "watch": Servald.op_watch,
    "unwatch": Servald.op_unwatch,
    "adopt": Servald.op_adopt,
    "migration_ack": Servald.op_migration_ack,
}


async def _amain(config: ServaldConfig) -> int:
    daemon = Servald(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)
    try:
        await daemon.run()
    except (OSError, ServalError) as exc:
        daemon.log.error("fatal", error=str(exc))
        with contextlib.suppress(Exception):
            await daemon.shutdown()
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `servald` console script."""
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"servald: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    profile_path = os.environ.get(PROFILE_ENV)
    if profile_path:
        # "{pid}" in the path: one file per servald when several share an environment.
        return _run_profiled(config, profile_path.replace("{pid}", str(os.getpid())))
    try:
        return asyncio.run(_amain(config))
    except KeyboardInterrupt:
        return 130


def _run_profiled(config: ServaldConfig, path: str) -> int:
    """Run under cProfile and write the stats to `path` at exit (pstats format). For finding
    hot spots on the set-up path (py-spy is not available everywhere); costs ~2x CPU."""
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(asyncio.run, _amain(config))
    except KeyboardInterrupt:
        return 130
    finally:
        profiler.dump_stats(path)


if __name__ == "__main__":
    sys.exit(main())
