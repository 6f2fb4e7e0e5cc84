/*
 * disk.c: the disk tier (tiers.h), one file per entry in one folder, with
 * a byte budget and least-recently-used eviction.
 *
 * Files.  The entry (key, hash) lives in "<key>-<hash>.kvb" (16 lower-case
 * hex digits each).  A put writes a temporary file
 * ".<key>-<hash>.<pid>.<serial>.tmp" (the pid and a per-process counter
 * make the name unique, so two threads or processes writing the same entry
 * never share one), fsyncs it and renames it over the final name, then
 * fsyncs the folder: a reader sees the old file or the new one, never a
 * part.  Files are opened relative to a descriptor of the folder, so no
 * path is ever concatenated and the names stay short.
 *
 * Index.  A chained hash table keyed by (key, hash) that doubles its
 * bucket array when it holds as many entries as buckets, and one LRU list
 * (head = least recently used).  Every indexed entry's bytes count against
 * the budget; temporary files being written do not.  Opening rebuilds the
 * index from the folder, ordered by modification time, and a get touches
 * the file's time, so the order survives a restart.
 *
 * Locking.  One mutex guards the index.  Writing, fsync, reading and
 * unlinking run outside it; the two renames run under it:
 *   - publishing: a put renames its temporary file over the final name and
 *     indexes it in one critical section;
 *   - retiring: eviction and drop rename the final name to a fresh
 *     temporary name under the lock, and unlink that name after releasing
 *     it (unlinking a large file can take long).
 * So under the lock "indexed" and "the final name exists" always agree
 * (short of someone else touching the folder), and an eviction can never
 * delete a file that a concurrent put has just published under the same
 * name.  A get reads outside the lock: the file it opens is some complete
 * version of the entry, or gone (ENOENT) when evicted meanwhile.  Each
 * indexed entry carries a generation number, so a get that failed drops
 * the entry only if it is still the one it looked up.  A crash between a
 * retire and its unlink leaves a temporary file, removed by the next open
 * (a temporary file whose writer process still runs is left alone).
 *
 * Sharing.  Several processes may open one folder (vLLM's scheduler and
 * workers, or several engines): each keeps its own index, a file another
 * process wrote is adopted by kvb_disk_contains, and a file another
 * process evicted reads as a miss.  Each process enforces the budget over
 * the files it knows.
 */
#define _POSIX_C_SOURCE 200809L /* openat & co, fdopendir, st_mtim, XSI
                                   strerror_r */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "internal.h"
#include "tiers.h"

#define DISK_MIN_BUCKETS 64
#define DISK_NAME_MAX 96 /* longest name: the temporary one, 81 bytes */
#define DISK_HEX_DIGITS 16
#define DISK_FINAL_LEN 37 /* "<16>-<16>.kvb" */
#define DISK_FILE_MODE 0600 /* blobs hold prompt-derived data */
#define DISK_DIR_MODE 0700

typedef struct disk_entry disk_entry;

struct disk_entry {
    uint64_t key;
    uint64_t hash;
    size_t bytes;         /* the file's size, charged to the budget */
    uint64_t gen;         /* unique per indexing, see the file comment */
    uint64_t trash;       /* once retired: serial of its temporary name,
                             0 when there is nothing to unlink */
    disk_entry *bucket_next;
    disk_entry *lru_prev; /* towards the least recently used end */
    disk_entry *lru_next; /* towards the most recently used end; also
                             chains retired entries awaiting unlink */
};

struct kvb_disk {
    pthread_mutex_t mu;
    char *dir;   /* the folder, for messages (owned) */
    int dirfd;   /* the folder, for every file operation (owned) */
    size_t budget;

    disk_entry **buckets;
    size_t num_buckets; /* a power of two */
    int64_t count;      /* entries indexed */
    size_t bytes;       /* their bytes */
    uint64_t next_gen;

    disk_entry *lru_head; /* least recently used */
    disk_entry *lru_tail; /* most recently used */

    atomic_ullong next_serial; /* for temporary names; no lock needed */
};

/* ------------------------------------------------------------- names */

/* Writes the final file name of (key, hash) into name[DISK_NAME_MAX]. */
static void disk_final_name(char *name, uint64_t key, uint64_t hash)
{
    snprintf(name, DISK_NAME_MAX, "%016llx-%016llx.kvb",
             (unsigned long long)key, (unsigned long long)hash);
}

/* Writes the temporary file name of (key, hash) with `serial` and this
 * process's id into name[DISK_NAME_MAX]: "." + the final name without
 * ".kvb" + ".pid.serial.tmp". */
static void disk_temp_name(char *name, uint64_t key, uint64_t hash,
                           uint64_t serial)
{
    char final[DISK_NAME_MAX];
    disk_final_name(final, key, hash);
    snprintf(name, DISK_NAME_MAX, ".%.33s.%ld.%llu.tmp", final,
             (long)getpid(), (unsigned long long)serial);
}

/* Whether a final file of (key, hash) exists in `dir` (a stat; no index:
 * the scheduler's lookup-only view of a folder other processes own). */
int kvb_disk_file_exists(const char *dir, uint64_t key, uint64_t hash)
{
    char name[DISK_NAME_MAX];
    char path[KVB_MAX_PATH + DISK_NAME_MAX];
    struct stat sb;
    disk_final_name(name, key, hash);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Returns a fresh serial for a temporary name (never 0, which marks "no
 * file" in disk_entry.trash). */
static uint64_t disk_serial(kvb_disk *disk)
{
    return (uint64_t)atomic_fetch_add(&disk->next_serial, 1) + 1;
}

/* Parses exactly n lower-case hex digits at s into *out; returns 0 when
 * any of them is not one. */
static int disk_parse_hex(const char *s, int n, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        char c = s[i];
        int d;
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else {
            return 0;
        }
        v = (v << 4) | (uint64_t)d;
    }
    *out = v;
    return 1;
}

/* Returns 1 when `name` is exactly a final entry name "<key>-<hash>.kvb"
 * and then sets *key and *hash; 0 otherwise. */
static int disk_parse_final(const char *name, uint64_t *key, uint64_t *hash)
{
    return strlen(name) == DISK_FINAL_LEN &&
           disk_parse_hex(name, DISK_HEX_DIGITS, key) &&
           name[DISK_HEX_DIGITS] == '-' &&
           disk_parse_hex(name + DISK_HEX_DIGITS + 1, DISK_HEX_DIGITS,
                          hash) &&
           strcmp(name + 2 * DISK_HEX_DIGITS + 1, ".kvb") == 0;
}

/* Skips one or more decimal digits at s; returns the character after them,
 * or NULL when s does not start with a digit. */
static const char *disk_skip_digits(const char *s)
{
    if (*s < '0' || *s > '9') {
        return NULL;
    }
    while (*s >= '0' && *s <= '9') {
        s++;
    }
    return s;
}

/* Returns 1 when `name` has the shape of a temporary file of this tier,
 * ".<16 hex>-<16 hex>.<digits>.<digits>.tmp", else 0. */
static int disk_is_temp(const char *name)
{
    uint64_t unused;
    if (name[0] != '.' || strlen(name) < 1 + 2 * DISK_HEX_DIGITS + 1 ||
        !disk_parse_hex(name + 1, DISK_HEX_DIGITS, &unused) ||
        name[1 + DISK_HEX_DIGITS] != '-' ||
        !disk_parse_hex(name + 2 + DISK_HEX_DIGITS, DISK_HEX_DIGITS,
                        &unused)) {
        return 0;
    }
    const char *s = name + 2 + 2 * DISK_HEX_DIGITS;
    if (*s++ != '.' || (s = disk_skip_digits(s)) == NULL || *s++ != '.' ||
        (s = disk_skip_digits(s)) == NULL) {
        return 0;
    }
    return strcmp(s, ".tmp") == 0;
}

/* Returns 1 when the process whose id is in the temporary name `name`
 * (disk_is_temp holds) still runs (it may be writing the file now), 0
 * when it is gone (the file is a crashed writer's leftover). */
static int disk_temp_owner_alive(const char *name)
{
    const char *p = name + 2 + 2 * DISK_HEX_DIGITS + 1;
    long pid = strtol(p, NULL, 10);
    if (pid <= 0) {
        return 0;
    }
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

/* Writes the message of errno value `err` into buf[n] and returns buf
 * (strerror itself is not thread-safe). */
static const char *disk_strerror(int err, char *buf, size_t n)
{
    if (strerror_r(err, buf, n) != 0) {
        snprintf(buf, n, "errno %d", err);
    }
    return buf;
}

/* Records a KVB_ERR_IO message "<fn>: cannot <what> <dir>/<name>: <errno
 * text>" and returns KVB_ERR_IO. */
static kvb_status disk_io_fail(const kvb_disk *disk, const char *fn,
                               const char *what, const char *name, int err)
{
    char ebuf[128];
    return kvb_fail(KVB_ERR_IO, "%s: cannot %s %s/%s: %s", fn, what,
                    disk->dir, name, disk_strerror(err, ebuf, sizeof ebuf));
}

/* ------------------------------------------------------------- index */

/* Mixes (key, hash) into a bucket number seed; hash is already uniform,
 * key is mixed in so that two shards' entries of one segment spread. */
static uint64_t disk_mix(uint64_t key, uint64_t hash)
{
    uint64_t x = hash ^ (key * 0x9e3779b97f4a7c15ull);
    return x ^ (x >> 29);
}

/* Finds the entry of (key, hash); NULL when there is none.  Caller holds
 * the lock. */
static disk_entry *disk_find(const kvb_disk *disk, uint64_t key,
                             uint64_t hash)
{
    size_t i = disk_mix(key, hash) & (disk->num_buckets - 1);
    for (disk_entry *e = disk->buckets[i]; e != NULL; e = e->bucket_next) {
        if (e->key == key && e->hash == hash) {
            return e;
        }
    }
    return NULL;
}

/* Doubles the bucket array and rehashes.  On allocation failure keeps the
 * current table (chains just get longer); never fails.  Caller holds the
 * lock. */
static void disk_grow(kvb_disk *disk)
{
    size_t nb = disk->num_buckets * 2;
    disk_entry **b = calloc(nb, sizeof *b);
    if (b == NULL) {
        return;
    }
    for (size_t i = 0; i < disk->num_buckets; i++) {
        disk_entry *e = disk->buckets[i];
        while (e != NULL) {
            disk_entry *next = e->bucket_next;
            size_t j = disk_mix(e->key, e->hash) & (nb - 1);
            e->bucket_next = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(disk->buckets);
    disk->buckets = b;
    disk->num_buckets = nb;
}

/*
 * Indexes `e` (not indexed; no entry of its name may be) as the most
 * recently used entry, gives it a fresh generation and charges its bytes.
 * Caller holds the lock.
 */
static void disk_insert(kvb_disk *disk, disk_entry *e)
{
    if ((size_t)disk->count >= disk->num_buckets) {
        disk_grow(disk);
    }
    size_t i = disk_mix(e->key, e->hash) & (disk->num_buckets - 1);
    e->bucket_next = disk->buckets[i];
    disk->buckets[i] = e;
    e->gen = ++disk->next_gen;
    e->trash = 0;
    e->lru_prev = disk->lru_tail;
    e->lru_next = NULL;
    if (disk->lru_tail != NULL) {
        disk->lru_tail->lru_next = e;
    } else {
        disk->lru_head = e;
    }
    disk->lru_tail = e;
    disk->count++;
    disk->bytes += e->bytes;
}

/* Unlinks `e` from the LRU list.  Caller holds the lock. */
static void disk_lru_unlink(kvb_disk *disk, disk_entry *e)
{
    if (e->lru_prev != NULL) {
        e->lru_prev->lru_next = e->lru_next;
    } else {
        disk->lru_head = e->lru_next;
    }
    if (e->lru_next != NULL) {
        e->lru_next->lru_prev = e->lru_prev;
    } else {
        disk->lru_tail = e->lru_prev;
    }
    e->lru_prev = e->lru_next = NULL;
}

/* Makes the indexed `e` the most recently used entry.  Caller holds the
 * lock. */
static void disk_touch(kvb_disk *disk, disk_entry *e)
{
    if (disk->lru_tail == e) {
        return;
    }
    disk_lru_unlink(disk, e);
    e->lru_prev = disk->lru_tail;
    disk->lru_tail->lru_next = e;
    disk->lru_tail = e;
}

/* Takes the indexed `e` out of the table and the LRU list and uncharges
 * its bytes; the caller owns (and eventually frees) it.  Caller holds the
 * lock. */
static void disk_remove(kvb_disk *disk, disk_entry *e)
{
    disk_entry **pp =
        &disk->buckets[disk_mix(e->key, e->hash) & (disk->num_buckets - 1)];
    while (*pp != e) {
        pp = &(*pp)->bucket_next;
    }
    *pp = e->bucket_next;
    e->bucket_next = NULL;
    disk_lru_unlink(disk, e);
    disk->count--;
    disk->bytes -= e->bytes;
}

/* ------------------------------------------------------------- files */

/*
 * Frees the final name of (key, hash) at once by renaming its file to a
 * fresh temporary name, which the caller unlinks after releasing the lock
 * (disk_unlink_trash).  Returns that name's serial, or 0 when there is
 * nothing left to unlink: no file (ENOENT), or the rename failed and the
 * file was unlinked right here instead.  Caller holds the lock.
 */
static uint64_t disk_retire(kvb_disk *disk, uint64_t key, uint64_t hash)
{
    char final[DISK_NAME_MAX];
    char trash[DISK_NAME_MAX];
    uint64_t serial = disk_serial(disk);
    disk_final_name(final, key, hash);
    disk_temp_name(trash, key, hash, serial);
    if (renameat(disk->dirfd, final, disk->dirfd, trash) == 0) {
        return serial;
    }
    if (errno != ENOENT && unlinkat(disk->dirfd, final, 0) != 0 &&
        errno != ENOENT) {
        char ebuf[128];
        kvb_log(KVB_LOG_WARNING, "disk tier: cannot delete %s/%s: %s",
                disk->dir, final, disk_strerror(errno, ebuf, sizeof ebuf));
    }
    return 0;
}

/* Unlinks the temporary name `serial` of (key, hash) made by disk_retire
 * (nothing when serial is 0); a failure is logged, not returned.  Runs
 * without the lock. */
static void disk_unlink_trash(kvb_disk *disk, uint64_t key, uint64_t hash,
                              uint64_t serial)
{
    if (serial == 0) {
        return;
    }
    char trash[DISK_NAME_MAX];
    disk_temp_name(trash, key, hash, serial);
    if (unlinkat(disk->dirfd, trash, 0) != 0 && errno != ENOENT) {
        char ebuf[128];
        kvb_log(KVB_LOG_WARNING, "disk tier: cannot delete %s/%s: %s",
                disk->dir, trash, disk_strerror(errno, ebuf, sizeof ebuf));
    }
}

/* Unlinks the retired files of the chain `list` (linked by lru_next, from
 * disk_evict) and frees its entries.  Runs without the lock. */
static void disk_free_retired(kvb_disk *disk, disk_entry *list)
{
    while (list != NULL) {
        disk_entry *next = list->lru_next;
        disk_unlink_trash(disk, list->key, list->hash, list->trash);
        free(list);
        list = next;
    }
}

/*
 * Evicts least recently used entries, never `keep` (may be NULL), until
 * the indexed bytes fit the budget: each leaves the index and its file is
 * retired.  Returns the evicted entries chained by lru_next, for
 * disk_free_retired once the lock is released.  Caller holds the lock.
 */
static disk_entry *disk_evict(kvb_disk *disk, const disk_entry *keep)
{
    disk_entry *retired = NULL;
    disk_entry *e = disk->lru_head;
    while (disk->bytes > disk->budget && e != NULL) {
        disk_entry *next = e->lru_next;
        if (e != keep) {
            disk_remove(disk, e);
            e->trash = disk_retire(disk, e->key, e->hash);
            e->lru_next = retired;
            retired = e;
        }
        e = next;
    }
    return retired;
}

/* Writes p[0..len) to fd, resuming after short writes and EINTR.  Returns
 * 0, or the errno of the failed write. */
static int disk_write_all(int fd, const unsigned char *p, size_t len)
{
    while (len > 0) {
        size_t chunk = len < ((size_t)1 << 30) ? len : ((size_t)1 << 30);
        ssize_t n = write(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        if (n == 0) {
            return EIO; /* no progress and no error: do not spin */
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reads exactly len bytes from fd into p, resuming after short reads and
 * EINTR.  Returns 0, the errno of the failed read, or -1 when the file
 * ends first. */
static int disk_read_all(int fd, unsigned char *p, size_t len)
{
    while (len > 0) {
        size_t chunk = len < ((size_t)1 << 30) ? len : ((size_t)1 << 30);
        ssize_t n = read(fd, p, chunk);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        if (n == 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/*
 * Creates `dir` and its missing parents (like mkdir -p) and opens it.
 * Returns the descriptor, or -1 with *err set to the errno of the step
 * that failed (the last mkdir's when it was more telling than the open's).
 */
static int disk_make_dir(const char *dir, int *err)
{
    char *p = strdup(dir);
    if (p == NULL) {
        *err = ENOMEM;
        return -1;
    }
    int mk_err = 0;
    for (char *s = p + 1;; s++) {
        if (*s == '/' || *s == '\0') {
            char c = *s;
            *s = '\0';
            mk_err = mkdir(p, DISK_DIR_MODE) == 0 ? 0 : errno;
            *s = c;
            if (c == '\0') {
                break;
            }
        }
    }
    free(p);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        *err = mk_err != 0 && mk_err != EEXIST ? mk_err : errno;
        return -1;
    }
    return fd;
}

/* One final-name file found by the scan at open. */
typedef struct disk_found {
    uint64_t key;
    uint64_t hash;
    size_t bytes;
    struct timespec mtime;
} disk_found;

/* qsort order of scanned files: oldest modification time first, then by
 * name, so that equal times give one deterministic order. */
static int disk_found_cmp(const void *pa, const void *pb)
{
    const disk_found *a = pa;
    const disk_found *b = pb;
    if (a->mtime.tv_sec != b->mtime.tv_sec) {
        return a->mtime.tv_sec < b->mtime.tv_sec ? -1 : 1;
    }
    if (a->mtime.tv_nsec != b->mtime.tv_nsec) {
        return a->mtime.tv_nsec < b->mtime.tv_nsec ? -1 : 1;
    }
    if (a->key != b->key) {
        return a->key < b->key ? -1 : 1;
    }
    return a->hash < b->hash ? -1 : (a->hash > b->hash);
}

/*
 * Scans the folder of a new tier (no other thread uses it yet): removes
 * temporary files, collects the regular files with a final name into a
 * new malloc'd array *found (the caller frees it) of *n items, and leaves
 * every other file alone.  KVB_ERR_INVALID naming the folder when it
 * cannot be listed, KVB_ERR_NOMEM when the array cannot grow.
 */
static kvb_status disk_scan(kvb_disk *disk, disk_found **found, size_t *n)
{
    *found = NULL;
    *n = 0;
    char ebuf[128];
    int fd = dup(disk->dirfd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        int err = errno;
        if (fd >= 0) {
            close(fd);
        }
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_disk_open: cannot list folder %s: %s", disk->dir,
                        disk_strerror(err, ebuf, sizeof ebuf));
    }
    size_t cap = 0;
    int64_t removed = 0;
    kvb_status st = KVB_OK;
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (de == NULL) {
            if (errno != 0) {
                st = kvb_fail(KVB_ERR_INVALID,
                              "kvb_disk_open: cannot list folder %s: %s",
                              disk->dir,
                              disk_strerror(errno, ebuf, sizeof ebuf));
            }
            break;
        }
        const char *name = de->d_name;
        if (disk_is_temp(name) && disk_temp_owner_alive(name)) {
            continue; /* another process sharing the folder is writing it */
        }
        if (disk_is_temp(name)) {
            if (unlinkat(disk->dirfd, name, 0) == 0) {
                removed++;
            } else if (errno != ENOENT) {
                kvb_log(KVB_LOG_WARNING,
                        "disk tier: cannot delete leftover %s/%s: %s",
                        disk->dir, name,
                        disk_strerror(errno, ebuf, sizeof ebuf));
            }
            continue;
        }
        uint64_t key;
        uint64_t hash;
        struct stat sb;
        if (!disk_parse_final(name, &key, &hash) ||
            fstatat(disk->dirfd, name, &sb, AT_SYMLINK_NOFOLLOW) != 0 ||
            !S_ISREG(sb.st_mode)) {
            continue;
        }
        if (*n == cap) {
            size_t nc = cap > 0 ? 2 * cap : 64;
            disk_found *f = realloc(*found, nc * sizeof *f);
            if (f == NULL) {
                st = kvb_fail(KVB_ERR_NOMEM,
                              "kvb_disk_open: out of memory indexing %s",
                              disk->dir);
                break;
            }
            *found = f;
            cap = nc;
        }
        disk_found *f = &(*found)[(*n)++];
        f->key = key;
        f->hash = hash;
        f->bytes = (size_t)sb.st_size;
        f->mtime = sb.st_mtim;
    }
    closedir(d);
    if (removed > 0) {
        kvb_log(KVB_LOG_INFO,
                "disk tier %s: removed %lld leftover temporary files",
                disk->dir, (long long)removed);
    }
    return st;
}

/* ------------------------------------------------------------- API */

/* Opens the tier: creates and scans the folder, indexes its entries
 * oldest first and deletes the oldest beyond the budget.  See tiers.h.
 * On success *out owns the folder descriptor and the index; free it with
 * kvb_disk_close. */
kvb_status kvb_disk_open(const char *dir, size_t budget_bytes,
                         kvb_disk **out)
{
    if (out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_disk_open: out is NULL");
    }
    *out = NULL;
    if (dir == NULL || dir[0] == '\0') {
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_disk_open: dir is %s (expected a folder path)",
                        dir == NULL ? "NULL" : "empty");
    }
    kvb_disk *disk = calloc(1, sizeof *disk);
    if (disk == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "kvb_disk_open: out of memory");
    }
    if (pthread_mutex_init(&disk->mu, NULL) != 0) {
        free(disk);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_disk_open: cannot create a mutex");
    }
    /* from here on kvb_disk_close releases whatever was made */
    disk->dirfd = -1;
    disk->budget = budget_bytes;
    atomic_init(&disk->next_serial, 0);
    disk->num_buckets = DISK_MIN_BUCKETS;
    disk->buckets = calloc(disk->num_buckets, sizeof *disk->buckets);
    disk->dir = strdup(dir);
    if (disk->buckets == NULL || disk->dir == NULL) {
        kvb_disk_close(disk);
        return kvb_fail(KVB_ERR_NOMEM, "kvb_disk_open: out of memory");
    }
    /* "/a/b/" and "/a/b" name one folder; keep messages free of "//" */
    for (size_t l = strlen(disk->dir); l > 1 && disk->dir[l - 1] == '/';) {
        disk->dir[--l] = '\0';
    }
    char ebuf[128];
    int err = 0;
    disk->dirfd = disk_make_dir(disk->dir, &err);
    if (disk->dirfd < 0) {
        kvb_disk_close(disk);
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_disk_open: dir %s is not a usable folder: %s",
                        dir, disk_strerror(err, ebuf, sizeof ebuf));
    }
    if (access(disk->dir, R_OK | W_OK | X_OK) != 0) {
        err = errno;
        kvb_disk_close(disk);
        return kvb_fail(KVB_ERR_INVALID,
                        "kvb_disk_open: dir %s is not a usable folder "
                        "(expected read and write permission): %s",
                        dir, disk_strerror(err, ebuf, sizeof ebuf));
    }

    disk_found *found = NULL;
    size_t n = 0;
    kvb_status st = disk_scan(disk, &found, &n);
    if (st != KVB_OK) {
        free(found);
        kvb_disk_close(disk);
        return st;
    }
    if (n > 0) { /* found is NULL when nothing was found */
        qsort(found, n, sizeof *found, disk_found_cmp);
    }
    for (size_t i = 0; i < n; i++) {
        disk_entry *e = calloc(1, sizeof *e);
        if (e == NULL) {
            free(found);
            kvb_disk_close(disk);
            return kvb_fail(KVB_ERR_NOMEM,
                            "kvb_disk_open: out of memory indexing %s", dir);
        }
        e->key = found[i].key;
        e->hash = found[i].hash;
        e->bytes = found[i].bytes;
        disk_insert(disk, e);
    }
    free(found);

    /* Down to the budget.  No other thread can see the tier yet, so the
     * lock disk_evict expects is not needed, and the unlinks follow at
     * once. */
    int64_t before = disk->count;
    disk_free_retired(disk, disk_evict(disk, NULL));
    if (disk->count < before) {
        kvb_log(KVB_LOG_INFO,
                "disk tier %s: deleted %lld least recently used entries "
                "to fit the budget of %zu bytes",
                disk->dir, (long long)(before - disk->count), disk->budget);
    }
    kvb_log(KVB_LOG_DEBUG, "disk tier %s: %lld entries, %zu bytes",
            disk->dir, (long long)disk->count, disk->bytes);
    *out = disk;
    return KVB_OK;
}

/* Frees the index and closes the folder; the files stay.  NULL is a no-op.
 * Also releases a half-built tier of kvb_disk_open (any of dirfd, buckets
 * and dir may be missing; the mutex always exists). */
void kvb_disk_close(kvb_disk *disk)
{
    if (disk == NULL) {
        return;
    }
    disk_entry *e = disk->lru_head;
    while (e != NULL) {
        disk_entry *next = e->lru_next;
        free(e);
        e = next;
    }
    if (disk->dirfd >= 0) {
        close(disk->dirfd);
    }
    pthread_mutex_destroy(&disk->mu);
    free(disk->buckets);
    free(disk->dir);
    free(disk);
}

/*
 * 1 when (key, hash) is indexed or its file exists, else 0 (also for a NULL
 * disk).  A file that exists but is not indexed was written by another
 * process sharing the folder (the scheduler and the workers of one vLLM
 * instance, or engines restarted while others run): it is adopted into the
 * index as most recently used, charged to the budget, and evictions follow.
 * Does not change the LRU order of an indexed entry.
 */
int kvb_disk_contains(kvb_disk *disk, uint64_t key, uint64_t hash)
{
    if (disk == NULL) {
        return 0;
    }
    pthread_mutex_lock(&disk->mu);
    int found = disk_find(disk, key, hash) != NULL;
    pthread_mutex_unlock(&disk->mu);
    if (found) {
        return 1;
    }
    char name[DISK_NAME_MAX];
    disk_final_name(name, key, hash);
    struct stat sb;
    if (fstatat(disk->dirfd, name, &sb, AT_SYMLINK_NOFOLLOW) != 0 ||
        !S_ISREG(sb.st_mode)) {
        return 0;
    }
    disk_entry *ne = calloc(1, sizeof *ne);
    if (ne == NULL) {
        return 0;
    }
    ne->key = key;
    ne->hash = hash;
    ne->bytes = (size_t)sb.st_size;
    pthread_mutex_lock(&disk->mu);
    disk_entry *retired = NULL;
    if (disk_find(disk, key, hash) != NULL) { /* a put indexed it meanwhile */
        free(ne);
    } else {
        disk_insert(disk, ne);
        retired = disk_evict(disk, ne);
    }
    pthread_mutex_unlock(&disk->mu);
    disk_free_retired(disk, retired);
    return 1;
}

/*
 * Handles a get whose file could not be read (`why`): when the entry of
 * generation `gen` is still indexed, forgets it and deletes its file (if
 * any is left), logging a warning; when it was evicted or replaced
 * meanwhile this was a race, not damage, and nothing is logged above
 * debug.
 */
static void disk_get_failed(kvb_disk *disk, uint64_t key, uint64_t hash,
                            uint64_t gen, const char *why)
{
    char name[DISK_NAME_MAX];
    disk_final_name(name, key, hash);
    pthread_mutex_lock(&disk->mu);
    disk_entry *e = disk_find(disk, key, hash);
    int ours = e != NULL && e->gen == gen;
    if (ours) {
        disk_remove(disk, e);
        e->trash = disk_retire(disk, key, hash);
    }
    pthread_mutex_unlock(&disk->mu);
    if (!ours) {
        kvb_log(KVB_LOG_DEBUG, "disk tier: %s/%s changed while read (%s)",
                disk->dir, name, why);
        return;
    }
    kvb_log(KVB_LOG_WARNING,
            "disk tier: cannot read %s/%s (%s); entry dropped", disk->dir,
            name, why);
    e->lru_next = NULL;
    disk_free_retired(disk, e);
}

/* Reads the entry into a new buffer (*buf, owned by the caller) of *len
 * bytes and makes it most recently used, also on disk (file times).  A
 * miss or an unreadable file is KVB_OK with *buf NULL.  See tiers.h. */
kvb_status kvb_disk_get(kvb_disk *disk, uint64_t key, uint64_t hash,
                        void **buf, size_t *len)
{
    if (buf != NULL) {
        *buf = NULL;
    }
    if (len != NULL) {
        *len = 0;
    }
    if (disk == NULL || buf == NULL || len == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_disk_get: %s is NULL",
                        disk == NULL ? "disk" : buf == NULL ? "buf" : "len");
    }
    pthread_mutex_lock(&disk->mu);
    disk_entry *e = disk_find(disk, key, hash);
    uint64_t gen = 0;
    size_t indexed = 0;
    if (e != NULL) {
        disk_touch(disk, e);
        gen = e->gen;
        indexed = e->bytes;
    }
    pthread_mutex_unlock(&disk->mu);
    if (e == NULL) {
        return KVB_OK;
    }

    char name[DISK_NAME_MAX];
    char ebuf[128];
    disk_final_name(name, key, hash);
    int fd = openat(disk->dirfd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        disk_get_failed(disk, key, hash, gen,
                        disk_strerror(err, ebuf, sizeof ebuf));
        return KVB_OK;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        disk_get_failed(disk, key, hash, gen,
                        disk_strerror(err, ebuf, sizeof ebuf));
        return KVB_OK;
    }
    size_t size = (size_t)sb.st_size;
    unsigned char *data = malloc(size > 0 ? size : 1);
    if (data == NULL) {
        close(fd);
        return kvb_fail(KVB_ERR_NOMEM,
                        "kvb_disk_get: out of memory for %zu bytes of %s/%s",
                        size, disk->dir, name);
    }
    int rc = disk_read_all(fd, data, size);
    if (rc != 0) {
        close(fd);
        free(data);
        disk_get_failed(disk, key, hash, gen,
                        rc < 0 ? "file shorter than its size"
                               : disk_strerror(rc, ebuf, sizeof ebuf));
        return KVB_OK;
    }
    /* Best effort: the modification time is the LRU order of the next
     * open.  A file retired meanwhile is only touched on its way out. */
    (void)futimens(fd, NULL);
    close(fd);
    if (size != indexed) { /* replaced meanwhile, or edited behind us */
        pthread_mutex_lock(&disk->mu);
        e = disk_find(disk, key, hash);
        if (e != NULL && e->gen == gen) {
            disk->bytes = disk->bytes - e->bytes + size;
            e->bytes = size;
        }
        pthread_mutex_unlock(&disk->mu);
    }
    *buf = data;
    *len = size;
    return KVB_OK;
}

/*
 * Writes the entry crash-safely, indexes it as most recently used and
 * evicts down to the budget.  The caller keeps `buf`.  A zero budget or a
 * blob larger than the budget stores nothing (KVB_OK).  See tiers.h.
 */
kvb_status kvb_disk_put(kvb_disk *disk, uint64_t key, uint64_t hash,
                        const void *buf, size_t len)
{
    static const char fn[] = "kvb_disk_put";
    if (disk == NULL || buf == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s is NULL", fn,
                        disk == NULL ? "disk" : "buf");
    }
    char final[DISK_NAME_MAX];
    char temp[DISK_NAME_MAX];
    disk_final_name(final, key, hash);
    if (disk->budget == 0) {
        return KVB_OK; /* the tier stores nothing */
    }
    if (len > disk->budget) {
        kvb_log(KVB_LOG_DEBUG,
                "disk tier: %s/%s not stored: %zu bytes exceed the budget "
                "of %zu",
                disk->dir, final, len, disk->budget);
        return KVB_OK;
    }
    disk_entry *ne = calloc(1, sizeof *ne);
    if (ne == NULL) {
        return kvb_fail(KVB_ERR_NOMEM, "%s: out of memory", fn);
    }
    ne->key = key;
    ne->hash = hash;
    ne->bytes = len;

    /* 1. the bytes, durable under the temporary name */
    disk_temp_name(temp, key, hash, disk_serial(disk));
    int fd = openat(disk->dirfd, temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                    DISK_FILE_MODE);
    if (fd < 0) {
        int err = errno;
        free(ne);
        return disk_io_fail(disk, fn, "create", temp, err);
    }
    int err = disk_write_all(fd, buf, len);
    const char *what = "write";
    if (err == 0 && fsync(fd) != 0) {
        err = errno;
        what = "fsync";
    }
    if (close(fd) != 0 && err == 0) {
        err = errno;
        what = "close";
    }
    if (err != 0) {
        unlinkat(disk->dirfd, temp, 0);
        free(ne);
        return disk_io_fail(disk, fn, what, temp, err);
    }

    /* 2. publish and index in one step (see the file comment) */
    pthread_mutex_lock(&disk->mu);
    if (renameat(disk->dirfd, temp, disk->dirfd, final) != 0) {
        err = errno;
        pthread_mutex_unlock(&disk->mu);
        unlinkat(disk->dirfd, temp, 0);
        free(ne);
        return disk_io_fail(disk, fn, "rename a temporary file to", final,
                            err);
    }
    disk_entry *old = disk_find(disk, key, hash);
    if (old != NULL) { /* its file was just replaced by the rename */
        disk_remove(disk, old);
    }
    disk_insert(disk, ne);
    uint64_t gen = ne->gen;
    disk_entry *retired = disk_evict(disk, ne);
    pthread_mutex_unlock(&disk->mu);
    free(old);
    disk_free_retired(disk, retired);

    /* 3. the rename, durable.  A file system that cannot sync folders
     * (EINVAL, ENOTSUP: some FUSE and network ones) promises nothing more
     * than it did: not an error there, or no put could ever succeed. */
    if (fsync(disk->dirfd) != 0 && errno != EINVAL && errno != ENOTSUP) {
        err = errno;
        pthread_mutex_lock(&disk->mu);
        disk_entry *e = disk_find(disk, key, hash);
        if (e != NULL && e->gen == gen) { /* unpublish, unless replaced */
            disk_remove(disk, e);
            e->trash = disk_retire(disk, key, hash);
            e->lru_next = NULL;
        } else {
            e = NULL;
        }
        pthread_mutex_unlock(&disk->mu);
        disk_free_retired(disk, e);
        char ebuf[128];
        return kvb_fail(KVB_ERR_IO,
                        "%s: cannot fsync folder %s after writing %s: %s", fn,
                        disk->dir, final,
                        disk_strerror(err, ebuf, sizeof ebuf));
    }
    return KVB_OK;
}

/* Deletes the file of (key, hash), indexed or not, and forgets the entry;
 * nothing happens when there is neither.  NULL disk is a no-op. */
void kvb_disk_drop(kvb_disk *disk, uint64_t key, uint64_t hash)
{
    if (disk == NULL) {
        return;
    }
    pthread_mutex_lock(&disk->mu);
    disk_entry *e = disk_find(disk, key, hash);
    if (e != NULL) {
        disk_remove(disk, e);
    }
    uint64_t trash = disk_retire(disk, key, hash);
    pthread_mutex_unlock(&disk->mu);
    disk_unlink_trash(disk, key, hash, trash);
    free(e);
}

/* Writes the number of indexed entries and their bytes to the non-NULL
 * outputs (0 and 0 for a NULL disk). */
void kvb_disk_usage(kvb_disk *disk, int64_t *entries, size_t *bytes)
{
    int64_t n = 0;
    size_t b = 0;
    if (disk != NULL) {
        pthread_mutex_lock(&disk->mu);
        n = disk->count;
        b = disk->bytes;
        pthread_mutex_unlock(&disk->mu);
    }
    if (entries != NULL) {
        *entries = n;
    }
    if (bytes != NULL) {
        *bytes = b;
    }
}
