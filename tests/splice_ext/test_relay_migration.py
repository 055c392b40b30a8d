"""park / swap_fd / resume: the migration hooks. No byte may be lost or duplicated."""

from __future__ import annotations

import os
import socket
import time

import pytest
from relay_testlib import (
    Receiver,
    RelayedPair,
    Sender,
    pattern,
    recv_exactly,
    relayed_pair,
    tcp_pair,
    wait_completions,
    wait_until,
    wait_until_stalled,
)

from serval.errors import FlowStateError
from splice_ext import Relay

DATA_BYTES = 8 * 1024 * 1024


def read_to_eof(sock: socket.socket) -> bytes:
    receiver = Receiver(sock, keep=True)
    receiver.start()
    receiver.join(timeout=20)
    assert not receiver.is_alive() and receiver.result.error is None
    return bytes(receiver.result.received)


@pytest.mark.parametrize("keep_fd_number", [False, True], ids=["new-fd", "dup2-same-fd"])
def test_swap_destination_with_bytes_in_the_pipe(relay: Relay, keep_fd_number: bool) -> None:
    """b is stalled, so a->b bytes sit in the pipe; b's socket is replaced while parked. The
    old b peer gets what was already delivered, the new one everything after, exactly once."""
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    inner_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    old_fd_b = inner_b.detach()
    pair_id = relay.add_pair(inner_a.detach(), old_fd_b)
    data = pattern(DATA_BYTES, seed=40)
    sender = Sender(peer_a, data)
    sender.start()
    delivered, queued = wait_until_stalled(relay, RelayedPair(relay, pair_id, peer_a, peer_b))
    assert queued > 0

    relay.park(pair_id)
    stats = relay.pair_stats(pair_id)
    assert stats.state == "parked"
    assert (stats.bytes_a_to_b, stats.queued_a_to_b) == (delivered, queued)  # nothing moved

    new_inner_b, new_peer_b = tcp_pair()
    if keep_fd_number:
        # What servald's migration does: the new socket takes over the old fd number.
        os.dup2(new_inner_b.fileno(), old_fd_b)
        new_inner_b.close()
        relay.swap_fd(pair_id, "b", old_fd_b)
    else:
        relay.swap_fd(pair_id, "b", new_inner_b.detach())
    old_part = read_to_eof(peer_b)  # the engine closed the old socket after swapping
    assert old_part == data[:delivered]

    relay.resume(pair_id)
    assert relay.pair_stats(pair_id).state == "active"
    new_part = read_to_eof(new_peer_b)
    assert old_part + new_part == data
    sender.join(timeout=10)

    # The other direction uses the new socket too.
    new_peer_b.sendall(b"reply")
    assert recv_exactly(peer_a, 5) == b"reply"
    new_peer_b.shutdown(socket.SHUT_WR)
    assert peer_a.recv(10) == b""
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b, done.bytes_b_to_a) == ("eof", len(data), 5)
    for sock in (peer_a, peer_b, new_peer_b):
        sock.close()


def test_swap_source_keeps_the_bytes_already_read(relay: Relay) -> None:
    """The relay has read a's first chunk (b stalled: it is in the pipe); a's socket is
    replaced and the stream continues from the new socket right after that chunk."""
    pair = relayed_pair(relay, small_buffers_to_b=True)
    first = pattern(600 * 1024, seed=41)  # more than b's socket buffers, less than one pipe
    second = pattern(3 * 1024 * 1024, seed=42)
    pair.peer_a.sendall(first)
    wait_until(lambda: sum(_moved(relay, pair.pair_id)) == len(first))
    assert relay.pair_stats(pair.pair_id).queued_a_to_b > 0

    relay.park(pair.pair_id)
    new_peer_a, new_inner_a = tcp_pair()
    relay.swap_fd(pair.pair_id, "a", new_inner_a.detach())
    assert pair.peer_a.recv(10) == b""  # the old a socket was closed by the engine
    relay.resume(pair.pair_id)

    sender = Sender(new_peer_a, second)
    sender.start()
    assert read_to_eof(pair.peer_b) == first + second
    sender.join(timeout=10)
    pair.peer_b.sendall(b"ack")
    assert recv_exactly(new_peer_a, 3) == b"ack"
    pair.peer_b.shutdown(socket.SHUT_WR)
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b) == ("eof", len(first) + len(second))
    pair.close()
    new_peer_a.close()


def _moved(relay: Relay, pair_id: int) -> tuple[int, int]:
    stats = relay.pair_stats(pair_id)
    return stats.bytes_a_to_b, stats.queued_a_to_b


def test_parked_pair_does_no_io_and_has_no_timeout() -> None:
    with Relay(workers=1, idle_timeout_s=0.2) as relay:
        pair = relayed_pair(relay)
        relay.park(pair.pair_id)
        relay.park(pair.pair_id)  # idempotent
        pair.peer_a.sendall(b"while parked")
        time.sleep(0.5)  # more than the idle timeout
        assert relay.read_completions() == []
        pair.peer_b.setblocking(False)
        with pytest.raises(BlockingIOError):
            pair.peer_b.recv(100)
        assert relay.pair_stats(pair.pair_id).bytes_a_to_b == 0
        relay.resume(pair.pair_id)
        relay.resume(pair.pair_id)  # idempotent
        assert recv_exactly(pair.peer_b, 12) == b"while parked"
        [done] = wait_completions(relay, timeout_s=5)  # the idle timer runs again
        assert done.reason == "idle-timeout"
        pair.close()


def test_swap_needs_a_parked_pair(relay: Relay) -> None:
    pair = relayed_pair(relay)
    spare, other = socket.socketpair()
    with pytest.raises(FlowStateError):
        relay.swap_fd(pair.pair_id, "a", spare.fileno())
    assert spare.send(b"x") == 1  # not taken by the engine: still open and ours
    with pytest.raises(ValueError):
        relay.swap_fd(pair.pair_id, "c", spare.fileno())  # type: ignore[arg-type]
    pair.close()
    wait_completions(relay)
    with pytest.raises(KeyError):
        relay.park(pair.pair_id)
    spare.close()
    other.close()


def test_park_resume_under_bulk_both_ways(relay: Relay) -> None:
    """Repeated park/resume in the middle of a bidirectional transfer changes nothing."""
    pair = relayed_pair(relay)
    a_data = pattern(64 * 1024 * 1024, seed=43)
    b_data = pattern(48 * 1024 * 1024, seed=44)
    threads = [
        Sender(pair.peer_a, a_data),
        Sender(pair.peer_b, b_data),
        at_b := Receiver(pair.peer_b, keep=True),
        at_a := Receiver(pair.peer_a, keep=True),
    ]
    for thread in threads:
        thread.start()
    cycles = 0
    while cycles < 10_000:  # until the transfer ends: then the pair id is gone
        try:
            relay.park(pair.pair_id)
            time.sleep(0.001)
            relay.resume(pair.pair_id)
        except KeyError:
            break
        cycles += 1
        time.sleep(0.001)
    assert cycles >= 10
    for thread in threads:
        thread.join(timeout=60)
    assert bytes(at_b.result.received) == a_data
    assert bytes(at_a.result.received) == b_data
    [done] = wait_completions(relay)
    assert done.reason == "eof"
    pair.close()
