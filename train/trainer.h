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
    int device;                 /* KST_DEV_CPU (0) or KST_DEV_CUDA (core/gpu.h): the step on the GPU
                                 * (train/trainer_gpu.h; dense and ColBERT students,
                                 * Margin-MSE and the in-batch term) */
    /* resuming (see kst_train_margin_mse) */
    long save_every;            /* write OUT_DIR/train_state.bin every N steps and at the end (0: never) */
    const char *resume_dir;     /* continue from RESUME_DIR/train_state.bin (NULL: fresh start) */
    long stop_after;            /* stop after this step (of the full schedule), saving the state (0: run to the end) */
    /* evaluation on a small held-out corpus (train/eval.h); off unless both files are given */
    const char *eval_queries, *eval_qrels;
    const char *eval_collection; /* NULL: collection_path */
    long eval_every;             /* steps between evaluations (0: only before and after training) */
} kst_train_opts;

kst_train_opts kst_train_opts_default(void);

typedef struct kst_train_result {
    long steps;
    double first_loss, last_loss; /* mean over the first / last 10 steps */
    double seconds, triples_per_s;
    int evaluated;                 /* 1 when eval_* was given */
    double eval_first_ndcg10, eval_first_mrr10; /* the first evaluation of this run */
    double eval_last_ndcg10, eval_last_mrr10;   /* after the last step */
} kst_train_result;

/* Trains the student at opts->model_dir on the teacher file with Margin-MSE (plus the in-batch
 * term when asked) and saves it to opts->out_dir in the same layout, with out_dir/train_log.jsonl
 * (one line per step: step, loss, lr, grad_norm, triples_per_s).
 *
 * Bad input: the teacher file is read through once before training (counting its records and
 * checking every line), so a malformed line, an unknown id, a NaN score or an empty file fails
 * with the file and line named before anything is written: out_dir is not even created.
 *
 * Resuming: with save_every > 0 the training state (weights, AdamW moments, step, epoch, teacher
 * reader position with its shuffle buffer and RNG, dropout RNG, loss averages, log length and the
 * options that shape the run) is written to OUT_DIR/train_state.bin every save_every steps and
 * after the last one, atomically (state.h): a crash mid-save leaves the previous state. A run with
 * resume_dir = D reads D/train_state.bin and continues from its step; its weights are those an
 * uninterrupted run would have reached, bit for bit (same machine and thread count), and
 * out_dir/train_log.jsonl holds the saved run's lines up to that step followed by the new ones.
 * The options must equal the saved run's (KST_ERR_INVALID names the first that differs).
 * A fresh run refuses an out_dir that already holds a state (pass it as resume_dir, or choose
 * another out_dir). stop_after = k stops after step k of the full schedule, saving the state and
 * the checkpoint as they are then.
 *
 * Evaluation: with eval_queries and eval_qrels, the student is evaluated on eval_collection (or
 * collection_path) by exhaustive search (train/eval.h: nDCG@10, MRR@10) before the first step
 * (unless resumed past it), every eval_every steps and after the last step; each evaluation
 * adds a line {"step": k, "eval_ndcg@10": x, "eval_mrr@10": y, "eval_queries": n,
 * "eval_docs": m} to train_log.jsonl and is printed on stderr unless quiet. The eval files are
 * read before anything is written, so their errors leave out_dir alone too. */
int kst_train_margin_mse(const kst_train_opts *opts, kst_train_result *res, kst_error *err);

#endif
