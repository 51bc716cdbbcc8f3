/*
 * map.c - the lock-free hash map.
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
 */
#include <stdlib.h>

#include "sg_internal.h"

#define SG_TAG_MASK ((1ull << 24) - 1)

/* ---- the table ---------------------------------------------------------- */

/* Load the current table through the map header, validating a table the
 * handle has not seen before. */
static int sg__table(sg_map *m)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    uint64_t off = sg_load_acquire(&m->hdr->table);
    if (off == m->table_off)
        return SG_OK;
    sg_block *b = sg__block(m->g, off);
    if (!b || SG_META_KIND(sg_load_relaxed(&b->meta)) != SG_BLK_TABLE)
        return sg__fail(SG_ECORRUPT, "map table at offset %llu is not a table block", (unsigned long long)off);
    sg_table_hdr *t = (sg_table_hdr *)b->payload;
    uint64_t n = t->nslots;
    uint64_t room = sg__class_size(SG_META_CLASS(b->meta)) - SG_BLOCK_HDR - sizeof *t;
    if (n < 8 || (n & (n - 1)) || n > room / sizeof(sg_slot))
        return sg__fail(SG_ECORRUPT, "map table at offset %llu has a bad slot count %llu", (unsigned long long)off,
                        (unsigned long long)n);
    m->slots = (sg_slot *)(t + 1);
    m->mask = n - 1;
    m->table_off = off;
    return SG_OK;
}

/* Does a payload of n bytes fit in the size class of a block with this
 * meta word? (A damaged or hostile segment must give an error, never a read
 * past the block.) */
static inline int sg__fits(uint64_t meta, uint64_t n)
{
    return n <= sg__class_size(SG_META_CLASS(meta)) - SG_BLOCK_HDR;
}

/* Does bound head `h` name the key (key, klen, hash)? Key blocks are
 * immutable once their head is published, so plain reads are fine here:
 * the acquire load of head (SYNC POINT: key-publish) made them visible. */
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
           memcmp(kb->payload, key, klen) == 0;
}

static int sg__check_key(sg_map *m, size_t klen)
{
    if (klen > m->max_key)
        return sg__fail(SG_EKEYSIZE, "key of %zu bytes exceeds this map's max_key of %u bytes", klen, m->max_key);
    return SG_OK;
}

/* Find the slot of a key. With `insert`, bind an empty slot to it if it has
 * none. Returns SG_OK with *out set, SG_NO (absent, no insert), or an error. */
static int sg__find(sg_map *m, const char *key, size_t klen, uint64_t hash, int insert, sg_slot **out)
{
    int rc = sg__table(m);
    if (rc)
        return rc;
    sg_grid *g = m->g;
    uint64_t mask = m->mask, idx = hash & mask;
    uint64_t newkey = 0; /* our unpublished key block, if we made one */
    int reserved = 0, corrupt = 0, fresh;

    for (uint64_t probe = 0; probe <= mask; probe++, idx = (idx + 1) & mask) {
        sg_slot *s = &m->slots[idx];
        /* SYNC POINT: key-publish (acquire): the key block a bound head names is visible */
        uint64_t h = sg_load_acquire(&s->head);
        if (h == 0) {
            if (!insert)
                return SG_NO;
            if (!reserved) {
                /* Reserve a slot before binding, so bound slots never exceed
                 * slot_limit and probes stay short. */
                if (sg_fetch_add_relaxed(&m->hdr->used, 1) >= m->hdr->slot_limit) {
                    sg_fetch_sub_relaxed(&m->hdr->used, 1);
                    rc = sg__fail(SG_EFULL,
                                  "map is full: %llu distinct keys have been stored (capacity %llu; slots of "
                                  "deleted keys are not reused yet)",
                                  (unsigned long long)m->hdr->slot_limit, (unsigned long long)m->hdr->capacity);
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
                *out = s;
                return SG_OK;
            }
            /* Lost the slot to another inserter; h is its key. Re-read with
             * acquire before looking at that key block. */
            h = sg_load_acquire(&s->head);
        }
        if (sg__key_is(m, h, key, klen, hash, &corrupt)) {
            if (newkey)
                sg__free(g, newkey);
            if (reserved)
                sg_fetch_sub_relaxed(&m->hdr->used, 1);
            *out = s;
            return SG_OK;
        }
        if (corrupt) {
            rc = sg__fail(SG_ECORRUPT, "map slot %llu names a bad key block", (unsigned long long)idx);
            goto fail;
        }
    }
    if (!insert)
        return SG_NO;
    rc = sg__fail(SG_EFULL, "map is full: no free slot among %llu", (unsigned long long)(mask + 1));
fail:
    if (newkey)
        sg__free(g, newkey);
    if (reserved)
        sg_fetch_sub_relaxed(&m->hdr->used, 1);
    return rc;
}

/* ---- consistent reads of a slot's current block ------------------------- */

typedef struct sg__cur {
    uint64_t ref;     /* the reference the snapshot was taken under */
    uint64_t version; /* 0 if never written */
    uint32_t len;     /* value length (0 for a tombstone) */
    int present;      /* a VALUE block (not a tombstone, not never-written) */
    int equal;        /* with a comparand: the value equals it */
} sg__cur;

/* Snapshot the current block of slot s: its version and length, a copy of
 * up to `cap` value bytes into `out` (may be NULL), and whether the value
 * equals `cmp` (may be NULL). The snapshot is consistent: it was all true
 * at the moment ref still held c->ref. */
static int sg__read(sg_map *m, sg_slot *s, sg__cur *c, char *out, size_t cap, const char *cmp, size_t cmplen)
{
    for (;;) {
        /* SYNC POINT: value-publish (acquire): pairs with the writer's CAS on
         * ref, so the block it names is filled. */
        uint64_t r = sg_load_acquire(&s->ref);
        c->ref = r;
        if (r == 0) {
            c->version = 0;
            c->len = 0;
            c->present = 0;
            c->equal = 0;
            return SG_OK;
        }
        sg_block *b = sg__block(m->g, SG_TAGGED_OFF(r));
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
        if (sg_load_relaxed(&s->ref) != r)
            continue; /* changed under us: the copy may be torn; again */
        if (!sane)
            return sg__fail(SG_ECORRUPT, "map value block has kind %u and length %u", kind, len);
        c->version = version;
        c->len = kind == SG_BLK_VALUE ? len : 0;
        c->present = kind == SG_BLK_VALUE;
        c->equal = equal;
        return SG_OK;
    }
}

/* ---- updates ------------------------------------------------------------ */

enum sg__op { OP_PUT, OP_PUT_IF_ABSENT, OP_REPLACE, OP_CAS_VERSION, OP_DELETE, OP_INCR };

typedef struct sg__update {
    enum sg__op op;
    const char *val; /* new value (PUT, PUT_IF_ABSENT, REPLACE, CAS_VERSION) */
    size_t vlen;
    const char *expected; /* REPLACE */
    size_t elen;
    uint64_t expected_version; /* CAS_VERSION; 0 = the key must be absent */
    int64_t delta;             /* INCR */
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

static int sg__apply(sg_map *m, const char *key, size_t klen, sg__update *u)
{
    int rc = sg__check_key(m, klen);
    if (rc)
        return rc;
    size_t vlen = u->op == OP_INCR ? 8 : u->op == OP_DELETE ? 0 : u->vlen;
    if (vlen > m->max_value)
        return sg__fail(SG_EVALSIZE, "value of %zu bytes exceeds this map's max_value of %u bytes", vlen,
                        m->max_value);
    if (u->op == OP_INCR && m->max_value < 8)
        return sg__fail(SG_EVALSIZE, "incr needs 8-byte values; this map's max_value is %u", m->max_value);

    uint64_t hash = sg_hash64(key, klen);
    int creates = u->op == OP_PUT || u->op == OP_PUT_IF_ABSENT || u->op == OP_INCR ||
                  (u->op == OP_CAS_VERSION && u->expected_version == 0);
    sg_slot *s;
    rc = sg__find(m, key, klen, hash, creates, &s);
    if (rc == SG_NO) {
        u->version = 0;
        return SG_NO; /* DELETE/REPLACE/CAS of a key that was never stored */
    }
    if (rc)
        return rc;

    /* The new block, filled except for its version (and the INCR value). */
    uint64_t nb_off;
    int fresh;
    rc = sg__alloc(m->g, vlen, &nb_off, &fresh);
    if (rc)
        return rc;
    sg_block *nb = (sg_block *)(m->g->base + nb_off);
    unsigned kind = u->op == OP_DELETE ? SG_BLK_TOMB : SG_BLK_VALUE;
    sg_store_relaxed(&nb->meta, SG_META(SG_META_CLASS(sg_load_relaxed(&nb->meta)), kind, vlen));
    if (kind == SG_BLK_VALUE && u->op != OP_INCR)
        sg_copy_in(nb->payload, u->val, vlen);

    for (;;) {
        sg__cur c;
        int64_t cur = 0;
        char *copy = NULL;
        size_t cap = 0;
        if (u->op == OP_INCR) {
            copy = (char *)&cur;
            cap = sizeof cur;
        } else if (u->op == OP_DELETE) {
            copy = u->old;
            cap = u->oldcap;
        }
        rc = sg__read(m, s, &c, copy, cap, u->op == OP_REPLACE ? u->expected : NULL, u->elen);
        if (rc)
            break;

        int go;
        switch (u->op) {
        case OP_PUT:
            go = 1;
            break;
        case OP_PUT_IF_ABSENT:
            go = !c.present;
            break;
        case OP_REPLACE:
            go = c.present && c.equal;
            break;
        case OP_CAS_VERSION:
            go = u->expected_version == 0 ? !c.present : (c.present && c.version == u->expected_version);
            break;
        case OP_DELETE:
            go = c.present;
            u->oldlen = c.len;
            break;
        case OP_INCR:
            if (c.present && c.len != 8) {
                rc = sg__fail(SG_ENOTINT, "incr: the key holds a %u-byte value, not an 8-byte int64", c.len);
                goto out;
            }
            /* values are stored little-endian; every supported host is */
            if (__builtin_add_overflow(cur, u->delta, &u->result)) {
                rc = sg__fail(SG_EOVERFLOW, "incr: %lld + %lld overflows int64", (long long)cur,
                              (long long)u->delta);
                goto out;
            }
            sg_copy_in(nb->payload, &u->result, 8);
            go = 1;
            break;
        default:
            go = 0;
        }
        if (!go) {
            u->version = c.version;
            rc = SG_NO;
            break;
        }
        sg_store_relaxed(&nb->word, c.version + 1);
        uint64_t r = c.ref;
        /* SYNC POINT: value-publish (release): the new block's meta, version
         * and payload are visible to every reader that acquires ref. Acquire
         * on success orders our free of the old block after the CAS. */
        if (sg_cas_acq_rel(&s->ref, &r, SG_TAGGED((SG_TAGGED_TAG(c.ref) + 1) & SG_TAG_MASK, nb_off))) {
            if (c.ref)
                sg__free(m->g, SG_TAGGED_OFF(c.ref));
            sg__count(m, c.present, kind == SG_BLK_VALUE);
            u->version = c.version + 1;
            return SG_OK;
        }
        /* Someone else changed the key: decide again on the new state. */
    }
out:
    sg__free(m->g, nb_off); /* never published */
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

int64_t sg_map_get(sg_map *m, const char *key, size_t klen, char *out, size_t cap, uint64_t *version)
{
    int rc = sg__check_key(m, klen);
    if (rc)
        return rc;
    sg_slot *s;
    rc = sg__find(m, key, klen, sg_hash64(key, klen), 0, &s);
    if (rc == SG_NO) {
        if (version)
            *version = 0;
        return SG_ENOKEY; /* never stored */
    }
    if (rc)
        return rc;
    sg__cur c;
    rc = sg__read(m, s, &c, out, cap, NULL, 0);
    if (rc)
        return rc;
    if (version)
        *version = c.version;
    return c.present ? (int64_t)c.len : SG_ENOKEY;
}

int64_t sg_map_len(sg_map *m)
{
    if (!m || !m->g || !m->g->base)
        return SG_ECLOSED;
    int64_t n = (int64_t)sg_load_relaxed(&m->hdr->live);
    return n < 0 ? 0 : n;
}

int sg_map_next(sg_map *m, uint64_t *cursor, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap,
                size_t *vlen, uint64_t *version)
{
    int rc = sg__table(m);
    if (rc)
        return rc;
    for (uint64_t i = *cursor; i <= m->mask; i++) {
        sg_slot *s = &m->slots[i];
        /* SYNC POINT: key-publish (acquire) */
        uint64_t h = sg_load_acquire(&s->head);
        if (h == 0)
            continue;
        sg__cur c;
        rc = sg__read(m, s, &c, vout, vcap, NULL, 0);
        if (rc)
            return rc;
        if (!c.present)
            continue;
        sg_block *kb = sg__block(m->g, SG_HEAD_OFF(h));
        if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY || SG_META_LEN(kb->meta) > kcap ||
            !sg__fits(kb->meta, SG_META_LEN(kb->meta)))
            return sg__fail(SG_ECORRUPT, "map slot %llu names a bad key block", (unsigned long long)i);
        *klen = SG_META_LEN(kb->meta);
        memcpy(kout, kb->payload, *klen);
        if (vlen)
            *vlen = c.len;
        if (version)
            *version = c.version;
        *cursor = i + 1;
        return SG_OK;
    }
    *cursor = m->mask + 1;
    return SG_NO;
}

/* ---- open / create ------------------------------------------------------ */

static int sg__map_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    (void)ctx;
    uint64_t capacity = param[0];
    uint64_t nslots = 8;
    while (nslots < capacity + capacity / 3 + 1)
        nslots <<= 1;

    uint64_t hoff, toff;
    int hfresh, tfresh;
    int rc = sg__alloc(g, sizeof(sg_map_hdr), &hoff, &hfresh);
    if (rc)
        return rc;
    rc = sg__alloc(g, sizeof(sg_table_hdr) + nslots * sizeof(sg_slot), &toff, &tfresh);
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
        memset(th, 0, sizeof *th + nslots * sizeof(sg_slot));
    th->nslots = nslots;
    th->generation = 1;
    tb->meta = SG_META(SG_META_CLASS(tb->meta), SG_BLK_TABLE, sizeof *th + nslots * sizeof(sg_slot));
    mh->capacity = capacity;
    mh->max_key = (uint32_t)param[1];
    mh->max_value = (uint32_t)param[2];
    mh->slot_limit = nslots - nslots / 4;
    mh->table = toff;
    hb->meta = SG_META(SG_META_CLASS(hb->meta), SG_BLK_OBJECT, sizeof *mh);
    /* published by the dirent-ready release in sg__dir_open */
    *obj = hoff;
    return SG_OK;
}

int sg_map_open(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_key, uint32_t max_value,
                sg_map **out)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    if (capacity > (1ull << 32))
        return sg__fail(SG_EINVAL, "capacity %llu is over the limit of %llu keys", (unsigned long long)capacity,
                        1ull << 32);
    if (max_key > SG_MAX_KEY_LIMIT)
        return sg__fail(SG_EINVAL, "max_key %u is over the limit of %u bytes", max_key, SG_MAX_KEY_LIMIT);
    if (max_value > SG_MAX_VALUE_LIMIT)
        return sg__fail(SG_EINVAL, "max_value %u is over the limit of %u bytes", max_value, SG_MAX_VALUE_LIMIT);

    uint64_t param[4] = {capacity ? capacity : SG_DEFAULT_CAPACITY, max_key ? max_key : SG_DEFAULT_MAX_KEY,
                         max_value ? max_value : SG_DEFAULT_MAX_VALUE, 0};
    sg_dirent *e;
    int rc = sg__dir_open(g, name, SG_OBJ_MAP, param, sg__map_create, NULL, &e);
    if (rc)
        return rc;

    /* An existing map: parameters given must match (0 = take what it has). */
    const char *field[3] = {"capacity", "max_key", "max_value"};
    uint64_t asked[3] = {capacity, max_key, max_value};
    for (int i = 0; i < 3; i++)
        if (asked[i] && asked[i] != e->param[i])
            return sg__fail(SG_EMISMATCH, "map '%s' exists with %s=%llu; it was asked for with %s=%llu", name,
                            field[i], (unsigned long long)e->param[i], field[i], (unsigned long long)asked[i]);

    sg_block *hb = sg__block(g, e->obj);
    if (!hb || SG_META_KIND(hb->meta) != SG_BLK_OBJECT ||
        sg__class_size(SG_META_CLASS(hb->meta)) < SG_BLOCK_HDR + sizeof(sg_map_hdr))
        return sg__fail(SG_ECORRUPT, "map '%s': directory entry names a bad object block", name);
    sg_map_hdr *mh = (sg_map_hdr *)hb->payload;
    if (mh->max_key != e->param[1] || mh->max_value != e->param[2] || mh->max_key > SG_MAX_KEY_LIMIT ||
        mh->max_value > SG_MAX_VALUE_LIMIT)
        return sg__fail(SG_ECORRUPT, "map '%s': header disagrees with its directory entry", name);

    sg_map *m = calloc(1, sizeof *m);
    if (!m)
        return sg__fail(SG_ENOMEM, "out of process memory");
    m->g = g;
    m->hdr = mh;
    m->max_key = mh->max_key;
    m->max_value = mh->max_value;
    rc = sg__table(m);
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

int sg_map_params(sg_map *m, uint64_t *capacity, uint32_t *max_key, uint32_t *max_value)
{
    if (!m || !m->g || !m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    *capacity = m->hdr->capacity;
    *max_key = m->max_key;
    *max_value = m->max_value;
    return SG_OK;
}

/* ---- validate ----------------------------------------------------------- */

int sg_map_validate(sg_map *m, int repair, sg_map_report *out)
{
    memset(out, 0, sizeof *out);
    int rc = sg__table(m);
    if (rc)
        return out->error = rc;
    sg_grid *g = m->g;
    sg_block *tb = sg__block(g, m->table_off);
    sg_table_hdr *th = (sg_table_hdr *)tb->payload;
    out->capacity = m->hdr->capacity;
    out->nslots = m->mask + 1;
    out->slot_limit = m->hdr->slot_limit;
    out->used = sg_load_relaxed(&m->hdr->used);
    out->live_counter = (int64_t)sg_load_relaxed(&m->hdr->live);
    out->table_bytes = sg__class_size(SG_META_CLASS(tb->meta));
    /* the object header block sits right before its payload, the sg_map_hdr */
    sg_block *hb = (sg_block *)((uint8_t *)m->hdr - SG_BLOCK_HDR);
    out->block_bytes = sg__class_size(SG_META_CLASS(hb->meta));
    out->generation = th->generation;
    out->max_key = m->max_key;
    out->max_value = m->max_value;

    for (uint64_t i = 0; i <= m->mask; i++) {
        sg_slot *s = &m->slots[i];
        uint64_t h = sg_load_acquire(&s->head);
        if (h == 0) {
            if (sg_load_relaxed(&s->ref) != 0)
                return out->error = sg__fail(SG_ECORRUPT, "slot %llu has a value but no key", (unsigned long long)i);
            continue;
        }
        out->bound++;
        sg_block *kb = sg__block(g, SG_HEAD_OFF(h));
        if (!kb || SG_META_KIND(kb->meta) != SG_BLK_KEY)
            return out->error = sg__fail(SG_ECORRUPT, "slot %llu: head does not name a key block", (unsigned long long)i);
        uint32_t klen = SG_META_LEN(kb->meta);
        const char *key = (const char *)kb->payload;
        if (klen > m->max_key || !sg__fits(kb->meta, klen))
            return out->error = sg__fail(SG_ECORRUPT, "slot %llu: key length %u", (unsigned long long)i, klen);
        uint64_t hash = sg_hash64(key, klen);
        if (kb->word != hash || SG_HEAD_TAG(h) != hash >> 48)
            return out->error = sg__fail(SG_ECORRUPT, "slot %llu: key hash does not match its bytes", (unsigned long long)i);
        /* The key must be reachable from its home slot through bound slots
         * only, and must be the first slot on that path holding it. */
        for (uint64_t j = hash & m->mask; j != i; j = (j + 1) & m->mask) {
            uint64_t hj = sg_load_acquire(&m->slots[j].head);
            int corrupt = 0;
            if (hj == 0)
                return out->error = sg__fail(SG_ECORRUPT, "slot %llu: an empty slot cuts it off from its home %llu",
                                             (unsigned long long)i, (unsigned long long)(hash & m->mask));
            if (sg__key_is(m, hj, key, klen, hash, &corrupt))
                return out->error = sg__fail(SG_ECORRUPT, "slots %llu and %llu hold the same key",
                                             (unsigned long long)j, (unsigned long long)i);
        }
        out->block_bytes += sg__class_size(SG_META_CLASS(kb->meta));
        sg__cur c;
        rc = sg__read(m, s, &c, NULL, 0, NULL, 0);
        if (rc)
            return out->error = rc;
        if (c.ref) {
            sg_block *vb = sg__block(g, SG_TAGGED_OFF(c.ref));
            out->block_bytes += sg__class_size(SG_META_CLASS(vb->meta));
            if (c.version == 0)
                return out->error = sg__fail(SG_ECORRUPT, "slot %llu: a written value with version 0", (unsigned long long)i);
        }
        if (c.present)
            out->live++;
        else if (c.ref)
            out->tombstones++;
    }
    if (out->used < out->bound)
        return out->error = sg__fail(SG_ECORRUPT, "%llu slots are bound but only %llu were reserved",
                                     (unsigned long long)out->bound, (unsigned long long)out->used);
    if (repair) {
        /* Only meaningful while no other process writes this map. */
        sg_store_relaxed(&m->hdr->live, out->live);
        sg_store_relaxed(&m->hdr->used, out->bound);
        out->live_counter = (int64_t)out->live;
        out->used = out->bound;
    }
    return SG_OK;
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
