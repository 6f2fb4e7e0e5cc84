/*
 * cuda_tier.c: device and pinned host pools for the store's tiers of a
 * device connector, and the per-request device tables.  See cuda_tier.h.
 *
 * A pool is one CUDA allocation made at connector creation, handed out by a
 * first-fit free list of ranges sorted by offset (neighbours coalesce on
 * release).  Blocks are aligned to 256 bytes, so every row block starts on
 * a boundary the kernels' vector loads accept.
 */
#include <pthread.h>
#include <stdlib.h>

#include "cuda_tier.h"

#ifdef KVB_WITH_CUDA

#include <cuda_runtime_api.h>

#define POOL_ALIGN ((size_t)256)

/* One free range of a pool: [off, off + len). */
typedef struct pool_range {
    size_t off;
    size_t len;
    struct pool_range *next;
} pool_range;

struct kvb_pool {
    unsigned char *base; /* device pointer, or the mapped host pointer */
    size_t size;
    int pinned;
    int32_t device;
    cudaStream_t stream; /* the store's moves between the pools */
    pthread_mutex_t mu;
    pool_range *free_list; /* sorted by off, no two adjacent */
    size_t used;
};

/* Makes `device` current for the calling thread and stores the previous
 * current device in *prev; returns the CUDA error of the switch. */
static cudaError_t device_enter(int32_t device, int *prev)
{
    cudaError_t err = cudaGetDevice(prev);
    if (err != cudaSuccess) {
        return err;
    }
    return *prev == device ? cudaSuccess : cudaSetDevice(device);
}

/* Restores the current device saved by device_enter. */
static void device_leave(int32_t device, int prev)
{
    if (prev != device) {
        (void)cudaSetDevice(prev);
    }
}

/* The failure status of a CUDA call `what` of the pools. */
static kvb_status tier_fail(const char *what, cudaError_t err)
{
    return kvb_fail(KVB_ERR_CUDA, "%s: CUDA error %d (%s): %s", what,
                    (int)err, cudaGetErrorName(err), cudaGetErrorString(err));
}

/* Rounds a block size up to the pool alignment (0 stays 0; sizes near
 * SIZE_MAX give 0, which alloc refuses). */
static size_t pool_round(size_t bytes)
{
    return (bytes + POOL_ALIGN - 1) & ~(POOL_ALIGN - 1);
}

/* Creates a device or pinned host pool.  See cuda_tier.h. */
kvb_status kvb_pool_create(int32_t device, size_t bytes, int pinned,
                           kvb_pool **out)
{
    *out = NULL;
    if (bytes == 0) {
        return KVB_OK;
    }
    bytes &= ~(POOL_ALIGN - 1);
    if (bytes == 0) {
        return KVB_OK;
    }
    kvb_pool *p = calloc(1, sizeof *p);
    pool_range *r = calloc(1, sizeof *r);
    if (p == NULL || r == NULL) {
        free(p);
        free(r);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_pool_create: out of memory");
    }
    int prev = 0;
    cudaError_t err = device_enter(device, &prev);
    if (err != cudaSuccess) {
        free(p);
        free(r);
        return tier_fail("cudaSetDevice", err);
    }
    void *mem = NULL;
    if (pinned) {
        err = cudaHostAlloc(&mem, bytes,
                            cudaHostAllocMapped | cudaHostAllocPortable);
        void *dev_ptr = NULL;
        if (err == cudaSuccess) {
            err = cudaHostGetDevicePointer(&dev_ptr, mem, 0);
        }
        if (err == cudaSuccess && dev_ptr != mem) {
            /* Without unified addressing the rows would need two pointers
             * per entry; every supported platform has it. */
            cudaFreeHost(mem);
            device_leave(device, prev);
            free(p);
            free(r);
            return kvb_fail(KVB_ERR_UNSUPPORTED,
                            "pinned host pool: the device address of mapped "
                            "memory differs from the host address (no "
                            "unified addressing)");
        }
    } else {
        err = cudaMalloc(&mem, bytes);
    }
    /* A stream of its own for the store's moves, which then wait neither
     * for nor on the engine's streams. */
    cudaStream_t stream = NULL;
    if (err == cudaSuccess) {
        err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    }
    device_leave(device, prev);
    if (err != cudaSuccess) {
        if (mem != NULL && pinned) {
            cudaFreeHost(mem);
        } else if (mem != NULL) {
            cudaFree(mem);
        }
        free(p);
        free(r);
        return kvb_fail(KVB_ERR_CUDA,
                        "%s pool of %zu bytes (%s): CUDA error %d (%s): %s",
                        pinned ? "pinned host" : "device", bytes,
                        pinned ? "LMCACHE_MAX_LOCAL_CPU_SIZE"
                               : "KVBLEND_MAX_DEVICE_SIZE",
                        (int)err, cudaGetErrorName(err),
                        cudaGetErrorString(err));
    }
    pthread_mutex_init(&p->mu, NULL);
    p->base = mem;
    p->size = bytes;
    p->pinned = pinned;
    p->device = device;
    p->stream = stream;
    r->off = 0;
    r->len = bytes;
    p->free_list = r;
    *out = p;
    kvb_log(KVB_LOG_INFO, "store: %s pool of %zu bytes on device %d",
            pinned ? "pinned host" : "device", bytes, (int)device);
    return KVB_OK;
}

/* Frees the pool's memory and free list. */
void kvb_pool_free(kvb_pool *pool)
{
    if (pool == NULL) {
        return;
    }
    int prev = 0;
    if (device_enter(pool->device, &prev) == cudaSuccess) {
        cudaStreamDestroy(pool->stream);
        if (pool->pinned) {
            cudaFreeHost(pool->base);
        } else {
            cudaFree(pool->base);
        }
        device_leave(pool->device, prev);
    }
    for (pool_range *r = pool->free_list; r != NULL;) {
        pool_range *next = r->next;
        free(r);
        r = next;
    }
    pthread_mutex_destroy(&pool->mu);
    free(pool);
}

/* Allocator hook: the first free range that fits gives its front.  Returns
 * NULL when no range is large enough (the store then tries the next tier)
 * or for 0 bytes. */
static void *pool_alloc(size_t bytes, void *ctx)
{
    kvb_pool *p = ctx;
    size_t need = pool_round(bytes);
    if (need == 0) {
        return NULL;
    }
    void *out = NULL;
    pthread_mutex_lock(&p->mu);
    for (pool_range **link = &p->free_list; *link != NULL;
         link = &(*link)->next) {
        pool_range *r = *link;
        if (r->len < need) {
            continue;
        }
        out = p->base + r->off;
        r->off += need;
        r->len -= need;
        if (r->len == 0) {
            *link = r->next;
            free(r);
        }
        p->used += need;
        break;
    }
    pthread_mutex_unlock(&p->mu);
    return out;
}

/* Allocator hook: returns a block to the free list, merging it with the
 * free ranges it touches.  If the list node cannot be allocated the range
 * is lost to the pool (logged) rather than corrupting it. */
static void pool_release(void *ptr, size_t bytes, void *ctx)
{
    kvb_pool *p = ctx;
    if (ptr == NULL) {
        return;
    }
    size_t off = (size_t)((unsigned char *)ptr - p->base);
    size_t len = pool_round(bytes);
    pthread_mutex_lock(&p->mu);
    p->used -= len;
    pool_range *prev = NULL, *next = p->free_list;
    while (next != NULL && next->off < off) {
        prev = next;
        next = next->next;
    }
    int joins_prev = prev != NULL && prev->off + prev->len == off;
    int joins_next = next != NULL && off + len == next->off;
    if (joins_prev && joins_next) {
        prev->len += len + next->len;
        prev->next = next->next;
        free(next);
    } else if (joins_prev) {
        prev->len += len;
    } else if (joins_next) {
        next->off = off;
        next->len += len;
    } else {
        pool_range *r = malloc(sizeof *r);
        if (r == NULL) {
            pthread_mutex_unlock(&p->mu);
            kvb_log(KVB_LOG_ERROR, "store: pool range of %zu bytes lost "
                                   "(out of host memory)", len);
            return;
        }
        r->off = off;
        r->len = len;
        r->next = next;
        if (prev != NULL) {
            prev->next = r;
        } else {
            p->free_list = r;
        }
    }
    pthread_mutex_unlock(&p->mu);
}

/* The store allocator over `pool`. */
kvb_allocator kvb_pool_allocator(kvb_pool *pool)
{
    kvb_allocator a = {pool_alloc, pool_release, pool};
    return a;
}

/* Copies rows between the tiers for the store; see cuda_tier.h.  The copy
 * is queued on the pool's stream and waited for: the store frees the
 * source block as soon as this returns.  The store calls it without its
 * lock, from any thread; copies of several threads share the stream. */
int kvb_pool_move(void *dst, const void *src, size_t bytes, kvb_tier dst_tier,
                  kvb_tier src_tier, void *ctx)
{
    kvb_pool *p = ctx;
    int prev = 0;
    cudaError_t err = device_enter(p->device, &prev);
    if (err == cudaSuccess) {
        err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, p->stream);
        if (err == cudaSuccess) {
            err = cudaStreamSynchronize(p->stream);
        }
        device_leave(p->device, prev);
    }
    if (err != cudaSuccess) {
        kvb_log(KVB_LOG_ERROR,
                "store: moving %zu bytes from the %s tier to the %s tier "
                "failed: CUDA error %d (%s): %s",
                bytes, src_tier == KVB_TIER_DEVICE ? "device" : "host",
                dst_tier == KVB_TIER_DEVICE ? "device" : "host", (int)err,
                cudaGetErrorName(err), cudaGetErrorString(err));
        return 1;
    }
    return 0;
}

/* Allocates a stream-ordered device block.  See cuda_tier.h. */
kvb_status kvb_cuda_alloc_async(int32_t device, size_t bytes, void *stream,
                                void **dptr)
{
    *dptr = NULL;
    int prev = 0;
    cudaError_t err = device_enter(device, &prev);
    if (err != cudaSuccess) {
        return tier_fail("cudaSetDevice", err);
    }
    err = cudaMallocAsync(dptr, bytes > 0 ? bytes : 1, (cudaStream_t)stream);
    device_leave(device, prev);
    if (err != cudaSuccess) {
        *dptr = NULL;
        return tier_fail("cudaMallocAsync (request tables)", err);
    }
    return KVB_OK;
}

/* Copies `bytes` from host memory to device memory on `stream` on
 * `device`; `what` names the copy in the error. */
static kvb_status copy_h2d(int32_t device, void *dst, const void *src,
                           size_t bytes, void *stream, const char *what)
{
    if (bytes == 0) {
        return KVB_OK;
    }
    int prev = 0;
    cudaError_t err = device_enter(device, &prev);
    if (err != cudaSuccess) {
        return tier_fail("cudaSetDevice", err);
    }
    err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                          (cudaStream_t)stream);
    device_leave(device, prev);
    return err == cudaSuccess ? KVB_OK : tier_fail(what, err);
}

/* Copies a host table to the device in stream order.  See cuda_tier.h. */
kvb_status kvb_cuda_copy_async(int32_t device, void *dst, const void *host,
                               size_t bytes, void *stream)
{
    return copy_h2d(device, dst, host, bytes, stream,
                    "cudaMemcpyAsync (request tables)");
}

/* Copies a segment's K and V rows host-to-device in the order of
 * `stream`.  See cuda_tier.h. */
kvb_status kvb_cuda_copy_rows_async(int32_t device, void *dst_k,
                                    const void *src_k, void *dst_v,
                                    const void *src_v, size_t bytes,
                                    void *stream)
{
    kvb_status st = copy_h2d(device, dst_k, src_k, bytes, stream,
                             "cudaMemcpyAsync (host-tier K rows)");
    return st != KVB_OK ? st
                        : copy_h2d(device, dst_v, src_v, bytes, stream,
                                   "cudaMemcpyAsync (host-tier V rows)");
}

/* Releases an uploaded block in stream order. */
void kvb_cuda_release(int32_t device, void *dptr, void *stream)
{
    if (dptr == NULL) {
        return;
    }
    int prev = 0;
    if (device_enter(device, &prev) == cudaSuccess) {
        cudaFreeAsync(dptr, (cudaStream_t)stream);
        device_leave(device, prev);
    }
}

/* Waits for the work queued on `stream`. */
kvb_status kvb_cuda_sync(int32_t device, void *stream)
{
    int prev = 0;
    cudaError_t err = device_enter(device, &prev);
    if (err != cudaSuccess) {
        return tier_fail("cudaSetDevice", err);
    }
    err = cudaStreamSynchronize((cudaStream_t)stream);
    device_leave(device, prev);
    return err == cudaSuccess ? KVB_OK : tier_fail("cudaStreamSynchronize", err);
}

#else /* !KVB_WITH_CUDA */

/* Without CUDA no pool can exist. */
kvb_status kvb_pool_create(int32_t device, size_t bytes, int pinned,
                           kvb_pool **out)
{
    *out = NULL;
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "kvb_pool_create: libkvblend was built without CUDA");
}

/* Nothing to free without CUDA. */
void kvb_pool_free(kvb_pool *pool)
{
    (void)pool;
}

/* An allocator that never allocates (no pool exists without CUDA). */
kvb_allocator kvb_pool_allocator(kvb_pool *pool)
{
    kvb_allocator a = {NULL, NULL, pool};
    return a;
}

/* Without CUDA no pool exists, so nothing is moved (never installed). */
int kvb_pool_move(void *dst, const void *src, size_t bytes, kvb_tier dst_tier,
                  kvb_tier src_tier, void *ctx)
{
    (void)dst;
    (void)src;
    (void)bytes;
    (void)dst_tier;
    (void)src_tier;
    (void)ctx;
    return 1;
}

/* Without CUDA nothing is allocated. */
kvb_status kvb_cuda_alloc_async(int32_t device, size_t bytes, void *stream,
                                void **dptr)
{
    *dptr = NULL;
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "kvb_cuda_alloc_async: libkvblend was built without CUDA");
}

/* Without CUDA nothing is copied. */
kvb_status kvb_cuda_copy_async(int32_t device, void *dst, const void *host,
                               size_t bytes, void *stream)
{
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "kvb_cuda_copy_async: libkvblend was built without CUDA");
}

/* Without CUDA nothing is copied. */
kvb_status kvb_cuda_copy_rows_async(int32_t device, void *dst_k,
                                    const void *src_k, void *dst_v,
                                    const void *src_v, size_t bytes,
                                    void *stream)
{
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "kvb_cuda_copy_rows_async: libkvblend was built without "
                    "CUDA");
}

/* Nothing to release without CUDA. */
void kvb_cuda_release(int32_t device, void *dptr, void *stream)
{
    (void)device;
    (void)dptr;
    (void)stream;
}

/* Nothing is queued without CUDA. */
kvb_status kvb_cuda_sync(int32_t device, void *stream)
{
    (void)device;
    (void)stream;
    return KVB_OK;
}

#endif
