/*
 * check_stress.c: one CPU connector under concurrent use.  Six worker
 * threads each run KVB_STRESS_REQUESTS (default 500) requests through the
 * whole lifecycle: prompts of pool chunks in random order joined by one of
 * two separators, a tenant namespace from a small set, begin, a load of
 * every layer into staging rows, a save of every layer from the worker's
 * own region of a shared paged cache, and finish with or without a commit.
 * The store's budget holds a fraction of the chunks, so entries are evicted
 * all the time.  Meanwhile another thread swaps the separator and clears the
 * store.
 *
 * The forward pass writes, for token `tok` at position p, K = RoPE(p) of a
 * value that depends only on (layer, head, dim, tok) and V = that value
 * itself, so every row a load fills must equal RoPE(row) of its token's
 * value, wherever and whenever the chunk was stored.  After the join the
 * store is within budget, holds no pins (a clear empties it) and saw
 * evictions and hits.
 */
#define _POSIX_C_SOURCE 200809L /* pthread, nanosleep */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvblend.h"

#define L 2
#define H 2
#define D 8
#define ROW (H * D)
#define BS 4
#define WORKERS 6
#define SLOTS_PER_WORKER 64 /* a power of two: odd strides permute them */
#define NB (WORKERS * SLOTS_PER_WORKER / BS)
#define MAX_N 64
#define NUM_CHUNKS 12
#define BUDGET_BYTES (48u * 1024u) /* about 190 stored tokens */

static float g_inv_freq[D / 2];
/* The paged cache of the layer being computed: K plane then V plane,
 * [2][NB][BS][H][D]; worker w owns slots [w*64, (w+1)*64). */
static float g_cache[2][NB * BS][ROW];
static kvb_model_desc g_model;
static const int32_t g_sep_a[2] = {99, 98};
static const int32_t g_sep_b[1] = {97};
static uint64_t g_ns[3];
static atomic_int g_stop;

/* A small xorshift generator, one state per thread. */
static uint32_t rnd(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

/* The unrotated value of element (layer, kv, tok, e) of a forward pass. */
static float val(int layer, int kv, int32_t tok, int e)
{
    return (float)sin(0.37 * tok + 1.3 * layer + 0.7 * kv + 0.11 * (e / D) +
                      0.05 * (e % D));
}

/* The row a forward pass gives token `tok` at position `pos`: V is the
 * value, K the value rotated to `pos`. */
static void forward_row(int layer, int kv, int32_t tok, int64_t pos,
                        float *out)
{
    for (int e = 0; e < ROW; e++) {
        out[e] = val(layer, kv, tok, e);
    }
    if (kv == 0) {
        int64_t zero = 0;
        kvb_cpu_rerotate(out, 1, H, D, KVB_DTYPE_F32, &g_model.rope, &zero,
                         &pos);
    }
}

/* Describes the shared cache to save_layer: a K plane, then a V plane,
 * of NB blocks of BS tokens. */
static kvb_paged_layout layout_of(void)
{
    return make_layout(LAYOUT_2BNHD, (char *)g_cache, NB, BS, H, D,
                       KVB_DTYPE_F32, -1);
}

/* The model: 2 layers, 2 KV heads of 8, f32, NeoX RoPE on every dim. */
static void init_model(void)
{
    memset(&g_model, 0, sizeof g_model);
    for (int i = 0; i < D / 2; i++) {
        g_inv_freq[i] = (float)pow(10000.0, -2.0 * i / D);
    }
    g_model.num_layers = L;
    g_model.num_q_heads = 2 * H;
    g_model.num_kv_heads = H;
    g_model.head_size = D;
    g_model.dtype = KVB_DTYPE_F32;
    g_model.rope.rotary_dim = D;
    g_model.rope.style = KVB_ROPE_NEOX;
    g_model.rope.inv_freq = g_inv_freq;
    g_model.rope.attention_factor = 1.0f;
}

/* Requests per worker: KVB_STRESS_REQUESTS when set (sanitizer builds
 * run fewer), else 500. */
static int requests_per_worker(void)
{
    const char *s = getenv("KVB_STRESS_REQUESTS");
    int n = s != NULL ? atoi(s) : 0;
    return n > 0 ? n : 500;
}

typedef struct worker {
    kvb_connector *conn;
    int id;
    int requests;
    char failure[256]; /* first failed check, "" when none */
    int64_t rows_checked;
} worker;

/* Records the first failure of a worker (Check's asserts belong to the
 * test's main thread). */
#define WORKER_CHECK(w, cond, ...)                                         \
    do {                                                                   \
        if (!(cond) && (w)->failure[0] == '\0') {                          \
            snprintf((w)->failure, sizeof (w)->failure, __VA_ARGS__);      \
        }                                                                  \
    } while (0)

/* Builds a prompt: 2..5 pool chunks (repeats allowed) joined by one of the
 * two separators, then a separator and a fresh question of 1..4 tokens. */
static int64_t make_prompt(uint32_t *s, int32_t *tok)
{
    int use_a = rnd(s) & 1;
    const int32_t *sep = use_a ? g_sep_a : g_sep_b;
    int64_t sep_len = use_a ? 2 : 1;
    int64_t n = 0;
    int chunks = 2 + (int)(rnd(s) % 4);
    for (int c = 0; c <= chunks; c++) {
        if (c > 0) {
            for (int64_t j = 0; j < sep_len; j++) {
                tok[n++] = sep[j];
            }
        }
        if (c == chunks) { /* the question */
            int q = 1 + (int)(rnd(s) % 4);
            for (int j = 0; j < q; j++) {
                tok[n++] = 5000 + (int32_t)(rnd(s) % 1000);
            }
            break;
        }
        int k = (int)(rnd(s) % NUM_CHUNKS);
        int len = 3 + k % 5;
        for (int j = 0; j < len; j++) {
            tok[n++] = 100 * (k + 1) + j;
        }
    }
    return n;
}

/* Checks the rows a load filled: each equals the forward pass's row of its
 * token at the row's position; forced rows keep their NaN sentinel. */
static void check_loaded(worker *w, kvb_request *req, int layer,
                         const int32_t *tok, const float *k, const float *v)
{
    int64_t be = kvb_request_blend_end(req);
    const uint8_t *forced = kvb_request_forced(req);
    for (int64_t r = 0; r < be; r++) {
        if (forced[r]) {
            WORKER_CHECK(w, isnan(k[r * ROW]) && isnan(v[r * ROW]),
                         "worker %d: forced row %lld was written", w->id,
                         (long long)r);
            continue;
        }
        float ek[ROW], ev[ROW];
        forward_row(layer, 0, tok[r], r, ek);
        forward_row(layer, 1, tok[r], r, ev);
        for (int e = 0; e < ROW; e++) {
            WORKER_CHECK(w, v[r * ROW + e] == ev[e],
                         "worker %d: layer %d row %lld (token %d): V[%d] = "
                         "%g, expected %g", w->id, layer, (long long)r,
                         (int)tok[r], e, (double)v[r * ROW + e],
                         (double)ev[e]);
            WORKER_CHECK(w, fabsf(k[r * ROW + e] - ek[e]) <= 1e-4f,
                         "worker %d: layer %d row %lld (token %d): K[%d] = "
                         "%g, expected %g", w->id, layer, (long long)r,
                         (int)tok[r], e, (double)k[r * ROW + e],
                         (double)ek[e]);
        }
        w->rows_checked++;
    }
}

/* One request: (lookup,) begin, per layer load then forward and save,
 * finish. */
static void run_request(worker *w, uint32_t *s)
{
    int32_t tok[MAX_N];
    int64_t n = make_prompt(s, tok);
    uint64_t ns = g_ns[rnd(s) % 3];
    int64_t blend_end = -1;
    if (rnd(s) & 1) { /* the scheduler's promise, as vLLM makes it */
        kvb_span segs[MAX_N];
        uint8_t hit[MAX_N];
        int64_t nseg = 0;
        kvb_status st = kvb_connector_lookup(w->conn, ns, tok, n, NULL, 0,
                                             segs, hit, MAX_N, &nseg,
                                             &blend_end);
        WORKER_CHECK(w, st == KVB_OK, "worker %d: lookup: %s", w->id,
                     kvb_last_error());
        WORKER_CHECK(w, blend_end >= 0 && blend_end < n,
                     "worker %d: lookup: reuse_end %lld of %lld", w->id,
                     (long long)blend_end, (long long)n);
    }
    kvb_request *req = NULL;
    kvb_status st = kvb_request_begin(w->conn, ns, tok, n, NULL, 0, blend_end,
                                      (rnd(s) % 8) != 0, &req);
    WORKER_CHECK(w, st == KVB_OK, "worker %d: begin: %s", w->id,
                 kvb_last_error());
    if (st != KVB_OK) {
        return;
    }
    int64_t be = kvb_request_blend_end(req);
    WORKER_CHECK(w, be >= 0 && be < n && (blend_end < 0 || be == blend_end),
                 "worker %d: blend_end %lld (promised %lld) of %lld", w->id,
                 (long long)be, (long long)blend_end, (long long)n);
    size_t rows = (size_t)(be > 0 ? be : 1);
    float *k = malloc(rows * ROW * sizeof *k);
    float *v = malloc(rows * ROW * sizeof *v);
    int64_t slots[MAX_N];
    int64_t base = rnd(s) % SLOTS_PER_WORKER;
    int64_t stride = 2 * (rnd(s) % 16) + 1;
    for (int64_t i = 0; i < n; i++) {
        slots[i] = w->id * SLOTS_PER_WORKER +
                   (base + i * stride) % SLOTS_PER_WORKER;
    }
    kvb_paged_layout lay = layout_of();
    for (int layer = 0; layer < L && k != NULL && v != NULL; layer++) {
        for (size_t i = 0; i < rows * ROW; i++) {
            k[i] = NAN;
            v[i] = NAN;
        }
        st = kvb_request_load_layer(req, layer, k, v, NULL);
        WORKER_CHECK(w, st == KVB_OK, "worker %d: load_layer: %s", w->id,
                     kvb_last_error());
        check_loaded(w, req, layer, tok, k, v);
        for (int64_t i = 0; i < n; i++) {
            forward_row(layer, 0, tok[i], i, g_cache[0][slots[i]]);
            forward_row(layer, 1, tok[i], i, g_cache[1][slots[i]]);
        }
        st = kvb_request_save_layer(req, layer, &lay, slots, n, NULL);
        WORKER_CHECK(w, st == KVB_OK, "worker %d: save_layer: %s", w->id,
                     kvb_last_error());
    }
    if (rnd(s) % 4 == 0) {
        int64_t committed = -1;
        st = kvb_request_commit(req, &committed);
        WORKER_CHECK(w, st == KVB_OK && committed >= 0,
                     "worker %d: commit: %s", w->id, kvb_last_error());
    }
    kvb_request_finish(req, (rnd(s) % 5) != 0);
    free(k);
    free(v);
}

/* A worker thread: its requests, one after another. */
static void *worker_main(void *arg)
{
    worker *w = arg;
    uint32_t s = 0x9e3779b9u * (uint32_t)(w->id + 1);
    for (int i = 0; i < w->requests && w->failure[0] == '\0'; i++) {
        run_request(w, &s);
    }
    return NULL;
}

typedef struct meddler {
    kvb_connector *conn;
    int swaps;
    int clears;
    char failure[256];
} meddler;

/* Swaps the separator (now and then for none at all) and clears the store
 * until the workers are done; checks the budget each time. */
static void *meddler_main(void *arg)
{
    meddler *m = arg;
    uint32_t s = 12345;
    kvb_store *store = kvb_connector_store(m->conn);
    while (m->failure[0] == '\0' && !atomic_load(&g_stop)) {
        uint32_t r = rnd(&s) % 16;
        kvb_status st;
        if (r < 14) {
            st = kvb_connector_set_separator(m->conn, r & 1 ? g_sep_a : g_sep_b,
                                             r & 1 ? 2 : 1);
            m->swaps++;
        } else if (r < 15) {
            st = kvb_connector_set_separator(m->conn, NULL, 0);
            m->swaps++;
        } else {
            st = kvb_store_clear(store);
            m->clears++;
        }
        kvb_store_stats stats;
        if (st == KVB_OK) {
            st = kvb_store_get_stats(store, &stats);
        }
        if (st != KVB_OK) {
            snprintf(m->failure, sizeof m->failure, "meddler: %s",
                     kvb_last_error());
        } else if (stats.host_bytes > BUDGET_BYTES || stats.num_entries < 0) {
            snprintf(m->failure, sizeof m->failure,
                     "store over budget: %zu bytes, %lld entries",
                     stats.host_bytes, (long long)stats.num_entries);
        }
        struct timespec ts = {0, 200000}; /* 0.2 ms */
        nanosleep(&ts, NULL);
    }
    return NULL;
}

START_TEST(test_stress_workers_with_separator_swaps_and_clears)
{
    init_model();
    g_ns[0] = 0;
    g_ns[1] = kvb_namespace("tenant-a", 8);
    g_ns[2] = kvb_namespace("tenant-b", 8);
    kvb_config cfg;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.enable_blending = 1;
    cfg.max_local_cpu_size_gb = BUDGET_BYTES / 1073741824.0;
    cfg.log_level = KVB_LOG_ERROR; /* "no room" is expected here */
    cfg.verify_checksums = 1;
    kvb_connector *c = NULL;
    ck_assert_int_eq(kvb_connector_create(&cfg, &g_model, -1, &c), KVB_OK);
    ck_assert_int_eq(kvb_connector_set_separator(c, g_sep_a, 2), KVB_OK);

    atomic_store(&g_stop, 0);
    static worker w[WORKERS];
    static meddler m;
    memset(&m, 0, sizeof m);
    m.conn = c;
    pthread_t tw[WORKERS], tm;
    ck_assert_int_eq(pthread_create(&tm, NULL, meddler_main, &m), 0);
    for (int i = 0; i < WORKERS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].conn = c;
        w[i].id = i;
        w[i].requests = requests_per_worker();
        ck_assert_int_eq(pthread_create(&tw[i], NULL, worker_main, &w[i]), 0);
    }
    int64_t rows = 0;
    for (int i = 0; i < WORKERS; i++) {
        pthread_join(tw[i], NULL);
        rows += w[i].rows_checked;
    }
    atomic_store(&g_stop, 1);
    pthread_join(tm, NULL);
    for (int i = 0; i < WORKERS; i++) {
        ck_assert_msg(w[i].failure[0] == '\0', "%s", w[i].failure);
    }
    ck_assert_msg(m.failure[0] == '\0', "%s", m.failure);
    ck_assert_int_gt(m.swaps, 0);
    ck_assert_int_gt(rows, 0); /* reuse happened and was checked */

    kvb_store *store = kvb_connector_store(c);
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(store, &st), KVB_OK);
    ck_assert_uint_le(st.host_bytes, BUDGET_BYTES);
    ck_assert_int_ge(st.num_entries, 0);
    ck_assert_int_gt(st.evictions + st.rejected, 0); /* the budget bit */
    ck_assert_int_gt(st.hits, 0);
    ck_assert_int_eq(st.corrupt, 0);
    /* every request ended: nothing is pinned, so a clear empties it */
    ck_assert_int_eq(kvb_store_clear(store), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(store, &st), KVB_OK);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_uint_eq(st.host_bytes, 0);
    kvb_connector_free(c);
}
END_TEST

/* The stress suite. */
Suite *stress_suite(void)
{
    static const case_spec cases[] = {{"threads", NULL, NULL, 300}};
    const test_spec tests[] = {
        {0, test_stress_workers_with_separator_swaps_and_clears, 0},
    };
    return suite_build("stress", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
