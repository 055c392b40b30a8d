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
- ``engine``: the migration engine alone (serval/host/migration_lab.py: asyncio SAL nodes in
  this process, the same application processes), i.e. without the control API.

Where the time goes: both ends' engines record a timeline of every migration (monotonic
timestamps of each step: input lock, park, dump, RSYN, rebuild, commit, swap, ...; servald
returns the initiator's with `migrate_flow` and logs the responder's), the application
processes record when each park / swap / resume reached them, and the receive streams give
the last byte before and the first byte after. CLOCK_MONOTONIC is shared by every process and
namespace, so all of it lines up on one axis: the report gives the median time of each event
after the initiator's input lock.

    python benchmarks/migration_bench.py [--migrations N] [--interval-s S] [--runtime R]
                                         [--results-dir DIR]

Writes migration.json, migration.md and migration.png (default: benchmarks/results/). Needs
root. Target on the 2-vCPU test machine: p50 <= 10 ms, p99 <= 50 ms. Reports; asserts nothing.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
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
for _path in (REPO_ROOT, BENCH_DIR):
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

from serval.control import ControlClient  # noqa: E402
from serval.host.log import configure_logging  # noqa: E402
from serval.host.migration import MigrationRecord  # noqa: E402
from serval.host.migration_lab import (  # noqa: E402
    SERVALD_SERVICE,
    AppProcess,
    LabFlow,
    SalNode,
    ServaldProcess,
    establish,
    receive_gap_edges,
    receive_gaps,
)
from serval.topology import Topology, TopologySpec  # noqa: E402

TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TRANSFER_BYTES = 1 << 42  # "forever": the run stops the applications itself
DEFAULT_MIGRATIONS = 60
DEFAULT_INTERVAL_S = 0.2
MIN_PROGRESS_BYTES = 8 << 20  # data must flow again between two migrations
PROGRESS_WAIT_S = 10.0
RST_COUNTERS = ("Tcp.OutRsts", "TcpExt.TCPAbortOnData", "TcpExt.TCPAbortOnTimeout")
# A first segment after a move that waited for a timer would show up here.
TIMER_COUNTERS = ("TcpExt.TCPTimeouts", "TcpExt.TCPLossProbes", "Tcp.RetransSegs")
RECORD_WAIT_S = 2.0  # engine runtime: the responder records its migration a little later


Timeline = dict[str, float]  # event -> monotonic time (s)


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
    # per migration: every event on one axis (see the module docstring)
    initiator_records: list[dict[str, Any]] = field(default_factory=list)
    responder_records: list[dict[str, Any] | None] = field(default_factory=list)
    timelines: list[Timeline] = field(default_factory=list)
    throughput_gbit_s: float = float("nan")
    resets: dict[str, int] = field(default_factory=dict)
    timers: dict[str, int] = field(default_factory=dict)  # TIMER_COUNTERS, both hosts
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
    """Requests one migration of one end; returns the initiator's record (`to_dict` form)."""

    # True: `responder_record` must be asked right after each move (the engine keeps only
    # its last records); False: any time after the run (servald's log keeps them all).
    records_fade = False

    @abc.abstractmethod
    def move(self, side: str, address: str) -> dict[str, Any]:
        """Move `side` of the flow to `address`."""

    @abc.abstractmethod
    def responder_record(self, side: str, started_after: float) -> dict[str, Any] | None:
        """The record of the migration `side` answered first after `started_after`."""


def _failed(exc: BaseException) -> dict[str, Any]:
    return {"outcome": f"failed: {exc}", "pause_ms": float("nan"),
            "frozen_ms": float("nan"), "bytes_resent": 0, "timeline": {}}


def _record_dict(record: MigrationRecord) -> dict[str, Any]:
    return record.to_dict()


class EngineMover(Mover):
    records_fade = True

    def __init__(self, lab: LabFlow) -> None:
        self.lab = lab

    def _side(self, side: str) -> tuple[SalNode, int]:
        return ((self.lab.client_node, self.lab.client_flow) if side == "a" else
                (self.lab.server_node, self.lab.server_flow))

    def move(self, side: str, address: str) -> dict[str, Any]:
        node, flow = self._side(side)
        return _record_dict(node.migrate(flow, address))

    def responder_record(self, side: str, started_after: float) -> dict[str, Any] | None:
        node, flow = self._side(side)
        deadline = time.monotonic() + RECORD_WAIT_S
        while time.monotonic() < deadline:
            for record in node.records(flow):
                if record.role.value == "responder" and record.started_at >= started_after:
                    return _record_dict(record)
            time.sleep(0.005)
        return None


class ServaldMover(Mover):
    def __init__(self, daemons: dict[str, ServaldProcess], flows: dict[str, int]) -> None:
        self.daemons = daemons
        self.clients = {side: ControlClient(d.socket_path, reply_timeout_s=30)
                        for side, d in daemons.items()}
        self.flows = flows

    def move(self, side: str, address: str) -> dict[str, Any]:
        try:
            return dict(self.clients[side].request("migrate_flow", flow=self.flows[side],
                                                   to=address).message)
        except OSError as exc:
            return _failed(exc)

    def responder_record(self, side: str, started_after: float) -> dict[str, Any] | None:
        """From servald's log (JSON lines at info level: one per migration and end)."""
        for line in self.daemons[side].log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "migration" and entry.get("role") == "responder" and \
                    float(entry.get("started_at", 0.0)) >= started_after:
                return dict(entry)
        return None

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@contextlib.contextmanager
def engine_stream(topology: Topology,
                  workdir: Path) -> Iterator[tuple[Mover, AppProcess, AppProcess]]:
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
def servald_stream(topology: Topology,
                   workdir: Path) -> Iterator[tuple[Mover, AppProcess, AppProcess]]:
    daemons: dict[str, ServaldProcess] = {}
    try:
        for side in ("a", "b"):
            # info: the one `migration` line per migration and end, with its timeline
            daemons[side] = ServaldProcess(topology[side], workdir, log_level="info",
                                           log_format="json")
        listener = ControlClient(daemons["b"].socket_path)
        listener.request("listen", service=SERVALD_SERVICE, type="stream", backlog=8)
        with ControlClient(daemons["a"].socket_path) as client:
            reply = client.call("connect", {"service": SERVALD_SERVICE, "type": "stream",
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
    run = Run(runtime)
    with tempfile.TemporaryDirectory(prefix="migration-bench-") as tmp, \
            Topology.build(TopologySpec.pair(), prefix="svtmb") as topology:
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
                    answer = mover.move(side, target)
                    end = time.monotonic()
                    run.windows.append((begin, end))
                    run.sides.append(side)
                    run.outcomes.append(str(answer["outcome"]))
                    run.engine_pause_ms.append(float(answer["pause_ms"]))
                    run.frozen_ms.append(float(answer["frozen_ms"]))
                    run.bytes_resent.append(int(answer["bytes_resent"]))
                    run.initiator_records.append(answer)
                    if mover.records_fade:
                        run.responder_records.append(
                            mover.responder_record("b" if side == "a" else "a", begin))
                    if answer["outcome"] != "completed":
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
                for name in TIMER_COUNTERS:
                    run.timers[name] = run.timers.get(name, 0) + counters.get(name, 0)
            client_app.stop()
            server_app.stop()
            run.client_gap_ms = receive_gaps(client_app.recv_times, run.windows)
            run.server_gap_ms = receive_gaps(server_app.recv_times, run.windows)
            if not mover.records_fade:
                for (begin, _end), side in zip(run.windows, run.sides, strict=True):
                    run.responder_records.append(
                        mover.responder_record("b" if side == "a" else "a", begin))
            run.timelines = timelines(run, {"a": client_app, "b": server_app})
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
# where the time goes


def timelines(run: Run, apps: dict[str, AppProcess]) -> list[Timeline]:
    """Per migration, every event on one monotonic axis: "I." / "R." steps of the initiator's
    and the responder's engine, "I.app." / "R.app." control messages reaching their
    applications, and "I.recv_last" / "I.recv_first" (the initiator application's receive
    gap; "R." likewise)."""
    edges = {side: receive_gap_edges(app.recv_times, run.windows) for side, app in apps.items()}
    result: list[Timeline] = []
    for index, ((begin, _end), side) in enumerate(zip(run.windows, run.sides, strict=True)):
        until = run.windows[index + 1][0] if index + 1 < len(run.windows) else float("inf")
        other = "b" if side == "a" else "a"
        events: Timeline = {}
        for prefix, record in (("I", run.initiator_records[index]),
                               ("R", run.responder_records[index])):
            if not record or "started_at" not in record:
                continue
            start = float(record["started_at"])
            for step, at_ms in dict(record.get("timeline", {})).items():
                events[f"{prefix}.{step}"] = start + float(at_ms) / 1000
        for prefix, end in (("I", side), ("R", other)):
            seen: set[str] = set()
            for what, at in apps[end].app_events:
                if begin <= at < until and what not in seen:
                    seen.add(what)
                    events[f"{prefix}.app.{what}"] = at
            last, first = edges[end][index]
            events[f"{prefix}.recv_last"], events[f"{prefix}.recv_first"] = last, first
        result.append(events)
    return result


def median_timeline(run: Run) -> list[tuple[str, float, int]]:
    """(event, median ms after the initiator's input lock, samples), in order of time."""
    offsets: dict[str, list[float]] = {}
    for outcome, events in zip(run.outcomes, run.timelines, strict=True):
        origin = events.get("I.input_locked")
        if outcome != "completed" or origin is None:
            continue
        for name, at in events.items():
            if at == at:
                offsets.setdefault(name, []).append((at - origin) * 1000)
    rows = [(name, percentile(values, 0.5), len(values)) for name, values in offsets.items()]
    return sorted(rows, key=lambda row: row[1])


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
        "timer_counters": run.timers,
        "meets_target": (percentile(run.worst_gap_ms, 0.5) <= TARGET_P50_MS and
                         percentile(run.worst_gap_ms, 0.99) <= TARGET_P99_MS),
        "timeline_median_ms": {name: json_number(ms) for name, ms, _n in median_timeline(run)},
        "error": run.error,
    }


def _cell(value: Any, digits: int) -> str:
    return format_number(float(value) if value is not None else float("nan"), digits)


def report(runs: list[Run], args: argparse.Namespace) -> None:
    results_dir = Path(args.results_dir)
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
                     "bytes_resent": run.bytes_resent,
                     "timeline_ms": [_relative(events) for events in run.timelines]}
                    for run in runs],
    }
    write_json(results_dir / "migration.json", data)
    rows = [[s["runtime"], f"{s['completed']}/{s['migrations']}",
             _cell(s["gap_p50_ms"], 1), _cell(s["gap_p99_ms"], 1), _cell(s["gap_max_ms"], 1),
             _cell(s["client_gap_p50_ms"], 1), _cell(s["server_gap_p50_ms"], 1),
             _cell(s["engine_pause_p50_ms"], 1), _cell(s["throughput_gbit_s"], 2),
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
    text += "".join(
        f"\n{s['runtime']}: TCP timer events over the run (both hosts): "
        + ", ".join(f"{name} {value}" for name, value in s["timer_counters"].items()) + "\n"
        for s in summaries)
    text += "\n" + timeline_table(runs, summaries)
    for s in summaries:
        if s["error"]:
            text += f"\n{s['runtime']}: stopped early: {s['error']}\n"
    (results_dir / "migration.md").write_text(text, encoding="utf-8")
    plot_bar_panels(results_dir / "migration.png", [
        BarPanel("pause (worse direction)", "ms", ["p50", "p99"],
                 [s["runtime"] for s in summaries],
                 {s["runtime"]: [s["gap_p50_ms"] or float("nan"),
                                 s["gap_p99_ms"] or float("nan")] for s in summaries}),
    ], title="Migration pause under bulk load")
    print(text)


def _relative(events: Timeline) -> dict[str, float | None]:
    origin = events.get("I.input_locked")
    if origin is None:
        return {}
    return {name: json_number(round((at - origin) * 1000, 3)) for name, at in
            sorted(events.items(), key=lambda item: item[1] if item[1] == item[1] else 0.0)}


EVENT_NOTES = {
    "I.requested": "migration requested (control op / engine call)",
    "I.input_locked": "initiator: drop filter attached (origin)",
    "I.app.park": "initiator's application gets `park`",
    "I.recv_last": "initiator's application: last byte before",
    "I.app.parked": "initiator's application has drained and acknowledged",
    "I.parked": "initiator engine sees the acknowledgement",
    "I.frozen": "initiator: repair mode, send window zeroed",
    "I.dumped": "initiator: queues dumped",
    "I.rsyn_sent": "RSYN sent",
    "I.send_queue_read": "initiator: send queue copied (RSYN in flight)",
    "R.rsyn_received": "responder handles the RSYN",
    "R.input_locked": "responder: drop filter attached",
    "R.app.park": "responder's application gets `park`",
    "R.recv_last": "responder's application: last byte before",
    "R.app.parked": "responder's application has drained and acknowledged",
    "R.parked": "responder engine sees the acknowledgement",
    "R.frozen": "responder: repair mode, send window zeroed",
    "R.dumped": "responder: queues dumped",
    "R.rebuilt": "responder: N_R built (repair mode)",
    "R.rsyn_ack_sent": "RSYN-ACK sent",
    "R.send_queue_read": "responder: send queue copied (on a thread, from the RSYN-ACK on)",
    "I.rsyn_ack": "initiator handles the RSYN-ACK",
    "I.rebuilt": "initiator: N_I built",
    "I.committed": "initiator: dup3 + repair off",
    "I.final_ack_sent": "final ACK sent",
    "I.finishing": "initiator's migration task resumes",
    "I.swapped": "initiator: `swap` pushed",
    "I.app.swap": "initiator's application gets `swap`",
    "I.pending_written": "initiator: bytes the responder lacks written",
    "I.resumed": "initiator: `resume` pushed",
    "I.app.resume": "initiator's application gets `resume`",
    "R.final_ack": "responder handles the final ACK (or implicit ACK)",
    "R.committed": "responder: dup3 + repair off",
    "R.finishing": "responder's migration task resumes",
    "R.swapped": "responder: `swap` pushed",
    "R.app.swap": "responder's application gets `swap`",
    "R.pending_written": "responder: bytes the initiator lacks written",
    "R.resumed": "responder: `resume` pushed",
    "R.app.resume": "responder's application gets `resume`",
    "I.recv_first": "initiator's application: first byte after",
    "R.recv_first": "responder's application: first byte after",
}


def timeline_table(runs: list[Run], summaries: list[dict[str, Any]]) -> str:
    """Median time of each event after the initiator's input lock, per runtime."""
    names: dict[str, float] = {}
    for run in runs:
        for name, ms, _count in median_timeline(run):
            names.setdefault(name, ms)
    ordered = sorted(names, key=lambda name: names[name])
    rows = [[name, *(_cell(s["timeline_median_ms"].get(name), 2) for s in summaries),
             EVENT_NOTES.get(name, "")] for name in ordered]
    table = markdown_table(["event", *(f"{s['runtime']} ms" for s in summaries), "what"], rows)
    return ("\n## Where the time goes\n\nMedian time of each event after the initiator's "
            "input lock (completed migrations; I = the end that moves, R = its peer; "
            "`app.*` = the message reached the application process). The pause of a "
            "direction runs from its `recv_last` to its `recv_first`.\n\n" + table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=DEFAULT_MIGRATIONS)
    parser.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S)
    parser.add_argument("--runtime", choices=("servald", "engine", "both"), default="both")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR),
                        help="where migration.{json,md,png} go (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("migration_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    configure_logging("warning")  # the engine runtime's migration lines stay out of the way
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
