/*
 * remote.c: the remote tier, whole entries kept as byte strings in a shared
 * Redis or Valkey server (LMCACHE_REMOTE_URL=redis://...), through hiredis.
 *
 * Keys.  An entry (key, hash) is a meta value and n_parts part values:
 *   "kvblend:<key>:<hash>"      the meta (REMOTE_META_BYTES, below)
 *   "kvblend:<key>:<hash>:<i>"  part i, i in [0, n_parts)
 * key and hash are 16 lower-case hex digits each.  Part i holds bytes
 * [i * part_bytes, min((i + 1) * part_bytes, total_len)) of the entry, so
 * no single value exceeds part_bytes (Redis refuses bulk strings over
 * proto-max-bulk-len, 512 MiB by default).  A put writes every part and,
 * only once the server has acknowledged all of them, the meta: an entry is
 * visible only when whole.  A get reads the meta, then fetches all parts in
 * one pipelined round trip; a part that is missing (evicted) or of the
 * wrong length makes the entry a miss.  The entry's bytes are a blob that
 * tiers.c checks (kvb_blob_check), so this file never parses them.
 *
 * The meta value, 56 bytes, little-endian:
 *    0 u32 magic      REMOTE_META_MAGIC ("KVBR")
 *    4 u32 version    REMOTE_META_VERSION
 *    8 u64 key        the entry's tier key
 *   16 u64 hash       the entry's segment hash
 *   24 u64 total_len  bytes of the entry
 *   32 u32 n_parts    ceil(total_len / part_bytes)
 *   36 u32 pad        0
 *   40 u64 part_bytes the writer's part size
 *   48 u64 checksum   XXH3-64 (kvb_checksum, seed 0) of bytes [0, 48)
 * A meta that fails any check (length, magic, version, identity, sizes,
 * checksum) is logged as a warning and read as a miss.
 *
 * Connections.  A pool of at most REMOTE_POOL_MAX blocking hiredis
 * contexts under one mutex, so that a long write-behind put on one
 * connection does not hold up a lookup on another.  A call takes an idle
 * context, or opens a new one while fewer than REMOTE_POOL_MAX exist, or
 * waits on a condition variable for one to come back.  The network work
 * runs without the mutex held.  Every connect is bounded by
 * connect_timeout_ms and every socket read and write by command_timeout_ms
 * (SO_RCVTIMEO/SO_SNDTIMEO through redisSetTimeout): a read or write that
 * makes no progress for that long fails, so no call hangs on a dead or
 * silent server (a large put to a server that stops reading fails after a
 * few timeouts: the first write returns short, the next one fails).
 * Resolving a host name is getaddrinfo's and is not bounded by these; an
 * IP address needs no resolution.
 *
 * Failures.  Any failure on a context (an I/O error, a timeout, a reply
 * that does not parse, an error reply to one of our commands) frees that
 * context, frees the idle ones too (they most likely share its fate: a
 * restarted server has closed them all) and records the time.  Until
 * retry_ms have passed since then, a call that would need a new connection
 * fails at once with KVB_ERR_IO instead of connecting again: a server that
 * is down costs one timeout per retry_ms, not one per call.
 *
 * Without hiredis (KVB_WITH_HIREDIS undefined) the tier is refused at open
 * with KVB_ERR_UNSUPPORTED and every other call returns that status.
 */
#define _POSIX_C_SOURCE 200809L /* sigaction, clock_gettime, strncasecmp */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "tiers.h"

/* Longest URL shown in messages (longer ones are cut). */
#define REMOTE_URL_SHOWN 512

/*
 * Copies `url` to out[0..cap) for messages, with its password (everything
 * between the first ':' after "://" and the last '@') replaced by "***";
 * credentials without a ':' are masked whole.  A NULL url is shown as
 * "(null)".  The result is always NUL-terminated and may be cut.
 */
static void remote_mask_url(const char *url, char *out, size_t cap)
{
    if (url == NULL) {
        snprintf(out, cap, "(null)");
        return;
    }
    const char *sep = strstr(url, "://");
    const char *start = sep != NULL ? sep + 3 : url;
    const char *at = strrchr(start, '@');
    if (at == NULL) {
        snprintf(out, cap, "%s", url);
        return;
    }
    const char *colon = memchr(start, ':', (size_t)(at - start));
    const char *keep_end = colon != NULL ? colon + 1 : start;
    snprintf(out, cap, "%.*s***%s", (int)(keep_end - url), url, at);
}

#if defined(KVB_WITH_HIREDIS) && KVB_WITH_HIREDIS

#include <assert.h>
#include <pthread.h>
#include <signal.h>
#include <strings.h>
#include <time.h>

#include <hiredis/hiredis.h>

#define REMOTE_DEFAULT_PORT 6379
#define REMOTE_POOL_MAX 4 /* connections per remote */
#define REMOTE_HOST_MAX 255
#define REMOTE_META_MAGIC 0x5242564Bu /* "KVBR" read as little-endian bytes */
#define REMOTE_META_VERSION 1u
#define REMOTE_META_BYTES 56
#define REMOTE_META_SUMMED 48 /* bytes covered by the meta checksum */
/* Sanity caps on what a meta may describe (and a put may write). */
#define REMOTE_MAX_TOTAL ((uint64_t)64 << 30) /* 64 GiB */
#define REMOTE_MAX_PART ((size_t)512 << 20)   /* proto-max-bulk-len */
#define REMOTE_MAX_PARTS ((uint64_t)1 << 20)
/* A put keeps at most this many part bytes in flight (hiredis copies each
 * queued command into its output buffer) before reading their replies. */
#define REMOTE_PUT_WINDOW ((size_t)64 << 20)
/* A del probing for the parts of an entry whose meta is gone unlinks
 * parts in batches of this many. */
#define REMOTE_DEL_BATCH 64u
#define REMOTE_KEY_CHARS 64 /* "kvblend:" + 16 + ":" + 16 + ":" + index */
#define REMOTE_WHY_CHARS 256

struct kvb_remote {
    char host[REMOTE_HOST_MAX + 1]; /* without IPv6 brackets */
    int port;
    int db;
    char *user;      /* NULL when not given; owned, NUL-terminated */
    size_t user_len; /* may hold NULs from %00: sent binary-safe */
    char *password;  /* NULL when not given; owned */
    size_t password_len;
    kvb_remote_options opts;
    char name[REMOTE_HOST_MAX + 32]; /* "host:port/db", for messages */

    pthread_mutex_t mu; /* guards everything below */
    pthread_cond_t cv;  /* signalled when a context is freed or idle */
    redisContext *idle[REMOTE_POOL_MAX];
    int num_idle;
    int num_open;          /* idle + in use + being connected */
    int down;              /* a failure is recorded in failed_at_ms */
    int64_t failed_at_ms;  /* CLOCK_MONOTONIC */
    char why[REMOTE_WHY_CHARS]; /* what the last failure was */
};

/* Parsed form of a remote URL; user and password are owned (malloc'd) and
 * NULL when absent. */
typedef struct remote_url {
    char host[REMOTE_HOST_MAX + 1];
    int bracketed; /* host was written as [v6-address] */
    int port;
    int db;
    char *user;
    size_t user_len;
    char *password;
    size_t password_len;
} remote_url;

/* Returns CLOCK_MONOTONIC in milliseconds. */
static int64_t remote_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Converts a positive millisecond count to a struct timeval. */
static struct timeval remote_tv(int ms)
{
    struct timeval tv;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    return tv;
}

/* Writes v to p[0..4) little-endian. */
static void remote_put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
}

/* Writes v to p[0..8) little-endian. */
static void remote_put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
}

/* Reads a little-endian u32 from p[0..4). */
static uint32_t remote_get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Reads a little-endian u64 from p[0..8). */
static uint64_t remote_get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Writes the meta key of (key, hash) to out[REMOTE_KEY_CHARS]. */
static void remote_meta_key(char *out, uint64_t key, uint64_t hash)
{
    snprintf(out, REMOTE_KEY_CHARS, "kvblend:%016llx:%016llx",
             (unsigned long long)key, (unsigned long long)hash);
}

/* Writes the key of part `index` of (key, hash) to out[REMOTE_KEY_CHARS]. */
static void remote_part_key(char *out, uint64_t key, uint64_t hash,
                            uint64_t index)
{
    remote_meta_key(out, key, hash);
    size_t at = strlen(out);
    snprintf(out + at, REMOTE_KEY_CHARS - at, ":%llu",
             (unsigned long long)index);
}

/* Number of parts of part_bytes (> 0) that hold total bytes. */
static uint64_t remote_num_parts(uint64_t total, uint64_t part_bytes)
{
    return total / part_bytes + (total % part_bytes != 0);
}

/* Fills out[REMOTE_META_BYTES] with the sealed meta of an entry. */
static void remote_meta_encode(unsigned char *out, uint64_t key,
                               uint64_t hash, uint64_t total,
                               uint32_t n_parts, uint64_t part_bytes)
{
    memset(out, 0, REMOTE_META_BYTES);
    remote_put_u32(out + 0, REMOTE_META_MAGIC);
    remote_put_u32(out + 4, REMOTE_META_VERSION);
    remote_put_u64(out + 8, key);
    remote_put_u64(out + 16, hash);
    remote_put_u64(out + 24, total);
    remote_put_u32(out + 32, n_parts);
    remote_put_u64(out + 40, part_bytes);
    remote_put_u64(out + 48, kvb_checksum(out, REMOTE_META_SUMMED, 0));
}

/*
 * Checks that meta[0..len) is an intact meta of (key, hash) describing a
 * sane entry and returns 1 with its sizes in *total, *n_parts and
 * *part_bytes; otherwise returns 0 and points *why at a static reason.
 */
static int remote_meta_decode(const void *meta, size_t len, uint64_t key,
                              uint64_t hash, uint64_t *total,
                              uint64_t *n_parts, uint64_t *part_bytes,
                              const char **why)
{
    const unsigned char *p = meta;
    if (len != REMOTE_META_BYTES) {
        *why = "length";
        return 0;
    }
    if (remote_get_u32(p) != REMOTE_META_MAGIC) {
        *why = "magic";
        return 0;
    }
    if (remote_get_u32(p + 4) != REMOTE_META_VERSION) {
        *why = "version";
        return 0;
    }
    if (remote_get_u64(p + 48) != kvb_checksum(p, REMOTE_META_SUMMED, 0)) {
        *why = "checksum";
        return 0;
    }
    if (remote_get_u64(p + 8) != key || remote_get_u64(p + 16) != hash) {
        *why = "identity";
        return 0;
    }
    *total = remote_get_u64(p + 24);
    *n_parts = remote_get_u32(p + 32);
    *part_bytes = remote_get_u64(p + 40);
    if (*total == 0 || *total > REMOTE_MAX_TOTAL || *total > SIZE_MAX ||
        *part_bytes == 0 || *part_bytes > REMOTE_MAX_PART ||
        *n_parts > REMOTE_MAX_PARTS ||
        *n_parts != remote_num_parts(*total, *part_bytes)) {
        *why = "sizes";
        return 0;
    }
    return 1;
}

/* Value of one hex digit, or -1. */
static int remote_hex(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/*
 * Returns a new malloc'd, NUL-terminated copy of s[0..n) with %XX escapes
 * decoded (a '%' not followed by two hex digits is kept as it is, as
 * Python's urllib.parse.unquote does) and its length in *out_len, or NULL
 * when out of memory.  The caller frees it.
 */
static char *remote_unescape(const char *s, size_t n, size_t *out_len)
{
    char *out = malloc(n + 1);
    if (out == NULL) {
        return NULL;
    }
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n) {
            int h = remote_hex(s[i + 1]);
            int l = remote_hex(s[i + 2]);
            if (h >= 0 && l >= 0) {
                out[j++] = (char)(h * 16 + l);
                i += 2;
                continue;
            }
        }
        out[j++] = s[i];
    }
    out[j] = '\0';
    *out_len = j;
    return out;
}

/* Frees the credentials of a parsed URL. */
static void remote_url_free(remote_url *u)
{
    free(u->user);
    free(u->password);
    u->user = NULL;
    u->password = NULL;
}

/*
 * Parses "redis://[[user]:password@]host[:port][/db]" (or "valkey://") into
 * *u.  `shown` is the URL with its password masked, for messages.  Returns
 * KVB_ERR_INVALID naming the URL and the problem (scheme, credentials,
 * host, port, db, trailing text), KVB_ERR_NOMEM, or KVB_OK; on any failure
 * *u owns nothing.
 */
static kvb_status remote_parse_url(const char *url, const char *shown,
                                   remote_url *u)
{
    static const char form[] =
        "expected redis://[[user]:password@]host[:port][/db] or valkey://...";
    memset(u, 0, sizeof *u);
    u->port = REMOTE_DEFAULT_PORT;
    const char *p;
    if (strncasecmp(url, "redis://", 8) == 0) {
        p = url + 8;
    } else if (strncasecmp(url, "valkey://", 9) == 0) {
        p = url + 9;
    } else if (strncasecmp(url, "rediss://", 9) == 0 ||
               strncasecmp(url, "valkeys://", 10) == 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "remote URL '%s': TLS is not supported (%s)", shown,
                        form);
    } else {
        return kvb_fail(KVB_ERR_INVALID,
                        "remote URL '%s': unknown scheme (%s)", shown, form);
    }

    /* Credentials: everything before the last '@' (a password may hold
     * '/' or '@'; the host, port and db never hold '@'). */
    const char *at = strrchr(p, '@');
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon == NULL) {
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': credentials must be written "
                            "[user]:password@ (%s)",
                            shown, form);
        }
        if (colon + 1 == at) {
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': empty password (%s)", shown,
                            form);
        }
        if (colon > p) {
            u->user = remote_unescape(p, (size_t)(colon - p), &u->user_len);
            if (u->user == NULL) {
                return kvb_fail(KVB_ERR_NOMEM, "remote URL '%s': out of memory",
                                shown);
            }
        }
        u->password = remote_unescape(colon + 1, (size_t)(at - colon - 1),
                                      &u->password_len);
        if (u->password == NULL) {
            remote_url_free(u);
            return kvb_fail(KVB_ERR_NOMEM, "remote URL '%s': out of memory",
                            shown);
        }
        p = at + 1;
    }

    /* Host: a name, an IPv4 address or a bracketed IPv6 address. */
    const char *host = p;
    size_t host_len;
    if (*p == '[') {
        const char *close = strchr(p, ']');
        if (close == NULL) {
            remote_url_free(u);
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': '[' without ']' around the "
                            "IPv6 host (%s)",
                            shown, form);
        }
        host = p + 1;
        host_len = (size_t)(close - host);
        u->bracketed = 1;
        p = close + 1;
    } else {
        host_len = strcspn(p, ":/");
        p += host_len;
    }
    if (host_len == 0) {
        remote_url_free(u);
        return kvb_fail(KVB_ERR_INVALID, "remote URL '%s': empty host (%s)",
                        shown, form);
    }
    if (host_len > REMOTE_HOST_MAX) {
        remote_url_free(u);
        return kvb_fail(KVB_ERR_INVALID,
                        "remote URL '%s': host is %zu characters long "
                        "(at most %d)",
                        shown, host_len, REMOTE_HOST_MAX);
    }
    for (size_t i = 0; i < host_len; i++) {
        unsigned char c = (unsigned char)host[i];
        if (c <= ' ' || c == 0x7f || c == '?' || c == '#' || c == '@') {
            remote_url_free(u);
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': bad character in the host "
                            "(%s)",
                            shown, form);
        }
    }
    memcpy(u->host, host, host_len);
    u->host[host_len] = '\0';

    /* Port: 1..65535. */
    if (*p == ':') {
        p++;
        size_t n = strcspn(p, "/");
        long port = 0;
        int ok = n > 0 && n <= 5;
        for (size_t i = 0; ok && i < n; i++) {
            ok = p[i] >= '0' && p[i] <= '9';
            port = port * 10 + (p[i] - '0');
        }
        if (!ok || port < 1 || port > 65535) {
            remote_url_free(u);
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': port '%.*s' is not a number in "
                            "1..65535",
                            shown, (int)(n > 16 ? 16 : n), p);
        }
        u->port = (int)port;
        p += n;
    } else if (*p != '/' && *p != '\0') {
        remote_url_free(u);
        return kvb_fail(KVB_ERR_INVALID,
                        "remote URL '%s': unexpected '%c' after the host (%s)",
                        shown, *p, form);
    }

    /* Database: a non-negative integer ("/" alone means 0). */
    if (*p == '/') {
        p++;
        size_t n = strlen(p);
        long long db = 0;
        int ok = n <= 10;
        for (size_t i = 0; ok && i < n; i++) {
            ok = p[i] >= '0' && p[i] <= '9';
            db = db * 10 + (p[i] - '0');
        }
        if (!ok || db > INT_MAX) {
            remote_url_free(u);
            return kvb_fail(KVB_ERR_INVALID,
                            "remote URL '%s': db '%.*s' is not a "
                            "non-negative integer",
                            shown, (int)(n > 16 ? 16 : n), p);
        }
        u->db = (int)db;
    }
    return KVB_OK;
}

/*
 * Ignores SIGPIPE process-wide when its disposition is still the default.
 * hiredis writes with write(2), not send(..., MSG_NOSIGNAL), so a write to
 * a server that has closed the connection raises SIGPIPE, whose default
 * action kills the process; with it ignored the write fails with EPIPE and
 * the call returns KVB_ERR_IO.  A handler the program installed (or an
 * explicit SIG_IGN, as CPython sets at start-up) is left alone; only a
 * program that never chose gets this change, and it is logged.
 */
static void remote_ignore_sigpipe(void)
{
    struct sigaction old;
    if (sigaction(SIGPIPE, NULL, &old) != 0) {
        return;
    }
    if ((old.sa_flags & SA_SIGINFO) == 0 && old.sa_handler == SIG_DFL) {
        struct sigaction ign;
        memset(&ign, 0, sizeof ign);
        ign.sa_handler = SIG_IGN;
        sigemptyset(&ign.sa_mask);
        if (sigaction(SIGPIPE, &ign, NULL) == 0) {
            kvb_log(KVB_LOG_DEBUG,
                    "remote tier: SIGPIPE was at its default (terminate); "
                    "now ignored so that a closed connection is an error");
        }
    }
}

/* Returns 1 when the error recorded on context c is a timeout. */
static int remote_is_timeout(const redisContext *c)
{
#ifdef REDIS_ERR_TIMEOUT
    if (c->err == REDIS_ERR_TIMEOUT) {
        return 1;
    }
#endif
    /* SO_RCVTIMEO/SO_SNDTIMEO expiry surfaces as EAGAIN; a connect timeout
     * as ETIMEDOUT. */
    return c->err == REDIS_ERR_IO &&
           (strstr(c->errstr, "temporarily unavailable") != NULL ||
            strstr(c->errstr, "timed out") != NULL ||
            strstr(c->errstr, "timeout") != NULL);
}

/*
 * Describes what is wrong with `reply` to a command sent on c into
 * why[0..cap) and returns 1, or returns 0 when the reply is usable (not
 * NULL and not an error reply).  A NULL reply means the context failed
 * (c->err): the description is hiredis's, marked as a timeout when it is
 * one.  `timeout_ms` is the bound that expired, for that message.
 */
static int remote_reply_bad(const redisContext *c, const redisReply *reply,
                            int timeout_ms, char *why, size_t cap)
{
    if (reply == NULL) {
        if (c->err == 0) {
            snprintf(why, cap, "no reply (out of memory?)");
        } else if (remote_is_timeout(c)) {
            snprintf(why, cap, "timeout: no answer within %d ms (%s)",
                     timeout_ms, c->errstr);
        } else {
            snprintf(why, cap, "%s", c->errstr[0] != '\0' ? c->errstr
                                                          : "I/O error");
        }
        return 1;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        snprintf(why, cap, "server error: %.*s",
                 (int)(reply->len > 200 ? 200 : reply->len), reply->str);
        return 1;
    }
    return 0;
}

/*
 * Records a failure of the context c (in use by this call, and counted in
 * num_open; c may be NULL when the slot held no context yet): frees it and
 * every idle context, marks the server down as of now and wakes waiters.
 * Returns KVB_ERR_IO with "redis <name>: <what>: <detail>" as the message.
 */
static kvb_status remote_fail(kvb_remote *r, redisContext *c,
                              const char *what, const char *detail)
{
    redisContext *drop[REMOTE_POOL_MAX];
    int num_drop;
    char why[REMOTE_WHY_CHARS];
    snprintf(why, sizeof why, "%s: %s", what, detail);
    kvb_status st = kvb_fail(KVB_ERR_IO, "redis %s: %s", r->name, why);

    pthread_mutex_lock(&r->mu);
    num_drop = r->num_idle;
    memcpy(drop, r->idle, sizeof(drop[0]) * (size_t)num_drop);
    r->num_idle = 0;
    r->num_open -= num_drop + 1;
    r->down = 1;
    r->failed_at_ms = remote_now_ms();
    memcpy(r->why, why, sizeof why);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);

    if (c != NULL) {
        redisFree(c);
    }
    for (int i = 0; i < num_drop; i++) {
        redisFree(drop[i]);
    }
    kvb_log(KVB_LOG_DEBUG, "redis %s: %s (connection dropped)", r->name, why);
    return st;
}

/*
 * Fails the context c after `reply` to `what` came back bad (see
 * remote_reply_bad); frees the reply.  Returns KVB_ERR_IO.
 */
static kvb_status remote_fail_reply(kvb_remote *r, redisContext *c,
                                    redisReply *reply, const char *what)
{
    char why[REMOTE_WHY_CHARS];
    remote_reply_bad(c, reply, r->opts.command_timeout_ms, why, sizeof why);
    if (reply != NULL) {
        freeReplyObject(reply);
    }
    return remote_fail(r, c, what, why);
}

/*
 * Opens a new connection for a slot already counted in num_open: connects
 * within connect_timeout_ms, sets the command timeout, authenticates and
 * selects the database.  On success *out is the context (the caller's
 * until it releases it) and the server is marked up; on failure the slot
 * is released (remote_fail) and KVB_ERR_IO names the step that failed.
 */
static kvb_status remote_connect(kvb_remote *r, redisContext **out)
{
    char why[REMOTE_WHY_CHARS];
    redisContext *c = redisConnectWithTimeout(
        r->host, r->port, remote_tv(r->opts.connect_timeout_ms));
    if (c == NULL) {
        return remote_fail(r, NULL, "connect", "out of memory");
    }
    if (c->err != 0) {
        if (remote_is_timeout(c)) {
            snprintf(why, sizeof why, "timeout: no answer within %d ms (%s)",
                     r->opts.connect_timeout_ms, c->errstr);
        } else {
            snprintf(why, sizeof why, "%s", c->errstr);
        }
        return remote_fail(r, c, "connect", why);
    }
    if (redisSetTimeout(c, remote_tv(r->opts.command_timeout_ms)) !=
        REDIS_OK) {
        snprintf(why, sizeof why, "%s", c->errstr);
        return remote_fail(r, c, "setting the command timeout", why);
    }
    if (r->password != NULL) {
        redisReply *reply;
        if (r->user != NULL) {
            reply = redisCommand(c, "AUTH %b %b", r->user, r->user_len,
                                 r->password, r->password_len);
        } else {
            reply = redisCommand(c, "AUTH %b", r->password, r->password_len);
        }
        if (remote_reply_bad(c, reply, r->opts.command_timeout_ms, why,
                             sizeof why)) {
            return remote_fail_reply(r, c, reply,
                                     r->user != NULL ? "AUTH (user, password)"
                                                     : "AUTH (password)");
        }
        freeReplyObject(reply);
    }
    if (r->db != 0) {
        redisReply *reply = redisCommand(c, "SELECT %d", r->db);
        if (remote_reply_bad(c, reply, r->opts.command_timeout_ms, why,
                             sizeof why)) {
            return remote_fail_reply(r, c, reply, "SELECT");
        }
        freeReplyObject(reply);
    }
    pthread_mutex_lock(&r->mu);
    r->down = 0;
    pthread_mutex_unlock(&r->mu);
    *out = c;
    return KVB_OK;
}

/*
 * Takes a connection for one call: an idle one, else a new one while fewer
 * than REMOTE_POOL_MAX exist, else waits for one to come back.  A new
 * connection is not attempted within retry_ms of the last failure: the
 * call fails at once with KVB_ERR_IO saying so.  On KVB_OK the caller owns
 * *out until remote_release or remote_fail.
 */
static kvb_status remote_acquire(kvb_remote *r, redisContext **out)
{
    pthread_mutex_lock(&r->mu);
    for (;;) {
        if (r->num_idle > 0) {
            *out = r->idle[--r->num_idle];
            pthread_mutex_unlock(&r->mu);
            return KVB_OK;
        }
        if (r->num_open < REMOTE_POOL_MAX) {
            int64_t since = remote_now_ms() - r->failed_at_ms;
            if (r->down && since < r->opts.retry_ms) {
                char why[REMOTE_WHY_CHARS];
                memcpy(why, r->why, sizeof why);
                pthread_mutex_unlock(&r->mu);
                return kvb_fail(KVB_ERR_IO,
                                "redis %s: down since %lld ms ago (%s); "
                                "retrying after %d ms",
                                r->name, (long long)since, why,
                                r->opts.retry_ms);
            }
            r->num_open++;
            break;
        }
        pthread_cond_wait(&r->cv, &r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    return remote_connect(r, out);
}

/* Returns a healthy connection to the pool and wakes one waiter. */
static void remote_release(kvb_remote *r, redisContext *c)
{
    pthread_mutex_lock(&r->mu);
    r->idle[r->num_idle++] = c;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Frees every string of a remote and the remote (no context may be open);
 * NULL is a no-op. */
static void remote_free(kvb_remote *r)
{
    if (r == NULL) {
        return;
    }
    free(r->user);
    free(r->password);
    free(r);
}

/*
 * Opens the remote tier (tiers.h): checks the options, parses the URL,
 * makes SIGPIPE harmless (remote_ignore_sigpipe) and tries one connection.
 * A server that cannot be used now is logged as a warning and the failure
 * recorded (calls fail fast for retry_ms); open still succeeds.  On
 * KVB_OK the caller owns *out and frees it with kvb_remote_close.
 */
kvb_status kvb_remote_open(const char *url, const kvb_remote_options *opts,
                           kvb_remote **out)
{
    char shown[REMOTE_URL_SHOWN];
    remote_url u;
    if (out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_remote_open: out is NULL");
    }
    *out = NULL;
    if (url == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_remote_open: url is NULL");
    }
    remote_mask_url(url, shown, sizeof shown);
    if (opts == NULL) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_remote_open('%s'): opts is NULL", shown);
    }
    if (opts->connect_timeout_ms <= 0 || opts->command_timeout_ms <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_remote_open('%s'): connect_timeout_ms=%d and "
                        "command_timeout_ms=%d must both be > 0",
                        shown, opts->connect_timeout_ms,
                        opts->command_timeout_ms);
    }
    if (opts->part_bytes == 0 || opts->part_bytes > REMOTE_MAX_PART) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_remote_open('%s'): part_bytes=%zu is not in "
                        "1..%zu (Redis's largest value)",
                        shown, opts->part_bytes, REMOTE_MAX_PART);
    }
    if (opts->retry_ms < 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_remote_open('%s'): retry_ms=%d must be >= 0",
                        shown, opts->retry_ms);
    }
    kvb_status st = remote_parse_url(url, shown, &u);
    if (st != KVB_OK) {
        return st;
    }

    kvb_remote *r = calloc(1, sizeof *r);
    if (r == NULL) {
        remote_url_free(&u);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_remote_open('%s'): out of memory",
                        shown);
    }
    memcpy(r->host, u.host, sizeof r->host);
    r->port = u.port;
    r->db = u.db;
    r->opts = *opts;
    /* the credentials move into r (freed by remote_free) */
    r->user = u.user, r->user_len = u.user_len;
    r->password = u.password, r->password_len = u.password_len;
    snprintf(r->name, sizeof r->name, u.bracketed ? "[%s]:%d/%d" : "%s:%d/%d",
             r->host, r->port, r->db);
    if (pthread_mutex_init(&r->mu, NULL) != 0) {
        remote_free(r);
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_remote_open('%s'): cannot create a mutex", shown);
    }
    if (pthread_cond_init(&r->cv, NULL) != 0) {
        pthread_mutex_destroy(&r->mu);
        remote_free(r);
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_remote_open('%s'): cannot create a condition "
                        "variable",
                        shown);
    }
    remote_ignore_sigpipe();

    redisContext *c;
    r->num_open = 1;
    if (remote_connect(r, &c) == KVB_OK) {
        remote_release(r, c);
        kvb_log(KVB_LOG_INFO, "remote tier: connected to redis %s", r->name);
    } else {
        kvb_log(KVB_LOG_WARNING,
                "remote tier: %s (calls fail until the server answers; next "
                "attempt in %d ms)",
                kvb_last_error(), r->opts.retry_ms);
        kvb_clear_error();
    }
    *out = r;
    return KVB_OK;
}

/*
 * Closes every connection and frees the remote (tiers.h).  No call on it
 * may be in flight or follow.  NULL is a no-op.
 */
void kvb_remote_close(kvb_remote *remote)
{
    if (remote == NULL) {
        return;
    }
    pthread_mutex_lock(&remote->mu);
    assert(remote->num_open == remote->num_idle); /* no call in flight */
    for (int i = 0; i < remote->num_idle; i++) {
        redisFree(remote->idle[i]);
    }
    remote->num_open -= remote->num_idle;
    remote->num_idle = 0;
    pthread_mutex_unlock(&remote->mu);
    pthread_cond_destroy(&remote->cv);
    pthread_mutex_destroy(&remote->mu);
    remote_free(remote);
}

/* Checks the handle and key arguments shared by the calls below; `fn`
 * names the call in the message. */
static kvb_status remote_check_args(const kvb_remote *remote, const void *a,
                                    const char *a_name, const char *fn)
{
    if (remote == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: remote is NULL", fn);
    }
    if (a == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL", fn, a_name);
    }
    return KVB_OK;
}

/*
 * Sets *found to 1 when the meta of (key, hash) exists on the server
 * (EXISTS; the parts are not checked), else 0.  KVB_ERR_IO when the server
 * cannot be used (*found is then 0).
 */
kvb_status kvb_remote_contains(kvb_remote *remote, uint64_t key,
                               uint64_t hash, int *found)
{
    kvb_status st =
        remote_check_args(remote, found, "found", "kvb_remote_contains");
    if (st != KVB_OK) {
        return st;
    }
    *found = 0;
    redisContext *c;
    if ((st = remote_acquire(remote, &c)) != KVB_OK) {
        return st;
    }
    char meta_key[REMOTE_KEY_CHARS];
    remote_meta_key(meta_key, key, hash);
    redisReply *reply = redisCommand(c, "EXISTS %s", meta_key);
    if (reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        if (reply != NULL && reply->type != REDIS_REPLY_ERROR) {
            freeReplyObject(reply);
            return remote_fail(remote, c, "EXISTS", "protocol error: "
                                                    "not an integer reply");
        }
        return remote_fail_reply(remote, c, reply, "EXISTS");
    }
    *found = reply->integer > 0;
    freeReplyObject(reply);
    remote_release(remote, c);
    return KVB_OK;
}

/*
 * Reads the meta of (key, hash) on c.  Returns KVB_OK with *have 1 and the
 * sizes when a valid meta is there, *have 0 when it is missing or invalid
 * (an invalid one is logged as a warning when `warn`); KVB_ERR_IO after
 * failing c (remote_fail) when the server cannot be used.
 */
static kvb_status remote_read_meta(kvb_remote *r, redisContext *c,
                                   uint64_t key, uint64_t hash, int warn,
                                   int *have, uint64_t *total,
                                   uint64_t *n_parts, uint64_t *part_bytes)
{
    char meta_key[REMOTE_KEY_CHARS];
    remote_meta_key(meta_key, key, hash);
    *have = 0;
    redisReply *reply = redisCommand(c, "GET %s", meta_key);
    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        return remote_fail_reply(r, c, reply, "GET of the meta");
    }
    if (reply->type == REDIS_REPLY_NIL) {
        freeReplyObject(reply);
        return KVB_OK;
    }
    if (reply->type != REDIS_REPLY_STRING) {
        freeReplyObject(reply);
        return remote_fail(r, c, "GET of the meta",
                           "protocol error: not a string reply");
    }
    const char *why = NULL;
    *have = remote_meta_decode(reply->str, reply->len, key, hash, total,
                               n_parts, part_bytes, &why);
    if (!*have && warn) {
        kvb_log(KVB_LOG_WARNING,
                "redis %s: %s holds an invalid meta value (%s, %zu bytes): "
                "read as a miss",
                r->name, meta_key, why, (size_t)reply->len);
    }
    freeReplyObject(reply);
    return KVB_OK;
}

/*
 * Reads the entry (key, hash) into a new malloc'd buffer of *len bytes
 * (*buf; the caller frees it): the meta, then every part in one pipelined
 * round trip.  A missing or invalid meta, or a part that is missing or of
 * the wrong length, is a miss: KVB_OK with *buf NULL and *len 0.
 * KVB_ERR_IO when the server cannot be used, KVB_ERR_NOMEM when the buffer
 * cannot be allocated.
 */
kvb_status kvb_remote_get(kvb_remote *remote, uint64_t key, uint64_t hash,
                          void **buf, size_t *len)
{
    kvb_status st = remote_check_args(remote, buf, "buf", "kvb_remote_get");
    if (st == KVB_OK) {
        st = remote_check_args(remote, len, "len", "kvb_remote_get");
    }
    if (st != KVB_OK) {
        return st;
    }
    *buf = NULL;
    *len = 0;
    redisContext *c;
    if ((st = remote_acquire(remote, &c)) != KVB_OK) {
        return st;
    }
    int have;
    uint64_t total, n_parts, part_bytes;
    st = remote_read_meta(remote, c, key, hash, 1, &have, &total, &n_parts,
                          &part_bytes);
    if (st != KVB_OK) {
        return st;
    }
    if (!have) {
        remote_release(remote, c);
        return KVB_OK;
    }
    unsigned char *data = malloc((size_t)total);
    if (data == NULL) {
        remote_release(remote, c);
        return kvb_fail(KVB_ERR_NOMEM,
                        "redis %s: cannot allocate %llu bytes for an entry",
                        remote->name, (unsigned long long)total);
    }
    char part_key[REMOTE_KEY_CHARS];
    for (uint64_t i = 0; i < n_parts; i++) {
        remote_part_key(part_key, key, hash, i);
        if (redisAppendCommand(c, "GET %s", part_key) != REDIS_OK) {
            free(data);
            return remote_fail(remote, c, "queueing GET of a part",
                               c->err != 0 ? c->errstr : "out of memory");
        }
    }
    /* Read every reply, even after a bad part, so that a miss leaves the
     * connection in step and it can go back to the pool. */
    uint64_t bad_part = n_parts; /* the first bad part, if any */
    uint64_t bad_want = 0;
    size_t bad_len = 0;          /* its length; 0 when missing */
    int bad_missing = 0;
    for (uint64_t i = 0; i < n_parts; i++) {
        void *rv = NULL;
        if (redisGetReply(c, &rv) != REDIS_OK || rv == NULL) {
            free(data);
            if (rv != NULL) {
                freeReplyObject(rv);
            }
            return remote_fail_reply(remote, c, NULL, "GET of the parts");
        }
        redisReply *reply = rv;
        if (reply->type == REDIS_REPLY_ERROR) {
            free(data);
            return remote_fail_reply(remote, c, reply, "GET of a part");
        }
        uint64_t off = i * part_bytes;
        uint64_t want = total - off < part_bytes ? total - off : part_bytes;
        if (reply->type == REDIS_REPLY_STRING && reply->len == want) {
            memcpy(data + off, reply->str, (size_t)want);
        } else if (bad_part == n_parts) {
            bad_part = i;
            bad_want = want;
            bad_missing = reply->type != REDIS_REPLY_STRING;
            bad_len = reply->type == REDIS_REPLY_STRING ? reply->len : 0;
        }
        freeReplyObject(reply);
    }
    remote_release(remote, c);
    if (bad_part != n_parts) {
        /* A missing part is what Redis's own eviction (maxmemory) leaves;
         * a part of the wrong length, a concurrent rewrite or damage. */
        if (bad_missing) {
            kvb_log(KVB_LOG_DEBUG,
                    "redis %s: entry %016llx:%016llx: part %llu of %llu is "
                    "missing: read as a miss",
                    remote->name, (unsigned long long)key,
                    (unsigned long long)hash, (unsigned long long)bad_part,
                    (unsigned long long)n_parts);
        } else {
            kvb_log(KVB_LOG_WARNING,
                    "redis %s: entry %016llx:%016llx: part %llu of %llu has "
                    "%zu bytes, expected %llu: read as a miss",
                    remote->name, (unsigned long long)key,
                    (unsigned long long)hash, (unsigned long long)bad_part,
                    (unsigned long long)n_parts, bad_len,
                    (unsigned long long)bad_want);
        }
        free(data);
        return KVB_OK;
    }
    *buf = data;
    *len = (size_t)total;
    return KVB_OK;
}

/*
 * Reads the replies to `count` queued commands on c, each of which must be
 * a status reply ("OK").  Returns KVB_OK, or KVB_ERR_IO after failing c.
 */
static kvb_status remote_read_ok(kvb_remote *r, redisContext *c,
                                 uint64_t count, const char *what)
{
    for (uint64_t i = 0; i < count; i++) {
        void *rv = NULL;
        if (redisGetReply(c, &rv) != REDIS_OK || rv == NULL) {
            if (rv != NULL) {
                freeReplyObject(rv);
            }
            return remote_fail_reply(r, c, NULL, what);
        }
        redisReply *reply = rv;
        if (reply->type != REDIS_REPLY_STATUS) {
            if (reply->type == REDIS_REPLY_ERROR) {
                return remote_fail_reply(r, c, reply, what);
            }
            freeReplyObject(reply);
            return remote_fail(r, c, what,
                               "protocol error: not a status reply");
        }
        freeReplyObject(reply);
    }
    return KVB_OK;
}

/*
 * Writes buf[0..len) as the entry (key, hash): SET of every part (in
 * pipelined batches of at most REMOTE_PUT_WINDOW bytes, all replies read),
 * then, only when every part was stored, SET of the meta, which makes the
 * entry visible.  No expiry is set.  KVB_ERR_INVALID for a NULL or empty
 * buffer or one over the size caps; KVB_ERR_IO when the server cannot be
 * used or refuses a SET (e.g. out of memory): parts already written stay
 * until overwritten or evicted, invisible without their meta.  buf is only
 * read.
 */
kvb_status kvb_remote_put(kvb_remote *remote, uint64_t key, uint64_t hash,
                          const void *buf, size_t len)
{
    kvb_status st = remote_check_args(remote, buf, "buf", "kvb_remote_put");
    if (st != KVB_OK) {
        return st;
    }
    uint64_t part_bytes = remote->opts.part_bytes;
    uint64_t n_parts = remote_num_parts(len, part_bytes);
    if (len == 0 || (uint64_t)len > REMOTE_MAX_TOTAL ||
        n_parts > REMOTE_MAX_PARTS) {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_remote_put(%s): len=%zu is not in 1..%llu bytes "
                        "in at most %llu parts of part_bytes=%llu",
                        remote->name, len,
                        (unsigned long long)REMOTE_MAX_TOTAL,
                        (unsigned long long)REMOTE_MAX_PARTS,
                        (unsigned long long)part_bytes);
    }
    redisContext *c;
    if ((st = remote_acquire(remote, &c)) != KVB_OK) {
        return st;
    }
    const char *bytes = buf;
    char part_key[REMOTE_KEY_CHARS];
    uint64_t next = 0;
    while (next < n_parts) {
        uint64_t queued = 0;
        size_t window = 0;
        while (next < n_parts && (queued == 0 || window < REMOTE_PUT_WINDOW)) {
            uint64_t off = next * part_bytes;
            size_t n = (size_t)(len - off < part_bytes ? len - off
                                                       : part_bytes);
            remote_part_key(part_key, key, hash, next);
            if (redisAppendCommand(c, "SET %s %b", part_key, bytes + off, n) !=
                REDIS_OK) {
                return remote_fail(remote, c, "queueing SET of a part",
                                   c->err != 0 ? c->errstr : "out of memory");
            }
            window += n;
            queued++;
            next++;
        }
        if ((st = remote_read_ok(remote, c, queued, "SET of the parts")) !=
            KVB_OK) {
            return st;
        }
    }
    unsigned char meta[REMOTE_META_BYTES];
    char meta_key[REMOTE_KEY_CHARS];
    remote_meta_encode(meta, key, hash, len, (uint32_t)n_parts, part_bytes);
    remote_meta_key(meta_key, key, hash);
    if (redisAppendCommand(c, "SET %s %b", meta_key, (const char *)meta,
                           sizeof meta) != REDIS_OK) {
        return remote_fail(remote, c, "queueing SET of the meta",
                           c->err != 0 ? c->errstr : "out of memory");
    }
    if ((st = remote_read_ok(remote, c, 1, "SET of the meta")) != KVB_OK) {
        return st;
    }
    remote_release(remote, c);
    return KVB_OK;
}

/*
 * Queues UNLINK of parts [first, end) of (key, hash) on c and reads the
 * replies; *all_there is 1 when every one of them existed.  Returns KVB_OK
 * or KVB_ERR_IO after failing c.
 */
static kvb_status remote_unlink_parts(kvb_remote *r, redisContext *c,
                                      uint64_t key, uint64_t hash,
                                      uint64_t first, uint64_t end,
                                      int *all_there)
{
    char part_key[REMOTE_KEY_CHARS];
    *all_there = 1;
    for (uint64_t i = first; i < end; i++) {
        remote_part_key(part_key, key, hash, i);
        if (redisAppendCommand(c, "UNLINK %s", part_key) != REDIS_OK) {
            return remote_fail(r, c, "queueing UNLINK of a part",
                               c->err != 0 ? c->errstr : "out of memory");
        }
    }
    for (uint64_t i = first; i < end; i++) {
        void *rv = NULL;
        if (redisGetReply(c, &rv) != REDIS_OK || rv == NULL) {
            if (rv != NULL) {
                freeReplyObject(rv);
            }
            return remote_fail_reply(r, c, NULL, "UNLINK of the parts");
        }
        redisReply *reply = rv;
        if (reply->type != REDIS_REPLY_INTEGER) {
            if (reply->type == REDIS_REPLY_ERROR) {
                return remote_fail_reply(r, c, reply, "UNLINK of a part");
            }
            freeReplyObject(reply);
            return remote_fail(r, c, "UNLINK of a part",
                               "protocol error: not an integer reply");
        }
        if (reply->integer == 0) {
            *all_there = 0;
        }
        freeReplyObject(reply);
    }
    return KVB_OK;
}

/*
 * Deletes the entry (key, hash): the meta first (the entry stops being
 * visible), then its parts.  The part count comes from the meta when it is
 * valid; otherwise (missing or corrupt meta) parts are unlinked in batches
 * of REMOTE_DEL_BATCH until a batch finds one missing.  Deleting an entry
 * that is not there is KVB_OK.  KVB_ERR_IO when the server cannot be used
 * (the entry may then be partly deleted, never half-visible: the meta goes
 * first).
 */
kvb_status kvb_remote_del(kvb_remote *remote, uint64_t key, uint64_t hash)
{
    if (remote == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_remote_del: remote is NULL");
    }
    kvb_status st;
    redisContext *c;
    if ((st = remote_acquire(remote, &c)) != KVB_OK) {
        return st;
    }
    int have;
    uint64_t total, n_parts, part_bytes;
    st = remote_read_meta(remote, c, key, hash, 0, &have, &total, &n_parts,
                          &part_bytes);
    if (st != KVB_OK) {
        return st;
    }
    char meta_key[REMOTE_KEY_CHARS];
    remote_meta_key(meta_key, key, hash);
    redisReply *reply = redisCommand(c, "UNLINK %s", meta_key);
    if (reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        if (reply != NULL && reply->type != REDIS_REPLY_ERROR) {
            freeReplyObject(reply);
            return remote_fail(remote, c, "UNLINK of the meta",
                               "protocol error: not an integer reply");
        }
        return remote_fail_reply(remote, c, reply, "UNLINK of the meta");
    }
    freeReplyObject(reply);
    int all_there = 1;
    if (have) {
        for (uint64_t i = 0; i < n_parts; i += REMOTE_DEL_BATCH) {
            uint64_t end = n_parts - i < REMOTE_DEL_BATCH
                               ? n_parts
                               : i + REMOTE_DEL_BATCH;
            st = remote_unlink_parts(remote, c, key, hash, i, end,
                                     &all_there);
            if (st != KVB_OK) {
                return st;
            }
        }
    } else {
        for (uint64_t i = 0; all_there && i < REMOTE_MAX_PARTS;
             i += REMOTE_DEL_BATCH) {
            st = remote_unlink_parts(remote, c, key, hash, i,
                                     i + REMOTE_DEL_BATCH, &all_there);
            if (st != KVB_OK) {
                return st;
            }
        }
    }
    remote_release(remote, c);
    return KVB_OK;
}

/* Returns "host:port/db", owned by the remote; "(null)" for NULL. */
const char *kvb_remote_name(const kvb_remote *remote)
{
    return remote != NULL ? remote->name : "(null)";
}

#else /* !KVB_WITH_HIREDIS */

/* Never created: a build without hiredis refuses to open the tier. */
struct kvb_remote {
    int unused;
};

/*
 * Refuses the tier: this build has no hiredis.  KVB_ERR_UNSUPPORTED whose
 * message names the URL (password masked) and how to get the tier; *out
 * is set to NULL.
 */
kvb_status kvb_remote_open(const char *url, const kvb_remote_options *opts,
                           kvb_remote **out)
{
    char shown[REMOTE_URL_SHOWN];
    (void)opts;
    if (out != NULL) {
        *out = NULL;
    }
    remote_mask_url(url, shown, sizeof shown);
    return kvb_fail(KVB_ERR_UNSUPPORTED,
                    "LMCACHE_REMOTE_URL=%s: this libkvblend was built "
                    "without hiredis (install libhiredis-dev and rebuild)",
                    shown);
}

/* Nothing to close: no remote is ever opened.  NULL is a no-op. */
void kvb_remote_close(kvb_remote *remote)
{
    (void)remote;
}

/* KVB_ERR_UNSUPPORTED (no hiredis); *found is 0. */
kvb_status kvb_remote_contains(kvb_remote *remote, uint64_t key,
                               uint64_t hash, int *found)
{
    (void)remote;
    (void)key;
    (void)hash;
    if (found != NULL) {
        *found = 0;
    }
    return KVB_ERR_UNSUPPORTED;
}

/* KVB_ERR_UNSUPPORTED (no hiredis); *buf is NULL and *len 0. */
kvb_status kvb_remote_get(kvb_remote *remote, uint64_t key, uint64_t hash,
                          void **buf, size_t *len)
{
    (void)remote;
    (void)key;
    (void)hash;
    if (buf != NULL) {
        *buf = NULL;
    }
    if (len != NULL) {
        *len = 0;
    }
    return KVB_ERR_UNSUPPORTED;
}

/* KVB_ERR_UNSUPPORTED (no hiredis); nothing is written. */
kvb_status kvb_remote_put(kvb_remote *remote, uint64_t key, uint64_t hash,
                          const void *buf, size_t len)
{
    (void)remote;
    (void)key;
    (void)hash;
    (void)buf;
    (void)len;
    return KVB_ERR_UNSUPPORTED;
}

/* KVB_ERR_UNSUPPORTED (no hiredis); nothing is deleted. */
kvb_status kvb_remote_del(kvb_remote *remote, uint64_t key, uint64_t hash)
{
    (void)remote;
    (void)key;
    (void)hash;
    return KVB_ERR_UNSUPPORTED;
}

/* A fixed name: no remote exists in this build. */
const char *kvb_remote_name(const kvb_remote *remote)
{
    (void)remote;
    return "(remote tier not built: no hiredis)";
}

#endif /* KVB_WITH_HIREDIS */
