/* bert_gpu.h - the transformer's forward pass on the GPU (built with CUDA=1; without it every
 * call fails with KST_ERR_UNSUPPORTED and says how to get it).
 *
 * The same computation as kst_bert_forward (encoders/bert.h) in bf16 with float32 accumulation:
 * weights of the matrix products in bf16, embeddings, biases and LayerNorm parameters in
 * float32. By default the products are cuBLASLt calls whose epilogues add the bias, the residual
 * and GELU (tanh form, within 4.7e-4 of erf GELU; KESTREL_GPU_EXACT_GELU=1: erf in its own
 * kernel), with the algorithm timed once per kind of product and range of sizes
 * (KESTREL_GPU_GEMM_TUNE=0: cuBLASLt's first choice); then a fused embedding + LayerNorm kernel,
 * LayerNorm, and a flash-style attention kernel over the padded batch (per query tile an online
 * softmax over key tiles; no T x T matrix is stored; keys past a sequence's length are masked and
 * tiles wholly past it skipped). KESTREL_GPU_FUSED=0 selects the earlier path (cuBLAS, bias +
 * residual + LayerNorm and bias + activation kernels). Results match the float32 CPU pass within
 * bf16 rounding (cosine >= 0.999 for pooled embeddings). One kst_bert_gpu runs one forward at a
 * time (calls are serialised inside). */
#ifndef KST_ENCODERS_BERT_GPU_H
#define KST_ENCODERS_BERT_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "encoders/bert.h"

typedef struct kst_bert_gpu kst_bert_gpu;

/* Copies m's transformer weights to the GPU. Fails with KST_ERR_UNSUPPORTED when there is no
 * GPU backend or device, or when a size does not suit the kernels (hidden and feed-forward
 * widths multiples of 8, head size at most 128, hidden size at most 1024). */
int kst_bert_gpu_create(const kst_bert *m, kst_bert_gpu **out, kst_error *err);
void kst_bert_gpu_free(kst_bert_gpu *g);

/* As kst_bert_forward: ids, type_ids (B, T) (type_ids may be NULL), valid (B), host memory.
 * out (B, T, C) float32 host memory receives the last hidden states; when out is NULL they stay
 * on the GPU (kst_bert_gpu_hidden gives them) and the call returns once the work is queued
 * (kst_bert_gpu_sync waits). Errors as kst_bert_forward's. */
int kst_bert_gpu_forward(kst_bert_gpu *g, float *out, const int32_t *ids, const int32_t *type_ids,
                         const int *valid, size_t B, size_t T, kst_error *err);
int kst_bert_gpu_sync(kst_bert_gpu *g, kst_error *err);
/* A pipelined forward: as kst_bert_gpu_forward with out != NULL, but it returns once this batch
 * is queued (its inputs copied: the caller may refill them) and the forward queued before it has
 * finished, so that the caller can work on the previous batch's output while the GPU runs this
 * one. out should come from kst_bert_gpu_host_take (pinned; other memory makes the copy wait) and
 * must stay untouched until the next call (or kst_bert_gpu_sync) returns. */
int kst_bert_gpu_forward_async(kst_bert_gpu *g, float *out, const int32_t *ids, const int32_t *type_ids,
                               const int *valid, size_t B, size_t T, kst_error *err);
/* Lends pinned host memory of at least `bytes` (plain memory without the GPU backend) from a
 * small pool kept with g, so that repeated calls do not pin memory again; NULL and err filled on
 * failure. Give it back with kst_bert_gpu_host_give (NULL is a no-op) before kst_bert_gpu_free. */
void *kst_bert_gpu_host_take(kst_bert_gpu *g, size_t bytes, kst_error *err);
void kst_bert_gpu_host_give(kst_bert_gpu *g, void *p);
/* The device pointer of the last hidden states (B, T, C) float32 of the last forward. */
const float *kst_bert_gpu_hidden(const kst_bert_gpu *g);
/* Most GPU memory this encoder has held at once (weights + activations), in bytes. */
size_t kst_bert_gpu_peak_bytes(const kst_bert_gpu *g);
/* With KESTREL_GPU_PROFILE=1 set at create, the fused path records CUDA events between the steps
 * of every layer and waits for each forward: the mean milliseconds a layer of each step since the
 * last call go to ms (QKV product, attention, projection product, LayerNorm, FC1 product, FC2
 * product, LayerNorm) and their number is returned; 0 (ms untouched) when not profiling. For
 * benchmarks. */
#define KST_PROF_STEPS 7
int kst_bert_gpu_profile(kst_bert_gpu *g, double *ms);
/* 1 when g runs the LayerNorm-folded products (KESTREL_GPU_LNFOLD=1, a build with CUTLASS, an sm_90
 * GPU), 0 when it does not, -1 when this build has no CUTLASS. For tests and benchmarks. */
int kst_bert_gpu_lnfold(const kst_bert_gpu *g);
/* 1 when g's FC1 takes its bias as an input column (the fused path's default: its product then has
 * the GELU epilogue alone; KESTREL_GPU_FC1_KCOL=0 turns it off, and it is off where cuBLASLt has no
 * algorithm for it), 0 when not. For tests and benchmarks. */
int kst_bert_gpu_fc1_kcol(const kst_bert_gpu *g);

/* What the fused path's GELU epilogue (cuBLASLt GELU_BIAS) computes: y[i] = GELU(x[i] + 0) for
 * n bf16-exact inputs x (host), y float32 (host), through a bf16 product with float32 output.
 * For tests: it is checked against the erf and tanh forms. */
int kst_bert_gpu_gelu_probe(const float *x, float *y, size_t n, kst_error *err);

#endif
