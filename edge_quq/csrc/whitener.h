/* The Mahalanobis family's int8 whitener product (edge_quq.detectors, for F >= INT8_WHITENER_MIN_FEATURES):
 *
 *   z[n, k] = sum_i (x[n, i] * scale[i * S + k % S]) * q_i[k]  +  x[n, k / S] * diag[k]      k < K = S * F
 *
 * q_i is row i of the int8 matrix [F, K] (S = 1: one whitener; S = 2: the class and global whiteners' columns
 * interleaved, class at 2j, global at 2j + 1), stored packed: row i is q[off[i] .. off[i + 1]), the row's
 * columns 0 .. off[i + 1] - off[i] - 1, a multiple of 16 long (zero-padded; the rest of the row is zero: the
 * whiteners are lower-triangular). scale [F, S] are the per-row float32 scales of the off-diagonal part, diag [K]
 * the whiteners' diagonals, kept in float32 (the diagonal is a row's largest entry; quantising the rest on its
 * own scale is ~10x more accurate, docs/detectors.md). Rows with x[n, i] == 0 are skipped.
 *
 * The numpy reference is edge_quq.detectors._project_q8_numpy (x @ the dequantised float32 matrix); variants
 * differ from it by float32 summation order only (tests/test_whitener.py, tests/test_whitener_aarch64.py).
 * No Python here, like headkernel.h.
 */
#ifndef EDGE_QUQ_WHITENER_H
#define EDGE_QUQ_WHITENER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Variants compiled here and usable on this CPU, best first, the plain C "scalar" last: i-th name, or NULL past
 * the end ("avx2_fma" on x86-64 with AVX2 and FMA, "neon" on aarch64). */
const char *eq_q8_isa(int i);

/* z [N, K] as above for rows x [N, F]; isa: a name from eq_q8_isa, NULL for the best. Returns 0, -1 when a work
 * buffer cannot be allocated, -2 for an unknown isa or S not 1 or 2. */
int eq_project_q8(ptrdiff_t N, ptrdiff_t F, int S, const float *x, const int8_t *q, const int64_t *off,
                  const float *scale, const float *diag, float *z, const char *isa);

#ifdef __cplusplus
}
#endif

#endif
