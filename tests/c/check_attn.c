/*
 * check_attn.c: kvb_cpu_attention against full causal attention computed
 * here in double, for subsets of queries at arbitrary positions, GQA
 * shapes, unsorted keys, queries that see nothing, half types and thread
 * counts.
 */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"
#include "../../csrc/internal.h"

/* One attention problem: N tokens with K/V and a query per token, all in
 * `dt`; positions k_pos/q_pos (the query of token i sits at q_pos[i]). */
typedef struct problem {
    int64_t n;
    int hq, hkv, d;
    kvb_dtype dt;
    void *q, *k, *v;
    int64_t *k_pos, *q_pos;
} problem;

/* Creates a problem of n tokens at positions 0..n-1 with random values
 * (queries scaled by qmag to make the softmax peaky or flat). */
static problem problem_make(int64_t n, int hq, int hkv, int d, kvb_dtype dt,
                            float qmag, uint64_t seed)
{
    problem p = {n, hq, hkv, d, dt, NULL, NULL, NULL, NULL, NULL};
    rng_seed(seed);
    p.q = malloc((size_t)(n * hq * d) * 4);
    p.k = malloc((size_t)(n * hkv * d) * 4);
    p.v = malloc((size_t)(n * hkv * d) * 4);
    p.k_pos = malloc((size_t)n * sizeof(int64_t));
    p.q_pos = malloc((size_t)n * sizeof(int64_t));
    for (int64_t e = 0; e < n * hq * d; e++) {
        kvb_store_elem(p.q, e, dt, rng_sym() * qmag);
    }
    for (int64_t e = 0; e < n * hkv * d; e++) {
        kvb_store_elem(p.k, e, dt, rng_sym());
        kvb_store_elem(p.v, e, dt, rng_sym());
    }
    for (int64_t i = 0; i < n; i++) {
        p.k_pos[i] = i;
        p.q_pos[i] = i;
    }
    return p;
}

/* Frees a problem's arrays. */
static void problem_free(problem *p)
{
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->k_pos);
    free(p->q_pos);
}

/* Reference output [hq, d] of one query (the problem's query row `qi` at
 * position `pos`) over all keys with k_pos <= pos, in double; zeros when no
 * key is visible. */
static void ref_row(const problem *p, int64_t qi, int64_t pos, double scale,
                    double *out)
{
    int g = p->hq / p->hkv;
    double *s = malloc((size_t)p->n * sizeof *s);
    for (int h = 0; h < p->hq; h++) {
        int kh = h / g;
        double m = -INFINITY;
        for (int64_t j = 0; j < p->n; j++) {
            if (p->k_pos[j] > pos) {
                continue;
            }
            double dot = 0;
            for (int e = 0; e < p->d; e++) {
                dot += (double)kvb_load(p->q, (qi * p->hq + h) * p->d + e,
                                        p->dt) *
                       kvb_load(p->k, (j * p->hkv + kh) * p->d + e, p->dt);
            }
            s[j] = dot * scale;
            m = s[j] > m ? s[j] : m;
        }
        double l = 0;
        double *o = out + h * p->d;
        for (int e = 0; e < p->d; e++) {
            o[e] = 0;
        }
        for (int64_t j = 0; j < p->n; j++) {
            if (p->k_pos[j] > pos) {
                continue;
            }
            double w = exp(s[j] - m);
            l += w;
            for (int e = 0; e < p->d; e++) {
                o[e] += w * kvb_load(p->v, (j * p->hkv + kh) * p->d + e,
                                     p->dt);
            }
        }
        for (int e = 0; e < p->d && l > 0; e++) {
            o[e] /= l;
        }
    }
    free(s);
}

/* Runs the op for the queries idx[0..m) of the problem (positions from
 * q_pos) and returns the output [m, hq, d] in the problem's dtype. */
static void *run_subset(const problem *p, const int64_t *idx, int64_t m,
                        float scale)
{
    size_t es = kvb_dtype_size(p->dt);
    size_t row = (size_t)(p->hq * p->d);
    char *q = malloc((size_t)m * row * es);
    int64_t *qp = malloc((size_t)m * sizeof *qp);
    char *out = malloc((size_t)m * row * es);
    memset(out, 0x7f, (size_t)m * row * es);
    for (int64_t i = 0; i < m; i++) {
        memcpy(q + (size_t)i * row * es,
               (const char *)p->q + (size_t)idx[i] * row * es, row * es);
        qp[i] = p->q_pos[idx[i]];
    }
    ck_assert_int_eq(kvb_cpu_attention(q, qp, m, p->k, p->v, p->k_pos, p->n,
                                       p->hq, p->hkv, p->d, scale, p->dt,
                                       out),
                     KVB_OK);
    free(q);
    free(qp);
    return out;
}

/* Checks output rows [m, hq, d] of queries idx[] against the double
 * reference: |got - ref| <= tol (values and V lie in [-1, 1]). */
static void check_against_ref(const problem *p, const int64_t *idx,
                              int64_t m, float scale, const void *got,
                              double tol)
{
    double *ref = malloc((size_t)(p->hq * p->d) * sizeof *ref);
    for (int64_t i = 0; i < m; i++) {
        ref_row(p, idx[i], p->q_pos[idx[i]], scale, ref);
        for (int e = 0; e < p->hq * p->d; e++) {
            double g = kvb_load(got, i * p->hq * p->d + e, p->dt);
            ck_assert_msg(fabs(g - ref[e]) <= tol,
                          "query %lld (pos %lld) elem %d: got %.9g want "
                          "%.9g",
                          (long long)idx[i], (long long)p->q_pos[idx[i]], e,
                          g, ref[e]);
        }
    }
    free(ref);
}

/* Picks m distinct random query indices of [0, n), in random order. */
static int64_t *random_subset(int64_t n, int64_t m)
{
    int64_t *perm = malloc((size_t)n * sizeof *perm);
    for (int64_t i = 0; i < n; i++) {
        perm[i] = i;
    }
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_u32() % (uint32_t)(i + 1));
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    return perm; /* the first m entries are the subset */
}

/* Full causal attention for all n queries, then a random subset at
 * arbitrary positions: the subset equals the matching rows of the full
 * result bit for bit, and both match the double reference. */
static void check_subset_equals_full(int64_t n, int hq, int hkv, int d,
                                     kvb_dtype dt, double tol, uint64_t seed)
{
    problem p = problem_make(n, hq, hkv, d, dt, 2.0f, seed);
    float scale = 1.0f / sqrtf((float)d);
    int64_t *all = malloc((size_t)n * sizeof *all);
    for (int64_t i = 0; i < n; i++) {
        all[i] = i;
    }
    char *full = run_subset(&p, all, n, scale);
    int64_t m = n / 5 + 1;
    int64_t *sub = random_subset(n, m);
    char *part = run_subset(&p, sub, m, scale);
    size_t row = (size_t)(hq * d) * kvb_dtype_size(dt);
    for (int64_t i = 0; i < m; i++) {
        ck_assert_msg(memcmp(part + (size_t)i * row,
                             full + (size_t)sub[i] * row, row) == 0,
                      "subset row %lld (query %lld) differs from the full "
                      "result",
                      (long long)i, (long long)sub[i]);
    }
    check_against_ref(&p, sub, m, scale, part, tol);
    free(all);
    free(full);
    free(sub);
    free(part);
    problem_free(&p);
}

START_TEST(test_attention_subset_equals_full_gqa_smollm)
{
    check_subset_equals_full(300, 9, 3, 64, KVB_DTYPE_F32, 1e-5, 1);
}
END_TEST

START_TEST(test_attention_subset_equals_full_gqa_llama)
{
    check_subset_equals_full(150, 32, 8, 128, KVB_DTYPE_F32, 1e-5, 2);
}
END_TEST

/* Odd shapes: head_size not a multiple of the tile, a group of 5 (rows not
 * a multiple of 4), plain multi-head attention, a single query. */
START_TEST(test_attention_odd_shapes)
{
    check_subset_equals_full(77, 5, 1, 40, KVB_DTYPE_F32, 1e-5, 3);
    check_subset_equals_full(70, 4, 4, 16, KVB_DTYPE_F32, 1e-5, 4);
    check_subset_equals_full(3, 2, 1, 8, KVB_DTYPE_F32, 1e-5, 5);
}
END_TEST

START_TEST(test_attention_half_types)
{
    check_subset_equals_full(200, 9, 3, 64, KVB_DTYPE_F16, 2e-3, 6);
    check_subset_equals_full(200, 9, 3, 64, KVB_DTYPE_BF16, 1e-2, 7);
}
END_TEST

/* Keys in shuffled order with duplicate positions and a gap; queries at
 * positions between, before and after keys.  The mask is by position
 * value, never by index. */
START_TEST(test_attention_unsorted_keys)
{
    const int64_t n = 130;
    problem p = problem_make(n, 6, 2, 32, KVB_DTYPE_F32, 3.0f, 8);
    for (int64_t j = 0; j < n; j++) {
        p.k_pos[j] = 10 + 2 * (j / 3);       /* duplicates, gaps */
        p.q_pos[j] = (int64_t)(rng_u32() % 110); /* some before all keys */
    }
    p.q_pos[0] = 10;  /* exactly the first key position */
    p.q_pos[1] = 9;   /* before every key */
    int64_t *all = malloc((size_t)n * sizeof *all);
    for (int64_t i = 0; i < n; i++) {
        all[i] = i;
    }
    float scale = 0.2f;
    char *sorted_out = run_subset(&p, all, n, scale);
    check_against_ref(&p, all, n, scale, sorted_out, 1e-5);
    /* Shuffle the keys (rows and positions together). */
    int64_t *perm = random_subset(n, n);
    problem s = p;
    s.k = malloc((size_t)(n * 2 * 32) * 4);
    s.v = malloc((size_t)(n * 2 * 32) * 4);
    s.k_pos = malloc((size_t)n * sizeof(int64_t));
    for (int64_t j = 0; j < n; j++) {
        memcpy((float *)s.k + j * 64, (float *)p.k + perm[j] * 64, 256);
        memcpy((float *)s.v + j * 64, (float *)p.v + perm[j] * 64, 256);
        s.k_pos[j] = p.k_pos[perm[j]];
    }
    char *shuf_out = run_subset(&s, all, n, scale);
    check_against_ref(&s, all, n, scale, shuf_out, 1e-5);
    float *a = (float *)sorted_out, *b = (float *)shuf_out;
    for (int64_t e = 0; e < n * 6 * 32; e++) {
        ck_assert_msg(fabsf(a[e] - b[e]) <= 1e-6f, "elem %lld", (long long)e);
    }
    /* The query before every key gets exact zeros. */
    for (int e = 0; e < 6 * 32; e++) {
        ck_assert_msg(b[6 * 32 + e] == 0.0f, "elem %d not zero", e);
    }
    free(all);
    free(perm);
    free(sorted_out);
    free(shuf_out);
    free(s.k);
    free(s.v);
    free(s.k_pos);
    problem_free(&p);
}
END_TEST

/* No keys at all: every output row is zeros. */
START_TEST(test_attention_no_keys_zeros)
{
    float q[2 * 4], out[2 * 4];
    int64_t qp[2] = {0, 5};
    for (int i = 0; i < 8; i++) {
        q[i] = 1.0f;
        out[i] = 7.0f;
    }
    ck_assert_int_eq(kvb_cpu_attention(q, qp, 2, NULL, NULL, NULL, 0, 1, 1, 4,
                                       1.0f, KVB_DTYPE_F32, out),
                     KVB_OK);
    for (int i = 0; i < 8; i++) {
        ck_assert_float_eq(out[i], 0.0f);
    }
}
END_TEST

/* One and two threads give bit-identical output. */
START_TEST(test_attention_threads_identical)
{
    problem p = problem_make(257, 9, 3, 64, KVB_DTYPE_F32, 2.0f, 9);
    int64_t *all = random_subset(257, 257);
    ck_assert_int_eq(kvb_cpu_set_threads(1), KVB_OK);
    char *one = run_subset(&p, all, 257, 0.125f);
    ck_assert_int_eq(kvb_cpu_set_threads(2), KVB_OK);
    char *two = run_subset(&p, all, 257, 0.125f);
    ck_assert_int_eq(kvb_cpu_set_threads(0), KVB_OK);
    ck_assert(memcmp(one, two, (size_t)(257 * 9 * 64) * 4) == 0);
    free(all);
    free(one);
    free(two);
    problem_free(&p);
}
END_TEST

START_TEST(test_attention_bad_args_rejected)
{
    float x[64], out[64];
    int64_t pos[2] = {0, 1};
    ck_assert_int_eq(kvb_cpu_attention(x, pos, 1, x, x, pos, 1, 9, 4, 4, 1.0f,
                                       KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(),
                                 "num_q_heads=9 is not a multiple of "
                                 "num_kv_heads=4"));
    ck_assert_int_eq(kvb_cpu_attention(x, pos, 1, NULL, x, pos, 1, 1, 1, 4,
                                       1.0f, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "k is NULL with nk=1"));
    ck_assert_int_eq(kvb_cpu_attention(x, NULL, 1, x, x, pos, 1, 1, 1, 4,
                                       1.0f, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "q_pos is NULL"));
    ck_assert_int_eq(kvb_cpu_attention(x, pos, 1, x, x, pos, 1, 1, 1, 0,
                                       1.0f, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "head_size=0"));
    ck_assert_int_eq(kvb_cpu_attention(x, pos, -1, x, x, pos, 1, 1, 1, 4,
                                       1.0f, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "nq=-1"));
    ck_assert_int_eq(kvb_cpu_attention(x, pos, 1, x, x, pos, 1, 1, 1, 4, NAN,
                                       KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "scale=nan"));
    ck_assert_int_eq(kvb_cpu_attention(x, pos, 1, x, x, pos, 1, 1, 1, 4, 1.0f,
                                       (kvb_dtype)3, out),
                     KVB_ERR_UNSUPPORTED);
    ck_assert_int_eq(kvb_cpu_attention(NULL, NULL, 0, NULL, NULL, NULL, 5, 1,
                                       1, 4, 1.0f, KVB_DTYPE_F32, NULL),
                     KVB_OK);
}
END_TEST

/* Builds the suite of the CPU attention op. */
Suite *attn_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 300}};
    const test_spec tests[] = {
        {0, test_attention_subset_equals_full_gqa_smollm, 0},
        {0, test_attention_subset_equals_full_gqa_llama, 0},
        {0, test_attention_odd_shapes, 0},
        {0, test_attention_half_types, 0},
        {0, test_attention_unsorted_keys, 0},
        {0, test_attention_no_keys_zeros, 0},
        {0, test_attention_threads_identical, 0},
        {0, test_attention_bad_args_rejected, 0},
    };
    return suite_build("attn", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
