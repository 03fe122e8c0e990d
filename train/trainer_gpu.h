/* trainer_gpu.h - the Margin-MSE training step of a dense (bi-encoder) or ColBERT student on the
 * GPU: the transformer's training forward and backward (encoders/bert_gpu_train.h) for the
 * queries and the passages, the scores (dot products of the head's vectors, or ColBERT MaxSim
 * over the token vectors: train/scores_gpu.h), Margin-MSE and its gradient (plus the in-batch
 * negatives cross-entropy when asked), global-norm clipping and AdamW (or SGD) as one kernel over
 * the flat parameter buffer, which also refreshes the bf16 copy of the weights the next forward
 * reads.
 *
 * The CPU twin is the loop of train/trainer.c with train/loss.c and train/optim.c; the element-
 * wise AdamW arithmetic follows kst_adamw_update's (torch's) order. Built with CUDA=1; without it
 * kst_gpu_trainer_create fails with KST_ERR_UNSUPPORTED saying how to get it. */
#ifndef KST_TRAIN_TRAINER_GPU_H
#define KST_TRAIN_TRAINER_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert.h"
#include "train/optim.h"

typedef struct kst_gpu_trainer kst_gpu_trainer;

/* One padded batch in host memory: ids, types (rows, T) (types may be NULL), valid (rows)
 * tokens attended to. ColBERT students also give len (rows; NULL: valid) the tokens of each
 * sequence, [MASK] query padding included (the query tokens entering MaxSim), and for the
 * passages keep (rows, T) 1 for the tokens entering MaxSim (within len, not padding, not
 * punctuation: train/trainer.c's doc_keep). */
typedef struct kst_gpu_batch {
    const int32_t *ids, *types;
    const int *valid;
    size_t rows, T;
    const int *len;
    const unsigned char *keep;
} kst_gpu_batch;

/* Copies m's weights to the GPU with zeroed AdamW moments. pool_modes / normalize: the student's
 * head (KST_POOL_* bits, Normalize; ignored for a ColBERT student, m->cfg.proj_dim > 0); decay (num_params, host) the weight-decay mask of
 * kst_decay_mask_fill (NULL: every element decays). Errors: as kst_bert_gpu_train_create (no
 * GPU backend or device, an unsupported head or shape: each says to use --device cpu). */
int kst_gpu_trainer_create(const kst_bert *m, unsigned pool_modes, int normalize,
                           const unsigned char *decay, kst_gpu_trainer **out, kst_error *err);
void kst_gpu_trainer_free(kst_gpu_trainer *t); /* NULL is a no-op */

/* Zeroes the gradients, runs the forward of q (B queries) and p (B * n passages: row b * n + k
 * is passage k of query b, k = 0 the positive), the Margin-MSE loss against teacher (B, n host
 * floats) and the backward of both. seed_q / seed_p pick the dropout masks. Queued: the loss
 * comes back from kst_gpu_trainer_update (or _grads). Fails on bad ids, memory or CUDA errors. */
int kst_gpu_trainer_forward_backward(kst_gpu_trainer *t, const kst_gpu_batch *q,
                                     const kst_gpu_batch *p, const float *teacher, size_t n,
                                     float dropout, uint64_t seed_q, uint64_t seed_p,
                                     kst_error *err);

/* The weight of the in-batch negatives cross-entropy added to Margin-MSE (0, the default: off):
 * each query against every passage of the batch, its own positive the label
 * (kst_inbatch_ce_forward with exclude_own_negatives = 0), as the CPU trainer's
 * --in-batch-weight; batches of one query skip it. */
void kst_gpu_trainer_set_in_batch(kst_gpu_trainer *t, float weight);

/* Clips the gradients to global norm grad_clip (0: off) and applies one AdamW step (sgd: plain
 * SGD) at learning rate lr; step is the 1-based update count. Waits for the GPU, then gives the
 * step's loss and the gradient norm before clipping (0 when grad_clip is 0, as the CPU trainer
 * logs). */
int kst_gpu_trainer_update(kst_gpu_trainer *t, int sgd, double lr, long step,
                           const kst_adamw_config *ac, double grad_clip, float *loss,
                           float *gnorm, kst_error *err);

/* kst_gpu_trainer_update in two halves, so that the host can prepare the next batch while the
 * GPU runs this step: _enqueue queues the update (and the loss and norm's copies back);
 * _wait waits for the GPU and gives them. forward_backward stages its host inputs in pinned
 * memory: the caller's buffers may be refilled as soon as it returns. */
int kst_gpu_trainer_update_enqueue(kst_gpu_trainer *t, int sgd, double lr, long step,
                                   const kst_adamw_config *ac, double grad_clip, kst_error *err);
int kst_gpu_trainer_wait(kst_gpu_trainer *t, float *loss, float *gnorm, kst_error *err);

/* The loss of the latest forward_backward and the gradients (num_params floats, host), waiting
 * for the GPU. For tests. */
int kst_gpu_trainer_grads(kst_gpu_trainer *t, float *grads, float *loss, kst_error *err);

/* ColBERT students, for tests: MaxSim's choices in the latest forward_backward, (B, W, Tq)
 * ints into argmax (cap of them): entry (b, c, i) is the passage token that query token i of
 * query b matched in score column c (W = n, or B n with the in-batch term; -1: none). *W gets W.
 * Waits for the GPU. KST_ERR_MISUSE for a dense student or a too small cap. */
int kst_gpu_trainer_maxsim_choices(kst_gpu_trainer *t, int *argmax, size_t cap, size_t *W, kst_error *err);

/* Host copies of the weights and AdamW moments (m, v may be NULL), and back (resuming). */
int kst_gpu_trainer_get_state(kst_gpu_trainer *t, float *params, float *m, float *v, kst_error *err);
int kst_gpu_trainer_set_state(kst_gpu_trainer *t, const float *params, const float *m,
                              const float *v, kst_error *err);

/* The most GPU memory the trainer has held at once, in bytes (its own buffers). */
size_t kst_gpu_trainer_peak_bytes(const kst_gpu_trainer *t);

#endif
