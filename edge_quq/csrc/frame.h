/* Native fast paths of the per-frame math that follows the head: the moment scores, the interval decision
 * rule and the Mahalanobis family's distances, each batched over rows [N, ...].
 *
 * Each function has a numpy reference it must match (edge_quq/framekernels.py names them; tests/test_frame_kernels.py
 * runs both on random and edge-case inputs). The numpy references run the same float64 operations in the same
 * order, with numpy's pairwise summation (eq_pairwise_sum below), so the moment scores and the decision come out
 * bit-identical wherever numpy's log/exp are the C library's (x86 without AVX-512, aarch64); the Mahalanobis
 * distances differ from numpy's float32 matmul by summation order only.
 *
 * No Python here, like headkernel.h.
 */
#ifndef EDGE_QUQ_FRAME_H
#define EDGE_QUQ_FRAME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Columns of eq_moment_scores' output, in this order (edge_quq.scores.MOMENT_SCORES). */
enum { EQ_SCORE_MAX_PROB = 0, EQ_SCORE_ENTROPY, EQ_SCORE_MUTUAL_INFO, EQ_SCORE_MEAN_VARIANCE, EQ_SCORE_ENERGY,
       EQ_NUM_SCORES };

/* numpy's pairwise summation of n doubles (what ndarray.sum does along a contiguous axis), including its
 * 0.0 start value. */
double eq_pairwise_sum(const double *a, ptrdiff_t n);

/* Moment scores of rows mean/std [N, C] (float64), eval-mode logits [N, C] (float32 when logits32 is given,
 * else float64 logits64) and expected entropy [N]; act is EQ_ACT_* of headkernel.h. Writes out[k * N + i] for
 * score k of row i (score-major: each score's column is contiguous); energy is NaN unless act is sigmoid or
 * softmax. Returns 0, or -1 when a work buffer cannot be allocated. */
int eq_moment_scores(ptrdiff_t N, ptrdiff_t C, const double *mean, const double *std, const float *logits32,
                     const double *logits64, const double *expected_entropy, int act, double *out);

/* The interval rule of edge_quq.decision for rows [N, C]: lower/upper = mean -/+ z * std, states 1/0/-1, rule
 * code per row (decision.RULE_NAMES; mixed_keep picks code 5 over 4 for the open case), keep per row, the kept
 * classes [N, C] (0/1 bytes) and the label per row (the kept class with the highest mean, numpy's argmax on
 * ties and NaN; -1 when ignored). */
void eq_interval_decide(ptrdiff_t N, ptrdiff_t C, const double *mean, const double *std, double z, double threshold,
                        int mixed_keep, double *lower, double *upper, int8_t *states, int8_t *code, uint8_t *keep,
                        uint8_t *kept, int64_t *labels);

/* The Mahalanobis family's distances from projected rows z [N, K] (float32): K = F (class whitener only) or
 * K = 2F with the class and global projections interleaved (center0 given). Per row, in float32:
 *   zc = z_class - center;  d = max(min_c<C (|zc|^2 - zc . means2[:, c] + msq[c]), 0)
 *   rel = d - |z_global - center0|^2                                   (center0: a global whitener)
 *   rel = min_c<C (msq[c] - zc . means2[:, c]) - (msq[C] - zc . means2[:, C]) + |[zc, 1] @ between|^2
 *                                                                      (between: the low-rank background)
 * means2 [F, C] (or [F, C + 1] with between, the background mean's column last), msq [C] (C + 1), +inf for a class
 * without a mean; between [F + 1, R], its last row the offset of the background mean. Writes d [N] and, with
 * center0 or between, rel [N] as float64. Returns 0, or -1 when a work buffer cannot be allocated. */
int eq_mahalanobis(ptrdiff_t N, ptrdiff_t F, ptrdiff_t C, const float *z, const float *center, const float *means2,
                   const float *msq, const float *center0, const float *between, ptrdiff_t R, double *d, double *rel);

#ifdef __cplusplus
}
#endif

#endif
