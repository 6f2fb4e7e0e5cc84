/*
 * tiers.c: the lower tiers of a connector's store, disk (disk.c) and
 * remote (remote.c), joined: lookups in the order disk, remote, every blob
 * checked before it is handed out; a write-behind thread that serializes
 * committed entries and writes them to both tiers off the request path; per
 * tier counters.
 *
 * Failure policy.  A lower tier only ever costs reuse, never correctness:
 * a server that is down, slow or restarted, an unreadable file, a corrupt
 * or foreign blob all end as a miss (the segment is recomputed) and a
 * counter; a corrupt blob is also deleted from its tier.  The first failure
 * of the remote tier after it worked is logged as a warning (and its return
 * at info), the others at debug, so a server that is down does not flood
 * the log.
 *
 * Write-behind.  kvb_tiers_put_entry queues an entry the caller pinned; the
 * writer thread copies its rows to a host blob (with the caller's copy
 * function, so device-tier rows come through CUDA), seals it, writes it to
 * disk then remote, and unpins the entry.  The queue holds at most
 * TIERS_MAX_JOBS jobs: a write that finds it full is dropped (counted in
 * writes_dropped) rather than holding the request or the entry.
 * kvb_tiers_free drains the queue before it returns, so no pin outlives it.
 *
 * Locking.  `mu` guards the queue and the counters; disk and remote I/O runs
 * without it (both tiers are thread-safe).
 *
 * Views.  A lookup-only view (kvb_tiers_open_view, a vLLM scheduler's) has
 * no writer, never opens the disk tier (it stats the entry's file name per
 * lookup: scanning, cleaning, adopting and evicting are the owners' job)
 * and gives the remote tier at most TIERS_VIEW_TIMEOUT_MS per call.
 */
#define _POSIX_C_SOURCE 200809L /* strdup, stat */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "internal.h"
#include "store.h"
#include "tiers.h"

#define TIERS_DISK 0
#define TIERS_REMOTE 1
#define TIERS_MAX_JOBS 256
#define TIERS_RETRY_MS 1000 /* a down server is tried again after this */
#define TIERS_VIEW_TIMEOUT_MS 100 /* a view's remote timeout, at most */

/* One queued write: an entry to serialize (entry != NULL, pinned) or a
 * ready blob (blob != NULL, owned by the job). */
typedef struct tiers_job {
    struct tiers_job *next;
    kvb_store *store;
    kvb_entry *entry;
    kvb_blob_shape shape;
    kvb_move_fn copy;
    void *copy_ctx;
    uint64_t key;
    uint64_t hash;
    void *blob;
    size_t len;
    int to_disk;
    int to_remote;
} tiers_job;

struct kvb_tiers {
    kvb_disk *disk;
    char *view_dir;  /* a lookup-only view's disk folder (stat per lookup) */
    kvb_remote *remote;
    pthread_mutex_t mu;
    pthread_cond_t work; /* a job was queued, or stop */
    pthread_cond_t idle; /* the queue drained */
    pthread_t writer;
    int has_writer;
    int stop;
    int busy; /* the writer holds a job outside the queue */
    tiers_job *head;
    tiers_job *tail;
    int64_t queued;
    int remote_down; /* the last remote call failed */
    kvb_tier_stats stats[2];
};

/* Mixes a model fingerprint with a tensor-parallel shard; see kvblend.h. */
uint64_t kvb_tier_key(uint64_t fingerprint, int32_t rank, int32_t world)
{
    int64_t v[3] = {(int64_t)fingerprint, rank, world};
    return kvb_checksum(v, sizeof v, 0x7469657273ULL);
}

/* Adds `d` to counter `field` of tier `tier` under the lock. */
#define TIERS_COUNT(t, tier, field, d)          \
    do {                                        \
        pthread_mutex_lock(&(t)->mu);           \
        (t)->stats[(tier)].field += (d);        \
        pthread_mutex_unlock(&(t)->mu);         \
    } while (0)

/* Records the outcome of a remote call: logs the first failure after a
 * success as a warning and the first success after a failure as info. */
static void tiers_remote_outcome(kvb_tiers *t, kvb_status st)
{
    pthread_mutex_lock(&t->mu);
    int was_down = t->remote_down;
    t->remote_down = st == KVB_ERR_IO;
    if (st == KVB_ERR_IO) {
        t->stats[TIERS_REMOTE].errors++;
    }
    pthread_mutex_unlock(&t->mu);
    if (st == KVB_ERR_IO && !was_down) {
        kvb_log(KVB_LOG_WARNING,
                "remote tier %s: %s; its chunks are recomputed until it "
                "answers again",
                kvb_remote_name(t->remote), kvb_last_error());
    } else if (st == KVB_ERR_IO) {
        kvb_log(KVB_LOG_DEBUG, "remote tier %s: %s",
                kvb_remote_name(t->remote), kvb_last_error());
    } else if (was_down) {
        kvb_log(KVB_LOG_INFO, "remote tier %s answers again",
                kvb_remote_name(t->remote));
    }
}

/* Writes one blob to the tiers the job names and counts the outcome. */
static void tiers_write(kvb_tiers *t, const tiers_job *j, const void *blob,
                        size_t len)
{
    if (j->to_disk && t->disk != NULL) {
        kvb_status st = kvb_disk_put(t->disk, j->key, j->hash, blob, len);
        if (st != KVB_OK) {
            kvb_log(KVB_LOG_WARNING, "disk tier: %s", kvb_last_error());
        }
        pthread_mutex_lock(&t->mu);
        if (st == KVB_OK) {
            t->stats[TIERS_DISK].writes++;
            t->stats[TIERS_DISK].bytes_written += len;
        } else {
            t->stats[TIERS_DISK].write_errors++;
        }
        pthread_mutex_unlock(&t->mu);
    }
    if (j->to_remote && t->remote != NULL) {
        kvb_status st = kvb_remote_put(t->remote, j->key, j->hash, blob, len);
        tiers_remote_outcome(t, st);
        pthread_mutex_lock(&t->mu);
        if (st == KVB_OK) {
            t->stats[TIERS_REMOTE].writes++;
            t->stats[TIERS_REMOTE].bytes_written += len;
        } else {
            t->stats[TIERS_REMOTE].write_errors++;
        }
        pthread_mutex_unlock(&t->mu);
    }
}

/*
 * Serializes a pinned entry into a new blob (NULL when memory or the copy
 * of its rows fails, which is logged).  The rows are copied with the job's
 * copy function from the entry's tier into host memory.
 */
static void *tiers_serialize(const tiers_job *j, size_t *len)
{
    kvb_entry *e = j->entry;
    int64_t n = kvb_entry_num_tokens(e);
    size_t size = kvb_blob_size(&j->shape, n);
    unsigned char *blob = size > 0 ? malloc(size) : NULL;
    if (blob == NULL) {
        kvb_log(KVB_LOG_WARNING, "lower tiers: no memory for a %zu-byte "
                "entry; not written", size);
        return NULL;
    }
    kvb_blob_init(blob, &j->shape, j->key, j->hash, kvb_entry_tokens(e),
                  kvb_entry_positions(e), n);
    size_t rows = size - kvb_blob_rows_offset(n);
    /* The rows of all layers are one block in the entry: K, V per layer. */
    if (j->copy(blob + kvb_blob_rows_offset(n), kvb_entry_k(e, 0), rows,
                KVB_TIER_HOST, kvb_entry_tier(e), j->copy_ctx) != 0) {
        kvb_log(KVB_LOG_WARNING, "lower tiers: copying a %zu-byte entry "
                "out of the %s tier failed; not written", rows,
                kvb_entry_tier(e) == KVB_TIER_DEVICE ? "device" : "host");
        free(blob);
        return NULL;
    }
    kvb_blob_seal(blob, size);
    *len = size;
    return blob;
}

/* Runs one job: serializes its entry (then unpins it) or takes its blob,
 * writes it and frees everything. */
static void tiers_run(kvb_tiers *t, tiers_job *j)
{
    void *blob = j->blob;
    size_t len = j->len;
    if (j->entry != NULL) {
        blob = tiers_serialize(j, &len);
        kvb_store_unpin(j->store, j->entry);
        if (blob == NULL) {
            if (j->to_disk && t->disk != NULL) {
                TIERS_COUNT(t, TIERS_DISK, write_errors, 1);
            }
            if (j->to_remote && t->remote != NULL) {
                TIERS_COUNT(t, TIERS_REMOTE, write_errors, 1);
            }
        }
    }
    if (blob != NULL) {
        tiers_write(t, j, blob, len);
    }
    free(blob);
    free(j);
}

/* The writer thread: runs queued jobs in order until stopped and drained. */
static void *tiers_writer(void *arg)
{
    kvb_tiers *t = arg;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (t->head == NULL && !t->stop) {
            pthread_cond_wait(&t->work, &t->mu);
        }
        if (t->head == NULL) { /* stopped and drained */
            break;
        }
        tiers_job *j = t->head;
        t->head = j->next;
        if (t->head == NULL) {
            t->tail = NULL;
        }
        t->queued--;
        t->busy = 1;
        pthread_mutex_unlock(&t->mu);
        tiers_run(t, j);
        pthread_mutex_lock(&t->mu);
        t->busy = 0;
        if (t->head == NULL) {
            pthread_cond_broadcast(&t->idle);
        }
    }
    pthread_cond_broadcast(&t->idle);
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* Opens the tiers `cfg` names, or (view) a lookup-only view of them. */
static kvb_status tiers_open(const kvb_config *cfg, int view, kvb_tiers **out)
{
    if (cfg == NULL || out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_tiers_open: NULL cfg or out");
    }
    *out = NULL;
    kvb_status st = kvb_config_validate(cfg);
    if (st != KVB_OK) {
        return st;
    }
    if (cfg->local_disk[0] == '\0' && cfg->remote_url[0] == '\0') {
        return KVB_OK;
    }
    kvb_tiers *t = calloc(1, sizeof *t);
    if (t == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "kvb_tiers_open: out of memory");
    }
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->work, NULL);
    pthread_cond_init(&t->idle, NULL);
    if (cfg->local_disk[0] != '\0' && view) {
        t->view_dir = strdup(cfg->local_disk);
        st = t->view_dir != NULL
                 ? KVB_OK
                 : kvb_fail(KVB_ERR_NOMEM, "kvb_tiers_open: out of memory");
        t->stats[TIERS_DISK].enabled = st == KVB_OK;
    } else if (cfg->local_disk[0] != '\0') {
        double b = cfg->max_local_disk_size_gb * 1073741824.0;
        size_t budget = b >= (double)SIZE_MAX ? SIZE_MAX : (size_t)b;
        st = kvb_disk_open(cfg->local_disk, budget, &t->disk);
        t->stats[TIERS_DISK].enabled = st == KVB_OK;
    }
    if (st == KVB_OK && cfg->remote_url[0] != '\0') {
        /* a view answers a scheduler, which must not wait on a slow server */
        int ms = view && cfg->remote_timeout_ms > TIERS_VIEW_TIMEOUT_MS
                     ? TIERS_VIEW_TIMEOUT_MS
                     : cfg->remote_timeout_ms;
        kvb_remote_options o = {
            .connect_timeout_ms = ms,
            .command_timeout_ms = ms,
            .part_bytes = (size_t)(cfg->remote_part_size_mb * 1048576.0),
            .retry_ms = TIERS_RETRY_MS,
        };
        st = kvb_remote_open(cfg->remote_url, &o, &t->remote);
        t->stats[TIERS_REMOTE].enabled = st == KVB_OK;
    }
    if (st == KVB_OK && !view) {
        if (pthread_create(&t->writer, NULL, tiers_writer, t) != 0) {
            st = kvb_fail(KVB_ERR_NOMEM, "kvb_tiers_open: cannot start the "
                          "write-behind thread");
        } else {
            t->has_writer = 1;
        }
    }
    if (st != KVB_OK) {
        kvb_tiers_free(t);
        return st;
    }
    *out = t;
    return KVB_OK;
}

/* Opens the tiers `cfg` names; see kvblend.h. */
kvb_status kvb_tiers_open(const kvb_config *cfg, kvb_tiers **out)
{
    return tiers_open(cfg, 0, out);
}

/* Opens a lookup-only view of the tiers; see kvblend.h. */
kvb_status kvb_tiers_open_view(const kvb_config *cfg, kvb_tiers **out)
{
    return tiers_open(cfg, 1, out);
}

/* Drains the write queue, stops the writer, closes the tiers. */
void kvb_tiers_free(kvb_tiers *tiers)
{
    if (tiers == NULL) {
        return;
    }
    if (tiers->has_writer) {
        pthread_mutex_lock(&tiers->mu);
        tiers->stop = 1;
        pthread_cond_broadcast(&tiers->work);
        pthread_mutex_unlock(&tiers->mu);
        pthread_join(tiers->writer, NULL);
    }
    kvb_disk_close(tiers->disk);
    free(tiers->view_dir);
    kvb_remote_close(tiers->remote);
    pthread_cond_destroy(&tiers->idle);
    pthread_cond_destroy(&tiers->work);
    pthread_mutex_destroy(&tiers->mu);
    free(tiers);
}

/* Whether a lower tier holds (key, hash); see kvblend.h. */
kvb_status kvb_tiers_contains(kvb_tiers *tiers, uint64_t key, uint64_t hash,
                              int *found)
{
    if (tiers == NULL || found == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_tiers_contains: NULL tiers or found");
    }
    *found = tiers->disk != NULL && kvb_disk_contains(tiers->disk, key, hash);
    if (tiers->view_dir != NULL) {
        /* a view only looks: the owning processes index, adopt and evict */
        *found = kvb_disk_file_exists(tiers->view_dir, key, hash);
    }
    if (!*found && tiers->remote != NULL) {
        kvb_status st = kvb_remote_contains(tiers->remote, key, hash, found);
        tiers_remote_outcome(tiers, st);
        if (st != KVB_OK) {
            *found = 0; /* counted; a lookup never fails for a down server */
        }
    }
    return KVB_OK;
}

/* Checks a blob read from tier `tier`; a bad one is deleted there, counted
 * and logged.  Returns 1 when it may be loaded. */
static int tiers_accept(kvb_tiers *t, int tier, const void *blob, size_t len,
                        uint64_t key, uint64_t hash,
                        const kvb_blob_shape *shape, const int32_t *tokens,
                        int64_t n)
{
    const char *why = NULL;
    if (kvb_blob_check(blob, len, key, hash, shape, tokens, n, &why)) {
        pthread_mutex_lock(&t->mu);
        t->stats[tier].hits++;
        t->stats[tier].bytes_read += len;
        pthread_mutex_unlock(&t->mu);
        return 1;
    }
    if (tier == TIERS_DISK) {
        kvb_disk_drop(t->disk, key, hash);
    } else {
        (void)kvb_remote_del(t->remote, key, hash);
    }
    TIERS_COUNT(t, tier, corrupt, 1);
    kvb_log(KVB_LOG_WARNING,
            "%s tier: entry %016llx-%016llx dropped, not loaded: %s; the "
            "segment is recomputed",
            tier == TIERS_DISK ? "disk" : "remote", (unsigned long long)key,
            (unsigned long long)hash, why);
    return 0;
}

/* Finds, reads and checks an entry, disk first; see tiers.h. */
kvb_status kvb_tiers_fetch(kvb_tiers *tiers, uint64_t key, uint64_t hash,
                           const kvb_blob_shape *shape, const int32_t *tokens,
                           int64_t n, void **blob, size_t *len, int *remote)
{
    if (tiers == NULL || shape == NULL || tokens == NULL || blob == NULL ||
        len == NULL || remote == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_tiers_fetch: NULL argument");
    }
    *blob = NULL;
    *len = 0;
    *remote = 0;
    if (tiers->disk != NULL) {
        void *b = NULL;
        size_t l = 0;
        kvb_status st = KVB_OK;
        if (kvb_disk_contains(tiers->disk, key, hash)) {
            st = kvb_disk_get(tiers->disk, key, hash, &b, &l);
        }
        pthread_mutex_lock(&tiers->mu);
        tiers->stats[TIERS_DISK].lookups++;
        tiers->stats[TIERS_DISK].misses += b == NULL;
        tiers->stats[TIERS_DISK].errors += st != KVB_OK;
        pthread_mutex_unlock(&tiers->mu);
        if (b != NULL) {
            if (tiers_accept(tiers, TIERS_DISK, b, l, key, hash, shape,
                             tokens, n)) {
                *blob = b;
                *len = l;
                return KVB_OK;
            }
            free(b);
        }
    }
    if (tiers->remote != NULL) {
        void *b = NULL;
        size_t l = 0;
        kvb_status st = kvb_remote_get(tiers->remote, key, hash, &b, &l);
        tiers_remote_outcome(tiers, st);
        pthread_mutex_lock(&tiers->mu);
        tiers->stats[TIERS_REMOTE].lookups++;
        tiers->stats[TIERS_REMOTE].misses += b == NULL;
        pthread_mutex_unlock(&tiers->mu);
        if (b != NULL) {
            if (tiers_accept(tiers, TIERS_REMOTE, b, l, key, hash, shape,
                             tokens, n)) {
                *blob = b;
                *len = l;
                *remote = 1;
                return KVB_OK;
            }
            free(b);
        }
    }
    return KVB_OK;
}

/* Queues `j`, or drops it when the queue is full or the writer stopped.
 * Returns 1 when queued. */
static int tiers_enqueue(kvb_tiers *t, tiers_job *j)
{
    pthread_mutex_lock(&t->mu);
    int ok = t->has_writer && !t->stop && t->queued < TIERS_MAX_JOBS;
    if (ok) {
        j->next = NULL;
        if (t->tail != NULL) {
            t->tail->next = j;
        } else {
            t->head = j;
        }
        t->tail = j;
        t->queued++;
        pthread_cond_signal(&t->work);
    } else {
        if (j->to_disk && t->disk != NULL) {
            t->stats[TIERS_DISK].writes_dropped++;
        }
        if (j->to_remote && t->remote != NULL) {
            t->stats[TIERS_REMOTE].writes_dropped++;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return ok;
}

/* Queues a pinned entry for writing to every tier; see tiers.h. */
void kvb_tiers_put_entry(kvb_tiers *tiers, kvb_store *store, kvb_entry *entry,
                         uint64_t key, const kvb_blob_shape *shape,
                         kvb_move_fn copy, void *copy_ctx)
{
    tiers_job *j = calloc(1, sizeof *j);
    if (j != NULL) {
        *j = (tiers_job){.store = store, .entry = entry, .shape = *shape,
                         .copy = copy, .copy_ctx = copy_ctx, .key = key,
                         .hash = kvb_entry_hash(entry), .to_disk = 1,
                         .to_remote = 1};
    }
    if (j == NULL || !tiers_enqueue(tiers, j)) {
        free(j);
        kvb_store_unpin(store, entry);
    }
}

/* Takes back a blob kvb_tiers_fetch returned; see tiers.h. */
void kvb_tiers_recycle(kvb_tiers *tiers, void *blob, size_t len,
                       uint64_t key, uint64_t hash, int remote)
{
    if (blob == NULL) {
        return;
    }
    if (!remote || tiers->disk == NULL) {
        free(blob);
        return;
    }
    tiers_job *j = calloc(1, sizeof *j);
    if (j == NULL) {
        free(blob);
        return;
    }
    *j = (tiers_job){.key = key, .hash = hash, .blob = blob, .len = len,
                     .to_disk = 1};
    if (!tiers_enqueue(tiers, j)) {
        free(blob);
        free(j);
    }
}

/* Waits until every queued write is done; see kvblend.h. */
kvb_status kvb_tiers_flush(kvb_tiers *tiers)
{
    if (tiers == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_tiers_flush: NULL tiers");
    }
    pthread_mutex_lock(&tiers->mu);
    while (tiers->has_writer && (tiers->head != NULL || tiers->busy)) {
        pthread_cond_wait(&tiers->idle, &tiers->mu);
    }
    pthread_mutex_unlock(&tiers->mu);
    return KVB_OK;
}

/* Copies the counters; see kvblend.h. */
kvb_status kvb_tiers_get_stats(kvb_tiers *tiers, kvb_tier_stats *disk,
                               kvb_tier_stats *remote)
{
    if (tiers == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_tiers_get_stats: NULL tiers");
    }
    pthread_mutex_lock(&tiers->mu);
    kvb_tier_stats d = tiers->stats[TIERS_DISK];
    kvb_tier_stats r = tiers->stats[TIERS_REMOTE];
    pthread_mutex_unlock(&tiers->mu);
    if (tiers->disk != NULL) {
        size_t bytes = 0;
        kvb_disk_usage(tiers->disk, &d.entries, &bytes);
        d.bytes = bytes;
    }
    if (disk != NULL) {
        *disk = d;
    }
    if (remote != NULL) {
        *remote = r;
    }
    return KVB_OK;
}
