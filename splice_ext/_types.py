"""Plain-Python records the relay engine hands back: completions and statistics.

They live outside the Cython module so that mypy and readers see real dataclasses; the engine
only builds them on the control path (never inside a worker loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Why a pair ended.
#:
#: - ``eof``: both sides sent EOF and every byte was delivered (normal end, after half-close).
#: - ``closed``: ``Relay.close_pair()``: in-flight bytes were flushed, then both sides closed.
#: - ``reset``: a side was reset (ECONNRESET, EPIPE, ...); the other side was reset too.
#: - ``idle-timeout``: no byte moved in either direction for ``idle_timeout_s``.
#: - ``half-close-timeout``: half-closed (or closing), then no byte moved for
#:   ``half_close_timeout_s``.
#: - ``aborted``: ``Relay.abort_pair()`` or ``Relay.stop()``; both sides were reset.
#: - ``error``: any other error; ``Completion.errno`` says which. Both sides were reset.
CompletionReason = Literal[
    "eof", "closed", "reset", "idle-timeout", "half-close-timeout", "aborted", "error"
]

#: ``pending``: added, not yet picked up by its worker; ``active``: relaying; ``parked``: I/O
#: stopped by ``Relay.park()``.
PairState = Literal["pending", "active", "parked"]

#: A side of a pair: ``a`` is the first fd given to ``add_pair``, ``b`` the second.
Side = Literal["a", "b"]


@dataclass(frozen=True, slots=True)
class Completion:
    """The end of one pair, as read from ``Relay.read_completions()``.

    Byte counts are bytes *delivered* to the destination socket (accepted by its kernel), so
    ``bytes_a_to_b`` is what side b's peer can read.
    """

    pair_id: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    reason: CompletionReason
    errno: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class PairStats:
    """A snapshot of one live pair (fields are read without stopping the worker)."""

    pair_id: int
    worker: int
    state: PairState
    bytes_a_to_b: int
    bytes_b_to_a: int
    #: Bytes read from the source but not yet delivered (in the pipe or the copy buffer).
    queued_a_to_b: int
    queued_b_to_a: int
    #: The source sent EOF (FIN) in that direction.
    eof_a_to_b: bool
    eof_b_to_a: bool
    #: That direction moves bytes with recv/send instead of splice (EINVAL, or use_splice=False).
    copy_a_to_b: bool
    copy_b_to_a: bool
    splice_calls: int
    copy_calls: int
    age_s: float


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Counters of one worker thread since the relay started (monotonic except the gauges)."""

    worker: int
    #: Gauge: pairs added to this worker and not yet completed.
    active_pairs: int
    bytes_a_to_b: int
    bytes_b_to_a: int
    splice_calls: int
    #: read/recv/send/write calls made on the copy (fallback) path.
    copy_calls: int
    #: Directions switched to recv/send for good (splice EINVAL/ENOSYS, or use_splice=False).
    fallbacks: int
    #: Reads that went through the copy buffer because no pipe could be had (EMFILE, max_pipes).
    no_pipe: int
    #: Gauge: empty pipes waiting in this worker's pool.
    pipes_pooled: int
    #: Gauge: pipes attached to a direction that holds bytes.
    pipes_in_use: int
    pipes_created: int
    #: Pipes closed while still holding bytes (a pipe with data is never reused).
    pipes_discarded: int
    #: pipe2() failures (EMFILE, ENFILE, ENOMEM).
    pipe_failures: int
    #: F_SETPIPE_SZ refusals (the pipe kept the kernel's default size).
    pipe_resize_failures: int
    completions: int
    #: epoll_wait() returns: a cheap proxy for loop iterations.
    wakeups: int
    #: SO_RCVLOWAT raised on a streaming source (``Relay(lowat_bytes=...)``; 0 when off).
    lowat_sets: int = 0
