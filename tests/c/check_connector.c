/*
 * check_connector.c: the hook layer.  A tiny model (2 layers, 2 KV heads of
 * size 8) and a host paged cache in the (2, blocks, block_size, H, D) layout
 * drive the request lifecycle: a first prompt saves its segments, a prompt
 * with the same segments reordered reuses them, and the staged rows equal
 * the saved rows re-rotated to their new positions.
 */
#define _POSIX_C_SOURCE 200809L /* pthread */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"
#include "../../csrc/store.h"

#define L 2
#define H 2
#define D 8
#define BS 4
#define NB 32
#define ROW (H * D)

static float g_inv_freq[D / 2];
static float g_cache[2][NB][BS][H][D];

/* Fills the rotary table with the usual 10000^(-2i/D) frequencies. */
static void init_rope(kvb_model_desc *m)
{
    memset(m, 0, sizeof *m);
    for (int i = 0; i < D / 2; i++) {
        g_inv_freq[i] = (float)pow(10000.0, -2.0 * i / D);
    }
    m->num_layers = L;
    m->num_q_heads = 4;
    m->num_kv_heads = H;
    m->head_size = D;
    m->dtype = KVB_DTYPE_F32;
    m->rope.rotary_dim = D;
    m->rope.style = KVB_ROPE_NEOX;
    m->rope.inv_freq = g_inv_freq;
    m->rope.attention_factor = 1.0f;
}

/* Creates a blending connector with separator [99, 98]. */
static kvb_connector *make_conn(int blending)
{
    kvb_config cfg;
    kvb_model_desc m;
    kvb_connector *c = NULL;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.enable_blending = blending;
    init_rope(&m);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    const int32_t sep[2] = {99, 98};
    ck_assert_int_eq(kvb_connector_set_separator(c, sep, 2), KVB_OK);
    return c;
}

/* A C host program's log sink survives kvb_connector_create, which sets
 * only the level (KVBLEND_LOG_LEVEL). */
START_TEST(test_connector_keeps_the_host_log_sink)
{
    test_log host;
    test_log_start(&host, NULL);
    kvb_connector *c = make_conn(1); /* default level: warning */
    /* a store too small for any chunk logs a WARNING per reservation; a
     * disabled one an INFO line, below the connector's level */
    kvb_store_params p = {1, 1, 4, KVB_DTYPE_F32, 1, 0, 0};
    kvb_store *small = NULL, *off = NULL;
    ck_assert_int_eq(kvb_store_create(&p, &small), KVB_OK);
    p.host_budget_bytes = 0;
    ck_assert_int_eq(kvb_store_create(&p, &off), KVB_OK);
    const int32_t tok[4] = {1, 2, 3, 4};
    kvb_entry *e = NULL;
    ck_assert_int_eq(kvb_store_reserve(off, 0, tok, 4, NULL, &e), KVB_OK);
    ck_assert_int_eq(kvb_store_reserve(small, 0, tok, 4, NULL, &e), KVB_OK);
    ck_assert_int_eq(host.total, 1);
    kvb_store_free(small);
    kvb_store_free(off);
    kvb_connector_free(c);
    test_log_stop(&host);
}
END_TEST

/* A setting accepted only for LMCache compatibility says so when it is set
 * (and only then), at info, once per connector. */
START_TEST(test_connector_logs_compat_only_settings)
{
    kvb_config cfg;
    kvb_model_desc m;
    kvb_connector *c = NULL;
    init_rope(&m);
    test_log log;
    test_log_start(&log, "LMCache compatibility");
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.log_level = KVB_LOG_INFO;
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    kvb_connector_free(c);
    ck_assert_int_eq(log.total, 0); /* defaults: nothing to say */
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_CHUNK_SIZE", "512"), KVB_OK);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    kvb_connector_free(c);
    ck_assert_int_eq(log.count[KVB_LOG_INFO], 1);
    ck_assert_str_eq(log.last[KVB_LOG_INFO], "LMCACHE_CHUNK_SIZE is accepted for LMCache "
                     "compatibility and has no effect in kvblend");
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_BLEND_THRESHOLDS", "0.5"),
                     KVB_OK);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    kvb_connector_free(c);
    ck_assert_int_eq(log.count[KVB_LOG_INFO], 1 + 2);
    ck_assert_int_eq(log.total, log.count[KVB_LOG_INFO]);
    test_log_stop(&log);
}
END_TEST

/* Describes the global paged cache: a K plane, then a V plane, of NB
 * blocks of BS tokens. */
static kvb_paged_layout layout_of(void)
{
    return make_layout(LAYOUT_2BNHD, (char *)g_cache, NB, BS, H, D,
                       KVB_DTYPE_F32, -1);
}

/* Deterministic value of element (layer, kv, token id, pos, h, d): the
 * cache content a forward would have written for that token. */
static float val(int layer, int kv, int tok, int h, int d)
{
    return (float)sin(0.37 * tok + 1.3 * layer + 0.7 * kv + 0.11 * h + 0.05 * d);
}

/* Writes every layer's K/V of a prompt into the cache at slots[i] (the
 * save path reads them back from there); the layer index is encoded by
 * running the request's save_layer right after writing each layer. */
static void forward_and_save(kvb_request *req, const int32_t *toks, int n,
                             const int64_t *slots)
{
    kvb_paged_layout lay = layout_of();
    for (int layer = 0; layer < L; layer++) {
        for (int i = 0; i < n; i++) {
            if (slots[i] < 0) {
                continue; /* a row this step did not compute */
            }
            int64_t b = slots[i] / BS, t = slots[i] % BS;
            for (int h = 0; h < H; h++) {
                for (int d = 0; d < D; d++) {
                    g_cache[0][b][t][h][d] = val(layer, 0, toks[i], h, d);
                    g_cache[1][b][t][h][d] = val(layer, 1, toks[i], h, d);
                }
            }
        }
        ck_assert_int_eq(kvb_request_save_layer(req, layer, &lay, slots, n, NULL), KVB_OK);
    }
}

/* sys | A | B | q  with separators 99 98 between segments. */
static const int32_t P1[] = {1, 2, 99, 98, 10, 11, 12, 99, 98, 20, 21, 99, 98, 30};
/* sys | B | A | q2: same chunks reordered, another question. */
static const int32_t P2[] = {1, 2, 99, 98, 20, 21, 99, 98, 10, 11, 12, 99, 98, 31, 32};
#define N1 ((int)(sizeof P1 / sizeof P1[0]))
#define N2 ((int)(sizeof P2 / sizeof P2[0]))

/* Identity slot mapping 0..n-1 offset by `base`. */
static void slots_from(int64_t *s, int n, int64_t base)
{
    for (int i = 0; i < n; i++) {
        s[i] = base + i;
    }
}

/* Runs P1 through a saving request and commits it. */
static void store_p1(kvb_connector *c)
{
    int64_t slots[N1];
    kvb_request *req = NULL;
    slots_from(slots, N1, 0);
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, -1, 1, &req), KVB_OK);
    ck_assert_int_eq(kvb_request_blend_end(req), 0);
    forward_and_save(req, P1, N1, slots);
    kvb_request_finish(req, 1);
}

/* Returns how many entries the connector's store holds. */
static int64_t stored_entries(kvb_connector *c)
{
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(kvb_connector_store(c), &st), KVB_OK);
    return st.num_entries;
}

START_TEST(test_lookup_empty_store_misses)
{
    kvb_connector *c = make_conn(1);
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t ns = -1, end = -1;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, P1, N1, NULL, 0, segs, hit, 8, &ns, &end), KVB_OK);
    ck_assert_int_eq(ns, 4);
    ck_assert_int_eq(end, 0);
    ck_assert_int_eq(segs[1].start, 4);
    ck_assert_int_eq(segs[1].end, 7);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(hit[i], 0);
    }
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_reordered_prompt_reuses_every_chunk)
{
    kvb_connector *c = make_conn(1);
    store_p1(c);
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t ns = 0, end = 0;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, P2, N2, NULL, 0, segs, hit, 8, &ns, &end), KVB_OK);
    ck_assert_int_eq(ns, 4);
    ck_assert_int_eq(hit[0], 1); /* sys */
    ck_assert_int_eq(hit[1], 1); /* B, now second */
    ck_assert_int_eq(hit[2], 1); /* A, now third */
    ck_assert_int_eq(hit[3], 0); /* new question */
    ck_assert_int_eq(end, 11);   /* end of A in P2 */
    /* the lookup has no side effects: the same answer twice */
    int64_t ns2 = 0, end2 = 0;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, P2, N2, NULL, 0, segs, hit, 8, &ns2, &end2), KVB_OK);
    ck_assert_int_eq(end2, end);
    ck_assert_int_eq(stored_entries(c), 4); /* P1's four segments */
    kvb_connector_free(c);
}
END_TEST

/* Checks every layer a request for P2 loads against P1's saved rows:
 * V as saved, K re-rotated from its P1 position to its P2 position, rows
 * without stored KV (`want_forced`) untouched. */
static void check_p2_rows(kvb_request *req, const uint8_t want_forced[11])
{
    float k[11][ROW], v[11][ROW];
    for (int layer = 0; layer < L; layer++) {
        memset(k, 0x7f, sizeof k);
        ck_assert_int_eq(kvb_request_load_layer(req, layer, k, v, NULL), KVB_OK);
        /* P2 row 8 is token 10, stored at P1 position 4: rotate 4 -> 8 */
        for (int row = 0; row < 11; row++) {
            if (want_forced[row]) {
                continue;
            }
            int tok = P2[row];
            int64_t old = -1;
            for (int j = 0; j < N1; j++) {
                if (P1[j] == tok) {
                    old = j;
                }
            }
            float ref[ROW];
            for (int h = 0; h < H; h++) {
                for (int d = 0; d < D; d++) {
                    ref[h * D + d] = val(layer, 0, tok, h, d);
                    ck_assert_float_eq(v[row][h * D + d], val(layer, 1, tok, h, d));
                }
            }
            kvb_model_desc m;
            init_rope(&m);
            int64_t np = row;
            ck_assert_int_eq(kvb_cpu_rerotate(ref, 1, H, D, KVB_DTYPE_F32, &m.rope, &old, &np), KVB_OK);
            for (int e = 0; e < ROW; e++) {
                ck_assert_float_eq_tol(k[row][e], ref[e], 1e-6);
            }
        }
    }
}

/* Separators (2,3 and 6,7) are forced in P2's blend, chunk rows are not. */
static const uint8_t P2_FORCED[11] = {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0};

START_TEST(test_load_layer_rerotates_to_new_positions)
{
    kvb_connector *c = make_conn(1);
    store_p1(c);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P2, N2, NULL, 0, -1, 1, &req), KVB_OK);
    int64_t be = kvb_request_blend_end(req);
    ck_assert_int_eq(be, 11);
    ck_assert_mem_eq(kvb_request_forced(req), P2_FORCED, 11);
    int64_t nseg, nhit, nforced;
    ck_assert_int_eq(kvb_request_counts(req, &nseg, &nhit, &nforced), KVB_OK);
    ck_assert_int_eq(nseg, 4);
    ck_assert_int_eq(nhit, 3);
    ck_assert_int_eq(nforced, 4);
    check_p2_rows(req, P2_FORCED);
    kvb_request_finish(req, 1);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_promised_rows_survive_eviction)
{
    /* the scheduler promised 11 rows; the store was cleared since: every
     * row is then forced (recomputed), none is lost */
    kvb_connector *c = make_conn(1);
    store_p1(c);
    ck_assert_int_eq(kvb_store_clear(kvb_connector_store(c)), KVB_OK);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P2, N2, NULL, 0, 11, 0, &req), KVB_OK);
    ck_assert_int_eq(kvb_request_blend_end(req), 11);
    int64_t nforced = 0;
    kvb_request_counts(req, NULL, NULL, &nforced);
    ck_assert_int_eq(nforced, 11);
    kvb_request_finish(req, 0);
    kvb_connector_free(c);
}
END_TEST

/* Where the reuse of a lookup ends after P1 was stored: a whole stored
 * prompt is reused but for its last token (the engine computes it), and
 * nothing is with blending off. */
static const struct {
    int blending;
    const int32_t *prompt;
    int n;
    int64_t end;
} kLookupEnds[] = {
    {1, P1, N1, N1 - 1},
    {0, P2, N2, 0},
};

START_TEST(test_lookup_end_after_storing_p1)
{
    kvb_connector *c = make_conn(kLookupEnds[_i].blending);
    store_p1(c);
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t ns, end;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, kLookupEnds[_i].prompt, kLookupEnds[_i].n,
                                          NULL, 0, segs, hit, 8, &ns, &end),
                     KVB_OK);
    ck_assert_int_eq(end, kLookupEnds[_i].end);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_short_prompt_and_no_separator)
{
    kvb_connector *c = make_conn(1);
    const int32_t tiny[1] = {99};
    kvb_span segs[4];
    uint8_t hit[4];
    int64_t ns = -1, end = -1;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, tiny, 1, NULL, 0, segs, hit, 4, &ns, &end), KVB_OK);
    ck_assert_int_eq(ns, 0);
    ck_assert_int_eq(end, 0);
    const int32_t plain[5] = {5, 6, 7, 8, 9};
    ck_assert_int_eq(kvb_connector_lookup(c, 0, plain, 5, NULL, 0, segs, hit, 4, &ns, &end), KVB_OK);
    ck_assert_int_eq(ns, 1);
    ck_assert_int_eq(segs[0].start, 0);
    ck_assert_int_eq(segs[0].end, 5);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_duplicate_chunk_hits_twice)
{
    kvb_connector *c = make_conn(1);
    store_p1(c);
    /* A twice: sys | A | A | q */
    const int32_t p[] = {1, 2, 99, 98, 10, 11, 12, 99, 98, 10, 11, 12, 99, 98, 40};
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, p, 15, NULL, 0, -1, 1, &req), KVB_OK);
    int64_t nhit = 0;
    kvb_request_counts(req, NULL, &nhit, NULL);
    ck_assert_int_eq(nhit, 3);
    ck_assert_int_eq(kvb_request_blend_end(req), 12);
    kvb_request_finish(req, 0);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_incomplete_save_is_dropped)
{
    kvb_connector *c = make_conn(1);
    int64_t slots[N1];
    slots_from(slots, N1, 0);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, -1, 1, &req), KVB_OK);
    kvb_paged_layout lay = layout_of();
    /* only layer 0 saved: nothing may become visible */
    ck_assert_int_eq(kvb_request_save_layer(req, 0, &lay, slots, N1, NULL), KVB_OK);
    kvb_request_finish(req, 1);
    kvb_store_stats st;
    kvb_store_get_stats(kvb_connector_store(c), &st);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_uint_eq(st.host_bytes, 0);
    kvb_connector_free(c);
}
END_TEST

/* Whether segment i of P1 is stored, by a lookup. */
static int p1_hit(kvb_connector *c, int i)
{
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t ns = 0, end = 0;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, P1, N1, NULL, 0, segs, hit, 8, &ns, &end), KVB_OK);
    ck_assert_int_eq(ns, 4);
    return hit[i];
}

START_TEST(test_prefill_over_steps_stores_each_segment_when_complete)
{
    kvb_connector *c = make_conn(1);
    int64_t slots[N1];
    kvb_request *req = NULL;
    int64_t done = -1;
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, 0, 1, &req), KVB_OK);
    /* step 1 computed rows [0, 8): sys [0,2) and A [4,7) are complete, B
     * [9,11) and q [13,14) have no rows yet (negative slots) */
    slots_from(slots, N1, 0);
    for (int i = 8; i < N1; i++) {
        slots[i] = -1;
    }
    forward_and_save(req, P1, N1, slots);
    ck_assert_int_eq(kvb_request_commit(req, &done), KVB_OK);
    ck_assert_int_eq(done, 2);
    ck_assert_int_eq(p1_hit(c, 0), 1);
    ck_assert_int_eq(p1_hit(c, 1), 1);
    ck_assert_int_eq(p1_hit(c, 2), 0);
    ck_assert_int_eq(p1_hit(c, 3), 0);
    /* step 2 computed the rest (new blocks: the mapping grew) */
    slots_from(slots, N1, 0);
    forward_and_save(req, P1, N1, slots);
    ck_assert_int_eq(kvb_request_commit(req, &done), KVB_OK);
    ck_assert_int_eq(done, 2);
    ck_assert_int_eq(kvb_request_commit(req, &done), KVB_OK);
    ck_assert_int_eq(done, 0); /* nothing committed twice */
    kvb_request_finish(req, 1);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(p1_hit(c, i), 1);
    }
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(kvb_connector_store(c), &st), KVB_OK);
    ck_assert_int_eq(st.num_entries, 4);
    ck_assert_int_eq(st.inserts, 4);
    /* the rows stored in two steps are the rows of the cache */
    kvb_request *r2 = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, -1, 0, &r2), KVB_OK);
    ck_assert_int_eq(kvb_request_blend_end(r2), 13);
    static float k[N1][H][D], v[N1][H][D];
    ck_assert_int_eq(kvb_request_load_layer(r2, 1, k, v, NULL), KVB_OK);
    for (int d = 0; d < D; d++) {
        ck_assert_float_eq(v[10][1][d], val(1, 1, P1[10], 1, d));
    }
    kvb_request_finish(r2, 0);
    ck_assert_int_eq(kvb_request_commit(NULL, &done), KVB_ERR_INVALID);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_finish_after_partial_prefill_commits_complete_segments)
{
    kvb_connector *c = make_conn(1);
    int64_t slots[N1];
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, 0, 1, &req), KVB_OK);
    slots_from(slots, N1, 0);
    for (int i = 5; i < N1; i++) {
        slots[i] = -1; /* aborted after 5 rows: only sys is complete */
    }
    forward_and_save(req, P1, N1, slots);
    kvb_request_finish(req, 1);
    ck_assert_int_eq(p1_hit(c, 0), 1);
    for (int i = 1; i < 4; i++) {
        ck_assert_int_eq(p1_hit(c, i), 0);
    }
    ck_assert_int_eq(stored_entries(c), 1);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_bad_arguments_named)
{
    kvb_connector *c = make_conn(1);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, N1, 1, &req), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "blend_end=14"));
    ck_assert_int_eq(kvb_request_begin(c, 0, P1, N1, NULL, 0, -1, 1, &req), KVB_OK);
    kvb_paged_layout lay = layout_of();
    int64_t slots[N1];
    slots_from(slots, N1, 0);
    slots[3] = NB * BS; /* one past the end */
    ck_assert_int_eq(kvb_request_save_layer(req, 0, &lay, slots, N1, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "out of range"));
    ck_assert_int_eq(kvb_request_save_layer(req, L, &lay, slots, N1, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "layer 2 out of range"));
    ck_assert_int_eq(kvb_request_save_layer(req, 0, &lay, slots, N1 - 1, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "slot mapping has 13 entries"));
    lay.head_size = 4;
    ck_assert_int_eq(kvb_request_save_layer(req, 0, &lay, slots, N1, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "size 4"));
    float buf[1];
    ck_assert_int_eq(kvb_request_load_layer(req, -1, buf, buf, NULL), KVB_ERR_INVALID);
    kvb_request_finish(req, 0);

    kvb_config cfg;
    kvb_model_desc m;
    kvb_connector *bad = NULL;
    kvb_config_init(&cfg);
    init_rope(&m);
    m.num_q_heads = 3; /* not a multiple of 2 kv heads */
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &bad), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "num_q_heads=3"));
    init_rope(&m);
    m.rope.rotary_dim = 5;
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &bad), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "rotary_dim=5"));
    ck_assert_ptr_null(bad);
    kvb_connector_free(NULL);
    kvb_request_finish(NULL, 1);
    kvb_connector_free(c);
}
END_TEST

/* Segment counts of a request for `p` under namespace ns (no save). */
static int64_t hits_for(kvb_connector *c, uint64_t ns, const int32_t *p, int n,
                        int64_t *forced)
{
    kvb_request *req = NULL;
    int64_t nhit = -1;
    ck_assert_int_eq(kvb_request_begin(c, ns, p, n, NULL, 0, -1, 0, &req), KVB_OK);
    ck_assert_int_eq(kvb_request_counts(req, NULL, &nhit, forced), KVB_OK);
    kvb_request_finish(req, 0);
    return nhit;
}

START_TEST(test_tenants_never_share_chunks)
{
    kvb_connector *c = make_conn(1);
    uint64_t a = kvb_namespace("salt-a", 6), b = kvb_namespace("salt-b", 6);
    int64_t slots[N1];
    slots_from(slots, N1, 0);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, a, P1, N1, NULL, 0, -1, 1, &req), KVB_OK);
    forward_and_save(req, P1, N1, slots);
    kvb_request_finish(req, 1);
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t nseg = 0, end = -1;
    const uint64_t others[2] = {b, 0};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(kvb_connector_lookup(c, others[i], P2, N2, NULL, 0, segs, hit, 8, &nseg, &end), KVB_OK);
        ck_assert_int_eq(nseg, 4);
        ck_assert_int_eq(end, 0);
        ck_assert_int_eq(hit[0] | hit[1] | hit[2] | hit[3], 0);
        ck_assert_int_eq(hits_for(c, others[i], P2, N2, NULL), 0);
    }
    ck_assert_int_eq(kvb_connector_lookup(c, a, P2, N2, NULL, 0, segs, hit, 8, &nseg, &end), KVB_OK);
    ck_assert_int_eq(end, 11); /* the end of A in P2 */
    ck_assert_int_eq(hits_for(c, a, P2, N2, NULL), 3);
    kvb_connector_free(c);
}
END_TEST

/* Flips one bit of the stored rows of P1's segment A (tokens 10 11 12). */
static void damage_segment_a(kvb_connector *c)
{
    const int32_t a[3] = {10, 11, 12};
    kvb_entry *e = NULL;
    kvb_store *s = kvb_connector_store(c);
    ck_assert_int_eq(kvb_store_acquire(s, 0, a, 3, &e), KVB_OK);
    ck_assert_ptr_nonnull(e);
    ((unsigned char *)kvb_entry_k(e, 1))[5] ^= 0x40;
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
}

START_TEST(test_damaged_chunk_is_recomputed_not_loaded)
{
    /* CPU connectors check stored chunks by default ("auto") */
    kvb_connector *c = make_conn(1);
    store_p1(c);
    damage_segment_a(c);
    int64_t forced = 0;
    ck_assert_int_eq(hits_for(c, 0, P2, N2, &forced), 2); /* sys and B only */
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(kvb_connector_store(c), &st), KVB_OK);
    ck_assert_int_eq(st.corrupt, 1);
    /* the blend covers sys | B only; A's rows are not loaded */
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P2, N2, NULL, 0, -1, 1, &req), KVB_OK);
    ck_assert_int_eq(kvb_request_blend_end(req), 6);
    /* ... and stored again from this prefill */
    int64_t slots[N2];
    slots_from(slots, N2, 64);
    forward_and_save(req, P2, N2, slots);
    kvb_request_finish(req, 1);
    ck_assert_int_eq(hits_for(c, 0, P2, N2, NULL), 4); /* A and q2 stored */
    kvb_connector_free(c);

    /* KVBLEND_VERIFY_CHECKSUMS=0 turns the check off: the damage is served */
    kvb_config cfg;
    kvb_model_desc m;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.enable_blending = 1;
    ck_assert_int_eq(kvb_config_set(&cfg, "KVBLEND_VERIFY_CHECKSUMS", "0"), KVB_OK);
    init_rope(&m);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    const int32_t sep[2] = {99, 98};
    ck_assert_int_eq(kvb_connector_set_separator(c, sep, 2), KVB_OK);
    store_p1(c);
    damage_segment_a(c);
    ck_assert_int_eq(hits_for(c, 0, P2, N2, NULL), 3);
    kvb_connector_free(c);
}
END_TEST

/* ---- lower tiers (disk): what a restarted connector finds ---------------- */

/* A blending connector whose config names the disk folder `dir` (or no
 * disk tier for NULL), for shard `rank` of `world`. */
static kvb_connector *make_disk_conn(const char *dir, int rank, int world)
{
    kvb_config cfg;
    kvb_model_desc m;
    kvb_connector *c = NULL;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.enable_blending = 1;
    if (dir != NULL) {
        ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_LOCAL_DISK", dir), KVB_OK);
        ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_MAX_LOCAL_DISK_SIZE", "0.01"), KVB_OK);
    }
    init_rope(&m);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    ck_assert_int_eq(kvb_connector_set_shard(c, rank, world), KVB_OK);
    const int32_t sep[2] = {99, 98};
    ck_assert_int_eq(kvb_connector_set_separator(c, sep, 2), KVB_OK);
    return c;
}

/* The disk folder of the tests of the "disk" case (checked fixture). */
static char g_tier_dir[64];

/* Fixture: a fresh folder for the disk tier. */
static void tier_dir_setup(void)
{
    tmpdir_make(g_tier_dir, sizeof g_tier_dir, "kvb_conn_tiers");
}

/* Fixture: removes the folder and everything in it. */
static void tier_dir_teardown(void)
{
    tmpdir_remove(g_tier_dir);
}

/* Stores P1's segments through a connector of shard `rank` of `world` on
 * the disk folder, frees it (which drains the write-behind queue) and
 * returns its tier key. */
static uint64_t save_p1_to_disk(int rank, int world)
{
    kvb_connector *c = make_disk_conn(g_tier_dir, rank, world);
    store_p1(c);
    uint64_t key = kvb_connector_tier_key(c);
    kvb_connector_free(c);
    return key;
}

START_TEST(test_disk_tier_serves_a_restarted_connector)
{
    save_p1_to_disk(0, 1);
    /* empty memory, the folder reopened */
    kvb_connector *c = make_disk_conn(g_tier_dir, 0, 1);
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t ns = 0, end = 0;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, P2, N2, NULL, 0, segs, hit, 8, &ns, &end), KVB_OK);
    ck_assert_int_eq(end, 11); /* sys, B, A found on disk */
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P2, N2, NULL, 0, -1, 1, &req), KVB_OK);
    ck_assert_int_eq(kvb_request_blend_end(req), 11);
    ck_assert_mem_eq(kvb_request_forced(req), P2_FORCED, 11);
    check_p2_rows(req, P2_FORCED); /* loaded from disk, re-rotated */
    kvb_request_finish(req, 0);
    kvb_tier_stats d;
    ck_assert_int_eq(kvb_tiers_get_stats(kvb_connector_tiers(c), &d, NULL), KVB_OK);
    ck_assert_int_eq(d.hits, 3);
    ck_assert_int_eq(d.corrupt, 0);
    ck_assert_int_eq(d.entries, 4);
    /* a disk hit was loaded into memory: it is a memory hit now */
    ck_assert_int_eq(stored_entries(c), 3);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_tier_key_separates_shards_and_models)
{
    uint64_t k0 = save_p1_to_disk(0, 2);
    kvb_connector *c = make_disk_conn(g_tier_dir, 1, 2); /* the other rank: other KV heads */
    ck_assert_uint_ne(kvb_connector_tier_key(c), k0);
    ck_assert_int_eq(hits_for(c, 0, P2, N2, NULL), 0);
    kvb_connector_free(c);
    c = make_disk_conn(g_tier_dir, 0, 2);
    ck_assert_uint_eq(kvb_connector_tier_key(c), k0);
    /* other weights of the same architecture and shape (a fine-tune) */
    ck_assert_int_eq(kvb_connector_set_model_id(c, "finetune", 8), KVB_OK);
    ck_assert_uint_ne(kvb_connector_tier_key(c), k0);
    ck_assert_int_eq(hits_for(c, 0, P2, N2, NULL), 0);
    ck_assert_int_eq(kvb_connector_set_model_id(c, NULL, 0), KVB_OK);
    ck_assert_uint_eq(kvb_connector_tier_key(c), k0);
    ck_assert_int_eq(hits_for(c, 0, P2, N2, NULL), 3);
    ck_assert_int_eq(kvb_connector_set_shard(c, 2, 2), KVB_ERR_INVALID);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_corrupt_disk_entry_is_recomputed)
{
    uint64_t key = save_p1_to_disk(0, 1);
    /* flip one byte of A's rows on disk */
    const int32_t a[3] = {10, 11, 12};
    char path[160];
    snprintf(path, sizeof path, "%s/%016llx-%016llx.kvb", g_tier_dir, (unsigned long long)key,
             (unsigned long long)kvb_hash_tokens(a, 3));
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, -7, SEEK_END), 0);
    int ch = fgetc(f);
    ck_assert_int_eq(fseek(f, -7, SEEK_END), 0);
    fputc(ch ^ 0x10, f);
    fclose(f);
    kvb_connector *c = make_disk_conn(g_tier_dir, 0, 1);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, P2, N2, NULL, 0, 11, 1, &req), KVB_OK);
    int64_t nseg, nhit, nforced;
    ck_assert_int_eq(kvb_request_counts(req, &nseg, &nhit, &nforced), KVB_OK);
    ck_assert_int_eq(nhit, 2); /* A is recomputed: its rows are forced */
    const uint8_t forced_a[11] = {0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1};
    ck_assert_mem_eq(kvb_request_forced(req), forced_a, 11);
    check_p2_rows(req, forced_a);
    kvb_request_finish(req, 0);
    kvb_tier_stats d;
    ck_assert_int_eq(kvb_tiers_get_stats(kvb_connector_tiers(c), &d, NULL), KVB_OK);
    ck_assert_int_eq(d.corrupt, 1);
    ck_assert_int_eq(d.hits, 2);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_num_threads_applied_at_creation)
{
    /* KVBLEND_NUM_THREADS and the threads after creation (0: every core) */
    static const struct {
        const char *value;
        int threads;
    } cases[] = {{"1", 1}, {"3", 3}, {"0", 0}};
    kvb_config cfg;
    kvb_model_desc m;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    init_rope(&m);
    for (size_t i = 0; i < COUNT_OF(cases); i++) {
        kvb_connector *c = NULL;
        ck_assert_int_eq(kvb_config_set(&cfg, "KVBLEND_NUM_THREADS", cases[i].value),
                         KVB_OK);
        ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
        if (cases[i].threads > 0) {
            ck_assert_int_eq(kvb_cpu_get_threads(), cases[i].threads);
        } else {
            ck_assert_int_ge(kvb_cpu_get_threads(), 1);
        }
        kvb_connector_free(c);
    }
}
END_TEST

START_TEST(test_fingerprint_names_the_model)
{
    kvb_config cfg;
    kvb_model_desc m;
    kvb_connector *c = NULL;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    init_rope(&m);
    m.architecture = "LlamaForCausalLM";
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    uint64_t base = kvb_connector_fingerprint(c);
    kvb_connector_free(c);
    ck_assert_uint_ne(base, 0);
    for (int change = 0; change < 7; change++) {
        init_rope(&m);
        m.architecture = "LlamaForCausalLM";
        float freq[D / 2];
        memcpy(freq, g_inv_freq, sizeof freq);
        switch (change) {
        case 0: break; /* the same model: the same fingerprint */
        case 1: m.architecture = "Qwen2ForCausalLM"; break;
        case 2: m.num_layers = L + 1; break;
        case 3: m.num_kv_heads = 1; break;
        case 4: m.dtype = KVB_DTYPE_F16; break;
        case 5: freq[1] *= 2.0f; m.rope.inv_freq = freq; break;
        case 6: m.rope.style = KVB_ROPE_GPTJ; break;
        }
        ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
        if (change == 0) {
            ck_assert_uint_eq(kvb_connector_fingerprint(c), base);
        } else {
            ck_assert_uint_ne(kvb_connector_fingerprint(c), base);
        }
        kvb_connector_free(c);
    }
    ck_assert_uint_eq(kvb_connector_fingerprint(NULL), 0);
}
END_TEST

/* Tells swap_separator to stop; atomic, since a volatile flag shared by
 * two threads is a data race (ThreadSanitizer reports it). */
static atomic_int g_stop;

/* Replaces the separator over and over (a caller reconfiguring it). */
static void *swap_separator(void *arg)
{
    kvb_connector *c = arg;
    const int32_t two[2] = {99, 98}, three[3] = {99, 98, 97};
    for (int i = 0; !atomic_load(&g_stop); i++) {
        ck_assert_int_eq(kvb_connector_set_separator(c, i % 2 ? three : two, i % 2 ? 3 : 2), KVB_OK);
    }
    return NULL;
}

START_TEST(test_separator_swap_while_looking_up)
{
    /* lookups and begins split on the separator while another thread
     * replaces it: each sees one separator whole (never freed memory) */
    kvb_connector *c = make_conn(1);
    store_p1(c);
    atomic_store(&g_stop, 0);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, swap_separator, c), 0);
    for (int i = 0; i < 3000; i++) {
        kvb_span segs[8];
        uint8_t hit[8];
        int64_t nseg = 0, end = 0;
        ck_assert_int_eq(kvb_connector_lookup(c, 0, P2, N2, NULL, 0, segs, hit, 8, &nseg, &end), KVB_OK);
        ck_assert(nseg == 4 || nseg == 1);
        int64_t nhit = hits_for(c, 0, P2, N2, NULL);
        ck_assert(nhit == 3 || nhit == 0);
    }
    atomic_store(&g_stop, 1);
    pthread_join(t, NULL);
    kvb_connector_free(c);
}
END_TEST

START_TEST(test_own_reservation_never_evicts_promised_hits)
{
    /* a store that holds P1's segments with 1 KB to spare; then a prompt
     * whose first segment is new (3 KB) and whose next two are P1's A and
     * B: begin pins A and B before reserving the new one, so it reuses
     * what the lookup promised instead of evicting it for itself */
    kvb_connector *c = make_conn(1);
    store_p1(c);
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(kvb_connector_store(c), &st), KVB_OK);
    kvb_connector_free(c);
    kvb_config cfg;
    kvb_model_desc m;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    cfg.enable_blending = 1;
    cfg.max_local_cpu_size_gb = (double)(st.host_bytes + 1024) / 1073741824.0;
    init_rope(&m);
    ck_assert_int_eq(kvb_connector_create(&cfg, &m, -1, &c), KVB_OK);
    const int32_t sep[2] = {99, 98};
    ck_assert_int_eq(kvb_connector_set_separator(c, sep, 2), KVB_OK);
    store_p1(c);
    const int32_t p3[] = {5, 6, 7, 8, 9, 4, 99, 98, 10, 11, 12, 99, 98, 20, 21};
    kvb_span segs[8];
    uint8_t hit[8];
    int64_t nseg = 0, end = 0;
    ck_assert_int_eq(kvb_connector_lookup(c, 0, p3, 15, NULL, 0, segs, hit, 8, &nseg, &end), KVB_OK);
    ck_assert_int_eq(end, 14);
    kvb_request *req = NULL;
    ck_assert_int_eq(kvb_request_begin(c, 0, p3, 15, NULL, 0, -1, 1, &req), KVB_OK);
    int64_t nhit = 0;
    ck_assert_int_eq(kvb_request_counts(req, NULL, &nhit, NULL), KVB_OK);
    ck_assert_int_eq(nhit, 2);
    ck_assert_int_eq(kvb_request_blend_end(req), end);
    kvb_request_finish(req, 0);
    kvb_connector_free(c);
}
END_TEST

/* The connector suite. */
Suite *connector_suite(void)
{
    static const case_spec cases[] = {
        {"core", NULL, NULL, 0},
        {"disk", tier_dir_setup, tier_dir_teardown, 0},
    };
    const test_spec tests[] = {
        {0, test_connector_keeps_the_host_log_sink, 0},
        {0, test_connector_logs_compat_only_settings, 0},
        {0, test_lookup_empty_store_misses, 0},
        {0, test_reordered_prompt_reuses_every_chunk, 0},
        {0, test_load_layer_rerotates_to_new_positions, 0},
        {0, test_promised_rows_survive_eviction, 0},
        {0, test_lookup_end_after_storing_p1, (int)COUNT_OF(kLookupEnds)},
        {0, test_short_prompt_and_no_separator, 0},
        {0, test_duplicate_chunk_hits_twice, 0},
        {0, test_incomplete_save_is_dropped, 0},
        {0, test_prefill_over_steps_stores_each_segment_when_complete, 0},
        {0, test_finish_after_partial_prefill_commits_complete_segments, 0},
        {0, test_bad_arguments_named, 0},
        {0, test_tenants_never_share_chunks, 0},
        {0, test_damaged_chunk_is_recomputed_not_loaded, 0},
        {0, test_fingerprint_names_the_model, 0},
        {0, test_num_threads_applied_at_creation, 0},
        {0, test_own_reservation_never_evicts_promised_hits, 0},
        {0, test_separator_swap_while_looking_up, 0},
        {1, test_disk_tier_serves_a_restarted_connector, 0},
        {1, test_tier_key_separates_shards_and_models, 0},
        {1, test_corrupt_disk_entry_is_recomputed, 0},
    };
    return suite_build("connector", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
