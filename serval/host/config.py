"""servald configuration: the YAML file, the command-line flags that override it, validation.

Theory of operation
-------------------
`load_config(path, overrides)` reads the YAML file (if any), validates every key against the
schema below and returns a frozen `ServaldConfig`. Command-line flags are applied on top of
the file (flag > environment > file > built-in default for the control socket path; flag >
file > default for everything else).

Every error a user can make names the file, the line and the key (`ConfigError`): the YAML
is composed into a node tree first so that each key's position is known when a value is
rejected later. Unknown keys are errors too, because a misspelt key silently ignored is a
misconfigured production daemon.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from serval.core.ids import ServiceID
from serval.errors import ConfigError, ServiceIDError
from serval.host.policy import MigrationPolicy, parse_migration_policy

DEFAULT_SAL_PORT = 54325
DEFAULT_CONTROL_SOCKET = "/run/serval/servald.sock"
CONTROL_SOCKET_ENV = "SERVAL_CONTROL_SOCKET"
DEFAULT_CONTROL_SOCKET_MODE = 0o600
# Repair-mode server sockets all share one local TCP port (repair mode lets many ESTABLISHED
# sockets bind it, tcp-repair-migration.md section 4b); handshake mode needs a real listener.
DEFAULT_DATA_PORT = 54326
DEFAULT_HANDSHAKE_PORT = 54327

# A dead instance must stop receiving new connections within 3 s (issue 3): refresh every
# half second and let the router expire a registration 2 s after the last refresh.
DEFAULT_REGISTRATION_REFRESH_S = 0.5
DEFAULT_REGISTRATION_LIFETIME_S = 2.0

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["console", "json"]
EstablishModeName = Literal["repair", "handshake"]
RuleKind = Literal["forward", "delay", "drop"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SalEndpoint:
    """A SAL UDP endpoint (a router's or a host's address and SAL port)."""

    address: Address
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class ModeRule:
    """Establishment mode for destinations inside `service` (longest prefix wins)."""

    service: ServiceID
    mode: EstablishModeName


@dataclass(frozen=True)
class StaticRule:
    """A service-table rule installed at start (FORWARD, DELAY or DROP)."""

    service: ServiceID
    kind: RuleKind
    address: Address | None
    port: int
    weight: int
    priority: int


@dataclass(frozen=True)
class RegistrationConfig:
    refresh_s: float = DEFAULT_REGISTRATION_REFRESH_S
    lifetime_s: float = DEFAULT_REGISTRATION_LIFETIME_S


@dataclass(frozen=True)
class DataPlaneConfig:
    mode: EstablishModeName = "repair"
    fallback: bool = True
    data_port: int = DEFAULT_DATA_PORT
    handshake_port: int = DEFAULT_HANDSHAKE_PORT
    prefixes: tuple[ModeRule, ...] = ()

    def mode_for(self, service: ServiceID) -> EstablishModeName:
        """The configured mode for a destination: longest matching prefix, else the default."""
        best: ModeRule | None = None
        for rule in self.prefixes:
            if rule.service.contains(service) and (
                best is None or rule.service.prefix_bits > best.service.prefix_bits
            ):
                best = rule
        return best.mode if best is not None else self.mode


@dataclass(frozen=True)
class TimeoutConfig:
    """Runtime timeouts. The SAL's own timers (SYN and SYN-ACK retransmission from 250 ms,
    doubling; a half-open request dropped 3 s after its SYN) are protocol constants of
    serval/core/flow.py, the same on every host, not configuration."""

    connect_timeout_s: float = 10.0  # default when a connect request gives none
    token_wait_s: float = 3.0  # handshake mode: time for the client to present its token
    completed_linger_s: float = 30.0  # completed flows kept to re-ACK duplicate SYN-ACKs


@dataclass(frozen=True)
class ServaldConfig:
    source: str = "<defaults>"  # the file the configuration came from
    router: bool = False
    port: int = DEFAULT_SAL_PORT
    listen_addresses: tuple[Address, ...] = ()  # empty: all IPv4 and IPv6 addresses
    routers: tuple[SalEndpoint, ...] = ()
    control_socket: str = DEFAULT_CONTROL_SOCKET
    control_socket_mode: int = DEFAULT_CONTROL_SOCKET_MODE
    log_level: LogLevel = "info"
    log_format: LogFormat = "console"
    domain_key: bytes | None = None
    domain_key_id: int = 1
    accept_backlog_default: int = 128
    max_pending_per_listener: int = 512
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    data_plane: DataPlaneConfig = field(default_factory=DataPlaneConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    rules: tuple[StaticRule, ...] = ()
    broadcast: bool = True  # ad-hoc mode: resolve by LAN broadcast when no router is known
    # `interfaces` (preference, cost) and `migration` (triggers, source routing): policy.py
    migration: MigrationPolicy = field(default_factory=MigrationPolicy)


# --------------------------------------------------------------------------------------------
# YAML with positions


class _Located:
    """Maps a dotted key path to the (line, column) of its value in the YAML file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.marks: dict[str, tuple[int, int]] = {}

    def where(self, path: str) -> str:
        probe = path
        while probe:
            if probe in self.marks:
                line, column = self.marks[probe]
                return f"{self.source}:{line}:{column}"
            probe = probe.rpartition(".")[0]
        return self.source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: key {path!r}: {message}")


def _record_marks(node: yaml.Node, path: str, located: _Located) -> None:
    located.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = f"{path}.{key}" if path else key
            _record_marks(value_node, child, located)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_marks(item, f"{path}[{index}]", located)


def _read_yaml(path: str) -> tuple[dict[str, Any], _Located]:
    located = _Located(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}, located
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1:1: the configuration must be a mapping of keys, got "
                          f"{type(data).__name__}")
    if node is not None:
        _record_marks(node, "", located)
    return data, located


# --------------------------------------------------------------------------------------------
# value checkers


def _check_keys(
    mapping: Mapping[str, Any], allowed: Sequence[str], path: str, located: _Located
) -> None:
    for key in mapping:
        if key not in allowed:
            child = f"{path}.{key}" if path else str(key)
            raise located.error(
                child, f"unknown key (allowed here: {', '.join(sorted(allowed))})"
            )


def _as_bool(value: object, path: str, located: _Located) -> bool:
    if not isinstance(value, bool):
        raise located.error(path, f"must be true or false, got {value!r}")
    return value


def _as_int(value: object, path: str, located: _Located, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise located.error(path, f"must be an integer {low}..{high}, got {value!r}")
    return value


def _as_float(value: object, path: str, located: _Located, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        low <= float(value) <= high
    ):
        raise located.error(path, f"must be a number {low}..{high}, got {value!r}")
    return float(value)


def _as_str(value: object, path: str, located: _Located) -> str:
    if not isinstance(value, str) or not value:
        raise located.error(path, f"must be a non-empty string, got {value!r}")
    return value


def _as_choice(value: object, path: str, located: _Located, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise located.error(path, f"must be one of {', '.join(choices)}; got {value!r}")
    return value.lower()


def _as_address(value: object, path: str, located: _Located) -> Address:
    try:
        return ipaddress.ip_address(str(value).strip("[]"))
    except ValueError:
        raise located.error(path, f"not an IPv4 or IPv6 address: {value!r}") from None


def _as_service(value: object, path: str, located: _Located) -> ServiceID:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise located.error(path, f"must be a serviceID (text), got {value!r}")
    try:
        return ServiceID.parse(str(value))
    except ServiceIDError as exc:
        raise located.error(path, str(exc)) from None


def parse_endpoint(text: str, default_port: int) -> SalEndpoint:
    """`ADDR`, `ADDR:PORT`, `[V6]` or `[V6]:PORT` → SalEndpoint; ValueError when malformed."""
    text = text.strip()
    port = default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"missing ']' in {text!r}")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':PORT' after ']' in {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        host = text
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535 in {text!r}")
    return SalEndpoint(ipaddress.ip_address(host), port)


def _as_endpoint(value: object, path: str, located: _Located, default_port: int) -> SalEndpoint:
    if not isinstance(value, str):
        raise located.error(path, f"must be 'ADDR' or 'ADDR:PORT' text, got {value!r}")
    try:
        return parse_endpoint(value, default_port)
    except ValueError as exc:
        raise located.error(path, f"not a SAL endpoint: {exc}") from None


def _as_list(value: object, path: str, located: _Located) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise located.error(path, f"must be a list, got {value!r}")
    return value


def _as_mapping(value: object, path: str, located: _Located) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise located.error(path, f"must be a mapping, got {value!r}")
    return value


def _as_key(value: object, path: str, located: _Located) -> bytes:
    if not isinstance(value, str):
        raise located.error(path, "must be a hex string of at least 32 hex digits (16 bytes)")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise located.error(path, "must be hex digits only") from None
    if len(key) < 16:
        raise located.error(path, f"is {len(key)} bytes; use at least 16 random bytes")
    return key


# --------------------------------------------------------------------------------------------
# sections

_TOP_KEYS = (
    "router", "port", "listen_addresses", "routers", "control_socket", "control_socket_mode",
    "log_level", "log_format", "domain_key", "domain_key_id", "accept_backlog_default",
    "max_pending_per_listener", "registration", "data_plane", "timeouts", "rules", "broadcast",
    "interfaces", "migration",
)


def _registration(raw: object, located: _Located) -> RegistrationConfig:
    section = _as_mapping(raw, "registration", located)
    _check_keys(section, ("refresh_s", "lifetime_s"), "registration", located)
    defaults = RegistrationConfig()
    refresh = _as_float(section.get("refresh_s", defaults.refresh_s),
                        "registration.refresh_s", located, 0.05, 3600)
    lifetime = _as_float(section.get("lifetime_s", defaults.lifetime_s),
                         "registration.lifetime_s", located, 0.1, 65535)
    if lifetime <= refresh:
        raise located.error("registration.lifetime_s",
                            f"must be longer than refresh_s ({refresh}), got {lifetime}")
    return RegistrationConfig(refresh_s=refresh, lifetime_s=lifetime)


def _data_plane(raw: object, located: _Located) -> DataPlaneConfig:
    path = "data_plane"
    section = _as_mapping(raw, path, located)
    _check_keys(section, ("mode", "fallback", "data_port", "handshake_port", "prefixes"),
                path, located)
    defaults = DataPlaneConfig()
    mode = _as_choice(section.get("mode", defaults.mode), f"{path}.mode", located,
                      ("repair", "handshake"))
    rules: list[ModeRule] = []
    for index, item in enumerate(_as_list(section.get("prefixes"), f"{path}.prefixes", located)):
        item_path = f"{path}.prefixes[{index}]"
        entry = _as_mapping(item, item_path, located)
        _check_keys(entry, ("service", "mode"), item_path, located)
        if "service" not in entry or "mode" not in entry:
            raise located.error(item_path, "needs both 'service' and 'mode'")
        rules.append(ModeRule(
            service=_as_service(entry["service"], f"{item_path}.service", located),
            mode=_as_choice(entry["mode"], f"{item_path}.mode", located,
                            ("repair", "handshake")),  # type: ignore[arg-type]
        ))
    return DataPlaneConfig(
        mode=mode,  # type: ignore[arg-type]
        fallback=_as_bool(section.get("fallback", defaults.fallback), f"{path}.fallback",
                          located),
        data_port=_as_int(section.get("data_port", defaults.data_port), f"{path}.data_port",
                          located, 1, 65535),
        handshake_port=_as_int(section.get("handshake_port", defaults.handshake_port),
                               f"{path}.handshake_port", located, 1, 65535),
        prefixes=tuple(rules),
    )


def _timeouts(raw: object, located: _Located) -> TimeoutConfig:
    section = _as_mapping(raw, "timeouts", located)
    defaults = TimeoutConfig()
    names = tuple(defaults.__dataclass_fields__)
    _check_keys(section, names, "timeouts", located)
    values = {
        name: _as_float(section.get(name, getattr(defaults, name)), f"timeouts.{name}",
                        located, 0.001, 86400)
        for name in names
    }
    return TimeoutConfig(**values)


def _rules(raw: object, located: _Located, default_port: int) -> tuple[StaticRule, ...]:
    rules: list[StaticRule] = []
    for index, item in enumerate(_as_list(raw, "rules", located)):
        path = f"rules[{index}]"
        entry = _as_mapping(item, path, located)
        _check_keys(entry, ("service", "kind", "address", "weight", "priority"), path, located)
        if "service" not in entry:
            raise located.error(path, "needs 'service'")
        kind = _as_choice(entry.get("kind", "forward"), f"{path}.kind", located,
                          ("forward", "delay", "drop"))
        address: Address | None = None
        port = default_port
        if kind == "forward":
            if "address" not in entry:
                raise located.error(path, "a forward rule needs 'address'")
            endpoint = _as_endpoint(entry["address"], f"{path}.address", located, default_port)
            address, port = endpoint.address, endpoint.port
        rules.append(StaticRule(
            service=_as_service(entry["service"], f"{path}.service", located),
            kind=kind,  # type: ignore[arg-type]
            address=address,
            port=port,
            weight=_as_int(entry.get("weight", 1), f"{path}.weight", located, 1, 65535),
            priority=_as_int(entry.get("priority", 0), f"{path}.priority", located, 0, 65535),
        ))
    return tuple(rules)


def _from_mapping(data: Mapping[str, Any], located: _Located) -> ServaldConfig:
    _check_keys(data, _TOP_KEYS, "", located)
    defaults = ServaldConfig()
    port = _as_int(data.get("port", defaults.port), "port", located, 1, 65535)
    mode_value = data.get("control_socket_mode", defaults.control_socket_mode)
    if isinstance(mode_value, str):
        try:
            mode_value = int(mode_value, 8)
        except ValueError:
            raise located.error("control_socket_mode",
                                f"must be an octal mode like '0600', got {mode_value!r}") from None
    domain_key = data.get("domain_key")
    return ServaldConfig(
        source=located.source,
        router=_as_bool(data.get("router", defaults.router), "router", located),
        port=port,
        listen_addresses=tuple(
            _as_address(item, f"listen_addresses[{index}]", located)
            for index, item in enumerate(
                _as_list(data.get("listen_addresses"), "listen_addresses", located))
        ),
        routers=tuple(
            _as_endpoint(item, f"routers[{index}]", located, port)
            for index, item in enumerate(_as_list(data.get("routers"), "routers", located))
        ),
        control_socket=_as_str(data.get("control_socket", defaults.control_socket),
                               "control_socket", located),
        control_socket_mode=_as_int(mode_value, "control_socket_mode", located, 0, 0o777),
        log_level=_as_choice(data.get("log_level", defaults.log_level), "log_level",
                             located, LOG_LEVELS),  # type: ignore[arg-type]
        log_format=_as_choice(data.get("log_format", defaults.log_format), "log_format",
                              located, ("console", "json")),  # type: ignore[arg-type]
        domain_key=None if domain_key is None else _as_key(domain_key, "domain_key", located),
        domain_key_id=_as_int(data.get("domain_key_id", defaults.domain_key_id),
                              "domain_key_id", located, 0, 65535),
        accept_backlog_default=_as_int(
            data.get("accept_backlog_default", defaults.accept_backlog_default),
            "accept_backlog_default", located, 1, 65535),
        max_pending_per_listener=_as_int(
            data.get("max_pending_per_listener", defaults.max_pending_per_listener),
            "max_pending_per_listener", located, 1, 1_000_000),
        registration=_registration(data.get("registration"), located),
        data_plane=_data_plane(data.get("data_plane"), located),
        timeouts=_timeouts(data.get("timeouts"), located),
        rules=_rules(data.get("rules"), located, port),
        broadcast=_as_bool(data.get("broadcast", defaults.broadcast), "broadcast", located),
        migration=_migration(data.get("interfaces"), data.get("migration"), located),
    )


def _migration(interfaces: object, migration: object, located: _Located) -> MigrationPolicy:
    try:
        return parse_migration_policy(interfaces, migration, located.source)
    except ConfigError as exc:
        # policy.py names the entry ("interfaces[1].cost"); add its line here when known.
        text = str(exc)
        path = text.split(": ", 2)[1] if text.count(": ") >= 2 else ""
        where = located.where(path) if path else located.source
        raise ConfigError(text.replace(located.source, where, 1)) from None


# --------------------------------------------------------------------------------------------
# public entry points


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; None / empty means "not given"."""

    router: bool = False
    router_addrs: tuple[str, ...] = ()
    port: int | None = None
    control_socket: str | None = None
    log_level: str | None = None


def load_config(
    path: str | None,
    overrides: Overrides | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServaldConfig:
    """Read and validate `path` (None: defaults only), then apply flags. Raises ConfigError."""
    overrides = overrides or Overrides()
    environ = os.environ if environ is None else environ
    if path is not None:
        data, located = _read_yaml(path)
    else:
        data, located = {}, _Located("<defaults>")
    config = _from_mapping(data, located)

    flags = _Located("command line")
    port = config.port
    if overrides.port is not None:
        port = _as_int(overrides.port, "--port", flags, 1, 65535)
    routers = config.routers
    if overrides.router_addrs:
        routers = tuple(
            _as_endpoint(text, "--router-addr", flags, port) for text in overrides.router_addrs
        )
    elif port != config.port:
        # Routers given without a port in the file follow the host's SAL port.
        routers = tuple(
            SalEndpoint(r.address, port if r.port == config.port else r.port) for r in routers
        )
    control_socket = config.control_socket
    if overrides.control_socket:
        control_socket = overrides.control_socket
    elif environ.get(CONTROL_SOCKET_ENV) and "control_socket" not in data:
        control_socket = environ[CONTROL_SOCKET_ENV]
    log_level = config.log_level
    if overrides.log_level is not None:
        log_level = _as_choice(overrides.log_level, "--log-level", flags,
                               LOG_LEVELS)  # type: ignore[assignment]
    return ServaldConfig(
        **{
            **{name: getattr(config, name) for name in config.__dataclass_fields__},
            "router": config.router or overrides.router,
            "port": port,
            "routers": routers,
            "control_socket": control_socket,
            "log_level": log_level,
        }
    )


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="servald",
        description="Serval host daemon and service router (SAL over UDP, TCP data plane).",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument("--router", action="store_true", help="run as a service router")
    parser.add_argument("--router-addr", metavar="ADDR", action="append", default=[],
                        help="service router SAL address (ADDR or ADDR:PORT); repeatable; "
                             "replaces the file's 'routers'")
    parser.add_argument("--port", type=int, metavar="N", help=f"SAL UDP port "
                        f"(default {DEFAULT_SAL_PORT})")
    parser.add_argument("--control-socket", metavar="PATH",
                        help=f"control socket path (default ${CONTROL_SOCKET_ENV} or "
                             f"{DEFAULT_CONTROL_SOCKET})")
    parser.add_argument("--log-level", metavar="LEVEL", help="/".join(LOG_LEVELS))
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> ServaldConfig:
    """Parse flags, load the file, apply the flags. Raises ConfigError (exit status 2)."""
    args = build_arg_parser().parse_args(argv)
    return load_config(
        args.config,
        Overrides(
            router=bool(args.router),
            router_addrs=tuple(args.router_addr),
            port=args.port,
            control_socket=args.control_socket,
            log_level=args.log_level,
        ),
    )
