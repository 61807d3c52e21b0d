/*
 * store.h - the hpcray node object store: one POSIX shared-memory segment
 * holding a header (with a process-shared robust mutex), an object table
 * keyed by 20-byte ids, and a data area run by allocator.h.
 *
 * Every process maps the segment itself, at its own address; objects are
 * named by offsets from the segment base, turned into pointers with
 * store_ptr. All calls that take the lock are safe from many threads and
 * processes at once. A process killed while it holds the lock does not wedge
 * the store: the next locker repairs the table and the allocator.
 *
 * Object life: create (CREATED, pinned once by the creator) -> seal (SEALED,
 * creator pin dropped) -> get/release (pins) -> delete or eviction. Only
 * SEALED objects with no pins are evicted, least recently used first.
 *
 * Every pin a get takes is recorded with the pid of the process that took
 * it, in a bounded pin table in the segment, so that the pins of a process
 * that died (a worker SIGKILLed while it held zero-copy views) can be given
 * back: store_release_pins_of, store_release_dead_pins. The segment also
 * counts, per process, its pin records and the objects it created and has
 * not sealed, so that the clean-up after a process that held nothing (the
 * usual worker exit) costs no walk of the tables.
 */
#ifndef HPCRAY_STORE_H
#define HPCRAY_STORE_H

#include <stddef.h>
#include <stdint.h>

#define STORE_ID_SIZE 20

typedef enum store_status {
    STORE_OK = 0,
    STORE_EXISTS,       /* an object with this id is already in the table */
    STORE_NOT_FOUND,    /* no such object (or it is being deleted) */
    STORE_NOT_SEALED,   /* the object is still CREATED */
    STORE_BAD_STATE,    /* seal/abort of an object that is not CREATED */
    STORE_FULL,         /* no room even after evicting every evictable object */
    STORE_TOO_LARGE,    /* larger than the whole data area */
    STORE_INVALID,      /* bad argument */
    STORE_BAD_SEGMENT,  /* not an hpcray store segment, or another version */
    STORE_SYSTEM,       /* a system call failed; errno says why */
    STORE_TOO_MANY_PINS, /* the pin table is full: too many (process, object) pins */
    STORE_NO_SPACE      /* /dev/shm has no room for the object's pages; errno says why */
} store_status;

typedef enum store_state { STORE_STATE_CREATED = 1, STORE_STATE_SEALED = 2 } store_state;

typedef struct store store; /* one process's handle on a mapped segment */

typedef struct store_stats {
    uint64_t capacity;       /* bytes in the data area */
    uint64_t used_bytes;     /* bytes held by objects (whole 64-byte blocks) */
    uint64_t num_objects;    /* objects in the table, delete-pending ones included */
    uint64_t num_pinned;     /* objects with at least one pin */
    uint64_t num_evictions;  /* objects evicted since the segment was made */
    uint64_t table_capacity; /* slots in the object table */
    uint64_t num_recoveries; /* times a dead lock holder was cleaned up after */
    uint64_t num_pin_records;    /* (process, object) pairs holding pins */
    uint64_t pin_table_capacity; /* slots in the pin table */
    uint64_t num_created;        /* CREATED objects (made, not sealed yet) */
    uint64_t num_holders;        /* processes counted as holding pins or CREATED objects */
    uint64_t holders_overflow;   /* 1: more such processes than the count table takes */
    uint64_t cleanup_walks;      /* dead-process clean-ups that walked a table (this handle) */
} store_stats;

typedef struct store_object_info {
    uint8_t id[STORE_ID_SIZE];
    uint64_t offset;
    uint64_t size;
    uint32_t state; /* store_state */
    uint32_t pins;
    uint32_t delete_pending;
    int32_t creator_pid;
    uint64_t lru_tick; /* when it was last read (or made evictable): larger is newer */
} store_object_info;

/* One process's pins on one object, as store_list_pins reports them. */
typedef struct store_pin_info {
    uint8_t id[STORE_ID_SIZE];
    int32_t pid;
    uint32_t count;
} store_pin_info;

/* Creates segment `name` (O_EXCL, mode 0600) with a data area of at least
 * `capacity` bytes (rounded up to a page) and `table_capacity` slots (0: one
 * per 8 KiB of data, at least 1024; rounded up to a power of two; the table
 * holds up to 7/8 of that many objects), maps and initialises it. The pin
 * table gets as many slots (at least 1024), 32 bytes each, and holds up to
 * 7/8 of that many (process, object) pairs. Only the header is touched: the
 * other pages stay unallocated until used, so creation costs the same for
 * any size. On failure nothing named `name` is left behind. */
store_status store_create(const char *name, uint64_t capacity, uint64_t table_capacity,
                          store **out);

/* Maps an existing, initialised segment made by store_create. */
store_status store_attach(const char *name, store **out);

/* Unmaps and frees the handle. Pins this process holds stay in the segment
 * (recorded under its pid) until it releases them or they are released for
 * it after it died. */
void store_close(store *s);

/* shm_unlink(name); STORE_OK also when it does not exist. */
store_status store_unlink(const char *name);

/* Address of `offset` in this process's mapping. */
uint8_t *store_ptr(const store *s, uint64_t offset);

/* Bytes in the data area (fixed at creation; no lock taken). */
uint64_t store_capacity(const store *s);

/* Reserves `size` bytes (64-byte aligned, may be 0) as a CREATED object
 * pinned once, evicting LRU unpinned sealed objects if it must; stores the
 * data offset. Errors: EXISTS, TOO_LARGE (never fits), FULL (does not fit
 * now; nothing was evicted when even evicting everything would not do),
 * NO_SPACE (tmpfs could not allocate its pages: nothing is created). */
store_status store_create_object(store *s, const uint8_t *id, uint64_t size, uint64_t *offset);

/* CREATED -> SEALED, drops the creator's pin. Data written before this call
 * is visible to every later store_get. */
store_status store_seal(store *s, const uint8_t *id);

/* store_seal for an object made for another process to take (a worker's
 * value, which its node pins when told): it stays off the eviction list,
 * though unpinned, until its first store_get, so that nothing evicts it in
 * between. One that nobody ever gets stays until deleted. */
store_status store_seal_unclaimed(store *s, const uint8_t *id);

/* Frees a CREATED object (its creator gave up). BAD_STATE if sealed. */
store_status store_abort(store *s, const uint8_t *id);

/* Copies n bytes from src into the segment at `offset` (inside an object
 * this process created and has not sealed yet; no lock taken). Copies of
 * COPY_MIN_PARALLEL bytes or more run on the handle's copy threads, and the
 * pages they write that this process's mapping has not touched before are
 * populated first in 2 MiB runs (MADV_POPULATE_WRITE, where the kernel has
 * it), which costs a fraction of taking their page faults one by one. */
void store_write(store *s, uint64_t offset, const void *src, uint64_t n);

/* Populates the pages of [offset, offset + n) that this process's mapping has
 * not touched before, as store_write does before a copy: for a buffer that
 * something else will fill (an MPI receive). Does nothing under 2 MiB. */
void store_populate(store *s, uint64_t offset, uint64_t n);

/* Threads store_write uses for a large copy; 0 restores the default
 * (copy_default_threads: CPUs this process may run on, at most 8). */
void store_set_copy_threads(store *s, unsigned threads);
unsigned store_copy_threads(const store *s);

/* Pins a SEALED object for the calling process and marks it most recently
 * used; stores offset and size. NOT_FOUND if absent or delete-pending,
 * NOT_SEALED if CREATED, TOO_MANY_PINS if the pin table has no room for
 * another (process, object) pair (nothing pinned then). */
store_status store_get(store *s, const uint8_t *id, uint64_t *offset, uint64_t *size);

/* Drops one pin that the calling process took with store_get on the object
 * at `offset`; frees it when it was delete-pending and this was the last
 * pin. BAD_STATE when this process holds no pin on it (e.g. a forked child
 * releasing its parent's). */
store_status store_release(store *s, const uint8_t *id, uint64_t offset);

/* As store_release, but only when the caller's pin is the object's only
 * one (and it is not delete-pending): then the pin drops and the object is
 * freed at once, *freed = 1. Otherwise nothing changes, *freed = 0: someone
 * else reads it. What spilling an object to disk ends with. */
store_status store_release_if_sole(store *s, const uint8_t *id, uint64_t offset, int *freed);

/* *found = 1 if a SEALED, not delete-pending object has this id, else 0. */
store_status store_contains(store *s, const uint8_t *id, int *found);

/* Frees the object now if it has no pins, else marks it delete-pending (it
 * disappears from get/contains and is freed when the last pin drops; its id
 * stays taken until then). NOT_FOUND if absent or already pending. */
store_status store_delete(store *s, const uint8_t *id);

/* Frees every CREATED object whose creating process no longer exists (it
 * died between create and seal); *count gets how many. Sound only when all
 * clients share this process's PID namespace. A reused PID hides a dead
 * creator (its object stays), it never frees a live one. Walks the object
 * table only when some process holding CREATED objects is dead (or more
 * processes hold some than the counts track); else it costs one kill(pid, 0)
 * per such process. */
store_status store_abort_dead_creators(store *s, uint64_t *count);

/* Drops every pin that process `pid` holds (it died; the caller knows, e.g.
 * from waitpid); objects left unpinned become evictable, or are freed when
 * delete-pending. *count gets how many pins were dropped. Returns at once
 * when `pid` holds no pin; else walks the pin table up to its last record. */
store_status store_release_pins_of(store *s, int32_t pid, uint64_t *count);

/* store_release_pins_of for every process holding pins that no longer
 * exists. The same PID-namespace caveat as store_abort_dead_creators: a
 * reused PID (or an unreaped zombie) hides a dead reader, it never releases
 * a live one's pins. Walks the pin table only when some holder is dead, as
 * store_abort_dead_creators does. */
store_status store_release_dead_pins(store *s, uint64_t *count);

/* Copies up to `max` pin records into `out`; *count gets how many exist. */
store_status store_list_pins(store *s, store_pin_info *out, size_t max, size_t *count);

/* Copies up to `max` entries of the SEALED, not delete-pending objects with
 * exactly one pin into `out`, least recently read first (sorted only when
 * all fit); *count gets how many exist. What spilling chooses from. */
store_status store_list_sole_pinned(store *s, store_object_info *out, size_t max,
                                    size_t *count);

/* Counters, read under the lock. */
store_status store_get_stats(store *s, store_stats *out);

/* Copies up to `max` table entries into `out`; *count gets how many exist. */
store_status store_list(store *s, store_object_info *out, size_t max, size_t *count);

/* Test hook: takes the lock, writes one byte to notify_fd (if >= 0) and
 * sleeps forever holding it. Only returns on error. */
store_status store_debug_lock_forever(store *s, int notify_fd);

/* Test hook: checks table, LRU list and allocator invariants under the
 * lock (repairing first if a holder died). Returns 0 when sound. */
int store_debug_check(store *s);

/* Test hook: makes this process _exit(77), holding the lock, at the
 * steps-th crash point from now (the points between the writes of a table,
 * LRU or allocator mutation). 0 disarms it. */
void store_debug_crash_after(store *s, int64_t steps);

/* Test hook: this process creates and pins under `pid` from now on, as if it
 * were that process (a pid no process has makes it look dead to the
 * clean-up); 0 goes back to its own pid. */
void store_debug_set_pid(int32_t pid);

#endif
