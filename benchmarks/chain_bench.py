#!/usr/bin/env python3
"""Full-chain benchmark (issue 6): the appliance pair against HAProxy and direct TCP, in one run.

Topology (serval.topology, namespaces ``svcb<hex>-*``)::

    client ---- front ===== dc LAN ===== server      front also forwards IP ("direct")
                              ||
                            srouter                  the Serval service router

Contenders (each one path from the legacy client to the legacy servers on `server`):

- ``direct``: client -> server, routed through `front` (no relay process anywhere);
- ``haproxy``: HAProxy on `front` (TCP) -> HAProxy on `server` -> 127.0.0.1 (plain TCP between
  the two HAProxies; they take the two appliances' places);
- ``serval``: serval-translator on `front` (listener, bundled servald) -> Serval connection,
  resolved by the router on `srouter`, data direct -> serval-translator on `server` (exporter,
  bundled servald) -> 127.0.0.1;
- ``serval-handshake`` (opt-in, ``--contenders``): the same appliances, with the front
  listener forcing the SAL ``handshake`` mode (the SAL exchange resolves the instance, then an
  ordinary kernel TCP connect with a one-time token) instead of the default ``repair`` mode.

The legacy servers run on `server`, listening on every address: iperf3 (bulk) and nginx (small
objects). Rounds are interleaved: each round runs every workload for every contender, in an
order rotated by one per round, so machine drift hits everyone alike; summaries are medians
over rounds (latency percentiles over all samples pooled).

Measured:

- bulk Gbit/s: one iperf3 stream client -> server (`end.sum_received`);
- relay CPU per GB: utime+stime of both relay processes over the bulk run, with their
  children (for serval: each translator and its bundled servald);
- connections per second with 1 and with 50 concurrent clients: wrk fetching a small object
  from nginx with ``Connection: close`` (every request a new TCP connection end to end), and
  the relay CPU per connection over those runs;
- connection latency p50/p99: sequential fresh connections from a probe in the client
  namespace, from connect() to the first byte of the answer to a small GET (for the relays
  this includes everything they do to reach the server: the front accepts at once).

    python benchmarks/chain_bench.py [--quick] [--rounds N] [--seconds S]

Writes benchmarks/results/chain.json, chain.md and chain.png. Needs root. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT))
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402
    RESULTS_DIR,
    SERIES_COLORS,
    BarPanel,
    Progress,
    clean_for_json,
    format_number,
    markdown_table,
    median,
    parse_iperf3,
    plot_bar_panels,
    process_tree_cpu_s,
    ratio,
    tool_versions,
    write_json,
)

from serval.control import ControlClient  # noqa: E402
from serval.core.ids import ServiceID  # noqa: E402
from serval.errors import ServalError  # noqa: E402
from serval.topology import (  # noqa: E402
    Host,
    LanSpec,
    LinkSpec,
    Topology,
    TopologySpec,
    cleanup_stale,
    sigterm_as_exit,
)

TOPOLOGY_PREFIX = "svcb"
CONTENDERS = ("direct", "haproxy", "serval", "serval-handshake")
DEFAULT_CONTENDERS = ("direct", "haproxy", "serval")
SERVAL_CONTENDERS = ("serval", "serval-handshake")
CONTENDER_LABELS = {
    "direct": "direct TCP (routed)",
    "haproxy": "HAProxy pair",
    "serval": "appliance pair (Serval)",
    "serval-handshake": "appliance pair, handshake mode",
}
CONTENDER_COLORS = dict(zip(CONTENDERS, (SERIES_COLORS[2], SERIES_COLORS[1], SERIES_COLORS[0],
                                         SERIES_COLORS[4]), strict=True))
HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"
IPERF3 = "/usr/bin/iperf3"
WRK = "/usr/bin/wrk"

DC_LAN = "dc"
CLIENT_LINK = "client-front"
IPERF_PORT = 5201
NGINX_PORT = 8080
# Listening ports on `front` (and, for HAProxy, on `server`): workload -> port.
SERVAL_PORTS = {"iperf": 15201, "web": 18080}
SERVAL_HANDSHAKE_PORTS = {"iperf": 16201, "web": 19080}
HAPROXY_FRONT_PORTS = {"iperf": 25201, "web": 28080}
HAPROXY_BACK_PORTS = {"iperf": 35201, "web": 38080}
LEGACY_PORTS = {"iperf": IPERF_PORT, "web": NGINX_PORT}
SERVICES = {"iperf": "iperf.bench", "web": "web.bench"}
SMALL_OBJECT = "/small.html"
SMALL_OBJECT_BYTES = 128
DOMAIN_KEY = "b3f1c2d4e5a6978812233445566778899aabbccddeeff00112233445566778"

DEFAULT_ROUNDS = 5
DEFAULT_SECONDS = 5.0
QUICK_ROUNDS = 2
QUICK_SECONDS = 2.0
DEFAULT_LATENCY_PROBES = 200
QUICK_LATENCY_PROBES = 60
CONCURRENCY_LEVELS = (1, 50)
BYTES_PER_GB = 1e9

READY_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
IPERF_GRACE_S = 15.0
IPERF_CONNECT_TIMEOUT_MS = 5000
WRK_GRACE_S = 20.0
WRK_TIMEOUT = "5s"  # per request; a connect that hangs longer counts as a wrk timeout error
PROBE_TIMEOUT_S = 5.0
PROBE_BUDGET_S = 60.0  # per latency measurement, whatever the probe count
STOP_TIMEOUT_S = 10.0
# Many short connections per second for minutes: without these the client side runs out of
# ephemeral ports (28k, TIME_WAIT 60 s) long before any relay does.
NAMESPACE_SYSCTLS = (("ipv4/ip_local_port_range", "1024 65000"), ("ipv4/tcp_tw_reuse", "1"))


# ---------------------------------------------------------------------------------------------
# options and the built world


@dataclass
class Options:
    rounds: int
    seconds: float
    latency_probes: int
    quick: bool
    workers: int
    warmup: bool
    contenders: list[str]
    output_dir: Path


class RelayDiedError(Exception):
    """A relay (or the service router) exited: waiting any longer is pointless."""


@dataclass
class RelayProcess:
    """One relay process whose CPU (with its children) is charged to a contender."""

    label: str
    process: subprocess.Popen[Any]
    log: Path


@dataclass
class Bench:
    topology: Topology
    work_dir: Path
    options: Options
    relays: dict[str, list[RelayProcess]] = field(default_factory=dict)
    servers: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    router: subprocess.Popen[Any] | None = None

    @property
    def client(self) -> Host:
        return self.topology["client"]

    @property
    def front(self) -> Host:
        return self.topology["front"]

    @property
    def server(self) -> Host:
        return self.topology["server"]

    def target(self, contender: str, workload: str) -> tuple[str, int]:
        """Where the legacy client connects for `workload` through `contender`."""
        if contender == "direct":
            return str(self.server.address(DC_LAN)), LEGACY_PORTS[workload]
        front = str(self.front.address(CLIENT_LINK))
        ports = {"serval": SERVAL_PORTS, "serval-handshake": SERVAL_HANDSHAKE_PORTS,
                 "haproxy": HAPROXY_FRONT_PORTS}[contender]
        return front, ports[workload]

    def relay_cpu_s(self, contender: str) -> dict[str, float]:
        """CPU seconds so far of each relay process of `contender` (children included)."""
        return {relay.label: process_tree_cpu_s(relay.process.pid)
                for relay in self.relays.get(contender, [])}

    def check_alive(self, contender: str) -> None:
        for relay in self.relays.get(contender, []):
            if relay.process.poll() is not None:
                tail = "\n".join(relay.log.read_text(errors="replace").splitlines()[-10:]) \
                    if relay.log.exists() else ""
                raise RelayDiedError(f"{relay.label} exited with {relay.process.returncode}:\n"
                                     f"{tail}")


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    for _ in range(int(timeout_s / POLL_INTERVAL_S) + 2):
        try:
            value = predicate()
        except (OSError, ServalError, RuntimeError) as exc:
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}"
                       + (f" (last error: {last_error})" if last_error else ""))


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def python_env(host: Host) -> dict[str, str]:
    env = host.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def stop_process(process: subprocess.Popen[Any] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------
# building and starting


def build_topology() -> Topology:
    spec = TopologySpec(
        hosts=("client", "srouter", "server"),
        routers=("front",),
        lans=(LanSpec(DC_LAN, ("front", "srouter", "server")),),
        links=(LinkSpec("client", "front", name=CLIENT_LINK),),
        ipv6=False,
    )
    topology = Topology.build(spec, prefix=TOPOLOGY_PREFIX)
    try:
        for host in topology.hosts.values():
            for key, value in NAMESPACE_SYSCTLS:
                host.sysctl(key, value)
    except BaseException:
        topology.close()
        raise
    return topology


NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen {port} backlog=4096;
        root {docroot};
    }}
}}
"""


def start_legacy_servers(bench: Bench) -> None:
    """iperf3 and nginx on `server`, listening on every address (direct reaches them)."""
    start_iperf_server(bench)
    prefix = bench.work_dir / "nginx"
    docroot = bench.work_dir / "docroot"
    (prefix / "tmp").mkdir(parents=True)
    docroot.mkdir()
    (docroot / SMALL_OBJECT.lstrip("/")).write_bytes(b"x" * (SMALL_OBJECT_BYTES - 1) + b"\n")
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=NGINX_PORT, docroot=docroot))
    bench.servers["nginx"] = bench.server.popen(
        [NGINX, "-p", str(prefix), "-c", str(conf)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_for(lambda: bench.server.call(port_open, "127.0.0.1", NGINX_PORT), READY_TIMEOUT_S,
             "nginx")


def start_iperf_server(bench: Bench) -> None:
    stop_process(bench.servers.get("iperf3"))
    with (bench.work_dir / "iperf3-server.log").open("ab") as log:
        bench.servers["iperf3"] = bench.server.popen(
            [IPERF3, "-s", "-p", str(IPERF_PORT)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    wait_for(lambda: bench.server.call(port_open, "127.0.0.1", IPERF_PORT), READY_TIMEOUT_S,
             "the iperf3 server")


def haproxy_config(listeners: dict[str, tuple[tuple[str, int], tuple[str, int]]],
                   threads: int) -> str:
    sections = "".join(
        f"listen {name}\n    bind {bind[0]}:{bind[1]}\n"
        f"    server origin {origin[0]}:{origin[1]}\n"
        for name, (bind, origin) in listeners.items())
    return textwrap.dedent(f"""\
        global
            nbthread {threads}
            maxconn 4096
        defaults
            mode tcp
            timeout connect 5s
            timeout client 300s
            timeout server 300s
            option splice-request
            option splice-response
        """) + sections


def start_haproxy(bench: Bench) -> None:
    server_address = str(bench.server.address(DC_LAN))
    front_address = str(bench.front.address(CLIENT_LINK))
    configs = {
        "front": (bench.front, {w: ((front_address, HAPROXY_FRONT_PORTS[w]),
                                    (server_address, HAPROXY_BACK_PORTS[w]))
                               for w in LEGACY_PORTS}),
        "server": (bench.server, {w: (("0.0.0.0", HAPROXY_BACK_PORTS[w]),
                                      ("127.0.0.1", LEGACY_PORTS[w]))
                                  for w in LEGACY_PORTS}),
    }
    relays: list[RelayProcess] = []
    for name, (host, listeners) in configs.items():
        path = bench.work_dir / f"haproxy-{name}.cfg"
        path.write_text(haproxy_config(listeners, bench.options.workers))
        log = bench.work_dir / f"haproxy-{name}.log"
        with log.open("ab") as handle:
            process = host.popen([HAPROXY, "-db", "-f", str(path)], stdout=handle,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        relays.append(RelayProcess(f"haproxy-{name}", process, log))
    bench.relays["haproxy"] = relays
    for workload in LEGACY_PORTS:
        address, port = bench.target("haproxy", workload)
        back_port = HAPROXY_BACK_PORTS[workload]

        def listening(address: str = address, port: int = port, back_port: int = back_port) \
                -> bool:
            bench.check_alive("haproxy")
            return bool(bench.front.call(port_open, address, port)
                        and bench.server.call(port_open, "127.0.0.1", back_port))

        wait_for(listening, READY_TIMEOUT_S, f"both HAProxies to listen for {workload}")


def start_router(bench: Bench) -> None:
    host = bench.topology["srouter"]
    config = bench.work_dir / "srouter.yaml"
    config.write_text(yaml.safe_dump({"router": True, "domain_key": DOMAIN_KEY,
                                      "log_format": "json", "log_level": "warning"}))
    with (bench.work_dir / "srouter.log").open("ab") as log:
        bench.router = host.popen(
            [sys.executable, "-m", "serval.host.daemon", "--config", str(config),
             "--control-socket", str(host.control_socket)], env=python_env(host), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def translator_config(bench: Bench, host: Host, run_dir: Path) -> dict[str, Any]:
    return {
        "stack": {"mode": "bundled", "control_socket": str(host.control_socket),
                  "servald": {"routers": [str(bench.topology["srouter"].address(DC_LAN))],
                              "domain_key": DOMAIN_KEY, "log_level": "warning"}},
        # HAProxy logs nothing here (no `log` line); the translator's canonical line per
        # connection is an info message, so both run without per-connection logging.
        "logging": {"format": "json", "level": "warning"},
        "metrics": {"address": None},
        "status": {"socket": str(run_dir / "status.sock")},
        "relay": {"workers": bench.options.workers},
        "drain": {"timeout_s": 2},
        "runtime_dir": str(run_dir),
    }


def start_translator(bench: Bench, host: Host, name: str,
                     config: dict[str, Any]) -> RelayProcess:
    path = bench.work_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = bench.work_dir / f"{name}.log"
    with log.open("ab") as handle:
        process = host.popen([sys.executable, "-m", "translator", "run", "--config", str(path)],
                             env=python_env(host), stdout=handle, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    return RelayProcess(name, process, log)


def start_serval(bench: Bench) -> None:
    start_router(bench)
    exporter_config = translator_config(bench, bench.server, bench.work_dir / "exporter-run")
    exporter_config["exporters"] = [
        {"name": workload, "service": SERVICES[workload],
         "target": f"127.0.0.1:{LEGACY_PORTS[workload]}"} for workload in LEGACY_PORTS]
    front_config = translator_config(bench, bench.front, bench.work_dir / "front-run")
    front_address = str(bench.front.address(CLIENT_LINK))
    # One listener per workload and establishment mode: the default (servald's, repair) and,
    # for the serval-handshake contender, the SAL handshake followed by a kernel TCP connect.
    front_config["listeners"] = [
        {"name": workload, "address": front_address, "port": SERVAL_PORTS[workload],
         "service": SERVICES[workload]} for workload in LEGACY_PORTS] + [
        {"name": f"{workload}-handshake", "address": front_address,
         "port": SERVAL_HANDSHAKE_PORTS[workload], "service": SERVICES[workload],
         "mode": "handshake"} for workload in LEGACY_PORTS]
    relays = [
        start_translator(bench, bench.front, "translator-front", front_config),
        start_translator(bench, bench.server, "translator-exporter", exporter_config),
    ]
    for contender in SERVAL_CONTENDERS:  # the same two processes serve both
        bench.relays[contender] = relays
    wanted = {str(ServiceID.from_name(name)) for name in SERVICES.values()}
    router_socket = str(bench.topology["srouter"].control_socket)

    def registered() -> bool:
        bench.check_alive("serval")
        if bench.router is not None and bench.router.poll() is not None:
            raise RelayDiedError(f"the service router exited with {bench.router.returncode}")
        with ControlClient(router_socket, reply_timeout_s=5.0) as client:
            records = client.request("registrations").message.get("registrations") or []
        return wanted <= {str(record["service"]) for record in records}

    wait_for(registered, READY_TIMEOUT_S, "the exporter's services to register")
    for contender in SERVAL_CONTENDERS:
        for workload in LEGACY_PORTS:
            address, port = bench.target(contender, workload)

            def listening(address: str = address, port: int = port) -> bool:
                bench.check_alive("serval")
                return bool(bench.client.call(port_open, address, port))

            wait_for(listening, READY_TIMEOUT_S, f"the front translator on {address}:{port}")


def servald_pids(relay: RelayProcess) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(relay.process.pid).children(True)
                if any("serval.host.daemon" in part for part in child.cmdline())]
    return []


# ---------------------------------------------------------------------------------------------
# the measurements


def cpu_split(bench: Bench, contender: str) -> dict[str, float]:
    """Per process CPU seconds; for serval each translator and its servald separately."""
    split: dict[str, float] = {}
    for relay in bench.relays.get(contender, []):
        total = process_tree_cpu_s(relay.process.pid)
        servald = sum(process_tree_cpu_s(pid) for pid in servald_pids(relay))
        if contender in SERVAL_CONTENDERS:
            split[f"{relay.label}"] = total - servald
            split[f"{relay.label}-servald"] = servald
        else:
            split[relay.label] = total
    return split


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}


def measure_bulk(bench: Bench, contender: str, seconds: float) -> dict[str, Any]:
    sample: dict[str, Any] = {"workload": "bulk", "contender": contender,
                              "gbit_s": float("nan"), "bytes": 0,
                              "relay_cpu_s": float("nan"), "relay_cpu_s_per_gb": float("nan"),
                              "error": None}
    address, port = bench.target(contender, "iperf")
    bench.check_alive(contender)
    before = cpu_split(bench, contender)
    argv = [IPERF3, "-c", address, "-p", str(port), "-t", f"{seconds:g}", "-J",
            "--connect-timeout", str(IPERF_CONNECT_TIMEOUT_MS)]
    try:
        result = bench.client.run(argv, check=False, timeout=seconds + IPERF_GRACE_S)
    except subprocess.TimeoutExpired:
        sample["error"] = f"iperf3 did not finish within {seconds + IPERF_GRACE_S:g} s"
        start_iperf_server(bench)
        return sample
    split = cpu_delta(before, cpu_split(bench, contender))
    iperf = parse_iperf3(result)
    if iperf.error is not None:
        sample["error"] = iperf.error
        start_iperf_server(bench)  # a failed test can leave the server wedged
        return sample
    sample["gbit_s"] = iperf.gbit_s
    sample["bytes"] = iperf.bytes
    sample["retransmits"] = iperf.retransmits
    if contender != "direct":
        sample["relay_cpu_split_s"] = split
        sample["relay_cpu_s"] = sum(split.values())
        if sample["bytes"]:
            sample["relay_cpu_s_per_gb"] = sample["relay_cpu_s"] / (sample["bytes"] / BYTES_PER_GB)
    return sample


_WRK_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_wrk(text: str) -> dict[str, Any]:
    """The numbers of wrk's text report (requests, rate, errors, latency percentiles)."""
    parsed: dict[str, Any] = {}
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if match:
        parsed["requests"] = int(match.group(1))
        parsed["duration_s"] = float(match.group(2)) * _WRK_DURATION_UNITS[match.group(3)]
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if match:
        parsed["requests_per_s"] = float(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      text)
    parsed["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                       (int(g) for g in match.groups()), strict=True)) \
        if match else {}
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    parsed["non_2xx"] = int(match.group(1)) if match else 0
    for percentile in ("50", "99"):
        match = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        if match:
            parsed[f"latency_p{percentile}_ms"] = (
                float(match.group(1)) * _WRK_DURATION_UNITS[match.group(2)] * 1000)
    return parsed


def measure_cps(bench: Bench, contender: str, concurrency: int,
                seconds: float) -> dict[str, Any]:
    sample: dict[str, Any] = {"workload": f"cps{concurrency}", "contender": contender,
                              "concurrency": concurrency, "conn_per_s": float("nan"),
                              "relay_cpu_us_per_conn": float("nan"), "error": None}
    address, port = bench.target(contender, "web")
    bench.check_alive(contender)
    threads = min(concurrency, max(1, bench.options.workers))
    argv = [WRK, f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
            "--timeout", WRK_TIMEOUT, "-H", "Connection: close",
            f"http://{address}:{port}{SMALL_OBJECT}"]
    before = cpu_split(bench, contender)
    try:
        result = bench.client.run(argv, check=False, timeout=seconds + WRK_GRACE_S)
    except subprocess.TimeoutExpired:
        sample["error"] = f"wrk did not finish within {seconds + WRK_GRACE_S:g} s"
        return sample
    split = cpu_delta(before, cpu_split(bench, contender))
    parsed = parse_wrk(result.stdout)
    sample["wrk"] = parsed
    if result.returncode != 0 or "requests_per_s" not in parsed:
        sample["error"] = f"wrk exit {result.returncode}: {(result.stderr or result.stdout)[-300:]}"
        return sample
    errors = sum(parsed["socket_errors"].values()) + parsed["non_2xx"]
    good = parsed["requests"] - parsed["non_2xx"]
    sample["errors"] = errors
    sample["conn_per_s"] = good / parsed["duration_s"] if parsed["duration_s"] else float("nan")
    if good == 0:
        sample["error"] = f"no successful request ({parsed['socket_errors']})"
    if contender != "direct":
        sample["relay_cpu_split_s"] = split
        sample["relay_cpu_s"] = sum(split.values())
        if good:
            sample["relay_cpu_us_per_conn"] = sample["relay_cpu_s"] / good * 1e6
    return sample


def probe_latency(address: str, port: int, count: int, budget_s: float) -> dict[str, Any]:
    """Sequential fresh connections (run inside the client namespace): seconds from connect()
    to the first byte of the answer, and to connect() returning."""
    request = (f"GET {SMALL_OBJECT} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
               .encode())
    first_byte: list[float] = []
    connected: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + budget_s
    for _ in range(count):
        if time.monotonic() >= deadline:
            errors.append("probe budget exhausted")
            break
        started = time.perf_counter()
        try:
            with socket.create_connection((address, port), timeout=PROBE_TIMEOUT_S) as sock:
                connect_done = time.perf_counter()
                sock.sendall(request)
                if not sock.recv(65536):
                    raise ConnectionError("closed before answering")
                answered = time.perf_counter()
                for _ in range(64):  # a small object: a few reads at most
                    if not sock.recv(65536):
                        break
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        connected.append(connect_done - started)
        first_byte.append(answered - started)
    return {"first_byte_s": first_byte, "connect_s": connected, "errors": errors}


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def measure_latency(bench: Bench, contender: str, count: int) -> dict[str, Any]:
    address, port = bench.target(contender, "web")
    bench.check_alive(contender)
    probe = bench.client.call(probe_latency, address, port, count, PROBE_BUDGET_S)
    return {"workload": "latency", "contender": contender, "probes": count,
            "first_byte_s": probe["first_byte_s"], "connect_s": probe["connect_s"],
            "p50_ms": 1000 * percentile(probe["first_byte_s"], 0.50),
            "p99_ms": 1000 * percentile(probe["first_byte_s"], 0.99),
            "errors": probe["errors"][:10], "error_count": len(probe["errors"]),
            "error": f"{len(probe['errors'])} failed probes" if probe["errors"] else None}


# ---------------------------------------------------------------------------------------------
# summary and output


def summarize(samples: list[dict[str, Any]], contenders: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for contender in contenders:
        mine = [s for s in samples if s["contender"] == contender]

        def values(workload: str, key: str, mine: list[dict[str, Any]] = mine) -> list[float]:
            return [s[key] for s in mine if s["workload"] == workload and not s.get("error")]

        latencies = [v for s in mine if s["workload"] == "latency" for v in s["first_byte_s"]]
        entry: dict[str, Any] = {
            "gbit_s": median(values("bulk", "gbit_s")),
            "gbit_s_range": _range(values("bulk", "gbit_s")),
            "relay_cpu_s_per_gb": median(values("bulk", "relay_cpu_s_per_gb")),
            "latency_p50_ms": 1000 * percentile(latencies, 0.50),
            "latency_p99_ms": 1000 * percentile(latencies, 0.99),
            "latency_samples": len(latencies),
            "failed_runs": sum(1 for s in mine if s.get("error")),
        }
        for concurrency in CONCURRENCY_LEVELS:
            workload = f"cps{concurrency}"
            entry[f"conn_per_s_{concurrency}"] = median(values(workload, "conn_per_s"))
            entry[f"conn_per_s_{concurrency}_range"] = _range(values(workload, "conn_per_s"))
            entry[f"relay_cpu_us_per_conn_{concurrency}"] = median(
                values(workload, "relay_cpu_us_per_conn"))
            entry[f"errors_{concurrency}"] = sum(s.get("errors", 0) for s in mine
                                                 if s["workload"] == workload)
        summary[contender] = entry
    return summary


def _range(values: Sequence[float]) -> tuple[float, float]:
    clean = [v for v in values if v == v]
    return (min(clean), max(clean)) if clean else (float("nan"), float("nan"))


def render_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    summary: dict[str, dict[str, Any]] = result["summary"]
    contenders = [c for c in CONTENDERS if c in summary]
    haproxy = summary.get("haproxy")
    lines = [
        "# Full-chain benchmark (issue 6)",
        "",
        f"Run {result['started']} on {config['machine']}, kernel {config['kernel']}, "
        f"{config['cpus']} CPUs{' (--quick)' if config['quick'] else ''}. Chain: legacy client "
        "→ front → server (legacy servers on the server host). "
        f"{config['rounds']} interleaved rounds; bulk: one iperf3 stream for "
        f"{config['seconds']:g} s; connections/s: wrk, `Connection: close`, "
        f"{SMALL_OBJECT_BYTES}-byte object from nginx, {config['seconds']:g} s per level; "
        f"latency: {config['latency_probes']} sequential fresh connections per round, connect() "
        "to first byte of the answer. Medians over rounds; latency percentiles over all probes. "
        f"Relay threads: translator relay.workers = HAProxy nbthread = {config['workers']}. "
        f"Load average at the start: {config['loadavg_start']}.",
        "",
    ]
    headers = ["path", "bulk Gbit/s", "relay CPU s/GB", "conn/s (1 client)",
               "conn/s (50 clients)", "relay CPU µs/conn (50)", "latency p50 ms",
               "latency p99 ms", "failed runs"]
    rows = []
    for contender in contenders:
        entry = summary[contender]
        rows.append([
            CONTENDER_LABELS[contender],
            format_number(entry["gbit_s"], 2),
            format_number(entry["relay_cpu_s_per_gb"], 3),
            format_number(entry["conn_per_s_1"], 0),
            format_number(entry["conn_per_s_50"], 0),
            format_number(entry["relay_cpu_us_per_conn_50"], 0),
            format_number(entry["latency_p50_ms"], 2),
            format_number(entry["latency_p99_ms"], 2),
            str(entry["failed_runs"]),
        ])
    lines.append(markdown_table(headers, rows))
    if haproxy is not None and "serval" in summary:
        serval = summary["serval"]
        lines += [
            "Appliance pair relative to the HAProxy pair (same run): bulk "
            f"{format_number(ratio(serval['gbit_s'], haproxy['gbit_s']), 2, 'x')}, relay CPU/GB "
            f"{format_number(ratio(serval['relay_cpu_s_per_gb'], haproxy['relay_cpu_s_per_gb']), 2, 'x')}, "  # noqa: E501
            f"conn/s at 1 client "
            f"{format_number(ratio(serval['conn_per_s_1'], haproxy['conn_per_s_1']), 2, 'x')}, "
            f"at 50 clients "
            f"{format_number(ratio(serval['conn_per_s_50'], haproxy['conn_per_s_50']), 2, 'x')}, "
            f"latency p50 "
            f"{format_number(ratio(serval['latency_p50_ms'], haproxy['latency_p50_ms']), 2, 'x')}.",
            "",
        ]
    lines += [
        "Ranges over rounds (min–max): " + "; ".join(
            f"{CONTENDER_LABELS[c]}: bulk {format_number(summary[c]['gbit_s_range'][0], 2)}–"
            f"{format_number(summary[c]['gbit_s_range'][1], 2)} Gbit/s, conn/s@50 "
            f"{format_number(summary[c]['conn_per_s_50_range'][0], 0)}–"
            f"{format_number(summary[c]['conn_per_s_50_range'][1], 0)}"
            for c in contenders) + ".",
        "",
        "How to read it:",
        "",
        "- *relay CPU* counts both relay processes of a path with their children: for the "
        "appliance pair each serval-translator and its bundled servald (split per process in "
        "the JSON), for HAProxy both haproxy processes. Direct has no relay. It includes the "
        "kernel's TCP work done inside the relays' system calls.",
        "- On the Serval path the client's TCP connect completes at the front appliance at once; "
        "the Serval connection (SAL SYN through the router, SYN-ACK direct, TCP_REPAIR sockets) "
        "and the exporter's connect to the server happen before the first answer byte, which is "
        "why latency is measured to the first byte.",
        "- Both relays run without per-connection logging (HAProxy has no `log` line; the "
        "translator at level warning). Namespaces use ip_local_port_range 1024–65000 and "
        "tcp_tw_reuse=1, so ephemeral ports are never the limit.",
        "- Everything shares the machine's CPUs (clients, relays, servers): absolute numbers vary "
        "between runs; compare paths within one run.",
    ]
    if result.get("aborted"):
        lines += ["", f"**Incomplete run**: {result['aborted']}"]
    errors = [s for s in result["samples"] if s.get("error")]
    if errors:
        lines += ["", "Failed runs:", ""]
        lines += [f"- round {s.get('round')}, {s['contender']} {s['workload']}: {s['error']}"
                  for s in errors[:20]]
    return "\n".join(lines) + "\n"


def render_plot(path: Path, result: dict[str, Any]) -> bool:
    summary: dict[str, dict[str, Any]] = result["summary"]
    contenders = [c for c in CONTENDERS if c in summary]
    labels = [CONTENDER_LABELS[c] for c in contenders]
    colors = {CONTENDER_LABELS[c]: CONTENDER_COLORS[c] for c in contenders}

    def value(contender: str, key: str) -> float:
        raw = summary[contender].get(key)
        return float("nan") if raw is None else float(raw)

    def panel(title: str, unit: str, groups: list[str], keys: list[str]) -> BarPanel:
        return BarPanel(title, unit, groups, labels,
                        {CONTENDER_LABELS[c]: [value(c, k) for k in keys] for c in contenders},
                        colors=colors)

    panels = [
        panel("Bulk throughput", "Gbit/s", ["iperf3, 1 stream"], ["gbit_s"]),
        panel("Relay CPU per GB (both relays)", "CPU s / GB", ["bulk"], ["relay_cpu_s_per_gb"]),
        panel("New connections per second", "connections/s", ["1 client", "50 clients"],
              ["conn_per_s_1", "conn_per_s_50"]),
        panel("Connection latency (to first byte)", "ms", ["p50", "p99"],
              ["latency_p50_ms", "latency_p99_ms"]),
    ]
    return plot_bar_panels(path, panels, title="legacy client → relay pair → legacy server: "
                           "direct vs HAProxy vs the Serval appliances")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROUNDS} rounds of {QUICK_SECONDS:g} s runs, "
                             f"{QUICK_LATENCY_PROBES} latency probes, no warm-up: ~1.5 min")
    parser.add_argument("--rounds", type=int, help=f"default {DEFAULT_ROUNDS}")
    parser.add_argument("--seconds", type=float,
                        help=f"per bulk and per wrk run (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--latency-probes", type=int,
                        help=f"fresh connections per latency run (default "
                             f"{DEFAULT_LATENCY_PROBES})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="translator relay workers = HAProxy nbthread (default: CPUs)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="an unrecorded short run per contender first (default: on "
                             "unless --quick)")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                        help=f"comma-separated, from {','.join(CONTENDERS)} (default "
                             f"{','.join(DEFAULT_CONTENDERS)})")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown or not contenders:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    probes = args.latency_probes or (QUICK_LATENCY_PROBES if args.quick
                                     else DEFAULT_LATENCY_PROBES)
    if not (1 <= rounds <= 50 and 1 <= seconds <= 120 and 1 <= probes <= 10_000):
        parser.error("--rounds 1..50, --seconds 1..120, --latency-probes 1..10000")
    return Options(rounds=rounds, seconds=seconds, latency_probes=probes, quick=args.quick,
                   workers=max(1, args.workers),
                   warmup=args.warmup if args.warmup is not None else not args.quick,
                   contenders=[c for c in CONTENDERS if c in contenders],
                   output_dir=args.output_dir)


def check_prerequisites(options: Options) -> None:
    if os.geteuid() != 0:
        raise SystemExit("chain_bench.py needs root (network namespaces)")
    needed = [IPERF3, WRK, NGINX] + ([HAPROXY] if "haproxy" in options.contenders else [])
    missing = [tool for tool in needed if not Path(tool).exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} (scripts/install-deps.sh)")



def run_round(bench: Bench, round_index: int, progress: Progress,
              samples: list[dict[str, Any]]) -> None:
    options = bench.options
    contenders = options.contenders
    shift = round_index % len(contenders)
    order = contenders[shift:] + contenders[:shift]
    workloads: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
        ("bulk", lambda c: measure_bulk(bench, c, options.seconds)),
        *((f"{n} conn/s", lambda c, n=n: measure_cps(bench, c, n, options.seconds))
          for n in CONCURRENCY_LEVELS),
        ("latency", lambda c: measure_latency(bench, c, options.latency_probes)),
    ]
    for name, measure in workloads:
        for contender in order:
            progress.step(f"round {round_index + 1}/{options.rounds}: {name}, "
                          f"{CONTENDER_LABELS[contender]}")
            try:
                sample = measure(contender)
            except (OSError, RuntimeError, RelayDiedError, subprocess.SubprocessError) as exc:
                sample = {"workload": name.split()[0], "contender": contender,
                          "error": f"{type(exc).__name__}: {exc}"}
            sample["round"] = round_index + 1
            samples.append(sample)
            progress.note(describe_sample(sample))


def describe_sample(sample: dict[str, Any]) -> str:
    workload = sample["workload"]
    if workload == "bulk" and not sample.get("error"):
        text = f"{sample['gbit_s']:.2f} Gbit/s"
        if sample["contender"] != "direct":
            text += f", relay CPU {format_number(sample['relay_cpu_s_per_gb'], 3)} s/GB"
        return text
    if workload.startswith("cps") and "conn_per_s" in sample and sample["conn_per_s"] == \
            sample["conn_per_s"]:
        text = f"{sample['conn_per_s']:.0f} conn/s, {sample.get('errors', 0)} errors"
        if sample["contender"] != "direct":
            text += f", relay CPU {format_number(sample['relay_cpu_us_per_conn'], 0)} µs/conn"
        return text + (f"  ({sample['error']})" if sample.get("error") else "")
    if workload == "latency" and "p50_ms" in sample:
        return (f"p50 {format_number(sample['p50_ms'], 2)} ms, p99 "
                f"{format_number(sample['p99_ms'], 2)} ms"
                + (f"  ({sample['error']})" if sample.get("error") else ""))
    return f"FAILED: {sample.get('error')}"


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    check_prerequisites(options)
    cleanup_stale(TOPOLOGY_PREFIX)
    per_round = len(options.contenders) * (2 + len(CONCURRENCY_LEVELS))
    progress = Progress(1 + (len(options.contenders) if options.warmup else 0)
                        + options.rounds * per_round + 1)
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S")
    loadavg_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    work_dir = Path(tempfile.mkdtemp(prefix="chain-bench-"))
    samples: list[dict[str, Any]] = []
    failure: str | None = None
    exit_code = 0
    bench: Bench | None = None
    try:
        with sigterm_as_exit():
            progress.step("building the topology, starting servers and relays")
            bench = Bench(build_topology(), work_dir, options)
            start_legacy_servers(bench)
            if "haproxy" in options.contenders:
                start_haproxy(bench)
            if set(SERVAL_CONTENDERS) & set(options.contenders):
                start_serval(bench)
            if options.warmup:
                for contender in options.contenders:
                    progress.step(f"warm-up {CONTENDER_LABELS[contender]} (unrecorded)")
                    measure_bulk(bench, contender, 1.0)
                    measure_cps(bench, contender, 10, 1.0)
            for round_index in range(options.rounds):
                run_round(bench, round_index, progress, samples)
    except (KeyboardInterrupt, SystemExit) as stop:
        print("interrupted: cleaning up and writing what was measured", file=sys.stderr)
        failure = "interrupted"
        exit_code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) \
            else 130
    except Exception as error:  # still clean up and write what was measured, then fail
        traceback.print_exc()
        failure = f"{type(error).__name__}: {error}"
        exit_code = 1
    finally:
        if bench is not None:
            for relays in bench.relays.values():
                for relay in relays:
                    stop_process(relay.process)
            with contextlib.suppress(Exception):
                bench.topology.close()
        shutil.rmtree(work_dir, ignore_errors=True)

    progress.step("writing results")
    result: dict[str, Any] = {
        "benchmark": "chain",
        "started": started_wall,
        "config": {
            "rounds": options.rounds, "seconds": options.seconds,
            "latency_probes": options.latency_probes, "quick": options.quick,
            "workers": options.workers, "contenders": options.contenders,
            "small_object_bytes": SMALL_OBJECT_BYTES, "machine": platform.node(),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_start": loadavg_start,
            "loadavg_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "tools": tool_versions({"haproxy": [HAPROXY, "-v"], "iperf3": [IPERF3, "--version"],
                                    "nginx": [NGINX, "-v"], "wrk": [WRK, "--version"]}),
        },
        "aborted": failure,
        "summary": summarize(samples, options.contenders),
        "samples": samples,
    }
    options.output_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    (options.output_dir / "chain.md").write_text(markdown)
    plotted = render_plot(options.output_dir / "chain.png", result)
    # Raw latency samples are kept in the JSON, rounded to microseconds.
    for sample in samples:
        for key in ("first_byte_s", "connect_s"):
            if key in sample:
                sample[key] = [round(v, 6) for v in sample[key]]
    write_json(options.output_dir / "chain.json", clean_for_json(result))
    print(markdown)
    written = ["chain.json", "chain.md"] + (["chain.png"] if plotted else [])
    print(f"wrote {', '.join(str(options.output_dir / name) for name in written)}",
          file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
