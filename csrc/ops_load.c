/*
 * ops_load.c: the fused per-layer load on the CPU: stored rows of every hit
 * segment are copied into the staging buffer and their keys re-rotated from
 * the positions they were stored at to their positions in this prompt.  A
 * segment with k0 == NULL has its rows in the staging buffer already (the
 * device connector copies host-tier rows there through the copy engine);
 * only its keys are re-rotated, in place, so the CPU op stays the reference
 * of the CUDA op for both kinds of segment.
 */
#include <stdlib.h>

#include "internal.h"

/* qsort comparator over segment indices by dst_start. */
static int cmp_seg_start(const void *a, const void *b)
{
    const kvb_load_seg *x = *(const kvb_load_seg *const *)a;
    const kvb_load_seg *y = *(const kvb_load_seg *const *)b;
    return (x->dst_start > y->dst_start) - (x->dst_start < y->dst_start);
}

/* Validates the segment table against a staging buffer of num_rows rows:
 * non-NULL source positions, and v0 set whenever k0 is (k0 == NULL marks
 * rows already in place, v0 then unread), ranges inside [0, num_rows), no
 * two segments writing the same row.  Returns KVB_ERR_INVALID naming the
 * first bad segment. */
static kvb_status check_load_segs(const kvb_load_seg *segs, int64_t nseg,
                                  int64_t num_rows)
{
    for (int64_t i = 0; i < nseg; i++) {
        const kvb_load_seg *s = &segs[i];
        if (s->num_tokens < 0 || s->dst_start < 0 ||
            s->dst_start + s->num_tokens > num_rows) {
            return kvb_fail(KVB_ERR_INVALID,
                            "load segment %lld: rows [%lld, %lld) are outside "
                            "the staging buffer of %lld rows",
                            (long long)i, (long long)s->dst_start,
                            (long long)(s->dst_start + s->num_tokens),
                            (long long)num_rows);
        }
        if (s->num_tokens > 0 &&
            ((s->k0 != NULL && s->v0 == NULL) || s->src_pos == NULL)) {
            return kvb_fail(KVB_ERR_INVALID,
                            "load segment %lld: NULL %s",
                            (long long)i,
                            s->src_pos == NULL ? "src_pos"
                                               : "v0 with k0 set");
        }
        if (s->layer_stride < 0) {
            return kvb_fail(KVB_ERR_INVALID,
                            "load segment %lld: negative layer_stride %lld",
                            (long long)i, (long long)s->layer_stride);
        }
    }
    if (nseg < 2) {
        return KVB_OK;
    }
    const kvb_load_seg **order = malloc((size_t)nseg * sizeof *order);
    if (order == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "load segments: out of memory");
    }
    for (int64_t i = 0; i < nseg; i++) {
        order[i] = &segs[i];
    }
    qsort(order, (size_t)nseg, sizeof *order, cmp_seg_start);
    kvb_status st = KVB_OK;
    for (int64_t i = 1; i < nseg; i++) {
        const kvb_load_seg *p = order[i - 1];
        if (p->dst_start + p->num_tokens > order[i]->dst_start &&
            order[i]->num_tokens > 0 && p->num_tokens > 0) {
            st = kvb_fail(KVB_ERR_INVALID,
                          "load segments %lld and %lld overlap at row %lld",
                          (long long)(p - segs), (long long)(order[i] - segs),
                          (long long)order[i]->dst_start);
            break;
        }
    }
    free(order);
    return st;
}

/* Copies each segment's rows of `layer` into the staging buffer (unless
 * its k0 is NULL: rows already there) and re-rotates the keys in place.
 * See kvblend.h for the contract. */
kvb_status kvb_cpu_load_rotate(const kvb_load_seg *segs, int64_t nseg,
                               int32_t layer, void *dst_k, void *dst_v,
                               const int64_t *dst_pos, int64_t num_rows,
                               int32_t num_kv_heads, int32_t head_size,
                               kvb_dtype dtype, const kvb_rope *rope)
{
    kvb_status st = kvb_check_dtype(dtype, "kvb_cpu_load_rotate");
    if (st != KVB_OK) {
        return st;
    }
    if (nseg < 0 || (nseg > 0 && segs == NULL) || layer < 0 ||
        num_rows < 0 || num_kv_heads <= 0 || head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_load_rotate: bad arguments (nseg=%lld, "
                        "layer=%d, num_rows=%lld, num_kv_heads=%d, "
                        "head_size=%d)",
                        (long long)nseg, (int)layer, (long long)num_rows,
                        (int)num_kv_heads, (int)head_size);
    }
    if (nseg == 0) {
        return KVB_OK;
    }
    if (dst_k == NULL || dst_v == NULL || dst_pos == NULL || rope == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_load_rotate: NULL dst_k, dst_v, dst_pos or "
                        "rope");
    }
    st = check_load_segs(segs, nseg, num_rows);
    if (st != KVB_OK) {
        return st;
    }
    size_t row = (size_t)num_kv_heads * (size_t)head_size *
                 kvb_dtype_size(dtype);
    for (int64_t i = 0; i < nseg; i++) {
        const kvb_load_seg *s = &segs[i];
        if (s->num_tokens == 0) {
            continue;
        }
        size_t off = (size_t)layer * (size_t)s->layer_stride *
                     kvb_dtype_size(dtype);
        char *dk = (char *)dst_k + (size_t)s->dst_start * row;
        char *dv = (char *)dst_v + (size_t)s->dst_start * row;
        if (s->k0 != NULL) {
            memcpy(dk, (const char *)s->k0 + off,
                   (size_t)s->num_tokens * row);
            memcpy(dv, (const char *)s->v0 + off,
                   (size_t)s->num_tokens * row);
        }
        st = kvb_cpu_rerotate(dk, s->num_tokens, num_kv_heads, head_size,
                              dtype, rope, s->src_pos, dst_pos + s->dst_start);
        if (st != KVB_OK) {
            return st;
        }
    }
    return KVB_OK;
}
