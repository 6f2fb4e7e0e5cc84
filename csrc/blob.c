/*
 * blob.c: the serialized form of a store entry kept by the lower tiers
 * (disk.c, remote.c).  The layout is in tiers.h; this file computes its
 * sizes and offsets, fills and seals a blob, and checks one before it is
 * loaded.  A blob is checked as a whole (identity, geometry, length and an
 * XXH3-64 over every byte), so a torn write, a flipped bit, a file of
 * another model or a hash collision is never loaded.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"
#include "tiers.h"

_Static_assert(sizeof(kvb_blob_header) == 64,
               "kvb_blob_header is part of the on-disk format");

/* Bytes of tokens[n] as int32, rounded up to 8 so the int64 positions that
 * follow stay aligned. */
static size_t blob_tokens_bytes(int64_t n)
{
    return ((size_t)n * sizeof(int32_t) + 7u) & ~(size_t)7u;
}

/* Bytes of one layer's K (or V) rows; 0 for a bad shape or on overflow. */
size_t kvb_blob_layer_bytes(const kvb_blob_shape *shape, int64_t n)
{
    size_t d = kvb_dtype_size(shape->dtype);
    if (n < 0 || d == 0 || shape->num_kv_heads <= 0 || shape->head_size <= 0) {
        return 0;
    }
    size_t row = (size_t)shape->num_kv_heads * (size_t)shape->head_size * d;
    if (n > 0 && row > SIZE_MAX / (size_t)n) {
        return 0;
    }
    return row * (size_t)n;
}

/* Offset of the token ids: right after the header. */
size_t kvb_blob_tokens_offset(void)
{
    return sizeof(kvb_blob_header);
}

/* Offset of the positions of an n-token blob. */
size_t kvb_blob_positions_offset(int64_t n)
{
    return sizeof(kvb_blob_header) + blob_tokens_bytes(n);
}

/* Offset of the rows of an n-token blob. */
size_t kvb_blob_rows_offset(int64_t n)
{
    return kvb_blob_positions_offset(n) + (size_t)n * sizeof(int64_t);
}

/* Header, ids, positions and 2 * num_layers blocks of rows; 0 on overflow
 * or for a shape that holds no rows. */
size_t kvb_blob_size(const kvb_blob_shape *shape, int64_t n)
{
    if (n <= 0 || n > (int64_t)(SIZE_MAX / 64) || shape->num_layers <= 0) {
        return 0;
    }
    size_t layer = kvb_blob_layer_bytes(shape, n);
    size_t blocks = 2u * (size_t)shape->num_layers;
    if (layer == 0 || layer > (SIZE_MAX - kvb_blob_rows_offset(n)) / blocks) {
        return 0;
    }
    return kvb_blob_rows_offset(n) + layer * blocks;
}

/* Writes the header (checksum 0 until sealed), ids and positions. */
void kvb_blob_init(void *blob, const kvb_blob_shape *shape, uint64_t key,
                   uint64_t hash, const int32_t *tokens,
                   const int64_t *positions, int64_t n)
{
    kvb_blob_header h = {
        .magic = KVB_BLOB_MAGIC,
        .version = KVB_BLOB_VERSION,
        .key = key,
        .hash = hash,
        .num_tokens = n,
        .num_layers = shape->num_layers,
        .num_kv_heads = shape->num_kv_heads,
        .head_size = shape->head_size,
        .dtype = (int32_t)shape->dtype,
        .payload_bytes = kvb_blob_size(shape, n) - sizeof h,
        .checksum = 0,
    };
    unsigned char *b = blob;
    memcpy(b, &h, sizeof h);
    size_t tb = blob_tokens_bytes(n);
    memset(b + kvb_blob_tokens_offset(), 0, tb);
    memcpy(b + kvb_blob_tokens_offset(), tokens, (size_t)n * sizeof *tokens);
    memcpy(b + kvb_blob_positions_offset(n), positions,
           (size_t)n * sizeof *positions);
}

/* XXH3-64 of the blob with its checksum field read as zero. */
static uint64_t blob_sum(const unsigned char *b, size_t len)
{
    kvb_blob_header h;
    memcpy(&h, b, sizeof h);
    h.checksum = 0;
    uint64_t s = kvb_checksum(&h, sizeof h, 0x626c6f62ULL);
    return kvb_checksum(b + sizeof h, len - sizeof h, s);
}

/* Stores the checksum of a filled blob. */
void kvb_blob_seal(void *blob, size_t len)
{
    unsigned char *b = blob;
    uint64_t s = blob_sum(b, len);
    memcpy(b + offsetof(kvb_blob_header, checksum), &s, sizeof s);
}

/* Sets *why and returns 0: the shared failure exit of kvb_blob_check. */
static int blob_reject(const char **why, const char *reason)
{
    if (why != NULL) {
        *why = reason;
    }
    return 0;
}

/* Checks a blob against what the caller expects; see tiers.h. */
int kvb_blob_check(const void *blob, size_t len, uint64_t key, uint64_t hash,
                   const kvb_blob_shape *shape, const int32_t *tokens,
                   int64_t n, const char **why)
{
    const unsigned char *b = blob;
    kvb_blob_header h;
    if (b == NULL || len < sizeof h) {
        return blob_reject(why, "truncated header");
    }
    memcpy(&h, b, sizeof h);
    if (h.magic != KVB_BLOB_MAGIC || h.version != KVB_BLOB_VERSION) {
        return blob_reject(why, "not a kvblend entry of this version");
    }
    if (h.key != key) {
        return blob_reject(why, "another model or shard");
    }
    if (h.hash != hash || h.num_tokens != n) {
        return blob_reject(why, "another segment");
    }
    if (h.num_layers != shape->num_layers ||
        h.num_kv_heads != shape->num_kv_heads ||
        h.head_size != shape->head_size || h.dtype != (int32_t)shape->dtype) {
        return blob_reject(why, "another geometry");
    }
    size_t want = kvb_blob_size(shape, n);
    if (want == 0 || len != want || h.payload_bytes != want - sizeof h) {
        return blob_reject(why, "wrong length (torn or truncated)");
    }
    if (blob_sum(b, len) != h.checksum) {
        return blob_reject(why, "checksum mismatch (corrupt)");
    }
    if (memcmp(b + kvb_blob_tokens_offset(), tokens,
               (size_t)n * sizeof *tokens) != 0) {
        return blob_reject(why, "tokens differ (hash collision)");
    }
    return 1;
}
