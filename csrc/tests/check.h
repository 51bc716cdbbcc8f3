/*
 * check.h - the CHECK macro of the C unit tests: a failed check prints the
 * condition and the library's last error message, counts, and carries on.
 * main() reports the count and exits non-zero if it is not 0.
 */
#ifndef SG_TEST_CHECK_H
#define SG_TEST_CHECK_H

#include <stdio.h>

#include "../shmgrid.h"

static int failures;

#define CHECK(cond)                                                                                          \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond,         \
                    sg_errmsg());                                                                            \
            failures++;                                                                                      \
        }                                                                                                    \
    } while (0)

#endif /* SG_TEST_CHECK_H */
