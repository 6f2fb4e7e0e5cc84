/*
 * check_disk.c: the disk tier (csrc/disk.c): byte-exact round trips,
 * misses, LRU eviction by recency of use, the index rebuilt from the
 * folder on reopen (order by modification time, leftover temporary files
 * removed, other files left alone, eviction down to a smaller budget),
 * oversized blobs and a zero budget, drop, files deleted behind the tier's
 * back, write failures naming the path, bad arguments, and concurrent
 * puts, gets and drops keeping the index equal to the folder.
 */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, utimensat, pthread */
#include "test_util.h"

#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kvblend.h"
/* the internal tier hooks (exported for these tests) */
#include "../../csrc/tiers.h"

#define PATH_LEN 512
#define SZ 4096 /* size of the blobs of the LRU tests */

/* ------------------------------------------------------------- helpers */

/* The test's own folder: made before and removed after every test (a
 * checked fixture, so it runs in the forked test process). */
static char g_dir[PATH_LEN];

/* The tiers a test opened with open_disk and has not closed with
 * close_disk: the fixture closes them after the test. */
static kvb_disk *g_open[2];

/* Fixture: creates g_dir. */
static void dir_setup(void)
{
    tmpdir_make(g_dir, sizeof g_dir, "kvb_disk");
}

/* Fixture: removes g_dir and everything in it. */
static void dir_teardown(void)
{
    for (size_t i = 0; i < COUNT_OF(g_open); i++) {
        kvb_disk_close(g_open[i]);
        g_open[i] = NULL;
    }
    tmpdir_remove(g_dir);
}

/* Writes the path of the entry file of (key, hash) in `dir` to out. */
static void entry_path(char *out, const char *dir, uint64_t key,
                       uint64_t hash)
{
    snprintf(out, PATH_LEN, "%s/%016llx-%016llx.kvb", dir,
             (unsigned long long)key, (unsigned long long)hash);
}

/* Puts the test blob `seed` of len bytes as (key, hash); fails the test
 * unless the put returns KVB_OK. */
static void put_blob(kvb_disk *d, uint64_t key, uint64_t hash, uint64_t seed,
                     size_t len)
{
    unsigned char *b = pattern_blob(len, seed);
    ck_assert_int_eq(kvb_disk_put(d, key, hash, b, len), KVB_OK);
    free(b);
}

/* Returns 1 when buf[0..len) is exactly the test blob `seed` of
 * `want` bytes. */
static int blob_matches(const unsigned char *buf, size_t len, uint64_t seed,
                        size_t want)
{
    return buf != NULL && len == want && pattern_matches(buf, len, seed);
}

/* Gets (key, hash) and returns 1 when it is a hit holding exactly the
 * test blob `seed` of `len` bytes, 0 on a miss; fails the test on an
 * error or on a hit with other bytes. */
static int get_blob(kvb_disk *d, uint64_t key, uint64_t hash, uint64_t seed,
                    size_t len)
{
    void *buf = (void *)1;
    size_t got = 12345;
    ck_assert_int_eq(kvb_disk_get(d, key, hash, &buf, &got), KVB_OK);
    if (buf == NULL) {
        ck_assert_uint_eq(got, 0);
        return 0;
    }
    ck_assert_msg(blob_matches(buf, got, seed, len),
                  "entry %llx-%llx: %zu bytes differ from the blob written",
                  (unsigned long long)key, (unsigned long long)hash, got);
    free(buf);
    return 1;
}

/* Returns 1 when the entry file of (key, hash) exists in `dir`. */
static int file_exists(const char *dir, uint64_t key, uint64_t hash)
{
    char p[PATH_LEN];
    entry_path(p, dir, key, hash);
    return access(p, F_OK) == 0;
}

/* Writes a small file `name` in `dir`. */
static void touch_file(const char *dir, const char *name)
{
    char p[PATH_LEN];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fputs("x", f);
    fclose(f);
}

/* Returns 1 when `dir`/`name` exists. */
static int name_exists(const char *dir, const char *name)
{
    char p[PATH_LEN];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return access(p, F_OK) == 0;
}

/* Sets both times of the entry file of (key, hash) to `sec` (seconds
 * since the epoch), so that reopening orders entries deterministically. */
static void set_mtime(const char *dir, uint64_t key, uint64_t hash, time_t sec)
{
    char p[PATH_LEN];
    entry_path(p, dir, key, hash);
    struct timespec ts[2] = {{sec, 0}, {sec, 0}};
    ck_assert_int_eq(utimensat(AT_FDCWD, p, ts, 0), 0);
}

/* What the folder holds: entry files (name pattern of the tier), their
 * bytes, temporary files (a leading '.', ending ".tmp") and others. */
typedef struct folder_count {
    int64_t entries;
    size_t bytes;
    int64_t temps;
    int64_t others;
} folder_count;

/* Counts the files of `dir` by kind. */
static folder_count count_folder(const char *dir)
{
    folder_count c = {0, 0, 0, 0};
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *n = de->d_name;
        size_t l = strlen(n);
        if (strcmp(n, ".") == 0 || strcmp(n, "..") == 0) {
            continue;
        }
        if (n[0] == '.' && l > 4 && strcmp(n + l - 4, ".tmp") == 0) {
            c.temps++;
        } else if (l == 37 && n[16] == '-' && strcmp(n + 33, ".kvb") == 0) {
            char p[PATH_LEN];
            struct stat sb;
            snprintf(p, sizeof p, "%s/%s", dir, n);
            ck_assert_int_eq(stat(p, &sb), 0);
            c.entries++;
            c.bytes += (size_t)sb.st_size;
        } else {
            c.others++;
        }
    }
    closedir(d);
    return c;
}

/* Opens the tier on `dir` with `budget`, failing the test on an error;
 * the fixture closes it unless the test does (close_disk). */
static kvb_disk *open_disk(const char *dir, size_t budget)
{
    kvb_disk *d = NULL;
    ck_assert_int_eq(kvb_disk_open(dir, budget, &d), KVB_OK);
    ck_assert_ptr_nonnull(d);
    for (size_t i = 0; i < COUNT_OF(g_open); i++) {
        if (g_open[i] == NULL) {
            g_open[i] = d;
            return d;
        }
    }
    ck_abort_msg("more than %zu tiers open", COUNT_OF(g_open));
    return d;
}

/* Closes a tier of open_disk before the test ends. */
static void close_disk(kvb_disk *d)
{
    for (size_t i = 0; i < COUNT_OF(g_open); i++) {
        if (g_open[i] == d) {
            g_open[i] = NULL;
        }
    }
    kvb_disk_close(d);
}

/* Sets the file times of the entries (key, hashes[0..n)) to 10^9 s, then
 * `step` seconds apart each: hashes[0] is the oldest. */
static void age_files(uint64_t key, const uint64_t *hashes, int n, time_t step)
{
    for (int i = 0; i < n; i++) {
        set_mtime(g_dir, key, hashes[i], 1000000000 + i * step);
    }
}

/* Puts the test blobs of hashes first .. first+count-1 under `key`, each
 * made from the seed equal to its hash, of len bytes. */
static void put_blobs(kvb_disk *d, uint64_t key, uint64_t first,
                      uint64_t count, size_t len)
{
    for (uint64_t h = first; h < first + count; h++) {
        put_blob(d, key, h, h, len);
    }
}

/* Fails the test unless (key, hash) is neither indexed nor on disk. */
static void expect_gone(kvb_disk *d, uint64_t key, uint64_t hash)
{
    ck_assert_int_eq(kvb_disk_contains(d, key, hash), 0);
    ck_assert_int_eq(file_exists(g_dir, key, hash), 0);
}

/* Fails the test unless g_dir holds `entries` entry files of `bytes` in
 * all and `temps` temporary files; ANY skips one. */
#define ANY (-1)
static void expect_folder(int64_t entries, int64_t bytes, int64_t temps)
{
    folder_count c = count_folder(g_dir);
    if (entries != ANY) {
        ck_assert_int_eq(c.entries, entries);
    }
    if (bytes != ANY) {
        ck_assert_uint_eq(c.bytes, (size_t)bytes);
    }
    if (temps != ANY) {
        ck_assert_int_eq(c.temps, temps);
    }
}

/* Fails the test unless the tier's usage is (entries, bytes). */
static void assert_usage(kvb_disk *d, int64_t entries, size_t bytes)
{
    int64_t n = -1;
    size_t b = 1;
    kvb_disk_usage(d, &n, &b);
    ck_assert_int_eq(n, entries);
    ck_assert_uint_eq(b, bytes);
}

/* ---------------------------------------------------------------- tests */

/* Blobs of several sizes (1 byte to a few MB) come back byte for byte,
 * each in its own file of exactly its size, and usage adds them up. */
START_TEST(test_disk_put_get_round_trip)
{
    kvb_disk *d = open_disk(g_dir, 64u << 20);
    const size_t sizes[] = {1, 4096, 100003, 3u << 20};
    size_t total = 0;
    for (uint64_t i = 0; i < 4; i++) {
        put_blob(d, 7, 100 + i, i, sizes[i]);
        total += sizes[i];
    }
    assert_usage(d, 4, total);
    for (uint64_t i = 0; i < 4; i++) {
        ck_assert_int_eq(get_blob(d, 7, 100 + i, i, sizes[i]), 1);
        char p[PATH_LEN];
        struct stat sb;
        entry_path(p, g_dir, 7, 100 + i);
        ck_assert_int_eq(stat(p, &sb), 0);
        ck_assert_uint_eq((size_t)sb.st_size, sizes[i]);
    }
    expect_folder(4, total, 0);
}
END_TEST

/* contains and get see exactly (key, hash): another key with the same
 * hash, or the same key with another hash, is a miss (KVB_OK, NULL). */
START_TEST(test_disk_contains_and_miss)
{
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 2), 0);
    ck_assert_int_eq(get_blob(d, 1, 2, 0, 10), 0);
    put_blob(d, 1, 2, 5, 100);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 2), 1);
    ck_assert_int_eq(kvb_disk_contains(d, 3, 2), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 3), 0);
    ck_assert_int_eq(get_blob(d, 3, 2, 5, 100), 0);
    ck_assert_int_eq(get_blob(d, 1, 3, 5, 100), 0);
    ck_assert_int_eq(get_blob(d, 1, 2, 5, 100), 1);
    /* the extremes of both numbers make well-formed names */
    put_blob(d, UINT64_MAX, 0, 6, 10);
    ck_assert_int_eq(file_exists(g_dir, UINT64_MAX, 0), 1);
    ck_assert_int_eq(get_blob(d, UINT64_MAX, 0, 6, 10), 1);
}
END_TEST

/* With room for two blobs, a third evicts the least recently *used* one:
 * a get in between saves the older entry and the other one goes. */
START_TEST(test_disk_lru_evicts_least_recently_used)
{
    kvb_disk *d = open_disk(g_dir, 2 * SZ);
    put_blobs(d, 9, 1, 2, SZ);
    ck_assert_int_eq(get_blob(d, 9, 1, 1, SZ), 1); /* 1 is now newest */
    put_blob(d, 9, 3, 3, SZ);
    expect_gone(d, 9, 2);
    ck_assert_int_eq(kvb_disk_contains(d, 9, 1), 1);
    ck_assert_int_eq(kvb_disk_contains(d, 9, 3), 1);
    assert_usage(d, 2, 2 * SZ);
    /* without a get, the oldest write goes: order is now 1, 3 */
    put_blob(d, 9, 4, 4, SZ);
    expect_gone(d, 9, 1);
    ck_assert_int_eq(get_blob(d, 9, 3, 3, SZ), 1);
    ck_assert_int_eq(get_blob(d, 9, 4, 4, SZ), 1);
    expect_folder(2, 2 * SZ, 0);
}
END_TEST

/* A put of a larger blob evicts as many old entries as it needs, never
 * itself. */
START_TEST(test_disk_put_evicts_several_for_a_large_blob)
{
    kvb_disk *d = open_disk(g_dir, 4 * SZ);
    put_blobs(d, 1, 0, 4, SZ);
    put_blob(d, 1, 10, 10, 3 * SZ);
    for (uint64_t i = 0; i < 3; i++) {
        ck_assert_int_eq(kvb_disk_contains(d, 1, i), 0);
    }
    ck_assert_int_eq(kvb_disk_contains(d, 1, 3), 1);
    ck_assert_int_eq(get_blob(d, 1, 10, 10, 3 * SZ), 1);
    assert_usage(d, 2, 4 * SZ);
    /* exactly the budget: everything else goes, the new blob stays */
    put_blob(d, 1, 11, 11, 4 * SZ);
    assert_usage(d, 1, 4 * SZ);
    ck_assert_int_eq(get_blob(d, 1, 11, 11, 4 * SZ), 1);
}
END_TEST

/* A second put of one entry replaces its file and its bytes in the
 * accounts (one entry, the new size, the new bytes). */
START_TEST(test_disk_put_replaces_same_entry)
{
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    put_blob(d, 4, 4, 1, 100);
    put_blob(d, 4, 5, 2, 50);
    put_blob(d, 4, 4, 3, 300);
    assert_usage(d, 2, 350);
    ck_assert_int_eq(get_blob(d, 4, 4, 3, 300), 1);
    expect_folder(2, 350, ANY);
}
END_TEST

/* Reopening the folder finds every entry with the same bytes, in LRU
 * order by modification time: new puts evict the oldest file first. */
START_TEST(test_disk_reopen_restores_entries_and_lru_order)
{
    kvb_disk *d = open_disk(g_dir, 3 * SZ);
    put_blobs(d, 2, 1, 3, SZ);
    close_disk(d);
    /* written order 1, 2, 3; make the file times say 2, 3, 1 */
    age_files(2, (const uint64_t[]){2, 3, 1}, 3, 100);

    d = open_disk(g_dir, 3 * SZ);
    assert_usage(d, 3, 3 * SZ);
    for (uint64_t i = 1; i <= 3; i++) {
        ck_assert_int_eq(kvb_disk_contains(d, 2, i), 1); /* no touch */
    }
    put_blob(d, 2, 4, 4, SZ);
    expect_gone(d, 2, 2);
    ck_assert_int_eq(kvb_disk_contains(d, 2, 3), 1);
    put_blob(d, 2, 5, 5, SZ);
    ck_assert_int_eq(kvb_disk_contains(d, 2, 3), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 2, 1), 1);
    ck_assert_int_eq(get_blob(d, 2, 1, 1, SZ), 1);
    ck_assert_int_eq(get_blob(d, 2, 4, 4, SZ), 1);
    ck_assert_int_eq(get_blob(d, 2, 5, 5, SZ), 1);
}
END_TEST

/* A get refreshes the file's modification time, so that the recency it
 * records survives a restart: the got entry outlives a newer write. */
START_TEST(test_disk_get_refreshes_file_time)
{
    kvb_disk *d = open_disk(g_dir, 2 * SZ);
    put_blobs(d, 3, 1, 2, SZ);
    set_mtime(g_dir, 3, 1, 1000000000);
    set_mtime(g_dir, 3, 2, 1000000100);
    ck_assert_int_eq(get_blob(d, 3, 1, 1, SZ), 1);
    char p[PATH_LEN];
    struct stat sb;
    entry_path(p, g_dir, 3, 1);
    ck_assert_int_eq(stat(p, &sb), 0);
    ck_assert_int_gt((long long)sb.st_mtim.tv_sec, 1000000100LL);
    close_disk(d);

    d = open_disk(g_dir, 2 * SZ);
    put_blob(d, 3, 3, 3, SZ); /* evicts 2, the least recently used */
    ck_assert_int_eq(kvb_disk_contains(d, 3, 2), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 3, 1), 1);
}
END_TEST

/* Temporary files of an interrupted write (their writer process is gone)
 * are deleted by open and never indexed; one whose writer still runs
 * (another process sharing the folder) is left alone. */
START_TEST(test_disk_open_removes_leftover_temp_files)
{
    pid_t child = fork();
    if (child == 0) {
        _exit(0);
    }
    ck_assert_int_gt(child, 0);
    ck_assert_int_eq(waitpid(child, NULL, 0), child); /* a pid now unused */
    char dead[2][96];
    char live[96];
    snprintf(dead[0], sizeof dead[0],
             ".0123456789abcdef-fedcba9876543210.%ld.7.tmp", (long)child);
    snprintf(dead[1], sizeof dead[1],
             ".0000000000000001-0000000000000002.%ld.18446744073709551615.tmp",
             (long)child);
    snprintf(live, sizeof live,
             ".0000000000000003-0000000000000004.%ld.1.tmp", (long)getpid());
    touch_file(g_dir, dead[0]);
    touch_file(g_dir, dead[1]);
    touch_file(g_dir, live);
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    ck_assert_int_eq(name_exists(g_dir, dead[0]), 0);
    ck_assert_int_eq(name_exists(g_dir, dead[1]), 0);
    ck_assert_int_eq(name_exists(g_dir, live), 1);
    assert_usage(d, 0, 0);
}
END_TEST

/* A file another process wrote into the shared folder after this one
 * opened it is found (adopted into the index, charged to the budget) and
 * read; one another process deleted is a miss. */
START_TEST(test_disk_adopts_files_of_other_processes)
{
    kvb_disk *a = open_disk(g_dir, 1u << 20);
    kvb_disk *b = open_disk(g_dir, 1u << 20); /* the other process's view */
    put_blob(b, 5, 6, 9, 1000);
    assert_usage(a, 0, 0);
    ck_assert_int_eq(kvb_disk_contains(a, 5, 6), 1);
    assert_usage(a, 1, 1000);
    void *buf = NULL;
    size_t len = 0;
    ck_assert_int_eq(kvb_disk_get(a, 5, 6, &buf, &len), KVB_OK);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(len, 1000);
    free(buf);
    kvb_disk_drop(b, 5, 6);
    ck_assert_int_eq(kvb_disk_get(a, 5, 6, &buf, &len), KVB_OK);
    ck_assert_ptr_null(buf);
    ck_assert_int_eq(kvb_disk_contains(a, 5, 6), 0);
    close_disk(a);
    close_disk(b);
}
END_TEST

/* Files of other names (near misses of both patterns included) and a
 * folder of an entry's name are left alone, and not indexed, even by a
 * budget that would have to evict them; a real entry beside them is. */
START_TEST(test_disk_open_leaves_unrelated_files)
{
    const char *others[] = {
        "notes.txt",
        "0123456789ABCDEF-0123456789abcdef.kvb",  /* upper case */
        "0123-4567.kvb",                          /* short */
        "x0123456789abcdef-0123456789abcdef.kvb", /* prefix */
        "0123456789abcdef-0123456789abcdef.kvbx", /* suffix */
        "0123456789abcdef_0123456789abcdef.kvb",  /* separator */
        ".0123456789abcdef-0123456789abcdef.tmp", /* temp without pid */
        ".0123456789abcdef-0123456789abcdef.12.x.tmp",
        "0123456789abcdef-0123456789abcdef.12.3.tmp", /* no dot */
    };
    const int n = (int)(sizeof others / sizeof others[0]);
    for (int i = 0; i < n; i++) {
        touch_file(g_dir, others[i]);
    }
    char sub[PATH_LEN];
    snprintf(sub, sizeof sub, "%s/00000000000000aa-00000000000000bb.kvb",
             g_dir);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    char p[PATH_LEN];
    entry_path(p, g_dir, 0xab, 0xcd);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fputs("blob", f);
    fclose(f);

    kvb_disk *d = open_disk(g_dir, 4); /* room for the real entry only */
    assert_usage(d, 1, 4);
    void *buf = NULL;
    size_t len = 0;
    ck_assert_int_eq(kvb_disk_get(d, 0xab, 0xcd, &buf, &len), KVB_OK);
    ck_assert_uint_eq(len, 4);
    ck_assert_int_eq(memcmp(buf, "blob", 4), 0);
    free(buf);
    close_disk(d);
    for (int i = 0; i < n; i++) {
        ck_assert_msg(name_exists(g_dir, others[i]), "%s was deleted",
                      others[i]);
    }
    struct stat sb;
    ck_assert_int_eq(stat(sub, &sb), 0);
    ck_assert(S_ISDIR(sb.st_mode));
}
END_TEST

/* A blob larger than the whole budget is not written (KVB_OK, a debug
 * line) and evicts nothing; one of exactly the budget is stored. */
START_TEST(test_disk_oversize_blob_not_stored)
{
    test_log cap;
    test_log_start(&cap, NULL);
    kvb_disk *d = open_disk(g_dir, 100);
    put_blob(d, 1, 1, 1, 60);
    put_blob(d, 1, 2, 2, 101);
    expect_gone(d, 1, 2);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 1), 1);
    assert_usage(d, 1, 60);
    ck_assert_ptr_nonnull(strstr(cap.last[KVB_LOG_DEBUG], "101 bytes"));
    ck_assert_int_eq(count_folder(g_dir).temps, 0);
    put_blob(d, 1, 3, 3, 100);
    assert_usage(d, 1, 100);
    ck_assert_int_eq(get_blob(d, 1, 3, 3, 100), 1);
    close_disk(d);
    test_log_stop(&cap);
}
END_TEST

/* A zero budget stores nothing: put is a no-op returning KVB_OK. */
START_TEST(test_disk_zero_budget_stores_nothing)
{
    kvb_disk *d = open_disk(g_dir, 0);
    put_blob(d, 1, 1, 1, 10);
    put_blob(d, 1, 2, 2, 0);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 1), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 1, 2), 0);
    assert_usage(d, 0, 0);
    folder_count c = count_folder(g_dir);
    ck_assert_int_eq(c.entries + c.temps + c.others, 0);
}
END_TEST

/* Reopening with a smaller budget deletes the oldest files (by time)
 * until the rest fits, and keeps the newest. */
START_TEST(test_disk_reopen_smaller_budget_evicts_oldest)
{
    kvb_disk *d = open_disk(g_dir, 4 * SZ);
    put_blobs(d, 5, 0, 4, SZ);
    close_disk(d);
    /* age order 3, 0, 2, 1 (oldest first) */
    age_files(5, (const uint64_t[]){3, 0, 2, 1}, 4, 10);
    d = open_disk(g_dir, 2 * SZ + SZ / 2);
    assert_usage(d, 2, 2 * SZ);
    ck_assert_int_eq(file_exists(g_dir, 5, 3), 0);
    ck_assert_int_eq(file_exists(g_dir, 5, 0), 0);
    ck_assert_int_eq(get_blob(d, 5, 2, 2, SZ), 1);
    ck_assert_int_eq(get_blob(d, 5, 1, 1, SZ), 1);
    expect_folder(2, ANY, 0);
}
END_TEST

/* drop deletes the file and forgets the entry; dropping a missing entry
 * is harmless and leaves the others. */
START_TEST(test_disk_drop_deletes_file)
{
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    put_blob(d, 6, 1, 1, 200);
    put_blob(d, 6, 2, 2, 300);
    kvb_disk_drop(d, 6, 1);
    expect_gone(d, 6, 1);
    ck_assert_int_eq(get_blob(d, 6, 1, 1, 200), 0);
    assert_usage(d, 1, 300);
    kvb_disk_drop(d, 6, 1);
    kvb_disk_drop(d, 77, 77);
    assert_usage(d, 1, 300);
    ck_assert_int_eq(get_blob(d, 6, 2, 2, 300), 1);
    expect_folder(1, ANY, 0);
}
END_TEST

/* A file deleted behind the tier's back: get is a miss (KVB_OK, NULL),
 * the index forgets the entry and a warning names the file. */
START_TEST(test_disk_vanished_file_is_a_miss_and_forgotten)
{
    test_log cap;
    test_log_start(&cap, NULL);
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    put_blob(d, 8, 1, 1, 111);
    put_blob(d, 8, 2, 2, 222);
    char p[PATH_LEN];
    entry_path(p, g_dir, 8, 1);
    ck_assert_int_eq(unlink(p), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 8, 1), 1); /* not yet noticed */
    ck_assert_int_eq(get_blob(d, 8, 1, 1, 111), 0);
    ck_assert_int_eq(kvb_disk_contains(d, 8, 1), 0);
    assert_usage(d, 1, 222);
    ck_assert_int_eq(cap.count[KVB_LOG_WARNING], 1);
    ck_assert_msg(strstr(cap.last[KVB_LOG_WARNING], p) != NULL,
                  "warning '%s' does not name %s",
                  cap.last[KVB_LOG_WARNING], p);
    ck_assert_int_eq(get_blob(d, 8, 2, 2, 222), 1);
    close_disk(d);
    test_log_stop(&cap);
}
END_TEST

/* A put that cannot write is KVB_ERR_IO naming the folder, leaves no
 * temporary file and indexes nothing: a read-only folder (not as root,
 * which ignores permissions) and a folder removed after open. */
START_TEST(test_disk_put_failure_names_path)
{
    kvb_disk *d = open_disk(g_dir, 1u << 20);
    put_blob(d, 1, 1, 1, 10);
    unsigned char blob[32] = {0};
    if (geteuid() != 0) {
        ck_assert_int_eq(chmod(g_dir, 0500), 0);
        ck_assert_int_eq(kvb_disk_put(d, 1, 2, blob, sizeof blob),
                         KVB_ERR_IO);
        ck_assert_ptr_nonnull(strstr(kvb_last_error(), g_dir));
        ck_assert_int_eq(chmod(g_dir, 0700), 0);
        ck_assert_int_eq(kvb_disk_contains(d, 1, 2), 0);
        assert_usage(d, 1, 10);
        ck_assert_int_eq(count_folder(g_dir).temps, 0);
    }
    char p[PATH_LEN];
    entry_path(p, g_dir, 1, 1);
    ck_assert_int_eq(unlink(p), 0);
    ck_assert_int_eq(rmdir(g_dir), 0);
    kvb_clear_error();
    ck_assert_int_eq(kvb_disk_put(d, 1, 3, blob, sizeof blob), KVB_ERR_IO);
    ck_assert_msg(strstr(kvb_last_error(), g_dir) != NULL,
                  "message '%s' does not name %s", kvb_last_error(), g_dir);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_put"));
    ck_assert_int_eq(kvb_disk_contains(d, 1, 3), 0);
    assert_usage(d, 1, 10); /* the vanished entry is not noticed yet */
}
END_TEST

/* Missing parents of the folder are created. */
START_TEST(test_disk_open_creates_missing_parents)
{
    char deep[PATH_LEN];
    snprintf(deep, sizeof deep, "%s/a/b/c/", g_dir);
    kvb_disk *d = open_disk(deep, 1u << 20);
    put_blob(d, 1, 1, 1, 10);
    snprintf(deep, sizeof deep, "%s/a/b/c", g_dir);
    ck_assert_int_eq(file_exists(deep, 1, 1), 1);
}
END_TEST

/* Bad arguments are KVB_ERR_INVALID with a message naming the function
 * and the argument or path; the void calls accept NULL. */
START_TEST(test_disk_bad_arguments_named)
{
    kvb_disk *d = (kvb_disk *)1;
    ck_assert_int_eq(kvb_disk_open(NULL, 10, &d), KVB_ERR_INVALID);
    ck_assert_ptr_null(d);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_open: dir"));
    ck_assert_int_eq(kvb_disk_open("", 10, &d), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "dir is empty"));
    ck_assert_int_eq(kvb_disk_open(g_dir, 10, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "out is NULL"));

    /* a regular file is no folder, nor can one be made below it */
    char file[PATH_LEN];
    snprintf(file, sizeof file, "%s/plain", g_dir);
    touch_file(g_dir, "plain");
    ck_assert_int_eq(kvb_disk_open(file, 10, &d), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), file));
    char below[PATH_LEN];
    snprintf(below, sizeof below, "%s/plain/sub", g_dir);
    ck_assert_int_eq(kvb_disk_open(below, 10, &d), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), below));
    ck_assert_ptr_null(d);

    d = open_disk(g_dir, 1000);
    void *buf = NULL;
    size_t len = 0;
    unsigned char byte = 0;
    ck_assert_int_eq(kvb_disk_get(NULL, 1, 1, &buf, &len), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_get: disk"));
    ck_assert_int_eq(kvb_disk_get(d, 1, 1, NULL, &len), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_get: buf"));
    ck_assert_int_eq(kvb_disk_get(d, 1, 1, &buf, NULL), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_get: len"));
    ck_assert_int_eq(kvb_disk_put(NULL, 1, 1, &byte, 1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_put: disk"));
    ck_assert_int_eq(kvb_disk_put(d, 1, 1, NULL, 1), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "kvb_disk_put: buf"));
    ck_assert_int_eq(kvb_disk_contains(NULL, 1, 1), 0);
    int64_t n = -1;
    size_t b = 1;
    kvb_disk_usage(NULL, &n, &b);
    ck_assert_int_eq(n, 0);
    ck_assert_uint_eq(b, 0);
    kvb_disk_drop(NULL, 1, 1);
    kvb_disk_close(NULL);
    assert_usage(d, 0, 0);
}
END_TEST

/* ------------------------------------------------------------- threads */

#define T_THREADS 4
#define T_ITERS 300
#define T_KEYS 24

typedef struct thread_arg {
    kvb_disk *disk;
    unsigned seed;
    int bad; /* hits whose bytes differ, or errors */
} thread_arg;

/* Size of key k's blob in the threads test: they differ, so a mixed-up
 * entry or a wrong byte count shows. */
static size_t t_size(uint64_t k)
{
    return 1000 + (size_t)k * 97;
}

/* One worker: a mix of puts, gets (checked byte for byte) and drops over
 * overlapping keys.  Every thread writes key k's same blob, so any hit must
 * hold exactly it. */
static void *t_worker(void *p)
{
    thread_arg *a = p;
    unsigned s = a->seed;
    for (int i = 0; i < T_ITERS; i++) {
        s = s * 1103515245u + 12345u;
        uint64_t k = (s >> 8) % T_KEYS;
        unsigned op = (s >> 20) % 10;
        if (op < 5) {
            unsigned char *b = pattern_blob(t_size(k), k);
            if (kvb_disk_put(a->disk, 42, k, b, t_size(k)) != KVB_OK) {
                a->bad++;
            }
            free(b);
        } else if (op < 9) {
            void *buf = NULL;
            size_t len = 0;
            if (kvb_disk_get(a->disk, 42, k, &buf, &len) != KVB_OK) {
                a->bad++;
            } else if (buf != NULL) {
                a->bad += !blob_matches(buf, len, k, t_size(k));
                free(buf);
            }
        } else {
            kvb_disk_drop(a->disk, 42, k);
        }
    }
    return NULL;
}

/* Four threads put, get and drop overlapping keys under a budget that
 * forces evictions; afterwards the index equals the folder (entries,
 * bytes, which keys), nothing temporary is left, the budget holds, and a
 * reopen finds the same. */
START_TEST(test_disk_threads_keep_index_consistent_with_folder)
{
    size_t budget = 6 * t_size(T_KEYS / 2);
    kvb_disk *d = open_disk(g_dir, budget);
    pthread_t th[T_THREADS];
    thread_arg args[T_THREADS];
    for (int t = 0; t < T_THREADS; t++) {
        args[t].disk = d;
        args[t].seed = 17u + 31u * (unsigned)t;
        args[t].bad = 0;
        ck_assert_int_eq(pthread_create(&th[t], NULL, t_worker, &args[t]), 0);
    }
    for (int t = 0; t < T_THREADS; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(args[t].bad, 0);
    }
    int64_t n;
    size_t bytes;
    kvb_disk_usage(d, &n, &bytes);
    folder_count c = count_folder(g_dir);
    ck_assert_int_eq(n, c.entries);
    ck_assert_uint_eq(bytes, c.bytes);
    ck_assert_int_eq(c.temps, 0);
    ck_assert_uint_le(bytes, budget);
    ck_assert_int_gt(n, 0);
    size_t sum = 0;
    for (uint64_t k = 0; k < T_KEYS; k++) {
        int in = kvb_disk_contains(d, 42, k);
        ck_assert_int_eq(in, file_exists(g_dir, 42, k));
        sum += in ? t_size(k) : 0;
    }
    ck_assert_uint_eq(sum, bytes);
    close_disk(d);

    d = open_disk(g_dir, budget);
    assert_usage(d, n, bytes);
    for (uint64_t k = 0; k < T_KEYS; k++) {
        if (file_exists(g_dir, 42, k)) {
            ck_assert_int_eq(get_blob(d, 42, k, k, t_size(k)), 1);
        }
    }
}
END_TEST

/* The disk suite: every test above in one case (fork mode isolates the
 * log sinks some of them install). */
Suite *disk_suite(void)
{
    static const case_spec cases[] = {{"core", dir_setup, dir_teardown, 120}};
    const test_spec tests[] = {
        {0, test_disk_put_get_round_trip, 0},
        {0, test_disk_contains_and_miss, 0},
        {0, test_disk_lru_evicts_least_recently_used, 0},
        {0, test_disk_put_evicts_several_for_a_large_blob, 0},
        {0, test_disk_put_replaces_same_entry, 0},
        {0, test_disk_reopen_restores_entries_and_lru_order, 0},
        {0, test_disk_get_refreshes_file_time, 0},
        {0, test_disk_open_removes_leftover_temp_files, 0},
        {0, test_disk_open_leaves_unrelated_files, 0},
        {0, test_disk_oversize_blob_not_stored, 0},
        {0, test_disk_zero_budget_stores_nothing, 0},
        {0, test_disk_reopen_smaller_budget_evicts_oldest, 0},
        {0, test_disk_drop_deletes_file, 0},
        {0, test_disk_vanished_file_is_a_miss_and_forgotten, 0},
        {0, test_disk_adopts_files_of_other_processes, 0},
        {0, test_disk_put_failure_names_path, 0},
        {0, test_disk_open_creates_missing_parents, 0},
        {0, test_disk_bad_arguments_named, 0},
        {0, test_disk_threads_keep_index_consistent_with_folder, 0},
    };
    return suite_build("disk", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
