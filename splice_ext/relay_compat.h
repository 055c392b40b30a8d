/* Small C helpers for splice_ext/_relay.pyx that Cython cannot express directly.
 *
 * Counters are written by exactly one worker thread and read at any time by Python threads
 * (worker_stats(), pair_stats()). Relaxed atomics make that well-defined C without adding any
 * fence to the data path: on x86-64 and arm64 they compile to plain loads and stores.
 */
#ifndef SPLICE_EXT_RELAY_COMPAT_H
#define SPLICE_EXT_RELAY_COMPAT_H

#include <stdint.h>
#include <time.h>

static inline void relay_counter_add(uint64_t *counter, uint64_t amount)
{
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + amount,
                     __ATOMIC_RELAXED);
}

static inline uint64_t relay_counter_get(uint64_t *counter)
{
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

static inline void relay_u32_set(uint32_t *value, uint32_t new_value)
{
    __atomic_store_n(value, new_value, __ATOMIC_RELAXED);
}

static inline uint32_t relay_u32_get(uint32_t *value)
{
    return __atomic_load_n(value, __ATOMIC_RELAXED);
}

/* CLOCK_MONOTONIC in seconds: the same clock as Python's time.monotonic(), read through the vDSO
 * (no system call), once per event-loop iteration. */
static inline double relay_monotonic_s(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

#endif /* SPLICE_EXT_RELAY_COMPAT_H */
