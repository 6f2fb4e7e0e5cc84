/*
 * check_util.c: status names, the thread-local error message, dtype sizes,
 * the fp16/bf16 conversions every op relies on, and the log sink.
 */
#define _DEFAULT_SOURCE /* usleep */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "kvblend.h"
#include "../../csrc/store.h"

START_TEST(test_status_str_names_each)
{
    ck_assert_str_eq(kvb_status_str(KVB_OK), "KVB_OK");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_INVALID), "KVB_ERR_INVALID");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_NOMEM), "KVB_ERR_NOMEM");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_UNSUPPORTED), "KVB_ERR_UNSUPPORTED");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_CUDA), "KVB_ERR_CUDA");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_NOT_FOUND), "KVB_ERR_NOT_FOUND");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_INTERNAL), "KVB_ERR_INTERNAL");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_IO), "KVB_ERR_IO");
    ck_assert_str_eq(kvb_status_str((kvb_status)999), "KVB_ERR_UNKNOWN");
}
END_TEST

START_TEST(test_dtype_size_and_name)
{
    ck_assert_uint_eq(kvb_dtype_size(KVB_DTYPE_F32), 4);
    ck_assert_uint_eq(kvb_dtype_size(KVB_DTYPE_F16), 2);
    ck_assert_uint_eq(kvb_dtype_size(KVB_DTYPE_BF16), 2);
    ck_assert_uint_eq(kvb_dtype_size((kvb_dtype)7), 0);
    ck_assert_str_eq(kvb_dtype_str(KVB_DTYPE_BF16), "bf16");
    ck_assert_str_eq(kvb_dtype_str((kvb_dtype)7), "unknown");
}
END_TEST

START_TEST(test_threads_bad_count_rejected)
{
    kvb_clear_error();
    ck_assert_int_eq(kvb_cpu_set_threads(-1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "num_threads=-1"));
    ck_assert_int_eq(kvb_cpu_set_threads(0), KVB_OK);
}
END_TEST

/* Thread body: fails a call and reports whether its own message is set. */
static void *other_thread_error(void *arg)
{
    (void)arg;
    kvb_clear_error();
    kvb_cpu_set_threads(-5);
    return strstr(kvb_last_error(), "num_threads=-5") ? (void *)1 : NULL;
}

START_TEST(test_last_error_is_thread_local)
{
    kvb_clear_error();
    kvb_cpu_set_threads(-1);
    pthread_t t;
    void *ok = NULL;
    ck_assert_int_eq(pthread_create(&t, NULL, other_thread_error, NULL), 0);
    pthread_join(t, &ok);
    ck_assert_ptr_nonnull(ok);
    /* this thread still holds its own message */
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "num_threads=-1"));
    kvb_clear_error();
    ck_assert_str_eq(kvb_last_error(), "");
}
END_TEST

/* ---- the log sink ------------------------------------------------------ */

/* A stand-in for the GIL: the sink takes it, as the Python sink does. */
static pthread_mutex_t fake_gil = PTHREAD_MUTEX_INITIALIZER;
static int sink_lines; /* under fake_gil */

static void gil_sink(kvb_log_level level, const char *msg, void *user)
{
    (void)level;
    (void)msg;
    (void)user;
    usleep(20); /* widens the window in which a thread holding the log
                 * lock (the old kvb_log) meets one holding the "GIL" */
    pthread_mutex_lock(&fake_gil);
    sink_lines++;
    pthread_mutex_unlock(&fake_gil);
}

/* A store whose host budget (1 byte) is below any entry: each reservation
 * logs one WARNING line ("not storing a chunk ..."); with budget 0 an INFO
 * line (a disabled tier). */
static kvb_store *log_store(size_t budget)
{
    kvb_store_params p = {1, 1, 4, KVB_DTYPE_F32, budget, 0, 0};
    kvb_store *s = NULL;
    ck_assert_int_eq(kvb_store_create(&p, &s), KVB_OK);
    return s;
}

static void log_line(kvb_store *s)
{
    const int32_t tok[4] = {1, 2, 3, 4};
    kvb_entry *e = NULL;
    ck_assert_int_eq(kvb_store_reserve(s, 0, tok, 4, NULL, &e), KVB_OK);
    ck_assert_ptr_null(e);
}

#define LOG_LINES 2000

static atomic_int logging_done;

static void *log_many(void *arg)
{
    for (int i = 0; i < LOG_LINES; i++) {
        log_line(arg);
    }
    atomic_store(&logging_done, 1);
    return NULL;
}

/* A C thread logs while another, holding the "GIL", changes the level or
 * the sink (what Python's set_log_level and Connector() do).  With the
 * sink called under the log lock the two threads wait for each other
 * forever (the test then times out). */
START_TEST(test_log_sink_never_deadlocks_against_its_own_lock)
{
    sink_lines = 0;
    kvb_set_log(gil_sink, NULL, KVB_LOG_DEBUG);
    kvb_store *warn = log_store(1), *info = log_store(0);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, log_many, warn), 0);
    atomic_store(&logging_done, 0);
    for (int i = 0; !atomic_load(&logging_done); i++) {
        pthread_mutex_lock(&fake_gil);
        if (i % 2) {
            kvb_set_log_level(KVB_LOG_DEBUG);
        } else {
            kvb_set_log(gil_sink, NULL, KVB_LOG_DEBUG);
        }
        pthread_mutex_unlock(&fake_gil);
    }
    pthread_join(t, NULL);
    pthread_mutex_lock(&fake_gil);
    ck_assert_int_eq(sink_lines, LOG_LINES);
    pthread_mutex_unlock(&fake_gil);
    /* the level alone: lines below it are dropped, the sink stays */
    kvb_set_log_level(KVB_LOG_WARNING);
    log_line(info);
    log_line(warn);
    ck_assert_int_eq(sink_lines, LOG_LINES + 1);
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
    kvb_store_free(warn);
    kvb_store_free(info);
}
END_TEST

/* The util suite. */
Suite *util_suite(void)
{
    static const case_spec cases[] = {{"core", NULL, NULL, 0}};
    const test_spec tests[] = {
        {0, test_status_str_names_each, 0},
        {0, test_dtype_size_and_name, 0},
        {0, test_threads_bad_count_rejected, 0},
        {0, test_last_error_is_thread_local, 0},
        {0, test_log_sink_never_deadlocks_against_its_own_lock, 0},
    };
    return suite_build("util", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
