"""Service registration: soft state between hosts and service routers.

Theory of operation
-------------------
A host announces each service instance it offers to its service routers with a signed REGISTER
(a SAL packet with a `RegisterExt` and an `AuthExt`, keyed with the domain key). The router turns
it into a FORWARD target (service prefix -> instance address, with the announced weight and
priority) that lives for `lifetime_s` seconds unless refreshed. The host refreshes every
`refresh_interval_s`, so an instance that dies stops receiving new connections at most
`lifetime_s` after its last refresh (defaults: refresh every 1 s, lifetime 3 s, so two
consecutive refreshes may be lost without a flap). UNREGISTER withdraws at once. A host whose
address changed re-registers with `previous_address`, and the router swaps the target in place:
the new target exists before the old one is gone. Compared with the original servd
(serval-protocol.md section 5.2): registrations are authenticated, carry weight, priority and
lifetime, are checked for replay, and UNREGISTER leaves no record or timer behind.

Replay protection, and why it survives restarts
-----------------------------------------------
`sequence` is the sender's wall clock in microseconds since the Unix epoch, bumped by one when
the clock has not advanced since the previous packet, so it strictly increases per host and keeps
increasing across a host restart without any stored counter. The router accepts a registration
only if

1. its sequence, read as a time, is within `max_clock_skew_s` (default 30 s) of the router's own
   wall clock -- older captures are rejected without any per-instance state; and
2. its sequence is strictly greater than the last one accepted for that instance (service
   prefix + address), and for a re-registration also than the last one accepted for the
   previous address.

The router remembers the last sequence per instance while the instance is registered and, after
it is removed or expires, for as long as that sequence could still pass check 1; so memory is
bounded by the churn within one skew window. Consequences, by design: both `now` clocks given
to this module (router and host side) must be wall-clock seconds (`time.time()`); hosts and
routers need clocks within `max_clock_skew_s` of each other (NTP); and a router that itself
restarts forgets the last sequences, so for `max_clock_skew_s` after its restart a captured
registration could be replayed once, installing a target that expires `lifetime_s` later.

The router side keeps no per-flow state: only one record per registered instance.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address

from serval.core import wire
from serval.core.ids import ServiceID
from serval.core.service_table import RuleKind, ServiceTable, Target, TargetKey
from serval.core.wire import Address, Protocol, RegisterExt, RegisterOp, SalPacket
from serval.errors import RegistrationError, ServiceTableError, WireFormatError

__all__ = [
    "DEFAULT_DOMAIN_KEY_ID",
    "DEFAULT_JITTER_FRACTION",
    "DEFAULT_LIFETIME_S",
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "DEFAULT_MAX_LIFETIME_S",
    "DEFAULT_MIN_PREFIX_BITS",
    "DEFAULT_REFRESH_INTERVAL_S",
    "LocalService",
    "Registrar",
    "RegistrationAction",
    "RegistrationRecord",
    "RegistrationResult",
    "RegistrationTable",
    "RejectReason",
    "sequence_time_s",
]

DEFAULT_REFRESH_INTERVAL_S = 1.0  # host: how often each registration is re-sent
DEFAULT_LIFETIME_S = 3  # host: soft-state lifetime asked of the router (u16 seconds on the wire)
DEFAULT_JITTER_FRACTION = 0.1  # host: refreshes come up to 10% early, never late
DEFAULT_MAX_CLOCK_SKEW_S = 30.0  # router: accepted |sender clock - router clock|
DEFAULT_MAX_LIFETIME_S = 60.0  # router: longer requested lifetimes are cut to this
DEFAULT_MIN_PREFIX_BITS = 1  # router: a host may not register the catch-all prefix 0
DEFAULT_DOMAIN_KEY_ID = 1  # AuthExt key_id of the domain key (0 is the per-flow key)

_MICROSECONDS_PER_S = 1_000_000
_SEQUENCE_MAX = 2**64 - 1
_U16_MAX = 2**16 - 1


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < wire.MIN_KEY_BYTES:
        raise RegistrationError(f"domain key must be at least {wire.MIN_KEY_BYTES} bytes")


def sequence_time_s(sequence: int) -> float:
    """The sender wall-clock time (seconds since the epoch) a registration sequence encodes."""
    return sequence / _MICROSECONDS_PER_S


# -- router side -----------------------------------------------------------------------------


class RegistrationAction(enum.Enum):
    INSTALLED = "installed"  # a new FORWARD target
    REFRESHED = "refreshed"  # an existing registration's expiry (and weight/priority) renewed
    MOVED = "moved"  # re-registration from a new address: target swapped in place
    REMOVED = "removed"  # UNREGISTER of a registered instance
    NOT_REGISTERED = "not-registered"  # UNREGISTER of an instance we do not have: no change
    REJECTED = "rejected"  # see `RejectReason`; nothing was changed


class RejectReason(enum.Enum):
    MALFORMED = "malformed"  # missing extension or field values a registration cannot have
    UNAUTHENTICATED = "unauthenticated"  # no AuthExt, wrong key id, or tag does not verify
    STALE = "stale"  # sequence time outside the allowed clock skew
    REPLAYED = "replayed"  # sequence not above the last accepted one for the instance
    CONFLICT = "conflict"  # the target exists as a rule this table did not install


@dataclass(frozen=True)
class RegistrationRecord:
    """One registered instance as the router holds it."""

    service: ServiceID
    address: Address
    weight: int
    priority: int
    sequence: int
    expires_at: float
    sender: Address  # where the latest accepted REGISTER came from (diagnostics only)

    def to_dict(self) -> dict[str, object]:
        return {
            "service": str(self.service),
            "address": str(self.address),
            "weight": self.weight,
            "priority": self.priority,
            "sequence": self.sequence,
            "expires_at": self.expires_at,
            "sender": str(self.sender),
        }


@dataclass(frozen=True)
class RegistrationResult:
    """What `RegistrationTable.receive` did with one packet."""

    action: RegistrationAction
    reason: RejectReason | None = None  # set exactly when action is REJECTED
    detail: str = ""  # human-readable: what was wrong, naming the field and serviceID
    record: RegistrationRecord | None = None  # the registration as now installed / removed

    @property
    def accepted(self) -> bool:
        return self.action is not RegistrationAction.REJECTED


_InstanceKey = tuple[ServiceID, Address]


def _record_order(record: RegistrationRecord) -> tuple[bytes, int, int, bytes]:
    address = record.address
    return (record.service.value, record.service.prefix_bits, address.version, address.packed)


def _reject(reason: RejectReason, detail: str) -> RegistrationResult:
    return RegistrationResult(RegistrationAction.REJECTED, reason, detail)


class RegistrationTable:
    """Router side: turns authenticated registrations into FORWARD targets with expiry."""

    def __init__(
        self,
        table: ServiceTable,
        domain_key: bytes,
        *,
        domain_key_id: int = DEFAULT_DOMAIN_KEY_ID,
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        max_lifetime_s: float = DEFAULT_MAX_LIFETIME_S,
        min_prefix_bits: int = DEFAULT_MIN_PREFIX_BITS,
    ) -> None:
        _check_key(domain_key)
        if max_clock_skew_s <= 0 or max_lifetime_s <= 0:
            raise RegistrationError(
                "max_clock_skew_s and max_lifetime_s must be positive, got "
                f"{max_clock_skew_s} and {max_lifetime_s}"
            )
        self._table = table
        self._domain_key = domain_key
        self._domain_key_id = domain_key_id
        self._max_clock_skew_s = max_clock_skew_s
        self._max_lifetime_s = max_lifetime_s
        self._min_prefix_bits = min_prefix_bits
        self._records: dict[_InstanceKey, RegistrationRecord] = {}
        # Last accepted sequence per instance, kept after removal while a replay of it could
        # still pass the clock-skew check (module docstring).
        self._last_sequence: dict[_InstanceKey, int] = {}
        # (expires_at, instance) with lazy deletion: stale heap items are skipped on pop.
        self._deadlines: list[tuple[float, int, _InstanceKey]] = []
        self._heap_tiebreak = 0

    # -- queries ----------------------------------------------------------------------------

    def records(self) -> list[RegistrationRecord]:
        """Current registrations, ordered by service then address (for listings)."""
        return sorted(self._records.values(), key=_record_order)

    def __len__(self) -> int:
        return len(self._records)

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do, or None if nothing is registered."""
        self._drop_stale_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    # -- packets ----------------------------------------------------------------------------

    def receive(self, packet: SalPacket, sender: Address, now: float) -> RegistrationResult:
        """Apply one registration packet. A rejection changes nothing at all.

        `now` is the router's wall clock in seconds (see the module docstring).
        """
        registration = packet.register
        if registration is None:
            return _reject(RejectReason.MALFORMED, "register: packet carries no RegisterExt")
        problem = self._malformed(registration)
        if problem:
            return _reject(RejectReason.MALFORMED, f"{registration.service}: {problem}")
        unauthenticated = self._unauthenticated(packet)
        if unauthenticated:
            return _reject(
                RejectReason.UNAUTHENTICATED, f"{registration.service}: {unauthenticated}"
            )

        sequence_at = sequence_time_s(registration.sequence)
        if abs(sequence_at - now) > self._max_clock_skew_s:
            return _reject(
                RejectReason.STALE,
                f"{registration.service}: register.sequence is {sequence_at - now:+.3f} s from "
                f"this router's clock (allowed +-{self._max_clock_skew_s} s)",
            )
        key = (registration.service, registration.address)
        keys = [key]
        if registration.previous_address is not None:
            keys.append((registration.service, registration.previous_address))
        for instance in keys:
            last = self._last_sequence.get(instance)
            if last is not None and registration.sequence <= last:
                return _reject(
                    RejectReason.REPLAYED,
                    f"{registration.service}: register.sequence {registration.sequence} is not "
                    f"above {last}, the last accepted for {instance[1]}",
                )

        if registration.op is RegisterOp.UNREGISTER:
            return self._unregister(key, registration.sequence)
        return self._register(registration, sender, now)

    def expire(self, now: float) -> list[RegistrationRecord]:
        """Remove the registrations whose lifetime ended at or before `now`; returns them."""
        expired: list[RegistrationRecord] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, key = heapq.heappop(self._deadlines)
            record = self._records.get(key)
            if record is None or record.expires_at != deadline:
                continue  # refreshed, moved or withdrawn since this deadline was queued
            del self._records[key]
            self._remove_target(record.service, record.address)
            expired.append(record)
        self._forget_old_sequences(now)
        return expired

    # -- internals --------------------------------------------------------------------------

    def _malformed(self, registration: RegisterExt) -> str | None:
        if not isinstance(registration.op, RegisterOp):
            return f"register.op {registration.op!r} is neither REGISTER nor UNREGISTER"
        if not isinstance(registration.service, ServiceID):
            return f"register.service is not a serviceID: {registration.service!r}"
        if registration.service.prefix_bits < self._min_prefix_bits:
            return (
                f"register.service prefix length {registration.service.prefix_bits} is below "
                f"the minimum {self._min_prefix_bits} this router accepts"
            )
        if not _is_unicast(registration.address):
            return f"register.address {registration.address} is not a unicast address"
        if not 0 <= registration.sequence <= _SEQUENCE_MAX:
            return f"register.sequence {registration.sequence} is not a u64"
        if registration.op is RegisterOp.UNREGISTER:
            if registration.previous_address is not None:
                return "register.previous_address is only meaningful for REGISTER"
            return None
        if not 1 <= registration.weight <= _U16_MAX:
            return f"register.weight must be 1..{_U16_MAX}, got {registration.weight}"
        if not 0 <= registration.priority <= _U16_MAX:
            return f"register.priority must be 0..{_U16_MAX}, got {registration.priority}"
        if not 1 <= registration.lifetime_s <= _U16_MAX:
            return f"register.lifetime_s must be 1..{_U16_MAX}, got {registration.lifetime_s}"
        previous = registration.previous_address
        if previous is not None:
            if not _is_unicast(previous):
                return f"register.previous_address {previous} is not a unicast address"
            if previous == registration.address:
                return "register.previous_address equals register.address"
        return None

    def _unauthenticated(self, packet: SalPacket) -> str | None:
        if packet.auth is None:
            return "packet carries no AuthExt"
        if packet.auth.key_id != self._domain_key_id:
            return (
                f"auth.key_id {packet.auth.key_id} is not the domain key id {self._domain_key_id}"
            )
        try:
            valid = wire.verify(packet, self._domain_key)
        except WireFormatError as error:
            return f"authenticator could not be checked: {error}"
        if not valid:
            return "auth.tag does not verify with the domain key"
        return None

    def _register(
        self, registration: RegisterExt, sender: Address, now: float
    ) -> RegistrationResult:
        service, address = registration.service, registration.address
        key = (service, address)
        new_target = Target(RuleKind.FORWARD, address, registration.weight, registration.priority)
        previous_key: _InstanceKey | None = None
        if registration.previous_address is not None:
            candidate = (service, registration.previous_address)
            if candidate in self._records:
                previous_key = candidate

        # Conflict checks come first so that a rejection leaves everything untouched.
        existing = self._table.get_target(service, new_target.key)
        if existing is not None and key not in self._records:
            return _reject(
                RejectReason.CONFLICT,
                f"{service}: a FORWARD rule to {address} exists that was not installed by "
                "registration; remove it before registering this instance",
            )

        lifetime_s = min(float(registration.lifetime_s), self._max_lifetime_s)
        record = RegistrationRecord(
            service=service,
            address=address,
            weight=registration.weight,
            priority=registration.priority,
            sequence=registration.sequence,
            expires_at=now + lifetime_s,
            sender=sender,
        )

        if previous_key is not None:
            old_key = TargetKey(RuleKind.FORWARD, registration.previous_address)
            old_installed = self._table.get_target(service, old_key) is not None
            if existing is None and old_installed:
                # Swap in place: the rule never lacks both the old and the new target.
                self._table.replace(service, old_key, new_target)
            else:
                self._install(service, new_target, existing is not None)
                if old_installed:
                    self._table.remove(service, old_key)
            del self._records[previous_key]
            self._last_sequence[previous_key] = registration.sequence
            action = RegistrationAction.MOVED
        else:
            self._install(service, new_target, existing is not None)
            action = (
                RegistrationAction.REFRESHED
                if key in self._records
                else RegistrationAction.INSTALLED
            )

        self._records[key] = record
        self._last_sequence[key] = registration.sequence
        self._heap_tiebreak += 1
        heapq.heappush(self._deadlines, (record.expires_at, self._heap_tiebreak, key))
        return RegistrationResult(action, record=record)

    def _install(self, service: ServiceID, target: Target, present: bool) -> None:
        if present:
            self._table.modify(service, target.key, weight=target.weight, priority=target.priority)
        else:
            self._table.add(service, target)

    def _unregister(self, key: _InstanceKey, sequence: int) -> RegistrationResult:
        self._last_sequence[key] = sequence
        record = self._records.pop(key, None)
        if record is None:
            return RegistrationResult(
                RegistrationAction.NOT_REGISTERED,
                detail=f"{key[0]}: {key[1]} was not registered",
            )
        self._remove_target(record.service, record.address)
        return RegistrationResult(RegistrationAction.REMOVED, record=record)

    def _remove_target(self, service: ServiceID, address: Address) -> None:
        try:
            self._table.remove(service, TargetKey(RuleKind.FORWARD, address))
        except ServiceTableError:
            pass  # an operator removed the rule by hand already; the record goes anyway

    def _drop_stale_deadlines(self) -> None:
        while self._deadlines:
            deadline, _, key = self._deadlines[0]
            record = self._records.get(key)
            if record is not None and record.expires_at == deadline:
                return
            heapq.heappop(self._deadlines)

    def _forget_old_sequences(self, now: float) -> None:
        horizon = now - self._max_clock_skew_s
        stale = [
            key
            for key, sequence in self._last_sequence.items()
            if key not in self._records and sequence_time_s(sequence) < horizon
        ]
        for key in stale:
            del self._last_sequence[key]


_IPV4_BROADCAST = IPv4Address("255.255.255.255")


def _is_unicast(address: object) -> bool:
    if not isinstance(address, IPv4Address | IPv6Address):
        return False
    return not (address.is_unspecified or address.is_multicast or address == _IPV4_BROADCAST)


# -- host side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalService:
    """One service instance this host offers: the prefix, where its SAL listens, and its rank."""

    service: ServiceID
    address: Address
    weight: int = 1
    priority: int = 0


@dataclass
class _Announcement:
    local: LocalService
    next_refresh: float  # -inf: send at the next `due`
    previous_address: Address | None = None
    previous_until: float = -math.inf  # keep sending previous_address until then


class Registrar:
    """Host side: decides when to (re-)register and withdraw, and builds the signed packets.

    `now` is the host's wall clock in seconds (`time.time()`); it also seeds the sequence.
    With an `rng`, each refresh comes up to `jitter_fraction` of the interval early so that
    hosts started together do not refresh in lockstep; without one there is no jitter.
    """

    def __init__(
        self,
        services: Iterable[LocalService],
        routers: Iterable[Address],
        key: bytes,
        rng: random.Random | None = None,
        *,
        key_id: int = DEFAULT_DOMAIN_KEY_ID,
        refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
        lifetime_s: int = DEFAULT_LIFETIME_S,
        jitter_fraction: float = DEFAULT_JITTER_FRACTION,
    ) -> None:
        _check_key(key)
        if not 1 <= lifetime_s <= _U16_MAX:
            raise RegistrationError(f"lifetime_s must be 1..{_U16_MAX} seconds, got {lifetime_s}")
        if not 0 < refresh_interval_s < lifetime_s:
            raise RegistrationError(
                f"refresh_interval_s must be above 0 and below lifetime_s ({lifetime_s} s), "
                f"got {refresh_interval_s}: otherwise registrations lapse between refreshes"
            )
        if not 0 <= jitter_fraction < 1:
            raise RegistrationError(f"jitter_fraction must be in [0, 1), got {jitter_fraction}")
        self._routers: tuple[Address, ...] = tuple(dict.fromkeys(routers))
        self._key = key
        self._key_id = key_id
        self._rng = rng
        self._refresh_interval_s = refresh_interval_s
        self._lifetime_s = lifetime_s
        self._jitter_fraction = jitter_fraction
        self._announcements: dict[ServiceID, _Announcement] = {}
        self._withdrawals: list[LocalService] = []
        self._last_sequence = 0
        for local in services:
            self.add(local)

    @property
    def routers(self) -> tuple[Address, ...]:
        return self._routers

    def services(self) -> list[LocalService]:
        return [a.local for a in self._announcements.values()]

    def add(self, local: LocalService) -> None:
        """Start announcing `local`; the first REGISTER goes out at the next `due`."""
        if local.service in self._announcements:
            raise RegistrationError(f"{local.service}: already registered by this host")
        if not _is_unicast(local.address):
            raise RegistrationError(
                f"{local.service}: address {local.address} is not a unicast address"
            )
        if not 1 <= local.weight <= _U16_MAX or not 0 <= local.priority <= _U16_MAX:
            raise RegistrationError(
                f"{local.service}: weight must be 1..{_U16_MAX} and priority 0..{_U16_MAX}, "
                f"got {local.weight} and {local.priority}"
            )
        self._announcements[local.service] = _Announcement(local, next_refresh=-math.inf)

    def remove(self, service: ServiceID) -> LocalService:
        """Stop announcing `service`; an UNREGISTER goes to every router at the next `due`.

        It is sent once: if it is lost the router still drops the instance when its lifetime
        runs out.
        """
        announcement = self._announcements.pop(service, None)
        if announcement is None:
            raise RegistrationError(f"{service}: not registered by this host")
        self._withdrawals.append(announcement.local)
        return announcement.local

    def change_address(self, old: Address, new: Address, now: float) -> list[ServiceID]:
        """The host moved from `old` to `new`: re-register every service announced on `old`.

        The re-registrations carry `previous_address` so routers swap the target in place, and
        keep carrying it for one lifetime in case the first ones are lost (after that the old
        registration has expired anyway). Returns the services affected.
        """
        moved: list[ServiceID] = []
        for announcement in self._announcements.values():
            if announcement.local.address != old:
                continue
            announcement.local = replace(announcement.local, address=new)
            announcement.previous_address = old
            announcement.previous_until = now + self._lifetime_s
            announcement.next_refresh = -math.inf
            moved.append(announcement.local.service)
        return moved

    def next_deadline(self) -> float | None:
        """When `due` next has packets to send (a past time: now), or None if nothing is."""
        if self._withdrawals:
            return -math.inf
        if not self._announcements:
            return None
        return min(a.next_refresh for a in self._announcements.values())

    def due(self, now: float) -> list[tuple[Address, SalPacket]]:
        """Packets to send now, each with the router to send it to."""
        out: list[tuple[Address, SalPacket]] = []
        for local in self._withdrawals:
            ext = RegisterExt(
                op=RegisterOp.UNREGISTER,
                service=local.service,
                address=local.address,
                weight=local.weight,
                priority=local.priority,
                lifetime_s=0,
                sequence=self._next_sequence(now),
            )
            out.extend(self._signed_for_each_router(ext))
        self._withdrawals.clear()

        for announcement in self._announcements.values():
            if announcement.next_refresh > now:
                continue
            local = announcement.local
            previous = announcement.previous_address
            if previous is not None and now >= announcement.previous_until:
                previous = announcement.previous_address = None
            ext = RegisterExt(
                op=RegisterOp.REGISTER,
                service=local.service,
                address=local.address,
                weight=local.weight,
                priority=local.priority,
                lifetime_s=self._lifetime_s,
                sequence=self._next_sequence(now),
                previous_address=previous,
            )
            out.extend(self._signed_for_each_router(ext))
            announcement.next_refresh = now + self._refresh_delay_s()
        return out

    def _signed_for_each_router(self, ext: RegisterExt) -> list[tuple[Address, SalPacket]]:
        packet = SalPacket(src_flow=0, dst_flow=0, protocol=Protocol.CONTROL, register=ext)
        signed = wire.sign(packet, self._key, self._key_id)
        return [(router, signed) for router in self._routers]

    def _next_sequence(self, now: float) -> int:
        # Wall-clock microseconds, so a restarted host continues above its old sequences; +1
        # when the clock has not advanced (or stepped back a little) keeps them strictly rising.
        self._last_sequence = max(int(now * _MICROSECONDS_PER_S), self._last_sequence + 1)
        return self._last_sequence

    def _refresh_delay_s(self) -> float:
        if self._rng is None or self._jitter_fraction == 0:
            return self._refresh_interval_s
        return self._refresh_interval_s * (1 - self._jitter_fraction * self._rng.random())
