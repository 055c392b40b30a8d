"""PROXY protocol v2: exact bytes, round trips, malformed input, and an unmodified nginx parsing
what we write."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from translator_testlib import Nginx, free_port

from translator.proxy_protocol import (
    PP2_TYPE_UNIQUE_ID,
    SIGNATURE,
    ProxyProtocolError,
    decode_v2,
    encode_v2,
    unique_id_tlv,
)


def test_ipv4_header_exact_bytes() -> None:
    header = encode_v2(("192.0.2.1", 56324), ("198.51.100.2", 443))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21"  # version 2, PROXY
        + b"\x11"  # INET, STREAM
        + b"\x00\x0c"  # 12 bytes follow
        + bytes([192, 0, 2, 1]) + bytes([198, 51, 100, 2])
        + struct.pack("!HH", 56324, 443)
    )


def test_ipv6_header_exact_layout() -> None:
    header = encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2))
    assert header[12:16] == b"\x21\x21\x00\x24"  # PROXY, INET6/STREAM, 36 bytes
    assert header[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert header[32:48] == socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    assert header[48:52] == b"\x00\x01\x00\x02"
    assert len(header) == 52


def test_mixed_families_are_written_as_ipv6_with_mapped_ipv4() -> None:
    header = encode_v2(("192.0.2.7", 1000), ("2001:db8::9", 80))
    decoded = decode_v2(header)
    assert decoded is not None
    assert decoded.source == ("::ffff:c000:207", 1000)
    assert decoded.destination == ("2001:db8::9", 80)


def test_local_header_without_source() -> None:
    header = encode_v2(None, None)
    assert header == SIGNATURE + b"\x20\x00\x00\x00"
    decoded = decode_v2(header)
    assert decoded is not None and decoded.command == "LOCAL" and decoded.source is None


def test_tlvs_round_trip() -> None:
    header = encode_v2(("10.0.0.1", 5), ("10.0.0.2", 6), [unique_id_tlv("serval-flow-42"),
                                                          (0xE0, b"\x00\x01")])
    decoded = decode_v2(header + b"GET / HTTP/1.0\r\n")
    assert decoded is not None
    assert decoded.tlvs == {PP2_TYPE_UNIQUE_ID: b"serval-flow-42", 0xE0: b"\x00\x01"}
    assert decoded.length == len(header)


def test_unique_id_is_capped_at_128_bytes() -> None:
    assert len(unique_id_tlv("x" * 500)[1]) == 128


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 65535),
)
def test_round_trip_any_addresses(src: object, sport: int, dst: object, dport: int) -> None:
    decoded = decode_v2(encode_v2((str(src), sport), (str(dst), dport)))
    assert decoded is not None and decoded.command == "PROXY"
    assert decoded.source is not None and decoded.destination is not None
    import ipaddress

    def normal(text: str) -> ipaddress.IPv6Address | ipaddress.IPv4Address:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped
        return address

    assert normal(decoded.source[0]) == normal(str(src)) and decoded.source[1] == sport
    assert normal(decoded.destination[0]) == normal(str(dst))
    assert decoded.destination[1] == dport


def test_decoder_needs_more_bytes_then_completes() -> None:
    header = encode_v2(("10.0.0.1", 5), ("10.0.0.2", 6))
    for cut in range(len(header)):
        assert decode_v2(header[:cut]) is None
    assert decode_v2(header) is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no PROXY v2 signature"),
        (SIGNATURE + b"\x11\x11\x00\x00", "version nibble 1"),
        (SIGNATURE + b"\x2f\x11\x00\x00", "unknown command 15"),
        (SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "INET header with only 4 bytes"),
        (SIGNATURE + b"\x21\x31\x00\x00", "unsupported address family"),
        (SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x05\x00", "truncated TLV"),
        (SIGNATURE + b"\x21\x11\x00\x0f" + b"\x00" * 12 + b"\x05\x00\x09", "runs past"),
    ],
)
def test_malformed_headers_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode_v2(data)


def test_encoder_rejects_bad_input() -> None:
    with pytest.raises(ProxyProtocolError, match="source: not an IP address"):
        encode_v2(("example.com", 1), None)
    with pytest.raises(ProxyProtocolError, match=r"port must be 0\.\.65535"):
        encode_v2(("10.0.0.1", 70000), None)


# --------------------------------------------------------------------------------------------
# a real parser: nginx


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    if not Nginx.available():
        pytest.skip("nginx is not installed (scripts/install-deps.sh installs it)")
    server = Nginx(tmp_path, free_port(), free_port()).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (("203.0.113.7", 4242), "203.0.113.7 4242"),
        (("2001:db8::77", 61000), "2001:db8::77 61000"),
    ],
)
def test_nginx_reads_the_original_client_from_our_header(
    nginx: Nginx, source: tuple[str, int], expected: str
) -> None:
    header = encode_v2(source, ("127.0.0.1", nginx.proxy_port), [unique_id_tlv("serval-flow-1")])
    with socket.create_connection(("127.0.0.1", nginx.proxy_port), timeout=10) as sock:
        sock.sendall(header + b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    assert body.decode().strip() == expected
