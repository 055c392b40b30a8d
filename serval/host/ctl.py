"""servalctl: inspect and steer a running servald over its control API.

    servalctl [--control-socket PATH] [--timeout S] COMMAND ...

    status | services | flows | registrations | counters      [--json]
    rule add|modify|remove SERVICE --kind forward|delay|drop [--address A] [--weight W]
                                   [--priority P]              [--json]
    delay list                                                 [--json]
    delay release ID | delay drop ID                           [--json]
    migrate flow FLOWID --to ADDRESS|IFACE                     [--json]
    migrate interface OLD NEW                                  [--json]

Without --json the answers are printed as aligned tables; with it, servald's answer as one
JSON object (without the protocol's ``id``/``ok``). Failures print one line,
``servalctl: <what went wrong>``, and exit with status 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from serval.control import DEFAULT_REPLY_TIMEOUT_S, ControlClient, Message
from serval.core.ids import ServiceID
from serval.errors import ServalError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
PROG = "servalctl"

# Protocol bookkeeping, not part of an answer.
_ENVELOPE_KEYS = ("id", "ok", "fds")


# --------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """One table cell: endpoints as addr:port, lists comma-separated, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, Mapping):
        if set(value) >= {"address", "port"}:
            address = str(value["address"])
            if ":" in address:
                address = f"[{address}]"
            return f"{address}:{value['port']}"
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(format_value(v) for v in value) if value else "-"
    return str(value)


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An aligned text table; columns default to every key, in first-seen order."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    if not rows:
        return "(none)"
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    headers = [column.upper() for column in columns]
    widths = [
        max(len(headers[i]), *(len(line[i]) for line in cells)) for i in range(len(columns))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for line in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render_mapping(mapping: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """`key: value` lines, nested objects flattened with dots."""
    skipped = set(skip)
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value and not set(value) >= {"address", "port"}:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat.append((prefix, format_value(value)))

    for key, value in mapping.items():
        if key not in skipped:
            walk(key, value)
    if not flat:
        return "(nothing)"
    width = max(len(key) for key, _ in flat)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in flat)


def _service_text(hex_value: Any, prefix_bits: Any) -> str:
    text = str(hex_value)
    if isinstance(prefix_bits, int) and prefix_bits != 256:
        text += f"/{prefix_bits}"
    return text


def render_services(answer: Mapping[str, Any]) -> str:
    """One line per rule target: the table servald resolves with, highest priority first."""
    rows: list[dict[str, Any]] = []
    for entry in answer.get("rules", []):
        service = _service_text(entry.get("service"), entry.get("prefix_bits"))
        for target in entry.get("targets", []) or [{}]:
            rows.append(
                {
                    "service": service,
                    "table": entry.get("local", "forward"),
                    "kind": target.get("kind"),
                    "destination": target.get("destination"),
                    "weight": target.get("weight"),
                    "priority": target.get("priority"),
                    "packets": target.get("packets"),
                    "hits": entry.get("hits"),
                }
            )
    return render_table(rows)


def render_flows(answer: Mapping[str, Any]) -> str:
    preferred = ["flow", "role", "state", "service", "mode", "local", "remote", "migrations"]
    flows = list(answer.get("flows", []))
    extra = [k for row in flows for k in row if k not in preferred and k != "peer"]
    return render_table(flows, preferred + list(dict.fromkeys(extra)))


def render_registrations(answer: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if "registrations" in answer:
        parts.append("registrations held (router):\n" + render_table(answer["registrations"]))
    if "registered" in answer:
        routers = format_value(answer.get("routers", []))
        parts.append(f"registered with routers {routers}:\n" + render_table(answer["registered"]))
    rest = {k: v for k, v in answer.items() if k not in ("registrations", "registered", "routers")}
    if rest:
        parts.append(render_mapping(rest))
    return "\n\n".join(parts) if parts else "(no registrations: ad-hoc host)"


def render_counters(answer: Mapping[str, Any]) -> str:
    counters = answer.get("counters", {})
    if not counters:
        return "(no counters)"
    width = max(len(str(name)) for name in counters)
    return "\n".join(f"{str(name).ljust(width)}  {counters[name]}" for name in sorted(counters))


def render_status(answer: Mapping[str, Any]) -> str:
    text = render_mapping(answer, skip=("counters",))
    if "counters" in answer:
        text += "\n(counters: servalctl counters)"
    return text


def render_delayed(answer: Mapping[str, Any]) -> str:
    return render_table(list(answer.get("packets", [])))


def render_migrations(answer: Mapping[str, Any]) -> str:
    columns = ["flow", "outcome", "old", "new", "pause_ms", "bytes_resent", "reason"]
    return render_table(list(answer.get("flows", [])), columns)


def render_migration(answer: Mapping[str, Any]) -> str:
    return render_table([dict(answer)], ["flow", "outcome", "old", "new", "pause_ms",
                                         "bytes_resent"])


def render_generic(answer: Mapping[str, Any]) -> str:
    return render_mapping(answer) if answer else "ok"


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _service_arg(text: str) -> str:
    """Validate a serviceID (with optional /bits) locally, so typos fail before servald."""
    try:
        return str(ServiceID.parse(text))
    except ServalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and steer a running servald over its control socket."
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="servald's control socket (default: $SERVAL_CONTROL_SOCKET, then "
        "/run/serval/servald.sock)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_REPLY_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for servald's answer (default {DEFAULT_REPLY_TIMEOUT_S:g})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_json(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--json", action="store_true", help="print servald's answer as JSON")
        return sub

    with_json(commands.add_parser("status", help="servald's role, addresses and state"))
    with_json(commands.add_parser("services", help="the service table (rules)"))
    with_json(commands.add_parser("flows", help="flows with their local and remote addresses"))
    with_json(commands.add_parser("registrations", help="registrations (router or host side)"))
    with_json(commands.add_parser("counters", help="all counters"))

    rule = commands.add_parser("rule", help="add, modify or remove a service-table rule")
    rule_actions = rule.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ("add", "modify", "remove"):
        sub = with_json(rule_actions.add_parser(action, help=f"{action} a rule"))
        sub.add_argument("service", type=_service_arg, metavar="SERVICE",
                         help="serviceID or prefix (hex, 0x..., name, with optional /BITS)")
        sub.add_argument("--kind", required=True, choices=("forward", "delay", "drop"))
        sub.add_argument("--address", metavar="A",
                         help="next hop for forward rules (ADDR or ADDR:PORT)")
        sub.add_argument("--weight", type=_positive_int, metavar="W")
        sub.add_argument("--priority", type=_positive_int, metavar="P")

    delay = commands.add_parser("delay", help="act as the DELAY controller")
    delay_actions = delay.add_subparsers(dest="action", required=True, metavar="ACTION")
    with_json(delay_actions.add_parser("list", help="list held packets"))
    for action in ("release", "drop"):
        sub = with_json(delay_actions.add_parser(action, help=f"{action} a held packet"))
        sub.add_argument("packet", type=_positive_int, metavar="ID", help="held packet id")

    migrate = commands.add_parser("migrate", help="move flows to another address or interface")
    migrate_actions = migrate.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = with_json(migrate_actions.add_parser("flow", help="move one flow"))
    sub.add_argument("flow", type=_positive_int, metavar="FLOWID", help="flowID (servalctl flows)")
    sub.add_argument("--to", required=True, metavar="ADDRESS|IFACE",
                     help="an address of this host, or an interface (its best address)")
    sub = with_json(migrate_actions.add_parser(
        "interface", help="move every flow on interface OLD to NEW (OLD == NEW: the "
                          "interface's address changed)"))
    sub.add_argument("old", metavar="OLD")
    sub.add_argument("new", metavar="NEW")
    return parser


def request_for(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control-API request a parsed command line stands for."""
    if args.command == "rule":
        fields: dict[str, Any] = {"service": args.service, "kind": args.kind}
        for name in ("address", "weight", "priority"):
            value = getattr(args, name)
            if value is not None:
                fields[name] = value
        return f"rule_{args.action}", fields
    if args.command == "migrate":
        if args.action == "flow":
            return "migrate_flow", {"flow": args.flow, "to": args.to}
        return "migrate_interface", {"old": args.old, "new": args.new}
    if args.command == "delay":
        if args.action == "list":
            return "delay_list", {}
        return f"delay_{args.action}", {"packet": args.packet}
    return str(args.command), {}


_RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "status": render_status,
    "services": render_services,
    "flows": render_flows,
    "registrations": render_registrations,
    "counters": render_counters,
    "delay_list": render_delayed,
    "migrate_flow": render_migration,
    "migrate_interface": render_migrations,
}


def run(args: argparse.Namespace, out: TextIO) -> int:
    op, fields = request_for(args)
    with ControlClient(args.control_socket, reply_timeout_s=args.timeout) as client:
        if op == "flows":
            answer = _all_flows(client)
        else:
            response = client.call(op, fields, subject=op.replace("_", " "))
            answer = {k: v for k, v in response.message.items() if k not in _ENVELOPE_KEYS}
    if args.json:
        json.dump(answer, out, indent=2)
        out.write("\n")
    else:
        out.write(_RENDERERS.get(op, render_generic)(answer) + "\n")
    return EXIT_OK


MAX_FLOW_PAGES = 10_000  # a bound on the paging loop: 1,000,000 flows at 100 a page


def _all_flows(client: ControlClient) -> Message:
    """Every flow, page by page (servald answers `flows` in pages: offset / next)."""
    flows: list[Any] = []
    offset: int | None = 0
    for _ in range(MAX_FLOW_PAGES):
        if offset is None:
            break
        message = client.call("flows", {"offset": offset}, subject="flows").message
        flows.extend(message.get("flows") or [])
        following = message.get("next")
        offset = following if isinstance(following, int) and following > offset else None
    return {"flows": flows}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `servalctl` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        return run(args, sys.stdout)
    except (ServalError, OSError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
