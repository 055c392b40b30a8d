"""Stream establishment: the kernel TCP socket behind each Serval stream flow.

Theory of operation
-------------------
Two modes (DESIGN.md section 3), chosen per host and per destination prefix by the client's
servald, with automatic fallback from `repair` to `handshake`:

* **repair** (serval/host/repair.py does the socket calls): the client's servald binds a socket
  before sending the SAL SYN and announces its TCP endpoint and parameters; the server's servald
  builds its end on the SYN directly in ESTABLISHED state and keeps it frozen in repair mode
  (it sends nothing there) until the SAL ACK or the first data byte arrives; the client
  completes and releases its end on the SYN-ACK. `FrozenSocketWatch` watches a frozen socket
  for EPOLLIN through the asyncio loop, which is the "first data" implicit ACK.

* **handshake**: the server's servald runs one ordinary TCP listener (`HandshakeAcceptor`, on
  `data_plane.handshake_port`) and answers the SAL SYN with that endpoint and a one-time token.
  The client's servald makes an ordinary kernel `connect()` and writes the token as the first
  16 bytes (`handshake_connect`); the server reads exactly those 16 bytes, so nothing of the
  application's stream is consumed, checks the token (one use, bound to the SAL flow, expiring
  with the half-open timeout) and only then hands the socket to the application. A wrong or
  late token gets the connection reset, and the application never sees it.

`conntrack_advice()` reads the netfilter settings that decide whether SYN-less (repair-built)
TCP streams survive a stateful firewall on this host, and says what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from serval.core import wire
from serval.core.flow import (
    Connected,
    ConnectionRefused,
    Flow,
    FlowState,
    HandshakeTimeout,
    Reset,
)
from serval.core.ids import TOKEN_BYTES, ServiceID
from serval.core.listener import ConnectionRequest, Listener, RequestAborted
from serval.core.wire import (
    ControlExt,
    ControlFlags,
    EstablishMode,
    Protocol,
    SalPacket,
    ServiceExt,
    TransportExt,
)
from serval.errors import FlowStateError, WireFormatError
from serval.host.config import Address
from serval.host.log import Counters, RateLimitedLog
from serval.host.sal import AddressBook, Received

HANDSHAKE_LISTEN_BACKLOG = 4096
PARAMS_CACHE_S = 2.0  # TCP sysctls and per-path MTUs are re-read this often
PARAMS_CACHE_MAX = 4096
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def reset_close(sock: socket.socket) -> None:
    """Close a TCP socket with an RST (for refused handshake-mode connections)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


# --------------------------------------------------------------------------------------------
# conntrack


CONNTRACK_SYSCTL_DIR = Path("/proc/sys/net/netfilter")


def _read_sysctl(directory: Path, name: str) -> str | None:
    try:
        return (directory / name).read_text().strip()
    except OSError:
        return None


def conntrack_advice(directory: Path = CONNTRACK_SYSCTL_DIR) -> tuple[dict[str, str], list[str]]:
    """The conntrack settings that matter for repair mode, and what to change (if anything).

    Repair-built connections never send a TCP SYN, so a stateful firewall sees their first
    packet as a mid-stream one (tcp-repair-migration.md section 4b, pitfall 12).
    """
    settings: dict[str, str] = {}
    advice: list[str] = []
    loose = _read_sysctl(directory, "nf_conntrack_tcp_loose")
    if loose is None:
        return settings, advice  # conntrack not loaded in this namespace: nothing tracks TCP
    settings["nf_conntrack_tcp_loose"] = loose
    liberal = _read_sysctl(directory, "nf_conntrack_tcp_be_liberal")
    if liberal is not None:
        settings["nf_conntrack_tcp_be_liberal"] = liberal
    if loose == "0":
        advice.append(
            "net.netfilter.nf_conntrack_tcp_loose=0: stateful firewall rules will drop "
            "repair-mode streams (no TCP SYN ever crosses the wire); set it to 1 "
            "(sysctl -w net.netfilter.nf_conntrack_tcp_loose=1) and accept 'ct state new' "
            "on the data port, or exempt the data port statelessly, or use "
            "data_plane.mode: handshake"
        )
    else:
        advice.append(
            "conntrack is active: repair-mode streams need 'ct state new' (not only "
            "'established') accepted on the data port, or a stateless accept for it"
        )
    return settings, advice


# --------------------------------------------------------------------------------------------
# frozen-socket watch


class FrozenSocketWatch:
    """Calls `on_readable` once when a frozen (repair-mode) server socket receives data."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_readable: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._fd = sock.fileno()
        self._on_readable = on_readable
        self._active = True
        loop.add_reader(self._fd, self._fire)

    def _fire(self) -> None:
        if self._active:
            self.cancel()
            self._on_readable()

    def cancel(self) -> None:
        if self._active:
            self._active = False
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._fd)


# --------------------------------------------------------------------------------------------
# handshake mode


async def handshake_connect(
    address: Address,
    port: int,
    token: bytes,
    timeout_s: float,
    local_address: Address | None = None,
) -> socket.socket:
    """Ordinary kernel connect() to the server's endpoint, then present the token.

    Returns a connected, blocking socket whose stream starts with the application's bytes on
    both sides (the server consumed exactly the token). Raises OSError / TimeoutError.
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local_address is not None and local_address.version == address.version:
            sock.bind((str(local_address), 0))
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (str(address), port))
            await loop.sock_sendall(sock, token)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(True)
    return sock


@dataclass
class _PendingToken:
    key: Any  # the flow manager's key for the SAL flow this token belongs to
    client_address: Address | None  # when known, the connection must come from there
    expires_at: float


class HandshakeAcceptor:
    """The handshake-mode TCP listener: accepts, checks one-time tokens, hands sockets on."""

    def __init__(
        self,
        port: int,
        token_wait_s: float,
        on_verified: Callable[[Any, socket.socket], None],
        on_rejected: Callable[[str, Address | None], None],
        listen_addresses: tuple[Address, ...] = (),
    ) -> None:
        self.port = port
        self._token_wait_s = token_wait_s
        self._on_verified = on_verified
        self._on_rejected = on_rejected
        self._listen_addresses = listen_addresses
        self._listeners: list[socket.socket] = []
        self._pending: dict[bytes, _PendingToken] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        self._loop = loop
        notes: list[str] = []
        hosts: list[tuple[int, str]]
        if self._listen_addresses:
            hosts = [
                (socket.AF_INET6 if a.version == 6 else socket.AF_INET, str(a))
                for a in self._listen_addresses
            ]
        else:
            hosts = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        for family, host in hosts:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, self.port))
                sock.listen(HANDSHAKE_LISTEN_BACKLOG)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and not self._listen_addresses:
                    notes.append(f"IPv6 handshake listener not available: {exc.strerror}")
                    continue
                self.close()
                raise
            self._listeners.append(sock)
            loop.add_reader(sock.fileno(), self._accept_ready, sock)
        return notes

    def close(self) -> None:
        for sock in self._listeners:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        for task in list(self._tasks):
            task.cancel()
        self._pending.clear()

    def expect(self, token: bytes, key: Any, client_address: Address | None, now: float) -> None:
        """Register a one-time token issued in a SYN-ACK."""
        self._pending[token] = _PendingToken(key, client_address, now + self._token_wait_s)

    def forget(self, token: bytes) -> None:
        self._pending.pop(token, None)

    def expire(self, now: float) -> list[Any]:
        """Drop tokens never presented in time; returns their flow keys."""
        stale = [t for t, p in self._pending.items() if p.expires_at <= now]
        return [self._pending.pop(t).key for t in stale]

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _accept_ready(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._on_rejected(f"accept failed: {exc.strerror}", None)
                    return
                continue
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._read_token(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_token(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        peer: Address | None = None
        try:
            peer = ipaddress.ip_address(conn.getpeername()[0].split("%", 1)[0])
            received = b""
            async with asyncio.timeout(self._token_wait_s):
                while len(received) < TOKEN_BYTES:
                    # recv(n) never returns more than n: the application's first bytes stay.
                    chunk = await loop.sock_recv(conn, TOKEN_BYTES - len(received))
                    if not chunk:
                        break
                    received += chunk
        except (OSError, TimeoutError):
            reset_close(conn)
            self._on_rejected("no token presented", peer)
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        pending = self._pending.get(received) if len(received) == TOKEN_BYTES else None
        if pending is None or loop.time() > pending.expires_at:
            reset_close(conn)
            self._on_rejected("unknown, reused or expired token", peer)
            return
        if pending.client_address is not None and peer is not None and (
            pending.client_address != peer
        ):
            reset_close(conn)
            self._on_rejected("token presented from the wrong address", peer)
            return
        del self._pending[received]
        conn.setblocking(True)
        self._on_verified(pending.key, conn)


# --------------------------------------------------------------------------------------------
# the stream engine: SAL SYN / SYN-ACK / ACK for stream flows, both roles, both modes

# Handshake mode announces no repair parameters; the kernel handshake negotiates them. The
# wire format wants an MSS >= 1, so a placeholder (the IPv4 minimum) goes there.
HANDSHAKE_MSS_PLACEHOLDER = 536


def handshake_transport(address: Address, port: int,
                        token: bytes = bytes(TOKEN_BYTES)) -> TransportExt:
    """A HANDSHAKE-mode announcement: an endpoint (and a token), no repair parameters."""
    return TransportExt(mode=EstablishMode.HANDSHAKE, isn=0, mss=HANDSHAKE_MSS_PLACEHOLDER,
                        window_scale=None, sack=False, timestamps=False, window=0,
                        address=address, port=port, token=token)


REFUSE_FLAGS = ControlFlags.RST | ControlFlags.NACK  # "4-tuple conflict: retry on a new port"
MAX_REFUSALS = 3  # then fall back to handshake mode (when allowed)


class RepairBackend(TypingProtocol):
    """The TCP_REPAIR operations the engine needs (KernelRepair adapts serval/host/repair.py).

    Every method raises OSError (errno EADDRNOTAVAIL for a 4-tuple conflict).
    """

    def own_transport(self, local: Address, port: int, peer: Address
                      ) -> tuple[TransportExt, Any]:
        """This side's announcement (mode REPAIR) for a socket at local:port, plus the
        private parameters (e.g. the timestamp base) the later calls need."""
        ...

    def prepare_client(self, local: Address) -> tuple[socket.socket, int]:
        """A client socket bound to local:<port> and in repair mode; returns it and the port."""
        ...

    def complete_client(self, sock: socket.socket, own: Any, peer: TransportExt) -> None:
        """Build the client end on the peer's parameters and release it."""
        ...

    def client_done(self, local: Address, port: int) -> None:
        """The set-up using this client port finished (either way)."""
        ...

    def build_server(self, own: Any, local: tuple[Address, int],
                     peer: TransportExt) -> socket.socket:
        """Build the server end, ESTABLISHED and still frozen in repair mode."""
        ...

    def release_server(self, sock: socket.socket) -> None:
        """Leave repair mode (SO_REUSEADDR set again afterwards)."""
        ...

    def discard(self, sock: socket.socket) -> None:
        """Close a socket still in repair mode: nothing goes on the wire."""
        ...


class KernelRepair:
    """RepairBackend on serval/host/repair.py (and its client port allocator when present).

    The per-connection parameters cost no file read and no extra socket on the hot path:
    the TCP sysctls and each path's MTU are cached for PARAMS_CACHE_S (they change rarely;
    the ISN and TSval base are drawn fresh for every connection).
    """

    def __init__(self, rng: Any) -> None:
        from serval.host import repair

        self._repair = repair
        self._rng = rng
        self._settings: Any = None
        self._settings_until = 0.0
        self._mss_cache: dict[tuple[Address, Address], tuple[float, int]] = {}
        self._ports: Any = None
        try:
            from serval.host import ports

            self._ports = ports.ClientPortAllocator.from_sysctl(rng)
        except Exception:
            self._ports = None  # bind(0): correct, but ~470 new connections/s per address
        # Probe: TCP_REPAIR needs CAP_NET_ADMIN; fail now rather than on the first SYN.
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, 1)
        finally:
            probe.close()

    def _os_error(self, exc: Exception) -> OSError:
        code = getattr(exc, "errno", None)
        return OSError(code if isinstance(code, int) else errno.EIO, str(exc))

    def _path_mss(self, local: Address, peer: Address, now: float) -> int:
        """The MSS the route from `local` to `peer` allows (cached)."""
        key = (local, peer)
        cached = self._mss_cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            mtu = self._repair.route_mtu(str(local), str(peer))
        except Exception as exc:
            raise self._os_error(exc) from exc
        family = socket.AF_INET6 if local.version == 6 else socket.AF_INET
        mss: int = self._repair.mss_for_mtu(mtu, family)
        if len(self._mss_cache) >= PARAMS_CACHE_MAX:
            self._mss_cache.clear()
        self._mss_cache[key] = (now + PARAMS_CACHE_S, mss)
        return mss

    def own_transport(self, local: Address, port: int, peer: Address
                      ) -> tuple[TransportExt, Any]:
        now = time.monotonic()
        if self._settings is None or self._settings_until <= now:
            try:
                self._settings = self._repair.read_tcp_settings()
            except Exception as exc:
                raise self._os_error(exc) from exc
            self._settings_until = now + PARAMS_CACHE_S
        params = self._repair.transport_params(self._settings, self._path_mss(local, peer, now),
                                               self._rng)
        ext = TransportExt(mode=EstablishMode.REPAIR, isn=params.isn, mss=params.mss,
                           window_scale=params.window_scale, sack=params.sack,
                           timestamps=params.timestamps, window=params.window,
                           address=local, port=port)
        return ext, params

    def _peer_params(self, peer: TransportExt) -> Any:
        return self._repair.TransportParams(
            isn=peer.isn, mss=peer.mss, window_scale=peer.window_scale, sack=peer.sack,
            timestamps=peer.timestamps, window=peer.window)

    def prepare_client(self, local: Address) -> tuple[socket.socket, int]:
        port = 0
        if self._ports is not None:
            with contextlib.suppress(Exception):
                port = int(self._ports.allocate(str(local)))
        try:
            sock: socket.socket = self._repair.prepare_client_socket(str(local), port)
        except Exception as exc:
            raise self._os_error(exc) from exc
        return sock, int(sock.getsockname()[1])

    def client_done(self, local: Address, port: int) -> None:
        # The kernel is the judge of 4-tuple uniqueness from here on (a conflict is refused
        # and retried); the allocator's sequential cursor keeps reuse rare.
        if self._ports is not None:
            self._ports.release(str(local), port)

    def complete_client(self, sock: socket.socket, own: Any, peer: TransportExt) -> None:
        try:
            # The SYN's MSS was computed towards the first hop (a router, or in ad-hoc mode
            # the LAN broadcast address); the path to the server itself, whose unicast
            # address the SYN-ACK gives, may allow less.
            local = ipaddress.ip_address(sock.getsockname()[0])
            mss = min(own.mss, self._path_mss(local, peer.address, time.monotonic()))
        except BaseException:
            sock.close()  # as complete_socket() does on failure: the caller counts on it
            raise
        if mss != own.mss:
            own = dataclasses.replace(own, mss=mss)
        try:
            self._repair.complete_socket(sock, own, self._peer_params(peer), str(peer.address),
                                         peer.port)
        except Exception as exc:
            raise self._os_error(exc) from exc

    def build_server(self, own: Any, local: tuple[Address, int],
                     peer: TransportExt) -> socket.socket:
        try:
            sock: socket.socket = self._repair.build_server_socket(
                str(local[0]), local[1], own, self._peer_params(peer), str(peer.address),
                peer.port)
        except Exception as exc:
            raise self._os_error(exc) from exc
        return sock

    def release_server(self, sock: socket.socket) -> None:
        try:
            self._repair.release(sock)
        except Exception as exc:
            raise self._os_error(exc) from exc

    def discard(self, sock: socket.socket) -> None:
        self._repair.discard(sock)


@dataclass
class ConnectedStream:
    """What a finished establishment hands to the application (connect reply / accept event)."""

    sock: socket.socket
    flow: int
    service: ServiceID
    peer_address: Address  # the peer's SAL address
    local: tuple[str, int]
    remote: tuple[str, int]
    mode: str
    # Server side, from the SYN: the client's own serviceID (second SERVICE) and the original
    # legacy client a translator connected for (ORIGIN).
    peer_service: ServiceID | None = None
    origin: wire.OriginExt | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "flow": int(self.flow),
            "local": {"address": self.local[0], "port": self.local[1]},
            "remote": {"address": self.remote[0], "port": self.remote[1]},
            "mode": self.mode,
        }


class _Timer:
    """One asyncio timer re-armed to whatever a sans-IO object's `get_timer()` says."""

    __slots__ = ("_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def arm(self, when: float | None, callback: Callable[[], None]) -> None:
        if when == self._when and (when is None or self._handle is not None):
            return
        self.cancel()
        self._when = when
        if when is not None:
            self._handle = self._loop.call_at(when, self._fire, callback)

    def _fire(self, callback: Callable[[], None]) -> None:
        self._handle = None
        self._when = None
        callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._when = None


@dataclass
class StreamListener:
    """A local listening service (a `listen` request) around the core Listener."""

    service: ServiceID
    backlog: int
    weight: int
    priority: int
    deliver: Callable[[ConnectedStream], Awaitable[bool]]
    core: Listener
    timer: _Timer
    accepted: int = 0


class _Outcome(enum.Enum):
    REFUSED = "refused"  # 4-tuple conflict: retry on a new port (and a new flow)


@dataclass
class _ClientAttempt:
    flow: Flow
    service: ServiceID
    mode: EstablishMode
    sock: socket.socket | None
    own: TransportExt
    own_private: Any
    future: asyncio.Future[ConnectedStream | _Outcome]
    started: float
    timer: _Timer
    tried: set[Address] = field(default_factory=set)
    last_targets: list[Address] = field(default_factory=list)
    syns_sent: int = 0
    finishing: bool = False
    held: list[tuple[SalPacket, Address | None]] = field(default_factory=list)
    # What the SYN carries beyond the core Flow's: ORIGIN, and our own serviceID.
    origin: wire.OriginExt | None = None
    source_service: ServiceID | None = None
    syn_verno: int | None = None  # what a REFUSE must acknowledge (+1)


@dataclass
class _ServerRequest:
    """A SYN our listener answered and whose kernel socket is not yet the application's."""

    flow: Flow
    listener: StreamListener
    mode: EstablishMode
    local: tuple[Address, int]
    created: float
    sock: socket.socket | None = None  # repair mode: frozen
    token: bytes | None = None  # handshake mode
    watch: FrozenSocketWatch | None = None
    acked: bool = False  # the core Listener completed it (ACK, data, or token)
    verified: socket.socket | None = None  # handshake mode: token checked, socket ready
    peer_service: ServiceID | None = None  # from the SYN (see ConnectedStream)
    origin: wire.OriginExt | None = None


@dataclass
class _Settled:
    """An established (or failed) flow kept for a while: listing, duplicates, re-ACKs."""

    flow: Flow | None
    role: str
    state: str
    service: ServiceID
    mode: str
    local: tuple[str, int] | None
    remote: tuple[str, int] | None
    peer: str | None
    until: float
    timer: _Timer | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "flow": int(self.flow.local_flow) if self.flow is not None else None,
            "role": self.role,
            "state": self.state,
            "service": str(self.service),
            "mode": self.mode,
            "local": None if self.local is None else
            {"address": self.local[0], "port": self.local[1]},
            "remote": None if self.remote is None else
            {"address": self.remote[0], "port": self.remote[1]},
            "peer": self.peer,
            "migrations": 0,
        }


Resolver = Callable[[ServiceID, set[Address]], list[tuple[Address, int]]]
ROUTER_SUSPECT_S = 5.0
MAX_REPLY_PORTS = 65536  # a first hop that let a SYN go unanswered is tried last this long


def _fail_with_timeout(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _debug_enabled(log: Any) -> bool:
    """Whether `log` (a structlog filtering logger, or anything else) writes debug lines."""
    is_enabled_for = getattr(log, "is_enabled_for", None)
    return bool(is_enabled_for(logging.DEBUG)) if callable(is_enabled_for) else True


class StreamEngine:
    """Establishes stream flows: the core Flow / Listener drive the SAL handshake; this
    runtime resolves first hops, builds the kernel sockets and hands them over."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        config: Any,  # ServaldConfig
        addresses: AddressBook,
        send: Callable[[bytes, Address, int], bool],
        port_of: Callable[[Address], int],
        resolve: Resolver,
        repair: RepairBackend | None,
        acceptor: HandshakeAcceptor | None,
        counters: Counters,
        log: Any,
        bad_input: RateLimitedLog,
        rng: Any,
    ) -> None:
        self._loop = loop
        self._config = config
        self._addresses = addresses
        self._send_raw = send
        self._port_of = port_of
        self._resolve = resolve
        self.repair = repair
        self._acceptor = acceptor
        self._counters = counters
        self._log = log
        self._bad_input = bad_input
        self._rng = rng
        self._domain_key: bytes = config.domain_key or b""
        self._timeouts = config.timeouts
        self._clients: dict[int, _ClientAttempt] = {}
        self._requests: dict[int, _ServerRequest] = {}  # local flow -> request
        self._listener_of: dict[int, StreamListener] = {}  # local flow -> its listener
        self._settled: dict[int, _Settled] = {}  # local flow -> settled flow
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_established = _debug_enabled(log)
        self._syn_in_hand: SalPacket | None = None
        self._suspect_until: dict[Address, float] = {}
        # Peers that talk to us from a port other than their SAL port (a NAT, a test tool):
        # answers for their flow go back to that port. (address, their flowID) -> port.
        self._reply_ports: OrderedDict[tuple[Address, int], int] = OrderedDict()

    # -- bookkeeping -------------------------------------------------------------------------

    def flows(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = []
        for attempt in self._clients.values():
            listed.append({"flow": int(attempt.flow.local_flow), "role": "client",
                           "state": attempt.flow.state.value, "service": str(attempt.service),
                           "mode": attempt.mode.name.lower(),
                           "local": {"address": str(attempt.own.address),
                                     "port": attempt.own.port},
                           "remote": None, "peer": None, "migrations": 0})
        for request in self._requests.values():
            flow = request.flow
            listed.append({"flow": int(flow.local_flow), "role": "server",
                           "state": flow.state.value, "service": str(flow.service),
                           "mode": request.mode.name.lower(),
                           "local": {"address": str(request.local[0]),
                                     "port": request.local[1]},
                           "remote": None, "peer": str(flow.peer_address), "migrations": 0})
        listed.extend(s.to_dict() for s in self._settled.values())
        return listed

    def take_established(self, flow_id: int) -> tuple[Flow, str, str] | None:
        """Hand an established flow over for good (to the migration engine): its Flow, role
        and mode, no longer lingering here. None when unknown, failed or already taken."""
        settled = self._settled.get(flow_id)
        if settled is None or settled.flow is None or settled.state != "established":
            return None
        del self._settled[flow_id]
        if settled.timer is not None:
            settled.timer.cancel()
        while settled.flow.next_event() is not None:
            pass
        return settled.flow, settled.role, settled.mode

    def owns(self, packet: SalPacket) -> bool:
        """Whether a packet with a destination flowID belongs to a flow of this host."""
        flow = int(packet.dst_flow)
        return flow in self._clients or flow in self._listener_of or flow in self._settled

    def pending_count(self) -> int:
        return len(self._requests)

    def client_count(self) -> int:
        return len(self._clients)

    def sweep(self) -> None:
        """Forget settled flows whose linger ran out (called periodically)."""
        # Every entry lingers equally long and `_settle` re-inserts at the end, so the dict is
        # in expiry order: stop at the first one still to keep (at a thousand connections
        # per second it holds tens of thousands, swept four times a second).
        now = self._loop.time()
        expired: list[int] = []
        for flow_id, settled in self._settled.items():
            if settled.until > now:
                break
            expired.append(flow_id)
        for flow_id in expired:
            settled = self._settled.pop(flow_id)
            if settled.timer is not None:
                settled.timer.cancel()

    def close(self) -> None:
        for attempt in list(self._clients.values()):
            self._end_client(attempt)
            if not attempt.future.done():
                attempt.future.set_exception(
                    OSError(errno.ECONNABORTED, "servald is shutting down"))
        for request in list(self._requests.values()):
            self._drop_request(request, "shutdown")
        for settled in self._settled.values():
            if settled.timer is not None:
                settled.timer.cancel()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, packet: SalPacket, destination: Address) -> None:
        try:
            data = wire.encode(packet)
        except WireFormatError as exc:
            self._counters.inc("sal.encode_failed")
            self._bad_input.warning("sal_encode_failed", error=str(exc))
            return
        port = self._reply_ports.get((destination, int(packet.dst_flow)))
        self._send_raw(data, destination, port or self._port_of(destination))

    def _learn_reply_port(self, packet: SalPacket, rx: Received) -> None:
        if packet.source is None and rx.source_port != self._port_of(rx.source):
            key = (rx.source, int(packet.src_flow))
            self._reply_ports[key] = rx.source_port
            self._reply_ports.move_to_end(key)
            while len(self._reply_ports) > MAX_REPLY_PORTS:
                self._reply_ports.popitem(last=False)

    def _canonical(self, **fields: Any) -> None:
        """The one canonical log line of a flow whose establishment failed (info level).

        Successful establishments get theirs at debug level, written only when
        `self._log_established` (debug enabled): at thousands of connections per second a
        line each cost more CPU than the rest of the set-up and would fill disks; the
        `stream.connected.*` / `stream.accepted` counters count them.
        """
        self._log.info("flow", **fields)

    def _settle(self, flow: Flow | None, role: str, state: str, service: ServiceID,
                mode: str, local: tuple[str, int] | None, remote: tuple[str, int] | None,
                peer: str | None, flow_id: int) -> None:
        """Keep a finished flow for a while: its Flow still re-ACKs duplicate SYN-ACKs."""
        previous = self._settled.pop(flow_id, None)  # re-inserted last: see `sweep`
        if previous is not None and previous.timer is not None:
            previous.timer.cancel()
        self._settled[flow_id] = _Settled(
            flow, role, state, service, mode, local, remote, peer,
            self._loop.time() + self._timeouts.completed_linger_s)

    # -- client side ---------------------------------------------------------------------------

    async def connect(
        self, service: ServiceID, mode_name: str, timeout_s: float, *,
        origin: wire.OriginExt | None = None, source_service: ServiceID | None = None,
    ) -> ConnectedStream:
        """Open a stream flow to `service`; raises OSError (ETIMEDOUT, ECONNREFUSED, ...).

        `origin` (a translator's legacy client) and `source_service` (our own serviceID)
        ride in the SYN and reach the server's accept event.
        """
        started = self._loop.time()
        deadline = started + timeout_s
        mode = EstablishMode.HANDSHAKE if mode_name == "handshake" else EstablishMode.REPAIR
        refusals = 0
        syns = 0
        fallback_reason: str | None = None
        while True:
            try:
                attempt = self._start_attempt(service, mode, origin, source_service)
            except OSError as exc:
                if mode is EstablishMode.REPAIR and self._config.data_plane.fallback and (
                    exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH)
                ):
                    fallback_reason = f"repair set-up failed: {exc.strerror or exc}"
                    self._counters.inc("stream.fallback_to_handshake")
                    mode = EstablishMode.HANDSHAKE
                    continue
                self._counters.inc("stream.connect_failed")
                raise
            flow_id = int(attempt.flow.local_flow)
            # The deadline fails the attempt's own future (no asyncio.timeout + shield: two
            # fewer objects and callbacks per connection). Every producer of the future's
            # result checks done() first, so a late SYN-ACK finds it failed and cleans up.
            expiry = self._loop.call_at(deadline, _fail_with_timeout, attempt.future)
            try:
                outcome = await attempt.future
            except TimeoutError:
                syns += attempt.syns_sent
                self._end_client(attempt)
                self._counters.inc("stream.connect_timeout")
                self._canonical(role="client", flow=flow_id, service=str(service),
                                mode=attempt.mode.name.lower(), outcome="timeout", syns=syns,
                                setup_ms=round((self._loop.time() - started) * 1000, 3))
                raise OSError(errno.ETIMEDOUT,
                              f"service {service}: no instance answered within "
                              f"{timeout_s} s ({syns} SYNs sent)") from None
            except OSError as exc:
                self._end_client(attempt)
                self._counters.inc("stream.connect_failed")
                self._canonical(role="client", flow=flow_id, service=str(service),
                                mode=attempt.mode.name.lower(),
                                outcome=errno.errorcode.get(exc.errno or 0, "error"),
                                setup_ms=round((self._loop.time() - started) * 1000, 3))
                raise
            except asyncio.CancelledError:
                self._end_client(attempt)
                raise
            finally:
                expiry.cancel()
            syns += attempt.syns_sent
            if outcome is _Outcome.REFUSED:
                self._end_client(attempt)
                refusals += 1
                self._counters.inc("stream.refused_retry")
                if refusals >= MAX_REFUSALS and mode is EstablishMode.REPAIR:
                    if not self._config.data_plane.fallback:
                        raise OSError(errno.EADDRNOTAVAIL,
                                      f"service {service}: every repair attempt hit a "
                                      "4-tuple conflict and fallback is disabled")
                    fallback_reason = "repeated 4-tuple conflicts"
                    self._counters.inc("stream.fallback_to_handshake")
                    mode = EstablishMode.HANDSHAKE
                continue
            assert isinstance(outcome, ConnectedStream)
            self._end_client(attempt, keep_socket=True, established=outcome)
            self._counters.inc(f"stream.connected.{outcome.mode}")
            if self._log_established:
                self._log.debug("flow", role="client", flow=outcome.flow,
                                service=str(service), mode=outcome.mode, outcome="connected",
                                instance=str(outcome.peer_address),
                                local=f"{outcome.local[0]}:{outcome.local[1]}",
                                remote=f"{outcome.remote[0]}:{outcome.remote[1]}",
                                syns=syns, refusals=refusals, fallback=fallback_reason,
                                setup_ms=round((self._loop.time() - started) * 1000, 3))
            return outcome

    def _start_attempt(self, service: ServiceID, mode: EstablishMode,
                       origin: wire.OriginExt | None = None,
                       source_service: ServiceID | None = None) -> _ClientAttempt:
        targets = self._resolve(service, set())
        if not targets:
            raise OSError(errno.ENETUNREACH,
                          f"service {service}: no route (no listener here, no router "
                          "configured and no broadcast interface)")
        first = targets[0][0]
        local = self._addresses.source_for(first)
        if local is None:
            raise OSError(errno.ENETUNREACH,
                          f"service {service}: no local address towards {first}")
        sock: socket.socket | None = None
        own_private: Any = None
        if mode is EstablishMode.REPAIR:
            if self.repair is None:
                raise OSError(errno.EOPNOTSUPP, "TCP_REPAIR is not available on this host")
            sock, port = self.repair.prepare_client(local)
            try:
                own, own_private = self.repair.own_transport(local, port, first)
            except BaseException:
                self.repair.discard(sock)
                self.repair.client_done(local, port)
                raise
        else:
            own = handshake_transport(local, 0)
        now = self._loop.time()
        flow = Flow.connect(service, own, now, self._rng, local_address=local,
                            domain_key=self._domain_key)
        while int(flow.local_flow) in self._clients or int(flow.local_flow) in self._settled:
            flow = Flow.connect(service, own, now, self._rng, local_address=local,
                                domain_key=self._domain_key)
        attempt = _ClientAttempt(
            flow=flow, service=service, mode=mode, sock=sock, own=own, own_private=own_private,
            future=self._loop.create_future(), started=now, timer=_Timer(self._loop),
            origin=origin, source_service=source_service)
        self._clients[int(flow.local_flow)] = attempt
        self._pump_client(attempt, first_targets=targets)
        return attempt

    def suspected(self) -> set[Address]:
        now = self._loop.time()
        return {a for a, until in self._suspect_until.items() if until > now}

    def _pump_client(self, attempt: _ClientAttempt,
                     first_targets: list[tuple[Address, int]] | None = None) -> None:
        """Send what the client flow produced, handle its events, re-arm its timer."""
        flow = attempt.flow
        now = self._loop.time()
        out = flow.datagrams_to_send(now)
        events = []
        while (event := flow.next_event()) is not None:
            events.append(event)
        connected = next((e for e in events if isinstance(e, Connected)), None)
        if connected is not None and not attempt.finishing:
            # Hold the handshake ACK until our socket is complete: the server releases its
            # socket on that ACK, and its first packet must find ours (no RST).
            attempt.held.extend(out)
            out = []
        for packet, destination in out:
            if destination is not None:
                self._send(packet, destination)
                continue
            # A SYN: (re-)resolve; retransmissions avoid first hops already tried.
            targets = first_targets or self._resolve(attempt.service, attempt.tried)
            first_targets = None
            if not targets:
                attempt.tried.clear()
                targets = self._resolve(attempt.service, set())
            if attempt.syns_sent > 0:
                self._counters.inc("stream.syn_retransmits")
                for previous in attempt.last_targets:
                    self._suspect_until[previous] = now + ROUTER_SUSPECT_S
            if packet.control is not None:
                attempt.syn_verno = packet.control.verno
            if attempt.origin is not None or attempt.source_service is not None:
                # The core Flow builds the SYN; what only the runtime knows is added here.
                services = packet.services
                if attempt.source_service is not None and len(services) == 1:
                    services = (services[0], ServiceExt(attempt.source_service))
                packet = dataclasses.replace(packet, services=services, origin=attempt.origin)
            try:
                data = wire.encode(packet)
            except WireFormatError as exc:
                self._bad_input.warning("syn_encode_failed", error=str(exc))
                continue
            for address, port in targets:
                self._send_raw(data, address, port)
                attempt.tried.add(address)
            attempt.last_targets = [a for a, _ in targets]
            attempt.syns_sent += 1
            self._counters.inc("stream.syns_sent")
        for event in events:
            if attempt.future.done():
                break
            if isinstance(event, Connected) and not attempt.finishing:
                attempt.finishing = True
                for address in attempt.last_targets:
                    self._suspect_until.pop(address, None)
                self._finish_client(attempt, event)
            elif isinstance(event, ConnectionRefused):
                self._counters.inc("stream.connect_refused")
                attempt.future.set_exception(OSError(
                    errno.ECONNREFUSED,
                    f"service {attempt.service}: the instance refused the connection "
                    "(accept queue full or listener closing)"))
            elif isinstance(event, HandshakeTimeout | Reset):
                attempt.future.set_exception(OSError(
                    errno.ETIMEDOUT if isinstance(event, HandshakeTimeout) else errno.ECONNRESET,
                    f"service {attempt.service}: no instance answered"
                    if isinstance(event, HandshakeTimeout) else
                    f"service {attempt.service}: connection reset during set-up"))
        attempt.timer.arm(flow.get_timer(), lambda: self._client_timer(attempt))

    def _client_timer(self, attempt: _ClientAttempt) -> None:
        if self._clients.get(int(attempt.flow.local_flow)) is not attempt:
            return
        attempt.flow.handle_timer(self._loop.time())
        self._pump_client(attempt)

    def _end_client(self, attempt: _ClientAttempt, keep_socket: bool = False,
                    established: ConnectedStream | None = None) -> None:
        flow_id = int(attempt.flow.local_flow)
        if self._clients.get(flow_id) is not attempt:
            return
        del self._clients[flow_id]
        if attempt.mode is EstablishMode.REPAIR and self.repair is not None:
            self.repair.client_done(attempt.own.address, attempt.own.port)
        if not keep_socket and attempt.sock is not None:
            if self.repair is not None:
                self.repair.discard(attempt.sock)
            else:
                attempt.sock.close()
            attempt.sock = None
        if established is not None:
            self._settle(attempt.flow, "client", "established", attempt.service,
                         established.mode, established.local, established.remote,
                         str(established.peer_address), flow_id)
            settled = self._settled[flow_id]
            settled.timer = attempt.timer
            attempt.timer.arm(attempt.flow.get_timer(), lambda: self._settled_timer(flow_id))
        else:
            attempt.timer.cancel()
            if attempt.flow.state is not FlowState.CLOSED:
                with contextlib.suppress(FlowStateError):
                    attempt.flow.abort(self._loop.time())
                for packet, destination in attempt.flow.datagrams_to_send(self._loop.time()):
                    if destination is not None:
                        self._send(packet, destination)

    def _settled_timer(self, flow_id: int) -> None:
        settled = self._settled.get(flow_id)
        if settled is None or settled.flow is None:
            return
        settled.flow.handle_timer(self._loop.time())
        self._pump_settled(settled, flow_id)

    def _pump_settled(self, settled: _Settled, flow_id: int) -> None:
        assert settled.flow is not None
        for packet, destination in settled.flow.datagrams_to_send(self._loop.time()):
            if destination is not None:
                self._send(packet, destination)
        while settled.flow.next_event() is not None:
            pass  # PeerClosed / Closed / Reset of a handed-over flow: nothing to do here
        if settled.timer is not None:
            settled.timer.arm(settled.flow.get_timer(), lambda: self._settled_timer(flow_id))

    def _finish_client(self, attempt: _ClientAttempt, connected: Connected) -> None:
        """The SYN-ACK arrived: build our end. Repair mode is a handful of system calls and
        runs right here; handshake mode needs a kernel connect() and runs as a task."""
        peer = connected.peer_transport
        if peer is not None and peer.mode is EstablishMode.HANDSHAKE:
            self._spawn(self._finish_client_handshake(attempt, connected))
            return
        sock: socket.socket | None = None
        try:
            if peer is None:
                raise OSError(errno.EPROTO, "the SYN-ACK carried no transport parameters")
            if attempt.sock is None or self.repair is None:
                raise OSError(errno.EPROTO, "the server answered a handshake SYN in repair mode")
            try:
                self.repair.complete_client(attempt.sock, attempt.own_private, peer)
            except OSError as exc:
                attempt.sock = None  # complete_client closed it
                if exc.errno == errno.EADDRNOTAVAIL:
                    # Our port is taken towards this server: the flow is reset (the server
                    # drops its frozen socket silently) and we retry elsewhere.
                    if not attempt.future.done():
                        attempt.future.set_result(_Outcome.REFUSED)
                    return
                raise
            sock, attempt.sock = attempt.sock, None
            self._client_established(attempt, connected, sock, "repair")
        except Exception as exc:
            if sock is not None:
                sock.close()
            if not attempt.future.done():
                err = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
                attempt.future.set_exception(err)

    async def _finish_client_handshake(self, attempt: _ClientAttempt,
                                       connected: Connected) -> None:
        peer = connected.peer_transport
        assert peer is not None
        sock: socket.socket | None = None
        try:
            if attempt.sock is not None:
                # The server fell back to handshake mode (it could not build a repair
                # socket), or we asked for it.
                if self.repair is not None:
                    self.repair.discard(attempt.sock)
                attempt.sock = None
                self._counters.inc("stream.fallback_by_server")
            sock = await handshake_connect(
                peer.address, peer.port, peer.token,
                max(0.1, self._timeouts.token_wait_s), attempt.own.address)
            self._client_established(attempt, connected, sock, "handshake")
        except Exception as exc:
            if sock is not None:
                sock.close()
            if not attempt.future.done():
                err = exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc))
                attempt.future.set_exception(err)

    def _client_established(self, attempt: _ClientAttempt, connected: Connected,
                            sock: socket.socket, mode: str) -> None:
        """Our end exists: let the server release its end (the held ACK), hand ours over."""
        held, attempt.held = attempt.held, []
        for packet, destination in held:
            if destination is not None:
                self._send(packet, destination)
        local = sock.getsockname()
        remote = sock.getpeername()
        result = ConnectedStream(sock, int(attempt.flow.local_flow), attempt.service,
                                 connected.peer_address, (str(local[0]), int(local[1])),
                                 (str(remote[0]), int(remote[1])), mode)
        if attempt.future.done():
            sock.close()  # timed out meanwhile: nobody will take it
        else:
            attempt.future.set_result(result)

    def _client_packet(self, attempt: _ClientAttempt, packet: SalPacket, rx: Received) -> None:
        control = packet.control
        assert control is not None
        flags = control.flags
        if flags & REFUSE_FLAGS == REFUSE_FLAGS:
            # REFUSE: the server's repair connect() hit a 4-tuple conflict. Trusted only with
            # our own nonce echoed and our SYN acknowledged (a blind forger knows neither).
            if (control.nonce == attempt.flow.local_nonce
                    and attempt.syn_verno is not None
                    and control.ackno == (attempt.syn_verno + 1) & 0xFFFFFFFF
                    and attempt.flow.state is FlowState.REQUEST
                    and not attempt.future.done() and not attempt.finishing):
                self._counters.inc("stream.refused_tuple_conflict")
                attempt.future.set_result(_Outcome.REFUSED)
            else:
                self._counters.inc("sal.bad_refuse")
            return
        attempt.flow.handle_packet(packet, rx.source, self._loop.time())
        self._pump_client(attempt)

    # -- server side ---------------------------------------------------------------------------

    def new_listener(self, service: ServiceID, backlog: int, weight: int, priority: int,
                     deliver: Callable[[ConnectedStream], Awaitable[bool]]) -> StreamListener:
        # The accept queue is emptied as soon as a connection completes (the socket goes to
        # the application at once), so `backlog` bounds the requests in progress: beyond it
        # a SYN is answered with an RST.
        core = Listener(service, backlog, max_pending=backlog, domain_key=self._domain_key)
        return StreamListener(service, backlog, weight, priority, deliver, core,
                              _Timer(self._loop))

    def handle(self, packet: SalPacket, rx: Received,
               find_listener: Callable[[ServiceID], StreamListener | None]) -> None:
        """A stream-flow packet for this host (pure SYN, or anything with a dst flowID)."""
        if packet.control is None:
            self._counters.inc("sal.flow_packet_without_control")
            return
        flow_id = int(packet.dst_flow)
        if flow_id == 0:
            service = packet.destination_service
            listener = find_listener(service) if service is not None else None
            if listener is None:
                # No listener: no answer at all; the client retransmits and re-resolves.
                self._counters.inc("stream.syn_no_listener")
                return
            self._listener_input(listener, packet, rx)
            return
        attempt = self._clients.get(flow_id)
        if attempt is not None:
            self._client_packet(attempt, packet, rx)
            return
        listener = self._listener_of.get(flow_id)
        if listener is not None:
            self._listener_input(listener, packet, rx)
            return
        settled = self._settled.get(flow_id)
        if settled is not None and settled.flow is not None:
            settled.flow.handle_packet(packet, rx.source, self._loop.time())
            self._pump_settled(settled, flow_id)
            return
        self._counters.inc("sal.no_such_flow")
        self._bad_input.warning("sal_no_such_flow", source=str(rx.source), flow=flow_id)

    def _local_address_for(self, rx: Received, client: Address) -> Address | None:
        local = rx.destination
        if local is None or not self._addresses.is_own(local) or self._addresses.is_broadcast(
            local
        ) or (local.is_loopback and not client.is_loopback):
            local = self._addresses.source_for(client)
        return local

    def _listener_input(self, listener: StreamListener, packet: SalPacket,
                        rx: Received) -> None:
        now = self._loop.time()
        self._learn_reply_port(packet, rx)
        client = packet.source.addresses[0] if packet.source is not None else rx.source
        local = self._local_address_for(rx, client)
        before = listener.core.counters.refused_full
        # A new request's ConnectionRequest comes out of the pump right below; _on_request
        # reads what the core Flow does not keep (ORIGIN, the client's serviceID) from here.
        self._syn_in_hand = packet if packet.dst_flow == 0 else None
        listener.core.handle_packet(packet, rx.source, now, self._rng, local_address=local)
        if listener.core.counters.refused_full != before:
            self._counters.inc("stream.accept_queue_full")
        try:
            self._pump_listener(listener)
        finally:
            self._syn_in_hand = None

    def _pump_listener(self, listener: StreamListener) -> None:
        core = listener.core
        now = self._loop.time()
        while (event := core.next_event()) is not None:
            if isinstance(event, ConnectionRequest):
                self._on_request(listener, event.flow)
            elif isinstance(event, RequestAborted):
                request = self._requests.get(int(event.flow.local_flow))
                if request is not None:
                    self._counters.inc("stream.half_open_aborts")
                    self._drop_request(request, event.reason.value)
        while (flow := core.accept()) is not None:
            request = self._requests.get(int(flow.local_flow))
            if request is None:
                continue
            request.acked = True
            self._complete_request(request)
        for packet, destination in core.datagrams_to_send(now):
            if destination is not None:
                self._send(packet, destination)
        listener.timer.arm(core.get_timer(), lambda: self._listener_timer(listener))

    def _listener_timer(self, listener: StreamListener) -> None:
        listener.core.handle_timer(self._loop.time())
        self._pump_listener(listener)

    def _on_request(self, listener: StreamListener, flow: Flow) -> None:
        """A new SYN: build our end of the data connection, then answer."""
        now = self._loop.time()
        peer = flow.peer_transport
        client = flow.peer_address
        local = flow.local_address
        if peer is None or client is None or local is None:
            self._counters.inc("sal.malformed_syn")
            listener.core.refuse(flow, now)
            return
        flow_id = int(flow.local_flow)
        sock: socket.socket | None = None
        token: bytes | None = None
        own: TransportExt | None = None
        if peer.mode is EstablishMode.REPAIR and self.repair is not None:
            data_port = self._config.data_plane.data_port
            try:
                own, own_private = self.repair.own_transport(local, data_port, peer.address)
                sock = self.repair.build_server(own_private, (local, data_port), peer)
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
                    # 4-tuple conflict: REFUSE so the client retries from another port. The
                    # request stays unanswered and the Listener forgets it silently.
                    self._counters.inc("stream.refuse_tuple_conflict")
                    self._send(self._refusal(flow), client)
                    return
                self._counters.inc("stream.server_repair_failed")
                self._bad_input.warning("server_repair_failed", error=str(exc))
                own = None
        if own is None or sock is None:
            if self._acceptor is None:
                self._counters.inc("stream.no_handshake_listener")
                listener.core.refuse(flow, now)
                return
            token = os.urandom(TOKEN_BYTES)
            own = handshake_transport(local, self._acceptor.port, token)
            self._acceptor.expect(token, flow_id, None, now)
        request = _ServerRequest(flow=flow, listener=listener, mode=own.mode,
                                 local=(local, own.port), created=now, sock=sock, token=token)
        syn = self._syn_in_hand
        if syn is not None and syn.control is not None and (
            int(syn.src_flow) == flow.peer_flow and syn.control.nonce == flow.peer_nonce
        ):
            request.origin = syn.origin
            if len(syn.services) > 1:
                request.peer_service = syn.services[1].service
        self._requests[flow_id] = request
        self._listener_of[flow_id] = listener
        if sock is not None:
            request.watch = FrozenSocketWatch(
                self._loop, sock, lambda: self._frozen_data(request))
        listener.core.respond(flow, own, now)
        self._counters.inc("stream.synacks_sent")

    def _refusal(self, flow: Flow) -> SalPacket:
        assert flow.peer_nonce is not None
        request_verno = flow._rcv_nxt  # the client's SYN verno + 1, what our RST acknowledges
        return SalPacket(
            src_flow=0, dst_flow=flow.peer_flow, protocol=Protocol.TCP,
            control=ControlExt(REFUSE_FLAGS, 0, request_verno, flow.peer_nonce),
            services=(ServiceExt(flow.service),),
        )

    def _frozen_data(self, request: _ServerRequest) -> None:
        """Data reached a frozen server socket: the client completed (implicit ACK)."""
        self._counters.inc("stream.server_released_on_data")
        request.listener.core.data_arrived(int(request.flow.local_flow), self._loop.time())
        self._pump_listener(request.listener)

    def handshake_verified(self, flow_id: int, sock: socket.socket) -> None:
        """The acceptor checked a token issued for server flow `flow_id`."""
        request = self._requests.get(flow_id)
        if request is None:
            reset_close(sock)
            self._counters.inc("stream.token_for_unknown_flow")
            return
        request.verified = sock
        request.token = None
        if request.acked:
            self._complete_request(request)
        else:
            # The token proves the client got our SYN-ACK: as good as its ACK.
            request.listener.core.data_arrived(flow_id, self._loop.time())
            self._pump_listener(request.listener)

    def _complete_request(self, request: _ServerRequest) -> None:
        flow_id = int(request.flow.local_flow)
        if self._requests.get(flow_id) is not request:
            return
        if request.mode is EstablishMode.HANDSHAKE:
            if request.verified is None:
                return  # the ACK came first: wait for the token (bounded by token_wait_s)
            sock = request.verified
            request.verified = None
            trigger = "token"
        else:
            assert request.sock is not None and self.repair is not None
            sock, request.sock = request.sock, None
            if request.watch is not None:
                request.watch.cancel()
                request.watch = None
            try:
                self.repair.release_server(sock)
            except OSError as exc:
                self._counters.inc("stream.server_release_failed")
                self._bad_input.warning("server_release_failed", error=str(exc))
                self.repair.discard(sock)
                self._forget_request(request)
                return
            trigger = "release"
        self._counters.inc(f"stream.server_completed_by_{trigger}")
        self._forget_request(request)
        self._deliver(request, sock)

    def _deliver(self, request: _ServerRequest, sock: socket.socket) -> None:
        flow = request.flow
        flow_id = int(flow.local_flow)
        try:
            local = sock.getsockname()[:2]
            remote = sock.getpeername()[:2]
        except OSError:
            local = (str(request.local[0]), request.local[1])
            remote = ("", 0)
        mode = request.mode.name.lower()
        assert flow.peer_address is not None
        stream = ConnectedStream(sock, flow_id, flow.service, flow.peer_address,
                                 (str(local[0]), int(local[1])),
                                 (str(remote[0]), int(remote[1])), mode,
                                 peer_service=request.peer_service, origin=request.origin)
        self._settle(flow, "server", "established", flow.service, mode, stream.local,
                     stream.remote, str(flow.peer_address), flow_id)
        settled = self._settled[flow_id]
        settled.timer = _Timer(self._loop)
        self._pump_settled(settled, flow_id)
        setup_ms = round((self._loop.time() - request.created) * 1000, 3)
        listener = request.listener
        listener.accepted += 1

        async def hand_over() -> None:
            delivered = False
            try:
                delivered = await listener.deliver(stream)
            finally:
                sock.close()  # the application holds its own reference now (SCM_RIGHTS)
            self._counters.inc("stream.accepted" if delivered else "stream.accept_undelivered")
            if delivered and not self._log_established:
                return
            (self._log.debug if delivered else self._log.info)(
                "flow", role="server", flow=flow_id, service=str(flow.service), mode=mode,
                outcome="accepted" if delivered else "listener-gone",
                client=str(flow.peer_address), local=f"{stream.local[0]}:{stream.local[1]}",
                remote=f"{stream.remote[0]}:{stream.remote[1]}", setup_ms=setup_ms)

        self._spawn(hand_over())

    def _forget_request(self, request: _ServerRequest) -> None:
        flow_id = int(request.flow.local_flow)
        if request.watch is not None:
            request.watch.cancel()
            request.watch = None
        if request.token is not None and self._acceptor is not None:
            self._acceptor.forget(request.token)
            request.token = None
        if self._requests.get(flow_id) is request:
            del self._requests[flow_id]
        self._listener_of.pop(flow_id, None)

    def _drop_request(self, request: _ServerRequest, reason: str) -> None:
        """Abandon a half-open request silently (a frozen socket sends nothing)."""
        self._forget_request(request)
        for sock in (request.sock, request.verified):
            if sock is None:
                continue
            if self.repair is not None and sock is request.sock:
                self.repair.discard(sock)
            else:
                reset_close(sock)
        request.sock = request.verified = None
        flow_id = int(request.flow.local_flow)
        self._settle(None, "server", "aborted", request.flow.service,
                     request.mode.name.lower(), (str(request.local[0]), request.local[1]),
                     None, str(request.flow.peer_address), flow_id)
        self._canonical(role="server", flow=flow_id, service=str(request.flow.service),
                        mode=request.mode.name.lower(), outcome="aborted", reason=reason,
                        client=str(request.flow.peer_address))

    def expire_tokens(self) -> None:
        """Handshake requests whose token never came: aborted (counted)."""
        if self._acceptor is None:
            return
        for flow_id in self._acceptor.expire(self._loop.time()):
            request = self._requests.get(int(flow_id))
            if request is not None:
                self._counters.inc("stream.half_open_aborts")
                self._drop_request(request, "token never presented")

    def drop_listener(self, listener: StreamListener) -> None:
        """The listener went away: its half-open requests go too (clients get an RST)."""
        for request in [r for r in self._requests.values() if r.listener is listener]:
            self._drop_request(request, "listener closed")
        listener.core.close(self._loop.time())
        for packet, destination in listener.core.datagrams_to_send(self._loop.time()):
            if destination is not None:
                self._send(packet, destination)
        listener.timer.cancel()
