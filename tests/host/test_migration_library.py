"""Library applications keep working through migrations without knowing about them.

A blocking-socket client (`serval.socket`: one thread blocked in recv() while another runs
sendall()) and an asyncio server (`serval.asyncio.start_server`) exchange 200 MiB each way
through two real servalds; both ends are moved by servalctl in the middle. The applications
contain no migration code at all: the library parks, swaps and resumes underneath them.
The applications are in library_apps.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from library_apps import app_result, start_app
from test_migration_servald import daemons

from serval.host.migration_lab import (
    ServaldProcess,
    assert_no_resets,
)
from serval.topology import Shaping, Topology, TopologySpec

BULK_BYTES = 200 << 20
APP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# the test


def _watched_flow(daemon: ServaldProcess) -> int:
    flows = [f for f in daemon.request("flows")["flows"] if f.get("watched")]
    assert len(flows) == 1, flows
    return int(flows[0]["flow"])


@pytest.mark.netns
def test_blocking_and_asyncio_applications_survive_migrations(
        topology: Callable[..., Topology], tmp_path: Path) -> None:
    topo = topology(TopologySpec.pair(shaping=Shaping(rate="500mbit")))
    a, b = topo["a"], topo["b"]
    with daemons(topo, tmp_path) as (daemon_a, daemon_b):
        new_a, new_b = str(topo.add_address("a", "a-b")), str(topo.add_address("b", "a-b"))
        server = start_app(b, "asyncio-server", BULK_BYTES, 2, 1, APP_TIMEOUT_S)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        client = start_app(a, "blocking-client", BULK_BYTES, 1, 2, APP_TIMEOUT_S)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client_flow, server_flow = _watched_flow(daemon_a), _watched_flow(daemon_b)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "the streams were never watched"
                    time.sleep(0.05)
            time.sleep(0.8)  # ~25% of the transfer at 500 Mbit/s
            moved = daemon_a.servalctl("migrate", "flow", str(client_flow), "--to", new_a)
            assert moved["outcome"] == "completed", moved
            time.sleep(0.5)
            moved = daemon_b.servalctl("migrate", "flow", str(server_flow), "--to", new_b)
            assert moved["outcome"] == "completed", moved
            assert client.poll() is None and server.poll() is None  # moved mid-transfer
            client_result = app_result(client, APP_TIMEOUT_S)
            server_result = app_result(server, APP_TIMEOUT_S)
        finally:
            for process in (client, server):
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        # Each move swaps both ends' sockets (the peer's follows the new address): 2 each.
        expected = {"received": BULK_BYTES, "ok": True, "errors": [], "watched": True,
                    "migrations": 2, "adoptions": 0}
        assert client_result == expected, client_result
        assert server_result == expected, server_result
    assert_no_resets(a, b)

