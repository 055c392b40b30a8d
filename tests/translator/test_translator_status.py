"""The status endpoint: a real unix socket served by the asyncio server, read by the client
and rendered for humans."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from translator.status import StatusError, StatusServer, fetch_status, format_status

SNAPSHOT: dict[str, Any] = {
    "version": "0.1.0", "pid": 123, "state": "running", "uptime_s": 5.0,
    "config": {"path": "/etc/serval/translator.yaml", "generation": 2,
               "last_reload": {"result": "ok"}},
    "stack": {"mode": "bundled", "control_socket": "/run/x.sock", "up": False, "pid": None,
              "restarts": 3, "last_exit": "killed by SIGKILL"},
    "relay": {"active": 1, "completed": 9, "workers": 2, "pipe_size": 1048576},
    "listeners": [{"name": "web", "bind": "[::]:80", "service": "web.example", "active": 1,
                   "accepted": 10, "connect_errors": {"timeout": 2}, "paused": True}],
    "exporters": [{"name": "origin", "service": "web.example", "target": "127.0.0.1:8080",
                   "weight": 2, "active": 0, "accepted": 4, "connect_errors": {},
                   "listening": False}],
    "services": {"web.example": {"active": 1, "connections": 14, "bytes_up": 100,
                                 "bytes_down": 2000, "connect_errors": {"timeout": 2}}},
}


def test_server_and_client_over_a_real_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "status.sock")
    calls = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        return {**SNAPSHOT, "calls": len(calls)}

    async def scenario() -> None:
        server = StatusServer(path, 0o640, snapshot)
        await server.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, fetch_status, path)
        second = await loop.run_in_executor(None, fetch_status, path)
        assert first["calls"] == 1 and second["calls"] == 2  # live, not cached
        assert first["listeners"][0]["name"] == "web"
        # A second server on the same path refuses to steal it.
        with pytest.raises(StatusError, match="another serval-translator"):
            await StatusServer(path, 0o600, snapshot).start()
        await server.close()
        assert not os.path.exists(path)

    asyncio.run(scenario())


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "status.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crashed translator's leftover

    async def scenario() -> None:
        server = StatusServer(path, 0o600, lambda: {"ok": True})
        await server.start()
        assert await asyncio.get_running_loop().run_in_executor(None, fetch_status, path) == {
            "ok": True}
        await server.close()

    asyncio.run(scenario())


def test_client_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StatusError, match="is serval-translator running"):
        fetch_status(str(tmp_path / "none.sock"))


def test_human_rendering() -> None:
    text = format_status(SNAPSHOT)
    assert "servald DOWN" in text and "restarts 3" in text and "killed by SIGKILL" in text
    web = next(line for line in text.splitlines() if line.strip().startswith("web "))
    assert "[::]:80" in web and "timeout=2" in web and "paused" in web
    assert "NOT LISTENING" in text
    service = next(line for line in text.splitlines()
                   if line.strip().startswith("web.example") and "2000" in line)
    assert "14" in service
