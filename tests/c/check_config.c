/*
 * check_config.c: the LMCACHE_* / KVBLEND_* settings: defaults, every
 * accepted form, a table of rejected values with the message each must
 * give, the JSON reader behind LMCACHE_EXTRA_CONFIG, cross-field
 * validation, and reading the real environment.
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include "test_util.h"

#include <check.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

/* Sets one variable and asserts success. */
static void set_ok(kvb_config *c, const char *name, const char *value)
{
    kvb_status st = kvb_config_set(c, name, value);
    ck_assert_msg(st == KVB_OK, "%s=\"%s\" rejected: %s", name, value,
                  kvb_last_error());
}

/* The type of the kvb_config field a step reads. */
typedef enum field_kind {
    F_INT, /* int or an enum of int size */
    F_I64,
    F_FLOAT,
    F_DOUBLE,
    F_STR,
    F_NONE,     /* the step only sets */
    F_VALIDATE, /* kvb_config_validate must return `want` (and name want_s) */
} field_kind;

/* One step of a sequence run on one config: set name=value (skipped when
 * name is NULL), then the field at `off` (of `size` bytes) must hold `want`
 * (numbers) or `want_s` (strings). */
typedef struct set_step {
    const char *name, *value;
    size_t off, size;
    field_kind kind;
    double want;
    const char *want_s;
} set_step;

/* The offset, size and kind of field `f` of kvb_config. */
#define FIELD(f)                                                          \
    offsetof(kvb_config, f), sizeof(((kvb_config *)0)->f),                \
        _Generic(((kvb_config *)0)->f, int64_t: F_I64, float: F_FLOAT,    \
                 double: F_DOUBLE, char *: F_STR, default: F_INT)
/* A step that reads nothing; one that runs kvb_config_validate. */
#define NO_FIELD 0, 0, F_NONE
#define VALIDATE 0, 0, F_VALIDATE

/* Checks the field of step `st` (number i of the sequence `what`) in c. */
static void check_step(const kvb_config *c, const set_step *st,
                       const char *what, size_t i)
{
    const char *field = (const char *)c + st->off;
    int iv;
    int64_t lv;
    float fv;
    double dv;
    const char *nm = st->name != NULL ? st->name : "(no set)";
    const char *val = st->value != NULL ? st->value : "";
    switch (st->kind) {
    case F_INT:
        ck_assert_uint_eq(st->size, sizeof iv);
        memcpy(&iv, field, sizeof iv);
        ck_assert_msg(iv == (int)st->want, "%s step %zu (%s=\"%s\"): %d, expected %g",
                      what, i, nm, val, iv, st->want);
        break;
    case F_I64:
        memcpy(&lv, field, sizeof lv);
        ck_assert_msg(lv == (int64_t)st->want, "%s step %zu (%s=\"%s\"): %lld, expected %g",
                      what, i, nm, val, (long long)lv, st->want);
        break;
    case F_FLOAT:
        memcpy(&fv, field, sizeof fv);
        ck_assert_msg(fv == (float)st->want, "%s step %zu (%s=\"%s\"): %g, expected %g",
                      what, i, nm, val, (double)fv, st->want);
        break;
    case F_DOUBLE:
        memcpy(&dv, field, sizeof dv);
        ck_assert_msg(dv == st->want, "%s step %zu (%s=\"%s\"): %g, expected %g",
                      what, i, nm, val, dv, st->want);
        break;
    case F_STR:
        ck_assert_msg(strcmp(field, st->want_s) == 0,
                      "%s step %zu (%s=\"%s\"): \"%s\", expected \"%s\"", what, i,
                      nm, val, field, st->want_s);
        break;
    case F_VALIDATE:
        kvb_clear_error();
        ck_assert_msg(kvb_config_validate(c) == (kvb_status)st->want,
                      "%s step %zu: validate is not %s: %s", what, i,
                      kvb_status_str((kvb_status)st->want), kvb_last_error());
        if (st->want_s != NULL) {
            ck_assert_has(kvb_last_error(), st->want_s);
        }
        break;
    case F_NONE:
        break;
    }
}

/* Runs steps[0..n) in order on one config, which starts as the defaults
 * over garbage (so init must write every field it reads). */
static void run_steps(const set_step *steps, size_t n, const char *what)
{
    kvb_config c;
    memset(&c, 0x5a, sizeof c);
    ck_assert_int_eq(kvb_config_init(&c), KVB_OK);
    for (size_t i = 0; i < n; i++) {
        if (steps[i].name != NULL) {
            set_ok(&c, steps[i].name, steps[i].value);
        }
        check_step(&c, &steps[i], what, i);
    }
}

/* The defaults (no set at all). */
static const set_step kDefaults[] = {
    {NULL, NULL, FIELD(enable_blending), 0, NULL},
    {NULL, NULL, FIELD(blend_special_str), 0, " # # "},
    {NULL, NULL, FIELD(use_layerwise), 0, NULL},
    {NULL, NULL, FIELD(num_check_layers), 1, NULL},
    {NULL, NULL, FIELD(check_layers[0]), 1, NULL},
    {NULL, NULL, FIELD(num_recompute_ratios), 1, NULL},
    {NULL, NULL, FIELD(recompute_ratios[0]), 0.15, NULL},
    {NULL, NULL, FIELD(num_thresholds), 0, NULL},
    {NULL, NULL, FIELD(chunk_size), 256, NULL},
    {NULL, NULL, FIELD(local_cpu), 1, NULL},
    {NULL, NULL, FIELD(max_local_cpu_size_gb), 5.0, NULL},
    {NULL, NULL, FIELD(enable_sparse), 0, NULL},
    {NULL, NULL, FIELD(max_device_size_gb), 0.0, NULL},
    {NULL, NULL, FIELD(deviation), KVB_DEVIATION_KV, NULL},
    {NULL, NULL, FIELD(selection), KVB_SELECT_QUERY_DEVIATION, NULL},
    {NULL, NULL, FIELD(boundary_tokens), 4, NULL},
    {NULL, NULL, FIELD(self_test), 1, NULL},
    {NULL, NULL, FIELD(num_threads), 0, NULL},
    {NULL, NULL, FIELD(log_level), KVB_LOG_WARNING, NULL},
    {NULL, NULL, FIELD(verify_checksums), -1, NULL},
    {NULL, NULL, FIELD(local_disk), 0, ""},
    {NULL, NULL, FIELD(remote_url), 0, ""},
    {NULL, NULL, VALIDATE, KVB_OK, NULL},
};

/* Every accepted form of the check layers. */
static const set_step kCheckLayerForms[] = {
    {"LMCACHE_BLEND_CHECK_LAYERS", "3", FIELD(num_check_layers), 1, NULL},
    {NULL, NULL, FIELD(check_layers[0]), 3, NULL},
    {"LMCACHE_BLEND_CHECK_LAYERS", "1,2,4", FIELD(num_check_layers), 3, NULL},
    {NULL, NULL, FIELD(check_layers[0]), 1, NULL},
    {NULL, NULL, FIELD(check_layers[1]), 2, NULL},
    {NULL, NULL, FIELD(check_layers[2]), 4, NULL},
    {"LMCACHE_BLEND_CHECK_LAYERS", " [0, 5 ,17] ", FIELD(num_check_layers), 3, NULL},
    {NULL, NULL, FIELD(check_layers[0]), 0, NULL},
    {NULL, NULL, FIELD(check_layers[2]), 17, NULL},
    {"LMCACHE_BLEND_CHECK_LAYERS", "[1]", FIELD(num_check_layers), 1, NULL},
    {NULL, NULL, FIELD(check_layers[0]), 1, NULL},
    {"LMCACHE_BLEND_CHECK_LAYERS", "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
     FIELD(num_check_layers), KVB_MAX_CHECK_LAYERS, NULL},
    {NULL, NULL, FIELD(check_layers[15]), 15, NULL},
};

/* The float lists: ratios and thresholds. */
static const set_step kFloatLists[] = {
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "1", FIELD(num_recompute_ratios), 1, NULL},
    {NULL, NULL, FIELD(recompute_ratios[0]), 1.0, NULL},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "[0.5, 0.25,1e-1]", FIELD(num_recompute_ratios), 3,
     NULL},
    {NULL, NULL, FIELD(recompute_ratios[0]), 0.5, NULL},
    {NULL, NULL, FIELD(recompute_ratios[1]), 0.25, NULL},
    {NULL, NULL, FIELD(recompute_ratios[2]), 0.1, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", "0", FIELD(num_thresholds), 1, NULL},
    {NULL, NULL, FIELD(thresholds[0]), 0.0, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", " 0.5 , 2.0 ", FIELD(num_thresholds), 2, NULL},
    {NULL, NULL, FIELD(thresholds[1]), 2.0, NULL},
};

/* The numbers. */
static const set_step kNumbers[] = {
    {"LMCACHE_CHUNK_SIZE", " 512 ", FIELD(chunk_size), 512, NULL},
    {"LMCACHE_CHUNK_SIZE", "+8", FIELD(chunk_size), 8, NULL},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "2.5", FIELD(max_local_cpu_size_gb), 2.5, NULL},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "0", FIELD(max_local_cpu_size_gb), 0.0, NULL},
    {"KVBLEND_MAX_DEVICE_SIZE", "1e1", FIELD(max_device_size_gb), 10.0, NULL},
    {NULL, NULL, FIELD(num_threads), 0, NULL}, /* the default: all cores */
    {"KVBLEND_NUM_THREADS", "8", FIELD(num_threads), 8, NULL},
    {"KVBLEND_NUM_THREADS", "0", FIELD(num_threads), 0, NULL},
};

/* The enums and the other words. */
static const set_step kEnums[] = {
    {"KVBLEND_DEVIATION", "v", FIELD(deviation), KVB_DEVIATION_V, NULL},
    {"KVBLEND_DEVIATION", " KV ", FIELD(deviation), KVB_DEVIATION_KV, NULL},
    {"KVBLEND_DEVIATION", "k", FIELD(deviation), KVB_DEVIATION_K, NULL},
    {"KVBLEND_SELECTION", " Query ", FIELD(selection), KVB_SELECT_QUERY, NULL},
    {"KVBLEND_SELECTION", "query_deviation", FIELD(selection), KVB_SELECT_QUERY_DEVIATION,
     NULL},
    {"KVBLEND_SELECTION", "deviation", FIELD(selection), KVB_SELECT_DEVIATION, NULL},
    {"KVBLEND_BOUNDARY_TOKENS", "0", FIELD(boundary_tokens), 0, NULL},
    {"KVBLEND_BOUNDARY_TOKENS", "4096", FIELD(boundary_tokens), KVB_MAX_BOUNDARY_TOKENS,
     NULL},
    {NULL, NULL, FIELD(self_test), 1, NULL},
    {"KVBLEND_SELF_TEST", "0", FIELD(self_test), 0, NULL},
    {"KVBLEND_LOG_LEVEL", "debug", FIELD(log_level), KVB_LOG_DEBUG, NULL},
    {"KVBLEND_LOG_LEVEL", "INFO", FIELD(log_level), KVB_LOG_INFO, NULL},
    {"KVBLEND_LOG_LEVEL", "error", FIELD(log_level), KVB_LOG_ERROR, NULL},
    {"KVBLEND_LOG_LEVEL", "warning", FIELD(log_level), KVB_LOG_WARNING, NULL},
    {NULL, NULL, FIELD(verify_checksums), -1, NULL},
    {"KVBLEND_VERIFY_CHECKSUMS", "True", FIELD(verify_checksums), 1, NULL},
    {"KVBLEND_VERIFY_CHECKSUMS", "0", FIELD(verify_checksums), 0, NULL},
    {"KVBLEND_VERIFY_CHECKSUMS", " AUTO ", FIELD(verify_checksums), -1, NULL},
};

/* The JSON of LMCACHE_EXTRA_CONFIG: only enable_sparse is read. */
static const set_step kExtraConfigForms[] = {
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": true}", FIELD(enable_sparse), 1, NULL},
    /* absent key: unchanged */
    {"LMCACHE_EXTRA_CONFIG", "{}", FIELD(enable_sparse), 1, NULL},
    {"LMCACHE_EXTRA_CONFIG",
     " {\"other\": [1, -2.5e+3, {\"a\": null}, \"s\\n\\u00e9\"],\n"
     "  \"enable_sparse\": false, \"x\": {} } ",
     FIELD(enable_sparse), 0, NULL},
    /* keys are compared after unescaping */
    {"LMCACHE_EXTRA_CONFIG", "{\"\\u0065nable_sparse\": true}", FIELD(enable_sparse), 1, NULL},
    /* the last duplicate wins, as in Python's json */
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": true, \"enable_sparse\": false}",
     FIELD(enable_sparse), 0, NULL},
    /* a surrogate pair and every simple escape */
    {"LMCACHE_EXTRA_CONFIG", "{\"e\": \"\\uD83D\\uDE00 \\\" \\\\ \\/ \\b \\f \\r \\t\"}",
     NO_FIELD, 0, NULL},
    /* a longer key that merely starts like enable_sparse is ignored */
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse_extra_long_key_name_here\": 5}",
     FIELD(enable_sparse), 0, NULL},
    /* well-formed UTF-8 of every length passes */
    {"LMCACHE_EXTRA_CONFIG",
     "{\"s\": \"\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\", \"enable_sparse\": true}",
     FIELD(enable_sparse), 1, NULL},
};

/* The lower tiers' settings, and the validator's rule that a disk folder
 * needs a size. */
static const set_step kLowerTiers[] = {
    {NULL, NULL, FIELD(local_disk), 0, ""},
    {NULL, NULL, FIELD(remote_url), 0, ""},
    {"LMCACHE_LOCAL_DISK", "file:///var/kv/", FIELD(local_disk), 0, "/var/kv/"},
    /* LMCache's form */
    {"LMCACHE_LOCAL_DISK", "file://local_disk/", FIELD(local_disk), 0, "local_disk/"},
    {"LMCACHE_LOCAL_DISK", "/plain/path", FIELD(local_disk), 0, "/plain/path"},
    {NULL, NULL, VALIDATE, KVB_ERR_INVALID, "LMCACHE_MAX_LOCAL_DISK_SIZE is 0"},
    {"LMCACHE_MAX_LOCAL_DISK_SIZE", "20", VALIDATE, KVB_OK, NULL},
    {"LMCACHE_LOCAL_DISK", "None", FIELD(local_disk), 0, ""},
    {"LMCACHE_REMOTE_URL", "valkey://:pw@10.0.0.2:6380/3", FIELD(remote_url), 0,
     "valkey://:pw@10.0.0.2:6380/3"},
    {"LMCACHE_REMOTE_URL", "", FIELD(remote_url), 0, ""},
    {"LMCACHE_REMOTE_SERDE", "naive", NO_FIELD, 0, NULL},
    {"KVBLEND_REMOTE_TIMEOUT_MS", "250", FIELD(remote_timeout_ms), 250, NULL},
    {"KVBLEND_REMOTE_PART_SIZE", "0.5", FIELD(remote_part_size_mb), 0.5, NULL},
    {NULL, NULL, VALIDATE, KVB_OK, NULL},
};

/* One ratio serves every check layer, else one per layer. */
static const set_step kRatioCount[] = {
    {"LMCACHE_BLEND_CHECK_LAYERS", "1,2,3", VALIDATE, KVB_OK, NULL},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.3,0.2,0.1", VALIDATE, KVB_OK, NULL},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.3,0.2", VALIDATE, KVB_ERR_INVALID,
     "LMCACHE_BLEND_RECOMPUTE_RATIOS has 2 values but LMCACHE_BLEND_CHECK_LAYERS has 3 "
     "layers"},
};

/* One threshold serves every check layer, else one per layer. */
static const set_step kThresholdCount[] = {
    {"LMCACHE_BLEND_CHECK_LAYERS", "1,2,3", NO_FIELD, 0, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", "0.5", VALIDATE, KVB_OK, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", "0.5,1,2", VALIDATE, KVB_OK, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", "0.5,1", VALIDATE, KVB_ERR_INVALID,
     "LMCACHE_BLEND_THRESHOLDS has 2 values but LMCACHE_BLEND_CHECK_LAYERS has 3"},
};

/* The sequences of the set and validate cases, each a test of its own. */
#define SEQUENCE(steps) {#steps, steps, COUNT_OF(steps)}
static const struct {
    const char *what;
    const set_step *steps;
    size_t n;
} kSetSequences[] = {
    SEQUENCE(kDefaults),
    SEQUENCE(kCheckLayerForms),
    SEQUENCE(kFloatLists),
    SEQUENCE(kNumbers),
    SEQUENCE(kEnums),
    SEQUENCE(kExtraConfigForms),
    SEQUENCE(kLowerTiers),
}, kValidateSequences[] = {
    SEQUENCE(kRatioCount),
    SEQUENCE(kThresholdCount),
};

/* Each sequence of accepted values reads back as it should. */
START_TEST(test_config_set_accepted_values)
{
    run_steps(kSetSequences[_i].steps, kSetSequences[_i].n, kSetSequences[_i].what);
}
END_TEST

/* Cross-field validation: the list lengths must agree. */
START_TEST(test_config_validate_list_counts)
{
    run_steps(kValidateSequences[_i].steps, kValidateSequences[_i].n,
              kValidateSequences[_i].what);
}
END_TEST

START_TEST(test_config_set_bool_forms)
{
    static const char *const names[] = {"LMCACHE_ENABLE_BLENDING",
                                        "LMCACHE_USE_LAYERWISE",
                                        "LMCACHE_LOCAL_CPU"};
    static const struct {
        const char *text;
        int value;
    } forms[] = {{"True", 1}, {"true", 1}, {"1", 1}, {" True\n", 1},
                 {"False", 0}, {"false", 0}, {"0", 0}, {"\tfalse ", 0}};
    for (size_t n = 0; n < 3; n++) {
        for (size_t f = 0; f < sizeof forms / sizeof forms[0]; f++) {
            kvb_config c;
            kvb_config_init(&c);
            int *field = n == 0 ? &c.enable_blending
                         : n == 1 ? &c.use_layerwise : &c.local_cpu;
            *field = !forms[f].value;
            set_ok(&c, names[n], forms[f].text);
            ck_assert_int_eq(*field, forms[f].value);
        }
    }
}
END_TEST

START_TEST(test_config_set_special_str)
{
    kvb_config c;
    kvb_config_init(&c);
    set_ok(&c, "LMCACHE_BLEND_SPECIAL_STR", "<|sep|>");
    ck_assert_str_eq(c.blend_special_str, "<|sep|>");
    set_ok(&c, "LMCACHE_BLEND_SPECIAL_STR", "  # #  "); /* not trimmed */
    ck_assert_str_eq(c.blend_special_str, "  # #  ");
    char longest[KVB_MAX_SPECIAL_STR];
    memset(longest, 'x', sizeof longest - 1);
    longest[sizeof longest - 1] = '\0';
    set_ok(&c, "LMCACHE_BLEND_SPECIAL_STR", longest);
    ck_assert_str_eq(c.blend_special_str, longest);
    char too_long[KVB_MAX_SPECIAL_STR + 1];
    memset(too_long, 'y', sizeof too_long - 1);
    too_long[sizeof too_long - 1] = '\0';
    ck_assert_int_eq(kvb_config_set(&c, "LMCACHE_BLEND_SPECIAL_STR", too_long),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "256 bytes; at most 255");
    ck_assert_str_eq(c.blend_special_str, longest);
}
END_TEST

START_TEST(test_config_extra_config_nesting_limit)
{
    /* cJSON refuses nesting deeper than its limit (1000) instead of
     * recursing into it */
    static char deep[100001];
    kvb_config c;
    kvb_config_init(&c);
    deep[0] = '{';
    deep[1] = '"';
    deep[2] = 'a';
    deep[3] = '"';
    deep[4] = ':';
    memset(deep + 5, '[', sizeof deep - 6);
    ck_assert_int_eq(kvb_config_set(&c, "LMCACHE_EXTRA_CONFIG", deep),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "invalid JSON at byte");
}
END_TEST

/* A rejected value and a fragment of the reason the message must give. */
typedef struct bad_value {
    const char *name;
    const char *value;
    const char *reason;
} bad_value;

static const bad_value kBadValues[] = {
    /* ratios */
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "abc", "ratio 'abc' is not a finite number"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "", "the list is empty"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "[]", "the list is empty"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0", "ratio 0 is outside (0, 1]"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "1.5", "ratio 1.5 is outside (0, 1]"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "-0.1", "ratio -0.1 is outside (0, 1]"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.15,1.5", "ratio 1.5 is outside (0, 1]"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "1e-60", "ratio 1e-60 is outside (0, 1]"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "nan", "not a finite number"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "inf", "not a finite number"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0x0.1p0", "not a finite number"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "1.5x", "ratio '1.5x' is not a finite number"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.1,,0.2", "item 2 is empty"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.1,", "item 2 is empty"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "[0.1", "unbalanced brackets"},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.1]", "unbalanced brackets"},
    /* check layers */
    {"LMCACHE_BLEND_CHECK_LAYERS", "2,1", "check layer 1 does not follow 2"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "1,1", "check layer 1 does not follow 1"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "-1", "check layer -1 is out of range"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "1.5", "check layer '1.5' is not an integer"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "x", "check layer 'x' is not an integer"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "", "the list is empty"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "3000000000", "out of range"},
    {"LMCACHE_BLEND_CHECK_LAYERS", "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16", "more than 16 values"},
    /* thresholds */
    {"LMCACHE_BLEND_THRESHOLDS", "-1", "threshold -1 is negative"},
    {"LMCACHE_BLEND_THRESHOLDS", "abc", "threshold 'abc' is not a finite number"},
    {"LMCACHE_BLEND_THRESHOLDS", "1e39", "does not fit a float"},
    /* chunk size */
    {"LMCACHE_CHUNK_SIZE", "0", "0 is out of range; expected an integer > 0"},
    {"LMCACHE_CHUNK_SIZE", "-5", "-5 is out of range"},
    {"LMCACHE_CHUNK_SIZE", "abc", "expected an integer > 0"},
    {"LMCACHE_CHUNK_SIZE", "", "expected an integer > 0"},
    {"LMCACHE_CHUNK_SIZE", "256.0", "expected an integer > 0"},
    {"LMCACHE_CHUNK_SIZE", "99999999999999999999", "expected an integer > 0"},
    /* sizes */
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "-1", "-1 is out of range; expected a finite number of GB >= 0"},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "abc", "expected a finite number of GB"},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "inf", "expected a finite number of GB"},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "nan", "expected a finite number of GB"},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "1e400", "expected a finite number of GB"},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "", "expected a finite number of GB"},
    {"KVBLEND_MAX_DEVICE_SIZE", "1.5x", "expected a finite number of GB"},
    {"KVBLEND_MAX_DEVICE_SIZE", "-0.5", "-0.5 is out of range"},
    /* booleans */
    {"LMCACHE_ENABLE_BLENDING", "yes", "expected True, False, true, false, 1 or 0"},
    {"LMCACHE_ENABLE_BLENDING", "", "expected True, False"},
    {"LMCACHE_ENABLE_BLENDING", "TRUE", "expected True, False"},
    {"LMCACHE_USE_LAYERWISE", "2", "expected True, False"},
    {"LMCACHE_LOCAL_CPU", "no", "expected True, False"},
    /* strings and enums */
    {"LMCACHE_BLEND_SPECIAL_STR", "", "the separator string is empty"},
    {"KVBLEND_DEVIATION", "q", "expected k, v or kv"},
    {"KVBLEND_DEVIATION", "", "expected k, v or kv"},
    {"KVBLEND_SELECTION", "query_deviations", "expected deviation, query or query_deviation"},
    {"KVBLEND_SELECTION", "k", "expected deviation, query or query_deviation"},
    {"KVBLEND_BOUNDARY_TOKENS", "-1", "expected an integer from 0 to 4096"},
    {"KVBLEND_BOUNDARY_TOKENS", "4097", "expected an integer from 0 to 4096"},
    {"KVBLEND_SELF_TEST", "maybe", "expected True, False"},
    {"KVBLEND_NUM_THREADS", "-1", "-1 is out of range"},
    {"KVBLEND_NUM_THREADS", "257", "257 is out of range; expected 0 (all cores) to 256"},
    {"KVBLEND_NUM_THREADS", "2147483648", "2147483648 is out of range"},
    {"KVBLEND_NUM_THREADS", "x", "expected 0 (all cores) to 256"},
    {"KVBLEND_LOG_LEVEL", "loud", "expected debug, info, warning or error"},
    {"KVBLEND_VERIFY_CHECKSUMS", "sometimes", "expected auto, True, False"},
    /* lower tiers */
    {"LMCACHE_LOCAL_DISK", "s3://bucket/kv", "expected a folder as file:///path/"},
    {"LMCACHE_LOCAL_DISK", "file://", "the folder is empty"},
    {"LMCACHE_MAX_LOCAL_DISK_SIZE", "-2", "-2 is out of range"},
    {"LMCACHE_REMOTE_URL", "lm://localhost:65432", "expected redis://host:port or valkey://host:port (kvblend does not implement LMCache's lm://"},
    {"LMCACHE_REMOTE_URL", "mooncakestore://x", "expected redis://"},
    {"LMCACHE_REMOTE_SERDE", "cachegen", "expected naive"},
    {"KVBLEND_REMOTE_TIMEOUT_MS", "0", "from 1 to 600000"},
    {"KVBLEND_REMOTE_TIMEOUT_MS", "600001", "from 1 to 600000"},
    {"KVBLEND_REMOTE_PART_SIZE", "0.01", "from 0.0625 to 512"},
    {"KVBLEND_REMOTE_PART_SIZE", "x", "from 0.0625 to 512"},
    /* names */
    {"KVBLEND_FOO", "1", "unknown kvblend variable KVBLEND_FOO; known: KVBLEND_MAX_DEVICE_SIZE, KVBLEND_DEVIATION"},
    {"VLLM_BLEND", "1", "not a kvblend setting"},
    /* LMCACHE_EXTRA_CONFIG (parsed by cJSON: the message names the byte
     * where parsing stopped) */
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": tru}", "invalid JSON at byte 18"},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": 1}", "\"enable_sparse\" must be true or false, got a number"},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": \"true\"}", "got a string"},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": null}", "got null"},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": [true]}", "got an array"},
    {"LMCACHE_EXTRA_CONFIG", "[1]", "expected a JSON object, got an array"},
    {"LMCACHE_EXTRA_CONFIG", "null", "expected a JSON object, got null"},
    {"LMCACHE_EXTRA_CONFIG", "{", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "", "invalid JSON at byte 0"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": 1} x", "at byte 9: unexpected 'x' after the value"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": 1}}", "at byte 8: unexpected '}' after the value"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": 1,}", "invalid JSON at byte 8"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\" 1}", "invalid JSON at byte 5"},
    {"LMCACHE_EXTRA_CONFIG", "{a: 1}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{'enable_sparse': true}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": [1 2]}", "invalid JSON at byte 9"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": 1 \"b\": 2}", "invalid JSON at byte 8"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": +1}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": \"x}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": \"\\q\"}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": \"\\uD800\"}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"a\": \"\\uDC00\"}", "invalid JSON at byte"},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\\u0000x\": true}", "invalid JSON at byte 15: \\u0000 (an escaped NUL) is not supported"},
};

START_TEST(test_config_set_rejects_bad_values)
{
    const bad_value *b = &kBadValues[_i];
    kvb_config c;
    kvb_config before;
    kvb_config_init(&c);
    /* non-default contents, so "unchanged" is not just "still default" */
    set_ok(&c, "LMCACHE_BLEND_CHECK_LAYERS", "2,5");
    set_ok(&c, "LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.3,0.2");
    set_ok(&c, "LMCACHE_BLEND_THRESHOLDS", "4");
    set_ok(&c, "LMCACHE_CHUNK_SIZE", "64");
    set_ok(&c, "LMCACHE_ENABLE_BLENDING", "true");
    set_ok(&c, "LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": true}");
    memcpy(&before, &c, sizeof c);
    kvb_clear_error();
    ck_assert_int_eq(kvb_config_set(&c, b->name, b->value), KVB_ERR_INVALID);
    const char *msg = kvb_last_error();
    char quoted[512];
    snprintf(quoted, sizeof quoted, "%s=\"%s\"", b->name, b->value);
    ck_assert_has(msg, quoted);
    ck_assert_has(msg, b->reason);
    ck_assert_msg(memcmp(&before, &c, sizeof c) == 0,
                  "%s=\"%s\" changed the config", b->name, b->value);
}
END_TEST

START_TEST(test_config_set_unknown_lmcache_name_ignored)
{
    kvb_config c;
    kvb_config before;
    kvb_config_init(&c);
    memcpy(&before, &c, sizeof c);
    ck_assert_int_eq(kvb_config_set(&c, "LMCACHE_SAVE_DECODE_CACHE", "x"),
                     KVB_OK);
    ck_assert_int_eq(memcmp(&before, &c, sizeof c), 0);
}
END_TEST

START_TEST(test_config_set_null_arguments)
{
    kvb_config c;
    kvb_config_init(&c);
    ck_assert_int_eq(kvb_config_set(NULL, "LMCACHE_CHUNK_SIZE", "1"),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "cfg is NULL");
    ck_assert_int_eq(kvb_config_set(&c, NULL, "1"), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "name is NULL");
    ck_assert_int_eq(kvb_config_set(&c, "LMCACHE_CHUNK_SIZE", NULL),
                     KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "value is NULL");
    ck_assert_int_eq(kvb_config_init(NULL), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_config_validate(NULL), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_config_from_env(NULL), KVB_ERR_INVALID);
}
END_TEST

START_TEST(test_config_long_value_is_truncated_in_message)
{
    char value[400];
    memset(value, ' ', sizeof value);
    value[0] = '{';
    memcpy(value + 1, "\"k\": ", 5);
    value[sizeof value - 2] = '!';
    value[sizeof value - 1] = '\0';
    kvb_config c;
    kvb_config_init(&c);
    ck_assert_int_eq(kvb_config_set(&c, "LMCACHE_EXTRA_CONFIG", value),
                     KVB_ERR_INVALID);
    const char *msg = kvb_last_error();
    ck_assert_has(msg, "LMCACHE_EXTRA_CONFIG=\"{\"k\": ");
    ck_assert_has(msg, "...\": invalid JSON at byte 398");
    ck_assert_ptr_null(strstr(msg, value));
    ck_assert_uint_lt(strlen(msg), 250);
}
END_TEST

START_TEST(test_config_validate_hand_filled_fields)
{
    kvb_config c;
    kvb_config_init(&c);
    c.chunk_size = 0;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "LMCACHE_CHUNK_SIZE: chunk_size=0");
    kvb_config_init(&c);
    c.recompute_ratios[0] = 0.0f;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "recompute_ratios[0]=0 is outside (0, 1]");
    kvb_config_init(&c);
    c.num_check_layers = 0;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "num_check_layers=0");
    kvb_config_init(&c);
    c.num_check_layers = 2;
    c.check_layers[1] = 1; /* equal to check_layers[0] */
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "check_layers[1]=1");
    kvb_config_init(&c);
    c.max_device_size_gb = NAN;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "KVBLEND_MAX_DEVICE_SIZE");
    kvb_config_init(&c);
    c.blend_special_str[0] = '\0';
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "separator string is empty");
    /* enum fields outside their words, above and below (base -1) */
    kvb_config_init(&c);
    c.deviation = (kvb_deviation_kind)3;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "KVBLEND_DEVIATION: deviation=3; expected k, v or kv");
    kvb_config_init(&c);
    c.verify_checksums = -2;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "verify_checksums=-2; expected auto, false or true");
    c.verify_checksums = 2;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_ERR_INVALID);
    c.verify_checksums = -1;
    ck_assert_int_eq(kvb_config_validate(&c), KVB_OK);
}
END_TEST

START_TEST(test_config_ratio_at)
{
    kvb_config c;
    kvb_config_init(&c);
    set_ok(&c, "LMCACHE_BLEND_CHECK_LAYERS", "1,4,8");
    ck_assert_float_eq(kvb_config_ratio_at(&c, 0), 0.15f);
    ck_assert_float_eq(kvb_config_ratio_at(&c, 2), 0.15f);
    set_ok(&c, "LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.5,0.25,0.125");
    ck_assert_float_eq(kvb_config_ratio_at(&c, 0), 0.5f);
    ck_assert_float_eq(kvb_config_ratio_at(&c, 1), 0.25f);
    ck_assert_float_eq(kvb_config_ratio_at(&c, 2), 0.125f);
    /* out of range: recompute everything rather than crash */
    kvb_set_log(NULL, NULL, KVB_LOG_ERROR); /* keep the warning quiet */
    ck_assert_float_eq(kvb_config_ratio_at(&c, 3), 1.0f);
    ck_assert_float_eq(kvb_config_ratio_at(&c, -1), 1.0f);
    ck_assert_float_eq(kvb_config_ratio_at(NULL, 0), 1.0f);
    kvb_set_log(NULL, NULL, KVB_LOG_WARNING);
}
END_TEST


/* kvb_config_get walks the whole table: every variable once, in the order
 * of kvb_config_name, each default read back with its type. */
START_TEST(test_config_get_iterates_the_table)
{
    kvb_config c;
    kvb_setting v;
    kvb_config_init(&c);
    int n = 0;
    while (kvb_config_get(&c, n, &v) == KVB_OK) {
        ck_assert_str_eq(v.name, kvb_config_name(n));
        ck_assert_int_eq(v.key == NULL, v.type == KVB_SETTING_NO_FIELD);
        n++;
    }
    ck_assert_ptr_null(kvb_config_name(n));
    ck_assert_int_ge(n, 25);
    ck_assert_int_eq(kvb_config_get(&c, -1, &v), KVB_ERR_NOT_FOUND);
    ck_assert_int_eq(kvb_config_get(NULL, 0, &v), KVB_ERR_INVALID);
    ck_assert_int_eq(kvb_config_get(&c, 0, NULL), KVB_ERR_INVALID);
}
END_TEST

/* The value of the setting named `name` in `c`. */
static kvb_setting get_named(const kvb_config *c, const char *name)
{
    kvb_setting v;
    for (int i = 0; kvb_config_get(c, i, &v) == KVB_OK; i++) {
        if (!strcmp(v.name, name)) {
            return v;
        }
    }
    ck_abort_msg("%s is not in the table", name);
    return v;
}

/* Values read back through kvb_config_get, one row per type. */
static const struct {
    const char *name, *value, *key;
    kvb_setting_type type;
    int64_t i;
    double f;
    const char *s;
    unsigned flags;
} kGetRows[] = {
    {"LMCACHE_ENABLE_BLENDING", "true", "enable_blending", KVB_SETTING_BOOL, 1, 0, NULL, 0},
    {"LMCACHE_USE_LAYERWISE", "1", "use_layerwise", KVB_SETTING_BOOL, 1, 0, NULL, KVB_SETTING_COMPAT},
    {"LMCACHE_CHUNK_SIZE", "512", "chunk_size", KVB_SETTING_INT, 512, 0, NULL, KVB_SETTING_COMPAT},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": true}", "enable_sparse", KVB_SETTING_BOOL, 1, 0,
     NULL, KVB_SETTING_COMPAT},
    {"KVBLEND_NUM_THREADS", "3", "num_threads", KVB_SETTING_INT, 3, 0, NULL, 0},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "0.5", "max_local_cpu_size_gb", KVB_SETTING_FLOAT, 0, 0.5, NULL, 0},
    {"KVBLEND_DEVIATION", "V", "deviation", KVB_SETTING_STR, 0, 0, "v", 0},
    {"KVBLEND_SELECTION", "query", "selection", KVB_SETTING_STR, 0, 0, "query", 0},
    {"KVBLEND_LOG_LEVEL", "error", "log_level", KVB_SETTING_STR, 0, 0, "error", 0},
    {"KVBLEND_VERIFY_CHECKSUMS", "0", "verify_checksums", KVB_SETTING_STR, 0, 0, "false", 0},
    {"KVBLEND_VERIFY_CHECKSUMS", "auto", "verify_checksums", KVB_SETTING_STR, 0, 0, "auto", 0},
    {"LMCACHE_BLEND_SPECIAL_STR", "<s>", "blend_special_str", KVB_SETTING_STR, 0, 0, "<s>", 0},
    {"LMCACHE_LOCAL_DISK", "file:///kv/", "local_disk", KVB_SETTING_STR, 0, 0, "/kv/", 0},
    {"LMCACHE_REMOTE_URL", "None", "remote_url", KVB_SETTING_STR, 0, 0, NULL, 0},
    {"LMCACHE_REMOTE_SERDE", "naive", NULL, KVB_SETTING_NO_FIELD, 0, 0, NULL, 0},
};

START_TEST(test_config_get_reads_values_by_type)
{
    kvb_config c;
    kvb_config_init(&c);
    set_ok(&c, kGetRows[_i].name, kGetRows[_i].value);
    kvb_setting v = get_named(&c, kGetRows[_i].name);
    ck_assert_int_eq(v.type, kGetRows[_i].type);
    ck_assert_uint_eq(v.flags, kGetRows[_i].flags);
    if (kGetRows[_i].key == NULL) {
        ck_assert_ptr_null(v.key);
    } else {
        ck_assert_str_eq(v.key, kGetRows[_i].key);
    }
    switch (v.type) {
    case KVB_SETTING_BOOL:
    case KVB_SETTING_INT:
        ck_assert_int_eq(v.i, kGetRows[_i].i);
        break;
    case KVB_SETTING_FLOAT:
        ck_assert_double_eq(v.f, kGetRows[_i].f);
        break;
    case KVB_SETTING_STR:
        if (kGetRows[_i].s == NULL) {
            ck_assert_ptr_null(v.s);
        } else {
            ck_assert_int_eq(v.n, (int)strlen(kGetRows[_i].s));
            ck_assert_int_eq(strncmp(v.s, kGetRows[_i].s, (size_t)v.n), 0);
        }
        break;
    default:
        break;
    }
}
END_TEST

START_TEST(test_config_get_lists)
{
    kvb_config c;
    kvb_config_init(&c);
    kvb_setting v = get_named(&c, "LMCACHE_BLEND_THRESHOLDS");
    ck_assert_int_eq(v.type, KVB_SETTING_FLOAT_LIST);
    ck_assert_int_eq(v.n, 0); /* unset */
    set_ok(&c, "LMCACHE_BLEND_CHECK_LAYERS", "1,4,8");
    set_ok(&c, "LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.5,0.3,0.15");
    v = get_named(&c, "LMCACHE_BLEND_CHECK_LAYERS");
    ck_assert_int_eq(v.type, KVB_SETTING_INT_LIST);
    ck_assert_int_eq(v.n, 3);
    ck_assert_int_eq(v.ints[2], 8);
    v = get_named(&c, "LMCACHE_BLEND_RECOMPUTE_RATIOS");
    ck_assert_int_eq(v.n, 3);
    ck_assert_float_eq(v.floats[1], 0.3f);
}
END_TEST

/* Fixture: starts and ends every env test with none of the variables set,
 * whatever the environment the suite runs in. */
static void env_clear(void)
{
    for (int i = 0; kvb_config_name(i) != NULL; i++) {
        unsetenv(kvb_config_name(i));
    }
    unsetenv("KVBLEND_DEVIATON");
    unsetenv("LMCACHE_SOMETHING_ELSE");
}

START_TEST(test_config_from_env_defaults)
{
    kvb_config c;
    kvb_config d;
    memset(&c, 0x33, sizeof c);
    ck_assert_int_eq(kvb_config_from_env(&c), KVB_OK);
    kvb_config_init(&d);
    ck_assert_int_eq(memcmp(&c, &d, sizeof c), 0);
}
END_TEST

/* Every variable read from the environment, and what it sets. */
static const set_step kEnvSteps[] = {
    {"LMCACHE_ENABLE_BLENDING", "True", FIELD(enable_blending), 1, NULL},
    {"LMCACHE_BLEND_SPECIAL_STR", " ## ", FIELD(blend_special_str), 0, " ## "},
    {"LMCACHE_USE_LAYERWISE", "true", FIELD(use_layerwise), 1, NULL},
    {"LMCACHE_BLEND_CHECK_LAYERS", "[1, 3]", FIELD(num_check_layers), 2, NULL},
    {NULL, NULL, FIELD(check_layers[1]), 3, NULL},
    {"LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.2,0.1", FIELD(num_recompute_ratios), 2, NULL},
    {NULL, NULL, FIELD(recompute_ratios[1]), 0.1, NULL},
    {"LMCACHE_BLEND_THRESHOLDS", "0.5", FIELD(num_thresholds), 1, NULL},
    {"LMCACHE_CHUNK_SIZE", "128", FIELD(chunk_size), 128, NULL},
    {"LMCACHE_LOCAL_CPU", "False", FIELD(local_cpu), 0, NULL},
    {"LMCACHE_MAX_LOCAL_CPU_SIZE", "7.5", FIELD(max_local_cpu_size_gb), 7.5, NULL},
    {"LMCACHE_EXTRA_CONFIG", "{\"enable_sparse\": true}", FIELD(enable_sparse), 1, NULL},
    {"KVBLEND_MAX_DEVICE_SIZE", "2", FIELD(max_device_size_gb), 2.0, NULL},
    {"KVBLEND_DEVIATION", "kv", FIELD(deviation), KVB_DEVIATION_KV, NULL},
    {"KVBLEND_NUM_THREADS", "3", FIELD(num_threads), 3, NULL},
    {"KVBLEND_LOG_LEVEL", "debug", FIELD(log_level), KVB_LOG_DEBUG, NULL},
    {"LMCACHE_SOMETHING_ELSE", "whatever", NO_FIELD, 0, NULL}, /* ignored */
};

START_TEST(test_config_from_env_reads_every_variable)
{
    for (size_t i = 0; i < COUNT_OF(kEnvSteps); i++) {
        if (kEnvSteps[i].name != NULL) {
            setenv(kEnvSteps[i].name, kEnvSteps[i].value, 1);
        }
    }
    kvb_config c;
    ck_assert_int_eq(kvb_config_from_env(&c), KVB_OK);
    for (size_t i = 0; i < COUNT_OF(kEnvSteps); i++) {
        check_step(&c, &kEnvSteps[i], "environment", i);
    }
}
END_TEST

START_TEST(test_config_from_env_bad_value_leaves_cfg)
{
    kvb_config c;
    kvb_config before;
    kvb_config_init(&c);
    c.chunk_size = 99;
    memcpy(&before, &c, sizeof c);
    setenv("LMCACHE_ENABLE_BLENDING", "True", 1);
    setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.15,1.5", 1);
    ck_assert_int_eq(kvb_config_from_env(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "LMCACHE_BLEND_RECOMPUTE_RATIOS=\"0.15,1.5\": "
                                    "ratio 1.5 is outside (0, 1]");
    ck_assert_int_eq(memcmp(&before, &c, sizeof c), 0);
}
END_TEST

START_TEST(test_config_from_env_unknown_kvblend_variable)
{
    setenv("KVBLEND_DEVIATON", "v", 1); /* typo */
    kvb_config c;
    kvb_config_init(&c);
    ck_assert_int_eq(kvb_config_from_env(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "KVBLEND_DEVIATON=\"v\"");
    ck_assert_has(kvb_last_error(), "unknown kvblend variable KVBLEND_DEVIATON");
    ck_assert_has(kvb_last_error(), "KVBLEND_DEVIATION");
}
END_TEST

START_TEST(test_config_from_env_cross_field_mismatch)
{
    setenv("LMCACHE_BLEND_CHECK_LAYERS", "1,2,3", 1);
    setenv("LMCACHE_BLEND_RECOMPUTE_RATIOS", "0.3,0.2", 1);
    kvb_config c;
    kvb_config_init(&c);
    ck_assert_int_eq(kvb_config_from_env(&c), KVB_ERR_INVALID);
    ck_assert_has(kvb_last_error(), "LMCACHE_BLEND_RECOMPUTE_RATIOS");
    ck_assert_has(kvb_last_error(), "LMCACHE_BLEND_CHECK_LAYERS");
    ck_assert_int_eq(c.num_check_layers, 1); /* unchanged */
}
END_TEST

/* The config suite. */
Suite *config_suite(void)
{
    static const case_spec cases[] = {
        {"set", NULL, NULL, 0},
        {"validate", NULL, NULL, 0},
        {"env", env_clear, env_clear, 0},
    };
    const test_spec tests[] = {
        {0, test_config_set_accepted_values, (int)COUNT_OF(kSetSequences)},
        {0, test_config_set_bool_forms, 0},
        {0, test_config_set_special_str, 0},
        {0, test_config_extra_config_nesting_limit, 0},
        {0, test_config_set_rejects_bad_values, (int)(sizeof kBadValues / sizeof kBadValues[0])},
        {0, test_config_set_unknown_lmcache_name_ignored, 0},
        {0, test_config_set_null_arguments, 0},
        {0, test_config_long_value_is_truncated_in_message, 0},
        {0, test_config_get_iterates_the_table, 0},
        {0, test_config_get_reads_values_by_type, (int)(sizeof kGetRows / sizeof kGetRows[0])},
        {0, test_config_get_lists, 0},
        {1, test_config_validate_list_counts, (int)COUNT_OF(kValidateSequences)},
        {1, test_config_validate_hand_filled_fields, 0},
        {1, test_config_ratio_at, 0},
        {2, test_config_from_env_defaults, 0},
        {2, test_config_from_env_reads_every_variable, 0},
        {2, test_config_from_env_bad_value_leaves_cfg, 0},
        {2, test_config_from_env_unknown_kvblend_variable, 0},
        {2, test_config_from_env_cross_field_mismatch, 0},
    };
    return suite_build("config", cases, COUNT_OF(cases), tests, COUNT_OF(tests));
}
