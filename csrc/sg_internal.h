/*
 * sg_internal.h - process-private state and helpers shared by the .c files.
 * Nothing here is in shared memory (that is sg_layout.h) or public (shmgrid.h).
 */
#ifndef SG_INTERNAL_H
#define SG_INTERNAL_H

#include "shmgrid.h"
#include "sg_atomic.h"
#include "sg_layout.h"

/* A process's handle on an attached segment. */
struct sg_grid {
    uint8_t *base;     /* mapping of the whole segment; NULL once closed */
    uint64_t size;     /* bytes mapped */
    uint64_t self;     /* this process's word (pid | start time) */
    uint32_t slot;     /* process-table slot held by this handle */
    int fd;            /* the shm object, kept to fallocate heap pages before use */
    int refs;          /* 1 for the grid handle + 1 per object handle */
    char name[SG_GRID_NAME_MAX_LEN + 1];
};

/* A process's handle on a map. */
struct sg_map {
    sg_grid *g;
    sg_map_hdr *hdr;
    uint32_t max_key;
    uint32_t max_value;
    int reclaim_countdown; /* operations until this handle next tries to free retired tables */
};

/* ---- errors: a per-thread message naming the cause ---- */
int sg__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline sg_header *sg__hdr(const sg_grid *g) { return (sg_header *)g->base; }

/* Bytes of a block of size class c: 32, 48, then 64 << d times 4/4, 5/4,
 * 6/4, 7/4 for d = 0, 1, ... (all multiples of 16). */
static inline uint64_t sg__class_size(unsigned c)
{
    if (c < 2)
        return SG_MIN_BLOCK + 16u * c;
    c -= 2;
    return (16ull << (c / 4)) * (4 + c % 4);
}

/* The smallest class whose blocks hold n bytes (SG_NCLASSES if none). */
static inline unsigned sg__class_for(uint64_t n)
{
    if (n <= 64)
        return n <= 32 ? 0 : n <= 48 ? 1 : 2;
    unsigned d = (unsigned)(63 - __builtin_clzll(n - 1)) - 6; /* 64 << d < n <= 128 << d */
    uint64_t step = 16ull << d;
    unsigned c = 2 + 4 * d + (unsigned)((n - (64ull << d) + step - 1) / step);
    return c < SG_NCLASSES ? c : SG_NCLASSES;
}

/* A block at `off`, checked to lie wholly inside the heap. NULL if not. */
sg_block *sg__block(const sg_grid *g, uint64_t off);

/* ---- heap (heap.c) ---- */
/* Allocate a block whose payload holds `payload` bytes. On success *off is
 * its offset and *fresh tells whether it was never used (so still zero).
 * The caller writes meta with the kind and length. */
int sg__alloc(sg_grid *g, uint64_t payload, uint64_t *off, int *fresh);
/* Return a block to its free list. The block must be unreachable for new
 * readers (unpublished, or its reference already CASed away). */
void sg__free(sg_grid *g, uint64_t off);
/* Allocate tmpfs pages one 2 MiB step further toward `bytes` past the heap
 * break, so that a large block carved soon (a map's next table) does not
 * pay for all its pages at once. */
void sg__prepare(sg_grid *g, uint64_t bytes);
/* Bytes of the block that would hold a payload of `payload` bytes. */
uint64_t sg__block_bytes(uint64_t payload);

/* ---- processes (segment.c) ---- */
uint64_t sg__self_word(void);
int sg__word_alive(uint64_t word);

/* ---- directory (segment.c) ---- */
typedef int (*sg__create_fn)(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx);
int sg__dir_open(sg_grid *g, const char *name, uint32_t kind, const uint64_t param[4],
                 sg__create_fn create, void *ctx, sg_dirent **out);
int sg__check_name(const char *name, size_t max, const char *what);

#endif /* SG_INTERNAL_H */
