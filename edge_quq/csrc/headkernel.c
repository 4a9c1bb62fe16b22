/* Native MC-dropout head kernel (see headkernel.h for the contract).
 *
 * Cost model, for the paper's head (F=2048, H=300, C=100, p0=0.2, p1=0.4):
 *  - Layer 1 is computed once densely (x.W0, the eval-mode pass); every sample then only touches the rows of
 *    W0 whose unit it drops (subtract) or keeps (add), whichever set is smaller, so a sample costs
 *    min(p0, 1-p0) of a dense product. Rows with x_i == 0 are compacted out before anything else.
 *  - Layer 2 cannot reuse a precomputed sum: the hidden activations differ per sample, so "dense minus dropped"
 *    would cost 1+p1 against 1-p1 for adding the kept rows. We add kept rows and also skip hidden units that
 *    the ReLU zeroed (typically half of them).
 *  - Samples are processed in chunks of 64 lanes (plus the eval-mode pass). W is cut into row blocks whose
 *    slice under one column block fits L1; per block, the masks become one list per lane of positions and
 *    coefficients. The gather micro-kernel copies each slice into an aligned, contiguous tile (the eval-mode
 *    pass multiplies every row on the way), then walks every lane's list over the tile with the lane's output
 *    columns held in registers (one weight load and one FMA per multiply-add, no store of the outputs per row).
 *    W0 (2.4 MB for the paper's head) is read from memory once per chunk.
 *  - Masks are 64-lane bit sets (bit t = sample t). They are drawn bit-sliced: a Bernoulli(p) for 64 lanes
 *    compares 64 32-bit uniforms to floor(p * 2^32) most significant bit first, one 64-bit random word per bit
 *    position, stopping once every lane is decided (about 7-8 words for 64 lanes instead of 64 draws). The
 *    result has exactly the distribution of comparing a 32-bit uniform draw against the threshold.
 * Where the time goes (AMD EPYC Zen 3 VM, 2 shared cores; F=2048, H=300, C=100, ReLU features, T=50; per-phase
 * minimum thread CPU time over 400 calls, 292 us a call, before the two changes kept below): layer-1 gather 56% (the
 * tile copy, which streams W0 from L3 and takes the eval-mode pass, is ~10% of the call: 2.4 MB at ~40 GB/s),
 * building the lanes' lists 14%, layer-1 masks 7%, layer 2 (masks, lane sets, gather) 12%, outputs and moments 6%,
 * lane-set transposes 3%. The lane loop is the bound: alone, with the tile in L1 (50 lanes, 17 of 85 rows each), it
 * runs at 29 GMAC/s = 62% of the core's FMA peak, 70% when every row is taken. It issues one weight load per FMA, so
 * the two 256-bit load ports and the two FMA pipes are both full. More FMAs per load would need several lanes to
 * share rows, and at min(p, 1-p) = 0.2 two lanes share only 4% of their rows. Measured in the same run against the
 * previous kernel, and not kept (no gain beyond +-3% noise, or a loss): prefetching the next row block; lanes
 * reading W without the tile (15% slower: rows of 300 floats start 16, 32 or 48 bytes into a line, so many of their
 * vector loads split two lines); folding the layer-1 coefficient into the tile (adds instead of FMAs); tiles of
 * 4K-12K floats; row blocks aligned to 64; decoding bits to positions 8 at a time. Kept: masks and the nonzero
 * compaction without data-dependent branches (branch mispredictions a call 10.6k -> 7.6k under cachegrind, same PRNG
 * stream, bit-identical results), and 13 instead of 12 output vectors per lane on AVX2 (3 column blocks for H=300
 * instead of 4: 21% fewer scalar instructions in the gather). In three runs of bench/bench_kernel.py against the
 * previous kernel the ReLU heads with C = 1000 gained 1.06-1.32x (layer 2's 1000 columns take 10 column blocks
 * instead of 11); every other shape stayed within the noise. On a quiet spell the kernel runs at 29-31% of the FMA
 * peak on the F = 1280/2048 heads (13-14 executed GMAC/s of 46), as the previous one did; under load both fall to
 * 15-21%.
 * Precision: all products and sums are float32 like the numpy reference (which runs float32 BLAS); the
 * "dense minus dropped rows" update reorders the sums, so results match the reference to float32 rounding of
 * the pre-activation magnitudes, not bit for bit. Moments are accumulated in double, shifted by the
 * eval-mode output so that the one-pass variance does not cancel catastrophically.
 */
#include "headkernel.h"
#include "simd_math.h"

#include <math.h>
#include <stdio.h>
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

/* ---------------------------------------------------------------- micro-kernels: gathered-row accumulate */

/* The parameters of every variant (eq_f32_gather_fn). */
#define EQ_GATHER_ARGS                                                                                         \
    size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea, float *ey, int nl,     \
        const int32_t *pos, const float *coef, const int32_t *cnt, size_t ls, float *const *ys, float *tile

void eq_f32_gather__scalar(EQ_GATHER_ARGS) {
    (void)tile;
    if (ey)
        for (int p = 0; p < np; ++p) {
            const float c = ea[p], *wr = w + (size_t)wrows[p] * ldw;
            for (size_t j = 0; j < n; ++j) ey[j] += c * wr[j];
        }
    for (int l = 0; l < nl; ++l) {
        float *y = ys[l];
        for (int k = 0; k < cnt[l]; ++k) {
            const float c = coef[l * ls + k], *wr = w + (size_t)wrows[pos[l * ls + k]] * ldw;
            for (size_t j = 0; j < n; ++j) y[j] += c * wr[j];
        }
    }
}

/* One column block of NV vectors (columns j..j + NV*VL) of the row block. First the block's rows are copied into
 * the tile, contiguous and aligned (W's own rows are not: a 300-column row starts 48 bytes into a cache line every
 * fourth row, and a third of a misaligned row's vector loads would straddle two lines), with the eval-mode lane
 * added on the way (every row, its zero coefficients too, so no branch). Then every lane walks its list over the
 * tile, which stays in L1, holding its output columns in registers: one weight load and one FMA per multiply-add,
 * the coefficient read from the list beside the position (no dependent load). NV is a compile-time constant at
 * every call site (EQ_SWITCH_NV), so the accumulator arrays are fully unrolled into registers. WLAST loads a row's
 * last vector (partial where the row ends inside it; the tile is zero there); the outputs are loaded and stored
 * whole, into the padding of ys (see headkernel.h). */
#define EQ_GATHER_BLOCK(V, VL, NV, LOAD, STORE, SPLAT, FMA, WLAST)                                              \
    {                                                                                                          \
        enum { RW = (NV) * (VL) };                                                                             \
        V acc[NV];                                                                                             \
        if (ey) {                                                                                              \
            for (int v = 0; v < NV; ++v) acc[v] = LOAD(ey + j + v * VL);                                       \
            for (int p = 0; p < np; ++p) {                                                                     \
                const float *wr = w + (size_t)wrows[p] * ldw + j;                                              \
                float *tp = tile + (size_t)p * RW;                                                             \
                const V c = SPLAT(ea[p]);                                                                      \
                for (int v = 0; v < NV - 1; ++v) {                                                             \
                    const V x = LOAD(wr + v * VL);                                                             \
                    STORE(tp + v * VL, x);                                                                     \
                    acc[v] = FMA(c, x, acc[v]);                                                                \
                }                                                                                              \
                const V x = WLAST(wr + (NV - 1) * VL);                                                         \
                STORE(tp + (NV - 1) * VL, x);                                                                  \
                acc[NV - 1] = FMA(c, x, acc[NV - 1]);                                                          \
            }                                                                                                  \
            for (int v = 0; v < NV; ++v) STORE(ey + j + v * VL, acc[v]);                                       \
        } else {                                                                                               \
            for (int p = 0; p < np; ++p) {                                                                     \
                const float *wr = w + (size_t)wrows[p] * ldw + j;                                              \
                float *tp = tile + (size_t)p * RW;                                                             \
                for (int v = 0; v < NV - 1; ++v) STORE(tp + v * VL, LOAD(wr + v * VL));                        \
                STORE(tp + (NV - 1) * VL, WLAST(wr + (NV - 1) * VL));                                          \
            }                                                                                                  \
        }                                                                                                      \
        for (int l = 0; l < nl; ++l) {                                                                         \
            const int m = cnt[l];                                                                              \
            if (!m) continue;                                                                                  \
            const int32_t *r = pos + l * ls;                                                                   \
            const float *cf = coef + l * ls;                                                                   \
            float *y = ys[l] + j;                                                                              \
            for (int v = 0; v < NV; ++v) acc[v] = LOAD(y + v * VL);                                            \
            for (int k = 0; k < m; ++k) {                                                                      \
                const float *tp = tile + (size_t)r[k] * RW;                                                    \
                const V c = SPLAT(cf[k]);                                                                      \
                for (int v = 0; v < NV; ++v) acc[v] = FMA(c, LOAD(tp + v * VL), acc[v]);                       \
            }                                                                                                  \
            for (int v = 0; v < NV; ++v) STORE(y + v * VL, acc[v]);                                            \
        }                                                                                                      \
    }

#define EQ_CASE(NV, BLOCK) case NV: BLOCK(NV); break;
#define EQ_SWITCH_NV(nv, BLOCK)                                                                                \
    switch (nv) {                                                                                              \
        EQ_CASE(1, BLOCK) EQ_CASE(2, BLOCK) EQ_CASE(3, BLOCK) EQ_CASE(4, BLOCK) EQ_CASE(5, BLOCK)              \
        EQ_CASE(6, BLOCK) EQ_CASE(7, BLOCK) EQ_CASE(8, BLOCK) EQ_CASE(9, BLOCK) EQ_CASE(10, BLOCK)             \
        EQ_CASE(11, BLOCK) EQ_CASE(12, BLOCK) EQ_CASE(13, BLOCK) EQ_CASE(14, BLOCK) EQ_CASE(15, BLOCK)         \
        EQ_CASE(16, BLOCK) default: break;                                                                     \
    }

/* All ceil(n / VL) vectors in blocks of at most maxv, as even as possible: a block of 1-2 vectors would leave the
 * FMA units waiting on its 1-2 dependency chains, so 320 columns of AVX2 (40 vectors, at most 13 per block)
 * go as 10+10+10+10, not 13+13+13+1. BLOCK_FULL for blocks whose last vector
 * is whole, BLOCK_TAIL for the last block when n is not a multiple of VL (its rows' last vector is loaded
 * partially). */
#define EQ_BALANCED(maxv, VL, BLOCK_FULL, BLOCK_TAIL)                                                          \
    do {                                                                                                       \
        const size_t nvec_ = (n + (VL) - 1) / (VL), nb_ = (nvec_ + (maxv) - 1) / (maxv);                        \
        for (size_t b_ = 0; b_ < nb_; ++b_) {                                                                  \
            const size_t v0_ = nvec_ * b_ / nb_, nv_ = nvec_ * (b_ + 1) / nb_ - v0_;                           \
            const size_t j = v0_ * (VL);                                                                       \
            if (b_ + 1 == nb_ && n % (VL)) {                                                                   \
                EQ_SWITCH_NV(nv_, BLOCK_TAIL)                                                                  \
            } else {                                                                                           \
                EQ_SWITCH_NV(nv_, BLOCK_FULL)                                                                  \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

/* NAME(p, n): the first n % 4 floats at p, zero beyond, as a vector (a 4-lane row's last, partial vector). */
#define EQ_DEF_PARTIAL4(NAME, V, LOAD)                                                                          \
    static inline V NAME(const float *p, size_t n) {                                                           \
        float b[4];                                                                                            \
        for (size_t i = 0; i < 4; ++i) b[i] = i < n % 4 ? p[i] : 0.0f;                                         \
        return LOAD(b);                                                                                        \
    }

#ifdef EQ_X86
static inline __m128 eq_sse_madd(__m128 c, __m128 w, __m128 acc) { return _mm_add_ps(acc, _mm_mul_ps(c, w)); }
EQ_DEF_PARTIAL4(eq_sse_partial, __m128, _mm_loadu_ps)
#define EQ_SSE_WTAIL(p) eq_sse_partial((p), n)
#define EQ_SSE_FULL(NV) EQ_GATHER_BLOCK(__m128, 4, NV, _mm_loadu_ps, _mm_storeu_ps, _mm_set1_ps, eq_sse_madd, _mm_loadu_ps)
#define EQ_SSE_TAIL(NV) EQ_GATHER_BLOCK(__m128, 4, NV, _mm_loadu_ps, _mm_storeu_ps, _mm_set1_ps, eq_sse_madd, EQ_SSE_WTAIL)

/* No FMA on SSE2: mul then add, every column alike. */
void eq_f32_gather__sse2_x48(EQ_GATHER_ARGS) { EQ_BALANCED(12, 4, EQ_SSE_FULL, EQ_SSE_TAIL); }

EQ_AVX2 static inline __m256 eq_avx_fma(__m256 c, __m256 w, __m256 acc) { return _mm256_fmadd_ps(c, w, acc); }
EQ_AVX2 static inline __m256 eq_avx_splat(float c) { return _mm256_set1_ps(c); }
EQ_AVX2 static inline __m256 eq_avx_load(const float *p) { return _mm256_loadu_ps(p); }
EQ_AVX2 static inline void eq_avx_store(float *p, __m256 v) { _mm256_storeu_ps(p, v); }
#define EQ_AVX_WTAIL(p) _mm256_maskload_ps((p), tail)
#define EQ_AVX_FULL(NV) EQ_GATHER_BLOCK(__m256, 8, NV, eq_avx_load, eq_avx_store, eq_avx_splat, eq_avx_fma, eq_avx_load)
#define EQ_AVX_TAIL(NV) EQ_GATHER_BLOCK(__m256, 8, NV, eq_avx_load, eq_avx_store, eq_avx_splat, eq_avx_fma, EQ_AVX_WTAIL)

EQ_AVX2
void eq_f32_gather__avx2_fma_x104(EQ_GATHER_ARGS) {
    const int rem = (int)(n % 8);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    /* Up to 13 accumulators (104 columns) per lane: 13 + the coefficient fill 14 of the 16 ymm registers without
     * a spill, and a 300-column layer takes 3 column blocks instead of 4 at 12, so a quarter fewer per-lane
     * output loads/stores and loop exits (cachegrind: 21% fewer scalar instructions in this function). */
    EQ_BALANCED(13, 8, EQ_AVX_FULL, EQ_AVX_TAIL);
}
#endif

#ifdef EQ_ARM64
static inline float32x4_t eq_neon_fma(float32x4_t c, float32x4_t w, float32x4_t acc) { return vfmaq_f32(acc, c, w); }
EQ_DEF_PARTIAL4(eq_neon_partial, float32x4_t, vld1q_f32)
#define EQ_NEON_WTAIL(p) eq_neon_partial((p), n)
#define EQ_NEON_FULL(NV) EQ_GATHER_BLOCK(float32x4_t, 4, NV, vld1q_f32, vst1q_f32, vdupq_n_f32, eq_neon_fma, vld1q_f32)
#define EQ_NEON_TAIL(NV) EQ_GATHER_BLOCK(float32x4_t, 4, NV, vld1q_f32, vst1q_f32, vdupq_n_f32, eq_neon_fma, EQ_NEON_WTAIL)

void eq_f32_gather__neon_x64(EQ_GATHER_ARGS) { EQ_BALANCED(16, 4, EQ_NEON_FULL, EQ_NEON_TAIL); }
#endif

/* ---------------------------------------------------------------- int8 first layer (dot-product variants) */

/* Every sample's input against every column, dense over the packed rows: an int8 dot product sums 4 consecutive
 * rows, so it cannot skip a single sample's dropped rows the way the float gathers do (docs/samplers.md). */
void eq_i8_gemm__scalar(int G, size_t hp, const int8_t *wp, int ntp, const int8_t *xi, int32_t *acc) {
    memset(acc, 0, (size_t)ntp * hp * sizeof(int32_t));
    for (int g = 0; g < G; ++g) {
        const int8_t *wg = wp + (size_t)g * hp * 4;
        for (int t = 0; t < ntp; ++t) {
            const int8_t *x = xi + ((size_t)g * (size_t)ntp + (size_t)t) * 4;
            if (!(x[0] | x[1] | x[2] | x[3])) continue;
            int32_t *a = acc + (size_t)t * hp;
            for (size_t j = 0; j < hp; ++j)
                a[j] += x[0] * wg[4 * j] + x[1] * wg[4 * j + 1] + x[2] * wg[4 * j + 2] + x[3] * wg[4 * j + 3];
        }
    }
}

/* ARMv8.2 dot product (Cortex-A76, Pi 5) in a function compiled for it, so that the rest of the file stays
 * ARMv8.0 and an A72 never runs it (chosen from HWCAP_ASIMDDP). Compilers whose arm_neon.h cannot give the
 * intrinsics to one function (gcc < 10, clang < 16) leave the variant out unless the whole build targets it;
 * -DEQ_NO_SDOT does the same (the tests build that fallback). */
#if defined(EQ_ARM64) && !defined(EQ_NO_SDOT) &&                                                              \
    (defined(__ARM_FEATURE_DOTPROD) || (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) ||          \
     (defined(__clang__) && __clang_major__ >= 16))
#define EQ_HAVE_SDOT 1
#if defined(__ARM_FEATURE_DOTPROD)
#define EQ_SDOT
#elif defined(__clang__)
#define EQ_SDOT __attribute__((target("dotprod")))
#else
#define EQ_SDOT __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* Tile: 4 samples x 16 columns in 16 int32x4 accumulators; per group of 4 rows, 4 weight loads and one input
 * load feed 16 sdot (256 multiply-adds). Groups go in blocks whose weights (EQ_SDOT_GB x 64 bytes per column
 * block) stay in L1 while every sample quad walks them. */
enum { EQ_SDOT_GB = 256 };
#define EQ_SDOT_ROW(s)                                                                                         \
    a##s##0 = vdotq_laneq_s32(a##s##0, w0, xv, s); a##s##1 = vdotq_laneq_s32(a##s##1, w1, xv, s);              \
    a##s##2 = vdotq_laneq_s32(a##s##2, w2, xv, s); a##s##3 = vdotq_laneq_s32(a##s##3, w3, xv, s);
#define EQ_SDOT_LD(s)                                                                                          \
    int32x4_t a##s##0 = vld1q_s32(o + (s) * hp), a##s##1 = vld1q_s32(o + (s) * hp + 4),                        \
              a##s##2 = vld1q_s32(o + (s) * hp + 8), a##s##3 = vld1q_s32(o + (s) * hp + 12);
#define EQ_SDOT_ST(s)                                                                                          \
    vst1q_s32(o + (s) * hp, a##s##0); vst1q_s32(o + (s) * hp + 4, a##s##1);                                    \
    vst1q_s32(o + (s) * hp + 8, a##s##2); vst1q_s32(o + (s) * hp + 12, a##s##3);

EQ_SDOT void eq_i8_gemm__neon_sdot(int G, size_t hp, const int8_t *wp, int ntp, const int8_t *xi, int32_t *acc) {
    memset(acc, 0, (size_t)ntp * hp * sizeof(int32_t));
    for (int g0 = 0; g0 < G; g0 += EQ_SDOT_GB) {
        const int g1 = G - g0 < EQ_SDOT_GB ? G : g0 + EQ_SDOT_GB;
        for (size_t j = 0; j < hp; j += 16)
            for (int q = 0; q < ntp; q += 4) {
                int32_t *o = acc + (size_t)q * hp + j;
                EQ_SDOT_LD(0) EQ_SDOT_LD(1) EQ_SDOT_LD(2) EQ_SDOT_LD(3)
                const int8_t *wg = wp + ((size_t)g0 * hp + j) * 4, *xg = xi + ((size_t)g0 * (size_t)ntp + (size_t)q) * 4;
                for (int g = g0; g < g1; ++g, wg += hp * 4, xg += (size_t)ntp * 4) {
                    const int8x16_t w0 = vld1q_s8(wg), w1 = vld1q_s8(wg + 16), w2 = vld1q_s8(wg + 32),
                                    w3 = vld1q_s8(wg + 48), xv = vld1q_s8(xg);
                    EQ_SDOT_ROW(0) EQ_SDOT_ROW(1) EQ_SDOT_ROW(2) EQ_SDOT_ROW(3)
                }
                EQ_SDOT_ST(0) EQ_SDOT_ST(1) EQ_SDOT_ST(2) EQ_SDOT_ST(3)
            }
    }
}
#endif

size_t eq_w0q_stride(int H) { return ((size_t)H + 15) & ~(size_t)15; }

static inline int8_t eq_q8(float v) {
    const float r = nearbyintf(v);
    return (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
}

void eq_quantize_w0(int F, int H, const float *w0, int8_t *w0q, float *w0s) {
    const size_t hp = eq_w0q_stride(H);
    for (int j = 0; j < H; ++j) w0s[j] = 0.0f;
    for (int i = 0; i < F; ++i)
        for (int j = 0; j < H; ++j) {
            const float a = fabsf(w0[(size_t)i * H + j]);
            w0s[j] = a > w0s[j] ? a : w0s[j];
        }
    for (int j = 0; j < H; ++j) w0s[j] = w0s[j] > 0.0f ? w0s[j] / 127.0f : 1.0f;
    for (int i = 0; i < F; ++i) {
        int8_t *q = w0q + (size_t)i * hp;
        for (int j = 0; j < H; ++j) q[j] = eq_q8(w0[(size_t)i * H + j] / w0s[j]);
        memset(q + H, 0, hp - (size_t)H);
    }
}

/* Rows r[0..3] side by side, [hp][4]: the operand layout of a 4-way dot product. */
static void eq_pack4(const int8_t *const r[4], size_t hp, int8_t *out) {
#ifdef EQ_ARM64
    for (size_t j = 0; j < hp; j += 16, out += 64) {
        const int8x16_t a = vld1q_s8(r[0] + j), b = vld1q_s8(r[1] + j), c = vld1q_s8(r[2] + j), d = vld1q_s8(r[3] + j);
        const int16x8_t ab0 = vreinterpretq_s16_s8(vzip1q_s8(a, b)), ab1 = vreinterpretq_s16_s8(vzip2q_s8(a, b));
        const int16x8_t cd0 = vreinterpretq_s16_s8(vzip1q_s8(c, d)), cd1 = vreinterpretq_s16_s8(vzip2q_s8(c, d));
        vst1q_s8(out, vreinterpretq_s8_s16(vzip1q_s16(ab0, cd0)));
        vst1q_s8(out + 16, vreinterpretq_s8_s16(vzip2q_s16(ab0, cd0)));
        vst1q_s8(out + 32, vreinterpretq_s8_s16(vzip1q_s16(ab1, cd1)));
        vst1q_s8(out + 48, vreinterpretq_s8_s16(vzip2q_s16(ab1, cd1)));
    }
#else
    for (size_t j = 0; j < hp; ++j)
        for (int k = 0; k < 4; ++k) out[4 * j + (size_t)k] = r[k][j];
#endif
}

/* ---------------------------------------------------------------- run-time dispatch */

static double eq_activate__scalar(int act, const float *logits, float *p, int C);
#ifdef EQ_X86
static double eq_activate__avx2(int act, const float *logits, float *p, int C);
#endif

static eq_kernels_t eq_table[4];
static int eq_table_n = -1;
static char eq_features[64];

/* Feature names as /proc/cpuinfo spells them ("flags" on x86, "Features" on ARM), in EQ_F_* bit order. */
static const char *const eq_feature_names[] = {"sse2", "avx2", "fma", "asimd", "asimddp", "avx512_vnni", "avx_vnni"};

unsigned eq_features_from_cpuinfo(const char *text) {
    unsigned f = 0;
    for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (strncmp(line, "flags", 5) != 0 && strncmp(line, "Features", 8) != 0) continue;
        const char *colon = strchr(line, ':'), *end = strchr(line, '\n');
        if (!colon || (end && colon > end)) continue;
        const char *p = colon + 1;
        if (!end) end = p + strlen(p);
        while (p < end) {
            while (p < end && (*p == ' ' || *p == '\t')) ++p;
            const char *q = p;
            while (q < end && *q != ' ' && *q != '\t' && *q != '\r') ++q;
            for (unsigned i = 0; i < sizeof eq_feature_names / sizeof *eq_feature_names; ++i)
                if ((size_t)(q - p) == strlen(eq_feature_names[i]) && strncmp(p, eq_feature_names[i], (size_t)(q - p)) == 0)
                    f |= 1u << i;
            p = q;
        }
        break; /* the first processor's line speaks for all */
    }
    return f;
}

static unsigned eq_detect_features(void) {
    unsigned f = 0;
#ifdef EQ_X86
    f |= EQ_F_SSE2;
#if defined(__GNUC__) || defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= EQ_F_AVX2;
    if (__builtin_cpu_supports("fma")) f |= EQ_F_FMA;
#endif
#endif
#ifdef EQ_ARM64
    f |= EQ_F_ASIMD;
#if defined(__linux__)
    /* The kernel's hwcaps, not /proc/cpuinfo: they are what the CPU and the OS actually enable. */
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) f |= EQ_F_ASIMDDP;
#endif
#endif
    return f;
}

int eq_kernels_for(unsigned features, eq_kernels_t *table, int max, char *names, size_t names_size) {
    int n = 0;
#ifdef EQ_X86
    if ((features & (EQ_F_AVX2 | EQ_F_FMA)) == (EQ_F_AVX2 | EQ_F_FMA) && n < max)
        table[n++] = (eq_kernels_t){"avx2_fma", eq_f32_gather__avx2_fma_x104, eq_activate__avx2, NULL};
    if (n < max) table[n++] = (eq_kernels_t){"sse2", eq_f32_gather__sse2_x48, eq_activate__scalar, NULL};
#endif
#ifdef EQ_ARM64
#ifdef EQ_HAVE_SDOT
    /* Dot product (ARMv8.2, Cortex-A76/Pi 5): int8 first layer, float second layer (docs/samplers.md). */
    if ((features & EQ_F_ASIMDDP) && n < max)
        table[n++] = (eq_kernels_t){"neon_sdot", eq_f32_gather__neon_x64, eq_activate__scalar, eq_i8_gemm__neon_sdot};
#endif
    /* ARMv8.0 NEON everywhere (Cortex-A72/Pi 4 and up). */
    if (n < max) table[n++] = (eq_kernels_t){"neon", eq_f32_gather__neon_x64, eq_activate__scalar, NULL};
#endif
    if (n < max) table[n++] = (eq_kernels_t){"scalar", eq_f32_gather__scalar, eq_activate__scalar, NULL};
    if (names && names_size) {
        names[0] = '\0';
        size_t used = 0;
        for (unsigned i = 0; i < sizeof eq_feature_names / sizeof *eq_feature_names; ++i) {
            if (!(features & (1u << i))) continue;
            const int w = snprintf(names + used, names_size - used, "%s%s", used ? "," : "", eq_feature_names[i]);
            if (w < 0 || (size_t)w >= names_size - used) break;
            used += (size_t)w;
        }
    }
    return n;
}

static void eq_init_table(void) {
    /* Idempotent and writes the same values every time, so a racing first call is harmless. */
    eq_table_n = eq_kernels_for(eq_detect_features(), eq_table, 4, eq_features, sizeof eq_features);
}

int eq_kernels_count(void) {
    if (eq_table_n < 0) eq_init_table();
    return eq_table_n;
}

const eq_kernels_t *eq_kernels_get(int i) {
    if (i < 0 || i >= eq_kernels_count()) return NULL;
    return &eq_table[i];
}

/* The int8 variants' reference: plain C int8 first layer, plain C float second layer; runs anywhere. */
static const eq_kernels_t eq_scalar_i8 = {"scalar_i8", eq_f32_gather__scalar, eq_activate__scalar, eq_i8_gemm__scalar};

const eq_kernels_t *eq_kernels_find(const char *name) {
    for (int i = 0; i < eq_kernels_count(); ++i)
        if (strcmp(eq_table[i].name, name) == 0) return &eq_table[i];
    return strcmp(name, eq_scalar_i8.name) == 0 ? &eq_scalar_i8 : NULL;
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
    if (!thr) return 0;
    /* Lanes still equal to thr's prefix stay >= thr (kept) once thr's remaining bits are all zero: below its
     * lowest set bit nothing is drawn. */
    const int kmin = (int)eq_ctz64(thr);
    for (int k = 31; k >= kmin && undecided; --k) {
        const uint64_t bits = eq_rng_next_inline(r);
        /* Without a branch on thr's bit (its pattern, 0011 0011... for p = 0.2, mispredicted twice per draw):
         * where thr has 1, uniform has 0 decides "uniform < thr", dropped, and 1 stays undecided; where thr has 0,
         * uniform has 1 decides "kept" and 0 stays undecided. */
        const uint64_t one = 0 - (uint64_t)((thr >> k) & 1u);
        drop |= undecided & ~bits & one;
        undecided &= ~(bits ^ one);
    }
    return drop;
}

uint64_t eq_bernoulli64(eq_rng_t *r, uint32_t threshold, uint64_t lanes) {
    return eq_bernoulli64_inline(r, threshold, lanes);
}

/* ---------------------------------------------------------------- the sampler */

static inline float eq_clipf(float v) { return v < 1e-12f ? 1e-12f : (v > 1.0f ? 1.0f : v); }

/* Outputs p of one sample's logits and their entropy (edge_quq.sampler.sample_entropy: Shannon for softmax, sum
 * of binary entropies otherwise). Sigmoid and softmax take the entropy from quantities the activation already
 * has, with fewer logs and no branch on the logit's sign (a coin flip, so a branch would mispredict):
 *   sigmoid, e = exp(-|v|):  p = 1/(1+e) or e/(1+e),  H = log1p(e) + |v| e/(1+e)  (one log instead of two);
 *   softmax, s = sum exp(v - max):  H = log s - sum p (v - max).
 * The reference clips p to [1e-12, 1] before its logs; that changes a class's term by < 3e-11. */
/* Sigmoid outputs and binary entropies of logits[c0..C), one class at a time. */
static double eq_sigmoid_tail(const float *logits, float *p, int c0, int C) {
    double h = 0.0;
    for (int c = c0; c < C; ++c) {
        const float v = logits[c], a = fabsf(v), e = expf(-a), r = 1.0f / (1.0f + e), er = e * r;
        /* log1p(e) without glibc's slow log1pf: logf(1 + e), or its series where 1 + e would round. */
        const float l = e < 1e-3f ? e * (1.0f - e * (0.5f - e * (1.0f / 3.0f))) : logf(1.0f + e);
        p[c] = v >= 0.0f ? r : er;
        h += (double)(l + a * er);
    }
    return h;
}

static double eq_activate__scalar(int act, const float *logits, float *p, int C) {
    double h = 0.0;
    if (act == EQ_ACT_SIGMOID) {
        h = eq_sigmoid_tail(logits, p, 0, C);
    } else if (act == EQ_ACT_SOFTMAX) {
        float m = logits[0];
        for (int c = 1; c < C; ++c) m = logits[c] > m ? logits[c] : m;
        float s = 0.0f;
        for (int c = 0; c < C; ++c) s += (p[c] = expf(logits[c] - m));
        const float inv = 1.0f / s;
        double pv = 0.0;
        for (int c = 0; c < C; ++c) {
            p[c] *= inv;
            pv += (double)(p[c] * (logits[c] - m));
        }
        h = log((double)s) - pv;
    } else {
        memcpy(p, logits, (size_t)C * sizeof(float));
        for (int c = 0; c < C; ++c) {
            const float v = eq_clipf(p[c]), q = eq_clipf(1.0f - p[c]);
            h -= (double)(v * logf(v) + q * logf(q));
        }
    }
    return h;
}

#ifdef EQ_X86
EQ_AVX2 static inline double eq_avx_sum_pd(__m256 v) {
    const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

EQ_AVX2 static double eq_activate__avx2(int act, const float *logits, float *p, int C) {
    const int C8 = C & ~7;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    if (act == EQ_ACT_SIGMOID) {
        /* The entropy terms summed in double lanes, one horizontal sum at the end (not one per 8 classes). */
        __m256d hv = _mm256_setzero_pd();
        for (int c = 0; c < C8; c += 8) {
            const __m256 v = _mm256_loadu_ps(logits + c), a = _mm256_andnot_ps(sign, v);
            const __m256 e = eq_avx_exp(_mm256_xor_ps(a, sign)), u = _mm256_add_ps(one, e);
            const __m256 r = _mm256_div_ps(one, u), er = _mm256_mul_ps(e, r), l = eq_avx_log1p01(e);
            _mm256_storeu_ps(p + c, _mm256_blendv_ps(r, er, v)); /* sign bit of v set: e r */
            const __m256 hc = _mm256_fmadd_ps(a, er, l);
            hv = _mm256_add_pd(hv, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(hc)),
                                                 _mm256_cvtps_pd(_mm256_extractf128_ps(hc, 1))));
        }
        const __m128d h2 = _mm_add_pd(_mm256_castpd256_pd128(hv), _mm256_extractf128_pd(hv, 1));
        return _mm_cvtsd_f64(_mm_add_sd(h2, _mm_unpackhi_pd(h2, h2))) + eq_sigmoid_tail(logits, p, C8, C);
    }
    if (act != EQ_ACT_SOFTMAX) return eq_activate__scalar(act, logits, p, C);
    float m = logits[0];
    for (int c = 1; c < C; ++c) m = logits[c] > m ? logits[c] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (int c = 0; c < C8; c += 8) {
        const __m256 e = eq_avx_exp(_mm256_sub_ps(_mm256_loadu_ps(logits + c), vm));
        _mm256_storeu_ps(p + c, e);
        vs = _mm256_add_ps(vs, e);
    }
    float s = (float)eq_avx_sum_pd(vs);
    for (int c = C8; c < C; ++c) s += (p[c] = expf(logits[c] - m));
    const float inv = 1.0f / s;
    double pv = 0.0;
    for (int c = 0; c < C; ++c) {
        p[c] *= inv;
        pv += (double)(p[c] * (logits[c] - m));
    }
    return log((double)s) - pv;
}
#endif

static size_t eq_round16(size_t n) { return (n + 15) & ~(size_t)15; }

static uint64_t eq_mask_bits(const uint8_t *keep, int stride, int col, int t0, int nt) {
    uint64_t bits = 0;
    for (int t = 0; t < nt; ++t)
        if (!keep[(size_t)(t0 + t) * (size_t)stride + (size_t)col]) bits |= 1ULL << t;
    return bits;
}

/* Lists hold up to EQ_RBMAX rows per lane; the block height is chosen per call so that the block's slice of W
 * under one column block (at most EQ_TILE_COLS columns) is about 32 KB: the tile it is copied into stays in L1 while
 * every lane walks it. */
#ifndef EQ_RBMIN
#define EQ_RBMIN 64
#endif
#ifndef EQ_TILE_FLOATS
#define EQ_TILE_FLOATS 8192
#endif
enum { EQ_RBMAX = 256, EQ_LANES = 64, EQ_TILE_COLS = 104, EQ_TILE_MAX = EQ_RBMAX * EQ_TILE_COLS };

typedef struct {
    float tile[EQ_TILE_MAX]; /* first: 64-byte aligned */
    int32_t pos[EQ_LANES * EQ_RBMAX];
    float coef[EQ_LANES * EQ_RBMAX];
    int32_t cnt[EQ_LANES];
    int32_t wrows[EQ_RBMAX];
    float ea[EQ_RBMAX];
} eq_lists_t;

static int eq_block_rows(size_t n) {
    const size_t cols = n < EQ_TILE_COLS ? n : EQ_TILE_COLS, rb = EQ_TILE_FLOATS / (cols ? cols : 1);
    return rb < EQ_RBMIN ? EQ_RBMIN : (rb > EQ_RBMAX ? EQ_RBMAX : (int)rb);
}

/* 64 x 64 bit transpose: bit c of a[r] ends up as bit r of a[c] (Hacker's Delight, 6 rounds of block swaps). */
static void eq_transpose64(uint64_t a[64]) {
    uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j != 0; j >>= 1, m ^= m << j)
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
            const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }
}

/* Bit r set when z[r] != 0, r < n <= 64. */
static inline uint64_t eq_nonzero_bits(const float *z, int n) {
    uint64_t b = 0;
    int r = 0;
#ifdef EQ_X86
    for (; r + 4 <= n; r += 4)
        b |= (uint64_t)_mm_movemask_ps(_mm_cmpneq_ps(_mm_loadu_ps(z + r), _mm_setzero_ps())) << r;
#endif
    for (; r < n; ++r) b |= (uint64_t)(z[r] != 0.0f) << r;
    return b;
}

/* From row-major lane masks (sel[q] bit t: lane t uses position q < np) to lane-major row sets (lm[t * lmw + w]
 * bit r: lane t uses position 64 w + r), one 64 x 64 transpose per 64 positions; with z, also dropping the
 * positions whose coefficient z[t * zs + q] is zero (ReLU-zeroed hidden units). The per-lane row lists are then
 * read off the set bits in position order: no per-row, per-lane test and no scattered appends. */
static void eq_lane_sets(const uint64_t *sel, int np, int nt, uint64_t *lm, int lmw, const float *z, size_t zs) {
    for (int w = 0; w * 64 < np; ++w) {
        uint64_t m[64];
        const int n = np - w * 64 < 64 ? np - w * 64 : 64;
        for (int q = 0; q < 64; ++q) m[q] = q < n ? sel[w * 64 + q] : 0;
        eq_transpose64(m);
        for (int t = 0; t < nt; ++t)
            lm[(size_t)t * (size_t)lmw + (size_t)w] = z ? m[t] & eq_nonzero_bits(z + (size_t)t * zs + (size_t)w * 64, n) : m[t];
    }
}

/* The rows of W taking part are idx[0..np) (all rows when idx is NULL); lm holds each lane's positions as bit sets
 * (eq_lane_sets, lmw words per lane). For lanes t < nt:  y[t*ys : +n] += sum over its rows i of a[t*as + i] * W[i, 0:n];
 * and, when dense_y is given, one more lane over every row: dense_y += dense_a[i] * W[i] (the eval-mode pass,
 * done while the gather copies each block of W into its tile). Returns the multiply-adds counted: the lanes' rows
 * and the eval-mode lane's rows with a nonzero coefficient (its zero ones are multiplied, branch-free, but not
 * counted). */
static uint64_t eq_masked_gemm(const eq_kernels_t *k, eq_lists_t *L, const int32_t *idx, int np, size_t n,
                               const float *w, const uint64_t *lm, int lmw, const float *a, size_t as, float *y,
                               size_t ys, int nt, const float *dense_a, float *dense_y) {
    float *yp[EQ_LANES];
    int32_t *restrict cnt = L->cnt, *restrict wrows = L->wrows;
    const int rb = eq_block_rows(n);
    for (int t = 0; t < nt; ++t) yp[t] = y + (size_t)t * ys;
    uint64_t rows = 0;
    for (int q0 = 0; q0 < np; q0 += rb) {
        const int q1 = np - q0 < rb ? np : q0 + rb;
        for (int q = q0; q < q1; ++q) wrows[q - q0] = idx ? idx[q] : q;
        if (dense_y)
            for (int p = 0; p < q1 - q0; ++p) rows += (L->ea[p] = dense_a[wrows[p]]) != 0.0f;
        for (int t = 0; t < nt; ++t) {
            const uint64_t *lt = lm + (size_t)t * (size_t)lmw;
            const float *at = a + (size_t)t * as;
            int32_t *restrict lp = L->pos + (size_t)t * EQ_RBMAX, c = 0;
            float *restrict lc = L->coef + (size_t)t * EQ_RBMAX;
            for (int wi = q0 >> 6; wi <= (q1 - 1) >> 6; ++wi) {
                const int lo = wi * 64;
                uint64_t bits = lt[wi];
                if (lo < q0) bits &= ~0ULL << (q0 - lo);
                if (q1 - lo < 64) bits &= (1ULL << (q1 - lo)) - 1;
                for (; bits; bits &= bits - 1) {
                    const int p = lo + (int)eq_ctz64(bits) - q0;
                    lp[c] = p;
                    lc[c++] = at[wrows[p]];
                }
            }
            cnt[t] = c;
            rows += (uint64_t)c;
        }
        k->gather(n, w, n, wrows, q1 - q0, L->ea, dense_y, nt, L->pos, L->coef, cnt, EQ_RBMAX, yp, L->tile);
    }
    return rows * n;
}

/* Eval-mode outputs (no dropout): the deterministic logits and the shift of the moment sums. */
static void eq_eval_outputs(int act, int C, const float *yeval, float *det_logits, double *pdet) {
    memcpy(det_logits, yeval, (size_t)C * sizeof(float));
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

typedef struct {
    const eq_head_t *hd;
    const eq_kernels_t *k;
    eq_lists_t *lists;
    size_t Hs, Cs;
    float s0, s1;
    uint32_t thr0, thr1;
    eq_rng_t rng;
    int given, subtract, nnz;
    int32_t *nz; /* the nonzero features' indices */
    uint64_t *lm; /* lane-major row sets of the current layer (eq_lane_sets), lmw0 words per lane for layer 1 */
    int lmw0;
    const uint8_t *keep0, *keep1;
    float *xs, *xw, *zfull, *heval, *yeval, *prob, *z, *y;
    uint64_t *sel0, *sel1;
    double *pdet, *sum1, *sum2, ent;
    uint64_t macs;
    /* int8 variants: the nonzero rows of W0 packed in groups of 4 [G][hp][4], the quantised inputs xq [G*4], the
     * chunk's masked inputs xi [G][ntp][4], the integer sums acc [64][hp], the per-column dequantisation deq [H]. */
    int G;
    size_t hp;
    int8_t *wp, *xq, *xi;
    int32_t *acc;
    float *deq;
} eq_run_t;

/* Drop bits of the chunk's lanes for every nonzero feature into sel0 (the same stream for every variant);
 * returns how many units were dropped. */
static uint64_t eq_draw_layer1(eq_run_t *r, int t0, int nt, uint64_t lanes) {
    uint64_t ndrop = 0;
    for (int q = 0; q < r->nnz; ++q) {
        uint64_t d;
        if (r->given) d = r->keep0 ? eq_mask_bits(r->keep0, r->hd->F, r->nz[q], t0, nt) : 0;
        else d = r->thr0 ? eq_bernoulli64_inline(&r->rng, r->thr0, lanes) : 0;
        ndrop += eq_popcount64(d);
        r->sel0[q] = d;
    }
    return ndrop;
}

/* Layer 1 for lanes [t0, t0+nt): subtract the dropped rows from the dense sum, or add the kept rows to the bias,
 * whichever touches fewer rows; leaves s1 * ReLU(pre-activation) in z, the coefficients of layer 2. The first
 * chunk builds the dense sum x.W0 in the same walk over W0 (2.4 MB for the paper's head, beyond L2). */
static void eq_layer1(eq_run_t *r, int t0, int nt, uint64_t lanes) {
    const eq_head_t *hd = r->hd;
    const int H = hd->H, first = t0 == 0;
    /* Only the nonzero features draw masks and take part: nothing of a zero feature reaches the output. */
    const uint64_t ndrop = eq_draw_layer1(r, t0, nt, lanes);
    r->subtract = ndrop * 2 <= (uint64_t)r->nnz * (uint64_t)nt;
    if (!r->subtract)
        for (int q = 0; q < r->nnz; ++q) r->sel0[q] = ~r->sel0[q] & lanes;
    for (int t = 0; t < nt; ++t) {
        if (r->subtract) memset(r->z + t * r->Hs, 0, (size_t)H * sizeof(float));
        else memcpy(r->z + t * r->Hs, hd->b0, (size_t)H * sizeof(float));
    }
    if (first) memset(r->xw, 0, r->Hs * sizeof(float));
    eq_lane_sets(r->sel0, r->nnz, nt, r->lm, r->lmw0, NULL, 0);
    r->macs += eq_masked_gemm(r->k, r->lists, r->nz, r->nnz, (size_t)H, hd->w0, r->lm, r->lmw0, r->xs, 0, r->z, r->Hs,
                              nt, hd->x, first ? r->xw : NULL);
    if (first)
        for (int j = 0; j < H; ++j) {
            const float v = r->xw[j] + hd->b0[j];
            r->heval[j] = v > 0.0f ? v : 0.0f;
            r->zfull[j] = hd->b0[j] + r->s0 * r->xw[j];
        }
    /* Branch-free so that it vectorises: the ReLU's sign is a coin flip per unit, a branch would mispredict. */
    const float s1 = r->s1;
    const float *restrict zf = r->zfull;
    for (int t = 0; t < nt; ++t) {
        float *restrict zt = r->z + t * r->Hs;
        if (r->subtract)
            for (int j = 0; j < H; ++j) {
                const float v = zf[j] - zt[j];
                zt[j] = (v > 0.0f ? v : 0.0f) * s1;
            }
        else
            for (int j = 0; j < H; ++j) zt[j] = (zt[j] > 0.0f ? zt[j] : 0.0f) * s1;
    }
}

/* Layer 1 of an int8 variant for lanes [t0, t0+nt): the kept inputs' int8 sums, dequantised per column, plus b0,
 * then s1 * ReLU into z as in eq_layer1. The eval-mode pass stays float32 (the first chunk, before the masks are
 * drawn, as one lane over every nonzero row), so the deterministic logits are the float kernels'. */
static void eq_layer1_i8(eq_run_t *r, int t0, int nt, uint64_t lanes) {
    const eq_head_t *hd = r->hd;
    const int H = hd->H, ntp = (nt + 3) & ~3;
    const size_t hp = r->hp;
    if (t0 == 0) {
        memset(r->xw, 0, r->Hs * sizeof(float));
        r->macs += eq_masked_gemm(r->k, r->lists, r->nz, r->nnz, (size_t)H, hd->w0, r->lm, r->lmw0, r->xs, 0, r->z,
                                  r->Hs, 0, hd->x, r->xw);
        for (int j = 0; j < H; ++j) {
            const float v = r->xw[j] + hd->b0[j];
            r->heval[j] = v > 0.0f ? v : 0.0f;
        }
    }
    eq_draw_layer1(r, t0, nt, lanes);
    for (int g = 0; g < r->G; ++g)
        for (int t = 0; t < ntp; ++t)
            for (int k = 0; k < 4; ++k) {
                const int q = 4 * g + k;
                const int keep = t < nt && q < r->nnz && !((r->sel0[q] >> t) & 1u);
                r->xi[((size_t)g * (size_t)ntp + (size_t)t) * 4 + (size_t)k] = keep ? r->xq[q] : 0;
            }
    r->k->gemm_i8(r->G, hp, r->wp, ntp, r->xi, r->acc);
    r->macs += (uint64_t)ntp * (uint64_t)r->G * 4 * hp;
    const float s1 = r->s1;
    for (int t = 0; t < nt; ++t) {
        float *restrict zt = r->z + t * r->Hs;
        const int32_t *at = r->acc + (size_t)t * hp;
        for (int j = 0; j < H; ++j) {
            const float v = hd->b0[j] + r->deq[j] * (float)at[j];
            zt[j] = (v > 0.0f ? v : 0.0f) * s1;
        }
    }
}

/* Per call for an int8 variant: W0 quantised (unless the caller has it), its nonzero rows packed, the inputs
 * quantised per tensor. Returns the scratch block to free, or NULL when memory ran out. */
static void *eq_prepare_i8(eq_run_t *r) {
    const eq_head_t *hd = r->hd;
    const int F = hd->F, H = hd->H;
    const size_t hp = eq_w0q_stride(H), G = ((size_t)r->nnz + 3) / 4;
    const int own = hd->w0q == NULL || hd->w0s == NULL;
    const size_t nb = G * hp * 4 + G * 4 + G * 64 * 4 + hp + (own ? (size_t)F * hp : 0);
    const size_t nf = 64 * hp + (size_t)H + (own ? (size_t)H : 0);
    char *mem = (char *)malloc(nf * 4 + nb + 64);
    if (!mem) return NULL;
    r->acc = (int32_t *)mem, r->deq = (float *)(r->acc + 64 * hp);
    float *w0s = own ? r->deq + H : (float *)hd->w0s;
    r->wp = (int8_t *)(mem + nf * 4), r->xq = r->wp + G * hp * 4, r->xi = r->xq + G * 4;
    int8_t *zero = r->xi + G * 64 * 4, *w0q = own ? zero + hp : (int8_t *)hd->w0q;
    memset(zero, 0, hp);
    if (own) eq_quantize_w0(F, H, hd->w0, w0q, w0s);
    r->G = (int)G, r->hp = hp;
    float amax = 0.0f;
    for (int q = 0; q < r->nnz; ++q) amax = fabsf(r->xs[r->nz[q]]) > amax ? fabsf(r->xs[r->nz[q]]) : amax;
    const float sx = amax > 0.0f ? amax / 127.0f : 1.0f;
    for (size_t q = 0; q < G * 4; ++q) r->xq[q] = (int)q < r->nnz ? eq_q8(r->xs[r->nz[q]] / sx) : 0;
    for (int j = 0; j < H; ++j) r->deq[j] = sx * w0s[j];
    for (size_t g = 0; g < G; ++g) {
        const int8_t *rows[4];
        for (int k = 0; k < 4; ++k) {
            const size_t q = 4 * g + (size_t)k;
            rows[k] = (int)q < r->nnz ? w0q + (size_t)r->nz[q] * hp : zero;
        }
        eq_pack4(rows, hp, r->wp + g * hp * 4);
    }
    return mem;
}

/* Layer 2 for the chunk: add the kept, nonzero hidden units' rows; the first chunk adds the eval-mode lane. */
static void eq_layer2(eq_run_t *r, int t0, int nt, uint64_t lanes) {
    const eq_head_t *hd = r->hd;
    const int H = hd->H, C = hd->C, first = t0 == 0;
    for (int j = 0; j < H; ++j) {
        uint64_t d;
        if (r->given) d = r->keep1 ? eq_mask_bits(r->keep1, H, j, t0, nt) : 0;
        else d = r->thr1 ? eq_bernoulli64_inline(&r->rng, r->thr1, lanes) : 0;
        r->sel1[j] = ~d & lanes;
    }
    for (int t = 0; t < nt; ++t) memcpy(r->y + t * r->Cs, hd->b1, (size_t)C * sizeof(float));
    if (first) memcpy(r->yeval, hd->b1, (size_t)C * sizeof(float));
    const int lmw = (H + 63) / 64;
    eq_lane_sets(r->sel1, H, nt, r->lm, lmw, r->z, r->Hs);
    r->macs += eq_masked_gemm(r->k, r->lists, NULL, H, (size_t)C, hd->w1, r->lm, lmw, r->z, r->Hs, r->y, r->Cs, nt,
                              r->heval, first ? r->yeval : NULL);
}

static void eq_accumulate(eq_run_t *r, int t0, int nt, float *probs) {
    const int C = r->hd->C, act = r->hd->act;
    for (int t = 0; t < nt; ++t) {
        r->ent += r->k->activate(act, r->y + t * r->Cs, r->prob, C);
        if (probs) memcpy(probs + (size_t)(t0 + t) * C, r->prob, (size_t)C * sizeof(float));
        for (int c = 0; c < C; ++c) {
            const double d = (double)r->prob[c] - r->pdet[c];
            r->sum1[c] += d;
            r->sum2[c] += d * d;
        }
    }
}

int eq_head_moments(const eq_head_t *hd, const eq_kernels_t *k, int T, uint64_t seed, int given,
                    const uint8_t *keep0, const uint8_t *keep1, eq_moments_t *out) {
    const int F = hd->F, H = hd->H, C = hd->C;
    eq_run_t r = {.hd = hd, .k = k, .Hs = eq_round16((size_t)H), .Cs = eq_round16((size_t)C),
                  /* Same scale as the reference: float32(1 / (1 - p)) computed in double. */
                  .s0 = hd->p0 > 0.0 ? (float)(1.0 / (1.0 - hd->p0)) : 1.0f,
                  .s1 = hd->p1 > 0.0 ? (float)(1.0 / (1.0 - hd->p1)) : 1.0f,
                  .thr0 = eq_rate_threshold(hd->p0), .thr1 = eq_rate_threshold(hd->p1),
                  .given = given, .keep0 = keep0, .keep1 = keep1};
    /* One allocation for all scratch; float regions start on 64-byte boundaries (Hs, Cs multiples of 16). */
    const size_t Fs = eq_round16((size_t)F);
    const size_t n_f = Fs + 3 * r.Hs + 2 * r.Cs + 64 * r.Hs + 64 * r.Cs;
    const size_t lmw = (size_t)(F > H ? F : H) / 64 + 1;
    const size_t n_u = (size_t)F + (size_t)H + (size_t)F / 2 + 1 + 64 * lmw, n_d = 3 * (size_t)C;
    char *mem = (char *)malloc(sizeof(eq_lists_t) + n_f * sizeof(float) + n_u * sizeof(uint64_t) +
                               n_d * sizeof(double) + 64);
    if (!mem) return -1;
    r.lists = (eq_lists_t *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    r.xs = (float *)(r.lists + 1);
    r.xw = r.xs + Fs, r.zfull = r.xw + r.Hs, r.heval = r.zfull + r.Hs, r.yeval = r.heval + r.Hs;
    r.prob = r.yeval + r.Cs, r.z = r.prob + r.Cs, r.y = r.z + 64 * r.Hs;
    r.sel0 = (uint64_t *)(r.y + 64 * r.Cs), r.sel1 = r.sel0 + F;
    r.nz = (int32_t *)(r.sel1 + H);
    r.lm = r.sel1 + H + F / 2 + 1;
    r.pdet = (double *)(r.lm + 64 * lmw), r.sum1 = r.pdet + C, r.sum2 = r.sum1 + C;
    for (int i = 0; i < F; ++i) {
        r.xs[i] = r.s0 * hd->x[i];
        r.nz[r.nnz] = i; /* branch-free: ReLU features are zero at random, a branch would mispredict */
        r.nnz += hd->x[i] != 0.0f;
    }
    r.lmw0 = (r.nnz + 63) / 64;
    memset(r.sum1, 0, 2 * (size_t)C * sizeof(double));
    r.ent = 0.0;
    eq_rng_seed(&r.rng, seed);
    /* The int32 sums hold nnz products of at most 127 x 127: beyond 2^17 rows the float layer 1 takes over. */
    const int i8 = k->gemm_i8 != NULL && r.nnz <= (1 << 17);
    void *i8mem = NULL;
    if (i8 && !(i8mem = eq_prepare_i8(&r))) {
        free(mem);
        return -1;
    }

    for (int t0 = 0; t0 < T; t0 += 64) {
        const int nt = T - t0 < 64 ? T - t0 : 64;
        const uint64_t lanes = nt == 64 ? ~0ULL : ((1ULL << nt) - 1);
        if (i8) eq_layer1_i8(&r, t0, nt, lanes);
        else eq_layer1(&r, t0, nt, lanes);
        eq_layer2(&r, t0, nt, lanes);
        if (t0 == 0) eq_eval_outputs(hd->act, C, r.yeval, out->det_logits, r.pdet);
        eq_accumulate(&r, t0, nt, out->probs);
    }
    for (int c = 0; c < C; ++c) {
        const double m = r.sum1[c] / T, v = r.sum2[c] / T - m * m;
        out->mean[c] = r.pdet[c] + m;
        out->std[c] = v > 0.0 ? sqrt(v) : 0.0;
    }
    out->expected_entropy = T > 0 ? r.ent / T : 0.0;
    out->macs = r.macs;
    free(mem);
    free(i8mem);
    return 0;
}
