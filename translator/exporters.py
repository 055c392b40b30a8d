"""Exporters: a Serval service served by a local legacy TCP server.

Theory of operation
-------------------
Each exporter holds one control connection to servald on which it sent ``listen`` (service,
backlog, weight, priority): servald registers the service with its routers and pushes an
``accept`` event, with the accepted Serval stream's fd, for every client. For each we connect to
the legacy server (``target``, with the connect timeout), write a PROXY v2 header first if
configured (translator.proxy_protocol: the original legacy client's address from the event's
``proxy`` field, carried through the SAL handshake from the front appliance; else the Serval
peer's own address), and hand the pair to the relay. If the legacy server cannot be reached the
Serval client is closed cleanly and the reason counted.

The listener lives as long as its control connection: closing it is ``close_listener``. When
servald goes away (crash, restart) the connection ends; the exporter re-``listen``s as soon as
servald answers again (retry with a short capped backoff), while established connections carry
on in the relay untouched.

Reload: changes of the target, PROXY setting, limits or timeouts apply in place to new clients.
A changed service, weight, priority or backlog needs a new registration: the old listener is
closed and a new one opened (servald refuses a second listener for a service on one host, so
there is a short window in which new Serval clients of this service are sent elsewhere or
retried by their SAL).

Beyond ``max_connections`` an accepted Serval client is closed at once (and counted): servald
has already completed its handshake, so unlike a TCP listener we cannot leave it queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from typing import Any

from serval.control import AsyncControlClient, Frame, close_fds
from serval.errors import ServalError
from translator.config import ExporterConfig
from translator.control_pool import connect_error_reason
from translator.listeners import close_gently, format_address
from translator.metrics import Metrics
from translator.migration import offers_migration, watch_flow
from translator.proxy_protocol import encode_v2, unique_id_tlv
from translator.relay import Connection, RelayPool

RELISTEN_BACKOFF_INITIAL_S = 0.1
RELISTEN_BACKOFF_MAX_S = 2.0
LISTEN_REPLY_TIMEOUT_S = 10.0


class Exporter:
    """One configured exporter: its servald listener and the connections it accepted."""

    def __init__(
        self,
        config: ExporterConfig,
        control_socket: str,
        relay: RelayPool,
        metrics: Metrics,
        log: Any,
    ) -> None:
        self.config = config
        self.control_socket = control_socket
        self._relay = relay
        self._metrics = metrics
        self._log = log.bind(exporter=config.name)
        self._task: asyncio.Task[None] | None = None
        self._client: AsyncControlClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._registered_once: asyncio.Event = asyncio.Event()
        self.listening = False
        self.active = 0
        self.connecting = 0
        self.accepted = 0
        self.connect_errors: dict[str, int] = {}
        self.relistens = 0
        self.closed = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def labels(self) -> tuple[str, str, str]:
        return ("exporter", self.config.name, self.config.service_text)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(
            self._serve_forever(), name=f"exporter-{self.name}")

    async def wait_listening(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._registered_once.wait()
        return self.listening

    async def update(self, config: ExporterConfig, control_socket: str) -> None:
        old = self.config
        self.config = config
        if old.same_registration(config) and control_socket == self.control_socket:
            return
        self._log.info("exporter_reregistering", service=config.service_text,
                       weight=config.weight, priority=config.priority)
        await self._stop_listening()
        self.control_socket = control_socket
        self._registered_once = asyncio.Event()
        self.start()

    async def close(self) -> None:
        """Close the servald listener; connections being set up or relayed carry on."""
        if self.closed and self._task is None:
            return
        self.closed = True
        await self._stop_listening()
        self._log.info("exporter_closed", active=self.active)

    async def _stop_listening(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._drop_client()

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
            "service": config.service_text,
            "target": str(config.target),
            "weight": config.weight,
            "priority": config.priority,
            "proxy_protocol": config.proxy_protocol,
            "listening": self.listening,
            "active": self.active,
            "connecting": self.connecting,
            "accepted": self.accepted,
            "connect_errors": dict(self.connect_errors),
            "relistens": self.relistens,
            "max_connections": config.max_connections,
        }

    # -- the servald listener ---------------------------------------------------------------

    def _set_listening(self, listening: bool) -> None:
        self.listening = listening
        self._metrics.exporter_registered.labels(self.name, self.config.service_text).set(
            1 if listening else 0)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.listening:
            self._set_listening(False)

    async def _serve_forever(self) -> None:
        backoff = RELISTEN_BACKOFF_INITIAL_S
        first = True
        while not self.closed:
            try:
                await self._listen()
                backoff = RELISTEN_BACKOFF_INITIAL_S
                if not first:
                    self.relistens += 1
                first = False
                await self._events()
            except asyncio.CancelledError:
                raise
            except (OSError, ServalError) as exc:
                # Expected while servald (re)starts: a warning, not an error.
                self._log.warning("exporter_listen_failed", error=str(exc),
                                  retry_in_s=round(backoff, 3))
            finally:
                self._drop_client()
            if self.closed:
                return
            await asyncio.sleep(backoff)
            backoff = min(RELISTEN_BACKOFF_MAX_S, backoff * 2)

    async def _listen(self) -> None:
        config = self.config
        self._client = await AsyncControlClient.connect(self.control_socket)
        await self._client.call(
            "listen",
            {"service": str(config.service), "type": "stream", "backlog": config.backlog,
             "weight": config.weight, "priority": config.priority},
            wait_s=LISTEN_REPLY_TIMEOUT_S, subject=f"service {config.service_text}")
        self._set_listening(True)
        self._registered_once.set()
        self._log.info("exporter_listening", service=config.service_text,
                       target=str(config.target), weight=config.weight,
                       priority=config.priority)

    async def _events(self) -> None:
        client = self._client
        assert client is not None
        while True:
            frame = await client.next_event()
            if frame is None:
                self._log.warning("exporter_servald_gone", service=self.config.service_text)
                return
            if frame.message.get("event") != "accept":
                close_fds(frame.fds)
                continue
            self._on_accept(frame)

    # -- one client -------------------------------------------------------------------------

    def _on_accept(self, frame: Frame) -> None:
        config = self.config
        if len(frame.fds) != 1:
            close_fds(frame.fds)
            self._log.error("accept_without_fd", fds=len(frame.fds))
            return
        serval = socket.socket(fileno=frame.fds[0])
        self.accepted += 1
        self._metrics.connections.labels(*self.labels).inc()
        if self.active >= config.max_connections:
            self._count_error(self.labels, "max_connections")
            self._log.info("connection", role="exporter", name=config.name,
                           service=config.service_text, end="rejected",
                           reason="max_connections")
            close_gently(serval)
            return
        self.active += 1
        self.connecting += 1
        task = asyncio.get_running_loop().create_task(
            self._connect(serval, frame.message, time.monotonic()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, serval: socket.socket, event: dict[str, Any],
                       accepted_at: float) -> None:
        config = self.config
        labels = ("exporter", config.name, config.service_text)
        loop = asyncio.get_running_loop()
        handed_off = False
        legacy: socket.socket | None = None
        remote = _endpoint(event.get("remote"))
        original = _proxy_endpoint(event.get("proxy"))
        client_text = format_address(remote) if remote else "?"
        try:
            try:
                async with asyncio.timeout(config.connect_timeout_s):
                    legacy = await _connect_tcp(config.target.host, config.target.port)
                    legacy.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if config.proxy_protocol == "v2":
                        header = self._proxy_header(serval, event, original or remote)
                        await loop.sock_sendall(legacy, header)
            except (OSError, TimeoutError) as exc:
                reason = connect_error_reason(exc)
                self._count_error(labels, reason)
                self._log.info("connection", role="exporter", name=config.name,
                               service=config.service_text, client=client_text,
                               original_client=format_address(original) if original else None,
                               server=str(config.target), end="connect-failed", reason=reason,
                               error=str(exc) or type(exc).__name__)
                return
            connect_s = time.monotonic() - accepted_at
            self._metrics.connect_latency.labels(*labels).observe(connect_s)
            connection = Connection(
                role="exporter",
                name=config.name,
                service=config.service_text,
                client=client_text,
                server=str(config.target),
                idle_timeout_s=config.idle_timeout_s,
                connect_s=connect_s,
                on_end=self._ended,
                flow=event.get("flow") if isinstance(event.get("flow"), int) else None,
                mode=event.get("mode") if isinstance(event.get("mode"), str) else None,
                original_client=format_address(original) if original else None,
            )
            watch = watch_flow(self._relay, connection, "a", self.control_socket,
                               serval.fileno(), self._log) if offers_migration(event) else None
            self.connecting -= 1
            handed_off = True
            try:
                self._relay.add(connection, serval.detach(), legacy.detach())
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
                if legacy is not None:
                    legacy.close()
                if serval.fileno() >= 0:
                    close_gently(serval)

    def _proxy_header(self, serval: socket.socket, event: dict[str, Any],
                      source: tuple[str, int] | None) -> bytes:
        destination: tuple[str, int] | None = _endpoint(event.get("local"))
        if destination is None:
            with contextlib.suppress(OSError):
                name = serval.getsockname()
                destination = (str(name[0]), int(name[1]))
        tlvs = []
        flow = event.get("flow")
        if isinstance(flow, int):
            tlvs.append(unique_id_tlv(f"serval-flow-{flow}"))
        return encode_v2(source, destination, tlvs)

    def _count_error(self, labels: tuple[str, str, str], reason: str) -> None:
        self.connect_errors[reason] = self.connect_errors.get(reason, 0) + 1
        self._metrics.connect_errors.labels(*labels, reason).inc()

    def _ended(self, connection: Connection, reason: str) -> None:
        self.active -= 1


async def _connect_tcp(host: str, port: int) -> socket.socket:
    """Non-blocking TCP connect to the legacy server, trying each resolved address."""
    loop = asyncio.get_running_loop()
    infos: list[tuple[socket.AddressFamily, tuple[str, int]]]
    try:
        infos = [(socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET,
                  (host, port))]
    except ValueError:
        resolved = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos = [(family, (str(address[0]), int(address[1])))
                 for family, _, _, _, address in resolved]
    last_error: OSError = OSError(f"{host}: no address")
    for family, address in infos:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                             socket.SOCK_CLOEXEC)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last_error


def _endpoint(value: object) -> tuple[str, int] | None:
    if isinstance(value, dict):
        address, port = value.get("address"), value.get("port")
        if isinstance(address, str) and isinstance(port, int):
            return address, port
    return None


def _proxy_endpoint(value: object) -> tuple[str, int] | None:
    """The control API's ``proxy`` field: ``{addr, port}`` (``address`` accepted too)."""
    if isinstance(value, dict):
        address = value.get("addr", value.get("address"))
        port = value.get("port")
        if isinstance(address, str) and isinstance(port, int) and not isinstance(port, bool):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                return None
            return address, port
    return None
