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
#include <stddef.h>
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

/* One row of the settings table (at the end of the file). */
typedef struct cfg_setting cfg_setting;

/* How a setting is stored and checked.  CFG_LIST and CFG_TEXT settings
 * bring their own parser (and a checker for hand-filled structs). */
typedef enum cfg_type {
    CFG_BOOL,   /* int, 0 or 1 */
    CFG_INT,    /* int or int64_t within [min, max] */
    CFG_NUMBER, /* finite double within [min, max] */
    CFG_ENUM,   /* int-sized enum: base + index of a word */
    CFG_LIST,   /* its parser fills an array and its count */
    CFG_TEXT,   /* its parser fills a char array */
    CFG_CHECK   /* no field: the value is only checked */
} cfg_type;

typedef kvb_status (*cfg_parse_fn)(kvb_config *c, const cfg_setting *s,
                                   const char *value);
typedef kvb_status (*cfg_check_fn)(const kvb_config *c,
                                   const cfg_setting *s);

struct cfg_setting {
    const char *name;    /* the variable */
    const char *key;     /* the field; NULL for CFG_CHECK */
    cfg_type type;
    size_t offset;       /* of the field (CFG_LIST: of the array) */
    size_t size;         /* of the field (CFG_INT: 4 or 8) */
    size_t count_offset; /* CFG_LIST: of the int count */
    const char *def;     /* default, parsed like a value; NULL: zero */
    double min, max;     /* CFG_INT, CFG_NUMBER */
    const char *words;   /* CFG_ENUM: "a|b|c" in the order of the values */
    int base;            /* CFG_ENUM: value of the first word */
    const char *expect;  /* what a bad value is told to be */
    unsigned flags;      /* KVB_SETTING_COMPAT */
    cfg_parse_fn parse;  /* replaces the type's parser when set */
    cfg_check_fn check;  /* CFG_LIST, CFG_TEXT: checks a filled struct */
};

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

/* Parses one of the three lists, each value by the setting's rule:
 * LMCACHE_BLEND_CHECK_LAYERS integers >= 0, strictly increasing;
 * LMCACHE_BLEND_RECOMPUTE_RATIOS ratios in (0, 1];
 * LMCACHE_BLEND_THRESHOLDS numbers >= 0 that fit a float. */
static kvb_status cfg_parse_list(kvb_config *c, const cfg_setting *s,
                                 const char *value)
{
    const char *name = s->name;
    int layers = s->offset == offsetof(kvb_config, check_layers);
    int ratio = s->offset == offsetof(kvb_config, recompute_ratios);
    const char *what = layers ? "check layer" : ratio ? "ratio" : "threshold";
    cfg_item items[KVB_MAX_CHECK_LAYERS];
    int n = 0;
    kvb_status st = cfg_split_list(name, value, items, &n);
    if (st != KVB_OK) {
        return st;
    }
    char show[KVB_CFG_TOKEN_MAX];
    int32_t ints[KVB_MAX_CHECK_LAYERS];
    float floats[KVB_MAX_CHECK_LAYERS];
    for (int i = 0; i < n; i++) {
        int64_t iv = 0;
        double v = 0;
        cfg_item_str(&items[i], show, sizeof show);
        if (layers ? cfg_parse_int(items[i].s, items[i].len, &iv) != 0
                   : cfg_parse_double(items[i].s, items[i].len, &v) != 0) {
            return cfg_fail(name, value, "%s '%s' is not %s", what, show,
                            layers ? "an integer" : "a finite number");
        }
        if (layers && (iv < 0 || iv > INT32_MAX)) {
            return cfg_fail(name, value, "check layer %lld is out of range; "
                            "expected a layer index >= 0", (long long)iv);
        }
        if (layers && i > 0 && iv <= ints[i - 1]) {
            return cfg_fail(name, value, "check layer %lld does not follow "
                            "%d; layers must be strictly increasing",
                            (long long)iv, (int)ints[i - 1]);
        }
        if (ratio && (!(v > 0.0) || v > 1.0 || (float)v == 0.0f)) {
            return cfg_fail(name, value, "ratio %s is outside (0, 1]", show);
        }
        if (!layers && !ratio && (v < 0.0 || v > FLT_MAX)) {
            return cfg_fail(name, value, "threshold %s %s", show, v < 0.0
                            ? "is negative; expected >= 0"
                            : "does not fit a float");
        }
        ints[i] = (int32_t)iv;
        floats[i] = (float)v;
    }
    memcpy((char *)c + s->offset, layers ? (void *)ints : (void *)floats,
           (size_t)n * 4);
    memcpy((char *)c + s->count_offset, &n, sizeof n);
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
static kvb_status cfg_parse_extra(kvb_config *c, const cfg_setting *s,
                                  const char *value)
{
    const char *name = s->name;
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
/* Words, paths and URLs                                                      */
/* ------------------------------------------------------------------------ */

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

/* Word `i` of the '|'-separated `words`: a pointer into `words` with its
 * length in *len, or NULL when there is no such word (i < 0 included). */
static const char *cfg_word(const char *words, int64_t i, int *len)
{
    const char *w = words;
    for (; i > 0 && *w != '\0'; i--) {
        w += strcspn(w, "|");
        w += *w == '|';
    }
    *len = (int)strcspn(w, "|");
    return i == 0 && *w != '\0' ? w : NULL;
}

/* Index of `value` (case-insensitive, surrounding whitespace ignored) in
 * the '|'-separated `words`, or -1. */
static int cfg_word_index(const char *value, const char *words)
{
    char buf[32];
    if (cfg_lower_trim(value, buf, sizeof buf) != 0) {
        return -1;
    }
    int len = 0;
    const char *w;
    for (int i = 0; (w = cfg_word(words, i, &len)) != NULL; i++) {
        if ((size_t)len == strlen(buf) && !strncmp(w, buf, (size_t)len)) {
            return i;
        }
    }
    return -1;
}

/* "a, b or c" for the words "a|b|c". */
static const char *cfg_word_list(const char *words, char *buf, size_t cap)
{
    int n = 0, len = 0;
    while (cfg_word(words, n, &len) != NULL) {
        n++;
    }
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        const char *w = cfg_word(words, i, &len);
        size_t at = strlen(buf);
        snprintf(buf + at, cap - at, "%s%.*s", i == 0 ? "" : i == n - 1
                 ? " or " : ", ", len, w);
    }
    return buf;
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

/* ------------------------------------------------------------------------ */
/* The settings table                                                         */
/* ------------------------------------------------------------------------ */


/* Reads or writes an integer field of 4 or 8 bytes. */
static int64_t cfg_get_int(const kvb_config *c, const cfg_setting *s)
{
    const char *p = (const char *)c + s->offset;
    if (s->size == sizeof(int64_t)) {
        int64_t v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    int v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void cfg_put_int(kvb_config *c, const cfg_setting *s, int64_t v)
{
    char *p = (char *)c + s->offset;
    if (s->size == sizeof(int64_t)) {
        memcpy(p, &v, sizeof v);
    } else {
        int iv = (int)v;
        memcpy(p, &iv, sizeof iv);
    }
}

static double cfg_get_number(const kvb_config *c, const cfg_setting *s)
{
    double v;
    memcpy(&v, (const char *)c + s->offset, sizeof v);
    return v;
}

/* The generic parser of CFG_BOOL, CFG_INT, CFG_NUMBER and CFG_ENUM. */
static kvb_status cfg_parse_value(kvb_config *c, const cfg_setting *s,
                                  const char *value)
{
    int b = 0;
    int64_t iv = 0;
    double dv = 0;
    char words[128];
    switch (s->type) {
    case CFG_BOOL:
        if (cfg_parse_bool(value, &b) != 0) {
            return cfg_fail(s->name, value, "expected True, False, true, "
                            "false, 1 or 0");
        }
        cfg_put_int(c, s, b);
        return KVB_OK;
    case CFG_INT:
        if (cfg_parse_int(value, strlen(value), &iv) != 0) {
            return cfg_fail(s->name, value, "expected %s", s->expect);
        }
        if ((double)iv < s->min || (double)iv > s->max) {
            return cfg_fail(s->name, value, "%lld is out of range; expected "
                            "%s", (long long)iv, s->expect);
        }
        cfg_put_int(c, s, iv);
        return KVB_OK;
    case CFG_NUMBER:
        if (cfg_parse_double(value, strlen(value), &dv) != 0) {
            return cfg_fail(s->name, value, "expected %s", s->expect);
        }
        if (dv < s->min || dv > s->max) {
            return cfg_fail(s->name, value, "%g is out of range; expected %s",
                            dv, s->expect);
        }
        dv += 0.0; /* turns -0.0 into 0.0 */
        memcpy((char *)c + s->offset, &dv, sizeof dv);
        return KVB_OK;
    case CFG_ENUM:
        iv = cfg_word_index(value, s->words);
        if (iv < 0) {
            return cfg_fail(s->name, value, "expected %s",
                            cfg_word_list(s->words, words, sizeof words));
        }
        cfg_put_int(c, s, s->base + iv);
        return KVB_OK;
    default:
        return kvb_fail(KVB_ERR_INTERNAL, "%s: no parser", s->name);
    }
}

/* Checks a CFG_BOOL, CFG_INT, CFG_NUMBER or CFG_ENUM field of a struct a
 * caller may have filled by hand. */
static kvb_status cfg_check_value(const kvb_config *c, const cfg_setting *s)
{
    char words[128];
    if (s->type == CFG_NUMBER) {
        double v = cfg_get_number(c, s);
        if (!isfinite(v) || v < s->min || v > s->max) {
            return kvb_fail(KVB_ERR_INVALID, "%s: %s=%g; expected %s",
                            s->name, s->key, v, s->expect);
        }
        return KVB_OK;
    }
    int64_t v = cfg_get_int(c, s);
    if (s->type == CFG_BOOL && v != 0 && v != 1) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s=%lld; expected 0 or 1",
                        s->name, s->key, (long long)v);
    }
    if (s->type == CFG_INT && ((double)v < s->min || (double)v > s->max)) {
        return kvb_fail(KVB_ERR_INVALID, "%s: %s=%lld; expected %s", s->name,
                        s->key, (long long)v, s->expect);
    }
    int len = 0;
    if (s->type == CFG_ENUM) {
        if (cfg_word(s->words, v - s->base, &len) == NULL) {
            return kvb_fail(KVB_ERR_INVALID, "%s: %s=%lld; expected %s",
                            s->name, s->key, (long long)v,
                            cfg_word_list(s->words, words, sizeof words));
        }
    }
    return KVB_OK;
}

/* ---- parsers and checkers of single settings ---- */

/* Stores `text` (from `value`) in the setting's char array; `what` names
 * it in the message when it is too long. */
static kvb_status cfg_put_text(kvb_config *c, const cfg_setting *s,
                               const char *value, const char *text,
                               const char *what)
{
    char *dst = (char *)c + s->offset;
    size_t len = strlen(text);
    if (len >= s->size) {
        return cfg_fail(s->name, value, "the %s has %zu bytes; at most %zu "
                        "are allowed", what, len, s->size - 1);
    }
    memcpy(dst, text, len);
    dst[len] = '\0';
    return KVB_OK;
}


static kvb_status cfg_parse_special(kvb_config *c, const cfg_setting *s,
                                    const char *value)
{
    if (value[0] == '\0') {
        return cfg_fail(s->name, value, "the separator string is empty");
    }
    return cfg_put_text(c, s, value, value, "separator string");
}

static kvb_status cfg_check_special(const kvb_config *c,
                                    const cfg_setting *s)
{
    if (memchr(c->blend_special_str, '\0', KVB_MAX_SPECIAL_STR) == NULL ||
        c->blend_special_str[0] == '\0') {
        return kvb_fail(KVB_ERR_INVALID, "%s: the separator string is %s",
                        s->name, c->blend_special_str[0] == '\0'
                                     ? "empty" : "not NUL-terminated");
    }
    return KVB_OK;
}

static kvb_status cfg_check_check_layers(const kvb_config *c,
                                         const cfg_setting *s)
{
    int nl = c->num_check_layers;
    if (nl < 1 || nl > KVB_MAX_CHECK_LAYERS) {
        return kvb_fail(KVB_ERR_INVALID, "%s: num_check_layers=%d; expected "
                        "1..%d", s->name, nl, KVB_MAX_CHECK_LAYERS);
    }
    for (int i = 0; i < nl; i++) {
        if (c->check_layers[i] < 0 ||
            (i > 0 && c->check_layers[i] <= c->check_layers[i - 1])) {
            return kvb_fail(KVB_ERR_INVALID, "%s: check_layers[%d]=%d; "
                            "layers must be >= 0 and strictly increasing",
                            s->name, i, (int)c->check_layers[i]);
        }
    }
    return KVB_OK;
}

/* Ratios and thresholds: one value per check layer or one for all (none
 * also for thresholds), each within its range. */
static kvb_status cfg_check_floats(const kvb_config *c, const cfg_setting *s)
{
    int is_ratio = s->offset == offsetof(kvb_config, recompute_ratios);
    int n = is_ratio ? c->num_recompute_ratios : c->num_thresholds;
    const float *v = is_ratio ? c->recompute_ratios : c->thresholds;
    int nl = c->num_check_layers;
    if (n != 1 && n != nl && (is_ratio || n != 0)) {
        return kvb_fail(KVB_ERR_INVALID, "%s has %d values but "
                        "LMCACHE_BLEND_CHECK_LAYERS has %d layers; give one "
                        "%s per check layer or a single %s for all",
                        s->name, n, nl, is_ratio ? "ratio" : "threshold",
                        is_ratio ? "ratio" : "threshold");
    }
    for (int i = 0; i < n; i++) {
        if (is_ratio && (!(v[i] > 0.0f) || v[i] > 1.0f)) {
            return kvb_fail(KVB_ERR_INVALID, "%s: recompute_ratios[%d]=%g is "
                            "outside (0, 1]", s->name, i, (double)v[i]);
        }
        if (!is_ratio && (!(v[i] >= 0.0f) || !isfinite(v[i]))) {
            return kvb_fail(KVB_ERR_INVALID, "%s: thresholds[%d]=%g; expected "
                            "a finite value >= 0", s->name, i, (double)v[i]);
        }
    }
    return KVB_OK;
}

/* KVBLEND_VERIFY_CHECKSUMS: a boolean or "auto" (-1). */
static kvb_status cfg_parse_checksums(kvb_config *c, const cfg_setting *s,
                                      const char *value)
{
    int b = 0;
    if (cfg_word_index(value, "auto") == 0) {
        c->verify_checksums = -1;
        return KVB_OK;
    }
    if (cfg_parse_bool(value, &b) != 0) {
        return cfg_fail(s->name, value, "expected auto, True, False, true, "
                        "false, 1 or 0");
    }
    c->verify_checksums = b;
    return KVB_OK;
}

/* LMCACHE_LOCAL_DISK: "file://" + path (LMCache's form: "file:///abs/" is
 * /abs/, "file://rel/" the relative folder rel/) or a plain path; empty or
 * None turns the disk tier off. */
static kvb_status cfg_parse_disk(kvb_config *c, const cfg_setting *s,
                                 const char *value)
{
    const char *path = value;
    if (!strncmp(path, "file://", 7)) {
        path += 7;
    } else if (strstr(path, "://") != NULL) {
        return cfg_fail(s->name, value, "expected a folder as file:///path/ "
                        "or a plain path");
    }
    if (path[0] == '\0' && !cfg_is_none(value)) {
        return cfg_fail(s->name, value, "the folder is empty");
    }
    return cfg_put_text(c, s, value, cfg_is_none(value) ? "" : path, "path");
}

/* LMCACHE_REMOTE_URL: redis:// or valkey:// (the server is parsed and
 * reached when a connector opens the tier); empty or None turns the remote
 * tier off.  LMCache's other backends are named in the refusal. */
static kvb_status cfg_parse_remote(kvb_config *c, const cfg_setting *s,
                                   const char *value)
{
    if (!cfg_is_none(value) && strncmp(value, "redis://", 8) != 0 &&
        strncmp(value, "valkey://", 9) != 0) {
        return cfg_fail(s->name, value, "expected redis://host:port or "
                        "valkey://host:port (kvblend does not implement "
                        "LMCache's lm://, mooncakestore://, s3:// or other "
                        "remote backends)");
    }
    return cfg_put_text(c, s, value, cfg_is_none(value) ? "" : value, "URL");
}

/* The disk folder and the remote URL must be NUL-terminated; a disk folder
 * needs a size. */
static kvb_status cfg_check_path(const kvb_config *c, const cfg_setting *s)
{
    const char *v = (const char *)c + s->offset;
    if (memchr(v, '\0', KVB_MAX_PATH) == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "%s is not NUL-terminated", s->name);
    }
    if (v == c->local_disk && v[0] != '\0' &&
        !(c->max_local_disk_size_gb > 0)) {
        return kvb_fail(KVB_ERR_INVALID, "LMCACHE_LOCAL_DISK=%s is set but "
                        "LMCACHE_MAX_LOCAL_DISK_SIZE is 0; give the disk "
                        "tier a size in GB", v);
    }
    return KVB_OK;
}

/* LMCACHE_REMOTE_SERDE: only "naive" (or unset). */
static kvb_status cfg_parse_serde(kvb_config *c, const cfg_setting *s,
                                  const char *value)
{
    (void)c;
    if (cfg_is_none(value) || cfg_word_index(value, "naive") == 0) {
        return KVB_OK;
    }
    return cfg_fail(s->name, value, "expected naive: kvblend keeps entries in "
                    "its own checked format (cachegen is not supported)");
}

/* KVBLEND_MODEL_CACHE: the Python model loader's folder; any value. */
static kvb_status cfg_parse_any(kvb_config *c, const cfg_setting *s,
                                const char *value)
{
    (void)c;
    (void)s;
    (void)value;
    return KVB_OK;
}

_Static_assert(sizeof(kvb_deviation_kind) == sizeof(int) &&
                   sizeof(kvb_selection_kind) == sizeof(int) &&
                   sizeof(kvb_log_level) == sizeof(int),
               "enum settings are stored as int");
_Static_assert(KVB_DEVIATION_K == 0 && KVB_DEVIATION_KV == 2 &&
                   KVB_SELECT_DEVIATION == 0 &&
                   KVB_SELECT_QUERY_DEVIATION == 2 && KVB_LOG_DEBUG == 0 &&
                   KVB_LOG_ERROR == 3,
               "the words of an enum setting follow its values");

#define F(field) offsetof(kvb_config, field), sizeof(((kvb_config *)0)->field)
#define GB_MAX 1e15 /* a petabyte: a bound only against overflow */

/* Every variable kvblend reads, in the order kvb_config_from_env applies
 * them (check layers before the lists counted against them). */
static const cfg_setting kvb_settings[] = {
    {.name = "LMCACHE_ENABLE_BLENDING", .key = "enable_blending",
     .type = CFG_BOOL, F(enable_blending), .def = "False"},
    {.name = "LMCACHE_BLEND_SPECIAL_STR", .key = "blend_special_str",
     .type = CFG_TEXT, F(blend_special_str), .def = " # # ",
     .parse = cfg_parse_special, .check = cfg_check_special},
    {.name = "LMCACHE_USE_LAYERWISE", .key = "use_layerwise",
     .type = CFG_BOOL, F(use_layerwise), .def = "False",
     .flags = KVB_SETTING_COMPAT},
    {.name = "LMCACHE_BLEND_CHECK_LAYERS", .key = "check_layers",
     .type = CFG_LIST, F(check_layers),
     .count_offset = offsetof(kvb_config, num_check_layers), .def = "1",
     .parse = cfg_parse_list, .check = cfg_check_check_layers},
    {.name = "LMCACHE_BLEND_RECOMPUTE_RATIOS", .key = "recompute_ratios",
     .type = CFG_LIST, F(recompute_ratios),
     .count_offset = offsetof(kvb_config, num_recompute_ratios),
     .def = "0.15", .parse = cfg_parse_list, .check = cfg_check_floats},
    {.name = "LMCACHE_BLEND_THRESHOLDS", .key = "thresholds",
     .type = CFG_LIST, F(thresholds),
     .count_offset = offsetof(kvb_config, num_thresholds),
     .parse = cfg_parse_list, .check = cfg_check_floats,
     .flags = KVB_SETTING_COMPAT},
    {.name = "LMCACHE_CHUNK_SIZE", .key = "chunk_size", .type = CFG_INT,
     F(chunk_size), .def = "256", .min = 1, .max = 9.2e18,
     .expect = "an integer > 0", .flags = KVB_SETTING_COMPAT},
    {.name = "LMCACHE_LOCAL_CPU", .key = "local_cpu", .type = CFG_BOOL,
     F(local_cpu), .def = "True"},
    {.name = "LMCACHE_MAX_LOCAL_CPU_SIZE", .key = "max_local_cpu_size_gb",
     .type = CFG_NUMBER, F(max_local_cpu_size_gb), .def = "5", .min = 0,
     .max = GB_MAX, .expect = "a finite number of GB >= 0"},
    {.name = "LMCACHE_EXTRA_CONFIG", .key = "enable_sparse",
     .type = CFG_BOOL, F(enable_sparse), .parse = cfg_parse_extra,
     .flags = KVB_SETTING_COMPAT},
    {.name = "KVBLEND_MAX_DEVICE_SIZE", .key = "max_device_size_gb",
     .type = CFG_NUMBER, F(max_device_size_gb), .def = "0", .min = 0,
     .max = GB_MAX, .expect = "a finite number of GB >= 0"},
    {.name = "KVBLEND_DEVIATION", .key = "deviation", .type = CFG_ENUM,
     F(deviation), .def = "kv", .words = "k|v|kv"},
    {.name = "KVBLEND_SELECTION", .key = "selection", .type = CFG_ENUM,
     F(selection), .def = "query_deviation",
     .words = "deviation|query|query_deviation"},
    {.name = "KVBLEND_BOUNDARY_TOKENS", .key = "boundary_tokens",
     .type = CFG_INT, F(boundary_tokens), .def = "4", .min = 0,
     .max = KVB_MAX_BOUNDARY_TOKENS, .expect = "an integer from 0 to 4096"},
    {.name = "KVBLEND_SELF_TEST", .key = "self_test", .type = CFG_BOOL,
     F(self_test), .def = "True"},
    {.name = "KVBLEND_NUM_THREADS", .key = "num_threads", .type = CFG_INT,
     F(num_threads), .def = "0", .min = 0, .max = KVB_MAX_CPU_THREADS,
     .expect = "0 (all cores) to 256"},
    {.name = "KVBLEND_LOG_LEVEL", .key = "log_level", .type = CFG_ENUM,
     F(log_level), .def = "warning", .words = "debug|info|warning|error"},
    {.name = "KVBLEND_VERIFY_CHECKSUMS", .key = "verify_checksums",
     .type = CFG_ENUM, F(verify_checksums), .def = "auto",
     .words = "auto|false|true", .base = -1, .parse = cfg_parse_checksums},
    {.name = "KVBLEND_MODEL_CACHE", .type = CFG_CHECK,
     .parse = cfg_parse_any},
    {.name = "LMCACHE_LOCAL_DISK", .key = "local_disk", .type = CFG_TEXT,
     F(local_disk), .parse = cfg_parse_disk, .check = cfg_check_path},
    {.name = "LMCACHE_MAX_LOCAL_DISK_SIZE", .key = "max_local_disk_size_gb",
     .type = CFG_NUMBER, F(max_local_disk_size_gb), .def = "0", .min = 0,
     .max = GB_MAX, .expect = "a finite number of GB >= 0"},
    {.name = "LMCACHE_REMOTE_URL", .key = "remote_url", .type = CFG_TEXT,
     F(remote_url), .parse = cfg_parse_remote, .check = cfg_check_path},
    {.name = "LMCACHE_REMOTE_SERDE", .type = CFG_CHECK,
     .parse = cfg_parse_serde},
    {.name = "KVBLEND_REMOTE_TIMEOUT_MS", .key = "remote_timeout_ms",
     .type = CFG_INT, F(remote_timeout_ms), .def = "1000", .min = 1,
     .max = 600000,
     .expect = "an integer number of milliseconds from 1 to 600000"},
    {.name = "KVBLEND_REMOTE_PART_SIZE", .key = "remote_part_size_mb",
     .type = CFG_NUMBER, F(remote_part_size_mb), .def = "8", .min = 0.0625,
     .max = 512, .expect = "a number of MB from 0.0625 to 512"},
};
#undef F
#define KVB_NUM_SETTINGS ((int)(sizeof kvb_settings / sizeof kvb_settings[0]))

/* Returns 1 when `name` starts with `prefix`. */
static int cfg_has_prefix(const char *name, const char *prefix)
{
    return strncmp(name, prefix, strlen(prefix)) == 0;
}

/* The setting named `name` (`len` bytes), or NULL. */
static const cfg_setting *cfg_find(const char *name, size_t len)
{
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        if (strlen(kvb_settings[i].name) == len &&
            !strncmp(kvb_settings[i].name, name, len)) {
            return &kvb_settings[i];
        }
    }
    return NULL;
}

/* Parses `value` into `c` with the setting's parser. */
static kvb_status cfg_apply(kvb_config *c, const cfg_setting *s,
                            const char *value)
{
    return s->parse != NULL ? s->parse(c, s, value)
                            : cfg_parse_value(c, s, value);
}

/* Records the error for an unknown KVBLEND_ variable, listing the known
 * ones so a typo is easy to spot. */
static kvb_status cfg_fail_unknown(const char *name, const char *value)
{
    char known[512] = "";
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        if (cfg_has_prefix(kvb_settings[i].name, "KVBLEND_")) {
            size_t at = strlen(known);
            snprintf(known + at, sizeof known - at, "%s%s",
                     at > 0 ? ", " : "", kvb_settings[i].name);
        }
    }
    return cfg_fail(name, value, "unknown kvblend variable %s; known: %s",
                    name, known);
}

/* ------------------------------------------------------------------------ */
/* Public API                                                                 */
/* ------------------------------------------------------------------------ */

const char *kvb_config_name(int i)
{
    return i >= 0 && i < KVB_NUM_SETTINGS ? kvb_settings[i].name : NULL;
}

kvb_status kvb_config_init(kvb_config *cfg)
{
    if (cfg == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_init: cfg is NULL");
    }
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        const cfg_setting *s = &kvb_settings[i];
        if (s->def != NULL && cfg_apply(cfg, s, s->def) != KVB_OK) {
            return kvb_fail(KVB_ERR_INTERNAL, "kvb_config_init: the default "
                            "of %s does not parse", s->name);
        }
    }
    return KVB_OK;
}

kvb_status kvb_config_set(kvb_config *cfg, const char *name,
                          const char *value)
{
    if (cfg == NULL || name == NULL || value == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_set: %s is NULL",
                        cfg == NULL ? "cfg" : name == NULL ? "name" : "value");
    }
    const cfg_setting *s = cfg_find(name, strlen(name));
    if (s == NULL) {
        if (cfg_has_prefix(name, "LMCACHE_")) {
            return KVB_OK; /* an LMCache setting kvblend does not use */
        }
        if (cfg_has_prefix(name, "KVBLEND_")) {
            return cfg_fail_unknown(name, value);
        }
        return cfg_fail(name, value, "not a kvblend setting; expected a name "
                        "starting with LMCACHE_ or KVBLEND_");
    }
    kvb_config tmp = *cfg;
    kvb_status st = cfg_apply(&tmp, s, value);
    if (st == KVB_OK) {
        *cfg = tmp;
    }
    return st;
}

/* Checks every field (a caller may fill the struct by hand) and the
 * cross-field rules, in table order. */
kvb_status kvb_config_validate(const kvb_config *cfg)
{
    if (cfg == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_validate: cfg is NULL");
    }
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        const cfg_setting *s = &kvb_settings[i];
        kvb_status st = KVB_OK;
        if (s->check != NULL) {
            st = s->check(cfg, s);
        } else if (s->type != CFG_CHECK && s->type != CFG_LIST &&
                   s->type != CFG_TEXT) {
            st = cfg_check_value(cfg, s);
        }
        if (st != KVB_OK) {
            return st;
        }
    }
    return KVB_OK;
}

kvb_status kvb_config_get(const kvb_config *cfg, int i, kvb_setting *out)
{
    if (cfg == NULL || out == NULL) {
        return kvb_fail(KVB_ERR_INVALID, "kvb_config_get: %s is NULL",
                        cfg == NULL ? "cfg" : "out");
    }
    if (i < 0 || i >= KVB_NUM_SETTINGS) {
        return KVB_ERR_NOT_FOUND;
    }
    const cfg_setting *s = &kvb_settings[i];
    memset(out, 0, sizeof *out);
    out->name = s->name;
    out->key = s->key;
    out->flags = s->flags;
    const char *field = (const char *)cfg + s->offset;
    switch (s->type) {
    case CFG_BOOL:
    case CFG_INT:
        out->type = s->type == CFG_BOOL ? KVB_SETTING_BOOL : KVB_SETTING_INT;
        out->i = cfg_get_int(cfg, s);
        break;
    case CFG_NUMBER:
        out->type = KVB_SETTING_FLOAT;
        out->f = cfg_get_number(cfg, s);
        break;
    case CFG_ENUM: /* the word, in the table (it outlives the call) */
        out->type = KVB_SETTING_STR;
        out->s = cfg_word(s->words, cfg_get_int(cfg, s) - s->base, &out->n);
        out->n = out->s != NULL ? out->n : 0;
        break;
    case CFG_LIST:
        memcpy(&out->n, (const char *)cfg + s->count_offset, sizeof out->n);
        if (s->offset == offsetof(kvb_config, check_layers)) {
            out->type = KVB_SETTING_INT_LIST;
            out->ints = (const int32_t *)(const void *)field;
        } else {
            out->type = KVB_SETTING_FLOAT_LIST;
            out->floats = (const float *)(const void *)field;
        }
        break;
    case CFG_TEXT:
        out->type = KVB_SETTING_STR;
        out->s = field[0] != '\0' ? field : NULL;
        out->n = out->s != NULL
                     ? (int)((const char *)memchr(field, 0, s->size) - field)
                     : 0;
        break;
    case CFG_CHECK:
        out->type = KVB_SETTING_NO_FIELD;
        break;
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
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        const char *value = getenv(kvb_settings[i].name);
        if (value == NULL) {
            continue;
        }
        kvb_status st = cfg_apply(&tmp, &kvb_settings[i], value);
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
        if (cfg_find(entry, nlen) == NULL) {
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

/* Logs, once per call, each compatibility-only setting whose value differs
 * from its default: it is accepted and does nothing. */
KVB_HIDDEN void kvb_config_log_compat(const kvb_config *cfg)
{
    kvb_config def;
    kvb_config_init(&def);
    for (int i = 0; i < KVB_NUM_SETTINGS; i++) {
        const cfg_setting *s = &kvb_settings[i];
        if (!(s->flags & KVB_SETTING_COMPAT)) {
            continue;
        }
        size_t n = s->size;
        size_t at = s->offset;
        if (s->type == CFG_LIST) { /* compare the count and the values */
            int a, b;
            memcpy(&a, (const char *)cfg + s->count_offset, sizeof a);
            memcpy(&b, (const char *)&def + s->count_offset, sizeof b);
            if (a != b) {
                n = 0;
            }
        }
        if (n == 0 || memcmp((const char *)cfg + at, (const char *)&def + at,
                             n) != 0) {
            kvb_log(KVB_LOG_INFO, "%s is accepted for LMCache compatibility "
                    "and has no effect in kvblend", s->name);
        }
    }
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
