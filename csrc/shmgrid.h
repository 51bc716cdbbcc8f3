/*
 * shmgrid.h - the public C interface of the shmgrid core.
 *
 * The region between the CDEF markers is read verbatim by the cffi build
 * script (shmgrid/_build.py), so it holds only what cffi's parser accepts:
 * integer #defines, typedefs and prototypes. Everything else stays outside.
 *
 * Conventions:
 *   - Functions return SG_OK (0) on success, SG_NO (1) for a well-defined
 *     "no" (key absent, CAS lost to a different value), and a negative SG_E*
 *     code on error. After an error, sg_errmsg() gives a message for the
 *     calling thread that names the limit or the cause.
 *   - Handles (sg_grid, sg_map) are private to the process that made them.
 *     A handle may be used by several threads at once; sg_grid_close must not
 *     race with other calls on the same grid (the mapping goes away).
 *   - Nothing is ever unlinked implicitly: only sg_grid_unlink removes a
 *     segment name.
 */
#ifndef SHMGRID_H
#define SHMGRID_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
#define SG_OK 0
#define SG_NO 1
#define SG_EINVAL -1
#define SG_ENOENT -2
#define SG_EEXIST -3
#define SG_EACCES -4
#define SG_EINCOMPAT -5
#define SG_ECORRUPT -6
#define SG_EKEYSIZE -7
#define SG_EVALSIZE -8
#define SG_EFULL -9
#define SG_ENOMEM -10
#define SG_ECLOSED -11
#define SG_EMISMATCH -12
#define SG_ENOTINT -13
#define SG_EOVERFLOW -14
#define SG_EDIRFULL -15
#define SG_EPROCFULL -16
#define SG_ESYS -17
#define SG_EBUSY -18
#define SG_ENAME -19
#define SG_ENOKEY -20
#define SG_EAGAIN -21
#define SG_EINTR -22
#define SG_ENOTOWNER -23
#define SG_EDEADLK -24
#define SG_ELAPPED -25
#define SG_EREMOTE -26
#define SG_OWNERDIED 2

#define SG_SEGMENT_MAGIC 0x00444952474d4853
#define SG_DIR_SIZE 256
#define SG_DIR_OFFSET 8192
#define SG_DIRENT_SIZE 128
#define SG_PROC_OFFSET 40960
#define SG_HEAP_OFFSET 57344
#define SG_PROC_TABLE_SIZE 256
#define SG_NAME_MAX_LEN 64
#define SG_GRID_NAME_MAX_LEN 200
#define SG_MIN_GRID_SIZE 1048576
#define SG_MAX_KEY_LIMIT 65536
#define SG_MAX_VALUE_LIMIT 268435456
#define SG_KIND_MAP 1
#define SG_KIND_RING 2
#define SG_KIND_TOPIC 3
#define SG_KIND_COUNTER 4
#define SG_KIND_LOCK 5
#define SG_KIND_ARRAY 6
#define SG_DEFAULT_RING_SLOTS 1024
#define SG_DEFAULT_SLOT_SIZE 256
#define SG_DEFAULT_TOPIC_CAPACITY 1024
#define SG_DEFAULT_MAX_MESSAGE 256
#define SG_DEFAULT_MAX_SUBSCRIBERS 64
#define SG_MAX_SUBSCRIBERS_LIMIT 1024
#define SG_MAX_MESSAGE_LIMIT 16777216
#define SG_FEED_SLOTS 8192
#define SG_CHANGE_PUT 1
#define SG_CHANGE_DELETE 2
#define SG_CHANGE_LOST 3
#define SG_DEFAULT_GRID_SIZE 268435456
#define SG_DEFAULT_CAPACITY 16384
#define SG_DEFAULT_MAX_KEY 256
#define SG_DEFAULT_MAX_VALUE 4096
#define SG_ARRAY_DESC_MAX 4096
#define SG_ARRAY_MAX_BYTES 2147418112

typedef struct sg_grid sg_grid;
typedef struct sg_map sg_map;
typedef struct sg_iter sg_iter;
typedef struct sg_ring sg_ring;
typedef struct sg_topic sg_topic;
typedef struct sg_sub sg_sub;
typedef struct sg_counter sg_counter;
typedef struct sg_lock sg_lock;
typedef struct sg_watch sg_watch;
typedef struct sg_array sg_array;

typedef struct sg_grid_info {
    uint64_t size;         /* bytes of the segment */
    uint64_t heap_start;   /* offset where the heap begins */
    uint64_t heap_brk;     /* offset of the first byte never carved */
    uint64_t created_ns;   /* CLOCK_REALTIME at creation */
    uint32_t format;
    uint32_t layout_sig;
    uint32_t objects;      /* READY directory entries */
    uint32_t procs_live;   /* process-table slots held by live processes */
    uint32_t procs_dead;   /* slots still naming a dead process */
    uint32_t proc_slot;    /* this handle's slot */
} sg_grid_info;

typedef struct sg_object_info {
    uint32_t kind;         /* SG_KIND_*; 0 for an unused entry */
    uint32_t state;        /* 0 empty, 1 being created, 2 ready */
    char name[65];         /* NUL-terminated */
    uint64_t param[4];     /* creation parameters (map: capacity, max_key, max_value) */
    uint64_t bytes;        /* bytes of the object's header block (a map's tables and
                              entries are extra; a ring's or topic's cells are inside) */
} sg_object_info;

typedef struct sg_proc_info {
    uint32_t pid;          /* 0 for a free slot */
    uint32_t alive;        /* 1 if that process (pid and start time) still runs */
    uint64_t start_ticks;  /* process start time, clock ticks since boot */
    uint64_t attached_ns;
} sg_proc_info;

typedef struct sg_heap_report {
    uint64_t carved_bytes;     /* bytes carved from the heap break, alignment gaps included */
    uint64_t gap_bytes;        /* of which alignment gaps, never part of a block */
    uint64_t free_bytes;       /* bytes in blocks on the free lists */
    uint64_t free_blocks;
    uint64_t heap_bytes;       /* bytes between heap start and heap end */
    int32_t error;             /* SG_OK, or SG_ECORRUPT with sg_errmsg() set */
} sg_heap_report;

typedef struct sg_map_report {
    uint64_t capacity;
    uint64_t nslots;
    uint64_t slot_limit;
    uint64_t used;             /* bound slots as counted by inserters */
    uint64_t bound;            /* bound slots found by the walk */
    uint64_t live;             /* keys present, found by the walk */
    uint64_t tombstones;       /* keys deleted (slot still bound) */
    int64_t live_counter;      /* what len() reports */
    uint64_t block_bytes;      /* bytes of reachable blocks: header, change feed, keys, values, tombstones */
    uint64_t table_bytes;
    uint64_t generation;       /* 1 for the first table, +1 per migration */
    uint64_t version_floor;    /* highest version of a tombstone a migration dropped */
    uint64_t retired_tables;   /* old tables waiting for readers to move on */
    uint64_t retired_bytes;
    uint32_t max_key;
    uint32_t max_value;
    int32_t error;             /* SG_OK, or SG_ECORRUPT with sg_errmsg() set */
} sg_map_report;

const char *sg_errmsg(void);
uint32_t sg_layout_signature(void);
uint64_t sg_hash64(const char *data, size_t len);

int sg_grid_create(const char *name, uint64_t size, uint32_t mode, sg_grid **out);
int sg_grid_attach(const char *name, sg_grid **out);
void sg_grid_close(sg_grid *g);
void sg_grid_free(sg_grid *g);
int sg_grid_unlink(const char *name);
/* In a child forked from a process with g open: take the child's own
 * process-table slot and word (the parent's stay the parent's). Call it
 * before the child uses g (the Python layer does, from an at-fork hook);
 * ring and topic calls do it themselves if it was not done. */
int sg_grid_after_fork(sg_grid *g);
int sg_grid_info_get(sg_grid *g, sg_grid_info *out);
int sg_grid_object(sg_grid *g, uint32_t index, sg_object_info *out);
int sg_grid_proc(sg_grid *g, uint32_t index, sg_proc_info *out);
int sg_grid_validate(sg_grid *g, sg_heap_report *out);
int sg_pid_alive(uint32_t pid, uint64_t start_ticks);

/* capacity: keys the first table holds; 0 = default. max_capacity: 0, or
 * the number of keys growth stops at. max_key/max_value: 0 = default. On
 * an existing map, every non-zero parameter must equal the map's. */
int sg_map_open(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_key,
                uint32_t max_value, uint64_t max_capacity, sg_map **out);
void sg_map_free(sg_map *m);
int sg_map_params(sg_map *m, uint64_t *capacity, uint32_t *max_key, uint32_t *max_value,
                  uint64_t *max_capacity);
/* Returns the value's length (copying up to cap bytes into out), SG_ENOKEY
 * if the key is absent, or another negative error. *version (if not NULL)
 * receives the key's version: a tombstone's for a deleted key, 0 if never
 * stored. */
int64_t sg_map_get(sg_map *m, const char *key, size_t klen, char *out, size_t cap, uint64_t *version);
int sg_map_put(sg_map *m, const char *key, size_t klen, const char *val, size_t vlen,
               uint64_t *version);
int sg_map_put_if_absent(sg_map *m, const char *key, size_t klen, const char *val,
                         size_t vlen, uint64_t *version);
int sg_map_replace(sg_map *m, const char *key, size_t klen, const char *expected,
                   size_t elen, const char *val, size_t vlen, uint64_t *version);
int sg_map_compare_and_set(sg_map *m, const char *key, size_t klen, uint64_t expected_version,
                           const char *val, size_t vlen, uint64_t *version);
int sg_map_delete(sg_map *m, const char *key, size_t klen, char *out, size_t cap,
                  size_t *len, uint64_t *version);
int sg_map_incr(sg_map *m, const char *key, size_t klen, int64_t delta, int64_t *result,
                uint64_t *version);
int64_t sg_map_len(sg_map *m);
/* Force a migration to a table sized for the keys present (dropping the
 * slots of deleted keys) and help until it is complete. */
int sg_map_compact(sg_map *m);
/* Walk the keys present: weakly consistent (every key present for the whole
 * walk is seen once; keys added or removed meanwhile may or may not be).
 * An open iterator keeps the table it walks from being freed: free it. */
int sg_iter_open(sg_map *m, sg_iter **out);
int sg_iter_next(sg_iter *it, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap,
                 size_t *vlen, uint64_t *version);
void sg_iter_free(sg_iter *it);
/* Finish any migration, then walk the table and check every invariant.
 * With repair, reset the live and slot counters to what the walk found
 * (only while no other process writes). */
int sg_map_validate(sg_map *m, int repair, sg_map_report *out);

/* A per-thread call context for the hot paths: every argument cffi must
 * convert costs ~30 ns, more than a cached lookup, so the map, the output
 * buffer and the out-values travel in one struct. One sg_io per thread. */
typedef struct sg_io {
    sg_map *map;
    char *buf;        /* max(max_value, 8) bytes, owned by the sg_io */
    uint64_t version; /* out: the key's version after the call */
    int64_t result;   /* out: sg_io_incr's new value */
} sg_io;

sg_io *sg_io_new(sg_map *m);
void sg_io_free(sg_io *io);
/* Copies the value into io->buf; returns its length, SG_ENOKEY, or an error. */
int64_t sg_io_get(sg_io *io, const char *key, size_t klen);
/* Returns the key's new version (> 0), or a negative error. */
int64_t sg_io_put(sg_io *io, const char *key, size_t klen, const char *val, size_t vlen);
/* Returns SG_OK with the new value in io->result, or a negative error. */
int sg_io_incr(sg_io *io, const char *key, size_t klen, int64_t delta);
/* ---- messaging ----------------------------------------------------------
 *
 * Blocking calls take timeout_ns: 0 = do not wait, < 0 = no limit. They
 * return SG_EAGAIN when the time is up and SG_EINTR when a signal arrived
 * while asleep (the Python layer waits in slices of at most 100 ms so that
 * Ctrl-C is seen promptly either way).
 */

typedef struct sg_ring_info {
    uint64_t slots;
    uint64_t slot_size;
    uint64_t head;          /* positions taken by consumers */
    uint64_t tail;          /* positions claimed by producers */
    uint64_t skipped;       /* positions skipped: their producer died after claiming */
    uint64_t dropped;       /* messages lost: their consumer died while taking them */
    uint32_t waiters;       /* live processes with a thread asleep on the ring */
} sg_ring_info;

/* slots: 0 = default; slot_size: 0 = default. On an existing ring, non-zero
 * parameters must equal the ring's. */
int sg_ring_open(sg_grid *g, const char *name, uint64_t slots, uint32_t slot_size, sg_ring **out);
void sg_ring_free(sg_ring *r);
int sg_ring_put(sg_ring *r, const char *data, size_t len, int64_t timeout_ns);
/* Returns the message length (copied into out, which holds cap >= slot_size
 * bytes), or a negative error. */
int64_t sg_ring_get(sg_ring *r, char *out, size_t cap, int64_t timeout_ns);
/* Enqueue a prefix of n messages (concatenated in data, lengths in lens),
 * waiting until at least one fits. Returns how many (>= 1), or an error.
 * Every length is checked before anything is enqueued. */
int64_t sg_ring_put_many(sg_ring *r, const char *data, const uint32_t *lens, size_t n, int64_t timeout_ns);
/* Take up to max messages into out (concatenated, at most cap bytes),
 * lengths into lens, waiting until at least one is there. Returns how many. */
int64_t sg_ring_get_many(sg_ring *r, char *out, size_t cap, uint32_t *lens, size_t max, int64_t timeout_ns);
int sg_ring_info_get(sg_ring *r, sg_ring_info *out);

/* A per-thread call context for the consumer's hot paths (as sg_io for
 * maps): fewer arguments for cffi to convert, and the lengths of a batch. */
typedef struct sg_ring_io {
    sg_ring *ring;
    char *buf;          /* max_items * slot_size bytes, owned by the io */
    uint32_t *lens;     /* max_items lengths, owned by the io */
    size_t max_items;
    uint32_t uniform;   /* out of sg_ring_io_get_many: the length all the messages
                           had, or UINT32_MAX if they differ */
} sg_ring_io;

sg_ring_io *sg_ring_io_new(sg_ring *r, size_t max_items);
void sg_ring_io_free(sg_ring_io *io);
/* sg_ring_get into io->buf. */
int64_t sg_ring_io_get(sg_ring_io *io, int64_t timeout_ns);
/* sg_ring_get_many of up to min(max, io->max_items) into io->buf / io->lens. */
int64_t sg_ring_io_get_many(sg_ring_io *io, size_t max, int64_t timeout_ns);
/* Messages claimed by producers and not yet by consumers (0..slots), or a
 * negative error. */
int64_t sg_ring_depth(sg_ring *r);
/* Check every cell's sequence word against head and tail: SG_OK,
 * SG_ECORRUPT, or SG_EBUSY if head or tail moved during the walk
 * (meaningful only while the ring is idle). */
int sg_ring_validate(sg_ring *r);

typedef struct sg_topic_info {
    uint64_t capacity;
    uint64_t max_message;
    uint32_t lossless;
    uint32_t max_subscribers;
    uint64_t tail;          /* messages published (positions claimed) */
    uint64_t skipped;       /* positions skipped: their publisher died after claiming */
    uint64_t removed;       /* dead subscribers dropped (lossless) */
    uint64_t oldest_cursor; /* lowest cursor of any subscriber record in use; tail if none */
    uint32_t subscribers;   /* live subscribers */
    uint32_t dead_subscribers; /* records of dead processes not yet removed (a blocked
                                  lossless publisher removes them) */
    uint32_t waiters;
} sg_topic_info;

/* lossless: 0 = default/any (lossless on creation), 1 = lossless, 2 = lossy. */
int sg_topic_open(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_message, uint32_t lossless,
                  uint32_t max_subscribers, sg_topic **out);
void sg_topic_free(sg_topic *t);
int sg_topic_publish(sg_topic *t, const char *data, size_t len, int64_t timeout_ns);
int sg_topic_info_get(sg_topic *t, sg_topic_info *out);
/* A subscription sees every message published after it returns. One
 * thread at a time per subscription. */
int sg_topic_subscribe(sg_topic *t, sg_sub **out);
/* Leave the topic (publishers stop waiting for it) and free the handle. */
void sg_sub_free(sg_sub *s);
/* Returns the next message's length, or SG_ELAPPED with *lost set to the
 * messages it missed (lossy mode: it now continues from the oldest one
 * retained), or another negative error. */
int64_t sg_sub_get(sg_sub *s, char *out, size_t cap, int64_t timeout_ns, uint64_t *lost);
/* Messages published and not yet read by this subscription, or a negative
 * error. */
int64_t sg_sub_pending(sg_sub *s);

int sg_counter_open(sg_grid *g, const char *name, sg_counter **out);
void sg_counter_free(sg_counter *c);
int sg_counter_get(sg_counter *c, int64_t *value);
int sg_counter_set(sg_counter *c, int64_t v);
/* SG_OK with the new value in *result, or SG_EOVERFLOW (nothing changed). */
int sg_counter_add(sg_counter *c, int64_t delta, int64_t *result);
/* SG_OK if the value was expected and is now desired, SG_NO otherwise. */
int sg_counter_compare_and_set(sg_counter *c, int64_t expected, int64_t desired);

typedef struct sg_lock_info {
    uint32_t owner_tid;     /* 0 if free */
    uint32_t owner_alive;
    uint64_t acquisitions;
    uint64_t owner_deaths;
    uint32_t waiters;
} sg_lock_info;

int sg_lock_open(sg_grid *g, const char *name, sg_lock **out);
void sg_lock_free(sg_lock *l);
/* SG_OK, or SG_OWNERDIED (acquired: the previous owner died holding it),
 * SG_EAGAIN (timeout), SG_EINTR, SG_EDEADLK (this thread holds it). */
int sg_lock_acquire(sg_lock *l, int64_t timeout_ns);
/* SG_OK, or SG_ENOTOWNER if this thread does not hold it. */
int sg_lock_release(sg_lock *l);
int sg_lock_info_get(sg_lock *l, sg_lock_info *out);
/* ---- watching a map's changes ---------------------------------------------
 *
 * Every successful write to a map appends (key, version, put/delete) to the
 * map's change feed, a ring of SG_FEED_SLOTS records that writers never
 * wait on. A watch reads the changes made after it opened, in the order
 * their writes took positions in the feed (two racing writes of one key may
 * appear in the opposite order of their versions); a
 * watch that falls more than SG_FEED_SLOTS behind is told how many it lost.
 */
typedef struct sg_change {
    uint64_t version;      /* the key's version after the change */
    uint64_t lost;         /* SG_CHANGE_LOST: how many changes were missed */
    uint32_t kind;         /* SG_CHANGE_PUT, SG_CHANGE_DELETE or SG_CHANGE_LOST */
    uint32_t klen;         /* bytes of the key, copied into the caller's buffer */
} sg_change;

/* Watch changes to keys starting with prefix (plen 0: every key). */
int sg_watch_open(sg_map *m, const char *prefix, size_t plen, sg_watch **out);
void sg_watch_free(sg_watch *w);
/* The next change: SG_OK with *ev (and the key in kout, which holds at
 * least the map's max_key bytes), SG_EAGAIN, SG_EINTR, or an error. */
int sg_watch_next(sg_watch *w, char *kout, size_t kcap, sg_change *ev, int64_t timeout_ns);
/* The feed position the watch reads next. */
uint64_t sg_watch_cursor(sg_watch *w);
/* Read from feed position pos instead (at most the tail): a mirror that
 * reconnects resumes where it was; if the feed has moved on past it, the
 * next read reports the changes lost. SG_EINVAL if pos is past the tail. */
int sg_watch_seek(sg_watch *w, uint64_t pos);
/* ---- mirroring (the bridge) -------------------------------------------------
 *
 * Records carry a key's state between hosts: a 16-byte header, then the
 * key, then the value (none for a tombstone). Little-endian, packed:
 *
 *   0      2      3      4             8                  16
 *   +------+------+------+-------------+------------------+-----+-------+
 *   | klen | flag | 0    | vlen        | version          | key | value |
 *   +------+------+------+-------------+------------------+-----+-------+
 *   flag 1 = tombstone (vlen 0). A key's partition is sg_hash64(key) % n;
 *   a partition mask is a bitmap, bit p of byte p / 8.
 */
#define SG_RECORD_HDR 16
#define SG_MAX_PARTITIONS 65536 /* partitions of a mirrored map, at most */
typedef struct sg_record_hdr {
    uint16_t klen;
    uint8_t flags;
    uint8_t reserved;
    uint32_t vlen;
    uint64_t version;
} sg_record_hdr;

/* Store the owner's state of a key (value, or tombstone) with exactly its
 * version, if that is newer than what this map has: SG_OK if applied,
 * SG_NO if not newer. Idempotent: replays are harmless. */
int sg_map_apply(sg_map *m, const char *key, size_t klen, const char *val, size_t vlen, uint64_t version,
                 int tombstone);
/* Forget every key of the mask's partitions, tombstones included: each
 * becomes a version-0 tombstone, so that any version applied later wins
 * (a mirror following a new incarnation of the owner's grid, whose
 * versions start again from 1). Weakly consistent like iteration: run it
 * while nothing else writes those partitions (on a mirror, only its bridge
 * does). The number of keys reset, or a negative error. */
int64_t sg_map_reset_partitions(sg_map *m, uint32_t nparts, const uint8_t *mask);
/* After a snapshot: delete (a tombstone just above the version held) each
 * present key of the mask's partitions whose hash is not among seen (the
 * keys the snapshot carried; sorted in place) and whose version is below
 * the owner's version floor: the owner dropped its tombstone. The number
 * of keys deleted, or a negative error. */
int64_t sg_map_prune(sg_map *m, uint32_t nparts, const uint8_t *mask, uint64_t floor, uint64_t *seen, size_t n);
/* Mark the map mirrored (partitions > 0): writes to keys of partitions
 * whose bit is clear in local_mask are refused with SG_EREMOTE, except
 * sg_map_apply. partitions 0: not mirrored any more. */
int sg_map_set_mirror(sg_map *m, uint32_t partitions, const uint8_t *local_mask);
/* 1 if the key's partition is owned by another host, 0 if not (or the map
 * is not mirrored). */
int sg_map_is_remote(sg_map *m, const char *key, size_t klen);
/* The map's version floor: every version a migration dropped with a
 * tombstone is at most this, and versions given from now on are above it. */
uint64_t sg_map_version_floor(sg_map *m);
/* Apply a buffer of records whose keys must all be in the partitions of
 * mask (nparts 0: any). Returns the records parsed (*applied of them were
 * newer), or SG_EINVAL naming the first malformed record (those before it
 * are applied). hashes: NULL, or room for len / SG_RECORD_HDR entries that
 * receive the hash of each record's key, in order (a mirror gathers the
 * keys a snapshot carried, for sg_map_prune). */
int64_t sg_map_apply_records(sg_map *m, const char *buf, size_t len, uint32_t nparts, const uint8_t *mask,
                             uint64_t *applied, uint64_t *hashes);
/* Continue a walk, writing the keys of the partitions in mask, tombstones
 * included, as records into out. Returns the bytes written (0: the walk is
 * over); cap must hold one record of max_key + max_value bytes at least. */
int64_t sg_iter_records(sg_iter *it, char *out, size_t cap, uint32_t nparts, const uint8_t *mask);
/* The current state of every key of the mask's partitions that changed
 * since the watch last read, as records into out: waits up to timeout_ns
 * for the first change, then takes what is there. Returns the bytes
 * written, with *lost the changes the watch missed (a resync is then
 * needed); SG_EAGAIN if nothing happened. */
int64_t sg_watch_records(sg_watch *w, char *out, size_t cap, uint32_t nparts, const uint8_t *mask, uint64_t *lost,
                         int64_t timeout_ns);

/* ---- typed maps and batch calls ------------------------------------------
 *
 * A typed map holds fixed-width keys and values: ktype and vtype describe
 * them (opaque text to the core; the Python layer writes numpy dtype
 * descriptions), max_key and max_value are their widths. The types are
 * recorded on creation; opening an existing map with types checks them
 * (SG_EMISMATCH if they differ, or if the map has none); opening it with
 * sg_map_open takes what it has.
 */
#define SG_MAP_TYPES_MAX 4096
int sg_map_open_typed(sg_grid *g, const char *name, uint64_t capacity, uint32_t max_key, uint32_t max_value,
                      uint64_t max_capacity, const char *ktype, size_t ktlen, const char *vtype, size_t vtlen,
                      sg_map **out);
/* The map's type descriptions: SG_OK, or SG_NO for an untyped map. */
int sg_map_types_get(sg_map *m, char *kout, size_t kcap, size_t *klen, char *vout, size_t vcap, size_t *vlen);

/* Batch calls: n keys in one call. Each element has exactly the semantics
 * of the single call (linearizable on its own key); the batch as a whole is
 * not atomic, and other processes may see any prefix of it done.
 *
 * Keys come packed at a fixed width (klens NULL: key i is the kwidth bytes
 * at keys + i * kwidth) or concatenated, with their lengths in klens. Values
 * likewise (vlens NULL: vwidth bytes each). Every length is checked before
 * anything is done: an oversize element fails the whole call (SG_EKEYSIZE
 * or SG_EVALSIZE, naming the element), with nothing written.
 *
 * status[i] receives the element's outcome: SG_OK, SG_NO (delete: the key
 * was absent), a value length (get), SG_ENOKEY (get: absent), or the
 * negative error its single call would have returned (SG_EREMOTE: owned by
 * another host, go through the bridge; SG_EFULL; SG_ENOTINT; SG_EOVERFLOW;
 * ...). versions (may be NULL) receives each key's version as the single
 * call reports it. The return value is the number of elements done, or a
 * negative error for the call as a whole (closed map, bad arguments, a
 * damaged segment: elements before the failing one may be done). */

/* vwidth > 0: value i is copied to out + i * vwidth (cap >= n * vwidth);
 * a present value whose length is not vwidth gets SG_EVALSIZE (its place
 * zeroed). vwidth 0: values are concatenated into out (cap bytes, at least
 * the map's max_value), and the call stops before the first value that
 * does not fit: it returns how many elements it did (>= 1). */
int64_t sg_map_get_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n, char *out,
                        size_t cap, uint32_t vwidth, int32_t *status, uint64_t *versions);
int64_t sg_map_put_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, const char *vals,
                        const uint32_t *vlens, uint32_t vwidth, size_t n, int32_t *status, uint64_t *versions);
int64_t sg_map_delete_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n,
                           int32_t *status, uint64_t *versions);
/* results[i]: the new value (as sg_map_incr), for elements whose status is SG_OK. */
int64_t sg_map_incr_many(sg_map *m, const char *keys, const uint32_t *klens, uint32_t kwidth, size_t n,
                         const int64_t *deltas, int64_t *results, int32_t *status, uint64_t *versions);

/* ---- waiting from an event loop ---------------------------------------------
 *
 * For a waiter that must not block its thread (the asyncio layer): take the
 * event word an object's blocking calls sleep on, arm it, re-try the
 * non-blocking call, and if that still cannot proceed, sleep (in one helper
 * thread for many such waiters) until the word is no longer the armed value.
 * Waking then means "re-try", never "it is yours".
 */
#define SG_EVENT_WAITV_MAX 128
/* The word sleepers of the object wait on (NULL if the grid is closed):
 * ring put (put = 1) or get, topic publish, subscription get, watch next,
 * lock acquire. It lives in the grid's mapping: never touch it after the
 * grid is closed. */
uint32_t *sg_ring_event(sg_ring *r, int put);
uint32_t *sg_topic_event(sg_topic *t);
uint32_t *sg_sub_event(sg_sub *s);
uint32_t *sg_watch_event(sg_watch *w);
uint32_t *sg_lock_event(sg_lock *l);
/* Announce a sleeper on ev (as a blocking call does before it sleeps) and
 * give the value to sleep on in *v. The caller must then re-try its
 * non-blocking call before it sleeps on (ev, *v). SG_ECLOSED if g is closed. */
int sg_event_arm(sg_grid *g, uint32_t *ev, uint32_t *v);
/* A relaxed load of an event word (moved since armed = re-try). */
uint32_t sg_event_load(const uint32_t *ev);
/* Bump a process-private word and wake its sleepers (interrupts a waitv). */
void sg_event_poke(uint32_t *word);
/* Sleep until one of the n words (1..SG_EVENT_WAITV_MAX) differs from its
 * value in vals, or timeout_ns (< 0: no limit) passes, or a signal, or a
 * word is found unmapped: SG_OK for all of these (the caller looks at the
 * words again), SG_ESYS if the kernel has no futex_waitv (Linux < 5.16)
 * or it failed otherwise. */
int sg_event_waitv(uint32_t **words, const uint32_t *vals, uint32_t n, int64_t timeout_ns);

/* ---- arrays -----------------------------------------------------------------
 *
 * A fixed-size buffer that publishers replace as whole versions while
 * readers take consistent snapshots (protocol: sg_layout.h, "Array"). A
 * snapshot is one complete published version, never a mix, even when a
 * publisher is killed or stopped in the middle of its copy; no reader ever
 * waits on a dead process. Versions count publishes from 0 (all zeroes).
 * The live buffer (sg_array_live) is what publishers write first; writes
 * made through it directly are not versioned and not atomic.
 */
typedef struct sg_array_info {
    uint64_t nbytes;
    uint64_t version;       /* newest complete version */
    uint64_t publishes;
    uint64_t repairs;       /* buffers repaired after a publisher died mid-copy */
    uint64_t locked_reads;  /* snapshots that took the writer lock (publishers kept winning) */
    uint64_t owner_deaths;  /* writer locks taken over from a dead holder */
    uint64_t seq[2];        /* the live and backup buffers' seqlock words */
    uint64_t ver[2];        /* and the versions they hold */
    uint32_t desc_len;
    uint32_t writer_tid;    /* thread holding the writer lock, 0 if none */
    uint32_t writer_alive;
    uint32_t waiters;       /* live processes with a thread asleep on the array (wait, writer lock, locked snapshot) */
} sg_array_info;

/* Create or open array `name`. With desc (desc_len bytes, at most
 * SG_ARRAY_DESC_MAX) the array is created if missing, holding nbytes
 * (at most SG_ARRAY_MAX_BYTES) zero bytes, and an existing one must have
 * exactly this description and size (SG_EMISMATCH). desc NULL: open an
 * existing array whatever its description (SG_NO if there is none). */
int sg_array_open(sg_grid *g, const char *name, const char *desc, size_t desc_len, uint64_t nbytes, sg_array **out);
void sg_array_free(sg_array *a);
/* The description (copied into out, up to cap bytes); returns its length. */
int64_t sg_array_desc(sg_array *a, char *out, size_t cap);
uint64_t sg_array_nbytes(sg_array *a);
/* The live buffer: nbytes, 64-byte aligned, valid while the grid is mapped. */
void *sg_array_live(sg_array *a);
/* Copy the newest complete version into out (nbytes); *version receives its
 * number. Waits only if publishers keep overwriting both buffers during
 * the copy, and then at most timeout_ns for the writer lock: SG_EAGAIN. */
int sg_array_snapshot(sg_array *a, void *out, int64_t timeout_ns, uint64_t *version);
/* Publish src (nbytes) as the next version, waiting up to timeout_ns for
 * other publishers; *version receives its number. SG_OK, SG_EAGAIN,
 * SG_EINTR. A publisher that died holding the writer lock is recovered. */
int sg_array_publish(sg_array *a, const void *src, int64_t timeout_ns, uint64_t *version);
/* The newest complete version. */
uint64_t sg_array_version(sg_array *a);
/* Wait until the version is above `after`: SG_OK with it in *version,
 * SG_EAGAIN at the timeout, SG_EINTR. */
int sg_array_wait(sg_array *a, uint64_t after, int64_t timeout_ns, uint64_t *version);
/* Take the writer lock (waiting up to timeout_ns), repair what a dead
 * publisher left and check the seqlock words, release: SG_OK (repaired),
 * SG_NO (nothing to repair), SG_ECORRUPT, SG_EAGAIN, SG_EINTR. */
int sg_array_repair(sg_array *a, int64_t timeout_ns);
/* Figures, read without the writer lock (they may be mid-publish). */
int sg_array_info_get(sg_array *a, sg_array_info *out);
/* CDEF END */

#endif /* SHMGRID_H */
