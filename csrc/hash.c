/*
 * hash.c: the position-independent key of a segment.
 *
 * A segment's key is XXH3-64 (seed 0) of its token ids serialised as
 * little-endian int32, so the same chunk hashes to the same key wherever it
 * stands in a prompt and on every host.  The store keeps the token ids next
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
static uint64_t hash_tokens_swapped(const int32_t *tokens, int64_t n)
{
    XXH3_state_t state;
    uint32_t block[256];
    XXH3_64bits_reset(&state);
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

/* Returns XXH3-64 (seed 0) of tokens[0..n) as little-endian int32.  n <= 0
 * or a NULL array hash the empty input (0x2D06800538D394C2), since this
 * call has no status to report a bad argument with. */
uint64_t kvb_hash_tokens(const int32_t *tokens, int64_t n)
{
    if (tokens == NULL || n <= 0) {
        return XXH3_64bits(NULL, 0);
    }
#if KVB_BIG_ENDIAN
    return hash_tokens_swapped(tokens, n);
#else
    return XXH3_64bits(tokens, (size_t)n * sizeof tokens[0]);
#endif
}
