/*
 * cuda_plan.c: the CUDA backend's load table and its plan (backend.h).
 *
 * A request's per-layer load runs from one device block uploaded at its
 * first load: the destination positions, the source positions of every
 * reused row, the segment table, and, when every segment shifts all its
 * rows by one delta and the geometry and addresses allow 16-byte vectors,
 * the plan of the planned kernel (cuda/rope.cu): the segment of each
 * staging row, whether each segment rotates at all, and each segment's
 * cos/sin table.  This file lays the block out and fills its host image;
 * backend_cuda.c allocates, uploads and releases it.
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t in backend.h */
#include <math.h>

#include "backend.h"
#include "kvb_plan.h"

/* Rounds a byte offset up to a multiple of 16. */
static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/*
 * Whether the request's load can take the planned kernel: every segment
 * was stored at consecutive positions (one delta for all its rows, since
 * staging rows are consecutive positions), the model's geometry is whole
 * 16-byte vectors, and every device-tier source (rows, layer stride) is
 * 16-byte aligned.  The staging buffers are checked at each load.
 */
static int plan_ok(const kvb_request *req)
{
    const kvb_model_desc *m = &req->conn->model;
    int32_t es = (int32_t)kvb_dtype_size(m->dtype);
    if (!kvb_load_plan_geom_ok(es, m->head_size, m->rope.rotary_dim,
                               m->rope.style) ||
        req->blend_end > INT32_MAX || req->n_load > INT32_MAX) {
        return 0;
    }
    for (int64_t i = 0; i < req->n_load; i++) {
        const kvb_load_seg *ls = &req->load[i];
        for (int64_t t = 1; t < ls->num_tokens; t++) {
            if (ls->src_pos[t] != ls->src_pos[0] + t) {
                return 0;
            }
        }
        if (kvb_entry_tier(req->load_entry[i]) != KVB_TIER_HOST &&
            (((uintptr_t)ls->k0 | (uintptr_t)ls->v0) % 16 != 0 ||
             ((size_t)ls->layer_stride * (size_t)es) % 16 != 0)) {
            return 0;
        }
    }
    return 1;
}

/* Lays out the load table; see backend.h. */
void kvb_load_plan_init(const kvb_request *req, kvb_load_plan *p)
{
    int64_t rows = 0;
    for (int64_t i = 0; i < req->n_load; i++) {
        rows += req->load[i].num_tokens;
    }
    size_t half = (size_t)(req->conn->model.rope.rotary_dim / 2);
    p->planned = plan_ok(req);
    p->src_off = (size_t)req->blend_end * sizeof(int64_t);
    p->seg_off = p->src_off + (size_t)rows * sizeof(int64_t);
    size_t end = p->seg_off + (size_t)req->n_load * sizeof(kvb_load_seg);
    p->row_off = align16(end);
    p->rot_off =
        align16(p->row_off + (size_t)req->blend_end * sizeof(int32_t));
    p->tab_off = align16(p->rot_off + (size_t)req->n_load * sizeof(int32_t));
    p->total = p->planned ? p->tab_off + (size_t)req->n_load * 2 * half *
                                             sizeof(float)
                          : end;
}

/* Fills the planned kernel's part of the table: the segment of each
 * staging row (-1: none; the lowest segment index wins on overlap, as in
 * the kernels), whether each segment's delta is non-zero, and its cos and
 * sin of delta * inv_freq. */
static void plan_fill_rotations(const kvb_request *req,
                                const kvb_load_plan *p, unsigned char *host)
{
    const kvb_rope *rope = &req->conn->model.rope;
    int64_t half = rope->rotary_dim / 2;
    int32_t *row_seg = (int32_t *)(host + p->row_off);
    int32_t *seg_rot = (int32_t *)(host + p->rot_off);
    float *tabs = (float *)(host + p->tab_off);
    for (int64_t r = 0; r < req->blend_end; r++) {
        row_seg[r] = -1;
    }
    for (int64_t i = req->n_load - 1; i >= 0; i--) {
        const kvb_load_seg *ls = &req->load[i];
        for (int64_t t = 0; t < ls->num_tokens; t++) {
            row_seg[ls->dst_start + t] = (int32_t)i;
        }
        double delta = (double)req->positions[ls->dst_start] -
                       (double)ls->src_pos[0];
        seg_rot[i] = delta != 0.0;
        float *cs = tabs + i * 2 * half;
        for (int64_t k = 0; k < half; k++) {
            double angle = delta * (double)rope->inv_freq[k];
            cs[k] = (float)cos(angle);
            cs[half + k] = (float)sin(angle);
        }
    }
}

/* Fills the host image of the load table; see backend.h. */
void kvb_load_plan_fill(const kvb_request *req, const kvb_load_plan *p,
                        unsigned char *host, unsigned char *dev)
{
    memcpy(host, req->positions, p->src_off);
    int64_t *hsrc = (int64_t *)(host + p->src_off);
    kvb_load_seg *hseg = (kvb_load_seg *)(host + p->seg_off);
    int64_t off = 0;
    for (int64_t i = 0; i < req->n_load; i++) {
        const kvb_load_seg *ls = &req->load[i];
        memcpy(hsrc + off, ls->src_pos,
               (size_t)ls->num_tokens * sizeof(int64_t));
        hseg[i] = *ls;
        hseg[i].src_pos = (const int64_t *)(dev + p->src_off) + off;
        if (kvb_entry_tier(req->load_entry[i]) == KVB_TIER_HOST) {
            hseg[i].k0 = NULL; /* rows already in place: rotate K there */
            hseg[i].v0 = NULL;
        }
        off += ls->num_tokens;
    }
    if (p->planned) {
        plan_fill_rotations(req, p, host);
    }
}
