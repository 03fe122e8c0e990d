/* ann_gpu.c - the GPU copy of a kst_ann: the vectors of a flat index kept in GPU memory for
 * exact search, or an IVF-PQ index's lists for GPU IVF-PQ search (index/gpu_search.h); rebuilt from
 * the FAISS index at the first search after adds and removes. */
#include "ann_gpu.h"

#include <pthread.h>
#include <faiss/c_api/error_c.h>
#include <stdio.h>
#include <string.h>

#include "core/check.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "index/faiss_ext.h"
#include "index/gpu_search.h"

struct kst_ann_gpu {
    pthread_mutex_t mu;
    kst_gpu_flat *flat;   /* a flat index: its vectors */
    kst_gpu_ivfpq *ivf;   /* an IVF-PQ index: its lists (made at the first search) */
    int is_ivf;
    int fp16;
    int stale; /* the FAISS index changed since the copy was made */
};

int kst_ann_gpu_supported(FaissIndex *index, char *why, size_t cap) {
    kst_faiss_layout lay;
    if (kst_faiss_layout_get(index, &lay) != 0) {
        snprintf(why, cap, "cannot read the index layout");
        return 0;
    }
    if (lay.nlist && lay.pq_M) {
        if (kst_gpu_ivfpq_supported(index, why, cap)) return 1;
        size_t n = strlen(why);
        snprintf(why + n, cap - n, "; it is searched on the CPU");
        return 0;
    }
    if (lay.nlist || lay.is_hnsw || lay.pq_M || lay.opq_d_in) {
        snprintf(why, cap,
                 "GPU search covers flat and IVF-PQ indexes; this %s index is searched on the CPU",
                 lay.nlist ? "IVF" : lay.is_hnsw ? "HNSW" : "PQ");
        return 0;
    }
    return 1;
}

int kst_ann_gpu_open(FaissIndex *index, int fp16, kst_ann_gpu **out, kst_error *err) {
    *out = NULL;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    kst_ann_gpu *g = kst_calloc(1, sizeof *g, "GPU index copy", err);
    if (!g) return KST_ERR_NOMEM;
    pthread_mutex_init(&g->mu, NULL);
    g->fp16 = fp16;
    g->stale = 1;
    kst_faiss_layout lay;
    g->is_ivf = kst_faiss_layout_get(index, &lay) == 0 && lay.nlist != 0;
    if (!g->is_ivf) rc = kst_gpu_flat_create(faiss_Index_d(index), fp16, &g->flat, err);
    if (rc != KST_OK) {
        kst_ann_gpu_free(g);
        return rc;
    }
    *out = g;
    return KST_OK;
}

void kst_ann_gpu_free(kst_ann_gpu *g) {
    if (!g) return;
    kst_gpu_flat_free(g->flat);
    kst_gpu_ivfpq_free(g->ivf);
    pthread_mutex_destroy(&g->mu);
    kst_free(g);
}

void kst_ann_gpu_stale(kst_ann_gpu *g) {
    if (!g) return;
    pthread_mutex_lock(&g->mu);
    g->stale = 1;
    pthread_mutex_unlock(&g->mu);
}

/* Copies every vector of the FAISS index to the GPU (called with g->mu held). */
static int refresh(kst_ann_gpu *g, const FaissIndex *index, kst_error *err) {
    if (g->is_ivf) {
        kst_gpu_ivfpq_free(g->ivf);
        g->ivf = NULL;
        int rc = kst_gpu_ivfpq_create(index, &g->ivf, err);
        if (rc == KST_OK) g->stale = 0;
        return rc;
    }
    int64_t n = faiss_Index_ntotal(index);
    int d = faiss_Index_d(index);
    int rc = KST_OK;
    float *x = kst_malloc(n ? (size_t)n : 1, (size_t)d * sizeof(float), "vectors for the GPU copy", err);
    int64_t *ids = kst_malloc(n ? (size_t)n : 1, sizeof(int64_t), "ids for the GPU copy", err);
    if (!x || !ids) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (kst_faiss_flat_get(index, x, ids) != 0) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "GPU copy: %s", faiss_get_last_error());
        goto done;
    }
    kst_gpu_flat_reset(g->flat);
    KST_TRY(kst_gpu_flat_add(g->flat, n, x, ids, err));
    g->stale = 0;
done:
    kst_free(x);
    kst_free(ids);
    return rc;
}

int kst_ann_gpu_search(kst_ann_gpu *g, const FaissIndex *index, int64_t nq, const float *q,
                       int64_t k, int nprobe, float *scores, int64_t *ids, kst_error *err) {
    int rc = KST_OK;
    if (k > KST_GPU_TOPK_MAX)
        return kst_fail(err, KST_ERR_INVALID, "GPU search: k = %lld, at most %d on the GPU",
                        (long long)k, KST_GPU_TOPK_MAX);
    pthread_mutex_lock(&g->mu);
    if (g->stale) rc = refresh(g, index, err);
    pthread_mutex_unlock(&g->mu);
    if (rc != KST_OK) return rc;
    if (g->is_ivf) return kst_gpu_ivfpq_search(g->ivf, nq, q, k, nprobe > 0 ? nprobe : 1, scores, ids, err);
    return kst_gpu_flat_search(g->flat, nq, q, k, scores, ids, err);
}
