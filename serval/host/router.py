"""The service-router role: resolve and forward first packets, hold registrations.

Theory of operation
-------------------
A service router (`servald --router`) sees exactly three kinds of SAL packets and keeps no
per-flow state for any of them (DESIGN.md section 4, serval-protocol.md section 3.4):

* **pure SYNs** and **unconnected datagrams** (no destination flowID, a destination serviceID):
  resolved by longest-prefix match and weighted anycast in the service table, then forwarded
  to the chosen instance's SAL port with the SOURCE trail extended by the router's own address
  (the address the packet was sent to). The server answers the client directly from the trail's
  first address, so the SYN-ACK, the ACK and all data bypass the router. A target already in
  the trail is a loop and is skipped (the service table then tries the next usable target or a
  shorter prefix); a packet that arrived as a link-layer broadcast is never forwarded, to
  prevent resolution storms;
* **registrations**: authenticated soft state (core/registration.py) that installs and expires
  FORWARD targets;
* anything else (a SYN-ACK, an ACK, data, a FIN) should never reach a router: it is counted
  (`router.unexpected`) and dropped, so the counters prove the router "never sees data".

DELAY targets hold the packet in a bounded queue for a controller (the `delay_*` control
operations); a release re-resolves it as if it had just arrived.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from serval.core import wire
from serval.core.registration import RegistrationAction, RegistrationTable
from serval.core.service_table import RuleKind, ServiceTable
from serval.core.wire import Address, ControlFlags, Protocol, SalPacket, SourceExt
from serval.errors import WireFormatError
from serval.host.log import Counters, RateLimitedLog
from serval.host.sal import Received

DELAY_QUEUE_MAX = 1024


_SYN_BITS = int(ControlFlags.SYN)
_SYN_ACK_RST_BITS = int(ControlFlags.SYN | ControlFlags.ACK | ControlFlags.RST)


def is_pure_syn(packet: SalPacket) -> bool:
    # Plain int arithmetic: IntFlag operators build new enum members (asked of every packet).
    control = packet.control
    return control is not None and int(control.flags) & _SYN_ACK_RST_BITS == _SYN_BITS


def is_unconnected_datagram(packet: SalPacket) -> bool:
    return (
        packet.protocol is Protocol.UDP
        and packet.control is None
        and packet.dst_flow == 0
        and len(packet.services) == 2
    )


@dataclass
class DelayedPacket:
    packet_id: int
    packet: SalPacket
    received: Received
    service: str
    held_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "packet": self.packet_id,
            "service": self.service,
            "kind": "syn" if is_pure_syn(self.packet) else "datagram",
            "source": str(self.received.source),
            "held_at": self.held_at,
        }


class Forwarder:
    """Resolves and forwards first packets; shared by routers and (for DELAY) nobody else."""

    def __init__(
        self,
        table: ServiceTable,
        rng: random.Random,
        counters: Counters,
        send: Callable[[bytes, Address, int], bool],
        port_of: Callable[[Address], int],
        is_broadcast: Callable[[Address], bool],
        bad_input: RateLimitedLog,
        clock: Callable[[], float],
    ) -> None:
        self._table = table
        self._rng = rng
        self._counters = counters
        self._send = send
        self._port_of = port_of
        self._is_broadcast = is_broadcast
        self._bad_input = bad_input
        self._clock = clock
        self._delayed: OrderedDict[int, DelayedPacket] = OrderedDict()
        self._delay_ids = itertools.count(1)

    def forward(self, packet: SalPacket, rx: Received, *, prefix: str = "router") -> bool:
        """Resolve `packet` (a pure SYN or an unconnected datagram) and forward it.

        Returns True when it was forwarded, False when it was dropped, held or had no route.
        """
        kind = "syn" if is_pure_syn(packet) else "dgram"
        service = packet.destination_service
        if service is None:
            self._counters.inc(f"{prefix}.{kind}_no_service")
            return False
        if rx.destination is not None and self._is_broadcast(rx.destination):
            # Arrived as a link-layer broadcast: never forwarded (resolution storms).
            self._counters.inc(f"{prefix}.{kind}_broadcast_not_forwarded")
            return False
        trail = packet.source.addresses if packet.source is not None else (rx.source,)
        own = rx.destination
        if own is not None and packet.source is not None and own in trail:
            # We forwarded this packet before: it came back round a loop.
            self._counters.inc(f"{prefix}.{kind}_loop_dropped")
            return False
        exclude: set[object] = set(trail)
        if own is not None:
            exclude.add(own)
        resolution = self._table.resolve(
            service, self._rng, exclude=exclude, packet_bytes=len(packet.payload),
            now=self._clock(),
        )
        if resolution is None:
            self._counters.inc(f"{prefix}.{kind}_no_route")
            return False
        if resolution.kind is RuleKind.DROP:
            self._counters.inc(f"{prefix}.{kind}_dropped_by_rule")
            return False
        if resolution.kind is RuleKind.DELAY:
            self._hold(packet, rx, str(service))
            return False
        if resolution.kind is not RuleKind.FORWARD:
            # A DEMUX target on a router: the caller handles local delivery before forwarding.
            self._counters.inc(f"{prefix}.{kind}_local_target_skipped")
            return False
        target = resolution.destination
        assert isinstance(target, IPv4Address | IPv6Address)
        new_trail = trail + ((own,) if own is not None else ())
        if len(new_trail) > wire.SOURCE_MAX_ADDRESSES:
            self._counters.inc(f"{prefix}.{kind}_trail_too_long")
            return False
        forwarded = dataclasses.replace(packet, source=SourceExt(tuple(new_trail)))
        try:
            data = wire.encode(forwarded)
        except WireFormatError as exc:
            self._bad_input.warning("forward_encode_failed", error=str(exc))
            self._counters.inc(f"{prefix}.{kind}_encode_failed")
            return False
        if self._send(data, target, self._port_of(target)):
            self._counters.inc(f"{prefix}.{kind}_forwarded")
            return True
        self._counters.inc(f"{prefix}.{kind}_send_failed")
        return False

    # -- DELAY ----------------------------------------------------------------------------------

    def _hold(self, packet: SalPacket, rx: Received, service: str) -> None:
        if len(self._delayed) >= DELAY_QUEUE_MAX:
            self._delayed.popitem(last=False)
            self._counters.inc("delay.overflow_dropped")
        packet_id = next(self._delay_ids)
        self._delayed[packet_id] = DelayedPacket(packet_id, packet, rx, service, self._clock())
        self._counters.inc("delay.held")

    def delayed(self) -> list[DelayedPacket]:
        return list(self._delayed.values())

    def release(self, packet_id: int) -> bool | None:
        """Re-resolve a held packet. None: unknown id; else whether it was forwarded."""
        held = self._delayed.pop(packet_id, None)
        if held is None:
            return None
        self._counters.inc("delay.released")
        return self.forward(held.packet, held.received)

    def drop(self, packet_id: int) -> bool:
        if self._delayed.pop(packet_id, None) is None:
            return False
        self._counters.inc("delay.dropped")
        return True


class RouterRole:
    """What `servald --router` does with each decoded packet that is not for a local flow."""

    def __init__(
        self,
        forwarder: Forwarder,
        registrations: RegistrationTable | None,
        counters: Counters,
        log: Any,
        bad_input: RateLimitedLog,
        wall_clock: Callable[[], float],
    ) -> None:
        self.forwarder = forwarder
        self.registrations = registrations
        self._counters = counters
        self._log = log
        self._bad_input = bad_input
        self._wall_clock = wall_clock

    def handle(self, packet: SalPacket, rx: Received) -> None:
        if packet.register is not None:
            self._registration(packet, rx)
        elif is_pure_syn(packet) or is_unconnected_datagram(packet):
            self.forwarder.forward(packet, rx)
        else:
            self._counters.inc("router.unexpected")
            self._bad_input.warning("router_unexpected_packet", source=str(rx.source),
                                    flags=str(packet.flags))

    def _registration(self, packet: SalPacket, rx: Received) -> None:
        if self.registrations is None:
            self._counters.inc("router.registrations_rejected.no_domain_key")
            self._bad_input.warning("registration_without_domain_key", source=str(rx.source))
            return
        result = self.registrations.receive(packet, rx.source, self._wall_clock())
        if not result.accepted:
            reason = result.reason.value if result.reason is not None else "unknown"
            self._counters.inc(f"router.registrations_rejected.{reason}")
            self._bad_input.warning("registration_rejected", source=str(rx.source),
                                    reason=reason, detail=result.detail)
            return
        self._counters.inc(f"router.registrations.{result.action.value}")
        if result.action in (RegistrationAction.INSTALLED, RegistrationAction.MOVED,
                             RegistrationAction.REMOVED) and result.record is not None:
            self._log.info("registration", action=result.action.value,
                           service=str(result.record.service),
                           address=str(result.record.address),
                           weight=result.record.weight)

    def expire(self) -> float | None:
        """Expire registrations; returns the wall-clock time of the next expiry (or None)."""
        if self.registrations is None:
            return None
        for record in self.registrations.expire(self._wall_clock()):
            self._counters.inc("router.registrations.expired")
            self._log.info("registration", action="expired", service=str(record.service),
                           address=str(record.address))
        return self.registrations.next_deadline()
