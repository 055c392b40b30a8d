"""The translator's YAML configuration: schema, validation with positions, the servald section.

Theory of operation
-------------------
The file is *composed* (``yaml.compose``), not loaded: validation walks the node tree, so every
value still has its ``Mark`` and every message names ``FILE:LINE:COLUMN``, the key path and what
was expected (``translator.yaml:14:11: listeners[0].port: expected an integer 1..65535, got
'http' (a string)``). Scalars are turned into Python values by PyYAML's own SafeConstructor, so
``yes``, ``0x10`` or ``1e3`` mean here what they mean everywhere else. Validation does not stop
at the first problem: all of them are collected and reported together, like a compiler does,
because an operator fixing a config file one error per run is an operator losing patience.
Duplicate keys (which YAML loaders silently resolve as "last one wins") are errors, as are
unknown keys: a misspelt ``max_conections`` silently ignored is a production incident.

The bundled servald's settings live inline under ``stack.servald``. They are validated by
servald's own loader (``serval.host.config.load_config``) so the two can never disagree. To keep
positions exact, that section is cut out of the file *in place*: every character outside the
section's node span is replaced by a space (line breaks kept). A YAML block mapping may start at
any indentation, so the result is a valid servald config file whose lines and columns are the
same as in the translator's file; it is both what we validate and what servald is started with.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml
import yaml.constructor

from serval.core.ids import ServiceID
from serval.errors import ConfigError, ServiceIDError
from serval.host.config import Overrides, ServaldConfig
from serval.host.config import load_config as load_servald_config

T = TypeVar("T")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_RUNTIME_DIR = "/run/serval-translator"
DEFAULT_STATUS_SOCKET = DEFAULT_RUNTIME_DIR + "/status.sock"
DEFAULT_BUNDLED_CONTROL_SOCKET = DEFAULT_RUNTIME_DIR + "/servald.sock"
DEFAULT_EXTERNAL_CONTROL_SOCKET = "/run/serval/servald.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
# The kernel's somaxconn on current kernels; the original translator's backlog of 10 throttled
# connection bursts (notes/splice-relays.md section 7.2).
DEFAULT_LISTENER_BACKLOG = 4096
DEFAULT_EXPORTER_BACKLOG = 512
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_PIPE_SIZE_BYTES = 1 << 20
MAX_PIPE_SIZE_BYTES = 1 << 30
DEFAULT_HALF_CLOSE_TIMEOUT_S = 60.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_START_TIMEOUT_S = 15.0
DEFAULT_STOP_TIMEOUT_S = 10.0
DEFAULT_HEALTH_INTERVAL_S = 2.0
DEFAULT_HEALTH_FAILURES = 3
MAX_CONNECTIONS_LIMIT = 1_000_000
# Typed for `_get`, whose checker may also answer None ("no timeout").
_DEFAULT_IDLE_TIMEOUT_S: float | None = DEFAULT_IDLE_TIMEOUT_S
_DEFAULT_HALF_CLOSE_TIMEOUT_S: float | None = DEFAULT_HALF_CLOSE_TIMEOUT_S
MAX_TIMEOUT_S = 86_400.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

ProxyProtocol = Literal["none", "v2"]
EstablishMode = Literal["repair", "handshake"]
LogFormat = Literal["auto", "json", "console"]
StackMode = Literal["bundled", "external"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


# --------------------------------------------------------------------------------------------
# the configuration objects


@dataclass(frozen=True)
class Position:
    """Where a value was written: ``FILE:LINE:COLUMN`` (1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Endpoint:
    """A host (address or name) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenerConfig:
    """A TCP port on which legacy clients are accepted and mapped to a serviceID."""

    name: str
    address: IPAddress
    port: int
    service: ServiceID
    service_text: str  # as written (a name reads better in logs than 64 hex digits)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    backlog: int = DEFAULT_LISTENER_BACKLOG
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S
    mode: EstablishMode | None = None
    forward_client_address: bool = True
    ipv6_only: bool = False
    position: Position | None = None

    @property
    def bind(self) -> Endpoint:
        return Endpoint(str(self.address), self.port)

    def same_socket(self, other: ListenerConfig) -> bool:
        """True when `other` can keep using this listener's socket (same bind and options)."""
        return (self.address, self.port, self.ipv6_only) == (
            other.address, other.port, other.ipv6_only)


@dataclass(frozen=True)
class ExporterConfig:
    """A serviceID offered on the Serval side, served by a local legacy TCP server."""

    name: str
    service: ServiceID
    service_text: str
    target: Endpoint
    weight: int = 1
    priority: int = 0
    backlog: int = DEFAULT_EXPORTER_BACKLOG
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S
    proxy_protocol: ProxyProtocol = "none"
    position: Position | None = None

    def same_registration(self, other: ExporterConfig) -> bool:
        """True when `other` can keep this exporter's servald listener (same service and
        registration parameters); other changes apply to new connections in place."""
        return (self.service, self.weight, self.priority, self.backlog) == (
            other.service, other.weight, other.priority, other.backlog)


@dataclass(frozen=True)
class RestartPolicy:
    """How the bundled servald is restarted: exponential backoff within a budget."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # At most this many restarts within window_s; one more and the translator gives up
    # (drains and exits non-zero, so that systemd's own restart policy takes over).
    max_restarts: int = 5
    window_s: float = 60.0
    # A servald that stayed up this long is healthy again: the backoff starts over.
    stable_after_s: float = 30.0


@dataclass(frozen=True)
class StackConfig:
    """The Serval stack under the translator: a bundled servald or an existing one."""

    mode: StackMode = "external"
    control_socket: str = DEFAULT_EXTERNAL_CONTROL_SOCKET
    # bundled: servald's YAML cut out of the translator's file with positions preserved
    # (see the module docstring), the validated result, and what can be appended to it.
    servald_yaml: str = ""
    servald: ServaldConfig | None = None
    servald_keys: frozenset[str] = frozenset()
    servald_indent: int | None = 0  # column of the section's keys; None: cannot append keys
    command: tuple[str, ...] = ()  # empty: this Python running serval.host.daemon
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    health_failures: int = DEFAULT_HEALTH_FAILURES
    restart: RestartPolicy = field(default_factory=RestartPolicy)

    def servald_argv(self, config_path: str) -> list[str]:
        command = list(self.command) or [sys.executable, "-m", "serval.host.daemon"]
        return [*command, "--config", config_path, "--control-socket", self.control_socket]

    def servald_file_text(self, json_logs: bool) -> str:
        """The servald config file to start servald with; JSON logs under systemd unless the
        section chose a format itself."""
        text = self.servald_yaml
        if json_logs and "log_format" not in self.servald_keys and self.servald_indent is not None:
            if not text.strip():
                return "log_format: json\n"
            text = text.rstrip() + "\n" + " " * self.servald_indent + "log_format: json\n"
        return text


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    address: Endpoint | None = None  # None: no metrics endpoint


@dataclass(frozen=True)
class StatusConfig:
    socket: str | None = DEFAULT_STATUS_SOCKET
    mode: int = 0o600


@dataclass(frozen=True)
class RelayConfig:
    workers: int = 0  # 0: one per CPU
    pipe_size: int = DEFAULT_PIPE_SIZE_BYTES
    half_close_timeout_s: float | None = DEFAULT_HALF_CLOSE_TIMEOUT_S

    def effective_workers(self) -> int:
        return self.workers or max(1, min(255, os.cpu_count() or 1))


@dataclass(frozen=True)
class DrainConfig:
    timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S


@dataclass(frozen=True)
class TranslatorConfig:
    source: str = "<defaults>"
    listeners: tuple[ListenerConfig, ...] = ()
    exporters: tuple[ExporterConfig, ...] = ()
    stack: StackConfig = field(default_factory=StackConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    runtime_dir: str = DEFAULT_RUNTIME_DIR


# --------------------------------------------------------------------------------------------
# positioned checking


class _Missing:
    """Sentinel for "the value did not validate" (a problem has been recorded)."""


MISSING = _Missing()


def _describe(node: yaml.Node, value: object) -> str:
    """How a rejected value reads in a message: the text as written and its YAML type."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "nothing (null)"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__)
    text = str(node.value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text!r} ({kind})"


class _Checker:
    """Validates a composed YAML tree and collects every problem with its position."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def position(self, node: yaml.Node) -> Position:
        mark = node.start_mark
        return Position(self.source, mark.line + 1, mark.column + 1)

    def problem(self, node: yaml.Node, path: str, message: str) -> _Missing:
        prefix = f"{path}: " if path else ""
        self.problems.append(f"{self.position(node)}: {prefix}{message}")
        return MISSING

    def expected(self, node: yaml.Node, path: str, what: str) -> _Missing:
        return self.problem(node, path, f"expected {what}, got {_describe(node, self.value(node))}")

    def value(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.ScalarNode):
            try:
                return self._constructor.construct_object(node, deep=True)
            except yaml.YAMLError:
                return node.value
        return None

    # -- containers ---------------------------------------------------------------------------

    def mapping(
        self,
        node: yaml.Node,
        path: str,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | _Missing:
        """The keys of a mapping node: {key: (key_node, value_node)}; checks unknown,
        duplicate and missing keys."""
        if not isinstance(node, yaml.MappingNode):
            return self.expected(node, path, f"a mapping with keys {', '.join(allowed)}")
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            child = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.problem(key_node, path, f"keys must be text, got {_describe(key_node, key)}")
                continue
            if key not in allowed:
                hint = _closest(key, allowed)
                self.problem(key_node, child, "unknown key" + (
                    f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed here: {', '.join(allowed)}")
                continue
            if key in entries:
                first = self.position(entries[key][0])
                self.problem(key_node, child, f"duplicate key (first given at line {first.line})")
                continue
            entries[key] = (key_node, value_node)
        for key in required:
            if key not in entries:
                self.problem(node, path or "(top level)", f"missing required key {key!r}")
        return entries

    def sequence(self, node: yaml.Node, path: str, what: str) -> list[yaml.Node] | _Missing:
        if isinstance(node, yaml.ScalarNode) and self.value(node) is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            return self.expected(node, path, f"a list of {what}")
        return list(node.value)

    # -- scalars ------------------------------------------------------------------------------

    def integer(self, node: yaml.Node, path: str, low: int, high: int) -> int | _Missing:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return self.expected(node, path, f"an integer {low}..{high}")
        return value

    def number(self, node: yaml.Node, path: str, low: float, high: float, *,
               low_open: bool = False, unit: str = "seconds") -> float | _Missing:
        value = self.value(node)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            number = float(value)
            ok = (number > low if low_open else number >= low) and number <= high
        if not ok:
            bound = f"more than {low:g}" if low_open else f"{low:g}"
            return self.expected(node, path, f"a number of {unit}, {bound}..{high:g}")
        return float(value)

    def optional_timeout(self, node: yaml.Node, path: str) -> float | _Missing | None:
        """A timeout where 0 or null means "none"."""
        value = self.value(node)
        if value is None and isinstance(node, yaml.ScalarNode):
            return None
        number = self.number(node, path, 0.0, MAX_TIMEOUT_S)
        if isinstance(number, _Missing):
            self.problems[-1] += " (0 or null: no timeout)"
            return number
        return number or None

    def boolean(self, node: yaml.Node, path: str) -> bool | _Missing:
        value = self.value(node)
        if not isinstance(value, bool):
            return self.expected(node, path, "true or false")
        return value

    def string(self, node: yaml.Node, path: str,
               what: str = "a non-empty string") -> str | _Missing:
        value = self.value(node)
        if not isinstance(value, str) or not value:
            return self.expected(node, path, what)
        return value

    def choice(self, node: yaml.Node, path: str, choices: Sequence[str]) -> str | _Missing:
        value = self.value(node)
        if not isinstance(value, str) or value.lower() not in choices:
            return self.expected(node, path, "one of " + ", ".join(choices))
        return value.lower()

    def name(self, node: yaml.Node, path: str) -> str | _Missing:
        value = self.value(node)
        if not isinstance(value, str) or not _NAME_RE.match(value):
            return self.expected(node, path, "a name of letters, digits, '_', '.', '-' "
                                             "(1..63 characters, starting alphanumeric)")
        return value

    def address(self, node: yaml.Node, path: str) -> IPAddress | _Missing:
        value = self.value(node)
        if isinstance(value, str):
            try:
                return ipaddress.ip_address(value.strip().strip("[]"))
            except ValueError:
                pass
        return self.expected(node, path, "an IPv4 or IPv6 address such as 0.0.0.0, :: "
                                         "or 192.0.2.10")

    def service(self, node: yaml.Node, path: str) -> tuple[ServiceID, str] | _Missing:
        value = self.value(node)
        if isinstance(value, int) and not isinstance(value, bool):
            # The text as written: YAML reads an unquoted 0x1f9 as the integer 505, but as a
            # serviceID it is left-aligned hex (0x1f90...), not the decimal 505.
            value = str(node.value)
        if not isinstance(value, str):
            return self.expected(node, path, "a serviceID: 64 hex digits, 0x-prefixed hex, a "
                                             "decimal number or a name like web.example")
        try:
            service = ServiceID.parse(value)
        except ServiceIDError as exc:
            return self.problem(node, path, f"not a serviceID: {exc}")
        if service.prefix_bits != 256:
            return self.problem(node, path, f"expected a full serviceID, got the prefix "
                                            f"{value!r} (/{service.prefix_bits})")
        return service, value

    def endpoint(self, node: yaml.Node, path: str, *, what: str) -> Endpoint | _Missing:
        value = self.value(node)
        expected = f"{what} as HOST:PORT, e.g. 127.0.0.1:8080, [::1]:8080 or localhost:8080"
        if not isinstance(value, str):
            return self.expected(node, path, expected)
        endpoint = parse_endpoint(value)
        if endpoint is None:
            return self.expected(node, path, expected)
        return endpoint

    def path(self, node: yaml.Node, path: str) -> str | _Missing:
        value = self.value(node)
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            return self.expected(node, path, "an absolute path")
        return value

    def octal_mode(self, node: yaml.Node, path: str) -> int | _Missing:
        value = self.value(node)
        if isinstance(value, str):
            try:
                mode = int(value, 8)
            except ValueError:
                mode = -1
            if 0 <= mode <= 0o777:
                return mode
        return self.expected(node, path, "an octal file mode in quotes, such as '0660'")


def _closest(word: str, choices: Sequence[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return matches[0] if matches else None


def parse_endpoint(text: str) -> Endpoint | None:
    """``HOST:PORT`` / ``[V6]:PORT`` → Endpoint, None if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            return None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.:%-]+", host):
        return None
    return Endpoint(host, int(port_text))


def _get(
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
    key: str,
    path: str,
    check: Callable[[yaml.Node, str], T | _Missing],
    default: T,
) -> T | _Missing:
    if key not in entries:
        return default
    return check(entries[key][1], f"{path}.{key}" if path else key)


def _ok(*values: object) -> bool:
    return not any(isinstance(value, _Missing) for value in values)


# --------------------------------------------------------------------------------------------
# sections

_TOP_KEYS = ("listeners", "exporters", "stack", "logging", "metrics", "status", "relay",
             "drain", "runtime_dir")
_LISTENER_KEYS = ("name", "address", "port", "service", "max_connections", "backlog",
                  "connect_timeout_s", "idle_timeout_s", "mode", "forward_client_address",
                  "ipv6_only")
_EXPORTER_KEYS = ("name", "service", "target", "weight", "priority", "backlog",
                  "max_connections", "connect_timeout_s", "idle_timeout_s", "proxy_protocol")
_STACK_KEYS = ("mode", "control_socket", "servald", "command", "start_timeout_s",
               "stop_timeout_s", "health_interval_s", "health_failures", "restart")
_RESTART_KEYS = ("backoff_initial_s", "backoff_max_s", "max_restarts", "window_s",
                 "stable_after_s")


def _listener(checker: _Checker, node: yaml.Node, path: str) -> ListenerConfig | None:
    entries = checker.mapping(node, path, _LISTENER_KEYS, required=("name", "port", "service"))
    if isinstance(entries, _Missing):
        return None
    c = checker
    name = _get(entries, "name", path, c.name, "")
    address = _get(entries, "address", path, c.address, ipaddress.ip_address("::"))
    port = _get(entries, "port", path, lambda n, p: c.integer(n, p, 1, 65535), 0)
    service = _get(entries, "service", path, c.service, (ServiceID(bytes(32)), ""))
    max_connections = _get(entries, "max_connections", path,
                           lambda n, p: c.integer(n, p, 1, MAX_CONNECTIONS_LIMIT),
                           DEFAULT_MAX_CONNECTIONS)
    backlog = _get(entries, "backlog", path, lambda n, p: c.integer(n, p, 1, 65535),
                   DEFAULT_LISTENER_BACKLOG)
    connect_timeout = _get(entries, "connect_timeout_s", path,
                           lambda n, p: c.number(n, p, 0.0, 3600.0, low_open=True),
                           DEFAULT_CONNECT_TIMEOUT_S)
    idle_timeout = _get(entries, "idle_timeout_s", path, c.optional_timeout,
                        _DEFAULT_IDLE_TIMEOUT_S)
    mode = _get(entries, "mode", path, lambda n, p: c.choice(n, p, ("repair", "handshake")),
                None)
    forward = _get(entries, "forward_client_address", path, c.boolean, True)
    ipv6_only = _get(entries, "ipv6_only", path, c.boolean, False)
    if not _ok(name, address, port, service, max_connections, backlog, connect_timeout,
               idle_timeout, mode, forward, ipv6_only) or "service" not in entries or \
            "name" not in entries or "port" not in entries:
        return None
    assert not isinstance(address, _Missing) and not isinstance(service, _Missing)
    if ipv6_only and address.version == 4:
        c.problem(entries["ipv6_only"][1], f"{path}.ipv6_only",
                  f"only applies to IPv6 addresses; address is {address}")
        return None
    return ListenerConfig(
        name=str(name), address=address, port=int(port),  # type: ignore[arg-type]
        service=service[0], service_text=service[1],
        max_connections=int(max_connections),  # type: ignore[arg-type]
        backlog=int(backlog),  # type: ignore[arg-type]
        connect_timeout_s=float(connect_timeout),  # type: ignore[arg-type]
        idle_timeout_s=idle_timeout,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        forward_client_address=bool(forward), ipv6_only=bool(ipv6_only),
        position=c.position(node),
    )


def _exporter(checker: _Checker, node: yaml.Node, path: str) -> ExporterConfig | None:
    entries = checker.mapping(node, path, _EXPORTER_KEYS,
                              required=("name", "service", "target"))
    if isinstance(entries, _Missing):
        return None
    c = checker
    name = _get(entries, "name", path, c.name, "")
    service = _get(entries, "service", path, c.service, (ServiceID(bytes(32)), ""))
    target = _get(entries, "target", path,
                  lambda n, p: c.endpoint(n, p, what="the legacy server's address"),
                  Endpoint("", 0))
    weight = _get(entries, "weight", path, lambda n, p: c.integer(n, p, 1, 65535), 1)
    priority = _get(entries, "priority", path, lambda n, p: c.integer(n, p, 0, 65535), 0)
    backlog = _get(entries, "backlog", path, lambda n, p: c.integer(n, p, 1, 65535),
                   DEFAULT_EXPORTER_BACKLOG)
    max_connections = _get(entries, "max_connections", path,
                           lambda n, p: c.integer(n, p, 1, MAX_CONNECTIONS_LIMIT),
                           DEFAULT_MAX_CONNECTIONS)
    connect_timeout = _get(entries, "connect_timeout_s", path,
                           lambda n, p: c.number(n, p, 0.0, 3600.0, low_open=True),
                           DEFAULT_CONNECT_TIMEOUT_S)
    idle_timeout = _get(entries, "idle_timeout_s", path, c.optional_timeout,
                        _DEFAULT_IDLE_TIMEOUT_S)
    proxy = _get(entries, "proxy_protocol", path, lambda n, p: c.choice(n, p, ("none", "v2")),
                 "none")
    if not _ok(name, service, target, weight, priority, backlog, max_connections,
               connect_timeout, idle_timeout, proxy) or not {"name", "service", "target"} <= \
            entries.keys():
        return None
    assert not isinstance(service, _Missing)
    return ExporterConfig(
        name=str(name), service=service[0], service_text=service[1],
        target=target,  # type: ignore[arg-type]
        weight=int(weight), priority=int(priority),  # type: ignore[arg-type]
        backlog=int(backlog), max_connections=int(max_connections),  # type: ignore[arg-type]
        connect_timeout_s=float(connect_timeout),  # type: ignore[arg-type]
        idle_timeout_s=idle_timeout,  # type: ignore[arg-type]
        proxy_protocol=proxy,  # type: ignore[arg-type]
        position=c.position(node),
    )


def _value_node(node: yaml.Node, key: str) -> yaml.Node:
    """The value node of `key` in a mapping node (the node itself when absent)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if getattr(key_node, "value", None) == key and isinstance(value_node, yaml.Node):
                return value_node
    return node


def _check_unique_listeners(checker: _Checker, nodes: Sequence[yaml.Node],
                            listeners: Sequence[ListenerConfig | None]) -> None:
    names: dict[str, int] = {}
    binds: list[tuple[ListenerConfig, int]] = []
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        path = f"listeners[{index}]"
        if listener.name in names:
            checker.problem(_value_node(nodes[index], "name"), f"{path}.name",
                            f"duplicate listener name {listener.name!r} (also "
                            f"listeners[{names[listener.name]}])")
        names.setdefault(listener.name, index)
        for other, other_index in binds:
            if other.port == listener.port and _binds_overlap(other, listener):
                checker.problem(nodes[index], path,
                                f"{listener.bind} overlaps listeners[{other_index}] "
                                f"({other.bind}): two listeners cannot share a port")
        binds.append((listener, index))


def _binds_overlap(a: ListenerConfig, b: ListenerConfig) -> bool:
    if a.address == b.address:
        return True

    def covers(wide: ListenerConfig, narrow: ListenerConfig) -> bool:
        if not wide.address.is_unspecified:
            return False
        if wide.address.version == narrow.address.version:
            return True
        # A dual-stack [::] socket also takes every IPv4 address of the port.
        return wide.address.version == 6 and not wide.ipv6_only

    return covers(a, b) or covers(b, a)


def _check_unique_exporters(checker: _Checker, nodes: Sequence[yaml.Node],
                            exporters: Sequence[ExporterConfig | None]) -> None:
    names: dict[str, int] = {}
    services: dict[object, int] = {}
    for index, exporter in enumerate(exporters):
        if exporter is None:
            continue
        path = f"exporters[{index}]"
        if exporter.name in names:
            checker.problem(_value_node(nodes[index], "name"), f"{path}.name",
                            f"duplicate exporter name {exporter.name!r} (also "
                            f"exporters[{names[exporter.name]}])")
        names.setdefault(exporter.name, index)
        if exporter.service in services:
            checker.problem(_value_node(nodes[index], "service"), f"{path}.service",
                            f"service {exporter.service_text!r} is already exported by "
                            f"exporters[{services[exporter.service]}]; one exporter per "
                            "service (use weight on several hosts instead)")
        services.setdefault(exporter.service, index)


def _restart(checker: _Checker, node: yaml.Node, path: str) -> RestartPolicy | _Missing:
    entries = checker.mapping(node, path, _RESTART_KEYS)
    if isinstance(entries, _Missing):
        return entries
    c = checker
    d = RestartPolicy()

    def seconds(n: yaml.Node, p: str) -> float | _Missing:
        return c.number(n, p, 0.0, MAX_TIMEOUT_S, low_open=True)

    values = (
        _get(entries, "backoff_initial_s", path, seconds, d.backoff_initial_s),
        _get(entries, "backoff_max_s", path, seconds, d.backoff_max_s),
        _get(entries, "max_restarts", path, lambda n, p: c.integer(n, p, 0, 1_000_000),
             d.max_restarts),
        _get(entries, "window_s", path, seconds, d.window_s),
        _get(entries, "stable_after_s", path, seconds, d.stable_after_s),
    )
    if not _ok(*values):
        return MISSING
    policy = RestartPolicy(*values)  # type: ignore[arg-type]
    if policy.backoff_max_s < policy.backoff_initial_s:
        return checker.problem(entries.get("backoff_max_s", (node, node))[1],
                               f"{path}.backoff_max_s",
                               f"must be at least backoff_initial_s "
                               f"({policy.backoff_initial_s:g})")
    return policy


def _isolate(text: str, node: yaml.Node) -> str:
    """`text` with every character outside `node`'s span blanked (line breaks kept)."""
    start, end = node.start_mark.index, node.end_mark.index
    kept = [
        char if start <= index < end or char in "\r\n" else " "
        for index, char in enumerate(text)
    ]
    lines = "".join(kept).split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip() + "\n"


def _servald_section(
    checker: _Checker, text: str, node: yaml.Node | None, control_socket: str
) -> tuple[str, ServaldConfig | None, frozenset[str], int | None]:
    """Cut out and validate stack.servald with servald's own loader (module docstring)."""
    path = "stack.servald"
    if node is None or (isinstance(node, yaml.ScalarNode) and checker.value(node) is None):
        isolated = ""
        keys: frozenset[str] = frozenset()
        indent: int | None = 0
    else:
        if not isinstance(node, yaml.MappingNode):
            checker.expected(node, path, "a mapping of servald settings (see "
                                         "config/servald.example.yaml)")
            return "", None, frozenset(), None
        key_values = [checker.value(k) for k, _ in node.value]
        keys = frozenset(k for k in key_values if isinstance(k, str))
        for key_node, _ in node.value:
            if checker.value(key_node) == "control_socket":
                checker.problem(key_node, f"{path}.control_socket",
                                "set stack.control_socket instead: the translator starts "
                                "servald with that path and connects to it")
                return "", None, keys, None
        indent = node.start_mark.column if not node.flow_style else None
        isolated = _isolate(text, node)
    fd, temp_path = tempfile.mkstemp(prefix="serval-translator-servald-", suffix=".yaml")
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(isolated)
        config = load_servald_config(temp_path, Overrides(control_socket=control_socket),
                                     environ={})
    except ConfigError as exc:
        message = str(exc)
        match = re.match(re.escape(temp_path) + r"(?::(\d+):(\d+))?: (.*)", message, re.S)
        if match and match.group(1):
            detail = match.group(3)
            keyed = re.match(r"key '([^']*)': (.*)", detail, re.S)
            if keyed:
                detail = f"{path}.{keyed.group(1)}: {keyed.group(2)}"
            checker.problems.append(
                f"{checker.source}:{match.group(1)}:{match.group(2)}: {detail}")
        else:
            detail = match.group(3) if match else message
            where = checker.position(node) if node is not None else checker.source
            checker.problems.append(f"{where}: {path}: {detail}")
        return isolated, None, keys, indent
    finally:
        try:
            os.unlink(temp_path)
        except OSError:
            pass
    return isolated, config, keys, indent


def _stack(checker: _Checker, text: str, node: yaml.Node | None) -> StackConfig | _Missing:
    path = "stack"
    if node is None:
        return StackConfig()
    entries = checker.mapping(node, path, _STACK_KEYS)
    if isinstance(entries, _Missing):
        return entries
    c = checker
    d = StackConfig()
    mode = _get(entries, "mode", path, lambda n, p: c.choice(n, p, ("bundled", "external")),
                "bundled" if "servald" in entries else "external")
    default_socket = (DEFAULT_BUNDLED_CONTROL_SOCKET if mode == "bundled"
                      else DEFAULT_EXTERNAL_CONTROL_SOCKET)
    control_socket = _get(entries, "control_socket", path, c.path, default_socket)
    command: tuple[str, ...] | _Missing = ()
    if "command" in entries:
        items = c.sequence(entries["command"][1], f"{path}.command", "strings")
        if isinstance(items, _Missing):
            command = items
        else:
            parts = [c.string(item, f"{path}.command[{i}]") for i, item in enumerate(items)]
            if not items:
                command = c.expected(entries["command"][1], f"{path}.command",
                                     "a non-empty list: the servald program and its arguments")
            elif _ok(*parts):
                command = tuple(str(part) for part in parts)
            else:
                command = MISSING

    def seconds(n: yaml.Node, p: str) -> float | _Missing:
        return c.number(n, p, 0.0, 3600.0, low_open=True)

    start_timeout = _get(entries, "start_timeout_s", path, seconds, d.start_timeout_s)
    stop_timeout = _get(entries, "stop_timeout_s", path, seconds, d.stop_timeout_s)
    health_interval = _get(entries, "health_interval_s", path, seconds, d.health_interval_s)
    health_failures = _get(entries, "health_failures", path,
                           lambda n, p: c.integer(n, p, 1, 1000), d.health_failures)
    restart = _get(entries, "restart", path, lambda n, p: _restart(c, n, p), d.restart)
    if mode == "external":
        for key in ("servald", "command", "restart"):
            if key in entries:
                c.problem(entries[key][0], f"{path}.{key}",
                          "only applies with stack.mode: bundled (external: the translator "
                          "uses the servald already serving stack.control_socket)")
    servald_yaml, servald, keys = "", None, frozenset[str]()
    indent: int | None = 0
    if mode == "bundled" and isinstance(control_socket, str):
        servald_yaml, servald, keys, indent = _servald_section(
            checker, text, entries["servald"][1] if "servald" in entries else None,
            control_socket)
    if not _ok(mode, control_socket, command, start_timeout, stop_timeout, health_interval,
               health_failures, restart):
        return MISSING
    return StackConfig(
        mode=mode,  # type: ignore[arg-type]
        control_socket=str(control_socket), servald_yaml=servald_yaml, servald=servald,
        servald_keys=keys, servald_indent=indent,
        command=command,  # type: ignore[arg-type]
        start_timeout_s=float(start_timeout),  # type: ignore[arg-type]
        stop_timeout_s=float(stop_timeout),  # type: ignore[arg-type]
        health_interval_s=float(health_interval),  # type: ignore[arg-type]
        health_failures=int(health_failures),  # type: ignore[arg-type]
        restart=restart,  # type: ignore[arg-type]
    )


def _logging(checker: _Checker, node: yaml.Node) -> LoggingConfig | _Missing:
    entries = checker.mapping(node, "logging", ("level", "format"))
    if isinstance(entries, _Missing):
        return entries
    level = _get(entries, "level", "logging", lambda n, p: checker.choice(n, p, LOG_LEVELS),
                 "info")
    fmt = _get(entries, "format", "logging",
               lambda n, p: checker.choice(n, p, ("auto", "json", "console")), "auto")
    if not _ok(level, fmt):
        return MISSING
    return LoggingConfig(str(level), fmt)  # type: ignore[arg-type]


def _metrics(checker: _Checker, node: yaml.Node) -> MetricsConfig | _Missing:
    entries = checker.mapping(node, "metrics", ("address",))
    if isinstance(entries, _Missing):
        return entries
    if "address" not in entries:
        return MetricsConfig(parse_endpoint(DEFAULT_METRICS_ADDRESS))
    value_node = entries["address"][1]
    if isinstance(value_node, yaml.ScalarNode) and checker.value(value_node) is None:
        return MetricsConfig(None)
    address = checker.endpoint(value_node, "metrics.address",
                               what="the Prometheus endpoint (or null to disable it)")
    if isinstance(address, _Missing):
        return address
    return MetricsConfig(address)


def _status(checker: _Checker, node: yaml.Node) -> StatusConfig | _Missing:
    entries = checker.mapping(node, "status", ("socket", "mode"))
    if isinstance(entries, _Missing):
        return entries
    socket_path: str | _Missing | None = DEFAULT_STATUS_SOCKET
    if "socket" in entries:
        value_node = entries["socket"][1]
        if isinstance(value_node, yaml.ScalarNode) and checker.value(value_node) is None:
            socket_path = None
        else:
            socket_path = checker.path(value_node, "status.socket")
    mode = _get(entries, "mode", "status", checker.octal_mode, 0o600)
    if not _ok(socket_path, mode):
        return MISSING
    return StatusConfig(socket_path, int(mode))  # type: ignore[arg-type]


def _relay(checker: _Checker, node: yaml.Node) -> RelayConfig | _Missing:
    entries = checker.mapping(node, "relay", ("workers", "pipe_size", "half_close_timeout_s"))
    if isinstance(entries, _Missing):
        return entries
    workers = _get(entries, "workers", "relay", lambda n, p: checker.integer(n, p, 0, 255), 0)
    pipe_size = _get(entries, "pipe_size", "relay",
                     lambda n, p: checker.integer(n, p, 4096, MAX_PIPE_SIZE_BYTES),
                     DEFAULT_PIPE_SIZE_BYTES)
    half_close = _get(entries, "half_close_timeout_s", "relay", checker.optional_timeout,
                      _DEFAULT_HALF_CLOSE_TIMEOUT_S)
    if not _ok(workers, pipe_size, half_close):
        return MISSING
    return RelayConfig(int(workers), int(pipe_size), half_close)  # type: ignore[arg-type]


def _drain(checker: _Checker, node: yaml.Node) -> DrainConfig | _Missing:
    entries = checker.mapping(node, "drain", ("timeout_s",))
    if isinstance(entries, _Missing):
        return entries
    timeout = _get(entries, "timeout_s", "drain",
                   lambda n, p: checker.number(n, p, 0.0, MAX_TIMEOUT_S), DEFAULT_DRAIN_TIMEOUT_S)
    if isinstance(timeout, _Missing):
        return timeout
    return DrainConfig(float(timeout))


# --------------------------------------------------------------------------------------------
# entry points


def _compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        reason = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{where}: invalid YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def parse_config(text: str, source: str = "<string>") -> TranslatorConfig:
    """Validate YAML text; raises ConfigError listing every problem (one per line)."""
    root = _compose(text, source)
    checker = _Checker(source)
    if root is None or (isinstance(root, yaml.ScalarNode) and checker.value(root) is None):
        raise ConfigError(f"{source}:1:1: the configuration is empty; expected a mapping with "
                          f"keys {', '.join(_TOP_KEYS)} (see config/translator.example.yaml)")
    top = checker.mapping(root, "", _TOP_KEYS)
    if isinstance(top, _Missing):
        raise ConfigError("\n".join(checker.problems))

    listener_nodes: list[yaml.Node] = []
    listeners: list[ListenerConfig | None] = []
    if "listeners" in top:
        items = checker.sequence(top["listeners"][1], "listeners", "listeners")
        if not isinstance(items, _Missing):
            listener_nodes = items
            listeners = [_listener(checker, item, f"listeners[{index}]")
                         for index, item in enumerate(items)]
    _check_unique_listeners(checker, listener_nodes, listeners)

    exporter_nodes: list[yaml.Node] = []
    exporters: list[ExporterConfig | None] = []
    if "exporters" in top:
        items = checker.sequence(top["exporters"][1], "exporters", "exporters")
        if not isinstance(items, _Missing):
            exporter_nodes = items
            exporters = [_exporter(checker, item, f"exporters[{index}]")
                         for index, item in enumerate(items)]
    _check_unique_exporters(checker, exporter_nodes, exporters)

    def section(key: str, check: Callable[[yaml.Node], T | _Missing], default: T) -> T | _Missing:
        return check(top[key][1]) if key in top else default

    stack = _stack(checker, text, top["stack"][1] if "stack" in top else None)
    logging_config = section("logging", lambda n: _logging(checker, n), LoggingConfig())
    metrics = section("metrics", lambda n: _metrics(checker, n),
                      MetricsConfig(parse_endpoint(DEFAULT_METRICS_ADDRESS)))
    status = section("status", lambda n: _status(checker, n), StatusConfig())
    relay = section("relay", lambda n: _relay(checker, n), RelayConfig())
    drain = section("drain", lambda n: _drain(checker, n), DrainConfig())
    runtime_dir = section("runtime_dir", lambda n: checker.path(n, "runtime_dir"),
                          DEFAULT_RUNTIME_DIR)

    if not listeners and not exporters and not checker.problems:
        checker.problem(root, "", "nothing to do: configure at least one listener or exporter")
    if checker.problems:
        raise ConfigError("\n".join(sorted(checker.problems, key=_problem_order)))
    assert _ok(stack, logging_config, metrics, status, relay, drain, runtime_dir)
    return TranslatorConfig(
        source=source,
        listeners=tuple(listener for listener in listeners if listener is not None),
        exporters=tuple(exporter for exporter in exporters if exporter is not None),
        stack=stack,  # type: ignore[arg-type]
        logging=logging_config,  # type: ignore[arg-type]
        metrics=metrics,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        relay=relay,  # type: ignore[arg-type]
        drain=drain,  # type: ignore[arg-type]
        runtime_dir=str(runtime_dir),
    )


def _problem_order(problem: str) -> tuple[int, int]:
    match = re.match(r".*?:(\d+):(\d+): ", problem)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def load_config(path: str | os.PathLike[str]) -> TranslatorConfig:
    """Read and validate the file at `path`; ConfigError names FILE:LINE:COLUMN per problem."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the configuration: {exc.strerror or exc}") \
            from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc}") from None
    return parse_config(text, source)


def describe(config: TranslatorConfig) -> Iterator[str]:
    """A short human summary of a valid configuration (check-config prints it)."""
    for listener in config.listeners:
        idle = "off" if listener.idle_timeout_s is None else f"{listener.idle_timeout_s:g}s"
        limits = (f"max {listener.max_connections} conns, backlog {listener.backlog}, "
                  f"connect {listener.connect_timeout_s:g}s, idle {idle}")
        yield (f"listener {listener.name}: tcp {listener.bind} -> service "
               f"{listener.service_text} ({limits})")
    for exporter in config.exporters:
        yield (f"exporter {exporter.name}: service {exporter.service_text} -> tcp "
               f"{exporter.target} (weight {exporter.weight}, priority {exporter.priority}, "
               f"proxy protocol {exporter.proxy_protocol})")
    stack = config.stack
    if stack.mode == "bundled":
        yield f"stack: bundled servald, control socket {stack.control_socket}"
    else:
        yield f"stack: existing servald at {stack.control_socket}"
    yield (f"relay: {config.relay.effective_workers()} workers, pipe {config.relay.pipe_size} "
           f"bytes; metrics: {config.metrics.address or 'off'}; status: "
           f"{config.status.socket or 'off'}")
