/* optim.h - optimizers over one flat float buffer, learning-rate schedules, gradient clipping.
 *
 * llm.c's shape: parameters, gradients and the AdamW moments m, v are each one flat float array of
 * the same length and layout, so an update is one loop. Which elements get weight decay is a
 * per-element mask (1 = decay), built from a per-tensor table with kst_decay_mask_fill; the
 * caller decides (no decay on biases and LayerNorm weights, as transformers/sentence-transformers
 * training does). Every function here works in place, cannot fail, and matches PyTorch's
 * single-tensor (for-loop) CPU implementation step for step (tests/test_loss_optim.c). */
#ifndef KST_TRAIN_OPTIM_H
#define KST_TRAIN_OPTIM_H

#include <stddef.h>

/* AdamW hyper-parameters; kst_adamw_defaults gives torch.optim.AdamW's: lr 1e-3,
 * betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2. Doubles, as torch's are Python floats: the
 * derived scalars (1 - beta2, lr / (1 - beta1^t), ...) are formed in double and only then
 * rounded to float; forming 1 - beta2 from a float 0.999 would be off by 1.3e-5 relative. */
typedef struct kst_adamw_config {
    double lr;           /* base learning rate; a schedule multiplies it (kst_lr_at) */
    double beta1, beta2;
    double eps;          /* added to sqrt(v_hat), outside the root, as torch */
    double weight_decay; /* decoupled: p *= 1 - lr * weight_decay, before the Adam step */
} kst_adamw_config;

kst_adamw_config kst_adamw_defaults(void);

/* Fills mask (sum of sizes) with 1 for the elements of tensors whose decay[i] is non-zero and 0
 * for the rest: tensor i spans sizes[i] elements, in order. */
void kst_decay_mask_fill(unsigned char *mask, const size_t *sizes, const int *decay,
                         size_t ntensors);

/* One AdamW step (torch.optim.AdamW, amsgrad off, maximize off), for each element i < n:
 *   if decay[i]:  p *= 1 - lr * wd
 *   m = lerp(m, g, 1 - beta1);   v = v * beta2 + (1 - beta2) * g * g
 *   p -= (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
 * params, grads, m, v (n); m and v start at zero; decay (n) may be NULL (all decay). `step` is
 * the 1-based count of updates including this one (torch's state['step'] after its increment).
 * `lr` is the learning rate for this step (the scheduled one), cfg->lr is ignored here. */
void kst_adamw_update(float *params, float *m, float *v, const float *grads,
                      const unsigned char *decay, size_t n, long step, double lr,
                      const kst_adamw_config *cfg);

/* Plain SGD (torch.optim.SGD without momentum, dampening, weight decay or nesterov):
 * p -= lr * g. */
void kst_sgd_update(float *params, const float *grads, size_t n, double lr);

/* Learning-rate schedules, as the multiplier of the base rate at optimizer step `step`
 * (0-based: the first optimizer.step() uses step 0, as torch's LambdaLR before any
 * scheduler.step()). Both warm up linearly from 0 over `warmup` steps: step / max(1, warmup).
 *   KST_LR_CONSTANT           1 after the warm-up (transformers' constant_schedule_with_warmup)
 *   KST_LR_LINEAR             max(0, (total - step) / max(1, total - warmup))
 *                             (get_linear_schedule_with_warmup)
 *   KST_LR_COSINE             max(0, 0.5 * (1 + cos(pi * progress))), progress =
 *                             (step - warmup) / max(1, total - warmup)
 *                             (get_cosine_schedule_with_warmup, num_cycles 0.5)
 * Computed in double as Python does (LambdaLR: base_lr * multiplier, a Python float). */
typedef enum { KST_LR_CONSTANT, KST_LR_LINEAR, KST_LR_COSINE } kst_lr_kind;

double kst_lr_multiplier(kst_lr_kind kind, long step, long warmup, long total);
/* base_lr * kst_lr_multiplier(...). */
double kst_lr_at(kst_lr_kind kind, double base_lr, long step, long warmup, long total);

/* Global-norm clipping, torch.nn.utils.clip_grad_norm_(params, max_norm) with norm_type 2:
 *   total = ||grads||_2 over all n elements;  coef = min(1, max_norm / (total + 1e-6));
 *   grads *= coef (always, as torch does; coef is 1 when the norm is under max_norm).
 * Returns total (before clipping). The norm is summed in double and rounded to float, the
 * coefficient computed in float as torch's float32 tensors do. A non-finite total leaves grads
 * scaled by a NaN coefficient, as torch (error_if_nonfinite=False); check the return value. */
float kst_clip_grad_norm(float *grads, size_t n, float max_norm);

/* Gradient accumulation: g *= scale (use 1 / accum_steps on the summed gradients, or pass
 * dloss = 1 / accum_steps to the loss backward instead). */
void kst_grad_scale(float *grads, size_t n, float scale);

/* Zeroes a gradient (or moment) buffer of n floats. */
void kst_grad_zero(float *grads, size_t n);

#endif
