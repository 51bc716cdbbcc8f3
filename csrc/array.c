/*
 * array.c - shared arrays: whole versions published while readers take
 * consistent snapshots (protocol: sg_layout.h, "Array").
 *
 * Two buffers, each a seqlock; publishers are serialized by a robust writer
 * lock and write the live buffer, then the backup, so that at every
 * instant one of them holds a complete version. A reader copies whichever
 * is stable; a publisher killed mid-copy costs readers nothing, and the
 * next holder of the writer lock repairs the buffer it left torn.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "sg_internal.h"

struct sg_array {
    sg_grid *g;
    sg_array_hdr *hdr;
    uint64_t *buf[2];  /* the live and backup buffers, mapped in this process */
    uint64_t nbytes;   /* checked at open and never re-read from the header */
    uint32_t desc_len; /* likewise: the description is at hdr + 1 */
    uint64_t obj;      /* offset of the header block: names the array in `waiting` */
    uint32_t spin;     /* adaptive spin budget of the writer lock (a hint shared by threads) */
};

/* A snapshot that lost this many rounds (both buffers) to live publishers
 * takes the writer lock. It waits for it as long as publishers make
 * progress (a seq word moved within the last slice of this long), and
 * tries the seqlock again otherwise (a publisher stopped mid-copy). */
#define SG_ARRAY_READ_ROUNDS 2
#define SG_ARRAY_LOCK_SLICE_NS 1000000ll
/* A writer-lock acquirer looks for an offer nobody will accept (see
 * sg__array_take_stale) at least this often while it waits. */
#define SG_ARRAY_STALE_SLICE_NS 10000000ll
/* A reader's copy looks for a publisher's new section this often (bytes;
 * a multiple of 8). */
#define SG_ARRAY_CHUNK (64u << 10)
/* wait_version sleeps at most this long before looking again. */
#define SG_ARRAY_SLEEP_SLICE_NS 100000000ll

/* now + d, saturating: deadlines may be UINT64_MAX (no timeout). */
static uint64_t sg__array_after(uint64_t now, uint64_t d) { return now > UINT64_MAX - d ? UINT64_MAX : now + d; }

static uint64_t sg__array_stride(uint64_t nbytes) { return (nbytes + SG_ARRAY_ALIGN - 1) & ~(uint64_t)(SG_ARRAY_ALIGN - 1); }

/* Payload bytes of an array object: the header, the description, room to
 * align the buffers whatever the block's own alignment, the two buffers. */
static uint64_t sg__array_bytes(uint64_t desc_len, uint64_t nbytes)
{
    return sizeof(sg_array_hdr) + desc_len + SG_ARRAY_ALIGN + 2 * sg__array_stride(nbytes);
}

typedef struct sg__array_ctx {
    const char *desc;
    size_t desc_len;
} sg__array_ctx;

static int sg__array_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    const sg__array_ctx *c = ctx;
    void *p;
    int rc = sg__object_alloc(g, sg__array_bytes(c->desc_len, param[0]), &p, obj);
    if (rc)
        return rc;
    /* Plain stores: published by the dirent-ready release in sg__dir_open.
     * The block is zeroed, so both buffers hold version 0 (all zeroes) with
     * seq 0 (even) and ver 0. */
    sg_array_hdr *h = p;
    h->nbytes = param[0];
    h->stride = sg__array_stride(param[0]);
    h->desc_hash = param[1];
    h->desc_len = (uint32_t)c->desc_len;
    memcpy(h + 1, c->desc, c->desc_len);
    uint64_t end = (uint64_t)((uint8_t *)(h + 1) - g->base) + c->desc_len;
    h->data = (end + SG_ARRAY_ALIGN - 1) & ~(uint64_t)(SG_ARRAY_ALIGN - 1);
    return SG_OK;
}

int sg_array_open(sg_grid *g, const char *name, const char *desc, size_t desc_len, uint64_t nbytes, sg_array **out)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    if (desc && desc_len > SG_ARRAY_DESC_MAX)
        return sg__fail(SG_EINVAL, "array description of %zu bytes is over the limit of %u bytes", desc_len,
                        SG_ARRAY_DESC_MAX);
    if (desc && nbytes > SG_ARRAY_MAX_BYTES)
        return sg__fail(SG_EINVAL, "array of %llu bytes is over the limit of %llu bytes",
                        (unsigned long long)nbytes, (unsigned long long)SG_ARRAY_MAX_BYTES);
    uint64_t param[4] = {nbytes, desc ? sg_hash64(desc, desc_len) : 0, desc_len, 0};
    sg__array_ctx ctx = {desc, desc_len};
    sg_dirent *e;
    int rc = sg__dir_open(g, name, SG_OBJ_ARRAY, param, desc ? sg__array_create : NULL, &ctx, &e);
    if (rc)
        return rc; /* SG_NO: absent, and desc NULL asked not to create it */
    sg_array_hdr *h = sg__object_payload(g, e, sizeof(sg_array_hdr));
    if (!h)
        return SG_ECORRUPT;
    /* The header is shared memory anyone may have damaged: read each field
     * once, bound it, and use only these checked copies from here on (a
     * second read could see another value than the one checked). */
    uint64_t hn = h->nbytes, hs = h->stride, hd = h->data, hh = h->desc_hash;
    uint32_t hl = h->desc_len;
    /* payload offset of buffer 0; only meaningful once hd is checked */
    uint64_t first = sizeof *h + hl;
    /* hn <= SG_ARRAY_MAX_BYTES, so 2 * hs cannot wrap; hd is bounded by the
     * segment before anything is added to it, so the block check's size
     * (at most the segment's) cannot wrap either */
    if (hn != e->param[0] || hl != e->param[2] || hh != e->param[1] || hn > SG_ARRAY_MAX_BYTES ||
        hl > SG_ARRAY_DESC_MAX || hs != sg__array_stride(hn) || hd % SG_ARRAY_ALIGN ||
        hd < e->obj + SG_BLOCK_HDR + first || hd > g->size || g->size - hd < 2 * hs ||
        !sg__object_payload(g, e, hd - e->obj - SG_BLOCK_HDR + 2 * hs))
        return sg__fail(SG_ECORRUPT, "array '%s': header disagrees with its directory entry", name);
    if (desc && (desc_len != hl || memcmp(desc, h + 1, desc_len) != 0))
        return sg__fail(SG_EMISMATCH, "array '%s' exists as %.*s; it was asked for as %.*s", name,
                        (int)(hl < 400 ? hl : 400), (const char *)(h + 1), (int)(desc_len < 400 ? desc_len : 400),
                        desc);
    static const char *const field[] = {"nbytes"};
    const uint64_t asked[] = {desc ? nbytes : 0};
    if ((rc = sg__object_check(e, "array", name, field, asked, 1)))
        return rc;
    sg_array *a = calloc(1, sizeof *a);
    if (!a)
        return sg__fail(SG_ENOMEM, "out of process memory");
    a->g = g;
    a->hdr = h;
    a->buf[SG_ARRAY_LIVE] = (uint64_t *)(g->base + hd);
    a->buf[SG_ARRAY_BACKUP] = (uint64_t *)(g->base + hd + hs);
    a->nbytes = hn;
    a->desc_len = hl;
    a->obj = e->obj;
    a->spin = SG_SPIN_START_NS;
    sg_ref_inc(&g->refs);
    /* A publisher that died mid-copy left a buffer torn: repair it now if
     * the writer lock is free or its holder dead (readers do not need it,
     * but the live buffer is what the caller is about to map). */
    sg_array_buf *b = h->buf;
    if ((sg_load_relaxed(&b[0].seq) | sg_load_relaxed(&b[1].seq)) & 1 ||
        sg_load_relaxed(&b[0].ver) != sg_load_relaxed(&b[1].ver))
        (void)sg_array_repair(a, 0);
    *out = a;
    return SG_OK;
}

void sg_array_free(sg_array *a)
{
    if (!a)
        return;
    sg_grid *g = a->g;
    free(a);
    sg__grid_unref(g);
}

int64_t sg_array_desc(sg_array *a, char *out, size_t cap)
{
    SG_CHECK_GRID(a->g);
    uint32_t n = a->desc_len;
    if (cap) /* out may be NULL when asking for the length */
        memcpy(out, a->hdr + 1, n < cap ? n : cap);
    return n;
}

uint64_t sg_array_nbytes(sg_array *a) { return a->nbytes; }

void *sg_array_live(sg_array *a) { return a->g->base ? a->buf[SG_ARRAY_LIVE] : NULL; }

/* The newest complete version: `version`, or LIVE's if that is ahead (a
 * publisher killed between its LIVE section and its `version` store leaves
 * LIVE one ahead until the next writer-lock holder repairs; snapshot already
 * returns LIVE's version then, so version and wait must not lag it). */
static uint64_t sg__array_newest(sg_array *a)
{
    sg_array_hdr *h = a->hdr;
    /* SYNC POINT: array-version (acquire) */
    uint64_t v = sg_load_acquire(&h->version);
    /* SYNC POINT: array-seq (acquire, then the acquire fence and the same
     * seq again, as in sg__array_copy): an unchanged even seq means `ver`
     * was stored by the section that completed it, not by a later one */
    uint64_t s = sg_load_acquire(&h->buf[SG_ARRAY_LIVE].seq);
    if (s & 1)
        return v;
    uint64_t vl = sg_load_relaxed(&h->buf[SG_ARRAY_LIVE].ver);
    sg_fence_acquire();
    if (sg_load_relaxed(&h->buf[SG_ARRAY_LIVE].seq) != s)
        return v;
    return vl > v ? vl : v;
}

uint64_t sg_array_version(sg_array *a)
{
    if (!a->g->base)
        return 0;
    return sg__array_newest(a);
}

/* ------------------------------------------------------------------------ */
/* the seqlock: readers                                                     */

/* Copy buffer i into out if it holds one version throughout the copy: 1
 * with *version set, 0 if it was being written. s and v are the buffer's
 * seq (loaded with acquire) and ver (loaded after it). */
static int sg__array_copy(sg_array *a, int i, uint64_t s, uint64_t v, void *out, uint64_t *version)
{
    if (s & 1)
        return 0;
    /* In chunks, giving up early once a publisher has begun a section
     * here (a hint only: the check after the fence decides) */
    for (uint64_t off = 0; off < a->nbytes; off += SG_ARRAY_CHUNK) {
        if (off && sg_load_relaxed(&a->hdr->buf[i].seq) != s)
            return 0;
        uint64_t n = a->nbytes - off < SG_ARRAY_CHUNK ? a->nbytes - off : SG_ARRAY_CHUNK;
        sg_copy_out((char *)out + off, a->buf[i] + off / 8, n);
    }
    /* SYNC POINT: array-seq (acquire fence): had the copy (or the load of
     * v) read a store of a later section, the load below sees that
     * section's odd seq or later */
    sg_fence_acquire();
    if (sg_load_relaxed(&a->hdr->buf[i].seq) != s)
        return 0;
    *version = v;
    return 1;
}

static int sg__array_read(sg_array *a, int i, void *out, uint64_t *version)
{
    sg_array_buf *b = &a->hdr->buf[i];
    /* SYNC POINT: array-seq (acquire): an even seq makes the section that
     * stored it visible: its ver and every word of its copy */
    uint64_t s = sg_load_acquire(&b->seq);
    return sg__array_copy(a, i, s, sg_load_relaxed(&b->ver), out, version);
}

/* One round: the buffer that holds the newest complete version and that
 * the next publisher section will reach last, then the other one. The
 * backup when the live buffer is being written or both hold the same
 * version (a publish starts with the live buffer); the live buffer when
 * the backup is being written or is behind (it is next). */
static int sg__array_try(sg_array *a, void *out, uint64_t *version)
{
    sg_array_buf *b = a->hdr->buf;
    /* SYNC POINT: array-seq (acquire), both buffers; live first (see the
     * layout: the version returned was the newest complete one when the
     * live buffer's seq was loaded) */
    uint64_t sl = sg_load_acquire(&b[SG_ARRAY_LIVE].seq), vl = sg_load_relaxed(&b[SG_ARRAY_LIVE].ver);
    uint64_t sb = sg_load_acquire(&b[SG_ARRAY_BACKUP].seq), vb = sg_load_relaxed(&b[SG_ARRAY_BACKUP].ver);
    if ((sl & 1) || (!(sb & 1) && vb == vl))
        return sg__array_copy(a, SG_ARRAY_BACKUP, sb, vb, out, version) ||
               sg__array_read(a, SG_ARRAY_LIVE, out, version);
    return sg__array_copy(a, SG_ARRAY_LIVE, sl, vl, out, version) ||
           sg__array_read(a, SG_ARRAY_BACKUP, out, version);
}

/* ------------------------------------------------------------------------ */
/* the seqlock: the writer-lock holder                                      */

/* Write version v into buffer i, from private memory src or (src NULL) from
 * the other buffer, as one seqlock section. */
static void sg__array_write(sg_array *a, int i, uint64_t v, const void *src)
{
    sg_array_buf *b = &a->hdr->buf[i];
    /* Acquire: after a takeover, the dead holder's seq store happened
     * without a release we could pair with; the seq only grows either way. */
    uint64_t s = sg_load_acquire(&b->seq);
    /* A fresh odd value even if the dead holder left it odd: a reader must
     * see our own odd store, ordered by our fence, before our data. */
    uint64_t odd = (s & 1) ? s + 2 : s + 1;
    sg_store_relaxed(&b->seq, odd);
    /* SYNC POINT: array-seq (release fence): a reader whose copy sees any
     * store below then loads this odd seq (or later) and discards its copy */
    sg_fence_release();
    sg_store_relaxed(&b->ver, v);
    if (src)
        sg_copy_in(a->buf[i], src, a->nbytes);
    else
        sg_copy_shared(a->buf[i], a->buf[1 - i], a->nbytes);
    /* SYNC POINT: array-seq (release): buffer i holds version v whole */
    sg_store_release(&b->seq, odd + 1);
}

/* With the writer lock held: leave both buffers holding the newest
 * complete version, and `version` naming it. SG_OK if something was
 * repaired, SG_NO if nothing needed it, SG_ECORRUPT if the words break the
 * protocol (both buffers odd, or the backup ahead of the live buffer). */
static int sg__array_fix(sg_array *a)
{
    sg_array_hdr *h = a->hdr;
    uint64_t sl = sg_load_acquire(&h->buf[SG_ARRAY_LIVE].seq), sb = sg_load_acquire(&h->buf[SG_ARRAY_BACKUP].seq);
    uint64_t vl = sg_load_relaxed(&h->buf[SG_ARRAY_LIVE].ver), vb = sg_load_relaxed(&h->buf[SG_ARRAY_BACKUP].ver);
    if (sl & sb & 1)
        return sg__fail(SG_ECORRUPT, "array: both buffers are marked as being written (seq %llu and %llu)",
                        (unsigned long long)sl, (unsigned long long)sb);
    if (!(sl & 1) && !(sb & 1) && vb > vl)
        return sg__fail(SG_ECORRUPT, "array: the backup buffer holds version %llu, ahead of the live one's %llu",
                        (unsigned long long)vb, (unsigned long long)vl);
    int fixed = 0;
    if (sl & 1) {
        /* died writing the live buffer: the backup holds the newest version */
        sg__array_write(a, SG_ARRAY_LIVE, vb, NULL);
        vl = vb;
        fixed = 1;
    } else if ((sb & 1) || vb != vl) {
        /* died writing the backup, or between the two sections */
        sg__array_write(a, SG_ARRAY_BACKUP, vl, NULL);
        fixed = 1;
    }
    if (fixed)
        sg_fetch_add_relaxed(&h->repairs, 1);
    uint64_t cur = sg_load_relaxed(&h->version);
    if (cur != vl) {
        if (cur > vl)
            return sg__fail(SG_ECORRUPT, "array: version %llu is ahead of the live buffer's %llu",
                            (unsigned long long)cur, (unsigned long long)vl);
        /* died between its live section and the version store */
        sg_store_release(&h->version, vl); /* SYNC POINT: array-version (release) */
        sg__event_signal(&h->published);
        fixed = 1;
    }
    return fixed ? SG_OK : SG_NO;
}

/* The writer lock is offered to a reader that no longer waits for it:
 * owner = W | OFFERED with W dead or not (or no longer) registered in
 * `want`. Only a holder that stopped or died between its offer and its
 * check of `want` leaves one (see the layout). Take the lock over from such
 * an offer: SG_OK if we did, SG_NO if there is none or we lost the CAS. */
static int sg__array_take_stale(sg_array *a, uint64_t me)
{
    sg_array_hdr *h = a->hdr;
    uint64_t o = sg_load_seq_cst(&h->writer.owner);
    if (!(o & SG_ARRAY_OFFERED))
        return SG_NO;
    uint64_t w = o & ~SG_ARRAY_OFFERED;
    if (w != me && sg_load_seq_cst(&h->want) == w && sg__thread_alive(w))
        return SG_NO; /* W waits for it and will take it */
    /* SYNC POINT: lock (acquire): the offering holder's release (its CAS
     * heads the release sequence our CAS reads from) */
    if (!sg_cas_acquire(&h->writer.owner, &o, me))
        return SG_NO;
    sg_fetch_add_relaxed(&h->writer.acquisitions, 1);
    return SG_OK;
}

/* The robust lock, plus: an offer nobody will accept is a free lock. */
static int sg__array_lock(sg_array *a, int64_t timeout_ns)
{
    uint64_t deadline = sg__deadline(timeout_ns), me = sg__thread_word();
    for (;;) {
        if (sg__array_take_stale(a, me) == SG_OK)
            return SG_OK;
        uint64_t now = sg__mono_ns(), left = deadline > now ? deadline - now : 0;
        int64_t slice = left < (uint64_t)SG_ARRAY_STALE_SLICE_NS ? (int64_t)left : SG_ARRAY_STALE_SLICE_NS;
        int rc = sg__mutex_acquire(a->g, a->obj, &a->hdr->writer, &a->spin, slice);
        if (rc == SG_OWNERDIED)
            return SG_OK;
        if (rc != SG_EAGAIN || left <= (uint64_t)SG_ARRAY_STALE_SLICE_NS)
            return rc;
    }
}

/* Release the writer lock, or offer it to the reader registered in `want`:
 * one CAS of `owner` from us to W | OFFERED, so that whenever we stop or
 * die the lock is either ours (an ordinary dead holder) or offered. */
static void sg__array_unlock(sg_array *a)
{
    sg_array_hdr *h = a->hdr;
    uint64_t me = sg__thread_word();
    uint64_t w = sg_load_seq_cst(&h->want);
    if (w && w != me && !sg__thread_alive(w)) {
        sg_cas_acq_rel(&h->want, &w, 0); /* a dead reader's registration */
    } else if (w && w != me) {
        uint64_t cur = me, offer = w | SG_ARRAY_OFFERED;
        /* SYNC POINT: lock (release): what we wrote holding it is visible
         * to whoever takes the offer (W accepting, or a taker of a stale
         * offer), as with any release. Seq_cst with W's withdrawal: W's
         * CAS of `want` to 0, then of `owner` from the offer; ours of
         * `owner`, then the load of `want` below. Either W sees the offer
         * or we see it gone. */
        if (sg_cas_seq_cst(&h->writer.owner, &cur, offer)) {
            sg__event_signal(&h->writer.event);
            if (sg_load_seq_cst(&h->want) != w) {
                /* W withdrew without seeing it: take it back, freeing the
                 * lock (lost the CAS: W or a taker has it) */
                if (sg_cas_seq_cst(&h->writer.owner, &offer, 0))
                    sg__event_signal(&h->writer.event);
            }
            return;
        }
    }
    sg__mutex_release(&h->writer);
}

/* A reader registered in `want` as `me`: wait until the writer lock is
 * ours (offered to us and accepted, taken free or from a dead holder) or
 * until the deadline, or a slice without progress of the publishers (the
 * holder may be stopped: the seqlock serves us then). Never waits on
 * another process: the offer is one CAS of `owner` by the holder and our
 * acceptance is our own CAS. SG_OK holding the lock, unregistered; SG_EAGAIN
 * or an error, unregistered and not holding it. */
static int sg__array_wait_offer(sg_array *a, uint64_t me, uint64_t deadline)
{
    sg_array_hdr *h = a->hdr;
    const uint64_t offer = me | SG_ARRAY_OFFERED;
    int rc = SG_EAGAIN;
    uint64_t seqs = sg_load_relaxed(&h->buf[0].seq) + sg_load_relaxed(&h->buf[1].seq);
    uint64_t slice_end = sg__array_after(sg__mono_ns(), SG_ARRAY_LOCK_SLICE_NS);
    for (;;) {
        uint64_t o = offer;
        /* SYNC POINT: lock (acquire): the holder's release CAS offering it */
        if (sg_cas_acquire(&h->writer.owner, &o, me)) {
            sg_fetch_add_relaxed(&h->writer.acquisitions, 1);
            break;
        }
        rc = sg__mutex_acquire(a->g, a->obj, &h->writer, &a->spin, 0);
        if (rc == SG_OK || rc == SG_OWNERDIED)
            break;
        if (rc == SG_EAGAIN && sg__array_take_stale(a, me) == SG_OK)
            break;
        if (rc != SG_EAGAIN)
            goto withdraw;
        uint64_t now = sg__mono_ns();
        if (now >= deadline)
            goto withdraw;
        if (now >= slice_end) {
            /* still worth waiting while publishers make progress: the
             * offer comes at the end of the current publish */
            uint64_t moved = sg_load_relaxed(&h->buf[0].seq) + sg_load_relaxed(&h->buf[1].seq);
            if (moved == seqs)
                goto withdraw; /* stopped (or idle): go back to the seqlock */
            seqs = moved;
            slice_end = sg__array_after(now, SG_ARRAY_LOCK_SLICE_NS);
        }
        uint32_t v = sg__event_prepare(&h->writer.event);
        uint64_t cur = sg_load_acquire(&h->writer.owner);
        if (cur == 0 || (cur & SG_ARRAY_OFFERED))
            continue;
        if ((rc = sg__event_sleep(a->g, a->obj, &h->writer.event, v, slice_end < deadline ? slice_end : deadline,
                                  SG_ARRAY_LOCK_SLICE_NS)) &&
            rc != SG_EAGAIN)
            goto withdraw;
    }
    /* We hold the lock and live: nobody else writes `want` while it names
     * us (holders clear only a dead reader's, readers CAS only from 0). */
    sg_store_seq_cst(&h->want, 0);
    return SG_OK;
withdraw:;
    /* Seq_cst, paired with the holder's offer (see sg__array_unlock): an
     * offer made before our withdrawal is seen by the CAS below, and a
     * holder that offers later sees `want` changed and takes it back. */
    uint64_t mine = me;
    (void)sg_cas_seq_cst(&h->want, &mine, 0);
    uint64_t o = offer;
    if (sg_cas_seq_cst(&h->writer.owner, &o, rc == SG_EAGAIN ? me : 0)) {
        /* SYNC POINT: lock (acquire, by the seq_cst CAS): the offering
         * holder's release. Timed out: the lock is here, so use it (a
         * bounded copy). An error: decline it, freeing the lock. */
        if (rc == SG_EAGAIN) {
            sg_fetch_add_relaxed(&h->writer.acquisitions, 1);
            return SG_OK;
        }
        sg__event_signal(&h->writer.event);
    }
    return rc == SG_EAGAIN ? sg__fail(SG_EAGAIN, "array: the writer lock stayed held") : rc;
}

int sg_array_repair(sg_array *a, int64_t timeout_ns)
{
    SG_CHECK_GRID(a->g);
    int rc = sg__array_lock(a, timeout_ns);
    if (rc)
        return rc;
    rc = sg__array_fix(a);
    sg__array_unlock(a);
    return rc;
}

int sg_array_publish(sg_array *a, const void *src, int64_t timeout_ns, uint64_t *version)
{
    SG_CHECK_GRID(a->g);
    sg_array_hdr *h = a->hdr;
    int rc = sg__array_lock(a, timeout_ns);
    if (rc)
        return rc;
    if ((rc = sg__array_fix(a)) < 0) {
        sg__array_unlock(a);
        return rc;
    }
    uint64_t v = sg_load_relaxed(&h->buf[SG_ARRAY_LIVE].ver) + 1;
    sg__array_write(a, SG_ARRAY_LIVE, v, src);
    /* SYNC POINT: array-version (release): the live buffer holds v (and its
     * even seq is stored) before anyone reads v here */
    sg_store_release(&h->version, v);
    sg_fetch_add_relaxed(&h->publishes, 1);
    sg__event_signal(&h->published);
    sg__array_write(a, SG_ARRAY_BACKUP, v, src);
    sg__array_unlock(a);
    *version = v;
    return SG_OK;
}

int sg_array_snapshot(sg_array *a, void *out, int64_t timeout_ns, uint64_t *version)
{
    SG_CHECK_GRID(a->g);
    sg_array_hdr *h = a->hdr;
    uint64_t deadline = sg__deadline(timeout_ns);
    for (int round = 0;; round++) {
        if (sg__array_try(a, out, version))
            return SG_OK;
        if (round < SG_ARRAY_READ_ROUNDS) {
            sg_cpu_relax();
            continue;
        }
        /* Publishers keep winning: copy under the writer lock. */
        uint64_t now = sg__mono_ns();
        if (now >= deadline)
            return sg__fail(SG_EAGAIN, "array snapshot: publishers kept overwriting both buffers; timed out");
        uint64_t slice_end = deadline - now < (uint64_t)SG_ARRAY_LOCK_SLICE_NS ? deadline
                                                                               : now + SG_ARRAY_LOCK_SLICE_NS;
        uint64_t me = sg__thread_word(), none = 0;
        int rc;
        if (sg_cas_acq_rel(&h->want, &none, me)) /* registered: the holder offers the lock to us */
            rc = sg__array_wait_offer(a, me, deadline);
        else /* another reader is registered: it is served first */
            rc = sg__array_lock(a, (int64_t)(slice_end - now));
        if (rc == SG_EAGAIN)
            continue; /* a publisher may be stopped mid-copy: the seqlock still works */
        if (rc)
            return rc;
        if ((rc = sg__array_fix(a)) >= 0) {
            rc = sg__array_read(a, SG_ARRAY_LIVE, out, version)
                     ? SG_OK
                     : sg__fail(SG_ECORRUPT, "array: the live buffer changed while the writer lock was held");
            sg_fetch_add_relaxed(&h->locked_reads, 1);
        }
        sg__array_unlock(a);
        return rc;
    }
}

int sg_array_wait(sg_array *a, uint64_t after, int64_t timeout_ns, uint64_t *version)
{
    SG_CHECK_GRID(a->g);
    sg_array_hdr *h = a->hdr;
    uint64_t deadline = sg__deadline(timeout_ns);
    for (;;) {
        uint64_t v = sg__array_newest(a);
        if (v > after) {
            *version = v;
            return SG_OK;
        }
        if (timeout_ns == 0)
            return sg__fail(SG_EAGAIN, "array version is still %llu", (unsigned long long)v);
        /* A publisher signals after its `version` store; one killed before
         * it does not signal, and the sleep's slice bounds how long that
         * version (already complete in LIVE) goes unnoticed. */
        uint32_t ev = sg__event_prepare(&h->published);
        if (sg__array_newest(a) > after)
            continue;
        int rc = sg__event_sleep(a->g, a->obj, &h->published, ev, deadline, SG_ARRAY_SLEEP_SLICE_NS);
        if (rc == SG_EAGAIN)
            return sg__fail(SG_EAGAIN, "array version is still %llu: timed out", (unsigned long long)v);
        if (rc)
            return rc;
    }
}

int sg_array_info_get(sg_array *a, sg_array_info *out)
{
    SG_CHECK_GRID(a->g);
    sg_array_hdr *h = a->hdr;
    memset(out, 0, sizeof *out);
    out->nbytes = a->nbytes;
    out->version = sg__array_newest(a);
    out->publishes = sg_load_relaxed(&h->publishes);
    out->repairs = sg_load_relaxed(&h->repairs);
    out->locked_reads = sg_load_relaxed(&h->locked_reads);
    out->owner_deaths = sg_load_relaxed(&h->writer.owner_deaths);
    for (int i = 0; i < 2; i++) {
        out->seq[i] = sg_load_acquire(&h->buf[i].seq);
        out->ver[i] = sg_load_relaxed(&h->buf[i].ver);
    }
    out->desc_len = a->desc_len;
    uint64_t w = sg_load_acquire(&h->writer.owner);
    out->writer_tid = (uint32_t)(w & SG_PW_PID_MASK);
    out->writer_alive = w ? (uint32_t)sg__thread_alive(w) : 0;
    out->waiters = sg__waiters(a->g, a->obj);
    return SG_OK;
}
