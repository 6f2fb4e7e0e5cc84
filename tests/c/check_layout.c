/*
 * check_layout.c: the paged-KV layout descriptor and slot-mapping checks
 * every paged op runs before touching the engine's cache.
 */
#include "test_util.h"

#include <check.h>
#include <stdint.h>
#include <string.h>

#include "kvblend.h"

static float g_k[16];
static float g_v[16];

/* Returns a valid (B, N, H, D) layout: 4 blocks of 16 tokens, 2 heads of
 * 64 dims, f16 (strides in elements). */
static kvb_paged_layout good_layout(void)
{
    kvb_paged_layout l;
    memset(&l, 0, sizeof l);
    l.k_base = g_k;
    l.v_base = g_v;
    l.num_blocks = 4;
    l.block_size = 16;
    l.num_kv_heads = 2;
    l.head_size = 64;
    l.dim_stride = 1;
    l.head_stride = 64;
    l.token_stride = 2 * 64;
    l.block_stride = 16 * 2 * 64;
    l.dtype = KVB_DTYPE_F16;
    l.device = -1;
    return l;
}

/* Asserts that validating `l` fails with KVB_ERR_INVALID and a message
 * containing `frag`. */
static void expect_invalid(const kvb_paged_layout *l, const char *frag)
{
    kvb_clear_error();
    ck_assert_int_eq(kvb_layout_validate(l), KVB_ERR_INVALID);
    ck_assert_msg(strstr(kvb_last_error(), frag) != NULL,
                  "message '%s' lacks '%s'", kvb_last_error(), frag);
}

START_TEST(test_layout_validate_accepts_engine_layouts)
{
    /* (B, N, H, D) per plane, as above */
    kvb_paged_layout l = good_layout();
    ck_assert_int_eq(kvb_layout_validate(&l), KVB_OK);
    /* (B, N, H, 2D) with K|V per token: v_base = k_base + D */
    l.token_stride = 2 * 2 * 64;
    l.head_stride = 2 * 64;
    l.block_stride = 16 * 2 * 2 * 64;
    l.v_base = (uint16_t *)l.k_base + 64;
    ck_assert_int_eq(kvb_layout_validate(&l), KVB_OK);
    /* HND planes: (B, H, N, D) */
    l = good_layout();
    l.head_stride = 16 * 64;
    l.token_stride = 64;
    l.device = 3;
    l.dtype = KVB_DTYPE_BF16;
    ck_assert_int_eq(kvb_layout_validate(&l), KVB_OK);
}
END_TEST

START_TEST(test_layout_validate_names_each_bad_field)
{
    kvb_paged_layout l;
    expect_invalid(NULL, "layout is NULL");
    l = good_layout(); l.k_base = NULL;
    expect_invalid(&l, "layout->k_base is NULL");
    l = good_layout(); l.v_base = NULL;
    expect_invalid(&l, "layout->v_base is NULL");
    l = good_layout(); l.num_blocks = 0;
    expect_invalid(&l, "layout->num_blocks=0 is invalid (expected > 0)");
    l = good_layout(); l.block_size = -16;
    expect_invalid(&l, "layout->block_size=-16 is invalid (expected > 0)");
    l = good_layout(); l.num_kv_heads = 0;
    expect_invalid(&l, "layout->num_kv_heads=0 is invalid");
    l = good_layout(); l.head_size = -1;
    expect_invalid(&l, "layout->head_size=-1 is invalid");
    l = good_layout(); l.block_stride = -1;
    expect_invalid(&l, "layout->block_stride=-1 is invalid (expected >= 0");
    l = good_layout(); l.token_stride = -2;
    expect_invalid(&l, "layout->token_stride=-2 is invalid");
    l = good_layout(); l.head_stride = -3;
    expect_invalid(&l, "layout->head_stride=-3 is invalid");
    l = good_layout(); l.dim_stride = -4;
    expect_invalid(&l, "layout->dim_stride=-4 is invalid");
    l = good_layout(); l.dtype = (kvb_dtype)9;
    expect_invalid(&l, "layout->dtype=9 is unknown");
    l = good_layout(); l.device = -2;
    expect_invalid(&l, "layout->device=-2 is invalid");
}
END_TEST

START_TEST(test_layout_validate_rejects_overflowing_extent)
{
    kvb_paged_layout l = good_layout();
    l.num_blocks = INT64_MAX / 2;
    l.block_stride = 4;
    expect_invalid(&l, "layout extent overflows int64");
    l = good_layout();
    l.num_blocks = INT64_MAX / 8;
    l.block_size = 16; /* num_blocks*block_size overflows */
    expect_invalid(&l, "overflows int64");
}
END_TEST

/* V's own strides: a transposed K next to a row-major V (vLLM's CPU
 * backend) validates, negative V strides are named with their v_ field, and
 * V's extent is checked on its own. */
START_TEST(test_layout_validate_v_strides)
{
    kvb_paged_layout l = good_layout();
    l.head_stride = 2 * 16 * 64;
    l.block_stride = 2 * 2 * 16 * 64;
    l.token_stride = 1;
    l.dim_stride = 16;
    l.v_block_stride = l.block_stride;
    l.v_head_stride = l.head_stride;
    l.v_token_stride = 64;
    l.v_dim_stride = 1;
    ck_assert_int_eq(kvb_layout_validate(&l), KVB_OK);
    kvb_paged_layout bad = l;
    bad.v_block_stride = -1;
    expect_invalid(&bad, "layout->v_block_stride=-1 is invalid (expected >= 0");
    bad = l; bad.v_token_stride = -2;
    expect_invalid(&bad, "layout->v_token_stride=-2 is invalid");
    bad = l; bad.v_head_stride = -3;
    expect_invalid(&bad, "layout->v_head_stride=-3 is invalid");
    bad = l; bad.v_dim_stride = -4;
    expect_invalid(&bad, "layout->v_dim_stride=-4 is invalid");
    /* K fits, V does not */
    bad = l; bad.v_block_stride = INT64_MAX / 2;
    expect_invalid(&bad, "layout extent overflows int64 for V");
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "v_block_stride="));
    /* all V strides 0: V shares K's (here overflowing) strides */
    bad = good_layout(); bad.block_stride = INT64_MAX / 2;
    expect_invalid(&bad, "layout extent overflows int64 for K");
    /* one non-zero V stride makes all four V's own: V's zero strides stay
     * zero (a legal broadcast), so only K's extent can overflow here */
    bad = good_layout(); bad.v_dim_stride = 1;
    ck_assert_int_eq(kvb_layout_validate(&bad), KVB_OK);
}
END_TEST

START_TEST(test_layout_check_slots_accepts_range_and_padding)
{
    kvb_paged_layout l = good_layout();
    int64_t slots[] = {0, 63, -1, 17, -100, 5};
    ck_assert_int_eq(kvb_layout_check_slots(&l, slots, 6), KVB_OK);
    ck_assert_int_eq(kvb_layout_check_slots(&l, NULL, 0), KVB_OK);
}
END_TEST

START_TEST(test_layout_check_slots_names_index_slot_and_limit)
{
    kvb_paged_layout l = good_layout();
    int64_t slots[] = {0, 1, 64, 70};
    kvb_clear_error();
    ck_assert_int_eq(kvb_layout_check_slots(&l, slots, 4), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "slots[2]=64 is out of range"));
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "num_blocks*block_size=64"));
    /* with n=2 only slots[0] and slots[1] are checked: both in range */
    ck_assert_int_eq(kvb_layout_check_slots(&l, slots, 2), KVB_OK);
}
END_TEST

START_TEST(test_layout_check_slots_bad_arguments)
{
    kvb_paged_layout l = good_layout();
    int64_t slot = 0;
    kvb_clear_error();
    ck_assert_int_eq(kvb_layout_check_slots(&l, NULL, 3), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "slots is NULL with n=3"));
    ck_assert_int_eq(kvb_layout_check_slots(&l, &slot, -1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "n=-1 is invalid"));
    /* a bad descriptor is reported before any slot */
    l.head_size = 0;
    ck_assert_int_eq(kvb_layout_check_slots(&l, &slot, 1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "layout->head_size=0"));
}
END_TEST

/* The layout suite. */
Suite *layout_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 0}};
    const test_spec tests[] = {
        {0, test_layout_validate_accepts_engine_layouts, 0},
        {0, test_layout_validate_names_each_bad_field, 0},
        {0, test_layout_validate_rejects_overflowing_extent, 0},
        {0, test_layout_validate_v_strides, 0},
        {0, test_layout_check_slots_accepts_range_and_padding, 0},
        {0, test_layout_check_slots_names_index_slot_and_limit, 0},
        {0, test_layout_check_slots_bad_arguments, 0},
    };
    return suite_build("layout", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
