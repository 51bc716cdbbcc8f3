/*
 * batch.c - batch map calls: n keys in one C call.
 *
 * Each element goes through exactly the single-key step of map.c (the same
 * probe, the same CAS, the same change-feed record), so it keeps the single
 * call's semantics and is linearizable on its own key; the batch as a whole
 * is not a transaction. What the batch saves is the per-call overhead
 * (argument conversion in the binding, the epoch announcement, the mirror
 * descriptor load) and, above all, the wait on memory: a key's home slot,
 * key block and value block are three dependent cache misses, which one
 * call at a time pays in full, one after the other. A batch knows the keys
 * it will touch next, so it runs a three-stage software pipeline (as the
 * batched lookups of MICA and of Cuckoo++ do):
 *
 *   element i + 2A:  hash the key, prefetch its home slot
 *   element i + A:   read that slot's head and ref (now in cache), prefetch
 *                    the key block and the value block they name
 *   element i:       run the single-key step, which finds its lines in cache
 *
 * The peeks of stage two are hints only, read with relaxed loads and never
 * trusted: stage three finds the key by the full protocol. A peek that is
 * stale (the slot changed, the table migrated) costs a useless prefetch.
 *
 * Epochs: a batch enters a map operation once per SG_BATCH_CHUNK elements,
 * not per element, and not once for the whole batch: a million-key batch
 * would otherwise hold back the freeing of retired tables for its whole run.
 * Killed mid-batch, a process leaves what any killed single call leaves,
 * for the one element it was at; the elements before it are done, the ones
 * after it are not.
 */
#define _GNU_SOURCE /* syscall, for the futex calls of sg_atomic.h, under -std=c11 */
#include "sg_internal.h"

#define SG_BATCH_CHUNK 1024u /* elements per sg__enter / sg__exit */
#define SG_BATCH_AHEAD 8u    /* elements between pipeline stages: ~ misses in flight per stage */
#define SG_BATCH_RING 32u    /* hashes computed ahead: a power of two > 2 * SG_BATCH_AHEAD */

_Static_assert((SG_BATCH_RING & (SG_BATCH_RING - 1)) == 0 && SG_BATCH_RING > 2 * SG_BATCH_AHEAD, "hash ring");

/* The keys of a batch: packed at a fixed width, or concatenated with lengths. */
typedef struct sg__keys {
    const char *data;
    const uint32_t *lens; /* NULL: every key is `width` bytes */
    uint32_t width;
    size_t n;
} sg__keys;

/* A position in the keys: element i starts at data + off. */
typedef struct sg__kpos {
    size_t i, off;
} sg__kpos;

static inline size_t sg__klen(const sg__keys *k, size_t i) { return k->lens ? k->lens[i] : k->width; }

static inline const char *sg__kstep(const sg__keys *k, sg__kpos *p, size_t *len)
{
    const char *key = k->data + p->off;
    *len = sg__klen(k, p->i);
    p->off += *len;
    p->i++;
    return key;
}

/* Check every length before anything is done (a batch is refused whole, as
 * sg_ring_put_many refuses one). */
static int sg__check_lens(const uint32_t *lens, uint32_t width, size_t n, uint32_t max, int code, const char *what)
{
    if (!lens) {
        if (n && width > max)
            return sg__fail(code, "%s 0 of %u bytes exceeds this map's max_%s of %u bytes", what, width, what, max);
        return SG_OK;
    }
    for (size_t i = 0; i < n; i++)
        if (lens[i] > max)
            return sg__fail(code, "%s %zu of %u bytes exceeds this map's max_%s of %u bytes", what, i, lens[i], what,
                            max);
    return SG_OK;
}

/* ---- the prefetch pipeline ------------------------------------------------ */

typedef struct sg__pipe {
    sg_map *m;
    const sg__keys *k;
    sg__kpos hashed; /* next element to hash (stage one) */
    size_t peeked;   /* next element to peek at (stage two) */
    const sg_slot *slots; /* the head table when the chunk began: prefetch targets only */
    uint64_t mask;
    uint64_t hash[SG_BATCH_RING];
} sg__pipe;

/* A prefetch that the compiler keeps. GCC 12 at -O2 deletes the
 * __builtin_prefetch calls of stage two as dead code (its tree DCE; their
 * addresses come from the relaxed loads of the peek), which is invisible
 * until the stage buys nothing: so, on the two targets, the instruction
 * itself. The address must be inside the mapping. */
static inline void sg__prefetch(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const char *)p));
#elif defined(__aarch64__)
    __asm__ __volatile__("prfm pldl1keep, %0" : : "Q"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

/* Prefetch the block at `off`: a hint, so an offset outside the heap (a
 * stale or damaged peek, or none) prefetches the heap's first line. */
static inline void sg__prefetch_block(const sg_grid *g, uint64_t off)
{
    uint64_t at = off >= SG_HEAP_OFF && off < g->size - 2 * SG_CACHE_LINE ? off : SG_HEAP_OFF;
    sg__prefetch(g->base + at);
    /* a small block may straddle two lines: fetch the one its first payload word is on too */
    sg__prefetch(g->base + at + SG_BLOCK_HDR + 7);
}

/* Run stages one and two up to element i (stage three is the caller's). */
static inline void sg__pipe_fill(sg__pipe *p, size_t i)
{
    const sg__keys *k = p->k;
    size_t hash_to = i + 2 * SG_BATCH_AHEAD < k->n ? i + 2 * SG_BATCH_AHEAD + 1 : k->n;
    while (p->hashed.i < hash_to) {
        size_t j = p->hashed.i, len;
        const char *key = sg__kstep(k, &p->hashed, &len);
        uint64_t h = sg_hash64(key, len);
        p->hash[j % SG_BATCH_RING] = h;
        if (p->slots)
            sg__prefetch(&p->slots[h & p->mask]);
    }
    size_t peek_to = i + SG_BATCH_AHEAD < k->n ? i + SG_BATCH_AHEAD + 1 : k->n;
    for (; p->peeked < peek_to; p->peeked++) {
        if (!p->slots)
            continue;
        /* relaxed: a hint; the single-key step reads the slot with acquire */
        const sg_slot *s = &p->slots[p->hash[p->peeked % SG_BATCH_RING] & p->mask];
        uint64_t h = sg_load_relaxed(&s->head), r = sg_load_relaxed(&s->ref);
        sg__prefetch_block(p->m->g, SG_HEAD_OFF(h)); /* the key block (EMPTY, MOVED: clamped) */
        sg__prefetch_block(p->m->g, SG_REF_OFF(r));  /* the value block (none: clamped) */
    }
}

/* Start a pipeline at element `from` (key position pos); its slots are
 * set per epoch section (they are the head table's, valid inside it). */
static void sg__pipe_start(sg__pipe *p, sg_map *m, const sg__keys *k, sg__kpos pos)
{
    p->m = m;
    p->k = k;
    p->hashed = pos;
    p->peeked = pos.i;
    p->slots = NULL;
    p->mask = 0;
}

/* ---- the batch loop ---------------------------------------------------------- */

enum sg__bop { BOP_GET, BOP_PUT, BOP_DELETE, BOP_INCR };

typedef struct sg__batch {
    enum sg__bop op;
    sg__keys keys;
    sg__keys vals;      /* PUT */
    const int64_t *deltas; /* INCR */
    int64_t *results;      /* INCR */
    char *out;             /* GET */
    size_t cap;
    uint32_t vwidth;
    int32_t *status;
    uint64_t *versions;
} sg__batch;

static int64_t sg__run(sg_map *m, sg__batch *b)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    size_t n = b->keys.n;
    int rc = sg__check_lens(b->keys.lens, b->keys.width, n, m->max_key, SG_EKEYSIZE, "key");
    if (!rc && b->op == BOP_PUT)
        rc = sg__check_lens(b->vals.lens, b->vals.width, n, m->max_value, SG_EVALSIZE, "value");
    if (!rc && b->op == BOP_INCR && n && m->max_value < 8)
        rc = sg__fail(SG_EVALSIZE, "incr needs 8-byte values; this map's max_value is %u", m->max_value);
    if (!rc && b->op == BOP_GET && b->vwidth && b->cap / b->vwidth < n)
        rc = sg__fail(SG_EINVAL, "get_many: %zu values of %u bytes do not fit in %zu bytes", n, b->vwidth, b->cap);
    if (!rc && b->op == BOP_GET && !b->vwidth && n && b->cap < m->max_value)
        rc = sg__fail(SG_EINVAL, "get_many: the output buffer of %zu bytes is smaller than max_value %u", b->cap,
                      m->max_value);
    if (rc)
        return rc;

    sg__kpos kp = {0, 0}, vp = {0, 0};
    size_t outoff = 0;
    sg__pipe pipe;
    sg__pipe_start(&pipe, m, &b->keys, kp);
    for (size_t i = 0; i < n;) {
        rc = sg__enter(m);
        if (rc)
            return rc;
        /* the head table, checked once for this sg__enter: the gets start
         * from it and the pipeline prefetches its slots (damaged: none,
         * and the first get reports it) */
        sg__tab head;
        if (sg__head(m, &head))
            head = (sg__tab){0};
        pipe.slots = head.slots;
        pipe.mask = head.mask;
        /* SYNC POINT: mirror-desc (acquire, in sg__mirror): once per chunk */
        const sg_mirror_desc *mirror = b->op == BOP_GET ? NULL : sg__mirror(m);
        size_t end = n - i > SG_BATCH_CHUNK ? i + SG_BATCH_CHUNK : n;
        for (; i < end; i++) {
            sg__pipe_fill(&pipe, i);
            size_t klen;
            sg__kpos at = kp;
            const char *key = sg__kstep(&b->keys, &kp, &klen);
            uint64_t hash = pipe.hash[i % SG_BATCH_RING], version = 0;
            int64_t st;
            if (sg__is_remote(mirror, hash)) {
                st = SG_EREMOTE; /* as the single call: the caller goes through the bridge */
                if (b->op == BOP_PUT) {
                    size_t vlen;
                    sg__kstep(&b->vals, &vp, &vlen); /* skip its value */
                }
            } else {
                switch (b->op) {
                case BOP_GET:
                    if (b->vwidth) {
                        char *dst = b->out + i * b->vwidth;
                        st = sg__get_entered(m, &head, key, klen, hash, dst, b->vwidth, &version);
                        if (st >= 0 && st != b->vwidth) { /* not the map's type: written past it */
                            memset(dst, 0, b->vwidth);
                            st = sg__fail(SG_EVALSIZE, "get_many: element %zu holds a value of %lld bytes, not %u",
                                          i, (long long)st, b->vwidth);
                        }
                    } else {
                        size_t room = b->cap - outoff;
                        st = sg__get_entered(m, &head, key, klen, hash, b->out + outoff, room, &version);
                        if (st > (int64_t)room) { /* did not fit: the caller comes back for it */
                            kp = at;
                            sg__exit(m);
                            return (int64_t)i;
                        }
                        if (st > 0)
                            outoff += (size_t)st;
                    }
                    break;
                case BOP_PUT: {
                    size_t vlen;
                    const char *val = sg__kstep(&b->vals, &vp, &vlen);
                    st = sg__put_entered(m, key, klen, hash, val, vlen, &version);
                    break;
                }
                case BOP_DELETE:
                    st = sg__delete_entered(m, key, klen, hash, &version);
                    break;
                case BOP_INCR:
                    st = sg__incr_entered(m, key, klen, hash, b->deltas[i], &b->results[i], &version);
                    break;
                default:
                    st = SG_EINVAL;
                }
                if (st == SG_ECORRUPT) {
                    sg__exit(m);
                    return st; /* damage: stop, with sg_errmsg() naming it */
                }
            }
            if (b->op == BOP_INCR && st != SG_OK)
                b->results[i] = 0; /* not a result: the element failed, or is the bridge's to do */
            b->status[i] = (int32_t)st;
            if (b->versions)
                b->versions[i] = version;
        }
        sg__exit(m);
    }
    return (int64_t)n;
}

/* ---- public entry points ------------------------------------------------------ */

int64_t sg_map_get_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n, char *out,
                        size_t cap, uint32_t vwidth, int32_t *status, uint64_t *versions)
{
    sg__batch b = {.op = BOP_GET,
                   .keys = {keys, klens, kwidth, n},
                   .out = out,
                   .cap = cap,
                   .vwidth = vwidth,
                   .status = status,
                   .versions = versions};
    return sg__run(m, &b);
}

int64_t sg_map_put_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, const char *vals,
                        const uint32_t *vlens, uint32_t vwidth, size_t n, int32_t *status, uint64_t *versions)
{
    sg__batch b = {.op = BOP_PUT,
                   .keys = {keys, klens, kwidth, n},
                   .vals = {vals, vlens, vwidth, n},
                   .status = status,
                   .versions = versions};
    return sg__run(m, &b);
}

int64_t sg_map_delete_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n,
                           int32_t *status, uint64_t *versions)
{
    sg__batch b = {.op = BOP_DELETE, .keys = {keys, klens, kwidth, n}, .status = status, .versions = versions};
    return sg__run(m, &b);
}

int64_t sg_map_incr_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n,
                         const int64_t *deltas, int64_t *results, int32_t *status, uint64_t *versions)
{
    sg__batch b = {.op = BOP_INCR,
                   .keys = {keys, klens, kwidth, n},
                   .deltas = deltas,
                   .results = results,
                   .status = status,
                   .versions = versions};
    return sg__run(m, &b);
}
