"""Zero-copy TCP relay engine: worker threads moving bytes between socket pairs with splice().

Quick start::

    from splice_ext import Relay

    relay = Relay(workers=2, idle_timeout_s=300, half_close_timeout_s=60)
    pair_id = relay.add_pair(client.detach(), upstream.detach())
    loop.add_reader(relay.completion_fd(), lambda: handle(relay.read_completions()))
    ...
    relay.stop()

Contract (details in each method's docstring in ``_relay.pyi``):

- **Ownership.** ``add_pair(fd_a, fd_b)`` takes ownership of both fds (no dup): the caller must
  not use or close them afterwards (use ``socket.detach()``). The engine puts them in
  non-blocking mode and closes them when the pair completes. ``swap_fd`` takes ownership of the
  new fd and closes the old one (unless it is the same number, i.e. the caller already dup3()ed
  the new socket over it).
- **Semantics.** Bytes are relayed both ways through per-direction pipes (1 MiB by default)
  taken from a per-worker pool only while a direction holds bytes. EOF on one side is forwarded
  as ``shutdown(SHUT_WR)`` on the other only after every byte before it was delivered; the other
  direction carries on. A reset on either side resets the other. When splice() is refused
  (EINVAL/ENOSYS) or no pipe can be had (EMFILE, ``max_pipes_per_worker``), that direction moves
  bytes with read()/send() instead.
- **Buffering.** A direction holds at most one pipe's worth of bytes: ``pipe_size / 4096``
  slots, each referencing one socket-buffer fragment (on loopback up to 32 KiB, so up to ~8x
  ``pipe_size`` bytes; with MSS-sized fragments much less). Once the destination stops taking
  bytes and the pipe holds ``pipe_size``, the engine stops reading and the source's TCP window
  closes: a stalled pair costs no CPU.
- **Wake-ups.** A direction whose stream is paced by the network (in two 10 ms windows in a
  row it brings ``lowat_bytes`` in between 0.5 ms and ``lowat_hold_s``: about 0.5 to 4 Gbit/s
  for the default 256 KiB) gets SO_RCVLOWAT = ``lowat_bytes`` on its source: the worker then
  wakes once per 256 KiB instead of once per arriving burst (~64 KiB through a 1 Gbit/s link),
  which cut relay CPU per GB by about half there. Faster streams are left alone: the worker
  is rarely asleep when their bytes arrive, and with the mark a 28 Gbit/s sender was measured
  25-30% slower. The mark is cleared after twice the expected fill time without input (at most
  ``lowat_hold_s``, 4 ms by default), on EOF, on ``park()``, and every 0.5 s so the rate is
  measured again; a tail or a small message right after a paced stream waits at most
  ``lowat_hold_s``. ``lowat_bytes=0`` switches it off.
- **Socket options** are the caller's: set TCP_NODELAY on both sockets before ``add_pair``
  (otherwise Nagle and delayed ACKs can hold small writes back for ~200 ms each time).
- **Migration.** ``park(id)`` returns once the worker has stopped all I/O on the pair (bytes in
  its pipes stay); ``swap_fd(id, side, fd)`` installs a new socket for one side while parked;
  ``resume(id)`` continues with no byte lost or duplicated.
- **Completions.** Every pair ends with exactly one ``Completion`` record, read with
  ``read_completions()`` when ``completion_fd()`` (an eventfd) is readable.
- **Threads.** Each worker runs its whole epoll loop without the GIL; methods are safe to call
  from any Python thread. Call ``stop()`` (or use ``with Relay() as relay:``): it aborts the
  remaining pairs and joins the workers.
"""

from __future__ import annotations

from splice_ext._relay import Relay
from splice_ext._types import (
    Completion,
    CompletionReason,
    PairState,
    PairStats,
    Side,
    WorkerStats,
)

__all__ = [
    "Completion",
    "CompletionReason",
    "PairState",
    "PairStats",
    "Relay",
    "Side",
    "WorkerStats",
]
