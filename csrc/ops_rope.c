/*
 * ops_rope.c: re-rotation of cached keys from the positions they were
 * stored at to the positions they take in a new prompt (CPU).
 *
 * RoPE rotations compose: R(new) = R(new - old) * R(old), so keys rotated
 * at old_pos become keys rotated at new_pos by one rotation through
 * (new_pos - old_pos) * inv_freq.  The angle is formed in double, because
 * positions reach 1e5+ and a float product would lose whole radians' worth
 * of precision, and cos/sin are taken in double.
 *
 * attention_factor (YaRN's mscale) is deliberately not applied here: stored
 * keys already carry it from the forward pass that produced them, and a
 * rotation must not scale them a second time.  The field exists for ops
 * that apply RoPE to raw projections, which this op never does.
 */
#include <math.h>

#include "internal.h"

/* Everything one parallel range of a re-rotation needs. */
typedef struct kvb_rope_job {
    void *k;
    int64_t num_heads;
    int64_t head_size;
    kvb_dtype dtype;
    const kvb_rope *rope;
    const int64_t *old_pos;
    const int64_t *new_pos;
} kvb_rope_job;

/* Largest rotary_dim / 2 handled with stack tables. */
#define KVB_ROPE_MAX_PAIRS 1024

/* Returns the element index of the two dims rotated together as pair p:
 * (p, p + half) for NeoX, (2p, 2p + 1) for GPT-J. */
static void kvb_rope_pair(kvb_rope_style style, int64_t half, int64_t p,
                          int64_t *x, int64_t *y)
{
    if (style == KVB_ROPE_GPTJ) {
        *x = 2 * p;
        *y = 2 * p + 1;
    } else {
        *x = p;
        *y = p + half;
    }
}

/* Parallel body: re-rotates tokens [begin, end).  cos/sin of a token are
 * computed once for all its heads and reused while consecutive tokens
 * share the same position delta (the common case: a chunk moved as a
 * whole).  The rotation itself is done in double and rounded once into
 * the dtype. */
static void kvb_rope_range(int64_t begin, int64_t end, void *ctx)
{
    const kvb_rope_job *job = ctx;
    const int64_t half = job->rope->rotary_dim / 2;
    const int64_t H = job->num_heads;
    const int64_t D = job->head_size;
    const float *inv_freq = job->rope->inv_freq;
    double cs[KVB_ROPE_MAX_PAIRS];
    double sn[KVB_ROPE_MAX_PAIRS];
    int have = 0;
    double last_delta = 0.0;
    for (int64_t i = begin; i < end; i++) {
        /* Exact for positions below 2^53, and free of integer overflow. */
        double delta = (double)job->new_pos[i] - (double)job->old_pos[i];
        if (delta == 0.0) {
            continue; /* the identity: leave the row bit-exact */
        }
        if (!have || delta != last_delta) {
            for (int64_t p = 0; p < half; p++) {
                double angle = delta * (double)inv_freq[p];
                cs[p] = cos(angle);
                sn[p] = sin(angle);
            }
            have = 1;
            last_delta = delta;
        }
        for (int64_t h = 0; h < H; h++) {
            int64_t base = (i * H + h) * D;
            for (int64_t p = 0; p < half; p++) {
                int64_t xi, yi;
                kvb_rope_pair(job->rope->style, half, p, &xi, &yi);
                double x = kvb_load(job->k, base + xi, job->dtype);
                double y = kvb_load(job->k, base + yi, job->dtype);
                kvb_store_elem(job->k, base + xi, job->dtype,
                               (float)(x * cs[p] - y * sn[p]));
                kvb_store_elem(job->k, base + yi, job->dtype,
                               (float)(x * sn[p] + y * cs[p]));
            }
        }
    }
}

/* Re-rotates k [n, num_heads, head_size] in place from old_pos[i] to
 * new_pos[i] (see the file comment; attention_factor is not applied).
 * Dims [rotary_dim, head_size) are untouched, and tokens with equal old
 * and new positions are left bit-exact.  Bad arguments give
 * KVB_ERR_INVALID naming the argument; n == 0 touches no pointer but the
 * rope description. */
kvb_status kvb_cpu_rerotate(void *k, int64_t n, int32_t num_heads,
                            int32_t head_size, kvb_dtype dtype,
                            const kvb_rope *rope, const int64_t *old_pos,
                            const int64_t *new_pos)
{
    kvb_status st = kvb_check_dtype(dtype, "kvb_cpu_rerotate: dtype");
    if (st != KVB_OK) {
        return st;
    }
    if (rope == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_cpu_rerotate: rope is NULL");
    }
    st = kvb_check_rows("kvb_cpu_rerotate", n, num_heads, head_size);
    if (st != KVB_OK) {
        return st;
    }
    if (rope->rotary_dim <= 0 || rope->rotary_dim % 2 != 0 ||
        rope->rotary_dim > head_size) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_rerotate: rope.rotary_dim=%d: expected an "
                        "even value in (0, head_size=%d]",
                        (int)rope->rotary_dim, (int)head_size);
    }
    if (rope->rotary_dim / 2 > KVB_ROPE_MAX_PAIRS) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "kvb_cpu_rerotate: rope.rotary_dim=%d: at most %d "
                        "is supported",
                        (int)rope->rotary_dim, 2 * KVB_ROPE_MAX_PAIRS);
    }
    if (rope->style != KVB_ROPE_NEOX && rope->style != KVB_ROPE_GPTJ) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_rerotate: rope.style=%d: expected "
                        "KVB_ROPE_NEOX (0) or KVB_ROPE_GPTJ (1)",
                        (int)rope->style);
    }
    if (rope->inv_freq == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_rerotate: rope.inv_freq is NULL");
    }
    if (n > 0 && (k == NULL || old_pos == NULL || new_pos == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_cpu_rerotate: %s is NULL with n=%lld",
                        k == NULL ? "k" : old_pos == NULL ? "old_pos"
                                                          : "new_pos",
                        (long long)n);
    }
    kvb_rope_job job = {k,    num_heads, head_size, dtype,
                        rope, old_pos,   new_pos};
    int64_t per_token = (int64_t)num_heads * head_size;
    kvb_parallel_for(n, 1 + (1 << 15) / per_token, kvb_rope_range, &job);
    return KVB_OK;
}
