"""Idle and half-close timeouts, and the graceful close_pair()."""

from __future__ import annotations

import socket
import time

from relay_testlib import (
    Receiver,
    Sender,
    pattern,
    recv_exactly,
    relayed_pair,
    wait_completions,
    wait_until_stalled,
)

from splice_ext import Relay

IDLE_S = 0.3
HALF_S = 0.3
# The worker wakes at the deadline rounded up to the next millisecond; allow scheduling noise.
LATE_S = 0.25


def test_idle_timeout_closes_a_silent_pair() -> None:
    with Relay(workers=1, idle_timeout_s=IDLE_S) as relay:
        pair = relayed_pair(relay)
        pair.peer_a.sendall(b"hello")
        assert recv_exactly(pair.peer_b, 5) == b"hello"
        [done] = wait_completions(relay, timeout_s=5)
        assert (done.reason, done.errno, done.bytes_a_to_b) == ("idle-timeout", 0, 5)
        assert IDLE_S <= done.duration_s < IDLE_S + LATE_S
        # A timeout closes normally (FIN), it does not reset.
        assert pair.peer_a.recv(10) == b""
        assert pair.peer_b.recv(10) == b""
        pair.close()


def test_traffic_postpones_the_idle_timeout() -> None:
    with Relay(workers=1, idle_timeout_s=IDLE_S) as relay:
        pair = relayed_pair(relay)
        started = time.monotonic()
        last_traffic = started
        while time.monotonic() - started < 4 * IDLE_S:
            # Alternate directions: activity either way counts.
            pair.peer_a.sendall(b"a")
            assert recv_exactly(pair.peer_b, 1) == b"a"
            time.sleep(IDLE_S / 3)
            pair.peer_b.sendall(b"b")
            assert recv_exactly(pair.peer_a, 1) == b"b"
            last_traffic = time.monotonic()
            time.sleep(IDLE_S / 3)
        assert relay.read_completions() == []
        [done] = wait_completions(relay, timeout_s=5)
        assert done.reason == "idle-timeout"
        assert IDLE_S - 0.05 <= time.monotonic() - last_traffic < IDLE_S + LATE_S
        pair.close()


def test_many_idle_timeouts_fire_in_order() -> None:
    """Pairs added over time expire in that order, each after its own idle time: the timer
    list stays sorted and the epoll timeout follows its head."""
    with Relay(workers=1, idle_timeout_s=IDLE_S) as relay:
        pairs = []
        for _ in range(20):
            pairs.append(relayed_pair(relay))
            time.sleep(0.02)
        done = wait_completions(relay, count=20, timeout_s=10)
        assert [record.pair_id for record in done] == [pair.pair_id for pair in pairs]
        assert all(record.reason == "idle-timeout" for record in done)
        assert all(IDLE_S <= record.duration_s < IDLE_S + LATE_S for record in done)
        for pair in pairs:
            pair.close()


def test_half_close_timeout_replaces_the_idle_timeout() -> None:
    with Relay(workers=1, idle_timeout_s=30, half_close_timeout_s=HALF_S) as relay:
        pair = relayed_pair(relay)
        pair.peer_a.sendall(b"request")
        pair.peer_a.shutdown(socket.SHUT_WR)
        assert recv_exactly(pair.peer_b, 7) == b"request"
        assert pair.peer_b.recv(10) == b""
        # b keeps the connection half-open and sends nothing.
        [done] = wait_completions(relay, timeout_s=5)
        assert done.reason == "half-close-timeout"
        assert HALF_S <= done.duration_s < HALF_S + LATE_S
        pair.close()


def test_half_closed_pair_lives_while_bytes_flow() -> None:
    """The half-close timeout is an inactivity timeout: a long response after the client's
    EOF is not cut."""
    with Relay(workers=1, half_close_timeout_s=HALF_S) as relay:
        pair = relayed_pair(relay)
        pair.peer_a.shutdown(socket.SHUT_WR)
        assert pair.peer_b.recv(10) == b""
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < 4 * HALF_S:
            pair.peer_b.sendall(b"x" * 1000)
            sent += 1000
            time.sleep(HALF_S / 4)
        assert recv_exactly(pair.peer_a, sent) == b"x" * sent
        assert relay.read_completions() == []
        pair.peer_b.shutdown(socket.SHUT_WR)
        [done] = wait_completions(relay)
        assert (done.reason, done.bytes_b_to_a) == ("eof", sent)
        pair.close()


def test_close_pair_flushes_bytes_in_flight(relay: Relay) -> None:
    pair = relayed_pair(relay, small_buffers_to_b=True)
    data = pattern(8 * 1024 * 1024, seed=30)
    sender = Sender(pair.peer_a, data, shut_down=False)
    sender.start()
    delivered, queued = wait_until_stalled(relay, pair)
    assert queued > 0
    assert relay.close_pair(pair.pair_id) is True
    receiver = Receiver(pair.peer_b, keep=True)
    receiver.start()
    receiver.join(timeout=10)
    # b gets exactly what the relay had read from a, in order, then EOF.
    assert receiver.result.error is None
    assert bytes(receiver.result.received) == data[: delivered + queued]
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b) == ("closed", delivered + queued)
    assert relay.close_pair(pair.pair_id) is False
    pair.close()
    sender.join(timeout=10)
