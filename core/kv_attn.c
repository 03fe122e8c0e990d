/* kv_attn.c - partial attention over a subset of cached keys and its log-sum-exp merge. */
#include "kv_attn.h"

#include <math.h>
#include <string.h>


/* kst_kv_fill_round's definition over clusters c0 .. n - 1, added to *W, *t; returns 1 if any closed */
static int fill_round_from(size_t c0, size_t n, const uint32_t *rc, float *w, uint32_t *ns, float lw, double *W,
                           uint64_t *t) {
    int closed = 0;
    for (size_t c = c0; c < n; c++) {
        float wc = w[c];
        int cl = wc > 0 && lw * wc >= (float)(int32_t)rc[c];
        ns[c] = cl ? rc[c] : ns[c];
        w[c] = cl ? 0 : wc;
        *W += cl ? 0.0 : (double)wc;
        *t += cl ? rc[c] : 0;
        closed |= cl;
    }
    return closed;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* AVX2 + F16C + FMA: 8 lanes per step; float16 rows converted in registers (vcvtph2ps). */
__attribute__((target("avx2,f16c,fma"))) static float dot_avx2(const float *q, const void *row,
                                                                 int f16, size_t d) {
    /* four accumulators: four independent FMA chains instead of one (latency-bound otherwise) */
    __m256 acc = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
           a3 = _mm256_setzero_ps();
    size_t i = 0;
    if (f16) {
        const uint16_t *r = row;
#define KV_H(j) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + (j))))
        for (; i + 32 <= d; i += 32) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), KV_H(0), acc);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), KV_H(8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), KV_H(16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), KV_H(24), a3);
        }
        for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), KV_H(0), acc);
#undef KV_H
    } else {
        const float *r = row;
        for (; i + 32 <= d; i += 32) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), acc);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(r + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), _mm256_loadu_ps(r + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), _mm256_loadu_ps(r + i + 24), a3);
        }
        for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), acc);
    }
    acc = _mm256_add_ps(_mm256_add_ps(acc, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float s = _mm_cvtss_f32(h);
    for (; i < d; i++)
        s += q[i] * (f16 ? kst_f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i]);
    return s;
}

/* out (d) += w * row (d) */
__attribute__((target("avx2,f16c,fma"))) static void axpy_avx2(float *out, float w, const void *row,
                                                                 int f16, size_t d) {
    __m256 wv = _mm256_set1_ps(w);
    size_t i = 0;
    if (f16) {
        const uint16_t *r = row;
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i))),
                                                      _mm256_loadu_ps(out + i)));
        for (; i < d; i++) out[i] += w * kst_f16_to_f32(r[i]);
    } else {
        const float *r = row;
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(r + i), _mm256_loadu_ps(out + i)));
        for (; i < d; i++) out[i] += w * r[i];
    }
}

/* kst_kv_fill_round, 8 clusters a step (the same closures; the open weights summed in 8 lanes) */
__attribute__((target("avx2"))) static int fill_round_avx2(size_t n, const uint32_t *rc, float *w, uint32_t *ns,
                                                           float lw, double *wopen, uint64_t *took) {
    __m256 vl = _mm256_set1_ps(lw), z = _mm256_setzero_ps();
    __m256d w0 = _mm256_setzero_pd(), w1 = _mm256_setzero_pd();
    __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
    int closed = 0;
    size_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 wv = _mm256_loadu_ps(w + c);
        __m256i ri = _mm256_loadu_si256((const __m256i *)(rc + c));
        __m256 m = _mm256_and_ps(_mm256_cmp_ps(wv, z, _CMP_GT_OQ),
                                 _mm256_cmp_ps(_mm256_mul_ps(vl, wv), _mm256_cvtepi32_ps(ri), _CMP_GE_OQ));
        __m256i mi = _mm256_castps_si256(m), rt = _mm256_and_si256(ri, mi);
        __m256 wo = _mm256_andnot_ps(m, wv);
        closed |= _mm256_movemask_ps(m);
        _mm256_storeu_si256((__m256i *)(ns + c), _mm256_blendv_epi8(_mm256_loadu_si256((const __m256i *)(ns + c)), ri, mi));
        _mm256_storeu_ps(w + c, wo);
        w0 = _mm256_add_pd(w0, _mm256_cvtps_pd(_mm256_castps256_ps128(wo)));
        w1 = _mm256_add_pd(w1, _mm256_cvtps_pd(_mm256_extractf128_ps(wo, 1)));
        t0 = _mm256_add_epi64(t0, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(rt)));
        t1 = _mm256_add_epi64(t1, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(rt, 1)));
    }
    double wl[4];
    uint64_t tl[4];
    _mm256_storeu_pd(wl, _mm256_add_pd(w0, w1));
    _mm256_storeu_si256((__m256i *)tl, _mm256_add_epi64(t0, t1));
    *wopen = (wl[0] + wl[1]) + (wl[2] + wl[3]);
    *took = tl[0] + tl[1] + tl[2] + tl[3];
    closed |= fill_round_from(c, n, rc, w, ns, lw, wopen, took);
    return closed != 0;
}

/* kst_kv_q8 for d a multiple of 16: the same float32 operations as the scalar form (max |x|,
 * 127 / max, the product rounded to nearest even by vcvtps2dq as lrintf does), 16 values a step. */
__attribute__((target("avx2,f16c"))) static float q8_avx2(const void *row, int f16, size_t d, int8_t *q) {
    const __m256 sgn = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps(), m1 = m, un = m, un1 = m; /* (two chains each) */
#define Q8_LD(i) (f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + (i)))) \
                      : _mm256_loadu_ps((const float *)row + (i)))
    for (size_t i = 0; i < d; i += 16) {
        __m256 x = Q8_LD(i), y = Q8_LD(i + 8);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sgn, x));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sgn, y));
        un = _mm256_or_ps(un, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        un1 = _mm256_or_ps(un1, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    }
    m = _mm256_max_ps(m, m1);
    un = _mm256_or_ps(un, un1);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float mx = _mm_cvtss_f32(h);
    if (_mm256_movemask_ps(un) || !(mx > 0) || !isfinite(mx)) {
        memset(q, 0, d);
        return mx == 0 && !_mm256_movemask_ps(un) ? 0.0f : NAN;
    }
    if (!isfinite(127.0f / mx)) { /* (a row below 127 / FLT_MAX: zeros) */
        memset(q, 0, d);
        return 0.0f;
    }
    __m256 inv = _mm256_set1_ps(127.0f / mx);
    for (size_t i = 0; i < d; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(Q8_LD(i), inv)), b = _mm256_cvtps_epi32(_mm256_mul_ps(Q8_LD(i + 8), inv));
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8); /* (int16: a0-7, b0-7) */
        _mm_storeu_si128((__m128i *)(q + i), _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
    }
#undef Q8_LD
    return mx / 127.0f;
}

/* kst_kv_dot_q8 / kst_kv_axpy_q8 for d a multiple of 16: 8 int8 widened to float a step. */
#define Q8_F(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
__attribute__((target("avx2,fma"))) static float dot_q8_avx2(const float *qv, const int8_t *q8, size_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (size_t i = 0; i < d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), Q8_F(q8 + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i + 8), Q8_F(q8 + i + 8), a1);
    }
    a0 = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
__attribute__((target("avx2,fma"))) static void axpy_q8_avx2(float *out, float w, const int8_t *q8, size_t d) {
    __m256 wv = _mm256_set1_ps(w);
    for (size_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, Q8_F(q8 + i), _mm256_loadu_ps(out + i)));
}
#undef Q8_F

static int has_avx2(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
            __builtin_cpu_supports("f16c");
    }
    return v;
}
#define KST_KV_DOT_AVX2 1
#endif

float kst_kv_dot(const float *q, const void *row, int f16, size_t d) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) return dot_avx2(q, row, f16, d);
#endif
    float s = 0;
    if (f16) {
        const uint16_t *r = row;
        for (size_t i = 0; i < d; i++) s += q[i] * kst_f16_to_f32(r[i]);
    } else {
        const float *r = row;
#pragma omp simd reduction(+ : s)
        for (size_t i = 0; i < d; i++) s += q[i] * r[i];
    }
    return s;
}

void kst_kv_rows_f32(float *out, const void *src, int f16, size_t first, size_t n, size_t d) {
    if (f16) {
        const uint16_t *s = (const uint16_t *)src + first * d;
        for (size_t i = 0; i < n * d; i++) out[i] = kst_f16_to_f32(s[i]);
    } else {
        memcpy(out, (const float *)src + first * d, n * d * sizeof(float));
    }
}

float kst_kv_q8(const void *row, int f16, size_t d, int8_t *q) {
#ifdef KST_KV_DOT_AVX2
    if (d % 16 == 0 && has_avx2()) return q8_avx2(row, f16, d, q);
#endif
    float m = 0;
    for (size_t i = 0; i < d; i++) {
        float x = f16 ? kst_f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
        float a = fabsf(x);
        m = a > m || a != a ? a : m;
    }
    if (!(m > 0) || !isfinite(m)) {
        memset(q, 0, d);
        return m == 0 ? 0.0f : NAN;
    }
    float inv = 127.0f / m;
    if (!isfinite(inv)) { /* (a row below 127 / FLT_MAX: zeros) */
        memset(q, 0, d);
        return 0.0f;
    }
    for (size_t i = 0; i < d; i++) {
        float x = f16 ? kst_f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
        long r = lrintf(x * inv);
        q[i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
    return m / 127.0f;
}

float kst_kv_dot_q8(const float *qv, const int8_t *q8, size_t d) {
#ifdef KST_KV_DOT_AVX2
    if (d % 16 == 0 && has_avx2()) return dot_q8_avx2(qv, q8, d);
#endif
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < d; i++) s += qv[i] * (float)q8[i];
    return s;
}

void kst_kv_axpy_q8(float *out, float w, const int8_t *q8, size_t d) {
#ifdef KST_KV_DOT_AVX2
    if (d % 16 == 0 && has_avx2()) {
        axpy_q8_avx2(out, w, q8, d);
        return;
    }
#endif
#pragma omp simd
    for (size_t i = 0; i < d; i++) out[i] += w * (float)q8[i];
}

#ifdef KST_KV_DOT_AVX2
/* kst_kv_gemv_t for d % 64 == 0: 64 outputs at a time in eight registers */
__attribute__((target("avx2,fma"))) static void gemv_t_avx2(float *y, const float *M, const float *x, size_t n, size_t d) {
    for (size_t b = 0; b < d; b += 64) {
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_loadu_ps(y + b + 8 * r);
        for (size_t j = 0; j < n; j++) {
            __m256 xv = _mm256_set1_ps(x[j]);
            const float *m = M + j * d + b;
            for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(m + 8 * r), a[r]);
        }
        for (int r = 0; r < 8; r++) _mm256_storeu_ps(y + b + 8 * r, a[r]);
    }
}
#endif

void kst_kv_gemv_t(float *y, const float *M, const float *x, size_t n, size_t d) {
#ifdef KST_KV_DOT_AVX2
    if (d % 64 == 0 && has_avx2()) {
        gemv_t_avx2(y, M, x, n, d);
        return;
    }
#endif
    for (size_t j = 0; j < n; j++)
        for (size_t i = 0; i < d; i++) y[i] += x[j] * M[j * d + i];
}

void kst_kv_axpy(float *out, float w, const void *row, int f16, size_t d) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) {
        axpy_avx2(out, w, row, f16, d);
        return;
    }
#endif
    if (f16) {
        const uint16_t *v = row;
        for (size_t i = 0; i < d; i++) out[i] += w * kst_f16_to_f32(v[i]);
    } else {
        const float *v = row;
        for (size_t i = 0; i < d; i++) out[i] += w * v[i];
    }
}

#ifdef KST_KV_DOT_AVX2
static inline float hsum256(__m256 a) __attribute__((target("avx2,fma")));
static inline float hsum256(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
/* Up to 4 queries against 2 rows at a time: 8 independent FMA chains (d a multiple of 8). */
__attribute__((target("avx2,f16c,fma"))) static void scores_avx2(float *S, const float *Q, size_t G,
                                                                   const void *K, int f16, size_t n,
                                                                   size_t d, float scale) {
#define KV_LD(r, i) (f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)K + (r) * d + (i)))) \
                         : _mm256_loadu_ps((const float *)K + (r) * d + (i)))
    for (size_t g0 = 0; g0 < G; g0 += 4) {
        size_t gn = G - g0 < 4 ? G - g0 : 4;
        const float *q0 = Q + g0 * d, *q1 = Q + (g0 + (gn > 1)) * d, *q2 = Q + (g0 + (gn > 2 ? 2 : 0)) * d,
                    *q3 = Q + (g0 + (gn > 3 ? 3 : 0)) * d;
        size_t j = 0;
        for (; j + 2 <= n; j += 2) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (size_t i = 0; i < d; i += 8) {
                __m256 x = KV_LD(j, i), y = KV_LD(j + 1, i), v;
                v = _mm256_loadu_ps(q0 + i); a0 = _mm256_fmadd_ps(v, x, a0); b0 = _mm256_fmadd_ps(v, y, b0);
                v = _mm256_loadu_ps(q1 + i); a1 = _mm256_fmadd_ps(v, x, a1); b1 = _mm256_fmadd_ps(v, y, b1);
                v = _mm256_loadu_ps(q2 + i); a2 = _mm256_fmadd_ps(v, x, a2); b2 = _mm256_fmadd_ps(v, y, b2);
                v = _mm256_loadu_ps(q3 + i); a3 = _mm256_fmadd_ps(v, x, a3); b3 = _mm256_fmadd_ps(v, y, b3);
            }
            float ra[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
            float rb[4] = {hsum256(b0), hsum256(b1), hsum256(b2), hsum256(b3)};
            for (size_t g = 0; g < gn; g++) {
                S[(g0 + g) * n + j] = scale * ra[g];
                S[(g0 + g) * n + j + 1] = scale * rb[g];
            }
        }
        for (; j < n; j++)
            for (size_t g = 0; g < gn; g++)
                S[(g0 + g) * n + j] = scale * dot_avx2(Q + (g0 + g) * d, f16 ? (const void *)((const uint16_t *)K + j * d)
                                                                          : (const void *)((const float *)K + j * d), f16, d);
    }
#undef KV_LD
}
#endif

#ifdef KST_KV_DOT_AVX2
/* O (G, C) = scale * A (G, R) M (R, C), M float16 or float32 row-major: up to 4 rows of A, 16
 * columns of M at a time, 8 independent FMA chains and no reductions. The scores of a transposed
 * key block (A the queries, M = K^T) and the weighted sums of a value block (A the weights, M = V)
 * are both this product. */
__attribute__((target("avx2,f16c,fma"))) static void comb_avx2(float *O, const float *A, size_t G,
                                                                 const void *M, int f16, size_t R,
                                                                 size_t C, float scale) {
    __m256 sc = _mm256_set1_ps(scale);
    for (size_t g0 = 0; g0 < G; g0 += 4) {
        size_t gn = G - g0 < 4 ? G - g0 : 4;
        const float *q0 = A + g0 * R, *q1 = A + (g0 + (gn > 1)) * R, *q2 = A + (g0 + (gn > 2 ? 2 : 0)) * R,
                    *q3 = A + (g0 + (gn > 3 ? 3 : 0)) * R;
        size_t j = 0;
        for (; j + 16 <= C; j += 16) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (size_t i = 0; i < R; i++) {
                __m256 x, y, v;
                if (f16) {
                    const uint16_t *r = (const uint16_t *)M + i * C + j;
                    x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)r));
                    y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + 8)));
                } else {
                    const float *r = (const float *)M + i * C + j;
                    x = _mm256_loadu_ps(r);
                    y = _mm256_loadu_ps(r + 8);
                }
                v = _mm256_broadcast_ss(q0 + i); a0 = _mm256_fmadd_ps(v, x, a0); b0 = _mm256_fmadd_ps(v, y, b0);
                v = _mm256_broadcast_ss(q1 + i); a1 = _mm256_fmadd_ps(v, x, a1); b1 = _mm256_fmadd_ps(v, y, b1);
                v = _mm256_broadcast_ss(q2 + i); a2 = _mm256_fmadd_ps(v, x, a2); b2 = _mm256_fmadd_ps(v, y, b2);
                v = _mm256_broadcast_ss(q3 + i); a3 = _mm256_fmadd_ps(v, x, a3); b3 = _mm256_fmadd_ps(v, y, b3);
            }
            __m256 aa[4] = {a0, a1, a2, a3}, bb[4] = {b0, b1, b2, b3};
            for (size_t g = 0; g < gn; g++) {
                _mm256_storeu_ps(O + (g0 + g) * C + j, _mm256_mul_ps(sc, aa[g]));
                _mm256_storeu_ps(O + (g0 + g) * C + j + 8, _mm256_mul_ps(sc, bb[g]));
            }
        }
        for (; j < C; j++)
            for (size_t g = 0; g < gn; g++) {
                float a = 0;
                for (size_t i = 0; i < R; i++)
                    a += A[(g0 + g) * R + i] * (f16 ? kst_f16_to_f32(((const uint16_t *)M)[i * C + j]) : ((const float *)M)[i * C + j]);
                O[(g0 + g) * C + j] = scale * a;
            }
    }
}

/* exp(x) for 8 floats: 2^k * p(r), x = k ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial);
 * 0 below -87.3 (exp's float range), x <= 0 here. */
__attribute__((target("avx2,fma"))) static __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, p);
}
__attribute__((target("avx2,fma"))) static void exp_shift_avx2(float *w, size_t n, float mx) {
    __m256 m = _mm256_set1_ps(mx);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(w + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(w + j), m)));
    for (; j < n; j++) w[j] = expf(w[j] - mx);
}
/* kst_kv_alloc_add: the max, then e = lf exp(temp cs - temp max) and their sum, then a += e / Z */
__attribute__((target("avx2,fma"))) static int alloc_add_avx2(float *a, const float *cs, const float *lf, size_t n,
                                                               float temp, float *e) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(_mm256_loadu_ps(cs + j), vm); /* (a NaN score passed over) */
    float mv[8], m = -INFINITY;
    _mm256_storeu_ps(mv, vm);
    for (int i = 0; i < 8; i++) m = mv[i] > m ? mv[i] : m;
    for (; j < n; j++) m = cs[j] > m ? cs[j] : m;
    if (!(m > -INFINITY)) return 0;
    __m256 vt = _mm256_set1_ps(temp), vs = _mm256_set1_ps(temp * m), vz = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 c = _mm256_loadu_ps(cs + j), x = exp8(_mm256_sub_ps(_mm256_mul_ps(vt, c), vs));
        x = _mm256_and_ps(_mm256_mul_ps(x, _mm256_loadu_ps(lf + j)), _mm256_cmp_ps(c, c, _CMP_ORD_Q)); /* (NaN: 0) */
        _mm256_storeu_ps(e + j, x);
        vz = _mm256_add_ps(vz, x);
    }
    float zv[8], Z = 0;
    _mm256_storeu_ps(zv, vz);
    for (int i = 0; i < 8; i++) Z += zv[i];
    for (; j < n; j++) {
        e[j] = cs[j] == cs[j] ? expf(temp * cs[j] - temp * m) * lf[j] : 0;
        Z += e[j];
    }
    if (!(Z > 0)) return 0;
    __m256 iz = _mm256_set1_ps(1.0f / Z);
    for (j = 0; j + 8 <= n; j += 8)
        _mm256_storeu_ps(a + j, _mm256_fmadd_ps(_mm256_loadu_ps(e + j), iz, _mm256_loadu_ps(a + j)));
    for (; j < n; j++) a[j] += e[j] * (1.0f / Z);
    return 1;
}
#endif

static void comb(float *O, const float *A, size_t G, const void *M, int f16, size_t R, size_t C,
                 float scale) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) {
        comb_avx2(O, A, G, M, f16, R, C, scale);
        return;
    }
#endif
    for (size_t g = 0; g < G; g++)
        for (size_t j = 0; j < C; j++) {
            float a = 0;
            for (size_t i = 0; i < R; i++)
                a += A[g * R + i] * (f16 ? kst_f16_to_f32(((const uint16_t *)M)[i * C + j]) : ((const float *)M)[i * C + j]);
            O[g * C + j] = scale * a;
        }
}

void kst_kv_scores_t(float *S, const float *Q, size_t G, const void *Kt, int f16, size_t n,
                     size_t d, float scale) {
    comb(S, Q, G, Kt, f16, d, n, scale);
}

int kst_kv_fill_round(size_t n, const uint32_t *rc, float *w, uint32_t *ns, float lw, double *wopen, uint64_t *took) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) return fill_round_avx2(n, rc, w, ns, lw, wopen, took);
#endif
    *wopen = 0;
    *took = 0;
    return fill_round_from(0, n, rc, w, ns, lw, wopen, took);
}

int kst_kv_alloc_add(float *a, const float *cs, const float *lf, size_t n, float temp, float *e) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) return alloc_add_avx2(a, cs, lf, n, temp, e);
#endif
    float m = -INFINITY;
    for (size_t j = 0; j < n; j++) m = cs[j] > m ? cs[j] : m;
    if (!(m > -INFINITY)) return 0;
    float Z = 0;
    for (size_t j = 0; j < n; j++) {
        e[j] = cs[j] == cs[j] ? expf(temp * cs[j] - temp * m) * lf[j] : 0;
        Z += e[j];
    }
    if (!(Z > 0)) return 0;
    for (size_t j = 0; j < n; j++) a[j] += e[j] * (1.0f / Z);
    return 1;
}

void kst_kv_exp_shift(float *w, size_t n, float mx) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) {
        exp_shift_avx2(w, n, mx);
        return;
    }
#endif
    for (size_t j = 0; j < n; j++) w[j] = expf(w[j] - mx);
}

void kst_kv_scores_multi(float *S, const float *Q, size_t G, const void *K, int f16, size_t n,
                         size_t d, float scale) {
#ifdef KST_KV_DOT_AVX2
    if (has_avx2() && d % 8 == 0) {
        scores_avx2(S, Q, G, K, f16, n, d, scale);
        return;
    }
#endif
    for (size_t j = 0; j < n; j++) {
        const void *r = f16 ? (const void *)((const uint16_t *)K + j * d) : (const void *)((const float *)K + j * d);
        for (size_t g = 0; g < G; g++) S[g * n + j] = scale * kst_kv_dot(Q + g * d, r, f16, d);
    }
}

void kst_kv_wsum_multi(float *O, const float *W, size_t G, const void *V, int f16, size_t n,
                       size_t d) {
    comb(O, W, G, V, f16, n, d, 1.0f);
}

static const void *row_at(const void *base, int f16, size_t row, size_t d) {
    return f16 ? (const void *)((const uint16_t *)base + row * d)
               : (const void *)((const float *)base + row * d);
}

void kst_attn_partial(float *out, float *lse, float *scratch, const float *q, const void *K,
                      const void *V, int f16, const int64_t *ids, size_t first, size_t n,
                      size_t d, float scale) {
    memset(out, 0, d * sizeof(float));
    if (n == 0) {
        *lse = -INFINITY;
        return;
    }
    float mx = -INFINITY;
    /* Gathered rows (retrieved keys, tail samples) are scattered over a cache far larger than
     * the CPU's caches: ask for the rows PF ahead so their reads overlap. */
    const size_t PF = 8, rowb = d * (f16 ? 2 : 4);
    for (size_t j = 0; ids && j < PF && j < n; j++)
        for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(K, f16, (size_t)ids[j], d) + o);
    for (size_t j = 0; j < n; j++) {
        if (ids && j + PF < n)
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(K, f16, (size_t)ids[j + PF], d) + o);
        size_t r = ids ? (size_t)ids[j] : first + j;
        scratch[j] = scale * kst_kv_dot(q, row_at(K, f16, r, d), f16, d);
        if (scratch[j] > mx) mx = scratch[j];
    }
    /* Sums in double: a partial may cover a million keys, and its lse feeds an exact merge. */
    double sum = 0;
    for (size_t j = 0; ids && j < PF && j < n; j++)
        for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(V, f16, (size_t)ids[j], d) + o);
    for (size_t j = 0; j < n; j++) {
        if (ids && j + PF < n)
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(V, f16, (size_t)ids[j + PF], d) + o);
        float w = expf(scratch[j] - mx);
        sum += w;
        size_t r = ids ? (size_t)ids[j] : first + j;
#ifdef KST_KV_DOT_AVX2
        if (has_avx2()) {
            axpy_avx2(out, w, row_at(V, f16, r, d), f16, d);
            continue;
        }
#endif
        if (f16) {
            const uint16_t *v = (const uint16_t *)V + r * d;
            for (size_t i = 0; i < d; i++) out[i] += w * kst_f16_to_f32(v[i]);
        } else {
            const float *v = (const float *)V + r * d;
#pragma omp simd
            for (size_t i = 0; i < d; i++) out[i] += w * v[i];
        }
    }
    float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < d; i++) out[i] *= inv;
    *lse = mx + (float)log(sum);
}

void kst_attn_partial_scored(float *out, float *lse, float *scratch, const float *s, const void *V, int f16,
                             const int64_t *ids, size_t n, size_t d, float scale) {
    memset(out, 0, d * sizeof(float));
    if (n == 0) {
        *lse = -INFINITY;
        return;
    }
    float mx = -INFINITY;
    for (size_t j = 0; j < n; j++) {
        scratch[j] = scale * s[j];
        if (scratch[j] > mx) mx = scratch[j];
    }
    const size_t PF = 8, rowb = d * (f16 ? 2 : 4);
    for (size_t j = 0; j < PF && j < n; j++)
        for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(V, f16, (size_t)ids[j], d) + o);
    double sum = 0;
    for (size_t j = 0; j < n; j++) {
        if (j + PF < n)
            for (size_t o = 0; o < rowb; o += 64) __builtin_prefetch((const char *)row_at(V, f16, (size_t)ids[j + PF], d) + o);
        float w = expf(scratch[j] - mx);
        sum += w;
        kst_kv_axpy(out, w, row_at(V, f16, (size_t)ids[j], d), f16, d);
    }
    float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < d; i++) out[i] *= inv;
    *lse = mx + (float)log(sum);
}

void kst_kv_cv_apply(float *o, float *lse, const float *da, double dz, double nt, size_t d) {
    double z = 1 + dz / nt;
    if (!(*lse > -INFINITY) || !(z >= 0.25 && z <= 4)) return;
    for (size_t i = 0; i < d; i++) o[i] = (float)(((double)o[i] + (double)da[i] / nt) / z);
    *lse += (float)log(z);
}

void kst_attn_merge(float *o, float *lse, const float *o2, float lse2, size_t d) {
    if (lse2 == -INFINITY) return;
    if (*lse == -INFINITY) {
        memcpy(o, o2, d * sizeof(float));
        *lse = lse2;
        return;
    }
    float m = *lse > lse2 ? *lse : lse2;
    double a = exp((double)*lse - m), b = exp((double)lse2 - m), s = a + b;
    float wa = (float)(a / s), wb = (float)(b / s);
    for (size_t i = 0; i < d; i++) o[i] = wa * o[i] + wb * o2[i];
    *lse = m + (float)log(s);
}

void kst_kv_cap_init(kst_kv_cap *p, size_t d) {
    memset(p->o, 0, d * sizeof(float));
    p->s = 0;
    p->n = 0;
}
void kst_kv_cap_merge(kst_kv_cap *p, float *o, float *lse, float tau, size_t d) {
    if (p->s > 0) kst_attn_merge_sum(o, lse, p->o, p->s, tau + logf(kst_kv_cap_shrink(p->n)), d);
}

void kst_attn_merge_sum(float *o, float *lse, float *v, double s, float mx, size_t d) {
    if (!(s > 0)) return;
    float inv = (float)(1.0 / s);
    for (size_t i = 0; i < d; i++) v[i] *= inv;
    kst_attn_merge(o, lse, v, mx + (float)log(s), d);
}

/* kst_kv_top's insertion of w[j] (a candidate: the list not full, or above its last) */
static inline void top_insert(float v, size_t j, size_t nt, size_t *cnt, float *tw, uint32_t *tp) {
    if (*cnt == nt && !(v > tw[nt - 1])) return;
    size_t i = *cnt < nt ? (*cnt)++ : nt - 1;
    for (; i > 0 && tw[i - 1] < v; i--) {
        tw[i] = tw[i - 1];
        tp[i] = tp[i - 1];
    }
    tw[i] = v;
    tp[i] = (uint32_t)j;
}
#ifdef KST_KV_DOT_AVX2
/* the values >= t among w[0..n) (n a multiple of 8) */
__attribute__((target("avx2,popcnt"))) static size_t top_count_avx2(const float *w, size_t n, float t) {
    size_t c = 0;
    __m256 tv = _mm256_set1_ps(t);
    for (size_t j = 0; j < n; j += 8)
        c += (size_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + j), tv, _CMP_GE_OQ)));
    return c;
}
/* A threshold t with at least nt of w >= t and few more, by bisection on the value (counts of
 * 8 at a time, no branch a value), then the values >= t inserted in order: every value below t
 * has nt values above it, so the list is the one inserting all of them gives. Returns 0 (nothing
 * done) where w holds a NaN or n is not a multiple of 8. */
__attribute__((target("avx2,popcnt"))) static int top_avx2(const float *w, size_t n, size_t nt, float *tw,
                                                          uint32_t *tp) {
    if (n % 8) return 0;
    __m256 lo8 = _mm256_loadu_ps(w), hi8 = lo8;
    if (_mm256_movemask_ps(_mm256_cmp_ps(lo8, lo8, _CMP_UNORD_Q))) return 0;
    for (size_t j = 8; j < n; j += 8) {
        __m256 x = _mm256_loadu_ps(w + j);
        lo8 = _mm256_min_ps(lo8, x);
        hi8 = _mm256_max_ps(hi8, x);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) return 0;
    }
    float l8[8], h8[8], lo, hi;
    _mm256_storeu_ps(l8, lo8);
    _mm256_storeu_ps(h8, hi8);
    lo = l8[0];
    hi = h8[0];
    for (int i = 1; i < 8; i++) {
        lo = l8[i] < lo ? l8[i] : lo;
        hi = h8[i] > hi ? h8[i] : hi;
    }
    if (!isfinite(lo) || !isfinite(hi)) return 0;
    float t = lo; /* count(>= lo) = n >= nt */
    for (int it = 0; it < 12; it++) {
        float mid = lo + (hi - lo) * 0.5f;
        if (!(mid > lo) || !(mid < hi)) break;
        size_t c = top_count_avx2(w, n, mid);
        if (c >= nt) {
            t = lo = mid;
            if (c <= nt + nt / 2) break;
        } else {
            hi = mid;
        }
    }
    /* the candidates (>= t), in order; up to 64 of them each placed at its rank (the values
     * above it, and those equal to it before it), 8 compared at a time; more (ties) inserted */
    float cv[72];
    uint32_t ci[64];
    size_t c = 0, cnt = 0;
    __m256 tv = _mm256_set1_ps(t);
    for (size_t j = 0; j < n; j += 8) {
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(w + j), tv, _CMP_GE_OQ));
        while (m) {
            unsigned b = (unsigned)__builtin_ctz(m);
            m &= m - 1;
            if (c < 64) {
                cv[c] = w[j + b];
                ci[c] = (uint32_t)(j + b);
            } else {
                if (c == 64)
                    for (size_t i = 0; i < 64; i++) top_insert(cv[i], ci[i], nt, &cnt, tw, tp);
                top_insert(w[j + b], j + b, nt, &cnt, tw, tp);
            }
            c++;
        }
    }
    if (c > 64) return 1;
    for (size_t i = c; i < (c + 7) / 8 * 8; i++) cv[i] = -INFINITY;
    for (size_t i = 0; i < c; i++) {
        __m256 vi = _mm256_set1_ps(cv[i]);
        size_t rank = 0;
        for (size_t k = 0; k < c; k += 8) {
            __m256 x = _mm256_loadu_ps(cv + k);
            unsigned gt = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, vi, _CMP_GT_OQ));
            unsigned eq = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x, vi, _CMP_EQ_OQ));
            unsigned before = i <= k ? 0u : i - k >= 8 ? 0xffu : (1u << (i - k)) - 1;
            rank += (size_t)__builtin_popcount(gt) + (size_t)__builtin_popcount(eq & before);
        }
        if (rank < nt) {
            tw[rank] = cv[i];
            tp[rank] = ci[i];
        }
    }
    return 1;
}
#endif
/* kst_kv_sum: eight running sums in double (lane j % 8), added pairwise at the end: the same
 * order with and without AVX2, and no chain of one addition after another */
#ifdef KST_KV_DOT_AVX2
__attribute__((target("avx2"))) static void sum8_avx2(const float *w, size_t n8, double *l) {
    __m256d a = _mm256_setzero_pd(), b = a;
    for (size_t j = 0; j < n8; j += 8) {
        a = _mm256_add_pd(a, _mm256_cvtps_pd(_mm_loadu_ps(w + j)));
        b = _mm256_add_pd(b, _mm256_cvtps_pd(_mm_loadu_ps(w + j + 4)));
    }
    _mm256_storeu_pd(l, a);
    _mm256_storeu_pd(l + 4, b);
}
#endif
double kst_kv_sum(const float *w, size_t n) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t n8 = n / 8 * 8;
#ifdef KST_KV_DOT_AVX2
    if (has_avx2()) sum8_avx2(w, n8, l);
    else
#endif
        for (size_t j = 0; j < n8; j++) l[j % 8] += w[j];
    for (size_t j = n8; j < n; j++) l[j % 8] += w[j];
    return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

size_t kst_kv_top(const float *w, size_t n, size_t k, float *tw, uint32_t *tp) {
    size_t nt = n < k ? n : k, cnt = 0;
    if (!nt) return 0;
#ifdef KST_KV_DOT_AVX2
    if (n >= 4 * nt && has_avx2() && top_avx2(w, n, nt, tw, tp)) return nt;
#endif
    for (size_t j = 0; j < n; j++) top_insert(w[j], j, nt, &cnt, tw, tp);
    return nt;
}

/* Pair i's dimensions under RoPE's two layouts, and the turn of that pair by (c, s). */
static inline void rope_pair(float *x, size_t i, size_t nf, int interleaved, double c, double s) {
    size_t i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + nf;
    double x0 = x[i0], x1 = x[i1];
    x[i0] = (float)(x0 * c - x1 * s);
    x[i1] = (float)(x1 * c + x0 * s);
}

void kst_rope_angles(double *cs, const float *inv_freq, size_t nf, double delta) {
    for (size_t i = 0; i < nf; i++) {
        double a = delta * (double)inv_freq[i];
        cs[2 * i] = cos(a);
        cs[2 * i + 1] = sin(a);
    }
}

void kst_rope_rotate(float *x, size_t d, const double *cs, size_t nf, int interleaved) {
    if (2 * nf > d) nf = d / 2;
    for (size_t i = 0; i < nf; i++) rope_pair(x, i, nf, interleaved, cs[2 * i], cs[2 * i + 1]);
}

void kst_rope_shift(float *x, size_t d, const float *inv_freq, size_t nf, int interleaved, double delta) {
    if (2 * nf > d) nf = d / 2;
    for (size_t i = 0; i < nf; i++) {
        double a = delta * (double)inv_freq[i];
        rope_pair(x, i, nf, interleaved, cos(a), sin(a));
    }
}
