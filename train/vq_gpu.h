/* vq_gpu.h - Distill-VQ on the GPU (`kestrel train vq --device cuda`, kst_vq_opts.device): the
 * heavy parts of train/vq.c and train/vq_code.c with cuBLAS products and float32 kernels, driven
 * by the same training loop (kst_vq_train), so the semantics are the CPU trainer's: the same
 * queries, candidates, order, validation split, kept epoch and learning-rate backoff.
 *
 * On the GPU: the documents' IVF lists (once per epoch), each batch's students, listwise losses
 * and gradients (kst_vq_batch's math), (lazy) Adam on the flat parameter buffer, which stays on
 * the GPU for the epochs, the kept epoch's copy; after the epochs the query-weighted codes
 * (kst_vq_encode: nearest codewords then exact coordinate descent on e^T W e) and the codebook
 * refits under W (kst_vq_refit; the small ds x ds solves stay on the CPU, shared with it), also
 * in the write-back (kst_vq_write_index encodes every document). On the CPU: the exact top-k of
 * the training queries, each batch's candidate lists (host bookkeeping), the query-weighted
 * metric W, the statistics.
 *
 * Results agree with the CPU's within float rounding (sums in other orders; atomics where many
 * candidates share a centroid): tests/test_vq_gpu.c. Built with CUDA=1 (train/vq_gpu.cu); without
 * it train/vq_gpu_stub.c answers kst_gpu_check's error. */
#ifndef KST_TRAIN_VQ_GPU_H
#define KST_TRAIN_VQ_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "train/optim.h"
#include "train/vq.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kst_vq_gpu kst_vq_gpu;

/* Uploads the rotated documents y (n, d), m's parameters and temperatures; a batch may hold up to
 * max_cand candidates of at most max_batch queries. */
int kst_vq_gpu_create(const kst_vq_model *m, size_t n, const float *y, size_t max_batch,
                      size_t max_cand, kst_vq_gpu **out, kst_error *err);
void kst_vq_gpu_free(kst_vq_gpu *g);

/* m->tau to the GPU (after init_tau). */
int kst_vq_gpu_set_tau(kst_vq_gpu *g, const float *tau, kst_error *err);
/* The GPU's parameters into params (nparams). */
int kst_vq_gpu_get_params(kst_vq_gpu *g, float *params, kst_error *err);
/* The gradient buffer (nparams) as the batches left it (tests). */
int kst_vq_gpu_get_grad(kst_vq_gpu *g, float *grad, kst_error *err);
/* kst_vq_assign of every document with the GPU's centroids, kept there and copied to assign (n). */
int kst_vq_gpu_assign(kst_vq_gpu *g, int32_t *assign, kst_error *err);

/* kst_vq_batch on the GPU's documents, lists and parameters (same arguments); with backward the
 * gradient is ADDED into the GPU's gradient buffer (kst_vq_gpu_adam consumes it). */
int kst_vq_gpu_batch(kst_vq_gpu *g, size_t B, const float *q, const size_t *off,
                     const int64_t *cand, const float *teacher, double T, double w_ivf,
                     double w_pq, int backward, double *loss_ivf, double *loss_pq, kst_error *err);
/* One Adam step as kst_vq_train's (lazy rows on the centroids unless dense, dense Adam on the
 * codebooks; ac as kst_adamw_update's), then zeroes the gradient. */
int kst_vq_gpu_adam(kst_vq_gpu *g, int dense, long step, double lr_ivf, double lr_pq,
                    const kst_adamw_config *ac, kst_error *err);
/* Keeps a copy of the parameters; restore brings it back (and zeroes Adam's moments with
 * reset_moments). */
int kst_vq_gpu_keep(kst_vq_gpu *g, kst_error *err);
int kst_vq_gpu_restore(kst_vq_gpu *g, int reset_moments, kst_error *err);
/* Bytes this context holds on the GPU at most (documents, parameters, batch scratch). */
size_t kst_vq_gpu_bytes(const kst_vq_gpu *g);

/* kst_vq_encode and kst_vq_refit on the GPU (same arguments and results; kst_vq_encode /
 * kst_vq_refit call these when m->device is KST_DEV_CUDA). */
int kst_vq_gpu_encode(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                      uint8_t *codes, long *rounds, kst_error *err);
int kst_vq_gpu_refit(kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                     const uint8_t *codes, double *obj_before, double *obj_after, kst_error *err);

/* The most GPU memory the encoder and refit above held at once since the process started. */
size_t kst_vq_gpu_coder_peak_bytes(void);

#ifdef __cplusplus
}
#endif

#endif
