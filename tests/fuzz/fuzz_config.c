/*
 * fuzz_config.c: libFuzzer target for the configuration parser
 * (kvb_config_set, including the LMCACHE_EXTRA_CONFIG JSON reader, and
 * kvb_config_validate).
 *
 * Input: records separated by NUL bytes.  The first byte of a record picks
 * the variable (every name kvblend reads, plus an unknown LMCACHE_ name, an
 * unknown KVBLEND_ name and a name with neither prefix); the rest is its
 * value.  The records are applied in order to one config, then it is
 * validated.  Properties checked besides "no crash, no sanitizer report":
 *   - every call returns KVB_OK or KVB_ERR_INVALID;
 *   - a failed set leaves the config unchanged and its message starts with
 *     the variable's name;
 *   - setting the same value twice gives the same status and config;
 *   - a config that validates has its ratios in (0, 1] and a NUL-terminated,
 *     non-empty separator string.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvblend.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Names the parser must refuse or ignore, after the variables it reads
 * (kvb_config_name). */
static const char *const foreign[] = {
    "LMCACHE_SOME_OTHER_SETTING", /* ignored: an LMCache setting */
    "KVBLEND_NO_SUCH_SETTING",    /* refused: a kvblend typo */
    "PATH",                       /* refused: neither prefix */
};
#define NUM_FOREIGN ((int)(sizeof foreign / sizeof foreign[0]))

/* How many names there are to try: every variable kvblend reads, then
 * the foreign ones. */
static int num_names(void)
{
    int n = 0;
    while (kvb_config_name(n) != NULL) {
        n++;
    }
    return n + NUM_FOREIGN;
}

/* The i-th name to try, i in [0, num_names()). */
static const char *name_at(int i)
{
    const char *known = kvb_config_name(i);
    return known != NULL ? known : foreign[i - (num_names() - NUM_FOREIGN)];
}

/* Aborts with a message: libFuzzer reports the input as a crash. */
static void fail(const char *what, const char *name, const char *value)
{
    fprintf(stderr, "fuzz_config: %s (name %s, value \"%s\", last error "
            "\"%s\")\n", what, name, value, kvb_last_error());
    abort();
}

/* Applies one record and checks the set's contract. */
static void apply(kvb_config *cfg, const char *name, const char *value)
{
    kvb_config before = *cfg;
    kvb_clear_error();
    kvb_status st = kvb_config_set(cfg, name, value);
    if (st != KVB_OK && st != KVB_ERR_INVALID) {
        fail("status is neither OK nor INVALID", name, value);
    }
    if (st != KVB_OK) {
        if (memcmp(&before, cfg, sizeof before) != 0) {
            fail("a failed set changed the config", name, value);
        }
        if (strncmp(kvb_last_error(), name, strlen(name)) != 0) {
            fail("the message does not start with the variable", name, value);
        }
        return;
    }
    kvb_config again = *cfg;
    if (kvb_config_set(&again, name, value) != KVB_OK ||
        memcmp(&again, cfg, sizeof again) != 0) {
        fail("setting the same value twice is not idempotent", name, value);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvb_config cfg;
    memset(&cfg, 0, sizeof cfg); /* padding too: the checks use memcmp */
    kvb_config_init(&cfg);
    char *buf = malloc(size + 1);
    if (buf == NULL) {
        return 0;
    }
    size_t pos = 0;
    while (pos < size) {
        size_t end = pos;
        while (end < size && data[end] != 0) {
            end++;
        }
        if (end > pos) {
            const char *name = name_at(data[pos] % num_names());
            size_t len = end - pos - 1;
            memcpy(buf, data + pos + 1, len);
            buf[len] = '\0';
            apply(&cfg, name, buf);
        }
        pos = end + 1;
    }
    free(buf);

    kvb_clear_error();
    kvb_status st = kvb_config_validate(&cfg);
    if (st != KVB_OK && st != KVB_ERR_INVALID) {
        fail("validate returned neither OK nor INVALID", "-", "-");
    }
    if (st != KVB_OK) {
        if (kvb_last_error()[0] == '\0') {
            fail("validate failed without a message", "-", "-");
        }
        return 0;
    }
    if (memchr(cfg.blend_special_str, '\0', KVB_MAX_SPECIAL_STR) == NULL ||
        cfg.blend_special_str[0] == '\0') {
        fail("a valid config has a bad separator string", "-", "-");
    }
    for (int i = 0; i < cfg.num_check_layers; i++) {
        float r = kvb_config_ratio_at(&cfg, i);
        if (!(r > 0.0f && r <= 1.0f)) {
            fail("a valid config has a ratio outside (0, 1]", "-", "-");
        }
    }
    return 0;
}
