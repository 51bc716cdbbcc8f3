/*
 * test_core.c - C unit tests of the segment, heap and map.
 *
 * Built and run by tests/test_c.py twice: with -Werror, and under
 * AddressSanitizer + UndefinedBehaviorSanitizer. Usage: test_core GRIDNAME
 * (the grid is created, used and unlinked). Exit status 0 = all passed.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../sg_internal.h"
#include "check.h"


static void test_size_classes(void)
{
    for (unsigned c = 0; c < SG_NCLASSES; c++) {
        uint64_t bs = sg__class_size(c);
        CHECK(bs % 16 == 0);
        CHECK(sg__class_for(bs) == c);
        CHECK(c == 0 || sg__class_for(sg__class_size(c - 1) + 1) == c);
        CHECK(c == 0 || bs - sg__class_size(c - 1) <= bs / 4 + 16); /* < 25% waste */
    }
    CHECK(sg__class_for(sg__class_size(SG_NCLASSES - 1) + 1) == SG_NCLASSES);
    CHECK(sg__class_for(48) == 1 && sg__class_for(49) == 2 && sg__class_for(65) == 3);
    /* a table of 2^15 slots and its 64-byte header do not double */
    CHECK(sg__class_size(sg__class_for(64 + (16u << 15))) < (16u << 16));
}

static void test_names(void)
{
    sg_grid *g;
    CHECK(sg_grid_create("", 1 << 20, 0600, &g) == SG_ENAME);
    CHECK(sg_grid_create("a/b", 1 << 20, 0600, &g) == SG_ENAME);
    CHECK(sg_grid_create("..", 1 << 20, 0600, &g) == SG_ENAME);
    CHECK(sg_grid_attach("sg-test-does-not-exist", &g) == SG_ENOENT);
    CHECK(sg_hash64("abc", 3) == sg_hash64("abc", 3));
    CHECK(sg_hash64("abc", 3) != sg_hash64("abd", 3));
}

static void test_map_basic(sg_grid *g)
{
    sg_map *m;
    char out[64];
    size_t len;
    uint64_t v;
    int64_t r;

    CHECK(sg_map_open(g, "basic", 100, 16, 32, 0, &m) == SG_OK);
    CHECK(sg_map_get(m, "k", 1, out, sizeof out, &v) == SG_ENOKEY && v == 0);
    CHECK(sg_map_put(m, "k", 1, "hello", 5, &v) == SG_OK && v == 1);
    CHECK(sg_map_get(m, "k", 1, out, sizeof out, &v) == 5 && v == 1 && memcmp(out, "hello", 5) == 0);
    CHECK(sg_map_get(m, "k", 1, NULL, 0, NULL) == 5);
    CHECK(sg_map_put(m, "k", 1, "world!", 6, &v) == SG_OK && v == 2);
    CHECK(sg_map_put_if_absent(m, "k", 1, "x", 1, &v) == SG_NO && v == 2);
    CHECK(sg_map_replace(m, "k", 1, "nope", 4, "y", 1, &v) == SG_NO);
    CHECK(sg_map_replace(m, "k", 1, "world!", 6, "y", 1, &v) == SG_OK && v == 3);
    CHECK(sg_map_compare_and_set(m, "k", 1, 2, "z", 1, &v) == SG_NO && v == 3);
    CHECK(sg_map_compare_and_set(m, "k", 1, 3, "z", 1, &v) == SG_OK && v == 4);
    CHECK(sg_map_len(m) == 1);
    CHECK(sg_map_delete(m, "k", 1, out, sizeof out, &len, &v) == SG_OK && v == 5 && len == 1 && out[0] == 'z');
    CHECK(sg_map_delete(m, "k", 1, NULL, 0, NULL, &v) == SG_NO);
    CHECK(sg_map_len(m) == 0);
    CHECK(sg_map_get(m, "k", 1, out, sizeof out, &v) == SG_ENOKEY && v == 5);
    /* a re-insert continues the version past the tombstone */
    CHECK(sg_map_compare_and_set(m, "k", 1, 0, "n", 1, &v) == SG_OK && v == 6);
    CHECK(sg_map_incr(m, "c", 1, 5, &r, &v) == SG_OK && r == 5 && v == 1);
    CHECK(sg_map_incr(m, "c", 1, -7, &r, &v) == SG_OK && r == -2 && v == 2);
    CHECK(sg_map_incr(m, "k", 1, 1, &r, &v) == SG_ENOTINT);
    CHECK(sg_map_incr(m, "c", 1, INT64_MAX, &r, &v) == SG_OK && r == INT64_MAX - 2);
    CHECK(sg_map_incr(m, "c", 1, 3, &r, &v) == SG_EOVERFLOW);
    /* limits: nothing written */
    char big[64] = {0};
    CHECK(sg_map_put(m, big, 17, "v", 1, &v) == SG_EKEYSIZE);
    CHECK(sg_map_put(m, "k2", 2, big, 33, &v) == SG_EVALSIZE);
    CHECK(sg_map_get(m, "k2", 2, out, sizeof out, &v) == SG_ENOKEY);
    /* iteration sees the live keys */
    sg_iter *it;
    int seen = 0;
    char kb[16];
    size_t kl, vl;
    CHECK(sg_iter_open(m, &it) == SG_OK);
    while (sg_iter_next(it, kb, sizeof kb, &kl, out, sizeof out, &vl, &v) == SG_OK)
        seen++;
    sg_iter_free(it);
    CHECK(seen == 2);
    sg_map_report rep;
    CHECK(sg_map_validate(m, 0, &rep) == SG_OK && rep.live == 2 && rep.live_counter == 2);
    /* re-declaration with other parameters is refused; 0 takes what exists */
    sg_map *m2;
    CHECK(sg_map_open(g, "basic", 200, 16, 32, 0, &m2) == SG_EMISMATCH);
    CHECK(sg_map_open(g, "basic", 0, 0, 0, 0, &m2) == SG_OK);
    CHECK(sg_map_len(m2) == 2);
    sg_map_free(m2);
    sg_map_free(m);
}

/* Distinct keys come and go; live keys stay few: the map migrates to
 * clean tables, never reports full, and its heap use stays bounded. */
static void test_churn(sg_grid *g)
{
    sg_map *m;
    uint64_t v;
    sg_heap_report hr;
    CHECK(sg_map_open(g, "churn", 64, 16, 16, 0, &m) == SG_OK);
    uint64_t carved_early = 0;
    for (uint64_t i = 0; i < 200000; i++) {
        int rc = sg_map_put(m, (const char *)&i, sizeof i, "v", 1, &v);
        if (rc != SG_OK) {
            CHECK(rc == SG_OK);
            break;
        }
        if (i >= 40) {
            uint64_t old = i - 40;
            CHECK(sg_map_delete(m, (const char *)&old, sizeof old, NULL, 0, NULL, &v) == SG_OK);
        }
        if (i == 20000) {
            CHECK(sg_grid_validate(g, &hr) == SG_OK);
            carved_early = hr.carved_bytes;
        }
    }
    sg_map_report rep;
    CHECK(sg_map_validate(m, 0, &rep) == SG_OK && rep.live == 40 && rep.generation > 10);
    CHECK(sg_grid_validate(g, &hr) == SG_OK && hr.carved_bytes <= carved_early + 65536);
    sg_map_free(m);
}

/* Writers killed between their CAS and their count leave len() low. A
 * migration must still size its table from what is really there: the
 * copies must fit (else every later write fails), and a table full of
 * values must grow, not migrate to its own size again and again. */
static void test_live_counter_drift(sg_grid *g)
{
    sg_map *m;
    char k[32];
    uint64_t v;
    sg_map_report rep;
    CHECK(sg_map_open(g, "drift", 8, 0, 0, 0, &m) == SG_OK);
    for (int i = 0; i < 1140; i++) {
        int n = snprintf(k, sizeof k, "key%d", i);
        CHECK(sg_map_put(m, k, (size_t)n, "v", 1, &v) == SG_OK);
    }
    sg_store_relaxed(&m->hdr->live, 1000); /* as if 140 writers died before counting */
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(k, sizeof k, "key%d", i);
        CHECK(sg_map_delete(m, k, (size_t)n, NULL, 0, NULL, &v) == SG_OK);
    }
    CHECK(sg_map_len(m) == 0);
    CHECK(sg_map_compact(m) == SG_OK); /* exact count: 140 keys, not 0 */
    CHECK(sg_map_put(m, "after", 5, "v", 1, &v) == SG_OK);
    for (int i = 1000; i < 1140; i++) {
        int n = snprintf(k, sizeof k, "key%d", i);
        CHECK(sg_map_get(m, k, (size_t)n, NULL, 0, NULL) == 1);
    }
    CHECK(sg_map_validate(m, 1, &rep) == SG_OK && rep.live == 141);
    /* now a full table whose counter says empty: inserts must grow it */
    uint64_t gen0 = rep.generation;
    sg_store_relaxed(&m->hdr->live, 0);
    for (int i = 0; i < 2000; i++) {
        int n = snprintf(k, sizeof k, "more%d", i);
        CHECK(sg_map_put(m, k, (size_t)n, "v", 1, &v) == SG_OK);
    }
    CHECK(sg_map_validate(m, 1, &rep) == SG_OK && rep.live == 2141 && rep.generation - gen0 < 12);
    sg_map_free(m);
}

static void test_full(sg_grid *g)
{
    sg_map *m;
    uint64_t v;
    char key[16];
    int rc = SG_OK, n = 0;
    CHECK(sg_map_open(g, "small", 10, 16, 16, 40, &m) == SG_OK);
    for (n = 0; n < 1000 && rc == SG_OK; n++) {
        int kl = snprintf(key, sizeof key, "k%d", n);
        rc = sg_map_put(m, key, (size_t)kl, "v", 1, &v);
    }
    CHECK(rc == SG_EFULL);
    CHECK(n - 1 >= 40); /* at least max_capacity keys fit */
    CHECK(strstr(sg_errmsg(), "max_capacity is 40") != NULL);
    sg_map_report rep;
    CHECK(sg_map_validate(m, 0, &rep) == SG_OK && rep.live == (uint64_t)(n - 1));
    sg_map_free(m);
}

/* Several processes increment shared counters; the totals must be exact. */
static void test_multiprocess_incr(sg_grid *g, const char *gridname)
{
    enum { PROCS = 4, ITERS = 20000, KEYS = 8 };
    sg_map *m;
    CHECK(sg_map_open(g, "counters", 64, 16, 16, 0, &m) == SG_OK);
    for (int p = 0; p < PROCS; p++) {
        pid_t pid = fork();
        if (pid == 0) {
            sg_grid *cg;
            sg_map *cm;
            int64_t r;
            if (sg_grid_attach(gridname, &cg) || sg_map_open(cg, "counters", 0, 0, 0, 0, &cm))
                _exit(2);
            for (int i = 0; i < ITERS; i++) {
                char k = (char)('a' + (i % KEYS));
                if (sg_map_incr(cm, &k, 1, 1, &r, NULL) != SG_OK)
                    _exit(3);
                /* churn values of another key so freed blocks are recycled under readers */
                char buf[16];
                sg_map_put(cm, "churn", 5, (const char *)&i, sizeof i, NULL);
                if (sg_map_get(cm, "churn", 5, buf, sizeof buf, NULL) != sizeof i)
                    _exit(4);
            }
            sg_map_free(cm);
            sg_grid_free(cg);
            _exit(0);
        }
    }
    for (int p = 0; p < PROCS; p++) {
        int st;
        wait(&st);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    int64_t total = 0;
    for (int k = 0; k < KEYS; k++) {
        char key = (char)('a' + k), out[8];
        CHECK(sg_map_get(m, &key, 1, out, sizeof out, NULL) == 8);
        int64_t val;
        memcpy(&val, out, 8);
        total += val;
    }
    CHECK(total == (int64_t)PROCS * ITERS);
    sg_map_report rep;
    CHECK(sg_map_validate(m, 0, &rep) == SG_OK);
    sg_heap_report hr;
    CHECK(sg_grid_validate(g, &hr) == SG_OK);
    sg_map_free(m);
}

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "sg-c-test";
    sg_grid *g;
    sg_grid_unlink(name);
    test_size_classes();
    test_names();
    CHECK(sg_grid_create(name, 8 << 20, 0600, &g) == SG_OK);
    sg_grid *twin;
    CHECK(sg_grid_create(name, 8 << 20, 0600, &twin) == SG_EEXIST);
    test_map_basic(g);
    test_full(g);
    test_churn(g);
    test_live_counter_drift(g);
    test_multiprocess_incr(g, name);
    sg_grid_info info;
    CHECK(sg_grid_info_get(g, &info) == SG_OK && info.objects == 5 && info.procs_live >= 1);
    sg_grid_close(g);
    sg_map *m;
    CHECK(sg_map_open(g, "basic", 0, 0, 0, 0, &m) == SG_ECLOSED);
    sg_grid_free(g);
    CHECK(sg_grid_unlink(name) == SG_OK);
    CHECK(sg_grid_unlink(name) == SG_ENOENT);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_core: all checks passed\n");
    return 0;
}
