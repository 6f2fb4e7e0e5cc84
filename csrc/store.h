/*
 * store.h: internal hooks of the chunk store (store.c); never installed.
 *
 * The store keeps each entry's K/V rows in one block obtained from the
 * allocator of the entry's tier.  The host tier uses malloc/free unless a
 * CUDA build installs a pinned-memory allocator; the device tier is used
 * only once an allocator has been installed for it (and its budget is
 * non-zero).  Entry metadata (the entry record, token ids and positions)
 * always lives in ordinary host memory, so a device-tier entry can still be
 * matched and described on the host.
 */
#pragma once

#include <stddef.h>

#include "internal.h"

/* Allocator of one tier.  alloc returns NULL on failure; free receives the
 * size passed to alloc.  ctx is passed through unchanged. */
typedef struct kvb_allocator {
    void *(*alloc)(size_t bytes, void *ctx);
    void (*free)(void *ptr, size_t bytes, void *ctx);
    void *ctx;
} kvb_allocator;

/*
 * Installs the allocator of `tier` (NULL restores the default: malloc/free
 * for the host tier, "none" for the device tier).  Allowed only while the
 * store holds no entry of that tier, since their blocks must be freed by
 * the allocator that made them; otherwise KVB_ERR_INVALID.
 */
KVB_HIDDEN kvb_status kvb_store_set_allocator(kvb_store *store, kvb_tier tier,
                                              const kvb_allocator *alloc);
