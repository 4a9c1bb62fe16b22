/* What the standalone test drivers (tests/csrc/*_driver.c) share. */
#ifndef EQ_DRIVER_UTIL_H
#define EQ_DRIVER_UTIL_H

#include <stdio.h>
#include <stdlib.h>

/* n bytes of the cases file, or exit status 2 when it ends early. */
static void *read_n(FILE *f, size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, f) != n) {
        fprintf(stderr, "truncated cases file\n");
        exit(2);
    }
    return p;
}

#endif
