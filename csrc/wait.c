/*
 * wait.c - what the messaging structures share: claim records in the
 * process table, events (futex sleeping), deadlines, thread words.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "sg_internal.h"

uint64_t sg__mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t sg__deadline(int64_t timeout_ns)
{
    if (timeout_ns < 0)
        return UINT64_MAX;
    return sg__mono_ns() + (uint64_t)timeout_ns;
}

/* ------------------------------------------------------------------------ */
/* process-private state: the claim mutex and the thread-word cache         */

/* One claim record per process slot, so the threads of a process take
 * turns between claiming cells and finishing them (a few hundred ns; the
 * mutex is never held while sleeping). */
static pthread_mutex_t sg__claim_mutex = PTHREAD_MUTEX_INITIALIZER;
/* Bumped in a forked child: thread words cached before the fork name the
 * parent's threads. */
static unsigned sg__fork_gen;
static pthread_once_t sg__atfork_once = PTHREAD_ONCE_INIT;

static void sg__child_after_fork(void)
{
    /* Only the forking thread lives on in the child; a mutex another parent
     * thread held would stay locked for good. */
    pthread_mutex_init(&sg__claim_mutex, NULL);
    __atomic_add_fetch(&sg__fork_gen, 1, __ATOMIC_RELAXED);
}

static void sg__register_atfork(void) { pthread_atfork(NULL, NULL, sg__child_after_fork); }

unsigned sg__fork_generation(void)
{
    pthread_once(&sg__atfork_once, sg__register_atfork);
    return __atomic_load_n(&sg__fork_gen, __ATOMIC_RELAXED);
}

int sg__check_fork(sg_grid *g)
{
    if (__builtin_expect(g->fork_gen == __atomic_load_n(&sg__fork_gen, __ATOMIC_RELAXED), 1))
        return SG_OK;
    /* The parent's slot, word and claim record are the parent's: sharing
     * them would let the parent's claim_end clear our claims. */
    return sg_grid_after_fork(g);
}

uint64_t sg__thread_word(void)
{
    static _Thread_local uint64_t word;
    static _Thread_local unsigned gen;
    pthread_once(&sg__atfork_once, sg__register_atfork);
    unsigned now = __atomic_load_n(&sg__fork_gen, __ATOMIC_RELAXED);
    if (!word || gen != now || !(word >> SG_PW_PID_BITS)) {
        /* a word whose start time could not be read is not cached: the
         * next call tries /proc again */
        word = sg__task_word((uint32_t)syscall(SYS_gettid));
        gen = now;
    }
    return word;
}

/* ------------------------------------------------------------------------ */
/* claim records                                                            */

static sg_proc *sg__proc(sg_grid *g, uint32_t i) { return (sg_proc *)(g->base + SG_PROC_OFF) + i; }

/* With the claim mutex held: our own slot (taken after a fork), or why not. */
static int sg__slot_ready(sg_grid *g, const char *what)
{
    int rc = sg__check_fork(g);
    if (!rc && g->slot >= SG_PROC_SLOTS)
        rc = sg__fail(SG_EPROCFULL, "this process has no slot in the process table of grid '%s' (it was full "
                                    "when it attached), so it cannot %s safely", g->name, what);
    return rc;
}

int sg__claim_begin(sg_grid *g)
{
    pthread_mutex_lock(&sg__claim_mutex);
    int rc = sg__slot_ready(g, "claim ring cells");
    if (rc)
        pthread_mutex_unlock(&sg__claim_mutex);
    return rc;
}

int sg__own_slot(sg_grid *g, const char *what)
{
    pthread_mutex_lock(&sg__claim_mutex);
    int rc = sg__slot_ready(g, what);
    pthread_mutex_unlock(&sg__claim_mutex);
    return rc;
}

void sg__claim_set(sg_grid *g, uint64_t claim, uint64_t lo, uint64_t hi)
{
    sg_proc *me = sg__proc(g, g->slot);
    /* SYNC POINT: claim-reuse (release fence): the cells of our previous
     * claim and its clearing are visible to whoever sees the new lo/hi, so
     * a checker that reads a mix of old and new record fields and decides
     * to skip finds the old cells finished and its skip-CAS fails. */
    sg_fence_release();
    sg_store_relaxed(&me->claim_lo, lo);
    sg_store_relaxed(&me->claim_hi, hi);
    /* SYNC POINT: claim-record (release): lo and hi are visible to whoever
     * reads this claim_obj with acquire. The claiming CAS that follows is a
     * release too, so a process that sees the claimed position (acquire on
     * the tail or head) sees this record. */
    sg_store_release(&me->claim_obj, claim);
}

void sg__claim_end(sg_grid *g)
{
    /* SYNC POINT: claim-clear (release): the cells published before this
     * store are visible to a process that reads the cleared record, so its
     * skip-CAS on such a cell fails rather than skipping a finished one. */
    sg_store_release(&sg__proc(g, g->slot)->claim_obj, 0);
    pthread_mutex_unlock(&sg__claim_mutex);
}

int sg__claim_live(sg_grid *g, uint64_t claim, uint64_t q)
{
    for (uint32_t i = 0; i < SG_PROC_SLOTS; i++) {
        sg_proc *p = sg__proc(g, i);
        uint64_t w = sg_load_acquire(&p->owner);
        if (w == 0)
            continue;
        /* SYNC POINT: claim-record / claim-clear (acquire) */
        if (sg_load_acquire(&p->claim_obj) != claim)
            continue;
        uint64_t lo = sg_load_relaxed(&p->claim_lo), hi = sg_load_relaxed(&p->claim_hi);
        sg_fence_acquire(); /* SYNC POINT: claim-reuse (acquire fence) */
        /* A slot taken over meanwhile pairs the record with another owner:
         * read the owner again and look at the slot anew if it changed. */
        if (sg_load_acquire(&p->owner) != w) {
            i--;
            continue;
        }
        if (q >= lo && q < hi && sg__word_alive(w))
            return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* events                                                                   */

uint32_t sg__event_prepare(uint32_t *ev)
{
    /* SYNC POINT: event (sleeper): set W, then re-check the condition */
    uint32_t v = sg_fetch_or32_seq_cst(ev, SG_EVENT_WAITERS) | SG_EVENT_WAITERS;
    sg_fence_seq_cst();
    return v;
}

/* After the waker's seq_cst fence: wake the sleepers of ev, if it has any. */
static void sg__event_wake(uint32_t *ev)
{
    uint32_t v = sg_load32_relaxed(ev);
    if (!(v & SG_EVENT_WAITERS))
        return;
    /* clear W and bump the count in one step: v odd -> v + 1 */
    while ((v & SG_EVENT_WAITERS) && !sg_cas32_relaxed(ev, &v, v + 1))
        ;
    sg_futex_wake_all(ev);
}

void sg__event_signal(uint32_t *ev)
{
    /* SYNC POINT: event (waker): the change is stored; now look for W */
    sg_fence_seq_cst();
    sg__event_wake(ev);
}

void sg__event_signal2(uint32_t *a, uint32_t *b)
{
    sg_fence_seq_cst(); /* SYNC POINT: event (waker), one fence for both */
    sg__event_wake(a);
    sg__event_wake(b);
}

int sg__event_sleep(sg_grid *g, uint64_t obj, uint32_t *ev, uint32_t v, uint64_t deadline, int64_t slice_ns)
{
    uint64_t now = sg__mono_ns();
    if (now >= deadline)
        return SG_EAGAIN;
    int64_t wait = slice_ns;
    if (deadline != UINT64_MAX && deadline - now < (uint64_t)wait)
        wait = (int64_t)(deadline - now);
    uint64_t *rec = g->slot < SG_PROC_SLOTS ? &sg__proc(g, g->slot)->waiting : NULL;
    if (rec)
        sg_store_relaxed(rec, obj); /* stat only: last sleeper of the process wins */
    int rc = sg_futex_wait(ev, v, wait);
    if (rec) {
        uint64_t mine = obj;
        sg_cas_relaxed(rec, &mine, 0);
    }
    if (rc == EINTR)
        return sg__fail(SG_EINTR, "interrupted by a signal");
    return SG_OK;
}

uint32_t sg__waiters(sg_grid *g, uint64_t obj)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < SG_PROC_SLOTS; i++) {
        sg_proc *p = sg__proc(g, i);
        uint64_t w = sg_load_acquire(&p->owner);
        if (w && sg_load_relaxed(&p->waiting) == obj && sg__word_alive(w))
            n++;
    }
    return n;
}

/* ------------------------------------------------------------------------ */
/* objects                                                                  */

int sg__object_check(sg_dirent *e, const char *kind, const char *name, const char *const field[],
                     const uint64_t asked[], int n)
{
    for (int i = 0; i < n; i++)
        if (asked[i] && asked[i] != e->param[i])
            return sg__fail(SG_EMISMATCH, "%s '%s' exists with %s=%llu; it was asked for with %s=%llu", kind, name,
                            field[i], (unsigned long long)e->param[i], field[i], (unsigned long long)asked[i]);
    return SG_OK;
}

void *sg__object_payload(sg_grid *g, const sg_dirent *e, uint64_t need)
{
    sg_block *b = sg__block(g, e->obj);
    if (!b || SG_META_KIND(b->meta) != SG_BLK_OBJECT || SG_META_LEN(b->meta) < need ||
        sg__class_size(SG_META_CLASS(b->meta)) < SG_BLOCK_HDR + need) {
        sg__fail(SG_ECORRUPT, "object '%.*s': directory entry names a bad object block", (int)e->name_len, e->name);
        return NULL;
    }
    return b->payload;
}

int sg__object_alloc(sg_grid *g, uint64_t bytes, void **payload, uint64_t *obj)
{
    if (bytes > UINT32_MAX)
        return sg__fail(SG_EINVAL, "object of %llu bytes is over the limit of %u bytes",
                        (unsigned long long)bytes, UINT32_MAX);
    uint64_t off;
    int fresh;
    int rc = sg__alloc(g, bytes, &off, &fresh);
    if (rc)
        return rc;
    sg_block *b = (sg_block *)(g->base + off);
    if (!fresh) /* carved memory is zero; recycled memory is not. Relaxed word
                   stores: a stalled map reader may still be copying the block
                   (SYNC POINT: block-reuse) */
        for (uint64_t i = 0; i < (bytes + 7) / 8; i++)
            sg_store_relaxed(&b->payload[i], 0);
    b->meta = SG_META(SG_META_CLASS(b->meta), SG_BLK_OBJECT, bytes);
    *payload = b->payload;
    *obj = off;
    return SG_OK;
}

/* ------------------------------------------------------------------------ */
/* the wait loop                                                            */

/* A sleeper wakes at least this often: the Python layer needs control back
 * for Ctrl-C, and a sleeper stuck behind a claimed cell re-checks its
 * claimant on every wake-up. */
#define SG_SLEEP_SLICE_NS 100000000ll
#define SG_STUCK_SLICE_NS 2000000ll
/* A non-blocking call stuck behind a claimed cell spins this much before it
 * checks the claimant: a live one finishes within a few hundred ns. */
#define SG_NOWAIT_SPIN 256u
#define SG_SPIN_PAUSE_NS 2000u

int sg__spin(uint32_t *budget_ns, int (*ready)(void *ctx), void *ctx)
{
    uint32_t budget = sg_load32_relaxed(budget_ns);
    uint64_t t0 = sg__mono_ns(), spent = 0;
    int found = 0;
    for (uint32_t i = 1; !(found = ready(ctx)); i++) {
        if (i % 16) {
            sg_cpu_relax();
            continue;
        }
        spent = sg__mono_ns() - t0;
        if (spent >= budget)
            break;
        if (spent >= SG_SPIN_PAUSE_NS)
            sched_yield();
    }
    uint32_t next = found ? (budget < SG_SPIN_MAX_NS / 2 ? budget * 2 : SG_SPIN_MAX_NS)
                          : (budget > SG_SPIN_MIN_NS * 2 ? budget / 2 : SG_SPIN_MIN_NS);
    if (next != budget)
        sg_store32_relaxed(budget_ns, next);
    return found;
}

int64_t sg__wait(const sg__waiter *w, int64_t timeout_ns)
{
    uint64_t deadline = sg__deadline(timeout_ns);
    int recover = 0;
    for (;;) {
        int64_t got = w->step(w->ctx, recover);
        if (got != SG__EMPTY && got != SG__STUCK)
            return got;
        int stuck = got == SG__STUCK, found = 0;
        if (timeout_ns == 0) {
            if (!stuck || recover)
                return sg__fail_const(SG_EAGAIN, w->what);
            for (uint32_t i = 0; i < SG_NOWAIT_SPIN && !found; i++) {
                sg_cpu_relax();
                found = w->ready(w->ctx);
            }
            recover = 1; /* one more try, now checking for a dead claimant */
            continue;
        }
        found = sg__spin(w->spin, w->ready, w->ctx);
        /* after a spin, a claimant still holding the cell gets checked */
        recover = stuck;
        if (found)
            continue;
        uint32_t v = sg__event_prepare(w->event);
        if (w->ready(w->ctx))
            continue;
        int rc = sg__event_sleep(w->g, w->obj, w->event, v, deadline, stuck ? SG_STUCK_SLICE_NS : SG_SLEEP_SLICE_NS);
        if (rc == SG_EAGAIN)
            return sg__fail(SG_EAGAIN, "%s: timed out", w->what);
        if (rc)
            return rc;
    }
}

/* ------------------------------------------------------------------------ */
/* waiting from an event loop                                               */

/*
 * The asyncio layer (shmgrid/_async.py) does not block a thread per waiter.
 * A coroutine that finds it cannot proceed arms the object's event word
 * (sg_event_arm: the same seq_cst RMW + fence as a blocking sleeper's
 * sg__event_prepare), re-tries its non-blocking call, and only then hands
 * (word, armed value) to the one waiter thread of its process, which sleeps
 * on all such words at once (sg_event_waitv) and tells the coroutine when
 * its word moved. Because the arm is the blocking sleeper's own half of
 * SYNC POINT: event, a waker either sees W and bumps the word (so the
 * waiter thread's futex_waitv returns or is woken) or made its change
 * before the coroutine's re-try, which then sees it.
 */

_Static_assert(SG_EVENT_WAITV_MAX == SG_FUTEX_WAITV_MAX, "sg_event_waitv passes its words to one futex_waitv");

int sg_event_arm(sg_grid *g, uint32_t *ev, uint32_t *v)
{
    SG_CHECK_GRID(g);
    /* SYNC POINT: event (sleeper), via the loop thread: set W, then the
     * caller re-checks its condition with a non-blocking call */
    *v = sg__event_prepare(ev);
    return SG_OK;
}

uint32_t sg_event_load(const uint32_t *ev) { return sg_load32_relaxed(ev); }

void sg_event_poke(uint32_t *word)
{
    /* Process-private: registrations are published by the registry's
     * mutex; the bump only has to make the waiter's futex_waitv return. */
    sg_fetch_add32_relaxed(word, 1);
    sg_futex_wake_all(word);
}

int sg_event_waitv(uint32_t **words, const uint32_t *vals, uint32_t n, int64_t timeout_ns)
{
    if (n == 0 || n > SG_EVENT_WAITV_MAX)
        return sg__fail(SG_EINVAL, "sg_event_waitv: %u words; 1..%d are allowed", n, SG_EVENT_WAITV_MAX);
    int rc = sg_futex_waitv(words, vals, n, timeout_ns < 0 ? UINT64_MAX : sg__mono_ns() + (uint64_t)timeout_ns);
    /* EFAULT: a word's grid was closed between the caller's look at its
     * registrations and this call; the registry no longer names the word,
     * so the caller's next look drops it. */
    if (rc == 0 || rc == EINTR || rc == EFAULT)
        return SG_OK;
    if (rc == ENOSYS)
        return sg__fail(SG_ESYS, "futex_waitv is not available (Linux >= 5.16 is needed)");
    return sg__fail(SG_ESYS, "futex_waitv: %s", strerror(rc));
}
