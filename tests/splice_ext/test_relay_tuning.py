"""Engine tuning knobs: the read-ahead cap and the opt-in receive low-water mark (SO_RCVLOWAT).

The low-water mark must never hold bytes back for good: a tail shorter than it, or a small
message right after a stream, is delivered once the hold time without input has passed.
"""

from __future__ import annotations

import os
import socket

import pytest
from relay_testlib import (
    Receiver,
    RelayedPair,
    Sender,
    pattern,
    recv_exactly,
    relayed_pair,
    sha256,
    tcp_pair,
    wait_completions,
    wait_until,
    wait_until_stalled,
)

from splice_ext import Relay

STREAM_BYTES = 32 * 1024 * 1024
LOWAT_BYTES = 1 << 20
DEFAULT_LOWAT_BYTES = 256 * 1024
TEST_LOWAT_BYTES = 64 * 1024
# 64 KiB per millisecond (at most 64 MB/s): TEST_LOWAT_BYTES take >= 1 ms to arrive, inside
# the window in which the engine raises the mark (0.5 ms .. the hold bound).
PACED_CHUNK_BYTES = 64 * 1024
PACE_S = 0.001
PACED_STREAM_BYTES = 8 * 1024 * 1024  # 128 paced writes: ~0.2 s
FAST_STREAM_BYTES = 64 * 1024 * 1024
STREAM_TIMEOUT_S = 30.0
SMALL_MESSAGE = b"ping" * 25
# Long enough that the checks below run while the mark is still raised, short enough for a test.
LONG_HOLD_S = 1.0
DELIVERY_TIMEOUT_S = 5.0  # liveness bound only: a lost wake-up would never deliver at all


def so_rcvlowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def relayed_with_watch(relay: Relay) -> tuple[socket.socket, socket.socket, socket.socket, int]:
    """peer_a <-> relay <-> peer_b, plus a dup of the relay's side-a socket to read its options
    (the engine owns the original fd)."""
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    for inner in (inner_a, inner_b):
        inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    watch = socket.socket(fileno=os.dup(inner_a.fileno()))
    pair_id = relay.add_pair(inner_a.detach(), inner_b.detach())
    return peer_a, peer_b, watch, pair_id


def paced_sender(sock: socket.socket, data: bytes) -> Sender:
    """A sender pacing its writes, so that the relay drains its source at every wake-up and
    reads a bulk amount each time: the pattern of a stream paced by a network link, the case
    the low-water mark is for. (An unpaced loopback sender outruns the receiver, and an
    output-bound relay never raises the mark.)"""
    return Sender(sock, data, shut_down=False, chunk_bytes=PACED_CHUNK_BYTES, pace_s=PACE_S)


def test_lowat_can_be_switched_off() -> None:
    with Relay(workers=1, lowat_bytes=0) as relay:
        peer_a, peer_b, watch, _ = relayed_with_watch(relay)
        try:
            data = pattern(PACED_STREAM_BYTES, seed=21)
            sender = paced_sender(peer_a, data)
            sender.start()
            assert recv_exactly(peer_b, len(data), STREAM_TIMEOUT_S) == data
            assert relay.lowat_bytes == 0
            assert relay.worker_stats()[0].lowat_sets == 0
            assert so_rcvlowat(watch) == 1
        finally:
            for sock in (peer_a, peer_b, watch):
                sock.close()


def test_lowat_is_on_by_default() -> None:
    with Relay(workers=1) as relay:
        assert relay.lowat_bytes == DEFAULT_LOWAT_BYTES
        pair = relayed_pair(relay)
        data = pattern(STREAM_BYTES, seed=22) + SMALL_MESSAGE
        Sender(pair.peer_a, data, shut_down=False).start()
        assert recv_exactly(pair.peer_b, len(data), STREAM_TIMEOUT_S) == data
        pair.close()


def test_a_fast_stream_is_left_alone() -> None:
    # Unpaced over loopback the stream brings TEST_LOWAT_BYTES in far less than 0.5 ms
    # (>= 1 GB/s here; the bound is 128 MB/s): the worker is busy anyway, and the mark would
    # only slow the sender down (benchmarks/README.md). A sender thread that stalls now and
    # then (the GIL, a busy CI machine) can look paced for a single 10 ms window; the mark
    # needs two in a row.
    with Relay(workers=1, lowat_bytes=TEST_LOWAT_BYTES) as relay:
        peer_a, peer_b, watch, _ = relayed_with_watch(relay)
        try:
            data = pattern(FAST_STREAM_BYTES, seed=27)
            Sender(peer_a, data, shut_down=False).start()
            assert recv_exactly(peer_b, len(data), STREAM_TIMEOUT_S) == data
            assert relay.worker_stats()[0].lowat_sets == 0
            assert so_rcvlowat(watch) == 1
        finally:
            for sock in (peer_a, peer_b, watch):
                sock.close()


def test_a_short_tail_after_a_paced_stream_is_released() -> None:
    # The stream ends with a tail far below the mark and no EOF: only the hold timer can let
    # it through. The other direction never streamed: untouched, and prompt.
    with Relay(workers=1, lowat_bytes=TEST_LOWAT_BYTES, lowat_hold_s=LONG_HOLD_S) as relay:
        peer_a, peer_b, watch, _ = relayed_with_watch(relay)
        try:
            data = pattern(PACED_STREAM_BYTES, seed=26) + SMALL_MESSAGE
            sender = paced_sender(peer_a, data)
            sender.start()
            assert recv_exactly(peer_b, len(data), STREAM_TIMEOUT_S) == data
            assert relay.worker_stats()[0].lowat_sets >= 1
            wait_until(lambda: so_rcvlowat(watch) == 1, timeout_s=DELIVERY_TIMEOUT_S)
            peer_a.sendall(SMALL_MESSAGE)
            assert recv_exactly(peer_b, len(SMALL_MESSAGE), DELIVERY_TIMEOUT_S) == SMALL_MESSAGE
            peer_b.sendall(SMALL_MESSAGE)
            assert recv_exactly(peer_a, len(SMALL_MESSAGE), DELIVERY_TIMEOUT_S) == SMALL_MESSAGE
        finally:
            for sock in (peer_a, peer_b, watch):
                sock.close()


def test_lowat_stream_tail_and_eof_are_delivered_intact() -> None:
    # A tail shorter than the mark, then EOF: FIN wakes the reader whatever the mark says.
    with Relay(workers=1, lowat_bytes=LOWAT_BYTES) as relay:
        pair = relayed_pair(relay)
        data = pattern(STREAM_BYTES + 12345, seed=23)
        receiver = Receiver(pair.peer_b)
        receiver.start()
        sender = Sender(pair.peer_a, data)
        sender.start()
        sender.join(timeout=60)
        receiver.join(timeout=60)
        assert sender.error is None and receiver.result.error is None
        assert receiver.result.length == len(data)
        assert receiver.result.digest == sha256(data)
        pair.peer_b.shutdown(socket.SHUT_WR)
        (completion,) = wait_completions(relay)
        assert completion.reason == "eof"
        assert completion.bytes_a_to_b == len(data)
        pair.close()


def test_park_clears_the_lowat_before_returning() -> None:
    # park() hands the sockets to migration, which may freeze them right away. Park in the
    # middle of a paced stream, once the mark was seen raised.
    with Relay(workers=1, lowat_bytes=TEST_LOWAT_BYTES, lowat_hold_s=LONG_HOLD_S) as relay:
        peer_a, peer_b, watch, pair_id = relayed_with_watch(relay)
        try:
            data = pattern(PACED_STREAM_BYTES, seed=24)
            sender = paced_sender(peer_a, data)
            receiver = Receiver(peer_b)
            sender.start()
            receiver.start()
            wait_until(lambda: so_rcvlowat(watch) == TEST_LOWAT_BYTES, interval_s=0.001)
            relay.park(pair_id)
            assert so_rcvlowat(watch) == 1
            relay.resume(pair_id)
            sender.join(timeout=STREAM_TIMEOUT_S)
            assert sender.error is None
            peer_a.shutdown(socket.SHUT_WR)
            receiver.join(timeout=STREAM_TIMEOUT_S)
            assert receiver.result.error is None
            assert receiver.result.digest == sha256(data)
        finally:
            for sock in (peer_a, peer_b, watch):
                sock.close()


def test_read_ahead_cap_bounds_what_a_stalled_reader_queues() -> None:
    pipe_size = 1 << 20
    read_ahead = 4096
    small_buffer = 16 * 1024
    with Relay(workers=1, pipe_size=pipe_size, read_ahead_bytes=read_ahead) as relay:
        assert relay.read_ahead_bytes == read_ahead
        peer_a, inner_a = tcp_pair()
        inner_b, peer_b = tcp_pair()
        # Small buffers on both relay sockets: one splice-in takes at most a socket buffer's
        # worth, and the destination blocks after a few KiB, so what the relay queues is what
        # its read-ahead rule allowed (without the cap it reads on until the pipe holds 1 MiB).
        inner_a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small_buffer)
        inner_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, small_buffer)
        peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small_buffer)
        for inner in (inner_a, inner_b):
            inner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = RelayedPair(relay, relay.add_pair(inner_a.detach(), inner_b.detach()),
                           peer_a, peer_b)
        data = pattern(64 * 1024 * 1024, seed=25)
        sender = Sender(pair.peer_a, data)
        sender.start()
        _, queued = wait_until_stalled(relay, pair)
        assert sender.is_alive(), "the sender should be blocked by backpressure"
        assert 0 < queued < pipe_size // 4
        receiver = Receiver(pair.peer_b)
        receiver.start()
        sender.join(timeout=60)
        receiver.join(timeout=60)
        assert receiver.result.error is None
        assert receiver.result.digest == sha256(data)
        wait_until(lambda: relay.pair_stats(pair.pair_id).eof_a_to_b)
        pair.close()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"read_ahead_bytes": 0}, "read_ahead_bytes"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"lowat_bytes": -1}, "lowat_bytes"),
        ({"lowat_hold_s": 0}, "lowat_hold_s"),
    ],
)
def test_tuning_values_are_checked(arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Relay(workers=1, **arguments)  # type: ignore[arg-type]


def test_read_ahead_defaults_to_and_is_capped_at_the_pipe_size() -> None:
    with Relay(workers=1, pipe_size=65536) as relay:
        assert relay.read_ahead_bytes == relay.pipe_size
    with Relay(workers=1, pipe_size=65536, read_ahead_bytes=1 << 20) as relay:
        assert relay.read_ahead_bytes == relay.pipe_size
