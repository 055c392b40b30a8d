#!/usr/bin/env python3
"""servald benchmark (issue 3): bulk throughput and connection set-up, Serval against kernel TCP.

Two topologies, built by serval.topology and alive for the whole run, servald in every host:

    bulk:  c ===== s      two veth links between the same two hosts: "fast" (unshaped) and
                          "slow" (tbf 1 Gbit/s each way, by the topology helper)
    setup: c --lan-- s    one LAN (a bridge) with a third host r, a servald service router
                 |
                 r

Bulk (median of --rounds interleaved rounds, each run --seconds long): `serval-perf` over a
Serval connection against iperf3 (plain kernel TCP, C) between c and s, on the shaped and on the
unshaped link; `serval-perf --tcp` (plain kernel TCP, the same Python tool) is measured beside
them to tell the connection's cost from the tool's. The Serval connection is found through a
static FORWARD rule on c pointing at s's address on the chosen link (so each link carries its
own contender) and built in repair mode. Then one 1 GiB transfer on the fast link must verify.

Set-up (median of the same rounds, each run --rate-seconds long, at concurrency 1 and at
--concurrency): a small Python client in c that connects and closes in a loop from N threads,
measuring each connect: over servald's control API (`connect` op, fd received = connected) in
both modes, `repair` and `handshake`, "direct" (ad-hoc: the SYN is a LAN broadcast) and
"through a router" (c's static FORWARD rule for the service points at r, r's at s: the same
resolution path registrations produce), against plain kernel TCP `connect()` to a Python
accept-and-close server in s. Also recorded per run: servald CPU time (client + server host)
per connection, and which mode each connection really used (repair falls back to handshake
when its set-up fails). c has net.ipv4.tcp_tw_reuse=1 and a wide ip_local_port_range, so that
the TCP baseline does not run out of ephemeral ports over the rounds.

`--baseline-tree DIR` adds the set-up contenders once more with servald (and only servald) run
from another source tree, e.g. the last commit (`git archive HEAD | tar -x -C DIR`), on other
ports in the same namespaces, interleaved with the current code: the before/after of a change.

    python benchmarks/servald_bench.py [--rounds N] [--seconds S] [--quick]

Writes benchmarks/results/servald.json, servald.md and servald.png. Needs root and iperf3.
Reports the issue's targets as MET/MISSED; asserts nothing. Internal sub-commands
(`_acceptor`, `_connector`) are what it runs inside the namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT))
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402
    RESULTS_DIR,
    SERIES_COLORS,
    Progress,
    clean_for_json,
    format_number,
    json_number,
    markdown_table,
    median,
    process_tree_cpu_s,
    ratio,
    wait_listening,
    write_json,
)

from serval.topology import (  # noqa: E402
    Host,
    LanSpec,
    LinkSpec,
    Shaping,
    Topology,
    TopologySpec,
    cleanup_stale,
    sigterm_as_exit,
)

TOPOLOGY_PREFIX = "svsb"
IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
IPERF_PORT = 5201
PERF_TCP_PORT = 5301
TCP_ACCEPT_PORT = 5401
SHAPED_RATE = "1gbit"
SAL_PORT = 54325
BASELINE_SAL_PORT = 54335  # the baseline tree's servald set: SAL port, data port, handshake
READY_TIMEOUT_S = 20.0
RUN_GRACE_S = 30.0
VERIFY_BYTES = 1 << 30
CONNECT_TIMEOUT_S = 5.0
DEFAULT_ROUNDS = 5
DEFAULT_SECONDS = 6.0
DEFAULT_RATE_SECONDS = 2.5
DEFAULT_CONCURRENCY = 8
WARMUP_RATE_SECONDS = 0.5
SERVICE_DIRECT = "setup.direct"
SERVICE_ROUTED = "setup.routed"
SERVICE_FAST = "bulk.fast"
SERVICE_SLOW = "bulk.slow"
TARGET_SHAPED = 0.999
TARGET_UNSHAPED = 0.99


# ---------------------------------------------------------------------------------------------
# Inside the namespaces: the accept-and-close server and the connect loop client


def acceptor_main(argv: Sequence[str]) -> int:
    """`_acceptor CONTROL_SOCKET SERVICE... --tcp-port P`: accept and close, forever."""
    from serval.control import ControlClient, close_fds

    parser = argparse.ArgumentParser(prog="servald_bench.py _acceptor")
    parser.add_argument("--control-socket", action="append", default=[])
    parser.add_argument("--service", action="append", default=[])
    parser.add_argument("--tcp-port", type=int)
    args = parser.parse_args(argv)

    def serve_serval(path: str, service: str) -> None:
        client = ControlClient(path, reply_timeout_s=10)
        client.request("listen", service=service, type="stream", backlog=4096)
        ready.release()
        while True:
            close_fds(client.next_event().fds)

    def serve_tcp(port: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(4096)
        ready.release()
        while True:
            connection, _ = listener.accept()
            connection.close()

    ready = threading.Semaphore(0)
    threads = [threading.Thread(target=serve_serval, args=(path, service), daemon=True)
               for path in args.control_socket for service in args.service]
    if args.tcp_port is not None:
        threads.append(threading.Thread(target=serve_tcp, args=(args.tcp_port,), daemon=True))
    for thread in threads:
        thread.start()
    for _ in threads:
        if not ready.acquire(timeout=READY_TIMEOUT_S):
            print("not ready", flush=True)
            return 1
    print("ready", flush=True)
    while all(thread.is_alive() for thread in threads):
        time.sleep(0.2)
    return 1


def connector_main(argv: Sequence[str]) -> int:
    """`_connector (--serval SOCKET --service S --mode M | --tcp HOST:PORT) --threads N
    --seconds S`: connect and close in a loop; prints one JSON object."""
    from serval.control import ControlClient, close_fds

    parser = argparse.ArgumentParser(prog="servald_bench.py _connector")
    parser.add_argument("--serval")
    parser.add_argument("--service")
    parser.add_argument("--mode")
    parser.add_argument("--tcp")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]
    errors: list[str] = []
    modes: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(args.threads + 1)
    stop_at = [0.0]

    def serval_loop(index: int) -> None:
        client = ControlClient(args.serval, reply_timeout_s=CONNECT_TIMEOUT_S + 5)
        fields = {"service": args.service, "type": "stream", "mode": args.mode,
                  "timeout_s": CONNECT_TIMEOUT_S}
        mine = latencies[index]
        seen: dict[str, int] = {}
        start.wait()
        while time.monotonic() < stop_at[0]:
            began = time.perf_counter()
            try:
                frame = client.call("connect", fields)
            except OSError as exc:
                with lock:
                    errors.append(str(exc)[:200])
                continue
            mine.append(time.perf_counter() - began)
            close_fds(frame.fds)
            mode = str(frame.message.get("mode"))
            seen[mode] = seen.get(mode, 0) + 1
        client.close()
        with lock:
            for mode, count in seen.items():
                modes[mode] = modes.get(mode, 0) + count

    def tcp_loop(index: int) -> None:
        host, _, port = args.tcp.rpartition(":")
        address = (host, int(port))
        mine = latencies[index]
        start.wait()
        while time.monotonic() < stop_at[0]:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            began = time.perf_counter()
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                with lock:
                    errors.append(str(exc)[:200])
                continue
            mine.append(time.perf_counter() - began)
            sock.close()
        with lock:
            modes["tcp"] = modes.get("tcp", 0) + len(mine)

    target = serval_loop if args.serval else tcp_loop
    threads = [threading.Thread(target=target, args=(i,), daemon=True)
               for i in range(args.threads)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + args.seconds
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join(args.seconds + CONNECT_TIMEOUT_S + 10)
    elapsed = time.monotonic() - began
    every = sorted(value for mine in latencies for value in mine)
    count = len(every)

    def percentile(fraction: float) -> float | None:
        return every[min(count - 1, int(fraction * count))] * 1000 if count else None

    print(json.dumps({"connections": count, "seconds": elapsed, "per_s": count / elapsed,
                      "p50_ms": percentile(0.50), "p99_ms": percentile(0.99),
                      "errors": len(errors), "first_errors": errors[:3], "modes": modes}))
    return 0


# ---------------------------------------------------------------------------------------------
# servald processes


@dataclass
class Daemon:
    host: Host
    name: str  # "current" or "baseline"
    process: subprocess.Popen[bytes]
    control: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def start_servald(host: Host, work_dir: Path, name: str, tree: Path, port: int,
                  config: dict[str, Any]) -> Daemon:
    import yaml

    state = work_dir / f"{host.netns}-{name}"
    state.mkdir(parents=True, exist_ok=True)
    control = str(state / "servald.sock")
    config_path = state / "servald.yaml"
    config = {"port": port, "log_level": "info",
              "data_plane": {"data_port": port + 1, "handshake_port": port + 2}, **config}
    config_path.write_text(yaml.safe_dump(config))
    log_path = state / "servald.log"
    env = host.env()
    env["PYTHONPATH"] = str(tree)
    with log_path.open("ab") as log:
        process = host.popen([sys.executable, "-m", "serval.host.daemon", "--config",
                              str(config_path), "--control-socket", control],
                             env=env, cwd=str(tree), stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(host, name, process, control, log_path)
    wait_control(daemon)
    return daemon


def wait_control(daemon: Daemon) -> None:
    from serval.control import ControlClient

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"servald ({daemon.name}) on {daemon.host.name} exited: "
                               f"{daemon.log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), ControlClient(daemon.control) as client:
            client.request("status")
            return
        time.sleep(0.05)
    raise RuntimeError(f"servald ({daemon.name}) on {daemon.host.name} did not answer")


def wait_output_line(process: subprocess.Popen[bytes], what: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().decode(errors="replace").strip()
    if line != "ready":
        raise RuntimeError(f"{what} did not start: {line!r}")


# ---------------------------------------------------------------------------------------------
# The set-up


@dataclass
class Bench:
    options: Options
    work_dir: Path
    bulk: Topology | None = None
    setup: Topology | None = None
    daemons: list[Daemon] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    setup_daemons: dict[str, dict[str, Daemon]] = field(default_factory=dict)  # set -> host

    def build(self, progress: Progress) -> None:
        progress.step("building the topologies and starting servald")
        self.bulk = Topology.build(TopologySpec(
            hosts=("c", "s"),
            links=(LinkSpec("c", "s", name="fast"),
                   LinkSpec("c", "s", name="slow", shaping=Shaping(rate=SHAPED_RATE))),
            ipv6=False), prefix=TOPOLOGY_PREFIX)
        self.setup = Topology.build(TopologySpec(
            hosts=("c", "s", "r"), lans=(LanSpec("lan", ("c", "s", "r")),), ipv6=False),
            prefix=TOPOLOGY_PREFIX)
        for topology in (self.bulk, self.setup):
            client = topology["c"]
            client.sysctl("ipv4/tcp_tw_reuse", 1)
            client.sysctl("ipv4/ip_local_port_range", "1024 65535")
        self._start_bulk()
        self._start_setup()

    def _start_bulk(self) -> None:
        assert self.bulk is not None
        client, server = self.bulk["c"], self.bulk["s"]
        rules = [{"service": SERVICE_FAST, "kind": "forward",
                  "address": str(server.address("fast"))},
                 {"service": SERVICE_SLOW, "kind": "forward",
                  "address": str(server.address("slow"))}]
        self.daemons.append(start_servald(client, self.work_dir, "current", REPO_ROOT, SAL_PORT,
                                          {"rules": rules}))
        server_daemon = start_servald(server, self.work_dir, "current", REPO_ROOT, SAL_PORT, {})
        self.daemons.append(server_daemon)
        log = (self.work_dir / "bulk-servers.log").open("ab")
        self.processes.append(server.popen([IPERF3, "-s", "-p", str(IPERF_PORT)],
                                           stdout=log, stderr=subprocess.STDOUT))
        env = server.env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        for service, extra in ((SERVICE_FAST, ["--tcp-port", str(PERF_TCP_PORT)]),
                               (SERVICE_SLOW, [])):
            self.processes.append(server.popen(
                [sys.executable, "-m", "serval.perf", "--control-socket", server_daemon.control,
                 "server", service, "--name", "s", *extra], env=env, stdout=log,
                stderr=subprocess.STDOUT))
        wait_listening(server, IPERF_PORT, READY_TIMEOUT_S)
        wait_listening(server, PERF_TCP_PORT, READY_TIMEOUT_S)
        time.sleep(0.5)  # the serval-perf listeners register their services with servald

    def _start_setup(self) -> None:
        assert self.setup is not None
        client, server, router = self.setup["c"], self.setup["s"], self.setup["r"]
        sets = [("current", REPO_ROOT, SAL_PORT)]
        if self.options.baseline_tree is not None:
            sets.append(("baseline", self.options.baseline_tree, BASELINE_SAL_PORT))
        for name, tree, port in sets:
            via_router = [{"service": SERVICE_ROUTED, "kind": "forward",
                           "address": f"{router.address('lan')}:{port}"}]
            to_server = [{"service": SERVICE_ROUTED, "kind": "forward",
                          "address": f"{server.address('lan')}:{port}"}]
            daemons = {
                "c": start_servald(client, self.work_dir, name, tree, port,
                                   {"rules": via_router}),
                "s": start_servald(server, self.work_dir, name, tree, port, {}),
                "r": start_servald(router, self.work_dir, name, tree, port,
                                   {"router": True, "rules": to_server}),
            }
            self.daemons.extend(daemons.values())
            self.setup_daemons[name] = daemons
        env = server.env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        argv = [sys.executable, str(Path(__file__).resolve()), "_acceptor",
                "--service", SERVICE_DIRECT, "--service", SERVICE_ROUTED,
                "--tcp-port", str(TCP_ACCEPT_PORT)]
        for daemons in self.setup_daemons.values():
            argv += ["--control-socket", daemons["s"].control]
        acceptor = server.popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=(self.work_dir / "acceptor.log").open("ab"))
        self.processes.append(acceptor)
        wait_output_line(acceptor, "the accept-and-close server")

    def close(self) -> None:
        for process in [*self.processes, *(d.process for d in self.daemons)]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.processes, *(d.process for d in self.daemons)]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        for topology in (self.bulk, self.setup):
            if topology is not None:
                topology.close()

    # -- bulk ----------------------------------------------------------------------------------

    def run_bulk(self, contender: str, link: str, seconds: float) -> dict[str, Any]:
        assert self.bulk is not None
        client, server = self.bulk["c"], self.bulk["s"]
        address = str(server.address(link))
        sample: dict[str, Any] = {"contender": contender, "link": link, "gbit_s": float("nan"),
                                  "error": None}
        env = client.env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        control = self.daemons[0].control
        if contender == "iperf3":
            argv = [IPERF3, "-c", address, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
        elif contender == "serval-perf":
            service = SERVICE_FAST if link == "fast" else SERVICE_SLOW
            argv = [sys.executable, "-m", "serval.perf", "--control-socket", control, "client",
                    service, "--seconds", f"{seconds:g}", "--json", "--mode", "repair"]
        else:  # serval-perf over plain TCP
            argv = [sys.executable, "-m", "serval.perf", "client", "--tcp",
                    f"{address}:{PERF_TCP_PORT}", "--seconds", f"{seconds:g}", "--json"]
        counters_before = client.net_counters()
        try:
            result = client.run(argv, check=False, timeout=seconds + RUN_GRACE_S, env=env)
        except subprocess.TimeoutExpired:
            sample["error"] = "timed out"
            return sample
        counters_after = client.net_counters()
        # The sender's retransmissions (the namespace's counters: one transfer at a time).
        sample["retransmitted_segments"] = (counters_after.get("Tcp.RetransSegs", 0)
                                            - counters_before.get("Tcp.RetransSegs", 0))
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            sample["error"] = (result.stdout + result.stderr).strip()[-300:] or "no output"
            return sample
        if contender == "iperf3":
            if "error" in report:
                sample["error"] = str(report["error"])
                return sample
            sample["gbit_s"] = report["end"]["sum_received"]["bits_per_second"] / 1e9
        else:
            sample["gbit_s"] = float(report["gbps"])
            sample["verified"] = bool(report.get("verified"))
            if result.returncode != 0 or not report.get("verified"):
                sample["error"] = f"exit {result.returncode}, verified={report.get('verified')}"
        return sample

    def verify_gib(self) -> dict[str, Any]:
        assert self.bulk is not None
        client = self.bulk["c"]
        env = client.env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        argv = [sys.executable, "-m", "serval.perf", "--control-socket", self.daemons[0].control,
                "client", SERVICE_FAST, "--bytes", str(VERIFY_BYTES), "--json", "--mode",
                "repair"]
        result = client.run(argv, check=False, timeout=300, env=env)
        try:
            report: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            return {"verified": False, "error": (result.stdout + result.stderr)[-300:]}
        report.pop("streams", None)
        report["exit_status"] = result.returncode
        return report

    # -- set-up --------------------------------------------------------------------------------

    def run_setup(self, contender: SetupContender, threads: int,
                  seconds: float) -> dict[str, Any]:
        assert self.setup is not None
        client, server = self.setup["c"], self.setup["s"]
        argv = [sys.executable, str(Path(__file__).resolve()), "_connector", "--threads",
                str(threads), "--seconds", f"{seconds:g}"]
        cpu_pids: list[int] = []
        if contender.kind == "tcp":
            argv += ["--tcp", f"{server.address('lan')}:{TCP_ACCEPT_PORT}"]
        else:
            daemons = self.setup_daemons[contender.servald]
            service = SERVICE_DIRECT if contender.path == "direct" else SERVICE_ROUTED
            argv += ["--serval", daemons["c"].control, "--service", service, "--mode",
                     contender.kind]
            cpu_pids = [daemons["c"].pid, daemons["s"].pid]
            if contender.path == "router":
                cpu_pids.append(daemons["r"].pid)
        env = client.env()
        env["PYTHONPATH"] = str(REPO_ROOT)
        cpu_before = sum(process_tree_cpu_s(pid) for pid in cpu_pids)
        sample: dict[str, Any] = {"contender": contender.name, "threads": threads,
                                  "per_s": float("nan"), "p50_ms": float("nan"),
                                  "p99_ms": float("nan"), "cpu_us_per_connection": float("nan"),
                                  "error": None}
        try:
            result = client.run(argv, check=False, env=env,
                                timeout=seconds + CONNECT_TIMEOUT_S + RUN_GRACE_S)
        except subprocess.TimeoutExpired:
            sample["error"] = "timed out"
            return sample
        cpu_s = sum(process_tree_cpu_s(pid) for pid in cpu_pids) - cpu_before
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            sample["error"] = (result.stdout + result.stderr).strip()[-300:] or "no output"
            return sample
        sample.update({key: report[key] for key in ("connections", "per_s", "errors",
                                                     "first_errors", "modes")})
        sample["p50_ms"] = report["p50_ms"] if report["p50_ms"] is not None else float("nan")
        sample["p99_ms"] = report["p99_ms"] if report["p99_ms"] is not None else float("nan")
        if cpu_pids and report["connections"]:
            sample["cpu_us_per_connection"] = cpu_s / report["connections"] * 1e6
        return sample


@dataclass(frozen=True)
class SetupContender:
    kind: str  # "tcp", "repair" or "handshake"
    path: str  # "direct" or "router" ("direct" for tcp)
    servald: str = "current"  # which servald set: "current" or "baseline"

    @property
    def name(self) -> str:
        if self.kind == "tcp":
            return "tcp connect()"
        suffix = "" if self.servald == "current" else " [baseline]"
        return f"serval {self.kind}, {self.path}{suffix}"


def setup_contenders(baseline: bool) -> list[SetupContender]:
    contenders = [SetupContender("tcp", "direct")]
    sets = ["current", "baseline"] if baseline else ["current"]
    for servald in sets:
        for path in ("direct", "router"):
            for kind in ("repair", "handshake"):
                contenders.append(SetupContender(kind, path, servald))
    return contenders


BULK_CONTENDERS = ("iperf3", "serval-perf", "serval-perf --tcp")
BULK_LINKS = (("slow", f"shaped {SHAPED_RATE}"), ("fast", "unshaped"))


# ---------------------------------------------------------------------------------------------
# Summary, targets, output


def summarize(samples: list[dict[str, Any]], contenders: list[SetupContender],
              concurrency_levels: list[int]) -> dict[str, Any]:
    bulk: dict[str, dict[str, Any]] = {}
    for link, _ in BULK_LINKS:
        bulk[link] = {}
        for tool in BULK_CONTENDERS:
            values = [s["gbit_s"] for s in samples if s.get("section") == "bulk"
                      and s["link"] == link and s["contender"] == tool]
            good = [v for v in values if v == v]
            bulk[link][tool] = {
                "gbit_s": median(values), "min": min(good) if good else float("nan"),
                "max": max(good) if good else float("nan"), "runs": len(good)}
        bulk[link]["serval_vs_iperf3"] = ratio(bulk[link]["serval-perf"]["gbit_s"],
                                               bulk[link]["iperf3"]["gbit_s"])
        bulk[link]["serval_vs_same_tool_tcp"] = ratio(
            bulk[link]["serval-perf"]["gbit_s"], bulk[link]["serval-perf --tcp"]["gbit_s"])
    setup: dict[str, dict[str, Any]] = {}
    for threads in concurrency_levels:
        level: dict[str, Any] = {}
        for contender in contenders:
            runs = [s for s in samples if s.get("section") == "setup"
                    and s["contender"] == contender.name and s["threads"] == threads]
            modes: dict[str, int] = {}
            for run in runs:
                for mode, count in (run.get("modes") or {}).items():
                    modes[mode] = modes.get(mode, 0) + count
            level[contender.name] = {
                "per_s": median(r["per_s"] for r in runs),
                "p50_ms": median(r["p50_ms"] for r in runs),
                "p99_ms": median(r["p99_ms"] for r in runs),
                "cpu_us_per_connection": median(r["cpu_us_per_connection"] for r in runs),
                "errors": sum(int(r.get("errors") or 0) for r in runs),
                "modes": modes,
                "runs": len(runs),
            }
        setup[str(threads)] = level
    return {"bulk": bulk, "setup": setup}


def evaluate_targets(summary: dict[str, Any],
                     verify: dict[str, Any] | None) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for link, label, goal in (("slow", f"shaped {SHAPED_RATE}", TARGET_SHAPED),
                              ("fast", "unshaped", TARGET_UNSHAPED)):
        entry = summary["bulk"][link]
        value = entry["serval_vs_iperf3"]
        # Run-to-run spread of the two contenders compared (max - min over the median): a
        # verdict on a margin smaller than that is luck, and the report says so.
        spread = max(ratio(entry[c]["max"] - entry[c]["min"], entry[c]["gbit_s"])
                     if entry[c]["runs"] > 1 else float("nan")
                     for c in ("iperf3", "serval-perf"))
        targets.append({"target": f"{label}: serval-perf over Serval >= {goal:.1%} of iperf3",
                        "value": json_number(value),
                        "met": bool(value == value and value >= goal),
                        "spread": json_number(spread),
                        "resolvable": bool(spread == spread and spread < 1 - goal)})
    verified = bool(verify and verify.get("verified"))
    targets.append({"target": "1 GiB serval-perf transfer verifies",
                    "value": verified, "met": verified})
    return targets


def render_markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    config = result["config"]
    lines = [
        "# servald benchmark",
        "",
        f"Run {result['started']} on {config['machine']}, {config['cpus']} CPUs, "
        f"kernel {config['kernel']}; {config['rounds']} interleaved rounds, medians. "
        f"{'INCOMPLETE: ' + str(result['failure']) if result.get('failure') else ''}",
        "",
        f"## Bulk throughput (c to s, {config['seconds']:g} s per run)",
        "",
    ]
    rows = []
    for link, label in BULK_LINKS:
        entry = summary["bulk"][link]
        for contender in BULK_CONTENDERS:
            values = entry[contender]
            rows.append([label, contender, format_number(values["gbit_s"], 3),
                         f"{format_number(values['min'], 3)}–{format_number(values['max'], 3)}",
                         str(values["runs"])])
        rows.append([label, "**Serval / iperf3**",
                     format_number(entry["serval_vs_iperf3"] * 100, 2, "%"), "", ""])
        rows.append([label, "Serval / same tool over TCP",
                     format_number(entry["serval_vs_same_tool_tcp"] * 100, 2, "%"), "", ""])
    lines.append(markdown_table(["link", "contender", "Gbit/s (median)", "range", "runs"], rows))
    verify = result.get("verify") or {}
    lines += [
        f"1 GiB transfer over Serval (fast link): verified = **{verify.get('verified')}**, "
        f"{format_number(float(verify.get('gbps') or float('nan')), 2)} Gbit/s, "
        f"instance {verify.get('instance')}.",
        "",
        "## Targets",
        "",
        markdown_table(["target", "value", "status", "run-to-run spread"], [
            [t["target"], (format_number(t["value"] * 100, 2, "%")
                           if isinstance(t["value"], float) else str(t["value"])),
             "MET" if t["met"] else "MISSED",
             "" if "spread" not in t else
             format_number((float("nan") if t["spread"] is None else t["spread"]) * 100, 1,
                           "%")
             + ("" if t.get("resolvable") else " (larger than the margin: within noise)")]
            for t in result["targets"]]),
        f"## Connection set-up ({config['rate_seconds']:g} s per run; latency = connect "
        "request until the connected fd is in the client's hand)",
        "",
    ]
    for threads, level in summary["setup"].items():
        rows = []
        for name, values in level.items():
            modes = ", ".join(f"{m} {c}" for m, c in sorted(values["modes"].items()))
            rows.append([name, format_number(values["per_s"], 0),
                         format_number(values["p50_ms"], 3), format_number(values["p99_ms"], 3),
                         format_number(values["cpu_us_per_connection"], 0),
                         str(values["errors"]), modes])
        lines.append(f"Concurrency {threads} (client threads):")
        lines.append("")
        lines.append(markdown_table(["contender", "conn/s", "p50 ms", "p99 ms",
                                     "servald CPU µs/conn", "errors", "modes used"],
                                    rows))
    lines += [
        "Set-up paths: *direct* = ad-hoc (the SYN is a LAN broadcast, no router); *router* = "
        "c's FORWARD rule sends the SYN to the service router r, which forwards it to s (the "
        "SYN-ACK and the data go straight between c and s). servald CPU is the user+system "
        "time of every servald on the path (c and s, plus r through the router) per "
        "connection; the applications (the Python connect loop, the accept-and-close "
        "server) are not in it. *modes used* counts what servald really built (a repair "
        "set-up that fails falls back to handshake)."
        + (f" [baseline] rows run servald from `{config['baseline_tree']}`, interleaved with "
           "the current code." if config["baseline_tree"] else ""),
        "",
        f"Machine load average (1 min) at the start / end of the run: "
        f"{config.get('load_start')} / {config.get('load_end')} (other work shares these 2 "
        "vCPUs; rates and unshaped throughput move by tens of percent from run to run, so "
        "compare contenders within one run, and the CPU per connection more than the rates).",
        "",
    ]
    return "\n".join(lines)


def render_plot(path: Path, result: dict[str, Any], contenders: list[SetupContender]) -> bool:
    """Four panels: shaped and unshaped throughput (min-max bars), set-up rate and p50 latency
    of the Serval contenders (the baseline tree hatched, in its counterpart's colour; plain
    TCP is off these scales and named in the titles). Drawn here rather than with
    common.plot_bar_panels because every panel needs its own legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    summary = result["summary"]
    figure, axes = plt.subplots(1, 4, figsize=(22, 5.2))
    for axis, (link, label) in zip(axes[:2], BULK_LINKS, strict=True):
        entry = summary["bulk"].get(link)
        if entry is None:
            continue
        values = [entry[c]["gbit_s"] for c in BULK_CONTENDERS]
        errors = [[max(0.0, v - entry[c]["min"]) if v == v else 0.0 for c, v in
                   zip(BULK_CONTENDERS, values, strict=True)],
                  [max(0.0, entry[c]["max"] - v) if v == v else 0.0 for c, v in
                   zip(BULK_CONTENDERS, values, strict=True)]]
        bars = axis.bar(range(len(BULK_CONTENDERS)), [v if v == v else 0.0 for v in values],
                        yerr=errors, capsize=3, color=SERIES_COLORS[:len(BULK_CONTENDERS)])
        axis.bar_label(bars, labels=[format_number(v, 3) for v in values], fontsize=8)
        axis.set_xticks(range(len(BULK_CONTENDERS)))
        axis.set_xticklabels(BULK_CONTENDERS, fontsize=8)
        good = [v for v in values if v == v]
        if link == "slow" and good:  # zoom: the differences that matter are tenths of a %
            axis.set_ylim(min(good) * 0.98, max(good) * 1.01)
        axis.set_title(f"Bulk, {label} (Serval/iperf3 "
                       f"{format_number(entry['serval_vs_iperf3'] * 100, 2, '%')})", fontsize=10)
        axis.set_ylabel("Gbit/s (median, min-max)")
        axis.grid(axis="y", alpha=0.3)
    serval = [c for c in contenders if c.kind != "tcp"]
    current = [c for c in serval if c.servald == "current"]
    color_of = {(c.kind, c.path): SERIES_COLORS[(i + 3) % len(SERIES_COLORS)]
                for i, c in enumerate(current)}
    levels = list(summary["setup"])
    for axis, key, title, unit in ((axes[2], "per_s", "Set-up rate", "connections/s"),
                                   (axes[3], "p50_ms", "Set-up latency p50", "ms")):
        width = 0.8 / max(1, len(serval))
        for index, contender in enumerate(serval):
            values = [summary["setup"][level][contender.name][key] for level in levels]
            offsets = [group + (index - (len(serval) - 1) / 2) * width
                       for group in range(len(levels))]
            axis.bar(offsets, [v if v == v else 0.0 for v in values], width,
                     label=contender.name, color=color_of[(contender.kind, contender.path)],
                     hatch="//" if contender.servald != "current" else None,
                     alpha=0.55 if contender.servald != "current" else 1.0,
                     edgecolor="black", linewidth=0.3)
        tcp = [summary["setup"][level].get("tcp connect()", {}).get(key, float("nan"))
               for level in levels]
        axis.set_xticks(range(len(levels)))
        axis.set_xticklabels([f"concurrency {level}" for level in levels])
        axis.set_ylabel(unit)
        axis.set_title(f"{title} (tcp connect(): "
                       + ", ".join(format_number(v, 0 if key == "per_s" else 3) for v in tcp)
                       + ")", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("servald: Serval against kernel TCP (medians of interleaved rounds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------
# Main


@dataclass
class Options:
    rounds: int
    seconds: float
    rate_seconds: float
    concurrency: int
    baseline_tree: Path | None
    output_dir: Path
    quick: bool
    sections: tuple[str, ...]


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"bulk run length (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--rate-seconds", type=float, default=None,
                        help=f"set-up run length (default {DEFAULT_RATE_SECONDS:g})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="client threads of the loaded set-up runs (the other level is 1)")
    parser.add_argument("--baseline-tree", type=Path,
                        help="also run the set-up contenders with servald from this tree")
    parser.add_argument("--sections", default="bulk,setup", help="bulk,setup or one of them")
    parser.add_argument("--quick", action="store_true", help="2 rounds of short runs")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    baseline = args.baseline_tree.resolve() if args.baseline_tree else None
    if baseline is not None and not (baseline / "serval" / "host" / "daemon.py").exists():
        raise SystemExit(f"--baseline-tree {baseline}: no serval/host/daemon.py there")
    sections = tuple(s for s in args.sections.split(",") if s)
    if not set(sections) <= {"bulk", "setup"} or not sections:
        raise SystemExit("--sections: bulk, setup or both")
    return Options(
        rounds=args.rounds or (2 if quick else DEFAULT_ROUNDS),
        seconds=args.seconds or (2.0 if quick else DEFAULT_SECONDS),
        rate_seconds=args.rate_seconds or (1.0 if quick else DEFAULT_RATE_SECONDS),
        concurrency=args.concurrency, baseline_tree=baseline, output_dir=args.output_dir,
        quick=quick, sections=sections)



def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["_acceptor"]:
        return acceptor_main(arguments[1:])
    if arguments[:1] == ["_connector"]:
        return connector_main(arguments[1:])
    options = parse_args(arguments)
    if os.geteuid() != 0:
        raise SystemExit("servald_bench.py needs root (network namespaces)")
    if "bulk" in options.sections and not Path(IPERF3).exists():
        raise SystemExit(f"missing {IPERF3}")
    cleanup_stale(TOPOLOGY_PREFIX)
    contenders = setup_contenders(options.baseline_tree is not None)
    levels = sorted({1, options.concurrency})
    bulk_runs = [(c, link) for link, _ in BULK_LINKS for c in BULK_CONTENDERS] \
        if "bulk" in options.sections else []
    setup_runs = [(c, t) for t in levels for c in contenders] \
        if "setup" in options.sections else []
    total = (1 + len(setup_runs) // max(1, len(levels))  # build, warm-ups
             + options.rounds * (len(bulk_runs) + len(setup_runs))
             + (1 if bulk_runs else 0) + 1)
    progress = Progress(total)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = round(os.getloadavg()[0], 2)
    work_dir = Path(tempfile.mkdtemp(prefix="servald-bench-"))
    bench = Bench(options, work_dir)
    samples: list[dict[str, Any]] = []
    verify: dict[str, Any] | None = None
    failure: str | None = None
    try:
        with sigterm_as_exit():
            bench.build(progress)
            if setup_runs:
                for contender in contenders:  # warm-up: ARP, caches, first-connection paths
                    progress.step(f"warm-up: {contender.name}")
                    bench.run_setup(contender, 1, WARMUP_RATE_SECONDS)
            for round_index in range(options.rounds):
                # Rotate the order each round so drift hits every contender alike.
                shift = round_index % max(1, len(bulk_runs))
                for contender_name, link in bulk_runs[shift:] + bulk_runs[:shift]:
                    progress.step(f"round {round_index + 1}: bulk {contender_name} on {link}")
                    sample = bench.run_bulk(contender_name, link, options.seconds)
                    sample.update(section="bulk", round=round_index + 1)
                    samples.append(sample)
                    progress.note(f"{format_number(sample['gbit_s'], 3)} Gbit/s"
                                  + (f" ERROR {sample['error']}" if sample["error"] else ""))
                shift = round_index % max(1, len(setup_runs))
                for contender, threads in setup_runs[shift:] + setup_runs[:shift]:
                    progress.step(f"round {round_index + 1}: set-up {contender.name}, "
                                  f"concurrency {threads}")
                    sample = bench.run_setup(contender, threads, options.rate_seconds)
                    sample.update(section="setup", round=round_index + 1)
                    samples.append(sample)
                    progress.note(f"{format_number(sample['per_s'], 0)} conn/s, p50 "
                                  f"{format_number(sample['p50_ms'], 3)} ms, p99 "
                                  f"{format_number(sample['p99_ms'], 3)} ms, modes "
                                  f"{sample.get('modes')}"
                                  + (f" ERROR {sample['error']}" if sample["error"] else ""))
            if bulk_runs:
                progress.step("1 GiB verified transfer over Serval")
                verify = bench.verify_gib()
                progress.note(f"verified={verify.get('verified')} gbps={verify.get('gbps')}")
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        failure = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        progress.step("tearing down and writing the results")
        bench.close()
    summary = summarize(samples, contenders if setup_runs else [], levels if setup_runs else [])
    result: dict[str, Any] = {
        "benchmark": "servald",
        "started": started,
        "failure": failure,
        "config": {
            "rounds": options.rounds, "seconds": options.seconds,
            "rate_seconds": options.rate_seconds, "concurrency_levels": levels,
            "baseline_tree": str(options.baseline_tree) if options.baseline_tree else None,
            "shaped_rate": SHAPED_RATE, "machine": platform.node(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "python": platform.python_version(),
            "work_dir": str(work_dir), "load_start": load_start,
            "load_end": round(os.getloadavg()[0], 2),
        },
        "summary": summary,
        "verify": verify,
        "samples": samples,
    }
    result["targets"] = evaluate_targets(summary, verify) if bulk_runs else []
    output = options.output_dir
    write_json(output / "servald.json", clean_for_json(result))
    (output / "servald.md").write_text(render_markdown(result), encoding="utf-8")
    render_plot(output / "servald.png", result, contenders if setup_runs else [])
    print(f"wrote {output / 'servald.md'}", file=sys.stderr)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
