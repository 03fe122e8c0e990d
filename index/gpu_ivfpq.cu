/* gpu_ivfpq.cu - IVF-PQ search on the GPU over the very FAISS IndexIVFPQ the CPU searches
 * (inner product, 8-bit codes, optionally under an OPQ rotation): its centroids, codebooks,
 * rotation and inverted lists are read through index/faiss_ext.h and copied to the GPU.
 *
 * Per chunk of queries: y = A q (OPQ), coarse scores y . centroids (SGEMM) and their top nprobe
 * (the top-k kernel of gpu_flat.cu); one lookup table per query, LUT[m][j] = y_m . codebook[m][j]
 * (for the inner product the table does not depend on the list); one block per (query, probed
 * list group) with the table in shared memory scores every code of up to 8 probed lists as <y, centroid> +
 * sum_m LUT[m][code_m], as FAISS's IVFPQ scanner does; then the top k over the probed entries. */
#include "core/gpu_util.cuh"

#include <float.h>
#include <mutex>
#include <stdint.h>
#include <string.h>

extern "C" {
#include "core/mem.h"
#include "index/faiss_ext.h"
#include "index/gpu_search.h"
}

struct kst_gpu_ivfpq {
    int d, D, M, dsub, by_residual, opq;
    size_t nlist, maxlist;
    int64_t ntotal;
    float *A;          /* (D, d) rotation, NULL without OPQ */
    float *cent;       /* (nlist, D) */
    float *cb;         /* (M, 256, dsub) */
    int64_t *off;      /* (nlist + 1) list offsets */
    uint8_t *codes;    /* (ntotal, M) */
    int64_t *ids;      /* (ntotal) */
    size_t bytes;
    /* scratch, grown on demand (cap: bytes held by each) */
    size_t cap[10];
    float *q, *qt, *Sc, *cval, *lut, *cs, *tv;
    int64_t *clist, *cid, *ti;
    cublasHandle_t blas;
    cudaStream_t stream;
    std::mutex *mu;
};

extern "C" void kst_gpu_ivfpq_free(kst_gpu_ivfpq *g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    void *ps[] = {g->A, g->cent, g->cb, g->off, g->codes, g->ids, g->q, g->qt, g->Sc, g->cval, g->lut,
                  g->cs, g->tv, g->clist, g->cid, g->ti};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) cudaFree(ps[i]);
    if (g->blas) cublasDestroy(g->blas);
    if (g->stream) cudaStreamDestroy(g->stream);
    delete g->mu;
    kst_free(g);
}

extern "C" int kst_gpu_ivfpq_supported(const FaissIndex *index, char *why, size_t cap) {
    kst_faiss_layout l;
    if (kst_faiss_layout_get(index, &l) != 0) {
        snprintf(why, cap, "cannot read the index layout");
        return 0;
    }
    const char *no = NULL;
    if (!l.nlist || !l.pq_M) no = "it is not IVF-PQ";
    else if (l.metric != 0) no = "its metric is not the inner product";
    else if (l.pq_nbits != 8) no = "its PQ codes are not 8-bit";
    else if (l.has_id_map) no = "it has an id map above the IVF";
    else if (l.opq_d_in && l.opq_d_out != l.ivf_d) no = "its pre-transform does not feed the IVF";
    else if ((size_t)l.pq_M * 256 * 4 > 160 * 1024) no = "its lookup table does not fit in shared memory";
    else if (!l.is_trained) no = "it is not trained";
    if (no) {
        snprintf(why, cap, "GPU IVF-PQ search does not cover this index (%s)", no);
        return 0;
    }
    return 1;
}

static int up(void **dst, const void *src, size_t bytes, const char *what, kst_gpu_ivfpq *g, kst_error *err) {
    int rc = kst_gpu_alloc(dst, bytes, what, err);
    if (rc != KST_OK) return rc;
    g->bytes += bytes;
    if (bytes && src) {
        /* on the search stream, and waited for: a plain cudaMemcpy may return before its DMA
         * lands, and the non-blocking stream would not wait for it */
        cudaError_t e = cudaMemcpyAsync(*dst, src, bytes, cudaMemcpyHostToDevice, g->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
        if (e != cudaSuccess) return kst_cuda_fail(err, e, what);
    }
    return KST_OK;
}

extern "C" int kst_gpu_ivfpq_create(const FaissIndex *index, kst_gpu_ivfpq **out, kst_error *err) {
    *out = NULL;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    char why[256];
    if (!kst_gpu_ivfpq_supported(index, why, sizeof why)) return kst_fail(err, KST_ERR_UNSUPPORTED, "%s", why);
    kst_faiss_layout l;
    kst_faiss_layout_get(index, &l);
    kst_gpu_ivfpq *g = (kst_gpu_ivfpq *)kst_calloc(1, sizeof *g, "GPU IVF-PQ", err);
    if (!g) return KST_ERR_NOMEM;
    g->mu = new std::mutex();
    g->d = l.d;
    g->D = l.ivf_d;
    g->M = (int)l.pq_M;
    g->dsub = (int)l.pq_dsub;
    g->by_residual = l.by_residual;
    g->nlist = l.nlist;
    g->opq = l.opq_d_in != 0;
    float *h = NULL;
    size_t *sizes = NULL;
    int64_t *hoff = NULL, *hids = NULL;
    uint8_t *hcodes = NULL;
    size_t hn = (size_t)g->D * (g->opq ? g->d : 1);
    size_t cn = g->nlist * g->D, bn = (size_t)g->M * 256 * g->dsub;
    h = (float *)kst_malloc(hn > cn ? (hn > bn ? hn : bn) : (cn > bn ? cn : bn), sizeof(float), "IVF-PQ tables", err);
    sizes = (size_t *)kst_malloc(g->nlist, sizeof(size_t), "list sizes", err);
    hoff = (int64_t *)kst_malloc(g->nlist + 1, sizeof(int64_t), "list offsets", err);
    if (!h || !sizes || !hoff) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    CU_TRY(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking), "creating a stream");
    CUBLAS_TRY(cublasCreate(&g->blas), "creating the cuBLAS handle");
    CUBLAS_TRY(cublasSetStream(g->blas, g->stream), "cublasSetStream");
    CUBLAS_TRY(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    if (g->opq) {
        if (kst_faiss_opq_matrix_get(index, h) != 0) {
            rc = kst_fail(err, KST_ERR_INTERNAL, "GPU IVF-PQ: reading the OPQ matrix failed");
            goto done;
        }
        KST_TRY(up((void **)&g->A, h, hn * 4, "the OPQ matrix", g, err));
    }
    if (kst_faiss_ivf_centroids_get(index, h) != 0) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "GPU IVF-PQ: reading the centroids failed");
        goto done;
    }
    KST_TRY(up((void **)&g->cent, h, cn * 4, "IVF centroids", g, err));
    if (kst_faiss_pq_codebook_get(index, h) != 0) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "GPU IVF-PQ: reading the codebooks failed");
        goto done;
    }
    KST_TRY(up((void **)&g->cb, h, bn * 4, "PQ codebooks", g, err));
    if (kst_faiss_ivf_list_sizes(index, sizes) != 0) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "GPU IVF-PQ: reading the list sizes failed");
        goto done;
    }
    hoff[0] = 0;
    for (size_t i = 0; i < g->nlist; i++) {
        hoff[i + 1] = hoff[i] + (int64_t)sizes[i];
        if (sizes[i] > g->maxlist) g->maxlist = sizes[i];
    }
    g->ntotal = hoff[g->nlist];
    hids = (int64_t *)kst_malloc(g->ntotal ? (size_t)g->ntotal : 1, sizeof(int64_t), "list ids", err);
    hcodes = (uint8_t *)kst_malloc(g->ntotal ? (size_t)g->ntotal : 1, (size_t)g->M, "list codes", err);
    if (!hids || !hcodes) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < g->nlist; i++)
        if (sizes[i] && kst_faiss_ivf_list_get(index, i, hids + hoff[i], hcodes + (size_t)hoff[i] * g->M) != 0) {
            rc = kst_fail(err, KST_ERR_INTERNAL, "GPU IVF-PQ: reading inverted list %zu failed", i);
            goto done;
        }
    KST_TRY(up((void **)&g->off, hoff, (g->nlist + 1) * 8, "list offsets", g, err));
    KST_TRY(up((void **)&g->ids, hids, (size_t)g->ntotal * 8, "list ids", g, err));
    KST_TRY(up((void **)&g->codes, hcodes, (size_t)g->ntotal * g->M, "list codes", g, err));
done:
    kst_free(h);
    kst_free(sizes);
    kst_free(hoff);
    kst_free(hids);
    kst_free(hcodes);
    if (rc != KST_OK) {
        kst_gpu_ivfpq_free(g);
        return rc;
    }
    *out = g;
    return KST_OK;
}

extern "C" size_t kst_gpu_ivfpq_bytes(const kst_gpu_ivfpq *g) { return g ? g->bytes : 0; }
extern "C" int64_t kst_gpu_ivfpq_count(const kst_gpu_ivfpq *g) { return g ? g->ntotal : 0; }

/* LUT[q][m][j] = y_q[m*dsub ..] . cb[m][j][..]; grid (nq, M), 256 threads */
__global__ void lut_kernel(float *lut, const float *y, const float *cb, int D, int M, int dsub) {
    int q = blockIdx.x, m = blockIdx.y, j = threadIdx.x;
    const float *ym = y + (size_t)q * D + (size_t)m * dsub;
    const float *c = cb + ((size_t)m * 256 + j) * dsub;
    float s = 0;
    for (int t = 0; t < dsub; t++) s += ym[t] * c[t];
    lut[((size_t)q * M + m) * 256 + j] = s;
}

/* grid (nq, ceil(nprobe / PROBES_PER_BLOCK)): the query's table is loaded into shared memory once
 * and the block scores every code of its probed lists into their maxlist slots */
#define PROBES_PER_BLOCK 8

__global__ void scan_kernel(float *cs, int64_t *cid, const float *lut, const float *cval, const int64_t *clist,
                            const int64_t *off, const uint8_t *codes, const int64_t *ids, int M, int nprobe,
                            size_t maxlist, size_t ld, int by_residual) {
    extern __shared__ float slut[];
    const int q = blockIdx.x;
    const float *lq = lut + (size_t)q * M * 256;
    for (int i = threadIdx.x; i < M * 256; i += blockDim.x) slut[i] = lq[i];
    __syncthreads();
    const int p_end = min(nprobe, (int)(blockIdx.y + 1) * PROBES_PER_BLOCK);
    for (int p = blockIdx.y * PROBES_PER_BLOCK; p < p_end; p++) {
        const int64_t list = clist[(size_t)q * nprobe + p];
        const float base = by_residual ? cval[(size_t)q * nprobe + p] : 0.0f;
        const int64_t lo = list >= 0 ? off[list] : 0, n = list >= 0 ? off[list + 1] - lo : 0;
        float *dst = cs + (size_t)q * ld + (size_t)p * maxlist;
        int64_t *dsti = cid + (size_t)q * ld + (size_t)p * maxlist;
        for (size_t i = threadIdx.x; i < maxlist; i += blockDim.x) {
            if ((int64_t)i < n) {
                const uint8_t *c = codes + (size_t)(lo + (int64_t)i) * M;
                float sc = base;
                if ((M & 3) == 0) {
                    const uint32_t *c4 = reinterpret_cast<const uint32_t *>(c);
                    for (int m4 = 0; m4 < M / 4; m4++) {
                        uint32_t w = c4[m4];
                        const float *t = slut + m4 * 4 * 256;
                        sc += t[w & 0xff] + t[256 + ((w >> 8) & 0xff)] + t[512 + ((w >> 16) & 0xff)] + t[768 + (w >> 24)];
                    }
                } else {
                    for (int m = 0; m < M; m++) sc += slut[m * 256 + c[m]];
                }
                dst[i] = sc;
                dsti[i] = ids[lo + (int64_t)i];
            } else {
                dst[i] = -FLT_MAX;
                dsti[i] = -1;
            }
        }
    }
}

__global__ void gather_kernel(int64_t *out, const int64_t *pos, const int64_t *cid, size_t ld, int k, int64_t nq) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nq * k) return;
    int64_t q = i / k, p = pos[i];
    out[i] = p >= 0 ? cid[(size_t)q * ld + (size_t)p] : -1;
}

static int grow(void **p, size_t *cap, size_t need, const char *what, kst_error *err) {
    if (need <= *cap) return KST_OK;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    int rc = kst_gpu_alloc(p, need, what, err);
    if (rc == KST_OK) *cap = need;
    return rc;
}

extern "C" int kst_gpu_ivfpq_search(kst_gpu_ivfpq *g, int64_t nq, const float *q, int64_t k, int nprobe,
                                    float *scores, int64_t *ids, kst_error *err) {
    int rc = KST_OK;
    if (k < 1 || k > KST_GPU_TOPK_MAX)
        return kst_fail(err, KST_ERR_INVALID, "GPU search: k = %lld, must be 1..%d", (long long)k, KST_GPU_TOPK_MAX);
    if (nprobe < 1) nprobe = 1;
    if ((size_t)nprobe > g->nlist) nprobe = (int)g->nlist;
    if (nprobe > KST_GPU_TOPK_MAX) nprobe = KST_GPU_TOPK_MAX;
    if (nq <= 0) return KST_OK;
    std::lock_guard<std::mutex> lock(*g->mu);
    size_t maxlist = g->maxlist ? g->maxlist : 1;
    size_t ncand = (size_t)nprobe * maxlist, ld = (ncand + 3) & ~(size_t)3;
    size_t ldc = (g->nlist + 3) & ~(size_t)3;
    /* queries per chunk: candidates (12 bytes each) within 2 GiB */
    int64_t qc = (int64_t)(((size_t)2 << 30) / (ld * 12));
    if (qc > 2048) qc = 2048;
    if (qc > nq) qc = nq;
    if (qc < 1) qc = 1;
    KST_TRY(grow((void **)&g->q, &g->cap[0], (size_t)qc * g->d * 4, "queries", err));
    KST_TRY(grow((void **)&g->qt, &g->cap[1], (size_t)qc * g->D * 4, "rotated queries", err));
    KST_TRY(grow((void **)&g->Sc, &g->cap[2], (size_t)qc * ldc * 4, "coarse scores", err));
    KST_TRY(grow((void **)&g->cval, &g->cap[3], (size_t)qc * nprobe * 4, "coarse top", err));
    KST_TRY(grow((void **)&g->clist, &g->cap[4], (size_t)qc * nprobe * 8, "coarse top", err));
    KST_TRY(grow((void **)&g->lut, &g->cap[5], (size_t)qc * g->M * 256 * 4, "lookup tables", err));
    KST_TRY(grow((void **)&g->cs, &g->cap[6], (size_t)qc * ld * 4, "candidate scores", err));
    KST_TRY(grow((void **)&g->cid, &g->cap[7], (size_t)qc * ld * 8, "candidate ids", err));
    KST_TRY(grow((void **)&g->tv, &g->cap[8], (size_t)qc * k * 4, "top-k scores", err));
    KST_TRY(grow((void **)&g->ti, &g->cap[9], (size_t)qc * k * 16, "top-k ids", err));
    CU_TRY(cudaFuncSetAttribute(scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, g->M * 256 * 4),
           "raising the scan kernel's shared memory");
    for (int64_t q0 = 0; q0 < nq; q0 += qc) {
        int64_t qn = nq - q0 < qc ? nq - q0 : qc;
        const float one = 1.0f, zero = 0.0f;
        CU_TRY(cudaMemcpyAsync(g->q, q + (size_t)q0 * g->d, (size_t)qn * g->d * 4, cudaMemcpyHostToDevice, g->stream),
               "uploading queries");
        const float *y = g->q;
        if (g->opq) {
            /* Y (qn, D) = Q (qn, d) A^T; column-major: Y^T (D, qn) = A (D x d) as op_T of (d x D) * Q^T */
            CUBLAS_TRY(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, g->D, (int)qn, g->d, &one, g->A, g->d, g->q,
                                   g->d, &zero, g->qt, g->D),
                       "OPQ rotation");
            y = g->qt;
        }
        CUBLAS_TRY(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)g->nlist, (int)qn, g->D, &one, g->cent, g->D, y,
                               g->D, &zero, g->Sc, (int)ldc),
                   "coarse scores");
        KST_TRY(kst_gpu_topk_rows(g->Sc, ldc, qn, (int64_t)g->nlist, nprobe, NULL, g->cval, g->clist, g->stream, err));
        lut_kernel<<<dim3((unsigned)qn, (unsigned)g->M), 256, 0, g->stream>>>(g->lut, y, g->cb, g->D, g->M, g->dsub);
        CU_LAUNCHED("lookup table kernel");
        scan_kernel<<<dim3((unsigned)qn, (unsigned)((nprobe + PROBES_PER_BLOCK - 1) / PROBES_PER_BLOCK)), 256,
                      (size_t)g->M * 256 * 4, g->stream>>>(
            g->cs, g->cid, g->lut, g->cval, g->clist, g->off, g->codes, g->ids, g->M, nprobe, maxlist, ld,
            g->by_residual);
        CU_LAUNCHED("list scan kernel");
        KST_TRY(kst_gpu_topk_rows(g->cs, ld, qn, (int64_t)ncand, (int)k, NULL, g->tv, g->ti, g->stream, err));
        int64_t *gid = g->ti + (size_t)qn * k;
        gather_kernel<<<(unsigned)((qn * k + 255) / 256), 256, 0, g->stream>>>(gid, g->ti, g->cid, ld, (int)k, qn);
        CU_LAUNCHED("id gather kernel");
        CU_TRY(cudaMemcpyAsync(scores + (size_t)q0 * k, g->tv, (size_t)qn * k * 4, cudaMemcpyDeviceToHost, g->stream),
               "downloading scores");
        CU_TRY(cudaMemcpyAsync(ids + (size_t)q0 * k, gid, (size_t)qn * k * 8, cudaMemcpyDeviceToHost, g->stream),
               "downloading ids");
    }
    CU_TRY(cudaStreamSynchronize(g->stream), "GPU IVF-PQ search");
done:
    return rc;
}
