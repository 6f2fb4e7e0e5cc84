/*
 * util.c: status names, the thread-local error message, the log sink,
 * dtype helpers and the small thread pool used by the CPU ops.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

#define KVB_VERSION_STR "0.1.0"
#define KVB_ERRBUF 1024

static _Thread_local char g_errbuf[KVB_ERRBUF];

static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;
static kvb_log_fn g_log_fn = NULL;
static void *g_log_user = NULL;
static kvb_log_level g_log_min = KVB_LOG_WARNING;

static int g_threads = 0; /* 0 = all cores */

/* Returns a static name for each status value. */
const char *kvb_status_str(kvb_status status)
{
    switch (status) {
    case KVB_OK: return "KVB_OK";
    case KVB_ERR_INVALID: return "KVB_ERR_INVALID";
    case KVB_ERR_NOMEM: return "KVB_ERR_NOMEM";
    case KVB_ERR_UNSUPPORTED: return "KVB_ERR_UNSUPPORTED";
    case KVB_ERR_CUDA: return "KVB_ERR_CUDA";
    case KVB_ERR_NOT_FOUND: return "KVB_ERR_NOT_FOUND";
    case KVB_ERR_INTERNAL: return "KVB_ERR_INTERNAL";
    case KVB_ERR_IO: return "KVB_ERR_IO";
    }
    return "KVB_ERR_UNKNOWN";
}

/* Returns this thread's last error message ("" if none). */
const char *kvb_last_error(void)
{
    return g_errbuf;
}

/* Clears this thread's last error message. */
void kvb_clear_error(void)
{
    g_errbuf[0] = '\0';
}

/* Formats the message into the thread-local buffer (truncating at
 * KVB_ERRBUF-1 bytes) and returns `status` unchanged. */
kvb_status kvb_fail(kvb_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_errbuf, sizeof g_errbuf, fmt, ap);
    va_end(ap);
    return status;
}

/* Installs the log sink; NULL restores stderr output. */
void kvb_set_log(kvb_log_fn fn, void *user, kvb_log_level min_level)
{
    pthread_mutex_lock(&g_log_mu);
    g_log_fn = fn;
    g_log_user = user;
    g_log_min = min_level;
    pthread_mutex_unlock(&g_log_mu);
}

/* Changes the minimum level, keeping the sink. */
void kvb_set_log_level(kvb_log_level min_level)
{
    pthread_mutex_lock(&g_log_mu);
    g_log_min = min_level;
    pthread_mutex_unlock(&g_log_mu);
}

/* Formats one line and hands it to the sink (or stderr).  The sink is read
 * under the log lock and called after it is released: a sink that takes a
 * lock of its own (the GIL) can never deadlock against a thread that holds
 * that lock while it calls kvb_set_log. */
void kvb_log(kvb_log_level level, const char *fmt, ...)
{
    pthread_mutex_lock(&g_log_mu);
    kvb_log_fn fn = g_log_fn;
    void *user = g_log_user;
    int skip = level < g_log_min;
    pthread_mutex_unlock(&g_log_mu);
    if (skip) {
        return;
    }
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (fn != NULL) {
        fn(level, line, user);
    } else {
        static const char *names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
        /* one fprintf per line: stdio's lock keeps lines whole */
        fprintf(stderr, "kvblend %s: %s\n",
                names[level >= 0 && level <= 3 ? level : 3], line);
    }
}

/* Returns the version string. */
const char *kvb_version(void)
{
    return KVB_VERSION_STR;
}

/* Element size of each dtype; 0 for unknown values. */
size_t kvb_dtype_size(kvb_dtype dtype)
{
    switch (dtype) {
    case KVB_DTYPE_F32: return 4;
    case KVB_DTYPE_F16: return 2;
    case KVB_DTYPE_BF16: return 2;
    }
    return 0;
}

/* Short name of each dtype. */
const char *kvb_dtype_str(kvb_dtype dtype)
{
    switch (dtype) {
    case KVB_DTYPE_F32: return "f32";
    case KVB_DTYPE_F16: return "f16";
    case KVB_DTYPE_BF16: return "bf16";
    }
    return "unknown";
}

/* Fails with a message naming `what` when dt is not a known dtype. */
kvb_status kvb_check_dtype(kvb_dtype dt, const char *what)
{
    if (kvb_dtype_size(dt) == 0) {
        return kvb_fail(KVB_ERR_UNSUPPORTED,
                        "%s: unsupported dtype code %d (expected 0=f32, "
                        "1=f16, 2=bf16)",
                        what, (int)dt);
    }
    return KVB_OK;
}

/* Checks n and the head geometry of an op; see internal.h. */
kvb_status kvb_check_rows(const char *fn, int64_t n, int32_t num_heads,
                          int32_t head_size)
{
    if (n < 0) {
        return kvb_fail(KVB_ERR_INVALID, "%s: n=%lld: expected n >= 0", fn,
                        (long long)n);
    }
    if (num_heads <= 0 || head_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID,
                        "%s: num_heads=%d head_size=%d: expected both > 0",
                        fn, (int)num_heads, (int)head_size);
    }
    return KVB_OK;
}

/* Checks an array argument and its count; see internal.h. */
kvb_status kvb_check_array(const char *fn, const char *name, const void *p,
                           const char *count_name, int64_t count)
{
    if (count < 0) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s=%lld; expected >= 0", fn,
                        count_name, (long long)count);
    }
    if (p == NULL && count > 0) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL with %s=%lld", fn,
                        name, count_name, (long long)count);
    }
    return KVB_OK;
}

/* Sets the CPU op thread count; negative values are rejected. */
kvb_status kvb_cpu_set_threads(int num_threads)
{
    if (num_threads < 0 || num_threads > KVB_MAX_CPU_THREADS) {
        return kvb_fail(KVB_ERR_INVALID,
                        "num_threads=%d: expected 0 (all cores) to %d",
                        num_threads, KVB_MAX_CPU_THREADS);
    }
    __atomic_store_n(&g_threads, num_threads, __ATOMIC_RELAXED);
    return KVB_OK;
}

/* Returns the configured thread count, or the online core count. */
int kvb_cpu_threads(void)
{
    int t = __atomic_load_n(&g_threads, __ATOMIC_RELAXED);
    if (t > 0) {
        return t;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) {
        n = 1;
    }
    return n > KVB_MAX_CPU_THREADS ? KVB_MAX_CPU_THREADS : (int)n;
}

/* The public view of kvb_cpu_threads. */
int kvb_cpu_get_threads(void)
{
    return kvb_cpu_threads();
}

typedef struct kvb_range_job {
    kvb_range_fn fn;
    void *ctx;
    int64_t begin;
    int64_t end;
} kvb_range_job;

/* Thread entry: runs one range. */
static void *kvb_range_main(void *arg)
{
    kvb_range_job *job = arg;
    job->fn(job->begin, job->end, job->ctx);
    return NULL;
}

/* Splits [0, n) into up to kvb_cpu_threads() ranges of at least
 * min_per_thread items; the calling thread runs the first range.  Threads
 * that fail to start have their range run by the caller. */
void kvb_parallel_for(int64_t n, int64_t min_per_thread, kvb_range_fn fn,
                      void *ctx)
{
    if (n <= 0) {
        return;
    }
    if (min_per_thread < 1) {
        min_per_thread = 1;
    }
    int64_t t = kvb_cpu_threads();
    if (t > n / min_per_thread) {
        t = n / min_per_thread;
    }
    if (t <= 1) {
        fn(0, n, ctx);
        return;
    }
    kvb_range_job jobs[KVB_MAX_CPU_THREADS];
    pthread_t tids[KVB_MAX_CPU_THREADS];
    int started[KVB_MAX_CPU_THREADS];
    for (int64_t i = 0; i < t; i++) {
        jobs[i].fn = fn;
        jobs[i].ctx = ctx;
        jobs[i].begin = n * i / t;
        jobs[i].end = n * (i + 1) / t;
        started[i] = 0;
    }
    for (int64_t i = 1; i < t; i++) {
        started[i] = pthread_create(&tids[i], NULL, kvb_range_main,
                                    &jobs[i]) == 0;
    }
    fn(jobs[0].begin, jobs[0].end, ctx);
    for (int64_t i = 1; i < t; i++) {
        if (started[i]) {
            pthread_join(tids[i], NULL);
        } else {
            fn(jobs[i].begin, jobs[i].end, ctx);
        }
    }
}
