"""serviceIDs (every text form, prefixes, errors), flowIDs, nonces and tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serval.core.ids import (
    DEFAULT_SERVICE,
    FLOW_ID_MAX,
    FlowID,
    ServiceID,
    new_nonce,
    new_token,
)
from serval.errors import FlowIDError, ServalError, ServiceIDError

MAX_EXAMPLES = 10_000 if os.environ.get("CI") else 1_000
# Properties of pure functions over a small domain: a fifth of the budget finds the same bugs.
PROPERTY = settings(max_examples=MAX_EXAMPLES // 5, deadline=None)

FULL_HEX = "00112233445566778899aabbccddeeff" * 2

service_ids = st.builds(
    ServiceID, st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=256)
)


def _bits(service: ServiceID) -> str:
    return "".join(f"{byte:08b}" for byte in service.value)


# -- parse: every accepted form ---------------------------------------------------------------


def test_parse_64_hex_digits_is_the_full_value() -> None:
    service = ServiceID.parse(FULL_HEX)
    assert service.value == bytes.fromhex(FULL_HEX)
    assert service.prefix_bits == 256


def test_parse_accepts_uppercase_hex_and_prints_lowercase() -> None:
    service = ServiceID.parse(FULL_HEX.upper())
    assert str(service) == FULL_HEX


def test_parse_0x_hex_is_left_aligned() -> None:
    assert ServiceID.parse("0x1234").value == bytes.fromhex("1234") + bytes(30)
    assert ServiceID.parse("0X" + "ab" * 32).value == b"\xab" * 32


def test_parse_0x_odd_trailing_digit_is_the_high_nibble() -> None:
    # As in the original serval_pton: "5" gives 0x50, "abc" gives ab c0.
    assert ServiceID.parse("0x5").value == b"\x50" + bytes(31)
    assert ServiceID.parse("0xabc").value == b"\xab\xc0" + bytes(30)


def test_parse_default_is_all_zero_prefix_zero() -> None:
    service = ServiceID.parse("default")
    assert service.value == bytes(32)
    assert service.prefix_bits == 0
    assert service == DEFAULT_SERVICE


def test_parse_decimal_fills_the_first_32_bits_big_endian() -> None:
    # The original tools' convention: s_sid32[0] = htonl(N).
    assert ServiceID.parse("88888").value == (88888).to_bytes(4, "big") + bytes(28)
    assert ServiceID.parse("4294967295").value == b"\xff" * 4 + bytes(28)
    assert ServiceID.parse("0").value == bytes(32)


def test_parse_name_is_sha256_of_the_lowercased_name() -> None:
    expected = hashlib.sha256(b"web.example").digest()
    assert ServiceID.parse("web.example").value == expected
    assert ServiceID.parse("Web.Example") == ServiceID.parse("web.example")
    assert ServiceID.from_name("web.example") == ServiceID.parse("web.example")
    assert ServiceID.parse("redis-1").value == hashlib.sha256(b"redis-1").digest()


@pytest.mark.parametrize(
    ("text", "prefix_bits"),
    [
        (FULL_HEX + "/12", 12),
        ("0xff/3", 3),
        ("default/8", 8),
        ("88888/16", 16),
        ("web.example/24", 24),
        ("web.example/0", 0),
        (FULL_HEX + "/256", 256),
    ],
)
def test_every_form_takes_a_prefix_suffix(text: str, prefix_bits: int) -> None:
    service = ServiceID.parse(text)
    assert service.prefix_bits == prefix_bits
    assert _bits(service)[prefix_bits:] == "0" * (256 - prefix_bits)


def test_prefix_suffix_masks_the_bits_after_it() -> None:
    service = ServiceID.parse("ff" * 32 + "/12")
    assert service.value == b"\xff\xf0" + bytes(30)
    assert str(service) == "fff0" + "0" * 60 + "/12"


def test_surrounding_whitespace_is_ignored() -> None:
    assert ServiceID.parse("  web.example/8\n") == ServiceID.parse("web.example/8")


# -- parse: errors say what was wrong and quote the input -----------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("/8", "empty"),
        ("0x", "no hex digits"),
        ("0xzz", "invalid hex digit"),
        ("0x" + "0" * 65, "too many hex digits"),
        ("web.example/257", "prefix length"),
        ("web.example/-1", "prefix length"),
        ("web.example/x", "prefix length"),
        ("web.example/", "prefix length"),
        ("4294967296", "below 2**32"),
        ("1.2.3.4", "must contain a letter"),
        ("-", "must contain a letter"),
        ("web..example", "not a serviceID"),
        (".web", "not a serviceID"),
        ("web.", "not a serviceID"),
        ("web_example", "not a serviceID"),
        ("wéb.example", "not a serviceID"),
        ("a" * 63, "looks like hex"),
        ("ab" * 33, "looks like hex"),
        ("x" * 254, "longer than 253"),
    ],
)
def test_bad_text_raises_service_id_error_quoting_the_input(text: str, reason: str) -> None:
    with pytest.raises(ServiceIDError) as caught:
        ServiceID.parse(text)
    message = str(caught.value)
    assert reason in message
    assert repr(text) in message


def test_service_id_error_is_a_value_error_and_a_serval_error() -> None:
    with pytest.raises(ValueError):
        ServiceID.parse("bad name!")
    with pytest.raises(ServalError):
        ServiceID.parse("bad name!")


def test_parse_rejects_non_text() -> None:
    with pytest.raises(ServiceIDError, match="must be text"):
        ServiceID.parse(b"web.example")  # type: ignore[arg-type]


# -- construction, equality, hashing -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "prefix_bits"),
    [(bytes(31), 256), (bytes(33), 256), (bytes(32), 257), (bytes(32), -1), (bytes(32), True)],
)
def test_constructor_rejects_bad_values(value: bytes, prefix_bits: int) -> None:
    with pytest.raises(ServiceIDError):
        ServiceID(value, prefix_bits)


def test_equal_after_masking_and_hashable() -> None:
    noisy = ServiceID(b"\xab" + b"\xff" * 31, 8)
    clean = ServiceID(b"\xab" + bytes(31), 8)
    assert noisy == clean
    assert len({noisy, clean}) == 1
    assert ServiceID(b"\xab" + bytes(31), 8) != ServiceID(b"\xab" + bytes(31), 9)


def test_service_id_is_frozen() -> None:
    service = ServiceID.parse("web.example")
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.prefix_bits = 3  # type: ignore[misc]


def test_str_and_repr() -> None:
    assert str(ServiceID.parse(FULL_HEX)) == FULL_HEX
    assert str(ServiceID.parse("0xab/8")) == "ab" + "0" * 62 + "/8"
    assert repr(ServiceID.parse("0xab/8")) == f"ServiceID('ab{'0' * 62}/8')"


@PROPERTY
@given(service_ids)
def test_str_parses_back_to_the_same_service_id(service: ServiceID) -> None:
    assert ServiceID.parse(str(service)) == service


# -- prefixes: bit, contains, with_prefix ---------------------------------------------------


def test_bit_is_msb_first_from_byte_zero() -> None:
    service = ServiceID.parse("0x8001")
    assert service.bit(0) == 1
    assert service.bit(1) == 0
    assert service.bit(15) == 1
    assert [service.bit(i) for i in range(16)] == [1] + [0] * 14 + [1]


@pytest.mark.parametrize("index", [-1, 256])
def test_bit_out_of_range(index: int) -> None:
    with pytest.raises(ServiceIDError, match="bit index"):
        DEFAULT_SERVICE.bit(index)


def test_contains() -> None:
    net = ServiceID.parse("0xab/8")
    assert net.contains(ServiceID.parse("0xabcd"))
    assert net.contains(ServiceID.parse("0xab/8"))
    assert net.contains(ServiceID.parse("0xab80/9"))
    assert not net.contains(ServiceID.parse("0xaa"))  # differs in bit 7
    assert not net.contains(ServiceID.parse("0xa0/4"))  # shorter prefix lies outside
    assert DEFAULT_SERVICE.contains(ServiceID.parse("web.example"))
    assert DEFAULT_SERVICE.contains(DEFAULT_SERVICE)
    assert not ServiceID.parse("web.example").contains(DEFAULT_SERVICE)


@PROPERTY
@given(service_ids, service_ids)
def test_contains_matches_the_bitwise_definition(outer: ServiceID, inner: ServiceID) -> None:
    expected = inner.prefix_bits >= outer.prefix_bits and all(
        outer.bit(i) == inner.bit(i) for i in range(outer.prefix_bits)
    )
    assert outer.contains(inner) == expected


@PROPERTY
@given(service_ids, st.integers(min_value=0, max_value=256))
def test_shortening_the_prefix_gives_a_container(service: ServiceID, bits: int) -> None:
    shorter = service.with_prefix(min(bits, service.prefix_bits))
    assert shorter.contains(service)


def test_with_prefix_masks_and_loses_bits() -> None:
    full = ServiceID.parse("ff" * 32)
    assert full.with_prefix(4).value == b"\xf0" + bytes(31)
    assert full.with_prefix(4).with_prefix(256).value == b"\xf0" + bytes(31)


# -- flowIDs, nonces, tokens ----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, FLOW_ID_MAX + 1, True, 1.5, "7"])
def test_flow_id_rejects_out_of_range_and_non_integers(value: object) -> None:
    with pytest.raises(FlowIDError):
        FlowID(value)  # type: ignore[arg-type]


def test_flow_id_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        FlowID(0)


def test_flow_id_is_an_int_printed_in_decimal() -> None:
    flow = FlowID(FLOW_ID_MAX)
    assert flow == FLOW_ID_MAX
    assert str(flow) == f"{flow}" == "4294967295"
    assert repr(flow) == "FlowID(4294967295)"
    assert FlowID(1) == 1


def test_flow_id_random_is_in_range_and_reproducible() -> None:
    draws = [FlowID.random(random.Random(seed)) for seed in range(200)]
    assert all(1 <= flow <= FLOW_ID_MAX for flow in draws)
    assert len(set(draws)) == 200
    assert FlowID.random(random.Random(5)) == FlowID.random(random.Random(5))


def test_flow_id_random_never_zero_with_a_degenerate_rng() -> None:
    class Lowest(random.Random):
        def randint(self, a: int, b: int) -> int:
            return a

    assert FlowID.random(Lowest()) == 1


def test_nonce_and_token_sizes_and_freshness() -> None:
    rng = random.Random(1)
    nonces = {new_nonce(rng) for _ in range(100)}
    tokens = {new_token(rng) for _ in range(100)}
    assert {len(n) for n in nonces} == {8}
    assert {len(t) for t in tokens} == {16}
    assert len(nonces) == len(tokens) == 100
    assert new_nonce(random.Random(3)) == new_nonce(random.Random(3))


def test_nonce_from_system_random() -> None:
    assert len(new_token(random.SystemRandom())) == 16


def test_from_name_validates_and_takes_a_prefix() -> None:
    assert ServiceID.from_name("web.example", 16) == ServiceID.parse("web.example/16")
    with pytest.raises(ServiceIDError, match="must contain a letter"):
        ServiceID.from_name("1.2.3.4")
    with pytest.raises(ServiceIDError, match="'web example'"):
        ServiceID.from_name("web example")
