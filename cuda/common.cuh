/*
 * common.cuh: device helpers shared by kvblend's kernels: conversions
 * between the storage types and fp32, 16-byte vectors of elements, and
 * warp reductions.  Included only by the .cu files of cuda/.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kvb_cuda.h"

/* Storage element -> fp32. */
static __device__ __forceinline__ float kvb_to_f32(float x) { return x; }
static __device__ __forceinline__ float kvb_to_f32(__half x) { return __half2float(x); }
static __device__ __forceinline__ float kvb_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

/* fp32 -> storage element with round-to-nearest-even (the CPU ops'
 * rounding), NaN kept. */
template <typename T> static __device__ __forceinline__ T kvb_from_f32(float x);
template <> __device__ __forceinline__ float kvb_from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half kvb_from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 kvb_from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/* V elements of type T moved as one aligned access (V * sizeof(T) is 16,
 * 8, 4 or the element size). */
template <typename T, int V> struct alignas(sizeof(T) * V) kvb_vec {
    T e[V];
};

/* Returns true when the address is a multiple of `align` bytes. */
static __device__ __host__ __forceinline__ bool kvb_aligned(const void *p, uintptr_t align)
{
    return ((uintptr_t)p % align) == 0;
}

/* Sum over the 32 lanes of a full warp (every lane gets the result). */
static __device__ __forceinline__ float kvb_warp_sum(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        x += __shfl_xor_sync(0xffffffffu, x, o);
    }
    return x;
}

/* Number of blocks for `items` work items of `per_block` each, capped at
 * `cap` (grid-stride loops cover the rest). */
static inline unsigned kvb_grid_for(int64_t items, int64_t per_block, int64_t cap)
{
    int64_t b = (items + per_block - 1) / per_block;
    if (b < 1) {
        b = 1;
    }
    return (unsigned)(b < cap ? b : cap);
}
