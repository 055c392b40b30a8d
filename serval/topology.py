"""Network-namespace topologies: the one helper used by tests, benchmarks and the demo.

Theory of operation
-------------------
A topology is a set of *hosts* (routers are hosts with forwarding on), each in its own
network namespace, joined by *segments*: a LAN (a Linux bridge, living in one extra
"switch" namespace of the topology) or a point-to-point link (a veth pair straight between
two hosts). Every namespace name starts with the topology's unique prefix
(``svt<6 hex>-<host>``), so nothing here ever touches a namespace it did not create, and
the root namespace is never modified: veth pairs are created directly with one end in each
namespace.

Addresses: segment k (LANs first, then links, in spec order, from 1) gets ``10.77.k.0/24``
and ``fd77:0:0:k::/64`` by default; the i-th host attached to it gets ``.i`` / ``::i``.
A host's interfaces are ``eth0``, ``eth1``, ... in that same segment order; look them up by
segment name (``host.address("lan1")``, ``host.interface("a-b")``).
Routes are computed from the graph: a host reaches a segment it is not on through the
nearest router (breadth-first over routers only, since only routers forward).

Shaping (optional, per segment): ``rate`` puts a tbf qdisc on both directions of every
attachment (the host's egress and the far end's egress: the "wire" to that host);
``loss_pct`` drops packets at random with an nftables netdev-ingress rule on each host's
interface, so a packet between two hosts of the segment is dropped with that probability
once. (netem is not available on the target kernels, hence nftables ``numgen``.)

Lifetime: `AsyncTopology` (asyncio, pyroute2 ``AsyncIPRoute`` for netlink) does the work;
`Topology` is a thin synchronous wrapper that runs it on a private event-loop thread, so
plain pytest tests and scripts can use it. Teardown removes everything even after a failure:
context managers, an ``atexit`` hook, and `cleanup_stale()` for leftovers of crashed runs.
A crashed run is recognised by its owner record (``<state dir>/<topology id>/owner.json``,
written before any namespace exists) naming a process that is gone; namespaces without
such a record are never touched, even if their names look like ours.

Running code inside a host: ``host.run(argv)`` / ``host.popen(argv)`` (through
``ip netns exec``; popen'ed processes are killed on teardown), ``with host.enter():``
(this thread only, restored on exit: sockets created inside belong to the host), and
``host.call(fn, ...)`` / ``host.thread(fn, ...)`` (a fresh thread inside the namespace).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pyroute2 import AsyncIPRoute

T = TypeVar("T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_PREFIX = "svt"
NETNS_DIR = Path("/run/netns")
STATE_DIR = Path(tempfile.gettempdir()) / "serval-topology"
DEFAULT_IPV4_BASE = "10.77.0.0/16"  # segment k -> 10.77.k.0/24
DEFAULT_IPV6_BASE = "fd77::/48"  # segment k -> fd77:0:0:k::/64
CONTROL_SOCKET_NAME = "servald.sock"
CONTROL_SOCKET_ENV = "SERVAL_CONTROL_SOCKET"

RUN_TIMEOUT_S = 30.0
SYNC_CALL_TIMEOUT_S = 120.0
TERMINATE_GRACE_S = 3.0
CALL_TIMEOUT_S = 60.0
STALE_UNRECORDED_AGE_S = 600.0
TBF_LATENCY_MS = 50.0
# tbf needs a bucket of at least one jiffy of traffic at the configured rate, or it cannot
# reach that rate; 4 ms covers HZ=250 kernels. The floor lets a few full-size frames through.
TBF_BURST_S = 0.004
TBF_MIN_BURST_BYTES = 16 * 1514
LOSS_RESOLUTION = 1_000_000  # numgen modulus: loss is specified to 1e-4 percent

_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_PREFIX_RE = re.compile(r"^[a-z]{1,8}$")
_TOPOLOGY_ID_HEX = 6
_SWITCH_SUFFIX = "-_sw"  # host names cannot start with '_', so this never collides
_NFT_TABLE = "svt_loss"
_IFA_F_NODAD = 0x02
_CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)

# Sysctls of every host namespace. promote_secondaries: deleting a host's first address must
# not take its other addresses of that subnet with it (migration tests delete the old one).
# keep_addr_on_down: link-down tests keep IPv6 addresses like IPv4 ones. accept_dad=0: IPv6
# addresses are usable at once (addresses are also added with NODAD).
_HOST_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("ipv4/conf/all/promote_secondaries", "1"),
    ("ipv4/conf/default/promote_secondaries", "1"),
    ("ipv4/conf/all/rp_filter", "0"),
    ("ipv4/conf/default/rp_filter", "0"),
    ("ipv6/conf/all/accept_dad", "0"),
    ("ipv6/conf/default/accept_dad", "0"),
    ("ipv6/conf/all/keep_addr_on_down", "1"),
    ("ipv6/conf/default/keep_addr_on_down", "1"),
)
_ROUTER_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("ipv4/ip_forward", "1"),
    ("ipv6/conf/all/forwarding", "1"),
)
# The switch namespace is pure layer 2: no IPv6 link-local chatter from the bridge ports.
_SWITCH_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("ipv6/conf/all/disable_ipv6", "1"),
    ("ipv6/conf/default/disable_ipv6", "1"),
)


# --------------------------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class Shaping:
    """Per-segment link emulation. `rate` uses tc syntax ('1gbit', '100mbit')."""

    rate: str | None = None
    loss_pct: float = 0.0  # per direction, between two hosts of the segment
    burst_bytes: int | None = None  # tbf bucket; default from the rate (TBF_BURST_S)
    latency_ms: float = TBF_LATENCY_MS  # tbf queue limit, expressed as queueing delay

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss_pct <= 100.0:
            raise ValueError(f"Shaping.loss_pct must be within 0..100, got {self.loss_pct}")
        if self.rate is not None:
            _rate_bits_per_s(self.rate)  # validate early


@dataclass(frozen=True)
class LanSpec:
    """A LAN: a bridge with every listed host attached by its own veth pair."""

    name: str
    hosts: tuple[str, ...]
    shaping: Shaping | None = None
    ipv4_subnet: str | None = None
    ipv6_subnet: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(self.hosts))


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point link: one veth pair between hosts `a` and `b`."""

    a: str
    b: str
    shaping: Shaping | None = None
    name: str | None = None  # default 'a-b'
    ipv4_subnet: str | None = None
    ipv6_subnet: str | None = None


@dataclass(frozen=True)
class TopologySpec:
    """What to build. Routers are hosts too (listed in `routers`, not in `hosts`)."""

    hosts: tuple[str, ...]
    lans: tuple[LanSpec, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    routers: tuple[str, ...] = ()
    ipv6: bool = True
    ipv4_base: str = DEFAULT_IPV4_BASE
    ipv6_base: str = DEFAULT_IPV6_BASE

    def __post_init__(self) -> None:
        for name in ("hosts", "lans", "links", "routers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        nodes = [*self.hosts, *self.routers]
        for node in nodes:
            if not _NAME_RE.match(node):
                raise ValueError(f"host name {node!r} must match {_NAME_RE.pattern}")
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"duplicate host names in {nodes}")
        segment_names: set[str] = set()
        for lan in self.lans:
            _check_members(lan.name, lan.hosts, nodes)
            segment_names.add(lan.name)
        for link in self.links:
            if link.a == link.b:
                raise ValueError(f"link {_link_name(link)} connects {link.a} to itself")
            _check_members(_link_name(link), (link.a, link.b), nodes)
            segment_names.add(_link_name(link))
        if len(segment_names) != len(self.lans) + len(self.links):
            raise ValueError("segment names (LAN names and link names) must be unique")
        if len(self.lans) + len(self.links) > 255:
            raise ValueError("at most 255 segments per topology")

    @classmethod
    def pair(cls, a: str = "a", b: str = "b", shaping: Shaping | None = None) -> TopologySpec:
        """Two hosts on one point-to-point link: the most common test topology."""
        return cls(hosts=(a, b), links=(LinkSpec(a, b, shaping=shaping),))

    @classmethod
    def lan(cls, *hosts: str, name: str = "lan", shaping: Shaping | None = None) -> TopologySpec:
        """Hosts on one LAN (a bridge)."""
        return cls(hosts=hosts, lans=(LanSpec(name, hosts, shaping=shaping),))


def _link_name(link: LinkSpec) -> str:
    return link.name if link.name is not None else f"{link.a}-{link.b}"


def _check_members(segment: str, members: Sequence[str], nodes: Sequence[str]) -> None:
    for member in members:
        if member not in nodes:
            raise ValueError(f"segment {segment!r} names unknown host {member!r}")
    if len(set(members)) != len(members):
        raise ValueError(f"segment {segment!r} lists a host twice")


# --------------------------------------------------------------------------------------------
# the built objects


@dataclass
class Segment:
    """A built LAN or link: its subnets and attachments, in attachment order."""

    name: str
    kind: str  # 'lan' or 'link'
    number: int
    ipv4_subnet: ipaddress.IPv4Network
    ipv6_subnet: ipaddress.IPv6Network | None
    shaping: Shaping | None
    hosts: list[str] = field(default_factory=list)
    bridge: str | None = None  # bridge name in the switch namespace (LANs only)


@dataclass
class Interface:
    """One host interface: its name inside the host namespace and its addresses."""

    name: str
    segment: Segment
    addresses: list[IPInterface] = field(default_factory=list)
    peer_name: str = ""  # the other end: switch port (LAN) or the peer host's interface
    peer_netns: str = ""


class CommandError(subprocess.CalledProcessError):
    """A command run in a namespace failed; unlike its base class, shows stderr."""

    def __str__(self) -> str:
        stderr = self.stderr.strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()}: {stderr!r}"


class NamespaceThread(threading.Thread, Generic[T]):
    """A thread running `target` inside a host's network namespace; `result()` joins it."""

    def __init__(self, netns: str, target: Callable[..., T], args: tuple[Any, ...],
                 kwargs: Mapping[str, Any]) -> None:
        super().__init__(name=f"netns:{netns}", daemon=True)
        self._netns = netns
        self._target_fn = target
        self._args = args
        self._kwargs = dict(kwargs)
        self._result: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        # A fresh thread that never leaves the namespace: nothing to restore afterwards.
        try:
            _setns_path(NETNS_DIR / self._netns)
            self._result = self._target_fn(*self._args, **self._kwargs)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float | None = CALL_TIMEOUT_S) -> T:
        """Wait for the thread; return its value or raise its exception."""
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"thread in {self._netns} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


class Host:
    """One host (or router) of a topology: a network namespace plus its interfaces."""

    def __init__(self, topology_id: str, name: str, router: bool, state_dir: Path,
                 processes: list[subprocess.Popen[Any]]) -> None:
        self.name = name
        self.netns = f"{topology_id}-{name}"
        self.router = router
        self.interfaces: list[Interface] = []
        self.state_dir = state_dir / name
        self.control_socket = self.state_dir / CONTROL_SOCKET_NAME
        self._processes = processes  # shared with the topology, which kills them on teardown

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r})"

    # -- addresses --------------------------------------------------------------------------

    def interface(self, segment_or_ifname: str) -> Interface:
        """The interface attached to a segment (by segment name) or with that name."""
        for interface in self.interfaces:
            if segment_or_ifname in (interface.segment.name, interface.name):
                return interface
        raise KeyError(f"{self.name} has no interface or segment {segment_or_ifname!r}")

    def addresses(self, version: int | None = None) -> list[IPAddress]:
        """Every address of the host, in interface order, optionally of one IP version."""
        return [a.ip for i in self.interfaces for a in i.addresses
                if version is None or a.version == version]

    def address(self, segment: str | None = None, version: int = 4) -> IPAddress:
        """The host's first address of `version` on `segment` (default: first interface)."""
        interfaces = self.interfaces if segment is None else [self.interface(segment)]
        for interface in interfaces:
            for address in interface.addresses:
                if address.version == version:
                    return address.ip
        raise LookupError(f"{self.name} has no IPv{version} address on {segment or 'any'}")

    @property
    def ipv4(self) -> str:
        """The first IPv4 address, as a string (ready for socket calls)."""
        return str(self.address(version=4))

    @property
    def ipv6(self) -> str:
        """The first IPv6 address, as a string (ready for socket calls)."""
        return str(self.address(version=6))

    # -- running code inside ------------------------------------------------------------------

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for processes of this host: SERVAL_CONTROL_SOCKET points at its servald."""
        env = dict(os.environ if base is None else base)
        env[CONTROL_SOCKET_ENV] = str(self.control_socket)
        return env

    def _argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *(os.fspath(a) for a in argv)]

    def run(self, argv: Sequence[str | os.PathLike[str]], *, check: bool = True,
            timeout: float = RUN_TIMEOUT_S, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait; output is captured as text."""
        result = subprocess.run(self._argv(argv), capture_output=True, text=True, input=input,
                                timeout=timeout, env=dict(env) if env is not None else self.env())
        if check and result.returncode != 0:
            raise CommandError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside the namespace; it (and its process group) dies on teardown."""
        kwargs.setdefault("env", self.env())
        kwargs.setdefault("start_new_session", True)  # so teardown can kill its whole group
        process = subprocess.Popen(self._argv(argv), **kwargs)
        self._processes.append(process)
        return process

    @contextlib.contextmanager
    def enter(self) -> Iterator[Host]:
        """Move *this thread* into the namespace for the block; restored afterwards.

        Sockets created inside belong to the host for their whole life, whichever thread uses
        them later. Do not use it on an asyncio event-loop thread across an `await`.
        """
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns_path(NETNS_DIR / self.netns)
            try:
                yield self
            finally:
                _setns_fd(saved)
        finally:
            os.close(saved)

    def thread(self, target: Callable[..., T], *args: Any, **kwargs: Any) -> NamespaceThread[T]:
        """Start `target(*args, **kwargs)` on a fresh thread inside the namespace."""
        thread: NamespaceThread[T] = NamespaceThread(self.netns, target, args, kwargs)
        thread.start()
        return thread

    def call(self, target: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `target(*args, **kwargs)` in the namespace (fresh thread); return its value."""
        return self.thread(target, *args, **kwargs).result()

    # -- state inside ---------------------------------------------------------------------------

    def sysctl(self, name: str, value: str | int | None = None) -> str:
        """Read (and with `value`, first write) a net sysctl of this namespace: 'ipv4/tcp_sack'."""
        with self.enter():
            return _sysctl(name, value)

    def net_counters(self) -> dict[str, int]:
        """SNMP and netstat counters of the namespace: {'Tcp.OutRsts': 0, 'TcpExt...': ...}."""
        with self.enter():
            return read_net_counters()


@dataclass
class _Owner:
    pid: int
    start_time: int
    namespaces: list[str]

    @classmethod
    def current(cls, namespaces: list[str]) -> _Owner:
        pid = os.getpid()
        return cls(pid, _process_start_time(pid) or 0, namespaces)

    def alive(self) -> bool:
        return _process_start_time(self.pid) == self.start_time


_LIVE_TOPOLOGIES: set[AsyncTopology] = set()
_LIVE_LOCK = threading.Lock()


class AsyncTopology:
    """A built topology (asyncio API). Create with `await AsyncTopology.create(spec)` or
    ``async with AsyncTopology.build(spec) as topo``; always `await topo.close()`."""

    def __init__(self, spec: TopologySpec, *, prefix: str = DEFAULT_PREFIX,
                 verbose: bool = False) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must match {_PREFIX_RE.pattern}")
        self.spec = spec
        self.id = prefix + secrets.token_hex(_TOPOLOGY_ID_HEX // 2)
        self.verbose = verbose
        self.state_dir = STATE_DIR / self.id
        self.processes: list[subprocess.Popen[Any]] = []
        self.hosts: dict[str, Host] = {}
        for name in spec.hosts:
            self.hosts[name] = Host(self.id, name, False, self.state_dir, self.processes)
        for name in spec.routers:
            self.hosts[name] = Host(self.id, name, True, self.state_dir, self.processes)
        self.segments: dict[str, Segment] = {}
        self.switch_netns: str | None = f"{self.id}{_SWITCH_SUFFIX}" if spec.lans else None
        self._ipr: dict[str, AsyncIPRoute] = {}  # netns name -> netlink handle
        self._started = time.monotonic()
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncTopology({self.id!r}, hosts={list(self.hosts)})"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def namespaces(self) -> list[str]:
        names = [h.netns for h in self.hosts.values()]
        return names + ([self.switch_netns] if self.switch_netns else [])

    def segment(self, name: str) -> Segment:
        return self.segments[name]

    def _log(self, message: str) -> None:
        if self.verbose:
            elapsed = time.monotonic() - self._started
            print(f"[topology {self.id} +{elapsed:.3f}s] {message}", file=sys.stderr, flush=True)

    # -- build ------------------------------------------------------------------------------

    @classmethod
    async def create(cls, spec: TopologySpec, *, prefix: str = DEFAULT_PREFIX,
                     verbose: bool = False) -> AsyncTopology:
        """Build the topology; on any failure everything created so far is removed."""
        topology = cls(spec, prefix=prefix, verbose=verbose)
        try:
            await topology._build()
        except BaseException:
            await topology.close()
            raise
        return topology

    @classmethod
    @contextlib.asynccontextmanager
    async def build(cls, spec: TopologySpec, *, prefix: str = DEFAULT_PREFIX,
                    verbose: bool = False) -> AsyncIterator[AsyncTopology]:
        topology = await cls.create(spec, prefix=prefix, verbose=verbose)
        try:
            yield topology
        finally:
            await topology.close()

    async def __aenter__(self) -> AsyncTopology:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _build(self) -> None:
        # The owner record comes first: if we die at any later point, cleanup_stale() finds it.
        self.state_dir.mkdir(parents=True, exist_ok=False)
        owner = _Owner.current(self.namespaces)
        record = self.state_dir / "owner.json.tmp"
        record.write_text(json.dumps(owner.__dict__))
        record.replace(self.state_dir / "owner.json")  # atomic: never seen half-written
        for host in self.hosts.values():
            host.state_dir.mkdir()
        with _LIVE_LOCK:
            _LIVE_TOPOLOGIES.add(self)

        self._log(f"creating {len(self.namespaces)} namespaces")
        await _ip_batch([f"netns add {name}" for name in self.namespaces])
        for name in self.namespaces:
            self._ipr[name] = _netlink_in(name)
        for host in self.hosts.values():
            with host.enter():
                for key, value in _HOST_SYSCTLS + (_ROUTER_SYSCTLS if host.router else ()):
                    _sysctl(key, value)
            await self._set_up(host.netns, "lo")
        if self.switch_netns:
            with _entered(self.switch_netns):
                for key, value in _SWITCH_SYSCTLS:
                    _sysctl(key, value)

        self._plan_segments()
        self._log(f"wiring {len(self.segments)} segments")
        for segment in self.segments.values():
            await self._wire(segment)
        self._log("adding routes")
        await self._add_routes()
        for segment in self.segments.values():
            if segment.shaping is not None:
                self._log(f"shaping {segment.name}: {segment.shaping}")
                await self._shape(segment)
        self._log("ready")

    def _plan_segments(self) -> None:
        v4_base = ipaddress.IPv4Network(self.spec.ipv4_base)
        v6_base = ipaddress.IPv6Network(self.spec.ipv6_base)
        entries: list[tuple[str, str, tuple[str, ...], Shaping | None, str | None, str | None]]
        entries = [("lan", lan.name, lan.hosts, lan.shaping, lan.ipv4_subnet, lan.ipv6_subnet)
                   for lan in self.spec.lans]
        entries += [("link", _link_name(link), (link.a, link.b), link.shaping,
                     link.ipv4_subnet, link.ipv6_subnet) for link in self.spec.links]
        for number, (kind, name, members, shaping, v4, v6) in enumerate(entries, start=1):
            v4_net = (ipaddress.IPv4Network(v4) if v4 else
                      ipaddress.IPv4Network((int(v4_base.network_address) + (number << 8), 24)))
            v6_net: ipaddress.IPv6Network | None = None
            if self.spec.ipv6:
                v6_net = (ipaddress.IPv6Network(v6) if v6 else ipaddress.IPv6Network(
                    (int(v6_base.network_address) + (number << 64), 64)))
            segment = Segment(name, kind, number, v4_net, v6_net, shaping, list(members))
            if kind == "lan":
                segment.bridge = f"br{number}"
            self.segments[name] = segment

    async def _wire(self, segment: Segment) -> None:
        addresses = {name: self._initial_addresses(segment, index)
                     for index, name in enumerate(segment.hosts, start=1)}
        if segment.kind == "lan":
            assert self.switch_netns is not None and segment.bridge is not None
            switch = self._ipr[self.switch_netns]
            await switch.link("add", ifname=segment.bridge, kind="bridge", br_forward_delay=0,
                              br_mcast_snooping=0)
            await self._set_up(self.switch_netns, segment.bridge)
            bridge_index = await self._index(self.switch_netns, segment.bridge)
            for index, name in enumerate(segment.hosts, start=1):
                host = self.hosts[name]
                port = f"s{segment.number}p{index}"
                interface = Interface(f"eth{len(host.interfaces)}", segment,
                                      peer_name=port, peer_netns=self.switch_netns)
                await self._veth(host.netns, interface.name, self.switch_netns, port)
                await self._ipr[self.switch_netns].link(
                    "set", index=await self._index(self.switch_netns, port), master=bridge_index)
                await self._set_up(self.switch_netns, port)
                await self._attach(host, interface, addresses[name])
        else:
            host_a, host_b = (self.hosts[n] for n in segment.hosts)
            if_a = Interface(f"eth{len(host_a.interfaces)}", segment)
            if_b = Interface(f"eth{len(host_b.interfaces)}", segment)
            if_a.peer_name, if_a.peer_netns = if_b.name, host_b.netns
            if_b.peer_name, if_b.peer_netns = if_a.name, host_a.netns
            await self._veth(host_a.netns, if_a.name, host_b.netns, if_b.name)
            await self._attach(host_a, if_a, addresses[host_a.name])
            await self._attach(host_b, if_b, addresses[host_b.name])

    def _initial_addresses(self, segment: Segment, index: int) -> list[IPInterface]:
        result: list[IPInterface] = [ipaddress.IPv4Interface(
            (int(segment.ipv4_subnet.network_address) + index, segment.ipv4_subnet.prefixlen))]
        if segment.ipv6_subnet is not None:
            result.append(ipaddress.IPv6Interface(
                (int(segment.ipv6_subnet.network_address) + index, segment.ipv6_subnet.prefixlen)))
        return result

    async def _veth(self, netns: str, ifname: str, peer_netns: str, peer_ifname: str) -> None:
        # Created straight across the two namespaces: the root namespace never sees them.
        peer_fd = os.open(NETNS_DIR / peer_netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self._ipr[netns].link("add", ifname=ifname, kind="veth",
                                        peer={"ifname": peer_ifname, "net_ns_fd": peer_fd})
        finally:
            os.close(peer_fd)

    async def _attach(self, host: Host, interface: Interface,
                      addresses: list[IPInterface]) -> None:
        host.interfaces.append(interface)
        await self._set_up(host.netns, interface.name)
        for address in addresses:
            await self._addr(host, interface, "add", address)
            interface.addresses.append(address)

    async def _addr(self, host: Host, interface: Interface, command: str,
                    address: IPInterface) -> None:
        kwargs: dict[str, Any] = {}
        if address.version == 6:
            kwargs["flags"] = _IFA_F_NODAD
        await self._ipr[host.netns].addr(
            command, index=await self._index(host.netns, interface.name),
            address=str(address.ip), prefixlen=address.network.prefixlen, **kwargs)

    async def _index(self, netns: str, ifname: str) -> int:
        found = await self._ipr[netns].link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no interface {ifname} in {netns}")
        return int(found[0])

    async def _set_up(self, netns: str, ifname: str, up: bool = True) -> None:
        await self._ipr[netns].link("set", index=await self._index(netns, ifname),
                                    state="up" if up else "down")

    def _routes(self, host: Host) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 IPAddress]]:
        """(destination, gateway) for every segment `host` reaches only through routers."""
        direct = {i.segment.name for i in host.interfaces}
        first_hop: dict[str, tuple[str, Segment]] = {}  # router -> (first-hop router, segment)
        queue: deque[str] = deque()
        for interface in host.interfaces:
            for neighbour in interface.segment.hosts:
                if (neighbour != host.name and self.hosts[neighbour].router
                        and neighbour not in first_hop):
                    first_hop[neighbour] = (neighbour, interface.segment)
                    queue.append(neighbour)
        routed: dict[str, tuple[str, Segment]] = {}
        while queue:  # breadth first over routers: only routers forward
            router = queue.popleft()
            for interface in self.hosts[router].interfaces:
                segment = interface.segment
                if segment.name not in direct and segment.name not in routed:
                    routed[segment.name] = first_hop[router]
                for neighbour in segment.hosts:
                    if self.hosts[neighbour].router and neighbour not in first_hop \
                            and neighbour != host.name:
                        first_hop[neighbour] = first_hop[router]
                        queue.append(neighbour)
        result: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, IPAddress]] = []
        for segment_name, (gateway_host, via_segment) in routed.items():
            segment = self.segments[segment_name]
            gateway = self.hosts[gateway_host]
            result.append((segment.ipv4_subnet, gateway.address(via_segment.name, 4)))
            if segment.ipv6_subnet is not None:
                result.append((segment.ipv6_subnet, gateway.address(via_segment.name, 6)))
        return result

    async def _add_routes(self) -> None:
        for host in self.hosts.values():
            for destination, gateway in self._routes(host):
                await self._ipr[host.netns].route("add", dst=str(destination),
                                                  gateway=str(gateway))

    async def _shape(self, segment: Segment) -> None:
        shaping = segment.shaping
        assert shaping is not None
        for name in segment.hosts:
            interface = self.hosts[name].interface(segment.name)
            if shaping.rate is not None:
                await self._tbf(self.hosts[name].netns, interface.name, shaping)
                await self._tbf(interface.peer_netns, interface.peer_name, shaping)
            if shaping.loss_pct > 0:
                await self._loss(self.hosts[name], interface.name, shaping.loss_pct)

    async def _tbf(self, netns: str, ifname: str, shaping: Shaping) -> None:
        # tc rather than pyroute2 here: its tbf encoding has no 64-bit rate attribute.
        assert shaping.rate is not None
        rate_bytes_per_s = _rate_bits_per_s(shaping.rate) / 8
        burst = shaping.burst_bytes or max(TBF_MIN_BURST_BYTES,
                                           int(rate_bytes_per_s * TBF_BURST_S))
        await _exec(["tc", "-n", netns, "qdisc", "replace", "dev", ifname, "root", "tbf",
                     "rate", shaping.rate, "burst", str(burst),
                     "latency", f"{shaping.latency_ms}ms"])

    async def _loss(self, host: Host, ifname: str, loss_pct: float) -> None:
        threshold = round(loss_pct / 100 * LOSS_RESOLUTION)
        chain = f"in_{ifname}"
        ruleset = (
            f"table netdev {_NFT_TABLE} {{\n"
            f"  chain {chain} {{\n"
            f'    type filter hook ingress device "{ifname}" priority 0; policy accept;\n'
            f"    numgen random mod {LOSS_RESOLUTION} < {threshold} counter drop\n"
            f"  }}\n}}\n")
        await _exec(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], stdin=ruleset)

    # -- runtime changes ------------------------------------------------------------------------

    async def add_address(self, host: str, segment: str,
                          address: str | None = None, version: int = 4) -> IPAddress:
        """Add an address to the host's interface on `segment` (default: the next free one
        of the segment's subnet) and return it. Reachable from the whole topology at once,
        since routes are per subnet."""
        node = self.hosts[host]
        interface = node.interface(segment)
        seg = interface.segment
        subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None = (
            seg.ipv4_subnet if version == 4 else seg.ipv6_subnet)
        if subnet is None:
            raise ValueError(f"segment {seg.name} has no IPv{version} subnet")
        if address is None:
            used = {a.ip for h in self.hosts.values() for i in h.interfaces for a in i.addresses}
            candidate = next((ip for ip in _host_addresses(subnet) if ip not in used), None)
            if candidate is None:
                raise LookupError(f"no free address left in {subnet}")
            new = ipaddress.ip_interface(f"{candidate}/{subnet.prefixlen}")
        else:
            new = ipaddress.ip_interface(address if "/" in address
                                         else f"{address}/{subnet.prefixlen}")
        await self._addr(node, interface, "add", new)
        interface.addresses.append(new)
        self._log(f"{host}: added {new} on {interface.name}")
        return new.ip

    async def remove_address(self, host: str, address: str | IPAddress) -> None:
        """Delete an address from whichever interface of the host holds it."""
        node = self.hosts[host]
        target = ipaddress.ip_address(address)
        for interface in node.interfaces:
            for entry in interface.addresses:
                if entry.ip == target:
                    await self._addr(node, interface, "del", entry)
                    interface.addresses.remove(entry)
                    self._log(f"{host}: removed {entry} from {interface.name}")
                    return
        raise LookupError(f"{host} has no address {target}")

    async def set_link(self, host: str, segment_or_ifname: str, up: bool) -> None:
        """Set a host interface administratively up or down."""
        node = self.hosts[host]
        await self._set_up(node.netns, node.interface(segment_or_ifname).name, up)

    async def add_route(self, host: str, destination: str, gateway: str | None = None, *,
                        segment: str | None = None, table: int | None = None,
                        source: str | None = None) -> None:
        """Add a route (e.g. for source-based routing of a multi-homed host)."""
        node = self.hosts[host]
        kwargs: dict[str, Any] = {"dst": destination}
        if gateway is not None:
            kwargs["gateway"] = gateway
        if segment is not None:
            kwargs["oif"] = await self._index(node.netns, node.interface(segment).name)
        if table is not None:
            kwargs["table"] = table
        if source is not None:
            kwargs["prefsrc"] = source
        await self._ipr[node.netns].route("add", **kwargs)

    async def add_rule(self, host: str, source: str, table: int,
                       priority: int | None = None) -> None:
        """Policy rule: traffic from `source` (an address or prefix) looks up `table`."""
        network = ipaddress.ip_network(source, strict=False)
        kwargs: dict[str, Any] = {"src": str(network.network_address),
                                  "src_len": network.prefixlen, "table": table,
                                  "family": socket.AF_INET if network.version == 4
                                  else socket.AF_INET6}
        if priority is not None:
            kwargs["priority"] = priority
        await self._ipr[self.hosts[host].netns].rule("add", **kwargs)

    # -- teardown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove everything: processes, links, namespaces, the state directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._log("tearing down")
        await asyncio.to_thread(_stop_processes, self.processes)
        # Delete the links first: a socket a test forgot to close keeps its namespace alive
        # after unmounting, and must not keep the veths (and their peers) alive with it.
        for ipr in self._ipr.values():
            indexes: list[int] = []
            with contextlib.suppress(Exception):
                indexes = [link["index"] async for link in await ipr.link("dump")
                           if link.get("ifname") != "lo"]
            for index in indexes:
                with contextlib.suppress(Exception):  # a veth's peer goes with it: ENODEV
                    await ipr.link("del", index=index)
        for ipr in self._ipr.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._ipr.clear()
        await asyncio.to_thread(_destroy, self.namespaces, self.state_dir)
        with _LIVE_LOCK:
            _LIVE_TOPOLOGIES.discard(self)
        self._log("gone")

    def _close_at_exit(self) -> None:
        if not self._closed:
            self._closed = True
            _stop_processes(self.processes)
            for ipr in self._ipr.values():
                with contextlib.suppress(Exception):
                    ipr.close()
            _destroy(self.namespaces, self.state_dir)


class Topology:
    """Synchronous wrapper of `AsyncTopology`: ``with Topology.build(spec) as topo: ...``.

    Netlink work runs on a private event-loop thread, so it works from plain code and even
    from inside another running event loop. Hosts are the same `Host` objects.
    """

    def __init__(self, spec: TopologySpec, *, prefix: str = DEFAULT_PREFIX,
                 verbose: bool = False) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="topology-netlink")
        self._thread.start()
        try:
            self._async: AsyncTopology = self._run(
                AsyncTopology.create(spec, prefix=prefix, verbose=verbose))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def build(cls, spec: TopologySpec, *, prefix: str = DEFAULT_PREFIX,
              verbose: bool = False) -> Topology:
        """Build now; use the result as a context manager (teardown on exit)."""
        return cls(spec, prefix=prefix, verbose=verbose)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Topology({self.id!r}, hosts={list(self.hosts)})"

    def _run(self, coroutine: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(SYNC_CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SYNC_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def hosts(self) -> dict[str, Host]:
        return self._async.hosts

    @property
    def segments(self) -> dict[str, Segment]:
        return self._async.segments

    @property
    def namespaces(self) -> list[str]:
        return self._async.namespaces

    @property
    def state_dir(self) -> Path:
        return self._async.state_dir

    def __getitem__(self, name: str) -> Host:
        return self._async.hosts[name]

    def segment(self, name: str) -> Segment:
        return self._async.segments[name]

    def add_address(self, host: str, segment: str, address: str | None = None,
                    version: int = 4) -> IPAddress:
        result: IPAddress = self._run(self._async.add_address(host, segment, address, version))
        return result

    def remove_address(self, host: str, address: str | IPAddress) -> None:
        self._run(self._async.remove_address(host, address))

    def set_link(self, host: str, segment_or_ifname: str, up: bool) -> None:
        self._run(self._async.set_link(host, segment_or_ifname, up))

    def add_route(self, host: str, destination: str, gateway: str | None = None, *,
                  segment: str | None = None, table: int | None = None,
                  source: str | None = None) -> None:
        self._run(self._async.add_route(host, destination, gateway, segment=segment,
                                        table=table, source=source))

    def add_rule(self, host: str, source: str, table: int, priority: int | None = None) -> None:
        self._run(self._async.add_rule(host, source, table, priority))

    def close(self) -> None:
        """Tear everything down (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            self._stop_loop()


# --------------------------------------------------------------------------------------------
# stale cleanup and teardown


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, verbose: bool = False) -> list[str]:
    """Remove what crashed runs left behind; return the namespaces removed.

    Only topologies whose owner record names a dead process are touched, so live topologies
    of other test runs and namespaces that are not ours survive, whatever their names.
    """
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    pattern = re.compile(rf"^{re.escape(prefix)}[0-9a-f]{{{_TOPOLOGY_ID_HEX}}}$")
    for state_dir in sorted(STATE_DIR.iterdir()):
        if not pattern.match(state_dir.name):
            continue
        try:
            record = json.loads((state_dir / "owner.json").read_text())
            owner = _Owner(int(record["pid"]), int(record["start_time"]),
                           [str(n) for n in record["namespaces"]])
        except (OSError, ValueError, KeyError, TypeError):
            # No record: a topology being created right now (the record follows its
            # directory), or a run that died before writing it, so before creating any
            # namespace. Only the latter's leftovers are removed, once clearly old.
            with contextlib.suppress(OSError):
                if time.time() - state_dir.stat().st_mtime > STALE_UNRECORDED_AGE_S:
                    shutil.rmtree(state_dir)
            continue
        if owner.alive():
            continue
        namespaces = [n for n in owner.namespaces if n.startswith(f"{state_dir.name}-")]
        if verbose:
            print(f"[topology] removing stale {state_dir.name}: {namespaces}", file=sys.stderr)
        _destroy(namespaces, state_dir)
        removed.extend(namespaces)
    return removed


def _stop_processes(processes: list[subprocess.Popen[Any]]) -> None:
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
    for process in running:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(TERMINATE_GRACE_S)
    processes.clear()


def _signal_group(process: subprocess.Popen[Any], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


def _destroy(namespaces: Sequence[str], state_dir: Path) -> None:
    """Kill every process left in the namespaces, unmount them, remove the state dir."""
    inodes: dict[int, str] = {}
    for name in namespaces:
        with contextlib.suppress(OSError):
            inodes[os.stat(NETNS_DIR / name).st_ino] = name
    if inodes:
        _kill_namespace_processes(set(inodes))
    for name in namespaces:
        path = NETNS_DIR / name
        if not path.exists():
            continue
        if _libc.umount2(str(path).encode(), 2) != 0:  # MNT_DETACH
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted (half-made)
                raise OSError(err, f"umount {path}: {os.strerror(err)}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(state_dir, ignore_errors=True)


def _kill_namespace_processes(inodes: set[int]) -> None:
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _process_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ')' that ends the command name.
    return int(stat.rsplit(")", 1)[1].split()[19])


@atexit.register
def _close_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE_TOPOLOGIES)
        _LIVE_TOPOLOGIES.clear()
    for topology in live:
        with contextlib.suppress(Exception):
            topology._close_at_exit()


# --------------------------------------------------------------------------------------------
# small helpers


def _setns_fd(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _setns_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _entered(netns: str) -> Iterator[None]:
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns_path(NETNS_DIR / netns)
        try:
            yield
        finally:
            _setns_fd(saved)
    finally:
        os.close(saved)


def _netlink_in(netns: str) -> AsyncIPRoute:
    # The netlink socket is created inside the namespace on this thread and belongs to it
    # for good; cheaper than pyroute2's netns= option, which forks a helper per socket.
    with _entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    return AsyncIPRoute(fileno=sock.detach())


def _sysctl(name: str, value: str | int | None = None) -> str:
    """Read/write /proc/sys/net/<name> of the calling thread's namespace."""
    path = Path("/proc/sys/net") / name.replace(".", "/")
    if value is not None:
        path.write_text(str(value))
    return path.read_text().strip()


def read_net_counters() -> dict[str, int]:
    """The calling thread's namespace counters from /proc/net/{snmp,netstat}."""
    counters: dict[str, int] = {}
    for name in ("snmp", "netstat"):
        lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()
        for header, values in zip(lines[0::2], lines[1::2], strict=False):
            group, _, keys = header.partition(":")
            for key, value in zip(keys.split(), values.partition(":")[2].split(), strict=True):
                counters[f"{group}.{key}"] = int(value)
    return counters


def _host_addresses(
        subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Iterator[IPAddress]:
    first = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
    for value in range(first, min(last, first + 65535) + 1):
        yield ipaddress.ip_address(value) if subnet.version == 4 else ipaddress.IPv6Address(value)


_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def _rate_bits_per_s(rate: str) -> float:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*", rate.lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise ValueError(f"rate {rate!r} is not a tc rate like '1gbit' or '100mbit'")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


async def _exec(argv: Sequence[str], stdin: str | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(
        process.communicate(stdin.encode() if stdin is not None else None), RUN_TIMEOUT_S)
    if process.returncode != 0:
        raise CommandError(process.returncode or 1, list(argv), out.decode(), err.decode())
    return out.decode()


async def _ip_batch(commands: Sequence[str]) -> None:
    # One `ip` process for all namespaces; `ip netns add` also sets up /run/netns as a
    # shared mount the first time, which is fiddly to reproduce.
    await _exec(["ip", "-batch", "-"], stdin="\n".join(commands) + "\n")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM runs the same cleanup as Ctrl-C (finally blocks, topology teardown)."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
