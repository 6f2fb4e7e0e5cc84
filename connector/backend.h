/*
 * backend.h: the backends of the hook layer (internal; never installed).
 *
 * A connector runs its per-request work on one backend, picked once when
 * it is created: the CPU backend (backend_cpu.c) for device -1, the CUDA
 * backend (backend_cuda.c) for a device index.  connector.c does
 * everything that does not depend on where the rows live (splitting,
 * lookups, pins, reservations, the lower tiers, argument checks) and
 * calls the backend through the table below for the rest, after ggml's
 * backend interface: a request begins, loads and saves layers, and ends.
 *
 * The connector and request records are defined here, not in connector.c,
 * because the backends read them; only connector.c creates and frees them.
 */
#pragma once

#include <pthread.h>

#include "cuda_tier.h"
#include "internal.h"
#include "store.h"

typedef struct kvb_backend kvb_backend;

struct kvb_connector {
    kvb_config cfg;
    kvb_model_desc model;
    float *inv_freq;  /* owned copy of model.rope.inv_freq */
    int32_t device;   /* -1: CPU */
    const kvb_backend *be;
    kvb_store *store;
    uint64_t fingerprint; /* of the model (kvb_connector_fingerprint) */
    int checksums;        /* KVBLEND_VERIFY_CHECKSUMS, "auto" resolved */
    /* The separator: replaced by kvb_connector_set_separator while other
     * threads may be splitting prompts with it, hence the lock (readers:
     * split_prompt; the one writer swaps the pointer). */
    pthread_rwlock_t sep_lock;
    int32_t *sep;     /* owned; NULL when sep_len == 0 */
    int64_t sep_len;
    kvb_pool *dev_pool;  /* device tier rows (CUDA backend) */
    kvb_pool *host_pool; /* pinned host tier rows (CUDA backend) */
    kvb_tiers *tiers;    /* disk and remote tiers; NULL when none */
    uint64_t tier_key;   /* names this model and shard in the tiers */
    uint64_t model_id;   /* kvb_connector_set_shard's weights identity */
    int32_t rank;        /* tensor-parallel shard */
    int32_t world;
};

struct kvb_request {
    kvb_connector *conn;
    int64_t n;
    int64_t nseg;
    kvb_span *segs;        /* [nseg] */
    kvb_entry **hits;      /* [nseg] pinned stored entries, NULL on a miss */
    kvb_entry **saves;     /* [nseg] reserved entries, NULL when not saved */
    int32_t *saved_layers; /* [nseg] layers copied into saves[i] */
    int64_t blend_end;
    uint8_t *forced;       /* [blend_end] */
    int64_t n_hit;
    int64_t n_forced;
    kvb_load_seg *load;    /* [n_load] hit segments inside the blend */
    kvb_entry **load_entry; /* [n_load] the pinned entry load[i] reads */
    int64_t n_load;
    int64_t *positions;    /* [n] 0..n-1 */
    void *be;              /* the backend's state, from begin to end */
};

/*
 * A backend.  Hooks marked optional may be NULL (nothing to do).
 *
 *   init        optional.  Backs the store's tiers with the backend's
 *               memory, once, at connector creation (sp: the store's
 *               budgets).  Returns a kvb_status with kvb_last_error set.
 *   free        optional.  Frees what init made, after the store is freed.
 *   copy        copies an entry's rows between its tier and host memory
 *               (a store mover, store.h; ctx is the connector): for the
 *               lower tiers' reads and writes.
 *   begin       optional.  Sets up req->be once the request's load table
 *               is built; the request is released on failure.
 *   load_layer  kvb_request_load_layer after its checks (layer in range):
 *               the reused rows of `layer` into the staging buffers, keys
 *               re-rotated, in the order of `stream`.
 *   save_layer  copies one segment's rows of one layer out of the paged
 *               cache into its reserved entry: slots[s->start .. s->end)
 *               (the whole host slot mapping is passed) into k and v.
 *               `first` is set for the first segment of a
 *               kvb_request_save_layer call (the mapping may have changed).
 *   sync        optional.  Waits until the saves queued so far have
 *               written their rows (before the store hashes them or the
 *               lower tiers copy them).
 *   end         optional.  Releases req->be (the request is ending).
 */
struct kvb_backend {
    const char *name;
    kvb_status (*init)(kvb_connector *c, const kvb_store_params *sp);
    void (*free)(kvb_connector *c);
    kvb_move_fn copy;
    kvb_status (*begin)(kvb_request *req);
    kvb_status (*load_layer)(kvb_request *req, int32_t layer, void *dst_k,
                             void *dst_v, void *stream);
    kvb_status (*save_layer)(kvb_request *req, const kvb_paged_layout *layout,
                             const int64_t *slots, const kvb_span *s,
                             void *k, void *v, int first, void *stream);
    kvb_status (*sync)(kvb_request *req);
    void (*end)(kvb_request *req);
};

/* The CPU backend (backend_cpu.c). */
KVB_HIDDEN extern const kvb_backend kvb_backend_cpu;

/* The CUDA backend (backend_cuda.c); only picked in builds with CUDA. */
KVB_HIDDEN extern const kvb_backend kvb_backend_cuda;

/*
 * The CUDA backend's load plan (cuda_plan.c): where each part of a
 * request's device load table lies in the one block that holds it, and
 * whether the planned kernel (kvb_cuda_load_planned) can be used.
 */
typedef struct kvb_load_plan {
    size_t src_off;   /* int64 source positions of every reused row */
    size_t seg_off;   /* kvb_load_seg[n_load] */
    size_t row_off;   /* planned: int32 row_seg[blend_end] */
    size_t rot_off;   /* planned: int32 seg_rot[n_load] */
    size_t tab_off;   /* planned: float tabs[n_load][2][rotary_dim / 2] */
    size_t total;     /* bytes of the block */
    int planned;      /* the planned kernel applies */
} kvb_load_plan;

/* Lays out the load table of `req` (destination positions [blend_end]
 * first, at offset 0) and decides whether it is planned. */
KVB_HIDDEN void kvb_load_plan_init(const kvb_request *req, kvb_load_plan *p);

/*
 * Fills `host` (p->total bytes, zeroed) with the image of the table that
 * will live at device address `dev`: the segment table's src_pos point into
 * the block at `dev`, host-tier segments get k0 = v0 = NULL (their rows
 * reach the staging buffers through the copy engine), and a planned table
 * gets its row map, rotation flags and cos/sin tables.
 */
KVB_HIDDEN void kvb_load_plan_fill(const kvb_request *req,
                                   const kvb_load_plan *p, unsigned char *host,
                                   unsigned char *dev);
