/* optim.c - AdamW and SGD over flat buffers, transformers' learning-rate schedules and torch's
 * global-norm gradient clipping. The element-wise float arithmetic follows torch's CPU kernels
 * in order (lerp, addcmul, addcdiv), so trajectories agree to float rounding. */
#include "train/optim.h"

#include <math.h>
#include <string.h>

kst_adamw_config kst_adamw_defaults(void) {
    kst_adamw_config c = {1e-3, 0.9, 0.999, 1e-8, 1e-2};
    return c;
}

void kst_decay_mask_fill(unsigned char *mask, const size_t *sizes, const int *decay,
                         size_t ntensors) {
    size_t at = 0;
    for (size_t i = 0; i < ntensors; i++) {
        memset(mask + at, decay[i] ? 1 : 0, sizes[i]);
        at += sizes[i];
    }
}

void kst_adamw_update(float *params, float *m, float *v, const float *grads,
                      const unsigned char *decay, size_t n, long step, double lr,
                      const kst_adamw_config *cfg) {
    /* torch computes these Python floats in double, then its kernels take them as float. */
    double b1 = cfg->beta1, b2 = cfg->beta2;
    float shrink = (float)(1.0 - lr * cfg->weight_decay);
    float w1 = (float)(1.0 - b1);          /* lerp weight */
    float beta2 = (float)b2, w2 = (float)(1.0 - b2);
    double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
    float step_size = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    float eps = (float)cfg->eps;
    for (size_t i = 0; i < n; i++) {
        float g = grads[i];
        float p = params[i];
        if (!decay || decay[i]) p = p * shrink;
        /* torch's lerp: weight < 0.5 ? self + w * (end - self) : end - (end - self) * (1 - w) */
        float mi = w1 < 0.5f ? m[i] + w1 * (g - m[i]) : g - (g - m[i]) * (1.0f - w1);
        float vi = v[i] * beta2 + w2 * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p = p + (-step_size) * (mi / denom);
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
    }
}

void kst_sgd_update(float *params, const float *grads, size_t n, double lr) {
    float a = (float)-lr;
    for (size_t i = 0; i < n; i++) params[i] = params[i] + a * grads[i];
}

double kst_lr_multiplier(kst_lr_kind kind, long step, long warmup, long total) {
    if (step < warmup) return (double)step / (double)(warmup > 1 ? warmup : 1);
    long span = total - warmup > 1 ? total - warmup : 1;
    switch (kind) {
    case KST_LR_CONSTANT:
        return 1.0;
    case KST_LR_LINEAR:
        return fmax(0.0, (double)(total - step) / (double)span);
    case KST_LR_COSINE: {
        double progress = (double)(step - warmup) / (double)span;
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress)));
    }
    }
    return 1.0;
}

double kst_lr_at(kst_lr_kind kind, double base_lr, long step, long warmup, long total) {
    return base_lr * kst_lr_multiplier(kind, step, warmup, total);
}

float kst_clip_grad_norm(float *grads, size_t n, float max_norm) {
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)grads[i] * grads[i];
    float total = (float)sqrt(ss);
    float coef = max_norm / (total + 1e-6f);
    if (coef > 1.0f) coef = 1.0f;
    if (total != total) coef = NAN;
    for (size_t i = 0; i < n; i++) grads[i] *= coef;
    return total;
}

void kst_grad_scale(float *grads, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) grads[i] *= scale;
}

void kst_grad_zero(float *grads, size_t n) {
    if (n) memset(grads, 0, n * sizeof *grads);
}
