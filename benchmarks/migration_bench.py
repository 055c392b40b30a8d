#!/usr/bin/env python3
"""Migration pause under bulk load (issue 4): last byte before to first byte after.

Topology (serval.topology): hosts a and b on one veth link, each with a second address on it.
A stream a -> b carries bulk data in both directions at once (the applications are separate
processes sending and receiving as fast as they can). Every INTERVAL the flow moves, the two
ends taking turns (a1 -> a2, b1 -> b2, a2 -> a1, ...), at least 50 times. For each migration
the pause is the largest gap in each receive stream that overlaps it (the time from the last
byte received before it to the first byte received after it, as the receiving application
sees it); the summary is p50 and p99 of the worse of the two directions, and of each.

Two runtimes, side by side in one run:
- ``servald``: real servald processes; migrations requested over the control API
  (`migrate_flow`, what `servalctl migrate flow` sends); each application takes part through
  its own `watch` connection (park / swap / resume events), as the library and the relay do;
- ``engine``: the migration engine alone (tests/host/test_migration_harness.py: asyncio SAL
  nodes in this process, the same application processes), i.e. without the control API.

    python benchmarks/migration_bench.py [--migrations N] [--interval-s S] [--runtime R]

Writes benchmarks/results/migration.json, migration.md and migration.png. Needs root.
Target on the 2-vCPU test machine: p50 <= 10 ms, p99 <= 50 ms. Reports; asserts nothing.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TESTS_DIR = REPO_ROOT / "tests" / "host"
for _path in (REPO_ROOT, BENCH_DIR, TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import (  # noqa: E402
    RESULTS_DIR,
    BarPanel,
    Progress,
    format_number,
    json_number,
    markdown_table,
    plot_bar_panels,
    write_json,
)
from test_migration_harness import (  # noqa: E402
    AppProcess,
    LabFlow,
    SalNode,
    establish,
    receive_gaps,
)
from test_migration_servald import SERVICE, Daemon  # noqa: E402

from serval.control import ControlClient  # noqa: E402
from serval.topology import Topology, TopologySpec  # noqa: E402

TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TRANSFER_BYTES = 1 << 42  # "forever": the run stops the applications itself
DEFAULT_MIGRATIONS = 60
DEFAULT_INTERVAL_S = 0.2
MIN_PROGRESS_BYTES = 8 << 20  # data must flow again between two migrations
PROGRESS_WAIT_S = 10.0
RST_COUNTERS = ("Tcp.OutRsts", "TcpExt.TCPAbortOnData", "TcpExt.TCPAbortOnTimeout")


@dataclass
class Run:
    runtime: str
    windows: list[tuple[float, float]] = field(default_factory=list)
    sides: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    engine_pause_ms: list[float] = field(default_factory=list)
    frozen_ms: list[float] = field(default_factory=list)
    bytes_resent: list[int] = field(default_factory=list)
    client_gap_ms: list[float] = field(default_factory=list)
    server_gap_ms: list[float] = field(default_factory=list)
    throughput_gbit_s: float = float("nan")
    resets: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def worst_gap_ms(self) -> list[float]:
        return [max(c, s) for c, s in zip(self.client_gap_ms, self.server_gap_ms, strict=True)
                if c == c and s == s]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# --------------------------------------------------------------------------------------------
# the two runtimes


class Mover(abc.ABC):
    """Requests one migration of one end; returns (outcome, pause_ms, frozen_ms, resent)."""

    @abc.abstractmethod
    def move(self, side: str, address: str) -> tuple[str, float, float, int]:
        """Move `side` of the flow to `address`."""


class EngineMover(Mover):
    def __init__(self, lab: LabFlow) -> None:
        self.lab = lab

    def move(self, side: str, address: str) -> tuple[str, float, float, int]:
        node, flow = ((self.lab.client_node, self.lab.client_flow) if side == "a" else
                      (self.lab.server_node, self.lab.server_flow))
        record = node.migrate(flow, address)
        return record.outcome.value, record.pause_ms, record.frozen_ms, record.bytes_resent


class ServaldMover(Mover):
    def __init__(self, daemons: dict[str, Daemon], flows: dict[str, int]) -> None:
        self.clients = {side: ControlClient(d.socket_path, reply_timeout_s=30)
                        for side, d in daemons.items()}
        self.flows = flows

    def move(self, side: str, address: str) -> tuple[str, float, float, int]:
        try:
            answer = self.clients[side].request("migrate_flow", flow=self.flows[side],
                                                to=address).message
        except OSError as exc:
            return f"failed: {exc}", float("nan"), float("nan"), 0
        return (str(answer["outcome"]), float(answer["pause_ms"]), float(answer["frozen_ms"]),
                int(answer["bytes_resent"]))

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@contextlib.contextmanager
def engine_stream(topology: Topology, workdir: Path) -> Iterator[tuple[Mover, AppProcess,
                                                                       AppProcess]]:
    nodes = [SalNode(topology["a"]), SalNode(topology["b"])]
    try:
        lab = establish(nodes[0], nodes[1], 4, random.Random(7), TRANSFER_BYTES, 7,
                        str(workdir), check=False)
        try:
            yield EngineMover(lab), lab.client_app, lab.server_app
        finally:
            lab.close()
    finally:
        for node in nodes:
            node.close()


@contextlib.contextmanager
def servald_stream(topology: Topology, workdir: Path) -> Iterator[tuple[Mover, AppProcess,
                                                                        AppProcess]]:
    daemons: dict[str, Daemon] = {}
    try:
        for side in ("a", "b"):
            daemons[side] = Daemon(topology[side], workdir, log_level="warning")
        listener = ControlClient(daemons["b"].socket_path)
        listener.request("listen", service=SERVICE, type="stream", backlog=8)
        with ControlClient(daemons["a"].socket_path) as client:
            reply = client.call("connect", {"service": SERVICE, "type": "stream",
                                            "timeout_s": 10.0})
        accept = listener.next_event(10.0)
        flows = {"a": int(reply.message["flow"]), "b": int(accept.message["flow"])}
        client_sock = socket.socket(fileno=reply.fds[0])
        server_sock = socket.socket(fileno=accept.fds[0])
        apps = (
            AppProcess("client", client_sock, TRANSFER_BYTES, 15, None, str(workdir),
                       servald={"path": daemons["a"].socket_path, "flow": flows["a"]}),
            AppProcess("server", server_sock, TRANSFER_BYTES, 16, None, str(workdir),
                       servald={"path": daemons["b"].socket_path, "flow": flows["b"]}))
        client_sock.close()
        server_sock.close()
        mover = ServaldMover(daemons, flows)
        try:
            yield mover, apps[0], apps[1]
        finally:
            mover.close()
            for app in apps:
                app.close()
            listener.close()
    finally:
        for daemon in daemons.values():
            daemon.stop()


def measure(runtime: str, migrations: int, interval_s: float, progress: Progress) -> Run:
    from serval.topology import Topology as BuiltTopology

    run = Run(runtime)
    with tempfile.TemporaryDirectory(prefix="migration-bench-") as tmp, \
            BuiltTopology.build(TopologySpec.pair(), prefix="svtmb") as topology:
        workdir = Path(tmp)
        a, b = topology["a"], topology["b"]
        addresses = {"a": [str(a.address(version=4)), str(topology.add_address("a", "a-b"))],
                     "b": [str(b.address(version=4)), str(topology.add_address("b", "a-b"))]}
        current = {"a": 0, "b": 0}
        stream = engine_stream if runtime == "engine" else servald_stream
        with stream(topology, workdir) as (mover, client_app, server_app):
            client_app.start()
            server_app.start()
            started = time.monotonic()
            try:
                for index in range(migrations):
                    _wait_for_flow(client_app, server_app, interval_s)
                    side = "a" if index % 2 == 0 else "b"
                    current[side] ^= 1
                    target = addresses[side][current[side]]
                    begin = time.monotonic()
                    outcome, pause_ms, frozen_ms, resent = mover.move(side, target)
                    end = time.monotonic()
                    run.windows.append((begin, end))
                    run.sides.append(side)
                    run.outcomes.append(outcome)
                    run.engine_pause_ms.append(pause_ms)
                    run.frozen_ms.append(frozen_ms)
                    run.bytes_resent.append(resent)
                    if outcome != "completed":
                        current[side] ^= 1
                    if index % 10 == 9:
                        progress.note(f"{runtime}: {index + 1} migrations")
                _wait_for_flow(client_app, server_app, interval_s)
            except Exception as exc:
                run.error = repr(exc)
            elapsed = time.monotonic() - started
            moved = client_app.progress()[0] + server_app.progress()[0]
            run.throughput_gbit_s = moved * 8 / elapsed / 1e9
            # Before the applications stop: closing with data in flight resets, by design.
            for host in (a, b):
                counters = host.net_counters()
                run.resets[host.name] = sum(counters.get(name, 0) for name in RST_COUNTERS)
            client_app.stop()
            server_app.stop()
            run.client_gap_ms = receive_gaps(client_app.recv_times, run.windows)
            run.server_gap_ms = receive_gaps(server_app.recv_times, run.windows)
    return run


def _wait_for_flow(client_app: AppProcess, server_app: AppProcess, interval_s: float) -> None:
    """Let bulk data flow for `interval_s`, and at least MIN_PROGRESS_BYTES each way."""
    before = (client_app.progress()[0], server_app.progress()[0])
    time.sleep(interval_s)
    deadline = time.monotonic() + PROGRESS_WAIT_S
    while (client_app.progress()[0] - before[0] < MIN_PROGRESS_BYTES
           or server_app.progress()[0] - before[1] < MIN_PROGRESS_BYTES):
        if time.monotonic() > deadline:
            raise TimeoutError("bulk data stopped flowing")
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------
# report


def summary(run: Run) -> dict[str, Any]:
    completed = sum(1 for outcome in run.outcomes if outcome == "completed")
    return {
        "runtime": run.runtime,
        "migrations": len(run.outcomes),
        "completed": completed,
        "gap_p50_ms": json_number(percentile(run.worst_gap_ms, 0.5)),
        "gap_p99_ms": json_number(percentile(run.worst_gap_ms, 0.99)),
        "gap_max_ms": json_number(percentile(run.worst_gap_ms, 1.0)),
        "client_gap_p50_ms": json_number(percentile(run.client_gap_ms, 0.5)),
        "server_gap_p50_ms": json_number(percentile(run.server_gap_ms, 0.5)),
        "engine_pause_p50_ms": json_number(percentile(run.engine_pause_ms, 0.5)),
        "engine_pause_p99_ms": json_number(percentile(run.engine_pause_ms, 0.99)),
        "frozen_p50_ms": json_number(percentile(run.frozen_ms, 0.5)),
        "bytes_resent_p50": json_number(percentile([float(b) for b in run.bytes_resent], 0.5)),
        "throughput_gbit_s": json_number(run.throughput_gbit_s),
        "resets": run.resets,
        "meets_target": (percentile(run.worst_gap_ms, 0.5) <= TARGET_P50_MS and
                         percentile(run.worst_gap_ms, 0.99) <= TARGET_P99_MS),
        "error": run.error,
    }


def report(runs: list[Run], args: argparse.Namespace) -> None:
    summaries = [summary(run) for run in runs]
    data = {
        "benchmark": "migration",
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "parameters": {"migrations": args.migrations, "interval_s": args.interval_s},
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS},
        "summary": summaries,
        "samples": [{"runtime": run.runtime, "side": run.sides, "outcome": run.outcomes,
                     "client_gap_ms": [json_number(v) for v in run.client_gap_ms],
                     "server_gap_ms": [json_number(v) for v in run.server_gap_ms],
                     "engine_pause_ms": [json_number(v) for v in run.engine_pause_ms],
                     "frozen_ms": [json_number(v) for v in run.frozen_ms],
                     "bytes_resent": run.bytes_resent} for run in runs],
    }
    write_json(RESULTS_DIR / "migration.json", data)
    rows = [[s["runtime"], f"{s['completed']}/{s['migrations']}",
             format_number(s["gap_p50_ms"] or float("nan"), 1),
             format_number(s["gap_p99_ms"] or float("nan"), 1),
             format_number(s["gap_max_ms"] or float("nan"), 1),
             format_number(s["client_gap_p50_ms"] or float("nan"), 1),
             format_number(s["server_gap_p50_ms"] or float("nan"), 1),
             format_number(s["engine_pause_p50_ms"] or float("nan"), 1),
             format_number(s["throughput_gbit_s"] or float("nan"), 2),
             str(sum(s["resets"].values())),
             "yes" if s["meets_target"] else "no"] for s in summaries]
    table = markdown_table(
        ["runtime", "completed", "gap p50 ms", "gap p99 ms", "gap max ms", "a recv p50",
         "b recv p50", "app pause p50 ms", "Gbit/s both ways", "RSTs", "target met"], rows)
    text = (f"# Migration pause under bulk load\n\n"
            f"{args.migrations} migrations per runtime, one every >= {args.interval_s} s "
            f"(ends alternate), bulk data both ways. Gap = largest gap in a receive stream "
            f"overlapping a migration (last byte before to first byte after), worse "
            f"direction; target p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms. "
            f"Machine: {os.cpu_count()} vCPU, Linux {platform.release()}.\n\n{table}")
    for s in summaries:
        if s["error"]:
            text += f"\n{s['runtime']}: stopped early: {s['error']}\n"
    (RESULTS_DIR / "migration.md").write_text(text, encoding="utf-8")
    plot_bar_panels(RESULTS_DIR / "migration.png", [
        BarPanel("pause (worse direction)", "ms", ["p50", "p99"],
                 [s["runtime"] for s in summaries],
                 {s["runtime"]: [s["gap_p50_ms"] or float("nan"),
                                 s["gap_p99_ms"] or float("nan")] for s in summaries}),
    ], title="Migration pause under bulk load")
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=DEFAULT_MIGRATIONS)
    parser.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S)
    parser.add_argument("--runtime", choices=("servald", "engine", "both"), default="both")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("migration_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    runtimes = ["servald", "engine"] if args.runtime == "both" else [args.runtime]
    progress = Progress(len(runtimes))
    runs: list[Run] = []
    for runtime in runtimes:
        progress.step(f"{runtime}: {args.migrations} migrations under bulk load")
        runs.append(measure(runtime, args.migrations, args.interval_s, progress))
        s = summary(runs[-1])
        progress.note(f"{runtime}: gap p50 {s['gap_p50_ms']} ms, p99 {s['gap_p99_ms']} ms, "
                      f"{s['completed']}/{s['migrations']} completed")
    report(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
