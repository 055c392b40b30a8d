"""Library applications keep working through migrations without knowing about them.

A blocking-socket client (`serval.socket`: one thread blocked in recv() while another runs
sendall()) and an asyncio server (`serval.asyncio.start_server`) exchange 200 MiB each way
through two real servalds; both ends are moved by servalctl in the middle. The applications
contain no migration code at all: the library parks, swaps and resumes underneath them.
This file is also the applications' program (`python test_migration_library.py ROLE ...`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_migration_servald import SERVICE, daemons

from serval.host.migration_lab import (
    REPOSITORY_ROOT,
    ServaldProcess,
    assert_no_resets,
    digest_of,
    random_bytes,
)
from serval.topology import Host, Shaping, Topology, TopologySpec

BULK_BYTES = 200 << 20
CHUNK_BYTES = 1 << 20
APP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# the applications (no migration code in them)


def blocking_client(size: int, seed_out: int, seed_in: int) -> dict[str, object]:
    import serval

    data = random_bytes(seed_out, size)
    expected = digest_of(seed_in, size)
    sock = serval.create_connection(SERVICE)
    received = 0
    digest = hashlib.sha256()
    errors: list[BaseException] = []

    def reader() -> None:
        nonlocal received
        try:
            while received < size:
                chunk = sock.recv(CHUNK_BYTES)  # blocks, possibly across a migration
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    thread.join(APP_TIMEOUT_S)
    gate = getattr(sock, "_gate", None)
    result = {"received": received, "ok": digest.hexdigest() == expected and not errors,
              "errors": [repr(e) for e in errors],
              "migrations": gate.migrations if gate is not None else None}
    sock.close()
    return result


async def asyncio_server(size: int, seed_out: int, seed_in: int) -> dict[str, object]:
    import serval.asyncio

    data = random_bytes(seed_out, size)
    expected = digest_of(seed_in, size)
    result: dict[str, object] = {}
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            view = memoryview(data)
            for offset in range(0, size, CHUNK_BYTES):
                writer.write(view[offset:offset + CHUNK_BYTES])
                await writer.drain()
            writer.write_eof()

        digest = hashlib.sha256()
        received = 0
        sender = asyncio.ensure_future(send())
        while True:
            chunk = await reader.read(CHUNK_BYTES)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
        await sender
        watches = [w for w in serval.asyncio._WATCHES if w.writer is writer]
        result.update(received=received, ok=digest.hexdigest() == expected,
                      migrations=watches[0].migrations if watches else None)
        writer.close()
        done.set()

    server = await serval.asyncio.start_server(handle, SERVICE)
    print("listening", flush=True)
    async with asyncio.timeout(APP_TIMEOUT_S):
        await done.wait()
    server.close()
    return result


def _main(argv: list[str]) -> int:
    role, size, seed_out, seed_in = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    if role == "blocking-client":
        result = blocking_client(size, seed_out, seed_in)
    else:
        result = asyncio.run(asyncio_server(size, seed_out, seed_in))
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


# --------------------------------------------------------------------------------------------
# the test


def _app(host: Host, role: str, seed_out: int, seed_in: int) -> subprocess.Popen[str]:
    env = host.env()
    env["PYTHONPATH"] = str(REPOSITORY_ROOT)
    return host.popen([sys.executable, os.path.abspath(__file__), role, str(BULK_BYTES),
                       str(seed_out), str(seed_in)], env=env, stdout=subprocess.PIPE,
                      text=True)


def _result(process: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = process.communicate(timeout=APP_TIMEOUT_S)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {process.returncode}): {out[-2000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


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
        server = _app(b, "asyncio-server", 2, 1)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        client = _app(a, "blocking-client", 1, 2)
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
            client_result, server_result = _result(client), _result(server)
        finally:
            for process in (client, server):
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        assert client_result == {"received": BULK_BYTES, "ok": True, "errors": [],
                                 "migrations": 2}, client_result
        assert server_result == {"received": BULK_BYTES, "ok": True, "migrations": 2}, \
            server_result
    assert_no_resets(a, b)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
