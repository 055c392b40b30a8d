"""The supervisor in-process, on real sockets, without servald reachable (so no namespaces are
needed): the listener path when servald is down, reloads (applied and rejected), the sd_notify
sequence over a real datagram socket, drain, and fatal startup errors with their positions.

The servald-backed behaviour (full chain, crash and restart) is in test_translator_netns.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from translator_testlib import free_port

from translator.config import load_config
from translator.sdnotify import Notifier
from translator.status import fetch_status
from translator.supervisor import Supervisor


def write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def base_config(tmp_path: Path, port: int, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listeners": [{"name": "web", "address": "127.0.0.1", "port": port,
                       "service": "web.example", "connect_timeout_s": 1}],
        "stack": {"mode": "external", "control_socket": str(tmp_path / "nobody.sock"),
                  "start_timeout_s": 0.2, "health_interval_s": 0.2},
        "logging": {"format": "json", "level": "debug"},
        "metrics": {"address": None},
        "status": {"socket": str(tmp_path / "status.sock")},
        "relay": {"workers": 1},
        "drain": {"timeout_s": 2},
        "runtime_dir": str(tmp_path / "run"),
    }
    config.update(extra)
    return config


def log_events(stream: io.StringIO, event: str | None = None) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


def notifications(sock: socket.socket) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return messages
        messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


async def in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def client_roundtrip(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return sock.recv(100)  # b"" = closed with a FIN; ConnectionResetError = RST


def test_servald_down_reload_and_drain(tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    path = write(tmp_path / "t.yaml", base_config(tmp_path, port))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    stream = io.StringIO()
    supervisor = Supervisor(str(path), load_config(path),
                            notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}),
                            log_stream=stream)

    async def scenario() -> int:
        run = asyncio.create_task(supervisor.run())
        deadline = time.monotonic() + 15
        while supervisor.state != "running":
            assert time.monotonic() < deadline and not run.done(), stream.getvalue()
            await asyncio.sleep(0.02)
        first = notifications(notify)
        assert first[-1]["READY"] == "1" and "servald down" in first[-1]["STATUS"]

        # servald is unreachable: the client is closed cleanly and the reason counted.
        assert await in_thread(client_roundtrip, port) == b""
        status = await in_thread(fetch_status, str(tmp_path / "status.sock"))
        web = status["listeners"][0]
        assert web["connect_errors"] == {"servald_unavailable": 1}
        assert status["stack"]["up"] is False and status["state"] == "running"
        failed = [r for r in log_events(stream, "connection") if r["end"] == "connect-failed"]
        assert len(failed) == 1 and failed[0]["reason"] == "servald_unavailable"

        # A reload adds a listener and changes one in place.
        changed = base_config(tmp_path, port)
        changed["listeners"][0]["max_connections"] = 7
        changed["listeners"].append({"name": "second", "address": "127.0.0.1", "port": port2,
                                     "service": "other.example"})
        write(path, changed)
        assert await supervisor.reload()
        assert {name: lst.config.max_connections
                for name, lst in supervisor.listeners.items()} == {"web": 7, "second": 10000}
        assert await in_thread(client_roundtrip, port2) == b""
        reload_messages = notifications(notify)
        assert reload_messages[0]["RELOADING"] == "1" and "MONOTONIC_USEC" in reload_messages[0]
        assert reload_messages[-1]["READY"] == "1"

        # A bad file is rejected with its position; nothing changes.
        bad = dict(changed)
        bad["listeners"] = [*changed["listeners"], {"name": "web", "port": 1, "service": "x"}]
        write(path, bad)
        assert not await supervisor.reload()
        assert supervisor.last_reload is not None
        assert supervisor.last_reload["result"] == "rejected"
        assert f"{path}:" in supervisor.last_reload["error"]
        assert "duplicate listener name 'web'" in supervisor.last_reload["error"]
        assert set(supervisor.listeners) == {"web", "second"}

        # A reload whose new port is taken is rejected before anything changes.
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        clash = base_config(tmp_path, port)
        clash["listeners"].append({"name": "third", "address": "127.0.0.1", "port": taken,
                                   "service": "x.example"})
        write(path, clash)
        assert not await supervisor.reload()
        blocker.close()
        assert "listener third: cannot listen on 127.0.0.1:" in supervisor.last_reload["error"]
        assert set(supervisor.listeners) == {"web", "second"}  # "second" was not removed

        supervisor.request_stop()
        return await asyncio.wait_for(run, 30)

    assert asyncio.run(scenario()) == 0
    last = notifications(notify)
    assert any(message.get("STOPPING") == "1" for message in last)
    events = [r["event"] for r in log_events(stream)]
    assert events.count("reload_done") == 1 and events.count("reload_rejected") == 2
    assert events[-1] == "stopped"
    # The listening socket is gone after the drain.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    notify.close()


def test_port_in_use_is_fatal_and_names_the_config_position(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    taken = blocker.getsockname()[1]
    path = write(tmp_path / "t.yaml", base_config(tmp_path, taken))
    stream = io.StringIO()
    supervisor = Supervisor(str(path), load_config(path), notifier=Notifier({}),
                            log_stream=stream)
    assert asyncio.run(supervisor.run()) == 1
    blocker.close()
    failure = log_events(stream, "startup_failed")[0]["error"]
    assert failure.startswith(f"{path}:2:3: listener web: cannot listen on 127.0.0.1:{taken}")
    assert "Address already in use" in failure


def test_bundled_servald_that_never_starts_exhausts_the_budget(tmp_path: Path) -> None:
    config = base_config(tmp_path, free_port())
    config["stack"] = {"mode": "bundled", "control_socket": str(tmp_path / "s.sock"),
                       "command": ["/bin/false"], "start_timeout_s": 20,
                       "restart": {"backoff_initial_s": 0.05, "max_restarts": 2,
                                   "window_s": 60}}
    path = write(tmp_path / "t.yaml", config)
    stream = io.StringIO()
    supervisor = Supervisor(str(path), load_config(path), notifier=Notifier({}),
                            log_stream=stream)
    started = time.monotonic()
    assert asyncio.run(supervisor.run()) == 1
    # The budget ends the wait long before start_timeout_s.
    assert time.monotonic() - started < 10
    assert len(log_events(stream, "servald_started")) == 3  # first start + 2 restarts
    assert "restart budget of 2 exhausted" in log_events(stream, "startup_failed")[0]["error"]
    assert "exit status 1" in log_events(stream, "startup_failed")[0]["error"]
