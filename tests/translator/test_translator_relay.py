"""translator.relay: real socket pairs through the splice_ext engine, completions turned into one
canonical log line, metrics, per-connection idle timeouts and relay generations on reload."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from translator.config import RelayConfig
from translator.metrics import Metrics
from translator.relay import Connection, RelayPool


class RecordingLog:
    """Collects structlog-style calls (event name + fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str, event: str, **fields: Any) -> None:
        self.records.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._record("exception", event, **fields)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.records if event == name]


def sample(metrics: Metrics, metric: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def make_connection(ended: list[tuple[Connection, str]], idle_timeout_s: float | None = None,
                    name: str = "web") -> Connection:
    return Connection(role="listener", name=name, service="web.example", client="192.0.2.1:5",
                      server="10.0.0.2:54326", idle_timeout_s=idle_timeout_s, connect_s=0.002,
                      on_end=lambda c, reason: ended.append((c, reason)), flow=7,
                      mode="repair")


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    client, client_side = socket.socketpair()
    server_side, server = socket.socketpair()
    return client, client_side, server_side, server


def test_relayed_connection_ends_with_one_canonical_line() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        log = RecordingLog()
        pool = RelayPool(RelayConfig(workers=1), metrics, log)
        pool.start()
        ended: list[tuple[Connection, str]] = []
        client, client_side, server_side, server = pairs()
        connection = pool.add(make_connection(ended), client_side.detach(), server_side.detach())
        assert pool.active == 1
        labels = {"role": "listener", "name": "web", "service": "web.example"}
        assert sample(metrics, "serval_translator_connections_active", **labels) == 1
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client.sendall, b"x" * 300_000)
        received = 0
        server.settimeout(10)
        while received < 300_000:
            received += len(await loop.run_in_executor(None, server.recv, 1 << 20))
        server.sendall(b"reply")
        assert await loop.run_in_executor(None, client.recv, 100) == b"reply"
        # Live bytes reach the metrics before the connection ends (the sweep).
        pool.sweep(time.monotonic())
        assert sample(metrics, "serval_translator_bytes_total", **labels,
                      direction="upstream") == 300_000
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        await wait_for(lambda: ended)
        client.close()
        server.close()
        assert ended == [(connection, "eof")]
        lines = log.events("connection")
        assert len(lines) == 1
        line = lines[0]
        assert line["bytes_up"] == 300_000 and line["bytes_down"] == 5
        assert line["end"] == "eof" and line["client"] == "192.0.2.1:5" and line["flow"] == 7
        assert line["connect_ms"] == 2.0
        assert sample(metrics, "serval_translator_bytes_total", **labels,
                      direction="upstream") == 300_000  # not counted twice
        assert sample(metrics, "serval_translator_bytes_total", **labels,
                      direction="downstream") == 5
        assert sample(metrics, "serval_translator_connections_active", **labels) == 0
        assert sample(metrics, "serval_translator_connection_ends_total", **labels,
                      reason="eof") == 1
        assert pool.active == 0
        pool.stop()

    asyncio.run(scenario())


def test_idle_timeout_is_per_connection() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        log = RecordingLog()
        pool = RelayPool(RelayConfig(workers=1), metrics, log)
        pool.start()
        ended: list[tuple[Connection, str]] = []
        short = pairs()
        long = pairs()
        pool.add(make_connection(ended, idle_timeout_s=5, name="short"), short[1].detach(),
                 short[2].detach())
        pool.add(make_connection(ended, idle_timeout_s=None, name="long"), long[1].detach(),
                 long[2].detach())
        # Nothing moved for 6 s (as far as the sweep knows): only the short one is closed.
        assert pool.sweep(time.monotonic() + 6) == 1
        await wait_for(lambda: ended)
        assert [(c.name, reason) for c, reason in ended] == [("short", "idle-timeout")]
        # The legacy client saw a clean FIN, not a reset.
        short[0].settimeout(5)
        assert short[0].recv(10) == b""
        assert pool.active == 1
        # A connection with traffic is not idle.
        long[0].sendall(b"ping")
        long[3].settimeout(5)
        assert long[3].recv(10) == b"ping"
        assert pool.sweep(time.monotonic() + 3600) == 0
        pool.stop()
        await wait_for(lambda: len(ended) == 2)
        assert ended[1][1] == "aborted"
        for sock in (*short, *long):
            sock.close()

    asyncio.run(scenario())


def test_reconfigure_starts_a_new_generation_without_touching_old_pairs() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        log = RecordingLog()
        pool = RelayPool(RelayConfig(workers=1, pipe_size=65536), metrics, log)
        pool.start()
        ended: list[tuple[Connection, str]] = []
        old = pairs()
        old_connection = pool.add(make_connection(ended), old[1].detach(), old[2].detach())
        assert not pool.reconfigure(RelayConfig(workers=1, pipe_size=65536))  # unchanged
        assert pool.reconfigure(RelayConfig(workers=2, pipe_size=131072))
        assert pool.describe()["workers"] == 2
        assert pool.describe()["retiring_generations"] == [{"generation": 1, "active": 1}]
        new = pairs()
        new_connection = pool.add(make_connection(ended), new[1].detach(), new[2].detach())
        assert old_connection.generation is not new_connection.generation
        # The old pair still relays on the old engine.
        old[0].sendall(b"still here")
        old[3].settimeout(5)
        assert old[3].recv(100) == b"still here"
        old[0].close()
        old[3].close()
        await wait_for(lambda: len(ended) == 1)
        await wait_for(lambda: not pool.describe()["retiring_generations"])
        new[0].sendall(b"new")
        new[3].settimeout(5)
        assert new[3].recv(100) == b"new"
        pool.stop()
        for sock in (new[0], new[3]):
            sock.close()

    asyncio.run(scenario())


def test_close_all_flushes_and_fins() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        log = RecordingLog()
        pool = RelayPool(RelayConfig(workers=1), metrics, log)
        pool.start()
        ended: list[tuple[Connection, str]] = []
        sockets = pairs()
        pool.add(make_connection(ended), sockets[1].detach(), sockets[2].detach())
        sockets[3].sendall(b"last words")
        await asyncio.sleep(0.1)
        assert pool.close_all("drain-timeout") == 1
        await wait_for(lambda: ended)
        assert ended[0][1] == "drain-timeout"
        sockets[0].settimeout(5)
        data = b""
        while chunk := sockets[0].recv(100):
            data += chunk
        assert data == b"last words"
        pool.stop()
        for sock in (sockets[0], sockets[3]):
            sock.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("workers", [0, 3])
def test_effective_workers(workers: int) -> None:
    config = RelayConfig(workers=workers)
    assert config.effective_workers() >= 1
    if workers:
        assert config.effective_workers() == workers
