"""The recv/send fallback: splice refused with EINVAL, splice disabled, no pipe (EMFILE)."""

from __future__ import annotations

import fcntl
import os
import resource
import time

from relay_testlib import (
    Receiver,
    RelayedPair,
    Sender,
    pattern,
    recv_exactly,
    sha256,
    tcp_pair,
    wait_completions,
)

from splice_ext import Relay

TRANSFER_BYTES = 8 * 1024 * 1024
PIPE_RETRY_WAIT_S = 0.3  # the engine waits 0.1 s before calling pipe2() again after a failure


def exchange_both_ways(pair: RelayedPair, size: int, seed: int) -> None:
    """Bulk both ways with half-close at the end; asserts both streams arrive intact."""
    a_data = pattern(size, seed)
    b_data = pattern(size // 2 + 7, seed + 1)
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


def test_splice_out_einval_falls_back_to_send(relay: Relay) -> None:
    """A real EINVAL: splice() refuses an O_APPEND destination (fs/splice.c), send() does not.
    The pipe contents already spliced in must still be delivered, in order."""
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    flags = fcntl.fcntl(inner_b.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(inner_b.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
    pair_id = relay.add_pair(inner_a.detach(), inner_b.detach())
    pair = RelayedPair(relay, pair_id, peer_a, peer_b)

    peer_a.sendall(b"first")
    assert recv_exactly(peer_b, 5) == b"first"
    stats = relay.pair_stats(pair_id)
    assert stats.copy_a_to_b and not stats.copy_b_to_a  # only a->b writes to the O_APPEND fd
    assert relay.worker_stats()[stats.worker].fallbacks == 1

    exchange_both_ways(pair, TRANSFER_BYTES, seed=20)
    [done] = wait_completions(relay)
    assert done.reason == "eof"
    assert done.bytes_a_to_b == 5 + TRANSFER_BYTES
    pair.close()


def test_use_splice_false_never_splices(relay: Relay) -> None:
    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    pair = RelayedPair(
        relay, relay.add_pair(inner_a.detach(), inner_b.detach(), use_splice=False), peer_a, peer_b
    )
    exchange_both_ways(pair, TRANSFER_BYTES, seed=21)
    stats = relay.worker_stats()
    assert sum(s.splice_calls for s in stats) == 0
    assert sum(s.copy_calls for s in stats) > 0
    assert sum(s.pipes_created for s in stats) == 0
    [done] = wait_completions(relay)
    assert done.reason == "eof"
    pair.close()


def test_emfile_on_pipe_creation_falls_back_and_keeps_serving() -> None:
    with Relay(workers=1) as relay:
        peer_a, inner_a = tcp_pair()
        inner_b, peer_b = tcp_pair()
        first = RelayedPair(
            relay, relay.add_pair(inner_a.detach(), inner_b.detach()), peer_a, peer_b
        )
        spare_a, spare_inner_a = tcp_pair()  # a second pair, created while fds are available
        spare_inner_b, spare_b = tcp_pair()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest_fd = max(int(name) for name in os.listdir("/proc/self/fd"))
        fillers: list[int] = []
        try:
            # Keep the filler loop short, then take every remaining descriptor.
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest_fd + 64, hard))
            try:
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as error:
                assert error.errno == 24  # EMFILE
            exchange_both_ways(first, TRANSFER_BYTES, seed=22)  # pipe2() fails: copy path
            stats = relay.worker_stats()[0]
            assert stats.pipe_failures >= 1
            assert stats.no_pipe >= 1
            assert stats.pipes_created == 0
            [done] = wait_completions(relay)
            assert (done.reason, done.bytes_a_to_b) == ("eof", TRANSFER_BYTES)
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Descriptors are back: after the retry back-off the same engine splices again.
        time.sleep(PIPE_RETRY_WAIT_S)
        second = RelayedPair(
            relay,
            relay.add_pair(spare_inner_a.detach(), spare_inner_b.detach()),
            spare_a,
            spare_b,
        )
        exchange_both_ways(second, TRANSFER_BYTES, seed=23)
        assert relay.worker_stats()[0].pipes_created >= 1
        [done] = wait_completions(relay)
        assert done.reason == "eof"
        first.close()
        second.close()
