/* scores_gpu.cu - student scores for the GPU training step: ColBERT MaxSim and dense in-batch
 * dot products, forward and backward, and Margin-MSE with the in-batch cross-entropy
 * (train/scores_gpu.h). */
#include "core/gpu_util.cuh"

#include <math.h>

extern "C" {
#include "train/scores_gpu.h"
}

static unsigned nblk(size_t n, unsigned per) { return (unsigned)((n + per - 1) / per); }

/* ------------------------------------------------------------------------------------------ */
/* ColBERT MaxSim */

#define MS_ROWS 32    /* query tokens per tile */
#define MS_COLS 32    /* passage tokens per chunk */
#define MS_THREADS 128 /* 4 threads per query row, 8 passage tokens each per chunk */

static size_t maxsim_smem(size_t D) {
    return (size_t)(MS_ROWS + MS_COLS) * (D + 1) * sizeof(float) + MS_COLS + MS_ROWS * (sizeof(float) + sizeof(int));
}

/* One block per (query b, column c). Query tiles of 32 tokens against passage chunks of 32 in
 * shared memory (rows padded to D + 1 floats: no bank conflicts); thread (i = tid / 4, sub)
 * keeps the best of passage tokens sub, sub + 4, ... in increasing order (strict >: the first of
 * equal maxima), the four threads of a row reduce (ties to the smaller j), and thread 0 adds
 * the rows' maxima in query order, as the CPU's loop does. */
__global__ void __launch_bounds__(MS_THREADS) maxsim_fwd(float *S, int *argmax, const float *q, const float *d,
                                                         const int *qlen, const unsigned char *keep, int n, int Tq,
                                                         int Tp, int D, int W, int all) {
    extern __shared__ float msm[];
    const int c = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, i = tid >> 2, sub = tid & 3, LD = D + 1;
    const size_t p = all ? (size_t)c : (size_t)b * n + c;
    float *Qs = msm, *Ps = msm + MS_ROWS * LD;
    unsigned char *kp = (unsigned char *)(Ps + MS_COLS * LD);
    float *rb = (float *)(kp + MS_COLS);
    int *rj = (int *)(rb + MS_ROWS);
    int nq = qlen[b];
    if (nq > Tq) nq = Tq;
    if (nq < 0) nq = 0;
    int *am = argmax + ((size_t)b * W + c) * Tq;
    for (int r = nq + tid; r < Tq; r += MS_THREADS) am[r] = -1;
    float total = 0.0f;
    const float *qb = q + (size_t)b * Tq * D, *dp = d + p * Tp * D;
    const unsigned char *kb = keep + p * Tp;
    for (int q0 = 0; q0 < nq; q0 += MS_ROWS) {
        __syncthreads(); /* the previous tile's rb / rj are read */
        for (int e = tid; e < MS_ROWS * D; e += MS_THREADS) {
            int r = e / D, k = e % D;
            Qs[r * LD + k] = q0 + r < nq ? qb[(size_t)(q0 + r) * D + k] : 0.0f;
        }
        float bv = -INFINITY;
        int bj = -1;
        for (int p0 = 0; p0 < Tp; p0 += MS_COLS) {
            __syncthreads(); /* the previous chunk is used up (and Qs is written) */
            for (int e = tid; e < MS_COLS * D; e += MS_THREADS) {
                int r = e / D, k = e % D;
                Ps[r * LD + k] = p0 + r < Tp ? dp[(size_t)(p0 + r) * D + k] : 0.0f;
            }
            if (tid < MS_COLS) kp[tid] = p0 + tid < Tp ? kb[p0 + tid] : 0;
            __syncthreads();
            const float *qr = Qs + i * LD;
#pragma unroll
            for (int m = 0; m < MS_COLS / 4; m++) {
                const int jj = sub + 4 * m;
                if (!kp[jj]) continue;
                const float *pr = Ps + jj * LD;
                float s = 0.0f;
                for (int k = 0; k < D; k++) s += qr[k] * pr[k];
                if (bj < 0 || s > bv) bv = s, bj = p0 + jj;
            }
        }
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oj = __shfl_xor_sync(0xffffffffu, bj, o);
            if (oj >= 0 && (bj < 0 || ov > bv || (ov == bv && oj < bj))) bv = ov, bj = oj;
        }
        if (sub == 0) {
            rb[i] = bv;
            rj[i] = bj;
            if (q0 + i < nq) am[q0 + i] = bj;
        }
        __syncthreads();
        if (tid == 0)
            for (int r = 0; r < MS_ROWS && q0 + r < nq; r++)
                if (rj[r] >= 0) total += rb[r];
    }
    if (tid == 0) S[(size_t)b * W + c] = total;
}

/* dq[b, i, k] = sum_c dS[b, c] d[p(c), argmax[b, c, i], k]; one thread per (b, i, k). */
__global__ void maxsim_dq(float *dq, const float *dS, const int *argmax, const float *d, int B, int n, int Tq, int Tp,
                          int D, int W, int all) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)B * Tq * D) return;
    int k = (int)(e % D), i = (int)((e / D) % Tq), b = (int)(e / ((size_t)D * Tq));
    float acc = 0.0f;
    for (int c = 0; c < W; c++) {
        float w = dS[(size_t)b * W + c];
        if (w == 0.0f) continue;
        int j = argmax[((size_t)b * W + c) * Tq + i];
        if (j < 0) continue;
        size_t p = all ? (size_t)c : (size_t)b * n + c;
        acc += w * d[(p * Tp + j) * D + k];
    }
    dq[e] = acc;
}

/* dd[p, j, k] = sum over the queries b scoring p and their tokens i choosing j of dS[b, c]
 * q[b, i, k]; one thread per (p, k) owns column k of all of p's tokens (no races). */
__global__ void maxsim_dd(float *dd, const float *dS, const int *argmax, const float *q, const int *qlen, int B, int n,
                          int Tq, int Tp, int D, int W, int all) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)B * n * D) return;
    int k = (int)(e % D);
    size_t p = e / D;
    float *out = dd + p * Tp * D + k;
    for (int j = 0; j < Tp; j++) out[(size_t)j * D] = 0.0f;
    int b0 = all ? 0 : (int)(p / n), b1 = all ? B : b0 + 1;
    for (int b = b0; b < b1; b++) {
        int c = all ? (int)p : (int)(p % n);
        float w = dS[(size_t)b * W + c];
        if (w == 0.0f) continue;
        int nq = qlen[b] < Tq ? qlen[b] : Tq;
        const int *am = argmax + ((size_t)b * W + c) * Tq;
        const float *qb = q + (size_t)b * Tq * D + k;
        for (int i = 0; i < nq; i++) {
            int j = am[i];
            if (j >= 0) out[(size_t)j * D] += w * qb[(size_t)i * D];
        }
    }
}

extern "C" int kst_gpu_maxsim_forward(float *S, int *argmax, const float *q, const float *d, const int *qlen,
                                      const unsigned char *keep, size_t B, size_t n, size_t Tq, size_t Tp, size_t D,
                                      int all, void *stream, kst_error *err) {
    int rc = KST_OK;
    size_t W = all ? B * n : n, smem = maxsim_smem(D);
    if (smem > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(maxsim_fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
               "MaxSim shared memory");
    maxsim_fwd<<<dim3((unsigned)W, (unsigned)B), MS_THREADS, smem, (cudaStream_t)stream>>>(
        S, argmax, q, d, qlen, keep, (int)n, (int)Tq, (int)Tp, (int)D, (int)W, all);
    CU_LAUNCHED("MaxSim");
done:
    return rc;
}

extern "C" int kst_gpu_maxsim_backward(float *dq, float *dd, const float *dS, const int *argmax, const float *q,
                                       const float *d, const int *qlen, size_t B, size_t n, size_t Tq, size_t Tp,
                                       size_t D, int all, void *stream, kst_error *err) {
    int rc = KST_OK;
    size_t W = all ? B * n : n;
    cudaStream_t st = (cudaStream_t)stream;
    maxsim_dq<<<nblk(B * Tq * D, 256), 256, 0, st>>>(dq, dS, argmax, d, (int)B, (int)n, (int)Tq, (int)Tp, (int)D,
                                                       (int)W, all);
    CU_LAUNCHED("MaxSim backward (queries)");
    maxsim_dd<<<nblk(B * n * D, 256), 256, 0, st>>>(dd, dS, argmax, q, qlen, (int)B, (int)n, (int)Tq, (int)Tp, (int)D,
                                                      (int)W, all);
    CU_LAUNCHED("MaxSim backward (passages)");
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* dense, all pairs */

/* One warp per (b, c): S[b, c] = q[b] . p[c]. */
__global__ void dense_all_fwd(float *S, const float *q, const float *p, int B, int Np, int D) {
    size_t pr = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (pr >= (size_t)B * Np) return;
    const float *a = q + (pr / Np) * D, *b = p + (pr % Np) * D;
    float acc = 0;
    for (int k = lane; k < D; k += 32) acc += a[k] * b[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) S[pr] = acc;
}

/* dq[b, k] = sum_c dS[b, c] p[c, k]; dp[c, k] = sum_b dS[b, c] q[b, k]; one thread per element. */
__global__ void dense_all_bwd(float *dq, float *dp, const float *dS, const float *q, const float *p, int B, int Np,
                              int D) {
    size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nq = (size_t)B * D;
    if (e < nq) {
        size_t b = e / D, k = e % D;
        float a = 0;
        for (int c = 0; c < Np; c++) a += dS[b * Np + c] * p[(size_t)c * D + k];
        dq[e] = a;
    } else if (e < nq + (size_t)Np * D) {
        size_t f = e - nq, c = f / D, k = f % D;
        float a = 0;
        for (int b = 0; b < B; b++) a += dS[(size_t)b * Np + c] * q[(size_t)b * D + k];
        dp[f] = a;
    }
}

extern "C" int kst_gpu_dense_all_forward(float *S, const float *q, const float *p, size_t B, size_t n, size_t D,
                                         void *stream, kst_error *err) {
    int rc = KST_OK;
    dense_all_fwd<<<nblk(B * B * n, 8), 256, 0, (cudaStream_t)stream>>>(S, q, p, (int)B, (int)(B * n), (int)D);
    CU_LAUNCHED("in-batch scores");
done:
    return rc;
}

extern "C" int kst_gpu_dense_all_backward(float *dq, float *dp, const float *dS, const float *q, const float *p,
                                          size_t B, size_t n, size_t D, void *stream, kst_error *err) {
    int rc = KST_OK;
    dense_all_bwd<<<nblk(B * D + B * n * D, 256), 256, 0, (cudaStream_t)stream>>>(dq, dp, dS, q, p, (int)B,
                                                                                   (int)(B * n), (int)D);
    CU_LAUNCHED("in-batch score backward");
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Margin-MSE + in-batch cross-entropy */

/* One block; thread per row b (strided). Margin-MSE as train/loss.c on S[b, own + k]; with all,
 * the cross-entropy of row b (all W columns) against column b n, times w, as kst_inbatch_ce_*;
 * each loss rounded to float on its own and added in float, as the CPU trainer adds them. */
__global__ void mmse_ib(float *loss, float *dS, const float *S, const float *t, int B, int n, int all, float w) {
    __shared__ double pm[256], pi[256];
    const int W = all ? B * n : n;
    const double c = 2.0 / (double)(B * (n - 1)), cib = (double)w / (double)B;
    double am = 0, ai = 0;
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
        const float *row = S + (size_t)b * W, *tb = t + (size_t)b * n;
        float *drow = dS + (size_t)b * W;
        const int own = all ? b * n : 0;
        if (all) {
            double mx = -INFINITY, sum = 0;
            for (int col = 0; col < W; col++) mx = fmax(mx, (double)row[col]);
            for (int col = 0; col < W; col++) sum += exp((double)row[col] - mx);
            double lse = mx + log(sum);
            ai += lse - row[own];
            for (int col = 0; col < W; col++)
                drow[col] = (float)(cib * (exp((double)row[col] - lse) - (col == own ? 1.0 : 0.0)));
        }
        double dpos = 0;
        for (int i = 1; i < n; i++) {
            double e = ((double)row[own] - row[own + i]) - ((double)tb[0] - tb[i]);
            am += e * e;
            dpos += c * e;
            float g = (float)(-c * e);
            drow[own + i] = all ? drow[own + i] + g : g;
        }
        drow[own] = all ? drow[own] + (float)dpos : (float)dpos;
    }
    pm[threadIdx.x] = am;
    pi[threadIdx.x] = ai;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) pm[threadIdx.x] += pm[threadIdx.x + s], pi[threadIdx.x] += pi[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float l = (float)(pm[0] / (double)(B * (n - 1)));
        if (all) l += (float)((double)w * pi[0] / (double)B);
        *loss = l;
    }
}

extern "C" int kst_gpu_mmse_ib_loss(float *loss, float *dS, const float *S, const float *t, size_t B, size_t n,
                                    int all, float ib_weight, void *stream, kst_error *err) {
    int rc = KST_OK;
    mmse_ib<<<1, 256, 0, (cudaStream_t)stream>>>(loss, dS, S, t, (int)B, (int)n, all, ib_weight);
    CU_LAUNCHED("Margin-MSE");
done:
    return rc;
}
