/* The kNN and ViM detectors' products (see rowdot.h for the contract).
 *
 * Why native: at F = 1280 the kNN bank (1024 rows) and ViM's null space (640 rows) are 5 and 3.3 MiB as float32
 * (ViM's was cached as float64: 6.5), and numpy streams them through a matmul, then sorts the bank's 1024
 * similarities; with the Mahalanobis whitener beside them they do not stay in cache, and the frame is bound by
 * reading them. Here the bank is read as stored, int8 (a quarter of the bytes), each row once per block of rows,
 * and only the k best similarities are kept.
 * ViM's null space may be int8 too, one scale per row of nsT (each row is one dot product).
 * One kernel serves both: dots(x, W, M, F) -> M dot products, 4 rows of W at a time against one row x (which stays
 * in L1), float32, int8 or float16 W (int8 and float16 converted to float32 on load; the scale is applied by the
 * caller). float16 -> float32 is exact and the arithmetic after it is the float32 variant's in the same order, so
 * a float16 W gives bit-identical results to the same values widened to float32 beforehand, for half the bytes.
 */
#include "rowdot.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "whitener.h"

#if defined(__x86_64__) || defined(_M_X64)
#define EQ_RD_X86 1
#include <immintrin.h>
#define EQ_RD_AVX2 __attribute__((target("avx2,fma")))
#define EQ_RD_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#endif
#if defined(__aarch64__)
#define EQ_RD_ARM64 1
#include <arm_neon.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define EQ_RD_INLINE static inline __attribute__((always_inline))
#else
#define EQ_RD_INLINE static inline
#endif

/* out[m] = <x, W_m> for m < M, W [M, F] float32, int8 or float16 */
typedef void (*eq_dots_fn)(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out);

EQ_RD_INLINE size_t elem_size(int ty) { return ty == EQ_RD_I8 ? 1 : ty == EQ_RD_F16 ? 2 : 4; }

/* Row r of W [., F] of element type ty. */
EQ_RD_INLINE const void *row_at(const void *W, ptrdiff_t r, ptrdiff_t F, int ty) {
    return (const char *)W + (size_t)(r * F) * elem_size(ty);
}

/* Rows m .. m + 3 of W; past M the last row again (its results are dropped), so every group is 4 rows. */
EQ_RD_INLINE void rows4(const void *W, ptrdiff_t m, ptrdiff_t M, ptrdiff_t F, int ty, const void *w[4]) {
    for (int t = 0; t < 4; ++t) w[t] = row_at(W, m + t < M ? m + t : M - 1, F, ty);
}

/* IEEE binary16 -> float32, exact (every half is a float): normals and subnormals by scaling, inf and NaN kept. */
EQ_RD_INLINE float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0x1fu) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {  /* zero or subnormal: m * 2^-24, exact in float32 */
        const float v = (float)m * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

EQ_RD_INLINE float elem(const void *w, ptrdiff_t j, int ty) {
    if (ty == EQ_RD_I8) return (float)((const int8_t *)w)[j];
    if (ty == EQ_RD_F16) return half_to_float(((const uint16_t *)w)[j]);
    return ((const float *)w)[j];
}

/* the reference order: one row at a time, columns in order */
EQ_RD_INLINE void dots__scalar(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out, int ty) {
    for (ptrdiff_t m = 0; m < M; ++m) {
        const void *w = row_at(W, m, F, ty);
        float s = 0.0f;
        for (ptrdiff_t j = 0; j < F; ++j) s += x[j] * elem(w, j, ty);
        out[m] = s;
    }
}

static void dots_f32__scalar(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__scalar(x, W, M, F, out, EQ_RD_F32);
}

static void dots_i8__scalar(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__scalar(x, W, M, F, out, EQ_RD_I8);
}

static void dots_f16__scalar(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__scalar(x, W, M, F, out, EQ_RD_F16);
}

/* The columns past the last full vector, for 4 rows. */
EQ_RD_INLINE void tail4(const float *x, const void *w[4], ptrdiff_t j, ptrdiff_t F, int ty, float s[4]) {
    for (; j < F; ++j)
        for (int t = 0; t < 4; ++t) s[t] += x[j] * elem(w[t], j, ty);
}

EQ_RD_INLINE void store4(float *out, ptrdiff_t m, ptrdiff_t M, const float s[4]) {
    for (int t = 0; t < 4 && m + t < M; ++t) out[m + t] = s[t];
}

#ifdef EQ_RD_X86
EQ_RD_AVX2 EQ_RD_INLINE __m256 load8__avx2(const void *w, ptrdiff_t j, int ty) {
    if (ty == EQ_RD_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + j))));
    return _mm256_loadu_ps((const float *)w + j);
}

EQ_RD_AVX2 EQ_RD_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* columns j .. j + 7 of a float16 row, widened (F16C: a separate target, so the float32 and int8 paths do not need it) */
EQ_RD_AVX2_F16C EQ_RD_INLINE __m256 load8f16__avx2(const void *w, ptrdiff_t j, int ty) {
    (void)ty;
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + j)));
}

/* One body for both targets (a function with the avx2,fma target cannot inline F16C's conversion): LOAD8 is
 * load8__avx2 or load8f16__avx2, the accumulation the same, so a float16 row sums as its float32 widening does. */
#define EQ_RD_DOTS_AVX2(LOAD8)                                                                            \
    for (ptrdiff_t m = 0; m < M; m += 4) {                                                                \
        const void *w[4];                                                                                 \
        rows4(W, m, M, F, ty, w);                                                                         \
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        ptrdiff_t j = 0;                                                                                  \
        for (; j + 8 <= F; j += 8) {                                                                      \
            const __m256 xv = _mm256_loadu_ps(x + j);                                                     \
            for (int t = 0; t < 4; ++t) a[t] = _mm256_fmadd_ps(xv, LOAD8(w[t], j, ty), a[t]);             \
        }                                                                                                 \
        float s[4] = {hsum8(a[0]), hsum8(a[1]), hsum8(a[2]), hsum8(a[3])};                                \
        tail4(x, w, j, F, ty, s);                                                                         \
        store4(out, m, M, s);                                                                             \
    }

EQ_RD_AVX2 EQ_RD_INLINE void dots__avx2(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out,
                                        int ty) {
    EQ_RD_DOTS_AVX2(load8__avx2)
}

EQ_RD_AVX2 static void dots_f32__avx2_fma(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__avx2(x, W, M, F, out, EQ_RD_F32);
}

EQ_RD_AVX2 static void dots_i8__avx2_fma(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__avx2(x, W, M, F, out, EQ_RD_I8);
}

EQ_RD_AVX2_F16C static void dots_f16__avx2_fma(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    const int ty = EQ_RD_F16;
    EQ_RD_DOTS_AVX2(load8f16__avx2)
}
#endif

#ifdef EQ_RD_ARM64
/* columns j .. j + 7 as two float32x4 */
EQ_RD_INLINE void load8__neon(const void *w, ptrdiff_t j, int ty, float32x4_t v[2]) {
    if (ty == EQ_RD_F16) {  /* vcvt_f32_f16: ARMv8.0, every aarch64 core */
        const uint16_t *h = (const uint16_t *)w + j;
        v[0] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
        v[1] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + 4)));
    } else if (ty == EQ_RD_I8) {
        const int16x8_t h = vmovl_s8(vld1_s8((const int8_t *)w + j));
        v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
        v[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(h)));
    } else {
        v[0] = vld1q_f32((const float *)w + j);
        v[1] = vld1q_f32((const float *)w + j + 4);
    }
}

EQ_RD_INLINE void dots__neon(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out, int ty) {
    for (ptrdiff_t m = 0; m < M; m += 4) {
        const void *w[4];
        rows4(W, m, M, F, ty, w);
        float32x4_t a[4][2];
        for (int t = 0; t < 4; ++t) a[t][0] = a[t][1] = vdupq_n_f32(0.0f);
        ptrdiff_t j = 0;
        for (; j + 8 <= F; j += 8) {
            const float32x4_t x0 = vld1q_f32(x + j), x1 = vld1q_f32(x + j + 4);
            for (int t = 0; t < 4; ++t) {
                float32x4_t v[2];
                load8__neon(w[t], j, ty, v);
                a[t][0] = vfmaq_f32(a[t][0], x0, v[0]);
                a[t][1] = vfmaq_f32(a[t][1], x1, v[1]);
            }
        }
        float s[4];
        for (int t = 0; t < 4; ++t) s[t] = vaddvq_f32(vaddq_f32(a[t][0], a[t][1]));
        tail4(x, w, j, F, ty, s);
        store4(out, m, M, s);
    }
}

static void dots_f32__neon(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__neon(x, W, M, F, out, EQ_RD_F32);
}

static void dots_i8__neon(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__neon(x, W, M, F, out, EQ_RD_I8);
}

static void dots_f16__neon(const float *x, const void *W, ptrdiff_t M, ptrdiff_t F, float *out) {
    dots__neon(x, W, M, F, out, EQ_RD_F16);
}
#endif

typedef struct {
    const char *name;
    eq_dots_fn f32, i8, f16;
} eq_dots_variant_t;

/* Every variant compiled in; which of them this CPU runs is project_q8's choice (eq_q8_isa), made once there. */
static const eq_dots_variant_t dots_compiled[] = {
#ifdef EQ_RD_X86
    {"avx2_fma", dots_f32__avx2_fma, dots_i8__avx2_fma, dots_f16__avx2_fma},
#endif
#ifdef EQ_RD_ARM64
    {"neon", dots_f32__neon, dots_i8__neon, dots_f16__neon},
#endif
    {"scalar", dots_f32__scalar, dots_i8__scalar, dots_f16__scalar},
};

static const eq_dots_variant_t *dots_named(const char *name) {
    for (size_t i = 0; i < sizeof dots_compiled / sizeof *dots_compiled; ++i)
        if (strcmp(name, dots_compiled[i].name) == 0) return &dots_compiled[i];
    return NULL;
}

const char *eq_dots_isa(int i) {
    for (int j = 0, n = 0; eq_q8_isa(j); ++j)
        if (dots_named(eq_q8_isa(j)) && n++ == i) return eq_q8_isa(j);
    return NULL;
}

static const eq_dots_variant_t *dots_find(const char *isa) {
    for (int i = 0; eq_dots_isa(i); ++i)
        if (!isa || strcmp(isa, eq_dots_isa(i)) == 0) return dots_named(eq_dots_isa(i));
    return NULL;
}

/* The variant's product for W of type ty; NULL for float16 on an x86 CPU without F16C (project_q8's dispatch,
 * which chose avx2_fma, checks avx2 and fma only). */
static eq_dots_fn dots_of(const eq_dots_variant_t *v, int ty) {
    if (ty == EQ_RD_I8) return v->i8;
    if (ty != EQ_RD_F16) return v->f32;
#if defined(EQ_RD_X86) && (defined(__GNUC__) || defined(__clang__))
    if (v->f16 == dots_f16__avx2_fma) {
        __builtin_cpu_init();
        if (!__builtin_cpu_supports("f16c")) return NULL;
    }
#endif
    return v->f16;
}

int eq_dots_f16(const char *isa) {
    const eq_dots_variant_t *v = dots_find(isa);
    return v && dots_of(v, EQ_RD_F16);
}

/* Rows per block and W rows per chunk: a chunk (64 rows, 80-320 KB at F = 1280) stays in L2 while a block's rows
 * pass over it, so a batch reads W from memory once per block, not once per row. */
enum { EQ_RD_ROWS = 32, EQ_RD_CHUNK = 64 };

/* Merge m values into top [k], sorted descending (-inf where not yet filled). */
static void topk_push(float *top, ptrdiff_t k, const float *s, ptrdiff_t m) {
    for (ptrdiff_t i = 0; i < m; ++i) {
        const float v = s[i];
        if (!(v > top[k - 1])) continue;
        ptrdiff_t j = k - 1;
        for (; j > 0 && top[j - 1] < v; --j) top[j] = top[j - 1];
        top[j] = v;
    }
}

/* xh = x / max(|x|, 1e-12) in double, rounded to float32 (detectors.l2_normalise, then astype(float32)) */
static void l2_row(const float *x, ptrdiff_t F, float *xh) {
    double ss = 0.0;
    for (ptrdiff_t j = 0; j < F; ++j) ss += (double)x[j] * x[j];
    const double n = sqrt(ss) > 1e-12 ? sqrt(ss) : 1e-12;
    for (ptrdiff_t j = 0; j < F; ++j) xh[j] = (float)((double)x[j] / n);
}

int eq_knn_kth(ptrdiff_t N, ptrdiff_t F, ptrdiff_t B, ptrdiff_t k, const float *x, const void *bank, int bank_type,
               float scale, const float *row_scale, float *kth, const char *isa) {
    const eq_dots_variant_t *v = dots_find(isa);
    const eq_dots_fn dots = v ? dots_of(v, bank_type) : NULL;
    if (!dots || k < 1 || k > B) return -2;
    const ptrdiff_t nb = N < EQ_RD_ROWS ? N : EQ_RD_ROWS;
    float *xh = malloc((size_t)(nb * F + nb * k + EQ_RD_CHUNK + 1) * sizeof *xh);
    if (!xh) return -1;
    float *top = xh + nb * F, *buf = top + nb * k;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += EQ_RD_ROWS) {
        const ptrdiff_t nr = N - n0 < EQ_RD_ROWS ? N - n0 : EQ_RD_ROWS;
        for (ptrdiff_t r = 0; r < nr; ++r) {
            l2_row(x + (n0 + r) * F, F, xh + r * F);
            for (ptrdiff_t i = 0; i < k; ++i) top[r * k + i] = -INFINITY;
        }
        for (ptrdiff_t b0 = 0; b0 < B; b0 += EQ_RD_CHUNK) {
            const ptrdiff_t mb = B - b0 < EQ_RD_CHUNK ? B - b0 : EQ_RD_CHUNK;
            const void *W = row_at(bank, b0, F, bank_type);
            for (ptrdiff_t r = 0; r < nr; ++r) {
                dots(xh + r * F, W, mb, F, buf);
                if (row_scale)  /* each row's scale after its sum, as ViM's null space */
                    for (ptrdiff_t i = 0; i < mb; ++i) buf[i] *= row_scale[b0 + i];
                topk_push(top + r * k, k, buf, mb);
            }
        }
        /* one scale > 0 keeps the order, so it is applied to the k-th value only */
        for (ptrdiff_t r = 0; r < nr; ++r) kth[n0 + r] = (row_scale ? 1.0f : scale) * top[r * k + k - 1];
    }
    free(xh);
    return 0;
}

int eq_vim_resid(ptrdiff_t N, ptrdiff_t F, ptrdiff_t D, const float *x, const float *origin, const void *nsT,
                 int ns_type, const float *scale, double *resid, const char *isa) {
    const eq_dots_variant_t *v = dots_find(isa);
    const eq_dots_fn dots = v ? dots_of(v, ns_type) : NULL;
    if (!dots || (ns_type == EQ_RD_I8) != (scale != NULL)) return -2;
    const ptrdiff_t nb = N < EQ_RD_ROWS ? N : EQ_RD_ROWS;
    float *xd = malloc((size_t)(nb * F + EQ_RD_CHUNK + 1) * sizeof *xd);
    double *acc = malloc((size_t)(nb + 1) * sizeof *acc);
    if (!xd || !acc) {
        free(xd);
        free(acc);
        return -1;
    }
    float *buf = xd + nb * F;
    for (ptrdiff_t n0 = 0; n0 < N; n0 += EQ_RD_ROWS) {
        const ptrdiff_t nr = N - n0 < EQ_RD_ROWS ? N - n0 : EQ_RD_ROWS;
        for (ptrdiff_t r = 0; r < nr; ++r) {
            for (ptrdiff_t j = 0; j < F; ++j) xd[r * F + j] = x[(n0 + r) * F + j] - origin[j];
            acc[r] = 0.0;
        }
        for (ptrdiff_t d0 = 0; d0 < D; d0 += EQ_RD_CHUNK) {
            const ptrdiff_t md = D - d0 < EQ_RD_CHUNK ? D - d0 : EQ_RD_CHUNK;
            const void *W = row_at(nsT, d0, F, ns_type);
            for (ptrdiff_t r = 0; r < nr; ++r) {
                dots(xd + r * F, W, md, F, buf);
                if (scale)  /* row d's scale after its sum, as the bank's; the product rounded to float32 */
                    for (ptrdiff_t i = 0; i < md; ++i) buf[i] *= scale[d0 + i];
                for (ptrdiff_t i = 0; i < md; ++i) acc[r] += (double)buf[i] * buf[i];
            }
        }
        for (ptrdiff_t r = 0; r < nr; ++r) resid[n0 + r] = sqrt(acc[r]);
    }
    free(xd);
    free(acc);
    return 0;
}
