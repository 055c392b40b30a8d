"""SAL wire format: the packet data model and its codec.

Theory of operation
-------------------
A SAL packet is carried in one UDP datagram to the SAL port of a host (default 54325). It is
a 12-byte base header followed by typed extensions (the original Serval v2 layout, see
docs/protocol.md), then an optional payload (unconnected datagrams only: stream data never
travels in SAL packets, it goes over the repair-built kernel TCP connection).

`SalPacket` is the decoded form. Every extension is an optional, immutable dataclass field;
`encode(packet) -> bytes` and `decode(data) -> SalPacket` convert. `decode` is strict: any
malformed input raises `WireFormatError` naming the field, and nothing else can escape.

The encoding is canonical: extensions always appear in ascending type order, reserved bits
and padding are zero, and `decode` refuses anything else. So for every accepted datagram
`encode(decode(data)) == data`, and one `SalPacket` has exactly one encoding, which is what
the authenticator (`sign` / `verify`) is computed over.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from serval.core.ids import NONCE_BYTES, TOKEN_BYTES, FlowID, ServiceID
from serval.errors import WireFormatError

Address = IPv4Address | IPv6Address
_E = TypeVar("_E", bound=enum.IntEnum)

AUTH_TAG_BYTES = 16

SAL_PORT = 54325

BASE_HEADER_BYTES = 12
MAX_HEADER_BYTES = 255 * 4  # shl is one byte counting 32-bit words
MAX_PACKET_BYTES = 65507  # largest UDP payload over IPv4
MAX_EXTENSIONS = 10
SOURCE_MAX_ADDRESSES = 14  # 14 IPv6 addresses = 244 bytes: still fits the one-byte ext length
WINDOW_SCALE_MAX = 14
WINDOW_SCALE_NONE = 0xFF  # wire code for "this side does not scale its window"
MIN_KEY_BYTES = 16


class Protocol(enum.IntEnum):
    """The base header's protocol byte: what the flow carries."""

    CONTROL = 0  # SAL-only packets with no transport (registration, probes)
    TCP = 6  # stream flows; data goes over a kernel TCP connection
    UDP = 17  # datagram flows and unconnected datagrams


class ExtType(enum.IntEnum):
    """Extension type, the high nibble of an extension's first byte.

    1, 2 and 4 are Serval v2's; 0 (PAD) and 3 (ADDRESS, never implemented by the original)
    are not used and are refused. 5..9 are ours. Canonical order is ascending type.
    """

    CONTROL = 1
    SERVICE = 2
    SOURCE = 4
    TRANSPORT = 5
    MIGRATE = 6
    REGISTER = 7
    AUTH = 8
    ORIGIN = 9  # SYN only, so never beside AUTH (which signed packets end with)


class AddressFamily(enum.IntEnum):
    """Family tag written before or beside every address (the IP version number)."""

    IPV4 = 4
    IPV6 = 6


class ControlFlags(enum.IntFlag):
    """Flags byte of the CONTROL extension (same bit values as Serval v2)."""

    NONE = 0
    SYN = 0x80
    RSYN = 0x40
    ACK = 0x20
    NACK = 0x10
    RST = 0x08
    FIN = 0x04


_CONTROL_FLAG_BITS = 0xFC  # the low two bits are reserved


@dataclass(frozen=True)
class ControlExt:
    """Connection control: flags, control sequence numbers and the sender's own nonce."""

    flags: ControlFlags
    verno: int  # u32, this packet's control sequence number
    ackno: int  # u32, next control sequence number expected from the peer
    nonce: bytes  # NONCE_BYTES, always the sender's own nonce


@dataclass(frozen=True)
class ServiceExt:
    """A serviceID (with its prefix length). First = destination, second = source."""

    service: ServiceID


@dataclass(frozen=True)
class SourceExt:
    """The SOURCE trail: original client address, then each SAL forwarder's address."""

    addresses: tuple[Address, ...]


class EstablishMode(enum.IntEnum):
    """How the kernel TCP connection of a stream flow is created (DESIGN.md section 3)."""

    REPAIR = 1  # both ends built directly in ESTABLISHED with TCP_REPAIR
    HANDSHAKE = 2  # ordinary kernel connect() to `address:port`, presenting `token`


@dataclass(frozen=True)
class TransportExt:
    """What the peer needs to build its end of the kernel TCP connection.

    Each side announces its own values (tcp-repair-migration.md section 4). In HANDSHAKE
    mode the server's SYN-ACK gives the endpoint to connect() to and a one-time token.
    """

    mode: EstablishMode
    isn: int  # u32, sequence number of this side's first data byte
    mss: int  # u16
    window_scale: int | None  # 0..14, None = no window scaling
    sack: bool
    timestamps: bool
    window: int  # u32, initial receive window in bytes (unscaled)
    address: Address  # this side's TCP endpoint
    port: int  # u16
    token: bytes = bytes(TOKEN_BYTES)  # HANDSHAKE mode one-time token; zeros in REPAIR mode


@dataclass(frozen=True)
class MigrateExt:
    """RSYN / RSYN-ACK payload: the sender's receive state and its new TCP endpoint."""

    rcv_nxt: int  # u32, first byte the sender has not received
    window_edge: int  # u32, sender's right window edge (rcv_wup + rcv_wnd)
    address: Address  # sender's (new) TCP endpoint address
    port: int  # u16


@dataclass(frozen=True)
class OriginExt:
    """The original legacy client a translator opened this connection for (SYN only).

    A translator's servald puts the TCP client's address and port here so that the server
    side can tell the legacy server who connected (PROXY protocol v2). It is the client
    host's claim, trusted as far as the SYN itself: within one Serval domain.
    """

    address: Address  # an IPv4-mapped IPv6 address must be given as IPv4
    port: int  # u16, 1..65535


class RegisterOp(enum.IntEnum):
    REGISTER = 1
    UNREGISTER = 2


@dataclass(frozen=True)
class RegisterExt:
    """A host announcing (or withdrawing) one of its services to a service router."""

    op: RegisterOp
    service: ServiceID  # carries the prefix length
    address: Address  # where the instance's SAL listens
    weight: int  # u16, >= 1 for REGISTER
    priority: int  # u16, higher set wins
    lifetime_s: int  # u16, soft-state lifetime the router should apply
    sequence: int  # u64, strictly increasing per host (replay protection)
    previous_address: Address | None = None  # re-registration after an address change


@dataclass(frozen=True)
class AuthExt:
    """Keyed authenticator (HMAC-SHA256 truncated) over the whole packet with tag zeroed."""

    key_id: int  # u16, which key (domain key for registrations, 0 = per-flow key)
    tag: bytes  # AUTH_TAG_BYTES


@dataclass(frozen=True)
class SalPacket:
    """One decoded SAL packet."""

    src_flow: FlowID | int  # 0 only for packets that belong to no flow
    dst_flow: FlowID | int  # 0 when unknown (SYN, unconnected datagram)
    protocol: Protocol = Protocol.TCP
    control: ControlExt | None = None
    services: tuple[ServiceExt, ...] = ()  # 0..2: destination, then source
    source: SourceExt | None = None
    transport: TransportExt | None = None
    migrate: MigrateExt | None = None
    register: RegisterExt | None = None
    auth: AuthExt | None = None
    origin: OriginExt | None = None
    payload: bytes = field(default=b"", repr=False)

    @property
    def flags(self) -> ControlFlags:
        return self.control.flags if self.control is not None else ControlFlags.NONE

    @property
    def destination_service(self) -> ServiceID | None:
        return self.services[0].service if self.services else None


# --------------------------------------------------------------------------------------------
# Layouts. Every offset below is from the start of the extension (its 2-byte type/length
# header included); docs/protocol.md has the same tables.

_BASE = struct.Struct("!IIBBH")  # src_flowid, dst_flowid, shl, protocol, check
_EXT_HEADER = struct.Struct("!BB")  # type << 4, length in bytes
_CONTROL = struct.Struct("!BBBBII8s")  # hdr, len, flags, reserved, verno, ackno, nonce
_SERVICE = struct.Struct("!BBH32s")  # hdr, len, prefix_bits, serviceID
_SOURCE_HEAD = struct.Struct("!BBBB")  # hdr, len, address count, reserved
_TRANSPORT = struct.Struct("!BBBBIIHBBHH16s")
# hdr, len, mode, options, isn, window, mss, window_scale, family, port, reserved, token
_MIGRATE = struct.Struct("!BBBBIIHH")
# hdr, len, family, reserved, rcv_nxt, window_edge, port, reserved
_REGISTER = struct.Struct("!BBBBHHHHQ32sBBH")
# hdr, len, op, reserved, prefix_bits, weight, priority, lifetime_s, sequence, serviceID,
# family, previous family (0 = none), reserved
_AUTH = struct.Struct("!BBH16s")  # hdr, len, key_id, tag
_ORIGIN = struct.Struct("!BBBBHH")  # hdr, len, family, reserved, port, reserved

CONTROL_EXT_BYTES = _CONTROL.size  # 20, exactly as Serval v2
SERVICE_EXT_BYTES = _SERVICE.size  # 36, as Serval v2 (prefix length in the reserved bytes)
AUTH_EXT_BYTES = _AUTH.size  # 20

_TRANSPORT_OPT_SACK = 0x80
_TRANSPORT_OPT_TIMESTAMPS = 0x40
_ADDRESS_BYTES = {AddressFamily.IPV4: 4, AddressFamily.IPV6: 16}

# How many of each extension one packet may carry.
_MAX_PER_TYPE = {
    ExtType.CONTROL: 1,
    ExtType.SERVICE: 2,
    ExtType.SOURCE: 1,
    ExtType.TRANSPORT: 1,
    ExtType.MIGRATE: 1,
    ExtType.REGISTER: 1,
    ExtType.AUTH: 1,
    ExtType.ORIGIN: 1,
}

# Decoding looks enum members up in these tables rather than calling the enum classes: a
# SYN's decode did a dozen enum constructions, the largest part of its cost.
_EXT_TYPES = {member.value: member for member in ExtType}
_PROTOCOLS = {member.value: member for member in Protocol}
_FAMILIES = {member.value: member for member in AddressFamily}
_MODES = {member.value: member for member in EstablishMode}
_CONTROL_FLAG_VALUES = {bits: ControlFlags(bits) for bits in range(0, 256, 4)}
_TYPE_INDEX = {ext_type: index for index, ext_type in enumerate(ExtType)}


def internet_checksum(data: bytes) -> int:
    """RFC 1071 one's-complement checksum of `data` (an odd length is padded with a zero)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pad4(length: int) -> int:
    return (length + 3) & ~3


def _source_ext_length(families: list[AddressFamily]) -> int:
    # head, one family byte per address padded to a 4-byte boundary, then the addresses.
    return _SOURCE_HEAD.size + _pad4(len(families)) + sum(_ADDRESS_BYTES[f] for f in families)


# --------------------------------------------------------------------------------------------
# Encoding. Every field is range-checked so a bad packet fails here, naming the field, rather
# than as a struct.error or as garbage on the wire.


def _check_uint(name: str, value: object, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(name, f"must be an integer, got {value!r}")
    if not 0 <= value < 1 << bits:
        raise WireFormatError(name, f"must be 0..{(1 << bits) - 1}, got {value}")
    return value


def _check_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise WireFormatError(name, f"must be {size} bytes, got {value!r}")
    return value


def _check_enum(name: str, enum_type: type[_E], value: object) -> _E:
    """`value` as a member of `enum_type`, or WireFormatError listing the valid values."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(name, f"must be a {enum_type.__name__}, got {value!r}")
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(f"{m.value} ({m.name})" for m in enum_type)
        raise WireFormatError(name, f"unknown value {value}; valid: {valid}") from None


def _family_of(name: str, address: object) -> AddressFamily:
    if isinstance(address, IPv4Address):
        return AddressFamily.IPV4
    if isinstance(address, IPv6Address):
        return AddressFamily.IPV6
    raise WireFormatError(name, f"must be an IPv4Address or IPv6Address, got {address!r}")


def _check_service(name: str, service: object) -> ServiceID:
    if not isinstance(service, ServiceID):
        raise WireFormatError(name, f"must be a ServiceID, got {service!r}")
    return service


def _check_type(name: str, value: object, expected: type) -> None:
    if not isinstance(value, expected):
        raise WireFormatError(name, f"must be a {expected.__name__}, got {value!r}")


def _encode_control(ext: ControlExt) -> bytes:
    flags = _check_uint("control.flags", ext.flags, 8)
    if flags & ~_CONTROL_FLAG_BITS:
        raise WireFormatError("control.flags", f"reserved low bits set in {flags:#04x}")
    return _CONTROL.pack(
        ExtType.CONTROL << 4,
        _CONTROL.size,
        flags,
        0,
        _check_uint("control.verno", ext.verno, 32),
        _check_uint("control.ackno", ext.ackno, 32),
        _check_bytes("control.nonce", ext.nonce, NONCE_BYTES),
    )


def _encode_service(index: int, ext: ServiceExt) -> bytes:
    service = _check_service(f"service[{index}]", ext.service)
    return _SERVICE.pack(ExtType.SERVICE << 4, _SERVICE.size, service.prefix_bits, service.value)


def _encode_source(ext: SourceExt) -> bytes:
    addresses = ext.addresses
    if not isinstance(addresses, tuple) or not 1 <= len(addresses) <= SOURCE_MAX_ADDRESSES:
        raise WireFormatError(
            "source.addresses",
            f"must be a tuple of 1..{SOURCE_MAX_ADDRESSES} addresses, got {addresses!r}",
        )
    families = [_family_of(f"source.addresses[{i}]", a) for i, a in enumerate(addresses)]
    family_table = bytes(families).ljust(_pad4(len(families)), b"\x00")
    length = _source_ext_length(families)
    return (
        _SOURCE_HEAD.pack(ExtType.SOURCE << 4, length, len(addresses), 0)
        + family_table
        + b"".join(a.packed for a in addresses)
    )


def _encode_transport(ext: TransportExt) -> bytes:
    mode = _check_enum("transport.mode", EstablishMode, ext.mode)
    mss = _check_uint("transport.mss", ext.mss, 16)
    if mss == 0:
        raise WireFormatError("transport.mss", "must be at least 1")
    if ext.window_scale is None:
        window_scale = WINDOW_SCALE_NONE
    else:
        window_scale = _check_uint("transport.window_scale", ext.window_scale, 8)
        if window_scale > WINDOW_SCALE_MAX:
            raise WireFormatError(
                "transport.window_scale",
                f"must be 0..{WINDOW_SCALE_MAX} or None, got {window_scale}",
            )
    options = 0
    for name, flag, bit in (
        ("transport.sack", ext.sack, _TRANSPORT_OPT_SACK),
        ("transport.timestamps", ext.timestamps, _TRANSPORT_OPT_TIMESTAMPS),
    ):
        if not isinstance(flag, bool):
            raise WireFormatError(name, f"must be a bool, got {flag!r}")
        options |= bit if flag else 0
    token = _check_bytes("transport.token", ext.token, TOKEN_BYTES)
    if mode is EstablishMode.REPAIR and any(token):
        raise WireFormatError("transport.token", "must be all zero in REPAIR mode")
    family = _family_of("transport.address", ext.address)
    return (
        _TRANSPORT.pack(
            ExtType.TRANSPORT << 4,
            _TRANSPORT.size + _ADDRESS_BYTES[family],
            mode,
            options,
            _check_uint("transport.isn", ext.isn, 32),
            _check_uint("transport.window", ext.window, 32),
            mss,
            window_scale,
            family,
            _check_uint("transport.port", ext.port, 16),
            0,
            token,
        )
        + ext.address.packed
    )


def _encode_migrate(ext: MigrateExt) -> bytes:
    family = _family_of("migrate.address", ext.address)
    return (
        _MIGRATE.pack(
            ExtType.MIGRATE << 4,
            _MIGRATE.size + _ADDRESS_BYTES[family],
            family,
            0,
            _check_uint("migrate.rcv_nxt", ext.rcv_nxt, 32),
            _check_uint("migrate.window_edge", ext.window_edge, 32),
            _check_uint("migrate.port", ext.port, 16),
            0,
        )
        + ext.address.packed
    )


def _encode_register(ext: RegisterExt) -> bytes:
    op = _check_enum("register.op", RegisterOp, ext.op)
    service = _check_service("register.service", ext.service)
    weight = _check_uint("register.weight", ext.weight, 16)
    if op is RegisterOp.REGISTER and weight == 0:
        raise WireFormatError("register.weight", "must be at least 1 for REGISTER")
    family = _family_of("register.address", ext.address)
    previous = b""
    previous_family = 0
    if ext.previous_address is not None:
        previous_family = _family_of("register.previous_address", ext.previous_address)
        previous = ext.previous_address.packed
    length = _REGISTER.size + _ADDRESS_BYTES[family] + len(previous)
    return (
        _REGISTER.pack(
            ExtType.REGISTER << 4,
            length,
            op,
            0,
            service.prefix_bits,
            weight,
            _check_uint("register.priority", ext.priority, 16),
            _check_uint("register.lifetime_s", ext.lifetime_s, 16),
            _check_uint("register.sequence", ext.sequence, 64),
            service.value,
            family,
            previous_family,
            0,
        )
        + ext.address.packed
        + previous
    )


def _encode_origin(ext: OriginExt, control: ControlExt | None) -> bytes:
    if control is None or control.flags != ControlFlags.SYN:
        raise WireFormatError("origin", "only a SYN (CONTROL flags exactly SYN) carries ORIGIN")
    family = _family_of("origin.address", ext.address)
    if isinstance(ext.address, IPv6Address) and ext.address.ipv4_mapped is not None:
        raise WireFormatError("origin.address",
                              f"{ext.address} is IPv4-mapped: give it as {ext.address.ipv4_mapped}")
    port = _check_uint("origin.port", ext.port, 16)
    if port == 0:
        raise WireFormatError("origin.port", "must be 1..65535, got 0")
    return _ORIGIN.pack(ExtType.ORIGIN << 4, _ORIGIN.size + _ADDRESS_BYTES[family], family, 0,
                        port, 0) + ext.address.packed


def _encode_auth(ext: AuthExt) -> bytes:
    return _AUTH.pack(
        ExtType.AUTH << 4,
        _AUTH.size,
        _check_uint("auth.key_id", ext.key_id, 16),
        _check_bytes("auth.tag", ext.tag, AUTH_TAG_BYTES),
    )


def encode(packet: SalPacket) -> bytes:
    """The canonical wire form of `packet`; raises WireFormatError naming a bad field."""
    if not isinstance(packet, SalPacket):
        raise WireFormatError("packet", f"must be a SalPacket, got {type(packet).__name__}")
    src_flow = _check_uint("src_flow", packet.src_flow, 32)
    dst_flow = _check_uint("dst_flow", packet.dst_flow, 32)
    protocol = _check_enum("protocol", Protocol, packet.protocol)
    if not isinstance(packet.services, tuple) or len(packet.services) > 2:
        raise WireFormatError(
            "services", f"must be a tuple of at most 2 ServiceExt, got {packet.services!r}"
        )
    payload = packet.payload
    if not isinstance(payload, bytes):
        raise WireFormatError("payload", f"must be bytes, got {type(payload).__name__}")

    for name, ext, ext_class in (
        ("control", packet.control, ControlExt),
        ("source", packet.source, SourceExt),
        ("transport", packet.transport, TransportExt),
        ("migrate", packet.migrate, MigrateExt),
        ("register", packet.register, RegisterExt),
        ("auth", packet.auth, AuthExt),
        ("origin", packet.origin, OriginExt),
    ):
        if ext is not None:
            _check_type(name, ext, ext_class)
    for index, service in enumerate(packet.services):
        _check_type(f"service[{index}]", service, ServiceExt)

    extensions: list[bytes] = []
    if packet.control is not None:
        extensions.append(_encode_control(packet.control))
    extensions += [_encode_service(i, ext) for i, ext in enumerate(packet.services)]
    if packet.source is not None:
        extensions.append(_encode_source(packet.source))
    if packet.transport is not None:
        extensions.append(_encode_transport(packet.transport))
    if packet.migrate is not None:
        extensions.append(_encode_migrate(packet.migrate))
    if packet.register is not None:
        extensions.append(_encode_register(packet.register))
    if packet.auth is not None:
        extensions.append(_encode_auth(packet.auth))
    if packet.origin is not None:
        extensions.append(_encode_origin(packet.origin, packet.control))

    body = b"".join(extensions)
    header_length = BASE_HEADER_BYTES + len(body)
    # Cannot trigger with today's per-type limits (the largest header is 564 bytes); kept so
    # that a future, larger extension fails loudly instead of wrapping shl.
    if header_length > MAX_HEADER_BYTES:
        raise WireFormatError("shl", f"header of {header_length} bytes exceeds {MAX_HEADER_BYTES}")
    if header_length + len(payload) > MAX_PACKET_BYTES:
        raise WireFormatError(
            "payload",
            f"{len(payload)} bytes of payload make the packet longer than {MAX_PACKET_BYTES}",
        )
    unchecked = _BASE.pack(src_flow, dst_flow, header_length // 4, protocol, 0) + body
    check = internet_checksum(unchecked)
    return unchecked[:10] + check.to_bytes(2, "big") + unchecked[12:] + payload


# --------------------------------------------------------------------------------------------
# Decoding. Each extension decoder receives exactly its own bytes (the length byte already
# checked against the header), verifies the exact length for its contents, then unpacks.


def _require_zero(name: str, value: int) -> None:
    if value:
        raise WireFormatError(name, f"reserved, must be zero, got {value:#x}")


def _require_length(name: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise WireFormatError(name, f"length must be {expected} bytes here, got {actual}")


def _decode_family(name: str, value: int) -> AddressFamily:
    family = _FAMILIES.get(value)
    if family is None:
        raise WireFormatError(name, f"address family must be 4 or 6, got {value}")
    return family


def _decode_address(family: AddressFamily, raw: bytes) -> Address:
    return IPv4Address(raw) if family is AddressFamily.IPV4 else IPv6Address(raw)


def _decode_service_id(name: str, prefix_bits: int, raw: bytes) -> ServiceID:
    if prefix_bits > 256:
        raise WireFormatError(f"{name}.prefix_bits", f"must be 0..256, got {prefix_bits}")
    service = ServiceID(raw, prefix_bits)
    if service.value != raw:
        raise WireFormatError(name, f"bits after the {prefix_bits}-bit prefix must be zero")
    return service


def _decode_control(ext: bytes) -> ControlExt:
    _require_length("control", len(ext), _CONTROL.size)
    _, _, flags, reserved, verno, ackno, nonce = _CONTROL.unpack(ext)
    _require_zero("control.flags", flags & ~_CONTROL_FLAG_BITS)
    _require_zero("control.reserved", reserved)
    return ControlExt(_CONTROL_FLAG_VALUES[flags], verno, ackno, nonce)


def _decode_service(ext: bytes, index: int) -> ServiceExt:
    name = f"service[{index}]"
    _require_length(name, len(ext), _SERVICE.size)
    _, _, prefix_bits, raw = _SERVICE.unpack(ext)
    return ServiceExt(_decode_service_id(name, prefix_bits, raw))


def _decode_source(ext: bytes) -> SourceExt:
    if len(ext) < _SOURCE_HEAD.size:
        raise WireFormatError("source", f"{len(ext)} bytes, shorter than its 4-byte head")
    _, _, count, reserved = _SOURCE_HEAD.unpack_from(ext)
    _require_zero("source.reserved", reserved)
    if not 1 <= count <= SOURCE_MAX_ADDRESSES:
        raise WireFormatError("source.count", f"must be 1..{SOURCE_MAX_ADDRESSES}, got {count}")
    table_end = _SOURCE_HEAD.size + _pad4(count)
    if len(ext) < table_end:
        raise WireFormatError("source", f"{len(ext)} bytes cannot hold {count} family tags")
    families = [
        _decode_family(f"source.family[{i}]", ext[_SOURCE_HEAD.size + i]) for i in range(count)
    ]
    _require_zero("source.padding", int.from_bytes(ext[_SOURCE_HEAD.size + count : table_end]))
    _require_length("source", len(ext), _source_ext_length(families))
    addresses: list[Address] = []
    offset = table_end
    for family in families:
        size = _ADDRESS_BYTES[family]
        addresses.append(_decode_address(family, ext[offset : offset + size]))
        offset += size
    return SourceExt(tuple(addresses))


def _decode_transport(ext: bytes) -> TransportExt:
    if len(ext) < _TRANSPORT.size:
        raise WireFormatError("transport", f"{len(ext)} bytes, shorter than {_TRANSPORT.size}")
    (_, _, mode_code, options, isn, window, mss, window_scale, family_code, port, reserved,
     token) = _TRANSPORT.unpack_from(ext)  # fmt: skip
    family = _decode_family("transport.family", family_code)
    _require_length("transport", len(ext), _TRANSPORT.size + _ADDRESS_BYTES[family])
    mode = _MODES.get(mode_code)
    if mode is None:
        mode = _check_enum("transport.mode", EstablishMode, mode_code)
    _require_zero("transport.options", options & ~(_TRANSPORT_OPT_SACK | _TRANSPORT_OPT_TIMESTAMPS))
    _require_zero("transport.reserved", reserved)
    if mss == 0:
        raise WireFormatError("transport.mss", "must be at least 1")
    if window_scale > WINDOW_SCALE_MAX and window_scale != WINDOW_SCALE_NONE:
        raise WireFormatError(
            "transport.window_scale",
            f"must be 0..{WINDOW_SCALE_MAX} or {WINDOW_SCALE_NONE} (none), got {window_scale}",
        )
    if mode is EstablishMode.REPAIR and any(token):
        raise WireFormatError("transport.token", "must be all zero in REPAIR mode")
    return TransportExt(
        mode=mode,
        isn=isn,
        mss=mss,
        window_scale=None if window_scale == WINDOW_SCALE_NONE else window_scale,
        sack=bool(options & _TRANSPORT_OPT_SACK),
        timestamps=bool(options & _TRANSPORT_OPT_TIMESTAMPS),
        window=window,
        address=_decode_address(family, ext[_TRANSPORT.size :]),
        port=port,
        token=token,
    )


def _decode_migrate(ext: bytes) -> MigrateExt:
    if len(ext) < _MIGRATE.size:
        raise WireFormatError("migrate", f"{len(ext)} bytes, shorter than {_MIGRATE.size}")
    _, _, family_code, reserved, rcv_nxt, window_edge, port, reserved2 = _MIGRATE.unpack_from(ext)
    family = _decode_family("migrate.family", family_code)
    _require_length("migrate", len(ext), _MIGRATE.size + _ADDRESS_BYTES[family])
    _require_zero("migrate.reserved", reserved | reserved2)
    return MigrateExt(rcv_nxt, window_edge, _decode_address(family, ext[_MIGRATE.size :]), port)


def _decode_register(ext: bytes) -> RegisterExt:
    if len(ext) < _REGISTER.size:
        raise WireFormatError("register", f"{len(ext)} bytes, shorter than {_REGISTER.size}")
    (_, _, op_code, reserved, prefix_bits, weight, priority, lifetime_s, sequence, raw,
     family_code, previous_code, reserved2) = _REGISTER.unpack_from(ext)  # fmt: skip
    family = _decode_family("register.family", family_code)
    previous_family = (
        None if previous_code == 0 else _decode_family("register.previous_family", previous_code)
    )
    previous_size = 0 if previous_family is None else _ADDRESS_BYTES[previous_family]
    address_end = _REGISTER.size + _ADDRESS_BYTES[family]
    _require_length("register", len(ext), address_end + previous_size)
    _require_zero("register.reserved", reserved | reserved2)
    op = _check_enum("register.op", RegisterOp, op_code)
    if op is RegisterOp.REGISTER and weight == 0:
        raise WireFormatError("register.weight", "must be at least 1 for REGISTER")
    return RegisterExt(
        op=op,
        service=_decode_service_id("register.service", prefix_bits, raw),
        address=_decode_address(family, ext[_REGISTER.size : address_end]),
        weight=weight,
        priority=priority,
        lifetime_s=lifetime_s,
        sequence=sequence,
        previous_address=(
            None if previous_family is None else _decode_address(previous_family, ext[address_end:])
        ),
    )


def _decode_origin(ext: bytes, control: ControlExt | None) -> OriginExt:
    if len(ext) < _ORIGIN.size:
        raise WireFormatError("origin", f"{len(ext)} bytes, shorter than {_ORIGIN.size}")
    _, _, family_code, reserved, port, reserved2 = _ORIGIN.unpack_from(ext)
    family = _decode_family("origin.family", family_code)
    _require_length("origin", len(ext), _ORIGIN.size + _ADDRESS_BYTES[family])
    _require_zero("origin.reserved", reserved | reserved2)
    if port == 0:
        raise WireFormatError("origin.port", "must be 1..65535, got 0")
    address = _decode_address(family, ext[_ORIGIN.size :])
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        raise WireFormatError("origin.address",
                              f"{address} is IPv4-mapped: it must be sent with family 4")
    # CONTROL (type 1) precedes ORIGIN (type 9), so it is known here.
    if control is None or control.flags != ControlFlags.SYN:
        raise WireFormatError("origin", "only a SYN (CONTROL flags exactly SYN) carries ORIGIN")
    return OriginExt(address, port)


def _decode_auth(ext: bytes) -> AuthExt:
    _require_length("auth", len(ext), _AUTH.size)
    _, _, key_id, tag = _AUTH.unpack(ext)
    return AuthExt(key_id, tag)


def decode(data: bytes) -> SalPacket:
    """Parse one SAL datagram; raises WireFormatError (and nothing else) when malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireFormatError("packet", f"must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < BASE_HEADER_BYTES:
        raise WireFormatError(
            "packet", f"{len(data)} bytes, shorter than the {BASE_HEADER_BYTES}-byte base header"
        )
    if len(data) > MAX_PACKET_BYTES:
        raise WireFormatError("packet", f"{len(data)} bytes, longer than {MAX_PACKET_BYTES}")
    src_flow, dst_flow, shl, protocol_code, check = _BASE.unpack_from(data)
    header_length = shl * 4
    if header_length < BASE_HEADER_BYTES:
        raise WireFormatError("shl", f"must be at least 3 (12 bytes), got {shl}")
    if header_length > len(data):
        raise WireFormatError(
            "shl", f"header of {header_length} bytes is longer than the {len(data)}-byte packet"
        )
    header = data[:header_length]
    expected = internet_checksum(header[:10] + b"\x00\x00" + header[12:])
    if check != expected:
        raise WireFormatError("check", f"checksum {check:#06x}, expected {expected:#06x}")
    protocol = _PROTOCOLS.get(protocol_code)
    if protocol is None:  # (not `or`: Protocol.CONTROL is 0, which is falsy)
        protocol = _check_enum("protocol", Protocol, protocol_code)

    control: ControlExt | None = None
    services: list[ServiceExt] = []
    source: SourceExt | None = None
    transport: TransportExt | None = None
    migrate: MigrateExt | None = None
    register: RegisterExt | None = None
    auth: AuthExt | None = None
    origin: OriginExt | None = None
    seen = [0] * len(_TYPE_INDEX)
    previous_type = 0
    offset = BASE_HEADER_BYTES
    index = 0
    while offset < header_length:
        # (Field names like "ext[1].type" are only formatted on the error paths.)
        # Serval's limit; the per-type limits and the order rule already stop at 9, so this
        # only guards against a future extension type that lifts them.
        if index == MAX_EXTENSIONS:
            raise WireFormatError(f"ext[{index}]", f"more than {MAX_EXTENSIONS} extensions")
        # offset and header_length are multiples of 4, so at least 4 bytes remain here.
        type_byte = data[offset]
        length = data[offset + 1]
        if type_byte & 0x0F:
            _require_zero(f"ext[{index}].reserved", type_byte & 0x0F)
        ext_type = _EXT_TYPES.get(type_byte >> 4)
        if ext_type is None:
            ext_type = _check_enum(f"ext[{index}].type", ExtType, type_byte >> 4)
        if length < 4 or length % 4:
            raise WireFormatError(
                f"ext[{index}].length", f"must be a non-zero multiple of 4, got {length}"
            )
        if offset + length > header_length:
            raise WireFormatError(
                f"ext[{index}].length",
                f"{length} bytes overrun the header: {header_length - offset} remain",
            )
        slot = _TYPE_INDEX[ext_type]
        if seen[slot] == _MAX_PER_TYPE[ext_type]:
            raise WireFormatError(
                ext_type.name.lower(), f"more than {_MAX_PER_TYPE[ext_type]} {ext_type.name}"
            )
        if ext_type < previous_type:
            raise WireFormatError(
                f"ext[{index}].type",
                f"{ext_type.name} after {ExtType(previous_type).name}: "
                "extensions must be in ascending type order",
            )
        ext = data[offset : offset + length]
        if ext_type is ExtType.CONTROL:
            control = _decode_control(ext)
        elif ext_type is ExtType.SERVICE:
            services.append(_decode_service(ext, len(services)))
        elif ext_type is ExtType.SOURCE:
            source = _decode_source(ext)
        elif ext_type is ExtType.TRANSPORT:
            transport = _decode_transport(ext)
        elif ext_type is ExtType.MIGRATE:
            migrate = _decode_migrate(ext)
        elif ext_type is ExtType.REGISTER:
            register = _decode_register(ext)
        elif ext_type is ExtType.AUTH:
            auth = _decode_auth(ext)
        else:
            origin = _decode_origin(ext, control)
        seen[slot] += 1
        previous_type = ext_type
        offset += length
        index += 1

    return SalPacket(
        src_flow=FlowID(src_flow) if src_flow else 0,
        dst_flow=FlowID(dst_flow) if dst_flow else 0,
        protocol=protocol,
        control=control,
        services=tuple(services),
        source=source,
        transport=transport,
        migrate=migrate,
        register=register,
        auth=auth,
        origin=origin,
        payload=data[header_length:],
    )


# --------------------------------------------------------------------------------------------
# Authentication.


def _authenticator(packet: SalPacket, key: bytes, key_id: int) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise WireFormatError("auth.key", f"key must be at least {MIN_KEY_BYTES} bytes")
    unsigned = dataclasses.replace(packet, auth=AuthExt(key_id, bytes(AUTH_TAG_BYTES)))
    return hmac.new(key, encode(unsigned), hashlib.sha256).digest()[:AUTH_TAG_BYTES]


def sign(packet: SalPacket, key: bytes, key_id: int) -> SalPacket:
    """`packet` with an AuthExt: HMAC-SHA256 (first 16 bytes) of its encoding, tag zeroed.

    Any existing AuthExt is replaced. The MAC covers every header byte and the payload, so
    nothing may change the packet after signing (forwarders never touch signed packets).
    """
    _check_uint("auth.key_id", key_id, 16)
    return dataclasses.replace(packet, auth=AuthExt(key_id, _authenticator(packet, key, key_id)))


def verify(packet: SalPacket, key: bytes) -> bool:
    """True when `packet` carries an AuthExt whose tag is correct under `key`.

    The caller picks `key` from `packet.auth.key_id`. Compared in constant time.
    """
    if packet.auth is None:
        return False
    expected = _authenticator(packet, key, packet.auth.key_id)
    return hmac.compare_digest(expected, packet.auth.tag)


_FLOW_KEY_LABEL = b"serval flow key v1"


def flow_key(
    client_nonce: bytes,
    server_nonce: bytes,
    client_flow: int,
    server_flow: int,
    *,
    domain_key: bytes = b"",
) -> bytes:
    """The 32-byte per-flow key that authenticates RSYN / RSYN-ACK (AuthExt key_id 0).

    HMAC-SHA256 keyed with `domain_key` over a label, both nonces and both flowIDs. Both
    ends derive it from the handshake. Nonces travel in clear, so without a `domain_key`
    shared by the domain's hosts this stops off-path forgers only (as Serval's nonces did)
    but also binds the RSYN's contents; with a domain key it stops on-path forgers too.
    """
    _check_bytes("client_nonce", client_nonce, NONCE_BYTES)
    _check_bytes("server_nonce", server_nonce, NONCE_BYTES)
    flows = struct.pack(
        "!II",
        _check_uint("client_flow", client_flow, 32),
        _check_uint("server_flow", server_flow, 32),
    )
    if not isinstance(domain_key, bytes):
        raise WireFormatError("domain_key", "must be bytes")
    message = _FLOW_KEY_LABEL + client_nonce + server_nonce + flows
    return hmac.new(domain_key, message, hashlib.sha256).digest()
