/* bert_gpu_train_stub.c - the GPU training pass's entry points in a build without CUDA=1. */
#include "bert_gpu_train.h"

#ifndef KST_CUDA
#include "core/gpu.h"

int kst_bert_gpu_train_create(const kst_bert *m, unsigned pool_modes, int normalize,
                              kst_bert_gpu_train **out, kst_error *err) {
    (void)m, (void)pool_modes, (void)normalize;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_bert_gpu_train_free(kst_bert_gpu_train *g) { (void)g; }
int kst_bert_gpu_train_forward(kst_bert_gpu_train *g, int side, const int32_t *ids,
                               const int32_t *type_ids, const int *valid, size_t B, size_t T,
                               float dropout, uint64_t seed, kst_error *err) {
    (void)g, (void)side, (void)ids, (void)type_ids, (void)valid, (void)B, (void)T, (void)dropout, (void)seed;
    return kst_gpu_check(err);
}
int kst_bert_gpu_train_forward_rows(kst_bert_gpu_train *g, int side, const int32_t *ids,
                                    const int32_t *type_ids, const int *valid, const int *rows,
                                    size_t B, size_t T, float dropout, uint64_t seed, kst_error *err) {
    (void)g, (void)side, (void)ids, (void)type_ids, (void)valid, (void)rows, (void)B, (void)T, (void)dropout, (void)seed;
    return kst_gpu_check(err);
}
const float *kst_bert_gpu_train_vectors(const kst_bert_gpu_train *g, int side) { (void)g, (void)side; return NULL; }
size_t kst_bert_gpu_train_dim(const kst_bert_gpu_train *g) { (void)g; return 0; }
int kst_bert_gpu_train_backward(kst_bert_gpu_train *g, int side, const float *dvec, kst_error *err) {
    (void)g, (void)side, (void)dvec;
    return kst_gpu_check(err);
}
int kst_bert_gpu_train_zero_grads(kst_bert_gpu_train *g, kst_error *err) { (void)g; return kst_gpu_check(err); }
size_t kst_bert_gpu_train_num_params(const kst_bert_gpu_train *g) { (void)g; return 0; }
float *kst_bert_gpu_train_params(kst_bert_gpu_train *g) { (void)g; return NULL; }
float *kst_bert_gpu_train_grads(kst_bert_gpu_train *g) { (void)g; return NULL; }
void *kst_bert_gpu_train_params_bf16(kst_bert_gpu_train *g) { (void)g; return NULL; }
void *kst_bert_gpu_train_stream(kst_bert_gpu_train *g) { (void)g; return NULL; }
int kst_bert_gpu_train_get_params(kst_bert_gpu_train *g, float *params, kst_error *err) {
    (void)g, (void)params;
    return kst_gpu_check(err);
}
int kst_bert_gpu_train_set_params(kst_bert_gpu_train *g, const float *params, kst_error *err) {
    (void)g, (void)params;
    return kst_gpu_check(err);
}
int kst_bert_gpu_train_get_grads(kst_bert_gpu_train *g, float *grads, kst_error *err) {
    (void)g, (void)grads;
    return kst_gpu_check(err);
}
size_t kst_bert_gpu_train_bytes(const kst_bert_gpu_train *g) { (void)g; return 0; }
size_t kst_bert_gpu_train_peak_bytes(const kst_bert_gpu_train *g) { (void)g; return 0; }
#else
typedef int kst_bert_gpu_train_stub_unused;
#endif
