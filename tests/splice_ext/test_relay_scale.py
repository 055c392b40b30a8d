"""10,000 concurrent pairs, and the engine's memory per idle pair.

The peers live in two child processes, so that this process holds only the relay's own two
fds per pair (plus pipes). Where RLIMIT_NOFILE cannot be raised enough (no CAP_SYS_RESOURCE and
a hard limit below ~20,300), the test runs the largest pair count that fits and says so.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from relay_testlib import wait_completions

from splice_ext import Relay

TARGET_PAIRS = 10_000
FDS_RESERVED = 300  # interpreter, pytest, listeners, epoll/eventfds, pooled pipes
MIN_PAIRS = 5_000
# The engine's own cost for an idle pair is a ~150-byte slab entry (plus its share of a
# 1024-entry chunk); 2 KiB leaves room for allocator and measurement noise.
MAX_RSS_PER_IDLE_PAIR_BYTES = 2048
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
TOKEN = struct.Struct("!Q")

# A child holding `count` peer sockets: connects, sends one token per socket when told, reports
# the tokens it received (one per socket), closes everything when told.
PEER_PROCESS = r"""
import socket, struct, sys
port, count, base = map(int, sys.argv[1:4])
TOKEN = struct.Struct("!Q")
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("connected", flush=True)
sys.stdin.readline()
for index, sock in enumerate(socks):
    sock.sendall(TOKEN.pack(base + index))
received = []
for sock in socks:
    sock.settimeout(30)
    data = b""
    while len(data) < TOKEN.size:
        chunk = sock.recv(TOKEN.size - len(data))
        if not chunk:
            raise SystemExit("EOF before the token")
        data += chunk
    received.append(TOKEN.unpack(data)[0])
print(" ".join(map(str, received)), flush=True)
sys.stdin.readline()
for sock in socks:
    sock.close()
print("closed", flush=True)
"""


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


@pytest.fixture
def pair_count() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * TARGET_PAIRS + FDS_RESERVED
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as far as we may go
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    count = min(TARGET_PAIRS, (limit - FDS_RESERVED) // 2)
    if count < MIN_PAIRS:
        pytest.skip(f"RLIMIT_NOFILE {limit} allows only {count} pairs")
    yield count
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_peers(
    listener: socket.socket, count: int, base: int
) -> tuple[subprocess.Popen[str], list[socket.socket]]:
    """Starts a peer process connecting `count` sockets to `listener`; returns our ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", PEER_PROCESS, str(listener.getsockname()[1]), str(count), str(base)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    accepted = [listener.accept()[0] for _ in range(count)]
    assert child.stdout is not None and child.stdout.readline().strip() == "connected"
    return child, accepted


def tell(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


def answer(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


@pytest.mark.slow
def test_ten_thousand_pairs(pair_count: int, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=4096) as listener:
        a_peers, inner_a = start_peers(listener, pair_count, base=0)
        b_peers, inner_b = start_peers(listener, pair_count, base=1_000_000)
    fds = [(a.detach(), b.detach()) for a, b in zip(inner_a, inner_b, strict=True)]
    del inner_a, inner_b
    try:
        with Relay(workers=2, idle_timeout_s=600, pipe_pool_size=16) as relay:
            relay.worker_stats()  # warm the Python-side paths before measuring
            ids = [0] * pair_count
            rss_before = rss_bytes()
            for index, (fd_a, fd_b) in enumerate(fds):
                ids[index] = relay.add_pair(fd_a, fd_b)
            # One token each way through every pair: every pair registered and relaying.
            tell(a_peers)
            tell(b_peers)
            tokens_at_a_peers = answer(a_peers)
            tokens_at_b_peers = answer(b_peers)
            rss_after = rss_bytes()
            # Peers in process A received B's tokens and vice versa, each exactly once.
            assert sorted(map(int, tokens_at_a_peers.split())) == list(
                range(1_000_000, 1_000_000 + pair_count)
            )
            assert sorted(map(int, tokens_at_b_peers.split())) == list(range(pair_count))

            stats = relay.worker_stats()
            assert [s.active_pairs for s in stats] == [
                pair_count // 2,
                pair_count - pair_count // 2,
            ]
            assert sum(s.pipes_in_use for s in stats) == 0  # idle pairs hold no pipe
            per_pair = (rss_after - rss_before) / pair_count
            with capsys.disabled():
                print(
                    f"\n[splice_ext] {pair_count} idle pairs (fd limit "
                    f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]}): RSS delta "
                    f"{(rss_after - rss_before) / 1024:.0f} KiB = {per_pair:.0f} bytes/pair; "
                    f"pipes created {sum(s.pipes_created for s in stats)}"
                )
            assert per_pair < MAX_RSS_PER_IDLE_PAIR_BYTES

            tell(a_peers)
            tell(b_peers)
            assert (answer(a_peers), answer(b_peers)) == ("closed", "closed")
            done = wait_completions(relay, count=pair_count, timeout_s=60)
            assert sorted(record.pair_id for record in done) == sorted(ids)
            assert {record.reason for record in done} == {"eof"}
            assert {(record.bytes_a_to_b, record.bytes_b_to_a) for record in done} == {
                (TOKEN.size, TOKEN.size)
            }
            assert sum(s.active_pairs for s in relay.worker_stats()) == 0
    finally:
        for child in (a_peers, b_peers):
            child.kill()
            child.wait()
