/*
 * check_remote.c: the remote tier (csrc/remote.c) against a real
 * redis-server started on a free loopback port for each test: URL parsing
 * (good and bad, passwords masked in messages), round trips split into
 * parts, contains and del, incomplete entries (a missing or resized part,
 * a corrupt meta) read as misses, a server that is down at open, killed
 * and restarted, or silent (a socket that never answers), authentication,
 * database selection and concurrent use from more threads than the
 * connection pool holds.
 *
 * The tests drive the server directly (DEL of one part, SETRANGE over the
 * meta, STRLEN, DBSIZE) over a small RESP client of their own, so the
 * runner needs no hiredis.  redis-server must be on PATH (or named by
 * KVB_REDIS_SERVER): without it every test fails saying so, unless
 * KVB_TEST_NO_REDIS=1, which skips them.  A libkvblend built without
 * hiredis is checked to refuse the tier (test_remote_unsupported) and the
 * other tests return early.
 */
#define _POSIX_C_SOURCE 200809L /* pthread, nanosleep, kill, fork */
#include "test_util.h"

#include <arpa/inet.h>
#include <check.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kvblend.h"
/* the internal tier hooks (exported for these tests) */
#include "../../csrc/tiers.h"

#define MIB ((size_t)1 << 20)
#define TKEY 0x0123456789abcdefull /* tier key of the test entries */
#define META_BYTES 56              /* remote.c's meta value */

/* ------------------------------------------------------------ utilities */

/* Returns CLOCK_MONOTONIC in milliseconds. */
static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleeps for ms milliseconds. */
static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The server's key of the meta of (key, hash), as remote.c names it. */
static void meta_key(char *out, size_t cap, uint64_t key, uint64_t hash)
{
    snprintf(out, cap, "kvblend:%016llx:%016llx", (unsigned long long)key,
             (unsigned long long)hash);
}

/* The server's key of part i of (key, hash). */
static void part_key(char *out, size_t cap, uint64_t key, uint64_t hash,
                     int i)
{
    snprintf(out, cap, "kvblend:%016llx:%016llx:%d", (unsigned long long)key,
             (unsigned long long)hash, i);
}

/* ------------------------------------------------------------ log sink */

/* What the tier logged: tests assert that a bad value was reported. */
static test_log g_log;

/* Checked fixture: captures the log into g_log. */
static void setup_log(void)
{
    test_log_start(&g_log, NULL);
}

/* Checked fixture: restores the default sink. */
static void teardown_log(void)
{
    test_log_stop(&g_log);
}

/* Returns the number of warnings (and worse) captured so far and copies
 * the last one to out[0..cap). */
static int warnings(char *out, size_t cap)
{
    return test_log_count(&g_log, KVB_LOG_WARNING, out, cap);
}

/* ------------------------------------------------- test redis-server */

/* A redis-server child of this test. */
typedef struct test_redis {
    pid_t pid;
    int port;
} test_redis;

/* Returns the redis-server to run ($KVB_REDIS_SERVER, else the first on
 * PATH, else /usr/bin or /usr/sbin), or NULL when there is none.  The
 * string is static. */
static const char *redis_server_path(void)
{
    static char found[4096];
    const char *env = getenv("KVB_REDIS_SERVER");
    if (env != NULL && env[0] != '\0') {
        return access(env, X_OK) == 0 ? env : NULL;
    }
    const char *path = getenv("PATH");
    char dirs[4096];
    snprintf(dirs, sizeof dirs, "%s:/usr/bin:/usr/sbin",
             path != NULL ? path : "");
    for (char *save = NULL, *d = strtok_r(dirs, ":", &save); d != NULL;
         d = strtok_r(NULL, ":", &save)) {
        snprintf(found, sizeof found, "%s/redis-server", d);
        if (access(found, X_OK) == 0) {
            return found;
        }
    }
    return NULL;
}

/* Returns 1 when libkvblend was built with hiredis (an unknown scheme is
 * then KVB_ERR_INVALID; without hiredis every open is
 * KVB_ERR_UNSUPPORTED), else 0 after saying the test is skipped. */
static int remote_built(void)
{
    kvb_remote_options o = {100, 100, MIB, 100};
    kvb_remote *r = NULL;
    if (kvb_remote_open("bogus://x", &o, &r) == KVB_ERR_UNSUPPORTED) {
        fprintf(stderr, "check_remote: libkvblend built without hiredis: "
                        "test skipped\n");
        return 0;
    }
    return 1;
}

/* Returns 1 when a redis-server can be started.  Without one the test
 * fails loudly, unless KVB_TEST_NO_REDIS=1, when it returns 0 after saying
 * the test is skipped. */
static int redis_available(void)
{
    if (redis_server_path() != NULL) {
        return 1;
    }
    const char *skip = getenv("KVB_TEST_NO_REDIS");
    if (skip != NULL && strcmp(skip, "1") == 0) {
        fprintf(stderr, "check_remote: redis-server not found and "
                        "KVB_TEST_NO_REDIS=1: test skipped\n");
        return 0;
    }
    ck_abort_msg("redis-server not found on PATH (nor KVB_REDIS_SERVER): "
                 "install it (Debian/Ubuntu: apt-get install redis-server) "
                 "or set KVB_TEST_NO_REDIS=1 to skip the remote tier tests");
    return 0;
}

/* Returns early from a test that needs hiredis and a redis-server. */
#define NEED_REDIS()                                 \
    do {                                             \
        if (!remote_built() || !redis_available()) { \
            return;                                  \
        }                                            \
    } while (0)

/* Returns a TCP socket bound to a free loopback port, listening when
 * `backlog` > 0, and that port in *port. */
static int loopback_socket(int backlog, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    if (backlog > 0) {
        ck_assert_int_eq(listen(fd, backlog), 0);
    }
    socklen_t len = sizeof a;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

/* Returns a loopback TCP port that was free a moment ago. */
static int free_port(void)
{
    int port = 0;
    close(loopback_socket(0, &port));
    return port;
}

/* Appends one RESP array of the NULL-terminated args to buf[*n..cap). */
static void resp_append(char *buf, size_t cap, size_t *n, const char **args)
{
    int argc = 0;
    while (args[argc] != NULL) {
        argc++;
    }
    *n += (size_t)snprintf(buf + *n, cap - *n, "*%d\r\n", argc);
    for (int i = 0; i < argc; i++) {
        *n += (size_t)snprintf(buf + *n, cap - *n, "$%zu\r\n%s\r\n",
                               strlen(args[i]), args[i]);
    }
    ck_assert_uint_lt(*n, cap);
}

/*
 * Sends one command (the NULL-terminated string arguments after `out`)
 * to the server on 127.0.0.1:port, preceded by AUTH `pass` when pass is
 * not NULL and SELECT `db` when db != 0, and copies the first line of its
 * reply ("+OK", ":1", "-ERR ...") to out[0..cap).  Every reply must be one
 * line (status, error, integer).  Returns 0, or -1 when the server cannot
 * be reached or does not answer within 2 s.
 */
static int raw_cmd(int port, const char *pass, int db, char *out, size_t cap,
                   ...)
{
    char req[8192];
    size_t n = 0;
    int replies = 1;
    if (pass != NULL) {
        const char *auth[] = {"AUTH", pass, NULL};
        resp_append(req, sizeof req, &n, auth);
        replies++;
    }
    if (db != 0) {
        char dbs[16];
        snprintf(dbs, sizeof dbs, "%d", db);
        const char *sel[] = {"SELECT", dbs, NULL};
        resp_append(req, sizeof req, &n, sel);
        replies++;
    }
    const char *args[16];
    int argc = 0;
    va_list ap;
    va_start(ap, cap);
    for (const char *a; (a = va_arg(ap, const char *)) != NULL;) {
        ck_assert_int_lt(argc, 15);
        args[argc++] = a;
    }
    va_end(ap);
    args[argc] = NULL;
    resp_append(req, sizeof req, &n, args);

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        return -1;
    }
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        write(fd, req, n) != (ssize_t)n) {
        close(fd);
        return -1;
    }
    char in[4096];
    size_t got = 0;
    int lines = 0;
    size_t last = 0; /* start of the last line */
    while (lines < replies) {
        ssize_t k = read(fd, in + got, sizeof in - 1 - got);
        if (k <= 0) {
            close(fd);
            return -1;
        }
        for (size_t i = got; i < got + (size_t)k; i++) {
            if (in[i] == '\n' && ++lines < replies) {
                last = i + 1;
            }
        }
        got += (size_t)k;
        if (got == sizeof in - 1) {
            break;
        }
    }
    close(fd);
    in[got] = '\0';
    size_t end = strcspn(in + last, "\r\n");
    snprintf(out, cap, "%.*s", (int)end, in + last);
    return 0;
}

/* Runs a command as raw_cmd does (no AUTH, db 0 unless given) and returns
 * its integer reply, failing the test on any other reply. */
static long long raw_int(int port, const char *pass, int db, const char *cmd,
                         const char *key)
{
    char reply[256];
    ck_assert_msg(raw_cmd(port, pass, db, reply, sizeof reply, cmd, key,
                          (const char *)NULL) == 0,
                  "raw %s %s: no answer", cmd, key);
    ck_assert_msg(reply[0] == ':', "raw %s %s: reply '%s'", cmd, key, reply);
    return atoll(reply + 1);
}

/*
 * Starts redis-server on 127.0.0.1:port (a free port when port is 0),
 * without persistence, requiring `pass` when not NULL, and waits until it
 * answers (up to 10 s).  The child is killed when this test's process
 * ends (PR_SET_PDEATHSIG), so a failing test leaves no server behind.
 */
static void redis_start(test_redis *s, int port, const char *pass)
{
    const char *path = redis_server_path();
    ck_assert_ptr_nonnull(path);
    for (int attempt = 0; attempt < 5; attempt++) {
        s->port = port > 0 ? port : free_port();
        pid_t parent = getpid();
        pid_t pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) {
                _exit(126);
            }
            int null = open("/dev/null", O_RDWR);
            if (null >= 0) {
                dup2(null, STDIN_FILENO);
                dup2(null, STDOUT_FILENO);
                dup2(null, STDERR_FILENO);
            }
            char ports[16];
            snprintf(ports, sizeof ports, "%d", s->port);
            const char *argv[] = {path, "--port", ports, "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no",
                                  "--daemonize", "no", "--dir", "/tmp",
                                  pass != NULL ? "--requirepass" : NULL, pass,
                                  NULL};
            execv(path, (char *const *)argv);
            _exit(127);
        }
        s->pid = pid;
        for (int64_t t0 = now_ms(); now_ms() - t0 < 10000;) {
            char reply[256];
            int status;
            if (waitpid(pid, &status, WNOHANG) == pid) {
                s->pid = 0;
                break; /* exited: port taken? try another */
            }
            if (raw_cmd(s->port, NULL, 0, reply, sizeof reply, "PING",
                        (const char *)NULL) == 0) {
                /* +PONG, or -NOAUTH with a password: it is up */
                return;
            }
            sleep_ms(10);
        }
        if (s->pid != 0) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, NULL, 0);
            s->pid = 0;
        }
        ck_assert_msg(port == 0, "redis-server (%s) did not start on port %d",
                      path, port);
    }
    ck_abort_msg("redis-server (%s) did not start on 127.0.0.1 (5 ports)",
                 path);
}

/* Kills the server at once (SIGKILL, no clean shutdown) and reaps it. */
static void redis_kill(test_redis *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
}

/* Options with short timeouts, so that failure paths run fast. */
static kvb_remote_options test_opts(size_t part_bytes)
{
    kvb_remote_options o;
    o.connect_timeout_ms = 300;
    o.command_timeout_ms = 300;
    o.part_bytes = part_bytes;
    o.retry_ms = 300;
    return o;
}

/* Opens the remote of `url`, failing the test unless it opens. */
static kvb_remote *open_url(const char *url, const kvb_remote_options *o)
{
    kvb_remote *r = NULL;
    kvb_status st = kvb_remote_open(url, o, &r);
    ck_assert_msg(st == KVB_OK, "open %s: %s: %s", url, kvb_status_str(st),
                  kvb_last_error());
    ck_assert_ptr_nonnull(r);
    return r;
}

/* Opens redis://127.0.0.1:port/db (db 0: no path). */
static kvb_remote *open_port(int port, int db, const kvb_remote_options *o)
{
    char url[128];
    if (db != 0) {
        snprintf(url, sizeof url, "redis://127.0.0.1:%d/%d", port, db);
    } else {
        snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    }
    return open_url(url, o);
}

/* Gets (key, hash) and fails the test unless it is a hit equal to
 * want[0..n). */
static void expect_hit(kvb_remote *r, uint64_t key, uint64_t hash,
                       const unsigned char *want, size_t n)
{
    void *buf = NULL;
    size_t len = 0;
    kvb_status st = kvb_remote_get(r, key, hash, &buf, &len);
    ck_assert_msg(st == KVB_OK, "get: %s: %s", kvb_status_str(st),
                  kvb_last_error());
    ck_assert_msg(buf != NULL, "get of %llx: a miss, expected %zu bytes",
                  (unsigned long long)hash, n);
    ck_assert_uint_eq(len, n);
    ck_assert_int_eq(memcmp(buf, want, n), 0);
    free(buf);
}

/* Gets (key, hash) and fails the test unless it is a miss (KVB_OK, NULL). */
static void expect_miss(kvb_remote *r, uint64_t key, uint64_t hash)
{
    void *buf = (void *)&buf;
    size_t len = 1;
    kvb_status st = kvb_remote_get(r, key, hash, &buf, &len);
    ck_assert_msg(st == KVB_OK, "get: %s: %s", kvb_status_str(st),
                  kvb_last_error());
    ck_assert_ptr_null(buf);
    ck_assert_uint_eq(len, 0);
}

/* Returns kvb_remote_contains's answer, failing the test on an error. */
static int contains(kvb_remote *r, uint64_t key, uint64_t hash)
{
    int found = -1;
    kvb_status st = kvb_remote_contains(r, key, hash, &found);
    ck_assert_msg(st == KVB_OK, "contains: %s: %s", kvb_status_str(st),
                  kvb_last_error());
    return found;
}

/* Puts buf[0..n) as (key, hash), failing the test on an error. */
static void put(kvb_remote *r, uint64_t key, uint64_t hash, const void *buf,
                size_t n)
{
    kvb_status st = kvb_remote_put(r, key, hash, buf, n);
    ck_assert_msg(st == KVB_OK, "put: %s: %s", kvb_status_str(st),
                  kvb_last_error());
}

/* ------------------------------------------------------------------ URL */

/* Good URLs open (nothing listens: the server is down, which is no error)
 * and are named host:port/db with the defaults filled in. */
START_TEST(test_remote_url_good)
{
    if (!remote_built()) {
        return;
    }
    int port = free_port();
    kvb_remote_options o = test_opts(MIB);
    o.connect_timeout_ms = 100;
    struct {
        const char *url;
        const char *name; /* %d: port */
    } cases[] = {
        {"redis://127.0.0.1:%d", "127.0.0.1:%d/0"},
        {"valkey://127.0.0.1:%d/3", "127.0.0.1:%d/3"},
        {"REDIS://127.0.0.1:%d/", "127.0.0.1:%d/0"},
        {"redis://:s3cret@127.0.0.1:%d/2", "127.0.0.1:%d/2"},
        {"redis://user:p%%40ss@localhost:%d/15", "localhost:%d/15"},
        {"redis://us@r:p@ss/w@127.0.0.1:%d", "127.0.0.1:%d/0"},
        {"redis://[::1]:%d/1", "[::1]:%d/1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char url[256], name[256];
        snprintf(url, sizeof url, cases[i].url, port);
        snprintf(name, sizeof name, cases[i].name, port);
        kvb_remote *r = open_url(url, &o);
        ck_assert_str_eq(kvb_remote_name(r), name);
        kvb_remote_close(r);
    }
    /* the default port */
    kvb_remote *r = open_url("redis://127.0.0.1", &o);
    ck_assert_str_eq(kvb_remote_name(r), "127.0.0.1:6379/0");
    kvb_remote_close(r);
    kvb_remote_close(NULL); /* no-op */
}
END_TEST

/* Bad URLs are KVB_ERR_INVALID naming the URL, with any password shown
 * as "***" and never in clear; bad options are refused naming them. */
START_TEST(test_remote_url_bad)
{
    if (!remote_built()) {
        return;
    }
    kvb_remote_options o = test_opts(MIB);
    struct {
        const char *url;
        const char *shown; /* the URL as the message must show it */
        const char *why;   /* and a word of the reason */
    } cases[] = {
        {"http://127.0.0.1:6379", "http://127.0.0.1:6379", "scheme"},
        {"127.0.0.1:6379", "127.0.0.1:6379", "scheme"},
        {"rediss://127.0.0.1", "rediss://127.0.0.1", "TLS"},
        {"redis://", "redis://", "empty host"},
        {"redis://:6379", "redis://:6379", "empty host"},
        {"redis:///1", "redis:///1", "empty host"},
        {"redis://127.0.0.1:0", "redis://127.0.0.1:0", "port"},
        {"redis://127.0.0.1:65536", "redis://127.0.0.1:65536", "port"},
        {"redis://127.0.0.1:http", "redis://127.0.0.1:http", "port"},
        {"redis://127.0.0.1:", "redis://127.0.0.1:", "port"},
        {"redis://127.0.0.1:-1", "redis://127.0.0.1:-1", "port"},
        {"redis://127.0.0.1/-1", "redis://127.0.0.1/-1", "db"},
        {"redis://127.0.0.1/one", "redis://127.0.0.1/one", "db"},
        {"redis://127.0.0.1/99999999999", "redis://127.0.0.1/99999999999", "db"},
        {"redis://127.0.0.1/0?timeout=1", "redis://127.0.0.1/0?timeout=1", "db"},
        {"redis://[::1", "redis://[::1", "]"},
        {"redis://bob:hunter2@127.0.0.1:99999", "redis://bob:***@127.0.0.1:99999", "port"},
        {"redis://:hunter2@", "redis://:***@", "empty host"},
        {"redis://hunter2@127.0.0.1", "redis://***@127.0.0.1", "credentials"},
        {"redis://bob:@127.0.0.1", "redis://bob:***@127.0.0.1", "empty password"},
        {"valkey://:hunter2@host/x", "valkey://:***@host/x", "db"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvb_remote *r = (kvb_remote *)&o;
        kvb_status st = kvb_remote_open(cases[i].url, &o, &r);
        const char *msg = kvb_last_error();
        ck_assert_msg(st == KVB_ERR_INVALID, "%s: %s (%s)", cases[i].url,
                      kvb_status_str(st), msg);
        ck_assert_ptr_null(r);
        ck_assert_msg(strstr(msg, cases[i].shown) != NULL,
                      "%s: message '%s' does not show '%s'", cases[i].url,
                      msg, cases[i].shown);
        ck_assert_msg(strstr(msg, cases[i].why) != NULL,
                      "%s: message '%s' does not say '%s'", cases[i].url, msg,
                      cases[i].why);
        ck_assert_msg(strstr(msg, "hunter2") == NULL,
                      "%s: message '%s' shows the password", cases[i].url,
                      msg);
    }

    kvb_remote *r = NULL;
    ck_assert_int_eq(kvb_remote_open(NULL, &o, &r), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "url"));
    ck_assert_int_eq(kvb_remote_open("redis://h", NULL, &r), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "opts"));
    ck_assert_int_eq(kvb_remote_open("redis://h", &o, NULL), KVB_ERR_INVALID);
    kvb_remote_options bad = o;
    bad.part_bytes = 0;
    ck_assert_int_eq(kvb_remote_open("redis://h", &bad, &r), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "part_bytes=0"));
    bad = o;
    bad.command_timeout_ms = 0;
    ck_assert_int_eq(kvb_remote_open("redis://h", &bad, &r), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "command_timeout_ms=0"));
    bad = o;
    bad.connect_timeout_ms = -5;
    ck_assert_int_eq(kvb_remote_open("redis://h", &bad, &r), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "connect_timeout_ms=-5"));
    bad = o;
    bad.retry_ms = -1;
    ck_assert_int_eq(kvb_remote_open("redis://:hunter2@h", &bad, &r),
                     KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "retry_ms=-1"));
    ck_assert_ptr_null(strstr(kvb_last_error(), "hunter2"));
    ck_assert_ptr_null(r);
}
END_TEST

/* ------------------------------------------------------ served tests */

/* The server, options and tier of the tests of the "served" case, made
 * and removed by a checked fixture; g_r is NULL when no server can run
 * (the test then returns at NEED_SERVER). */
static test_redis g_srv;
static kvb_remote_options g_opts;
static kvb_remote *g_r;
static unsigned char *g_blob; /* freed by the fixture */

/* Checked fixture: captures the log, starts a server, opens the tier on
 * it with parts of 1 MiB. */
static void served_setup(void)
{
    setup_log();
    g_r = NULL;
    g_blob = NULL;
    if (!remote_built() || !redis_available()) {
        return;
    }
    redis_start(&g_srv, 0, NULL);
    g_opts = test_opts(MIB);
    g_r = open_port(g_srv.port, 0, &g_opts);
}

/* Checked fixture: closes the tier, stops the server, frees the blob. */
static void served_teardown(void)
{
    if (g_r != NULL) {
        kvb_remote_close(g_r);
        redis_kill(&g_srv);
    }
    free(g_blob);
    teardown_log();
}

/* A pattern blob of n bytes (seed) that the fixture frees. */
static unsigned char *served_blob(size_t n, uint64_t seed)
{
    free(g_blob);
    g_blob = pattern_blob(n, seed);
    return g_blob;
}

/* Returns early from a served test when no server runs. */
#define NEED_SERVER()      \
    do {                   \
        if (g_r == NULL) { \
            return;        \
        }                  \
    } while (0)

/* Gets (key, hash) from r and fails the test unless it is a miss reported
 * by exactly one new warning containing `frag` (and `frag2` when not
 * NULL). */
static void expect_miss_warned(kvb_remote *r, uint64_t key, uint64_t hash,
                               const char *frag, const char *frag2)
{
    char last[1024];
    int w0 = warnings(NULL, 0);
    expect_miss(r, key, hash);
    ck_assert_int_eq(warnings(last, sizeof last), w0 + 1);
    ck_assert_msg(strstr(last, frag) != NULL, "warning '%s' lacks '%s'", last, frag);
    ck_assert_msg(frag2 == NULL || strstr(last, frag2) != NULL,
                  "warning '%s' lacks '%s'", last, frag2);
}

/* ----------------------------------------------------------- round trip */

/* A 5 MiB + 12345 byte entry is written as 6 parts of at most part_bytes
 * and a 56-byte meta, and reads back equal; so does a tiny one; contains
 * follows; a rewrite replaces the value. */
START_TEST(test_remote_roundtrip)
{
    NEED_SERVER();
    ck_assert_int_eq(contains(g_r, TKEY, 1), 0);
    expect_miss(g_r, TKEY, 1);

    size_t big = 5 * MIB + 12345;
    unsigned char *blob = served_blob(big, 1);
    put(g_r, TKEY, 1, blob, big);
    ck_assert_int_eq(contains(g_r, TKEY, 1), 1);
    expect_hit(g_r, TKEY, 1, blob, big);

    /* the layout on the server: parts 0..5, the last partial */
    char k[96];
    for (int i = 0; i < 6; i++) {
        part_key(k, sizeof k, TKEY, 1, i);
        ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "STRLEN", k),
                         i < 5 ? (long long)MIB : 12345);
    }
    part_key(k, sizeof k, TKEY, 1, 6);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "EXISTS", k), 0);
    meta_key(k, sizeof k, TKEY, 1);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "STRLEN", k), META_BYTES);

    /* an entry of exactly part_bytes is one part */
    put(g_r, TKEY, 3, blob, MIB);
    part_key(k, sizeof k, TKEY, 3, 1);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "EXISTS", k), 0);
    expect_hit(g_r, TKEY, 3, blob, MIB);

    /* a tiny entry; another tier key does not see it */
    unsigned char tiny[7] = {1, 2, 3, 0, 5, 6, 7};
    put(g_r, TKEY, 2, tiny, sizeof tiny);
    expect_hit(g_r, TKEY, 2, tiny, sizeof tiny);
    ck_assert_int_eq(contains(g_r, TKEY + 1, 2), 0);
    expect_miss(g_r, TKEY + 1, 2);

    /* a rewrite with other bytes wins */
    fill_pattern(blob, big, 2);
    put(g_r, TKEY, 1, blob, big);
    expect_hit(g_r, TKEY, 1, blob, big);

    /* an empty or NULL buffer is refused */
    ck_assert_int_eq(kvb_remote_put(g_r, TKEY, 4, blob, 0), KVB_ERR_INVALID);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "len=0"));
    ck_assert_int_eq(kvb_remote_put(g_r, TKEY, 4, NULL, 8), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_remote_get(g_r, TKEY, 4, NULL, NULL), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_remote_contains(g_r, TKEY, 4, NULL), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_remote_del(NULL, TKEY, 4), KVB_ERR_INVALID);
    ck_assert_int_eq(warnings(NULL, 0), 0);

}
END_TEST

/* del removes the meta and every part, also when the meta is corrupt
 * (parts are then found by probing); deleting a missing entry is fine. */
START_TEST(test_remote_del)
{
    NEED_SERVER();
    size_t n = 5 * MIB + 1;
    unsigned char *blob = served_blob(n, 3);
    put(g_r, TKEY, 10, blob, n);
    put(g_r, TKEY, 11, blob, 100);
    ck_assert_int_eq(kvb_remote_del(g_r, TKEY, 10), KVB_OK);
    ck_assert_int_eq(contains(g_r, TKEY, 10), 0);
    expect_miss(g_r, TKEY, 10);
    char k[96];
    for (int i = 0; i < 7; i++) {
        part_key(k, sizeof k, TKEY, 10, i);
        ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "EXISTS", k), 0);
    }
    expect_hit(g_r, TKEY, 11, blob, 100); /* the other entry stays */
    ck_assert_int_eq(kvb_remote_del(g_r, TKEY, 10), KVB_OK); /* gone: fine */

    /* a corrupt meta: the parts are still all found and deleted */
    put(g_r, TKEY, 12, blob, n);
    meta_key(k, sizeof k, TKEY, 12);
    char reply[64];
    ck_assert_int_eq(raw_cmd(g_srv.port, NULL, 0, reply, sizeof reply, "SET", k,
                             "garbage", (const char *)NULL),
                     0);
    ck_assert_int_eq(kvb_remote_del(g_r, TKEY, 12), KVB_OK);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "DBSIZE", NULL), 2);
    ck_assert_int_eq(kvb_remote_del(g_r, TKEY, 11), KVB_OK);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "DBSIZE", NULL), 0);
}
END_TEST

/* An entry with a part missing (evicted) or of the wrong length is a
 * miss, not an error, and the connection stays usable. */
START_TEST(test_remote_missing_part)
{
    NEED_SERVER();
    size_t n = 5 * MIB + 12345;
    unsigned char *blob = served_blob(n, 4);
    char k[96];

    put(g_r, TKEY, 20, blob, n);
    part_key(k, sizeof k, TKEY, 20, 3);
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "DEL", k), 1);
    expect_miss(g_r, TKEY, 20);

    put(g_r, TKEY, 21, blob, n);
    part_key(k, sizeof k, TKEY, 21, 5); /* the partial last part */
    ck_assert_int_eq(raw_int(g_srv.port, NULL, 0, "DEL", k), 1);
    expect_miss(g_r, TKEY, 21);

    put(g_r, TKEY, 22, blob, n);
    part_key(k, sizeof k, TKEY, 22, 2);
    char reply[64];
    ck_assert_int_eq(raw_cmd(g_srv.port, NULL, 0, reply, sizeof reply, "APPEND",
                             k, "x", (const char *)NULL),
                     0);
    ck_assert_str_eq(reply, ":1048577");
    expect_miss_warned(g_r, TKEY, 22, "part 2 of 6 has 1048577 bytes", NULL);

    /* the pooled connection is in step: the next get is right */
    put(g_r, TKEY, 23, blob, n);
    expect_hit(g_r, TKEY, 23, blob, n);
}
END_TEST

/* A corrupt meta (magic, a size under the checksum, the length) is a miss
 * logged as a warning naming the reason. */
START_TEST(test_remote_corrupt_meta)
{
    NEED_SERVER();
    size_t n = 2 * MIB + 5;
    unsigned char *blob = served_blob(n, 5);
    struct {
        const char *cmd;
        const char *arg1;
        const char *arg2;
        const char *why;
    } cases[] = {
        {"SETRANGE", "0", "XXXX", "magic"},
        {"SETRANGE", "24", "\x7f", "checksum"}, /* total_len */
        {"SETRANGE", "48", "XXXXXXXX", "checksum"}, /* the checksum */
        {"APPEND", "z", NULL, "length"},
        {"SET", "short", NULL, "length"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t hash = 30 + i;
        char k[96], reply[64];
        put(g_r, TKEY, hash, blob, n);
        meta_key(k, sizeof k, TKEY, hash);
        ck_assert_int_eq(raw_cmd(g_srv.port, NULL, 0, reply, sizeof reply,
                                 cases[i].cmd, k, cases[i].arg1,
                                 cases[i].arg2, (const char *)NULL),
                         0);
        ck_assert_msg(reply[0] != '-', "%s: %s", cases[i].cmd, reply);
        expect_miss_warned(g_r, TKEY, hash, "invalid meta", cases[i].why);
        char last[1024];
        warnings(last, sizeof last);
        ck_assert_msg(strstr(last, k) != NULL, "case %zu: warning '%s'", i, last);
    }
    /* a meta moved under another entry's name is not that entry's */
    char from[96], to[96], reply[64];
    put(g_r, TKEY, 40, blob, n);
    put(g_r, TKEY, 41, blob, 10);
    meta_key(from, sizeof from, TKEY, 40);
    meta_key(to, sizeof to, TKEY, 41);
    ck_assert_int_eq(raw_cmd(g_srv.port, NULL, 0, reply, sizeof reply, "RENAME",
                             from, to, (const char *)NULL),
                     0);
    ck_assert_str_eq(reply, "+OK");
    expect_miss_warned(g_r, TKEY, 41, "identity", NULL);
}
END_TEST

/* ------------------------------------------------------------- failures */

/* Nothing listens at open: open succeeds, calls fail with KVB_ERR_IO at
 * once (refused), then without any connection attempt until retry_ms have
 * passed; once a server is there, calls work. */
START_TEST(test_remote_server_down)
{
    NEED_REDIS();
    kvb_remote_options o = test_opts(MIB);
    /* timing bounds are loose (sanitizers, a loaded 2-core CI machine):
     * what tells a fast failure from a connection attempt is the message */
    o.retry_ms = 2000;
    int port = free_port();
    int64_t t0 = now_ms();
    kvb_remote *r = open_port(port, 0, &o);
    ck_assert_int_lt(now_ms() - t0, o.connect_timeout_ms + 1000);
    char w[1024];
    ck_assert_int_eq(warnings(w, sizeof w), 1); /* unreachable at open */
    ck_assert_msg(strstr(w, kvb_remote_name(r)) != NULL, "warning: %s", w);

    /* every call fails fast while retry_ms run */
    int found = -1;
    void *buf = (void *)&buf;
    size_t len = 1;
    unsigned char data[16] = {0};
    t0 = now_ms();
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(kvb_remote_contains(r, TKEY, 1, &found), KVB_ERR_IO);
        ck_assert_int_eq(found, 0);
        ck_assert_int_eq(kvb_remote_get(r, TKEY, 1, &buf, &len), KVB_ERR_IO);
        ck_assert_ptr_null(buf);
        ck_assert_int_eq(kvb_remote_put(r, TKEY, 1, data, sizeof data),
                         KVB_ERR_IO);
        ck_assert_int_eq(kvb_remote_del(r, TKEY, 1), KVB_ERR_IO);
    }
    ck_assert_int_lt(now_ms() - t0, 1000);
    const char *msg = kvb_last_error();
    ck_assert_msg(strstr(msg, kvb_remote_name(r)) != NULL &&
                      strstr(msg, "down since") != NULL &&
                      strstr(msg, "retrying after 2000 ms") != NULL &&
                      strstr(msg, "connect") != NULL,
                  "message: %s", msg);

    /* after retry_ms a new attempt is made: refused again, quickly */
    sleep_ms(o.retry_ms + 50);
    t0 = now_ms();
    ck_assert_int_eq(kvb_remote_contains(r, TKEY, 1, &found), KVB_ERR_IO);
    ck_assert_int_lt(now_ms() - t0, o.connect_timeout_ms + 1000);
    msg = kvb_last_error();
    ck_assert_msg(strstr(msg, "connect: ") != NULL &&
                      strstr(msg, "down since") == NULL,
                  "message: %s", msg);

    /* the server comes up: after retry_ms calls work */
    test_redis s;
    redis_start(&s, port, NULL);
    sleep_ms(o.retry_ms + 50);
    put(r, TKEY, 1, data, sizeof data);
    expect_hit(r, TKEY, 1, data, sizeof data);
    kvb_remote_close(r);
    redis_kill(&s);
}
END_TEST

/* The server is killed mid-use: the next call fails quickly, later ones
 * fail fast; restarted on the same port, calls work again after retry_ms
 * (the killed server's entries are gone: misses). */
START_TEST(test_remote_restart)
{
    NEED_REDIS();
    test_redis s;
    redis_start(&s, 0, NULL);
    kvb_remote_options o = test_opts(MIB);
    o.retry_ms = 2000; /* the fast failure below is told by its message */
    kvb_remote *r = open_port(s.port, 0, &o);
    size_t n = 3 * MIB;
    unsigned char *blob = pattern_blob(n, 6);
    put(r, TKEY, 50, blob, n);
    expect_hit(r, TKEY, 50, blob, n);

    redis_kill(&s);
    void *buf = NULL;
    size_t len = 0;
    int64_t t0 = now_ms();
    ck_assert_int_eq(kvb_remote_get(r, TKEY, 50, &buf, &len), KVB_ERR_IO);
    ck_assert_int_lt(now_ms() - t0, 5 * o.command_timeout_ms);
    ck_assert_ptr_null(buf);
    ck_assert_msg(strstr(kvb_last_error(), kvb_remote_name(r)) != NULL,
                  "message: %s", kvb_last_error());
    t0 = now_ms();
    ck_assert_int_eq(kvb_remote_put(r, TKEY, 51, blob, n), KVB_ERR_IO);
    ck_assert_int_lt(now_ms() - t0, 1000);
    ck_assert_ptr_nonnull(strstr(kvb_last_error(), "down since"));

    redis_start(&s, s.port, NULL);
    sleep_ms(o.retry_ms + 50);
    expect_miss(r, TKEY, 50); /* a new, empty server */
    put(r, TKEY, 51, blob, n);
    expect_hit(r, TKEY, 51, blob, n);
    ck_assert_int_eq(contains(r, TKEY, 51), 1);
    free(blob);
    kvb_remote_close(r);
    redis_kill(&s);
}
END_TEST

/* A server that accepts connections but never answers (a listening socket
 * nobody reads): a get and a large put fail with KVB_ERR_IO naming the
 * timeout within a few command timeouts; nothing hangs. */
START_TEST(test_remote_silent_server)
{
    if (!remote_built()) {
        return;
    }
    int port = 0;
    int fd = loopback_socket(64, &port);

    kvb_remote_options o = test_opts(MIB);
    kvb_remote *r = open_port(port, 0, &o);
    void *buf = NULL;
    size_t len = 0;
    int64_t t0 = now_ms();
    ck_assert_int_eq(kvb_remote_get(r, TKEY, 60, &buf, &len), KVB_ERR_IO);
    int64_t took = now_ms() - t0;
    ck_assert_int_lt(took, 5 * o.command_timeout_ms);
    ck_assert_int_ge(took, o.command_timeout_ms - 50);
    ck_assert_msg(strstr(kvb_last_error(), "timeout") != NULL,
                  "message: %s", kvb_last_error());
    ck_assert_ptr_null(buf);

    /* 16 MiB outgrows the socket buffers: the write stalls and fails.
     * The timeout bounds each write(2) (SO_SNDTIMEO): the first one
     * returns short after command_timeout_ms, a later one with nothing
     * sent fails, so a stalled put takes a few timeouts, never more.  The
     * bound leaves room for a ThreadSanitizer build on a loaded 2-core
     * machine (1.8 s measured there). */
    sleep_ms(o.retry_ms + 50);
    size_t n = 16 * MIB;
    unsigned char *blob = pattern_blob(n, 7);
    t0 = now_ms();
    ck_assert_int_eq(kvb_remote_put(r, TKEY, 60, blob, n), KVB_ERR_IO);
    took = now_ms() - t0;
    ck_assert_msg(took < 12 * o.command_timeout_ms, "put took %lld ms",
                  (long long)took);
    ck_assert_msg(strstr(kvb_last_error(), "timeout") != NULL,
                  "message: %s", kvb_last_error());

    /* with the database in the URL, SELECT at connect times out */
    kvb_remote *r1 = open_port(port, 1, &o);
    t0 = now_ms();
    int found = -1;
    ck_assert_int_eq(kvb_remote_contains(r1, TKEY, 60, &found), KVB_ERR_IO);
    ck_assert_int_lt(now_ms() - t0, 1000); /* open's attempt failed already */
    ck_assert_msg(strstr(kvb_last_error(), "SELECT") != NULL,
                  "message: %s", kvb_last_error());
    free(blob);
    kvb_remote_close(r1);
    kvb_remote_close(r);
    close(fd);
}
END_TEST

/* ----------------------------------------------------- auth, databases */

/* With --requirepass: the password (percent-escaped in the URL, with or
 * without the "default" user) works; a wrong one, or none, is KVB_ERR_IO
 * naming AUTH (or NOAUTH), without the password in the message. */
START_TEST(test_remote_auth)
{
    NEED_REDIS();
    const char *pass = "p@ss w/rd";
    test_redis s;
    redis_start(&s, 0, pass);
    kvb_remote_options o = test_opts(MIB);
    char url[256];
    unsigned char data[100];
    fill_pattern(data, sizeof data, 8);

    snprintf(url, sizeof url, "redis://:p%%40ss%%20w%%2Frd@127.0.0.1:%d",
             s.port);
    kvb_remote *r = open_url(url, &o);
    put(r, TKEY, 70, data, sizeof data);
    expect_hit(r, TKEY, 70, data, sizeof data);
    kvb_remote_close(r);

    snprintf(url, sizeof url, "valkey://default:p@ss w/rd@127.0.0.1:%d/0",
             s.port);
    r = open_url(url, &o);
    expect_hit(r, TKEY, 70, data, sizeof data);
    kvb_remote_close(r);
    ck_assert_int_eq(warnings(NULL, 0), 0);

    snprintf(url, sizeof url, "redis://:wrong-secret@127.0.0.1:%d", s.port);
    r = open_url(url, &o);
    char w[1024];
    ck_assert_int_eq(warnings(w, sizeof w), 1);
    ck_assert_msg(strstr(w, "AUTH") != NULL, "warning: %s", w);
    sleep_ms(o.retry_ms + 50);
    int found = -1;
    ck_assert_int_eq(kvb_remote_contains(r, TKEY, 70, &found), KVB_ERR_IO);
    const char *msg = kvb_last_error();
    ck_assert_msg(strstr(msg, "AUTH") != NULL &&
                      strstr(msg, kvb_remote_name(r)) != NULL &&
                      strstr(msg, "wrong-secret") == NULL,
                  "message: %s", msg);
    kvb_remote_close(r);

    r = open_port(s.port, 0, &o);
    sleep_ms(o.retry_ms + 50);
    ck_assert_int_eq(kvb_remote_contains(r, TKEY, 70, &found), KVB_ERR_IO);
    ck_assert_msg(strstr(kvb_last_error(), "NOAUTH") != NULL, "message: %s",
                  kvb_last_error());
    kvb_remote_close(r);
    redis_kill(&s);
}
END_TEST

/* An entry put through db 1 is in db 1 only. */
START_TEST(test_remote_db)
{
    NEED_REDIS();
    test_redis s;
    redis_start(&s, 0, NULL);
    kvb_remote_options o = test_opts(64 * 1024);
    kvb_remote *r1 = open_port(s.port, 1, &o);
    kvb_remote *r0 = open_port(s.port, 0, &o);
    char name[64];
    snprintf(name, sizeof name, "127.0.0.1:%d/1", s.port);
    ck_assert_str_eq(kvb_remote_name(r1), name);
    unsigned char data[200000];
    fill_pattern(data, sizeof data, 9);
    put(r1, TKEY, 80, data, sizeof data);
    ck_assert_int_eq(contains(r1, TKEY, 80), 1);
    ck_assert_int_eq(contains(r0, TKEY, 80), 0);
    expect_miss(r0, TKEY, 80);
    expect_hit(r1, TKEY, 80, data, sizeof data);
    ck_assert_int_eq(raw_int(s.port, NULL, 0, "DBSIZE", NULL), 0);
    ck_assert_int_eq(raw_int(s.port, NULL, 1, "DBSIZE", NULL), 5); /* 4+1 */
    ck_assert_int_eq(kvb_remote_del(r0, TKEY, 80), KVB_OK); /* not there */
    expect_hit(r1, TKEY, 80, data, sizeof data);
    kvb_remote_close(r0);
    kvb_remote_close(r1);
    redis_kill(&s);
}
END_TEST

/* ---------------------------------------------------------- concurrency */

#define CONC_THREADS 6 /* more than the pool's 4 connections */
#define CONC_ITERS 25

typedef struct conc_arg {
    kvb_remote *r;
    int t;
    int errors; /* failed calls or wrong bytes */
    char first_error[512];
} conc_arg;

/* Size and seed of entry (t, i) of the concurrency test. */
static size_t conc_size(int t, int i)
{
    return 1000 + (size_t)((t * 7919 + i * 104729) % 300000);
}

/* Records a failure of a concurrency thread (no Check calls off the main
 * thread). */
static void conc_error(conc_arg *a, const char *what)
{
    if (a->errors++ == 0) {
        snprintf(a->first_error, sizeof a->first_error, "thread %d: %s: %s",
                 a->t, what, kvb_last_error());
    }
}

/* One thread of the concurrency test: puts its entries, reads them back,
 * reads the previous thread's (a hit must hold that thread's bytes),
 * deletes every fifth. */
static void *conc_main(void *p)
{
    conc_arg *a = p;
    unsigned char *want = malloc(conc_size(0, 0) + 300000);
    if (want == NULL) {
        conc_error(a, "malloc");
        return NULL;
    }
    for (int i = 0; i < CONC_ITERS; i++) {
        uint64_t hash = (uint64_t)a->t * 1000 + (uint64_t)i;
        size_t n = conc_size(a->t, i);
        fill_pattern(want, n, hash);
        if (kvb_remote_put(a->r, TKEY, hash, want, n) != KVB_OK) {
            conc_error(a, "put");
            continue;
        }
        void *buf = NULL;
        size_t len = 0;
        if (kvb_remote_get(a->r, TKEY, hash, &buf, &len) != KVB_OK ||
            buf == NULL || len != n || memcmp(buf, want, n) != 0) {
            conc_error(a, "get of its own entry");
        }
        free(buf);
        int other = (a->t + 1) % CONC_THREADS;
        uint64_t oh = (uint64_t)other * 1000 + (uint64_t)i;
        buf = NULL;
        if (kvb_remote_get(a->r, TKEY, oh, &buf, &len) != KVB_OK) {
            conc_error(a, "get of another's entry");
        } else if (buf != NULL) {
            size_t on = conc_size(other, i);
            fill_pattern(want, on, oh);
            if (len != on || memcmp(buf, want, on) != 0) {
                conc_error(a, "another's entry has wrong bytes");
            }
        }
        free(buf);
        int found = 0;
        if (kvb_remote_contains(a->r, TKEY, hash, &found) != KVB_OK ||
            !found) {
            conc_error(a, "contains");
        }
        if (i % 5 == 4 && kvb_remote_del(a->r, TKEY, hash) != KVB_OK) {
            conc_error(a, "del");
        }
    }
    free(want);
    return NULL;
}

/* Six threads put, get, check and delete entries at once through one
 * remote of four connections: every call succeeds and every hit holds
 * the right bytes. */
START_TEST(test_remote_concurrent)
{
    NEED_REDIS();
    test_redis s;
    redis_start(&s, 0, NULL);
    kvb_remote_options o = test_opts(64 * 1024);
    o.command_timeout_ms = 5000; /* sanitizers slow the clients down */
    kvb_remote *r = open_port(s.port, 0, &o);
    pthread_t th[CONC_THREADS];
    conc_arg args[CONC_THREADS];
    for (int t = 0; t < CONC_THREADS; t++) {
        memset(&args[t], 0, sizeof args[t]);
        args[t].r = r;
        args[t].t = t;
        ck_assert_int_eq(pthread_create(&th[t], NULL, conc_main, &args[t]),
                         0);
    }
    for (int t = 0; t < CONC_THREADS; t++) {
        pthread_join(th[t], NULL);
    }
    for (int t = 0; t < CONC_THREADS; t++) {
        ck_assert_msg(args[t].errors == 0, "%d errors, first: %s",
                      args[t].errors, args[t].first_error);
    }
    /* the deleted ones are gone, the others are there */
    for (int t = 0; t < CONC_THREADS; t++) {
        for (int i = 0; i < CONC_ITERS; i++) {
            ck_assert_int_eq(contains(r, TKEY, (uint64_t)t * 1000 + i),
                             i % 5 != 4);
        }
    }
    kvb_remote_close(r);
    redis_kill(&s);
}
END_TEST

/* ------------------------------------------------------------ no hiredis */

/* A build without hiredis refuses the tier naming the URL (password
 * masked) and the package to install; the other calls say unsupported. */
START_TEST(test_remote_unsupported)
{
    kvb_remote_options o = test_opts(MIB);
    kvb_remote *r = (kvb_remote *)&o;
    kvb_status st = kvb_remote_open("redis://:hunter2@127.0.0.1:1", &o, &r);
    if (st != KVB_ERR_UNSUPPORTED) {
        /* built with hiredis: the other tests cover it */
        ck_assert_int_eq(st, KVB_OK);
        kvb_remote_close(r);
        return;
    }
    const char *msg = kvb_last_error();
    ck_assert_ptr_null(r);
    ck_assert_msg(strstr(msg, "LMCACHE_REMOTE_URL=redis://:***@127.0.0.1:1") !=
                          NULL &&
                      strstr(msg, "libhiredis-dev") != NULL &&
                      strstr(msg, "hunter2") == NULL,
                  "message: %s", msg);
    int found = 1;
    void *buf = &found;
    size_t len = 1;
    ck_assert_int_eq(kvb_remote_contains(NULL, 1, 2, &found),
                     KVB_ERR_UNSUPPORTED);
    ck_assert_int_eq(found, 0);
    ck_assert_int_eq(kvb_remote_get(NULL, 1, 2, &buf, &len),
                     KVB_ERR_UNSUPPORTED);
    ck_assert_ptr_null(buf);
    ck_assert_int_eq(kvb_remote_put(NULL, 1, 2, "x", 1), KVB_ERR_UNSUPPORTED);
    ck_assert_int_eq(kvb_remote_del(NULL, 1, 2), KVB_ERR_UNSUPPORTED);
    kvb_remote_close(NULL);
}
END_TEST

/* The remote tier suite. */
Suite *remote_suite(void)
{
    static const case_spec cases[] = {
        {"core", setup_log, teardown_log, 120},
        {"served", served_setup, served_teardown, 120},
    };
    const test_spec tests[] = {
        {0, test_remote_url_good, 0},
        {0, test_remote_url_bad, 0},
        {0, test_remote_server_down, 0},
        {0, test_remote_restart, 0},
        {0, test_remote_silent_server, 0},
        {0, test_remote_auth, 0},
        {0, test_remote_db, 0},
        {0, test_remote_concurrent, 0},
        {0, test_remote_unsupported, 0},
        {1, test_remote_roundtrip, 0},
        {1, test_remote_del, 0},
        {1, test_remote_missing_part, 0},
        {1, test_remote_corrupt_meta, 0},
    };
    return suite_build("remote", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
