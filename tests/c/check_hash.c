/*
 * check_hash.c: kvb_hash_tokens against published XXH3-64 values and
 * reference digests of little-endian int32 token arrays, plus the
 * properties the chunk index relies on (position independence, distinct
 * sequences give distinct keys).
 */
#include "test_util.h"

#include <check.h>
#include <stdint.h>
#include <string.h>

#include "kvblend.h"

/* XXH3_64bits(seed 0) of the empty input, from the xxHash reference. */
#define XXH3_EMPTY 0x2D06800538D394C2ull

START_TEST(test_hash_empty_input)
{
    int32_t dummy = 42;
    ck_assert_uint_eq(kvb_hash_tokens(NULL, 0), XXH3_EMPTY);
    ck_assert_uint_eq(kvb_hash_tokens(&dummy, 0), XXH3_EMPTY);
    /* bad arguments hash the empty input instead of crashing */
    ck_assert_uint_eq(kvb_hash_tokens(NULL, 5), XXH3_EMPTY);
    ck_assert_uint_eq(kvb_hash_tokens(&dummy, -1), XXH3_EMPTY);
}
END_TEST

/* Fills t[0..n) with 0, 1, ..., n-1. */
static void fill_range(int32_t *t, int n)
{
    for (int i = 0; i < n; i++) {
        t[i] = i;
    }
}

/* Reference digests computed with the independent xxhash Python binding
 * (xxhash.xxh3_64_intdigest over struct.pack('<Ni', ...)).  The lengths
 * cover XXH3's code paths: 4-8 bytes, 9-16, 17-128, 129-240, and the long
 * (> 240 byte) striped loop over one and several blocks. */
START_TEST(test_hash_reference_values)
{
    int32_t t0[] = {0};
    int32_t t1[] = {1};
    int32_t t3[] = {1, 2, 3};
    int32_t tneg[] = {-1, 2147483647, -2147483647 - 1};
    int32_t t5[] = {128000, 9906, 11, 1917, 0};
    ck_assert_uint_eq(kvb_hash_tokens(t0, 1), 0x48b2c92616fc193dull);
    ck_assert_uint_eq(kvb_hash_tokens(t1, 1), 0xdb02334e96d65708ull);
    ck_assert_uint_eq(kvb_hash_tokens(t3, 3), 0x6bbf7429332bea48ull);
    ck_assert_uint_eq(kvb_hash_tokens(tneg, 3), 0xa811191c44e42ba6ull);
    ck_assert_uint_eq(kvb_hash_tokens(t5, 5), 0x1e0c3fcbde6d58b0ull);

    static int32_t big[1000];
    fill_range(big, 100);
    ck_assert_uint_eq(kvb_hash_tokens(big, 20), 0xb6e69d5cb112ca29ull);
    ck_assert_uint_eq(kvb_hash_tokens(big, 70), 0xe7ee6a72d1a69530ull);
    ck_assert_uint_eq(kvb_hash_tokens(big, 100), 0x8b942c966a1738e2ull);
    for (int i = 0; i < 1000; i++) {
        big[i] = (int32_t)(((uint64_t)i * 2654435761u) % 50000u);
    }
    ck_assert_uint_eq(kvb_hash_tokens(big, 1000), 0x33c7dbbb6d71fd44ull);
}
END_TEST

START_TEST(test_hash_position_independent)
{
    int32_t chunk[] = {311, 4, 99, 12000, 7, 7, 8};
    int32_t prompt[64];
    uint64_t want = kvb_hash_tokens(chunk, 7);
    for (int off = 0; off + 7 <= 64; off += 9) {
        for (int i = 0; i < 64; i++) {
            prompt[i] = 1000 + i;
        }
        memcpy(prompt + off, chunk, sizeof chunk);
        ck_assert_uint_eq(kvb_hash_tokens(prompt + off, 7), want);
    }
}
END_TEST

START_TEST(test_hash_distinct_sequences_differ)
{
    int32_t a[] = {1, 2, 3};
    int32_t b[] = {3, 2, 1};  /* same multiset, other order */
    int32_t c[] = {1, 2, 3, 0}; /* trailing zero token */
    int32_t d[] = {1, 2, 4};
    uint64_t ha = kvb_hash_tokens(a, 3);
    ck_assert_uint_ne(ha, kvb_hash_tokens(b, 3));
    ck_assert_uint_ne(ha, kvb_hash_tokens(c, 4));
    ck_assert_uint_ne(ha, kvb_hash_tokens(d, 3));
    ck_assert_uint_ne(ha, kvb_hash_tokens(a, 2));
    /* one-token differences over a longer sequence, every position */
    int32_t base[300];
    fill_range(base, 300);
    uint64_t hb = kvb_hash_tokens(base, 300);
    for (int i = 0; i < 300; i += 37) {
        base[i] ^= 1;
        ck_assert_uint_ne(kvb_hash_tokens(base, 300), hb);
        base[i] ^= 1;
    }
    ck_assert_uint_eq(kvb_hash_tokens(base, 300), hb);
}
END_TEST

/* The hash suite. */
Suite *hash_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 0}};
    const test_spec tests[] = {
        {0, test_hash_empty_input, 0},
        {0, test_hash_reference_values, 0},
        {0, test_hash_position_independent, 0},
        {0, test_hash_distinct_sequences_differ, 0},
    };
    return suite_build("hash", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
