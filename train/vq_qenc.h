/* vq_qenc.h - Distill-VQ with the query encoder trained jointly (`kestrel train vq
 * --train-query-encoder`).
 *
 * The documents stay as indexed (encoded by the index's original model); only the queries move.
 * For query text t with frozen original embedding q0 = f0(t) and the tuned encoder's f(t):
 *   teacher  t_d = q0 . x_d                 (uncompressed documents, original query encoder)
 *   students s_ivf = (A f(t)) . C[a(d)],  s_pq = (A f(t)) . (C[a] + rho(d))   (vq.h; A: OPQ)
 * with vq.h's listwise loss. dL/d(A f) comes from kst_vq_batch_q, dL/df = A^T dL/d(A f), and it
 * flows through the dense head (pooling, Dense, Normalize) and the transformer
 * (encoders/bert_train.h) into the encoder's gradient; AdamW (weight decay as `kestrel train
 * margin-mse`: none on biases and LayerNorm) updates the weights in place, so kst_encoder_embed
 * on the same encoder gives the tuned vectors. Dropout is off (the step is deterministic).
 *
 * Gradients of the joint path are tested against PyTorch autograd (tests/test_vq_qenc.c,
 * tests/fixtures/fx_vq_qenc.py). */
#ifndef KST_TRAIN_VQ_QENC_H
#define KST_TRAIN_VQ_QENC_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert_train.h"
#include "encoders/encoder.h"
#include "train/vq.h"

typedef struct kst_vq_qenc {
    kst_encoder *enc;           /* dense encoder trained in place (not owned) */
    const char *const *texts;   /* (nq) query texts (not owned) */
    size_t nq;
    double lr, weight_decay;    /* AdamW (kst_vq_qenc_init: 2e-5, 0.01) */
    size_t max_len;             /* 0: the model's */
    long step;                  /* AdamW steps since the last reset */
    kst_bert grads;
    float *mom, *vel, *best;    /* (num_params) AdamW moments; the kept weights */
    unsigned char *decay;       /* (num_params) */
    /* the latest training forward */
    kst_bert_train_acts acts;
    kst_head_acts head;
    int32_t *ids, *types;
    int *valid;
    size_t rows, T, cap_rows, cap_tok, cap_dh;
    float *dhidden, *dq_in;     /* (rows, T, C), (rows, dim) */
} kst_vq_qenc;

/* Prepares joint training of enc (a dense encoder whose output dimension is the index's) on the
 * query texts (nq). Fails with KST_ERR_UNSUPPORTED for ColBERT / cross encoders, KST_ERR_NOMEM.
 * Free with kst_vq_qenc_free (enc and texts stay the caller's). */
int kst_vq_qenc_init(kst_vq_qenc *qe, kst_encoder *enc, const char *const *texts, size_t nq,
                     kst_error *err);
void kst_vq_qenc_free(kst_vq_qenc *qe);

/* The current encoder's vectors of queries idx (n; NULL: 0 .. n-1) into out (n, dim), inference
 * path (kst_encoder_embed). */
int kst_vq_qenc_embed(kst_vq_qenc *qe, const size_t *idx, size_t n, float *out, kst_error *err);

/* One joint forward/backward on queries idx (B) of qe's texts: the encoder's training forward,
 * y = A f (m->rot), kst_vq_batch_q with the candidates and teacher scores given (as kst_vq_batch),
 * then the backward into grad (m's parameters, may be NULL) and qe->grads (added to; zero with
 * kst_bert_grads_zero). Losses as kst_vq_batch. */
int kst_vq_joint_batch(const kst_vq_model *m, kst_vq_qenc *qe, const size_t *idx, size_t B,
                       const size_t *off, const int64_t *cand, const float *teacher, size_t ndocs,
                       const float *y, const int32_t *assign, double T, double w_ivf, double w_pq,
                       float *grad, double *loss_ivf, double *loss_pq, kst_error *err);

/* AdamW step of the encoder at lr * lr_scale with qe->grads, which are then zeroed. */
void kst_vq_qenc_step(kst_vq_qenc *qe, double lr_scale);
/* Keeps a copy of the current weights (kst_vq_qenc_restore brings them back and restarts
 * AdamW's moments). */
int kst_vq_qenc_keep(kst_vq_qenc *qe, kst_error *err);
void kst_vq_qenc_restore(kst_vq_qenc *qe);

#endif
