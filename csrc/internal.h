/*
 * internal.h: helpers shared by the C core and the connector layer; never
 * installed and never part of the public API.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvblend.h"

#if defined(__GNUC__)
#define KVB_PRINTF(fmt_idx, arg_idx) \
    __attribute__((format(printf, fmt_idx, arg_idx)))
#define KVB_HIDDEN __attribute__((visibility("hidden")))
#else
#define KVB_PRINTF(fmt_idx, arg_idx)
#define KVB_HIDDEN
#endif

/* Records `fmt` as this thread's last error and returns `status`, so a
 * failing path reads `return kvb_fail(KVB_ERR_INVALID, "...", ...);`. */
KVB_HIDDEN kvb_status kvb_fail(kvb_status status, const char *fmt, ...)
    KVB_PRINTF(2, 3);

/* Sends one formatted line to the installed log sink if `level` passes the
 * configured minimum. */
KVB_HIDDEN void kvb_log(kvb_log_level level, const char *fmt, ...)
    KVB_PRINTF(2, 3);

/* Logs at info each compatibility-only setting of `cfg` that differs from
 * its default: accepted for LMCache, and it does nothing (config.c). */
KVB_HIDDEN void kvb_config_log_compat(const kvb_config *cfg);

/* XXH3-64 of bytes[0..len) with `seed` (chain calls by passing the last
 * digest as the next seed): the checksum of stored rows (hash.c). */
KVB_HIDDEN uint64_t kvb_checksum(const void *bytes, size_t len,
                                 uint64_t seed);

/* Returns the number of worker threads CPU ops should use (>= 1). */
KVB_HIDDEN int kvb_cpu_threads(void);

/* Runs fn(i, ctx) for i in [0, n) split into contiguous ranges over up to
 * kvb_cpu_threads() threads (the caller's thread included).  Falls back to
 * a serial loop when n is small or threads cannot be started. `min_per_thread`
 * is the smallest range worth a thread. */
typedef void (*kvb_range_fn)(int64_t begin, int64_t end, void *ctx);
KVB_HIDDEN void kvb_parallel_for(int64_t n, int64_t min_per_thread,
                                 kvb_range_fn fn, void *ctx);

/* Converts an IEEE half to float. */
static inline float kvb_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400u) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ffu;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Converts a float to IEEE half with round-to-nearest-even. */
static inline uint16_t kvb_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) { /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    }
    if (absx >= 0x477ff000u) { /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (absx < 0x38800000u) { /* below the smallest normal half: subnormal */
        if (absx < 0x33000000u) {
            return (uint16_t)sign; /* rounds to zero */
        }
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14 + (113 - e) */
        uint32_t half_m = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_m & 1u))) {
            half_m++;
        }
        return (uint16_t)(sign | half_m);
    }
    uint32_t e = (absx >> 23) - 127 + 15;
    uint32_t m = absx & 0x7fffffu;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        h++; /* may carry into the exponent, which is correct */
    }
    return (uint16_t)(sign | h);
}

/* Converts bfloat16 to float (exact). */
static inline float kvb_bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Converts a float to bfloat16 with round-to-nearest-even; NaN stays NaN. */
static inline uint16_t kvb_f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((x >> 16) | 0x40u);
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Loads element i of a typed array as float. */
static inline float kvb_load(const void *p, int64_t i, kvb_dtype dt)
{
    switch (dt) {
    case KVB_DTYPE_F16:
        return kvb_f16_to_f32(((const uint16_t *)p)[i]);
    case KVB_DTYPE_BF16:
        return kvb_bf16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

/* Stores a float as element i of a typed array. */
static inline void kvb_store_elem(void *p, int64_t i, kvb_dtype dt, float v)
{
    switch (dt) {
    case KVB_DTYPE_F16:
        ((uint16_t *)p)[i] = kvb_f32_to_f16(v);
        break;
    case KVB_DTYPE_BF16:
        ((uint16_t *)p)[i] = kvb_f32_to_bf16(v);
        break;
    default:
        ((float *)p)[i] = v;
        break;
    }
}

/* Returns KVB_OK if dt is a known dtype, else fails naming `what`. */
KVB_HIDDEN kvb_status kvb_check_dtype(kvb_dtype dt, const char *what);

/* KVB_ERR_INVALID naming `fn` when `count` is negative or the array `p`
 * is NULL with count > 0: "fn: count_name=-1; expected >= 0", "fn: name is
 * NULL with count_name=3". */
KVB_HIDDEN kvb_status kvb_check_array(const char *fn, const char *name,
                                      const void *p, const char *count_name,
                                      int64_t count);

/* Checks the rows and head geometry of op `fn` (the CPU and CUDA ops of
 * rows [n, num_heads, head_size]): KVB_ERR_INVALID naming the values unless
 * n >= 0, num_heads > 0 and head_size > 0. */
KVB_HIDDEN kvb_status kvb_check_rows(const char *fn, int64_t n,
                                     int32_t num_heads, int32_t head_size);

/* Checks the arguments gather and scatter share, CPU (on_device 0) and
 * CUDA (1): a valid layout on host memory or on a device, n >= 0, slots
 * set when n > 0.  The slot values are the caller's to check (the CPU op
 * scans them; the CUDA kernel skips bad ones). */
KVB_HIDDEN kvb_status kvb_check_copy_args(const char *fn,
                                          const kvb_paged_layout *layout,
                                          const int64_t *slots, int64_t n,
                                          int on_device);

/* Element strides of one plane (K or V) of a paged layout. */
typedef struct kvb_plane_strides {
    int64_t block;
    int64_t token;
    int64_t head;
    int64_t dim;
} kvb_plane_strides;

/* Fills *k with K's strides and *v with V's (K's when the layout's four V
 * strides are all 0).  Either output may be NULL. */
KVB_HIDDEN void kvb_layout_strides(const kvb_paged_layout *layout,
                                   kvb_plane_strides *k,
                                   kvb_plane_strides *v);
