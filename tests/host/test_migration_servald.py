"""Migration through real servald processes: servalctl, the automatic trigger, interfaces.

Two servalds (ad-hoc mode) in two namespaces; the stream is set up through their control API
(`connect` on a, an accept event on b), and each end's application is a separate process
that takes part in migrations over servald's control API itself (`watch` with its socket,
then park / swap / resume events): exactly what the library and the translator's relay do.
200 MiB each way, both directions at once, sha256 checked at both ends, no RST counted.
"""

from __future__ import annotations

import contextlib
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from serval.control import ControlClient
from serval.host.migration_lab import (
    REPOSITORY_ROOT,
    AppProcess,
    ServaldProcess,
    assert_no_resets,
    digest_of,
    wait_for,
)
from serval.host.migration_lab import (
    SERVALD_SERVICE as SERVICE,
)
from serval.topology import LanSpec, LinkSpec, Shaping, Topology, TopologySpec

pytestmark = pytest.mark.netns

BULK_BYTES = 200 << 20
# servalctl is a fresh Python process (hundreds of ms to start): at this rate the 200 MiB take
# ~3.4 s, so the flow is still moving data when the command lands.
SHAPING = Shaping(rate="500mbit")


@contextlib.contextmanager
def daemons(topology: Topology, workdir: Path,
            **config: Any) -> Iterator[tuple[ServaldProcess, ...]]:
    started: list[ServaldProcess] = []
    try:
        for name in ("a", "b"):
            started.append(ServaldProcess(topology[name], workdir, **config))
        yield tuple(started)
    finally:
        for daemon in started:
            daemon.stop()


class Stream:
    """A stream a -> b set up through servald, with a watching application at each end."""

    def __init__(self, a: ServaldProcess, b: ServaldProcess, workdir: Path, seed: int) -> None:
        self.listener = ControlClient(b.socket_path)
        self.listener.request("listen", service=SERVICE, type="stream", backlog=8)
        with ControlClient(a.socket_path) as client:
            reply = client.call("connect", {"service": SERVICE, "type": "stream",
                                            "timeout_s": 10.0})
        self.client_flow = int(reply.message["flow"])
        self.client_sock = socket.socket(fileno=reply.fds[0])
        accept = self.listener.next_event(10.0)
        assert accept.message["event"] == "accept"
        self.server_flow = int(accept.message["flow"])
        self.server_sock = socket.socket(fileno=accept.fds[0])
        client_seed, server_seed = seed * 2 + 1, seed * 2 + 2
        self.client_app = AppProcess(
            "client", self.client_sock, BULK_BYTES, client_seed,
            digest_of(server_seed, BULK_BYTES), str(workdir),
            servald={"path": a.socket_path, "flow": self.client_flow})
        self.server_app = AppProcess(
            "server", self.server_sock, BULK_BYTES, server_seed,
            digest_of(client_seed, BULK_BYTES), str(workdir),
            servald={"path": b.socket_path, "flow": self.server_flow})
        # Our copies go: the applications (and servald) hold the sockets now.
        self.client_sock.close()
        self.server_sock.close()
        assert a.flow(self.client_flow).get("watched") is True
        assert b.flow(self.server_flow).get("watched") is True

    def start(self, fraction: float) -> None:
        self.client_app.start()
        self.server_app.start()
        wait_for(lambda: min(self.client_app.progress()[0], self.server_app.progress()[0])
                 >= BULK_BYTES * fraction, f"{fraction:.0%} of the transfer")

    def finish(self) -> None:
        try:
            self.client_app.finish()
            self.server_app.finish()
        finally:
            self.close()

    def close(self) -> None:
        self.client_app.close()
        self.server_app.close()
        self.listener.close()


def _pair(topology: Callable[..., Topology]) -> Topology:
    return topology(TopologySpec.pair(shaping=SHAPING))


def test_servalctl_moves_a_flow(topology: Callable[..., Topology], tmp_path: Path) -> None:
    topo = _pair(topology)
    a, b = topo["a"], topo["b"]
    old_a = str(a.address(version=4))
    with daemons(topo, tmp_path) as (daemon_a, daemon_b):
        stream = Stream(daemon_a, daemon_b, tmp_path, 40)
        new_a = str(topo.add_address("a", "a-b"))
        try:
            stream.start(0.4)
            answer = daemon_a.servalctl("migrate", "flow", str(stream.client_flow),
                                        "--to", new_a)
            assert answer["outcome"] == "completed", answer
            assert answer["old"].startswith(old_a + ":") and answer["new"].startswith(new_a)
            assert answer["pause_ms"] > 0
            topo.remove_address("a", old_a)
            wait_for(lambda: daemon_b.flow(stream.server_flow)["migrations"] == 1,
                     "the responder's record", 10.0)
            listed = daemon_a.flow(stream.client_flow)
            assert listed["migrations"] == 1 and listed["local"]["address"] == new_a
            stream.finish()
        finally:
            stream.close()
        counters = daemon_a.request("counters")["counters"]
        assert counters["migration.completed_initiator"] == 1
        assert daemon_b.request("counters")["counters"]["migration.completed_responder"] == 1
        # One structured line per migration: flow, old and new address, pause, bytes re-sent.
        [line] = [text for text in daemon_a.log().splitlines()
                  if "] migration " in text and "role=initiator" in text]
        for field in (f"flow={stream.client_flow}", f"old={old_a}:", f"new={new_a}:",
                      "pause_ms=", "bytes_resent=", "outcome=completed"):
            assert field in line, (field, line)
    assert_no_resets(a, b)


def test_servald_moves_flows_off_a_deleted_address(topology: Callable[..., Topology],
                                                   tmp_path: Path) -> None:
    topo = _pair(topology)
    a, b = topo["a"], topo["b"]
    old_a = str(a.address(version=4))
    with daemons(topo, tmp_path) as (daemon_a, daemon_b):
        new_a = str(topo.add_address("a", "a-b"))
        stream = Stream(daemon_a, daemon_b, tmp_path, 41)
        try:
            stream.start(0.4)
            topo.remove_address("a", old_a)
            wait_for(lambda: daemon_a.flow(stream.client_flow)["migrations"] == 1,
                     "the automatic move", 10.0)
            assert daemon_a.flow(stream.client_flow)["local"]["address"] == new_a
            stream.finish()
        finally:
            stream.close()
        assert daemon_a.request("counters")["counters"]["migration.completed_initiator"] == 1
    assert_no_resets(a, b)


def test_servalctl_moves_every_flow_of_an_interface(topology: Callable[..., Topology],
                                                    tmp_path: Path) -> None:
    """Two links between a and b; b's servald is reached on both. `migrate interface eth0
    eth1` moves the flow from a's first link to its second."""
    topo = topology(TopologySpec(hosts=("a", "b"), links=(
        LinkSpec("a", "b", name="l1", shaping=SHAPING),
        LinkSpec("a", "b", name="l2", shaping=SHAPING))))
    a, b = topo["a"], topo["b"]
    with daemons(topo, tmp_path, broadcast=True) as (daemon_a, daemon_b):
        stream = Stream(daemon_a, daemon_b, tmp_path, 42)
        try:
            before = daemon_a.flow(stream.client_flow)["local"]["address"]
            assert before == str(a.address("l1"))
            stream.start(0.3)
            answer = daemon_a.servalctl("migrate", "interface", "eth0", "eth1")
            [moved] = answer["flows"]
            assert moved["outcome"] == "completed", moved
            assert daemon_a.flow(stream.client_flow)["local"]["address"] == str(a.address("l2"))
            stream.finish()
        finally:
            stream.close()
    assert_no_resets(a, b)


def test_migrating_an_unknown_flow_is_refused_plainly(topology: Callable[..., Topology],
                                                      tmp_path: Path) -> None:
    topo = _pair(topology)
    with daemons(topo, tmp_path):
        env = topo["a"].env()
        env["PYTHONPATH"] = str(REPOSITORY_ROOT)
        result = topo["a"].run([sys.executable, "-m", "serval.host.ctl", "migrate", "flow",
                                str(random.Random(1).getrandbits(31)), "--to", "eth0"],
                               env=env, check=False)
        assert result.returncode == 1
        assert "not a migratable flow" in result.stderr


def test_registrations_follow_the_host_to_its_new_address(
        topology: Callable[..., Topology], tmp_path: Path) -> None:
    """s registers its listener with router r; s's address changes (new one added, old one
    deleted). netlink tells servald at once and it re-registers with `previous_address`, so
    r swaps the FORWARD target in place: the service never has zero instances at r."""
    topo = topology(TopologySpec(hosts=("s",), routers=("r",),
                                 lans=(LanSpec("lan", ("r", "s")),)))
    r, s = topo["r"], topo["s"]
    old_s = str(s.address(version=4))
    router = ServaldProcess(r, tmp_path, router=True)
    host = ServaldProcess(s, tmp_path, routers=[str(r.address(version=4))])
    listener = ControlClient(host.socket_path)
    try:
        listener.request("listen", service=SERVICE, type="stream", backlog=8)

        def registered() -> list[str]:
            records = router.request("registrations").get("registrations", [])
            return [str(rec["address"]) for rec in records]

        wait_for(lambda: registered() == [old_s], "the first registration", 10.0)
        new_s = str(topo.add_address("s", "lan"))
        samples: list[list[str]] = []
        topo.remove_address("s", old_s)
        changed = time.monotonic()
        deadline = changed + 10.0
        while time.monotonic() < deadline:
            samples.append(registered())
            if samples[-1] == [new_s]:
                break
            time.sleep(0.02)
        assert samples[-1] == [new_s], samples[-5:]
        assert all(sample for sample in samples), "the service vanished from the router"
        # Followed on the netlink event, not the next periodic address refresh (2 s).
        assert time.monotonic() - changed < 2.0
    finally:
        listener.close()
        host.stop()
        router.stop()
