/*
 * feed.c - the change feed of a map, and watches on it (protocol:
 * sg_layout.h, "Change feed").
 *
 * Writers append one record after every successful CAS on a slot's ref and
 * never wait: a fetch_add for the position, then a seqlock write. Readers
 * are lossy: a watch that is lapped, or that finds a position left
 * unpublished by a writer killed between its fetch_add and its PUB, reports
 * the changes it missed instead of holding anyone up.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "sg_internal.h"

_Static_assert(sizeof(sg_record_hdr) == SG_RECORD_HDR, "records: a packed 16-byte header");

/* A position claimed and still unpublished this long is given up on: its
 * writer was killed or stopped between fetch_add and PUB. Long enough that
 * a live writer descheduled under load is not taken for one. */
#define SG_FEED_GRACE_NS 200000000ull

struct sg_watch {
    sg_map *m;
    uint64_t cursor;       /* next position to read */
    uint64_t stuck_since;  /* monotonic ns when the cursor's record was first seen claimed and unpublished */
    uint32_t spin;
    size_t plen;
    char prefix[];
};

int sg__feed_create(sg_grid *g, uint64_t slots, uint64_t *off)
{
    void *p;
    int rc = sg__object_alloc(g, sizeof(sg_feed_hdr) + slots * sizeof(sg_feed_rec), &p, off);
    if (rc)
        return rc;
    ((sg_feed_hdr *)p)->slots = slots; /* zeroed: every record "never written" */
    return SG_OK;
}

int sg__feed_attach(sg_map *m)
{
    uint64_t off = m->hdr->feed;
    if (!off)
        return SG_OK; /* a map without a feed: nothing to watch */
    sg_block *b = sg__block(m->g, off);
    sg_feed_hdr *f = b ? (sg_feed_hdr *)b->payload : NULL;
    if (!f || SG_META_KIND(b->meta) != SG_BLK_OBJECT || f->slots == 0 || f->slots > (1ull << 32) ||
        SG_META_LEN(b->meta) < sizeof *f + f->slots * sizeof(sg_feed_rec))
        return sg__fail(SG_ECORRUPT, "map: its change feed block is damaged");
    m->feed = f;
    m->recs = (sg_feed_rec *)(f + 1);
    m->feed_slots = f->slots;
    return SG_OK;
}

void sg__feed_append(sg_map *m, uint64_t hash, uint64_t key_off, uint64_t version, int deleted)
{
    sg_feed_hdr *f = m->feed;
    if (!f)
        return;
    uint64_t p = sg_fetch_add_relaxed(&f->tail, 1);
    sg_feed_rec *r = &m->recs[p % m->feed_slots];
    /* A seqlock write (SYNC POINT: block-reuse, writer side): a reader
     * copying the record's previous lap sees seq change under it. */
    sg_store_relaxed(&r->seq, SG_FEED_WRITING(p));
    sg_fence_release();
    sg_store_relaxed(&r->hash, hash);
    sg_store_relaxed(&r->key, key_off);
    sg_store_relaxed(&r->ver, version | (deleted ? SG_FEED_DELETE : 0));
    /* SYNC POINT: feed-publish (release): the record is complete */
    sg_store_release(&r->seq, SG_FEED_PUB(p));
    sg__event_signal(&f->published);
}

/* ------------------------------------------------------------------------ */
/* watches                                                                  */

int sg_watch_open(sg_map *m, const char *prefix, size_t plen, sg_watch **out)
{
    if (!m->g->base)
        return sg__fail(SG_ECLOSED, "map used after its grid was closed");
    if (!m->feed)
        return sg__fail(SG_EINVAL, "this map has no change feed");
    if (plen > m->max_key)
        return sg__fail(SG_EKEYSIZE, "prefix of %zu bytes is longer than the map's max_key of %u", plen,
                        m->max_key);
    sg_watch *w = calloc(1, sizeof *w + plen);
    if (!w)
        return sg__fail(SG_ENOMEM, "out of process memory");
    w->m = m;
    /* changes made after this load are the watch's: anything appended
     * before has a position below it */
    w->cursor = sg_load_acquire(&m->feed->tail);
    w->spin = SG_SPIN_START_NS;
    w->plen = plen;
    memcpy(w->prefix, prefix, plen);
    *out = w;
    return SG_OK;
}

void sg_watch_free(sg_watch *w) { free(w); }

uint64_t sg_watch_cursor(sg_watch *w) { return w->cursor; }

int sg_watch_seek(sg_watch *w, uint64_t pos)
{
    SG_CHECK_GRID(w->m->g);
    uint64_t tail = sg_load_acquire(&w->m->feed->tail);
    if (pos > tail)
        return sg__fail(SG_EINVAL, "feed position %llu is past the tail %llu", (unsigned long long)pos,
                        (unsigned long long)tail);
    w->cursor = pos;
    w->stuck_since = 0;
    return SG_OK;
}

struct sg__watch_op {
    sg_watch *w;
    char *kout;
    size_t kcap;
    sg_change *ev;
    uint64_t hash; /* out: the key's hash, checked against the copied key */
};

static int64_t sg__watch_lost(sg_watch *w, sg_change *ev, uint64_t to)
{
    ev->kind = SG_CHANGE_LOST;
    ev->lost = to - w->cursor;
    ev->version = 0;
    ev->klen = 0;
    w->cursor = to;
    w->stuck_since = 0;
    return 1;
}

static int64_t sg__watch_step(void *ctx, int recover)
{
    (void)recover; /* a stuck position is judged by time, not by a claim record */
    struct sg__watch_op *op = ctx;
    sg_watch *w = op->w;
    sg_map *m = w->m;
    for (;;) {
        uint64_t c = w->cursor;
        sg_feed_rec *r = &m->recs[c % m->feed_slots];
        /* SYNC POINT: feed-publish (acquire) */
        uint64_t s = sg_load_acquire(&r->seq);
        if (s == SG_FEED_PUB(c)) {
            uint64_t hash = sg_load_relaxed(&r->hash), key = sg_load_relaxed(&r->key), ver = sg_load_relaxed(&r->ver);
            /* SYNC POINT: block-reuse (seqlock read) */
            sg_fence_acquire();
            if (sg_load_relaxed(&r->seq) != s)
                continue; /* overwritten while we read: lapped, look again */
            sg_block *kb = sg__block(m->g, key);
            uint64_t meta = kb ? sg_load_relaxed(&kb->meta) : 0;
            uint32_t klen = SG_META_LEN(meta);
            if (!kb || SG_META_KIND(meta) != SG_BLK_KEY || klen > op->kcap || klen > m->max_key)
                return sg__watch_lost(w, op->ev, c + 1); /* its key block was freed and reused */
            sg_copy_out(op->kout, kb->payload, klen);
            sg_fence_acquire(); /* SYNC POINT: block-reuse (the key block) */
            if (sg_hash64(op->kout, klen) != hash)
                return sg__watch_lost(w, op->ev, c + 1);
            w->cursor = c + 1;
            w->stuck_since = 0;
            op->hash = hash;
            if (klen < w->plen || memcmp(op->kout, w->prefix, w->plen) != 0)
                continue; /* not a key this watch asked for */
            op->ev->kind = ver & SG_FEED_DELETE ? SG_CHANGE_DELETE : SG_CHANGE_PUT;
            op->ev->version = ver & ~SG_FEED_DELETE;
            op->ev->klen = klen;
            op->ev->lost = 0;
            return 1;
        }
        if (s > SG_FEED_PUB(c)) {
            /* A later lap took the record: go to the oldest one that may
             * still hold its change. */
            return sg__watch_lost(w, op->ev, sg__lap_restart(sg_load_acquire(&m->feed->tail), s, m->feed_slots));
        }
        if (sg_load_acquire(&m->feed->tail) <= c)
            return SG__EMPTY;
        /* claimed and not yet published */
        uint64_t now = sg__mono_ns();
        if (!w->stuck_since)
            w->stuck_since = now;
        if (now - w->stuck_since < SG_FEED_GRACE_NS)
            return SG__STUCK;
        return sg__watch_lost(w, op->ev, c + 1);
    }
}

static int sg__watch_ready(void *ctx)
{
    sg_watch *w = ((struct sg__watch_op *)ctx)->w;
    return sg_load_relaxed(&w->m->recs[w->cursor % w->m->feed_slots].seq) >= SG_FEED_PUB(w->cursor);
}

uint32_t *sg_watch_event(sg_watch *w) { return w->m->g->base ? &w->m->feed->published : NULL; }

/* sg_watch_next, also giving the key's hash */
static int sg__watch_take(sg_watch *w, char *kout, size_t kcap, sg_change *ev, int64_t timeout_ns, uint64_t *hash)
{
    SG_CHECK_GRID(w->m->g);
    struct sg__watch_op op = {w, kout, kcap, ev, 0};
    sg__waiter wt = {
        .g = w->m->g, .obj = w->m->hdr->feed, .event = &w->m->feed->published, .spin = &w->spin,
        .step = sg__watch_step, .ready = sg__watch_ready, .ctx = &op,
        .what = "no change",
    };
    int64_t rc = sg__wait(&wt, timeout_ns);
    *hash = op.hash;
    return rc > 0 ? SG_OK : (int)rc;
}

int sg_watch_next(sg_watch *w, char *kout, size_t kcap, sg_change *ev, int64_t timeout_ns)
{
    uint64_t hash = 0;
    return sg__watch_take(w, kout, kcap, ev, timeout_ns, &hash);
}

#define SG_RECORDS_CHUNK 1024u /* keys read per sg__enter / sg__exit */

int64_t sg_watch_records(sg_watch *w, char *out, size_t cap, uint32_t nparts, const uint8_t *mask, uint64_t *lost,
                         int64_t timeout_ns)
{
    sg_map *m = w->m;
    size_t off = 0, worst = SG_RECORD_HDR + m->max_key + m->max_value;
    *lost = 0;
    if (cap < worst)
        return sg__fail(SG_EINVAL, "records buffer of %zu bytes is below one record of %zu", cap, worst);
    /* The keys' states are read inside one epoch section per chunk, with
     * the hash the feed step already checked; the section is left before
     * any call that may sleep (only the first, while nothing was found). */
    int64_t rc = 0;
    unsigned entered = 0;
    sg__tab head;
    while (cap - off >= worst) {
        char *rec = out + off, *key = rec + SG_RECORD_HDR;
        sg_change ev;
        uint64_t hash = 0;
        int64_t wait = off == 0 && *lost == 0 ? timeout_ns : 0;
        if (wait && entered) {
            sg__exit(m);
            entered = 0;
        }
        rc = sg__watch_take(w, key, m->max_key, &ev, wait, &hash);
        if (rc == SG_EAGAIN) {
            rc = 0;
            break;
        }
        if (rc < 0)
            break;
        if (ev.kind == SG_CHANGE_LOST) {
            *lost += ev.lost;
            continue;
        }
        if (!sg__in_mask(hash, nparts, mask))
            continue;
        if (!entered) {
            if ((rc = sg__enter(m)) != SG_OK)
                break;
            head = (sg__tab){0};
        }
        entered++;
        /* ship the key's state now (at least as new as the change) */
        uint64_t version = 0;
        int64_t n = sg__get_entered(m, &head, key, ev.klen, hash, key + ev.klen, m->max_value, &version);
        if (entered == SG_RECORDS_CHUNK) {
            sg__exit(m);
            entered = 0;
        }
        if (n == SG_ENOKEY && version == 0)
            continue;
        if (n < 0 && n != SG_ENOKEY) {
            if (entered)
                sg__exit(m);
            return n; /* the map is damaged: say so, whatever was gathered */
        }
        sg_record_hdr h = {.klen = (uint16_t)ev.klen, .flags = n < 0, .vlen = n < 0 ? 0 : (uint32_t)n,
                           .version = version};
        memcpy(rec, &h, sizeof h);
        off += SG_RECORD_HDR + ev.klen + h.vlen;
    }
    if (entered)
        sg__exit(m);
    if (rc < 0) /* the feed or the epoch: what was gathered first, the error next time */
        return off || *lost ? (int64_t)off : rc;
    if (off == 0 && *lost == 0)
        return sg__fail_const(SG_EAGAIN, "no change");
    return (int64_t)off;
}
