/*
 * ops_copy.c: CPU gather and scatter between an engine's paged KV cache and
 * contiguous [n, num_kv_heads, head_size] rows.
 *
 * The paged cache is described by a kvb_paged_layout (two base pointers,
 * four element strides for K and optionally four of V's own), which covers
 * every layout vLLM has used: (2,B,N,H,D), (B,2,N,H,D), (B,N,H,2D) with K|V
 * interleaved per token, HND planes, and the CPU backend's K transposed per
 * block and head next to a row-major V.  Copies keep the dtype (no
 * conversion); a head whose dims are contiguous in its plane (that plane's
 * dim_stride == 1) is moved with one memcpy, otherwise element by element.
 */
#include <string.h>

#include "internal.h"

/* Which way a copy goes. */
typedef enum kvb_copy_dir {
    KVB_COPY_GATHER = 0, /* paged cache -> contiguous rows */
    KVB_COPY_SCATTER = 1 /* contiguous rows -> paged cache */
} kvb_copy_dir;

/* Everything one parallel range of a copy needs. */
typedef struct kvb_copy_job {
    const kvb_paged_layout *layout;
    const int64_t *slots;
    size_t esize;
    kvb_copy_dir dir;
    char *paged[2];  /* k_base, v_base (NULL: plane not copied) */
    char *dense[2];  /* contiguous k, v (NULL: plane not copied) */
    kvb_plane_strides strides[2]; /* K's, V's (V's may equal K's) */
} kvb_copy_job;

/* Copies one head of `head_size` elements between the paged cache address
 * `paged` (elements `dim_stride` apart) and the contiguous `dense` row, in
 * the job's direction.  Elements are moved as raw bytes of size esize. */
static void kvb_copy_head(char *paged, char *dense, int64_t head_size,
                          int64_t dim_stride, size_t esize, kvb_copy_dir dir)
{
    if (dim_stride == 1) {
        if (dir == KVB_COPY_GATHER) {
            memcpy(dense, paged, (size_t)head_size * esize);
        } else {
            memcpy(paged, dense, (size_t)head_size * esize);
        }
        return;
    }
    size_t step = (size_t)dim_stride * esize;
    for (int64_t d = 0; d < head_size; d++) {
        char *p = paged + (size_t)d * step;
        char *q = dense + (size_t)d * esize;
        if (dir == KVB_COPY_GATHER) {
            memcpy(q, p, esize);
        } else {
            memcpy(p, q, esize);
        }
    }
}

/* Parallel body: copies tokens [begin, end) of the slot mapping for each
 * plane that has both a paged base and a dense pointer.  Padding slots
 * (negative) are skipped, leaving their dense rows untouched. */
static void kvb_copy_range(int64_t begin, int64_t end, void *ctx)
{
    const kvb_copy_job *job = ctx;
    const kvb_paged_layout *L = job->layout;
    const int64_t H = L->num_kv_heads;
    const int64_t D = L->head_size;
    const size_t es = job->esize;
    for (int64_t i = begin; i < end; i++) {
        int64_t slot = job->slots[i];
        if (slot < 0) {
            continue;
        }
        int64_t block = slot / L->block_size;
        int64_t tok = slot % L->block_size;
        for (int plane = 0; plane < 2; plane++) {
            if (job->paged[plane] == NULL || job->dense[plane] == NULL) {
                continue;
            }
            const kvb_plane_strides *st = &job->strides[plane];
            int64_t tok_off = block * st->block + tok * st->token;
            for (int64_t h = 0; h < H; h++) {
                char *p = job->paged[plane] +
                          (size_t)(tok_off + h * st->head) * es;
                char *q = job->dense[plane] + (size_t)((i * H + h) * D) * es;
                kvb_copy_head(p, q, D, st->dim, es, job->dir);
            }
        }
    }
}

/* Validates the common arguments of gather and scatter: a valid layout in
 * host memory, n >= 0, a slot array when n > 0, and every slot in range.
 * Returns KVB_OK or the first failure (message set). */
static kvb_status kvb_copy_check(const char *fn,
                                 const kvb_paged_layout *layout,
                                 const int64_t *slots, int64_t n)
{
    kvb_status st = kvb_check_copy_args(fn, layout, slots, n, 0);
    return st != KVB_OK ? st : kvb_layout_check_slots(layout, slots, n);
}

/* Validates the arguments of a gather or a scatter and runs it over
 * threads: `k`/`v` are the contiguous [n, num_kv_heads, head_size] rows
 * (outputs for a gather, inputs for a scatter), either may be NULL but not
 * both.  `fn`, `kname` and `vname` name the caller and its arguments in
 * messages. */
static kvb_status kvb_copy_run(const char *fn, const char *kname,
                               const char *vname,
                               const kvb_paged_layout *layout,
                               const int64_t *slots, int64_t n, char *k,
                               char *v, kvb_copy_dir dir)
{
    kvb_status st = kvb_copy_check(fn, layout, slots, n);
    if (st != KVB_OK) {
        return st;
    }
    if (n > 0 && k == NULL && v == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: %s and %s are both NULL with n=%lld", fn, kname,
                        vname, (long long)n);
    }
    kvb_copy_job job = {
        .layout = layout,
        .slots = slots,
        .esize = kvb_dtype_size(layout->dtype),
        .dir = dir,
        .paged = {layout->k_base, layout->v_base},
        .dense = {k, v},
    };
    kvb_layout_strides(layout, &job.strides[0], &job.strides[1]);
    int64_t per_token = (int64_t)layout->num_kv_heads * layout->head_size;
    kvb_parallel_for(n, 1 + (1 << 16) / (per_token > 0 ? per_token : 1),
                     kvb_copy_range, &job);
    return KVB_OK;
}

/* Gathers n tokens from the paged cache into contiguous k_out/v_out
 * [n, num_kv_heads, head_size]; padding slots leave their rows untouched.
 * Either output may be NULL to read only the other plane, not both. */
kvb_status kvb_cpu_gather(const kvb_paged_layout *layout,
                          const int64_t *slots, int64_t n, void *k_out,
                          void *v_out)
{
    return kvb_copy_run("kvb_cpu_gather", "k_out", "v_out", layout, slots, n,
                        k_out, v_out, KVB_COPY_GATHER);
}

/* Scatters contiguous k_in/v_in [n, num_kv_heads, head_size] into the paged
 * cache at slots; padding slots are skipped.  Either input may be NULL to
 * write only the other plane, not both.  Tokens are written in parallel, so
 * when a slot appears twice which row it ends up holding is unspecified.
 * The inputs are only read (the job's dense pointers serve both
 * directions). */
kvb_status kvb_cpu_scatter(const kvb_paged_layout *layout,
                           const int64_t *slots, int64_t n, const void *k_in,
                           const void *v_in)
{
    return kvb_copy_run("kvb_cpu_scatter", "k_in", "v_in", layout, slots, n,
                        (char *)(uintptr_t)k_in, (char *)(uintptr_t)v_in,
                        KVB_COPY_SCATTER);
}
