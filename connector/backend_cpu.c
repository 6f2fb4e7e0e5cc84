/*
 * backend_cpu.c: the CPU backend of the hook layer (backend.h).  The store
 * keeps every entry in host memory (malloc), the staging buffers and the
 * paged cache are host memory too, and each hook is one CPU op; `stream`
 * is ignored.  It needs no setup and no per-request state.
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t in backend.h */
#include "backend.h"

/* Copies rows between host memories for the lower tiers. */
static int cpu_copy(void *dst, const void *src, size_t bytes,
                    kvb_tier dst_tier, kvb_tier src_tier, void *ctx)
{
    memcpy(dst, src, bytes);
    return 0;
}

/* Loads a layer of the reused rows with the fused CPU op. */
static kvb_status cpu_load_layer(kvb_request *req, int32_t layer,
                                 void *dst_k, void *dst_v, void *stream)
{
    const kvb_model_desc *m = &req->conn->model;
    return kvb_cpu_load_rotate(req->load, req->n_load, layer, dst_k, dst_v,
                               req->positions, req->blend_end,
                               m->num_kv_heads, m->head_size, m->dtype,
                               &m->rope);
}

/* Gathers one segment's rows of a layer out of the paged cache. */
static kvb_status cpu_save_layer(kvb_request *req,
                                 const kvb_paged_layout *layout,
                                 const int64_t *slots, const kvb_span *s,
                                 void *k, void *v, int first, void *stream)
{
    return kvb_cpu_gather(layout, slots + s->start, s->end - s->start, k, v);
}

const kvb_backend kvb_backend_cpu = {
    .name = "cpu",
    .copy = cpu_copy,
    .load_layer = cpu_load_layer,
    .save_layer = cpu_save_layer,
};
