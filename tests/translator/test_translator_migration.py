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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain_testlib import (
    Chain,
    ChainSettings,
    Download,
    front_appliance,
    metric_value,
    migration_chain,
    servalctl,
    watched_flows,
)
from translator_testlib import TranslatorProcess, wait_until

pytestmark = [pytest.mark.netns]

FILE_BYTES = 96 * 1024 * 1024
MOVE_AFTER_BYTES = 16 * 1024 * 1024
MIGRATE_TIMEOUT_S = 20
SETTINGS = ChainSettings(prefix="svtmig", service="files.example", http_port=8090,
                         metrics_port=9465, file_bytes=FILE_BYTES,
                         rate="16M")  # curl --limit-rate: ~6 s for the file; moves early on


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with migration_chain(SETTINGS, tmp_path_factory.mktemp("migration")) as built:
        yield built


@pytest.fixture
def front(chain: Chain, tmp_path: Path) -> Iterator[TranslatorProcess]:
    with front_appliance(chain, tmp_path) as process:
        yield process


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
