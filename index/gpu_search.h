/* gpu_search.h - exact inner-product search on the GPU (built with CUDA=1; without it every call
 * fails with KST_ERR_UNSUPPORTED and says how to get it).
 *
 * The vectors live in GPU memory as float32 or float16. A batch of queries is scored against all
 * of them with one cuBLAS matrix product per chunk of queries (float32: SGEMM without TF32, the
 * same arithmetic as FAISS's IndexFlatIP; float16: half inputs with float32 accumulation), and a
 * selection kernel keeps the k best of each row (k up to KST_GPU_TOPK_MAX): a radix select on the
 * scores' bits, then a sort of the survivors by score (ties: lower position first). Results are
 * those of FAISS IndexFlatIP (ids, scores within float rounding; float16 storage within half
 * precision). One kst_gpu_flat serves one search at a time (calls are serialised inside). */
#ifndef KST_INDEX_GPU_SEARCH_H
#define KST_INDEX_GPU_SEARCH_H

#include <stddef.h>
#include <stdint.h>

#include <faiss/c_api/Index_c.h>

#include "core/error.h"

#define KST_GPU_TOPK_MAX 1024

typedef struct kst_gpu_flat kst_gpu_flat;

/* An empty GPU store for dim-wide vectors, kept as float16 when fp16 != 0. Fails with
 * KST_ERR_UNSUPPORTED when there is no GPU backend or device. */
int kst_gpu_flat_create(int dim, int fp16, kst_gpu_flat **out, kst_error *err);
void kst_gpu_flat_free(kst_gpu_flat *g);
/* Appends x (n, dim) under ids (n; NULL: positions ntotal..ntotal+n-1). */
int kst_gpu_flat_add(kst_gpu_flat *g, int64_t n, const float *x, const int64_t *ids,
                     kst_error *err);
/* Drops every vector (memory is kept for the next adds). */
void kst_gpu_flat_reset(kst_gpu_flat *g);
int64_t kst_gpu_flat_count(const kst_gpu_flat *g);
/* Bytes of GPU memory held (vectors, ids, scratch). */
size_t kst_gpu_flat_bytes(const kst_gpu_flat *g);
/* Searches q (nq, dim), host memory, for the k best by inner product; scores and ids (nq, k),
 * host memory, best first; rows with fewer than k vectors end with id -1 and score -FLT_MAX, as FAISS's.
 * Fails with KST_ERR_INVALID on k < 1 or k > KST_GPU_TOPK_MAX. */
int kst_gpu_flat_search(kst_gpu_flat *g, int64_t nq, const float *q, int64_t k, float *scores,
                        int64_t *ids, kst_error *err);

/* IVF-PQ search on the GPU over a FAISS IndexIVFPQ (inner product, 8-bit codes, optionally under
 * an OPQ rotation; index/faiss_ext.h says how its vectors are stored): the centroids, codebooks,
 * rotation and inverted lists are copied to the GPU at creation (a later add or remove on the
 * FAISS index needs a new copy). Search: coarse scores and their top nprobe, one lookup table per
 * query in shared memory, a scan of the probed lists, top k: FAISS's scores (within float
 * rounding) and so its results at the same nprobe. */
typedef struct kst_gpu_ivfpq kst_gpu_ivfpq;
/* 1 when the GPU can search this index; otherwise 0 and why says why not. */
int kst_gpu_ivfpq_supported(const FaissIndex *index, char *why, size_t cap);
int kst_gpu_ivfpq_create(const FaissIndex *index, kst_gpu_ivfpq **out, kst_error *err);
void kst_gpu_ivfpq_free(kst_gpu_ivfpq *g);
int64_t kst_gpu_ivfpq_count(const kst_gpu_ivfpq *g);
size_t kst_gpu_ivfpq_bytes(const kst_gpu_ivfpq *g);
/* As kst_gpu_flat_search, visiting nprobe lists (clamped to 1..min(nlist, 1024)). */
int kst_gpu_ivfpq_search(kst_gpu_ivfpq *g, int64_t nq, const float *q, int64_t k, int nprobe,
                         float *scores, int64_t *ids, kst_error *err);

/* Row-wise top-k of a device matrix (rows, n) with leading dimension ld (floats; a multiple of 4
 * when n >= 4): vals/idx (rows, k) on the device, idx mapped through map (n) when not NULL.
 * For tests and the other GPU searches. */
int kst_gpu_topk_rows(const float *scores, size_t ld, int64_t rows, int64_t n, int k,
                      const int64_t *map, float *vals, int64_t *idx, void *stream, kst_error *err);

#endif
