/* bert.h - the transformer every role shares (BERT and DistilBERT, post-LayerNorm) and the
 * parameters of the heads that sit on it, in llm.c's shape: one flat parameter buffer, a struct
 * of named pointers into it, a table of sizes, and a forward pass over a padded batch. */
#ifndef KST_ENCODERS_BERT_H
#define KST_ENCODERS_BERT_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/ops.h"
#include "encoders/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KST_ARCH_BERT, KST_ARCH_DISTILBERT } kst_arch;

typedef struct kst_bert_config {
    kst_arch arch;
    size_t V;   /* vocabulary size */
    size_t P;   /* max_position_embeddings */
    size_t TT;  /* token type vocabulary (0 for DistilBERT) */
    size_t C;   /* hidden size */
    size_t L;   /* layers */
    size_t NH;  /* attention heads */
    size_t FF;  /* feed-forward width */
    kst_act act;
    float eps;
    /* Heads; a size of 0 means the head is absent. */
    size_t pool_dim;   /* C when a BERT pooler / DistilBERT pre_classifier is used */
    size_t NL;         /* classifier outputs (num_labels) */
    size_t proj_dim;   /* ColBERT linear (proj_dim, C), no bias */
    size_t dense_in, dense_out; /* sentence-transformers Dense (dense_out, dense_in) + bias */
    kst_act dense_act;
} kst_bert_config;

#define KST_BERT_NPARAMS 24
typedef struct kst_bert_params {
    float *wte;      /* (V, C) word embeddings */
    float *wpe;      /* (P, C) position embeddings */
    float *wtt;      /* (TT, C) token type embeddings */
    float *emblnw;  /* (C) embedding LayerNorm */
    float *emblnb;   /* (C) */
    float *qkvw;     /* (L, 3C, C) query, key and value weights stacked */
    float *qkvb;     /* (L, 3C) */
    float *attprojw; /* (L, C, C) attention output projection */
    float *attprojb; /* (L, C) */
    float *ln1w;     /* (L, C) LayerNorm after attention */
    float *ln1b;     /* (L, C) */
    float *fcw;      /* (L, FF, C) feed-forward in */
    float *fcb;      /* (L, FF) */
    float *fcprojw;  /* (L, C, FF) feed-forward out */
    float *fcprojb;  /* (L, C) */
    float *ln2w;     /* (L, C) LayerNorm after feed-forward */
    float *ln2b;     /* (L, C) */
    float *poolw;    /* (pool_dim, C) BERT pooler dense / DistilBERT pre_classifier */
    float *poolb;    /* (pool_dim) */
    float *clsw;     /* (NL, pool_dim or C) classifier */
    float *clsb;     /* (NL) */
    float *projw;    /* (proj_dim, C) ColBERT linear */
    float *densew;   /* (dense_out, dense_in) sentence-transformers Dense */
    float *denseb;   /* (dense_out) */
} kst_bert_params;

typedef struct kst_bert {
    kst_bert_config cfg;
    kst_bert_params params;
    size_t param_sizes[KST_BERT_NPARAMS];
    size_t num_params;
    float *param_mem; /* the one allocation behind params */
} kst_bert;

/* Fills cfg's transformer fields from a config.json (BertModel, BertForSequenceClassification,
 * DistilBertModel, DistilBertForSequenceClassification). Heads are left at 0 except NL, which is
 * read from id2label / num_labels (1 when absent). Errors name the file and the key. */
int kst_bert_config_load(const char *path, kst_bert_config *cfg, kst_error *err);
/* Maps a hidden_act / activation string to kst_act; -1 when unknown. */
int kst_act_from_name(const char *name);

/* Allocates the flat parameter buffer for cfg (zeroed). */
int kst_bert_alloc(kst_bert *m, const kst_bert_config *cfg, kst_error *err);
/* Frees the parameters; a zeroed struct is a no-op. */
void kst_bert_free(kst_bert *m);

/* Loads the transformer (and pooler/classifier/ColBERT linear when cfg has them) from a mapped
 * checkpoint. Names may carry a "bert." / "distilbert." prefix. A missing tensor, a tensor of the
 * wrong shape or dtype, or an unexpected tensor inside the model's namespace is an error naming
 * the tensor, the expected and found shape, and the file. */
int kst_bert_load_weights(kst_bert *m, const kst_safetensors *st, kst_error *err);
/* Loads a sentence-transformers Dense module's "linear.weight" / "linear.bias". */
int kst_bert_load_dense(kst_bert *m, const kst_safetensors *st, kst_error *err);

/* Scratch for the forward pass, grown on demand. Zero-initialise; free with kst_bert_acts_free. */
typedef struct kst_bert_acts {
    float *qkv;   /* (B, T, 3C) */
    float *atty;  /* (B, T, C) */
    float *tmp;   /* (B, T, C) */
    float *ff;    /* (B, T, FF) */
    float *scratch; /* attention score scratch */
    size_t cap_tokens, cap_scratch;
} kst_bert_acts;
void kst_bert_acts_free(kst_bert_acts *a);

/* Checks a padded batch's token ids (and type ids, NULL: all 0) against the vocabulary and
 * type_vocab_size, naming the first bad position; the CPU and GPU forwards and trainers call it. */
int kst_bert_check_ids(const kst_bert_config *c, const int32_t *ids, const int32_t *type_ids, size_t BT, size_t T,
                       kst_error *err);

/* Runs the transformer on a padded batch.
 * ids, type_ids (B, T) (type_ids may be NULL: all 0); valid (B): real tokens per sequence (the
 * rest is padding, never attended to, though its rows are computed); out (B, T, C): last hidden
 * states. Fails only on memory (or on ids out of range, naming the position). */
int kst_bert_forward(const kst_bert *m, kst_bert_acts *a, float *out, const int32_t *ids,
                     const int32_t *type_ids, const int *valid, size_t B, size_t T,
                     kst_error *err);

#ifdef __cplusplus
}
#endif

#endif
