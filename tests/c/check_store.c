/*
 * check_store.c: the chunk store: row round trips, lookups of any subset in
 * any order, hash collisions, LRU eviction order, pins, budgets, the
 * reserve/commit/abort life cycle, byte accounting and concurrent use.
 */
#define _POSIX_C_SOURCE 200809L /* rand_r */
#include <check.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

#define LAYERS 3
#define HEADS 2
#define HSIZE 8

/* Creates a store of LAYERS x HEADS x HSIZE rows in `dtype` with the given
 * host budget, failing the test if creation fails. */
static kvb_store *make_store(kvb_dtype dtype, size_t budget)
{
    kvb_store_params p = {LAYERS, HEADS, HSIZE, dtype, budget, 0};
    kvb_store *s = NULL;
    ck_assert_int_eq(kvb_store_create(&p, &s), KVB_OK);
    ck_assert_ptr_nonnull(s);
    return s;
}

/* Fills toks[0..n) with the token ids of chunk `key` (distinct per key). */
static void chunk_tokens(int key, int32_t *toks, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        toks[i] = (int32_t)(1000 * key + 7 * i + 1);
    }
}

/* Returns the byte the pattern of chunk `key` puts at offset i of layer
 * `layer`'s K (which=0) or V (which=1). */
static unsigned char pattern_byte(int key, int layer, int which, size_t i)
{
    return (unsigned char)(key * 13 + layer * 5 + which * 3 + (int)i * 11);
}

/* Writes chunk `key`'s pattern into every layer's K and V of `e`;
 * `row_bytes` is the byte size of one layer's K. */
static void fill_rows(kvb_entry *e, int key, int layers, size_t row_bytes)
{
    for (int l = 0; l < layers; l++) {
        unsigned char *k = kvb_entry_k(e, l);
        unsigned char *v = kvb_entry_v(e, l);
        for (size_t i = 0; i < row_bytes; i++) {
            k[i] = pattern_byte(key, l, 0, i);
            v[i] = pattern_byte(key, l, 1, i);
        }
    }
}

/* Returns 1 when every layer's K and V of `e` holds chunk `key`'s pattern. */
static int rows_match(kvb_entry *e, int key, int layers, size_t row_bytes)
{
    for (int l = 0; l < layers; l++) {
        const unsigned char *k = kvb_entry_k(e, l);
        const unsigned char *v = kvb_entry_v(e, l);
        for (size_t i = 0; i < row_bytes; i++) {
            if (k[i] != pattern_byte(key, l, 0, i) ||
                v[i] != pattern_byte(key, l, 1, i)) {
                return 0;
            }
        }
    }
    return 1;
}

/* Byte size of one layer's K for n tokens in `dtype`. */
static size_t row_bytes_for(int64_t n, kvb_dtype dtype)
{
    return (size_t)n * HEADS * HSIZE * kvb_dtype_size(dtype);
}

/* Reserves, fills and commits chunk `key` of n tokens; returns 1 when it
 * was stored, 0 when reserve returned NULL. */
static int put(kvb_store *s, int key, int64_t n)
{
    int32_t toks[256];
    kvb_entry *e = NULL;
    chunk_tokens(key, toks, n);
    ck_assert_int_eq(kvb_store_reserve(s, toks, n, NULL, &e), KVB_OK);
    if (e == NULL) {
        return 0;
    }
    /* V follows K in each layer, so their distance is one layer's K */
    fill_rows(e, key, LAYERS,
              (size_t)((char *)kvb_entry_v(e, 0) - (char *)kvb_entry_k(e, 0)));
    ck_assert_int_eq(kvb_store_commit(s, e), KVB_OK);
    return 1;
}

/* Returns whether chunk `key` of n tokens is stored and ready. */
static int has(kvb_store *s, int key, int64_t n)
{
    int32_t toks[256];
    int found = -1;
    chunk_tokens(key, toks, n);
    ck_assert_int_eq(kvb_store_contains(s, toks, n, &found), KVB_OK);
    return found;
}

/* Acquires chunk `key` of n tokens (NULL on a miss). */
static kvb_entry *get(kvb_store *s, int key, int64_t n)
{
    int32_t toks[256];
    kvb_entry *e = (kvb_entry *)1;
    chunk_tokens(key, toks, n);
    ck_assert_int_eq(kvb_store_acquire(s, toks, n, &e), KVB_OK);
    return e;
}

/* Returns the bytes one committed entry of n tokens is charged, measured on
 * a store with ample room. */
static size_t entry_size(int64_t n)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 30);
    kvb_store_stats st;
    ck_assert(put(s, 99, n));
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    kvb_store_free(s);
    return st.host_bytes;
}

/* Log capture: the last line and its level, plus a count. */
static struct {
    char line[1024];
    kvb_log_level level;
    int count;
} g_log;

/* Log sink that records the last line. */
static void capture_log(kvb_log_level level, const char *msg, void *user)
{
    (void)user;
    snprintf(g_log.line, sizeof g_log.line, "%s", msg);
    g_log.level = level;
    g_log.count++;
}

/* Routes log lines of every level into g_log. */
static void start_capture(void)
{
    memset(&g_log, 0, sizeof g_log);
    kvb_set_log(capture_log, NULL, KVB_LOG_DEBUG);
}

/* Restores the default log sink. */
static void stop_capture(void)
{
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
}

START_TEST(test_store_create_names_bad_params)
{
    kvb_store_params good = {2, 2, 8, KVB_DTYPE_BF16, 1024, 0};
    kvb_store_params p;
    kvb_store *s = (kvb_store *)1;
    struct {
        int field;
        int32_t value;
        const char *frag;
    } cases[] = {
        {0, 0, "params->num_layers=0 is invalid (expected > 0)"},
        {1, -2, "params->num_kv_heads=-2 is invalid"},
        {2, 0, "params->head_size=0 is invalid"},
        {3, 9, "params->dtype=9 is unknown"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        p = good;
        if (cases[i].field == 0) p.num_layers = cases[i].value;
        if (cases[i].field == 1) p.num_kv_heads = cases[i].value;
        if (cases[i].field == 2) p.head_size = cases[i].value;
        if (cases[i].field == 3) p.dtype = (kvb_dtype)cases[i].value;
        kvb_clear_error();
        ck_assert_int_eq(kvb_store_create(&p, &s), KVB_ERR_INVALID);
        ck_assert_ptr_null(s);
        ck_assert_msg(strstr(kvb_last_error(), cases[i].frag) != NULL,
                      "'%s' lacks '%s'", kvb_last_error(), cases[i].frag);
    }
    ck_assert_int_eq(kvb_store_create(NULL, &s), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_store_create(&good, NULL), KVB_ERR_INVALID);
    kvb_store_free(NULL); /* no-op */
}
END_TEST

START_TEST(test_store_roundtrip_every_layer)
{
    kvb_store *s = make_store(KVB_DTYPE_BF16, (size_t)1 << 20);
    int32_t toks[5];
    int64_t pos[5] = {40, 41, 42, 43, 44};
    kvb_entry *e = NULL;
    size_t rb = row_bytes_for(5, KVB_DTYPE_BF16);
    chunk_tokens(1, toks, 5);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 5, pos, &e), KVB_OK);
    ck_assert_ptr_nonnull(e);
    fill_rows(e, 1, LAYERS, rb);
    ck_assert_int_eq(kvb_store_commit(s, e), KVB_OK);
    /* the caller's arrays are copied, not borrowed */
    toks[0] = -7;
    pos[0] = -7;

    e = get(s, 1, 5);
    ck_assert_ptr_nonnull(e);
    ck_assert(rows_match(e, 1, LAYERS, rb));
    ck_assert_int_eq(kvb_entry_num_tokens(e), 5);
    chunk_tokens(1, toks, 5);
    ck_assert_mem_eq(kvb_entry_tokens(e), toks, sizeof toks);
    ck_assert_uint_eq(kvb_entry_hash(e), kvb_hash_tokens(toks, 5));
    for (int i = 0; i < 5; i++) {
        ck_assert_int_eq(kvb_entry_positions(e)[i], 40 + i);
    }
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_HOST);
    /* per layer K then V, contiguous: the layout the load ops rely on */
    for (int l = 0; l < LAYERS; l++) {
        ck_assert_ptr_eq(kvb_entry_v(e, l), (char *)kvb_entry_k(e, l) + rb);
        ck_assert_ptr_eq(kvb_entry_k(e, l),
                         (char *)kvb_entry_k(e, 0) + 2 * (size_t)l * rb);
    }
    ck_assert_ptr_null(kvb_entry_k(e, -1));
    ck_assert_ptr_null(kvb_entry_v(e, LAYERS));
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);

    /* positions NULL means 0..n-1 */
    ck_assert(put(s, 2, 4));
    e = get(s, 2, 4);
    for (int i = 0; i < 4; i++) {
        ck_assert_int_eq(kvb_entry_positions(e)[i], i);
    }
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_lookup_any_subset_any_order)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    const int64_t len[5] = {3, 17, 1, 64, 9};
    for (int k = 0; k < 5; k++) {
        ck_assert(put(s, k, len[k]));
    }
    const int orders[3][5] = {{3, 0, 4, -1, -1},
                              {4, 3, 2, 1, 0},
                              {1, 1, 2, -1, -1}};
    for (int o = 0; o < 3; o++) {
        for (int j = 0; j < 5 && orders[o][j] >= 0; j++) {
            int k = orders[o][j];
            kvb_entry *e = get(s, k, len[k]);
            ck_assert_ptr_nonnull(e);
            ck_assert(rows_match(e, k, LAYERS,
                                 row_bytes_for(len[k], KVB_DTYPE_F32)));
            ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
        }
    }
    /* a missing chunk, a prefix and an extension of a stored one miss */
    ck_assert_ptr_null(get(s, 7, 5));
    ck_assert_ptr_null(get(s, 1, 16));
    ck_assert_ptr_null(get(s, 4, 10));
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.lookups, 3 + 5 + 3 + 3);
    ck_assert_int_eq(st.hits, 3 + 5 + 3);
    ck_assert_int_eq(st.inserts, 5);
    ck_assert_int_eq(st.num_entries, 5);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_many_entries_all_found)
{
    /* far more entries than the initial bucket count: the table grows */
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 28);
    for (int k = 0; k < 2000; k++) {
        ck_assert(put(s, k, 2));
    }
    for (int k = 0; k < 2000; k++) {
        kvb_entry *e = get(s, k, 2);
        ck_assert_ptr_nonnull(e);
        ck_assert(rows_match(e, k, LAYERS, row_bytes_for(2, KVB_DTYPE_F32)));
        ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    }
    kvb_store_free(s);
}
END_TEST

/* A hash function that sends every chunk to the same key. */
static uint64_t constant_hash(const int32_t *tokens, int64_t n)
{
    (void)tokens;
    (void)n;
    return 42;
}

START_TEST(test_store_collision_never_returns_other_chunk)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_debug_set_hash(s, constant_hash), KVB_OK);
    ck_assert(put(s, 1, 8));
    ck_assert(put(s, 2, 8)); /* same hash, same length, other tokens */
    ck_assert(put(s, 3, 5)); /* same hash, other length */
    for (int k = 1; k <= 3; k++) {
        int64_t n = k == 3 ? 5 : 8;
        kvb_entry *e = get(s, k, n);
        ck_assert_ptr_nonnull(e);
        ck_assert_uint_eq(kvb_entry_hash(e), 42);
        ck_assert(rows_match(e, k, LAYERS, row_bytes_for(n, KVB_DTYPE_F32)));
        int32_t toks[8];
        chunk_tokens(k, toks, n);
        ck_assert_mem_eq(kvb_entry_tokens(e), toks, (size_t)n * 4);
        ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    }
    /* a fourth chunk with the same hash is a miss, counted as a collision */
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    int64_t before = st.collisions;
    ck_assert_int_ge(before, 1);
    ck_assert_ptr_null(get(s, 4, 8));
    ck_assert_int_eq(has(s, 4, 8), 0);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.collisions, before + 1); /* contains adds nothing */
    ck_assert_int_eq(st.num_entries, 3);
    /* the hash can only be replaced on an empty store */
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_debug_set_hash(s, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "holds 3 entries"));
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    ck_assert_int_eq(kvb_store_debug_set_hash(s, NULL), KVB_OK);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_lru_evicts_least_recent)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    kvb_store_stats st;
    ck_assert(put(s, 'A', 4));
    ck_assert(put(s, 'B', 4));
    ck_assert(put(s, 'C', 4));
    ck_assert_int_eq(has(s, 'A', 4), 0);
    ck_assert_int_eq(has(s, 'B', 4), 1);
    ck_assert_int_eq(has(s, 'C', 4), 1);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.evictions, 1);
    ck_assert_uint_eq(st.host_bytes, 2 * es);
    ck_assert_int_eq(st.rejected, 0);
    /* contains does not refresh B, so B goes next */
    ck_assert(put(s, 'D', 4));
    ck_assert_int_eq(has(s, 'B', 4), 0);
    ck_assert_int_eq(has(s, 'C', 4), 1);
    ck_assert_int_eq(has(s, 'D', 4), 1);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_lru_acquire_refreshes)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    ck_assert(put(s, 'A', 4));
    ck_assert(put(s, 'B', 4));
    kvb_entry *e = get(s, 'A', 4); /* touch A: B is now the oldest */
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    ck_assert(put(s, 'C', 4));
    ck_assert_int_eq(has(s, 'A', 4), 1);
    ck_assert_int_eq(has(s, 'B', 4), 0);
    ck_assert_int_eq(has(s, 'C', 4), 1);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_pinned_never_evicted)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    kvb_store_stats st;
    int32_t toks[4];
    kvb_entry *c = (kvb_entry *)1;
    ck_assert(put(s, 'A', 4));
    ck_assert(put(s, 'B', 4));
    kvb_entry *a = get(s, 'A', 4);
    kvb_entry *b = get(s, 'B', 4);
    start_capture();
    chunk_tokens('C', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 4, NULL, &c), KVB_OK);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(g_log.count, 1);
    ck_assert_int_eq(g_log.level, KVB_LOG_INFO);
    ck_assert_ptr_nonnull(strstr(g_log.line, "not storing a chunk of 4 "
                                             "tokens"));
    stop_capture();
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 1);
    ck_assert_int_eq(st.evictions, 0); /* nothing evicted in vain */
    ck_assert(rows_match(a, 'A', LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    ck_assert(rows_match(b, 'B', LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    /* B unpinned: C evicts B, not the older but pinned A */
    ck_assert_int_eq(kvb_store_unpin(s, b), KVB_OK);
    ck_assert(put(s, 'C', 4));
    ck_assert_int_eq(has(s, 'A', 4), 1);
    ck_assert_int_eq(has(s, 'B', 4), 0);
    ck_assert(rows_match(a, 'A', LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(s, a), KVB_OK);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_pending_entry_blocks_eviction)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, es + es / 2);
    int32_t toks[4];
    kvb_entry *a = NULL, *b = (kvb_entry *)1;
    chunk_tokens('A', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 4, NULL, &a), KVB_OK);
    ck_assert_ptr_nonnull(a);
    chunk_tokens('B', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 4, NULL, &b), KVB_OK);
    ck_assert_ptr_null(b); /* only the pending A could make room */
    ck_assert_int_eq(kvb_store_commit(s, a), KVB_OK);
    ck_assert(put(s, 'B', 4)); /* now A is evictable */
    ck_assert_int_eq(has(s, 'A', 4), 0);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_oversized_entry_rejected)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, es - 1);
    kvb_store_stats st;
    char want[128];
    start_capture();
    ck_assert_int_eq(put(s, 'A', 4), 0);
    ck_assert_int_eq(g_log.count, 1);
    ck_assert_int_eq(g_log.level, KVB_LOG_WARNING);
    snprintf(want, sizeof want, "(%zu bytes): the host budget is %zu bytes",
             es, es - 1);
    ck_assert_msg(strstr(g_log.line, want) != NULL, "'%s' lacks '%s'",
                  g_log.line, want);
    stop_capture();
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 1);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_uint_eq(st.host_bytes, 0);
    /* smaller chunks still fit */
    ck_assert(put(s, 'B', 2));
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_zero_budget_stores_nothing)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, 0);
    kvb_store_stats st;
    start_capture();
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(put(s, k, 1), 0);
    }
    stop_capture();
    ck_assert_int_eq(has(s, 0, 1), 0);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 3);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_uint_eq(st.host_bytes, 0);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_duplicate_reserve_returns_null)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    int32_t toks[6];
    kvb_entry *a = NULL, *dup = (kvb_entry *)1;
    chunk_tokens(5, toks, 6);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 6, NULL, &a), KVB_OK);
    ck_assert_ptr_nonnull(a);
    /* while pending */
    ck_assert_int_eq(kvb_store_reserve(s, toks, 6, NULL, &dup), KVB_OK);
    ck_assert_ptr_null(dup);
    ck_assert_int_eq(kvb_store_commit(s, a), KVB_OK);
    /* once ready */
    dup = (kvb_entry *)1;
    ck_assert_int_eq(kvb_store_reserve(s, toks, 6, NULL, &dup), KVB_OK);
    ck_assert_ptr_null(dup);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.num_entries, 1);
    ck_assert_int_eq(st.rejected, 0); /* a duplicate is not a rejection */
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_abort_frees_reservation)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    int32_t toks[6];
    kvb_entry *a = NULL;
    chunk_tokens(5, toks, 6);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 6, NULL, &a), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_gt(st.host_bytes, 0);
    ck_assert_int_eq(kvb_store_abort(s, a), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.host_bytes, 0);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_int_eq(st.inserts, 0);
    ck_assert_int_eq(has(s, 5, 6), 0);
    /* the tokens can be reserved again; commit twice and abort after
     * commit are errors */
    ck_assert(put(s, 5, 6));
    kvb_entry *e = get(s, 5, 6);
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_commit(s, e), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_commit: entry"));
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "is not pending"));
    ck_assert_int_eq(kvb_store_abort(s, e), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_store_abort: entry"));
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    ck_assert_int_eq(has(s, 5, 6), 1); /* the failed calls changed nothing */
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_unpin_counts_pins)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, es + es / 2);
    ck_assert(put(s, 'A', 4));
    kvb_entry *e1 = get(s, 'A', 4);
    kvb_entry *e2 = get(s, 'A', 4);
    ck_assert_ptr_eq(e1, e2);
    ck_assert_int_eq(kvb_store_unpin(s, e1), KVB_OK);
    ck_assert_int_eq(put(s, 'B', 4), 0); /* A still pinned once */
    ck_assert_int_eq(kvb_store_unpin(s, e1), KVB_OK);
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_unpin(s, e1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "is not pinned"));
    ck_assert(put(s, 'B', 4)); /* now A can go */
    ck_assert_int_eq(has(s, 'A', 4), 0);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_pending_invisible)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    int32_t toks[3];
    kvb_entry *a = NULL;
    chunk_tokens(8, toks, 3);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 3, NULL, &a), KVB_OK);
    ck_assert_int_eq(has(s, 8, 3), 0);
    ck_assert_ptr_null(get(s, 8, 3));
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_unpin(s, a), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "is pending"));
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.lookups, 1);
    ck_assert_int_eq(st.hits, 0);
    ck_assert_int_eq(st.num_entries, 1); /* it holds memory meanwhile */
    ck_assert_int_eq(kvb_store_commit(s, a), KVB_OK);
    ck_assert_int_eq(has(s, 8, 3), 1);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_bytes_return_to_zero_after_clear)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    int32_t toks[4];
    kvb_entry *pending = NULL;
    for (int k = 0; k < 3; k++) {
        ck_assert(put(s, k, 4));
    }
    kvb_entry *pinned = get(s, 1, 4);
    chunk_tokens(9, toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, toks, 4, NULL, &pending), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.host_bytes, 4 * es);
    /* clear keeps the pinned and the pending entry */
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.host_bytes, 2 * es);
    ck_assert_int_eq(st.num_entries, 2);
    ck_assert_int_eq(st.evictions, 0);
    ck_assert(rows_match(pinned, 1, LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(s, pinned), KVB_OK);
    ck_assert_int_eq(kvb_store_commit(s, pending), KVB_OK);
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.host_bytes, 0);
    ck_assert_uint_eq(st.device_bytes, 0);
    ck_assert_int_eq(st.num_entries, 0);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_bad_arguments_named)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store *other = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    int32_t toks[2] = {1, 2};
    kvb_entry *e = NULL;
    int found;
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_acquire(s, toks, 0, &e), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_acquire: n=0 is invalid"));
    ck_assert_int_eq(kvb_store_reserve(s, NULL, 2, NULL, &e),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_reserve: tokens is NULL with "
                                 "n=2"));
    ck_assert_int_eq(kvb_store_contains(NULL, toks, 2, &found),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "store is NULL"));
    ck_assert_int_eq(kvb_store_reserve(s, toks, 2, NULL, NULL),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_store_commit(s, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_commit: entry is NULL"));
    ck_assert_int_eq(kvb_store_reserve(other, toks, 2, NULL, &e), KVB_OK);
    ck_assert_int_eq(kvb_store_commit(s, e), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "another store"));
    ck_assert_int_eq(kvb_store_commit(other, e), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, NULL), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_entry_num_tokens(NULL), 0);
    ck_assert_ptr_null(kvb_entry_k(NULL, 0));
    kvb_store_free(other);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_free_with_pinned_entry_warns)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    ck_assert(put(s, 1, 3));
    ck_assert_ptr_nonnull(get(s, 1, 3));
    start_capture();
    kvb_store_free(s); /* frees it anyway: no leak under ASan */
    ck_assert_int_eq(g_log.level, KVB_LOG_WARNING);
    ck_assert_ptr_nonnull(strstr(g_log.line, "1 entries still pinned"));
    stop_capture();
}
END_TEST

/* ---- concurrent use ----------------------------------------------------- */

#define STRESS_THREADS 4
#define STRESS_OPS 3000
#define STRESS_KEYS 12
#define STRESS_TOKENS 16

typedef struct stress_arg {
    kvb_store *store;
    unsigned seed;
    int errors;  /* unexpected statuses or wrong rows */
    int stored;  /* commits done by this thread */
} stress_arg;

/* One worker: random reserve/fill/commit-or-abort, acquire/verify/unpin and
 * contains on a small set of keys shared with the other workers. */
static void *stress_main(void *p)
{
    stress_arg *a = p;
    int32_t toks[STRESS_TOKENS];
    size_t rb = row_bytes_for(STRESS_TOKENS, KVB_DTYPE_F32);
    for (int op = 0; op < STRESS_OPS; op++) {
        unsigned r = (unsigned)rand_r(&a->seed);
        int key = (int)(r % STRESS_KEYS);
        kvb_entry *e = NULL;
        int found;
        chunk_tokens(key, toks, STRESS_TOKENS);
        switch ((r / STRESS_KEYS) % 3) {
        case 0:
            if (kvb_store_reserve(a->store, toks, STRESS_TOKENS, NULL, &e)) {
                a->errors++;
            } else if (e != NULL) {
                fill_rows(e, key, LAYERS, rb);
                if ((r >> 12) % 8 == 0) {
                    a->errors += kvb_store_abort(a->store, e) != KVB_OK;
                } else {
                    a->errors += kvb_store_commit(a->store, e) != KVB_OK;
                    a->stored++;
                }
            }
            break;
        case 1:
            if (kvb_store_acquire(a->store, toks, STRESS_TOKENS, &e)) {
                a->errors++;
            } else if (e != NULL) {
                a->errors += !rows_match(e, key, LAYERS, rb);
                a->errors += memcmp(kvb_entry_tokens(e), toks,
                                    sizeof toks) != 0;
                a->errors += kvb_store_unpin(a->store, e) != KVB_OK;
            }
            break;
        default:
            a->errors += kvb_store_contains(a->store, toks, STRESS_TOKENS,
                                            &found) != KVB_OK;
            break;
        }
    }
    return NULL;
}

START_TEST(test_store_threads_keep_invariants)
{
    size_t es = entry_size(STRESS_TOKENS);
    size_t budget = 4 * es + es / 3;
    kvb_store *s = make_store(KVB_DTYPE_F32, budget);
    pthread_t t[STRESS_THREADS];
    stress_arg args[STRESS_THREADS];
    int stored = 0;
    start_capture(); /* rejections are logged; keep stderr quiet */
    for (int i = 0; i < STRESS_THREADS; i++) {
        args[i] = (stress_arg){s, 1234u + 77u * (unsigned)i, 0, 0};
        ck_assert_int_eq(pthread_create(&t[i], NULL, stress_main, &args[i]),
                         0);
    }
    for (int i = 0; i < STRESS_THREADS; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(args[i].errors, 0);
        stored += args[i].stored;
    }
    stop_capture();
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_le(st.host_bytes, budget);
    ck_assert_uint_eq(st.host_bytes, (size_t)st.num_entries * es);
    ck_assert_int_le(st.num_entries, 4);
    ck_assert_int_eq(st.inserts, stored);
    ck_assert_int_eq(st.num_entries, st.inserts - st.evictions);
    ck_assert_int_le(st.hits, st.lookups);
    ck_assert_int_gt(st.hits, 0);
    ck_assert_int_gt(st.evictions, 0);
    ck_assert_int_eq(st.collisions, 0);
    /* nothing is left pinned: every entry can be cleared */
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.host_bytes, 0);
    ck_assert_int_eq(st.num_entries, 0);
    kvb_store_free(s);
}
END_TEST

Suite *store_suite(void)
{
    Suite *s = suite_create("store");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_store_create_names_bad_params);
    tcase_add_test(tc, test_store_roundtrip_every_layer);
    tcase_add_test(tc, test_store_lookup_any_subset_any_order);
    tcase_add_test(tc, test_store_many_entries_all_found);
    tcase_add_test(tc, test_store_collision_never_returns_other_chunk);
    tcase_add_test(tc, test_store_lru_evicts_least_recent);
    tcase_add_test(tc, test_store_lru_acquire_refreshes);
    tcase_add_test(tc, test_store_pinned_never_evicted);
    tcase_add_test(tc, test_store_pending_entry_blocks_eviction);
    tcase_add_test(tc, test_store_oversized_entry_rejected);
    tcase_add_test(tc, test_store_zero_budget_stores_nothing);
    tcase_add_test(tc, test_store_duplicate_reserve_returns_null);
    tcase_add_test(tc, test_store_abort_frees_reservation);
    tcase_add_test(tc, test_store_unpin_counts_pins);
    tcase_add_test(tc, test_store_pending_invisible);
    tcase_add_test(tc, test_store_bytes_return_to_zero_after_clear);
    tcase_add_test(tc, test_store_bad_arguments_named);
    tcase_add_test(tc, test_store_free_with_pinned_entry_warns);
    tcase_add_test(tc, test_store_threads_keep_invariants);
    suite_add_tcase(s, tc);
    tcase_set_timeout(tc, 120);
    return s;
}
