/*
 * sg_layout.h - the shared-memory ABI of a shmgrid segment.
 *
 * Everything that lives in shared memory is declared here and nowhere else.
 * Fields are fixed-width, offsets are _Static_assert'ed, and fields written
 * by different parties sit on different cache lines. A segment holds no
 * absolute pointer: every reference is a byte offset from the segment base,
 * 0 meaning "none" (offset 0 is the header, never an object).
 *
 * Any change to a struct below changes sg_layout_signature(), so a library
 * built with a different layout refuses to attach (IncompatibleSegment)
 * instead of misreading the segment. Bump SG_FORMAT_VERSION when the meaning
 * of a field changes without its size or place changing.
 *
 * Segment map (offsets from the base):
 *
 *   0x0000  sg_header         8 KiB   identity, heap break, free lists
 *   0x2000  sg_dirent[256]   32 KiB   directory of named objects
 *   0xA000  sg_proc[256]     16 KiB   process table
 *   0xE000  heap ........... size     blocks: objects, tables, keys, values
 */
#ifndef SG_LAYOUT_H
#define SG_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "shmgrid.h"

#define SG_CACHE_LINE 64u

#define SG_MAGIC ((uint64_t)SG_SEGMENT_MAGIC) /* the bytes "SHMGRID\0" read as a little-endian u64 */
#define SG_FORMAT_VERSION 6u /* 6: the array's writer lock is offered in `owner` */

#define SG_DIR_ENTRIES ((unsigned)SG_DIR_SIZE)
#define SG_PROC_SLOTS ((unsigned)SG_PROC_TABLE_SIZE)
#define SG_NCLASSES 120u       /* heap size classes, see sg__class_size: 32 B .. 40 GiB */
#define SG_MIN_BLOCK 32u
#define SG_NAME_MAX ((unsigned)SG_NAME_MAX_LEN) /* object names: 1 .. 64 bytes of [A-Za-z0-9._-] */

#define SG_DIR_OFF ((unsigned)SG_DIR_OFFSET)   /* 0x2000 */
#define SG_PROC_OFF ((unsigned)SG_PROC_OFFSET) /* 0xA000 */
#define SG_HEAP_OFF ((unsigned)SG_HEAP_OFFSET) /* 0xE000 */

/* ------------------------------------------------------------------------
 * Process words.
 *
 * A live process is named by one 64-bit word, so that claiming a slot for it
 * is a single CAS and pid reuse is detected:
 *
 *    63 62 61                                     22 21                 0
 *   +-----+-----------------------------------------+--------------------+
 *   |  0  |  start time, clock ticks since boot     |        pid         |
 *   +-----+-----------------------------------------+--------------------+
 *
 * pid_max on Linux is at most 2^22; 40 bits of ticks cover 348 years at
 * 100 Hz. The top two bits stay clear so a directory state can carry a
 * process word shifted left by two.
 * ------------------------------------------------------------------------ */
#define SG_PW_PID_BITS 22u
#define SG_PW_PID_MASK ((1ull << SG_PW_PID_BITS) - 1)
#define SG_PW_START_MASK ((1ull << 40) - 1)

/* ------------------------------------------------------------------------
 * sg_header: offset 0, 8 KiB.
 *
 * Cache line 0, identity. Written once by the creator while `ready` is 0,
 * read by every attacher. The creator writes `creator` first, so an attacher
 * that finds ready == 0 can tell a creator still at work from a dead one.
 * ------------------------------------------------------------------------ */
typedef struct sg_free_list {
    uint64_t head;   /* tagged top of a Treiber stack of free blocks of this class:
                        bits 0-39 block offset / 16, bits 40-63 ABA tag.
                        Written by any allocator (CAS), read by the same. */
    uint64_t carved; /* blocks of this class ever carved from the break; only grows.
                        Written by carvers (fetch_add), read by stat/validate. */
    uint8_t _pad[SG_CACHE_LINE - 16];
} sg_free_list;

typedef struct sg_header {
    /* line 0: identity (creator writes before ready; everyone reads) */
    uint64_t magic;       /* SG_MAGIC, written after every other identity field */
    uint32_t format;      /* SG_FORMAT_VERSION */
    uint32_t layout_sig;  /* sg_layout_signature() of the creator's build */
    uint64_t size;        /* total bytes of the shm object; attach compares with fstat */
    uint64_t creator;     /* process word of the creator, written first */
    uint32_t ready;       /* 0 while the creator initializes, 1 after (SYNC POINT: segment-ready) */
    uint32_t _pad0;
    uint64_t created_ns;  /* CLOCK_REALTIME at creation, for `shmgrid ls` */
    uint8_t _pad1[SG_CACHE_LINE - 48];

    /* line 1: heap break. Written by carvers (CAS), read by carvers and stat. */
    uint64_t brk;         /* offset of the first byte never carved; grows up to heap_end */
    uint64_t heap_end;    /* == size; immutable */
    uint64_t gap_bytes;   /* bytes skipped to align carved blocks; carvers add, stat reads */
    uint64_t backed;      /* offset up to which tmpfs pages are allocated (fallocate), so
                             a carved block never faults on a full /dev/shm; carvers raise it */
    uint8_t _pad2[SG_CACHE_LINE - 32];

    /* line 2: reclamation epoch. Bumped (seq_cst) by whoever retires a
     * table; loaded by every process entering a map operation, which
     * announces it in its sg_proc.epoch (SYNC POINT: epoch). */
    uint64_t epoch;
    uint8_t _pad4[SG_CACHE_LINE - 8];

    /* lines 3..122: one free list per size class, each on its own line */
    sg_free_list free[SG_NCLASSES];

    uint8_t _pad3[SG_DIR_OFF - (3 + SG_NCLASSES) * SG_CACHE_LINE];
} sg_header;

_Static_assert(offsetof(sg_header, magic) == 0, "magic first");
_Static_assert(offsetof(sg_header, format) == 8, "layout");
_Static_assert(offsetof(sg_header, layout_sig) == 12, "layout");
_Static_assert(offsetof(sg_header, size) == 16, "layout");
_Static_assert(offsetof(sg_header, creator) == 24, "layout");
_Static_assert(offsetof(sg_header, ready) == 32, "layout");
_Static_assert(offsetof(sg_header, created_ns) == 40, "layout");
_Static_assert(offsetof(sg_header, brk) == SG_CACHE_LINE, "heap break on its own line");
_Static_assert(offsetof(sg_header, epoch) == 2 * SG_CACHE_LINE, "epoch on its own line");
_Static_assert(offsetof(sg_header, free) == 3 * SG_CACHE_LINE, "free lists start on line 3");
_Static_assert(sizeof(sg_free_list) == SG_CACHE_LINE, "one free list per line");
_Static_assert(sizeof(sg_header) == SG_DIR_OFF, "header fills 0x0000..0x2000");

/* ------------------------------------------------------------------------
 * sg_dirent: the directory, SG_DIR_ENTRIES entries of 128 bytes at 0x2000.
 *
 * An entry is claimed by CAS on `state` and then filled by its creator;
 * entries are found by linear probing from hash(name). The state word:
 *
 *   EMPTY     0                      free; ends a probe
 *   CREATING  (process word << 2)|1  claimed by that process, fields in flux;
 *                                    others wait, or reset it to EMPTY once
 *                                    that process is seen dead
 *   READY     2                      fields final (SYNC POINT: dirent-ready)
 *
 * Entries never go from READY back to EMPTY, so a probe may stop at EMPTY.
 * ------------------------------------------------------------------------ */
#define SG_DIRENT_EMPTY 0ull
#define SG_DIRENT_READY 2ull
#define SG_DIRENT_CREATING(pw) (((pw) << 2) | 1ull)
#define SG_DIRENT_IS_CREATING(s) (((s) & 3ull) == 1ull)
#define SG_DIRENT_CREATOR(s) ((s) >> 2)

typedef struct sg_dirent {
    uint64_t state;          /* see above; any process CASes, everyone reads */
    uint32_t kind;           /* SG_OBJ_*; creator writes before READY */
    uint32_t name_len;       /* creator writes before READY */
    char name[SG_NAME_MAX];  /* not NUL-terminated; creator writes before READY */
    uint64_t obj;            /* offset of the object's header block; creator writes */
    uint64_t param[4];       /* creation parameters, kind-specific; creator writes */
    uint64_t _pad;
} sg_dirent;

_Static_assert(offsetof(sg_dirent, state) == 0, "layout");
_Static_assert(offsetof(sg_dirent, kind) == 8, "layout");
_Static_assert(offsetof(sg_dirent, name_len) == 12, "layout");
_Static_assert(offsetof(sg_dirent, name) == 16, "layout");
_Static_assert(offsetof(sg_dirent, obj) == 80, "layout");
_Static_assert(offsetof(sg_dirent, param) == 88, "layout");
_Static_assert(sizeof(sg_dirent) == SG_DIRENT_SIZE, "two entries per 256 bytes");
_Static_assert(SG_DIR_OFF + SG_DIR_ENTRIES * sizeof(sg_dirent) == SG_PROC_OFF, "directory ends where the process table starts");

/* ------------------------------------------------------------------------
 * sg_proc: the process table, SG_PROC_SLOTS slots of one cache line at 0xA000.
 *
 * A process claims a free slot, or the slot of a dead process, by CAS on
 * `owner` (0 = free) when it attaches, and clears it when it closes. A slot
 * whose owner is dead (no such pid, or the pid's start time differs, or a
 * zombie) may be taken over by anyone. It is how shmgrid answers "is that
 * process dead?" for lock owners, ring claims and `shmgrid stat`.
 * ------------------------------------------------------------------------ */
typedef struct sg_proc {
    uint64_t owner;        /* process word of the attached process; 0 = free.
                              Attacher CASes it, everyone reads. */
    uint64_t attached_ns;  /* CLOCK_REALTIME of attach; owner writes, stat reads */
    uint64_t epoch;        /* reclamation announcement: bits 16-63 the global epoch this
                              process saw when it entered, bits 0-15 how many of its
                              threads are inside a map operation (0 = none, epoch stale).
                              The owner CASes it; reclaimers read it. Reset on claim. */
    /* The claim record: the positions of a ring or topic this process has
     * claimed (by CAS on the structure's tail or head) and not yet
     * finished. Written by the owner before the claiming CAS, whose release
     * publishes it (SYNC POINT: claim-record); cleared with release after
     * the claimed cells are published (SYNC POINT: claim-clear). Read by a
     * process stuck behind a claimed cell: if no live process holds a claim
     * covering it, the claimant died and the cell may be skipped. One
     * record per process: the threads of a process take turns (a
     * process-private mutex held from claim to publish, never while
     * waiting). Reset on claim of the slot. */
    uint64_t claim_obj;    /* 0 = none; else object offset | SG_CLAIM_* role in bits 0-3 */
    uint64_t claim_lo;     /* first claimed position */
    uint64_t claim_hi;     /* one past the last claimed position */
    uint64_t waiting;      /* object offset a thread of this process sleeps on, or 0; the
                              owner writes, `shmgrid stat` counts waiters with it */
    uint64_t _reserved;
} sg_proc;

/* claim roles, in the low bits of sg_proc.claim_obj (objects are 16-aligned) */
enum { SG_CLAIM_PUT = 1, SG_CLAIM_GET = 2, SG_CLAIM_PUBLISH = 3 };
#define SG_CLAIM(obj, role) ((uint64_t)(obj) | (uint64_t)(role))

_Static_assert(offsetof(sg_proc, owner) == 0, "layout");
_Static_assert(offsetof(sg_proc, attached_ns) == 8, "layout");
_Static_assert(offsetof(sg_proc, epoch) == 16, "layout");
_Static_assert(offsetof(sg_proc, claim_obj) == 24, "layout");
_Static_assert(offsetof(sg_proc, waiting) == 48, "layout");
_Static_assert(sizeof(sg_proc) == SG_CACHE_LINE, "one slot per line: owners write their own slot");
_Static_assert(SG_PROC_OFF + SG_PROC_SLOTS * sizeof(sg_proc) == SG_HEAP_OFF, "process table ends where the heap starts");

/* ------------------------------------------------------------------------
 * Heap blocks.
 *
 * The heap is carved, from `brk` upwards, into blocks of SG_NCLASSES size
 * classes: 32 and 48 bytes, then four steps per doubling (64, 80, 96, 112,
 * 128, 160, ...), so a block wastes less than a quarter of itself and a
 * power-of-two payload (a slot table) plus its header does not double. A
 * block keeps its class for life: it goes back to the free list of its
 * class and is carved again only as that class. Blocks are 16-byte aligned
 * (64-byte aligned from 256 bytes up).
 *
 *    0               8              16
 *   +-------+-------+---------------+-------------------------------------+
 *   | meta          | word          | payload ...                         |
 *   +---------------+---------------+-------------------------------------+
 *
 *   meta  bits 0-7 size class, bits 8-15 kind (SG_BLK_*), bits 32-63 length
 *         of the payload in bytes
 *   word  kind-specific: the value's version (VALUE, TOMB), the key's full
 *         hash (KEY), the next free block's offset (FREE)
 *
 * A block is filled before it is published by a release CAS, and never
 * written again until it is retired (VALUE, TOMB) or forever (KEY, tables,
 * object headers). Readers of recyclable blocks use sg_copy_out and
 * re-validate (see sg_atomic.h, SYNC POINT: block-reuse).
 * ------------------------------------------------------------------------ */
enum {
    SG_BLK_FREE = 0,
    SG_BLK_VALUE = 1,  /* map value: word = version, payload = value bytes */
    SG_BLK_TOMB = 2,   /* map tombstone: word = version, no payload */
    SG_BLK_KEY = 3,    /* map key: word = 64-bit hash, payload = key bytes */
    SG_BLK_TABLE = 4,  /* map slot table */
    SG_BLK_OBJECT = 5, /* an object header (map, ...) */
};

typedef struct sg_block {
    uint64_t meta;
    uint64_t word;
    uint64_t payload[]; /* whole words: copies run in 8-byte steps */
} sg_block;

_Static_assert(sizeof(sg_block) == 16, "block header is two words");

#define SG_BLOCK_HDR 16u
#define SG_META(cls, kind, len) ((uint64_t)(cls) | ((uint64_t)(kind) << 8) | ((uint64_t)(len) << 32))
#define SG_META_CLASS(m) ((unsigned)((m) & 0xffu))
#define SG_META_KIND(m) ((unsigned)(((m) >> 8) & 0xffu))
#define SG_META_LEN(m) ((uint32_t)((m) >> 32))

/* A tagged offset, used by free-list heads: bits 0-35 offset / 16
 * (segments up to 1 TiB), bits 36-63 a tag that grows on every successful
 * CAS, so a recycled offset compares equal only after 2^28 changes. */
#define SG_OFF_BITS 36u
#define SG_OFF_MASK ((1ull << SG_OFF_BITS) - 1)
#define SG_TAGGED_OFF(t) (((t) & SG_OFF_MASK) << 4)
#define SG_TAGGED_TAG(t) ((t) >> SG_OFF_BITS)
#define SG_TAGGED(tag, off) ((((uint64_t)(tag)) << SG_OFF_BITS) | ((uint64_t)(off) >> 4))
#define SG_MAX_SEGMENT (1ull << (SG_OFF_BITS + 4))

/* ------------------------------------------------------------------------
 * Map.
 *
 * The map object header is a heap block (kind OBJECT) whose payload is
 * sg_map_hdr. It reaches its slot table through `table` (never a fixed
 * offset): the table is migrated online to a larger or cleaner one.
 * ------------------------------------------------------------------------ */
typedef struct sg_map_hdr {
    /* line 0: parameters, written by the creator before the dirent is READY */
    uint64_t capacity;   /* keys the first table was sized for */
    uint32_t max_key;    /* bytes */
    uint32_t max_value;  /* bytes */
    uint64_t min_slots;  /* slots of the first table; migrations never go below */
    uint64_t max_slots;  /* 0, or the most slots growth may reach (room for max_capacity) */
    uint64_t max_capacity; /* 0, or the live keys past which a migration refuses to grow */
    uint64_t types;      /* 0, or the offset of an sg_map_types block (kind OBJECT): the map
                            holds fixed-width keys and values of these types. Written by
                            the creator before the dirent is READY; never changes. */
    uint8_t _pad0[SG_CACHE_LINE - 48];
    /* line 1: tables. `table` is the oldest table still in use: the current
     * one, or the one being migrated from (its `next` is then set). Written
     * by the creator, then by the process that completes a migration (CAS,
     * SYNC POINT: epoch); read by every operation. `retired` heads a stack
     * of tables left behind by migrations, freed once no process can still
     * read them (linked through sg_table_hdr.retired_next). */
    uint64_t table;
    uint64_t retired;
    uint64_t reclaimer;  /* 0, or the process word of the one process freeing retired tables */
    uint8_t _pad1[SG_CACHE_LINE - 24];
    /* line 2: live keys. Writers add after a successful CAS that makes a key
     * present (+1) or absent (-1); len() reads it. A writer killed between
     * its CAS and this add leaves it off by one until validate(repair). */
    uint64_t live;
    uint8_t _pad2[SG_CACHE_LINE - 8];
    /* line 3: version floor: the highest version of any tombstone a
     * migration dropped. A key stored in a slot that never held it starts
     * above it, so a key's versions grow even across its deletion being
     * forgotten. Raised (CAS max) by copiers before they mark a slot DONE. */
    uint64_t version_floor;
    uint8_t _pad3[SG_CACHE_LINE - 8];
    /* line 4: the change feed (see "Change feed" below): offset of its
     * block, written by the creator; 0 for none. */
    uint64_t feed;
    /* 0, or the offset of an sg_mirror_desc: the map is mirrored across
     * hosts and writes to partitions owned elsewhere are refused here
     * (SG_EREMOTE: the caller goes through the bridge). Stored with
     * release by the bridge after the descriptor is complete (SYNC POINT:
     * mirror-desc); every write loads it with acquire. */
    uint64_t mirror;
    uint8_t _pad4[SG_CACHE_LINE - 16];
} sg_map_hdr;

/* Which partitions of a mirrored map this host owns. Written once before
 * it is published in sg_map_hdr.mirror. A bridge run with the same
 * configuration keeps it; a changed configuration publishes a new one (the
 * old one, a few hundred bytes, is left behind: writers in other
 * processes may still be reading it). */
typedef struct sg_mirror_desc {
    uint32_t partitions;  /* a key's partition: its 64-bit hash modulo this */
    uint32_t _pad;
    uint8_t local[];      /* bit p of byte p / 8: partition p is owned here */
} sg_mirror_desc;

/* The types of a map of fixed-width keys and values (a "typed" map). The
 * core does not interpret the descriptions: they are opaque text (the
 * Python layer writes numpy dtype descriptions) compared byte for byte
 * when the map is opened with types; max_key and max_value are the widths.
 *
 *    0          4            8
 *   +----------+------------+-----------------------+---------------------+
 *   | key_len  | value_len  | key description ...   | value description   |
 *   +----------+------------+-----------------------+---------------------+
 *
 * Written once by the map's creator before the dirent is READY. */
typedef struct sg_map_types {
    uint32_t key_len;    /* bytes of the key type's description */
    uint32_t value_len;  /* bytes of the value type's description, right after it */
    char text[];
} sg_map_types;

_Static_assert(offsetof(sg_map_hdr, capacity) == 0, "layout");
_Static_assert(offsetof(sg_map_hdr, max_key) == 8, "layout");
_Static_assert(offsetof(sg_map_hdr, max_value) == 12, "layout");
_Static_assert(offsetof(sg_map_hdr, min_slots) == 16, "layout");
_Static_assert(offsetof(sg_map_hdr, max_slots) == 24, "layout");
_Static_assert(offsetof(sg_map_hdr, types) == 40, "layout");
_Static_assert(offsetof(sg_map_hdr, table) == SG_CACHE_LINE, "tables on their own line");
_Static_assert(offsetof(sg_map_hdr, live) == 2 * SG_CACHE_LINE, "live count on its own line");
_Static_assert(offsetof(sg_map_hdr, version_floor) == 3 * SG_CACHE_LINE, "version floor on its own line");
_Static_assert(offsetof(sg_map_hdr, feed) == 4 * SG_CACHE_LINE, "feed on its own line");
_Static_assert(sizeof(sg_map_hdr) == 5 * SG_CACHE_LINE, "layout");

/*
 * Slot table: a block (kind TABLE) whose payload is sg_table_hdr (176
 * bytes, so with the block header the slots start 192 bytes, three lines,
 * into the 64-byte aligned block), then nslots 16-byte slots, then a bitmap
 * of copied chunks (one bit per SG_COPY_CHUNK slots, whole words).
 *
 *   slot:  0              8             16
 *          +--------------+--------------+
 *          | head         | ref          |
 *          +--------------+--------------+
 *
 *   head  0 = EMPTY. SG_HEAD_MOVED = sealed empty: a migration is under way
 *         and no key will bind here; look in the next table. Otherwise bits
 *         48-63 the top 16 bits of the key's hash, bits 0-47 the key block's
 *         offset / 16. Bound once by CAS from 0 (SYNC POINT: key-publish) and
 *         never changed again.
 *
 *   ref   63      62     61 ........ 36   35 ................... 0
 *         +-------+------+--------------+-------------------------+
 *         |FROZEN | DONE |  tag (26)    |  block offset / 16      |
 *         +-------+------+--------------+-------------------------+
 *         offset 0 = never written (absent, version 0). Otherwise the key's
 *         current VALUE or TOMB block; every change is a CAS that bumps the
 *         tag (SYNC POINT: value-publish). During a migration a copier sets
 *         FROZEN (no change here any more; the value is still current), then
 *         DONE (the key's authority is the next table). A DONE ref keeps the
 *         offset of a value it copied, or has offset 0 if the key was absent
 *         and dropped: then the key block is freed with this table.
 */
typedef struct sg_table_hdr {
    /* line A (shares the line with the block header): immutable while the
     * table is in use, but for `next` (CAS once) and the retired fields */
    uint64_t nslots;       /* power of two */
    uint64_t generation;   /* 1 for the first table, +1 per migration */
    uint64_t next;         /* 0, or the table this one migrates to (CAS once; SYNC POINT: table-publish) */
    uint64_t slot_limit;   /* slots that may be bound by inserts: 3/4 of nslots */
    uint64_t retired_next; /* link in sg_map_hdr.retired; written by the retirer */
    uint64_t retired_epoch;/* global epoch after it was retired; written by the retirer */
    /* line B: bound slots. Inserters and copiers add before binding. */
    uint64_t used;
    uint64_t _pad1[7];
    /* line C: migration progress. Helpers claim chunks, count finished ones. */
    uint64_t copy_claim;   /* chunk claims so far (taken modulo the chunk count) */
    uint64_t chunks_done;  /* chunks whose every slot is final (MOVED or DONE) */
    uint64_t dropped;      /* keys the migration dropped; their key blocks die with the table */
    uint64_t reclaim_pos;  /* slots of a retired table already rid of dropped key blocks */
    uint64_t _pad2[4];
} sg_table_hdr;

typedef struct sg_slot {
    uint64_t head;
    uint64_t ref;
} sg_slot;

_Static_assert(offsetof(sg_table_hdr, used) == 48, "used on the table's second line");
_Static_assert(offsetof(sg_table_hdr, copy_claim) == 112, "copy progress on the table's third line");
_Static_assert(sizeof(sg_table_hdr) == 176, "slots start at block + 192");
_Static_assert(sizeof(sg_slot) == 16, "four slots per cache line");

#define SG_COPY_CHUNK 256u /* slots a helper copies per claim */

#define SG_HEAD_MOVED 1ull
#define SG_HEAD(hash, off) (((hash) & 0xffff000000000000ull) | ((uint64_t)(off) >> 4))
#define SG_HEAD_OFF(h) (((h) & 0x0000ffffffffffffull) << 4)
#define SG_HEAD_TAG(h) ((h) >> 48)

#define SG_REF_FROZEN (1ull << 63)
#define SG_REF_DONE (1ull << 62)
#define SG_REF_TAG_BITS 26u
#define SG_REF(tag, off) ((((uint64_t)(tag) & ((1ull << SG_REF_TAG_BITS) - 1)) << SG_OFF_BITS) | ((uint64_t)(off) >> 4))
#define SG_REF_TAG(r) (((r) >> SG_OFF_BITS) & ((1ull << SG_REF_TAG_BITS) - 1))
#define SG_REF_OFF(r) (((r) & SG_OFF_MASK) << 4)

/* ------------------------------------------------------------------------
 * Change feed: a lossy broadcast ring of the changes made to one map, for
 * watchers (and the bridge). One heap block (kind OBJECT): sg_feed_hdr,
 * then `slots` 32-byte records. A writer appends after its successful CAS
 * on a slot's ref: it takes a position by fetch_add on tail (never waits),
 * then writes the record as a seqlock:
 *
 *   record:  0        8        16       24       32
 *            +--------+--------+--------+--------+
 *            | seq    | hash   | key    | ver    |
 *            +--------+--------+--------+--------+
 *
 *   seq   0 never written; WRITING(p) = 4p + 1; PUB(p) = 4p + 2
 *   hash  the key's 64-bit hash
 *   key   offset of the key block (immutable while the key is in the map;
 *         a reader re-hashes what it copied, so a block freed and reused
 *         since is detected and the event reported lost)
 *   ver   bit 63: a delete (tombstone); bits 0-62: the key's new version
 *
 * A reader copies a record while it reads PUB(p) before and after (relaxed
 * word copies, SYNC POINT: block-reuse applies). A later lap's seq means it
 * was lapped: the records it missed are counted as lost. A position that
 * stays unpublished while later ones are claimed (a writer killed or
 * stopped between fetch_add and PUB) is skipped after a grace period and
 * counted as lost too. Writers never wait for readers.
 * ------------------------------------------------------------------------ */
#define SG_FEED_WRITING(p) (((uint64_t)(p) << 2) | 1u)
#define SG_FEED_PUB(p) (((uint64_t)(p) << 2) | 2u)
#define SG_FEED_DELETE (1ull << 63)

typedef struct sg_feed_hdr {
    /* line 0: parameters, written by the creator */
    uint64_t slots;
    uint8_t _pad0[SG_CACHE_LINE - 8];
    /* line 1: next position; writers fetch_add */
    uint64_t tail;
    uint8_t _pad1[SG_CACHE_LINE - 8];
    /* line 2: event watchers sleep on; writers signal after PUB */
    uint32_t published;
    uint32_t _pad2a;
    uint8_t _pad2[SG_CACHE_LINE - 8];
} sg_feed_hdr;

typedef struct sg_feed_rec {
    uint64_t seq;
    uint64_t hash;
    uint64_t key;
    uint64_t ver;
} sg_feed_rec;

_Static_assert(offsetof(sg_feed_hdr, tail) == SG_CACHE_LINE, "writers' line");
_Static_assert(offsetof(sg_feed_hdr, published) == 2 * SG_CACHE_LINE, "event line");
_Static_assert(sizeof(sg_feed_hdr) == 3 * SG_CACHE_LINE, "records start after three lines");
_Static_assert(sizeof(sg_feed_rec) == 32, "two records per line");

/* object kinds, stored in sg_dirent.kind */
enum { SG_OBJ_NONE = 0, SG_OBJ_MAP = 1, SG_OBJ_RING = 2, SG_OBJ_TOPIC = 3, SG_OBJ_COUNTER = 4, SG_OBJ_LOCK = 5,
       SG_OBJ_ARRAY = 6 };

/* ------------------------------------------------------------------------
 * Events: a 32-bit futex word that sleepers wait on and wakers bump.
 *
 *    31                                                    1    0
 *   +-------------------------------------------------------+------+
 *   |  wake count                                            |  W   |
 *   +-------------------------------------------------------+------+
 *
 * W = somebody may sleep. A sleeper sets W (seq_cst RMW), re-checks its
 * condition, then futex-waits on the value it set. A waker makes its change
 * visible, issues a seq_cst fence, and only if it then sees W does it clear
 * W while bumping the count (one CAS) and futex-wake everyone (SYNC POINT:
 * event). Either the sleeper's re-check sees the change, or the waker sees
 * W: no lost wake-up. A sleeper killed while W is set costs one spurious
 * wake-up, after which W is clear again.
 * ------------------------------------------------------------------------ */
#define SG_EVENT_WAITERS 1u

/* ------------------------------------------------------------------------
 * Ring: a bounded MPMC queue (Vyukov's array of cells with per-cell
 * sequence numbers), one heap block (kind OBJECT): sg_ring_hdr, then
 * `slots` cells of `stride` bytes.
 *
 *   cell:  0              8              16
 *          +--------------+--------------+------------------------------+
 *          | seq          | len          | data (slot_size, whole words) |
 *          +--------------+--------------+------------------------------+
 *
 * Positions count puts from 0 and never wrap (2^62 of them); position q
 * lives in cell q % slots. The cell's seq says whose turn it is:
 *
 *   FREE(q) = 4q      the producer of position q may write it
 *   FULL(q) = 4q + 1  it holds message q for the consumer of position q
 *   SKIP(q) = 4q + 2  position q was claimed by a producer that died before
 *                     writing it: the consumer of q takes no message from it
 *
 * A producer claims q by CAS tail q -> q+1 only after seeing FREE(q), writes
 * data and len, then stores FULL(q) with release (SYNC POINT: ring-full). A
 * consumer claims q by CAS head q -> q+1 only after seeing FULL(q) or
 * SKIP(q) (acquire), copies, then stores FREE(q + slots) with release
 * (SYNC POINT: ring-free). Batches claim a run of such cells with one CAS.
 *
 * Recovery, with the claim records of the process table: a consumer stuck
 * at FREE(q) while tail > q finds no live claim covering q -> CAS FREE(q)
 * -> SKIP(q), counts `skipped`. A producer stuck at FULL/SKIP(q - slots)
 * while head > q - slots (a consumer claimed it) finds no live claim ->
 * CAS -> FREE(q), counts `dropped` if it held a message.
 * ------------------------------------------------------------------------ */
#define SG_RING_FREE(q) ((uint64_t)(q) << 2)
#define SG_RING_FULL(q) (((uint64_t)(q) << 2) | 1u)
#define SG_RING_SKIP(q) (((uint64_t)(q) << 2) | 2u)
#define SG_RING_MAX_POS (1ull << 62) /* 4q must fit in 64 bits */

typedef struct sg_ring_hdr {
    /* line 0: parameters, written by the creator before the dirent is READY */
    uint64_t slots;      /* cells */
    uint32_t slot_size;  /* largest message, bytes */
    uint32_t stride;     /* bytes per cell: 16 + slot_size rounded up to 16 */
    uint8_t _pad0[SG_CACHE_LINE - 16];
    /* line 1: next position a producer claims. Producers CAS; consumers read. */
    uint64_t tail;
    uint8_t _pad1[SG_CACHE_LINE - 8];
    /* line 2: next position a consumer claims. Consumers CAS; producers read. */
    uint64_t head;
    uint8_t _pad2[SG_CACHE_LINE - 8];
    /* line 3: events. Consumers sleep on not_empty, producers signal it;
     * producers sleep on not_full, consumers signal it. Written only by
     * sleepers and by wakers that found a sleeper. */
    uint32_t not_empty;
    uint32_t not_full;
    uint8_t _pad3[SG_CACHE_LINE - 8];
    /* line 4: recovery counts (fetch_add by whoever recovers; stat reads) */
    uint64_t skipped;    /* positions a dead producer claimed and never wrote */
    uint64_t dropped;    /* messages a dead consumer claimed and never finished copying */
    uint8_t _pad4[SG_CACHE_LINE - 16];
} sg_ring_hdr;

typedef struct sg_cell {
    uint64_t seq;        /* see above */
    uint64_t len;        /* message bytes; the writer of the cell sets it before seq */
    uint64_t data[];
} sg_cell;

_Static_assert(offsetof(sg_ring_hdr, tail) == SG_CACHE_LINE, "producers' line");
_Static_assert(offsetof(sg_ring_hdr, head) == 2 * SG_CACHE_LINE, "consumers' line");
_Static_assert(offsetof(sg_ring_hdr, not_empty) == 3 * SG_CACHE_LINE, "events' line");
_Static_assert(offsetof(sg_ring_hdr, skipped) == 4 * SG_CACHE_LINE, "recovery line");
_Static_assert(sizeof(sg_ring_hdr) == 5 * SG_CACHE_LINE, "cells start after five lines");
_Static_assert(sizeof(sg_cell) == 16, "cell header is two words");

/* ------------------------------------------------------------------------
 * Topic: a broadcast ring. One heap block (kind OBJECT): sg_topic_hdr, then
 * max_subs subscriber records of one line each, then `capacity` cells
 * (sg_cell, `stride` bytes each). Position q lives in cell q % capacity:
 *
 *   0                  never written
 *   WRITING(q) = 4q+1  a publisher is writing message q (payload in flux)
 *   PUB(q)     = 4q+2  message q is complete (SYNC POINT: topic-publish)
 *   SKIP(q)    = 4q+3  q was claimed by a publisher that died before PUB
 *
 * A publisher claims q by CAS on tail, writes WRITING(q), the payload, then
 * PUB(q): a seqlock per cell. A subscriber at cursor c copies cell c while
 * it reads PUB(c) before and after the copy (relaxed word copies, as for
 * map blocks: SYNC POINT: block-reuse applies); a later lap's value there
 * means it was lapped (lossy mode only).
 *
 * Lossless mode: a publisher may claim q only when every live subscriber's
 * cursor is past q - capacity. `floor` is a lower bound of every cursor, of
 * live subscribers now and of any that join later: a scan (seq_cst loads,
 * SYNC POINT: topic-join) takes the lowest cursor of every record with an
 * owner, or the tail it loaded before scanning if there is none. A
 * subscriber joins by CASing a free record's owner, then loading tail as
 * its cursor (both seq_cst): a scan that missed the record ran before the
 * CAS, so the new cursor is at least the tail that scan saw; a scan that
 * saw it read either the new cursor or the record's old one, which is lower.
 * Cursors only grow, so a bound stays a bound and publishers check the
 * cached floor first, scanning only when it would block.
 * A dead subscriber blocking publishers is removed (owner CAS to 0).
 * ------------------------------------------------------------------------ */
#define SG_TOPIC_WRITING(q) (((uint64_t)(q) << 2) | 1u)
#define SG_TOPIC_PUB(q) (((uint64_t)(q) << 2) | 2u)
#define SG_TOPIC_SKIP(q) (((uint64_t)(q) << 2) | 3u)

typedef struct sg_topic_hdr {
    /* line 0: parameters, written by the creator before the dirent is READY */
    uint64_t capacity;     /* cells */
    uint32_t max_message;  /* bytes */
    uint32_t stride;       /* bytes per cell */
    uint32_t lossless;     /* 1: publishers wait for the slowest live subscriber */
    uint32_t max_subs;     /* subscriber records */
    uint8_t _pad0[SG_CACHE_LINE - 24];
    /* line 1: claims. Publishers CAS tail; subscribers load it to join. */
    uint64_t tail;         /* next position to publish */
    uint64_t joins;        /* subscriptions ever made (stat); subscribers add */
    uint8_t _pad1[SG_CACHE_LINE - 16];
    /* line 2: a lower bound of live subscribers' cursors (lossless), a hint
     * any publisher may store after a scan */
    uint64_t floor;
    uint8_t _pad2[SG_CACHE_LINE - 8];
    /* line 3: events. Subscribers sleep on published; publishers (lossless)
     * sleep on advanced. */
    uint32_t published;
    uint32_t advanced;
    uint8_t _pad3[SG_CACHE_LINE - 8];
    /* line 4: recovery counts */
    uint64_t skipped;      /* positions a dead publisher claimed and never wrote */
    uint64_t removed;      /* dead subscribers dropped by a blocked publisher */
    uint8_t _pad4[SG_CACHE_LINE - 16];
} sg_topic_hdr;

typedef struct sg_sub_rec {
    uint64_t owner;        /* process word of the subscriber; 0 = free. CASed by
                              subscribers (join, close) and by publishers removing
                              a dead one. */
    uint64_t cursor;       /* next position the subscriber reads; only it writes
                              (release, SYNC POINT: topic-cursor); publishers read */
    uint8_t _pad[SG_CACHE_LINE - 16];
} sg_sub_rec;

_Static_assert(offsetof(sg_topic_hdr, tail) == SG_CACHE_LINE, "claims' line");
_Static_assert(offsetof(sg_topic_hdr, floor) == 2 * SG_CACHE_LINE, "floor line");
_Static_assert(offsetof(sg_topic_hdr, published) == 3 * SG_CACHE_LINE, "events' line");
_Static_assert(offsetof(sg_topic_hdr, skipped) == 4 * SG_CACHE_LINE, "recovery line");
_Static_assert(sizeof(sg_topic_hdr) == 5 * SG_CACHE_LINE, "records start after five lines");
_Static_assert(sizeof(sg_sub_rec) == SG_CACHE_LINE, "one subscriber per line");

/* ------------------------------------------------------------------------
 * Counter: one int64 on its own line. Lock: a robust inter-process mutex.
 * ------------------------------------------------------------------------ */
typedef struct sg_counter_hdr {
    uint64_t value;        /* int64 stored as two's complement; any process CASes */
    uint8_t _pad[SG_CACHE_LINE - 8];
} sg_counter_hdr;

/* The lock's owner is a thread word: the process-word format with the
 * thread id and the thread's start time, so that a thread that exited (or
 * a process that died) holding the lock is recognised as dead and the lock
 * handed to the next acquirer. */
typedef struct sg_lock_hdr {
    uint64_t owner;        /* thread word of the holder, 0 = free. CAS 0 -> me to
                              acquire (SYNC POINT: lock), store 0 with release to
                              release; CAS dead -> me to recover. */
    uint32_t event;        /* sleepers wait here (see Events) */
    uint32_t _pad0;
    uint64_t acquisitions; /* successful acquires; the holder adds */
    uint64_t owner_deaths; /* acquires that recovered the lock from a dead owner */
    uint8_t _pad[SG_CACHE_LINE - 32];
} sg_lock_hdr;

_Static_assert(sizeof(sg_counter_hdr) == SG_CACHE_LINE, "layout");
_Static_assert(offsetof(sg_lock_hdr, event) == 8, "layout");
_Static_assert(sizeof(sg_lock_hdr) == SG_CACHE_LINE, "layout");

/* ------------------------------------------------------------------------
 * Array: a fixed-size byte buffer (a numpy array's data) that publishers
 * replace as whole versions while readers take consistent snapshots, and
 * that survives a publisher killed at any instruction. One heap block (kind
 * OBJECT): sg_array_hdr, the description, then two buffers of `stride`
 * bytes, 64-byte aligned (offsets from the segment base, which is page
 * aligned), so any dtype views them well:
 *
 *   payload: 0          320         320 + desc_len   data        data + stride
 *            +----------+-----------+------ pad -----+-----------+-----------+
 *            | header   | desc      |                | LIVE      | BACKUP    |
 *            +----------+-----------+----------------+-----------+-----------+
 *
 *   desc    the creator's description of the contents (the Python layer
 *           writes shape and dtype); opening with a description compares
 *           it byte for byte (ObjectMismatch if it differs)
 *   LIVE    buffer 0: what the user's ndarray maps. Publishers write it
 *           first; in-place writes through the ndarray land here too and
 *           are not versioned (no atomicity, see README)
 *   BACKUP  buffer 1: the last complete version, written second
 *
 * Each buffer has a seqlock word and the version it holds:
 *
 *   seq  even: stable, holds version `ver`; odd: being written. Only grows
 *        (by one per state change), so a reader that sees the same even
 *        value before and after its copy has copied one version whole.
 *
 * Publishers (and repairers) hold `writer`, a robust lock like sg_lock_hdr
 * (a thread word; CAS from a dead holder hands it on). A publish of
 * version v writes LIVE, then BACKUP, each as a seqlock section:
 *
 *   seq = s + 1 (odd); release fence; ver = v; copy; seq = s + 2 (release)
 *
 * (SYNC POINT: array-seq). Both buffers are never odd at once: the one
 * not being written holds a complete version, the newest one except while
 * LIVE is being written (then BACKUP holds v - 1, which is the newest
 * complete one). A reader's copy is a relaxed word copy between an acquire
 * load of an even seq and, after an acquire fence, the same seq again
 * (SYNC POINT: block-reuse's argument, Boehm 2012). It loads both seqs and
 * vers (LIVE's first) and copies the buffer that holds the newest complete
 * version and that publishers reach last: BACKUP if LIVE is odd or both
 * hold the same version (a publish starts with LIVE), else LIVE (BACKUP is
 * odd or behind, and next); if that copy fails, the other buffer (loaded
 * afresh). What it returns was the newest complete version at some instant
 * of the round: LIVE is written first, so an even LIVE holds the newest
 * version; BACKUP is copied only when LIVE was odd or equal to it, and a
 * newer version completing in LIVE after that load leaves BACKUP's, which
 * the copy validated, the newest until then. Versions a reader gets
 * therefore never go backwards. A publisher
 * killed or stopped mid-copy leaves one buffer odd and the other whole:
 * readers never wait for it and never see its half-written data.
 *
 * Whoever takes `writer` next repairs before anything else: an odd buffer
 * gets the other buffer's contents (under a fresh odd seq: the dead
 * writer's odd store is not ours to pair with), a BACKUP behind LIVE is
 * brought up to it, and `version` is set to LIVE's. The dead writer's
 * version number was never visible as complete, so it is given again.
 *
 * A reader that keeps losing races to live publishers (each lost copy means
 * a publisher made progress) takes `writer` itself after a few tries and
 * copies LIVE while holding it. Publishers publishing back to back would
 * win every race for a free lock, so the reader registers in `want` (CAS
 * 0 -> its thread word W) and the holder offers it the lock on release
 * instead of freeing it. The offer lives in the lock word itself:
 *
 *   want   0 none; W a reader waits (only W clears it, or a holder that
 *          finds W dead)
 *   owner  as in any robust lock, plus W | OFFERED: the last holder gave
 *          the lock up to W, who has not taken it yet
 *
 *   holder H (unlock)              reader W (registered)
 *   w = want                       CAS owner W|OFFERED -> W: holds it
 *   CAS owner H -> W|OFFERED  (1)  ... or at its deadline, or a slice with
 *   signal the lock's event        no publisher progress (holder stopped):
 *   if want != W:             (2)    CAS want W -> 0               (3)
 *     CAS owner W|OFFERED -> 0       CAS owner W|OFFERED -> W: take it
 *     (W withdrew unseen)            (or -> 0 to decline, on an error)  (4)
 *
 * (1) is a release (SYNC POINT: lock, as for any release) and W's CAS the
 * acquire. The handover is one CAS: whenever H stops or dies, `owner` is
 * H (an ordinary dead or stopped holder) or the offer; W never waits on a
 * second store of H's, so its timeout always holds and it goes back to the
 * seqlock, where the buffer a stopped or dead writer is not writing holds
 * a whole version. (1)-(4) are seq_cst, so of H's load (2) and W's CAS (4)
 * at least one sees the other's side: W takes an offer made before its
 * withdrawal, H takes back one made after it. An offer that still nobody
 * will accept (H stopped or died between (1) and (2), or W died) is
 * "stale": owner = W|OFFERED with W dead or want != W. Any acquirer takes
 * a stale offer over by CAS, as from a dead holder, and waiting acquirers
 * look for one at least every 10 ms. Every change of `owner` is a CAS, so
 * two parties never both hold the lock. A registered reader that died is
 * unregistered by the next holder (CAS W -> 0 after a liveness check); one
 * that died holding the lock is an ordinary dead holder. A reader stopped
 * while registered holds publishers back (their timeouts hold) as a
 * stopped holder does; readers never wait on it.
 * ------------------------------------------------------------------------ */
enum { SG_ARRAY_LIVE = 0, SG_ARRAY_BACKUP = 1 };

typedef struct sg_array_buf {
    uint64_t seq;          /* see above; the writer-lock holder stores, readers load */
    uint64_t ver;          /* version the buffer holds once seq is even; the holder stores */
} sg_array_buf;

typedef struct sg_array_hdr {
    /* line 0: parameters, written by the creator before the dirent is READY */
    uint64_t nbytes;       /* bytes of one version */
    uint64_t stride;       /* nbytes rounded up to 64: buffer 1 starts at data + stride */
    uint64_t data;         /* offset of buffer 0 from the segment base; 64-aligned */
    uint64_t desc_hash;    /* sg_hash64 of the description (also the dirent's param[1]) */
    uint32_t desc_len;     /* bytes of the description that follows the header */
    uint32_t _pad0a;
    uint8_t _pad0[SG_CACHE_LINE - 40];
    /* line 1: the publishers' robust lock (fields as in sg_lock_hdr) */
    sg_lock_hdr writer;
    /* line 2: the buffers' seqlocks. Written by the writer-lock holder only. */
    sg_array_buf buf[2];
    uint8_t _pad2[SG_CACHE_LINE - 32];
    /* line 3: the newest complete version, stored (release) once LIVE holds
     * it, and what the holder counts. Writer-lock holder writes, all read. */
    uint64_t version;      /* SYNC POINT: array-version */
    uint64_t publishes;    /* versions published */
    uint64_t repairs;      /* buffers repaired after a writer died mid-copy */
    uint8_t _pad3[SG_CACHE_LINE - 24];
    /* line 4: written by readers. Sleepers in wait_version wait on
     * `published` (an event, see Events; publishers signal it); `locked_reads`
     * counts snapshots that had to take the writer lock; `want` is the
     * reader waiting to be offered the writer lock (see above): readers and
     * the lock holder CAS it. */
    uint32_t published;
    uint32_t _pad4a;
    uint64_t locked_reads;
    uint64_t want;
    uint8_t _pad4[SG_CACHE_LINE - 24];
} sg_array_hdr;

_Static_assert(offsetof(sg_array_hdr, writer) == SG_CACHE_LINE, "writer lock on its own line");
_Static_assert(offsetof(sg_array_hdr, buf) == 2 * SG_CACHE_LINE, "seqlock line");
_Static_assert(offsetof(sg_array_hdr, version) == 3 * SG_CACHE_LINE, "version line");
_Static_assert(offsetof(sg_array_hdr, published) == 4 * SG_CACHE_LINE, "readers' line");
_Static_assert(offsetof(sg_array_hdr, want) == 4 * SG_CACHE_LINE + 16, "layout");
_Static_assert(sizeof(sg_array_hdr) == 5 * SG_CACHE_LINE, "description starts after five lines");
_Static_assert(sizeof(sg_array_buf) == 16, "layout");

#define SG_ARRAY_ALIGN 64u
#define SG_ARRAY_OFFERED (1ull << 63) /* in writer.owner: thread words use bits 0-61 */

#endif /* SG_LAYOUT_H */
