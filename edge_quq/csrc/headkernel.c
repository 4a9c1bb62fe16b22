/* Native MC-dropout head kernel (see headkernel.h for the contract).
 *
 * Cost model, for the paper's head (F=2048, H=300, C=100, p0=0.2, p1=0.4):
 *  - Layer 1 is computed once densely (x.W0, the eval-mode pass); every sample then only touches the rows of
 *    W0 whose unit it drops (subtract) or keeps (add), whichever set is smaller, so a sample costs
 *    min(p0, 1-p0) of a dense product. Rows with x_i == 0 are skipped entirely.
 *  - Layer 2 cannot reuse a precomputed sum: the hidden activations differ per sample, so "dense minus dropped"
 *    would cost 1+p1 against 1-p1 for adding the kept rows. We add kept rows and also skip hidden units that
 *    the ReLU zeroed (typically half of them).
 *  - Samples are processed in chunks of 64 with the loops ordered row-outer: each row of W0/W1 is read once per
 *    chunk and applied to every sample that needs it, instead of streaming 2.4 MB of W0 per sample. The chunk's
 *    hidden pre-activations (64 x H floats) stay in L1/L2.
 *  - Masks are 64-lane bit sets (bit t = sample t). They are drawn bit-sliced: a Bernoulli(p) for 64 lanes
 *    compares 64 32-bit uniforms to floor(p * 2^32) most significant bit first, one 64-bit random word per bit
 *    position, stopping once every lane is decided (about 7-8 words for 64 lanes instead of 64 draws). The
 *    result has exactly the distribution of comparing a 32-bit uniform draw against the threshold.
 * Precision: all products and sums are float32 like the numpy reference (which runs float32 BLAS); the
 * "dense minus dropped rows" update reorders the sums, so results match the reference to float32 rounding of
 * the pre-activation magnitudes, not bit for bit. Moments are accumulated in double, shifted by the
 * eval-mode output so that the one-pass variance does not cancel catastrophically.
 */
#include "headkernel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EQ_X86 1
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#define EQ_ARM64 1
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

static inline unsigned eq_ctz64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctzll(v);
#else
    unsigned n = 0;
    while (!(v & 1)) { v >>= 1; ++n; }
    return n;
#endif
}

static inline unsigned eq_popcount64(uint64_t v) {
    /* SWAR: baseline x86-64 has no POPCNT and __builtin_popcountll would call into libgcc. */
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (unsigned)((v * 0x0101010101010101ULL) >> 56);
}

/* ---------------------------------------------------------------- micro-kernels: masked rank-1 update */

void eq_f32_rank1_masked__scalar(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                 float scale, float *y, size_t y_stride) {
    while (lanes) {
        const unsigned t = eq_ctz64(lanes);
        lanes &= lanes - 1;
        const float c = scale * a[t * a_stride];
        if (c == 0.0f) continue;
        float *yt = y + t * y_stride;
        for (size_t j = 0; j < n; ++j) yt[j] += c * w[j];
    }
}

#ifdef EQ_X86
void eq_f32_rank1_masked__sse2_x8(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                  float scale, float *y, size_t y_stride) {
    while (lanes) {
        const unsigned t = eq_ctz64(lanes);
        lanes &= lanes - 1;
        const float c = scale * a[t * a_stride];
        if (c == 0.0f) continue;
        float *yt = y + t * y_stride;
        const __m128 vc = _mm_set1_ps(c);
        size_t j = 0;
        for (; j + 8 <= n; j += 8) {
            __m128 y0 = _mm_loadu_ps(yt + j), y1 = _mm_loadu_ps(yt + j + 4);
            y0 = _mm_add_ps(y0, _mm_mul_ps(vc, _mm_loadu_ps(w + j)));
            y1 = _mm_add_ps(y1, _mm_mul_ps(vc, _mm_loadu_ps(w + j + 4)));
            _mm_storeu_ps(yt + j, y0);
            _mm_storeu_ps(yt + j + 4, y1);
        }
        for (; j + 4 <= n; j += 4)
            _mm_storeu_ps(yt + j, _mm_add_ps(_mm_loadu_ps(yt + j), _mm_mul_ps(vc, _mm_loadu_ps(w + j))));
        for (; j < n; ++j) yt[j] += c * w[j];
    }
}

__attribute__((target("avx2,fma")))
void eq_f32_rank1_masked__avx2_fma_x16(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                       float scale, float *y, size_t y_stride) {
    while (lanes) {
        const unsigned t = eq_ctz64(lanes);
        lanes &= lanes - 1;
        const float c = scale * a[t * a_stride];
        if (c == 0.0f) continue;
        float *yt = y + t * y_stride;
        const __m256 vc = _mm256_set1_ps(c);
        size_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m256 y0 = _mm256_loadu_ps(yt + j), y1 = _mm256_loadu_ps(yt + j + 8);
            y0 = _mm256_fmadd_ps(vc, _mm256_loadu_ps(w + j), y0);
            y1 = _mm256_fmadd_ps(vc, _mm256_loadu_ps(w + j + 8), y1);
            _mm256_storeu_ps(yt + j, y0);
            _mm256_storeu_ps(yt + j + 8, y1);
        }
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(yt + j, _mm256_fmadd_ps(vc, _mm256_loadu_ps(w + j), _mm256_loadu_ps(yt + j)));
        for (; j + 4 <= n; j += 4)
            _mm_storeu_ps(yt + j, _mm_fmadd_ps(_mm256_castps256_ps128(vc), _mm_loadu_ps(w + j), _mm_loadu_ps(yt + j)));
        for (; j < n; ++j) yt[j] = fmaf(c, w[j], yt[j]);
    }
}
#endif

#ifdef EQ_ARM64
void eq_f32_rank1_masked__neon_x8(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                  float scale, float *y, size_t y_stride) {
    while (lanes) {
        const unsigned t = eq_ctz64(lanes);
        lanes &= lanes - 1;
        const float c = scale * a[t * a_stride];
        if (c == 0.0f) continue;
        float *yt = y + t * y_stride;
        const float32x4_t vc = vdupq_n_f32(c);
        size_t j = 0;
        for (; j + 8 <= n; j += 8) {
            float32x4_t y0 = vld1q_f32(yt + j), y1 = vld1q_f32(yt + j + 4);
            y0 = vfmaq_f32(y0, vc, vld1q_f32(w + j));
            y1 = vfmaq_f32(y1, vc, vld1q_f32(w + j + 4));
            vst1q_f32(yt + j, y0);
            vst1q_f32(yt + j + 4, y1);
        }
        for (; j + 4 <= n; j += 4) vst1q_f32(yt + j, vfmaq_f32(vld1q_f32(yt + j), vc, vld1q_f32(w + j)));
        for (; j < n; ++j) yt[j] = fmaf(c, w[j], yt[j]);
    }
}
#endif

/* ---------------------------------------------------------------- run-time dispatch */

static eq_kernels_t eq_table[4];
static int eq_table_n = -1;
static char eq_features[64];

static void eq_init_table(void) {
    /* Idempotent and writes the same values every time, so a racing first call is harmless. */
    int n = 0;
    char feats[64] = "";
#ifdef EQ_X86
    strcpy(feats, "sse2");
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        strcat(feats, ",avx2,fma");
        eq_table[n].name = "avx2_fma";
        eq_table[n++].rank1_masked = eq_f32_rank1_masked__avx2_fma_x16;
    }
#endif
    eq_table[n].name = "sse2";
    eq_table[n++].rank1_masked = eq_f32_rank1_masked__sse2_x8;
#endif
#ifdef EQ_ARM64
    strcpy(feats, "asimd");
#if defined(__linux__)
    /* Dot-product (ARMv8.2, Cortex-A76/Pi 5) only matters to an int8 head; the float kernel is ARMv8.0 NEON. */
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) strcat(feats, ",asimddp");
#endif
    eq_table[n].name = "neon";
    eq_table[n++].rank1_masked = eq_f32_rank1_masked__neon_x8;
#endif
    eq_table[n].name = "scalar";
    eq_table[n++].rank1_masked = eq_f32_rank1_masked__scalar;
    memcpy(eq_features, feats, sizeof feats);
    eq_table_n = n;
}

int eq_kernels_count(void) {
    if (eq_table_n < 0) eq_init_table();
    return eq_table_n;
}

const eq_kernels_t *eq_kernels_get(int i) {
    if (i < 0 || i >= eq_kernels_count()) return NULL;
    return &eq_table[i];
}

const eq_kernels_t *eq_kernels_find(const char *name) {
    for (int i = 0; i < eq_kernels_count(); ++i)
        if (strcmp(eq_table[i].name, name) == 0) return &eq_table[i];
    return NULL;
}

const char *eq_cpu_features(void) {
    if (eq_table_n < 0) eq_init_table();
    return eq_features;
}

/* ---------------------------------------------------------------- PRNG and bit-sliced Bernoulli masks */

static inline uint64_t eq_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t eq_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

void eq_rng_seed(eq_rng_t *r, uint64_t seed) {
    uint64_t st = seed;
    for (int i = 0; i < 4; ++i) r->s[i] = eq_splitmix64(&st);
}

/* xoshiro256**: every output bit is usable, which the bit-sliced sampler needs (xoshiro+ has weak low bits). */
static inline uint64_t eq_rng_next_inline(eq_rng_t *r) {
    uint64_t *s = r->s;
    const uint64_t result = eq_rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = eq_rotl(s[3], 45);
    return result;
}

uint64_t eq_rng_next(eq_rng_t *r) { return eq_rng_next_inline(r); }

uint32_t eq_rate_threshold(double p) {
    if (!(p > 0.0)) return 0;
    const double t = floor(p * 4294967296.0);
    return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)t;
}

static inline uint64_t eq_bernoulli64_inline(eq_rng_t *r, uint32_t thr, uint64_t lanes) {
    uint64_t undecided = lanes, drop = 0;
    for (int k = 31; k >= 0 && undecided; --k) {
        /* Lanes still equal to thr's prefix stay >= thr (kept) once thr's remaining bits are all zero. */
        if ((thr & (0xFFFFFFFFu >> (31 - k))) == 0) break;
        const uint64_t bits = eq_rng_next_inline(r);
        if ((thr >> k) & 1u) {
            drop |= undecided & ~bits; /* uniform has 0 where thr has 1: uniform < thr */
            undecided &= bits;
        } else {
            undecided &= ~bits; /* uniform has 1 where thr has 0: uniform > thr, kept */
        }
    }
    return drop;
}

uint64_t eq_bernoulli64(eq_rng_t *r, uint32_t threshold, uint64_t lanes) {
    return eq_bernoulli64_inline(r, threshold, lanes);
}

/* ---------------------------------------------------------------- the sampler */

static inline void eq_activate(int act, const float *logits, float *p, int C) {
    if (act == EQ_ACT_SIGMOID) {
        for (int c = 0; c < C; ++c) {
            const float v = logits[c];
            if (v >= 0.0f) {
                p[c] = 1.0f / (1.0f + expf(-v));
            } else {
                const float e = expf(v);
                p[c] = e / (1.0f + e);
            }
        }
    } else if (act == EQ_ACT_SOFTMAX) {
        float m = logits[0];
        for (int c = 1; c < C; ++c) m = logits[c] > m ? logits[c] : m;
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += (p[c] = expf(logits[c] - m));
        const float inv = 1.0f / s;
        for (int c = 0; c < C; ++c) p[c] *= inv;
    } else {
        memcpy(p, logits, (size_t)C * sizeof(float));
    }
}

static inline float eq_clipf(float v) { return v < 1e-12f ? 1e-12f : (v > 1.0f ? 1.0f : v); }

/* Shannon entropy for softmax, sum of binary entropies otherwise: edge_quq.sampler.sample_entropy.
 * float logs (double was ~8% of the run time); the sum over samples stays double. */
static double eq_entropy(int act, const float *p, int C) {
    double h = 0.0;
    if (act == EQ_ACT_SOFTMAX) {
        for (int c = 0; c < C; ++c) {
            const float v = eq_clipf(p[c]);
            h -= (double)(v * logf(v));
        }
    } else {
        for (int c = 0; c < C; ++c) {
            const float v = eq_clipf(p[c]), q = eq_clipf(1.0f - p[c]);
            h -= (double)(v * logf(v) + q * logf(q));
        }
    }
    return h;
}

static size_t eq_round16(size_t n) { return (n + 15) & ~(size_t)15; }

static uint64_t eq_mask_bits(const uint8_t *keep, int stride, int col, int t0, int nt) {
    uint64_t bits = 0;
    for (int t = 0; t < nt; ++t)
        if (!keep[(size_t)(t0 + t) * (size_t)stride + (size_t)col]) bits |= 1ULL << t;
    return bits;
}

int eq_head_moments(const eq_head_t *hd, const eq_kernels_t *k, int T, uint64_t seed, int given,
                    const uint8_t *keep0, const uint8_t *keep1, eq_moments_t *out) {
    const int F = hd->F, H = hd->H, C = hd->C, act = hd->act;
    const size_t Hs = eq_round16((size_t)H), Cs = eq_round16((size_t)C);
    const eq_f32_rank1_masked_fn rank1 = k->rank1_masked;
    /* Same scale as the reference: float32(1 / (1 - p)) computed in double. */
    const float s0 = hd->p0 > 0.0 ? (float)(1.0 / (1.0 - hd->p0)) : 1.0f;
    const float s1 = hd->p1 > 0.0 ? (float)(1.0 / (1.0 - hd->p1)) : 1.0f;
    const uint32_t thr0 = eq_rate_threshold(hd->p0), thr1 = eq_rate_threshold(hd->p1);
    const float *x = hd->x, *w0 = hd->w0, *b0 = hd->b0, *w1 = hd->w1, *b1 = hd->b1;

    /* One allocation for all scratch; float regions start on 64-byte boundaries (Hs, Cs multiples of 16). */
    const size_t n_f = 3 * Hs + Cs + Cs + 64 * Hs + 64 * Cs;
    const size_t n_u = (size_t)F + (size_t)H;
    const size_t n_d = 3 * (size_t)C;
    char *mem = (char *)malloc(n_f * sizeof(float) + n_u * sizeof(uint64_t) + n_d * sizeof(double) + 64);
    if (!mem) return -1;
    float *base = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    float *xw = base, *zfull = xw + Hs, *heval = zfull + Hs, *yeval = heval + Hs, *prob = yeval + Cs;
    float *z = prob + Cs, *y = z + 64 * Hs;
    uint64_t *drop0 = (uint64_t *)(y + 64 * Cs), *drop1 = drop0 + F;
    double *pdet = (double *)(drop1 + H), *sum1 = pdet + C, *sum2 = sum1 + C;

    int nnz = 0;
    for (int i = 0; i < F; ++i) nnz += x[i] != 0.0f;
    memset(sum1, 0, 2 * (size_t)C * sizeof(double));
    double ent = 0.0;
    eq_rng_t rng;
    eq_rng_seed(&rng, seed);

    for (int t0 = 0; t0 < T; t0 += 64) {
        const int nt = T - t0 < 64 ? T - t0 : 64;
        const uint64_t lanes = nt == 64 ? ~0ULL : ((1ULL << nt) - 1);
        /* The first chunk shares its pass over W0 with the dense eval-mode product, so W0 (2.4 MB for the
         * paper's head, beyond L2) is streamed once for T <= 64 instead of twice. */
        const int first = t0 == 0;

        /* Layer 1: subtract the dropped rows from the dense sum, or add the kept rows to the bias, whichever
         * touches fewer rows. Subtract mode accumulates the dropped part from zero and takes the difference at
         * the end, so that the first chunk can build the dense sum in the same pass. */
        uint64_t ndrop = 0;
        for (int i = 0; i < F; ++i) {
            uint64_t d;
            if (given) d = keep0 ? eq_mask_bits(keep0, F, i, t0, nt) : 0;
            else d = thr0 ? eq_bernoulli64_inline(&rng, thr0, lanes) : 0;
            drop0[i] = d;
            if (x[i] != 0.0f) ndrop += eq_popcount64(d);
        }
        const int subtract = ndrop * 2 <= (uint64_t)nnz * (uint64_t)nt;
        for (int t = 0; t < nt; ++t) {
            if (subtract) memset(z + t * Hs, 0, (size_t)H * sizeof(float));
            else memcpy(z + t * Hs, b0, (size_t)H * sizeof(float));
        }
        if (first) memset(xw, 0, Hs * sizeof(float));
        for (int i = 0; i < F; ++i) {
            if (x[i] == 0.0f) continue;
            const float *row = w0 + (size_t)i * H;
            if (first) rank1((size_t)H, row, 1, x + i, 0, 1.0f, xw, 0);
            const uint64_t sel = subtract ? drop0[i] : (~drop0[i] & lanes);
            if (sel) rank1((size_t)H, row, sel, x + i, 0, s0, z, Hs);
        }
        if (first) {
            /* Eval-mode head (no dropout, no scaling): the deterministic output and the moment shift. */
            for (int j = 0; j < H; ++j) {
                const float v = xw[j] + b0[j];
                heval[j] = v > 0.0f ? v : 0.0f;
                zfull[j] = b0[j] + s0 * xw[j];
            }
            memcpy(yeval, b1, (size_t)C * sizeof(float));
            for (int j = 0; j < H; ++j) rank1((size_t)C, w1 + (size_t)j * C, 1, heval + j, 0, 1.0f, yeval, 0);
            memcpy(out->det_logits, yeval, (size_t)C * sizeof(float));
            if (act == EQ_ACT_SIGMOID) {
                for (int c = 0; c < C; ++c) pdet[c] = 1.0 / (1.0 + exp(-(double)yeval[c]));
            } else if (act == EQ_ACT_SOFTMAX) {
                double m = yeval[0], sm = 0.0;
                for (int c = 1; c < C; ++c) m = yeval[c] > m ? yeval[c] : m;
                for (int c = 0; c < C; ++c) sm += (pdet[c] = exp((double)yeval[c] - m));
                for (int c = 0; c < C; ++c) pdet[c] /= sm;
            } else {
                for (int c = 0; c < C; ++c) pdet[c] = yeval[c];
            }
        }
        for (int t = 0; t < nt; ++t) {
            float *zt = z + t * Hs;
            if (subtract)
                for (int j = 0; j < H; ++j) {
                    const float v = zfull[j] - zt[j];
                    zt[j] = v > 0.0f ? v : 0.0f;
                }
            else
                for (int j = 0; j < H; ++j) zt[j] = zt[j] > 0.0f ? zt[j] : 0.0f;
        }

        /* Layer 2: add the kept, nonzero hidden units' rows (zero coefficients are skipped in the kernel). */
        for (int t = 0; t < nt; ++t) memcpy(y + t * Cs, b1, (size_t)C * sizeof(float));
        for (int j = 0; j < H; ++j) {
            uint64_t d;
            if (given) d = keep1 ? eq_mask_bits(keep1, H, j, t0, nt) : 0;
            else d = thr1 ? eq_bernoulli64_inline(&rng, thr1, lanes) : 0;
            drop1[j] = d;
            const uint64_t sel = ~d & lanes;
            if (sel) rank1((size_t)C, w1 + (size_t)j * C, sel, z + j, Hs, s1, y, Cs);
        }

        for (int t = 0; t < nt; ++t) {
            eq_activate(act, y + t * Cs, prob, C);
            if (out->probs) memcpy(out->probs + (size_t)(t0 + t) * C, prob, (size_t)C * sizeof(float));
            for (int c = 0; c < C; ++c) {
                const double d = (double)prob[c] - pdet[c];
                sum1[c] += d;
                sum2[c] += d * d;
            }
            ent += eq_entropy(act, prob, C);
        }
    }

    for (int c = 0; c < C; ++c) {
        const double m = sum1[c] / T, v = sum2[c] / T - m * m;
        out->mean[c] = pdet[c] + m;
        out->std[c] = v > 0.0 ? sqrt(v) : 0.0;
    }
    out->expected_entropy = T > 0 ? ent / T : 0.0;
    free(mem);
    return 0;
}
