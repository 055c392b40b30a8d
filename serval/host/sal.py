"""The SAL UDP endpoint: one IPv4 and one IPv6 socket on the SAL port, driven by asyncio.

Theory of operation
-------------------
SAL packets travel in UDP datagrams to the well-known SAL port of each host (DESIGN.md section
3). servald opens an IPv4 socket (with SO_BROADCAST, for ad-hoc resolution) and an IPv6 socket
(IPV6_V6ONLY, so no v4-mapped addresses ever reach the protocol code), both bound to the
wildcard address unless `listen_addresses` says otherwise.

Each datagram is read with `recvmsg` and its IP_PKTINFO / IPV6_PKTINFO, because the SAL needs
the address the sender targeted: a SYN that arrived as a link-layer broadcast must never be
forwarded (resolution storms, serval-protocol.md section 3.4) and its answer must come from an
interface address rather than the broadcast address.

The endpoint reads directly from the non-blocking sockets in the event loop's reader callback
(at most `READ_BURST` datagrams per wake-up, so one flood cannot starve the control socket) and
hands `(data, source, destination)` to one callback. Sending never blocks: a full socket
buffer drops the datagram, as a congested network would, and the SAL's retransmission handles
it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from serval.host.config import Address

READ_BURST = 64
MAX_DATAGRAM_BYTES = 65535
_CMSG_SPACE = 256
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_PEER_CACHE_MAX = 4096  # source address strings -> parsed addresses (peers are few)

# Linux values; Python's socket module does not export IP_PKTINFO on every build.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


@dataclass(frozen=True)
class Received:
    """One datagram read from the SAL port."""

    data: bytes
    source: Address
    source_port: int
    destination: Address | None  # the IP header's destination (None if the kernel gave none)
    ifindex: int


def _parse_pktinfo(family: int, ancdata: list[tuple[int, int, bytes]]) -> tuple[Address | None,
                                                                                int]:
    for level, kind, data in ancdata:
        # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
        if (family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO
                and len(data) >= 12):
            ifindex = struct.unpack_from("=i", data, 0)[0]
            return ipaddress.IPv4Address(data[8:12]), ifindex
        # struct in6_pktinfo { in6_addr addr; int ifindex; }
        if (family == socket.AF_INET6 and level == socket.IPPROTO_IPV6
                and kind == IPV6_PKTINFO and len(data) >= 20):
            ifindex = struct.unpack_from("=i", data, 16)[0]
            return ipaddress.IPv6Address(data[:16]), ifindex
    return None, 0


class SalPort:
    """The SAL UDP port over IPv4 and IPv6."""

    def __init__(
        self,
        port: int,
        listen_addresses: tuple[Address, ...],
        on_datagram: Callable[[Received], None],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self.port = port
        self._listen_addresses = listen_addresses
        self._on_datagram = on_datagram
        self._on_error = on_error
        self._sockets: dict[int, socket.socket] = {}  # family -> socket
        self._extra: list[socket.socket] = []  # explicit listen addresses beyond the first
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sent_datagrams = 0
        self.send_failures = 0
        # recvmsg gives the source as text; parsing it costs more than the rest of the
        # read, and a host hears from few peers, so parsed addresses are kept.
        self._peers: dict[str, Address | None] = {}

    # -- life cycle -----------------------------------------------------------------------------

    def open(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """Bind the sockets and start reading. Returns notes about families not available."""
        self._loop = loop
        notes: list[str] = []
        wanted: list[tuple[int, str]] = []
        if self._listen_addresses:
            for address in self._listen_addresses:
                wanted.append((6 if address.version == 6 else 4, str(address)))
            wanted = [(socket.AF_INET6 if v == 6 else socket.AF_INET, h) for v, h in wanted]
        else:
            wanted = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        for family, host in wanted:
            try:
                sock = self._make_socket(family, host)
            except OSError as exc:
                if family == socket.AF_INET6 and not self._listen_addresses and exc.errno in (
                    errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT
                ):
                    notes.append(f"IPv6 SAL socket not available: {exc.strerror}")
                    continue
                self.close()
                raise
            if family in self._sockets:
                self._extra.append(sock)
            else:
                self._sockets[family] = sock
            loop.add_reader(sock.fileno(), self._drain, sock)
        return notes

    def _make_socket(self, family: int, host: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            # Bursts of SYNs (thousands of connections/s from a translator) must not overflow.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((host, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for sock in [*self._sockets.values(), *self._extra]:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(sock.fileno())
                except (ValueError, OSError):
                    pass
            sock.close()
        self._sockets.clear()
        self._extra.clear()

    @property
    def families(self) -> list[int]:
        return list(self._sockets)

    # -- I/O ----------------------------------------------------------------------------------

    def _drain(self, sock: socket.socket) -> None:
        for _ in range(READ_BURST):
            try:
                data, ancdata, _flags, peer = sock.recvmsg(MAX_DATAGRAM_BYTES, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP errors (port unreachable from a dead peer) surface here; not fatal.
                self._on_error("sal_recv_error", exc)
                return
            destination, ifindex = _parse_pktinfo(sock.family, ancdata)
            source = self._peer_address(peer[0])
            if source is None:
                continue
            try:
                self._on_datagram(Received(data, source, int(peer[1]), destination, ifindex))
            except Exception as exc:  # a bug handling one packet must not stop the daemon
                self._on_error("sal_handler_error", exc)

    def _peer_address(self, text: str) -> Address | None:
        if text in self._peers:
            return self._peers[text]
        address: Address | None
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            address = None
        if len(self._peers) >= _PEER_CACHE_MAX:
            self._peers.clear()
        self._peers[text] = address
        return address

    def send(self, data: bytes, address: Address, port: int,
             source: Address | None = None) -> bool:
        """Send one datagram; False (and counted) when it could not be queued.

        `source` picks the IP source address (IP_PKTINFO / IPV6_PKTINFO): a migrated flow's
        control packets must leave from its new address, the only one the peer will answer
        to and possibly the only one left (the migration engine passes it)."""
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = self._sockets.get(family)
        if sock is None:
            self.send_failures += 1
            return False
        try:
            if source is None or source.version != address.version:
                sock.sendto(data, (str(address), port))
            else:
                sock.sendmsg([data], [_source_pktinfo(source)], 0, (str(address), port))
        except OSError as exc:
            self.send_failures += 1
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED,
                                 errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL,
                                 errno.EINVAL):
                self._on_error("sal_send_error", exc)
            return False
        self.sent_datagrams += 1
        return True


def _source_pktinfo(source: Address) -> tuple[int, int, bytes]:
    """Ancillary data choosing the source address of one datagram (any interface)."""
    if source.version == 4:
        # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
        return socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, source.packed, bytes(4))
    # struct in6_pktinfo { in6_addr addr; int ifindex; }
    return socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16si", source.packed, 0)


# --------------------------------------------------------------------------------------------
# addresses


@dataclass(frozen=True)
class InterfaceAddress:
    ifindex: int
    ifname: str
    address: Address
    prefixlen: int
    broadcast: Address | None


class AddressBook:
    """This host's addresses (from netlink), its broadcast addresses, and source selection.

    Refreshed by the daemon every few seconds (addresses set up after servald started are
    picked up); lookups are cheap set operations.
    """

    def __init__(self) -> None:
        self.interfaces: list[InterfaceAddress] = []
        self._own: set[Address] = set()
        self._broadcast: set[Address] = set()
        self._lan_broadcasts: list[Address] = []
        self._source_cache: dict[Address, Address | None] = {}

    async def refresh(self) -> bool:
        """Re-read the addresses (netlink, pyroute2's asyncio API); True when they changed."""
        from pyroute2 import AsyncIPRoute  # imported lazily: only the daemon needs netlink

        found: list[InterfaceAddress] = []
        async with AsyncIPRoute() as ipr:
            names = {link["index"]: link.get("IFLA_IFNAME") or ""
                     async for link in await ipr.get_links()}
            async for message in await ipr.get_addr():
                text = message.get("IFA_ADDRESS") or message.get("IFA_LOCAL")
                if not text:
                    continue
                address = ipaddress.ip_address(text)
                prefixlen = int(message["prefixlen"])
                broadcast_text = message.get("IFA_BROADCAST")
                broadcast: Address | None = None
                if broadcast_text:
                    broadcast = ipaddress.ip_address(broadcast_text)
                elif address.version == 4 and prefixlen < 31 and not address.is_loopback:
                    # Addresses added without 'brd' have no IFA_BROADCAST; the subnet's
                    # broadcast address is still what the LAN answers to.
                    broadcast = ipaddress.ip_network(f"{address}/{prefixlen}",
                                                     strict=False).broadcast_address
                found.append(InterfaceAddress(
                    ifindex=int(message["index"]),
                    ifname=str(names.get(message["index"], "")),
                    address=address,
                    prefixlen=prefixlen,
                    broadcast=broadcast,
                ))
        changed = found != self.interfaces
        self.interfaces = found
        self._own = {entry.address for entry in found}
        self._broadcast = {entry.broadcast for entry in found if entry.broadcast is not None}
        self._lan_broadcasts = sorted(
            {e.broadcast for e in found if e.broadcast is not None and not e.address.is_loopback},
            key=str)
        if changed:
            self._source_cache.clear()
        return changed

    def is_own(self, address: Address) -> bool:
        return address in self._own or address.is_loopback

    def is_broadcast(self, address: Address) -> bool:
        return (
            address in self._broadcast
            or address == _LIMITED_BROADCAST
            or address.is_multicast
        )

    def broadcast_addresses(self) -> list[Address]:
        """Broadcast addresses of the non-loopback IPv4 interfaces (ad-hoc resolution; asked
        on every ad-hoc SYN, hence computed once per refresh)."""
        return list(self._lan_broadcasts)

    def unicast(self) -> list[Address]:
        """Global-scope-ish addresses for status output (no loopback, no link-local)."""
        return [
            e.address for e in self.interfaces
            if not e.address.is_loopback and not e.address.is_link_local
        ]

    def source_for(self, destination: Address) -> Address | None:
        """The local address the kernel would use to reach `destination` (no packet sent)."""
        if destination in self._source_cache:
            return self._source_cache[destination]
        if self.is_broadcast(destination):
            for entry in self.interfaces:
                if entry.broadcast == destination:
                    self._source_cache[destination] = entry.address
                    return entry.address
        family = socket.AF_INET6 if destination.version == 6 else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_DGRAM)
        result: Address | None
        try:
            if destination.version == 4:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            probe.connect((str(destination), 9))
            result = ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0])
        except OSError:
            result = None
        finally:
            probe.close()
        if len(self._source_cache) > 4096:
            self._source_cache.clear()
        self._source_cache[destination] = result
        return result
