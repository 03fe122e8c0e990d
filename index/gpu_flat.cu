/* gpu_flat.cu - exact inner-product search on the GPU: cuBLAS scores, radix-select top-k. */
#include "core/gpu_util.cuh"

#include <cuda_fp16.h>
#include <float.h>
#include <math.h>
#include <mutex>
#include <stdint.h>

extern "C" {
#include "core/mem.h"
#include "index/gpu_search.h"
}

/* ------------------------------------------------------------------------------------------ */
/* top-k selection: one block per row.
 *
 * Scores become order-preserving 32-bit keys. Up to three histogram passes (11, 11, 10 bits)
 * narrow down the key of the k-th best until the survivors (everything above the chosen bin plus
 * the bin itself) fit in shared memory; usually one pass suffices. A compaction pass copies the
 * survivors to shared memory and a bitonic sort orders them (score descending, position
 * ascending). */

#define TOPK_THREADS 1024
#define TOPK_CAP 4096

__device__ __forceinline__ uint32_t f2key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key2f(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

__global__ void __launch_bounds__(TOPK_THREADS)
topk_rows_kernel(const float *__restrict__ S, size_t ld, int n, int k, const int64_t *__restrict__ map,
                 float *__restrict__ ov, int64_t *__restrict__ oi) {
    __shared__ unsigned hist[2048];
    __shared__ uint32_t ck[TOPK_CAP];
    __shared__ int ci[TOPK_CAP];
    __shared__ int s_bin, s_above, s_inbin, s_count, s_ties;
    const float *row = S + (size_t)blockIdx.x * ld;
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, warp = tid >> 5;
    uint32_t prefix = 0, pmask = 0;
    int need = k < n ? k : n;  /* best still to be chosen among keys matching the prefix */
    int taken = 0;             /* keys above the prefix: all chosen */
    int matching = n;          /* keys matching the prefix */
    int shift = 32;
    const int n4 = (ld % 4 == 0) ? n / 4 : 0;
    const float4 *row4 = reinterpret_cast<const float4 *>(row);
    for (int pass = 0; pass < 3 && taken + matching > TOPK_CAP; pass++) {
        const int w = pass < 2 ? 11 : 10;
        shift -= w;
        const int nb = 1 << w;
        for (int i = tid; i < nb; i += nt) hist[i] = 0;
        __syncthreads();
        const uint32_t bm = (uint32_t)(nb - 1);
        for (int i = tid; i < n4; i += nt) {
            float4 v = row4[i];
            uint32_t k0 = f2key(v.x), k1 = f2key(v.y), k2 = f2key(v.z), k3 = f2key(v.w);
            if ((k0 & pmask) == prefix) atomicAdd(&hist[(k0 >> shift) & bm], 1u);
            if ((k1 & pmask) == prefix) atomicAdd(&hist[(k1 >> shift) & bm], 1u);
            if ((k2 & pmask) == prefix) atomicAdd(&hist[(k2 >> shift) & bm], 1u);
            if ((k3 & pmask) == prefix) atomicAdd(&hist[(k3 >> shift) & bm], 1u);
        }
        for (int i = n4 * 4 + tid; i < n; i += nt) {
            uint32_t kk = f2key(row[i]);
            if ((kk & pmask) == prefix) atomicAdd(&hist[(kk >> shift) & bm], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            /* lane l owns bins [l*c, (l+1)*c); suffix sums find the bin holding the need-th key
             * counted from the top */
            const int c = nb / 32;
            unsigned own = 0;
            for (int j = 0; j < c; j++) own += hist[lane * c + j];
            unsigned suf = own;
            for (int off = 1; off < 32; off <<= 1) {
                unsigned v = __shfl_down_sync(0xffffffffu, suf, off);
                if (lane + off < 32) suf += v;
            }
            unsigned higher = suf - own;
            if (higher < (unsigned)need && (unsigned)need <= suf) {
                unsigned acc = higher;
                for (int j = c - 1; j >= 0; j--) {
                    unsigned h = hist[lane * c + j];
                    if (acc + h >= (unsigned)need) {
                        s_bin = lane * c + j;
                        s_above = (int)acc;
                        s_inbin = (int)h;
                        break;
                    }
                    acc += h;
                }
            }
        }
        __syncthreads();
        prefix |= (uint32_t)s_bin << shift;
        pmask |= bm << shift;
        taken += s_above;
        need -= s_above;
        matching = s_inbin;
        __syncthreads();
    }
    /* Survivors: keys above the prefix (taken of them) and keys matching it: all of them unless
     * the key is fully resolved (ties at the k-th score), then the first `need`. */
    const bool resolved = pmask == 0xffffffffu;
    if (tid == 0) {
        s_count = 0;
        s_ties = 0;
    }
    __syncthreads();
    if (!resolved) {
        for (int i = tid; i < n; i += nt) {
            uint32_t kk = f2key(row[i]);
            if ((kk & pmask) >= prefix) {
                int at = atomicAdd(&s_count, 1);
                if (at < TOPK_CAP) {
                    ck[at] = kk;
                    ci[at] = i;
                }
            }
        }
    } else {
        /* More ties at the k-th score than fit: keep the lowest positions, so the ties are
         * counted in position order (a block-wide scan per stretch of the row). */
        __shared__ int warp_ties[TOPK_THREADS / 32];
        for (int base = 0; base < n; base += nt) {
            int i = base + tid;
            uint32_t kk = i < n ? f2key(row[i]) : 0;
            bool above = i < n && kk > prefix, tie = i < n && kk == prefix;
            unsigned bal = __ballot_sync(0xffffffffu, tie);
            if (lane == 0) warp_ties[warp] = __popc(bal);
            __syncthreads();
            int before = s_ties;
            for (int w = 0; w < warp; w++) before += warp_ties[w];
            before += __popc(bal & ((1u << lane) - 1u));
            if (above || (tie && before < need)) {
                int at = atomicAdd(&s_count, 1);
                if (at < TOPK_CAP) {
                    ck[at] = kk;
                    ci[at] = i;
                }
            }
            __syncthreads();
            if (tid == 0) {
                int t = 0;
                for (int w = 0; w < nt / 32; w++) t += warp_ties[w];
                s_ties += t;
            }
            __syncthreads();
        }
    }
    __syncthreads();
    int M = s_count < TOPK_CAP ? s_count : TOPK_CAP;
    int P = 1;
    while (P < M) P <<= 1;
    for (int i = M + tid; i < P; i += nt) {
        ck[i] = 0;
        ci[i] = 0x7fffffff;
    }
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = tid; t < P / 2; t += nt) {
                int i = 2 * t - (t & (stride - 1));
                int j = i + stride;
                uint32_t ki = ck[i], kj = ck[j];
                int ii = ci[i], ij = ci[j];
                bool j_first = kj > ki || (kj == ki && ij < ii);
                bool i_first = ki > kj || (ki == kj && ii < ij);
                bool sw = ((i & size) == 0) ? j_first : i_first;
                if (sw) {
                    ck[i] = kj;
                    ck[j] = ki;
                    ci[i] = ij;
                    ci[j] = ii;
                }
            }
            __syncthreads();
        }
    }
    float *vo = ov + (size_t)blockIdx.x * k;
    int64_t *io = oi + (size_t)blockIdx.x * k;
    for (int r = tid; r < k; r += nt) {
        if (r < M) {
            vo[r] = key2f(ck[r]);
            io[r] = map ? map[ci[r]] : (int64_t)ci[r];
        } else {
            vo[r] = -FLT_MAX; /* FAISS's value for a missing result */
            io[r] = -1;
        }
    }
}

extern "C" int kst_gpu_topk_rows(const float *scores, size_t ld, int64_t rows, int64_t n, int k,
                                 const int64_t *map, float *vals, int64_t *idx, void *stream,
                                 kst_error *err) {
    int rc = KST_OK;
    if (k < 1 || k > KST_GPU_TOPK_MAX)
        return kst_fail(err, KST_ERR_INVALID, "GPU top-k: k = %d, must be 1..%d", k, KST_GPU_TOPK_MAX);
    if (n > INT32_MAX)
        return kst_fail(err, KST_ERR_INVALID, "GPU top-k: %lld columns, at most %d", (long long)n, INT32_MAX);
    for (int64_t r0 = 0; r0 < rows; r0 += 65535) {
        int64_t nr = rows - r0 < 65535 ? rows - r0 : 65535;
        topk_rows_kernel<<<(unsigned)nr, TOPK_THREADS, 0, (cudaStream_t)stream>>>(
            scores + (size_t)r0 * ld, ld, (int)n, k, map, vals + (size_t)r0 * k, idx + (size_t)r0 * k);
        CU_LAUNCHED("top-k selection kernel");
    }
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* the store */

struct kst_gpu_flat {
    int dim, fp16;
    int64_t n, cap;
    void *x;        /* (cap, dim) float or half */
    int64_t *ids;   /* (cap) */
    cublasHandle_t blas;
    cudaStream_t stream;
    float *S;       /* (qchunk, ldS) scores */
    size_t S_floats;
    float *qf;      /* (qchunk, dim) */
    __half *qh;
    float *ov;      /* (qchunk, KST_GPU_TOPK_MAX) */
    int64_t *oi;
    int64_t qcap;
    float *stage;   /* upload staging (float) */
    size_t stage_floats;
    std::mutex *mu;
};

__global__ void to_half_kernel(__half *out, const float *in, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2half_rn(in[i]);
}

__global__ void iota_kernel(int64_t *ids, int64_t start, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[i] = start + i;
}

extern "C" int kst_gpu_flat_create(int dim, int fp16, kst_gpu_flat **out, kst_error *err) {
    *out = NULL;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    if (dim < 1) return kst_fail(err, KST_ERR_INVALID, "GPU flat index: dim = %d", dim);
    kst_gpu_flat *g = (kst_gpu_flat *)kst_calloc(1, sizeof *g, "GPU index", err);
    if (!g) return KST_ERR_NOMEM;
    g->dim = dim;
    g->fp16 = fp16 != 0;
    g->mu = new std::mutex();
    CU_TRY(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking), "creating a stream");
    CUBLAS_TRY(cublasCreate(&g->blas), "creating the cuBLAS handle");
    CUBLAS_TRY(cublasSetStream(g->blas, g->stream), "cublasSetStream");
    /* float32 stays float32: no TF32, so scores match FAISS's SGEMM within rounding */
    CUBLAS_TRY(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    *out = g;
    return KST_OK;
done:
    kst_gpu_flat_free(g);
    return rc;
}

extern "C" void kst_gpu_flat_free(kst_gpu_flat *g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    cudaFree(g->x);
    cudaFree(g->ids);
    cudaFree(g->S);
    cudaFree(g->qf);
    cudaFree(g->qh);
    cudaFree(g->ov);
    cudaFree(g->oi);
    cudaFree(g->stage);
    if (g->blas) cublasDestroy(g->blas);
    if (g->stream) cudaStreamDestroy(g->stream);
    delete g->mu;
    kst_free(g);
}

extern "C" void kst_gpu_flat_reset(kst_gpu_flat *g) {
    if (g) g->n = 0;
}
extern "C" int64_t kst_gpu_flat_count(const kst_gpu_flat *g) { return g ? g->n : 0; }
extern "C" size_t kst_gpu_flat_bytes(const kst_gpu_flat *g) {
    if (!g) return 0;
    size_t el = g->fp16 ? 2 : 4;
    return (size_t)g->cap * (g->dim * el + 8) + g->S_floats * 4 +
           (size_t)g->qcap * (g->dim * 6 + KST_GPU_TOPK_MAX * 12) + g->stage_floats * 4;
}

static int reserve_vectors(kst_gpu_flat *g, int64_t want, kst_error *err) {
    int rc = KST_OK;
    if (want <= g->cap) return KST_OK;
    int64_t cap = g->cap ? g->cap : 1024;
    while (cap < want) cap = cap + cap / 2;
    size_t el = g->fp16 ? 2 : 4;
    void *x = NULL;
    int64_t *ids = NULL;
    KST_TRY(kst_gpu_alloc(&x, (size_t)cap * g->dim * el, "the GPU copy of the vectors", err));
    KST_TRY(kst_gpu_alloc((void **)&ids, (size_t)cap * 8, "the GPU copy of the ids", err));
    if (g->n) {
        CU_TRY(cudaMemcpyAsync(x, g->x, (size_t)g->n * g->dim * el, cudaMemcpyDeviceToDevice, g->stream), "copying vectors");
        CU_TRY(cudaMemcpyAsync(ids, g->ids, (size_t)g->n * 8, cudaMemcpyDeviceToDevice, g->stream), "copying ids");
        CU_TRY(cudaStreamSynchronize(g->stream), "copying vectors");
    }
    cudaFree(g->x);
    cudaFree(g->ids);
    g->x = x;
    g->ids = ids;
    g->cap = cap;
    return KST_OK;
done:
    cudaFree(x);
    cudaFree(ids);
    return rc;
}

extern "C" int kst_gpu_flat_add(kst_gpu_flat *g, int64_t n, const float *x, const int64_t *ids,
                                kst_error *err) {
    int rc = KST_OK;
    if (n <= 0) return KST_OK;
    std::lock_guard<std::mutex> lock(*g->mu);
    KST_TRY(reserve_vectors(g, g->n + n, err));
    if (!g->fp16) {
        /* on the search stream (a plain cudaMemcpy may return before its DMA lands, and the
         * non-blocking stream would not wait for it); waited for below */
        CU_TRY(cudaMemcpyAsync((float *)g->x + (size_t)g->n * g->dim, x, (size_t)n * g->dim * 4,
                               cudaMemcpyHostToDevice, g->stream),
               "uploading vectors");
    } else {
        /* through a float staging buffer of up to 64 Mi floats, converted on the device */
        size_t chunk_rows = ((size_t)64 << 20) / g->dim;
        if (chunk_rows < 1) chunk_rows = 1;
        size_t want = chunk_rows * g->dim;
        if ((size_t)n * g->dim < want) want = (size_t)n * g->dim;
        if (want > g->stage_floats) {
            cudaFree(g->stage);
            g->stage = NULL;
            g->stage_floats = 0;
            KST_TRY(kst_gpu_alloc((void **)&g->stage, want * 4, "vector upload staging", err));
            g->stage_floats = want;
        }
        size_t rows_per = g->stage_floats / g->dim;
        for (int64_t r = 0; r < n; r += (int64_t)rows_per) {
            size_t nr = (size_t)(n - r) < rows_per ? (size_t)(n - r) : rows_per;
            size_t cnt = nr * g->dim;
            CU_TRY(cudaMemcpyAsync(g->stage, x + (size_t)r * g->dim, cnt * 4, cudaMemcpyHostToDevice, g->stream),
                   "uploading vectors");
            to_half_kernel<<<(unsigned)((cnt + 255) / 256), 256, 0, g->stream>>>(
                (__half *)g->x + ((size_t)g->n + r) * g->dim, g->stage, cnt);
            CU_LAUNCHED("float16 conversion");
            CU_TRY(cudaStreamSynchronize(g->stream), "uploading vectors");
        }
    }
    if (ids) {
        CU_TRY(cudaMemcpyAsync(g->ids + g->n, ids, (size_t)n * 8, cudaMemcpyHostToDevice, g->stream), "uploading ids");
        CU_TRY(cudaStreamSynchronize(g->stream), "uploading ids");
    } else {
        iota_kernel<<<(unsigned)((n + 255) / 256), 256, 0, g->stream>>>(g->ids + g->n, g->n, n);
        CU_LAUNCHED("id sequence");
        CU_TRY(cudaStreamSynchronize(g->stream), "id sequence");
    }
    g->n += n;
done:
    return rc;
}

/* Scratch for qn queries at a time: scores (qn, ldS) within a budget of a quarter of the free
 * memory, at most 4 GiB. */
static int reserve_queries(kst_gpu_flat *g, int64_t nq, size_t ldS, int64_t *qchunk, kst_error *err) {
    int rc = KST_OK;
    size_t fr = 0, tot = 0;
    CU_TRY(cudaMemGetInfo(&fr, &tot), "cudaMemGetInfo");
    {
        size_t budget = fr / 4 + g->S_floats * 4;
        if (budget > ((size_t)4 << 30)) budget = (size_t)4 << 30;
        int64_t q = (int64_t)(budget / (ldS * 4));
        if (q > 4096) q = 4096;
        if (q > nq) q = nq;
        if (q < 1) q = 1;
        *qchunk = q;
        if ((size_t)q * ldS > g->S_floats) {
            cudaFree(g->S);
            g->S = NULL;
            g->S_floats = 0;
            KST_TRY(kst_gpu_alloc((void **)&g->S, (size_t)q * ldS * 4, "the query x vector score block", err));
            g->S_floats = (size_t)q * ldS;
        }
        if (q > g->qcap) {
            cudaFree(g->qf);
            cudaFree(g->qh);
            cudaFree(g->ov);
            cudaFree(g->oi);
            g->qf = NULL;
            g->qh = NULL;
            g->ov = NULL;
            g->oi = NULL;
            g->qcap = 0;
            KST_TRY(kst_gpu_alloc((void **)&g->qf, (size_t)q * g->dim * 4, "queries", err));
            KST_TRY(kst_gpu_alloc((void **)&g->qh, (size_t)q * g->dim * 2, "queries", err));
            KST_TRY(kst_gpu_alloc((void **)&g->ov, (size_t)q * KST_GPU_TOPK_MAX * 4, "top-k scores", err));
            KST_TRY(kst_gpu_alloc((void **)&g->oi, (size_t)q * KST_GPU_TOPK_MAX * 8, "top-k ids", err));
            g->qcap = q;
        }
    }
done:
    return rc;
}

extern "C" int kst_gpu_flat_search(kst_gpu_flat *g, int64_t nq, const float *q, int64_t k,
                                   float *scores, int64_t *ids, kst_error *err) {
    int rc = KST_OK;
    if (k < 1 || k > KST_GPU_TOPK_MAX)
        return kst_fail(err, KST_ERR_INVALID, "GPU search: k = %lld, must be 1..%d", (long long)k,
                        KST_GPU_TOPK_MAX);
    if (nq <= 0) return KST_OK;
    std::lock_guard<std::mutex> lock(*g->mu);
    if (g->n == 0) {
        for (int64_t i = 0; i < nq * k; i++) {
            scores[i] = -FLT_MAX;
            ids[i] = -1;
        }
        return KST_OK;
    }
    const size_t ldS = ((size_t)g->n + 3) & ~(size_t)3;
    int64_t qchunk = 1;
    KST_TRY(reserve_queries(g, nq, ldS, &qchunk, err));
    for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
        int64_t qn = nq - q0 < qchunk ? nq - q0 : qchunk;
        size_t cnt = (size_t)qn * g->dim;
        CU_TRY(cudaMemcpyAsync(g->qf, q + (size_t)q0 * g->dim, cnt * 4, cudaMemcpyHostToDevice, g->stream),
               "uploading queries");
        const float one = 1.0f, zero = 0.0f;
        /* column-major: S^T (n, qn) = X^T (n, dim) * Q^T (dim, qn); S row-major (qn, ldS) */
        if (!g->fp16) {
            CUBLAS_TRY(cublasSgemm(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)g->n, (int)qn, g->dim, &one,
                                   (const float *)g->x, g->dim, g->qf, g->dim, &zero, g->S, (int)ldS),
                       "query x vector SGEMM");
        } else {
            to_half_kernel<<<(unsigned)((cnt + 255) / 256), 256, 0, g->stream>>>(g->qh, g->qf, cnt);
            CU_LAUNCHED("float16 conversion");
            CUBLAS_TRY(cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)g->n, (int)qn, g->dim, &one,
                                    g->x, CUDA_R_16F, g->dim, g->qh, CUDA_R_16F, g->dim, &zero, g->S,
                                    CUDA_R_32F, (int)ldS, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "query x vector half GEMM");
        }
        KST_TRY(kst_gpu_topk_rows(g->S, ldS, qn, g->n, (int)k, g->ids, g->ov, g->oi, g->stream, err));
        CU_TRY(cudaMemcpyAsync(scores + (size_t)q0 * k, g->ov, (size_t)qn * k * 4, cudaMemcpyDeviceToHost, g->stream),
               "downloading scores");
        CU_TRY(cudaMemcpyAsync(ids + (size_t)q0 * k, g->oi, (size_t)qn * k * 8, cudaMemcpyDeviceToHost, g->stream),
               "downloading ids");
    }
    CU_TRY(cudaStreamSynchronize(g->stream), "GPU search");
done:
    return rc;
}
