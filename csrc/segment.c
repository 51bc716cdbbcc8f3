/*
 * segment.c - a grid segment: create, attach, close, unlink; the process
 * table; the directory of named objects; the layout signature; the hash.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sg_internal.h"

/* ------------------------------------------------------------------------ */
/* errors                                                                    */

static _Thread_local char sg__errbuf[512];
/* A constant message set by sg__fail_const, shown instead of the buffer:
 * a non-blocking call that finds a ring empty should not pay for printf. */
static _Thread_local const char *sg__errconst;

const char *sg_errmsg(void) { return sg__errconst ? sg__errconst : sg__errbuf; }

int sg__fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sg__errbuf, sizeof sg__errbuf, fmt, ap);
    va_end(ap);
    sg__errconst = NULL;
    return code;
}

int sg__fail_const(int code, const char *msg)
{
    sg__errconst = msg;
    return code;
}

static int sg__fail_errno(int err, const char *what, const char *name)
{
    switch (err) {
    case ENOENT:
        return sg__fail(SG_ENOENT, "grid '%s' does not exist (%s)", name, what);
    case EEXIST:
        return sg__fail(SG_EEXIST, "grid '%s' already exists (%s)", name, what);
    case EACCES:
    case EPERM:
        return sg__fail(SG_EACCES, "permission denied on grid '%s' (%s)", name, what);
    case ENOMEM:
    case ENOSPC:
    case EFBIG:
        return sg__fail(SG_ENOMEM, "no room for grid '%s' (%s: %s)", name, what, strerror(err));
    default:
        return sg__fail(SG_ESYS, "grid '%s': %s failed: %s", name, what, strerror(err));
    }
}

/* ------------------------------------------------------------------------ */
/* hash: stable across processes, hosts and builds (the bridge partitions by
 * it), so it depends on the bytes only, read as little-endian words. */

static inline uint64_t sg__rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t sg__le64(const unsigned char *p, size_t n)
{
    uint64_t v = 0;
    memcpy(&v, p, n);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v) >> (8 * (8 - n));
#endif
    return v;
}

uint64_t sg_hash64(const char *data, size_t len)
{
    const uint64_t k1 = 0x9e3779b185ebca87ull, k2 = 0xc2b2ae3d27d4eb4full;
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = 0x27d4eb2f165667c5ull ^ ((uint64_t)len * k1);
    size_t n = len;

    for (; n >= 8; p += 8, n -= 8) {
        h ^= sg__rotl(sg__le64(p, 8) * k2, 31) * k1;
        h = sg__rotl(h, 27) * k1 + 0x85ebca77c2b2ae63ull;
    }
    if (n) {
        h ^= sg__rotl(sg__le64(p, n) * k1, 23) * k2;
        h = sg__rotl(h, 29) * k2;
    }
    /* finalizer: the splitmix64 avalanche */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

/* ------------------------------------------------------------------------ */
/* layout signature: a hash of every size and offset the ABI depends on, so
 * that builds with a different layout refuse each other's segments. */

uint32_t sg_layout_signature(void)
{
    const uint64_t v[] = {
        SG_CACHE_LINE, SG_DIR_ENTRIES, SG_PROC_SLOTS, SG_NCLASSES, SG_MIN_BLOCK, SG_NAME_MAX,
        SG_DIR_OFF, SG_PROC_OFF, SG_HEAP_OFF,
        sizeof(sg_header), offsetof(sg_header, ready), offsetof(sg_header, brk), offsetof(sg_header, gap_bytes),
        offsetof(sg_header, free), sizeof(sg_free_list),
        sizeof(sg_dirent), offsetof(sg_dirent, name), offsetof(sg_dirent, obj), offsetof(sg_dirent, param),
        sizeof(sg_proc), offsetof(sg_proc, epoch),
        sizeof(sg_block), sizeof(sg_map_hdr), offsetof(sg_map_hdr, table), offsetof(sg_map_hdr, live),
        offsetof(sg_map_hdr, version_floor), sizeof(sg_table_hdr), sizeof(sg_slot), offsetof(sg_header, epoch),
        offsetof(sg_table_hdr, used), SG_COPY_CHUNK,
        _Alignof(sg_header), _Alignof(sg_dirent), _Alignof(sg_proc), _Alignof(sg_map_hdr), _Alignof(sg_slot),
        SG_PW_PID_BITS, offsetof(sg_header, creator), offsetof(sg_header, heap_end), offsetof(sg_header, backed), offsetof(sg_dirent, kind),
        offsetof(sg_proc, owner), offsetof(sg_map_hdr, reclaimer), offsetof(sg_table_hdr, next),
        offsetof(sg_table_hdr, chunks_done),
        /* the bit encodings, not only the places: a build that packs a
         * word differently must refuse the segment too */
        sg__class_size(0), sg__class_size(7), sg__class_size(SG_NCLASSES - 1), SG_TAGGED(1, 16),
        SG_META(1, 2, 3), SG_DIRENT_CREATING(1), SG_DIRENT_READY, SG_HEAD(~0ull, 16), SG_HEAD_MOVED,
        SG_REF(1, 16), SG_REF_FROZEN, SG_REF_DONE,
        offsetof(sg_proc, claim_obj), offsetof(sg_proc, claim_hi), offsetof(sg_proc, waiting),
        sizeof(sg_ring_hdr), offsetof(sg_ring_hdr, head), offsetof(sg_ring_hdr, not_full), sizeof(sg_cell),
        sizeof(sg_topic_hdr), offsetof(sg_topic_hdr, joins), offsetof(sg_topic_hdr, advanced), sizeof(sg_sub_rec),
        sizeof(sg_counter_hdr), sizeof(sg_lock_hdr), offsetof(sg_lock_hdr, owner_deaths),
        SG_RING_SKIP(1), SG_TOPIC_SKIP(1), SG_CLAIM(16, SG_CLAIM_PUBLISH), SG_EVENT_WAITERS,
        offsetof(sg_map_hdr, feed), offsetof(sg_map_hdr, mirror), sizeof(sg_mirror_desc), sizeof(sg_feed_hdr), sizeof(sg_feed_rec), SG_FEED_PUB(1), SG_FEED_DELETE,
        sizeof(sg_array_hdr), offsetof(sg_array_hdr, buf), offsetof(sg_array_hdr, version), sizeof(sg_array_buf), SG_ARRAY_ALIGN,
        offsetof(sg_array_hdr, want), SG_ARRAY_OFFERED,
    };
    uint64_t h = sg_hash64((const char *)v, sizeof v);
    return (uint32_t)(h ^ (h >> 32));
}

/* ------------------------------------------------------------------------ */
/* process words and liveness                                                */

/* Start time (clock ticks since boot) and state letter of a process, from
 * /proc/<pid>/stat. 0 on success, -1 if there is no such process, -2 if
 * /proc could not be read for another reason. */
static int sg__proc_stat(uint32_t pid, uint64_t *start, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? -1 : -2;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1; /* the process went away between open and read */
    buf[n] = 0;
    /* field 2, the command, may hold spaces and parentheses: skip past the last ')' */
    char *p = strrchr(buf, ')');
    if (!p || p[1] != ' ')
        return -2;
    p += 2;
    *state = *p;
    /* fields 3 (state) .. 22 (starttime): skip 19 spaces */
    for (int i = 0; i < 19; i++) {
        p = strchr(p, ' ');
        if (!p)
            return -2;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 0;
}

/* Threads of a process, from /proc/<pid>/status (0 if unknown). */
static int sg__threads(uint32_t pid)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%u/status", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strstr(buf, "\nThreads:");
    return p ? atoi(p + 9) : 0;
}

static uint64_t sg__word(uint32_t pid, uint64_t start)
{
    return ((start & SG_PW_START_MASK) << SG_PW_PID_BITS) | (pid & SG_PW_PID_MASK);
}

uint64_t sg__task_word(uint32_t tid)
{
    uint64_t start = 0;
    char state;
    /* /proc/<tid>/stat exists for every thread, listed or not. Start time 0
     * (no /proc, or it could not be read, e.g. out of file descriptors)
     * means "unknown": liveness then falls back to kill(pid, 0), never to a
     * start-time mismatch that would declare a live owner dead. */
    if (sg__proc_stat(tid, &start, &state) != 0)
        start = 0;
    return sg__word(tid, start);
}

uint64_t sg__self_word(void) { return sg__task_word((uint32_t)getpid()); }

/* Liveness of a process (thread = 0) or of one thread (thread = 1): a
 * process whose main thread exited while others run is alive, but that
 * main thread, as a lock holder, is dead. */
static int sg__task_alive(uint32_t pid, uint64_t start_ticks, int thread)
{
    uint64_t start;
    char state;
    if (pid == 0)
        return 0;
    if ((start_ticks & SG_PW_START_MASK) == 0)
        return kill((pid_t)pid, 0) == 0 || errno == EPERM; /* start time unknown */
    switch (sg__proc_stat(pid, &start, &state)) {
    case 0:
        if ((start & SG_PW_START_MASK) != (start_ticks & SG_PW_START_MASK))
            return 0; /* the pid was reused */
        if (state == 'Z' || state == 'X')
            return !thread && sg__threads(pid) > 1; /* Z with threads left: only its main thread exited */
        return 1;
    case -1:
        /* no /proc entry: gone, unless /proc hides other users' processes */
        return kill((pid_t)pid, 0) == 0 || errno == EPERM;
    default:
        return kill((pid_t)pid, 0) == 0 || errno == EPERM;
    }
}

int sg_pid_alive(uint32_t pid, uint64_t start_ticks) { return sg__task_alive(pid, start_ticks, 0); }

int sg__thread_alive(uint64_t word)
{
    return sg__task_alive((uint32_t)(word & SG_PW_PID_MASK), (word >> SG_PW_PID_BITS) & SG_PW_START_MASK, 1);
}

int sg__word_alive(uint64_t word)
{
    return sg_pid_alive((uint32_t)(word & SG_PW_PID_MASK), (word >> SG_PW_PID_BITS) & SG_PW_START_MASK);
}

static uint64_t sg__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sg__sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------------ */
/* names                                                                     */

int sg__check_name(const char *name, size_t max, const char *what)
{
    size_t n = name ? strnlen(name, max + 1) : 0;
    int only_dots = 1;
    if (n == 0 || n > max)
        return sg__fail(SG_ENAME, "invalid %s name: must be 1 to %zu characters of [A-Za-z0-9._-]", what, max);
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                 c == '_' || c == '-';
        if (!ok)
            return sg__fail(SG_ENAME, "invalid %s name '%.*s': character %zu is not one of [A-Za-z0-9._-]",
                            what, (int)n, name, i + 1);
        only_dots &= c == '.';
    }
    if (only_dots)
        return sg__fail(SG_ENAME, "invalid %s name '%s': a name of dots only is not allowed", what, name);
    return SG_OK;
}

static void sg__shm_path(char *path, const char *name)
{
    path[0] = '/';
    strcpy(path + 1, name);
}

/* ------------------------------------------------------------------------ */
/* process table                                                             */

static sg_proc *sg__procs(sg_grid *g) { return (sg_proc *)(g->base + SG_PROC_OFF); }

/* Take a free slot, or failing that the slot of a dead process. */
static int sg__claim_slot(sg_grid *g)
{
    sg_proc *procs = sg__procs(g);
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < SG_PROC_SLOTS; i++) {
            uint64_t cur = sg_load_acquire(&procs[i].owner);
            if (cur == g->self)
                continue; /* the parent's slot, seen from a forked child with the same word */
            if (pass == 0 ? cur != 0 : (cur == 0 || sg__word_alive(cur)))
                continue;
            if (sg_cas_acq_rel(&procs[i].owner, &cur, g->self)) {
                /* A dead owner may have died inside a map operation: its
                 * announcement must not pin the epoch for us. */
                sg_store_release(&procs[i].epoch, 0);
                /* ... nor its claim record hide a dead claim behind a live owner */
                sg_store_release(&procs[i].claim_obj, 0);
                sg_store_relaxed(&procs[i].waiting, 0);
                sg_store_relaxed(&procs[i].attached_ns, sg__now_ns());
                g->slot = i;
                return SG_OK;
            }
        }
    }
    g->slot = SG_PROC_SLOTS; /* none: map operations refuse to run without one */
    return sg__fail(SG_EPROCFULL, "process table of grid '%s' is full: %u live processes attached", g->name,
                    SG_PROC_SLOTS);
}

/* ------------------------------------------------------------------------ */
/* create / attach / close                                                   */

static sg_grid *sg__handle(const char *name)
{
    sg_grid *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    strncpy(g->name, name, SG_GRID_NAME_MAX_LEN);
    g->refs = 1;
    g->fork_gen = sg__fork_generation(); /* before the word: a fork in between is then caught */
    g->self = sg__self_word();
    return g;
}

int sg_grid_create(const char *name, uint64_t size, uint32_t mode, sg_grid **out)
{
    char path[SG_GRID_NAME_MAX_LEN + 2];
    int rc = sg__check_name(name, SG_GRID_NAME_MAX_LEN, "grid");
    if (rc)
        return rc;
    if (size < SG_MIN_GRID_SIZE || size > SG_MAX_SEGMENT)
        return sg__fail(SG_EINVAL, "grid size %llu is out of range: %u bytes to %llu bytes",
                        (unsigned long long)size, SG_MIN_GRID_SIZE, (unsigned long long)SG_MAX_SEGMENT);
    if (mode > 0777)
        return sg__fail(SG_EINVAL, "mode %o is not a permission mode (0 to 0777)", mode);
    size = (size + 4095) & ~4095ull;
    sg__shm_path(path, name);

    sg_grid *g = sg__handle(name);
    if (!g)
        return sg__fail(SG_ENOMEM, "out of process memory");
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode);
    if (fd < 0) {
        rc = sg__fail_errno(errno, "shm_open", name);
        free(g);
        return rc;
    }
    /* shm_open applied the umask; the contract is the mode asked for */
    if (fchmod(fd, (mode_t)mode) != 0) {
        rc = sg__fail_errno(errno, "fchmod", name);
        goto fail_unlink;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        rc = sg__fail_errno(errno, "ftruncate", name);
        goto fail_unlink;
    }
    /* The header, directory and process table are written at once: their
     * pages must exist, or a full /dev/shm would SIGBUS us (see sg__back). */
    int ferr = posix_fallocate(fd, 0, SG_HEAP_OFF);
    if (ferr == ENOSPC || ferr == ENOMEM) {
        rc = sg__fail(SG_ENOMEM, "no room for grid '%s': /dev/shm is full", name);
        goto fail_unlink;
    }
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = sg__fail_errno(errno, "mmap", name);
        goto fail_unlink;
    }
    g->fd = fd;
    g->base = base;
    g->size = size;

    sg_header *h = sg__hdr(g);
    /* `creator` first: an attacher that sees ready == 0 checks whether it is alive */
    sg_store_relaxed(&h->creator, g->self);
    h->format = SG_FORMAT_VERSION;
    h->layout_sig = sg_layout_signature();
    h->size = size;
    h->created_ns = sg__now_ns();
    h->brk = SG_HEAP_OFF;
    h->backed = SG_HEAP_OFF;
    h->heap_end = size;
    h->magic = SG_MAGIC;
    /* SYNC POINT: segment-ready (release): every identity field above is
     * visible to an attacher that loads ready == 1 with acquire. */
    sg_store32_release(&h->ready, 1);

    rc = sg__claim_slot(g);
    if (rc) {
        munmap(g->base, g->size);
        close(g->fd);
        free(g);
        return rc;
    }
    *out = g;
    return SG_OK;

fail_unlink:
    close(fd);
    shm_unlink(path);
    free(g);
    return rc;
}

/* Check the identity line of a mapped segment whose object is `fsize` bytes. */
static int sg__check_header(sg_grid *g, uint64_t fsize)
{
    sg_header *h = sg__hdr(g);
    /* Wait (2 s at most) for a creator still at work; give up at once on a dead one. */
    for (int waited_ms = 0;; waited_ms++) {
        /* SYNC POINT: segment-ready (acquire): pairs with the creator's release store */
        uint32_t ready = sg_load32_acquire(&h->ready);
        if (ready == 1)
            break;
        if (ready != 0)
            return sg__fail(SG_EINCOMPAT, "grid '%s' is not a shmgrid segment (ready word %u)", g->name, ready);
        uint64_t creator = sg_load_relaxed(&h->creator);
        if (creator != 0 && !sg__word_alive(creator))
            return sg__fail(SG_EINCOMPAT,
                            "grid '%s' was never completed: its creator (pid %llu) died before marking it ready; "
                            "remove it with Grid.unlink('%s')",
                            g->name, (unsigned long long)(creator & SG_PW_PID_MASK), g->name);
        if (waited_ms >= 2000 && creator)
            return sg__fail(SG_EINCOMPAT, "grid '%s' is not ready after 2 s (creator pid %llu still initializing?)",
                            g->name, (unsigned long long)(creator & SG_PW_PID_MASK));
        if (waited_ms >= 2000)
            return sg__fail(SG_EINCOMPAT,
                            "grid '%s' is not a shmgrid segment, or its creator died before writing it; "
                            "if it is an abandoned grid, remove it with Grid.unlink('%s')",
                            g->name, g->name);
        sg__sleep_us(1000);
    }
    if (h->magic != SG_MAGIC)
        return sg__fail(SG_EINCOMPAT, "grid '%s' is not a shmgrid segment (bad magic 0x%016llx)", g->name,
                        (unsigned long long)h->magic);
    if (h->format != SG_FORMAT_VERSION)
        return sg__fail(SG_EINCOMPAT, "grid '%s' has format version %u; this library reads version %u", g->name,
                        h->format, SG_FORMAT_VERSION);
    if (h->layout_sig != sg_layout_signature())
        return sg__fail(SG_EINCOMPAT,
                        "grid '%s' has layout signature 0x%08x; this build has 0x%08x (built for another "
                        "architecture or version)",
                        g->name, h->layout_sig, sg_layout_signature());
    if (h->size != fsize)
        return sg__fail(SG_EINCOMPAT, "grid '%s' is truncated or damaged: header says %llu bytes, the object has %llu",
                        g->name, (unsigned long long)h->size, (unsigned long long)fsize);
    uint64_t brk = sg_load_relaxed(&h->brk);
    if (h->heap_end != fsize || brk < SG_HEAP_OFF || brk > fsize)
        return sg__fail(SG_EINCOMPAT, "grid '%s' has a damaged header (heap %llu..%llu of %llu bytes)", g->name,
                        (unsigned long long)brk, (unsigned long long)h->heap_end, (unsigned long long)fsize);
    return SG_OK;
}

int sg_grid_attach(const char *name, sg_grid **out)
{
    char path[SG_GRID_NAME_MAX_LEN + 2];
    struct stat st;
    int rc = sg__check_name(name, SG_GRID_NAME_MAX_LEN, "grid");
    if (rc)
        return rc;
    sg__shm_path(path, name);
    sg_grid *g = sg__handle(name);
    if (!g)
        return sg__fail(SG_ENOMEM, "out of process memory");
    int fd = shm_open(path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        rc = sg__fail_errno(errno, "shm_open", name);
        free(g);
        return rc;
    }
    /* A creator sizes the object right after creating it: an empty object
     * is one at work (or dead before ftruncate); give it the 2 s that a
     * creator gets to mark the header ready. */
    for (int waited_ms = 0;; waited_ms++) {
        if (fstat(fd, &st) != 0) {
            rc = sg__fail_errno(errno, "fstat", name);
            close(fd);
            free(g);
            return rc;
        }
        if (st.st_size != 0 || waited_ms >= 2000)
            break;
        sg__sleep_us(1000);
    }
    if ((uint64_t)st.st_size < SG_HEAP_OFF + SG_MIN_BLOCK || (uint64_t)st.st_size > SG_MAX_SEGMENT) {
        close(fd);
        free(g);
        return sg__fail(SG_EINCOMPAT, "grid '%s' is truncated or not a shmgrid segment (%lld bytes)", name,
                        (long long)st.st_size);
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        rc = sg__fail_errno(errno, "mmap", name);
        close(fd);
        free(g);
        return rc;
    }
    g->fd = fd;
    g->base = base;
    g->size = (uint64_t)st.st_size;
    rc = sg__check_header(g, g->size);
    if (rc == SG_OK)
        rc = sg__claim_slot(g);
    if (rc) {
        munmap(g->base, g->size);
        close(g->fd);
        free(g);
        return rc;
    }
    *out = g;
    return SG_OK;
}

int sg_grid_after_fork(sg_grid *g)
{
    if (!g || !g->base)
        return SG_OK;
    /* The mapping is inherited; the parent's slot stays the parent's. */
    g->fork_gen = sg__fork_generation();
    g->self = sg__self_word();
    return sg__claim_slot(g);
}

void sg__grid_unref(sg_grid *g)
{
    if (sg_ref_dec(&g->refs) == 0)
        free(g);
}

void sg_grid_close(sg_grid *g)
{
    if (!g || !g->base)
        return;
    uint64_t mine = g->self;
    /* Only the process that took the slot leaves it: a child forked since
     * (which never used the grid, so never took a slot of its own) holds
     * the parent's word, and must not free the slot of a live parent. */
    if (g->slot < SG_PROC_SLOTS && g->fork_gen == sg__fork_generation())
        sg_cas_acq_rel(&sg__procs(g)[g->slot].owner, &mine, 0);
    munmap(g->base, g->size);
    close(g->fd);
    g->base = NULL;
}

void sg_grid_free(sg_grid *g)
{
    if (!g)
        return;
    sg_grid_close(g);
    sg__grid_unref(g);
}

int sg_grid_unlink(const char *name)
{
    char path[SG_GRID_NAME_MAX_LEN + 2];
    int rc = sg__check_name(name, SG_GRID_NAME_MAX_LEN, "grid");
    if (rc)
        return rc;
    sg__shm_path(path, name);
    if (shm_unlink(path) != 0)
        return sg__fail_errno(errno, "shm_unlink", name);
    return SG_OK;
}

/* ------------------------------------------------------------------------ */
/* introspection                                                             */

#define SG_CHECK_OPEN(g)                                                                                     \
    do {                                                                                                     \
        if (!(g) || !(g)->base)                                                                              \
            return sg__fail(SG_ECLOSED, "grid is closed");                                                   \
    } while (0)

int sg_grid_info_get(sg_grid *g, sg_grid_info *out)
{
    SG_CHECK_OPEN(g);
    sg_header *h = sg__hdr(g);
    memset(out, 0, sizeof *out);
    out->size = g->size;
    out->heap_start = SG_HEAP_OFF;
    out->heap_brk = sg_load_relaxed(&h->brk);
    out->created_ns = h->created_ns;
    out->format = h->format;
    out->layout_sig = h->layout_sig;
    out->proc_slot = g->slot;
    sg_dirent *dir = (sg_dirent *)(g->base + SG_DIR_OFF);
    for (uint32_t i = 0; i < SG_DIR_ENTRIES; i++)
        out->objects += sg_load_acquire(&dir[i].state) == SG_DIRENT_READY;
    sg_proc *procs = sg__procs(g);
    for (uint32_t i = 0; i < SG_PROC_SLOTS; i++) {
        uint64_t w = sg_load_acquire(&procs[i].owner);
        if (w == 0)
            continue;
        if (sg__word_alive(w))
            out->procs_live++;
        else
            out->procs_dead++;
    }
    return SG_OK;
}

int sg_grid_object(sg_grid *g, uint32_t index, sg_object_info *out)
{
    SG_CHECK_OPEN(g);
    if (index >= SG_DIR_ENTRIES)
        return sg__fail(SG_EINVAL, "directory index %u out of range (0..%u)", index, SG_DIR_ENTRIES - 1);
    sg_dirent *e = (sg_dirent *)(g->base + SG_DIR_OFF) + index;
    memset(out, 0, sizeof *out);
    /* SYNC POINT: dirent-ready (acquire): the entry's fields are final */
    uint64_t s = sg_load_acquire(&e->state);
    if (s == SG_DIRENT_EMPTY)
        return SG_NO;
    if (SG_DIRENT_IS_CREATING(s)) {
        out->state = 1;
        return SG_OK;
    }
    out->state = 2;
    out->kind = e->kind;
    uint32_t n = e->name_len <= SG_NAME_MAX ? e->name_len : SG_NAME_MAX;
    memcpy(out->name, e->name, n);
    out->name[n] = 0;
    memcpy(out->param, e->param, sizeof out->param);
    sg_block *b = sg__block(g, e->obj);
    out->bytes = b ? sg__class_size(SG_META_CLASS(b->meta)) : 0;
    return SG_OK;
}

int sg_grid_proc(sg_grid *g, uint32_t index, sg_proc_info *out)
{
    SG_CHECK_OPEN(g);
    if (index >= SG_PROC_SLOTS)
        return sg__fail(SG_EINVAL, "process slot %u out of range (0..%u)", index, SG_PROC_SLOTS - 1);
    sg_proc *p = sg__procs(g) + index;
    memset(out, 0, sizeof *out);
    uint64_t w = sg_load_acquire(&p->owner);
    if (w == 0)
        return SG_NO;
    out->pid = (uint32_t)(w & SG_PW_PID_MASK);
    out->start_ticks = (w >> SG_PW_PID_BITS) & SG_PW_START_MASK;
    out->alive = (uint32_t)sg__word_alive(w);
    out->attached_ns = sg_load_relaxed(&p->attached_ns);
    return SG_OK;
}

/* ------------------------------------------------------------------------ */
/* directory                                                                 */

static const char *sg__kind_name(uint32_t kind)
{
    switch (kind) {
    case SG_OBJ_MAP:
        return "map";
    case SG_OBJ_RING:
        return "ring";
    case SG_OBJ_TOPIC:
        return "topic";
    case SG_OBJ_COUNTER:
        return "counter";
    case SG_OBJ_LOCK:
        return "lock";
    case SG_OBJ_ARRAY:
        return "array";
    default:
        return "object of an unknown kind";
    }
}

static int sg__dirent_matches(const sg_dirent *e, const char *name, size_t n)
{
    return e->name_len == n && memcmp(e->name, name, n) == 0;
}

int sg__dir_open(sg_grid *g, const char *name, uint32_t kind, const uint64_t param[4], sg__create_fn create,
                 void *ctx, sg_dirent **out)
{
    int rc = sg__check_name(name, SG_NAME_MAX, "object");
    if (rc)
        return rc;
    size_t n = strlen(name);
    sg_dirent *dir = (sg_dirent *)(g->base + SG_DIR_OFF);
    uint32_t start = (uint32_t)(sg_hash64(name, n) % SG_DIR_ENTRIES);
    int waited_us = 0;

restart:
    for (uint32_t probe = 0; probe < SG_DIR_ENTRIES; probe++) {
        sg_dirent *e = &dir[(start + probe) % SG_DIR_ENTRIES];
        /* SYNC POINT: dirent-ready (acquire): a READY entry's fields are final */
        uint64_t s = sg_load_acquire(&e->state);
        if (s == SG_DIRENT_READY) {
            if (!sg__dirent_matches(e, name, n))
                continue;
            if (e->kind != kind)
                return sg__fail(SG_EMISMATCH, "object '%s' exists as a %s, not a %s", name, sg__kind_name(e->kind),
                                sg__kind_name(kind));
            *out = e;
            return SG_OK;
        }
        if (SG_DIRENT_IS_CREATING(s)) {
            /* Its name is not visible yet, so it may be ours: wait for it. */
            if (!sg__word_alive(SG_DIRENT_CREATOR(s))) {
                /* The creator died mid-creation: free the entry (its object
                 * leaks), unless someone else already did. */
                sg_cas_acq_rel(&e->state, &s, SG_DIRENT_EMPTY);
            } else if (waited_us > 5000000) {
                return sg__fail(SG_EBUSY, "object '%s': another process (pid %llu) has been creating an object "
                                          "in its directory slot for over 5 s", name,
                                (unsigned long long)(SG_DIRENT_CREATOR(s) & SG_PW_PID_MASK));
            } else {
                sg__sleep_us(100);
                waited_us += 100;
            }
            goto restart;
        }
        /* EMPTY: the name is in no entry; claim this one. */
        if (!create)
            return SG_NO;
        if (!sg_cas_acq_rel(&e->state, &s, SG_DIRENT_CREATING(g->self)))
            goto restart; /* someone else claimed it: look again */
        uint64_t obj = 0;
        rc = create(g, param, &obj, ctx);
        if (rc) {
            uint64_t mine = SG_DIRENT_CREATING(g->self);
            sg_cas_acq_rel(&e->state, &mine, SG_DIRENT_EMPTY);
            return rc;
        }
        e->kind = kind;
        e->name_len = (uint32_t)n;
        memset(e->name, 0, sizeof e->name);
        memcpy(e->name, name, n);
        e->obj = obj;
        memcpy(e->param, param, sizeof e->param);
        /* SYNC POINT: dirent-ready (release): publishes the fields above and
         * the object the create callback initialized. A CAS from our own
         * CREATING: if we were taken for dead and the entry was reset, it
         * is someone else's now and our object leaks. */
        uint64_t mine = SG_DIRENT_CREATING(g->self);
        if (!sg_cas_release(&e->state, &mine, SG_DIRENT_READY))
            goto restart;
        *out = e;
        return SG_OK;
    }
    return sg__fail(SG_EDIRFULL, "directory of grid '%s' is full (%u objects)", g->name, SG_DIR_ENTRIES);
}
