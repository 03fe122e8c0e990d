/* bert_gpu_train.cu - training forward and backward of BERT / DistilBERT and the dense head on the
 * GPU: cuBLAS bf16 matrix products with float32 accumulation over float32 master weights, row
 * kernels for LayerNorm and its backward, flash-style attention forward and backward on the
 * tensor cores for head sizes 16, 32 and 64 (no T x T matrix; other head sizes, or
 * KESTREL_GPU_TRAIN_FLASH=0, keep the T x T scores materialised per head through cuBLAS),
 * hash-drawn dropout. The CPU twin is encoders/bert_train.c; tests/test_gpu_train.c compares them. */
#include "core/gpu_util.cuh"
#include "encoders/bert_act.cuh"
#include "encoders/bert_mma.cuh"

#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "core/mem.h"
#include "encoders/bert_gpu_train.h"
#include "encoders/encoder.h"
#include "core/ops_backward.h"
}

typedef __nv_bfloat16 bf16;

/* ------------------------------------------------------------------------------------------ */
/* dropout: a counter-based hash of (seed, site, element) -> 0 or 1/(1-p); forward and backward
 * draw the same mask without storing it. Sites: 0 the embedding, then per layer l 1+3l the
 * attention probabilities, 2+3l after the attention projection, 3+3l after the feed-forward. */

__device__ __forceinline__ float drop_scale(uint64_t seed, uint32_t site, uint64_t idx, float p) {
    if (p <= 0.0f) return 1.0f;
    uint64_t z = seed + (uint64_t)site * 0x9E3779B97F4A7C15ull + idx * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u < p ? 0.0f : 1.0f / (1.0f - p);
}

/* The attention probabilities' mask (sites 1 + 3l), drawn far more often (B NH T^2 per layer and
 * pass), is cheaper: element (row, j) of the (B NH T) x T matrix, row = (b NH + h) T + i, keeps
 * when fmix32(rowkey + j * odd) >= p 2^32, with rowkey = fmix32(seedkey ^ row * odd') and
 * seedkey the 64-bit hash of (seed, site): per element one 32-bit multiply-add and MurmurHash3's
 * finaliser instead of three 64-bit multiplies, and the flash kernels draw a row key once per
 * row of a tile. Both attention paths draw through these, so their masks are the same. */
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}
__device__ __forceinline__ uint32_t att_seedkey(uint64_t seed, uint32_t site) {
    uint64_t z = seed + (uint64_t)site * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}
__device__ __forceinline__ uint32_t att_rowkey(uint32_t seedkey, uint64_t row) {
    return fmix32(seedkey ^ ((uint32_t)row * 0x9E3779B9u));
}
/* threshold p 2^32 (p in [0, 1)); 0 keeps everything */
__device__ __forceinline__ uint32_t att_thr(float p) {
    return p > 0.0f ? (uint32_t)fminf((float)p * 4294967296.0f, 4294967040.0f) : 0u;
}
__device__ __forceinline__ float att_mask(uint32_t rowkey, uint32_t j, uint32_t thr, float keep) {
    return fmix32(rowkey + j * 0x7FEB352Du) < thr ? 0.0f : keep;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* d act / d x, as core/ops_backward.c's kst_act_backward */
__device__ __forceinline__ float act_grad(float x, int act) {
    switch (act) {
    case KST_ACT_GELU: {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
        return cdf + x * pdf;
    }
    case KST_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f;
        float t = tanhf(k * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case KST_ACT_RELU: return x > 0 ? 1.0f : 0.0f;
    case KST_ACT_TANH: {
        float t = tanhf(x);
        return 1.0f - t * t;
    }
    default: return 1.0f;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* row kernels: one warp per token row of C values, lanes striding over the columns */

#define RW 8 /* warps per block */

/* LayerNorm of row v (already written to `in`, C floats): mean and rstd, as the CPU's two-pass. */
__device__ __forceinline__ void ln_stats(const float *in, int C, float eps, int lane, float *mean,
                                         float *rstd) {
    float s = 0;
    for (int c = lane; c < C; c += 32) s += in[c];
    float m = warp_sum(s) / C;
    float q = 0;
    for (int c = lane; c < C; c += 32) {
        float d = in[c] - m;
        q += d * d;
    }
    *mean = m;
    *rstd = rsqrtf(warp_sum(q) / C + eps);
}

/* emb = wte[id] + wpe[t] (+ wtt[type]); x = dropout(LN(emb)) as float32 and bf16. */
__global__ void embed_ln_fwd(float *emb, float *mean, float *rstd, float *xf, bf16 *xb,
                             const int32_t *ids, const int32_t *types, const float *wte,
                             const float *wpe, const float *wtt, const float *w, const float *b,
                             int BT, int T, int C, float eps, float p, uint64_t seed) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= BT) return;
    const float *we = wte + (size_t)ids[row] * C, *pe = wpe + (size_t)(row % T) * C;
    const float *te = wtt ? wtt + (size_t)types[row] * C : NULL;
    float *e = emb + (size_t)row * C;
    for (int c = lane; c < C; c += 32) e[c] = we[c] + pe[c] + (te ? te[c] : 0.0f);
    float m, r;
    ln_stats(e, C, eps, lane, &m, &r);
    for (int c = lane; c < C; c += 32) {
        size_t i = (size_t)row * C + c;
        float y = ((e[c] - m) * r * w[c] + b[c]) * drop_scale(seed, 0, i, p);
        xf[i] = y;
        xb[i] = __float2bfloat16(y);
    }
    if (lane == 0) mean[row] = m, rstd[row] = r;
}

/* res = resid + dropout(a + bias); out = LN(res) as float32 and bf16. */
__global__ void bias_res_ln_fwd(float *res, float *mean, float *rstd, float *outf, bf16 *outb,
                                const bf16 *a, const float *bias, const float *resid,
                                const float *w, const float *b, int BT, int C, float eps, float p,
                                uint64_t seed, uint32_t site) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= BT) return;
    size_t o = (size_t)row * C;
    for (int c = lane; c < C; c += 32)
        res[o + c] = resid[o + c] + (__bfloat162float(a[o + c]) + bias[c]) * drop_scale(seed, site, o + c, p);
    float m, r;
    ln_stats(res + o, C, eps, lane, &m, &r);
    for (int c = lane; c < C; c += 32) {
        float y = (res[o + c] - m) * r * w[c] + b[c];
        outf[o + c] = y;
        outb[o + c] = __float2bfloat16(y);
    }
    if (lane == 0) mean[row] = m, rstd[row] = r;
}

/* LayerNorm backward of one row (llm.c's form): with n = (x - mean) rstd and g = w dy',
 * dx = rstd (g - mean(g) - n mean(g n)), dy' = dy * (input dropout mask of site in_site).
 * dres (float32) = dx; dbranch (bf16, optional) = dx * (mask of site br_site). */
__global__ void ln_bwd(float *dres, bf16 *dbranch, const float *dy, const float *x, const float *w,
                       const float *mean, const float *rstd, int BT, int C, float in_p,
                       uint32_t in_site, float br_p, uint32_t br_site, uint64_t seed) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= BT) return;
    size_t o = (size_t)row * C;
    float m = mean[row], r = rstd[row];
    float gm = 0, gnm = 0;
    for (int c = lane; c < C; c += 32) {
        float g = w[c] * dy[o + c] * drop_scale(seed, in_site, o + c, in_p);
        gm += g;
        gnm += g * (x[o + c] - m) * r;
    }
    gm = warp_sum(gm) / C;
    gnm = warp_sum(gnm) / C;
    for (int c = lane; c < C; c += 32) {
        float g = w[c] * dy[o + c] * drop_scale(seed, in_site, o + c, in_p);
        float d = r * (g - gm - (x[o + c] - m) * r * gnm);
        dres[o + c] = d;
        if (dbranch) dbranch[o + c] = __float2bfloat16(d * drop_scale(seed, br_site, o + c, br_p));
    }
}

/* Column sums over rows, block (32, 8): dw[c] += sum_r dy n, db[c] += sum_r dy (LayerNorm
 * parameters; dy through the input dropout mask), accumulated with atomics. */
__global__ void ln_param_bwd(float *dw, float *db, const float *dy, const float *x, const float *mean,
                             const float *rstd, int BT, int C, float in_p, uint32_t in_site,
                             uint64_t seed) {
    __shared__ float sw[8][33], sb[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float aw = 0, ab = 0;
    if (c < C)
        for (int r = blockIdx.y * 8 + threadIdx.y; r < BT; r += gridDim.y * 8) {
            size_t i = (size_t)r * C + c;
            float d = dy[i] * drop_scale(seed, in_site, i, in_p);
            aw += d * (x[i] - mean[r]) * rstd[r];
            ab += d;
        }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int k = 1; k < 8; k++) aw += sw[k][threadIdx.x], ab += sb[k][threadIdx.x];
        atomicAdd(dw + c, aw);
        atomicAdd(db + c, ab);
    }
}

/* dbias[c] += sum_r g[r, c] over g (R, N) bf16: a bias's gradient. */
__global__ void colsum_bf16(float *dbias, const bf16 *g, int R, int N) {
    __shared__ float s[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float a = 0;
    if (c < N)
        for (int r = blockIdx.y * 8 + threadIdx.y; r < R; r += gridDim.y * 8) a += __bfloat162float(g[(size_t)r * N + c]);
    s[threadIdx.y][threadIdx.x] = a;
    __syncthreads();
    if (threadIdx.y == 0 && c < N) {
        for (int k = 1; k < 8; k++) a += s[k][threadIdx.x];
        atomicAdd(dbias + c, a);
    }
}

/* Embedding backward, word table: scatter-add d emb rows into the rows of their ids (atomics;
 * ids rarely repeat within a column). */
__global__ void embed_bwd(float *dwte, const float *d, const int32_t *ids, int BT, int C) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= BT) return;
    float *we = dwte + (size_t)ids[row] * C;
    const float *g = d + (size_t)row * C;
    for (int c = lane; c < C; c += 32) atomicAdd(we + c, g[c]);
}

/* Position table: dwpe[t] += sum_b d[b, t] (one thread per (t, c), no atomics: every sequence
 * hits every position). */
__global__ void embed_pos_bwd(float *dwpe, const float *d, int B, int T, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T * C) return;
    float a = 0;
    for (int b = 0; b < B; b++) a += d[(size_t)b * T * C + i];
    dwpe[i] += a;
}

/* Type table (TT <= 4): column sums per type over the rows, block (32, 8), one atomic per block
 * and type (every row of a batch usually has type 0). */
__global__ void embed_type_bwd(float *dwtt, const float *d, const int32_t *types, int BT, int C, int TT) {
    __shared__ float s[4][8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float a[4] = {0, 0, 0, 0};
    if (c < C)
        for (int r = blockIdx.y * 8 + threadIdx.y; r < BT; r += gridDim.y * 8) {
            float v = d[(size_t)r * C + c];
            int t = types[r];
#pragma unroll
            for (int k = 0; k < 4; k++) a[k] += t == k ? v : 0.0f;
        }
#pragma unroll
    for (int k = 0; k < 4; k++) s[k][threadIdx.y][threadIdx.x] = a[k];
    __syncthreads();
    if (threadIdx.y == 0 && c < C)
        for (int k = 0; k < TT; k++) {
            float v = 0;
            for (int y = 0; y < 8; y++) v += s[k][y][threadIdx.x];
            atomicAdd(dwtt + (size_t)k * C + c, v);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* element-wise kernels */

/* The feed-forward element-wise kernels take 8 values a thread (16-byte loads and stores; the
 * element count and FF are multiples of 8). */
__device__ __forceinline__ void unpack8(uint4 u, float (&f)[8]) {
    const __nv_bfloat162 *v = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 x = __bfloat1622float2(v[k]);
        f[2 * k] = x.x, f[2 * k + 1] = x.y;
    }
}
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162 *v = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
    return u;
}

/* h = bf16(h + bias) (the pre-activation, kept), a = bf16(act(h)); FF columns; n8 = n / 8. */
__global__ void bias_act_fwd(bf16 *h, bf16 *a, const float *bias, size_t n8, int FF, int act) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    int col = (int)((i * 8) % FF);
    float f[8];
    unpack8(reinterpret_cast<const uint4 *>(h)[i], f);
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = __bfloat162float(__float2bfloat16(f[k] + bias[col + k]));
    reinterpret_cast<uint4 *>(h)[i] = pack8(f);
    if (a) {
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = act_fn(f[k], act);
        reinterpret_cast<uint4 *>(a)[i] = pack8(f);
    }
}

/* a = bf16(act(pre)): the activation again, for the backward (bias_act_fwd's, bit for bit). */
__global__ void act_again(bf16 *a, const bf16 *pre, size_t n8, int act) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float f[8];
    unpack8(reinterpret_cast<const uint4 *>(pre)[i], f);
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = act_fn(f[k], act);
    reinterpret_cast<uint4 *>(a)[i] = pack8(f);
}

/* dh = dh * act'(pre), in place. */
__global__ void act_bwd(bf16 *dh, const bf16 *pre, size_t n8, int act) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    float d[8], x[8];
    unpack8(reinterpret_cast<const uint4 *>(dh)[i], d);
    unpack8(reinterpret_cast<const uint4 *>(pre)[i], x);
#pragma unroll
    for (int k = 0; k < 8; k++) d[k] *= act_grad(x[k], act);
    reinterpret_cast<uint4 *>(dh)[i] = pack8(d);
}

/* (BT, parts * C) rows -> parts x (B, NH, T, hs) heads, adding bias (parts * C) when given; 8
 * values per thread (hs % 8 == 0). merge_heads is the inverse (no bias). */
__global__ void split_heads(bf16 *dst, const bf16 *src, const float *bias, int B, int T, int NH,
                            int hs, int parts) {
    int C = NH * hs, W = parts * C;
    size_t n8 = (size_t)B * T * W / 8, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    size_t e = i * 8, row = e / W;
    int col = (int)(e % W), part = col / C, cc = col % C, h = cc / hs, d = cc % hs;
    size_t b = row / T, t = row % T;
    uint4 u = *reinterpret_cast<const uint4 *>(src + e);
    if (bias) {
        __nv_bfloat162 *v = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(v[k]);
            v[k] = __floats2bfloat162_rn(f.x + bias[col + 2 * k], f.y + bias[col + 2 * k + 1]);
        }
    }
    size_t o = ((((size_t)part * B + b) * NH + h) * T + t) * hs + d;
    *reinterpret_cast<uint4 *>(dst + o) = u;
}

__global__ void merge_heads(bf16 *dst, const bf16 *src, int B, int T, int NH, int hs, int parts) {
    int C = NH * hs, W = parts * C;
    size_t n8 = (size_t)B * T * W / 8, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    size_t e = i * 8, row = e / W;
    int col = (int)(e % W), part = col / C, cc = col % C, h = cc / hs, d = cc % hs;
    size_t b = row / T, t = row % T;
    size_t o = ((((size_t)part * B + b) * NH + h) * T + t) * hs + d;
    *reinterpret_cast<uint4 *>(dst + e) = *reinterpret_cast<const uint4 *>(src + o);
}

/* The number of keys sequence b attends to, as the CPU's keys_of. */
__device__ __forceinline__ int keys_of(const int *valid, int b, int T) {
    int L = valid[b] > 0 ? valid[b] : 0;
    if (L > T) L = T;
    return L ? L : 1;
}

/* One warp per score row (b, h, i): P = softmax over the first L keys of S (already scaled), 0
 * past them; Pd = bf16(P) * the dropout mask when p > 0. */
__global__ void softmax_fwd(bf16 *P, bf16 *Pd, const float *S, const int *valid, int B, int NH, int T,
                            float p, uint64_t seed, uint32_t site) {
    size_t row = (size_t)blockIdx.x * RW + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= (size_t)B * NH * T) return;
    int L = keys_of(valid, (int)(row / ((size_t)NH * T)), T);
    const float *s = S + row * T;
    float mx = -INFINITY;
    for (int j = lane; j < L; j += 32) mx = fmaxf(mx, s[j]);
    mx = warp_max(mx);
    float sum = 0;
    for (int j = lane; j < L; j += 32) sum += expf(s[j] - mx);
    float inv = 1.0f / warp_sum(sum);
    const uint32_t rk = att_rowkey(att_seedkey(seed, site), row), thr = att_thr(p);
    const float keep = 1.0f / (1.0f - p);
    for (int j = lane; j < T; j += 32) {
        bf16 pv = __float2bfloat16(j < L ? expf(s[j] - mx) * inv : 0.0f);
        P[row * T + j] = pv;
        if (Pd) Pd[row * T + j] = __float2bfloat16(__bfloat162float(pv) * att_mask(rk, (uint32_t)j, thr, keep));
    }
}

/* Pd = bf16(P) * mask again, for the backward. */
__global__ void att_drop(bf16 *Pd, const bf16 *P, size_t n, int T, float p, uint64_t seed, uint32_t site) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t rk = att_rowkey(att_seedkey(seed, site), i / T);
    Pd[i] = __float2bfloat16(__bfloat162float(P[i]) * att_mask(rk, (uint32_t)(i % T), att_thr(p), 1.0f / (1.0f - p)));
}

/* One warp per row: dS = P (dP - sum_j P dP) with dP = dPd * mask. */
__global__ void softmax_bwd(bf16 *dS, const float *dPd, const bf16 *P, int rows, int T, float p,
                            uint64_t seed, uint32_t site) {
    size_t row = (size_t)blockIdx.x * RW + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= (size_t)rows) return;
    const float *g = dPd + row * T;
    const bf16 *pr = P + row * T;
    const uint32_t rk = att_rowkey(att_seedkey(seed, site), row), thr = att_thr(p);
    const float keep = 1.0f / (1.0f - p);
    float dot = 0;
    for (int j = lane; j < T; j += 32) dot += __bfloat162float(pr[j]) * g[j] * att_mask(rk, (uint32_t)j, thr, keep);
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) {
        float pj = __bfloat162float(pr[j]);
        dS[row * T + j] = __float2bfloat16(pj * (g[j] * att_mask(rk, (uint32_t)j, thr, keep) - dot));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* flash-style attention for training (head sizes 16, 32, 64): no T x T matrix in memory.
 *
 * Forward: grid (query tiles of 64, B * NH), 4 warps of 16 query rows. Per key tile (64 keys,
 * masked at the sequence's valid length L) a warp computes S = q k^T on the tensor cores
 * (mma.sync m16n8k16, bf16 in, float32 accumulate), takes the online softmax in base 2, drops
 * the probabilities with the mask of element (row (b NH + h) T + i, key j) (att_mask: the
 * materialised path's draw, so both have the same mask), and accumulates O += Pd v from registers. It writes
 * O (bf16, the (BT, C) layout the projection reads) and the row's log-sum-exp (base 2, scaled).
 *
 * Backward: D = rowsum(dO * O) first (fa_bwd_pre); then grid (key tiles of 64, B * NH), 4 warps
 * of 16 keys holding their k and v rows as A fragments and dk, dv in float32 registers. Per
 * query tile the warp recomputes S^T = k q^T and P^T = 2^(S^T - lse), dP^T = v dO^T, regenerates
 * the mask Z, and adds dv += (P Z)^T dO, dk += dS^T q with dS = P (dP Z - D); dS^T goes through
 * shared memory so that each warp then adds dq = dS k for 16 query rows into a float32 buffer
 * (atomics: key tiles meet there). Query tiles at or past the sequence's rows with a gradient
 * (qrows: the valid length for pooled heads, whose padding rows have dO = 0 exactly; ColBERT
 * queries also take their [MASK] rows, which attend but are not attended to) are skipped. Keys
 * at or past L get dk = dv = 0. */

#define FA_T 64 /* query rows and keys of a tile; 4 warps of 16 */
#define FA_THREADS 128

/* rows [r0, r0 + 64) of a row-major head matrix (row stride ld) into dst (row stride HS + 8);
 * rows at or past n are zero. */
template <int HS>
__device__ __forceinline__ void fa_tile(bf16 *dst, const bf16 *src, size_t ld, int r0, int n) {
    constexpr int CPR = HS / 8, LD = HS + 8;
    for (int i = threadIdx.x; i < FA_T * CPR; i += FA_THREADS) {
        int r = i / CPR, c8 = (i % CPR) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < n) v = *reinterpret_cast<const uint4 *>(src + (size_t)(r0 + r) * ld + c8);
        *reinterpret_cast<uint4 *>(dst + r * LD + c8) = v;
    }
}

/* the A fragments (16 rows x HS) of rows [0, 16) of a tile (row stride LD) */
template <int HS>
__device__ __forceinline__ void fa_afrag(uint32_t (&a)[HS / 16][4], const bf16 *s, int g, int t) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        a[kk][0] = ld32(s + g * LD + kk * 16 + 2 * t);
        a[kk][1] = ld32(s + (g + 8) * LD + kk * 16 + 2 * t);
        a[kk][2] = ld32(s + g * LD + kk * 16 + 2 * t + 8);
        a[kk][3] = ld32(s + (g + 8) * LD + kk * 16 + 2 * t + 8);
    }
}

/* c[nt] (16 x 8, nt < 8) = A (16 x HS) @ rows [nt 8, nt 8 + 8) of tile s (row stride HS + 8)^T */
template <int HS>
__device__ __forceinline__ void fa_abt(float (&c)[8][4], const uint32_t (&a)[HS / 16][4], const bf16 *s, int g, int t) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) {
            const bf16 *r = s + (nt * 8 + g) * LD + kk * 16 + 2 * t;
            mma_bf16(c[nt], a[kk][0], a[kk][1], a[kk][2], a[kk][3], ld32(r), ld32(r + 8));
        }
    }
}

/* acc (16 x HS) += A (16 x 64, four k chunks of 16) @ tile s (64 x HS, row stride HS + 8), the
 * B fragments by ldmatrix.trans */
template <int HS>
__device__ __forceinline__ void fa_ab(float (&acc)[HS / 8][4], const uint32_t (&a)[4][4], const bf16 *s, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int dt = 0; dt < HS / 8; dt += 2) {
            uint32_t b[4];
            ldsm_x4_t(b, s + (j * 16 + (lane & 15)) * LD + dt * 8 + (lane >> 4) * 8);
            mma_bf16(acc[dt], a[j][0], a[j][1], a[j][2], a[j][3], b[0], b[1]);
            mma_bf16(acc[dt + 1], a[j][0], a[j][1], a[j][2], a[j][3], b[2], b[3]);
        }
    }
}

template <int HS>
__global__ void __launch_bounds__(FA_THREADS) fa_fwd(bf16 *out, float *lse, const bf16 *qkvh, const int *valid,
                                                     int B, int NH, int T, float p, uint64_t seed, uint32_t site) {
    constexpr int LD = HS + 8;
    __shared__ __align__(16) bf16 Qs[FA_T * LD], Ks[FA_T * LD], Vs[FA_T * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, q0 = blockIdx.x * FA_T, C = NH * HS;
    const size_t HT = (size_t)B * T * C;
    const bf16 *q = qkvh + (size_t)bh * T * HS, *k = q + HT, *v = k + HT;
    const int Lv = keys_of(valid, b, T);
    const float sl2 = rsqrtf((float)HS) * 1.4426950408889634f;
    fa_tile<HS>(Qs, q, HS, q0, T);
    __syncthreads();
    uint32_t qa[HS / 16][4];
    fa_afrag<HS>(qa, Qs + warp * 16 * LD, g, t);
    float o[HS / 8][4];
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    const uint32_t sk = att_seedkey(seed, site), thr = att_thr(p);
    const uint32_t rk0 = att_rowkey(sk, (uint64_t)bh * T + i0), rk1 = att_rowkey(sk, (uint64_t)bh * T + i1);
    const float keep = 1.0f / (1.0f - p);
    for (int k0 = 0; k0 < Lv; k0 += FA_T) {
        __syncthreads(); /* the previous tile is used up */
        fa_tile<HS>(Ks, k, HS, k0, Lv);
        fa_tile<HS>(Vs, v, HS, k0, Lv);
        __syncthreads();
        float sc[8][4];
        fa_abt<HS>(sc, qa, Ks, g, t);
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const int j = k0 + nt * 8 + 2 * t;
            sc[nt][0] = j < Lv ? sc[nt][0] * sl2 : -INFINITY;
            sc[nt][1] = j + 1 < Lv ? sc[nt][1] * sl2 : -INFINITY;
            sc[nt][2] = j < Lv ? sc[nt][2] * sl2 : -INFINITY;
            sc[nt][3] = j + 1 < Lv ? sc[nt][3] * sl2 : -INFINITY;
            mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        const float al0 = ex2_approx(m0 - mx0), al1 = ex2_approx(m1 - mx1); /* 0 on the first tile */
        m0 = mx0, m1 = mx1;
        l0 *= al0, l1 *= al1;
#pragma unroll
        for (int dt = 0; dt < HS / 8; dt++) o[dt][0] *= al0, o[dt][1] *= al0, o[dt][2] *= al1, o[dt][3] *= al1;
        uint32_t pa[4][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            float p00 = ex2_approx(sc[nt][0] - m0), p01 = ex2_approx(sc[nt][1] - m0);
            float p10 = ex2_approx(sc[nt][2] - m1), p11 = ex2_approx(sc[nt][3] - m1);
            l0 += p00 + p01, l1 += p10 + p11;
            if (thr) {
                const uint32_t j = (uint32_t)(k0 + nt * 8 + 2 * t);
                p00 *= att_mask(rk0, j, thr, keep), p01 *= att_mask(rk0, j + 1, thr, keep);
                p10 *= att_mask(rk1, j, thr, keep), p11 *= att_mask(rk1, j + 1, thr, keep);
            }
            pa[nt >> 1][(nt & 1) * 2 + 0] = pack_bf16(p00, p01);
            pa[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16(p10, p11);
        }
        fa_ab<HS>(o, pa, Vs, lane);
    }
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float iv0 = 1.0f / l0, iv1 = 1.0f / l1;
    bf16 *ob = out + (size_t)b * T * C + (size_t)h * HS + 2 * t;
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        if (i0 < T) *reinterpret_cast<uint32_t *>(ob + (size_t)i0 * C + dt * 8) = pack_bf16(o[dt][0] * iv0, o[dt][1] * iv0);
        if (i1 < T) *reinterpret_cast<uint32_t *>(ob + (size_t)i1 * C + dt * 8) = pack_bf16(o[dt][2] * iv1, o[dt][3] * iv1);
    }
    if (t == 0) {
        if (i0 < T) lse[(size_t)bh * T + i0] = m0 + log2f(l0);
        if (i1 < T) lse[(size_t)bh * T + i1] = m1 + log2f(l1);
    }
}

/* D[(b NH + h) T + i] = sum_d dO[b, i, h, d] O[b, i, h, d], one thread per (b, i, h); dO and O
 * (BT, C) bf16. */
__global__ void fa_bwd_pre(float *D, const bf16 *dO, const bf16 *O, int B, int NH, int T, int hs) {
    size_t n = (size_t)B * T * NH, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t row = i / NH;
    int h = (int)(i % NH), b = (int)(row / T), tt = (int)(row % T);
    const bf16 *a = dO + row * NH * hs + (size_t)h * hs, *o = O + row * NH * hs + (size_t)h * hs;
    float s = 0.0f;
    for (int d = 0; d < hs; d += 8) {
        uint4 ua = *reinterpret_cast<const uint4 *>(a + d), uo = *reinterpret_cast<const uint4 *>(o + d);
        const __nv_bfloat162 *va = reinterpret_cast<const __nv_bfloat162 *>(&ua), *vo = reinterpret_cast<const __nv_bfloat162 *>(&uo);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 x = __bfloat1622float2(va[e]), y = __bfloat1622float2(vo[e]);
            s += x.x * y.x + x.y * y.y;
        }
    }
    D[((size_t)b * NH + h) * T + tt] = s;
}

/* fa_tile by cp.async (16 bytes a thread, zero-filled past n): lands after cp_async_wait */
template <int HS>
__device__ __forceinline__ void fa_tile_async(bf16 *dst, const bf16 *src, size_t ld, int r0, int n) {
    constexpr int CPR = HS / 8, LD = HS + 8;
    for (int i = threadIdx.x; i < FA_T * CPR; i += FA_THREADS) {
        int r = i / CPR, c8 = (i % CPR) * 8;
        bool ok = r0 + r < n;
        cp_async16(dst + r * LD + c8, ok ? src + (size_t)(r0 + r) * ld + c8 : src, ok ? 16 : 0);
    }
}

/* fa_bwd's dynamic shared memory: K, V, two buffers of the query tile (q, dO, lse, D: the next
 * one loads while this one is used), dS^T */
template <int HS>
struct fa_bwd_smem {
    static constexpr size_t tile = (size_t)FA_T * (HS + 8) * 2;
    static constexpr size_t ks = 0, vs = tile, qs = 2 * tile, dos = 4 * tile, dss = 6 * tile;
    static constexpr size_t ls = dss + (size_t)FA_T * (FA_T + 8) * 2, ds = ls + 2 * FA_T * 4;
    static constexpr size_t bytes = ds + 2 * FA_T * 4;
};

/* dqkv (BT, 3C) bf16: dk and dv columns written here (dq after fa_dq_out); dqf (BT, C) float32,
 * zeroed before, gets dq / scale. */
template <int HS>
__global__ void __launch_bounds__(FA_THREADS) fa_bwd(bf16 *dqkv, float *dqf, const bf16 *qkvh, const bf16 *dO,
                                                     const float *lse, const float *Dv, const int *valid,
                                                     const int *qrows, int B, int NH, int T, float p, uint64_t seed,
                                                     uint32_t site) {
    constexpr int LD = HS + 8, LDS = FA_T + 8;
    typedef fa_bwd_smem<HS> SM;
    extern __shared__ __align__(16) unsigned char fsm[];
    bf16 *Ks = (bf16 *)(fsm + SM::ks), *Vs = (bf16 *)(fsm + SM::vs), *Qb = (bf16 *)(fsm + SM::qs);
    bf16 *dOb = (bf16 *)(fsm + SM::dos), *dSs = (bf16 *)(fsm + SM::dss);
    float *lsb = (float *)(fsm + SM::ls), *Dsb = (float *)(fsm + SM::ds);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH, k0 = blockIdx.x * FA_T, C = NH * HS;
    const size_t HT = (size_t)B * T * C;
    const bf16 *q = qkvh + (size_t)bh * T * HS, *k = q + HT, *v = k + HT;
    const bf16 *dOh = dO + (size_t)b * T * C + (size_t)h * HS;
    bf16 *dk_out = dqkv + (size_t)b * T * 3 * C + C + (size_t)h * HS, *dv_out = dk_out + C;
    const int Lv = keys_of(valid, b, T), Lq = qrows ? keys_of(qrows, b, T) : Lv;
    const float sl2 = rsqrtf((float)HS) * 1.4426950408889634f, scale = rsqrtf((float)HS);
    if (k0 >= Lv) { /* keys of padding only: no gradient */
        constexpr int CPR = HS / 8;
        for (int i = threadIdx.x; i < FA_T * CPR; i += FA_THREADS) {
            int r = i / CPR, c8 = (i % CPR) * 8;
            if (k0 + r >= T) continue;
            *reinterpret_cast<uint4 *>(dk_out + (size_t)(k0 + r) * 3 * C + c8) = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(dv_out + (size_t)(k0 + r) * 3 * C + c8) = make_uint4(0, 0, 0, 0);
        }
        return;
    }
    /* query tile i0 into buffer buf */
    auto stage = [&](int buf, int i0) {
        fa_tile_async<HS>(Qb + buf * FA_T * LD, q, HS, i0, T);
        fa_tile_async<HS>(dOb + buf * FA_T * LD, dOh, C, i0, T);
        if (threadIdx.x < FA_T) {
            int i = i0 + threadIdx.x;
            lsb[buf * FA_T + threadIdx.x] = i < T ? lse[(size_t)bh * T + i] : INFINITY;
            Dsb[buf * FA_T + threadIdx.x] = i < T ? Dv[(size_t)bh * T + i] : 0.0f;
        }
        cp_async_commit();
    };
    stage(0, 0);
    fa_tile<HS>(Ks, k, HS, k0, Lv);
    fa_tile<HS>(Vs, v, HS, k0, Lv);
    __syncthreads();
    uint32_t ka[HS / 16][4], va[HS / 16][4];
    fa_afrag<HS>(ka, Ks + warp * 16 * LD, g, t);
    fa_afrag<HS>(va, Vs + warp * 16 * LD, g, t);
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++)
        dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.0f;
    const int j0 = k0 + warp * 16 + g, j1 = j0 + 8; /* this lane's two keys */
    const bool kv0 = j0 < Lv, kv1 = j1 < Lv;
    const uint32_t sk = att_seedkey(seed, site), thr = att_thr(p);
    const float keep = 1.0f / (1.0f - p);
    for (int i0 = 0, it = 0; i0 < Lq; i0 += FA_T, it++) {
        const int buf = it & 1;
        __syncthreads(); /* the other buffer and dS^T are used up */
        if (i0 + FA_T < Lq) stage(buf ^ 1, i0 + FA_T);
        else cp_async_commit(); /* an empty group keeps the count */
        cp_async_wait<1>();     /* this tile's copies landed */
        __syncthreads();
        const bf16 *Qs = Qb + buf * FA_T * LD, *dOs = dOb + buf * FA_T * LD;
        const float *ls = lsb + buf * FA_T, *Ds = Dsb + buf * FA_T;
        float st[8][4], dpt[8][4];
        fa_abt<HS>(st, ka, Qs, g, t);  /* S^T: keys x queries */
        fa_abt<HS>(dpt, va, dOs, g, t); /* dPd^T */
        uint32_t pa[4][4], sa[4][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const int qi = nt * 8 + 2 * t;
            const float L0 = ls[qi], L1 = ls[qi + 1], D0 = Ds[qi], D1 = Ds[qi + 1];
            float p00 = kv0 ? ex2_approx(st[nt][0] * sl2 - L0) : 0.0f, p01 = kv0 ? ex2_approx(st[nt][1] * sl2 - L1) : 0.0f;
            float p10 = kv1 ? ex2_approx(st[nt][2] * sl2 - L0) : 0.0f, p11 = kv1 ? ex2_approx(st[nt][3] * sl2 - L1) : 0.0f;
            float z00 = 1.0f, z01 = 1.0f, z10 = 1.0f, z11 = 1.0f;
            if (thr) {
                const uint32_t ra = att_rowkey(sk, (uint64_t)bh * T + (uint64_t)(i0 + qi)), rb = att_rowkey(sk, (uint64_t)bh * T + (uint64_t)(i0 + qi + 1));
                z00 = att_mask(ra, (uint32_t)j0, thr, keep), z01 = att_mask(rb, (uint32_t)j0, thr, keep);
                z10 = att_mask(ra, (uint32_t)j1, thr, keep), z11 = att_mask(rb, (uint32_t)j1, thr, keep);
            }
            const float s00 = p00 * (dpt[nt][0] * z00 - D0), s01 = p01 * (dpt[nt][1] * z01 - D1);
            const float s10 = p10 * (dpt[nt][2] * z10 - D0), s11 = p11 * (dpt[nt][3] * z11 - D1);
            pa[nt >> 1][(nt & 1) * 2 + 0] = pack_bf16(p00 * z00, p01 * z01);
            pa[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16(p10 * z10, p11 * z11);
            const uint32_t u0 = pack_bf16(s00, s01), u1 = pack_bf16(s10, s11);
            sa[nt >> 1][(nt & 1) * 2 + 0] = u0;
            sa[nt >> 1][(nt & 1) * 2 + 1] = u1;
            *reinterpret_cast<uint32_t *>(dSs + (warp * 16 + g) * LDS + qi) = u0;
            *reinterpret_cast<uint32_t *>(dSs + (warp * 16 + g + 8) * LDS + qi) = u1;
        }
        fa_ab<HS>(dv, pa, dOs, lane); /* dv += (P Z)^T dO */
        fa_ab<HS>(dk, sa, Qs, lane);  /* dk += dS^T q */
        __syncthreads();              /* dS^T (keys x queries) complete */
        const int qr = i0 + warp * 16;
        if (qr < T) { /* dq rows [qr, qr + 16) += dS k: A = dS from the transposed tile */
            float dq[HS / 8][4];
#pragma unroll
            for (int dt = 0; dt < HS / 8; dt++) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;
            uint32_t a[4][4];
#pragma unroll
            for (int kc = 0; kc < 4; kc++)
                ldsm_x4_t(a[kc], dSs + (kc * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * LDS + warp * 16 + ((lane >> 3) & 1) * 8);
            fa_ab<HS>(dq, a, Ks, lane);
            float *dqr = dqf + ((size_t)b * T + qr + g) * C + (size_t)h * HS + 2 * t;
#pragma unroll
            for (int dt = 0; dt < HS / 8; dt++) {
                if (qr + g < T) atomicAdd(reinterpret_cast<float2 *>(dqr + dt * 8), make_float2(dq[dt][0], dq[dt][1]));
                if (qr + g + 8 < T)
                    atomicAdd(reinterpret_cast<float2 *>(dqr + 8 * (size_t)C + dt * 8), make_float2(dq[dt][2], dq[dt][3]));
            }
        }
    }
#pragma unroll
    for (int dt = 0; dt < HS / 8; dt++) {
        const int col = dt * 8 + 2 * t;
        if (j0 < T) {
            *reinterpret_cast<uint32_t *>(dk_out + (size_t)j0 * 3 * C + col) = pack_bf16(dk[dt][0] * scale, dk[dt][1] * scale);
            *reinterpret_cast<uint32_t *>(dv_out + (size_t)j0 * 3 * C + col) = pack_bf16(dv[dt][0], dv[dt][1]);
        }
        if (j1 < T) {
            *reinterpret_cast<uint32_t *>(dk_out + (size_t)j1 * 3 * C + col) = pack_bf16(dk[dt][2] * scale, dk[dt][3] * scale);
            *reinterpret_cast<uint32_t *>(dv_out + (size_t)j1 * 3 * C + col) = pack_bf16(dv[dt][2], dv[dt][3]);
        }
    }
}

/* dqkv[:, 0:C] = bf16(scale dqf), 8 values a thread */
__global__ void fa_dq_out(bf16 *dqkv, const float *dqf, float scale, size_t BT, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n8 = BT * C / 8;
    if (i >= n8) return;
    size_t e = i * 8, row = e / C;
    int col = (int)(e % C);
    const float4 *s = reinterpret_cast<const float4 *>(dqf + e);
    float4 x = s[0], y = s[1];
    uint4 u;
    u.x = pack_bf16(x.x * scale, x.y * scale), u.y = pack_bf16(x.z * scale, x.w * scale);
    u.z = pack_bf16(y.x * scale, y.y * scale), u.w = pack_bf16(y.z * scale, y.w * scale);
    *reinterpret_cast<uint4 *>(dqkv + row * 3 * C + col) = u;
}

/* ------------------------------------------------------------------------------------------ */
/* the dense head: pooling (cls, mean, mean_sqrt_len, concatenated in that order) and Normalize */

__global__ void pool_fwd(float *out, const float *x, const int *valid, unsigned modes, int B, int T, int C) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * C) return;
    int b = i / C, k = i % C, P = 0;
    for (unsigned m = modes; m; m >>= 1) P += (int)(m & 1);
    P *= C;
    int len = keys_of(valid, b, T), off = 0;
    const float *xb = x + (size_t)b * T * C;
    float *y = out + (size_t)b * P;
    if (modes & KST_POOL_CLS) y[k] = xb[k], off += C;
    if (modes & (KST_POOL_MEAN | KST_POOL_MEAN_SQRT)) {
        float s = 0;
        for (int t = 0; t < len; t++) s += xb[(size_t)t * C + k];
        if (modes & KST_POOL_MEAN) y[off + k] = s / (float)len, off += C;
        if (modes & KST_POOL_MEAN_SQRT) y[off + k] = s / sqrtf((float)len);
    }
}

/* dx (B, T, C) = the pooling's gradient from dy (B, P), written (not added) everywhere. */
__global__ void pool_bwd(float *dx, const float *dy, const int *valid, unsigned modes, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * T * C) return;
    int k = (int)(i % C), t = (int)((i / C) % T), b = (int)(i / ((size_t)T * C)), P = 0;
    for (unsigned m = modes; m; m >>= 1) P += (int)(m & 1);
    P *= C;
    int len = keys_of(valid, b, T), off = 0;
    const float *g = dy + (size_t)b * P;
    float v = 0;
    if (modes & KST_POOL_CLS) {
        if (t == 0) v += g[k];
        off += C;
    }
    if (modes & KST_POOL_MEAN) {
        if (t < len) v += g[off + k] / (float)len;
        off += C;
    }
    if ((modes & KST_POOL_MEAN_SQRT) && t < len) v += g[off + k] * (1.0f / sqrtf((float)len));
    dx[i] = v;
}

/* One warp per row: out = x / max(|x|, 1e-12), norm = |x|. */
__global__ void l2norm_fwd(float *out, float *norm, const float *x, int N, int D) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    const float *v = x + (size_t)row * D;
    float s = 0;
    for (int c = lane; c < D; c += 32) s += v[c] * v[c];
    float n = sqrtf(warp_sum(s)), inv = 1.0f / fmaxf(n, 1e-12f);
    for (int c = lane; c < D; c += 32) out[(size_t)row * D + c] = v[c] * inv;
    if (lane == 0) norm[row] = n;
}

/* dx = (dy - y (y . dy)) / |x| (y the output), or dy * 1e12 where the norm was clamped. */
__global__ void l2norm_bwd(float *dx, const float *dy, const float *y, const float *norm, int N, int D) {
    int row = blockIdx.x * RW + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= N) return;
    size_t o = (size_t)row * D;
    float n = norm[row];
    if (n <= 1e-12f) {
        for (int c = lane; c < D; c += 32) dx[o + c] = dy[o + c] * 1e12f;
        return;
    }
    float yd = 0;
    for (int c = lane; c < D; c += 32) yd += y[o + c] * dy[o + c];
    yd = warp_sum(yd);
    for (int c = lane; c < D; c += 32) dx[o + c] = (dy[o + c] - y[o + c] * yd) / n;
}

__global__ void to_bf16(bf16 *dst, const float *src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* state */

/* What one side's forward keeps (device memory), sized for cap_tok tokens and cap_att scores. */
struct gside {
    size_t B, T, cap_tok, cap_att, cap_B, bytes;
    float dropout;
    uint64_t seed;
    int32_t *ids, *types;
    int *valid;
    int *rows;                        /* (B) rows with a gradient (forward_rows), when has_rows */
    int has_rows;
    float *emb, *emb_mean, *emb_rstd; /* (BT, C), (BT) */
    float *xf;                        /* (BT, C) the current layer output, float32 (the residual
                                       * stream; the backward needs only its bf16 copies) */
    bf16 *xb;                         /* (L + 1, BT, C) layer outputs in bf16 (matrix-product inputs) */
    bf16 *qkvh;                       /* (L, 3, B, NH, T, hs) q, k, v with biases */
    bf16 *P;                          /* (L, B, NH, T, T) attention probabilities (materialised
                                       * path only) */
    float *lse;                       /* (L, B, NH, T) row log-sum-exp, base 2 (flash path only) */
    bf16 *atty;                       /* (L, BT, C) attended values */
    float *res1, *res2;               /* (L, BT, C) LayerNorm inputs */
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd; /* (L, BT) */
    float *ln1f;                      /* (BT, C) the current layer's LN1 output (residual) */
    bf16 *ln1b;                       /* (L, BT, C) LN1 outputs in bf16 */
    bf16 *fch;                        /* (L, BT, FF) pre-activation (with bias); the activation
                                       * is recomputed in the backward */
    float *pooled, *vec, *norm, *dpool; /* (B, D), (B, D), (B), (B, D); ColBERT: (BT, D), (BT, D), (BT),
                                         * (BT, D): the projection, its normalised rows, their norms */
    bf16 *dpre;                       /* ColBERT: (BT, D) d loss / d projection, bf16 */
};

struct kst_bert_gpu_train {
    kst_bert_config cfg;
    size_t NP, hs, D;
    unsigned modes;
    int normalize;
    int colbert; /* the ColBERT head (linear without bias, L2 norm per token) instead of pooling */
    int flash; /* attention without the T x T matrix (head sizes 16, 32, 64); else materialised */
    size_t off[KST_BERT_NPARAMS]; /* tensor offsets in the flat buffers */
    cudaStream_t stream;
    cublasHandle_t blas;
    float *params, *grads;
    bf16 *pb16;
    gside side[KST_GPU_TRAIN_SIDES];
    /* scratch shared by the sides (one runs at a time) */
    size_t cap_tok, cap_att;
    bf16 *qkv_tmp;  /* (BT, 3C) */
    float *S;       /* (B, NH, T, T) scores, then d Pd (materialised path) */
    float *Dv;      /* (B, NH, T) rowsum(dO * O) (flash path) */
    bf16 *Pd;       /* (B, NH, T, T) dropped probabilities, then dS */
    bf16 *o;        /* (B, NH, T, hs) attended values per head, then dO */
    bf16 *dqkvh;    /* (3, B, NH, T, hs) */
    bf16 *tmpC, *tmpC2; /* (BT, C) */
    bf16 *dff;      /* (BT, FF) */
    bf16 *fca;      /* (BT, FF) the activation, in the forward and again in the backward */
    float *dx, *dres; /* (BT, C) */
    size_t scratch_bytes, bytes, peak; /* bytes held now, and the most held at once */
};

static int dalloc(kst_bert_gpu_train *g, void **p, size_t bytes, const char *what, kst_error *err) {
    int rc = kst_gpu_alloc(p, bytes, what, err);
    if (rc == KST_OK) {
        g->bytes += bytes;
        if (g->bytes > g->peak) g->peak = g->bytes;
    }
    return rc;
}
static void dfree(void *p) {
    if (p) cudaFree(p);
}

static void side_release(gside *s) {
    void *bufs[] = {s->ids, s->types, s->valid, s->rows, s->emb, s->emb_mean, s->emb_rstd, s->xf, s->xb, s->qkvh,
                    s->P, s->lse, s->atty, s->res1, s->res2, s->ln1_mean, s->ln1_rstd, s->ln2_mean, s->ln2_rstd,
                    s->ln1f, s->ln1b, s->fch, s->pooled, s->vec, s->norm, s->dpool, s->dpre};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) dfree(bufs[i]);
    memset(s, 0, sizeof *s);
}

/* Grows side s for B sequences of T tokens (contents are not kept). */
static int side_reserve(kst_bert_gpu_train *g, gside *s, size_t B, size_t T, kst_error *err) {
    const kst_bert_config *c = &g->cfg;
    size_t tok = B * T, att = g->flash ? 0 : B * c->NH * T * T;
    if (tok <= s->cap_tok && att <= s->cap_att && B <= s->cap_B) return KST_OK;
    if (tok < s->cap_tok) tok = s->cap_tok;
    if (att < s->cap_att) att = s->cap_att;
    if (B < s->cap_B) B = s->cap_B;
    cudaStreamSynchronize(g->stream);
    g->bytes -= s->bytes;
    side_release(s);
    int rc = KST_OK;
    size_t L = c->L, C = c->C, FF = c->FF, D = g->D;
#define SA(ptr, n, what) KST_TRY(dalloc(g, (void **)&s->ptr, (n) * sizeof *s->ptr, what, err)); s->bytes += (n) * sizeof *s->ptr
    SA(ids, tok, "token ids");
    SA(types, tok, "token types");
    SA(valid, B, "lengths");
    SA(rows, B, "lengths");
    SA(emb, tok * C, "training activations");
    SA(emb_mean, tok, "training activations");
    SA(emb_rstd, tok, "training activations");
    SA(xf, tok * C, "training activations");
    SA(xb, (L + 1) * tok * C, "training activations");
    SA(qkvh, L * 3 * tok * C, "training activations");
    if (g->flash) {
        SA(lse, L * tok * c->NH, "attention row statistics");
    } else {
        SA(P, L * att, "attention probabilities");
    }
    SA(atty, L * tok * C, "training activations");
    SA(res1, L * tok * C, "training activations");
    SA(res2, L * tok * C, "training activations");
    SA(ln1_mean, L * tok, "training activations");
    SA(ln1_rstd, L * tok, "training activations");
    SA(ln2_mean, L * tok, "training activations");
    SA(ln2_rstd, L * tok, "training activations");
    SA(ln1f, tok * C, "training activations");
    SA(ln1b, L * tok * C, "training activations");
    SA(fch, L * tok * FF, "training activations");
    {
        size_t R = g->colbert ? tok : B; /* head output rows */
        SA(pooled, R * D, "head activations");
        SA(vec, R * D, "head activations");
        SA(norm, R, "head activations");
        SA(dpool, R * D, "head gradients");
        if (g->colbert) {
            SA(dpre, R * D, "head gradients");
        }
    }
#undef SA
    s->cap_tok = tok, s->cap_att = att, s->cap_B = B;
done:
    if (rc != KST_OK) {
        g->bytes -= s->bytes;
        side_release(s);
    }
    return rc;
}

static void scratch_release(kst_bert_gpu_train *g) {
    void *bufs[] = {g->qkv_tmp, g->S, g->Dv, g->Pd, g->o, g->dqkvh, g->tmpC, g->tmpC2, g->dff, g->fca, g->dx, g->dres};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) dfree(bufs[i]);
    g->qkv_tmp = NULL, g->S = NULL, g->Dv = NULL, g->Pd = NULL, g->o = NULL, g->dqkvh = NULL;
    g->tmpC = g->tmpC2 = g->dff = g->fca = NULL, g->dx = g->dres = NULL;
}

static int scratch_reserve(kst_bert_gpu_train *g, size_t B, size_t T, kst_error *err) {
    const kst_bert_config *c = &g->cfg;
    size_t tok = B * T, att = g->flash ? 0 : B * c->NH * T * T;
    if (tok <= g->cap_tok && att <= g->cap_att) return KST_OK;
    if (tok < g->cap_tok) tok = g->cap_tok;
    if (att < g->cap_att) att = g->cap_att;
    cudaStreamSynchronize(g->stream);
    g->bytes -= g->scratch_bytes;
    g->scratch_bytes = 0;
    scratch_release(g);
    g->cap_tok = g->cap_att = 0;
    int rc = KST_OK;
    size_t C = c->C;
#define GA(ptr, n, what) KST_TRY(dalloc(g, (void **)&g->ptr, (n) * sizeof *g->ptr, what, err)); g->scratch_bytes += (n) * sizeof *g->ptr
    GA(qkv_tmp, tok * 3 * C, "training scratch");
    if (g->flash) {
        GA(Dv, tok * c->NH, "attention scratch");
    } else {
        GA(S, att, "attention scores");
        GA(Pd, att, "attention scratch");
        GA(o, tok * C, "training scratch");
        GA(dqkvh, 3 * tok * C, "training scratch");
    }
    GA(tmpC, tok * C, "training scratch");
    GA(tmpC2, tok * C, "training scratch");
    GA(dff, tok * c->FF, "training scratch");
    GA(fca, tok * c->FF, "training scratch");
    GA(dx, tok * C, "training scratch");
    GA(dres, tok * C, "training scratch");
#undef GA
    g->cap_tok = tok, g->cap_att = att;
done:
    if (rc != KST_OK) {
        g->bytes -= g->scratch_bytes;
        g->scratch_bytes = 0;
        scratch_release(g);
    }
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* matrix products (row-major views over cuBLAS's column-major) */

static int gemm(kst_bert_gpu_train *g, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                float alpha, const void *A, int lda, long long sA, const void *B, int ldb, long long sB,
                float beta, void *C, cudaDataType ct, int ldc, long long sC, int count, kst_error *err) {
    int rc = KST_OK;
    if (count == 1)
        CUBLAS_TRY(cublasGemmEx(g->blas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb,
                                &beta, C, ct, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx (training)");
    else
        CUBLAS_TRY(cublasGemmStridedBatchedEx(g->blas, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, sA, B,
                                              CUDA_R_16BF, ldb, sB, &beta, C, ct, ldc, sC, count,
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmStridedBatchedEx (attention)");
done:
    return rc;
}

static const cublasOperation_t NT = CUBLAS_OP_N, TT_ = CUBLAS_OP_T;

/* Y (N, OC) bf16 = X (N, C) @ W (OC, C)^T */
static int lin_fwd(kst_bert_gpu_train *g, bf16 *Y, const bf16 *X, const bf16 *W, size_t N, size_t C,
                   size_t OC, kst_error *err) {
    return gemm(g, TT_, NT, (int)OC, (int)N, (int)C, 1.0f, W, (int)C, 0, X, (int)C, 0, 0.0f, Y,
                CUDA_R_16BF, (int)OC, 0, 1, err);
}
/* dX (N, C) = beta dX + dY (N, OC) @ W (OC, C); dX float32 or bf16 */
static int lin_dx(kst_bert_gpu_train *g, void *dX, cudaDataType ct, float beta, const bf16 *dY,
                  const bf16 *W, size_t N, size_t C, size_t OC, kst_error *err) {
    return gemm(g, NT, NT, (int)C, (int)N, (int)OC, 1.0f, W, (int)C, 0, dY, (int)OC, 0, beta, dX, ct,
                (int)C, 0, 1, err);
}
/* dW (OC, C) float32 += dY (N, OC)^T @ X (N, C) */
static int lin_dw(kst_bert_gpu_train *g, float *dW, const bf16 *dY, const bf16 *X, size_t N, size_t C,
                  size_t OC, kst_error *err) {
    return gemm(g, NT, TT_, (int)C, (int)OC, (int)N, 1.0f, X, (int)C, 0, dY, (int)OC, 0, 1.0f, dW,
                CUDA_R_32F, (int)C, 0, 1, err);
}

static unsigned blocks(size_t n, unsigned per) { return (unsigned)((n + per - 1) / per); }

/* grid for the (32, 8) column-sum kernels over R rows and N columns */
static dim3 colsum_grid(size_t R, size_t N) {
    size_t gy = (R + 63) / 64;
    if (gy > 256) gy = 256;
    return dim3((unsigned)((N + 31) / 32), (unsigned)(gy ? gy : 1));
}

/* flash attention of one layer: O (BT, C) and the row statistics from q, k, v (3, B, NH, T, hs) */
static int fa_forward(kst_bert_gpu_train *g, bf16 *O, float *lse, const bf16 *qkvh, const int *valid, size_t B, size_t T,
                      float p, uint64_t seed, uint32_t site, kst_error *err) {
    int rc = KST_OK;
    int NH = (int)g->cfg.NH;
    dim3 grid((unsigned)((T + FA_T - 1) / FA_T), (unsigned)(B * NH));
    cudaStream_t st = g->stream;
    switch (g->hs) {
    case 16: fa_fwd<16><<<grid, FA_THREADS, 0, st>>>(O, lse, qkvh, valid, (int)B, NH, (int)T, p, seed, site); break;
    case 32: fa_fwd<32><<<grid, FA_THREADS, 0, st>>>(O, lse, qkvh, valid, (int)B, NH, (int)T, p, seed, site); break;
    default: fa_fwd<64><<<grid, FA_THREADS, 0, st>>>(O, lse, qkvh, valid, (int)B, NH, (int)T, p, seed, site); break;
    }
    CU_LAUNCHED("attention (flash)");
done:
    return rc;
}

/* its backward: dqkv (BT, 3C) from dO (BT, C), O, the statistics and q, k, v; g->dres (free at
 * this point of the backward) holds dq in float32 meanwhile */
static int fa_backward(kst_bert_gpu_train *g, bf16 *dqkv, const bf16 *qkvh, const bf16 *dO, const bf16 *O,
                       const float *lse, const int *valid, const int *qrows, size_t B, size_t T, float p, uint64_t seed,
                       uint32_t site, kst_error *err) {
    int rc = KST_OK;
    int NH = (int)g->cfg.NH, C = (int)g->cfg.C;
    size_t BT = B * T;
    dim3 grid((unsigned)((T + FA_T - 1) / FA_T), (unsigned)(B * NH));
    cudaStream_t st = g->stream;
    fa_bwd_pre<<<blocks(BT * NH, 256), 256, 0, st>>>(g->Dv, dO, O, (int)B, NH, (int)T, (int)g->hs);
    CU_LAUNCHED("attention backward (D)");
    CU_TRY(cudaMemsetAsync(g->dres, 0, BT * C * sizeof(float), st), "zeroing dq");
    switch (g->hs) {
    case 16: fa_bwd<16><<<grid, FA_THREADS, fa_bwd_smem<16>::bytes, st>>>(dqkv, g->dres, qkvh, dO, lse, g->Dv, valid, qrows, (int)B, NH, (int)T, p, seed, site); break;
    case 32: fa_bwd<32><<<grid, FA_THREADS, fa_bwd_smem<32>::bytes, st>>>(dqkv, g->dres, qkvh, dO, lse, g->Dv, valid, qrows, (int)B, NH, (int)T, p, seed, site); break;
    default: fa_bwd<64><<<grid, FA_THREADS, fa_bwd_smem<64>::bytes, st>>>(dqkv, g->dres, qkvh, dO, lse, g->Dv, valid, qrows, (int)B, NH, (int)T, p, seed, site); break;
    }
    CU_LAUNCHED("attention backward (flash)");
    fa_dq_out<<<blocks(BT * C / 8, 256), 256, 0, st>>>(dqkv, g->dres, 1.0f / sqrtf((float)g->hs), BT, C);
    CU_LAUNCHED("attention backward (dq)");
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* API */

extern "C" int kst_bert_gpu_train_create(const kst_bert *m, unsigned pool_modes, int normalize,
                                         kst_bert_gpu_train **out, kst_error *err) {
    *out = NULL;
    int rc = kst_gpu_check(err);
    if (rc != KST_OK) return rc;
    const kst_bert_config *c = &m->cfg;
    if (!c->NH || c->C % c->NH || (c->C / c->NH) % 8)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "GPU training: hidden size %zu over %zu heads gives a head size that is not a multiple of 8; train on the CPU (--device cpu)",
                        c->C, c->NH);
    if (c->FF % 8)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "GPU training: feed-forward width %zu is not a multiple of 8; train on the CPU (--device cpu)", c->FF);
    if (c->TT > 4)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "GPU training: %zu token types (at most 4 on the GPU); train on the CPU (--device cpu)", c->TT);
    if (c->proj_dim && c->dense_out)
        return kst_fail(err, KST_ERR_INVALID, "GPU training: a model with both a ColBERT linear and a Dense layer");
    if (!c->proj_dim && (pool_modes & KST_POOL_MAX))
        return kst_fail(err, KST_ERR_UNSUPPORTED, "GPU training: max pooling is not implemented on the GPU; train this student with --device cpu");
    if (!c->proj_dim && !(pool_modes & (KST_POOL_CLS | KST_POOL_MEAN | KST_POOL_MEAN_SQRT)))
        return kst_fail(err, KST_ERR_INVALID, "GPU training: no pooling mode given");
    if (c->dense_out)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "GPU training: the sentence-transformers Dense layer is not implemented on the GPU; train this student with --device cpu");
    kst_bert_gpu_train *g = (kst_bert_gpu_train *)kst_calloc(1, sizeof *g, "GPU trainer", err);
    if (!g) return KST_ERR_NOMEM;
    g->cfg = *c;
    g->NP = m->num_params;
    g->hs = c->C / c->NH;
    {
        /* KESTREL_GPU_TRAIN_FLASH=0 keeps the materialised attention (for comparisons) */
        const char *e = getenv("KESTREL_GPU_TRAIN_FLASH");
        g->flash = (g->hs == 16 || g->hs == 32 || g->hs == 64) && !(e && !strcmp(e, "0"));
    }
    if (g->flash) { /* fa_bwd<64> takes 64 KiB of shared memory */
        CU_TRY(cudaFuncSetAttribute(fa_bwd<16>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)fa_bwd_smem<16>::bytes), "fa_bwd smem");
        CU_TRY(cudaFuncSetAttribute(fa_bwd<32>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)fa_bwd_smem<32>::bytes), "fa_bwd smem");
        CU_TRY(cudaFuncSetAttribute(fa_bwd<64>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)fa_bwd_smem<64>::bytes), "fa_bwd smem");
    }
    g->colbert = c->proj_dim > 0;
    g->modes = g->colbert ? 0 : pool_modes;
    g->normalize = g->colbert ? 1 : normalize;
    g->D = g->colbert ? c->proj_dim : kst_pool_dim(pool_modes, c->C);
    {
        const float *const *ps = (const float *const *)&m->params;
        for (int i = 0; i < KST_BERT_NPARAMS; i++) g->off[i] = ps[i] ? (size_t)(ps[i] - m->param_mem) : 0;
    }
    CU_TRY(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking), "creating a stream");
    CUBLAS_TRY(cublasCreate(&g->blas), "creating the cuBLAS handle");
    CUBLAS_TRY(cublasSetStream(g->blas, g->stream), "cublasSetStream");
    KST_TRY(dalloc(g, (void **)&g->params, g->NP * sizeof(float), "the weights", err));
    KST_TRY(dalloc(g, (void **)&g->grads, g->NP * sizeof(float), "the gradients", err));
    KST_TRY(dalloc(g, (void **)&g->pb16, g->NP * sizeof(bf16), "the bf16 weights", err));
    CU_TRY(cudaMemsetAsync(g->grads, 0, g->NP * sizeof(float), g->stream), "zeroing the gradients");
    KST_TRY(kst_bert_gpu_train_set_params(g, m->param_mem, err));
    *out = g;
    return KST_OK;
done:
    kst_bert_gpu_train_free(g);
    return rc;
}

extern "C" void kst_bert_gpu_train_free(kst_bert_gpu_train *g) {
    if (!g) return;
    if (g->stream) cudaStreamSynchronize(g->stream);
    for (int i = 0; i < KST_GPU_TRAIN_SIDES; i++) side_release(&g->side[i]);
    scratch_release(g);
    dfree(g->params);
    dfree(g->grads);
    dfree(g->pb16);
    if (g->blas) cublasDestroy(g->blas);
    if (g->stream) cudaStreamDestroy(g->stream);
    kst_free(g);
}

/* pointers into the flat buffers, by kst_bert_params field order */
enum { P_WTE, P_WPE, P_WTT, P_EMBLNW, P_EMBLNB, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB, P_LN1W, P_LN1B,
       P_FCW, P_FCB, P_FCPROJW, P_FCPROJB, P_LN2W, P_LN2B, P_POOLW, P_POOLB, P_CLSW, P_CLSB, P_PROJW };
#define PF(i) (g->params + g->off[i])
#define PB(i) (g->pb16 + g->off[i])
#define GR(i) (g->grads + g->off[i])

extern "C" int kst_bert_gpu_train_forward(kst_bert_gpu_train *g, int sidx, const int32_t *ids,
                                          const int32_t *type_ids, const int *valid, size_t B, size_t T,
                                          float dropout, uint64_t seed, kst_error *err) {
    return kst_bert_gpu_train_forward_rows(g, sidx, ids, type_ids, valid, NULL, B, T, dropout, seed, err);
}

extern "C" int kst_bert_gpu_train_forward_rows(kst_bert_gpu_train *g, int sidx, const int32_t *ids,
                                               const int32_t *type_ids, const int *valid, const int *rows,
                                               size_t B, size_t T, float dropout, uint64_t seed, kst_error *err) {
    const kst_bert_config *c = &g->cfg;
    if (sidx < 0 || sidx >= KST_GPU_TRAIN_SIDES) return kst_fail(err, KST_ERR_MISUSE, "GPU training: side %d", sidx);
    if (!B || !T) return kst_fail(err, KST_ERR_INVALID, "GPU training: empty batch");
    if (T > c->P)
        return kst_fail(err, KST_ERR_INVALID, "GPU training: %zu tokens exceed max_position_embeddings %zu", T, c->P);
    if (!(dropout >= 0 && dropout < 1)) return kst_fail(err, KST_ERR_INVALID, "dropout %g is outside [0, 1)", (double)dropout);
    size_t BT = B * T, C = c->C, FF = c->FF, NH = c->NH, hs = g->hs, L = c->L;
    {
        int idrc = kst_bert_check_ids(c, ids, type_ids, BT, T, err);
        if (idrc != KST_OK) return idrc;
    }
    gside *s = &g->side[sidx];
    int rc = side_reserve(g, s, B, T, err);
    if (rc == KST_OK) rc = scratch_reserve(g, B, T, err);
    if (rc != KST_OK) return rc;
    s->B = B, s->T = T, s->dropout = dropout, s->seed = seed;
    cudaStream_t st = g->stream;
    CU_TRY(cudaMemcpyAsync(s->ids, ids, BT * sizeof *ids, cudaMemcpyHostToDevice, st), "copying token ids");
    if (type_ids) CU_TRY(cudaMemcpyAsync(s->types, type_ids, BT * sizeof *ids, cudaMemcpyHostToDevice, st), "copying token types");
    else CU_TRY(cudaMemsetAsync(s->types, 0, BT * sizeof *ids, st), "zeroing token types");
    CU_TRY(cudaMemcpyAsync(s->valid, valid, B * sizeof *valid, cudaMemcpyHostToDevice, st), "copying lengths");
    s->has_rows = rows != NULL;
    if (rows) CU_TRY(cudaMemcpyAsync(s->rows, rows, B * sizeof *rows, cudaMemcpyHostToDevice, st), "copying lengths");
    {
        size_t A = B * NH * T * T, HT = BT * C; /* one head-split tensor */
        float scale = 1.0f / sqrtf((float)hs);
        int bert = c->arch == KST_ARCH_BERT;
        embed_ln_fwd<<<blocks(BT, RW), RW * 32, 0, st>>>(s->emb, s->emb_mean, s->emb_rstd, s->xf, s->xb, s->ids, s->types,
                                                         PF(P_WTE), PF(P_WPE), c->TT ? PF(P_WTT) : NULL, PF(P_EMBLNW),
                                                         PF(P_EMBLNB), (int)BT, (int)T, (int)C, c->eps, dropout, seed);
        CU_LAUNCHED("embedding + LayerNorm");
        for (size_t l = 0; l < L; l++) {
            bf16 *xin = s->xb + l * BT * C, *qkvh = s->qkvh + l * 3 * HT, *P = g->flash ? NULL : s->P + l * A;
            bf16 *atty = s->atty + l * BT * C;
            uint32_t site = (uint32_t)(1 + 3 * l);
            KST_TRY(lin_fwd(g, g->qkv_tmp, xin, PB(P_QKVW) + l * 3 * C * C, BT, C, 3 * C, err));
            split_heads<<<blocks(BT * 3 * C / 8, 256), 256, 0, st>>>(qkvh, g->qkv_tmp, PF(P_QKVB) + l * 3 * C, (int)B,
                                                                    (int)T, (int)NH, (int)hs, 3);
            CU_LAUNCHED("split heads");
            if (g->flash) {
                KST_TRY(fa_forward(g, atty, s->lse + l * BT * NH, qkvh, s->valid, B, T, dropout, seed, site, err));
            } else {
                /* S (T, T) = scale q k^T per (b, h) */
                KST_TRY(gemm(g, TT_, NT, (int)T, (int)T, (int)hs, scale, qkvh + HT, (int)hs, (long long)(T * hs), qkvh,
                             (int)hs, (long long)(T * hs), 0.0f, g->S, CUDA_R_32F, (int)T, (long long)(T * T), (int)(B * NH), err));
                softmax_fwd<<<blocks(B * NH * T, RW), RW * 32, 0, st>>>(P, dropout > 0 ? g->Pd : NULL, g->S, s->valid, (int)B,
                                                                       (int)NH, (int)T, dropout, seed, site);
                CU_LAUNCHED("softmax");
                /* O (T, hs) = Pd (T, T) @ v (T, hs) */
                KST_TRY(gemm(g, NT, NT, (int)hs, (int)T, (int)T, 1.0f, qkvh + 2 * HT, (int)hs, (long long)(T * hs),
                             dropout > 0 ? g->Pd : P, (int)T, (long long)(T * T), 0.0f, g->o, CUDA_R_16BF, (int)hs,
                             (long long)(T * hs), (int)(B * NH), err));
                merge_heads<<<blocks(BT * C / 8, 256), 256, 0, st>>>(atty, g->o, (int)B, (int)T, (int)NH, (int)hs, 1);
                CU_LAUNCHED("merge heads");
            }
            KST_TRY(lin_fwd(g, g->tmpC, atty, PB(P_ATTPROJW) + l * C * C, BT, C, C, err));
            bias_res_ln_fwd<<<blocks(BT, RW), RW * 32, 0, st>>>(
                s->res1 + l * BT * C, s->ln1_mean + l * BT, s->ln1_rstd + l * BT, s->ln1f,
                s->ln1b + l * BT * C, g->tmpC, PF(P_ATTPROJB) + l * C, s->xf, PF(P_LN1W) + l * C,
                PF(P_LN1B) + l * C, (int)BT, (int)C, c->eps, bert ? dropout : 0.0f, seed, site + 1);
            CU_LAUNCHED("bias + residual + LayerNorm");
            bf16 *fch = s->fch + l * BT * FF, *fca = g->fca;
            KST_TRY(lin_fwd(g, fch, s->ln1b + l * BT * C, PB(P_FCW) + l * FF * C, BT, C, FF, err));
            bias_act_fwd<<<blocks(BT * FF / 8, 256), 256, 0, st>>>(fch, fca, PF(P_FCB) + l * FF, BT * FF / 8, (int)FF, (int)c->act);
            CU_LAUNCHED("bias + activation");
            KST_TRY(lin_fwd(g, g->tmpC, fca, PB(P_FCPROJW) + l * C * FF, BT, FF, C, err));
            bias_res_ln_fwd<<<blocks(BT, RW), RW * 32, 0, st>>>(
                s->res2 + l * BT * C, s->ln2_mean + l * BT, s->ln2_rstd + l * BT, s->xf,
                s->xb + (l + 1) * BT * C, g->tmpC, PF(P_FCPROJB) + l * C, s->ln1f, PF(P_LN2W) + l * C,
                PF(P_LN2B) + l * C, (int)BT, (int)C, c->eps, dropout, seed, site + 2);
            CU_LAUNCHED("bias + residual + LayerNorm");
        }
        const float *h = s->xf;
        if (g->colbert) {
            /* pre (BT, D) float32 = the last hidden states (bf16) @ projw^T; vec = pre / |pre| per row */
            KST_TRY(gemm(g, TT_, NT, (int)g->D, (int)BT, (int)C, 1.0f, PB(P_PROJW), (int)C, 0, s->xb + L * BT * C, (int)C,
                         0, 0.0f, s->pooled, CUDA_R_32F, (int)g->D, 0, 1, err));
            l2norm_fwd<<<blocks(BT, RW), RW * 32, 0, st>>>(s->vec, s->norm, s->pooled, (int)BT, (int)g->D);
            CU_LAUNCHED("ColBERT normalisation");
            goto done;
        }
        pool_fwd<<<blocks(B * C, 256), 256, 0, st>>>(s->pooled, h, s->valid, g->modes, (int)B, (int)T, (int)C);
        CU_LAUNCHED("pooling");
        if (g->normalize) {
            l2norm_fwd<<<blocks(B, RW), RW * 32, 0, st>>>(s->vec, s->norm, s->pooled, (int)B, (int)g->D);
            CU_LAUNCHED("Normalize");
        } else {
            CU_TRY(cudaMemcpyAsync(s->vec, s->pooled, B * g->D * sizeof(float), cudaMemcpyDeviceToDevice, st), "copying vectors");
        }
    }
done:
    return rc;
}

extern "C" int kst_bert_gpu_train_backward(kst_bert_gpu_train *g, int sidx, const float *dvec, kst_error *err) {
    int rc = KST_OK;
    const kst_bert_config *c = &g->cfg;
    if (sidx < 0 || sidx >= KST_GPU_TRAIN_SIDES || !g->side[sidx].B)
        return kst_fail(err, KST_ERR_MISUSE, "GPU training: backward of side %d without its forward", sidx);
    gside *s = &g->side[sidx];
    size_t B = s->B, T = s->T, BT = B * T, C = c->C, FF = c->FF, NH = c->NH, hs = g->hs, L = c->L, D = g->D;
    size_t A = B * NH * T * T, HT = BT * C;
    float p = s->dropout, scale = 1.0f / sqrtf((float)hs);
    uint64_t seed = s->seed;
    int bert = c->arch == KST_ARCH_BERT;
    cudaStream_t st = g->stream;
    const float *dpool = dvec;
    if (g->colbert) {
        /* dvec (BT, D) -> d pre (normalisation backward) -> d projw += d pre^T h, d h = d pre projw */
        l2norm_bwd<<<blocks(BT, RW), RW * 32, 0, st>>>(s->dpool, dvec, s->vec, s->norm, (int)BT, (int)D);
        CU_LAUNCHED("ColBERT normalisation backward");
        to_bf16<<<blocks(BT * D, 256), 256, 0, st>>>(s->dpre, s->dpool, BT * D);
        CU_LAUNCHED("bf16 head gradient");
        KST_TRY(lin_dw(g, GR(P_PROJW), s->dpre, s->xb + L * BT * C, BT, C, D, err));
        KST_TRY(lin_dx(g, g->dx, CUDA_R_32F, 0.0f, s->dpre, PB(P_PROJW), BT, C, D, err));
    } else {
        if (g->normalize) {
            l2norm_bwd<<<blocks(B, RW), RW * 32, 0, st>>>(s->dpool, dvec, s->vec, s->norm, (int)B, (int)D);
            CU_LAUNCHED("Normalize backward");
            dpool = s->dpool;
        }
        pool_bwd<<<blocks(BT * C, 256), 256, 0, st>>>(g->dx, dpool, s->valid, g->modes, (int)B, (int)T, (int)C);
        CU_LAUNCHED("pooling backward");
    }
    for (size_t l = L; l-- > 0;) {
        uint32_t site = (uint32_t)(1 + 3 * l);
        const bf16 *qkvh = s->qkvh + l * 3 * HT, *P = g->flash ? NULL : s->P + l * A;
        /* LN2: dres = d res2; tmpC = d fcproj (through its dropout) */
        ln_bwd<<<blocks(BT, RW), RW * 32, 0, st>>>(g->dres, g->tmpC, g->dx, s->res2 + l * BT * C, PF(P_LN2W) + l * C,
                                                   s->ln2_mean + l * BT, s->ln2_rstd + l * BT, (int)BT, (int)C, 0.0f, 0,
                                                   p, site + 2, seed);
        CU_LAUNCHED("LayerNorm backward");
        ln_param_bwd<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_LN2W) + l * C, GR(P_LN2B) + l * C, g->dx,
                                                                 s->res2 + l * BT * C, s->ln2_mean + l * BT,
                                                                 s->ln2_rstd + l * BT, (int)BT, (int)C, 0.0f, 0, seed);
        CU_LAUNCHED("LayerNorm parameter backward");
        colsum_bf16<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_FCPROJB) + l * C, g->tmpC, (int)BT, (int)C);
        CU_LAUNCHED("bias backward");
        act_again<<<blocks(BT * FF / 8, 256), 256, 0, st>>>(g->fca, s->fch + l * BT * FF, BT * FF / 8, (int)c->act);
        CU_LAUNCHED("activation (again)");
        KST_TRY(lin_dw(g, GR(P_FCPROJW) + l * C * FF, g->tmpC, g->fca, BT, FF, C, err));
        KST_TRY(lin_dx(g, g->dff, CUDA_R_16BF, 0.0f, g->tmpC, PB(P_FCPROJW) + l * C * FF, BT, FF, C, err));
        act_bwd<<<blocks(BT * FF / 8, 256), 256, 0, st>>>(g->dff, s->fch + l * BT * FF, BT * FF / 8, (int)c->act);
        CU_LAUNCHED("activation backward");
        colsum_bf16<<<colsum_grid(BT, FF), dim3(32, 8), 0, st>>>(GR(P_FCB) + l * FF, g->dff, (int)BT, (int)FF);
        CU_LAUNCHED("bias backward");
        KST_TRY(lin_dw(g, GR(P_FCW) + l * FF * C, g->dff, s->ln1b + l * BT * C, BT, C, FF, err));
        KST_TRY(lin_dx(g, g->dres, CUDA_R_32F, 1.0f, g->dff, PB(P_FCW) + l * FF * C, BT, C, FF, err));
        /* LN1: dx = d res1 (the residual's share goes to the layer input), tmpC = d attproj */
        ln_bwd<<<blocks(BT, RW), RW * 32, 0, st>>>(g->dx, g->tmpC, g->dres, s->res1 + l * BT * C, PF(P_LN1W) + l * C,
                                                   s->ln1_mean + l * BT, s->ln1_rstd + l * BT, (int)BT, (int)C, 0.0f, 0,
                                                   bert ? p : 0.0f, site + 1, seed);
        CU_LAUNCHED("LayerNorm backward");
        ln_param_bwd<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_LN1W) + l * C, GR(P_LN1B) + l * C, g->dres,
                                                                 s->res1 + l * BT * C, s->ln1_mean + l * BT,
                                                                 s->ln1_rstd + l * BT, (int)BT, (int)C, 0.0f, 0, seed);
        CU_LAUNCHED("LayerNorm parameter backward");
        colsum_bf16<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_ATTPROJB) + l * C, g->tmpC, (int)BT, (int)C);
        CU_LAUNCHED("bias backward");
        KST_TRY(lin_dw(g, GR(P_ATTPROJW) + l * C * C, g->tmpC, s->atty + l * BT * C, BT, C, C, err));
        KST_TRY(lin_dx(g, g->tmpC2, CUDA_R_16BF, 0.0f, g->tmpC, PB(P_ATTPROJW) + l * C * C, BT, C, C, err));
        if (g->flash) {
            KST_TRY(fa_backward(g, g->qkv_tmp, qkvh, g->tmpC2, s->atty + l * BT * C, s->lse + l * BT * NH, s->valid, s->has_rows ? s->rows : NULL, B, T, p,
                                seed, site, err));
        } else {
            /* attention: dO per head, then dv, dP, dS, dq, dk */
            split_heads<<<blocks(BT * C / 8, 256), 256, 0, st>>>(g->o, g->tmpC2, NULL, (int)B, (int)T, (int)NH, (int)hs, 1);
            CU_LAUNCHED("split heads");
            const bf16 *Pdp = P;
            if (p > 0) {
                att_drop<<<blocks(A, 256), 256, 0, st>>>(g->Pd, P, A, (int)T, p, seed, site);
                CU_LAUNCHED("attention dropout");
                Pdp = g->Pd;
            }
            /* dv (T, hs) = Pd^T (T, T) @ dO (T, hs) */
            KST_TRY(gemm(g, NT, TT_, (int)hs, (int)T, (int)T, 1.0f, g->o, (int)hs, (long long)(T * hs), Pdp, (int)T,
                         (long long)(T * T), 0.0f, g->dqkvh + 2 * HT, CUDA_R_16BF, (int)hs, (long long)(T * hs), (int)(B * NH), err));
            /* dPd (T, T) = dO (T, hs) @ v (T, hs)^T */
            KST_TRY(gemm(g, TT_, NT, (int)T, (int)T, (int)hs, 1.0f, qkvh + 2 * HT, (int)hs, (long long)(T * hs), g->o,
                         (int)hs, (long long)(T * hs), 0.0f, g->S, CUDA_R_32F, (int)T, (long long)(T * T), (int)(B * NH), err));
            softmax_bwd<<<blocks(B * NH * T, RW), RW * 32, 0, st>>>(g->Pd, g->S, P, (int)(B * NH * T), (int)T, p, seed, site);
            CU_LAUNCHED("softmax backward");
            /* dq (T, hs) = scale dS (T, T) @ k (T, hs); dk (T, hs) = scale dS^T @ q */
            KST_TRY(gemm(g, NT, NT, (int)hs, (int)T, (int)T, scale, qkvh + HT, (int)hs, (long long)(T * hs), g->Pd, (int)T,
                         (long long)(T * T), 0.0f, g->dqkvh, CUDA_R_16BF, (int)hs, (long long)(T * hs), (int)(B * NH), err));
            KST_TRY(gemm(g, NT, TT_, (int)hs, (int)T, (int)T, scale, qkvh, (int)hs, (long long)(T * hs), g->Pd, (int)T,
                         (long long)(T * T), 0.0f, g->dqkvh + HT, CUDA_R_16BF, (int)hs, (long long)(T * hs), (int)(B * NH), err));
            merge_heads<<<blocks(BT * 3 * C / 8, 256), 256, 0, st>>>(g->qkv_tmp, g->dqkvh, (int)B, (int)T, (int)NH, (int)hs, 3);
            CU_LAUNCHED("merge heads");
        }
        colsum_bf16<<<colsum_grid(BT, 3 * C), dim3(32, 8), 0, st>>>(GR(P_QKVB) + l * 3 * C, g->qkv_tmp, (int)BT, (int)(3 * C));
        CU_LAUNCHED("bias backward");
        KST_TRY(lin_dw(g, GR(P_QKVW) + l * 3 * C * C, g->qkv_tmp, s->xb + l * BT * C, BT, C, 3 * C, err));
        KST_TRY(lin_dx(g, g->dx, CUDA_R_32F, 1.0f, g->qkv_tmp, PB(P_QKVW) + l * 3 * C * C, BT, C, 3 * C, err));
    }
    /* x[0] = dropout(LN(emb)) */
    ln_bwd<<<blocks(BT, RW), RW * 32, 0, st>>>(g->dres, NULL, g->dx, s->emb, PF(P_EMBLNW), s->emb_mean, s->emb_rstd,
                                               (int)BT, (int)C, p, 0, 0.0f, 0, seed);
    CU_LAUNCHED("embedding LayerNorm backward");
    ln_param_bwd<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_EMBLNW), GR(P_EMBLNB), g->dx, s->emb, s->emb_mean,
                                                             s->emb_rstd, (int)BT, (int)C, p, 0, seed);
    CU_LAUNCHED("embedding LayerNorm parameter backward");
    embed_bwd<<<blocks(BT, RW), RW * 32, 0, st>>>(GR(P_WTE), g->dres, s->ids, (int)BT, (int)C);
    CU_LAUNCHED("embedding backward");
    embed_pos_bwd<<<blocks(T * C, 256), 256, 0, st>>>(GR(P_WPE), g->dres, (int)B, (int)T, (int)C);
    CU_LAUNCHED("position embedding backward");
    if (c->TT) {
        embed_type_bwd<<<colsum_grid(BT, C), dim3(32, 8), 0, st>>>(GR(P_WTT), g->dres, s->types, (int)BT, (int)C, (int)c->TT);
        CU_LAUNCHED("token type embedding backward");
    }
done:
    return rc;
}

extern "C" const float *kst_bert_gpu_train_vectors(const kst_bert_gpu_train *g, int side) {
    return side >= 0 && side < KST_GPU_TRAIN_SIDES ? g->side[side].vec : NULL;
}
extern "C" size_t kst_bert_gpu_train_dim(const kst_bert_gpu_train *g) { return g->D; }
extern "C" size_t kst_bert_gpu_train_num_params(const kst_bert_gpu_train *g) { return g->NP; }
extern "C" float *kst_bert_gpu_train_params(kst_bert_gpu_train *g) { return g->params; }
extern "C" float *kst_bert_gpu_train_grads(kst_bert_gpu_train *g) { return g->grads; }
extern "C" void *kst_bert_gpu_train_params_bf16(kst_bert_gpu_train *g) { return g->pb16; }
extern "C" void *kst_bert_gpu_train_stream(kst_bert_gpu_train *g) { return g->stream; }
extern "C" size_t kst_bert_gpu_train_bytes(const kst_bert_gpu_train *g) { return g->bytes; }
extern "C" size_t kst_bert_gpu_train_peak_bytes(const kst_bert_gpu_train *g) { return g->peak; }

extern "C" int kst_bert_gpu_train_zero_grads(kst_bert_gpu_train *g, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemsetAsync(g->grads, 0, g->NP * sizeof(float), g->stream), "zeroing the gradients");
done:
    return rc;
}

/* Copies one flat (NP) device buffer to host memory and waits for it. */
static int copy_back(kst_bert_gpu_train *g, float *dst, const float *src, const char *what, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpyAsync(dst, src, g->NP * sizeof(float), cudaMemcpyDeviceToHost, g->stream), what);
    CU_TRY(cudaStreamSynchronize(g->stream), "GPU training");
done:
    return rc;
}

extern "C" int kst_bert_gpu_train_get_params(kst_bert_gpu_train *g, float *params, kst_error *err) {
    return copy_back(g, params, g->params, "copying the weights back", err);
}

extern "C" int kst_bert_gpu_train_set_params(kst_bert_gpu_train *g, const float *params, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaMemcpyAsync(g->params, params, g->NP * sizeof(float), cudaMemcpyHostToDevice, g->stream), "copying the weights");
    to_bf16<<<blocks(g->NP, 256), 256, 0, g->stream>>>(g->pb16, g->params, g->NP);
    CU_LAUNCHED("bf16 weights");
    CU_TRY(cudaStreamSynchronize(g->stream), "GPU training");
done:
    return rc;
}

extern "C" int kst_bert_gpu_train_get_grads(kst_bert_gpu_train *g, float *grads, kst_error *err) {
    return copy_back(g, grads, g->grads, "copying the gradients back", err);
}
