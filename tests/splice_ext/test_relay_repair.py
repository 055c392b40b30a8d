"""swap_fd() with a real migration: the socket of side b is rebuilt with TCP_REPAIR.

This is what servald does to a translator's fd (notes/tcp-repair-migration.md): park the relay,
freeze and dump the kernel socket, rebuild it in a new socket, dup2() that over the same fd
number, swap_fd() (epoll re-registration), resume. Here the rebuild keeps the same 4-tuple on
the same host, and the peer is quiesced first (its data acked, ours acked), so the dump needs
neither the input nor the output lock of the full two-host protocol. The relay's pipe (a->b)
and the socket's receive queue (b->a) both hold bytes across the swap; none may be lost.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import time

import pytest
from relay_testlib import (
    Receiver,
    RelayedPair,
    Sender,
    pattern,
    recv_exactly,
    sha256,
    tcp_pair,
    wait_completions,
    wait_until,
    wait_until_stalled,
)

from splice_ext import Relay

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
MAX_USER_MSS = 32767


def queued(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


def queue_seq(sock: socket.socket, queue: int) -> int:
    sock.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
    return int(sock.getsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ)) & 0xFFFFFFFF


def set_queue_seq(sock: socket.socket, queue: int, seq: int) -> None:
    sock.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
    sock.setsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ, struct.pack("I", seq & 0xFFFFFFFF))


def rebuild_in_place(fd: int) -> int:
    """Rebuilds the ESTABLISHED socket behind `fd` with TCP_REPAIR, keeping the fd number.

    Its send queue must be empty (the peer has acked everything); its receive queue is carried
    over. Returns the number of receive-queue bytes carried.
    """
    old = socket.socket(fileno=os.dup(fd))
    local, remote = old.getsockname(), old.getpeername()
    old.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)
    assert queued(old, SIOCOUTQ) == 0
    info = old.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 104)
    options, scales = info[5], info[6]
    mss = old.getsockopt(socket.SOL_TCP, socket.TCP_MAXSEG)  # mss_clamp in repair mode
    timestamp = old.getsockopt(socket.SOL_TCP, TCP_TIMESTAMP)
    window = old.getsockopt(socket.SOL_TCP, TCP_REPAIR_WINDOW, 20)
    write_seq = queue_seq(old, SEND_QUEUE)
    rcv_nxt = queue_seq(old, RECV_QUEUE)
    in_queue = queued(old, SIOCINQ)
    received = old.recv(in_queue + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if in_queue else b""
    assert len(received) == in_queue
    old.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)

    new = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    new.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)  # before bind: allows binding the busy port
    new.bind(local)
    set_queue_seq(new, SEND_QUEUE, write_seq)
    set_queue_seq(new, RECV_QUEUE, rcv_nxt - len(received))
    new.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
    # Before connect (pitfall P1: else mss_cache drops to 524). TCP_MAXSEG accepts at most 32767;
    # loopback's MSS is larger, and TCP_REPAIR_OPTIONS below restores the exact clamp.
    new.setsockopt(socket.SOL_TCP, socket.TCP_MAXSEG, min(mss, MAX_USER_MSS))
    # Commit: the new socket takes the fd number; the old one, still in repair mode, is released
    # silently (no FIN, no RST) and frees the 4-tuple for the repair-mode connect below.
    os.dup2(new.fileno(), fd, inheritable=False)
    old.close()
    new.connect(remote)  # no SYN in repair mode: straight to ESTABLISHED
    repair_options = [(TCPOPT_MAXSEG, mss)]
    if options & TCPI_OPT_SACK:
        repair_options.append((TCPOPT_SACK_PERM, 0))
    if options & TCPI_OPT_WSCALE:
        repair_options.append((TCPOPT_WINDOW, (scales & 0xF) | ((scales >> 4) << 16)))
    if options & TCPI_OPT_TIMESTAMPS:
        repair_options.append((TCPOPT_TIMESTAMP, 0))
    new.setsockopt(
        socket.SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", *o) for o in repair_options)
    )
    if options & TCPI_OPT_TIMESTAMPS:
        new.setsockopt(socket.SOL_TCP, TCP_TIMESTAMP, struct.pack("I", timestamp & 0xFFFFFFFF))
    if received:
        new.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        new.sendall(received)  # in repair mode this fills the receive queue
        new.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
    new.setsockopt(socket.SOL_TCP, TCP_REPAIR_WINDOW, window)  # after the receive queue
    new.setsockopt(socket.SOL_TCP, TCP_REPAIR, 0)
    new.close()  # `fd` keeps the socket
    return len(received)


def test_swap_after_tcp_repair_rebuild(relay: Relay) -> None:
    probe = socket.socket()
    try:
        probe.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1)
    except PermissionError:
        pytest.skip("TCP_REPAIR needs CAP_NET_ADMIN")
    finally:
        probe.close()

    peer_a, inner_a = tcp_pair()
    inner_b, peer_b = tcp_pair()
    inner_b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    peer_b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    fd_b = inner_b.detach()
    pair_id = relay.add_pair(inner_a.detach(), fd_b)
    pair = RelayedPair(relay, pair_id, peer_a, peer_b)
    data = pattern(16 * 1024 * 1024, seed=50)
    reply = pattern(100_000, seed=51)
    sender = Sender(peer_a, data)
    sender.start()
    wait_until_stalled(relay, pair)  # bytes for b are waiting in the relay's pipe

    relay.park(pair_id)
    parked = relay.pair_stats(pair_id)
    assert parked.queued_a_to_b > 0
    # Quiesce: b reads everything its socket was sent and sends a reply that, the relay being
    # parked, stays in the relay-side socket's receive queue.
    receiver = Receiver(peer_b, keep=True)
    receiver.start()
    with socket.socket(fileno=os.dup(fd_b)) as view:
        wait_until(lambda: queued(view, SIOCOUTQ) == 0)
        peer_b.sendall(reply)
        wait_until(lambda: queued(peer_b, SIOCOUTQ) == 0 and queued(view, SIOCINQ) == len(reply))
    time.sleep(0.05)

    assert rebuild_in_place(fd_b) == len(reply)
    relay.swap_fd(pair_id, "b", fd_b)
    assert relay.pair_stats(pair_id).queued_a_to_b == parked.queued_a_to_b
    relay.resume(pair_id)

    assert recv_exactly(peer_a, len(reply)) == reply  # from the restored receive queue
    sender.join(timeout=30)
    receiver.join(timeout=30)
    assert receiver.result.error is None
    assert (receiver.result.length, receiver.result.digest) == (len(data), sha256(data))
    peer_b.shutdown(socket.SHUT_WR)
    [done] = wait_completions(relay)
    assert (done.reason, done.bytes_a_to_b, done.bytes_b_to_a) == ("eof", len(data), len(reply))
    pair.close()
