/* trainer.h - the distillation training loop: teacher records -> batches -> training forward ->
 * loss -> backward -> optimizer -> checkpoint, for dense (bi-encoder) and ColBERT students. */
#ifndef KST_TRAIN_TRAINER_H
#define KST_TRAIN_TRAINER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "train/teacher.h"

typedef struct kst_train_opts {
    const char *model_dir, *out_dir, *teacher_path;
    const char *queries_path, *collection_path; /* Hofstaetter and n-way formats */
    kst_teacher_format format;  /* 0: from the file's first line (TSV with ids, text, JSON) */
    size_t batch_size;          /* 32 */
    long steps;                 /* optimizer steps; 0: epochs decide */
    long epochs;                /* 1 when steps is 0 */
    double lr;                  /* 2e-5 */
    int sgd;                    /* 0: AdamW, 1: plain SGD */
    double weight_decay;        /* 0.01 (AdamW; none on biases and LayerNorm) */
    long warmup;                /* linear warm-up steps (0) */
    int cosine;                 /* 0: linear decay to 0 after warm-up, 1: cosine */
    double grad_clip;           /* global-norm clip; 0: off */
    double dropout;             /* < 0: the checkpoint's (hidden_dropout_prob); else this */
    uint64_t seed;              /* 42 */
    int no_shuffle;
    size_t shuffle_buffer;      /* 10000 */
    size_t query_max_len, doc_max_len; /* 0: the model's */
    double in_batch_weight;     /* in-batch negatives cross-entropy weight (0: off) */
    int quiet;                  /* no progress bar */
} kst_train_opts;

kst_train_opts kst_train_opts_default(void);

typedef struct kst_train_result {
    long steps;
    double first_loss, last_loss; /* mean over the first / last 10 steps */
    double seconds, triples_per_s;
} kst_train_result;

/* Trains the student at opts->model_dir on the teacher file with Margin-MSE (plus the in-batch
 * term when asked) and saves it to opts->out_dir in the same layout, with out_dir/train_log.jsonl
 * (one line per step: step, loss, lr, grad_norm, triples_per_s). Errors name the file and line of
 * bad input; nothing is written to out_dir unless training finished. */
int kst_train_margin_mse(const kst_train_opts *opts, kst_train_result *res, kst_error *err);

#endif
