/*
 * check_gpu.c: every kvb_cuda_* op against its kvb_cpu_* reference.
 *
 * How to run (on a machine with an NVIDIA GPU, sm_80 or sm_90):
 *   cmake -S . -B build -G Ninja -DKVB_CUDA=ON -DKVB_BUILD_TESTS=ON
 *   cmake --build build
 *   (cd build && ctest -R gpu --output-on-failure)     # or: build/tests/gpu/kvb_check_gpu
 *   build/tests/gpu/kvb_check_gpu rope                  # one suite/tcase by name
 * Under the memory checker (sizes shrink with KVB_GPU_TEST_QUICK=1 so it
 * finishes in a few minutes):
 *   KVB_GPU_TEST_QUICK=1 compute-sanitizer --tool memcheck --leak-check full \
 *       build/tests/gpu/kvb_check_gpu
 *
 * The argument tests run everywhere; everything else needs a device, and
 * without one the program exits 77 (CTest reports "skipped").
 *
 * Every op gets fresh random inputs; device outputs are poisoned with a NaN
 * pattern (all bits set) before the call and host reference outputs with
 * the same pattern, so rows an op must leave untouched compare equal and
 * rows it forgot to write show up as NaN.  Copies must be bit-exact; the
 * arithmetic ops are compared with max|gpu - cpu| / max|cpu| against a
 * bound per dtype (fp32 1e-5, fp16 1e-3, bf16 1e-2).
 * Tests run in one process (CK_NOFORK): a CUDA context does not survive
 * fork.
 */
#include "../c/test_util.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "internal.h"

/* ---------------------------------------------------------------------- */
/* Helpers                                                                  */
/* ---------------------------------------------------------------------- */

static const kvb_dtype all_dtypes[3] = {KVB_DTYPE_F32, KVB_DTYPE_F16,
                                        KVB_DTYPE_BF16};
static int quick; /* KVB_GPU_TEST_QUICK: smaller sizes */
/* Allocates `n` elements of `dt` on the host filled with random values in
 * [-1, 1) rounded to the dtype. */
static void *host_random(int64_t n, kvb_dtype dt)
{
    void *p = malloc((size_t)n * kvb_dtype_size(dt) + 16);
    ck_assert_ptr_nonnull(p);
    for (int64_t i = 0; i < n; i++) {
        kvb_store_elem(p, i, dt, rng_sym());
    }
    return p;
}

/* Allocates `bytes` on the host with every byte 0xff (NaN in every dtype). */
static void *host_poison(size_t bytes)
{
    void *p = malloc(bytes + 16);
    ck_assert_ptr_nonnull(p);
    memset(p, 0xff, bytes);
    return p;
}

/* Allocates `bytes` of device memory, poisoned with 0xff. */
static void *dev_alloc(size_t bytes)
{
    void *p = NULL;
    ck_assert_int_eq(cudaMalloc(&p, bytes + 16), cudaSuccess);
    ck_assert_int_eq(cudaMemset(p, 0xff, bytes + 16), cudaSuccess);
    return p;
}

/* Copies host memory to a new device buffer. */
static void *dev_from(const void *h, size_t bytes)
{
    void *p = dev_alloc(bytes);
    ck_assert_int_eq(cudaMemcpy(p, h, bytes, cudaMemcpyHostToDevice),
                     cudaSuccess);
    return p;
}

/* Copies a device buffer back into new host memory, after synchronising
 * (which also surfaces asynchronous kernel faults). */
static void *host_from(const void *d, size_t bytes)
{
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
    void *h = malloc(bytes + 16);
    ck_assert_ptr_nonnull(h);
    ck_assert_int_eq(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost),
                     cudaSuccess);
    return h;
}

/* Fails unless a kvblend call returned KVB_OK, printing its message. */
#define OK(call)                                                            \
    do {                                                                    \
        kvb_status st_ = (call);                                            \
        ck_assert_msg(st_ == KVB_OK, "%s -> %s: %s", #call,                 \
                      kvb_status_str(st_), kvb_last_error());               \
    } while (0)

/* Compares n elements of dtype dt: both NaN counts as equal (untouched
 * poison), one NaN fails, otherwise max|got-ref| / max|ref| <= tol. */
static void assert_close(const void *got, const void *ref, int64_t n,
                         kvb_dtype dt, double tol, const char *what)
{
    double max_ref = 0.0, max_err = 0.0;
    int64_t worst = -1;
    for (int64_t i = 0; i < n; i++) {
        double r = kvb_load(ref, i, dt), g = kvb_load(got, i, dt);
        if (isnan(r) || isnan(g)) {
            ck_assert_msg(isnan(r) && isnan(g),
                          "%s [%s]: element %lld got %g, expected %g", what,
                          kvb_dtype_str(dt), (long long)i, g, r);
            continue;
        }
        if (fabs(r) > max_ref) max_ref = fabs(r);
        if (fabs(g - r) > max_err) {
            max_err = fabs(g - r);
            worst = i;
        }
    }
    double rel = max_ref > 0 ? max_err / max_ref : max_err;
    ck_assert_msg(rel <= tol,
                  "%s [%s]: relative error %.3g > %.3g (element %lld: got "
                  "%.8g expected %.8g)",
                  what, kvb_dtype_str(dt), rel, tol, (long long)worst,
                  worst >= 0 ? kvb_load(got, worst, dt) : 0.0,
                  worst >= 0 ? kvb_load(ref, worst, dt) : 0.0);
}

/* Tolerance of the element-wise arithmetic ops per dtype. */
static double tol_of(kvb_dtype dt)
{
    return dt == KVB_DTYPE_F32 ? 1e-5 : dt == KVB_DTYPE_F16 ? 1e-3 : 1e-2;
}

/* ---------------------------------------------------------------------- */
/* Paged layouts                                                            */
/* ---------------------------------------------------------------------- */

static const char *layout_names[NUM_LAYOUTS] = {
    "(2,B,N,H,D)", "(B,2,N,H,D)", "(B,N,H,2D)", "HND (B,H,N,D) planes",
    "(B,N,D,H) strided dims", "(B,H,[K^T D,N | V N,D]) transposed K"};

/* Builds a ragged slot mapping of n tokens over B*N slots: runs of
 * consecutive slots of random length starting at random blocks, with about
 * one padding slot (-1) in 8. */
static int64_t *make_slots(int64_t n, int64_t B, int64_t N)
{
    int64_t *s = malloc((size_t)n * sizeof *s);
    ck_assert_ptr_nonnull(s);
    int64_t i = 0;
    while (i < n) {
        int64_t run = 1 + rng_below(3 * N);
        int64_t start = rng_below(B) * N;
        for (int64_t j = 0; j < run && i < n; j++, i++) {
            s[i] = rng_below(8) == 0 ? -1 : (start + j) % (B * N);
        }
    }
    return s;
}

/* ---------------------------------------------------------------------- */
/* gather / scatter                                                         */
/* ---------------------------------------------------------------------- */

/* Gather in every layout and dtype equals the CPU gather bit for bit,
 * padding rows keep the poison. */
START_TEST(test_gather_layouts)
{
    const int64_t B = 37, N = 16, n = quick ? 300 : 2000;
    const int32_t H = 3, D = 64;
    /* every dtype (outer) and layout (inner) */
    for (int c = 0; c < 3 * NUM_LAYOUTS; c++) {
        const kvb_dtype dt = all_dtypes[c / NUM_LAYOUTS];
        const int kind = c % NUM_LAYOUTS;
        const size_t cache_bytes = (size_t)(2 * B * N * H * D) * kvb_dtype_size(dt);
        const size_t rows_bytes = (size_t)(n * H * D) * kvb_dtype_size(dt);
        {
            char *hc = host_random(2 * B * N * H * D, dt);
            char *dc = dev_from(hc, cache_bytes);
            int64_t *slots = make_slots(n, B, N);
            int64_t *dslots = dev_from(slots, (size_t)n * 8);
            void *hk = host_poison(rows_bytes), *hv = host_poison(rows_bytes);
            void *dk = dev_alloc(rows_bytes), *dv = dev_alloc(rows_bytes);
            kvb_paged_layout hl = make_layout(kind, hc, B, N, H, D, dt, -1);
            kvb_paged_layout dl = make_layout(kind, dc, B, N, H, D, dt, 0);
            OK(kvb_cpu_gather(&hl, slots, n, hk, hv));
            OK(kvb_cuda_gather(&dl, dslots, n, dk, dv, NULL));
            void *gk = host_from(dk, rows_bytes), *gv = host_from(dv, rows_bytes);
            ck_assert_msg(memcmp(gk, hk, rows_bytes) == 0, "gather K %s %s",
                          layout_names[kind], kvb_dtype_str(dt));
            ck_assert_msg(memcmp(gv, hv, rows_bytes) == 0, "gather V %s %s",
                          layout_names[kind], kvb_dtype_str(dt));
            free(gk); free(gv); free(hk); free(hv); free(hc); free(slots);
            cudaFree(dk); cudaFree(dv); cudaFree(dc); cudaFree(dslots);
        }
    }
}
END_TEST

/* Scatter in every layout and dtype leaves the same cache bytes as the
 * CPU scatter (padding skipped, everything else untouched); K-only too.
 * Slots are distinct so the result does not depend on write order. */
START_TEST(test_scatter_layouts)
{
    const int64_t B = 41, N = 16;
    const int32_t H = 2, D = 128;
    const int64_t n = B * N / 2;
    for (int d = 0; d < 3; d++) {
        kvb_dtype dt = all_dtypes[d];
        size_t es = kvb_dtype_size(dt);
        size_t cache_bytes = (size_t)(2 * B * N * H * D) * es;
        size_t rows_bytes = (size_t)(n * H * D) * es;
        for (int kind = 0; kind < NUM_LAYOUTS; kind++) {
            for (int k_only = 0; k_only < 2; k_only++) {
                char *hc = host_random(2 * B * N * H * D, dt);
                char *dc = dev_from(hc, cache_bytes);
                /* a random permutation of slots, some replaced by padding */
                int64_t *slots = malloc((size_t)(B * N) * 8);
                for (int64_t i = 0; i < B * N; i++) slots[i] = i;
                for (int64_t i = B * N - 1; i > 0; i--) {
                    int64_t j = rng_below(i + 1), t = slots[i];
                    slots[i] = slots[j];
                    slots[j] = t;
                }
                for (int64_t i = 0; i < n; i += 7) slots[i] = -1;
                int64_t *dslots = dev_from(slots, (size_t)n * 8);
                void *hk = host_random(n * H * D, dt), *hv = host_random(n * H * D, dt);
                void *dk = dev_from(hk, rows_bytes), *dv = dev_from(hv, rows_bytes);
                kvb_paged_layout hl = make_layout(kind, hc, B, N, H, D, dt, -1);
                kvb_paged_layout dl = make_layout(kind, dc, B, N, H, D, dt, 0);
                OK(kvb_cpu_scatter(&hl, slots, n, hk, k_only ? NULL : hv));
                OK(kvb_cuda_scatter(&dl, dslots, n, dk, k_only ? NULL : dv, NULL));
                char *gc = host_from(dc, cache_bytes);
                ck_assert_msg(memcmp(gc, hc, cache_bytes) == 0, "scatter %s %s k_only=%d",
                              layout_names[kind], kvb_dtype_str(dt), k_only);
                free(gc); free(hc); free(slots); free(hk); free(hv);
                cudaFree(dc); cudaFree(dslots); cudaFree(dk); cudaFree(dv);
            }
        }
    }
}
END_TEST

/* A slot beyond the cache (which the device op cannot report without a
 * sync) is skipped: nothing outside the cache is written and the other
 * rows are gathered. */
START_TEST(test_gather_out_of_range_slot_skipped)
{
    const int64_t B = 4, N = 8, n = 3;
    const int32_t H = 2, D = 64;
    kvb_dtype dt = KVB_DTYPE_F16;
    size_t es = 2, cache_bytes = (size_t)(2 * B * N * H * D) * es;
    size_t rows_bytes = (size_t)(n * H * D) * es;
    char *hc = host_random(2 * B * N * H * D, dt);
    char *dc = dev_from(hc, cache_bytes);
    int64_t slots[3] = {5, B * N + 100, 7};
    int64_t *dslots = dev_from(slots, sizeof slots);
    void *dk = dev_alloc(rows_bytes), *dv = dev_alloc(rows_bytes);
    kvb_paged_layout dl = make_layout(LAYOUT_2BNHD, dc, B, N, H, D, dt, 0);
    OK(kvb_cuda_gather(&dl, dslots, n, dk, dv, NULL));
    uint16_t *gk = host_from(dk, rows_bytes);
    ck_assert_int_eq(memcmp(gk, hc + 5 * H * D * es, (size_t)(H * D) * es), 0);
    ck_assert_int_eq(gk[H * D], 0xffff); /* skipped row keeps its poison */
    ck_assert_int_eq(memcmp(gk + 2 * H * D, hc + 7 * H * D * es, (size_t)(H * D) * es), 0);
    free(gk); free(hc);
    cudaFree(dc); cudaFree(dslots); cudaFree(dk); cudaFree(dv);
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Re-rotation and the fused load                                          */
/* ---------------------------------------------------------------------- */

/* Fills an inv_freq table of `pairs` entries the usual way (base 10000),
 * scaled by 0.5 on the high half (a stand-in for llama3-style scaling). */
static float *make_inv_freq(int32_t rotary_dim)
{
    int32_t pairs = rotary_dim / 2;
    float *f = malloc((size_t)pairs * sizeof *f);
    for (int32_t i = 0; i < pairs; i++) {
        f[i] = (float)pow(10000.0, -2.0 * i / rotary_dim);
        if (i >= pairs / 2) f[i] *= 0.5f;
    }
    return f;
}

/* Position pairs: old in [0, 3000), new = old + 100000, new = 0, or equal
 * (delta 0 must leave the row bit-exact). */
static void make_positions(int64_t n, int64_t *old_pos, int64_t *new_pos)
{
    for (int64_t i = 0; i < n; i++) {
        old_pos[i] = rng_below(3000);
        switch (rng_below(4)) {
        case 0: new_pos[i] = old_pos[i] + 100000; break;
        case 1: new_pos[i] = 0; break;
        case 2: new_pos[i] = old_pos[i]; break;
        default: new_pos[i] = old_pos[i] + rng_below(5000) - 2500; break;
        }
    }
}

/* Re-rotation equals the CPU op for every dtype, both pairings, full and
 * partial rotary dims, and aligned (vector) and misaligned (scalar) rows. */
START_TEST(test_rerotate_matches_cpu)
{
    const int64_t n = quick ? 64 : 500;
    const int32_t H = 3;
    const int32_t shapes[4][2] = {{128, 128}, {128, 64}, {64, 64}, {80, 48}};
    for (int d = 0; d < 3; d++) {
        kvb_dtype dt = all_dtypes[d];
        size_t es = kvb_dtype_size(dt);
        for (int sh = 0; sh < 4; sh++) {
            for (int style = 0; style < 2; style++) {
                for (int misalign = 0; misalign < 2; misalign++) {
                    int32_t D = shapes[sh][0];
                    kvb_rope rope = {shapes[sh][1], (kvb_rope_style)style,
                                     make_inv_freq(shapes[sh][1]), 1.0f};
                    int64_t elems = n * H * D;
                    char *hk = host_random(elems + 1, dt);
                    int64_t *op = malloc((size_t)n * 8), *np = malloc((size_t)n * 8);
                    make_positions(n, op, np);
                    size_t off = misalign ? es : 0;
                    char *dbuf = dev_from(hk, (size_t)(elems + 1) * es);
                    int64_t *dop = dev_from(op, (size_t)n * 8), *dnp = dev_from(np, (size_t)n * 8);
                    OK(kvb_cpu_rerotate(hk + off, n, H, D, dt, &rope, op, np));
                    OK(kvb_cuda_rerotate(dbuf + off, n, H, D, dt, &rope, dop, dnp, NULL));
                    char *g = host_from(dbuf, (size_t)(elems + 1) * es);
                    char what[96];
                    snprintf(what, sizeof what, "rerotate D=%d rot=%d style=%d misalign=%d", D,
                             rope.rotary_dim, style, misalign);
                    assert_close(g + off, hk + off, elems, dt, tol_of(dt), what);
                    /* delta-0 rows are bit-exact */
                    for (int64_t i = 0; i < n; i++) {
                        if (op[i] == np[i]) {
                            ck_assert_int_eq(memcmp(g + off + (size_t)(i * H * D) * es,
                                                    hk + off + (size_t)(i * H * D) * es,
                                                    (size_t)(H * D) * es), 0);
                        }
                    }
                    free(g); free(hk); free(op); free(np); free((void *)rope.inv_freq);
                    cudaFree(dbuf); cudaFree(dop); cudaFree(dnp);
                }
            }
        }
    }
}
END_TEST

/* How one load_rotate case is set up (zero: the plain case). */
typedef struct load_opts {
    int host_mapped;   /* stored rows, positions and table in mapped pinned memory */
    int uniform;       /* consecutive positions: one delta per segment */
    unsigned in_place; /* bit s: segment s is in dst already (k0 == NULL) */
    int misalign;      /* staging buffers one element off 16 bytes */
    int32_t H;         /* KV heads (0: 4) */
    int scale;         /* segment sizes multiplied by this (0: 1) */
} load_opts;

/* Runs the device load of `dsegs` into fresh poisoned staging buffers
 * (offset `off` bytes), after copying each in-place segment's stored rows
 * of `layer` into its staging rows; returns the host copies of K and V
 * (`stage` bytes from the offset). */
static void load_on_device(const kvb_load_seg *dsegs, const kvb_load_seg *hsegs, int nseg,
                           unsigned in_place, int32_t layer, const int64_t *ddst,
                           int64_t num_rows, int32_t H, int32_t D, kvb_dtype dt,
                           const kvb_rope *rope, int host_mapped, size_t off, size_t stage,
                           void **gk, void **gv)
{
    size_t es = kvb_dtype_size(dt), row = (size_t)(H * D) * es;
    char *dk = dev_alloc(stage + off), *dv = dev_alloc(stage + off);
    kvb_load_seg tab[16];
    memcpy(tab, dsegs, (size_t)nseg * sizeof *tab);
    for (int s = 0; s < nseg; s++) {
        if (!(in_place >> s & 1)) continue;
        /* what the connector's copy engine does for a host-tier entry */
        size_t src = (size_t)(layer * hsegs[s].layer_stride) * es;
        size_t bytes = (size_t)hsegs[s].num_tokens * row;
        ck_assert_int_eq(cudaMemcpy(dk + off + (size_t)hsegs[s].dst_start * row,
                                    (const char *)hsegs[s].k0 + src, bytes,
                                    cudaMemcpyHostToDevice), cudaSuccess);
        ck_assert_int_eq(cudaMemcpy(dv + off + (size_t)hsegs[s].dst_start * row,
                                    (const char *)hsegs[s].v0 + src, bytes,
                                    cudaMemcpyHostToDevice), cudaSuccess);
        tab[s].k0 = NULL;
        tab[s].v0 = NULL;
        tab[s].layer_stride = 0; /* not read */
    }
    kvb_load_seg *dtab;
    void *tab_host = NULL;
    if (host_mapped) {
        ck_assert_int_eq(cudaHostAlloc(&tab_host, sizeof tab, cudaHostAllocMapped), cudaSuccess);
        memcpy(tab_host, tab, sizeof tab);
        void *p;
        ck_assert_int_eq(cudaHostGetDevicePointer(&p, tab_host, 0), cudaSuccess);
        dtab = p;
    } else {
        dtab = dev_from(tab, sizeof tab);
    }
    OK(kvb_cuda_load_rotate(dtab, nseg, layer, dk + off, dv + off, ddst, num_rows, H, D, dt,
                            rope, NULL));
    *gk = host_from(dk + off, stage);
    *gv = host_from(dv + off, stage);
    cudaFree(dk);
    cudaFree(dv);
    if (host_mapped) cudaFreeHost(tab_host); else cudaFree(dtab);
}

/* One load_rotate case: ragged segments with gaps between them (tiles of
 * the kernel straddle segment boundaries and gaps, and num_rows is not a
 * multiple of the tile), layer 2 of 3, stored rows in device memory or in
 * mapped pinned host memory (the table too), compared with
 * kvb_cpu_load_rotate on the same bytes: K within the dtype's tolerance, V
 * and untouched rows bit for bit.  With o.uniform the positions are
 * consecutive inside each segment (one delta per segment, the kernel's
 * one-table-per-tile path; one segment keeps its positions: delta 0, copied
 * bit-exact), else source positions are random (a table per row).  With
 * o.in_place the marked segments arrive pre-copied with k0 == NULL, and
 * the result must equal the copying load bit for bit. */
static void load_case(kvb_dtype dt, int style, int32_t D, int32_t rot, load_opts o)
{
    const int32_t H = o.H > 0 ? o.H : 4, L = 3, layer = 2;
    const int64_t sizes[] = {1, 7, 64, 130, 33, 250, 2, 97};
    const int nseg = quick ? 4 : 8;
    const int scale = o.scale > 0 ? o.scale : 1;
    size_t es = kvb_dtype_size(dt);
    kvb_rope rope = {rot, (kvb_rope_style)style, make_inv_freq(rot), 1.0f};
    kvb_load_seg hsegs[8], dsegs[8];
    void *store_k[8], *store_v[8], *dev_k[8], *dev_v[8];
    int64_t *hsrc[8], *dsrc[8];
    const int64_t shift = o.uniform ? (int64_t)rng_below(2) * 100000 : 0;
    int64_t row = 0;
    for (int s = 0; s < nseg; s++) {
        int64_t T = sizes[s] * scale;
        row += rng_below(5); /* a gap (rows that must stay untouched) */
        int64_t per_layer = T * H * D;
        size_t bytes = (size_t)(L * per_layer) * es;
        store_k[s] = host_random(L * per_layer, dt);
        store_v[s] = host_random(L * per_layer, dt);
        hsrc[s] = malloc((size_t)T * 8);
        /* uniform: segment 2 keeps its positions (delta 0) */
        int64_t base = s == 2 ? row + shift : rng_below(4000);
        for (int64_t t = 0; t < T; t++) hsrc[s][t] = o.uniform ? base + t : rng_below(4000);
        if (o.host_mapped) {
            void *pk, *pv, *pp;
            ck_assert_int_eq(cudaHostAlloc(&pk, bytes, cudaHostAllocMapped), cudaSuccess);
            ck_assert_int_eq(cudaHostAlloc(&pv, bytes, cudaHostAllocMapped), cudaSuccess);
            ck_assert_int_eq(cudaHostAlloc(&pp, (size_t)T * 8, cudaHostAllocMapped), cudaSuccess);
            memcpy(pk, store_k[s], bytes);
            memcpy(pv, store_v[s], bytes);
            memcpy(pp, hsrc[s], (size_t)T * 8);
            ck_assert_int_eq(cudaHostGetDevicePointer(&dev_k[s], pk, 0), cudaSuccess);
            ck_assert_int_eq(cudaHostGetDevicePointer(&dev_v[s], pv, 0), cudaSuccess);
            void *dp;
            ck_assert_int_eq(cudaHostGetDevicePointer(&dp, pp, 0), cudaSuccess);
            dsrc[s] = dp;
        } else {
            dev_k[s] = dev_from(store_k[s], bytes);
            dev_v[s] = dev_from(store_v[s], bytes);
            dsrc[s] = dev_from(hsrc[s], (size_t)T * 8);
        }
        hsegs[s] = (kvb_load_seg){store_k[s], store_v[s], per_layer, hsrc[s], row, T};
        dsegs[s] = (kvb_load_seg){dev_k[s], dev_v[s], per_layer, dsrc[s], row, T};
        row += T;
    }
    /* reverse the table order: the kernel must not assume sorted segments */
    for (int s = 0; s < nseg / 2; s++) {
        kvb_load_seg t = dsegs[s];
        dsegs[s] = dsegs[nseg - 1 - s];
        dsegs[nseg - 1 - s] = t;
        t = hsegs[s];
        hsegs[s] = hsegs[nseg - 1 - s];
        hsegs[nseg - 1 - s] = t;
    }
    int64_t num_rows = row + 3;
    if (num_rows % 16 == 0) num_rows++; /* never a whole number of tiles */
    int64_t *dst_pos = malloc((size_t)num_rows * 8);
    for (int64_t r = 0; r < num_rows; r++) {
        dst_pos[r] = o.uniform ? r + shift : rng_below(3) == 0 ? r : 100000 + r; /* near and far */
    }
    if (!o.uniform) {
        /* some rows keep their stored position exactly (delta 0) */
        dst_pos[hsegs[0].dst_start] = hsegs[0].src_pos[0];
    }
    size_t stage = (size_t)(num_rows * H * D) * es;
    size_t off = o.misalign ? es : 0;
    void *hk = host_poison(stage), *hv = host_poison(stage);
    int64_t *ddst = dev_from(dst_pos, (size_t)num_rows * 8);
    OK(kvb_cpu_load_rotate(hsegs, nseg, layer, hk, hv, dst_pos, num_rows, H, D, dt, &rope));
    void *gk, *gv;
    load_on_device(dsegs, hsegs, nseg, 0, layer, ddst, num_rows, H, D, dt, &rope, o.host_mapped,
                   off, stage, &gk, &gv);
    char what[160];
    snprintf(what, sizeof what,
             "load_rotate K D=%d rot=%d style=%d H=%d mapped=%d uniform=%d misalign=%d", D, rot,
             style, H, o.host_mapped, o.uniform, o.misalign);
    assert_close(gk, hk, num_rows * H * D, dt, tol_of(dt), what);
    ck_assert_msg(memcmp(gv, hv, stage) == 0, "load_rotate V differs (%s)", what);
    /* uncovered rows keep their poison bit for bit */
    ck_assert_int_eq(((unsigned char *)gk)[stage - 1], 0xff);
    /* rows whose delta is 0 are the stored rows bit for bit */
    size_t row_bytes = (size_t)(H * D) * es;
    for (int s = 0; s < nseg; s++) {
        for (int64_t t = 0; t < hsegs[s].num_tokens; t++) {
            if (hsegs[s].src_pos[t] != dst_pos[hsegs[s].dst_start + t]) continue;
            const char *stored = (const char *)hsegs[s].k0 +
                                 (size_t)(layer * hsegs[s].layer_stride) * es + t * row_bytes;
            ck_assert_msg(memcmp((char *)gk + (hsegs[s].dst_start + t) * row_bytes, stored,
                                 row_bytes) == 0,
                          "delta-0 row %lld of segment %d changed (%s)",
                          (long long)(hsegs[s].dst_start + t), s, what);
        }
    }
    if (o.in_place) {
        /* rows already in place: only K is re-rotated, and the result is
         * the copying load's, bit for bit */
        void *ik, *iv;
        load_on_device(dsegs, hsegs, nseg, o.in_place, layer, ddst, num_rows, H, D, dt, &rope,
                       o.host_mapped, off, stage, &ik, &iv);
        ck_assert_msg(memcmp(ik, gk, stage) == 0, "in-place K differs from copied K (%s)", what);
        ck_assert_msg(memcmp(iv, gv, stage) == 0, "in-place V differs from copied V (%s)", what);
        /* and the CPU op agrees with the same convention */
        kvb_load_seg csegs[8];
        memcpy(csegs, hsegs, sizeof csegs);
        void *ck = host_poison(stage), *cv = host_poison(stage);
        for (int s = 0; s < nseg; s++) {
            if (!(o.in_place >> s & 1)) continue;
            size_t src = (size_t)(layer * hsegs[s].layer_stride) * es;
            size_t bytes = (size_t)hsegs[s].num_tokens * row_bytes;
            memcpy((char *)ck + hsegs[s].dst_start * row_bytes, (const char *)hsegs[s].k0 + src,
                   bytes);
            memcpy((char *)cv + hsegs[s].dst_start * row_bytes, (const char *)hsegs[s].v0 + src,
                   bytes);
            csegs[s].k0 = NULL;
            csegs[s].v0 = NULL;
        }
        OK(kvb_cpu_load_rotate(csegs, nseg, layer, ck, cv, dst_pos, num_rows, H, D, dt, &rope));
        ck_assert_msg(memcmp(ck, hk, stage) == 0, "CPU in-place K differs (%s)", what);
        ck_assert_msg(memcmp(cv, hv, stage) == 0, "CPU in-place V differs (%s)", what);
        free(ik); free(iv); free(ck); free(cv);
    }
    free(gk); free(gv); free(hk); free(hv); free(dst_pos); free((void *)rope.inv_freq);
    cudaFree(ddst);
    for (int s = 0; s < nseg; s++) {
        if (o.host_mapped) {
            void *hp;
            /* the device pointer of a mapped allocation is its host pointer
             * under unified addressing, which every supported GPU has */
            hp = dev_k[s]; cudaFreeHost(hp);
            hp = dev_v[s]; cudaFreeHost(hp);
            hp = dsrc[s]; cudaFreeHost(hp);
        } else {
            cudaFree(dev_k[s]); cudaFree(dev_v[s]); cudaFree(dsrc[s]);
        }
        free(store_k[s]); free(store_v[s]); free(hsrc[s]);
    }
}

/* The fused load equals the CPU load for every dtype and pairing, full and
 * partial rotary dims, from device memory, with random source positions
 * (a cos/sin table per row). */
START_TEST(test_load_rotate_device)
{
    const load_opts o = {0};
    for (int d = 0; d < 3; d++) {
        for (int style = 0; style < 2; style++) {
            load_case(all_dtypes[d], style, 128, 128, o);
            load_case(all_dtypes[d], style, 128, 64, o);
            load_case(all_dtypes[d], style, 64, 64, o);
            load_case(all_dtypes[d], style, 80, 48, o); /* passthrough tail */
            load_case(all_dtypes[d], style, 72, 34, o); /* scalar path: no whole vectors */
        }
    }
}
END_TEST

/* The same from pinned host memory mapped into the device. */
START_TEST(test_load_rotate_host_mapped)
{
    const load_opts o = {.host_mapped = 1};
    for (int d = 0; d < 3; d++) {
        for (int style = 0; style < 2; style++) {
            load_case(all_dtypes[d], style, 128, 128, o);
            load_case(all_dtypes[d], style, 64, 32, o);
        }
    }
}
END_TEST

/* Consecutive positions inside each segment (one delta per segment: one
 * table per tile, or one per run where a tile straddles two segments; a
 * segment with delta 0 copied bit-exact) equal the CPU load, for every
 * dtype and pairing, full and partial rotary, vector and scalar paths
 * (misaligned staging buffers, or a geometry without whole vectors), and
 * the Llama-3-8B shape (8 heads of 128) over a few thousand rows. */
START_TEST(test_load_rotate_uniform_delta)
{
    const load_opts o = {.uniform = 1};
    const load_opts mis = {.uniform = 1, .misalign = 1};
    const load_opts big = {.uniform = 1, .H = 8, .scale = 4};
    for (int d = 0; d < 3; d++) {
        for (int style = 0; style < 2; style++) {
            load_case(all_dtypes[d], style, 128, 128, o);
            load_case(all_dtypes[d], style, 128, 64, o);
            load_case(all_dtypes[d], style, 80, 48, o); /* passthrough tail */
            load_case(all_dtypes[d], style, 72, 34, o);
            load_case(all_dtypes[d], style, 128, 128, mis);
            load_case(all_dtypes[d], style, 64, 32, mis);
        }
        load_case(all_dtypes[d], KVB_ROPE_NEOX, 128, 128, big);
    }
}
END_TEST

/* Segments whose rows are already in the staging buffers (k0 == NULL, as
 * the connector marks host-tier entries it copied with the copy engine)
 * are re-rotated in place: the result equals the copying load bit for bit,
 * with uniform and random positions, mixed with device segments, from
 * device and mapped tables, vector and scalar paths. */
START_TEST(test_load_rotate_in_place)
{
    const unsigned mixed = 0xa5; /* segments 0, 2 (delta 0 when uniform), 5, 7 */
    const unsigned all = 0xff;
    for (int d = 0; d < 3; d++) {
        for (int style = 0; style < 2; style++) {
            load_case(all_dtypes[d], style, 128, 128, (load_opts){.uniform = 1, .in_place = mixed});
            load_case(all_dtypes[d], style, 128, 64, (load_opts){.in_place = mixed});
            load_case(all_dtypes[d], style, 128, 128,
                      (load_opts){.uniform = 1, .in_place = all, .host_mapped = 1});
            load_case(all_dtypes[d], style, 72, 34, (load_opts){.uniform = 1, .in_place = mixed});
            load_case(all_dtypes[d], style, 64, 64,
                      (load_opts){.uniform = 1, .in_place = mixed, .misalign = 1});
        }
    }
}
END_TEST

/* A blending connector for `m` on `device` (-1: CPU) whose store has
 * `host_gb` of (pinned, for a device connector) host tier and `dev_gb` of
 * device tier, separator [7, 8]. */
static kvb_connector *tier_conn(const kvb_model_desc *m, int32_t device, double host_gb,
                                double dev_gb)
{
    kvb_config cfg;
    OK(kvb_config_init(&cfg));
    cfg.enable_blending = 1;
    cfg.local_cpu = host_gb > 0;
    cfg.max_local_cpu_size_gb = host_gb;
    cfg.max_device_size_gb = dev_gb;
    kvb_connector *c = NULL;
    OK(kvb_connector_create(&cfg, m, device, &c));
    const int32_t sep[2] = {7, 8};
    OK(kvb_connector_set_separator(c, sep, 2));
    return c;
}

/* The two prompts of the tier tests: p1 (A before B) and p2 (B before A,
 * another question), with p1's tokens in slots 0 .. n1-1. */
typedef struct tier_prompts {
    int32_t p1[160], p2[160];
    int n1, n2;
    int64_t slots[160];
} tier_prompts;

static int tier_prompt(int32_t *out, int b_first, int q_base, int q_len);

/* Fills `tp`. */
static void tier_prompts_make(tier_prompts *tp)
{
    tp->n1 = tier_prompt(tp->p1, 0, 3000, 3);
    tp->n2 = tier_prompt(tp->p2, 1, 3500, 4);
    for (int i = 0; i < tp->n1; i++) tp->slots[i] = i;
}

/* sys | sep | first | sep | second | sep | question into out; returns the
 * length.  Chunk A is 37 tokens, B 70, so their rows straddle the load
 * kernel's tiles. */
static int tier_prompt(int32_t *out, int b_first, int q_base, int q_len)
{
    int n = 0;
    for (int i = 0; i < 5; i++) out[n++] = 100 + i;
    for (int c = 0; c < 2; c++) {
        out[n++] = 7;
        out[n++] = 8;
        int is_b = c == 0 ? b_first : !b_first;
        int len = is_b ? 70 : 37;
        for (int i = 0; i < len; i++) out[n++] = (is_b ? 2000 : 1000) + i;
    }
    out[n++] = 7;
    out[n++] = 8;
    for (int i = 0; i < q_len; i++) out[n++] = q_base + i;
    return n;
}

/* The connector's device load of entries kept in the pinned host tier
 * (copied into the staging rows by cudaMemcpyAsync on the caller's stream,
 * then re-rotated in place) stages, at every layer, exactly the bytes that
 * the direct kernel read of device-tier entries stages, and the CPU
 * connector's rows within the dtype's tolerance (V bit for bit), for one
 * dtype, RoPE style and rotary_dim. */
static void connector_tier_case(kvb_dtype dt, int32_t style, int32_t rot)
{
    enum { NL = 3, HK = 4, HD = 128, NB = 16, BS = 16 };
    const size_t es = kvb_dtype_size(dt);
    float *inv = make_inv_freq(rot);
    kvb_model_desc m = {NL, 8, HK, HD, dt, {rot, style, inv, 1.0f}, NULL};
    kvb_connector *conns[3] = {
        tier_conn(&m, 0, 0.01, 0), /* pinned host tier only */
        tier_conn(&m, 0, 0, 0.01), /* device tier only */
        tier_conn(&m, -1, 0.01, 0) /* CPU reference */
    };
    tier_prompts tp;
    tier_prompts_make(&tp);
    /* per layer, the cache content the first prompt's forward left */
    const int64_t cache_elems = 2 * (int64_t)NB * BS * HK * HD;
    const size_t cache_bytes = (size_t)cache_elems * es;
    void *hcache[NL];
    for (int l = 0; l < NL; l++) hcache[l] = host_random(cache_elems, dt);
    char *dcache = dev_alloc(cache_bytes);
    for (int c = 0; c < 3; c++) {
        const int dev = c < 2 ? 0 : -1;
        kvb_request *req = NULL;
        OK(kvb_request_begin(conns[c], 0, tp.p1, tp.n1, NULL, 0, -1, 1, &req));
        for (int l = 0; l < NL; l++) {
            kvb_paged_layout lay;
            if (dev >= 0) {
                ck_assert_int_eq(cudaMemcpy(dcache, hcache[l], cache_bytes,
                                            cudaMemcpyHostToDevice), cudaSuccess);
                lay = make_layout(LAYOUT_2BNHD, dcache, NB, BS, HK, HD, dt, 0);
            } else {
                lay = make_layout(LAYOUT_2BNHD, hcache[l], NB, BS, HK, HD, dt, -1);
            }
            OK(kvb_request_save_layer(req, l, &lay, tp.slots, tp.n1, NULL));
        }
        kvb_request_finish(req, 1);
    }
    ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess);
    kvb_store_stats st;
    OK(kvb_store_get_stats(kvb_connector_store(conns[0]), &st));
    ck_assert_msg(st.host_bytes > 0 && st.device_bytes == 0, "host tier: %zu host, %zu device",
                  st.host_bytes, st.device_bytes);
    OK(kvb_store_get_stats(kvb_connector_store(conns[1]), &st));
    ck_assert_msg(st.device_bytes > 0 && st.host_bytes == 0, "device tier: %zu host, %zu device",
                  st.host_bytes, st.device_bytes);

    /* the reordered prompt, loaded on a stream that does not sync with the
     * legacy default stream: the copies must be ordered on it */
    cudaStream_t stream;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    kvb_request *reqs[3];
    int64_t be = -1;
    for (int c = 0; c < 3; c++) {
        OK(kvb_request_begin(conns[c], 0, tp.p2, tp.n2, NULL, 0, -1, 0, &reqs[c]));
        int64_t hit = 0;
        OK(kvb_request_counts(reqs[c], NULL, &hit, NULL));
        ck_assert_int_ge(hit, 2);
        if (be < 0) be = kvb_request_blend_end(reqs[c]);
        ck_assert_int_eq(kvb_request_blend_end(reqs[c]), be);
    }
    ck_assert_int_gt(be, 5 + 2 + 70 + 2);
    const size_t stage = (size_t)(be * HK * HD) * es;
    for (int l = 0; l < NL; l++) {
        void *got_k[2], *got_v[2];
        for (int c = 0; c < 2; c++) {
            void *dk = dev_alloc(stage), *dv = dev_alloc(stage);
            ck_assert_int_eq(cudaDeviceSynchronize(), cudaSuccess); /* poison done */
            OK(kvb_request_load_layer(reqs[c], l, dk, dv, stream));
            got_k[c] = host_from(dk, stage);
            got_v[c] = host_from(dv, stage);
            cudaFree(dk);
            cudaFree(dv);
        }
        void *hk = host_poison(stage), *hv = host_poison(stage);
        OK(kvb_request_load_layer(reqs[2], l, hk, hv, NULL));
        char what[64];
        snprintf(what, sizeof what, "connector load layer %d", l);
        ck_assert_msg(memcmp(got_k[0], got_k[1], stage) == 0,
                      "%s: host-tier K differs from device-tier K", what);
        ck_assert_msg(memcmp(got_v[0], got_v[1], stage) == 0,
                      "%s: host-tier V differs from device-tier V", what);
        assert_close(got_k[0], hk, be * HK * HD, dt, tol_of(dt), what);
        ck_assert_msg(memcmp(got_v[0], hv, stage) == 0, "%s: V differs from the CPU's", what);
        free(got_k[0]); free(got_k[1]); free(got_v[0]); free(got_v[1]);
        free(hk); free(hv);
    }
    for (int c = 0; c < 3; c++) {
        kvb_request_finish(reqs[c], 0);
    }
    ck_assert_int_eq(cudaStreamSynchronize(stream), cudaSuccess);
    ck_assert_int_eq(cudaStreamDestroy(stream), cudaSuccess);
    for (int c = 0; c < 3; c++) kvb_connector_free(conns[c]);
    for (int l = 0; l < NL; l++) free(hcache[l]);
    cudaFree(dcache);
    free(inv);
}


/* A device connector with KVBLEND_VERIFY_CHECKSUMS=1 and a pinned host
 * tier: the saves' gathers run on a stream that does not sync with the
 * host, so the checksums (taken at commit, on the host) must wait for them
 * (a hash of half-written rows would fail every later check); a byte
 * flipped in a stored chunk then makes it a miss, recomputed. */
START_TEST(test_connector_checksums_device_saves)
{
    enum { NL = 2, HK = 4, HD = 128, NB = 16, BS = 16 };
    const kvb_dtype dt = KVB_DTYPE_BF16;
    const size_t es = kvb_dtype_size(dt);
    float *inv = make_inv_freq(HD);
    kvb_model_desc m = {NL, 8, HK, HD, dt, {HD, KVB_ROPE_NEOX, inv, 1.0f}, NULL};
    kvb_config cfg;
    OK(kvb_config_init(&cfg));
    cfg.enable_blending = 1;
    cfg.max_local_cpu_size_gb = 0.01;
    OK(kvb_config_set(&cfg, "KVBLEND_VERIFY_CHECKSUMS", "1"));
    kvb_connector *c = NULL;
    OK(kvb_connector_create(&cfg, &m, 0, &c));
    const int32_t sep[2] = {7, 8};
    OK(kvb_connector_set_separator(c, sep, 2));
    tier_prompts tp;
    tier_prompts_make(&tp);
    const int64_t cache_elems = 2 * (int64_t)NB * BS * HK * HD;
    const size_t cache_bytes = (size_t)cache_elems * es;
    void *h = host_random(cache_elems, dt);
    char *dcache = dev_alloc(cache_bytes);
    ck_assert_int_eq(cudaMemcpy(dcache, h, cache_bytes, cudaMemcpyHostToDevice), cudaSuccess);
    cudaStream_t stream;
    ck_assert_int_eq(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    for (int round = 0; round < 3; round++) {
        kvb_request *req = NULL;
        OK(kvb_request_begin(c, 0, tp.p1, tp.n1, NULL, 0, -1, 1, &req));
        kvb_paged_layout lay = make_layout(LAYOUT_2BNHD, dcache, NB, BS, HK, HD, dt, 0);
        for (int l = 0; l < NL; l++) {
            OK(kvb_request_save_layer(req, l, &lay, tp.slots, tp.n1, stream));
        }
        kvb_request_finish(req, 1); /* commits right after queueing */
        kvb_store_stats st;
        OK(kvb_store_get_stats(kvb_connector_store(c), &st));
        ck_assert_int_eq(st.num_entries, 4);
        /* every stored chunk passes its check */
        OK(kvb_request_begin(c, 0, tp.p2, tp.n2, NULL, 0, -1, 0, &req));
        int64_t hit = 0;
        OK(kvb_request_counts(req, NULL, &hit, NULL));
        kvb_request_finish(req, 0);
        OK(kvb_store_get_stats(kvb_connector_store(c), &st));
        ck_assert_msg(hit == 3 && st.corrupt == 0, "round %d: %lld hits, %lld corrupt", round,
                      (long long)hit, (long long)st.corrupt);
        OK(kvb_store_clear(kvb_connector_store(c)));
    }
    /* stored again, then chunk A (tokens 1000..1036) damaged in pinned memory */
    kvb_request *req = NULL;
    OK(kvb_request_begin(c, 0, tp.p1, tp.n1, NULL, 0, -1, 1, &req));
    kvb_paged_layout lay = make_layout(LAYOUT_2BNHD, dcache, NB, BS, HK, HD, dt, 0);
    for (int l = 0; l < NL; l++) {
        OK(kvb_request_save_layer(req, l, &lay, tp.slots, tp.n1, stream));
    }
    kvb_request_finish(req, 1);
    int32_t a[37];
    for (int i = 0; i < 37; i++) a[i] = 1000 + i;
    kvb_entry *e = NULL;
    OK(kvb_store_acquire(kvb_connector_store(c), 0, a, 37, &e));
    ck_assert_ptr_nonnull(e);
    ((unsigned char *)kvb_entry_v(e, 1))[100] ^= 0x02;
    OK(kvb_store_unpin(kvb_connector_store(c), e));
    OK(kvb_request_begin(c, 0, tp.p2, tp.n2, NULL, 0, -1, 0, &req));
    int64_t hit = 0;
    OK(kvb_request_counts(req, NULL, &hit, NULL));
    kvb_request_finish(req, 0);
    kvb_store_stats st;
    OK(kvb_store_get_stats(kvb_connector_store(c), &st));
    ck_assert_int_eq(hit, 2);
    ck_assert_int_eq(st.corrupt, 1);
    ck_assert_int_eq(cudaStreamSynchronize(stream), cudaSuccess);
    ck_assert_int_eq(cudaStreamDestroy(stream), cudaSuccess);
    kvb_connector_free(c);
    cudaFree(dcache);
    free(h);
    free(inv);
}
END_TEST

/* The connector's loads (the planned kernel: one delta per segment, host
 * tables) for bf16 NeoX full rotary, f16 GPT-J, f32 NeoX with partial
 * rotary (pass-through dims) and bf16 GPT-J partial. */
START_TEST(test_connector_host_tier_load)
{
    connector_tier_case(KVB_DTYPE_BF16, KVB_ROPE_NEOX, 128);
    connector_tier_case(KVB_DTYPE_F16, KVB_ROPE_GPTJ, 128);
    connector_tier_case(KVB_DTYPE_F32, KVB_ROPE_NEOX, 64);
    connector_tier_case(KVB_DTYPE_BF16, KVB_ROPE_GPTJ, 96);
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Deviation and select                                                    */
/* ---------------------------------------------------------------------- */

/* Deviation equals the CPU op within 1e-5 relative per row for all dtypes,
 * vector (H*D multiple of 8) and scalar (odd row) paths. */
START_TEST(test_deviation_matches_cpu)
{
    const int64_t n = quick ? 200 : 3000;
    const int32_t shapes[2][2] = {{8, 128}, {3, 5}};
    for (int d = 0; d < 3; d++) {
        kvb_dtype dt = all_dtypes[d];
        size_t es = kvb_dtype_size(dt);
        for (int sh = 0; sh < 2; sh++) {
            int32_t H = shapes[sh][0], D = shapes[sh][1];
            int64_t elems = n * H * D;
            void *a = host_random(elems, dt), *b = host_random(elems, dt);
            float *ref = malloc((size_t)n * 4);
            void *da = dev_from(a, (size_t)elems * es), *db = dev_from(b, (size_t)elems * es);
            float *dout = dev_alloc((size_t)n * 4);
            OK(kvb_cpu_deviation(a, b, n, H, D, dt, ref));
            OK(kvb_cuda_deviation(da, db, n, H, D, dt, dout, NULL));
            float *g = host_from(dout, (size_t)n * 4);
            for (int64_t i = 0; i < n; i++) {
                ck_assert_msg(fabs(g[i] - ref[i]) <= 1e-5 * fabs(ref[i]) + 1e-30,
                              "deviation[%lld] %s H=%d D=%d: got %.9g expected %.9g",
                              (long long)i, kvb_dtype_str(dt), H, D, g[i], ref[i]);
            }
            free(a); free(b); free(ref); free(g);
            cudaFree(da); cudaFree(db); cudaFree(dout);
        }
    }
}
END_TEST

/* Runs one select case on both sides and requires identical index lists. */
static void select_case(int64_t n, int64_t k, int ties, double nan_frac, double forced_frac,
                        int with_forced)
{
    float *score = malloc((size_t)n * 4 + 4);
    uint8_t *forced = malloc((size_t)n + 1);
    int64_t nf = 0;
    for (int64_t i = 0; i < n; i++) {
        double u = rng_unit();
        if (u < nan_frac) {
            score[i] = NAN;
        } else if (ties) {
            score[i] = (float)rng_below(ties) - (float)ties / 2; /* many equal scores */
            if (score[i] == 0.0f && rng_below(2)) score[i] = -0.0f;
        } else {
            score[i] = rng_sym() * 1e3f;
        }
        forced[i] = with_forced && rng_unit() < forced_frac;
        nf += forced[i];
    }
    int64_t expect = nf + (k < n - nf ? k : n - nf);
    int64_t *ref = malloc((size_t)n * 8 + 8), nref = -1;
    OK(kvb_cpu_select(score, with_forced ? forced : NULL, n, k, ref, &nref));
    ck_assert_int_eq(nref, expect);
    float *ds = dev_from(score, (size_t)n * 4);
    uint8_t *dfo = dev_from(forced, (size_t)n);
    int64_t *dout = dev_alloc((size_t)n * 8);
    int64_t count = -1;
    OK(kvb_cuda_select(ds, with_forced ? dfo : NULL, n, nf, k, dout, NULL, &count));
    ck_assert_int_eq(count, nref); /* the count the CPU op returned */
    int64_t *g = host_from(dout, (size_t)n * 8);
    for (int64_t i = 0; i < nref; i++) {
        ck_assert_msg(g[i] == ref[i],
                      "select n=%lld k=%lld ties=%d: out[%lld]=%lld expected %lld",
                      (long long)n, (long long)k, ties, (long long)i, (long long)g[i],
                      (long long)ref[i]);
    }
    if (nref < n) {
        ck_assert_msg(g[nref] == -1, "select wrote past its count"); /* poison 0xff.. */
    }
    free(score); free(forced); free(ref); free(g);
    cudaFree(ds); cudaFree(dfo); cudaFree(dout);
}

/* Select equals the CPU select exactly: distinct scores, heavy ties (lower
 * index first), NaNs (lowest), -0/+0, forced tokens, k of 0, 1, 15%, all
 * and more than all, sizes from 1 to 200k. */
START_TEST(test_select_matches_cpu)
{
    const int64_t sizes[] = {1, 2, 33, 1000, 4097, 60000, 200000};
    const int ns = quick ? 5 : 7;
    for (int s = 0; s < ns; s++) {
        int64_t n = sizes[s];
        const int64_t ks[] = {0, 1, (n * 15) / 100, n / 2, n, n + 5};
        for (int ki = 0; ki < 6; ki++) {
            select_case(n, ks[ki], 0, 0.0, 0.0, 0);
            select_case(n, ks[ki], 7, 0.1, 0.2, 1);
            select_case(n, ks[ki], 0, 0.3, 0.05, 1);
            select_case(n, ks[ki], 2, 0.0, 0.5, 1);
        }
    }
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Argument checks (no device needed)                                      */
/* ---------------------------------------------------------------------- */

/* Fails unless `call` returns `want` and the message contains `frag`. */
#define EXPECT_FAIL(call, want, frag)                                       \
    do {                                                                    \
        kvb_clear_error();                                                  \
        kvb_status st_ = (call);                                            \
        ck_assert_msg(st_ == (want), "%s -> %s (%s)", #call,                \
                      kvb_status_str(st_), kvb_last_error());               \
        ck_assert_msg(strstr(kvb_last_error(), (frag)) != NULL,             \
                      "%s: message '%s' lacks '%s'", #call,                 \
                      kvb_last_error(), (frag));                            \
    } while (0)

/* Bad dtype, bad layout, unsupported head size and friends are rejected
 * before any launch with messages naming the argument. */
START_TEST(test_cuda_args_rejected)
{
    ck_assert_int_eq(kvb_has_cuda(), 1);
    static char buf[4096];
    kvb_paged_layout L = make_layout(LAYOUT_2BNHD, buf, 2, 4, 1, 8, KVB_DTYPE_F16, 0);
    int64_t slots[1] = {0};
    L.dtype = (kvb_dtype)9;
    EXPECT_FAIL(kvb_cuda_gather(&L, slots, 1, buf, buf, NULL), KVB_ERR_INVALID, "dtype=9");
    L = make_layout(LAYOUT_2BNHD, buf, 2, 4, 1, 8, KVB_DTYPE_F16, 0);
    L.block_size = 0;
    EXPECT_FAIL(kvb_cuda_scatter(&L, slots, 1, buf, buf, NULL), KVB_ERR_INVALID, "block_size=0");
    L = make_layout(LAYOUT_2BNHD, buf, 2, 4, 1, 8, KVB_DTYPE_F16, -1);
    EXPECT_FAIL(kvb_cuda_gather(&L, slots, 1, buf, buf, NULL), KVB_ERR_INVALID, "device=-1");
    L.device = 0;
    EXPECT_FAIL(kvb_cuda_gather(&L, NULL, 1, buf, buf, NULL), KVB_ERR_INVALID, "slots is NULL");
    EXPECT_FAIL(kvb_cuda_gather(NULL, slots, 1, buf, buf, NULL), KVB_ERR_INVALID, "layout is NULL");

    float inv[64] = {1.0f};
    kvb_rope rope = {64, KVB_ROPE_NEOX, inv, 1.0f};
    int64_t pos[1] = {0};
    EXPECT_FAIL(kvb_cuda_rerotate(buf, 1, 1, 64, (kvb_dtype)7, &rope, pos, pos, NULL),
                KVB_ERR_UNSUPPORTED, "dtype=7");
    rope.rotary_dim = 63;
    EXPECT_FAIL(kvb_cuda_rerotate(buf, 1, 1, 64, KVB_DTYPE_F32, &rope, pos, pos, NULL),
                KVB_ERR_INVALID, "rotary_dim=63");
    rope.rotary_dim = 64;
    rope.style = (kvb_rope_style)5;
    EXPECT_FAIL(kvb_cuda_rerotate(buf, 1, 1, 64, KVB_DTYPE_F32, &rope, pos, pos, NULL),
                KVB_ERR_INVALID, "rope.style=5");
    rope.style = KVB_ROPE_NEOX;
    EXPECT_FAIL(kvb_cuda_rerotate(buf, 1, 1, 64, KVB_DTYPE_F32, NULL, pos, pos, NULL),
                KVB_ERR_INVALID, "rope is NULL");

    EXPECT_FAIL(kvb_cuda_deviation(buf, buf, 1, 1, 8, (kvb_dtype)4, (float *)buf, NULL),
                KVB_ERR_UNSUPPORTED, "dtype=4");
    EXPECT_FAIL(kvb_cuda_deviation(buf, NULL, 1, 1, 8, KVB_DTYPE_F32, (float *)buf, NULL),
                KVB_ERR_INVALID, "b is NULL");

    kvb_load_seg seg = {buf, buf, 0, pos, 0, 1};
    EXPECT_FAIL(kvb_cuda_load_rotate(&seg, 1, -1, buf, buf, pos, 1, 1, 64, KVB_DTYPE_F16,
                                     &rope, NULL),
                KVB_ERR_INVALID, "layer=-1");
    EXPECT_FAIL(kvb_cuda_load_rotate(&seg, 1, 0, buf, buf, pos, 1, 1, 64, (kvb_dtype)8,
                                     &rope, NULL),
                KVB_ERR_UNSUPPORTED, "dtype=8");
    rope.rotary_dim = 2048;
    EXPECT_FAIL(kvb_cuda_load_rotate(&seg, 1, 0, buf, buf, pos, 1, 1, 4096, KVB_DTYPE_F16,
                                     &rope, NULL),
                KVB_ERR_UNSUPPORTED, "rotary_dim=2048");

    int64_t count = 0;
    EXPECT_FAIL(kvb_cuda_select((float *)buf, NULL, 4, 0, -1, (int64_t *)buf, NULL, &count),
                KVB_ERR_INVALID, "k=-1");
    EXPECT_FAIL(kvb_cuda_select((float *)buf, NULL, 4, 1, 1, (int64_t *)buf, NULL, &count),
                KVB_ERR_INVALID, "n_forced=1");
    EXPECT_FAIL(kvb_cuda_select((float *)buf, (uint8_t *)buf, 4, 5, 1, (int64_t *)buf, NULL,
                                &count),
                KVB_ERR_INVALID, "n_forced=5");
    EXPECT_FAIL(kvb_cuda_select(NULL, NULL, 4, 0, 1, (int64_t *)buf, NULL, &count),
                KVB_ERR_INVALID, "score is NULL");
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Runner                                                                   */
/* ---------------------------------------------------------------------- */

/* The suite of tests that need a device. */
static Suite *gpu_suite(void)
{
    Suite *s = suite_create("gpu");
    struct { const char *name; const TTest *fn; } cases[] = {
        {"copy", test_gather_layouts},
        {"copy", test_scatter_layouts},
        {"copy", test_gather_out_of_range_slot_skipped},
        {"rope", test_rerotate_matches_cpu},
        {"load", test_load_rotate_device},
        {"load", test_load_rotate_host_mapped},
        {"load", test_load_rotate_uniform_delta},
        {"load", test_load_rotate_in_place},
        {"load", test_connector_host_tier_load},
        {"load", test_connector_checksums_device_saves},
        {"select", test_deviation_matches_cpu},
        {"select", test_select_matches_cpu},
    };
    TCase *tc = NULL;
    const char *cur = "";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (strcmp(cur, cases[i].name) != 0) {
            tc = tcase_create(cases[i].name);
            tcase_set_timeout(tc, 0);
            suite_add_tcase(s, tc);
            cur = cases[i].name;
        }
        tcase_add_test(tc, cases[i].fn);
    }
    return s;
}

/* Runs the argument tests, then (with a device) the GPU suite; argv[1]
 * optionally names one tcase (copy, rope, load, select). */
int main(int argc, char **argv)
{
    quick = getenv("KVB_GPU_TEST_QUICK") != NULL && atoi(getenv("KVB_GPU_TEST_QUICK")) != 0;
    Suite *args = suite_create("cuda_args");
    TCase *tc = tcase_create("args");
    tcase_add_test(tc, test_cuda_args_rejected);
    suite_add_tcase(args, tc);
    SRunner *sr = srunner_create(args);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    if (failed) {
        return 1;
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("no CUDA device: GPU tests skipped\n");
        return 77;
    }
    sr = srunner_create(gpu_suite());
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_tagged(sr, NULL, argc > 1 ? argv[1] : NULL, NULL, NULL, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
