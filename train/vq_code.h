/* vq_code.h - query-weighted PQ codes for Distill-VQ: which codes and codebooks make the index's
 * scores q.(C[a] + PQ) closest to the exact q.y for the queries the index will see.
 *
 * For a query q the score error of a document is q.e, e = r - rho (r = y - C[a] the residual,
 * rho its PQ reconstruction); over the queries its mean square is e^T S e with S = E[q q^T], the
 * queries' second moment (rotated into the space the IVF sees). FAISS's nearest-codeword encoder
 * minimises |e|^2 (S = I); sentence-embedding queries are far from isotropic, so the weighted
 * error is what ranking sees. Here
 *   W = (1 - lambda) I + lambda * d S / tr(S)      (lambda in [0, 1]; tr(W) = d)
 * and
 *   encode: codes minimising e^T W e: the nearest codewords, then rounds of exact coordinate
 *           descent over the sub-quantizers (each picks the codeword that minimises e^T W e with
 *           the others fixed; the objective never rises, it stops when no code changes);
 *   refit:  codes fixed, each sub-codebook in turn set to its exact minimiser of
 *           sum_i e_i^T W e_i (the others fixed): B[m,k] = W_mm^-1 mean_{i: code_im = k} h_i,
 *           h_i = (W e_i)_m + W_mm rho_im (codewords no document uses stay).
 * Search is unchanged: the codes are FAISS IVF-PQ codes, written into the inverted lists as they
 * are (index/faiss_ext.h, kst_faiss_ivf_add_encoded); only the choice of code differs from
 * FAISS's own encoder. Tested against a NumPy reference (tests/test_vq.c, fx_vq_code.py). */
#ifndef KST_TRAIN_VQ_CODE_H
#define KST_TRAIN_VQ_CODE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "train/vq.h"

/* W (d, d) from n rotated vectors v (n, d): (1 - lambda) I + lambda d S / tr(S), S = v^T v / n.
 * Fails with KST_ERR_INVALID when lambda is outside [0, 1] or n is 0 with lambda > 0. */
int kst_vq_score_metric(size_t d, size_t n, const float *v, double lambda, float *W,
                        kst_error *err);

/* Codes (n, M) of n rotated documents y (n, d) in lists assign (n): nearest codewords, then up to
 * m->wq_iters rounds of coordinate descent on e^T W e when m->wq is set (W = m->wq, (d, d)).
 * Returns through *rounds (may be NULL) the rounds run by the slowest block. */
int kst_vq_encode(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                  uint8_t *codes, long *rounds, kst_error *err);

/* One refit of every sub-codebook (in order) with the codes (n, M) fixed, for W = m->wq (the
 * identity when NULL: plain k-means means). Returns through *obj_before / *obj_after (may be
 * NULL) the mean of e^T W e over the n documents. */
int kst_vq_refit(kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                 const uint8_t *codes, double *obj_before, double *obj_after, kst_error *err);

/* The refit's solve for sub-quantizer sm, shared by the CPU and GPU refits: newb (ksub, dsub)
 * gets W_mm^-1 acc[k] / cnt[k] for each codeword k with cnt[k] > 0 (acc (ksub, dsub): the sums of
 * the targets h of the documents coded k) and m's current codeword for the others. */
int kst_vq_refit_solve(const kst_vq_model *m, size_t sm, const double *acc, const size_t *cnt,
                       float *newb, kst_error *err);

/* Mean e^T W e (W = m->wq, or I) of n documents with the given codes. */
double kst_vq_weighted_error(const kst_vq_model *m, size_t n, const float *y,
                             const int32_t *assign, const uint8_t *codes);

#endif
