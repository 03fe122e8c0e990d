/* ops_backward.h - the backward passes of ops.h's ops, and the training-only ops (dropout,
 * embeddings, pooling, L2 normalisation, MaxSim) with their forward/backward pairs.
 *
 * llm.c's argument order: outputs (gradients of the inputs) first, then the gradient of the
 * output, saved statistics, inputs and weights, sizes last. Every backward ADDS into its output
 * gradients (so a tensor used twice, or a batch split into parts, accumulates); zeroing is the
 * caller's. A gradient pointer may be NULL when that gradient is not wanted. None can fail. */
#ifndef KST_CORE_OPS_BACKWARD_H
#define KST_CORE_OPS_BACKWARD_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"

/* Of out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC):
 * dinp (N, C) += dout @ weight; dweight (OC, C) += dout^T @ inp; dbias (OC) += sum_n dout. */
void kst_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight, size_t N, size_t C, size_t OC);

/* Of kst_layernorm_forward, with the mean and rstd (N) it saved:
 * dinp (N, C), dweight (C), dbias (C) += ... dinp must not alias dout. */
void kst_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                            const float *inp, const float *weight, const float *mean,
                            const float *rstd, size_t N, size_t C);

/* dinp (N) += dout (N) * act'(inp (N)); inp is the activation's input (pre-GELU). */
void kst_act_backward(float *dinp, const float *dout, const float *inp, size_t N, kst_act act);

/* Of out = a + b: da (N) += dout, db (N) += dout (either may be NULL). */
void kst_residual_backward(float *da, float *db, const float *dout, size_t N);

/* Floats of scratch kst_attention_backward and kst_attention_values need: per thread two T x T
 * blocks. */
size_t kst_attention_backward_scratch_floats(size_t T);

/* out (B, T, C) = (att * drop) @ v per head, where att (B, NH, T, T) holds probabilities from
 * kst_attention_forward and drop (B, NH, T, T) the attention-dropout mask (0 or 1/(1-p)). This
 * recomputes the attended values when attention dropout is on. */
void kst_attention_values(float *out, float *scratch, const float *att, const float *drop,
                          const float *qkv, const int *valid, size_t B, size_t T, size_t C,
                          size_t NH);

/* Of kst_attention_forward (optionally followed by kst_attention_values with `drop`):
 * dqkv (B, T, 3C) += the gradient of q, k and v; dout (B, T, C); att (B, NH, T, T) the saved
 * probabilities; drop the attention-dropout mask or NULL; scratch of
 * kst_attention_backward_scratch_floats(T). Masked keys (past valid[b]) get no gradient. */
void kst_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                            const float *att, const float *drop, const int *valid, size_t B,
                            size_t T, size_t C, size_t NH);

/* Dropout. kst_dropout_mask fills mask (N) with 0 (probability p) or 1/(1-p), drawing from the
 * xorshift state *rng (advanced; seed with kst_rng_seed). p <= 0 gives all ones. */
uint64_t kst_rng_seed(uint64_t seed);
void kst_dropout_mask(float *mask, size_t N, float p, uint64_t *rng);
/* out (N) = inp * mask (out may alias inp); backward: dinp (N) += dout * mask. */
void kst_dropout_forward(float *out, const float *inp, const float *mask, size_t N);
void kst_dropout_backward(float *dinp, const float *dout, const float *mask, size_t N);

/* Embeddings: out (B, T, C) = wte[ids] + wpe[t] (+ wtt[type_ids]; wtt NULL for DistilBERT,
 * type_ids NULL means type 0). Ids are not checked here (kst_bert_forward checks them).
 * Backward scatter-adds dout into the rows used; dwtt may be NULL. */
void kst_embedding_forward(float *out, const int32_t *ids, const int32_t *type_ids,
                           const float *wte, const float *wpe, const float *wtt, size_t B,
                           size_t T, size_t C);
void kst_embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout,
                            const int32_t *ids, const int32_t *type_ids, size_t B, size_t T,
                            size_t C);

/* sentence-transformers pooling over the first valid[b] tokens (modes: the KST_POOL_* bits of
 * encoders/encoder.h, passed as 1 cls, 2 max, 4 mean, 8 mean_sqrt_len; concatenated in that
 * order). out (B, P) with P = C * bits set. valid[b] of 0 is treated as 1. */
size_t kst_pool_dim(unsigned modes, size_t C);
void kst_pool_forward(float *out, const float *inp, const int *valid, unsigned modes, size_t B,
                      size_t T, size_t C);
/* dinp (B, T, C) += the gradient; max pooling sends it to the first position holding the max. */
void kst_pool_backward(float *dinp, const float *dout, const float *inp, const int *valid,
                       unsigned modes, size_t B, size_t T, size_t C);

/* Row-wise L2 normalisation as torch.nn.functional.normalize (eps 1e-12): out (N, D) =
 * inp / max(||inp||, 1e-12); norm (N) saves ||inp||. out may alias inp. Backward needs out. */
void kst_l2norm_forward(float *out, float *norm, const float *inp, size_t N, size_t D);
void kst_l2norm_backward(float *dinp, const float *dout, const float *out, const float *norm,
                         size_t N, size_t D);

/* ColBERT MaxSim: score = sum_i max_{j: keep[j]} q_i . d_j over q (nq, D) and d (nd, D);
 * keep (nd) may be NULL (all kept). argmax (nq) saves the chosen j (-1 when none is kept, adding
 * 0); it may be NULL when no backward follows (inference). Backward: dq += dscore * d[argmax_i], dd[argmax_i] += dscore * q_i. */
float kst_maxsim_forward(int *argmax, const float *q, const float *d, const unsigned char *keep,
                         size_t nq, size_t nd, size_t D);
void kst_maxsim_backward(float *dq, float *dd, float dscore, const int *argmax, const float *q,
                         const float *d, size_t nq, size_t D);

#endif
