/*
 * topic.c - publish/subscribe over a broadcast ring (protocol: sg_layout.h,
 * "Topic"). Every subscriber sees every message published after it joined,
 * in one publication order shared by all subscribers (the order of claimed
 * positions). Lossless topics make publishers wait for the slowest live
 * subscriber; lossy ones never wait for subscribers, and a lapped
 * subscriber is told how many messages it lost.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "sg_internal.h"

struct sg_topic {
    sg_grid *g;
    sg_topic_hdr *hdr;
    sg_sub_rec *subs;
    uint8_t *cells;
    uint64_t cap;
    uint32_t max_message;
    uint32_t stride;
    uint32_t lossless;
    uint32_t max_subs;
    uint64_t obj;
    uint32_t spin;
    int refs; /* 1 for the topic handle + 1 per subscription */
};

struct sg_sub {
    sg_topic *t;
    sg_sub_rec *rec;
    uint64_t cursor; /* private copy of rec->cursor, which only we write */
    uint32_t spin;
};

static inline sg_cell *sg__tcell(const sg_topic *t, uint64_t q)
{
    return (sg_cell *)(t->cells + (q % t->cap) * t->stride);
}

static uint32_t sg__topic_stride(uint64_t max_message) { return (uint32_t)(sizeof(sg_cell) + ((max_message + 15) & ~15ull)); }

static uint64_t sg__topic_bytes(const uint64_t param[4])
{
    return sizeof(sg_topic_hdr) + param[3] * sizeof(sg_sub_rec) + param[0] * sg__topic_stride(param[1]);
}

static int sg__topic_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    (void)ctx;
    void *p;
    int rc = sg__object_alloc(g, sg__topic_bytes(param), &p, obj);
    if (rc)
        return rc;
    /* zeroed: every cell "never written", every record free; published by
     * the dirent-ready release in sg__dir_open */
    sg_topic_hdr *h = p;
    h->capacity = param[0];
    h->max_message = (uint32_t)param[1];
    h->stride = sg__topic_stride(param[1]);
    h->lossless = param[2] == 1;
    h->max_subs = (uint32_t)param[3];
    return SG_OK;
}

int sg_topic_open(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_message, uint32_t lossless,
                  uint32_t max_subscribers, sg_topic **out)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    if (capacity > (1ull << 32))
        return sg__fail(SG_EINVAL, "capacity %llu is over the limit of %llu", (unsigned long long)capacity, 1ull << 32);
    if (max_message > SG_MAX_MESSAGE_LIMIT)
        return sg__fail(SG_EINVAL, "max_message %u is over the limit of %u bytes", max_message, SG_MAX_MESSAGE_LIMIT);
    if (lossless > 2)
        return sg__fail(SG_EINVAL, "lossless must be 0 (any), 1 (lossless) or 2 (lossy), not %u", lossless);
    if (max_subscribers > SG_MAX_SUBSCRIBERS_LIMIT)
        return sg__fail(SG_EINVAL, "max_subscribers %u is over the limit of %u", max_subscribers,
                        SG_MAX_SUBSCRIBERS_LIMIT);
    uint64_t param[4] = {capacity ? capacity : SG_DEFAULT_TOPIC_CAPACITY, max_message ? max_message : SG_DEFAULT_MAX_MESSAGE,
                         lossless ? lossless : 1, max_subscribers ? max_subscribers : SG_DEFAULT_MAX_SUBSCRIBERS};
    if (sg__topic_bytes(param) > UINT32_MAX)
        return sg__fail(SG_EINVAL, "a topic of %llu messages of %llu bytes is over the limit of 4 GiB",
                        (unsigned long long)param[0], (unsigned long long)param[1]);
    sg_dirent *e;
    int rc = sg__dir_open(g, name, SG_OBJ_TOPIC, param, sg__topic_create, NULL, &e);
    if (rc)
        return rc;
    static const char *const field[] = {"capacity", "max_message", "lossless(1)/lossy(2)", "max_subscribers"};
    const uint64_t asked[] = {capacity, max_message, lossless, max_subscribers};
    if ((rc = sg__object_check(e, "topic", name, field, asked, 4)))
        return rc;
    sg_topic_hdr *h = sg__object_payload(g, e, sizeof(sg_topic_hdr));
    if (!h)
        return SG_ECORRUPT;
    const uint64_t have[4] = {h->capacity, h->max_message, h->lossless ? 1u : 2u, h->max_subs};
    if (memcmp(have, e->param, sizeof have) || h->capacity == 0 || h->stride != sg__topic_stride(h->max_message) ||
        !sg__object_payload(g, e, sg__topic_bytes(have)))
        return sg__fail(SG_ECORRUPT, "topic '%s': header disagrees with its directory entry", name);
    sg_topic *t = calloc(1, sizeof *t);
    if (!t)
        return sg__fail(SG_ENOMEM, "out of process memory");
    t->g = g;
    t->hdr = h;
    t->subs = (sg_sub_rec *)(h + 1);
    t->cells = (uint8_t *)(t->subs + h->max_subs);
    t->cap = h->capacity;
    t->max_message = h->max_message;
    t->stride = h->stride;
    t->lossless = h->lossless;
    t->max_subs = h->max_subs;
    t->obj = e->obj;
    t->spin = SG_SPIN_START_NS;
    t->refs = 1;
    sg_ref_inc(&g->refs);
    *out = t;
    return SG_OK;
}

static void sg__topic_unref(sg_topic *t)
{
    if (sg_ref_dec(&t->refs) == 0) {
        sg_grid *g = t->g;
        free(t);
        sg__grid_unref(g);
    }
}

void sg_topic_free(sg_topic *t)
{
    if (t)
        sg__topic_unref(t);
}

/* ------------------------------------------------------------------------ */
/* publishing                                                               */

/* The lowest cursor of any subscriber record with an owner, or q (the tail
 * loaded before the scan) if none; a lower bound of every cursor now and
 * later (SYNC POINT: topic-join). With `recover`, records of dead processes
 * whose cursor blocks position q are freed. Stores the result as the floor. */
static uint64_t sg__topic_scan(sg_topic *t, uint64_t q, int recover)
{
    uint64_t low = q;
    for (uint32_t i = 0; i < t->max_subs; i++) {
        sg_sub_rec *s = &t->subs[i];
        uint64_t w = sg_load_seq_cst(&s->owner);
        if (!w)
            continue;
        /* SYNC POINT: topic-cursor (acquire, seq_cst): the subscriber's
         * copies of the messages below its cursor are done */
        uint64_t c = sg_load_seq_cst(&s->cursor);
        if (recover && c + t->cap <= q && !sg__word_alive(w)) {
            if (sg_cas_seq_cst(&s->owner, &w, 0))
                sg_fetch_add_relaxed(&t->hdr->removed, 1);
            continue;
        }
        if (c < low)
            low = c;
    }
    /* SYNC POINT: topic-floor (release): a publisher that trusts this floor
     * (acquire) sees the cursors it was computed from, and with them the
     * subscribers' finished copies */
    sg_store_release(&t->hdr->floor, low);
    return low;
}

/* One attempt at publishing. SG__STUCK when a subscriber (lossless) or the
 * previous lap's publisher holds the cell; with `recover`, dead ones are
 * removed or skipped, and a live subscriber gives SG__EMPTY (sleep on
 * `advanced`; the next spin re-checks for dead ones). The claim mutex is
 * held only from the claim record to the publish. */
static int64_t sg__topic_try_publish(sg_topic *t, const char *data, size_t len, int recover)
{
    sg_topic_hdr *h = t->hdr;
    for (;;) {
        /* SYNC POINT: topic-join (publisher): the tail before the floor */
        uint64_t q = sg_load_seq_cst(&h->tail);
        if (t->lossless && q >= t->cap && sg_load_acquire(&h->floor) <= q - t->cap &&
            sg__topic_scan(t, q, recover) <= q - t->cap)
            return recover ? SG__EMPTY : SG__STUCK; /* a subscriber still needs message q - cap */
        sg_cell *c = sg__tcell(t, q);
        uint64_t s = sg_load_acquire(&c->seq);
        if (s >= SG_TOPIC_WRITING(q))
            continue; /* q was claimed meanwhile: tail has moved on */
        if (q >= t->cap && s != SG_TOPIC_PUB(q - t->cap) && s != SG_TOPIC_SKIP(q - t->cap)) {
            /* The publisher of q - cap claimed it and has not finished. */
            uint64_t prev = q - t->cap;
            if (!recover || sg__claim_live(t->g, SG_CLAIM(t->obj, SG_CLAIM_PUBLISH), prev))
                return SG__STUCK;
            if (sg_cas_acq_rel(&c->seq, &s, SG_TOPIC_SKIP(prev)))
                sg_fetch_add_relaxed(&h->skipped, 1);
            continue;
        }
        int rc = sg__claim_begin(t->g);
        if (rc)
            return rc;
        sg__claim_set(t->g, SG_CLAIM(t->obj, SG_CLAIM_PUBLISH), q, q + 1);
        if (!sg_cas_seq_cst(&h->tail, &q, q + 1)) {
            sg__claim_end(t->g);
            continue;
        }
        /* A seqlock write: lossy subscribers may be copying the cell's old
         * message and find out from seq that it changed under them.
         * SYNC POINT: block-reuse (writer): WRITING is ordered before the
         * payload words by the release fence, as after a block allocation. */
        sg_store_relaxed(&c->seq, SG_TOPIC_WRITING(q));
        sg_fence_release();
        sg_copy_in(c->data, data, len);
        sg_store_relaxed(&c->len, len);
        /* SYNC POINT: topic-publish (release): the message is complete */
        sg_store_release(&c->seq, SG_TOPIC_PUB(q));
        sg__claim_end(t->g);
        /* subscribers wait on published; a publisher stuck behind this
         * cell (the previous lap of another publisher) waits on advanced */
        sg__event_signal2(&h->published, &h->advanced);
        return 1;
    }
}

struct sg__pub_op {
    sg_topic *t;
    const char *data;
    size_t len;
};

static int64_t sg__pub_step(void *ctx, int recover)
{
    struct sg__pub_op *op = ctx;
    return sg__topic_try_publish(op->t, op->data, op->len, recover);
}

static int sg__pub_ready(void *ctx)
{
    sg_topic *t = ((struct sg__pub_op *)ctx)->t;
    uint64_t q = sg_load_relaxed(&t->hdr->tail);
    if (t->lossless && q >= t->cap && sg_load_relaxed(&t->hdr->floor) <= q - t->cap) {
        /* the floor is only refreshed by a scan: look at the records */
        for (uint32_t i = 0; i < t->max_subs; i++)
            if (sg_load_relaxed(&t->subs[i].owner) && sg_load_relaxed(&t->subs[i].cursor) + t->cap <= q)
                return 0;
        return 1;
    }
    uint64_t s = sg_load_relaxed(&sg__tcell(t, q)->seq);
    return q < t->cap || s == SG_TOPIC_PUB(q - t->cap) || s == SG_TOPIC_SKIP(q - t->cap);
}

int sg_topic_publish(sg_topic *t, const char *data, size_t len, int64_t timeout_ns)
{
    SG_CHECK_GRID(t->g);
    if (len > t->max_message)
        return sg__fail(SG_EVALSIZE, "message of %zu bytes is over the topic's max_message of %u bytes", len,
                        t->max_message);
    struct sg__pub_op op = {t, data, len};
    sg__waiter w = {
        .g = t->g, .obj = t->obj, .event = &t->hdr->advanced, .spin = &t->spin,
        .step = sg__pub_step, .ready = sg__pub_ready, .ctx = &op,
        .what = "topic is full: a subscriber is a whole capacity behind, or the publisher of the message one "
                "capacity back is still writing it",
    };
    int64_t rc = sg__wait(&w, timeout_ns);
    return rc > 0 ? SG_OK : (int)rc;
}

/* ------------------------------------------------------------------------ */
/* subscribing                                                              */

int sg_topic_subscribe(sg_topic *t, sg_sub **out)
{
    SG_CHECK_GRID(t->g);
    int rc = sg__own_slot(t->g, "subscribe"); /* a subscriber record names our slot's word */
    if (rc)
        return rc;
    sg_sub *s = calloc(1, sizeof *s);
    if (!s)
        return sg__fail(SG_ENOMEM, "out of process memory");
    uint64_t me = t->g->self;
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < t->max_subs; i++) {
            sg_sub_rec *r = &t->subs[i];
            uint64_t w = sg_load_seq_cst(&r->owner);
            if (pass == 0 ? w != 0 : (w == 0 || sg__word_alive(w)))
                continue;
            /* SYNC POINT: topic-join (subscriber): own the record, then
             * read the tail as the cursor. Until the cursor is stored the
             * record shows its old cursor, a lower bound: publishers wait
             * rather than overwrite. */
            if (!sg_cas_seq_cst(&r->owner, &w, me))
                continue;
            sg_fetch_add_relaxed(&t->hdr->joins, 1);
            uint64_t c = sg_load_seq_cst(&t->hdr->tail);
            sg_store_seq_cst(&r->cursor, c);
            if (t->lossless)
                sg__event_signal(&t->hdr->advanced);
            s->t = t;
            s->rec = r;
            s->cursor = c;
            s->spin = SG_SPIN_START_NS;
            sg_ref_inc(&t->refs);
            *out = s;
            return SG_OK;
        }
    }
    free(s);
    return sg__fail(SG_EFULL, "topic has %u subscribers, its max_subscribers", t->max_subs);
}

void sg_sub_free(sg_sub *s)
{
    if (!s)
        return;
    sg_topic *t = s->t;
    if (t->g->base) {
        uint64_t me = t->g->self;
        sg_cas_seq_cst(&s->rec->owner, &me, 0);
        if (t->lossless)
            sg__event_signal(&t->hdr->advanced);
    }
    free(s);
    sg__topic_unref(t);
}

static void sg__sub_advance(sg_sub *s, uint64_t c)
{
    s->cursor = c;
    /* SYNC POINT: topic-cursor (release): our copy of every message before
     * c is done, so a publisher that sees c may overwrite them */
    sg_store_release(&s->rec->cursor, c);
    if (s->t->lossless)
        sg__event_signal(&s->t->hdr->advanced);
}

struct sg__sub_op {
    sg_sub *s;
    char *out;
    size_t cap;
    uint64_t *lost;
};

static int64_t sg__sub_step(void *ctx, int recover)
{
    struct sg__sub_op *op = ctx;
    sg_sub *sub = op->s;
    sg_topic *t = sub->t;
    for (;;) {
        uint64_t c = sub->cursor;
        sg_cell *cell = sg__tcell(t, c);
        /* SYNC POINT: topic-publish (acquire) */
        uint64_t s = sg_load_acquire(&cell->seq);
        if (s == SG_TOPIC_PUB(c)) {
            uint64_t len = sg_load_relaxed(&cell->len);
            if (len <= t->max_message)
                sg_copy_out(op->out, cell->data, len);
            /* SYNC POINT: block-reuse (seqlock read): the copy is good only
             * if the cell still holds message c after it */
            sg_fence_acquire();
            if (sg_load_relaxed(&cell->seq) != s)
                continue; /* overwritten while we copied: look again (lapped) */
            if (len > t->max_message)
                return sg__fail(SG_ECORRUPT, "topic: message %llu has length %llu, over max_message %u",
                                (unsigned long long)c, (unsigned long long)len, t->max_message);
            sg__sub_advance(sub, c + 1);
            return (int64_t)len;
        }
        if (s == SG_TOPIC_SKIP(c)) {
            sg__sub_advance(sub, c + 1);
            continue;
        }
        if (s > SG_TOPIC_SKIP(c)) {
            /* A later lap overwrote message c: it was claimed for c + cap at
             * least, so tail > c + cap. Go to the oldest message that may
             * still be there. */
            uint64_t nc = sg__lap_restart(sg_load_acquire(&t->hdr->tail), s, t->cap);
            *op->lost = nc - c;
            sg__sub_advance(sub, nc);
            return sg__fail(SG_ELAPPED, "subscriber was lapped: %llu messages lost", (unsigned long long)(nc - c));
        }
        /* not published yet */
        if (sg_load_acquire(&t->hdr->tail) > c) {
            if (!recover || sg__claim_live(t->g, SG_CLAIM(t->obj, SG_CLAIM_PUBLISH), c))
                return SG__STUCK;
            if (sg_cas_acq_rel(&cell->seq, &s, SG_TOPIC_SKIP(c)))
                sg_fetch_add_relaxed(&t->hdr->skipped, 1);
            continue;
        }
        return SG__EMPTY;
    }
}

static int sg__sub_ready(void *ctx)
{
    sg_sub *sub = ((struct sg__sub_op *)ctx)->s;
    uint64_t c = sub->cursor;
    return sg_load_relaxed(&sg__tcell(sub->t, c)->seq) >= SG_TOPIC_PUB(c);
}

int64_t sg_sub_get(sg_sub *s, char *out, size_t cap, int64_t timeout_ns, uint64_t *lost)
{
    sg_topic *t = s->t;
    SG_CHECK_GRID(t->g);
    if (cap < t->max_message)
        return sg__fail(SG_EINVAL, "buffer of %zu bytes is below the topic's max_message of %u", cap, t->max_message);
    if (sg_load_relaxed(&s->rec->owner) != t->g->self)
        return sg__fail(SG_ECLOSED, "subscription was removed (its process was taken for dead)");
    *lost = 0;
    struct sg__sub_op op = {s, out, cap, lost};
    sg__waiter w = {
        .g = t->g, .obj = t->obj, .event = &t->hdr->published, .spin = &s->spin,
        .step = sg__sub_step, .ready = sg__sub_ready, .ctx = &op,
        .what = "no message published",
    };
    return sg__wait(&w, timeout_ns);
}

uint32_t *sg_topic_event(sg_topic *t) { return t->g->base ? &t->hdr->advanced : NULL; }

uint32_t *sg_sub_event(sg_sub *s) { return s->t->g->base ? &s->t->hdr->published : NULL; }

int64_t sg_sub_pending(sg_sub *s)
{
    SG_CHECK_GRID(s->t->g);
    uint64_t tail = sg_load_acquire(&s->t->hdr->tail);
    return (int64_t)(tail > s->cursor ? tail - s->cursor : 0);
}

int sg_topic_info_get(sg_topic *t, sg_topic_info *out)
{
    SG_CHECK_GRID(t->g);
    sg_topic_hdr *h = t->hdr;
    memset(out, 0, sizeof *out);
    out->capacity = t->cap;
    out->max_message = t->max_message;
    out->lossless = t->lossless;
    out->max_subscribers = t->max_subs;
    out->tail = sg_load_acquire(&h->tail);
    out->skipped = sg_load_relaxed(&h->skipped);
    out->removed = sg_load_relaxed(&h->removed);
    out->oldest_cursor = out->tail;
    for (uint32_t i = 0; i < t->max_subs; i++) {
        uint64_t w = sg_load_acquire(&t->subs[i].owner);
        if (!w)
            continue;
        if (sg__word_alive(w))
            out->subscribers++;
        else
            out->dead_subscribers++; /* still holding publishers back until one removes it */
        uint64_t c = sg_load_acquire(&t->subs[i].cursor);
        if (c < out->oldest_cursor)
            out->oldest_cursor = c;
    }
    out->waiters = sg__waiters(t->g, t->obj);
    return SG_OK;
}
