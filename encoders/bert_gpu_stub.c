/* bert_gpu_stub.c - the GPU encoder entry points of a build without CUDA=1. */
#include "bert_gpu.h"

#ifndef KST_CUDA
#include "core/gpu.h"
#include "core/mem.h"

int kst_bert_gpu_create(const kst_bert *m, kst_bert_gpu **out, kst_error *err) {
    (void)m;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_bert_gpu_free(kst_bert_gpu *g) { (void)g; }
int kst_bert_gpu_forward(kst_bert_gpu *g, float *out, const int32_t *ids, const int32_t *type_ids,
                         const int *valid, size_t B, size_t T, kst_error *err) {
    (void)g, (void)out, (void)ids, (void)type_ids, (void)valid, (void)B, (void)T;
    return kst_gpu_check(err);
}
int kst_bert_gpu_sync(kst_bert_gpu *g, kst_error *err) {
    (void)g;
    return kst_gpu_check(err);
}
int kst_bert_gpu_forward_async(kst_bert_gpu *g, float *out, const int32_t *ids, const int32_t *type_ids,
                               const int *valid, size_t B, size_t T, kst_error *err) {
    (void)g, (void)out, (void)ids, (void)type_ids, (void)valid, (void)B, (void)T;
    return kst_gpu_check(err);
}
void *kst_bert_gpu_host_take(kst_bert_gpu *g, size_t bytes, kst_error *err) {
    (void)g;
    return kst_malloc(bytes ? bytes : 1, 1, "host buffer", err);
}
void kst_bert_gpu_host_give(kst_bert_gpu *g, void *p) {
    (void)g;
    kst_free(p);
}
const float *kst_bert_gpu_hidden(const kst_bert_gpu *g) { (void)g; return NULL; }
size_t kst_bert_gpu_peak_bytes(const kst_bert_gpu *g) { (void)g; return 0; }
int kst_bert_gpu_profile(kst_bert_gpu *g, double *ms) { (void)g, (void)ms; return 0; }
int kst_bert_gpu_lnfold(const kst_bert_gpu *g) { (void)g; return -1; }
int kst_bert_gpu_fc1_kcol(const kst_bert_gpu *g) { (void)g; return 0; }
int kst_bert_gpu_gelu_probe(const float *x, float *y, size_t n, kst_error *err) {
    (void)x, (void)y, (void)n;
    return kst_gpu_check(err);
}
#else
typedef int kst_bert_gpu_stub_unused;
#endif
