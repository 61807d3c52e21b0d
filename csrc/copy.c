/*
 * copy.c - large memory copies split across threads. See copy.h.
 */
#include "copy.h"

#include <pthread.h>
#include <sched.h>
#include <string.h>

#define COPY_PIECE_ALIGN 4096u

typedef struct copy_piece {
    uint8_t *dst;
    const uint8_t *src;
    size_t n;
    copy_prepare_fn prepare;
    void *ctx;
} copy_piece;

/* One memcpy for the whole piece, never a loop of smaller ones: glibc
 * switches to non-temporal stores (no read of the destination lines, no
 * cache pollution) only above a size threshold, and below it the same copy
 * runs at half the speed or less. */
static void *copy_piece_run(void *arg)
{
    const copy_piece *p = arg;
    if (p->prepare != NULL)
        p->prepare(p->ctx, p->dst, p->n);
    memcpy(p->dst, p->src, p->n);
    return NULL;
}

void copy_parallel(uint8_t *dst, const uint8_t *src, size_t n, unsigned threads,
                   copy_prepare_fn prepare, void *ctx)
{
    if (threads > COPY_MAX_THREADS)
        threads = COPY_MAX_THREADS;
    if (n < COPY_MIN_PARALLEL)
        threads = 1;
    else if (threads > n / COPY_MIN_PIECE)
        threads = (unsigned)(n / COPY_MIN_PIECE);
    if (threads < 2) {
        copy_piece whole = {dst, src, n, prepare, ctx};
        copy_piece_run(&whole);
        return;
    }

    copy_piece pieces[COPY_MAX_THREADS];
    pthread_t tids[COPY_MAX_THREADS];
    int started[COPY_MAX_THREADS];
    uintptr_t start = (uintptr_t)dst, end = start + n, page = COPY_PIECE_ALIGN - 1;
    for (unsigned k = 0; k < threads; k++) {
        /* Boundaries at even shares, moved down to a page of dst. */
        uintptr_t lo = k == 0 ? start : (start + n / threads * k) & ~page;
        uintptr_t hi = k + 1 == threads ? end : (start + n / threads * (k + 1)) & ~page;
        pieces[k].dst = (uint8_t *)lo;
        pieces[k].src = src + (lo - start);
        pieces[k].n = hi - lo;
        pieces[k].prepare = prepare;
        pieces[k].ctx = ctx;
    }
    /* Piece 0 is the caller's; the others go to new threads. */
    for (unsigned k = 1; k < threads; k++)
        started[k] = pthread_create(&tids[k], NULL, copy_piece_run, &pieces[k]) == 0;
    copy_piece_run(&pieces[0]);
    for (unsigned k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            copy_piece_run(&pieces[k]);
    }
}

unsigned copy_default_threads(void)
{
    cpu_set_t cpus;
    unsigned n = 1;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) > 0)
        n = (unsigned)CPU_COUNT(&cpus);
    return n < COPY_DEFAULT_MAX ? n : COPY_DEFAULT_MAX;
}
