/*
 * heap.c - the segment's block allocator: size classes four to a doubling, each a
 * lock-free Treiber stack of free blocks with a tagged head, fed by a break
 * that only grows.
 *
 * Lock-free: a process stopped or killed at any instruction blocks nobody;
 * at worst the block it held is lost to the heap (leaked, counted by
 * validate as carved but neither free nor reachable).
 *
 * Reading `next` from a block that another process has just popped is safe
 * here because the segment is always mapped: the value read is garbage, and
 * the tagged CAS on the head then fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>

#include "sg_internal.h"

#define SG_BACKING_STEP (2ull << 20)

/* Make sure tmpfs pages exist up to `end`, allocating them 2 MiB at a time
 * ahead of the shared watermark: a store to a page tmpfs cannot supply
 * kills the process with SIGBUS, a failed fallocate is an error instead.
 * Filesystems without fallocate just skip it. */
static int sg__back_to(sg_grid *g, uint64_t end, int one_step)
{
    sg_header *h = sg__hdr(g);
    uint64_t backed = sg_load_acquire(&h->backed);
    if (end <= backed)
        return SG_OK;
    uint64_t to = (end + SG_BACKING_STEP - 1) & ~(SG_BACKING_STEP - 1);
    if (one_step && to > backed + SG_BACKING_STEP)
        to = (backed + SG_BACKING_STEP) & ~(SG_BACKING_STEP - 1);
    if (to > g->size)
        to = g->size;
    int err = posix_fallocate(g->fd, (off_t)backed, (off_t)(to - backed));
    if (err == ENOSPC || err == ENOMEM || err == EFBIG)
        return sg__fail(SG_ENOMEM,
                        "grid '%s' heap exhausted: /dev/shm has no memory left for the next %llu bytes "
                        "(the grid's size is a ceiling; the machine's shared memory ran out first)",
                        g->name, (unsigned long long)(to - backed));
    /* release: pairs with the acquire above (publishes nothing but the fact) */
    while (backed < to && !sg_cas_release(&h->backed, &backed, to))
        ;
    return SG_OK;
}

static int sg__back(sg_grid *g, uint64_t end) { return sg__back_to(g, end, 0); }

uint64_t sg__block_bytes(uint64_t payload)
{
    unsigned c = sg__class_for(payload + SG_BLOCK_HDR);
    return c < SG_NCLASSES ? sg__class_size(c) : 0;
}

void sg__prepare(sg_grid *g, uint64_t bytes)
{
    uint64_t want = sg_load_relaxed(&sg__hdr(g)->brk) + bytes + SG_BACKING_STEP;
    (void)sg__back_to(g, want < g->size ? want : g->size, 1); /* a failure shows when the block is carved */
}

/* Carve a fresh block of class `cls` from the break. */
static int sg__carve(sg_grid *g, unsigned cls, uint64_t *off)
{
    sg_header *h = sg__hdr(g);
    uint64_t bs = sg__class_size(cls);
    /* 16 bytes is all correctness needs (a 16-byte slot or word never
     * straddles a cache line then); large blocks start on a line. */
    uint64_t align = bs < 256 ? 16 : SG_CACHE_LINE;
    uint64_t old = sg_load_relaxed(&h->brk);
    for (;;) {
        uint64_t start = (old + align - 1) & ~(align - 1);
        if (old < SG_HEAP_OFF) /* damaged: never carve over the header */
            return sg__fail(SG_ECORRUPT, "grid '%s': heap break %llu is below the heap", g->name,
                            (unsigned long long)old);
        if (start > g->size || bs > g->size - start) /* g->size: what is mapped, whatever the header says */
            return sg__fail(SG_ENOMEM,
                            "grid '%s' heap exhausted: a %llu-byte block does not fit in the %llu bytes left of %llu "
                            "(create the grid with a larger size)",
                            g->name, (unsigned long long)bs, (unsigned long long)(old < g->size ? g->size - old : 0),
                            (unsigned long long)g->size);
        int rc = sg__back(g, start + bs);
        if (rc)
            return rc;
        /* relaxed: the break only hands out disjoint ranges of never-written,
         * zero memory; the block's contents are published later by the CAS
         * that makes it reachable. */
        if (sg_cas_relaxed(&h->brk, &old, start + bs)) {
            sg_fetch_add_relaxed(&h->free[cls].carved, 1);
            if (start != old)
                sg_fetch_add_relaxed(&h->gap_bytes, start - old);
            sg_block *b = (sg_block *)(g->base + start);
            sg_store_relaxed(&b->meta, SG_META(cls, SG_BLK_FREE, 0));
            *off = start;
            return SG_OK;
        }
    }
}

int sg__alloc(sg_grid *g, uint64_t payload, uint64_t *off, int *fresh)
{
    unsigned cls = sg__class_for(payload + SG_BLOCK_HDR);
    if (cls >= SG_NCLASSES)
        return sg__fail(SG_ENOMEM, "block of %llu bytes is larger than the largest size class",
                        (unsigned long long)payload);
    sg_free_list *fl = &sg__hdr(g)->free[cls];
    /* SYNC POINT: free-list (acquire): pairs with the release CAS in sg__free,
     * so the `next` link of the top block is visible. */
    uint64_t head = sg_load_acquire(&fl->head);
    for (;;) {
        uint64_t top = SG_TAGGED_OFF(head);
        if (top == 0) {
            *fresh = 1;
            return sg__carve(g, cls, off);
        }
        sg_block *b = sg__block(g, top);
        if (!b)
            return sg__fail(SG_ECORRUPT, "free list %u of grid '%s' points outside the heap (offset %llu)", cls,
                            g->name, (unsigned long long)top);
        uint64_t next = sg_load_relaxed(&b->word);
        uint64_t desired = SG_TAGGED(SG_TAGGED_TAG(head) + 1, next);
        if (sg_cas_acquire(&fl->head, &head, desired)) {
            if (SG_META_CLASS(sg_load_relaxed(&b->meta)) != cls)
                return sg__fail(SG_ECORRUPT, "free list %u of grid '%s' holds a block of class %u", cls, g->name,
                                SG_META_CLASS(sg_load_relaxed(&b->meta)));
            /* SYNC POINT: block-reuse (release): a reader still copying this
             * block's previous contents that sees any word we write from here
             * on also sees, after its acquire fence, the reference change that
             * retired the block, and so retries. */
            sg_fence_release();
            *off = top;
            *fresh = 0;
            return SG_OK;
        }
        /* head now holds the current value: retry */
    }
}

void sg__free(sg_grid *g, uint64_t off)
{
    /* SYNC POINT: block-reuse (release): a stale reader that sees the FREE
     * meta or the link we store next also sees, after its acquire fence, the
     * reference change that retired the block. */
    sg_fence_release();
    sg_block *b = sg__block(g, off);
    if (!b)
        return; /* never ours: better leaked than a corrupted free list */
    unsigned cls = SG_META_CLASS(sg_load_relaxed(&b->meta));
    sg_free_list *fl = &sg__hdr(g)->free[cls];
    sg_store_relaxed(&b->meta, SG_META(cls, SG_BLK_FREE, 0));
    uint64_t head = sg_load_relaxed(&fl->head);
    do {
        sg_store_relaxed(&b->word, SG_TAGGED_OFF(head));
        /* SYNC POINT: free-list (release): publishes b->word (the link) to the
         * popper that acquires this head. */
    } while (!sg_cas_release(&fl->head, &head, SG_TAGGED(SG_TAGGED_TAG(head) + 1, off)));
}

int sg_grid_validate(sg_grid *g, sg_heap_report *out)
{
    memset(out, 0, sizeof *out);
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    sg_header *h = sg__hdr(g);
    out->heap_bytes = h->heap_end - SG_HEAP_OFF;
    out->carved_bytes = sg_load_relaxed(&h->brk) - SG_HEAP_OFF;
    out->gap_bytes = sg_load_relaxed(&h->gap_bytes);
    for (unsigned c = 0; c < SG_NCLASSES; c++) {
        uint64_t carved = sg_load_relaxed(&h->free[c].carved);
        uint64_t off = SG_TAGGED_OFF(sg_load_acquire(&h->free[c].head));
        uint64_t n = 0;
        while (off) {
            sg_block *b = sg__block(g, off);
            if (!b || SG_META_CLASS(sg_load_relaxed(&b->meta)) != c ||
                SG_META_KIND(sg_load_relaxed(&b->meta)) != SG_BLK_FREE) {
                out->error = sg__fail(SG_ECORRUPT, "free list %u: bad block at offset %llu", c,
                                      (unsigned long long)off);
                return out->error;
            }
            if (++n > carved || n > (g->size - SG_HEAP_OFF) / sg__class_size(c)) {
                out->error = sg__fail(SG_ECORRUPT, "free list %u is longer than the %llu blocks carved (a cycle?)",
                                      c, (unsigned long long)carved);
                return out->error;
            }
            off = sg_load_relaxed(&b->word);
        }
        out->free_blocks += n;
        out->free_bytes += n * sg__class_size(c);
    }
    return SG_OK;
}
