"""Sealed flow state: how an established flow outlives a servald restart.

Theory of operation
-------------------
A watched stream flow lives in two places: its kernel TCP socket, held by the application (or
the translator's relay), and its SAL state (flowIDs, nonces, control sequence numbers, the
peer's SAL address), held by servald's migration engine. When servald dies the socket goes
on -- the bytes keep flowing -- but the SAL state is gone, so the flow can no longer migrate:
the peer's RSYN names a flowID nobody knows, and a local move has nothing to send.

So servald hands the owner of each watched socket its flow's state, *sealed*: in the `watch`
reply and again in every `migration` `resume` event (a migration changes the 4-tuple, the
addresses and the sequence numbers). The owner keeps the latest one; after a restart it sends
it back with the socket (op `adopt`), and the new servald rebuilds the flow exactly where it
was. The peer's servald notices nothing: same flowIDs, same nonces, same per-flow key.

The seal is HMAC-SHA256 under a 32-byte key only servald can read: a file created 0600 next
to the control socket (`<control socket>.flowkey`) on first start and reused by every later
start, so a restarted servald verifies what its predecessor issued. A blob from elsewhere, or
altered in one bit, is refused. The blob is not encrypted: it holds flowIDs, nonces and
addresses -- all of which travel in clear in SAL headers anyway -- and no key (the per-flow key
is derived again from the nonces and the configured domain key). It has no expiry: it is only
accepted together with a connected socket whose 4-tuple it names, and only once (a flowID that
is already live is refused).

Format (text, URL-safe base64 without padding)::

    version (1 byte, 1) | payload (compact JSON, UTF-8) | HMAC-SHA256(key, version | payload)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from serval.core.flow import FlowExport
from serval.core.ids import NONCE_BYTES, ServiceID
from serval.core.wire import Address
from serval.errors import ServalError, ServiceIDError

__all__ = [
    "FLOW_KEY_BYTES",
    "FLOW_STATE_VERSION",
    "MAX_SEALED_BYTES",
    "SealedFlow",
    "SealedStateError",
    "key_path_for",
    "load_or_create_key",
    "open_sealed",
    "seal",
]

FLOW_STATE_VERSION = 1
FLOW_KEY_BYTES = 32
TAG_BYTES = 32
MAX_SEALED_BYTES = 4096  # a real blob is ~600 characters; anything larger is garbage
KEY_FILE_SUFFIX = ".flowkey"

Endpoint = tuple[str, int]


class SealedStateError(ServalError):
    """A sealed flow state that cannot be used; the message says why (never the blob)."""


@dataclass(frozen=True)
class SealedFlow:
    """Everything `adopt` needs: the Flow's export and what servald knew around it."""

    export: FlowExport
    role: str  # "client" / "server"
    mode: str  # "repair" / "handshake"
    local: Endpoint  # the kernel TCP socket's 4-tuple when the state was issued
    remote: Endpoint

    @property
    def flow(self) -> int:
        return self.export.local_flow


# -- the key ---------------------------------------------------------------------------------


def key_path_for(control_socket: str) -> str:
    """Where servald keeps its flow-state key: beside its control socket (one per servald)."""
    return control_socket + KEY_FILE_SUFFIX


def load_or_create_key(path: str) -> tuple[bytes, bool]:
    """The key in `path`, created (0600, O_EXCL) on first use; (key, created).

    A file that is not a regular file of FLOW_KEY_BYTES owned by us with no group or other
    permissions is not trusted: it is replaced (states sealed under it stop verifying, which
    is the point). OSError when the directory is not writable.
    """
    with contextlib.suppress(FileNotFoundError):
        key = _read_trusted(path)
        if key is not None:
            return key, False
        os.unlink(path)
    key = os.urandom(FLOW_KEY_BYTES)
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    return key, True


def _read_trusted(path: str) -> bytes | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or \
                info.st_mode & 0o077 or info.st_size != FLOW_KEY_BYTES:
            return None
        key = os.read(fd, FLOW_KEY_BYTES + 1)
    finally:
        os.close(fd)
    return key if len(key) == FLOW_KEY_BYTES else None


# -- sealing ---------------------------------------------------------------------------------


def seal(key: bytes, state: SealedFlow) -> str:
    export = state.export
    payload = {
        "service": str(export.service),
        "protocol": export.protocol,
        "client": export.is_client,
        "flow": export.local_flow,
        "peer_flow": export.peer_flow,
        "nonce": export.local_nonce.hex(),
        "peer_nonce": export.peer_nonce.hex(),
        "sal_local": None if export.local_address is None else str(export.local_address),
        "sal_peer": None if export.peer_address is None else str(export.peer_address),
        "iss": export.iss,
        "snd_nxt": export.snd_nxt,
        "rcv_nxt": export.rcv_nxt,
        "last_rcv_verno": export.last_rcv_verno,
        "srtt": export.srtt,
        "rttvar": export.rttvar,
        "role": state.role,
        "mode": state.mode,
        "local": list(state.local),
        "remote": list(state.remote),
    }
    body = bytes([FLOW_STATE_VERSION]) + json.dumps(payload, separators=(",", ":")).encode()
    tag = hmac.new(key, body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(body + tag).rstrip(b"=").decode("ascii")


def open_sealed(key: bytes, text: object) -> SealedFlow:
    """Verify and decode a sealed state; SealedStateError says what is wrong with it."""
    if not isinstance(text, str) or not text:
        raise SealedStateError("state must be a non-empty string")
    if len(text) > MAX_SEALED_BYTES:
        raise SealedStateError(f"state is {len(text)} characters, more than {MAX_SEALED_BYTES}")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SealedStateError("state is not URL-safe base64") from None
    if len(raw) < 1 + TAG_BYTES + 2:
        raise SealedStateError(f"state is truncated ({len(raw)} bytes)")
    if raw[0] != FLOW_STATE_VERSION:
        raise SealedStateError(f"state version {raw[0]} is not {FLOW_STATE_VERSION}")
    body, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
    if not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise SealedStateError("state seal does not verify (not issued by this host's servald, "
                             "truncated or altered)")
    try:
        payload = json.loads(body[1:])
        return _decode(payload)
    except (ValueError, TypeError, KeyError, ServiceIDError) as exc:
        # Verified but unreadable: only a servald of another version could have written it.
        raise SealedStateError(f"state content is not understood: {exc}") from None


def _decode(payload: Any) -> SealedFlow:
    if not isinstance(payload, dict):
        raise TypeError("payload is not an object")
    nonce, peer_nonce = bytes.fromhex(payload["nonce"]), bytes.fromhex(payload["peer_nonce"])
    if len(nonce) != NONCE_BYTES or len(peer_nonce) != NONCE_BYTES:
        raise ValueError("nonce length")
    srtt = payload["srtt"]
    last = payload["last_rcv_verno"]
    export = FlowExport(
        service=ServiceID.parse(str(payload["service"])),
        protocol=int(payload["protocol"]),
        is_client=bool(payload["client"]),
        local_flow=int(payload["flow"]),
        peer_flow=int(payload["peer_flow"]),
        local_nonce=nonce,
        peer_nonce=peer_nonce,
        local_address=_address(payload["sal_local"]),
        peer_address=_address(payload["sal_peer"]),
        iss=int(payload["iss"]),
        snd_nxt=int(payload["snd_nxt"]),
        rcv_nxt=int(payload["rcv_nxt"]),
        last_rcv_verno=None if last is None else int(last),
        srtt=None if srtt is None else float(srtt),
        rttvar=float(payload["rttvar"]),
    )
    local, remote = payload["local"], payload["remote"]
    return SealedFlow(export, str(payload["role"]), str(payload["mode"]),
                      (str(local[0]), int(local[1])), (str(remote[0]), int(remote[1])))


def _address(value: Any) -> Address | None:
    return None if value is None else ip_address(str(value))
