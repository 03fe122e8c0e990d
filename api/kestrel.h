/* kestrel.h - Kestrel's one public header: encoders for dense, late-interaction (ColBERT) and
 * cross-encoder checkpoints in the Hugging Face / sentence-transformers / colbert-ai layouts.
 *
 * Conventions (the same for every call):
 * - Every fallible call returns a status: KST_OK (0) or a negative kst_status. When `err` is not
 *   NULL it also receives the code and a message naming the file, line, field or tensor at fault.
 *   The caller owns `err`; no later call overwrites it.
 * - Results written through out-pointers are valid only when the call returned KST_OK. Every
 *   result type has a free function, and every free function accepts NULL.
 * - Threads: an open kst_model may be used from any number of threads at once (each call keeps
 *   its scratch to itself); opening and closing it are not concurrent with other calls on it.
 *   Inside one call the work is spread over OpenMP threads (see kst_model_opts.num_threads).
 */
#ifndef KESTREL_H
#define KESTREL_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h" /* status codes and kst_error; spliced in by `make install` */

#ifdef __cplusplus
extern "C" {
#endif

#define KESTREL_VERSION_MAJOR 0
#define KESTREL_VERSION_MINOR 1
#define KESTREL_VERSION_PATCH 0
#define KESTREL_VERSION_STRING "0.1.0"

/* The library's version string (may differ from the header's when linked dynamically). */
const char *kst_version(void);
/* How this build computes: the BLAS kernels in use (e.g. "OpenBLAS SkylakeX kernels"), and the
 * GPU backend when built with CUDA=1. Valid until the process ends. */
const char *kst_build_info(void);

/* ------------------------------------------------------------------------------------------ */
/* Models */

typedef struct kst_model kst_model;

/* What a checkpoint computes. */
typedef enum kst_model_kind {
    KST_MODEL_AUTO = 0, /* detect from the folder (the default) */
    KST_MODEL_DENSE,    /* one vector per text (sentence-transformers or bare BERT: CLS) */
    KST_MODEL_COLBERT,  /* one vector per token, scored by MaxSim */
    KST_MODEL_CROSS     /* one or more logits per (query, passage) pair */
} kst_model_kind;

typedef struct kst_model_opts {
    kst_model_kind kind; /* default KST_MODEL_AUTO */
    int num_threads;     /* default 0: OpenMP's default (all cores) */
} kst_model_opts;

/* The defaults above. */
kst_model_opts kst_model_opts_default(void);

/* Opens a checkpoint folder (config.json + model.safetensors + vocab.txt or tokenizer.json, and
 * the sentence-transformers or colbert-ai files when present). opts may be NULL (defaults).
 * *out is set only on success; close it with kst_model_close. */
int kst_model_open(const char *dir, const kst_model_opts *opts, kst_model **out, kst_error *err);
/* NULL is a no-op. */
void kst_model_close(kst_model *m);

kst_model_kind kst_model_kind_of(const kst_model *m);
/* "dense", "colbert" or "cross". */
const char *kst_model_kind_name(kst_model_kind kind);
/* Vector size (dense and ColBERT); 0 for cross-encoders. */
size_t kst_model_dim(const kst_model *m);
/* Scores per pair kst_model_score writes: num_labels for a cross-encoder, 1 otherwise. */
size_t kst_model_num_scores(const kst_model *m);
/* Default maximum tokens: dense max_seq_length, ColBERT doc_maxlen, cross pair length. */
size_t kst_model_max_len(const kst_model *m);

typedef struct kst_encode_opts {
    int is_query;      /* default 0: encode as documents (ColBERT marker, prompts) */
    size_t max_len;    /* default 0: the model's own */
    size_t batch_size; /* default 32; texts are grouped by length within the call */
} kst_encode_opts;

kst_encode_opts kst_encode_opts_default(void);

/* Dense models: embeds n texts into out, caller-allocated with n * kst_model_dim floats, row i
 * for texts[i]. lens may be NULL (texts are then NUL-terminated); any bytes are accepted
 * (invalid UTF-8 is replaced as Python's errors="replace" does). opts may be NULL. */
int kst_model_embed(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err);

/* Token vectors of a ColBERT model: `vectors` holds total rows of dim floats; the rows of text i
 * are offsets[i] .. offsets[i+1]-1. */
typedef struct kst_token_vectors {
    size_t n, dim, total;
    float *vectors;   /* (total, dim) */
    int64_t *offsets; /* (n + 1) */
} kst_token_vectors;

/* ColBERT models: per-token vectors (queries: query_maxlen each, [MASK]-padded; documents: the
 * kept tokens). *out is the caller's; free with kst_token_vectors_free. */
int kst_model_embed_tokens(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                           const kst_encode_opts *opts, kst_token_vectors **out, kst_error *err);
void kst_token_vectors_free(kst_token_vectors *v);

/* Scores n (query, passage) pairs into out, caller-allocated with n * kst_model_num_scores
 * floats: dense = the model's similarity (cosine unless its config says dot), ColBERT = MaxSim,
 * cross = logits. opts->max_len applies to passages (ColBERT), pairs (cross) or both texts
 * (dense). qlens/plens may be NULL. */
int kst_model_score(kst_model *m, const char *const *queries, const size_t *qlens,
                    const char *const *passages, const size_t *plens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err);

/* Token ids exactly as the model would see them (special tokens, ColBERT markers and padding
 * included). passage may be NULL for a single text. *ids is allocated here (free with
 * kst_ids_array_free), *n its length. */
int kst_model_tokenize(kst_model *m, const char *text, size_t len, const char *passage,
                       size_t plen, const kst_encode_opts *opts, int32_t **ids,
                       int32_t **type_ids, size_t *n, kst_error *err);
void kst_ids_array_free(int32_t *ids);

#ifdef __cplusplus
}
#endif
#endif
