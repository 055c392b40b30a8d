"""A two-host migration lab: small asyncio SAL endpoints driving the real migration engine.

Theory of operation
-------------------
Each `SalNode` is one host's runtime reduced to what migration needs: an asyncio loop on a
thread inside the host's network namespace, the SAL UDP port (IPv4 and IPv6, wildcard bound,
sending from a chosen source address with IP_PKTINFO, as servald must after a migration), and
a `MigrationEngine` that owns the node's established flows. Every SAL packet between the nodes
is a real encoded datagram on the veth link.

`establish()` makes one stream flow the way servald does (the SAL handshake between a real
client `Flow` and a real `Listener`, each end's kernel TCP socket built with TCP_REPAIR in its
namespace), except that the three handshake packets are handed over in memory: establishment
is servald's business, not the subject here. Each node's engine then adopts its Flow.

The application on each end is a separate process (`AppProcess`), as real applications are
separate from servald: it moves `size` seeded random bytes each way at once over the
non-blocking socket and checks the sha256 and the byte count of what it receives. The engine
keeps its own copy of the socket and drives the child over a SOCK_SEQPACKET pair (park,
swap with the new fd as SCM_RIGHTS, resume): the cross-process `AppSocket` servald uses with
the library. (An in-process application would compete with the engine for the GIL: every
ctypes call of a dump would wait up to the 5 ms switch interval.) The child records the time
of every receive, from which `receive_gaps` computes the migration pause: the largest gap in
the receive stream (last byte before to first byte after) overlapping the migration.

`ServaldProcess` runs a real servald in a host's namespace instead, for the runs that go
through the control API (the application processes then take part through `watch`).

Used by tests/host/test_migration*.py (tests/host/test_migration_harness.py checks the lab
itself) and benchmarks/migration_bench.py, so it lives in the package, like serval.topology:
a benchmark must not import test modules.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import errno
import hashlib
import ipaddress
import json
import mmap
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from serval.control import ControlClient, close_fds
from serval.core import wire
from serval.core.flow import Event, Flow
from serval.core.ids import ServiceID
from serval.core.listener import ConnectionRequest, Listener
from serval.core.wire import Address, EstablishMode, SalPacket, TransportExt
from serval.errors import WireFormatError
from serval.host import repair
from serval.host.migration import (
    ManagedFlow,
    MigrationEngine,
    MigrationRecord,
    tune_process_memory,
)
from serval.topology import Host, Topology

T = TypeVar("T")

LAB_SAL_PORT = 54399
SERVICE_PORT = 7000
DOMAIN_KEY = b"migration lab domain key 32bytes"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
NODE_START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0
PARK_WAIT_S = 2.0
APP_CHUNK_BYTES = 1 << 20
APP_SELECT_S = 0.5
TRANSFER_TIMEOUT_S = 120.0
APP_START_TIMEOUT_S = 30.0
GIL_SWITCH_INTERVAL_S = 0.0002
BLOCK_BYTES = 16 << 20
PROGRESS = struct.Struct("=QQ")
MAX_DRAIN_READS = 1024  # x 1 MiB: more than any receive buffer

PacketFilter = Callable[[SalPacket, Address, Address | None], bool]  # True: drop it


def lab_service() -> ServiceID:
    return ServiceID(hashlib.sha256(b"migration lab").digest())


# --------------------------------------------------------------------------------------------
# the SAL node


@dataclass
class SentPacket:
    time: float
    packet: SalPacket
    destination: Address
    source: Address | None


class SalNode:
    """One host's SAL runtime for the lab: UDP port, migration engine, asyncio thread."""

    def __init__(self, host: Host, port: int = LAB_SAL_PORT) -> None:
        # Two hosts' runtimes share this process (and its GIL); servald has one per host. A
        # short switch interval keeps one node's megabyte copies from holding the other's
        # loop up to the default 5 ms per hand-over.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self.host = host
        self.port = port
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: MigrationEngine | None = None
        self.sent: list[SentPacket] = []
        self.received: Counter[str] = Counter()
        self.drop: PacketFilter | None = None  # outgoing filter (tests lose chosen packets)
        self.events: list[tuple[int, Event]] = []
        self._sockets: dict[int, socket.socket] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = host.thread(self._run)
        if not self._ready.wait(NODE_START_TIMEOUT_S):
            raise TimeoutError(f"SAL node on {host.name} did not start")
        if self._error is not None:
            raise self._error

    # -- life cycle -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((wildcard, self.port))
            self._sockets[family] = sock
            self.loop.add_reader(sock.fileno(), self._readable, sock)
        self.engine = MigrationEngine(self.loop, self._send)
        if not await self.engine.prepare():
            raise RuntimeError(f"{self.host.name}: could not install the mute rule")
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self.engine.close()
            for sock in self._sockets.values():
                self.loop.remove_reader(sock.fileno())
                sock.close()

    def close(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(NODE_START_TIMEOUT_S)

    # -- running things on the node's loop ------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T], timeout: float = CALL_TIMEOUT_S) -> T:
        async def wrapper() -> T:
            return function()

        return self.run(wrapper(), timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Any:
        """Start a coroutine on the node's loop; returns a concurrent.futures.Future."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    # -- SAL I/O ----------------------------------------------------------------------------

    def _send(self, packet: SalPacket, destination: Address, source: Address | None) -> None:
        assert self.loop is not None
        if self.drop is not None and self.drop(packet, destination, source):
            self.received["dropped_by_test"] += 1
            return
        self.sent.append(SentPacket(self.loop.time(), packet, destination, source))
        self.send_raw(wire.encode(packet), destination, source)

    def send_raw(self, data: bytes, destination: Address, source: Address | None,
                 port: int | None = None) -> None:
        family = socket.AF_INET6 if destination.version == 6 else socket.AF_INET
        sock = self._sockets[family]
        ancillary: list[tuple[int, int, bytes]] = []
        if source is not None:
            if source.version == 4:
                ancillary.append((socket.IPPROTO_IP, IP_PKTINFO,
                                  struct.pack("=I4s4s", 0, source.packed, bytes(4))))
            else:
                ancillary.append((socket.IPPROTO_IPV6, IPV6_PKTINFO,
                                  struct.pack("=16sI", source.packed, 0)))
        try:
            sock.sendmsg([data], ancillary, 0, (str(destination), port or self.port))
        except OSError as exc:
            self.received[f"send_error_{errno.errorcode.get(exc.errno or 0, 'unknown')}"] += 1

    def _readable(self, sock: socket.socket) -> None:
        assert self.engine is not None
        for _ in range(64):
            try:
                data, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.received["recv_error"] += 1
                return
            try:
                packet = wire.decode(data)
            except WireFormatError:
                self.received["malformed"] += 1
                continue
            source = ipaddress.ip_address(peer[0].split("%", 1)[0])
            if self.engine.handle_packet(packet, source):
                self.received["handled"] += 1
            else:
                self.received["no_such_flow"] += 1

    # -- flows -----------------------------------------------------------------------------

    def adopt(self, flow: Flow, app: AppProcess, sock: socket.socket) -> ManagedFlow:
        def adopt() -> ManagedFlow:
            assert self.engine is not None
            local = sock.getsockname()[:2]
            remote = sock.getpeername()[:2]
            return self.engine.adopt(
                flow, app, local=(str(local[0]), int(local[1])),
                remote=(str(remote[0]), int(remote[1])),
                on_event=lambda managed, event: self.events.append((managed.flow_id, event)))

        app.loop = self.loop
        return self.call(adopt)

    def migrate(self, flow_id: int, address: Address | str,
                timeout: float = CALL_TIMEOUT_S) -> MigrationRecord:
        assert self.engine is not None
        engine = self.engine
        return self.run(engine.migrate(flow_id, ipaddress.ip_address(address)), timeout)

    def start_migration(self, flow_id: int, address: Address | str) -> Any:
        assert self.engine is not None
        return self.submit(self.engine.migrate(flow_id, ipaddress.ip_address(address)))

    def records(self, flow_id: int) -> list[MigrationRecord]:
        assert self.engine is not None
        engine = self.engine
        return self.call(lambda: list(m.records) if (m := engine.get(flow_id)) else [])

    def counters(self) -> Counter[str]:
        assert self.engine is not None
        engine = self.engine
        return self.call(lambda: Counter(engine.counters))

    def flow_counters(self, flow_id: int) -> dict[str, int]:
        assert self.engine is not None
        engine = self.engine

        def read() -> dict[str, int]:
            managed = engine.get(flow_id)
            assert managed is not None
            return dict(vars(managed.flow.counters))

        return self.call(read)


# --------------------------------------------------------------------------------------------
# the application (a child process; the engine holds its own copy of the socket, as servald)

_PARK, _PARKED, _SWAP, _RESUME, _GO, _READY = b"P", b"p", b"S", b"R", b"G", b"r"
_QUIT = b"Q"  # benchmarks: stop now, write the results (unchecked transfers only)
_EVENT_NAMES = {_PARK: "park", _SWAP: "swap", _RESUME: "resume"}


class AppProcess:
    """The engine's `AppSocket` for one application process (the cross-process flavour).

    The child runs `python test_migration_harness.py app ...` with the TCP socket inherited
    under the same open file; the engine keeps its own fd for it (`fd`), as servald does. The
    two talk over a SOCK_SEQPACKET pair: P(ark) -> p(arked), S(wap) + the new socket as
    SCM_RIGHTS (the child dup3s it onto its own number), R(esume), G(o) to start.
    """

    def __init__(self, name: str, sock: socket.socket, size: int, seed: int,
                 expected_digest: str | None, result_dir: str, *, drain: bool = True,
                 servald: dict[str, Any] | None = None) -> None:
        self.name = name
        self.sock = sock
        self.fd = sock.fileno()
        self.size = size
        self.expected_digest = expected_digest
        self.loop: asyncio.AbstractEventLoop | None = None
        self.result_path = os.path.join(result_dir, f"{name}-{os.getpid()}-{self.fd}.bin")

        self._control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._parked: asyncio.Future[None] | None = None
        self.parks = 0
        self.refuse_park = False  # tests: behave like an application that cannot park
        self.recv_times = array.array("d")
        # (what, monotonic time) of each control message the child handled: park, parked,
        # swap, resume (where an application's share of a pause goes)
        self.app_events: list[tuple[str, float]] = []
        self.received = 0
        self.digest = ""
        self.error = ""
        self._progress_fd = os.memfd_create(f"progress-{name}", 0)
        os.ftruncate(self._progress_fd, PROGRESS.size)
        self._progress = mmap.mmap(self._progress_fd, PROGRESS.size)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serval.host.migration_lab", "app", str(self.fd),
                 str(child_control.fileno()),
                 json.dumps({"size": size, "seed": seed, "result_path": self.result_path,
                             "drain": drain, "check": expected_digest is not None,
                             "progress_fd": self._progress_fd, "servald": servald})],
                pass_fds=(self.fd, child_control.fileno(), self._progress_fd),
                stdin=subprocess.DEVNULL,
                env=_child_env())
        finally:
            child_control.close()
            os.close(self._progress_fd)
        self._control.settimeout(APP_START_TIMEOUT_S)
        if self._control.recv(16) != _READY:
            raise RuntimeError(f"{name}: application process did not start")
        self._control.setblocking(False)

    def progress(self) -> tuple[int, int]:
        """(bytes received, bytes sent) so far, as the child last published them."""
        received, sent = PROGRESS.unpack(self._progress[:PROGRESS.size])
        return int(received), int(sent)

    def start(self) -> None:
        self._control.setblocking(True)
        self._control.send(_GO)
        self._control.setblocking(False)

    def stop(self, timeout: float = APP_START_TIMEOUT_S) -> None:
        """End an unchecked transfer early and collect its receive times."""
        with contextlib.suppress(OSError):
            self._control.setblocking(True)
            self._control.send(_QUIT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self._read_results()

    # -- AppSocket (runs on the node's loop) ------------------------------------------------

    async def acquire(self) -> int:
        if self.process.poll() is not None:
            raise OSError(errno.ESHUTDOWN, f"{self.name}: application finished")
        return self.fd  # the engine's own copy, as servald keeps one

    async def park(self) -> None:
        if self.refuse_park:
            raise OSError(errno.EBUSY, f"{self.name}: refusing to park")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._parked = future
        loop.add_reader(self._control.fileno(), self._control_readable)
        try:
            self._control.send(_PARK)
            await future
        finally:
            loop.remove_reader(self._control.fileno())
            self._parked = None

    def _control_readable(self) -> None:
        try:
            message = self._control.recv(16)
        except BlockingIOError:
            return
        future = self._parked
        if future is None or future.done():
            return
        if message == _PARKED:
            self.parks += 1
            future.set_result(None)
        else:  # b"": the application exited (its transfer ended)
            future.set_exception(OSError(errno.ESHUTDOWN, f"{self.name}: application gone"))

    async def swap(self, fd: int) -> None:
        assert fd == self.fd
        self._control.sendmsg([_SWAP], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         struct.pack("=i", fd))])

    async def resume(self) -> None:
        with contextlib.suppress(OSError):
            self._control.send(_RESUME)

    # -- results ----------------------------------------------------------------------------

    def finish(self, timeout: float = TRANSFER_TIMEOUT_S) -> None:
        """Wait for the transfer; check the byte count and the sha256 of what came in."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(APP_START_TIMEOUT_S)
            raise AssertionError(f"{self.name}: transfer did not finish") from None
        self._read_results()
        # AssertionError (not `assert`: this must hold under -O too): a failed check.
        if self.error:
            raise AssertionError(f"{self.name}: {self.error}")
        if self.received != self.size:
            raise AssertionError(f"{self.name}: {self.received} of {self.size}")
        if self.expected_digest is not None and self.digest != self.expected_digest:
            raise AssertionError(f"{self.name}: sha256 mismatch")
        if code != 0:
            raise AssertionError(f"{self.name}: exit {code}")

    def _read_results(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.result_path, "rb") as results:
            header = json.loads(results.readline())
            self.received = int(header["received"])
            self.digest = str(header["digest"])
            self.error = str(header["error"])
            self.app_events = [(str(what), float(at)) for what, at in header.get("events", [])]
            count = int(header["times"])
            self.recv_times = array.array("d")
            self.recv_times.fromfile(results, count)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.result_path)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(APP_START_TIMEOUT_S)
        self._control.close()
        self._progress.close()


REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPOSITORY_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _app_main(argv: list[str]) -> int:
    """The application process: `app SOCKET_FD CONTROL_FD OPTIONS_JSON`."""
    fd, control_fd = int(argv[0]), int(argv[1])
    options = json.loads(argv[2])
    tune_process_memory()  # an application with MB-sized buffers should reuse them too
    size, result_path = int(options["size"]), str(options["result_path"])
    drain, check = bool(options["drain"]), bool(options["check"])
    progress = mmap.mmap(int(options["progress_fd"]), PROGRESS.size)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    control = socket.socket(fileno=control_fd)
    # Checked transfers send seeded random bytes; unchecked ones (benchmarks: long, fast)
    # repeat one random block, so gigabytes need no gigabytes of memory.
    block = random_bytes(int(options["seed"]), size if check else min(size, BLOCK_BYTES))
    remaining = size
    digest = hashlib.sha256()
    times = array.array("d")
    events: list[tuple[str, float]] = []  # (park | parked | swap | resume, monotonic time)
    received = 0
    error = ""
    mode = "wait"  # wait (for G), run, park, read (swapped, pending bytes not yet written)
    backlog: list[memoryview] = []  # drained while parking, checked once parked
    # servald mode: park / swap / resume come from servald's control API (`watch`), as they
    # do for any engine that owns its fd; only start and results go through `control`.
    servald: ControlClient | None = None
    flow = 0
    if options.get("servald"):
        servald = ControlClient(str(options["servald"]["path"]))
        flow = int(options["servald"]["flow"])
        servald.call("watch", {"events": ["migration"], "flow": flow}, fds=[fd])
    control.send(_READY)
    eof = shut = False
    deadline = time.monotonic() + TRANSFER_TIMEOUT_S

    # Receive buffers are reused once processed: a fresh 1 MiB bytearray per read is zeroed
    # first, and that CPU would be the harness's, not the migration's.
    spare: list[bytearray] = []

    def receive() -> memoryview | None:
        """One read into a buffer of its own (drained ones are processed later); None:
        EAGAIN."""
        nonlocal received, eof
        buffer = spare.pop() if spare else bytearray(APP_CHUNK_BYTES)
        try:
            count = sock.recv_into(buffer)
        except BlockingIOError:
            spare.append(buffer)
            return None
        if count == 0:
            eof = True
            if received != size:
                raise ConnectionError(f"EOF after {received} of {size} bytes")
        received += count
        times.append(time.monotonic())
        PROGRESS.pack_into(progress, 0, received, size - remaining)
        return memoryview(buffer)[:count]

    def process(chunk: memoryview) -> None:
        if check:
            digest.update(chunk)
        buffer = chunk.obj
        chunk.release()
        if isinstance(buffer, bytearray):
            spare.append(buffer)

    try:
        while not (eof and shut):
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {received}, {remaining} left to send")
            if mode == "run" and not remaining and not shut:
                sock.shutdown(socket.SHUT_WR)
                shut = True
            readers: list[int] = [control_fd]
            if servald is not None:
                readers.append(servald.fileno())
            if mode in ("run", "read") and not eof:
                readers.append(fd)
            writers = [fd] if mode == "run" and remaining else []
            writable: list[int] = []
            if servald is not None and servald.pending_events:
                readable = [servald.fileno()]
            else:
                readable, writable, _ = select.select(readers, writers, [], APP_SELECT_S)
            new_fds: list[int] = []
            message = b""
            if servald is not None and servald.fileno() in readable:
                frame = servald.poll_event()
                if frame is None:
                    continue
                if frame.message.get("event") != "migration":
                    close_fds(frame.fds)
                    continue
                phase = frame.message.get("phase")
                message = {"park": _PARK, "swap": _SWAP, "resume": _RESUME}.get(
                    str(phase), b"?")
                new_fds = list(frame.fds)
            elif control_fd in readable:
                message, ancillary, _flags, _addr = control.recvmsg(
                    16, socket.CMSG_SPACE(struct.calcsize("=i")))
                new_fds = [struct.unpack("=i", data[:4])[0] for level, kind, data in ancillary
                           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
                if message == b"":
                    raise ConnectionError("the engine went away")
            if message:
                if message in _EVENT_NAMES:
                    events.append((_EVENT_NAMES[message], time.monotonic()))
                if message == _GO:
                    mode = "run"
                elif message == _QUIT:
                    break
                elif message == _PARK:
                    # The engine locked the input, so this is bounded: read what is queued
                    # (the dump need not copy it), answer, and only then process it.
                    for _ in range(MAX_DRAIN_READS if drain and not eof else 0):
                        chunk = receive()
                        if not chunk:
                            break
                        backlog.append(chunk)
                    mode = "park"
                    if servald is not None:
                        servald.call("migration_ack", {"flow": flow, "phase": "park"})
                    else:
                        control.send(_PARKED)
                    events.append(("parked", time.monotonic()))
                    for chunk in backlog:
                        process(chunk)
                    backlog.clear()
                elif message == _SWAP:
                    for new_fd in new_fds:
                        os.dup2(new_fd, fd, inheritable=False)  # dup3(O_CLOEXEC)
                        os.close(new_fd)
                    new_fds = []
                    mode = "read"
                elif message == _RESUME:
                    mode = "run"
                close_fds(new_fds)
                continue  # look at the mode again before any system call on the socket
            if fd in readable:
                chunk = receive()
                if chunk:
                    process(chunk)
            if writable and remaining:
                offset = (size - remaining) % len(block)
                try:
                    sent = sock.send(memoryview(block)[offset:offset + min(remaining,
                                                                          APP_CHUNK_BYTES)])
                except BlockingIOError:
                    sent = 0
                remaining -= sent
                PROGRESS.pack_into(progress, 0, received, size - remaining)
    except Exception as exc:
        error = repr(exc)
    with open(result_path + ".tmp", "wb") as results:
        header = {"received": received, "digest": digest.hexdigest() if check else "",
                  "error": error, "times": len(times), "events": events}
        results.write(json.dumps(header).encode() + b"\n")
        times.tofile(results)
    os.replace(result_path + ".tmp", result_path)
    return 0 if not error else 1


def receive_gaps(times: array.array[float], windows: list[tuple[float, float]]) -> list[float]:
    """For each (start, end): the largest gap in a receive stream (`times` of its receives)
    that overlaps it, in ms (last byte before to first byte after)."""
    return [(after - before) * 1000 for before, after in receive_gap_edges(times, windows)]


def receive_gap_edges(times: array.array[float],
                      windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """For each (start, end): (last receive before, first receive after) of the largest gap
    in a receive stream overlapping it; (nan, nan) when there is none."""
    edges: list[tuple[float, float]] = []
    for start, end in windows:
        first = max(bisect.bisect_left(times, start) - 1, 0)
        last = min(bisect.bisect_right(times, end) + 1, len(times))
        worst = float("nan")
        found = (float("nan"), float("nan"))
        for index in range(first, last - 1):
            gap = times[index + 1] - times[index]
            if times[index] <= end and times[index + 1] >= start and not gap <= worst:
                worst = gap
                found = (times[index], times[index + 1])
        edges.append(found)
    return edges


# --------------------------------------------------------------------------------------------
# establishing a flow between two nodes


@dataclass
class LabFlow:
    client_node: SalNode
    server_node: SalNode
    client_flow: int
    server_flow: int
    client_app: AppProcess
    server_app: AppProcess
    client_sock: socket.socket
    server_sock: socket.socket
    client_tuple: tuple[tuple[str, int], tuple[str, int]]
    server_tuple: tuple[tuple[str, int], tuple[str, int]]

    def start(self) -> None:
        self.client_app.start()
        self.server_app.start()

    def finish(self) -> None:
        self.client_app.finish()
        self.server_app.finish()

    def close(self) -> None:
        for app in (self.client_app, self.server_app):
            app.close()
        for sock in (self.client_sock, self.server_sock):
            sock.close()

    def gaps(self, windows: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Per window: the receive gap (ms) at the client and at the server."""
        return list(zip(receive_gaps(self.client_app.recv_times, windows),
                        receive_gaps(self.server_app.recv_times, windows), strict=True))


def _transport(params: repair.TransportParams, address: str, port: int) -> TransportExt:
    return TransportExt(mode=EstablishMode.REPAIR, isn=params.isn, mss=params.mss,
                        window_scale=params.window_scale, sack=params.sack,
                        timestamps=params.timestamps, window=params.window,
                        address=ipaddress.ip_address(address), port=port)


def _params(peer: TransportExt) -> repair.TransportParams:
    return repair.TransportParams(isn=peer.isn, mss=peer.mss, window_scale=peer.window_scale,
                                  sack=peer.sack, timestamps=peer.timestamps,
                                  window=peer.window)


def _roundtrip(packets: list[tuple[SalPacket, Address | None]]) -> list[SalPacket]:
    return [wire.decode(wire.encode(p)) for p, _ in packets]


def establish(client: SalNode, server: SalNode, version: int, rng: random.Random,
              size: int, seed: int, result_dir: str, *, client_address: str | None = None,
              server_address: str | None = None, check: bool = True,
              drain: bool = True) -> LabFlow:
    """One stream flow client -> server with `size` random bytes to move each way."""
    client_ip = client_address or str(client.host.address(version=version))
    server_ip = server_address or str(server.host.address(version=version))
    client_addr, server_addr = ipaddress.ip_address(client_ip), ipaddress.ip_address(server_ip)
    with client.host.enter():
        own_client = repair.own_transport_params(client_ip, server_ip, rng)
        client_sock = repair.prepare_client_socket(client_ip)
    client_port = int(client_sock.getsockname()[1])
    now = time.monotonic()
    flow_c = Flow.connect(lab_service(), _transport(own_client, client_ip, client_port), now,
                          rng, local_address=client_addr, peer_address=server_addr,
                          domain_key=DOMAIN_KEY)
    listener = Listener(lab_service(), 8, domain_key=DOMAIN_KEY)
    server_sock: socket.socket | None = None
    for packet in _roundtrip(flow_c.datagrams_to_send(now)):  # SYN
        listener.handle_packet(packet, client_addr, now, rng, local_address=server_addr)
    while (event := listener.next_event()) is not None:
        assert isinstance(event, ConnectionRequest)
        request = event.flow
        assert request.peer_transport is not None
        with server.host.enter():
            own_server = repair.own_transport_params(server_ip, client_ip, rng)
            server_sock = repair.build_server_socket(
                server_ip, SERVICE_PORT, own_server, _params(request.peer_transport),
                client_ip, client_port)
        listener.respond(request, _transport(own_server, server_ip, SERVICE_PORT), now)
    assert server_sock is not None
    for packet in _roundtrip(listener.datagrams_to_send(now)):  # SYN-ACK
        flow_c.handle_packet(packet, server_addr, now)
    assert flow_c.peer_transport is not None
    repair.complete_socket(client_sock, own_client, _params(flow_c.peer_transport), server_ip,
                           SERVICE_PORT)
    for packet in _roundtrip(flow_c.datagrams_to_send(now)):  # ACK
        listener.handle_packet(packet, client_addr, now, rng, local_address=server_addr)
    repair.release(server_sock)
    flow_s = listener.accept()
    assert flow_s is not None
    while flow_c.next_event() is not None:
        pass
    while flow_s.next_event() is not None:
        pass

    client_seed, server_seed = seed * 2 + 1, seed * 2 + 2
    client_app = AppProcess("client", client_sock, size, client_seed,
                            digest_of(server_seed, size) if check else None, result_dir,
                            drain=drain)
    server_app = AppProcess("server", server_sock, size, server_seed,
                            digest_of(client_seed, size) if check else None, result_dir,
                            drain=drain)
    client.adopt(flow_c, client_app, client_sock)
    server.adopt(flow_s, server_app, server_sock)
    return LabFlow(client, server, int(flow_c.local_flow), int(flow_s.local_flow),
                   client_app, server_app, client_sock, server_sock,
                   _tuple(client_sock), _tuple(server_sock))


def digest_of(seed: int, size: int) -> str:
    return hashlib.sha256(random_bytes(seed, size)).hexdigest()


def random_bytes(seed: int, size: int) -> bytes:
    """`size` seeded random bytes (in chunks: randbytes takes at most 2**31 bits at once)."""
    rng = random.Random(seed)
    chunk = 1 << 24
    return b"".join(rng.randbytes(min(chunk, size - offset)) for offset in range(0, size, chunk))


def _tuple(sock: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    local, remote = sock.getsockname(), sock.getpeername()
    return (str(local[0]), int(local[1])), (str(remote[0]), int(remote[1]))


@contextlib.contextmanager
def lab_nodes(topology: Topology, *names: str) -> Any:
    nodes: list[SalNode] = []
    try:
        for name in names:
            nodes.append(SalNode(topology[name]))
        yield nodes
    finally:
        for node in nodes:
            node.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


RST_COUNTERS = ("Tcp.OutRsts", "TcpExt.TCPAbortOnData", "TcpExt.TCPAbortOnClose",
                "TcpExt.TCPAbortOnTimeout", "TcpExt.TCPAbortFailed")


def assert_no_resets(*hosts: Host) -> None:
    for host in hosts:
        counters = host.net_counters()
        resets = {name: counters.get(name, 0) for name in RST_COUNTERS}
        if any(resets.values()):
            raise AssertionError(f"{host.name}: {resets}")


# --------------------------------------------------------------------------------------------
# real servald processes

SERVALD_DOMAIN_KEY = "5e7a1d005e7a1d005e7a1d005e7a1d005e7a1d005e7a1d005e7a1d005e7a1d00"
SERVALD_SERVICE = "migration.servald.test"
SERVALD_START_TIMEOUT_S = 20.0
SERVALD_STOP_TIMEOUT_S = 10.0


class ServaldProcess:
    """One servald process in a host's namespace (its log in `workdir`/NAME.log)."""

    def __init__(self, host: Host, workdir: Path, **config: Any) -> None:
        self.host = host
        self.socket_path = str(host.control_socket)
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        config_path = workdir / f"{host.name}.yaml"
        settings = {"domain_key": SERVALD_DOMAIN_KEY, "log_level": "info", **config}
        config_path.write_text(json.dumps(settings))  # YAML is a superset of JSON
        self.log_path = workdir / f"{host.name}.log"
        env = host.env()
        env["PYTHONPATH"] = str(REPOSITORY_ROOT)
        with self.log_path.open("ab") as log:
            self.process = host.popen(
                [sys.executable, "-m", "serval.host.daemon", "--config", str(config_path),
                 "--control-socket", self.socket_path],
                env=env, cwd=str(REPOSITORY_ROOT), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVALD_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"servald exited: {self.log()}")
            with contextlib.suppress(OSError), ControlClient(self.socket_path) as client:
                client.request("status")
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(f"servald did not start: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with ControlClient(self.socket_path) as client:
            return dict(client.request(op, **fields).message)

    def flow(self, flow_id: int) -> dict[str, Any]:
        flows: list[dict[str, Any]] = self.request("flows")["flows"]
        return next(f for f in flows if f["flow"] == flow_id)

    def servalctl(self, *argv: str) -> dict[str, Any]:
        env = self.host.env()
        env["PYTHONPATH"] = str(REPOSITORY_ROOT)
        result = self.host.run([sys.executable, "-m", "serval.host.ctl", "--timeout", "20",
                                *argv, "--json"], env=env, check=False, timeout=40)
        if result.returncode != 0:
            raise AssertionError(f"servalctl {argv}: {result.stderr}\n{self.log()}")
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                self.process.wait(SERVALD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(SERVALD_STOP_TIMEOUT_S)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "app":
        sys.exit(_app_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} app SOCKET_FD CONTROL_FD OPTIONS_JSON")
