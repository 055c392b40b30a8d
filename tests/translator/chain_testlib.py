"""The migration chain shared by the appliance's migration and adopt tests.

Topology (serval/topology.py)::

    c ---- a ======= dc LAN ======= r
                        ||
                        e  (nginx on 127.0.0.1)

A legacy client (curl on ``c``) downloads a large file, paced, through the front appliance
``a`` -> (SAL via the router ``r``) -> the exporter appliance ``e`` -> nginx. The tests then
move, kill or restart parts of the Serval hop while the download is in flight.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

SERVALCTL_TIMEOUT_S = 30


@dataclass(frozen=True)
class ChainSettings:
    """What differs between the test modules (ports must not collide between them)."""

    prefix: str  # namespace prefix
    service: str
    http_port: int
    metrics_port: int
    file_bytes: int
    rate: str  # curl --limit-rate
    download_timeout_s: float = 90
    restart_backoff_s: float | None = None  # the supervisor's first restart delay


@dataclass
class Chain:
    settings: ChainSettings
    topo: Any
    workdir: Path
    exporter: TranslatorProcess
    file_sha: str
    router_address: str

    @property
    def a_address(self) -> str:
        return str(self.topo["a"].address("c-a"))


def _appliance_config(settings: ChainSettings, run: Path, router_address: str,
                      **direction: Any) -> dict[str, Any]:
    stack: dict[str, Any] = {"mode": "bundled", "control_socket": str(run / "servald.sock"),
                             "servald": {"routers": [router_address], "domain_key": DOMAIN_KEY}}
    if settings.restart_backoff_s is not None:
        stack["restart"] = {"backoff_initial_s": settings.restart_backoff_s}
    return {
        **direction,
        "stack": stack,
        "logging": {"format": "json"},
        "metrics": {"address": f"127.0.0.1:{settings.metrics_port}"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "runtime_dir": str(run),
    }


@contextmanager
def migration_chain(settings: ChainSettings, workdir: Path) -> Iterator[Chain]:
    """Namespaces, the router, nginx with the file, and the exporter appliance (running)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not Nginx.available():
        pytest.fail("nginx is required for the appliance tests (scripts/install-deps.sh)")
    from serval import topology

    spec = topology.TopologySpec(
        hosts=("c", "a", "r", "e"),
        lans=(topology.LanSpec("dc", ("r", "a", "e")),),
        links=(topology.LinkSpec("c", "a"),),
        ipv6=False,
    )
    with topology.Topology(spec, prefix=settings.prefix) as topo:
        # Small buffers between the legacy client and the front appliance: the paced download
        # then paces the Serval hop too, so moves and kills happen with the transfer in flight.
        topo["c"].sysctl("ipv4/tcp_rmem", "4096 65536 262144")
        topo["a"].sysctl("ipv4/tcp_wmem", "4096 65536 262144")
        router = servald_router(topo["r"], workdir)
        router_address = str(topo["r"].address("dc"))
        nginx = Nginx(workdir, settings.http_port, settings.http_port + 1)
        payload = nginx.docroot / "file.bin"
        payload.write_bytes(os.urandom(settings.file_bytes))
        e = topo["e"]
        nginx.start(popen=e.popen, probe=lambda check: bool(e.call(check)))
        config = _appliance_config(
            settings, workdir / "e-run", router_address,
            exporters=[{"name": "files", "service": settings.service,
                        "target": f"127.0.0.1:{settings.http_port}"}])
        exporter = TranslatorProcess(workdir, "e", config, popen=e.popen, env=e.env())
        exporter.start()
        wait_until(lambda: all(x["listening"] for x in exporter.status()["exporters"]), 20,
                   "the exporter to listen")
        try:
            yield Chain(settings, topo, workdir, exporter, sha256_file(payload), router_address)
        finally:
            exporter.stop()
            nginx.stop()
            stop_process(router)


@contextmanager
def front_appliance(chain: Chain, workdir: Path) -> Iterator[TranslatorProcess]:
    """The front appliance on ``a``, listening on port 80 for the chain's service."""
    a = chain.topo["a"]
    config = _appliance_config(
        chain.settings, workdir / "a-run", chain.router_address,
        listeners=[{"name": "files", "port": 80, "service": chain.settings.service,
                    "connect_timeout_s": 5}])
    process = TranslatorProcess(workdir, "a", config, popen=a.popen, env=a.env())
    process.start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code in (0, None), process.log()


def control_socket(process: TranslatorProcess) -> str:
    return str(process.config["stack"]["control_socket"])


def watched_flows(process: TranslatorProcess) -> list[dict[str, Any]]:
    """The flows the appliance's servald manages; none while servald is down (restarting)."""
    from serval.control import ControlClient

    try:
        with ControlClient(control_socket(process), reply_timeout_s=5.0) as client:
            flows = client.request("flows").message.get("flows") or []
    except OSError:
        return []
    return [flow for flow in flows if flow.get("watched")]


def metric_value(chain: Chain, host: str, metric: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{chain.settings.metrics_port}/metrics"
    text = str(chain.topo[host].run(["curl", "-sS", "--max-time", "10", url]).stdout)
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(metric + "{") or line.startswith(metric + " ")) and \
                all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def servalctl(host: Any, process: TranslatorProcess,
              *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = host.run(
        [sys.executable, "-m", "serval.host.ctl", "--control-socket", control_socket(process),
         *args], check=False, env=python_env(host.env()), timeout=SERVALCTL_TIMEOUT_S)
    return result


class Download:
    """curl on the legacy client, paced, with the client namespace's reset counter."""

    def __init__(self, chain: Chain, out: Path) -> None:
        self.chain = chain
        self.out = out
        self.resets_before = chain.topo["c"].net_counters()["Tcp.EstabResets"]
        settings = chain.settings
        self.process: subprocess.Popen[str] = chain.topo["c"].popen(
            ["curl", "-sS", "--max-time", str(settings.download_timeout_s), "--limit-rate",
             settings.rate, "-o", str(out), "-w", "%{http_code}",
             f"http://{chain.a_address}/file.bin"],
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
        stdout, stderr = self.process.communicate(
            timeout=self.chain.settings.download_timeout_s + 10)
        assert self.process.returncode == 0, f"curl failed: {stderr}"
        assert stdout.strip() == "200"
        assert self.received() == self.chain.settings.file_bytes
        assert sha256_file(self.out) == self.chain.file_sha, "download corrupted"
        resets = self.chain.topo["c"].net_counters()["Tcp.EstabResets"] - self.resets_before
        assert resets == 0, "the legacy client saw a connection reset"
