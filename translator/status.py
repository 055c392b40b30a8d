"""The translator's status endpoint and ``serval-translator status``.

The running supervisor serves a unix stream socket (``status.socket``, root-only by default):
a client connects, the supervisor writes one JSON document (the live snapshot: state, config,
listeners, exporters, relay, servald health) followed by a newline, and closes. No request is
needed, so ``socat - UNIX-CONNECT:/run/serval-translator/status.sock`` works too. The socket is
created with a tight umask, so it never exists with looser permissions than configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from serval.errors import ServalError

STATUS_WRITE_TIMEOUT_S = 5.0
STATUS_READ_TIMEOUT_S = 5.0
MAX_STATUS_BYTES = 16 * 1024 * 1024


class StatusError(ServalError):
    """The status endpoint could not be reached or answered garbage."""


class StatusServer:
    """Serves `snapshot()` as JSON to every connection."""

    def __init__(self, path: str, mode: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.mode = mode
        self._snapshot = snapshot
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self.mode)
        sock.listen(64)
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    def _remove_stale(self) -> None:
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise StatusError(f"{self.path} exists and is not a socket; not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left behind by a crashed translator
            return
        finally:
            probe.close()
        raise StatusError(f"another serval-translator is serving the status socket {self.path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            document = json.dumps(self._snapshot(), default=str, separators=(",", ":"))
            writer.write(document.encode() + b"\n")
            async with asyncio.timeout(STATUS_WRITE_TIMEOUT_S):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(STATUS_WRITE_TIMEOUT_S):
                    await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def fetch_status(path: str, timeout_s: float = STATUS_READ_TIMEOUT_S) -> dict[str, Any]:
    """Read one snapshot from a running translator (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise StatusError(f"no status socket at {path}: is serval-translator running? "
                              "(--socket or --config select another one)") from None
        except ConnectionRefusedError:
            raise StatusError(f"nothing answers on {path}: serval-translator is not "
                              "running") from None
        except PermissionError:
            raise StatusError(f"permission denied on {path} (see status.mode in the "
                              "configuration)") from None
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_STATUS_BYTES:
                raise StatusError(f"status answer from {path} exceeds {MAX_STATUS_BYTES} bytes")
    except TimeoutError:
        raise StatusError(f"no answer from {path} within {timeout_s:g} s") from None
    except OSError as exc:
        raise StatusError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        document = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise StatusError(f"{path} answered something that is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise StatusError(f"{path} answered JSON that is not an object")
    return document


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(errors.items())) or "-"


def format_status(status: dict[str, Any]) -> str:
    """The human rendering of a snapshot."""
    lines: list[str] = []
    stack = status.get("stack", {})
    relay = status.get("relay", {})
    lines.append(f"serval-translator {status.get('version', '?')}  pid {status.get('pid')}  "
                 f"state {status.get('state')}  up {status.get('uptime_s')} s")
    config = status.get("config", {})
    lines.append(f"config {config.get('path')}  (generation {config.get('generation')}, "
                 f"last reload: {config.get('last_reload') or 'never'})")
    servald_state = "up" if stack.get("up") else "DOWN"
    lines.append(f"servald {servald_state}  ({stack.get('mode')}, {stack.get('control_socket')}"
                 f", pid {stack.get('pid')}, restarts {stack.get('restarts')}, last exit "
                 f"{stack.get('last_exit') or '-'})")
    lines.append(f"relay: {relay.get('active')} active, {relay.get('completed')} completed, "
                 f"{relay.get('workers')} workers, pipe {relay.get('pipe_size')} bytes")
    listeners = status.get("listeners", [])
    if listeners:
        lines.append("")
        lines.append("listeners")
        rows = [[item["name"], item["bind"], item["service"], str(item["active"]),
                 str(item["accepted"]), _errors(item.get("connect_errors", {})),
                 "paused" if item.get("paused") else "ok"] for item in listeners]
        lines += ["  " + line for line in _table(
            ["name", "bind", "service", "active", "total", "connect errors", "state"], rows)]
    exporters = status.get("exporters", [])
    if exporters:
        lines.append("")
        lines.append("exporters")
        rows = [[item["name"], item["service"], item["target"], str(item["weight"]),
                 str(item["active"]), str(item["accepted"]),
                 _errors(item.get("connect_errors", {})),
                 "listening" if item.get("listening") else "NOT LISTENING"]
                for item in exporters]
        lines += ["  " + line for line in _table(
            ["name", "service", "target", "weight", "active", "total", "connect errors",
             "state"], rows)]
    services = status.get("services", {})
    if services:
        lines.append("")
        lines.append("per service")
        rows = [[name, str(v.get("active", 0)), str(v.get("connections", 0)),
                 str(v.get("bytes_up", 0)), str(v.get("bytes_down", 0)),
                 _errors(v.get("connect_errors", {}))] for name, v in sorted(services.items())]
        lines += ["  " + line for line in _table(
            ["service", "active", "total", "bytes up", "bytes down", "connect errors"], rows)]
    return "\n".join(lines)
