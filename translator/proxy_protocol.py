"""PROXY protocol version 2 headers (HAProxy's binary format), sans-IO.

An exporter that is configured with ``proxy_protocol: v2`` writes one such header to the legacy
server before the first byte of the relayed stream, so that an unmodified server (nginx with
``listen ... proxy_protocol``, HAProxy, ...) sees the original legacy client's address instead of
the appliance's. The client address travels from the front appliance to the exporter inside the
SAL handshake (the control API's ``connect``/``accept`` ``proxy`` field).

Format (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt, section 2.2):

- 12-byte signature ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``;
- one byte version (high nibble, 2) and command (low nibble: 0 LOCAL, 1 PROXY);
- one byte address family (high nibble: 1 INET, 2 INET6, 0 UNSPEC) and transport (1 STREAM);
- a 2-byte big-endian length of what follows: the addresses, then TLVs;
- INET: source and destination address (4 bytes each), source and destination port (2 each);
  INET6: the same with 16-byte addresses;
- TLVs: type (1 byte), length (2 bytes, big-endian), value.

Source and destination must share a family: when they do not (an IPv4 client reaching an IPv6
appliance), both are written as IPv6 with the IPv4 one mapped (``::ffff:a.b.c.d``), as HAProxy
does. Without any source address the header is a LOCAL one (the server uses the connection's own
addresses), which is the specification's answer for "no information".
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED_BYTES = 16  # signature + version/command + family + length
VERSION_2 = 0x20
COMMAND_LOCAL = 0x00
COMMAND_PROXY = 0x01
FAMILY_UNSPEC = 0x00
FAMILY_INET = 0x10
FAMILY_INET6 = 0x20
TRANSPORT_STREAM = 0x01
IPV4_ADDRESS_BLOCK_BYTES = 12
IPV6_ADDRESS_BLOCK_BYTES = 36
MAX_PAYLOAD_BYTES = 0xFFFF

# TLV types used here (section 2.2.x of the specification).
PP2_TYPE_AUTHORITY = 0x02  # the host name the client asked for (here: the serviceID text)
PP2_TYPE_UNIQUE_ID = 0x05  # an opaque connection id (here: the Serval flow id), <= 128 bytes
MAX_UNIQUE_ID_BYTES = 128

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPort = tuple[str, int]


class ProxyProtocolError(ValueError):
    """A header that cannot be built or parsed; the message says which field."""


@dataclass(frozen=True)
class ProxyHeader:
    """A decoded header: `source`/`destination` are None for LOCAL or UNSPEC headers."""

    command: Literal["LOCAL", "PROXY"]
    source: AddressPort | None
    destination: AddressPort | None
    tlvs: Mapping[int, bytes] = field(default_factory=dict)
    length: int = 0  # bytes the header occupies on the wire


def _address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ProxyProtocolError(f"{what}: not an IP address: {text!r}") from None


def _port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ProxyProtocolError(f"{what}: port must be 0..65535, got {port!r}")
    return port


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def encode_tlvs(tlvs: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ProxyProtocolError(f"TLV type must be 0..255, got {kind}")
        if len(value) > MAX_PAYLOAD_BYTES:
            raise ProxyProtocolError(f"TLV 0x{kind:02x} value of {len(value)} bytes is too long")
        out += struct.pack("!BH", kind, len(value)) + value
    return bytes(out)


def encode_v2(
    source: AddressPort | None,
    destination: AddressPort | None,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A PROXY (or, without `source`, LOCAL) v2 header for a TCP connection.

    `destination` defaults to the unspecified address of the source's family and port 0 when
    unknown (the header format has no "no destination" of its own).
    """
    extra = encode_tlvs(tlvs)
    if source is None:
        return _header(COMMAND_LOCAL, FAMILY_UNSPEC, extra)
    src = _address(source[0], "source")
    src_port = _port(source[1], "source")
    if destination is None:
        dst: IPAddress = (ipaddress.IPv4Address(0) if src.version == 4
                          else ipaddress.IPv6Address(0))
        dst_port = 0
    else:
        dst = _address(destination[0], "destination")
        dst_port = _port(destination[1], "destination")
    if src.version == 4 and dst.version == 4:
        block = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
        return _header(COMMAND_PROXY, FAMILY_INET | TRANSPORT_STREAM, block + extra)
    block = (_as_ipv6(src).packed + _as_ipv6(dst).packed
             + struct.pack("!HH", src_port, dst_port))
    return _header(COMMAND_PROXY, FAMILY_INET6 | TRANSPORT_STREAM, block + extra)


def _header(command: int, family: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProxyProtocolError(f"header payload of {len(payload)} bytes exceeds 65535")
    return SIGNATURE + struct.pack("!BBH", VERSION_2 | command, family, len(payload)) + payload


def decode_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """Parse a header at the start of `data`; None if more bytes are needed.

    Raises ProxyProtocolError when the bytes are not a valid v2 header.
    """
    view = bytes(data[:HEADER_FIXED_BYTES])
    prefix = min(len(view), len(SIGNATURE))
    if view[:prefix] != SIGNATURE[:prefix]:
        raise ProxyProtocolError("no PROXY v2 signature at the start of the stream")
    if len(view) < HEADER_FIXED_BYTES:
        return None
    version_command, family, length = struct.unpack_from("!BBH", view, len(SIGNATURE))
    if version_command & 0xF0 != VERSION_2:
        raise ProxyProtocolError(f"version nibble {version_command >> 4}, expected 2")
    command = version_command & 0x0F
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        raise ProxyProtocolError(f"unknown command {command}")
    total = HEADER_FIXED_BYTES + length
    if len(data) < total:
        return None
    payload = bytes(data[HEADER_FIXED_BYTES:total])
    source: AddressPort | None = None
    destination: AddressPort | None = None
    address_family = family & 0xF0
    if address_family == FAMILY_INET:
        block = IPV4_ADDRESS_BLOCK_BYTES
        if length < block:
            raise ProxyProtocolError(f"INET header with only {length} bytes of addresses")
        src_port, dst_port = struct.unpack_from("!HH", payload, 8)
        source = (str(ipaddress.IPv4Address(payload[0:4])), src_port)
        destination = (str(ipaddress.IPv4Address(payload[4:8])), dst_port)
    elif address_family == FAMILY_INET6:
        block = IPV6_ADDRESS_BLOCK_BYTES
        if length < block:
            raise ProxyProtocolError(f"INET6 header with only {length} bytes of addresses")
        src_port, dst_port = struct.unpack_from("!HH", payload, 32)
        source = (str(ipaddress.IPv6Address(payload[0:16])), src_port)
        destination = (str(ipaddress.IPv6Address(payload[16:32])), dst_port)
    elif address_family == FAMILY_UNSPEC:
        block = 0
    else:
        raise ProxyProtocolError(f"unsupported address family 0x{family:02x}")
    tlvs: dict[int, bytes] = {}
    offset = block
    while offset < length:
        if offset + 3 > length:
            raise ProxyProtocolError("truncated TLV header")
        kind, size = struct.unpack_from("!BH", payload, offset)
        if offset + 3 + size > length:
            raise ProxyProtocolError(f"TLV 0x{kind:02x} runs past the header")
        tlvs[kind] = payload[offset + 3:offset + 3 + size]
        offset += 3 + size
    if command == COMMAND_LOCAL:
        return ProxyHeader("LOCAL", None, None, tlvs, total)
    return ProxyHeader("PROXY", source, destination, tlvs, total)


def unique_id_tlv(value: str) -> tuple[int, bytes]:
    """PP2_TYPE_UNIQUE_ID carrying `value` (truncated to the specification's 128 bytes)."""
    return PP2_TYPE_UNIQUE_ID, value.encode("utf-8")[:MAX_UNIQUE_ID_BYTES]
