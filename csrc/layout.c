/*
 * layout.c: checks of the paged-KV layout descriptor and of slot mappings.
 *
 * The paged cache belongs to the engine; kvblend only describes it (two base
 * pointers, four element strides for K and optionally four for V, the
 * block geometry) and must never read or
 * write outside it.  Every op that touches the cache validates the
 * descriptor and the slots once, through these two functions, before its
 * hot loop; the loops themselves then need no bounds checks.
 */
#include "internal.h"

/* Fails with KVB_ERR_INVALID when `value` is not > 0, naming `field`. */
static kvb_status layout_check_positive(const char *field, int64_t value)
{
    if (value <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->%s=%lld is invalid (expected > 0)", field,
                        (long long)value);
    }
    return KVB_OK;
}

/* Fails with KVB_ERR_INVALID when the stride `value` is negative, naming
 * `field`.  Zero is allowed (a broadcast dimension is legal if odd). */
static kvb_status layout_check_stride(const char *field, int64_t value)
{
    if (value < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->%s=%lld is invalid (expected >= 0; strides "
                        "are in elements)",
                        field, (long long)value);
    }
    return KVB_OK;
}

/* Adds (count-1)*stride to *acc; returns 0 on int64 overflow.  count and
 * stride are already known to be positive and non-negative. */
static int layout_extent_add(int64_t *acc, int64_t count, int64_t stride)
{
    int64_t term;
    if (__builtin_mul_overflow(count - 1, stride, &term)) {
        return 0;
    }
    return !__builtin_add_overflow(*acc, term, acc);
}

/*
 * Reads K's and V's element strides from a layout.  V's are its own four
 * fields unless all four are 0, which means "the same as K's" (the meaning
 * a zero-initialised descriptor had before V could differ).  Either output
 * may be NULL; the layout must be non-NULL.
 */
void kvb_layout_strides(const kvb_paged_layout *layout, kvb_plane_strides *k,
                        kvb_plane_strides *v)
{
    kvb_plane_strides ks = {layout->block_stride, layout->token_stride,
                            layout->head_stride, layout->dim_stride};
    kvb_plane_strides vs = {layout->v_block_stride, layout->v_token_stride,
                            layout->v_head_stride, layout->v_dim_stride};
    if (vs.block == 0 && vs.token == 0 && vs.head == 0 && vs.dim == 0) {
        vs = ks;
    }
    if (k != NULL) {
        *k = ks;
    }
    if (v != NULL) {
        *v = vs;
    }
}

/*
 * Checks that the offset of the last element of one plane, with strides
 * `s`, fits in int64.  `plane` ("K" or "V") and `prefix` ("" or "v_") name
 * the fields in the message.  Returns KVB_OK or KVB_ERR_INVALID.
 */
static kvb_status layout_check_extent(const kvb_paged_layout *layout,
                                      const kvb_plane_strides *s,
                                      const char *plane, const char *prefix)
{
    int64_t extent = 0;
    if (!layout_extent_add(&extent, layout->num_blocks, s->block) ||
        !layout_extent_add(&extent, layout->block_size, s->token) ||
        !layout_extent_add(&extent, layout->num_kv_heads, s->head) ||
        !layout_extent_add(&extent, layout->head_size, s->dim)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout extent overflows int64 for %s (num_blocks=%lld, "
                        "block_size=%lld, %sblock_stride=%lld, "
                        "%stoken_stride=%lld, %shead_stride=%lld, "
                        "%sdim_stride=%lld)",
                        plane, (long long)layout->num_blocks,
                        (long long)layout->block_size, prefix,
                        (long long)s->block, prefix, (long long)s->token,
                        prefix, (long long)s->head, prefix,
                        (long long)s->dim);
    }
    return KVB_OK;
}

/*
 * Validates a paged-layout descriptor: non-NULL layout and bases, positive
 * num_blocks, block_size, num_kv_heads and head_size, non-negative strides
 * (K's, and V's own when set; all four V strides 0 means "as K"), a known
 * dtype, device >= -1, and element extents of K and V (the offset of the
 * last element) and a slot count that fit in int64.  Returns KVB_OK or
 * KVB_ERR_INVALID with a message naming the first bad field and its value.
 */
kvb_status kvb_layout_validate(const kvb_paged_layout *layout)
{
    kvb_status st;
    if (layout == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "layout is NULL");
    }
    if (layout->k_base == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->k_base is NULL (expected the K cache "
                        "pointer)");
    }
    if (layout->v_base == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->v_base is NULL (expected the V cache "
                        "pointer)");
    }
    if ((st = layout_check_positive("num_blocks", layout->num_blocks)) ||
        (st = layout_check_positive("block_size", layout->block_size)) ||
        (st = layout_check_positive("num_kv_heads", layout->num_kv_heads)) ||
        (st = layout_check_positive("head_size", layout->head_size))) {
        return st;
    }
    if ((st = layout_check_stride("block_stride", layout->block_stride)) ||
        (st = layout_check_stride("token_stride", layout->token_stride)) ||
        (st = layout_check_stride("head_stride", layout->head_stride)) ||
        (st = layout_check_stride("dim_stride", layout->dim_stride)) ||
        (st = layout_check_stride("v_block_stride",
                                  layout->v_block_stride)) ||
        (st = layout_check_stride("v_token_stride",
                                  layout->v_token_stride)) ||
        (st = layout_check_stride("v_head_stride", layout->v_head_stride)) ||
        (st = layout_check_stride("v_dim_stride", layout->v_dim_stride))) {
        return st;
    }
    if (kvb_dtype_size(layout->dtype) == 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->dtype=%d is unknown (expected 0=f32, 1=f16, "
                        "2=bf16)",
                        (int)layout->dtype);
    }
    if (layout->device < -1) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout->device=%d is invalid (expected -1 for host "
                        "memory or a CUDA device ordinal >= 0)",
                        (int)layout->device);
    }
    kvb_plane_strides ks, vs;
    kvb_layout_strides(layout, &ks, &vs);
    int v_own = layout->v_block_stride != 0 || layout->v_token_stride != 0 ||
                layout->v_head_stride != 0 || layout->v_dim_stride != 0;
    if ((st = layout_check_extent(layout, &ks, "K", "")) ||
        (st = layout_check_extent(layout, &vs, "V", v_own ? "v_" : ""))) {
        return st;
    }
    int64_t slots;
    if (__builtin_mul_overflow(layout->num_blocks, layout->block_size,
                               &slots)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "layout slot count overflows int64 (num_blocks=%lld, "
                        "block_size=%lld)",
                        (long long)layout->num_blocks,
                        (long long)layout->block_size);
    }
    return KVB_OK;
}

/* Checks the arguments gather and scatter share; see internal.h. */
kvb_status kvb_check_copy_args(const char *fn, const kvb_paged_layout *layout,
                               const int64_t *slots, int64_t n, int on_device)
{
    if (layout == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: layout is NULL", fn);
    }
    kvb_status st = kvb_layout_validate(layout);
    if (st != KVB_OK) {
        return st;
    }
    if (!on_device && layout->device >= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: layout.device=%d: the CPU op needs host memory "
                        "(device -1)",
                        fn, (int)layout->device);
    }
    if (on_device && layout->device < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: layout.device=%d: the CUDA op needs device "
                        "memory (a CUDA device ordinal >= 0)",
                        fn, (int)layout->device);
    }
    if (n < 0) {
        return kvb_fail(KVB_ERR_INVALID, "%s: n=%lld: expected n >= 0", fn,
                        (long long)n);
    }
    if (n > 0 && slots == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: slots is NULL with n=%lld", fn,
                        (long long)n);
    }
    return KVB_OK;
}

/*
 * Checks a slot mapping against a layout: validates the layout, then every
 * slots[i] must be < num_blocks*block_size; negative slots are padding and
 * pass.  `slots` may be NULL only when n == 0; n < 0 is invalid.  The
 * message for an out-of-range slot names its index, its value and the
 * limit.  Host memory only (the caller copies device slot arrays first or
 * checks them on the host side where they were built).
 */
kvb_status kvb_layout_check_slots(const kvb_paged_layout *layout,
                                  const int64_t *slots, int64_t n)
{
    kvb_status st = kvb_layout_validate(layout);
    if (st != KVB_OK) {
        return st;
    }
    if (n < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "n=%lld is invalid (expected the number of slots, "
                        ">= 0)",
                        (long long)n);
    }
    if (n > 0 && slots == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "slots is NULL with n=%lld (expected %lld slot "
                        "indices)",
                        (long long)n, (long long)n);
    }
    int64_t limit = layout->num_blocks * layout->block_size;
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] >= limit) {
            return kvb_fail(KVB_ERR_INVALID,
                            "slots[%lld]=%lld is out of range (expected < "
                            "num_blocks*block_size=%lld, or negative for "
                            "padding)",
                            (long long)i, (long long)slots[i],
                            (long long)limit);
        }
    }
    return KVB_OK;
}
