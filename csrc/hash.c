/*
 * hash.c: the position-independent key of a segment.
 *
 * A segment's key is XXH3-64 of its token ids serialised as little-endian
 * int32, seeded with the tenant's namespace (0 by default), so the same
 * chunk hashes to the same key wherever it stands in a prompt and on every
 * host, and to another key under another tenant.  The store keeps the token ids next
 * to the key, so a collision can never return another chunk's KV.
 */
#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack */
#include <xxhash.h>

#include "internal.h"

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define KVB_BIG_ENDIAN 1
#else
#define KVB_BIG_ENDIAN 0
#endif

#if KVB_BIG_ENDIAN
/* Hashes tokens on a big-endian host: byte-swaps them in blocks of 256 and
 * streams the blocks through XXH3, which gives the same digest as one call
 * over the little-endian bytes. */
static uint64_t hash_tokens_swapped(const int32_t *tokens, int64_t n,
                                    uint64_t ns)
{
    XXH3_state_t state;
    uint32_t block[256];
    XXH3_64bits_reset_withSeed(&state, ns);
    for (int64_t i = 0; i < n; i += 256) {
        int64_t m = n - i < 256 ? n - i : 256;
        for (int64_t j = 0; j < m; j++) {
            uint32_t v = (uint32_t)tokens[i + j];
            block[j] = (v >> 24) | ((v >> 8) & 0xff00u) |
                       ((v << 8) & 0xff0000u) | (v << 24);
        }
        XXH3_64bits_update(&state, block, (size_t)m * sizeof block[0]);
    }
    return XXH3_64bits_digest(&state);
}
#endif

/* Returns XXH3-64 with seed `ns` of tokens[0..n) as little-endian int32.
 * n <= 0 or a NULL array hash the empty input, since this call has no
 * status to report a bad argument with. */
uint64_t kvb_hash_tokens_ns(const int32_t *tokens, int64_t n, uint64_t ns)
{
    if (tokens == NULL || n <= 0) {
        return XXH3_64bits_withSeed(NULL, 0, ns);
    }
#if KVB_BIG_ENDIAN
    return hash_tokens_swapped(tokens, n, ns);
#else
    return XXH3_64bits_withSeed(tokens, (size_t)n * sizeof tokens[0], ns);
#endif
}

/* The key in the default namespace: XXH3-64 with seed 0 (the empty input
 * gives 0x2D06800538D394C2). */
uint64_t kvb_hash_tokens(const int32_t *tokens, int64_t n)
{
    return kvb_hash_tokens_ns(tokens, n, 0);
}

/* XXH3-64 of the name's bytes; the empty name is the default namespace 0,
 * and a name whose digest is 0 is moved to 1 so that it stays apart. */
uint64_t kvb_namespace(const char *name, size_t len)
{
    if (name == NULL || len == 0) {
        return 0;
    }
    uint64_t ns = XXH3_64bits(name, len);
    return ns != 0 ? ns : 1;
}

/* XXH3-64 of `bytes` continuing from `seed`: the per-layer checksum of a
 * stored entry (its K bytes, then its V bytes, chained). */
uint64_t kvb_checksum(const void *bytes, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(bytes, len, seed);
}
