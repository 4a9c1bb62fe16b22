/* What the standalone test drivers (tests/csrc/*_driver.c) share. */
#ifndef EQ_DRIVER_UTIL_H
#define EQ_DRIVER_UTIL_H

#include <stdint.h>
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

/* The cases file named by a driver's one argument, with its int32 case count in *count; exit status 2 otherwise. */
static FILE *open_cases(int argc, char **argv, int32_t *count) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASES_FILE\n", argv[0]);
        exit(2);
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) exit(2);
    int32_t *n = read_n(f, 4);
    *count = *n;
    free(n);
    return f;
}

/* A driver's last line, "variants=a,b cases=N failures=M", for the variant names isa(0), isa(1), ... */
static void print_summary(const char *(*isa)(int), int cases, int failures) {
    printf("variants=");
    for (int v = 0; isa(v); ++v) printf("%s%s", v ? "," : "", isa(v));
    printf(" cases=%d failures=%d\n", cases, failures);
}

#endif
