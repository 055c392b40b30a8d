"""Resets: an RST on either side ends the pair with reason 'reset' and resets the other side."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from relay_testlib import (
    Receiver,
    Sender,
    recv_exactly,
    relayed_pair,
    wait_completions,
    wait_until,
)

from splice_ext import Relay

HARD_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST
TCP_CLOSE = 7  # tcpi_state


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, HARD_CLOSE)
    sock.close()


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def assert_was_reset(sock: socket.socket) -> None:
    """The peer's socket went to CLOSE although the test never closed it: only an RST does
    that. (recv() alone cannot tell: after a FIN it returns b"" even once an RST arrived.)"""
    wait_until(lambda: tcp_state(sock) == TCP_CLOSE, timeout_s=5)


@pytest.mark.parametrize("side", ["a", "b"])
def test_reset_of_an_idle_pair(relay: Relay, side: str) -> None:
    pair = relayed_pair(relay)
    pair.peer_a.sendall(b"hi")
    assert recv_exactly(pair.peer_b, 2) == b"hi"
    resetter, other = (pair.peer_a, pair.peer_b) if side == "a" else (pair.peer_b, pair.peer_a)
    reset(resetter)
    [done] = wait_completions(relay)
    assert done.pair_id == pair.pair_id
    assert (done.reason, done.errno) == ("reset", errno.ECONNRESET)
    assert done.bytes_a_to_b == 2
    assert_was_reset(other)
    other.close()


@pytest.mark.parametrize("side", ["a", "b"])
def test_reset_during_bulk_transfer(relay: Relay, side: str) -> None:
    pair = relayed_pair(relay)
    sender = Sender(pair.peer_a, bytes(256 * 1024 * 1024))  # content does not matter here
    sender.start()
    recv_exactly(pair.peer_b, 4 * 1024 * 1024)  # traffic is flowing
    resetter, other = (pair.peer_a, pair.peer_b) if side == "a" else (pair.peer_b, pair.peer_a)
    reset(resetter)
    [done] = wait_completions(relay)
    assert done.reason == "reset"
    assert done.errno in (errno.ECONNRESET, errno.EPIPE)
    assert done.bytes_a_to_b >= 4 * 1024 * 1024
    sender.join(timeout=10)
    assert not sender.is_alive()
    if side == "a":
        assert_was_reset(pair.peer_b)
    else:
        # peer_a's own sender thread may be the one to trip on the relayed RST first.
        if not isinstance(sender.error, ConnectionResetError | BrokenPipeError):
            assert_was_reset(pair.peer_a)
    other.close()


def test_reset_after_half_close_is_noticed_without_traffic(relay: Relay) -> None:
    """a half-closed its direction (nothing left to read from a) and b is silent: the RST from
    a can only be seen as EPOLLERR, which must not be ignored."""
    pair = relayed_pair(relay)
    pair.peer_a.shutdown(socket.SHUT_WR)
    assert pair.peer_b.recv(10) == b""
    reset(pair.peer_a)
    [done] = wait_completions(relay, timeout_s=5)
    assert done.reason == "reset"
    # tcp_reset() reports EPIPE for a socket in CLOSE_WAIT (it had received a's FIN).
    assert done.errno == errno.EPIPE
    assert_was_reset(pair.peer_b)
    pair.peer_b.close()


def test_abort_resets_both_sides(relay: Relay) -> None:
    pair = relayed_pair(relay)
    receiver = Receiver(pair.peer_b)
    receiver.start()
    pair.peer_a.sendall(b"x" * 100_000)
    assert relay.abort_pair(pair.pair_id) is True
    [done] = wait_completions(relay)
    assert (done.reason, done.errno) == ("aborted", 0)
    receiver.join(timeout=5)
    assert isinstance(receiver.result.error, ConnectionResetError)
    assert_was_reset(pair.peer_a)
    assert relay.abort_pair(pair.pair_id) is False  # already ended
    pair.close()
