"""Bytes relayed intact both ways, and half-close in both orders."""

from __future__ import annotations

import socket

import pytest
from relay_testlib import (
    Receiver,
    Sender,
    pattern,
    recv_exactly,
    relayed_pair,
    sha256,
    wait_completions,
    wait_until,
)

from splice_ext import Relay

BULK_BYTES = 48 * 1024 * 1024


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_bulk_both_ways_arrives_intact(relay: Relay, use_splice: bool) -> None:
    pair = relayed_pair(relay, use_splice=use_splice)
    a_data = pattern(BULK_BYTES, seed=1)
    b_data = pattern(BULK_BYTES - 12345, seed=2)  # unequal, not a multiple of any page size
    threads = [
        Sender(pair.peer_a, a_data),
        Sender(pair.peer_b, b_data),
        at_b := Receiver(pair.peer_b),
        at_a := Receiver(pair.peer_a),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert at_b.result.error is None and at_a.result.error is None
    assert (at_b.result.length, at_b.result.digest) == (len(a_data), sha256(a_data))
    assert (at_a.result.length, at_a.result.digest) == (len(b_data), sha256(b_data))

    [done] = wait_completions(relay)
    assert done.pair_id == pair.pair_id
    assert done.reason == "eof"
    assert done.errno == 0
    assert (done.bytes_a_to_b, done.bytes_b_to_a) == (len(a_data), len(b_data))
    stats = relay.worker_stats()
    if use_splice:
        assert sum(s.splice_calls for s in stats) > 0
        assert sum(s.copy_calls for s in stats) == 0
        # 1 MiB pipes: far fewer calls than 64 KiB ones would need (~2 per 64 KiB each way).
        assert sum(s.splice_calls for s in stats) < 2 * 2 * BULK_BYTES // (64 * 1024)
    else:
        assert sum(s.splice_calls for s in stats) == 0
        assert sum(s.fallbacks for s in stats) == 2
    assert sum(s.bytes_a_to_b for s in stats) == len(a_data)
    assert sum(s.bytes_b_to_a for s in stats) == len(b_data)
    pair.close()


@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_forwards_eof_and_keeps_the_other_direction(relay: Relay, first: str) -> None:
    pair = relayed_pair(relay)
    closer, other = (pair.peer_a, pair.peer_b) if first == "a" else (pair.peer_b, pair.peer_a)

    closer.sendall(b"request")
    closer.shutdown(socket.SHUT_WR)
    assert recv_exactly(other, 7) == b"request"
    assert other.recv(10) == b""  # the EOF was forwarded as a FIN
    # The other direction still works after the half-close, in volume.
    reply = pattern(3 * 1024 * 1024, seed=3)
    sender = Sender(other, reply, shut_down=False)
    sender.start()
    assert recv_exactly(closer, len(reply)) == reply
    sender.join(timeout=10)
    stats = relay.pair_stats(pair.pair_id)
    assert stats.state == "active"
    assert (stats.eof_a_to_b, stats.eof_b_to_a) == (
        (True, False) if first == "a" else (False, True)
    )

    other.shutdown(socket.SHUT_WR)
    assert closer.recv(10) == b""
    [done] = wait_completions(relay)
    assert done.reason == "eof"
    forward, backward = (7, len(reply))
    expected = (forward, backward) if first == "a" else (backward, forward)
    assert (done.bytes_a_to_b, done.bytes_b_to_a) == expected
    pair.close()


def test_eof_waits_until_the_pipe_is_flushed(relay: Relay) -> None:
    """The FIN must follow the last byte, even when the reader is slow (HAProxy #2505)."""
    pair = relayed_pair(relay, small_buffers_to_b=True)
    data = pattern(600 * 1024, seed=4)  # more than b's socket buffers, less than one pipe
    sender = Sender(pair.peer_a, data)  # sends everything, then SHUT_WR while b is not reading
    sender.start()
    sender.join(timeout=10)
    # The relay reads the EOF while bytes for b still sit in its pipe, and must hold the EOF.
    wait_until(lambda: relay.pair_stats(pair.pair_id).eof_a_to_b)
    stats = relay.pair_stats(pair.pair_id)
    assert stats.queued_a_to_b > 0
    assert stats.bytes_a_to_b + stats.queued_a_to_b == len(data)
    receiver = Receiver(pair.peer_b)
    receiver.start()
    receiver.join(timeout=20)
    assert receiver.result.error is None
    assert (receiver.result.length, receiver.result.digest) == (len(data), sha256(data))
    pair.peer_b.shutdown(socket.SHUT_WR)
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b) == ("eof", len(data))
    pair.close()


def test_small_messages_are_relayed_one_by_one(relay: Relay) -> None:
    pair = relayed_pair(relay)
    for round_trip in range(300):
        message = f"ping {round_trip}".encode()
        pair.peer_a.sendall(message)
        assert recv_exactly(pair.peer_b, len(message)) == message
        pair.peer_b.sendall(message.upper())
        assert recv_exactly(pair.peer_a, len(message)) == message.upper()
    stats = relay.pair_stats(pair.pair_id)
    assert stats.splice_calls > 0
    pair.close()
    [done] = wait_completions(relay)
    assert done.reason == "eof"
