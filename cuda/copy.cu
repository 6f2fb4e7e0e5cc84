/*
 * copy.cu: gather and scatter between an engine's paged KV cache and
 * contiguous [n, num_kv_heads, head_size] rows.
 *
 * One launch covers every token of the slot mapping.  A block copies whole
 * tokens (K then V plane), its threads striding over (plane, head, chunk).
 * K and V have their own strides (vLLM's CPU-style caches store K
 * transposed per block and head).  When the head's dims are contiguous and
 * every address and stride of each copied plane is a multiple of 16 bytes,
 * chunks are 16-byte vectors; otherwise single elements.  Copies are bitwise, so the kernel only knows element sizes.
 * Slots that are negative (padding) or beyond the cache are skipped; the
 * entry point cannot check device slot arrays on the host without a sync,
 * so the kernel is what keeps every access inside the cache.
 */
#include "common.cuh"

/*
 * Copies tokens between the paged planes and the dense rows.  W is the unit
 * moved per access (an element, or a 16-byte vector of U = sizeof(W) /
 * esize elements); strides are in elements, K's and V's dim_stride are 1
 * when U > 1.
 *   paged_k, paged_v  cache planes (NULL: plane skipped)
 *   dense_k, dense_v  [n, num_kv_heads, head_size] (NULL: plane skipped)
 *   slots             [n]
 * Grid: min(n, 65535) blocks, grid-stride over tokens.  Block: 128 threads
 * over (plane, head, chunk) of one token.
 */
template <typename W, bool TO_DENSE>
static __global__ void kvb_paged_copy_kernel(char *__restrict__ paged_k,
                                             char *__restrict__ paged_v,
                                             kvb_cuda_paged g,
                                             const int64_t *__restrict__ slots,
                                             int64_t n,
                                             char *__restrict__ dense_k,
                                             char *__restrict__ dense_v,
                                             int esize)
{
    const int64_t U = (int64_t)sizeof(W) / esize; /* elements per access */
    const int64_t chunks = g.head_size / U;         /* per head */
    const int64_t per_plane = (int64_t)g.num_kv_heads * chunks;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const int64_t slot = slots[i];
        if (slot < 0 || slot >= g.num_slots) {
            continue; /* padding, or outside the cache: never touched */
        }
        const int64_t blk = slot / g.block_size;
        const int64_t tok = slot % g.block_size;
        const int64_t k_off = blk * g.block_stride + tok * g.token_stride;
        const int64_t v_off = blk * g.v_block_stride + tok * g.v_token_stride;
        for (int64_t w = threadIdx.x; w < 2 * per_plane; w += blockDim.x) {
            const int plane = w >= per_plane;
            const int64_t r = w - plane * per_plane;
            const int64_t h = r / chunks;
            const int64_t c = r - h * chunks;
            char *paged = plane ? paged_v : paged_k;
            char *dense = plane ? dense_v : dense_k;
            if (paged == nullptr || dense == nullptr) {
                continue;
            }
            const int64_t pe =
                plane ? v_off + h * g.v_head_stride + c * U * g.v_dim_stride
                      : k_off + h * g.head_stride + c * U * g.dim_stride;
            const int64_t de = (i * g.num_kv_heads + h) * g.head_size + c * U;
            W *p = reinterpret_cast<W *>(paged + pe * esize);
            W *d = reinterpret_cast<W *>(dense + de * esize);
            if (TO_DENSE) {
                *d = *p;
            } else {
                *p = *d;
            }
        }
    }
}

/* Launches one instantiation of the copy kernel for direction TO_DENSE. */
template <typename W>
static cudaError_t kvb_paged_copy_go(void *k_paged, void *v_paged,
                                     const kvb_cuda_paged &g,
                                     const int64_t *slots, int64_t n,
                                     void *k_dense, void *v_dense, int esize,
                                     int to_dense, cudaStream_t stream)
{
    const unsigned grid = kvb_grid_for(n, 1, 65535);
    char *pk = static_cast<char *>(k_paged), *pv = static_cast<char *>(v_paged);
    char *dk = static_cast<char *>(k_dense), *dv = static_cast<char *>(v_dense);
    if (to_dense) {
        kvb_paged_copy_kernel<W, true><<<grid, 128, 0, stream>>>(pk, pv, g, slots, n, dk, dv, esize);
    } else {
        kvb_paged_copy_kernel<W, false><<<grid, 128, 0, stream>>>(pk, pv, g, slots, n, dk, dv, esize);
    }
    KVB_CUDA_TRY(cudaGetLastError());
    return cudaSuccess;
}

/* Returns true when one plane's strides allow 16-byte vectors: contiguous
 * dims and block, token and head strides that are multiples of 16 bytes. */
static bool kvb_paged_plane_vec_ok(int64_t block_stride, int64_t token_stride,
                                   int64_t head_stride, int64_t dim_stride,
                                   int esize)
{
    if (dim_stride != 1) {
        return false;
    }
    const int64_t strides[3] = {block_stride, token_stride, head_stride};
    for (int64_t s : strides) {
        if ((s * esize) % 16 != 0) {
            return false;
        }
    }
    return true;
}

/* Returns true when every address the vector path touches is 16-byte
 * aligned: bases, the head length in bytes, and the strides of each plane
 * that is copied (K's and V's may differ; one launch serves both planes, so
 * both must qualify). */
static bool kvb_paged_copy_vec_ok(const void *k_paged, const void *v_paged,
                                  const kvb_cuda_paged &g, const void *k_dense,
                                  const void *v_dense, int esize)
{
    const void *ptrs[4] = {k_paged, v_paged, k_dense, v_dense};
    for (const void *p : ptrs) {
        if (p != nullptr && !kvb_aligned(p, 16)) {
            return false;
        }
    }
    if (((int64_t)g.head_size * esize) % 16 != 0) {
        return false;
    }
    const bool k_used = k_paged != nullptr && k_dense != nullptr;
    const bool v_used = v_paged != nullptr && v_dense != nullptr;
    if (k_used && !kvb_paged_plane_vec_ok(g.block_stride, g.token_stride,
                                          g.head_stride, g.dim_stride, esize)) {
        return false;
    }
    if (v_used &&
        !kvb_paged_plane_vec_ok(g.v_block_stride, g.v_token_stride,
                                g.v_head_stride, g.v_dim_stride, esize)) {
        return false;
    }
    return true;
}

extern "C" cudaError_t kvb_launch_paged_copy(void *k_paged, void *v_paged,
                                             kvb_cuda_paged geom,
                                             const int64_t *slots, int64_t n,
                                             void *k_dense, void *v_dense,
                                             int esize, int to_dense,
                                             cudaStream_t stream)
{
    if (n <= 0) {
        return cudaSuccess;
    }
    if (kvb_paged_copy_vec_ok(k_paged, v_paged, geom, k_dense, v_dense, esize)) {
        return kvb_paged_copy_go<uint4>(k_paged, v_paged, geom, slots, n,
                                           k_dense, v_dense, esize, to_dense,
                                           stream);
    }
    if (esize == 4) {
        return kvb_paged_copy_go<uint32_t>(k_paged, v_paged, geom, slots, n,
                                              k_dense, v_dense, esize,
                                              to_dense, stream);
    }
    return kvb_paged_copy_go<uint16_t>(k_paged, v_paged, geom, slots, n,
                                          k_dense, v_dense, esize, to_dense,
                                          stream);
}
