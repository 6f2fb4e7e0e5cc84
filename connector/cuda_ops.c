/*
 * cuda_ops.c: the kvb_cuda_* entry points.  Each validates its arguments
 * once and calls the launcher in cuda/; without CUDA they return
 * KVB_ERR_UNSUPPORTED so callers can fall back to the CPU ops.
 */
#include "internal.h"

#ifndef KVB_WITH_CUDA

/* Returns 0: this build has no CUDA kernels. */
int kvb_has_cuda(void)
{
    return 0;
}

/* Common failure of every CUDA entry point in a CPU-only build. */
static kvb_status no_cuda(const char *op)
{
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "%s: libkvblend was built without CUDA (configure with "
                    "-DKVB_CUDA=ON where nvcc is available)",
                    op);
}

/* CPU-only build: unsupported. */
kvb_status kvb_cuda_gather(const kvb_paged_layout *layout,
                           const int64_t *slots, int64_t n, void *k_out,
                           void *v_out, void *stream)
{
    return no_cuda("kvb_cuda_gather");
}

/* CPU-only build: unsupported. */
kvb_status kvb_cuda_scatter(const kvb_paged_layout *layout,
                            const int64_t *slots, int64_t n,
                            const void *k_in, const void *v_in, void *stream)
{
    return no_cuda("kvb_cuda_scatter");
}

/* CPU-only build: unsupported. */
kvb_status kvb_cuda_rerotate(void *k, int64_t n, int32_t num_heads,
                             int32_t head_size, kvb_dtype dtype,
                             const kvb_rope *rope, const int64_t *old_pos,
                             const int64_t *new_pos, void *stream)
{
    return no_cuda("kvb_cuda_rerotate");
}

/* CPU-only build: unsupported. */
kvb_status kvb_cuda_deviation(const void *a, const void *b, int64_t n,
                              int32_t num_heads, int32_t head_size,
                              kvb_dtype dtype, float *out, void *stream)
{
    return no_cuda("kvb_cuda_deviation");
}

/* CPU-only build: unsupported. */
kvb_status kvb_cuda_attention(const void *q, const int64_t *q_pos, int64_t nq,
                              const void *k, const void *v,
                              const int64_t *k_pos, int64_t nk,
                              int32_t num_q_heads, int32_t num_kv_heads,
                              int32_t head_size, float scale, kvb_dtype dtype,
                              void *out, void *stream)
{
    return no_cuda("kvb_cuda_attention");
}

#endif /* !KVB_WITH_CUDA */
