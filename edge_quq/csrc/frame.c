/* Native fast paths of the per-frame math (see frame.h for the contract and the numpy references). */

/* mean - z * std must round like numpy's two operations: no fused multiply-add (GCC contracts by default in
 * gnu11 mode where the target has FMA, e.g. aarch64; clang contracts within an expression). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "frame.h"

#include <math.h>
#include <stdlib.h>

#include "headkernel.h"

#define PW_BLOCKSIZE 128
#define LOGE2 0.693147180559945309417232121458176568
#define CLIP_EPS 1e-12 /* edge_quq.scores._EPS */

/* numpy's pairwise summation (numpy/_core/src/umath/loops_utils.h.src), for doubles and for floats: eight
 * accumulators per block of up to 128, blocks split in halves rounded to 8. */
#define EQ_PAIRWISE_SUM(NAME, T)                                                                                \
    static T NAME(const T *a, ptrdiff_t n) {                                                                    \
        if (n < 8) {                                                                                            \
            T res = (T)-0.0;                                                                                    \
            for (ptrdiff_t i = 0; i < n; ++i) res += a[i];                                                      \
            return res;                                                                                         \
        }                                                                                                       \
        if (n <= PW_BLOCKSIZE) {                                                                                \
            T r[8];                                                                                             \
            for (int j = 0; j < 8; ++j) r[j] = a[j];                                                            \
            ptrdiff_t i;                                                                                        \
            for (i = 8; i < n - (n % 8); i += 8)                                                                \
                for (int j = 0; j < 8; ++j) r[j] += a[i + j];                                                   \
            T res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));                          \
            for (; i < n; ++i) res += a[i];                                                                     \
            return res;                                                                                         \
        }                                                                                                       \
        ptrdiff_t n2 = n / 2;                                                                                   \
        n2 -= n2 % 8;                                                                                           \
        return NAME(a, n2) + NAME(a + n2, n - n2);                                                              \
    }
EQ_PAIRWISE_SUM(pairwise_d, double)
EQ_PAIRWISE_SUM(pairwise_f, float)

/* ndarray.sum of a contiguous row: the reduction starts from 0.0, then adds the pairwise sum */
double eq_pairwise_sum(const double *a, ptrdiff_t n) { return 0.0 + pairwise_d(a, n); }

static float sum_f(const float *a, ptrdiff_t n) { return 0.0f + pairwise_f(a, n); }

/* np.maximum / np.minimum: NaN propagates from either side */
static double max_nan(double a, double b) { return (a != a || a >= b) ? a : b; }
static double min_nan(double a, double b) { return (a != a || a <= b) ? a : b; }
static float minf_nan(float a, float b) { return (a != a || a <= b) ? a : b; }
static float maxf_nan(float a, float b) { return (a != a || a >= b) ? a : b; }

static double clip01(double x) { return min_nan(max_nan(x, CLIP_EPS), 1.0); }

/* numpy's npy_logaddexp(0, z) */
static double softplus(double z) {
    if (z == 0.0) return LOGE2;
    const double tmp = 0.0 - z;
    if (tmp > 0) return 0.0 + log1p(exp(-tmp));
    if (tmp <= 0) return z + log1p(exp(tmp));
    return tmp;
}

/* one row's scores; w: C doubles of work space */
static void row_scores(ptrdiff_t C, const double *mean, const double *std, const float *l32, const double *l64,
                       double ee, int act, double *w, double *s) {
    double mx = mean[0];
    for (ptrdiff_t c = 1; c < C; ++c) mx = max_nan(mx, mean[c]);
    s[EQ_SCORE_MAX_PROB] = mx;
    for (ptrdiff_t c = 0; c < C; ++c) {
        const double pc = clip01(mean[c]);
        w[c] = pc * log(pc);
        if (act != EQ_ACT_SOFTMAX) {
            const double qc = clip01(1.0 - mean[c]);
            w[c] = w[c] + qc * log(qc);
        }
    }
    const double pe = -eq_pairwise_sum(w, C);
    s[EQ_SCORE_ENTROPY] = pe;
    s[EQ_SCORE_MUTUAL_INFO] = max_nan(pe - ee, 0.0);
    for (ptrdiff_t c = 0; c < C; ++c) w[c] = std[c] * std[c];
    s[EQ_SCORE_MEAN_VARIANCE] = eq_pairwise_sum(w, C) / (double)C;
    s[EQ_SCORE_ENERGY] = NAN;
    if (act == EQ_ACT_SIGMOID) {
        for (ptrdiff_t c = 0; c < C; ++c) w[c] = softplus(l32 ? (double)l32[c] : l64[c]);
        s[EQ_SCORE_ENERGY] = -eq_pairwise_sum(w, C);
    } else if (act == EQ_ACT_SOFTMAX) {
        double m = l32 ? (double)l32[0] : l64[0];
        for (ptrdiff_t c = 1; c < C; ++c) m = max_nan(m, l32 ? (double)l32[c] : l64[c]);
        for (ptrdiff_t c = 0; c < C; ++c) w[c] = exp((l32 ? (double)l32[c] : l64[c]) - m);
        s[EQ_SCORE_ENERGY] = -(m + log(eq_pairwise_sum(w, C)));
    }
}

int eq_moment_scores(ptrdiff_t N, ptrdiff_t C, const double *mean, const double *std, const float *logits32,
                     const double *logits64, const double *expected_entropy, int act, double *out) {
    double *w = malloc((size_t)(C > 0 ? C : 1) * sizeof *w);
    if (!w) return -1;
    for (ptrdiff_t i = 0; i < N; ++i) {
        double s[EQ_NUM_SCORES];
        row_scores(C, mean + i * C, std + i * C, logits32 ? logits32 + i * C : NULL,
                   logits64 ? logits64 + i * C : NULL, expected_entropy[i], act, w, s);
        for (int k = 0; k < EQ_NUM_SCORES; ++k) out[k * N + i] = s[k];
    }
    free(w);
    return 0;
}

/* Rule code per (any PRESENT, uncertain count clipped at 2), as decision._CODES; codes 0, 2, 5 keep. */
static const int8_t RULE_CODE[2][2][3] = {{{1, 2, 3}, {0, 4, 4}}, {{1, 2, 3}, {0, 5, 5}}};

/* numpy's argmax: the first maximum; the first NaN wins */
static ptrdiff_t argmax_masked(ptrdiff_t C, const double *mean, const uint8_t *kept) {
    double mp = kept[0] ? mean[0] : -INFINITY;
    ptrdiff_t best = 0;
    if (mp != mp) return 0;
    for (ptrdiff_t c = 1; c < C; ++c) {
        const double v = kept[c] ? mean[c] : -INFINITY;
        if (!(v <= mp)) {
            mp = v;
            best = c;
            if (mp != mp) break;
        }
    }
    return best;
}

void eq_interval_decide(ptrdiff_t N, ptrdiff_t C, const double *mean, const double *std, double z, double threshold,
                        int mixed_keep, double *lower, double *upper, int8_t *states, int8_t *code, uint8_t *keep,
                        uint8_t *kept, int64_t *labels) {
    for (ptrdiff_t i = 0; i < N; ++i) {
        const ptrdiff_t o = i * C;
        int any_pos = 0, n_unc = 0;
        for (ptrdiff_t c = 0; c < C; ++c) {
            const double t = z * std[o + c];
            const double lo = mean[o + c] - t, hi = mean[o + c] + t;
            lower[o + c] = lo;
            upper[o + c] = hi;
            /* upper below the threshold wins should both hold (decision._interval_states) */
            const int8_t s = hi < threshold ? 0 : (lo > threshold ? 1 : -1);
            states[o + c] = s;
            any_pos |= s == 1;
            n_unc += s == -1;
        }
        const int8_t k = RULE_CODE[mixed_keep != 0][any_pos][n_unc < 2 ? n_unc : 2];
        const int keeps = k == 0 || k == 2 || k == 5;
        code[i] = k;
        keep[i] = (uint8_t)keeps;
        const int8_t want = k == 2 ? -1 : 1; /* benefit of the doubt keeps the single uncertain class */
        for (ptrdiff_t c = 0; c < C; ++c) kept[o + c] = (uint8_t)(keeps && states[o + c] == want);
        labels[i] = keeps ? (int64_t)argmax_masked(C, mean + o, kept + o) : -1;
    }
}

int eq_mahalanobis(ptrdiff_t N, ptrdiff_t F, ptrdiff_t C, const float *z, const float *center, const float *means2,
                   const float *msq, const float *center0, const float *between, ptrdiff_t R, double *d, double *rel) {
    const ptrdiff_t K = center0 ? 2 * F : F, step = center0 ? 2 : 1, Cm = between ? C + 1 : C;
    float *zc = malloc((size_t)(2 * F + Cm + 2 * R + 1) * sizeof *zc);
    if (!zc) return -1;
    float *sq = zc + F, *dot = sq + F + R, *u = dot + Cm; /* sq: F squares, or R */
    for (ptrdiff_t i = 0; i < N; ++i) {
        const float *zi = z + i * K;
        for (ptrdiff_t f = 0; f < F; ++f) {
            zc[f] = zi[f * step] - center[f];
            sq[f] = zc[f] * zc[f];
        }
        const float q = sum_f(sq, F);
        for (ptrdiff_t c = 0; c < Cm; ++c) dot[c] = 0.0f;
        for (ptrdiff_t f = 0; f < F; ++f) { /* row-major means2: the inner loop is contiguous and vectorises */
            const float a = zc[f], *m = means2 + f * Cm;
            for (ptrdiff_t c = 0; c < Cm; ++c) dot[c] += a * m[c];
        }
        float best = (q - dot[0]) + msq[0];
        for (ptrdiff_t c = 1; c < C; ++c) best = minf_nan(best, (q - dot[c]) + msq[c]);
        best = maxf_nan(best, 0.0f);
        d[i] = (double)best;
        if (center0) {
            for (ptrdiff_t f = 0; f < F; ++f) {
                const float g = zi[2 * f + 1] - center0[f];
                sq[f] = g * g;
            }
            rel[i] = (double)(best - sum_f(sq, F));
        } else if (between) {
            /* |z - m_c|^2 - |z - m0|^2 without |z|^2, which would cancel; then the between-class part */
            float e = msq[0] - dot[0];
            for (ptrdiff_t c = 1; c < C; ++c) e = minf_nan(e, msq[c] - dot[c]);
            e -= msq[C] - dot[C];
            for (ptrdiff_t r = 0; r < R; ++r) u[r] = between[F * R + r];
            for (ptrdiff_t f = 0; f < F; ++f) {
                const float a = zc[f], *b = between + f * R;
                for (ptrdiff_t r = 0; r < R; ++r) u[r] += a * b[r];
            }
            for (ptrdiff_t r = 0; r < R; ++r) sq[r] = u[r] * u[r];
            rel[i] = (double)(e + sum_f(sq, R));
        }
    }
    free(zc);
    return 0;
}
