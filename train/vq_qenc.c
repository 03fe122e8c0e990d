/* vq_qenc.c - the query encoder trained jointly with Distill-VQ's centroids and codebooks (see
 * vq_qenc.h). */
#define _POSIX_C_SOURCE 200809L
#include "vq_qenc.h"

#include <string.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/mem.h"
#include "encoders/tokenizer.h"
#include "train/optim.h"

/* Weight decay per parameter tensor, in kst_bert_params order: as `kestrel train margin-mse`
 * (train/trainer.c), none on biases and LayerNorm weights. */
static const int DECAY[KST_BERT_NPARAMS] = {1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1,
                                            0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0};

void kst_vq_qenc_free(kst_vq_qenc *qe) {
    if (!qe) return;
    kst_free(qe->grads.param_mem);
    kst_free(qe->mom);
    kst_free(qe->vel);
    kst_free(qe->best);
    kst_free(qe->decay);
    kst_bert_train_acts_free(&qe->acts);
    kst_head_acts_free(&qe->head);
    kst_free(qe->ids);
    kst_free(qe->types);
    kst_free(qe->valid);
    kst_free(qe->dhidden);
    kst_free(qe->dq_in);
    memset(qe, 0, sizeof *qe);
}

int kst_vq_qenc_init(kst_vq_qenc *qe, kst_encoder *enc, const char *const *texts, size_t nq,
                     kst_error *err) {
    memset(qe, 0, sizeof *qe);
    if (enc->role != KST_ROLE_DENSE)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "%s: only a dense (bi-encoder) query encoder can be trained with the index "
                        "(this is a %s model)", enc->dir, kst_role_name(enc->role));
    qe->enc = enc;
    qe->texts = texts;
    qe->nq = nq;
    qe->lr = 2e-5;
    qe->weight_decay = 0.01;
    int rc = kst_bert_grads_alloc(&qe->grads, &enc->bert, err);
    if (rc != KST_OK) return rc;
    size_t np = enc->bert.num_params;
    qe->mom = kst_calloc(np, sizeof(float), "query encoder AdamW m", err);
    qe->vel = kst_calloc(np, sizeof(float), "query encoder AdamW v", err);
    qe->decay = kst_malloc(np, 1, "weight decay mask", err);
    if (!qe->mom || !qe->vel || !qe->decay) {
        kst_vq_qenc_free(qe);
        return KST_ERR_NOMEM;
    }
    kst_decay_mask_fill(qe->decay, enc->bert.param_sizes, DECAY, KST_BERT_NPARAMS);
    kst_bert_grads_zero(&qe->grads);
    return KST_OK;
}

int kst_vq_qenc_embed(kst_vq_qenc *qe, const size_t *idx, size_t n, float *out, kst_error *err) {
    if (!idx)
        return kst_encoder_embed(qe->enc, qe->texts, NULL, n, 1, qe->max_len, 32, out, err);
    const char **t = kst_malloc(n ? n : 1, sizeof *t, "query texts", err);
    if (!t) return KST_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) t[i] = qe->texts[idx[i]];
    int rc = kst_encoder_embed(qe->enc, t, NULL, n, 1, qe->max_len, 32, out, err);
    kst_free(t);
    return rc;
}

/* Tokenizes queries idx (B) into the padded batch qe->ids / types / valid (rows B, qe->T). */
static int tokenize(kst_vq_qenc *qe, const size_t *idx, size_t B, kst_error *err) {
    kst_encoder *e = qe->enc;
    kst_ids *v = kst_calloc(B ? B : 1, sizeof *v, "token ids", err);
    if (!v) return KST_ERR_NOMEM;
    int rc = KST_OK;
    size_t T = 1;
    for (size_t r = 0; r < B; r++) {
        const char *s = qe->texts[idx[r]];
        KST_TRY(kst_encoder_tokenize(e, s, strlen(s), NULL, 0, 1, qe->max_len, &v[r], err));
        if (v[r].len > T) T = v[r].len;
    }
    if (B > qe->cap_rows) {
        KST_TRY(kst_realloc((void **)&qe->valid, B, sizeof *qe->valid, "batch", err));
        qe->cap_rows = B;
    }
    if (B * T > qe->cap_tok) {
        KST_TRY(kst_realloc((void **)&qe->ids, B * T, sizeof *qe->ids, "batch", err));
        KST_TRY(kst_realloc((void **)&qe->types, B * T, sizeof *qe->types, "batch", err));
        qe->cap_tok = B * T;
    }
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t r = 0; r < B; r++) {
        qe->valid[r] = (int)v[r].len;
        for (size_t t = 0; t < T; t++) {
            qe->ids[r * T + t] = t < v[r].len ? v[r].ids[t] : (sp.pad >= 0 ? sp.pad : 0);
            qe->types[r * T + t] = 0;
        }
    }
    qe->rows = B;
    qe->T = T;
done:
    for (size_t r = 0; r < B; r++) kst_ids_free(&v[r]);
    kst_free(v);
    return rc;
}

int kst_vq_joint_batch(const kst_vq_model *m, kst_vq_qenc *qe, const size_t *idx, size_t B,
                       const size_t *off, const int64_t *cand, const float *teacher, size_t ndocs,
                       const float *y, const int32_t *assign, double T, double w_ivf, double w_pq,
                       float *grad, double *loss_ivf, double *loss_pq, kst_error *err) {
    kst_encoder *e = qe->enc;
    const kst_bert *bm = &e->bert;
    size_t dim = e->dim, d = (size_t)m->d;
    if (dim != (size_t)m->d_in)
        return kst_fail(err, KST_ERR_SHAPE, "%s: the query encoder gives %zu-d vectors, the index "
                        "holds %d-d ones", e->dir, dim, m->d_in);
    float *qrot = NULL, *dq = NULL;
    int rc = tokenize(qe, idx, B, err);
    if (rc != KST_OK) return rc;
    KST_TRY(kst_bert_train_forward(bm, &qe->acts, qe->ids, qe->types, qe->valid, B, qe->T, 0.0f,
                                   NULL, err));
    const float *h = kst_bert_train_hidden(bm, &qe->acts);
    KST_TRY(kst_dense_head_forward(bm, &qe->head, h, qe->valid, e->pool_modes, e->normalize, B,
                                   qe->T, err));
    qrot = kst_malloc(B * d, sizeof(float), "student queries", err);
    dq = kst_calloc(B * d, sizeof(float), "query gradients", err);
    size_t nh = B * qe->T * bm->cfg.C;
    if (!qrot || !dq) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    kst_vq_rotate(m, B, qe->head.out, qrot);
    KST_TRY(kst_vq_batch_q(m, B, qrot, off, cand, teacher, ndocs, y, assign, T, w_ivf, w_pq, grad,
                           dq, loss_ivf, loss_pq, err));
    if (nh > qe->cap_dh) {
        KST_TRY(kst_realloc((void **)&qe->dhidden, nh, sizeof(float), "hidden gradients", err));
        qe->cap_dh = nh;
    }
    KST_TRY(kst_realloc((void **)&qe->dq_in, B * dim, sizeof(float), "query gradients", err));
    /* y = x A^T (kst_vq_rotate), so dL/dx = dL/dy A; no rotation: the same vector. */
    if (m->rot)
        kst_sgemm(0, 0, (int)B, m->d_in, m->d, 1.0f, dq, m->d, m->rot, m->d_in, 0.0f, qe->dq_in,
                  m->d_in);
    else
        memcpy(qe->dq_in, dq, B * dim * sizeof(float));
    memset(qe->dhidden, 0, nh * sizeof(float));
    kst_dense_head_backward(bm, &qe->grads, &qe->head, qe->dhidden, qe->dq_in, h, qe->valid,
                            e->pool_modes, e->normalize, B, qe->T);
    kst_bert_train_backward(bm, &qe->grads, &qe->acts, qe->dhidden);
done:
    kst_free(qrot);
    kst_free(dq);
    return rc;
}

void kst_vq_qenc_step(kst_vq_qenc *qe, double lr_scale) {
    kst_adamw_config ac = kst_adamw_defaults();
    ac.weight_decay = qe->weight_decay;
    qe->step++;
    kst_adamw_update(qe->enc->bert.param_mem, qe->mom, qe->vel, qe->grads.param_mem, qe->decay,
                     qe->enc->bert.num_params, qe->step, qe->lr * lr_scale, &ac);
    kst_bert_grads_zero(&qe->grads);
}

int kst_vq_qenc_keep(kst_vq_qenc *qe, kst_error *err) {
    size_t np = qe->enc->bert.num_params;
    if (!qe->best) {
        qe->best = kst_malloc(np, sizeof(float), "kept query encoder", err);
        if (!qe->best) return KST_ERR_NOMEM;
    }
    memcpy(qe->best, qe->enc->bert.param_mem, np * sizeof(float));
    return KST_OK;
}

void kst_vq_qenc_restore(kst_vq_qenc *qe) {
    size_t np = qe->enc->bert.num_params;
    if (qe->best) memcpy(qe->enc->bert.param_mem, qe->best, np * sizeof(float));
    memset(qe->mom, 0, np * sizeof(float));
    memset(qe->vel, 0, np * sizeof(float));
    qe->step = 0;
    kst_bert_grads_zero(&qe->grads);
}
