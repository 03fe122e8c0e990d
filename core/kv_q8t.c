/* kv_q8t.c - 8-bit key and value blocks scored and summed a GQA group at a time (kv_q8t.h). */
#include "kv_q8t.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/kv_attn.h"

/* byte offsets of row j's bytes 4t..4t+3 (keys) and of row j's byte i (values) */
static size_t k_at(size_t j, size_t t, size_t d) { return ((j / 16) * (d / 4) + t) * 64 + (j % 16) * 4; }
static size_t v_at(size_t j, size_t i, size_t n, size_t d) {
    size_t c = i / 64, wc = d - 64 * c < 64 ? d - 64 * c : 64;
    return KST_Q8T_ROWS(n) * 64 * c + (j / 4) * 4 * wc + (i % 64) * 4 + j % 4;
}

void kst_q8t_put(int8_t *K8, float *ks, int32_t *ksum, int8_t *V8, float *vs, size_t j, size_t n,
                 const void *krow, const void *vrow, int f16, size_t d) {
    int8_t qk[512];
    ks[j] = kst_kv_q8(krow, f16, d, qk);
    int32_t s = 0;
    for (size_t t = 0; t < d / 4; t++) {
        memcpy(K8 + k_at(j, t, d), qk + 4 * t, 4);
        s += qk[4 * t] + qk[4 * t + 1] + qk[4 * t + 2] + qk[4 * t + 3];
    }
    ksum[j] = s;
    vs[j] = kst_kv_q8(vrow, f16, d, qk);
    for (size_t i = 0; i < d; i++) V8[v_at(j, i, n, d)] = qk[i];
}

void kst_q8t_pad(int8_t *K8, float *ks, int32_t *ksum, int8_t *V8, float *vs, size_t n, size_t d) {
    for (size_t j = n; j < KST_Q8T_ROWS(n); j++) {
        for (size_t t = 0; t < d / 4; t++) memset(K8 + k_at(j, t, d), 0, 4);
        for (size_t i = 0; i < d; i++) V8[v_at(j, i, n, d)] = 0;
        ks[j] = vs[j] = 0;
        ksum[j] = 0;
    }
}

/* the queries rounded to unsigned bytes (qq + 128); scale * qs per query into qf */
static void q_round(uint8_t *qb, float *qf, const float *Q, size_t G, size_t d, float scale) {
    int8_t q[512];
    for (size_t g = 0; g < G; g++) {
        float qs = kst_kv_q8(Q + g * d, 0, d, q);
        for (size_t i = 0; i < d; i++) qb[g * d + i] = (uint8_t)(q[i] + 128);
        qf[g] = scale * qs;
    }
}

static void scores_c(float *S, const uint8_t *qb, const float *qf, size_t G, const int8_t *K8, const float *ks,
                     const int32_t *ksum, size_t n, size_t d) {
    for (size_t g = 0; g < G; g++)
        for (size_t j = 0; j < n; j++) {
            int32_t a = 0;
            for (size_t t = 0; t < d / 4; t++) {
                const int8_t *k = K8 + k_at(j, t, d);
                const uint8_t *u = qb + g * d + 4 * t;
                a += u[0] * k[0] + u[1] * k[1] + u[2] * k[2] + u[3] * k[3];
            }
            S[g * n + j] = (float)(a - 128 * ksum[j]) * ks[j] * qf[g];
        }
}

/* the weights of query g rounded to bytes (wq, KST_Q8T_ROWS(n) of them); returns P / 255, NaN
 * where a weight or scale is not finite */
static float w_round_c(uint8_t *wq, const float *W, const float *vs, size_t n) {
    float P = 0;
    int bad = 0;
    for (size_t j = 0; j < n; j++) {
        float p = W[j] * vs[j];
        bad |= !(p <= FLT_MAX);
        P = p > P ? p : P;
    }
    memset(wq, 0, KST_Q8T_ROWS(n));
    if (bad) return NAN;
    if (!(P > 0)) return 0;
    float r = 255.0f / P;
    for (size_t j = 0; j < n; j++) wq[j] = (uint8_t)(int)(W[j] * vs[j] * r + 0.5f);
    return P / 255.0f;
}

static void wsum_c(float *O, const uint8_t *wq, const float *wsc, size_t G, const int8_t *V8, size_t n, size_t d) {
    size_t n16 = KST_Q8T_ROWS(n);
    for (size_t g = 0; g < G; g++)
        for (size_t i = 0; i < d; i++) {
            int32_t a = 0;
            for (size_t j = 0; j < n16; j++) a += wq[g * n16 + j] * V8[v_at(j, i, n, d)];
            O[g * d + i] = (float)a * wsc[g];
        }
}

static int simd_off; /* kst_q8t_set_simd(0) */
void kst_q8t_set_simd(int on) { simd_off = !on; }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KST_Q8T_VNNI 1
static int has_vnni(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vnni");
    }
    return v && !simd_off;
}

#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
/* 16 rows x up to 4 queries a step: one 64-byte load of keys for 4 dims of 16 rows, one vpdpbusd
 * a query */
T512 static void scores_vnni(float *S, const uint8_t *qb, const float *qf, size_t G, const int8_t *K8,
                             const float *ks, const int32_t *ksum, size_t n, size_t d) {
    size_t nq = d / 4;
    for (size_t g0 = 0; g0 < G; g0 += 4) {
        size_t gn = G - g0 < 4 ? G - g0 : 4;
        const int32_t *u0 = (const int32_t *)(qb + g0 * d), *u1 = (const int32_t *)(qb + (g0 + (gn > 1)) * d),
                      *u2 = (const int32_t *)(qb + (g0 + (gn > 2 ? 2 : 0)) * d),
                      *u3 = (const int32_t *)(qb + (g0 + (gn > 3 ? 3 : 0)) * d);
        for (size_t b = 0; b < n; b += 16) {
            const int8_t *kb = K8 + (b / 16) * nq * 64;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (size_t t = 0; t < nq; t++) {
                __m512i k = _mm512_loadu_si512((const void *)(kb + t * 64));
                int32_t w0, w1, w2, w3;
                memcpy(&w0, u0 + t, 4);
                memcpy(&w1, u1 + t, 4);
                memcpy(&w2, u2 + t, 4);
                memcpy(&w3, u3 + t, 4);
                a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(w0), k);
                a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(w1), k);
                a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(w2), k);
                a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(w3), k);
            }
            __m512i off = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(ksum + b)), 7);
            __m512 kk = _mm512_loadu_ps(ks + b);
            __mmask16 m = n - b >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - b)) - 1);
            __m512i aa[4] = {a0, a1, a2, a3};
            for (size_t g = 0; g < gn; g++) {
                __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(aa[g], off));
                _mm512_mask_storeu_ps(S + (g0 + g) * n + b, m,
                                      _mm512_mul_ps(_mm512_mul_ps(f, kk), _mm512_set1_ps(qf[g0 + g])));
            }
        }
    }
}

T512 static float w_round_vnni(uint8_t *wq, const float *W, const float *vs, size_t n) {
    __m512 P = _mm512_setzero_ps(), big = _mm512_set1_ps(FLT_MAX);
    __mmask16 bad = 0;
    for (size_t j = 0; j < n; j += 16) {
        __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, W + j), _mm512_maskz_loadu_ps(m, vs + j));
        bad |= _mm512_mask_cmp_ps_mask(m, p, big, _CMP_NLE_UQ);
        P = _mm512_max_ps(P, p);
    }
    memset(wq, 0, KST_Q8T_ROWS(n));
    float Pm = _mm512_reduce_max_ps(P);
    if (bad) return NAN;
    if (!(Pm > 0)) return 0;
    __m512 r = _mm512_set1_ps(255.0f / Pm), h = _mm512_set1_ps(0.5f);
    for (size_t j = 0; j < n; j += 16) {
        __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, W + j), _mm512_maskz_loadu_ps(m, vs + j));
        __m512i u = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(p, r), h));
        _mm512_mask_cvtepi32_storeu_epi8(wq + j, m, u);
    }
    return Pm / 255.0f;
}

/* 4 rows x 16 dims a load; up to 4 queries x 64 dims of accumulators at a time (nb 16-dim blocks,
 * a constant in each instance so that the accumulators stay in registers) */
#define WSUM_VNNI(NB)                                                                                   \
    for (size_t J = 0; J < nJ; J++) {                                                                  \
        const int8_t *vb = V8 + n16 * c0 + J * 4 * NB * 16;                                             \
        __m512i x[NB];                                                                                  \
        for (size_t k = 0; k < NB; k++) x[k] = _mm512_loadu_si512((const void *)(vb + k * 64));        \
        for (size_t g = 0; g < 4; g++) {                                                                \
            int32_t w;                                                                                  \
            memcpy(&w, wq + (g0 + (g < gn ? g : 0)) * n16 + 4 * J, 4);                                  \
            __m512i bw = _mm512_set1_epi32(w);                                                          \
            for (size_t k = 0; k < NB; k++) acc[g][k] = _mm512_dpbusd_epi32(acc[g][k], bw, x[k]);      \
        }                                                                                               \
    }
T512 static void wsum_vnni(float *O, const uint8_t *wq, const float *wsc, size_t G, const int8_t *V8, size_t n,
                           size_t d) {
    size_t n16 = KST_Q8T_ROWS(n), nJ = n16 / 4;
    for (size_t g0 = 0; g0 < G; g0 += 4) {
        size_t gn = G - g0 < 4 ? G - g0 : 4;
        for (size_t c0 = 0; c0 < d; c0 += 64) {
            size_t nb = (d - c0) / 16 < 4 ? (d - c0) / 16 : 4;
            __m512i acc[4][4];
            for (size_t g = 0; g < 4; g++)
                for (size_t k = 0; k < 4; k++) acc[g][k] = _mm512_setzero_si512();
            if (nb == 4) {
                WSUM_VNNI(4)
            } else if (nb == 3) {
                WSUM_VNNI(3)
            } else if (nb == 2) {
                WSUM_VNNI(2)
            } else {
                WSUM_VNNI(1)
            }
            for (size_t g = 0; g < gn; g++)
                for (size_t k = 0; k < nb; k++)
                    _mm512_storeu_ps(O + (g0 + g) * d + c0 + 16 * k,
                                     _mm512_mul_ps(_mm512_cvtepi32_ps(acc[g][k]), _mm512_set1_ps(wsc[g0 + g])));
        }
    }
}
#undef WSUM_VNNI

T512 static void vaxpy_vnni(float *out, float w, const int8_t *V8, size_t j, size_t n, size_t d) {
    int sh = 24 - 8 * (int)(j % 4);
    __m512 wv = _mm512_set1_ps(w);
    for (size_t i = 0; i < d; i += 16) {
        __m512i x = _mm512_loadu_si512((const void *)(V8 + v_at(j, i, n, d) - j % 4));
        x = _mm512_srai_epi32(_mm512_sll_epi32(x, _mm_cvtsi32_si128(sh)), 24);
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), _mm512_mul_ps(wv, _mm512_cvtepi32_ps(x))));
    }
}
#undef T512
#endif

void kst_q8t_scores(float *S, const float *Q, size_t G, const int8_t *K8, const float *ks, const int32_t *ksum,
                    size_t n, size_t d, float scale, uint8_t *qb) {
    float qf[64];
    for (size_t g0 = 0; g0 < G; g0 += 64) { /* (64 query heads a KV head at most at a time) */
        size_t gn = G - g0 < 64 ? G - g0 : 64;
        q_round(qb, qf, Q + g0 * d, gn, d, scale);
#ifdef KST_Q8T_VNNI
        if (has_vnni()) {
            scores_vnni(S + g0 * n, qb, qf, gn, K8, ks, ksum, n, d);
            continue;
        }
#endif
        scores_c(S + g0 * n, qb, qf, gn, K8, ks, ksum, n, d);
    }
}

void kst_q8t_wsum(float *O, const float *W, size_t G, const int8_t *V8, const float *vs, size_t n, size_t d,
                  uint8_t *wq, float *wsc) {
    size_t n16 = KST_Q8T_ROWS(n);
#ifdef KST_Q8T_VNNI
    if (has_vnni() && d % 16 == 0) {
        for (size_t g = 0; g < G; g++) wsc[g] = w_round_vnni(wq + g * n16, W + g * n, vs, n);
        wsum_vnni(O, wq, wsc, G, V8, n, d);
        return;
    }
#endif
    for (size_t g = 0; g < G; g++) wsc[g] = w_round_c(wq + g * n16, W + g * n, vs, n);
    wsum_c(O, wq, wsc, G, V8, n, d);
}

void kst_q8t_vaxpy(float *out, float w, const int8_t *V8, size_t j, size_t n, size_t d) {
#ifdef KST_Q8T_VNNI
    if (has_vnni() && d % 16 == 0) {
        vaxpy_vnni(out, w, V8, j, n, d);
        return;
    }
#endif
    for (size_t i = 0; i < d; i++) out[i] += w * (float)V8[v_at(j, i, n, d)];
}
