/*
 * copy.h - large memory copies split across threads.
 *
 * One thread's memcpy tops out well below what the memory system can move
 * (about half on a two-core machine, less on a many-core node), so a copy of
 * many megabytes into the object store is cut into contiguous pieces, one
 * per thread, each piece starting on a page boundary of the destination (so
 * no two threads write one cache line or fault one page). Threads are made
 * per call and joined before it returns: nothing outlives a call, so the
 * library stays fork-safe (workers are forked).
 */
#ifndef HPCRAY_COPY_H
#define HPCRAY_COPY_H

#include <stddef.h>
#include <stdint.h>

#define COPY_MIN_PARALLEL (8u << 20) /* smaller copies stay on the caller's thread */
#define COPY_MIN_PIECE (4u << 20)    /* no thread gets less than this */
#define COPY_MAX_THREADS 64u
#define COPY_DEFAULT_MAX 8u /* the default stops here: memory bandwidth does too */

/* Called on each thread's piece of the destination just before it is
 * written, from the thread that writes it. */
typedef void (*copy_prepare_fn)(void *ctx, uint8_t *dst, size_t n);

/* Copies n bytes from src to dst (which must not overlap) with up to
 * `threads` threads (the caller's included) when n >= COPY_MIN_PARALLEL,
 * else with one. `prepare` may be NULL. A thread that cannot be started
 * leaves its piece to the caller: the copy always completes. */
void copy_parallel(uint8_t *dst, const uint8_t *src, size_t n, unsigned threads,
                   copy_prepare_fn prepare, void *ctx);

/* The default thread count: the CPUs this process may run on, at most
 * COPY_DEFAULT_MAX, at least 1. */
unsigned copy_default_threads(void);

#endif
