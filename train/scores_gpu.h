/* scores_gpu.h - the student's scores on the GPU for the training step (train/trainer_gpu.cu):
 * dense dot products of every query with every passage of the batch (in-batch negatives) and
 * ColBERT MaxSim, for the query's own passages or for all of them, their backward, and the
 * Margin-MSE loss with the optional in-batch cross-entropy. The CPU twin is train/trainer.c's
 * score_pair / score_pair_backward with core/ops_backward.c's kst_maxsim_* and train/loss.c.
 *
 * Layouts (device memory, row-major): queries b < B, passages p < B n (row b n + k is passage k
 * of query b, k = 0 the positive). A score matrix S is (B, W): with all = 0, W = n and column c
 * of row b scores passage b n + c (the query's own passages); with all = 1, W = B n and column c
 * scores passage c (own passages at columns b n .. b n + n - 1). Gradients dS have the same
 * layout. Built with CUDA=1 only (no stub: only trainer_gpu.cu calls these). */
#ifndef KST_TRAIN_SCORES_GPU_H
#define KST_TRAIN_SCORES_GPU_H

#include <stddef.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ColBERT MaxSim: S[b, c] = sum over query tokens i < qlen[b] (at most Tq) of the max over
 * passage tokens j < Tp with keep[p Tp + j] of q[b Tq + i] . d[p Tp + j] (float32 dot products),
 * argmax (B, W, Tq) the chosen j (-1: none kept, or i >= qlen[b]; ties go to the first j, as the
 * CPU's). q (B Tq, D), d (B n Tp, D) normalised token vectors; qlen (B) int; keep (B n Tp)
 * bytes. */
int kst_gpu_maxsim_forward(float *S, int *argmax, const float *q, const float *d, const int *qlen,
                           const unsigned char *keep, size_t B, size_t n, size_t Tq, size_t Tp,
                           size_t D, int all, void *stream, kst_error *err);
/* Its backward: dq (B Tq, D) and dd (B n Tp, D) written (not added) from dS (B, W): dq[b, i] =
 * sum_c dS[b, c] d[p(c), argmax], dd[p, j] = sum over (b, i) choosing j of dS[b, c] q[b, i].
 * Deterministic (no atomics). */
int kst_gpu_maxsim_backward(float *dq, float *dd, const float *dS, const int *argmax, const float *q,
                            const float *d, const int *qlen, size_t B, size_t n, size_t Tq, size_t Tp,
                            size_t D, int all, void *stream, kst_error *err);

/* Dense: S (B, B n) = q (B, D) @ p (B n, D)^T, and its backward (dq, dp written). */
int kst_gpu_dense_all_forward(float *S, const float *q, const float *p, size_t B, size_t n, size_t D,
                              void *stream, kst_error *err);
int kst_gpu_dense_all_backward(float *dq, float *dp, const float *dS, const float *q, const float *p,
                               size_t B, size_t n, size_t D, void *stream, kst_error *err);

/* Margin-MSE over the own passages' scores (train/loss.c's kst_margin_mse_*) plus, with all,
 * ib_weight times the in-batch cross-entropy of each row of S against its positive (column b n;
 * no columns excluded: kst_inbatch_ce_* with exclude_own_negatives = 0). loss (1) and dS (B, W)
 * written; t (B, n) the teacher's scores. One block; sums in double. */
int kst_gpu_mmse_ib_loss(float *loss, float *dS, const float *S, const float *t, size_t B, size_t n,
                         int all, float ib_weight, void *stream, kst_error *err);

#ifdef __cplusplus
}
#endif

#endif
