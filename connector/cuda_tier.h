/*
 * cuda_tier.h: the CUDA side of a device connector (cuda_tier.c); internal,
 * never installed.
 *
 * Two memory pools back the store's tiers of a device connector: a device
 * pool carved from one cudaMalloc and a pinned host pool carved from one
 * mapped cudaHostAlloc, both made when the connector is created, so no CUDA
 * allocation happens when entries come and go.  Rows in either pool are
 * readable and writable by kernels (pinned host rows through the unified
 * address space, over the bus).  A request's small device tables (segment
 * table, positions, slot mapping) come from the stream-ordered allocator
 * (cudaMallocAsync), once per request.
 *
 * Without CUDA every function returns KVB_ERR_UNSUPPORTED (device
 * connectors are refused earlier, at creation).
 */
#pragma once

#include <stddef.h>

#include "internal.h"
#include "store.h"

typedef struct kvb_pool kvb_pool;

/* Creates a pool of `bytes` in device memory of `device` (pinned = 0) or in
 * pinned host memory mapped into every device (pinned = 1).  bytes == 0
 * gives *out = NULL and KVB_OK (no pool). */
KVB_HIDDEN kvb_status kvb_pool_create(int32_t device, size_t bytes,
                                      int pinned, kvb_pool **out);

/* Frees a pool and its memory.  NULL is a no-op. */
KVB_HIDDEN void kvb_pool_free(kvb_pool *pool);

/* The store allocator (store.h) that carves blocks out of `pool`. */
KVB_HIDDEN kvb_allocator kvb_pool_allocator(kvb_pool *pool);

/*
 * The store's mover (store.h, kvb_move_fn) for a device connector: copies
 * `bytes` between the device pool and the pinned host pool (or host
 * memory) with cudaMemcpyAsync (cudaMemcpyDefault) on the pool's own
 * non-blocking stream and waits for that stream, on the device of the pool
 * `ctx` (a kvb_pool *, either of the connector's pools).  Returns 0 when
 * the copy completed, non-zero after logging the CUDA error (the store
 * then keeps or drops the entry).  Without CUDA it copies nothing and
 * returns non-zero.
 */
KVB_HIDDEN int kvb_pool_move(void *dst, const void *src, size_t bytes,
                             kvb_tier dst_tier, kvb_tier src_tier, void *ctx);

/* Allocates a device block of `bytes` (at least 1) on `device` with
 * cudaMallocAsync on `stream`; *dptr is the block. */
KVB_HIDDEN kvb_status kvb_cuda_alloc_async(int32_t device, size_t bytes,
                                           void *stream, void **dptr);

/* Copies `bytes` of host memory to device memory `dst` on `stream`.  The
 * host buffer must stay valid until the copy has run (callers keep it
 * until the request ends). */
KVB_HIDDEN kvb_status kvb_cuda_copy_async(int32_t device, void *dst,
                                          const void *host, size_t bytes,
                                          void *stream);

/* Copies one segment's rows of one layer from the pinned host tier into
 * the staging buffers on `stream` through the copy engine (two
 * cudaMemcpyAsync host-to-device, K then V, `bytes` each; no host
 * synchronisation, no SM time).  src_k/src_v must be pinned memory (the
 * host pool) so the copies are truly asynchronous. */
KVB_HIDDEN kvb_status kvb_cuda_copy_rows_async(int32_t device, void *dst_k,
                                               const void *src_k,
                                               void *dst_v, const void *src_v,
                                               size_t bytes, void *stream);

/* Blocks until the work queued on `stream` has run (cudaStreamSynchronize);
 * KVB_OK without CUDA. */
KVB_HIDDEN kvb_status kvb_cuda_sync(int32_t device, void *stream);

/* Releases a block from kvb_cuda_alloc_async in the order of `stream`.
 * NULL is a no-op. */
KVB_HIDDEN void kvb_cuda_release(int32_t device, void *dptr, void *stream);

/*
 * The connector's planned per-layer load (connector/cuda_ops.c, kernel in
 * cuda/rope.cu): like kvb_cuda_load_rotate, for a table whose segments
 * each shift all their rows by one delta, with the plan built on the host
 * once per request and uploaded: row_seg[num_rows] (segment of each
 * staging row, -1 none), seg_rot[nseg] (1 when the delta is not 0) and
 * tabs[nseg][2][rotary_dim/2] (cos, sin of delta * inv_freq).  Every
 * pointer 16-byte aligned and the geometry whole 16-byte vectors
 * (kvb_load_plan_geom_ok); KVB_ERR_UNSUPPORTED otherwise or without CUDA.
 */
KVB_HIDDEN kvb_status kvb_cuda_load_planned(const kvb_load_seg *segs,
                                            const int32_t *row_seg,
                                            const float *tabs,
                                            const int32_t *seg_rot,
                                            int32_t layer, void *dst_k,
                                            void *dst_v, int64_t num_rows,
                                            int32_t num_kv_heads,
                                            int32_t head_size, kvb_dtype dtype,
                                            const kvb_rope *rope, void *stream);
