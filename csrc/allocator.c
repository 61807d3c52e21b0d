/*
 * allocator.c - first-fit, address-ordered, coalescing free list whose
 * state lives in the shared segment as offsets. See allocator.h.
 */
#include "allocator.h"

#include <stdlib.h>
#include <string.h>

/* Header at the start of every free block. A block is at least ALLOC_ALIGN
 * bytes, so the header always fits. */
typedef struct alloc_free_block {
    uint64_t size; /* bytes in this free block, a multiple of ALLOC_ALIGN */
    uint64_t next; /* offset of the next free block (higher address) or ALLOC_NIL */
} alloc_free_block;

static alloc_free_block *block_at(uint8_t *base, uint64_t offset)
{
    return (alloc_free_block *)(void *)(base + offset);
}

static const alloc_free_block *cblock_at(const uint8_t *base, uint64_t offset)
{
    return (const alloc_free_block *)(const void *)(base + offset);
}

uint64_t alloc_block_size(uint64_t size)
{
    if (size == 0)
        return ALLOC_ALIGN;
    if (size > UINT64_MAX - (ALLOC_ALIGN - 1))
        return 0;
    return (size + ALLOC_ALIGN - 1) & ~(uint64_t)(ALLOC_ALIGN - 1);
}

void alloc_init(alloc_state *a, uint8_t *base, uint64_t area_offset, uint64_t area_size)
{
    a->area_offset = area_offset;
    a->area_size = area_size;
    a->footprint = 0;
    if (area_size < ALLOC_ALIGN) {
        a->free_head = ALLOC_NIL;
        return;
    }
    alloc_free_block *b = block_at(base, area_offset);
    b->size = area_size;
    b->next = ALLOC_NIL;
    a->free_head = area_offset;
}

int alloc_allocate(alloc_state *a, uint8_t *base, uint64_t size, uint64_t *offset)
{
    return alloc_allocate_checked(a, base, size, offset, NULL, NULL);
}

int alloc_allocate_checked(alloc_state *a, uint8_t *base, uint64_t size, uint64_t *offset,
                           alloc_writable_fn writable, void *ctx)
{
    uint64_t need = alloc_block_size(size);
    if (need == 0)
        return -1;
    uint64_t prev = ALLOC_NIL;
    uint64_t cur = a->free_head;
    while (cur != ALLOC_NIL) {
        alloc_free_block *b = block_at(base, cur);
        if (b->size >= need) {
            /* Take the front of the block; the rest stays free in place. */
            uint64_t next = b->next;
            if (b->size > need) {
                uint64_t rest = cur + need;
                if (writable != NULL && writable(ctx, rest) != 0)
                    return -2;
                alloc_free_block *r = block_at(base, rest);
                r->size = b->size - need;
                r->next = next;
                next = rest;
            }
            if (prev == ALLOC_NIL)
                a->free_head = next;
            else
                block_at(base, prev)->next = next;
            a->footprint += need;
            *offset = cur;
            return 0;
        }
        prev = cur;
        cur = b->next;
    }
    return -1;
}

void alloc_free(alloc_state *a, uint8_t *base, uint64_t offset, uint64_t size)
{
    uint64_t len = alloc_block_size(size);
    uint64_t prev = ALLOC_NIL;
    uint64_t next = a->free_head;
    while (next != ALLOC_NIL && next < offset) {
        prev = next;
        next = block_at(base, next)->next;
    }
    a->footprint -= len;

    alloc_free_block *b = block_at(base, offset);
    b->size = len;
    b->next = next;
    if (next != ALLOC_NIL && offset + len == next) {
        alloc_free_block *n = block_at(base, next);
        b->size += n->size;
        b->next = n->next;
    }
    if (prev == ALLOC_NIL) {
        a->free_head = offset;
        return;
    }
    alloc_free_block *p = block_at(base, prev);
    if (prev + p->size == offset) {
        p->size += b->size;
        p->next = b->next;
    } else {
        p->next = offset;
    }
}

uint64_t alloc_footprint(const alloc_state *a)
{
    return a->footprint;
}

uint64_t alloc_largest_free(const alloc_state *a, const uint8_t *base)
{
    uint64_t largest = 0;
    for (uint64_t cur = a->free_head; cur != ALLOC_NIL; cur = cblock_at(base, cur)->next)
        if (cblock_at(base, cur)->size > largest)
            largest = cblock_at(base, cur)->size;
    return largest;
}

static int extent_cmp(const void *x, const void *y)
{
    const alloc_extent *ex = x, *ey = y;
    return (ex->offset > ey->offset) - (ex->offset < ey->offset);
}

size_t alloc_rebuild(alloc_state *a, uint8_t *base, alloc_extent *live, size_t n)
{
    if (n > 1)
        qsort(live, n, sizeof *live, extent_cmp);
    uint64_t end = a->area_offset + a->area_size;
    uint64_t cursor = a->area_offset; /* first byte not yet accounted for */
    uint64_t tail = ALLOC_NIL;        /* last free block linked so far */
    size_t dropped = 0;
    a->free_head = ALLOC_NIL;
    a->footprint = 0;
    for (size_t i = 0; i <= n; i++) {
        uint64_t start = end, len = 0;
        if (i < n) {
            start = live[i].offset;
            len = alloc_block_size(live[i].size);
            if (len == 0 || start < cursor || start % ALLOC_ALIGN != 0 || start > end ||
                len > end - start) {
                dropped++;
                continue;
            }
        }
        if (start > cursor) {
            alloc_free_block *b = block_at(base, cursor);
            b->size = start - cursor;
            b->next = ALLOC_NIL;
            if (tail == ALLOC_NIL)
                a->free_head = cursor;
            else
                block_at(base, tail)->next = cursor;
            tail = cursor;
        }
        cursor = start + len;
        a->footprint += len;
    }
    return dropped;
}

int alloc_check(const alloc_state *a, const uint8_t *base)
{
    uint64_t end = a->area_offset + a->area_size;
    uint64_t free_bytes = 0;
    uint64_t prev_end = 0;
    int first = 1;
    for (uint64_t cur = a->free_head; cur != ALLOC_NIL; cur = cblock_at(base, cur)->next) {
        const alloc_free_block *b = cblock_at(base, cur);
        if (cur < a->area_offset || cur % ALLOC_ALIGN != 0 || b->size == 0 ||
            b->size % ALLOC_ALIGN != 0 || b->size > end - cur)
            return -1;
        if (!first && cur <= prev_end) /* out of order, overlapping or not coalesced */
            return -1;
        free_bytes += b->size;
        prev_end = cur + b->size;
        first = 0;
        if (free_bytes > a->area_size)
            return -1;
    }
    return free_bytes + a->footprint == a->area_size ? 0 : -1;
}
