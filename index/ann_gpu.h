/* ann_gpu.h - the GPU copy behind kst_ann_set_device (index/ann.c); internal. */
#ifndef KST_INDEX_ANN_GPU_H
#define KST_INDEX_ANN_GPU_H

#include <stddef.h>
#include <stdint.h>

#include <faiss/c_api/Index_c.h>

#include "core/error.h"

typedef struct kst_ann_gpu kst_ann_gpu;

/* 1 when the index is one the GPU searches (flat, optionally under an id map, or IVF-PQ as
 * gpu_search.h says); otherwise 0 and why says what happens instead. */
int kst_ann_gpu_supported(FaissIndex *index, char *why, size_t cap);
/* A GPU copy (float16 vectors when fp16), filled at the first search. */
int kst_ann_gpu_open(FaissIndex *index, int fp16, kst_ann_gpu **out, kst_error *err);
void kst_ann_gpu_free(kst_ann_gpu *g);
/* The FAISS index changed: the copy is rebuilt before the next search. */
void kst_ann_gpu_stale(kst_ann_gpu *g);
/* As kst_ann_search, on the GPU copy (rebuilt first when stale); nprobe for IVF-PQ (0: 1, FAISS's
 * default). */
int kst_ann_gpu_search(kst_ann_gpu *g, const FaissIndex *index, int64_t nq, const float *q,
                       int64_t k, int nprobe, float *scores, int64_t *ids, kst_error *err);

#endif
