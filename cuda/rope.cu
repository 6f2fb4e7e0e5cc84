/*
 * rope.cu: re-rotation of cached keys (kvb_cuda_rerotate) and the fused
 * per-layer load that copies stored V rows and re-rotated K rows into the
 * staging buffer (kvb_cuda_load_rotate).
 *
 * Both compute cos/sin of (new_pos - old_pos) * inv_freq[p] once per
 * rotary pair into shared memory (angle and sincos in double, as the CPU op
 * does, then fp32) and rotate in fp32.  The re-rotation does it per row;
 * the load per run of rows that share one delta (usually a whole tile of
 * rows, see kvb_load_rotate_kernel).  Threads stride over (head, chunk)
 * items sharing those tables.  A chunk is a 16-byte vector when the row and
 * rotary geometry allow it (NeoX: the vector at p and its partner at
 * p + rotary_dim/2; GPT-J: a vector holds whole pairs), else single
 * elements (GPT-J: one pair).  Dims [rotary_dim, head_size) pass through.
 * A row whose delta is 0 is copied (or left) bit-exact, like the CPU op.
 * attention_factor is never applied.
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
 * Rotates the values of rotary chunk c in registers.  GPT-J: x holds C
 * elements, whole pairs (2i, 2i+1) with table index c*C/2 + i (y unused).
 * NeoX: x holds elements c*C.. of the first half, y their partners
 * rotary_dim/2 further on, table index c*C + j.  cs/sn: cos and sin by
 * pair index.
 */
template <int STYLE, int C>
static __device__ __forceinline__ void kvb_rotate_regs(float (&x)[C], float (&y)[C], int c,
                                                       const float *cs, const float *sn)
{
    if (STYLE == KVB_ROPE_GPTJ) {
#pragma unroll
        for (int j = 0; j < C; j += 2) {
            const int p = (c * C + j) / 2;
            const float a = x[j], b = x[j + 1];
            x[j] = a * cs[p] - b * sn[p];
            x[j + 1] = a * sn[p] + b * cs[p];
        }
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) {
            const int p = c * C + j;
            const float a = x[j], b = y[j];
            x[j] = a * cs[p] - b * sn[p];
            y[j] = a * sn[p] + b * cs[p];
        }
    }
}

/*
 * Rotates rotary chunk c of one head, from s to d (they may alias: every
 * element is read before it is written, by the same thread): the C
 * elements at c*C and, for NeoX, their partners `half` further on (see
 * kvb_rotate_regs).
 */
template <typename T, int STYLE, int C, bool VL>
static __device__ __forceinline__ void kvb_rotate_chunk(const T *s, T *d, int c, int half,
                                                        const float *cs, const float *sn)
{
    float x[C], y[C];
    kvb_ld<T, C, VL>(s + c * C, x);
    if (STYLE != KVB_ROPE_GPTJ) {
        kvb_ld<T, C, VL>(s + c * C + half, y);
    }
    kvb_rotate_regs<STYLE, C>(x, y, c, cs, sn);
    kvb_st<T, C, VL>(d + c * C, x);
    if (STYLE != KVB_ROPE_GPTJ) {
        kvb_st<T, C, VL>(d + c * C + half, y);
    }
}

/* How one head's row of D elements splits into work items: nrot rotary
 * chunks of CR elements (NeoX: x at c*CR, y `half` further on; GPT-J: CR/2
 * adjacent pairs), then (D - rot) / V pass-through vectors of V. */
template <typename T, int STYLE, bool VL>
struct kvb_row_split {
    static constexpr int V = VL ? 16 / sizeof(T) : 1;
    static constexpr int CR = STYLE == KVB_ROPE_GPTJ ? (V < 2 ? 2 : V) : V;
    int half, nrot, per_head;
    __device__ kvb_row_split(int D, int rot)
        : half(rot / 2), nrot(STYLE == KVB_ROPE_GPTJ ? rot / CR : rot / 2 / CR),
          per_head(nrot + (D - rot) / V)
    {
    }
};

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
    using S = kvb_row_split<T, STYLE, VL>;
    constexpr int V = S::V, CR = S::CR;
    const S sp(D, rot);
    const int half = sp.half, nrot = sp.nrot, per_head = sp.per_head;
    for (int w = threadIdx.x; w < H * per_head; w += blockDim.x) {
        const int h = w / per_head;
        const int c = w - h * per_head;
        const T *s = src + (int64_t)h * D;
        T *d = dst + (int64_t)h * D;
        if (c >= nrot) {
            const int off = rot + (c - nrot) * V;
            kvb_cp<T, V, VL>(s + off, d + off);
        } else {
            kvb_rotate_chunk<T, STYLE, (STYLE == KVB_ROPE_GPTJ ? CR : V), VL>(s, d, c, half, cs, sn);
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

/* Staging rows per block of the load kernel (a tile), threads per block,
 * and how many independent items a thread loads before it stores: copies
 * (one 16-byte vector each) and rotations (NeoX: two vectors per item, so
 * one item; GPT-J: one vector per item, so two).  The unrolls are where
 * the kernel still fits three blocks per SM (80 registers) without
 * spilling on sm_90. */
#define KVB_LOAD_TILE 16
#define KVB_LOAD_THREADS 256
#define KVB_LOAD_UNROLL_COPY 4
#define KVB_LOAD_UNROLL_ROT(style) ((style) == KVB_ROPE_NEOX ? 1 : 2)

/* Most elements in one row (num_kv_heads * head_size) the load handles,
 * so that item counts of a tile stay far inside int (the entry point in
 * connector/cuda_ops.c refuses larger rows with the same number). */
#define KVB_LOAD_MAX_ROW (1 << 24)

/* Loads C consecutive elements at p without converting them (one vector
 * access when VL). */
template <typename T, int C, bool VL>
static __device__ __forceinline__ void kvb_ld_raw(const T *p, kvb_vec<T, C> &v)
{
    if (VL) {
        v = *reinterpret_cast<const kvb_vec<T, C> *>(p);
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) v.e[j] = p[j];
    }
}

/* Stores C raw elements at p (one vector access when VL). */
template <typename T, int C, bool VL>
static __device__ __forceinline__ void kvb_st_raw(T *p, const kvb_vec<T, C> &v)
{
    if (VL) {
        *reinterpret_cast<kvb_vec<T, C> *>(p) = v;
    } else {
#pragma unroll
        for (int j = 0; j < C; j++) p[j] = v.e[j];
    }
}

/*
 * Copies the V rows of tile rows [0, nr): sv[r] is row r's source or NULL
 * (no segment covers it, or its rows are already in place), dv0 the tile's
 * first destination row.  The block's threads stride over every V-element
 * chunk of all rows at once, each with U loads in flight before its stores.
 * Called by all threads; no synchronisation.
 */
template <typename T, bool VL, int U>
static __device__ void kvb_copy_tile(const T *const *sv, T *dv0, int nr, int row_elems)
{
    constexpr int V = VL ? 16 / sizeof(T) : 1;
    const int per_row = row_elems / V;
    const int total = nr * per_row;
    for (int base = threadIdx.x; base < total; base += U * blockDim.x) {
        kvb_vec<T, V> x[U];
        T *d[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int w = base + u * (int)blockDim.x;
            d[u] = nullptr;
            if (w < total) {
                const int r = w / per_row;
                const int off = (w - r * per_row) * V;
                const T *s = sv[r];
                if (s != nullptr) {
                    kvb_ld_raw<T, V, VL>(s + off, x[u]);
                    d[u] = dv0 + (int64_t)r * row_elems + off;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (d[u] != nullptr) kvb_st_raw<T, V, VL>(d[u], x[u]);
        }
    }
}

/*
 * Rotates (rot > 0) or copies (rot == 0) the K rows of tile rows [r0, r1),
 * which share one position delta whose tables are cs/sn [rot / 2]: sk[r]
 * is row r's source (NULL: not covered, skipped; equal to the destination:
 * the row is already in place, so its passthrough dims, and the whole row
 * when rot == 0, need no write).  The same items as kvb_rotate_row (NeoX: a
 * chunk at p and its partner at p + rot/2; GPT-J: a chunk of whole pairs;
 * passthrough chunks), strided by all threads over every row of the range,
 * U items in flight per thread.  Every item reads and writes only its own
 * elements, so in-place rows are safe.  The arithmetic is
 * kvb_rotate_row's, expression for expression.  No synchronisation.
 */
template <typename T, int STYLE, bool VL, int U>
static __device__ void kvb_rotate_tile(const T *const *sk, T *dk0, int r0, int r1, int H,
                                       int D, int rot, const float *cs, const float *sn)
{
    using S = kvb_row_split<T, STYLE, VL>;
    constexpr int V = S::V, CR = S::CR;
    const S sp(D, rot);
    const int half = sp.half, nrot = sp.nrot, per_head = sp.per_head;
    const int per_row = H * per_head;
    const int row_elems = H * D;
    const int total = (r1 - r0) * per_row;
    for (int base = threadIdx.x; base < total; base += U * blockDim.x) {
        kvb_vec<T, CR> xa[U]; /* NeoX x half, GPT-J pairs */
        kvb_vec<T, V> ya[U];  /* NeoX y half, passthrough */
        T *d[U];
        int c_of[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int w = base + u * (int)blockDim.x;
            d[u] = nullptr;
            c_of[u] = 0;
            if (w >= total) continue;
            const int r = w / per_row;
            const int rem = w - r * per_row;
            const int h = rem / per_head;
            const int c = rem - h * per_head;
            const T *src = sk[r0 + r];
            if (src == nullptr) continue;
            T *dst = dk0 + (int64_t)(r0 + r) * row_elems + h * D;
            const T *s = src + h * D;
            const bool in_place = s == dst;
            if (c >= nrot) {
                if (in_place) continue; /* passthrough dims stay as they are */
                kvb_ld_raw<T, V, VL>(s + rot + (c - nrot) * V, ya[u]);
            } else if (STYLE == KVB_ROPE_GPTJ) {
                kvb_ld_raw<T, CR, VL>(s + c * CR, xa[u]);
            } else {
                /* NeoX: CR == V (spelt CR so the dead GPT-J twin compiles) */
                kvb_ld_raw<T, CR, VL>(s + c * V, xa[u]);
                kvb_ld_raw<T, V, VL>(s + c * V + half, ya[u]);
            }
            d[u] = dst;
            c_of[u] = c;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (d[u] == nullptr) continue;
            const int c = c_of[u];
            if (c >= nrot) {
                kvb_st_raw<T, V, VL>(d[u] + rot + (c - nrot) * V, ya[u]);
            } else if (STYLE == KVB_ROPE_GPTJ) {
                float x[CR], unused[CR];
#pragma unroll
                for (int j = 0; j < CR; j++) x[j] = kvb_to_f32(xa[u].e[j]);
                kvb_rotate_regs<STYLE, CR>(x, unused, c, cs, sn);
                kvb_st<T, CR, VL>(d[u] + c * CR, x);
            } else {
                float x[V], y[V];
#pragma unroll
                for (int j = 0; j < V; j++) {
                    x[j] = kvb_to_f32(xa[u].e[j]);
                    y[j] = kvb_to_f32(ya[u].e[j]);
                }
                kvb_rotate_regs<STYLE, V>(x, y, c, cs, sn);
                kvb_st<T, V, VL>(d[u] + c * V, x);
                kvb_st<T, V, VL>(d[u] + c * V + half, y);
            }
        }
    }
}

/*
 * The fused load.  A block takes a tile of KVB_LOAD_TILE consecutive
 * staging rows:
 *   1. it finds the segment covering each row (the lowest segment index
 *      wins should a bad table overlap; rows no segment covers are left
 *      untouched), and for each covered row its K and V sources and its
 *      position delta dst_pos[row] - src_pos[t] (in double, as the CPU op);
 *   2. it splits the tile into runs of rows sharing one delta (uncovered
 *      rows join any run).  Inside a segment positions are consecutive on
 *      both sides, so a tile is almost always one run; a tile straddling
 *      two segments is two; shuffled positions give a run per row;
 *   3. per run it fills the cos/sin tables once (delta 0: no table, the
 *      rows are copied bit-exact), and all threads stride over every
 *      (row, head, 16-byte chunk) item of the run with several independent
 *      loads in flight and no further barrier.  The tile's V rows are
 *      copied the same way once, while the first run's tables are filled.
 * 16-byte vectors are used when the geometry allows it and every row of
 * the tile is 16-byte aligned (checked once per tile), else elements.
 *
 * A segment whose k0 is NULL has its rows already in dst_k/dst_v (the
 * connector copied them there through the copy engine): its K rows are
 * re-rotated in place and its V rows are not touched.
 *
 *   segs     [nseg] kvb_load_seg (device or host-mapped)
 *   dst_k    [num_rows, H, D]     dst_v [num_rows, H, D]
 *   dst_pos  [num_rows]
 * Grid: ceil(num_rows / KVB_LOAD_TILE) blocks (capped, grid-stride over
 * tiles).  Block: KVB_LOAD_THREADS threads.
 */
template <typename T, int STYLE>
static __global__ void __launch_bounds__(KVB_LOAD_THREADS, 3)
    kvb_load_rotate_kernel(const kvb_load_seg *__restrict__ segs, int64_t nseg, int64_t layer,
                           T *__restrict__ dst_k, T *__restrict__ dst_v,
                           const int64_t *__restrict__ dst_pos, int64_t num_rows, int H, int D,
                           kvb_cuda_rope rope)
{
    __shared__ float cs[KVB_CUDA_ROPE_MAX_PAIRS];
    __shared__ float sn[KVB_CUDA_ROPE_MAX_PAIRS];
    __shared__ unsigned long long seg_of[KVB_LOAD_TILE];
    __shared__ const T *sk[KVB_LOAD_TILE]; /* K source row, NULL: uncovered */
    __shared__ const T *sv[KVB_LOAD_TILE]; /* V source row, NULL: none to copy */
    __shared__ double delta[KVB_LOAD_TILE];
    const bool geom_vec = kvb_rope_vec_geom<T, STYLE>(D, rope.rotary_dim);
    const int row_elems = H * D;
    for (int64_t row0 = (int64_t)blockIdx.x * KVB_LOAD_TILE; row0 < num_rows;
         row0 += (int64_t)gridDim.x * KVB_LOAD_TILE) {
        const int nr = (int)min((int64_t)KVB_LOAD_TILE, num_rows - row0);
        if (threadIdx.x < KVB_LOAD_TILE) {
            seg_of[threadIdx.x] = ULLONG_MAX;
        }
        __syncthreads();
        for (int64_t j = threadIdx.x; j < nseg; j += blockDim.x) {
            const int64_t start = segs[j].dst_start;
            const int64_t count = segs[j].num_tokens;
            for (int r = 0; r < nr; r++) {
                const int64_t row = row0 + r;
                if (row >= start && row - start < count) {
                    atomicMin(&seg_of[r], (unsigned long long)j);
                }
            }
        }
        __syncthreads();
        bool aligned = true;
        if (threadIdx.x < KVB_LOAD_TILE) {
            const int r = threadIdx.x;
            const T *k = nullptr, *v = nullptr;
            double dl = 0.0;
            if (r < nr && seg_of[r] != ULLONG_MAX) {
                const kvb_load_seg *s = &segs[seg_of[r]];
                const int64_t row = row0 + r;
                const int64_t t = row - s->dst_start;
                T *dk = dst_k + row * row_elems;
                if (s->k0 != nullptr) {
                    const int64_t src_off = layer * s->layer_stride + t * row_elems;
                    k = static_cast<const T *>(s->k0) + src_off;
                    v = static_cast<const T *>(s->v0) + src_off;
                } else {
                    k = dk; /* already in place: rotate K there, V is done */
                }
                dl = (double)dst_pos[row] - (double)s->src_pos[t];
                aligned = kvb_aligned(k, 16) && kvb_aligned(dk, 16) &&
                          kvb_aligned(dst_v + row * row_elems, 16) &&
                          (v == nullptr || kvb_aligned(v, 16));
            }
            sk[r] = k;
            sv[r] = v;
            delta[r] = dl;
        }
        const bool vec = __syncthreads_and(aligned) != 0 && geom_vec;
        T *dk0 = dst_k + row0 * row_elems;
        T *dv0 = dst_v + row0 * row_elems;
        bool v_done = false;
        int r = 0;
        while (r < nr) {
            /* one run: [r, e) with one delta over its covered rows */
            while (r < nr && sk[r] == nullptr) r++;
            if (r == nr) break;
            const double dl = delta[r];
            int e = r + 1;
            while (e < nr && (sk[e] == nullptr || delta[e] == dl)) e++;
            const int rot = dl == 0.0 ? 0 : rope.rotary_dim;
            bool k_work = rot != 0;
            for (int i = r; i < e && !k_work; i++) {
                k_work = sv[i] != nullptr; /* a copy from elsewhere */
            }
            if (rot != 0) {
                kvb_rope_tables(rope, dl, cs, sn);
            }
            if (!v_done) {
                if (vec) {
                    kvb_copy_tile<T, true, KVB_LOAD_UNROLL_COPY>(sv, dv0, nr, row_elems);
                } else {
                    kvb_copy_tile<T, false, KVB_LOAD_UNROLL_COPY>(sv, dv0, nr, row_elems);
                }
                v_done = true;
            }
            if (rot != 0) {
                __syncthreads(); /* tables ready */
            }
            if (k_work && vec) {
                kvb_rotate_tile<T, STYLE, true, KVB_LOAD_UNROLL_ROT(STYLE)>(sk, dk0, r, e, H, D, rot, cs, sn);
            } else if (k_work) {
                kvb_rotate_tile<T, STYLE, false, KVB_LOAD_UNROLL_ROT(STYLE)>(sk, dk0, r, e, H, D, rot, cs, sn);
            }
            r = e;
            if (rot != 0 && r < nr) {
                __syncthreads(); /* the next run may rewrite the tables */
            }
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
    if ((int64_t)H * D > KVB_LOAD_MAX_ROW) {
        return cudaErrorInvalidValue; /* the entry point refuses such rows */
    }
    const unsigned grid = kvb_grid_for(num_rows, KVB_LOAD_TILE, INT_MAX);
    kvb_load_rotate_kernel<T, STYLE><<<grid, KVB_LOAD_THREADS, 0, stream>>>(
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

/*
 * The planned load (kvb_launch_load_plan_*): the fast path of the
 * connector, for tables whose every segment shifts all its rows by one
 * delta (stored at consecutive positions, loaded at consecutive rows) and
 * whose geometry and addresses allow 16-byte vectors.  The connector plans
 * once per request, on the host: row_seg[num_rows] (the segment of each
 * staging row, -1 for none, lowest index on overlap), seg_rot[nseg] (0:
 * delta 0, rows copied bit-exact; 1: rotated) and tabs[nseg][2][rot / 2]
 * (cos then sin of delta * inv_freq[p], computed in double and rounded to
 * float, as kvb_rope_tables does).  With no per-row tables to build and no
 * barrier, every thread moves one 16-byte V chunk, one pass-through K
 * chunk, or one rotary K item (NeoX: the chunk at p and its partner at
 * p + rot/2; GPT-J: the pairs inside one chunk), flat over all rows, so
 * the kernel streams like a copy.  Segments with k0 == NULL have their rows
 * in dst already: K is rotated in place, V left alone.
 */
template <typename T, int STYLE>
static __global__ void __launch_bounds__(256)
    kvb_load_plan_kernel(const kvb_load_seg *__restrict__ segs,
                         const int32_t *__restrict__ row_seg, const float *__restrict__ tabs,
                         const int32_t *__restrict__ seg_rot, int64_t layer, T *dst_k, T *dst_v,
                         int64_t num_rows, int H, int D, int rot)
{
    constexpr int V = 16 / sizeof(T);
    typedef kvb_vec<T, V> vec;
    const int half = rot / 2;
    const int nrot = STYLE == KVB_ROPE_GPTJ ? rot / V : half / V;
    const int per_head = nrot + (D - rot) / V;
    const int k_items = H * per_head;
    const int per_row = k_items + H * (D / V);
    const int64_t total = num_rows * per_row;
    const int64_t row_elems = (int64_t)H * D;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / per_row;
        int c = (int)(i - row * per_row);
        const int32_t si = row_seg[row];
        if (si < 0) {
            continue; /* no segment covers this row: untouched */
        }
        const kvb_load_seg *s = &segs[si];
        const bool in_place = s->k0 == nullptr;
        const int64_t src_off = layer * s->layer_stride + (row - s->dst_start) * row_elems;
        T *dk = dst_k + row * row_elems;
        if (c >= k_items) { /* a V chunk */
            if (!in_place) {
                c -= k_items;
                const T *sv = static_cast<const T *>(s->v0) + src_off;
                *reinterpret_cast<vec *>(dst_v + row * row_elems + c * V) =
                    *reinterpret_cast<const vec *>(sv + c * V);
            }
            continue;
        }
        const int h = c / per_head;
        const int cc = c - h * per_head;
        const T *sh = (in_place ? dk : static_cast<const T *>(s->k0) + src_off) + (int64_t)h * D;
        T *dh = dk + (int64_t)h * D;
        const bool rotate = seg_rot[si] != 0;
        if (cc >= nrot || !rotate) { /* pass-through dims, or a delta-0 row */
            if (!in_place) {
                if (cc >= nrot) {
                    const int off = rot + (cc - nrot) * V;
                    *reinterpret_cast<vec *>(dh + off) = *reinterpret_cast<const vec *>(sh + off);
                } else if (STYLE == KVB_ROPE_GPTJ) {
                    *reinterpret_cast<vec *>(dh + cc * V) = *reinterpret_cast<const vec *>(sh + cc * V);
                } else {
                    *reinterpret_cast<vec *>(dh + cc * V) = *reinterpret_cast<const vec *>(sh + cc * V);
                    *reinterpret_cast<vec *>(dh + cc * V + half) =
                        *reinterpret_cast<const vec *>(sh + cc * V + half);
                }
            }
            continue;
        }
        const float *cs = tabs + (int64_t)si * 2 * half;
        kvb_rotate_chunk<T, STYLE, V, true>(sh, dh, cc, half, cs, cs + half);
    }
}

/*
 * The planned load for full-rotary heads whose 16-byte chunks tile warps
 * exactly (chunks per head divide 32, chunks per row a multiple of 32):
 * thread j of a row moves chunk j of K and chunk j of V, so every thread
 * has two independent 16-byte loads in flight and every warp reads and
 * writes whole contiguous segments.  A NeoX chunk in the first half of a
 * head trades its values with its partner chunk (rotary_dim/2 further on,
 * cph/2 lanes away) through warp shuffles; a GPT-J chunk holds whole
 * pairs.  Every lane of a warp works on the same row (the loop strides by
 * whole warps), so the shuffles and the per-row branches are uniform.
 * Same tables and conventions as kvb_load_plan_kernel.
 */
template <typename T, int STYLE>
static __global__ void __launch_bounds__(256)
    kvb_load_plan_row_kernel(const kvb_load_seg *__restrict__ segs,
                             const int32_t *__restrict__ row_seg, const float *__restrict__ tabs,
                             const int32_t *__restrict__ seg_rot, int64_t layer, T *dst_k,
                             T *dst_v, int32_t num_rows, int H, int D)
{
    constexpr int V = 16 / sizeof(T);
    typedef kvb_vec<T, V> vec;
    const int cph = D / V;         /* chunks per head */
    const int cpr = H * cph;       /* chunks per row, a multiple of 32 */
    const int half = D / 2;
    const int64_t row_elems = (int64_t)H * D;
    const int32_t total = num_rows * cpr;
    for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += gridDim.x * blockDim.x) {
        const int32_t row = i / cpr;
        const int j = i - row * cpr;
        const int32_t si = row_seg[row];
        if (si < 0) {
            continue; /* uniform across the warp: the whole row is uncovered */
        }
        const kvb_load_seg *s = &segs[si];
        const bool in_place = s->k0 == nullptr;
        const int64_t src_off = layer * s->layer_stride + (row - s->dst_start) * row_elems;
        T *dk = dst_k + row * row_elems + (int64_t)j * V;
        const vec kv = *reinterpret_cast<const vec *>(
            in_place ? dk : static_cast<const T *>(s->k0) + src_off + (int64_t)j * V);
        vec vv;
        if (!in_place) {
            vv = *reinterpret_cast<const vec *>(static_cast<const T *>(s->v0) + src_off +
                                                (int64_t)j * V);
        }
        if (seg_rot[si] != 0) {
            const float *cs = tabs + (int64_t)si * 2 * half;
            const float *sn = cs + half;
            const int c = j % cph;
            float x[V];
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = kvb_to_f32(kv.e[e]);
            vec out;
            if (STYLE == KVB_ROPE_GPTJ) {
#pragma unroll
                for (int e = 0; e < V; e += 2) {
                    const int p = (c * V + e) / 2;
                    out.e[e] = kvb_from_f32<T>(x[e] * cs[p] - x[e + 1] * sn[p]);
                    out.e[e + 1] = kvb_from_f32<T>(x[e] * sn[p] + x[e + 1] * cs[p]);
                }
            } else {
                /* the partner chunk's 16 bytes, as four 32-bit words */
                const unsigned *w = reinterpret_cast<const unsigned *>(&kv);
                unsigned pw[4];
#pragma unroll
                for (int q = 0; q < 4; q++) pw[q] = __shfl_xor_sync(0xffffffffu, w[q], cph / 2);
                const vec &pv = *reinterpret_cast<const vec *>(pw);
                const bool first = c < cph / 2;
                const int pc = first ? c : c - cph / 2;
#pragma unroll
                for (int e = 0; e < V; e++) {
                    const int p = pc * V + e;
                    const float o = kvb_to_f32(pv.e[e]);
                    out.e[e] = first ? kvb_from_f32<T>(x[e] * cs[p] - o * sn[p])
                                     : kvb_from_f32<T>(o * sn[p] + x[e] * cs[p]);
                }
            }
            *reinterpret_cast<vec *>(dk) = out;
        } else if (!in_place) {
            *reinterpret_cast<vec *>(dk) = kv;
        }
        if (!in_place) {
            *reinterpret_cast<vec *>(dst_v + row * row_elems + (int64_t)j * V) = vv;
        }
    }
}

/* Launches the planned load for one type and style (geometry checked by
 * the caller with kvb_load_plan_geom_ok): the warp-tiled kernel where its
 * conditions hold, else the item kernel. */
template <typename T, int STYLE>
static cudaError_t kvb_load_plan_go(const void *segs, const int32_t *row_seg, const float *tabs,
                                    const int32_t *seg_rot, int32_t layer, void *dst_k, void *dst_v,
                                    int64_t num_rows, int H, int D, int rot, cudaStream_t stream)
{
    constexpr int V = 16 / sizeof(T);
    const int cph = D / V;
    const int64_t cpr = (int64_t)H * cph;
    if (rot == D && cph >= 2 && 32 % cph == 0 && cpr % 32 == 0 &&
        num_rows * cpr < (int64_t)INT32_MAX - 1024 * 256) {
        const unsigned grid = kvb_grid_for(num_rows * cpr, 256, 1 << 20);
        kvb_load_plan_row_kernel<T, STYLE><<<grid, 256, 0, stream>>>(
            static_cast<const kvb_load_seg *>(segs), row_seg, tabs, seg_rot, layer,
            static_cast<T *>(dst_k), static_cast<T *>(dst_v), (int32_t)num_rows, H, D);
        KVB_CUDA_TRY(cudaGetLastError());
        return cudaSuccess;
    }
    const int nrot = STYLE == KVB_ROPE_GPTJ ? rot / V : rot / 2 / V;
    const int64_t per_row = (int64_t)H * (nrot + (D - rot) / V) + (int64_t)H * (D / V);
    const unsigned grid = kvb_grid_for(num_rows * per_row, 256, 1 << 20);
    kvb_load_plan_kernel<T, STYLE><<<grid, 256, 0, stream>>>(
        static_cast<const kvb_load_seg *>(segs), row_seg, tabs, seg_rot, layer,
        static_cast<T *>(dst_k), static_cast<T *>(dst_v), num_rows, H, D, rot);
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

/* Defines the typed launchers of the planned load. */
#define KVB_PLAN_LAUNCHER(suffix, T)                                                          \
    extern "C" cudaError_t kvb_launch_load_plan_##suffix(                                     \
        const void *segs, const int32_t *row_seg, const float *tabs, const int32_t *seg_rot,  \
        int32_t layer, void *dst_k, void *dst_v, int64_t num_rows, int32_t num_kv_heads,      \
        int32_t head_size, int32_t rotary_dim, int32_t style, cudaStream_t stream)            \
    {                                                                                         \
        if (num_rows <= 0) return cudaSuccess;                                                \
        if (!kvb_load_plan_geom_ok((int32_t)sizeof(T), head_size, rotary_dim, style))         \
            return cudaErrorInvalidValue;                                                     \
        return style == KVB_ROPE_GPTJ                                                         \
                   ? kvb_load_plan_go<T, KVB_ROPE_GPTJ>(segs, row_seg, tabs, seg_rot, layer,  \
                                                        dst_k, dst_v, num_rows, num_kv_heads, \
                                                        head_size, rotary_dim, stream)        \
                   : kvb_load_plan_go<T, KVB_ROPE_NEOX>(segs, row_seg, tabs, seg_rot, layer,  \
                                                        dst_k, dst_v, num_rows, num_kv_heads, \
                                                        head_size, rotary_dim, stream);       \
    }

KVB_PLAN_LAUNCHER(f32, float)
KVB_PLAN_LAUNCHER(f16, __half)
KVB_PLAN_LAUNCHER(bf16, __nv_bfloat16)
