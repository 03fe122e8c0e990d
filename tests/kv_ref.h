/* kv_ref.h - float64 references and test data for the KV-cache tests (test_kv.c, test_kv_idle.c,
 * test_kv_spread.c). */
#ifndef KST_TESTS_KV_REF_H
#define KST_TESTS_KV_REF_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Standard normal draws (xorshift64 and Box-Muller) for the KV tests' data; each test file has
 * its own state (kv_rng, which a test may reseed). */
static uint64_t kv_rng = 0x9e3779b97f4a7c15ull;
static inline double kv_gauss(void) {
    kv_rng ^= kv_rng << 13; kv_rng ^= kv_rng >> 7; kv_rng ^= kv_rng << 17;
    double u = ((kv_rng >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    kv_rng ^= kv_rng << 13; kv_rng ^= kv_rng >> 7; kv_rng ^= kv_rng << 17;
    double v = (kv_rng >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

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

/* The capped tail estimate's shrinkage (kv.h; core/kv_attn.h, kst_kv_cap_shrink with K0 = 4): the
 * part at tau's weight of the n samples above tau that stand for others is taken down by
 * n / (n + 4). */
static inline double cap_shrink64(size_t n) { return (double)n / (double)(n + 4); }

/* The tail estimate's float64 reference (kv.h): sinks, window and the m retrieved ids rid
 * (token positions) exact; the nidx indexed keys split into nc strata of nd keys when the sample
 * was drawn (f <= 1: one, the uniform sample of test_kv.c), stratum c (from the oldest) f^(nc-1-c) times as long as the nearest's,
 * bounds rounded, the keys indexed since the draw in the last; in each, nr_c = min(512, ns - 512 c)
 * keys at floor((2i + 1) N_c / (2 nr_c)); the sampled keys not retrieved (kept) weighted rho_c =
 * (N_c - m_c) / kept_c in their stratum, except those that score above tau, the least retrieved
 * key's (na of them): each weighs exp(l) + lambda (rho_c - 1) exp(tau), itself once and the rest
 * of its ratio at tau's weight, lambda = cap_shrink64(the na with rho_c > 1) (kv.h's capped
 * estimate, the library's default). With one stratum and ref_cv (opts.tail_cv, kv.h: the
 * tail's control variate) the weights of the keys left out (T: indexed, not retrieved) are
 * then corrected by the scores' linear term: with u = 1 + l - lbar (lbar: T's mean score), b =
 * the kept samples' weight over |T| and rho the ratio, each key of T gains b u and each kept
 * sample loses rho b u, unless that moves the tail's weight out of [1/4, 4] times its own.
 * Returns kept (all strata); adds the na to *nabove. */
static int ref_cv = 0; /* (tail_ref64: 1 for caches with opts.tail_cv) */
static inline size_t tail_ref64(double *out, const float *q, const float *K, const float *V, size_t n, size_t d,
                                size_t sinks, size_t window, const int64_t *rid, size_t m, size_t nd, size_t ns,
                                double f, size_t *nabove) {
    size_t nidx = n - sinks - window, ch = 512, nc = f > 1 ? (ns + ch - 1) / ch : 1, b[17], kept_all = 0;
    if (nc == 1) {
        b[0] = 0;
        b[1] = nd;
    } else {
        double tot = 0, w = 1, acc = 0;
        for (size_t c = 0; c < nc; c++, w *= f) tot += w;
        w = 1;
        b[nc] = nd;
        for (size_t c = nc; c-- > 0; w *= f) {
            acc += w;
            b[c] = c ? (size_t)((1 - acc / tot) * (double)nd + 0.5) : 0;
        }
    }
    double sc = 1.0 / sqrt((double)d), *l = malloc(n * sizeof *l), *w = calloc(n, sizeof *w);
    char *ret = calloc(nidx, 1);
    for (size_t t = 0; t < n; t++) {
        double a = 0;
        for (size_t i = 0; i < d; i++) a += (double)q[i] * K[t * d + i];
        l[t] = a * sc;
    }
    double mx = -INFINITY, tau = INFINITY;
    for (size_t t = 0; t < n; t++) mx = l[t] > mx ? l[t] : mx;
    for (size_t r = 0; r < m; r++) {
        ret[rid[r] - (int64_t)sinks] = 1;
        tau = l[rid[r]] < tau ? l[rid[r]] : tau;
    }
    for (size_t t = 0; t < n; t++)
        if (t < sinks || t >= sinks + nidx || ret[t - sinks]) w[t] = exp(l[t] - mx);
    double rho[17] = {0};
    size_t nac = 0; /* (the samples above tau given a part at tau's weight: rho_c > 1) */
    for (int pass = 0; pass < 2; pass++)
        for (size_t c = 0; c < nc; c++) {
            size_t lo = b[c], hi = c == nc - 1 ? nidx : b[c + 1], N = hi - lo, nr = nc == 1 ? ns : (ns - c * ch < ch ? ns - c * ch : ch);
            size_t N0 = b[c + 1] - b[c], mc = 0, kept = 0, na = 0;
            for (size_t x = lo; x < hi; x++) mc += ret[x];
            for (size_t i = 0; i < nr; i++) {
                size_t x = lo + (2 * i + 1) * N0 / (2 * nr);
                if (ret[x]) continue;
                kept++;
                na += l[sinks + x] > tau;
            }
            if (pass == 0) {
                kept_all += kept;
                *nabove += na;
                rho[c] = kept ? (double)(N - mc) / (double)kept : 0;
                if (rho[c] > 1) nac += na;
                continue;
            }
            for (size_t i = 0; i < nr; i++) {
                size_t x = lo + (2 * i + 1) * N0 / (2 * nr);
                if (ret[x]) continue;
                w[sinks + x] = l[sinks + x] > tau ? exp(l[sinks + x] - mx) + cap_shrink64(nac) * (rho[c] - 1) * exp(tau - mx)
                                                  : rho[c] * exp(l[sinks + x] - mx);
            }
        }
    if (nc == 1 && ref_cv && kept_all > 0) { /* the control variate */
        double nt = 0, lbar = 0, zt = 0, su = 0, ssu = 0;
        for (size_t x = 0; x < nidx; x++)
            if (!ret[x]) nt += 1, lbar += l[sinks + x];
        lbar /= nt;
        char *smp = calloc(nidx, 1);
        for (size_t i = 0; i < ns; i++) {
            size_t x = (2 * i + 1) * nd / (2 * ns);
            if (ret[x]) continue;
            smp[x] = 1;
            zt += w[sinks + x];
            ssu += 1 + l[sinks + x] - lbar;
        }
        for (size_t x = 0; x < nidx; x++)
            if (!ret[x]) su += 1 + l[sinks + x] - lbar;
        double bc = zt / nt, z = 1 + bc * (su - rho[0] * ssu) / zt;
        if (z >= 0.25 && z <= 4)
            for (size_t x = 0; x < nidx; x++) {
                if (ret[x]) continue;
                double u = 1 + l[sinks + x] - lbar;
                w[sinks + x] += bc * u - (smp[x] ? rho[0] * bc * u : 0);
            }
        free(smp);
    }
    wsum_rows64(out, w, V, n, d);
    free(l);
    free(w);
    free(ret);
    return kept_all;
}

#endif
