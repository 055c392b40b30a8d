# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""GIL-free epoll + splice relay engine (see splice_ext/__init__.py for the user guide).

Threading and ownership rules, which every function below relies on:

- Each worker thread runs `worker_loop` entirely inside `with nogil`. It owns its epoll set, its
  pipe pool, its timer lists and every field of its live pairs. It never touches a Python object.
- Python threads talk to a worker only through `Worker.lock`: they reserve a slab slot (and
  initialise it while it is still PENDING), append a Command, and write the worker's eventfd when
  the queue goes from empty to non-empty. The worker swaps the whole queue out under the lock.
  Because the command queue is the only hand-off, everything Python wrote before enqueueing is
  visible to the worker (mutex happens-before), and nothing else is shared.
- Slots are freed by the worker under the lock, bumping `Pair.gen`; the generation travels in
  every epoll token, ready-list entry and pair id, so stale references are simply skipped.
- Counters that Python reads without the lock are relaxed atomics (relay_compat.h).
"""

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc

from splice_ext._linux cimport (
    EAGAIN, EBUSY, ECONNABORTED, ECONNRESET, EFD_CLOEXEC, EFD_NONBLOCK, EINTR, EINVAL, ENOENT,
    ENOMEM, ENOSPC, ENOSYS, ENOTCONN, ENOTSOCK, EPIPE, EPOLL_CLOEXEC, EPOLL_CTL_ADD, EPOLL_CTL_DEL,
    EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, ESHUTDOWN, F_SETPIPE_SZ, FIONBIO,
    MSG_DONTWAIT, MSG_NOSIGNAL, O_CLOEXEC, O_NONBLOCK, SHUT_WR, SIG_BLOCK, SO_ERROR, SO_LINGER,
    SO_RCVLOWAT, SOL_SOCKET, SPLICE_F_MORE, SPLICE_F_MOVE, SPLICE_F_NONBLOCK, close,
    epoll_create1, epoll_ctl, epoll_event, epoll_wait, errno, eventfd, fcntl, getsockopt, ioctl,
    linger, pipe2, pthread_cond_broadcast,
    pthread_cond_destroy, pthread_cond_init, pthread_cond_wait, pthread_mutex_destroy,
    pthread_mutex_init, pthread_mutex_lock, pthread_mutex_unlock, pthread_sigmask, read,
    relay_counter_add, relay_counter_get, relay_monotonic_s, relay_u32_get, relay_u32_set, send,
    setsockopt, shutdown, sigfillset, sigset_t, socklen_t, splice, ssize_t, write,
)

import os
import threading

from serval.errors import FlowStateError
from splice_ext._types import Completion, PairStats, WorkerStats


cdef enum:
    STATE_FREE = 0
    STATE_PENDING = 1
    STATE_ACTIVE = 2
    STATE_PARKED = 3

    # Pair.ready: per side, readiness reported by edge-triggered epoll and not yet used up by an
    # EAGAIN. Side s uses bits (READY_READ | READY_WRITE) << (2 * s).
    READY_READ = 1
    READY_WRITE = 2
    READY_ALL = 0xF

    # Direction.flags
    DIR_EOF = 1          # the source returned EOF: read no more
    DIR_SHUT = 2         # shutdown(destination, SHUT_WR) done: this direction is finished
    DIR_WAIT_ROOM = 4    # splice-in said EAGAIN with bytes in the pipe: the pipe may be full, so
                         # no splice-in until splice-out made room or new input arrived
                         # (h2o #3075: no hot loop; sozu #1323: no lost edge)
    DIR_COPY = 8         # read with read() into the copy buffer from now on
    DIR_COPY_OUT = 16    # splice-out is refused too: drain the pipe through the copy buffer
    DIR_LOWAT = 32       # SO_RCVLOWAT is raised on the source (see "Receive low-water mark")
    DIR_NO_LOWAT = 64    # the source refused SO_RCVLOWAT (not a socket): do not ask again
    DIR_PACED = 128      # the last rate window looked paced: one more and the mark is raised

    # Pair.flags
    PAIR_READY_LISTED = 1
    PAIR_CLOSING = 2
    PAIR_NOT_SOCKET = 4  # << side: send() said ENOTSOCK, use write()

    TIMER_NONE = 0
    TIMER_IDLE = 1
    TIMER_HALF = 2

    REASON_EOF = 0
    REASON_CLOSED = 1
    REASON_RESET = 2
    REASON_IDLE_TIMEOUT = 3
    REASON_HALF_CLOSE_TIMEOUT = 4
    REASON_ABORTED = 5
    REASON_ERROR = 6

    CMD_ADD = 1
    CMD_CLOSE = 2
    CMD_ABORT = 3
    CMD_PARK = 4
    CMD_SWAP = 5
    CMD_RESUME = 6

    OPTION_NO_SPLICE = 1

    # Worker.tuning bits: experiments the benchmark can switch on (splice_relay_server.py).
    TUNE_SPLICE_MORE = 1  # SPLICE_F_MORE on splice-out while the source is still readable

    PUMP_DEAD = -1       # the pair was finished (and its slot freed) inside the call
    PUMP_PROGRESS = 1    # bytes moved
    PUMP_CHANGED = 2     # EOF seen or shutdown forwarded
    PUMP_BUDGET = 4      # stopped before EAGAIN to let other pairs run: must be revisited

    MAX_EVENTS = 256
    # The recv/send path's buffer. Large, because its cost per byte is in the syscall count (§5 of
    # the splice notes: 1 MiB recv/send beat 64 KiB); allocated only for pairs that fall back.
    COPY_BUFFER_BYTES = 256 * 1024
    SPLICE_IN_MAX_BYTES = 1 << 30
    INITIAL_QUEUE = 64

cdef uint64_t WAKE_TOKEN = 0xFFFFFFFFFFFFFFFFULL
cdef uint32_t MAX_GEN = 0xFFFFFFFFU
cdef uint64_t LOW32 = 0xFFFFFFFFULL
# After pipe2() fails (EMFILE, ENFILE), do not retry it for this long: the copy path serves in
# the meantime and we do not pay a failing syscall per read.
cdef double PIPE_RETRY_S = 0.1
# A stream that brings lowat bytes faster than this is left alone: at such rates the worker
# is rarely asleep when bytes arrive, so the mark saves few wake-ups, and with it the sender
# was measured 25-30% slower (reno, ~28 Gbit/s over veth; benchmarks/README.md). 0.5 ms is
# about 4 Gbit/s for the default 256 KiB.
cdef double LOWAT_MIN_FILL_S = 0.0005
# The input rate that decides is measured over this long: one wake-up's rate is noisy (a late
# wake-up makes a fast stream look paced), 10 ms of a 1 Gbit/s stream is ~20 bursts.
cdef double LOWAT_RATE_WINDOW_S = 0.01
# A raised mark is cleared after this long even while input flows, so the next wake-ups measure
# the stream without it and the choice is made again: a stream that sped up until every wake-up
# finds more than the mark queued anyway would otherwise keep it for its whole life, paying for
# it (see "Receive low-water mark") without saving a wake-up.
cdef double LOWAT_REVIEW_S = 0.5

_REASONS = ("eof", "closed", "reset", "idle-timeout", "half-close-timeout", "aborted", "error")
_STATES = ("free", "pending", "active", "parked")
DEFAULT_PIPE_SIZE = 1 << 20
DEFAULT_PIPE_POOL_SIZE = 256
# Rounds of (splice-in, splice-out) per direction per dispatch, i.e. up to 16 pipe loads before
# the worker looks at other pairs. The pair goes on the ready list meanwhile, because with
# edge-triggered epoll no new event would come for bytes already queued.
DEFAULT_MAX_ROUNDS = 16
# SO_RCVLOWAT raised on fast bulk streams, and the longest it may stay without input before it
# is cleared: the most a small message right after such a stream can be held back (see
# "Receive low-water mark"; benchmarks/results/relay.md has the measurements behind them).
DEFAULT_LOWAT_BYTES = 256 * 1024
DEFAULT_LOWAT_HOLD_S = 0.004
_PIPE_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"


# --------------------------------------------------------------------------------------------
# Slab and identifiers
# --------------------------------------------------------------------------------------------

cdef inline Pair* pair_at(Worker* w, uint32_t slot) noexcept nogil:
    return &w.chunks[slot >> CHUNK_SHIFT][slot & CHUNK_MASK]


cdef inline uint64_t pair_id_of(Worker* w, Pair* p) noexcept nogil:
    # gen (32 bits) | worker (8 bits) | slot (24 bits)
    return (<uint64_t>p.gen << 32) | (<uint64_t>w.index << 24) | <uint64_t>p.slot


cdef inline uint64_t event_token(Pair* p, int side) noexcept nogil:
    # gen (32 bits) | slot (31 bits) | side (1 bit); all ones is the wake-up eventfd.
    return (<uint64_t>p.gen << 32) | (<uint64_t>p.slot << 1) | <uint64_t>side


cdef inline uint64_t ready_token(Pair* p) noexcept nogil:
    return (<uint64_t>p.gen << 32) | <uint64_t>p.slot


cdef inline uint32_t next_gen(uint32_t gen) noexcept nogil:
    return 1 if gen == MAX_GEN else gen + 1


cdef void reset_pair(Pair* p, uint32_t slot) noexcept nogil:
    # Every field but `gen`: a stale reference may still read `gen` concurrently.
    cdef int k
    for k in range(2):
        p.dirs[k].bytes = 0
        p.dirs[k].last_input = 0.0
        p.dirs[k].lowat_hold_s = 0.0
        p.dirs[k].lowat_armed_at = 0.0
        p.dirs[k].rate_window_start = 0.0
        p.dirs[k].rate_window_bytes = 0
        p.dirs[k].buffer = NULL
        p.dirs[k].pipe_read = -1
        p.dirs[k].pipe_write = -1
        p.dirs[k].in_pipe = 0
        p.dirs[k].buffer_offset = 0
        p.dirs[k].buffer_length = 0
        p.dirs[k].flags = 0
        p.fds[k] = -1
    p.splice_calls = 0
    p.copy_calls = 0
    p.started = relay_monotonic_s()
    p.last_activity = p.started
    p.slot = slot
    p.timer_prev = -1
    p.timer_next = -1
    p.ready = 0
    p.flags = 0
    p.timer_list = TIMER_NONE
    p.state = STATE_PENDING


# --------------------------------------------------------------------------------------------
# Timers: two FIFO lists per worker. Every pair of a worker shares the same timeout values, and
# a pair is (re)appended at the tail with last_activity = now, so each list stays sorted by
# expiry: touching is O(1), expiring pops from the head, and the epoll_wait timeout is the head.
# --------------------------------------------------------------------------------------------

cdef void timer_unlink(Worker* w, Pair* p) noexcept nogil:
    cdef int which = p.timer_list
    if which == TIMER_NONE:
        return
    if p.timer_prev >= 0:
        pair_at(w, <uint32_t>p.timer_prev).timer_next = p.timer_next
    else:
        w.timer_head[which] = p.timer_next
    if p.timer_next >= 0:
        pair_at(w, <uint32_t>p.timer_next).timer_prev = p.timer_prev
    else:
        w.timer_tail[which] = p.timer_prev
    p.timer_prev = -1
    p.timer_next = -1
    p.timer_list = TIMER_NONE


cdef void timer_append(Worker* w, Pair* p, int which) noexcept nogil:
    p.timer_list = which
    p.timer_next = -1
    p.timer_prev = w.timer_tail[which]
    if p.timer_prev >= 0:
        pair_at(w, <uint32_t>p.timer_prev).timer_next = <int32_t>p.slot
    else:
        w.timer_head[which] = <int32_t>p.slot
    w.timer_tail[which] = <int32_t>p.slot


cdef int wanted_timer(Worker* w, Pair* p) noexcept nogil:
    if p.state != STATE_ACTIVE:
        return TIMER_NONE  # parked pairs wait for their migration without a deadline
    if ((p.dirs[0].flags | p.dirs[1].flags) & DIR_EOF) and w.half_close_timeout_s > 0:
        return TIMER_HALF
    if w.idle_timeout_s > 0:
        return TIMER_IDLE
    return TIMER_NONE


cdef void touch(Worker* w, Pair* p) noexcept nogil:
    cdef int which = wanted_timer(w, p)
    p.last_activity = w.now
    if which == p.timer_list and (which == TIMER_NONE or w.timer_tail[which] == <int32_t>p.slot):
        return
    timer_unlink(w, p)
    if which != TIMER_NONE:
        timer_append(w, p, which)


cdef int next_timeout_ms(Worker* w) noexcept nogil:
    cdef double deadline = -1.0
    cdef double candidate
    cdef double wait_ms
    if w.ready_count:
        return 0
    if w.timer_head[TIMER_IDLE] >= 0:
        deadline = pair_at(w, <uint32_t>w.timer_head[TIMER_IDLE]).last_activity + w.idle_timeout_s
    if w.timer_head[TIMER_HALF] >= 0:
        candidate = (pair_at(w, <uint32_t>w.timer_head[TIMER_HALF]).last_activity
                     + w.half_close_timeout_s)
        if deadline < 0 or candidate < deadline:
            deadline = candidate
    if w.lowat_count and (deadline < 0 or w.lowat_check_at < deadline):
        deadline = w.lowat_check_at
    if deadline < 0:
        return -1
    wait_ms = (deadline - w.now) * 1000.0
    if wait_ms <= 0:
        return 0
    if wait_ms > 3600000.0:
        return 3600000
    return <int>wait_ms + 1  # round up: waking early only costs an empty iteration


# --------------------------------------------------------------------------------------------
# Pipe pool
# --------------------------------------------------------------------------------------------

cdef bint attach_pipe(Worker* w, Direction* d) noexcept nogil:
    cdef int fds[2]
    if w.pool_length:
        w.pool_length -= 1
        d.pipe_read = w.pool[2 * w.pool_length]
        d.pipe_write = w.pool[2 * w.pool_length + 1]
        relay_counter_add(&w.counters.pipes_pooled, <uint64_t>-1)
        return True
    if w.now < w.pipe_retry_at:
        return False
    if w.max_pipes and relay_counter_get(&w.counters.pipes_open) >= w.max_pipes:
        return False
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        w.pipe_retry_at = w.now + PIPE_RETRY_S
        relay_counter_add(&w.counters.pipe_failures, 1)
        return False
    # Enlarging is what makes splice pay (~16x fewer calls per byte than 64 KiB pipes). When
    # refused (per-user pipe page limits) the pipe keeps working at its default size.
    if w.pipe_size and fcntl(fds[1], F_SETPIPE_SZ, <int>w.pipe_size) < 0:
        relay_counter_add(&w.counters.pipe_resize_failures, 1)
    d.pipe_read = fds[0]
    d.pipe_write = fds[1]
    relay_counter_add(&w.counters.pipes_created, 1)
    relay_counter_add(&w.counters.pipes_open, 1)
    return True


cdef void detach_pipe(Worker* w, Direction* d) noexcept nogil:
    if d.pipe_read < 0:
        return
    if d.in_pipe == 0 and w.pool_length < w.pool_max:
        w.pool[2 * w.pool_length] = d.pipe_read
        w.pool[2 * w.pool_length + 1] = d.pipe_write
        w.pool_length += 1
        relay_counter_add(&w.counters.pipes_pooled, 1)
    else:
        # A pipe holding bytes is never recycled: they belong to a dead stream.
        close(d.pipe_read)
        close(d.pipe_write)
        relay_counter_add(&w.counters.pipes_open, <uint64_t>-1)
        if d.in_pipe:
            relay_counter_add(&w.counters.pipes_discarded, 1)
    d.pipe_read = -1
    d.pipe_write = -1
    relay_u32_set(&d.in_pipe, 0)


# --------------------------------------------------------------------------------------------
# Completion
# --------------------------------------------------------------------------------------------

cdef void push_completion(Worker* w, CompletionRecord* completed) noexcept nogil:
    cdef Shared* s = w.shared
    cdef CompletionRecord* records
    cdef size_t capacity
    cdef bint was_empty
    cdef uint64_t one = 1
    pthread_mutex_lock(&s.completion_lock)
    if s.record_count == s.record_capacity:
        capacity = s.record_capacity * 2 if s.record_capacity else INITIAL_QUEUE
        records = <CompletionRecord*>realloc(s.records, capacity * sizeof(CompletionRecord))
        if records == NULL:
            s.records_dropped += 1
            pthread_mutex_unlock(&s.completion_lock)
            return
        s.records = records
        s.record_capacity = capacity
    s.records[s.record_count] = completed[0]
    s.record_count += 1
    was_empty = s.record_count == 1
    pthread_mutex_unlock(&s.completion_lock)
    if was_empty:
        # Only the empty -> non-empty transition needs a wake-up; Python drains everything.
        write(s.completion_fd, &one, sizeof(one))


cdef void finish(Worker* w, Pair* p, int reason, int err, bint abortive) noexcept nogil:
    """Ends a pair: releases pipes, closes both fds, frees the slot, reports."""
    cdef CompletionRecord completed
    cdef linger hard_close
    cdef int k
    cdef Direction* d
    for k in range(2):
        d = &p.dirs[k]
        detach_pipe(w, d)
        if d.buffer != NULL:
            free(d.buffer)
            d.buffer = NULL
        relay_u32_set(&d.buffer_length, 0)
    hard_close.l_onoff = 1
    hard_close.l_linger = 0
    for k in range(2):
        if p.fds[k] >= 0:
            # Explicit DEL: the registration would outlive close() if another process (servald)
            # still holds a duplicate of the socket.
            epoll_ctl(w.epoll_fd, EPOLL_CTL_DEL, p.fds[k], NULL)
            if abortive:
                # SO_LINGER 0 makes close() send an RST: the peer learns the stream was cut.
                setsockopt(p.fds[k], SOL_SOCKET, SO_LINGER, &hard_close, sizeof(hard_close))
            close(p.fds[k])
            p.fds[k] = -1
    timer_unlink(w, p)
    completed.pair_id = pair_id_of(w, p)
    completed.bytes_a_to_b = p.dirs[0].bytes
    completed.bytes_b_to_a = p.dirs[1].bytes
    completed.duration_s = w.now - p.started
    completed.err = err
    completed.reason = reason
    # Free the slot before publishing: whoever reads the completion must find the id dead.
    pthread_mutex_lock(&w.lock)
    p.gen = next_gen(p.gen)
    p.state = STATE_FREE
    p.timer_next = w.free_head
    w.free_head = <int32_t>p.slot
    relay_u32_set(&w.live_pairs, w.live_pairs - 1)
    pthread_mutex_unlock(&w.lock)
    relay_counter_add(&w.counters.completions, 1)
    push_completion(w, &completed)


cdef inline bint is_reset(int err) noexcept nogil:
    return (err == ECONNRESET or err == EPIPE or err == ECONNABORTED or err == ENOTCONN
            or err == ESHUTDOWN)


cdef void fail(Worker* w, Pair* p, int err) noexcept nogil:
    finish(w, p, REASON_RESET if is_reset(err) else REASON_ERROR, err, True)


cdef int socket_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t size = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &size) < 0:
        return 0  # not a socket: errors will surface through read/write
    return err


# --------------------------------------------------------------------------------------------
# Receive low-water mark (Relay(lowat_bytes=..., lowat_hold_s=...); 0 bytes switches it off).
# A bulk stream paced by the network (a 1 Gbit/s link) wakes the worker once per arriving
# burst, ~64 KiB each, for a splice-in, a splice-out and an EAGAIN: about half the relay's CPU
# per GB there. When a direction's input rate, measured over LOWAT_RATE_WINDOW_S, brings lowat
# bytes in between LOWAT_MIN_FILL_S and lowat_hold_s in two windows in a row, SO_RCVLOWAT =
# lowat on the source makes the kernel wake us only when that much is queued (or on FIN,
# memory pressure or a nearly closed window: tcp_epollin_ready). A tail shorter than lowat
# would then wait for data that may never come, so a direction that read nothing for twice its
# expected fill time (at most lowat_hold_s) gets its mark cleared, and tcp_set_rcvlowat()
# signals EPOLLIN at once if bytes wait. A small message right after a paced stream is
# therefore delayed by at most lowat_hold_s (4 ms by default). Faster streams are left alone
# (LOWAT_MIN_FILL_S says why), and a raised mark is cleared every LOWAT_REVIEW_S so a stream
# that sped up loses it. EOF, park() and swap_fd() clear the mark too.
# --------------------------------------------------------------------------------------------

cdef inline double lowat_due(Direction* d) noexcept nogil:
    """When a raised mark is cleared: after its hold without input, or for review."""
    cdef double idle_due = d.last_input + d.lowat_hold_s
    cdef double review_due = d.lowat_armed_at + LOWAT_REVIEW_S
    return idle_due if idle_due < review_due else review_due


cdef void lowat_arm(Worker* w, Pair* p, int k, double hold_s) noexcept nogil:
    cdef int value = <int>w.lowat_bytes
    cdef uint64_t* grown
    cdef size_t capacity
    cdef double due
    if w.lowat_count == w.lowat_capacity:
        capacity = w.lowat_capacity * 2 if w.lowat_capacity else INITIAL_QUEUE
        grown = <uint64_t*>realloc(w.lowat, capacity * sizeof(uint64_t))
        if grown == NULL:
            return  # out of memory: simply keep waking per burst
        w.lowat = grown
        w.lowat_capacity = capacity
    if setsockopt(p.fds[k], SOL_SOCKET, SO_RCVLOWAT, &value, sizeof(value)) < 0:
        p.dirs[k].flags |= DIR_NO_LOWAT
        return
    p.dirs[k].flags |= DIR_LOWAT
    p.dirs[k].lowat_hold_s = hold_s
    p.dirs[k].lowat_armed_at = w.now
    w.lowat[w.lowat_count] = event_token(p, k)
    w.lowat_count += 1
    relay_counter_add(&w.counters.lowat_sets, 1)
    due = lowat_due(&p.dirs[k])
    if w.lowat_count == 1 or due < w.lowat_check_at:
        w.lowat_check_at = due


cdef void consider_lowat(Worker* w, Pair* p, int k, uint64_t moved_in, bint drained) noexcept nogil:
    """Input moved on a direction without a mark: raise it if the stream is paced.

    The rate is measured over LOWAT_RATE_WINDOW_S. At that rate lowat bytes take `fill_s` to
    arrive; the mark is raised (at the end of a window in which the source was drained) only if
    that is between LOWAT_MIN_FILL_S and the worker's hold bound in two windows in a row, and
    it is held for twice that (at most the bound): a 1 Gbit/s stream's tail waits a few
    milliseconds, and neither a slow stream (it would only churn the option) nor a very fast
    one is touched.
    """
    cdef Direction* d = &p.dirs[k]
    cdef double elapsed_s
    cdef double fill_s
    cdef double hold_s
    d.rate_window_bytes += moved_in
    elapsed_s = w.now - d.rate_window_start
    if elapsed_s < LOWAT_RATE_WINDOW_S or not drained:
        return
    fill_s = <double>w.lowat_bytes * elapsed_s / <double>d.rate_window_bytes
    d.rate_window_start = w.now
    d.rate_window_bytes = 0
    if fill_s > w.lowat_hold_s or fill_s < LOWAT_MIN_FILL_S:
        d.flags &= ~DIR_PACED
        return
    if not (d.flags & DIR_PACED):
        # One window is not enough: a fast sender that stalled for part of it (descheduled,
        # a GIL, a full send buffer drained late) looks paced for exactly one window.
        d.flags |= DIR_PACED
        return
    d.flags &= ~DIR_PACED
    hold_s = 2.0 * fill_s
    if hold_s > w.lowat_hold_s:
        hold_s = w.lowat_hold_s
    # lowat_arm computes the deadline from last_input: the input just read.
    d.last_input = w.now
    lowat_arm(w, p, k, hold_s)


cdef void lowat_disarm(Pair* p, int k) noexcept nogil:
    cdef int one = 1
    if not (p.dirs[k].flags & DIR_LOWAT):
        return
    p.dirs[k].flags &= ~DIR_LOWAT
    if not (p.dirs[k].flags & DIR_EOF):
        # Also queues an EPOLLIN edge if bytes are already waiting (tcp_set_rcvlowat).
        setsockopt(p.fds[k], SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one))


cdef void lowat_expire(Worker* w) noexcept nogil:
    """Clears the mark of directions that had no input for their hold time; drops stale
    entries (pairs that ended, marks cleared elsewhere)."""
    cdef size_t i
    cdef size_t kept = 0
    cdef uint64_t token
    cdef Pair* p
    cdef int k
    cdef double due
    cdef double next_due = 0.0
    if not w.lowat_count or w.now < w.lowat_check_at:
        return
    for i in range(w.lowat_count):
        token = w.lowat[i]
        p = pair_at(w, <uint32_t>((token >> 1) & 0x7FFFFFFF))
        k = <int>(token & 1)
        if p.gen != <uint32_t>(token >> 32) or not (p.dirs[k].flags & DIR_LOWAT):
            continue  # the pair ended, or the mark was cleared elsewhere
        if (p.dirs[k].flags & DIR_EOF) or p.state != STATE_ACTIVE:
            lowat_disarm(p, k)
            continue
        due = lowat_due(&p.dirs[k])
        if due <= w.now:
            lowat_disarm(p, k)
            continue
        w.lowat[kept] = token
        kept += 1
        if kept == 1 or due < next_due:
            next_due = due
    w.lowat_count = kept
    w.lowat_check_at = next_due


# --------------------------------------------------------------------------------------------
# The data path
# --------------------------------------------------------------------------------------------

cdef inline ssize_t send_bytes(Pair* p, int side, const char* data, size_t length) noexcept nogil:
    # MSG_NOSIGNAL: a reset peer must give EPIPE here, not a SIGPIPE to the process.
    cdef ssize_t n
    cdef int fd = p.fds[side]
    if not (p.flags & (PAIR_NOT_SOCKET << side)):
        n = send(fd, data, length, MSG_NOSIGNAL | MSG_DONTWAIT)
        if n >= 0 or errno != ENOTSOCK:
            return n
        p.flags |= PAIR_NOT_SOCKET << side
    return write(fd, data, length)


cdef bint ensure_buffer(Direction* d) noexcept nogil:
    if d.buffer == NULL:
        d.buffer = <char*>malloc(COPY_BUFFER_BYTES)
    return d.buffer != NULL


cdef int pump_direction(Worker* w, Pair* p, int k) noexcept nogil:
    """Moves bytes from side k to the other side until both ends say EAGAIN (or the budget).

    Order inside a round: splice-in, then splice-out at once (no extra epoll round trip), then
    the half-close check. Rounds repeat while anything moved, so after splice-out makes room the
    source is read again: with edge-triggered epoll no event would come for bytes already queued.
    """
    cdef Direction* d = &p.dirs[k]
    cdef int src = p.fds[k]
    cdef int dst = p.fds[1 - k]
    cdef uint8_t can_read = READY_READ << (2 * k)
    cdef uint8_t can_write = READY_WRITE << (2 * (1 - k))
    cdef int result = 0
    cdef int rounds = 0
    cdef int err
    cdef ssize_t n
    cdef size_t want
    cdef unsigned int flags
    cdef uint64_t moved_in = 0
    cdef bint progress
    while True:
        progress = False

        # ---- input: source -> pipe, or -> copy buffer ----
        # While the destination cannot take more, stop reading ahead once the pipe holds
        # read_ahead_bytes (default pipe_size): reading every arriving segment would cost a call
        # each, whereas the socket buffer keeps them (and throttles the sender) until one big
        # splice later. The read readiness stays set, and the destination's EPOLLOUT edge brings
        # us back here.
        if ((p.ready & can_read) and not (d.flags & (DIR_EOF | DIR_WAIT_ROOM))
                and ((p.ready & can_write) or d.in_pipe < w.read_ahead_bytes)):
            if not (d.flags & DIR_COPY) and (
                    d.pipe_read >= 0 or (d.buffer_length == 0 and attach_pipe(w, d))):
                # Ask for far more than pipe_size: the pipe's slot count is the real bound (a
                # slot may hold a whole 32 KiB fragment), as HAProxy's MAX_SPLICE_AT_ONCE.
                n = splice(src, NULL, d.pipe_write, NULL, SPLICE_IN_MAX_BYTES,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                relay_counter_add(&p.splice_calls, 1)
                relay_counter_add(&w.counters.splice_calls, 1)
                if n > 0:
                    relay_u32_set(&d.in_pipe, d.in_pipe + <uint32_t>n)
                    moved_in += <uint64_t>n
                    progress = True
                elif n == 0:
                    d.flags |= DIR_EOF
                    result |= PUMP_CHANGED
                else:
                    err = errno
                    if err == EAGAIN:
                        # The ambiguity: an empty socket or a full pipe. With nothing in the pipe
                        # it can only be the socket (wait for EPOLLIN); otherwise assume a full
                        # pipe and keep the read readiness for after splice-out made room.
                        if d.in_pipe == 0:
                            p.ready &= ~can_read
                        else:
                            d.flags |= DIR_WAIT_ROOM
                    elif err == EINVAL or err == ENOSYS:
                        d.flags |= DIR_COPY
                        relay_counter_add(&w.counters.fallbacks, 1)
                        progress = True  # go round again on the copy path
                    elif err == EINTR:
                        progress = True  # cannot happen (signals are blocked): retry anyway
                    else:
                        fail(w, p, err)
                        return PUMP_DEAD
            elif d.in_pipe == 0 and d.buffer_length == 0:
                if not (d.flags & DIR_COPY):
                    relay_counter_add(&w.counters.no_pipe, 1)
                if not ensure_buffer(d):
                    fail(w, p, ENOMEM)
                    return PUMP_DEAD
                n = read(src, d.buffer, COPY_BUFFER_BYTES)
                relay_counter_add(&p.copy_calls, 1)
                relay_counter_add(&w.counters.copy_calls, 1)
                if n > 0:
                    d.buffer_offset = 0
                    relay_u32_set(&d.buffer_length, <uint32_t>n)
                    moved_in += <uint64_t>n
                    progress = True
                elif n == 0:
                    d.flags |= DIR_EOF
                    result |= PUMP_CHANGED
                else:
                    err = errno
                    if err == EAGAIN:
                        p.ready &= ~can_read
                    elif err == EINTR:
                        progress = True  # cannot happen (signals are blocked): retry anyway
                    else:
                        fail(w, p, err)
                        return PUMP_DEAD

        # ---- output: copy buffer first (it holds older bytes than the pipe), then the pipe ----
        if p.ready & can_write:
            if d.buffer_length > 0:
                n = send_bytes(p, 1 - k, d.buffer + d.buffer_offset, d.buffer_length)
                relay_counter_add(&p.copy_calls, 1)
                relay_counter_add(&w.counters.copy_calls, 1)
                if n > 0:
                    d.buffer_offset += <uint32_t>n
                    relay_u32_set(&d.buffer_length, d.buffer_length - <uint32_t>n)
                    relay_counter_add(&d.bytes, <uint64_t>n)
                    relay_counter_add(&w.counters.bytes_a_to_b if k == 0
                                      else &w.counters.bytes_b_to_a, <uint64_t>n)
                    progress = True
                else:
                    err = errno
                    if err == EAGAIN:
                        p.ready &= ~can_write
                    elif err == EINTR:
                        progress = True  # cannot happen (signals are blocked): retry anyway
                    else:
                        fail(w, p, err)
                        return PUMP_DEAD
            elif d.in_pipe > 0:
                if not (d.flags & DIR_COPY_OUT):
                    # No SPLICE_F_MORE by default: we never know that more bytes are certainly
                    # coming, and corking would add latency (the Serval translator removed it
                    # for that). Within one call the kernel already sets MSG_MORE on every
                    # fragment but the last. TUNE_SPLICE_MORE is the benchmark's experiment.
                    flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
                    if ((w.tuning & TUNE_SPLICE_MORE) and (p.ready & can_read)
                            and not (d.flags & DIR_EOF)):
                        flags |= SPLICE_F_MORE
                    n = splice(d.pipe_read, NULL, dst, NULL, d.in_pipe, flags)
                    relay_counter_add(&p.splice_calls, 1)
                    relay_counter_add(&w.counters.splice_calls, 1)
                    if n > 0:
                        relay_u32_set(&d.in_pipe, d.in_pipe - <uint32_t>n)
                        relay_counter_add(&d.bytes, <uint64_t>n)
                        relay_counter_add(&w.counters.bytes_a_to_b if k == 0
                                          else &w.counters.bytes_b_to_a, <uint64_t>n)
                        d.flags &= ~DIR_WAIT_ROOM
                        progress = True
                    else:
                        err = errno
                        if err == EAGAIN:
                            p.ready &= ~can_write
                        elif err == EINVAL or err == ENOSYS:
                            # e.g. an O_APPEND destination. Drain what the pipe holds through the
                            # buffer, and read with read() from now on (splice+read+send would be
                            # worse than recv+send).
                            if not (d.flags & DIR_COPY):
                                relay_counter_add(&w.counters.fallbacks, 1)
                            d.flags |= DIR_COPY | DIR_COPY_OUT
                            progress = True
                        elif err == EINTR:
                            progress = True
                        else:
                            fail(w, p, err)
                            return PUMP_DEAD
                else:
                    if not ensure_buffer(d):
                        fail(w, p, ENOMEM)
                        return PUMP_DEAD
                    want = d.in_pipe if d.in_pipe < COPY_BUFFER_BYTES else COPY_BUFFER_BYTES
                    n = read(d.pipe_read, d.buffer, want)
                    relay_counter_add(&p.copy_calls, 1)
                    relay_counter_add(&w.counters.copy_calls, 1)
                    if n > 0:
                        relay_u32_set(&d.in_pipe, d.in_pipe - <uint32_t>n)
                        d.buffer_offset = 0
                        relay_u32_set(&d.buffer_length, <uint32_t>n)
                        d.flags &= ~DIR_WAIT_ROOM
                        progress = True
                    else:
                        fail(w, p, errno if n < 0 else EINVAL)
                        return PUMP_DEAD

        # ---- half-close: forward the EOF only once every byte before it was delivered ----
        if ((d.flags & (DIR_EOF | DIR_SHUT)) == DIR_EOF and d.in_pipe == 0
                and d.buffer_length == 0):
            if shutdown(dst, SHUT_WR) < 0:
                err = errno
                if err != ENOTSOCK:  # not a socket: nothing to half-close
                    fail(w, p, err)
                    return PUMP_DEAD
            d.flags |= DIR_SHUT
            result |= PUMP_CHANGED

        if not progress:
            break
        result |= PUMP_PROGRESS
        rounds += 1
        if rounds >= <int>w.max_rounds:
            result |= PUMP_BUDGET
            break
    if d.in_pipe == 0 and d.pipe_read >= 0:
        detach_pipe(w, d)  # idle directions hold no pipe: back to the pool
    if moved_in:
        if (w.lowat_bytes and not (d.flags & (DIR_LOWAT | DIR_NO_LOWAT | DIR_EOF))
                and p.state == STATE_ACTIVE):
            consider_lowat(w, p, k, moved_in, not (p.ready & can_read))
        d.last_input = w.now
    return result


cdef void schedule(Worker* w, Pair* p) noexcept nogil:
    cdef uint64_t* grown
    cdef size_t capacity
    if p.flags & PAIR_READY_LISTED:
        return
    if w.ready_count == w.ready_capacity:
        capacity = w.ready_capacity * 2
        grown = <uint64_t*>realloc(w.ready, capacity * sizeof(uint64_t))
        if grown == NULL:
            return  # out of memory: the pair waits for its next epoll event
        w.ready = grown
        w.ready_capacity = capacity
    w.ready[w.ready_count] = ready_token(p)
    w.ready_count += 1
    p.flags |= PAIR_READY_LISTED


cdef void pump(Worker* w, Pair* p) noexcept nogil:
    cdef int forward = pump_direction(w, p, 0)
    cdef int backward
    if forward == PUMP_DEAD:
        return
    backward = pump_direction(w, p, 1)
    if backward == PUMP_DEAD:
        return
    if p.dirs[0].flags & p.dirs[1].flags & DIR_SHUT:
        finish(w, p, REASON_CLOSED if p.flags & PAIR_CLOSING else REASON_EOF, 0, False)
        return
    if (forward | backward) & (PUMP_PROGRESS | PUMP_CHANGED):
        touch(w, p)
    if (forward | backward) & PUMP_BUDGET:
        schedule(w, p)


cdef void run_ready(Worker* w) noexcept nogil:
    cdef uint64_t* batch
    cdef size_t capacity
    cdef size_t count
    cdef size_t i
    cdef Pair* p
    if not w.ready_count:
        return
    batch = w.ready
    capacity = w.ready_capacity
    count = w.ready_count
    w.ready = w.ready_spare
    w.ready_capacity = w.ready_spare_capacity
    w.ready_count = 0
    w.ready_spare = batch
    w.ready_spare_capacity = capacity
    for i in range(count):
        p = pair_at(w, <uint32_t>(batch[i] & LOW32))
        if p.gen != <uint32_t>(batch[i] >> 32):
            continue
        p.flags &= ~PAIR_READY_LISTED
        if p.state == STATE_ACTIVE:
            pump(w, p)


cdef void handle_event(Worker* w, uint64_t token, uint32_t events) noexcept nogil:
    cdef uint32_t slot = <uint32_t>((token >> 1) & 0x7FFFFFFF)
    cdef int side = <int>(token & 1)
    cdef Pair* p = pair_at(w, slot)
    cdef int err
    if p.gen != <uint32_t>(token >> 32):
        return  # the pair ended earlier in this batch, or this is its predecessor's event
    if p.state != STATE_ACTIVE and p.state != STATE_PARKED:
        return
    # Readiness is only a hint that a syscall may succeed; EAGAIN is what clears it. HUP, RDHUP
    # and ERR all mean "a read will not block" (it returns EOF or the error).
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        p.ready |= READY_READ << (2 * side)
        # New input after an EAGAIN taken for "pipe full": that EAGAIN may just as well have
        # meant "socket empty", so try splice-in again. A pipe that really is full answers
        # EAGAIN once more (one call per arriving segment at worst, never a loop); waiting for
        # splice-out instead would leave the pipe underfilled and the EOF unread.
        p.dirs[side].flags &= ~DIR_WAIT_ROOM
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        p.ready |= READY_WRITE << (2 * side)
    if p.state != STATE_ACTIVE:
        return  # parked: remember readiness, touch nothing
    if events & EPOLLERR:
        # A reset side may have nothing to read or write (e.g. its direction already finished),
        # so ask for the error instead of waiting for a syscall to trip on it.
        err = socket_error(p.fds[side])
        if err:
            fail(w, p, err)
            return
    pump(w, p)


cdef void expire_timers(Worker* w) noexcept nogil:
    cdef Pair* p
    while w.timer_head[TIMER_IDLE] >= 0:
        p = pair_at(w, <uint32_t>w.timer_head[TIMER_IDLE])
        if p.last_activity + w.idle_timeout_s > w.now:
            break
        finish(w, p, REASON_IDLE_TIMEOUT, 0, False)
    while w.timer_head[TIMER_HALF] >= 0:
        p = pair_at(w, <uint32_t>w.timer_head[TIMER_HALF])
        if p.last_activity + w.half_close_timeout_s > w.now:
            break
        finish(w, p, REASON_HALF_CLOSE_TIMEOUT, 0, False)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

cdef void reply_to(Worker* w, Command* c, int err) noexcept nogil:
    if c.reply == NULL:
        return
    pthread_mutex_lock(&w.shared.sync_lock)
    c.reply.err = err
    c.reply.done = 1
    pthread_cond_broadcast(&w.shared.sync_cond)
    pthread_mutex_unlock(&w.shared.sync_lock)
    c.reply = NULL


cdef int register_side(Worker* w, Pair* p, int side) noexcept nogil:
    """Non-blocking mode plus one edge-triggered registration for the fd's whole life."""
    cdef epoll_event event
    cdef int one = 1
    if ioctl(p.fds[side], FIONBIO, &one) < 0:
        return errno
    event.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    event.data.u64 = event_token(p, side)
    if epoll_ctl(w.epoll_fd, EPOLL_CTL_ADD, p.fds[side], &event) < 0:
        return errno
    return 0


cdef void command_add(Worker* w, Command* c, Pair* p) noexcept nogil:
    cdef int side
    cdef int err
    p.fds[0] = c.fd_a
    p.fds[1] = c.fd_b
    p.state = STATE_ACTIVE
    if c.options & OPTION_NO_SPLICE:
        p.dirs[0].flags |= DIR_COPY
        p.dirs[1].flags |= DIR_COPY
        relay_counter_add(&w.counters.fallbacks, 2)
    for side in range(2):
        err = register_side(w, p, side)
        if err:
            finish(w, p, REASON_ERROR, err, False)
            return
    # No pump yet: the registration itself reports current readiness (ep_insert polls the file),
    # so the first events arrive in the next epoll_wait without speculative syscalls.
    touch(w, p)


cdef int command_swap(Worker* w, Command* c, Pair* p) noexcept nogil:
    cdef int side = c.fd_a
    cdef int new_fd = c.fd_b
    cdef int old_fd = p.fds[side]
    if p.state != STATE_PARKED:
        return EBUSY
    if old_fd >= 0:
        # Fails with ENOENT when the caller already dup3()ed the new socket over this number:
        # the old registration vanished with the old file.
        epoll_ctl(w.epoll_fd, EPOLL_CTL_DEL, old_fd, NULL)
        if old_fd != new_fd:
            close(old_fd)
    p.fds[side] = new_fd
    p.dirs[side].flags &= ~(DIR_LOWAT | DIR_NO_LOWAT)  # a new socket starts with SO_RCVLOWAT 1
    p.flags &= ~(PAIR_NOT_SOCKET << side)
    p.ready &= ~((READY_READ | READY_WRITE) << (2 * side))
    return register_side(w, p, side)


cdef void command_resume(Worker* w, Pair* p) noexcept nogil:
    cdef int side
    cdef int err
    p.state = STATE_ACTIVE
    for side in range(2):
        err = socket_error(p.fds[side])
        if err:
            fail(w, p, err)
            return
    # Try everything once: edges that fired while parked were recorded, but a swapped side may
    # have been ready before its registration; EAGAIN will clear whatever was not.
    p.ready = READY_ALL
    touch(w, p)
    pump(w, p)


cdef void abort_all(Worker* w) noexcept nogil:
    cdef uint32_t slot
    cdef uint32_t limit
    cdef Pair* p
    pthread_mutex_lock(&w.lock)
    limit = w.next_unused
    pthread_mutex_unlock(&w.lock)
    for slot in range(limit):
        p = pair_at(w, slot)
        if p.state == STATE_ACTIVE or p.state == STATE_PARKED:
            finish(w, p, REASON_ABORTED, 0, True)


cdef void run_commands(Worker* w, Command* batch, size_t count) noexcept nogil:
    cdef size_t i
    cdef Command* c
    cdef Pair* p
    for i in range(count):
        c = &batch[i]
        p = pair_at(w, c.slot)
        if p.gen != c.gen or p.state == STATE_FREE:
            # Ended after the command was sent. ADD cannot get here: its slot was reserved.
            reply_to(w, c, ENOENT)
            continue
        if c.kind == CMD_ADD:
            command_add(w, c, p)
        elif c.kind == CMD_ABORT:
            finish(w, p, REASON_ABORTED, 0, True)
        elif c.kind == CMD_CLOSE:
            if p.state == STATE_PARKED:
                finish(w, p, REASON_CLOSED, 0, False)
            else:
                # Read no more, flush what is in flight, then FIN both ways (see pump).
                p.flags |= PAIR_CLOSING
                p.dirs[0].flags |= DIR_EOF
                p.dirs[1].flags |= DIR_EOF
                touch(w, p)
                pump(w, p)
        elif c.kind == CMD_PARK:
            if p.state == STATE_ACTIVE:
                p.state = STATE_PARKED
                timer_unlink(w, p)
                # Before the reply: the caller may freeze (TCP_REPAIR) the sockets right after.
                lowat_disarm(p, 0)
                lowat_disarm(p, 1)
            reply_to(w, c, 0)
        elif c.kind == CMD_SWAP:
            reply_to(w, c, command_swap(w, c, p))
        elif c.kind == CMD_RESUME:
            if p.state == STATE_PARKED:
                command_resume(w, p)  # may finish the pair (a side was reset while parked)
            reply_to(w, c, 0)
        else:
            reply_to(w, c, EINVAL)


cdef bint process_commands(Worker* w) noexcept nogil:
    """Runs the queued commands; returns True once stop() was called."""
    cdef uint64_t value
    cdef bint stopping
    cdef Command* batch
    cdef size_t capacity
    cdef size_t count
    # Read the eventfd before taking the queue: a command queued after the swap below finds the
    # queue empty and writes the eventfd again, so no wake-up is lost.
    read(w.wake_fd, &value, sizeof(value))
    pthread_mutex_lock(&w.lock)
    batch = w.commands
    capacity = w.command_capacity
    count = w.command_count
    stopping = w.stopping
    w.commands = w.work_commands
    w.command_capacity = w.work_capacity
    w.command_count = 0
    pthread_mutex_unlock(&w.lock)
    w.work_commands = batch
    w.work_capacity = capacity
    run_commands(w, batch, count)
    return stopping


cdef void shut_down_worker(Worker* w) noexcept nogil:
    cdef Command* batch
    cdef size_t count
    cdef size_t i
    cdef Pair* p
    # After stop() nothing can be queued any more; after an unexpected epoll failure commands
    # may still be waiting: refuse them (ADDs become aborted pairs), then abort every live pair.
    pthread_mutex_lock(&w.lock)
    w.stopping = 1
    batch = w.commands
    count = w.command_count
    w.command_count = 0
    pthread_mutex_unlock(&w.lock)
    for i in range(count):
        if batch[i].kind == CMD_ADD:
            p = pair_at(w, batch[i].slot)
            p.fds[0] = batch[i].fd_a
            p.fds[1] = batch[i].fd_b
            finish(w, p, REASON_ABORTED, 0, True)
        else:
            reply_to(w, &batch[i], ESHUTDOWN)
    abort_all(w)
    while w.pool_length:
        w.pool_length -= 1
        close(w.pool[2 * w.pool_length])
        close(w.pool[2 * w.pool_length + 1])
        relay_counter_add(&w.counters.pipes_pooled, <uint64_t>-1)
        relay_counter_add(&w.counters.pipes_open, <uint64_t>-1)


cdef void worker_loop(Worker* w) noexcept nogil:
    cdef sigset_t all_signals
    cdef int count
    cdef int i
    cdef bint wake
    cdef bint stop = False
    # Signals go to the main thread, where Python handles them. This also keeps a pending
    # SIGPIPE from a splice() into a reset socket (splice cannot take MSG_NOSIGNAL) harmless.
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)
    w.now = relay_monotonic_s()
    while not stop:
        count = epoll_wait(w.epoll_fd, w.events, MAX_EVENTS, next_timeout_ms(w))
        w.now = relay_monotonic_s()
        relay_counter_add(&w.counters.wakeups, 1)
        if count < 0:
            if errno == EINTR:
                continue
            break  # the epoll fd itself is broken: nothing more can be served
        wake = False
        for i in range(count):
            if w.events[i].data.u64 == WAKE_TOKEN:
                wake = True
            else:
                handle_event(w, w.events[i].data.u64, w.events[i].events)
        if wake:
            stop = process_commands(w)
        run_ready(w)
        expire_timers(w)
        lowat_expire(w)
    shut_down_worker(w)


# --------------------------------------------------------------------------------------------
# Construction and teardown helpers (called with the GIL)
# --------------------------------------------------------------------------------------------

cdef Worker* new_worker(int index, Shared* shared, uint32_t pipe_size, uint32_t read_ahead_bytes,
                        uint32_t max_rounds, uint32_t tuning, uint32_t lowat_bytes,
                        double lowat_hold_s, uint32_t pool_max,
                        uint32_t max_pipes, double idle_timeout_s,
                        double half_close_timeout_s) except NULL:
    cdef Worker* w = <Worker*>calloc(1, sizeof(Worker))
    cdef epoll_event event
    cdef int i
    if w == NULL:
        raise MemoryError()
    pthread_mutex_init(&w.lock, NULL)
    w.index = index
    w.shared = shared
    w.pipe_size = pipe_size
    w.read_ahead_bytes = read_ahead_bytes
    w.max_rounds = max_rounds
    w.tuning = tuning
    w.lowat_bytes = lowat_bytes
    w.lowat_hold_s = lowat_hold_s
    w.pool_max = pool_max
    w.max_pipes = max_pipes
    w.idle_timeout_s = idle_timeout_s
    w.half_close_timeout_s = half_close_timeout_s
    w.free_head = -1
    w.epoll_fd = -1
    w.wake_fd = -1
    for i in range(3):
        w.timer_head[i] = -1
        w.timer_tail[i] = -1
    try:
        w.chunks = <Pair**>calloc(MAX_CHUNKS, sizeof(Pair*))
        w.events = <epoll_event*>calloc(MAX_EVENTS, sizeof(epoll_event))
        w.pool = <int*>calloc(2 * pool_max + 2, sizeof(int))
        w.ready_capacity = INITIAL_QUEUE
        w.ready = <uint64_t*>calloc(INITIAL_QUEUE, sizeof(uint64_t))
        w.ready_spare_capacity = INITIAL_QUEUE
        w.ready_spare = <uint64_t*>calloc(INITIAL_QUEUE, sizeof(uint64_t))
        if (w.chunks == NULL or w.events == NULL or w.pool == NULL or w.ready == NULL
                or w.ready_spare == NULL):
            raise MemoryError()
        w.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        if w.epoll_fd < 0:
            raise OSError(errno, os.strerror(errno))
        w.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if w.wake_fd < 0:
            raise OSError(errno, os.strerror(errno))
        # Level-triggered on purpose: the loop reads the eventfd every time it fires.
        event.events = EPOLLIN
        event.data.u64 = WAKE_TOKEN
        if epoll_ctl(w.epoll_fd, EPOLL_CTL_ADD, w.wake_fd, &event) < 0:
            raise OSError(errno, os.strerror(errno))
    except BaseException:
        free_worker(w)
        raise
    return w


cdef void free_worker(Worker* w) noexcept:
    cdef uint32_t i
    cdef uint32_t slot
    cdef Pair* p
    if w == NULL:
        return
    if w.chunks != NULL:
        for i in range(w.chunk_count):
            if w.chunks[i] != NULL:
                for slot in range(<uint32_t>CHUNK_PAIRS):
                    p = &w.chunks[i][slot]
                    free(p.dirs[0].buffer)
                    free(p.dirs[1].buffer)
                free(w.chunks[i])
        free(w.chunks)
    while w.pool_length:
        w.pool_length -= 1
        close(w.pool[2 * w.pool_length])
        close(w.pool[2 * w.pool_length + 1])
    if w.epoll_fd >= 0:
        close(w.epoll_fd)
    if w.wake_fd >= 0:
        close(w.wake_fd)
    free(w.events)
    free(w.pool)
    free(w.ready)
    free(w.ready_spare)
    free(w.lowat)
    free(w.commands)
    free(w.work_commands)
    pthread_mutex_destroy(&w.lock)
    free(w)


cdef inline void wake(Worker* w) noexcept nogil:
    cdef uint64_t one = 1
    write(w.wake_fd, &one, sizeof(one))


cdef uint64_t _pair_id(object pair_id) except? 0:
    if not isinstance(pair_id, int) or isinstance(pair_id, bool):
        raise TypeError(f"pair id must be an int, not {type(pair_id).__name__}")
    if not 0 < pair_id < (1 << 64):
        raise KeyError(pair_id)
    return <uint64_t>pair_id


def _pipe_max_size() -> int:
    try:
        with open(_PIPE_MAX_SIZE_PATH) as limit_file:
            return int(limit_file.read())
    except (OSError, ValueError):
        return DEFAULT_PIPE_SIZE


def _seconds_or_zero(name: str, value: object) -> float:
    if value is None:
        return 0.0
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return seconds


cdef Pair* live_pair(Worker* w, uint64_t pair_id) noexcept nogil:
    """The live pair with this id, or NULL (caller holds w.lock)."""
    cdef uint32_t slot = <uint32_t>(pair_id & 0xFFFFFF)
    cdef Pair* p
    if slot >= w.next_unused:
        return NULL
    p = pair_at(w, slot)
    if p.gen != <uint32_t>(pair_id >> 32) or p.state == STATE_FREE:
        return NULL
    return p


cdef int queue_command(Worker* w, Command* command) noexcept nogil:
    """Appends a command (caller holds w.lock): 1 if the worker must be woken, 0 if it is
    already due to wake, -ENOMEM if nothing was queued."""
    cdef Command* grown
    cdef size_t capacity
    if w.command_count == w.command_capacity:
        capacity = w.command_capacity * 2 if w.command_capacity else INITIAL_QUEUE
        grown = <Command*>realloc(w.commands, capacity * sizeof(Command))
        if grown == NULL:
            return -ENOMEM
        w.commands = grown
        w.command_capacity = capacity
    w.commands[w.command_count] = command[0]
    w.command_count += 1
    return 1 if w.command_count == 1 else 0


cdef int post_command(Worker* w, Command* command) noexcept nogil:
    """Queues a command for a live pair: 1 or 0 (wake or not), -ESHUTDOWN, -ENOENT, -ENOMEM.

    Nothing here may raise: a Python allocation could run arbitrary code (GC finalizers) that
    releases the GIL while this thread holds the worker's mutex.
    """
    cdef int result
    pthread_mutex_lock(&w.lock)
    if w.stopping:
        result = -ESHUTDOWN
    elif live_pair(w, (<uint64_t>command.gen << 32) | command.slot) == NULL:
        result = -ENOENT
    else:
        result = queue_command(w, command)
    pthread_mutex_unlock(&w.lock)
    return result


cdef int reserve_pair(Worker* w, Command* command, uint64_t* ident) noexcept nogil:
    """Reserves a slab slot and queues the ADD: 1 or 0 (wake or not), -ESHUTDOWN, -ENOMEM,
    -ENOSPC. The slot is initialised here, while the worker cannot see it yet."""
    cdef Pair* p
    cdef uint32_t slot
    cdef uint32_t chunk
    cdef int result
    pthread_mutex_lock(&w.lock)
    if w.stopping:
        pthread_mutex_unlock(&w.lock)
        return -ESHUTDOWN
    # Make room in the queue first, so that nothing can fail after the reservation.
    if w.command_count == w.command_capacity:
        result = queue_command(w, command)
        if result < 0:
            pthread_mutex_unlock(&w.lock)
            return result
        w.command_count -= 1
    if w.free_head >= 0:
        slot = <uint32_t>w.free_head
        p = pair_at(w, slot)
        w.free_head = p.timer_next
    else:
        slot = w.next_unused
        chunk = slot >> CHUNK_SHIFT
        if chunk >= MAX_CHUNKS:
            pthread_mutex_unlock(&w.lock)
            return -ENOSPC
        if chunk >= w.chunk_count:
            w.chunks[chunk] = <Pair*>calloc(CHUNK_PAIRS, sizeof(Pair))
            if w.chunks[chunk] == NULL:
                pthread_mutex_unlock(&w.lock)
                return -ENOMEM
            w.chunk_count = chunk + 1
        w.next_unused = slot + 1
        p = pair_at(w, slot)
        p.gen = 1  # a never-used slot: no event or stale reference can read gen yet
    reset_pair(p, slot)
    command.slot = slot
    command.gen = p.gen
    result = queue_command(w, command)  # cannot fail: room was made above
    relay_u32_set(&w.live_pairs, w.live_pairs + 1)
    ident[0] = pair_id_of(w, p)
    pthread_mutex_unlock(&w.lock)
    return result


cdef int raise_for(int err, uint64_t pair_id) except -1:
    if err == ENOENT:
        raise KeyError(pair_id)
    if err == ESHUTDOWN:
        raise FlowStateError("the relay is stopped")
    if err == EBUSY:
        raise FlowStateError(f"pair {pair_id:#x} is not parked: park() it before swap_fd()")
    if err == ENOMEM:
        raise MemoryError()
    raise OSError(err, os.strerror(err))


# --------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------

cdef class Relay:
    """A pool of worker threads relaying bytes between socket pairs with splice().

    See splice_ext/__init__.py (or `help(splice_ext)`) for the full contract.
    """

    def __cinit__(self):
        self._workers = NULL
        self._worker_count = 0
        self._shared = NULL
        self._threads = []
        self._initialized = False
        self._stopped = False

    def __init__(self, workers=None, pipe_size=DEFAULT_PIPE_SIZE, idle_timeout_s=None,
                 half_close_timeout_s=None, pipe_pool_size=DEFAULT_PIPE_POOL_SIZE,
                 max_pipes_per_worker=None, *, read_ahead_bytes=None,
                 max_rounds=DEFAULT_MAX_ROUNDS, splice_more=False,
                 lowat_bytes=DEFAULT_LOWAT_BYTES,
                 lowat_hold_s=DEFAULT_LOWAT_HOLD_S):
        cdef int i
        cdef int count
        cdef Shared* shared
        if self._initialized:
            raise RuntimeError("Relay.__init__ called twice")
        count = int(workers) if workers is not None else (os.cpu_count() or 1)
        if not 1 <= count <= MAX_WORKERS:
            raise ValueError(f"workers must be in 1..{MAX_WORKERS}, not {workers!r}")
        if int(pipe_size) < 4096:
            raise ValueError(f"pipe_size must be at least 4096 bytes, not {pipe_size!r}")
        if int(pipe_pool_size) < 0:
            raise ValueError(f"pipe_pool_size must be >= 0, not {pipe_pool_size!r}")
        if max_pipes_per_worker is not None and int(max_pipes_per_worker) < 0:
            raise ValueError(
                f"max_pipes_per_worker must be >= 0 or None, not {max_pipes_per_worker!r}")
        # Beyond pipe-max-size an unprivileged F_SETPIPE_SZ fails; privileged ones would pin more
        # memory per pair than the design budget, so cap in both cases.
        self._pipe_size = <uint32_t>min(int(pipe_size), _pipe_max_size(), 1 << 30)
        if read_ahead_bytes is None:
            self._read_ahead_bytes = self._pipe_size
        elif int(read_ahead_bytes) < 1:
            raise ValueError(f"read_ahead_bytes must be >= 1 or None, not {read_ahead_bytes!r}")
        else:
            self._read_ahead_bytes = <uint32_t>min(int(read_ahead_bytes), self._pipe_size)
        if not 1 <= int(max_rounds) <= 1 << 20:
            raise ValueError(f"max_rounds must be in 1..{1 << 20}, not {max_rounds!r}")
        self._max_rounds = <uint32_t>int(max_rounds)
        tuning = TUNE_SPLICE_MORE if splice_more else 0
        if not 0 <= int(lowat_bytes) <= 1 << 30:
            raise ValueError(f"lowat_bytes must be in 0..{1 << 30}, not {lowat_bytes!r}")
        self._lowat_bytes = <uint32_t>int(lowat_bytes)
        if not 0 < float(lowat_hold_s) <= 1.0:
            raise ValueError(f"lowat_hold_s must be in (0, 1] seconds, not {lowat_hold_s!r}")
        self._idle_timeout_s = _seconds_or_zero("idle_timeout_s", idle_timeout_s)
        self._half_close_timeout_s = _seconds_or_zero("half_close_timeout_s",
                                                      half_close_timeout_s)

        shared = <Shared*>calloc(1, sizeof(Shared))
        if shared == NULL:
            raise MemoryError()
        pthread_mutex_init(&shared.completion_lock, NULL)
        pthread_mutex_init(&shared.sync_lock, NULL)
        pthread_cond_init(&shared.sync_cond, NULL)
        self._shared = shared
        shared.completion_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if shared.completion_fd < 0:
            raise OSError(errno, os.strerror(errno))

        self._workers = <Worker**>calloc(count, sizeof(Worker*))
        if self._workers == NULL:
            raise MemoryError()
        for i in range(count):
            self._workers[i] = new_worker(
                i, shared, self._pipe_size, self._read_ahead_bytes, self._max_rounds,
                <uint32_t>tuning, self._lowat_bytes, float(lowat_hold_s),
                <uint32_t>int(pipe_pool_size),
                <uint32_t>(int(max_pipes_per_worker) if max_pipes_per_worker else 0),
                self._idle_timeout_s, self._half_close_timeout_s)
            self._worker_count = i + 1
        self._initialized = True
        try:
            for i in range(count):
                thread = threading.Thread(target=self._run_worker, args=(i,),
                                          name=f"splice-relay-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.stop()  # the threads already running would otherwise never be joined
            raise

    def __dealloc__(self):
        # Threads hold a reference to self until they return, so no worker is running here.
        cdef int i
        if self._workers != NULL:
            for i in range(self._worker_count):
                free_worker(self._workers[i])
            free(self._workers)
            self._workers = NULL
        if self._shared != NULL:
            if self._shared.completion_fd >= 0:
                close(self._shared.completion_fd)
            free(self._shared.records)
            free(self._shared.spare_records)
            pthread_mutex_destroy(&self._shared.completion_lock)
            pthread_mutex_destroy(&self._shared.sync_lock)
            pthread_cond_destroy(&self._shared.sync_cond)
            free(self._shared)
            self._shared = NULL

    def _run_worker(self, int index):
        cdef Worker* w = self._workers[index]
        with nogil:
            worker_loop(w)

    # ---- properties ----

    @property
    def workers(self):
        return self._worker_count

    @property
    def pipe_size(self):
        return self._pipe_size

    @property
    def read_ahead_bytes(self):
        return self._read_ahead_bytes

    @property
    def max_rounds(self):
        return self._max_rounds

    @property
    def lowat_bytes(self):
        return self._lowat_bytes

    @property
    def idle_timeout_s(self):
        return self._idle_timeout_s or None

    @property
    def half_close_timeout_s(self):
        return self._half_close_timeout_s or None

    @property
    def running(self):
        return self._initialized and not self._stopped

    def __repr__(self):
        return (f"<Relay workers={self._worker_count} pipe_size={self._pipe_size} "
                f"{'running' if self.running else 'stopped'}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return None

    # ---- internals ----

    cdef Worker* _worker_for(self, uint64_t pair_id) except NULL:
        cdef uint32_t index = <uint32_t>((pair_id >> 24) & 0xFF)
        if not self._initialized:
            raise FlowStateError("relay is not initialised")
        if index >= <uint32_t>self._worker_count:
            raise KeyError(pair_id)
        return self._workers[index]

    cdef int _call(self, uint64_t pair_id, Command* command) except -1:
        """Sends a synchronous command and waits (GIL released) for the worker's answer."""
        cdef Worker* w = self._worker_for(pair_id)
        cdef Reply reply
        cdef int result
        reply.done = 0
        reply.err = 0
        command.slot = <uint32_t>(pair_id & 0xFFFFFF)
        command.gen = <uint32_t>(pair_id >> 32)
        command.reply = &reply
        result = post_command(w, command)
        if result < 0:
            raise_for(-result, pair_id)
        if result:
            wake(w)
        with nogil:
            pthread_mutex_lock(&self._shared.sync_lock)
            while not reply.done:
                pthread_cond_wait(&self._shared.sync_cond, &self._shared.sync_lock)
            pthread_mutex_unlock(&self._shared.sync_lock)
        if reply.err:
            raise_for(reply.err, pair_id)
        return 0

    cdef bint _post(self, object pair_id, int kind) except -1:
        cdef uint64_t ident = _pair_id(pair_id)
        cdef Worker* w = self._worker_for(ident)
        cdef Command command
        cdef int result
        command.kind = kind
        command.slot = <uint32_t>(ident & 0xFFFFFF)
        command.gen = <uint32_t>(ident >> 32)
        command.fd_a = -1
        command.fd_b = -1
        command.options = 0
        command.reply = NULL
        result = post_command(w, &command)
        if result == -ENOMEM:
            raise MemoryError()
        if result > 0:
            wake(w)
        return result >= 0

    # ---- public API ----

    def add_pair(self, fd_a, fd_b, worker=None, *, use_splice=True):
        """Relay between two connected stream sockets; returns the pair id.

        Takes ownership of both fds (pass sock.detach()); later failures arrive as a completion.
        """
        cdef int a = fd_a
        cdef int b = fd_b
        cdef int index
        cdef int i
        cdef Worker* w
        cdef Command command
        cdef int result
        cdef uint64_t ident = 0
        if a < 0 or b < 0 or a == b:
            raise ValueError(f"add_pair needs two distinct open fds, not {fd_a!r} and {fd_b!r}")
        if not self.running:
            raise FlowStateError("the relay is stopped")
        if worker is None:
            # Least loaded by live pairs (the Serval translator only ever counted up).
            index = 0
            for i in range(1, self._worker_count):
                if (relay_u32_get(&self._workers[i].live_pairs)
                        < relay_u32_get(&self._workers[index].live_pairs)):
                    index = i
        else:
            index = worker
            if not 0 <= index < self._worker_count:
                raise ValueError(f"worker must be in 0..{self._worker_count - 1}, not {worker!r}")
        w = self._workers[index]
        command.kind = CMD_ADD
        command.fd_a = a
        command.fd_b = b
        command.options = 0 if use_splice else OPTION_NO_SPLICE
        command.reply = NULL
        result = reserve_pair(w, &command, &ident)
        if result == -ESHUTDOWN:
            raise FlowStateError("the relay is stopped")
        if result == -ENOMEM:
            raise MemoryError()
        if result == -ENOSPC:
            raise FlowStateError(f"worker {index} holds the maximum number of pairs")
        if result:
            wake(w)
        return ident

    def close_pair(self, pair_id):
        """Flush bytes in flight, FIN both sides, close; False if the pair already ended."""
        return self._post(pair_id, CMD_CLOSE)

    def abort_pair(self, pair_id):
        """Reset both sides now, dropping bytes in flight; False if the pair already ended."""
        return self._post(pair_id, CMD_ABORT)

    def park(self, pair_id):
        """Stop all I/O on the pair (pipe contents stay); returns once the worker stopped."""
        cdef Command command
        command.kind = CMD_PARK
        command.fd_a = -1
        command.fd_b = -1
        command.options = 0
        self._call(_pair_id(pair_id), &command)

    def swap_fd(self, pair_id, side, new_fd):
        """Install new_fd (taken over) as side 'a' or 'b' of a parked pair; closes the old fd
        unless it is the same number."""
        cdef Command command
        cdef int fd = new_fd
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', not {side!r}")
        if fd < 0:
            raise ValueError(f"new_fd must be an open fd, not {new_fd!r}")
        command.kind = CMD_SWAP
        command.fd_a = 0 if side == "a" else 1
        command.fd_b = fd
        command.options = 0
        self._call(_pair_id(pair_id), &command)

    def resume(self, pair_id):
        """Continue a parked pair, starting with the bytes kept in its pipes."""
        cdef Command command
        command.kind = CMD_RESUME
        command.fd_a = -1
        command.fd_b = -1
        command.options = 0
        self._call(_pair_id(pair_id), &command)

    def pair_stats(self, pair_id):
        """A PairStats snapshot of a live pair (KeyError once it ended)."""
        cdef uint64_t ident = _pair_id(pair_id)
        cdef Worker* w = self._worker_for(ident)
        cdef Pair* p
        cdef uint64_t sent[2]
        cdef uint64_t queued[2]
        cdef uint32_t flags[2]
        cdef uint64_t splice_calls
        cdef uint64_t copy_calls
        cdef double started
        cdef int state
        cdef int k
        pthread_mutex_lock(&w.lock)
        p = live_pair(w, ident)
        if p != NULL:
            state = p.state
            started = p.started
            for k in range(2):
                sent[k] = relay_counter_get(&p.dirs[k].bytes)
                queued[k] = (<uint64_t>relay_u32_get(&p.dirs[k].in_pipe)
                             + relay_u32_get(&p.dirs[k].buffer_length))
                flags[k] = p.dirs[k].flags
            splice_calls = relay_counter_get(&p.splice_calls)
            copy_calls = relay_counter_get(&p.copy_calls)
        pthread_mutex_unlock(&w.lock)
        if p == NULL:
            raise KeyError(pair_id)
        return PairStats(
            pair_id=ident, worker=w.index, state=_STATES[state],
            bytes_a_to_b=sent[0], bytes_b_to_a=sent[1],
            queued_a_to_b=queued[0], queued_b_to_a=queued[1],
            eof_a_to_b=bool(flags[0] & DIR_EOF), eof_b_to_a=bool(flags[1] & DIR_EOF),
            copy_a_to_b=bool(flags[0] & DIR_COPY), copy_b_to_a=bool(flags[1] & DIR_COPY),
            splice_calls=splice_calls, copy_calls=copy_calls,
            age_s=relay_monotonic_s() - started,
        )

    def worker_stats(self):
        """WorkerStats of every worker; no syscall, no lock."""
        cdef int i
        cdef Worker* w
        cdef uint64_t pooled
        result = []
        for i in range(self._worker_count):
            w = self._workers[i]
            pooled = relay_counter_get(&w.counters.pipes_pooled)
            result.append(WorkerStats(
                worker=i,
                active_pairs=relay_u32_get(&w.live_pairs),
                bytes_a_to_b=relay_counter_get(&w.counters.bytes_a_to_b),
                bytes_b_to_a=relay_counter_get(&w.counters.bytes_b_to_a),
                splice_calls=relay_counter_get(&w.counters.splice_calls),
                copy_calls=relay_counter_get(&w.counters.copy_calls),
                fallbacks=relay_counter_get(&w.counters.fallbacks),
                no_pipe=relay_counter_get(&w.counters.no_pipe),
                pipes_pooled=pooled,
                pipes_in_use=max(0, <long long>relay_counter_get(&w.counters.pipes_open)
                                 - <long long>pooled),
                pipes_created=relay_counter_get(&w.counters.pipes_created),
                pipes_discarded=relay_counter_get(&w.counters.pipes_discarded),
                pipe_failures=relay_counter_get(&w.counters.pipe_failures),
                pipe_resize_failures=relay_counter_get(&w.counters.pipe_resize_failures),
                completions=relay_counter_get(&w.counters.completions),
                wakeups=relay_counter_get(&w.counters.wakeups),
                lowat_sets=relay_counter_get(&w.counters.lowat_sets),
            ))
        return result

    def completion_fd(self):
        """An eventfd, readable while completions wait: watch it and call read_completions()."""
        if self._shared == NULL:
            raise FlowStateError("relay is not initialised")
        return self._shared.completion_fd

    def read_completions(self):
        """Take every waiting Completion (possibly none); never blocks."""
        cdef Shared* s = self._shared
        cdef CompletionRecord* records
        cdef size_t count
        cdef size_t capacity
        cdef size_t i
        cdef uint64_t value
        if s == NULL:
            return []
        # Reset the eventfd first, then take every record (see push_completion for why no
        # wake-up can be lost in between).
        read(s.completion_fd, &value, sizeof(value))
        pthread_mutex_lock(&s.completion_lock)
        records = s.records
        count = s.record_count
        capacity = s.record_capacity
        s.records = s.spare_records
        s.record_capacity = s.spare_capacity
        s.record_count = 0
        s.spare_records = NULL
        s.spare_capacity = 0
        pthread_mutex_unlock(&s.completion_lock)
        try:
            return [
                Completion(
                    pair_id=records[i].pair_id,
                    bytes_a_to_b=records[i].bytes_a_to_b,
                    bytes_b_to_a=records[i].bytes_b_to_a,
                    reason=_REASONS[records[i].reason],
                    errno=records[i].err,
                    duration_s=records[i].duration_s,
                )
                for i in range(count)
            ]
        finally:
            pthread_mutex_lock(&s.completion_lock)
            if s.spare_records == NULL:
                s.spare_records = records
                s.spare_capacity = capacity
                records = NULL
            pthread_mutex_unlock(&s.completion_lock)
            free(records)

    def stop(self):
        """Abort the remaining pairs (reason 'aborted') and join the workers; idempotent."""
        cdef int i
        cdef Worker* w
        if not self._initialized or self._stopped:
            return
        self._stopped = True
        for i in range(self._worker_count):
            w = self._workers[i]
            # The worker reads `stopping` when it takes its queue, runs what was queued before
            # (nothing can be queued after), then aborts its pairs and exits.
            pthread_mutex_lock(&w.lock)
            w.stopping = 1
            pthread_mutex_unlock(&w.lock)
            wake(w)
        for thread in self._threads:
            thread.join()
