/* vq_gpu_stub.c - Distill-VQ's GPU entry points in a build without CUDA=1: each is kst_gpu_check's
 * clear error (rebuild with `make CUDA=1`); kst_vq_train refuses --device cuda before reaching
 * them. */
#include "vq_gpu.h"

#ifndef KST_CUDA
#include "core/gpu.h"

int kst_vq_gpu_create(const kst_vq_model *m, size_t n, const float *y, size_t max_batch,
                      size_t max_cand, kst_vq_gpu **out, kst_error *err) {
    (void)m, (void)n, (void)y, (void)max_batch, (void)max_cand;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_vq_gpu_free(kst_vq_gpu *g) { (void)g; }
int kst_vq_gpu_set_tau(kst_vq_gpu *g, const float *tau, kst_error *err) {
    (void)g, (void)tau;
    return kst_gpu_check(err);
}
int kst_vq_gpu_get_params(kst_vq_gpu *g, float *params, kst_error *err) {
    (void)g, (void)params;
    return kst_gpu_check(err);
}
int kst_vq_gpu_assign(kst_vq_gpu *g, int32_t *assign, kst_error *err) {
    (void)g, (void)assign;
    return kst_gpu_check(err);
}
int kst_vq_gpu_batch(kst_vq_gpu *g, size_t B, const float *q, const size_t *off,
                     const int64_t *cand, const float *teacher, double T, double w_ivf,
                     double w_pq, int backward, double *loss_ivf, double *loss_pq, kst_error *err) {
    (void)g, (void)B, (void)q, (void)off, (void)cand, (void)teacher, (void)T, (void)w_ivf,
        (void)w_pq, (void)backward, (void)loss_ivf, (void)loss_pq;
    return kst_gpu_check(err);
}
int kst_vq_gpu_adam(kst_vq_gpu *g, int dense, long step, double lr_ivf, double lr_pq,
                    const kst_adamw_config *ac, kst_error *err) {
    (void)g, (void)dense, (void)step, (void)lr_ivf, (void)lr_pq, (void)ac;
    return kst_gpu_check(err);
}
int kst_vq_gpu_get_grad(kst_vq_gpu *g, float *grad, kst_error *err) {
    (void)g, (void)grad;
    return kst_gpu_check(err);
}
int kst_vq_gpu_keep(kst_vq_gpu *g, kst_error *err) {
    (void)g;
    return kst_gpu_check(err);
}
int kst_vq_gpu_restore(kst_vq_gpu *g, int reset_moments, kst_error *err) {
    (void)g, (void)reset_moments;
    return kst_gpu_check(err);
}
size_t kst_vq_gpu_bytes(const kst_vq_gpu *g) { (void)g; return 0; }
int kst_vq_gpu_encode(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                      uint8_t *codes, long *rounds, kst_error *err) {
    (void)m, (void)n, (void)y, (void)assign, (void)codes, (void)rounds;
    return kst_gpu_check(err);
}
int kst_vq_gpu_refit(kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                     const uint8_t *codes, double *obj_before, double *obj_after, kst_error *err) {
    (void)m, (void)n, (void)y, (void)assign, (void)codes, (void)obj_before, (void)obj_after;
    return kst_gpu_check(err);
}
size_t kst_vq_gpu_coder_peak_bytes(void) { return 0; }
#else
typedef int kst_vq_gpu_stub_unused;
#endif
