/* kv_ref.h - float64 references for the KV-cache tests (test_kv.c, test_kv_spread.c). */
#ifndef KST_TESTS_KV_REF_H
#define KST_TESTS_KV_REF_H

#include <math.h>
#include <stdlib.h>

/* Full attention of q over n rows of K and V (row-major, d wide), scores times scale, in float64. */
static inline void full_attn64(double *out, const float *q, const float *K, const float *V, size_t n, size_t d,
                               double scale) {
    double mx = -INFINITY, sum = 0, *s = malloc(n * sizeof *s);
    for (size_t j = 0; j < n; j++) {
        double a = 0;
        for (size_t i = 0; i < d; i++) a += (double)q[i] * K[j * d + i];
        s[j] = a * scale;
        if (s[j] > mx) mx = s[j];
    }
    for (size_t i = 0; i < d; i++) out[i] = 0;
    for (size_t j = 0; j < n; j++) {
        double w = exp(s[j] - mx);
        sum += w;
        for (size_t i = 0; i < d; i++) out[i] += w * V[j * d + i];
    }
    for (size_t i = 0; i < d; i++) out[i] /= sum;
    free(s);
}

/* Relative L2 error of got against want (d values). */
static inline double rel_err64(const float *got, const double *want, size_t d) {
    double num = 0, den = 0;
    for (size_t i = 0; i < d; i++) {
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return sqrt(num / den);
}

/* out = sum_t w[t] V[t] / sum_t w[t] over n rows of V (d wide): a reference estimator's output
 * from its per-token weights. */
static inline void wsum_rows64(double *out, const double *w, const float *V, size_t n, size_t d) {
    double den = 0;
    for (size_t i = 0; i < d; i++) out[i] = 0;
    for (size_t t = 0; t < n; t++) {
        den += w[t];
        for (size_t i = 0; i < d; i++) out[i] += w[t] * V[t * d + i];
    }
    for (size_t i = 0; i < d; i++) out[i] /= den;
}

#endif
