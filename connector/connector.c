/*
 * connector.c: the hook layer vLLM's KV connector calls.  A kvb_connector
 * owns the chunk store, the separator and the model's shape; a kvb_request
 * is the worker-side state of one prefill: its segments, the stored entries
 * it reuses (pinned for its lifetime), the rows that must be recomputed, and
 * the entries it fills for segments seen for the first time.
 *
 * The scheduler process only calls kvb_connector_lookup (no side effects);
 * the worker calls kvb_request_begin, then per layer kvb_request_load_layer
 * and kvb_request_save_layer, and kvb_request_finish at the end.
 *
 * What depends on where the rows live (the store's tier memory, the
 * per-layer load and save, copies for the lower tiers) is the connector's
 * backend's (backend.h): CPU or CUDA, picked once by kvb_connector_create.
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t */

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "backend.h"
#include "tiers.h"

/* Bytes in a size given in GB (LMCache counts 1 GB as 2^30 bytes).  Values
 * were validated as finite and >= 0 by the config parser. */
static size_t gb_to_bytes(double gb)
{
    double b = gb * 1073741824.0;
    if (!(b > 0)) {
        return 0;
    }
    if (b >= (double)SIZE_MAX) {
        return SIZE_MAX;
    }
    return (size_t)b;
}

/* KVBLEND_VERIFY_CHECKSUMS resolved: "auto" is on for CPU connectors
 * (hashing costs far less than a CPU prefill) and in debug builds, off for
 * device connectors, whose hits would wait on the host hashing their rows. */
static int connector_checksums(const kvb_config *cfg, int32_t device)
{
    if (cfg->verify_checksums >= 0) {
        return cfg->verify_checksums;
    }
#ifndef NDEBUG
    (void)device;
    return 1;
#else
    return device < 0;
#endif
}

/* XXH3 of the model's identity: architecture, shape, dtype and RoPE. */
static uint64_t model_fingerprint(const kvb_model_desc *m)
{
    const char *arch = m->architecture != NULL ? m->architecture : "";
    int32_t shape[7] = {m->num_layers,   m->num_q_heads,    m->num_kv_heads,
                        m->head_size,    (int32_t)m->dtype, m->rope.rotary_dim,
                        (int32_t)m->rope.style};
    uint64_t h = kvb_checksum(arch, strlen(arch), 0x6b76626c656e64ULL);
    h = kvb_checksum(shape, sizeof shape, h);
    h = kvb_checksum(m->rope.inv_freq,
                     (size_t)(m->rope.rotary_dim / 2) * sizeof(float), h);
    return kvb_checksum(&m->rope.attention_factor,
                        sizeof m->rope.attention_factor, h);
}

/* Creates a connector: validates the model description, copies the rotary
 * table and creates the store.  See kvblend.h. */
kvb_status kvb_connector_create(const kvb_config *cfg,
                                const kvb_model_desc *model, int32_t device,
                                kvb_connector **out)
{
    if (out == NULL || cfg == NULL || model == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_create: NULL cfg, model or out");
    }
    *out = NULL;
    kvb_status st = kvb_config_validate(cfg);
    if (st != KVB_OK) {
        return st;
    }
    if (model->num_layers <= 0 || model->num_q_heads <= 0 ||
        model->num_kv_heads <= 0 || model->head_size <= 0 ||
        model->num_q_heads % model->num_kv_heads != 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "model: num_layers=%d, num_q_heads=%d, "
                        "num_kv_heads=%d, head_size=%d: expected positive "
                        "values with num_q_heads a multiple of num_kv_heads",
                        (int)model->num_layers, (int)model->num_q_heads,
                        (int)model->num_kv_heads, (int)model->head_size);
    }
    st = kvb_check_dtype(model->dtype, "model.dtype");
    if (st != KVB_OK) {
        return st;
    }
    const kvb_rope *r = &model->rope;
    if (r->rotary_dim <= 0 || r->rotary_dim % 2 != 0 ||
        r->rotary_dim > model->head_size || r->inv_freq == NULL ||
        (r->style != KVB_ROPE_NEOX && r->style != KVB_ROPE_GPTJ)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "model.rope: rotary_dim=%d (head_size %d), style=%d, "
                        "inv_freq %s: expected an even rotary_dim in "
                        "(0, head_size], style 0 (neox) or 1 (gptj) and a "
                        "frequency table",
                        (int)r->rotary_dim, (int)model->head_size,
                        (int)r->style, r->inv_freq ? "set" : "NULL");
    }
    for (int i = 0; i < r->rotary_dim / 2; i++) {
        if (!isfinite(r->inv_freq[i])) {
            return kvb_fail(KVB_ERR_INVALID,
                            "model.rope.inv_freq[%d] = %g is not finite", i,
                            (double)r->inv_freq[i]);
        }
    }
    if (device >= 0 && !kvb_has_cuda()) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "device %d requested but libkvblend was built "
                        "without CUDA",
                        (int)device);
    }
    kvb_connector *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "kvb_connector_create: out of memory");
    }
    if (pthread_rwlock_init(&c->sep_lock, NULL) != 0) {
        free(c);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_connector_create: no lock");
    }
    c->cfg = *cfg;
    c->model = *model;
    c->model.architecture = NULL; /* not owned; only the fingerprint keeps it */
    c->fingerprint = model_fingerprint(model);
    c->device = device < 0 ? -1 : device;
    c->be = c->device >= 0 ? &kvb_backend_cuda : &kvb_backend_cpu;
    c->checksums = connector_checksums(cfg, c->device);
    c->inv_freq = malloc((size_t)(r->rotary_dim / 2) * sizeof(float));
    if (c->inv_freq == NULL) {
        pthread_rwlock_destroy(&c->sep_lock);
        free(c);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_connector_create: out of memory");
    }
    memcpy(c->inv_freq, r->inv_freq,
           (size_t)(r->rotary_dim / 2) * sizeof(float));
    c->model.rope.inv_freq = c->inv_freq;
    kvb_store_params sp = {
        .num_layers = model->num_layers,
        .num_kv_heads = model->num_kv_heads,
        .head_size = model->head_size,
        .dtype = model->dtype,
        .host_budget_bytes =
            cfg->local_cpu ? gb_to_bytes(cfg->max_local_cpu_size_gb) : 0,
        .device_budget_bytes = gb_to_bytes(cfg->max_device_size_gb),
        .checksums = c->checksums,
    };
    st = kvb_store_create(&sp, &c->store);
    if (st != KVB_OK) {
        pthread_rwlock_destroy(&c->sep_lock);
        free(c->inv_freq);
        free(c);
        return st;
    }
    if (c->be->init != NULL && (st = c->be->init(c, &sp)) != KVB_OK) {
        kvb_connector_free(c);
        return st;
    }
    c->world = 1;
    c->tier_key = kvb_tier_key(c->fingerprint, 0, 1);
    st = kvb_tiers_open(cfg, &c->tiers);
    if (st != KVB_OK) {
        kvb_connector_free(c);
        return st;
    }
    /* KVBLEND_LOG_LEVEL; the host program's sink, if any, stays */
    kvb_set_log_level(cfg->log_level);
    kvb_config_log_compat(cfg);
    /* KVBLEND_NUM_THREADS (validated above) caps the CPU ops' threads;
     * the setting is process-wide, the last connector's wins. */
    (void)kvb_cpu_set_threads(cfg->num_threads);
    *out = c;
    return KVB_OK;
}

/* Frees the connector, its store, separator and rotary table. */
void kvb_connector_free(kvb_connector *conn)
{
    if (conn == NULL) {
        return;
    }
    /* The write-behind thread holds pins on store entries: it finishes
     * first. */
    kvb_tiers_free(conn->tiers);
    kvb_store_free(conn->store); /* returns every block to the backend */
    if (conn->be->free != NULL) {
        conn->be->free(conn);
    }
    free(conn->sep);
    free(conn->inv_freq);
    pthread_rwlock_destroy(&conn->sep_lock);
    free(conn);
}

/* The model fingerprint; see kvblend.h. */
uint64_t kvb_connector_fingerprint(const kvb_connector *conn)
{
    return conn == NULL ? 0 : conn->fingerprint;
}

/* Returns the connector's store. */
kvb_store *kvb_connector_store(kvb_connector *conn)
{
    return conn == NULL ? NULL : conn->store;
}

/* Returns the connector's lower tiers (NULL when none). */
kvb_tiers *kvb_connector_tiers(kvb_connector *conn)
{
    return conn == NULL ? NULL : conn->tiers;
}

/* Recomputes the tier key from the fingerprint, the weights identity and
 * the shard. */
static void connector_update_tier_key(kvb_connector *c)
{
    uint64_t fp = c->model_id != 0
                      ? kvb_checksum(&c->model_id, sizeof c->model_id,
                                     c->fingerprint)
                      : c->fingerprint;
    c->tier_key = kvb_tier_key(fp, c->rank, c->world);
}

/* Sets the shard that names this connector's entries in the tiers. */
kvb_status kvb_connector_set_shard(kvb_connector *conn, int32_t rank,
                                   int32_t world)
{
    if (conn == NULL || world < 1 || rank < 0 || rank >= world) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_set_shard: rank=%d, world=%d; "
                        "expected 0 <= rank < world",
                        (int)rank, (int)world);
    }
    conn->rank = rank;
    conn->world = world;
    connector_update_tier_key(conn);
    return KVB_OK;
}

/* Mixes the identity of the model's weights into the tier key. */
kvb_status kvb_connector_set_model_id(kvb_connector *conn, const void *id,
                                      size_t len)
{
    if (conn == NULL || (id == NULL && len > 0)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_set_model_id: NULL connector or id");
    }
    conn->model_id = len > 0 ? kvb_checksum(id, len, 0x6d6f64656cULL) : 0;
    connector_update_tier_key(conn);
    return KVB_OK;
}

/* The tier key; see kvblend.h. */
uint64_t kvb_connector_tier_key(const kvb_connector *conn)
{
    return conn == NULL ? 0 : conn->tier_key;
}

/* The shape of the connector's entries, as the lower tiers check it. */
static kvb_blob_shape connector_shape(const kvb_connector *c)
{
    kvb_blob_shape s = {c->model.num_layers, c->model.num_kv_heads,
                        c->model.head_size, c->model.dtype};
    return s;
}

/*
 * Loads segment tokens[0..n) of namespace `ns` from the lower tiers into a
 * new store entry and returns it pinned in *entry (NULL when no tier has a
 * loadable copy or the store has no room: the segment is then recomputed).
 * Errors of the tiers are counted and logged there, never returned.
 */
static kvb_status connector_fetch(kvb_connector *c, uint64_t ns,
                                  const int32_t *tokens, int64_t n,
                                  kvb_entry **entry)
{
    *entry = NULL;
    uint64_t hash = kvb_hash_tokens_ns(tokens, n, ns);
    kvb_blob_shape shape = connector_shape(c);
    void *blob = NULL;
    size_t len = 0;
    int remote = 0;
    kvb_status st = kvb_tiers_fetch(c->tiers, c->tier_key, hash, &shape,
                                    tokens, n, &blob, &len, &remote);
    if (st != KVB_OK || blob == NULL) {
        return st;
    }
    const unsigned char *b = blob;
    kvb_entry *e = NULL;
    st = kvb_store_reserve(c->store, ns, tokens, n,
                           (const int64_t *)(b + kvb_blob_positions_offset(n)),
                           &e);
    if (st == KVB_OK && e == NULL) {
        /* stored meanwhile (another request, or the same segment earlier
         * in this prompt): use that one; NULL when there was no room */
        st = kvb_store_acquire(c->store, ns, tokens, n, &e);
        kvb_tiers_recycle(c->tiers, blob, len, c->tier_key, hash, remote);
        *entry = e;
        return st;
    }
    if (st == KVB_OK && e != NULL) {
        size_t rows = len - kvb_blob_rows_offset(n);
        if (c->be->copy(kvb_entry_k(e, 0), b + kvb_blob_rows_offset(n), rows,
                        kvb_entry_tier(e), KVB_TIER_HOST, c) != 0) {
            kvb_store_abort(c->store, e);
            e = NULL;
        } else if ((st = kvb_store_commit_pinned(c->store, e)) != KVB_OK) {
            kvb_store_abort(c->store, e);
            e = NULL;
        }
    }
    kvb_tiers_recycle(c->tiers, blob, len, c->tier_key, hash, remote);
    *entry = e;
    return st;
}

/* Replaces the separator with a copy of `sep`. */
kvb_status kvb_connector_set_separator(kvb_connector *conn,
                                       const int32_t *sep, int64_t sep_len)
{
    if (conn == NULL || sep_len < 0 || (sep_len > 0 && sep == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_set_separator: bad arguments "
                        "(sep_len=%lld)",
                        (long long)sep_len);
    }
    int32_t *copy = NULL;
    if (sep_len > 0) {
        copy = malloc((size_t)sep_len * sizeof *copy);
        if (copy == NULL) {
            return kvb_fail(KVB_ERR_NOMEM, "separator: out of memory");
        }
        memcpy(copy, sep, (size_t)sep_len * sizeof *copy);
    }
    pthread_rwlock_wrlock(&conn->sep_lock);
    int32_t *old = conn->sep;
    conn->sep = copy;
    conn->sep_len = sep_len;
    pthread_rwlock_unlock(&conn->sep_lock);
    free(old);
    return KVB_OK;
}

/*
 * Splits a prompt into segments into a freshly allocated array: explicit
 * spans when given (checked), else on the separator.  No separator set, or a
 * prompt shorter than it, gives no segments.  *segs_out is NULL when
 * *nseg_out is 0; the caller frees it.
 */
static kvb_status split_on_separator(const kvb_connector *conn,
                                     const int32_t *tokens, int64_t n,
                                     kvb_span **segs_out, int64_t *nseg_out);

static kvb_status split_prompt(kvb_connector *conn,
                               const int32_t *tokens, int64_t n,
                               const kvb_span *spans, int64_t n_spans,
                               kvb_span **segs_out, int64_t *nseg_out)
{
    *segs_out = NULL;
    *nseg_out = 0;
    if (spans != NULL) {
        kvb_status st = kvb_segment_check(spans, n_spans, n);
        if (st != KVB_OK) {
            return st;
        }
        if (n_spans == 0) {
            return KVB_OK;
        }
        kvb_span *segs = malloc((size_t)n_spans * sizeof *segs);
        if (segs == NULL) {
            return kvb_fail(KVB_ERR_NOMEM, "segments: out of memory");
        }
        memcpy(segs, spans, (size_t)n_spans * sizeof *segs);
        *segs_out = segs;
        *nseg_out = n_spans;
        return KVB_OK;
    }
    pthread_rwlock_rdlock(&conn->sep_lock);
    kvb_status st = split_on_separator(conn, tokens, n, segs_out, nseg_out);
    pthread_rwlock_unlock(&conn->sep_lock);
    return st;
}

/* split_prompt's separator case; the caller holds sep_lock for reading. */
static kvb_status split_on_separator(const kvb_connector *conn,
                                     const int32_t *tokens, int64_t n,
                                     kvb_span **segs_out, int64_t *nseg_out)
{
    if (conn->sep_len == 0 || n < conn->sep_len || n == 0) {
        return KVB_OK;
    }
    int64_t count = 0;
    kvb_status st = kvb_segment_split(tokens, n, conn->sep, conn->sep_len,
                                      NULL, 0, &count);
    if (st != KVB_OK && count == 0) {
        return st;
    }
    if (count == 0) {
        return KVB_OK;
    }
    kvb_span *segs = malloc((size_t)count * sizeof *segs);
    if (segs == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "segments: out of memory");
    }
    st = kvb_segment_split(tokens, n, conn->sep, conn->sep_len, segs, count,
                           &count);
    if (st != KVB_OK) {
        free(segs);
        return st;
    }
    *segs_out = segs;
    *nseg_out = count;
    return KVB_OK;
}

/* Scheduler-side lookup without side effects.  See kvblend.h. */
kvb_status kvb_connector_lookup(kvb_connector *conn, uint64_t ns,
                                const int32_t *tokens, int64_t n,
                                const kvb_span *spans, int64_t n_spans,
                                kvb_span *segs, uint8_t *hit, int64_t cap,
                                int64_t *n_segs,
                                int64_t *reuse_end)
{
    if (conn == NULL || n_segs == NULL || reuse_end == NULL || n < 0 ||
        (n > 0 && tokens == NULL) || cap < 0 ||
        (cap > 0 && (segs == NULL || hit == NULL))) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_lookup: bad arguments (n=%lld, "
                        "cap=%lld)",
                        (long long)n, (long long)cap);
    }
    *n_segs = 0;
    *reuse_end = 0;
    kvb_span *all = NULL;
    int64_t nseg = 0;
    kvb_status st = split_prompt(conn, tokens, n, spans, n_spans, &all, &nseg);
    if (st != KVB_OK) {
        return st;
    }
    int64_t end = 0;
    for (int64_t i = 0; i < nseg; i++) {
        int found = 0;
        st = kvb_store_contains(conn->store, ns,
                                tokens + all[i].start,
                                all[i].end - all[i].start, &found);
        if (st == KVB_OK && !found && conn->tiers != NULL &&
            conn->cfg.enable_blending) {
            st = kvb_tiers_contains(
                conn->tiers, conn->tier_key,
                kvb_hash_tokens_ns(tokens + all[i].start,
                                   all[i].end - all[i].start, ns),
                &found);
        }
        if (st != KVB_OK) {
            free(all);
            return st;
        }
        if (i < cap) {
            segs[i] = all[i];
            hit[i] = (uint8_t)(found != 0);
        }
        if (found && conn->cfg.enable_blending) {
            end = all[i].end;
        }
    }
    free(all);
    *n_segs = nseg;
    *reuse_end = end < n ? end : (n > 0 ? n - 1 : 0);
    if (nseg > cap) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_connector_lookup: %lld segments do not fit in "
                        "cap=%lld",
                        (long long)nseg, (long long)cap);
    }
    return KVB_OK;
}

/* A connector whose store checksums its entries, or whose entries go to
 * the lower tiers, waits for the request's queued gathers before
 * committing (they write the rows the store hashes or the tiers copy). */
static kvb_status request_sync_saves(kvb_request *req)
{
    const kvb_connector *c = req->conn;
    /* the lower tiers' writer copies and seals the rows: they must have
     * landed too, or a blob would carry half-written rows under a valid
     * checksum */
    if (c->be->sync == NULL || (!c->checksums && c->tiers == NULL)) {
        return KVB_OK;
    }
    return c->be->sync(req);
}

/* Lower-tier loads of one request run on up to this many threads: each
 * segment's blob is read (disk, or Redis over one of the remote tier's
 * pooled connections), checked and copied into memory concurrently with
 * the others'.  Fewer on small machines (connector_fetch_threads): on 2
 * cores four threads made the loads 3-6x slower (their fresh buffers'
 * page faults and the blend's own threads compete), on 16 they help. */
#define CONNECTOR_FETCH_THREADS 4

/* Threads for a request's lower-tier loads: one per 4 online cores, 1 to
 * CONNECTOR_FETCH_THREADS. */
static int connector_fetch_threads(void)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long t = cores / 4;
    return t < 1 ? 1 : t > CONNECTOR_FETCH_THREADS ? CONNECTOR_FETCH_THREADS
                                                   : (int)t;
}

/* One thread's share of a request's lower-tier loads: todo[first],
 * todo[first + stride], ... */
typedef struct fetch_share {
    kvb_connector *conn;
    kvb_request *req;
    uint64_t ns;
    const int32_t *tokens;
    const int64_t *todo;
    int64_t n_todo;
    int64_t first;
    int64_t stride;
    kvb_status st; /* the first failure of this share */
} fetch_share;

/* Loads a share's segments (connector_fetch each), recording the first
 * failure.  A thread's body, also run inline. */
static void *fetch_run(void *arg)
{
    fetch_share *f = arg;
    for (int64_t k = f->first; k < f->n_todo; k += f->stride) {
        const kvb_span *s = &f->req->segs[f->todo[k]];
        kvb_status st = connector_fetch(f->conn, f->ns, f->tokens + s->start,
                                        s->end - s->start,
                                        &f->req->hits[f->todo[k]]);
        if (st != KVB_OK && f->st == KVB_OK) {
            f->st = st;
        }
    }
    return NULL;
}

/*
 * Loads from the lower tiers every segment of `req` that missed in memory
 * and may be reused (it starts before `blend_end`, or any when blend_end <
 * 0), on up to CONNECTOR_FETCH_THREADS threads; a thread that cannot be
 * started leaves its share to the calling thread.  Only store failures
 * (an allocation) are returned; a tier's misses and errors are not.
 */
static kvb_status connector_fetch_misses(kvb_connector *c, kvb_request *req,
                                         uint64_t ns, const int32_t *tokens,
                                         int64_t blend_end)
{
    int64_t *todo = malloc((size_t)(req->nseg > 0 ? req->nseg : 1) *
                           sizeof *todo);
    if (todo == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "kvb_request_begin: out of memory");
    }
    int64_t n_todo = 0;
    for (int64_t i = 0; i < req->nseg; i++) {
        if (req->hits[i] == NULL &&
            (blend_end < 0 || req->segs[i].start < blend_end)) {
            todo[n_todo++] = i;
        }
    }
    int max_threads = connector_fetch_threads();
    int nt = n_todo < max_threads ? (int)n_todo : max_threads;
    fetch_share share[CONNECTOR_FETCH_THREADS];
    pthread_t th[CONNECTOR_FETCH_THREADS];
    int started[CONNECTOR_FETCH_THREADS] = {0};
    for (int w = 0; w < nt; w++) {
        share[w] = (fetch_share){c, req, ns, tokens, todo, n_todo, w, nt,
                                 KVB_OK};
        started[w] = w > 0 && pthread_create(&th[w], NULL, fetch_run,
                                             &share[w]) == 0;
    }
    for (int w = 0; w < nt; w++) {
        if (!started[w]) {
            fetch_run(&share[w]);
        }
    }
    kvb_status st = KVB_OK;
    for (int w = 0; w < nt; w++) {
        if (started[w]) {
            pthread_join(th[w], NULL);
        }
        if (st == KVB_OK && share[w].st != KVB_OK) {
            st = share[w].st;
        }
    }
    free(todo);
    if (st != KVB_OK) {
        /* the message was the failing thread's own */
        return kvb_fail(st, "kvb_request_begin: loading a segment from the "
                        "lower tiers failed (%s)", kvb_status_str(st));
    }
    return KVB_OK;
}

/* Commits a fully saved reserved entry; with lower tiers it is also queued
 * for writing there (the writer takes the pin commit_pinned keeps). */
static kvb_status connector_commit(kvb_connector *c, kvb_entry *e)
{
    if (c->tiers == NULL) {
        return kvb_store_commit(c->store, e);
    }
    kvb_status st = kvb_store_commit_pinned(c->store, e);
    if (st == KVB_OK) {
        kvb_blob_shape shape = connector_shape(c);
        kvb_tiers_put_entry(c->tiers, c->store, e, c->tier_key, &shape,
                            c->be->copy, c);
    }
    return st;
}

/* Releases everything a request holds; reserved entries are committed when
 * `commit` is set and they were saved at every layer, else aborted. */
static void request_release(kvb_request *req, int commit)
{
    kvb_connector *c = req->conn;
    if (commit && request_sync_saves(req) != KVB_OK) {
        commit = 0; /* the rows may be incomplete: store none */
    }
    for (int64_t i = 0; i < req->nseg; i++) {
        if (req->hits != NULL && req->hits[i] != NULL) {
            kvb_store_unpin(c->store, req->hits[i]);
        }
        if (req->saves != NULL && req->saves[i] != NULL) {
            if (commit && req->saved_layers[i] == c->model.num_layers) {
                connector_commit(c, req->saves[i]);
            } else {
                kvb_store_abort(c->store, req->saves[i]);
            }
        }
    }
    if (c->be->end != NULL) {
        c->be->end(req);
    }
    free(req->segs);
    free(req->hits);
    free(req->saves);
    free(req->saved_layers);
    free(req->forced);
    free(req->load);
    free(req->load_entry);
    free(req->positions);
    free(req);
}

/* Starts a request: segments, pins stored ones, reserves the others, marks
 * forced rows and builds the load table.  See kvblend.h. */
kvb_status kvb_request_begin(kvb_connector *conn, uint64_t ns,
                             const int32_t *tokens, int64_t n,
                             const kvb_span *spans, int64_t n_spans,
                             int64_t blend_end, int save, kvb_request **out)
{
    if (conn == NULL || out == NULL || n < 0 || (n > 0 && tokens == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_begin: bad arguments (n=%lld)",
                        (long long)n);
    }
    *out = NULL;
    if (blend_end > n || (blend_end >= n && n > 0)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_begin: blend_end=%lld must be below the "
                        "prompt length %lld",
                        (long long)blend_end, (long long)n);
    }
    kvb_request *req = calloc(1, sizeof *req);
    if (req == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "kvb_request_begin: out of memory");
    }
    req->conn = conn;
    req->n = n;
    kvb_status st = split_prompt(conn, tokens, n, spans, n_spans, &req->segs,
                                 &req->nseg);
    if (st != KVB_OK) {
        free(req);
        return st;
    }
    size_t cap = (size_t)(req->nseg > 0 ? req->nseg : 1);
    req->hits = calloc(cap, sizeof *req->hits);
    req->saves = calloc(cap, sizeof *req->saves);
    req->saved_layers = calloc(cap, sizeof *req->saved_layers);
    req->load = calloc(cap, sizeof *req->load);
    req->load_entry = calloc(cap, sizeof *req->load_entry);
    req->positions = malloc((size_t)(n > 0 ? n : 1) * sizeof *req->positions);
    if (!req->hits || !req->saves || !req->saved_layers || !req->load ||
        !req->load_entry || !req->positions) {
        request_release(req, 0);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_request_begin: out of memory");
    }
    for (int64_t i = 0; i < n; i++) {
        req->positions[i] = i;
    }
    /* Stored segments are pinned first, then the others reserved: a
     * reservation may evict to make room, and must never evict a segment
     * this very request is about to reuse (the lookup promised it). */
    int64_t reuse_end = 0;
    for (int64_t i = 0; i < req->nseg && conn->cfg.enable_blending; i++) {
        const kvb_span *s = &req->segs[i];
        st = kvb_store_acquire(conn->store, ns, tokens + s->start,
                               s->end - s->start, &req->hits[i]);
        int intact = 1;
        if (st == KVB_OK && req->hits[i] != NULL) {
            /* A damaged entry is dropped (its pin released): a miss,
             * recomputed and saved again below. */
            st = kvb_store_verify(conn->store, req->hits[i], &intact);
            if (st == KVB_OK && !intact) {
                req->hits[i] = NULL;
            }
        }
        if (st != KVB_OK) {
            request_release(req, 0);
            return st;
        }
    }
    if (conn->tiers != NULL && conn->cfg.enable_blending) {
        /* memory -> disk -> remote: a lower-tier hit is loaded into memory
         * (pinned like a memory hit) */
        st = connector_fetch_misses(conn, req, ns, tokens, blend_end);
        if (st != KVB_OK) {
            request_release(req, 0);
            return st;
        }
    }
    for (int64_t i = 0; i < req->nseg; i++) {
        if (req->hits[i] != NULL) {
            reuse_end = req->segs[i].end;
        }
    }
    for (int64_t i = 0; i < req->nseg && save; i++) {
        const kvb_span *s = &req->segs[i];
        if (req->hits[i] != NULL) {
            continue;
        }
        st = kvb_store_reserve(conn->store, ns, tokens + s->start,
                               s->end - s->start, req->positions + s->start,
                               &req->saves[i]);
        if (st != KVB_OK) {
            request_release(req, 0);
            return st;
        }
    }
    if (blend_end < 0) {
        blend_end = reuse_end < n ? reuse_end : (n > 0 ? n - 1 : 0);
    }
    req->blend_end = blend_end;
    req->forced = malloc((size_t)(blend_end > 0 ? blend_end : 1));
    if (req->forced == NULL) {
        request_release(req, 0);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_request_begin: out of memory");
    }
    memset(req->forced, 1, (size_t)(blend_end > 0 ? blend_end : 1));
    for (int64_t i = 0; i < req->nseg; i++) {
        kvb_entry *e = req->hits[i];
        const kvb_span *s = &req->segs[i];
        if (e == NULL || s->start >= blend_end) {
            continue;
        }
        int64_t len = s->end - s->start;
        if (s->end > blend_end) {
            len = blend_end - s->start; /* reuse only the promised rows */
        }
        /* The entry is pinned: it stays in its tier and its rows in place
         * until the request ends. */
        req->load_entry[req->n_load] = e;
        kvb_load_seg *ls = &req->load[req->n_load++];
        ls->k0 = kvb_entry_k(e, 0);
        ls->v0 = kvb_entry_v(e, 0);
        ls->layer_stride = kvb_entry_layer_stride(e);
        ls->src_pos = kvb_entry_positions(e);
        ls->dst_start = s->start;
        ls->num_tokens = len;
        memset(req->forced + s->start, 0, (size_t)len);
        req->n_hit++;
    }
    for (int64_t i = 0; i < blend_end; i++) {
        req->n_forced += req->forced[i];
    }
    if (conn->be->begin != NULL && (st = conn->be->begin(req)) != KVB_OK) {
        request_release(req, 0);
        return st;
    }
    *out = req;
    return KVB_OK;
}

/* Returns the number of rows the blend produces. */
int64_t kvb_request_blend_end(const kvb_request *req)
{
    return req == NULL ? 0 : req->blend_end;
}

/* Returns the forced-row mask ([blend_end]). */
const uint8_t *kvb_request_forced(const kvb_request *req)
{
    return req == NULL ? NULL : req->forced;
}

/* Reports segment, reused-segment and forced-row counts. */
kvb_status kvb_request_counts(const kvb_request *req, int64_t *n_segments,
                              int64_t *n_hit, int64_t *n_forced)
{
    if (req == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_request_counts: NULL request");
    }
    if (n_segments) {
        *n_segments = req->nseg;
    }
    if (n_hit) {
        *n_hit = req->n_hit;
    }
    if (n_forced) {
        *n_forced = req->n_forced;
    }
    return KVB_OK;
}

/* Reports the rows of the i-th reused segment. */
kvb_status kvb_request_reused(const kvb_request *req, int64_t i,
                              int64_t *start, int64_t *num_tokens)
{
    if (req == NULL || start == NULL || num_tokens == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_request_reused: %s is NULL",
                        req == NULL ? "req" : start == NULL ? "start"
                                                            : "num_tokens");
    }
    if (i < 0 || i >= req->n_load) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_request_reused: segment %lld "
                        "is out of range; the request reuses %lld",
                        (long long)i, (long long)req->n_load);
    }
    *start = req->load[i].dst_start;
    *num_tokens = req->load[i].num_tokens;
    return KVB_OK;
}

/* Loads layer `layer` of every reused segment into the staging buffers with
 * keys re-rotated, on the connector's backend.  See kvblend.h. */
kvb_status kvb_request_load_layer(kvb_request *req, int32_t layer,
                                  void *dst_k, void *dst_v, void *stream)
{
    if (req == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_request_load_layer: NULL request");
    }
    const kvb_model_desc *m = &req->conn->model;
    if (layer < 0 || layer >= m->num_layers) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_load_layer: layer %d out of range "
                        "[0, %d)",
                        (int)layer, (int)m->num_layers);
    }
    return req->conn->be->load_layer(req, layer, dst_k, dst_v, stream);
}

/* Copies layer `layer` of each reserved segment from the paged cache into
 * its store entry.  See kvblend.h. */
kvb_status kvb_request_save_layer(kvb_request *req, int32_t layer,
                                  const kvb_paged_layout *layout,
                                  const int64_t *slots, int64_t n,
                                  void *stream)
{
    if (req == NULL || layout == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_save_layer: NULL request or layout");
    }
    const kvb_model_desc *m = &req->conn->model;
    if (layer < 0 || layer >= m->num_layers) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_save_layer: layer %d out of range "
                        "[0, %d)",
                        (int)layer, (int)m->num_layers);
    }
    if (n < req->n || (n > 0 && slots == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_save_layer: slot mapping has %lld "
                        "entries, the prompt %lld tokens",
                        (long long)n, (long long)req->n);
    }
    if (layout->num_kv_heads != m->num_kv_heads ||
        layout->head_size != m->head_size || layout->dtype != m->dtype) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_save_layer: cache has %d kv heads of "
                        "size %d (%s), the model %d of size %d (%s)",
                        (int)layout->num_kv_heads, (int)layout->head_size,
                        kvb_dtype_str(layout->dtype), (int)m->num_kv_heads,
                        (int)m->head_size, kvb_dtype_str(m->dtype));
    }
    int32_t dev = req->conn->device;
    if ((layout->device < 0 ? -1 : layout->device) != dev) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_save_layer: layout.device=%d but the "
                        "connector runs on device %d (-1 = CPU): the cache "
                        "must be on the connector's device",
                        (int)layout->device, (int)dev);
    }
    kvb_status vst = kvb_layout_validate(layout);
    if (vst == KVB_OK) {
        vst = kvb_layout_check_slots(layout, slots, req->n);
    }
    if (vst != KVB_OK) {
        return vst; /* a bad mapping fails the call before any row is read */
    }
    int first = 1;
    for (int64_t i = 0; i < req->nseg; i++) {
        kvb_entry *e = req->saves[i];
        if (e == NULL || req->saved_layers[i] != layer) {
            continue; /* not saved, or a layer repeated/skipped: dropped */
        }
        const kvb_span *s = &req->segs[i];
        int padded = 0;
        for (int64_t t = s->start; t < s->end; t++) {
            padded |= slots[t] < 0;
        }
        if (padded) {
            continue; /* rows not in the cache yet: a later step saves it */
        }
        kvb_status st = req->conn->be->save_layer(
            req, layout, slots, s, kvb_entry_k(e, layer),
            kvb_entry_v(e, layer), first, stream);
        if (st != KVB_OK) {
            return st;
        }
        first = 0;
        req->saved_layers[i]++;
    }
    return KVB_OK;
}

/* Commits the reserved segments saved at every layer; see kvblend.h. */
kvb_status kvb_request_commit(kvb_request *req, int64_t *n_committed)
{
    if (req == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_request_commit: NULL request");
    }
    int64_t count = 0;
    for (int64_t i = 0; i < req->nseg; i++) {
        if (req->saves[i] == NULL ||
            req->saved_layers[i] != req->conn->model.num_layers) {
            continue;
        }
        if (count == 0) {
            /* The store hashes the rows at commit: the gathers must have
             * landed. */
            kvb_status sst = request_sync_saves(req);
            if (sst != KVB_OK) {
                return sst;
            }
        }
        kvb_status st = connector_commit(req->conn, req->saves[i]);
        req->saves[i] = NULL; /* committed, or (never) not pending: done */
        if (st != KVB_OK) {
            return st;
        }
        count++;
    }
    if (n_committed != NULL) {
        *n_committed = count;
    }
    return KVB_OK;
}

/* Ends a request: commits complete saves when asked, unpins, frees. */
void kvb_request_finish(kvb_request *req, int commit)
{
    if (req == NULL) {
        return;
    }
    request_release(req, commit);
}
