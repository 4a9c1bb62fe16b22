/* Standalone test driver for the head kernel, cross-compiled for aarch64 and run under qemu-aarch64-static by
 * tests/test_native_aarch64.py (also built natively there). No Python on the target needed.
 *
 *   headkernel_driver CASES_FILE [--dump VARIANT OUT_FILE]
 *   headkernel_driver --cpuinfo CPUINFO_FILE   (the dispatch for another machine's /proc/cpuinfo)
 *
 * CASES_FILE (little-endian, written by the test with numpy): int32 count, then per case
 *   int32 F, H, C, T, act; float64 p0, p1, atol, int8 mean tolerance, int8 std tolerance;
 *   float32 x[F], w0[F*H], b0[H], w1[H*C], b1[C]; uint8 keep0[T*F], keep1[T*H];
 *   float32 probs[T*C] (numpy HeadWeights.probs with those masks); float64 mean[C], std[C];
 *   float64 analytic mean[C], std[C], expected entropy (edge_quq.analytic's numpy reference).
 * For every kernel variant this CPU has: the given-mask outputs must match numpy within atol, and every variant
 * must match the plain C one; with the kernel's own PRNG and a fixed seed, all variants must agree too. The int8
 * variants (and their plain C reference scalar_i8, run everywhere) instead match numpy's mean and std within the
 * int8 tolerances, and scalar_i8 within atol (their integer sums are exact, so only the float layer 2 differs).
 * --dump writes that variant's mean[C] and std[C] (float64, given masks) for every case, for the decision test. The
 * closed form (analytic.c) must match its numpy reference within 1e-5 (1e-4 for a linear head's entropy).
 * Prints one line per failure, then "features=... variants=... cases=N failures=M"; exit status 1 on failures.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_util.h"
#include "headkernel.h"


static double max_abs_diff_f(const float *a, const float *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; ++i) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

static double max_abs_diff_d(const double *a, const double *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; ++i) {
        const double d = fabs(a[i] - b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

/* Prints "features=... variants=..." as the dispatch would choose them on the machine whose cpuinfo this is. */
static int dispatch_for(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 2;
    }
    static char text[1 << 16];
    const size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    eq_kernels_t table[8];
    char names[128];
    const int nk = eq_kernels_for(eq_features_from_cpuinfo(text), table, 8, names, sizeof names);
    printf("features=%s variants=", names);
    for (int v = 0; v < nk; ++v) printf("%s%s", v ? "," : "", table[v].name);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--cpuinfo") == 0) return dispatch_for(argv[2]);
    if (argc != 2 && !(argc == 5 && strcmp(argv[2], "--dump") == 0)) {
        fprintf(stderr, "usage: %s CASES_FILE [--dump VARIANT OUT_FILE] | --cpuinfo CPUINFO_FILE\n", argv[0]);
        return 2;
    }
    FILE *dump = argc == 5 ? fopen(argv[4], "wb") : NULL;
    if (argc == 5 && (!dump || !eq_kernels_find(argv[3]))) {
        fprintf(stderr, "cannot dump %s to %s\n", argv[3], argv[4]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        perror(argv[1]);
        return 2;
    }
    int32_t count;
    if (fread(&count, 4, 1, f) != 1) return 2;
    /* The dispatch table, then the int8 reference (not in the table; runs on every CPU). */
    const int nk = eq_kernels_count() + 1;
    const eq_kernels_t *plain = eq_kernels_find("scalar"), *plain_i8 = eq_kernels_find("scalar_i8");
    int failures = 0;
    for (int ci = 0; ci < count; ++ci) {
        int32_t dims[5];
        double pr[5];
        if (fread(dims, 4, 5, f) != 5 || fread(pr, 8, 5, f) != 5) return 2;
        const int F = dims[0], H = dims[1], C = dims[2], T = dims[3];
        const double atol = pr[2];
        float *x = read_n(f, 4 * (size_t)F), *w0 = read_n(f, 4 * (size_t)F * H), *b0 = read_n(f, 4 * (size_t)H);
        float *w1 = read_n(f, 4 * (size_t)H * C), *b1 = read_n(f, 4 * (size_t)C);
        uint8_t *k0 = read_n(f, (size_t)T * F), *k1 = read_n(f, (size_t)T * H);
        float *want_p = read_n(f, 4 * (size_t)T * C);
        double *want_m = read_n(f, 8 * (size_t)C), *want_s = read_n(f, 8 * (size_t)C);
        double *an_m = read_n(f, 8 * (size_t)C), *an_s = read_n(f, 8 * (size_t)C), *an_e = read_n(f, 8);
        eq_head_t hd = {F, H, C, x, w0, b0, w1, b1, pr[0], pr[1], dims[4]};

        float *ref_p = malloc(4 * (size_t)T * C), *p = malloc(4 * (size_t)T * C), *lg = malloc(4 * (size_t)C);
        double *m = malloc(8 * (size_t)C), *s = malloc(8 * (size_t)C), *rm = malloc(8 * (size_t)C), *rs = malloc(8 * (size_t)C);
        eq_moments_t rseed = {rm, rs, lg, NULL, 0};
        for (int v = 0; v < nk; ++v) {
            const eq_kernels_t *k = v < nk - 1 ? eq_kernels_get(v) : plain_i8, *base = k->gemm_i8 ? plain_i8 : plain;
            eq_moments_t ref = {rm, rs, lg, ref_p, 0};
            eq_head_moments(&hd, base, T, 0, 1, k0, k1, &ref);
            eq_moments_t out = {m, s, lg, p, 0};
            if (eq_head_moments(&hd, k, T, 0, 1, k0, k1, &out) != 0) return 3;
            if (dump && strcmp(k->name, argv[3]) == 0)
                if (fwrite(m, 8, (size_t)C, dump) != (size_t)C || fwrite(s, 8, (size_t)C, dump) != (size_t)C) return 2;
            const double dm = max_abs_diff_d(m, want_m, C), ds = max_abs_diff_d(s, want_s, C),
                         dv = max_abs_diff_f(p, ref_p, (size_t)T * C);
            /* int8: per-sample outputs are not compared with numpy, only the moments, within the int8 tolerances. */
            const double dp = k->gemm_i8 ? 0.0 : max_abs_diff_f(p, want_p, (size_t)T * C);
            const int bad = k->gemm_i8 ? dm > pr[3] || ds > pr[4] || dv > atol : dp > atol || dm > atol || ds > atol || dv > atol;
            if (bad) {
                printf("FAIL case %d F=%d H=%d C=%d T=%d act=%d variant=%s: |probs-numpy|=%g |mean|=%g |std|=%g "
                       "|probs-%s|=%g\n", ci, F, H, C, T, dims[4], k->name, dp, dm, ds, base->name, dv);
                ++failures;
            }
            /* Own PRNG: the generator is ISA-independent, so a fixed seed gives the same masks everywhere. */
            eq_head_moments(&hd, base, T, 12345, 0, NULL, NULL, &rseed);
            eq_moments_t o2 = {m, s, lg, NULL, 0};
            eq_head_moments(&hd, k, T, 12345, 0, NULL, NULL, &o2);
            if (max_abs_diff_d(m, rm, C) > atol || max_abs_diff_d(s, rs, C) > atol) {
                printf("FAIL case %d variant=%s: seeded moments differ from %s\n", ci, k->name, base->name);
                ++failures;
            }
        }
        eq_moments_t an = {m, s, lg, NULL, 0, 0};
        if (eq_head_analytic(&hd, 1.0, &an) != 0) return 3;
        const double etol = dims[4] == EQ_ACT_LINEAR ? 1e-4 : 1e-5;
        if (max_abs_diff_d(m, an_m, C) > 1e-5 || max_abs_diff_d(s, an_s, C) > 1e-5 ||
            fabs(an.expected_entropy - *an_e) > etol * (1.0 + fabs(*an_e))) {
            printf("FAIL case %d analytic: |mean|=%g |std|=%g entropy %.9g vs %.9g\n", ci, max_abs_diff_d(m, an_m, C),
                   max_abs_diff_d(s, an_s, C), an.expected_entropy, *an_e);
            ++failures;
        }
        free(an_m); free(an_s); free(an_e);
        free(x); free(w0); free(b0); free(w1); free(b1); free(k0); free(k1); free(want_p); free(want_m); free(want_s);
        free(ref_p); free(p); free(lg); free(m); free(s); free(rm); free(rs);
    }
    if (dump) fclose(dump);
    printf("features=%s variants=", eq_cpu_features());
    for (int v = 0; v < nk - 1; ++v) printf("%s%s", v ? "," : "", eq_kernels_get(v)->name);
    printf(" cases=%d failures=%d\n", count, failures);
    return failures ? 1 : 0;
}
