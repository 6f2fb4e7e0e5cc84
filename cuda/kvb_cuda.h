/*
 * kvb_cuda.h: the launchers of kvblend's CUDA kernels, as seen from the C
 * entry points in connector/cuda_ops.c.
 *
 * Each op has three layers (see CONVENTIONS.md): a static __global__ kernel
 * in cuda/<op>.cu, a launcher declared here that takes raw device pointers,
 * sizes, element strides and a stream and returns cudaError_t, and a
 * kvb_cuda_* entry point that validates its arguments once, switches once on
 * the dtype and maps the cudaError_t to a kvb_status.  Launchers trust their
 * arguments (the entry point checked them); kernels never read or write
 * outside the extents they were given.
 *
 * Launchers never allocate, never synchronise, and check cudaGetLastError()
 * after every launch.  Never installed; C and CUDA both include it.
 */
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kvb_plan.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KVB_CUDA_HIDDEN __attribute__((visibility("hidden")))
#else
#define KVB_CUDA_HIDDEN
#endif

/* Returns the cudaError_t of `expr` from the enclosing function (which must
 * return cudaError_t) when it is not cudaSuccess. */
#define KVB_CUDA_TRY(expr)                                                    \
    do {                                                                      \
        cudaError_t kvb_cuda_err_ = (expr);                                   \
        if (kvb_cuda_err_ != cudaSuccess) {                                   \
            return kvb_cuda_err_;                                             \
        }                                                                     \
    } while (0)

/* Largest rotary_dim / 2 the CUDA rotation kernels take (the frequency table
 * travels by value in the kernel parameters, so no device copy is needed). */
#define KVB_CUDA_ROPE_MAX_PAIRS 512

/* Rotary description as passed to the kernels by value: the host table of
 * kvb_rope.inv_freq copied into the parameter block.  attention_factor is
 * not carried: re-rotation never applies it (see csrc/ops_rope.c). */
typedef struct kvb_cuda_rope {
    float inv_freq[KVB_CUDA_ROPE_MAX_PAIRS]; /* [rotary_dim / 2] used */
    int32_t rotary_dim;                      /* even, 0 < rotary_dim <= head_size */
    int32_t style;                           /* kvb_rope_style */
} kvb_cuda_rope;

/* Paged-cache geometry for the copy kernels (element strides, as in
 * kvb_paged_layout; V's are always filled in, equal to K's when the layout
 * shares them). */
typedef struct kvb_cuda_paged {
    int64_t block_stride;
    int64_t token_stride;
    int64_t head_stride;
    int64_t dim_stride;
    int64_t v_block_stride;
    int64_t v_token_stride;
    int64_t v_head_stride;
    int64_t v_dim_stride;
    int64_t num_slots; /* num_blocks * block_size: slots >= this are skipped */
    int64_t block_size;
    int32_t num_kv_heads;
    int32_t head_size;
} kvb_cuda_paged;

/* Declares one launcher per storage type: NAME_f32, NAME_f16, NAME_bf16. */
#define KVB_CUDA_DECLARE3(name, params)                                       \
    KVB_CUDA_HIDDEN cudaError_t name##_f32 params;                            \
    KVB_CUDA_HIDDEN cudaError_t name##_f16 params;                            \
    KVB_CUDA_HIDDEN cudaError_t name##_bf16 params

/*
 * Gather (to_dense != 0: paged -> dense) or scatter (paged <- dense) of n
 * tokens whose elements are `esize` bytes (2 or 4; copies are bitwise).
 *   k_paged, v_paged  the cache planes (either may be NULL: plane skipped)
 *   k_dense, v_dense  [n, num_kv_heads, head_size] (NULL: plane skipped)
 *   slots             [n] device int64; negative or >= num_slots: skipped
 */
KVB_CUDA_HIDDEN cudaError_t kvb_launch_paged_copy(
    void *k_paged, void *v_paged, kvb_cuda_paged geom, const int64_t *slots,
    int64_t n, void *k_dense, void *v_dense, int esize, int to_dense,
    cudaStream_t stream);

/* In-place re-rotation of k [n, num_heads, head_size] from old_pos[n] to
 * new_pos[n] (device int64). */
KVB_CUDA_DECLARE3(kvb_launch_rerotate,
                  (void *k, int64_t n, int32_t num_heads, int32_t head_size,
                   const kvb_cuda_rope *rope, const int64_t *old_pos,
                   const int64_t *new_pos, cudaStream_t stream));

/* out[n] (fp32) = per-row sum of squared differences of a, b
 * [n, num_heads * head_size]. */
KVB_CUDA_DECLARE3(kvb_launch_deviation,
                  (const void *a, const void *b, int64_t n, int64_t row,
                   float *out, cudaStream_t stream));

/* The fused per-layer load (kvb_cuda_load_rotate): segs[nseg] and the
 * pointers inside it may be device or host-mapped memory. */
KVB_CUDA_DECLARE3(kvb_launch_load_rotate,
                  (const void *segs, int64_t nseg, int32_t layer, void *dst_k,
                   void *dst_v, const int64_t *dst_pos, int64_t num_rows,
                   int32_t num_kv_heads, int32_t head_size,
                   const kvb_cuda_rope *rope, cudaStream_t stream));

/* The planned per-layer load (see cuda/rope.cu): segs[] as for
 * kvb_launch_load_rotate, row_seg[num_rows] int32, seg_rot[nseg] int32 and
 * tabs[nseg][2][rotary_dim/2] fp32, all on the device; every pointer the
 * kernel dereferences 16-byte aligned.  cudaErrorInvalidValue when
 * kvb_load_plan_geom_ok fails. */
KVB_CUDA_DECLARE3(kvb_launch_load_plan,
                  (const void *segs, const int32_t *row_seg, const float *tabs,
                   const int32_t *seg_rot, int32_t layer, void *dst_k, void *dst_v,
                   int64_t num_rows, int32_t num_kv_heads, int32_t head_size,
                   int32_t rotary_dim, int32_t style, cudaStream_t stream));

/* Largest n kvb_launch_select takes (one block scans the whole array). */
#define KVB_CUDA_SELECT_MAX_N ((int64_t)1 << 30)

/* Top-k selection (kvb_cpu_select's contract) by one block: score[n] fp32,
 * forced[n] (may be NULL), out_idx[forced count + min(k, others)]. */
KVB_CUDA_HIDDEN cudaError_t kvb_launch_select(const float *score,
                                              const uint8_t *forced, int64_t n,
                                              int64_t k, int64_t *out_idx,
                                              cudaStream_t stream);

#ifdef __cplusplus
}
#endif
