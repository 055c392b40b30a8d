"""serval-perf: the verified data stream, plain-TCP mode on loopback, Serval mode in namespaces."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serval import perf

REPO = Path(__file__).resolve().parents[1]
BLOCK = 4096
EXPECTED_KEYS = {"bytes", "seconds", "gbps", "instance", "verified"}


def env_with_repo() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


# ---------------------------------------------------------------- the data stream


def test_sent_stream_is_the_seeded_sequence() -> None:
    left, right = socket.socketpair()
    with left, right:
        total = 3 * BLOCK + 100

        def send() -> None:
            perf.send_stream(left, 42, BLOCK, total_bytes=total)
            left.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while chunk := right.recv(65536):
            got += chunk
        sender.join()
    assert bytes(got) == perf.expected_bytes(42, BLOCK, 0, total)
    # Blocks differ by their counter, and only there.
    assert got[:8] == (0).to_bytes(8, "big") and got[BLOCK : BLOCK + 8] == (1).to_bytes(8, "big")
    assert got[8:BLOCK] == got[BLOCK + 8 : 2 * BLOCK]
    assert perf.expected_bytes(43, BLOCK, 0, 64) != perf.expected_bytes(42, BLOCK, 0, 64)


def receive(data: bytes, seed: int = 7) -> perf.ReceiveResult:
    left, right = socket.socketpair()
    with left, right:

        def write() -> None:
            left.sendall(data)
            left.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        result = perf.receive_stream(right, seed, BLOCK)
        writer.join()
    return result


def test_receiver_verifies_an_intact_stream() -> None:
    data = perf.expected_bytes(7, BLOCK, 0, 5 * BLOCK + 1)
    assert receive(data) == perf.ReceiveResult(len(data), True, None)


@pytest.mark.parametrize("offset", [0, 7, 8, BLOCK - 1, BLOCK, 3 * BLOCK + 123])
def test_receiver_finds_a_corrupted_byte(offset: int) -> None:
    data = bytearray(perf.expected_bytes(7, BLOCK, 0, 4 * BLOCK))
    data[offset] ^= 0x01
    assert receive(bytes(data)) == perf.ReceiveResult(len(data), False, offset)


def test_receiver_finds_reordered_blocks() -> None:
    good = perf.expected_bytes(7, BLOCK, 0, 3 * BLOCK)
    swapped = good[BLOCK : 2 * BLOCK] + good[:BLOCK] + good[2 * BLOCK :]
    result = receive(swapped)
    assert not result.verified and result.first_bad_offset == 7  # the counter's low byte


def test_receiver_rejects_another_seed() -> None:
    result = receive(perf.expected_bytes(8, BLOCK, 0, BLOCK))
    assert not result.verified and result.first_bad_offset is not None


def test_parse_size_and_hostport() -> None:
    assert perf.parse_size("1048576") == 1 << 20
    assert perf.parse_size("512K") == 512 << 10
    assert perf.parse_size("1G") == 1 << 30
    assert perf.parse_size("2MiB") == 2 << 20
    assert perf.parse_size("1.5M") == 3 << 19
    with pytest.raises(Exception, match="not a size"):
        perf.parse_size("lots")
    assert perf.parse_hostport("10.0.0.1:5201") == ("10.0.0.1", 5201)
    assert perf.parse_hostport("[fd00::1]:80") == ("fd00::1", 80)
    with pytest.raises(Exception, match="HOST:PORT"):
        perf.parse_hostport("10.0.0.1")


# ---------------------------------------------------------------- plain TCP on loopback


@pytest.fixture
def tcp_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "serval.perf", "server", "--tcp-port", "0", "--bind", "127.0.0.1",
         "--name", "loopback-server", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_repo())
    assert process.stdout is not None
    ready = json.loads(process.stdout.readline())
    assert ready["ready"] is True
    yield process, int(ready["tcp_port"])
    process.terminate()
    process.wait(10)


def run_client(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = perf.main(["client", *argv, "--json"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out  # ONE object
    return code, json.loads(lines[0])


@pytest.mark.parametrize(
    "extra",
    [
        ["--bytes", "3M"],
        ["--bytes", "3M", "--reverse"],
        ["--bytes", "1000000", "--parallel", "3", "--block-size", "65536"],
        ["--seconds", "0.3", "--reverse", "--parallel", "2"],
    ],
)
def test_tcp_mode(
    tcp_server: tuple[subprocess.Popen[str], int], capsys: pytest.CaptureFixture[str],
    extra: list[str],
) -> None:
    _, port = tcp_server
    code, result = run_client(capsys, "--tcp", f"127.0.0.1:{port}", *extra)
    assert code == 0
    assert set(result) >= EXPECTED_KEYS
    assert result["verified"] is True
    assert result["instance"] == "127.0.0.1"
    assert result["transport"] == "tcp"
    parallel = int(extra[extra.index("--parallel") + 1]) if "--parallel" in extra else 1
    assert len(result["streams"]) == parallel
    assert all(s["name"] == "loopback-server" for s in result["streams"])
    if "--bytes" in extra:
        assert result["bytes"] == parallel * perf.parse_size(extra[extra.index("--bytes") + 1])
    else:
        assert result["bytes"] > 0
    assert result["gbps"] == pytest.approx(result["bytes"] * 8 / result["seconds"] / 1e9,
                                           rel=1e-3)


def test_a_corrupting_server_fails_verification(capsys: pytest.CaptureFixture[str]) -> None:
    """A peer that sends the right amount of the wrong bytes: verified is false, exit 1."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def bad_server() -> None:
        conn, _ = listener.accept()
        with conn:
            hello = perf.recv_message(conn)
            perf.send_message(conn, {"instance": "127.0.0.1", "name": "liar"})
            data = bytearray(perf.expected_bytes(hello["seed"], hello["block"], 0, hello["bytes"]))
            data[12345] ^= 0xFF
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            perf.recv_message(conn)

    thread = threading.Thread(target=bad_server)
    thread.start()
    try:
        code, result = run_client(capsys, "--tcp", f"127.0.0.1:{port}", "--bytes", "100000",
                                  "--reverse")
    finally:
        thread.join(10)
        listener.close()
    assert code == 1
    assert result["verified"] is False
    assert result["streams"][0]["first_bad_offset"] == 12345


def test_server_survives_a_non_perf_client(
    tcp_server: tuple[subprocess.Popen[str], int], capsys: pytest.CaptureFixture[str]
) -> None:
    process, port = tcp_server
    with socket.create_connection(("127.0.0.1", port)) as junk:
        junk.sendall(b"\x00\x00\x00\x05hello")
        assert junk.recv(10) == b""  # the server hangs up on it
    assert process.stdout is not None
    record = json.loads(process.stdout.readline())
    assert "not a serval-perf" in record["error"] or "bad serval-perf" in record["error"]
    code, result = run_client(capsys, "--tcp", f"127.0.0.1:{port}", "--bytes", "64K")
    assert code == 0 and result["verified"] is True


def test_client_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = perf.main(["--control-socket", str(tmp_path / "none.sock"), "client", "x.test",
                      "--bytes", "1K"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("serval-perf: servald is not running") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        perf.main(["client", "x.test", "--tcp", "127.0.0.1:1", "--bytes", "1K"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        perf.main(["client", "x.test"])  # neither --bytes nor --seconds


# ---------------------------------------------------------------- Serval between namespaces


@pytest.mark.netns
def test_serval_perf_between_namespaces(topology: Any, tmp_path: Path) -> None:
    from test_socket import start_servald

    from serval.topology import TopologySpec

    topo = topology(TopologySpec.pair("a", "b"))
    a, b = topo["a"], topo["b"]
    start_servald(a, tmp_path)
    start_servald(b, tmp_path)
    env = b.env(env_with_repo())
    server = b.popen([sys.executable, "-m", "serval.perf", "server", "perf.test",
                      "--tcp-port", "0", "--name", "b", "--json"],
                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(server.stdout.readline())
        assert ready["ready"] is True

        def client(*argv: str) -> dict[str, Any]:
            result = a.run([sys.executable, "-m", "serval.perf", "client", *argv, "--json"],
                           env=a.env(env_with_repo()), timeout=120)
            lines = result.stdout.splitlines()
            assert len(lines) == 1, result.stdout + result.stderr
            summary: dict[str, Any] = json.loads(lines[0])
            return summary

        for argv in (["perf.test", "--bytes", "64M"],
                     ["perf.test", "--bytes", "64M", "--reverse"],
                     ["perf.test", "--seconds", "0.5", "--parallel", "2"],
                     ["--tcp", f"{b.ipv4}:{ready['tcp_port']}", "--bytes", "64M"]):
            summary = client(*argv)
            assert set(summary) >= EXPECTED_KEYS
            assert summary["verified"] is True, summary
            assert summary["instance"] == b.ipv4  # the host that served it
            assert {s["name"] for s in summary["streams"]} == {"b"}
            if "--bytes" in argv:
                assert summary["bytes"] == 64 << 20
            assert summary["gbps"] > 0
            assert summary["transport"] == ("tcp" if "--tcp" in argv else "serval")
    finally:
        server.terminate()
        server.wait(10)
