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

/* Masked rank-1 update, the one hot loop of the kernel:
 *   for every lane t set in `lanes` (t < 64):  c = scale * a[t * a_stride];  if c != 0: y[t*y_stride : +n] += c * w[0:n]
 * Layer 1 uses it with a = &x[i], a_stride = 0 (one coefficient for all samples that drop/keep unit i);
 * layer 2 with a = &h[0][j], a_stride = row stride (each sample's own hidden activation). */
typedef void (*eq_f32_rank1_masked_fn)(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                       float scale, float *y, size_t y_stride);

typedef struct {
    const char *name; /* "scalar", "sse2", "avx2_fma", "neon" */
    eq_f32_rank1_masked_fn rank1_masked;
} eq_kernels_t;

void eq_f32_rank1_masked__scalar(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                 float scale, float *y, size_t y_stride);
#if defined(__x86_64__) || defined(_M_X64)
void eq_f32_rank1_masked__sse2_x8(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                  float scale, float *y, size_t y_stride);
void eq_f32_rank1_masked__avx2_fma_x16(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                       float scale, float *y, size_t y_stride);
#endif
#if defined(__aarch64__)
void eq_f32_rank1_masked__neon_x8(size_t n, const float *w, uint64_t lanes, const float *a, size_t a_stride,
                                  float scale, float *y, size_t y_stride);
#endif

/* Variants usable on this CPU, best first; the last one is always the plain C reference. */
int eq_kernels_count(void);
const eq_kernels_t *eq_kernels_get(int i);
const eq_kernels_t *eq_kernels_find(const char *name); /* NULL if unknown or not supported here */
/* Comma-separated CPU features relevant to the kernels as detected at run time (e.g. "avx2,fma" or "asimd,asimddp"). */
const char *eq_cpu_features(void);

typedef struct {
    int F, H, C;
    const float *x;  /* [F] */
    const float *w0; /* [F, H] row-major */
    const float *b0; /* [H] */
    const float *w1; /* [H, C] row-major */
    const float *b1; /* [C] */
    double p0, p1;   /* dropout rates, 0 <= p < 1 */
    int act;         /* EQ_ACT_* */
} eq_head_t;

typedef struct {
    double *mean;            /* [C] MC mean of the outputs */
    double *std;             /* [C] MC std (ddof=0) */
    float *det_logits;       /* [C] eval-mode logits (no dropout) */
    float *probs;            /* optional [T, C]: every sample's outputs (tests); NULL to skip */
    double expected_entropy; /* mean over samples of the per-sample entropy */
} eq_moments_t;

/* T MC-dropout samples.  Masks come from the kernel's own PRNG (xoshiro256** seeded by splitmix64(seed)) when
 * keep0/keep1 are NULL, else from caller-given 0/1 keep masks keep0 [T, F] and keep1 [T, H] (a NULL one with
 * the other given means "keep all" for that block).  `given` selects caller masks even when both are NULL.
 * Returns 0, or -1 when memory could not be allocated. Thread-safe (no global state but the variant table). */
int eq_head_moments(const eq_head_t *head, const eq_kernels_t *k, int T, uint64_t seed, int given,
                    const uint8_t *keep0, const uint8_t *keep1, eq_moments_t *out);

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
