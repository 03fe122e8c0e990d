/* gpu_search_stub.c - the GPU search entry points of a build without CUDA=1. */
#include "gpu_search.h"

#ifndef KST_CUDA
#include "core/gpu.h"

int kst_gpu_flat_create(int dim, int fp16, kst_gpu_flat **out, kst_error *err) {
    (void)dim;
    (void)fp16;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_gpu_flat_free(kst_gpu_flat *g) { (void)g; }
int kst_gpu_flat_add(kst_gpu_flat *g, int64_t n, const float *x, const int64_t *ids,
                     kst_error *err) {
    (void)g, (void)n, (void)x, (void)ids;
    return kst_gpu_check(err);
}
void kst_gpu_flat_reset(kst_gpu_flat *g) { (void)g; }
int64_t kst_gpu_flat_count(const kst_gpu_flat *g) { (void)g; return 0; }
size_t kst_gpu_flat_bytes(const kst_gpu_flat *g) { (void)g; return 0; }
int kst_gpu_flat_search(kst_gpu_flat *g, int64_t nq, const float *q, int64_t k, float *scores,
                        int64_t *ids, kst_error *err) {
    (void)g, (void)nq, (void)q, (void)k, (void)scores, (void)ids;
    return kst_gpu_check(err);
}
int kst_gpu_topk_rows(const float *scores, size_t ld, int64_t rows, int64_t n, int k,
                      const int64_t *map, float *vals, int64_t *idx, void *stream, kst_error *err) {
    (void)scores, (void)ld, (void)rows, (void)n, (void)k, (void)map, (void)vals, (void)idx, (void)stream;
    return kst_gpu_check(err);
}
int kst_gpu_ivfpq_supported(const FaissIndex *index, char *why, size_t cap) {
    (void)index;
    if (cap) why[0] = '\0';
    return 0;
}
int kst_gpu_ivfpq_create(const FaissIndex *index, kst_gpu_ivfpq **out, kst_error *err) {
    (void)index;
    *out = NULL;
    return kst_gpu_check(err);
}
void kst_gpu_ivfpq_free(kst_gpu_ivfpq *g) { (void)g; }
int64_t kst_gpu_ivfpq_count(const kst_gpu_ivfpq *g) { (void)g; return 0; }
size_t kst_gpu_ivfpq_bytes(const kst_gpu_ivfpq *g) { (void)g; return 0; }
int kst_gpu_ivfpq_search(kst_gpu_ivfpq *g, int64_t nq, const float *q, int64_t k, int nprobe,
                         float *scores, int64_t *ids, kst_error *err) {
    (void)g, (void)nq, (void)q, (void)k, (void)nprobe, (void)scores, (void)ids;
    return kst_gpu_check(err);
}
#else
typedef int kst_gpu_search_stub_unused;
#endif
