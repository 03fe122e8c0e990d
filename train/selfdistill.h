/* selfdistill.h - bi-encoder <-> cross-encoder self- and mutual distillation without labels
 * (Trans-Encoder, Liu et al. 2022): each cycle
 *   1. the bi-encoder(s) label every pair: the cosine similarity of the two texts' vectors,
 *      clipped to [0, 1] (mean over the bi-encoders when there are several);
 *   2. each cross-encoder trains on those labels with binary cross-entropy on its logit, every
 *      pair in both orders (text1, text2) and (text2, text1);
 *   3. the cross-encoder(s) re-label the pairs: sigmoid(logit), averaged over both orders (and
 *      over the cross-encoders);
 *   4. each bi-encoder trains on the new labels: MSE between its cosine and the label.
 * With an evaluation callback (a dev set), the bi-encoders are scored before the first cycle and
 * after each one, and the cycle with the best mean dev score is the one saved; without, the last.
 *
 * Pairs file: one pair per line, text1<TAB>text2 (further columns ignored), or Trans-Encoder's
 * text1||text2 when the line has no tab; blank lines skipped; anything else is KST_ERR_FORMAT
 * naming the line. */
#ifndef KST_TRAIN_SELFDISTILL_H
#define KST_TRAIN_SELFDISTILL_H

#include <stddef.h>

#include "core/error.h"
#include "encoders/encoder.h"
#include "train/trainer.h"

/* Scores a bi-encoder on a dev set (higher is better), into *score. */
typedef int (*kst_selfdistill_eval_fn)(void *ctx, kst_encoder *bi, double *score, kst_error *err);

typedef struct kst_selfdistill_opts {
    const char *const *bi_dirs;    /* (n_bi) dense (sentence-transformers) folders */
    size_t n_bi;
    const char *const *cross_dirs; /* (n_cross) cross-encoder folders with one logit */
    size_t n_cross;
    const char *pairs_path, *out_dir;
    long cycles;                   /* 1 */
    kst_train_opts train;          /* per stage: batch_size, epochs or steps, lr, optimizer, ... */
    double bi_lr, cross_lr;        /* 0: train.lr */
    size_t max_len;                /* cross: tokens per pair; bi: per text (0: the models') */
    kst_selfdistill_eval_fn eval;  /* may be NULL */
    void *eval_ctx;
    const char *eval_name;         /* for messages and the log ("nDCG@10") */
} kst_selfdistill_opts;

kst_selfdistill_opts kst_selfdistill_opts_default(void);

typedef struct kst_selfdistill_result {
    long best_cycle;   /* the saved cycle (1-based) */
    double dev_before; /* mean dev score before the first cycle (NAN without a dev set) */
    double dev_best;
} kst_selfdistill_result;

/* Runs the loop and saves the models of the chosen cycle under out_dir: bi/ and cross/ (bi-1/,
 * bi-2/, ... and cross-1/, ... when several), each in its source's layout, plus
 * out_dir/self_distill_log.jsonl (one line per stage: cycle, stage, loss, mean label, dev score).
 * A progress line per stage goes to stderr. Errors name the file and line of bad input. */
int kst_self_distill(const kst_selfdistill_opts *opts, kst_selfdistill_result *res, kst_error *err);

/* Reads a pairs file (format above): *a, *b (n) point into *buf; free all three with kst_free. */
int kst_selfdistill_pairs_load(const char *path, const char ***a, size_t **alen, const char ***b,
                               size_t **blen, size_t *n, char **buf, kst_error *err);

#endif
