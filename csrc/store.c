/*
 * store.c - the hpcray node object store. See store.h for the API.
 *
 * Segment layout (all offsets from the segment base, each part page aligned):
 *
 *   [ header | object table: table_capacity x 64-byte entries |
 *     pin table: pin_capacity x 32-byte records |
 *     backed runs: one bit per POPULATE_RUN of the segment | data area ]
 *
 * One process-shared robust mutex in the header guards the table, the
 * allocator state and the counters. Object bytes are written and read
 * outside the lock: a CREATED object belongs to its creator alone, and a
 * SEALED one never changes while pinned. The mutex is what orders a writer's
 * bytes before a reader's: seal and get both take it.
 *
 * Crash safety. A process can be SIGKILLed between any two statements while
 * it holds the lock. The table is the source of truth and every mutation of
 * it is ordered so that each intermediate state is readable:
 *  - an entry becomes visible only when its state word is written, after
 *    all its other fields (set_state);
 *  - removal is backward-shift deletion done copy-then-clear, so a death
 *    leaves at worst one duplicate entry and a few tombstones.
 * Everything else (allocator free list, LRU list, counters) is derived, and
 * the next locker, told EOWNERDEAD, rebuilds it from the table (store_repair).
 *
 * Pins. A get records its pin as (pid, object id, count) in the pin table,
 * an open-addressed table run like the object table (linear probing,
 * backward-shift removal, copy-then-clear), so that the pins of a dead
 * process can be found and dropped. The records are the truth about pins:
 * an entry's `pins` is a cache of its creator pin (CREATED) plus the counts
 * of its records, and repair recomputes it from them. A holder killed in a
 * get or release is therefore never off by one in anyone's favour: at worst
 * its own pin is or is not counted, and its own pins go when it is found
 * dead. The table is bounded (one record per object slot, at least 1024);
 * a get that would need one record more than it holds fails.
 *
 * Holders. The header also counts, per process, its CREATED objects and its
 * pin records (a small open-addressed table keyed by pid, `holders`), so
 * that the clean-up after a process died (store_release_pins_of,
 * store_abort_dead_creators, store_release_dead_pins) answers at once when
 * the dead held nothing, instead of walking tables sized by the data area.
 * The counts are derived, like the LRU list: a holder killed mid-update
 * leaves them to repair, which rebuilds them from the tables. A process
 * that finds the holder table full sets holders_overflow, and until a
 * rebuild finds room again the clean-up walks the tables as before.
 *
 * Eviction. The evictable objects (SEALED, no pins) form a doubly linked
 * list through their table slots, oldest first, ordered by lru_tick: an
 * object joins at the new end when it becomes evictable (seal, last release)
 * and leaves when pinned or freed, so eviction pops from the old end.
 *
 * Backing. tmpfs allocates a segment's pages on first touch, and a touch
 * when /dev/shm has run out (other jobs' files, other stores on the host)
 * is a SIGBUS that kills whoever wrote: a worker, the node, MPI inside a
 * receive, a store call holding the lock (on tmpfs a read of a page never
 * touched allocates it too). So the header, the tables and the bitmap below
 * are allocated when the segment is made (~1.2% of the data area), and a
 * page of the data area is touched only once its 2 MiB run is allocated
 * (posix_fallocate, back_range): a create allocates its object's runs after
 * the lock, failing with STORE_NO_SPACE when /dev/shm has no room, and
 * before anything changes, the run where the allocator will write the free
 * header after the block it splits. Every block start, where the allocator
 * reads and writes its headers, lies in such a run (the data area's start,
 * and each split point since). The store never gives pages back to tmpfs,
 * so each run is allocated once for the segment's life: a shared bit per
 * run says it was, and later creates there cost one load.
 */
#include "store.h"

#include "allocator.h"
#include "copy.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define STORE_MAGIC 0x3154535941524348ull /* "HCRAYST1" little-endian */
#define STORE_VERSION 5u
#define STORE_PAGE 4096u
#define STORE_MIN_TABLE 1024u
#define STORE_MAX_TABLE (1ull << 31)
#define PIN_MIN_TABLE 1024u
#define HOLDER_SLOTS 4096u /* processes holding something, tracked at once (7/8 of it) */
#define POPULATE_RUN (2ull << 20) /* store_write populates in runs this long */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; older kernels answer EINVAL */
#endif

/* Slot states besides STORE_STATE_CREATED and STORE_STATE_SEALED. */
#define SLOT_EMPTY 0u
#define SLOT_TOMBSTONE 3u /* transient: taken for probing, holds no object */
#define PIN_LIVE 1u       /* a pin record's state besides EMPTY and TOMBSTONE */

#define LRU_NIL UINT32_MAX /* end of the LRU list */

typedef struct store_entry {
    uint8_t id[STORE_ID_SIZE];
    _Atomic uint16_t state; /* SLOT_*, or store_state once published */
    uint8_t delete_pending; /* freed when the last pin drops */
    uint8_t unclaimed;      /* sealed for a taker: not evictable before its first get */
    uint64_t offset;         /* data block, from the segment base */
    uint64_t size;           /* bytes asked for */
    uint64_t lru_tick;       /* lru_clock when last read or made evictable */
    uint32_t pins;
    int32_t creator_pid;
    uint32_t lru_prev; /* slot of the next older evictable object, or LRU_NIL */
    uint32_t lru_next; /* slot of the next newer evictable object, or LRU_NIL */
} store_entry;

_Static_assert(sizeof(store_entry) == 64, "an entry is one cache line");

/* The pins one process holds on one object. */
typedef struct pin_record {
    uint8_t id[STORE_ID_SIZE];
    _Atomic uint16_t state; /* SLOT_EMPTY, PIN_LIVE or SLOT_TOMBSTONE */
    uint16_t unused;
    int32_t pid;
    uint32_t count; /* > 0 while live */
} pin_record;

_Static_assert(sizeof(pin_record) == 32, "two pin records per cache line");

/* What one process holds: the counts its clean-up looks at first. */
typedef struct holder_record {
    int32_t pid;          /* 0: an empty slot */
    uint32_t created;     /* CREATED objects whose creator_pid it is */
    uint32_t pin_records; /* live pin records under its pid */
    uint32_t unused;
} holder_record;

typedef struct store_header {
    _Atomic uint64_t magic; /* written last by store_create */
    uint32_t version;
    uint32_t entry_size;
    uint64_t segment_size;
    uint64_t table_offset;
    uint64_t table_capacity; /* a power of two */
    uint64_t data_offset;
    uint64_t data_capacity;
    uint64_t pin_offset;
    uint64_t pin_capacity; /* a power of two */
    uint64_t backed_offset; /* the backed-runs bitmap (_Atomic uint64_t words) */
    pthread_mutex_t lock;
    /* Everything below is guarded by lock. */
    alloc_state alloc;
    uint64_t lru_clock;
    uint32_t lru_oldest; /* slot, or LRU_NIL when nothing is evictable */
    uint32_t lru_newest;
    uint64_t evictable_bytes; /* blocks of the objects on the LRU list */
    uint64_t num_objects;
    uint64_t num_pinned;
    uint64_t num_evictions;
    uint64_t num_recoveries;
    uint64_t num_pin_records;
    uint64_t num_created;     /* CREATED objects */
    uint32_t num_holders;     /* live slots in holders */
    uint32_t holders_overflow; /* 1: a process holds something holders lacks */
    holder_record holders[HOLDER_SLOTS]; /* linear probing on pid, no tombstones */
} store_header;

struct store {
    uint8_t *base;
    size_t size;
    int fd;                   /* the segment, kept open to allocate its pages */
    store_header *hdr;
    store_entry *table;
    uint64_t mask;            /* table_capacity - 1 */
    pin_record *pin_table;
    uint64_t pin_mask;        /* pin_capacity - 1 */
    int64_t crash_countdown;  /* test hook: _exit at this crash point; 0 = off */
    unsigned copy_threads;    /* store_write's threads for a large copy */
    /* One bit per POPULATE_RUN of the segment: set once this mapping has
     * populated the run, so store_write never asks the kernel twice. Only
     * this process's threads touch it; atomic so that two of them writing at
     * once lose no bit (a stale read only costs one more populate call). */
    _Atomic uint64_t *populated;
    atomic_bool populate_works; /* cleared when the kernel lacks it */
    _Atomic uint64_t *backed;   /* in the segment: see Backing above */
    /* Clean-ups after a dead process (the three below) that walked a table,
     * through this handle: the tests check that holding nothing walks none. */
    uint64_t cleanup_walks;
};

/* Test hook: a point between two writes of a mutation made under the lock.
 * With store_debug_crash_after armed, the process dies here still holding
 * the lock, as a SIGKILL could make it. */
static void crash_point(store *s)
{
    if (s->crash_countdown > 0 && --s->crash_countdown == 0)
        _exit(77);
}

/* The calling process's pid, which every get and release records. Cached:
 * getpid is a system call, and in a VM it costs more than the rest of a get
 * and release together. A fork handler clears the cache in the child. The
 * one process-wide variable here, because a pid is process-wide. */
static _Atomic int32_t self_pid;
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static void forget_pid(void)
{
    atomic_store_explicit(&self_pid, 0, memory_order_relaxed);
}

static void register_fork_handler(void)
{
    pthread_atfork(NULL, NULL, forget_pid);
}

static int32_t current_pid(void)
{
    int32_t pid = atomic_load_explicit(&self_pid, memory_order_relaxed);
    if (pid == 0) {
        pid = (int32_t)getpid();
        atomic_store_explicit(&self_pid, pid, memory_order_relaxed);
    }
    return pid;
}

/* Calls act(s, lo, len) for each POPULATE_RUN [lo, lo + len) of the segment
 * that [offset, offset + n) touches and whose bit in `marks` is clear,
 * setting the bit when act returns 0; stops at the first nonzero return,
 * which it returns. Bits are set with atomic OR: two processes (or threads)
 * doing the same run at once both do it, and neither loses its bit. */
static int each_unmarked_run(store *s, _Atomic uint64_t *marks, uint64_t offset, uint64_t n,
                             int (*act)(store *, uint64_t, uint64_t))
{
    if (n == 0)
        return 0;
    uint64_t first = offset / POPULATE_RUN, last = (offset + n - 1) / POPULATE_RUN;
    for (uint64_t run = first; run <= last; run++) {
        _Atomic uint64_t *word = &marks[run / 64];
        uint64_t bit = 1ull << (run % 64);
        if (atomic_load_explicit(word, memory_order_acquire) & bit)
            continue;
        uint64_t lo = run * POPULATE_RUN;
        int rc = act(s, lo, s->size - lo < POPULATE_RUN ? s->size - lo : POPULATE_RUN);
        if (rc != 0)
            return rc;
        atomic_fetch_or_explicit(word, bit, memory_order_release);
    }
    return 0;
}

static int allocate_run(store *s, uint64_t lo, uint64_t len)
{
    return posix_fallocate(s->fd, (off_t)lo, (off_t)len);
}

/* Allocates the tmpfs pages of [offset, offset + n) that no process has
 * yet (see Backing): NO_SPACE, with errno, when /dev/shm has no room. */
static store_status back_range(store *s, uint64_t offset, uint64_t n)
{
    int rc = each_unmarked_run(s, s->backed, offset, n, allocate_run);
    if (rc == 0)
        return STORE_OK;
    errno = rc;
    return STORE_NO_SPACE;
}

static uint64_t round_up(uint64_t x, uint64_t to)
{
    return (x + to - 1) / to * to;
}

/* ---- entries ------------------------------------------------------------ */

static unsigned slot_state(const store_entry *e)
{
    return atomic_load_explicit(&e->state, memory_order_relaxed);
}

static bool slot_live(const store_entry *e)
{
    unsigned st = slot_state(e);
    return st == STORE_STATE_CREATED || st == STORE_STATE_SEALED;
}

/* Whether the entry is on the LRU list: sealed, unpinned, not being deleted
 * (unpin tests this with pins already 0 and delete_pending still set), and
 * not waiting for its taker's first get (store_seal_unclaimed). */
static bool slot_evictable(const store_entry *e)
{
    return slot_state(e) == STORE_STATE_SEALED && e->pins == 0 && !e->delete_pending &&
           !e->unclaimed;
}

/* Writes a slot's state word. The compiler fences on both sides keep it in
 * program order with the plain field writes around it, so a holder killed
 * between two statements leaves each slot either unpublished or complete.
 * (Cross-process visibility comes from the mutex, not from these fences.) */
static void set_state(store *s, store_entry *e, unsigned st)
{
    crash_point(s);
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store_explicit(&e->state, (uint16_t)st, memory_order_relaxed);
    atomic_signal_fence(memory_order_seq_cst);
}

static unsigned pin_state(const pin_record *r)
{
    return atomic_load_explicit(&r->state, memory_order_relaxed);
}

/* set_state for a pin record, with the same fences for the same reason. */
static void set_pin_state(store *s, pin_record *r, unsigned st)
{
    crash_point(s);
    atomic_signal_fence(memory_order_seq_cst);
    atomic_store_explicit(&r->state, (uint16_t)st, memory_order_relaxed);
    atomic_signal_fence(memory_order_seq_cst);
}

static uint64_t id_hash(const uint8_t *id)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, then a murmur finaliser */
    for (int i = 0; i < STORE_ID_SIZE; i++) {
        h ^= id[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static uint64_t home_slot(const store *s, const uint8_t *id)
{
    return id_hash(id) & s->mask;
}

/* Most objects the table takes: linear probing stays short below 7/8 load. */
static uint64_t table_limit(const store *s)
{
    return s->hdr->table_capacity - s->hdr->table_capacity / 8;
}

/* Slot of the first live entry with this id (whose id_hash is h), or -1. */
static int64_t table_find_hashed(const store *s, const uint8_t *id, uint64_t h)
{
    uint64_t i = h & s->mask;
    for (uint64_t n = 0; n <= s->mask; n++, i = (i + 1) & s->mask) {
        const store_entry *e = &s->table[i];
        unsigned st = slot_state(e);
        if (st == SLOT_EMPTY)
            return -1;
        if (st != SLOT_TOMBSTONE && memcmp(e->id, id, STORE_ID_SIZE) == 0)
            return (int64_t)i;
    }
    return -1;
}

static int64_t table_find(const store *s, const uint8_t *id)
{
    return table_find_hashed(s, id, id_hash(id));
}

/* First slot on id's probe path that holds nothing. */
static int64_t table_free_slot(const store *s, const uint8_t *id)
{
    uint64_t i = home_slot(s, id);
    for (uint64_t n = 0; n <= s->mask; n++, i = (i + 1) & s->mask)
        if (!slot_live(&s->table[i]))
            return (int64_t)i;
    return -1;
}

/* Whether x lies in the cyclic interval (lo, hi]. */
static bool cyclic_between(uint64_t lo, uint64_t x, uint64_t hi)
{
    return lo <= hi ? (lo < x && x <= hi) : (lo < x || x <= hi);
}

/* ---- the LRU list of evictable objects ---------------------------------- */

/* Points whatever linked to an entry's old slot at `slot` instead. */
static void lru_relink(store *s, uint64_t slot)
{
    store_header *hdr = s->hdr;
    const store_entry *e = &s->table[slot];
    if (e->lru_prev == LRU_NIL)
        hdr->lru_oldest = (uint32_t)slot;
    else
        s->table[e->lru_prev].lru_next = (uint32_t)slot;
    if (e->lru_next == LRU_NIL)
        hdr->lru_newest = (uint32_t)slot;
    else
        s->table[e->lru_next].lru_prev = (uint32_t)slot;
}

/* Appends an entry that just became evictable, as the most recently used. */
static void lru_push_newest(store *s, uint64_t slot)
{
    store_header *hdr = s->hdr;
    store_entry *e = &s->table[slot];
    e->lru_tick = ++hdr->lru_clock;
    e->lru_prev = hdr->lru_newest;
    e->lru_next = LRU_NIL;
    crash_point(s);
    lru_relink(s, slot);
    hdr->evictable_bytes += alloc_block_size(e->size);
}

/* Takes an entry off the list (it is being pinned or freed). */
static void lru_unlink(store *s, uint64_t slot)
{
    store_header *hdr = s->hdr;
    const store_entry *e = &s->table[slot];
    if (e->lru_prev == LRU_NIL)
        hdr->lru_oldest = e->lru_next;
    else
        s->table[e->lru_prev].lru_next = e->lru_next;
    crash_point(s);
    if (e->lru_next == LRU_NIL)
        hdr->lru_newest = e->lru_prev;
    else
        s->table[e->lru_next].lru_prev = e->lru_prev;
    hdr->evictable_bytes -= alloc_block_size(e->size);
}

/* ---- holders: what each process holds ------------------------------------ */

#define HOLDER_MASK (HOLDER_SLOTS - 1)

static uint64_t holder_home(int32_t pid)
{
    return ((uint64_t)(uint32_t)pid * 0x9e3779b97f4a7c15ull) >> 32 & HOLDER_MASK;
}

/* Slot of pid's record in t, or -1 (always for a pid <= 0: none is kept). */
static int64_t holder_slot(const holder_record *t, int32_t pid)
{
    if (pid <= 0)
        return -1;
    uint64_t i = holder_home(pid);
    for (uint64_t n = 0; n < HOLDER_SLOTS; n++, i = (i + 1) & HOLDER_MASK) {
        if (t[i].pid == pid)
            return (int64_t)i;
        if (t[i].pid == 0)
            return -1;
    }
    return -1;
}

/* Counts `created` CREATED objects and `pins` pin records more for pid. A
 * process that needs a record when the table is at its limit (or has no
 * usable pid) goes uncounted, and holders_overflow says so. Lock held. */
static void holder_add(store *s, int32_t pid, uint32_t created, uint32_t pins)
{
    store_header *hdr = s->hdr;
    int64_t slot = holder_slot(hdr->holders, pid);
    if (slot < 0) {
        if (pid <= 0 || hdr->num_holders >= HOLDER_SLOTS - HOLDER_SLOTS / 8) {
            hdr->holders_overflow = 1;
            return;
        }
        /* Below the limit there is an empty slot on the probe path. */
        uint64_t i = holder_home(pid);
        while (hdr->holders[i].pid != 0)
            i = (i + 1) & HOLDER_MASK;
        hdr->holders[i].created = hdr->holders[i].pin_records = 0;
        hdr->holders[i].pid = pid;
        hdr->num_holders++;
        slot = (int64_t)i;
    }
    crash_point(s);
    hdr->holders[slot].created += created;
    hdr->holders[slot].pin_records += pins;
}

/* Removes the record at slot `hole` by backward-shift deletion. Lock held. */
static void holder_remove_at(store *s, uint64_t hole)
{
    holder_record *t = s->hdr->holders;
    uint64_t j = hole;
    for (uint64_t n = 0; n < HOLDER_MASK; n++) {
        j = (j + 1) & HOLDER_MASK;
        if (t[j].pid == 0)
            break;
        if (cyclic_between(hole, holder_home(t[j].pid), j))
            continue; /* its probe path does not cross the hole */
        t[hole] = t[j];
        crash_point(s);
        hole = j;
    }
    t[hole].pid = 0;
    s->hdr->num_holders--;
}

/* Uncounts what holder_add counted; the record goes at zero. A process
 * without a record (uncounted since an overflow) changes nothing. */
static void holder_sub(store *s, int32_t pid, uint32_t created, uint32_t pins)
{
    int64_t slot = holder_slot(s->hdr->holders, pid);
    if (slot < 0)
        return;
    holder_record *r = &s->hdr->holders[slot];
    r->created -= created < r->created ? created : r->created;
    r->pin_records -= pins < r->pin_records ? pins : r->pin_records;
    if (r->created == 0 && r->pin_records == 0)
        holder_remove_at(s, (uint64_t)slot);
}

/* The entry at e leaves the CREATED state (sealed, or freed). Lock held. */
static void created_gone(store *s, const store_entry *e)
{
    if (s->hdr->num_created > 0)
        s->hdr->num_created--;
    holder_sub(s, e->creator_pid, 1, 0);
}

/* Recounts num_created and every process's holdings from the object and pin
 * tables, clearing holders_overflow when they all fit now. Repair calls it,
 * and the clean-up calls after a walk they made because of an overflow.
 * Lock held. */
static void holders_rebuild(store *s)
{
    store_header *hdr = s->hdr;
    memset(hdr->holders, 0, sizeof hdr->holders);
    hdr->num_holders = 0;
    hdr->holders_overflow = 0;
    hdr->num_created = 0;
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        if (slot_state(e) == STORE_STATE_CREATED) {
            hdr->num_created++;
            holder_add(s, e->creator_pid, 1, 0);
        }
    }
    for (uint64_t i = 0; i < hdr->pin_capacity; i++) {
        const pin_record *r = &s->pin_table[i];
        if (pin_state(r) == PIN_LIVE)
            holder_add(s, r->pid, 0, 1);
    }
}

/* ---- table removal ------------------------------------------------------- */

/* Removes the entry at slot i, which must be off the LRU list, by
 * backward-shift deletion (no tombstones left behind). Each move copies the
 * entry into the hole and publishes it before clearing the source, so at
 * every step each live entry is findable. */
static void table_remove_at(store *s, uint64_t i)
{
    uint64_t hole = i;
    set_state(s, &s->table[hole], SLOT_TOMBSTONE);
    uint64_t j = hole;
    for (uint64_t n = 0; n < s->mask; n++) {
        j = (j + 1) & s->mask;
        store_entry *e = &s->table[j];
        unsigned st = slot_state(e);
        if (st == SLOT_EMPTY)
            break;
        if (st == SLOT_TOMBSTONE) /* left by a dead holder; repair clears it */
            continue;
        if (cyclic_between(hole, home_slot(s, e->id), j))
            continue; /* its probe path does not cross the hole */
        store_entry *h = &s->table[hole];
        memcpy(h->id, e->id, STORE_ID_SIZE);
        h->offset = e->offset;
        h->size = e->size;
        h->lru_tick = e->lru_tick;
        h->pins = e->pins;
        h->delete_pending = e->delete_pending;
        h->unclaimed = e->unclaimed;
        h->creator_pid = e->creator_pid;
        h->lru_prev = e->lru_prev;
        h->lru_next = e->lru_next;
        set_state(s, h, st);
        if (slot_evictable(h))
            lru_relink(s, hole);
        set_state(s, e, SLOT_TOMBSTONE);
        hole = j;
    }
    set_state(s, &s->table[hole], SLOT_EMPTY);
}

/* Removes an entry from the table, then frees its data block: in that order
 * because the allocator writes into a freed block, and a holder dying in
 * between must not leave a live entry over clobbered bytes (the block is
 * only leaked until the next repair). */
static void free_entry(store *s, uint64_t slot)
{
    store_header *hdr = s->hdr;
    store_entry *e = &s->table[slot];
    uint64_t offset = e->offset, size = e->size;
    if (slot_evictable(e))
        lru_unlink(s, slot);
    if (e->pins > 0)
        hdr->num_pinned--;
    if (slot_state(e) == STORE_STATE_CREATED)
        created_gone(s, e);
    table_remove_at(s, slot);
    hdr->num_objects--;
    crash_point(s);
    alloc_free(&hdr->alloc, s->base, offset, size);
}

/* ---- the pin table ------------------------------------------------------ */

/* Home slot of (id, pid), from h = id_hash(id). */
static uint64_t pin_home(const store *s, uint64_t h, int32_t pid)
{
    h ^= (uint64_t)(uint32_t)pid * 0x9e3779b97f4a7c15ull;
    h ^= h >> 32;
    return h & s->pin_mask;
}

/* Most records the table takes, as table_limit. */
static uint64_t pin_limit(const store *s)
{
    return s->hdr->pin_capacity - s->hdr->pin_capacity / 8;
}

/* Slot of the live record of (id, pid), or -1; h = id_hash(id). */
static int64_t pin_find(const store *s, const uint8_t *id, uint64_t h, int32_t pid)
{
    uint64_t i = pin_home(s, h, pid);
    for (uint64_t n = 0; n <= s->pin_mask; n++, i = (i + 1) & s->pin_mask) {
        const pin_record *r = &s->pin_table[i];
        unsigned st = pin_state(r);
        if (st == SLOT_EMPTY)
            return -1;
        if (st == PIN_LIVE && r->pid == pid && memcmp(r->id, id, STORE_ID_SIZE) == 0)
            return (int64_t)i;
    }
    return -1;
}

/* Counts one more pin of `pid` on `id`. Returns -1, changing nothing, when
 * that needs a new record and the table is at its limit. */
static int pin_add(store *s, const uint8_t *id, uint64_t h, int32_t pid)
{
    int64_t slot = pin_find(s, id, h, pid);
    if (slot >= 0) {
        s->pin_table[slot].count++;
        return 0;
    }
    if (s->hdr->num_pin_records >= pin_limit(s))
        return -1;
    /* Below the limit there is an empty slot on the probe path; outside
     * removals the table holds no tombstones. */
    uint64_t i = pin_home(s, h, pid);
    while (pin_state(&s->pin_table[i]) != SLOT_EMPTY)
        i = (i + 1) & s->pin_mask;
    pin_record *r = &s->pin_table[i];
    memcpy(r->id, id, STORE_ID_SIZE);
    r->pid = pid;
    r->count = 1;
    set_pin_state(s, r, PIN_LIVE);
    s->hdr->num_pin_records++;
    holder_add(s, pid, 0, 1);
    return 0;
}

/* Removes the record at slot i by backward-shift deletion, copy-then-clear
 * as table_remove_at does, so a death leaves at worst one duplicate. */
static void pin_remove_at(store *s, uint64_t i)
{
    uint64_t hole = i;
    set_pin_state(s, &s->pin_table[hole], SLOT_TOMBSTONE);
    uint64_t j = hole;
    for (uint64_t n = 0; n < s->pin_mask; n++) {
        j = (j + 1) & s->pin_mask;
        pin_record *r = &s->pin_table[j];
        unsigned st = pin_state(r);
        if (st == SLOT_EMPTY)
            break;
        if (st == SLOT_TOMBSTONE) /* left by a dead holder; repair clears it */
            continue;
        if (cyclic_between(hole, pin_home(s, id_hash(r->id), r->pid), j))
            continue;
        pin_record *h = &s->pin_table[hole];
        memcpy(h->id, r->id, STORE_ID_SIZE);
        h->pid = r->pid;
        h->count = r->count;
        set_pin_state(s, h, st);
        set_pin_state(s, r, SLOT_TOMBSTONE);
        hole = j;
    }
    set_pin_state(s, &s->pin_table[hole], SLOT_EMPTY);
}

/* Uncounts one pin of the record at slot i, removing it at zero. */
static void pin_drop(store *s, uint64_t i)
{
    pin_record *r = &s->pin_table[i];
    if (--r->count > 0)
        return;
    int32_t pid = r->pid;
    pin_remove_at(s, i);
    s->hdr->num_pin_records--;
    holder_sub(s, pid, 0, 1);
}

/* ---- the lock and its repair -------------------------------------------- */

static bool extent_sane(const store *s, const store_entry *e)
{
    const store_header *hdr = s->hdr;
    uint64_t block = alloc_block_size(e->size);
    uint64_t end = hdr->data_offset + hdr->data_capacity;
    return block != 0 && e->offset >= hdr->data_offset && e->offset % ALLOC_ALIGN == 0 &&
           e->offset <= end && block <= end - e->offset;
}

/* Whether the live entry at slot i is a second copy left by an interrupted
 * move, or has an extent out of bounds. */
static bool entry_broken(const store *s, uint64_t i)
{
    const store_entry *e = &s->table[i];
    return !extent_sane(s, e) || table_find(s, e->id) != (int64_t)i;
}

/* Whether repair must drop the live entry at slot i: broken, or an object
 * deleted whose last pin dropped just before its holder died. */
static bool entry_doomed(const store *s, uint64_t i)
{
    const store_entry *e = &s->table[i];
    return entry_broken(s, i) || (e->delete_pending && e->pins == 0);
}

/* Whether the live pin record at slot i is a second copy left by an
 * interrupted move, empty, or of no sealed object. */
static bool pin_doomed(const store *s, uint64_t i)
{
    const pin_record *r = &s->pin_table[i];
    int64_t slot = table_find(s, r->id);
    return r->count == 0 || pin_find(s, r->id, id_hash(r->id), r->pid) != (int64_t)i ||
           slot < 0 || slot_state(&s->table[slot]) != STORE_STATE_SEALED;
}

/* Drops doomed pin records, then sets every live entry's pin count from the
 * records: its creator's pin while CREATED, plus each record's count. */
static void recount_pins(store *s)
{
    store_header *hdr = s->hdr;
    for (uint64_t i = 0; i < hdr->pin_capacity; i++)
        if (pin_state(&s->pin_table[i]) == SLOT_TOMBSTONE)
            pin_remove_at(s, i);
    for (uint64_t i = 0; i < hdr->pin_capacity; i++) {
        /* A removal shifts a later record into i, so look at i again. */
        while (pin_state(&s->pin_table[i]) == PIN_LIVE && pin_doomed(s, i))
            pin_remove_at(s, i);
    }
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        store_entry *e = &s->table[i];
        if (slot_live(e))
            e->pins = slot_state(e) == STORE_STATE_CREATED;
    }
    uint64_t records = 0;
    for (uint64_t i = 0; i < hdr->pin_capacity; i++) {
        const pin_record *r = &s->pin_table[i];
        if (pin_state(r) != PIN_LIVE)
            continue;
        s->table[table_find(s, r->id)].pins += r->count; /* found: not doomed */
        records++;
    }
    hdr->num_pin_records = records;
}

typedef struct tick_slot {
    uint64_t tick;
    uint64_t slot;
} tick_slot;

static int tick_cmp(const void *x, const void *y)
{
    const tick_slot *a = x, *b = y;
    return (a->tick > b->tick) - (a->tick < b->tick);
}

/* Rebuilds the allocator and the LRU list from the live entries. Returns -1
 * (leaving them as they were) when out of memory. */
static int rebuild_derived(store *s, uint64_t live, uint64_t evictable)
{
    store_header *hdr = s->hdr;
    alloc_extent *extents = malloc((live ? live : 1) * sizeof *extents);
    tick_slot *order = malloc((evictable ? evictable : 1) * sizeof *order);
    if (extents == NULL || order == NULL) {
        free(extents);
        free(order);
        return -1;
    }
    size_t n = 0, m = 0;
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        if (!slot_live(e))
            continue;
        extents[n].offset = e->offset;
        extents[n].size = e->size;
        n++;
        if (slot_evictable(e)) {
            order[m].tick = e->lru_tick;
            order[m].slot = i;
            m++;
        }
    }
    alloc_rebuild(&hdr->alloc, s->base, extents, n);
    qsort(order, m, sizeof *order, tick_cmp);
    hdr->lru_oldest = hdr->lru_newest = LRU_NIL;
    hdr->evictable_bytes = 0;
    for (size_t k = 0; k < m; k++) {
        store_entry *e = &s->table[order[k].slot];
        e->lru_prev = hdr->lru_newest;
        e->lru_next = LRU_NIL;
        lru_relink(s, order[k].slot);
        hdr->evictable_bytes += alloc_block_size(e->size);
    }
    free(extents);
    free(order);
    return 0;
}

/* Brings the segment back to a consistent state after a lock holder died:
 * clears tombstones, drops duplicate or out-of-bounds entries and pin
 * records, recomputes pin counts from the records, drops delete-pending
 * objects left with no pin, recounts, and rebuilds the allocator and the
 * LRU list from the live entries. Idempotent and itself interruptible: if
 * the repairer dies, the next locker is told EOWNERDEAD again and starts
 * over. Returns -1 when out of memory. */
static int store_repair(store *s)
{
    store_header *hdr = s->hdr;
    uint64_t cap = hdr->table_capacity;

    for (uint64_t i = 0; i < cap; i++)
        if (slot_state(&s->table[i]) == SLOT_TOMBSTONE)
            table_remove_at(s, i);

    for (uint64_t i = 0; i < cap; i++) {
        /* A removal shifts a later entry into i, so look at i again. */
        while (slot_live(&s->table[i]) && entry_broken(s, i))
            table_remove_at(s, i);
    }

    recount_pins(s);

    for (uint64_t i = 0; i < cap; i++) {
        while (slot_live(&s->table[i]) && entry_doomed(s, i))
            table_remove_at(s, i);
    }

    uint64_t live = 0, pinned = 0, evictable = 0;
    for (uint64_t i = 0; i < cap; i++) {
        const store_entry *e = &s->table[i];
        if (!slot_live(e))
            continue;
        live++;
        pinned += e->pins > 0;
        evictable += slot_evictable(e);
    }
    hdr->num_objects = live;
    hdr->num_pinned = pinned;
    holders_rebuild(s);
    return rebuild_derived(s, live, evictable);
}

/* Takes the store lock. EOWNERDEAD means the last holder died with it: the
 * segment may be mid-mutation, so repair it before marking the mutex
 * consistent (marking it first would let a death during repair go
 * unnoticed). A repair that cannot finish (no memory) unlocks without
 * marking: the mutex then fails every later lock with ENOTRECOVERABLE, a
 * dead store rather than a corrupt one. */
static store_status lock_store(store *s)
{
    int rc = pthread_mutex_lock(&s->hdr->lock);
    if (rc == EOWNERDEAD) {
        if (store_repair(s) != 0) {
            pthread_mutex_unlock(&s->hdr->lock);
            errno = ENOMEM;
            return STORE_SYSTEM;
        }
        s->hdr->num_recoveries++;
        rc = pthread_mutex_consistent(&s->hdr->lock);
    }
    if (rc != 0) {
        errno = rc;
        return STORE_SYSTEM;
    }
    return STORE_OK;
}

/* Lets the next waiter in; pairs with lock_store. */
static void unlock_store(store *s)
{
    pthread_mutex_unlock(&s->hdr->lock);
}

/* ---- segment life ------------------------------------------------------- */

static store *wrap(uint8_t *base, size_t size, int fd)
{
    store *s = malloc(sizeof *s);
    size_t runs = (size + POPULATE_RUN - 1) / POPULATE_RUN;
    _Atomic uint64_t *populated = calloc((runs + 63) / 64, sizeof *populated);
    if (s == NULL || populated == NULL) {
        free(s);
        free((void *)populated);
        return NULL;
    }
    s->base = base;
    s->size = size;
    s->fd = fd;
    s->hdr = (store_header *)(void *)base;
    s->table = (store_entry *)(void *)(base + s->hdr->table_offset);
    s->mask = s->hdr->table_capacity - 1;
    s->pin_table = (pin_record *)(void *)(base + s->hdr->pin_offset);
    s->pin_mask = s->hdr->pin_capacity - 1;
    s->crash_countdown = 0;
    s->cleanup_walks = 0;
    s->copy_threads = copy_default_threads();
    s->populated = populated;
    atomic_init(&s->populate_works, true);
    s->backed = (_Atomic uint64_t *)(void *)(base + s->hdr->backed_offset);
    /* Before this process's first get: a fork from here on resets the pid. */
    pthread_once(&fork_handler_once, register_fork_handler);
    return s;
}

store_status store_create(const char *name, uint64_t capacity, uint64_t table_capacity,
                          store **out)
{
    if (name == NULL || out == NULL || capacity == 0 || capacity > (1ull << 50) ||
        table_capacity > STORE_MAX_TABLE)
        return STORE_INVALID;
    uint64_t data_capacity = round_up(capacity, STORE_PAGE);
    uint64_t slots = table_capacity;
    if (slots == 0) /* default: one slot per 8 KiB, at least STORE_MIN_TABLE */
        slots = data_capacity / 8192 > STORE_MIN_TABLE ? data_capacity / 8192 : STORE_MIN_TABLE;
    if (slots < 8)
        slots = 8;
    uint64_t pow2 = 1;
    while (pow2 < slots)
        pow2 <<= 1;
    uint64_t pin_slots = pow2 > PIN_MIN_TABLE ? pow2 : PIN_MIN_TABLE;
    uint64_t header_size = round_up(sizeof(store_header), STORE_PAGE);
    uint64_t table_size = round_up(pow2 * sizeof(store_entry), STORE_PAGE);
    uint64_t pin_size = round_up(pin_slots * sizeof(pin_record), STORE_PAGE);
    uint64_t before_data = header_size + table_size + pin_size;
    /* Runs of the whole segment, counted generously (the bitmap is inside). */
    uint64_t runs = (before_data + data_capacity) / POPULATE_RUN + 2;
    uint64_t backed_size = round_up((runs + 63) / 64 * sizeof(uint64_t), STORE_PAGE);
    uint64_t segment_size = before_data + backed_size + data_capacity;

    /* tmpfs takes an ftruncate of any size and raises SIGBUS on first touch
     * when it runs out; refuse a segment that cannot fit now instead. */
    struct statvfs vfs;
    if (statvfs("/dev/shm", &vfs) == 0 &&
        (uint64_t)vfs.f_bavail * vfs.f_frsize < segment_size) {
        errno = ENOSPC;
        return STORE_SYSTEM;
    }

    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        return STORE_SYSTEM;
    uint8_t *base = MAP_FAILED;
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, (off_t)segment_size) != 0)
        goto fail;
    base = mmap(NULL, segment_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        goto fail;

    /* The tables need no initialisation: ftruncate zero-fills, and a zero
     * state word is SLOT_EMPTY. Their pages are allocated now (see Backing):
     * a probe must never meet a full /dev/shm, under the lock least of all.
     * So are the bitmap's and the data area's first run, where alloc_init
     * writes its free block; the rest as objects use them. */
    uint64_t allocated = round_up(before_data + backed_size + ALLOC_ALIGN, POPULATE_RUN);
    if (allocated > segment_size)
        allocated = segment_size;
    int backing = posix_fallocate(fd, 0, (off_t)allocated);
    if (backing != 0) {
        errno = backing;
        goto fail;
    }
    store_header *hdr = (store_header *)(void *)base;
    hdr->version = STORE_VERSION;
    hdr->entry_size = sizeof(store_entry);
    hdr->segment_size = segment_size;
    hdr->table_offset = header_size;
    hdr->table_capacity = pow2;
    hdr->pin_offset = header_size + table_size;
    hdr->pin_capacity = pin_slots;
    hdr->backed_offset = before_data;
    hdr->data_offset = before_data + backed_size;
    hdr->data_capacity = data_capacity;
    _Atomic uint64_t *backed = (_Atomic uint64_t *)(void *)(base + before_data);
    for (uint64_t run = 0; run * POPULATE_RUN < allocated; run++) /* (the last may be short) */
        atomic_fetch_or_explicit(&backed[run / 64], 1ull << (run % 64), memory_order_relaxed);
    alloc_init(&hdr->alloc, base, hdr->data_offset, data_capacity);
    hdr->lru_oldest = hdr->lru_newest = LRU_NIL;

    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc == 0)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(&hdr->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        goto fail;
    }

    store *s = wrap(base, segment_size, fd);
    if (s == NULL)
        goto fail;
    /* Release: an attacher that reads the magic (acquire) sees the whole
     * initialised header. */
    atomic_store_explicit(&hdr->magic, STORE_MAGIC, memory_order_release);
    *out = s;
    return STORE_OK;

fail: {
    int saved = errno;
    if (base != MAP_FAILED)
        munmap(base, segment_size);
    close(fd);
    shm_unlink(name);
    errno = saved;
    return STORE_SYSTEM;
}
}

store_status store_attach(const char *name, store **out)
{
    if (name == NULL || out == NULL)
        return STORE_INVALID;
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0)
        return STORE_SYSTEM;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return STORE_SYSTEM;
    }
    size_t size = (size_t)st.st_size;
    if (size < STORE_PAGE) {
        close(fd);
        return STORE_BAD_SEGMENT;
    }
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int saved = errno;
        close(fd);
        errno = saved;
        return STORE_SYSTEM;
    }
    store_header *hdr = (store_header *)(void *)base;
    /* Acquire: pairs with the release in store_create. */
    if (atomic_load_explicit(&hdr->magic, memory_order_acquire) != STORE_MAGIC ||
        hdr->version != STORE_VERSION || hdr->entry_size != sizeof(store_entry) ||
        hdr->segment_size != size) {
        munmap(base, size);
        close(fd);
        return STORE_BAD_SEGMENT;
    }
    store *s = wrap(base, size, fd);
    if (s == NULL) {
        munmap(base, size);
        close(fd);
        errno = ENOMEM;
        return STORE_SYSTEM;
    }
    *out = s;
    return STORE_OK;
}

void store_close(store *s)
{
    if (s == NULL)
        return;
    munmap(s->base, s->size);
    close(s->fd);
    free((void *)s->populated);
    free(s);
}

store_status store_unlink(const char *name)
{
    if (shm_unlink(name) != 0 && errno != ENOENT)
        return STORE_SYSTEM;
    return STORE_OK;
}

uint8_t *store_ptr(const store *s, uint64_t offset)
{
    return s->base + offset;
}

uint64_t store_capacity(const store *s)
{
    return s->hdr->data_capacity;
}

static int populate_run(store *s, uint64_t lo, uint64_t len)
{
    if (madvise(s->base + lo, len, MADV_POPULATE_WRITE) == 0)
        return 0;
    if (errno == EINVAL) /* a kernel before 5.14: page faults it is */
        atomic_store_explicit(&s->populate_works, false, memory_order_relaxed);
    return -1; /* else the copy's own faults populate the rest */
}

/* copy_prepare_fn of store_write: populates, once per mapping, the runs of
 * the segment that [dst, dst + n) touches. A whole run at a time: the bytes
 * around the object are only made present, never changed, so this is safe
 * next to objects others are reading. */
static void populate_runs(void *ctx, uint8_t *dst, size_t n)
{
    store *s = ctx;
    if (n == 0 || !atomic_load_explicit(&s->populate_works, memory_order_relaxed))
        return;
    int saved = errno;
    each_unmarked_run(s, s->populated, (uint64_t)(dst - s->base), n, populate_run);
    errno = saved;
}

void store_write(store *s, uint64_t offset, const void *src, uint64_t n)
{
    copy_parallel(s->base + offset, src, n, s->copy_threads,
                  n >= POPULATE_RUN ? populate_runs : NULL, s);
}

void store_populate(store *s, uint64_t offset, uint64_t n)
{
    if (n >= POPULATE_RUN)
        populate_runs(s, s->base + offset, n);
}

void store_set_copy_threads(store *s, unsigned threads)
{
    s->copy_threads = threads ? threads : copy_default_threads();
}

unsigned store_copy_threads(const store *s)
{
    return s->copy_threads;
}

/* ---- objects ------------------------------------------------------------ */

/* A slot and a block for one more object, or -1. */
/* alloc_writable_fn: the allocator's next free header at `offset`. */
static int header_writable(void *ctx, uint64_t offset)
{
    return back_range(ctx, offset, ALLOC_ALIGN) == STORE_OK ? 0 : -1;
}

/* 0: reserved; -1: no room; -2: no page for the allocator's header. */
static int try_reserve(store *s, uint64_t size, uint64_t *offset)
{
    if (s->hdr->num_objects >= table_limit(s))
        return -1;
    return alloc_allocate_checked(&s->hdr->alloc, s->base, size, offset, header_writable, s);
}

/* Evicts unpinned SEALED objects, least recently used first, until
 * try_reserve succeeds. Evicts nothing when even evicting all of them could
 * not free enough bytes. Called with the lock held. */
static store_status evict_and_reserve(store *s, uint64_t size, uint64_t *offset)
{
    store_header *hdr = s->hdr;
    uint64_t free_bytes = hdr->data_capacity - alloc_footprint(&hdr->alloc);
    if (hdr->lru_oldest == LRU_NIL || free_bytes + hdr->evictable_bytes < alloc_block_size(size))
        return STORE_FULL;
    while (hdr->lru_oldest != LRU_NIL) {
        free_entry(s, hdr->lru_oldest);
        hdr->num_evictions++;
        int reserved = try_reserve(s, size, offset);
        if (reserved == 0)
            return STORE_OK;
        if (reserved == -2)
            return STORE_NO_SPACE;
    }
    return STORE_FULL;
}

store_status store_create_object(store *s, const uint8_t *id, uint64_t size, uint64_t *offset)
{
    if (id == NULL || offset == NULL)
        return STORE_INVALID;
    uint64_t block = alloc_block_size(size);
    if (block == 0 || block > s->hdr->data_capacity)
        return STORE_TOO_LARGE;
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    store_header *hdr = s->hdr;
    uint64_t data = 0;
    int reserved = -1;
    if (table_find(s, id) >= 0)
        rc = STORE_EXISTS;
    else if ((reserved = try_reserve(s, size, &data)) == -2)
        rc = STORE_NO_SPACE;
    else if (reserved != 0)
        rc = evict_and_reserve(s, size, &data);
    if (rc == STORE_OK) {
        /* A death from here to set_state leaks the block only until the
         * next locker's repair. */
        crash_point(s);
        store_entry *e = &s->table[table_free_slot(s, id)];
        memcpy(e->id, id, STORE_ID_SIZE);
        e->offset = data;
        e->size = size;
        e->lru_tick = ++hdr->lru_clock;
        e->pins = 1;
        e->delete_pending = 0;
        e->unclaimed = 0;
        e->creator_pid = current_pid();
        e->lru_prev = e->lru_next = LRU_NIL;
        set_state(s, e, STORE_STATE_CREATED);
        hdr->num_objects++;
        hdr->num_pinned++;
        hdr->num_created++;
        holder_add(s, e->creator_pid, 1, 0);
    }
    unlock_store(s);
    if (rc == STORE_OK && back_range(s, data, size) != STORE_OK) {
        int saved = errno;
        store_abort(s, id);
        errno = saved;
        return STORE_NO_SPACE;
    }
    if (rc == STORE_OK)
        *offset = data;
    return rc;
}

/* Drops one pin; on the last one the object is freed if delete-pending,
 * else it becomes evictable (unless unclaimed). Lock held. */
static void unpin(store *s, uint64_t slot)
{
    store_entry *e = &s->table[slot];
    e->pins--;
    if (e->pins > 0)
        return;
    s->hdr->num_pinned--;
    crash_point(s);
    if (e->delete_pending)
        free_entry(s, slot);
    else if (!e->unclaimed)
        lru_push_newest(s, slot);
}

/* CREATED -> SEALED; `unclaimed` keeps it off the LRU list until a get. */
static store_status seal(store *s, const uint8_t *id, bool unclaimed)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find(s, id);
    if (slot < 0) {
        rc = STORE_NOT_FOUND;
    } else if (slot_state(&s->table[slot]) != STORE_STATE_CREATED) {
        rc = STORE_BAD_STATE;
    } else {
        /* Before the state word: an unclaimed object never shows as evictable. */
        s->table[slot].unclaimed = unclaimed;
        set_state(s, &s->table[slot], STORE_STATE_SEALED);
        created_gone(s, &s->table[slot]);
        unpin(s, (uint64_t)slot);
    }
    unlock_store(s);
    return rc;
}

store_status store_seal(store *s, const uint8_t *id)
{
    return seal(s, id, false);
}

store_status store_seal_unclaimed(store *s, const uint8_t *id)
{
    return seal(s, id, true);
}

store_status store_abort(store *s, const uint8_t *id)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find(s, id);
    if (slot < 0)
        rc = STORE_NOT_FOUND;
    else if (slot_state(&s->table[slot]) != STORE_STATE_CREATED)
        rc = STORE_BAD_STATE;
    else
        free_entry(s, (uint64_t)slot);
    unlock_store(s);
    return rc;
}

store_status store_get(store *s, const uint8_t *id, uint64_t *offset, uint64_t *size)
{
    uint64_t h = id_hash(id);
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find_hashed(s, id, h);
    store_entry *e = slot < 0 ? NULL : &s->table[slot];
    if (e == NULL || e->delete_pending) {
        rc = STORE_NOT_FOUND;
    } else if (slot_state(e) != STORE_STATE_SEALED) {
        rc = STORE_NOT_SEALED;
    } else if (pin_add(s, id, h, current_pid()) != 0) {
        rc = STORE_TOO_MANY_PINS;
    } else {
        crash_point(s);
        if (slot_evictable(e))
            lru_unlink(s, (uint64_t)slot);
        if (e->pins == 0)
            s->hdr->num_pinned++;
        e->pins++;
        e->unclaimed = 0;
        e->lru_tick = ++s->hdr->lru_clock;
        *offset = e->offset;
        *size = e->size;
    }
    unlock_store(s);
    return rc;
}

/* Drops one of the caller's pins on the object at `offset`: any one (`sole`
 * false), or only the last one, which then frees the object at once (`sole`:
 * *freed says whether it did). Shared by store_release and
 * store_release_if_sole. */
static store_status release_pin(store *s, const uint8_t *id, uint64_t offset, bool sole,
                                int *freed)
{
    uint64_t h = id_hash(id);
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find_hashed(s, id, h);
    int64_t pin = -1;
    if (slot < 0 || s->table[slot].offset != offset)
        rc = STORE_NOT_FOUND;
    else if (slot_state(&s->table[slot]) != STORE_STATE_SEALED || s->table[slot].pins == 0 ||
             (pin = pin_find(s, id, h, current_pid())) < 0)
        rc = STORE_BAD_STATE;
    else if (!sole) {
        pin_drop(s, (uint64_t)pin);
        unpin(s, (uint64_t)slot);
    } else if (s->table[slot].pins == 1 && !s->table[slot].delete_pending) {
        /* Record first, as a release: a death in between leaves the pin count
         * to repair, never an entry whose last pin dropped. */
        pin_drop(s, (uint64_t)pin);
        free_entry(s, (uint64_t)slot);
        *freed = 1;
    }
    unlock_store(s);
    return rc;
}

store_status store_release(store *s, const uint8_t *id, uint64_t offset)
{
    int freed = 0;
    return release_pin(s, id, offset, false, &freed);
}

store_status store_release_if_sole(store *s, const uint8_t *id, uint64_t offset, int *freed)
{
    *freed = 0;
    return release_pin(s, id, offset, true, freed);
}

store_status store_contains(store *s, const uint8_t *id, int *found)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find(s, id);
    *found = slot >= 0 && slot_state(&s->table[slot]) == STORE_STATE_SEALED &&
             !s->table[slot].delete_pending;
    unlock_store(s);
    return STORE_OK;
}

store_status store_delete(store *s, const uint8_t *id)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    int64_t slot = table_find(s, id);
    if (slot < 0 || s->table[slot].delete_pending)
        rc = STORE_NOT_FOUND;
    else if (s->table[slot].pins == 0)
        free_entry(s, (uint64_t)slot);
    else
        s->table[slot].delete_pending = 1;
    unlock_store(s);
    return rc;
}

/* What kill(pid, 0) said about the few pids a scan meets, so a table with
 * many records of one process asks once. */
typedef struct pid_verdicts {
    int32_t pid[64];
    bool dead[64];
    unsigned n;
} pid_verdicts;

static bool pid_dead(pid_verdicts *v, int32_t pid)
{
    for (unsigned k = 0; k < v->n; k++)
        if (v->pid[k] == pid)
            return v->dead[k];
    bool dead = pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
    if (v->n < 64) {
        v->pid[v->n] = pid;
        v->dead[v->n++] = dead;
    }
    return dead;
}

/* Whether a process the holders table counts as holding CREATED objects
 * (created) or pin records (!created) no longer exists. Lock held. */
static bool some_holder_dead(const store *s, pid_verdicts *v, bool created)
{
    const holder_record *t = s->hdr->holders;
    for (uint64_t i = 0; i < HOLDER_SLOTS; i++)
        if (t[i].pid != 0 && (created ? t[i].created : t[i].pin_records) > 0 &&
            pid_dead(v, t[i].pid))
            return true;
    return false;
}

store_status store_abort_dead_creators(store *s, uint64_t *count)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    store_header *hdr = s->hdr;
    pid_verdicts verdicts = {.n = 0};
    uint64_t n = 0;
    /* The walk is for a dead creator the counts name, or one they may miss. */
    bool walk = hdr->num_created > 0 &&
                (hdr->holders_overflow || some_holder_dead(s, &verdicts, true));
    s->cleanup_walks += walk;
    for (uint64_t i = 0; walk && i < hdr->table_capacity; i++) {
        /* A removal shifts a later entry into i, so look at i again. */
        for (;;) {
            const store_entry *e = &s->table[i];
            if (slot_state(e) != STORE_STATE_CREATED || !pid_dead(&verdicts, e->creator_pid))
                break;
            free_entry(s, i);
            n++;
        }
    }
    if (walk && hdr->holders_overflow)
        holders_rebuild(s);
    unlock_store(s);
    if (count != NULL)
        *count = n;
    return STORE_OK;
}

/* Removes the pin record at slot i and drops its pins from its object, as
 * that many releases would. Returns how many pins it held. Lock held. */
static uint64_t release_record(store *s, uint64_t i)
{
    pin_record *r = &s->pin_table[i];
    uint8_t id[STORE_ID_SIZE];
    memcpy(id, r->id, STORE_ID_SIZE);
    uint32_t count = r->count;
    int32_t pid = r->pid;
    /* Record first: a death in between leaves the pins to repair, which
     * counts them from the records. */
    pin_remove_at(s, i);
    s->hdr->num_pin_records--;
    holder_sub(s, pid, 0, 1);
    int64_t slot = table_find(s, id);
    if (slot < 0 || count == 0)
        return count;
    store_entry *e = &s->table[slot];
    uint32_t drop = count < e->pins ? count : e->pins;
    if (drop > 0) {
        e->pins -= drop - 1;
        unpin(s, (uint64_t)slot);
    }
    return count;
}

store_status store_release_pins_of(store *s, int32_t pid, uint64_t *count)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    store_header *hdr = s->hdr;
    bool counted = !hdr->holders_overflow;
    int64_t slot = counted ? holder_slot(hdr->holders, pid) : -1;
    /* Counted, the walk stops after the process's last record: none, most
     * often (a worker that held no view when it exited). */
    uint64_t left = slot >= 0 ? hdr->holders[slot].pin_records : 0;
    uint64_t n = 0;
    s->cleanup_walks += !counted || left > 0;
    for (uint64_t i = 0; i < hdr->pin_capacity && (!counted || left > 0); i++) {
        /* A removal shifts a later record into i, so look at i again. */
        while (pin_state(&s->pin_table[i]) == PIN_LIVE && s->pin_table[i].pid == pid) {
            n += release_record(s, i);
            left -= left > 0;
        }
    }
    if (!counted)
        holders_rebuild(s);
    unlock_store(s);
    if (count != NULL)
        *count = n;
    return STORE_OK;
}

store_status store_release_dead_pins(store *s, uint64_t *count)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    store_header *hdr = s->hdr;
    pid_verdicts verdicts = {.n = 0};
    uint64_t n = 0;
    bool walk = hdr->num_pin_records > 0 &&
                (hdr->holders_overflow || some_holder_dead(s, &verdicts, false));
    s->cleanup_walks += walk;
    for (uint64_t i = 0; walk && i < hdr->pin_capacity; i++) {
        while (pin_state(&s->pin_table[i]) == PIN_LIVE &&
               pid_dead(&verdicts, s->pin_table[i].pid))
            n += release_record(s, i);
    }
    if (walk && hdr->holders_overflow)
        holders_rebuild(s);
    unlock_store(s);
    if (count != NULL)
        *count = n;
    return STORE_OK;
}

store_status store_list_pins(store *s, store_pin_info *out, size_t max, size_t *count)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    size_t n = 0;
    for (uint64_t i = 0; i < s->hdr->pin_capacity; i++) {
        const pin_record *r = &s->pin_table[i];
        if (pin_state(r) != PIN_LIVE)
            continue;
        if (n < max) {
            memcpy(out[n].id, r->id, STORE_ID_SIZE);
            out[n].pid = r->pid;
            out[n].count = r->count;
        }
        n++;
    }
    unlock_store(s);
    *count = n;
    return STORE_OK;
}

store_status store_get_stats(store *s, store_stats *out)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    const store_header *hdr = s->hdr;
    out->capacity = hdr->data_capacity;
    out->used_bytes = alloc_footprint(&hdr->alloc);
    out->num_objects = hdr->num_objects;
    out->num_pinned = hdr->num_pinned;
    out->num_evictions = hdr->num_evictions;
    out->table_capacity = hdr->table_capacity;
    out->num_recoveries = hdr->num_recoveries;
    out->num_pin_records = hdr->num_pin_records;
    out->pin_table_capacity = hdr->pin_capacity;
    out->num_created = hdr->num_created;
    out->num_holders = hdr->num_holders;
    out->holders_overflow = hdr->holders_overflow;
    out->cleanup_walks = s->cleanup_walks;
    unlock_store(s);
    return STORE_OK;
}

/* Copies the entries that `keep` accepts (up to `max`) into `out`; *count
 * gets how many there are. Shared by store_list and store_list_sole_pinned. */
static store_status list_entries(store *s, bool (*keep)(const store_entry *),
                                 store_object_info *out, size_t max, size_t *count)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    size_t n = 0;
    for (uint64_t i = 0; i < s->hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        if (!keep(e))
            continue;
        if (n < max) {
            memcpy(out[n].id, e->id, STORE_ID_SIZE);
            out[n].offset = e->offset;
            out[n].size = e->size;
            out[n].state = slot_state(e);
            out[n].pins = e->pins;
            out[n].delete_pending = e->delete_pending;
            out[n].creator_pid = e->creator_pid;
            out[n].lru_tick = e->lru_tick;
        }
        n++;
    }
    unlock_store(s);
    *count = n;
    return STORE_OK;
}

store_status store_list(store *s, store_object_info *out, size_t max, size_t *count)
{
    return list_entries(s, slot_live, out, max, count);
}

/* Whether only one pin holds a sealed object that is not being deleted. */
static bool sole_pinned(const store_entry *e)
{
    return slot_state(e) == STORE_STATE_SEALED && e->pins == 1 && !e->delete_pending;
}

static int info_tick_cmp(const void *x, const void *y)
{
    const store_object_info *a = x, *b = y;
    return (a->lru_tick > b->lru_tick) - (a->lru_tick < b->lru_tick);
}

store_status store_list_sole_pinned(store *s, store_object_info *out, size_t max, size_t *count)
{
    store_status rc = list_entries(s, sole_pinned, out, max, count);
    if (rc == STORE_OK && *count <= max)
        qsort(out, *count, sizeof *out, info_tick_cmp);
    return rc;
}

/* ---- test hooks --------------------------------------------------------- */

store_status store_debug_lock_forever(store *s, int notify_fd)
{
    store_status rc = lock_store(s);
    if (rc != STORE_OK)
        return rc;
    if (notify_fd >= 0 && write(notify_fd, "L", 1) != 1) {
        unlock_store(s);
        return STORE_SYSTEM;
    }
    for (;;)
        pause();
}

void store_debug_crash_after(store *s, int64_t steps)
{
    s->crash_countdown = steps;
}

void store_debug_set_pid(int32_t pid)
{
    atomic_store_explicit(&self_pid, pid, memory_order_relaxed);
}

/* Whether the LRU list holds exactly the evictable entries, oldest first,
 * with consistent back links and byte count. Lock held. */
static bool lru_sound(const store *s, uint64_t evictable)
{
    const store_header *hdr = s->hdr;
    uint64_t count = 0, bytes = 0, last_tick = 0;
    uint32_t prev = LRU_NIL;
    for (uint32_t i = hdr->lru_oldest; i != LRU_NIL; i = s->table[i].lru_next) {
        const store_entry *e = &s->table[i];
        if (i > s->mask || ++count > evictable || !slot_evictable(e) || e->lru_prev != prev ||
            e->lru_tick < last_tick)
            return false;
        bytes += alloc_block_size(e->size);
        last_tick = e->lru_tick;
        prev = i;
    }
    return count == evictable && prev == hdr->lru_newest && bytes == hdr->evictable_bytes;
}

/* Whether the pin table holds no tombstone or doomed record, its count is
 * right, and every live entry's pins are its creator pin plus its records'
 * counts. Lock held. Returns -1 when out of memory. */
static int pins_sound(const store *s)
{
    const store_header *hdr = s->hdr;
    uint64_t *sums = calloc(hdr->table_capacity, sizeof *sums);
    if (sums == NULL)
        return -1;
    bool sound = true;
    uint64_t records = 0;
    for (uint64_t i = 0; i < hdr->pin_capacity; i++) {
        const pin_record *r = &s->pin_table[i];
        unsigned st = pin_state(r);
        if (st != SLOT_EMPTY && st != PIN_LIVE)
            sound = false;
        if (st != PIN_LIVE)
            continue;
        records++;
        if (pin_doomed(s, i))
            sound = false;
        else
            sums[table_find(s, r->id)] += r->count;
    }
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        if (slot_live(e) && e->pins != (slot_state(e) == STORE_STATE_CREATED) + sums[i])
            sound = false;
    }
    free(sums);
    return sound && records == hdr->num_pin_records ? 0 : -1;
}

/* Whether num_created and the holders table count exactly what the object
 * and pin tables hold (every process, unless holders_overflow), each record
 * where its probe path finds it. Lock held. Returns -1 when out of memory. */
static int holders_sound(const store *s)
{
    const store_header *hdr = s->hdr;
    holder_record *left = malloc(sizeof hdr->holders);
    if (left == NULL)
        return -1;
    memcpy(left, hdr->holders, sizeof hdr->holders);
    bool sound = true;
    uint64_t records = 0, created = 0;
    for (uint64_t i = 0; i < HOLDER_SLOTS; i++) {
        if (left[i].pid == 0)
            continue;
        records++;
        if (left[i].pid < 0 || (left[i].created == 0 && left[i].pin_records == 0) ||
            holder_slot(left, left[i].pid) != (int64_t)i)
            sound = false;
    }
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        if (slot_state(e) != STORE_STATE_CREATED)
            continue;
        created++;
        int64_t slot = holder_slot(left, e->creator_pid);
        if (slot >= 0 && left[slot].created > 0)
            left[slot].created--;
        else if (!hdr->holders_overflow)
            sound = false;
    }
    for (uint64_t i = 0; i < hdr->pin_capacity; i++) {
        const pin_record *r = &s->pin_table[i];
        if (pin_state(r) != PIN_LIVE)
            continue;
        int64_t slot = holder_slot(left, r->pid);
        if (slot >= 0 && left[slot].pin_records > 0)
            left[slot].pin_records--;
        else if (!hdr->holders_overflow)
            sound = false;
    }
    for (uint64_t i = 0; i < HOLDER_SLOTS; i++)
        if (left[i].pid != 0 && (left[i].created != 0 || left[i].pin_records != 0))
            sound = false; /* counts more than the tables hold */
    free(left);
    return sound && records == hdr->num_holders && created == hdr->num_created ? 0 : -1;
}

int store_debug_check(store *s)
{
    if (lock_store(s) != STORE_OK)
        return -1;
    const store_header *hdr = s->hdr;
    int bad = 0;
    uint64_t live = 0, pinned = 0, evictable = 0, bytes = 0;
    for (uint64_t i = 0; i < hdr->table_capacity; i++) {
        const store_entry *e = &s->table[i];
        unsigned st = slot_state(e);
        if (st >= SLOT_TOMBSTONE)
            bad = 1;
        if (!slot_live(e))
            continue;
        live++;
        pinned += e->pins > 0;
        evictable += slot_evictable(e);
        bytes += alloc_block_size(e->size);
        if (entry_doomed(s, i))
            bad = 1;
    }
    if (live != hdr->num_objects || pinned != hdr->num_pinned || !lru_sound(s, evictable) ||
        bytes != alloc_footprint(&hdr->alloc) || alloc_check(&hdr->alloc, s->base) != 0 ||
        pins_sound(s) != 0 || holders_sound(s) != 0)
        bad = 1;
    unlock_store(s);
    return bad ? -1 : 0;
}
