"""The Python-facing contract: ids, ownership, errors, stats, stop, asyncio integration."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile

import pytest
from relay_testlib import recv_exactly, relayed_pair, tcp_pair, wait_completions, wait_until

from serval.errors import FlowStateError
from splice_ext import Completion, Relay


def test_stop_aborts_live_pairs_and_refuses_new_work() -> None:
    relay = Relay(workers=2)
    pairs = [relayed_pair(relay) for _ in range(6)]
    assert relay.running
    relay.stop()
    assert not relay.running
    done = wait_completions(relay, count=6)
    assert sorted(record.pair_id for record in done) == sorted(pair.pair_id for pair in pairs)
    assert {record.reason for record in done} == {"aborted"}
    for pair in pairs:
        with pytest.raises(ConnectionResetError):
            pair.peer_a.recv(10)
        pair.close()
    a, b = socket.socketpair()
    with pytest.raises(FlowStateError):
        relay.add_pair(a.fileno(), b.fileno())
    assert a.fileno() >= 0  # not taken: still ours
    with pytest.raises(FlowStateError):
        relay.park(pairs[0].pair_id)
    assert relay.close_pair(pairs[0].pair_id) is False
    relay.stop()  # idempotent
    a.close()
    b.close()


def test_pair_ids_are_not_reused(relay: Relay) -> None:
    first = relayed_pair(relay, worker=0)
    first.close()
    [done] = wait_completions(relay)
    assert done.pair_id == first.pair_id
    with pytest.raises(KeyError):
        relay.pair_stats(first.pair_id)
    second = relayed_pair(relay, worker=0)  # reuses the slot, with a new generation
    assert second.pair_id != first.pair_id
    assert relay.pair_stats(second.pair_id).state in ("pending", "active")
    with pytest.raises(KeyError):
        relay.park(first.pair_id)
    assert relay.abort_pair(first.pair_id) is False
    second.close()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        Relay(workers=0)
    with pytest.raises(ValueError):
        Relay(workers=1, pipe_size=100)
    with pytest.raises(ValueError):
        Relay(workers=1, idle_timeout_s=-1)
    with Relay(workers=1) as relay:
        a, b = socket.socketpair()
        with pytest.raises(ValueError):
            relay.add_pair(a.fileno(), a.fileno())
        with pytest.raises(ValueError):
            relay.add_pair(-1, b.fileno())
        with pytest.raises(ValueError):
            relay.add_pair(a.fileno(), b.fileno(), worker=1)
        with pytest.raises(KeyError):
            relay.pair_stats(12345)
        with pytest.raises(TypeError):
            relay.pair_stats("12345")  # type: ignore[arg-type]
        a.close()
        b.close()


def test_pipe_size_is_capped_by_pipe_max_size() -> None:
    with open("/proc/sys/fs/pipe-max-size") as limit_file:
        limit = int(limit_file.read())
    with Relay(workers=1, pipe_size=limit * 4) as relay:
        assert relay.pipe_size == limit
    with Relay(workers=1, pipe_size=65536) as relay:
        assert relay.pipe_size == 65536


def test_unpollable_fd_ends_with_an_error_completion(relay: Relay) -> None:
    a, b = socket.socketpair()
    with tempfile.TemporaryFile() as regular_file:
        fd = os.dup(regular_file.fileno())
        pair_id = relay.add_pair(fd, b.detach())
        [done] = wait_completions(relay)
    assert (done.pair_id, done.reason) == (pair_id, "error")
    assert done.errno == 1  # EPERM: epoll refuses regular files
    with pytest.raises(OSError):
        os.fstat(fd)  # the engine owned it and closed it
    a.close()


def test_new_pairs_go_to_the_least_loaded_worker() -> None:
    with Relay(workers=2) as relay:
        pairs = [relayed_pair(relay) for _ in range(6)]
        assert sorted(relay.pair_stats(pair.pair_id).worker for pair in pairs) == [0, 0, 0, 1, 1, 1]
        assert [stats.active_pairs for stats in relay.worker_stats()] == [3, 3]
        for pair in pairs:
            pair.close()
        wait_completions(relay, count=6)
        assert [stats.active_pairs for stats in relay.worker_stats()] == [0, 0]


def test_completions_through_an_asyncio_reader(relay: Relay) -> None:
    async def scenario() -> list[Completion]:
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[Completion] = asyncio.Queue()

        def on_readable() -> None:
            for record in relay.read_completions():
                arrived.put_nowait(record)

        loop.add_reader(relay.completion_fd(), on_readable)
        try:
            pair = relayed_pair(relay)
            await loop.sock_sendall(pair.peer_a, b"ping")
            pair.peer_b.setblocking(False)
            assert await loop.sock_recv(pair.peer_b, 4) == b"ping"
            pair.close()
            return [await asyncio.wait_for(arrived.get(), timeout=5)]
        finally:
            loop.remove_reader(relay.completion_fd())

    [done] = asyncio.run(scenario())
    assert (done.reason, done.bytes_a_to_b) == ("eof", 4)


def test_pair_stats_reports_queue_and_counters(relay: Relay) -> None:
    pair = relayed_pair(relay)
    pair.peer_b.sendall(b"z" * 1000)
    assert recv_exactly(pair.peer_a, 1000) == b"z" * 1000
    # The peer can read the bytes an instant before the worker has counted them.
    wait_until(lambda: relay.pair_stats(pair.pair_id).bytes_b_to_a == 1000)
    stats = relay.pair_stats(pair.pair_id)
    assert stats.pair_id == pair.pair_id
    assert stats.state == "active"
    assert stats.bytes_b_to_a == 1000 and stats.bytes_a_to_b == 0
    assert stats.splice_calls >= 2 and stats.copy_calls == 0
    assert stats.age_s > 0
    pair.close()
    wait_completions(relay)


def test_peer_closing_before_add_is_a_clean_eof(relay: Relay) -> None:
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    peer_a.sendall(b"early")
    peer_a.close()  # data and FIN are waiting before the relay even sees the socket
    relay.add_pair(inner_a.detach(), inner_b.detach())
    assert recv_exactly(peer_b, 5) == b"early"
    assert peer_b.recv(10) == b""
    peer_b.close()
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b) == ("eof", 5)
