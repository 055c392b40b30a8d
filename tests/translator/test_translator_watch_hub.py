"""A relayed flow's watch when servald dies in the middle of a migration (in-process, with a
stand-in relay): the pair must neither stay parked nor go on with a stream that may have a
hole. The servald-side thaw is tested in tests/host/test_servald_adopt.py, the whole restart
story in test_translator_adopt.py."""

from __future__ import annotations

import asyncio
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

import translator.migration as migration
from serval.control import Frame
from translator.metrics import Metrics
from translator.migration import FlowWatch, WatchHub
from translator.relay import Connection

FLOW = 4242


class StandInRelay:
    """What FlowWatch asks of RelayPool, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.metrics = Metrics()

    def park(self, connection: Connection) -> None:
        self.calls.append(("park",))

    def swap_fd(self, connection: Connection, side: str, new_fd: int) -> None:
        os.close(new_fd)
        self.calls.append(("swap",))

    def resume(self, connection: Connection, migrated: bool = True) -> None:
        self.calls.append(("resume", migrated))

    def abort(self, connection: Connection, reason: str) -> bool:
        self.calls.append(("abort", reason))
        return True


def make_watch(relay: StandInRelay, serval_fd: int) -> FlowWatch:
    connection = Connection(role="listener", name="web", service="web.example",
                            client="192.0.2.1:5000", server="?", idle_timeout_s=None,
                            connect_s=0.0, on_end=lambda c, r: None, flow=FLOW, pair_id=1)
    connection.generation = SimpleNamespace(connections={1: connection})  # type: ignore[assignment]
    connection.serval_fd = serval_fd
    hub = WatchHub(relay, "/nonexistent/servald.sock", structlog.get_logger())  # type: ignore[arg-type]
    watch = FlowWatch(hub, connection, "b", os.dup(serval_fd), structlog.get_logger())
    watch.drop_fd_copy()
    return watch


def event(phase: str, fds: list[int] | None = None) -> Frame:
    return Frame({"event": "migration", "flow": FLOW, "phase": phase}, fds or [])


def test_lost_while_parked_before_the_swap_resumes_the_old_socket(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        relay = StandInRelay()
        watch = make_watch(relay, tcp_pair[0].fileno())
        watch.handle(event("park"))
        watch.watch_lost()
        return relay.calls

    assert asyncio.run(scenario()) == [("park",), ("resume", False)]


def test_lost_between_swap_and_resume_resets_the_pair(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        relay = StandInRelay()
        watch = make_watch(relay, tcp_pair[0].fileno())
        watch.handle(event("park"))
        watch.handle(event("swap", [os.dup(tcp_pair[0].fileno())]))
        watch.watch_lost()
        watch.watch_lost()  # once only
        return relay.calls

    assert asyncio.run(scenario()) == [("park",), ("swap",), ("abort", "migration-interrupted")]


@pytest.mark.usefixtures("root")
def test_a_frozen_socket_waits_parked_for_the_thaw_then_goes_on(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        relay = StandInRelay()
        watch = make_watch(relay, tcp_pair[0].fileno())
        watch.handle(event("park"))
        tcp_pair[0].setsockopt(socket.IPPROTO_TCP, 19, 1)  # what servald's freeze left
        watch.watch_lost()
        assert relay.calls == [("park",)]  # held
        tcp_pair[0].setsockopt(socket.IPPROTO_TCP, 19, 0)  # the restarted servald's adopt
        watch.adopted()
        return relay.calls

    assert asyncio.run(scenario()) == [("park",), ("resume", False)]


@pytest.mark.usefixtures("root")
def test_a_frozen_socket_nobody_thaws_is_reset(tcp_pair: tuple[socket.socket, socket.socket],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration, "HOLD_FROZEN_S", 0.05)

    async def scenario() -> list[tuple[Any, ...]]:
        relay = StandInRelay()
        watch = make_watch(relay, tcp_pair[0].fileno())
        watch.handle(event("park"))
        tcp_pair[0].setsockopt(socket.IPPROTO_TCP, 19, 1)
        watch.watch_lost()
        await asyncio.sleep(0.2)
        tcp_pair[0].setsockopt(socket.IPPROTO_TCP, 19, 0)
        return relay.calls

    assert asyncio.run(scenario()) == [("park",), ("abort", "migration-interrupted")]
