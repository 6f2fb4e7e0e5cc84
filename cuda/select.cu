/*
 * select.cu: per-token KV deviation and the choice of tokens to recompute
 * (kvb_cuda_deviation, kvb_cuda_select).
 *
 * Deviation: one warp per row, 16-byte vector loads when the row allows it,
 * fp32 lane sums reduced by shuffles.
 *
 * Select: one block of 1024 threads does the whole choice with no scratch
 * beyond shared memory and no read-back.  Scores map to order-preserving
 * uint32 keys exactly as on the CPU (NaN lowest, -0 == +0).  A 4-pass radix
 * select (8 bits a pass, shared histogram) over the non-forced tokens finds
 * the key T of the k-th best and how many tokens with key T to take; a
 * final pass in index order takes forced tokens, keys above T, and the
 * first `need` tokens with key T (ties: lower index first), compacting the
 * chosen indices in ascending order with block-wide prefix sums.  Every
 * step is deterministic (histogram counts do not depend on atomic order).
 */
#include <cub/block/block_scan.cuh>

#include "common.cuh"

/*
 * Per-row sum of squared differences.
 *   a, b  [n, row]     out [n]
 * Grid: ceil(n / 8) blocks (capped, grid-stride).  Block: 256 threads, one
 * warp per row.
 */
template <typename T, bool VL>
static __global__ void kvb_deviation_kernel(const T *__restrict__ a, const T *__restrict__ b,
                                            int64_t n, int64_t row, float *__restrict__ out)
{
    constexpr int V = VL ? 16 / sizeof(T) : 1;
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < n;
         i += warps) {
        const T *ra = a + i * row;
        const T *rb = b + i * row;
        float acc = 0.0f;
        for (int64_t e = (int64_t)lane * V; e < row; e += 32 * V) {
            kvb_vec<T, V> va = *reinterpret_cast<const kvb_vec<T, V> *>(ra + e);
            kvb_vec<T, V> vb = *reinterpret_cast<const kvb_vec<T, V> *>(rb + e);
#pragma unroll
            for (int j = 0; j < V; j++) {
                const float d = kvb_to_f32(va.e[j]) - kvb_to_f32(vb.e[j]);
                acc = fmaf(d, d, acc);
            }
        }
        acc = kvb_warp_sum(acc);
        if (lane == 0) {
            out[i] = acc;
        }
    }
}

/* Launches the deviation kernel for one storage type. */
template <typename T>
static cudaError_t kvb_deviation_go(const void *a, const void *b, int64_t n, int64_t row,
                                    float *out, cudaStream_t stream)
{
    if (n <= 0) {
        return cudaSuccess;
    }
    const unsigned grid = kvb_grid_for(n, 8, 1 << 20);
    const T *ta = static_cast<const T *>(a), *tb = static_cast<const T *>(b);
    if (row % (16 / sizeof(T)) == 0 && kvb_aligned(a, 16) && kvb_aligned(b, 16)) {
        kvb_deviation_kernel<T, true><<<grid, 256, 0, stream>>>(ta, tb, n, row, out);
    } else {
        kvb_deviation_kernel<T, false><<<grid, 256, 0, stream>>>(ta, tb, n, row, out);
    }
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

extern "C" cudaError_t kvb_launch_deviation_f32(const void *a, const void *b, int64_t n,
                                                int64_t row, float *out, cudaStream_t stream)
{
    return kvb_deviation_go<float>(a, b, n, row, out, stream);
}

extern "C" cudaError_t kvb_launch_deviation_f16(const void *a, const void *b, int64_t n,
                                                int64_t row, float *out, cudaStream_t stream)
{
    return kvb_deviation_go<__half>(a, b, n, row, out, stream);
}

extern "C" cudaError_t kvb_launch_deviation_bf16(const void *a, const void *b, int64_t n,
                                                 int64_t row, float *out, cudaStream_t stream)
{
    return kvb_deviation_go<__nv_bfloat16>(a, b, n, row, out, stream);
}

/* Threads of the select block. */
#define KVB_SELECT_THREADS 1024

/* Maps a score to a uint32 whose unsigned order is the numeric order: NaN
 * is 0 (lowest), -0 maps like +0 (the CPU op's kvb_score_key). */
static __device__ __forceinline__ uint32_t kvb_score_key(float s)
{
    if (isnan(s)) {
        return 0u;
    }
    if (s == 0.0f) {
        s = 0.0f;
    }
    const uint32_t b = __float_as_uint(s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/*
 * The whole selection.
 *   score    [n]   forced [n] (may be NULL)
 *   out_idx  [forced count + min(k, n - forced count)], ascending
 * Grid: 1 block.  Block: KVB_SELECT_THREADS threads.
 */
static __global__ void __launch_bounds__(KVB_SELECT_THREADS)
kvb_select_kernel(const float *__restrict__ score, const uint8_t *__restrict__ forced,
                  int64_t n, int64_t k, int64_t *__restrict__ out_idx)
{
    typedef cub::BlockScan<unsigned, KVB_SELECT_THREADS> Scan;
    __shared__ typename Scan::TempStorage scan_tmp;
    __shared__ unsigned hist[256];
    __shared__ unsigned s_prefix, s_remaining;
    __shared__ unsigned long long s_others;
    const int tid = threadIdx.x;

    /* Number of candidates (non-forced tokens). */
    if (tid == 0) {
        s_others = 0;
    }
    __syncthreads();
    unsigned long long mine = 0;
    for (int64_t i = tid; i < n; i += blockDim.x) {
        mine += (forced == nullptr || forced[i] == 0);
    }
    atomicAdd(&s_others, mine);
    __syncthreads();
    const int64_t others = (int64_t)s_others;
    const int64_t keff = k < others ? k : others;

    /* Radix select of the keff-th best key among candidates. */
    uint32_t prefix = 0, mask = 0;
    unsigned remaining = (unsigned)keff;
    if (keff > 0) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
            __syncthreads();
            for (int64_t i = tid; i < n; i += blockDim.x) {
                if (forced != nullptr && forced[i] != 0) continue;
                const uint32_t key = kvb_score_key(score[i]);
                if ((key & mask) == prefix) {
                    atomicAdd(&hist[(key >> shift) & 255u], 1u);
                }
            }
            __syncthreads();
            if (tid == 0) {
                unsigned above = 0;
                int b = 255;
                for (; b > 0; b--) {
                    if (above + hist[b] >= remaining) break;
                    above += hist[b];
                }
                s_prefix = prefix | ((uint32_t)b << shift);
                s_remaining = remaining - above;
            }
            __syncthreads();
            prefix = s_prefix;
            remaining = s_remaining;
            mask |= 255u << shift;
            __syncthreads();
        }
    }
    /* Here: candidates with key > prefix are all taken, and the first
     * `remaining` with key == prefix (by index). */
    unsigned ties_before = 0; /* ties seen in earlier tiles */
    unsigned long long written = 0;
    for (int64_t base = 0; base < n; base += blockDim.x) {
        const int64_t i = base + tid;
        bool is_forced = false, is_tie = false, above = false;
        if (i < n) {
            is_forced = forced != nullptr && forced[i] != 0;
            if (!is_forced && keff > 0) {
                const uint32_t key = kvb_score_key(score[i]);
                above = key > prefix;
                is_tie = key == prefix;
            }
        }
        unsigned tie_rank, tie_total;
        Scan(scan_tmp).ExclusiveSum(is_tie ? 1u : 0u, tie_rank, tie_total);
        __syncthreads();
        const bool take = is_forced || above || (is_tie && ties_before + tie_rank < remaining);
        unsigned out_rank, out_total;
        Scan(scan_tmp).ExclusiveSum(take ? 1u : 0u, out_rank, out_total);
        __syncthreads();
        if (take) {
            out_idx[written + out_rank] = i;
        }
        ties_before += tie_total;
        written += out_total;
    }
}

extern "C" cudaError_t kvb_launch_select(const float *score, const uint8_t *forced, int64_t n,
                                         int64_t k, int64_t *out_idx, cudaStream_t stream)
{
    if (n <= 0) {
        return cudaSuccess;
    }
    kvb_select_kernel<<<1, KVB_SELECT_THREADS, 0, stream>>>(score, forced, n, k, out_idx);
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}
