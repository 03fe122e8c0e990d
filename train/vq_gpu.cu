/* vq_gpu.cu - Distill-VQ on the GPU (see vq_gpu.h): the batch's students, listwise losses and
 * gradients (train/vq.c's kst_vq_batch_q, formula for formula), lazy Adam, the IVF lists, and the
 * query-weighted encoder and refit (train/vq_code.c). Every product is a cuBLAS SGEMM in float32
 * (row-major operands as kst_sgemm takes them); the per-row work (arg-min over codewords, soft
 * assignments, listwise softmaxes) is one warp or block per row, sums in double where the CPU's
 * are. */
#include "core/gpu_util.cuh"

#include <float.h>
#include <math.h>
#include <string.h>

extern "C" {
#include "core/mem.h"
#include "train/vq_code.h"
#include "train/vq_gpu.h"
}

/* ------------------------------------------------------------------------------------------ */
/* products and memory */

static unsigned nblocks(size_t n, unsigned per) { return (unsigned)((n + per - 1) / per); }

/* Row-major C (M, N) = alpha op(A) op(B) + beta C, op transposes when ta / tb (kst_sgemm's
 * convention), as the column-major C^T = op(B)^T op(A)^T. */
static cublasStatus_t gemm(cublasHandle_t h, int ta, int tb, int M, int N, int K, float alpha,
                           const float *A, int lda, const float *B, int ldb, float beta, float *C,
                           int ldc) {
    return cublasSgemm(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                       &alpha, B, ldb, A, lda, &beta, C, ldc);
}

/* gemm over `count` problems, operand i at A + i sA, B + i sB, C + i sC. */
static cublasStatus_t gemm_batched(cublasHandle_t h, int ta, int tb, int M, int N, int K,
                                   float alpha, const float *A, int lda, long long sA,
                                   const float *B, int ldb, long long sB, float beta, float *C,
                                   int ldc, long long sC, int count) {
    return cublasSgemmStridedBatched(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                     N, M, K, &alpha, B, ldb, sB, A, lda, sA, &beta, C, ldc, sC,
                                     count);
}

/* The encoder's and refit's bytes now and at most (they run one at a time). */
static size_t g_coder_now, g_coder_peak;

/* cudaMalloc counted into *now (and *peak). */
static int galloc(void *p, size_t bytes, const char *what, size_t *now, size_t *peak,
                  kst_error *err) {
    int rc = kst_gpu_alloc((void **)p, bytes, what, err);
    if (rc == KST_OK && now) {
        *now += bytes;
        if (peak && *now > *peak) *peak = *now;
    }
    return rc;
}

static int make_blas(cublasHandle_t *h, kst_error *err) {
    int rc = KST_OK;
    *h = NULL;
    CUBLAS_TRY(cublasCreate(h), "creating the cuBLAS handle");
    CUBLAS_TRY(cublasSetMathMode(*h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* kernels shared by training and coding */

/* R[u] = y[doc] - C[assign[doc]], doc = rows ? rows[u] : u. One thread per element. */
__global__ void residuals(float *R, const float *y, const float *C, const int32_t *assign,
                          const int32_t *rows, size_t U, int d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= U * (size_t)d) return;
    size_t u = e / d, i = e % d, doc = rows ? (size_t)rows[u] : u;
    R[e] = y[doc * d + i] - C[(size_t)assign[doc] * d + i];
}

/* BN[r] = sum_i a[r ds + i] b[r ds + i] (double, rounded to float) for rows r < nr. */
__global__ void row_dots(float *BN, const float *a, const float *b, size_t nr, int ds) {
    size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= nr) return;
    double s = 0;
    for (int i = 0; i < ds; i++) s += (double)a[r * ds + i] * b[r * ds + i];
    BN[r] = (float)s;
}

/* The arg-min over k of bn[k] - 2 S[u, k] (float, as the CPU forms it), ties to the lower k, one
 * warp per row u. Without cur (nearest codes): the minimum. With cur: kst_vq_encode's coordinate
 * step, the current code kept unless some k is strictly lower. The code goes to codes[u M + sm]
 * and its codeword to RHO[u, sm ds ..]; with D, D[u] = B_old - B_new (zero when kept) and
 * *changed counts the changes. */
__global__ void argmin_codes(uint8_t *codes, float *RHO, float *D, unsigned *changed,
                             const float *S, const float *bn, const float *cb, size_t U, int K,
                             int ds, int d, int M, int sm, int cur) {
    size_t u = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (u >= U) return;
    const float *su = S + u * K;
    float bv = FLT_MAX;
    int bk = K;
    for (int k = lane; k < K; k += 32) {
        float c = bn[k] - 2.0f * su[k];
        if (c < bv) bv = c, bk = k;
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int ok = __shfl_xor_sync(0xffffffffu, bk, o);
        if (ov < bv || (ov == bv && ok < bk)) bv = ov, bk = ok;
    }
    uint8_t *cu = codes + u * M + sm;
    int kc = *cu, kh = bk;
    if (cur) {
        float c0 = bn[kc] - 2.0f * su[kc];
        if (!(bv < c0)) kh = kc;
    } else if (bk >= K) {
        kh = 0; /* every score NaN: the CPU keeps k = 0 */
    }
    __syncwarp();
    for (int i = lane; i < ds; i += 32) {
        float nb = cb[(size_t)kh * ds + i];
        if (D) D[u * ds + i] = cb[(size_t)kc * ds + i] - nb;
        RHO[u * d + (size_t)sm * ds + i] = nb;
    }
    if (lane == 0) {
        if (cur && kh != kc) atomicAdd(changed, 1u);
        *cu = (uint8_t)kh;
    }
}

/* RHO[u, sm ds ..] = cb[sm][codes[u M + sm]] for every sub-quantizer (decode). */
__global__ void decode(float *RHO, const uint8_t *codes, const float *codebook, size_t U, int M,
                       int K, int ds) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t d = (size_t)M * ds;
    if (e >= U * d) return;
    size_t u = e / d, j = e % d, sm = j / ds, i = j % ds;
    RHO[e] = codebook[(sm * K + codes[u * M + sm]) * ds + i];
}

/* H[u] = G[u, sm ds .. sm ds + ds) (the copy the gemm adds RHO_m W_mm to). */
__global__ void take_block(float *H, const float *G, size_t U, int ds, int d, int sm) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= U * (size_t)ds) return;
    size_t u = e / ds, i = e % ds;
    H[e] = G[u * d + (size_t)sm * ds + i];
}

/* *acc += sum over elements of (R - RHO) G (e^T W e summed; float products, double sums). */
__global__ void weighted_sum(double *acc, const float *R, const float *RHO, const float *G,
                             size_t n) {
    __shared__ double part[256];
    double s = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += (double)((R[i] - RHO[i]) * G[i]);
    part[threadIdx.x] = s;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(acc, part[0]);
}

/* ------------------------------------------------------------------------------------------ */
/* training kernels */

/* assign[i] = argmax_j S[i, j], ties to the lower j (one warp per row). */
__global__ void argmax_rows(int32_t *assign, const float *S, size_t rows, int nl) {
    size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float *s = S + r * nl;
    float bv = -FLT_MAX;
    int bj = nl;
    for (int j = lane; j < nl; j += 32)
        if (s[j] > bv) bv = s[j], bj = j;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oj = __shfl_xor_sync(0xffffffffu, bj, o);
        if (ov > bv || (ov == bv && oj < bj)) bv = ov, bj = oj;
    }
    if (lane == 0) assign[r] = bj < nl ? bj : 0;
}

/* One warp per candidate j (query qof[j], document slot cslot[j]):
 *   s_ivf = q . C[a],  s_pq = s_ivf + q . RHO[slot]. */
__global__ void student_scores(float *s_ivf, float *s_pq, const float *q, const float *C,
                               const float *RHO, const int32_t *assign, const int32_t *uniq,
                               const int32_t *cslot, const int32_t *qof, size_t N, int d) {
    size_t j = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (j >= N) return;
    size_t u = (size_t)cslot[j];
    const float *qb = q + (size_t)qof[j] * d, *c = C + (size_t)assign[uniq[u]] * d,
                *rho = RHO + u * d;
    float a = 0, b = 0;
    for (int i = lane; i < d; i += 32) a += qb[i] * c[i], b += qb[i] * rho[i];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (lane == 0) s_ivf[j] = a, s_pq[j] = a + b;
}

/* Block reductions over 256 threads (the result in every thread). */
__device__ double block_sum(double v, double *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}
__device__ double block_max(double v, double *sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + w]);
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

/* One block per query b: the listwise cross-entropies of both students against the teacher
 * (vq.c's listwise_ce), loss[2 b], loss[2 b + 1]; the score gradients folded into the backward's
 * weights gc = (w_ivf g_ivf + w_pq g_pq) / B and gr = w_pq g_pq / B (floats as the CPU's). */
__global__ void listwise(double *loss, float *gc, float *gr, const float *t, const float *s_ivf,
                         const float *s_pq, const int32_t *off, double T, double w_ivf,
                         double w_pq, int B) {
    __shared__ double sh[256];
    int b = blockIdx.x;
    int j0 = off[b], n = off[b + 1] - off[b];
    double tmax = -DBL_MAX, m1 = -DBL_MAX, m2 = -DBL_MAX;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        tmax = fmax(tmax, (double)t[j0 + i]);
        m1 = fmax(m1, (double)s_ivf[j0 + i]);
        m2 = fmax(m2, (double)s_pq[j0 + i]);
    }
    tmax = block_max(tmax, sh), m1 = block_max(m1, sh), m2 = block_max(m2, sh);
    double zt = 0, z1 = 0, z2 = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        zt += exp((t[j0 + i] - tmax) / T);
        z1 += exp((s_ivf[j0 + i] - m1) / T);
        z2 += exp((s_pq[j0 + i] - m2) / T);
    }
    zt = block_sum(zt, sh), z1 = block_sum(z1, sh), z2 = block_sum(z2, sh);
    double l1 = log(z1), l2 = log(z2), a1 = 0, a2 = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int j = j0 + i;
        double p = exp((t[j] - tmax) / T) / zt;
        double q1 = (s_ivf[j] - m1) / T - l1, q2 = (s_pq[j] - m2) / T - l2;
        a1 -= p * q1, a2 -= p * q2;
        float g1 = (float)((exp(q1) - p) / T), g2 = (float)((exp(q2) - p) / T);
        gc[j] = (float)((w_ivf * g1 + w_pq * g2) / (double)B);
        gr[j] = (float)(w_pq * g2 / (double)B);
    }
    a1 = block_sum(a1, sh), a2 = block_sum(a2, sh);
    if (threadIdx.x == 0) loss[2 * b] = a1, loss[2 * b + 1] = a2;
}

/* dC[a_j] += gc_j q_b and V[slot_j] += gr_j q_b, one thread per (candidate, element). */
__global__ void scatter_q(float *dC, float *V, const float *gc, const float *gr, const float *q,
                          const int32_t *assign, const int32_t *uniq, const int32_t *cslot,
                          const int32_t *qof, size_t N, int d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N * (size_t)d) return;
    size_t j = e / d, i = e % d, u = (size_t)cslot[j];
    float qv = q[(size_t)qof[j] * d + i];
    atomicAdd(dC + (size_t)assign[uniq[u]] * d + i, gc[j] * qv);
    atomicAdd(V + u * d + i, gr[j] * qv);
}

/* The soft assignment of vq.c's backward, one warp per (sm, u): in P (M, U, K) the scores R_m B^T
 * become p = softmax_k(-(|r|^2 - 2 P + |B_k|^2) / tau), in VB (M, U, K) the products V_m B^T
 * become (2 / tau) p o (VB - p.VB) (the CPU's W, scaled for the gemms); the hard codeword gets
 * dB[sm, code] += V_m[u]. */
__global__ void soft_assign(float *P, float *VB, float *dB, const float *R, const float *V,
                            const float *BN, const float *tau, const uint8_t *codes, size_t U,
                            int K, int ds, int d, int M) {
    size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= U * (size_t)M) return;
    size_t sm = row / U, u = row % U;
    float *pu = P + row * K, *vb = VB + row * K;
    const float *r = R + u * d + sm * ds, *v = V + u * d + sm * ds, *bn = BN + sm * K;
    double t = tau[sm], rn = 0;
    for (int i = lane; i < ds; i += 32) rn += (double)r[i] * r[i];
    for (int o = 16; o > 0; o >>= 1) rn += __shfl_xor_sync(0xffffffffu, rn, o);
    double lmax = -DBL_MAX;
    for (int k = lane; k < K; k += 32) {
        float l = (float)(-(rn - 2.0 * pu[k] + bn[k]) / t);
        pu[k] = l;
        lmax = fmax(lmax, (double)l);
    }
    for (int o = 16; o > 0; o >>= 1) lmax = fmax(lmax, __shfl_xor_sync(0xffffffffu, lmax, o));
    double z = 0;
    for (int k = lane; k < K; k += 32) {
        double e = exp(pu[k] - lmax);
        pu[k] = (float)e;
        z += e;
    }
    for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
    double vs = 0;
    for (int k = lane; k < K; k += 32) {
        pu[k] = (float)(pu[k] / z);
        vs += (double)pu[k] * vb[k];
    }
    for (int o = 16; o > 0; o >>= 1) vs += __shfl_xor_sync(0xffffffffu, vs, o);
    float two_tau = (float)(2.0 / t);
    for (int k = lane; k < K; k += 32) vb[k] = two_tau * (float)(pu[k] * (vb[k] - vs));
    float *dh = dB + (sm * K + codes[u * M + sm]) * (size_t)ds;
    for (int i = lane; i < ds; i += 32) atomicAdd(dh + i, v[i]);
}

/* dB[sm, k] -= colsum_u(W'[sm, :, k]) B[sm, k], one thread per (sm, k). */
__global__ void colsum_term(float *dB, const float *Wp, const float *cb, size_t U, int K, int ds,
                            int M) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)M * K) return;
    size_t sm = e / K, k = e % K;
    const float *w = Wp + sm * U * K + k;
    double cs = 0;
    for (size_t u = 0; u < U; u++) cs += w[u * K];
    float c = (float)cs;
    for (int i = 0; i < ds; i++) dB[e * ds + i] -= c * cb[e * ds + i];
}

/* dC[a_u] -= DR[u] (r = y - C[a]). */
__global__ void residual_back(float *dC, const float *DR, const int32_t *assign,
                              const int32_t *uniq, size_t U, int d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= U * (size_t)d) return;
    size_t u = e / d, i = e % d;
    atomicAdd(dC + (size_t)assign[uniq[u]] * d + i, -DR[e]);
}

/* flag[r] = any g[r w ..] != 0 (one warp per row). */
__global__ void rows_touched(unsigned char *flag, const float *g, size_t rows, int w) {
    size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    int any = 0;
    for (int i = lane; i < w; i += 32) any |= g[r * w + i] != 0.0f;
    any = __any_sync(0xffffffffu, any);
    if (lane == 0) flag[r] = (unsigned char)any;
}

struct adam_args {
    float w1, beta2, w2, bc2_sqrt, eps, step_ivf, step_pq;
};

/* kst_adamw_update without weight decay, element i of [C | B]: the centroid rows (nC elements,
 * rows of w) move only when flag[row] (lazy), unless flag is NULL. */
__global__ void adam(float *p, float *m, float *v, const float *g, const unsigned char *flag,
                     size_t nC, size_t np, int w, adam_args a) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= np) return;
    if (i < nC && flag && !flag[i / w]) return;
    float gi = g[i];
    float mi = a.w1 < 0.5f ? m[i] + a.w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.0f - a.w1);
    float vi = v[i] * a.beta2 + a.w2 * gi * gi;
    float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
    float ss = i < nC ? a.step_ivf : a.step_pq;
    p[i] = p[i] + (-ss) * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

/* ------------------------------------------------------------------------------------------ */
/* the training context */

struct kst_vq_gpu {
    cublasHandle_t blas;
    size_t n, d, nlist, M, K, ds, np, nC, maxB, cap;
    float *y, *params, *grad, *mom, *vel, *best, *tau, *BN;
    int32_t *assign;
    unsigned char *flag;
    /* batch scratch (cap candidates / documents) */
    float *q, *teacher, *s_ivf, *s_pq, *gc, *gr, *R, *RHO, *V, *DR, *P, *VB, *S;
    int32_t *uniq, *cslot, *qof, *off;
    uint8_t *codes;
    double *loss;
    /* host */
    int32_t *slot, *huniq, *hcslot, *hqof, *hoff;
    double *hloss;
    size_t bytes;
};

void kst_vq_gpu_free(kst_vq_gpu *g) {
    if (!g) return;
    if (g->blas) cublasDestroy(g->blas);
    /* (P is S: not freed twice) */
    void *dev[] = {g->y, g->params, g->grad, g->mom, g->vel, g->best, g->tau, g->BN, g->assign,
                   g->flag, g->q, g->teacher, g->s_ivf, g->s_pq, g->gc, g->gr, g->R, g->RHO,
                   g->V, g->DR, g->VB, g->S, g->uniq, g->cslot, g->qof, g->off, g->codes,
                   g->loss};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++) cudaFree(dev[i]);
    kst_free(g->slot), kst_free(g->huniq), kst_free(g->hcslot), kst_free(g->hqof),
        kst_free(g->hoff), kst_free(g->hloss);
    kst_free(g);
}

#define ASSIGN_FLOATS ((size_t)1 << 26) /* the lists' score block: 256 MiB */

int kst_vq_gpu_create(const kst_vq_model *m, size_t n, const float *y, size_t max_batch,
                      size_t max_cand, kst_vq_gpu **out, kst_error *err) {
    *out = NULL;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    kst_vq_gpu *g = (kst_vq_gpu *)kst_calloc(1, sizeof *g, "GPU Distill-VQ", err);
    if (!g) return KST_ERR_NOMEM;
    size_t d = (size_t)m->d, cap = max_cand ? max_cand : 1, B = max_batch ? max_batch : 1;
    g->n = n, g->d = d, g->nlist = m->nlist, g->M = m->M, g->K = m->ksub, g->ds = m->dsub;
    g->np = m->nparams, g->nC = m->nlist * d, g->maxB = B, g->cap = cap;
    size_t MK = g->M * g->K, arows = ASSIGN_FLOATS / g->nlist;
    size_t sfl = cap * MK > (arows < n ? arows : n) * g->nlist ? cap * MK
                                                                 : (arows < n ? arows : n) * g->nlist;
    size_t *bt = &g->bytes;
    KST_TRY(make_blas(&g->blas, err));
    KST_TRY(galloc(&g->y, n * d * sizeof(float), "the documents", bt, NULL, err));
    KST_TRY(galloc(&g->params, g->np * sizeof(float), "the parameters", bt, NULL, err));
    KST_TRY(galloc(&g->grad, g->np * sizeof(float), "the gradients", bt, NULL, err));
    KST_TRY(galloc(&g->mom, g->np * sizeof(float), "Adam's moments", bt, NULL, err));
    KST_TRY(galloc(&g->vel, g->np * sizeof(float), "Adam's moments", bt, NULL, err));
    KST_TRY(galloc(&g->best, g->np * sizeof(float), "the kept parameters", bt, NULL, err));
    KST_TRY(galloc(&g->tau, g->M * sizeof(float), "temperatures", bt, NULL, err));
    KST_TRY(galloc(&g->BN, MK * sizeof(float), "codeword norms", bt, NULL, err));
    KST_TRY(galloc(&g->assign, n * sizeof(int32_t), "the lists", bt, NULL, err));
    KST_TRY(galloc(&g->flag, g->nlist, "row flags", bt, NULL, err));
    KST_TRY(galloc(&g->q, B * d * sizeof(float), "batch queries", bt, NULL, err));
    KST_TRY(galloc(&g->teacher, cap * sizeof(float), "teacher scores", bt, NULL, err));
    KST_TRY(galloc(&g->s_ivf, cap * sizeof(float), "scores", bt, NULL, err));
    KST_TRY(galloc(&g->s_pq, cap * sizeof(float), "scores", bt, NULL, err));
    KST_TRY(galloc(&g->gc, cap * sizeof(float), "score gradients", bt, NULL, err));
    KST_TRY(galloc(&g->gr, cap * sizeof(float), "score gradients", bt, NULL, err));
    KST_TRY(galloc(&g->R, cap * d * sizeof(float), "residuals", bt, NULL, err));
    KST_TRY(galloc(&g->RHO, cap * d * sizeof(float), "reconstructions", bt, NULL, err));
    KST_TRY(galloc(&g->V, cap * d * sizeof(float), "rho gradients", bt, NULL, err));
    KST_TRY(galloc(&g->DR, cap * d * sizeof(float), "residual gradients", bt, NULL, err));
    KST_TRY(galloc(&g->S, sfl * sizeof(float), "scores against codewords / lists", bt, NULL, err));
    KST_TRY(galloc(&g->VB, cap * MK * sizeof(float), "soft products", bt, NULL, err));
    KST_TRY(galloc(&g->uniq, cap * sizeof(int32_t), "batch documents", bt, NULL, err));
    KST_TRY(galloc(&g->cslot, cap * sizeof(int32_t), "candidate slots", bt, NULL, err));
    KST_TRY(galloc(&g->qof, cap * sizeof(int32_t), "candidate queries", bt, NULL, err));
    KST_TRY(galloc(&g->off, (B + 1) * sizeof(int32_t), "offsets", bt, NULL, err));
    KST_TRY(galloc(&g->codes, cap * g->M, "codes", bt, NULL, err));
    KST_TRY(galloc(&g->loss, 2 * B * sizeof(double), "losses", bt, NULL, err));
    g->P = g->S;
    g->slot = (int32_t *)kst_malloc(n, sizeof(int32_t), "doc slots", err);
    g->huniq = (int32_t *)kst_malloc(cap, sizeof(int32_t), "batch docs", err);
    g->hcslot = (int32_t *)kst_malloc(cap, sizeof(int32_t), "candidate slots", err);
    g->hqof = (int32_t *)kst_malloc(cap, sizeof(int32_t), "candidate queries", err);
    g->hoff = (int32_t *)kst_malloc(B + 1, sizeof(int32_t), "offsets", err);
    g->hloss = (double *)kst_malloc(2 * B, sizeof(double), "losses", err);
    if (!g->slot || !g->huniq || !g->hcslot || !g->hqof || !g->hoff || !g->hloss) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) g->slot[i] = -1;
    CU_TRY(cudaMemcpy(g->y, y, n * d * sizeof(float), cudaMemcpyHostToDevice), "uploading documents");
    CU_TRY(cudaMemcpy(g->params, m->params, g->np * sizeof(float), cudaMemcpyHostToDevice),
           "uploading parameters");
    CU_TRY(cudaMemcpy(g->best, m->params, g->np * sizeof(float), cudaMemcpyHostToDevice),
           "uploading parameters");
    CU_TRY(cudaMemcpy(g->tau, m->tau, g->M * sizeof(float), cudaMemcpyHostToDevice), "uploading tau");
    CU_TRY(cudaMemset(g->grad, 0, g->np * sizeof(float)), "clearing gradients");
    CU_TRY(cudaMemset(g->mom, 0, g->np * sizeof(float)), "clearing moments");
    CU_TRY(cudaMemset(g->vel, 0, g->np * sizeof(float)), "clearing moments");
done:
    if (rc != KST_OK) {
        kst_vq_gpu_free(g);
        return rc;
    }
    *out = g;
    return KST_OK;
}

size_t kst_vq_gpu_bytes(const kst_vq_gpu *g) { return g ? g->bytes : 0; }

int kst_vq_gpu_set_tau(kst_vq_gpu *g, const float *tau, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(g->tau, tau, g->M * sizeof(float), cudaMemcpyHostToDevice), "uploading tau");
done:
    return rc;
}

int kst_vq_gpu_get_params(kst_vq_gpu *g, float *params, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(params, g->params, g->np * sizeof(float), cudaMemcpyDeviceToHost),
           "downloading parameters");
done:
    return rc;
}

int kst_vq_gpu_get_grad(kst_vq_gpu *g, float *grad, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(grad, g->grad, g->np * sizeof(float), cudaMemcpyDeviceToHost),
           "downloading gradients");
done:
    return rc;
}

int kst_vq_gpu_keep(kst_vq_gpu *g, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(g->best, g->params, g->np * sizeof(float), cudaMemcpyDeviceToDevice),
           "keeping parameters");
done:
    return rc;
}

int kst_vq_gpu_restore(kst_vq_gpu *g, int reset_moments, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(g->params, g->best, g->np * sizeof(float), cudaMemcpyDeviceToDevice),
           "restoring parameters");
    if (reset_moments) {
        CU_TRY(cudaMemset(g->mom, 0, g->np * sizeof(float)), "clearing moments");
        CU_TRY(cudaMemset(g->vel, 0, g->np * sizeof(float)), "clearing moments");
    }
done:
    return rc;
}

int kst_vq_gpu_assign(kst_vq_gpu *g, int32_t *assign, kst_error *err) {
    int rc = KST_OK;
    size_t nl = g->nlist, d = g->d, rows = ASSIGN_FLOATS / nl;
    if (rows < 1) rows = 1;
    for (size_t i0 = 0; i0 < g->n; i0 += rows) {
        size_t b = g->n - i0 < rows ? g->n - i0 : rows;
        CUBLAS_TRY(gemm(g->blas, 0, 1, (int)b, (int)nl, (int)d, 1.0f, g->y + i0 * d, (int)d,
                        g->params, (int)d, 0.0f, g->S, (int)nl),
                   "list scores");
        argmax_rows<<<nblocks(b, 8), 256>>>(g->assign + i0, g->S, b, (int)nl);
        CU_LAUNCHED("list arg-max");
    }
    CU_TRY(cudaMemcpy(assign, g->assign, g->n * sizeof(int32_t), cudaMemcpyDeviceToHost),
           "downloading lists");
done:
    return rc;
}

int kst_vq_gpu_batch(kst_vq_gpu *g, size_t B, const float *q, const size_t *off,
                     const int64_t *cand, const float *teacher, double T, double w_ivf,
                     double w_pq, int backward, double *loss_ivf, double *loss_pq,
                     kst_error *err) {
    size_t d = g->d, N = off[B], M = g->M, K = g->K, ds = g->ds, U = 0;
    if (B > g->maxB || N > g->cap)
        return kst_fail(err, KST_ERR_INVALID, "Distill-VQ GPU: a batch of %zu queries and %zu "
                        "candidates exceeds the %zu and %zu it was sized for", B, N, g->maxB,
                        g->cap);
    for (size_t b = 0; b < B; b++)
        if (off[b + 1] <= off[b])
            return kst_fail(err, KST_ERR_INVALID, "Distill-VQ: query %zu has no candidates", b);
    int rc = KST_OK;
    for (size_t b = 0; b < B; b++) {
        g->hoff[b] = (int32_t)off[b];
        for (size_t j = off[b]; j < off[b + 1]; j++) {
            int64_t doc = cand[j];
            if (doc < 0 || (size_t)doc >= g->n) {
                rc = kst_fail(err, KST_ERR_INVALID, "Distill-VQ: candidate %lld out of range "
                              "(%zu docs)", (long long)doc, g->n);
                goto done;
            }
            if (g->slot[doc] < 0) g->slot[doc] = (int32_t)U, g->huniq[U++] = (int32_t)doc;
            g->hcslot[j] = g->slot[doc];
            g->hqof[j] = (int32_t)b;
        }
    }
    g->hoff[B] = (int32_t)N;
    CU_TRY(cudaMemcpy(g->q, q, B * d * sizeof(float), cudaMemcpyHostToDevice), "batch upload");
    CU_TRY(cudaMemcpy(g->teacher, teacher, N * sizeof(float), cudaMemcpyHostToDevice), "batch upload");
    CU_TRY(cudaMemcpy(g->uniq, g->huniq, U * sizeof(int32_t), cudaMemcpyHostToDevice), "batch upload");
    CU_TRY(cudaMemcpy(g->cslot, g->hcslot, N * sizeof(int32_t), cudaMemcpyHostToDevice), "batch upload");
    CU_TRY(cudaMemcpy(g->qof, g->hqof, N * sizeof(int32_t), cudaMemcpyHostToDevice), "batch upload");
    CU_TRY(cudaMemcpy(g->off, g->hoff, (B + 1) * sizeof(int32_t), cudaMemcpyHostToDevice), "batch upload");
    {
        const float *C = g->params, *cbk = g->params + g->nC;
        float *dC = g->grad, *dB = g->grad + g->nC;
        residuals<<<nblocks(U * d, 256), 256>>>(g->R, g->y, C, g->assign, g->uniq, U, (int)d);
        CU_LAUNCHED("residuals");
        row_dots<<<nblocks(M * K, 256), 256>>>(g->BN, cbk, cbk, M * K, (int)ds);
        CU_LAUNCHED("codeword norms");
        /* S (M, U, K): R_m B_m^T for every sub-quantizer; the hard codes; later P. */
        CUBLAS_TRY(gemm_batched(g->blas, 0, 1, (int)U, (int)K, (int)ds, 1.0f, g->R, (int)d,
                                (long long)ds, cbk, (int)ds, (long long)(K * ds), 0.0f, g->S,
                                (int)K, (long long)(U * K), (int)M),
                   "codeword scores");
        for (size_t sm = 0; sm < M; sm++) {
            argmin_codes<<<nblocks(U, 8), 256>>>(g->codes, g->RHO, NULL, NULL, g->S + sm * U * K,
                                                 g->BN + sm * K, cbk + sm * K * ds, U, (int)K,
                                                 (int)ds, (int)d, (int)M, (int)sm, 0);
            CU_LAUNCHED("hard codes");
        }
        student_scores<<<nblocks(N, 8), 256>>>(g->s_ivf, g->s_pq, g->q, C, g->RHO, g->assign,
                                               g->uniq, g->cslot, g->qof, N, (int)d);
        CU_LAUNCHED("student scores");
        listwise<<<(unsigned)B, 256>>>(g->loss, g->gc, g->gr, g->teacher, g->s_ivf, g->s_pq,
                                       g->off, T, w_ivf, w_pq, (int)B);
        CU_LAUNCHED("listwise loss");
        if (backward) {
            CU_TRY(cudaMemset(g->V, 0, U * d * sizeof(float)), "clearing");
            scatter_q<<<nblocks(N * d, 256), 256>>>(dC, g->V, g->gc, g->gr, g->q, g->assign,
                                                    g->uniq, g->cslot, g->qof, N, (int)d);
            CU_LAUNCHED("score backward");
            CUBLAS_TRY(gemm_batched(g->blas, 0, 1, (int)U, (int)K, (int)ds, 1.0f, g->V, (int)d,
                                    (long long)ds, cbk, (int)ds, (long long)(K * ds), 0.0f, g->VB,
                                    (int)K, (long long)(U * K), (int)M),
                       "soft products");
            soft_assign<<<nblocks(U * M, 8), 256>>>(g->P, g->VB, dB, g->R, g->V, g->BN, g->tau,
                                                    g->codes, U, (int)K, (int)ds, (int)d, (int)M);
            CU_LAUNCHED("soft assignment");
            /* dB_m += P^T V_m + W'^T R_m; dB_m -= colsum(W') o B_m; DR_m = W' B_m */
            CUBLAS_TRY(gemm_batched(g->blas, 1, 0, (int)K, (int)ds, (int)U, 1.0f, g->P, (int)K,
                                    (long long)(U * K), g->V, (int)d, (long long)ds, 1.0f, dB,
                                    (int)ds, (long long)(K * ds), (int)M),
                       "codebook gradient");
            CUBLAS_TRY(gemm_batched(g->blas, 1, 0, (int)K, (int)ds, (int)U, 1.0f, g->VB, (int)K,
                                    (long long)(U * K), g->R, (int)d, (long long)ds, 1.0f, dB,
                                    (int)ds, (long long)(K * ds), (int)M),
                       "codebook gradient");
            colsum_term<<<nblocks(M * K, 128), 128>>>(dB, g->VB, cbk, U, (int)K, (int)ds, (int)M);
            CU_LAUNCHED("codebook gradient");
            CUBLAS_TRY(gemm_batched(g->blas, 0, 0, (int)U, (int)ds, (int)K, 1.0f, g->VB, (int)K,
                                    (long long)(U * K), cbk, (int)ds, (long long)(K * ds), 0.0f,
                                    g->DR, (int)d, (long long)ds, (int)M),
                       "residual gradient");
            residual_back<<<nblocks(U * d, 256), 256>>>(dC, g->DR, g->assign, g->uniq, U, (int)d);
            CU_LAUNCHED("residual gradient");
        }
    }
    CU_TRY(cudaMemcpy(g->hloss, g->loss, 2 * B * sizeof(double), cudaMemcpyDeviceToHost),
           "downloading losses");
    {
        double li = 0, lp = 0;
        for (size_t b = 0; b < B; b++) li += g->hloss[2 * b], lp += g->hloss[2 * b + 1];
        if (loss_ivf) *loss_ivf = li / (double)B;
        if (loss_pq) *loss_pq = lp / (double)B;
    }
done:
    for (size_t u = 0; u < U; u++) g->slot[g->huniq[u]] = -1;
    return rc;
}

int kst_vq_gpu_adam(kst_vq_gpu *g, int dense, long step, double lr_ivf, double lr_pq,
                    const kst_adamw_config *ac, kst_error *err) {
    int rc = KST_OK;
    adam_args a;
    double b1 = ac->beta1, b2 = ac->beta2;
    a.w1 = (float)(1.0 - b1);
    a.beta2 = (float)b2, a.w2 = (float)(1.0 - b2);
    double bc1 = 1.0 - pow(b1, (double)step), bc2 = 1.0 - pow(b2, (double)step);
    a.step_ivf = (float)(lr_ivf / bc1), a.step_pq = (float)(lr_pq / bc1);
    a.bc2_sqrt = (float)sqrt(bc2);
    a.eps = (float)ac->eps;
    if (!dense) {
        rows_touched<<<nblocks(g->nlist, 8), 256>>>(g->flag, g->grad, g->nlist, (int)g->d);
        CU_LAUNCHED("lazy Adam rows");
    }
    adam<<<nblocks(g->np, 256), 256>>>(g->params, g->mom, g->vel, g->grad, dense ? NULL : g->flag,
                                       g->nC, g->np, (int)g->d, a);
    CU_LAUNCHED("Adam");
    CU_TRY(cudaMemset(g->grad, 0, g->np * sizeof(float)), "clearing gradients");
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* query-weighted codes and refits */

/* The model's tensors on the GPU for the coder: centroids, codebooks, W (the identity when the
 * model has none: the products are then exact copies, as the CPU's W-less path). */
typedef struct coder {
    cublasHandle_t blas;
    float *C, *cb, *W, *BN, *BNW, *tmp;
    size_t bytes;
} coder;

static void coder_free(coder *c) {
    if (c->blas) cublasDestroy(c->blas);
    cudaFree(c->C), cudaFree(c->cb), cudaFree(c->W), cudaFree(c->BN), cudaFree(c->BNW),
        cudaFree(c->tmp);
    g_coder_now -= c->bytes;
    memset(c, 0, sizeof *c);
}

static int coder_init(coder *c, const kst_vq_model *m, kst_error *err) {
    memset(c, 0, sizeof *c);
    size_t d = (size_t)m->d, M = m->M, K = m->ksub, ds = m->dsub;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    float *Wh = NULL;
    size_t *bt = &c->bytes;
    size_t before = g_coder_now;
    KST_TRY(make_blas(&c->blas, err));
    KST_TRY(galloc(&c->C, m->nlist * d * sizeof(float), "centroids", bt, NULL, err));
    KST_TRY(galloc(&c->cb, M * K * ds * sizeof(float), "codebooks", bt, NULL, err));
    KST_TRY(galloc(&c->W, d * d * sizeof(float), "score metric", bt, NULL, err));
    KST_TRY(galloc(&c->BN, M * K * sizeof(float), "codeword norms", bt, NULL, err));
    KST_TRY(galloc(&c->BNW, M * K * sizeof(float), "codeword norms", bt, NULL, err));
    KST_TRY(galloc(&c->tmp, M * K * ds * sizeof(float), "codeword products", bt, NULL, err));
    CU_TRY(cudaMemcpy(c->C, m->centroids, m->nlist * d * sizeof(float), cudaMemcpyHostToDevice),
           "uploading centroids");
    CU_TRY(cudaMemcpy(c->cb, m->codebook, M * K * ds * sizeof(float), cudaMemcpyHostToDevice),
           "uploading codebooks");
    if (m->wq) {
        CU_TRY(cudaMemcpy(c->W, m->wq, d * d * sizeof(float), cudaMemcpyHostToDevice),
               "uploading the score metric");
    } else {
        Wh = (float *)kst_calloc(d * d, sizeof(float), "identity", err);
        if (!Wh) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        for (size_t i = 0; i < d; i++) Wh[i * d + i] = 1.0f;
        CU_TRY(cudaMemcpy(c->W, Wh, d * d * sizeof(float), cudaMemcpyHostToDevice),
               "uploading the identity");
    }
done:
    kst_free(Wh);
    g_coder_now = before + c->bytes;
    if (g_coder_now > g_coder_peak) g_coder_peak = g_coder_now;
    if (rc != KST_OK) coder_free(c);
    return rc;
}

/* BN = |B_mk|^2 and BNW = B_mk^T W_mm B_mk (the gemm tmp = B_m W_mm, batched over m). */
static int coder_norms(coder *c, const kst_vq_model *m, kst_error *err) {
    size_t d = (size_t)m->d, M = m->M, K = m->ksub, ds = m->dsub;
    int rc = KST_OK;
    row_dots<<<nblocks(M * K, 256), 256>>>(c->BN, c->cb, c->cb, M * K, (int)ds);
    CU_LAUNCHED("codeword norms");
    CUBLAS_TRY(gemm_batched(c->blas, 0, 0, (int)K, (int)ds, (int)ds, 1.0f, c->cb, (int)ds,
                            (long long)(K * ds), c->W, (int)d, (long long)(ds * d + ds), 0.0f,
                            c->tmp, (int)ds, (long long)(K * ds), (int)M),
               "weighted codeword products");
    row_dots<<<nblocks(M * K, 256), 256>>>(c->BNW, c->tmp, c->cb, M * K, (int)ds);
    CU_LAUNCHED("weighted codeword norms");
done:
    return rc;
}

/* Per block of documents: R, RHO, G (nb, d), H, D (nb, ds), S (nb, K), lists, codes. */
typedef struct cblk {
    float *y, *R, *RHO, *G, *H, *D, *S;
    int32_t *as;
    uint8_t *codes;
    unsigned *changed;
    double *acc;
    size_t bytes;
} cblk;

static void cblk_free(cblk *b) {
    cudaFree(b->y), cudaFree(b->R), cudaFree(b->RHO), cudaFree(b->G), cudaFree(b->H),
        cudaFree(b->D), cudaFree(b->S), cudaFree(b->as), cudaFree(b->codes), cudaFree(b->changed),
        cudaFree(b->acc);
    g_coder_now -= b->bytes;
    memset(b, 0, sizeof *b);
}

static int cblk_alloc(cblk *b, const kst_vq_model *m, size_t nb, size_t acc_elems,
                      kst_error *err) {
    memset(b, 0, sizeof *b);
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    size_t *bt = &b->bytes, before = g_coder_now;
    int rc = KST_OK;
    KST_TRY(galloc(&b->y, nb * d * sizeof(float), "documents", bt, NULL, err));
    KST_TRY(galloc(&b->R, nb * d * sizeof(float), "residuals", bt, NULL, err));
    KST_TRY(galloc(&b->RHO, nb * d * sizeof(float), "reconstructions", bt, NULL, err));
    KST_TRY(galloc(&b->G, nb * d * sizeof(float), "weighted errors", bt, NULL, err));
    KST_TRY(galloc(&b->H, nb * ds * sizeof(float), "targets", bt, NULL, err));
    KST_TRY(galloc(&b->D, nb * ds * sizeof(float), "changes", bt, NULL, err));
    KST_TRY(galloc(&b->S, nb * K * sizeof(float), "codeword scores", bt, NULL, err));
    KST_TRY(galloc(&b->as, nb * sizeof(int32_t), "lists", bt, NULL, err));
    KST_TRY(galloc(&b->codes, nb * m->M, "codes", bt, NULL, err));
    KST_TRY(galloc(&b->changed, sizeof(unsigned), "change count", bt, NULL, err));
    KST_TRY(galloc(&b->acc, (acc_elems + 1) * sizeof(double), "sums", bt, NULL, err));
done:
    g_coder_now = before + b->bytes;
    if (g_coder_now > g_coder_peak) g_coder_peak = g_coder_now;
    if (rc != KST_OK) cblk_free(b);
    return rc;
}

/* Uploads nb documents with their lists (and codes when given); R = y - C[a]. */
static int cblk_start(cblk *b, const coder *c, const kst_vq_model *m, size_t nb, const float *y,
                      const int32_t *assign, const uint8_t *codes, kst_error *err) {
    size_t d = (size_t)m->d;
    int rc = KST_OK;
    CU_TRY(cudaMemcpy(b->y, y, nb * d * sizeof(float), cudaMemcpyHostToDevice), "uploading documents");
    CU_TRY(cudaMemcpy(b->as, assign, nb * sizeof(int32_t), cudaMemcpyHostToDevice), "uploading lists");
    if (codes)
        CU_TRY(cudaMemcpy(b->codes, codes, nb * m->M, cudaMemcpyHostToDevice), "uploading codes");
    residuals<<<nblocks(nb * d, 256), 256>>>(b->R, b->y, c->C, b->as, NULL, nb, (int)d);
    CU_LAUNCHED("residuals");
done:
    return rc;
}

/* G = R W - RHO W (vq_code.c's block_g). */
static int cblk_g(cblk *b, const coder *c, size_t nb, int d, kst_error *err) {
    int rc = KST_OK;
    CUBLAS_TRY(gemm(c->blas, 0, 0, (int)nb, d, d, 1.0f, b->R, d, c->W, d, 0.0f, b->G, d), "R W");
    CUBLAS_TRY(gemm(c->blas, 0, 0, (int)nb, d, d, -1.0f, b->RHO, d, c->W, d, 1.0f, b->G, d),
               "RHO W");
done:
    return rc;
}

/* H = G_m + RHO_m W_mm (block_h). */
static int cblk_h(cblk *b, const coder *c, size_t nb, size_t sm, int d, int ds, kst_error *err) {
    int rc = KST_OK;
    take_block<<<nblocks(nb * ds, 256), 256>>>(b->H, b->G, nb, ds, d, (int)sm);
    CU_LAUNCHED("targets");
    CUBLAS_TRY(gemm(c->blas, 0, 0, (int)nb, ds, ds, 1.0f, b->RHO + sm * ds, d,
                    c->W + sm * ds * d + sm * ds, d, 1.0f, b->H, ds),
               "targets");
done:
    return rc;
}

/* Mean e^T W e of the block's nb documents (G current). */
static int cblk_werr(cblk *b, size_t nb, int d, double *out, kst_error *err) {
    int rc = KST_OK;
    double s = 0;
    CU_TRY(cudaMemset(b->acc, 0, sizeof(double)), "clearing");
    weighted_sum<<<256, 256>>>(b->acc, b->R, b->RHO, b->G, nb * d);
    CU_LAUNCHED("weighted error");
    CU_TRY(cudaMemcpy(&s, b->acc, sizeof(double), cudaMemcpyDeviceToHost), "weighted error");
    *out = s;
done:
    return rc;
}

#define GPU_CODE_BLOCK 65536

int kst_vq_gpu_encode(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                      uint8_t *codes, long *rounds, kst_error *err) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub, M = m->M;
    if (rounds) *rounds = 0;
    if (n == 0) return KST_OK;
    coder c;
    cblk b;
    memset(&b, 0, sizeof b);
    int rc = coder_init(&c, m, err);
    if (rc != KST_OK) return rc;
    size_t bs = n < GPU_CODE_BLOCK ? n : GPU_CODE_BLOCK;
    int weighted = m->wq && m->wq_iters > 0;
    KST_TRY(coder_norms(&c, m, err));
    KST_TRY(cblk_alloc(&b, m, bs, 0, err));
    for (size_t i0 = 0; i0 < n; i0 += bs) {
        size_t nb = n - i0 < bs ? n - i0 : bs;
        KST_TRY(cblk_start(&b, &c, m, nb, y + i0 * d, assign + i0, NULL, err));
        for (size_t sm = 0; sm < M; sm++) {
            CUBLAS_TRY(gemm(c.blas, 0, 1, (int)nb, (int)K, (int)ds, 1.0f, b.R + sm * ds, (int)d,
                            c.cb + sm * K * ds, (int)ds, 0.0f, b.S, (int)K),
                       "nearest codes");
            argmin_codes<<<nblocks(nb, 8), 256>>>(b.codes, b.RHO, NULL, NULL, b.S, c.BN + sm * K,
                                                  c.cb + sm * K * ds, nb, (int)K, (int)ds, (int)d,
                                                  (int)M, (int)sm, 0);
            CU_LAUNCHED("nearest codes");
        }
        if (weighted) {
            KST_TRY(cblk_g(&b, &c, nb, (int)d, err));
            long it;
            for (it = 0; it < m->wq_iters; it++) {
                CU_TRY(cudaMemset(b.changed, 0, sizeof(unsigned)), "clearing");
                for (size_t sm = 0; sm < M; sm++) {
                    KST_TRY(cblk_h(&b, &c, nb, sm, (int)d, (int)ds, err));
                    CUBLAS_TRY(gemm(c.blas, 0, 1, (int)nb, (int)K, (int)ds, 1.0f, b.H, (int)ds,
                                    c.cb + sm * K * ds, (int)ds, 0.0f, b.S, (int)K),
                               "coordinate step");
                    argmin_codes<<<nblocks(nb, 8), 256>>>(b.codes, b.RHO, b.D, b.changed, b.S,
                                                          c.BNW + sm * K, c.cb + sm * K * ds, nb,
                                                          (int)K, (int)ds, (int)d, (int)M, (int)sm,
                                                          1);
                    CU_LAUNCHED("coordinate step");
                    /* G += D W[sm rows] (zero rows of D change nothing) */
                    CUBLAS_TRY(gemm(c.blas, 0, 0, (int)nb, (int)d, (int)ds, 1.0f, b.D, (int)ds,
                                    c.W + sm * ds * d, (int)d, 1.0f, b.G, (int)d),
                               "weighted error update");
                }
                unsigned ch = 0;
                CU_TRY(cudaMemcpy(&ch, b.changed, sizeof ch, cudaMemcpyDeviceToHost), "changes");
                if (!ch) break;
            }
            if (rounds && it > *rounds) *rounds = it;
        }
        CU_TRY(cudaMemcpy(codes + i0 * M, b.codes, nb * M, cudaMemcpyDeviceToHost),
               "downloading codes");
    }
done:
    cblk_free(&b);
    coder_free(&c);
    return rc;
}

/* acc[k, i] += H[u, i] and cnt[k] += 1 for k = codes[u M + sm] (double sums; counts in the slot
 * after the sums: acc[K ds + k]). */
__global__ void code_sums(double *acc, const float *H, const uint8_t *codes, size_t U, int M,
                          int sm, int K, int ds) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= U * (size_t)ds) return;
    size_t u = e / ds, i = e % ds, k = codes[u * M + sm];
    atomicAdd(acc + k * ds + i, (double)H[e]);
    if (i == 0) atomicAdd(acc + (size_t)K * ds + k, 1.0);
}

/* D[u] = old[code] - new[code], RHO_m[u] = new[code]. */
__global__ void refit_move(float *D, float *RHO, const float *oldb, const float *newb,
                          const uint8_t *codes, size_t U, int M, int sm, int ds, int d) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= U * (size_t)ds) return;
    size_t u = e / ds, i = e % ds, k = codes[u * M + sm];
    float nb = newb[k * ds + i];
    D[e] = oldb[k * ds + i] - nb;
    RHO[u * d + (size_t)sm * ds + i] = nb;
}

int kst_vq_gpu_refit(kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                     const uint8_t *codes, double *obj_before, double *obj_after, kst_error *err) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub, M = m->M;
    if (n == 0) {
        if (obj_before) *obj_before = 0;
        if (obj_after) *obj_after = 0;
        return KST_OK;
    }
    coder c;
    cblk b;
    memset(&b, 0, sizeof b);
    int rc = coder_init(&c, m, err);
    if (rc != KST_OK) return rc;
    double *acc = (double *)kst_malloc(K * ds + K, sizeof(double), "refit sums", err);
    size_t *cnt = (size_t *)kst_malloc(K, sizeof(size_t), "refit counts", err);
    float *newb = (float *)kst_malloc(K * ds, sizeof(float), "refit codewords", err);
    float *dnew = NULL;
    if (!acc || !cnt || !newb) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(galloc(&dnew, K * ds * sizeof(float), "refit codewords", &c.bytes, NULL, err));
    g_coder_now += K * ds * sizeof(float);
    KST_TRY(cblk_alloc(&b, m, n, K * ds + K, err));
    KST_TRY(cblk_start(&b, &c, m, n, y, assign, codes, err));
    decode<<<nblocks(n * d, 256), 256>>>(b.RHO, b.codes, c.cb, n, (int)M, (int)K, (int)ds);
    CU_LAUNCHED("decode");
    KST_TRY(cblk_g(&b, &c, n, (int)d, err));
    if (obj_before) {
        KST_TRY(cblk_werr(&b, n, (int)d, obj_before, err));
        *obj_before /= (double)n;
    }
    for (size_t sm = 0; sm < M; sm++) {
        float *cbd = c.cb + sm * K * ds;
        KST_TRY(cblk_h(&b, &c, n, sm, (int)d, (int)ds, err));
        CU_TRY(cudaMemset(b.acc, 0, (K * ds + K) * sizeof(double)), "clearing");
        code_sums<<<nblocks(n * ds, 256), 256>>>(b.acc, b.H, b.codes, n, (int)M, (int)sm, (int)K,
                                                 (int)ds);
        CU_LAUNCHED("refit sums");
        CU_TRY(cudaMemcpy(acc, b.acc, (K * ds + K) * sizeof(double), cudaMemcpyDeviceToHost),
               "refit sums");
        for (size_t k = 0; k < K; k++) cnt[k] = (size_t)acc[K * ds + k];
        KST_TRY(kst_vq_refit_solve(m, sm, acc, cnt, newb, err));
        CU_TRY(cudaMemcpy(dnew, newb, K * ds * sizeof(float), cudaMemcpyHostToDevice), "codewords");
        refit_move<<<nblocks(n * ds, 256), 256>>>(b.D, b.RHO, cbd, dnew, b.codes, n, (int)M,
                                                  (int)sm, (int)ds, (int)d);
        CU_LAUNCHED("refit move");
        CUBLAS_TRY(gemm(c.blas, 0, 0, (int)n, (int)d, (int)ds, 1.0f, b.D, (int)ds,
                        c.W + sm * ds * d, (int)d, 1.0f, b.G, (int)d),
                   "weighted error update");
        CU_TRY(cudaMemcpy(cbd, dnew, K * ds * sizeof(float), cudaMemcpyDeviceToDevice), "codewords");
        memcpy(m->codebook + sm * K * ds, newb, K * ds * sizeof(float));
    }
    if (obj_after) {
        KST_TRY(cblk_werr(&b, n, (int)d, obj_after, err));
        *obj_after /= (double)n;
    }
done:
    cudaFree(dnew);
    kst_free(acc), kst_free(cnt), kst_free(newb);
    cblk_free(&b);
    coder_free(&c);
    return rc;
}

extern "C" size_t kst_vq_gpu_coder_peak_bytes(void) { return g_coder_peak; }
