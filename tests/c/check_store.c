/*
 * check_store.c: the chunk store: row round trips, lookups of any subset in
 * any order, hash collisions, LRU eviction order, pins, budgets, the
 * reserve/commit/abort life cycle, byte accounting and concurrent use;
 * and the two tiers over stand-in allocators with a memcpy mover: demotion,
 * promotion, failures and one LRU order across the tiers.
 */
#define _POSIX_C_SOURCE 200809L /* rand_r */
#include "test_util.h"

#include <check.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvblend.h"
/* the internal tier hooks (exported for these tests) */
#include "../../csrc/store.h"

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
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, n, NULL, &e), KVB_OK);
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
    ck_assert_int_eq(kvb_store_contains(s, 0, toks, n, &found), KVB_OK);
    return found;
}

/* Puts the chunks named by the characters of `keys`, n tokens each; each
 * must be stored. */
static void put_each(kvb_store *s, const char *keys, int64_t n)
{
    for (const char *k = keys; *k; k++) {
        ck_assert_msg(put(s, *k, n), "chunk %c not stored", *k);
    }
}

/* Checks that the chunks named in `in` (n tokens each) are stored and
 * those in `out` are not. */
static void expect_stored(kvb_store *s, const char *in, const char *out,
                          int64_t n)
{
    for (const char *k = in; *k; k++) {
        ck_assert_msg(has(s, *k, n) == 1, "chunk %c not stored", *k);
    }
    for (const char *k = out; *k; k++) {
        ck_assert_msg(has(s, *k, n) == 0, "chunk %c still stored", *k);
    }
}

/* Puts chunks first .. first+count-1 of n tokens, each of which must be
 * stored. */
static void put_keys(kvb_store *s, int first, int count, int64_t n)
{
    for (int k = first; k < first + count; k++) {
        ck_assert_msg(put(s, k, n), "chunk %d not stored", k);
    }
}

/* Acquires chunk `key` of n tokens (NULL on a miss). */
static kvb_entry *get(kvb_store *s, int key, int64_t n)
{
    int32_t toks[256];
    kvb_entry *e = (kvb_entry *)1;
    chunk_tokens(key, toks, n);
    ck_assert_int_eq(kvb_store_acquire(s, 0, toks, n, &e), KVB_OK);
    return e;
}

/* Checks the store's entry count and host bytes; ANY skips one. */
#define ANY (-1)
static void expect_usage(kvb_store *s, int64_t entries, int64_t host_bytes)
{
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    if (entries != ANY) {
        ck_assert_int_eq(st.num_entries, entries);
    }
    if (host_bytes != ANY) {
        ck_assert_uint_eq(st.host_bytes, (size_t)host_bytes);
    }
}

/* Reserves chunk `key` of n tokens and returns the pending entry (NULL
 * when the store declined it). */
static kvb_entry *reserve_chunk(kvb_store *s, int key, int64_t n)
{
    int32_t toks[256];
    kvb_entry *e = (kvb_entry *)1;
    chunk_tokens(key, toks, n);
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, n, NULL, &e), KVB_OK);
    return e;
}

/* A store of 1 MiB that checksums every entry. */
static kvb_store *make_checked_store(void)
{
    kvb_store_params p = {LAYERS, HEADS, HSIZE, KVB_DTYPE_F32, (size_t)1 << 20, 0, 1};
    kvb_store *s = NULL;
    ck_assert_int_eq(kvb_store_create(&p, &s), KVB_OK);
    return s;
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

/* What the store logged while a test captured it. */
static test_log g_log;

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
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 5, pos, &e), KVB_OK);
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
    expect_usage(s, 5, ANY);
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
    expect_usage(s, 3, ANY);
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
    kvb_store_stats st;
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    put_each(s, "ABC", 4);
    expect_stored(s, "BC", "A", 4);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.evictions, 1);
    ck_assert_int_eq(st.rejected, 0);
    expect_usage(s, ANY, 2 * es);
    /* contains does not refresh B, so B goes next */
    ck_assert(put(s, 'D', 4));
    expect_stored(s, "CD", "B", 4);
    kvb_store_free(s);
}
END_TEST

/* Hash of chunk `key`'s n tokens as the store keys it. */
static uint64_t chunk_hash(int key, int64_t n)
{
    int32_t toks[256];
    chunk_tokens(key, toks, n);
    return kvb_hash_tokens(toks, n);
}

START_TEST(test_store_events_mirror_commits_and_evictions)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    kvb_store_event ev[8];
    int64_t n = -1;
    int lost = -1;
    ck_assert(put(s, 'Z', 4)); /* before watching: not recorded */
    ck_assert_int_eq(kvb_store_watch(s, 1), KVB_OK);
    ck_assert(put(s, 'A', 4)); /* Z and A fit */
    ck_assert(put(s, 'B', 4)); /* evicts Z (its reservation, then added) */
    int32_t toks[4];
    kvb_entry *e = NULL;
    chunk_tokens('C', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 4, NULL, &e), KVB_OK);
    ck_assert_ptr_nonnull(e); /* evicts A to make room */
    ck_assert_int_eq(kvb_store_abort(s, e), KVB_OK); /* pending: no event */
    ck_assert_int_eq(kvb_store_take_events(s, ev, 2, &n, &lost), KVB_OK);
    ck_assert_int_eq(n, 2); /* cap 2: the oldest two, the rest stay */
    ck_assert_int_eq(lost, 0);
    ck_assert_int_eq(ev[0].kind, KVB_STORE_EVENT_ADDED);
    ck_assert_uint_eq(ev[0].hash, chunk_hash('A', 4));
    ck_assert_int_eq(ev[0].num_tokens, 4);
    ck_assert_int_eq(ev[1].kind, KVB_STORE_EVENT_REMOVED);
    ck_assert_uint_eq(ev[1].hash, chunk_hash('Z', 4));
    ck_assert_int_eq(kvb_store_take_events(s, ev, 8, &n, NULL), KVB_OK);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(ev[0].kind, KVB_STORE_EVENT_ADDED);
    ck_assert_uint_eq(ev[0].hash, chunk_hash('B', 4));
    ck_assert_int_eq(ev[1].kind, KVB_STORE_EVENT_REMOVED);
    ck_assert_uint_eq(ev[1].hash, chunk_hash('A', 4));
    ck_assert_int_eq(kvb_store_take_events(s, ev, 8, &n, NULL), KVB_OK);
    ck_assert_int_eq(n, 0);
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK); /* B removed */
    ck_assert_int_eq(kvb_store_take_events(s, ev, 8, &n, NULL), KVB_OK);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(ev[0].kind, KVB_STORE_EVENT_REMOVED);
    ck_assert_uint_eq(ev[0].hash, chunk_hash('B', 4));
    /* stopping drops the log and records nothing more */
    ck_assert(put(s, 'D', 4));
    ck_assert_int_eq(kvb_store_watch(s, 0), KVB_OK);
    ck_assert(put(s, 'E', 4));
    ck_assert_int_eq(kvb_store_take_events(s, ev, 8, &n, NULL), KVB_OK);
    ck_assert_int_eq(n, 0);
    ck_assert_int_eq(kvb_store_take_events(NULL, ev, 8, &n, NULL),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_store_take_events"));
    ck_assert_int_eq(kvb_store_take_events(s, NULL, 8, &n, NULL),
                     KVB_ERR_INVALID);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_events_many_grow_in_order)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 30);
    ck_assert_int_eq(kvb_store_watch(s, 1), KVB_OK);
    for (int k = 0; k < 300; k++) {
        ck_assert(put(s, k, 3));
    }
    kvb_store_event ev[100];
    int seen = 0;
    for (;;) {
        int64_t n = 0;
        ck_assert_int_eq(kvb_store_take_events(s, ev, 100, &n, NULL), KVB_OK);
        for (int64_t i = 0; i < n; i++, seen++) {
            ck_assert_int_eq(ev[i].kind, KVB_STORE_EVENT_ADDED);
            ck_assert_uint_eq(ev[i].hash, chunk_hash(seen, 3));
        }
        if (n < 100) {
            break;
        }
    }
    ck_assert_int_eq(seen, 300);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_lru_acquire_refreshes)
{
    size_t es = entry_size(4);
    kvb_store *s = make_store(KVB_DTYPE_F32, 2 * es + es / 2);
    put_each(s, "AB", 4);
    kvb_entry *e = get(s, 'A', 4); /* touch A: B is now the oldest */
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    ck_assert(put(s, 'C', 4));
    expect_stored(s, "AC", "B", 4);
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
    put_each(s, "AB", 4);
    kvb_entry *a = get(s, 'A', 4);
    kvb_entry *b = get(s, 'B', 4);
    test_log_start(&g_log, NULL);
    chunk_tokens('C', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 4, NULL, &c), KVB_OK);
    ck_assert_ptr_null(c);
    ck_assert_int_eq(g_log.total, 1);
    ck_assert_int_eq(g_log.level, KVB_LOG_INFO);
    ck_assert_ptr_nonnull(strstr(g_log.line, "not storing a chunk of 4 "
                                             "tokens"));
    test_log_stop(&g_log);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 1);
    ck_assert_int_eq(st.evictions, 0); /* nothing evicted in vain */
    ck_assert(rows_match(a, 'A', LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    ck_assert(rows_match(b, 'B', LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    /* B unpinned: C evicts B, not the older but pinned A */
    ck_assert_int_eq(kvb_store_unpin(s, b), KVB_OK);
    ck_assert(put(s, 'C', 4));
    expect_stored(s, "A", "B", 4);
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
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 4, NULL, &a), KVB_OK);
    ck_assert_ptr_nonnull(a);
    chunk_tokens('B', toks, 4);
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 4, NULL, &b), KVB_OK);
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
    test_log_start(&g_log, NULL);
    ck_assert_int_eq(put(s, 'A', 4), 0);
    ck_assert_int_eq(g_log.total, 1);
    ck_assert_int_eq(g_log.level, KVB_LOG_WARNING);
    snprintf(want, sizeof want, "(%zu bytes): the host budget is %zu bytes",
             es, es - 1);
    ck_assert_msg(strstr(g_log.line, want) != NULL, "'%s' lacks '%s'",
                  g_log.line, want);
    test_log_stop(&g_log);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 1);
    expect_usage(s, 0, 0);
    /* smaller chunks still fit */
    ck_assert(put(s, 'B', 2));
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_zero_budget_stores_nothing)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, 0);
    kvb_store_stats st;
    test_log_start(&g_log, NULL);
    for (int k = 0; k < 3; k++) {
        ck_assert_int_eq(put(s, k, 1), 0);
    }
    test_log_stop(&g_log);
    ck_assert_int_eq(has(s, 0, 1), 0);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 3);
    expect_usage(s, 0, 0);
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
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 6, NULL, &a), KVB_OK);
    ck_assert_ptr_nonnull(a);
    /* while pending */
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 6, NULL, &dup), KVB_OK);
    ck_assert_ptr_null(dup);
    ck_assert_int_eq(kvb_store_commit(s, a), KVB_OK);
    /* once ready */
    dup = (kvb_entry *)1;
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 6, NULL, &dup), KVB_OK);
    ck_assert_ptr_null(dup);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.rejected, 0); /* a duplicate is not a rejection */
    expect_usage(s, 1, ANY);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_abort_frees_reservation)
{
    kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
    kvb_store_stats st;
    kvb_entry *a = reserve_chunk(s, 5, 6);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_gt(st.host_bytes, 0);
    ck_assert_int_eq(kvb_store_abort(s, a), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.inserts, 0);
    expect_usage(s, 0, 0);
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
    kvb_entry *a = reserve_chunk(s, 8, 3);
    ck_assert_int_eq(has(s, 8, 3), 0);
    ck_assert_ptr_null(get(s, 8, 3));
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_unpin(s, a), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "is pending"));
    kvb_store_stats st;
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
    put_keys(s, 0, 3, 4);
    kvb_entry *pinned = get(s, 1, 4);
    kvb_entry *pending = reserve_chunk(s, 9, 4);
    expect_usage(s, ANY, 4 * es);
    /* clear keeps the pinned and the pending entry */
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.evictions, 0);
    expect_usage(s, 2, 2 * es);
    ck_assert(rows_match(pinned, 1, LAYERS, row_bytes_for(4, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(s, pinned), KVB_OK);
    ck_assert_int_eq(kvb_store_commit(s, pending), KVB_OK);
    ck_assert_int_eq(kvb_store_clear(s), KVB_OK);
    expect_usage(s, 0, 0);
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_uint_eq(st.device_bytes, 0);
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
    ck_assert_int_eq(kvb_store_acquire(s, 0, toks, 0, &e), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_acquire: n=0 is invalid"));
    ck_assert_int_eq(kvb_store_reserve(s, 0, NULL, 2, NULL, &e),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_reserve: tokens is NULL with "
                                 "n=2"));
    ck_assert_int_eq(kvb_store_contains(NULL, 0, toks, 2, &found),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "store is NULL"));
    ck_assert_int_eq(kvb_store_reserve(s, 0, toks, 2, NULL, NULL),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_store_commit(s, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_commit: entry is NULL"));
    ck_assert_int_eq(kvb_store_reserve(other, 0, toks, 2, NULL, &e), KVB_OK);
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
    test_log_start(&g_log, NULL);
    kvb_store_free(s); /* frees it anyway: no leak under ASan */
    ck_assert_int_eq(g_log.level, KVB_LOG_WARNING);
    ck_assert_ptr_nonnull(strstr(g_log.line, "1 entries still pinned"));
    test_log_stop(&g_log);
}
END_TEST

/* ---- tiers: demotion and promotion -------------------------------------- */

/* Header in front of every stand-in tier block; the rows follow at
 * FAKE_HDR bytes. */
#define FAKE_HDR 64

typedef struct fake_block {
    struct fake_block *next;
    size_t bytes;
    unsigned magic; /* the owning tier's tag */
} fake_block;

/* A stand-in tier allocator over malloc that tags its blocks and keeps a
 * list of the live ones, so a test can tell which tier holds which rows.
 * The store calls it under its own lock, but the mover (fake_move) reads
 * the lists without it, so both take fake_mu. */
typedef struct fake_tier {
    unsigned magic;
    int fail;          /* non-zero: every allocation fails */
    int64_t max_live;  /* > 0: fails while this many blocks are live (a
                        * fragmented pool: room in bytes, no block) */
    int64_t allocs;
    int64_t live;      /* blocks allocated and not yet freed */
    size_t live_bytes; /* their row bytes */
    int64_t bad_frees; /* frees of blocks this tier did not make */
    fake_block *blocks;
} fake_tier;

/* The memcpy mover's state: the two tiers, to check where each copy reads
 * and writes, and a switch that makes it fail. */
typedef struct fake_mover {
    fake_tier *tier[2]; /* indexed by kvb_tier */
    int fail;
    int64_t calls;
    int64_t bad; /* copies whose blocks were not in the tiers named */
} fake_mover;

/* Guards the stand-in tiers' lists and the mover's counters. */
static pthread_mutex_t fake_mu = PTHREAD_MUTEX_INITIALIZER;

/* Allocator hook: a tagged malloc block (NULL when told to fail). */
static void *fake_alloc(size_t bytes, void *ctx)
{
    fake_tier *t = ctx;
    if (t->fail || (t->max_live > 0 && t->live >= t->max_live)) {
        return NULL;
    }
    fake_block *b = malloc(FAKE_HDR + bytes);
    if (b == NULL) {
        return NULL;
    }
    pthread_mutex_lock(&fake_mu);
    b->bytes = bytes;
    b->magic = t->magic;
    b->next = t->blocks;
    t->blocks = b;
    t->allocs++;
    t->live++;
    t->live_bytes += bytes;
    pthread_mutex_unlock(&fake_mu);
    return (unsigned char *)b + FAKE_HDR;
}

/* Returns the live block of `t` whose rows start at `ptr`, or NULL. */
static fake_block *fake_find(fake_tier *t, const void *ptr)
{
    for (fake_block *b = t->blocks; b != NULL; b = b->next) {
        if ((const unsigned char *)b + FAKE_HDR == ptr) {
            return b;
        }
    }
    return NULL;
}

/* Allocator hook: unlinks and frees a block, counting frees of foreign
 * blocks or with the wrong size instead of crashing. */
static void fake_free(void *ptr, size_t bytes, void *ctx)
{
    fake_tier *t = ctx;
    pthread_mutex_lock(&fake_mu);
    fake_block **pp = &t->blocks;
    while (*pp != NULL && (unsigned char *)*pp + FAKE_HDR != ptr) {
        pp = &(*pp)->next;
    }
    if (*pp == NULL || (*pp)->bytes != bytes || (*pp)->magic != t->magic) {
        t->bad_frees++;
        pthread_mutex_unlock(&fake_mu);
        return;
    }
    fake_block *b = *pp;
    *pp = b->next;
    t->live--;
    t->live_bytes -= bytes;
    pthread_mutex_unlock(&fake_mu);
    free(b);
}

/* Mover hook: memcpy after checking that src is a live block of src_tier
 * and dst one of dst_tier large enough; returns 1 when told to fail.  The
 * store calls it without its lock, from any thread. */
static int fake_move(void *dst, const void *src, size_t bytes,
                     kvb_tier dst_tier, kvb_tier src_tier, void *ctx)
{
    fake_mover *m = ctx;
    pthread_mutex_lock(&fake_mu);
    fake_block *d = fake_find(m->tier[dst_tier], dst);
    fake_block *s = fake_find(m->tier[src_tier], src);
    int bad = dst_tier == src_tier || d == NULL || s == NULL ||
              d->bytes < bytes || s->bytes < bytes;
    m->calls++;
    m->bad += bad;
    int fail = bad || m->fail;
    pthread_mutex_unlock(&fake_mu);
    if (!fail) {
        memcpy(dst, src, bytes);
    }
    return fail;
}

/* A store with stand-in device and host tiers. */
typedef struct tiered {
    kvb_store *s;
    fake_tier dev, host;
    fake_mover mv;
    size_t es; /* bytes charged for one entry of TIER_TOKENS tokens */
} tiered;

#define TIER_TOKENS 8

/* Creates a store with the given tier budgets, both tiers backed by fake
 * tiers, with the memcpy mover installed when with_mover is set. */
static void tiered_init_bytes(tiered *t, size_t dev_budget,
                              size_t host_budget, int with_mover)
{
    memset(t, 0, sizeof *t);
    t->es = entry_size(TIER_TOKENS);
    t->dev.magic = 0xDE71CEu;
    t->host.magic = 0x4057u;
    t->mv.tier[KVB_TIER_DEVICE] = &t->dev;
    t->mv.tier[KVB_TIER_HOST] = &t->host;
    kvb_store_params p = {LAYERS, HEADS, HSIZE, KVB_DTYPE_F32, host_budget,
                          dev_budget};
    ck_assert_int_eq(kvb_store_create(&p, &t->s), KVB_OK);
    kvb_allocator da = {fake_alloc, fake_free, &t->dev};
    kvb_allocator ha = {fake_alloc, fake_free, &t->host};
    ck_assert_int_eq(kvb_store_set_allocator(t->s, KVB_TIER_DEVICE, &da),
                     KVB_OK);
    ck_assert_int_eq(kvb_store_set_allocator(t->s, KVB_TIER_HOST, &ha),
                     KVB_OK);
    if (with_mover) {
        ck_assert_int_eq(kvb_store_set_mover(t->s, fake_move, &t->mv),
                         KVB_OK);
    }
}

/* Same, with room for dev_slots device and host_slots host entries of
 * TIER_TOKENS tokens (plus half an entry of slack; 0 slots: budget 0). */
static void tiered_init(tiered *t, int dev_slots, int host_slots,
                        int with_mover)
{
    size_t es = entry_size(TIER_TOKENS);
    tiered_init_bytes(t, dev_slots > 0 ? (size_t)dev_slots * es + es / 2 : 0,
                      host_slots > 0 ? (size_t)host_slots * es + es / 2 : 0,
                      with_mover);
}

/* Checks that the store's per-tier sizes agree with the blocks the fake
 * tiers hold, then frees the store and checks that every block came back
 * to the tier that made it. */
static void tiered_free(tiered *t)
{
    kvb_store_stats st;
    size_t rows = 2 * LAYERS * row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32);
    ck_assert_int_eq(kvb_store_get_stats(t->s, &st), KVB_OK);
    ck_assert_uint_eq(st.device_bytes, (size_t)t->dev.live * t->es);
    ck_assert_uint_eq(st.host_bytes, (size_t)t->host.live * t->es);
    ck_assert_uint_eq(t->dev.live_bytes, (size_t)t->dev.live * rows);
    ck_assert_uint_eq(t->host.live_bytes, (size_t)t->host.live * rows);
    ck_assert_int_eq(st.num_entries, t->dev.live + t->host.live);
    kvb_store_free(t->s);
    ck_assert_int_eq(t->dev.live, 0);
    ck_assert_int_eq(t->host.live, 0);
    ck_assert_int_eq(t->dev.bad_frees, 0);
    ck_assert_int_eq(t->host.bad_frees, 0);
    ck_assert_int_eq(t->mv.bad, 0);
}

/* Returns the tier whose live blocks hold chunk `key`'s rows (layer 0's K
 * compared byte for byte), -1 when neither does; fails the test when both
 * do. */
static int tier_of(tiered *t, int key)
{
    size_t rb = row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32);
    int where = -1;
    fake_tier *tiers[2] = {&t->host, &t->dev};
    for (int i = 0; i < 2; i++) {
        for (fake_block *b = tiers[i]->blocks; b != NULL; b = b->next) {
            const unsigned char *k = (const unsigned char *)b + FAKE_HDR;
            size_t j = 0;
            while (j < rb && k[j] == pattern_byte(key, 0, 0, j)) {
                j++;
            }
            if (j == rb) {
                ck_assert_msg(where == -1, "chunk %d in both tiers", key);
                where = i == 0 ? KVB_TIER_HOST : KVB_TIER_DEVICE;
            }
        }
    }
    return where;
}

/* Reads the store's counters. */
static kvb_store_stats tiered_stats(tiered *t)
{
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(t->s, &st), KVB_OK);
    return st;
}

/* Checks the store's movement counters; ANY skips one. */
static void expect_moves(tiered *t, int64_t promotions, int64_t demotions,
                         int64_t evictions)
{
    kvb_store_stats st = tiered_stats(t);
    if (promotions != ANY) {
        ck_assert_int_eq(st.promotions, promotions);
    }
    if (demotions != ANY) {
        ck_assert_int_eq(st.demotions, demotions);
    }
    if (evictions != ANY) {
        ck_assert_int_eq(st.evictions, evictions);
    }
}

/* Checks that the device holds `dev` entries' bytes and the host `host`
 * entries' bytes. */
static void expect_tier_bytes(tiered *t, size_t dev, size_t host)
{
    kvb_store_stats st = tiered_stats(t);
    ck_assert_uint_eq(st.device_bytes, dev * t->es);
    ck_assert_uint_eq(st.host_bytes, host * t->es);
}

/* Checks where chunks 0, 1, ... are: want[k] is 'D' (device), 'H'
 * (host), '-' (not stored) or '.' (not checked) for chunk k. */
static void expect_placement(tiered *t, const char *want)
{
    for (int k = 0; want[k] != '\0'; k++) {
        int at = tier_of(t, k);
        switch (want[k]) {
        case 'D':
            ck_assert_msg(at == KVB_TIER_DEVICE, "chunk %d not on the device (%d)", k, at);
            break;
        case 'H':
            ck_assert_msg(at == KVB_TIER_HOST, "chunk %d not on the host (%d)", k, at);
            break;
        case '-':
            ck_assert_msg(at == -1, "chunk %d still stored (%d)", k, at);
            break;
        default:
            break;
        }
    }
}

/* tiered_init, then puts chunks 0 .. keys-1, each of which must be
 * stored. */
static void tiered_start(tiered *t, int dev_slots, int host_slots,
                         int with_mover, int keys)
{
    tiered_init(t, dev_slots, host_slots, with_mover);
    put_keys(t->s, 0, keys, TIER_TOKENS);
}

START_TEST(test_store_demotion_moves_rows_exactly)
{
    tiered t;
    tiered_start(&t, 2, 4, 1, 2);
    expect_placement(&t, "DD");
    ck_assert_int_eq(t.host.allocs, 0);
    /* a third chunk pushes the device LRU (0) down to the host */
    ck_assert(put(t.s, 2, TIER_TOKENS));
    expect_placement(&t, "HDD");
    expect_tier_bytes(&t, 2, 1);
    ck_assert_int_eq(t.mv.calls, 1);
    expect_moves(&t, 0, 1, 0);
    ck_assert_int_eq(tiered_stats(&t).num_entries, 3);
    /* still findable and bit-exact, served from the host tier */
    ck_assert_int_eq(has(t.s, 0, TIER_TOKENS), 1);
    ck_assert_int_eq(kvb_store_set_promotion(t.s, 0), KVB_OK);
    kvb_entry *e = get(t.s, 0, TIER_TOKENS);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_HOST);
    ck_assert_ptr_nonnull(fake_find(&t.host, kvb_entry_k(e, 0)));
    ck_assert(rows_match(e, 0, LAYERS,
                         row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    kvb_store_stats st = tiered_stats(&t);
    ck_assert_int_eq(st.promotions, 0);
    ck_assert_int_eq(t.mv.calls, 1);
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_promotion_on_acquire_moves_back)
{
    tiered t;
    size_t rb = row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32);
    tiered_start(&t, 2, 4, 1, 3);
    ck_assert_int_eq(tier_of(&t, 0), KVB_TIER_HOST);
    /* a hit on the host entry brings it back, demoting the device LRU (1) */
    kvb_entry *e = get(t.s, 0, TIER_TOKENS);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_DEVICE);
    ck_assert_ptr_nonnull(fake_find(&t.dev, kvb_entry_k(e, 0)));
    ck_assert(rows_match(e, 0, LAYERS, rb));
    expect_placement(&t, "DHD");
    kvb_store_stats st = tiered_stats(&t);
    expect_moves(&t, 1, 2, 0);
    ck_assert_int_eq(st.hits, 1);
    expect_tier_bytes(&t, 2, 1);
    ck_assert_int_eq(t.mv.calls, 3);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    /* a device hit moves nothing */
    e = get(t.s, 0, TIER_TOKENS);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_DEVICE);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    ck_assert_int_eq(t.mv.calls, 3);
    /* and the demoted 1 comes back intact too */
    e = get(t.s, 1, TIER_TOKENS);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_DEVICE);
    ck_assert(rows_match(e, 1, LAYERS, rb));
    ck_assert_int_eq(tier_of(&t, 2), KVB_TIER_HOST);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    tiered_free(&t);
}
END_TEST

/* The device's LRU victim is dropped, not demoted, when it cannot go
 * down: without a mover (0), without a host tier (1), with a host tier too
 * small for one entry (2). */
START_TEST(test_store_victim_dropped_when_it_cannot_move)
{
    tiered t;
    size_t es = entry_size(TIER_TOKENS);
    switch (_i) {
    case 0:
        tiered_init(&t, 2, 4, 0);
        break;
    case 1:
        tiered_init(&t, 2, 0, 1);
        break;
    default:
        tiered_init_bytes(&t, 2 * es + es / 2, es - 1, 1);
        break;
    }
    put_keys(t.s, 0, 3, TIER_TOKENS);
    ck_assert_int_eq(has(t.s, 0, TIER_TOKENS), 0);
    ck_assert_int_eq(tier_of(&t, 0), -1);
    expect_moves(&t, ANY, 0, 1);
    ck_assert_uint_eq(tiered_stats(&t).host_bytes, 0);
    ck_assert_int_eq(t.host.allocs, 0);
    ck_assert_int_eq(t.mv.calls, 0);
    if (_i == 0) {
        /* a mover installed and removed again leaves today's behaviour */
        ck_assert_int_eq(kvb_store_set_mover(t.s, fake_move, &t.mv), KVB_OK);
        ck_assert_int_eq(kvb_store_set_mover(t.s, NULL, NULL), KVB_OK);
        ck_assert(put(t.s, 3, TIER_TOKENS));
        ck_assert_int_eq(has(t.s, 1, TIER_TOKENS), 0);
        expect_moves(&t, ANY, 0, 2);
        ck_assert_int_eq(t.mv.calls, 0);
    }
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_pinned_and_pending_never_move)
{
    tiered t;
    int32_t toks[TIER_TOKENS];
    size_t rb = row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32);
    kvb_entry *pending = NULL;
    tiered_init(&t, 2, 4, 1);
    ck_assert(put(t.s, 0, TIER_TOKENS));
    kvb_entry *e0 = get(t.s, 0, TIER_TOKENS);
    chunk_tokens(1, toks, TIER_TOKENS);
    ck_assert_int_eq(kvb_store_reserve(t.s, 0, toks, TIER_TOKENS, NULL,
                                       &pending),
                     KVB_OK);
    ck_assert_ptr_nonnull(pending);
    fill_rows(pending, 1, LAYERS, rb);
    /* the device tier is all pinned or pending: 2 goes to the host */
    ck_assert(put(t.s, 2, TIER_TOKENS));
    expect_placement(&t, "DDH");
    /* a hit on 2 cannot promote it: nothing on the device can move */
    kvb_entry *e2 = get(t.s, 2, TIER_TOKENS);
    ck_assert_int_eq(kvb_entry_tier(e2), KVB_TIER_HOST);
    ck_assert_int_eq(kvb_store_unpin(t.s, e2), KVB_OK);
    ck_assert_int_eq(t.mv.calls, 0);
    /* 2 pinned on the host by one user; once the device has room, a second
     * acquire still leaves it where the first user's pointer points */
    ck_assert_int_eq(kvb_store_set_promotion(t.s, 0), KVB_OK);
    e2 = get(t.s, 2, TIER_TOKENS);
    ck_assert_int_eq(kvb_store_set_promotion(t.s, 1), KVB_OK);
    ck_assert_int_eq(kvb_store_unpin(t.s, e0), KVB_OK);
    kvb_entry *again = get(t.s, 2, TIER_TOKENS);
    ck_assert_ptr_eq(again, e2);
    ck_assert_int_eq(kvb_entry_tier(again), KVB_TIER_HOST);
    ck_assert_ptr_nonnull(fake_find(&t.host, kvb_entry_k(again, 0)));
    ck_assert(rows_match(again, 2, LAYERS, rb));
    expect_moves(&t, 0, 0, 0);
    ck_assert_int_eq(t.mv.calls, 0);
    ck_assert_int_eq(kvb_store_unpin(t.s, again), KVB_OK);
    ck_assert_int_eq(kvb_store_unpin(t.s, e2), KVB_OK);
    ck_assert_int_eq(kvb_store_commit(t.s, pending), KVB_OK);
    ck_assert_int_eq(tier_of(&t, 1), KVB_TIER_DEVICE);
    tiered_free(&t);
}
END_TEST

/* A host tier whose only slot is pinned cannot take the device's victim,
 * which is dropped. */
START_TEST(test_store_host_cannot_take_victim_drops)
{
    tiered t;
    tiered_start(&t, 2, 1, 1, 3);
    ck_assert_int_eq(tier_of(&t, 0), KVB_TIER_HOST);
    ck_assert_int_eq(kvb_store_set_promotion(t.s, 0), KVB_OK);
    kvb_entry *e0 = get(t.s, 0, TIER_TOKENS);
    ck_assert(put(t.s, 3, TIER_TOKENS)); /* device victim 1 has no place */
    ck_assert_int_eq(has(t.s, 1, TIER_TOKENS), 0);
    ck_assert_int_eq(tier_of(&t, 0), KVB_TIER_HOST);
    expect_moves(&t, ANY, 1, 1);
    ck_assert_int_eq(kvb_store_unpin(t.s, e0), KVB_OK);
    tiered_free(&t);
}
END_TEST

/* Starts `t` (device 2 entries, host 4, a mover) with chunks 0 and 1 on
 * the device and puts chunk 2 while *fail is set: the device LRU, 0, cannot
 * go down and is dropped instead.  *fail stays set. */
static void fail_first_demotion(tiered *t, int *fail)
{
    tiered_init(t, 2, 4, 1);
    put_keys(t->s, 0, 2, TIER_TOKENS);
    *fail = 1;
    ck_assert(put(t->s, 2, TIER_TOKENS));
    ck_assert_int_eq(has(t->s, 0, TIER_TOKENS), 0);
    expect_moves(t, ANY, 0, 1);
}

/* Clears *fail and puts chunk 3, which demotes 1; then acquires 1 with
 * *fail set again: the promotion fails and the hit is served, bit-exact,
 * from the host.  Returns the pinned entry. */
static kvb_entry *hit_without_promotion(tiered *t, int *fail)
{
    *fail = 0;
    ck_assert(put(t->s, 3, TIER_TOKENS)); /* demotes 1 */
    ck_assert_int_eq(tier_of(t, 1), KVB_TIER_HOST);
    *fail = 1;
    kvb_entry *e = get(t->s, 1, TIER_TOKENS);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_HOST);
    ck_assert(rows_match(e, 1, LAYERS, row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32)));
    return e;
}

START_TEST(test_store_failing_mover_keeps_store_consistent)
{
    tiered t;
    /* a failed demotion drops the victim and frees the host block */
    fail_first_demotion(&t, &t.mv.fail);
    ck_assert_int_eq(t.host.allocs, 1);
    ck_assert_int_eq(t.host.live, 0);
    expect_tier_bytes(&t, 2, 0);
    /* a failed promotion serves the hit from the host; making room on the
     * device (its own demotion failing too) dropped the device LRU, 2 */
    kvb_entry *e = hit_without_promotion(&t, &t.mv.fail);
    ck_assert_int_eq(has(t.s, 2, TIER_TOKENS), 0);
    ck_assert_int_eq(tier_of(&t, 3), KVB_TIER_DEVICE);
    expect_moves(&t, 0, 1, 2);
    expect_tier_bytes(&t, 1, 1);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    /* once copies work again the next hit promotes it */
    t.mv.fail = 0;
    e = get(t.s, 1, TIER_TOKENS);
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_DEVICE);
    ck_assert(rows_match(e, 1, LAYERS, row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_failing_allocator_keeps_store_consistent)
{
    tiered t;
    /* no host block for the victim: it is dropped, nothing is copied */
    fail_first_demotion(&t, &t.host.fail);
    ck_assert_int_eq(t.mv.calls, 0);
    t.host.fail = 0;
    /* no device block for the promotion: the hit stays on the host (the
     * room made for it stays made: 2 was demoted) */
    kvb_entry *e = hit_without_promotion(&t, &t.dev.fail);
    expect_placement(&t, "..HD");
    expect_moves(&t, 0, 2, 1);
    /* a new chunk falls back to the host tier */
    ck_assert(put(t.s, 4, TIER_TOKENS));
    ck_assert_int_eq(tier_of(&t, 4), KVB_TIER_HOST);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    t.dev.fail = 0;
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_fragmented_pool_evicts_until_a_block_fits)
{
    /* The budget holds 4 entries but the pool has blocks for 2 only: a
     * third chunk evicts the oldest until a block is free; it is stored. */
    tiered t;
    tiered_init(&t, 0, 4, 0);
    t.host.max_live = 2;
    put_keys(t.s, 0, 3, TIER_TOKENS);
    ck_assert_int_eq(has(t.s, 0, TIER_TOKENS), 0);
    ck_assert_int_eq(has(t.s, 1, TIER_TOKENS), 1);
    ck_assert_int_eq(has(t.s, 2, TIER_TOKENS), 1);
    kvb_store_stats st = tiered_stats(&t);
    ck_assert_int_eq(st.evictions, 1);
    ck_assert_int_eq(st.rejected, 0);
    /* an allocator that fails for good: the chunk is not stored, the call
     * succeeds (the request goes on without it), at most 8 entries go */
    t.host.max_live = 0;
    t.host.fail = 1;
    int32_t toks[TIER_TOKENS];
    chunk_tokens(9, toks, TIER_TOKENS);
    kvb_entry *e = (kvb_entry *)1;
    ck_assert_int_eq(kvb_store_reserve(t.s, 0, toks, TIER_TOKENS, NULL, &e),
                     KVB_OK);
    ck_assert_ptr_null(e);
    st = tiered_stats(&t);
    ck_assert_int_eq(st.rejected, 1);
    ck_assert_int_eq(st.num_entries, 0); /* both evicted trying */
    t.host.fail = 0;
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_tier_bytes_return_to_zero_after_clear)
{
    tiered t;
    tiered_start(&t, 2, 3, 1, 6);
    kvb_entry *e = get(t.s, 3, TIER_TOKENS); /* promoted, then pinned */
    ck_assert_int_eq(kvb_entry_tier(e), KVB_TIER_DEVICE);
    expect_tier_bytes(&t, 2, 2);
    ck_assert_int_eq(kvb_store_clear(t.s), KVB_OK);
    kvb_store_stats st = tiered_stats(&t);
    ck_assert_uint_eq(st.device_bytes, t.es); /* the pinned one stays */
    ck_assert_uint_eq(st.host_bytes, 0);
    ck_assert_int_eq(st.num_entries, 1);
    ck_assert_int_eq(kvb_store_unpin(t.s, e), KVB_OK);
    ck_assert_int_eq(kvb_store_clear(t.s), KVB_OK);
    st = tiered_stats(&t);
    expect_tier_bytes(&t, 0, 0);
    ck_assert_int_eq(st.num_entries, 0);
    ck_assert_int_eq(t.dev.live, 0);
    ck_assert_int_eq(t.host.live, 0);
    /* and the tiers are usable again */
    ck_assert(put(t.s, 9, TIER_TOKENS));
    ck_assert_int_eq(tier_of(&t, 9), KVB_TIER_DEVICE);
    tiered_free(&t);
}
END_TEST

/* Checks that exactly the chunks listed in `dev` are on the device and
 * those in `host` on the host, and that `gone` are not stored. */
static void expect_tiers(tiered *t, const char *dev, const char *host,
                         const char *gone)
{
    for (const char *c = dev; *c; c++) {
        ck_assert_msg(tier_of(t, *c) == KVB_TIER_DEVICE,
                      "%c not on the device", *c);
    }
    for (const char *c = host; *c; c++) {
        ck_assert_msg(tier_of(t, *c) == KVB_TIER_HOST, "%c not on the host",
                      *c);
    }
    for (const char *c = gone; *c; c++) {
        ck_assert_msg(has(t->s, *c, TIER_TOKENS) == 0 && tier_of(t, *c) == -1,
                      "%c still stored", *c);
    }
    kvb_store_stats st = tiered_stats(t);
    ck_assert_uint_eq(st.device_bytes, strlen(dev) * t->es);
    ck_assert_uint_eq(st.host_bytes, strlen(host) * t->es);
}

START_TEST(test_store_lru_order_across_tiers)
{
    tiered t;
    tiered_init(&t, 2, 3, 1); /* device: 2 entries, host: 3 */
    ck_assert(put(t.s, 'A', TIER_TOKENS));
    ck_assert(put(t.s, 'B', TIER_TOKENS));
    expect_tiers(&t, "AB", "", "");
    ck_assert(put(t.s, 'C', TIER_TOKENS));
    expect_tiers(&t, "BC", "A", "");
    ck_assert(put(t.s, 'D', TIER_TOKENS));
    ck_assert(put(t.s, 'E', TIER_TOKENS));
    expect_tiers(&t, "DE", "ABC", "");
    /* the host is full: the oldest of all (A, on the host) is dropped for
     * the device's oldest (D) */
    ck_assert(put(t.s, 'F', TIER_TOKENS));
    expect_tiers(&t, "EF", "BCD", "A");
    /* a hit on C: E (device LRU) goes down, which drops B (host LRU, C
     * being pinned by the hit), and C comes up */
    kvb_entry *c = get(t.s, 'C', TIER_TOKENS);
    ck_assert_int_eq(kvb_entry_tier(c), KVB_TIER_DEVICE);
    ck_assert_int_eq(kvb_store_unpin(t.s, c), KVB_OK);
    expect_tiers(&t, "FC", "DE", "AB");
    /* order is now D E F C: F goes down, then C, which drops D */
    ck_assert(put(t.s, 'G', TIER_TOKENS));
    expect_tiers(&t, "CG", "DEF", "AB");
    ck_assert(put(t.s, 'H', TIER_TOKENS));
    expect_tiers(&t, "GH", "EFC", "ABD");
    kvb_store_stats st = tiered_stats(&t);
    ck_assert_int_eq(st.inserts, 8);
    expect_moves(&t, 1, 7, 3);
    ck_assert_int_eq(st.num_entries, 5);
    ck_assert_int_eq(st.hits, 1);
    ck_assert_int_eq(t.mv.calls, 8);
    tiered_free(&t);
}
END_TEST

START_TEST(test_store_mover_bad_arguments_named)
{
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_set_mover(NULL, fake_move, NULL),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_set_mover: store is NULL"));
    ck_assert_int_eq(kvb_store_set_promotion(NULL, 1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "kvb_store_set_promotion: store is NULL"));
    /* a tier's allocator cannot change under its entries, moved or not */
    tiered t;
    tiered_init(&t, 1, 2, 1);
    ck_assert(put(t.s, 0, TIER_TOKENS));
    ck_assert(put(t.s, 1, TIER_TOKENS)); /* demotes 0 */
    ck_assert_int_eq(kvb_store_set_allocator(t.s, KVB_TIER_HOST, NULL),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "the host tier holds 1 entries"));
    tiered_free(&t);
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
            if (kvb_store_reserve(a->store, 0, toks, STRESS_TOKENS, NULL, &e)) {
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
            if (kvb_store_acquire(a->store, 0, toks, STRESS_TOKENS, &e)) {
                a->errors++;
            } else if (e != NULL) {
                a->errors += !rows_match(e, key, LAYERS, rb);
                a->errors += memcmp(kvb_entry_tokens(e), toks,
                                    sizeof toks) != 0;
                a->errors += kvb_store_unpin(a->store, e) != KVB_OK;
            }
            break;
        default:
            a->errors += kvb_store_contains(a->store, 0, toks, STRESS_TOKENS,
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
    test_log_start(&g_log, NULL); /* rejections are logged; keep stderr quiet */
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
    test_log_stop(&g_log);
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
    expect_usage(s, 0, 0);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_threads_with_mover_keep_invariants)
{
    tiered t;
    pthread_t th[STRESS_THREADS];
    stress_arg args[STRESS_THREADS];
    int stored = 0;
    size_t es = entry_size(STRESS_TOKENS);
    /* chunks of STRESS_TOKENS tokens: 2 fit the device, 3 the host */
    tiered_init_bytes(&t, 2 * es + es / 3, 3 * es + es / 3, 1);
    t.es = es;
    test_log_start(&g_log, NULL); /* rejections are logged; keep stderr quiet */
    for (int i = 0; i < STRESS_THREADS; i++) {
        args[i] = (stress_arg){t.s, 4321u + 77u * (unsigned)i, 0, 0};
        ck_assert_int_eq(
            pthread_create(&th[i], NULL, stress_main, &args[i]), 0);
    }
    for (int i = 0; i < STRESS_THREADS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(args[i].errors, 0);
        stored += args[i].stored;
    }
    test_log_stop(&g_log);
    kvb_store_stats st = tiered_stats(&t);
    ck_assert_uint_le(st.device_bytes, 2 * es + es / 3);
    ck_assert_uint_le(st.host_bytes, 3 * es + es / 3);
    ck_assert_uint_eq(st.device_bytes + st.host_bytes,
                      (size_t)st.num_entries * es);
    ck_assert_int_eq(st.inserts, stored);
    ck_assert_int_eq(st.num_entries, st.inserts - st.evictions);
    ck_assert_int_gt(st.demotions, 0);
    ck_assert_int_gt(st.promotions, 0);
    ck_assert_int_gt(st.evictions, 0);
    ck_assert_int_eq(t.mv.calls, st.demotions + st.promotions);
    ck_assert_int_eq(t.dev.live + t.host.live, st.num_entries);
    /* nothing is left pinned: every entry can be cleared */
    ck_assert_int_eq(kvb_store_clear(t.s), KVB_OK);
    st = tiered_stats(&t);
    expect_tier_bytes(&t, 0, 0);
    ck_assert_int_eq(st.num_entries, 0);
    tiered_free(&t);
}
END_TEST

/* A mover whose copy blocks until the test lets it go (at most 5 s, after
 * which it gives up waiting and records that it had to), then copies like
 * fake_move. */
typedef struct slow_mover {
    fake_mover inner;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started; /* a copy is in progress */
    int go;      /* the test let it finish */
    int gave_up; /* it waited 5 s for `go`: the test was stuck */
    int acquired; /* (the acquiring thread) its acquire returned */
} slow_mover;

/* Mover hook: waits as described above, then fake_move. */
static int slow_move(void *dst, const void *src, size_t bytes,
                     kvb_tier dst_tier, kvb_tier src_tier, void *ctx)
{
    slow_mover *sm = ctx;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 5;
    pthread_mutex_lock(&sm->mu);
    sm->started = 1;
    pthread_cond_broadcast(&sm->cv);
    while (!sm->go && !sm->gave_up) {
        sm->gave_up = pthread_cond_timedwait(&sm->cv, &sm->mu, &deadline) != 0;
    }
    pthread_mutex_unlock(&sm->mu);
    return fake_move(dst, src, bytes, dst_tier, src_tier, &sm->inner);
}

/* A thread's job in test_store_copy_runs_without_the_lock. */
typedef struct slow_job {
    kvb_store *store;
    slow_mover *sm;
    int key;
    kvb_entry *got; /* acquire's result */
    int ok;         /* the store call returned KVB_OK (and stored) */
} slow_job;

/* Thread body: reserves, fills and commits chunk job->key. */
static void *slow_put_main(void *p)
{
    slow_job *j = p;
    int32_t toks[TIER_TOKENS];
    kvb_entry *e = NULL;
    chunk_tokens(j->key, toks, TIER_TOKENS);
    j->ok = kvb_store_reserve(j->store, 0, toks, TIER_TOKENS, NULL, &e) ==
                KVB_OK && e != NULL;
    if (j->ok) {
        fill_rows(e, j->key, LAYERS, row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32));
        j->ok = kvb_store_commit(j->store, e) == KVB_OK;
    }
    return NULL;
}

/* Thread body: acquires chunk job->key and says when it has returned. */
static void *slow_get_main(void *p)
{
    slow_job *j = p;
    int32_t toks[TIER_TOKENS];
    chunk_tokens(j->key, toks, TIER_TOKENS);
    j->ok = kvb_store_acquire(j->store, 0, toks, TIER_TOKENS, &j->got) ==
            KVB_OK;
    pthread_mutex_lock(&j->sm->mu);
    j->sm->acquired = 1;
    pthread_mutex_unlock(&j->sm->mu);
    return NULL;
}

/* A demotion copies its rows without the store's lock: while the copy is
 * stuck, other threads look up, acquire and count; an acquire of the very
 * entry that is moving waits for the move and then finds it on the host.
 * With the copy under the lock the lookups below would block until the
 * mover gave up waiting (gave_up). */
START_TEST(test_store_copy_runs_without_the_lock)
{
    tiered t;
    slow_mover sm;
    memset(&sm, 0, sizeof sm);
    pthread_mutex_init(&sm.mu, NULL);
    pthread_cond_init(&sm.cv, NULL);
    tiered_init(&t, 2, 4, 0);
    sm.inner.tier[KVB_TIER_DEVICE] = &t.dev;
    sm.inner.tier[KVB_TIER_HOST] = &t.host;
    ck_assert_int_eq(kvb_store_set_mover(t.s, slow_move, &sm), KVB_OK);
    ck_assert_int_eq(kvb_store_set_promotion(t.s, 0), KVB_OK);
    put_keys(t.s, 0, 2, TIER_TOKENS);
    /* chunk 2 demotes chunk 0, whose copy then waits for `go` */
    slow_job putter = {t.s, &sm, 2, NULL, 0};
    pthread_t put_th, get_th;
    ck_assert_int_eq(pthread_create(&put_th, NULL, slow_put_main, &putter), 0);
    pthread_mutex_lock(&sm.mu);
    while (!sm.started) {
        pthread_cond_wait(&sm.cv, &sm.mu);
    }
    pthread_mutex_unlock(&sm.mu);
    /* the store answers while the copy is in progress */
    ck_assert_int_eq(has(t.s, 1, TIER_TOKENS), 1);
    ck_assert_int_eq(has(t.s, 0, TIER_TOKENS), 1);
    kvb_entry *e1 = get(t.s, 1, TIER_TOKENS);
    ck_assert_ptr_nonnull(e1);
    ck_assert_int_eq(kvb_entry_tier(e1), KVB_TIER_DEVICE);
    ck_assert_int_eq(kvb_store_unpin(t.s, e1), KVB_OK);
    ck_assert_int_eq(tiered_stats(&t).demotions, 0);
    /* an acquire of the moving chunk waits for the end of the move */
    slow_job getter = {t.s, &sm, 0, NULL, 0};
    ck_assert_int_eq(pthread_create(&get_th, NULL, slow_get_main, &getter), 0);
    nanosleep(&(struct timespec){0, 50 * 1000 * 1000}, NULL);
    pthread_mutex_lock(&sm.mu);
    int early = sm.acquired;
    int gave_up = sm.gave_up;
    sm.go = 1;
    pthread_cond_broadcast(&sm.cv);
    pthread_mutex_unlock(&sm.mu);
    pthread_join(put_th, NULL);
    pthread_join(get_th, NULL);
    ck_assert_int_eq(gave_up, 0);
    ck_assert_int_eq(early, 0);
    ck_assert(putter.ok);
    ck_assert(getter.ok);
    ck_assert_ptr_nonnull(getter.got);
    ck_assert_int_eq(kvb_entry_tier(getter.got), KVB_TIER_HOST);
    ck_assert(rows_match(getter.got, 0, LAYERS,
                         row_bytes_for(TIER_TOKENS, KVB_DTYPE_F32)));
    ck_assert_int_eq(kvb_store_unpin(t.s, getter.got), KVB_OK);
    expect_placement(&t, "HDD");
    expect_moves(&t, 0, 1, 0);
    ck_assert_int_eq(sm.inner.calls, 1);
    ck_assert_int_eq(sm.inner.bad, 0);
    tiered_free(&t);
    pthread_cond_destroy(&sm.cv);
    pthread_mutex_destroy(&sm.mu);
}
END_TEST

START_TEST(test_store_namespaces_never_meet)
{
    /* the same tokens under two tenants' namespaces are two entries, and
     * neither is found from the other or from the default namespace; with
     * every key forced equal, the namespace compare alone keeps them apart */
    for (int forced = 0; forced < 2; forced++) {
        kvb_store *s = make_store(KVB_DTYPE_F32, (size_t)1 << 20);
        if (forced) {
            ck_assert_int_eq(kvb_store_debug_set_hash(s, constant_hash), KVB_OK);
        }
        uint64_t a = kvb_namespace("tenant-a", 8);
        uint64_t b = kvb_namespace("tenant-b", 8);
        ck_assert_uint_ne(a, b);
        ck_assert_uint_ne(a, 0);
        ck_assert_uint_eq(kvb_namespace("", 0), 0);
        ck_assert_uint_eq(kvb_namespace(NULL, 0), 0);
        int32_t toks[8];
        chunk_tokens(5, toks, 8);
        if (!forced) {
            ck_assert_uint_ne(kvb_hash_tokens_ns(toks, 8, a), kvb_hash_tokens_ns(toks, 8, b));
            ck_assert_uint_eq(kvb_hash_tokens_ns(toks, 8, 0), kvb_hash_tokens(toks, 8));
        }
        kvb_entry *e = NULL;
        ck_assert_int_eq(kvb_store_reserve(s, a, toks, 8, NULL, &e), KVB_OK);
        ck_assert_ptr_nonnull(e);
        fill_rows(e, 5, LAYERS, row_bytes_for(8, KVB_DTYPE_F32));
        ck_assert_int_eq(kvb_store_commit(s, e), KVB_OK);
        int found = -1;
        ck_assert_int_eq(kvb_store_contains(s, a, toks, 8, &found), KVB_OK);
        ck_assert_int_eq(found, 1);
        ck_assert_int_eq(kvb_store_contains(s, b, toks, 8, &found), KVB_OK);
        ck_assert_int_eq(found, 0);
        ck_assert_int_eq(kvb_store_contains(s, 0, toks, 8, &found), KVB_OK);
        ck_assert_int_eq(found, 0);
        kvb_entry *got = (kvb_entry *)1;
        ck_assert_int_eq(kvb_store_acquire(s, b, toks, 8, &got), KVB_OK);
        ck_assert_ptr_null(got);
        /* tenant b stores its own copy; a's stays a's */
        ck_assert_int_eq(kvb_store_reserve(s, b, toks, 8, NULL, &e), KVB_OK);
        ck_assert_ptr_nonnull(e);
        fill_rows(e, 6, LAYERS, row_bytes_for(8, KVB_DTYPE_F32));
        ck_assert_int_eq(kvb_store_commit(s, e), KVB_OK);
        ck_assert_int_eq(kvb_store_acquire(s, a, toks, 8, &got), KVB_OK);
        ck_assert(rows_match(got, 5, LAYERS, row_bytes_for(8, KVB_DTYPE_F32)));
        ck_assert_int_eq(kvb_store_unpin(s, got), KVB_OK);
        ck_assert_int_eq(kvb_store_acquire(s, b, toks, 8, &got), KVB_OK);
        ck_assert(rows_match(got, 6, LAYERS, row_bytes_for(8, KVB_DTYPE_F32)));
        ck_assert_int_eq(kvb_store_unpin(s, got), KVB_OK);
        kvb_store_free(s);
    }
}
END_TEST

START_TEST(test_store_checksum_catches_a_flipped_byte)
{
    kvb_store *s = make_checked_store();
    ck_assert(put(s, 1, 8));
    ck_assert(put(s, 2, 8));
    size_t rb = row_bytes_for(8, KVB_DTYPE_F32);
    /* intact entries verify and stay */
    kvb_entry *e = get(s, 1, 8);
    int intact = -1;
    ck_assert_int_eq(kvb_store_verify(s, e, &intact), KVB_OK);
    ck_assert_int_eq(intact, 1);
    /* one bit flipped in the V rows of the last layer, while pinned */
    ((unsigned char *)kvb_entry_v(e, LAYERS - 1))[rb - 1] ^= 0x10;
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    ck_assert_int_eq(kvb_store_watch(s, 1), KVB_OK);
    test_log_start(&g_log, NULL);
    e = get(s, 1, 8);
    ck_assert_ptr_nonnull(e); /* found; the load path verifies it */
    ck_assert_int_eq(kvb_store_verify(s, e, &intact), KVB_OK);
    test_log_stop(&g_log);
    ck_assert_int_eq(intact, 0); /* the pin is gone with the entry */
    ck_assert_ptr_nonnull(strstr(g_log.line, "fails its checksum at layer 2"));
    ck_assert_int_eq(has(s, 1, 8), 0);
    ck_assert_ptr_null(get(s, 1, 8));
    kvb_store_event ev[4];
    int64_t nev = 0;
    int lost = 0;
    ck_assert_int_eq(kvb_store_take_events(s, ev, 4, &nev, &lost), KVB_OK);
    ck_assert_int_eq(nev, 1);
    ck_assert_int_eq(ev[0].kind, KVB_STORE_EVENT_REMOVED);
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_eq(st.corrupt, 1);
    expect_usage(s, 1, entry_size(8));
    /* the other entry is untouched, and the damaged one can be stored again */
    e = get(s, 2, 8);
    ck_assert_int_eq(kvb_store_verify(s, e, &intact), KVB_OK);
    ck_assert_int_eq(intact, 1);
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    ck_assert(put(s, 1, 8));
    e = get(s, 1, 8);
    ck_assert_int_eq(kvb_store_verify(s, e, &intact), KVB_OK);
    ck_assert_int_eq(intact, 1);
    ck_assert(rows_match(e, 1, LAYERS, rb));
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_OK);
    /* verify wants an entry pinned by acquire */
    kvb_clear_error();
    ck_assert_int_eq(kvb_store_verify(s, e, NULL), KVB_ERR_INVALID);
    kvb_store_free(s);
}
END_TEST

START_TEST(test_store_doomed_entry_freed_at_last_pin)
{
    /* two requests hold the entry when the second finds it damaged: it
     * vanishes from lookups at once, its bytes go with the first's pin */
    kvb_store *s = make_checked_store();
    ck_assert(put(s, 3, 8));
    kvb_entry *first = get(s, 3, 8);
    kvb_entry *second = get(s, 3, 8);
    ck_assert_ptr_eq(first, second);
    ((unsigned char *)kvb_entry_k(first, 0))[0] ^= 1;
    int intact = -1;
    ck_assert_int_eq(kvb_store_verify(s, second, &intact), KVB_OK);
    ck_assert_int_eq(intact, 0);
    ck_assert_int_eq(has(s, 3, 8), 0);
    kvb_store_stats st;
    ck_assert_int_eq(kvb_store_get_stats(s, &st), KVB_OK);
    ck_assert_int_gt(st.host_bytes, 0); /* still held by the first pin */
    ck_assert(put(s, 3, 8));             /* a fresh copy beside it */
    ck_assert_int_eq(kvb_store_unpin(s, first), KVB_OK);
    expect_usage(s, 1, entry_size(8));
    kvb_store_free(s);
}
END_TEST

/* The store suite. */
Suite *store_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 120}};
    const test_spec tests[] = {
        {0, test_store_create_names_bad_params, 0},
        {0, test_store_roundtrip_every_layer, 0},
        {0, test_store_lookup_any_subset_any_order, 0},
        {0, test_store_many_entries_all_found, 0},
        {0, test_store_collision_never_returns_other_chunk, 0},
        {0, test_store_lru_evicts_least_recent, 0},
        {0, test_store_lru_acquire_refreshes, 0},
        {0, test_store_events_mirror_commits_and_evictions, 0},
        {0, test_store_events_many_grow_in_order, 0},
        {0, test_store_pinned_never_evicted, 0},
        {0, test_store_pending_entry_blocks_eviction, 0},
        {0, test_store_oversized_entry_rejected, 0},
        {0, test_store_zero_budget_stores_nothing, 0},
        {0, test_store_duplicate_reserve_returns_null, 0},
        {0, test_store_abort_frees_reservation, 0},
        {0, test_store_unpin_counts_pins, 0},
        {0, test_store_pending_invisible, 0},
        {0, test_store_bytes_return_to_zero_after_clear, 0},
        {0, test_store_bad_arguments_named, 0},
        {0, test_store_free_with_pinned_entry_warns, 0},
        {0, test_store_threads_keep_invariants, 0},
        {0, test_store_demotion_moves_rows_exactly, 0},
        {0, test_store_promotion_on_acquire_moves_back, 0},
        {0, test_store_victim_dropped_when_it_cannot_move, 3},
        {0, test_store_pinned_and_pending_never_move, 0},
        {0, test_store_host_cannot_take_victim_drops, 0},
        {0, test_store_failing_mover_keeps_store_consistent, 0},
        {0, test_store_failing_allocator_keeps_store_consistent, 0},
        {0, test_store_fragmented_pool_evicts_until_a_block_fits, 0},
        {0, test_store_tier_bytes_return_to_zero_after_clear, 0},
        {0, test_store_lru_order_across_tiers, 0},
        {0, test_store_mover_bad_arguments_named, 0},
        {0, test_store_threads_with_mover_keep_invariants, 0},
        {0, test_store_copy_runs_without_the_lock, 0},
        {0, test_store_namespaces_never_meet, 0},
        {0, test_store_checksum_catches_a_flipped_byte, 0},
        {0, test_store_doomed_entry_freed_at_last_pin, 0},
    };
    return suite_build("store", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
