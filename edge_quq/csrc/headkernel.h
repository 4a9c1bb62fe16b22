/* Native MC-dropout head kernel: per-class mean/std of a 2-block dropout head for one feature vector.
 *
 * The head is  dropout(p0) -> dense(W0 [F,H], b0) -> ReLU -> dropout(p1) -> dense(W1 [H,C], b1) -> act,
 * inverted dropout (kept units scaled by 1/(1-p)), exactly edge_quq.head.HeadWeights.logits.
 *
 * No Python here: this file and headkernel.c build into the extension module and, unchanged, into the
 * standalone C test driver that runs under qemu-aarch64 (tests/csrc/headkernel_driver.c).
 */
#ifndef EDGE_QUQ_HEADKERNEL_H
#define EDGE_QUQ_HEADKERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { EQ_ACT_LINEAR = 0, EQ_ACT_SIGMOID = 1, EQ_ACT_SOFTMAX = 2 };

/* Gathered-row accumulate, the one hot loop of the kernel, over one row block of W: the block's rows are
 * W[wrows[p]] for p < np. When ey is given, first the eval-mode lane over every row of the block:
 *   ey[0:n] += sum_{p < np} ea[p] * W[wrows[p], 0:n]
 * then for every lane l < nl (a sample), with its positions and coefficients in pos/coef[l * ls + 0 : cnt[l]]:
 *   ys[l][0:n] += sum_{k < cnt[l]} coef[l*ls + k] * W[wrows[pos[l*ls + k]], 0:n]
 * The caller gives each lane the rows it needs (a sample's dropped or kept units with a nonzero coefficient) and
 * the coefficients beside them, in row order. The SIMD variants copy the block into `tile` one column block at a
 * time (aligned and contiguous, so it stays in L1 while every lane walks it; np x 104 floats at most, 64-byte
 * aligned), and hold a lane's output columns in registers across its rows. Every variant adds the rows in the
 * same order, so variants differ only by FMA-vs-mul+add rounding. ey and each ys[l] must be readable and writable
 * up to n rounded up to 8 floats: the SIMD variants load and store their last output vector whole. */
typedef void (*eq_f32_gather_fn)(size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea,
                                 float *ey, int nl, const int32_t *pos, const float *coef, const int32_t *cnt,
                                 size_t ls, float *const *ys, float *tile);

/* One sample's outputs p[0:C] = activation(logits) and their entropy (Shannon for softmax, sum of binary
 * entropies otherwise). */
typedef double (*eq_activate_fn)(int act, const float *logits, float *p, int C);

/* The first layer in int8 for `nt` samples at once (int8 variants only): for every sample t < nt and column
 * j < hp,  acc[t * hp + j] = sum_{g < G, r < 4} xi[(g * ntp + t) * 4 + r] * wp[(g * hp + j) * 4 + r]  with
 * wp the packed weights [G][hp][4] (4 consecutive rows of a column side by side, the operand order of a 4-way
 * int8 dot product) and xi the samples' masked, quantised inputs [G][ntp][4]; ntp = nt rounded up to 4 and
 * hp a multiple of 16 (the padding is zero). Integer sums are exact, so every int8 variant gives the same acc. */
typedef void (*eq_i8_gemm_fn)(int G, size_t hp, const int8_t *wp, int ntp, const int8_t *xi, int32_t *acc);

typedef struct {
    const char *name; /* "scalar", "sse2", "avx2_fma", "neon", "neon_sdot", "scalar_i8" */
    eq_f32_gather_fn gather;
    eq_activate_fn activate;
    eq_i8_gemm_fn gemm_i8; /* NULL: float32 first layer; else int8 features x int8 W0 (see eq_quantize_w0) */
} eq_kernels_t;

void eq_f32_gather__scalar(size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea, float *ey,
                           int nl, const int32_t *pos, const float *coef, const int32_t *cnt, size_t ls,
                           float *const *ys, float *tile);
#if defined(__x86_64__) || defined(_M_X64)
void eq_f32_gather__sse2_x48(size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea, float *ey,
                           int nl, const int32_t *pos, const float *coef, const int32_t *cnt, size_t ls,
                           float *const *ys, float *tile);
void eq_f32_gather__avx2_fma_x104(size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea, float *ey,
                           int nl, const int32_t *pos, const float *coef, const int32_t *cnt, size_t ls,
                           float *const *ys, float *tile);
#endif
void eq_i8_gemm__scalar(int G, size_t hp, const int8_t *wp, int ntp, const int8_t *xi, int32_t *acc);
#if defined(__aarch64__)
void eq_f32_gather__neon_x64(size_t n, const float *w, size_t ldw, const int32_t *wrows, int np, const float *ea, float *ey,
                           int nl, const int32_t *pos, const float *coef, const int32_t *cnt, size_t ls,
                           float *const *ys, float *tile);
#endif

/* Variants usable on this CPU, best first; the last one is always the plain C reference. The int8 variants'
 * plain C reference "scalar_i8" is not in that list but eq_kernels_find finds it everywhere (tests). */
int eq_kernels_count(void);
const eq_kernels_t *eq_kernels_get(int i);
const eq_kernels_t *eq_kernels_find(const char *name); /* NULL if unknown or not supported here */
/* Comma-separated CPU features relevant to the kernels as detected at run time (e.g. "avx2,fma" or "asimd,asimddp"). */
const char *eq_cpu_features(void);

/* The dispatch as a pure function, so that tests can feed it another machine's /proc/cpuinfo. */
enum { EQ_F_SSE2 = 1, EQ_F_AVX2 = 2, EQ_F_FMA = 4, EQ_F_ASIMD = 8, EQ_F_ASIMDDP = 16, EQ_F_AVX512_VNNI = 32,
       EQ_F_AVX_VNNI = 64 };
/* EQ_F_* bits named on the first "flags" (x86) or "Features" (ARM) line of a /proc/cpuinfo text. */
unsigned eq_features_from_cpuinfo(const char *text);
/* Fills table (best first, "scalar" last) with the variants compiled here that those features allow, and names
 * with the features as a comma-separated list; returns the number of variants. */
int eq_kernels_for(unsigned features, eq_kernels_t *table, int max, char *names, size_t names_size);

typedef struct {
    int F, H, C;
    const float *x;  /* [F] */
    const float *w0; /* [F, H] row-major */
    const float *b0; /* [H] */
    const float *w1; /* [H, C] row-major */
    const float *b1; /* [C] */
    double p0, p1;   /* dropout rates, 0 <= p < 1 */
    int act;         /* EQ_ACT_* */
    /* Int8 variants only, optional (NULL: quantised on every call): W0 from eq_quantize_w0, made once per head. */
    const int8_t *w0q; /* [F, round16(H)] */
    const float *w0s;  /* [H] per-column scales */
} eq_head_t;

/* Symmetric per-column int8 quantisation of W0 [F, H] for the int8 variants: w0s[j] = max_i |W0[i, j]| / 127,
 * w0q[i, j] = round(W0[i, j] / w0s[j]) in rows of round16(H) (zero padded). The features are quantised per call
 * (per tensor, scale max |x| / 127); products and sums are exact int32, dequantised per column. */
void eq_quantize_w0(int F, int H, const float *w0, int8_t *w0q, float *w0s);
size_t eq_w0q_stride(int H);

typedef struct {
    double *mean;            /* [C] MC mean of the outputs */
    double *std;             /* [C] MC std (ddof=0) */
    float *det_logits;       /* [C] eval-mode logits (no dropout) */
    float *probs;            /* optional [T, C]: every sample's outputs (tests); NULL to skip */
    double expected_entropy; /* mean over samples of the per-sample entropy */
    uint64_t macs;           /* multiply-adds the kernel executed (benchmarks: GMAC/s against the core's peak) */
} eq_moments_t;

/* T MC-dropout samples.  Masks come from the kernel's own PRNG (xoshiro256** seeded by splitmix64(seed)) when
 * keep0/keep1 are NULL, else from caller-given 0/1 keep masks keep0 [T, F] and keep1 [T, H] (a NULL one with
 * the other given means "keep all" for that block).  `given` selects caller masks even when both are NULL.
 * Returns 0, or -1 when memory could not be allocated. Thread-safe (no global state but the variant table). */
int eq_head_moments(const eq_head_t *head, const eq_kernels_t *k, int T, uint64_t seed, int given,
                    const uint8_t *keep0, const uint8_t *keep1, eq_moments_t *out);

/* Closed-form moments (edge_quq.analytic for the 2-block head; analytic.c): mean, std and expected entropy of
 * activation(logits / temperature), det_logits the raw eval-mode logits; probs is not used. Returns 0, or -1
 * when memory could not be allocated. */
int eq_head_analytic(const eq_head_t *head, double temperature, eq_moments_t *out);

/* The Bernoulli generator, exposed for tests: 64 lanes at once, bit t set = unit dropped in sample t. */
typedef struct { uint64_t s[4]; } eq_rng_t;
void eq_rng_seed(eq_rng_t *r, uint64_t seed);
uint64_t eq_rng_next(eq_rng_t *r);
uint64_t eq_bernoulli64(eq_rng_t *r, uint32_t threshold, uint64_t lanes);
uint32_t eq_rate_threshold(double p);

#ifdef __cplusplus
}
#endif
#endif
