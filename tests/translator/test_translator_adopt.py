"""servald restarts under a relayed flow, which is handed back and can still migrate (issue 6
item 2), across network namespaces with real processes.

Topology (serval/topology.py)::

    c ---- a ======= dc LAN ======= r
                        ||
                        e  (nginx on 127.0.0.1)

A legacy client (curl on ``c``) downloads a large file, paced, through the front appliance
``a`` -> (SAL via the router ``r``) -> the exporter appliance ``e`` -> nginx. Mid-download the
bundled servald of one appliance is killed with SIGKILL. The relay keeps the bytes flowing;
the supervisor restarts servald; the appliance hands the flow back (op ``adopt`` with the
sealed state servald gave it) and the new servald lists it. Then that end of the Serval hop
moves to a new address: the move must complete, the file arrive byte-exact, and no kernel on
the way count a reset.
"""

from __future__ import annotations

import os
import signal
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
KILL_AFTER_BYTES = 12 * 1024 * 1024
MIGRATE_TIMEOUT_S = 20
SETTINGS = ChainSettings(prefix="svtadp", service="files-adopt.example", http_port=8092,
                         metrics_port=9466, file_bytes=FILE_BYTES,
                         rate="12M",  # curl --limit-rate: ~8 s; the kill and move come early
                         restart_backoff_s=0.2)
RESTART_TIMEOUT_S = 30
RST_COUNTERS = ("Tcp.OutRsts", "TcpExt.TCPAbortOnData", "TcpExt.TCPAbortOnClose",
                "TcpExt.TCPAbortOnTimeout", "TcpExt.TCPAbortOnLinger", "TcpExt.TCPAbortFailed")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with migration_chain(SETTINGS, tmp_path_factory.mktemp("adopt")) as built:
        yield built


@pytest.fixture
def front(chain: Chain, tmp_path: Path) -> Iterator[TranslatorProcess]:
    with front_appliance(chain, tmp_path) as process:
        yield process


def rst_counters(chain: Chain) -> dict[str, int]:
    """Resets sent or counted per namespace. EstabResets only for the legacy client: on the
    SAL hosts each migration counts one when the old socket, still in repair mode, is
    released (silently: tcp_disconnect, no RST on the wire; tcp-repair-migration.md 3.4)."""
    counters: dict[str, int] = {}
    for host in ("c", "a", "e"):
        values = chain.topo[host].net_counters()
        for name in (*RST_COUNTERS, *(("Tcp.EstabResets",) if host == "c" else ())):
            counters[f"{host}:{name}"] = values.get(name, 0)
    return counters


def kill_servald(process: TranslatorProcess) -> int:
    """SIGKILL the appliance's bundled servald; returns the killed pid."""
    stack = process.status()["stack"]
    pid = int(stack["pid"])
    restarts = int(stack["restarts"])
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        now = process.status()["stack"]
        return bool(now["up"] and now["pid"] not in (None, pid) and now["restarts"] > restarts)

    wait_until(restarted, RESTART_TIMEOUT_S, "servald to be restarted by the supervisor")
    assert "killed by SIGKILL" in (process.status()["stack"]["last_exit"] or "")
    return pid


def adopted_flow(process: TranslatorProcess, flow: int) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: next((f for f in watched_flows(process)
                      if f["flow"] == flow and f.get("adopted")), None),
        RESTART_TIMEOUT_S, f"flow {flow} to be adopted by the restarted servald")
    return found


def assert_adoption_recorded(chain: Chain, process: TranslatorProcess, host: str,
                             flow: int, total: int = 1) -> None:
    # One line from the appliance (role listener/exporter) and one from servald (its role in
    # the flow: client/server); the log file holds both processes' lines.
    lines = wait_until(lambda: [r for r in process.log_events("flow_adopted")
                                if r.get("flow") == flow], 10, "the adoption lines")
    assert sorted(str(r["role"]) for r in lines) == sorted(
        ["listener" if host == "a" else "exporter", "client" if host == "a" else "server"])
    assert metric_value(chain, host, "serval_translator_flow_adoptions_total",
                        result="adopted") == total
    assert metric_value(chain, host, "serval_translator_flow_adoptions_total",
                        result="failed") == 0
    # The sealed state never reaches a log.
    assert all(len(str(r.get("state", ""))) < 64 for r in process.log_events())


def test_front_servald_killed_flows_adopted_then_move(chain: Chain, front: TranslatorProcess,
                                                      tmp_path: Path) -> None:
    """Two downloads at once: both flows (one watch connection) are handed back."""
    topo = chain.topo
    a_old = str(topo["a"].address("dc"))
    downloads = [Download(chain, tmp_path / f"file{n}.bin") for n in range(2)]
    try:
        for download in downloads:
            download.wait_for_bytes(KILL_AFTER_BYTES)
        def both_watched() -> list[dict[str, Any]]:
            found = [f for f in watched_flows(front) if f["local"]["address"] == a_old]
            return found if len(found) == 2 else []

        watched = wait_until(both_watched, 10, "the front's two watched flows")
        flows = sorted(int(f["flow"]) for f in watched)
        resets_before = rst_counters(chain)
        received_at_kill = [d.received() for d in downloads]
        kill_servald(front)
        for before in watched:
            listed = adopted_flow(front, int(before["flow"]))
            assert listed["local"] == before["local"] and listed["remote"] == before["remote"]
        # The bytes never stopped: the relay owns the sockets.
        assert [d.received() for d in downloads] > received_at_kill
        # The Serval side still moves: the restarted servald initiates, the exporter's
        # servald (never restarted) answers.
        a_new = str(topo.add_address("a", "dc"))
        for flow in flows:
            result = servalctl(topo["a"], front, "migrate", "flow", str(flow), "--to", a_new)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "completed" in result.stdout, result.stdout
        topo.remove_address("a", a_old)
        moved = wait_until(lambda: [f for f in watched_flows(front) if f["flow"] in flows
                                    and f["local"]["address"] == a_new
                                    and f["migrations"] >= 1][1:], 10,
                           "the front's flows on its new address")
        assert all(f["migrations"] == 1 for f in moved)
        assert all(d.received() < FILE_BYTES for d in downloads), "moved after the download"
        for download in downloads:
            download.assert_intact()
    finally:
        for download in downloads:
            download.kill()
    assert rst_counters(chain) == resets_before, "a kernel counted a reset"
    for flow in flows:
        assert_adoption_recorded(chain, front, "a", flow, total=2)
        ended = wait_until(lambda: [r for r in front.log_events("connection")
                                    if r.get("flow") == flow], 10,  # noqa: B023
                           "the front's connection line")
        assert ended[-1]["end"] == "eof" and ended[-1]["migrations"] == 1
    # The pairs ended, so did their (adopted) watches: servald released its copies.
    wait_until(lambda: not watched_flows(front), 10, "the front's watches to close")


def test_exporter_servald_killed_flow_adopted_then_moves(chain: Chain,
                                                         front: TranslatorProcess,
                                                         tmp_path: Path) -> None:
    topo = chain.topo
    e_old = str(topo["e"].address("dc"))
    download = Download(chain, tmp_path / "file.bin")
    try:
        download.wait_for_bytes(KILL_AFTER_BYTES)
        [watched] = wait_until(lambda: [f for f in watched_flows(chain.exporter)
                                        if f["local"]["address"] == e_old], 10,
                               "the exporter's watched flow")
        flow = int(watched["flow"])
        resets_before = rst_counters(chain)
        kill_servald(chain.exporter)
        adopted_flow(chain.exporter, flow)
        wait_until(lambda: all(x["listening"] for x in chain.exporter.status()["exporters"]),
                   20, "the exporter to listen again")
        # This time the exporter's host loses its address: the restarted servald moves the
        # adopted flow by itself (netlink trigger); the front's servald answers.
        e_new = str(topo.add_address("e", "dc"))
        topo.remove_address("e", e_old)
        # (The 4-tuple changes at the commit, the count once the pending bytes are written.)
        moved = wait_until(lambda: [f for f in watched_flows(chain.exporter)
                                    if f["flow"] == flow and f["local"]["address"] == e_new
                                    and f["migrations"] >= 1],
                           MIGRATE_TIMEOUT_S, "the exporter's flow moved to its new address")
        assert moved[0]["migrations"] == 1
        assert download.received() < FILE_BYTES, "the move happened after the download"
        download.assert_intact()
    finally:
        download.kill()
    assert rst_counters(chain) == resets_before, "a kernel counted a reset"
    assert_adoption_recorded(chain, chain.exporter, "e", flow)
    # The front's watch saw the move from the other side (its servald was never restarted).
    lines = wait_until(lambda: [r for r in front.log_events("migration")
                                if r.get("role") == "listener"
                                and r.get("outcome") == "completed"], 10,
                       "the front's migration line")
    assert lines[0]["migrations"] == 1
