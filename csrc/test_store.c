/*
 * test_store.c - C tests of the allocator and the store. Build and run:
 *   cc -Wall -Wextra -Werror -std=c11 -D_GNU_SOURCE -Icsrc csrc/test_store.c \
 *      csrc/store.c csrc/allocator.c csrc/copy.c -lrt -lpthread -o test_store && ./test_store
 * Exits 0 when every check passes; prints the first failed check otherwise.
 */
#include "allocator.h"
#include "copy.h"
#include "store.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static char segment_name[64];
static pid_t main_pid;

/* A failed check exits: leave no segment behind (forked children share the
 * name but must not remove it under their parent). */
static void cleanup(void)
{
    if (getpid() == main_pid)
        store_unlink(segment_name);
}

static void make_id(uint8_t *id, unsigned n)
{
    memset(id, 0, STORE_ID_SIZE);
    memcpy(id, &n, sizeof n);
    id[STORE_ID_SIZE - 1] = 0xa5;
}

static void test_allocator(void)
{
    enum { AREA = 64 * 1024, OFF = 4096 };
    uint8_t *base = aligned_alloc(4096, OFF + AREA);
    CHECK(base != NULL);
    alloc_state a;
    alloc_init(&a, base, OFF, AREA);
    CHECK(alloc_check(&a, base) == 0);
    CHECK(alloc_block_size(0) == 64 && alloc_block_size(1) == 64 && alloc_block_size(65) == 128);

    uint64_t off[8];
    uint64_t sizes[8] = {1, 100, 64, 1000, 0, 4096, 63, 5000};
    for (int i = 0; i < 8; i++) {
        CHECK(alloc_allocate(&a, base, sizes[i], &off[i]) == 0);
        CHECK(off[i] % 64 == 0 && (uintptr_t)(base + off[i]) % 64 == 0);
        CHECK(off[i] >= OFF && off[i] + alloc_block_size(sizes[i]) <= OFF + AREA);
        memset(base + off[i], 0xee, sizes[i]); /* must not clobber anything */
        CHECK(alloc_check(&a, base) == 0);
    }
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < i; j++) /* disjoint */
            CHECK(off[i] + alloc_block_size(sizes[i]) <= off[j] ||
                  off[j] + alloc_block_size(sizes[j]) <= off[i]);

    /* Free out of order; the holes coalesce back into one block. */
    int order[8] = {3, 1, 5, 7, 0, 2, 6, 4};
    for (int k = 0; k < 8; k++) {
        alloc_free(&a, base, off[order[k]], sizes[order[k]]);
        CHECK(alloc_check(&a, base) == 0);
    }
    CHECK(alloc_footprint(&a) == 0);
    CHECK(alloc_largest_free(&a, base) == AREA);

    /* First fit reuses the lowest hole that fits. */
    uint64_t x, y, z, w;
    CHECK(alloc_allocate(&a, base, 128, &x) == 0 && x == OFF);
    CHECK(alloc_allocate(&a, base, 128, &y) == 0 && y == OFF + 128);
    CHECK(alloc_allocate(&a, base, 128, &z) == 0 && z == OFF + 256);
    alloc_free(&a, base, x, 128);
    CHECK(alloc_allocate(&a, base, 256, &w) == 0 && w == OFF + 384);
    CHECK(alloc_allocate(&a, base, 64, &w) == 0 && w == OFF);
    CHECK(alloc_allocate(&a, base, AREA, &w) == -1); /* too big: unchanged */
    CHECK(alloc_check(&a, base) == 0);

    /* Rebuild from a set of live extents gives their exact complement. */
    alloc_extent live[2] = {{OFF + 256, 128}, {OFF, 64}};
    CHECK(alloc_rebuild(&a, base, live, 2) == 0);
    CHECK(alloc_check(&a, base) == 0 && alloc_footprint(&a) == 192);
    CHECK(alloc_allocate(&a, base, 192, &w) == 0 && w == OFF + 64);
    CHECK(alloc_allocate(&a, base, 128, &w) == 0 && w == OFF + 384);
    free(base);
}

static store *fresh_store(uint64_t capacity, uint64_t table_capacity)
{
    store *s = NULL;
    store_unlink(segment_name);
    CHECK(store_create(segment_name, capacity, table_capacity, &s) == STORE_OK);
    return s;
}

static void put(store *s, unsigned n, uint64_t size)
{
    uint8_t id[STORE_ID_SIZE];
    uint64_t off;
    make_id(id, n);
    CHECK(store_create_object(s, id, size, &off) == STORE_OK);
    memset(store_ptr(s, off), (int)(n & 0xff), size);
    CHECK(store_seal(s, id) == STORE_OK);
}

static int has(store *s, unsigned n)
{
    uint8_t id[STORE_ID_SIZE];
    int found = -1;
    make_id(id, n);
    CHECK(store_contains(s, id, &found) == STORE_OK);
    return found;
}

static void test_table(void)
{
    store *s = fresh_store(1 << 20, 0);
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size, off2;
    store_stats st;

    make_id(id, 1);
    CHECK(store_create_object(s, id, 1000, &off) == STORE_OK);
    CHECK((uintptr_t)store_ptr(s, off) % 64 == 0);
    CHECK(store_create_object(s, id, 10, &off2) == STORE_EXISTS);
    CHECK(store_get(s, id, &off2, &size) == STORE_NOT_SEALED);
    CHECK(!has(s, 1));
    memset(store_ptr(s, off), 7, 1000);
    CHECK(store_seal(s, id) == STORE_OK);
    CHECK(store_seal(s, id) == STORE_BAD_STATE);
    CHECK(store_abort(s, id) == STORE_BAD_STATE);
    CHECK(has(s, 1));
    CHECK(store_get(s, id, &off2, &size) == STORE_OK && off2 == off && size == 1000);
    CHECK(store_ptr(s, off2)[999] == 7);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 1 && st.num_pinned == 1);

    /* Delete while pinned: pending, invisible, freed on the last release. */
    CHECK(store_delete(s, id) == STORE_OK);
    CHECK(!has(s, 1));
    CHECK(store_get(s, id, &off2, &size) == STORE_NOT_FOUND);
    CHECK(store_delete(s, id) == STORE_NOT_FOUND);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 1 && st.used_bytes == 1024);
    CHECK(store_release(s, id, off) == STORE_OK);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 0 && st.used_bytes == 0);
    CHECK(store_release(s, id, off) == STORE_NOT_FOUND);

    /* Abort frees a CREATED object. */
    CHECK(store_create_object(s, id, 0, &off) == STORE_OK);
    CHECK(store_abort(s, id) == STORE_OK);
    CHECK(store_abort(s, id) == STORE_NOT_FOUND);

    /* Many ids, colliding probe paths, removals in between. */
    for (unsigned i = 0; i < 700; i++)
        put(s, 1000 + i, 16);
    for (unsigned i = 0; i < 700; i += 3) {
        make_id(id, 1000 + i);
        CHECK(store_delete(s, id) == STORE_OK);
    }
    for (unsigned i = 0; i < 700; i++)
        CHECK(has(s, 1000 + i) == (i % 3 != 0));
    CHECK(store_debug_check(s) == 0);
    for (unsigned i = 0; i < 700; i++) {
        make_id(id, 1000 + i);
        CHECK(store_delete(s, id) == (i % 3 ? STORE_OK : STORE_NOT_FOUND));
    }
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 0 && st.used_bytes == 0);
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

static void test_eviction(void)
{
    store *s = fresh_store(64 * 1024, 0); /* 16 objects of 4 KiB */
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size;
    store_stats st;
    for (unsigned i = 0; i < 16; i++)
        put(s, i, 4096);
    /* Touch 0 and 1: now 2 is the least recently used. */
    for (unsigned i = 0; i < 2; i++) {
        make_id(id, i);
        CHECK(store_get(s, id, &off, &size) == STORE_OK);
        CHECK(store_release(s, id, off) == STORE_OK);
    }
    /* Pin 3: it must survive. */
    make_id(id, 3);
    uint64_t pinned_off;
    CHECK(store_get(s, id, &pinned_off, &size) == STORE_OK);

    put(s, 100, 4096);
    CHECK(!has(s, 2) && has(s, 0) && has(s, 1) && has(s, 3) && has(s, 4));
    put(s, 101, 8192); /* evicts 4 and 5 (3 is pinned) */
    CHECK(!has(s, 4) && !has(s, 5) && has(s, 3) && has(s, 6));
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_evictions == 3);

    /* Too large: never fits. Full: everything else pinned or CREATED. */
    make_id(id, 200);
    CHECK(store_create_object(s, id, 64 * 1024 + 1, &off) == STORE_TOO_LARGE);
    CHECK(store_create_object(s, id, UINT64_MAX, &off) == STORE_TOO_LARGE);
    uint64_t offs[32];
    unsigned pinned[32], npinned = 0;
    for (unsigned i = 0; i < 200; i++) {
        make_id(id, i);
        if (store_get(s, id, &offs[npinned], &size) == STORE_OK)
            pinned[npinned++] = i;
    }
    make_id(id, 301);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.used_bytes == 64 * 1024);
    uint64_t evictions = st.num_evictions;
    CHECK(store_create_object(s, id, 1, &off) == STORE_FULL);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_evictions == evictions);
    /* Unpin everything: the same request now evicts and fits. */
    for (unsigned k = 0; k < npinned; k++) {
        make_id(id, pinned[k]);
        CHECK(store_release(s, id, offs[k]) == STORE_OK);
    }
    make_id(id, 3);
    CHECK(store_release(s, id, pinned_off) == STORE_OK);
    make_id(id, 301);
    CHECK(store_create_object(s, id, 1, &off) == STORE_OK);
    /* A CREATED object is never evicted, even by a request that then fails. */
    make_id(id, 302);
    CHECK(store_create_object(s, id, 64 * 1024 - 64, &off) != STORE_TOO_LARGE);
    CHECK(store_abort(s, id) == STORE_OK || store_abort(s, id) == STORE_NOT_FOUND);
    make_id(id, 301);
    CHECK(store_get(s, id, &off, &size) == STORE_NOT_SEALED);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 1 && st.used_bytes == 64);
    CHECK(store_seal(s, id) == STORE_OK);
    make_id(id, 302);
    CHECK(store_create_object(s, id, 64 * 1024, &off) == STORE_OK); /* evicts 301 */
    CHECK(!has(s, 301));
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

static void test_dead_lock_holder(void)
{
    store *s = fresh_store(1 << 20, 0);
    put(s, 1, 100);
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store *child = NULL;
        close(fds[0]);
        if (store_attach(segment_name, &child) != STORE_OK)
            _exit(2);
        store_debug_lock_forever(child, fds[1]);
        _exit(3);
    }
    close(fds[1]);
    char byte;
    CHECK(read(fds[0], &byte, 1) == 1); /* the child holds the lock now */
    close(fds[0]);
    kill(pid, SIGKILL);
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFSIGNALED(status));
    CHECK(has(s, 1));
    put(s, 2, 100);
    store_stats st;
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_recoveries == 1 && st.num_objects == 2);
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

static uint64_t pinned_count(store *s)
{
    store_stats st;
    CHECK(store_get_stats(s, &st) == STORE_OK);
    return st.num_pinned;
}

/* A forked reader pins objects (two pins on one, one on another), tells the
 * parent, and waits to be killed. Returns its pid. */
static pid_t spawn_reader(unsigned a, unsigned b)
{
    int fds[2];
    CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        store *child = NULL;
        uint8_t id[STORE_ID_SIZE];
        uint64_t off, size;
        close(fds[0]);
        if (store_attach(segment_name, &child) != STORE_OK)
            _exit(2);
        make_id(id, a);
        for (int k = 0; k < 2; k++)
            if (store_get(child, id, &off, &size) != STORE_OK)
                _exit(3);
        make_id(id, b);
        if (store_get(child, id, &off, &size) != STORE_OK || write(fds[1], "P", 1) != 1)
            _exit(4);
        for (;;)
            pause();
    }
    close(fds[1]);
    char byte;
    CHECK(read(fds[0], &byte, 1) == 1);
    close(fds[0]);
    return pid;
}

static void kill_and_reap(pid_t pid)
{
    int status;
    kill(pid, SIGKILL);
    CHECK(waitpid(pid, &status, 0) == pid && WIFSIGNALED(status));
}

/* Pins are per process: a reader killed while it holds some leaves objects
 * that stay pinned until its pins are released for it, then they are
 * evictable (or freed, when deleted meanwhile); no other pin is touched. */
static void test_dead_readers(void)
{
    store *s = fresh_store(64 * 1024, 0); /* 16 objects of 4 KiB */
    uint8_t id[STORE_ID_SIZE];
    uint64_t size, n, mine;
    store_stats st;
    for (unsigned i = 0; i < 16; i++)
        put(s, i, 4096);
    make_id(id, 2);
    CHECK(store_get(s, id, &mine, &size) == STORE_OK); /* this process's own pin */

    pid_t reader = spawn_reader(1, 2);
    kill_and_reap(reader);
    CHECK(pinned_count(s) == 2);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_pin_records == 3);
    make_id(id, 1);
    CHECK(store_delete(s, id) == STORE_OK); /* delete-pending: the dead hold it */
    CHECK(store_release(s, id, 0) == STORE_NOT_FOUND);
    CHECK(store_release_dead_pins(s, &n) == STORE_OK && n == 3);
    CHECK(store_release_dead_pins(s, &n) == STORE_OK && n == 0);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_objects == 15 && st.num_pinned == 1 &&
          st.num_pin_records == 1);
    CHECK(store_debug_check(s) == 0);

    /* The same by pid, as a node manager that reaped its worker does. */
    reader = spawn_reader(3, 4);
    CHECK(store_release_pins_of(s, (int32_t)reader + 1000000, &n) == STORE_OK && n == 0);
    kill_and_reap(reader);
    CHECK(pinned_count(s) == 3);
    CHECK(store_release_pins_of(s, (int32_t)reader, &n) == STORE_OK && n == 3);
    CHECK(pinned_count(s) == 1);
    CHECK(store_debug_check(s) == 0);

    /* Everything but this process's object 2 is evictable again. */
    for (unsigned i = 100; i < 115; i++)
        put(s, i, 4096);
    CHECK(has(s, 2) && !has(s, 3) && !has(s, 4));

    /* A forked child holds none of its parent's pins: it cannot drop them. */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        make_id(id, 2);
        _exit(store_release(s, id, mine) == STORE_BAD_STATE ? 0 : 1);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    make_id(id, 2);
    CHECK(store_release(s, id, mine) == STORE_OK);
    CHECK(store_release(s, id, mine) == STORE_BAD_STATE);
    CHECK(pinned_count(s) == 0);
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

/* The pin table is bounded: a get that needs one record too many fails and
 * pins nothing; existing records still count up. */
static void test_pin_table_full(void)
{
    store *s = fresh_store(1 << 20, 1024); /* 896 objects, 896 pin records */
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size;
    store_stats st;
    for (unsigned i = 0; i < 896; i++) {
        put(s, i, 0);
        make_id(id, i);
        CHECK(store_get(s, id, &off, &size) == STORE_OK);
    }
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_pin_records == 896 &&
          st.pin_table_capacity == 1024);
    make_id(id, 7);
    CHECK(store_get(s, id, &off, &size) == STORE_OK); /* same record, count 2 */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) /* a new (process, object) pair: no room */
        _exit(store_get(s, id, &off, &size) == STORE_TOO_MANY_PINS ? 0 : 1);
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_pin_records == 896);
    CHECK(store_debug_check(s) == 0);
    for (unsigned i = 0; i < 896; i++) {
        make_id(id, i);
        CHECK(store_get(s, id, &off, &size) == STORE_OK);
        for (int k = 0; k < 2 + (i == 7); k++)
            CHECK(store_release(s, id, off) == STORE_OK);
        CHECK(store_delete(s, id) == STORE_OK);
    }
    CHECK(store_get_stats(s, &st) == STORE_OK && st.num_pin_records == 0 && st.num_objects == 0);
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

/* A pid no process has (above any pid_max): to the clean-up, a dead one. */
#define GHOST_PID(k) ((int32_t)((1 << 30) + (k)))

static store_stats stats_of(store *s)
{
    store_stats st;
    CHECK(store_get_stats(s, &st) == STORE_OK);
    return st;
}

static void get_as(store *s, int32_t pid, unsigned n)
{
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size;
    make_id(id, n);
    store_debug_set_pid(pid);
    CHECK(store_get(s, id, &off, &size) == STORE_OK);
    store_debug_set_pid(0);
}

/* The per-process counts follow creates, seals, aborts, pins and releases,
 * so the clean-up after a process that held nothing walks nothing, and after
 * one that held something still finds all of it. */
static void test_holders(void)
{
    store *s = fresh_store(1 << 20, 0);
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size, n;
    store_stats st = stats_of(s);
    CHECK(st.num_created == 0 && st.num_holders == 0 && st.holders_overflow == 0);

    make_id(id, 1);
    CHECK(store_create_object(s, id, 100, &off) == STORE_OK);
    st = stats_of(s);
    CHECK(st.num_created == 1 && st.num_holders == 1);
    CHECK(store_abort_dead_creators(s, &n) == STORE_OK && n == 0); /* its creator lives */
    CHECK(store_seal(s, id) == STORE_OK);
    st = stats_of(s);
    CHECK(st.num_created == 0 && st.num_holders == 0);
    CHECK(store_get(s, id, &off, &size) == STORE_OK);
    CHECK(store_get(s, id, &off, &size) == STORE_OK);
    CHECK(stats_of(s).num_holders == 1);
    CHECK(store_debug_check(s) == 0);
    CHECK(store_release(s, id, off) == STORE_OK && stats_of(s).num_holders == 1);
    CHECK(store_release(s, id, off) == STORE_OK && stats_of(s).num_holders == 0);

    /* A dead process with an unsealed object and pins on 200 objects, among
     * the pins of two others. */
    for (unsigned i = 2; i < 202; i++)
        put(s, i, 64);
    make_id(id, 5000);
    store_debug_set_pid(GHOST_PID(1));
    CHECK(store_create_object(s, id, 64, &off) == STORE_OK);
    store_debug_set_pid(0);
    for (unsigned i = 2; i < 202; i++) {
        get_as(s, GHOST_PID(1), i);
        if (i % 3 == 0)
            get_as(s, GHOST_PID(2), i);
    }
    get_as(s, GHOST_PID(1), 7); /* a second pin, same record */
    get_as(s, (int32_t)getpid(), 9);
    st = stats_of(s);
    CHECK(st.num_holders == 3 && st.num_created == 1 && st.num_pin_records == 200 + 67 + 1);
    CHECK(store_debug_check(s) == 0);
    CHECK(store_release_pins_of(s, GHOST_PID(3), &n) == STORE_OK && n == 0);
    CHECK(store_release_pins_of(s, GHOST_PID(1), &n) == STORE_OK && n == 201);
    st = stats_of(s);
    CHECK(st.num_holders == 3 && st.num_pin_records == 68); /* ghost 1 still creates */
    CHECK(store_abort_dead_creators(s, &n) == STORE_OK && n == 1);
    st = stats_of(s);
    CHECK(st.num_holders == 2 && st.num_created == 0 && !has(s, 5000));
    CHECK(store_release_dead_pins(s, &n) == STORE_OK && n == 67);
    CHECK(store_release_dead_pins(s, &n) == STORE_OK && n == 0);
    st = stats_of(s);
    CHECK(st.num_holders == 1 && st.num_pin_records == 1);
    CHECK(store_debug_check(s) == 0);
    make_id(id, 9);
    CHECK(store_get(s, id, &off, &size) == STORE_OK); /* the record this process has */
    CHECK(store_release_pins_of(s, (int32_t)getpid(), &n) == STORE_OK && n == 2);
    CHECK(stats_of(s).num_holders == 0 && store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

/* More processes holding pins than the counts track: the clean-up walks the
 * tables as before, misses nothing, and the counts come back once a walk
 * finds them all fitting again. */
static void test_holders_overflow(void)
{
    store *s = fresh_store(1 << 20, 8192); /* room for 7168 pin records */
    uint64_t n;
    put(s, 1, 64);
    put(s, 2, 64);
    enum { GHOSTS = 3700 };
    for (int k = 0; k < GHOSTS; k++)
        get_as(s, GHOST_PID(k), 1);
    store_stats st = stats_of(s);
    CHECK(st.holders_overflow == 1 && st.num_holders < GHOSTS && st.num_pin_records == GHOSTS);
    CHECK(store_debug_check(s) == 0);
    int32_t last = GHOST_PID(GHOSTS - 1); /* the last ones found no room */
    CHECK(store_release_pins_of(s, last, &n) == STORE_OK && n == 1);
    CHECK(stats_of(s).holders_overflow == 1); /* the walk recounted: still too many */
    for (int k = 0; k < 200; k++)
        CHECK(store_release_pins_of(s, GHOST_PID(k), &n) == STORE_OK && n == 1);
    st = stats_of(s);
    CHECK(st.holders_overflow == 0 && st.num_holders == GHOSTS - 201);
    CHECK(store_debug_check(s) == 0);
    get_as(s, GHOST_PID(GHOSTS - 2), 2);
    CHECK(store_release_pins_of(s, GHOST_PID(GHOSTS - 2), &n) == STORE_OK && n == 2);
    CHECK(store_release_dead_pins(s, &n) == STORE_OK && n == GHOSTS - 202);
    st = stats_of(s);
    CHECK(st.num_holders == 0 && st.num_pin_records == 0 && st.num_pinned == 0);
    CHECK(store_debug_check(s) == 0);
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
}

/* Large copies split across threads land byte for byte, whatever the
 * alignment of either side and the thread count; store_write too. */
static void test_parallel_copy(void)
{
    size_t n = (9u << 20) + 123;
    uint8_t *src = malloc(n + 64), *dst = malloc(n + 64);
    CHECK(src != NULL && dst != NULL);
    for (size_t i = 0; i < n + 64; i++)
        src[i] = (uint8_t)(i * 131u + (i >> 12));
    unsigned counts[] = {1, 2, 3, 8, 1000};
    for (unsigned k = 0; k < sizeof counts / sizeof *counts; k++) {
        for (size_t shift = 0; shift < 3; shift++) {
            memset(dst, 0, n + 64);
            copy_parallel(dst + shift, src + 2 * shift + 1, n, counts[k], NULL, NULL);
            CHECK(memcmp(dst + shift, src + 2 * shift + 1, n) == 0);
            CHECK(dst[n + shift] == 0 && (shift == 0 || dst[shift - 1] == 0));
        }
    }
    CHECK(copy_default_threads() >= 1 && copy_default_threads() <= COPY_DEFAULT_MAX);

    store *s = fresh_store(32u << 20, 0);
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, off2, size;
    store_set_copy_threads(s, 3);
    CHECK(store_copy_threads(s) == 3);
    make_id(id, 1);
    CHECK(store_create_object(s, id, n + 64, &off) == STORE_OK);
    store_write(s, off + 64, src + 5, n);
    store_write(s, off, src, 64);
    CHECK(store_seal(s, id) == STORE_OK);
    CHECK(store_get(s, id, &off2, &size) == STORE_OK && off2 == off);
    CHECK(memcmp(store_ptr(s, off), src, 64) == 0);
    CHECK(memcmp(store_ptr(s, off + 64), src + 5, n) == 0);
    CHECK(store_release(s, id, off) == STORE_OK);
    store_set_copy_threads(s, 0);
    CHECK(store_copy_threads(s) == copy_default_threads());
    store_close(s);
    CHECK(store_unlink(segment_name) == STORE_OK);
    free(src);
    free(dst);
}

/* Every byte derived from the object's number and position, so an object
 * overwritten by another (a double allocation) shows. */
static uint8_t pattern(unsigned n, uint64_t i)
{
    return (uint8_t)(n * 31u + i * 7u + (i >> 8));
}

static uint64_t size_of(unsigned n)
{
    return (n * 977u) % 3000u;
}

static unsigned number_of(const uint8_t *id)
{
    unsigned n;
    memcpy(&n, id, sizeof n);
    return n;
}

static void fill(store *s, uint64_t off, unsigned n)
{
    uint8_t *p = store_ptr(s, off);
    for (uint64_t i = 0; i < size_of(n); i++)
        p[i] = pattern(n, i);
}

/* Every sealed object holds its pattern. */
static void check_contents(store *s)
{
    static store_object_info infos[64];
    size_t count;
    CHECK(store_list(s, infos, 64, &count) == STORE_OK && count <= 64);
    for (size_t k = 0; k < count; k++) {
        if (infos[k].state != STORE_STATE_SEALED)
            continue;
        unsigned n = number_of(infos[k].id);
        const uint8_t *p = store_ptr(s, infos[k].offset);
        CHECK(infos[k].size == size_of(n));
        for (uint64_t i = 0; i < infos[k].size; i++)
            CHECK(p[i] == pattern(n, i));
    }
}

/* Every kind of mutation: colliding inserts, seals (also unclaimed), aborts,
 * pins and unpins, releases that free, immediate and pending deletes,
 * evictions. */
static void workload(store *s, unsigned first, unsigned count)
{
    uint8_t id[STORE_ID_SIZE];
    uint64_t off, size, held_off = 0;
    unsigned held = 0;
    for (unsigned n = first; n < first + count; n++) {
        make_id(id, n);
        CHECK(store_create_object(s, id, size_of(n), &off) == STORE_OK);
        fill(s, off, n);
        if (n % 7 == 3) {
            CHECK(store_abort(s, id) == STORE_OK);
            continue;
        }
        if (n % 11 == 5) { /* sealed for a taker, taken, spilled (freed by its sole pin) */
            int freed = 0;
            CHECK(store_seal_unclaimed(s, id) == STORE_OK);
            CHECK(store_get(s, id, &off, &size) == STORE_OK);
            CHECK(store_release_if_sole(s, id, off, &freed) == STORE_OK && freed == 1);
            continue;
        }
        CHECK(store_seal(s, id) == STORE_OK);
        if (n % 3 == 0) {
            CHECK(store_get(s, id, &off, &size) == STORE_OK);
            if (held) {
                make_id(id, held);
                CHECK(store_release(s, id, held_off) == STORE_OK);
            }
            held = n;
            held_off = off;
        }
        if (n % 5 == 0) {
            make_id(id, n);
            CHECK(store_delete(s, id) == STORE_OK);
        }
        if (n % 4 == 1) {
            make_id(id, n - 2);
            store_delete(s, id);
        }
    }
    if (held) {
        make_id(id, held);
        CHECK(store_release(s, id, held_off) == STORE_OK);
    }
}

/* A client dies at every crash point of a workload in turn; each time the
 * next locker repairs the store, nothing live is lost or overlapped, and the
 * store keeps working. */
static void test_crash_points(void)
{
    int finished = 0;
    int64_t k;
    for (k = 1; !finished; k++) {
        store *s = fresh_store(96 * 1024, 64); /* small: probes collide */
        uint8_t id[STORE_ID_SIZE];
        uint64_t off, size;
        for (unsigned n = 50000; n < 50004; n++) {
            make_id(id, n);
            CHECK(store_create_object(s, id, size_of(n), &off) == STORE_OK);
            fill(s, off, n);
            CHECK(store_seal(s, id) == STORE_OK);
            CHECK(store_get(s, id, &off, &size) == STORE_OK); /* pinned for good */
        }
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            store *child = NULL;
            if (store_attach(segment_name, &child) != STORE_OK)
                _exit(2);
            store_debug_crash_after(child, k);
            workload(child, 1, 150);
            _exit(0);
        }
        int status;
        CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status));
        CHECK(WEXITSTATUS(status) == 77 || WEXITSTATUS(status) == 0);
        finished = WEXITSTATUS(status) == 0;
        CHECK(store_debug_check(s) == 0);
        store_stats st;
        CHECK(store_get_stats(s, &st) == STORE_OK && st.num_recoveries == (finished ? 0 : 1));
        check_contents(s);
        /* Whatever the dead client held or half-made goes; this process's
         * four pins stay. */
        CHECK(store_abort_dead_creators(s, NULL) == STORE_OK);
        CHECK(store_release_dead_pins(s, NULL) == STORE_OK);
        CHECK(pinned_count(s) == 4);
        CHECK(store_debug_check(s) == 0);
        workload(s, 1000, 150);
        CHECK(store_debug_check(s) == 0);
        check_contents(s);
        for (unsigned n = 50000; n < 50004; n++)
            CHECK(has(s, n));
        store_close(s);
        CHECK(store_unlink(segment_name) == STORE_OK);
    }
    CHECK(k > 100);
    printf("test_store: survived a death at each of %ld crash points\n", (long)k - 2);
}

int main(void)
{
    main_pid = getpid();
    snprintf(segment_name, sizeof segment_name, "/hpcray-ctest-%d", (int)main_pid);
    atexit(cleanup);
    test_allocator();
    test_table();
    test_eviction();
    test_dead_lock_holder();
    test_dead_readers();
    test_pin_table_full();
    test_holders();
    test_holders_overflow();
    test_parallel_copy();
    test_crash_points();
    store_unlink(segment_name);
    printf("test_store: all checks passed\n");
    return 0;
}
