/*
 * config.c: the settings kvblend reads from the environment.
 *
 * LMCache users configure CacheBlend with LMCACHE_* variables; kvblend reads
 * the same names with the same defaults so it is a drop-in, plus a few
 * KVBLEND_* variables of its own.  Every parser here works on a copy of the
 * caller's kvb_config, so a bad value never leaves a half-updated struct, and
 * every error message names the variable and the value it rejected.
 *
 * Numbers are parsed with strtod/strtoll after checking that the text uses
 * only the characters of a plain decimal number, so "nan", "inf", hex floats
 * and trailing garbage ("1.5x") are all rejected.  strtod follows LC_NUMERIC;
 * CPython and vLLM leave it at "C", where the decimal point is '.'.
 *
 * LMCACHE_EXTRA_CONFIG holds a JSON object, parsed with cJSON (Debian's
 * libcjson-dev), of which "enable_sparse" is read.
 */
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "internal.h"

/* The process environment (POSIX); declared here because strict C11 headers
 * do not. */
extern char **environ;

/* How many bytes of a value an error message quotes before "...". */
#define KVB_CFG_SHOW_MAX 80

/* Longest number (after trimming) the scalar parsers accept, in bytes;
 * longer text is rejected before parsing. */
#define KVB_CFG_TOKEN_MAX 64

/* ------------------------------------------------------------------------ */
/* Messages                                                                   */
/* ------------------------------------------------------------------------ */

/* Records `NAME="value": reason` as the last error and returns
 * KVB_ERR_INVALID.  Values longer than KVB_CFG_SHOW_MAX bytes are cut and
 * marked with "..." (at a UTF-8 character boundary) so a huge JSON blob
 * cannot drown the reason. */
static kvb_status cfg_fail(const char *name, const char *value,
                           const char *fmt, ...) KVB_PRINTF(3, 4);

static kvb_status cfg_fail(const char *name, const char *value,
                           const char *fmt, ...)
{
    char reason[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    size_t len = strlen(value);
    int shown = len > KVB_CFG_SHOW_MAX ? KVB_CFG_SHOW_MAX : (int)len;
    while (shown > 0 && (size_t)shown < len &&
           ((unsigned char)value[shown] & 0xC0) == 0x80) {
        shown--; /* do not cut a UTF-8 sequence in half */
    }
    return kvb_fail(KVB_ERR_INVALID, "%s=\"%.*s%s\": %s", name, shown, value,
                    len > KVB_CFG_SHOW_MAX ? "..." : "", reason);
}

/* ------------------------------------------------------------------------ */
/* Scalars                                                                    */
/* ------------------------------------------------------------------------ */

/* Copies `s[0..len)` without surrounding whitespace into `buf` (capacity
 * `cap`).  Returns 0 on success, -1 when the trimmed text does not fit. */
static int cfg_trim_copy(const char *s, size_t len, char *buf, size_t cap)
{
    while (len > 0 && isspace((unsigned char)s[0])) {
        s++;
        len--;
    }
    while (len > 0 && isspace((unsigned char)s[len - 1])) {
        len--;
    }
    if (len + 1 > cap) {
        return -1;
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    return 0;
}

/* Parses a boolean: True/False/true/false/1/0 with surrounding whitespace.
 * Returns 0 and sets *out on success, -1 otherwise. */
static int cfg_parse_bool(const char *s, int *out)
{
    char buf[16];
    if (cfg_trim_copy(s, strlen(s), buf, sizeof buf) != 0) {
        return -1;
    }
    if (!strcmp(buf, "True") || !strcmp(buf, "true") || !strcmp(buf, "1")) {
        *out = 1;
        return 0;
    }
    if (!strcmp(buf, "False") || !strcmp(buf, "false") || !strcmp(buf, "0")) {
        *out = 0;
        return 0;
    }
    return -1;
}

/* Parses a whole decimal integer from `s[0..len)` (whitespace around it
 * allowed).  Returns 0 on success, -1 when the text is empty, has other
 * characters, or does not fit an int64. */
static int cfg_parse_int(const char *s, size_t len, int64_t *out)
{
    char buf[KVB_CFG_TOKEN_MAX];
    if (cfg_trim_copy(s, len, buf, sizeof buf) != 0 || buf[0] == '\0') {
        return -1;
    }
    for (const char *p = buf; *p; p++) {
        if (!isdigit((unsigned char)*p) && !(p == buf && (*p == '-' || *p == '+'))) {
            return -1;
        }
    }
    char *end = NULL;
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (errno != 0 || end == buf || *end != '\0') {
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* Parses a whole finite decimal number from `s[0..len)` (whitespace around
 * it allowed).  Only digits, sign, '.', 'e' and 'E' are accepted, which
 * keeps out "nan", "inf" and hex floats.  Returns 0 on success, -1 when the
 * text is empty, malformed, or overflows to infinity. */
static int cfg_parse_double(const char *s, size_t len, double *out)
{
    char buf[KVB_CFG_TOKEN_MAX];
    if (cfg_trim_copy(s, len, buf, sizeof buf) != 0 || buf[0] == '\0') {
        return -1;
    }
    if (strspn(buf, "0123456789+-.eE") != strlen(buf)) {
        return -1;
    }
    char *end = NULL;
    errno = 0;
    double v = strtod(buf, &end);
    if (end == buf || *end != '\0' || !isfinite(v)) {
        return -1;
    }
    if (errno == ERANGE && fabs(v) > 1.0) {
        return -1; /* overflow; underflow to a tiny value is kept */
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Lists                                                                      */
/* ------------------------------------------------------------------------ */

/* One comma-separated item: where it starts and how long it is. */
typedef struct cfg_item {
    const char *s;
    size_t len;
} cfg_item;

/* Splits a list value ("1,2,4", "[1, 2]", " 0.1 ") into items, dropping one
 * pair of surrounding brackets.  On failure records the error naming `name`
 * and `value` and returns KVB_ERR_INVALID: unbalanced brackets, an empty
 * list, an empty item, or more than KVB_MAX_CHECK_LAYERS items. */
static kvb_status cfg_split_list(const char *name, const char *value,
                                 cfg_item *items, int *n_items)
{
    const char *s = value;
    size_t len = strlen(value);
    while (len > 0 && isspace((unsigned char)s[0])) {
        s++;
        len--;
    }
    while (len > 0 && isspace((unsigned char)s[len - 1])) {
        len--;
    }
    int open = len > 0 && s[0] == '[';
    int close = len > 0 && s[len - 1] == ']';
    if (open != close || (open && len < 2)) {
        return cfg_fail(name, value, "unbalanced brackets; expected a "
                        "comma-separated list such as 1,2 or [1, 2]");
    }
    if (open) {
        s++;
        len -= 2;
    }
    size_t k = 0;
    while (k < len && isspace((unsigned char)s[k])) {
        k++;
    }
    if (k == len) {
        return cfg_fail(name, value, "the list is empty; expected at least "
                        "one value");
    }
    int n = 0;
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && s[i] != ',') {
            continue;
        }
        if (n == KVB_MAX_CHECK_LAYERS) {
            return cfg_fail(name, value, "more than %d values",
                            KVB_MAX_CHECK_LAYERS);
        }
        items[n].s = s + start;
        items[n].len = i - start;
        size_t j = 0;
        while (j < items[n].len && isspace((unsigned char)items[n].s[j])) {
            j++;
        }
        if (j == items[n].len) {
            return cfg_fail(name, value, "item %d is empty", n + 1);
        }
        n++;
        start = i + 1;
    }
    *n_items = n;
    return KVB_OK;
}

/* Formats an item for a message: its text without surrounding whitespace,
 * cut to fit `buf`. */
static const char *cfg_item_str(const cfg_item *it, char *buf, size_t cap)
{
    const char *s = it->s;
    size_t len = it->len;
    while (len > 0 && isspace((unsigned char)s[0])) {
        s++;
        len--;
    }
    while (len > 0 && isspace((unsigned char)s[len - 1])) {
        len--;
    }
    if (len >= cap) {
        len = cap - 1;
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    return buf;
}

/* Parses LMCACHE_BLEND_CHECK_LAYERS: integers >= 0, strictly increasing. */
static kvb_status cfg_set_check_layers(kvb_config *c, const char *name,
                                       const char *value)
{
    cfg_item items[KVB_MAX_CHECK_LAYERS];
    int n = 0;
    kvb_status st = cfg_split_list(name, value, items, &n);
    if (st != KVB_OK) {
        return st;
    }
    char show[KVB_CFG_TOKEN_MAX];
    for (int i = 0; i < n; i++) {
        int64_t v = 0;
        if (cfg_parse_int(items[i].s, items[i].len, &v) != 0) {
            return cfg_fail(name, value, "check layer '%s' is not an integer",
                            cfg_item_str(&items[i], show, sizeof show));
        }
        if (v < 0 || v > INT32_MAX) {
            return cfg_fail(name, value, "check layer %lld is out of range; "
                            "expected a layer index >= 0", (long long)v);
        }
        if (i > 0 && v <= c->check_layers[i - 1]) {
            return cfg_fail(name, value, "check layer %lld does not follow "
                            "%d; layers must be strictly increasing",
                            (long long)v, (int)c->check_layers[i - 1]);
        }
        c->check_layers[i] = (int32_t)v;
    }
    c->num_check_layers = n;
    return KVB_OK;
}

/* Parses a list of floats into `dst`/`*count`.  `is_ratio` selects the rule:
 * ratios lie in (0, 1], thresholds are >= 0 and must fit a float. */
static kvb_status cfg_set_floats(const char *name, const char *value,
                                 int is_ratio, float *dst, int *count)
{
    cfg_item items[KVB_MAX_CHECK_LAYERS];
    int n = 0;
    kvb_status st = cfg_split_list(name, value, items, &n);
    if (st != KVB_OK) {
        return st;
    }
    char show[KVB_CFG_TOKEN_MAX];
    const char *what = is_ratio ? "ratio" : "threshold";
    for (int i = 0; i < n; i++) {
        double v = 0;
        if (cfg_parse_double(items[i].s, items[i].len, &v) != 0) {
            return cfg_fail(name, value, "%s '%s' is not a finite number",
                            what, cfg_item_str(&items[i], show, sizeof show));
        }
        cfg_item_str(&items[i], show, sizeof show);
        if (is_ratio && (!(v > 0.0) || v > 1.0 || (float)v == 0.0f)) {
            return cfg_fail(name, value, "ratio %s is outside (0, 1]", show);
        }
        if (!is_ratio && v < 0.0) {
            return cfg_fail(name, value, "threshold %s is negative; expected "
                            ">= 0", show);
        }
        if (!is_ratio && v > FLT_MAX) {
            return cfg_fail(name, value, "threshold %s does not fit a float",
                            show);
        }
        dst[i] = (float)v;
    }
    *count = n;
    return KVB_OK;
}

/* ------------------------------------------------------------------------ */
/* JSON (LMCACHE_EXTRA_CONFIG), parsed by cJSON                               */
/* ------------------------------------------------------------------------ */

/* What a JSON value is, for messages. */
static const char *json_kind_str(const cJSON *v)
{
    if (cJSON_IsNull(v)) {
        return "null";
    }
    if (cJSON_IsBool(v)) {
        return "a boolean";
    }
    if (cJSON_IsNumber(v)) {
        return "a number";
    }
    if (cJSON_IsString(v)) {
        return "a string";
    }
    if (cJSON_IsArray(v)) {
        return "an array";
    }
    return cJSON_IsObject(v) ? "an object" : "a value";
}

/* Parses LMCACHE_EXTRA_CONFIG: the whole text must be one JSON object
 * (surrounded by whitespace at most).  Sets enable_sparse when the object
 * has that key with a boolean value; other keys are ignored.  Errors name
 * the byte where parsing stopped. */
static kvb_status cfg_set_extra(kvb_config *c, const char *name,
                                const char *value)
{
    size_t n = strlen(value);
    /* cJSON cuts strings at an escaped NUL: "enable_sparse\u0000x" would
     * read as enable_sparse.  No setting needs one: refused. */
    for (size_t i = 0; i + 1 < n; i++) {
        if (value[i] != '\\') {
            continue;
        }
        if (value[i + 1] == 'u' && i + 5 < n && value[i + 2] == '0' &&
            value[i + 3] == '0' && value[i + 4] == '0' &&
            value[i + 5] == '0') {
            return cfg_fail(name, value, "invalid JSON at byte %zu: \\u0000 "
                            "(an escaped NUL) is not supported", i);
        }
        i++; /* the escaped character */
    }
    const char *end = NULL;
    /* the end pointer, not cJSON_GetErrorPtr (a global): thread-safe */
    cJSON *root = cJSON_ParseWithLengthOpts(value, n, &end, 0);
    size_t at = end != NULL && end >= value ? (size_t)(end - value) : 0;
    if (root == NULL) {
        return cfg_fail(name, value, "invalid JSON at byte %zu", at);
    }
    while (at < n && isspace((unsigned char)value[at])) {
        at++;
    }
    kvb_status st = KVB_OK;
    if (at < n) {
        st = cfg_fail(name, value, "invalid JSON at byte %zu: unexpected "
                      "'%c' after the value", at, value[at]);
    } else if (!cJSON_IsObject(root)) {
        st = cfg_fail(name, value, "expected a JSON object, got %s",
                      json_kind_str(root));
    } else {
        /* the last of duplicate keys wins, as in Python's json */
        const cJSON *sparse = NULL;
        const cJSON *item = NULL;
        cJSON_ArrayForEach(item, root)
        {
            if (item->string != NULL && !strcmp(item->string, "enable_sparse")) {
                sparse = item;
            }
        }
        if (sparse != NULL && !cJSON_IsBool(sparse)) {
            st = cfg_fail(name, value, "\"enable_sparse\" must be true or "
                          "false, got %s", json_kind_str(sparse));
        } else if (sparse != NULL) {
            c->enable_sparse = cJSON_IsTrue(sparse) ? 1 : 0;
        }
    }
    cJSON_Delete(root);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Per-variable setters                                                       */
/* ------------------------------------------------------------------------ */

/* Parses a boolean variable into *dst, leaving it untouched on failure. */
static kvb_status cfg_set_bool(const char *name, const char *value, int *dst)
{
    if (cfg_parse_bool(value, dst) != 0) {
        return cfg_fail(name, value, "expected True, False, true, false, 1 "
                        "or 0");
    }
    return KVB_OK;
}

/* Parses a size in GB: a finite number >= 0. */
static kvb_status cfg_set_size(const char *name, const char *value,
                               double *dst)
{
    double v = 0;
    if (cfg_parse_double(value, strlen(value), &v) != 0) {
        return cfg_fail(name, value, "expected a finite number of GB >= 0");
    }
    if (v < 0) {
        return cfg_fail(name, value, "size is negative; expected a number "
                        "of GB >= 0");
    }
    *dst = v + 0.0; /* turns -0.0 into 0.0 */
    return KVB_OK;
}

/* Copies `value` after lower-casing and trimming into `buf`; returns 0, or
 * -1 when it does not fit. */
static int cfg_lower_trim(const char *value, char *buf, size_t cap)
{
    if (cfg_trim_copy(value, strlen(value), buf, cap) != 0) {
        return -1;
    }
    for (char *q = buf; *q; q++) {
        *q = (char)tolower((unsigned char)*q);
    }
    return 0;
}

/* Index of `value` (case-insensitive, surrounding whitespace ignored) in
 * words[0..n), or -1.  The words of an enum setting are listed in the
 * order of its enum values, so the index is the value. */
static int cfg_word_index(const char *value, const char *const *words, int n)
{
    char buf[16];
    if (cfg_lower_trim(value, buf, sizeof buf) != 0) {
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (!strcmp(buf, words[i])) {
            return i;
        }
    }
    return -1;
}

/* Returns 1 when `value` (trimmed) is empty or LMCache's "None". */
static int cfg_is_none(const char *value)
{
    char buf[8];
    if (cfg_trim_copy(value, strlen(value), buf, sizeof buf) != 0) {
        return 0;
    }
    return buf[0] == '\0' || !strcmp(buf, "None") || !strcmp(buf, "none");
}

/* Parses LMCACHE_LOCAL_DISK: "file://" + path (LMCache's form:
 * "file:///abs/" is /abs/, "file://rel/" the relative folder rel/) or a
 * plain path; empty or None turns the disk tier off. */
static kvb_status cfg_set_disk(kvb_config *c, const char *name,
                               const char *value)
{
    if (cfg_is_none(value)) {
        c->local_disk[0] = '\0';
        return KVB_OK;
    }
    const char *path = value;
    if (!strncmp(path, "file://", 7)) {
        path += 7;
    } else if (strstr(path, "://") != NULL) {
        return cfg_fail(name, value, "expected a folder as file:///path/ or "
                        "a plain path");
    }
    size_t len = strlen(path);
    if (len == 0) {
        return cfg_fail(name, value, "the folder is empty");
    }
    if (len >= KVB_MAX_PATH) {
        return cfg_fail(name, value, "the path has %zu bytes; at most %d are "
                        "allowed", len, KVB_MAX_PATH - 1);
    }
    memcpy(c->local_disk, path, len + 1);
    return KVB_OK;
}

/* Parses LMCACHE_REMOTE_URL: redis:// or valkey:// (the server is parsed
 * and reached when a connector opens the tier); empty or None turns the
 * remote tier off.  LMCache's other backends are named in the refusal. */
static kvb_status cfg_set_remote(kvb_config *c, const char *name,
                                 const char *value)
{
    if (cfg_is_none(value)) {
        c->remote_url[0] = '\0';
        return KVB_OK;
    }
    size_t len = strlen(value);
    if (strncmp(value, "redis://", 8) != 0 &&
        strncmp(value, "valkey://", 9) != 0) {
        return cfg_fail(name, value, "expected redis://host:port or "
                        "valkey://host:port (kvblend does not implement "
                        "LMCache's lm://, mooncakestore://, s3:// or other "
                        "remote backends)");
    }
    if (len >= KVB_MAX_PATH) {
        return cfg_fail(name, value, "the URL has %zu bytes; at most %d are "
                        "allowed", len, KVB_MAX_PATH - 1);
    }
    memcpy(c->remote_url, value, len + 1);
    return KVB_OK;
}

/* Every variable kvblend reads, in the order kvb_config_from_env applies
 * them. */
static const char *const kvb_config_names[] = {
    "LMCACHE_ENABLE_BLENDING",
    "LMCACHE_BLEND_SPECIAL_STR",
    "LMCACHE_USE_LAYERWISE",
    "LMCACHE_BLEND_CHECK_LAYERS",
    "LMCACHE_BLEND_RECOMPUTE_RATIOS",
    "LMCACHE_BLEND_THRESHOLDS",
    "LMCACHE_CHUNK_SIZE",
    "LMCACHE_LOCAL_CPU",
    "LMCACHE_MAX_LOCAL_CPU_SIZE",
    "LMCACHE_EXTRA_CONFIG",
    "KVBLEND_MAX_DEVICE_SIZE",
    "KVBLEND_DEVIATION",
    "KVBLEND_SELECTION",
    "KVBLEND_BOUNDARY_TOKENS",
    "KVBLEND_SELF_TEST",
    "KVBLEND_NUM_THREADS",
    "KVBLEND_LOG_LEVEL",
    "KVBLEND_VERIFY_CHECKSUMS",
    "KVBLEND_MODEL_CACHE",
    "LMCACHE_LOCAL_DISK",
    "LMCACHE_MAX_LOCAL_DISK_SIZE",
    "LMCACHE_REMOTE_URL",
    "LMCACHE_REMOTE_SERDE",
    "KVBLEND_REMOTE_TIMEOUT_MS",
    "KVBLEND_REMOTE_PART_SIZE",
};
#define KVB_CONFIG_NUM_NAMES \
    ((int)(sizeof kvb_config_names / sizeof kvb_config_names[0]))

/* Returns 1 when `name` starts with `prefix`. */
static int cfg_has_prefix(const char *name, const char *prefix)
{
    return strncmp(name, prefix, strlen(prefix)) == 0;
}

/* Parses one known variable into `c` (a scratch copy).  Returns KVB_OK,
 * KVB_ERR_INVALID with the message set, or KVB_ERR_NOT_FOUND (no message)
 * when `name` is not one kvblend reads. */
static kvb_status cfg_apply(kvb_config *c, const char *name,
                            const char *value)
{
    char buf[16];
    int64_t iv = 0;
    if (!strcmp(name, "LMCACHE_ENABLE_BLENDING")) {
        return cfg_set_bool(name, value, &c->enable_blending);
    }
    if (!strcmp(name, "LMCACHE_BLEND_SPECIAL_STR")) {
        size_t len = strlen(value);
        if (len == 0) {
            return cfg_fail(name, value, "the separator string is empty");
        }
        if (len >= KVB_MAX_SPECIAL_STR) {
            return cfg_fail(name, value, "the separator string has %zu "
                            "bytes; at most %d are allowed", len,
                            KVB_MAX_SPECIAL_STR - 1);
        }
        memcpy(c->blend_special_str, value, len + 1);
        return KVB_OK;
    }
    if (!strcmp(name, "LMCACHE_USE_LAYERWISE")) {
        return cfg_set_bool(name, value, &c->use_layerwise);
    }
    if (!strcmp(name, "LMCACHE_BLEND_CHECK_LAYERS")) {
        return cfg_set_check_layers(c, name, value);
    }
    if (!strcmp(name, "LMCACHE_BLEND_RECOMPUTE_RATIOS")) {
        return cfg_set_floats(name, value, 1, c->recompute_ratios,
                              &c->num_recompute_ratios);
    }
    if (!strcmp(name, "LMCACHE_BLEND_THRESHOLDS")) {
        return cfg_set_floats(name, value, 0, c->thresholds,
                              &c->num_thresholds);
    }
    if (!strcmp(name, "LMCACHE_CHUNK_SIZE")) {
        if (cfg_parse_int(value, strlen(value), &iv) != 0) {
            return cfg_fail(name, value, "expected an integer > 0");
        }
        if (iv <= 0) {
            return cfg_fail(name, value, "chunk size must be > 0");
        }
        c->chunk_size = iv;
        return KVB_OK;
    }
    if (!strcmp(name, "LMCACHE_LOCAL_CPU")) {
        return cfg_set_bool(name, value, &c->local_cpu);
    }
    if (!strcmp(name, "LMCACHE_MAX_LOCAL_CPU_SIZE")) {
        return cfg_set_size(name, value, &c->max_local_cpu_size_gb);
    }
    if (!strcmp(name, "LMCACHE_EXTRA_CONFIG")) {
        return cfg_set_extra(c, name, value);
    }
    if (!strcmp(name, "KVBLEND_MAX_DEVICE_SIZE")) {
        return cfg_set_size(name, value, &c->max_device_size_gb);
    }
    if (!strcmp(name, "KVBLEND_DEVIATION")) {
        static const char *const kinds[] = {"k", "v", "kv"}; /* enum order */
        int i = cfg_word_index(value, kinds, 3);
        if (i < 0) {
            return cfg_fail(name, value, "expected k, v or kv");
        }
        c->deviation = (kvb_deviation_kind)i;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_SELECTION")) {
        static const char *const kinds[] = {"deviation", "query",
                                            "query_deviation"}; /* enum order */
        int i = cfg_word_index(value, kinds, 3);
        if (i < 0) {
            return cfg_fail(name, value, "expected deviation, query or "
                            "query_deviation");
        }
        c->selection = (kvb_selection_kind)i;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_BOUNDARY_TOKENS")) {
        if (cfg_parse_int(value, strlen(value), &iv) != 0 || iv < 0 ||
            iv > KVB_MAX_BOUNDARY_TOKENS) {
            return cfg_fail(name, value, "expected an integer from 0 to %d",
                            KVB_MAX_BOUNDARY_TOKENS);
        }
        c->boundary_tokens = (int)iv;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_MODEL_CACHE")) {
        return KVB_OK; /* the Python model loader's folder; nothing here */
    }
    if (!strcmp(name, "LMCACHE_LOCAL_DISK")) {
        return cfg_set_disk(c, name, value);
    }
    if (!strcmp(name, "LMCACHE_MAX_LOCAL_DISK_SIZE")) {
        return cfg_set_size(name, value, &c->max_local_disk_size_gb);
    }
    if (!strcmp(name, "LMCACHE_REMOTE_URL")) {
        return cfg_set_remote(c, name, value);
    }
    if (!strcmp(name, "LMCACHE_REMOTE_SERDE")) {
        if (cfg_is_none(value) ||
            cfg_word_index(value, (const char *const[]){"naive"}, 1) == 0) {
            return KVB_OK;
        }
        return cfg_fail(name, value, "expected naive: kvblend keeps entries "
                        "in its own checked format (cachegen is not "
                        "supported)");
    }
    if (!strcmp(name, "KVBLEND_REMOTE_TIMEOUT_MS")) {
        if (cfg_parse_int(value, strlen(value), &iv) != 0 || iv < 1 ||
            iv > 600000) {
            return cfg_fail(name, value, "expected an integer number of "
                            "milliseconds from 1 to 600000");
        }
        c->remote_timeout_ms = (int)iv;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_REMOTE_PART_SIZE")) {
        double mb = 0;
        if (cfg_parse_double(value, strlen(value), &mb) != 0 ||
            !(mb >= 0.0625 && mb <= 512)) {
            return cfg_fail(name, value, "expected a number of MB from "
                            "0.0625 to 512");
        }
        c->remote_part_size_mb = mb;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_SELF_TEST")) {
        return cfg_set_bool(name, value, &c->self_test);
    }
    if (!strcmp(name, "KVBLEND_NUM_THREADS")) {
        if (cfg_parse_int(value, strlen(value), &iv) != 0) {
            return cfg_fail(name, value, "expected an integer >= 0 "
                            "(0 = all cores)");
        }
        if (iv < 0 || iv > KVB_MAX_CPU_THREADS) {
            return cfg_fail(name, value, "thread count %lld is out of range; "
                            "expected 0 (all cores) to %d", (long long)iv,
                            KVB_MAX_CPU_THREADS);
        }
        c->num_threads = (int)iv;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_LOG_LEVEL")) {
        static const char *const levels[] = {"debug", "info", "warning",
                                             "error"}; /* enum order */
        int i = cfg_word_index(value, levels, 4);
        if (i < 0) {
            return cfg_fail(name, value, "expected debug, info, warning or "
                            "error");
        }
        c->log_level = (kvb_log_level)i;
        return KVB_OK;
    }
    if (!strcmp(name, "KVBLEND_VERIFY_CHECKSUMS")) {
        if (cfg_lower_trim(value, buf, sizeof buf) == 0 &&
            !strcmp(buf, "auto")) {
            c->verify_checksums = -1;
            return KVB_OK;
        }
        if (cfg_parse_bool(value, &c->verify_checksums) != 0) {
            return cfg_fail(name, value, "expected auto, True, False, true, "
                            "false, 1 or 0");
        }
        return KVB_OK;
    }
    return KVB_ERR_NOT_FOUND;
}

/* Records the error for an unknown KVBLEND_ variable, listing the known
 * ones so a typo is easy to spot. */
static kvb_status cfg_fail_unknown(const char *name, const char *value)
{
    char known[512] = "";
    for (int i = 0; i < KVB_CONFIG_NUM_NAMES; i++) {
        if (cfg_has_prefix(kvb_config_names[i], "KVBLEND_")) {
            if (known[0] != '\0') {
                strncat(known, ", ", sizeof known - strlen(known) - 1);
            }
            strncat(known, kvb_config_names[i],
                    sizeof known - strlen(known) - 1);
        }
    }
    return cfg_fail(name, value, "unknown kvblend variable %s; known: %s",
                    name, known);
}

/* ------------------------------------------------------------------------ */
/* Public API                                                                 */
/* ------------------------------------------------------------------------ */

/* The i-th name of kvb_config_names, NULL out of range. */
const char *kvb_config_name(int i)
{
    return i >= 0 && i < KVB_CONFIG_NUM_NAMES ? kvb_config_names[i] : NULL;
}

/* Fills `cfg` with LMCache's defaults and kvblend's own.  Fails only for a
 * NULL cfg. */
kvb_status kvb_config_init(kvb_config *cfg)
{
    if (cfg == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_init: cfg is NULL");
    }
    memset(cfg, 0, sizeof *cfg);
    cfg->enable_blending = 0;
    snprintf(cfg->blend_special_str, sizeof cfg->blend_special_str, " # # ");
    cfg->use_layerwise = 0;
    cfg->num_check_layers = 1;
    cfg->check_layers[0] = 1;
    cfg->num_recompute_ratios = 1;
    cfg->recompute_ratios[0] = 0.15f;
    cfg->num_thresholds = 0;
    cfg->chunk_size = 256;
    cfg->local_cpu = 1;
    cfg->max_local_cpu_size_gb = 5.0;
    cfg->enable_sparse = 0;
    cfg->max_device_size_gb = 0.0;
    /* measured best on MuSiQue at every ratio (benchmarks/RESULTS.md) */
    cfg->deviation = KVB_DEVIATION_KV;
    cfg->selection = KVB_SELECT_QUERY_DEVIATION;
    cfg->boundary_tokens = 4;
    cfg->self_test = 1;
    cfg->num_threads = 0;
    cfg->log_level = KVB_LOG_WARNING;
    cfg->verify_checksums = -1;
    cfg->max_local_disk_size_gb = 0.0;
    cfg->remote_timeout_ms = 1000;
    cfg->remote_part_size_mb = 8.0;
    return KVB_OK;
}

/* Parses one variable into a copy of `cfg` and commits the copy only on
 * success.  Unknown LMCACHE_ names return KVB_OK untouched; unknown
 * KVBLEND_ names and names with neither prefix are KVB_ERR_INVALID. */
kvb_status kvb_config_set(kvb_config *cfg, const char *name,
                          const char *value)
{
    if (cfg == NULL || name == NULL || value == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_set: %s is NULL",
                        cfg == NULL ? "cfg" : name == NULL ? "name" : "value");
    }
    kvb_config tmp = *cfg;
    kvb_status st = cfg_apply(&tmp, name, value);
    if (st == KVB_ERR_NOT_FOUND) {
        if (cfg_has_prefix(name, "LMCACHE_")) {
            return KVB_OK; /* an LMCache setting kvblend does not use */
        }
        if (cfg_has_prefix(name, "KVBLEND_")) {
            return cfg_fail_unknown(name, value);
        }
        return cfg_fail(name, value, "not a kvblend setting; expected a name "
                        "starting with LMCACHE_ or KVBLEND_");
    }
    if (st == KVB_OK) {
        *cfg = tmp;
    }
    return st;
}

/* Checks the cross-field rules and the field ranges (a caller may fill the
 * struct by hand, so each field is checked, not only the counts). */
kvb_status kvb_config_validate(const kvb_config *cfg)
{
    if (cfg == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_validate: cfg is NULL");
    }
    int nl = cfg->num_check_layers;
    if (nl < 1 || nl > KVB_MAX_CHECK_LAYERS) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_CHECK_LAYERS: "
                        "num_check_layers=%d; expected 1..%d", nl,
                        KVB_MAX_CHECK_LAYERS);
    }
    for (int i = 0; i < nl; i++) {
        if (cfg->check_layers[i] < 0 ||
            (i > 0 && cfg->check_layers[i] <= cfg->check_layers[i - 1])) {
            return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_CHECK_LAYERS: "
                            "check_layers[%d]=%d; layers must be >= 0 and "
                            "strictly increasing", i, (int)cfg->check_layers[i]);
        }
    }
    int nr = cfg->num_recompute_ratios;
    if (nr != 1 && nr != nl) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_RECOMPUTE_RATIOS has "
                        "%d values but LMCACHE_BLEND_CHECK_LAYERS has %d "
                        "layers; give one ratio per check layer or a single "
                        "ratio for all", nr, nl);
    }
    for (int i = 0; i < nr; i++) {
        float r = cfg->recompute_ratios[i];
        if (!(r > 0.0f) || r > 1.0f) {
            return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_RECOMPUTE_RATIOS: "
                            "recompute_ratios[%d]=%g is outside (0, 1]", i,
                            (double)r);
        }
    }
    int nt = cfg->num_thresholds;
    if (nt != 0 && nt != 1 && nt != nl) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_THRESHOLDS has %d "
                        "values but LMCACHE_BLEND_CHECK_LAYERS has %d layers; "
                        "give one threshold per check layer or a single "
                        "threshold for all", nt, nl);
    }
    for (int i = 0; i < nt; i++) {
        float t = cfg->thresholds[i];
        if (!(t >= 0.0f) || !isfinite(t)) {
            return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_THRESHOLDS: "
                            "thresholds[%d]=%g; expected a finite value >= 0",
                            i, (double)t);
        }
    }
    if (cfg->chunk_size <= 0) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_CHUNK_SIZE: chunk_size=%lld; "
                        "expected > 0", (long long)cfg->chunk_size);
    }
    if (!(cfg->max_local_cpu_size_gb >= 0) ||
        !isfinite(cfg->max_local_cpu_size_gb)) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_MAX_LOCAL_CPU_SIZE: %g GB; "
                        "expected a finite size >= 0",
                        cfg->max_local_cpu_size_gb);
    }
    if (!(cfg->max_device_size_gb >= 0) || !isfinite(cfg->max_device_size_gb)) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_MAX_DEVICE_SIZE: %g GB; "
                        "expected a finite size >= 0", cfg->max_device_size_gb);
    }
    if (cfg->num_threads < 0 || cfg->num_threads > KVB_MAX_CPU_THREADS) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_NUM_THREADS: num_threads=%d; "
                        "expected 0 (all cores) to %d", cfg->num_threads,
                        KVB_MAX_CPU_THREADS);
    }
    if ((int)cfg->deviation < KVB_DEVIATION_K ||
        (int)cfg->deviation > KVB_DEVIATION_KV) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_DEVIATION: deviation=%d; "
                        "expected k, v or kv", (int)cfg->deviation);
    }
    if ((int)cfg->selection < KVB_SELECT_DEVIATION ||
        (int)cfg->selection > KVB_SELECT_QUERY_DEVIATION) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_SELECTION: selection=%d; "
                        "expected deviation, query or query_deviation",
                        (int)cfg->selection);
    }
    if (cfg->boundary_tokens < 0 ||
        cfg->boundary_tokens > KVB_MAX_BOUNDARY_TOKENS) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_BOUNDARY_TOKENS: "
                        "boundary_tokens=%d; expected 0 to %d",
                        cfg->boundary_tokens, KVB_MAX_BOUNDARY_TOKENS);
    }
    if (cfg->verify_checksums < -1 || cfg->verify_checksums > 1) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_VERIFY_CHECKSUMS: "
                        "verify_checksums=%d; expected -1 (auto), 0 or 1",
                        cfg->verify_checksums);
    }
    if ((int)cfg->log_level < KVB_LOG_DEBUG ||
        (int)cfg->log_level > KVB_LOG_ERROR) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_LOG_LEVEL: log_level=%d; "
                        "expected debug, info, warning or error",
                        (int)cfg->log_level);
    }
    if (memchr(cfg->local_disk, '\0', KVB_MAX_PATH) == NULL ||
        memchr(cfg->remote_url, '\0', KVB_MAX_PATH) == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_LOCAL_DISK or "
                        "LMCACHE_REMOTE_URL is not NUL-terminated");
    }
    if (!(cfg->max_local_disk_size_gb >= 0) ||
        !isfinite(cfg->max_local_disk_size_gb)) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_MAX_LOCAL_DISK_SIZE: %g GB; "
                        "expected a finite size >= 0",
                        cfg->max_local_disk_size_gb);
    }
    if (cfg->local_disk[0] != '\0' && !(cfg->max_local_disk_size_gb > 0)) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_LOCAL_DISK=%s is set but "
                        "LMCACHE_MAX_LOCAL_DISK_SIZE is 0; give the disk "
                        "tier a size in GB", cfg->local_disk);
    }
    if (cfg->remote_timeout_ms < 1 || cfg->remote_timeout_ms > 600000) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_REMOTE_TIMEOUT_MS: %d; "
                        "expected 1 to 600000", cfg->remote_timeout_ms);
    }
    if (!(cfg->remote_part_size_mb >= 0.0625 &&
          cfg->remote_part_size_mb <= 512)) {
        return kvb_fail(KVB_ERR_INVALID, "KVBLEND_REMOTE_PART_SIZE: %g MB; "
                        "expected 0.0625 to 512", cfg->remote_part_size_mb);
    }
    if (memchr(cfg->blend_special_str, '\0', KVB_MAX_SPECIAL_STR) == NULL ||
        cfg->blend_special_str[0] == '\0') {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_BLEND_SPECIAL_STR: the "
                        "separator string is %s",
                        cfg->blend_special_str[0] == '\0'
                            ? "empty" : "not NUL-terminated");
    }
    return KVB_OK;
}

/* Builds a config from the defaults and every recognised variable that is
 * set, then rejects KVBLEND_* variables kvblend does not know (typos), then
 * validates.  Unknown LMCACHE_* variables are not looked at.  On any error
 * `cfg` is left unchanged. */
kvb_status kvb_config_from_env(kvb_config *cfg)
{
    if (cfg == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_from_env: cfg is NULL");
    }
    kvb_config tmp;
    kvb_config_init(&tmp);
    for (int i = 0; i < KVB_CONFIG_NUM_NAMES; i++) {
        const char *value = getenv(kvb_config_names[i]);
        if (value == NULL) {
            continue;
        }
        kvb_status st = kvb_config_set(&tmp, kvb_config_names[i], value);
        if (st != KVB_OK) {
            return st;
        }
    }
    for (char **e = environ; e != NULL && *e != NULL; e++) {
        const char *entry = *e;
        if (!cfg_has_prefix(entry, "KVBLEND_")) {
            continue;
        }
        const char *eq = strchr(entry, '=');
        size_t nlen = eq != NULL ? (size_t)(eq - entry) : strlen(entry);
        int known = 0;
        for (int i = 0; i < KVB_CONFIG_NUM_NAMES; i++) {
            if (strlen(kvb_config_names[i]) == nlen &&
                strncmp(kvb_config_names[i], entry, nlen) == 0) {
                known = 1;
                break;
            }
        }
        if (!known) {
            char name[128];
            snprintf(name, sizeof name, "%.*s",
                     (int)(nlen < sizeof name ? nlen : sizeof name - 1), entry);
            return cfg_fail_unknown(name, eq != NULL ? eq + 1 : "");
        }
    }
    kvb_status st = kvb_config_validate(&tmp);
    if (st != KVB_OK) {
        return st;
    }
    *cfg = tmp;
    return KVB_OK;
}

/* Returns the ratio for check layer index `i`: ratios[i], or ratios[0] when
 * a single ratio is given.  Out-of-range input (NULL cfg, i outside
 * [0, num_check_layers), no ratio) is a caller bug; it returns 1.0, i.e.
 * "recompute every token", which is slow but never wrong, and logs it. */
float kvb_config_ratio_at(const kvb_config *cfg, int i)
{
    if (cfg == NULL || i < 0 || i >= cfg->num_check_layers ||
        cfg->num_recompute_ratios < 1) {
        kvb_log(KVB_LOG_WARNING, "kvb_config_ratio_at: check layer index %d "
                "is out of range; recomputing every token", i);
        return 1.0f;
    }
    if (cfg->num_recompute_ratios == 1) {
        return cfg->recompute_ratios[0];
    }
    if (i >= cfg->num_recompute_ratios) {
        kvb_log(KVB_LOG_WARNING, "kvb_config_ratio_at: no ratio for check "
                "layer index %d; recomputing every token", i);
        return 1.0f;
    }
    return cfg->recompute_ratios[i];
}
