/*
 * store.c: the chunk store, an index from a segment's token ids to its
 * stored K/V rows, kept in two tiers (device, host) with per-tier byte
 * budgets and one LRU order across both.
 *
 * Index.  A chained hash table keyed by the 64-bit hash of the tokens
 * (kvb_hash_tokens) that doubles its bucket array when it holds as many
 * entries as buckets.  Every entry keeps a copy of its token ids and a
 * lookup compares them, so two chunks with the same hash are two distinct
 * entries and a lookup never returns the other one's rows (such a lookup is
 * counted in stats.collisions).
 *
 * Entries.  An entry has a host record (this struct, then its positions and
 * token ids in the same allocation) and a block of rows from its tier's
 * allocator holding, per layer, K then V, each contiguous
 * [num_tokens, num_kv_heads, head_size] in the store's dtype.  The bytes
 * charged to the tier's budget are those of both allocations.
 *
 * Life cycle.  kvb_store_reserve creates a PENDING entry, pinned once and
 * invisible to lookups; kvb_store_commit makes it READY, unpinned and most
 * recently used; kvb_store_abort frees it.  kvb_store_acquire pins a READY
 * entry and makes it most recently used; kvb_store_unpin releases one pin.
 * Only READY entries with no pin are evicted, moved or cleared, so a
 * pointer obtained from reserve or acquire stays valid until its pin is
 * released (a move pins the entry itself, and an acquire of a moving entry
 * waits for the move to end).
 *
 * Tiers.  A new entry goes to the device tier when it has an allocator and
 * a budget and room can be made there, else to the host tier.  Room is
 * made by evicting the tier's unpinned READY entries, least recently used
 * first, along the one LRU list that holds the READY entries of both tiers.
 * Without a mover an evicted entry is dropped.  With a mover (store.h):
 *   - demotion: an entry evicted from the device tier is moved to the host
 *     tier when the host tier can make room for it (evicting, i.e.
 *     dropping, its own LRU unpinned entries) and its allocator and the
 *     copy succeed; otherwise it is dropped.  It keeps its place in the LRU
 *     order (it was not used), so among host entries it is dropped in its
 *     turn like any other;
 *   - promotion: kvb_store_acquire of a READY host-tier entry that nobody
 *     else has pinned moves it to the device tier when promotion is on and
 *     the device tier can make room (demoting its LRU unpinned entries).
 *     The entry is pinned by this acquire while it moves, so making room in
 *     the host tier for the demoted entries never drops it.  On any failure
 *     it stays on the host and the acquire still succeeds.
 * A move runs in three steps (store_moves_run): under the lock it pins the
 * entry, marks it moving and allocates and charges the new block; without
 * the lock the mover copies the rows; under the lock again the entry takes
 * the new block and tier and the old block is freed (or, when the copy
 * failed, the new block is freed).  The bytes of a move in flight count in
 * both tiers, as busy bytes in the new one.  Room made by demotions is
 * therefore there only once they have run: reserve and promotion run them
 * and then look again, since anything else may have changed meanwhile.
 * stats.evictions counts the entries dropped for room, stats.demotions and
 * stats.promotions the moves.
 *
 * Locking.  One mutex guards the whole store; every operation under it is
 * short (a hash, a token comparison, list surgery and at most a malloc or
 * a block from a tier allocator).  The copies of moves run without it, and
 * an acquire that finds a moving entry waits on `moved` for the end of the
 * move.  The entry accessors read without the lock: the tokens and
 * positions never change after reserve, and the rows pointer and tier
 * change only at the end of a move, when nobody but the move holds a pin,
 * whereas the accessors are valid only while the entry is pinned.
 */
#include <assert.h>
#include <pthread.h>
#include <stdlib.h>

#include "internal.h"
#include "store.h"

#define STORE_NUM_TIERS 2
#define STORE_MIN_BUCKETS 64

typedef enum entry_state {
    ENTRY_PENDING = 0, /* reserved, rows being written, invisible */
    ENTRY_READY = 1,   /* committed, visible to lookups */
    ENTRY_DOOMED = 2   /* discarded while pinned: invisible, freed at the
                          last unpin */
} entry_state;

struct kvb_entry {
    kvb_store *store;
    uint64_t hash;
    uint64_t ns;         /* the tenant namespace it was stored under */
    int64_t num_tokens;
    int32_t *tokens;     /* [num_tokens], inside this record */
    int64_t *positions;  /* [num_tokens], inside this record */
    uint64_t *sums;      /* [num_layers] checksums, inside this record;
                            valid when has_sums */
    int has_sums;
    unsigned char *rows; /* per layer: K then V, from the tier allocator;
                            changes only while unpinned (moves) */
    size_t layer_bytes;  /* bytes of K (or V) of one layer */
    size_t rows_bytes;   /* size of the rows block */
    size_t bytes;        /* charged to the tier: record + rows */
    kvb_tier tier;       /* changes only at the end of a move */
    entry_state state;
    int64_t pins;
    /* A move in flight (store_move_start .. store_move_finish): the new
     * block in the other tier, NULL when the entry is not moving; the
     * batch it belongs to; whether its copy succeeded. */
    unsigned char *move_rows;
    kvb_entry *move_next;
    int move_ok;
    kvb_entry *bucket_next;
    kvb_entry *lru_prev; /* towards the least recently used end */
    kvb_entry *lru_next; /* towards the most recently used end */
    int64_t data[];      /* positions, checksums, then tokens */
};

struct kvb_store {
    pthread_mutex_t mu;
    pthread_cond_t moved; /* a batch of moves finished (store_moves_run) */
    kvb_store_params params;
    size_t token_bytes; /* bytes of one token's K (or V) in one layer */
    uint64_t (*debug_hash)(const int32_t *, int64_t); /* NULL: the key */

    kvb_entry **buckets;
    size_t num_buckets; /* a power of two */
    int64_t count;      /* entries in the index, any state */

    kvb_entry *lru_head; /* least recently used READY entry */
    kvb_entry *lru_tail; /* most recently used READY entry */

    kvb_allocator alloc[STORE_NUM_TIERS];
    int has_alloc[STORE_NUM_TIERS];
    size_t budget[STORE_NUM_TIERS];
    size_t bytes[STORE_NUM_TIERS];      /* all entries of the tier */
    size_t busy_bytes[STORE_NUM_TIERS]; /* pinned or pending entries */
    int64_t tier_entries[STORE_NUM_TIERS];

    kvb_move_fn move; /* copies rows between tiers; NULL: nothing moves */
    void *move_ctx;
    int promote;      /* promote host-tier hits (when move is set) */

    kvb_store_stats stats; /* counters; sizes are filled in on demand */

    /* Event log (kvb_store_watch): events[0..num_events) oldest first. */
    int watching;
    int events_lost;
    kvb_store_event *events;
    int64_t num_events;
    int64_t cap_events;
};

/* Default host-tier allocation: malloc.  ctx is unused. */
static void *store_host_alloc(size_t bytes, void *ctx)
{
    (void)ctx;
    return malloc(bytes);
}

/* Default host-tier release: free.  bytes and ctx are unused. */
static void store_host_free(void *ptr, size_t bytes, void *ctx)
{
    (void)bytes;
    (void)ctx;
    free(ptr);
}

/* Returns the name of a tier for log lines. */
static const char *store_tier_name(kvb_tier tier)
{
    return tier == KVB_TIER_DEVICE ? "device" : "host";
}

/* Multiplies a by b into *out; returns 0 when the product overflows. */
static int store_mul(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/*
 * Computes the sizes of an entry of n tokens: the rows block
 * (2 * num_layers * n * token_bytes) and the host record (struct, positions,
 * tokens).  Returns 0 when a size overflows size_t (n absurdly large).
 */
static int store_entry_sizes(const kvb_store *store, int64_t n,
                             size_t *layer_bytes, size_t *rows_bytes,
                             size_t *record_bytes)
{
    size_t per_token_meta = sizeof(int64_t) + sizeof(int32_t);
    size_t sums = (size_t)store->params.num_layers * sizeof(uint64_t);
    size_t meta;
    if (!store_mul((size_t)n, store->token_bytes, layer_bytes) ||
        !store_mul(*layer_bytes, 2 * (size_t)store->params.num_layers,
                   rows_bytes) ||
        !store_mul((size_t)n, per_token_meta, &meta) ||
        __builtin_add_overflow(meta, sizeof(kvb_entry) + sums,
                               record_bytes)) {
        return 0;
    }
    size_t total;
    return !__builtin_add_overflow(*rows_bytes, *record_bytes, &total);
}

/* Checks the (tokens, n) pair common to every lookup; `what` names the
 * calling function in the message. */
static kvb_status store_check_tokens(const kvb_store *store,
                                     const int32_t *tokens, int64_t n,
                                     const char *what)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: store is NULL", what);
    }
    if (n <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: n=%lld is invalid (expected >= 1 token)", what,
                        (long long)n);
    }
    if (tokens == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: tokens is NULL with n=%lld", what, (long long)n);
    }
    return KVB_OK;
}

/* Checks that `entry` is non-NULL and belongs to `store`. */
static kvb_status store_check_entry(const kvb_store *store,
                                    const kvb_entry *entry, const char *what)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: store is NULL", what);
    }
    if (entry == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: entry is NULL", what);
    }
    if (entry->store != store) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: entry %p belongs to another store", what,
                        (const void *)entry);
    }
    return KVB_OK;
}

/* The key of tokens[0..n) in namespace ns: kvb_hash_tokens_ns, or the
 * test's hash (which ignores the namespace, so that the namespace compare
 * of store_find is what keeps tenants apart). */
static uint64_t store_hash(const kvb_store *store, uint64_t ns,
                           const int32_t *tokens, int64_t n)
{
    return store->debug_hash != NULL ? store->debug_hash(tokens, n)
                                     : kvb_hash_tokens_ns(tokens, n, ns);
}

/*
 * Finds the entry (in any state) for exactly tokens[0..n) in namespace ns
 * with hash h.  Sets *collided to 1 when an entry with the same hash but
 * other tokens or another namespace was passed over.  Returns NULL when there is none.  Caller holds the lock.
 */
static kvb_entry *store_find(const kvb_store *store, uint64_t h,
                             uint64_t ns, const int32_t *tokens, int64_t n,
                             int *collided)
{
    *collided = 0;
    for (kvb_entry *e = store->buckets[h & (store->num_buckets - 1)];
         e != NULL; e = e->bucket_next) {
        if (e->hash != h) {
            continue;
        }
        if (e->ns == ns && e->num_tokens == n &&
            memcmp(e->tokens, tokens, (size_t)n * sizeof *tokens) == 0) {
            return e;
        }
        *collided = 1;
    }
    return NULL;
}

/* Doubles the bucket array and rehashes.  On allocation failure keeps the
 * current table (chains just get longer); never fails.  Caller holds the
 * lock. */
static void store_grow(kvb_store *store)
{
    size_t nb = store->num_buckets * 2;
    kvb_entry **b = calloc(nb, sizeof *b);
    if (b == NULL) {
        return;
    }
    for (size_t i = 0; i < store->num_buckets; i++) {
        kvb_entry *e = store->buckets[i];
        while (e != NULL) {
            kvb_entry *next = e->bucket_next;
            size_t j = e->hash & (nb - 1);
            e->bucket_next = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(store->buckets);
    store->buckets = b;
    store->num_buckets = nb;
}

/* Links `e` into its bucket, growing the table first when it is full.
 * Caller holds the lock. */
static void store_index_insert(kvb_store *store, kvb_entry *e)
{
    if ((size_t)store->count >= store->num_buckets) {
        store_grow(store);
    }
    size_t i = e->hash & (store->num_buckets - 1);
    e->bucket_next = store->buckets[i];
    store->buckets[i] = e;
    store->count++;
}

/* Unlinks `e` from its bucket.  `e` must be in the index.  Caller holds the
 * lock. */
static void store_index_remove(kvb_store *store, kvb_entry *e)
{
    kvb_entry **pp = &store->buckets[e->hash & (store->num_buckets - 1)];
    while (*pp != e) {
        pp = &(*pp)->bucket_next;
    }
    *pp = e->bucket_next;
    e->bucket_next = NULL;
    store->count--;
}

/* Removes a READY entry from the LRU list.  Caller holds the lock. */
static void store_lru_unlink(kvb_store *store, kvb_entry *e)
{
    if (e->lru_prev != NULL) {
        e->lru_prev->lru_next = e->lru_next;
    } else {
        store->lru_head = e->lru_next;
    }
    if (e->lru_next != NULL) {
        e->lru_next->lru_prev = e->lru_prev;
    } else {
        store->lru_tail = e->lru_prev;
    }
    e->lru_prev = e->lru_next = NULL;
}

/* Appends `e` (not on the list) at the most recently used end.  Caller
 * holds the lock. */
static void store_lru_push(kvb_store *store, kvb_entry *e)
{
    e->lru_prev = store->lru_tail;
    e->lru_next = NULL;
    if (store->lru_tail != NULL) {
        store->lru_tail->lru_next = e;
    } else {
        store->lru_head = e;
    }
    store->lru_tail = e;
}

/* Adds one pin; the entry's bytes become busy (not evictable) on the first.
 * Caller holds the lock. */
static void store_pin(kvb_store *store, kvb_entry *e)
{
    if (e->pins++ == 0) {
        store->busy_bytes[e->tier] += e->bytes;
    }
}

/* Drops one pin (pins > 0); the bytes become evictable on the last, and a
 * discarded entry is freed.  Caller holds the lock. */
static void store_destroy(kvb_store *store, kvb_entry *e);

static void store_unpin_locked(kvb_store *store, kvb_entry *e)
{
    if (--e->pins == 0) {
        store->busy_bytes[e->tier] -= e->bytes;
        if (e->state == ENTRY_DOOMED) {
            store_destroy(store, e);
        }
    }
}

/*
 * Appends an event for `e` to the log when the store is watched, growing
 * the log geometrically.  When memory runs out the event is dropped and
 * events_lost set, so the reader knows its mirror is incomplete.  Caller
 * holds the lock.
 */
static void store_record(kvb_store *store, const kvb_entry *e,
                         kvb_store_event_kind kind)
{
    if (!store->watching) {
        return;
    }
    if (store->num_events == store->cap_events) {
        int64_t cap = store->cap_events > 0 ? 2 * store->cap_events : 64;
        kvb_store_event *ev =
            realloc(store->events, (size_t)cap * sizeof *ev);
        if (ev == NULL) {
            store->events_lost = 1;
            return;
        }
        store->events = ev;
        store->cap_events = cap;
    }
    kvb_store_event *ev = &store->events[store->num_events++];
    ev->hash = e->hash;
    ev->num_tokens = e->num_tokens;
    ev->kind = (int32_t)kind;
}

/*
 * Removes `e` from the index (and the LRU list when READY), takes its bytes
 * off its tier and frees its rows and record.  Pinned entries are freed too
 * (only kvb_store_free and abort do that, by contract).  Caller holds the
 * lock.
 */
static void store_destroy(kvb_store *store, kvb_entry *e)
{
    if (e->state != ENTRY_DOOMED) { /* a doomed one left the index */
        store_index_remove(store, e);
    }
    if (e->state == ENTRY_READY) {
        store_lru_unlink(store, e);
        store_record(store, e, KVB_STORE_EVENT_REMOVED);
    }
    if (e->pins > 0) {
        store->busy_bytes[e->tier] -= e->bytes;
    }
    store->bytes[e->tier] -= e->bytes;
    store->tier_entries[e->tier]--;
    const kvb_allocator *a = &store->alloc[e->tier];
    a->free(e->rows, e->rows_bytes, a->ctx);
    free(e);
}

/* The K (which = 0) or V (which = 1) rows of layer l inside a rows block of
 * the store's layout: per layer K then V, layer_bytes each. */
static unsigned char *store_layer_rows(unsigned char *rows, size_t layer_bytes,
                                       int32_t l, int which)
{
    return rows + (2 * (size_t)l + (size_t)which) * layer_bytes;
}

/* The checksum of layer l of `rows`, a rows block of e's shape in host
 * memory: XXH3-64 of its K bytes, continued over its V bytes. */
static uint64_t store_layer_sum(const kvb_entry *e, unsigned char *rows,
                                int32_t l)
{
    uint64_t h = kvb_checksum(store_layer_rows(rows, e->layer_bytes, l, 0),
                              e->layer_bytes, 0);
    return kvb_checksum(store_layer_rows(rows, e->layer_bytes, l, 1),
                        e->layer_bytes, h);
}

/* Fills sums[num_layers] with the checksums of every layer of `rows`. */
static void store_sum_rows(const kvb_store *store, const kvb_entry *e,
                           unsigned char *rows, uint64_t *sums)
{
    for (int32_t l = 0; l < store->params.num_layers; l++) {
        sums[l] = store_layer_sum(e, rows, l);
    }
}

/* Returns 0 when e carries checksums, its rows are in host memory and some
 * layer's rows no longer match; 1 otherwise (nothing to check counts as a
 * match).  The rows must not change meanwhile (e pinned). */
static int store_sums_match(const kvb_store *store, const kvb_entry *e)
{
    if (!e->has_sums || e->tier != KVB_TIER_HOST) {
        return 1;
    }
    for (int32_t l = 0; l < store->params.num_layers; l++) {
        if (store_layer_sum(e, e->rows, l) != e->sums[l]) {
            kvb_log(KVB_LOG_WARNING,
                    "store: a stored chunk of %lld tokens (key %016llx) "
                    "fails its checksum at layer %d: dropped, its rows are "
                    "recomputed",
                    (long long)e->num_tokens, (unsigned long long)e->hash,
                    (int)l);
            return 0;
        }
    }
    return 1;
}

/* Makes the READY, pinned entry e invisible to lookups (out of the index
 * and the LRU list, a REMOVED event, counted in stats.corrupt); it is freed when its
 * last pin is released.  Caller holds the lock. */
static void store_doom(kvb_store *store, kvb_entry *e)
{
    assert(e->state == ENTRY_READY && e->pins > 0);
    store_index_remove(store, e); /* the same tokens may be stored again */
    store_lru_unlink(store, e);
    store_record(store, e, KVB_STORE_EVENT_REMOVED);
    e->state = ENTRY_DOOMED;
    store->stats.corrupt++;
}

/* Returns 1 when new rows can be placed in `tier`: it has an allocator and
 * a non-zero budget.  Caller holds the lock. */
static int store_tier_open(const kvb_store *store, kvb_tier tier)
{
    return store->has_alloc[tier] && store->budget[tier] > 0;
}

/* The tier that is not `tier`: where a move of its entries goes. */
static kvb_tier store_other_tier(kvb_tier tier)
{
    return tier == KVB_TIER_DEVICE ? KVB_TIER_HOST : KVB_TIER_DEVICE;
}

/*
 * A batch of moves between the tiers.  Moves start under the lock
 * (store_move_start), copy without it and end under it again
 * (store_moves_run), so that a slow copy (a cudaMemcpy of a whole entry)
 * never holds up the other users of the store.  `move` and `ctx` are the
 * mover as it was when the batch was last refreshed under the lock (NULL:
 * nothing moves, victims are dropped); `tries` counts store_place's extra
 * evictions per tier over all the rounds of one reservation.
 */
typedef struct store_moves {
    kvb_entry *head; /* started moves, linked through move_next */
    kvb_move_fn move;
    void *ctx;
    int tries[STORE_NUM_TIERS];
} store_moves;

/* Takes the store's current mover into `m`.  Caller holds the lock. */
static void store_moves_refresh(const kvb_store *store, store_moves *m)
{
    m->move = store->move;
    m->ctx = store->move_ctx;
}

/* What store_make_room achieved: no room can be made; the room is there
 * now; the room will be there once the batch's demotions have run. */
enum { STORE_ROOM_NONE = 0, STORE_ROOM_NOW = 1, STORE_ROOM_LATER = 2 };

static int store_make_room(kvb_store *store, kvb_tier tier, size_t need,
                           store_moves *m);

/*
 * Starts moving the READY entry `e` to the other tier, where the caller has
 * made room: allocates the new block, charges it to that tier (as busy
 * bytes, never evictable), pins `e` (so it is neither evicted nor moved
 * again), marks it moving (kvb_store_acquire waits for the end of the move
 * before handing it out, so no other user ever holds a pointer to the rows
 * that are about to be freed) and adds it to `m`.  Returns 0, having
 * changed nothing, when the allocator has no block.  Caller holds the lock.
 */
static int store_move_start(kvb_store *store, kvb_entry *e, store_moves *m)
{
    assert(e->state == ENTRY_READY && e->move_rows == NULL);
    kvb_tier dst = store_other_tier(e->tier);
    const kvb_allocator *a = &store->alloc[dst];
    unsigned char *rows = a->alloc(e->rows_bytes, a->ctx);
    if (rows == NULL) {
        return 0;
    }
    e->move_rows = rows;
    e->move_next = m->head;
    m->head = e;
    store->bytes[dst] += e->bytes;
    store->busy_bytes[dst] += e->bytes;
    store->tier_entries[dst]++;
    store_pin(store, e);
    return 1;
}

/*
 * Ends the move of `e` once its copy is done: when the copy succeeded the
 * entry takes its new block and tier and the old block is freed, else the
 * new block is freed and the entry stays where it was, except that an
 * entry being demoted (evicted from the device tier) is dropped, as it
 * would have been without a mover.  The entry keeps its place in the LRU
 * order.  Releases the move's pin; counts promotions, demotions and
 * evictions.  Caller holds the lock.
 */
static void store_move_finish(kvb_store *store, kvb_entry *e)
{
    kvb_tier src = e->tier;
    kvb_tier dst = store_other_tier(src);
    kvb_tier loser = e->move_ok ? src : dst; /* the tier giving a block back */
    const kvb_allocator *a = &store->alloc[loser];
    a->free(e->move_ok ? e->rows : e->move_rows, e->rows_bytes, a->ctx);
    store->bytes[loser] -= e->bytes;
    store->busy_bytes[loser] -= e->bytes; /* pinned by the move */
    store->tier_entries[loser]--;
    if (e->move_ok) {
        e->rows = e->move_rows;
        e->tier = dst;
        /* Checksums cover host-tier rows: a demoted entry's were computed
         * from its new rows after the copy, a promoted one drops them. */
        e->has_sums = dst == KVB_TIER_HOST && store->params.checksums;
        if (dst == KVB_TIER_DEVICE) {
            store->stats.promotions++;
        } else {
            store->stats.demotions++;
        }
    }
    int drop = !e->move_ok && dst == KVB_TIER_HOST && e->pins == 1 &&
               e->state == ENTRY_READY;
    e->move_rows = NULL;
    e->move_next = NULL;
    store_unpin_locked(store, e);
    if (drop) {
        store_destroy(store, e);
        store->stats.evictions++;
    }
}

/*
 * Copies the rows of every move of `m` with its mover, without the store's
 * lock, then takes the lock again to end each move (store_move_finish) and
 * wakes the acquires that wait for a moving entry.  A demoted entry's
 * checksums (checksums on) are computed from its new host rows before the
 * lock is taken.  The moving entries are pinned and marked, so nobody else
 * reads or changes their rows, tier or checksums meanwhile; anything else
 * in the store may change.  Called and returns with the lock held.
 */
static void store_moves_run(kvb_store *store, store_moves *m)
{
    kvb_entry *head = m->head;
    m->head = NULL;
    if (head == NULL) {
        return;
    }
    pthread_mutex_unlock(&store->mu);
    for (kvb_entry *e = head; e != NULL; e = e->move_next) {
        kvb_tier dst = store_other_tier(e->tier);
        e->move_ok = m->move(e->move_rows, e->rows, e->rows_bytes, dst,
                             e->tier, m->ctx) == 0;
        if (e->move_ok && dst == KVB_TIER_HOST && store->params.checksums) {
            store_sum_rows(store, e, e->move_rows, e->sums);
        }
    }
    pthread_mutex_lock(&store->mu);
    while (head != NULL) {
        kvb_entry *next = head->move_next;
        store_move_finish(store, head);
        head = next;
    }
    pthread_cond_broadcast(&store->moved);
}

/*
 * Evicts the unpinned READY entry `e` from its tier: a device-tier entry
 * starts its demotion to the host tier in `m` when `m` has a mover and the
 * host tier can make room and a block for it (its bytes are then added to
 * *leaving: they leave the device tier once `m` has run), any other is
 * destroyed (counted in stats.evictions).  Returns the entry that follows
 * `e` on the LRU list once this is done (making room in the host tier may
 * have destroyed the one that followed it before), so that a caller
 * walking the list can go on.  Caller holds the lock.
 */
static kvb_entry *store_evict(kvb_store *store, kvb_entry *e, store_moves *m,
                              size_t *leaving)
{
    assert(e->pins == 0 && e->state == ENTRY_READY);
    if (e->tier == KVB_TIER_DEVICE && m->move != NULL &&
        store_tier_open(store, KVB_TIER_HOST) &&
        store_make_room(store, KVB_TIER_HOST, e->bytes, m) ==
            STORE_ROOM_NOW &&
        store_move_start(store, e, m)) {
        *leaving += e->bytes;
        return e->lru_next;
    }
    kvb_entry *next = e->lru_next;
    store_destroy(store, e);
    store->stats.evictions++;
    return next;
}

/*
 * Makes room for `need` bytes in `tier` by evicting unpinned READY entries of
 * that tier, least recently used first (device-tier ones start a demotion
 * in `m` when they can, see store_evict; host-tier ones are dropped).
 * Evicts nothing and returns STORE_ROOM_NONE when even evicting every
 * evictable entry would not free enough (the entry is larger than the
 * budget, or the rest is pinned, pending or moving); returns STORE_ROOM_NOW
 * when `need` more bytes fit now, STORE_ROOM_LATER when they fit once the
 * demotions started in `m` have run.  Caller holds the lock.
 */
static int store_make_room(kvb_store *store, kvb_tier tier, size_t need,
                           store_moves *m)
{
    size_t budget = store->budget[tier];
    if (need > budget || budget - store->busy_bytes[tier] < need) {
        return STORE_ROOM_NONE;
    }
    size_t leaving = 0;
    kvb_entry *e = store->lru_head;
    while (store->bytes[tier] - leaving + need > budget && e != NULL) {
        if (e->tier == tier && e->pins == 0) {
            e = store_evict(store, e, m, &leaving);
        } else {
            e = e->lru_next;
        }
    }
    /* The busy-bytes check above guarantees the loop frees enough: every
     * evicted entry leaves the tier, dropped now or moving out. */
    assert(store->bytes[tier] - leaving + need <= budget);
    return leaving > 0 ? STORE_ROOM_LATER : STORE_ROOM_NOW;
}

/* Creates a store after validating every field of `params`; see the header
 * for the ownership contract.  The host tier starts with malloc/free; the
 * device tier stays unused until an allocator is installed. */
kvb_status kvb_store_create(const kvb_store_params *params, kvb_store **out)
{
    if (out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_create: out is NULL");
    }
    *out = NULL;
    if (params == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_create: params is NULL");
    }
    if (params->num_layers <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "params->num_layers=%d is invalid (expected > 0)",
                        (int)params->num_layers);
    }
    if (params->num_kv_heads <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "params->num_kv_heads=%d is invalid (expected > 0)",
                        (int)params->num_kv_heads);
    }
    if (params->head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "params->head_size=%d is invalid (expected > 0)",
                        (int)params->head_size);
    }
    size_t elem = kvb_dtype_size(params->dtype);
    if (elem == 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "params->dtype=%d is unknown (expected 0=f32, 1=f16, "
                        "2=bf16)",
                        (int)params->dtype);
    }
    kvb_store *s = calloc(1, sizeof *s);
    kvb_entry **buckets = calloc(STORE_MIN_BUCKETS, sizeof *buckets);
    if (s == NULL || buckets == NULL || pthread_mutex_init(&s->mu, NULL)) {
        free(s);
        free(buckets);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_store_create: out of memory");
    }
    if (pthread_cond_init(&s->moved, NULL) != 0) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        free(buckets);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_store_create: out of memory");
    }
    s->params = *params;
    s->token_bytes = (size_t)params->num_kv_heads *
                     (size_t)params->head_size * elem;
    s->buckets = buckets;
    s->num_buckets = STORE_MIN_BUCKETS;
    s->alloc[KVB_TIER_HOST].alloc = store_host_alloc;
    s->alloc[KVB_TIER_HOST].free = store_host_free;
    s->has_alloc[KVB_TIER_HOST] = 1;
    s->budget[KVB_TIER_HOST] = params->host_budget_bytes;
    s->budget[KVB_TIER_DEVICE] = params->device_budget_bytes;
    s->promote = 1;
    *out = s;
    return KVB_OK;
}

/* Frees every entry and the store.  Entries still pinned (a caller bug, or
 * a shutdown racing a request) are freed anyway after one WARNING line. */
void kvb_store_free(kvb_store *store)
{
    if (store == NULL) {
        return;
    }
    int64_t pinned = 0;
    for (size_t i = 0; i < store->num_buckets; i++) {
        while (store->buckets[i] != NULL) {
            kvb_entry *e = store->buckets[i];
            pinned += e->pins > 0;
            store_destroy(store, e);
        }
    }
    if (pinned > 0) {
        kvb_log(KVB_LOG_WARNING,
                "store freed with %lld entries still pinned or pending",
                (long long)pinned);
    }
    free(store->buckets);
    free(store->events);
    pthread_cond_destroy(&store->moved);
    pthread_mutex_destroy(&store->mu);
    free(store);
}

/* Sets *found to 1 when a READY entry for exactly these tokens exists.
 * Touches neither pins, LRU order nor statistics. */
kvb_status kvb_store_contains(kvb_store *store, uint64_t ns,
                              const int32_t *tokens, int64_t n, int *found)
{
    kvb_status st = store_check_tokens(store, tokens, n, "kvb_store_contains");
    if (st != KVB_OK) {
        return st;
    }
    if (found == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_contains: found is NULL");
    }
    int collided;
    pthread_mutex_lock(&store->mu);
    kvb_entry *e = store_find(store, store_hash(store, ns, tokens, n), ns,
                              tokens, n, &collided);
    *found = e != NULL && e->state == ENTRY_READY;
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/*
 * Promotes the host-tier entry `e`, pinned by the caller alone, to the
 * device tier when the device tier can make room: the demotions that make
 * the room are copied first, then e's own rows (store_moves_run: the lock
 * is released during each copy).  `e` stays on the host when any step
 * fails, when someone else pins it while the demotions run (their pointers
 * are to its host rows), or when the mover or promotion was turned off
 * meanwhile.  Caller holds the lock.
 */
static void store_promote(kvb_store *store, kvb_entry *e)
{
    store_moves m = {0};
    int room = STORE_ROOM_NONE;
    for (;;) {
        store_moves_refresh(store, &m);
        if (m.move == NULL || !store->promote || e->pins != 1 ||
            e->state != ENTRY_READY || !store_tier_open(store, KVB_TIER_DEVICE)) {
            return;
        }
        room = store_make_room(store, KVB_TIER_DEVICE, e->bytes, &m);
        if (room != STORE_ROOM_LATER) {
            break;
        }
        store_moves_run(store, &m);
    }
    if (room == STORE_ROOM_NOW && store_move_start(store, e, &m)) {
        store_moves_run(store, &m);
    }
}

/* Pins and returns the READY entry for exactly these tokens (most recently
 * used from now on), or NULL on a miss; counts lookups, hits and
 * collisions.  An entry that is moving between the tiers is waited for
 * (its rows are about to change place).  A host-tier entry that had no pin
 * is first promoted to the device tier when a mover is installed,
 * promotion is on and the device tier can make room (store_promote: the
 * copies run without the lock and are done when this returns); on any
 * failure the entry is returned from the host tier. */
kvb_status kvb_store_acquire(kvb_store *store, uint64_t ns,
                             const int32_t *tokens, int64_t n,
                             kvb_entry **entry)
{
    kvb_status st = store_check_tokens(store, tokens, n, "kvb_store_acquire");
    if (st != KVB_OK) {
        return st;
    }
    if (entry == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_acquire: entry is NULL");
    }
    int collided;
    pthread_mutex_lock(&store->mu);
    uint64_t h = store_hash(store, ns, tokens, n);
    kvb_entry *e = store_find(store, h, ns, tokens, n, &collided);
    while (e != NULL && e->move_rows != NULL) {
        pthread_cond_wait(&store->moved, &store->mu);
        e = store_find(store, h, ns, tokens, n, &collided);
    }
    store->stats.lookups++;
    store->stats.collisions += collided;
    if (e != NULL && e->state != ENTRY_READY) {
        e = NULL;
    }
    if (e != NULL) {
        int was_unpinned = e->pins == 0;
        store->stats.hits++;
        store_pin(store, e);
        store_lru_unlink(store, e);
        store_lru_push(store, e);
        /* The pin keeps e from being dropped while the host tier makes
         * room for the entries its promotion demotes. */
        if (was_unpinned && e->tier == KVB_TIER_HOST &&
            store->move != NULL && store->promote) {
            /* The device tier keeps no checksum: the host copy is
             * checked before it moves, and a damaged one is dropped. */
            if (!store_sums_match(store, e)) {
                store_doom(store, e);
                store_unpin_locked(store, e);
                e = NULL;
            } else {
                store_promote(store, e);
            }
        }
    }
    pthread_mutex_unlock(&store->mu);
    *entry = e;
    return KVB_OK;
}

/* Entries store_place evicts beyond the budget's needs when the allocator
 * still finds no block (fragmentation), before it gives up on the tier. */
#define STORE_FRAGMENT_EVICTIONS 8

/* store_place's outcomes besides 1 (placed): no tier has room (0), an
 * allocator failed (-1), demotions must run before it can go on. */
#define STORE_PLACE_LATER 2

/*
 * Allocates the rows block for a new entry of `total` bytes (`rows_bytes`
 * of rows) in the first tier that can take it: the device tier when it has
 * an allocator and a budget, else the host tier, evicting LRU entries of
 * that tier as needed (demoting device-tier ones when `m` has a mover).
 * Returns 1 with *rows and *tier set, 0 when no tier has room, -1 when an
 * allocator failed, STORE_PLACE_LATER when demotions were started in `m`:
 * the caller runs them (store_moves_run) and calls again.  Caller holds
 * the lock.
 */
static int store_place(kvb_store *store, size_t total, size_t rows_bytes,
                       void **rows, kvb_tier *tier, store_moves *m)
{
    static const kvb_tier order[STORE_NUM_TIERS] = {KVB_TIER_DEVICE,
                                                    KVB_TIER_HOST};
    int failed = 0;
    for (int i = 0; i < STORE_NUM_TIERS; i++) {
        kvb_tier t = order[i];
        int room = store_tier_open(store, t)
                       ? store_make_room(store, t, total, m)
                       : STORE_ROOM_NONE;
        if (room == STORE_ROOM_LATER) {
            return STORE_PLACE_LATER;
        }
        if (room == STORE_ROOM_NONE) {
            continue;
        }
        const kvb_allocator *a = &store->alloc[t];
        *rows = a->alloc(rows_bytes, a->ctx);
        /* The budget has room but the allocator has no block that large (a
         * fragmented pool): evict more of the tier's LRU entries, one at a
         * time, until a block fits, at most STORE_FRAGMENT_EVICTIONS of them
         * (an allocator that fails for good must not empty the tier).  A
         * demoted entry frees its block only once it has moved. */
        kvb_entry *e = store->lru_head;
        while (*rows == NULL && e != NULL &&
               m->tries[t] < STORE_FRAGMENT_EVICTIONS) {
            if (e->tier == t && e->pins == 0 && e->state == ENTRY_READY) {
                size_t leaving = 0;
                e = store_evict(store, e, m, &leaving);
                m->tries[t]++;
                if (leaving > 0) {
                    return STORE_PLACE_LATER;
                }
                *rows = a->alloc(rows_bytes, a->ctx);
            } else {
                e = e->lru_next;
            }
        }
        if (*rows != NULL) {
            *tier = t;
            return 1;
        }
        failed = 1;
    }
    return failed ? -1 : 0;
}

/*
 * Reserves a PENDING, pinned entry for tokens[0..n) with a copy of the
 * tokens and of `positions` (NULL: 0..n-1).  *entry is NULL with KVB_OK when
 * an entry (PENDING or READY) for the tokens exists or when no tier has room
 * (counted in stats.rejected and logged once), also when the tiers'
 * allocators fail even after STORE_FRAGMENT_EVICTIONS more evictions (a
 * fragmented pool, an exhausted host): not storing a chunk only costs its
 * reuse.  KVB_ERR_NOMEM
 * when the entry record itself cannot be allocated.
 */
kvb_status kvb_store_reserve(kvb_store *store, uint64_t ns,
                             const int32_t *tokens, int64_t n,
                             const int64_t *positions, kvb_entry **entry)
{
    kvb_status st = store_check_tokens(store, tokens, n, "kvb_store_reserve");
    if (st != KVB_OK) {
        return st;
    }
    if (entry == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_reserve: entry is NULL");
    }
    *entry = NULL;
    size_t layer_bytes, rows_bytes, record_bytes;
    if (!store_entry_sizes(store, n, &layer_bytes, &rows_bytes,
                           &record_bytes)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_reserve: n=%lld tokens overflow the entry "
                        "size",
                        (long long)n);
    }
    size_t total = rows_bytes + record_bytes;

    kvb_entry *e = malloc(record_bytes);
    if (e == NULL) {
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_store_reserve: cannot allocate an entry record "
                        "of %zu bytes",
                        record_bytes);
    }
    int collided;
    void *rows = NULL;
    kvb_tier tier = KVB_TIER_HOST;
    store_moves m = {0};
    int placed = STORE_PLACE_LATER;
    pthread_mutex_lock(&store->mu);
    uint64_t h = store_hash(store, ns, tokens, n);
    for (int round = 0; placed == STORE_PLACE_LATER; round++) {
        if (round > 0) {
            store_moves_run(store, &m); /* the lock was released */
        }
        kvb_entry *old = store_find(store, h, ns, tokens, n, &collided);
        store->stats.collisions += round == 0 ? collided : 0;
        if (old != NULL) {
            pthread_mutex_unlock(&store->mu);
            free(e);
            return KVB_OK;
        }
        store_moves_refresh(store, &m);
        placed = store_place(store, total, rows_bytes, &rows, &tier, &m);
    }
    assert(m.head == NULL);
    if (placed <= 0) {
        size_t host_budget = store->budget[KVB_TIER_HOST];
        size_t host_busy = store->busy_bytes[KVB_TIER_HOST];
        store->stats.rejected++;
        pthread_mutex_unlock(&store->mu);
        free(e);
        if (placed < 0) {
            /* Not storing costs only the reuse: the request goes on. */
            kvb_log(KVB_LOG_WARNING,
                    "store: not storing a chunk of %lld tokens: no tier could "
                    "allocate %zu bytes of rows, even after evicting up to "
                    "%d more entries",
                    (long long)n, rows_bytes, STORE_FRAGMENT_EVICTIONS);
            return KVB_OK;
        }
        /* An entry larger than a non-zero budget is worth a warning (the
         * budget is likely misconfigured); a full or disabled tier is not. */
        kvb_log(host_budget > 0 && total > host_budget ? KVB_LOG_WARNING
                                                       : KVB_LOG_INFO,
                "store: not storing a chunk of %lld tokens (%zu bytes): the "
                "host budget is %zu bytes with %zu pinned or being written",
                (long long)n, total, host_budget, host_busy);
        return KVB_OK;
    }
    memset(e, 0, sizeof *e);
    e->store = store;
    e->hash = h;
    e->ns = ns;
    e->num_tokens = n;
    e->positions = e->data;
    e->sums = (uint64_t *)(e->data + n);
    e->tokens = (int32_t *)(e->sums + store->params.num_layers);
    e->rows = rows;
    e->layer_bytes = layer_bytes;
    e->rows_bytes = rows_bytes;
    e->bytes = total;
    e->tier = tier;
    e->state = ENTRY_PENDING;
    memcpy(e->tokens, tokens, (size_t)n * sizeof *tokens);
    for (int64_t i = 0; i < n; i++) {
        e->positions[i] = positions != NULL ? positions[i] : i;
    }
    store_index_insert(store, e);
    store->bytes[tier] += total;
    store->tier_entries[tier]++;
    store_pin(store, e);
    pthread_mutex_unlock(&store->mu);
    *entry = e;
    return KVB_OK;
}

/* Checks `entry` for `fn` and takes the lock when the entry is PENDING;
 * otherwise returns KVB_ERR_INVALID (message naming `fn`) without it. */
static kvb_status store_lock_pending(kvb_store *store, kvb_entry *entry,
                                     const char *fn)
{
    kvb_status st = store_check_entry(store, entry, fn);
    if (st != KVB_OK) {
        return st;
    }
    pthread_mutex_lock(&store->mu);
    if (entry->state != ENTRY_PENDING) {
        pthread_mutex_unlock(&store->mu);
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: entry %p is not pending (expected "
                        "an entry returned by kvb_store_reserve and not yet "
                        "committed or aborted)",
                        fn, (void *)entry);
    }
    return KVB_OK;
}

/* Makes a PENDING entry READY (visible, most recently used) and drops the
 * reservation's pin unless `keep_pin`; with checksums on, a host-tier
 * entry's are computed first.  `fn` names the caller in messages. */
static kvb_status store_commit(kvb_store *store, kvb_entry *entry,
                               int keep_pin, const char *fn)
{
    kvb_status st = store_check_entry(store, entry, fn);
    if (st != KVB_OK) {
        return st;
    }
    /* The reservation's pin keeps the rows where they are: hash them
     * outside the lock. */
    int sums = store->params.checksums && entry->tier == KVB_TIER_HOST &&
               entry->state == ENTRY_PENDING;
    if (sums) {
        store_sum_rows(store, entry, entry->rows, entry->sums);
    }
    st = store_lock_pending(store, entry, fn);
    if (st != KVB_OK) {
        return st;
    }
    entry->has_sums = sums;
    entry->state = ENTRY_READY;
    store_lru_push(store, entry);
    if (!keep_pin) {
        store_unpin_locked(store, entry);
    }
    store->stats.inserts++;
    store_record(store, entry, KVB_STORE_EVENT_ADDED);
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Commits a PENDING entry and drops the reservation's pin.
 * KVB_ERR_INVALID for an entry that is not PENDING. */
kvb_status kvb_store_commit(kvb_store *store, kvb_entry *entry)
{
    return store_commit(store, entry, 0, "kvb_store_commit");
}

/* Commits a PENDING entry and keeps the reservation's pin for the caller,
 * who releases it with kvb_store_unpin. */
kvb_status kvb_store_commit_pinned(kvb_store *store, kvb_entry *entry)
{
    return store_commit(store, entry, 1, "kvb_store_commit_pinned");
}

/* Frees a PENDING entry; its tokens may be reserved again afterwards.
 * KVB_ERR_INVALID for an entry that is not PENDING. */
kvb_status kvb_store_abort(kvb_store *store, kvb_entry *entry)
{
    kvb_status st = store_lock_pending(store, entry, "kvb_store_abort");
    if (st != KVB_OK) {
        return st;
    }
    store_destroy(store, entry);
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Releases one pin taken by kvb_store_acquire.  KVB_ERR_INVALID for a
 * PENDING entry (commit or abort it instead) or one that is not pinned. */
kvb_status kvb_store_unpin(kvb_store *store, kvb_entry *entry)
{
    kvb_status st = store_check_entry(store, entry, "kvb_store_unpin");
    if (st != KVB_OK) {
        return st;
    }
    pthread_mutex_lock(&store->mu);
    if (entry->state == ENTRY_PENDING) {
        pthread_mutex_unlock(&store->mu);
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_unpin: entry %p is pending (expected "
                        "kvb_store_commit or kvb_store_abort for a reserved "
                        "entry)",
                        (void *)entry);
    }
    if (entry->pins == 0) {
        pthread_mutex_unlock(&store->mu);
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_unpin: entry %p is not pinned (each unpin "
                        "needs a matching kvb_store_acquire)",
                        (void *)entry);
    }
    store_unpin_locked(store, entry);
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Checks a pinned READY entry against its checksums; a damaged one is
 * dropped and the caller's pin released.  See kvblend.h. */
kvb_status kvb_store_verify(kvb_store *store, kvb_entry *entry, int *intact)
{
    kvb_status st = store_check_entry(store, entry, "kvb_store_verify");
    if (st != KVB_OK) {
        return st;
    }
    if (intact == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_verify: intact is NULL");
    }
    pthread_mutex_lock(&store->mu);
    int ready = entry->state == ENTRY_READY && entry->pins > 0;
    pthread_mutex_unlock(&store->mu);
    if (!ready) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_verify: entry %p is not pinned by "
                        "kvb_store_acquire",
                        (void *)entry);
    }
    /* Pinned: its rows neither move nor change tier while they are hashed
     * without the lock. */
    *intact = store_sums_match(store, entry);
    if (!*intact) {
        pthread_mutex_lock(&store->mu);
        if (entry->state == ENTRY_READY) {
            store_doom(store, entry);
        }
        store_unpin_locked(store, entry);
        pthread_mutex_unlock(&store->mu);
    }
    return KVB_OK;
}

/* Frees every READY entry without a pin.  Pinned and PENDING entries stay.
 * Cleared entries are not counted as evictions. */
kvb_status kvb_store_clear(kvb_store *store)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_clear: store is NULL");
    }
    pthread_mutex_lock(&store->mu);
    kvb_entry *e = store->lru_head;
    while (e != NULL) {
        kvb_entry *next = e->lru_next;
        if (e->pins == 0) {
            store_destroy(store, e);
        }
        e = next;
    }
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Copies the counters and the current sizes.  num_entries counts every
 * entry, PENDING ones included, as do host_bytes and device_bytes. */
kvb_status kvb_store_get_stats(kvb_store *store, kvb_store_stats *stats)
{
    if (store == NULL || stats == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_get_stats: %s is NULL",
                        store == NULL ? "store" : "stats");
    }
    pthread_mutex_lock(&store->mu);
    *stats = store->stats;
    stats->num_entries = store->count;
    stats->host_bytes = store->bytes[KVB_TIER_HOST];
    stats->device_bytes = store->bytes[KVB_TIER_DEVICE];
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Starts or stops the event log; stopping drops what was not taken. */
kvb_status kvb_store_watch(kvb_store *store, int enabled)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_watch: store is NULL");
    }
    pthread_mutex_lock(&store->mu);
    store->watching = enabled != 0;
    if (!store->watching) {
        free(store->events);
        store->events = NULL;
        store->num_events = store->cap_events = 0;
        store->events_lost = 0;
    }
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Moves the oldest min(cap, recorded) events out of the log, in order. */
kvb_status kvb_store_take_events(kvb_store *store, kvb_store_event *out,
                                 int64_t cap, int64_t *n, int *lost)
{
    if (store == NULL || n == NULL || cap < 0 || (cap > 0 && out == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_take_events: bad arguments (store=%p, "
                        "out=%p, cap=%lld, n=%p)",
                        (void *)store, (void *)out, (long long)cap,
                        (void *)n);
    }
    pthread_mutex_lock(&store->mu);
    int64_t k = store->num_events < cap ? store->num_events : cap;
    if (k > 0) {
        memcpy(out, store->events, (size_t)k * sizeof *out);
        memmove(store->events, store->events + k,
                (size_t)(store->num_events - k) * sizeof *out);
        store->num_events -= k;
    }
    if (lost != NULL) {
        *lost = store->events_lost;
    }
    store->events_lost = 0;
    pthread_mutex_unlock(&store->mu);
    *n = k;
    return KVB_OK;
}

/* Replaces the hash function (NULL restores kvb_hash_tokens_ns); for tests
 * that force collisions.  Only on an empty store, since the entries already
 * indexed were placed by the old function. */
kvb_status kvb_store_debug_set_hash(kvb_store *store,
                                    uint64_t (*fn)(const int32_t *, int64_t))
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_debug_set_hash: store is NULL");
    }
    pthread_mutex_lock(&store->mu);
    int64_t count = store->count;
    if (count == 0) {
        store->debug_hash = fn;
    }
    pthread_mutex_unlock(&store->mu);
    if (count != 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_debug_set_hash: the store holds %lld "
                        "entries (expected an empty store)",
                        (long long)count);
    }
    return KVB_OK;
}

/* Installs a tier allocator; see store.h. */
kvb_status kvb_store_set_allocator(kvb_store *store, kvb_tier tier,
                                   const kvb_allocator *alloc)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_set_allocator: store is NULL");
    }
    if (tier != KVB_TIER_HOST && tier != KVB_TIER_DEVICE) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_set_allocator: tier=%d is unknown "
                        "(expected 0=host, 1=device)",
                        (int)tier);
    }
    if (alloc != NULL && (alloc->alloc == NULL || alloc->free == NULL)) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_set_allocator: alloc->%s is NULL",
                        alloc->alloc == NULL ? "alloc" : "free");
    }
    pthread_mutex_lock(&store->mu);
    int64_t used = store->tier_entries[tier];
    if (used == 0) {
        if (alloc != NULL) {
            store->alloc[tier] = *alloc;
            store->has_alloc[tier] = 1;
        } else if (tier == KVB_TIER_HOST) {
            store->alloc[tier].alloc = store_host_alloc;
            store->alloc[tier].free = store_host_free;
            store->alloc[tier].ctx = NULL;
            store->has_alloc[tier] = 1;
        } else {
            memset(&store->alloc[tier], 0, sizeof store->alloc[tier]);
            store->has_alloc[tier] = 0;
        }
    }
    pthread_mutex_unlock(&store->mu);
    if (used != 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_set_allocator: the %s tier holds %lld "
                        "entries (expected none)",
                        store_tier_name(tier), (long long)used);
    }
    return KVB_OK;
}

/* Installs the mover; see store.h. */
kvb_status kvb_store_set_mover(kvb_store *store, kvb_move_fn move, void *ctx)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_store_set_mover: store is NULL");
    }
    pthread_mutex_lock(&store->mu);
    store->move = move;
    store->move_ctx = move != NULL ? ctx : NULL;
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Turns promotion on acquire on or off; see store.h. */
kvb_status kvb_store_set_promotion(kvb_store *store, int enabled)
{
    if (store == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_store_set_promotion: store is NULL");
    }
    pthread_mutex_lock(&store->mu);
    store->promote = enabled != 0;
    pthread_mutex_unlock(&store->mu);
    return KVB_OK;
}

/* Number of tokens of the entry (0 for NULL). */
int64_t kvb_entry_num_tokens(const kvb_entry *entry)
{
    return entry != NULL ? entry->num_tokens : 0;
}

/* Hash key of the entry (0 for NULL). */
uint64_t kvb_entry_hash(const kvb_entry *entry)
{
    return entry != NULL ? entry->hash : 0;
}

/* The entry's token ids, [num_tokens] (NULL for NULL). */
const int32_t *kvb_entry_tokens(const kvb_entry *entry)
{
    return entry != NULL ? entry->tokens : NULL;
}

/* Positions at which the entry's keys were rotated (NULL for NULL). */
const int64_t *kvb_entry_positions(const kvb_entry *entry)
{
    return entry != NULL ? entry->positions : NULL;
}

/* The tier holding the entry's rows (host for NULL). */
kvb_tier kvb_entry_tier(const kvb_entry *entry)
{
    return entry != NULL ? entry->tier : KVB_TIER_HOST;
}

/* Returns the K (which=0) or V (which=1) rows of `layer`, or NULL for a NULL
 * entry or a layer outside [0, num_layers). */
static void *entry_rows(kvb_entry *entry, int32_t layer, int which)
{
    if (entry == NULL || layer < 0 ||
        layer >= entry->store->params.num_layers) {
        return NULL;
    }
    return store_layer_rows(entry->rows, entry->layer_bytes, layer, which);
}

/* K rows of one layer: contiguous [num_tokens, num_kv_heads, head_size]. */
void *kvb_entry_k(kvb_entry *entry, int32_t layer)
{
    return entry_rows(entry, layer, 0);
}

/* V rows of one layer: contiguous [num_tokens, num_kv_heads, head_size]. */
void *kvb_entry_v(kvb_entry *entry, int32_t layer)
{
    return entry_rows(entry, layer, 1);
}

/* Elements from one layer's K rows to the next layer's; see store.h. */
int64_t kvb_entry_layer_stride(const kvb_entry *entry)
{
    if (entry == NULL || entry->store->params.num_layers < 2) {
        return 0;
    }
    return (int64_t)(2 * entry->layer_bytes /
                     kvb_dtype_size(entry->store->params.dtype));
}
