/* bert_gpu_train.h - the training forward and backward of the transformer and the dense
 * (bi-encoder) or ColBERT head on the GPU (built with CUDA=1; without it every call fails with
 * KST_ERR_UNSUPPORTED and says how to get it).
 *
 * The same computation as kst_bert_train_forward / kst_bert_train_backward and
 * kst_dense_head_forward / _backward and kst_colbert_head_forward / _backward
 * (encoders/bert_train.h), in llm.c's shape on the device:
 * float32 master weights in one flat buffer laid out as kst_bert.param_mem, a bf16 mirror of it
 * that the matrix products read (cuBLAS, bf16 inputs, float32 accumulation), one flat float32
 * gradient buffer of the same layout, and per batch ("side": the queries, the passages) an
 * activations struct of what the backward needs. Matrix-product inputs are kept in bf16,
 * LayerNorm inputs, the residual stream and all statistics in float32.
 *
 * Attention materialises the T x T scores per head (float32) and keeps the probabilities (bf16)
 * for the backward: a first version, not the flash-style kernel of the inference pass.
 * Dropout (the CPU trainer's four sites: after the embedding LayerNorm, on the attention
 * probabilities, after the attention output projection (BERT only) and after the feed-forward
 * output) is drawn from a counter-based hash of (seed, site, element), so the backward regenerates
 * the masks instead of storing them; the draws differ from the CPU's xorshift stream, the
 * distribution is the same.
 *
 * Gradients accumulate (+=) over backward calls; kst_bert_gpu_train_zero_grads zeroes them. The
 * head supports the pooling modes cls, mean and mean_sqrt_len (combined as sentence-transformers
 * concatenates them) and Normalize, and the ColBERT head (a model with cfg.proj_dim: every token's
 * last hidden state through the linear without bias, bf16 product with float32 accumulation, then
 * L2-normalised, as kst_colbert_head_forward); max pooling and a sentence-transformers Dense
 * layer are refused at creation (train those on the CPU). Calls queue work on one stream
 * and return; the get / set functions wait for it. One object serves one thread. */
#ifndef KST_ENCODERS_BERT_GPU_TRAIN_H
#define KST_ENCODERS_BERT_GPU_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert.h"

#define KST_GPU_TRAIN_SIDES 2

typedef struct kst_bert_gpu_train kst_bert_gpu_train;

/* Copies m's weights to the GPU and allocates the gradients. pool_modes: KST_POOL_* bits
 * (encoders/encoder.h); normalize: L2-normalise the pooled vector (both ignored for a ColBERT
 * model, m->cfg.proj_dim > 0, whose head is the ColBERT one). Fails with
 * KST_ERR_UNSUPPORTED (saying what to do) without a GPU backend or device, for shapes the kernels
 * do not take (hidden size C divisible by the heads, head size and feed-forward width multiples of
 * 8, at most 4 token types) or for a head this
 * file does not train; KST_ERR_NOMEM when the GPU is full. */
int kst_bert_gpu_train_create(const kst_bert *m, unsigned pool_modes, int normalize,
                              kst_bert_gpu_train **out, kst_error *err);
void kst_bert_gpu_train_free(kst_bert_gpu_train *g); /* NULL is a no-op */

/* Training forward of one side (0 .. KST_GPU_TRAIN_SIDES-1) over a padded batch: ids, type_ids
 * (B, T) host memory (type_ids may be NULL: type 0), valid (B) tokens attended to (0 counts as
 * 1). dropout in [0, 1); seed picks the dropout masks. The head's vectors (B, dim) stay on the
 * device (kst_bert_gpu_train_vectors). Fails on bad ids (naming the position), on memory, or on a
 * CUDA error. */
int kst_bert_gpu_train_forward(kst_bert_gpu_train *g, int side, const int32_t *ids,
                               const int32_t *type_ids, const int *valid, size_t B, size_t T,
                               float dropout, uint64_t seed, kst_error *err);
/* The same, with rows (B, host; NULL: valid) the number of leading tokens of each sequence whose
 * head outputs can get a gradient: ColBERT queries pass their length with the [MASK] padding,
 * which is encoded (its rows attend) but not attended to (valid stops before it). The backward
 * skips only the attention rows past it. */
int kst_bert_gpu_train_forward_rows(kst_bert_gpu_train *g, int side, const int32_t *ids,
                                    const int32_t *type_ids, const int *valid, const int *rows,
                                    size_t B, size_t T, float dropout, uint64_t seed, kst_error *err);
/* Device pointer to the side's head output of its latest forward, float32: (B, dim), or for the
 * ColBERT head (B * T, dim), one normalised vector per position. */
const float *kst_bert_gpu_train_vectors(const kst_bert_gpu_train *g, int side);
size_t kst_bert_gpu_train_dim(const kst_bert_gpu_train *g);

/* Backward of the side's latest forward from dvec (B, dim; ColBERT (B * T, dim)), a device pointer: adds d loss /
 * d params into the gradient buffer. Fails only on a CUDA error. */
int kst_bert_gpu_train_backward(kst_bert_gpu_train *g, int side, const float *dvec, kst_error *err);

int kst_bert_gpu_train_zero_grads(kst_bert_gpu_train *g, kst_error *err);

/* The device buffers (num_params floats each; the bf16 mirror num_params __nv_bfloat16), and the
 * cudaStream_t the work runs on, for the optimizer (train/trainer_gpu.h). */
size_t kst_bert_gpu_train_num_params(const kst_bert_gpu_train *g);
float *kst_bert_gpu_train_params(kst_bert_gpu_train *g);
float *kst_bert_gpu_train_grads(kst_bert_gpu_train *g);
void *kst_bert_gpu_train_params_bf16(kst_bert_gpu_train *g);
void *kst_bert_gpu_train_stream(kst_bert_gpu_train *g);

/* Host copies (waiting for the queued work): params or grads (num_params floats). set_params
 * also refreshes the bf16 mirror. */
int kst_bert_gpu_train_get_params(kst_bert_gpu_train *g, float *params, kst_error *err);
int kst_bert_gpu_train_set_params(kst_bert_gpu_train *g, const float *params, kst_error *err);
int kst_bert_gpu_train_get_grads(kst_bert_gpu_train *g, float *grads, kst_error *err);

/* Bytes this object holds on the GPU now (weights, gradients, activations, scratch), and the
 * most it has held at once (cuBLAS's workspace and the CUDA context not counted). */
size_t kst_bert_gpu_train_bytes(const kst_bert_gpu_train *g);
size_t kst_bert_gpu_train_peak_bytes(const kst_bert_gpu_train *g);

#endif
