/* 8-wide float exp/log/sin for AVX2 (Cephes' polynomials), shared by headkernel.c and analytic.c. Internal. */
#ifndef EDGE_QUQ_SIMD_MATH_H
#define EDGE_QUQ_SIMD_MATH_H
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define EQ_AVX2 __attribute__((target("avx2,fma")))

/* exp and log for 8 floats (Cephes' polynomials, ~2 ulp over the ranges used here): with them the per-sample
 * outputs and entropies of a 1000-class head stop costing more than its multiply-adds. */
EQ_AVX2 static inline __m256 eq_avx_exp(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* log(x) for x in [1, 2] (log1p of e = exp(-|v|) in (0, 1]): no special cases needed. */
EQ_AVX2 static inline __m256 eq_avx_log12(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                   _mm256_set1_epi32(0x3F000000))); /* [0.5, 1) */
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
    const __m256 z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292e-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

/* sin(t) for t in [0, pi/2]: odd Taylor polynomial to t^11 (truncation < 6e-8 there). */
EQ_AVX2 static inline __m256 eq_avx_sin_half_pi(__m256 t) {
    const __m256 t2 = _mm256_mul_ps(t, t);
    __m256 y = _mm256_set1_ps(-2.5052108385e-8f);
    y = _mm256_fmadd_ps(y, t2, _mm256_set1_ps(2.7557319224e-6f));
    y = _mm256_fmadd_ps(y, t2, _mm256_set1_ps(-1.9841269841e-4f));
    y = _mm256_fmadd_ps(y, t2, _mm256_set1_ps(8.3333333333e-3f));
    y = _mm256_fmadd_ps(y, t2, _mm256_set1_ps(-1.6666666667e-1f));
    y = _mm256_fmadd_ps(y, t2, _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(y, t);
}

/* log1p(e) for e in [0, 1]: log(u) * e / (u - 1), u = 1 + e rounded (exact to rounding); e where u rounds to 1. */
EQ_AVX2 static inline __m256 eq_avx_log1p01(__m256 e) {
    const __m256 u = _mm256_add_ps(_mm256_set1_ps(1.0f), e), um1 = _mm256_sub_ps(u, _mm256_set1_ps(1.0f));
    const __m256 l = _mm256_mul_ps(eq_avx_log12(u), _mm256_div_ps(e, um1));
    return _mm256_blendv_ps(l, e, _mm256_cmp_ps(um1, _mm256_setzero_ps(), _CMP_EQ_OQ));
}

EQ_AVX2 static inline float eq_avx_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#endif
#endif
