/* bench_cutlass_gemm.cu - go/no-go microbenchmark for folding BERT's LayerNorms into the products
 * (issue 6): one BERT-base layer's four products at M tokens, today's path (cuBLASLt with bias /
 * GELU / residual epilogues, the algorithm timed among the heuristic's 8 candidates as the encoder
 * does, plus the LayerNorm kernel) against CUTLASS sm90 kernels (encoders/cutlass/gemm.cuh; tests/bench/cutlass/k_*.cu instantiate them)
 * whose epilogues apply the LayerNorm (per-token scales) and rebuild the normalised residual, the
 * row statistics coming from the producing product's epilogue (atomics) or from a stats kernel.
 *
 * Post-LN layer, x = LN2(s2) of the previous layer:
 *   today: qkv = x Wqkv + b; s1 = att Wo + bo + x; h = LN1(s1); f = gelu(h W1 + b1);
 *          s2 = f W2 + b2 + h; x = LN2(s2)
 *   fold:  qkv = r2 (s2 Wqkv') + q2 cqkv + bqkv'          (Wqkv' = diag(g2) Wqkv, c = column sums)
 *          s1 = att Wo + (s2 r2 + q2) g2 + (bo + be2)      [+ row sums of s1 and s1^2]
 *          f = gelu(r1 (s1 W1') + q1 c1 + b1')
 *          s2 = f W2 + (s1 r1 + q1) g1 + (b2 + be1)        [+ row sums]
 *   (r = 1/sqrt(var + eps), q = -mean r per token)
 *
 * Usage: bench_cutlass_gemm M [reps]. Prints one JSON object per line: per-product times, the
 * layer's products + LayerNorm sequences, and the fold's errors against today's path. Build
 * (after `make cutlass`; each kernel file takes a minute or more):
 *   for f in tests/bench/cutlass/k_*.cu; do nvcc -O3 -std=c++17 -arch=sm_90a -DNDEBUG \
 *     --expt-relaxed-constexpr -I. -isystem .cutlass/include -c $f -o build/$(basename $f .cu).o; done
 *   nvcc -O3 -std=c++17 -arch=sm_90a -I. tests/bench/bench_cutlass_gemm.cu build/k_*.o -lcublasLt \
 *     -o build/bench_cutlass_gemm
 * Figures and what they decided: tests/bench/README.md, "LayerNorm folded into CUTLASS products". */
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "encoders/cutlass/gemm.cuh"

typedef __nv_bfloat16 bf16;

#define CK(x)                                                                                        \
    do {                                                                                             \
        cudaError_t e_ = (x);                                                                        \
        if (e_ != cudaSuccess) {                                                                     \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)
#define LK(x)                                                                                        \
    do {                                                                                             \
        cublasStatus_t s_ = (x);                                                                     \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                           \
            fprintf(stderr, "%s:%d: %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, (int)s_);       \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

static const int C = 768, FF = 3072;
static const float EPS = 1e-12f;
static cudaStream_t st;
static cublasLtHandle_t lt;
static void *ws;
static const size_t WS = (size_t)64 << 20;

/* ---- row kernels: the encoder's LayerNorm (one warp a row, 8 values a lane), a stats kernel,
 * the finalisation of epilogue sums ---- */
#define ROW_WARPS 8
__device__ __forceinline__ void load8(const bf16 *p, float *v) {
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(bf16 *p, const float *v) {
    uint4 u;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = u;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
/* x = LN(a) with weights w, b (as the encoder's ln_kernel with res == NULL, C = 768) */
__global__ void ln_kernel(bf16 *x, const bf16 *a, const float *w, const float *b, int M) {
    int row = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= M) return;
    float v[3][8], s = 0, q = 0;
#pragma unroll
    for (int j = 0; j < 3; j++) {
        load8(a + (size_t)row * C + (lane + 32 * j) * 8, v[j]);
#pragma unroll
        for (int e = 0; e < 8; e++) s += v[j][e];
    }
    float mean = warp_sum(s) / C;
#pragma unroll
    for (int j = 0; j < 3; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) q += (v[j][e] - mean) * (v[j][e] - mean);
    float rstd = rsqrtf(warp_sum(q) / C + EPS);
#pragma unroll
    for (int j = 0; j < 3; j++) {
        int ch = lane + 32 * j;
        float o[8], wv[8], bv[8];
        float4 w0 = *reinterpret_cast<const float4 *>(w + ch * 8), w1 = *reinterpret_cast<const float4 *>(w + ch * 8 + 4);
        float4 b0 = *reinterpret_cast<const float4 *>(b + ch * 8), b1 = *reinterpret_cast<const float4 *>(b + ch * 8 + 4);
        wv[0] = w0.x, wv[1] = w0.y, wv[2] = w0.z, wv[3] = w0.w, wv[4] = w1.x, wv[5] = w1.y, wv[6] = w1.z, wv[7] = w1.w;
        bv[0] = b0.x, bv[1] = b0.y, bv[2] = b0.z, bv[3] = b0.w, bv[4] = b1.x, bv[5] = b1.y, bv[6] = b1.z, bv[7] = b1.w;
#pragma unroll
        for (int e = 0; e < 8; e++) o[e] = (v[j][e] - mean) * rstd * wv[e] + bv[e];
        store8(x + (size_t)row * C + ch * 8, o);
    }
}
/* r = 1/sqrt(var + eps), q = -mean r of each row of a (reads a only) */
__global__ void stats_kernel(float *r, float *q, const bf16 *a, int M) {
    int row = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= M) return;
    float v[3][8], s = 0, d = 0;
#pragma unroll
    for (int j = 0; j < 3; j++) {
        load8(a + (size_t)row * C + (lane + 32 * j) * 8, v[j]);
#pragma unroll
        for (int e = 0; e < 8; e++) s += v[j][e];
    }
    float mean = warp_sum(s) / C;
#pragma unroll
    for (int j = 0; j < 3; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) d += (v[j][e] - mean) * (v[j][e] - mean);
    float rs = rsqrtf(warp_sum(d) / C + EPS);
    if (lane == 0) r[row] = rs, q[row] = -mean * rs;
}
/* r, q from the epilogue's row sums (sum, sum of squares), which it zeroes for the next product */
__global__ void finalize_kernel(float *r, float *q, float *sum, float *sq, int M) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M) return;
    float mean = sum[i] / C, var = fmaxf(sq[i] / C - mean * mean, 0.f), rs = rsqrtf(var + EPS);
    r[i] = rs, q[i] = -mean * rs;
    sum[i] = 0, sq[i] = 0;
}
__global__ void fill_kernel(bf16 *p, size_t n, uint32_t seed, float scale, float rowoff, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
    float u = (h & 0xffffff) / 16777216.0f - 0.5f;
    size_t row = i / cols;
    uint32_t g = (uint32_t)row * 0x9e3779b9u ^ seed;
    g ^= g >> 16, g *= 0x7feb352du, g ^= g >> 15;
    float ro = rowoff * ((g & 0xffff) / 65536.0f - 0.5f), rs = 0.5f + 1.5f * ((g >> 16) / 65536.0f);
    p[i] = __float2bfloat16_rn(ro + rs * scale * 3.4641f * u); /* uniform of std scale, row offset and scale */
}

/* ---- cuBLASLt as the encoder calls it: out (M, OC) = in (M, K) W (OC, K)^T, epilogue, bias
 * float32, residual through beta = 1; the fastest of the heuristic's 8 candidates (2 rounds) ---- */
struct ltp {
    cublasLtMatmulDesc_t d;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    int res;
};
static void lt_call(ltp *p, const cublasLtMatmulAlgo_t *algo, bf16 *out, const bf16 *in, const bf16 *W,
                    const bf16 *res) {
    const float one = 1, zero = 0;
    LK(cublasLtMatmul(lt, p->d, &one, W, p->a, in, p->b, res ? &one : &zero, res ? (const void *)res : out, p->c, out,
                      p->c, algo, ws, WS, st));
}
static const void *bias16_of(const float *b); /* the bf16 copy of a float32 bias */
static ltp lt_make(int M, int K, int OC, cublasLtEpilogue_t e, const float *bias, bf16 *out, const bf16 *in,
                   const bf16 *W, const bf16 *res) {
    ltp p;
    memset(&p, 0, sizeof p);
    LK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, K, OC, K));
    LK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, K, M, K));
    LK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, OC, M, OC));
    cublasLtMatmulPreference_t pref;
    LK(cublasLtMatmulPreferenceCreate(&pref));
    size_t wsb = WS;
    LK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
    cublasLtMatmulHeuristicResult_t hr[8];
    int found = 0;
    /* float32 bias first, as the encoder (which falls back to bf16 where cuBLASLt has none) */
    for (int k = 0; k < 2 && !found; k++) {
        if (p.d) cublasLtMatmulDescDestroy(p.d);
        LK(cublasLtMatmulDescCreate(&p.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        cudaDataType_t bt = k == 0 ? CUDA_R_32F : CUDA_R_16BF;
        LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e));
        if (bias) {
            const void *bp = k == 0 ? (const void *)bias : bias16_of(bias);
            LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
            LK(cublasLtMatmulDescSetAttribute(p.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp));
        }
        cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(lt, p.d, p.a, p.b, p.c, p.c, pref, 8, hr, &found);
        if (s != CUBLAS_STATUS_SUCCESS) found = 0;
        if (bias) printf("{\"bench\": \"lt_plan\", \"M\": %d, \"K\": %d, \"N\": %d, \"epilogue\": %d, \"bias\": \"%s\", "
                         "\"status\": %d, \"found\": %d}\n", M, K, OC, (int)e, k ? "bf16" : "float32", (int)s, found);
        if (!bias) break;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    if (!found) {
        printf("{\"bench\": \"error\", \"what\": \"cuBLASLt: no algorithm\"}\n");
        exit(1);
    }
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float best = 1e30f;
    int bi = 0;
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < found; i++) {
            if (hr[i].state != CUBLAS_STATUS_SUCCESS) continue;
            for (int r = 0; r < 4; r++) {
                if (r == 1) CK(cudaEventRecord(e0, st));
                lt_call(&p, &hr[i].algo, out, in, W, res);
            }
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            if (ms < best) best = ms, bi = i;
        }
    p.algo = hr[bi].algo;
    p.res = res != NULL;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return p;
}

/* ---- timing ---- */
static int reps = 20;
template <class F> static double time_ms(F f) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 3; i++) f();
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < reps; i++) f();
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaGetLastError());
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return ms / reps;
}

typedef int (*cg_fn)(const cg_args *, void *, size_t, cudaStream_t);
#define NS 3 /* schedules */
static cg_fn CG[5][NS] = {{cg_run_0_0, cg_run_0_1, cg_run_0_2}, {cg_run_1_0, cg_run_1_1, cg_run_1_2},
                          {cg_run_2_0, cg_run_2_1, cg_run_2_2}, {cg_run_3_0, cg_run_3_1, cg_run_3_2},
                          {cg_run_4_0, cg_run_4_1, cg_run_4_2}};
static const char *EPIN[5] = {"bias", "norm", "norm_gelu", "res", "res_stats"};
static const char *SCHN[NS] = {"coop256x128", "ping128x128", "coop128x256"};
static void cg(int epi, int sch, const cg_args &a) {
    int rc = CG[epi][sch](&a, ws, WS, st);
    if (rc) {
        static int told;
        if (told++ < 8)
            printf("{\"bench\": \"error\", \"what\": \"CUTLASS %s %s refused (%d) M %d N %d K %d\"}\n", EPIN[epi],
                   SCHN[sch], rc, a.M, a.N, a.K);
    }
}

static bf16 *dalloc_bf(size_t n) {
    bf16 *p;
    CK(cudaMalloc(&p, n * 2));
    return p;
}
static float *dalloc_f(size_t n) {
    float *p;
    CK(cudaMalloc(&p, n * 4));
    CK(cudaMemset(p, 0, n * 4));
    return p;
}
static void fill(bf16 *p, size_t n, uint32_t seed, float scale, float rowoff, int cols) {
    fill_kernel<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(p, n, seed, scale, rowoff, cols);
    CK(cudaGetLastError());
}
static std::vector<std::pair<const float *, const void *>> b16reg;
static float *upload(const std::vector<float> &v) {
    float *p = dalloc_f(v.size());
    CK(cudaMemcpy(p, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    std::vector<bf16> h(v.size());
    for (size_t i = 0; i < v.size(); i++) h[i] = __float2bfloat16_rn(v[i]);
    bf16 *q;
    CK(cudaMalloc(&q, h.size() * 2));
    CK(cudaMemcpy(q, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
    b16reg.push_back({p, q});
    return p;
}
static const void *bias16_of(const float *b) {
    for (auto &e : b16reg)
        if (e.first == b) return e.second;
    return NULL;
}
static std::vector<float> download_bf(const bf16 *p, size_t n) {
    std::vector<bf16> h(n);
    CK(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = __bfloat162float(h[i]);
    return f;
}
/* max |a - b|, max |b|, and the rms of a - b over rms of b */
static void cmp(const char *what, const bf16 *a, const bf16 *b, size_t n, int M) {
    std::vector<float> x = download_bf(a, n), y = download_bf(b, n);
    double md = 0, my = 0, se = 0, sy = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)x[i] - y[i]);
        md = d > md ? d : md;
        my = fabs(y[i]) > my ? fabs(y[i]) : my;
        se += d * d, sy += (double)y[i] * y[i];
    }
    printf("{\"bench\": \"fold_check\", \"M\": %d, \"tensor\": \"%s\", \"max_abs_diff\": %.5f, \"max_abs_ref\": %.4f, "
           "\"rel_rms\": %.3e}\n",
           M, what, md, my, sqrt(se / (sy > 0 ? sy : 1)));
}

/* W' = W diag(g) for W (OC, K): column k scaled by g[k]; c[o] = sum_k W'[o, k] (of the bf16 W');
 * b'[o] = b[o] + sum_k be[k] W[o, k] */
static void fold_weights(const std::vector<float> &W, const std::vector<float> &g, const std::vector<float> &be,
                         const std::vector<float> &b, int OC, int K, std::vector<bf16> &Wf, std::vector<float> &c,
                         std::vector<float> &bf) {
    Wf.resize((size_t)OC * K);
    c.assign(OC, 0);
    bf.assign(OC, 0);
    for (int o = 0; o < OC; o++) {
        double cs = 0, bs = b[o];
        for (int k = 0; k < K; k++) {
            bf16 w = __float2bfloat16_rn(W[(size_t)o * K + k] * g[k]);
            Wf[(size_t)o * K + k] = w;
            cs += __bfloat162float(w);
            bs += (double)be[k] * W[(size_t)o * K + k];
        }
        c[o] = (float)cs, bf[o] = (float)bs;
    }
}

int main(int argc, char **argv) {
    int M = argc > 1 ? atoi(argv[1]) : 65536;
    if (argc > 2) reps = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    CK(cudaStreamCreate(&st));
    LK(cublasLtCreate(&lt));
    CK(cudaMalloc(&ws, WS));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("{\"bench\": \"device\", \"name\": \"%s\", \"sm\": %d, \"M\": %d, \"reps\": %d}\n", prop.name,
           prop.multiProcessorCount, M, reps);

    /* host weights (random, seed fixed): products' W (bf16-exact floats), biases, LN params */
    srand(1);
    auto rnd = [](float s) { return s * ((float)rand() / RAND_MAX - 0.5f) * 3.4641f; };
    auto vec = [&](size_t n, float mean, float s) {
        std::vector<float> v(n);
        for (auto &x : v) x = mean + rnd(s);
        return v;
    };
    auto bfr = [](std::vector<float> v) {
        for (auto &x : v) x = __bfloat162float(__float2bfloat16_rn(x));
        return v;
    };
    std::vector<float> hWqkv = bfr(vec((size_t)3 * C * C, 0, 0.03f)), hWo = bfr(vec((size_t)C * C, 0, 0.03f)),
                       hW1 = bfr(vec((size_t)FF * C, 0, 0.03f)), hW2 = bfr(vec((size_t)C * FF, 0, 0.02f));
    std::vector<float> hbqkv = vec(3 * C, 0, 0.05f), hbo = vec(C, 0, 0.05f), hb1 = vec(FF, 0, 0.05f),
                       hb2 = vec(C, 0, 0.05f);
    std::vector<float> hg1 = vec(C, 1, 0.2f), hbe1 = vec(C, 0, 0.2f), hg2 = vec(C, 1, 0.2f), hbe2 = vec(C, 0, 0.2f);
    auto up_bf = [&](const std::vector<float> &v) {
        std::vector<bf16> h(v.size());
        for (size_t i = 0; i < v.size(); i++) h[i] = __float2bfloat16_rn(v[i]);
        bf16 *p = dalloc_bf(v.size());
        CK(cudaMemcpy(p, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
        return p;
    };
    bf16 *Wqkv = up_bf(hWqkv), *Wo = up_bf(hWo), *W1 = up_bf(hW1), *W2 = up_bf(hW2);
    float *bqkv = upload(hbqkv), *bo = upload(hbo), *b1 = upload(hb1), *b2 = upload(hb2);
    float *g1 = upload(hg1), *be1 = upload(hbe1), *g2 = upload(hg2), *be2 = upload(hbe2);
    /* folded: Wqkv' = Wqkv diag(g2) (the previous layer's LN2), W1' = W1 diag(g1) */
    std::vector<bf16> hWqkvf, hW1f;
    std::vector<float> hcqkv, hbqkvf, hc1, hb1f;
    fold_weights(hWqkv, hg2, hbe2, hbqkv, 3 * C, C, hWqkvf, hcqkv, hbqkvf);
    fold_weights(hW1, hg1, hbe1, hb1, FF, C, hW1f, hc1, hb1f);
    bf16 *Wqkvf = dalloc_bf(hWqkvf.size()), *W1f = dalloc_bf(hW1f.size());
    CK(cudaMemcpy(Wqkvf, hWqkvf.data(), hWqkvf.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(W1f, hW1f.data(), hW1f.size() * 2, cudaMemcpyHostToDevice));
    float *cqkv = upload(hcqkv), *bqkvf = upload(hbqkvf), *c1 = upload(hc1), *b1f = upload(hb1f);
    std::vector<float> hbo2(C), hb21(C);
    for (int i = 0; i < C; i++) hbo2[i] = hbo[i] + hbe2[i], hb21[i] = hb2[i] + hbe1[i];
    float *bo2 = upload(hbo2), *b21 = upload(hb21);

    /* activations */
    size_t MC = (size_t)M * C;
    bf16 *s2 = dalloc_bf(MC), *x = dalloc_bf(MC), *att = dalloc_bf(MC), *tmp = dalloc_bf(MC), *s1 = dalloc_bf(MC),
         *qkv = dalloc_bf(3 * MC), *ff = dalloc_bf((size_t)M * FF);
    bf16 *ref_qkv = dalloc_bf(3 * MC), *ref_s1 = dalloc_bf(MC), *ref_ff = dalloc_bf((size_t)M * FF),
         *ref_s2 = dalloc_bf(MC), *s2b = dalloc_bf(MC);
    float *r1 = dalloc_f(M), *q1 = dalloc_f(M), *r2 = dalloc_f(M), *q2 = dalloc_f(M), *sum = dalloc_f(M),
          *sq = dalloc_f(M);
    fill(s2, MC, 11, 1.0f, 2.0f, C);
    fill(att, MC, 12, 0.5f, 0.f, C);
    CK(cudaStreamSynchronize(st));
    unsigned lnb = (unsigned)((M + ROW_WARPS - 1) / ROW_WARPS), fb = (unsigned)((M + 255) / 256);

    /* ---- cuBLASLt plans (today's epilogues and plain / bias-only anchors) ---- */
    ltp L_qkv = lt_make(M, C, 3 * C, CUBLASLT_EPILOGUE_BIAS, bqkv, qkv, x, Wqkv, NULL);
    ltp L_proj = lt_make(M, C, C, CUBLASLT_EPILOGUE_BIAS, bo, tmp, att, Wo, x);
    ltp L_fc1 = lt_make(M, C, FF, CUBLASLT_EPILOGUE_GELU_BIAS, b1, ff, x, W1, NULL);
    ltp L_fc2 = lt_make(M, FF, C, CUBLASLT_EPILOGUE_BIAS, b2, tmp, ff, W2, x);
    struct { const char *name; int N, K; const bf16 *in, *W; bf16 *out; const float *bias; } shp[4] = {
        {"qkv", 3 * C, C, x, Wqkv, qkv, bqkv}, {"proj", C, C, att, Wo, tmp, bo},
        {"fc1", FF, C, x, W1, ff, b1},         {"fc2", C, FF, ff, W2, tmp, b2}};
    ltp L_plain[4], L_bias[4];
    for (int i = 0; i < 4; i++) {
        L_plain[i] = lt_make(M, shp[i].K, shp[i].N, CUBLASLT_EPILOGUE_DEFAULT, NULL, shp[i].out, shp[i].in, shp[i].W, NULL);
        L_bias[i] = lt_make(M, shp[i].K, shp[i].N, CUBLASLT_EPILOGUE_BIAS, shp[i].bias, shp[i].out, shp[i].in, shp[i].W, NULL);
    }

    /* ---- correctness: today's path against the fold from the same s2 ---- */
    ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, s2, g2, be2, M);
    lt_call(&L_qkv, &L_qkv.algo, ref_qkv, x, Wqkv, NULL);
    lt_call(&L_proj, &L_proj.algo, ref_s1, att, Wo, x);
    ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, ref_s1, g1, be1, M);
    lt_call(&L_fc1, &L_fc1.algo, ref_ff, x, W1, NULL);
    lt_call(&L_fc2, &L_fc2.algo, ref_s2, ref_ff, W2, x);
    CK(cudaGetLastError());
    for (int sch = 0; sch < NS; sch++) {
        cg_args a;
        memset(&a, 0, sizeof a);
        stats_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(r2, q2, s2, M);
        a = cg_args{M, 3 * C, C, s2, Wqkvf, qkv, NULL, r2, q2, bqkvf, cqkv, NULL, NULL, NULL};
        cg(EPI_NORM, sch, a);
        a = cg_args{M, C, C, att, Wo, s1, s2, r2, q2, bo2, NULL, g2, sum, sq};
        cg(EPI_RESST, sch, a);
        finalize_kernel<<<fb, 256, 0, st>>>(r1, q1, sum, sq, M);
        a = cg_args{M, FF, C, s1, W1f, ff, NULL, r1, q1, b1f, c1, NULL, NULL, NULL};
        cg(EPI_NORMG, sch, a);
        a = cg_args{M, C, FF, ff, W2, s2b, s1, r1, q1, b21, NULL, g1, sum, sq};
        cg(EPI_RESST, sch, a);
        finalize_kernel<<<fb, 256, 0, st>>>(r2, q2, sum, sq, M);
        CK(cudaStreamSynchronize(st));
        printf("{\"bench\": \"fold_check_schedule\", \"schedule\": \"%s\"}\n", SCHN[sch]);
        cmp("qkv", qkv, ref_qkv, 3 * MC, M);
        cmp("s1", s1, ref_s1, MC, M);
        cmp("ff", ff, ref_ff, (size_t)M * FF, M);
        cmp("s2", s2b, ref_s2, MC, M);
        /* the epilogue's statistics of s2 against the stats kernel's */
        {
            std::vector<float> ra(M), qa(M), rb(M), qb(M);
            CK(cudaMemcpy(ra.data(), r2, M * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(qa.data(), q2, M * 4, cudaMemcpyDeviceToHost));
            stats_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(r2, q2, s2b, M);
            CK(cudaMemcpy(rb.data(), r2, M * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(qb.data(), q2, M * 4, cudaMemcpyDeviceToHost));
            double mr = 0, mq = 0;
            for (int i = 0; i < M; i++) {
                mr = fmax(mr, fabs(ra[i] / rb[i] - 1));
                mq = fmax(mq, fabs(qa[i] - qb[i]));
            }
            printf("{\"bench\": \"fold_check\", \"M\": %d, \"tensor\": \"epilogue stats vs stats kernel\", "
                   "\"max_rel_r\": %.3e, \"max_abs_q\": %.3e}\n", M, mr, mq);
        }
    }

    /* ---- per product ---- */
    auto tf = [&](double flop, double ms) { return flop / ms / 1e9; };
    for (int i = 0; i < 4; i++) {
        double flop = 2.0 * M * shp[i].N * shp[i].K;
        double tp = time_ms([&] { lt_call(&L_plain[i], &L_plain[i].algo, shp[i].out, shp[i].in, shp[i].W, NULL); });
        double tb = time_ms([&] { lt_call(&L_bias[i], &L_bias[i].algo, shp[i].out, shp[i].in, shp[i].W, NULL); });
        ltp *today = i == 0 ? &L_qkv : i == 1 ? &L_proj : i == 2 ? &L_fc1 : &L_fc2;
        const bf16 *res = today->res ? x : NULL;
        double tt = time_ms([&] { lt_call(today, &today->algo, shp[i].out, shp[i].in, shp[i].W, res); });
        printf("{\"bench\": \"product\", \"M\": %d, \"shape\": \"%s\", \"lt_plain_ms\": %.4f, \"lt_bias_ms\": %.4f, "
               "\"lt_today_ms\": %.4f, \"lt_plain_tflops\": %.1f",
               M, shp[i].name, tp, tb, tt, tf(flop, tp));
        for (int sch = 0; sch < NS; sch++) {
            cg_args a = {M, shp[i].N, shp[i].K, shp[i].in, shp[i].W, shp[i].out, NULL, NULL, NULL, shp[i].bias,
                         NULL, NULL, NULL, NULL};
            double cb = time_ms([&] { cg(EPI_BIAS, sch, a); });
            /* the fold's epilogue for this product */
            cg_args f;
            int epi;
            if (i == 0) f = cg_args{M, 3 * C, C, s2, Wqkvf, qkv, NULL, r2, q2, bqkvf, cqkv, NULL, NULL, NULL}, epi = EPI_NORM;
            else if (i == 1) f = cg_args{M, C, C, att, Wo, s1, s2, r2, q2, bo2, NULL, g2, sum, sq}, epi = EPI_RES;
            else if (i == 2) f = cg_args{M, FF, C, s1, W1f, ff, NULL, r1, q1, b1f, c1, NULL, NULL, NULL}, epi = EPI_NORMG;
            else f = cg_args{M, C, FF, ff, W2, s2b, s1, r1, q1, b21, NULL, g1, sum, sq}, epi = EPI_RES;
            double cf = time_ms([&] { cg(epi, sch, f); });
            printf(", \"cutlass_%s_bias_ms\": %.4f, \"cutlass_%s_fold_ms\": %.4f", SCHN[sch], cb, SCHN[sch], cf);
            if (epi == EPI_RES) {
                double cs = time_ms([&] {
                    cg(EPI_RESST, sch, f);
                    finalize_kernel<<<fb, 256, 0, st>>>(r1, q1, sum, sq, M);
                });
                printf(", \"cutlass_%s_fold_stats_fin_ms\": %.4f", SCHN[sch], cs);
            }
        }
        printf("}\n");
    }
    double tln = time_ms([&] { ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, tmp, g1, be1, M); });
    double tst = time_ms([&] { stats_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(r1, q1, tmp, M); });
    double tfi = time_ms([&] { finalize_kernel<<<fb, 256, 0, st>>>(r1, q1, sum, sq, M); });
    printf("{\"bench\": \"rows\", \"M\": %d, \"ln_ms\": %.4f, \"stats_ms\": %.4f, \"finalize_ms\": %.4f}\n", M, tln, tst,
           tfi);

    /* ---- the layer's products and LayerNorms back to back (no attention) ---- */
    double today = time_ms([&] {
        lt_call(&L_qkv, &L_qkv.algo, qkv, x, Wqkv, NULL);
        lt_call(&L_proj, &L_proj.algo, tmp, att, Wo, x);
        ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, tmp, g1, be1, M);
        lt_call(&L_fc1, &L_fc1.algo, ff, x, W1, NULL);
        lt_call(&L_fc2, &L_fc2.algo, tmp, ff, W2, x);
        ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, tmp, g2, be2, M);
    });
    printf("{\"bench\": \"layer\", \"M\": %d, \"path\": \"today (cuBLASLt + LN)\", \"ms\": %.4f}\n", M, today);
    for (int sch = 0; sch < NS; sch++)
        for (int epistats = 0; epistats < 2; epistats++) {
            double t = time_ms([&] {
                cg_args a{M, 3 * C, C, s2, Wqkvf, qkv, NULL, r2, q2, bqkvf, cqkv, NULL, NULL, NULL};
                cg(EPI_NORM, sch, a);
                a = cg_args{M, C, C, att, Wo, s1, s2, r2, q2, bo2, NULL, g2, sum, sq};
                if (epistats) {
                    cg(EPI_RESST, sch, a);
                    finalize_kernel<<<fb, 256, 0, st>>>(r1, q1, sum, sq, M);
                } else {
                    cg(EPI_RES, sch, a);
                    stats_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(r1, q1, s1, M);
                }
                a = cg_args{M, FF, C, s1, W1f, ff, NULL, r1, q1, b1f, c1, NULL, NULL, NULL};
                cg(EPI_NORMG, sch, a);
                /* s2 written in place of the s2 this layer read (as the encoder's layer loop would) */
                a = cg_args{M, C, FF, ff, W2, s2, s1, r1, q1, b21, NULL, g1, sum, sq};
                if (epistats) {
                    cg(EPI_RESST, sch, a);
                    finalize_kernel<<<fb, 256, 0, st>>>(r2, q2, sum, sq, M);
                } else {
                    cg(EPI_RES, sch, a);
                    stats_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(r2, q2, s2, M);
                }
            });
            printf("{\"bench\": \"layer\", \"M\": %d, \"path\": \"fold %s, stats %s\", \"ms\": %.4f, \"x_today\": %.3f}\n",
                   M, SCHN[sch], epistats ? "in epilogue" : "kernel", t, today / t);
        }
    double today2 = time_ms([&] {
        lt_call(&L_qkv, &L_qkv.algo, qkv, x, Wqkv, NULL);
        lt_call(&L_proj, &L_proj.algo, tmp, att, Wo, x);
        ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, tmp, g1, be1, M);
        lt_call(&L_fc1, &L_fc1.algo, ff, x, W1, NULL);
        lt_call(&L_fc2, &L_fc2.algo, tmp, ff, W2, x);
        ln_kernel<<<lnb, ROW_WARPS * 32, 0, st>>>(x, tmp, g2, be2, M);
    });
    printf("{\"bench\": \"layer\", \"M\": %d, \"path\": \"today again\", \"ms\": %.4f}\n", M, today2);
    return 0;
}
