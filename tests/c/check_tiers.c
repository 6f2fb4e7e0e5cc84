/*
 * check_tiers.c: the blob format (every way a blob is refused) and the
 * lower tiers joined (tiers.c): the write-behind of a pinned store entry to
 * the disk tier, the lookup and the checked fetch, flush, the counters, and
 * a configuration without lower tiers.  The connector's use of them is in
 * check_connector.c, the disk and Redis tiers alone in check_disk.c and
 * check_remote.c.
 */
#include "test_util.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"
#include "../../csrc/store.h"
#include "../../csrc/tiers.h"

static const kvb_blob_shape SHAPE = {3, 2, 4, KVB_DTYPE_F32};
static const int32_t TOKS[5] = {7, 8, 9, 10, 11};
static const int64_t POS[5] = {20, 21, 22, 23, 24};

/* A sealed blob of TOKS with rows 0, 1, 2, ... as floats. */
static unsigned char *make_blob(uint64_t key, uint64_t hash, size_t *len)
{
    *len = kvb_blob_size(&SHAPE, 5);
    ck_assert_uint_eq(*len, 64 + 24 + 40 + 3 * 2 * 5 * 2 * 4 * 4);
    unsigned char *b = malloc(*len);
    ck_assert_ptr_nonnull(b);
    kvb_blob_init(b, &SHAPE, key, hash, TOKS, POS, 5);
    float *rows = (float *)(b + kvb_blob_rows_offset(5));
    size_t nf = (*len - kvb_blob_rows_offset(5)) / sizeof(float);
    for (size_t i = 0; i < nf; i++) {
        rows[i] = (float)i;
    }
    kvb_blob_seal(b, *len);
    return b;
}

START_TEST(test_blob_round_trip_and_every_refusal)
{
    size_t len = 0;
    unsigned char *b = make_blob(1, 2, &len);
    const char *why = NULL;
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, TOKS, 5, &why), 1);
    ck_assert_mem_eq(b + kvb_blob_positions_offset(5), POS, sizeof POS);
    ck_assert_int_eq(kvb_blob_check(b, len, 9, 2, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "another model or shard");
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 3, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "another segment");
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, TOKS, 4, &why), 0);
    ck_assert_str_eq(why, "another segment");
    kvb_blob_shape other = SHAPE;
    other.dtype = KVB_DTYPE_BF16;
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &other, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "another geometry");
    ck_assert_int_eq(kvb_blob_check(b, len - 1, 1, 2, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "wrong length (torn or truncated)");
    ck_assert_int_eq(kvb_blob_check(b, 10, 1, 2, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "truncated header");
    const int32_t collide[5] = {7, 8, 9, 10, 12}; /* same hash claimed */
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, collide, 5, &why), 0);
    ck_assert_str_eq(why, "tokens differ (hash collision)");
    /* one bit anywhere, header included, is caught */
    size_t spots[] = {5, 40, kvb_blob_tokens_offset() + 3,
                      kvb_blob_positions_offset(5) + 1, len - 1};
    for (size_t i = 0; i < sizeof spots / sizeof spots[0]; i++) {
        b[spots[i]] ^= 0x08;
        ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, TOKS, 5, NULL), 0);
        b[spots[i]] ^= 0x08;
    }
    b[len - 1] ^= 0x08;
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "checksum mismatch (corrupt)");
    b[len - 1] ^= 0x08;
    memset(b, 0, 4);
    ck_assert_int_eq(kvb_blob_check(b, len, 1, 2, &SHAPE, TOKS, 5, &why), 0);
    ck_assert_str_eq(why, "not a kvblend entry of this version");
    free(b);
}
END_TEST

/* Host-memory copy with a store mover's signature. */
static int copy_rows(void *dst, const void *src, size_t bytes,
                     kvb_tier dst_tier, kvb_tier src_tier, void *ctx)
{
    (void)dst_tier;
    (void)src_tier;
    (void)ctx;
    memcpy(dst, src, bytes);
    return 0;
}

START_TEST(test_tiers_write_behind_then_fetch)
{
    char dir[64];
    tmpdir_make(dir, sizeof dir, "kvb_tiers");
    kvb_config cfg;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_LOCAL_DISK", dir), KVB_OK);
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_MAX_LOCAL_DISK_SIZE", "0.001"), KVB_OK);
    kvb_tiers *t = NULL;
    ck_assert_int_eq(kvb_tiers_open(&cfg, &t), KVB_OK);
    ck_assert_ptr_nonnull(t);

    kvb_store_params sp = {.num_layers = 3, .num_kv_heads = 2, .head_size = 4,
                           .dtype = KVB_DTYPE_F32, .host_budget_bytes = 1 << 20};
    kvb_store *s = NULL;
    ck_assert_int_eq(kvb_store_create(&sp, &s), KVB_OK);
    kvb_entry *e = NULL;
    ck_assert_int_eq(kvb_store_reserve(s, 0, TOKS, 5, POS, &e), KVB_OK);
    float *rows = kvb_entry_k(e, 0);
    for (int i = 0; i < 3 * 2 * 5 * 8; i++) {
        rows[i] = (float)(i * 3);
    }
    ck_assert_int_eq(kvb_store_commit_pinned(s, e), KVB_OK);
    uint64_t key = kvb_tier_key(42, 0, 1);
    uint64_t hash = kvb_entry_hash(e);
    kvb_tiers_put_entry(t, s, e, key, &SHAPE, copy_rows, NULL);
    ck_assert_int_eq(kvb_tiers_flush(t), KVB_OK);
    /* the writer released the pin it was given */
    ck_assert_int_eq(kvb_store_unpin(s, e), KVB_ERR_INVALID);

    int found = 0;
    ck_assert_int_eq(kvb_tiers_contains(t, key, hash, &found), KVB_OK);
    ck_assert_int_eq(found, 1);
    ck_assert_int_eq(kvb_tiers_contains(t, kvb_tier_key(42, 1, 2), hash, &found), KVB_OK);
    ck_assert_int_eq(found, 0);
    void *blob = NULL;
    size_t len = 0;
    int remote = -1;
    ck_assert_int_eq(kvb_tiers_fetch(t, key, hash, &SHAPE, TOKS, 5, &blob, &len, &remote), KVB_OK);
    ck_assert_ptr_nonnull(blob);
    ck_assert_int_eq(remote, 0);
    const float *got = (const float *)((unsigned char *)blob + kvb_blob_rows_offset(5));
    for (int i = 0; i < 3 * 2 * 5 * 8; i++) {
        ck_assert_float_eq(got[i], (float)(i * 3));
    }
    ck_assert_mem_eq((unsigned char *)blob + kvb_blob_positions_offset(5), POS, sizeof POS);
    kvb_tiers_recycle(t, blob, len, key, hash, remote);
    /* a lookup-only view (a scheduler's) sees the file without indexing it */
    kvb_tiers *view = NULL;
    ck_assert_int_eq(kvb_tiers_open_view(&cfg, &view), KVB_OK);
    ck_assert_ptr_nonnull(view);
    ck_assert_int_eq(kvb_tiers_contains(view, key, hash, &found), KVB_OK);
    ck_assert_int_eq(found, 1);
    ck_assert_int_eq(kvb_tiers_contains(view, key, hash + 1, &found), KVB_OK);
    ck_assert_int_eq(found, 0);
    ck_assert_int_eq(kvb_tiers_flush(view), KVB_OK); /* nothing to write */
    kvb_tiers_free(view);
    /* the same hash with other tokens (a collision) is refused and dropped */
    const int32_t other[5] = {1, 1, 1, 1, 1};
    ck_assert_int_eq(kvb_tiers_fetch(t, key, hash, &SHAPE, other, 5, &blob, &len, &remote), KVB_OK);
    ck_assert_ptr_null(blob);
    kvb_tier_stats d, r;
    ck_assert_int_eq(kvb_tiers_get_stats(t, &d, &r), KVB_OK);
    ck_assert_int_eq(d.enabled, 1);
    ck_assert_int_eq(r.enabled, 0);
    ck_assert_int_eq(d.writes, 1);
    ck_assert_uint_eq(d.bytes_written, kvb_blob_size(&SHAPE, 5));
    ck_assert_int_eq(d.hits, 1);
    ck_assert_int_eq(d.corrupt, 1);
    ck_assert_int_eq(d.lookups, 2);
    ck_assert_int_eq(d.entries, 0);
    kvb_tiers_free(t);
    kvb_store_free(s);
    tmpdir_remove(dir);
}
END_TEST

START_TEST(test_tiers_none_configured_and_bad_values)
{
    kvb_config cfg;
    ck_assert_int_eq(kvb_config_init(&cfg), KVB_OK);
    kvb_tiers *t = (kvb_tiers *)&cfg;
    ck_assert_int_eq(kvb_tiers_open(&cfg, &t), KVB_OK);
    ck_assert_ptr_null(t);
    kvb_tiers_free(NULL);
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_LOCAL_DISK", "/proc/version/kv"), KVB_OK);
    ck_assert_int_eq(kvb_config_set(&cfg, "LMCACHE_MAX_LOCAL_DISK_SIZE", "1"), KVB_OK);
    ck_assert_int_eq(kvb_tiers_open(&cfg, &t), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "/proc/version/kv"));
    ck_assert_int_eq(kvb_tiers_contains(NULL, 1, 2, NULL), KVB_ERR_INVALID);
    ck_assert_uint_ne(kvb_tier_key(1, 0, 1), kvb_tier_key(1, 0, 2));
}
END_TEST

/* The tiers suite. */
Suite *tiers_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 0}};
    const test_spec tests[] = {
        {0, test_blob_round_trip_and_every_refusal, 0},
        {0, test_tiers_write_behind_then_fetch, 0},
        {0, test_tiers_none_configured_and_bad_values, 0},
    };
    return suite_build("tiers", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
