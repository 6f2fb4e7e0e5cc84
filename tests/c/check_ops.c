/*
 * check_ops.c: the CPU reference ops other than attention: gather/scatter
 * through every paged layout, re-rotation of keys, deviation and the
 * selection of tokens to recompute.  References are computed here in double
 * by straightforward code.
 */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"
#include "../../csrc/internal.h"

/* ---- gather / scatter ------------------------------------------------- */

/* Scatters random rows to a random set of distinct slots (with padding
 * slots mixed in), checks that exactly those cache elements changed, then
 * gathers them back and checks the rows are bit-identical and padding rows
 * untouched.  Runs for one layout kind and dtype. */
static void check_roundtrip(int kind, kvb_dtype dt)
{
    const int64_t B = 5, N = 4;
    const int32_t H = 3, D = 8;
    const int64_t n = 14;
    size_t es = kvb_dtype_size(dt);
    size_t total = (size_t)(2 * B * N * H * D);
    size_t row = (size_t)(H * D) * es;
    char *cache = malloc(total * es);
    char *before = malloc(total * es);
    char *kin = malloc(n * row), *vin = malloc(n * row);
    char *kout = malloc(n * row), *vout = malloc(n * row);
    int64_t slots[14];
    int64_t perm[20];
    rng_seed(100 + (uint64_t)kind * 7 + (uint64_t)dt);
    for (size_t i = 0; i < total * es; i++) {
        cache[i] = (char)(rng_u32() & 0xff);
    }
    memcpy(before, cache, total * es);
    for (size_t i = 0; i < n * row; i++) {
        kin[i] = (char)(rng_u32() & 0xff);
        vin[i] = (char)(rng_u32() & 0xff);
    }
    memset(kout, 0x5a, n * row);
    memset(vout, 0x5a, n * row);
    for (int i = 0; i < 20; i++) {
        perm[i] = i;
    }
    for (int i = 19; i > 0; i--) {
        int j = (int)(rng_u32() % (uint32_t)(i + 1));
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    int64_t real = 0;
    for (int64_t i = 0; i < n; i++) {
        slots[i] = (i % 5 == 2) ? -1 : perm[i];
        real += slots[i] >= 0;
    }
    kvb_paged_layout L = make_layout(kind, cache, B, N, H, D, dt, -1);

    ck_assert_int_eq(kvb_cpu_scatter(&L, slots, n, kin, vin), KVB_OK);
    size_t changed = 0;
    for (size_t e = 0; e < total; e++) {
        changed += memcmp(cache + e * es, before + e * es, es) != 0;
    }
    /* Random bytes can coincide with the old value; allow a few. */
    ck_assert_msg(changed <= (size_t)(real * 2 * H * D) &&
                      changed + 8 >= (size_t)(real * 2 * H * D),
                  "layout %d dtype %d: %zu elements changed, expected %lld",
                  kind, (int)dt, changed, (long long)(real * 2 * H * D));

    ck_assert_int_eq(kvb_cpu_gather(&L, slots, n, kout, vout), KVB_OK);
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0) {
            for (size_t b = 0; b < row; b++) {
                ck_assert_int_eq((unsigned char)kout[i * row + b], 0x5a);
                ck_assert_int_eq((unsigned char)vout[i * row + b], 0x5a);
            }
        } else {
            ck_assert_msg(memcmp(kout + i * row, kin + i * row, row) == 0,
                          "layout %d dtype %d: K row %lld differs", kind,
                          (int)dt, (long long)i);
            ck_assert_msg(memcmp(vout + i * row, vin + i * row, row) == 0,
                          "layout %d dtype %d: V row %lld differs", kind,
                          (int)dt, (long long)i);
        }
    }
    free(cache);
    free(before);
    free(kin);
    free(vin);
    free(kout);
    free(vout);
}

START_TEST(test_copy_roundtrip_every_layout)
{
    for (int kind = 0; kind < NUM_LAYOUTS; kind++) {
        check_roundtrip(kind, KVB_DTYPE_F32);
        check_roundtrip(kind, KVB_DTYPE_F16);
        check_roundtrip(kind, KVB_DTYPE_BF16);
    }
}
END_TEST

/* The element a K|V interleaved cache holds is where the layout says:
 * token t of block b, head h, dim d of K at ((b*N+t)*H+h)*2D + d. */
START_TEST(test_copy_scatter_addresses_interleaved)
{
    const int64_t B = 2, N = 4;
    const int32_t H = 2, D = 3;
    float cache[2 * 2 * 4 * 2 * 3];
    memset(cache, 0, sizeof cache);
    float k[2 * 3], v[2 * 3];
    for (int i = 0; i < 6; i++) {
        k[i] = (float)(i + 1);
        v[i] = (float)(-i - 1);
    }
    kvb_paged_layout L =
        make_layout(LAYOUT_BNH2D, (char *)cache, B, N, H, D, KVB_DTYPE_F32, -1);
    int64_t slot = 6; /* block 1, token 2 */
    ck_assert_int_eq(kvb_cpu_scatter(&L, &slot, 1, k, v), KVB_OK);
    for (int h = 0; h < H; h++) {
        for (int d = 0; d < D; d++) {
            int64_t base = ((1 * N + 2) * H + h) * 2 * D;
            ck_assert_float_eq(cache[base + d], k[h * D + d]);
            ck_assert_float_eq(cache[base + D + d], v[h * D + d]);
        }
    }
}
END_TEST

/* With V's own strides (vLLM's CPU backend) K lands transposed and V
 * row-major: K(b, t, h, d) at ((b*H + h)*2*N*D) + d*N + t, V(b, t, h, d) at
 * ((b*H + h)*2*N*D) + N*D + t*D + d; gather reads back the same rows. */
START_TEST(test_copy_scatter_addresses_transposed_k)
{
    enum { B = 2, N = 4, H = 2, D = 3 };
    float cache[2 * B * N * H * D];
    memset(cache, 0, sizeof cache);
    float k[2 * H * D], v[2 * H * D];
    for (int i = 0; i < 2 * H * D; i++) {
        k[i] = (float)(i + 1);
        v[i] = (float)(-i - 1);
    }
    kvb_paged_layout L = make_layout(LAYOUT_KT, (char *)cache, B, N, H,
                                     D, KVB_DTYPE_F32, -1);
    int64_t slots[2] = {6, 1}; /* block 1 token 2; block 0 token 1 */
    ck_assert_int_eq(kvb_cpu_scatter(&L, slots, 2, k, v), KVB_OK);
    int nonzero = 0;
    for (size_t e = 0; e < sizeof cache / sizeof cache[0]; e++) {
        nonzero += cache[e] != 0.0f;
    }
    ck_assert_int_eq(nonzero, 2 * 2 * H * D);
    for (int i = 0; i < 2; i++) {
        int64_t b = slots[i] / N, t = slots[i] % N;
        for (int h = 0; h < H; h++) {
            int64_t base = (b * H + h) * 2 * N * D;
            for (int d = 0; d < D; d++) {
                ck_assert_float_eq(cache[base + d * N + t],
                                   k[(i * H + h) * D + d]);
                ck_assert_float_eq(cache[base + N * D + t * D + d],
                                   v[(i * H + h) * D + d]);
            }
        }
    }
    float ko[2 * H * D], vo[2 * H * D];
    ck_assert_int_eq(kvb_cpu_gather(&L, slots, 2, ko, vo), KVB_OK);
    ck_assert_mem_eq(ko, k, sizeof k);
    ck_assert_mem_eq(vo, v, sizeof v);
}
END_TEST

/* V strides of all 0 mean K's: such a layout and one spelling K's strides
 * out for V write the same cache. */
START_TEST(test_copy_zero_v_strides_mean_k_strides)
{
    enum { B = 3, N = 4, H = 2, D = 5 };
    float a[2 * B * N * H * D], b[2 * B * N * H * D];
    memset(a, 0, sizeof a);
    memset(b, 0, sizeof b);
    float k[3 * H * D], v[3 * H * D];
    for (int i = 0; i < 3 * H * D; i++) {
        k[i] = (float)(i + 1);
        v[i] = (float)(1000 + i);
    }
    int64_t slots[3] = {0, 7, 11};
    for (int kind = 0; kind < LAYOUT_KT; kind++) {
        kvb_paged_layout La =
            make_layout(kind, (char *)a, B, N, H, D, KVB_DTYPE_F32, -1);
        kvb_paged_layout Lb =
            make_layout(kind, (char *)b, B, N, H, D, KVB_DTYPE_F32, -1);
        ck_assert_int_eq(La.v_block_stride | La.v_token_stride |
                             La.v_head_stride | La.v_dim_stride,
                         0);
        Lb.v_block_stride = Lb.block_stride;
        Lb.v_token_stride = Lb.token_stride;
        Lb.v_head_stride = Lb.head_stride;
        Lb.v_dim_stride = Lb.dim_stride;
        ck_assert_int_eq(kvb_cpu_scatter(&La, slots, 3, k, v), KVB_OK);
        ck_assert_int_eq(kvb_cpu_scatter(&Lb, slots, 3, k, v), KVB_OK);
        ck_assert_msg(memcmp(a, b, sizeof a) == 0, "layout %d differs",
                      kind);
    }
}
END_TEST

/* Scatter with one plane NULL writes only the other. */
START_TEST(test_copy_scatter_k_only)
{
    float cache[2 * 2 * 2 * 1 * 2];
    memset(cache, 0, sizeof cache);
    float k[2] = {1.0f, 2.0f};
    kvb_paged_layout L =
        make_layout(LAYOUT_2BNHD, (char *)cache, 2, 2, 1, 2, KVB_DTYPE_F32, -1);
    int64_t slot = 3;
    ck_assert_int_eq(kvb_cpu_scatter(&L, &slot, 1, k, NULL), KVB_OK);
    ck_assert_float_eq(cache[3 * 2], 1.0f);
    ck_assert_float_eq(cache[3 * 2 + 1], 2.0f);
    for (int i = 8; i < 16; i++) {
        ck_assert_float_eq(cache[i], 0.0f);
    }
}
END_TEST

START_TEST(test_copy_bad_slot_rejected)
{
    float cache[2 * 2 * 2 * 1 * 2];
    float out[4 * 2];
    kvb_paged_layout L =
        make_layout(LAYOUT_2BNHD, (char *)cache, 2, 2, 1, 2, KVB_DTYPE_F32, -1);
    int64_t slots[4] = {0, -1, 3, 4};
    kvb_clear_error();
    ck_assert_int_eq(kvb_cpu_gather(&L, slots, 4, out, out), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "slots[3]=4"));
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "out of range"));
    ck_assert_int_eq(kvb_cpu_scatter(&L, slots, 4, out, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "slots[3]=4"));
}
END_TEST

START_TEST(test_copy_bad_args_rejected)
{
    float cache[16], out[16];
    kvb_paged_layout L =
        make_layout(LAYOUT_2BNHD, (char *)cache, 2, 2, 1, 2, KVB_DTYPE_F32, -1);
    int64_t slot = 0;
    ck_assert_int_eq(kvb_cpu_gather(NULL, &slot, 1, out, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "layout is NULL"));
    ck_assert_int_eq(kvb_cpu_gather(&L, NULL, 1, out, out), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "slots is NULL"));
    ck_assert_int_eq(kvb_cpu_gather(&L, &slot, 1, NULL, NULL),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "both NULL"));
    L.device = 0;
    ck_assert_int_eq(kvb_cpu_scatter(&L, &slot, 1, out, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "layout.device=0"));
    L.device = -1;
    L.head_size = 0;
    ck_assert_int_eq(kvb_cpu_scatter(&L, &slot, 1, out, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "head_size"));
    L.head_size = 2;
    ck_assert_int_eq(kvb_cpu_gather(&L, &slot, 0, out, out), KVB_OK);
}
END_TEST

/* ---- re-rotation ------------------------------------------------------ */

/* Rotates x [n, H, D] (double) in place to positions pos[i] with the
 * given pairing and table, straight from the RoPE definition. */
static void ref_rope(double *x, int64_t n, int H, int D, int rd,
                     kvb_rope_style style, const float *inv_freq,
                     const int64_t *pos)
{
    int half = rd / 2;
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < H; h++) {
            double *r = x + (i * H + h) * D;
            for (int p = 0; p < half; p++) {
                int a = style == KVB_ROPE_GPTJ ? 2 * p : p;
                int b = style == KVB_ROPE_GPTJ ? 2 * p + 1 : p + half;
                double ang = (double)pos[i] * (double)inv_freq[p];
                double c = cos(ang), s = sin(ang);
                double u = r[a], v = r[b];
                r[a] = u * c - v * s;
                r[b] = u * s + v * c;
            }
        }
    }
}

/* Fills inv_freq[rd/2] with Llama-3's scaled table (base 500000, factor 8,
 * low/high frequency factors 1 and 4, 8192 original positions). */
static void llama3_inv_freq(float *inv_freq, int rd)
{
    const double base = 500000.0, factor = 8.0, lo = 1.0, hi = 4.0;
    const double orig = 8192.0;
    for (int i = 0; i < rd / 2; i++) {
        double f = 1.0 / pow(base, (2.0 * i) / rd);
        double wavelen = 2.0 * 3.14159265358979323846 / f;
        if (wavelen < orig / hi) {
            inv_freq[i] = (float)f;
        } else if (wavelen > orig / lo) {
            inv_freq[i] = (float)(f / factor);
        } else {
            double smooth = (orig / wavelen - lo) / (hi - lo);
            inv_freq[i] = (float)((1.0 - smooth) * f / factor + smooth * f);
        }
    }
}

/* Fills inv_freq[rd/2] with the classic table of base `base`. */
static void plain_inv_freq(float *inv_freq, int rd, double base)
{
    for (int i = 0; i < rd / 2; i++) {
        inv_freq[i] = (float)(1.0 / pow(base, (2.0 * i) / rd));
    }
}

/* Rotates unrotated random keys to old positions (reference, stored in
 * dtype), re-rotates them with the op to new positions and compares with
 * the reference rotation of the unrotated keys to the new positions.  The
 * tail dims [rd, D) must come through bit-exact.  tol is relative to the
 * largest key element (1). */
static void check_rerotate(kvb_dtype dt, kvb_rope_style style, int D, int rd,
                           const float *inv_freq, const int64_t *oldp,
                           const int64_t *newp, int64_t n, double tol)
{
    const int H = 3;
    size_t cnt = (size_t)(n * H * D);
    double *x0 = malloc(cnt * sizeof *x0);
    double *xo = malloc(cnt * sizeof *xo);
    double *xn = malloc(cnt * sizeof *xn);
    void *k = malloc(cnt * 4);
    for (size_t e = 0; e < cnt; e++) {
        x0[e] = rng_sym();
    }
    memcpy(xo, x0, cnt * sizeof *xo);
    memcpy(xn, x0, cnt * sizeof *xn);
    ref_rope(xo, n, H, D, rd, style, inv_freq, oldp);
    ref_rope(xn, n, H, D, rd, style, inv_freq, newp);
    size_t es = kvb_dtype_size(dt);
    void *k0 = malloc(cnt * 4);
    for (size_t e = 0; e < cnt; e++) {
        kvb_store_elem(k, (int64_t)e, dt, (float)xo[e]);
    }
    memcpy(k0, k, cnt * es);
    kvb_rope rope = {rd, style, inv_freq, 1.0f};
    ck_assert_int_eq(kvb_cpu_rerotate(k, n, H, D, dt, &rope, oldp, newp),
                     KVB_OK);
    for (size_t e = 0; e < cnt; e++) {
        double got = kvb_load(k, (int64_t)e, dt);
        if ((int)(e % (size_t)D) >= rd) {
            ck_assert_msg(memcmp((char *)k + e * es, (char *)k0 + e * es,
                                 es) == 0,
                          "dtype %d: tail elem %zu changed", (int)dt, e);
            continue;
        }
        ck_assert_msg(fabs(got - xn[e]) <= tol,
                      "dtype %d style %d elem %zu: got %.9g want %.9g",
                      (int)dt, (int)style, e, got, xn[e]);
    }
    free(x0);
    free(xo);
    free(xn);
    free(k);
    free(k0);
}

START_TEST(test_rerotate_equals_rotating_unrotated)
{
    float inv[64];
    int64_t oldp[6] = {0, 70000, 5, 100000, 31, 4096};
    int64_t newp[6] = {100000, 3, 5000, 0, 31, 4097};
    rng_seed(7);
    for (int style = 0; style < 2; style++) {
        plain_inv_freq(inv, 64, 10000.0);
        check_rerotate(KVB_DTYPE_F32, (kvb_rope_style)style, 64, 64, inv,
                       oldp, newp, 6, 2e-6);
        llama3_inv_freq(inv, 128);
        check_rerotate(KVB_DTYPE_F32, (kvb_rope_style)style, 128, 128, inv,
                       oldp, newp, 6, 2e-6);
        /* Partial rotary: only the first 32 of 80 dims rotate. */
        plain_inv_freq(inv, 32, 10000.0);
        check_rerotate(KVB_DTYPE_F32, (kvb_rope_style)style, 80, 32, inv,
                       oldp, newp, 6, 2e-6);
    }
}
END_TEST

START_TEST(test_rerotate_half_types_within_tolerance)
{
    float inv[64];
    int64_t oldp[4] = {0, 70000, 12, 9};
    int64_t newp[4] = {100000, 3, 13, 9000};
    rng_seed(8);
    plain_inv_freq(inv, 64, 10000.0);
    for (int style = 0; style < 2; style++) {
        /* Stored old keys carry one rounding, the result another. */
        check_rerotate(KVB_DTYPE_F16, (kvb_rope_style)style, 64, 64, inv,
                       oldp, newp, 4, 3.0 * 0.00098);
        check_rerotate(KVB_DTYPE_BF16, (kvb_rope_style)style, 64, 64, inv,
                       oldp, newp, 4, 3.0 * 0.0079);
    }
}
END_TEST

/* Tail dims (beyond rotary_dim) are bit-exact, and p -> p is the identity
 * bit for bit. */
START_TEST(test_rerotate_tail_and_identity_exact)
{
    enum { n = 4, H = 2, D = 24 };
    float inv[8];
    plain_inv_freq(inv, 16, 10000.0);
    float k[n * H * D], k0[n * H * D];
    rng_seed(9);
    for (int e = 0; e < n * H * D; e++) {
        k[e] = k0[e] = rng_sym();
    }
    int64_t oldp[n] = {0, 7, 100, 5}, newp[n] = {9, 7, 3, 50000};
    kvb_rope rope = {16, KVB_ROPE_GPTJ, inv, 1.0f};
    ck_assert_int_eq(kvb_cpu_rerotate(k, n, H, D, KVB_DTYPE_F32, &rope, oldp,
                                      newp),
                     KVB_OK);
    for (int i = 0; i < n; i++) {
        for (int e = 0; e < H * D; e++) {
            int idx = i * H * D + e;
            if (i == 1 || e % D >= 16) {
                ck_assert_msg(memcmp(&k[idx], &k0[idx], 4) == 0,
                              "token %d elem %d changed", i, e);
            }
        }
    }
    /* The rotated part of token 0 did change. */
    ck_assert(memcmp(k, k0, 16 * 4) != 0);
}
END_TEST

/* p -> q -> r equals p -> r, and the attention factor is not applied. */
START_TEST(test_rerotate_composes)
{
    enum { n = 5, H = 2, D = 64 };
    float inv[32];
    llama3_inv_freq(inv, 64);
    float a[n * H * D], b[n * H * D];
    rng_seed(10);
    for (int e = 0; e < n * H * D; e++) {
        a[e] = b[e] = rng_sym();
    }
    int64_t p[n] = {0, 100, 70000, 17, 8191};
    int64_t q[n] = {100000, 3, 12, 17, 8192};
    int64_t r[n] = {5, 99999, 70001, 40000, 1};
    kvb_rope rope = {64, KVB_ROPE_NEOX, inv, 1.7f};
    ck_assert_int_eq(kvb_cpu_rerotate(a, n, H, D, KVB_DTYPE_F32, &rope, p, q),
                     KVB_OK);
    ck_assert_int_eq(kvb_cpu_rerotate(a, n, H, D, KVB_DTYPE_F32, &rope, q, r),
                     KVB_OK);
    ck_assert_int_eq(kvb_cpu_rerotate(b, n, H, D, KVB_DTYPE_F32, &rope, p, r),
                     KVB_OK);
    for (int e = 0; e < n * H * D; e++) {
        ck_assert_msg(fabsf(a[e] - b[e]) <= 2e-6f, "elem %d: %g vs %g", e,
                      (double)a[e], (double)b[e]);
    }
    /* Rotation preserves each head's norm: no scale was applied. */
    float c[n * H * D];
    rng_seed(10);
    for (int e = 0; e < n * H * D; e++) {
        c[e] = rng_sym();
    }
    for (int i = 0; i < n * H; i++) {
        double na = 0, nc = 0;
        for (int d = 0; d < D; d++) {
            na += (double)b[i * D + d] * b[i * D + d];
            nc += (double)c[i * D + d] * c[i * D + d];
        }
        ck_assert_msg(fabs(na - nc) <= 1e-5 * nc, "norm %g vs %g", na, nc);
    }
}
END_TEST

START_TEST(test_rerotate_bad_args_rejected)
{
    float inv[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    float k[16];
    int64_t pos[1] = {0};
    kvb_rope rope = {3, KVB_ROPE_NEOX, inv, 1.0f};
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, &rope, pos,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "rope.rotary_dim=3"));
    rope.rotary_dim = 18;
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, &rope, pos,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "head_size=16"));
    rope.rotary_dim = 0;
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, &rope, pos,
                                      pos),
                     KVB_ERR_INVALID);
    rope.rotary_dim = 16;
    rope.inv_freq = NULL;
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, &rope, pos,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "inv_freq is NULL"));
    rope.inv_freq = inv;
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, &rope, NULL,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "old_pos is NULL"));
    ck_assert_int_eq(kvb_cpu_rerotate(k, -1, 1, 16, KVB_DTYPE_F32, &rope, pos,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "n=-1"));
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, (kvb_dtype)9, &rope, pos,
                                      pos),
                     KVB_ERR_UNSUPPORTED);
    ck_assert_int_eq(kvb_cpu_rerotate(k, 1, 1, 16, KVB_DTYPE_F32, NULL, pos,
                                      pos),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_cpu_rerotate(NULL, 0, 1, 16, KVB_DTYPE_F32, &rope,
                                      NULL, NULL),
                     KVB_OK);
}
END_TEST

/* ---- fused load ------------------------------------------------------- */

/* Fills a load case: L = 2 layers of stored rows for three segments of
 * 5, 9 and 4 tokens (bf16, 2 heads of 16 dims, NeoX over 12 dims), placed
 * at staging rows 1, 8 and 17 of 22 (rows 0, 6-7, 17.. partly uncovered),
 * with source positions of a moved chunk, one shuffled row and one row
 * whose delta is 0.  Storage for the rows is `store` (owned by the
 * caller, 2 * 2 * 18 * 32 elements). */
enum { LD_H = 2, LD_D = 16, LD_ROT = 12, LD_ROWS = 22, LD_ROW = LD_H * LD_D };
static void load_fixture(uint16_t *store, int64_t *src_pos, int64_t *dst_pos,
                         kvb_load_seg segs[3])
{
    static const int64_t T[3] = {5, 9, 4}, at[3] = {1, 8, 17};
    int64_t stored = 0;
    for (int s = 0; s < 3; s++) {
        stored += T[s];
    }
    for (int64_t e = 0; e < 2 * 2 * stored * LD_ROW; e++) {
        kvb_store_elem(store, e, KVB_DTYPE_BF16, rng_sym());
    }
    int64_t off = 0;
    for (int s = 0; s < 3; s++) {
        /* K of layers 0 and 1, then V of layers 0 and 1, per segment */
        uint16_t *k0 = store + 4 * off * LD_ROW;
        segs[s] = (kvb_load_seg){k0, k0 + 2 * T[s] * LD_ROW, T[s] * LD_ROW,
                                 src_pos + off, at[s], T[s]};
        for (int64_t t = 0; t < T[s]; t++) {
            src_pos[off + t] = 300 * s + t; /* a chunk moved as a whole */
        }
        off += T[s];
    }
    src_pos[5 + 3] = 4000;                   /* one shuffled row */
    for (int64_t r = 0; r < LD_ROWS; r++) {
        dst_pos[r] = r;
    }
    dst_pos[17] = src_pos[5 + 9];            /* delta 0: bit-exact copy */
}

/* A load problem: the fixture's segments, a rope over LD_ROT dims, and
 * staging buffers k, v plus a second pair k2, v2 holding the same bytes. */
typedef struct load_case {
    float inv[LD_ROT / 2];
    kvb_rope rope;
    uint16_t store[2 * 2 * 18 * LD_ROW];
    int64_t src_pos[18], dst_pos[LD_ROWS];
    kvb_load_seg segs[3];
    uint16_t k[LD_ROWS * LD_ROW], v[LD_ROWS * LD_ROW];
    uint16_t k2[LD_ROWS * LD_ROW], v2[LD_ROWS * LD_ROW];
} load_case;

/* Fills `lc` from load_fixture (seeded with `seed`) with rope `style`;
 * both staging pairs start as bytes `fill`. */
static void load_case_init(load_case *lc, kvb_rope_style style, uint64_t seed,
                           int fill)
{
    plain_inv_freq(lc->inv, LD_ROT, 10000.0);
    lc->rope = (kvb_rope){LD_ROT, style, lc->inv, 1.0f};
    rng_seed(seed);
    load_fixture(lc->store, lc->src_pos, lc->dst_pos, lc->segs);
    memset(lc->k, fill, sizeof lc->k);
    memset(lc->v, fill, sizeof lc->v);
    memcpy(lc->k2, lc->k, sizeof lc->k);
    memcpy(lc->v2, lc->v, sizeof lc->v);
}

/* Copies segment `seg`'s K and V rows of `layer` to its rows of k, v. */
static void copy_segment(const kvb_load_seg *seg, int32_t layer, uint16_t *k,
                         uint16_t *v)
{
    size_t bytes = (size_t)(seg->num_tokens * LD_ROW) * 2;
    memcpy(k + seg->dst_start * LD_ROW,
           (const uint16_t *)seg->k0 + layer * seg->layer_stride, bytes);
    memcpy(v + seg->dst_start * LD_ROW,
           (const uint16_t *)seg->v0 + layer * seg->layer_stride, bytes);
}

/* Runs kvb_cpu_load_rotate of `segs` for `layer` into k, v of `lc`. */
static kvb_status load_into(load_case *lc, const kvb_load_seg *segs,
                            int32_t layer, uint16_t *k, uint16_t *v)
{
    return kvb_cpu_load_rotate(segs, 3, layer, k, v, lc->dst_pos, LD_ROWS,
                               LD_H, LD_D, KVB_DTYPE_BF16, &lc->rope);
}

/* The load equals copying each segment's rows of the layer and then
 * re-rotating them with kvb_cpu_rerotate, bit for bit; rows no segment
 * covers keep their bytes. */
START_TEST(test_load_rotate_equals_copy_then_rerotate)
{
    static load_case lc;
    load_case_init(&lc, KVB_ROPE_NEOX, 21, 0xab);
    const int32_t layer = 1;
    for (int s = 0; s < 3; s++) {
        const kvb_load_seg *seg = &lc.segs[s];
        copy_segment(seg, layer, lc.k2, lc.v2);
        ck_assert_int_eq(kvb_cpu_rerotate(lc.k2 + seg->dst_start * LD_ROW,
                                          seg->num_tokens, LD_H, LD_D,
                                          KVB_DTYPE_BF16, &lc.rope, seg->src_pos,
                                          lc.dst_pos + seg->dst_start),
                         KVB_OK);
    }
    ck_assert_int_eq(load_into(&lc, lc.segs, layer, lc.k, lc.v), KVB_OK);
    ck_assert_int_eq(memcmp(lc.k, lc.k2, sizeof lc.k), 0);
    ck_assert_int_eq(memcmp(lc.v, lc.v2, sizeof lc.v), 0);
    /* row 0 is uncovered, row 17 (delta 0) is the stored row itself */
    ck_assert_int_eq(lc.k[0], 0xabab);
    ck_assert_int_eq(memcmp(lc.k + 17 * LD_ROW,
                            (const uint16_t *)lc.segs[2].k0 +
                                layer * lc.segs[2].layer_stride,
                            LD_ROW * 2),
                     0);
}
END_TEST

/* A segment with k0 == NULL has its rows in the staging buffer already:
 * the load re-rotates its K there and leaves its V alone, and the result
 * equals the load that copies, bit for bit. */
START_TEST(test_load_rotate_in_place_equals_copy)
{
    for (int style = 0; style < 2; style++) {
        static load_case lc;
        load_case_init(&lc, (kvb_rope_style)style, 22 + (uint64_t)style, 0x7f);
        const int32_t layer = 1;
        ck_assert_int_eq(load_into(&lc, lc.segs, layer, lc.k, lc.v), KVB_OK);
        /* segments 0 and 2 arrive by a plain copy first, then in place */
        kvb_load_seg in_place[3];
        memcpy(in_place, lc.segs, sizeof in_place);
        for (int s = 0; s < 3; s += 2) {
            copy_segment(&lc.segs[s], layer, lc.k2, lc.v2);
            in_place[s].k0 = NULL;
            in_place[s].v0 = NULL;
            in_place[s].layer_stride = 0; /* not read */
        }
        ck_assert_int_eq(load_into(&lc, in_place, layer, lc.k2, lc.v2), KVB_OK);
        ck_assert_msg(memcmp(lc.k, lc.k2, sizeof lc.k) == 0, "style %d: K differs",
                      style);
        ck_assert_msg(memcmp(lc.v, lc.v2, sizeof lc.v) == 0, "style %d: V differs",
                      style);
        /* the rotation did happen: segment 0's first K row moved */
        ck_assert(memcmp(lc.k2 + LD_ROW, (const uint16_t *)lc.segs[0].k0 +
                                             layer * lc.segs[0].layer_stride,
                         LD_ROW * 2) != 0);
    }
}
END_TEST

/* Bad tables are refused with the segment and the fault named. */
START_TEST(test_load_rotate_bad_segments_rejected)
{
    static const char *const why[4] = {
        "load segment 1: NULL v0 with k0 set",
        "load segment 2: NULL src_pos",
        "load segments 0 and 1 overlap at row 8",
        "rows [19, 23) are outside the staging buffer of 22 rows",
    };
    static load_case lc;
    load_case_init(&lc, KVB_ROPE_NEOX, 23, 0);
    for (int c = 0; c < 4; c++) {
        kvb_load_seg bad[3];
        memcpy(bad, lc.segs, sizeof bad);
        switch (c) {
        case 0:
            bad[1].v0 = NULL; /* k0 set: the rows must come from somewhere */
            break;
        case 1:
            bad[2].k0 = NULL;
            bad[2].src_pos = NULL; /* in place still needs the stored positions */
            break;
        case 2:
            bad[0].dst_start = 4; /* rows 4..8 run into segment 1 at row 8 */
            break;
        default:
            bad[2].dst_start = 19; /* 19 + 4 > 22 */
            break;
        }
        kvb_clear_error();
        ck_assert_int_eq(load_into(&lc, bad, 0, lc.k, lc.v), KVB_ERR_INVALID);
        ck_assert_has(kvb_last_error(), why[c]);
    }
}
END_TEST

/* ---- deviation -------------------------------------------------------- */

START_TEST(test_deviation_matches_double_reference)
{
    enum { n = 37, H = 3, D = 64 };
    const kvb_dtype dts[3] = {KVB_DTYPE_F32, KVB_DTYPE_F16, KVB_DTYPE_BF16};
    float a32[n * H * D], b32[n * H * D];
    float out[n];
    rng_seed(11);
    for (int t = 0; t < 3; t++) {
        kvb_dtype dt = dts[t];
        char a[n * H * D * 4], b[n * H * D * 4];
        for (int e = 0; e < n * H * D; e++) {
            kvb_store_elem(a, e, dt, rng_sym() * 3.0f);
            kvb_store_elem(b, e, dt, rng_sym() * 3.0f);
            a32[e] = kvb_load(a, e, dt);
            b32[e] = kvb_load(b, e, dt);
        }
        ck_assert_int_eq(kvb_cpu_deviation(a, b, n, H, D, dt, out), KVB_OK);
        for (int i = 0; i < n; i++) {
            double ref = 0;
            for (int e = 0; e < H * D; e++) {
                double d = (double)a32[i * H * D + e] - b32[i * H * D + e];
                ref += d * d;
            }
            ck_assert_msg(fabs(out[i] - ref) <= 1e-6 * ref,
                          "dtype %d token %d: %g vs %g", (int)dt, i,
                          (double)out[i], ref);
        }
    }
    /* Identical rows deviate by exactly zero. */
    ck_assert_int_eq(kvb_cpu_deviation(a32, a32, n, H, D, KVB_DTYPE_F32, out),
                     KVB_OK);
    for (int i = 0; i < n; i++) {
        ck_assert_float_eq(out[i], 0.0f);
    }
}
END_TEST

START_TEST(test_deviation_bad_args_rejected)
{
    float a[4], out[1];
    ck_assert_int_eq(kvb_cpu_deviation(a, NULL, 1, 1, 4, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "b is NULL"));
    ck_assert_int_eq(kvb_cpu_deviation(a, a, 1, 0, 4, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "num_heads=0"));
    ck_assert_int_eq(kvb_cpu_deviation(a, a, -2, 1, 4, KVB_DTYPE_F32, out),
                     KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_cpu_deviation(a, a, 1, 1, 4, (kvb_dtype)5, out),
                     KVB_ERR_UNSUPPORTED);
}
END_TEST

/* ---- selection -------------------------------------------------------- */

/* Candidate order of the reference: higher score first, NaN last, equal
 * scores (and NaNs) by lower index. */
static const float *g_ref_score;

/* qsort comparator over indices for the reference selection. */
static int ref_cmp(const void *pa, const void *pb)
{
    int64_t a = *(const int64_t *)pa, b = *(const int64_t *)pb;
    float x = g_ref_score[a], y = g_ref_score[b];
    int xn = isnan(x), yn = isnan(y);
    if (xn != yn) {
        return xn ? 1 : -1;
    }
    if (!xn && x != y) {
        return x > y ? -1 : 1;
    }
    return a < b ? -1 : a > b;
}

/* Reference selection by a full sort; returns the count. */
static int64_t ref_select(const float *score, const uint8_t *forced,
                          int64_t n, int64_t k, int64_t *out)
{
    int64_t *cand = malloc((size_t)(n > 0 ? n : 1) * sizeof *cand);
    uint8_t *pick = calloc((size_t)(n > 0 ? n : 1), 1);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (forced && forced[i]) {
            pick[i] = 1;
        } else {
            cand[m++] = i;
        }
    }
    g_ref_score = score;
    qsort(cand, (size_t)m, sizeof *cand, ref_cmp);
    for (int64_t i = 0; i < k && i < m; i++) {
        pick[cand[i]] = 1;
    }
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) {
        if (pick[i]) {
            out[c++] = i;
        }
    }
    free(cand);
    free(pick);
    return c;
}

/* Random scores from a small set (many ties), NaNs and both zeros; random
 * forced sets; k from 0 to beyond the candidates.  The op must equal the
 * sort-based reference exactly. */
START_TEST(test_select_matches_sort_reference)
{
    const float vals[7] = {0.0f, -0.0f, 1.0f, 2.5f, -3.0f, NAN, INFINITY};
    for (int trial = 0; trial < 60; trial++) {
        rng_seed(200 + (uint64_t)trial);
        int64_t n = trial < 50 ? 1 + (int64_t)(rng_u32() % 300) : 100000;
        float *score = malloc((size_t)n * sizeof *score);
        uint8_t *forced = malloc((size_t)n);
        int64_t *got = malloc((size_t)n * sizeof *got);
        int64_t *want = malloc((size_t)n * sizeof *want);
        int64_t nf = 0;
        for (int64_t i = 0; i < n; i++) {
            score[i] = trial % 3 == 0 ? rng_sym() : vals[rng_u32() % 7];
            forced[i] = rng_u32() % 5 == 0;
            nf += forced[i];
        }
        const uint8_t *fp = trial % 4 == 1 ? NULL : forced;
        int64_t ks[4] = {0, n / 7, n - nf, n + 5};
        for (int j = 0; j < 4; j++) {
            int64_t k = ks[j];
            int64_t cnt = -1;
            ck_assert_int_eq(kvb_cpu_select(score, fp, n, k, got, &cnt),
                             KVB_OK);
            int64_t wc = ref_select(score, fp, n, k, want);
            ck_assert_int_eq(cnt, wc);
            ck_assert_msg(memcmp(got, want, (size_t)wc * sizeof *got) == 0,
                          "trial %d k=%lld: selection differs", trial,
                          (long long)k);
        }
        free(score);
        free(forced);
        free(got);
        free(want);
    }
}
END_TEST

/* Hand-checked cases: ties go to the lower index, NaN ranks below -inf,
 * and forced tokens do not count against k. */
START_TEST(test_select_ties_nan_forced)
{
    float s[6] = {1.0f, NAN, 1.0f, -INFINITY, 1.0f, 0.5f};
    uint8_t f[6] = {0, 0, 0, 0, 1, 0};
    int64_t out[6], cnt;
    ck_assert_int_eq(kvb_cpu_select(s, f, 6, 2, out, &cnt), KVB_OK);
    ck_assert_int_eq(cnt, 3);
    ck_assert_int_eq(out[0], 0);
    ck_assert_int_eq(out[1], 2);
    ck_assert_int_eq(out[2], 4);
    ck_assert_int_eq(kvb_cpu_select(s, NULL, 6, 5, out, &cnt), KVB_OK);
    ck_assert_int_eq(cnt, 5);
    for (int i = 0; i < 5; i++) {
        ck_assert_int_ne(out[i], 1); /* the NaN is the one left out */
    }
    ck_assert_int_eq(kvb_cpu_select(s, f, 6, 0, out, &cnt), KVB_OK);
    ck_assert_int_eq(cnt, 1);
    ck_assert_int_eq(out[0], 4);
}
END_TEST

START_TEST(test_select_bad_args_rejected)
{
    float s[2] = {0, 1};
    int64_t out[2], cnt;
    ck_assert_int_eq(kvb_cpu_select(s, NULL, 2, -1, out, &cnt),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "k=-1"));
    ck_assert_int_eq(kvb_cpu_select(s, NULL, 2, 1, out, NULL),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "n_out is NULL"));
    ck_assert_int_eq(kvb_cpu_select(NULL, NULL, 2, 1, out, &cnt),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "score is NULL"));
    ck_assert_int_eq(kvb_cpu_select(NULL, NULL, 0, 3, NULL, &cnt), KVB_OK);
    ck_assert_int_eq(cnt, 0);
}
END_TEST

/* Builds the suite of the CPU copy, rotation and selection ops. */
Suite *ops_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 120}};
    const test_spec tests[] = {
        {0, test_copy_roundtrip_every_layout, 0},
        {0, test_copy_scatter_addresses_interleaved, 0},
        {0, test_copy_scatter_k_only, 0},
        {0, test_copy_scatter_addresses_transposed_k, 0},
        {0, test_copy_zero_v_strides_mean_k_strides, 0},
        {0, test_copy_bad_slot_rejected, 0},
        {0, test_copy_bad_args_rejected, 0},
        {0, test_rerotate_equals_rotating_unrotated, 0},
        {0, test_rerotate_half_types_within_tolerance, 0},
        {0, test_rerotate_tail_and_identity_exact, 0},
        {0, test_rerotate_composes, 0},
        {0, test_rerotate_bad_args_rejected, 0},
        {0, test_load_rotate_equals_copy_then_rerotate, 0},
        {0, test_load_rotate_in_place_equals_copy, 0},
        {0, test_load_rotate_bad_segments_rejected, 0},
        {0, test_deviation_matches_double_reference, 0},
        {0, test_deviation_bad_args_rejected, 0},
        {0, test_select_matches_sort_reference, 0},
        {0, test_select_ties_nan_forced, 0},
        {0, test_select_bad_args_rejected, 0},
    };
    return suite_build("ops", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
