/* Standalone test driver for the int8 whitener product (edge_quq/csrc/whitener.c), cross-compiled for aarch64 and
 * run under qemu-aarch64-static by tests/test_whitener_aarch64.py (also built natively there).
 *
 *   whitener_driver CASES_FILE
 *
 * CASES_FILE (little-endian, written by the test with numpy): int32 count, then per case
 *   int32 N, F, S; int64 nq; int8 q[nq]; int64 off[F + 1]; float32 scale[F * S], diag[S * F], x[N * F],
 *   z[N * S * F] (numpy's detectors._project_q8_numpy), tol[N * S * F] (Q8_RTOL * sum_i |x_i W_ik|).
 * Every variant this CPU has must match z within tol. Prints one line per failure, then
 * "variants=... cases=N failures=M"; exit status 1 on failures.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "driver_util.h"
#include "whitener.h"


int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CASES_FILE\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    int32_t *count = read_n(f, 4);
    int failures = 0;
    for (int c = 0; c < *count; ++c) {
        int32_t *dims = read_n(f, 12);
        const ptrdiff_t N = dims[0], F = dims[1];
        const int S = dims[2];
        int64_t *nq = read_n(f, 8);
        int8_t *q = read_n(f, (size_t)*nq);
        int64_t *off = read_n(f, (size_t)(F + 1) * 8);
        float *scale = read_n(f, (size_t)(F * S) * 4), *diag = read_n(f, (size_t)(F * S) * 4);
        float *x = read_n(f, (size_t)(N * F) * 4);
        float *want = read_n(f, (size_t)(N * F * S) * 4), *tol = read_n(f, (size_t)(N * F * S) * 4);
        float *z = malloc((size_t)(N * F * S) * 4);
        for (int v = 0; eq_q8_isa(v); ++v) {
            if (eq_project_q8(N, F, S, x, q, off, scale, diag, z, eq_q8_isa(v)) != 0) {
                printf("case %d %s: call failed\n", c, eq_q8_isa(v));
                ++failures;
                continue;
            }
            for (ptrdiff_t k = 0; k < N * F * S; ++k)
                if (!(fabsf(z[k] - want[k]) <= tol[k])) {
                    printf("case %d (N=%td F=%td S=%d) %s: z[%td] = %g, numpy %g, tolerance %g\n", c, N, F, S,
                           eq_q8_isa(v), k, (double)z[k], (double)want[k], (double)tol[k]);
                    ++failures;
                    break;
                }
        }
        free(dims); free(nq); free(q); free(off); free(scale); free(diag); free(x); free(want); free(tol); free(z);
    }
    printf("variants=");
    for (int v = 0; eq_q8_isa(v); ++v) printf("%s%s", v ? "," : "", eq_q8_isa(v));
    printf(" cases=%d failures=%d\n", *count, failures);
    free(count);
    fclose(f);
    return failures ? 1 : 0;
}
