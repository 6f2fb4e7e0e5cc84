/*
 * ops_select.c: per-token KV deviation and the choice of tokens to
 * recompute at a check layer (CPU).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Everything one parallel range of kvb_cpu_deviation needs. */
typedef struct kvb_dev_job {
    const void *a;
    const void *b;
    int64_t row; /* elements per token: num_heads * head_size */
    kvb_dtype dtype;
    float *out;
} kvb_dev_job;

/* Parallel body: out[i] for tokens [begin, end).  Squares are summed in
 * double, so the fp32 result is the correctly rounded sum of the fp32
 * squared differences for any realistic row length. */
static void kvb_dev_range(int64_t begin, int64_t end, void *ctx)
{
    const kvb_dev_job *job = ctx;
    const int64_t R = job->row;
    for (int64_t i = begin; i < end; i++) {
        double acc = 0.0;
        if (job->dtype == KVB_DTYPE_F32) {
            const float *restrict a = (const float *)job->a + i * R;
            const float *restrict b = (const float *)job->b + i * R;
            for (int64_t e = 0; e < R; e++) {
                float d = a[e] - b[e];
                acc += (double)(d * d);
            }
        } else {
            for (int64_t e = 0; e < R; e++) {
                float d = kvb_load(job->a, i * R + e, job->dtype) -
                          kvb_load(job->b, i * R + e, job->dtype);
                acc += (double)(d * d);
            }
        }
        job->out[i] = (float)acc;
    }
}

/* out[i] = sum over heads and dims of (a - b)^2 for token i.  Differences
 * and squares are fp32, their sum is accumulated in double and rounded
 * once.  n == 0 succeeds without touching any pointer. */
kvb_status kvb_cpu_deviation(const void *a, const void *b, int64_t n,
                             int32_t num_heads, int32_t head_size,
                             kvb_dtype dtype, float *out)
{
    kvb_status st = kvb_check_dtype(dtype, "kvb_cpu_deviation: dtype");
    if (st != KVB_OK) {
        return st;
    }
    st = kvb_check_rows("kvb_cpu_deviation", n, num_heads, head_size);
    if (st != KVB_OK) {
        return st;
    }
    if (n > 0 && (a == NULL || b == NULL || out == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_deviation: %s is NULL with n=%lld",
                        a == NULL ? "a" : b == NULL ? "b" : "out",
                        (long long)n);
    }
    kvb_dev_job job = {a, b, (int64_t)num_heads * head_size, dtype, out};
    kvb_parallel_for(n, 1 + (1 << 16) / job.row, kvb_dev_range, &job);
    return KVB_OK;
}

/* A selection candidate: an order-preserving integer image of its score
 * (NaN lowest, -0 == +0) and its token index. */
typedef struct kvb_cand {
    uint32_t key;
    int64_t idx;
} kvb_cand;

/* Maps a float to a uint32 whose unsigned order is the float's numeric
 * order; NaN maps to 0, below -inf, and -0 maps like +0. */
static uint32_t kvb_score_key(float s)
{
    if (isnan(s)) {
        return 0;
    }
    if (s == 0.0f) {
        s = 0.0f;
    }
    uint32_t b;
    memcpy(&b, &s, sizeof b);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Returns nonzero when candidate x ranks strictly before y: higher score,
 * or an equal score (NaNs equal each other) and a lower index. */
static int kvb_cand_before(const kvb_cand *x, const kvb_cand *y)
{
    return x->key != y->key ? x->key > y->key : x->idx < y->idx;
}

/* Rearranges c[0..n) so that its k best candidates (by kvb_cand_before,
 * a strict total order because indices are distinct) occupy c[0..k), in no
 * particular order.  Quickselect with a deterministic pseudo-random pivot:
 * expected O(n).  Requires 0 < k < n. */
static void kvb_cand_select(kvb_cand *c, int64_t n, int64_t k)
{
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    int64_t lo = 0, hi = n; /* the k-th boundary lies in [lo, hi) */
    while (hi - lo > 1) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int64_t p = lo + (int64_t)((rng >> 33) % (uint64_t)(hi - lo));
        kvb_cand pivot = c[p];
        c[p] = c[hi - 1];
        c[hi - 1] = pivot;
        int64_t store = lo;
        for (int64_t i = lo; i < hi - 1; i++) {
            if (kvb_cand_before(&c[i], &pivot)) {
                kvb_cand t = c[i];
                c[i] = c[store];
                c[store] = t;
                store++;
            }
        }
        c[hi - 1] = c[store];
        c[store] = pivot;
        /* c[lo..store) rank before the pivot, c[store+1..hi) after it. */
        if (store == k || store + 1 == k) {
            return;
        }
        if (store > k) {
            hi = store;
        } else {
            lo = store + 1;
        }
    }
}

/* Chooses every forced token plus the k best-scoring other tokens (ties:
 * lower index first; NaN lowest), k clamped to the number of non-forced
 * tokens, and writes them ascending to out_idx (capacity n) with the count
 * in *n_out.  k < 0 is KVB_ERR_INVALID; allocation failure KVB_ERR_NOMEM. */
kvb_status kvb_cpu_select(const float *score, const uint8_t *forced,
                          int64_t n, int64_t k, int64_t *out_idx,
                          int64_t *n_out)
{
    if (n < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_select: n=%lld: expected n >= 0",
                        (long long)n);
    }
    if (k < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_select: k=%lld: expected k >= 0",
                        (long long)k);
    }
    if (n_out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_cpu_select: n_out is NULL");
    }
    if (n > 0 && (score == NULL || out_idx == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_select: %s is NULL with n=%lld",
                        score == NULL ? "score" : "out_idx", (long long)n);
    }
    *n_out = 0;
    if (n == 0) {
        return KVB_OK;
    }
    uint8_t *chosen = malloc((size_t)n);
    kvb_cand *cand = malloc((size_t)n * sizeof *cand);
    if (chosen == NULL || cand == NULL) {
        free(chosen);
        free(cand);
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_cpu_select: cannot allocate scratch for "
                        "n=%lld",
                        (long long)n);
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        chosen[i] = forced != NULL && forced[i] != 0;
        if (!chosen[i]) {
            cand[m].key = kvb_score_key(score[i]);
            cand[m].idx = i;
            m++;
        }
    }
    if (k > m) {
        k = m;
    }
    if (k > 0 && k < m) {
        kvb_cand_select(cand, m, k);
    }
    for (int64_t i = 0; i < k; i++) {
        chosen[cand[i].idx] = 1;
    }
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        if (chosen[i]) {
            out_idx[count++] = i;
        }
    }
    *n_out = count;
    free(chosen);
    free(cand);
    return KVB_OK;
}
