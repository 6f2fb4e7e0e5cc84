/*
 * segment.c: splitting a prompt into chunks on a separator token sequence,
 * and checking explicit chunk boundaries given by the caller.
 *
 * A RAG prompt reads `sys SEP chunk1 SEP chunk2 ... SEP question`; each
 * piece between separators is a segment whose KV can be stored and reused
 * wherever it reappears.  Separator tokens belong to no segment: they are
 * always recomputed by the blend.
 */
#include "internal.h"

/* Returns 1 when sep[0..sep_len) occurs in `tokens` at index `at` (the
 * caller guarantees at + sep_len <= n). */
static int segment_match(const int32_t *tokens, int64_t at,
                         const int32_t *sep, int64_t sep_len)
{
    for (int64_t j = 0; j < sep_len; j++) {
        if (tokens[at + j] != sep[j]) {
            return 0;
        }
    }
    return 1;
}

/* Counts the span [start, end) and writes it to out[count] when there is
 * room; empty spans are skipped. */
static void segment_emit(int64_t start, int64_t end, kvb_span *out,
                         int64_t cap, int64_t *count)
{
    if (end <= start) {
        return;
    }
    if (*count < cap) {
        out[*count].start = start;
        out[*count].end = end;
    }
    (*count)++;
}

/*
 * Splits tokens[0..n) on every non-overlapping occurrence of sep, scanning
 * left to right: at each index the separator either matches in full (its
 * tokens are skipped and the scan resumes after it) or the scan advances by
 * one token, so a partial match never swallows tokens (sep [5,6] in
 * [1,5,5,6,2] gives [1,5] and [2]), and for a self-overlapping separator the
 * leftmost occurrence wins (sep [7,7] in [7,7,7,1] gives [7,1]).
 *
 * An empty prompt (n == 0) is valid and has zero segments, whatever the
 * separator: there is nothing to split.  A non-empty prompt shorter than
 * the separator is KVB_ERR_INVALID, since a separator that can never match
 * is almost always a tokenizer mix-up.  When more than `cap` segments exist
 * the first `cap` are written, *n_out holds the full count and
 * KVB_ERR_INVALID says how many were needed.
 */
kvb_status kvb_segment_split(const int32_t *tokens, int64_t n,
                             const int32_t *sep, int64_t sep_len,
                             kvb_span *out, int64_t cap, int64_t *n_out)
{
    if (n_out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_segment_split: n_out is NULL");
    }
    *n_out = 0;
    kvb_status st = kvb_check_array("kvb_segment_split", "tokens", tokens,
                                    "n", n);
    if (st != KVB_OK) {
        return st;
    }
    if (sep_len < 1) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_segment_split: sep_len=%lld; "
                        "expected a separator of >= 1 tokens",
                        (long long)sep_len);
    }
    if (sep == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_segment_split: sep is NULL "
                        "with sep_len=%lld", (long long)sep_len);
    }
    st = kvb_check_array("kvb_segment_split", "out", out, "cap", cap);
    if (st != KVB_OK) {
        return st;
    }
    if (n == 0) {
        return KVB_OK;
    }
    if (n < sep_len) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_segment_split: separator "
                        "(%lld tokens) is longer than the prompt (%lld "
                        "tokens)", (long long)sep_len, (long long)n);
    }
    int64_t count = 0;
    int64_t seg_start = 0;
    int64_t i = 0;
    while (i <= n - sep_len) {
        if (segment_match(tokens, i, sep, sep_len)) {
            segment_emit(seg_start, i, out, cap, &count);
            i += sep_len;
            seg_start = i;
        } else {
            i++;
        }
    }
    segment_emit(seg_start, n, out, cap, &count);
    *n_out = count;
    if (count > cap) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_segment_split: the prompt has "
                        "%lld segments but out holds only cap=%lld",
                        (long long)count, (long long)cap);
    }
    return KVB_OK;
}

/*
 * Checks caller-given segment boundaries for a prompt of n tokens: every
 * span must be non-empty and inside [0, n), and each must start at or after
 * the end of the previous one.  Gaps are allowed.  The message names the
 * first offending span by index.
 */
kvb_status kvb_segment_check(const kvb_span *spans, int64_t n_spans,
                             int64_t n)
{
    kvb_status st = kvb_check_array("kvb_segment_check", "spans", spans,
                                    "n_spans", n_spans);
    if (st == KVB_OK && n < 0) {
        st = kvb_fail(KVB_ERR_INVALID, "kvb_segment_check: n=%lld; expected "
                      ">= 0 tokens", (long long)n);
    }
    if (st != KVB_OK) {
        return st;
    }
    for (int64_t i = 0; i < n_spans; i++) {
        long long s = (long long)spans[i].start;
        long long e = (long long)spans[i].end;
        if (s < 0 || e > n) {
            return kvb_fail(KVB_ERR_INVALID, "kvb_segment_check: span %lld "
                            "[%lld, %lld) is outside the prompt [0, %lld)",
                            (long long)i, s, e, (long long)n);
        }
        if (s >= e) {
            return kvb_fail(KVB_ERR_INVALID, "kvb_segment_check: span %lld "
                            "[%lld, %lld) is empty; expected start < end",
                            (long long)i, s, e);
        }
        if (i == 0) {
            continue;
        }
        long long ps = (long long)spans[i - 1].start;
        long long pe = (long long)spans[i - 1].end;
        if (s < ps) {
            return kvb_fail(KVB_ERR_INVALID, "kvb_segment_check: spans are "
                            "not sorted: span %lld [%lld, %lld) starts before "
                            "span %lld [%lld, %lld)", (long long)i, s, e,
                            (long long)(i - 1), ps, pe);
        }
        if (s < pe) {
            return kvb_fail(KVB_ERR_INVALID, "kvb_segment_check: span %lld "
                            "[%lld, %lld) overlaps span %lld [%lld, %lld)",
                            (long long)i, s, e, (long long)(i - 1), ps, pe);
        }
    }
    return KVB_OK;
}
