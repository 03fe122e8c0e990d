/* cross.h - cross-encoder training (BertForSequenceClassification / DistilBERT with one logit):
 * labelled pairs (binary cross-entropy with logits), teacher scores (Margin-MSE or MSE on the
 * logits) or triples (cross-entropy over the positive's and the negative's logits).
 *
 * Data files (one example per line; blank lines skipped; a malformed line stops training with
 * KST_ERR_FORMAT naming the file, the line and what was expected):
 *   pairs    query<TAB>passage<TAB>label      label a number in [0, 1]
 *   triples  query<TAB>positive<TAB>negative
 *   teacher  any kst_teacher format (train/teacher.h), streamed with its shuffle buffer.
 * Pairs and triples files are read whole into memory (they are small next to teacher files) and
 * shuffled per epoch with xoshiro256** seeded from opts.seed + epoch. */
#ifndef KST_TRAIN_CROSS_H
#define KST_TRAIN_CROSS_H

#include <stddef.h>
#include <stdio.h>

#include "core/error.h"
#include "encoders/encoder.h"
#include "train/trainer.h"

typedef enum { KST_CROSS_PAIRS = 1, KST_CROSS_TEACHER, KST_CROSS_TRIPLES } kst_cross_data;

/* One in-memory example: a pair (b, label) or a triple (b positive, c negative). Texts are
 * borrowed. */
typedef struct kst_cross_example {
    const char *a, *b, *c;
    size_t alen, blen, clen;
    float label;
} kst_cross_example;

typedef struct kst_cross_opts {
    kst_train_opts train; /* model_dir, out_dir, teacher_path (the data file), schedule, ... */
    kst_cross_data data;
    int loss_mse;         /* teacher scores: MSE on each logit instead of Margin-MSE */
    size_t max_len;       /* tokens per (query, passage) pair; 0: the model's */
} kst_cross_opts;

kst_cross_opts kst_cross_opts_default(void);

/* Trains the cross-encoder at opts->train.model_dir on the data file and saves it to
 * opts->train.out_dir (transformers layout, float32 safetensors, tokenizer files copied) with
 * out_dir/train_log.jsonl. The model must have one output logit (num_labels 1). Errors name the
 * file and line of bad input; the checkpoint is written only when training finished. */
int kst_train_cross(const kst_cross_opts *opts, kst_train_result *res, kst_error *err);

/* Loads a pairs (triple = 0) or triples (triple = 1) file into *ex (n records; the texts point
 * into *buf). Free both with kst_free. Errors name the file and line. */
int kst_cross_examples_load(const char *path, int triple, kst_cross_example **ex, size_t *n,
                            char **buf, kst_error *err);

/* The training loop over an open cross-encoder and in-memory examples (pairs with labels:
 * BCE with logits; triples: cross-entropy), used by `train cross` and self-distillation.
 * Updates e's weights in place; nothing is saved. log may be NULL. */
int kst_cross_fit(kst_encoder *e, const kst_cross_opts *opts, const kst_cross_example *ex,
                  size_t n, FILE *log, kst_train_result *res, kst_error *err);

#endif
