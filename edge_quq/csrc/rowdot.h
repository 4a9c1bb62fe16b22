/* The kNN and ViM detectors' per-frame products (edge_quq.detectors), on one shared kernel: the dot products of
 * a float32 row with every row of a matrix W [M, F] stored float32 or int8 (then times one scale).
 *
 *   knn:  kth[n]   = the k-th largest over b < B of  s_b * <xhat_n, bank_b>,  xhat_n = x_n / max(|x_n|, 1e-12)
 *                    (the norm in double, xhat rounded to float32, as detectors.l2_normalise(x).astype(float32));
 *                    bank int8 [B, F] with s_b = row_scale[b] (float32 [B], the product rounded to float32) or, without
 *                    row_scale, s_b = `scale`; or float32 or float16 [B, F] (scale 1). 1 <= k <= B.
 *   vim:  resid[n] = | (x_n - origin) @ null_space |  with the null space stored transposed, nsT float32 [D, F],
 *                    or float16 [D, F], or int8 [D, F] with one scale per row, scale float32 [D] (null_space[:, d] = scale[d] * nsT[d]);
 *                    x_n - origin in float32, the D dot products in float32 (times scale[d] after the sum, for
 *                    int8), their squares summed in double.
 *
 * The numpy references are edge_quq.detectors._knn_kth_numpy and _vim_resid_numpy; the variants differ from them
 * by float32 summation order only (framekernels.DOT_RTOL; tests/test_knn_vim_kernels.py, NEON under qemu:
 * tests/test_knn_vim_aarch64.py). The variants are project_q8's (whitener.h: eq_q8_isa), chosen the same way.
 * Rows are taken in blocks and W in chunks that stay in cache across a block's rows; the kNN keeps a running
 * top-k per row (insertion into k sorted values), so the B similarities are neither stored nor sorted.
 * No Python here, like headkernel.h.
 */
#ifndef EDGE_QUQ_ROWDOT_H
#define EDGE_QUQ_ROWDOT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* W's element type (bank_type, ns_type). float16 (IEEE binary16) rows are widened on load, exactly, and then summed
 * as float32 rows are: the results are bit-identical to those of the same values widened to float32 beforehand. */
enum { EQ_RD_F32 = 0, EQ_RD_I8 = 1, EQ_RD_F16 = 2 };

/* Variants compiled here and usable on this CPU, best first, "scalar" last (the names of eq_q8_isa). */
const char *eq_dots_isa(int i);

/* 1 when variant isa (NULL: the best) reads float16 rows on this CPU (avx2_fma: with F16C), else 0. */
int eq_dots_f16(const char *isa);

/* kth [N] as above for rows x [N, F]; bank_type: EQ_RD_F32, EQ_RD_I8 or EQ_RD_F16. isa: a name from eq_dots_isa, NULL for
 * the best. Returns 0, -1 when a work buffer cannot be allocated, -2 for an unknown isa, a float16 bank the variant
 * does not read (eq_dots_f16), or k outside 1..B. */
int eq_knn_kth(ptrdiff_t N, ptrdiff_t F, ptrdiff_t B, ptrdiff_t k, const float *x, const void *bank, int bank_type,
               float scale, const float *row_scale, float *kth, const char *isa);

/* resid [N] as above for rows x [N, F], origin [F], nsT [D, F] of ns_type: int8 with its scale [D], or float32 or
 * float16 with scale NULL. Returns 0, -1 or -2 as eq_knn_kth (-2 also for a scale given or missing wrongly). */
int eq_vim_resid(ptrdiff_t N, ptrdiff_t F, ptrdiff_t D, const float *x, const float *origin, const void *nsT,
                 int ns_type, const float *scale, double *resid, const char *isa);

#ifdef __cplusplus
}
#endif

#endif
