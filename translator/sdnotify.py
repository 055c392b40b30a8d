"""systemd's service notification protocol (sd_notify), implemented directly.

The protocol is tiny (sd_notify(3)): the service manager passes ``$NOTIFY_SOCKET``, the path of a
unix *datagram* socket (a leading ``@`` means the abstract namespace), and the service sends it
newline-separated ``KEY=VALUE`` assignments, one message per datagram:

- ``READY=1`` once startup is complete (Type=notify waits for it);
- ``RELOADING=1`` plus ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, microseconds) when a reload starts,
  and ``READY=1`` again when it is done;
- ``STOPPING=1`` when shutdown starts;
- ``STATUS=...`` a one-line status shown by ``systemctl status``;
- ``WATCHDOG=1`` keep-alive pings: with ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC``
  (and ``$WATCHDOG_PID``, which must be ours) and kills the service when pings stop for that
  long. We ping at half the interval, as sd_watchdog_enabled(3) recommends, from the event loop
  itself, so that a wedged loop stops the pings and systemd restarts us.

Without ``$NOTIFY_SOCKET`` every call does nothing, so the same code runs under a terminal.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
MAX_STATUS_CHARS = 200


class Notifier:
    """Sends sd_notify messages; a no-op when not started by systemd with Type=notify."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = self._address(env.get(NOTIFY_SOCKET_ENV, ""))
        self.watchdog_interval_s = self._watchdog(env)
        self._sock: socket.socket | None = None
        self.sent = 0
        self.failures = 0

    @staticmethod
    def _address(path: str) -> str | bytes | None:
        if not path:
            return None
        if path.startswith("@"):
            return b"\0" + path[1:].encode()
        if path.startswith("/"):
            return path
        return None  # vsock or garbage: not something we speak

    @staticmethod
    def _watchdog(env: Mapping[str, str]) -> float | None:
        usec_text = env.get(WATCHDOG_USEC_ENV, "")
        if not usec_text.isdigit() or int(usec_text) == 0:
            return None
        pid_text = env.get(WATCHDOG_PID_ENV, "")
        if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
            return None  # the watchdog is meant for another process (e.g. our parent)
        return int(usec_text) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False if not sent (never raises)."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError:
            self.failures += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status[:MAX_STATUS_CHARS])

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status[:MAX_STATUS_CHARS])

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text[:MAX_STATUS_CHARS])

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
