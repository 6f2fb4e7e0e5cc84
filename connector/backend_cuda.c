/*
 * backend_cuda.c: the CUDA backend of the hook layer (backend.h).
 *
 * The store's tiers live in two pools made at connector creation
 * (cuda_tier.c): device memory, and pinned host memory mapped into the
 * device.  A request keeps its device tables (the load table of
 * cuda_plan.c, the slot mapping) in blocks of the stream-ordered
 * allocator, uploaded at its first load and first save and released in
 * the order of the stream that used them.  Nothing here waits on the host
 * except sync.
 *
 * It compiles in every build: without CUDA the kvb_cuda_* calls fail, and
 * connectors on a device are refused before this backend is picked.
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t in backend.h */
#include <stdlib.h>

#include "backend.h"

/* A request's device state (req->be). */
typedef struct cuda_request {
    kvb_load_plan plan;
    void *h_load;          /* host image of d_load, kept until the end */
    unsigned char *d_load; /* device block: the load table (cuda_plan.c) */
    void *load_stream;
    int64_t *h_slots;      /* [n] host copy of the slot mapping */
    int64_t *d_slots;      /* [n] uploaded at the first save */
    void *save_stream;
} cuda_request;

/*
 * Backs the store with CUDA memory: the device tier with a pool of
 * KVBLEND_MAX_DEVICE_SIZE in device memory, the host tier with a pool of
 * LMCACHE_MAX_LOCAL_CPU_SIZE in pinned host memory mapped into the device,
 * so that every entry is readable by the kernels.  A tier whose budget is
 * 0 gets no pool (and the host tier then stores nothing, never in malloc
 * memory).  Returns KVB_ERR_CUDA when a pool cannot be allocated.
 */
static kvb_status cuda_init(kvb_connector *c, const kvb_store_params *sp)
{
    kvb_status st = kvb_pool_create(c->device, sp->device_budget_bytes, 0,
                                    &c->dev_pool);
    if (st == KVB_OK) {
        st = kvb_pool_create(c->device, sp->host_budget_bytes, 1,
                             &c->host_pool);
    }
    if (st != KVB_OK) {
        return st;
    }
    if (c->dev_pool != NULL) {
        kvb_allocator a = kvb_pool_allocator(c->dev_pool);
        st = kvb_store_set_allocator(c->store, KVB_TIER_DEVICE, &a);
    }
    if (st == KVB_OK && c->host_pool != NULL) {
        kvb_allocator a = kvb_pool_allocator(c->host_pool);
        st = kvb_store_set_allocator(c->store, KVB_TIER_HOST, &a);
    }
    if (st == KVB_OK && c->dev_pool != NULL && c->host_pool != NULL) {
        /* One LRU cache over both pools: device victims are demoted to
         * the host pool, host hits promoted back (copied outside the
         * store's lock on the pool's own stream). */
        st = kvb_store_set_mover(c->store, kvb_pool_move, c->dev_pool);
    }
    return st;
}

/* Frees the pools (the store, freed first, gave every block back). */
static void cuda_free(kvb_connector *c)
{
    kvb_pool_free(c->dev_pool);
    kvb_pool_free(c->host_pool);
}

/* Copies rows for the lower tiers: through CUDA when either side is in the
 * device tier, with memcpy between host memories.  Returns 0 on success. */
static int cuda_copy(void *dst, const void *src, size_t bytes,
                     kvb_tier dst_tier, kvb_tier src_tier, void *ctx)
{
    kvb_connector *c = ctx;
    if (dst_tier == KVB_TIER_DEVICE || src_tier == KVB_TIER_DEVICE) {
        return kvb_pool_move(dst, src, bytes, dst_tier, src_tier,
                             c->dev_pool);
    }
    memcpy(dst, src, bytes);
    return 0;
}

/* Gives the request its (empty) device state. */
static kvb_status cuda_begin(kvb_request *req)
{
    req->be = calloc(1, sizeof(cuda_request));
    return req->be != NULL
               ? KVB_OK
               : kvb_fail(KVB_ERR_NOMEM, "kvb_request_begin: out of memory");
}

/*
 * Makes a request's device table of `bytes`: a host image (a copy of `src`,
 * or the request's load table, cuda_plan.c, when src is NULL) and a block
 * of the stream-ordered allocator, and queues the upload on `stream`.  On
 * success *h and *d are the request's (released in cuda_end); on failure
 * nothing is left allocated.  `fn` names the public call in messages.
 */
static kvb_status cuda_upload(kvb_request *req, const void *src,
                              size_t bytes, void *stream, const char *fn,
                              void **h, void **d)
{
    int32_t dev = req->conn->device;
    *d = NULL;
    *h = calloc(1, bytes > 0 ? bytes : 1);
    kvb_status st = *h != NULL
                        ? kvb_cuda_alloc_async(dev, bytes, stream, d)
                        : kvb_fail(KVB_ERR_NOMEM, "%s: out of memory", fn);
    if (st == KVB_OK) {
        if (src != NULL) {
            memcpy(*h, src, bytes);
        } else {
            kvb_load_plan_fill(req, &((cuda_request *)req->be)->plan, *h,
                               *d);
        }
        st = kvb_cuda_copy_async(dev, *d, *h, bytes, stream);
        if (st != KVB_OK) {
            kvb_cuda_release(dev, *d, stream);
        }
    }
    if (st != KVB_OK) {
        free(*h);
        *h = *d = NULL;
    }
    return st;
}

/* Loads a layer of the reused rows: host-tier segments are first copied
 * into their staging rows by the copy engine (cudaMemcpyAsync on
 * `stream`), then one kernel on `stream` reads the device-tier rows
 * directly and re-rotates every K row; nothing waits on the host.  The
 * planned kernel runs when the plan allows it and the staging buffers are
 * 16-byte aligned. */
static kvb_status cuda_load_layer(kvb_request *req, int32_t layer,
                                  void *dst_k, void *dst_v, void *stream)
{
    cuda_request *cr = req->be;
    const kvb_model_desc *m = &req->conn->model;
    if (req->n_load == 0) {
        return KVB_OK;
    }
    if (cr->d_load == NULL) {
        /* once per request, in the order of the first load's stream */
        kvb_load_plan_init(req, &cr->plan);
        void *h, *d;
        kvb_status st = cuda_upload(req, NULL, cr->plan.total, stream,
                                    "kvb_request_load_layer", &h, &d);
        if (st != KVB_OK) {
            return st;
        }
        cr->h_load = h;
        cr->d_load = d;
        cr->load_stream = stream;
    }
    if (dst_k == NULL || dst_v == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_request_load_layer: NULL dst_k or dst_v");
    }
    size_t row = (size_t)m->num_kv_heads * (size_t)m->head_size *
                 kvb_dtype_size(m->dtype);
    for (int64_t i = 0; i < req->n_load; i++) {
        const kvb_load_seg *ls = &req->load[i];
        kvb_entry *e = req->load_entry[i];
        if (kvb_entry_tier(e) != KVB_TIER_HOST || ls->num_tokens == 0) {
            continue;
        }
        size_t dst = (size_t)ls->dst_start * row;
        kvb_status st = kvb_cuda_copy_rows_async(
            req->conn->device, (char *)dst_k + dst, kvb_entry_k(e, layer),
            (char *)dst_v + dst, kvb_entry_v(e, layer),
            (size_t)ls->num_tokens * row, stream);
        if (st != KVB_OK) {
            return st;
        }
    }
    const kvb_load_seg *segs = (const kvb_load_seg *)(cr->d_load +
                                                      cr->plan.seg_off);
    if (cr->plan.planned &&
        ((uintptr_t)dst_k | (uintptr_t)dst_v) % 16 == 0) {
        return kvb_cuda_load_planned(
            segs, (const int32_t *)(cr->d_load + cr->plan.row_off),
            (const float *)(cr->d_load + cr->plan.tab_off),
            (const int32_t *)(cr->d_load + cr->plan.rot_off), layer, dst_k,
            dst_v, req->blend_end, m->num_kv_heads, m->head_size, m->dtype,
            &m->rope, stream);
    }
    return kvb_cuda_load_rotate(segs, req->n_load, layer, dst_k, dst_v,
                                (const int64_t *)cr->d_load, req->blend_end,
                                m->num_kv_heads, m->head_size, m->dtype,
                                &m->rope, stream);
}

/* Puts the request's slot mapping (host slots[0..n)) on the device at its
 * first save, and again when it changed since (a prefill over several
 * steps gains blocks and computed rows), in the order of `stream` (on
 * which it is released when the request ends or it is replaced).  The
 * host copy stays with the request. */
static kvb_status cuda_upload_slots(kvb_request *req, cuda_request *cr,
                                    const int64_t *slots, void *stream)
{
    size_t bytes = (size_t)req->n * sizeof(int64_t);
    if (cr->d_slots != NULL) {
        if (memcmp(cr->h_slots, slots, bytes) == 0) {
            return KVB_OK;
        }
        kvb_cuda_release(req->conn->device, cr->d_slots, cr->save_stream);
        free(cr->h_slots);
        cr->d_slots = NULL;
        cr->h_slots = NULL;
    }
    void *h, *d;
    kvb_status st = cuda_upload(req, slots, bytes, stream,
                                "kvb_request_save_layer", &h, &d);
    if (st == KVB_OK) {
        cr->h_slots = h;
        cr->d_slots = d;
        cr->save_stream = stream;
    }
    return st;
}

/* Gathers one segment's rows of a layer out of the paged cache into its
 * entry on `stream`, through the device copy of the slot mapping (uploaded
 * at the first segment of each save call when it changed). */
static kvb_status cuda_save_layer(kvb_request *req,
                                  const kvb_paged_layout *layout,
                                  const int64_t *slots, const kvb_span *s,
                                  void *k, void *v, int first, void *stream)
{
    cuda_request *cr = req->be;
    if (first) {
        kvb_status st = cuda_upload_slots(req, cr, slots, stream);
        if (st != KVB_OK) {
            return st;
        }
    }
    return kvb_cuda_gather(layout, cr->d_slots + s->start, s->end - s->start,
                           k, v, stream);
}

/* Waits for the request's queued gathers (none before its first save). */
static kvb_status cuda_sync(kvb_request *req)
{
    cuda_request *cr = req->be;
    if (cr == NULL || cr->d_slots == NULL) {
        return KVB_OK;
    }
    return kvb_cuda_sync(req->conn->device, cr->save_stream);
}

/* Releases the request's device tables in the order of the streams that
 * used them, and their host images. */
static void cuda_end(kvb_request *req)
{
    cuda_request *cr = req->be;
    if (cr == NULL) {
        return;
    }
    kvb_cuda_release(req->conn->device, cr->d_load, cr->load_stream);
    kvb_cuda_release(req->conn->device, cr->d_slots, cr->save_stream);
    free(cr->h_load);
    free(cr->h_slots);
    free(cr);
    req->be = NULL;
}

const kvb_backend kvb_backend_cuda = {
    .name = "cuda",
    .init = cuda_init,
    .free = cuda_free,
    .copy = cuda_copy,
    .begin = cuda_begin,
    .load_layer = cuda_load_layer,
    .save_layer = cuda_save_layer,
    .sync = cuda_sync,
    .end = cuda_end,
};
