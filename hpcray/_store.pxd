# Extern declarations mirroring csrc/store.h; nothing else belongs here.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "store.h" nogil:
    enum: STORE_ID_SIZE

    ctypedef enum store_status:
        STORE_OK
        STORE_EXISTS
        STORE_NOT_FOUND
        STORE_NOT_SEALED
        STORE_BAD_STATE
        STORE_FULL
        STORE_TOO_LARGE
        STORE_INVALID
        STORE_BAD_SEGMENT
        STORE_SYSTEM
        STORE_TOO_MANY_PINS
        STORE_NO_SPACE

    ctypedef enum store_state:
        STORE_STATE_CREATED
        STORE_STATE_SEALED

    ctypedef struct store:
        pass

    ctypedef struct store_stats:
        uint64_t capacity
        uint64_t used_bytes
        uint64_t num_objects
        uint64_t num_pinned
        uint64_t num_evictions
        uint64_t table_capacity
        uint64_t num_recoveries
        uint64_t num_pin_records
        uint64_t pin_table_capacity
        uint64_t num_created
        uint64_t num_holders
        uint64_t holders_overflow
        uint64_t cleanup_walks

    ctypedef struct store_object_info:
        uint8_t id[STORE_ID_SIZE]
        uint64_t offset
        uint64_t size
        uint32_t state
        uint32_t pins
        uint32_t delete_pending
        int32_t creator_pid
        uint64_t lru_tick

    ctypedef struct store_pin_info:
        uint8_t id[STORE_ID_SIZE]
        int32_t pid
        uint32_t count

    store_status store_create(const char *name, uint64_t capacity, uint64_t table_capacity,
                              store **out)
    store_status store_attach(const char *name, store **out)
    void store_close(store *s)
    store_status store_unlink(const char *name)
    uint8_t *store_ptr(const store *s, uint64_t offset)
    uint64_t store_capacity(const store *s)
    store_status store_create_object(store *s, const uint8_t *id, uint64_t size,
                                     uint64_t *offset)
    store_status store_seal(store *s, const uint8_t *id)
    store_status store_seal_unclaimed(store *s, const uint8_t *id)
    store_status store_abort(store *s, const uint8_t *id)
    void store_write(store *s, uint64_t offset, const void *src, uint64_t n)
    void store_populate(store *s, uint64_t offset, uint64_t n)
    void store_set_copy_threads(store *s, unsigned threads)
    unsigned store_copy_threads(const store *s)
    store_status store_get(store *s, const uint8_t *id, uint64_t *offset, uint64_t *size)
    store_status store_release(store *s, const uint8_t *id, uint64_t offset)
    store_status store_release_if_sole(store *s, const uint8_t *id, uint64_t offset,
                                       int *freed)
    store_status store_contains(store *s, const uint8_t *id, int *found)
    store_status store_delete(store *s, const uint8_t *id)
    store_status store_abort_dead_creators(store *s, uint64_t *count)
    store_status store_release_pins_of(store *s, int32_t pid, uint64_t *count)
    store_status store_release_dead_pins(store *s, uint64_t *count)
    store_status store_list_pins(store *s, store_pin_info *out, size_t max, size_t *count)
    store_status store_get_stats(store *s, store_stats *out)
    store_status store_list(store *s, store_object_info *out, size_t max, size_t *count)
    store_status store_list_sole_pinned(store *s, store_object_info *out, size_t max,
                                        size_t *count)
    store_status store_debug_lock_forever(store *s, int notify_fd)
    int store_debug_check(store *s)
    void store_debug_crash_after(store *s, int64_t steps)
    void store_debug_set_pid(int32_t pid)
