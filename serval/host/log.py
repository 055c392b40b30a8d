"""servald logging: structlog set-up, rate-limited warnings, counters.

One canonical line per flow (event "flow") is written when a flow ends its establishment: at
info level when it failed (timeout, refusal, abort), at debug level when it succeeded (a
translator opens thousands per second: a line each would cost more CPU than the set-up itself
and fill disks; the counters count them). Everything else is either a start/stop line or a
rate-limited warning about bad input (garbage on the SAL port or the control socket must never
be able to fill a disk, so such warnings are limited per kind and summarised with the number
suppressed).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import Any

import structlog

BAD_INPUT_LOG_INTERVAL_S = 5.0  # at most one line per kind of bad input per interval


def configure_logging(level: str, fmt: str = "console") -> None:
    """Route structlog to stderr with a level filter; `fmt` is 'console' or 'json'."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("servald").bind(**bound)


class Counters:
    """Named monotonically increasing counters (exported by the `counters` control op)."""

    def __init__(self) -> None:
        self._values: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        self._values[name] += amount

    def get(self, name: str) -> int:
        return self._values[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._values.items()))


class RateLimitedLog:
    """Warns about each kind of bad input at most once per interval, counting the rest."""

    def __init__(self, logger: Any, interval_s: float = BAD_INPUT_LOG_INTERVAL_S) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warning(self, kind: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval_s:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        self._logger.warning(kind, suppressed_since_last=suppressed, **fields)
