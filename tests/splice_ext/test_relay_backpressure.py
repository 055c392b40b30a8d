"""Backpressure: a stalled reader makes the relay stop reading, without spinning.

Also the EAGAIN ambiguity of splice-in (empty socket or full pipe), forced with a one-slot pipe.
"""

from __future__ import annotations

import socket
import time

import pytest
from relay_testlib import (
    Receiver,
    Sender,
    pattern,
    relayed_pair,
    sha256,
    wait_completions,
    wait_until_stalled,
)

from splice_ext import Relay

STALL_BYTES = 64 * 1024 * 1024
CPU_WINDOW_S = 1.0
# A stalled pair must cost (next to) nothing; 2% of one core leaves room for timer noise.
MAX_STALLED_CPU_S = 0.02
# A pipe bounds *slots*, pipe_size / 4096 of them, and on loopback one slot can reference a whole
# 32 KiB page fragment: the relay may hold up to 8x pipe_size bytes per direction, never more.
MAX_BYTES_PER_PIPE_BYTE = 8
PAGE_BYTES = 4096


@pytest.mark.parametrize("pipe_size", [PAGE_BYTES, 64 * 1024, 1 << 20], ids=["1-slot", "64k", "1m"])
def test_stalled_reader_bounds_the_queue_and_costs_no_cpu(pipe_size: int) -> None:
    with Relay(workers=1, pipe_size=pipe_size) as relay:
        pair = relayed_pair(relay, small_buffers_to_b=True)
        data = pattern(STALL_BYTES, seed=6)
        sender = Sender(pair.peer_a, data)
        sender.start()
        delivered, queued = wait_until_stalled(relay, pair)
        assert sender.is_alive(), "the sender should be blocked by backpressure"
        assert 0 < queued <= MAX_BYTES_PER_PIPE_BYTE * relay.pipe_size
        assert delivered + queued < len(data)

        wakeups_before = relay.worker_stats()[0].wakeups
        calls_before = relay.worker_stats()[0].splice_calls
        cpu_before = time.process_time()
        time.sleep(CPU_WINDOW_S)
        cpu_used = time.process_time() - cpu_before
        assert cpu_used < MAX_STALLED_CPU_S, f"{cpu_used:.3f} s CPU while stalled: spinning?"
        assert relay.worker_stats()[0].splice_calls - calls_before < 100
        assert relay.worker_stats()[0].wakeups - wakeups_before < 100
        assert relay.pair_stats(pair.pair_id).queued_a_to_b == queued  # no growth

        receiver = Receiver(pair.peer_b)
        receiver.start()
        sender.join(timeout=60)
        receiver.join(timeout=60)
        assert receiver.result.error is None
        assert (receiver.result.length, receiver.result.digest) == (len(data), sha256(data))
        pair.peer_b.shutdown(socket.SHUT_WR)
        [done] = wait_completions(relay)
        assert (done.reason, done.bytes_a_to_b) == ("eof", len(data))
        pair.close()


def test_one_slot_pipe_relays_bulk_both_ways_intact() -> None:
    """With one pipe slot nearly every splice-in ends in EAGAIN with bytes in the pipe: taking
    that for "socket empty" would lose the edge and stall; taking it for "pipe full" forever
    would stall on a socket that had in fact been drained. Both ways at once, to completion."""
    with Relay(workers=1, pipe_size=PAGE_BYTES) as relay:
        pair = relayed_pair(relay)
        a_data = pattern(24 * 1024 * 1024, seed=7)
        b_data = pattern(20 * 1024 * 1024 + 1, seed=8)
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
        assert (at_b.result.length, at_b.result.digest) == (len(a_data), sha256(a_data))
        assert (at_a.result.length, at_a.result.digest) == (len(b_data), sha256(b_data))
        [done] = wait_completions(relay)
        assert (done.reason, done.bytes_a_to_b, done.bytes_b_to_a) == (
            "eof",
            len(a_data),
            len(b_data),
        )
        pair.close()


def test_full_pipe_then_release_loses_nothing(relay: Relay) -> None:
    """Fill the pipe while b is stalled, let the sender finish and half-close, then release b
    in small sips before draining: the queued bytes, the bytes still in a's socket and the EOF
    must all come through, in order, exactly once."""
    pair = relayed_pair(relay, small_buffers_to_b=True)
    data = pattern(12 * 1024 * 1024, seed=9)
    sender = Sender(pair.peer_a, data)
    sender.start()
    delivered, queued = wait_until_stalled(relay, pair)
    assert queued > 0 and delivered + queued < len(data)
    sipped = bytearray()
    for _ in range(5):  # release a little, let it stall again
        sipped += pair.peer_b.recv(64 * 1024)
        time.sleep(0.05)
    receiver = Receiver(pair.peer_b, keep=True)
    receiver.start()
    sender.join(timeout=30)
    receiver.join(timeout=30)
    assert sender.error is None and receiver.result.error is None
    assert bytes(sipped + receiver.result.received) == data
    pair.peer_b.shutdown(socket.SHUT_WR)
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b) == ("eof", len(data))
    pair.close()
