"""Migration through the appliance (issue 6 item 5), across network namespaces, real processes.

Topology (serval/topology.py)::

    c ---- a ======= dc LAN ======= r
                        ||
                        e  (nginx on 127.0.0.1)

A legacy client (curl on ``c``) downloads a large file, paced so that it lasts several seconds,
through the front appliance ``a`` -> (SAL via the router ``r``) -> the exporter appliance ``e``
-> nginx. Mid-download one end of the Serval hop gets a new address and the old one is
deleted: servald moves the flow (TCP_REPAIR), and each appliance's relay parks, swaps the
socket and resumes. The legacy client must notice nothing: the file arrives byte-exact, curl
succeeds, and its namespace saw no connection reset.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from translator_testlib import (
    DOMAIN_KEY,
    Nginx,
    TranslatorProcess,
    python_env,
    servald_router,
    sha256_file,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.netns]

HTTP_PORT = 8090
METRICS_PORT = 9465
FILE_BYTES = 96 * 1024 * 1024
RATE = "16M"  # curl --limit-rate: ~6 s for the file; the move happens early on
MOVE_AFTER_BYTES = 16 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 90
MIGRATE_TIMEOUT_S = 20


def _topology() -> Any:
    from serval import topology

    return topology


@dataclass
class Chain:
    topo: Any
    workdir: Path
    exporter: TranslatorProcess
    file_sha: str
    router_address: str

    @property
    def a_address(self) -> str:
        return str(self.topo["a"].address("c-a"))


def stack_section(run: Path, router_address: str) -> dict[str, Any]:
    return {"mode": "bundled", "control_socket": str(run / "servald.sock"),
            "servald": {"routers": [router_address], "domain_key": DOMAIN_KEY}}


def exporter_config(workdir: Path, router_address: str) -> dict[str, Any]:
    run = workdir / "e-run"
    return {
        "exporters": [{"name": "files", "service": "files.example",
                       "target": f"127.0.0.1:{HTTP_PORT}"}],
        "stack": stack_section(run, router_address),
        "logging": {"format": "json"},
        "metrics": {"address": f"127.0.0.1:{METRICS_PORT}"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "runtime_dir": str(run),
    }


def front_config(workdir: Path, router_address: str) -> dict[str, Any]:
    run = workdir / "a-run"
    return {
        "listeners": [{"name": "files", "port": 80, "service": "files.example",
                       "connect_timeout_s": 5}],
        "stack": stack_section(run, router_address),
        "logging": {"format": "json"},
        "metrics": {"address": f"127.0.0.1:{METRICS_PORT}"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "runtime_dir": str(run),
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not Nginx.available():
        pytest.fail("nginx is required for the appliance tests (scripts/install-deps.sh)")
    topology = _topology()
    workdir = tmp_path_factory.mktemp("migration")
    spec = topology.TopologySpec(
        hosts=("c", "a", "r", "e"),
        lans=(topology.LanSpec("dc", ("r", "a", "e")),),
        links=(topology.LinkSpec("c", "a"),),
        ipv6=False,
    )
    with topology.Topology(spec, prefix="svtmig") as topo:
        # Small buffers between the legacy client and the front appliance: the paced download
        # then paces the Serval hop too, so the move happens with the transfer really in flight.
        topo["c"].sysctl("ipv4/tcp_rmem", "4096 65536 262144")
        topo["a"].sysctl("ipv4/tcp_wmem", "4096 65536 262144")
        router = servald_router(topo["r"], workdir)
        router_address = str(topo["r"].address("dc"))
        nginx = Nginx(workdir, HTTP_PORT, HTTP_PORT + 1)
        payload = nginx.docroot / "file.bin"
        payload.write_bytes(os.urandom(FILE_BYTES))
        e = topo["e"]
        nginx.start(popen=e.popen, probe=lambda check: bool(e.call(check)))
        exporter = TranslatorProcess(workdir, "e", exporter_config(workdir, router_address),
                                     popen=e.popen, env=e.env())
        exporter.start()
        wait_until(lambda: all(x["listening"] for x in exporter.status()["exporters"]), 20,
                   "the exporter to listen")
        try:
            yield Chain(topo, workdir, exporter, sha256_file(payload), router_address)
        finally:
            exporter.stop()
            nginx.stop()
            stop_process(router)


@pytest.fixture
def front(chain: Chain, tmp_path: Path) -> Iterator[TranslatorProcess]:
    a = chain.topo["a"]
    process = TranslatorProcess(tmp_path, "a", front_config(tmp_path, chain.router_address),
                                popen=a.popen, env=a.env())
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code in (0, None), process.log()


def control_socket(process: TranslatorProcess) -> str:
    return str(process.config["stack"]["control_socket"])


def watched_flows(process: TranslatorProcess) -> list[dict[str, Any]]:
    from serval.control import ControlClient

    with ControlClient(control_socket(process), reply_timeout_s=5.0) as client:
        flows = client.request("flows").message.get("flows") or []
    return [flow for flow in flows if flow.get("watched")]


def metric_value(chain: Chain, host: str, metric: str, **labels: str) -> float:
    text = str(chain.topo[host].run(["curl", "-sS", "--max-time", "10",
                                     f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout)
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(metric + "{") or line.startswith(metric + " ")) and \
                all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Download:
    """curl on the legacy client, paced, with the client namespace's reset counter."""

    def __init__(self, chain: Chain, out: Path) -> None:
        self.chain = chain
        self.out = out
        self.resets_before = chain.topo["c"].net_counters()["Tcp.EstabResets"]
        self.process: subprocess.Popen[str] = chain.topo["c"].popen(
            ["curl", "-sS", "--max-time", str(DOWNLOAD_TIMEOUT_S), "--limit-rate", RATE,
             "-o", str(out), "-w", "%{http_code}", f"http://{chain.a_address}/file.bin"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def received(self) -> int:
        return self.out.stat().st_size if self.out.exists() else 0

    def wait_for_bytes(self, count: int) -> None:
        def enough() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"curl ended early: {self.process.returncode}")
            return self.received() >= count

        wait_until(enough, 30, f"{count >> 20} MiB of the download")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def assert_intact(self) -> None:
        stdout, stderr = self.process.communicate(timeout=DOWNLOAD_TIMEOUT_S + 10)
        assert self.process.returncode == 0, f"curl failed: {stderr}"
        assert stdout.strip() == "200"
        assert self.received() == FILE_BYTES
        assert sha256_file(self.out) == self.chain.file_sha, "download corrupted"
        resets = self.chain.topo["c"].net_counters()["Tcp.EstabResets"] - self.resets_before
        assert resets == 0, "the legacy client saw a connection reset"


def servalctl(host: Any, process: TranslatorProcess,
              *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = host.run(
        [sys.executable, "-m", "serval.host.ctl", "--control-socket", control_socket(process),
         *args], check=False, env=python_env(host.env()), timeout=MIGRATE_TIMEOUT_S + 10)
    return result


def migration_lines(process: TranslatorProcess) -> list[dict[str, Any]]:
    """The appliance's own lines (the bundled servald logs its side of each move too)."""
    return [r for r in process.log_events("migration") if r.get("outcome") == "completed"
            and r.get("role") in ("listener", "exporter")]


def test_exporter_host_moves_mid_download(chain: Chain, front: TranslatorProcess,
                                          tmp_path: Path) -> None:
    topo = chain.topo
    e_old = str(topo["e"].address("dc"))
    exporter_lines_before = len(migration_lines(chain.exporter))
    download = Download(chain, tmp_path / "file.bin")
    try:
        download.wait_for_bytes(MOVE_AFTER_BYTES)
        # Both appliances handed their Serval socket of this download to servald.
        exporter_flows = wait_until(lambda: [f for f in watched_flows(chain.exporter)
                                             if f["local"]["address"] == e_old], 10,
                                    "the exporter's watched flow")
        wait_until(lambda: [f for f in watched_flows(front)
                            if f["remote"]["address"] == e_old], 10, "the front's watched flow")
        e_new = str(topo.add_address("e", "dc"))
        flow = exporter_flows[0]["flow"]
        result = servalctl(topo["e"], chain.exporter, "migrate", "flow", str(flow),
                           "--to", e_new)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "completed" in result.stdout, result.stdout
        topo.remove_address("e", e_old)
        assert download.received() < FILE_BYTES, "the move happened after the download"
        download.assert_intact()
    finally:
        download.kill()

    # One log line per migration on each appliance; counted in the metrics and in the
    # connection's canonical line.
    exporter_lines = wait_until(lambda: migration_lines(chain.exporter)[exporter_lines_before:],
                                10, "the exporter's migration line")
    assert exporter_lines[0]["flow"] == flow and exporter_lines[0]["role"] == "exporter"
    front_lines = wait_until(lambda: migration_lines(front), 10, "the front's migration line")
    assert front_lines[0]["role"] == "listener"
    assert metric_value(chain, "e", "serval_translator_migrations_total", role="exporter") >= 1
    assert metric_value(chain, "a", "serval_translator_migrations_total", role="listener") >= 1
    ended = wait_until(lambda: [r for r in front.log_events("connection")
                                if r.get("name") == "files" and r.get("end") == "eof"], 10,
                       "the front's connection line")
    assert ended[-1]["migrations"] >= 1 and ended[-1]["bytes_down"] >= FILE_BYTES
    # The pair ended, so did its watch: servald released its copy of the socket.
    wait_until(lambda: not watched_flows(front), 10, "the front's watch to close")
    # The router sends new clients to the exporter's new address.
    from serval.control import ControlClient

    def registered_at_new() -> bool:
        router_socket = chain.workdir / "r-servald.sock"
        with ControlClient(str(router_socket), reply_timeout_s=5.0) as client:
            text = str(client.request("registrations").message)
        return e_new in text and e_old not in text

    wait_until(registered_at_new, 15, "the router to list the exporter at its new address")


def test_front_appliance_host_moves_mid_download(chain: Chain, front: TranslatorProcess,
                                                 tmp_path: Path) -> None:
    topo = chain.topo
    a_old = str(topo["a"].address("dc"))
    download = Download(chain, tmp_path / "file.bin")
    try:
        download.wait_for_bytes(MOVE_AFTER_BYTES)
        wait_until(lambda: [f for f in watched_flows(front)
                            if f["local"]["address"] == a_old], 10, "the front's watched flow")
        # The automatic trigger: the address the flow uses disappears, servald moves it to
        # the best usable one left.
        a_new = str(topo.add_address("a", "dc"))
        topo.remove_address("a", a_old)
        moved = wait_until(lambda: [f for f in watched_flows(front)
                                    if f["local"]["address"] == a_new], MIGRATE_TIMEOUT_S,
                           "the front's flow to move to its new address")
        assert moved[0]["migrations"] >= 1
        assert download.received() < FILE_BYTES, "the move happened after the download"
        download.assert_intact()
    finally:
        download.kill()
    lines = wait_until(lambda: migration_lines(front), 10, "the front's migration line")
    assert lines[0]["role"] == "listener" and lines[0]["parked_ms"] >= 0
    # And a new client is served through the appliance's new address.
    page = topo["c"].run(["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w",
                          "%{http_code}", f"http://{chain.a_address}/file.bin", "-r", "0-99"],
                         check=False, timeout=30)
    assert page.stdout.strip() in ("200", "206"), page.stderr
