/* loss.h - distillation and ranking losses over student scores, each a forward/backward pair.
 *
 * The losses see scores only; the model's backward pass (someone else's) takes d loss / d scores
 * from here. Layouts, llm.c style (sizes in elements, row-major):
 *   n-way scores (B, n): row b holds query b's passages, column 0 the positive, 1..n-1 negatives.
 *   in-batch matrix (B, B*n): entry [b, j*n + k] scores query b against passage k of record j, so
 *   query b's own positive sits at column b*n.
 *
 * Forward functions return the loss (sums run in double, the result is rounded to float once).
 * Backward functions ADD dloss * (d loss / d student scores) into ds (llm.c: gradients accumulate,
 * zeroing is the caller's separate step), so several losses over the same scores (KL plus the
 * in-batch term) sum into one buffer; pass dloss = 1 for the plain gradient, 1/accum_steps when
 * accumulating. Inputs are never modified. None of these can fail: sizes must be >= 1 (n >= 2
 * where a positive and negatives are implied); the caller checks shapes.
 *
 * Every loss is tested against PyTorch autograd (tests/test_loss_optim.c, fixtures from
 * tests/fixtures/fx_train.py). */
#ifndef KST_TRAIN_LOSS_H
#define KST_TRAIN_LOSS_H

#include <stddef.h>

/* Margin-MSE (Hofstaetter et al. 2020) with signed margins and n-1 negatives per query:
 *   L = mean over b < B, 1 <= i < n of ((s[b,0] - s[b,i]) - (t[b,0] - t[b,i]))^2
 * = torch.nn.MSELoss()(s_pos - s_neg, t_pos - t_neg). s, t (B, n); n >= 2. */
float kst_margin_mse_forward(const float *s, const float *t, size_t B, size_t n);
void kst_margin_mse_backward(float *ds, const float *s, const float *t, size_t B, size_t n,
                             float dloss);

/* Listwise KL as ColBERTv2 (colbert/training/training.py):
 *   lt = log_softmax(teacher_scale * t, dim=-1), ls = log_softmax(s, dim=-1),
 *   L  = KLDivLoss(reduction='batchmean', log_target=True)(ls, lt)
 *      = (1/B) sum_b sum_j exp(lt[b,j]) * (lt[b,j] - ls[b,j]).
 * teacher_scale is ColBERT's distillation_alpha (default 1.0: an inverse teacher temperature);
 * the student scores get no temperature, as in ColBERT. s, t (B, n); n >= 1.
 * Gradient: dL/ds[b,j] = (softmax(s)[b,j] - softmax(teacher_scale*t)[b,j]) / B. */
float kst_kl_forward(const float *s, const float *t, size_t B, size_t n, float teacher_scale);
void kst_kl_backward(float *ds, const float *s, const float *t, size_t B, size_t n,
                     float teacher_scale, float dloss);

/* In-batch negatives cross-entropy over the (B, B*n) matrix S (layout above), times weight:
 *   L = weight * mean_b CrossEntropy(S[b, :], label b*n).
 * exclude_own_negatives = 1 drops columns b*n+1 .. b*n+n-1 of row b from its softmax, exactly as
 * ColBERT's compute_ib_loss (colbert/modeling/colbert.py) does ("all_except_self_negatives");
 * 0 keeps the whole row (every passage in the batch but the positive is a negative). Dropped
 * entries get a zero gradient. */
float kst_inbatch_ce_forward(const float *S, size_t B, size_t n, int exclude_own_negatives,
                             float weight);
void kst_inbatch_ce_backward(float *dS, const float *S, size_t B, size_t n,
                             int exclude_own_negatives, float weight, float dloss);

/* Mean squared error over N scores: L = mean (s - t)^2 (torch.nn.MSELoss()); for cross-encoder
 * score distillation. */
float kst_mse_forward(const float *s, const float *t, size_t N);
void kst_mse_backward(float *ds, const float *s, const float *t, size_t N, float dloss);

/* Binary cross-entropy with logits over N scores and targets y in [0, 1], mean reduction
 * (torch.nn.BCEWithLogitsLoss()): L = mean max(x,0) - x*y + log1p(exp(-|x|)). */
float kst_bce_logits_forward(const float *x, const float *y, size_t N);
void kst_bce_logits_backward(float *dx, const float *x, const float *y, size_t N, float dloss);

#endif
