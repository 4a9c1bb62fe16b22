/* Standalone test driver for the kNN and ViM kernels (edge_quq/csrc/rowdot.c), cross-compiled for aarch64 and run
 * under qemu-aarch64-static by tests/test_knn_vim_aarch64.py (also built natively there).
 *
 *   rowdot_driver CASES_FILE
 *
 * CASES_FILE (little-endian, written by the test with numpy): int32 count, then per case int32 kind and
 *   kind 0 (knn_kth):   int32 N, F, B, k, type (rowdot.h: 0 float32, 1 int8, 2 float16); float32 scale; bank [B * F]
 *                       of that type; for float16 its float32 widening [B * F]; float32 x[N * F],
 *                       want[N] (detectors._knn_kth_numpy), tol[N]
 *   kind 1 (vim_resid): int32 N, F, D, type; float32 x[N * F], origin[F]; nsT [D * F] of that type; for float16 its
 *                       float32 widening; for int8 float32 scale[D]; float64 want[N] (detectors._vim_resid_numpy), tol[N]
 * Every variant this CPU has must match want within tol, and, for float16, the widening's results to the bit (a
 * variant that does not read float16, eq_dots_f16, must refuse it). Prints one line per failure, then
 * "variants=... cases=N failures=M"; exit status 1 on failures.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_util.h"
#include "rowdot.h"

static size_t type_size(int ty) { return ty == EQ_RD_I8 ? 1 : ty == EQ_RD_F16 ? 2 : 4; }

/* -1 when variant v should skip the case: it does not read float16, and refused it (else a failure is counted) */
static int f16_skip(int ty, int v, int rc, int c, int *failures) {
    if (ty != EQ_RD_F16 || eq_dots_f16(eq_dots_isa(v))) return 0;
    if (rc != -2) {
        printf("case %d %s: a float16 W not refused\n", c, eq_dots_isa(v));
        ++*failures;
    }
    return -1;
}

static int knn_case(FILE *f, int c) {
    int32_t *d = read_n(f, 20);
    const ptrdiff_t N = d[0], F = d[1], B = d[2], k = d[3];
    const int i8 = d[4];
    float *scale = read_n(f, 4);
    void *bank = read_n(f, (size_t)(B * F) * type_size(i8));
    float *wide = i8 == EQ_RD_F16 ? read_n(f, (size_t)(B * F) * 4) : NULL;
    float *x = read_n(f, (size_t)(N * F) * 4), *want = read_n(f, (size_t)N * 4), *tol = read_n(f, (size_t)N * 4);
    float *got = malloc((size_t)(N + 1) * 4), *got32 = malloc((size_t)(N + 1) * 4);
    int failures = 0;
    for (int v = 0; eq_dots_isa(v); ++v) {
        const int rc = eq_knn_kth(N, F, B, k, x, bank, i8, *scale, NULL, got, eq_dots_isa(v));
        if (f16_skip(i8, v, rc, c, &failures)) continue;
        if (wide && (eq_knn_kth(N, F, B, k, x, wide, EQ_RD_F32, 1.0f, NULL, got32, eq_dots_isa(v)) != 0 ||
                     memcmp(got, got32, (size_t)N * 4) != 0)) {
            printf("case %d knn %s: float16 bank not bit-identical to its float32 widening\n", c, eq_dots_isa(v));
            ++failures;
        }
        if (rc != 0) {
            printf("case %d %s: call failed\n", c, eq_dots_isa(v));
            ++failures;
            continue;
        }
        for (ptrdiff_t n = 0; n < N; ++n)
            if (!(fabs((double)got[n] - want[n]) <= tol[n])) {
                printf("case %d knn (N=%td F=%td B=%td k=%td int8=%d) %s: kth[%td] = %g, numpy %g, tolerance %g\n", c,
                       N, F, B, k, i8, eq_dots_isa(v), n, (double)got[n], (double)want[n], (double)tol[n]);
                ++failures;
                break;
            }
    }
    free(d); free(scale); free(bank); free(wide); free(x); free(want); free(tol); free(got); free(got32);
    return failures;
}

static int vim_case(FILE *f, int c) {
    int32_t *d = read_n(f, 16);
    const ptrdiff_t N = d[0], F = d[1], D = d[2];
    const int i8 = d[3];
    float *x = read_n(f, (size_t)(N * F) * 4), *origin = read_n(f, (size_t)F * 4);
    void *ns = read_n(f, (size_t)(D * F) * type_size(i8));
    float *wide = i8 == EQ_RD_F16 ? read_n(f, (size_t)(D * F) * 4) : NULL;
    float *scale = i8 == EQ_RD_I8 ? read_n(f, (size_t)D * 4) : NULL;
    double *want = read_n(f, (size_t)N * 8), *tol = read_n(f, (size_t)N * 8), *got = malloc((size_t)(N + 1) * 8);
    double *got32 = malloc((size_t)(N + 1) * 8);
    int failures = 0;
    for (int v = 0; eq_dots_isa(v); ++v) {
        const int rc = eq_vim_resid(N, F, D, x, origin, ns, i8, scale, got, eq_dots_isa(v));
        if (f16_skip(i8, v, rc, c, &failures)) continue;
        if (wide && (eq_vim_resid(N, F, D, x, origin, wide, EQ_RD_F32, NULL, got32, eq_dots_isa(v)) != 0 ||
                     memcmp(got, got32, (size_t)N * 8) != 0)) {
            printf("case %d vim %s: float16 null space not bit-identical to its float32 widening\n", c, eq_dots_isa(v));
            ++failures;
        }
        if (rc != 0) {
            printf("case %d %s: call failed\n", c, eq_dots_isa(v));
            ++failures;
            continue;
        }
        for (ptrdiff_t n = 0; n < N; ++n)
            if (!(fabs(got[n] - want[n]) <= tol[n])) {
                printf("case %d vim (N=%td F=%td D=%td int8=%d) %s: resid[%td] = %g, numpy %g, tolerance %g\n", c, N,
                       F, D, i8, eq_dots_isa(v), n, got[n], want[n], tol[n]);
                ++failures;
                break;
            }
    }
    free(d); free(x); free(origin); free(ns); free(wide); free(scale); free(want); free(tol); free(got); free(got32);
    return failures;
}

int main(int argc, char **argv) {
    int32_t count;
    FILE *f = open_cases(argc, argv, &count);
    int failures = 0;
    for (int c = 0; c < count; ++c) {
        int32_t *kind = read_n(f, 4);
        failures += *kind == 0 ? knn_case(f, c) : vim_case(f, c);
        free(kind);
    }
    print_summary(eq_dots_isa, count, failures);
    fclose(f);
    return failures ? 1 : 0;
}
