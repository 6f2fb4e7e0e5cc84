/*
 * tiers.h: the lower tiers of the chunk store (internal; never installed).
 *
 * Below the memory tiers of store.c (device, host) a connector may keep its
 * entries on a local disk (disk.c, LMCACHE_LOCAL_DISK) and in a shared
 * Redis/Valkey server (remote.c, LMCACHE_REMOTE_URL).  Both keep whole
 * entries as opaque byte strings, "blobs" (blob.c), named by two 64-bit
 * numbers:
 *   - key:  the tier key, the model fingerprint mixed with the tensor-
 *           parallel shard (kvb_connector_tier_key); entries of another
 *           model or shard are never found;
 *   - hash: the segment's hash (kvb_hash_tokens_ns of its tokens and
 *           namespace).
 * A blob carries its own identity (key, hash, token ids, geometry) and an
 * XXH3-64 checksum over all of it; tiers.c checks all of that on every load
 * (kvb_blob_check), so a torn, corrupt or colliding blob is detected and
 * dropped, never loaded.  disk.c and remote.c therefore never parse blobs.
 *
 * tiers.c joins the two: lookups in the order disk, remote; a write-behind
 * thread that writes committed entries to both off the request path; per
 * tier counters.
 *
 * Every function here is thread-safe unless it says otherwise.
 *
 * Like store.h's hooks these functions are exported from the shared library
 * (their kvb_ names pass its version script) only so that the Check suites
 * can drive each tier alone; they are no part of the public API.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "internal.h"
#include "store.h"

/* Visibility of the functions below: exported, see above. */
#define KVB_TIER_HOOK KVB_API

/* ------------------------------------------------------------------ blob */

#define KVB_BLOB_MAGIC 0x3142564Bu /* "KVB1" as little-endian bytes */
#define KVB_BLOB_VERSION 1u

/*
 * The header of a blob.  A blob is, in this order (little-endian, every
 * field naturally aligned):
 *   kvb_blob_header                                  (64 bytes)
 *   int32 tokens[num_tokens], zero-padded to a multiple of 8 bytes
 *   int64 positions[num_tokens]  (where the stored keys were rotated)
 *   rows: per layer, K then V, each [num_tokens, num_kv_heads, head_size]
 *         of dtype (the store's entry layout)
 * checksum is XXH3-64 of the whole blob with the checksum field zeroed.
 */
typedef struct kvb_blob_header {
    uint32_t magic;   /* KVB_BLOB_MAGIC */
    uint32_t version; /* KVB_BLOB_VERSION */
    uint64_t key;     /* tier key */
    uint64_t hash;    /* segment hash */
    int64_t num_tokens;
    int32_t num_layers;
    int32_t num_kv_heads;
    int32_t head_size;
    int32_t dtype;          /* kvb_dtype */
    uint64_t payload_bytes; /* bytes after the header */
    uint64_t checksum;
} kvb_blob_header;

/* What a blob must match to be loaded. */
typedef struct kvb_blob_shape {
    int32_t num_layers;
    int32_t num_kv_heads;
    int32_t head_size;
    kvb_dtype dtype;
} kvb_blob_shape;

/* Bytes of one layer's K (or V) rows of an n-token entry of `shape`. */
KVB_TIER_HOOK size_t kvb_blob_layer_bytes(const kvb_blob_shape *shape,
                                       int64_t n);

/* Total size of a blob of n tokens; 0 when it would overflow size_t. */
KVB_TIER_HOOK size_t kvb_blob_size(const kvb_blob_shape *shape, int64_t n);

/* Offsets inside a blob of n tokens: token ids, positions, rows. */
KVB_TIER_HOOK size_t kvb_blob_tokens_offset(void);
KVB_TIER_HOOK size_t kvb_blob_positions_offset(int64_t n);
KVB_TIER_HOOK size_t kvb_blob_rows_offset(int64_t n);

/* Fills the header and the token and position arrays of `blob` (of
 * kvb_blob_size bytes); the caller then writes the rows at
 * kvb_blob_rows_offset and seals it with kvb_blob_seal. */
KVB_TIER_HOOK void kvb_blob_init(void *blob, const kvb_blob_shape *shape,
                              uint64_t key, uint64_t hash,
                              const int32_t *tokens, const int64_t *positions,
                              int64_t n);

/* Computes and stores the checksum of a filled blob of `len` bytes. */
KVB_TIER_HOOK void kvb_blob_seal(void *blob, size_t len);

/*
 * Checks that blob[0..len) is a whole, intact blob of `key`, `hash` and
 * `shape` holding exactly tokens[0..n): magic, version, identity, geometry,
 * length and checksum.  Returns 1 when it is, 0 otherwise, and then writes a
 * short static reason ("checksum", "tokens", ...) to *why when why != NULL.
 */
KVB_TIER_HOOK int kvb_blob_check(const void *blob, size_t len, uint64_t key,
                              uint64_t hash, const kvb_blob_shape *shape,
                              const int32_t *tokens, int64_t n,
                              const char **why);

/* ------------------------------------------------------------------ disk */

typedef struct kvb_disk kvb_disk;

/*
 * Opens the disk tier in folder `dir` (created, with its parents, when
 * missing) with a budget of `budget_bytes` of blob files.  One file per
 * entry, named "<key>-<hash>.kvb" (each 16 lower-case hex digits).  Opening
 * rebuilds the index from the folder: leftover temporary files of an
 * interrupted write are removed, files of that name pattern are indexed with
 * their size, least recently used first by modification time, and the oldest
 * are deleted until the folder fits the budget; other files are left alone.
 * KVB_ERR_INVALID when `dir` is not a usable folder (message names it).
 */
KVB_TIER_HOOK kvb_status kvb_disk_open(const char *dir, size_t budget_bytes,
                                    kvb_disk **out);

/* Closes the tier (files stay).  NULL is a no-op. */
KVB_TIER_HOOK void kvb_disk_close(kvb_disk *disk);

/* 1 when the index holds an entry for (key, hash), else 0. */
KVB_TIER_HOOK int kvb_disk_contains(kvb_disk *disk, uint64_t key, uint64_t hash);

/* Whether the final file of (key, hash) exists in folder `dir`, by one
 * stat, without opening the folder as a tier (a lookup-only view). */
KVB_TIER_HOOK int kvb_disk_file_exists(const char *dir, uint64_t key,
                                       uint64_t hash);

/*
 * Reads the whole file of (key, hash) into a new malloc'd buffer (*buf, the
 * caller frees it) of *len bytes, and makes the entry most recently used.
 * A miss is KVB_OK with *buf NULL.  A file that vanished or cannot be read
 * is dropped from the index and reported as a miss (logged as a warning).
 */
KVB_TIER_HOOK kvb_status kvb_disk_get(kvb_disk *disk, uint64_t key,
                                   uint64_t hash, void **buf, size_t *len);

/*
 * Writes buf[0..len) as the entry (key, hash), crash-safe: to a temporary
 * file in the same folder, fsync, rename over the final name, fsync of the
 * folder.  Then deletes least recently used entries until the tier fits its
 * budget.  A blob larger than the whole budget is not stored (KVB_OK, logged
 * at debug).  KVB_ERR_IO (message names the path and errno) when a write
 * fails; the temporary file is removed and nothing is indexed.
 */
KVB_TIER_HOOK kvb_status kvb_disk_put(kvb_disk *disk, uint64_t key,
                                   uint64_t hash, const void *buf, size_t len);

/* Deletes the entry's file and forgets it (a corrupt entry). */
KVB_TIER_HOOK void kvb_disk_drop(kvb_disk *disk, uint64_t key, uint64_t hash);

/* Entries indexed and their bytes. */
KVB_TIER_HOOK void kvb_disk_usage(kvb_disk *disk, int64_t *entries,
                               size_t *bytes);

/* ---------------------------------------------------------------- remote */

typedef struct kvb_remote kvb_remote;

/* Options of the remote tier. */
typedef struct kvb_remote_options {
    int connect_timeout_ms; /* connect timeout (> 0) */
    int command_timeout_ms; /* per command (> 0) */
    size_t part_bytes;      /* largest value written in one SET (> 0) */
    int retry_ms;           /* after a failure, no new connection attempt
                               for this long: calls fail fast (>= 0) */
} kvb_remote_options;

/*
 * Parses `url` ("redis://[[user]:password@]host[:port][/db]", same for
 * "valkey://"; port 6379 and db 0 by default) and opens the remote tier.
 * A server that cannot be reached now is not an error (calls fail until it
 * can be, see retry_ms); a bad URL is KVB_ERR_INVALID naming it; a build
 * without hiredis is KVB_ERR_UNSUPPORTED.
 */
KVB_TIER_HOOK kvb_status kvb_remote_open(const char *url,
                                      const kvb_remote_options *opts,
                                      kvb_remote **out);

/* Closes the connections.  NULL is a no-op. */
KVB_TIER_HOOK void kvb_remote_close(kvb_remote *remote);

/*
 * Calls below return KVB_ERR_IO (the message names the server and the
 * failure: refused, timeout, protocol error) when the server cannot be
 * used, after dropping the connection; the next call reconnects (not
 * before retry_ms).  A value that is missing or incomplete is a miss, not
 * an error.
 */

/* *found = 1 when the entry (key, hash) is on the server. */
KVB_TIER_HOOK kvb_status kvb_remote_contains(kvb_remote *remote, uint64_t key,
                                          uint64_t hash, int *found);

/* Reads the entry into a new malloc'd buffer (*buf NULL on a miss; the
 * caller frees it): its parts are fetched with one pipelined round trip. */
KVB_TIER_HOOK kvb_status kvb_remote_get(kvb_remote *remote, uint64_t key,
                                     uint64_t hash, void **buf, size_t *len);

/* Writes buf[0..len) as the entry (key, hash), in parts of at most
 * part_bytes, the parts before the part that makes the entry visible. */
KVB_TIER_HOOK kvb_status kvb_remote_put(kvb_remote *remote, uint64_t key,
                                     uint64_t hash, const void *buf,
                                     size_t len);

/* Deletes the entry (a corrupt value). */
KVB_TIER_HOOK kvb_status kvb_remote_del(kvb_remote *remote, uint64_t key,
                                     uint64_t hash);

/* The server as "host:port/db" (for messages), static for the remote's
 * life. */
KVB_TIER_HOOK const char *kvb_remote_name(const kvb_remote *remote);

/* ----------------------------------------------------------------- tiers */

/*
 * Looks the entry (key, hash) up in the disk tier, then the remote tier, and
 * returns the first blob that passes kvb_blob_check against `shape` and
 * tokens[0..n) in *blob (malloc'd, *len bytes; the caller hands it back with
 * kvb_tiers_recycle) and whether it came from the remote tier in *remote.
 * A miss, a failing tier and a rejected blob (deleted from its tier) all
 * give KVB_OK with *blob NULL; they are counted in the tier's stats.
 */
KVB_TIER_HOOK kvb_status kvb_tiers_fetch(kvb_tiers *tiers, uint64_t key,
                                         uint64_t hash,
                                         const kvb_blob_shape *shape,
                                         const int32_t *tokens, int64_t n,
                                         void **blob, size_t *len,
                                         int *remote);

/* Takes back a blob from kvb_tiers_fetch: a blob that came from the remote
 * tier is queued for the disk tier (a restart finds it locally), any other
 * is freed.  NULL blob is a no-op. */
KVB_TIER_HOOK void kvb_tiers_recycle(kvb_tiers *tiers, void *blob, size_t len,
                                     uint64_t key, uint64_t hash, int remote);

/*
 * Queues a READY entry of `store` for writing to every lower tier under
 * `key`.  Ownership: the caller passes one pin on `entry`, which the writer
 * releases (kvb_store_unpin) once the rows are copied, or at once when the
 * write is dropped.  `copy` copies the entry's rows block (both tiers'
 * layout: K, V per layer) out of its tier into host memory (dst_tier
 * KVB_TIER_HOST), as a store mover does; it runs on the writer thread.
 */
KVB_TIER_HOOK void kvb_tiers_put_entry(kvb_tiers *tiers, kvb_store *store,
                                       kvb_entry *entry, uint64_t key,
                                       const kvb_blob_shape *shape,
                                       kvb_move_fn copy, void *copy_ctx);
