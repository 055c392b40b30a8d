"""Address monitoring, interface policy, source routing and the migration triggers."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serval.errors import ConfigError
from serval.host.migration_lab import SalNode, assert_no_resets, establish, lab_nodes, wait_for
from serval.host.netmon import (
    AddressInfo,
    ChangeKind,
    LinkInfo,
    MigrationTriggers,
    NetChange,
    NetMonitor,
    NetSnapshot,
    diff,
)
from serval.host.policy import (
    InterfacePreference,
    InterfaceSelector,
    MigrationPolicy,
    SourceRouting,
    parse_migration_policy,
)
from serval.topology import Host, LinkSpec, Shaping, Topology, TopologySpec

SERVICE_ADDRESS = "10.77.100.1"  # b's loopback address, reachable over both links
BULK_BYTES = 200 << 20

# --------------------------------------------------------------------------------------------
# configuration and ranking (no root needed)


def test_policy_parses_and_names_what_is_wrong() -> None:
    policy = parse_migration_policy(
        [{"name": "eth0", "preference": 100, "cost": 1}, {"name": "wwan*", "preference": 10}],
        {"automatic": True, "policy": False, "hold_down_s": 0.5, "source_routing": True},
        "servald.yaml")
    assert policy.interfaces == (InterfacePreference("eth0", 100, 1.0),
                                 InterfacePreference("wwan*", 10, 0.0))
    assert (policy.automatic, policy.policy, policy.hold_down_s, policy.source_routing) == \
        (True, False, 0.5, True)
    assert parse_migration_policy(None, None) == MigrationPolicy()
    bad: list[tuple[object, object, str]] = [
        ([{"name": "eth0", "preference": "high"}], None, r"interfaces\[0\]\.preference"),
        ([{"name": "eth0"}, {"name": "eth0"}], None, r"interfaces\[1\]\.name: 'eth0' listed"),
        ([{"name": "eth0", "speed": 1}], None, r"interfaces\[0\]: unknown key\(s\) speed"),
        ({"eth0": 1}, None, "interfaces: expected a list"),
        (None, {"hold_down_s": -1}, "migration.hold_down_s"),
        (None, {"automatic": "yes"}, "migration.automatic: expected true or false"),
        (None, {"auto": True}, r"migration: unknown key\(s\) auto"),
    ]
    for interfaces, migration, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_migration_policy(interfaces, migration, "servald.yaml")


def _info(address: str, ifname: str, index: int) -> AddressInfo:
    return AddressInfo(ipaddress.ip_address(address), 24, index, ifname, 0, 0, 0.0)


def test_selector_ranks_by_preference_then_cost_then_unlisted() -> None:
    policy = MigrationPolicy(interfaces=(InterfacePreference("wl*", 50, 2.0),
                                         InterfacePreference("eth0", 50, 1.0),
                                         InterfacePreference("wwan0", 10, 0.0)))
    selector = InterfaceSelector(policy)
    wifi, wired = _info("10.0.1.1", "wlan0", 3), _info("10.0.2.1", "eth0", 2)
    cell, other = _info("10.0.3.1", "wwan0", 4), _info("10.0.4.1", "eth9", 5)
    assert selector.rank([other, cell, wifi, wired]) == [wired, wifi, cell, other]
    assert selector.better(wired, wifi) and not selector.better(wifi, wired)
    assert not selector.better(_info("10.0.2.2", "eth0", 2), wired)  # same rank: stay


def test_snapshot_usability_and_diff() -> None:
    up = LinkInfo(2, "eth0", 0x1 | 0x40, 0.0)
    down = LinkInfo(3, "eth1", 0x1, 0.0)
    a1, a2 = _info("10.0.0.1", "eth0", 2), _info("10.0.1.1", "eth1", 3)
    tentative = AddressInfo(ipaddress.ip_address("fd00::1"), 64, 2, "eth0", 0, 0x40, 0.0)
    link_local = AddressInfo(ipaddress.ip_address("fe80::1"), 64, 2, "eth0", 253, 0, 0.0)
    old = NetSnapshot({2: up, 3: down}, {a1.address: a1, a2.address: a2,
                                         tentative.address: tentative,
                                         link_local.address: link_local})
    assert [i.address for i in old.usable_addresses()] == [a1.address]
    new = NetSnapshot({2: LinkInfo(2, "eth0", 0x1, 0.0), 3: LinkInfo(3, "eth1", 0x41, 0.0)},
                      {a2.address: a2})
    changes = diff(old, new)
    assert NetChange(ChangeKind.LINK_DOWN, 2, "eth0") in changes
    assert NetChange(ChangeKind.LINK_UP, 3, "eth1") in changes
    assert NetChange(ChangeKind.ADDRESS_REMOVED, 2, "eth0", a1.address) in changes
    assert diff(new, new) == []


# --------------------------------------------------------------------------------------------
# the monitor in a namespace


class _LoopThread:
    """An asyncio loop on a thread inside a host's namespace (what servald would be)."""

    def __init__(self, host: Host) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = host.thread(self.loop.run_forever)

    def run(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _ip(host: Host, *argv: str) -> None:
    host.run(["ip", *argv])


@pytest.mark.netns
def test_monitor_follows_addresses_and_links(pair: Topology) -> None:
    a = pair["a"]
    seen: list[NetChange] = []
    runner = _LoopThread(a)
    try:
        async def start() -> NetMonitor:
            monitor = NetMonitor(lambda changes, _: seen.extend(changes))
            await monitor.start()
            return monitor

        monitor: NetMonitor = runner.run(start())
        a1 = a.address(version=4)
        assert monitor.snapshot.usable(a1)
        added = pair.add_address("a", "a-b")
        wait_for(lambda: NetChange(ChangeKind.ADDRESS_ADDED, _ifindex(monitor, "eth0"), "eth0",
                                   added) in seen, "address added", 5.0)
        pair.set_link("a", "a-b", False)
        wait_for(lambda: not monitor.snapshot.usable(added), "link down", 5.0)
        # The snapshot changes as each message is applied, the callback runs after the batch:
        # wait for the callback rather than assume it already ran (this raced under load).
        wait_for(lambda: any(c.kind is ChangeKind.LINK_DOWN for c in seen), "LINK_DOWN", 5.0)
        pair.set_link("a", "a-b", True)
        wait_for(lambda: monitor.snapshot.usable(added), "link up", 5.0)
        pair.remove_address("a", added)
        wait_for(lambda: any(c.kind is ChangeKind.ADDRESS_REMOVED and c.address == added
                             for c in seen), "ADDRESS_REMOVED", 5.0)
        assert added not in monitor.snapshot.addresses
        assert monitor.counters["overflows"] == 0
        runner.run(monitor.close())
    finally:
        runner.close()


def _ifindex(monitor: NetMonitor, name: str) -> int:
    return next(link.index for link in monitor.snapshot.links.values() if link.name == name)


@pytest.mark.netns
def test_monitor_resyncs_after_enobufs(pair: Topology) -> None:
    """A tiny receive buffer and a busy loop make the kernel drop notifications (ENOBUFS):
    the monitor dumps again and reports the removals it would otherwise have missed."""
    a = pair["a"]
    seen: list[NetChange] = []
    runner = _LoopThread(a)
    try:
        async def start() -> NetMonitor:
            monitor = NetMonitor(lambda changes, _: seen.extend(changes), rcvbuf_bytes=1024)
            await monitor.start()
            return monitor

        monitor: NetMonitor = runner.run(start())
        batch = [f"10.77.1.{100 + i}" for i in range(120)]
        for address in batch:
            _ip(a, "addr", "add", f"{address}/32", "dev", "eth0")
        wait_for(lambda: all(ipaddress.ip_address(x) in monitor.snapshot.addresses
                             for x in batch), "the added addresses", 10.0)
        blocked = runner.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop stops reading
        assert blocked is not None
        script = "\n".join(f"addr del {x}/32 dev eth0" for x in batch)
        a.run(["ip", "-batch", "-"], input=script + "\n")
        wait_for(lambda: not any(ipaddress.ip_address(x) in monitor.snapshot.addresses
                                 for x in batch), "the removals", 10.0)
        assert monitor.counters["overflows"] >= 1
        removed = {c.address for c in seen if c.kind is ChangeKind.ADDRESS_REMOVED}
        assert {ipaddress.ip_address(x) for x in batch} <= removed
        runner.run(monitor.close())
    finally:
        runner.close()


# --------------------------------------------------------------------------------------------
# multi-homed hosts: two links between a and b, b's service address on its loopback


def _two_links(topology: Callable[..., Topology], rate: str | None = None) -> Topology:
    shaping = Shaping(rate=rate) if rate else None
    topo = topology(TopologySpec(hosts=("a", "b"), links=(
        LinkSpec("a", "b", name="l1", shaping=shaping),
        LinkSpec("a", "b", name="l2", shaping=shaping)), ipv6=False))
    _ip(topo["b"], "addr", "add", f"{SERVICE_ADDRESS}/32", "dev", "lo")
    _add_service_routes(topo)
    return topo


def _add_service_routes(topo: Topology) -> None:
    a, b = topo["a"], topo["b"]
    for segment, metric in (("l1", "10"), ("l2", "20")):
        gateway = str(b.address(segment))
        a.run(["ip", "route", "replace", f"{SERVICE_ADDRESS}/32", "via", gateway, "metric",
               metric], check=False)


def _route_device(host: Host, destination: str, source: str) -> str:
    output = host.run(["ip", "route", "get", destination, "from", source]).stdout.split()
    return output[output.index("dev") + 1]


@pytest.mark.netns
def test_source_routing_sends_each_address_out_of_its_own_interface(
        topology: Callable[..., Topology]) -> None:
    topo = _two_links(topology)
    a = topo["a"]
    a1, a2 = str(a.address("l1")), str(a.address("l2"))
    # Weak host model: a2's packets follow the main table (the lower metric, link 1).
    assert _route_device(a, SERVICE_ADDRESS, a2) == "eth0"
    runner = _LoopThread(a)
    routing = SourceRouting()
    try:
        async def sync() -> None:
            monitor = NetMonitor(lambda *_: None)
            await monitor.start()
            await routing.sync(monitor.snapshot)
            await monitor.close()

        runner.run(sync())
        assert _route_device(a, SERVICE_ADDRESS, a2) == "eth1"
        assert _route_device(a, SERVICE_ADDRESS, a1) == "eth0"
        assert routing.errors == 0
        runner.run(routing.close())
        assert _route_device(a, SERVICE_ADDRESS, a2) == "eth0"  # nothing of ours is left
        assert "lookup" not in a.run(["ip", "rule"]).stdout.replace("lookup main", "") \
            .replace("lookup local", "").replace("lookup default", "")
    finally:
        runner.close()


def _start_triggers(node: SalNode, policy: MigrationPolicy) -> tuple[NetMonitor,
                                                                     MigrationTriggers]:
    async def start() -> tuple[NetMonitor, MigrationTriggers]:
        assert node.engine is not None
        triggers = MigrationTriggers(node.engine, policy,
                                     routing=SourceRouting() if policy.source_routing
                                     else None)
        monitor = NetMonitor(triggers.on_change)
        await monitor.start()
        triggers.start(monitor.snapshot)
        return monitor, triggers

    return node.run(start())


def _stop_triggers(node: SalNode, monitor: NetMonitor, triggers: MigrationTriggers) -> None:
    async def stop() -> None:
        await triggers.close()
        await monitor.close()

    node.run(stop())


@pytest.mark.netns
def test_deleting_the_address_moves_the_flow_automatically(
        topology: Callable[..., Topology], tmp_path: Path) -> None:
    topo = _two_links(topology, rate="1gbit")  # the transfer outlasts the move
    a, b = topo["a"], topo["b"]
    a1, a2 = str(a.address("l1")), str(a.address("l2"))
    policy = MigrationPolicy(source_routing=True)
    with lab_nodes(topo, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(30), BULK_BYTES, 30, str(tmp_path),
                        client_address=a1, server_address=SERVICE_ADDRESS)
        monitor, triggers = _start_triggers(node_a, policy)
        try:
            lab.start()
            wait_for(lambda: lab.client_app.progress()[0] > BULK_BYTES * 0.3, "30%")
            topo.remove_address("a", a1)
            wait_for(lambda: triggers.counters["automatic_completed"] == 1, "the move", 10.0)
            assert lab.client_sock.getsockname()[0] == a2
            lab.finish()
        finally:
            _stop_triggers(node_a, monitor, triggers)
            lab.close()
        [record] = node_a.records(lab.client_flow)
        assert record.new_local is not None and record.new_local[0] == a2
    assert_no_resets(a, b)


@pytest.mark.netns
def test_flows_return_to_the_preferred_interface(topology: Callable[..., Topology],
                                                 tmp_path: Path) -> None:
    """eth0 preferred: its link goes down (automatic move to eth1), comes back, and after the
    hold-down time the policy moves the flow home. Links are shaped to 1 Gbit/s so the
    200 MiB transfer outlasts both moves."""
    topo = _two_links(topology, rate="1gbit")
    a, b = topo["a"], topo["b"]
    a1, a2 = str(a.address("l1")), str(a.address("l2"))
    policy = MigrationPolicy(interfaces=(InterfacePreference("eth0", 100),
                                         InterfacePreference("eth1", 10)),
                             hold_down_s=0.3, source_routing=True)
    with lab_nodes(topo, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(31), BULK_BYTES, 31, str(tmp_path),
                        client_address=a1, server_address=SERVICE_ADDRESS)
        monitor, triggers = _start_triggers(node_a, policy)
        try:
            lab.start()
            wait_for(lambda: lab.client_app.progress()[0] > BULK_BYTES * 0.1, "10%")
            topo.set_link("a", "l1", False)
            wait_for(lambda: triggers.counters["automatic_completed"] == 1, "moving off", 10.0)
            assert lab.client_sock.getsockname()[0] == a2
            assert _route_device(a, SERVICE_ADDRESS, a2) == "eth1"
            topo.set_link("a", "l1", True)
            _add_service_routes(topo)  # what a network manager does when the link returns
            wait_for(lambda: triggers.counters["policy_completed"] == 1, "moving home", 15.0)
            assert lab.client_sock.getsockname()[0] == a1
            lab.finish()
        finally:
            _stop_triggers(node_a, monitor, triggers)
            lab.close()
        moves = [(r.old_local, r.new_local) for r in node_a.records(lab.client_flow)]
        assert [(old[0], new[0]) for old, new in moves if old and new] == [(a1, a2), (a2, a1)]
    assert_no_resets(a, b)

