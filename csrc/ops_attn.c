/*
 * ops_attn.c: attention of a subset of queries over all keys with the exact
 * causal mask by position (CPU).  This is the hot spot of blending on a
 * machine without a GPU.
 *
 * Plan of one call:
 *   1. Keys are put in position order (an index permutation; none when they
 *      already are, the usual case), so the keys a query sees are a prefix:
 *      query i sees the first vis[i] = #{j : k_pos[j] <= q_pos[i]} keys.
 *   2. Queries are sorted by position and cut into blocks of about 64 query
 *      rows (block_q queries times the GQA group); queries of a block see
 *      nearly the same prefix.
 *   3. Work items are (query block, KV head); each processes all query heads
 *      sharing that KV head, so every K/V row is loaded once per group.
 *      Workers take items from a shared counter, longest first.  An item's
 *      result does not depend on the thread that computes it, so any thread
 *      count gives bit-identical output.
 *   4. The item kernel (ops_attn_kernel.h) is flash-style: fp32 key tiles,
 *      online softmax in base 2, fp32 accumulators.  It is compiled for
 *      AVX-512, AVX2+FMA and baseline x86-64 (or once, generically, on other
 *      machines) and picked at run time.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Keys per tile (a multiple of every vector width used). */
#define KVB_ATTN_BK 32
/* Head dims per PV step; head_size is padded to a multiple of it. */
#define KVB_ATTN_DBLK 32
/* Query rows (queries x group) a block aims for. */
#define KVB_ATTN_ROWS 64

typedef struct kvb_attn_ctx kvb_attn_ctx;

/* An item kernel: computes work item `item` with scratch `scr`. */
typedef void (*kvb_attn_item_fn)(const kvb_attn_ctx *c, int64_t item,
                                 float *scr);

/* Everything the workers share.  Arrays are owned by kvb_cpu_attention. */
struct kvb_attn_ctx {
    const void *q;
    const void *k;
    const void *v;
    void *out;
    kvb_dtype dtype;
    int64_t nq;
    int64_t num_q_heads;
    int64_t num_kv_heads;
    int64_t group;     /* num_q_heads / num_kv_heads */
    int64_t head_size;
    int64_t head_pad;  /* head_size rounded up to KVB_ATTN_DBLK */
    float qscale;      /* scale * log2(e) */
    const int64_t *k_order; /* keys in position order; NULL: identity */
    const int64_t *q_order; /* queries in position order */
    const int64_t *q_vis;   /* keys seen by q_order[i] */
    int64_t block_q;        /* queries per block */
    int64_t num_blocks;
    int64_t num_items;      /* num_blocks * num_kv_heads */
    int64_t next_item;      /* shared counter (atomic) */
    float *scratch;
    size_t scratch_floats;  /* per worker, a multiple of 16 */
    kvb_attn_item_fn item_fn;
};

/* One worker's scratch, carved from a float buffer. */
typedef struct kvb_attn_scratch {
    float *q;    /* [rows_pad, head_pad] pre-scaled queries */
    float *o;    /* [rows_pad, head_pad] output accumulators */
    float *p;    /* [rows_pad, BK] scores, then probabilities */
    float *kt;   /* [head_size, BK] key tile, transposed */
    float *vt;   /* [BK, head_pad] value tile */
    float *m;    /* [rows_pad] running max (base-2 logits) */
    float *l;    /* [rows_pad] running sum */
    int64_t *vis; /* [rows_pad] keys seen by each row */
} kvb_attn_scratch;

/* Rounds n floats up to a whole 64-byte line. */
static size_t kvb_attn_round16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* Carves one worker's scratch `base` into its arrays (every array starts on
 * a 64-byte boundary when base does) and returns the floats used.  `sp` may
 * be NULL to only measure. */
static size_t kvb_attn_scratch_layout(const kvb_attn_ctx *c, float *base,
                                      kvb_attn_scratch *sp)
{
    size_t rows = (size_t)((c->block_q * c->group + 3) & ~(int64_t)3);
    size_t dp = (size_t)c->head_pad;
    size_t sizes[8] = {
        rows * dp, rows * dp, rows * KVB_ATTN_BK,
        (size_t)c->head_size * KVB_ATTN_BK, KVB_ATTN_BK * dp, rows, rows,
        rows * sizeof(int64_t) / sizeof(float),
    };
    float *ptrs[8];
    size_t off = 0;
    for (int i = 0; i < 8; i++) {
        ptrs[i] = base ? base + off : NULL;
        off += kvb_attn_round16(sizes[i]);
    }
    if (sp != NULL) {
        sp->q = ptrs[0];
        sp->o = ptrs[1];
        sp->p = ptrs[2];
        sp->kt = ptrs[3];
        sp->vt = ptrs[4];
        sp->m = ptrs[5];
        sp->l = ptrs[6];
        sp->vis = (int64_t *)(void *)ptrs[7];
    }
    return off;
}

/* ---- item kernels, one per vector width ---------------------------------- */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KVB_ATTN_X86 1
#endif

/* optimize("fp-contract=fast") is a GCC attribute; clang warns that it is
 * unknown (an error under KVB_WERROR) and contracts within statements by
 * default anyway, so the generic kernel gets no attribute there. */
#if defined(__GNUC__) && !defined(__clang__)
#define KVB_FP_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define KVB_FP_CONTRACT
#endif

#define KVB_VW 4
#define KVB_QK_R 1
#define KVB_SFX(x) x##_v4
#define KVB_TARGET KVB_FP_CONTRACT
#include "ops_attn_kernel.h"
#undef KVB_VW
#undef KVB_QK_R
#undef KVB_SFX
#undef KVB_TARGET

#ifdef KVB_ATTN_X86
#define KVB_VW 8
#define KVB_QK_R 2
#define KVB_SFX(x) x##_avx2
#define KVB_TARGET \
    __attribute__((target("avx2,fma"), optimize("fp-contract=fast")))
#include "ops_attn_kernel.h"
#undef KVB_VW
#undef KVB_QK_R
#undef KVB_SFX
#undef KVB_TARGET

#define KVB_VW 16
#define KVB_QK_R 4
#define KVB_SFX(x) x##_avx512
#define KVB_TARGET \
    __attribute__((target("avx512f,avx2,fma"), optimize("fp-contract=fast")))
#include "ops_attn_kernel.h"
#undef KVB_VW
#undef KVB_QK_R
#undef KVB_SFX
#undef KVB_TARGET
#endif

/* Returns the widest item kernel this CPU runs. */
static kvb_attn_item_fn kvb_attn_pick_kernel(void)
{
#if defined(KVB_ATTN_FORCE_GENERIC) /* for testing the fallback kernel */
    return kvb_attn_item_v4;
#elif defined(KVB_ATTN_FORCE_AVX2) && defined(KVB_ATTN_X86)
    return kvb_attn_item_avx2;
#endif
#ifdef KVB_ATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        return kvb_attn_item_avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return kvb_attn_item_avx2;
    }
#endif
    return kvb_attn_item_v4;
}

/* Worker body: worker w (one per index of [begin, end)) takes items from
 * the shared counter until none is left. */
static void kvb_attn_worker(int64_t begin, int64_t end, void *ctx)
{
    kvb_attn_ctx *c = ctx;
    for (int64_t w = begin; w < end; w++) {
        float *scr = c->scratch + (size_t)w * c->scratch_floats;
        for (;;) {
            int64_t item = __atomic_fetch_add(&c->next_item, 1,
                                              __ATOMIC_RELAXED);
            if (item >= c->num_items) {
                break;
            }
            c->item_fn(c, item, scr);
        }
    }
}

/* A (position, index) pair for stable position sorts. */
typedef struct kvb_pos_idx {
    int64_t pos;
    int64_t idx;
} kvb_pos_idx;

/* qsort comparator: by position, then by index (so the sort is stable). */
static int kvb_pos_idx_cmp(const void *a, const void *b)
{
    const kvb_pos_idx *x = a, *y = b;
    if (x->pos != y->pos) {
        return x->pos < y->pos ? -1 : 1;
    }
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* Writes to order[0..n) the indices of pos[0..n) in stable ascending
 * position order and to sorted[0..n) the positions in that order, using
 * `tmp` (n pairs) as scratch. */
static void kvb_pos_sort(const int64_t *pos, int64_t n, kvb_pos_idx *tmp,
                         int64_t *order, int64_t *sorted)
{
    for (int64_t i = 0; i < n; i++) {
        tmp[i].pos = pos[i];
        tmp[i].idx = i;
    }
    qsort(tmp, (size_t)n, sizeof *tmp, kvb_pos_idx_cmp);
    for (int64_t i = 0; i < n; i++) {
        order[i] = tmp[i].idx;
        if (sorted != NULL) {
            sorted[i] = tmp[i].pos;
        }
    }
}

/* Returns the number of entries of the ascending array a[0..n) that are
 * <= x (an upper bound). */
static int64_t kvb_upper_bound(const int64_t *a, int64_t n, int64_t x)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Checks the arguments of kvb_cpu_attention; returns KVB_OK or
 * KVB_ERR_INVALID naming the first bad argument. */
static kvb_status kvb_attn_check(const void *q, const int64_t *q_pos,
                                 int64_t nq, const void *k, const void *v,
                                 const int64_t *k_pos, int64_t nk,
                                 int32_t num_q_heads, int32_t num_kv_heads,
                                 int32_t head_size, float scale,
                                 kvb_dtype dtype, const void *out)
{
    static const char fn[] = "kvb_cpu_attention";
    kvb_status st = kvb_check_dtype(dtype, "kvb_cpu_attention: dtype");
    if (st != KVB_OK) {
        return st;
    }
    if (nq < 0 || nk < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: nq=%lld nk=%lld: expected both >= 0", fn,
                        (long long)nq, (long long)nk);
    }
    if (num_q_heads <= 0 || num_kv_heads <= 0 || head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: num_q_heads=%d num_kv_heads=%d head_size=%d: "
                        "expected all > 0",
                        fn, (int)num_q_heads, (int)num_kv_heads,
                        (int)head_size);
    }
    if (num_q_heads % num_kv_heads != 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: num_q_heads=%d is not a multiple of "
                        "num_kv_heads=%d",
                        fn, (int)num_q_heads, (int)num_kv_heads);
    }
    if (!isfinite(scale)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: scale=%g: expected a finite value", fn,
                        (double)scale);
    }
    if (nq > 0) {
        const char *null = q == NULL       ? "q"
                           : q_pos == NULL ? "q_pos"
                           : out == NULL   ? "out"
                                           : NULL;
        if (null != NULL) {
            return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with nq=%lld",
                            fn, null, (long long)nq);
        }
    }
    if (nq > 0 && nk > 0) {
        const char *null = k == NULL       ? "k"
                           : v == NULL     ? "v"
                           : k_pos == NULL ? "k_pos"
                                           : NULL;
        if (null != NULL) {
            return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with nk=%lld",
                            fn, null, (long long)nk);
        }
    }
    return KVB_OK;
}

/* Attention of nq queries over nk keys with the mask k_pos[j] <= q_pos[i]
 * (see the header and the file comment).  Allocates its index arrays and
 * per-worker scratch for the duration of the call (KVB_ERR_NOMEM if that
 * fails); output rows of queries that see no key are zeros.  Positions need
 * not be sorted or distinct. */
kvb_status kvb_cpu_attention(const void *q, const int64_t *q_pos, int64_t nq,
                             const void *k, const void *v,
                             const int64_t *k_pos, int64_t nk,
                             int32_t num_q_heads, int32_t num_kv_heads,
                             int32_t head_size, float scale, kvb_dtype dtype,
                             void *out)
{
    kvb_status st = kvb_attn_check(q, q_pos, nq, k, v, k_pos, nk,
                                   num_q_heads, num_kv_heads, head_size,
                                   scale, dtype, out);
    if (st != KVB_OK || nq == 0) {
        return st;
    }
    kvb_attn_ctx c = {.q = q, .k = k, .v = v, .out = out, .dtype = dtype,
                      .nq = nq, .num_q_heads = num_q_heads,
                      .num_kv_heads = num_kv_heads,
                      .group = num_q_heads / num_kv_heads,
                      .head_size = head_size};
    c.head_pad = (head_size + KVB_ATTN_DBLK - 1) / KVB_ATTN_DBLK *
                 KVB_ATTN_DBLK;
    c.qscale = scale * 1.44269504088896340736f;
    c.block_q = c.group >= KVB_ATTN_ROWS ? 1 : KVB_ATTN_ROWS / c.group;
    if (c.block_q > nq) {
        c.block_q = nq;
    }
    c.num_blocks = (nq + c.block_q - 1) / c.block_q;
    c.num_items = c.num_blocks * num_kv_heads;
    c.item_fn = kvb_attn_pick_kernel();

    int64_t nsort = nq > nk ? nq : nk;
    int64_t threads = kvb_cpu_threads();
    if (threads > c.num_items) {
        threads = c.num_items;
    }
    c.scratch_floats = kvb_attn_scratch_layout(&c, NULL, NULL);
    kvb_pos_idx *tmp = malloc((size_t)nsort * sizeof *tmp);
    int64_t *idx = malloc((size_t)(2 * nk + 2 * nq) * sizeof *idx);
    size_t scratch_bytes = (size_t)threads * c.scratch_floats * sizeof(float);
    c.scratch = aligned_alloc(64, scratch_bytes);
    if (tmp == NULL || idx == NULL || c.scratch == NULL) {
        free(tmp);
        free(idx);
        free(c.scratch);
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_cpu_attention: cannot allocate scratch for "
                        "nq=%lld nk=%lld",
                        (long long)nq, (long long)nk);
    }
    int64_t *k_order = idx, *k_sorted = idx + nk;
    int64_t *q_order = idx + 2 * nk, *q_vis = idx + 2 * nk + nq;

    /* Keys in position order: usually already so, then no permutation. */
    const int64_t *kpos = k_pos;
    int sorted = 1;
    for (int64_t j = 1; j < nk && sorted; j++) {
        sorted = k_pos[j - 1] <= k_pos[j];
    }
    if (!sorted) {
        kvb_pos_sort(k_pos, nk, tmp, k_order, k_sorted);
        c.k_order = k_order;
        kpos = k_sorted;
    }
    kvb_pos_sort(q_pos, nq, tmp, q_order, NULL);
    for (int64_t i = 0; i < nq; i++) {
        q_vis[i] = nk > 0 ? kvb_upper_bound(kpos, nk, q_pos[q_order[i]]) : 0;
    }
    c.q_order = q_order;
    c.q_vis = q_vis;

    kvb_parallel_for(threads, 1, kvb_attn_worker, &c);

    free(tmp);
    free(idx);
    free(c.scratch);
    return KVB_OK;
}
