"""Type stub for the Cython relay engine (implementation: _relay.pyx)."""

from __future__ import annotations

from types import TracebackType

from splice_ext._types import Completion, PairStats, Side, WorkerStats

DEFAULT_PIPE_SIZE: int
DEFAULT_PIPE_POOL_SIZE: int
DEFAULT_MAX_ROUNDS: int
DEFAULT_LOWAT_BYTES: int
DEFAULT_LOWAT_HOLD_S: float

class Relay:
    """A pool of worker threads relaying bytes between socket pairs with splice().

    Each worker owns an epoll set, a pipe pool and a timer list, and runs its loop entirely
    without the GIL. Methods may be called from any Python thread.

    Args:
        workers: number of worker threads (1..255); default ``os.cpu_count()``.
        pipe_size: capacity of each relay pipe in bytes (F_SETPIPE_SZ), capped at
            ``/proc/sys/fs/pipe-max-size``. Default 1 MiB: ~16x fewer splice calls per byte than
            the kernel's 64 KiB default.
        idle_timeout_s: end a pair (reason ``idle-timeout``) after this long without a byte
            moving in either direction. ``None`` disables it.
        half_close_timeout_s: once either side has sent EOF (or ``close_pair`` was called), end
            the pair (reason ``half-close-timeout``) after this long without a byte moving;
            replaces ``idle_timeout_s`` for half-closed pairs. ``None``: the idle timeout applies.
        pipe_pool_size: empty pipes kept per worker for reuse (each costs 2 fds, no pages).
        max_pipes_per_worker: cap on pipes a worker holds (pooled + in use); beyond it,
            directions relay through a 256 KiB read/send buffer. ``None``: no cap (a pipe is
            only held while its direction has bytes in flight).
        read_ahead_bytes: while a direction's destination cannot take more, stop reading its
            source once the pipe holds this many bytes (the rest waits in the source's socket
            buffer and its TCP window closes). ``None``: ``pipe_size``. Capped at ``pipe_size``.
        max_rounds: (splice-in, splice-out) rounds per direction before a worker serves other
            pairs (the pair is revisited in the same loop iteration).
        splice_more: experiment, off by default: pass SPLICE_F_MORE on splice-out while the
            source is still readable (the kernel already sets MSG_MORE inside one call).
        lowat_bytes: once a direction's stream looks paced by the network (in two 10 ms
            windows in a row it brings this many bytes in between 0.5 ms and
            ``lowat_hold_s``), set SO_RCVLOWAT to it on the source: the worker wakes once per
            ``lowat_bytes`` instead of once per arriving burst. Default 256 KiB; 0 switches it
            off.
        lowat_hold_s: upper bound of how long a raised SO_RCVLOWAT waits for input before it is
            cleared (it is held for twice the expected fill time, within this bound), i.e. the
            most a tail or a small message right after a paced stream is delayed. Default 4 ms.

    Raises:
        ValueError: a parameter is out of range.
        OSError: epoll, eventfd or thread creation failed.
    """

    def __init__(
        self,
        workers: int | None = None,
        pipe_size: int = ...,
        idle_timeout_s: float | None = None,
        half_close_timeout_s: float | None = None,
        pipe_pool_size: int = ...,
        max_pipes_per_worker: int | None = None,
        *,
        read_ahead_bytes: int | None = None,
        max_rounds: int = ...,
        splice_more: bool = False,
        lowat_bytes: int = ...,
        lowat_hold_s: float = ...,
    ) -> None: ...
    @property
    def workers(self) -> int:
        """Number of worker threads."""
    @property
    def pipe_size(self) -> int:
        """Effective pipe capacity requested with F_SETPIPE_SZ (after the pipe-max-size cap)."""
    @property
    def read_ahead_bytes(self) -> int:
        """Bytes a direction reads ahead into its pipe while the destination is blocked."""
    @property
    def max_rounds(self) -> int:
        """(splice-in, splice-out) rounds per direction per dispatch."""
    @property
    def lowat_bytes(self) -> int:
        """SO_RCVLOWAT set on streaming sources (0: never)."""
    @property
    def idle_timeout_s(self) -> float | None: ...
    @property
    def half_close_timeout_s(self) -> float | None: ...
    @property
    def running(self) -> bool:
        """True between construction and ``stop()``."""
    def __enter__(self) -> Relay: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
    def add_pair(
        self, fd_a: int, fd_b: int, worker: int | None = None, *, use_splice: bool = True
    ) -> int:
        """Start relaying between two connected stream sockets; returns the pair id.

        The engine takes ownership of both fds (no dup): from now on only the engine uses and
        closes them; pass ``sock.detach()``. They are switched to non-blocking mode. Failures
        after this call (e.g. an fd that cannot be polled) are reported as a completion with
        reason ``error``, never raised.

        Args:
            worker: worker index, or ``None`` for the one with the fewest live pairs.
            use_splice: ``False`` relays with read()/send() through a 256 KiB buffer instead of
                pipes (for fds whose splice copies anyway; also the test switch for the
                fallback path).

        Raises:
            ValueError: negative or identical fds, or a bad worker index (fds not taken).
            serval.errors.FlowStateError: the relay is stopped (fds not taken).
        """
    def close_pair(self, pair_id: int) -> bool:
        """Graceful close: stop reading, flush bytes in flight, FIN both sides, then close.

        Completes with reason ``closed`` (or ``half-close-timeout`` if the flush stalls). A
        parked pair is closed at once. Unread bytes in a socket's receive queue make the kernel
        send an RST on close. Returns False if the pair had already ended.
        """
    def abort_pair(self, pair_id: int) -> bool:
        """Reset both sides now (SO_LINGER 0), dropping bytes in flight; reason ``aborted``.

        Returns False if the pair had already ended.
        """
    def park(self, pair_id: int) -> None:
        """Stop all I/O on the pair; returns once the worker has stopped touching its fds.

        Bytes already in the pair's pipes stay there; timers are suspended while parked.
        Parking a parked pair does nothing.

        Raises:
            KeyError: no such live pair.
            serval.errors.FlowStateError: the relay is stopped.
        """
    def swap_fd(self, pair_id: int, side: Side, new_fd: int) -> None:
        """Install ``new_fd`` as side ``a`` or ``b`` of a parked pair.

        The engine takes ownership of ``new_fd``. The old fd is removed from epoll and closed,
        unless ``new_fd`` is the same number (the caller dup3()ed the new socket over it; the
        old registration vanished with the old file). A plain close() may send a FIN/RST on the
        old socket: put it in TCP_REPAIR mode first, or keep a dup, if it must stay silent.
        The new socket is expected to continue the same byte stream in the same half-close
        state (a TCP_REPAIR restore does that).

        Raises:
            ValueError: bad side or negative fd (fd not taken).
            KeyError: no such live pair (fd not taken).
            serval.errors.FlowStateError: the pair is not parked, or the relay is stopped (fd
                not taken).
            OSError: the new fd could not be registered (the engine owns it all the same; the
                pair stays parked: abort it).
        """
    def resume(self, pair_id: int) -> None:
        """Continue a parked pair, starting with the bytes kept in its pipes.

        Resuming an active pair does nothing.

        Raises:
            KeyError: no such live pair.
            serval.errors.FlowStateError: the relay is stopped.
        """
    def pair_stats(self, pair_id: int) -> PairStats:
        """A snapshot of one live pair (counters are read while the worker runs).

        Raises:
            KeyError: no such live pair (it may have completed already).
        """
    def worker_stats(self) -> list[WorkerStats]:
        """Counters of every worker; reading them costs no syscall and takes no lock."""
    def completion_fd(self) -> int:
        """An eventfd that is readable while completion records wait; watch it with
        ``loop.add_reader`` and call ``read_completions()``. It stays open after ``stop()``
        (to collect the final records) and is closed when the Relay is garbage-collected."""
    def read_completions(self) -> list[Completion]:
        """Take every waiting completion record (possibly none); never blocks."""
    def stop(self) -> None:
        """Abort every remaining pair (reason ``aborted``) and join the worker threads.

        Idempotent. For a graceful drain, ``close_pair`` the pairs and wait for their
        completions first.
        """
