"""TCP_REPAIR primitives: servald's data plane (DESIGN.md section 3).

Theory of operation
-------------------
Every Serval stream is an ordinary kernel TCP connection whose two ends are created
directly in ESTABLISHED state from parameters exchanged in the SAL SYN / SYN-ACK, and
which can later be moved to a new 4-tuple. The recipe, with every pitfall, is
/work/shared/notes/tcp-repair-migration.md ("the notes"); section numbers below refer to it.

Establishing (notes section 4 and 4b):

* each side computes `own_transport_params()` (ISN, MSS, window scale, SACK/TS, initial
  window) and announces them;
* client: `prepare_client_socket()` binds (port 0: an ordinary bind, so the kernel picks a
  free port; an explicit port from `serval.host.ports.ClientPortAllocator`: repair mode
  *first*, whose forced reuse lets many connections to different destinations share a local
  port), sends the SAL SYN, and on the SYN-ACK `complete_socket()`;
* server: `build_server_socket()` on the SYN, left in repair mode (it sends nothing there:
  "frozen") until the SAL ACK or the first data, then `release()`.

A 4-tuple that already exists (a live connection, or a TIME-WAIT the kernel may not reuse
because timestamps are off) makes the repair-mode `connect()` fail with EADDRNOTAVAIL; that
surfaces as `RepairError(step="connect", errno=EADDRNOTAVAIL)` so the SAL can REFUSE and the
client retry on another port. With timestamps on, a TIME-WAIT of the same 4-tuple is
recycled by `connect()` (tcp_twsk_unique, bound-port path), which is what lets a client
port allocator beat the ~470 connections/s of bind(0) (notes 4b pitfall 10).

Migrating (notes section 3, "rsyn mode"), per side: `freeze()` (drop-all socket filter,
repair on, send window zeroed: input and output locks, P2/P3), `dump()` (with the
consistency check), exchange rcv_nxt and right window edge with the peer (RSYN /
RSYN-ACK / ACK), `rebuild()` on the new 4-tuple (send sequence = the peer's rcv_nxt: every
byte the peer lacks is re-sent as fresh data, P4), then `commit()` onto the application's fd
number (dup3, O_NONBLOCK copied, release, pending bytes written), or `rollback()`.

Every failure raises `RepairError(step, errno, message)`; sockets built here are closed
(silently: a repair-mode close sends neither FIN nor RST) when their construction fails.
The migration calls go straight to libc on the file descriptor, so application sockets with
a Python timeout (which would poll() before a peek, notes 4b pitfall 15) and bare fds work
alike. The establishing calls, which run for every new connection on servald's own fresh
sockets, use the socket object's setsockopt instead: a tenth of the cost through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import ipaddress
import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serval.errors import RepairError

# --------------------------------------------------------------------------------------------
# constants (notes section 2; values from linux/tcp.h, linux/sockios.h, asm/socket.h)

SOL_TCP = 6
TCP_NODELAY = 1
TCP_MAXSEG = 2
TCP_KEEPIDLE = 4
TCP_KEEPINTVL = 5
TCP_KEEPCNT = 6
TCP_INFO = 11
TCP_CONGESTION = 13
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_NOTSENT_LOWAT = 25
TCP_REPAIR_WINDOW = 29
TCP_USER_TIMEOUT = 18

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0  # leaves repair mode and sends a window probe
TCP_REPAIR_OFF_NO_WP = -1  # leaves repair mode silently (Linux 4.19+)

TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCPI_OPT_ECN = 8

TCP_ESTABLISHED = 1

SIOCINQ = 0x541B  # rcv_nxt - copied_seq
SIOCOUTQ = 0x5411  # write_seq - snd_una (unacked + unsent)
SIOCOUTQNSD = 0x894B  # write_seq - snd_nxt (unsent only)

SO_REUSEADDR = 2
SO_KEEPALIVE = 9
SO_OOBINLINE = 10
SO_PRIORITY = 12
SO_LINGER = 13
SO_RCVLOWAT = 18
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_MARK = 36
SO_RCVBUFFORCE = 33
SO_COOKIE = 57
IP_TOS = 1
IP_MTU = 14
IPV6_MTU = 24
IPV6_TCLASS = 67

TCP_MAX_WSCALE = 14
TCP_MAXSEG_MAX = 32767  # MAX_TCP_WINDOW: the largest MSS setsockopt(TCP_MAXSEG) accepts
UNSCALED_WINDOW_MAX = 65535
IPV4_HEADERS_BYTES = 40  # IPv4 + TCP header, no options: MSS = route MTU - this
IPV6_HEADERS_BYTES = 60

SEQ_MODULUS = 1 << 32
SEQ_MASK = SEQ_MODULUS - 1

TCP_INFO_BYTES = 256
REPAIR_WINDOW = struct.Struct("=5I")  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
REPAIR_OPT = struct.Struct("=II")  # opt_code, opt_val
_U32 = struct.Struct("=I")
_INT = struct.Struct("=i")

DUMP_ATTEMPTS = 5  # the consistency check re-dumps when a queue moved under us
SEND_QUEUE_PEEK_SLACK_BYTES = 64 * 1024  # the send-queue peek copies whole skbs
RECV_QUEUE_MIN_CHUNK_BYTES = 4096  # a failed receive-queue write is halved down to this
COMMIT_WRITE_TIMEOUT_S = 10.0
MTU_PROBE_PORT = 9  # any port: connecting a UDP socket sends nothing

# Application-visible socket options a migration carries over (notes section 8):
# (level, option, bytes, IPv4 only / IPv6 only / both)
_CARRIED_OPTIONS: tuple[tuple[int, int, int, int | None], ...] = (
    (SOL_TCP, TCP_NODELAY, 4, None),
    (SOL_TCP, TCP_KEEPIDLE, 4, None),
    (SOL_TCP, TCP_KEEPINTVL, 4, None),
    (SOL_TCP, TCP_KEEPCNT, 4, None),
    (SOL_TCP, TCP_USER_TIMEOUT, 4, None),
    (SOL_TCP, TCP_NOTSENT_LOWAT, 4, None),
    (SOL_TCP, TCP_CONGESTION, 16, None),
    (socket.SOL_SOCKET, SO_KEEPALIVE, 4, None),
    (socket.SOL_SOCKET, SO_OOBINLINE, 4, None),
    (socket.SOL_SOCKET, SO_PRIORITY, 4, None),
    (socket.SOL_SOCKET, SO_LINGER, 8, None),
    (socket.SOL_SOCKET, SO_RCVLOWAT, 4, None),
    (socket.SOL_SOCKET, SO_MARK, 4, None),
    (socket.IPPROTO_IP, IP_TOS, 4, socket.AF_INET),
    (socket.IPPROTO_IPV6, IPV6_TCLASS, 4, socket.AF_INET6),
)

SYSCTL_DIR = Path("/proc/sys/net")

# --------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class TransportParams:
    """One side's announcement in the SAL SYN / SYN-ACK (mirrors wire.TransportExt).

    `tsval` is local only and never announced: the TCP_TIMESTAMP base of this side's socket,
    random so TSval does not leak uptime or correlate connections (notes 4b pitfall 5).
    """

    isn: int  # u32, sequence number of this side's first data byte
    mss: int
    window_scale: int | None  # 0..14, None: this side does not scale its window
    sack: bool
    timestamps: bool
    window: int  # initial receive window in bytes (unscaled)
    tsval: int | None = None


@dataclass(frozen=True)
class RepairWindow:
    """struct tcp_repair_window."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int

    def pack(self) -> bytes:
        return REPAIR_WINDOW.pack(self.snd_wl1 & SEQ_MASK, self.snd_wnd, self.max_window,
                                  self.rcv_wnd, self.rcv_wup & SEQ_MASK)

    @classmethod
    def unpack(cls, data: bytes) -> RepairWindow:
        return cls(*REPAIR_WINDOW.unpack_from(data))

    @property
    def right_edge(self) -> int:
        """The receiver's right window edge, rcv_wup + rcv_wnd (mod 2^32)."""
        return (self.rcv_wup + self.rcv_wnd) & SEQ_MASK


@dataclass(frozen=True)
class TcpInfo:
    """The fields of struct tcp_info that servald and the tests use."""

    state: int
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    rto_us: int
    snd_mss: int
    rcv_mss: int
    advmss: int
    total_retrans: int
    segs_out: int
    segs_in: int
    data_segs_out: int
    bytes_sent: int
    snd_wnd: int
    rcv_wnd: int

    @property
    def sack(self) -> bool:
        return bool(self.options & TCPI_OPT_SACK)

    @property
    def timestamps(self) -> bool:
        return bool(self.options & TCPI_OPT_TIMESTAMPS)

    @property
    def window_scaling(self) -> bool:
        return bool(self.options & TCPI_OPT_WSCALE)


@dataclass(frozen=True)
class SocketState:
    """Everything `rebuild()` needs, dumped from a frozen ESTABLISHED socket."""

    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    mss_clamp: int
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    timestamp: int | None  # TCP_TIMESTAMP (opaque) when timestamps are on
    window: RepairWindow  # as it was before the freeze zeroed snd_wnd
    write_seq: int
    rcv_nxt: int
    unsent: int  # bytes of the send queue never transmitted
    send_queue: bytes | memoryview  # [snd_una, write_seq) (empty until read: send_queue_size)
    recv_queue: bytes  # [rcv_nxt - len, rcv_nxt): received, not yet read by the application
    socket_options: tuple[tuple[int, int, bytes], ...] = ()
    # Set by `dump(..., send_queue=False)`: the send queue's length, its contents not read yet
    # (`read_send_queue` reads them; everything else about the socket is known already).
    send_queue_size: int | None = None

    @property
    def send_queue_bytes(self) -> int:
        """Length of the send queue, whether or not its contents were read."""
        return len(self.send_queue) if self.send_queue_size is None else self.send_queue_size

    @property
    def snd_una(self) -> int:
        return (self.write_seq - self.send_queue_bytes) & SEQ_MASK

    @property
    def window_edge(self) -> int:
        """This side's right receive-window edge: what RSYN / RSYN-ACK carry."""
        return self.window.right_edge


class RebuiltSocket(socket.socket):
    """A socket made by `rebuild()`: still in repair mode, with the bytes still to send."""

    pending: bytes | memoryview
    state: SocketState
    skip: int  # bytes at the head of the old send queue that the peer already has

    def attach_send_queue(self, state: SocketState) -> None:
        """The old socket's send queue was read after the rebuild (`read_send_queue`):
        the pending bytes are its part the peer lacks (no copy)."""
        self.state = state
        self.pending = memoryview(state.send_queue)[self.skip:]


# --------------------------------------------------------------------------------------------
# raw socket calls on file descriptors (see module docstring for why not the socket object)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_uint32]
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]
_libc.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.recv.restype = ctypes.c_ssize_t
_libc.send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.send.restype = ctypes.c_ssize_t


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return k"; k = 0 accepts 0 bytes, i.e. drops
_DROP_ALL = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 0))


SocketLike = socket.socket | int


def _fd(sock: SocketLike) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def _os_error() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


def _setsockopt(fd: int, level: int, option: int, value: bytes) -> None:
    buffer = ctypes.create_string_buffer(value, len(value))
    if _libc.setsockopt(fd, level, option, buffer, len(value)) != 0:
        raise _os_error()


def _getsockopt(fd: int, level: int, option: int, size: int) -> bytes:
    buffer = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _libc.getsockopt(fd, level, option, buffer, ctypes.byref(length)) != 0:
        raise _os_error()
    return buffer.raw[: length.value]


def _set_int(fd: int, level: int, option: int, value: int) -> None:
    _setsockopt(fd, level, option, _INT.pack(value))


def _set_u32(fd: int, level: int, option: int, value: int) -> None:
    _setsockopt(fd, level, option, _U32.pack(value & SEQ_MASK))


def _get_u32(fd: int, level: int, option: int) -> int:
    value: int = _U32.unpack(_getsockopt(fd, level, option, 4).ljust(4, b"\0"))[0]
    return value


def _ioctl_int(fd: int, request: int) -> int:
    value: int = _INT.unpack(fcntl.ioctl(fd, request, b"\0" * 4))[0]
    return value


def _peek(fd: int, size: int) -> bytes:
    """recv(MSG_PEEK | MSG_DONTWAIT) into a fresh buffer; b'' when nothing is queued."""
    return bytes(_peek_view(fd, size))


def _peek_view(fd: int, size: int) -> memoryview:
    """Like `_peek`, but the kernel copies straight into the buffer that is returned (a view
    of the bytes received): queue dumps are megabytes, and each extra copy of them costs
    ~0.1-0.3 ms of a migration's pause on the test VM. A socket object's recv() does that
    into an uninitialised buffer, so it is used when it can be (without a global default
    timeout: then it neither polls first nor touches the shared file's O_NONBLOCK)."""
    if size <= 0:
        return memoryview(b"")
    if socket.getdefaulttimeout() is None:
        with socket.socket(fileno=os.dup(fd)) as view:
            try:
                return memoryview(view.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except (BlockingIOError, InterruptedError):
                return memoryview(b"")
    buffer = bytearray(size)
    count = _libc.recv(fd, (ctypes.c_char * size).from_buffer(buffer), size,
                       socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if count < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return memoryview(b"")
        raise OSError(err, os.strerror(err))
    return memoryview(buffer)[:count]


def _send_nowait(fd: int, data: memoryview) -> int:
    """One non-blocking send; returns bytes taken (0 if the buffer is full)."""
    buffer = (ctypes.c_char * len(data)).from_buffer_copy(data)
    count = _libc.send(fd, buffer, len(data), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    if count < 0:
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise OSError(err, os.strerror(err))
    return int(count)


def _step_error(step: str, detail: str, exc: OSError) -> RepairError:
    """The RepairError naming the repair step whose system call raised `exc`."""
    code = exc.errno if exc.errno is not None else errno.EIO
    hint = ""
    if step == "connect" and code == errno.EADDRNOTAVAIL:
        hint = " (4-tuple already in use: retry on another port)"
    where = f" {detail}" if detail else ""
    return RepairError(step, code, f"{step}{where} failed: {os.strerror(code)}{hint}")


@contextlib.contextmanager
def _step(step: str, detail: str = "") -> Iterator[None]:
    """Turn an OSError of one repair step into RepairError naming the step."""
    try:
        yield
    except OSError as exc:
        raise _step_error(step, detail, exc) from exc


def seq_diff(a: int, b: int) -> int:
    """a - b in signed 32-bit sequence arithmetic."""
    diff = (a - b) & SEQ_MASK
    return diff - SEQ_MODULUS if diff >= 1 << 31 else diff


@functools.lru_cache(maxsize=1024)
def _family(address: str) -> int:
    # Cached: parsing an address string costs more than all the repair calls it precedes.
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6


def _set_repair(fd: int, value: int) -> None:
    _set_int(fd, SOL_TCP, TCP_REPAIR, value)


def _select_queue(fd: int, queue: int) -> None:
    _set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, queue)


def socket_cookie(sock: SocketLike) -> int:
    """SO_COOKIE: the kernel's unique id of the socket (survives dup, changes on rebuild)."""
    value: int = struct.unpack("=Q", _getsockopt(_fd(sock), socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def tcp_info(sock: SocketLike) -> TcpInfo:
    """Parse getsockopt(TCP_INFO) (offsets in the notes, section 2)."""
    raw = _getsockopt(_fd(sock), SOL_TCP, TCP_INFO, TCP_INFO_BYTES).ljust(236, b"\0")
    scales = raw[6]
    return TcpInfo(
        state=raw[0], options=raw[5], snd_wscale=scales & 0x0F, rcv_wscale=scales >> 4,
        rto_us=_U32.unpack_from(raw, 8)[0], snd_mss=_U32.unpack_from(raw, 16)[0],
        rcv_mss=_U32.unpack_from(raw, 20)[0], advmss=_U32.unpack_from(raw, 84)[0],
        total_retrans=_U32.unpack_from(raw, 100)[0], segs_out=_U32.unpack_from(raw, 136)[0],
        segs_in=_U32.unpack_from(raw, 140)[0], data_segs_out=_U32.unpack_from(raw, 156)[0],
        bytes_sent=struct.unpack_from("=Q", raw, 200)[0], snd_wnd=_U32.unpack_from(raw, 228)[0],
        rcv_wnd=_U32.unpack_from(raw, 232)[0])


# --------------------------------------------------------------------------------------------
# this host's transport parameters


def _read_sysctl_ints(name: str, sysctl_dir: Path) -> list[int]:
    return [int(v) for v in (sysctl_dir / name).read_text().split()]


def route_mtu(local_ip: str, remote_ip: str) -> int:
    """The route MTU towards `remote_ip` from `local_ip`, in the calling thread's namespace.

    A connected UDP socket resolves the route (and any learned path MTU) without sending.
    SO_BROADCAST is set so that a broadcast destination (ad-hoc resolution's first hop)
    answers with its interface's MTU instead of EACCES.
    """
    family = _family(local_ip)
    with socket.socket(family, socket.SOCK_DGRAM) as probe, \
            _step("route_mtu", f"{local_ip} -> {remote_ip}"):
        if family == socket.AF_INET:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        probe.bind((local_ip, 0))
        probe.connect((remote_ip, MTU_PROBE_PORT))
        if family == socket.AF_INET:
            return probe.getsockopt(socket.IPPROTO_IP, IP_MTU)
        return probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)


def mss_for_mtu(mtu: int, family: int) -> int:
    """The MSS a route MTU allows (as tcp_connect_init() computes it), clamped to what
    setsockopt(TCP_MAXSEG) accepts: loopback's 64 KiB MTU would otherwise give ~65000,
    which the kernel refuses (its bound is MAX_TCP_WINDOW, 32767)."""
    headers = IPV4_HEADERS_BYTES if family == socket.AF_INET else IPV6_HEADERS_BYTES
    return max(1, min(mtu - headers, TCP_MAXSEG_MAX))


@dataclass(frozen=True)
class TcpSettings:
    """The sysctls of the calling thread's namespace that shape a new connection."""

    tcp_rmem: tuple[int, int, int]  # min, default, max
    rmem_max: int
    window_scaling: bool
    timestamps: bool
    sack: bool


def read_tcp_settings(sysctl_dir: Path = SYSCTL_DIR) -> TcpSettings:
    """Read the TCP sysctls (five small files: cache the result on a hot path)."""
    low, default, high = _read_sysctl_ints("ipv4/tcp_rmem", sysctl_dir)[:3]
    try:
        rmem_max = _read_sysctl_ints("core/rmem_max", sysctl_dir)[0]
    except OSError:  # not visible in every namespace on older kernels
        rmem_max = 0
    return TcpSettings(
        tcp_rmem=(low, default, high), rmem_max=rmem_max,
        window_scaling=_read_sysctl_ints("ipv4/tcp_window_scaling", sysctl_dir)[0] != 0,
        timestamps=_read_sysctl_ints("ipv4/tcp_timestamps", sysctl_dir)[0] != 0,
        sack=_read_sysctl_ints("ipv4/tcp_sack", sysctl_dir)[0] != 0)


def transport_params(settings: TcpSettings, mss: int, rng: random.Random) -> TransportParams:
    """This side's announcement for a path with MSS `mss`, with a fresh ISN and TSval base.

    Computed as tcp_select_initial_window() would (notes 4b): wscale =
    ilog2(max(tcp_rmem[2], rmem_max)) - 15, clamped to 0..14; window =
    rounddown(tcp_rmem[1] / 2, MSS); SACK / TS from the sysctls.
    """
    window_scale: int | None = None
    if settings.window_scaling:
        space = max(settings.tcp_rmem[2], settings.rmem_max)
        window_scale = min(max(space.bit_length() - 1 - 15, 0), TCP_MAX_WSCALE)
    window = (settings.tcp_rmem[1] // 2) // mss * mss
    if window_scale is None:
        window = min(window, UNSCALED_WINDOW_MAX)
    return TransportParams(
        isn=rng.getrandbits(32), mss=mss, window_scale=window_scale, sack=settings.sack,
        timestamps=settings.timestamps, window=window,
        # The low bit of TCP_TIMESTAMP selects usec timestamps on 6.7+: keep it 0 (ms).
        tsval=rng.getrandbits(32) & ~1 if settings.timestamps else None)


def own_transport_params(local_ip: str, remote_ip: str, rng: random.Random, *,
                         sysctl_dir: Path = SYSCTL_DIR) -> TransportParams:
    """What this host announces for a connection from `local_ip` towards `remote_ip` (the
    peer, or the first hop when the peer is not known yet: the peer takes the minimum MSS).

    MSS = route MTU - 40 (IPv6: 60), at most TCP_MAXSEG_MAX; the rest as
    `transport_params()`. Reads the calling thread's network namespace; uncached (servald
    caches `read_tcp_settings()` and `route_mtu()` itself).
    """
    mss = mss_for_mtu(route_mtu(local_ip, remote_ip), _family(local_ip))
    return transport_params(read_tcp_settings(sysctl_dir), mss, rng)


# --------------------------------------------------------------------------------------------
# establishing


def prepare_client_socket(local_ip: str, port: int = 0) -> socket.socket:
    """A client socket bound to `local_ip`, in repair mode, ready for `complete_socket()`.

    port 0: an ordinary bind *before* repair mode, so the kernel picks a port that collides
    with nothing (but exclusive per address and never a TIME-WAIT one: notes 4b pitfall 10).
    An explicit port (from `ClientPortAllocator`): repair mode *first*, whose forced reuse
    lets connections to different destinations share the port; a real 4-tuple conflict then
    shows at `complete_socket()` (or at the server) as EADDRNOTAVAIL.
    """
    sock = socket.socket(_family(local_ip), socket.SOCK_STREAM)
    step = "bind" if port == 0 else "repair_on"
    try:
        if port == 0:
            sock.bind((local_ip, 0))
            step = "repair_on"
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        else:
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            step = "bind"
            sock.bind((local_ip, port))
    except OSError as exc:
        sock.close()
        detail = f"{local_ip}:{port}" if step == "bind" else ""
        raise _step_error(step, detail, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def complete_socket(sock: socket.socket, own: TransportParams, peer: TransportParams,
                    peer_addr: str, peer_port: int, release: bool = True) -> None:
    """Client side, on the SYN-ACK: put the bound repair-mode socket into ESTABLISHED.

    With `release` (default) it leaves repair mode at once: the server's socket exists by
    now (the SYN-ACK proves it), so its first packet can draw no RST. On failure the socket
    is closed (silently) and RepairError raised; EADDRNOTAVAIL means retry on another port.
    """
    try:
        _establish(sock, own, peer, peer_addr, peer_port)
        if release:
            try:
                sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                sock.setsockopt(socket.SOL_SOCKET, SO_REUSEADDR, 1)
            except OSError as exc:
                raise _step_error("release", "", exc) from exc
    except BaseException:
        sock.close()
        raise


def build_server_socket(local_ip: str, port: int, own: TransportParams, peer: TransportParams,
                        peer_addr: str, peer_port: int) -> socket.socket:
    """Server side, on the SAL SYN: the connection's socket, ESTABLISHED and still frozen in
    repair mode (it sends nothing) until `release()` on the SAL ACK or the first data.

    Repair mode comes before bind, so every connection can share the service port with the
    listener and with each other. On failure nothing is left open; EADDRNOTAVAIL (4-tuple
    in use) is the cue for the SAL to REFUSE so the client retries on another port.
    """
    sock = socket.socket(_family(local_ip), socket.SOCK_STREAM)
    try:
        step = "repair_on"
        try:
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
            step = "bind"
            sock.bind((local_ip, port))
        except OSError as exc:
            raise _step_error(step, f"{local_ip}:{port}" if step == "bind" else "", exc) \
                from exc
        _establish(sock, own, peer, peer_addr, peer_port)
    except BaseException:
        sock.close()
        raise
    return sock


def _establish(sock: socket.socket, own: TransportParams, peer: TransportParams,
               peer_addr: str, peer_port: int) -> None:
    """Steps 2-7 of notes section 4 on a bound repair-mode socket.

    This runs twice per connection (once per end) on servald's set-up path, so it calls
    the socket object's setsockopt directly (a tenth of the cost of going through ctypes;
    these are sockets servald created, never an application's with a timeout) and tracks
    the step in a variable rather than a context manager per call.
    """
    setsockopt = sock.setsockopt
    scaling = own.window_scale is not None and peer.window_scale is not None
    timestamps = own.timestamps and peer.timestamps
    mss = min(own.mss, peer.mss)
    options = bytearray()
    if own.sack and peer.sack:
        options += REPAIR_OPT.pack(TCPOPT_SACK_PERM, 0)
    # Always pass WINDOW: without it the side whose sysctl allows scaling keeps the shift
    # its repair connect() picked and advertises a ~63-byte window (notes 4b pitfall 1).
    options += REPAIR_OPT.pack(TCPOPT_WINDOW, (peer.window_scale or 0)
                               | (own.window_scale or 0) << 16 if scaling else 0)
    if timestamps:
        options += REPAIR_OPT.pack(TCPOPT_TIMESTAMP, 0)
    options += REPAIR_OPT.pack(TCPOPT_MAXSEG, mss)
    send_window = peer.window if scaling else min(peer.window, UNSCALED_WINDOW_MAX)
    receive_window = own.window if scaling else min(own.window, UNSCALED_WINDOW_MAX)
    # rcv_wup = peer ISN = this socket's rcv_nxt, which the kernel checks.
    window = RepairWindow(peer.isn, send_window, send_window, receive_window, peer.isn)
    step, detail = "queue_seq", ""
    try:
        # Only possible in CLOSE state, i.e. before connect().
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _U32.pack(own.isn & SEQ_MASK))
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _U32.pack(peer.isn & SEQ_MASK))
        setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        step = "maxseg"
        # Before connect, or mss_cache is computed from the default clamp: 524 (P1).
        setsockopt(SOL_TCP, TCP_MAXSEG, mss)
        step, detail = "connect", f"to {peer_addr}:{peer_port}"
        sock.connect((peer_addr, peer_port))  # repair mode: no SYN, straight to ESTABLISHED
        step, detail = "repair_options", ""
        setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, bytes(options))
        if timestamps and own.tsval is not None:
            step = "timestamp"
            setsockopt(SOL_TCP, TCP_TIMESTAMP, _U32.pack(own.tsval & SEQ_MASK))
        step = "repair_window"
        setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, window.pack())
    except OSError as exc:
        raise _step_error(step, detail, exc) from exc


def release(sock: SocketLike, *, window_probe: bool = True) -> None:
    """Leave repair mode: the socket becomes an ordinary one and may send.

    The window probe (default) draws an ACK that resynchronises the peer; without it the
    first data does that. SO_REUSEADDR is set again afterwards because leaving repair mode
    resets sk_reuse, which would stop a SO_REUSEADDR listener from re-binding the shared
    port (notes 4b pitfall 11).
    """
    if isinstance(sock, socket.socket):
        # The set-up path (servald's own sockets): the socket object's setsockopt is cheaper.
        try:
            sock.setsockopt(SOL_TCP, TCP_REPAIR,
                            TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP)
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEADDR, 1)
        except OSError as exc:
            raise _step_error("release", "", exc) from exc
        return
    _leave_repair(sock, window_probe=window_probe)


def _leave_repair(fd: int, *, window_probe: bool) -> None:
    with _step("release"):
        _set_repair(fd, TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP)
        _set_int(fd, socket.SOL_SOCKET, SO_REUSEADDR, 1)


def in_repair_mode(sock: SocketLike) -> bool:
    """Whether the socket is in repair mode: frozen by a migration (possibly by a servald that
    died during it). Reading the option needs no privilege; False for anything not TCP."""
    try:
        return _get_u32(_fd(sock), SOL_TCP, TCP_REPAIR) == 1
    except OSError:
        return False


def thaw_orphan(sock: SocketLike) -> str | None:
    """Undo what a servald that died mid-migration left on the socket; says what it found.

    freeze() locks a socket's input (drop-all filter) and puts it in repair mode with its send
    window zeroed; rollback() needs the window freeze() saved, which died with that servald.
    Here: filter off, repair off (TCP_REPAIR_OFF sends a window probe; the peer's answer opens
    the send window again). Nothing was swapped yet (a swap follows the peer's rebuild), so the
    old socket is the right one to go on with. Needs CAP_NET_ADMIN for the repair part.
    """
    fd = _fd(sock)
    found: list[str] = []
    try:
        unlock_input(fd)
        found.append("input lock")
    except OSError:
        pass  # ENOENT: no filter, the usual case
    if in_repair_mode(fd):
        with contextlib.suppress(OSError):
            _select_queue(fd, TCP_NO_QUEUE)
        with contextlib.suppress(OSError):
            _set_repair(fd, TCP_REPAIR_OFF)
            found.append("repair mode")
    return " and ".join(found) or None


def discard(sock: socket.socket) -> None:
    """Close a socket without a trace on the wire: repair mode first, so no FIN and no RST."""
    with contextlib.suppress(OSError):
        _set_repair(sock.fileno(), TCP_REPAIR_ON)
    sock.close()


# --------------------------------------------------------------------------------------------
# migration (notes section 3)

# freeze() keeps the window it zeroed, keyed by socket cookie, for dump() and rollback().
_FROZEN_WINDOWS: dict[int, RepairWindow] = {}


def lock_input(sock: SocketLike) -> None:
    """The input lock (notes P2): a drop-all classic-BPF filter, run before any TCP
    processing, so no data, ACK or RST reaches the state machine. Dropped segments are not
    lost: the peer retransmits them. Attaching it again replaces it (a no-op)."""
    program = _SockFprog(1, _DROP_ALL)
    if _libc.setsockopt(_fd(sock), socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(program),
                        ctypes.sizeof(program)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"input lock: {os.strerror(err)}")


def unlock_input(sock: SocketLike) -> None:
    """Detach the input lock; OSError (ENOENT) if there was none."""
    _setsockopt(_fd(sock), socket.SOL_SOCKET, SO_DETACH_FILTER, _INT.pack(0))


def freeze(sock: SocketLike) -> RepairWindow:
    """Lock the socket in both directions and enter repair mode (notes 3.1 steps 1-3).

    Input lock: a drop-all classic-BPF filter, run before any TCP processing, so no data,
    ACK or RST reaches the state machine (P2). Output lock: send window zeroed through
    TCP_REPAIR_WINDOW, so pacing / TSQ cannot push new data out during the dump (P3).
    Returns the window as it was; on failure the socket is left as it was found.
    """
    fd = _fd(sock)
    with _step("attach_filter"):
        lock_input(fd)
    try:
        with _step("repair_on"):
            _set_repair(fd, TCP_REPAIR_ON)
        try:
            with _step("zero_window"):
                window = RepairWindow.unpack(_getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW,
                                                         REPAIR_WINDOW.size))
                locked = RepairWindow(window.snd_wl1, 0, window.max_window, window.rcv_wnd,
                                      window.rcv_wup)
                _setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, locked.pack())
        except BaseException:
            with contextlib.suppress(OSError):
                _set_repair(fd, TCP_REPAIR_OFF)
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            unlock_input(fd)
        raise
    _FROZEN_WINDOWS[socket_cookie(fd)] = window
    return window


def _queue_counters(fd: int) -> tuple[int, int, int, int]:
    return (tcp_info(fd).segs_in, _ioctl_int(fd, SIOCINQ), _ioctl_int(fd, SIOCOUTQ),
            _ioctl_int(fd, SIOCOUTQNSD))


def _socket_options(fd: int, family: int) -> tuple[tuple[int, int, bytes], ...]:
    carried: list[tuple[int, int, bytes]] = []
    for level, option, size, only in _CARRIED_OPTIONS:
        if only is not None and only != family:
            continue
        with contextlib.suppress(OSError):
            carried.append((level, option, _getsockopt(fd, level, option, size)))
    return tuple(carried)


def dump(sock: SocketLike, frozen_window: RepairWindow | None = None, *,
         send_queue: bool = True) -> SocketState:
    """Read a frozen socket's state (notes 3.1 steps 4-9), re-dumping if anything moved.

    `frozen_window` is what `freeze()` returned; by default it is looked up by the socket's
    cookie. Raises RepairError when the socket is not frozen, not ESTABLISHED, or its
    queues would not hold still (never seen with both locks in place).

    `send_queue=False` leaves the send queue's contents (megabytes under load) for
    `read_send_queue`: nothing in the RSYN / RSYN-ACK exchange or in `rebuild` needs them,
    only the bytes written after `commit` do, so a migration reads them while its SAL
    message is in flight. The frozen socket keeps them unchanged until then.
    """
    fd = _fd(sock)
    window_before = frozen_window or _FROZEN_WINDOWS.get(socket_cookie(fd))
    if window_before is None:
        raise RepairError("dump", errno.EINVAL, "dump: socket is not frozen (call freeze())")
    with _step("dump", "addresses"):
        family = _get_u32(fd, socket.SOL_SOCKET, socket.SO_DOMAIN)
        # A socket object on a dup of the fd, for its address parsing. Under a global
        # default timeout its creation would set O_NONBLOCK on the shared open file, so
        # the application's flags are put back.
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            with socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd)) as view:
                local = view.getsockname()[:2]
                remote = view.getpeername()[:2]
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    last_problem = ""
    queued: bytes | memoryview = b""
    for _attempt in range(DUMP_ATTEMPTS):
        with _step("dump"):
            before = _queue_counters(fd)
            info = tcp_info(fd)
            if info.state != TCP_ESTABLISHED:
                raise RepairError("dump", errno.ENOTCONN,
                                  f"dump: socket is in TCP state {info.state}, not ESTABLISHED")
            mss_clamp = _get_u32(fd, SOL_TCP, TCP_MAXSEG)
            timestamp = (_get_u32(fd, SOL_TCP, TCP_TIMESTAMP)
                         if info.options & TCPI_OPT_TIMESTAMPS else None)
            _, inq, outq, unsent = before
            _select_queue(fd, TCP_RECV_QUEUE)
            rcv_nxt = _get_u32(fd, SOL_TCP, TCP_QUEUE_SEQ)
            recv_queue = _peek(fd, inq)
            _select_queue(fd, TCP_SEND_QUEUE)
            write_seq = _get_u32(fd, SOL_TCP, TCP_QUEUE_SEQ)
            queued = b""
            if send_queue and outq:
                queued = _peek_view(fd, outq + SEND_QUEUE_PEEK_SLACK_BYTES)
            # Never leave the send queue selected (P8: tcp_write_xmit would mark new data
            # as sent without sending it).
            _select_queue(fd, TCP_NO_QUEUE)
            after = _queue_counters(fd)
        peeked = len(queued) if send_queue else outq
        if len(recv_queue) != inq or peeked != outq:
            last_problem = (f"short queue peek: recv {len(recv_queue)}/{inq}, "
                            f"send {peeked}/{outq}")
            continue
        if after != before:
            last_problem = f"queues moved during the dump: {before} -> {after}"
            continue
        return SocketState(
            family=family, local=(str(local[0]), int(local[1])),
            remote=(str(remote[0]), int(remote[1])), mss_clamp=mss_clamp,
            options=info.options, snd_wscale=info.snd_wscale, rcv_wscale=info.rcv_wscale,
            timestamp=timestamp, window=window_before, write_seq=write_seq, rcv_nxt=rcv_nxt,
            unsent=unsent, send_queue=queued, recv_queue=recv_queue,
            socket_options=_socket_options(fd, family),
            send_queue_size=None if send_queue else outq)
    raise RepairError("dump", errno.EAGAIN,
                      f"dump: inconsistent after {DUMP_ATTEMPTS} attempts: {last_problem}")


def read_send_queue(sock: SocketLike, state: SocketState) -> SocketState:
    """The send queue's contents, for a `dump(..., send_queue=False)` of the same frozen
    socket (returned as a new, complete SocketState). Raises RepairError when the queue is
    not what the dump found."""
    if state.send_queue_size is None:
        return state
    fd = _fd(sock)
    size = state.send_queue_size
    with _step("dump", "send queue"):
        _select_queue(fd, TCP_SEND_QUEUE)
        try:
            if _get_u32(fd, SOL_TCP, TCP_QUEUE_SEQ) != state.write_seq:
                raise RepairError("dump", errno.EAGAIN, "dump: the send queue moved after "
                                                        "the dump (socket not frozen?)")
            queued = _peek_view(fd, size + SEND_QUEUE_PEEK_SLACK_BYTES) if size else \
                memoryview(b"")
        finally:
            _select_queue(fd, TCP_NO_QUEUE)  # P8, as in dump()
    if len(queued) != size:
        raise RepairError("dump", errno.EAGAIN,
                          f"dump: short send-queue peek: {len(queued)}/{size}")
    return dataclasses.replace(state, send_queue=queued, send_queue_size=None)


def rebuild(state: SocketState, new_local: tuple[str, int], new_remote: tuple[str, int],
            peer_rcv_nxt: int, peer_window_edge: int) -> RebuiltSocket:
    """The replacement socket on the new 4-tuple, left in repair mode (notes 3.3).

    rsyn mode: the send sequence starts at the peer's rcv_nxt and every byte the peer lacks
    (`.pending`) is written as fresh data after `commit()`, so nothing waits for an RTO (P4).
    The send window is rebased on the peer's right edge. Raises RepairError (EPROTO) when the
    peer's rcv_nxt lies outside [snd_una, write_seq]: the two dumps do not match.
    """
    skip = seq_diff(peer_rcv_nxt, state.snd_una)
    if not 0 <= skip <= state.send_queue_bytes:
        raise RepairError("rebuild", errno.EPROTO,
                          f"rebuild: peer rcv_nxt {peer_rcv_nxt} outside [snd_una "
                          f"{state.snd_una}, write_seq {state.write_seq}] (skip={skip})")
    sock = RebuiltSocket(state.family, socket.SOCK_STREAM)
    try:
        fd = sock.fileno()
        with _step("repair_on"):
            _set_repair(fd, TCP_REPAIR_ON)  # before bind: forced reuse of the local port
        with _step("bind", f"{new_local[0]}:{new_local[1]}"):
            sock.bind(new_local)
        with _step("queue_seq"):
            _select_queue(fd, TCP_SEND_QUEUE)
            _set_u32(fd, SOL_TCP, TCP_QUEUE_SEQ, peer_rcv_nxt)
            _select_queue(fd, TCP_RECV_QUEUE)
            _set_u32(fd, SOL_TCP, TCP_QUEUE_SEQ, state.rcv_nxt - len(state.recv_queue))
            _select_queue(fd, TCP_NO_QUEUE)
        with _step("maxseg"):
            _set_int(fd, SOL_TCP, TCP_MAXSEG, state.mss_clamp)  # before connect (P1)
        with _step("connect", f"to {new_remote[0]}:{new_remote[1]}"):
            sock.connect(new_remote)
        options: list[tuple[int, int]] = []
        if state.options & TCPI_OPT_SACK:
            options.append((TCPOPT_SACK_PERM, 0))
        options.append((TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16
                        if state.options & TCPI_OPT_WSCALE else 0))
        if state.options & TCPI_OPT_TIMESTAMPS:
            options.append((TCPOPT_TIMESTAMP, 0))
        options.append((TCPOPT_MAXSEG, state.mss_clamp))
        with _step("repair_options"):
            _setsockopt(fd, SOL_TCP, TCP_REPAIR_OPTIONS,
                        b"".join(REPAIR_OPT.pack(code, value) for code, value in options))
        if state.timestamp is not None:
            with _step("timestamp"):
                _set_u32(fd, SOL_TCP, TCP_TIMESTAMP, state.timestamp)
        _restore_receive_queue(sock, state.recv_queue)
        # After the receive queue: the kernel checks rcv_wup against rcv_nxt.
        send_window = max(0, seq_diff(peer_window_edge, peer_rcv_nxt))
        window = RepairWindow(state.window.snd_wl1, send_window,
                              max(state.window.max_window, send_window),
                              state.window.rcv_wnd, state.window.rcv_wup)
        with _step("repair_window"):
            _setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, window.pack())
        _apply_socket_options(fd, state.socket_options)
    except BaseException:
        sock.close()
        raise
    sock.skip = skip
    sock.state = state
    # Without a copy (a memoryview); empty until `attach_send_queue` when the dump left the
    # send queue's contents for later.
    sock.pending = memoryview(state.send_queue)[skip:]
    return sock


def _restore_receive_queue(sock: socket.socket, data: bytes) -> None:
    """Write the dumped receive queue back (notes 3.3 step 7): the kernel takes at most
    MAX_SKB_FRAGS pages per call; on ENOMEM halve the chunk, then force a bigger buffer."""
    if not data:
        return
    fd = sock.fileno()
    view = memoryview(data)
    chunk = len(data)
    forced = False
    with _step("restore_recv_queue"):
        _select_queue(fd, TCP_RECV_QUEUE)
        try:
            while view:
                try:
                    sent = sock.send(view[:chunk])
                except OSError as exc:
                    if exc.errno != errno.ENOMEM:
                        raise
                    if chunk > RECV_QUEUE_MIN_CHUNK_BYTES:
                        chunk = max(chunk // 2, RECV_QUEUE_MIN_CHUNK_BYTES)
                    elif not forced:
                        # Fallback only: forcing the buffer turns off receive autotuning.
                        _set_int(fd, socket.SOL_SOCKET, SO_RCVBUFFORCE, 2 * len(data))
                        forced = True
                    else:
                        raise
                    continue
                view = view[sent:]
        finally:
            _select_queue(fd, TCP_NO_QUEUE)


def _apply_socket_options(fd: int, options: tuple[tuple[int, int, bytes], ...]) -> None:
    for level, option, value in options:
        try:
            current = _getsockopt(fd, level, option, len(value))
        except OSError:
            current = b""
        if current == value:
            continue
        if option == TCP_CONGESTION and level == SOL_TCP:
            value = value.split(b"\0", 1)[0]
        with _step("socket_option", f"level {level} option {option}"):
            _setsockopt(fd, level, option, value)


def commit(new_sock: RebuiltSocket, app_fd: int, *, write_pending: bool = True,
           timeout_s: float = COMMIT_WRITE_TIMEOUT_S) -> bytes | memoryview:
    """Swap the rebuilt socket in under the application's fd number and unfreeze it
    (notes 3.4): dup3(O_CLOEXEC) onto `app_fd` (this releases the old socket, still in repair
    mode, silently), copy the open-file flags (O_NONBLOCK), leave repair mode, then write the
    pending bytes, before the application may use the fd again.

    With `write_pending=False` nothing is written and the pending bytes are returned: an
    event loop must then write them (e.g. `loop.sock_sendall`) before un-parking the
    application, and should send the SAL ACK first, since a blocking write can wait for the
    peer's application to read. Returns b'' otherwise. The caller re-registers `app_fd`
    with its epoll: the old registration vanished with the old file (P6).
    """
    if not isinstance(new_sock, RebuiltSocket):
        raise TypeError("commit() takes the socket returned by rebuild()")
    with _step("commit", f"onto fd {app_fd}"):
        flags = fcntl.fcntl(app_fd, fcntl.F_GETFL)
        with contextlib.suppress(OSError):
            _FROZEN_WINDOWS.pop(socket_cookie(app_fd), None)
        os.dup2(new_sock.fileno(), app_fd, inheritable=False)  # dup3(..., O_CLOEXEC)
        fcntl.fcntl(app_fd, fcntl.F_SETFL, flags)
    pending = new_sock.pending
    new_sock.close()
    release(app_fd)
    if not write_pending:
        return pending
    send_all(app_fd, pending, timeout_s=timeout_s)
    return b""


def send_all(fd: int, data: bytes | memoryview, *,
             timeout_s: float = COMMIT_WRITE_TIMEOUT_S) -> None:
    """Write all of `data` to a socket fd, blocking or not, within `timeout_s`."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    with _step("write_pending", f"{len(data)} bytes on fd {fd}"):
        while view:
            sent = _send_nowait(fd, view)
            view = view[sent:]
            if not view:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
            poller.poll(remaining * 1000)


def rollback(sock: SocketLike, state: SocketState | None = None) -> None:
    """Resume a frozen socket where it was (notes 3.6): window back, filter off, repair off.

    `state` is the dump, if there was one; without it the window saved by `freeze()` is used.
    """
    fd = _fd(sock)
    with _step("rollback"):
        cookie = socket_cookie(fd)
        window = state.window if state is not None else _FROZEN_WINDOWS.get(cookie)
        with contextlib.suppress(OSError):
            _select_queue(fd, TCP_NO_QUEUE)  # in case a dump failed half-way
        if window is not None:
            _setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, window.pack())
        unlock_input(fd)
        _FROZEN_WINDOWS.pop(cookie, None)
    release(fd)
