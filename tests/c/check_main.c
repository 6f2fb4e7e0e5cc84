/*
 * check_main.c: runs the Check suites.  With no argument every suite runs;
 * with names ("store ops") only those.  Exit status 0 when all tests pass,
 * 1 on a failure, 2 on an unknown suite name.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "suites.h"

/* Adds the suite called `name` to the runner (or all when name is NULL). */
static int add_suites(SRunner **sr, const char *name)
{
    int found = 0;
    for (int i = 0; kvb_suites[i].name != NULL; i++) {
        if (name != NULL && strcmp(name, kvb_suites[i].name) != 0) {
            continue;
        }
        Suite *s = kvb_suites[i].make();
        if (*sr == NULL) {
            *sr = srunner_create(s);
        } else {
            srunner_add_suite(*sr, s);
        }
        found = 1;
    }
    return found;
}

int main(int argc, char **argv)
{
    SRunner *sr = NULL;
    if (argc < 2) {
        add_suites(&sr, NULL);
    }
    for (int i = 1; i < argc; i++) {
        if (!add_suites(&sr, argv[i])) {
            fprintf(stderr, "kvb_check: unknown suite '%s'; known:", argv[i]);
            for (int j = 0; kvb_suites[j].name != NULL; j++) {
                fprintf(stderr, " %s", kvb_suites[j].name);
            }
            fprintf(stderr, "\n");
            srunner_free(sr);
            return 2;
        }
    }
    if (sr == NULL) {
        fprintf(stderr, "kvb_check: no suites\n");
        return 1;
    }
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
