"""The library applications of the migration tests, and their program.

A blocking-socket client (`serval.socket`: one thread blocked in recv() while another runs
sendall()) and an asyncio server (`serval.asyncio.start_server`) exchange a seeded stream each
way and report, as one JSON line, what they received, whether its sha256 matched, and what the
library says of the stream (`watch_status`: watched, migrations, adoptions). They contain no
migration code: whatever servald does to the flow, the library handles underneath them.

    python library_apps.py ROLE SIZE SEED_OUT SEED_IN TIMEOUT_S   (ROLE: blocking-client |
                                                                   asyncio-server)
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
from typing import Any

from serval.host.migration_lab import (
    REPOSITORY_ROOT,
    SERVALD_SERVICE,
    digest_of,
    random_bytes,
)
from serval.topology import Host

CHUNK_BYTES = 1 << 20


def _status(status: Any) -> dict[str, object]:
    return {"watched": status.watched, "migrations": status.migrations,
            "adoptions": status.adoptions}


def blocking_client(size: int, seed_out: int, seed_in: int,
                    timeout_s: float) -> dict[str, object]:
    import serval

    data = random_bytes(seed_out, size)
    expected = digest_of(seed_in, size)
    sock = serval.create_connection(SERVALD_SERVICE)
    received = 0
    digest = hashlib.sha256()
    errors: list[BaseException] = []

    def reader() -> None:
        nonlocal received
        try:
            while received < size:
                chunk = sock.recv(CHUNK_BYTES)  # blocks across migrations and adoptions
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
    thread.join(timeout_s)
    result = {"received": received, "ok": digest.hexdigest() == expected and not errors,
              "errors": [repr(e) for e in errors], **_status(sock.watch_status())}
    sock.close()
    return result


async def asyncio_server(size: int, seed_out: int, seed_in: int,
                         timeout_s: float) -> dict[str, object]:
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
        errors: list[str] = []
        try:
            while True:
                chunk = await reader.read(CHUNK_BYTES)
                if not chunk:
                    break
                digest.update(chunk)
                received += len(chunk)
            await sender
        except Exception as exc:
            errors.append(repr(exc))
        result.update(received=received, ok=digest.hexdigest() == expected and not errors,
                      errors=errors, **_status(serval.asyncio.watch_status(writer)))
        writer.close()
        done.set()

    server = await serval.asyncio.start_server(handle, SERVALD_SERVICE)
    print("listening", flush=True)
    async with asyncio.timeout(timeout_s):
        await done.wait()
    server.close()
    return result


def start_app(host: Host, role: str, size: int, seed_out: int, seed_in: int,
              timeout_s: float) -> subprocess.Popen[str]:
    """Run one application in `host`'s namespace (it talks to that host's servald)."""
    env = host.env()
    env["PYTHONPATH"] = str(REPOSITORY_ROOT)
    return host.popen([sys.executable, os.path.abspath(__file__), role, str(size),
                       str(seed_out), str(seed_in), str(timeout_s)],
                      env=env, stdout=subprocess.PIPE, text=True)


def app_result(process: subprocess.Popen[str], timeout_s: float) -> dict[str, object]:
    """The application's JSON report (its last line starting with '{')."""
    out, _ = process.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {process.returncode}): {out[-2000:]}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main(argv: list[str]) -> int:
    role, size, seed_out, seed_in = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    timeout_s = float(argv[4])
    if role == "blocking-client":
        result = blocking_client(size, seed_out, seed_in, timeout_s)
    else:
        result = asyncio.run(asyncio_server(size, seed_out, seed_in, timeout_s))
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
