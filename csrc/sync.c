/*
 * sync.c - counters and robust locks.
 *
 * A counter is one int64 word: add by CAS (so overflow is refused, not
 * wrapped), get/set, compare-and-set. A lock is an owner word holding the
 * holder's thread word (thread id and start time, see sg_layout.h): taken
 * by CAS from 0, released by the holder only, and taken over by CAS from a
 * dead holder, which the new holder is told (SG_OWNERDIED), as with a
 * robust pthread mutex. Sleeping is on the lock's event word.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "sg_internal.h"

struct sg_counter {
    sg_grid *g;
    sg_counter_hdr *hdr;
};

struct sg_lock {
    sg_grid *g;
    sg_lock_hdr *hdr;
    uint64_t obj;
    uint32_t spin;
};

/* A waiter re-checks the holder's liveness at least this often. */
#define SG_LOCK_SLICE_NS 10000000ll

static int sg__plain_create(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx)
{
    (void)param;
    void *p;
    /* zeroed: counter 0, lock free; published by the dirent-ready release */
    return sg__object_alloc(g, *(const uint64_t *)ctx, &p, obj);
}

static int sg__plain_open(sg_grid *g, const char *name, uint32_t kind, uint64_t bytes, void **payload, uint64_t *obj)
{
    if (!g || !g->base)
        return sg__fail(SG_ECLOSED, "grid is closed");
    const uint64_t param[4] = {0, 0, 0, 0};
    sg_dirent *e;
    int rc = sg__dir_open(g, name, kind, param, sg__plain_create, &bytes, &e);
    if (rc)
        return rc;
    *obj = e->obj;
    *payload = sg__object_payload(g, e, bytes);
    return *payload ? SG_OK : SG_ECORRUPT;
}

/* ------------------------------------------------------------------------ */
/* counter                                                                  */

int sg_counter_open(sg_grid *g, const char *name, sg_counter **out)
{
    void *p;
    uint64_t obj;
    int rc = sg__plain_open(g, name, SG_OBJ_COUNTER, sizeof(sg_counter_hdr), &p, &obj);
    if (rc)
        return rc;
    sg_counter *c = calloc(1, sizeof *c);
    if (!c)
        return sg__fail(SG_ENOMEM, "out of process memory");
    c->g = g;
    c->hdr = p;
    sg_ref_inc(&g->refs);
    *out = c;
    return SG_OK;
}

void sg_counter_free(sg_counter *c)
{
    if (!c)
        return;
    sg_grid *g = c->g;
    free(c);
    sg__grid_unref(g);
}

/* Counter words are acquire/release (SYNC POINT: counter), so a counter can
 * publish what its writer did before changing it. */
int sg_counter_get(sg_counter *c, int64_t *value)
{
    SG_CHECK_GRID(c->g);
    *value = (int64_t)sg_load_acquire(&c->hdr->value);
    return SG_OK;
}

int sg_counter_set(sg_counter *c, int64_t v)
{
    SG_CHECK_GRID(c->g);
    sg_store_release(&c->hdr->value, (uint64_t)v);
    return SG_OK;
}

int sg_counter_add(sg_counter *c, int64_t delta, int64_t *result)
{
    SG_CHECK_GRID(c->g);
    uint64_t cur = sg_load_relaxed(&c->hdr->value);
    for (;;) {
        int64_t now = (int64_t)cur, next;
        if (__builtin_add_overflow(now, delta, &next))
            return sg__fail(SG_EOVERFLOW, "counter %lld + %lld leaves the int64 range; nothing changed",
                            (long long)now, (long long)delta);
        if (sg_cas_acq_rel(&c->hdr->value, &cur, (uint64_t)next)) {
            *result = next;
            return SG_OK;
        }
    }
}

int sg_counter_compare_and_set(sg_counter *c, int64_t expected, int64_t desired)
{
    SG_CHECK_GRID(c->g);
    uint64_t e = (uint64_t)expected;
    return sg_cas_acq_rel(&c->hdr->value, &e, (uint64_t)desired) ? SG_OK : SG_NO;
}

/* ------------------------------------------------------------------------ */
/* lock                                                                     */

int sg_lock_open(sg_grid *g, const char *name, sg_lock **out)
{
    void *p;
    uint64_t obj;
    int rc = sg__plain_open(g, name, SG_OBJ_LOCK, sizeof(sg_lock_hdr), &p, &obj);
    if (rc)
        return rc;
    sg_lock *l = calloc(1, sizeof *l);
    if (!l)
        return sg__fail(SG_ENOMEM, "out of process memory");
    l->g = g;
    l->hdr = p;
    l->obj = obj;
    l->spin = SG_SPIN_START_NS;
    sg_ref_inc(&g->refs);
    *out = l;
    return SG_OK;
}

void sg_lock_free(sg_lock *l)
{
    if (!l)
        return;
    sg_grid *g = l->g;
    free(l);
    sg__grid_unref(g);
}

/* One attempt: SG_OK or SG_OWNERDIED when taken, SG__EMPTY when held by a
 * live thread (or, without check_dead, by anyone). */
static int sg__mutex_try(sg_lock_hdr *h, uint64_t me, int check_dead)
{
    uint64_t cur = 0;
    /* SYNC POINT: lock (acquire): what the last holder wrote is visible */
    if (sg_cas_acquire(&h->owner, &cur, me)) {
        sg_fetch_add_relaxed(&h->acquisitions, 1);
        return SG_OK;
    }
    if (!check_dead || sg__thread_alive(cur))
        return SG__EMPTY;
    /* The holder died: take the lock over from it, unless someone else did. */
    if (!sg_cas_acquire(&h->owner, &cur, me))
        return SG__EMPTY;
    sg_fetch_add_relaxed(&h->acquisitions, 1);
    sg_fetch_add_relaxed(&h->owner_deaths, 1);
    return SG_OWNERDIED;
}

static int sg__mutex_free_now(void *hdr) { return sg_load_relaxed(&((sg_lock_hdr *)hdr)->owner) == 0; }

int sg__mutex_acquire(sg_grid *g, uint64_t obj, sg_lock_hdr *h, uint32_t *spin, int64_t timeout_ns)
{
    uint64_t me = sg__thread_word();
    int rc = sg__mutex_try(h, me, 0);
    if (rc != SG__EMPTY)
        return rc;
    if (sg_load_relaxed(&h->owner) == me)
        return sg__fail(SG_EDEADLK, "this thread already holds the lock (it is not reentrant)");
    uint64_t deadline = sg__deadline(timeout_ns);
    for (;;) {
        if (timeout_ns != 0)
            sg__spin(spin, sg__mutex_free_now, h);
        if ((rc = sg__mutex_try(h, me, 1)) != SG__EMPTY)
            return rc;
        if (timeout_ns == 0)
            return sg__fail(SG_EAGAIN, "lock is held by thread %llu",
                            (unsigned long long)(sg_load_relaxed(&h->owner) & SG_PW_PID_MASK));
        uint32_t v = sg__event_prepare(&h->event);
        if ((rc = sg__mutex_try(h, me, 0)) != SG__EMPTY)
            return rc;
        rc = sg__event_sleep(g, obj, &h->event, v, deadline, SG_LOCK_SLICE_NS);
        if (rc == SG_EAGAIN)
            return sg__fail(SG_EAGAIN, "lock is held by thread %llu: timed out",
                            (unsigned long long)(sg_load_relaxed(&h->owner) & SG_PW_PID_MASK));
        if (rc)
            return rc;
    }
}

int sg__mutex_release(sg_lock_hdr *h)
{
    uint64_t cur = sg__thread_word();
    /* SYNC POINT: lock (release): what we wrote holding it is visible to the next holder */
    if (!sg_cas_release(&h->owner, &cur, 0)) {
        if (cur == 0)
            return sg__fail(SG_ENOTOWNER, "release of a lock that is not held");
        return sg__fail(SG_ENOTOWNER, "release of a lock held by another thread (tid %llu)",
                        (unsigned long long)(cur & SG_PW_PID_MASK));
    }
    sg__event_signal(&h->event);
    return SG_OK;
}

uint32_t *sg_lock_event(sg_lock *l) { return l->g->base ? &l->hdr->event : NULL; }

int sg_lock_acquire(sg_lock *l, int64_t timeout_ns)
{
    SG_CHECK_GRID(l->g);
    return sg__mutex_acquire(l->g, l->obj, l->hdr, &l->spin, timeout_ns);
}

int sg_lock_release(sg_lock *l)
{
    SG_CHECK_GRID(l->g);
    return sg__mutex_release(l->hdr);
}

int sg_lock_info_get(sg_lock *l, sg_lock_info *out)
{
    SG_CHECK_GRID(l->g);
    sg_lock_hdr *h = l->hdr;
    memset(out, 0, sizeof *out);
    uint64_t w = sg_load_acquire(&h->owner);
    out->owner_tid = (uint32_t)(w & SG_PW_PID_MASK);
    out->owner_alive = w ? (uint32_t)sg__thread_alive(w) : 0;
    out->acquisitions = sg_load_relaxed(&h->acquisitions);
    out->owner_deaths = sg_load_relaxed(&h->owner_deaths);
    out->waiters = sg__waiters(l->g, l->obj);
    return SG_OK;
}
