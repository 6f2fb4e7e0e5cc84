/*
 * store.h: internal hooks of the chunk store (store.c); never installed.
 *
 * Tiers.  The store keeps each entry's K/V rows in one block obtained from
 * the allocator of the entry's tier.  The host tier uses malloc/free unless
 * a CUDA build installs a pinned-memory allocator; the device tier is used
 * only once an allocator has been installed for it (and its budget is
 * non-zero).  Entry metadata (the entry record, token ids and positions)
 * always lives in ordinary host memory, so a device-tier entry can still be
 * matched and described on the host.
 *
 * Moving between tiers.  Once a mover is installed (kvb_store_set_mover)
 * the two tiers form one LRU cache: an unpinned entry evicted from the
 * device tier is demoted (its rows copied into a new host-tier block) when
 * the host tier can take it, and a hit on an unpinned host-tier entry
 * promotes it back to the device tier when the device tier can make room.
 * Without a mover nothing moves: eviction drops the entry.  The copies run
 * without the store's lock (the moving entry is pinned meanwhile), so a
 * slow copy holds up only the users of that entry.
 *
 * These hooks are exported from the shared library (their kvb_ names pass
 * its version script) only so that the store's tests can install stand-in
 * tiers; they are declared nowhere else and are no part of the public API.
 */
#pragma once

#include <stddef.h>

#include "internal.h"

/* Visibility of the hooks below: exported, see above. */
#define KVB_STORE_HOOK KVB_API

/* Allocator of one tier.  alloc returns NULL on failure; free receives the
 * size passed to alloc.  ctx is passed through unchanged. */
typedef struct kvb_allocator {
    void *(*alloc)(size_t bytes, void *ctx);
    void (*free)(void *ptr, size_t bytes, void *ctx);
    void *ctx;
} kvb_allocator;

/*
 * Copies `bytes` bytes of rows from `src` (a block of `src_tier`'s
 * allocator) to `dst` (a block of `dst_tier`'s allocator), the two tiers
 * being different, and returns only once the copy is complete: the store
 * frees `src` right after.  Returns 0 on success, non-zero on failure (the
 * store then frees `dst` and keeps the entry where it was, or drops it when
 * it was being evicted).  Called without the store's lock, possibly from
 * several threads at once (one entry each), while the store keeps the
 * entry pinned; it must not call back into the store for that entry.
 * ctx is passed through unchanged.
 */
typedef int (*kvb_move_fn)(void *dst, const void *src, size_t bytes,
                           kvb_tier dst_tier, kvb_tier src_tier, void *ctx);

/*
 * Installs the allocator of `tier` (NULL restores the default: malloc/free
 * for the host tier, "none" for the device tier).  Allowed only while the
 * store holds no entry of that tier, since their blocks must be freed by
 * the allocator that made them; otherwise KVB_ERR_INVALID.
 */
KVB_STORE_HOOK kvb_status kvb_store_set_allocator(kvb_store *store,
                                                  kvb_tier tier,
                                                  const kvb_allocator *alloc);

/*
 * Installs the function that copies rows between the tiers (NULL removes
 * it: from then on nothing moves and device-tier eviction drops entries).
 * `ctx` must stay valid until the mover is replaced and the moves already
 * started have ended, or the store is freed.
 * May be called at any time; moves already done stay done.  Promotion is on
 * by default (see kvb_store_set_promotion).  KVB_ERR_INVALID for a NULL
 * store.
 */
KVB_STORE_HOOK kvb_status kvb_store_set_mover(kvb_store *store,
                                              kvb_move_fn move, void *ctx);

/*
 * Turns promotion on kvb_store_acquire on (enabled != 0, the default) or
 * off.  With promotion off a mover still demotes device-tier victims to the
 * host tier, and a host-tier hit is served from the host tier.
 * KVB_ERR_INVALID for a NULL store.
 */
KVB_STORE_HOOK kvb_status kvb_store_set_promotion(kvb_store *store,
                                                  int enabled);

/*
 * The layer stride of an entry's rows in elements of the store's dtype:
 * layer l's K (or V) rows start l * stride elements after layer 0's, as a
 * kvb_load_seg's layer_stride says.  0 for NULL and for an entry of a
 * single layer (there is no next layer).  Valid while the entry is pinned.
 */
KVB_HIDDEN int64_t kvb_entry_layer_stride(const kvb_entry *entry);
