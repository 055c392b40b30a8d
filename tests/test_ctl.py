"""servalctl: command line, rendering, and real servald in network namespaces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import serval
from serval.control import recv_frame, send_frame
from serval.core.ids import ServiceID
from serval.host import ctl

REPO = Path(__file__).resolve().parents[1]
SERVICE_HEX = str(ServiceID.parse("web.example"))

Answer = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def fake_servald(tmp_path: Path) -> Iterator[Callable[[Answer], tuple[str, list[dict[str, Any]]]]]:
    """A servald stand-in answering each request of one connection with `answer(request)`."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(answer: Answer) -> tuple[str, list[dict[str, Any]]]:
        path = str(tmp_path / f"ctl{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        listeners.append(listener)
        seen: list[dict[str, Any]] = []

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                for _ in range(100):
                    frame = recv_frame(conn)
                    if frame is None:
                        return  # the client closed
                    seen.append(frame.message)
                    send_frame(conn, {"id": frame.message["id"], **answer(frame.message)})

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path, seen

    yield start
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


FLOWS_ANSWER = {
    "ok": True,
    "flows": [
        {"flow": 77, "role": "client", "state": "established", "service": SERVICE_HEX,
         "mode": "repair", "local": {"address": "10.0.0.1", "port": 40001},
         "remote": {"address": "fd00::2", "port": 50001}, "peer": "10.0.0.2",
         "migrations": 0},
    ],
}


# ---------------------------------------------------------------- command line


def parse(*argv: str) -> tuple[str, dict[str, Any]]:
    return ctl.request_for(ctl.build_parser().parse_args(list(argv)))


def test_commands_map_to_control_requests() -> None:
    assert parse("status") == ("status", {})
    assert parse("flows", "--json") == ("flows", {})
    assert parse("rule", "add", "web.example", "--kind", "forward", "--address", "10.0.0.5",
                 "--weight", "2", "--priority", "1") == (
        "rule_add", {"service": SERVICE_HEX, "kind": "forward", "address": "10.0.0.5",
                     "weight": 2, "priority": 1})
    # modify sends only what was given, so unspecified fields keep their values in servald.
    assert parse("rule", "modify", "0x0a/8", "--kind", "forward", "--address", "10.0.0.5",
                 "--weight", "7") == (
        "rule_modify", {"service": str(ServiceID.parse("0x0a/8")), "kind": "forward",
                        "address": "10.0.0.5", "weight": 7})
    assert parse("rule", "remove", "default", "--kind", "drop") == (
        "rule_remove", {"service": str(ServiceID.parse("default")), "kind": "drop"})
    assert parse("delay", "list") == ("delay_list", {})
    assert parse("delay", "release", "12") == ("delay_release", {"packet": 12})
    assert parse("delay", "drop", "0x10") == ("delay_drop", {"packet": 16})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rule", "add", "ab" * 20, "--kind", "drop"], "looks like hex"),
        (["rule", "add", "web.example"], "--kind"),
        (["rule", "add", "web.example", "--kind", "demux"], "invalid choice"),
        (["delay", "release", "abc"], "not an integer"),
        (["rule", "add", "web.example", "--kind", "drop", "--weight", "-1"], "negative"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- rendering


def test_format_value() -> None:
    assert ctl.format_value({"address": "10.0.0.1", "port": 80}) == "10.0.0.1:80"
    assert ctl.format_value({"address": "fd00::1", "port": 80}) == "[fd00::1]:80"
    assert ctl.format_value(None) == "-"
    assert ctl.format_value([1, 2]) == "1,2"
    assert ctl.format_value(True) == "yes"
    assert ctl.format_value(0.25) == "0.25"


def test_render_table_aligns_columns() -> None:
    text = ctl.render_table([{"a": 1, "bb": "long value"}, {"a": 12345, "bb": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "BB"]
    assert lines[1].index("long value") == lines[0].index("BB")
    assert lines[2].split() == ["12345", "-"]
    assert ctl.render_table([]) == "(none)"


def test_render_services_one_line_per_target() -> None:
    answer = {"rules": [
        {"service": "ab" * 32, "prefix_bits": 8, "hits": 3, "targets": [
            {"kind": "forward", "destination": "10.0.0.1", "weight": 1, "priority": 0,
             "packets": 2},
            {"kind": "forward", "destination": "10.0.0.2", "weight": 3, "priority": 0,
             "packets": 1}]},
        {"service": "cd" * 32, "prefix_bits": 256, "hits": 0, "local": "stream",
         "targets": [{"kind": "demux", "destination": None, "weight": 1, "priority": 0}]},
    ]}
    lines = ctl.render_services(answer).splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("ab" * 32 + "/8") and "10.0.0.1" in lines[1]
    assert "10.0.0.2" in lines[2] and " 3 " in lines[2]
    assert lines[3].startswith("cd" * 32 + " ") and "stream" in lines[3] and "demux" in lines[3]


# ---------------------------------------------------------------- against a fake servald


def test_flows_table_and_json(
    fake_servald: Callable[[Answer], tuple[str, list[dict[str, Any]]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, seen = fake_servald(lambda request: FLOWS_ANSWER)
    assert ctl.main(["--control-socket", path, "flows"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()
    assert header.split()[:3] == ["FLOW", "ROLE", "STATE"]
    assert "10.0.0.1:40001" in row and "[fd00::2]:50001" in row and "established" in row
    assert seen[0]["op"] == "flows"

    path, _ = fake_servald(lambda request: FLOWS_ANSWER)
    assert ctl.main(["--control-socket", path, "flows", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"flows": FLOWS_ANSWER["flows"]}  # no id / ok


def test_flows_are_fetched_page_by_page(
    fake_servald: Callable[[Answer], tuple[str, list[dict[str, Any]]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # servald pages `flows` (a reply frame is at most 64 KiB): servalctl follows `next`.
    every = [{**FLOWS_ANSWER["flows"][0], "flow": n} for n in range(1, 251)]  # type: ignore[dict-item]

    def page(request: dict[str, Any]) -> dict[str, Any]:
        offset = request["offset"]
        following = offset + 100
        return {"ok": True, "flows": every[offset:following], "total": len(every),
                "next": following if following < len(every) else None}

    path, seen = fake_servald(page)
    assert ctl.main(["--control-socket", path, "flows", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [f["flow"] for f in printed["flows"]] == list(range(1, 251))
    assert [request["offset"] for request in seen] == [0, 100, 200]


def test_servald_error_is_one_line_and_exit_1(
    fake_servald: Callable[[Answer], tuple[str, list[dict[str, Any]]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, seen = fake_servald(lambda request: {
        "ok": False, "error": {"code": "ENOENT", "message": f"service {SERVICE_HEX}: no rule"}})
    code = ctl.main(["--control-socket", path, "rule", "remove", "web.example", "--kind", "drop"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err == f"servalctl: rule remove: service {SERVICE_HEX}: no rule\n"
    assert seen[0] == {"op": "rule_remove", "id": seen[0]["id"], "service": SERVICE_HEX,
                       "kind": "drop"}


def test_no_servald(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.sock"
    assert ctl.main(["--control-socket", str(missing), "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"servalctl: servald is not running: no control socket at {missing}")
    assert err.count("\n") == 1


def test_console_entry_point_uses_the_environment(tmp_path: Path) -> None:
    env = dict(os.environ, SERVAL_CONTROL_SOCKET=str(tmp_path / "env.sock"),
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "serval.host.ctl", "counters"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert str(tmp_path / "env.sock") in result.stderr


# ---------------------------------------------------------------- real servald


@pytest.mark.netns
def test_servalctl_against_real_servald(
    topology: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_socket import start_servald

    from serval.topology import TopologySpec

    topo = topology(TopologySpec.pair("a", "b"))
    a = start_servald(topo["a"], tmp_path)
    b = start_servald(topo["b"], tmp_path)

    def run(daemon: Any, *argv: str) -> Any:
        assert ctl.main(["--control-socket", daemon.control, *argv, "--json"]) == 0, (
            capsys.readouterr().err)
        return json.loads(capsys.readouterr().out)

    status = run(a, "status")
    assert status["role"] == "host" and a.address in status["addresses"]

    # A forward rule: added, modified (weight only), removed, as `services` shows.
    def forward_targets() -> list[dict[str, Any]]:
        rules = run(a, "services")["rules"]
        return [t for r in rules if r["service"] == SERVICE_HEX and "local" not in r
                for t in r["targets"] if t["kind"] == "forward"]

    run(a, "rule", "add", "web.example", "--kind", "forward", "--address", b.address,
        "--weight", "2", "--priority", "5")
    assert [(t["destination"], t["weight"], t["priority"]) for t in forward_targets()] == [
        (b.address, 2, 5)]
    run(a, "rule", "modify", "web.example", "--kind", "forward", "--address", b.address,
        "--weight", "9")
    assert [(t["weight"], t["priority"]) for t in forward_targets()] == [(9, 5)]
    run(a, "rule", "remove", "web.example", "--kind", "forward", "--address", b.address)
    assert forward_targets() == []
    assert ctl.main(["--control-socket", a.control, "rule", "remove", "web.example",
                     "--kind", "forward", "--address", b.address]) == 1
    assert capsys.readouterr().err.startswith("servalctl: ")

    # A live flow shows up with both TCP endpoints.
    with serval.socket(control_socket=b.control) as listener:
        listener.bind("flows.test")
        listener.listen()
        with serval.create_connection("flows.test", 10, control_socket=a.control) as sock:
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.close()
            assert sock.info is not None and sock.info.local is not None
            flows = run(a, "flows")["flows"]
            mine = [f for f in flows if f["flow"] == sock.info.flow]
            assert mine, flows
            assert mine[0]["local"] == {"address": sock.info.local[0],
                                        "port": sock.info.local[1]}
            assert mine[0]["remote"]["address"] == b.address

    counters = run(a, "counters")["counters"]
    assert counters.get("control.op.rule_add", 0) >= 1
    assert run(a, "delay", "list") == {"packets": []}

    # Readable forms too.
    assert ctl.main(["--control-socket", a.control, "counters"]) == 0
    assert "control.op.rule_add" in capsys.readouterr().out
    assert ctl.main(["--control-socket", a.control, "status"]) == 0
    assert "role" in capsys.readouterr().out
