/* Closed-form MC-dropout moments of the 2-block head in C: edge_quq.analytic (the numpy reference) for the
 * canonical head, fused so that W0 and W1 are each read once.
 *
 * The numpy version spends its 0.5-0.6 ms on ~100 small array operations, not on arithmetic. Here:
 *  - one pass over W0 computes the mean (x.W0) and the variance (v.W0^2) of the hidden pre-activations at once,
 *    with float32 products and sums like the reference's float32 matrix products; x.W0 + b0 is also the
 *    eval-mode pre-activation; one pass over W1 likewise gives the logits' mean, variance and eval-mode value;
 *  - the rectified-Gaussian, probit and quadrature steps are the reference's formulas (same erf approximation,
 *    same Gauss-Legendre/Gauss-Hermite nodes), in double;
 *  - softmax's leave-one-out log-sum-exp uses the sums over all classes minus class c (O(C) instead of O(C^2));
 *    the top class, for which that difference could cancel, is summed directly.
 * The binary entropy of sigmoid(a) is log1p(e) + |a| e / (1 + e), e = exp(-|a|): one exp and one log per node,
 * equal to the reference's clipped form up to 3e-11 per term. The quadrature nodes' exp/sin/log run in float
 * (sums in double): they were most of the time in double, and cost ~1e-7 relative; with AVX2 they run 8 classes
 * at a time (eq_sigmoid_moments8), which with 1000 classes more than halved their time. */
#include "headkernel.h"
#include "simd_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const double EQ_GL_X[20] = {
    -0.993128599185095, -0.9639719272779138, -0.912234428251326, -0.8391169718222188, -0.7463319064601508,
    -0.636053680726515, -0.5108670019508271, -0.37370608871541955, -0.22778585114164507, -0.07652652113349734,
    0.07652652113349734, 0.22778585114164507, 0.37370608871541955, 0.5108670019508271, 0.636053680726515,
    0.7463319064601508, 0.8391169718222188, 0.912234428251326, 0.9639719272779138, 0.993128599185095};
static const double EQ_GL_W[20] = {
    0.017614007139150893, 0.040601429800386446, 0.06267204833410879, 0.08327674157670471, 0.1019301198172407,
    0.1181945319615186, 0.1316886384491769, 0.1420961093183824, 0.14917298647260424, 0.15275338713072628,
    0.15275338713072628, 0.14917298647260424, 0.1420961093183824, 0.1316886384491769, 0.1181945319615186,
    0.1019301198172407, 0.08327674157670471, 0.06267204833410879, 0.040601429800386446, 0.017614007139150893};
static const double EQ_GH_X[32] = {
    -7.125813909830728, -6.409498149269661, -5.812225949515914, -5.2755509865158805, -4.777164503502596,
    -4.305547953351199, -3.853755485471445, -3.417167492818571, -2.992490825002374, -2.5772495377323175,
    -2.169499183606112, -1.7676541094632015, -1.3703764109528718, -0.9765004635896828, -0.5849787654359324,
    -0.19484074156939934, 0.19484074156939934, 0.5849787654359324, 0.9765004635896828, 1.3703764109528718,
    1.7676541094632015, 2.169499183606112, 2.5772495377323175, 2.992490825002374, 3.417167492818571,
    3.853755485471445, 4.305547953351199, 4.777164503502596, 5.2755509865158805, 5.812225949515914,
    6.409498149269661, 7.125813909830728};
static const double EQ_GH_W[32] = {
    7.310676427384096e-23, 9.231736536518258e-19, 1.1973440170928503e-15, 4.2150102113264155e-13,
    5.933291463396676e-11, 4.098832164770879e-09, 1.5741677925455882e-07, 3.650585129562378e-06,
    5.416584061819991e-05, 0.000536268365527972, 0.003654890326654426, 0.017553428831573438, 0.06045813095591269,
    0.15126973407664232, 0.27745814230252996, 0.37523835259280247, 0.37523835259280247, 0.27745814230252996,
    0.15126973407664232, 0.06045813095591269, 0.017553428831573438, 0.003654890326654426, 0.000536268365527972,
    5.416584061819991e-05, 3.650585129562378e-06, 1.5741677925455882e-07, 4.098832164770879e-09,
    5.933291463396676e-11, 4.2150102113264155e-13, 1.1973440170928503e-15, 9.231736536518258e-19,
    7.310676427384096e-23};

static const double EQ_LAMBDA2 = (1.0 / 1.702) * (1.0 / 1.702);
static const double EQ_PI = 3.14159265358979323846;

/* edge_quq.analytic.erf: Numerical Recipes' erfc fit, |error| < 1.2e-7, so that both sides agree closely. */
static double eq_erf(double x) {
    const double z = fabs(x), t = 1.0 / (1.0 + 0.5 * z);
    const double poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    const double erfc = t * exp(poly);
    return x >= 0 ? 1.0 - erfc : erfc - 1.0;
}

static double eq_norm_cdf(double x) { return 0.5 * (1.0 + eq_erf(x / sqrt(2.0))); }
static double eq_sigmoid(double x) { return 0.5 * (1.0 + tanh(0.5 * x)); }

/* Mean and variance of max(0, z), z ~ N(mu, var). */
static void eq_relu_moments(double mu, double var, double *mean, double *v) {
    const double s = sqrt(var > 0.0 ? var : 0.0);
    if (!(s > 0.0)) {
        *mean = mu > 0.0 ? mu : 0.0;
        *v = 0.0;
        return;
    }
    const double a = mu / s, cdf = eq_norm_cdf(a), pdf = exp(-0.5 * a * a) / sqrt(2.0 * EQ_PI);
    *mean = mu * cdf + s * pdf;
    const double d = (mu * mu + var) * cdf + mu * s * pdf - *mean * *mean;
    *v = d > 0.0 ? d : 0.0;
}

#if defined(__x86_64__) || defined(_M_X64)
#define EQ_ANALYTIC_AVX2 1

/* asin(x) for x in [0, 1] (Cephes' asinf, ~1e-7). */
EQ_AVX2 static inline __m256 eq_avx_asin01(__m256 x) {
    const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(0.5f), _CMP_GT_OQ);
    const __m256 zb = _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_sub_ps(_mm256_set1_ps(1.0f), x));
    const __m256 z = _mm256_blendv_ps(_mm256_mul_ps(x, x), zb, big), r = _mm256_blendv_ps(x, _mm256_sqrt_ps(zb), big);
    __m256 p = _mm256_set1_ps(4.2163199048e-2f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.4181311049e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(4.5470025998e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(7.4953002686e-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.6666752422e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, z), r, r);
    const __m256 pb = _mm256_sub_ps(_mm256_set1_ps(1.57079632679489661923f), _mm256_add_ps(p, p));
    return _mm256_blendv_ps(p, pb, big);
}

/* eq_probit_moments and eq_gh_entropy for 8 classes at once, in float (the scalar versions run the quadrature
 * nodes in float too): with C = 1000 the per-class quadratures were most of the closed form's time. */
EQ_AVX2 static void eq_sigmoid_moments8(const double *mu, const double *var, int plogp, double *mean, double *v,
                                        double *ent) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    const __m256 m8 = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(mu + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(mu)));
    const __m256 v8 = _mm256_max_ps(zero, _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(var + 4)),
                                                          _mm256_cvtpd_ps(_mm256_loadu_pd(var))));
    const __m256 lv = _mm256_mul_ps(_mm256_set1_ps((float)EQ_LAMBDA2), v8), u = _mm256_add_ps(one, lv);
    const __m256 h = _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps((float)sqrt(EQ_LAMBDA2)), m8), _mm256_sqrt_ps(u));
    const __m256 upper = eq_avx_asin01(_mm256_min_ps(one, _mm256_div_ps(lv, u)));
    const __m256 a = _mm256_div_ps(m8, _mm256_sqrt_ps(_mm256_fmadd_ps(_mm256_set1_ps((float)(EQ_PI / 8.0)), v8, one)));
    const __m256 mn = _mm256_div_ps(one, _mm256_add_ps(one, eq_avx_exp(_mm256_xor_ps(a, sign))));
    const __m256 nhh = _mm256_xor_ps(_mm256_mul_ps(h, h), sign), half = _mm256_mul_ps(_mm256_set1_ps(0.5f), upper);
    __m256 gl = zero;
    for (int k = 0; k < 20; ++k) {
        const __m256 sn = eq_avx_sin_half_pi(_mm256_mul_ps(half, _mm256_set1_ps((float)EQ_GL_X[k] + 1.0f)));
        gl = _mm256_fmadd_ps(_mm256_set1_ps((float)EQ_GL_W[k]), eq_avx_exp(_mm256_div_ps(nhh, _mm256_add_ps(one, sn))), gl);
    }
    const __m256 var_out = _mm256_max_ps(zero, _mm256_mul_ps(_mm256_mul_ps(half, gl), _mm256_set1_ps((float)(0.5 / EQ_PI))));
    const __m256 sc = _mm256_sqrt_ps(_mm256_add_ps(v8, v8));
    __m256 gh = zero;
    for (int k = 0; k < 32; ++k) {
        const __m256 x = _mm256_fmadd_ps(sc, _mm256_set1_ps((float)EQ_GH_X[k]), m8), m = _mm256_andnot_ps(sign, x);
        const __m256 e = eq_avx_exp(_mm256_xor_ps(m, sign)), p = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 l = eq_avx_log1p01(e), ep = _mm256_mul_ps(e, p);
        /* -p log p of sigmoid(x): x >= 0: p l; x < 0: e p (l + m). Binary entropy: l + m e p. */
        const __m256 f = plogp ? _mm256_blendv_ps(_mm256_mul_ps(p, l), _mm256_mul_ps(ep, _mm256_add_ps(l, m)), x)
                               : _mm256_fmadd_ps(m, ep, l);
        gh = _mm256_fmadd_ps(_mm256_set1_ps((float)EQ_GH_W[k]), f, gh);
    }
    float fm[8], fv[8], fe[8];
    _mm256_storeu_ps(fm, mn), _mm256_storeu_ps(fv, var_out), _mm256_storeu_ps(fe, gh);
    double e = 0.0;
    for (int c = 0; c < 8; ++c) mean[c] = fm[c], v[c] = fv[c], e += fe[c];
    *ent = e / sqrt(EQ_PI);
}
#endif

/* Classes go 8 at a time through eq_sigmoid_moments8 where AVX2 is there, the rest one by one. */
static int eq_quad_avx2(void) {
#ifdef EQ_ANALYTIC_AVX2
    return eq_kernels_find("avx2_fma") != NULL;
#else
    return 0;
#endif
}

/* E and Var of sigmoid(a), a ~ N(mu, var): MacKay's mean, bivariate-probit variance by Gauss-Legendre. */
static void eq_probit_moments(double mu, double var, double *mean, double *v) {
    const double vv = var > 0.0 ? var : 0.0, lv = EQ_LAMBDA2 * vv;
    const double h = sqrt(EQ_LAMBDA2) * mu / sqrt(1.0 + lv), rho = lv / (1.0 + lv);
    *mean = eq_sigmoid(mu / sqrt(1.0 + (EQ_PI / 8.0) * vv));
    const double upper = asin(rho < 0.0 ? 0.0 : (rho > 1.0 ? 1.0 : rho));
    double sum = 0.0;
    /* float sin/exp per node (double ones were most of the run time): relative error ~1e-7 on a variance. */
    const float hh = (float)(h * h), half = (float)(0.5 * upper);
    for (int k = 0; k < 20; ++k)
        sum += EQ_GL_W[k] * (double)expf(-hh / (1.0f + sinf(half * ((float)EQ_GL_X[k] + 1.0f))));
    const double extra = 0.5 * upper * sum / (2.0 * EQ_PI);
    *v = extra > 0.0 ? extra : 0.0;
}

/* E[f(sigmoid(a))], a ~ N(mu, var), by 32-point Gauss-Hermite; f = binary entropy (plogp = 0) or -p log p. */
static double eq_gh_entropy(double mu, double var, int plogp) {
    const double sc = sqrt(2.0 * (var > 0.0 ? var : 0.0));
    double sum = 0.0;
    for (int k = 0; k < 32; ++k) {
        const double a = mu + sc * EQ_GH_X[k], m = fabs(a);
        const float ef = expf((float)-m);
        const double e = ef, p = 1.0 / (1.0 + e);
        /* log1p(e) in float without a branch: log(u) * e / (u - 1), u = 1 + e rounded (exact to float rounding). */
        const float u = 1.0f + ef, lf = logf(u), l1 = u == 1.0f ? ef : lf * (ef / (u - 1.0f));
        const double l = l1;
        /* -p log p of sigmoid(a): (a >= 0 ? p : e p) * (a >= 0 ? l : l + m) */
        const double f = plogp ? (a >= 0.0 ? p * l : e * p * (l + m)) : l + m * e * p;
        sum += EQ_GH_W[k] * f;
    }
    return sum / sqrt(EQ_PI);
}

static double eq_binary_entropy(double p) {
    const double a = p < 1e-12 ? 1e-12 : (p > 1.0 ? 1.0 : p), q0 = 1.0 - p, q = q0 < 1e-12 ? 1e-12 : (q0 > 1.0 ? 1.0 : q0);
    return -(a * log(a) + q * log(q));
}

/* Softmax: class c's probability is sigmoid(mu_c - LSE_{j != c}); d_mu, d_var as edge_quq.analytic. */
static void eq_softmax_d(const double *mu, const double *var, int C, double *d_mu, double *d_var) {
    int top = 0;
    for (int c = 1; c < C; ++c) top = mu[c] > mu[top] ? c : top;
    double S = 0.0, A = 0.0, B = 0.0;
    for (int j = 0; j < C; ++j) {
        const double e = exp(mu[j] - mu[top]);
        S += e, A += e * var[j], B += e * e * var[j];
    }
    for (int c = 0; c < C; ++c) {
        double m = mu[top], s, a, b;
        if (c != top) {
            const double e = exp(mu[c] - m);
            s = S - e, a = A - e * var[c], b = B - e * e * var[c];
        } else {
            int t2 = c == 0 ? 1 : 0;
            for (int j = 0; j < C; ++j) t2 = j != c && mu[j] > mu[t2] ? j : t2;
            m = mu[t2], s = a = b = 0.0;
            for (int j = 0; j < C; ++j) {
                if (j == c) continue;
                const double e = exp(mu[j] - m);
                s += e, a += e * var[j], b += e * e * var[j];
            }
        }
        const double sw = a / s, sw2 = b / (s * s);
        d_mu[c] = mu[c] - (m + log(s) + 0.5 * (sw - sw2));
        d_var[c] = var[c] + sw2;
    }
}

/* mu, var: the logits' moments; d_mu, d_var: scratch [C] (softmax's per-class sigmoid arguments). */
static double eq_output_moments(int act, int C, const double *mu, const double *var, double *d_mu, double *d_var,
                                double *mean, double *std) {
    double ent = 0.0;
    if (act == EQ_ACT_SOFTMAX && C == 1) {
        mean[0] = 1.0, std[0] = 0.0;
        return 0.0;
    }
    if (act == EQ_ACT_SOFTMAX) {
        eq_softmax_d(mu, var, C, d_mu, d_var);
        mu = d_mu, var = d_var;
    }
    if (act == EQ_ACT_LINEAR) {
        for (int c = 0; c < C; ++c) {
            mean[c] = mu[c], std[c] = sqrt(var[c] > 0.0 ? var[c] : 0.0);
            ent += eq_binary_entropy(mu[c]);
        }
        return ent;
    }
    double total = 0.0, v;
    int c = 0;
#ifdef EQ_ANALYTIC_AVX2
    if (eq_quad_avx2())
        for (; c + 8 <= C; c += 8) {
            double e8;
            eq_sigmoid_moments8(mu + c, var + c, act == EQ_ACT_SOFTMAX, mean + c, std + c, &e8);
            ent += e8;
            for (int k = c; k < c + 8; ++k) std[k] = sqrt(std[k]), total += mean[k];
        }
#endif
    for (; c < C; ++c) {
        eq_probit_moments(mu[c], var[c], &mean[c], &v);
        std[c] = sqrt(v);
        total += mean[c];
        ent += eq_gh_entropy(mu[c], var[c], act == EQ_ACT_SOFTMAX);
    }
    if (act == EQ_ACT_SOFTMAX)
        for (int c = 0; c < C; ++c) mean[c] /= total;
    return ent;
}

/* y += m.W, yv += v.W^2 when v is given, and y2 += m2.W when m2 is given (the eval-mode lane), over the rows of
 * W [n_in, n]: a dense layer's mean, variance and eval output in one pass over W (W1 of a 1000-class head is
 * 1.2 MB, beyond L2: reading it once instead of twice is a third of the closed form's time there). */
static void eq_mean_var_plain(int n_in, int n, const float *w, const float *m, const float *v, float *restrict y,
                              float *restrict yv, const float *m2, float *restrict y2) {
    for (int i = 0; i < n_in; ++i) {
        const float mi = m[i], vi = v ? v[i] : 0.0f, ei = m2 ? m2[i] : 0.0f;
        const float *restrict wr = w + (size_t)i * n;
        if (vi != 0.0f)
            for (int j = 0; j < n; ++j) {
                y[j] += mi * wr[j];
                yv[j] += vi * (wr[j] * wr[j]);
            }
        else if (mi != 0.0f)
            for (int j = 0; j < n; ++j) y[j] += mi * wr[j];
        if (ei != 0.0f)
            for (int j = 0; j < n; ++j) y2[j] += ei * wr[j];
    }
}

#if defined(__x86_64__) || defined(_M_X64)
/* Register-blocked: NV vectors of each output stay in registers while the block walks every active row, so a
 * row costs its weight loads and FMAs only (the plain loop loads and stores the outputs for every row, and is
 * bound by the stores). Columns past the last whole vector go through a scalar loop. */
#define EQ_MV_BLOCK(NV, VAR, EV)                                                                               \
    for (; j + 8 * (NV) <= n8; j += 8 * (NV)) {                                                                \
        __m256 a[NV], b[NV], e[NV];                                                                            \
        for (int u = 0; u < (NV); ++u) {                                                                       \
            a[u] = _mm256_loadu_ps(y + j + 8 * u);                                                             \
            if (VAR) b[u] = _mm256_loadu_ps(yv + j + 8 * u);                                                   \
            if (EV) e[u] = _mm256_loadu_ps(y2 + j + 8 * u);                                                    \
        }                                                                                                      \
        for (int k = k0; k < k1; ++k) {                                                                        \
            const float *wr = w + (size_t)idx[k] * (size_t)n + j;                                              \
            const __m256 mm = _mm256_set1_ps(m[idx[k]]);                                                       \
            const __m256 vv = _mm256_set1_ps(VAR ? v[idx[k]] : 0.0f), ee = _mm256_set1_ps(EV ? m2[idx[k]] : 0.0f); \
            for (int u = 0; u < (NV); ++u) {                                                                   \
                const __m256 wv = _mm256_loadu_ps(wr + 8 * u);                                                 \
                a[u] = _mm256_fmadd_ps(mm, wv, a[u]);                                                          \
                if (VAR) b[u] = _mm256_fmadd_ps(_mm256_mul_ps(vv, wv), wv, b[u]);                              \
                if (EV) e[u] = _mm256_fmadd_ps(ee, wv, e[u]);                                                  \
            }                                                                                                  \
        }                                                                                                      \
        for (int u = 0; u < (NV); ++u) {                                                                       \
            _mm256_storeu_ps(y + j + 8 * u, a[u]);                                                             \
            if (VAR) _mm256_storeu_ps(yv + j + 8 * u, b[u]);                                                   \
            if (EV) _mm256_storeu_ps(y2 + j + 8 * u, e[u]);                                                    \
        }                                                                                                      \
    }

#ifndef EQ_MV_ROWS
#define EQ_MV_ROWS 128
#endif

__attribute__((target("avx2,fma"))) static void eq_mean_var_avx2(int n_in, int n, const float *w, const float *m,
                                                                  const float *v, float *y, float *yv,
                                                                  const float *m2, float *y2) {
    int32_t stack_idx[2048], *idx = n_in <= 2048 ? stack_idx : (int32_t *)malloc((size_t)n_in * sizeof(int32_t));
    if (!idx) {
        eq_mean_var_plain(n_in, n, w, m, v, y, yv, m2, y2);
        return;
    }
    int na = 0;
    for (int i = 0; i < n_in; ++i) idx[na] = i, na += m[i] != 0.0f || (v && v[i] != 0.0f) || (m2 && m2[i] != 0.0f);
    const int n8 = n & ~7;
    /* Row blocks of EQ_MV_ROWS, so that W streams from memory in row order once while the column blocks reuse
     * the block's rows from L2. */
    for (int k0 = 0; k0 < na; k0 += EQ_MV_ROWS) {
        const int k1 = na - k0 < EQ_MV_ROWS ? na : k0 + EQ_MV_ROWS;
        int j = 0;
        if (v && m2) {
            EQ_MV_BLOCK(4, 1, 1)
            EQ_MV_BLOCK(1, 1, 1)
        } else if (v) {
            EQ_MV_BLOCK(6, 1, 0)
            EQ_MV_BLOCK(1, 1, 0)
        } else {
            EQ_MV_BLOCK(12, 0, 0)
            EQ_MV_BLOCK(1, 0, 0)
        }
    }
    for (int k = 0; k < na; ++k) {
        const int i = idx[k];
        const float *wr = w + (size_t)i * (size_t)n;
        for (int jj = n8; jj < n; ++jj) {
            y[jj] += m[i] * wr[jj];
            if (v) yv[jj] += v[i] * (wr[jj] * wr[jj]);
            if (m2) y2[jj] += m2[i] * wr[jj];
        }
    }
    if (idx != stack_idx) free(idx);
}
#endif

static void eq_mean_var(int n_in, int n, const float *w, const float *m, const float *v, float *y, float *yv,
                        const float *m2, float *y2) {
#if defined(__x86_64__) || defined(_M_X64)
    if (eq_kernels_find("avx2_fma")) {
        eq_mean_var_avx2(n_in, n, w, m, v, y, yv, m2, y2);
        return;
    }
#endif
    eq_mean_var_plain(n_in, n, w, m, v, y, yv, m2, y2);
}

/* Inverted dropout of independent inputs: exact moments, handed to the next layer in float32 like the reference. */
static void eq_dropout(const double *m, const double *v, int n, double p, float *mf, float *vf) {
    const double a = p > 0.0 ? 1.0 / (1.0 - p) : 1.0, b = p > 0.0 ? p / (1.0 - p) : 0.0;
    for (int i = 0; i < n; ++i) mf[i] = (float)m[i], vf[i] = (float)((v ? v[i] * a : 0.0) + m[i] * m[i] * b);
}

int eq_head_analytic(const eq_head_t *hd, double temperature, eq_moments_t *out) {
    const int F = hd->F, H = hd->H, C = hd->C;
    float *fm = (float *)calloc(2 * (size_t)F + 5 * (size_t)H + 2 * (size_t)C, sizeof(float));
    double *dm = (double *)malloc(((size_t)F + 2 * (size_t)H + 4 * (size_t)C) * sizeof(double));
    if (!fm || !dm) {
        free(fm), free(dm);
        return -1;
    }
    float *mf = fm, *vf = mf + F, *z = vf + F, *zv = z + H, *he = zv + H, *hmf = he + H, *hvf = hmf + H, *y = hvf + H,
          *yv = y + C;
    double *m0 = dm, *hm = m0 + F, *hvar = hm + H, *mu = hvar + H, *var = mu + C, *dmu = var + C, *dvar = dmu + C;
    for (int i = 0; i < F; ++i) m0[i] = hd->x[i];
    /* Block 1: dropout of a fixed vector (no variance in), then the dense layer. x.W0 + b0 in float32 is also the
     * eval-mode pre-activation of edge_quq.head.HeadWeights.logits. */
    eq_dropout(m0, NULL, F, hd->p0, mf, vf);
    eq_mean_var(F, H, hd->w0, mf, vf, z, zv, NULL, NULL);
    for (int j = 0; j < H; ++j) {
        const float pre = z[j] + hd->b0[j];
        he[j] = pre > 0.0f ? pre : 0.0f;
        eq_relu_moments((double)z[j] + (double)hd->b0[j], (double)zv[j], &hm[j], &hvar[j]);
    }
    /* Block 2, and the eval-mode logits in the same pass over W1. */
    memcpy(out->det_logits, hd->b1, (size_t)C * sizeof(float));
    eq_dropout(hm, hvar, H, hd->p1, hmf, hvf);
    eq_mean_var(H, C, hd->w1, hmf, hvf, y, yv, he, out->det_logits);
    for (int c = 0; c < C; ++c) {
        mu[c] = ((double)y[c] + (double)hd->b1[c]) / temperature;
        var[c] = (double)yv[c] / (temperature * temperature);
    }
    out->expected_entropy = eq_output_moments(hd->act, C, mu, var, dmu, dvar, out->mean, out->std);
    out->macs = 2 * (uint64_t)F * (uint64_t)H + 3 * (uint64_t)H * (uint64_t)C;
    free(fm), free(dm);
    return 0;
}
