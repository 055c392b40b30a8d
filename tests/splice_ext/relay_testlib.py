"""Helpers shared by the splice_ext tests: loopback socket pairs, streams, completions."""

from __future__ import annotations

import hashlib
import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from splice_ext import Completion, Relay

COMPLETION_TIMEOUT_S = 10.0
CHUNK_BYTES = 256 * 1024
SMALL_SOCKET_BUFFER_BYTES = 16 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (connecting end, accepted end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connecting = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return connecting, accepted


@dataclass
class RelayedPair:
    """Two peers talking through the relay: peer_a <-> [a | relay | b] <-> peer_b."""

    relay: Relay
    pair_id: int
    peer_a: socket.socket
    peer_b: socket.socket

    def close(self) -> None:
        self.peer_a.close()
        self.peer_b.close()


def relayed_pair(
    relay: Relay,
    *,
    use_splice: bool = True,
    worker: int | None = None,
    small_buffers_to_b: bool = False,
) -> RelayedPair:
    """Builds peer_a <-> relay <-> peer_b. `small_buffers_to_b` shrinks the socket buffers
    between the relay and peer_b so that a stalled peer_b backs bytes up into the relay's pipe
    quickly instead of into kernel socket buffers."""
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    # As the translator does (notes/splice-relays.md §6.6): without it, Nagle plus delayed ACKs
    # hold back the sub-MSS writes that small pipes or buffers produce for ~200 ms each time.
    for inner in (inner_a, inner_b):
        inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if small_buffers_to_b:
        inner_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER_BYTES)
        peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER_BYTES)
    pair_id = relay.add_pair(inner_a.detach(), inner_b.detach(), worker, use_splice=use_splice)
    return RelayedPair(relay, pair_id, peer_a, peer_b)


def pattern(size: int, seed: int) -> bytes:
    """Incompressible, reproducible test data."""
    return random.Random(seed).randbytes(size)


@dataclass
class StreamResult:
    digest: str = ""
    length: int = 0
    error: BaseException | None = None
    received: bytearray = field(default_factory=bytearray)


class Sender(threading.Thread):
    """Sends `data` on `sock`, then half-closes it (unless told not to).

    `pace_s` > 0 sleeps that long after every `chunk_bytes` write: a stream paced like one
    crossing a network link, which the relay drains at every wake-up."""

    def __init__(self, sock: socket.socket, data: bytes, *, shut_down: bool = True,
                 chunk_bytes: int = CHUNK_BYTES, pace_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.shut_down = shut_down
        self.chunk_bytes = chunk_bytes
        self.pace_s = pace_s
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            view = memoryview(self.data)
            for offset in range(0, len(view), self.chunk_bytes):
                self.sock.sendall(view[offset : offset + self.chunk_bytes])
                if self.pace_s:
                    time.sleep(self.pace_s)
            if self.shut_down:
                self.sock.shutdown(socket.SHUT_WR)
        except BaseException as error:  # reported by the test
            self.error = error


class Receiver(threading.Thread):
    """Reads `sock` until EOF, hashing (and optionally keeping) what arrives."""

    def __init__(self, sock: socket.socket, *, keep: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.keep = keep
        self.result = StreamResult()

    def run(self) -> None:
        digest = hashlib.sha256()
        try:
            while chunk := self.sock.recv(CHUNK_BYTES):
                digest.update(chunk)
                self.result.length += len(chunk)
                if self.keep:
                    self.result.received += chunk
        except BaseException as error:
            self.result.error = error
        self.result.digest = digest.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_completions(
    relay: Relay, count: int = 1, timeout_s: float = COMPLETION_TIMEOUT_S
) -> list[Completion]:
    """Waits on completion_fd() (as an event loop would) until `count` records arrived."""
    records: list[Completion] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{len(records)} of {count} completions after {timeout_s} s")
        readable, _, _ = select.select([relay.completion_fd()], [], [], remaining)
        if readable:
            records.extend(relay.read_completions())
    return records


def recv_exactly(sock: socket.socket, size: int, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.005
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval_s)


def wait_until_stalled(relay: Relay, pair: RelayedPair, settle_s: float = 0.3) -> tuple[int, int]:
    """Waits until the relay's (delivered, queued) counters for a->b stop moving."""
    previous = (-1, -1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = relay.pair_stats(pair.pair_id)
        current = (stats.bytes_a_to_b, stats.queued_a_to_b)
        if current == previous:
            return current
        previous = current
        time.sleep(settle_s)
    raise TimeoutError("the relay never settled")
