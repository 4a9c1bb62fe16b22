/* The int8 whitener product of the Mahalanobis family (see whitener.h for the contract).
 *
 * Form: z += (x_i * scale_i) * q_i row by row ("axpy"), z held in a work row of at most 2F floats (16 KB at
 * F = 2048: L1-resident), so each int8 entry is loaded once and used once and the matrix is streamed in its
 * storage order, only each row's nonzero prefix (a lower-triangular whitener: half of it). Why int8 at all: at
 * F = 576-2048 the float32 pair of whiteners (8 F^2 bytes, 2.6-32 MiB) does not stay in cache and the product
 * is bound by reading it every frame; int8 reads a quarter of the bytes. The per-row scale folds into the row's
 * multiplier, so dequantising costs only the int8 -> float conversion.
 * Rows are taken 4 at a time over their common prefix, so the work row is loaded and stored once per 4 rows.
 */
#include "whitener.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EQ_Q8_X86 1
#include <immintrin.h>
#define EQ_Q8_AVX2 __attribute__((target("avx2,fma")))
#endif
#if defined(__aarch64__)
#define EQ_Q8_ARM64 1
#include <arm_neon.h>
#endif

/* Software prefetch of the next group's rows while a group runs, two cache lines per 16 columns (a group reads
 * one line per 16 columns, and the next group's rows are a little longer): the rows are short streams (~F bytes
 * each) restarted every 4 rows. Measured at F = 1280 with the cache flushed between frames (as the backbone does):
 * 429 us per product without, 372-390 with (2 cores shared with other jobs: a small gain, within the noise of
 * single runs); warm, no difference. Prefetching two groups ahead did no better. */
typedef struct {
    const int8_t *p[4];
    ptrdiff_t len[4], pos;
    int n, t;
} q8_prefetch_t;

static inline void q8_prefetch_init(q8_prefetch_t *c, ptrdiff_t r, ptrdiff_t nr, const int32_t *rows,
                                    const int8_t *q, const int64_t *off) {
    c->n = nr - r < 4 ? (int)(nr - r > 0 ? nr - r : 0) : 4;
    for (int t = 0; t < c->n; ++t) {
        c->p[t] = q + off[rows[r + t]];
        c->len[t] = (ptrdiff_t)(off[rows[r + t] + 1] - off[rows[r + t]]);
    }
    c->t = 0;
    c->pos = 0;
}

static inline void q8_prefetch_step(q8_prefetch_t *c) {
    for (int k = 0; k < 2; ++k) {
        while (c->t < c->n && c->pos >= c->len[c->t]) {
            ++c->t;
            c->pos = 0;
        }
        if (c->t >= c->n) return;
#if defined(__GNUC__) || defined(__clang__)
        __builtin_prefetch(c->p[c->t] + c->pos);
#endif
        c->pos += 64;
    }
}

/* Rows r .. r + 3 of a call: their packed rows p and lengths len; returns their common length. */
static inline ptrdiff_t q8_group(ptrdiff_t r, const int32_t *rows, const int8_t *q, const int64_t *off,
                                 const int8_t *p[4], ptrdiff_t len[4]) {
    ptrdiff_t L = len[0] = (ptrdiff_t)(off[rows[r] + 1] - off[rows[r]]);
    p[0] = q + off[rows[r]];
    for (int t = 1; t < 4; ++t) {
        p[t] = q + off[rows[r + t]];
        len[t] = (ptrdiff_t)(off[rows[r + t] + 1] - off[rows[r + t]]);
        L = len[t] < L ? len[t] : L;
    }
    return L;
}

/* One call's rows: nr nonzero rows `rows` with multipliers m [nr, S] (x_i * scale_i), added into acc. */
typedef void (*eq_q8_rows_fn)(ptrdiff_t nr, const int32_t *rows, const float *m, const int8_t *q, const int64_t *off,
                              int S, float *acc);

/* the reference order: one row at a time, columns in order (m0 for even columns, m1 for odd: S = 2 interleaves) */
static void rows__scalar(ptrdiff_t nr, const int32_t *rows, const float *m, const int8_t *q, const int64_t *off, int S,
                         float *acc) {
    for (ptrdiff_t r = 0; r < nr; ++r) {
        const int8_t *p = q + off[rows[r]];
        const ptrdiff_t len = (ptrdiff_t)(off[rows[r] + 1] - off[rows[r]]);
        const float m0 = m[r * S], m1 = m[r * S + S - 1];
        for (ptrdiff_t j = 0; j < len; j += 2) {
            acc[j] += m0 * (float)p[j];
            acc[j + 1] += m1 * (float)p[j + 1];
        }
    }
}

#ifdef EQ_Q8_X86
EQ_Q8_AVX2 static inline __m256 q8_load8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* [m0, m1, m0, m1, ...] (S = 2) or m0 everywhere (S = 1) */
EQ_Q8_AVX2 static inline __m256 q8_splat(const float *m, int S) {
    if (S == 1) return _mm256_set1_ps(m[0]);
    double d;
    memcpy(&d, m, sizeof d);
    return _mm256_castpd_ps(_mm256_set1_pd(d));
}

EQ_Q8_AVX2 static void q8_row__avx2(const int8_t *p, ptrdiff_t j, ptrdiff_t len, __m256 mv, float *acc) {
    for (; j < len; j += 16) {
        _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(mv, q8_load8(p + j), _mm256_loadu_ps(acc + j)));
        _mm256_storeu_ps(acc + j + 8, _mm256_fmadd_ps(mv, q8_load8(p + j + 8), _mm256_loadu_ps(acc + j + 8)));
    }
}

EQ_Q8_AVX2 static void rows__avx2_fma(ptrdiff_t nr, const int32_t *rows, const float *m, const int8_t *q,
                                      const int64_t *off, int S, float *acc) {
    ptrdiff_t r = 0;
    for (; r + 4 <= nr; r += 4) {
        const int8_t *p[4];
        ptrdiff_t len[4];
        const ptrdiff_t L = q8_group(r, rows, q, off, p, len);
        __m256 mv[4];
        for (int t = 0; t < 4; ++t) mv[t] = q8_splat(m + (r + t) * S, S);
        q8_prefetch_t pf;
        q8_prefetch_init(&pf, r + 4, nr, rows, q, off);
        for (ptrdiff_t j = 0; j < L; j += 16) {
            q8_prefetch_step(&pf);
            __m256 a0 = _mm256_loadu_ps(acc + j), a1 = _mm256_loadu_ps(acc + j + 8);
            for (int t = 0; t < 4; ++t) {
                a0 = _mm256_fmadd_ps(mv[t], q8_load8(p[t] + j), a0);
                a1 = _mm256_fmadd_ps(mv[t], q8_load8(p[t] + j + 8), a1);
            }
            _mm256_storeu_ps(acc + j, a0);
            _mm256_storeu_ps(acc + j + 8, a1);
        }
        for (int t = 0; t < 4; ++t) q8_row__avx2(p[t], L, len[t], mv[t], acc);
    }
    for (; r < nr; ++r)
        q8_row__avx2(q + off[rows[r]], 0, (ptrdiff_t)(off[rows[r] + 1] - off[rows[r]]), q8_splat(m + r * S, S), acc);
}
#endif

#ifdef EQ_Q8_ARM64
static inline void q8_load16(const int8_t *p, float32x4_t w[4]) {
    const int8x16_t v = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_s8(vget_high_s8(v));
    w[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    w[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    w[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    w[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

static inline float32x4_t q8_splat_neon(const float *m, int S) {
    const float t[4] = {m[0], m[S - 1], m[0], m[S - 1]};
    return vld1q_f32(t);
}

static void q8_row__neon(const int8_t *p, ptrdiff_t j, ptrdiff_t len, float32x4_t mv, float *acc) {
    for (; j < len; j += 16) {
        float32x4_t w[4];
        q8_load16(p + j, w);
        for (int k = 0; k < 4; ++k) vst1q_f32(acc + j + 4 * k, vfmaq_f32(vld1q_f32(acc + j + 4 * k), mv, w[k]));
    }
}

static void rows__neon(ptrdiff_t nr, const int32_t *rows, const float *m, const int8_t *q, const int64_t *off, int S,
                       float *acc) {
    ptrdiff_t r = 0;
    for (; r + 4 <= nr; r += 4) {
        const int8_t *p[4];
        ptrdiff_t len[4];
        const ptrdiff_t L = q8_group(r, rows, q, off, p, len);
        float32x4_t mv[4];
        for (int t = 0; t < 4; ++t) mv[t] = q8_splat_neon(m + (r + t) * S, S);
        q8_prefetch_t pf;
        q8_prefetch_init(&pf, r + 4, nr, rows, q, off);
        for (ptrdiff_t j = 0; j < L; j += 16) {
            q8_prefetch_step(&pf);
            float32x4_t a[4], w[4];
            for (int k = 0; k < 4; ++k) a[k] = vld1q_f32(acc + j + 4 * k);
            for (int t = 0; t < 4; ++t) {
                q8_load16(p[t] + j, w);
                for (int k = 0; k < 4; ++k) a[k] = vfmaq_f32(a[k], mv[t], w[k]);
            }
            for (int k = 0; k < 4; ++k) vst1q_f32(acc + j + 4 * k, a[k]);
        }
        for (int t = 0; t < 4; ++t) q8_row__neon(p[t], L, len[t], mv[t], acc);
    }
    for (; r < nr; ++r)
        q8_row__neon(q + off[rows[r]], 0, (ptrdiff_t)(off[rows[r] + 1] - off[rows[r]]), q8_splat_neon(m + r * S, S), acc);
}
#endif

typedef struct {
    const char *name;
    eq_q8_rows_fn fn;
} eq_q8_variant_t;

static eq_q8_variant_t q8_table[3];
static int q8_count = -1;

static void q8_init(void) {
    /* Idempotent and writes the same values every time, so a racing first call is harmless. */
    int n = 0;
#ifdef EQ_Q8_X86
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        q8_table[n++] = (eq_q8_variant_t){"avx2_fma", rows__avx2_fma};
#endif
#endif
#ifdef EQ_Q8_ARM64
    q8_table[n++] = (eq_q8_variant_t){"neon", rows__neon}; /* ARMv8.0: every aarch64 core has it */
#endif
    q8_table[n++] = (eq_q8_variant_t){"scalar", rows__scalar};
    q8_count = n;
}

const char *eq_q8_isa(int i) {
    if (q8_count < 0) q8_init();
    return i >= 0 && i < q8_count ? q8_table[i].name : NULL;
}

static eq_q8_rows_fn q8_find(const char *isa) {
    if (q8_count < 0) q8_init();
    for (int i = 0; i < q8_count; ++i)
        if (!isa || strcmp(isa, q8_table[i].name) == 0) return q8_table[i].fn;
    return NULL;
}

int eq_project_q8(ptrdiff_t N, ptrdiff_t F, int S, const float *x, const int8_t *q, const int64_t *off,
                  const float *scale, const float *diag, float *z, const char *isa) {
    const eq_q8_rows_fn fn = q8_find(isa);
    if (!fn || (S != 1 && S != 2)) return -2;
    const ptrdiff_t K = S * F;
    ptrdiff_t Kp = K; /* the work row covers the longest (padded) row */
    for (ptrdiff_t i = 0; i < F; ++i)
        if ((ptrdiff_t)(off[i + 1] - off[i]) > Kp) Kp = (ptrdiff_t)(off[i + 1] - off[i]);
    float *acc = malloc((size_t)(Kp + K) * sizeof *acc);
    int32_t *rows = malloc((size_t)(F > 0 ? F : 1) * sizeof *rows);
    if (!acc || !rows) {
        free(acc);
        free(rows);
        return -1;
    }
    float *m = acc + Kp;
    for (ptrdiff_t n = 0; n < N; ++n) {
        const float *xn = x + n * F;
        for (ptrdiff_t k = 0; k < K; ++k) acc[k] = xn[k / S] * diag[k];
        for (ptrdiff_t k = K; k < Kp; ++k) acc[k] = 0.0f;
        ptrdiff_t nr = 0;
        for (ptrdiff_t i = 0; i < F; ++i) {
            if (xn[i] == 0.0f || off[i + 1] == off[i]) continue; /* ReLU features: often half the rows */
            rows[nr] = (int32_t)i;
            for (int s = 0; s < S; ++s) m[nr * S + s] = xn[i] * scale[i * S + s];
            ++nr;
        }
        fn(nr, rows, m, q, off, S, acc);
        memcpy(z + n * K, acc, (size_t)K * sizeof *z);
    }
    free(acc);
    free(rows);
    return 0;
}
