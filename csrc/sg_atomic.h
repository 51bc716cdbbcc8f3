/*
 * sg_atomic.h - every atomic operation, fence and futex call of the shmgrid core.
 *
 * The memory model of the whole core can be reviewed here and at the call
 * sites marked "SYNC POINT": both halves of every acquire/release pair carry
 * the same SYNC POINT name, so `grep "SYNC POINT: <name>"` finds the pair.
 *
 * Shared words are plain uint64_t/uint32_t in the layout structs (their size
 * and alignment are part of the ABI and are _Static_assert'ed); they are only
 * ever touched through the functions below, which use the GCC/Clang __atomic
 * builtins. Those builtins are the C11 memory model applied to an ordinary
 * object, which keeps the shared structs free of _Atomic qualifiers (whose
 * size/alignment the standard leaves to the implementation).
 *
 * Not part of the public header: nothing here is visible to Python.
 */
#ifndef SG_ATOMIC_H
#define SG_ATOMIC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#if !defined(__GNUC__)
#error "shmgrid needs GCC or Clang __atomic builtins"
#endif

_Static_assert(__atomic_always_lock_free(8, 0), "64-bit atomics must be lock-free: they live in shared memory");
_Static_assert(__atomic_always_lock_free(4, 0), "32-bit atomics must be lock-free: they live in shared memory");

/* ---- 64-bit words ------------------------------------------------------ */

static inline uint64_t sg_load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint64_t sg_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void sg_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void sg_store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Strong CAS. On failure *expected receives the current value. */
static inline bool sg_cas_acq_rel(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline bool sg_cas_acquire(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE);
}
static inline bool sg_cas_release(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
}
static inline bool sg_cas_relaxed(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

static inline uint64_t sg_fetch_add_relaxed(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint64_t sg_fetch_sub_relaxed(uint64_t *p, uint64_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }

/* Sequentially consistent operations: only for the reclamation epochs
 * (SYNC POINT: epoch), whose correctness argument needs one total order of
 * "announce epoch, then load table" against "swap table, then bump epoch,
 * then scan announcements". */
static inline uint64_t sg_load_seq_cst(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void sg_store_seq_cst(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline bool sg_cas_seq_cst(uint64_t *p, uint64_t *expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t sg_fetch_add_seq_cst(uint64_t *p, uint64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t sg_fetch_sub_release(uint64_t *p, uint64_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELEASE); }
static inline uint64_t sg_fetch_or_acq_rel(uint64_t *p, uint64_t v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }

/* ---- 32-bit words ------------------------------------------------------ */

static inline uint32_t sg_load32_acquire(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t sg_load32_relaxed(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void sg_store32_release(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void sg_store32_relaxed(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint32_t sg_fetch_or32_seq_cst(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t sg_fetch_add32_relaxed(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline bool sg_cas32_relaxed(uint32_t *p, uint32_t *expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

/* ---- process-local reference counts ------------------------------------ */

static inline int sg_ref_inc(int *p) { return __atomic_add_fetch(p, 1, __ATOMIC_RELAXED); }
/* acq_rel: the thread that drops the last reference sees every write made
 * through the other references before it frees the object. */
static inline int sg_ref_dec(int *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_ACQ_REL); }

/* A process-local countdown shared by threads: approximate is fine, a
 * data race is not. */
static inline int sg_countdown(int *p) { return __atomic_sub_fetch(p, 1, __ATOMIC_RELAXED); }
static inline void sg_countdown_set(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* ---- fences -------------------------------------------------------------- */

static inline void sg_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void sg_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* Store-load ordering: only where a Dekker-style handshake needs it
 * (SYNC POINT: event, SYNC POINT: topic-join). */
static inline void sg_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void sg_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}

/* ---- racy copies of recyclable blocks ------------------------------------
 *
 * A value block may be freed and reused by a writer while a reader that
 * loaded the old reference is still copying it (the reader then notices the
 * reference changed and retries). For that overlap to be a race the C11
 * model defines, both sides touch block payloads only with relaxed 64-bit
 * atomic accesses, in whole 8-byte words (plain MOV/LDR on x86-64/AArch64).
 * Blocks are 16-byte aligned and sized in whole words, so a copy may read or
 * write up to 7 bytes past `len` inside the block, never past it.
 *
 * The pairing (SYNC POINT: block-reuse) is between the release fence a
 * writer issues after taking a block off a free list (sg_heap_alloc) and the
 * acquire fence a reader issues after its copy and before re-reading the
 * reference that named the block. Boehm, "Can seqlocks get along with
 * programming language memory models?" (MSPC 2012), gives the argument.
 */

/* Copy n bytes out of shared block words `src` into private memory `dst`. */
static inline void sg_copy_out(void *dst, const uint64_t *src, size_t n)
{
    unsigned char *d = dst;
    size_t words = n / 8, i;
    for (i = 0; i < words; i++) {
        uint64_t w = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
        memcpy(d + 8 * i, &w, 8);
    }
    if (n % 8) {
        uint64_t w = __atomic_load_n(&src[words], __ATOMIC_RELAXED);
        memcpy(d + 8 * words, &w, n % 8);
    }
}

/* Copy n bytes of private memory `src` into shared block words `dst`; the
 * tail word is zero-padded. */
static inline void sg_copy_in(uint64_t *dst, const void *src, size_t n)
{
    const unsigned char *s = src;
    size_t words = n / 8, i;
    for (i = 0; i < words; i++) {
        uint64_t w;
        memcpy(&w, s + 8 * i, 8);
        __atomic_store_n(&dst[i], w, __ATOMIC_RELAXED);
    }
    if (n % 8) {
        uint64_t w = 0;
        memcpy(&w, s + 8 * words, n % 8);
        __atomic_store_n(&dst[words], w, __ATOMIC_RELAXED);
    }
}

/* Copy n bytes between two shared areas of whole words (relaxed on both
 * sides: each is read or written by other processes under a seqlock). */
static inline void sg_copy_shared(uint64_t *dst, const uint64_t *src, size_t n)
{
    for (size_t i = 0; i < (n + 7) / 8; i++)
        __atomic_store_n(&dst[i], __atomic_load_n(&src[i], __ATOMIC_RELAXED), __ATOMIC_RELAXED);
}

/* Compare n bytes of private memory with shared block words; 0 if equal. */
static inline int sg_compare_shared(const uint64_t *shared, const void *priv, size_t n)
{
    const unsigned char *p = priv;
    size_t words = n / 8, i;
    for (i = 0; i < words; i++) {
        uint64_t w, q;
        w = __atomic_load_n(&shared[i], __ATOMIC_RELAXED);
        memcpy(&q, p + 8 * i, 8);
        if (w != q)
            return 1;
    }
    if (n % 8) {
        uint64_t w = __atomic_load_n(&shared[words], __ATOMIC_RELAXED);
        return memcmp(&w, p + 8 * words, n % 8) != 0;
    }
    return 0;
}

/* ---- futex: sleeping on a 32-bit word of shared memory -------------------
 *
 * Not FUTEX_PRIVATE: the word is shared between processes, so the kernel
 * keys the wait on the page, not on this process's address space.
 */

/* Sleep while *word == expected, at most timeout_ns (< 0: no limit).
 * Returns 0 when woken or when *word had changed already, ETIMEDOUT, or
 * EINTR when a signal arrived (the caller returns to Python so that a
 * KeyboardInterrupt can be raised). */
static inline int sg_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tp = &ts;
    }
    if (syscall(SYS_futex, word, FUTEX_WAIT, expected, tp, NULL, 0) == 0)
        return 0;
    return errno == EAGAIN ? 0 : errno;
}

/* Wake every sleeper on word. */
static inline void sg_futex_wake_all(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

/* Sleep until any of n words (n <= SG_FUTEX_WAITV_MAX) no longer holds its
 * expected value, or until the absolute CLOCK_MONOTONIC time deadline_ns
 * (UINT64_MAX: no limit). futex_waitv (Linux 5.16) checks every word and
 * queues the sleeper on all of them in one step, exactly as FUTEX_WAIT does
 * for one word, so a change made after the caller read a word either makes
 * the call return at once or wakes it. Shared futexes (no FUTEX2_PRIVATE),
 * like every other futex call here, so that a FUTEX_WAKE on the same word
 * (shared memory or not) finds the sleeper.
 * Returns 0 when woken, when a word had changed already, or at the
 * deadline; ENOSYS on a kernel without futex_waitv; EINTR on a signal. */
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449 /* the same number on every architecture */
#endif
#define SG_FUTEX_WAITV_MAX 128
#define SG_FUTEX_SIZE_U32 0x02
struct sg_futex_waitv {
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

static inline int sg_futex_waitv(uint32_t *const *words, const uint32_t *vals, uint32_t n, uint64_t deadline_ns)
{
    struct sg_futex_waitv v[SG_FUTEX_WAITV_MAX]; /* n is 1..SG_FUTEX_WAITV_MAX: sg_event_waitv checks */
    for (uint32_t i = 0; i < n; i++) {
        v[i].val = vals[i];
        v[i].uaddr = (uint64_t)(uintptr_t)words[i];
        v[i].flags = SG_FUTEX_SIZE_U32;
        v[i].reserved = 0;
    }
    struct timespec ts, *tp = NULL;
    if (deadline_ns != UINT64_MAX) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000u);
        ts.tv_nsec = (long)(deadline_ns % 1000000000u);
        tp = &ts;
    }
    if (syscall(SYS_futex_waitv, v, n, 0, tp, CLOCK_MONOTONIC) >= 0)
        return 0;
    return errno == EAGAIN || errno == ETIMEDOUT ? 0 : errno;
}

#endif /* SG_ATOMIC_H */
