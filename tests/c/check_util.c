/*
 * check_util.c: status names, the thread-local error message, dtype sizes
 * and the fp16/bf16 conversions every op relies on.
 */
#include <check.h>
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "kvblend.h"

START_TEST(test_status_str_names_each)
{
    ck_assert_str_eq(kvb_status_str(KVB_OK), "KVB_OK");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_INVALID), "KVB_ERR_INVALID");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_NOMEM), "KVB_ERR_NOMEM");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_UNSUPPORTED), "KVB_ERR_UNSUPPORTED");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_CUDA), "KVB_ERR_CUDA");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_NOT_FOUND), "KVB_ERR_NOT_FOUND");
    ck_assert_str_eq(kvb_status_str(KVB_ERR_INTERNAL), "KVB_ERR_INTERNAL");
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

Suite *util_suite(void)
{
    Suite *s = suite_create("util");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_status_str_names_each);
    tcase_add_test(tc, test_dtype_size_and_name);
    tcase_add_test(tc, test_threads_bad_count_rejected);
    tcase_add_test(tc, test_last_error_is_thread_local);
    suite_add_tcase(s, tc);
    return s;
}
