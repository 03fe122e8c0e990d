/* ops.c - CPU tensor ops: OpenBLAS for matrix products, OpenMP across rows and heads. */
#include "ops.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "blas.h"

/* glibc (>= 2.35) ships vector variants of erff and expf in libmvec, but declares them only
 * under -ffast-math. Declaring them here lets `omp simd` loops call the AVX-512/AVX2 variants
 * (accurate to a few ulp, well inside the 1e-4 the tests hold us to), and target_clones picks
 * the widest one the CPU has at load time while the build stays generic x86-64. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)) && !defined(__SANITIZE_ADDRESS__)
__attribute__((simd("notinbranch"))) float erff(float);
__attribute__((simd("notinbranch"))) float expf(float);
#define KST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KST_CLONES
#endif

KST_CLONES static void gelu_erf_chunk(float *out, const float *inp, size_t n) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = 0.5f * inp[i] * (1.0f + erff(inp[i] * (float)M_SQRT1_2));
}

/* Softmax of the first L entries of a score row; the masked rest (padding keys) becomes 0. */
KST_CLONES static void softmax_row(float *row, size_t L, size_t T) {
    float mx = row[0];
#pragma omp simd reduction(max : mx)
    for (size_t j = 0; j < L; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (size_t j = 0; j < L; j++) {
        float e = expf(row[j] - mx);
        row[j] = e;
        sum += e;
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (size_t j = 0; j < L; j++) row[j] *= inv;
    for (size_t j = L; j < T; j++) row[j] = 0.0f;
}

void kst_set_num_threads(int n) {
    if (n <= 0) return;
    omp_set_num_threads(n);
    kst_blas_set_threads(n);
}

void kst_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                        size_t N, size_t C, size_t OC) {
    if (N == 0 || OC == 0) return;
    if (bias) {
        /* Seed every row with the bias, then accumulate the product on top (beta = 1). */
#pragma omp parallel for if (N * OC > 65536)
        for (size_t n = 0; n < N; n++) memcpy(out + n * OC, bias, OC * sizeof(float));
    }
    kst_sgemm(0, 1, (int)N, (int)OC, (int)C, 1.0f, inp, (int)C, weight, (int)C, bias ? 1.0f : 0.0f,
              out, (int)OC);
}

void kst_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                           const float *weight, const float *bias, size_t N, size_t C, float eps) {
#pragma omp parallel for if (N > 64)
    for (size_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float *y = out + n * C;
        /* Two passes in double: the mean first, then the variance about it (biased, as torch). */
        double m = 0;
        for (size_t i = 0; i < C; i++) m += x[i];
        m /= (double)C;
        double v = 0;
        for (size_t i = 0; i < C; i++) v += ((double)x[i] - m) * ((double)x[i] - m);
        v /= (double)C;
        float s = (float)(1.0 / sqrt(v + (double)eps));
        float mf = (float)m;
        for (size_t i = 0; i < C; i++) y[i] = (x[i] - mf) * s * weight[i] + bias[i];
        if (mean) mean[n] = mf;
        if (rstd) rstd[n] = s;
    }
}

void kst_act_forward(float *out, const float *inp, size_t N, kst_act act) {
    switch (act) {
    case KST_ACT_GELU: {
        /* Chunks of 16K values: each is one vectorised call per 16 lanes into libmvec. */
        const size_t chunk = 16384;
        size_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for if (N > 65536)
        for (size_t c = 0; c < nchunks; c++) {
            size_t lo = c * chunk;
            gelu_erf_chunk(out + lo, inp + lo, N - lo < chunk ? N - lo : chunk);
        }
        break;
    }
    case KST_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f; /* sqrt(2/pi) */
#pragma omp parallel for simd if (N > 65536)
        for (size_t i = 0; i < N; i++) {
            float x = inp[i];
            out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
        }
        break;
    }
    case KST_ACT_RELU:
#pragma omp parallel for simd if (N > 65536)
        for (size_t i = 0; i < N; i++) out[i] = inp[i] > 0 ? inp[i] : 0.0f;
        break;
    case KST_ACT_TANH:
        for (size_t i = 0; i < N; i++) out[i] = tanhf(inp[i]);
        break;
    case KST_ACT_IDENTITY:
        if (out != inp) memmove(out, inp, N * sizeof(float));
        break;
    }
}

void kst_residual_forward(float *out, const float *a, const float *b, size_t N) {
#pragma omp parallel for simd if (N > 65536)
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

size_t kst_attention_scratch_floats(size_t T) { return (size_t)omp_get_max_threads() * T * T; }

void kst_attention_forward(float *out, float *att, float *scratch, const float *qkv,
                           const int *valid, size_t B, size_t T, size_t C, size_t NH) {
    size_t hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    int C3 = (int)(3 * C);
#pragma omp parallel
    {
        /* Each thread owns one T x T score block of scratch when `att` is not kept. */
        float *own = att ? NULL : scratch + (size_t)omp_get_thread_num() * T * T;
#pragma omp for collapse(2) schedule(dynamic)
        for (size_t b = 0; b < B; b++) {
            for (size_t h = 0; h < NH; h++) {
                float *S = att ? att + ((b * NH + h) * T * T) : own;
                size_t L = (size_t)valid[b];
                if (L > T) L = T;
                if (L == 0) L = 1;
                const float *q = qkv + b * T * 3 * C + h * hs;
                const float *k = q + C;
                const float *v = q + 2 * C;
                /* S (T, L) = q (T, hs) @ k (L, hs)^T * scale; keys past L are padding. */
                kst_sgemm(0, 1, (int)T, (int)L, (int)hs, scale, q, C3, k, C3, 0.0f, S, (int)T);
                for (size_t i = 0; i < T; i++) softmax_row(S + i * T, L, T);
                /* out (T, hs) = S (T, L) @ v (L, hs) */
                kst_sgemm(0, 0, (int)T, (int)hs, (int)L, 1.0f, S, (int)T, v, C3, 0.0f,
                          out + b * T * C + h * hs, (int)C);
            }
        }
    }
}
