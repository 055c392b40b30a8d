"""The SAL wire codec: round trips, sizes, strict decoding, encode validation, authentication."""

from __future__ import annotations

import dataclasses
import os
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serval.core.ids import FlowID, ServiceID
from serval.core.wire import (
    SOURCE_MAX_ADDRESSES,
    Address,
    AuthExt,
    ControlExt,
    ControlFlags,
    EstablishMode,
    MigrateExt,
    OriginExt,
    Protocol,
    RegisterExt,
    RegisterOp,
    SalPacket,
    ServiceExt,
    SourceExt,
    TransportExt,
    decode,
    encode,
    flow_key,
    internet_checksum,
    sign,
    verify,
)
from serval.errors import WireFormatError

MAX_EXAMPLES = 10_000 if os.environ.get("CI") else 1_000
FUZZ = settings(
    max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

CLIENT_FLOW = FlowID(0x11111111)
SERVER_FLOW = FlowID(0x22222222)
CLIENT_NONCE = bytes(range(8))
SERVER_NONCE = bytes(range(8, 16))
WEB = ServiceID.from_name("web.example")
DOMAIN_KEY = b"domain key of the test domain.."
PER_FLOW_KEY = flow_key(CLIENT_NONCE, SERVER_NONCE, CLIENT_FLOW, SERVER_FLOW)


def addr(family: int, host: int) -> Address:
    return IPv4Address(f"192.0.2.{host}") if family == 4 else IPv6Address(f"2001:db8::{host}")


def restamp(data: bytes) -> bytes:
    """`data` with its SAL checksum recomputed, so the parser proper sees the mutation."""
    if len(data) < 12 or data[8] < 3 or data[8] * 4 > len(data):
        return data
    header = data[: data[8] * 4]
    check = internet_checksum(header[:10] + b"\x00\x00" + header[12:])
    return data[:10] + check.to_bytes(2, "big") + data[12:]


def expect_error(data: bytes, field: str) -> WireFormatError:
    with pytest.raises(WireFormatError) as caught:
        decode(data)
    assert caught.value.field == field, str(caught.value)
    return caught.value


# -- one packet of every kind ---------------------------------------------------------------


def transport(family: int, mode: EstablishMode = EstablishMode.REPAIR) -> TransportExt:
    return TransportExt(
        mode=mode,
        isn=0xDEADBEEF,
        mss=1460,
        window_scale=7,
        sack=True,
        timestamps=True,
        window=65535,
        address=addr(family, 1),
        port=40000,
        token=bytes(range(16)) if mode is EstablishMode.HANDSHAKE else bytes(16),
    )


def packet_kinds(family: int) -> dict[str, tuple[SalPacket, int]]:
    """Every packet kind with its expected encoded size (the table in docs/protocol.md)."""
    a = 4 if family == 4 else 16  # address bytes
    control_syn = ControlExt(ControlFlags.SYN, 100, 0, CLIENT_NONCE)
    rsyn = SalPacket(
        CLIENT_FLOW,
        SERVER_FLOW,
        control=ControlExt(ControlFlags.RSYN, 102, 500, CLIENT_NONCE),
        migrate=MigrateExt(rcv_nxt=123456, window_edge=123456 + 65535, address=addr(family, 9),
                           port=40001),
    )  # fmt: skip
    rsyn_ack = SalPacket(
        SERVER_FLOW,
        CLIENT_FLOW,
        control=ControlExt(ControlFlags.RSYN | ControlFlags.ACK, 501, 103, SERVER_NONCE),
        migrate=MigrateExt(rcv_nxt=654321, window_edge=654321 + (1 << 20), address=addr(family, 2),
                           port=443),
    )  # fmt: skip
    registration = RegisterExt(
        op=RegisterOp.REGISTER,
        service=WEB.with_prefix(24),
        address=addr(family, 2),
        weight=10,
        priority=1,
        lifetime_s=50,
        sequence=2**40 + 7,
    )
    return {
        "syn": (
            SalPacket(
                CLIENT_FLOW,
                0,
                control=control_syn,
                services=(ServiceExt(WEB),),
                transport=transport(family),
            ),
            12 + 20 + 36 + 36 + a,
        ),
        "syn from a translator (ORIGIN)": (
            SalPacket(
                CLIENT_FLOW,
                0,
                control=control_syn,
                services=(ServiceExt(WEB),),
                transport=transport(family),
                origin=OriginExt(addr(family, 77), 51234),
            ),
            12 + 20 + 36 + 36 + a + 8 + a,
        ),
        "syn handshake mode": (
            SalPacket(
                CLIENT_FLOW,
                0,
                control=control_syn,
                services=(ServiceExt(WEB),),
                transport=transport(family, EstablishMode.HANDSHAKE),
            ),
            12 + 20 + 36 + 36 + a,
        ),
        "syn-ack": (
            SalPacket(
                SERVER_FLOW,
                CLIENT_FLOW,
                control=ControlExt(ControlFlags.SYN | ControlFlags.ACK, 500, 101, SERVER_NONCE),
                source=SourceExt((addr(family, 1), addr(family, 254), addr(family, 2))),
                transport=transport(family),
            ),
            12 + 20 + (4 + 4 + 3 * a) + 36 + a,
        ),
        "ack": (
            SalPacket(
                CLIENT_FLOW,
                SERVER_FLOW,
                control=ControlExt(ControlFlags.ACK, 101, 501, CLIENT_NONCE),
            ),
            32,
        ),
        "fin": (
            SalPacket(
                CLIENT_FLOW,
                SERVER_FLOW,
                control=ControlExt(ControlFlags.FIN | ControlFlags.ACK, 101, 501, CLIENT_NONCE),
            ),
            32,
        ),
        "rst": (
            SalPacket(
                SERVER_FLOW,
                CLIENT_FLOW,
                control=ControlExt(ControlFlags.RST | ControlFlags.ACK, 501, 102, SERVER_NONCE),
            ),
            32,
        ),
        "refuse (repair 4-tuple conflict)": (
            SalPacket(
                0,
                CLIENT_FLOW,
                control=ControlExt(ControlFlags.RST | ControlFlags.NACK, 0, 101, CLIENT_NONCE),
                services=(ServiceExt(WEB),),
            ),
            68,
        ),
        "rsyn": (sign(rsyn, PER_FLOW_KEY, 0), 12 + 20 + 16 + a + 20),
        "rsyn-ack": (sign(rsyn_ack, PER_FLOW_KEY, 0), 12 + 20 + 16 + a + 20),
        "register": (
            sign(
                SalPacket(0, 0, protocol=Protocol.CONTROL, register=registration),
                DOMAIN_KEY,
                1,
            ),
            12 + 56 + a + 20,
        ),
        "re-register after address change": (
            sign(
                SalPacket(
                    0,
                    0,
                    protocol=Protocol.CONTROL,
                    register=dataclasses.replace(registration, previous_address=addr(4, 77)),
                ),
                DOMAIN_KEY,
                1,
            ),
            12 + 56 + a + 4 + 20,
        ),
        "unregister": (
            sign(
                SalPacket(
                    0,
                    0,
                    protocol=Protocol.CONTROL,
                    register=dataclasses.replace(registration, op=RegisterOp.UNREGISTER, weight=0),
                ),
                DOMAIN_KEY,
                1,
            ),
            12 + 56 + a + 20,
        ),
        "unconnected datagram": (
            SalPacket(
                CLIENT_FLOW,
                0,
                protocol=Protocol.UDP,
                services=(ServiceExt(WEB), ServiceExt(ServiceID.from_name("client.example"))),
                payload=b"hello, service",
            ),
            12 + 36 + 36 + len(b"hello, service"),
        ),
    }


KINDS = [(family, kind) for family in (4, 6) for kind in packet_kinds(family)]


@pytest.mark.parametrize(("family", "kind"), KINDS)
def test_every_packet_kind_round_trips(family: int, kind: str) -> None:
    packet, size = packet_kinds(family)[kind]
    data = encode(packet)
    assert len(data) == size
    assert data[8] * 4 == size - len(packet.payload)  # shl counts 32-bit words of header
    decoded = decode(data)
    assert decoded == packet
    assert encode(decoded) == data


def test_control_and_service_layout_match_serval_v2() -> None:
    packet, _ = packet_kinds(4)["syn"]
    data = encode(packet)
    assert struct.unpack_from("!IIBB", data) == (CLIENT_FLOW, 0, 108 // 4, 6)
    control = data[12:32]
    assert control[:4] == bytes([0x10, 20, 0x80, 0])
    assert struct.unpack_from("!II8s", control, 4) == (100, 0, CLIENT_NONCE)
    service = data[32:68]
    assert service[:4] == bytes([0x20, 36, 1, 0])  # prefix length 256 in the reserved bytes
    assert service[4:] == WEB.value


def test_decoded_flow_ids_are_flow_ids() -> None:
    packet = decode(encode(packet_kinds(4)["ack"][0]))
    assert isinstance(packet.src_flow, FlowID)
    assert isinstance(packet.dst_flow, FlowID)
    syn = decode(encode(packet_kinds(4)["syn"][0]))
    assert syn.dst_flow == 0
    assert syn.flags == ControlFlags.SYN
    assert syn.destination_service == WEB


def test_internet_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries).
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert internet_checksum(b"\x01") == 0xFEFF  # odd length is padded with a zero byte


def test_header_checksum_verifies_as_zero() -> None:
    data = encode(packet_kinds(6)["syn-ack"][0])
    assert internet_checksum(data[: data[8] * 4]) == 0


# -- arbitrary valid packets ----------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
service_ids = st.builds(ServiceID, st.binary(min_size=32, max_size=32), st.integers(0, 256))
controls = st.builds(
    ControlExt,
    flags=st.integers(0, 63).map(lambda bits: ControlFlags(bits << 2)),
    verno=u32,
    ackno=u32,
    nonce=st.binary(min_size=8, max_size=8),
)


@st.composite
def transports(draw: st.DrawFn) -> TransportExt:
    mode = draw(st.sampled_from(EstablishMode))
    return TransportExt(
        mode=mode,
        isn=draw(u32),
        mss=draw(st.integers(1, 2**16 - 1)),
        window_scale=draw(st.none() | st.integers(0, 14)),
        sack=draw(st.booleans()),
        timestamps=draw(st.booleans()),
        window=draw(u32),
        address=draw(addresses),
        port=draw(u16),
        token=(
            bytes(16) if mode is EstablishMode.REPAIR else draw(st.binary(min_size=16, max_size=16))
        ),
    )


@st.composite
def registrations(draw: st.DrawFn) -> RegisterExt:
    op = draw(st.sampled_from(RegisterOp))
    return RegisterExt(
        op=op,
        service=draw(service_ids),
        address=draw(addresses),
        weight=draw(st.integers(1 if op is RegisterOp.REGISTER else 0, 2**16 - 1)),
        priority=draw(u16),
        lifetime_s=draw(u16),
        sequence=draw(st.integers(0, 2**64 - 1)),
        previous_address=draw(st.none() | addresses),
    )


packets = st.builds(
    SalPacket,
    src_flow=u32,
    dst_flow=u32,
    protocol=st.sampled_from(Protocol),
    control=st.none() | controls,
    services=st.lists(st.builds(ServiceExt, service_ids), max_size=2).map(tuple),
    source=st.none()
    | st.builds(
        SourceExt, st.lists(addresses, min_size=1, max_size=SOURCE_MAX_ADDRESSES).map(tuple)
    ),
    transport=st.none() | transports(),
    migrate=st.none() | st.builds(MigrateExt, u32, u32, addresses, u16),
    register=st.none() | registrations(),
    auth=st.none() | st.builds(AuthExt, u16, st.binary(min_size=16, max_size=16)),
    origin=st.none() | st.builds(OriginExt, addresses, st.integers(1, 2**16 - 1)),
    payload=st.binary(max_size=64),
).map(lambda packet: _origin_only_in_a_syn(packet))


def _origin_only_in_a_syn(packet: SalPacket) -> SalPacket:
    """ORIGIN is valid only in a SYN (and never IPv4-mapped): make generated packets so."""
    origin = packet.origin
    if origin is None:
        return packet
    if isinstance(origin.address, IPv6Address) and origin.address.ipv4_mapped is not None:
        origin = OriginExt(origin.address.ipv4_mapped, origin.port)
    control = packet.control or ControlExt(ControlFlags.SYN, 0, 0, CLIENT_NONCE)
    return dataclasses.replace(packet, origin=origin,
                               control=dataclasses.replace(control, flags=ControlFlags.SYN))


@settings(max_examples=MAX_EXAMPLES // 5, deadline=None)
@given(packets)
def test_any_valid_packet_round_trips(packet: SalPacket) -> None:
    data = encode(packet)
    assert decode(data) == packet
    assert encode(decode(data)) == data


# -- robustness: nothing but WireFormatError, and accepted input is canonical ---------------


def _decode_only_wire_errors(data: bytes) -> None:
    try:
        packet = decode(data)
    except WireFormatError as error:
        assert error.field  # always names a field
        return
    # Accepted input is the one canonical encoding of what it decodes to.
    assert encode(packet) == data


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_wire_format_error(data: bytes) -> None:
    _decode_only_wire_errors(data)


@FUZZ
@given(
    src=u32,
    dst=u32,
    protocol=st.sampled_from([0, 6, 17, 1, 255]),
    words=st.lists(st.binary(min_size=4, max_size=4), max_size=60),
    payload=st.binary(max_size=8),
)
def test_arbitrary_extensions_behind_a_valid_base_header(
    src: int, dst: int, protocol: int, words: list[bytes], payload: bytes
) -> None:
    # Random bytes almost never pass the checksum; stamp it so the extension parser is fuzzed.
    body = b"".join(words)
    header = struct.pack("!IIBBH", src, dst, 3 + len(words), protocol, 0) + body
    _decode_only_wire_errors(restamp(header + payload))


# Generating whole packets costs more than raw bytes, hence half the examples.
@settings(FUZZ, max_examples=MAX_EXAMPLES // 2)
@given(packet=packets, data=st.data())
def test_mutated_packets_raise_only_wire_format_error(
    packet: SalPacket, data: st.DataObject
) -> None:
    encoded = encode(packet)
    mutation = data.draw(st.sampled_from(["flip", "flip+restamp", "truncate", "byte+restamp"]))
    position = data.draw(st.integers(0, len(encoded) - 1))
    if mutation == "truncate":
        mutated = encoded[:position]
    elif mutation == "byte+restamp":
        mutated = restamp(encoded[:position] + bytes([data.draw(st.integers(0, 255))])
                          + encoded[position + 1 :])  # fmt: skip
    else:
        flipped = encoded[position] ^ (1 << data.draw(st.integers(0, 7)))
        mutated = encoded[:position] + bytes([flipped]) + encoded[position + 1 :]
        if mutation == "flip+restamp":
            mutated = restamp(mutated)
    _decode_only_wire_errors(mutated)


def test_every_single_bit_flip_of_a_syn_is_caught_by_the_checksum() -> None:
    data = encode(packet_kinds(6)["syn"][0])
    header_length = data[8] * 4
    for bit in range(header_length * 8):
        if bit // 8 in (8,):  # flipping shl changes the checksummed span: checked elsewhere
            continue
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WireFormatError):
            decode(bytes(mutated))


# -- strict decoding: each rule names its field ---------------------------------------------


def _syn4() -> bytes:
    return encode(packet_kinds(4)["syn"][0])


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return restamp(data[:offset] + new + data[offset + len(new) :])


def test_short_packet() -> None:
    error = expect_error(b"\x00" * 11, "packet")
    assert "11 bytes" in error.message


def test_oversized_packet() -> None:
    expect_error(_syn4() + bytes(65507), "packet")


@pytest.mark.parametrize("shl", [0, 1, 2])
def test_shl_below_base_header(shl: int) -> None:
    expect_error(_patch(bytes(12), 8, bytes([shl])), "shl")


def test_shl_longer_than_packet() -> None:
    expect_error(_patch(bytes(12), 8, bytes([4])), "shl")


def test_bad_checksum() -> None:
    data = bytearray(_syn4())
    data[10] ^= 0xFF
    expect_error(bytes(data), "check")


def test_checksum_covers_header_not_payload() -> None:
    packet, _ = packet_kinds(4)["unconnected datagram"]
    data = encode(packet)
    assert decode(data[:-1] + b"!").payload == packet.payload[:-1] + b"!"


def test_unknown_protocol() -> None:
    expect_error(_patch(_syn4(), 9, b"\x05"), "protocol")


@pytest.mark.parametrize("type_nibble", [0, 3, 10, 15])
def test_unknown_extension_type(type_nibble: int) -> None:
    expect_error(_patch(_syn4(), 12, bytes([type_nibble << 4])), "ext[0].type")


def test_extension_reserved_nibble() -> None:
    expect_error(_patch(_syn4(), 12, b"\x11"), "ext[0].reserved")


@pytest.mark.parametrize("length", [0, 2, 21, 255])
def test_extension_length_not_a_multiple_of_four(length: int) -> None:
    expect_error(_patch(_syn4(), 13, bytes([length])), "ext[0].length")


def test_extension_overrunning_the_header() -> None:
    expect_error(_patch(_syn4(), 13, bytes([252])), "ext[0].length")


def test_wrong_exact_length_of_control() -> None:
    # CONTROL claims 24 bytes: swallow 4 bytes of the SERVICE that follows.
    expect_error(_patch(_syn4(), 13, bytes([24])), "control")


def _raw_packet(*extensions: bytes, protocol: int = 6) -> bytes:
    body = b"".join(extensions)
    return restamp(struct.pack("!IIBBH", 1, 0, 3 + len(body) // 4, protocol, 0) + body)


CONTROL_BYTES = bytes([0x10, 20, 0x80, 0]) + bytes(16)
SERVICE_BYTES = bytes([0x20, 36, 1, 0]) + WEB.value
AUTH_BYTES = bytes([0x80, 20]) + bytes(18)


def test_raw_builder_matches_the_encoder() -> None:
    assert decode(_raw_packet(CONTROL_BYTES, SERVICE_BYTES, AUTH_BYTES)) == SalPacket(
        1,
        0,
        control=ControlExt(ControlFlags.SYN, 0, 0, bytes(8)),
        services=(ServiceExt(WEB),),
        auth=AuthExt(0, bytes(16)),
    )


def test_two_control_extensions() -> None:
    expect_error(_raw_packet(CONTROL_BYTES, CONTROL_BYTES), "control")


def test_three_service_extensions() -> None:
    expect_error(_raw_packet(SERVICE_BYTES, SERVICE_BYTES, SERVICE_BYTES), "service")


def test_two_auth_extensions() -> None:
    expect_error(_raw_packet(AUTH_BYTES, AUTH_BYTES), "auth")


def test_extensions_out_of_order() -> None:
    error = expect_error(_raw_packet(SERVICE_BYTES, CONTROL_BYTES), "ext[1].type")
    assert "ascending" in error.message


def test_control_reserved_bits() -> None:
    expect_error(_raw_packet(bytes([0x10, 20, 0x81, 0]) + bytes(16)), "control.flags")
    expect_error(_raw_packet(bytes([0x10, 20, 0x80, 1]) + bytes(16)), "control.reserved")


def test_service_prefix_out_of_range() -> None:
    raw = bytes([0x20, 36]) + (257).to_bytes(2, "big") + bytes(32)
    expect_error(_raw_packet(raw), "service[0].prefix_bits")


def test_service_bits_after_prefix_must_be_zero() -> None:
    raw = bytes([0x20, 36]) + (8).to_bytes(2, "big") + b"\xab\x01" + bytes(30)
    error = expect_error(_raw_packet(raw), "service[0]")
    assert "after the 8-bit prefix" in error.message


def test_second_service_error_names_its_index() -> None:
    raw = bytes([0x20, 36]) + (8).to_bytes(2, "big") + b"\xab\x01" + bytes(30)
    expect_error(_raw_packet(SERVICE_BYTES, raw), "service[1]")


def _source(count: int, families: bytes, addresses: bytes, length: int | None = None) -> bytes:
    table = families.ljust((len(families) + 3) & ~3, b"\x00")
    size = 4 + len(table) + len(addresses) if length is None else length
    return bytes([0x40, size, count, 0]) + table + addresses


def test_source_mixed_families_decode() -> None:
    raw = _source(2, b"\x04\x06", bytes([10, 0, 0, 1]) + IPv6Address("2001:db8::1").packed)
    packet = decode(_raw_packet(raw))
    assert packet.source == SourceExt((IPv4Address("10.0.0.1"), IPv6Address("2001:db8::1")))


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_source(0, b"", b""), "source.count"),
        (_source(15, b"\x04" * 15, bytes(60)), "source.count"),
        (_source(1, b"\x05", bytes(4)), "source.family[0]"),
        (_source(1, b"\x04\x00\x01\x00", bytes(4)), "source.padding"),
        (_source(1, b"\x04", bytes(16)), "source"),  # IPv4 tag but 16 address bytes
        (_source(2, b"\x04\x04", bytes(4)), "source"),  # two tags, one address
        (bytes([0x40, 8, 1, 1]) + b"\x04\x00\x00\x00", "source.reserved"),
    ],
)
def test_bad_source_extension(raw: bytes, field: str) -> None:
    expect_error(_raw_packet(raw), field)


def _transport_bytes(
    mode: int = 1,
    options: int = 0xC0,
    mss: int = 1460,
    window_scale: int = 7,
    family: int = 4,
    reserved: int = 0,
    token: bytes = bytes(16),
    address: bytes = bytes(4),
) -> bytes:
    return (
        struct.pack("!BBBBIIHBBHH16s", 0x50, 36 + len(address), mode, options, 1, 2, mss,
                    window_scale, family, 80, reserved, token)
        + address
    )  # fmt: skip


def test_transport_builder_is_valid() -> None:
    decoded = decode(_raw_packet(_transport_bytes())).transport
    assert decoded is not None
    assert (decoded.sack, decoded.timestamps, decoded.window_scale) == (True, True, 7)
    no_scaling = decode(_raw_packet(_transport_bytes(window_scale=0xFF))).transport
    assert no_scaling is not None and no_scaling.window_scale is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_transport_bytes(mode=0), "transport.mode"),
        (_transport_bytes(mode=3), "transport.mode"),
        (_transport_bytes(options=0x20), "transport.options"),
        (_transport_bytes(mss=0), "transport.mss"),
        (_transport_bytes(window_scale=15), "transport.window_scale"),
        (_transport_bytes(window_scale=0xFE), "transport.window_scale"),
        (_transport_bytes(family=5), "transport.family"),
        (_transport_bytes(family=6), "transport"),  # IPv6 tag, IPv4-sized address
        (_transport_bytes(reserved=1), "transport.reserved"),
        (_transport_bytes(token=b"\x01" + bytes(15)), "transport.token"),  # REPAIR needs zeros
    ],
)
def test_bad_transport_extension(raw: bytes, field: str) -> None:
    expect_error(_raw_packet(raw), field)


def test_bad_migrate_extension() -> None:
    good = struct.pack("!BBBBIIHH", 0x60, 20, 4, 0, 1, 2, 3, 0) + bytes(4)
    assert decode(_raw_packet(good)).migrate == MigrateExt(1, 2, IPv4Address("0.0.0.0"), 3)
    expect_error(_patch(_raw_packet(good), 12 + 2, b"\x00"), "migrate.family")
    expect_error(_patch(_raw_packet(good), 12 + 3, b"\x01"), "migrate.reserved")
    expect_error(_patch(_raw_packet(good), 12 + 14, b"\x00\x01"), "migrate.reserved")
    expect_error(_patch(_raw_packet(good), 12 + 2, b"\x06"), "migrate")


def _register_bytes(op: int = 1, weight: int = 1, prefix: int = 256, previous: int = 0) -> bytes:
    extra = {0: 0, 4: 4, 6: 16}.get(previous, 0)
    return (
        struct.pack("!BBBBHHHHQ32sBBH", 0x70, 60 + extra, op, 0, prefix, weight, 0, 50, 1,
                    WEB.value if prefix == 256 else bytes(32), 4, previous, 0)
        + bytes(4 + extra)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_register_bytes(op=3), "register.op"),
        (_register_bytes(weight=0), "register.weight"),
        (_register_bytes(prefix=300), "register.service.prefix_bits"),
        (_register_bytes(previous=5), "register.previous_family"),
    ],
)
def test_bad_register_extension(raw: bytes, field: str) -> None:
    assert decode(_raw_packet(_register_bytes())).register is not None
    assert decode(_raw_packet(_register_bytes(previous=6))).register is not None
    expect_error(_raw_packet(raw), field)


def test_unregister_may_have_weight_zero() -> None:
    register = decode(_raw_packet(_register_bytes(op=2, weight=0))).register
    assert register is not None and register.op is RegisterOp.UNREGISTER


def test_refuse_layout_matches_the_docs_example() -> None:
    refuse = SalPacket(0, FlowID(0x25A), control=ControlExt(
        ControlFlags.RST | ControlFlags.NACK, 0, 1001, b"\x07" * 8), services=(ServiceExt(WEB),))
    data = encode(refuse)
    assert data[:4] == bytes(4) and data[4:10] == bytes.fromhex("0000025a1106")
    assert data[12:32] == bytes.fromhex("10141800" "00000000" "000003e9") + b"\x07" * 8
    assert data[32:36] == bytes.fromhex("20240100") and len(data) == 68


def test_origin_layout() -> None:
    packet, size = packet_kinds(4)["syn from a translator (ORIGIN)"]
    data = encode(packet)
    docs_example = encode(dataclasses.replace(
        packet, origin=OriginExt(IPv4Address("198.51.100.23"), 40123)))
    assert docs_example[-12:] == bytes.fromhex("900c04009cbb0000c6336417")
    origin = data[size - 12 :]  # ORIGIN (type 9) is the last extension
    assert origin == bytes([0x90, 12, 4, 0]) + (51234).to_bytes(2, "big") + bytes(2) + bytes(
        [192, 0, 2, 77])
    packet6, size6 = packet_kinds(6)["syn from a translator (ORIGIN)"]
    origin6 = encode(packet6)[size6 - 24 :]
    assert origin6[:8] == bytes([0x90, 24, 6, 0]) + (51234).to_bytes(2, "big") + bytes(2)
    assert origin6[8:] == addr(6, 77).packed


def _origin_bytes(family: int = 4, reserved: int = 0, port: int = 443, reserved2: int = 0,
                  address: bytes = bytes([198, 51, 100, 7])) -> bytes:
    return struct.pack("!BBBBHH", 0x90, 8 + len(address), family, reserved, port,
                       reserved2) + address


def test_origin_builder_is_valid() -> None:
    packet = decode(_raw_packet(CONTROL_BYTES, SERVICE_BYTES, _origin_bytes()))
    assert packet.origin == OriginExt(IPv4Address("198.51.100.7"), 443)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_origin_bytes(family=5), "origin.family"),
        (_origin_bytes(family=6), "origin"),  # IPv6 tag, IPv4-sized address
        (_origin_bytes(family=4, address=bytes(16)), "origin"),  # IPv4 tag, 16 bytes
        (_origin_bytes(reserved=1), "origin.reserved"),
        (_origin_bytes(reserved2=0x100), "origin.reserved"),
        (_origin_bytes(port=0), "origin.port"),
        (_origin_bytes(family=6, address=IPv6Address("::ffff:198.51.100.7").packed),
         "origin.address"),  # one address, one encoding: IPv4 goes as family 4
        (bytes([0x90, 4, 4, 0]), "origin"),  # shorter than its fixed part
    ],
)  # fmt: skip
def test_bad_origin_extension(raw: bytes, field: str) -> None:
    expect_error(_raw_packet(CONTROL_BYTES, SERVICE_BYTES, raw), field)


@pytest.mark.parametrize(
    "control",
    [
        None,  # no CONTROL at all
        bytes([0x10, 20, 0xA0, 0]) + bytes(16),  # SYN-ACK
        bytes([0x10, 20, 0x20, 0]) + bytes(16),  # ACK
        bytes([0x10, 20, 0x88, 0]) + bytes(16),  # SYN|RST
    ],
)
def test_origin_only_in_a_syn(control: bytes | None) -> None:
    extensions = ([] if control is None else [control]) + [_origin_bytes()]
    error = expect_error(_raw_packet(*extensions), "origin")
    assert "only a SYN" in error.message


def test_two_origins_and_order() -> None:
    expect_error(_raw_packet(CONTROL_BYTES, _origin_bytes(), _origin_bytes()), "origin")
    error = expect_error(_raw_packet(CONTROL_BYTES, _origin_bytes(), AUTH_BYTES), "ext[2].type")
    assert "ascending" in error.message


# -- encode validates -----------------------------------------------------------------------


def _encode_error(packet: SalPacket, field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        encode(packet)
    assert caught.value.field == field, str(caught.value)


SYN4 = packet_kinds(4)["syn"][0]
CTRL = ControlExt(ControlFlags.ACK, 1, 1, CLIENT_NONCE)


@pytest.mark.parametrize(
    ("packet", "field"),
    [
        (SalPacket(-1, 0), "src_flow"),
        (SalPacket(1, 2**32), "dst_flow"),
        (SalPacket(1, 0, protocol=5), "protocol"),  # type: ignore[arg-type]
        (SalPacket(1, 0, control=ControlExt(ControlFlags.ACK, 2**32, 0, CLIENT_NONCE)),
         "control.verno"),
        (SalPacket(1, 0, control=ControlExt(ControlFlags.ACK, 0, -1, CLIENT_NONCE)),
         "control.ackno"),
        (SalPacket(1, 0, control=ControlExt(ControlFlags.ACK, 0, 0, bytes(7))), "control.nonce"),
        (SalPacket(1, 0, control=ControlExt(3, 0, 0, CLIENT_NONCE)),  # type: ignore[arg-type]
         "control.flags"),
        (SalPacket(1, 0, control="SYN"), "control"),  # type: ignore[arg-type]
        (SalPacket(1, 0, services=(ServiceExt(WEB),) * 3), "services"),
        (SalPacket(1, 0, services=(ServiceExt("web"),)), "service[0]"),  # type: ignore[arg-type]
        (SalPacket(1, 0, services=(WEB,)), "service[0]"),  # type: ignore[arg-type]
        (SalPacket(1, 0, source=SourceExt(())), "source.addresses"),
        (SalPacket(1, 0, source=SourceExt((IPv4Address("10.0.0.1"),) * 15)), "source.addresses"),
        (SalPacket(1, 0, source=SourceExt(("10.0.0.1",))),  # type: ignore[arg-type]
         "source.addresses[0]"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), mss=0)),
         "transport.mss"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), window_scale=15)),
         "transport.window_scale"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), port=65536)),
         "transport.port"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), sack=1)),  # type: ignore[arg-type]
         "transport.sack"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), token=b"x" * 16)),
         "transport.token"),
        (dataclasses.replace(SYN4, transport=dataclasses.replace(transport(4), mode=0)),  # type: ignore[arg-type]
         "transport.mode"),
        (SalPacket(1, 0, migrate=MigrateExt(2**32, 0, IPv4Address("10.0.0.1"), 1)),
         "migrate.rcv_nxt"),
        (SalPacket(1, 0, register=RegisterExt(RegisterOp.REGISTER, WEB, IPv4Address("10.0.0.1"),
                                              0, 0, 0, 0)),
         "register.weight"),
        (SalPacket(1, 0, register=RegisterExt(RegisterOp.REGISTER, WEB, IPv4Address("10.0.0.1"),
                                              1, 0, 0, 2**64)),
         "register.sequence"),
        (SalPacket(1, 0, auth=AuthExt(2**16, bytes(16))), "auth.key_id"),
        (SalPacket(1, 0, auth=AuthExt(1, bytes(15))), "auth.tag"),
        (dataclasses.replace(SYN4, origin=OriginExt(IPv4Address("198.51.100.7"), 0)),
         "origin.port"),
        (dataclasses.replace(SYN4, origin=OriginExt(IPv4Address("198.51.100.7"), 65536)),
         "origin.port"),
        (dataclasses.replace(SYN4, origin=OriginExt(IPv6Address("::ffff:198.51.100.7"), 1)),
         "origin.address"),
        (dataclasses.replace(SYN4, origin=OriginExt("198.51.100.7", 1)),  # type: ignore[arg-type]
         "origin.address"),
        (dataclasses.replace(SYN4, origin=("198.51.100.7", 1)),  # type: ignore[arg-type]
         "origin"),
        (SalPacket(1, 0, control=CTRL, origin=OriginExt(IPv4Address("198.51.100.7"), 1)),
         "origin"),  # an ACK: ORIGIN is for SYNs only
        (SalPacket(1, 0, origin=OriginExt(IPv4Address("198.51.100.7"), 1)), "origin"),
        (SalPacket(1, 0, payload=bytes(65507 - 11)), "payload"),
        (SalPacket(1, 0, payload="text"), "payload"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_encode_rejects_bad_fields(packet: SalPacket, field: str) -> None:
    _encode_error(packet, field)


def test_encode_rejects_non_packets() -> None:
    with pytest.raises(WireFormatError):
        encode(b"bytes")  # type: ignore[arg-type]


def test_largest_payload_fits() -> None:
    data = encode(SalPacket(1, 0, payload=bytes(65507 - 12)))
    assert len(data) == 65507
    assert len(decode(data).payload) == 65507 - 12


def test_largest_header_fits() -> None:
    six = IPv6Address("2001:db8::1")
    packet = SalPacket(
        1,
        2,
        control=CTRL,
        services=(ServiceExt(WEB), ServiceExt(WEB)),
        source=SourceExt((six,) * SOURCE_MAX_ADDRESSES),
        transport=dataclasses.replace(transport(6), address=six),
        migrate=MigrateExt(1, 2, six, 3),
        register=RegisterExt(RegisterOp.REGISTER, WEB, six, 1, 0, 0, 0, previous_address=six),
        auth=AuthExt(1, bytes(16)),
    )
    data = encode(packet)
    assert data[8] * 4 == len(data) == 540
    assert data[12 + 20 + 72 + 1] == 244  # SOURCE length still fits its byte
    assert decode(data) == packet
    # Every extension type at its largest: only a SYN may add an IPv6 ORIGIN (24 bytes).
    syn = dataclasses.replace(packet, control=ControlExt(ControlFlags.SYN, 1, 0, CLIENT_NONCE),
                              origin=OriginExt(six, 65535))
    data = encode(syn)
    assert data[8] * 4 == len(data) == 564
    assert decode(data) == syn


# -- authentication -------------------------------------------------------------------------


AUTHENTICATED = ["rsyn", "rsyn-ack", "register", "unregister"]


@pytest.mark.parametrize("kind", AUTHENTICATED)
def test_signed_packets_verify_after_the_wire(kind: str) -> None:
    packet, _ = packet_kinds(6)[kind]
    key = PER_FLOW_KEY if kind.startswith("rsyn") else DOMAIN_KEY
    assert packet.auth is not None
    assert verify(packet, key)
    assert verify(decode(encode(packet)), key)


@pytest.mark.parametrize("kind", AUTHENTICATED)
def test_wrong_key_fails(kind: str) -> None:
    packet, _ = packet_kinds(4)[kind]
    other = flow_key(CLIENT_NONCE, SERVER_NONCE, CLIENT_FLOW, FlowID(3))
    assert not verify(packet, other)
    assert not verify(packet, b"another domain key, same length")


@pytest.mark.parametrize("family", [4, 6])
def test_every_bit_flip_of_a_signed_rsyn_is_rejected(family: int) -> None:
    packet, _ = packet_kinds(family)["rsyn"]
    data = encode(packet)
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        # Restamp the checksum so that only the authenticator stands in the way.
        candidate = restamp(bytes(mutated))
        if candidate == data:
            continue  # the flip was in the checksum field, which restamp restored
        try:
            decoded = decode(candidate)
        except WireFormatError:
            continue
        assert not verify(decoded, PER_FLOW_KEY), f"bit {bit} flipped yet verified"


def test_changed_field_fails_verification() -> None:
    packet, _ = packet_kinds(4)["rsyn"]
    assert packet.migrate is not None
    moved = dataclasses.replace(
        packet, migrate=dataclasses.replace(packet.migrate, address=IPv4Address("203.0.113.66"))
    )
    assert not verify(moved, PER_FLOW_KEY)


def test_unsigned_packet_does_not_verify() -> None:
    assert not verify(packet_kinds(4)["ack"][0], PER_FLOW_KEY)


def test_sign_replaces_an_existing_tag_and_records_the_key_id() -> None:
    packet, _ = packet_kinds(4)["register"]
    resigned = sign(packet, DOMAIN_KEY, 7)
    assert resigned.auth is not None and resigned.auth.key_id == 7
    assert verify(resigned, DOMAIN_KEY)
    assert resigned.auth != packet.auth  # the key_id is covered by the MAC


def test_short_keys_are_refused() -> None:
    packet, _ = packet_kinds(4)["ack"]
    with pytest.raises(WireFormatError) as caught:
        sign(packet, b"short", 1)
    assert caught.value.field == "auth.key"


def test_flow_key_is_deterministic_and_binds_every_input() -> None:
    key = flow_key(CLIENT_NONCE, SERVER_NONCE, CLIENT_FLOW, SERVER_FLOW)
    assert len(key) == 32
    assert key == PER_FLOW_KEY
    variants = {
        flow_key(SERVER_NONCE, CLIENT_NONCE, CLIENT_FLOW, SERVER_FLOW),
        flow_key(CLIENT_NONCE, SERVER_NONCE, SERVER_FLOW, CLIENT_FLOW),
        flow_key(CLIENT_NONCE, bytes(8), CLIENT_FLOW, SERVER_FLOW),
        flow_key(CLIENT_NONCE, SERVER_NONCE, CLIENT_FLOW, SERVER_FLOW, domain_key=DOMAIN_KEY),
    }
    assert key not in variants
    assert len(variants) == 4


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((bytes(7), SERVER_NONCE, 1, 2), "client_nonce"),
        ((CLIENT_NONCE, bytes(9), 1, 2), "server_nonce"),
        ((CLIENT_NONCE, SERVER_NONCE, 2**32, 2), "client_flow"),
        ((CLIENT_NONCE, SERVER_NONCE, 1, -2), "server_flow"),
    ],
)
def test_flow_key_rejects_bad_inputs(args: tuple[bytes, bytes, int, int], field: str) -> None:
    with pytest.raises(WireFormatError) as caught:
        flow_key(*args)
    assert caught.value.field == field
