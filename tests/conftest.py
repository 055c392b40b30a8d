"""Shared fixtures: network-namespace topologies and the root requirement.

Tests that need root and network namespaces carry ``@pytest.mark.netns``; without root they
are skipped with the reason below (the collection hook adds the skip), so a plain
``pytest`` run as a user stays green and says why.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from serval.topology import Topology, TopologySpec, cleanup_stale

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root for network namespaces"

requires_root = pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    for item in items:
        if item.get_closest_marker("netns") is not None:
            item.add_marker(requires_root)


@pytest.fixture(scope="session", autouse=True)
def _remove_stale_topologies() -> None:
    """Leftovers of crashed runs (only ours, only with a dead owner) go before any test."""
    if IS_ROOT:
        cleanup_stale()


@pytest.fixture
def root() -> None:
    """Skip unless root (for tests that need it without the netns marker)."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)


TopologyFactory = Callable[..., Topology]


@pytest.fixture
def topology() -> Iterator[TopologyFactory]:
    """Build topologies: ``topo = topology(spec, verbose=False)``; all torn down after."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    built: list[Topology] = []

    def build(spec: TopologySpec, **kwargs: Any) -> Topology:
        topo = Topology.build(spec, **kwargs)
        built.append(topo)
        return topo

    yield build
    for topo in reversed(built):
        topo.close()


@pytest.fixture
def pair(topology: TopologyFactory) -> Topology:
    """Hosts 'a' and 'b' on one point-to-point link, IPv4 and IPv6."""
    return topology(TopologySpec.pair())


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two ends of a real loopback TCP connection: what servald would pass, and its peer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    with client, accepted:
        yield client, accepted
