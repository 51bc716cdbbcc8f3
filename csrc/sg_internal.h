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
    unsigned fork_gen; /* sg__fork_generation() when `slot` and `self` were taken: a
                          forked child that did not call sg_grid_after_fork is
                          caught up by the messaging calls */
    char name[SG_GRID_NAME_MAX_LEN + 1];
};

/* A process's handle on a map. */
struct sg_map {
    sg_grid *g;
    sg_map_hdr *hdr;
    uint32_t max_key;
    uint32_t max_value;
    int reclaim_countdown; /* operations until this handle next tries to free retired tables */
    sg_feed_hdr *feed;     /* the map's change feed, or NULL */
    sg_feed_rec *recs;
    uint64_t feed_slots;
};

/* ---- map internals used by the batch calls (map.c, for batch.c) ---- */
/* Enter / leave a map operation (reclamation epoch, see map.c). */
int sg__enter(sg_map *m);
void sg__exit(sg_map *m);
/* The map's mirror descriptor, checked; NULL if the map is not mirrored,
 * and one with partitions 0 if it is damaged (then every write is refused
 * here and goes through the bridge). */
const sg_mirror_desc *sg__mirror(sg_map *m);
/* A map table, located and checked (sg__tab_at in map.c): the table block
 * at `off` and what its immutable header gives. */
typedef struct sg__tab {
    uint64_t off;
    sg_table_hdr *h;
    sg_slot *slots;
    uint64_t mask;
    uint64_t chunk;   /* slots per copy chunk */
    uint64_t nchunks;
    uint64_t *bitmap; /* one bit per chunk: every slot in it is final */
} sg__tab;
/* The map's oldest table in use, located and checked (inside sg__enter:
 * it stays valid until sg__exit). */
int sg__head(sg_map *m, sg__tab *t);
/* Single-key steps, called inside sg__enter with the lengths and the key's
 * partition checked and its hash given; same results as sg_map_get,
 * sg_map_put, sg_map_delete (no copy of the old value), sg_map_incr.
 * sg__get_entered's head (may be NULL) caches the head table for a caller
 * that gets many keys within one sg__enter: zeroed after each sg__enter,
 * never kept past sg__exit. */
int64_t sg__get_entered(sg_map *m, sg__tab *head, const char *key, size_t klen, uint64_t hash, char *out,
                        size_t cap, uint64_t *version);
int sg__put_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, const char *val, size_t vlen,
                    uint64_t *version);
int sg__delete_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, uint64_t *version);
int sg__incr_entered(sg_map *m, const char *key, size_t klen, uint64_t hash, int64_t delta, int64_t *result,
                     uint64_t *version);

/* ---- change feed (feed.c) ---- */
int sg__feed_create(sg_grid *g, uint64_t slots, uint64_t *off);
/* Attach m to the feed of its header (if any), checking the block. */
int sg__feed_attach(sg_map *m);
/* Append a change after the CAS that made it; never waits. */
void sg__feed_append(sg_map *m, uint64_t hash, uint64_t key_off, uint64_t version, int deleted);

/* ---- errors: a per-thread message naming the cause ---- */
int sg__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int sg__fail_const(int code, const char *msg); /* msg: a string constant */

#define SG_CHECK_GRID(g)                                                                                     \
    do {                                                                                                     \
        if (!(g)->base)                                                                                      \
            return sg__fail(SG_ECLOSED, "grid is closed");                                                   \
    } while (0)

/* Drop an object handle's reference on its grid handle (freed with the last). */
void sg__grid_unref(sg_grid *g);

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

/* A block at `off`, checked to lie wholly inside the heap. NULL if not.
 * Inline: every map operation calls it two or three times. */
static inline sg_block *sg__block(const sg_grid *g, uint64_t off)
{
    if ((off & 15) || off < SG_HEAP_OFF || off > g->size - SG_BLOCK_HDR)
        return NULL;
    sg_block *b = (sg_block *)(g->base + off);
    unsigned cls = SG_META_CLASS(sg_load_relaxed(&b->meta));
    if (cls >= SG_NCLASSES || sg__class_size(cls) > g->size - off)
        return NULL;
    return b;
}

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
uint64_t sg__task_word(uint32_t tid); /* the word of any thread or process id */
int sg__word_alive(uint64_t word);   /* a process word */
int sg__thread_alive(uint64_t word); /* a thread word (lock owners) */

/* ---- directory (segment.c) ---- */
typedef int (*sg__create_fn)(sg_grid *g, const uint64_t param[4], uint64_t *obj, void *ctx);
int sg__dir_open(sg_grid *g, const char *name, uint32_t kind, const uint64_t param[4],
                 sg__create_fn create, void *ctx, sg_dirent **out);
int sg__check_name(const char *name, size_t max, const char *what);

/* ---- messaging helpers (wait.c) ---- */
/* Internal "would block" results of the try-steps, never returned to callers. */
#define SG__EMPTY (-100) /* nothing to take / no room */
#define SG__STUCK (-101) /* blocked behind a claimed, unfinished cell */

/* Spin budgets, in ns of waiting before sleeping. A cross-process hand-off
 * seen by spinning costs ~1 us; a futex wake-up of a sleeper 5-90 us. The
 * floor stays above one Python round trip, so that a ping-pong whose spins
 * once failed (load on the machine) can find its way back to spinning. */
#define SG_SPIN_MIN_NS 8000u
#define SG_SPIN_MAX_NS 128000u
#define SG_SPIN_START_NS 32000u

/* Whether a key of this 64-bit hash is in one of the partitions of mask
 * (a bitmap: bit p of byte p / 8); nparts 0 means no filter. A key's
 * partition is its hash modulo nparts, on every host. */
static inline int sg__in_mask(uint64_t hash, uint32_t nparts, const uint8_t *mask)
{
    if (!nparts)
        return 1;
    uint32_t p = (uint32_t)(hash % nparts);
    return (mask[p / 8] >> (p % 8)) & 1;
}

/* A reader of a seq-per-cell ring (topic, change feed) found its cell taken
 * by a later lap (the cell's seq is `seq`, encoding position seq >> 2): the
 * oldest position that may still hold its entry. The ring's tail may lag
 * the seq we saw, so the later of the two counts. */
static inline uint64_t sg__lap_restart(uint64_t tail, uint64_t seq, uint64_t cap)
{
    uint64_t p = (seq >> 2) + 1;
    return (tail > p ? tail : p) - cap;
}

/* Whether a key of this hash belongs to another host, by sg__mirror's answer. */
static inline int sg__is_remote(const sg_mirror_desc *d, uint64_t hash)
{
    return d && (!d->partitions || !sg__in_mask(hash, d->partitions, d->local));
}

/* Monotonic deadlines: sg__deadline(<0) never passes. */
uint64_t sg__mono_ns(void);
uint64_t sg__deadline(int64_t timeout_ns);

/* Forks seen by this process (a pthread_atfork child handler counts them). */
unsigned sg__fork_generation(void);
/* In a forked child whose handle still names the parent's slot, take one. */
int sg__check_fork(sg_grid *g);

/* Claim records (SYNC POINT: claim-record, claim-clear; see sg_proc).
 * sg__claim_begin takes the process-private claim mutex and checks the
 * handle has a process slot; sg__claim_end clears the record and drops the
 * mutex. Between them: sg__claim_set before each claiming CAS. */
int sg__claim_begin(sg_grid *g);
/* The same checks without a claim: the handle has a process slot of its
 * own (taken now in a forked child), for what records that slot's word. */
int sg__own_slot(sg_grid *g, const char *what);
void sg__claim_set(sg_grid *g, uint64_t claim, uint64_t lo, uint64_t hi);
void sg__claim_end(sg_grid *g);
/* 1 if a live process holds a claim `claim` covering position q. */
int sg__claim_live(sg_grid *g, uint64_t claim, uint64_t q);

/* Events (see sg_layout.h). prepare: announce a sleeper and return the value
 * to sleep on; the caller re-checks its condition before sleeping. */
uint32_t sg__event_prepare(uint32_t *ev);
void sg__event_signal(uint32_t *ev);
void sg__event_signal2(uint32_t *a, uint32_t *b); /* both, with one fence */
/* Sleep on ev (expected value v) until woken, the deadline, or slice_ns.
 * SG_OK: woken or the slice ended (re-check); SG_EAGAIN: deadline passed;
 * SG_EINTR: a signal. Records the sleep in the process table for stat. */
int sg__event_sleep(sg_grid *g, uint64_t obj, uint32_t *ev, uint32_t v, uint64_t deadline, int64_t slice_ns);
/* Live processes with a thread asleep on obj. */
uint32_t sg__waiters(sg_grid *g, uint64_t obj);
/* Spin until ready(ctx) or *budget_ns has passed: PAUSE for the first
 * 2 us, then sched_yield between looks (if the other party shares our CPU,
 * it gets to run). The budget, a hint shared by the handle's threads,
 * doubles when spinning found the condition and halves when it did not,
 * within [SG_SPIN_MIN_NS, SG_SPIN_MAX_NS]. Returns whether it was found. */
int sg__spin(uint32_t *budget_ns, int (*ready)(void *ctx), void *ctx);

/* Objects: allocate a zeroed OBJECT block; find and check one. */
int sg__object_alloc(sg_grid *g, uint64_t bytes, void **payload, uint64_t *obj);
void *sg__object_payload(sg_grid *g, const sg_dirent *e, uint64_t need);
int sg__object_check(sg_dirent *e, const char *kind, const char *name, const char *const field[],
                     const uint64_t asked[], int n);

/* The wait loop shared by rings and topics: try a step; if it would block,
 * spin on `ready` (adaptive budget), then sleep on `event`, and try again.
 * A step returns a result >= 0 or an error (returned as is), or SG__EMPTY /
 * SG__STUCK to wait. After a spin, a step that was SG__STUCK is retried
 * with recover = 1: it then checks whether the claimant it is stuck behind
 * is dead, and recovers the cell if so. Sleeps last at most 100 ms (2 ms
 * while stuck), so that the caller sees signals and dead claimants. */
typedef struct sg__waiter {
    sg_grid *g;
    uint64_t obj;
    uint32_t *event;
    uint32_t *spin;
    int64_t (*step)(void *ctx, int recover);
    int (*ready)(void *ctx);
    void *ctx;
    const char *what; /* the would-block message: "ring is empty" */
} sg__waiter;
int64_t sg__wait(const sg__waiter *w, int64_t timeout_ns);

/* Robust mutexes (sync.c): a sg_lock_hdr whose owner word is the holder's
 * thread word, taken over from a dead holder (SG_OWNERDIED). Acquire
 * returns SG_OK, SG_OWNERDIED, SG_EAGAIN, SG_EINTR or SG_EDEADLK; obj names
 * the object in the process table's `waiting` (stat); spin is the
 * handle's adaptive budget. Release returns SG_OK or SG_ENOTOWNER. */
int sg__mutex_acquire(sg_grid *g, uint64_t obj, sg_lock_hdr *h, uint32_t *spin, int64_t timeout_ns);
int sg__mutex_release(sg_lock_hdr *h);

/* This thread's word (thread id | thread start time), cached per thread. */
uint64_t sg__thread_word(void);

#endif /* SG_INTERNAL_H */
