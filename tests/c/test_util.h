/*
 * test_util.h: helpers shared by the Check suites (tests/c) and the GPU
 * suite (tests/gpu): a deterministic random generator, temporary folders,
 * a log sink that records what kvblend logs, the paged cache layouts vLLM
 * has used, and small assertion helpers.
 *
 * Header-only: every function is `static inline`, so a suite that does not
 * use one gets no unused-function warning.  Include it before any system
 * header: it selects the POSIX 2008 interfaces (mkdtemp, lstat) the
 * helpers need.
 */
#pragma once

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L /* mkdtemp, lstat, pthread */
#endif

#include <check.h>
#include <dirent.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvblend.h"

/* Asserts that the string `s` contains `frag`, printing both on failure. */
#define ck_assert_has(s, frag) \
    ck_assert_msg(strstr((s), (frag)) != NULL, "'%s' lacks '%s'", (s), (frag))

/* Number of elements of an array (not a pointer). */
#define COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---------------------------------------------------------------- random */

/* The state of the generator below (one per test program; tests that run
 * in threads keep their own). */
static inline uint64_t *rng_state(void)
{
    static uint64_t state = 0x243f6a8885a308d3ull;
    return &state;
}

/* Seeds the generator: equal seeds give equal sequences. */
static inline void rng_seed(uint64_t s)
{
    *rng_state() = s * 2862933555777941757ull + 3037000493ull;
}

/* Returns 64 random bits (64-bit LCG; the high half is the better one, so
 * two steps make one value). */
static inline uint64_t rng_u64(void)
{
    uint64_t *g = rng_state();
    *g = *g * 6364136223846793005ull + 1442695040888963407ull;
    uint64_t hi = *g >> 32;
    *g = *g * 6364136223846793005ull + 1442695040888963407ull;
    return hi << 32 | *g >> 32;
}

/* Returns 32 random bits (the high half of one LCG step). */
static inline uint32_t rng_u32(void)
{
    uint64_t *g = rng_state();
    *g = *g * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*g >> 32);
}

/* Returns a uniform float in [-1, 1). */
static inline float rng_sym(void)
{
    return (float)((double)rng_u32() / 2147483648.0 - 1.0);
}

/* Returns a uniform double in [0, 1) with 53 random bits. */
static inline double rng_unit(void)
{
    return (double)(rng_u64() >> 11) / 9007199254740992.0;
}

/* Returns a uniform integer in [0, n); n must be positive. */
static inline int64_t rng_below(int64_t n)
{
    return (int64_t)(rng_u64() % (uint64_t)n);
}

/* Fills buf[0..n) with bytes determined by `seed` (xorshift64), so a
 * reader can check a buffer against its seed without keeping a copy. */
static inline void fill_pattern(unsigned char *buf, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = (unsigned char)(x >> 24);
    }
}

/* Returns a malloc'd buffer of n pattern bytes of `seed` (at least one
 * byte is allocated, so n may be 0); the caller frees it.  Fails the test
 * when out of memory. */
static inline unsigned char *pattern_blob(size_t n, uint64_t seed)
{
    unsigned char *b = malloc(n > 0 ? n : 1);
    ck_assert_ptr_nonnull(b);
    fill_pattern(b, n, seed);
    return b;
}

/* Returns 1 when buf[0..n) holds exactly the pattern bytes of `seed`. */
static inline int pattern_matches(const void *buf, size_t n, uint64_t seed)
{
    unsigned char *want = pattern_blob(n, seed);
    int same = memcmp(buf, want, n) == 0;
    free(want);
    return same;
}

/* ----------------------------------------------------------- tmp folders */

/* Creates a fresh folder /tmp/<prefix>_XXXXXX into path[cap]. */
static inline void tmpdir_make(char *path, size_t cap, const char *prefix)
{
    snprintf(path, cap, "/tmp/%s_XXXXXX", prefix);
    ck_assert_ptr_nonnull(mkdtemp(path));
}

/* Deletes `path` and everything below it (best effort; permissions are
 * restored first so a read-only folder can be emptied).  A missing path is
 * not an error. */
static inline void rm_rf(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0) {
        return;
    }
    if (!S_ISDIR(sb.st_mode)) {
        unlink(path);
        return;
    }
    chmod(path, 0700);
    DIR *d = opendir(path);
    if (d != NULL) {
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) {
                continue;
            }
            char sub[1024];
            snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
            rm_rf(sub);
        }
        closedir(d);
    }
    rmdir(path);
}

/* Removes the folder `path` and everything below it, and fails the test
 * unless it is gone. */
static inline void tmpdir_remove(const char *path)
{
    rm_rf(path);
    struct stat sb;
    ck_assert_msg(lstat(path, &sb) != 0, "%s could not be removed", path);
}

/* ------------------------------------------------------------ log capture */

/* What kvblend logged while a capture ran: lines per level, the last line
 * of each level and the last line of all.  When `match` is set only lines
 * containing it are recorded.  Safe to fill from several threads. */
typedef struct test_log {
    pthread_mutex_t mu;
    const char *match;
    int count[4];         /* per kvb_log_level */
    char last[4][1024];   /* per kvb_log_level */
    unsigned long seq[4]; /* per kvb_log_level: when its last line came */
    int total;
    kvb_log_level level;  /* of the last line */
    char line[1024];      /* the last line */
} test_log;

/* kvb_log_fn recording into the test_log `user`. */
static inline void test_log_sink(kvb_log_level level, const char *msg,
                                 void *user)
{
    test_log *t = user;
    if (t->match != NULL && strstr(msg, t->match) == NULL) {
        return;
    }
    pthread_mutex_lock(&t->mu);
    if (level >= 0 && level <= 3) {
        t->count[level]++;
        snprintf(t->last[level], sizeof t->last[level], "%s", msg);
        t->seq[level] = (unsigned long)t->total + 1;
    }
    t->total++;
    t->level = level;
    snprintf(t->line, sizeof t->line, "%s", msg);
    pthread_mutex_unlock(&t->mu);
}

/* Empties `t` and routes every log line (level debug and up) into it. */
static inline void test_log_start(test_log *t, const char *match)
{
    memset(t, 0, sizeof *t);
    pthread_mutex_init(&t->mu, NULL);
    t->match = match;
    kvb_set_log(test_log_sink, t, KVB_LOG_DEBUG);
}

/* Restores the default sink (stderr, level warning).  `t` stays readable. */
static inline void test_log_stop(test_log *t)
{
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
    pthread_mutex_destroy(&t->mu);
}

/* Returns how many lines of level `min` or worse `t` holds, copying the
 * last of them to out[cap] ("" when none) when out is not NULL. */
static inline int test_log_count(test_log *t, kvb_log_level min, char *out,
                                 size_t cap)
{
    pthread_mutex_lock(&t->mu);
    int n = 0, newest = -1;
    for (int l = min; l <= 3; l++) {
        n += t->count[l];
        if (t->count[l] > 0 && (newest < 0 || t->seq[l] > t->seq[newest])) {
            newest = l;
        }
    }
    if (out != NULL) {
        snprintf(out, cap, "%s", newest >= 0 ? t->last[newest] : "");
    }
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* ---------------------------------------------------------- paged layouts */

/* The paged layouts vLLM has used. */
enum {
    LAYOUT_2BNHD,  /* (2, B, N, H, D): K plane, then V plane */
    LAYOUT_B2NHD,  /* (B, 2, N, H, D): K and V per block */
    LAYOUT_BNH2D,  /* (B, N, H, 2D): K | V per token and head */
    LAYOUT_HND,    /* K and V planes of (B, H, N, D) */
    LAYOUT_BNDH,   /* (2, B, N, D, H): dims strided, element-wise path */
    LAYOUT_KT,     /* (B, H, [K^T: D, N | V: N, D]): V's own strides */
    NUM_LAYOUTS
};

/* Describes a cache of B blocks of N tokens, H heads, D dims of `dt` in the
 * one buffer `base` (2*B*N*H*D elements, the planes at their offsets) as
 * layout `kind` on `device` (-1: host). */
static inline kvb_paged_layout make_layout(int kind, char *base, int64_t B,
                                           int64_t N, int32_t H, int32_t D,
                                           kvb_dtype dt, int device)
{
    const size_t es = kvb_dtype_size(dt);
    const size_t plane = (size_t)(B * N * H * D) * es;
    kvb_paged_layout L = {.num_blocks = B, .block_size = N, .num_kv_heads = H,
                          .head_size = D, .dtype = dt, .device = device,
                          .k_base = base, .dim_stride = 1};
    switch (kind) {
    case LAYOUT_2BNHD:
        L.v_base = base + plane;
        L.block_stride = N * H * D;
        L.token_stride = H * D;
        L.head_stride = D;
        break;
    case LAYOUT_B2NHD:
        L.v_base = base + (size_t)(N * H * D) * es;
        L.block_stride = 2 * N * H * D;
        L.token_stride = H * D;
        L.head_stride = D;
        break;
    case LAYOUT_BNH2D:
        L.v_base = base + (size_t)D * es;
        L.block_stride = N * H * 2 * D;
        L.token_stride = H * 2 * D;
        L.head_stride = 2 * D;
        break;
    case LAYOUT_HND:
        L.v_base = base + plane;
        L.block_stride = H * N * D;
        L.token_stride = D;
        L.head_stride = N * D;
        break;
    case LAYOUT_KT:
        /* vLLM's CPU backend: per block and head a K plane stored
         * transposed (element (t, d) at d*N + t), then a row-major V plane */
        L.v_base = base + (size_t)(N * D) * es;
        L.block_stride = H * 2 * N * D;
        L.head_stride = 2 * N * D;
        L.token_stride = 1;
        L.dim_stride = N;
        L.v_block_stride = H * 2 * N * D;
        L.v_head_stride = 2 * N * D;
        L.v_token_stride = D;
        L.v_dim_stride = 1;
        break;
    default: /* LAYOUT_BNDH */
        L.v_base = base + plane;
        L.block_stride = N * D * H;
        L.token_stride = D * H;
        L.head_stride = 1;
        L.dim_stride = H;
        break;
    }
    return L;
}

/* ----------------------------------------------------------- registration */

/* One test case of a suite: its name, its checked fixture (NULL: none) and
 * its timeout in seconds (0: Check's default). */
typedef struct case_spec {
    const char *name;
    SFun setup, teardown;
    double timeout;
} case_spec;

/* One test of a suite: the index of its case among the suite's
 * case_specs, the test, and for a loop test the end of its _i range (0: a
 * plain test). */
typedef struct test_spec {
    int tcase;
    const TTest *test;
    int loop_end;
} test_spec;

/* Builds the suite `name` of cases[0..ncases), each holding its tests of
 * tests[0..ntests) in their order.  The caller owns the returned suite (a
 * runner frees it). */
static inline Suite *suite_build(const char *name, const case_spec *cases,
                                 size_t ncases, const test_spec *tests,
                                 size_t ntests)
{
    Suite *s = suite_create(name);
    for (size_t c = 0; c < ncases; c++) {
        TCase *tc = tcase_create(cases[c].name);
        if (cases[c].setup != NULL || cases[c].teardown != NULL) {
            tcase_add_checked_fixture(tc, cases[c].setup, cases[c].teardown);
        }
        if (cases[c].timeout > 0) {
            tcase_set_timeout(tc, cases[c].timeout);
        }
        for (size_t t = 0; t < ntests; t++) {
            if ((size_t)tests[t].tcase != c) {
                continue;
            }
            if (tests[t].loop_end > 0) {
                tcase_add_loop_test(tc, tests[t].test, 0, tests[t].loop_end);
            } else {
                tcase_add_test(tc, tests[t].test);
            }
        }
        suite_add_tcase(s, tc);
    }
    return s;
}
