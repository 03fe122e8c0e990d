/* vq.h - Distill-VQ: learn an IVF-PQ index's coarse centroids and PQ codebooks by distilling the
 * exact dense scores (Xiao et al. 2021, "Matching-oriented Product Quantization ..." / Distill-VQ).
 *
 * Everything happens in the space the IVF sees: y = A x with OPQ's rotation A (learned by FAISS,
 * kept fixed here; A is orthonormal, so q.x = (Aq).(Ax) and the teacher is unchanged), else y = x.
 * For a document y:
 *   a(y)   = argmax_j y.C[j]                        the IVF list (FAISS's IndexFlatIP assignment)
 *   r      = y - C[a]                               the residual FAISS encodes (by_residual)
 *   k*_m   = argmin_k |r_m - B[m,k]|^2              hard PQ code of sub-vector m
 *   p_m    = softmax_k(-|r_m - B[m,k]|^2 / tau_m)   soft assignment (gradients only)
 *   rho_m  = B[m,k*_m] + sum_k p_mk B[m,k] - sg(sum_k p_mk B[m,k])   straight-through
 * Students (the scores FAISS's IndexIVFPQ search returns for inner product):
 *   s_ivf(q, y) = q.C[a]          s_pq(q, y) = q.(C[a] + rho)
 * Loss for query q over its candidates D_q (exact top-k + in-batch documents + qrels positives),
 * teacher t = q.y, temperature T:
 *   L_q = w_ivf CE(softmax(t/T), softmax(s_ivf/T)) + w_pq CE(softmax(t/T), softmax(s_pq/T))
 * averaged over the batch's queries. The hard list a(y) is recomputed from C once per epoch (so
 * it moves as FAISS would move the document); gradients reach C[a] directly and through the
 * residual, the hard codeword B[m,k*] directly (it is indexed from B, as in PyTorch's
 * `B[code] + soft - soft.detach()`), and every codeword through the soft assignment.
 *
 * After the epochs, by default, the codes are chosen for ranking (train/vq_code.h): each document's
 * PQ codes minimise e^T W e, W built from the queries' second moment, and the codebooks are refit
 * under W (opts score_weight, refit_rounds); m->wq keeps W, and kst_vq_reconstruct /
 * kst_vq_write_index use those codes (written into FAISS as they are).
 *
 * Parameters (llm.c shape): one flat float buffer [C (nlist, d) | B (M, ksub, dsub)], the
 * gradient and Adam moments in the same layout. The learned values are written back into a copy
 * of the FAISS index (kst_vq_write_index) and the documents re-encoded, so search is plain FAISS.
 *
 * Gradients are tested against PyTorch autograd (tests/test_vq.c, tests/fixtures/fx_vq.py). */
#ifndef KST_TRAIN_VQ_H
#define KST_TRAIN_VQ_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "index/ann.h"

typedef struct kst_vq_model {
    int d_in;          /* dimension of the vectors given (documents and queries) */
    int d;             /* dimension the IVF sees (= d_in; OPQ keeps it) */
    size_t nlist, M, ksub, dsub;
    size_t nparams;    /* nlist * d + M * ksub * dsub */
    float *params;     /* (nparams) the flat buffer */
    float *centroids;  /* (nlist, d)  points into params */
    float *codebook;   /* (M, ksub, dsub) points into params */
    float *rot;        /* (d, d_in) OPQ's A (y = A x), NULL without OPQ */
    float *tau;        /* (M) soft-assignment temperatures */
    float *wq;         /* (d, d) or NULL: the score metric W of query-weighted codes
                        * (train/vq_code.h); set, the codes kst_vq_reconstruct and
                        * kst_vq_write_index use minimise e^T W e instead of |e|^2 */
    long wq_iters;     /* coordinate-descent rounds of that encoder (3) */
    int device;        /* KST_DEV_CPU (0) or KST_DEV_CUDA: where kst_vq_encode / kst_vq_refit
                        * (and so kst_vq_reconstruct, kst_vq_write_index) run (train/vq_gpu.h);
                        * kst_vq_train sets it from its opts */
} kst_vq_model;

/* Reads the centroids, codebooks and OPQ matrix of a trained IVF-PQ (optionally OPQ) index with
 * inner-product metric, by_residual and 8-bit codes. Fails with KST_ERR_UNSUPPORTED naming what
 * differs (not IVF-PQ, a transform other than a square OPQ rotation, other code widths),
 * KST_ERR_MISUSE when untrained. tau is set to 1 (kst_vq_train sets it from the data). Free with
 * kst_vq_model_free. */
int kst_vq_model_from_index(kst_ann *ann, kst_vq_model *out, kst_error *err);
void kst_vq_model_free(kst_vq_model *m);

/* y = A x for n rows (copy when there is no rotation). y (n, d) may not alias x. */
void kst_vq_rotate(const kst_vq_model *m, size_t n, const float *x, float *y);

/* IVF list of each of n rotated documents y (n, d) into assign (n): argmax_j y.C[j], ties to the
 * lower j (as FAISS's IndexFlatIP). */
void kst_vq_assign(const kst_vq_model *m, size_t n, const float *y, int32_t *assign);

/* The IVF-PQ reconstruction C[a] + decode(hard codes) of n rotated documents (n, d), with their
 * lists `assign`; codes (n, M) may be NULL. The codes are the nearest codewords, or with m->wq the
 * query-weighted ones (train/vq_code.h), as kst_vq_write_index stores them. */
void kst_vq_reconstruct(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                        float *recon, uint8_t *codes);

/* One batch: B rotated queries q (B, d); query b's candidates are rows cand[off[b] .. off[b+1])
 * of the rotated documents y, with teacher scores teacher[same range]; assign (ndocs) from
 * kst_vq_assign. Returns through loss_ivf / loss_pq the batch means (unweighted) and ADDS the
 * gradient of w_ivf * loss_ivf + w_pq * loss_pq into grad (nparams) unless grad is NULL (forward
 * only). Fails only with KST_ERR_NOMEM / KST_ERR_INVALID (an empty candidate list). */
int kst_vq_batch(const kst_vq_model *m, size_t B, const float *q, const size_t *off,
                 const int64_t *cand, const float *teacher, size_t ndocs, const float *y,
                 const int32_t *assign, double T, double w_ivf, double w_pq, float *grad,
                 double *loss_ivf, double *loss_pq, kst_error *err);

/* kst_vq_batch, and when dq (B, d) is not NULL ADDS into it the gradient of the same loss with
 * respect to the (rotated) queries q: the path into a query encoder trained jointly
 * (train/vq_qenc.h). */
int kst_vq_batch_q(const kst_vq_model *m, size_t B, const float *q, const size_t *off,
                   const int64_t *cand, const float *teacher, size_t ndocs, const float *y,
                   const int32_t *assign, double T, double w_ivf, double w_pq, float *grad,
                   float *dq, double *loss_ivf, double *loss_pq, kst_error *err);

struct kst_vq_qenc;

typedef struct kst_vq_opts {
    long epochs;              /* passes over the training queries (3) */
    double lr_ivf, lr_pq;     /* Adam learning rates of centroids and codebooks (1e-3, 1e-3) */
    double temperature;       /* T of the listwise softmaxes (0.05: scores are cosines) */
    double tau_scale;         /* soft-assignment temperature = scale * mean quantisation error
                               * of the sub-vector (1.0) */
    size_t candidates;        /* exact top-k per query (200) */
    size_t batch;             /* queries per step (32); in-batch documents: the others' top-1 */
    size_t max_queries;       /* documents sampled as queries when none are given (2048) */
    double w_ivf, w_pq;       /* loss weights (1, 1) */
    uint64_t seed;            /* query sampling and order (0) */
    int progress;             /* draw a progress bar (on a terminal) */
    int dense_adam;           /* 0: lazy Adam on the centroids (only rows with a gradient in the
                               * batch move; see kst_vq_train), 1: every row every step */
    double w_rec;             /* weight of the reconstruction anchor (see kst_vq_train; 0: off) */
    size_t rec_docs;          /* documents drawn uniformly per step for the anchor (256) */
    double val_fraction;      /* training queries held out for validation (0.1; 0: none) */
    double lr_backoff;        /* with validation: an epoch that makes the validation loss worse
                               * is undone and both learning rates are multiplied by this (0.1);
                               * 0: keep going at the same rates (the best epoch is kept anyway) */
    struct kst_vq_qenc *qenc; /* NULL: the queries are fixed vectors. Else the student queries
                               * come from this query encoder, trained jointly (train/vq_qenc.h;
                               * its texts are the nq queries of kst_vq_train, whose q stay the
                               * teacher's frozen embeddings); lr_backoff and the kept epoch
                               * cover its weights too */
    double score_weight;      /* lambda of the query-weighted codes (train/vq_code.h): after the
                               * distillation epochs W = (1 - lambda) I + lambda d S / tr(S), S the
                               * training queries' second moment (sampled documents when no
                               * queries are given), is stored in the model (m->wq) and the
                               * codebooks are refit under it; 0: FAISS's nearest codes (0.5) */
    long refit_rounds;        /* codebook refits under W, each after encoding the sample (8) */
    size_t refit_docs;        /* documents (evenly spaced) the refits see (65536) */
    const float *q_student;   /* (nq, d_in) or NULL: fixed student queries other than the
                               * teacher's q (an index's tuned query encoder, trained no further);
                               * ignored with qenc */
    int device;               /* KST_DEV_CPU (0) or KST_DEV_CUDA (core/gpu.h): the epochs, the
                               * query-weighted codes and refits on the GPU (train/vq_gpu.h; not
                               * with qenc or w_rec > 0) */
} kst_vq_opts;
kst_vq_opts kst_vq_opts_default(void);

typedef struct kst_vq_result {
    double loss_init_ivf, loss_init_pq;   /* over every training query, before training */
    double loss_final_ivf, loss_final_pq; /* the same queries and candidates, after */
    double *epoch_loss;                   /* (epochs) mean training loss per epoch (kst_free) */
    double val_init, val_best;            /* validation loss before training and at the kept epoch */
    long best_epoch;                      /* the epoch whose parameters were kept (0: the start) */
    double lr_scale;                      /* the learning rates' final multiplier (backoffs) */
    long backoffs;                        /* epochs undone by lr_backoff */
    size_t val_queries;
    double mse_init, mse_final;           /* mean |y - reconstruction|^2 over a document sample */
    double imbalance_init, imbalance_final; /* nlist * sum(list size^2) / n^2 (FAISS's factor) */
    double werr_init, werr_final;         /* mean e^T W e of the refit sample before the first
                                           * and after the last codebook refit (score_weight) */
    long refits;
    long epochs, steps;
    size_t queries, candidates_mean;
    double seconds;
    double seconds_setup;                 /* rotation, exact top-k, lists, statistics */
    double seconds_epochs;                /* the distillation epochs with their validations */
    double seconds_codes;                 /* the query-weighted codes and codebook refits */
    size_t gpu_bytes;                     /* device cuda: the most GPU memory held at once */
} kst_vq_result;

/* Trains m in place on documents x (n, d_in) (the teacher's uncompressed vectors). Queries: q
 * (nq, d_in) when nq > 0, else up to opts->max_queries documents sampled with opts->seed.
 * pos_off (nq + 1) / pos (doc rows) may be NULL: qrels positives, added to their query's
 * candidates. out (may be NULL) receives the losses; free out->epoch_loss with kst_free. */
int kst_vq_train(kst_vq_model *m, size_t n, const float *x, size_t nq, const float *q,
                 const size_t *pos_off, const int64_t *pos, const kst_vq_opts *opts,
                 kst_vq_result *out, kst_error *err);

/* A new index like src (same factory layout, OPQ matrix, settings) holding m's centroids and
 * codebooks, with the documents x (n, d_in) added under ids (n): FAISS re-assigns and re-encodes
 * them. src is unchanged. *out is NULL on failure; free with kst_ann_free. */
int kst_vq_write_index(const kst_vq_model *m, kst_ann *src, size_t n, const float *x,
                       const int64_t *ids, kst_ann **out, kst_error *err);

#endif
