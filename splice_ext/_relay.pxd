# Engine data structures. All per-pair state is plain C: a worker never touches a Python object
# between two commands. See _relay.pyx for the behaviour and the locking rules.

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from splice_ext._linux cimport epoll_event, pthread_cond_t, pthread_mutex_t


cdef enum:
    # Slab geometry: a worker's pairs live in chunks of 1024 that are allocated on demand and never
    # moved or freed while the relay lives, so a Pair* stays valid and a slot index fits in
    # epoll_event.data.u64 together with the generation.
    CHUNK_SHIFT = 10
    CHUNK_PAIRS = 1 << CHUNK_SHIFT
    CHUNK_MASK = CHUNK_PAIRS - 1
    MAX_CHUNKS = 1 << 14          # 16 Mi slots per worker: the pair id keeps 24 bits for the slot
    MAX_WORKERS = 255             # the pair id keeps 8 bits for the worker


ctypedef struct Direction:
    # One direction of a pair: source side -> (pipe | copy buffer) -> destination side.
    uint64_t bytes                # delivered to the destination (relaxed atomic)
    double last_input             # CLOCK_MONOTONIC of the last read that moved bytes
    double lowat_hold_s           # while DIR_LOWAT: clear the mark after this long without input
    double lowat_armed_at         # while DIR_LOWAT: when it was raised (cleared for review later)
    double rate_window_start      # without DIR_LOWAT: the input rate is measured over windows
    uint64_t rate_window_bytes    # of LOWAT_RATE_WINDOW_S (see consider_lowat)
    char* buffer                  # copy-mode buffer, allocated the first time it is needed
    int pipe_read                 # -1 while no pipe is attached (idle directions hold none)
    int pipe_write
    uint32_t in_pipe              # bytes sitting in the pipe: resolves the EAGAIN ambiguity
    uint32_t buffer_offset
    uint32_t buffer_length
    uint32_t flags                # DIR_* bits


ctypedef struct Pair:
    Direction dirs[2]             # dirs[0] is a->b, dirs[1] is b->a
    uint64_t splice_calls         # relaxed atomics: read by pair_stats()
    uint64_t copy_calls
    double started                # CLOCK_MONOTONIC seconds
    double last_activity
    int fds[2]
    uint32_t gen                  # bumped when the slot is freed; 0 is never used
    uint32_t slot
    int32_t timer_prev            # timer list links (slot indices, -1 = none)
    int32_t timer_next            # doubles as the free-list link while the slot is free
    uint8_t state                 # STATE_*
    uint8_t ready                 # READY_* bits: edge-triggered readiness not yet consumed
    uint8_t flags                 # PAIR_* bits
    uint8_t timer_list            # TIMER_* list the pair is linked into


ctypedef struct Reply:
    # A synchronous command's answer, living on the calling Python thread's C stack.
    int done
    int err


ctypedef struct Command:
    int kind
    uint32_t slot
    uint32_t gen
    int fd_a                      # ADD: side a;  SWAP: the side (0 or 1)
    int fd_b                      # ADD: side b;  SWAP: the new fd
    uint32_t options
    Reply* reply                  # NULL for fire-and-forget commands


ctypedef struct CompletionRecord:
    uint64_t pair_id
    uint64_t bytes_a_to_b
    uint64_t bytes_b_to_a
    double duration_s
    int err
    int reason


ctypedef struct Shared:
    # State shared by all workers and the Python side.
    pthread_mutex_t completion_lock
    CompletionRecord* records
    size_t record_count
    size_t record_capacity
    CompletionRecord* spare_records
    size_t spare_capacity
    uint64_t records_dropped
    int completion_fd             # eventfd: readable while records are waiting
    pthread_mutex_t sync_lock     # guards Reply.done for park / swap / resume
    pthread_cond_t sync_cond


ctypedef struct Counters:
    # Written only by the owning worker (relaxed atomics), read by worker_stats().
    uint64_t bytes_a_to_b
    uint64_t bytes_b_to_a
    uint64_t splice_calls
    uint64_t copy_calls
    uint64_t fallbacks            # directions switched to recv/send for good
    uint64_t no_pipe              # reads that used the copy buffer because no pipe was available
    uint64_t pipes_created
    uint64_t pipes_discarded      # closed while still holding bytes (never recycled)
    uint64_t pipe_failures        # pipe2() failures (EMFILE, ENFILE, ...)
    uint64_t pipe_resize_failures
    uint64_t pipes_open           # created and not yet closed (pooled or attached)
    uint64_t pipes_pooled
    uint64_t completions
    uint64_t wakeups              # epoll_wait returns
    uint64_t lowat_sets           # SO_RCVLOWAT raised on a streaming source


ctypedef struct Worker:
    # ---- shared with Python threads; guarded by `lock` ----
    pthread_mutex_t lock
    Command* commands
    size_t command_count
    size_t command_capacity
    int stopping
    Pair** chunks                 # MAX_CHUNKS pointers; chunk i allocated on first use
    uint32_t chunk_count
    uint32_t next_unused          # first slot never handed out
    int32_t free_head
    uint32_t live_pairs           # reserved and not yet completed (relaxed reads outside lock)
    # ---- immutable after construction ----
    int index
    int epoll_fd
    int wake_fd
    uint32_t pipe_size
    uint32_t read_ahead_bytes     # stop splice-in at this many bytes in the pipe while blocked
    uint32_t max_rounds           # (splice-in, splice-out) rounds per direction per dispatch
    uint32_t tuning               # TUNE_* bits (benchmark experiments; 0 by default)
    uint32_t lowat_bytes          # SO_RCVLOWAT for streaming sources; 0 = never set
    double lowat_hold_s           # longest a raised mark may wait for input (the delay bound)
    uint32_t pool_max
    uint32_t max_pipes            # 0 = unlimited
    double idle_timeout_s         # 0 = disabled
    double half_close_timeout_s   # 0 = disabled
    Shared* shared
    # ---- private to the worker thread ----
    Command* work_commands
    size_t work_capacity
    epoll_event* events
    uint64_t* ready               # (gen << 32 | slot) of pairs that used up their budget
    size_t ready_count
    size_t ready_capacity
    uint64_t* ready_spare
    size_t ready_spare_capacity
    int32_t timer_head[3]
    int32_t timer_tail[3]
    int* pool                     # pooled empty pipes: [read, write, read, write, ...]
    uint32_t pool_length
    double pipe_retry_at          # no pipe2() before this time after a failure
    uint64_t* lowat               # (gen << 32 | slot << 1 | direction) with SO_RCVLOWAT set
    size_t lowat_count
    size_t lowat_capacity
    double lowat_check_at         # next look at the lowat list (valid while lowat_count > 0)
    double now                    # CLOCK_MONOTONIC, refreshed once per loop iteration
    char padding[64]              # keep the counters off the cache lines above
    Counters counters


cdef class Relay:
    cdef Worker** _workers
    cdef int _worker_count
    cdef Shared* _shared
    cdef object _threads
    cdef bint _initialized
    cdef bint _stopped
    cdef uint32_t _pipe_size
    cdef uint32_t _read_ahead_bytes
    cdef uint32_t _max_rounds
    cdef uint32_t _lowat_bytes
    cdef double _idle_timeout_s
    cdef double _half_close_timeout_s

    cdef Worker* _worker_for(self, uint64_t pair_id) except NULL
    cdef int _call(self, uint64_t pair_id, Command* command) except -1
    cdef bint _post(self, object pair_id, int kind) except -1
