/*
 * test_batch.c - the batch map calls and typed maps, from C (built with
 * -Werror and under ASan + UBSan by tests/test_c.py).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../shmgrid.h"
#include "check.h"

/* Typed maps: the types are recorded, checked, and read back. */
static void test_types(sg_grid *g)
{
    sg_map *m, *m2;
    char kt[64], vt[64];
    size_t kl, vl;
    CHECK(sg_map_open_typed(g, "typed", 64, 8, 8, 0, "<i8", 3, "<f8", 3, &m) == SG_OK);
    CHECK(sg_map_types_get(m, kt, sizeof kt, &kl, vt, sizeof vt, &vl) == SG_OK && kl == 3 && vl == 3 &&
          memcmp(kt, "<i8", 3) == 0 && memcmp(vt, "<f8", 3) == 0);
    CHECK(sg_map_open_typed(g, "typed", 0, 8, 8, 0, "<i8", 3, "<i8", 3, &m2) == SG_EMISMATCH);
    CHECK(sg_map_open_typed(g, "typed", 0, 8, 8, 0, "<i8", 3, "<f8x", 4, &m2) == SG_EMISMATCH);
    CHECK(sg_map_open(g, "typed", 0, 0, 0, 0, &m2) == SG_OK); /* untyped open takes what it has */
    CHECK(sg_map_types_get(m2, kt, sizeof kt, &kl, vt, sizeof vt, &vl) == SG_OK && kl == 3);
    sg_map_free(m2);
    CHECK(sg_map_open(g, "untyped", 64, 8, 8, 0, &m2) == SG_OK);
    CHECK(sg_map_types_get(m2, kt, sizeof kt, &kl, vt, sizeof vt, &vl) == SG_NO);
    sg_map_free(m2);
    CHECK(sg_map_open_typed(g, "untyped", 0, 8, 8, 0, "<i8", 3, "<f8", 3, &m2) == SG_EMISMATCH);
    CHECK(sg_map_open_typed(g, "t2", 0, 8, 8, 0, "<i8", 3, NULL, 0, &m2) == SG_EINVAL);
    CHECK(sg_map_open_typed(g, "t2", 0, 0, 8, 0, "<i8", 3, "<f8", 3, &m2) == SG_EINVAL);
    sg_map_free(m);
}

/* Fixed-width batches, with growth (a migration) under the puts. */
static void test_fixed(sg_grid *g)
{
    enum { N = 5000 };
    sg_map *m;
    CHECK(sg_map_open_typed(g, "fixed", 16, 8, 8, 0, "<i8", 3, "<i8", 3, &m) == SG_OK);
    int64_t *keys = malloc(N * 8), *vals = malloc(N * 8), *out = malloc(N * 8), *res = malloc(N * 8);
    int32_t *st = malloc(N * 4);
    uint64_t *ver = malloc(N * 8);
    for (int i = 0; i < N; i++) {
        keys[i] = i * 7919;
        vals[i] = -i;
    }
    CHECK(sg_map_put_many(m, (char *)keys, NULL, 8, (char *)vals, NULL, 8, N, st, ver) == N);
    int ok = 1;
    for (int i = 0; i < N; i++)
        ok &= st[i] == SG_OK && ver[i] == 1;
    CHECK(ok);
    CHECK(sg_map_len(m) == N);
    /* every key, and one absent key at the end */
    keys[N - 1] = -1;
    CHECK(sg_map_get_many(m, (char *)keys, NULL, 8, N, (char *)out, N * 8, 8, st, ver) == N);
    ok = 1;
    for (int i = 0; i < N - 1; i++)
        ok &= st[i] == 8 && out[i] == -i && ver[i] == 1;
    CHECK(ok && st[N - 1] == SG_ENOKEY);
    /* the output must hold n values */
    CHECK(sg_map_get_many(m, (char *)keys, NULL, 8, N, (char *)out, N * 8 - 1, 8, st, ver) == SG_EINVAL);
    /* incr: an overflow fails its element only, and reads as 0 */
    int64_t deltas[3] = {1, INT64_MIN, 5};
    int64_t k3[3] = {0, 7919, 7919 * 2};
    CHECK(sg_map_incr_many(m, (char *)k3, NULL, 8, 3, deltas, res, st, ver) == 3);
    CHECK(st[0] == SG_OK && res[0] == 1 && st[1] == SG_EOVERFLOW && res[1] == 0 && st[2] == SG_OK && res[2] == 3);
    /* delete: present, then absent */
    CHECK(sg_map_delete_many(m, (char *)k3, NULL, 8, 3, st, ver) == 3 && st[0] == SG_OK && ver[0] == 3);
    CHECK(sg_map_delete_many(m, (char *)k3, NULL, 8, 3, st, NULL) == 3 && st[0] == SG_NO && st[2] == SG_NO);
    /* keys wider than max_key: refused whole */
    CHECK(sg_map_put_many(m, (char *)keys, NULL, 9, (char *)vals, NULL, 8, 2, st, ver) == SG_EKEYSIZE);
    sg_map_report rep;
    CHECK(sg_map_validate(m, 0, &rep) == SG_OK && rep.live == N - 3 && rep.generation > 1);
    free(keys);
    free(vals);
    free(out);
    free(res);
    free(st);
    free(ver);
    sg_map_free(m);
}

/* Variable-length batches: concatenated keys and values; a packed get stops
 * before the first value that does not fit and is called again. */
static void test_var(sg_grid *g)
{
    sg_map *m;
    CHECK(sg_map_open(g, "var", 16, 8, 100, 0, &m) == SG_OK);
    const char *keys = "aabbbc";
    uint32_t klens[4] = {2, 3, 1, 0}; /* "aa", "bbb", "c", "" */
    char vals[300];
    memset(vals, 'x', sizeof vals);
    uint32_t vlens[4] = {100, 50, 100, 0};
    int32_t st[4];
    uint64_t ver[4];
    CHECK(sg_map_put_many(m, keys, klens, 0, vals, vlens, 0, 4, st, ver) == 4);
    CHECK(st[0] == SG_OK && st[3] == SG_OK && ver[2] == 1);
    uint32_t bad[4] = {100, 101, 1, 1};
    CHECK(sg_map_put_many(m, keys, klens, 0, vals, bad, 0, 4, st, ver) == SG_EVALSIZE);
    uint32_t badk[2] = {1, 9};
    CHECK(sg_map_get_many(m, "aaaaaaaaaa", badk, 0, 2, vals, sizeof vals, 0, st, ver) == SG_EKEYSIZE);
    char out[160];
    CHECK(sg_map_get_many(m, keys, klens, 0, 4, out, 99, 0, st, ver) == SG_EINVAL); /* < max_value */
    CHECK(sg_map_get_many(m, keys, klens, 0, 4, out, sizeof out, 0, st, ver) == 2); /* 100 + 50, then 100 won't fit */
    CHECK(st[0] == 100 && st[1] == 50);
    CHECK(sg_map_get_many(m, keys + 5, klens + 2, 0, 2, out, sizeof out, 0, st, ver) == 2);
    CHECK(st[0] == 100 && st[1] == 0);
    /* an absent key takes no room */
    uint32_t l1[1] = {1};
    CHECK(sg_map_get_many(m, "z", l1, 0, 1, out, sizeof out, 0, st, ver) == 1 && st[0] == SG_ENOKEY);
    /* a mirrored map refuses writes to other hosts' partitions, per element */
    uint8_t none[1] = {0};
    CHECK(sg_map_set_mirror(m, 1, none) == SG_OK);
    CHECK(sg_map_put_many(m, keys, klens, 0, vals, vlens, 0, 4, st, ver) == 4 && st[0] == SG_EREMOTE &&
          st[3] == SG_EREMOTE && ver[0] == 0);
    CHECK(sg_map_get_many(m, keys, klens, 0, 1, out, sizeof out, 0, st, ver) == 1 && st[0] == 100);
    CHECK(sg_map_set_mirror(m, 0, none) == SG_OK);
    sg_map_free(m);
}

int main(int argc, char **argv)
{
    const char *name = argc > 1 ? argv[1] : "sg-c-test-batch";
    sg_grid *g;
    sg_grid_unlink(name);
    CHECK(sg_grid_create(name, 16 << 20, 0600, &g) == SG_OK);
    test_types(g);
    test_fixed(g);
    test_var(g);
    sg_grid_close(g);
    sg_grid_free(g);
    CHECK(sg_grid_unlink(name) == SG_OK);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_batch: all checks passed\n");
    return 0;
}
