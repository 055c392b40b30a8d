"""TCP listeners: legacy clients in, one Serval connection per client, the pair to the relay.

Theory of operation
-------------------
Each listener is a non-blocking TCP socket watched with ``loop.add_reader``. A wakeup accepts up
to MAX_ACCEPTS_PER_WAKEUP clients (bounded, so that one busy port cannot starve the loop; the
rest wait for the next wakeup, which comes at once because the socket stays readable), sets
TCP_NODELAY and starts one task per client that asks servald for a Serval connection to the
listener's service (control-API ``connect`` with the connect timeout and, unless disabled, the
client's address as ``proxy`` for the exporter's PROXY header). On success the client socket and
the Serval socket go to the relay; on failure the client is closed cleanly (FIN, not RST) and
the reason is counted.

``max_connections`` counts connecting and relayed clients. At the limit the listener *pauses*
(stops accepting) instead of accepting and closing: new clients wait in the kernel's accept
queue (backlog) like HAProxy's maxconn, and accepting resumes as soon as a connection ends.

Reload: a listener whose socket can stay (same address, port, ipv6_only) gets the new settings
in place; they apply to new clients. A changed backlog is applied with a second ``listen()``,
which Linux allows on a listening socket. Sockets use SO_REUSEPORT so that a replacement socket
can be bound before the old one closes. Closing a listener first accepts whatever is already in
its accept queue (those clients completed their handshake: dropping them would reset them), then
closes the socket; clients being connected or relayed are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import time
from typing import Any

from serval.errors import ServalError
from translator.config import ListenerConfig
from translator.control_pool import ControlPool, connect_error_reason
from translator.metrics import Metrics
from translator.migration import offers_migration, watch_flow
from translator.relay import Connection, RelayPool

MAX_ACCEPTS_PER_WAKEUP = 64
# servald enforces the connect timeout itself; we wait a little longer for its answer.
CONTROL_REPLY_MARGIN_S = 2.0
# How much unread client data we discard to close with a FIN rather than an RST.
DISCARD_ON_CLOSE_BYTES = 65536


def unmap_address(host: str) -> str:
    """``::ffff:192.0.2.1`` (an IPv4 client on a dual-stack socket) -> ``192.0.2.1``."""
    if host.startswith("::ffff:") and "." in host:
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
            if mapped is not None:
                return str(mapped)
    return host


def format_address(address: Any) -> str:
    """``ip:port`` / ``[v6]:port`` from a socket address tuple (IPv4-mapped shown as IPv4)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = unmap_address(str(address[0]))
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def open_listening_socket(config: ListenerConfig) -> socket.socket:
    """Bind and listen; OSError names nothing, the caller adds the config position."""
    family = socket.AF_INET6 if config.address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(config.ipv6_only))
        sock.bind((str(config.address), config.port))
        sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def close_gently(sock: socket.socket) -> None:
    """Close a client we could not serve with a FIN: discard what it already sent (unread
    data makes close() send an RST), then close."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
        discarded = 0
        while discarded < DISCARD_ON_CLOSE_BYTES:
            chunk = sock.recv(16384)
            if not chunk:
                break
            discarded += len(chunk)
    sock.close()


class Listener:
    """One configured TCP listener and the clients it accepted."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: ControlPool,
        relay: RelayPool,
        metrics: Metrics,
        log: Any,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self._pool = pool
        self._relay = relay
        self._metrics = metrics
        self._log = log.bind(listener=config.name)
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0  # connecting + relayed
        self.connecting = 0
        self.accepted = 0
        self.connect_errors: dict[str, int] = {}
        self.paused = False
        self.closed = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def labels(self) -> tuple[str, str, str]:
        return ("listener", self.config.name, self.config.service_text)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Open the socket (unless one was handed in) and start accepting."""
        self._loop = asyncio.get_running_loop()
        if self._sock is None:
            self._sock = open_listening_socket(self.config)
        self._metrics.listener_paused.labels(self.name).set(0)
        self._watch(True)
        self._log.info("listening", bind=str(self.config.bind), service=self.config.service_text,
                       backlog=self.config.backlog, max_connections=self.config.max_connections)

    def update(self, config: ListenerConfig) -> None:
        """New settings on the same socket (the caller checked `same_socket`)."""
        old = self.config
        self.config = config
        if config.backlog != old.backlog and self._sock is not None:
            self._sock.listen(config.backlog)
        if config.service != old.service:
            self._log.info("listener_remapped", old_service=old.service_text,
                           service=config.service_text)
        self._maybe_resume()

    def close(self) -> None:
        """Stop accepting; clients already in the accept queue are still served."""
        if self.closed:
            return
        self.closed = True
        self._watch(False)
        if self._sock is not None:
            self._accept_batch(limit=None)
            self._sock.close()
            self._sock = None
        self._metrics.listener_paused.labels(self.name).set(0)
        self._log.info("listener_closed", active=self.active)

    def cancel_connecting(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait_connecting(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "name": config.name,
            "bind": str(config.bind),
            "service": config.service_text,
            "active": self.active,
            "connecting": self.connecting,
            "accepted": self.accepted,
            "connect_errors": dict(self.connect_errors),
            "max_connections": config.max_connections,
            "paused": self.paused,
            "closed": self.closed,
        }

    # -- accepting ----------------------------------------------------------------------------

    def _watch(self, on: bool) -> None:
        if self._loop is None or self._sock is None or on == self._watching:
            return
        if on:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._watching = on

    def _on_readable(self) -> None:
        self._accept_batch(limit=MAX_ACCEPTS_PER_WAKEUP)

    def _accept_batch(self, limit: int | None) -> None:
        sock = self._sock
        if sock is None:
            return
        count = 0
        while limit is None or count < limit:
            if self.active >= self.config.max_connections and not self.closed:
                self._pause()
                return
            try:
                client, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: out of resources; the client stays queued. Back off
                # by pausing briefly instead of spinning on a readable socket.
                self._log.error("accept_failed", error=exc.strerror or str(exc))
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause()
                    assert self._loop is not None
                    self._loop.call_later(0.1, self._maybe_resume, True)
                return
            count += 1
            self._accepted(client, address)

    def _accepted(self, client: socket.socket, address: Any) -> None:
        assert self._loop is not None
        self.accepted += 1
        self.active += 1
        self.connecting += 1
        self._metrics.connections.labels(*self.labels).inc()
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._connect(client, address, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._watch(False)
            self._metrics.listener_paused.labels(self.name).set(1)
            self._log.warning("listener_paused", active=self.active,
                              max_connections=self.config.max_connections)

    def _maybe_resume(self, force: bool = False) -> None:
        if self.paused and not self.closed and (
                force or self.active < self.config.max_connections):
            self.paused = False
            self._watch(True)
            self._metrics.listener_paused.labels(self.name).set(0)
            self._log.info("listener_resumed", active=self.active)

    # -- one client ---------------------------------------------------------------------------

    async def _connect(self, client: socket.socket, address: Any, accepted_at: float) -> None:
        config = self.config  # a reload during the connect does not change this client
        labels = ("listener", config.name, config.service_text)
        fields: dict[str, Any] = {
            "service": str(config.service),
            "type": "stream",
            "timeout_s": config.connect_timeout_s,
        }
        if config.mode is not None:
            fields["mode"] = config.mode
        if config.forward_client_address and isinstance(address, tuple):
            fields["proxy"] = {"addr": unmap_address(str(address[0])), "port": int(address[1])}
        handed_off = False
        try:
            try:
                frame = await self._pool.call(
                    "connect", fields, wait_s=config.connect_timeout_s + CONTROL_REPLY_MARGIN_S,
                    subject=f"service {config.service_text}")
                if len(frame.fds) != 1:
                    for fd in frame.fds:
                        with contextlib.suppress(OSError):
                            socket.socket(fileno=fd).close()
                    raise ServalError(f"connect answer carried {len(frame.fds)} fds, not 1")
            except (OSError, ServalError, TimeoutError) as exc:
                self._failed(client, address, labels, exc, time.monotonic() - accepted_at)
                return
            connect_s = time.monotonic() - accepted_at
            self._metrics.connect_latency.labels(*labels).observe(connect_s)
            serval_fd = frame.fds[0]
            message = frame.message
            with contextlib.suppress(OSError):
                probe = socket.socket(fileno=serval_fd)
                probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                probe.detach()
            peer = message.get("peer")
            remote = message.get("remote")
            server = (_endpoint_text(remote) if isinstance(remote, dict) else None) or (
                str(peer.get("address")) if isinstance(peer, dict) else "?")
            connection = Connection(
                role="listener",
                name=config.name,
                service=config.service_text,
                client=format_address(address),
                server=server,
                idle_timeout_s=config.idle_timeout_s,
                connect_s=connect_s,
                on_end=self._ended,
                flow=message.get("flow") if isinstance(message.get("flow"), int) else None,
                mode=message.get("mode") if isinstance(message.get("mode"), str) else None,
            )
            watch = watch_flow(self._relay, connection, "b", self._pool.path, serval_fd,
                               self._log) if offers_migration(message) else None
            self.connecting -= 1
            handed_off = True
            try:
                self._relay.add(connection, client.detach(), serval_fd)
            except Exception as exc:
                if watch is not None:
                    watch.close()
                self._log.error("relay_add_failed", error=str(exc))
                self._ended(connection, "error")
            else:
                if watch is not None:
                    watch.start()
        finally:
            if not handed_off:
                self.connecting -= 1
                self.active -= 1
                self._maybe_resume()
                if client.fileno() >= 0:
                    close_gently(client)

    def _failed(self, client: socket.socket, address: Any, labels: tuple[str, str, str],
                exc: BaseException, elapsed_s: float) -> None:
        reason = connect_error_reason(exc)
        self.connect_errors[reason] = self.connect_errors.get(reason, 0) + 1
        self._metrics.connect_errors.labels(*labels, reason).inc()
        self._log.info("connection", role="listener", name=labels[1], service=labels[2],
                       client=format_address(address), end="connect-failed", reason=reason,
                       error=str(exc), connect_ms=round(elapsed_s * 1000, 3))

    def _ended(self, connection: Connection, reason: str) -> None:
        self.active -= 1
        self._maybe_resume()


def _endpoint_text(endpoint: dict[str, Any]) -> str | None:
    address, port = endpoint.get("address"), endpoint.get("port")
    if isinstance(address, str) and isinstance(port, int):
        return format_address((address, port))
    return None
