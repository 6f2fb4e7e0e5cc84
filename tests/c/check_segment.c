/*
 * check_segment.c: separator splitting (non-overlapping, left to right,
 * separators in no segment, no empty segments) and the checks on explicit
 * segment boundaries.
 */
#include "test_util.h"

#include <check.h>
#include <string.h>

#include "kvblend.h"

#define N(a) ((int64_t)(sizeof(a) / sizeof((a)[0])))

/* Splits and asserts KVB_OK and the exact spans given as start,end pairs
 * in `want` (2*n_want values). */
static void expect_split(const int32_t *t, int64_t n, const int32_t *sep,
                         int64_t sep_len, const int64_t *want, int64_t n_want)
{
    kvb_span out[16];
    int64_t n_out = -1;
    memset(out, 0xab, sizeof out);
    ck_assert_int_eq(kvb_segment_split(t, n, sep, sep_len, out, 16, &n_out),
                     KVB_OK);
    ck_assert_int_eq(n_out, n_want);
    for (int64_t i = 0; i < n_want; i++) {
        ck_assert_int_eq(out[i].start, want[2 * i]);
        ck_assert_int_eq(out[i].end, want[2 * i + 1]);
    }
}


START_TEST(test_split_empty_prompt_has_no_segments)
{
    int32_t sep[] = {5, 6, 7};
    kvb_span out[1];
    int64_t n_out = -1;
    ck_assert_int_eq(kvb_segment_split(NULL, 0, sep, 3, out, 1, &n_out),
                     KVB_OK);
    ck_assert_int_eq(n_out, 0);
}
END_TEST

START_TEST(test_split_no_separator_is_one_segment)
{
    int32_t t[] = {1, 2, 3, 4};
    int32_t sep[] = {9};
    int64_t want[] = {0, 4};
    expect_split(t, N(t), sep, 1, want, 1);
}
END_TEST

START_TEST(test_split_typical_rag_prompt)
{
    /* sys SEP c1 SEP c2 SEP question */
    int32_t t[] = {1, 2, 90, 91, 10, 11, 12, 90, 91, 20, 90, 91, 30, 31};
    int32_t sep[] = {90, 91};
    int64_t want[] = {0, 2, 4, 7, 9, 10, 12, 14};
    expect_split(t, N(t), sep, 2, want, 4);
}
END_TEST

START_TEST(test_split_separator_at_start_and_end)
{
    int32_t t[] = {8, 8, 1, 2, 8, 8};
    int32_t sep[] = {8, 8};
    int64_t want[] = {2, 4};
    expect_split(t, N(t), sep, 2, want, 1);
}
END_TEST

START_TEST(test_split_consecutive_separators)
{
    int32_t t[] = {1, 0, 0, 0, 2, 0, 3};
    int32_t sep[] = {0};
    int64_t want[] = {0, 1, 4, 5, 6, 7};
    expect_split(t, N(t), sep, 1, want, 3);
    int32_t t2[] = {1, 5, 6, 5, 6, 2};
    int32_t sep2[] = {5, 6};
    int64_t want2[] = {0, 1, 5, 6};
    expect_split(t2, N(t2), sep2, 2, want2, 2);
}
END_TEST

START_TEST(test_split_partial_match_keeps_tokens)
{
    int32_t t[] = {1, 5, 5, 6, 2};
    int32_t sep[] = {5, 6};
    int64_t want[] = {0, 2, 4, 5};
    expect_split(t, N(t), sep, 2, want, 2);
    /* a prefix of the separator at the very end stays in the segment */
    int32_t t2[] = {1, 2, 5};
    int64_t want2[] = {0, 3};
    expect_split(t2, N(t2), sep, 2, want2, 1);
    /* a three-token separator broken in the middle */
    int32_t t3[] = {4, 1, 2, 4, 1, 2, 3, 9};
    int32_t sep3[] = {1, 2, 3};
    int64_t want3[] = {0, 4, 7, 8};
    expect_split(t3, N(t3), sep3, 3, want3, 2);
}
END_TEST

START_TEST(test_split_overlapping_pattern_leftmost_wins)
{
    int32_t t[] = {7, 7, 7, 1};
    int32_t sep[] = {7, 7};
    int64_t want[] = {2, 4};
    expect_split(t, N(t), sep, 2, want, 1);
    int32_t t2[] = {7, 7, 7, 7};
    int64_t n_out = -1;
    kvb_span out[2];
    ck_assert_int_eq(kvb_segment_split(t2, 4, sep, 2, out, 2, &n_out), KVB_OK);
    ck_assert_int_eq(n_out, 0);
}
END_TEST

START_TEST(test_split_one_token_separator)
{
    int32_t t[] = {3, 1, 3, 3, 2};
    int32_t sep[] = {3};
    int64_t want[] = {1, 2, 4, 5};
    expect_split(t, N(t), sep, 1, want, 2);
}
END_TEST

START_TEST(test_split_separator_is_whole_prompt)
{
    int32_t t[] = {4, 5, 6};
    int32_t sep[] = {4, 5, 6};
    kvb_span out[1];
    int64_t n_out = -1;
    ck_assert_int_eq(kvb_segment_split(t, 3, sep, 3, out, 1, &n_out), KVB_OK);
    ck_assert_int_eq(n_out, 0);
    /* same length, no match: one segment */
    int32_t sep2[] = {4, 5, 7};
    int64_t want[] = {0, 3};
    expect_split(t, 3, sep2, 3, want, 1);
}
END_TEST

START_TEST(test_split_prompt_shorter_than_separator)
{
    int32_t t[] = {1, 2};
    int32_t sep[] = {1, 2, 3};
    kvb_span out[4];
    int64_t n_out = -1;
    kvb_clear_error();
    ck_assert_int_eq(kvb_segment_split(t, 2, sep, 3, out, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(),
                  "separator (3 tokens) is longer than the prompt (2 tokens)");
}
END_TEST

START_TEST(test_split_capacity_overflow_reports_count)
{
    int32_t t[] = {1, 0, 2, 0, 3, 0, 4};
    int32_t sep[] = {0};
    kvb_span out[2];
    int64_t n_out = -1;
    kvb_clear_error();
    ck_assert_int_eq(kvb_segment_split(t, N(t), sep, 1, out, 2, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(n_out, 4);
    ck_assert_has(kvb_last_error(), "4 segments");
    ck_assert_has(kvb_last_error(), "cap=2");
    /* the first cap spans were written */
    ck_assert_int_eq(out[0].start, 0);
    ck_assert_int_eq(out[1].start, 2);
    /* cap 0 with out NULL asks for the count */
    ck_assert_int_eq(kvb_segment_split(t, N(t), sep, 1, NULL, 0, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(n_out, 4);
}
END_TEST

START_TEST(test_split_bad_arguments)
{
    int32_t t[] = {1, 2, 3};
    int32_t sep[] = {2};
    kvb_span out[4];
    int64_t n_out = 0;
    ck_assert_int_eq(kvb_segment_split(t, 3, sep, 0, out, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "sep_len=0");
    ck_assert_int_eq(kvb_segment_split(NULL, 3, sep, 1, out, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "tokens is NULL");
    ck_assert_int_eq(kvb_segment_split(t, 3, NULL, 1, out, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "sep is NULL");
    ck_assert_int_eq(kvb_segment_split(t, -1, sep, 1, out, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "n=-1");
    ck_assert_int_eq(kvb_segment_split(t, 3, sep, 1, NULL, 4, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "out is NULL");
    ck_assert_int_eq(kvb_segment_split(t, 3, sep, 1, out, -2, &n_out),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "cap=-2");
    ck_assert_int_eq(kvb_segment_split(t, 3, sep, 1, out, 4, NULL),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "n_out is NULL");
}
END_TEST

START_TEST(test_check_valid_spans)
{
    kvb_span ok[] = {{0, 3}, {3, 5}, {7, 10}}; /* touching and a gap */
    ck_assert_int_eq(kvb_segment_check(ok, 3, 10), KVB_OK);
    ck_assert_int_eq(kvb_segment_check(NULL, 0, 10), KVB_OK);
    ck_assert_int_eq(kvb_segment_check(ok, 0, 0), KVB_OK);
}
END_TEST

/* One bad span list and the fragments its message must contain. */
typedef struct bad_spans {
    kvb_span spans[3];
    int64_t n_spans;
    int64_t n;
    const char *frag1;
    const char *frag2;
} bad_spans;

static const bad_spans kBadSpans[] = {
    {{{0, 4}, {2, 6}}, 2, 10, "span 1 [2, 6)", "overlaps span 0 [0, 4)"},
    {{{0, 8}, {2, 3}}, 2, 10, "span 1 [2, 3)", "overlaps"},
    {{{5, 8}, {1, 3}}, 2, 10, "not sorted", "span 1 [1, 3)"},
    {{{0, 2}, {4, 12}}, 2, 10, "span 1 [4, 12)", "outside the prompt [0, 10)"},
    {{{-1, 2}}, 1, 10, "span 0 [-1, 2)", "outside"},
    {{{0, 2}, {3, 3}}, 2, 10, "span 1 [3, 3) is empty", "start < end"},
    {{{0, 2}, {2, 4}, {5, 4}}, 3, 10, "span 2 [5, 4) is empty", "span 2"},
};

START_TEST(test_check_bad_spans_named_by_index)
{
    const bad_spans *b = &kBadSpans[_i];
    kvb_clear_error();
    ck_assert_int_eq(kvb_segment_check(b->spans, b->n_spans, b->n),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), b->frag1);
    ck_assert_has(kvb_last_error(), b->frag2);
}
END_TEST

START_TEST(test_check_bad_arguments)
{
    ck_assert_int_eq(kvb_segment_check(NULL, 2, 10), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "spans is NULL");
    kvb_span s[] = {{0, 1}};
    ck_assert_int_eq(kvb_segment_check(s, -1, 10), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "n_spans=-1");
    ck_assert_int_eq(kvb_segment_check(s, 1, -3), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "n=-3");
}
END_TEST

START_TEST(test_split_output_passes_check)
{
    /* invariant: whatever split returns is a valid span list */
    int32_t t[40];
    for (int i = 0; i < 40; i++) {
        t[i] = (i * 7) % 5; /* contains 0,1 pairs at irregular places */
    }
    int32_t sep[] = {0, 2};
    kvb_span out[40];
    int64_t n_out = 0;
    ck_assert_int_eq(kvb_segment_split(t, 40, sep, 2, out, 40, &n_out), KVB_OK);
    ck_assert_int_gt(n_out, 1);
    ck_assert_int_eq(kvb_segment_check(out, n_out, 40), KVB_OK);
    /* every token is in a segment or in a separator occurrence */
    int64_t covered = 0;
    for (int64_t i = 0; i < n_out; i++) {
        covered += out[i].end - out[i].start;
    }
    ck_assert_int_eq((40 - covered) % 2, 0);
}
END_TEST

/* The segment suite. */
Suite *segment_suite(void)
{
    static const case_spec cases[] = {
        {"split", NULL, NULL, 0},
        {"check", NULL, NULL, 0},
    };
    const test_spec tests[] = {
        {0, test_split_empty_prompt_has_no_segments, 0},
        {0, test_split_no_separator_is_one_segment, 0},
        {0, test_split_typical_rag_prompt, 0},
        {0, test_split_separator_at_start_and_end, 0},
        {0, test_split_consecutive_separators, 0},
        {0, test_split_partial_match_keeps_tokens, 0},
        {0, test_split_overlapping_pattern_leftmost_wins, 0},
        {0, test_split_one_token_separator, 0},
        {0, test_split_separator_is_whole_prompt, 0},
        {0, test_split_prompt_shorter_than_separator, 0},
        {0, test_split_capacity_overflow_reports_count, 0},
        {0, test_split_bad_arguments, 0},
        {0, test_split_output_passes_check, 0},
        {1, test_check_valid_spans, 0},
        {1, test_check_bad_spans_named_by_index, (int)(sizeof kBadSpans / sizeof kBadSpans[0])},
        {1, test_check_bad_arguments, 0},
    };
    return suite_build("segment", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
