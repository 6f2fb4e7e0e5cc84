/*
 * rope.cu: re-rotation of cached keys (kvb_cuda_rerotate) and the fused
 * per-layer load that copies stored V rows and re-rotated K rows into the
 * staging buffer (kvb_cuda_load_rotate).
 *
 * Both work row by row: a block takes one token row, computes cos/sin of
 * (new_pos - old_pos) * inv_freq[p] once per rotary pair into shared memory
 * (angle and sincos in double, as the CPU op does, then fp32), and its
 * threads stride over (head, chunk) items sharing those tables.  A chunk is
 * a 16-byte vector when the row and rotary geometry allow it (NeoX: the
 * vector at p and its partner at p + rotary_dim/2; GPT-J: a vector holds
 * whole pairs), else single elements (GPT-J: one pair).  Dims
 * [rotary_dim, head_size) pass through.  A row whose delta is 0 is copied
 * (or left) bit-exact, like the CPU op.  attention_factor is never applied.
 */
#include <climits>

#include "common.cuh"
#include "kvblend.h"

/* Loads C consecutive elements at p as fp32 (one vector access when VL). */
template <typename T, int C, bool VL>
static __device__ __forceinline__ void kvb_ld(const T *p, float (&x)[C])
{
    if (VL) {
        const kvb_vec<T, C> v = *reinterpret_cast<const kvb_vec<T, C> *>(p);
#pragma unroll
        for (int j = 0; j < C; j++) x[j] = kvb_to_f32(v.e[j]);
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) x[j] = kvb_to_f32(p[j]);
    }
}

/* Stores C fp32 values at p rounded to T (one vector access when VL). */
template <typename T, int C, bool VL>
static __device__ __forceinline__ void kvb_st(T *p, const float (&x)[C])
{
    if (VL) {
        kvb_vec<T, C> v;
#pragma unroll
        for (int j = 0; j < C; j++) v.e[j] = kvb_from_f32<T>(x[j]);
        *reinterpret_cast<kvb_vec<T, C> *>(p) = v;
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) p[j] = kvb_from_f32<T>(x[j]);
    }
}

/* Copies C elements bitwise from s to d (one vector access when VL). */
template <typename T, int C, bool VL>
static __device__ __forceinline__ void kvb_cp(const T *s, T *d)
{
    if (VL) {
        *reinterpret_cast<kvb_vec<T, C> *>(d) = *reinterpret_cast<const kvb_vec<T, C> *>(s);
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) d[j] = s[j];
    }
}

/*
 * Rotates (or, with rot == 0, copies) one token row: src and dst are
 * [H, D] (they may alias: every item reads and writes only its own
 * elements).  VL selects 16-byte vectors of V = 16 / sizeof(T) elements;
 * the caller checked alignment and divisibility for it.  cs/sn [rot / 2]
 * in shared memory.  Called by all threads of the block.
 */
template <typename T, int STYLE, bool VL>
static __device__ void kvb_rotate_row(const T *src, T *dst, int H, int D,
                                      int rot, const float *cs, const float *sn)
{
    constexpr int V = VL ? 16 / sizeof(T) : 1;
    constexpr int CR = STYLE == KVB_ROPE_GPTJ ? (V < 2 ? 2 : V) : V; /* rotary chunk */
    const int half = rot / 2;
    const int nrot = STYLE == KVB_ROPE_GPTJ ? rot / CR : half / CR;
    const int npass = (D - rot) / V;
    const int per_head = nrot + npass;
    for (int w = threadIdx.x; w < H * per_head; w += blockDim.x) {
        const int h = w / per_head;
        const int c = w - h * per_head;
        const T *s = src + (int64_t)h * D;
        T *d = dst + (int64_t)h * D;
        if (c >= nrot) {
            const int off = rot + (c - nrot) * V;
            kvb_cp<T, V, VL>(s + off, d + off);
        } else if (STYLE == KVB_ROPE_GPTJ) {
            float x[CR];
            kvb_ld<T, CR, VL>(s + c * CR, x);
#pragma unroll
            for (int j = 0; j < CR; j += 2) {
                const int p = (c * CR + j) / 2;
                const float a = x[j], b = x[j + 1];
                x[j] = a * cs[p] - b * sn[p];
                x[j + 1] = a * sn[p] + b * cs[p];
            }
            kvb_st<T, CR, VL>(d + c * CR, x);
        } else {
            float x[V], y[V];
            kvb_ld<T, V, VL>(s + c * V, x);
            kvb_ld<T, V, VL>(s + c * V + half, y);
#pragma unroll
            for (int j = 0; j < V; j++) {
                const int p = c * V + j;
                const float a = x[j], b = y[j];
                x[j] = a * cs[p] - b * sn[p];
                y[j] = a * sn[p] + b * cs[p];
            }
            kvb_st<T, V, VL>(d + c * V, x);
            kvb_st<T, V, VL>(d + c * V + half, y);
        }
    }
}

/* Fills cs/sn [rotary_dim / 2] for a position delta (all threads call;
 * the caller synchronises afterwards). */
static __device__ void kvb_rope_tables(const kvb_cuda_rope &rope, double delta,
                                       float *cs, float *sn)
{
    for (int p = threadIdx.x; p < rope.rotary_dim / 2; p += blockDim.x) {
        double s, c;
        sincos(delta * (double)rope.inv_freq[p], &s, &c);
        cs[p] = (float)c;
        sn[p] = (float)s;
    }
}

/* Returns true when 16-byte vectors fit the geometry: head_size, the
 * rotary chunking and the passthrough tail are whole vectors. */
template <typename T, int STYLE>
static __device__ __host__ bool kvb_rope_vec_geom(int D, int rot)
{
    const int V = 16 / sizeof(T);
    const bool rot_ok = STYLE == KVB_ROPE_GPTJ ? rot % V == 0 : (rot / 2) % V == 0;
    return D % V == 0 && (D - rot) % V == 0 && rot_ok;
}

/*
 * In-place re-rotation.
 *   k        [n, H, D]
 *   old_pos  [n]
 *   new_pos  [n]
 * Grid: min(n, 2^31-1) blocks, grid-stride over rows.  Block: 128 threads
 * over (head, chunk) items of one row.
 */
template <typename T, int STYLE, bool VL>
static __global__ void kvb_rerotate_kernel(T *__restrict__ k, int64_t n, int H, int D,
                                           kvb_cuda_rope rope,
                                           const int64_t *__restrict__ old_pos,
                                           const int64_t *__restrict__ new_pos)
{
    __shared__ float cs[KVB_CUDA_ROPE_MAX_PAIRS];
    __shared__ float sn[KVB_CUDA_ROPE_MAX_PAIRS];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const double delta = (double)new_pos[i] - (double)old_pos[i];
        if (delta == 0.0) {
            continue; /* uniform across the block: identity, row untouched */
        }
        kvb_rope_tables(rope, delta, cs, sn);
        __syncthreads();
        T *row = k + i * H * D;
        kvb_rotate_row<T, STYLE, VL>(row, row, H, D, rope.rotary_dim, cs, sn);
        __syncthreads();
    }
}

/* Rows per block of the load kernel (the segment table is scanned once per
 * block). */
#define KVB_LOAD_ROWS 4

/*
 * The fused load.  Each block finds, for its KVB_LOAD_ROWS staging rows, the
 * segment covering each row (the lowest segment index wins should a bad
 * table overlap; rows no segment covers are left untouched), then per row
 * copies V and rotates K from src_pos[t] to dst_pos[row].  Vectors are used
 * when the geometry allows it and the row's addresses are 16-byte aligned.
 *   segs     [nseg] kvb_load_seg (device or host-mapped)
 *   dst_k    [num_rows, H, D]     dst_v [num_rows, H, D]
 *   dst_pos  [num_rows]
 * Grid: ceil(num_rows / KVB_LOAD_ROWS) blocks (capped, grid-stride).
 * Block: 128 threads.
 */
template <typename T, int STYLE>
static __global__ void kvb_load_rotate_kernel(const kvb_load_seg *__restrict__ segs,
                                              int64_t nseg, int64_t layer,
                                              T *__restrict__ dst_k, T *__restrict__ dst_v,
                                              const int64_t *__restrict__ dst_pos,
                                              int64_t num_rows, int H, int D,
                                              kvb_cuda_rope rope)
{
    __shared__ float cs[KVB_CUDA_ROPE_MAX_PAIRS];
    __shared__ float sn[KVB_CUDA_ROPE_MAX_PAIRS];
    __shared__ unsigned long long seg_of[KVB_LOAD_ROWS];
    const bool geom_vec = kvb_rope_vec_geom<T, STYLE>(D, rope.rotary_dim);
    const int64_t row_elems = (int64_t)H * D;
    for (int64_t row0 = (int64_t)blockIdx.x * KVB_LOAD_ROWS; row0 < num_rows;
         row0 += (int64_t)gridDim.x * KVB_LOAD_ROWS) {
        if (threadIdx.x < KVB_LOAD_ROWS) {
            seg_of[threadIdx.x] = ULLONG_MAX;
        }
        __syncthreads();
        for (int64_t j = threadIdx.x; j < nseg; j += blockDim.x) {
            const int64_t start = segs[j].dst_start;
            const int64_t count = segs[j].num_tokens;
            for (int r = 0; r < KVB_LOAD_ROWS; r++) {
                const int64_t row = row0 + r;
                if (row >= start && row - start < count) {
                    atomicMin(&seg_of[r], (unsigned long long)j);
                }
            }
        }
        __syncthreads();
        for (int r = 0; r < KVB_LOAD_ROWS && row0 + r < num_rows; r++) {
            const unsigned long long j = seg_of[r];
            if (j == ULLONG_MAX) {
                continue; /* uniform: no segment covers this row */
            }
            const int64_t row = row0 + r;
            const kvb_load_seg *s = &segs[j];
            const int64_t t = row - s->dst_start;
            const int64_t src_off = layer * s->layer_stride + t * row_elems;
            const T *sk = static_cast<const T *>(s->k0) + src_off;
            const T *sv = static_cast<const T *>(s->v0) + src_off;
            T *dk = dst_k + row * row_elems;
            T *dv = dst_v + row * row_elems;
            const double delta = (double)dst_pos[row] - (double)s->src_pos[t];
            const int rot = delta == 0.0 ? 0 : rope.rotary_dim;
            if (rot != 0) {
                kvb_rope_tables(rope, delta, cs, sn);
            }
            __syncthreads();
            const bool vec = geom_vec && kvb_aligned(sk, 16) && kvb_aligned(sv, 16) &&
                             kvb_aligned(dk, 16) && kvb_aligned(dv, 16);
            if (vec) {
                kvb_rotate_row<T, STYLE, true>(sk, dk, H, D, rot, cs, sn);
                kvb_rotate_row<T, STYLE, true>(sv, dv, H, D, 0, cs, sn);
            } else {
                kvb_rotate_row<T, STYLE, false>(sk, dk, H, D, rot, cs, sn);
                kvb_rotate_row<T, STYLE, false>(sv, dv, H, D, 0, cs, sn);
            }
            __syncthreads();
        }
    }
}

/* Launches the re-rotation for one type and style. */
template <typename T, int STYLE>
static cudaError_t kvb_rerotate_go(void *k, int64_t n, int H, int D,
                                   const kvb_cuda_rope *rope, const int64_t *old_pos,
                                   const int64_t *new_pos, cudaStream_t stream)
{
    const unsigned grid = kvb_grid_for(n, 1, INT_MAX);
    T *kk = static_cast<T *>(k);
    if (kvb_rope_vec_geom<T, STYLE>(D, rope->rotary_dim) && kvb_aligned(k, 16)) {
        kvb_rerotate_kernel<T, STYLE, true><<<grid, 128, 0, stream>>>(kk, n, H, D, *rope, old_pos, new_pos);
    } else {
        kvb_rerotate_kernel<T, STYLE, false><<<grid, 128, 0, stream>>>(kk, n, H, D, *rope, old_pos, new_pos);
    }
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

/* Launches the fused load for one type and style. */
template <typename T, int STYLE>
static cudaError_t kvb_load_rotate_go(const void *segs, int64_t nseg, int32_t layer,
                                      void *dst_k, void *dst_v, const int64_t *dst_pos,
                                      int64_t num_rows, int H, int D,
                                      const kvb_cuda_rope *rope, cudaStream_t stream)
{
    const unsigned grid = kvb_grid_for(num_rows, KVB_LOAD_ROWS, INT_MAX);
    kvb_load_rotate_kernel<T, STYLE><<<grid, 128, 0, stream>>>(
        static_cast<const kvb_load_seg *>(segs), nseg, layer, static_cast<T *>(dst_k),
        static_cast<T *>(dst_v), dst_pos, num_rows, H, D, *rope);
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

/* Defines the typed launchers of both ops for one storage type. */
#define KVB_ROPE_LAUNCHERS(suffix, T)                                                         \
    extern "C" cudaError_t kvb_launch_rerotate_##suffix(                                      \
        void *k, int64_t n, int32_t num_heads, int32_t head_size, const kvb_cuda_rope *rope,  \
        const int64_t *old_pos, const int64_t *new_pos, cudaStream_t stream)                  \
    {                                                                                         \
        if (n <= 0) return cudaSuccess;                                                       \
        return rope->style == KVB_ROPE_GPTJ                                                   \
                   ? kvb_rerotate_go<T, KVB_ROPE_GPTJ>(k, n, num_heads, head_size, rope,      \
                                                       old_pos, new_pos, stream)              \
                   : kvb_rerotate_go<T, KVB_ROPE_NEOX>(k, n, num_heads, head_size, rope,      \
                                                       old_pos, new_pos, stream);             \
    }                                                                                         \
    extern "C" cudaError_t kvb_launch_load_rotate_##suffix(                                   \
        const void *segs, int64_t nseg, int32_t layer, void *dst_k, void *dst_v,              \
        const int64_t *dst_pos, int64_t num_rows, int32_t num_kv_heads, int32_t head_size,    \
        const kvb_cuda_rope *rope, cudaStream_t stream)                                       \
    {                                                                                         \
        if (nseg <= 0 || num_rows <= 0) return cudaSuccess;                                   \
        return rope->style == KVB_ROPE_GPTJ                                                   \
                   ? kvb_load_rotate_go<T, KVB_ROPE_GPTJ>(segs, nseg, layer, dst_k, dst_v,    \
                                                          dst_pos, num_rows, num_kv_heads,    \
                                                          head_size, rope, stream)            \
                   : kvb_load_rotate_go<T, KVB_ROPE_NEOX>(segs, nseg, layer, dst_k, dst_v,    \
                                                          dst_pos, num_rows, num_kv_heads,    \
                                                          head_size, rope, stream);           \
    }

KVB_ROPE_LAUNCHERS(f32, float)
KVB_ROPE_LAUNCHERS(f16, __half)
KVB_ROPE_LAUNCHERS(bf16, __nv_bfloat16)
