/*
 * fuzz_connector.c: libFuzzer target for the connector's request
 * lifecycle on the CPU path.
 *
 * A tiny model (2 layers, 2 KV heads of size 8, f32 or bf16, NeoX or GPT-J
 * RoPE over all or half of each head) and a host paged cache of 64 slots
 * back one connector with a store budget of a few dozen rows, so entries
 * are evicted.  The input is a program: byte 0 picks the model and config,
 * then each op byte picks one of set_separator, lookup, begin, load_layer,
 * save_layer (valid slot mappings, -1 padding, out-of-range slots, short
 * mappings), commit, finish, store clear, or a whole forward pass, and the
 * following bytes are its arguments.  Prompts are raw tokens or chunks from
 * a fixed pool joined by the separator, in one of three namespaces.
 *
 * Properties: every call returns KVB_OK or KVB_ERR_INVALID (with a
 * message); a request's blend_end lies in [0, n) (0 for an empty prompt)
 * and its forced mask and counts agree; a lookup's segments are in range
 * and its reuse_end is the end of the last hit capped at n - 1; every row a
 * load fills holds the stored entry's row re-rotated from the entry's
 * positions to the row's position, and the entry holds what the cache held
 * for that token when it was saved; rows a load does not fill are left
 * alone; at the end the store is within its budget and empties on clear.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define L 2
#define H 2
#define D 8
#define ROW (H * D)
#define BS 4
#define NB 16
#define NSLOTS (NB * BS) /* a power of two: odd strides permute the slots */
#define MAX_N 48
#define MAX_REQ 3
#define BUDGET_BYTES 12288.0

/* ---- input reader --------------------------------------------------------- */

typedef struct reader {
    const uint8_t *p;
    size_t left;
} reader;

/* Next input byte, 0 once the input is used up. */
static uint8_t next(reader *r)
{
    if (r->left == 0) {
        return 0;
    }
    r->left--;
    return *r->p++;
}

/* ---- checks ----------------------------------------------------------------- */

/* Aborts with a message: libFuzzer reports the input as a crash. */
static void fail(const char *what, long long a, long long b)
{
    fprintf(stderr, "fuzz_connector: %s (%lld, %lld; last error \"%s\")\n",
            what, a, b, kvb_last_error());
    abort();
}

/* A call returned: it must be OK, or INVALID with a message. */
static void check_status(kvb_status st, const char *call)
{
    if (st == KVB_OK) {
        return;
    }
    if (st != KVB_ERR_INVALID || kvb_last_error()[0] == '\0') {
        fprintf(stderr, "fuzz_connector: %s returned %s (\"%s\")\n", call,
                kvb_status_str(st), kvb_last_error());
        abort();
    }
}

/* ---- the model and the paged cache ----------------------------------------- */

typedef struct harness {
    kvb_connector *conn;
    kvb_model_desc model;
    float inv_freq[D / 2];
    int blending;
    int32_t sep[3];
    int64_t sep_len;
    /* The paged cache of one layer: [2][NSLOTS][ROW] elements (K plane,
     * then V plane) of the model's dtype; rewritten before each save. */
    union {
        float f32[2][NSLOTS][ROW];
        uint16_t bf16[2][NSLOTS][ROW];
    } cache;
    struct {
        kvb_request *req;
        int32_t tokens[MAX_N];
        int64_t n;
        kvb_span segs[MAX_N];
        int64_t nseg;
        uint64_t ns;
    } reqs[MAX_REQ];
} harness;

static harness g;

/* Element (layer, kv, token, h, d) of a forward pass: what the engine
 * writes into the cache for that token, whatever its slot. */
static float val(int layer, int kv, int32_t tok, int h, int d)
{
    return (float)sin(0.37 * tok + 1.3 * layer + 0.7 * kv + 0.11 * h +
                      0.05 * d);
}

/* f32 -> bf16 by truncation, and back. */
static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element e of row `row` of a tensor of the model's dtype, as float. */
static float elem(const void *base, int64_t row, int e)
{
    if (g.model.dtype == KVB_DTYPE_F32) {
        return ((const float *)base)[row * ROW + e];
    }
    return from_bf16(((const uint16_t *)base)[row * ROW + e]);
}

/* The value a forward pass gives element e of a row, in the cache dtype. */
static float stored_val(int layer, int kv, int32_t tok, int e)
{
    float v = val(layer, kv, tok, e / D, e % D);
    return g.model.dtype == KVB_DTYPE_F32 ? v : from_bf16(to_bf16(v));
}

/* Describes the cache to save_layer. */
static kvb_paged_layout layout_of(void)
{
    kvb_paged_layout lay;
    memset(&lay, 0, sizeof lay);
    size_t es = kvb_dtype_size(g.model.dtype);
    lay.k_base = &g.cache;
    lay.v_base = (char *)&g.cache + (size_t)NSLOTS * ROW * es;
    lay.block_stride = BS * ROW;
    lay.token_stride = ROW;
    lay.head_stride = D;
    lay.dim_stride = 1;
    lay.num_blocks = NB;
    lay.block_size = BS;
    lay.num_kv_heads = H;
    lay.head_size = D;
    lay.dtype = g.model.dtype;
    lay.device = -1;
    return lay;
}

/* Writes layer `layer` of the tokens into the cache at their slots. */
static void forward(int layer, const int32_t *tok, int64_t n,
                    const int64_t *slots)
{
    for (int64_t i = 0; i < n; i++) {
        if (slots[i] < 0 || slots[i] >= NSLOTS) {
            continue;
        }
        for (int kv = 0; kv < 2; kv++) {
            for (int e = 0; e < ROW; e++) {
                float v = val(layer, kv, tok[i], e / D, e % D);
                if (g.model.dtype == KVB_DTYPE_F32) {
                    g.cache.f32[kv][slots[i]][e] = v;
                } else {
                    g.cache.bf16[kv][slots[i]][e] = to_bf16(v);
                }
            }
        }
    }
}

/* Creates the connector: byte `cfgb` picks blending, dtype, RoPE style,
 * rotary dims and checksums. */
static int setup(uint8_t cfgb)
{
    memset(&g, 0, sizeof g);
    kvb_config cfg;
    kvb_config_init(&cfg);
    g.blending = (cfgb & 3) != 3; /* mostly on */
    cfg.enable_blending = g.blending;
    cfg.verify_checksums = (cfgb >> 5) & 1;
    cfg.max_local_cpu_size_gb = BUDGET_BYTES / 1073741824.0;
    cfg.log_level = KVB_LOG_ERROR; /* "no room" warnings are expected */
    cfg.num_threads = 1;
    kvb_model_desc *m = &g.model;
    m->num_layers = L;
    m->num_q_heads = 2 * H;
    m->num_kv_heads = H;
    m->head_size = D;
    m->dtype = (cfgb >> 2) & 1 ? KVB_DTYPE_BF16 : KVB_DTYPE_F32;
    m->rope.rotary_dim = (cfgb >> 4) & 1 ? D / 2 : D;
    m->rope.style = (cfgb >> 3) & 1 ? KVB_ROPE_GPTJ : KVB_ROPE_NEOX;
    for (int i = 0; i < m->rope.rotary_dim / 2; i++) {
        g.inv_freq[i] = (float)pow(10000.0, -2.0 * i / m->rope.rotary_dim);
    }
    m->rope.inv_freq = g.inv_freq;
    m->rope.attention_factor = 1.0f;
    if (kvb_connector_create(&cfg, m, -1, &g.conn) != KVB_OK) {
        fail("creating the connector", 0, 0);
    }
    g.sep[0] = 99;
    g.sep[1] = 98;
    g.sep_len = 2;
    check_status(kvb_connector_set_separator(g.conn, g.sep, g.sep_len),
                 "set_separator");
    return 0;
}

/* ---- prompts ------------------------------------------------------------------ */

/* Chunks prompts are built from (distinct from the separators' tokens). */
static const int32_t pool[6][5] = {
    {10, 11, 12, 13, 14}, {20, 21}, {30, 31, 32}, {40}, {50, 51, 52, 53}, {60, 61, 62},
};
static const int pool_len[6] = {5, 2, 3, 1, 4, 3};

/* Builds a prompt: raw tokens over a small alphabet that contains the
 * separators' tokens, or pool chunks joined by the current separator. */
static int64_t make_prompt(reader *r, int32_t *tok)
{
    uint8_t mode = next(r);
    int64_t n = 0;
    if (mode & 1) {
        int64_t len = next(r) % (MAX_N + 1);
        for (int64_t i = 0; i < len; i++) {
            uint8_t b = next(r);
            tok[n++] = b & 0x80 ? 96 + (b & 3) : 10 + (b % 8);
        }
        return n;
    }
    int chunks = 1 + (mode >> 1) % 5;
    for (int c = 0; c < chunks; c++) {
        if (c > 0) {
            for (int64_t j = 0; j < g.sep_len && n < MAX_N; j++) {
                tok[n++] = g.sep[j];
            }
        }
        int k = next(r) % 6;
        for (int j = 0; j < pool_len[k] && n < MAX_N; j++) {
            tok[n++] = pool[k][j];
        }
    }
    return n;
}

/* One of three tenant namespaces. */
static uint64_t pick_ns(reader *r)
{
    switch (next(r) % 3) {
    case 0:
        return 0;
    case 1:
        return kvb_namespace("a", 1);
    default:
        return kvb_namespace("b", 1);
    }
}

/* Segments of a prompt as the connector forms them with no explicit spans
 * (the harness mirrors the separator; one thread, so it cannot change
 * between the connector's split and this one). */
static int64_t split(const int32_t *tok, int64_t n, kvb_span *segs)
{
    int64_t count = 0;
    if (g.sep_len == 0 || n < g.sep_len || n == 0) {
        return 0;
    }
    if (kvb_segment_split(tok, n, g.sep, g.sep_len, segs, MAX_N, &count) !=
        KVB_OK) {
        fail("splitting a prompt the connector accepted", n, count);
    }
    return count;
}

/* Reads explicit spans (maybe invalid ones): NULL for "use the separator". */
static const kvb_span *make_spans(reader *r, int64_t n, kvb_span *spans,
                                  int64_t *n_spans)
{
    uint8_t b = next(r);
    *n_spans = 0;
    if ((b & 3) != 3) {
        return NULL;
    }
    int64_t count = (b >> 2) % 5;
    int64_t at = 0;
    for (int64_t i = 0; i < count; i++) {
        uint8_t s = next(r), e = next(r);
        if (s & 0x80) { /* anything around the prompt */
            spans[i].start = (int64_t)(s % (n + 3)) - 1;
            spans[i].end = (int64_t)(e % (n + 3)) - 1;
        } else { /* sorted, in range unless the prompt runs out */
            spans[i].start = at + s % 3;
            spans[i].end = spans[i].start + 1 + e % 6;
            at = spans[i].end;
        }
    }
    *n_spans = count;
    return spans;
}

/* ---- ops ------------------------------------------------------------------------ */

/* lookup: checks segments, hit flags and reuse_end against the contract. */
static void op_lookup(reader *r)
{
    int32_t tok[MAX_N];
    int64_t n = make_prompt(r, tok);
    uint64_t ns = pick_ns(r);
    kvb_span spans_in[8];
    int64_t n_spans = 0;
    const kvb_span *spans = make_spans(r, n, spans_in, &n_spans);
    int64_t cap = next(r) % (MAX_N + 1);
    kvb_span *segs = malloc((size_t)(cap > 0 ? cap : 1) * sizeof *segs);
    uint8_t *hit = malloc((size_t)(cap > 0 ? cap : 1));
    int64_t n_segs = -1, reuse_end = -1;
    kvb_clear_error();
    kvb_status st = kvb_connector_lookup(g.conn, ns, tok, n, spans, n_spans,
                                         segs, hit, cap, &n_segs, &reuse_end);
    check_status(st, "lookup");
    if (st == KVB_OK) {
        if (n_segs < 0 || n_segs > cap) {
            fail("lookup: segment count outside [0, cap]", n_segs, cap);
        }
        int64_t end = 0;
        for (int64_t i = 0; i < n_segs; i++) {
            if (segs[i].start < 0 || segs[i].end > n ||
                segs[i].start >= segs[i].end ||
                (i > 0 && segs[i].start < segs[i - 1].end) || hit[i] > 1) {
                fail("lookup: bad segment", segs[i].start, segs[i].end);
            }
            if (hit[i] && g.blending) {
                end = segs[i].end;
            }
        }
        int64_t want = end < n ? end : (n > 0 ? n - 1 : 0);
        if (reuse_end != want) {
            fail("lookup: reuse_end is not the last hit's end", reuse_end,
                 want);
        }
    }
    free(segs);
    free(hit);
}

/* begin: a free request slot gets a request; checks blend_end, the forced
 * mask and the counts. */
static void op_begin(reader *r)
{
    int k = next(r) % MAX_REQ;
    if (g.reqs[k].req != NULL) {
        kvb_request_finish(g.reqs[k].req, next(r) & 1);
        g.reqs[k].req = NULL;
    }
    int32_t *tok = g.reqs[k].tokens;
    int64_t n = make_prompt(r, tok);
    uint64_t ns = pick_ns(r);
    kvb_span spans_in[8];
    int64_t n_spans = 0;
    const kvb_span *spans = make_spans(r, n, spans_in, &n_spans);
    uint8_t be = next(r);
    int64_t blend_end = be & 1 ? -1 : (int64_t)((be >> 1) % (n + 3)) - 1;
    int save = (next(r) & 3) != 0;
    /* The scheduler's view first: with nothing changed in between, begin
     * must find the same segments and reuse up to the same row. */
    kvb_span lsegs[MAX_N];
    uint8_t lhit[MAX_N];
    int64_t lnseg = -1, lreuse = -1;
    kvb_clear_error();
    kvb_status lst = kvb_connector_lookup(g.conn, ns, tok, n, spans, n_spans,
                                          lsegs, lhit, MAX_N, &lnseg, &lreuse);
    check_status(lst, "lookup");
    kvb_request *req = NULL;
    kvb_clear_error();
    kvb_status st = kvb_request_begin(g.conn, ns, tok, n, spans, n_spans,
                                      blend_end, save, &req);
    check_status(st, "begin");
    if ((st == KVB_OK) != (lst == KVB_OK) && !(st != KVB_OK && blend_end >= 0)) {
        fail("begin and lookup disagree on the prompt", st, lst);
    }
    if (st == KVB_OK && blend_end < 0 &&
        kvb_request_blend_end(req) != lreuse) {
        fail("begin's blend_end is not the lookup's reuse_end",
             kvb_request_blend_end(req), lreuse);
    }
    if (st != KVB_OK) {
        if (req != NULL) {
            fail("begin failed but returned a request", st, 0);
        }
        return;
    }
    int64_t got = kvb_request_blend_end(req);
    if (got < 0 || (n > 0 && got >= n) || (n == 0 && got != 0) ||
        (blend_end >= 0 && got != blend_end)) {
        fail("begin: blend_end out of [0, n) or not the promised one", got,
             n);
    }
    int64_t nseg = -1, nhit = -1, nforced = -1;
    check_status(kvb_request_counts(req, &nseg, &nhit, &nforced), "counts");
    const uint8_t *forced = kvb_request_forced(req);
    int64_t count = 0;
    for (int64_t i = 0; i < got; i++) {
        if (forced[i] > 1) {
            fail("begin: forced flag not 0 or 1", i, forced[i]);
        }
        count += forced[i];
    }
    if (count != nforced || nhit < 0 || nhit > nseg) {
        fail("begin: counts disagree with the forced mask", count, nforced);
    }
    g.reqs[k].req = req;
    g.reqs[k].n = n;
    g.reqs[k].ns = ns;
    if (spans != NULL) {
        memcpy(g.reqs[k].segs, spans, (size_t)n_spans * sizeof *spans);
        g.reqs[k].nseg = n_spans;
    } else {
        g.reqs[k].nseg = split(tok, n, g.reqs[k].segs);
    }
    if (g.reqs[k].nseg != nseg) {
        fail("begin: segment count differs from the split", nseg,
             g.reqs[k].nseg);
    }
}

/* Checks one loaded row against the entry it came from: the entry's rows
 * are what the cache held for the token, and the loaded K is the entry's K
 * re-rotated from the entry's position to `row`. */
static void check_row(const void *k, const void *v, int64_t row, int layer,
                      kvb_entry *e, int64_t t, int32_t tok)
{
    const void *ek = kvb_entry_k(e, layer), *ev = kvb_entry_v(e, layer);
    float ref[ROW];
    for (int j = 0; j < ROW; j++) {
        float sk = elem(ek, t, j), sv = elem(ev, t, j);
        if (sk != stored_val(layer, 0, tok, j) ||
            sv != stored_val(layer, 1, tok, j)) {
            fail("a stored row is not what the cache held for its token",
                 row, j);
        }
        if (elem(v, row, j) != sv) {
            fail("a loaded V row differs from the stored one", row, j);
        }
        ref[j] = sk;
    }
    int64_t old = kvb_entry_positions(e)[t], np = row;
    if (kvb_cpu_rerotate(ref, 1, H, D, KVB_DTYPE_F32, &g.model.rope, &old,
                         &np) != KVB_OK) {
        fail("rerotating a reference row", old, np);
    }
    float tol = g.model.dtype == KVB_DTYPE_F32 ? 1e-5f : 2e-2f;
    for (int j = 0; j < ROW; j++) {
        float got = elem(k, row, j);
        if (!isfinite(got) || fabsf(got - ref[j]) > tol) {
            fail("a loaded K row is not the stored row re-rotated", row, j);
        }
    }
}

/* load_layer into buffers of exactly blend_end rows (so an overrun is an
 * ASan report); checks filled rows against their entries and that forced
 * rows keep their sentinel. */
static void op_load(reader *r)
{
    int k = next(r) % MAX_REQ;
    kvb_request *req = g.reqs[k].req;
    if (req == NULL) {
        return;
    }
    int layer = (int)(next(r) % (L + 1)); /* L is out of range */
    int64_t be = kvb_request_blend_end(req);
    size_t es = kvb_dtype_size(g.model.dtype);
    size_t bytes = (size_t)(be > 0 ? be : 1) * ROW * es;
    unsigned char *dk = malloc(bytes), *dv = malloc(bytes);
    memset(dk, 0xff, bytes); /* NaN in f32 and bf16 */
    memset(dv, 0xff, bytes);
    kvb_clear_error();
    kvb_status st = kvb_request_load_layer(req, layer, dk, dv, NULL);
    check_status(st, "load_layer");
    if ((st == KVB_OK) != (layer < L)) {
        fail("load_layer: layer range not enforced", layer, st);
    }
    if (st == KVB_OK) {
        const uint8_t *forced = kvb_request_forced(req);
        for (int64_t row = 0; row < be; row++) {
            if (forced[row]) {
                for (size_t b = 0; b < ROW * es; b++) {
                    if (dk[(size_t)row * ROW * es + b] != 0xff ||
                        dv[(size_t)row * ROW * es + b] != 0xff) {
                        fail("load_layer wrote a forced row", row, layer);
                    }
                }
            }
        }
        for (int64_t i = 0; i < g.reqs[k].nseg; i++) {
            const kvb_span *s = &g.reqs[k].segs[i];
            if (s->start >= be || forced[s->start]) {
                continue; /* not reused (a hit's rows are all unforced) */
            }
            const int32_t *tok = g.reqs[k].tokens;
            kvb_entry *e = NULL;
            if (kvb_store_acquire(kvb_connector_store(g.conn), g.reqs[k].ns,
                                  tok + s->start, s->end - s->start,
                                  &e) != KVB_OK || e == NULL) {
                fail("a segment the request reuses is no longer stored",
                     s->start, s->end);
            }
            for (int64_t row = s->start; row < s->end && row < be; row++) {
                check_row(dk, dv, row, layer, e, row - s->start, tok[row]);
            }
            kvb_store_unpin(kvb_connector_store(g.conn), e);
        }
    }
    free(dk);
    free(dv);
}

/* Builds a slot mapping for n tokens: distinct valid slots, optionally
 * with -1 padding at the end (rows not computed yet), one slot out of
 * range, or too few entries.  Returns the mapping's length. */
static int64_t make_slots(reader *r, int64_t n, int64_t *slots)
{
    uint8_t kind = next(r);
    int64_t base = next(r) % NSLOTS, stride = 2 * (next(r) % 8) + 1;
    for (int64_t i = 0; i < n; i++) {
        slots[i] = (base + i * stride) % NSLOTS;
    }
    switch (kind % 6) {
    case 2: /* the tail not computed yet */
        for (int64_t i = n > 0 ? next(r) % n : 0; i < n; i++) {
            slots[i] = -1;
        }
        break;
    case 3: /* scattered padding */
        for (int64_t i = 0; i < n; i++) {
            if (next(r) & 1) {
                slots[i] = -1;
            }
        }
        break;
    case 4: /* one slot past the cache (or far out) */
        if (n > 0) {
            slots[next(r) % n] = kind & 0x80 ? INT64_MAX : NSLOTS + (kind >> 3);
        }
        break;
    case 5: /* a mapping shorter than the prompt */
        return n > 0 ? next(r) % n : 0;
    default:
        break;
    }
    return n;
}

/* save_layer: the harness "computes" the layer into the cache first. */
static void op_save(reader *r)
{
    int k = next(r) % MAX_REQ;
    kvb_request *req = g.reqs[k].req;
    if (req == NULL) {
        return;
    }
    int layer = (int)(next(r) % (L + 1));
    int64_t slots[MAX_N + 1];
    int64_t ns = make_slots(r, g.reqs[k].n, slots);
    forward(layer < L ? layer : 0, g.reqs[k].tokens, ns, slots);
    kvb_paged_layout lay = layout_of();
    kvb_clear_error();
    kvb_status st = kvb_request_save_layer(req, layer, &lay,
                                           ns > 0 ? slots : NULL, ns, NULL);
    check_status(st, "save_layer");
}

/* A whole step: every layer saved with one valid mapping, then finish with
 * a commit (the common path, so entries get stored quickly). */
static void op_forward(reader *r)
{
    int k = next(r) % MAX_REQ;
    kvb_request *req = g.reqs[k].req;
    if (req == NULL) {
        return;
    }
    int64_t slots[MAX_N + 1];
    int64_t base = next(r) % NSLOTS;
    for (int64_t i = 0; i < g.reqs[k].n; i++) {
        slots[i] = (base + i) % NSLOTS;
    }
    kvb_paged_layout lay = layout_of();
    for (int layer = 0; layer < L; layer++) {
        forward(layer, g.reqs[k].tokens, g.reqs[k].n, slots);
        kvb_clear_error();
        check_status(kvb_request_save_layer(req, layer, &lay, slots,
                                            g.reqs[k].n, NULL),
                     "save_layer");
    }
    kvb_request_finish(req, 1);
    g.reqs[k].req = NULL;
}

/* Runs the program in the input. */
static void run(reader *r)
{
    while (r->left > 0) {
        uint8_t op = next(r);
        switch (op % 10) {
        case 0: {
            int32_t sep[3];
            int64_t len = next(r) % 4;
            for (int64_t j = 0; j < len; j++) {
                uint8_t b = next(r);
                sep[j] = b & 0x80 ? 96 + (b & 3) : 98 + (b & 1);
            }
            kvb_clear_error();
            check_status(kvb_connector_set_separator(g.conn, sep, len),
                         "set_separator");
            memcpy(g.sep, sep, (size_t)len * sizeof *sep);
            g.sep_len = len;
            break;
        }
        case 1:
        case 9:
            op_lookup(r);
            break;
        case 2:
            op_begin(r);
            break;
        case 3:
            op_load(r);
            break;
        case 4:
            op_save(r);
            break;
        case 5: {
            int k = next(r) % MAX_REQ;
            int64_t committed = -1;
            if (g.reqs[k].req != NULL) {
                kvb_clear_error();
                check_status(kvb_request_commit(g.reqs[k].req, &committed),
                             "commit");
                if (committed < 0 || committed > g.reqs[k].nseg) {
                    fail("commit: count out of range", committed,
                         g.reqs[k].nseg);
                }
            }
            break;
        }
        case 6: {
            int k = next(r) % MAX_REQ;
            kvb_request_finish(g.reqs[k].req, next(r) & 1);
            g.reqs[k].req = NULL;
            break;
        }
        case 7:
            check_status(kvb_store_clear(kvb_connector_store(g.conn)),
                         "store_clear");
            break;
        case 8:
            op_forward(r);
            break;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    reader r = {data + 1, size - 1};
    setup(data[0]);
    run(&r);
    for (int k = 0; k < MAX_REQ; k++) {
        kvb_request_finish(g.reqs[k].req, k & 1);
    }
    kvb_store *store = kvb_connector_store(g.conn);
    kvb_store_stats st;
    check_status(kvb_store_get_stats(store, &st), "get_stats");
    if ((double)st.host_bytes > BUDGET_BYTES || st.num_entries < 0) {
        fail("store over budget", (long long)st.host_bytes, st.num_entries);
    }
    check_status(kvb_store_clear(store), "store_clear");
    check_status(kvb_store_get_stats(store, &st), "get_stats");
    if (st.num_entries != 0 || st.host_bytes != 0) {
        fail("entries left after every request ended and a clear",
             st.num_entries, (long long)st.host_bytes);
    }
    kvb_connector_free(g.conn);
    return 0;
}
