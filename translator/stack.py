"""The Serval stack under the appliance: the bundled servald (started, watched, restarted) or an
existing one (only watched).

Theory of operation
-------------------
*bundled*: servald runs as our child with the config cut out of the translator's file
(translator.config, written to ``runtime_dir/servald.yaml``) and ``--control-socket``. A
watcher task starts it, waits until it answers ``status`` on the control socket (then servald
is *up*), and from then on waits for either its exit or ``health_failures`` consecutive failed
health probes (a wedged servald: we kill it). Then it restarts it after an exponential backoff
(``backoff_initial_s`` doubling up to ``backoff_max_s``; reset once servald stayed up for
``stable_after_s``) as long as the budget allows (``max_restarts`` within ``window_s``). When
the budget is exhausted the translator gives up: it drains and exits non-zero, so that systemd's
own restart policy (with its own limits) takes over rather than us spinning.

Established connections do not depend on servald: they are plain kernel TCP sockets the relay
owns. While servald is down new connects fail fast (counted as ``servald_unavailable``) and
exporters re-``listen`` as soon as it is back (translator.exporters); the relayed flows are
handed back to it (``adopt``) so they can migrate again: every up/down seen here feeds the
``ServaldPresence`` of the control socket, on which translator.migration waits.

The child is started in a session of its own (a Ctrl-C on our terminal must not kill it behind
the supervisor's back; we stop it ourselves, last, after the drain) with PR_SET_PDEATHSIG, so it
is killed if we die without cleaning up and never survives as an orphan holding the control
socket that the next servald would need.

*external*: the same health probes, no process management.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from serval.control import AsyncControlClient
from serval.errors import ServalError
from translator.config import StackConfig
from translator.metrics import Metrics

PR_SET_PDEATHSIG = 1
STARTUP_PROBE_INTERVAL_S = 0.05
HEALTH_REPLY_TIMEOUT_S = 2.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class StackError(ServalError):
    """servald could not be started or reached (the message says where and why)."""


class Stack:
    """servald as seen by the supervisor: up or down, pid, restarts, last status."""

    def __init__(
        self,
        config: StackConfig,
        runtime_dir: str,
        metrics: Metrics,
        log: Any,
        *,
        json_logs: bool,
        on_fatal: Callable[[str], None],
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self._metrics = metrics
        self._log = log
        self._json_logs = json_logs
        self._on_fatal = on_fatal
        self.up = False
        self.restarts = 0
        self.last_exit: str | None = None
        self.last_status: dict[str, Any] | None = None
        self.up_since: float | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_up: asyncio.Future[None] | None = None
        self._starting = False  # start() is waiting for the first "up"
        self._restart_times: deque[float] = deque()
        self._health_client: AsyncControlClient | None = None

    @property
    def control_socket(self) -> str:
        return self.config.control_socket

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, strict: bool = True) -> None:
        """Start (bundled) or find (external) servald and wait until it answers.

        Bundled and `strict` (the first start): raises StackError when servald does not come
        up within start_timeout_s. Otherwise waits as long, then carries on degraded while the
        supervisor task keeps restarting or probing it."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._first_up = loop.create_future()
        self._starting = True
        if self.config.mode == "bundled":
            self._task = loop.create_task(self._supervise_bundled(), name="servald-supervisor")
        else:
            self._task = loop.create_task(self._watch_external(), name="servald-watch")
        try:
            async with asyncio.timeout(self.config.start_timeout_s + 1.0):
                await asyncio.shield(self._first_up)
        except StackError:
            self._starting = False
            await self.stop()
            if strict:
                raise
            self._on_fatal("bundled servald does not start (restart budget exhausted)")
        except TimeoutError:
            self._starting = False
            if self.config.mode == "bundled" and strict:
                await self.stop()
                raise StackError(
                    f"bundled servald did not answer on {self.control_socket} within "
                    f"{self.config.start_timeout_s:g} s") from None
            self._log.warning("servald_not_reachable", control_socket=self.control_socket,
                              waited_s=self.config.start_timeout_s)
        finally:
            self._starting = False

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._terminate()
        self._close_health_client()
        self._set_up(False)

    async def reconfigure(self, config: StackConfig) -> bool:
        """Apply a new stack section; restarts (or re-finds) servald only if it changed."""
        if config == self.config:
            return False
        self._log.info("stack_reconfigured", mode=config.mode,
                       control_socket=config.control_socket)
        await self.stop()
        self.config = config
        self._restart_times.clear()
        await self.start(strict=False)
        return True

    # -- bundled ------------------------------------------------------------------------------

    def _write_config(self) -> str:
        os.makedirs(self.runtime_dir, mode=0o750, exist_ok=True)
        path = os.path.join(self.runtime_dir, "servald.yaml")
        temp = path + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(self.config.servald_file_text(self._json_logs))
        os.replace(temp, path)
        return path

    async def _spawn(self) -> asyncio.subprocess.Process:
        config_path = self._write_config()
        argv = self.config.servald_argv(config_path)
        # servald must not talk to systemd in our name (NotifyAccess=main would ignore it, but
        # a stray READY=1 or WATCHDOG=1 from a child is confusing at best).
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._log.info("servald_started", pid=process.pid, argv=" ".join(argv))
        return process

    async def _supervise_bundled(self) -> None:
        consecutive_failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._process = await self._spawn()
            except OSError as exc:
                self.last_exit = f"could not start: {exc.strerror or exc}"
                self._log.error("servald_spawn_failed", error=str(exc))
            else:
                await self._run_once(self._process)
            if self._stopping:
                return
            ran_s = time.monotonic() - started
            if ran_s >= self.config.restart.stable_after_s:
                consecutive_failures = 0
            now = time.monotonic()
            policy = self.config.restart
            while self._restart_times and now - self._restart_times[0] > policy.window_s:
                self._restart_times.popleft()
            if len(self._restart_times) >= policy.max_restarts:
                reason = (f"servald failed {len(self._restart_times) + 1} times within "
                          f"{policy.window_s:g} s (last: {self.last_exit}); restart budget "
                          f"of {policy.max_restarts} exhausted")
                self._log.error("servald_restart_budget_exhausted", reason=reason)
                if self._starting and self._first_up is not None and \
                        not self._first_up.done():
                    self._first_up.set_exception(StackError(reason))  # start() fails now
                else:
                    self._on_fatal(reason)
                return
            delay = min(policy.backoff_max_s,
                        policy.backoff_initial_s * (2 ** consecutive_failures))
            consecutive_failures += 1
            self._log.warning("servald_restarting", in_s=round(delay, 3),
                              last_exit=self.last_exit, restarts=self.restarts + 1)
            await asyncio.sleep(delay)
            self._restart_times.append(time.monotonic())
            self.restarts += 1
            self._metrics.servald_restarts.inc()

    async def _run_once(self, process: asyncio.subprocess.Process) -> None:
        """From spawn to exit: wait until it answers, then watch it; kill it if wedged."""
        exit_task = asyncio.ensure_future(process.wait())
        try:
            deadline = time.monotonic() + self.config.start_timeout_s
            while not exit_task.done() and time.monotonic() < deadline:
                if await self._probe(timeout_s=1.0):
                    self._set_up(True)
                    break
                await asyncio.wait({exit_task}, timeout=STARTUP_PROBE_INTERVAL_S)
            if not self.up and not exit_task.done():
                self._log.error("servald_start_timeout", pid=process.pid,
                                waited_s=self.config.start_timeout_s)
                self._kill(process)
            failures = 0
            while not exit_task.done():
                await asyncio.wait({exit_task}, timeout=self.config.health_interval_s)
                if exit_task.done():
                    break
                if await self._probe(timeout_s=HEALTH_REPLY_TIMEOUT_S):
                    failures = 0
                    self._set_up(True)
                    continue
                failures += 1
                if self._is_zombie_or_gone(process.pid):
                    continue
                if failures >= self.config.health_failures:
                    self._log.error("servald_unresponsive", pid=process.pid, probes=failures)
                    self._set_up(False)
                    self._kill(process)
            returncode = await exit_task
        finally:
            if not exit_task.done():
                exit_task.cancel()
        self._set_up(False)
        self._close_health_client()
        self.last_exit = _describe_exit(returncode)
        if not self._stopping:
            self._log.error("servald_exited", pid=process.pid, exit=self.last_exit)

    @staticmethod
    def _is_zombie_or_gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    @staticmethod
    def _kill(process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            async with asyncio.timeout(self.config.stop_timeout_s):
                await process.wait()
        except TimeoutError:
            self._log.warning("servald_kill", pid=process.pid,
                              after_s=self.config.stop_timeout_s)
            self._kill(process)
            await process.wait()
        self.last_exit = _describe_exit(process.returncode)
        self._log.info("servald_stopped", pid=process.pid, exit=self.last_exit)

    # -- external -----------------------------------------------------------------------------

    async def _watch_external(self) -> None:
        while not self._stopping:
            self._set_up(await self._probe(timeout_s=HEALTH_REPLY_TIMEOUT_S))
            await asyncio.sleep(self.config.health_interval_s if self.up
                                else min(1.0, self.config.health_interval_s))

    # -- probes ---------------------------------------------------------------------------------

    async def _probe(self, timeout_s: float) -> bool:
        try:
            if self._health_client is None or self._health_client.channel.closed:
                self._health_client = await AsyncControlClient.connect(self.control_socket)
                await self._health_client.call("hello", {"client": "serval-translator"},
                                               wait_s=timeout_s)
            frame = await self._health_client.call("status", {}, wait_s=timeout_s)
        except (OSError, ServalError):
            self._close_health_client()
            return False
        self.last_status = {k: v for k, v in frame.message.items() if k not in ("id", "ok")}
        return True

    def _close_health_client(self) -> None:
        if self._health_client is not None:
            self._health_client.close()
            self._health_client = None

    def _set_up(self, up: bool) -> None:
        servald_presence(self.control_socket).mark(up)
        if up != self.up:
            self.up = up
            self.up_since = time.monotonic() if up else None
            self._metrics.servald_up.set(1 if up else 0)
            if up:
                self._log.info("servald_up", pid=self.pid, control_socket=self.control_socket)
            elif not self._stopping:
                self._log.warning("servald_down", control_socket=self.control_socket)
        if up and self._first_up is not None and not self._first_up.done():
            self._first_up.set_result(None)

    # -- status -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "mode": self.config.mode,
            "control_socket": self.control_socket,
            "up": self.up,
            "up_for_s": None if self.up_since is None else round(
                time.monotonic() - self.up_since, 1),
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                with process.oneshot():
                    info["rss_bytes"] = process.memory_info().rss
                    times = process.cpu_times()
                    info["cpu_s"] = round(times.user + times.system, 3)
        if self.last_status is not None:
            info["servald"] = self.last_status
        return info


class ServaldPresence:
    """Whether servald answers on one control socket, and how often it came (back) up.

    The watches of relayed flows (translator.migration) wait on it after losing their control
    connection: once servald is back they hand their flows to it (op ``adopt``). The Stack
    feeds it from its probes. Waiters are plain futures of the running loop, so one registry
    entry outlives event loops (in-process tests run several).
    """

    def __init__(self) -> None:
        self.up = False
        self.epoch = 0  # times servald came up
        self._waiters: list[asyncio.Future[None]] = []

    def mark(self, up: bool) -> None:
        if up and not self.up:
            self.epoch += 1
        self.up = up
        if up:
            waiters, self._waiters = self._waiters, []
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    def back_since(self, epoch: int) -> bool:
        return self.up and self.epoch > epoch

    async def wait_back(self, since_epoch: int, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until servald came up after `since_epoch`."""
        if self.back_since(since_epoch):
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(future)
        return self.back_since(since_epoch)


_presences: dict[str, ServaldPresence] = {}


def servald_presence(control_socket: str) -> ServaldPresence:
    """The presence record of the servald at `control_socket` (one per path, per process)."""
    presence = _presences.get(control_socket)
    if presence is None:
        presence = _presences[control_socket] = ServaldPresence()
    return presence


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
