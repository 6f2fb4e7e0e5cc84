/*
 * cuda_ops.c: the kvb_cuda_* entry points.  Each validates its arguments
 * once and calls the launcher in cuda/; without CUDA they return
 * KVB_ERR_UNSUPPORTED so callers can fall back to the CPU ops.
 */
#include <string.h>

#include "cuda_tier.h"
#include "internal.h"

#ifdef KVB_WITH_CUDA
#include "kvb_cuda.h"
#endif

/* Returns 1 when this build has CUDA kernels. */
int kvb_has_cuda(void)
{
#ifdef KVB_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

#ifndef KVB_WITH_CUDA
/* The failure of every CUDA entry point in a CPU-only build. */
static kvb_status no_cuda(const char *op)
{
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "%s: libkvblend was built without CUDA (configure with "
                    "-DKVB_CUDA=ON where nvcc is available)",
                    op);
}
#endif

#ifdef KVB_WITH_CUDA
/* Maps a launcher's cudaError_t to a kvb_status: KVB_OK for cudaSuccess,
 * else KVB_ERR_CUDA with the op and CUDA's own description. */
static kvb_status cuda_status(const char *op, cudaError_t err)
{
    if (err == cudaSuccess) {
        return KVB_OK;
    }
    return kvb_fail(KVB_ERR_CUDA, "%s: CUDA error %d (%s): %s", op, (int)err,
                    cudaGetErrorName(err), cudaGetErrorString(err));
}

/* The failure of every entry point's `default:` dtype branch. */
static kvb_status bad_dtype(const char *op, kvb_dtype dtype)
{
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "%s: dtype=%d is not supported (expected 0=f32, 1=f16, "
                    "2=bf16)",
                    op, (int)dtype);
}

/* Calls the f32/f16/bf16 twin of launcher NAME with ARGS into `err`, or
 * returns bad_dtype for any other dtype: the one dtype switch of an entry
 * point. */
#define KVB_CUDA_DISPATCH(op, dtype, err, name, args)                        \
    switch (dtype) {                                                         \
    case KVB_DTYPE_F32: err = name##_f32 args; break;                        \
    case KVB_DTYPE_F16: err = name##_f16 args; break;                        \
    case KVB_DTYPE_BF16: err = name##_bf16 args; break;                      \
    default: return bad_dtype(op, dtype);                                    \
    }

/* Validates the common arguments of gather and scatter (the CPU checks
 * minus the host-side slot scan: slots live on the device, and the kernel
 * skips any slot outside the cache) and fills the kernel geometry. */
static kvb_status copy_check(const char *fn, const kvb_paged_layout *layout,
                             const int64_t *slots, int64_t n,
                             const void *k, const void *v,
                             kvb_cuda_paged *geom)
{
    kvb_status st = kvb_check_copy_args(fn, layout, slots, n, 1);
    if (st != KVB_OK) {
        return st;
    }
    if (n > 0 && k == NULL && v == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: the K and V rows are both NULL with n=%lld", fn,
                        (long long)n);
    }
    kvb_plane_strides ks, vs;
    kvb_layout_strides(layout, &ks, &vs);
    *geom = (kvb_cuda_paged){
        .block_stride = ks.block, .token_stride = ks.token,
        .head_stride = ks.head, .dim_stride = ks.dim,
        .v_block_stride = vs.block, .v_token_stride = vs.token,
        .v_head_stride = vs.head, .v_dim_stride = vs.dim,
        .num_slots = layout->num_blocks * layout->block_size,
        .block_size = layout->block_size,
        .num_kv_heads = layout->num_kv_heads,
        .head_size = layout->head_size};
    return KVB_OK;
}

/* Copies n tokens between the paged cache and dense rows on `stream`
 * (to_dense: gather into k/v; else scatter k/v, either may be NULL).
 * Copies are bitwise, so the dtype only sets the element size.  Slots
 * outside the cache are skipped like padding (they cannot be checked
 * without a sync). */
static kvb_status paged_copy(const char *fn, const kvb_paged_layout *layout,
                             const int64_t *slots, int64_t n, void *k,
                             void *v, int to_dense, void *stream)
{
    kvb_cuda_paged g;
    kvb_status st = copy_check(fn, layout, slots, n, k, v, &g);
    if (st != KVB_OK) {
        return st;
    }
    int esize = (int)kvb_dtype_size(layout->dtype);
    return cuda_status(fn, kvb_launch_paged_copy(layout->k_base,
                                                 layout->v_base, g, slots, n,
                                                 k, v, esize, to_dense,
                                                 (cudaStream_t)stream));
}
#endif

kvb_status kvb_cuda_gather(const kvb_paged_layout *layout,
                           const int64_t *slots, int64_t n, void *k_out,
                           void *v_out, void *stream)
{
#ifdef KVB_WITH_CUDA
    return paged_copy("kvb_cuda_gather", layout, slots, n, k_out, v_out, 1,
                      stream);
#else
    return no_cuda("kvb_cuda_gather");
#endif
}

kvb_status kvb_cuda_scatter(const kvb_paged_layout *layout,
                            const int64_t *slots, int64_t n,
                            const void *k_in, const void *v_in, void *stream)
{
#ifdef KVB_WITH_CUDA
    return paged_copy("kvb_cuda_scatter", layout, slots, n,
                      (void *)(uintptr_t)k_in, (void *)(uintptr_t)v_in, 0,
                      stream);
#else
    return no_cuda("kvb_cuda_scatter");
#endif
}

#ifdef KVB_WITH_CUDA
/* Checks a rotary description for heads of `head_size` and copies it into
 * the by-value kernel form.  Messages match kvb_cpu_rerotate's. */
static kvb_status rope_check(const char *fn, const kvb_rope *rope,
                             int32_t head_size, kvb_cuda_rope *out)
{
    if (rope == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: rope is NULL", fn);
    }
    if (rope->rotary_dim <= 0 || rope->rotary_dim % 2 != 0 ||
        rope->rotary_dim > head_size) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: rope.rotary_dim=%d: expected an even value in "
                        "(0, head_size=%d]",
                        fn, (int)rope->rotary_dim, (int)head_size);
    }
    if (rope->rotary_dim / 2 > KVB_CUDA_ROPE_MAX_PAIRS) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "%s: rope.rotary_dim=%d: at most %d is supported",
                        fn, (int)rope->rotary_dim,
                        2 * KVB_CUDA_ROPE_MAX_PAIRS);
    }
    if (rope->style != KVB_ROPE_NEOX && rope->style != KVB_ROPE_GPTJ) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: rope.style=%d: expected KVB_ROPE_NEOX (0) or "
                        "KVB_ROPE_GPTJ (1)",
                        fn, (int)rope->style);
    }
    if (rope->inv_freq == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: rope.inv_freq is NULL", fn);
    }
    memset(out, 0, sizeof *out);
    memcpy(out->inv_freq, rope->inv_freq,
           (size_t)(rope->rotary_dim / 2) * sizeof(float));
    out->rotary_dim = rope->rotary_dim;
    out->style = (int32_t)rope->style;
    return KVB_OK;
}
#endif

/* Re-rotates k in place on `stream` (kvb_cpu_rerotate's contract; rows
 * with equal old and new positions stay bit-exact). */
kvb_status kvb_cuda_rerotate(void *k, int64_t n, int32_t num_heads,
                             int32_t head_size, kvb_dtype dtype,
                             const kvb_rope *rope, const int64_t *old_pos,
                             const int64_t *new_pos, void *stream)
{
#ifdef KVB_WITH_CUDA
    const char *fn = "kvb_cuda_rerotate";
    kvb_status st = kvb_check_rows(fn, n, num_heads, head_size);
    if (st != KVB_OK) {
        return st;
    }
    kvb_cuda_rope r;
    st = rope_check(fn, rope, head_size, &r);
    if (st != KVB_OK) {
        return st;
    }
    if (n > 0 && (k == NULL || old_pos == NULL || new_pos == NULL)) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with n=%lld", fn,
                        k == NULL ? "k" : old_pos == NULL ? "old_pos"
                                                          : "new_pos",
                        (long long)n);
    }
    cudaError_t err = cudaSuccess;
    KVB_CUDA_DISPATCH(fn, dtype, err, kvb_launch_rerotate,
                      (k, n, num_heads, head_size, &r, old_pos, new_pos,
                       (cudaStream_t)stream));
    return cuda_status(fn, err);
#else
    return no_cuda("kvb_cuda_rerotate");
#endif
}

/* Per-row squared L2 distance of a and b into out (fp32) on `stream`. */
kvb_status kvb_cuda_deviation(const void *a, const void *b, int64_t n,
                              int32_t num_heads, int32_t head_size,
                              kvb_dtype dtype, float *out, void *stream)
{
#ifdef KVB_WITH_CUDA
    const char *fn = "kvb_cuda_deviation";
    kvb_status st = kvb_check_rows(fn, n, num_heads, head_size);
    if (st != KVB_OK) {
        return st;
    }
    if (n > 0 && (a == NULL || b == NULL || out == NULL)) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with n=%lld", fn,
                        a == NULL ? "a" : b == NULL ? "b" : "out",
                        (long long)n);
    }
    int64_t row = (int64_t)num_heads * head_size;
    cudaError_t err = cudaSuccess;
    KVB_CUDA_DISPATCH(fn, dtype, err, kvb_launch_deviation,
                      (a, b, n, row, out, (cudaStream_t)stream));
    return cuda_status(fn, err);
#else
    return no_cuda("kvb_cuda_deviation");
#endif
}

#ifdef KVB_WITH_CUDA
/* Most elements (num_kv_heads * head_size) in one row of the fused load:
 * the kernel counts a tile's items in int (KVB_LOAD_MAX_ROW in
 * cuda/rope.cu is the same number). */
#define LOAD_MAX_ROW_ELEMS ((int64_t)1 << 24)
#endif

/* The fused per-layer load on `stream`.  The segment table lives on the
 * device (or is host-mapped), so its contents cannot be checked here: the
 * kernel writes only rows inside [0, num_rows) that some segment covers
 * (the lowest-numbered segment wins if a bad table overlaps).  A segment
 * with k0 == NULL has its rows in dst_k/dst_v already (kvblend.h): its K
 * rows are re-rotated in place and its V rows left alone. */
kvb_status kvb_cuda_load_rotate(const kvb_load_seg *segs, int64_t nseg,
                                int32_t layer, void *dst_k, void *dst_v,
                                const int64_t *dst_pos, int64_t num_rows,
                                int32_t num_kv_heads, int32_t head_size,
                                kvb_dtype dtype, const kvb_rope *rope,
                                void *stream)
{
#ifdef KVB_WITH_CUDA
    const char *fn = "kvb_cuda_load_rotate";
    if (nseg < 0 || (nseg > 0 && segs == NULL) || layer < 0 ||
        num_rows < 0 || num_kv_heads <= 0 || head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: bad arguments (nseg=%lld, layer=%d, "
                        "num_rows=%lld, num_kv_heads=%d, head_size=%d)",
                        fn, (long long)nseg, (int)layer, (long long)num_rows,
                        (int)num_kv_heads, (int)head_size);
    }
    if (kvb_dtype_size(dtype) == 0) {
        return bad_dtype(fn, dtype);
    }
    if (nseg == 0) {
        return KVB_OK;
    }
    if (dst_k == NULL || dst_v == NULL || dst_pos == NULL || rope == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: NULL dst_k, dst_v, dst_pos or rope", fn);
    }
    if ((int64_t)num_kv_heads * head_size > LOAD_MAX_ROW_ELEMS) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "%s: num_kv_heads=%d * head_size=%d elements per "
                        "row: at most %lld are supported",
                        fn, (int)num_kv_heads, (int)head_size,
                        (long long)LOAD_MAX_ROW_ELEMS);
    }
    kvb_cuda_rope r;
    kvb_status st = rope_check(fn, rope, head_size, &r);
    if (st != KVB_OK) {
        return st;
    }
    cudaError_t err = cudaSuccess;
    KVB_CUDA_DISPATCH(fn, dtype, err, kvb_launch_load_rotate,
                      (segs, nseg, layer, dst_k, dst_v, dst_pos, num_rows,
                       num_kv_heads, head_size, &r, (cudaStream_t)stream));
    return cuda_status(fn, err);
#else
    return no_cuda("kvb_cuda_load_rotate");
#endif
}

/* The connector's planned load (see kvb_launch_load_plan in kvb_cuda.h and
 * cuda_tier.h): the caller built the tables and checked the geometry and
 * alignment; only the arguments it could get wrong are checked here. */
kvb_status kvb_cuda_load_planned(const kvb_load_seg *segs, const int32_t *row_seg,
                                 const float *tabs, const int32_t *seg_rot,
                                 int32_t layer, void *dst_k, void *dst_v,
                                 int64_t num_rows, int32_t num_kv_heads,
                                 int32_t head_size, kvb_dtype dtype,
                                 const kvb_rope *rope, void *stream)
{
#ifdef KVB_WITH_CUDA
    const char *fn = "kvb_cuda_load_planned";
    if (segs == NULL || row_seg == NULL || tabs == NULL || seg_rot == NULL ||
        dst_k == NULL || dst_v == NULL || rope == NULL || layer < 0 ||
        num_rows < 0 || num_kv_heads <= 0 || head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID, "%s: bad arguments (layer=%d, num_rows=%lld)",
                        fn, (int)layer, (long long)num_rows);
    }
    if (kvb_dtype_size(dtype) == 0) {
        return bad_dtype(fn, dtype);
    }
    if (!kvb_load_plan_geom_ok((int32_t)kvb_dtype_size(dtype), head_size,
                               rope->rotary_dim, rope->style)) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "%s: head_size=%d, rotary_dim=%d are not whole 16-byte vectors",
                        fn, (int)head_size, (int)rope->rotary_dim);
    }
    cudaError_t err = cudaSuccess;
    KVB_CUDA_DISPATCH(fn, dtype, err, kvb_launch_load_plan,
                      (segs, row_seg, tabs, seg_rot, layer, dst_k, dst_v, num_rows,
                       num_kv_heads, head_size, rope->rotary_dim, rope->style,
                       (cudaStream_t)stream));
    return cuda_status(fn, err);
#else
    return no_cuda("kvb_cuda_load_planned");
#endif
}

/* Top-k selection on `stream` (kvb_cpu_select's contract, indices written
 * ascending); the count comes from the caller's forced count, so nothing
 * is read back. */
kvb_status kvb_cuda_select(const float *score, const uint8_t *forced,
                           int64_t n, int64_t n_forced, int64_t k,
                           int64_t *out_idx, void *stream, int64_t *count)
{
#ifdef KVB_WITH_CUDA
    const char *fn = "kvb_cuda_select";
    if (n < 0 || n > KVB_CUDA_SELECT_MAX_N) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: n=%lld: expected 0 <= n <= %lld", fn,
                        (long long)n, (long long)KVB_CUDA_SELECT_MAX_N);
    }
    if (k < 0 || n_forced < 0 || n_forced > n || count == NULL ||
        (forced == NULL && n_forced > 0)) {
        return kvb_fail(KVB_ERR_INVALID, "%s: k=%lld n_forced=%lld n=%lld "
                        "count=%p: expected k >= 0, 0 <= n_forced <= n (0 "
                        "without a forced mask) and a count", fn,
                        (long long)k, (long long)n_forced, (long long)n,
                        (void *)count);
    }
    *count = n_forced + (k < n - n_forced ? k : n - n_forced);
    if (n > 0 && (score == NULL || out_idx == NULL)) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with n=%lld", fn,
                        score == NULL ? "score" : "out_idx", (long long)n);
    }
    return cuda_status(fn, kvb_launch_select(score, forced, n, k, out_idx,
                                             (cudaStream_t)stream));
#else
    return no_cuda("kvb_cuda_select");
#endif
}

