/*
 * allocator.h - the data-area allocator of the hpcray object store.
 *
 * First-fit over an address-ordered free list, coalescing on free. Every
 * block is a multiple of ALLOC_ALIGN bytes and starts on an ALLOC_ALIGN
 * boundary relative to the segment base (the segment base itself is page
 * aligned, so payloads are 64-byte aligned in every process's mapping).
 *
 * All state lives inside the shared segment and is expressed as offsets from
 * the segment base, never as pointers: every process maps the segment at its
 * own address and passes that address as `base`. A free block starts with an
 * alloc_free_block header; allocated blocks carry no header, their owner (the
 * object table) remembers offset and size and hands both back to alloc_free.
 *
 * Not thread-safe: the caller serialises every call (the store's lock).
 * Not crash-safe on its own: if a caller dies in the middle of a call, the
 * store rebuilds the free list from its object table with alloc_rebuild.
 */
#ifndef HPCRAY_ALLOCATOR_H
#define HPCRAY_ALLOCATOR_H

#include <stddef.h>
#include <stdint.h>

#define ALLOC_ALIGN 64u
#define ALLOC_NIL UINT64_MAX /* "no block" in a free-list link */

typedef struct alloc_state {
    uint64_t area_offset; /* first byte managed, from the segment base */
    uint64_t area_size;   /* bytes managed, a multiple of ALLOC_ALIGN */
    uint64_t free_head;   /* offset of the lowest free block, or ALLOC_NIL */
    uint64_t footprint;   /* bytes currently handed out (block sizes) */
} alloc_state;

/* One allocated extent, as alloc_rebuild takes them. */
typedef struct alloc_extent {
    uint64_t offset;
    uint64_t size; /* bytes requested; rounded the same way alloc_allocate does */
} alloc_extent;

/* Makes [area_offset, area_offset + area_size) one free block.
 * area_offset and area_size must be multiples of ALLOC_ALIGN. */
void alloc_init(alloc_state *a, uint8_t *base, uint64_t area_offset, uint64_t area_size);

/* Size of the block that holds `size` bytes (size 0 still takes one block),
 * or 0 when that overflows. */
uint64_t alloc_block_size(uint64_t size);

/* Reserves a block for `size` bytes; on success stores its offset (aligned)
 * in *offset and returns 0. Returns -1, changing nothing, when no free block
 * is large enough. */
int alloc_allocate(alloc_state *a, uint8_t *base, uint64_t size, uint64_t *offset);

/* alloc_allocate, asking `writable(ctx, offset)` first whether the header of
 * the rest of a split block may be written at `offset` (nonzero: no).
 * Returns -2, changing nothing, when it may not. */
typedef int (*alloc_writable_fn)(void *ctx, uint64_t offset);
int alloc_allocate_checked(alloc_state *a, uint8_t *base, uint64_t size, uint64_t *offset,
                           alloc_writable_fn writable, void *ctx);

/* Returns the block at `offset` that alloc_allocate gave for `size`, merging
 * it with free neighbours. */
void alloc_free(alloc_state *a, uint8_t *base, uint64_t offset, uint64_t size);

/* Bytes handed out and not yet freed (whole blocks). */
uint64_t alloc_footprint(const alloc_state *a);

/* Size of the largest free block (walks the free list). */
uint64_t alloc_largest_free(const alloc_state *a, const uint8_t *base);

/* Rebuilds the free list as the complement of `live` (sorted in place by
 * offset). Extents that lie outside the area or overlap an earlier one are
 * dropped from the count; returns how many were dropped. */
size_t alloc_rebuild(alloc_state *a, uint8_t *base, alloc_extent *live, size_t n);

/* Walks the free list and checks it: in bounds, aligned, strictly address
 * ordered, no two blocks adjacent (fully coalesced), free + footprint ==
 * area_size. Returns 0 when sound, -1 otherwise. For tests and debugging. */
int alloc_check(const alloc_state *a, const uint8_t *base);

#endif
