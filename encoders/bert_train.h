/* bert_train.h - the training-mode forward pass of the transformer and its heads, which keeps
 * what the backward pass needs in one activations struct, and the backward pass over the whole
 * model, into a gradient buffer laid out exactly as the parameters (llm.c's shape).
 *
 * Gradients: a second kst_bert allocated with the same config (kst_bert_grads_alloc) so that
 * grads.params.qkvw is d loss / d params.qkvw, and grads.param_mem (num_params floats) is the one
 * flat buffer an optimizer, a clip or an all-reduce walks. Every backward ADDS into it (so several
 * forward/backward passes, e.g. query, positive and negative batches, accumulate); zero it with
 * kst_bert_grads_zero. Dropout follows transformers: after the embedding LayerNorm, on the
 * attention probabilities, after the attention output projection (BERT only; DistilBERT has none
 * there) and after the feed-forward output. */
#ifndef KST_ENCODERS_BERT_TRAIN_H
#define KST_ENCODERS_BERT_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert.h"

int kst_bert_grads_alloc(kst_bert *grads, const kst_bert *m, kst_error *err);
void kst_bert_grads_zero(kst_bert *grads);

/* What one training forward pass keeps. Zero-initialise; grown on demand; one per concurrent
 * batch (the query, positive and negative batches of a triple step each need their own until
 * their backward has run). Free with kst_bert_train_acts_free. Shapes: BT = B * T. */
typedef struct kst_bert_train_acts {
    size_t B, T;
    float dropout;
    int32_t *ids, *types; /* (BT) copies of the batch */
    int *valid;           /* (B) */
    float *emb;           /* (BT, C) word + position + type embeddings (embedding LN input) */
    float *emb_mean, *emb_rstd; /* (BT) */
    float *x;             /* (L + 1, BT, C) residual stream; x[L] is the last hidden state */
    float *qkv;           /* (L, BT, 3C) */
    float *att;           /* (L, B, NH, T, T) softmax probabilities */
    float *atty;          /* (L, BT, C) attended values */
    float *attproj;       /* (L, BT, C) attention output projection, before dropout */
    float *res1;          /* (L, BT, C) x + dropout(attproj): LN1 input */
    float *ln1_mean, *ln1_rstd; /* (L, BT) */
    float *ln1;           /* (L, BT, C) */
    float *fch;           /* (L, BT, FF) feed-forward pre-activation */
    float *fch_act;       /* (L, BT, FF) */
    float *fcproj;        /* (L, BT, C) feed-forward output, before dropout */
    float *res2;          /* (L, BT, C) ln1 + dropout(fcproj): LN2 input */
    float *ln2_mean, *ln2_rstd; /* (L, BT) */
    /* dropout masks (0 or 1/(1-p)), allocated only when dropout > 0 */
    float *emb_drop;      /* (BT, C) */
    float *att_drop;      /* (L, B, NH, T, T) */
    float *res1_drop, *res2_drop; /* (L, BT, C) */
    /* backward scratch */
    float *dx, *dres, *dtmp, *dfp; /* (BT, C) */
    float *dqkv;          /* (BT, 3C) */
    float *dff, *dff2;    /* (BT, FF) */
    float *scratch;       /* attention scratch */
    size_t cap_tokens, cap_att, cap_scratch, cap_drop_tokens, cap_drop_att;
} kst_bert_train_acts;
void kst_bert_train_acts_free(kst_bert_train_acts *a);

/* The last hidden states (B, T, C) of the latest forward pass (inside a). */
static inline const float *kst_bert_train_hidden(const kst_bert *m, const kst_bert_train_acts *a) {
    return a->x + m->cfg.L * a->B * a->T * m->cfg.C;
}

/* Training forward over a padded batch (arguments as kst_bert_forward). dropout in [0, 1): 0
 * turns it off (and then equals kst_bert_forward up to float rounding); masks are drawn from
 * *rng (kst_rng_seed), so a seed gives the same masks. Fails on memory or bad ids. */
int kst_bert_train_forward(const kst_bert *m, kst_bert_train_acts *a, const int32_t *ids,
                           const int32_t *type_ids, const int *valid, size_t B, size_t T,
                           float dropout, uint64_t *rng, kst_error *err);

/* Backward of the latest kst_bert_train_forward on a: adds d loss / d params into grads, given
 * dhidden (B, T, C) = d loss / d last hidden states (rows of padding may be anything; they only
 * reach the loss through the head, which gives them 0). Cannot fail. */
void kst_bert_train_backward(const kst_bert *m, kst_bert *grads, kst_bert_train_acts *a,
                             const float *dhidden);

/* ------------------------------------------------------------------------------------------ */
/* heads */

/* What a head's forward keeps. Zero-initialise; free with kst_head_acts_free. */
typedef struct kst_head_acts {
    float *pooled;  /* dense: (B, P) pooled vector */
    float *pre;     /* dense: (B, Do) Dense output before its activation; ColBERT: (BT, D) */
    float *out;     /* dense: (B, D); ColBERT: (BT, D) the head's output vectors */
    float *norm;    /* (B) or (BT) norms before Normalize */
    float *d1, *d2; /* backward scratch, as large as pre / pooled */
    size_t cap_rows, cap_cols;
} kst_head_acts;
void kst_head_acts_free(kst_head_acts *h);

/* Dense student head: pooling (modes: KST_POOL_* bits of encoder.h) over the first valid[b]
 * tokens of hidden (B, T, C), then the sentence-transformers Dense (when m->cfg.dense_out) and its
 * activation, then L2 Normalize when `normalize`. The vectors land in h->out (B, dim). */
int kst_dense_head_forward(const kst_bert *m, kst_head_acts *h, const float *hidden,
                           const int *valid, unsigned modes, int normalize, size_t B, size_t T,
                           kst_error *err);
/* dhidden (B, T, C) += the gradient, grads (Dense weights) += theirs, from dout (B, dim). */
void kst_dense_head_backward(const kst_bert *m, kst_bert *grads, kst_head_acts *h, float *dhidden,
                             const float *dout, const float *hidden, const int *valid,
                             unsigned modes, int normalize, size_t B, size_t T);

/* ColBERT head: every token's hidden state (B, T, C) through the linear (proj_dim, C), then L2
 * normalised, into h->out (B * T, D). Which vectors enter MaxSim (query padding, document
 * punctuation) is the caller's choice; unused rows simply get no gradient. */
int kst_colbert_head_forward(const kst_bert *m, kst_head_acts *h, const float *hidden, size_t B,
                             size_t T, kst_error *err);
void kst_colbert_head_backward(const kst_bert *m, kst_bert *grads, kst_head_acts *h,
                               float *dhidden, const float *dout, const float *hidden, size_t B,
                               size_t T);

/* Cross-encoder head (BertForSequenceClassification / DistilBertForSequenceClassification): the
 * [CLS] hidden state (row 0 of each sequence) through the BERT pooler (dense + tanh) or the
 * DistilBERT pre_classifier (dense + ReLU), dropout (transformers' classifier dropout; 0: off),
 * then the classifier (NL, pool_dim) into logits (B, NL). Zero-initialise; grown on demand; free
 * with kst_cross_head_acts_free. */
typedef struct kst_cross_head_acts {
    size_t B;
    float *cls;     /* (B, C) [CLS] hidden states */
    float *pre;     /* (B, PD) pooler pre-activation */
    float *pooled;  /* (B, PD) after tanh / ReLU (and dropout): the classifier's input */
    float *drop;    /* (B, PD) dropout mask, when dropout > 0 */
    float *logits;  /* (B, NL) */
    float *dpooled, *dpre, *dcls; /* backward scratch */
    size_t cap;
    int dropped;
} kst_cross_head_acts;
void kst_cross_head_acts_free(kst_cross_head_acts *h);

/* Forward of the cross-encoder head over hidden (B, T, C); logits land in h->logits. Masks come
 * from *rng when dropout > 0. Fails on memory, or KST_ERR_MISUSE when the model has no head. */
int kst_cross_head_forward(const kst_bert *m, kst_cross_head_acts *h, const float *hidden,
                           size_t B, size_t T, float dropout, uint64_t *rng, kst_error *err);
/* dhidden (B, T, C) += the gradient (row 0 of each sequence only), grads (pooler / pre_classifier
 * and classifier) += theirs, from dlogits (B, NL). Cannot fail. */
void kst_cross_head_backward(const kst_bert *m, kst_bert *grads, kst_cross_head_acts *h,
                             float *dhidden, const float *dlogits, size_t T);

#endif
