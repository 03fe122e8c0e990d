/* ops_backward.c - backward passes of the shared ops, and the training-only ops, on the CPU. */
#include "ops_backward.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "blas.h"

/* ------------------------------------------------------------------------------------------ */
/* matmul, layernorm, activations, residual */

void kst_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight, size_t N, size_t C, size_t OC) {
    if (N == 0 || OC == 0 || C == 0) return;
    /* dinp (N, C) += dout (N, OC) @ weight (OC, C) */
    if (dinp)
        kst_sgemm(0, 0, (int)N, (int)C, (int)OC, 1.0f, dout, (int)OC, weight, (int)C, 1.0f, dinp,
                  (int)C);
    /* dweight (OC, C) += dout^T (OC, N) @ inp (N, C) */
    if (dweight)
        kst_sgemm(1, 0, (int)OC, (int)C, (int)N, 1.0f, dout, (int)OC, inp, (int)C, 1.0f, dweight,
                  (int)C);
    if (dbias) {
#pragma omp parallel for if (N * OC > 65536)
        for (size_t o = 0; o < OC; o++) {
            double s = 0;
            for (size_t n = 0; n < N; n++) s += dout[n * OC + o];
            dbias[o] += (float)s;
        }
    }
}

void kst_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                            const float *inp, const float *weight, const float *mean,
                            const float *rstd, size_t N, size_t C) {
    /* llm.c's form: with n = (x - mean) * rstd and g = w * dout,
     * dx = rstd * (g - mean(g) - n * mean(g * n)). */
    if (dinp) {
#pragma omp parallel for if (N > 64)
        for (size_t r = 0; r < N; r++) {
            const float *x = inp + r * C, *dy = dout + r * C;
            float m = mean[r], s = rstd[r];
            double gm = 0, gnm = 0;
            for (size_t i = 0; i < C; i++) {
                double g = (double)weight[i] * dy[i];
                gm += g;
                gnm += g * ((double)x[i] - m) * s;
            }
            gm /= (double)C;
            gnm /= (double)C;
            float *dx = dinp + r * C;
            for (size_t i = 0; i < C; i++) {
                double n = ((double)x[i] - m) * s;
                dx[i] += (float)(s * ((double)weight[i] * dy[i] - gm - n * gnm));
            }
        }
    }
    if (dweight || dbias) {
        /* Column sums: parallel over columns so no two threads write one gradient. */
#pragma omp parallel for if (N * C > 65536)
        for (size_t i = 0; i < C; i++) {
            double sw = 0, sb = 0;
            for (size_t r = 0; r < N; r++) {
                double dy = dout[r * C + i];
                sw += dy * ((double)inp[r * C + i] - mean[r]) * rstd[r];
                sb += dy;
            }
            if (dweight) dweight[i] += (float)sw;
            if (dbias) dbias[i] += (float)sb;
        }
    }
}

void kst_act_backward(float *dinp, const float *dout, const float *inp, size_t N, kst_act act) {
    switch (act) {
    case KST_ACT_GELU:
#pragma omp parallel for if (N > 65536)
        for (size_t i = 0; i < N; i++) {
            float x = inp[i];
            float cdf = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2));
            float pdf = expf(-0.5f * x * x) * 0.3989422804014327f; /* 1/sqrt(2 pi) */
            dinp[i] += dout[i] * (cdf + x * pdf);
        }
        break;
    case KST_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f; /* sqrt(2/pi) */
#pragma omp parallel for if (N > 65536)
        for (size_t i = 0; i < N; i++) {
            float x = inp[i];
            float t = tanhf(k * (x + 0.044715f * x * x * x));
            float d = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
            dinp[i] += dout[i] * d;
        }
        break;
    }
    case KST_ACT_RELU:
        for (size_t i = 0; i < N; i++) dinp[i] += inp[i] > 0 ? dout[i] : 0.0f;
        break;
    case KST_ACT_TANH:
        for (size_t i = 0; i < N; i++) {
            float t = tanhf(inp[i]);
            dinp[i] += dout[i] * (1.0f - t * t);
        }
        break;
    case KST_ACT_IDENTITY:
        for (size_t i = 0; i < N; i++) dinp[i] += dout[i];
        break;
    }
}

void kst_residual_backward(float *da, float *db, const float *dout, size_t N) {
    if (da)
        for (size_t i = 0; i < N; i++) da[i] += dout[i];
    if (db)
        for (size_t i = 0; i < N; i++) db[i] += dout[i];
}

/* ------------------------------------------------------------------------------------------ */
/* attention */

size_t kst_attention_backward_scratch_floats(size_t T) {
    return (size_t)omp_get_max_threads() * 2 * T * T;
}

/* The number of keys a sequence attends to, as kst_attention_forward counts it. */
static size_t keys_of(const int *valid, size_t b, size_t T) {
    size_t L = (size_t)(valid[b] > 0 ? valid[b] : 0);
    if (L > T) L = T;
    return L ? L : 1;
}

void kst_attention_values(float *out, float *scratch, const float *att, const float *drop,
                          const float *qkv, const int *valid, size_t B, size_t T, size_t C,
                          size_t NH) {
    size_t hs = C / NH;
    int C3 = (int)(3 * C);
#pragma omp parallel
    {
        float *Pd = scratch + (size_t)omp_get_thread_num() * 2 * T * T;
#pragma omp for collapse(2) schedule(dynamic)
        for (size_t b = 0; b < B; b++) {
            for (size_t h = 0; h < NH; h++) {
                size_t L = keys_of(valid, b, T), off = (b * NH + h) * T * T;
                for (size_t i = 0; i < T * T; i++) Pd[i] = att[off + i] * (drop ? drop[off + i] : 1.0f);
                const float *v = qkv + b * T * 3 * C + 2 * C + h * hs;
                kst_sgemm(0, 0, (int)T, (int)hs, (int)L, 1.0f, Pd, (int)T, v, C3, 0.0f,
                          out + b * T * C + h * hs, (int)C);
            }
        }
    }
}

void kst_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                            const float *att, const float *drop, const int *valid, size_t B,
                            size_t T, size_t C, size_t NH) {
    size_t hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    int C3 = (int)(3 * C);
#pragma omp parallel
    {
        float *Pd = scratch + (size_t)omp_get_thread_num() * 2 * T * T; /* dropped probs */
        float *dP = Pd + T * T;                                         /* then dS */
#pragma omp for collapse(2) schedule(dynamic)
        for (size_t b = 0; b < B; b++) {
            for (size_t h = 0; h < NH; h++) {
                size_t L = keys_of(valid, b, T), off = (b * NH + h) * T * T;
                const float *P = att + off, *M = drop ? drop + off : NULL;
                const float *q = qkv + b * T * 3 * C + h * hs, *k = q + C, *v = q + 2 * C;
                float *dq = dqkv + b * T * 3 * C + h * hs, *dk = dq + C, *dv = dq + 2 * C;
                const float *dy = dout + b * T * C + h * hs;
                for (size_t i = 0; i < T * T; i++) Pd[i] = M ? P[i] * M[i] : P[i];
                /* dv (L, hs) += Pd^T (L, T) @ dy (T, hs) */
                kst_sgemm(1, 0, (int)L, (int)hs, (int)T, 1.0f, Pd, (int)T, dy, (int)C, 1.0f, dv, C3);
                /* dP (T, L) = dy (T, hs) @ v (L, hs)^T, through the dropout mask */
                kst_sgemm(0, 1, (int)T, (int)L, (int)hs, 1.0f, dy, (int)C, v, C3, 0.0f, dP, (int)T);
                /* softmax: dS = P * (dP - sum_j P dP), row by row over the L live keys */
                for (size_t i = 0; i < T; i++) {
                    float *r = dP + i * T;
                    const float *p = P + i * T;
                    if (M)
                        for (size_t j = 0; j < L; j++) r[j] *= M[i * T + j];
                    double dot = 0;
                    for (size_t j = 0; j < L; j++) dot += (double)p[j] * r[j];
                    for (size_t j = 0; j < L; j++) r[j] = p[j] * (r[j] - (float)dot);
                }
                /* dq (T, hs) += scale dS (T, L) @ k (L, hs); dk (L, hs) += scale dS^T @ q */
                kst_sgemm(0, 0, (int)T, (int)hs, (int)L, scale, dP, (int)T, k, C3, 1.0f, dq, C3);
                kst_sgemm(1, 0, (int)L, (int)hs, (int)T, scale, dP, (int)T, q, C3, 1.0f, dk, C3);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* dropout */

uint64_t kst_rng_seed(uint64_t seed) {
    /* splitmix64 of the seed: never 0, which xorshift cannot leave */
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z ? z : 1;
}

static float rng_uniform(uint64_t *s) {
    /* xorshift64*, top 24 bits -> [0, 1) */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return (float)((x * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

void kst_dropout_mask(float *mask, size_t N, float p, uint64_t *rng) {
    if (p <= 0) {
        for (size_t i = 0; i < N; i++) mask[i] = 1.0f;
        return;
    }
    float keep = 1.0f / (1.0f - p);
    for (size_t i = 0; i < N; i++) mask[i] = rng_uniform(rng) < p ? 0.0f : keep;
}

void kst_dropout_forward(float *out, const float *inp, const float *mask, size_t N) {
    for (size_t i = 0; i < N; i++) out[i] = inp[i] * mask[i];
}

void kst_dropout_backward(float *dinp, const float *dout, const float *mask, size_t N) {
    for (size_t i = 0; i < N; i++) dinp[i] += dout[i] * mask[i];
}

/* ------------------------------------------------------------------------------------------ */
/* embeddings */

void kst_embedding_forward(float *out, const int32_t *ids, const int32_t *type_ids,
                           const float *wte, const float *wpe, const float *wtt, size_t B,
                           size_t T, size_t C) {
    size_t BT = B * T;
#pragma omp parallel for if (BT > 64)
    for (size_t i = 0; i < BT; i++) {
        float *x = out + i * C;
        const float *we = wte + (size_t)ids[i] * C, *pe = wpe + (i % T) * C;
        if (wtt) {
            const float *te = wtt + (size_t)(type_ids ? type_ids[i] : 0) * C;
            for (size_t k = 0; k < C; k++) x[k] = we[k] + te[k] + pe[k];
        } else {
            for (size_t k = 0; k < C; k++) x[k] = we[k] + pe[k];
        }
    }
}

void kst_embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout,
                            const int32_t *ids, const int32_t *type_ids, size_t B, size_t T,
                            size_t C) {
    /* Serial: rows repeat (the same token twice, every sequence's position t). */
    for (size_t i = 0; i < B * T; i++) {
        const float *d = dout + i * C;
        float *we = dwte ? dwte + (size_t)ids[i] * C : NULL;
        float *pe = dwpe ? dwpe + (i % T) * C : NULL;
        float *te = dwtt ? dwtt + (size_t)(type_ids ? type_ids[i] : 0) * C : NULL;
        for (size_t k = 0; k < C; k++) {
            if (we) we[k] += d[k];
            if (pe) pe[k] += d[k];
            if (te) te[k] += d[k];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* pooling */

size_t kst_pool_dim(unsigned modes, size_t C) {
    size_t n = 0;
    for (unsigned bit = 1; bit <= 8; bit <<= 1) n += (modes & bit) ? 1 : 0;
    return n * C;
}

static size_t len_of(const int *valid, size_t b, size_t T) {
    size_t L = (size_t)(valid[b] > 0 ? valid[b] : 0);
    if (L > T) L = T;
    return L ? L : 1;
}

/* Row of the first max over the first len rows of column k. */
static size_t argmax_col(const float *x, size_t len, size_t C, size_t k) {
    size_t at = 0;
    for (size_t t = 1; t < len; t++)
        if (x[t * C + k] > x[at * C + k]) at = t;
    return at;
}

void kst_pool_forward(float *out, const float *inp, const int *valid, unsigned modes, size_t B,
                      size_t T, size_t C) {
    size_t P = kst_pool_dim(modes, C);
    for (size_t b = 0; b < B; b++) {
        const float *x = inp + b * T * C;
        float *y = out + b * P;
        size_t len = len_of(valid, b, T), off = 0;
        if (modes & 1) {
            memcpy(y, x, C * sizeof(float));
            off += C;
        }
        if (modes & 2) {
            for (size_t k = 0; k < C; k++) y[off + k] = x[argmax_col(x, len, C, k) * C + k];
            off += C;
        }
        if (modes & (4 | 8)) {
            for (size_t k = 0; k < C; k++) {
                float s = 0; /* float32 sum, as encoder.c and torch.sum */
                for (size_t t = 0; t < len; t++) s += x[t * C + k];
                if (modes & 4) y[off + k] = s / (float)len;
                if (modes & 8) y[off + k + ((modes & 4) ? C : 0)] = s / sqrtf((float)len);
            }
        }
    }
}

void kst_pool_backward(float *dinp, const float *dout, const float *inp, const int *valid,
                       unsigned modes, size_t B, size_t T, size_t C) {
    size_t P = kst_pool_dim(modes, C);
    for (size_t b = 0; b < B; b++) {
        const float *x = inp + b * T * C, *dy = dout + b * P;
        float *dx = dinp + b * T * C;
        size_t len = len_of(valid, b, T), off = 0;
        if (modes & 1) {
            for (size_t k = 0; k < C; k++) dx[k] += dy[k];
            off += C;
        }
        if (modes & 2) {
            for (size_t k = 0; k < C; k++) dx[argmax_col(x, len, C, k) * C + k] += dy[off + k];
            off += C;
        }
        if (modes & 4) {
            for (size_t t = 0; t < len; t++)
                for (size_t k = 0; k < C; k++) dx[t * C + k] += dy[off + k] / (float)len;
            off += C;
        }
        if (modes & 8) {
            float s = 1.0f / sqrtf((float)len);
            for (size_t t = 0; t < len; t++)
                for (size_t k = 0; k < C; k++) dx[t * C + k] += dy[off + k] * s;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* L2 normalisation and MaxSim */

void kst_l2norm_forward(float *out, float *norm, const float *inp, size_t N, size_t D) {
    for (size_t r = 0; r < N; r++) {
        double s = 0;
        for (size_t i = 0; i < D; i++) s += (double)inp[r * D + i] * inp[r * D + i];
        double n = sqrt(s);
        float inv = (float)(1.0 / (n > 1e-12 ? n : 1e-12));
        for (size_t i = 0; i < D; i++) out[r * D + i] = inp[r * D + i] * inv;
        if (norm) norm[r] = (float)n;
    }
}

void kst_l2norm_backward(float *dinp, const float *dout, const float *out, const float *norm,
                         size_t N, size_t D) {
    for (size_t r = 0; r < N; r++) {
        const float *y = out + r * D, *dy = dout + r * D;
        float *dx = dinp + r * D;
        if (norm[r] <= 1e-12f) { /* clamped: out = inp / 1e-12, a plain scale */
            for (size_t i = 0; i < D; i++) dx[i] += dy[i] * 1e12f;
            continue;
        }
        /* d(x/|x|) = (dy - y (y . dy)) / |x| */
        double yd = 0;
        for (size_t i = 0; i < D; i++) yd += (double)y[i] * dy[i];
        for (size_t i = 0; i < D; i++) dx[i] += (float)((dy[i] - y[i] * yd) / norm[r]);
    }
}

float kst_maxsim_forward(int *argmax, const float *q, const float *d, const unsigned char *keep,
                         size_t nq, size_t nd, size_t D) {
    float total = 0;
    for (size_t i = 0; i < nq; i++) {
        float best = -INFINITY;
        int at = -1;
        for (size_t j = 0; j < nd; j++) {
            if (keep && !keep[j]) continue;
            float s = 0;
            for (size_t k = 0; k < D; k++) s += q[i * D + k] * d[j * D + k];
            if (at < 0 || s > best) {
                best = s;
                at = (int)j;
            }
        }
        if (argmax) argmax[i] = at;
        if (at >= 0) total += best;
    }
    return total;
}

void kst_maxsim_backward(float *dq, float *dd, float dscore, const int *argmax, const float *q,
                         const float *d, size_t nq, size_t D) {
    for (size_t i = 0; i < nq; i++) {
        if (argmax[i] < 0) continue;
        size_t j = (size_t)argmax[i];
        for (size_t k = 0; k < D; k++) {
            if (dq) dq[i * D + k] += dscore * d[j * D + k];
            if (dd) dd[j * D + k] += dscore * q[i * D + k];
        }
    }
}
