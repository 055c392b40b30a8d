"""Helpers for the translator tests: real servers (nginx, a PROXY-header recorder), processes in
topology hosts, and small waiting utilities. Every loop is bounded in count and time."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30.0
DOMAIN_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

Popen = Callable[..., "subprocess.Popen[Any]"]


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the thing we wait for may fail until it is ready
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def python_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    return env


def stop_process(process: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
                 timeout_s: float = 20.0) -> int | None:
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


# --------------------------------------------------------------------------------------------
# nginx


class Nginx:
    """An unmodified nginx with a plain server and a PROXY-protocol server.

    - ``http_port``: serves `docroot` (static files);
    - ``proxy_port``: ``listen ... proxy_protocol``; answers every request with
      ``$proxy_protocol_addr $proxy_protocol_port`` (what it parsed from our header).
    """

    def __init__(self, workdir: Path, http_port: int, proxy_port: int,
                 address: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.prefix = workdir / "nginx"
        self.docroot = workdir / "docroot"
        self.http_port = http_port
        self.proxy_port = proxy_port
        self.address = address
        self.process: subprocess.Popen[Any] | None = None
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.docroot.mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""
        tmp = self.prefix / "tmp"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(textwrap.dedent(f"""\
            {user}
            worker_processes 1;
            daemon off;
            pid {self.prefix}/nginx.pid;
            error_log {self.prefix}/logs/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                client_body_temp_path {tmp}/body;
                proxy_temp_path {tmp}/proxy;
                fastcgi_temp_path {tmp}/fastcgi;
                uwsgi_temp_path {tmp}/uwsgi;
                scgi_temp_path {tmp}/scgi;
                keepalive_requests 100000;
                server {{
                    listen {address}:{http_port};
                    root {self.docroot};
                    location / {{ }}
                }}
                server {{
                    listen {address}:{proxy_port} proxy_protocol;
                    default_type text/plain;
                    location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port\\n"; }}
                }}
            }}
            """))

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    def start(self, popen: Popen = subprocess.Popen,
              probe: Callable[[Callable[[], bool]], bool] | None = None) -> Nginx:
        self.process = popen(["nginx", "-p", str(self.prefix), "-c", str(self.conf)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"nginx exited: {self.error_log()}")
            def check() -> bool:
                return port_open(self.address, self.http_port)

            return probe(check) if probe is not None else check()

        wait_until(up, STARTUP_TIMEOUT_S, "nginx to listen")
        return self

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process, signal.SIGQUIT)


# --------------------------------------------------------------------------------------------
# a PROXY header recorder: a legacy server that writes what it got to a file, then echoes

RECORDER = r"""
import json, socket, sys, threading
sys.path.insert(0, sys.argv[3])
from translator.proxy_protocol import decode_v2
out = open(sys.argv[2], "a", buffering=1)
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(128)
def serve(conn, peer):
    with conn:
        data = b""
        header = None
        conn.settimeout(30)
        try:
            while header is None:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
                header = decode_v2(data)
            record = {"peer": list(peer)}
            if header is not None:
                record.update(command=header.command, source=header.source,
                              destination=header.destination,
                              tlvs={str(k): v.decode("latin-1") for k, v in header.tlvs.items()})
                data = data[header.length:]
            out.write(json.dumps(record) + "\n")
            while True:
                if data:
                    conn.sendall(data)
                data = conn.recv(65536)
                if not data:
                    break
        except Exception as exc:
            out.write(json.dumps({"peer": list(peer), "error": str(exc)}) + "\n")
while True:
    conn, peer = srv.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""


def start_recorder(popen: Popen, port: int, record_path: Path) -> subprocess.Popen[Any]:
    return popen([sys.executable, "-c", RECORDER, str(port), str(record_path), str(REPO)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# translator and servald processes


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class TranslatorProcess:
    """``python -m translator run --config FILE`` in a host (or here), with its log."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any],
                 popen: Popen = subprocess.Popen, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.runtime = workdir / f"{name}-run"
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = write_config(workdir / f"{name}.yaml", config)
        self.log_path = workdir / f"{name}.log"
        self._popen = popen
        self._env = python_env(env)
        self.process: subprocess.Popen[Any] | None = None

    @property
    def status_socket(self) -> str:
        return str(self.config["status"]["socket"])

    def rewrite(self, config: dict[str, Any]) -> None:
        self.config = config
        write_config(self.config_path, config)

    def start(self, wait: bool = True) -> TranslatorProcess:
        log = self.log_path.open("ab")
        self.process = self._popen(
            [sys.executable, "-m", "translator", "run", "--config", str(self.config_path)],
            env=self._env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(self.ready, STARTUP_TIMEOUT_S, f"translator {self.name} to be ready")
        return self

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"translator {self.name} exited "
                                 f"{self.process.returncode}: {self.log()}")
        return bool(self.status().get("state") == "running")

    def status(self) -> dict[str, Any]:
        from translator.status import fetch_status

        return fetch_status(self.status_socket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() \
            else ""

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and (event is None or record.get("event") == event):
                    events.append(record)
        return events

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        return stop_process(self.process, sig, timeout_s)


def servald_router(host: Any, workdir: Path) -> subprocess.Popen[Any]:
    """A plain servald in router mode on `host` (the Serval domain's service router)."""
    config = workdir / f"{host.name}-servald.yaml"
    config.write_text(yaml.safe_dump({"router": True, "domain_key": DOMAIN_KEY,
                                      "log_format": "json"}))
    socket_path = workdir / f"{host.name}-servald.sock"
    log = (workdir / f"{host.name}-servald.log").open("ab")
    process: subprocess.Popen[Any] = host.popen(
        [sys.executable, "-m", "serval.host.daemon", "--config", str(config),
         "--control-socket", str(socket_path)],
        env=python_env(host.env()), cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)

    def answers() -> bool:
        from serval.control import ControlClient

        if process.poll() is not None:
            raise AssertionError(f"router servald exited {process.returncode}")
        with ControlClient(str(socket_path)) as client:
            client.request("status")
        return True

    wait_until(answers, STARTUP_TIMEOUT_S, "the router's servald")
    return process


def run_all(commands: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run callables in threads; return their results (re-raising the first error)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
        futures = [pool.submit(command) for command in commands]
        return [future.result(timeout=300) for future in futures]
