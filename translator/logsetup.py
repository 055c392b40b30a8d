"""structlog set-up: JSON under systemd (or any non-terminal), readable on a terminal.

``format: auto`` picks JSON when systemd started us (it sets ``$INVOCATION_ID`` for every unit and
``$JOURNAL_STREAM`` when stderr goes to the journal) or when stderr is not a terminal (a log
collector, a pipe), and a coloured key=value console rendering otherwise. Logs go to stderr:
the journal timestamps them itself, but JSON lines carry their own ISO time for collectors.

Every connection ends with exactly one canonical ``connection`` line (translator.relay) that
carries everything an operator needs about it; everything else is rare events (starts, stops,
reloads, servald restarts, errors).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from translator.config import LoggingConfig

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def wants_json(config: LoggingConfig, stream: TextIO | None = None,
               environ: Mapping[str, str] | None = None) -> bool:
    if config.format != "auto":
        return config.format == "json"
    stream = sys.stderr if stream is None else stream
    try:
        is_tty = stream.isatty()
    except (AttributeError, ValueError):
        is_tty = False
    return under_systemd(environ) or not is_tty


def configure(config: LoggingConfig, stream: TextIO | None = None) -> bool:
    """(Re)configure structlog; returns True when JSON was chosen. Safe to call on reload."""
    stream = sys.stderr if stream is None else stream
    json_output = wants_json(config, stream)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if json_output:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=_colors(stream)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[config.level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,  # a reload may change the level
    )
    return json_output


def _colors(stream: TextIO) -> bool:
    try:
        return stream.isatty() and "NO_COLOR" not in os.environ
    except (AttributeError, ValueError):
        return False


def get_logger(**initial: Any) -> Any:
    """A bound structlog logger (typed Any: structlog's BoundLogger protocol is dynamic)."""
    return structlog.get_logger("serval-translator", **initial)
