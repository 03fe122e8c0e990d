/* bert_train.c - training forward and backward of the transformer and the student heads. */
#include "bert_train.h"

#include <string.h>

#include "core/check.h"
#include "core/mem.h"
#include "core/ops_backward.h"

/* ------------------------------------------------------------------------------------------ */
/* gradients */

int kst_bert_grads_alloc(kst_bert *grads, const kst_bert *m, kst_error *err) {
    return kst_bert_alloc(grads, &m->cfg, err);
}

void kst_bert_grads_zero(kst_bert *grads) {
    if (grads->param_mem) memset(grads->param_mem, 0, grads->num_params * sizeof(float));
}

/* ------------------------------------------------------------------------------------------ */
/* activations */

void kst_bert_train_acts_free(kst_bert_train_acts *a) {
    if (!a) return;
    float **bufs[] = {&a->emb, &a->emb_mean, &a->emb_rstd, &a->x, &a->qkv, &a->att, &a->atty,
                      &a->attproj, &a->res1, &a->ln1_mean, &a->ln1_rstd, &a->ln1, &a->fch,
                      &a->fch_act, &a->fcproj, &a->res2, &a->ln2_mean, &a->ln2_rstd,
                      &a->emb_drop, &a->att_drop, &a->res1_drop, &a->res2_drop, &a->dx, &a->dres,
                      &a->dtmp, &a->dfp, &a->dqkv, &a->dff, &a->dff2, &a->scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) kst_free(*bufs[i]);
    kst_free(a->ids);
    kst_free(a->types);
    kst_free(a->valid);
    memset(a, 0, sizeof *a);
}

#define GROW(ptr, count, what) KST_TRY(kst_realloc((void **)&(ptr), (count), sizeof *(ptr), what, err))

static int reserve(const kst_bert_config *c, kst_bert_train_acts *a, size_t B, size_t T,
                   float dropout, kst_error *err) {
    int rc = KST_OK;
    size_t C = c->C, FF = c->FF, L = c->L, BT = B * T, A = B * c->NH * T * T;
    if (BT > a->cap_tokens) {
        GROW(a->ids, BT, "token ids");
        GROW(a->types, BT, "token types");
        GROW(a->valid, B ? B : 1, "lengths");
        GROW(a->emb, BT * C, "activations");
        GROW(a->emb_mean, BT, "activations");
        GROW(a->emb_rstd, BT, "activations");
        GROW(a->x, (L + 1) * BT * C, "activations");
        GROW(a->qkv, L * BT * 3 * C, "activations");
        GROW(a->atty, L * BT * C, "activations");
        GROW(a->attproj, L * BT * C, "activations");
        GROW(a->res1, L * BT * C, "activations");
        GROW(a->ln1_mean, L * BT, "activations");
        GROW(a->ln1_rstd, L * BT, "activations");
        GROW(a->ln1, L * BT * C, "activations");
        GROW(a->fch, L * BT * FF, "activations");
        GROW(a->fch_act, L * BT * FF, "activations");
        GROW(a->fcproj, L * BT * C, "activations");
        GROW(a->res2, L * BT * C, "activations");
        GROW(a->ln2_mean, L * BT, "activations");
        GROW(a->ln2_rstd, L * BT, "activations");
        GROW(a->dx, BT * C, "gradients");
        GROW(a->dres, BT * C, "gradients");
        GROW(a->dtmp, BT * C, "gradients");
        GROW(a->dfp, BT * C, "gradients");
        GROW(a->dqkv, BT * 3 * C, "gradients");
        GROW(a->dff, BT * FF, "gradients");
        GROW(a->dff2, BT * FF, "gradients");
        a->cap_tokens = BT;
    }
    if (A > a->cap_att) {
        GROW(a->att, L * A, "attention probabilities");
        a->cap_att = A;
    }
    size_t ns = kst_attention_backward_scratch_floats(T);
    if (ns > a->cap_scratch) {
        GROW(a->scratch, ns, "attention scratch");
        a->cap_scratch = ns;
    }
    if (dropout > 0 && BT > a->cap_drop_tokens) {
        GROW(a->emb_drop, BT * C, "dropout masks");
        GROW(a->res1_drop, L * BT * C, "dropout masks");
        GROW(a->res2_drop, L * BT * C, "dropout masks");
        a->cap_drop_tokens = BT;
    }
    if (dropout > 0 && A > a->cap_drop_att) {
        GROW(a->att_drop, L * A, "dropout masks");
        a->cap_drop_att = A;
    }
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* forward */

int kst_bert_train_forward(const kst_bert *m, kst_bert_train_acts *a, const int32_t *ids,
                           const int32_t *type_ids, const int *valid, size_t B, size_t T,
                           float dropout, uint64_t *rng, kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    const kst_bert_params *p = &m->params;
    size_t C = c->C, FF = c->FF, NH = c->NH, BT = B * T, A = B * NH * T * T;
    if (T > c->P)
        return kst_fail(err, KST_ERR_INVALID, "sequence of %zu tokens exceeds the model's %zu positions", T, c->P);
    if (!(dropout >= 0 && dropout < 1))
        return kst_fail(err, KST_ERR_INVALID, "dropout %g is outside [0, 1)", (double)dropout);
    if (dropout > 0 && !rng) return kst_fail(err, KST_ERR_MISUSE, "dropout needs a random state");
    {
        int idrc = kst_bert_check_ids(c, ids, type_ids, BT, T, err);
        if (idrc != KST_OK) return idrc;
    }
    int rc = reserve(c, a, B, T, dropout, err);
    if (rc != KST_OK) return rc;
    a->B = B, a->T = T, a->dropout = dropout;
    memcpy(a->ids, ids, BT * sizeof *ids);
    for (size_t i = 0; i < BT; i++) a->types[i] = type_ids ? type_ids[i] : 0;
    memcpy(a->valid, valid, B * sizeof *valid);
    int drop = dropout > 0;
    kst_embedding_forward(a->emb, a->ids, a->types, p->wte, p->wpe, c->TT ? p->wtt : NULL, B, T, C);
    kst_layernorm_forward(a->x, a->emb_mean, a->emb_rstd, a->emb, p->emblnw, p->emblnb, BT, C, c->eps);
    if (drop) {
        kst_dropout_mask(a->emb_drop, BT * C, dropout, rng);
        kst_dropout_forward(a->x, a->x, a->emb_drop, BT * C);
    }
    for (size_t l = 0; l < c->L; l++) {
        const float *xin = a->x + l * BT * C;
        float *qkv = a->qkv + l * BT * 3 * C, *att = a->att + l * A, *atty = a->atty + l * BT * C;
        float *ap = a->attproj + l * BT * C, *r1 = a->res1 + l * BT * C, *ln1 = a->ln1 + l * BT * C;
        float *fch = a->fch + l * BT * FF, *fca = a->fch_act + l * BT * FF;
        float *fp = a->fcproj + l * BT * C, *r2 = a->res2 + l * BT * C;
        kst_matmul_forward(qkv, xin, p->qkvw + l * 3 * C * C, p->qkvb + l * 3 * C, BT, C, 3 * C);
        kst_attention_forward(atty, att, NULL, qkv, a->valid, B, T, C, NH);
        if (drop) {
            kst_dropout_mask(a->att_drop + l * A, A, dropout, rng);
            kst_attention_values(atty, a->scratch, att, a->att_drop + l * A, qkv, a->valid, B, T, C, NH);
        }
        kst_matmul_forward(ap, atty, p->attprojw + l * C * C, p->attprojb + l * C, BT, C, C);
        if (drop && c->arch == KST_ARCH_BERT) {
            kst_dropout_mask(a->res1_drop + l * BT * C, BT * C, dropout, rng);
            kst_dropout_forward(r1, ap, a->res1_drop + l * BT * C, BT * C);
            kst_residual_forward(r1, r1, xin, BT * C);
        } else {
            kst_residual_forward(r1, ap, xin, BT * C);
        }
        kst_layernorm_forward(ln1, a->ln1_mean + l * BT, a->ln1_rstd + l * BT, r1, p->ln1w + l * C,
                              p->ln1b + l * C, BT, C, c->eps);
        kst_matmul_forward(fch, ln1, p->fcw + l * FF * C, p->fcb + l * FF, BT, C, FF);
        kst_act_forward(fca, fch, BT * FF, c->act);
        kst_matmul_forward(fp, fca, p->fcprojw + l * C * FF, p->fcprojb + l * C, BT, FF, C);
        if (drop) {
            kst_dropout_mask(a->res2_drop + l * BT * C, BT * C, dropout, rng);
            kst_dropout_forward(r2, fp, a->res2_drop + l * BT * C, BT * C);
            kst_residual_forward(r2, r2, ln1, BT * C);
        } else {
            kst_residual_forward(r2, fp, ln1, BT * C);
        }
        kst_layernorm_forward(a->x + (l + 1) * BT * C, a->ln2_mean + l * BT, a->ln2_rstd + l * BT,
                              r2, p->ln2w + l * C, p->ln2b + l * C, BT, C, c->eps);
    }
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* backward */

/* dst = mask ? src * mask : src (dst zeroed first: backward adds). */
static void through_dropout(float *dst, const float *src, const float *mask, size_t n) {
    if (mask) {
        memset(dst, 0, n * sizeof(float));
        kst_dropout_backward(dst, src, mask, n);
    } else {
        memcpy(dst, src, n * sizeof(float));
    }
}

void kst_bert_train_backward(const kst_bert *m, kst_bert *grads, kst_bert_train_acts *a,
                             const float *dhidden) {
    const kst_bert_config *c = &m->cfg;
    const kst_bert_params *p = &m->params;
    kst_bert_params *g = &grads->params;
    size_t B = a->B, T = a->T, C = c->C, FF = c->FF, NH = c->NH, BT = B * T, A = B * NH * T * T;
    int drop = a->dropout > 0;
    size_t nC = BT * C * sizeof(float);
    memcpy(a->dx, dhidden, nC); /* dx: d loss / d x[l + 1] */
    for (size_t l = c->L; l-- > 0;) {
        const float *xin = a->x + l * BT * C;
        const float *qkv = a->qkv + l * BT * 3 * C, *att = a->att + l * A, *atty = a->atty + l * BT * C;
        const float *r1 = a->res1 + l * BT * C, *ln1 = a->ln1 + l * BT * C;
        const float *fch = a->fch + l * BT * FF, *fca = a->fch_act + l * BT * FF;
        const float *r2 = a->res2 + l * BT * C;
        /* LN2: dres = d res2 */
        memset(a->dres, 0, nC);
        kst_layernorm_backward(a->dres, g->ln2w + l * C, g->ln2b + l * C, a->dx, r2, p->ln2w + l * C,
                               a->ln2_mean + l * BT, a->ln2_rstd + l * BT, BT, C);
        /* res2 = ln1 + dropout(fcproj): dtmp = d ln1 (residual part), dfp = d fcproj */
        memcpy(a->dtmp, a->dres, nC);
        through_dropout(a->dfp, a->dres, drop ? a->res2_drop + l * BT * C : NULL, BT * C);
        memset(a->dff, 0, BT * FF * sizeof(float));
        kst_matmul_backward(a->dff, g->fcprojw + l * C * FF, g->fcprojb + l * C, a->dfp, fca,
                            p->fcprojw + l * C * FF, BT, FF, C);
        memset(a->dff2, 0, BT * FF * sizeof(float));
        kst_act_backward(a->dff2, a->dff, fch, BT * FF, c->act);
        kst_matmul_backward(a->dtmp, g->fcw + l * FF * C, g->fcb + l * FF, a->dff2, ln1,
                            p->fcw + l * FF * C, BT, C, FF);
        /* LN1: dres = d res1 */
        memset(a->dres, 0, nC);
        kst_layernorm_backward(a->dres, g->ln1w + l * C, g->ln1b + l * C, a->dtmp, r1, p->ln1w + l * C,
                               a->ln1_mean + l * BT, a->ln1_rstd + l * BT, BT, C);
        /* res1 = xin + dropout(attproj): dx = d xin (residual part), dfp = d attproj */
        memcpy(a->dx, a->dres, nC);
        through_dropout(a->dfp, a->dres,
                        drop && c->arch == KST_ARCH_BERT ? a->res1_drop + l * BT * C : NULL, BT * C);
        memset(a->dtmp, 0, nC);
        kst_matmul_backward(a->dtmp, g->attprojw + l * C * C, g->attprojb + l * C, a->dfp, atty,
                            p->attprojw + l * C * C, BT, C, C);
        memset(a->dqkv, 0, BT * 3 * C * sizeof(float));
        kst_attention_backward(a->dqkv, a->scratch, a->dtmp, qkv, att, drop ? a->att_drop + l * A : NULL,
                               a->valid, B, T, C, NH);
        kst_matmul_backward(a->dx, g->qkvw + l * 3 * C * C, g->qkvb + l * 3 * C, a->dqkv, xin,
                            p->qkvw + l * 3 * C * C, BT, C, 3 * C);
    }
    /* x[0] = dropout(LN(emb)) */
    through_dropout(a->dtmp, a->dx, drop ? a->emb_drop : NULL, BT * C);
    memset(a->dres, 0, nC);
    kst_layernorm_backward(a->dres, g->emblnw, g->emblnb, a->dtmp, a->emb, p->emblnw, a->emb_mean,
                           a->emb_rstd, BT, C);
    kst_embedding_backward(g->wte, g->wpe, c->TT ? g->wtt : NULL, a->dres, a->ids, a->types, B, T, C);
}

/* ------------------------------------------------------------------------------------------ */
/* heads */

void kst_head_acts_free(kst_head_acts *h) {
    if (!h) return;
    kst_free(h->pooled);
    kst_free(h->pre);
    kst_free(h->out);
    kst_free(h->norm);
    kst_free(h->d1);
    kst_free(h->d2);
    memset(h, 0, sizeof *h);
}

static int head_reserve(kst_head_acts *h, size_t rows, size_t cols, kst_error *err) {
    int rc = KST_OK;
    if (rows > h->cap_rows || cols > h->cap_cols) {
        size_t r = rows > h->cap_rows ? rows : h->cap_rows, k = cols > h->cap_cols ? cols : h->cap_cols;
        GROW(h->pooled, r * k, "head activations");
        GROW(h->pre, r * k, "head activations");
        GROW(h->out, r * k, "head activations");
        GROW(h->norm, r, "head activations");
        GROW(h->d1, r * k, "head gradients");
        GROW(h->d2, r * k, "head gradients");
        h->cap_rows = r, h->cap_cols = k;
    }
done:
    return rc;
}

int kst_dense_head_forward(const kst_bert *m, kst_head_acts *h, const float *hidden,
                           const int *valid, unsigned modes, int normalize, size_t B, size_t T,
                           kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    size_t P = kst_pool_dim(modes, c->C), D = c->dense_out ? c->dense_out : P;
    if (c->dense_out && c->dense_in != P)
        return kst_fail(err, KST_ERR_SHAPE, "Dense takes %zu inputs but pooling gives %zu", c->dense_in, P);
    int rc = head_reserve(h, B, P > D ? P : D, err);
    if (rc != KST_OK) return rc;
    kst_pool_forward(h->pooled, hidden, valid, modes, B, T, c->C);
    const float *v = h->pooled;
    if (c->dense_out) {
        kst_matmul_forward(h->pre, h->pooled, m->params.densew, m->params.denseb, B, P, D);
        kst_act_forward(h->out, h->pre, B * D, c->dense_act);
        v = h->out;
    }
    if (normalize) kst_l2norm_forward(h->out, h->norm, v, B, D);
    else if (v != h->out) memcpy(h->out, v, B * D * sizeof(float));
    return KST_OK;
}

void kst_dense_head_backward(const kst_bert *m, kst_bert *grads, kst_head_acts *h, float *dhidden,
                             const float *dout, const float *hidden, const int *valid,
                             unsigned modes, int normalize, size_t B, size_t T) {
    const kst_bert_config *c = &m->cfg;
    size_t P = kst_pool_dim(modes, c->C), D = c->dense_out ? c->dense_out : P;
    /* d1 = d (vector before Normalize) */
    if (normalize) {
        memset(h->d1, 0, B * D * sizeof(float));
        /* l2norm's backward needs its output; Normalize's input was out before it overwrote */
        kst_l2norm_backward(h->d1, dout, h->out, h->norm, B, D);
    } else {
        memcpy(h->d1, dout, B * D * sizeof(float));
    }
    const float *dpooled = h->d1;
    if (c->dense_out) {
        memset(h->d2, 0, B * D * sizeof(float));
        kst_act_backward(h->d2, h->d1, h->pre, B * D, c->dense_act);
        memset(h->d1, 0, B * P * sizeof(float));
        kst_matmul_backward(h->d1, grads->params.densew, grads->params.denseb, h->d2, h->pooled,
                            m->params.densew, B, P, D);
    }
    kst_pool_backward(dhidden, dpooled, hidden, valid, modes, B, T, c->C);
}

int kst_colbert_head_forward(const kst_bert *m, kst_head_acts *h, const float *hidden, size_t B,
                             size_t T, kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    if (!c->proj_dim) return kst_fail(err, KST_ERR_MISUSE, "the model has no ColBERT linear");
    int rc = head_reserve(h, B * T, c->proj_dim, err);
    if (rc != KST_OK) return rc;
    kst_matmul_forward(h->pre, hidden, m->params.projw, NULL, B * T, c->C, c->proj_dim);
    kst_l2norm_forward(h->out, h->norm, h->pre, B * T, c->proj_dim);
    return KST_OK;
}

void kst_colbert_head_backward(const kst_bert *m, kst_bert *grads, kst_head_acts *h,
                               float *dhidden, const float *dout, const float *hidden, size_t B,
                               size_t T) {
    const kst_bert_config *c = &m->cfg;
    size_t N = B * T, D = c->proj_dim;
    memset(h->d1, 0, N * D * sizeof(float));
    kst_l2norm_backward(h->d1, dout, h->out, h->norm, N, D);
    kst_matmul_backward(dhidden, grads->params.projw, NULL, h->d1, hidden, m->params.projw, N, c->C, D);
}

/* ------------------------------------------------------------------------------------------ */
/* cross-encoder head */

void kst_cross_head_acts_free(kst_cross_head_acts *h) {
    if (!h) return;
    float **bufs[] = {&h->cls, &h->pre, &h->pooled, &h->drop, &h->logits, &h->dpooled, &h->dpre, &h->dcls};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) kst_free(*bufs[i]);
    memset(h, 0, sizeof *h);
}

/* BERT's pooler is tanh, DistilBERT's pre_classifier ReLU (transformers' modeling files). */
static kst_act cross_act(const kst_bert *m) {
    return m->cfg.arch == KST_ARCH_BERT ? KST_ACT_TANH : KST_ACT_RELU;
}

int kst_cross_head_forward(const kst_bert *m, kst_cross_head_acts *h, const float *hidden,
                           size_t B, size_t T, float dropout, uint64_t *rng, kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    size_t C = c->C, PD = c->pool_dim, NL = c->NL;
    if (!PD || !NL || !m->params.clsw)
        return kst_fail(err, KST_ERR_MISUSE, "the model has no sequence-classification head");
    if (dropout > 0 && !rng) return kst_fail(err, KST_ERR_MISUSE, "dropout needs a random state");
    int rc = KST_OK;
    size_t w = C > PD ? C : PD;
    if (w < NL) w = NL;
    if (B * w > h->cap) {
        GROW(h->cls, B * w, "head activations");
        GROW(h->pre, B * w, "head activations");
        GROW(h->pooled, B * w, "head activations");
        GROW(h->drop, B * w, "head activations");
        GROW(h->logits, B * w, "head activations");
        GROW(h->dpooled, B * w, "head gradients");
        GROW(h->dpre, B * w, "head gradients");
        GROW(h->dcls, B * w, "head gradients");
        h->cap = B * w;
    }
    h->B = B;
    for (size_t b = 0; b < B; b++) memcpy(h->cls + b * C, hidden + b * T * C, C * sizeof(float));
    kst_matmul_forward(h->pre, h->cls, m->params.poolw, m->params.poolb, B, C, PD);
    kst_act_forward(h->pooled, h->pre, B * PD, cross_act(m));
    h->dropped = dropout > 0;
    if (h->dropped) {
        kst_dropout_mask(h->drop, B * PD, dropout, rng);
        kst_dropout_forward(h->pooled, h->pooled, h->drop, B * PD);
    }
    kst_matmul_forward(h->logits, h->pooled, m->params.clsw, m->params.clsb, B, PD, NL);
done:
    return rc;
}

void kst_cross_head_backward(const kst_bert *m, kst_bert *grads, kst_cross_head_acts *h,
                             float *dhidden, const float *dlogits, size_t T) {
    const kst_bert_config *c = &m->cfg;
    size_t B = h->B, C = c->C, PD = c->pool_dim, NL = c->NL;
    memset(h->dpooled, 0, B * PD * sizeof(float));
    kst_matmul_backward(h->dpooled, grads->params.clsw, grads->params.clsb, dlogits, h->pooled,
                        m->params.clsw, B, PD, NL);
    if (h->dropped) { /* d (act output) = d pooled * mask */
        memcpy(h->dpre, h->dpooled, B * PD * sizeof(float));
        memset(h->dpooled, 0, B * PD * sizeof(float));
        kst_dropout_backward(h->dpooled, h->dpre, h->drop, B * PD);
    }
    memset(h->dpre, 0, B * PD * sizeof(float));
    kst_act_backward(h->dpre, h->dpooled, h->pre, B * PD, cross_act(m));
    memset(h->dcls, 0, B * C * sizeof(float));
    kst_matmul_backward(h->dcls, grads->params.poolw, grads->params.poolb, h->dpre, h->cls,
                        m->params.poolw, B, C, PD);
    for (size_t b = 0; b < B; b++) {
        float *dst = dhidden + b * T * C;
        for (size_t k = 0; k < C; k++) dst[k] += h->dcls[b * C + k];
    }
}
