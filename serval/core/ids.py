"""Identifiers: serviceIDs, flowIDs, nonces and tokens.

A **serviceID** names a service, not a host: 256 bits, compared as a bit string from the most
significant bit of byte 0 onwards (the original Serval's `CHECK_BIT` order), with a prefix length
saying how many leading bits are significant. Bits past the prefix are always zero, so two
serviceIDs with the same significant bits compare and hash equal.

A **flowID** is a host-local 32-bit number naming one end of a flow. Each host picks its own and
the peer echoes it as `dst_flowid`. The original allocated them from a global counter, which made
them predictable (serval-protocol.md section 11); ours are random and never 0, because 0 on the
wire means "not known yet" (SYN, unconnected datagram).

Nonces and tokens are random byte strings. The caller passes the `random.Random` to draw from
(the core never uses global randomness); a daemon passes `random.SystemRandom()` so that values
an attacker must not guess come from the OS generator.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from serval.errors import FlowIDError, ServiceIDError

SERVICE_ID_BYTES = 32
SERVICE_ID_BITS = SERVICE_ID_BYTES * 8
FLOW_ID_MAX = 2**32 - 1
NONCE_BYTES = 8
TOKEN_BYTES = 16

# A decimal serviceID fills the first 32-bit word, as the original tools did (`htonl(N)`).
_DECIMAL_ID_MAX = 2**32 - 1
_MAX_NAME_CHARS = 253  # longest DNS name in text form
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_NAME_RE = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _mask(value: bytes, prefix_bits: int) -> bytes:
    """Zero every bit at or after position `prefix_bits` (MSB-first from byte 0)."""
    as_int = int.from_bytes(value, "big")
    keep = ((1 << prefix_bits) - 1) << (SERVICE_ID_BITS - prefix_bits)
    return (as_int & keep).to_bytes(SERVICE_ID_BYTES, "big")


@dataclass(frozen=True)
class ServiceID:
    """A 256-bit serviceID with its prefix length; bits past the prefix are zero."""

    value: bytes
    prefix_bits: int = SERVICE_ID_BITS

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes | bytearray) or len(self.value) != SERVICE_ID_BYTES:
            raise ServiceIDError(
                f"serviceID value must be {SERVICE_ID_BYTES} bytes, got {self.value!r}"
            )
        if (
            isinstance(self.prefix_bits, bool)
            or not isinstance(self.prefix_bits, int)
            or not 0 <= self.prefix_bits <= SERVICE_ID_BITS
        ):
            raise ServiceIDError(
                f"serviceID prefix length must be 0..{SERVICE_ID_BITS}, got {self.prefix_bits!r}"
            )
        # Frozen dataclass: normalise through object.__setattr__ once, at construction.
        object.__setattr__(self, "value", _mask(bytes(self.value), self.prefix_bits))

    # -- construction from text -------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> ServiceID:
        """Parse any textual serviceID form, with an optional `/BITS` prefix length.

        Forms, tried in this order on the part before `/`:
        - `default`: all zeros, prefix length 0 (the catch-all rule);
        - exactly 64 hex digits: the full value, byte 0 first;
        - `0x` + 1..64 hex digits: left-aligned, a trailing odd digit is the HIGH nibble;
        - a decimal number below 2**32: the first 32 bits, big-endian, the rest zero;
        - a DNS-like name (`web.example`): SHA-256 of the lower-cased name (`from_name`).
        Raises `ServiceIDError` quoting the input when none applies.
        """
        if not isinstance(text, str):
            raise ServiceIDError(f"serviceID must be text, got {text!r}")
        body = text.strip()
        prefix_bits: int | None = None
        if "/" in body:
            body, bits_text = body.rsplit("/", 1)
            prefix_bits = _parse_prefix_bits(bits_text, text)
        if not body:
            raise ServiceIDError(f"empty serviceID in {text!r}")

        if body == "default":
            return cls(bytes(SERVICE_ID_BYTES), 0 if prefix_bits is None else prefix_bits)
        full = SERVICE_ID_BITS if prefix_bits is None else prefix_bits
        if len(body) == 2 * SERVICE_ID_BYTES and set(body) <= _HEX_DIGITS:
            return cls(bytes.fromhex(body), full)
        if body[:2] in ("0x", "0X"):
            return cls(_parse_left_aligned_hex(body[2:], text), full)
        if body.isascii() and body.isdigit():
            number = int(body)
            if number > _DECIMAL_ID_MAX:
                raise ServiceIDError(
                    f"decimal serviceID must be below 2**32 (it fills the first 32 bits), "
                    f"got {text!r}"
                )
            return cls(number.to_bytes(4, "big") + bytes(SERVICE_ID_BYTES - 4), full)
        if set(body) <= _HEX_DIGITS and len(body) > SERVICE_ID_BYTES:
            # Hashing this as a name would silently hide a mistyped hex serviceID.
            raise ServiceIDError(
                f"{text!r} looks like hex but has {len(body)} digits: a full serviceID has "
                f"{2 * SERVICE_ID_BYTES}; write 0x... for a left-aligned prefix"
            )
        return cls(_name_digest(body, repr(text)), full)

    @classmethod
    def from_name(cls, name: str, prefix_bits: int = SERVICE_ID_BITS) -> ServiceID:
        """SHA-256 of a DNS-like name (letters, digits, '-', '.'; at least one letter).

        Names are case-insensitive, as in DNS: `Web.Example` and `web.example` are one service.
        """
        return cls(_name_digest(name, repr(name)), prefix_bits)

    # -- queries ------------------------------------------------------------------------------

    def bit(self, index: int) -> int:
        """Bit `index` (0 = most significant bit of byte 0) as 0 or 1."""
        if not 0 <= index < SERVICE_ID_BITS:
            raise ServiceIDError(f"bit index must be 0..{SERVICE_ID_BITS - 1}, got {index}")
        return (self.value[index // 8] >> (7 - index % 8)) & 1

    def contains(self, other: ServiceID) -> bool:
        """True when `other` lies inside this prefix (at least as long, same leading bits)."""
        return other.prefix_bits >= self.prefix_bits and (
            _mask(other.value, self.prefix_bits) == self.value
        )

    def with_prefix(self, prefix_bits: int) -> ServiceID:
        """The same value cut to `prefix_bits` (bits past a shorter prefix are lost)."""
        return ServiceID(self.value, prefix_bits)

    def __str__(self) -> str:
        text = self.value.hex()
        if self.prefix_bits < SERVICE_ID_BITS:
            text += f"/{self.prefix_bits}"
        return text

    def __repr__(self) -> str:
        return f"ServiceID('{self}')"


DEFAULT_SERVICE = ServiceID(bytes(SERVICE_ID_BYTES), 0)


def _name_digest(name: str, quoted: str) -> bytes:
    """SHA-256 of a lower-cased DNS-like name; `quoted` is the user's text for errors."""
    if not isinstance(name, str) or not name:
        raise ServiceIDError(f"service name must be non-empty text, got {quoted}")
    if len(name) > _MAX_NAME_CHARS:
        raise ServiceIDError(f"service name is longer than {_MAX_NAME_CHARS} characters: {quoted}")
    if not name.isascii() or _NAME_RE.fullmatch(name) is None:
        raise ServiceIDError(
            f"not a serviceID: {quoted} is neither 64 hex digits, 0x-hex, a decimal number, "
            "'default', nor a name of letters, digits, '-' and non-empty '.'-separated labels"
        )
    if not any(ch.isalpha() for ch in name):
        raise ServiceIDError(
            f"service name must contain a letter (to tell it from a number): {quoted}"
        )
    return hashlib.sha256(name.lower().encode("ascii")).digest()


def _parse_prefix_bits(bits_text: str, original: str) -> int:
    if not (bits_text.isascii() and bits_text.isdigit()):
        raise ServiceIDError(f"prefix length after '/' must be a number 0..256 in {original!r}")
    bits = int(bits_text)
    if bits > SERVICE_ID_BITS:
        raise ServiceIDError(f"prefix length must be 0..{SERVICE_ID_BITS}, got {original!r}")
    return bits


def _parse_left_aligned_hex(digits: str, original: str) -> bytes:
    if not digits:
        raise ServiceIDError(f"no hex digits after 0x in {original!r}")
    if not set(digits) <= _HEX_DIGITS:
        raise ServiceIDError(f"invalid hex digit after 0x in {original!r}")
    if len(digits) > 2 * SERVICE_ID_BYTES:
        raise ServiceIDError(
            f"too many hex digits ({len(digits)}, at most {2 * SERVICE_ID_BYTES}) in {original!r}"
        )
    if len(digits) % 2:
        digits += "0"  # a trailing odd digit is the high nibble, as in the original serval_pton
    raw = bytes.fromhex(digits)
    return raw + bytes(SERVICE_ID_BYTES - len(raw))


class FlowID(int):
    """A host-local 32-bit flow identifier, 1..2**32-1 (0 on the wire means "unknown")."""

    def __new__(cls, value: int) -> FlowID:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlowIDError(f"flowID must be an integer, got {value!r}")
        if not 1 <= value <= FLOW_ID_MAX:
            raise FlowIDError(f"flowID must be 1..{FLOW_ID_MAX}, got {value}")
        return super().__new__(cls, value)

    @classmethod
    def random(cls, rng: random.Random) -> FlowID:
        """A uniformly random flowID (unpredictable with `random.SystemRandom`)."""
        return cls(rng.randint(1, FLOW_ID_MAX))

    def __repr__(self) -> str:
        return f"FlowID({int(self)})"

    def __str__(self) -> str:
        # int subclasses inherit object.__str__, which would call our __repr__; keep decimal
        # (the original prints flowIDs in decimal too).
        return int.__repr__(self)


def new_nonce(rng: random.Random) -> bytes:
    """A fresh 8-byte connection nonce (each side's own, carried in every CONTROL extension)."""
    return rng.randbytes(NONCE_BYTES)


def new_token(rng: random.Random) -> bytes:
    """A fresh 16-byte one-time token (HANDSHAKE mode connect authorisation)."""
    return rng.randbytes(TOKEN_BYTES)
