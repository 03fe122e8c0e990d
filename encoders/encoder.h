/* encoder.h - a checkpoint folder turned into vectors and scores: role detection (dense,
 * ColBERT, cross-encoder), tokenization, length-bucketed batches, the transformer and the heads. */
#ifndef KST_ENCODERS_ENCODER_H
#define KST_ENCODERS_ENCODER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert.h"
#include "encoders/tokenizer.h"

typedef enum { KST_ROLE_AUTO = 0, KST_ROLE_DENSE, KST_ROLE_COLBERT, KST_ROLE_CROSS } kst_role;

/* sentence-transformers pooling modes; several may be set (their outputs are concatenated in
 * the order cls, max, mean, mean_sqrt_len as sentence-transformers does). */
enum { KST_POOL_CLS = 1, KST_POOL_MAX = 2, KST_POOL_MEAN = 4, KST_POOL_MEAN_SQRT = 8 };

typedef enum { KST_SIM_COSINE, KST_SIM_DOT } kst_similarity;

typedef struct kst_encoder {
    kst_role role;
    char *dir;
    kst_tokenizer *tok;
    kst_bert bert;
    size_t dim;           /* output vector size (dense, ColBERT) */
    size_t max_len;       /* default max tokens (dense: max_seq_length; cross: pair length) */
    /* dense */
    unsigned pool_modes;
    int normalize;
    kst_similarity similarity;
    char *query_prompt;   /* prepended to queries (sentence-transformers "prompts.query") */
    /* ColBERT */
    size_t query_maxlen, doc_maxlen;
    int attend_to_mask;
    int32_t q_marker, d_marker;
    unsigned char *skip;  /* (V) 1 for document tokens dropped (punctuation) */
    char *weight_files[2]; /* model.safetensors (+ the Dense module's): what fingerprints it */
    size_t n_weight_files;
    struct kst_bert_gpu *gpu; /* the transformer on the GPU (kst_encoder_set_device), or NULL */
} kst_encoder;

/* An open encoder is read-only after kst_encoder_open: every call keeps its scratch to itself,
 * so one encoder serves any number of threads at once. */

/* Opens a checkpoint folder. role KST_ROLE_AUTO detects it: modules.json -> dense
 * (sentence-transformers), artifact.metadata -> ColBERT, a *ForSequenceClassification config ->
 * cross, any other BERT folder -> dense with CLS pooling. Errors name the file at fault.
 * Free with kst_encoder_free. */
int kst_encoder_open(const char *dir, kst_role role, kst_encoder **out, kst_error *err);
void kst_encoder_free(kst_encoder *e);
const char *kst_role_name(kst_role r);

/* Dense: embeds n texts (is_query selects the query prompt) into out (n, dim). max_len 0 uses
 * the model's; batch 0 uses 32. Texts are bucketed by length; results do not depend on it. */
int kst_encoder_embed(kst_encoder *e, const char *const *texts, const size_t *lens, size_t n,
                      int is_query, size_t max_len, size_t batch, float *out, kst_error *err);

/* ColBERT: per-text token vectors. Queries give query_maxlen vectors each ([MASK]-padded);
 * documents give their kept tokens. *vecs (total, dim) is allocated here (kst_free);
 * offsets (n + 1) receives each text's first row. */
int kst_encoder_embed_tokens(kst_encoder *e, const char *const *texts, const size_t *lens,
                             size_t n, int is_query, size_t max_len, size_t batch, float **vecs,
                             size_t *total, int64_t *offsets, kst_error *err);

/* Scores n (query, passage) pairs into out (n, kst_encoder_num_scores): dense similarity,
 * ColBERT MaxSim, or cross-encoder logits. */
int kst_encoder_score(kst_encoder *e, const char *const *queries, const size_t *qlens,
                      const char *const *passages, const size_t *plens, size_t n, size_t max_len,
                      size_t batch, float *out, kst_error *err);
size_t kst_encoder_num_scores(const kst_encoder *e);

/* Token ids (special tokens included) of a text or pair exactly as the model's encoder would
 * feed them (ColBERT markers and query padding included). */
int kst_encoder_tokenize(kst_encoder *e, const char *a, size_t alen, const char *b, size_t blen,
                         int is_query, size_t max_len, kst_ids *out, kst_error *err);

/* Runs the transformer on the GPU (device 1, KST_DEV_CUDA: encoders/bert_gpu.h, bf16) or the CPU
 * (0). Tokenization and the heads stay on the CPU. Fails with KST_ERR_UNSUPPORTED when the build
 * has no GPU backend, there is no device, or the model's sizes do not suit the GPU kernels. */
int kst_encoder_set_device(kst_encoder *e, int device, kst_error *err);

#endif
