/*
 * map.c - the lock-free, elastic hash map.
 *
 * Open addressing over 16-byte slots {head, ref} (see sg_layout.h):
 *   - head binds a slot to one key for good (CAS from 0), so two inserters
 *     of the same key meet on the same slot and a probe may stop at an
 *     empty head;
 *   - ref names the key's current VALUE or TOMB block; every change builds
 *     a new block and CASes ref, then frees the old block.
 *
 * Every operation is linearizable at its successful CAS on ref (writes) or
 * at its load of ref that the re-check confirms (reads), and lock-free: no
 * step waits for another process. A process killed at any instruction
 * leaves the map valid; at worst it leaks the block it was writing, or a
 * slot reservation, or leaves len() off by one (validate(repair) recounts).
 *
 * Growth and reclamation (migration). When the latest table has no slot to
 * spare, a process allocates a next table (larger, or the same size to drop
 * deleted keys) and publishes it in table->next. From then on:
 *   - copying is cooperative: every writer that meets the migration copies
 *     one chunk of SG_COPY_CHUNK slots (claimed round-robin, so chunks of a
 *     killed helper are taken again) and finalizes its own key's slot first;
 *     readers never copy and never wait;
 *   - a slot is copied by sealing an empty head (MOVED), or by freezing the
 *     ref (FROZEN: no more writes here, the value is still current), binding
 *     the key in the next table with the same key block and value block, and
 *     marking the ref DONE (the next table is now the key's authority).
 *     Tombstones and never-written keys are not copied: their versions raise
 *     the map's version floor, above which re-stored keys start;
 *   - when every chunk is copied, the map header is swung to the next table
 *     and the old one is retired; it and the key blocks of dropped keys are
 *     freed once every process inside a map operation entered after the
 *     swing (epochs in the process table; dead processes are ignored).
 * All of it is idempotent, so a process killed at any point of a migration
 * leaves work that the next process finishes.
 */
#define _GNU_SOURCE /* pid_t, getpid under -std=c11 */
#include <stdlib.h>
#include <unistd.h>

#include "sg_internal.h"

#define SG_AGAIN 2     /* internal: a migration began under us; locate again */
#define SG_NEED_ROOM 3 /* internal: the latest table has no slot to spare */

/* ---- tables ------------------------------------------------------------- */

/* sg__tab, a table's derived fields: see sg_internal.h */

static uint64_t sg__chunk(uint64_t nslots) { return nslots < SG_COPY_CHUNK ? nslots : SG_COPY_CHUNK; }
static uint64_t sg__slot_limit(uint64_t nslots) { return nslots - nslots / 4; }

static uint64_t sg__table_bytes(uint64_t nslots)
{
    uint64_t nchunks = nslots / sg__chunk(nslots);
    return sizeof(sg_table_hdr) + nslots * sizeof(sg_slot) + 8 * ((nchunks + 63) / 64);
}

/* The table at `off`, checked to be a whole table block. Table headers are
 * immutable while the table is reachable (but `next`, the counters and the
 * retire fields, which have their own accessors). */
static int sg__tab_at(sg_map *m, uint64_t off, sg__tab *t)
{
    sg_block *b = sg__block(m->g, off);
    if (!b || SG_META_KIND(sg_load_relaxed(&b->meta)) != SG_BLK_TABLE)
        return sg__fail(SG_ECORRUPT, "map table at offset %llu is not a table block", (unsigned long long)off);
    sg_table_hdr *h = (sg_table_hdr *)b->payload;
    uint64_t n = h->nslots;
    uint64_t room = sg__class_size(SG_META_CLASS(sg_load_relaxed(&b->meta))) - SG_BLOCK_HDR;
    if (n < 8 || (n & (n - 1)) || n > (1ull << SG_OFF_BITS) || sg__table_bytes(n) > room)
        return sg__fail(SG_ECORRUPT, "map table at offset %llu has a bad slot count %llu", (unsigned long long)off,
                        (unsigned long long)n);
    t->off = off;
    t->h = h;
    t->slots = (sg_slot *)(h + 1);
    t->mask = n - 1;
    t->chunk = sg__chunk(n);
    t->nchunks = n / t->chunk;
    t->bitmap = (uint64_t *)(t->slots + n);
    return SG_OK;
}

/* The oldest table in use. SYNC POINT: epoch (load): seq_cst, so it is
 * ordered after this process's announcement in sg__enter. */
int sg__head(sg_map *m, sg__tab *t) { return sg__tab_at(m, sg_load_seq_cst(&m->hdr->table), t); }

/* The table t migrates to: SG_OK, or SG_NO if none. SYNC POINT:
 * table-publish (acquire): the next table was initialized before its CAS. */
static int sg__next(sg_map *m, const sg__tab *t, sg__tab *n)
{
    uint64_t off = sg_load_acquire(&t->h->next);
    if (!off)
        return SG_NO;
    int rc = sg__tab_at(m, off, n);
    if (!rc && n->h->generation <= t->h->generation) /* a cycle would never end */
        rc = sg__fail(SG_ECORRUPT, "map table generation %llu is followed by generation %llu",
                      (unsigned long long)t->h->generation, (unsigned long long)n->h->generation);
    return rc;
}

/* ---- keys --------------------------------------------------------------- */

/* Does a payload of n bytes fit in the size class of a block with this
 * meta word? (A damaged or hostile segment must give an error, never a read
 * past the block.) */
static inline int sg__fits(uint64_t meta, uint64_t n)
{
    return SG_META_CLASS(meta) < SG_NCLASSES && n <= sg__class_size(SG_META_CLASS(meta)) - SG_BLOCK_HDR;
}

/* memcmp(a, b, n) == 0, without a call into libc for the short keys of most
 * maps (a typed map's 8-byte key is one word): the libc call was a tenth of
 * a batch get. Plain reads, as memcmp's: only for key blocks, immutable. */
static inline int sg__key_bytes_eq(const unsigned char *a, const char *b, size_t n)
{
    if (n > 32)
        return memcmp(a, b, n) == 0;
    uint64_t x, y, d = 0;
    for (; n >= 8; a += 8, b += 8, n -= 8) {
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        d |= x ^ y;
    }
    for (; n; a++, b++, n--)
        d |= (uint64_t)(*a ^ (unsigned char)*b);
    return d == 0;
}

/* Does bound head `h` name the key (key, klen, hash)? Key blocks are
 * immutable once their head is published, and live at least as long as a
 * table whose slot names them, so plain reads are fine here: the acquire
 * load of head (SYNC POINT: key-publish) made them visible. */
static int sg__key_is(sg_map *m, uint64_t h, const char *key, size_t klen, uint64_t hash, int *corrupt)
{
    if (SG_HEAD_TAG(h) != hash >> 48)
        return 0;
    sg_block *kb = sg__block(m->g, SG_HEAD_OFF(h));
    if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY) {
        *corrupt = 1;
        return 0;
    }
    return kb->word == hash && SG_META_LEN(kb->meta) == klen && sg__fits(kb->meta, klen) &&
           sg__key_bytes_eq((const unsigned char *)kb->payload, key, klen);
}

static int sg__check_key(sg_map *m, size_t klen)
{
    if (klen > m->max_key)
        return sg__fail(SG_EKEYSIZE, "key of %zu bytes exceeds this map's max_key of %u bytes", klen, m->max_key);
    return SG_OK;
}

enum { SG_P_FOUND, SG_P_EMPTY, SG_P_MOVED, SG_P_NONE };

/* Probe table t for a key without binding: SG_P_FOUND (*idx is its slot),
 * SG_P_EMPTY (*idx is the empty slot that ends its path: it is in no table
 * from t on), SG_P_MOVED (*idx is a sealed slot: look in the next table),
 * SG_P_NONE (every slot is bound to other keys), or a negative error. */
static int sg__probe(sg_map *m, const sg__tab *t, const char *key, size_t klen, uint64_t hash, uint64_t *idx)
{
    uint64_t i = hash & t->mask;
    for (uint64_t probe = 0; probe <= t->mask; probe++, i = (i + 1) & t->mask) {
        /* SYNC POINT: key-publish (acquire): the key block a bound head names is visible */
        uint64_t h = sg_load_acquire(&t->slots[i].head);
        *idx = i;
        if (h == 0)
            return SG_P_EMPTY;
        if (h == SG_HEAD_MOVED)
            return SG_P_MOVED;
        int corrupt = 0;
        if (sg__key_is(m, h, key, klen, hash, &corrupt))
            return SG_P_FOUND;
        if (corrupt)
            return sg__fail(SG_ECORRUPT, "map slot %llu names a bad key block", (unsigned long long)i);
    }
    return SG_P_NONE;
}

/* ---- consistent reads of a slot's current block ------------------------- */

typedef struct sg__cur {
    uint64_t ref;     /* the reference the snapshot was taken under (flags included) */
    uint64_t version; /* 0 if never written */
    uint32_t len;     /* value length (0 for a tombstone) */
    int present;      /* a VALUE block (not a tombstone, not never-written) */
    int equal;        /* with a comparand: the value equals it */
} sg__cur;

/* Snapshot the current block of slot s: its version and length, a copy of
 * up to `cap` value bytes into `out` (may be NULL), and whether the value
 * equals `cmp` (may be NULL). The snapshot is consistent: it was all true
 * at the moment ref still held c->ref. A DONE ref is returned as it is,
 * with nothing read: the key's value is in the next table. */
static int sg__read(sg_map *m, sg_slot *s, sg__cur *c, char *out, size_t cap, const char *cmp, size_t cmplen)
{
    for (;;) {
        /* SYNC POINT: value-publish (acquire): pairs with the writer's CAS on
         * ref, so the block it names is filled. */
        uint64_t r = sg_load_acquire(&s->ref);
        memset(c, 0, sizeof *c);
        c->ref = r;
        if (SG_REF_OFF(r) == 0 || (r & SG_REF_DONE))
            return SG_OK;
        sg_block *b = sg__block(m->g, SG_REF_OFF(r));
        if (!b)
            return sg__fail(SG_ECORRUPT, "map value reference points outside the heap");
        uint64_t meta = sg_load_relaxed(&b->meta);
        uint64_t version = sg_load_relaxed(&b->word);
        uint32_t len = SG_META_LEN(meta);
        unsigned kind = SG_META_KIND(meta);
        int sane = (kind == SG_BLK_VALUE || kind == SG_BLK_TOMB) && len <= m->max_value && sg__fits(meta, len);
        int equal = 0;
        if (sane && kind == SG_BLK_VALUE) {
            if (out)
                sg_copy_out(out, b->payload, len < cap ? len : cap);
            if (cmp)
                equal = cmplen == len && sg_compare_shared(b->payload, cmp, len) == 0;
        }
        /* SYNC POINT: block-reuse (acquire): if anything read above came from
         * a writer that reused the block, the ref load below sees the change
         * that retired it. */
        sg_fence_acquire();
        if (sg_load_acquire(&s->ref) != r)
            continue; /* changed under us: the copy may be torn; again */
        /* The ref's 26-bit tag can come round to the same value after 2^26
         * changes while this reader is stalled; the block's version cannot
         * (a key's versions only grow), so a recycled block shows here. */
        if (sg_load_relaxed(&b->word) != version)
            continue;
        if (!sane)
            return sg__fail(SG_ECORRUPT, "map value block has kind %u and length %u", kind, len);
        c->version = version;
        c->len = kind == SG_BLK_VALUE ? len : 0;
        c->present = kind == SG_BLK_VALUE;
        c->equal = equal;
        return SG_OK;
    }
}

/* Read a key from table *t0 on, following migrations: SG_OK with *c (c->ref
 * 0 if the key is in no table), or an error. The table comes by pointer and
 * is copied only when a migration is followed: a copy of the struct per call
 * (just written by sg__tab_at, read back wider) stalled every get on store
 * forwarding, about a tenth of a batch get. */
static int sg__lookup(sg_map *m, const sg__tab *t0, const char *key, size_t klen, uint64_t hash, char *out,
                      size_t cap, sg__cur *c)
{
    const sg__tab *tp = t0;
    sg__tab t; /* the table followed to, once there is one */
    for (;;) {
        uint64_t idx;
        int pr = sg__probe(m, tp, key, klen, hash, &idx);
        if (pr < 0)
            return pr;
        if (pr == SG_P_FOUND) {
            int rc = sg__read(m, &tp->slots[idx], c, out, cap, NULL, 0);
            if (rc || !(c->ref & SG_REF_DONE))
                return rc;
        } else if (pr != SG_P_MOVED) {
            memset(c, 0, sizeof *c); /* EMPTY or NONE: in no table */
            return SG_OK;
        }
        /* MOVED or DONE: the key's authority is the next table */
        sg__tab n;
        int rc = sg__next(m, tp, &n);
        if (rc)
            return rc == SG_NO ? sg__fail(SG_ECORRUPT, "map slot sealed by a migration with no next table") : rc;
        t = n;
        tp = &t;
    }
}

/* ---- epochs: when may a retired table be freed -------------------------- */

static uint64_t *sg__announcement(sg_map *m)
{
    return &((sg_proc *)(m->g->base + SG_PROC_OFF))[m->g->slot].epoch;
}

/* Enter a map operation: announce the global epoch in this process's slot
 * (or count one more thread in, keeping the older epoch). */
int sg__enter(sg_map *m)
{
    sg_grid *g = m->g;
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    if (g->slot >= SG_PROC_SLOTS)
        return sg__fail(SG_EPROCFULL, "this process has no slot in the process table of grid '%s' (it was full)",
                        g->name);
    uint64_t *w = sg__announcement(m);
    uint64_t cur = sg_load_relaxed(w);
    for (;;) {
        if ((cur & 0xffff) == 0xffff)
            return sg__fail(SG_EBUSY, "more than 65534 threads of this process are inside map operations");
        uint64_t want = (cur & 0xffff) ? cur + 1 : (sg_load_seq_cst(&sg__hdr(g)->epoch) << 16) | 1;
        /* SYNC POINT: epoch (announce): seq_cst, ordered before this
         * operation's loads of the map's table (sg__head). */
        if (sg_cas_seq_cst(w, &cur, want))
            return SG_OK;
    }
}

static void sg__reclaim(sg_map *m);

void sg__exit(sg_map *m)
{
    if (m->g->slot >= SG_PROC_SLOTS)
        return; /* sg__enter refused: nothing to undo */
    /* release: this operation's reads of a table happen before a
     * reclaimer sees the count drop and frees it */
    sg_fetch_sub_release(sg__announcement(m), 1);
    if (sg_load_relaxed(&m->hdr->retired) && sg_countdown(&m->reclaim_countdown) <= 0) {
        sg_countdown_set(&m->reclaim_countdown, 64);
        sg__reclaim(m);
    }
}

/* Is every process inside a map operation past epoch e (or dead)? */
static int sg__quiescent(sg_grid *g, uint64_t e)
{
    sg_proc *procs = (sg_proc *)(g->base + SG_PROC_OFF);
    for (uint32_t i = 0; i < SG_PROC_SLOTS; i++) {
        /* SYNC POINT: epoch (scan) */
        uint64_t w = sg_load_seq_cst(&procs[i].epoch);
        if ((w & 0xffff) == 0 || (w >> 16) >= e)
            continue;
        uint64_t owner = sg_load_acquire(&procs[i].owner);
        if (owner && sg__word_alive(owner))
            return 0;
    }
    return 1;
}

static void sg__retire_push(sg_map *m, const sg__tab *t)
{
    uint64_t head = sg_load_relaxed(&m->hdr->retired);
    do {
        sg_store_relaxed(&t->h->retired_next, head);
        /* release: publishes retired_next and retired_epoch to the reclaimer */
    } while (!sg_cas_release(&m->hdr->retired, &head, t->off));
}

#define SG_RECLAIM_SLICE 65536u /* slots a reclaimer walks per call, to bound its pause */

/* Free the key blocks of the keys a retired table dropped (the copied ones
 * now belong to the next table), one slice of slots per call, so freeing a
 * large table never pauses a writer long. Each slot is marked before its
 * key block is freed, so a reclaimer killed mid-walk leaks at most one
 * block and never frees one twice. The table itself goes once this is done. */
static void sg__drop_keys_slice(sg_map *m, const sg__tab *t)
{
    {
        uint64_t i = sg_load_relaxed(&t->h->reclaim_pos), end = i + SG_RECLAIM_SLICE;
        for (; i <= t->mask && i < end; i++) {
            sg_slot *s = &t->slots[i];
            uint64_t h = sg_load_relaxed(&s->head), r = sg_load_relaxed(&s->ref);
            if (h != 0 && h != SG_HEAD_MOVED && (r & SG_REF_DONE) && SG_REF_OFF(r) == 0) {
                sg_store_relaxed(&s->head, SG_HEAD_MOVED);
                sg__free(m->g, SG_HEAD_OFF(h));
            }
        }
        sg_store_relaxed(&t->h->reclaim_pos, i);
    }
}

/* Free the retired tables no process can still be reading, one at a time:
 * unlink it, then free it, so a reclaimer killed at any point loses at most
 * the one table it was freeing. One reclaimer at a time (a claim word in
 * the map header; a dead claimant's claim is taken over). Retirers only
 * ever push at the head, so links past the head are the claimant's alone. */
static void sg__reclaim(sg_map *m)
{
    sg_map_hdr *mh = m->hdr;
    uint64_t cur = sg_load_acquire(&mh->reclaimer);
    if (cur && (cur == m->g->self || sg__word_alive(cur)))
        return; /* someone is at it */
    if (!sg_cas_acq_rel(&mh->reclaimer, &cur, m->g->self))
        return;
    uint64_t *link = &mh->retired;
    for (uint64_t k = 0; k < (1u << 20); k++) {
        uint64_t off = sg_load_acquire(link);
        if (!off)
            break;
        sg__tab t;
        if (sg__tab_at(m, off, &t))
            break; /* damaged list: leak rather than guess */
        uint64_t after = sg_load_relaxed(&t.h->retired_next);
        if (!sg__quiescent(m->g, sg_load_relaxed(&t.h->retired_epoch)) ||
            (sg_load_relaxed(&t.h->dropped) && sg_load_relaxed(&t.h->reclaim_pos) <= t.mask)) {
            /* not yet; or free its dropped keys a slice at a time first */
            if (sg__quiescent(m->g, sg_load_relaxed(&t.h->retired_epoch)))
                sg__drop_keys_slice(m, &t);
            link = &t.h->retired_next;
            continue;
        }
        /* Unlink: the head by CAS (retirers push there), others by store. */
        if (link == &mh->retired) {
            uint64_t expected = off;
            if (!sg_cas_acq_rel(link, &expected, after))
                continue; /* a retirer pushed: look again from the new head */
        } else {
            sg_store_release(link, after);
        }
        sg__free(m->g, t.off);
    }
    uint64_t mine = m->g->self;
    sg_cas_acq_rel(&mh->reclaimer, &mine, 0);
}

/* ---- migration ---------------------------------------------------------- */

static void sg__raise_floor(sg_map *m, uint64_t version)
{
    uint64_t cur = sg_load_relaxed(&m->hdr->version_floor);
    while (cur < version && !sg_cas_acq_rel(&m->hdr->version_floor, &cur, version))
        ;
}

/* Bind the key of head h in table n (the same key block) and give it the
 * value block `off`, unless a copier already did. */
static int sg__copy_into(sg_map *m, const sg__tab *n, uint64_t h, uint64_t off)
{
    sg_block *kb = sg__block(m->g, SG_HEAD_OFF(h));
    if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY || !sg__fits(kb->meta, SG_META_LEN(kb->meta)))
        return sg__fail(SG_ECORRUPT, "migration: a slot names a bad key block");
    const char *key = (const char *)kb->payload;
    size_t klen = SG_META_LEN(kb->meta);
    uint64_t hash = kb->word, i = hash & n->mask;
    for (uint64_t probe = 0; probe <= n->mask; probe++, i = (i + 1) & n->mask) {
        sg_slot *s = &n->slots[i];
        uint64_t cur = sg_load_acquire(&s->head);
        if (cur == 0) {
            /* Copies are not held to slot_limit: inserters leave room for
             * every slot still to copy (sg__find_latest). */
            sg_fetch_add_relaxed(&n->h->used, 1);
            /* SYNC POINT: key-publish (release) */
            if (sg_cas_release(&s->head, &cur, h))
                goto bound;
            sg_fetch_sub_relaxed(&n->h->used, 1);
            cur = sg_load_acquire(&s->head);
        }
        int corrupt = 0;
        if (cur == h || sg__key_is(m, cur, key, klen, hash, &corrupt))
            goto bound;
        if (corrupt || cur == SG_HEAD_MOVED)
            return sg__fail(SG_ECORRUPT, "migration: bad slot %llu in the next table", (unsigned long long)i);
        continue;
    bound:;
        uint64_t expected = 0;
        /* SYNC POINT: value-publish (release). If it fails, a copier or a
         * writer (who only writes here after the old slot is DONE) set it. */
        sg_cas_release(&s->ref, &expected, SG_REF(1, off));
        return SG_OK;
    }
    return sg__fail(SG_ECORRUPT, "migration: the next table has no free slot");
}

/* Make slot i of table t final: MOVED, or DONE with the key's value (if
 * any) bound in the next table n. Idempotent: any number of processes may
 * run it on one slot at once, and one killed half-way leaves a state that
 * the next caller finishes. */
static int sg__copy_slot(sg_map *m, const sg__tab *t, const sg__tab *n, uint64_t i)
{
    sg_slot *s = &t->slots[i];
    uint64_t h = sg_load_acquire(&s->head);
    if (h == 0 && sg_cas_acq_rel(&s->head, &h, SG_HEAD_MOVED))
        return SG_OK; /* sealed: no key binds here any more */
    if (h == SG_HEAD_MOVED)
        return SG_OK;
    uint64_t r = sg_load_acquire(&s->ref);
    while (!(r & SG_REF_FROZEN))
        if (sg_cas_acq_rel(&s->ref, &r, r | SG_REF_FROZEN))
            r |= SG_REF_FROZEN;
    if (r & SG_REF_DONE)
        return SG_OK;

    /* Frozen: only copiers change this ref now, and only to DONE. Its block
     * is not retired before DONE, but a copier that got there first may
     * have freed a tombstone, so read the block, then check the ref is
     * still this one (SYNC POINT: block-reuse). */
    uint64_t off = SG_REF_OFF(r), done = (r & ~SG_OFF_MASK) | SG_REF_DONE; /* dropped: offset 0 */
    int tomb = 0;
    if (off) {
        sg_block *b = sg__block(m->g, off);
        if (!b)
            return sg__fail(SG_ECORRUPT, "migration: a value reference points outside the heap");
        uint64_t meta = sg_load_relaxed(&b->meta), version = sg_load_relaxed(&b->word);
        sg_fence_acquire();
        /* acquire: if another copier finished the slot, what it did before
         * its DONE (the copy, the floor) is visible to our caller */
        if (sg_load_acquire(&s->ref) != r)
            return SG_OK;
        if (SG_META_KIND(meta) == SG_BLK_VALUE) {
            int rc = sg__copy_into(m, n, h, off);
            if (rc)
                return rc;
            done = r | SG_REF_DONE; /* keeps the offset: the key block now belongs to n */
        } else if (SG_META_KIND(meta) == SG_BLK_TOMB) {
            sg__raise_floor(m, version); /* before DONE: see sg__apply's first version */
            tomb = 1;
        } else {
            return sg__fail(SG_ECORRUPT, "migration: a value reference names a block of kind %u",
                            SG_META_KIND(meta));
        }
    }
    if (sg_cas_acq_rel(&s->ref, &r, done)) {
        if (!SG_REF_OFF(done))
            sg_fetch_add_relaxed(&t->h->dropped, 1);
        if (tomb)
            sg__free(m->g, off); /* unreachable now; stale readers re-validate */
    }
    return SG_OK;
}

/* Swing the map header from t to its next table, once every chunk of t is
 * copied, and retire t. Idempotent. */
static void sg__promote(sg_map *m, const sg__tab *t)
{
    uint64_t expected = t->off, next = sg_load_acquire(&t->h->next);
    /* SYNC POINT: epoch (swing): seq_cst, before the epoch bump below */
    if (!sg_cas_seq_cst(&m->hdr->table, &expected, next))
        return;
    uint64_t e = sg_fetch_add_seq_cst(&sg__hdr(m->g)->epoch, 1) + 1;
    sg_store_relaxed(&t->h->retired_epoch, e);
    sg__retire_push(m, t);
    sg_countdown_set(&m->reclaim_countdown, 0);
}

/* Copy one chunk of t into n (the next not yet done, round-robin). */
static int sg__help(sg_map *m, const sg__tab *t, const sg__tab *n)
{
    if (sg_load_acquire(&t->h->chunks_done) >= t->nchunks) {
        sg__promote(m, t);
        return SG_OK;
    }
    for (uint64_t tries = 0; tries < t->nchunks; tries++) {
        uint64_t k = sg_fetch_add_relaxed(&t->h->copy_claim, 1) % t->nchunks;
        uint64_t *word = &t->bitmap[k / 64], bit = 1ull << (k % 64);
        if (sg_load_acquire(word) & bit)
            continue;
        for (uint64_t i = k * t->chunk; i < (k + 1) * t->chunk; i++) {
            int rc = sg__copy_slot(m, t, n, i);
            if (rc)
                return rc;
        }
        /* SYNC POINT: chunk-done: acq_rel, so whoever sees the bit (or the
         * count) and promotes sees every slot of the chunk final. */
        if (!(sg_fetch_or_acq_rel(word, bit) & bit) &&
            sg_fetch_add_seq_cst(&t->h->chunks_done, 1) + 1 == t->nchunks)
            sg__promote(m, t);
        return SG_OK;
    }
    /* Every chunk claimed came up copied. The count lags if a helper was
     * killed between its bit and its count: the bitmap is the truth. */
    for (uint64_t k = 0; k < t->nchunks; k += 64) {
        uint64_t left = t->nchunks - k, full = left >= 64 ? ~0ull : (1ull << left) - 1;
        if ((sg_load_acquire(&t->bitmap[k / 64]) & full) != full)
            return SG_OK;
    }
    sg__promote(m, t);
    return SG_OK;
}

#define SG_LIVE_SAMPLE 512u /* slots sampled: +-4%, well inside the 1.5x sizing margin; two misses each */

/* How many keys the copy of t may bring. The live counter alone will not
 * do: it is off by one per writer killed between its CAS and its count,
 * and a table sized from an undercount could hold its copies only just.
 * So: the larger of the counter and a count of present keys in
 * SG_LIVE_SAMPLE slots spread over t (all slots if `exact`). Values are read
 * without the re-check: an estimate, not a snapshot. */
static uint64_t sg__estimate_live(sg_map *m, const sg__tab *t, int exact)
{
    uint64_t n = t->mask + 1, step = exact || n <= SG_LIVE_SAMPLE ? 1 : n / SG_LIVE_SAMPLE, present = 0, looked = 0;
    uint64_t first = (t->h->generation * 0x9e3779b97f4a7c15ull) % step; /* a different sample each table */
    for (uint64_t i = first; i < n; i += step, looked++) {
        uint64_t h = sg_load_acquire(&t->slots[i].head), r = sg_load_acquire(&t->slots[i].ref);
        sg_block *b;
        if (h != 0 && h != SG_HEAD_MOVED && SG_REF_OFF(r) && !(r & SG_REF_DONE) &&
            (b = sg__block(m->g, SG_REF_OFF(r))) && SG_META_KIND(sg_load_relaxed(&b->meta)) == SG_BLK_VALUE)
            present++;
    }
    uint64_t est = looked ? present * n / looked : 0; /* present <= 512, n <= 2^36: no overflow */
    int64_t counted = (int64_t)sg_load_relaxed(&m->hdr->live);
    return exact || counted < 0 || (uint64_t)counted < est ? est : (uint64_t)counted;
}

/* Slots for the table t migrates to: room for the keys it holds and half
 * as many again (so a table that filled doubles), never above max_slots.
 * It never shrinks: every copy of t then fits, whatever the estimate. A
 * compaction counts the keys exactly (an automatic migration samples). */
static int sg__next_size(sg_map *m, const sg__tab *t, int compact, uint64_t *nslots)
{
    uint64_t live = sg__estimate_live(m, t, compact);
    uint64_t maxcap = m->hdr->max_capacity, max = m->hdr->max_slots;
    if (maxcap && live >= maxcap)
        return sg__fail(SG_EFULL, "map is full: %llu keys present, its max_capacity is %llu",
                        (unsigned long long)live, (unsigned long long)maxcap);
    uint64_t want = t->mask + 1;
    while (sg__slot_limit(want) < live + live / 2 + 64 && (!max || want < max))
        want <<= 1;
    *nslots = want;
    return SG_OK;
}

/* Begin migrating t, the head table, unless a migration already began. */
static int sg__start_migration(sg_map *m, const sg__tab *t, int compact)
{
    if (sg_load_acquire(&t->h->next))
        return SG_OK;
    uint64_t nslots = 0, off;
    int fresh;
    int rc = sg__next_size(m, t, compact, &nslots);
    if (rc)
        return rc;
    uint64_t bytes = sg__table_bytes(nslots);
    rc = sg__alloc(m->g, bytes, &off, &fresh);
    if (rc)
        return sg__fail(SG_EFULL, "map cannot grow: the grid heap has no room for a table of %llu slots (%llu "
                                  "bytes); create the grid with a larger size",
                        (unsigned long long)nslots, (unsigned long long)bytes);
    sg_block *b = (sg_block *)(m->g->base + off);
    sg_table_hdr *h = (sg_table_hdr *)b->payload;
    if (!fresh) /* carved memory is zero; recycled memory is not */
        memset(h, 0, bytes);
    h->nslots = nslots;
    h->generation = t->h->generation + 1;
    h->slot_limit = sg__slot_limit(nslots);
    sg_store_relaxed(&b->meta, SG_META(SG_META_CLASS(sg_load_relaxed(&b->meta)), SG_BLK_TABLE, bytes));
    uint64_t expected = 0;
    /* SYNC POINT: table-publish (release): the table is initialized */
    if (!sg_cas_release(&t->h->next, &expected, off))
        sg__free(m->g, off); /* another process began it first */
    return SG_OK;
}

/* Help until no migration is under way. */
static int sg__finish(sg_map *m)
{
    for (;;) {
        int rc = sg__enter(m);
        if (rc)
            return rc;
        sg__tab t, n;
        rc = sg__head(m, &t);
        if (rc == SG_OK) {
            rc = sg__next(m, &t, &n);
            if (rc == SG_OK)
                rc = sg__help(m, &t, &n);
            else if (rc == SG_NO) {
                sg__exit(m);
                return SG_OK;
            }
        }
        sg__exit(m);
        if (rc)
            return rc;
    }
}

/* ---- finding the slot to write ------------------------------------------ */

/* Find or bind a key's slot in t, the latest table. p is t's predecessor
 * while it still migrates into t (else NULL): inserts then leave room for
 * every slot of p not yet copied, so copies always find a free slot.
 * Returns SG_OK (*out), SG_NO (absent, no insert), SG_AGAIN, SG_NEED_ROOM,
 * or an error. */
static int sg__find_latest(sg_map *m, const sg__tab *t, const sg__tab *p, const char *key, size_t klen,
                           uint64_t hash, int insert, sg_slot **out)
{
    sg_grid *g = m->g;
    uint64_t i = hash & t->mask;
    uint64_t newkey = 0; /* our unpublished key block, if we made one */
    int reserved = 0, fresh, rc;

    for (uint64_t probe = 0; probe <= t->mask; probe++, i = (i + 1) & t->mask) {
        sg_slot *s = &t->slots[i];
        /* SYNC POINT: key-publish (acquire) */
        uint64_t h = sg_load_acquire(&s->head);
        if (h == 0) {
            if (!insert)
                return SG_NO;
            if (!reserved) {
                uint64_t need = 1;
                if (p)
                    need += (p->nchunks - sg_load_acquire(&p->h->chunks_done)) * p->chunk;
                if (sg_fetch_add_relaxed(&t->h->used, 1) + need > t->h->slot_limit) {
                    sg_fetch_sub_relaxed(&t->h->used, 1);
                    rc = SG_NEED_ROOM;
                    goto fail;
                }
                reserved = 1;
            }
            if (!newkey) {
                rc = sg__alloc(g, klen, &newkey, &fresh);
                if (rc)
                    goto fail;
                /* Relaxed word stores: the block may be recycled, with a
                 * stale reader of its previous life still copying it
                 * (SYNC POINT: block-reuse). */
                sg_block *kb = (sg_block *)(g->base + newkey);
                sg_store_relaxed(&kb->word, hash);
                sg_copy_in(kb->payload, key, klen);
                sg_store_relaxed(&kb->meta, SG_META(SG_META_CLASS(sg_load_relaxed(&kb->meta)), SG_BLK_KEY, klen));
            }
            /* SYNC POINT: key-publish (release): the key block written above
             * is visible to whoever acquires this head. */
            if (sg_cas_release(&s->head, &h, SG_HEAD(hash, newkey))) {
                /* Past half full, each insert backs 2 MiB more of the next
                 * table's pages, so the put that starts the migration does
                 * not fallocate the whole table at once. */
                if (!p && sg_load_relaxed(&t->h->used) > t->h->slot_limit / 2)
                    sg__prepare(g, sg__block_bytes(sg__table_bytes(2 * (t->mask + 1))));
                *out = s;
                return SG_OK;
            }
            h = sg_load_acquire(&s->head); /* lost the slot: whose is it? */
        }
        if (h == SG_HEAD_MOVED) {
            rc = SG_AGAIN; /* a migration of t began */
            goto fail;
        }
        int corrupt = 0;
        if (sg__key_is(m, h, key, klen, hash, &corrupt)) {
            if (newkey)
                sg__free(g, newkey);
            if (reserved)
                sg_fetch_sub_relaxed(&t->h->used, 1);
            *out = s;
            return SG_OK;
        }
        if (corrupt) {
            rc = sg__fail(SG_ECORRUPT, "map slot %llu names a bad key block", (unsigned long long)i);
            goto fail;
        }
    }
    rc = insert ? SG_NEED_ROOM : SG_NO;
fail:
    if (newkey)
        sg__free(g, newkey);
    if (reserved)
        sg_fetch_sub_relaxed(&t->h->used, 1);
    return rc;
}

/* Make the key's slot in a migrating table t final, so that the next table
 * is its only authority. */
static int sg__settle_key(sg_map *m, const sg__tab *t, const sg__tab *n, const char *key, size_t klen,
                          uint64_t hash)
{
    for (;;) {
        uint64_t idx;
        int pr = sg__probe(m, t, key, klen, hash, &idx);
        if (pr < 0)
            return pr;
        if (pr == SG_P_MOVED || pr == SG_P_NONE)
            return SG_OK;
        int rc = sg__copy_slot(m, t, n, idx); /* FOUND: copy it; EMPTY: seal it */
        if (rc || pr == SG_P_FOUND)
            return rc;
        /* the empty slot was bound meanwhile (and is now copied): probe on */
    }
}

/* The slot a write of the key goes to: in the latest table, after helping
 * any migration and settling the key in older tables. */
static int sg__locate(sg_map *m, const char *key, size_t klen, uint64_t hash, int insert, sg__tab *lt,
                      sg_slot **out)
{
    for (;;) {
        sg__tab t, n, p;
        int has_p = 0;
        int rc = sg__head(m, &t);
        if (rc)
            return rc;
        while ((rc = sg__next(m, &t, &n)) == SG_OK) {
            rc = sg__help(m, &t, &n);
            if (!rc)
                rc = sg__settle_key(m, &t, &n, key, klen, hash);
            if (rc)
                return rc;
            p = t;
            has_p = 1;
            t = n;
        }
        if (rc != SG_NO)
            return rc;
        rc = sg__find_latest(m, &t, has_p ? &p : NULL, key, klen, hash, insert, out);
        if (rc == SG_NEED_ROOM) {
            /* Grow (or clean) the head table; or, while an older migration
             * still fills t, help it along first. */
            rc = has_p ? sg__help(m, &p, &t) : sg__start_migration(m, &t, 0);
            if (rc)
                return rc;
            continue;
        }
        if (rc != SG_AGAIN) {
            *lt = t;
            return rc;
        }
    }
}

/* ---- updates ------------------------------------------------------------ */

enum sg__op { OP_PUT, OP_PUT_IF_ABSENT, OP_REPLACE, OP_CAS_VERSION, OP_DELETE, OP_INCR, OP_APPLY };

typedef struct sg__update {
    enum sg__op op;
    const char *val; /* new value (PUT, PUT_IF_ABSENT, REPLACE, CAS_VERSION) */
    size_t vlen;
    const char *expected; /* REPLACE */
    size_t elen;
    uint64_t expected_version; /* CAS_VERSION; 0 = the key must be absent */
    int64_t delta;             /* INCR */
    int tombstone;             /* APPLY: the owner's state is a delete */
    int force;                 /* APPLY: store a version-0 tombstone whatever the key holds (reset) */
    char *old;                 /* DELETE: where to copy the removed value (may be NULL) */
    size_t oldcap;
    /* results */
    uint64_t version; /* the key's version after the call (or its current one, for SG_NO) */
    size_t oldlen;
    int64_t result; /* INCR */
} sg__update;

static void sg__count(sg_map *m, int was, int now)
{
    if (!was && now)
        sg_fetch_add_relaxed(&m->hdr->live, 1);
    else if (was && !now)
        sg_fetch_sub_relaxed(&m->hdr->live, 1);
}

/* Decide, from a consistent snapshot of the key, whether the update goes
 * ahead (1), is refused (0), or fails (negative). */
static int sg__decide(sg__update *u, const sg__cur *c, int64_t cur, sg_block *nb)
{
    switch (u->op) {
    case OP_PUT:
        return 1;
    case OP_PUT_IF_ABSENT:
        return !c->present;
    case OP_REPLACE:
        return c->present && c->equal;
    case OP_CAS_VERSION:
        return u->expected_version == 0 ? !c->present : (c->present && c->version == u->expected_version);
    case OP_DELETE:
        u->oldlen = c->len;
        return c->present;
    case OP_APPLY:
        /* a mirror taking the owner's state: only what is newer; a reset
         * forgets the key, whatever version it held */
        return u->force ? c->version != 0 : u->expected_version > c->version;
    case OP_INCR:
        if (c->present && c->len != 8)
            return sg__fail(SG_ENOTINT, "incr: the key holds a %u-byte value, not an 8-byte int64", c->len);
        /* values are stored little-endian; every supported host is */
        if (__builtin_add_overflow(cur, u->delta, &u->result))
            return sg__fail(SG_EOVERFLOW, "incr: %lld + %lld overflows int64", (long long)cur, (long long)u->delta);
        sg_copy_in(nb->payload, &u->result, 8);
        return 1;
    }
    return 0;
}

/* What a damaged descriptor reads as: no partition is owned here (see
 * sg__is_remote: partitions 0 means every key is remote). */
static const sg_mirror_desc sg__damaged;

const sg_mirror_desc *sg__mirror(sg_map *m)
{
    /* SYNC POINT: mirror-desc (acquire) */
    uint64_t off = sg_load_acquire(&m->hdr->mirror);
    if (!off)
        return NULL;
    sg_block *b = sg__block(m->g, off);
    /* Damaged: refuse every write here, so that callers go through the
     * bridge, which knows the owners from its configuration (and, for a
     * key owned here, sets the descriptor again before applying it).
     * Failing open would let a local write land in a partition owned
     * elsewhere, where the owner's next version silently overwrites it. */
    if (!b)
        return &sg__damaged;
    const sg_mirror_desc *d = (const sg_mirror_desc *)b->payload;
    if (!d->partitions || sizeof *d + (d->partitions - 1) / 8 >= SG_META_LEN(b->meta))
        return &sg__damaged;
    return d;
}

/* Whether a key of this hash belongs to a partition another host owns. */
static int sg__remote(sg_map *m, uint64_t hash)
{
    return sg__is_remote(sg__mirror(m), hash);
}

static int sg__apply_in(sg_map *m, const char *key, size_t klen, uint64_t hash, sg__update *u);

static int sg__apply(sg_map *m, const char *key, size_t klen, sg__update *u)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    int rc = sg__check_key(m, klen);
    if (rc)
        return rc;
    size_t vlen = u->op == OP_INCR ? 8 : u->op == OP_DELETE || (u->op == OP_APPLY && u->tombstone) ? 0 : u->vlen;
    if (vlen > m->max_value)
        return sg__fail(SG_EVALSIZE, "value of %zu bytes exceeds this map's max_value of %u bytes", vlen,
                        m->max_value);
    if (u->op == OP_INCR && m->max_value < 8)
        return sg__fail(SG_EVALSIZE, "incr needs 8-byte values; this map's max_value is %u", m->max_value);

    uint64_t hash = sg_hash64(key, klen);
    if (u->op != OP_APPLY && sg__remote(m, hash))
        return sg__fail_const(SG_EREMOTE, "the key's partition is owned by another host: write through the bridge");
    rc = sg__enter(m);
    if (rc)
        return rc;
    rc = sg__apply_in(m, key, klen, hash, u);
    sg__exit(m);
    return rc;
}

/* The update itself, inside sg__enter, with the lengths and the key's
 * partition checked (by sg__apply, or for each element by batch.c). */
static int sg__apply_in(sg_map *m, const char *key, size_t klen, uint64_t hash, sg__update *u)
{
    size_t vlen = u->op == OP_INCR ? 8 : u->op == OP_DELETE || (u->op == OP_APPLY && u->tombstone) ? 0 : u->vlen;
    int creates = u->op == OP_PUT || u->op == OP_PUT_IF_ABSENT || u->op == OP_INCR || u->op == OP_APPLY ||
                  (u->op == OP_CAS_VERSION && u->expected_version == 0);

    /* The new block, filled except for its version (and the INCR value). */
    uint64_t nb_off;
    int fresh;
    int rc = sg__alloc(m->g, vlen, &nb_off, &fresh);
    if (rc)
        return rc;
    sg_block *nb = (sg_block *)(m->g->base + nb_off);
    unsigned kind = u->op == OP_DELETE || (u->op == OP_APPLY && u->tombstone) ? SG_BLK_TOMB : SG_BLK_VALUE;
    sg_store_relaxed(&nb->meta, SG_META(SG_META_CLASS(sg_load_relaxed(&nb->meta)), kind, vlen));
    if (kind == SG_BLK_VALUE && u->op != OP_INCR)
        sg_copy_in(nb->payload, u->val, vlen);

    for (;;) {
        sg_slot *s = NULL;
        sg__tab t;
        rc = sg__locate(m, key, klen, hash, creates, &t, &s);
        if (rc == SG_NO)
            u->version = 0; /* DELETE/REPLACE/CAS of a key in no table */
        if (rc)
            break;
        for (;;) {
            sg__cur c;
            int64_t cur = 0;
            char *copy = u->op == OP_INCR ? (char *)&cur : u->op == OP_DELETE ? u->old : NULL;
            size_t cap = u->op == OP_INCR ? sizeof cur : u->op == OP_DELETE ? u->oldcap : 0;
            rc = sg__read(m, s, &c, copy, cap, u->op == OP_REPLACE ? u->expected : NULL, u->elen);
            if (rc)
                goto out;
            if (c.ref & (SG_REF_FROZEN | SG_REF_DONE)) {
                /* A migration took the slot: locate again. Copiers freeze
                 * only after the next table is published (acquire chain),
                 * so a frozen slot in a table with none is damage. */
                if (!sg_load_acquire(&t.h->next)) {
                    rc = sg__fail(SG_ECORRUPT, "map slot is frozen, yet its table has no migration");
                    goto out;
                }
                break;
            }
            int go = sg__decide(u, &c, cur, nb);
            if (go < 0) {
                rc = go;
                goto out;
            }
            if (!go) {
                u->version = c.version;
                rc = SG_NO;
                goto out;
            }
            /* A key never written in this table starts above every version
             * a migration forgot (SYNC POINT: the floor was raised before
             * the DONE we passed through, acq_rel). */
            uint64_t version = c.ref ? c.version + 1 : sg_load_acquire(&m->hdr->version_floor) + 1;
            if (u->op == OP_APPLY)
                version = u->expected_version; /* the owner's version as it is (0 for a reset) */
            sg_store_relaxed(&nb->word, version);
            uint64_t r = c.ref;
            /* The snapshot's block must still carry the version we decided
             * on: narrows the window in which a stall outlasting 2^26
             * changes could bring the same ref back (see README). */
            if (c.ref) {
                sg_block *ob = sg__block(m->g, SG_REF_OFF(c.ref));
                if (!ob) {
                    rc = sg__fail(SG_ECORRUPT, "map value reference points outside the heap");
                    goto out;
                }
                if (sg_load_acquire(&ob->word) != c.version)
                    continue;
            }
            /* SYNC POINT: value-publish (release): the new block's meta,
             * version and payload are visible to every reader that acquires
             * ref. Acquire on success orders our free of the old block after
             * the CAS. */
            if (sg_cas_acq_rel(&s->ref, &r, SG_REF(SG_REF_TAG(c.ref) + 1, nb_off))) {
                if (c.ref)
                    sg__free(m->g, SG_REF_OFF(c.ref));
                sg__count(m, c.present, kind == SG_BLK_VALUE);
                u->version = version;
                sg__feed_append(m, hash, SG_HEAD_OFF(sg_load_relaxed(&s->head)), u->version, kind == SG_BLK_TOMB);
                return SG_OK;
            }
            /* Someone else changed the key: decide again on the new state. */
        }
    }
out:
    sg__free(m->g, nb_off); /* never published */
    return rc;
}

/* The single-key steps of the batch calls (batch.c): inside sg__enter,
 * lengths and partition checked, hash given. */
int sg__put_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, const char *val, size_t vlen,
                    uint64_t *version)
{
    sg__update u = {.op = OP_PUT, .val = val, .vlen = vlen};
    int rc = sg__apply_in(m, key, klen, hash, &u);
    *version = u.version;
    return rc;
}

int sg__delete_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, uint64_t *version)
{
    sg__update u = {.op = OP_DELETE};
    int rc = sg__apply_in(m, key, klen, hash, &u);
    *version = u.version;
    return rc;
}

int sg__incr_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, int64_t delta, int64_t *result,
                     uint64_t *version)
{
    sg__update u = {.op = OP_INCR, .delta = delta};
    int rc = sg__apply_in(m, key, klen, hash, &u);
    *result = u.result;
    *version = u.version;
    return rc;
}

/* ---- public entry points ------------------------------------------------ */

int sg_map_put(sg_map *m, const char *key, size_t klen, const char *val, size_t vlen, uint64_t *version)
{
    sg__update u = {.op = OP_PUT, .val = val, .vlen = vlen};
    int rc = sg__apply(m, key, klen, &u);
    if (version)
        *version = u.version;
    return rc;
}

int sg_map_put_if_absent(sg_map *m, const char *key, size_t klen, const char *val, size_t vlen,
                         uint64_t *version)
{
    sg__update u = {.op = OP_PUT_IF_ABSENT, .val = val, .vlen = vlen};
    int rc = sg__apply(m, key, klen, &u);
    if (version)
        *version = u.version;
    return rc;
}

int sg_map_replace(sg_map *m, const char *key, size_t klen, const char *expected, size_t elen, const char *val,
                   size_t vlen, uint64_t *version)
{
    sg__update u = {.op = OP_REPLACE, .val = val, .vlen = vlen, .expected = expected, .elen = elen};
    int rc = sg__apply(m, key, klen, &u);
    if (version)
        *version = u.version;
    return rc;
}

int sg_map_compare_and_set(sg_map *m, const char *key, size_t klen, uint64_t expected_version, const char *val,
                           size_t vlen, uint64_t *version)
{
    sg__update u = {.op = OP_CAS_VERSION, .val = val, .vlen = vlen, .expected_version = expected_version};
    int rc = sg__apply(m, key, klen, &u);
    if (version)
        *version = u.version;
    return rc;
}

int sg_map_delete(sg_map *m, const char *key, size_t klen, char *out, size_t cap, size_t *len, uint64_t *version)
{
    sg__update u = {.op = OP_DELETE, .old = out, .oldcap = cap};
    int rc = sg__apply(m, key, klen, &u);
    if (len)
        *len = u.oldlen;
    if (version)
        *version = u.version;
    return rc;
}

int sg_map_incr(sg_map *m, const char *key, size_t klen, int64_t delta, int64_t *result, uint64_t *version)
{
    sg__update u = {.op = OP_INCR, .delta = delta};
    int rc = sg__apply(m, key, klen, &u);
    if (result)
        *result = u.result;
    if (version)
        *version = u.version;
    return rc;
}

int64_t sg__get_entered(sg_map *m, sg__tab *head, const char *key, size_t klen, uint64_t hash, char *out,
                        size_t cap, uint64_t *version)
{
    sg__tab own, *t = head ? head : &own;
    sg__cur c;
    /* SYNC POINT: epoch (load), as in sg__head. The head is loaded for every
     * key, so each starts where the single call would; a cached table is
     * only spared sg__tab_at's checks: seen as head after this process
     * entered, it can be neither freed nor changed before sg__exit. */
    uint64_t off = sg_load_seq_cst(&m->hdr->table);
    int rc = head && off == head->off ? SG_OK : sg__tab_at(m, off, t);
    if (rc && head)
        head->off = 0; /* nothing cached */
    if (!rc)
        rc = sg__lookup(m, t, key, klen, hash, out, cap, &c);
    if (rc)
        return rc;
    if (version)
        *version = c.version;
    return c.present ? (int64_t)c.len : SG_ENOKEY;
}

int64_t sg_map_get(sg_map *m, const char *key, size_t klen, char *out, size_t cap, uint64_t *version)
{
    int rc = sg__check_key(m, klen);
    if (rc)
        return rc;
    uint64_t hash = sg_hash64(key, klen);
    rc = sg__enter(m);
    if (rc)
        return rc;
    int64_t n = sg__get_entered(m, NULL, key, klen, hash, out, cap, version);
    sg__exit(m);
    return n;
}


int64_t sg_map_len(sg_map *m)
{
    if (!m || !m->g || !m->g->base)
        return SG_ECLOSED;
    int64_t n = (int64_t)sg_load_relaxed(&m->hdr->live);
    return n < 0 ? 0 : n;
}

int sg_map_compact(sg_map *m)
{
    int rc = sg__finish(m);
    if (rc)
        return rc;
    rc = sg__enter(m);
    if (rc)
        return rc;
    sg__tab t;
    rc = sg__head(m, &t);
    if (!rc)
        rc = sg__start_migration(m, &t, 1);
    sg__exit(m);
    if (!rc)
        rc = sg__finish(m);
    if (!rc)
        sg__reclaim(m);
    return rc;
}

/* ---- iteration ---------------------------------------------------------- */

struct sg_iter {
    sg_map *m;
    pid_t pid;      /* the process that pinned: a forked child holds no pin */
    uint64_t table; /* the head table when the walk began, with no migration under way */
    uint64_t next;  /* next slot to visit */
    int pinned;     /* inside sg__enter: the walked table cannot be freed */
};

int sg_iter_open(sg_map *m, sg_iter **out)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    sg_iter *it = calloc(1, sizeof *it);
    if (!it)
        return sg__fail(SG_ENOMEM, "out of process memory");
    /* Walk a table with no migration under way, so every key present now is
     * bound in it; stay entered so it outlives any migration during the walk. */
    for (int tries = 0;; tries++) {
        int rc = sg__finish(m);
        if (!rc)
            rc = sg__enter(m);
        if (rc) {
            free(it);
            return rc;
        }
        sg__tab t, n;
        rc = sg__head(m, &t);
        if (!rc && (sg__next(m, &t, &n) == SG_NO || tries >= 8)) {
            it->m = m;
            it->pid = getpid();
            it->table = t.off;
            it->pinned = 1;
            *out = it;
            return SG_OK;
        }
        sg__exit(m);
        if (rc) {
            free(it);
            return rc;
        }
    }
}

int sg_map_set_mirror(sg_map *m, uint32_t partitions, const uint8_t *local_mask)
{
    if (!m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    if (partitions > SG_MAX_PARTITIONS)
        return sg__fail(SG_EINVAL, "partitions %u is over the limit of %u", partitions, SG_MAX_PARTITIONS);
    uint64_t off = 0;
    if (partitions) {
        sg_mirror_desc *d;
        size_t bytes = (partitions + 7) / 8;
        /* A bridge restarted with the same configuration keeps the
         * descriptor. A changed one gets a new block and the old one is
         * left allocated: a writer in another process may still be reading
         * it, and configurations change rarely. */
        uint64_t cur = sg_load_acquire(&m->hdr->mirror); /* SYNC POINT: mirror-desc (acquire) */
        sg_block *b = cur ? sg__block(m->g, cur) : NULL;
        if (b) {
            const sg_mirror_desc *old = (const sg_mirror_desc *)b->payload;
            if (old->partitions == partitions && sizeof *old + bytes <= SG_META_LEN(b->meta) &&
                !memcmp(old->local, local_mask, bytes))
                return SG_OK;
        }
        int rc = sg__object_alloc(m->g, sizeof *d + bytes, (void **)&d, &off);
        if (rc)
            return rc;
        d->partitions = partitions;
        memcpy(d->local, local_mask, bytes);
    }
    /* SYNC POINT: mirror-desc (release): the descriptor is complete */
    sg_store_release(&m->hdr->mirror, off);
    return SG_OK;
}

int sg_map_is_remote(sg_map *m, const char *key, size_t klen)
{
    return m->g->base ? sg__remote(m, sg_hash64(key, klen)) : 0;
}

uint64_t sg_map_version_floor(sg_map *m)
{
    return m->g->base ? sg_load_acquire(&m->hdr->version_floor) : 0;
}

/* The next key of the walk (with its tombstone too if `tombstones`, and
 * only keys of the partitions in mask if nparts), copied out. */
static int sg__iter_step(sg_iter *it, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap, size_t *vlen,
                         uint64_t *version, int tombstones, int *present, uint32_t nparts, const uint8_t *mask);

int sg_iter_next(sg_iter *it, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap, size_t *vlen,
                 uint64_t *version)
{
    int present;
    return sg__iter_step(it, kout, kcap, klen, vout, vcap, vlen, version, 0, &present, 0, NULL);
}

int64_t sg_iter_records(sg_iter *it, char *out, size_t cap, uint32_t nparts, const uint8_t *mask)
{
    sg_map *m = it->m;
    size_t off = 0, worst = SG_RECORD_HDR + m->max_key + m->max_value;
    /* 0 means the walk is over: a buffer too small for one record must not say so */
    if (cap < worst)
        return sg__fail(SG_EINVAL, "records buffer of %zu bytes is below one record of %zu", cap, worst);
    while (cap - off >= worst) {
        char *rec = out + off;
        size_t klen, vlen;
        uint64_t version;
        int present;
        /* the key goes right after the header; the value is copied after
         * it once the key's length is known */
        int rc = sg__iter_step(it, rec + SG_RECORD_HDR, m->max_key, &klen, rec + SG_RECORD_HDR + m->max_key,
                               m->max_value, &vlen, &version, 1, &present, nparts, mask);
        if (rc == SG_NO)
            break;
        if (rc)
            return rc;
        if (present)
            memmove(rec + SG_RECORD_HDR + klen, rec + SG_RECORD_HDR + m->max_key, vlen);
        sg_record_hdr h = {.klen = (uint16_t)klen, .flags = (uint8_t)!present, .vlen = present ? (uint32_t)vlen : 0,
                           .version = version};
        memcpy(rec, &h, sizeof h);
        off += SG_RECORD_HDR + klen + h.vlen;
    }
    return (int64_t)off;
}

static int sg__iter_step(sg_iter *it, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap, size_t *vlen,
                         uint64_t *version, int tombstones, int *present, uint32_t nparts, const uint8_t *mask)
{
    sg_map *m = it->m;
    if (!it->pinned)
        return SG_NO;
    if (it->pid != getpid())
        return sg__fail(SG_EINVAL, "iterator was opened in the parent process before fork; open a new one");
    if (!m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    sg__tab t;
    int rc = sg__tab_at(m, it->table, &t);
    if (rc)
        return rc;
    for (uint64_t i = it->next; i <= t.mask; i++) {
        sg_slot *s = &t.slots[i];
        /* SYNC POINT: key-publish (acquire) */
        uint64_t h = sg_load_acquire(&s->head);
        if (h == 0 || h == SG_HEAD_MOVED)
            continue;
        sg_block *kb = sg__block(m->g, SG_HEAD_OFF(h));
        if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY || SG_META_LEN(kb->meta) > kcap ||
            !sg__fits(kb->meta, SG_META_LEN(kb->meta)))
            return sg__fail(SG_ECORRUPT, "map slot %llu names a bad key block", (unsigned long long)i);
        if (!sg__in_mask(kb->word, nparts, mask))
            continue; /* kb->word is the key's full hash */
        sg__cur c;
        rc = sg__read(m, s, &c, vout, vcap, NULL, 0);
        if (!rc && (c.ref & SG_REF_DONE)) {
            /* copied by a migration since the walk began: read it where it is now */
            sg__tab n;
            rc = sg__next(m, &t, &n);
            if (!rc)
                rc = sg__lookup(m, &n, (const char *)kb->payload, SG_META_LEN(kb->meta), kb->word, vout, vcap, &c);
        }
        if (rc)
            return rc;
        if (!c.present && !(tombstones && c.version))
            continue;
        *present = c.present;
        *klen = SG_META_LEN(kb->meta);
        memcpy(kout, kb->payload, *klen);
        if (vlen)
            *vlen = c.len;
        if (version)
            *version = c.version;
        it->next = i + 1;
        return SG_OK;
    }
    it->next = t.mask + 1;
    return SG_NO;
}

void sg_iter_free(sg_iter *it)
{
    if (!it)
        return;
    if (it->pinned && it->m->g->base && it->pid == getpid())
        sg__exit(it->m);
    free(it);
}

/* ---- mirroring: apply the owner's state, and records for the wire -------- */

int sg_map_apply(sg_map *m, const char *key, size_t klen, const char *val, size_t vlen, uint64_t version,
                 int tombstone)
{
    if (version == 0 || version >= SG_FEED_DELETE)
        return sg__fail(SG_EINVAL, "apply: version %llu out of range", (unsigned long long)version);
    sg__update u = {.op = OP_APPLY, .val = val, .vlen = vlen, .expected_version = version, .tombstone = !!tombstone};
    return sg__apply(m, key, klen, &u);
}

/* Walk the keys of the mask's partitions (tombstones too, if asked) and
 * apply visit to each: it returns SG_OK if it changed the key, SG_NO if
 * not, or a negative error, which ends the walk. The number changed. */
typedef int (*sg__visit)(sg_map *m, const char *key, size_t klen, uint64_t version, void *ctx);

static int64_t sg__walk_mask(sg_map *m, uint32_t nparts, const uint8_t *mask, int tombstones, sg__visit visit,
                             void *ctx)
{
    if (!m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    char *key = malloc((size_t)m->max_key + m->max_value + 2);
    if (!key)
        return sg__fail(SG_ENOMEM, "out of memory for a key buffer");
    char *val = key + m->max_key + 1;
    sg_iter *it;
    int rc = sg_iter_open(m, &it);
    if (rc) {
        free(key);
        return rc;
    }
    int64_t n = 0;
    for (;;) {
        size_t klen, vlen;
        uint64_t version;
        int present;
        rc = sg__iter_step(it, key, m->max_key, &klen, val, m->max_value, &vlen, &version, tombstones, &present,
                           nparts, mask);
        if (rc)
            break;
        rc = visit(m, key, klen, version, ctx);
        if (rc < 0)
            break;
        n += rc == SG_OK;
    }
    sg_iter_free(it);
    free(key);
    return rc < 0 ? rc : n;
}

static int sg__reset_one(sg_map *m, const char *key, size_t klen, uint64_t version, void *ctx)
{
    (void)version, (void)ctx;
    sg__update u = {.op = OP_APPLY, .force = 1, .tombstone = 1};
    return sg__apply(m, key, klen, &u);
}

int64_t sg_map_reset_partitions(sg_map *m, uint32_t nparts, const uint8_t *mask)
{
    /* tombstones too: an old one would refuse the new owner's lower versions */
    return sg__walk_mask(m, nparts, mask, 1, sg__reset_one, NULL);
}

static int sg__cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

typedef struct sg__prune_ctx {
    uint64_t floor;
    const uint64_t *seen; /* sorted */
    size_t n;
} sg__prune_ctx;

static int sg__prune_one(sg_map *m, const char *key, size_t klen, uint64_t version, void *ctx)
{
    const sg__prune_ctx *p = ctx;
    uint64_t h = sg_hash64(key, klen);
    if (version >= p->floor || bsearch(&h, p->seen, p->n, sizeof *p->seen, sg__cmp_u64))
        return SG_NO;
    /* just above what we hold: the owner's own versions of the key are
     * above its floor, so anything it sends later still wins */
    return sg_map_apply(m, key, klen, NULL, 0, version + 1, 1);
}

int64_t sg_map_prune(sg_map *m, uint32_t nparts, const uint8_t *mask, uint64_t floor, uint64_t *seen, size_t n)
{
    qsort(seen, n, sizeof *seen, sg__cmp_u64);
    sg__prune_ctx ctx = {.floor = floor, .seen = seen, .n = n};
    return sg__walk_mask(m, nparts, mask, 0, sg__prune_one, &ctx);
}

#define SG_APPLY_CHUNK 256u /* records per sg__enter / sg__exit */

int64_t sg_map_apply_records(sg_map *m, const char *buf, size_t len, uint32_t nparts, const uint8_t *mask,
                             uint64_t *applied, uint64_t *hashes)
{
    if (!m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    size_t off = 0;
    int64_t n = 0;
    int rc = SG_OK, entered = 0;
    *applied = 0;
    /* One pass: each header is checked once, each key hashed once, and the
     * epoch entered once per chunk (as the batch calls do); the checks
     * sg_map_apply would repeat are the ones made here. */
    while (off < len) {
        if (len - off < SG_RECORD_HDR) {
            rc = sg__fail(SG_EINVAL, "record %lld: truncated header (%zu bytes left)", (long long)n, len - off);
            break;
        }
        sg_record_hdr h;
        memcpy(&h, buf + off, sizeof h);
        if (h.flags > 1 || h.reserved || h.klen > m->max_key || h.vlen > m->max_value ||
            (h.flags && h.vlen) || h.version == 0 || h.version >= SG_FEED_DELETE) {
            rc = sg__fail(SG_EINVAL, "record %lld: bad header (klen %u, vlen %u, flags %u, version %llu)",
                          (long long)n, h.klen, h.vlen, h.flags, (unsigned long long)h.version);
            break;
        }
        if (len - off - SG_RECORD_HDR < (size_t)h.klen + h.vlen) {
            rc = sg__fail(SG_EINVAL, "record %lld: truncated body", (long long)n);
            break;
        }
        const char *key = buf + off + SG_RECORD_HDR;
        uint64_t hash = sg_hash64(key, h.klen);
        if (!sg__in_mask(hash, nparts, mask)) {
            rc = sg__fail(SG_EINVAL, "record %lld: key of a partition the sender does not own", (long long)n);
            break;
        }
        if (!entered && (rc = sg__enter(m)) != SG_OK)
            break;
        entered++;
        sg__update u = {.op = OP_APPLY, .val = key + h.klen, .vlen = h.vlen, .expected_version = h.version,
                        .tombstone = h.flags};
        rc = sg__apply_in(m, key, h.klen, hash, &u);
        if (rc < 0)
            break;
        *applied += rc == SG_OK;
        if (hashes)
            hashes[n] = hash;
        off += SG_RECORD_HDR + h.klen + h.vlen;
        n++;
        if (entered == SG_APPLY_CHUNK) {
            sg__exit(m);
            entered = 0;
        }
    }
    if (entered)
        sg__exit(m);
    return rc < 0 ? rc : n;
}

/* ---- open / create ------------------------------------------------------ */

static uint64_t sg__slots_for(uint64_t capacity)
{
    uint64_t n = 8;
    while (sg__slot_limit(n) < capacity)
        n <<= 1;
    return n;
}

/* The types a map is opened with (sg_map_open_typed); NULL members: untyped. */
typedef struct sg__types {
    const char *key, *value;
    size_t klen, vlen;
} sg__types;

static int sg__map_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    const sg__types *ty = ctx;
    uint64_t nslots = sg__slots_for(param[0]);
    uint64_t bytes = sg__table_bytes(nslots);
    uint64_t hoff, toff;
    int hfresh, tfresh;
    int rc = sg__alloc(g, sizeof(sg_map_hdr), &hoff, &hfresh);
    if (rc)
        return rc;
    rc = sg__alloc(g, bytes, &toff, &tfresh);
    if (rc) {
        sg__free(g, hoff);
        return rc;
    }
    /* Plain stores below: a recycled block may still be under a stale
     * reader's copy, which it then discards (SYNC POINT: block-reuse); the
     * overlap is on aligned words, as with the relaxed stores elsewhere.
     * Object creation is rare enough not to spell it out word by word. */
    sg_block *hb = (sg_block *)(g->base + hoff), *tb = (sg_block *)(g->base + toff);
    sg_map_hdr *mh = (sg_map_hdr *)hb->payload;
    sg_table_hdr *th = (sg_table_hdr *)tb->payload;
    memset(mh, 0, sizeof *mh);
    if (!tfresh) /* carved memory is zero; recycled memory is not */
        memset(th, 0, bytes);
    th->nslots = nslots;
    th->generation = 1;
    th->slot_limit = sg__slot_limit(nslots);
    tb->meta = SG_META(SG_META_CLASS(tb->meta), SG_BLK_TABLE, bytes);
    mh->capacity = param[0];
    mh->max_key = (uint32_t)param[1];
    mh->max_value = (uint32_t)param[2];
    mh->min_slots = nslots;
    mh->max_capacity = param[3];
    mh->max_slots = param[3] ? sg__slots_for(param[3] + param[3] / 2 + 64) : 0;
    mh->table = toff;
    rc = sg__feed_create(g, SG_FEED_SLOTS, &mh->feed);
    if (!rc && ty && ty->key) {
        sg_map_types *d;
        rc = sg__object_alloc(g, sizeof *d + ty->klen + ty->vlen, (void **)&d, &mh->types);
        if (!rc) {
            d->key_len = (uint32_t)ty->klen;
            d->value_len = (uint32_t)ty->vlen;
            memcpy(d->text, ty->key, ty->klen);
            memcpy(d->text + ty->klen, ty->value, ty->vlen);
        } else {
            sg__free(g, mh->feed);
        }
    }
    if (rc) {
        sg__free(g, toff);
        sg__free(g, hoff);
        return rc;
    }
    hb->meta = SG_META(SG_META_CLASS(hb->meta), SG_BLK_OBJECT, sizeof *mh);
    /* published by the dirent-ready release in sg__dir_open */
    *obj = hoff;
    return SG_OK;
}

/* The map's type descriptions, checked to lie in their block; NULL if untyped. */
static const sg_map_types *sg__types_of(sg_grid *g, const sg_map_hdr *mh, int *corrupt)
{
    *corrupt = 0;
    if (!mh->types)
        return NULL;
    sg_block *b = sg__block(g, mh->types);
    const sg_map_types *d = b ? (const sg_map_types *)b->payload : NULL;
    if (!d || SG_META_KIND(b->meta) != SG_BLK_OBJECT || SG_META_LEN(b->meta) < sizeof *d ||
        (uint64_t)d->key_len + d->value_len > SG_META_LEN(b->meta) - sizeof *d) {
        *corrupt = 1;
        return NULL;
    }
    return d;
}

int sg_map_open(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_key, uint32_t max_value,
                uint64_t max_capacity, sg_map **out)
{
    return sg_map_open_typed(g, name, capacity, max_key, max_value, max_capacity, NULL, 0, NULL, 0, out);
}

int sg_map_open_typed(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_key, uint32_t max_value,
                      uint64_t max_capacity, const char *ktype, size_t ktlen, const char *vtype, size_t vtlen,
                      sg_map **out)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    if (!ktype != !vtype || (ktype && (!ktlen || !vtlen || ktlen + vtlen > SG_MAP_TYPES_MAX)))
        return sg__fail(SG_EINVAL, "a typed map needs a key type and a value type of 1 to %u bytes together",
                        SG_MAP_TYPES_MAX);
    if (ktype && (!max_key || !max_value))
        return sg__fail(SG_EINVAL, "a typed map needs max_key and max_value: the widths of its types");
    if (capacity > (1ull << 36) || max_capacity > (1ull << 36))
        return sg__fail(SG_EINVAL, "capacity and max_capacity are limited to %llu keys", 1ull << 36);
    if (max_key > SG_MAX_KEY_LIMIT)
        return sg__fail(SG_EINVAL, "max_key %u is over the limit of %u bytes", max_key, SG_MAX_KEY_LIMIT);
    if (max_value > SG_MAX_VALUE_LIMIT)
        return sg__fail(SG_EINVAL, "max_value %u is over the limit of %u bytes", max_value, SG_MAX_VALUE_LIMIT);
    /* Not given: the default, or max_capacity if that is lower (so that a
     * map reopened with only its own max_capacity is not refused against
     * a default it was never created with). */
    uint64_t cap = capacity ? capacity : SG_DEFAULT_CAPACITY;
    if (!capacity && max_capacity && max_capacity < cap)
        cap = max_capacity;
    if (max_capacity && max_capacity < cap)
        return sg__fail(SG_EINVAL, "max_capacity %llu is below capacity %llu", (unsigned long long)max_capacity,
                        (unsigned long long)cap);

    uint64_t param[4] = {cap, max_key ? max_key : SG_DEFAULT_MAX_KEY, max_value ? max_value : SG_DEFAULT_MAX_VALUE,
                         max_capacity};
    sg_dirent *e;
    sg__types ty = {ktype, vtype, ktlen, vtlen};
    int rc = sg__dir_open(g, name, SG_OBJ_MAP, param, sg__map_create, &ty, &e);
    if (rc)
        return rc;

    /* An existing map: parameters given must match (0 = take what it has). */
    const char *field[4] = {"capacity", "max_key", "max_value", "max_capacity"};
    uint64_t asked[4] = {capacity, max_key, max_value, max_capacity};
    for (int i = 0; i < 4; i++)
        if (asked[i] && asked[i] != e->param[i])
            return sg__fail(SG_EMISMATCH, "map '%s' exists with %s=%llu; it was asked for with %s=%llu", name,
                            field[i], (unsigned long long)e->param[i], field[i], (unsigned long long)asked[i]);

    sg_block *hb = sg__block(g, e->obj);
    if (!hb || SG_META_KIND(hb->meta) != SG_BLK_OBJECT ||
        sg__class_size(SG_META_CLASS(hb->meta)) < SG_BLOCK_HDR + sizeof(sg_map_hdr))
        return sg__fail(SG_ECORRUPT, "map '%s': directory entry names a bad object block", name);
    sg_map_hdr *mh = (sg_map_hdr *)hb->payload;
    if (mh->max_key != e->param[1] || mh->max_value != e->param[2] || mh->max_key > SG_MAX_KEY_LIMIT ||
        mh->max_value > SG_MAX_VALUE_LIMIT || mh->min_slots < 8 || mh->min_slots > (1ull << 40) ||
        (mh->max_slots && mh->max_slots < mh->min_slots))
        return sg__fail(SG_ECORRUPT, "map '%s': header disagrees with its directory entry", name);
    int corrupt;
    const sg_map_types *d = sg__types_of(g, mh, &corrupt);
    if (corrupt)
        return sg__fail(SG_ECORRUPT, "map '%s': its types block is damaged", name);
    if (ktype && !d)
        return sg__fail(SG_EMISMATCH, "map '%s' exists without types; it was asked for with types", name);
    if (ktype && (d->key_len != ktlen || d->value_len != vtlen || memcmp(d->text, ktype, ktlen) ||
                  memcmp(d->text + ktlen, vtype, vtlen)))
        return sg__fail(SG_EMISMATCH, "map '%s' exists with types %.*s -> %.*s; it was asked for with %.*s -> %.*s",
                        name, (int)d->key_len, d->text, (int)d->value_len, d->text + d->key_len, (int)ktlen, ktype,
                        (int)vtlen, vtype);

    sg_map *m = calloc(1, sizeof *m);
    if (!m)
        return sg__fail(SG_ENOMEM, "out of process memory");
    m->g = g;
    m->hdr = mh;
    m->max_key = mh->max_key;
    m->max_value = mh->max_value;
    sg__tab t;
    rc = sg__tab_at(m, sg_load_acquire(&mh->table), &t);
    if (!rc)
        rc = sg__feed_attach(m);
    if (rc) {
        free(m);
        return rc;
    }
    sg_ref_inc(&g->refs);
    *out = m;
    return SG_OK;
}

void sg_map_free(sg_map *m)
{
    if (!m)
        return;
    sg_grid *g = m->g;
    free(m);
    if (sg_ref_dec(&g->refs) == 0)
        free(g);
}

int sg_map_types_get(sg_map *m, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap, size_t *vlen)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    int corrupt;
    const sg_map_types *d = sg__types_of(m->g, m->hdr, &corrupt);
    *klen = *vlen = 0;
    if (corrupt)
        return sg__fail(SG_ECORRUPT, "map: its types block is damaged");
    if (!d)
        return SG_NO;
    /* read once: the block is shared memory, and a second read of a length
     * could differ from the one checked */
    uint32_t kl = d->key_len, vl = d->value_len;
    if (kl > kcap || vl > vcap)
        return sg__fail(SG_EINVAL, "type descriptions of %u and %u bytes do not fit in %zu and %zu", kl, vl, kcap,
                        vcap);
    memcpy(kout, d->text, kl);
    memcpy(vout, d->text + kl, vl);
    *klen = kl;
    *vlen = vl;
    return SG_OK;
}

int sg_map_params(sg_map *m, uint64_t *capacity, uint32_t *max_key, uint32_t *max_value, uint64_t *max_capacity)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    *capacity = m->hdr->capacity;
    *max_key = m->max_key;
    *max_value = m->max_value;
    *max_capacity = m->hdr->max_capacity;
    return SG_OK;
}

/* ---- validate ----------------------------------------------------------- */

static int sg__validate_table(sg_map *m, const sg__tab *t, sg_map_report *out)
{
    sg_grid *g = m->g;
    for (uint64_t i = 0; i <= t->mask; i++) {
        sg_slot *s = &t->slots[i];
        /* ref before head: an inserter binds the head before it writes the
         * ref, so a ref seen set means its head is seen bound */
        uint64_t r0 = sg_load_acquire(&s->ref), h = sg_load_acquire(&s->head);
        if (h == 0 || h == SG_HEAD_MOVED) {
            if (r0 != 0)
                return sg__fail(SG_ECORRUPT, "slot %llu has a value but no key", (unsigned long long)i);
            continue;
        }
        out->bound++;
        sg_block *kb = sg__block(g, SG_HEAD_OFF(h));
        if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY)
            return sg__fail(SG_ECORRUPT, "slot %llu: head does not name a key block", (unsigned long long)i);
        uint32_t klen = SG_META_LEN(kb->meta);
        const char *key = (const char *)kb->payload;
        if (klen > m->max_key || !sg__fits(kb->meta, klen))
            return sg__fail(SG_ECORRUPT, "slot %llu: key length %u", (unsigned long long)i, klen);
        uint64_t hash = sg_hash64(key, klen);
        if (kb->word != hash || SG_HEAD_TAG(h) != hash >> 48)
            return sg__fail(SG_ECORRUPT, "slot %llu: key hash does not match its bytes", (unsigned long long)i);
        /* The key must be reachable from its home slot through bound slots
         * only, and must be the first slot on that path holding it. */
        for (uint64_t j = hash & t->mask; j != i; j = (j + 1) & t->mask) {
            uint64_t hj = sg_load_acquire(&t->slots[j].head);
            int corrupt = 0;
            if (hj == 0 || hj == SG_HEAD_MOVED)
                return sg__fail(SG_ECORRUPT, "slot %llu: an empty slot cuts it off from its home %llu",
                                (unsigned long long)i, (unsigned long long)(hash & t->mask));
            if (sg__key_is(m, hj, key, klen, hash, &corrupt))
                return sg__fail(SG_ECORRUPT, "slots %llu and %llu hold the same key", (unsigned long long)j,
                                (unsigned long long)i);
        }
        out->block_bytes += sg__class_size(SG_META_CLASS(kb->meta));
        sg__cur c;
        int rc = sg__read(m, s, &c, NULL, 0, NULL, 0);
        if (rc)
            return rc;
        if (c.ref & (SG_REF_FROZEN | SG_REF_DONE)) {
            if (sg_load_acquire(&t->h->next))
                return sg__fail(SG_EBUSY, "validate: a migration began during the walk (other processes are "
                                          "writing); validate while the map is idle");
            return sg__fail(SG_ECORRUPT, "slot %llu is frozen, yet its table has no migration",
                            (unsigned long long)i);
        }
        if (c.ref) {
            out->block_bytes += sg__class_size(SG_META_CLASS(sg__block(g, SG_REF_OFF(c.ref))->meta));
            /* version 0 only for a tombstone a mirror's reset wrote */
            if (c.version == 0 && c.present)
                return sg__fail(SG_ECORRUPT, "slot %llu: a written value with version 0", (unsigned long long)i);
        }
        if (c.present)
            out->live++;
        else if (c.ref)
            out->tombstones++;
    }
    return SG_OK;
}

int sg_map_validate(sg_map *m, int repair, sg_map_report *out)
{
    memset(out, 0, sizeof *out);
    /* Validate a table with no migration under way: finish any first. */
    int rc = sg__finish(m);
    if (!rc)
        rc = sg__enter(m);
    if (rc)
        return out->error = rc;
    sg__tab t, n;
    rc = sg__head(m, &t);
    if (!rc && sg__next(m, &t, &n) == SG_OK)
        rc = sg__fail(SG_EBUSY, "validate: the map is migrating again (other processes are writing)");
    if (!rc) {
        sg_block *tb = sg__block(m->g, t.off);
        sg_block *hb = (sg_block *)((uint8_t *)m->hdr - SG_BLOCK_HDR);
        out->capacity = m->hdr->capacity;
        out->nslots = t.mask + 1;
        out->slot_limit = t.h->slot_limit;
        out->live_counter = (int64_t)sg_load_relaxed(&m->hdr->live);
        out->table_bytes = sg__class_size(SG_META_CLASS(tb->meta));
        out->block_bytes = sg__class_size(SG_META_CLASS(hb->meta));
        uint64_t mirror = sg_load_acquire(&m->hdr->mirror);
        if (mirror && sg__block(m->g, mirror)) /* the mirror descriptor */
            out->block_bytes += sg__class_size(SG_META_CLASS(sg__block(m->g, mirror)->meta));
        if (m->feed) /* the change feed's block */
            out->block_bytes += sg__class_size(SG_META_CLASS(((sg_block *)((uint8_t *)m->feed - SG_BLOCK_HDR))->meta));
        out->generation = t.h->generation;
        out->version_floor = sg_load_relaxed(&m->hdr->version_floor);
        out->max_key = m->max_key;
        out->max_value = m->max_value;
        rc = sg__validate_table(m, &t, out);
        out->used = sg_load_relaxed(&t.h->used); /* after the walk: bound can only have grown since */
    }
    if (!rc && out->used < out->bound)
        rc = sg__fail(SG_ECORRUPT, "%llu slots are bound but only %llu were reserved",
                      (unsigned long long)out->bound, (unsigned long long)out->used);
    uint64_t claim = sg_load_acquire(&m->hdr->reclaimer);
    int claimed = 0;
    if (!rc && claim && claim != m->g->self && sg__word_alive(claim))
        rc = sg__fail(SG_EBUSY, "validate: another process is freeing old tables; validate while the map is idle");
    else if (!rc)
        claimed = sg_cas_acq_rel(&m->hdr->reclaimer, &claim, m->g->self);
    if (!rc && !claimed)
        rc = sg__fail(SG_EBUSY, "validate: another process is freeing old tables; validate while the map is idle");
    if (!rc) {
        /* tables waiting for readers to move on (no one frees them while we hold the claim) */
        uint64_t r = sg_load_acquire(&m->hdr->retired);
        for (uint64_t k = 0; r && k < (1u << 20); k++) {
            sg__tab rt;
            if ((rc = sg__tab_at(m, r, &rt)))
                break;
            out->retired_tables++;
            out->retired_bytes += sg__class_size(SG_META_CLASS(sg__block(m->g, r)->meta));
            for (uint64_t i = 0; i <= rt.mask; i++) {
                uint64_t h = sg_load_relaxed(&rt.slots[i].head), ref = sg_load_relaxed(&rt.slots[i].ref);
                sg_block *kb;
                if (h != 0 && h != SG_HEAD_MOVED && (ref & SG_REF_DONE) && !SG_REF_OFF(ref) &&
                    (kb = sg__block(m->g, SG_HEAD_OFF(h))))
                    out->retired_bytes += sg__class_size(SG_META_CLASS(kb->meta));
            }
            r = sg_load_relaxed(&rt.h->retired_next);
        }
    }
    if (claimed) {
        uint64_t mine = m->g->self;
        sg_cas_acq_rel(&m->hdr->reclaimer, &mine, 0);
    }
    if (!rc && repair) {
        /* Only meaningful while no other process writes this map. */
        sg_store_relaxed(&m->hdr->live, out->live);
        sg_store_relaxed(&t.h->used, out->bound);
        out->live_counter = (int64_t)out->live;
        out->used = out->bound;
    }
    sg__exit(m);
    return out->error = rc;
}

/* ---- per-thread call contexts ------------------------------------------- */

sg_io *sg_io_new(sg_map *m)
{
    sg_io *io = calloc(1, sizeof *io);
    if (!io)
        return NULL;
    io->buf = malloc(m->max_value > 8 ? m->max_value : 8);
    if (!io->buf) {
        free(io);
        return NULL;
    }
    io->map = m;
    return io;
}

void sg_io_free(sg_io *io)
{
    if (io) {
        free(io->buf);
        free(io);
    }
}

int64_t sg_io_get(sg_io *io, const char *key, size_t klen)
{
    return sg_map_get(io->map, key, klen, io->buf, io->map->max_value, &io->version);
}

int64_t sg_io_put(sg_io *io, const char *key, size_t klen, const char *val, size_t vlen)
{
    int rc = sg_map_put(io->map, key, klen, val, vlen, &io->version);
    return rc ? rc : (int64_t)io->version;
}

int sg_io_incr(sg_io *io, const char *key, size_t klen, int64_t delta)
{
    return sg_map_incr(io->map, key, klen, delta, &io->result, &io->version);
}
