/* trainer_gpu_stub.c - the GPU training step's entry points in a build without CUDA=1: creating
 * it is a clear error saying how to get it. */
#include "trainer_gpu.h"

#ifndef KST_CUDA
#include "core/gpu.h"

int kst_gpu_trainer_create(const kst_bert *m, unsigned pool_modes, int normalize,
                           const unsigned char *decay, kst_gpu_trainer **out, kst_error *err) {
    (void)m, (void)pool_modes, (void)normalize, (void)decay;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_gpu_trainer_free(kst_gpu_trainer *t) { (void)t; }
int kst_gpu_trainer_forward_backward(kst_gpu_trainer *t, const kst_gpu_batch *q,
                                     const kst_gpu_batch *p, const float *teacher, size_t n,
                                     float dropout, uint64_t seed_q, uint64_t seed_p,
                                     kst_error *err) {
    (void)t, (void)q, (void)p, (void)teacher, (void)n, (void)dropout, (void)seed_q, (void)seed_p;
    return kst_gpu_check(err);
}
void kst_gpu_trainer_set_in_batch(kst_gpu_trainer *t, float weight) { (void)t, (void)weight; }
int kst_gpu_trainer_update(kst_gpu_trainer *t, int sgd, double lr, long step,
                           const kst_adamw_config *ac, double grad_clip, float *loss,
                           float *gnorm, kst_error *err) {
    (void)t, (void)sgd, (void)lr, (void)step, (void)ac, (void)grad_clip, (void)loss, (void)gnorm;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_update_enqueue(kst_gpu_trainer *t, int sgd, double lr, long step,
                                   const kst_adamw_config *ac, double grad_clip, kst_error *err) {
    (void)t, (void)sgd, (void)lr, (void)step, (void)ac, (void)grad_clip;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_wait(kst_gpu_trainer *t, float *loss, float *gnorm, kst_error *err) {
    (void)t, (void)loss, (void)gnorm;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_grads(kst_gpu_trainer *t, float *grads, float *loss, kst_error *err) {
    (void)t, (void)grads, (void)loss;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_maxsim_choices(kst_gpu_trainer *t, int *argmax, size_t cap, size_t *W, kst_error *err) {
    (void)t, (void)argmax, (void)cap, (void)W;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_get_state(kst_gpu_trainer *t, float *params, float *m, float *v, kst_error *err) {
    (void)t, (void)params, (void)m, (void)v;
    return kst_gpu_check(err);
}
int kst_gpu_trainer_set_state(kst_gpu_trainer *t, const float *params, const float *m,
                              const float *v, kst_error *err) {
    (void)t, (void)params, (void)m, (void)v;
    return kst_gpu_check(err);
}
size_t kst_gpu_trainer_peak_bytes(const kst_gpu_trainer *t) { (void)t; return 0; }
#else
typedef int kst_trainer_gpu_stub_unused;
#endif
