"""`make demo`: the appliance in front of a small Serval datacenter, with real processes.

Topology (serval/topology.py; every host its own network namespace)::

    client ---- appliance ===== dc LAN =====  router
                                  ||  ||  ||
                              inst1  inst2  inst3     (each: nginx behind an exporter)

- ``client``: a legacy host. It can reach the appliance only (curl, plain sockets);
- ``appliance``: ``serval-translator`` with its bundled servald; TCP port 80 -> web.example;
- ``router``: a servald in router mode: resolves the first packet of every connection by
  weighted anycast among the registered instances;
- ``inst1..3``: an unmodified nginx on 127.0.0.1:8080 and ``serval-translator`` exporting it as
  web.example with weights 1:2:1 (bundled servald, registered with the router).

Steps: curl through the appliance; an instance host moved to a new address during a long
download that must arrive intact (servald moves the flow, both appliances' relays park, swap and
resume; the step says plainly why it is skipped when servald cannot migrate, i.e. no
TCP_REPAIR, or SERVAL_MIGRATION=0 opts the appliances out); the load spread by weight (table
and PNG); an instance killed (kill -9 of its servald and exporter) while traffic runs on.
Everything is torn down at the end, whatever happened; the exit status is non-zero when a step
failed.

    python -m serval.demo_netns [--requests N] [--results-dir DIR] [--keep-workdir]

Needs root (network namespaces) and nginx and curl.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil
import yaml

from serval.control import ControlClient
from serval.core.ids import ServiceID
from serval.errors import ServalError, ServalOSError
from serval.topology import (
    NETNS_DIR,
    Host,
    LanSpec,
    LinkSpec,
    Topology,
    TopologySpec,
    cleanup_stale,
)
from serval.topology import sigterm_as_exit as _sigterm_as_exit

SERVICE_NAME = "web.example"
TOPOLOGY_PREFIX = "svdemo"  # namespaces svdemo<hex>-<host>
DC_LAN = "dc"
CLIENT_LINK = "client-appliance"
INSTANCE_WEIGHTS: dict[str, int] = {"inst1": 1, "inst2": 2, "inst3": 1}
VICTIM = "inst2"  # the instance killed in the failure step (the heaviest: the most visible)
APPLIANCE_PORT = 80
NGINX_PORT = 8080
# A real key, as a deployment has: without one servald neither registers nor accepts
# registrations. Fixed here: the demo's domain exists only for the length of one run.
DOMAIN_KEY = "5e7a1d0c9b8f4e3d2c1b0a99887766554433221100ffeeddccbbaa9988776655"
REGISTRATION_REFRESH_S = 0.5
REGISTRATION_LIFETIME_S = 3.0  # the router forgets a silent instance this long after its refresh

DEFAULT_REQUESTS = 400
LOAD_CONCURRENCY = 8
# |observed share - weight share| allowed, in binomial standard deviations: 4.5 sigma makes a
# false alarm about one run in 100,000 per instance, while a router ignoring the weights (1/3
# each) is caught at the default 400 requests.
SPREAD_TOLERANCE_SIGMAS = 4.5
REQUEST_TIMEOUT_S = 10.0
MAX_PAGE_BYTES = 1 << 20
DOWNLOAD_BYTES = 64 << 20
DOWNLOAD_RATE = "12M"  # curl --limit-rate: ~5.6 s for the file, so the move happens mid-way
DOWNLOAD_MOVE_AT_FRACTION = 0.2
DOWNLOAD_TIMEOUT_S = 60.0
CLIENT_TCP_BUFFERS = "4096 65536 262144"  # min default max, bytes

STARTUP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
STOP_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 90.0
KILL_TRAFFIC_BEFORE_S = 2.0
KILL_EXPIRY_WAIT_S = 10.0  # the router must have dropped the victim within this after the kill
KILL_TRAFFIC_AFTER_EXPIRY_S = 3.0
KILL_TRAFFIC_CONCURRENCY = 4
SLOW_REQUEST_S = 0.2
REREGISTER_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 15
LOG_LINE_CHARS = 240

STATUS_PASS = "PASS"
STATUS_FAIL = "FAIL"
STATUS_SKIP = "SKIPPED"


class DemoError(ServalError):
    """A demo step could not be carried out or its check failed (the message says which)."""


# --------------------------------------------------------------------------------------------
# output


class Console:
    """Readable progress on a text stream: numbered steps, indented details, a summary."""

    def __init__(self, stream: TextIO, total_steps: int) -> None:
        self.stream = stream
        self.total_steps = total_steps
        self.step_number = 0
        self.started = time.monotonic()

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:5.1f}s"

    def title(self, text: str) -> None:
        self.write(f"\n{text}\n{'=' * len(text)}")

    def step(self, text: str) -> None:
        self.step_number += 1
        self.write(f"\n[{self.step_number}/{self.total_steps} +{self.elapsed()}] {text}")

    def info(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.write(f"    {line}".rstrip())

    def result(self, status: str, text: str) -> None:
        mark = {STATUS_PASS: "ok", STATUS_FAIL: "FAILED", STATUS_SKIP: "skipped"}[status]
        self.write(f"  => {mark}: {text}")

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


@dataclass
class StepOutcome:
    name: str
    status: str
    summary: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small helpers (every loop bounded in count and time)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = POLL_INTERVAL_S) -> Any:
    """Poll `predicate` until it returns something true; DemoError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    for _ in range(int(timeout_s / interval_s) + 2):
        try:
            value = predicate()
        except (OSError, ServalError, ValueError, KeyError) as exc:  # not ready yet
            last_error = exc
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    detail = f" (last error: {last_error})" if last_error is not None else ""
    raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")


def find_program(name: str) -> str | None:
    """On PATH, or in /usr/sbin (where Debian puts nginx, and not on every user's PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " ..."
            for line in text.splitlines()[-lines:]]
    return "\n".join(tail) or "(empty log)"


def python_env(host: Host) -> dict[str, str]:
    """The host's environment, with this source tree importable (works uninstalled too)."""
    env = host.env()
    source_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    env.pop("NOTIFY_SOCKET", None)  # we are not systemd: no sd_notify from the children
    env.pop("WATCHDOG_USEC", None)
    return env


def stop_process(process: subprocess.Popen[Any] | None) -> int | None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit status."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT_S)
    return process.returncode


@dataclass
class Response:
    """One HTTP request made by the legacy client."""

    started: float
    finished: float
    ok: bool
    instance: str | None = None  # from the X-Served-By header nginx adds
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def http_get(address: str, port: int, path: str, timeout_s: float = REQUEST_TIMEOUT_S) -> Response:
    """A plain HTTP/1.1 GET with `Connection: close` from a raw socket (a legacy client)."""
    started = time.monotonic()
    deadline = started + timeout_s
    data = bytearray()
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {SERVICE_NAME}\r\n"
                         "Connection: close\r\n\r\n".encode())
            while len(data) <= MAX_PAGE_BYTES:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return Response(started, time.monotonic(), False, error=f"{type(exc).__name__}: {exc}")
    finished = time.monotonic()
    if not data:
        return Response(started, finished, False,
                        error="empty reply (the appliance closed the connection)")
    head, _, _ = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        return Response(started, finished, False, error=f"bad answer: {lines[0]!r}")
    instance = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("x-served-by:")), None)
    return Response(started, finished, True, instance=instance)


class LoadGenerator:
    """Legacy-client traffic from inside a host: `concurrency` threads, each one GET at a time.

    Stops after `count` requests (if given), when `stop()` is called, or at `deadline_s`,
    whichever comes first.
    """

    def __init__(self, host: Host, address: str, port: int, *, concurrency: int,
                 count: int | None, deadline_s: float, on_progress: Callable[[int], None]
                 | None = None) -> None:
        self._host = host
        self._address = address
        self._port = port
        self._count = count
        self._deadline = time.monotonic() + deadline_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = itertools.count()
        self._on_progress = on_progress
        self.responses: list[Response] = []
        self._threads = [host.thread(self._worker) for _ in range(concurrency)]

    def _worker(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                index = next(self._issued)
            if self._count is not None and index >= self._count:
                return
            response = http_get(self._address, self._port, "/")
            with self._lock:
                self.responses.append(response)
                done = len(self.responses)
            if self._on_progress is not None:
                self._on_progress(done)

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> list[Response]:
        for thread in self._threads:
            thread.result(timeout=max(1.0, self._deadline - time.monotonic())
                          + REQUEST_TIMEOUT_S + 5.0)
        with self._lock:
            return sorted(self.responses, key=lambda r: r.started)


# --------------------------------------------------------------------------------------------
# the processes


NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        add_header X-Served-By {instance} always;
        location / {{ index index.html; }}
    }}
}}
"""


@dataclass
class Instance:
    """One instance host: nginx and the exporter appliance (with its bundled servald)."""

    name: str
    weight: int
    host: Host
    workdir: Path
    nginx: subprocess.Popen[Any] | None = None
    exporter: subprocess.Popen[Any] | None = None

    @property
    def address(self) -> str:
        return str(self.host.address(DC_LAN))


class Demo:
    def __init__(self, options: argparse.Namespace, console: Console, workdir: Path) -> None:
        self.options = options
        self.console = console
        self.workdir = workdir
        self.service = ServiceID.from_name(SERVICE_NAME)
        self.topology: Topology | None = None
        self.instances: dict[str, Instance] = {}
        self.router_process: subprocess.Popen[Any] | None = None
        self.front_process: subprocess.Popen[Any] | None = None
        self.download_file = workdir / "download.bin"
        self.download_sha = ""
        self.victim_killed = False
        self.outcomes: list[StepOutcome] = []

    # -- topology accessors ---------------------------------------------------------------

    @property
    def topo(self) -> Topology:
        if self.topology is None:
            raise DemoError("the topology is not built")
        return self.topology

    @property
    def client(self) -> Host:
        return self.topo["client"]

    @property
    def appliance_address(self) -> str:
        return str(self.topo["appliance"].address(CLIENT_LINK))

    @property
    def router_address(self) -> str:
        return str(self.topo["router"].address(DC_LAN))

    def router_registrations(self) -> dict[str, int]:
        """address -> weight of every instance of web.example the router knows right now."""
        with ControlClient(str(self.topo["router"].control_socket), reply_timeout_s=5.0) as ctl:
            answer = ctl.request("registrations").message
        records = answer.get("registrations") or []
        return {str(r["address"]): int(r["weight"]) for r in records
                if str(r.get("service")) == str(self.service)}

    def instance_by_address(self) -> dict[str, str]:
        return {str(address): inst.name for inst in self.instances.values()
                for address in inst.host.addresses(4)}

    # -- building ---------------------------------------------------------------------------

    def build_topology(self) -> StepOutcome:
        started = time.monotonic()
        names = tuple(INSTANCE_WEIGHTS)
        spec = TopologySpec(
            hosts=("client", "appliance", "router", *names),
            lans=(LanSpec(DC_LAN, ("appliance", "router", *names)),),
            links=(LinkSpec("client", "appliance", name=CLIENT_LINK),),
            ipv6=False,
        )
        self.topology = Topology.build(spec, prefix=TOPOLOGY_PREFIX)
        topo = self.topology
        # Small buffers between the legacy client and the appliance: the rate-limited download
        # then paces the Serval hop too, instead of sitting in tens of MB of autotuned buffers
        # when the instance moves.
        topo["client"].sysctl("ipv4/tcp_rmem", CLIENT_TCP_BUFFERS)
        topo["appliance"].sysctl("ipv4/tcp_wmem", CLIENT_TCP_BUFFERS)
        rows = [("client", str(topo["client"].address(CLIENT_LINK)), "legacy client (curl)"),
                ("appliance", f"{self.appliance_address} / {topo['appliance'].address(DC_LAN)}",
                 f"serval-translator: TCP :{APPLIANCE_PORT} -> {SERVICE_NAME}"),
                ("router", self.router_address, "servald --router (weighted anycast)")]
        rows += [(name, str(topo[name].address(DC_LAN)),
                  f"nginx 127.0.0.1:{NGINX_PORT} behind an exporter, weight {weight}")
                 for name, weight in INSTANCE_WEIGHTS.items()]
        self.console.info(f"namespaces {topo.id}-*: client --link-- appliance ==LAN {DC_LAN}== "
                          f"router, {', '.join(names)}")
        for host, address, role in rows:
            self.console.info(f"  {host:<10} {address:<22} {role}")
        return StepOutcome("topology", STATUS_PASS, f"{len(topo.namespaces)} namespaces",
                           time.monotonic() - started)

    def start_stack(self) -> StepOutcome:
        started = time.monotonic()
        payload = os.urandom(DOWNLOAD_BYTES)
        self.download_file.write_bytes(payload)
        self.download_sha = hashlib.sha256(payload).hexdigest()
        del payload
        self.router_process = self._start_router()
        self.console.info(f"router: servald --router on {self.router_address}")
        for name, weight in INSTANCE_WEIGHTS.items():
            instance = Instance(name, weight, self.topo[name], self.workdir / name)
            instance.workdir.mkdir()
            self._start_nginx(instance)
            self._start_exporter(instance)
            self.instances[name] = instance
        self.console.info(f"instances: nginx + serval-translator (exporter) on "
                          f"{', '.join(self.instances)}")
        self.front_process = self._start_front()
        self.console.info(f"appliance: serval-translator listening on "
                          f"{self.appliance_address}:{APPLIANCE_PORT}")

        expected = {inst.address: inst.weight for inst in self.instances.values()}
        self._wait_processes_alive_until(
            lambda: self.router_registrations() == expected, STARTUP_TIMEOUT_S,
            "all three instances to register with the router")
        self._wait_processes_alive_until(
            lambda: self.client.call(_port_open, self.appliance_address, APPLIANCE_PORT),
            STARTUP_TIMEOUT_S, "the appliance to listen")
        table = ", ".join(f"{self.instance_by_address()[a]}@{a} weight {w}"
                          for a, w in sorted(self.router_registrations().items()))
        self.console.info(f"router table for {SERVICE_NAME}: {table}")
        return StepOutcome("start", STATUS_PASS, "router, 3 exporters and the appliance up",
                           time.monotonic() - started)

    def _wait_processes_alive_until(self, predicate: Callable[[], Any], timeout_s: float,
                                    what: str) -> Any:
        def check() -> Any:
            self.check_processes()
            return predicate()
        try:
            return wait_for(check, timeout_s, what)
        except DemoError:
            self.check_processes()
            raise

    def check_processes(self) -> None:
        """DemoError naming the first of our long-running processes that has exited."""
        processes: list[tuple[str, subprocess.Popen[Any] | None, Path]] = [
            ("router servald", self.router_process, self.workdir / "router.log"),
            ("appliance", self.front_process, self.workdir / "appliance.log")]
        for inst in self.instances.values():
            processes.append((f"{inst.name} nginx", inst.nginx, inst.workdir / "nginx" /
                              "error.log"))
            if inst.name != VICTIM or not self.victim_killed:
                processes.append((f"{inst.name} exporter", inst.exporter,
                                  inst.workdir / "exporter.log"))
        for what, process, log in processes:
            if process is not None and process.poll() is not None:
                raise DemoError(f"{what} exited with status {process.returncode}; its log:\n"
                                f"{log_tail(log)}")

    def _start_router(self) -> subprocess.Popen[Any]:
        host = self.topo["router"]
        config = self.workdir / "router.yaml"
        config.write_text(yaml.safe_dump({"router": True, "domain_key": DOMAIN_KEY,
                                          "log_format": "json"}))
        with (self.workdir / "router.log").open("ab") as log:
            return host.popen([sys.executable, "-m", "serval.host.daemon", "--config",
                               str(config), "--control-socket", str(host.control_socket)],
                              env=python_env(host), stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)

    def _start_nginx(self, instance: Instance) -> None:
        prefix = instance.workdir / "nginx"
        docroot = instance.workdir / "docroot"
        (prefix / "tmp").mkdir(parents=True)
        docroot.mkdir()
        (docroot / "index.html").write_text(
            f"Hello from {instance.name}: unmodified nginx on 127.0.0.1:{NGINX_PORT}, offered "
            f"as Serval service {SERVICE_NAME} from {instance.address}\n")
        (docroot / "download.bin").symlink_to(self.download_file)
        # The workers must read files in our 0700 temp dir: as root, they run as root.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=NGINX_PORT,
                                          docroot=docroot, instance=instance.name))
        instance.nginx = instance.host.popen(
            [find_program("nginx") or "nginx", "-p", str(prefix), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def _translator_config(self, host: Host, run_dir: Path, *,
                           listeners: list[dict[str, Any]] | None = None,
                           exporters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        servald: dict[str, Any] = {
            "routers": [self.router_address],
            "domain_key": DOMAIN_KEY,
            "registration": {"refresh_s": REGISTRATION_REFRESH_S,
                             "lifetime_s": REGISTRATION_LIFETIME_S},
        }
        config: dict[str, Any] = {
            "stack": {"mode": "bundled", "control_socket": str(host.control_socket),
                      "servald": servald},
            "logging": {"format": "json"},
            "metrics": {"address": None},
            "status": {"socket": str(run_dir / "status.sock")},
            "relay": {"workers": 1},
            "drain": {"timeout_s": 2},
            "runtime_dir": str(run_dir),
        }
        if listeners:
            config["listeners"] = listeners
        if exporters:
            config["exporters"] = exporters
        return config

    def _start_translator(self, host: Host, name: str, workdir: Path,
                          config: dict[str, Any]) -> subprocess.Popen[Any]:
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        with (workdir / f"{name}.log").open("ab") as log:
            return host.popen([sys.executable, "-m", "translator", "run", "--config",
                               str(config_path)], env=python_env(host), stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _start_exporter(self, instance: Instance) -> None:
        run_dir = instance.workdir / "run"
        config = self._translator_config(instance.host, run_dir, exporters=[{
            "name": "web-origin", "service": SERVICE_NAME,
            "target": f"127.0.0.1:{NGINX_PORT}", "weight": instance.weight}])
        instance.exporter = self._start_translator(instance.host, "exporter", instance.workdir,
                                                   config)

    def _start_front(self) -> subprocess.Popen[Any]:
        host = self.topo["appliance"]
        config = self._translator_config(host, self.workdir / "appliance-run", listeners=[{
            "name": "web", "address": "0.0.0.0", "port": APPLIANCE_PORT,
            "service": SERVICE_NAME, "connect_timeout_s": 5}])
        return self._start_translator(host, "appliance", self.workdir, config)

    # -- the steps --------------------------------------------------------------------------

    def step_curl(self) -> StepOutcome:
        started = time.monotonic()
        url = f"http://{self.appliance_address}:{APPLIANCE_PORT}/"
        self.console.info(f"client$ curl -sS -i {url}")
        result = self.client.run(["curl", "-sS", "-i", "--max-time", str(int(REQUEST_TIMEOUT_S)),
                                  url], check=False, timeout=REQUEST_TIMEOUT_S + 5)
        lines = [line.rstrip("\r") for line in result.stdout.splitlines()]
        shown = [line for line in lines if line.startswith(("HTTP/", "X-Served-By", "Hello"))]
        for line in shown:
            self.console.info(f"  {line}")
        served_by = next((line.split(":", 1)[1].strip() for line in lines
                          if line.lower().startswith("x-served-by:")), None)
        elapsed = time.monotonic() - started
        if result.returncode != 0 or not lines or " 200 " not in lines[0] + " " \
                or served_by not in self.instances:
            return StepOutcome("curl", STATUS_FAIL,
                               f"curl exit {result.returncode}: {result.stderr.strip()!r}",
                               elapsed)
        return StepOutcome("curl", STATUS_PASS, f"200 OK, served by {served_by}", elapsed,
                           {"served_by": served_by})

    def step_spread(self) -> StepOutcome:
        started = time.monotonic()
        count = self.options.requests
        self.console.info(f"{count} requests from the client, {LOAD_CONCURRENCY} at a time, "
                          f"each a new TCP connection (Connection: close)")
        marks = {count * k // 4 for k in range(1, 5)}

        def progress(done: int) -> None:
            if done in marks:
                self.console.info(f"  ... {done}/{count}")

        load = LoadGenerator(self.client, self.appliance_address, APPLIANCE_PORT,
                             concurrency=LOAD_CONCURRENCY, count=count,
                             deadline_s=LOAD_TIMEOUT_S, on_progress=progress)
        responses = load.join()
        elapsed = time.monotonic() - started
        served = Counter(r.instance for r in responses if r.ok)
        failed = [r for r in responses if not r.ok]
        total_weight = sum(INSTANCE_WEIGHTS.values())
        ok_count = len(responses) - len(failed)
        rows: list[dict[str, Any]] = []
        off_by: list[str] = []
        worst_sigmas = 0.0
        for name, weight in INSTANCE_WEIGHTS.items():
            expected = weight / total_weight
            share = served[name] / ok_count if ok_count else 0.0
            sigma = math.sqrt(expected * (1 - expected) / max(1, ok_count))
            sigmas = abs(share - expected) / sigma
            worst_sigmas = max(worst_sigmas, sigmas)
            if sigmas > SPREAD_TOLERANCE_SIGMAS:
                off_by.append(f"{name} {share:.1%} instead of {expected:.0%}")
            rows.append({"instance": name, "weight": weight, "expected_share": expected,
                         "requests": served[name], "share": share, "sigmas": sigmas})
        self.console.info("")
        self.console.info(f"  {'instance':<9} {'weight':>6} {'expected':>9} {'served':>7} "
                          f"{'share':>7}")
        for row in rows:
            bar = "#" * round(40 * row["share"])
            self.console.info(f"  {row['instance']:<9} {row['weight']:>6} "
                              f"{row['expected_share']:>9.1%} {row['requests']:>7} "
                              f"{row['share']:>7.1%}  {bar}")
        latencies = sorted(r.seconds for r in responses if r.ok)
        rate = len(responses) / elapsed if elapsed > 0 else 0.0
        if latencies:
            self.console.info(f"  {rate:.0f} requests/s; latency p50 "
                              f"{1000 * latencies[len(latencies) // 2]:.1f} ms, max "
                              f"{1000 * latencies[-1]:.1f} ms")
        plot = self._write_spread_results(rows, count, len(failed))
        self.console.info(plot)
        details = {"rows": rows, "failed": len(failed), "requests": len(responses)}
        if failed or len(responses) != count:
            errors = Counter(r.error for r in failed)
            return StepOutcome("spread", STATUS_FAIL, f"{len(failed)} of {len(responses)} "
                               f"requests failed ({dict(errors)}); {count} were asked for",
                               elapsed, details)
        if off_by:
            return StepOutcome("spread", STATUS_FAIL, f"not spread by weight: {'; '.join(off_by)} "
                               f"(more than {SPREAD_TOLERANCE_SIGMAS:g} standard deviations)",
                               elapsed, details)
        return StepOutcome("spread", STATUS_PASS, f"{ok_count}/{count} served, shares match the "
                           f"weights (largest deviation {worst_sigmas:.1f} standard "
                           "deviations)", elapsed, details)

    def _write_spread_results(self, rows: list[dict[str, Any]], count: int,
                              failed: int) -> str:
        results_dir: Path = self.options.results_dir
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "demo-spread.json").write_text(json.dumps(
            {"service": SERVICE_NAME, "requests": count, "failed": failed, "instances": rows},
            indent=2) + "\n")
        png = results_dir / "demo-spread.png"
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return f"table written to {results_dir / 'demo-spread.json'} (no matplotlib: no PNG)"
        names = [row["instance"] for row in rows]
        positions = list(range(len(rows)))
        figure, axis = plt.subplots(figsize=(6.4, 4.0))
        axis.bar([p - 0.2 for p in positions], [100 * r["expected_share"] for r in rows], 0.4,
                 label="weight share", color="#bbbbbb")
        axis.bar([p + 0.2 for p in positions], [100 * r["share"] for r in rows], 0.4,
                 label="requests served", color="#1f77b4")
        for position, row in zip(positions, rows, strict=True):
            axis.text(position + 0.2, 100 * row["share"] + 0.8, str(row["requests"]),
                      ha="center", fontsize="small")
        axis.set_xticks(positions)
        axis.set_xticklabels([f"{n}\n(weight {r['weight']})" for n, r in
                              zip(names, rows, strict=True)])
        axis.set_ylabel("% of requests")
        axis.set_title(f"{count} requests through the appliance to {SERVICE_NAME}")
        axis.legend()
        axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(png, dpi=100)
        plt.close(figure)
        return f"chart: {png}"

    def step_kill(self) -> StepOutcome:
        started = time.monotonic()
        victim = self.instances[VICTIM]
        pids = self._victim_pids(victim)
        self.console.info(f"traffic runs ({KILL_TRAFFIC_CONCURRENCY} clients in a loop); in "
                          f"{KILL_TRAFFIC_BEFORE_S:g} s: kill -9 {VICTIM}'s exporter and servald "
                          f"(pids {', '.join(str(p) for p in pids)})")
        load = LoadGenerator(self.client, self.appliance_address, APPLIANCE_PORT,
                             concurrency=KILL_TRAFFIC_CONCURRENCY, count=None,
                             deadline_s=KILL_TRAFFIC_BEFORE_S + KILL_EXPIRY_WAIT_S
                             + KILL_TRAFFIC_AFTER_EXPIRY_S + 5.0)
        expired_at: float | None = None
        try:
            time.sleep(KILL_TRAFFIC_BEFORE_S)
            killed_at = time.monotonic()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.victim_killed = True
            self.console.info(f"  killed at +{killed_at - started:.1f} s; the router still "
                              f"lists {VICTIM} until its registration expires")
            victim_address = victim.address
            with contextlib.suppress(DemoError):
                wait_for(lambda: victim_address not in self.router_registrations(),
                         KILL_EXPIRY_WAIT_S, f"the router to drop {VICTIM}")
                expired_at = time.monotonic()
            if expired_at is not None:
                self.console.info(f"  router dropped {VICTIM} {expired_at - killed_at:.1f} s "
                                  "after the kill")
            time.sleep(KILL_TRAFFIC_AFTER_EXPIRY_S)
        finally:
            load.stop()
            responses = load.join()
        elapsed = time.monotonic() - started
        before = [r for r in responses if r.finished < killed_at]
        in_flight = [r for r in responses if r.started < killed_at <= r.finished]
        after = [r for r in responses if r.started >= killed_at]
        after_failed = [r for r in after if not r.ok]
        in_flight_failed = [r for r in in_flight if not r.ok]
        settled = [r for r in after if expired_at is not None and r.started >= expired_at]

        def spread(rs: Sequence[Response]) -> str:
            counts = Counter(r.instance for r in rs if r.ok)
            return " ".join(f"{name}={counts[name]}" for name in INSTANCE_WEIGHTS)

        self.console.info(f"  before the kill:        {len(before):4d} requests   {spread(before)}")
        self.console.info(f"  in flight at the kill:  {len(in_flight):4d} requests   "
                          f"{len(in_flight_failed)} cut off")
        slowest = max((r.seconds for r in after if r.ok), default=0.0)
        slowed = sum(1 for r in after if r.ok and r.seconds > SLOW_REQUEST_S)
        self.console.info(f"  started after the kill: {len(after):4d} requests   {spread(after)}"
                          f"   failed {len(after_failed)}")
        self.console.info(f"  {slowed} of them took over {SLOW_REQUEST_S:g} s (slowest "
                          f"{slowest:.1f} s): their SYN was resolved to the dead {VICTIM}, got "
                          "no answer, and was resolved again on retransmission")
        self.console.info(f"  after the expiry:       {len(settled):4d} requests   "
                          f"{spread(settled)}")
        details = {"before": len(before), "in_flight": len(in_flight),
                   "in_flight_failed": len(in_flight_failed), "after": len(after),
                   "after_failed": len(after_failed), "settled": len(settled),
                   "expiry_s": None if expired_at is None else expired_at - killed_at,
                   "slowed": slowed, "slowest_after_s": slowest}
        victim_after_expiry = sum(1 for r in settled if r.instance == VICTIM)
        if expired_at is None:
            return StepOutcome("kill", STATUS_FAIL, f"the router still lists {VICTIM} "
                               f"{KILL_EXPIRY_WAIT_S:g} s after the kill", elapsed, details)
        if after_failed:
            errors = Counter(r.error for r in after_failed)
            return StepOutcome("kill", STATUS_FAIL, f"{len(after_failed)} of {len(after)} "
                               f"requests after the kill failed: {dict(errors)}", elapsed,
                               details)
        if not after or not settled or victim_after_expiry:
            return StepOutcome("kill", STATUS_FAIL, f"traffic after the kill: {len(after)}, "
                               f"after the expiry: {len(settled)} ({victim_after_expiry} "
                               f"still on {VICTIM})", elapsed, details)
        return StepOutcome("kill", STATUS_PASS, f"all {len(after)} requests after the kill "
                           f"succeeded; {VICTIM} dropped after "
                           f"{expired_at - killed_at:.1f} s", elapsed, details)

    @staticmethod
    def _victim_pids(victim: Instance) -> list[int]:
        if victim.exporter is None or victim.exporter.poll() is not None:
            raise DemoError(f"{victim.name}'s exporter is not running")
        exporter = psutil.Process(victim.exporter.pid)
        servald = [child.pid for child in exporter.children(recursive=True)
                   if any("serval.host.daemon" in part or part.endswith("servald")
                          for part in child.cmdline())]
        if not servald:
            raise DemoError(f"{victim.name}: no servald child of the exporter "
                            f"(pid {exporter.pid}) found")
        return [*servald, exporter.pid]

    def migration_unavailable(self, instance: Instance) -> str | None:
        """Why this servald cannot migrate flows at all, or None when it can (a harmless
        probe: a migrate_flow request for flow 0, which cannot exist)."""
        try:
            with ControlClient(str(instance.host.control_socket), reply_timeout_s=5.0) as ctl:
                ctl.request("migrate_flow", flow=0, to=instance.address)
        except ServalOSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return f"servald answers migrate_flow with EOPNOTSUPP ({exc})"
            return None  # implemented: it rejected our impossible flow
        except ServalError as exc:
            return f"the probe failed: {exc}"
        return None

    @staticmethod
    def watched_flows(host: Host, *, local: str | None = None,
                      remote: str | None = None) -> list[dict[str, Any]]:
        """servald's migratable flows on `host` (their socket handed over with `watch`), by
        local or remote address."""
        with ControlClient(str(host.control_socket), reply_timeout_s=5.0) as ctl:
            flows = ctl.request("flows").message.get("flows") or []
        return [f for f in flows if f.get("watched")
                and (local is None or (f.get("local") or {}).get("address") == local)
                and (remote is None or (f.get("remote") or {}).get("address") == remote)]

    def step_migrate(self) -> StepOutcome:
        started = time.monotonic()
        reason = self.migration_unavailable(next(iter(self.instances.values())))
        if reason is not None:
            self.console.info(f"migration is unavailable in this build: {reason}")
            self.console.info("the long download and the address move are not attempted")
            return StepOutcome("migrate", STATUS_SKIP, "migration unavailable: " + reason,
                               time.monotonic() - started, {"reason": reason})
        out = self.workdir / "download.out"
        headers = self.workdir / "download.headers"
        url = f"http://{self.appliance_address}:{APPLIANCE_PORT}/download.bin"
        self.console.info(f"client$ curl --limit-rate {DOWNLOAD_RATE} -o download.bin {url}  "
                          f"({DOWNLOAD_BYTES >> 20} MiB)")
        download = self.client.popen(
            ["curl", "-sS", "--max-time", str(int(DOWNLOAD_TIMEOUT_S)), "--limit-rate",
             DOWNLOAD_RATE, "-D", str(headers), "-o", str(out), url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        stderr = b""
        moves: list[str] = []
        try:
            def serving() -> str | None:
                if download.poll() is not None:
                    raise DemoError(f"curl ended early with status {download.returncode}")
                for line in headers.read_text(errors="replace").splitlines():
                    if line.lower().startswith("x-served-by:"):
                        return line.split(":", 1)[1].strip()
                return None

            name = wait_for(serving, REQUEST_TIMEOUT_S, "the download's response headers")
            instance = self.instances[name]
            old = instance.address
            wait_for(lambda: out.exists() and out.stat().st_size
                     >= DOWNLOAD_MOVE_AT_FRACTION * DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT_S,
                     f"{DOWNLOAD_MOVE_AT_FRACTION:.0%} of the download")
            # Both ends of the Serval hop must be migratable: servald moves a flow only when
            # the process owning its socket (here each appliance's relay) handed it over with
            # `watch`, so that it can park the relay, swap the socket under it and resume it.
            instance_flows = self.watched_flows(instance.host, local=old)
            appliance_flows = self.watched_flows(self.topo["appliance"], remote=old)
            if not instance_flows or not appliance_flows:
                ends = [end for end, flows in ((f"{name}'s exporter", instance_flows),
                                               ("the front appliance", appliance_flows))
                        if not flows]
                if os.environ.get("SERVAL_MIGRATION", "1") == "0":
                    # The operator opted out: the appliances do not watch their flows.
                    reason = (f"SERVAL_MIGRATION=0: the flow of this download is not watched "
                              f"by {' nor by '.join(ends)}")
                    self.console.info(f"  served by {name}; {reason}")
                    self.console.info(f"  moving {name} now would cut the download: "
                                      f"not attempted")
                    return StepOutcome("migrate", STATUS_SKIP, "migration unavailable: " + reason,
                                       time.monotonic() - started, {"reason": reason})
                # servald can migrate and serval-translator watches every migratable flow.
                raise DemoError(f"the flow of this download is not watched by "
                                f"{' nor by '.join(ends)} although servald can migrate")
            received = out.stat().st_size
            new = str(self.topo.add_address(name, DC_LAN))
            self.console.info(f"  served by {name} (Serval flow {instance_flows[0]['flow']}); at "
                              f"{received >> 20} MiB {name} gets {new} and moves its flows:")
            for flow in instance_flows:
                argv = [sys.executable, "-m", "serval.host.ctl", "migrate", "flow",
                        str(flow["flow"]), "--to", new]
                self.console.info(f"  {name}$ servalctl migrate flow {flow['flow']} --to {new}")
                result = instance.host.run(argv, check=False, env=python_env(instance.host),
                                           timeout=REQUEST_TIMEOUT_S + 5)
                for line in (result.stdout + result.stderr).strip().splitlines():
                    self.console.info(f"    {line}")
                moves.append(f"flow {flow['flow']}: servalctl exit {result.returncode}")
                if result.returncode != 0:
                    raise DemoError(f"servalctl migrate flow {flow['flow']} failed: "
                                    f"{(result.stdout + result.stderr).strip()}")
            self.topo.remove_address(name, old)
            self.console.info(f"  {old} removed from {name}; the download goes on")
            try:
                _, stderr = download.communicate(timeout=DOWNLOAD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                download.kill()
                raise DemoError(f"the download did not finish within "
                                f"{DOWNLOAD_TIMEOUT_S:g} s") from None
        finally:
            if download.poll() is None:
                download.kill()
                download.wait(STOP_TIMEOUT_S)
        size = out.stat().st_size if out.exists() else 0
        digest = sha256_of(out) if out.exists() else "-"
        self.console.info(f"  curl exit {download.returncode}; {size} bytes, sha256 "
                          f"{digest[:16]}... (original {self.download_sha[:16]}...)")
        reregistered = None
        with contextlib.suppress(DemoError):
            reregistered = wait_for(lambda: new in self.router_registrations(),
                                    REREGISTER_TIMEOUT_S, f"{name} to register at {new}")
        self.console.info(f"  router lists {name} at its new address: "
                          f"{'yes' if reregistered else 'no'}")
        elapsed = time.monotonic() - started
        details = {"instance": name, "old": old, "new": new, "bytes": size,
                   "sha256_ok": digest == self.download_sha, "curl_status": download.returncode,
                   "reregistered": bool(reregistered), "moves": moves}
        if download.returncode != 0 or digest != self.download_sha:
            return StepOutcome("migrate", STATUS_FAIL, f"download broken: curl exit "
                               f"{download.returncode} ({stderr.decode().strip()!r}), "
                               f"{size}/{DOWNLOAD_BYTES} bytes, sha256 "
                               f"{'matches' if digest == self.download_sha else 'differs'}",
                               elapsed, details)
        if not reregistered:
            return StepOutcome("migrate", STATUS_FAIL, f"download intact, but {name} did not "
                               f"register at {new} within {REREGISTER_TIMEOUT_S:g} s", elapsed,
                               details)
        return StepOutcome("migrate", STATUS_PASS, f"{DOWNLOAD_BYTES >> 20} MiB intact (sha256 "
                           f"matches) across the move of {name} {old} -> {new}", elapsed,
                           details)

    # -- teardown -----------------------------------------------------------------------------

    def teardown(self) -> StepOutcome:
        started = time.monotonic()
        statuses: dict[str, int | None] = {}
        if self.topology is not None:
            # Gracefully first: the appliances drain and stop their servald themselves.
            statuses["appliance"] = stop_process(self.front_process)
            for inst in self.instances.values():
                if inst.name == VICTIM and self.victim_killed:
                    continue
                statuses[f"{inst.name} exporter"] = stop_process(inst.exporter)
            namespaces = list(self.topology.namespaces)
            self.topology.close()  # kills whatever is left in the namespaces, removes them
            left = [name for name in namespaces if (NETNS_DIR / name).exists()]
        else:
            namespaces, left = [], []
        unclean = {k: v for k, v in statuses.items() if v not in (0, None)}
        self.console.info(f"appliances stopped with SIGTERM: "
                          f"{', '.join(f'{k} exit {v}' for k, v in statuses.items()) or '-'}")
        self.console.info(f"{len(namespaces)} namespaces and every process in them removed; "
                          f"left behind: {', '.join(left) or 'nothing'}")
        elapsed = time.monotonic() - started
        if left or unclean:
            return StepOutcome("cleanup", STATUS_FAIL, f"left behind: {left}; unclean exits "
                               f"{unclean}", elapsed)
        return StepOutcome("cleanup", STATUS_PASS, "nothing left behind", elapsed)

    def failure_logs(self) -> None:
        logs = [("router", self.workdir / "router.log"),
                ("appliance", self.workdir / "appliance.log")]
        logs += [(f"{n} exporter", i.workdir / "exporter.log") for n, i in self.instances.items()]
        for what, path in logs:
            self.console.info(f"--- last lines of the {what} log ({path.name}) ---")
            self.console.info(textwrap.indent(log_tail(path, 8), "  "))


def _port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# main


STEPS: tuple[tuple[str, str], ...] = (
    ("build_topology", "Building the topology (network namespaces, veths, a bridge)"),
    ("start_stack", "Starting the Serval stack: router, nginx + exporters, the appliance"),
    ("step_curl", "curl through the appliance: legacy client -> appliance -> router -> "
                  "exporter -> nginx"),
    # Migration before the load: servald lists completed flows for 30 s, and after hundreds of
    # requests its `flows` answer outgrows the control API's 64 KiB frame (reported).
    ("step_migrate", "Migration: an instance host moves to a new address mid-download"),
    ("step_spread", "Load spread by weight (1:2:1)"),
    ("step_kill", f"Failure: {VICTIM} is killed while traffic runs"),
)



def run(options: argparse.Namespace, stream: TextIO = sys.stdout) -> int:
    console = Console(stream, len(STEPS) + 1)
    console.title("Serval translator appliance: live demo across network namespaces")
    if os.geteuid() != 0:
        console.write("needs root: network namespaces (run it with sudo)")
        return 1
    missing = [tool for tool in ("nginx", "curl", "ip") if find_program(tool) is None]
    if missing:
        console.write(f"missing programs: {', '.join(missing)} (scripts/install-deps.sh)")
        return 1
    cleanup_stale(TOPOLOGY_PREFIX)
    workdir = Path(tempfile.mkdtemp(prefix="serval-demo-"))
    demo = Demo(options, console, workdir)
    failed = False
    try:
        with _sigterm_as_exit():
            for method, title in STEPS:
                console.step(title)
                step_started = time.monotonic()
                try:
                    outcome: StepOutcome = getattr(demo, method)()
                except (DemoError, ServalError, OSError, subprocess.SubprocessError) as exc:
                    outcome = StepOutcome(method.removeprefix("step_"), STATUS_FAIL,
                                          f"{type(exc).__name__}: {exc}",
                                          time.monotonic() - step_started)
                demo.outcomes.append(outcome)
                console.result(outcome.status, outcome.summary)
                if outcome.status == STATUS_FAIL:
                    failed = True
                    if method in ("build_topology", "start_stack"):
                        break  # nothing after this can work
    except KeyboardInterrupt:
        console.write("\ninterrupted: cleaning up")
        failed = True
    finally:
        if failed:
            demo.failure_logs()
        console.step("Cleaning up")
        try:
            outcome = demo.teardown()
        except Exception as exc:  # teardown must report, whatever broke
            outcome = StepOutcome("cleanup", STATUS_FAIL, f"{type(exc).__name__}: {exc}", 0.0)
        demo.outcomes.append(outcome)
        console.result(outcome.status, outcome.summary)
        if options.keep_workdir:
            console.info(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = failed or outcome.status == STATUS_FAIL
    _summary(console, demo.outcomes, options.results_dir)
    return 1 if failed else 0


def _summary(console: Console, outcomes: list[StepOutcome], results_dir: Path) -> None:
    console.write("\nSummary")
    console.write("-------")
    for outcome in outcomes:
        console.write(f"  {outcome.status:<8} {outcome.name:<9} {outcome.seconds:5.1f}s  "
                      f"{outcome.summary}")
    with contextlib.suppress(OSError):
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "demo-steps.json").write_text(
            json.dumps([asdict(o) for o in outcomes], indent=2, default=str) + "\n")
    total = time.monotonic() - console.started
    verdict = "FAILED" if any(o.status == STATUS_FAIL for o in outcomes) else "all good"
    console.write(f"\n{verdict} in {total:.0f} s; results in {results_dir}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serval.demo_netns",
        description="The translator appliance end to end across network namespaces.")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                        help=f"requests of the load-spread step (default {DEFAULT_REQUESTS})")
    parser.add_argument("--results-dir", type=Path, default=Path("build") / "demo",
                        help="where the spread chart and JSON go (default build/demo)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the temporary directory with configs and logs")
    options = parser.parse_args(argv)
    if not 20 <= options.requests <= 100_000:
        parser.error("--requests must be within 20..100000")
    options.results_dir = options.results_dir.resolve()
    return options


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
