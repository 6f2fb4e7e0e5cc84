/*
 * kvblend.h: the public C API of libkvblend.
 *
 * kvblend reuses the stored KV cache of text chunks wherever they appear in a
 * prompt (CacheBlend, EuroSys 2025).  This header is the only interface of the
 * shared object: the CPython extension, the tests and any other host program
 * use nothing else.
 *
 * Rules that hold for every function declared here:
 *   - Functions return a kvb_status; KVB_OK is 0.  On failure the sentence a
 *     user needs (which argument, which value, what was expected) is available
 *     from kvb_last_error(), which is thread-local.
 *   - Handles are opaque and always the first argument.  kvb_*_free(NULL) is a
 *     no-op.
 *   - Memory passed in by the caller (token arrays, tensors, the paged KV
 *     cache) is borrowed for the duration of the call and never freed.
 *   - Enums are only ever appended to.
 *   - Tensors are described by a raw pointer plus shape; "contiguous
 *     [n, h, d]" means row-major with d the fastest dimension.  Device
 *     pointers and CUDA streams cross as void *; no CUDA type appears here.
 *
 * The header compiles alone under -std=c11 -pedantic -Werror and from C++.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KVB_API __declspec(dllexport)
#elif defined(__GNUC__)
#define KVB_API __attribute__((visibility("default")))
#else
#define KVB_API
#endif

/* ------------------------------------------------------------------------ */
/* Status, errors, logging                                                    */
/* ------------------------------------------------------------------------ */

/* Result of every fallible call.  Values are stable and only appended to. */
typedef enum kvb_status {
    KVB_OK = 0,              /* success */
    KVB_ERR_INVALID = 1,     /* an argument or configuration value is bad */
    KVB_ERR_NOMEM = 2,       /* an allocation failed */
    KVB_ERR_UNSUPPORTED = 3, /* dtype, layout or feature not supported */
    KVB_ERR_CUDA = 4,        /* a CUDA runtime call failed */
    KVB_ERR_NOT_FOUND = 5,   /* a looked-up object does not exist */
    KVB_ERR_INTERNAL = 6,    /* an internal invariant failed (a bug) */
    KVB_ERR_IO = 7           /* a file or the remote store failed */
} kvb_status;

/* Returns a static name for a status ("KVB_OK", "KVB_ERR_INVALID", ...);
 * unknown values give "KVB_ERR_UNKNOWN". */
KVB_API const char *kvb_status_str(kvb_status status);

/* Returns the message of the last failed call on this thread, or "" if none
 * failed yet.  The pointer stays valid until the next kvblend call on the
 * same thread. */
KVB_API const char *kvb_last_error(void);

/* Clears this thread's last error message. */
KVB_API void kvb_clear_error(void);

/* Log levels for the optional log callback. */
typedef enum kvb_log_level {
    KVB_LOG_DEBUG = 0,
    KVB_LOG_INFO = 1,
    KVB_LOG_WARNING = 2,
    KVB_LOG_ERROR = 3
} kvb_log_level;

/* Receives log lines (without trailing newline).  May be called from any
 * thread, concurrently, and with no kvblend lock held (as sqlite3_log's
 * callback): it may take its own locks (a Python sink takes the GIL) and
 * may call kvb_set_log; it must not log through kvblend itself. */
typedef void (*kvb_log_fn)(kvb_log_level level, const char *msg, void *user);

/* Installs a process-wide log sink (NULL restores the default, which writes
 * to stderr) and the minimum level delivered.  A sink replaced while
 * another thread is inside it finishes that call: it (and `user`) must stay
 * valid until no thread can still be logging through it. */
KVB_API void kvb_set_log(kvb_log_fn fn, void *user, kvb_log_level min_level);

/* Sets only the minimum level delivered, keeping the installed sink. */
KVB_API void kvb_set_log_level(kvb_log_level min_level);

/* Returns the library version as "MAJOR.MINOR.PATCH". */
KVB_API const char *kvb_version(void);

/* Returns 1 when the library was built with CUDA kernels, else 0. */
KVB_API int kvb_has_cuda(void);

/* ------------------------------------------------------------------------ */
/* Element types                                                              */
/* ------------------------------------------------------------------------ */

/* Storage types of KV tensors.  Arithmetic is always done in fp32. */
typedef enum kvb_dtype {
    KVB_DTYPE_F32 = 0,
    KVB_DTYPE_F16 = 1,
    KVB_DTYPE_BF16 = 2
} kvb_dtype;

/* Returns the size in bytes of one element of `dtype`, or 0 if unknown. */
KVB_API size_t kvb_dtype_size(kvb_dtype dtype);

/* Returns "f32", "f16", "bf16", or "unknown". */
KVB_API const char *kvb_dtype_str(kvb_dtype dtype);

/* ------------------------------------------------------------------------ */
/* Configuration                                                              */
/* ------------------------------------------------------------------------ */

#define KVB_MAX_CHECK_LAYERS 16
#define KVB_MAX_SPECIAL_STR 256
#define KVB_MAX_PATH 1024 /* LMCACHE_LOCAL_DISK and LMCACHE_REMOTE_URL, with NUL */
#define KVB_MAX_CPU_THREADS 256 /* KVBLEND_NUM_THREADS at most */

/* Which tensor the per-token deviation compares at a check layer. */
typedef enum kvb_deviation_kind {
    KVB_DEVIATION_K = 0,  /* squared L2 of the key difference */
    KVB_DEVIATION_V = 1,  /* squared L2 of the value difference */
    KVB_DEVIATION_KV = 2  /* sum of both */
} kvb_deviation_kind;

/* How a check layer ranks the reusable rows it may recompute. */
typedef enum kvb_selection_kind {
    KVB_SELECT_DEVIATION = 0,      /* KV deviation (KVBLEND_DEVIATION) */
    KVB_SELECT_QUERY = 1,          /* attention the rows after the blend
                                    * (the question) pay each row */
    KVB_SELECT_QUERY_DEVIATION = 2 /* product of the two */
} kvb_selection_kind;

#define KVB_MAX_BOUNDARY_TOKENS 4096 /* KVBLEND_BOUNDARY_TOKENS at most */

/*
 * Every setting kvblend reads.  LMCache-compatible settings come from
 * LMCACHE_* variables with LMCache's names and defaults; kvblend's own from
 * KVBLEND_*.  One table in config.c lists each variable once, with its
 * field, type, default and range, and drives the defaults, parsing,
 * validation and kvb_config_get; README.md documents each.  Booleans accept
 * True/False/true/false/1/0; whitespace around numbers and booleans is
 * ignored.  Some LMCache settings are accepted (and checked) for
 * compatibility but change nothing in kvblend: kvb_config_get marks them
 * KVB_SETTING_COMPAT and a connector logs each one that is set.
 */
typedef struct kvb_config {
    int enable_blending;
    char blend_special_str[KVB_MAX_SPECIAL_STR];
    int use_layerwise;
    int num_check_layers;
    int32_t check_layers[KVB_MAX_CHECK_LAYERS];
    int num_recompute_ratios;
    float recompute_ratios[KVB_MAX_CHECK_LAYERS];
    int num_thresholds; /* 0 when LMCACHE_BLEND_THRESHOLDS is unset */
    float thresholds[KVB_MAX_CHECK_LAYERS];
    int64_t chunk_size;
    int local_cpu;
    double max_local_cpu_size_gb;
    int enable_sparse;
    double max_device_size_gb;
    kvb_deviation_kind deviation;
    kvb_selection_kind selection;
    int boundary_tokens;
    int self_test;
    int num_threads;
    kvb_log_level log_level;
    int verify_checksums; /* 1, 0, or -1 for "auto" */
    char local_disk[KVB_MAX_PATH]; /* folder of the disk tier; "" = none */
    double max_local_disk_size_gb;
    char remote_url[KVB_MAX_PATH]; /* "" = no remote tier */
    int remote_timeout_ms;
    double remote_part_size_mb;
} kvb_config;

/* Fills `cfg` with the defaults listed above.  Never fails for non-NULL cfg. */
KVB_API kvb_status kvb_config_init(kvb_config *cfg);

/* Parses one variable by its full name (e.g. "LMCACHE_CHUNK_SIZE") into
 * `cfg`.  Unknown names starting with LMCACHE_ are ignored (LMCache has many
 * settings kvblend does not use); unknown KVBLEND_ names are KVB_ERR_INVALID.
 * On a bad value returns KVB_ERR_INVALID and leaves `cfg` unchanged; the
 * message names the variable and the value. */
KVB_API kvb_status kvb_config_set(kvb_config *cfg, const char *name,
                                  const char *value);

/* Checks cross-field rules (one ratio per check layer or a single ratio,
 * thresholds likewise).  Returns KVB_ERR_INVALID naming the variables. */
KVB_API kvb_status kvb_config_validate(const kvb_config *cfg);

/* The i-th variable kvblend reads (0-based, in the order
 * kvb_config_from_env applies them), or NULL when i is out of range. */
KVB_API const char *kvb_config_name(int i);

/* The type of a setting's value in kvb_setting. */
typedef enum kvb_setting_type {
    KVB_SETTING_BOOL = 0,       /* .i is 0 or 1 */
    KVB_SETTING_INT = 1,        /* .i */
    KVB_SETTING_FLOAT = 2,      /* .f */
    KVB_SETTING_STR = 3,        /* .s; NULL when unset; enums give a word */
    KVB_SETTING_INT_LIST = 4,   /* .n values at .ints */
    KVB_SETTING_FLOAT_LIST = 5, /* .n values at .floats; n = 0: unset */
    KVB_SETTING_NO_FIELD = 6    /* only checked here (read elsewhere) */
} kvb_setting_type;

#define KVB_SETTING_COMPAT 1u /* accepted for LMCache; changes nothing */

/* One setting and its value in a config, from kvb_config_get.  Pointers
 * point into the table or the config and live as long as both. */
typedef struct kvb_setting {
    const char *name; /* the variable, "LMCACHE_CHUNK_SIZE" */
    const char *key;  /* the kvb_config field, "chunk_size"; NULL for
                       * KVB_SETTING_NO_FIELD */
    kvb_setting_type type;
    unsigned flags;   /* KVB_SETTING_COMPAT */
    int64_t i;
    double f;
    const char *s;
    int n;
    const int32_t *ints;
    const float *floats;
} kvb_setting;

/* Fills `out` with setting `i` (the order of kvb_config_name) and its value
 * in `cfg`.  Returns KVB_OK, or KVB_ERR_NOT_FOUND (no message) when i is
 * past the last setting, so a loop stops there; KVB_ERR_INVALID for NULL
 * arguments. */
KVB_API kvb_status kvb_config_get(const kvb_config *cfg, int i,
                                  kvb_setting *out);

/* Initialises `cfg` from the process environment: kvb_config_init, then
 * kvb_config_set for each recognised variable that is set, then
 * kvb_config_validate.  Stops at the first bad value. */
KVB_API kvb_status kvb_config_from_env(kvb_config *cfg);

/* Returns the recompute ratio that applies at check layer index `i`
 * (0 <= i < num_check_layers): ratios[i], or ratios[0] when one is given. */
KVB_API float kvb_config_ratio_at(const kvb_config *cfg, int i);

/* ------------------------------------------------------------------------ */
/* Lower tiers: local disk and a shared Redis/Valkey server                   */
/* ------------------------------------------------------------------------ */

/*
 * Below the memory tiers a connector keeps its chunks on a local disk
 * (LMCACHE_LOCAL_DISK) and in a Redis/Valkey server shared by many
 * instances (LMCACHE_REMOTE_URL).  Lookups go memory, then disk, then
 * remote; a disk or remote hit is loaded into memory.  Committed chunks are
 * written to both by a background thread, off the request path.  Entries
 * are keyed by a tier key (the model fingerprint and tensor-parallel shard,
 * kvb_tier_key) and the segment hash, and carry their token ids and a
 * checksum that are compared on every load: a corrupt, torn or foreign
 * entry is dropped and recomputed, and a server that is down costs only the
 * reuse.
 */
typedef struct kvb_tiers kvb_tiers;

/* Counters of one lower tier. */
typedef struct kvb_tier_stats {
    int32_t enabled;        /* the tier is configured and open */
    int64_t lookups;        /* fetches tried (a load, not a contains) */
    int64_t hits;           /* entries loaded (checked) */
    int64_t misses;         /* fetches that found nothing loadable */
    int64_t errors;         /* failed calls: server down or slow, I/O */
    int64_t corrupt;        /* entries rejected and deleted (checksum,
                               length, tokens, model) */
    int64_t writes;         /* entries written */
    int64_t write_errors;   /* writes that failed */
    int64_t writes_dropped; /* writes dropped: queue full or shutting down */
    uint64_t bytes_read;
    uint64_t bytes_written;
    int64_t entries;        /* disk: entries on disk now */
    uint64_t bytes;         /* disk: their bytes */
} kvb_tier_stats;

/* The key that names a model's entries in the lower tiers: XXH3-64 of the
 * model fingerprint (kvb_connector_fingerprint, with the weights identity
 * of kvb_connector_set_model_id mixed in) and the shard (`rank` of `world`
 * tensor-parallel ranks, each of which stores its own KV heads). */
KVB_API uint64_t kvb_tier_key(uint64_t fingerprint, int32_t rank,
                              int32_t world);

/*
 * Opens the lower tiers `cfg` names (the disk folder is created and its
 * index rebuilt; a remote server that is down now is retried later).
 * `*out` is NULL with KVB_OK when neither tier is configured.  A bad folder
 * or URL is KVB_ERR_INVALID and a build without hiredis given a URL is
 * KVB_ERR_UNSUPPORTED, each with a message naming the variable.
 * Ownership: the caller frees it with kvb_tiers_free.
 */
KVB_API kvb_status kvb_tiers_open(const kvb_config *cfg, kvb_tiers **out);

/* Opens a lookup-only view of the tiers `cfg` names, for a process that
 * only asks what is stored (vLLM's scheduler): kvb_tiers_contains stats the
 * entry's file in the disk folder (the view never scans, cleans or evicts
 * it) and asks the remote server with a timeout of at most 100 ms; nothing
 * is written.  `*out` is NULL when neither tier is configured. */
KVB_API kvb_status kvb_tiers_open_view(const kvb_config *cfg,
                                       kvb_tiers **out);

/* Writes what is queued, then closes the tiers.  NULL is a no-op. */
KVB_API void kvb_tiers_free(kvb_tiers *tiers);

/* Sets *found to 1 when the disk tier or the remote server holds the entry
 * (key, hash) (a scheduler's lookup; no data is read).  A server that
 * cannot answer counts as "not held" and in stats.errors. */
KVB_API kvb_status kvb_tiers_contains(kvb_tiers *tiers, uint64_t key,
                                      uint64_t hash, int *found);

/* Waits until every queued write is done. */
KVB_API kvb_status kvb_tiers_flush(kvb_tiers *tiers);

/* Copies the disk and remote counters (either pointer may be NULL). */
KVB_API kvb_status kvb_tiers_get_stats(kvb_tiers *tiers, kvb_tier_stats *disk,
                                       kvb_tier_stats *remote);

/* ------------------------------------------------------------------------ */
/* Segmentation and hashing                                                   */
/* ------------------------------------------------------------------------ */

/* A half-open token range [start, end) of a prompt. */
typedef struct kvb_span {
    int64_t start;
    int64_t end;
} kvb_span;

/*
 * Splits `tokens[0..n)` on every non-overlapping occurrence of
 * `sep[0..sep_len)` (scanning left to right).  Separator tokens belong to no
 * segment; empty segments (separator at the start or end, consecutive
 * separators) are not reported.  A prompt without a separator is one segment;
 * an empty prompt has none.
 *
 * Writes up to `cap` spans to `out` and the total count to `*n_out` (which
 * may exceed cap: then KVB_ERR_INVALID is returned and the message says how
 * many were needed).  sep_len must be >= 1; a prompt shorter than the
 * separator is KVB_ERR_INVALID ("separator ... longer than the prompt").
 */
KVB_API kvb_status kvb_segment_split(const int32_t *tokens, int64_t n,
                                     const int32_t *sep, int64_t sep_len,
                                     kvb_span *out, int64_t cap,
                                     int64_t *n_out);

/*
 * Checks explicit segment boundaries for a prompt of `n` tokens: each span
 * must satisfy 0 <= start < end <= n, and spans must be sorted and must not
 * overlap.  Gaps between spans are allowed (they are recomputed).
 */
KVB_API kvb_status kvb_segment_check(const kvb_span *spans, int64_t n_spans,
                                     int64_t n);

/* Returns the 64-bit position-independent key of a segment: XXH3-64 (seed 0)
 * of its token ids as little-endian int32.  n == 0 hashes the empty input. */
KVB_API uint64_t kvb_hash_tokens(const int32_t *tokens, int64_t n);

/* The key of a segment in namespace `ns` (XXH3-64 seeded with ns);
 * kvb_hash_tokens_ns(t, n, 0) == kvb_hash_tokens(t, n). */
KVB_API uint64_t kvb_hash_tokens_ns(const int32_t *tokens, int64_t n,
                                    uint64_t ns);

/* The namespace of a tenant: XXH3-64 of the name's bytes, never 0 for a
 * non-empty name; the empty name (or NULL) is the default namespace 0.
 * Chunks stored in one namespace are never found from another. */
KVB_API uint64_t kvb_namespace(const char *name, size_t len);

/* ------------------------------------------------------------------------ */
/* Chunk store                                                                */
/* ------------------------------------------------------------------------ */

typedef struct kvb_store kvb_store;
typedef struct kvb_entry kvb_entry;

/* Where an entry's rows live. */
typedef enum kvb_tier {
    KVB_TIER_HOST = 0,   /* host memory (pinned when a CUDA host allocator
                            is installed) */
    KVB_TIER_DEVICE = 1  /* device memory pool */
} kvb_tier;

/* Shape of the rows a store keeps: per entry and layer, K and V of shape
 * contiguous [num_tokens, num_kv_heads, head_size] in `dtype`. */
typedef struct kvb_store_params {
    int32_t num_layers;
    int32_t num_kv_heads;
    int32_t head_size;
    kvb_dtype dtype;
    size_t host_budget_bytes;   /* 0: the host tier stores nothing */
    size_t device_budget_bytes; /* 0: no device tier */
    /* Non-zero: every entry committed to the host tier gets a checksum per
     * layer (XXH3-64 of its K then V bytes), checked by kvb_store_verify
     * and before a promotion to the device tier.  Device-tier entries
     * carry none. */
    int checksums;
} kvb_store_params;

/* Store statistics (cumulative counters and current sizes). */
typedef struct kvb_store_stats {
    int64_t num_entries;
    size_t host_bytes;
    size_t device_bytes;
    int64_t lookups;
    int64_t hits;
    int64_t inserts;
    int64_t evictions;
    int64_t rejected; /* reservations refused for lack of room */
    int64_t collisions; /* hash matched, tokens differed */
    int64_t promotions; /* host-tier hits moved to the device tier */
    int64_t demotions;  /* device-tier victims moved to the host tier
                           instead of being dropped (not in evictions) */
    int64_t corrupt;    /* entries dropped because their rows no longer
                           matched their checksums */
} kvb_store_stats;

/* Creates a store.  Ownership: the caller frees it with kvb_store_free after
 * every entry has been unpinned.  All store functions are thread-safe. */
KVB_API kvb_status kvb_store_create(const kvb_store_params *params,
                                    kvb_store **out);

/* Frees the store and all its entries.  NULL is a no-op. */
KVB_API void kvb_store_free(kvb_store *store);

/* Every lookup names the tenant namespace `ns` (kvb_namespace; 0 is the
 * default): an entry is found only under the namespace it was reserved in.
 *
 * Reports whether a ready entry for exactly these tokens exists (no pin, no
 * LRU update, no side effects).  `*found` is 1 or 0. */
KVB_API kvb_status kvb_store_contains(kvb_store *store, uint64_t ns,
                                      const int32_t *tokens, int64_t n,
                                      int *found);

/*
 * Looks up a ready entry for exactly these tokens.  On a hit, `*entry` is
 * pinned (it cannot be evicted or freed) and marked most recently used; the
 * caller must call kvb_store_unpin.  On a miss `*entry` is NULL and KVB_OK is
 * returned.  A hash collision (same hash, other tokens) is a miss.
 */
KVB_API kvb_status kvb_store_acquire(kvb_store *store, uint64_t ns,
                                     const int32_t *tokens, int64_t n,
                                     kvb_entry **entry);

/*
 * Checks an entry pinned by kvb_store_acquire against its checksums
 * (kvb_store_params.checksums).  `*intact` is 1 when they match or the
 * entry has none.  Otherwise it is 0 and the entry is dropped: invisible to
 * lookups from now on (a REMOVED event, stats.corrupt), freed once its last
 * pin goes, and the caller's pin is released (do not unpin it again).
 */
KVB_API kvb_status kvb_store_verify(kvb_store *store, kvb_entry *entry,
                                    int *intact);

/*
 * Reserves a new entry for `tokens[0..n)` whose keys were rotated at
 * `positions[0..n)` (NULL means 0..n-1), evicting least recently used
 * unpinned entries as needed.  The entry is pinned and invisible to lookups
 * until kvb_store_commit.  `*entry` is NULL with KVB_OK when an entry for
 * these tokens already exists or is being written, or when there is no room
 * (counted in stats.rejected and logged): "no room" means "not stored", never
 * a failure.
 */
KVB_API kvb_status kvb_store_reserve(kvb_store *store, uint64_t ns,
                                     const int32_t *tokens, int64_t n,
                                     const int64_t *positions,
                                     kvb_entry **entry);

/* Makes a reserved entry visible to lookups and unpins it. */
KVB_API kvb_status kvb_store_commit(kvb_store *store, kvb_entry *entry);

/* As kvb_store_commit, but the reservation's pin is kept: the entry stays
 * valid (and unevictable) until the caller's kvb_store_unpin. */
KVB_API kvb_status kvb_store_commit_pinned(kvb_store *store,
                                           kvb_entry *entry);

/* Drops a reserved entry that will not be completed. */
KVB_API kvb_status kvb_store_abort(kvb_store *store, kvb_entry *entry);

/* Releases a pin taken by kvb_store_acquire. */
KVB_API kvb_status kvb_store_unpin(kvb_store *store, kvb_entry *entry);

/* Removes every unpinned entry. */
KVB_API kvb_status kvb_store_clear(kvb_store *store);

/* Copies the statistics. */
KVB_API kvb_status kvb_store_get_stats(kvb_store *store,
                                       kvb_store_stats *stats);

/* What happened to an entry, as reported by kvb_store_take_events. */
typedef enum kvb_store_event_kind {
    KVB_STORE_EVENT_ADDED = 1,  /* committed: visible to lookups */
    KVB_STORE_EVENT_REMOVED = 2 /* evicted or cleared: no longer stored */
} kvb_store_event_kind;

/* One change of the set of stored segments: the segment's key (the store's
 * hash of its tokens) and length.  A process that cannot see the store (a
 * scheduler in another process) mirrors the set from these. */
typedef struct kvb_store_event {
    uint64_t hash;
    int64_t num_tokens;
    int32_t kind; /* kvb_store_event_kind */
} kvb_store_event;

/*
 * Starts (`enabled` non-zero) or stops recording events: from then on every
 * commit and every removal of a ready entry (eviction, clear) appends one
 * event, in order, until taken.  Stopping drops the events not yet taken.
 * Off by default, so a store nobody drains never grows a log.
 */
KVB_API kvb_status kvb_store_watch(kvb_store *store, int enabled);

/*
 * Moves up to `cap` of the oldest recorded events into `out[0..*n)`; the
 * rest stay for the next call (call again while *n == cap).  `*lost` (may be
 * NULL) is set to 1 when events were dropped since the last call because
 * memory ran out: the caller's mirror is then incomplete and must be rebuilt
 * (forget everything); else 0.
 */
KVB_API kvb_status kvb_store_take_events(kvb_store *store,
                                         kvb_store_event *out, int64_t cap,
                                         int64_t *n, int *lost);

/* Entry accessors (valid while the entry is pinned). */
KVB_API int64_t kvb_entry_num_tokens(const kvb_entry *entry);
KVB_API uint64_t kvb_entry_hash(const kvb_entry *entry);
KVB_API const int32_t *kvb_entry_tokens(const kvb_entry *entry);
/* Positions at which the stored keys were rotated: [num_tokens]. */
KVB_API const int64_t *kvb_entry_positions(const kvb_entry *entry);
KVB_API kvb_tier kvb_entry_tier(const kvb_entry *entry);
/* K or V rows of one layer: contiguous [num_tokens, num_kv_heads,
 * head_size]; NULL when layer is out of range. */
KVB_API void *kvb_entry_k(kvb_entry *entry, int32_t layer);
KVB_API void *kvb_entry_v(kvb_entry *entry, int32_t layer);

/* For tests: replaces the store's hash function (NULL restores
 * kvb_hash_tokens_ns; a test function ignores the namespace) so that
 * collisions can be forced.  Allowed only while the
 * store is empty; otherwise KVB_ERR_INVALID. */
KVB_API kvb_status kvb_store_debug_set_hash(kvb_store *store,
                                            uint64_t (*fn)(const int32_t *,
                                                           int64_t));

/* ------------------------------------------------------------------------ */
/* Paged KV layout                                                            */
/* ------------------------------------------------------------------------ */

/*
 * Describes one layer of a paged KV cache owned by the engine.  Element
 * (block b, token t, head h, dim d) of K lives at
 *   k_base + b*block_stride + t*token_stride + h*head_stride + d*dim_stride
 * (strides in elements, not bytes), and likewise for V from v_base.  This
 * covers (2,B,N,H,D), (B,2,N,H,D), (B,N,H,2D) with K|V per token, and HND
 * planes.  A slot is block*block_size + token; a negative slot is padding
 * (skipped).
 *
 * V may have strides of its own (v_block_stride .. v_dim_stride): when all
 * four are 0, V uses K's strides (so a zero-initialised descriptor keeps
 * the shared-stride meaning); otherwise V's element is at
 *   v_base + b*v_block_stride + t*v_token_stride + h*v_head_stride
 *          + d*v_dim_stride.
 * vLLM's CPU attention backend needs this: per block and head it stores K
 * transposed ([head_size, block_size]: token_stride 1, dim_stride
 * block_size) and V row-major ([block_size, head_size]).
 */
typedef struct kvb_paged_layout {
    void *k_base;
    void *v_base;
    int64_t block_stride;
    int64_t token_stride;
    int64_t head_stride;
    int64_t dim_stride;
    int64_t num_blocks;
    int64_t block_size;
    int32_t num_kv_heads;
    int32_t head_size;
    kvb_dtype dtype;
    int32_t device; /* -1: host memory; >= 0: CUDA device ordinal */
    /* V's own strides; all four 0 = the same as K's (see above). */
    int64_t v_block_stride;
    int64_t v_token_stride;
    int64_t v_head_stride;
    int64_t v_dim_stride;
} kvb_paged_layout;

/* Checks the descriptor: non-NULL bases, positive sizes, non-negative
 * strides (K's and V's), known dtype, extents of K and V within int64. */
KVB_API kvb_status kvb_layout_validate(const kvb_paged_layout *layout);

/* Checks a slot mapping: every slot must be < num_blocks*block_size
 * (negative = padding).  The message names the index and the slot. */
KVB_API kvb_status kvb_layout_check_slots(const kvb_paged_layout *layout,
                                          const int64_t *slots, int64_t n);

/* ------------------------------------------------------------------------ */
/* Rotary embedding description                                               */
/* ------------------------------------------------------------------------ */

/* How rotary dimensions are paired. */
typedef enum kvb_rope_style {
    KVB_ROPE_NEOX = 0, /* pairs (i, i + rotary_dim/2): Llama, Qwen, Mistral */
    KVB_ROPE_GPTJ = 1  /* pairs (2i, 2i + 1) */
} kvb_rope_style;

/*
 * Rotary embedding of a model's keys: dims [0, rotary_dim) of each head are
 * rotated, the rest pass through.  inv_freq[i] (i < rotary_dim/2) is the
 * angular frequency of pair i, including any scaling (llama3, linear, YaRN);
 * a position p rotates pair i by p*inv_freq[i].  `attention_factor` is the
 * model's scale of cos and sin (YaRN's mscale; 1.0 otherwise); re-rotation
 * never applies it, since stored keys already carry it and a rotation by the
 * position delta keeps their norm.  The table is borrowed.
 */
typedef struct kvb_rope {
    int32_t rotary_dim;
    kvb_rope_style style;
    const float *inv_freq; /* [rotary_dim/2], host memory */
    float attention_factor;
} kvb_rope;

/* ------------------------------------------------------------------------ */
/* CPU reference ops                                                          */
/* ------------------------------------------------------------------------ */

/* The op functions below take host pointers.  kvb_cuda_* twins with the
 * same arguments plus a stream take device pointers; kvb_cpu_attention has
 * none (on a GPU the blend's subset attention is torch's FlexAttention or
 * SDPA, which kvb_cpu_attention is the reference for). */

/* Sets the number of threads CPU ops may use (0 = all cores). */
KVB_API kvb_status kvb_cpu_set_threads(int num_threads);

/* The number of threads CPU ops use now: the set count, or the online
 * cores (at most KVB_MAX_CPU_THREADS) when it is 0. */
KVB_API int kvb_cpu_get_threads(void);

/* Copies `n` tokens from the paged cache to contiguous k_out/v_out
 * [n, num_kv_heads, head_size] of the layout's dtype.  Padding slots leave
 * their rows untouched. */
KVB_API kvb_status kvb_cpu_gather(const kvb_paged_layout *layout,
                                  const int64_t *slots, int64_t n,
                                  void *k_out, void *v_out);

/* Copies contiguous k_in/v_in [n, num_kv_heads, head_size] into the paged
 * cache at `slots`.  Padding slots are skipped.  Either input may be NULL to
 * write only the other. */
KVB_API kvb_status kvb_cpu_scatter(const kvb_paged_layout *layout,
                                   const int64_t *slots, int64_t n,
                                   const void *k_in, const void *v_in);

/*
 * Re-rotates keys in place: k [n, num_heads, head_size] was rotated at
 * old_pos[i] and is rotated to new_pos[i] (a rotation by
 * (new_pos - old_pos) * inv_freq, angles computed in double).  Rotating
 * from 0 applies RoPE to unrotated keys.  Requires rotary_dim even,
 * 0 < rotary_dim <= head_size.
 */
KVB_API kvb_status kvb_cpu_rerotate(void *k, int64_t n, int32_t num_heads,
                                    int32_t head_size, kvb_dtype dtype,
                                    const kvb_rope *rope,
                                    const int64_t *old_pos,
                                    const int64_t *new_pos);

/* out[i] = sum over heads and dims of (a[i] - b[i])^2 for contiguous
 * a, b [n, num_heads, head_size]; arithmetic in fp32. */
KVB_API kvb_status kvb_cpu_deviation(const void *a, const void *b, int64_t n,
                                     int32_t num_heads, int32_t head_size,
                                     kvb_dtype dtype, float *out);

/*
 * Chooses tokens to recompute: all i with forced[i] != 0 (forced may be
 * NULL), plus the k highest-scoring other tokens (ties: lower index first;
 * NaN scores rank lowest).  k is clamped to the number of non-forced tokens.
 * Writes the chosen indices in ascending order to out_idx (capacity n) and
 * their count to *n_out.
 */
KVB_API kvb_status kvb_cpu_select(const float *score, const uint8_t *forced,
                                  int64_t n, int64_t k, int64_t *out_idx,
                                  int64_t *n_out);

/*
 * Attention of a subset of queries over N keys with the exact causal mask by
 * position: query i sees key j iff k_pos[j] <= q_pos[i].
 *   q   [nq, num_q_heads, head_size]    k, v [nk, num_kv_heads, head_size]
 *   out [nq, num_q_heads, head_size]
 * num_q_heads must be a multiple of num_kv_heads (GQA).  A query that sees no
 * key gets zeros.  All tensors share `dtype`; arithmetic in fp32.
 */
KVB_API kvb_status kvb_cpu_attention(const void *q, const int64_t *q_pos,
                                     int64_t nq, const void *k, const void *v,
                                     const int64_t *k_pos, int64_t nk,
                                     int32_t num_q_heads,
                                     int32_t num_kv_heads, int32_t head_size,
                                     float scale, kvb_dtype dtype, void *out);

/*
 * One stored segment to load into a staging buffer: the entry's K and V rows
 * of layer 0 start at k0/v0, layer l at k0 + l*layer_stride elements (the
 * store's layout), shape [num_tokens, num_kv_heads, head_size]; the keys were
 * rotated at src_pos[num_tokens].  Row t goes to staging row dst_start + t.
 *
 * k0 == NULL means the segment's rows of this layer are already in the
 * staging buffer at rows [dst_start, dst_start + num_tokens) (a device
 * connector copies host-tier rows there with the copy engine first): the
 * load re-rotates those K rows in place and leaves the V rows as they are;
 * v0 and layer_stride are then not read.  src_pos is always required.
 */
typedef struct kvb_load_seg {
    const void *k0;
    const void *v0;
    int64_t layer_stride;
    const int64_t *src_pos;
    int64_t dst_start;
    int64_t num_tokens;
} kvb_load_seg;

/*
 * The fused per-layer load: for each segment copies layer `layer`'s V rows
 * and K rows re-rotated from src_pos to dst_pos[dst_start + t] into
 * dst_k/dst_v [num_rows, num_kv_heads, head_size] (a segment with k0 == NULL:
 * only re-rotates its K rows already there).  Rows no segment covers are
 * left untouched.  Segments must lie inside [0, num_rows) and must not
 * overlap.
 */
KVB_API kvb_status kvb_cpu_load_rotate(const kvb_load_seg *segs, int64_t nseg,
                                       int32_t layer, void *dst_k,
                                       void *dst_v, const int64_t *dst_pos,
                                       int64_t num_rows, int32_t num_kv_heads,
                                       int32_t head_size, kvb_dtype dtype,
                                       const kvb_rope *rope);

/* ------------------------------------------------------------------------ */
/* CUDA ops (device pointers; KVB_ERR_UNSUPPORTED when built without CUDA)    */
/* ------------------------------------------------------------------------ */

/* Index arrays (slots, positions, indices) are device arrays of int64.
 * `stream` is a cudaStream_t (NULL = default stream).  The calls enqueue
 * work and do not synchronise unless stated. */

KVB_API kvb_status kvb_cuda_gather(const kvb_paged_layout *layout,
                                   const int64_t *slots, int64_t n,
                                   void *k_out, void *v_out, void *stream);
KVB_API kvb_status kvb_cuda_scatter(const kvb_paged_layout *layout,
                                    const int64_t *slots, int64_t n,
                                    const void *k_in, const void *v_in,
                                    void *stream);
KVB_API kvb_status kvb_cuda_rerotate(void *k, int64_t n, int32_t num_heads,
                                     int32_t head_size, kvb_dtype dtype,
                                     const kvb_rope *rope,
                                     const int64_t *old_pos,
                                     const int64_t *new_pos, void *stream);
KVB_API kvb_status kvb_cuda_deviation(const void *a, const void *b, int64_t n,
                                      int32_t num_heads, int32_t head_size,
                                      kvb_dtype dtype, float *out,
                                      void *stream);
/* The fused load on the device.  `segs` and every pointer inside it and
 * dst_pos are device (or host-mapped) memory; the stored rows may live in
 * device memory or in pinned host memory mapped into the device, or already
 * be in dst_k/dst_v (k0 == NULL, see kvb_load_seg). */
KVB_API kvb_status kvb_cuda_load_rotate(const kvb_load_seg *segs,
                                        int64_t nseg, int32_t layer,
                                        void *dst_k, void *dst_v,
                                        const int64_t *dst_pos,
                                        int64_t num_rows, int32_t num_kv_heads,
                                        int32_t head_size, kvb_dtype dtype,
                                        const kvb_rope *rope, void *stream);

/* kvb_cpu_select on the device (score, forced, out_idx device arrays).
 * The caller gives the number of forced rows, n_forced (0 <= n_forced <= n;
 * the forced mask itself stays on the device), and *count is set on the
 * host to n_forced + min(k, n - n_forced), the number of indices written,
 * so nothing is read back. */
KVB_API kvb_status kvb_cuda_select(const float *score, const uint8_t *forced,
                                   int64_t n, int64_t n_forced, int64_t k,
                                   int64_t *out_idx, void *stream,
                                   int64_t *count);

/* ------------------------------------------------------------------------ */
/* Connector: the hooks vLLM's KV connector calls, per request               */
/* ------------------------------------------------------------------------ */

/* Shape of the model whose KV is blended. */
typedef struct kvb_model_desc {
    int32_t num_layers;
    int32_t num_q_heads;
    int32_t num_kv_heads;
    int32_t head_size;
    kvb_dtype dtype; /* of the KV cache */
    kvb_rope rope;   /* inv_freq is copied by kvb_connector_create */
    /* The model's architecture name (e.g. "LlamaForCausalLM"); NULL or ""
     * when unknown.  Part of the fingerprint, not copied. */
    const char *architecture;
} kvb_model_desc;

typedef struct kvb_connector kvb_connector;
typedef struct kvb_request kvb_request;

/* Creates a connector with its own store sized from `cfg`
 * (LMCACHE_LOCAL_CPU / LMCACHE_MAX_LOCAL_CPU_SIZE, KVBLEND_MAX_DEVICE_SIZE).
 * `device` is -1 for the CPU path or a CUDA device ordinal. */
KVB_API kvb_status kvb_connector_create(const kvb_config *cfg,
                                        const kvb_model_desc *model,
                                        int32_t device, kvb_connector **out);

/* Frees the connector and its store.  NULL is a no-op. */
KVB_API void kvb_connector_free(kvb_connector *conn);

/* The fingerprint of the model the connector was created for: XXH3-64 of
 * its architecture name, layers, heads, head size, dtype and RoPE (style,
 * rotary_dim, frequencies, attention factor).  Each connector owns its
 * store, so its entries only ever serve this model; the fingerprint lets a
 * caller check that the model it drives is still the one the connector was
 * made for. */
KVB_API uint64_t kvb_connector_fingerprint(const kvb_connector *conn);

/* Returns the connector's store (owned by the connector). */
KVB_API kvb_store *kvb_connector_store(kvb_connector *conn);

/* Returns the connector's lower tiers (owned by the connector), NULL when
 * the config names none. */
KVB_API kvb_tiers *kvb_connector_tiers(kvb_connector *conn);

/* Declares the tensor-parallel shard whose KV heads this connector stores
 * (default rank 0 of 1), which sets its tier key
 * (kvb_tier_key(fingerprint, rank, world)).  Call it before the first
 * request.  KVB_ERR_INVALID unless 0 <= rank < world. */
KVB_API kvb_status kvb_connector_set_shard(kvb_connector *conn, int32_t rank,
                                           int32_t world);

/* Mixes an identity of the model's weights (bytes `id[0..len)`, e.g. a
 * digest of the loaded parameters) into the tier key, so that two models
 * of one architecture and shape (a base model and its fine-tune, two
 * quantizations) never share entries in the disk or remote tier; the
 * fingerprint alone covers only architecture, shape, dtype and RoPE.  Call
 * it before the first request; len 0 removes it. */
KVB_API kvb_status kvb_connector_set_model_id(kvb_connector *conn,
                                              const void *id, size_t len);

/* The connector's tier key. */
KVB_API uint64_t kvb_connector_tier_key(const kvb_connector *conn);

/* Sets the separator's token ids (the special string tokenized alone,
 * without BOS).  An empty separator disables splitting (explicit spans
 * only). */
KVB_API kvb_status kvb_connector_set_separator(kvb_connector *conn,
                                               const int32_t *sep,
                                               int64_t sep_len);

/*
 * Scheduler-side lookup, free of side effects: splits `tokens` into segments
 * (on the separator, or uses `spans` when non-NULL) and reports per segment
 * whether it is stored in the tenant namespace `ns` (kvb_namespace; 0 is
 * the default).  Writes up to `cap` spans/hit flags and the segment
 * count to *n_segs, and to *reuse_end the end of the last stored segment
 * capped at n - 1, since the engine must compute at least the last token
 * (0 when nothing is stored).  A prompt shorter than the separator has no
 * segments (*n_segs = 0, *reuse_end = 0); that is not an error.  Blending
 * disabled in the config also gives *reuse_end = 0.
 */
KVB_API kvb_status kvb_connector_lookup(kvb_connector *conn, uint64_t ns,
                                        const int32_t *tokens, int64_t n,
                                        const kvb_span *spans,
                                        int64_t n_spans, kvb_span *segs,
                                        uint8_t *hit, int64_t cap,
                                        int64_t *n_segs, int64_t *reuse_end);

/*
 * Starts the worker-side state of one prefill of `tokens[0..n)` (positions
 * 0..n-1): segments as in kvb_connector_lookup; stored segments are pinned;
 * segments not stored are reserved for saving when `save` is non-zero, all
 * in namespace `ns`.  A stored segment whose checksum no longer matches
 * (KVBLEND_VERIFY_CHECKSUMS) is dropped and recomputed, never loaded.
 * The blend produces rows [0, blend_end): blend_end = `blend_end` when it is
 * >= 0 (the count the scheduler promised the engine; segments evicted since
 * the lookup are then simply recomputed), else the lookup's reuse_end.
 * Ownership: the caller ends it with kvb_request_finish.
 */
KVB_API kvb_status kvb_request_begin(kvb_connector *conn, uint64_t ns,
                                     const int32_t *tokens, int64_t n,
                                     const kvb_span *spans, int64_t n_spans,
                                     int64_t blend_end, int save,
                                     kvb_request **out);

/* Rows the blend covers ([0, blend_end)); 0 means nothing is reused. */
KVB_API int64_t kvb_request_blend_end(const kvb_request *req);

/* Per row of [0, blend_end): 1 when the row has no stored KV (separators,
 * segments not stored, gaps) and must be recomputed at every layer. */
KVB_API const uint8_t *kvb_request_forced(const kvb_request *req);

/* Counts: segments in the prompt, stored segments reused, forced rows. */
KVB_API kvb_status kvb_request_counts(const kvb_request *req,
                                      int64_t *n_segments, int64_t *n_hit,
                                      int64_t *n_forced);

/* The rows of the i-th reused segment, 0 <= i < n_hit of
 * kvb_request_counts, in prompt order: its first row and row count, inside
 * [0, blend_end).  An i out of range is KVB_ERR_INVALID. */
KVB_API kvb_status kvb_request_reused(const kvb_request *req, int64_t i,
                                      int64_t *start, int64_t *num_tokens);

/* Fills the rows of stored segments in dst_k/dst_v [blend_end, num_kv_heads,
 * head_size] with layer `layer`'s stored KV, keys re-rotated to their new
 * positions.  Host pointers for a CPU connector, device pointers (and
 * `stream`) for a CUDA one. */
KVB_API kvb_status kvb_request_load_layer(kvb_request *req, int32_t layer,
                                          void *dst_k, void *dst_v,
                                          void *stream);

/* Copies layer `layer` of every reserved segment out of the engine's paged
 * cache (slots[n] is the request's slot mapping, host memory) into the
 * store.  A segment with a negative slot (rows not computed yet: the
 * request's prefill continues in a later step) is skipped and saved by the
 * call of the step that completes it; the mapping may grow between steps. */
KVB_API kvb_status kvb_request_save_layer(kvb_request *req, int32_t layer,
                                          const kvb_paged_layout *layout,
                                          const int64_t *slots, int64_t n,
                                          void *stream);

/*
 * Commits now the reserved segments saved at every layer (they become
 * visible to lookups; a prompt prefilled over several steps stores each
 * segment as soon as its rows are complete) and writes their count to
 * `*n_committed` (may be NULL).  Segments not complete yet stay reserved.
 */
KVB_API kvb_status kvb_request_commit(kvb_request *req, int64_t *n_committed);

/* Ends the request: with `commit` non-zero, reserved segments that were
 * saved at every layer become visible; others are dropped.  Unpins stored
 * segments and frees `req`.  NULL is a no-op. */
KVB_API void kvb_request_finish(kvb_request *req, int commit);

#ifdef __cplusplus
}
#endif
