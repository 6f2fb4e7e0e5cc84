/*
 * fuzz_segment.c: libFuzzer target for prompt segmentation
 * (kvb_segment_split) and the check of caller-given spans
 * (kvb_segment_check).
 *
 * Input: byte 0 gives the separator length (0..4; 0 must be refused),
 * byte 1 the output capacity (full, or fewer than the segments), then the
 * separator's tokens, then the prompt's tokens, one byte each over a small
 * alphabet so that separators occur.  The same bytes, read as (start, end)
 * pairs, are also checked as explicit spans.
 *
 * Properties: every span lies in [0, n), is non-empty, and starts at or
 * after the previous span's end; no span contains the separator; every gap
 * (before, between and after the spans) is a whole number of separators;
 * a capacity smaller than the count gives KVB_ERR_INVALID with the full
 * count and the same leading spans; kvb_segment_check accepts exactly the
 * span lists that satisfy its documented rules.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_TOKENS 256
#define ALPHABET 6

/* Aborts with a message: libFuzzer reports the input as a crash. */
static void fail(const char *what, long long a, long long b)
{
    fprintf(stderr, "fuzz_segment: %s (%lld, %lld; last error \"%s\")\n",
            what, a, b, kvb_last_error());
    abort();
}

/* Returns 1 when tokens[from..to) is a whole number of separators. */
static int all_separators(const int32_t *t, int64_t from, int64_t to,
                          const int32_t *sep, int64_t sep_len)
{
    if ((to - from) % sep_len != 0) {
        return 0;
    }
    for (int64_t i = from; i < to; i++) {
        if (t[i] != sep[(i - from) % sep_len]) {
            return 0;
        }
    }
    return 1;
}

/* Returns 1 when sep occurs anywhere inside tokens[from..to). */
static int contains_separator(const int32_t *t, int64_t from, int64_t to,
                              const int32_t *sep, int64_t sep_len)
{
    for (int64_t i = from; i + sep_len <= to; i++) {
        if (memcmp(t + i, sep, (size_t)sep_len * sizeof *sep) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Checks a split of tokens[0..n) on sep against its documented contract. */
static void check_split(const int32_t *tok, int64_t n, const int32_t *sep,
                        int64_t sep_len, int64_t cap_sel)
{
    kvb_span full[MAX_TOKENS + 1];
    int64_t count = -1;
    kvb_clear_error();
    kvb_status st = kvb_segment_split(tok, n, sep, sep_len, full,
                                      MAX_TOKENS + 1, &count);
    if (sep_len < 1 || (n > 0 && n < sep_len)) {
        if (st != KVB_ERR_INVALID || kvb_last_error()[0] == '\0') {
            fail("a bad separator or short prompt was not refused", n,
                 sep_len);
        }
        return;
    }
    if (st != KVB_OK || count < 0 || count > n) {
        fail("a valid split failed or miscounted", st, count);
    }
    int64_t prev_end = 0;
    for (int64_t i = 0; i < count; i++) {
        const kvb_span *s = &full[i];
        if (s->start < prev_end || s->start >= s->end || s->end > n) {
            fail("span out of range, empty, unordered or overlapping",
                 s->start, s->end);
        }
        if (!all_separators(tok, prev_end, s->start, sep, sep_len)) {
            fail("a gap before a span is not whole separators", prev_end,
                 s->start);
        }
        if (contains_separator(tok, s->start, s->end, sep, sep_len)) {
            fail("a span contains the separator", s->start, s->end);
        }
        prev_end = s->end;
    }
    if (!all_separators(tok, prev_end, n, sep, sep_len)) {
        fail("the tail after the last span is not whole separators",
             prev_end, n);
    }
    /* A smaller output: the count is still reported, the head is equal. */
    int64_t cap = count > 0 ? cap_sel % (count + 1) : 0;
    kvb_span part[MAX_TOKENS + 1];
    int64_t count2 = -1;
    kvb_clear_error();
    st = kvb_segment_split(tok, n, sep, sep_len, cap > 0 ? part : NULL, cap,
                           &count2);
    if (count2 != count) {
        fail("the count depends on the capacity", count, count2);
    }
    if ((cap < count) != (st == KVB_ERR_INVALID) ||
        (st != KVB_OK && st != KVB_ERR_INVALID)) {
        fail("capacity shortfall not reported as INVALID", cap, count);
    }
    if (st != KVB_OK && kvb_last_error()[0] == '\0') {
        fail("a capacity shortfall without a message", cap, count);
    }
    if (cap > 0 && memcmp(part, full, (size_t)cap * sizeof *part) != 0) {
        fail("a truncated split differs from the full one", cap, count);
    }
    /* Separator-derived spans always pass the explicit-span check. */
    if (kvb_segment_check(full, count, n) != KVB_OK) {
        fail("split output refused by kvb_segment_check", count, n);
    }
}

/* Checks kvb_segment_check against its documented rules. */
static void check_spans(const kvb_span *spans, int64_t n_spans, int64_t n)
{
    int ok = 1;
    for (int64_t i = 0; i < n_spans && ok; i++) {
        if (spans[i].start < 0 || spans[i].end > n ||
            spans[i].start >= spans[i].end) {
            ok = 0;
        } else if (i > 0 && spans[i].start < spans[i - 1].end) {
            ok = 0;
        }
    }
    kvb_clear_error();
    kvb_status st = kvb_segment_check(spans, n_spans, n);
    if (st != (ok ? KVB_OK : KVB_ERR_INVALID)) {
        fail("kvb_segment_check disagrees with its rules", ok, st);
    }
    if (st != KVB_OK && kvb_last_error()[0] == '\0') {
        fail("kvb_segment_check failed without a message", n_spans, n);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) {
        return 0;
    }
    int64_t sep_len = data[0] % 5;
    int64_t cap_sel = data[1];
    size_t pos = 2;
    int32_t sep[4] = {0, 0, 0, 0};
    for (int64_t j = 0; j < sep_len; j++) {
        sep[j] = pos < size ? data[pos++] % ALPHABET : 0;
    }
    int32_t tok[MAX_TOKENS];
    int64_t n = 0;
    while (pos < size && n < MAX_TOKENS) {
        tok[n++] = data[pos++] % ALPHABET;
    }
    check_split(tok, n, sep, sep_len, cap_sel);

    /* The whole input as (start, end) pairs around the prompt's range. */
    kvb_span spans[MAX_TOKENS];
    int64_t n_spans = 0;
    for (size_t i = 2; i + 1 < size && n_spans < MAX_TOKENS; i += 2) {
        spans[n_spans].start = (int64_t)(data[i] % (n + 3)) - 1;
        spans[n_spans].end = (int64_t)(data[i + 1] % (n + 3)) - 1;
        n_spans++;
    }
    check_spans(spans, n_spans, n);
    return 0;
}
