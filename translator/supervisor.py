"""The supervisor: ``serval-translator run``. One asyncio loop owns the whole appliance.

Theory of operation
-------------------
Startup, in this order so that nothing is offered before it can work: the metrics endpoint, the
relay engine, servald (bundled: started and supervised; external: found), the TCP listeners,
the exporters (each ``listen``s on servald), the status socket; then ``READY=1``. Any failure
before READY (a port in use, servald not coming up) is fatal with a message naming the config
position, and everything already started is stopped again.

SIGHUP reloads the file. The new configuration is validated completely and every new listening
socket is bound *before* anything changes; if either fails the reload is rejected, logged,
counted, and the old configuration keeps running untouched. Then the changes are applied:
listeners and exporters are added, removed or updated by name (translator.listeners and
translator.exporters say what "updated" means for each), a changed relay section starts a new
relay engine generation, a changed stack section restarts servald; logging, metrics and status
settings are re-applied. Established connections are never touched by a reload: they live in the
relay and end on their own.

SIGTERM (or SIGINT) drains: the listeners and exporters stop taking clients, established
connections get ``drain.timeout_s`` to finish, the rest are closed gracefully (flushed, FIN)
and, after a short grace, aborted; then servald is stopped and the process exits 0. A second
SIGTERM skips the wait. The exit status is 1 when the drain was caused by a fatal condition
(servald's restart budget exhausted).

systemd (translator.sdnotify): READY=1 after startup and after each reload, RELOADING=1 while
reloading, STOPPING=1 on drain, STATUS= with a one-line summary, WATCHDOG=1 from the event loop
at half the watchdog interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from serval.errors import ConfigError, ServalError
from translator import __version__, logsetup
from translator.config import TranslatorConfig, load_config
from translator.control_pool import ControlPool
from translator.exporters import Exporter
from translator.listeners import Listener, open_listening_socket
from translator.metrics import Metrics
from translator.relay import RelayPool
from translator.sdnotify import Notifier
from translator.stack import Stack, StackError
from translator.status import StatusServer

DRAIN_POLL_INTERVAL_S = 0.05
# After the drain timeout, pairs are closed gracefully (flush + FIN); this long later whatever
# is left is aborted so that shutdown is bounded.
DRAIN_CLOSE_GRACE_S = 2.0
STATUS_UPDATE_INTERVAL_S = 5.0


class StartupError(ServalError):
    """The appliance could not start; the message names the config position and the cause."""


class Supervisor:
    """Runs one appliance from a validated configuration until it is told to stop."""

    def __init__(
        self,
        config_path: str,
        config: TranslatorConfig,
        *,
        notifier: Notifier | None = None,
        log_stream: TextIO | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()
        self._log_stream = log_stream
        self.metrics = Metrics()
        self.log: Any = logsetup.get_logger()
        self.state = "starting"
        self.generation = 1
        self.last_reload: dict[str, Any] | None = None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.listeners: dict[str, Listener] = {}
        self.exporters: dict[str, Exporter] = {}
        self.exit_code = 0
        self.relay: RelayPool | None = None
        self.stack: Stack | None = None
        self.pool: ControlPool | None = None
        self.status_server: StatusServer | None = None
        self._json_logs = False
        self._stop_requested: asyncio.Event | None = None
        self._drain_now: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._ready = False

    # -- entry point ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until SIGTERM (or a fatal condition), drain; returns the exit status."""
        self._json_logs = logsetup.configure(self.config.logging, self._log_stream)
        self.log = logsetup.get_logger()
        self._stop_requested = asyncio.Event()
        self._drain_now = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        self.log.info("starting", version=__version__, config=self.config_path, pid=os.getpid())
        try:
            await self._startup()
        except (StartupError, ServalError, OSError) as exc:
            self.log.error("startup_failed", error=str(exc))
            self.notifier.status(f"startup failed: {exc}")
            await self._teardown()
            self._remove_signals(loop)
            return 1
        self.state = "running"
        self._ready = True
        self.notifier.ready(self.status_line())
        self.log.info("ready", listeners=len(self.listeners), exporters=len(self.exporters),
                      servald_up=self.stack.up if self.stack else False)
        self._spawn(self._status_updates())
        if self.notifier.watchdog_interval_s:
            self._spawn(self._watchdog(self.notifier.watchdog_interval_s))
        await self._stop_requested.wait()
        await self._drain()
        self._remove_signals(loop)
        return self.exit_code

    def request_stop(self, exit_code: int = 0, reason: str = "signal") -> None:
        """Begin the drain (idempotent; a second call skips the drain wait)."""
        if self._stop_requested is None:
            return
        if self._stop_requested.is_set():
            assert self._drain_now is not None
            if not self._drain_now.is_set():
                self.log.warning("drain_skipped", reason=reason)
                self._drain_now.set()
            return
        self.exit_code = max(self.exit_code, exit_code)
        self.log.info("stop_requested", reason=reason)
        self._stop_requested.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            loop.add_signal_handler(signal.SIGTERM, self.request_stop, 0, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.request_stop, 0, "SIGINT")

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- startup and teardown ----------------------------------------------------------------

    async def _startup(self) -> None:
        config = self.config
        try:
            self.metrics.serve(config.metrics.address)
        except OSError as exc:
            raise StartupError(f"{config.source}: metrics.address {config.metrics.address}: "
                               f"cannot listen: {exc.strerror or exc}") from None
        self.relay = RelayPool(config.relay, self.metrics, self.log)
        self.relay.start()
        self.stack = Stack(config.stack, config.runtime_dir, self.metrics, self.log,
                           json_logs=self._json_logs, on_fatal=self._stack_fatal)
        try:
            await self.stack.start(strict=True)
        except StackError as exc:
            raise StartupError(f"{config.source}: stack: {exc}") from None
        self.pool = ControlPool(config.stack.control_socket)
        for listener_config in config.listeners:
            try:
                sock = open_listening_socket(listener_config)
            except OSError as exc:
                raise StartupError(
                    f"{listener_config.position}: listener {listener_config.name}: cannot "
                    f"listen on {listener_config.bind}: {exc.strerror or exc}") from None
            listener = Listener(listener_config, self.pool, self.relay, self.metrics, self.log,
                                sock)
            self.listeners[listener_config.name] = listener
            listener.start()
        for exporter_config in config.exporters:
            exporter = Exporter(exporter_config, config.stack.control_socket, self.relay,
                                self.metrics, self.log)
            self.exporters[exporter_config.name] = exporter
            exporter.start()
        for exporter in self.exporters.values():
            if not await exporter.wait_listening(config.stack.start_timeout_s):
                self.log.warning("exporter_not_listening_yet", exporter=exporter.name,
                                 service=exporter.config.service_text)
        await self._open_status(config)

    async def _open_status(self, config: TranslatorConfig) -> None:
        if config.status.socket is None:
            return
        server = StatusServer(config.status.socket, config.status.mode, self.snapshot)
        try:
            await server.start()
        except (OSError, ServalError) as exc:
            raise StartupError(f"{config.source}: status.socket {config.status.socket}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        self.status_server = server

    async def _teardown(self) -> None:
        for listener in self.listeners.values():
            listener.close()
            listener.cancel_connecting()
        for exporter in self.exporters.values():
            await exporter.close()
            exporter.cancel_connecting()
        for task in list(self._background):
            task.cancel()
        if self.relay is not None:
            self.relay.stop()
        if self.status_server is not None:
            await self.status_server.close()
        if self.stack is not None:
            await self.stack.stop()
        if self.pool is not None:
            self.pool.clear()
        self.metrics.stop()
        self.notifier.close()

    def _stack_fatal(self, reason: str) -> None:
        self.log.error("fatal", reason=reason)
        self.notifier.status(f"fatal: {reason}")
        self.request_stop(exit_code=1, reason="servald restart budget exhausted")

    # -- reload ---------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and apply it (module docstring); True if applied."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            if self.state != "running":
                self.log.warning("reload_ignored", state=self.state)
                return False
            self.state = "reloading"
            self.notifier.reloading()
            self.log.info("reload_started", config=self.config_path)
            try:
                return await self._reload()
            finally:
                if self.state == "reloading":
                    self.state = "running"
                self.notifier.ready(self.status_line())

    def _reject(self, reason: str) -> bool:
        self.metrics.reloads.labels("rejected").inc()
        self.last_reload = {"at": _now_iso(), "result": "rejected", "error": reason}
        self.log.error("reload_rejected", error=reason,
                       note="the running configuration is unchanged")
        return False

    async def _reload(self) -> bool:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return self._reject(str(exc))
        # Stage every new listening socket before changing anything.
        staged: dict[str, socket.socket] = {}
        for listener_config in new.listeners:
            old = self.listeners.get(listener_config.name)
            if old is not None and old.config.same_socket(listener_config):
                continue
            try:
                staged[listener_config.name] = open_listening_socket(listener_config)
            except OSError as exc:
                for sock in staged.values():
                    sock.close()
                return self._reject(
                    f"{listener_config.position}: listener {listener_config.name}: cannot "
                    f"listen on {listener_config.bind}: {exc.strerror or exc}")
        assert self.relay is not None and self.stack is not None and self.pool is not None
        old_config = self.config
        changes: list[str] = []

        if new.logging != old_config.logging:
            self._json_logs = logsetup.configure(new.logging, self._log_stream)
            self.log = logsetup.get_logger()
            changes.append("logging")
        if new.metrics != old_config.metrics:
            try:
                self.metrics.serve(new.metrics.address)
                changes.append("metrics")
            except OSError as exc:
                self.log.error("metrics_endpoint_failed", address=str(new.metrics.address),
                               error=exc.strerror or str(exc))
        if self.relay.reconfigure(new.relay):
            changes.append("relay")
        if new.stack != old_config.stack or new.runtime_dir != old_config.runtime_dir:
            self.stack.runtime_dir = new.runtime_dir
            if await self.stack.reconfigure(new.stack):
                changes.append("stack")
            self.pool.retarget(new.stack.control_socket)

        # Listeners: by name.
        for name in list(self.listeners):
            if name not in {lc.name for lc in new.listeners}:
                self.listeners.pop(name).close()
                changes.append(f"-listener {name}")
        for listener_config in new.listeners:
            name = listener_config.name
            current = self.listeners.get(name)
            if name in staged:
                replacement = Listener(listener_config, self.pool, self.relay, self.metrics,
                                       self.log, staged[name])
                replacement.start()
                self.listeners[name] = replacement
                if current is not None:
                    current.close()  # after the new socket is up: no gap
                    changes.append(f"~listener {name}")
                else:
                    changes.append(f"+listener {name}")
            elif current is not None and current.config != listener_config:
                current.update(listener_config)
                changes.append(f"~listener {name}")

        # Exporters: by name.
        new_exporter_names = {ec.name for ec in new.exporters}
        for name in list(self.exporters):
            if name not in new_exporter_names:
                await self.exporters.pop(name).close()
                changes.append(f"-exporter {name}")
        for exporter_config in new.exporters:
            current_exporter = self.exporters.get(exporter_config.name)
            if current_exporter is None:
                exporter = Exporter(exporter_config, new.stack.control_socket, self.relay,
                                    self.metrics, self.log)
                self.exporters[exporter_config.name] = exporter
                exporter.start()
                changes.append(f"+exporter {exporter_config.name}")
            elif (current_exporter.config != exporter_config
                  or current_exporter.control_socket != new.stack.control_socket):
                await current_exporter.update(exporter_config, new.stack.control_socket)
                changes.append(f"~exporter {exporter_config.name}")

        if new.status != old_config.status:
            if self.status_server is not None:
                await self.status_server.close()
                self.status_server = None
            try:
                await self._open_status(new)
            except StartupError as exc:
                self.log.error("status_socket_failed", error=str(exc))
            changes.append("status")

        self.config = new
        self.generation += 1
        self.metrics.reloads.labels("ok").inc()
        self.last_reload = {"at": _now_iso(), "result": "ok", "changes": changes}
        self.log.info("reload_done", generation=self.generation, changes=changes or ["none"])
        return True

    # -- drain -----------------------------------------------------------------------------------

    async def _drain(self) -> None:
        assert self._drain_now is not None
        self.state = "draining"
        timeout_s = self.config.drain.timeout_s
        self.notifier.stopping(f"draining {self.active_connections()} connections")
        self.log.info("drain_started", active=self.active_connections(), timeout_s=timeout_s)
        for listener in self.listeners.values():
            listener.close()
        for exporter in self.exporters.values():
            await exporter.close()
        deadline = time.monotonic() + timeout_s
        while self.active_connections() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_POLL_INTERVAL_S):
                    await self._drain_now.wait()
            if self._drain_now.is_set():
                break
        remaining = self.active_connections()
        if remaining:
            self.log.warning("drain_timeout", remaining=remaining, timeout_s=timeout_s)
            for listener in self.listeners.values():
                listener.cancel_connecting()
            for exporter in self.exporters.values():
                exporter.cancel_connecting()
            if self.relay is not None:
                self.relay.close_all("drain-timeout")
                grace_deadline = time.monotonic() + DRAIN_CLOSE_GRACE_S
                while self.relay.active and time.monotonic() < grace_deadline:
                    await asyncio.sleep(DRAIN_POLL_INTERVAL_S)
                self.relay.abort_all("drain-timeout")
        else:
            self.log.info("drained")
        for listener in self.listeners.values():
            await listener.wait_connecting()
        for exporter in self.exporters.values():
            await exporter.wait_connecting()
        self.state = "stopped"
        await self._teardown()
        self.log.info("stopped", exit_code=self.exit_code)

    # -- observability -------------------------------------------------------------------------

    def active_connections(self) -> int:
        relayed = self.relay.active if self.relay is not None else 0
        connecting = sum(listener.connecting for listener in self.listeners.values()) + sum(
            exporter.connecting for exporter in self.exporters.values())
        return relayed + connecting

    def status_line(self) -> str:
        servald = "up" if self.stack is not None and self.stack.up else "down"
        return (f"{self.state}: {self.active_connections()} connections, "
                f"{len(self.listeners)} listeners, {len(self.exporters)} exporters, "
                f"servald {servald}")

    def snapshot(self) -> dict[str, Any]:
        """The status document (``serval-translator status --json``)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state,
            "started_at": datetime.fromtimestamp(self.started_wall, UTC).isoformat(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "config": {"path": self.config_path, "generation": self.generation,
                       "last_reload": self.last_reload},
            "stack": self.stack.describe() if self.stack is not None else {},
            "relay": self.relay.describe() if self.relay is not None else {},
            "listeners": [listener.describe() for listener in self.listeners.values()],
            "exporters": [exporter.describe() for exporter in self.exporters.values()],
            "services": self.metrics.per_service(),
            "connections": self.active_connections(),
            "metrics_address": str(self.metrics.address) if self.metrics.address else None,
        }

    async def _status_updates(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(STATUS_UPDATE_INTERVAL_S)
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line

    async def _watchdog(self, interval_s: float) -> None:
        # Pinged from the event loop itself: if the loop wedges, the pings stop and systemd
        # restarts us (sdnotify module docstring).
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s / 2)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def run(config_path: str, config: TranslatorConfig) -> int:
    """Run the appliance (blocking) and return its exit status."""
    supervisor = Supervisor(config_path, config)
    try:
        return asyncio.run(supervisor.run())
    except KeyboardInterrupt:
        return 130
