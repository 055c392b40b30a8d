"""Real, unmodified clients through the full chain, across network namespaces.

    c (wrk, redis-benchmark, redis-cli, iperf3 -c)
    -> a (front appliance) -> r (service router) -> e (exporter appliance)
    -> nginx / redis-server / iperf3 -s on e's 127.0.0.1

The point is that third-party tools with their own connection patterns (keep-alive and
per-request connections, pipelined RESP, iperf3's control plus data connections, reverse mode)
work through the appliance with no changes at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from translator_testlib import (
    DOMAIN_KEY,
    STARTUP_TIMEOUT_S,
    Nginx,
    TranslatorProcess,
    port_open,
    servald_router,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.netns

WRK = "/usr/bin/wrk"
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_CLI = "/usr/bin/redis-cli"
IPERF3 = "/usr/bin/iperf3"

# Origin ports on the exporter host (loopback) and listener ports on the front appliance.
NGINX_HTTP_PORT, NGINX_PROXY_PORT, REDIS_PORT, IPERF_PORT = 8080, 8082, 6380, 5202
FRONT_HTTP_PORT, FRONT_REDIS_PORT, FRONT_IPERF_PORT = 80, 6379, 5201
CLIENT_RUN_TIMEOUT_S = 90.0
IPERF_SERVER_EXIT_TIMEOUT_S = 30.0


@dataclass
class RealChain:
    topo: Any
    front: TranslatorProcess
    exporter: TranslatorProcess

    @property
    def front_address(self) -> str:
        return str(self.topo["a"].address("c-a"))

    def client_run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.topo["c"].run(
            argv, check=False, timeout=CLIENT_RUN_TIMEOUT_S)
        return result


def appliance_config(run: Path, router_address: str, **roles: Any) -> dict[str, Any]:
    return {
        **roles,
        "stack": {"mode": "bundled", "control_socket": str(run / "servald.sock"),
                  "servald": {"routers": [router_address], "domain_key": DOMAIN_KEY}},
        "logging": {"format": "json"},
        "metrics": {"address": "127.0.0.1:9464"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "runtime_dir": str(run),
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealChain]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    missing = [tool for tool in (WRK, REDIS_SERVER, REDIS_BENCHMARK, REDIS_CLI, IPERF3)
               if not os.access(tool, os.X_OK)]
    if missing or not Nginx.available():
        pytest.fail(f"real clients/servers missing: {missing or ['nginx']}")
    from serval import topology

    workdir = tmp_path_factory.mktemp("real-clients")
    spec = topology.TopologySpec(
        hosts=("c", "a", "r", "e"),
        lans=(topology.LanSpec("dc", ("r", "a", "e")),),
        links=(topology.LinkSpec("c", "a"),),
    )
    with topology.Topology(spec) as topo:  # its teardown kills everything started by popen
        router = servald_router(topo["r"], workdir)
        router_address = str(topo["r"].address("dc"))
        e, a = topo["e"], topo["a"]
        nginx = Nginx(workdir, NGINX_HTTP_PORT, NGINX_PROXY_PORT)
        (nginx.docroot / "index.html").write_text("hello through serval\n")
        nginx.start(popen=e.popen, probe=lambda check: bool(e.call(check)))
        redis = e.popen([REDIS_SERVER, "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: e.call(port_open, "127.0.0.1", REDIS_PORT), STARTUP_TIMEOUT_S,
                   "redis-server to listen")
        exporter = TranslatorProcess(workdir, "e", appliance_config(
            workdir / "e-run", router_address, exporters=[
                {"name": "web", "service": "web.example",
                 "target": f"127.0.0.1:{NGINX_HTTP_PORT}"},
                {"name": "redis", "service": "redis.example",
                 "target": f"127.0.0.1:{REDIS_PORT}"},
                {"name": "iperf", "service": "iperf.example",
                 "target": f"127.0.0.1:{IPERF_PORT}"},
            ]), popen=e.popen, env=e.env())
        front = TranslatorProcess(workdir, "a", appliance_config(
            workdir / "a-run", router_address, listeners=[
                {"name": "web", "port": FRONT_HTTP_PORT, "service": "web.example"},
                {"name": "redis", "port": FRONT_REDIS_PORT, "service": "redis.example"},
                {"name": "iperf", "port": FRONT_IPERF_PORT, "service": "iperf.example"},
            ]), popen=a.popen, env=a.env())
        try:
            exporter.start()
            wait_until(lambda: all(x["listening"] for x in exporter.status()["exporters"]),
                       20, "the exporters to listen")
            front.start()
            yield RealChain(topo, front, exporter)
        finally:
            front.stop()
            exporter.stop()
            stop_process(redis)
            nginx.stop()
            stop_process(router)


# --------------------------------------------------------------------------------------------
# wrk -> nginx

WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)


def check_wrk_output(output: str) -> int:
    """Return the request count; fail on non-2xx answers or any socket error."""
    match = WRK_REQUESTS.search(output)
    assert match, output
    assert "Non-2xx" not in output, output
    # wrk prints "Socket errors: connect N, read N, write N, timeout N" only when one is non-zero.
    assert "Socket errors" not in output, output
    return int(match.group(1))


@pytest.mark.parametrize("extra", [[], ["-H", "Connection: close"]],
                         ids=["keepalive", "connection-close"])
def test_wrk_against_nginx(chain: RealChain, extra: list[str]) -> None:
    result = chain.client_run([WRK, "-t1", "-c8", "-d3s", *extra,
                               f"http://{chain.front_address}:{FRONT_HTTP_PORT}/"])
    assert result.returncode == 0, result.stderr
    requests = check_wrk_output(result.stdout)
    assert requests > 0, result.stdout
    web = next(x for x in chain.front.status()["listeners"] if x["name"] == "web")
    assert web["connect_errors"] == {}, web


# --------------------------------------------------------------------------------------------
# redis-benchmark and redis-cli -> redis-server

REDIS_RPS = re.compile(r"^(SET|GET): ([\d.]+) requests per second", re.MULTILINE)


def test_redis_benchmark_and_cli(chain: RealChain) -> None:
    host = ["-h", chain.front_address, "-p", str(FRONT_REDIS_PORT)]
    bench = chain.client_run([REDIS_BENCHMARK, *host, "-t", "set,get", "-n", "2000", "-c", "8",
                              "-q"])
    assert bench.returncode == 0, bench.stdout + bench.stderr
    # -q rewrites a progress line with "\r"; keep only the final lines.
    final_lines = "\n".join(line.rsplit("\r", 1)[-1] for line in bench.stdout.splitlines())
    rates = {name: float(rate) for name, rate in REDIS_RPS.findall(final_lines)}
    assert set(rates) == {"SET", "GET"}, bench.stdout
    assert all(rate > 0 for rate in rates.values()), rates

    stored = chain.client_run([REDIS_CLI, *host, "SET", "k", "v"])
    assert (stored.returncode, stored.stdout.strip()) == (0, "OK"), stored
    fetched = chain.client_run([REDIS_CLI, *host, "GET", "k"])
    assert (fetched.returncode, fetched.stdout.strip()) == (0, "v"), fetched


# --------------------------------------------------------------------------------------------
# iperf3 -> iperf3 -s (a control connection plus a data connection, both through the chain)


@pytest.mark.parametrize("extra", [[], ["-R"]], ids=["forward", "reverse"])
def test_iperf3_through_the_chain(chain: RealChain, extra: list[str]) -> None:
    e = chain.topo["e"]
    server = e.popen([IPERF3, "-s", "-1", "-p", str(IPERF_PORT), "-B", "127.0.0.1"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Watch the listening socket with ss rather than connecting: a probe connection could
        # count as the one test that `iperf3 -s -1` serves.
        wait_until(lambda: f":{IPERF_PORT}" in e.run(
            ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout, STARTUP_TIMEOUT_S,
            "iperf3 -s to listen")
        result = chain.client_run([IPERF3, "-c", chain.front_address, "-p",
                                   str(FRONT_IPERF_PORT), "-t", "2", "-J", *extra])
        report = json.loads(result.stdout)
        assert "error" not in report, report.get("error")
        assert result.returncode == 0, result.stderr
        received = report["end"]["sum_received"]["bytes"]
        assert received > 0, report["end"]
        assert report["start"]["test_start"]["reverse"] == (1 if extra else 0)
        assert server.wait(timeout=IPERF_SERVER_EXIT_TIMEOUT_S) == 0
    finally:
        stop_process(server)
