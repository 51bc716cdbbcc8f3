/*
 * ring.c - the bounded MPMC ring queue (protocol: sg_layout.h, "Ring").
 *
 * Every message is delivered once, FIFO per producer: positions are claimed
 * in order by CAS on tail (producers) and head (consumers), and a cell
 * changes hands only through its seq word. Waiting is a short adaptive spin,
 * then a futex sleep on the ring's events. A claimant that died is found
 * through the claim records of the process table, and its cell is skipped
 * (producer died) or released (consumer died) by whoever is stuck behind it.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "sg_internal.h"

struct sg_ring {
    sg_grid *g;
    sg_ring_hdr *hdr;
    uint8_t *cells;
    uint64_t slots;
    uint32_t slot_size;
    uint32_t stride;
    uint64_t obj;   /* offset of the header block: names the ring in claim records */
    uint32_t spin;  /* adaptive spin budget in ns (relaxed: a hint shared by threads) */
};

static inline sg_cell *sg__cell(const sg_ring *r, uint64_t q) { return (sg_cell *)(r->cells + (q % r->slots) * r->stride); }

static uint32_t sg__ring_stride(uint64_t slot_size) { return (uint32_t)(sizeof(sg_cell) + ((slot_size + 15) & ~15ull)); }

static int sg__ring_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    (void)ctx;
    uint32_t stride = sg__ring_stride(param[1]);
    void *p;
    int rc = sg__object_alloc(g, sizeof(sg_ring_hdr) + param[0] * stride, &p, obj);
    if (rc)
        return rc;
    /* plain stores: published by the dirent-ready release in sg__dir_open */
    sg_ring_hdr *h = p;
    h->slots = param[0];
    h->slot_size = (uint32_t)param[1];
    h->stride = stride;
    uint8_t *cells = (uint8_t *)(h + 1);
    for (uint64_t i = 0; i < param[0]; i++)
        ((sg_cell *)(cells + i * stride))->seq = SG_RING_FREE(i);
    return SG_OK;
}

int sg_ring_open(sg_grid *g, const char *name, uint64_t slots, uint32_t slot_size, sg_ring **out)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    if (slots > (1ull << 32))
        return sg__fail(SG_EINVAL, "slots %llu is over the limit of %llu", (unsigned long long)slots, 1ull << 32);
    if (slot_size > SG_MAX_MESSAGE_LIMIT)
        return sg__fail(SG_EINVAL, "slot_size %u is over the limit of %u bytes", slot_size, SG_MAX_MESSAGE_LIMIT);
    uint64_t param[4] = {slots ? slots : SG_DEFAULT_RING_SLOTS, slot_size ? slot_size : SG_DEFAULT_SLOT_SIZE, 0, 0};
    if (sizeof(sg_ring_hdr) + param[0] * sg__ring_stride(param[1]) > UINT32_MAX)
        return sg__fail(SG_EINVAL, "a ring of %llu slots of %llu bytes is over the limit of 4 GiB",
                        (unsigned long long)param[0], (unsigned long long)param[1]);
    sg_dirent *e;
    int rc = sg__dir_open(g, name, SG_OBJ_RING, param, sg__ring_create, NULL, &e);
    if (rc)
        return rc;
    static const char *const field[] = {"slots", "slot_size"};
    const uint64_t asked[] = {slots, slot_size};
    if ((rc = sg__object_check(e, "ring", name, field, asked, 2)))
        return rc;
    sg_ring_hdr *h = sg__object_payload(g, e, sizeof(sg_ring_hdr));
    if (!h)
        return SG_ECORRUPT;
    if (h->slots != e->param[0] || h->slot_size != e->param[1] || h->slots == 0 ||
        h->stride != sg__ring_stride(h->slot_size) || !sg__object_payload(g, e, sizeof *h + h->slots * h->stride))
        return sg__fail(SG_ECORRUPT, "ring '%s': header disagrees with its directory entry", name);
    sg_ring *r = calloc(1, sizeof *r);
    if (!r)
        return sg__fail(SG_ENOMEM, "out of process memory");
    r->g = g;
    r->hdr = h;
    r->cells = (uint8_t *)(h + 1);
    r->slots = h->slots;
    r->slot_size = h->slot_size;
    r->stride = h->stride;
    r->obj = e->obj;
    r->spin = SG_SPIN_START_NS;
    sg_ref_inc(&g->refs);
    *out = r;
    return SG_OK;
}

void sg_ring_free(sg_ring *r)
{
    if (!r)
        return;
    sg_grid *g = r->g;
    free(r);
    sg__grid_unref(g);
}

/* ------------------------------------------------------------------------ */
/* one attempt each way; the claim mutex is held only inside these          */

/* Put a prefix of n messages without waiting. Returns how many (> 0),
 * SG__EMPTY (no room), SG__STUCK (the next cell is held by a consumer that
 * claimed it and has not freed it), or an error. With `recover`, a stuck
 * cell whose consumer is dead is freed instead (its message is dropped).
 * The claim mutex is held only from the claim record to the publish; the
 * liveness checks (/proc reads) run outside it. */
static int64_t sg__ring_try_put(sg_ring *r, const char *data, const uint32_t *lens, size_t n, int recover)
{
    sg_ring_hdr *h = r->hdr;
    for (;;) {
        uint64_t q = sg_load_relaxed(&h->tail);
        sg_cell *c = sg__cell(r, q);
        /* SYNC POINT: ring-free (acquire): the consumer of the cell's last
         * message is done with it */
        uint64_t s = sg_load_acquire(&c->seq);
        if (s == SG_RING_FREE(q)) {
            size_t k = 1;
            while (k < n && k < r->slots && sg_load_acquire(&sg__cell(r, q + k)->seq) == SG_RING_FREE(q + k))
                k++;
            int rc = sg__claim_begin(r->g);
            if (rc)
                return rc;
            sg__claim_set(r->g, SG_CLAIM(r->obj, SG_CLAIM_PUT), q, q + k);
            if (!sg_cas_acq_rel(&h->tail, &q, q + k)) {
                sg__claim_end(r->g);
                continue; /* another producer took q */
            }
            /* The claimed cells are ours alone until we store FULL. The
             * copies are relaxed word copies all the same: the ring's block
             * may be a recycled map block that a stalled map reader is still
             * copying (SYNC POINT: block-reuse). */
            for (size_t i = 0; i < k; i++) {
                sg_cell *ci = sg__cell(r, q + i);
                sg_copy_in(ci->data, data, lens[i]);
                sg_store_relaxed(&ci->len, lens[i]);
                /* SYNC POINT: ring-full (release): data and len are complete */
                sg_store_release(&ci->seq, SG_RING_FULL(q + i));
                data += lens[i];
            }
            sg__claim_end(r->g);
            sg__event_signal(&h->not_empty);
            return (int64_t)k;
        }
        if (s > SG_RING_FREE(q))
            continue; /* q was claimed and written meanwhile: tail has moved on */
        /* The cell still belongs to position q - slots. */
        uint64_t prev = q - r->slots;
        if (q < r->slots || (s != SG_RING_FULL(prev) && s != SG_RING_SKIP(prev)))
            return SG__EMPTY; /* its producer has not finished: full, as far as we are concerned */
        if (sg_load_acquire(&h->head) <= prev)
            return SG__EMPTY; /* full: no consumer has taken it yet */
        /* A consumer claimed prev and has not freed the cell. */
        if (!recover || sg__claim_live(r->g, SG_CLAIM(r->obj, SG_CLAIM_GET), prev))
            return SG__STUCK;
        if (sg_cas_acq_rel(&c->seq, &s, SG_RING_FREE(q))) {
            if (s == SG_RING_FULL(prev))
                sg_fetch_add_relaxed(&h->dropped, 1);
            sg__event_signal(&h->not_full);
        }
    }
}

/* Take up to max messages without waiting (at most cap / slot_size). Returns
 * how many (> 0), SG__EMPTY, SG__STUCK (the next cell is claimed by a
 * producer that has not written it), or an error. With `recover`, a stuck
 * cell whose producer is dead is skipped. */
static int64_t sg__ring_try_get(sg_ring *r, char *out, size_t cap, uint32_t *lens, size_t max, int recover)
{
    sg_ring_hdr *h = r->hdr;
    size_t kmax = cap / r->slot_size;
    if (kmax > max)
        kmax = max;
    if (kmax > r->slots)
        kmax = r->slots;
    for (;;) {
        uint64_t q = sg_load_relaxed(&h->head);
        sg_cell *c = sg__cell(r, q);
        /* SYNC POINT: ring-full (acquire): the message in the cell is complete */
        uint64_t s = sg_load_acquire(&c->seq);
        if (s == SG_RING_FULL(q) || s == SG_RING_SKIP(q)) {
            size_t k = 1;
            while (k < kmax) {
                uint64_t sk = sg_load_acquire(&sg__cell(r, q + k)->seq);
                if (sk != SG_RING_FULL(q + k) && sk != SG_RING_SKIP(q + k))
                    break;
                k++;
            }
            int rc = sg__claim_begin(r->g);
            if (rc)
                return rc;
            sg__claim_set(r->g, SG_CLAIM(r->obj, SG_CLAIM_GET), q, q + k);
            if (!sg_cas_acq_rel(&h->head, &q, q + k)) {
                sg__claim_end(r->g);
                continue; /* another consumer took q */
            }
            size_t msgs = 0, corrupt = 0;
            for (size_t i = 0; i < k; i++) {
                sg_cell *ci = sg__cell(r, q + i);
                if (sg_load_relaxed(&ci->seq) == SG_RING_FULL(q + i)) {
                    uint64_t len = sg_load_relaxed(&ci->len);
                    if (len > r->slot_size) {
                        corrupt++;
                    } else {
                        sg_copy_out(out, ci->data, len);
                        out += len;
                        lens[msgs++] = (uint32_t)len;
                    }
                }
                /* SYNC POINT: ring-free (release): our copy is done */
                sg_store_release(&ci->seq, SG_RING_FREE(q + i + r->slots));
            }
            sg__claim_end(r->g);
            sg__event_signal(&h->not_full);
            if (corrupt)
                return sg__fail(SG_ECORRUPT, "ring: %zu cells held a length over slot_size %u", corrupt, r->slot_size);
            if (msgs == 0)
                continue; /* only skipped positions: look further */
            return (int64_t)msgs;
        }
        if (s > SG_RING_SKIP(q))
            continue; /* q was taken meanwhile: head has moved on */
        if (s == SG_RING_FREE(q) && sg_load_acquire(&h->tail) > q) {
            /* claimed by a producer that has not written it yet */
            if (!recover || sg__claim_live(r->g, SG_CLAIM(r->obj, SG_CLAIM_PUT), q))
                return SG__STUCK;
            if (sg_cas_acq_rel(&c->seq, &s, SG_RING_SKIP(q)))
                sg_fetch_add_relaxed(&h->skipped, 1);
            continue;
        }
        return SG__EMPTY;
    }
}

/* Cheap looks for the spin loops: no claim, no ordering needed. */
static int sg__ring_readable(const sg_ring *r)
{
    uint64_t q = sg_load_relaxed(&r->hdr->head);
    uint64_t s = sg_load_relaxed(&sg__cell(r, q)->seq);
    return s == SG_RING_FULL(q) || s == SG_RING_SKIP(q);
}

static int sg__ring_writable(const sg_ring *r)
{
    uint64_t q = sg_load_relaxed(&r->hdr->tail);
    return sg_load_relaxed(&sg__cell(r, q)->seq) == SG_RING_FREE(q);
}

/* ------------------------------------------------------------------------ */
/* waiting                                                                  */

struct sg__ring_op {
    sg_ring *r;
    const char *data;
    const uint32_t *lens;
    char *out;
    size_t cap;
    uint32_t *olens;
    size_t n;
};

static int64_t sg__ring_put_step(void *ctx, int recover)
{
    struct sg__ring_op *op = ctx;
    return sg__ring_try_put(op->r, op->data, op->lens, op->n, recover);
}

static int64_t sg__ring_get_step(void *ctx, int recover)
{
    struct sg__ring_op *op = ctx;
    return sg__ring_try_get(op->r, op->out, op->cap, op->olens, op->n, recover);
}

static int sg__ring_put_ready(void *ctx) { return sg__ring_writable(((struct sg__ring_op *)ctx)->r); }
static int sg__ring_get_ready(void *ctx) { return sg__ring_readable(((struct sg__ring_op *)ctx)->r); }

static int64_t sg__ring_wait(sg_ring *r, int put, const char *data, const uint32_t *lens, size_t n, char *out,
                             size_t cap, uint32_t *olens, int64_t timeout_ns)
{
    SG_CHECK_GRID(r->g);
    struct sg__ring_op op = {r, data, lens, out, cap, olens, n};
    sg__waiter w = {
        .g = r->g,
        .obj = r->obj,
        .event = put ? &r->hdr->not_full : &r->hdr->not_empty,
        .spin = &r->spin,
        .step = put ? sg__ring_put_step : sg__ring_get_step,
        .ready = put ? sg__ring_put_ready : sg__ring_get_ready,
        .ctx = &op,
        .what = put ? "ring is full" : "ring is empty",
    };
    return sg__wait(&w, timeout_ns);
}

int sg_ring_put(sg_ring *r, const char *data, size_t len, int64_t timeout_ns)
{
    if (len > r->slot_size)
        return sg__fail(SG_EVALSIZE, "message of %zu bytes is over the ring's slot_size of %u bytes", len, r->slot_size);
    uint32_t l = (uint32_t)len;
    int64_t rc = sg__ring_wait(r, 1, data, &l, 1, NULL, 0, NULL, timeout_ns);
    return rc > 0 ? SG_OK : (int)rc;
}

int64_t sg_ring_get(sg_ring *r, char *out, size_t cap, int64_t timeout_ns)
{
    if (cap < r->slot_size)
        return sg__fail(SG_EINVAL, "buffer of %zu bytes is below the ring's slot_size of %u", cap, r->slot_size);
    uint32_t len;
    int64_t rc = sg__ring_wait(r, 0, NULL, NULL, 1, out, cap, &len, timeout_ns);
    return rc > 0 ? (int64_t)len : rc;
}

int64_t sg_ring_put_many(sg_ring *r, const char *data, const uint32_t *lens, size_t n, int64_t timeout_ns)
{
    for (size_t i = 0; i < n; i++)
        if (lens[i] > r->slot_size)
            return sg__fail(SG_EVALSIZE, "message %zu of %u bytes is over the ring's slot_size of %u bytes; "
                                         "nothing was enqueued", i, lens[i], r->slot_size);
    if (n == 0)
        return 0;
    return sg__ring_wait(r, 1, data, lens, n, NULL, 0, NULL, timeout_ns);
}

int64_t sg_ring_get_many(sg_ring *r, char *out, size_t cap, uint32_t *lens, size_t max, int64_t timeout_ns)
{
    if (cap < r->slot_size)
        return sg__fail(SG_EINVAL, "buffer of %zu bytes is below the ring's slot_size of %u", cap, r->slot_size);
    if (max == 0)
        return 0;
    return sg__ring_wait(r, 0, NULL, NULL, max, out, cap, lens, timeout_ns);
}

uint32_t *sg_ring_event(sg_ring *r, int put)
{
    if (!r->g->base)
        return NULL;
    return put ? &r->hdr->not_full : &r->hdr->not_empty;
}

int sg_ring_info_get(sg_ring *r, sg_ring_info *out)
{
    SG_CHECK_GRID(r->g);
    sg_ring_hdr *h = r->hdr;
    memset(out, 0, sizeof *out);
    out->slots = r->slots;
    out->slot_size = r->slot_size;
    out->head = sg_load_acquire(&h->head);
    out->tail = sg_load_acquire(&h->tail);
    out->skipped = sg_load_relaxed(&h->skipped);
    out->dropped = sg_load_relaxed(&h->dropped);
    out->waiters = sg__waiters(r->g, r->obj);
    return SG_OK;
}

int64_t sg_ring_depth(sg_ring *r)
{
    SG_CHECK_GRID(r->g);
    /* head first: tail read after it is at least as new, so no negative
     * depth from a consumer passing between the two loads */
    uint64_t head = sg_load_acquire(&r->hdr->head), tail = sg_load_acquire(&r->hdr->tail);
    uint64_t d = tail > head ? tail - head : 0;
    return (int64_t)(d < r->slots ? d : r->slots);
}

int sg_ring_validate(sg_ring *r)
{
    SG_CHECK_GRID(r->g);
    sg_ring_hdr *h = r->hdr;
    uint64_t head = sg_load_acquire(&h->head), tail = sg_load_acquire(&h->tail);
    if (head > tail + r->slots || tail > head + r->slots || tail >= SG_RING_MAX_POS)
        return sg__fail(SG_ECORRUPT, "ring: head %llu and tail %llu are more than %llu slots apart",
                        (unsigned long long)head, (unsigned long long)tail, (unsigned long long)r->slots);
    /* Position p in [tail - slots, tail + slots) owns cell p % slots in one of
     * these states, depending on where p is relative to head and tail. */
    uint64_t base = tail > r->slots ? tail - r->slots : 0;
    for (uint64_t i = 0; i < r->slots; i++) {
        uint64_t s = sg_load_acquire(&sg__cell(r, base + i)->seq);
        uint64_t p = s >> 2; /* the position the cell is at */
        int ok;
        if (p < head) /* taken by a consumer that has not freed it yet: tail waits behind it */
            ok = ((s & 3) == 1 || (s & 3) == 2) && p + r->slots >= tail;
        else if (p < tail) /* produced: written, skipped, or claimed and not written */
            ok = (s & 3) <= 2;
        else /* free for the producer of p, the next lap of a position below tail */
            ok = (s & 3) == 0 && p < tail + r->slots;
        if (!ok || p % r->slots != (base + i) % r->slots) {
            if (sg_load_acquire(&h->head) != head || sg_load_acquire(&h->tail) != tail)
                return sg__fail(SG_EBUSY, "ring changed during validation");
            return sg__fail(SG_ECORRUPT, "ring: cell %llu has sequence word %llu with head %llu and tail %llu",
                            (unsigned long long)((base + i) % r->slots), (unsigned long long)s,
                            (unsigned long long)head, (unsigned long long)tail);
        }
    }
    if (sg_load_acquire(&h->head) != head || sg_load_acquire(&h->tail) != tail)
        return sg__fail(SG_EBUSY, "ring changed during validation");
    return SG_OK;
}

sg_ring_io *sg_ring_io_new(sg_ring *r, size_t max_items)
{
    if (max_items == 0)
        max_items = 1;
    sg_ring_io *io = calloc(1, sizeof *io);
    if (!io)
        return NULL;
    io->ring = r;
    io->max_items = max_items;
    io->buf = malloc(max_items * r->slot_size);
    io->lens = malloc(max_items * sizeof *io->lens);
    if (!io->buf || !io->lens) {
        sg_ring_io_free(io);
        return NULL;
    }
    return io;
}

void sg_ring_io_free(sg_ring_io *io)
{
    if (!io)
        return;
    free(io->buf);
    free(io->lens);
    free(io);
}

int64_t sg_ring_io_get(sg_ring_io *io, int64_t timeout_ns)
{
    return sg_ring_get(io->ring, io->buf, io->ring->slot_size, timeout_ns);
}

int64_t sg_ring_io_get_many(sg_ring_io *io, size_t max, int64_t timeout_ns)
{
    if (max > io->max_items)
        max = io->max_items;
    int64_t n = sg_ring_get_many(io->ring, io->buf, max * io->ring->slot_size, io->lens, max, timeout_ns);
    if (n > 0) {
        uint32_t u = io->lens[0];
        for (int64_t i = 1; i < n && u != UINT32_MAX; i++)
            if (io->lens[i] != u)
                u = UINT32_MAX;
        io->uniform = u;
    }
    return n;
}
