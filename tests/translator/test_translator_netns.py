"""The appliance end to end, across network namespaces, with real processes and real servers.

Topology (serval/topology.py)::

    c ---- a ======= dc LAN ======= r
                        ||
                        e  (nginx, a PROXY-header recorder on 127.0.0.1)

- ``c``: a legacy client (curl, plain sockets);
- ``a``: the front appliance: ``serval-translator`` with its bundled servald, TCP listeners;
- ``r``: the Serval service router (a servald with ``router: true``);
- ``e``: the exporter appliance: ``serval-translator`` with its bundled servald, exporting
  nginx and the recorder as Serval services.

Every byte goes legacy client -> appliance -> (SAL via the router, data direct) -> exporter
appliance -> legacy server, and back.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from translator_testlib import (
    DOMAIN_KEY,
    Nginx,
    TranslatorProcess,
    read_records,
    sha256_file,
    start_recorder,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.netns]

BIG_FILE_BYTES = 6 * 1024 * 1024
# Downloads that are in flight while a test reloads, drains or kills servald: bigger than every
# buffer on the path together (socket buffers, relay pipes: ~12 MiB here), paced by curl so
# that one lasts ~4 s.
HUGE_FILE_BYTES = 32 * 1024 * 1024
SLOW_RATE = "8M"
HTTP_PORT, RECORDER_PORT, NGINX_PROXY_PORT = 8080, 8081, 8082


def _topology() -> Any:
    from serval import topology

    return topology


@dataclass
class Chain:
    topo: Any
    workdir: Path
    exporter: TranslatorProcess
    nginx: Nginx
    recorder_log: Path
    big_sha: str
    huge_sha: str
    router_address: str

    @property
    def a_address(self) -> str:
        return str(self.topo["a"].address("c-a"))

    @property
    def c_address(self) -> str:
        return str(self.topo["c"].address("c-a"))


def servald_section(router_address: str) -> dict[str, Any]:
    return {"routers": [router_address], "domain_key": DOMAIN_KEY}


def exporter_config(workdir: Path, router_address: str) -> dict[str, Any]:
    run = workdir / "e-run"
    return {
        "exporters": [
            {"name": "web-origin", "service": "web.example", "target": f"127.0.0.1:{HTTP_PORT}"},
            {"name": "pp-origin", "service": "web-pp.example",
             "target": f"127.0.0.1:{NGINX_PROXY_PORT}", "proxy_protocol": "v2"},
            {"name": "rec-origin", "service": "rec.example",
             "target": f"127.0.0.1:{RECORDER_PORT}", "proxy_protocol": "v2"},
        ],
        "stack": {"mode": "bundled", "control_socket": str(run / "servald.sock"),
                  "restart": {"backoff_initial_s": 0.2},
                  "servald": servald_section(router_address)},
        "logging": {"format": "json"},
        "metrics": {"address": "127.0.0.1:9464"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "runtime_dir": str(run),
    }


def front_config(workdir: Path, router_address: str, **overrides: Any) -> dict[str, Any]:
    run = workdir / "a-run"
    config: dict[str, Any] = {
        "listeners": [
            {"name": "web", "port": 80, "service": "web.example", "connect_timeout_s": 5},
            {"name": "pp", "port": NGINX_PROXY_PORT, "service": "web-pp.example"},
            {"name": "rec", "address": "0.0.0.0", "port": RECORDER_PORT,
             "service": "rec.example"},
        ],
        "stack": {"mode": "bundled", "control_socket": str(run / "servald.sock"),
                  "restart": {"backoff_initial_s": 0.2},
                  "servald": servald_section(router_address)},
        "logging": {"format": "json"},
        "metrics": {"address": "127.0.0.1:9464"},
        "status": {"socket": str(run / "status.sock")},
        "relay": {"workers": 2},
        "drain": {"timeout_s": 30},
        "runtime_dir": str(run),
    }
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not Nginx.available():
        pytest.fail("nginx is required for the appliance tests (scripts/install-deps.sh)")
    from translator_testlib import servald_router

    topology = _topology()
    workdir = tmp_path_factory.mktemp("chain")
    spec = topology.TopologySpec(
        hosts=("c", "a", "r", "e"),
        lans=(topology.LanSpec("dc", ("r", "a", "e")),),
        links=(topology.LinkSpec("c", "a"),),
    )
    with topology.Topology(spec) as topo:
        # Small socket buffers between the legacy client and the front appliance, so that a
        # slow download is really in flight (not sitting in megabytes of kernel buffers) when
        # the tests reload, drain or kill servald under it.
        topo["c"].sysctl("ipv4/tcp_rmem", "4096 65536 262144")
        topo["a"].sysctl("ipv4/tcp_wmem", "4096 65536 262144")
        router = servald_router(topo["r"], workdir)
        router_address = str(topo["r"].address("dc"))
        nginx = Nginx(workdir, HTTP_PORT, NGINX_PROXY_PORT)
        (nginx.docroot / "index.html").write_text("hello through serval\n")
        big = nginx.docroot / "big.bin"
        big.write_bytes(os.urandom(BIG_FILE_BYTES))
        huge = nginx.docroot / "huge.bin"
        huge.write_bytes(os.urandom(HUGE_FILE_BYTES))
        e = topo["e"]
        nginx.start(popen=e.popen, probe=lambda check: bool(e.call(check)))
        recorder_log = workdir / "proxy-records.jsonl"
        start_recorder(e.popen, RECORDER_PORT, recorder_log)
        exporter = TranslatorProcess(workdir, "e", exporter_config(workdir, router_address),
                                     popen=e.popen, env=e.env())
        exporter.start()
        wait_until(lambda: all(x["listening"] for x in exporter.status()["exporters"]), 20,
                   "the exporters to listen")
        try:
            yield Chain(topo, workdir, exporter, nginx, recorder_log, sha256_file(big),
                        sha256_file(huge), router_address)
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
        # Whatever the test did, the appliance must always stop cleanly on SIGTERM.
        assert code in (0, None), process.log()


def curl(chain: Chain, url: str, *extra: str,
         timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = chain.topo["c"].run(
        ["curl", "-sS", "--max-time", str(int(timeout_s)), *extra, url], check=False,
        timeout=timeout_s + 10)
    return result


def start_download(chain: Chain, out: Path, port: int = 80,
                   rate: str = SLOW_RATE) -> subprocess.Popen[Any]:
    process: subprocess.Popen[Any] = chain.topo["c"].popen(
        ["curl", "-sS", "--max-time", "90", "--limit-rate", rate, "-o", str(out),
         "-w", "%{http_code}", f"http://{chain.a_address}:{port}/huge.bin"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process


def finish_downloads(downloads: list[tuple[subprocess.Popen[Any], Path]], chain: Chain) -> None:
    for process, out in downloads:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"curl failed: {stderr}"
        assert stdout.strip() == "200"
        assert out.stat().st_size == HUGE_FILE_BYTES
        assert sha256_file(out) == chain.huge_sha, "download corrupted"


def wait_downloads_started(downloads: list[tuple[subprocess.Popen[Any], Path]]) -> None:
    wait_until(lambda: all(out.exists() and out.stat().st_size > 1024 * 1024
                           for _, out in downloads), 30, "downloads to be under way")


def metrics_text(chain: Chain, host: str) -> str:
    result = chain.topo[host].run(["curl", "-sS", "--max-time", "10",
                                   "http://127.0.0.1:9464/metrics"])
    return str(result.stdout)


def metric_value(text: str, metric: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --------------------------------------------------------------------------------------------
# the full chain


def test_curl_through_the_full_chain(chain: Chain, front: TranslatorProcess,
                                     tmp_path: Path) -> None:
    page = curl(chain, f"http://{chain.a_address}/index.html")
    assert page.returncode == 0, page.stderr
    assert page.stdout == "hello through serval\n"
    # An IPv6 legacy client on the same dual-stack listener.
    a_v6 = chain.topo["a"].address("c-a", version=6)
    page6 = curl(chain, f"http://[{a_v6}]/index.html")
    assert page6.returncode == 0, page6.stderr
    assert page6.stdout == "hello through serval\n"
    out = tmp_path / "big.bin"
    big = curl(chain, f"http://{chain.a_address}/big.bin", "-o", str(out))
    assert big.returncode == 0, big.stderr
    assert sha256_file(out) == chain.big_sha

    # One canonical line per connection, with the bytes delivered.
    lines = wait_until(lambda: [r for r in front.log_events("connection")
                                if r.get("name") == "web" and r.get("end") == "eof"], 10,
                       "the canonical connection lines")
    assert len(lines) == 3
    assert max(line["bytes_down"] for line in lines) > BIG_FILE_BYTES
    c_v6 = str(chain.topo["c"].address("c-a", version=6))
    assert sorted(line["client"].rsplit(":", 1)[0].strip("[]") for line in lines) == sorted(
        [chain.c_address, chain.c_address, c_v6]), lines
    assert all(line["server"].split(":")[0].strip("[") == str(chain.topo["e"].address("dc"))
               for line in lines), lines

    status = front.status()
    web = next(item for item in status["listeners"] if item["name"] == "web")
    assert web["accepted"] == 3 and web["connect_errors"] == {}
    assert status["stack"]["up"] is True and status["stack"]["mode"] == "bundled"
    exporter = next(item for item in chain.exporter.status()["exporters"]
                    if item["name"] == "web-origin")
    assert exporter["accepted"] >= 3

    text = metrics_text(chain, "a")
    labels = {"role": "listener", "name": "web", "service": "web.example"}
    assert metric_value(text, "serval_translator_connections_total", **labels) == 3
    assert metric_value(text, "serval_translator_bytes_total", **labels,
                        direction="downstream") > BIG_FILE_BYTES
    assert metric_value(text, "serval_translator_connect_latency_seconds_count", **labels) == 3
    assert metric_value(text, "serval_translator_servald_up") == 1


def test_connect_failure_closes_the_client_cleanly_and_is_counted(
        chain: Chain, front: TranslatorProcess) -> None:
    config = copy.deepcopy(front.config)
    config["listeners"].append({"name": "nowhere", "port": 9999, "service": "nobody.example",
                                "connect_timeout_s": 0.5})
    front.rewrite(config)
    front.send_signal(signal.SIGHUP)
    wait_until(lambda: any(x["name"] == "nowhere" for x in front.status()["listeners"]), 15,
               "the reload")

    def attempt() -> bytes:
        import socket

        with socket.create_connection((chain.a_address, 9999), timeout=10) as sock:
            return sock.recv(100)  # b"" is a FIN; a reset raises ConnectionResetError

    assert chain.topo["c"].call(attempt) == b""
    nowhere = next(x for x in front.status()["listeners"] if x["name"] == "nowhere")
    assert nowhere["connect_errors"] == {"timeout": 1}
    text = metrics_text(chain, "a")
    assert metric_value(text, "serval_translator_connect_errors_total", name="nowhere",
                        reason="timeout") == 1


def test_proxy_v2_header_reaches_the_legacy_server(chain: Chain,
                                                   front: TranslatorProcess) -> None:
    # An unmodified nginx with `listen ... proxy_protocol` tells us what it parsed.
    result = curl(chain, f"http://{chain.a_address}:{NGINX_PROXY_PORT}/")
    assert result.returncode == 0, result.stderr
    address, port = result.stdout.split()
    # The recorder shows the whole header (command, addresses, TLVs).
    before = len(read_records(chain.recorder_log))

    def exchange() -> bytes:
        import socket

        with socket.create_connection((chain.a_address, RECORDER_PORT), timeout=10) as sock:
            sock.sendall(b"ping")
            return sock.recv(100)

    assert chain.topo["c"].call(exchange) == b"ping"
    record = wait_until(lambda: read_records(chain.recorder_log)[before:], 10,
                        "the recorder's record")[0]
    assert record.get("command") == "PROXY", record
    assert record["tlvs"]["5"].startswith("serval-flow-")
    assert record["destination"][0] == str(chain.topo["e"].address("dc"))
    # The original legacy client (c), carried by the SAL handshake from the front appliance,
    # not the front appliance's own address (the Serval peer the exporter sees).
    assert address == chain.c_address
    assert address != str(chain.topo["a"].address("dc"))
    assert record["source"][0] == chain.c_address
    assert 1024 <= int(port) <= 65535
    # The exporter's canonical line names the original client beside its Serval peer.
    lines = wait_until(lambda: [r for r in chain.exporter.log_events("connection")
                                if r.get("name") == "rec-origin" and r.get("end")], 10,
                       "the exporter's connection line")
    assert lines[-1]["original_client"].rsplit(":", 1)[0] == chain.c_address


# --------------------------------------------------------------------------------------------
# operations under load


def test_reload_under_load(chain: Chain, front: TranslatorProcess, tmp_path: Path) -> None:
    downloads = [(start_download(chain, tmp_path / f"dl{i}.bin"), tmp_path / f"dl{i}.bin")
                 for i in range(4)]
    wait_downloads_started(downloads)
    config = copy.deepcopy(front.config)
    config["listeners"] = [item for item in config["listeners"] if item["name"] != "rec"]
    config["listeners"][0]["idle_timeout_s"] = 120  # changed in place
    config["listeners"].append({"name": "web2", "port": 8000, "service": "web.example"})
    config["relay"] = {"workers": 1, "pipe_size": 262144}  # a new relay generation
    front.rewrite(config)
    front.send_signal(signal.SIGHUP)
    wait_until(lambda: (front.status().get("config", {}).get("last_reload") or {}).get(
        "result") == "ok", 20, "the reload")
    status = front.status()
    assert {x["name"] for x in status["listeners"]} == {"web", "pp", "web2"}
    assert status["relay"]["retiring_generations"], "old pairs should still run on the old relay"

    # The new listener works at once, the removed one is gone, and nothing was dropped.
    new_port = curl(chain, f"http://{chain.a_address}:8000/index.html")
    assert new_port.stdout == "hello through serval\n", new_port.stderr
    removed = chain.topo["c"].run(["curl", "-sS", "--max-time", "5",
                                   f"http://{chain.a_address}:{RECORDER_PORT}/"], check=False)
    assert removed.returncode == 7, removed  # curl: failed to connect
    finish_downloads(downloads, chain)
    wait_until(lambda: not front.status()["relay"]["retiring_generations"], 10,
               "the old relay generation to retire")

    # A bad configuration is rejected with its position; the running one is unchanged.
    bad = copy.deepcopy(config)
    bad["listeners"][0]["port"] = "http"
    front.rewrite(bad)
    front.send_signal(signal.SIGHUP)
    wait_until(lambda: (front.status()["config"].get("last_reload") or {}).get("result") ==
               "rejected", 20, "the rejection")
    reload_info = front.status()["config"]["last_reload"]
    assert f"{front.config_path}:" in reload_info["error"]
    assert "listeners[0].port: expected an integer 1..65535, got 'http'" in reload_info["error"]
    still = curl(chain, f"http://{chain.a_address}:8000/index.html")
    assert still.stdout == "hello through serval\n"
    assert front.status()["state"] == "running"
    text = metrics_text(chain, "a")
    assert metric_value(text, "serval_translator_config_reloads_total", result="ok") == 1
    assert metric_value(text, "serval_translator_config_reloads_total", result="rejected") == 1


def test_exporter_reload_keeps_established_connections(chain: Chain, front: TranslatorProcess,
                                                       tmp_path: Path) -> None:
    downloads = [(start_download(chain, tmp_path / f"dl{i}.bin"), tmp_path / f"dl{i}.bin")
                 for i in range(2)]
    wait_downloads_started(downloads)
    exporter = chain.exporter
    original = copy.deepcopy(exporter.config)
    config = copy.deepcopy(original)
    config["exporters"][0]["weight"] = 3  # re-registration of the service in use
    exporter.rewrite(config)
    exporter.send_signal(signal.SIGHUP)
    try:
        wait_until(lambda: next(x for x in exporter.status()["exporters"]
                                if x["name"] == "web-origin")["weight"] == 3, 20, "the reload")
        wait_until(lambda: next(x for x in exporter.status()["exporters"]
                                if x["name"] == "web-origin")["listening"], 20,
                   "the re-registration")
        finish_downloads(downloads, chain)
        page = wait_until(lambda: curl(chain, f"http://{chain.a_address}/index.html").stdout,
                          20, "a new connection after the re-registration")
        assert page == "hello through serval\n"
    finally:
        exporter.rewrite(original)
        exporter.send_signal(signal.SIGHUP)
        wait_until(lambda: next(x for x in exporter.status()["exporters"]
                                if x["name"] == "web-origin")["weight"] == 1, 20,
                   "the configuration to be restored")


def test_drain_on_sigterm(chain: Chain, front: TranslatorProcess, tmp_path: Path) -> None:
    downloads = [(start_download(chain, tmp_path / f"dl{i}.bin"), tmp_path / f"dl{i}.bin")
                 for i in range(3)]
    wait_downloads_started(downloads)
    started = time.monotonic()
    front.send_signal(signal.SIGTERM)
    wait_until(lambda: any(r.get("event") == "drain_started" for r in front.log_events()), 10,
               "the drain to start")
    # No new clients during the drain: the listening socket is closed.
    refused = chain.topo["c"].run(["curl", "-sS", "--max-time", "5",
                                   f"http://{chain.a_address}/index.html"], check=False)
    assert refused.returncode == 7, refused
    # Established downloads finish intact, then the process exits 0 by itself.
    finish_downloads(downloads, chain)
    assert front.process is not None
    assert front.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 30
    events = [r["event"] for r in front.log_events()]
    assert "drained" in events and "drain_timeout" not in events
    assert events[-1] == "stopped"
    # servald was stopped by the supervisor, last.
    assert "servald_stopped" in events


def _stalled_client(address: str, port: int, hold_s: float) -> int:
    """GET huge.bin, read a little, then stop reading (the transfer cannot finish); return
    how many bytes arrived before the appliance ended the connection."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect((address, port))
        sock.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        received = len(sock.recv(4096))
        time.sleep(hold_s)  # not reading: everything behind us backs up
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        return received


def test_drain_timeout_bounds_shutdown(chain: Chain, tmp_path: Path) -> None:
    a = chain.topo["a"]
    process = TranslatorProcess(tmp_path, "a", front_config(
        tmp_path, chain.router_address, drain={"timeout_s": 1}), popen=a.popen, env=a.env())
    process.start()
    try:
        client = chain.topo["c"].thread(_stalled_client, chain.a_address, 80, 6.0)
        wait_until(lambda: process.status()["relay"]["active"] == 1, 10,
                   "the stalled connection to be relayed")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.process is not None
        assert process.process.wait(timeout=30) == 0
        elapsed = time.monotonic() - started
        # drain.timeout_s, then the graceful close's grace (2 s), then the abort: bounded.
        assert 1.0 <= elapsed < 8, elapsed
        received = client.result(timeout=60)
        assert received < HUGE_FILE_BYTES  # cut: the drain timeout was reached
        drain_timeouts = process.log_events("drain_timeout")
        assert drain_timeouts and drain_timeouts[0]["remaining"] == 1
        ends = [r for r in process.log_events("connection") if r.get("name") == "web"]
        assert ends and ends[-1]["end"] == "drain-timeout"
    finally:
        process.stop()


def test_servald_crash_and_restart_under_load(chain: Chain, front: TranslatorProcess,
                                              tmp_path: Path) -> None:
    downloads = [(start_download(chain, tmp_path / f"dl{i}.bin"), tmp_path / f"dl{i}.bin")
                 for i in range(4)]
    wait_downloads_started(downloads)
    victims = {"a": front.status()["stack"]["pid"],
               "e": chain.exporter.status()["stack"]["pid"]}
    restarts_before = {"a": front.status()["stack"]["restarts"],
                       "e": chain.exporter.status()["stack"]["restarts"]}
    assert all(victims.values())
    for pid in victims.values():
        os.kill(pid, signal.SIGKILL)
    # Both supervisors notice, restart servald and are healthy again.
    def restarted(process: TranslatorProcess, name: str) -> bool:
        stack = process.status()["stack"]
        return bool(stack["up"] and stack["pid"] != victims[name]
                    and stack["restarts"] > restarts_before[name])

    for name, process in (("a", front), ("e", chain.exporter)):
        wait_until(functools.partial(restarted, process, name), 30,
                   f"servald on {name} to be restarted")
        assert "killed by SIGKILL" in (process.status()["stack"]["last_exit"] or "")
    # No established connection was lost.
    finish_downloads(downloads, chain)
    # The exporters listen again and new connections work end to end.
    wait_until(lambda: all(x["listening"] for x in chain.exporter.status()["exporters"]), 30,
               "the exporters to listen again")
    page = wait_until(lambda: curl(chain, f"http://{chain.a_address}/index.html").stdout, 30,
                      "a new connection after the restart")
    assert page == "hello through serval\n"
    text = metrics_text(chain, "a")
    assert metric_value(text, "serval_translator_servald_restarts_total") >= 1
    assert metric_value(text, "serval_translator_servald_up") == 1


def test_status_command_in_the_namespace(chain: Chain, front: TranslatorProcess) -> None:
    from translator_testlib import python_env

    a = chain.topo["a"]
    human = a.run([sys.executable, "-m", "translator", "status", "--config",
                   str(front.config_path)], env=python_env(a.env()), check=False)
    assert human.returncode == 0, human.stderr
    assert "servald up" in human.stdout and "web.example" in human.stdout
    as_json = a.run([sys.executable, "-m", "translator", "status", "--json", "--socket",
                     front.status_socket], env=python_env(a.env()), check=False)
    import json

    document = json.loads(as_json.stdout)
    assert document["state"] == "running"
    assert {x["name"] for x in document["listeners"]} == {"web", "pp", "rec"}
    with contextlib.suppress(KeyError):
        assert document["stack"]["servald"]["role"] == "host"
