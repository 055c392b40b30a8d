"""``serval-translator``: check-config, run, status.

Exit statuses: 0 success; 1 invalid configuration, startup failure, unreachable status endpoint
or a fatal condition while running; 2 bad command line (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from serval.errors import ConfigError
from translator import __version__
from translator.config import DEFAULT_STATUS_SOCKET, describe, load_config
from translator.status import StatusError, fetch_status, format_status

DEFAULT_CONFIG = "/etc/serval/translator.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serval-translator",
        description="Legacy TCP <-> Serval translator appliance.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser(
        "check-config", help="validate a configuration file and exit",
        description="Validate FILE; every problem is printed as FILE:LINE:COLUMN: what is "
                    "wrong and what is expected. Exit status 0 when valid, 1 otherwise.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")

    run = commands.add_parser(
        "run", help="run the appliance",
        description="Run the appliance in the foreground (systemd Type=notify). SIGHUP "
                    "reloads the configuration, SIGTERM drains and exits.")
    run.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG,
                     help=f"configuration file (default {DEFAULT_CONFIG})")

    status = commands.add_parser(
        "status", help="show a running appliance's live state",
        description="Listeners, exporters, connections, per-service counters and servald "
                    "health of the running appliance, read from its status socket.")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help=f"status socket (default: from --config, else "
                            f"{DEFAULT_STATUS_SOCKET})")
    where.add_argument("--config", metavar="FILE", help="read status.socket from this file")
    return parser


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        problems = str(exc).count("\n") + 1
        print(f"{args.file}: {problems} problem{'s' if problems > 1 else ''} found",
              file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.file}: configuration OK")
        for line in describe(config):
            print(f"  {line}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from translator.supervisor import run

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return run(args.config, config)


def _status(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None and args.config is not None:
        try:
            path = load_config(args.config).status.socket
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        if path is None:
            print(f"{args.config}: status.socket is disabled (null)", file=sys.stderr)
            return 1
    try:
        document = fetch_status(path or DEFAULT_STATUS_SOCKET)
    except StatusError as exc:
        print(f"serval-translator status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(format_status(document))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``serval-translator`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "run":
        return _run(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
