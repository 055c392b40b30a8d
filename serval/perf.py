"""serval-perf: iperf for Serval connections (and plain TCP, for comparison).

    serval-perf server [SERVICE] [--weight W] [--priority P] [--tcp-port PORT] [--name NAME]
                       [--connections N] [--json]
    serval-perf client [SERVICE | --tcp HOST:PORT] (--bytes N | --seconds S) [--parallel P]
                       [--reverse] [--json] [--seed N] [--mode repair|handshake]

Theory of operation
-------------------
Each stream is one connection. The client sends a small hello (4-byte length + JSON:
direction, seed, byte count or duration), the server answers with who it is (``instance``:
the address the connection reached, plus its name), then the sender streams data, half-closes
(SHUT_WR), and the receiver answers with a trailer (bytes received, verified). Upload (the
default) has the client send; ``--reverse`` has the server send.

The data is a seeded pseudo-random stream that costs nothing to produce or check: one block
(1 MiB by default) is generated from the seed, and block k of the stream is that block with k
in its first 8 bytes (so lost, repeated or reordered blocks are caught, not just corrupted
bytes). The sender patches 8 bytes and `sendall`s a memoryview; the receiver `recv_into`s the
same offset of its own block-sized buffer and compares in place with `bytes.startswith`
(memcmp, no copies). Both ends are plain kernel TCP sockets driven with plain syscalls, the
same code for Serval (the real fd servald passes) and for ``--tcp`` plain TCP, so the two can
be compared with identical endpoints.

``--json`` prints ONE object: ``bytes``, ``seconds``, ``gbps``, ``instance`` and ``verified``
(true only when every byte of every stream matched and none is missing), plus detail
(``streams``, ``instances``, ``direction``, ``seed``, ...). Exit status 1 when a transfer
failed or did not verify.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import signal
import socket as _stdsocket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import serval
from serval.errors import ServalError

PROG = "serval-perf"
MAGIC = "serval-perf"
PROTOCOL_VERSION = 1
DEFAULT_BLOCK_BYTES = 1 << 20
MIN_BLOCK_BYTES = 4096
MAX_HEADER_BYTES = 4096
HEADER = struct.Struct("!I")
COUNTER = struct.Struct("!Q")
# Control messages (hello, server info, trailer) must come promptly; the data may take long.
HANDSHAKE_TIMEOUT_S = 30.0
# How long the sender waits for the receiver's trailer after its half-close.
TRAILER_TIMEOUT_S = 60.0
# Listener sockets wake this often to notice a stop request.
ACCEPT_POLL_S = 0.25
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class PerfError(Exception):
    """A failed transfer: the message says which stream and what happened."""


# --------------------------------------------------------------------------------------
# the data stream
# --------------------------------------------------------------------------------------


def base_block(seed: int, block_bytes: int) -> bytes:
    """The block every block of the stream derives from (bytes 8.. are shared)."""
    return random.Random(seed).randbytes(block_bytes)


def expected_bytes(seed: int, block_bytes: int, offset: int, length: int) -> bytes:
    """The stream's bytes [offset, offset + length): a slow reference for tests."""
    base = base_block(seed, block_bytes)
    out = bytearray()
    position = offset
    while position < offset + length:
        index, within = divmod(position, block_bytes)
        block = COUNTER.pack(index) + base[COUNTER.size :]
        take = min(block_bytes - within, offset + length - position)
        out += block[within : within + take]
        position += take
    return bytes(out)


def send_stream(
    sock: _stdsocket.socket,
    seed: int,
    block_bytes: int,
    *,
    total_bytes: int | None = None,
    seconds: float | None = None,
    block: bytearray | None = None,
) -> int:
    """Send the stream (exactly `total_bytes`, or for `seconds`); returns bytes sent.

    `block` is `base_block(seed, block_bytes)` made beforehand, so that a caller timing the
    transfer does not time its generation (about a millisecond per MiB).

    Nagle is switched back on for the data (the small control messages before and after go
    with TCP_NODELAY): with it off, the sub-MSS tail of every block leaves as a packet of its
    own, which costs ~0.2% of a shaped link's goodput (measured at 1 Gbit/s against iperf3,
    which leaves Nagle on). The closing shutdown() flushes the last partial segment.
    """
    if sock.family in (_stdsocket.AF_INET, _stdsocket.AF_INET6):  # (tests use socketpairs)
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 0)
    if block is None:
        block = bytearray(base_block(seed, block_bytes))
    view = memoryview(block)
    sent = 0
    index = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        if total_bytes is not None:
            length = min(block_bytes, total_bytes - sent)
            if length <= 0:
                break
        else:
            assert deadline is not None
            if time.monotonic() >= deadline:
                break
            length = block_bytes
        COUNTER.pack_into(block, 0, index)
        sock.sendall(view[:length])
        sent += length
        index += 1
    return sent


@dataclass
class ReceiveResult:
    bytes: int
    verified: bool
    first_bad_offset: int | None


def receive_stream(sock: _stdsocket.socket, seed: int, block_bytes: int) -> ReceiveResult:
    """Receive to EOF, verifying every byte in place; stops checking at the first mismatch."""
    expected = bytearray(base_block(seed, block_bytes))
    expected_view = memoryview(expected)
    buffer = bytearray(block_bytes)
    view = memoryview(buffer)
    received = 0
    within = 0  # offset inside the current block
    index = 0
    COUNTER.pack_into(expected, 0, index)
    first_bad: int | None = None
    while True:
        count = sock.recv_into(view[within:])
        if count == 0:
            break
        if first_bad is None and not buffer.startswith(
            expected_view[within : within + count], within
        ):
            first_bad = received + _first_difference(
                view[within : within + count], expected_view[within : within + count]
            )
        within += count
        received += count
        if within == block_bytes:
            within = 0
            index += 1
            COUNTER.pack_into(expected, 0, index)
    return ReceiveResult(received, first_bad is None, first_bad)


def _first_difference(got: memoryview, want: memoryview) -> int:
    for i in range(len(got)):  # only on failure: speed does not matter here
        if got[i] != want[i]:
            return i
    return len(got)


# --------------------------------------------------------------------------------------
# small framed messages (hello, server info, trailer)
# --------------------------------------------------------------------------------------


def send_message(sock: _stdsocket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(HEADER.pack(len(body)) + body)


def _recv_exact(sock: _stdsocket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise PerfError(f"connection closed after {len(data)} of {count} header bytes")
        data += chunk
    return bytes(data)


def recv_message(sock: _stdsocket.socket) -> dict[str, Any]:
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if not 1 <= length <= MAX_HEADER_BYTES:
        raise PerfError(f"bad serval-perf message length {length}: is this a serval-perf peer?")
    try:
        message = json.loads(_recv_exact(sock, length))
    except ValueError as exc:
        raise PerfError(f"bad serval-perf message: {exc}") from exc
    if not isinstance(message, dict):
        raise PerfError("bad serval-perf message: not an object")
    return message


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    stream: int
    bytes: int
    seconds: float
    gbps: float
    instance: str | None
    name: str | None
    verified: bool
    error: str | None = None
    first_bad_offset: int | None = None


@dataclass
class ClientOptions:
    service: str | None
    tcp: tuple[str, int] | None
    total_bytes: int | None
    seconds: float | None
    parallel: int
    reverse: bool
    seed: int
    block_bytes: int
    timeout_s: float
    mode: str | None
    control_socket: str | None


def _open_client_socket(options: ClientOptions) -> _stdsocket.socket:
    """A plain stdlib socket on the connection, whichever transport set it up."""
    if options.tcp is not None:
        sock = _stdsocket.create_connection(options.tcp, timeout=options.timeout_s)
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        return sock
    assert options.service is not None
    serval_sock = serval.create_connection(
        options.service,
        timeout=options.timeout_s,
        mode=options.mode,
        control_socket=options.control_socket,
    )
    # The very same kind of object as in the TCP case: the kernel socket servald passed.
    sock = _stdsocket.socket(fileno=serval_sock.detach())
    sock.settimeout(options.timeout_s)
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    return sock


def run_stream(
    options: ClientOptions, index: int, start: threading.Barrier
) -> tuple[StreamResult, float, float]:
    """One stream: connect, hello, transfer, trailer. Returns (result, t_start, t_end)."""
    seed = options.seed + index
    try:
        sock = _open_client_socket(options)
    except BaseException:
        start.abort()
        raise
    with sock:
        try:
            send_message(sock, {
                "magic": MAGIC, "version": PROTOCOL_VERSION,
                "direction": "download" if options.reverse else "upload",
                "seed": seed, "block": options.block_bytes,
                "bytes": options.total_bytes, "seconds": options.seconds,
            })
            info = recv_message(sock)
            if "error" in info:
                raise PerfError(f"server refused: {info['error']}")
        except BaseException:
            start.abort()
            raise
        block = None if options.reverse else bytearray(base_block(seed, options.block_bytes))
        start.wait()
        sock.settimeout(None)  # the data phase may legitimately take long
        t_start = time.perf_counter()
        if options.reverse:
            received = receive_stream(sock, seed, options.block_bytes)
            t_end = time.perf_counter()
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            send_message(sock, {"bytes": received.bytes, "verified": received.verified})
            count, verified = received.bytes, received.verified
            first_bad = received.first_bad_offset
            complete = options.total_bytes is None or count == options.total_bytes
            error = None if complete else f"stream ended after {count} of {options.total_bytes}"
        else:
            sent = send_stream(sock, seed, options.block_bytes,
                               total_bytes=options.total_bytes, seconds=options.seconds,
                               block=block)
            sock.shutdown(_stdsocket.SHUT_WR)
            sock.settimeout(TRAILER_TIMEOUT_S)
            trailer = recv_message(sock)
            t_end = time.perf_counter()
            count = int(trailer.get("bytes", -1))
            verified = bool(trailer.get("verified")) and count == sent
            first_bad = trailer.get("first_bad_offset")
            error = None if count == sent else f"server received {count} of {sent} bytes"
    seconds = max(t_end - t_start, 1e-9)
    result = StreamResult(
        stream=index, bytes=count, seconds=round(seconds, 6),
        gbps=round(count * 8 / seconds / 1e9, 4),
        instance=info.get("instance"), name=info.get("name"),
        verified=verified and error is None, error=error, first_bad_offset=first_bad,
    )
    return result, t_start, t_end


def run_client(options: ClientOptions) -> dict[str, Any]:
    """Run every stream in parallel; the summary object `--json` prints."""
    barrier = threading.Barrier(options.parallel)
    outcomes: list[tuple[StreamResult, float, float] | BaseException | None] = [
        None
    ] * options.parallel

    def worker(index: int) -> None:
        try:
            outcomes[index] = run_stream(options, index, barrier)
        except BaseException as exc:
            outcomes[index] = exc

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"stream-{i}", daemon=True)
        for i in range(options.parallel)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    real = [f for f in failures if not isinstance(f, threading.BrokenBarrierError)]
    if failures:
        raise real[0] if real else failures[0]
    done = [o for o in outcomes if isinstance(o, tuple)]
    streams = [r for r, _, _ in done]
    total = sum(r.bytes for r in streams)
    seconds = max(max(e for _, _, e in done) - min(s for _, s, _ in done), 1e-9)
    instances = [r.instance or "?" for r in streams]
    unique = list(dict.fromkeys(instances))
    return {
        "bytes": total,
        "seconds": round(seconds, 6),
        "gbps": round(total * 8 / seconds / 1e9, 4),
        "instance": unique[0] if len(unique) == 1 else ",".join(sorted(unique)),
        "verified": all(r.verified for r in streams),
        "instances": instances,
        "transport": "tcp" if options.tcp is not None else "serval",
        "target": (f"{options.tcp[0]}:{options.tcp[1]}" if options.tcp else options.service),
        "direction": "download" if options.reverse else "upload",
        "parallel": options.parallel,
        "seed": options.seed,
        "block_bytes": options.block_bytes,
        "streams": [asdict(r) for r in streams],
    }


# --------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    service: str | None
    tcp_port: int | None
    bind: str
    weight: int
    priority: int
    name: str
    connections: int | None
    json: bool
    control_socket: str | None


class PerfServer:
    """Accepts on a Serval service and/or a TCP port; one thread per connection."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._started = 0
        self._finished = 0
        self._failed = 0
        self._handlers: list[threading.Thread] = []

    def serve(self) -> int:
        listeners: list[tuple[str, Any]] = []
        try:
            if self.options.service is not None:
                listener = serval.socket(serval.SOCK_STREAM,
                                         control_socket=self.options.control_socket)
                listeners.append(("serval", listener))
                listener.bind(self.options.service)
                listener.listen(256, weight=self.options.weight, priority=self.options.priority)
                listener.settimeout(ACCEPT_POLL_S)
            tcp_port: int | None = None
            if self.options.tcp_port is not None:
                tcp = _tcp_listener(self.options.bind, self.options.tcp_port)
                listeners.append(("tcp", tcp))
                tcp.settimeout(ACCEPT_POLL_S)
                tcp_port = int(tcp.getsockname()[1])  # the real one when asked for port 0
            self._report({"ready": True, "service": self.options.service,
                          "tcp_port": tcp_port, "name": self.options.name},
                         f"serval-perf server ready (service {self.options.service}, "
                         f"tcp port {tcp_port}, name {self.options.name})")
            acceptors = [threading.Thread(target=self._accept_loop, args=(kind, sock),
                                          name=f"accept-{kind}", daemon=True)
                         for kind, sock in listeners]
            for thread in acceptors:
                thread.start()
            while any(t.is_alive() for t in acceptors):
                for thread in acceptors:
                    thread.join(ACCEPT_POLL_S)
        finally:
            self.stop.set()
            for _, sock in listeners:
                sock.close()
        for handler in list(self._handlers):
            handler.join(TRAILER_TIMEOUT_S)
        return EXIT_OK if self._failed == 0 else EXIT_FAILURE

    def _accept_loop(self, kind: str, listener: Any) -> None:
        while not self.stop.is_set():
            with self._lock:
                limit = self.options.connections
                if limit is not None and self._started >= limit:
                    return
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.stop.is_set():
                    return
                self._report({"error": f"accept on {kind}: {exc}"}, f"accept failed: {exc}")
                time.sleep(ACCEPT_POLL_S)
                continue
            if kind == "serval":
                local_address = conn.getsockname().address
                sock = _stdsocket.socket(fileno=conn.detach())
            else:
                sock = conn
                local_address = _plain_address(sock.getsockname()[0])
            with self._lock:
                self._started += 1
            handler = threading.Thread(target=self._handle, args=(kind, sock, local_address,
                                                                  str(peer)), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _handle(self, kind: str, sock: _stdsocket.socket, local_address: str | None,
                peer: str) -> None:
        record: dict[str, Any] = {"transport": kind, "peer": peer, "instance": local_address}
        try:
            with sock:
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
                hello = recv_message(sock)
                seed, block, total, seconds, direction = _check_hello(hello)
                send_message(sock, {"instance": local_address, "name": self.options.name,
                                    "hostname": _stdsocket.gethostname(),
                                    "service": self.options.service})
                sock.settimeout(None)
                t_start = time.perf_counter()
                if direction == "upload":
                    received = receive_stream(sock, seed, block)
                    elapsed = time.perf_counter() - t_start
                    sock.settimeout(HANDSHAKE_TIMEOUT_S)
                    send_message(sock, {"bytes": received.bytes, "verified": received.verified,
                                        "first_bad_offset": received.first_bad_offset})
                    record.update(bytes=received.bytes, verified=received.verified)
                else:
                    sent = send_stream(sock, seed, block, total_bytes=total, seconds=seconds)
                    sock.shutdown(_stdsocket.SHUT_WR)
                    sock.settimeout(TRAILER_TIMEOUT_S)
                    trailer = recv_message(sock)
                    elapsed = time.perf_counter() - t_start
                    record.update(bytes=sent, verified=bool(trailer.get("verified"))
                                  and trailer.get("bytes") == sent)
                record.update(direction=direction, seconds=round(elapsed, 6),
                              gbps=round(record["bytes"] * 8 / max(elapsed, 1e-9) / 1e9, 4))
        except (OSError, PerfError, ValueError) as exc:
            record["error"] = str(exc)
            with self._lock:
                self._failed += 1
        with self._lock:
            self._finished += 1
        summary = (f"{kind} {peer}: {record.get('bytes', 0)} bytes in "
                   f"{record.get('seconds', 0)} s, {record.get('gbps', 0)} Gbit/s, "
                   f"verified={record.get('verified', False)}"
                   + (f", error: {record['error']}" if "error" in record else ""))
        self._report(record, summary)

    def _report(self, record: dict[str, Any], text: str) -> None:
        line = json.dumps(record) if self.options.json else text
        with self._lock:
            print(line, flush=True)


def _check_hello(hello: dict[str, Any]) -> tuple[int, int, int | None, float | None, str]:
    if hello.get("magic") != MAGIC or hello.get("version") != PROTOCOL_VERSION:
        raise PerfError(f"not a serval-perf v{PROTOCOL_VERSION} client: {str(hello)[:100]}")
    seed, block = hello.get("seed"), hello.get("block")
    total, seconds = hello.get("bytes"), hello.get("seconds")
    direction = hello.get("direction")
    if not isinstance(seed, int) or not isinstance(block, int) or block < MIN_BLOCK_BYTES \
            or block > 64 * DEFAULT_BLOCK_BYTES:
        raise PerfError("hello: bad seed or block size")
    if (total is None) == (seconds is None):
        raise PerfError("hello: exactly one of bytes and seconds")
    if total is not None and (not isinstance(total, int) or total < 0):
        raise PerfError("hello: bad byte count")
    if seconds is not None and (not isinstance(seconds, int | float) or not 0 < seconds <= 3600):
        raise PerfError("hello: bad duration")
    if direction not in ("upload", "download"):
        raise PerfError("hello: bad direction")
    return seed, block, total, None if seconds is None else float(seconds), str(direction)


def _plain_address(text: str) -> str:
    """10.0.0.1 rather than ::ffff:10.0.0.1 (what a dual-stack listener reports for IPv4)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return text


def _tcp_listener(bind: str, port: int) -> _stdsocket.socket:
    family = _stdsocket.AF_INET6 if ":" in bind else _stdsocket.AF_INET
    sock = _stdsocket.socket(family, _stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
        if family == _stdsocket.AF_INET6:
            sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
        sock.listen(256)
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes with an optional binary suffix: 1048576, 512K, 100M, 1G (K=1024, as iperf)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = cleaned[-1:] if cleaned[-1:] in _SIZE_SUFFIXES and cleaned[-1:] else ""
    number = cleaned[: len(cleaned) - len(suffix)]
    try:
        value = float(number) * _SIZE_SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 512K, 1G)") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"size must not be negative: {text!r}")
    return int(value)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [V6]:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(kind: type[Any]) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="iperf for Serval connections.")
    parser.add_argument("--control-socket", metavar="PATH",
                        help="servald's control socket (default: $SERVAL_CONTROL_SOCKET, then "
                        "/run/serval/servald.sock)")
    roles = parser.add_subparsers(dest="role", required=True, metavar="ROLE")

    server = roles.add_parser("server", help="serve a Serval service and/or a TCP port")
    server.add_argument("service", nargs="?", metavar="SERVICE", help="serviceID to serve")
    server.add_argument("--weight", type=_positive(int), default=1, metavar="W")
    server.add_argument("--priority", type=int, default=0, metavar="P")
    server.add_argument("--tcp-port", type=int, metavar="PORT",
                        help="also (or only) serve plain TCP on this port (0: any free port, "
                        "reported in the ready line)")
    server.add_argument("--bind", default="::", metavar="ADDR",
                        help="address of the TCP listener (default: all, v4 and v6)")
    server.add_argument("--name", default=_stdsocket.gethostname(),
                        help="name reported to clients (default: the hostname)")
    server.add_argument("--connections", type=_positive(int), metavar="N",
                        help="exit after serving N connections")
    server.add_argument("--json", action="store_true", help="one JSON line per connection")

    client = roles.add_parser("client", help="measure a transfer")
    client.add_argument("service", nargs="?", metavar="SERVICE", help="serviceID to connect to")
    client.add_argument("--tcp", type=parse_hostport, metavar="HOST:PORT",
                        help="plain TCP instead of Serval, for comparison")
    amount = client.add_mutually_exclusive_group(required=True)
    amount.add_argument("--bytes", type=parse_size, metavar="N",
                        help="bytes per stream (suffixes K, M, G: powers of 1024)")
    amount.add_argument("--seconds", type=_positive(float), metavar="S",
                        help="send for S seconds per stream")
    client.add_argument("--parallel", "-P", type=_positive(int), default=1, metavar="P")
    client.add_argument("--reverse", "-R", action="store_true",
                        help="the server sends, the client receives")
    client.add_argument("--json", action="store_true", help="print one JSON object")
    client.add_argument("--seed", type=int, help="stream seed (default: random)")
    client.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_BYTES,
                        metavar="BYTES", help="send/verify block (default 1M)")
    client.add_argument("--timeout", type=_positive(float), default=HANDSHAKE_TIMEOUT_S,
                        metavar="S", help="connect and handshake timeout")
    client.add_argument("--mode", choices=("repair", "handshake"),
                        help="force Serval's establishment mode")
    return parser


def _print_client_summary(summary: dict[str, Any]) -> None:
    for stream in summary["streams"]:
        line = (f"[{stream['stream']}] {stream['bytes']} bytes in {stream['seconds']:.3f} s = "
                f"{stream['gbps']:.3f} Gbit/s  instance {stream['instance']} "
                f"({stream['name']})  verified={stream['verified']}")
        if stream["error"]:
            line += f"  error: {stream['error']}"
        print(line)
    print(f"[SUM] {summary['bytes']} bytes in {summary['seconds']:.3f} s = "
          f"{summary['gbps']:.3f} Gbit/s  {summary['direction']} over {summary['transport']} "
          f"to {summary['target']}  verified={summary['verified']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `serval-perf` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.role == "server":
            if args.service is None and args.tcp_port is None:
                parser.error("server needs a SERVICE, --tcp-port, or both")
            server = PerfServer(ServerOptions(
                service=args.service, tcp_port=args.tcp_port, bind=args.bind,
                weight=args.weight, priority=args.priority, name=args.name,
                connections=args.connections, json=args.json,
                control_socket=args.control_socket))
            signal.signal(signal.SIGTERM, lambda *_: server.stop.set())
            try:
                return server.serve()
            except KeyboardInterrupt:
                server.stop.set()
                return EXIT_OK
        if (args.service is None) == (args.tcp is None):
            parser.error("client needs exactly one of SERVICE and --tcp HOST:PORT")
        if args.block_size < MIN_BLOCK_BYTES:
            parser.error(f"--block-size must be at least {MIN_BLOCK_BYTES}")
        options = ClientOptions(
            service=args.service, tcp=args.tcp, total_bytes=args.bytes, seconds=args.seconds,
            parallel=args.parallel, reverse=args.reverse,
            seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big"),
            block_bytes=args.block_size, timeout_s=args.timeout, mode=args.mode,
            control_socket=args.control_socket)
        summary = run_client(options)
    except (ServalError, OSError, PerfError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(summary))
    else:
        _print_client_summary(summary)
    return EXIT_OK if summary["verified"] else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
