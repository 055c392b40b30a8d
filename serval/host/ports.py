"""Client port allocation for repair-built connections.

Why not bind(0)
---------------
A port from bind(0) is exclusive per client address across *all* destinations and is never
one held by a TIME-WAIT socket, even with SO_REUSEADDR. With the client closing first, each
connection parks its port in TIME-WAIT for 60 s, which caps a client address near
(port range) / 60 s = ~470 connections/s (notes 4b pitfall 10). The kernel's own connect()
does better because it only needs the *4-tuple* to be unique.

What this does instead
----------------------
servald picks the port itself and binds in repair mode (forced reuse), so any number of
connections to different destinations share a local port, exactly as connect() would let
them. Per destination, ports are handed out sequentially from a random starting point (the
idea of RFC 6056's per-destination offsets), so a port comes back to the same destination
only after the whole range has been used, and never while the allocator still counts it
live there. The kernel remains the judge of 4-tuple uniqueness: a repair-mode connect() to
a 4-tuple that is live, or in TIME-WAIT without timestamps, fails with EADDRNOTAVAIL and the
caller asks for another port. A TIME-WAIT *with* timestamps is recycled by connect() (PAWS
keeps it safe), so with timestamps on (the default) the rate is no longer bounded by
TIME-WAIT at all.

When the destination is not known yet (the SAL SYN goes to a serviceID; the instance is
picked on the way), pass ``remote=None``: those allocations share one sequence, so no two
live ones get the same port, and the rare conflict with a known-destination one is caught
by the kernel as above.
"""

from __future__ import annotations

import errno
import random
from collections import OrderedDict
from pathlib import Path

from serval.errors import RepairError

PORT_RANGE_SYSCTL = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS_SYSCTL = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
MAX_TRACKED_DESTINATIONS = 65536  # idle per-destination cursors beyond this are forgotten

Remote = tuple[str, int] | None


def read_port_range(path: Path = PORT_RANGE_SYSCTL) -> tuple[int, int]:
    """ip_local_port_range of the calling thread's network namespace (inclusive)."""
    low, high = (int(v) for v in path.read_text().split())
    return low, high


def read_reserved_ports(path: Path = RESERVED_PORTS_SYSCTL) -> frozenset[int]:
    """ip_local_reserved_ports ('8080,9000-9010') of the calling thread's namespace."""
    text = path.read_text().strip() if path.exists() else ""
    reserved: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        reserved.update(range(int(low), int(high or low) + 1))
    return frozenset(reserved)


class _Destination:
    __slots__ = ("cursor", "live")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.live: set[int] = set()


class ClientPortAllocator:
    """Per-destination sequential client ports (module docstring). Not thread-safe: one per
    servald event loop. Sans-IO apart from `from_sysctl()`."""

    def __init__(self, rng: random.Random, port_range: tuple[int, int],
                 reserved: frozenset[int] = frozenset()) -> None:
        low, high = port_range
        if not 0 < low <= high <= 65535:
            raise ValueError(f"bad port range {port_range}")
        self._rng = rng
        self._low = low
        self._size = high - low + 1
        self._reserved = reserved
        self._destinations: OrderedDict[tuple[str, Remote], _Destination] = OrderedDict()

    @classmethod
    def from_sysctl(cls, rng: random.Random) -> ClientPortAllocator:
        """Use the calling thread's namespace's ip_local_port_range and reserved ports."""
        return cls(rng, read_port_range(), read_reserved_ports())

    @property
    def port_range(self) -> tuple[int, int]:
        return self._low, self._low + self._size - 1

    def allocate(self, local_ip: str, remote: Remote = None) -> int:
        """The next port for a connection from `local_ip` to `remote` (None: not known yet).

        It counts as live towards `remote` until `release()`. Raises RepairError
        (EADDRNOTAVAIL) when the whole range is live towards that destination.
        """
        key = (local_ip, remote)
        destination = self._destinations.get(key)
        if destination is None:
            destination = _Destination(self._rng.randrange(self._size))
            self._destinations[key] = destination
            self._forget_idle()
        self._destinations.move_to_end(key)
        for _ in range(self._size):
            port = self._low + destination.cursor
            destination.cursor = (destination.cursor + 1) % self._size
            if port not in destination.live and port not in self._reserved:
                destination.live.add(port)
                return port
        raise RepairError(
            "allocate_port", errno.EADDRNOTAVAIL,
            f"allocate_port: all {self._size} ports of {self.port_range} from {local_ip} "
            f"are live towards {remote or 'unknown destinations'}")

    def release(self, local_ip: str, port: int, remote: Remote = None) -> None:
        """The connection using `port` closed, or its set-up failed (EADDRNOTAVAIL: the
        next `allocate()` moves on to another port anyway)."""
        destination = self._destinations.get((local_ip, remote))
        if destination is not None:
            destination.live.discard(port)

    def live(self, local_ip: str, remote: Remote = None) -> int:
        """How many ports are live towards `remote`."""
        destination = self._destinations.get((local_ip, remote))
        return len(destination.live) if destination is not None else 0

    def _forget_idle(self) -> None:
        # Oldest first; a destination with live ports is kept whatever its age.
        excess = len(self._destinations) - MAX_TRACKED_DESTINATIONS
        for key in list(self._destinations):
            if excess <= 0:
                break
            if not self._destinations[key].live:
                del self._destinations[key]
                excess -= 1
