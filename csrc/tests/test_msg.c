/*
 * test_msg.c - C unit tests of rings, topics, counters and locks.
 *
 * Built and run by tests/test_c.py like test_core.c (with -Werror, and under
 * ASan + UBSan). Dead claimants are simulated by moving a tail or head past
 * a cell with no claim record behind it, which is what a process killed
 * between its claiming CAS and its publish leaves (its record names a dead
 * process, or was cleared by a new owner of its slot).
 * Usage: test_msg GRIDNAME. Exit status 0 = all passed.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../sg_internal.h"
#include "check.h"


/* The ring's header, reached the way a dead process would have left it. */
static sg_ring_hdr *ring_hdr(sg_grid *g, const char *name)
{
    for (uint32_t i = 0; i < SG_DIR_SIZE; i++) {
        sg_object_info o;
        if (sg_grid_object(g, i, &o) == SG_OK && strcmp(o.name, name) == 0) {
            sg_dirent *e = (sg_dirent *)(g->base + SG_DIR_OFF) + i;
            return (sg_ring_hdr *)((sg_block *)(g->base + e->obj))->payload;
        }
    }
    return NULL;
}

static void test_ring_basic(sg_grid *g)
{
    sg_ring *r;
    char buf[64];
    CHECK(sg_ring_open(g, "r-basic", 4, 16, &r) == SG_OK);
    sg_ring *r2;
    CHECK(sg_ring_open(g, "r-basic", 8, 0, &r2) == SG_EMISMATCH);
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == SG_EAGAIN);
    for (int i = 0; i < 4; i++)
        CHECK(sg_ring_put(r, (char *)&i, sizeof i, 0) == SG_OK);
    int x = 9;
    CHECK(sg_ring_put(r, (char *)&x, sizeof x, 0) == SG_EAGAIN);
    CHECK(sg_ring_put(r, buf, 17, 0) == SG_EVALSIZE);
    for (int i = 0; i < 4; i++) {
        CHECK(sg_ring_get(r, buf, sizeof buf, 0) == sizeof(int));
        memcpy(&x, buf, sizeof x);
        CHECK(x == i);
    }
    /* batches: lengths checked first, prefix semantics */
    const char data[] = "aabbbcccc";
    uint32_t lens[3] = {2, 3, 4}, bad[3] = {2, 17, 4}, out[8];
    CHECK(sg_ring_put_many(r, data, bad, 3, 0) == SG_EVALSIZE);
    CHECK(sg_ring_put_many(r, data, lens, 3, 0) == 3);
    CHECK(sg_ring_put_many(r, data, lens, 3, 0) == 1); /* one slot left */
    CHECK(sg_ring_get_many(r, buf, sizeof buf, out, 8, 0) == 4);
    CHECK(out[0] == 2 && out[1] == 3 && out[2] == 4 && out[3] == 2 && memcmp(buf, "aabbbccccaa", 11) == 0);
    CHECK(sg_ring_get(r, buf, 8, 0) == SG_EINVAL); /* buffer under slot_size */
    CHECK(sg_ring_validate(r) == SG_OK);
    /* a timed wait times out */
    uint64_t t0 = sg__mono_ns();
    CHECK(sg_ring_get(r, buf, sizeof buf, 20000000) == SG_EAGAIN);
    CHECK(sg__mono_ns() - t0 >= 19000000);
    sg_ring_free(r);
}

/* A producer that died after claiming: tail moved, cell never written. */
static void test_ring_dead_producer(sg_grid *g)
{
    sg_ring *r;
    char buf[16];
    CHECK(sg_ring_open(g, "r-deadprod", 4, 16, &r) == SG_OK);
    sg_ring_hdr *h = ring_hdr(g, "r-deadprod");
    CHECK(sg_ring_put(r, "a", 1, 0) == SG_OK);
    h->tail++; /* claimed position 1, no live claim record */
    CHECK(sg_ring_put(r, "b", 1, 0) == SG_OK);
    CHECK(sg_ring_validate(r) == SG_OK);
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == 1 && buf[0] == 'a');
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == 1 && buf[0] == 'b'); /* position 1 skipped */
    sg_ring_info info;
    CHECK(sg_ring_info_get(r, &info) == SG_OK && info.skipped == 1 && info.head == 3 && info.tail == 3);
    CHECK(sg_ring_validate(r) == SG_OK);
    sg_ring_free(r);
}

/* A consumer that died while taking a message: head moved, cell never freed. */
static void test_ring_dead_consumer(sg_grid *g)
{
    sg_ring *r;
    char buf[16];
    CHECK(sg_ring_open(g, "r-deadcons", 2, 16, &r) == SG_OK);
    sg_ring_hdr *h = ring_hdr(g, "r-deadcons");
    CHECK(sg_ring_put(r, "a", 1, 0) == SG_OK);
    CHECK(sg_ring_put(r, "b", 1, 0) == SG_OK);
    h->head++; /* took position 0, never freed its cell */
    CHECK(sg_ring_validate(r) == SG_OK);
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == 1 && buf[0] == 'b');
    CHECK(sg_ring_put(r, "c", 1, 0) == SG_OK);             /* cell 0 freed for it */
    CHECK(sg_ring_put(r, "d", 1, 0) == SG_OK);             /* cell 1 */
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == 1 && buf[0] == 'c');
    CHECK(sg_ring_get(r, buf, sizeof buf, 0) == 1 && buf[0] == 'd');
    sg_ring_info info;
    CHECK(sg_ring_info_get(r, &info) == SG_OK && info.dropped == 1);
    sg_ring_free(r);
}

/* Threads: 2 producers x N, 2 consumers; every message exactly once, FIFO
 * per producer as seen by each consumer. */
#define MT_N 100000
struct mt {
    sg_ring *r;
    int id;
    unsigned char *seen; /* [2][MT_N] */
    long got;
};

static long mt_total; /* messages received by all consumers */

static void *mt_producer(void *arg)
{
    struct mt *a = arg;
    uint32_t msg[2] = {(uint32_t)a->id, 0};
    uint32_t batch[16][2], lens[16];
    for (uint32_t i = 0; i < MT_N;) {
        if (i % 3 == 0) {
            msg[1] = i++;
            if (sg_ring_put(a->r, (char *)msg, sizeof msg, -1) != SG_OK)
                return (void *)1;
            continue;
        }
        uint32_t k = 0;
        for (; k < 16 && i + k < MT_N; k++) {
            batch[k][0] = (uint32_t)a->id;
            batch[k][1] = i + k;
            lens[k] = 8;
        }
        int64_t n = sg_ring_put_many(a->r, (char *)batch, lens, k, -1);
        if (n <= 0)
            return (void *)1;
        i += (uint32_t)n;
    }
    return NULL;
}

static void *mt_consumer(void *arg)
{
    struct mt *a = arg;
    uint32_t last[2] = {UINT32_MAX, UINT32_MAX};
    uint32_t buf[64 * 4], lens[64];
    for (;;) {
        if (__atomic_load_n(&mt_total, __ATOMIC_RELAXED) == 2L * MT_N)
            return NULL;
        int64_t n = sg_ring_get_many(a->r, (char *)buf, sizeof buf, lens, 8, 10000000);
        if (n == SG_EAGAIN)
            continue;
        if (n <= 0)
            return (void *)1;
        uint32_t *p = buf;
        for (int64_t i = 0; i < n; i++, p += 2) {
            if (lens[i] != 8 || p[0] > 1 || p[1] >= MT_N)
                return (void *)2;
            if (last[p[0]] != UINT32_MAX && p[1] <= last[p[0]])
                return (void *)3; /* FIFO per producer */
            last[p[0]] = p[1];
            __atomic_add_fetch(&a->seen[p[0] * MT_N + p[1]], 1, __ATOMIC_RELAXED);
            a->got++;
        }
        __atomic_add_fetch(&mt_total, n, __ATOMIC_RELAXED);
    }
}

static void test_ring_threads(sg_grid *g)
{
    sg_ring *r;
    CHECK(sg_ring_open(g, "r-mt", 64, 8, &r) == SG_OK);
    unsigned char *seen = calloc(2, MT_N);
    struct mt a[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        a[i] = (struct mt){r, i % 2, seen, 0};
        pthread_create(&th[i], NULL, i < 2 ? mt_producer : mt_consumer, &a[i]);
    }
    for (int i = 0; i < 4; i++) {
        void *res;
        pthread_join(th[i], &res);
        CHECK(res == NULL);
    }
    long once = 0;
    for (long i = 0; i < 2L * MT_N; i++)
        once += seen[i] == 1;
    CHECK(once == 2L * MT_N && a[2].got + a[3].got == 2L * MT_N);
    printf("ring threads: %ld + %ld messages received, each once\n", a[2].got, a[3].got);
    CHECK(sg_ring_validate(r) == SG_OK);
    free(seen);
    sg_ring_free(r);
}

static void test_topic(sg_grid *g)
{
    sg_topic *t, *lossy;
    sg_sub *s1, *s2;
    char buf[32];
    uint64_t lost = 0;
    CHECK(sg_topic_open(g, "t-basic", 4, 32, 1, 2, &t) == SG_OK);
    CHECK(sg_topic_open(g, "t-basic", 0, 0, 2, 0, &lossy) == SG_EMISMATCH);
    CHECK(sg_topic_publish(t, "zero", 4, 0) == SG_OK); /* before anyone subscribed */
    CHECK(sg_topic_subscribe(t, &s1) == SG_OK);
    CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == SG_EAGAIN);
    for (int i = 0; i < 4; i++)
        CHECK(sg_topic_publish(t, (char *)&i, sizeof i, 0) == SG_OK);
    CHECK(sg_topic_publish(t, "x", 1, 0) == SG_EAGAIN); /* s1 is 4 behind */
    CHECK(sg_topic_subscribe(t, &s2) == SG_OK);
    sg_sub *s3;
    CHECK(sg_topic_subscribe(t, &s3) == SG_EFULL);
    for (int i = 0; i < 4; i++) {
        int x;
        CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == sizeof x);
        memcpy(&x, buf, sizeof x);
        CHECK(x == i);
    }
    CHECK(sg_topic_publish(t, "new", 3, 0) == SG_OK);
    CHECK(sg_sub_get(s2, buf, sizeof buf, 0, &lost) == 3 && memcmp(buf, "new", 3) == 0);
    CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == 3);
    /* a publisher that died after claiming: subscribers skip its position */
    ((sg_topic_hdr *)ring_hdr(g, "t-basic"))->tail++;
    CHECK(sg_topic_publish(t, "after", 5, 0) == SG_OK);
    CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == 5 && memcmp(buf, "after", 5) == 0);
    sg_topic_info info;
    CHECK(sg_topic_info_get(t, &info) == SG_OK && info.skipped == 1 && info.subscribers == 2);
    sg_sub_free(s2); /* s2 is behind; closing it unblocks publishers */
    sg_sub_free(s1);
    for (int i = 0; i < 10; i++)
        CHECK(sg_topic_publish(t, "free", 4, 0) == SG_OK);
    sg_topic_free(t);

    CHECK(sg_topic_open(g, "t-lossy", 4, 32, 2, 0, &lossy) == SG_OK);
    CHECK(sg_topic_subscribe(lossy, &s1) == SG_OK);
    for (int i = 0; i < 10; i++)
        CHECK(sg_topic_publish(lossy, (char *)&i, sizeof i, 0) == SG_OK);
    CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == SG_ELAPPED && lost == 6);
    for (int i = 6; i < 10; i++) {
        int x;
        CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == sizeof x);
        memcpy(&x, buf, sizeof x);
        CHECK(x == i);
    }
    CHECK(sg_sub_get(s1, buf, sizeof buf, 0, &lost) == SG_EAGAIN);
    sg_sub_free(s1);
    sg_topic_free(lossy);
}

static void test_counter_lock(sg_grid *g)
{
    sg_counter *c;
    int64_t v;
    CHECK(sg_counter_open(g, "c", &c) == SG_OK);
    CHECK(sg_counter_add(c, 5, &v) == SG_OK && v == 5);
    CHECK(sg_counter_set(c, INT64_MAX - 1) == SG_OK);
    CHECK(sg_counter_add(c, 2, &v) == SG_EOVERFLOW);
    CHECK(sg_counter_get(c, &v) == SG_OK && v == INT64_MAX - 1);
    CHECK(sg_counter_compare_and_set(c, 1, 2) == SG_NO);
    CHECK(sg_counter_compare_and_set(c, INT64_MAX - 1, -3) == SG_OK);
    CHECK(sg_counter_get(c, &v) == SG_OK && v == -3);
    sg_counter_free(c);

    sg_lock *l;
    CHECK(sg_lock_open(g, "c", &l) == SG_EMISMATCH);
    CHECK(sg_lock_open(g, "l", &l) == SG_OK);
    CHECK(sg_lock_release(l) == SG_ENOTOWNER);
    CHECK(sg_lock_acquire(l, 0) == SG_OK);
    CHECK(sg_lock_acquire(l, 0) == SG_EDEADLK);
    CHECK(sg_lock_release(l) == SG_OK);
    /* a holder that died: a child takes the lock and exits */
    pid_t pid = fork();
    if (pid == 0) {
        sg_grid_after_fork(g);
        _exit(sg_lock_acquire(l, 0) == SG_OK ? 0 : 1);
    }
    int st;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    sg_lock_info li;
    CHECK(sg_lock_info_get(l, &li) == SG_OK && li.owner_tid == (uint32_t)pid && !li.owner_alive);
    CHECK(sg_lock_acquire(l, 0) == SG_OWNERDIED);
    CHECK(sg_lock_info_get(l, &li) == SG_OK && li.owner_deaths == 1 && li.acquisitions == 3);
    CHECK(sg_lock_release(l) == SG_OK);
    sg_lock_free(l);
}

/* The change feed: events in order, and a writer killed between taking a
 * position and publishing it (simulated by moving the tail) costs watchers
 * one lost change after the grace period, not a stall. */
static void test_feed(sg_grid *g)
{
    sg_map *m;
    sg_watch *w;
    sg_change ev;
    char key[64];
    CHECK(sg_map_open(g, "fed", 64, 32, 32, 0, &m) == SG_OK);
    CHECK(sg_map_put(m, "old", 3, "x", 1, NULL) == SG_OK);
    CHECK(sg_watch_open(m, "", 0, &w) == SG_OK);
    CHECK(sg_watch_next(w, key, sizeof key, &ev, 0) == SG_EAGAIN);
    CHECK(sg_map_put(m, "a", 1, "1", 1, NULL) == SG_OK);
    CHECK(sg_map_delete(m, "a", 1, NULL, 0, NULL, NULL) == SG_OK);
    CHECK(sg_watch_next(w, key, sizeof key, &ev, 0) == SG_OK && ev.kind == SG_CHANGE_PUT && ev.version == 1 &&
          ev.klen == 1 && key[0] == 'a');
    CHECK(sg_watch_next(w, key, sizeof key, &ev, 0) == SG_OK && ev.kind == SG_CHANGE_DELETE && ev.version == 2);
    sg_fetch_add_relaxed(&m->feed->tail, 1); /* a writer that died after its fetch_add */
    CHECK(sg_map_put(m, "b", 1, "2", 1, NULL) == SG_OK);
    uint64_t t0 = sg__mono_ns();
    CHECK(sg_watch_next(w, key, sizeof key, &ev, 2000000000) == SG_OK && ev.kind == SG_CHANGE_LOST && ev.lost == 1);
    CHECK(sg__mono_ns() - t0 < 1000000000ull);
    CHECK(sg_watch_next(w, key, sizeof key, &ev, 0) == SG_OK && ev.kind == SG_CHANGE_PUT && key[0] == 'b');
    sg_watch_free(w);
    sg_map_free(m);
}

/* Records (the bridge's data path) under the sanitizers: a snapshot of
 * one map applied to another, then every truncation of it refused or
 * applied in part, never read past. */
static void test_records(sg_grid *g)
{
    sg_map *a, *b;
    sg_iter *it;
    uint64_t applied;
    static char buf[1 << 16];
    CHECK(sg_map_open(g, "rec-a", 64, 16, 16, 0, &a) == SG_OK);
    CHECK(sg_map_open(g, "rec-b", 64, 16, 16, 0, &b) == SG_OK);
    for (int i = 0; i < 40; i++) {
        char k[16];
        int n = snprintf(k, sizeof k, "key%d", i);
        CHECK(sg_map_put(a, k, (size_t)n, "value", 5, NULL) == SG_OK);
    }
    CHECK(sg_map_delete(a, "key3", 4, NULL, 0, NULL, NULL) == SG_OK);
    CHECK(sg_iter_open(a, &it) == SG_OK);
    int64_t len = sg_iter_records(it, buf, sizeof buf, 0, NULL);
    CHECK(len > 0 && sg_iter_records(it, buf + len, sizeof buf - (size_t)len, 0, NULL) == 0);
    sg_iter_free(it);
    /* where each record ends: a cut there applies the records before it, a
     * cut anywhere else is refused (after applying those, which is harmless) */
    static char ends[1 << 16];
    int64_t nrec = 0;
    for (int64_t off = 0; off < len; nrec++) {
        sg_record_hdr h;
        memcpy(&h, buf + off, sizeof h);
        off += SG_RECORD_HDR + h.klen + h.vlen;
        ends[off] = 1;
    }
    CHECK(nrec == 40);
    int64_t whole = 0;
    for (int64_t cut = 0; cut < len; cut++) {
        whole += ends[cut];
        char *copy = malloc((size_t)cut); /* exactly cut bytes: ASan flags any read past them */
        if (cut)
            memcpy(copy, buf, (size_t)cut);
        int64_t n = sg_map_apply_records(b, copy, (size_t)cut, 0, NULL, &applied, NULL);
        CHECK(cut == 0 || ends[cut] ? n == whole : n == SG_EINVAL);
        free(copy);
    }
    static uint64_t hashes[(1 << 16) / SG_RECORD_HDR];
    CHECK(sg_map_apply_records(b, buf, (size_t)len, 0, NULL, &applied, hashes) == 40);
    CHECK(hashes[0] == sg_hash64(buf + SG_RECORD_HDR, ((sg_record_hdr *)(void *)buf)->klen));
    uint64_t va, vb;
    char v[16];
    CHECK(sg_map_get(a, "key3", 4, v, sizeof v, &va) == SG_ENOKEY && sg_map_get(b, "key3", 4, v, sizeof v, &vb) ==
          SG_ENOKEY && va == vb && va == 2);
    CHECK(sg_map_len(b) == 39);
    sg_map_free(a);
    sg_map_free(b);
}

/* ------------------------------------------------------------------------ */
/* arrays                                                                   */

#define ARR_WORDS 1000 /* 8000 bytes: a copy takes long enough to race */

static sg_array_hdr *array_hdr(sg_grid *g, const char *name, uint64_t *obj)
{
    for (uint32_t i = 0; i < SG_DIR_SIZE; i++) {
        sg_object_info o;
        if (sg_grid_object(g, i, &o) == SG_OK && strcmp(o.name, name) == 0) {
            sg_dirent *e = (sg_dirent *)(g->base + SG_DIR_OFF) + i;
            *obj = e->obj;
            return (sg_array_hdr *)((sg_block *)(g->base + e->obj))->payload;
        }
    }
    return NULL;
}

static void fill(uint64_t *w, uint64_t v)
{
    for (int i = 0; i < ARR_WORDS; i++)
        w[i] = v * 1000003u + (uint64_t)i;
}

/* 1 if w is version v's contents, as fill() made them */
static int is_version(const uint64_t *w, uint64_t v)
{
    for (int i = 0; i < ARR_WORDS; i++)
        if (w[i] != v * 1000003u + (uint64_t)i)
            return 0;
    return 1;
}

/* A forked child takes the writer lock and starts a seqlock section on
 * buffer `which` the way sg_array_publish does, writes half of version v
 * into it, and exits holding the lock: a publisher killed mid-copy. With
 * which == BACKUP it first completes the live section, as a publisher
 * does; with which == 2 it completes the live section only (killed
 * between the two). */
static void die_mid_publish(sg_grid *g, const char *name, int which, uint64_t v)
{
    pid_t pid = fork();
    if (pid == 0) {
        uint64_t obj;
        sg_array_hdr *h = array_hdr(g, name, &obj);
        uint32_t spin = SG_SPIN_START_NS;
        if (sg__mutex_acquire(g, obj, &h->writer, &spin, -1) < 0)
            _exit(2);
        uint64_t *live = (uint64_t *)(g->base + h->data), *bufs[2] = {live, live + h->stride / 8};
        uint64_t src[ARR_WORDS];
        fill(src, v);
        for (int i = 0; i <= (which == 2 ? 0 : which); i++) {
            uint64_t s = h->buf[i].seq;
            sg_store_relaxed(&h->buf[i].seq, s + 1);
            sg_fence_release();
            sg_store_relaxed(&h->buf[i].ver, v);
            sg_copy_in(bufs[i], src, i < which ? sizeof src : sizeof src / 2);
            if (i < which) {
                sg_store_release(&h->buf[i].seq, s + 2);
                sg_store_release(&h->version, v);
            }
        }
        _exit(0);
    }
    int st;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

typedef struct arr_reader {
    sg_array *a;
    volatile int *stop;
    uint64_t snaps, torn, backwards;
} arr_reader;

static void *arr_read_loop(void *p)
{
    arr_reader *r = p;
    uint64_t buf[ARR_WORDS], v, last = 0;
    while (!*r->stop) {
        if (sg_array_snapshot(r->a, buf, -1, &v) != SG_OK || !is_version(buf, v))
            r->torn++;
        if (v < last)
            r->backwards++;
        last = v;
        r->snaps++;
    }
    return NULL;
}

static void test_array(sg_grid *g)
{
    sg_array *a, *b;
    uint64_t buf[ARR_WORDS], src[ARR_WORDS], v;
    char desc[64];
    const char *d1 = "((1000,), '<u8')";
    CHECK(sg_array_open(g, "arr", NULL, 0, 0, &a) == SG_NO);
    CHECK(sg_array_open(g, "arr", d1, strlen(d1), sizeof buf, &a) == SG_OK);
    CHECK(sg_array_open(g, "arr", "((1000,), '<i8')", 16, sizeof buf, &b) == SG_EMISMATCH);
    CHECK(sg_array_open(g, "arr", d1, strlen(d1), sizeof buf + 8, &b) == SG_EMISMATCH);
    CHECK(sg_array_open(g, "arr", NULL, 0, 0, &b) == SG_OK);
    CHECK(sg_array_desc(b, desc, sizeof desc) == (int64_t)strlen(d1) && memcmp(desc, d1, strlen(d1)) == 0);
    CHECK(sg_array_nbytes(b) == sizeof buf);
    CHECK((uintptr_t)sg_array_live(a) % 64 == 0 && sg_array_live(a) == sg_array_live(b));
    sg_counter *c;
    CHECK(sg_counter_open(g, "arr", &c) == SG_EMISMATCH); /* the name is an array's */
    char big[SG_ARRAY_DESC_MAX + 1] = {0};
    CHECK(sg_array_open(g, "arr2", big, sizeof big, 8, &b) == SG_EINVAL);
    CHECK(sg_array_open(g, "arr2", d1, strlen(d1), (uint64_t)SG_ARRAY_MAX_BYTES + 1, &b) == SG_EINVAL);

    /* version 0 is all zeroes; publish, snapshot, the live buffer */
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 0 && buf[0] == 0 && buf[ARR_WORDS - 1] == 0);
    fill(src, 1);
    CHECK(sg_array_publish(a, src, 0, &v) == SG_OK && v == 1 && sg_array_version(a) == 1);
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 1 && is_version(buf, 1));
    CHECK(is_version(sg_array_live(a), 1));
    CHECK(sg_array_wait(a, 0, 0, &v) == SG_OK && v == 1);
    CHECK(sg_array_wait(a, 1, 0, &v) == SG_EAGAIN);
    CHECK(sg_array_wait(a, 1, 20000000, &v) == SG_EAGAIN);
    CHECK(sg_array_repair(a, 0) == SG_NO);

    /* a publisher killed writing the live buffer: readers get version 1
     * from the backup; the next publisher repairs and goes on */
    sg_array_info info;
    die_mid_publish(g, "arr", SG_ARRAY_LIVE, 2);
    CHECK(sg_array_info_get(a, &info) == SG_OK && (info.seq[0] & 1) && info.writer_tid && !info.writer_alive);
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 1 && is_version(buf, 1));
    CHECK(sg_array_version(a) == 1);
    fill(src, 2);
    CHECK(sg_array_publish(a, src, 0, &v) == SG_OK && v == 2);
    CHECK(sg_array_info_get(a, &info) == SG_OK && info.repairs == 1 && info.owner_deaths == 1 &&
          !(info.seq[0] & 1) && !(info.seq[1] & 1) && info.ver[0] == 2 && info.ver[1] == 2);
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 2 && is_version(buf, 2));

    /* killed writing the backup: the live buffer already holds version 3 */
    die_mid_publish(g, "arr", SG_ARRAY_BACKUP, 3);
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 3 && is_version(buf, 3));
    CHECK(sg_array_wait(a, 2, 0, &v) == SG_OK && v == 3);
    /* killed between its two sections: version 4 is complete in the live
     * buffer only, and it is what a snapshot returns (not the backup's 3) */
    sg_array *r;
    CHECK(sg_array_open(g, "arr", NULL, 0, 0, &r) == SG_OK); /* repairs 3 first */
    sg_array_free(r);
    die_mid_publish(g, "arr", 2, 4);
    CHECK(sg_array_info_get(a, &info) == SG_OK && info.ver[0] == 4 && info.ver[1] == 3 && !(info.seq[0] & 1) &&
          !(info.seq[1] & 1));
    CHECK(sg_array_snapshot(a, buf, 0, &v) == SG_OK && v == 4 && is_version(buf, 4));
    /* opening repairs what a dead publisher left (its lock is free to take) */
    CHECK(sg_array_open(g, "arr", NULL, 0, 0, &r) == SG_OK);
    CHECK(sg_array_info_get(a, &info) == SG_OK && info.repairs == 3 && info.owner_deaths == 3 && info.ver[1] == 4 &&
          !(info.seq[1] & 1) && info.writer_tid == 0);
    uint64_t obj;
    sg_array_hdr *h = array_hdr(g, "arr", &obj);
    CHECK(is_version((uint64_t *)(g->base + h->data + h->stride), 4));
    sg_array_free(r);

    /* both buffers odd breaks the protocol: reported, never "repaired" */
    uint64_t keep0 = h->buf[0].seq, keep1 = h->buf[1].seq;
    CHECK(!(keep0 & 1) && !(keep1 & 1));
    h->buf[0].seq |= 1;
    h->buf[1].seq |= 1;
    CHECK(sg_array_repair(a, 0) == SG_ECORRUPT);
    CHECK(sg_array_publish(a, src, 0, &v) == SG_ECORRUPT);
    h->buf[0].seq = keep0;
    h->buf[1].seq = keep1;
    CHECK(sg_array_repair(a, 0) == SG_NO);

    /* one publisher thread, three readers: never a torn or older version */
    volatile int stop = 0;
    arr_reader rd[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        rd[i] = (arr_reader){a, &stop, 0, 0, 0};
        CHECK(pthread_create(&th[i], NULL, arr_read_loop, &rd[i]) == 0);
    }
    uint64_t last = sg_array_version(a);
    for (int k = 0; k < 3000; k++) {
        fill(src, last + 1);
        CHECK(sg_array_publish(a, src, -1, &v) == SG_OK && v == last + 1);
        last = v;
    }
    stop = 1;
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        CHECK(rd[i].snaps > 0 && rd[i].torn == 0 && rd[i].backwards == 0);
    }
    sg_array_free(a);
    sg_array_free(b);
}

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "sg-c-msg";
    sg_grid *g;
    sg_grid_unlink(name);
    CHECK(sg_grid_create(name, 16 << 20, 0600, &g) == SG_OK);
    test_ring_basic(g);
    test_ring_dead_producer(g);
    test_ring_dead_consumer(g);
    test_ring_threads(g);
    test_topic(g);
    test_counter_lock(g);
    test_feed(g);
    test_records(g);
    test_array(g);
    sg_heap_report hr;
    CHECK(sg_grid_validate(g, &hr) == SG_OK);
    sg_grid_free(g);
    CHECK(sg_grid_unlink(name) == SG_OK);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_msg: all checks passed\n");
    return 0;
}
