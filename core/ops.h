/* ops.h - the CPU tensor ops every layer shares (OpenBLAS sgemm + OpenMP), llm.c argument order:
 * outputs first, then saved statistics, inputs, weights, sizes. Shapes in comments. */
#ifndef KST_CORE_OPS_H
#define KST_CORE_OPS_H

#include <stddef.h>

typedef enum { KST_ACT_GELU, KST_ACT_GELU_TANH, KST_ACT_RELU, KST_ACT_TANH, KST_ACT_IDENTITY } kst_act;

/* out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC). bias may be NULL. out must not alias
 * inp. */
void kst_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                        size_t N, size_t C, size_t OC);

/* Row-wise LayerNorm of inp (N, C) into out (may alias inp); mean and rstd (N) are written when
 * not NULL (the backward pass needs them). */
void kst_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                           const float *weight, const float *bias, size_t N, size_t C, float eps);

/* out (N) = act(inp (N)); out may alias inp. GELU is the erf form, GELU_TANH the tanh
 * approximation (gelu_new, gelu_pytorch_tanh). */
void kst_act_forward(float *out, const float *inp, size_t N, kst_act act);

/* out (N) = a (N) + b (N); out may alias either. */
void kst_residual_forward(float *out, const float *a, const float *b, size_t N);

/* Floats of per-thread scratch kst_attention_forward needs when it does not keep `att`. */
size_t kst_attention_scratch_floats(size_t T);

/* Bidirectional multi-head attention over a padded batch.
 * qkv (B, T, 3C): per token the query, key and value vectors, each C = NH * hs wide.
 * valid (B): how many leading positions of each sequence may be attended to (keys past it are
 *   masked out, as a padding attention mask does); every query row 0..T-1 is computed.
 * out (B, T, C): the attended values, heads side by side.
 * att (B, NH, T, T): the softmax probabilities, written when not NULL (for the backward pass);
 *   masked entries are 0. When NULL, `scratch` (kst_attention_scratch_floats(T)) is used.
 * Cannot fail. */
void kst_attention_forward(float *out, float *att, float *scratch, const float *qkv,
                           const int *valid, size_t B, size_t T, size_t C, size_t NH);

/* Sets how many threads the ops use (0: OpenMP's default). */
void kst_set_num_threads(int n);

#endif
