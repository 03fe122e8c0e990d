/* kv_tc_ref.h - test data and the float64 reference of the clustered tail estimate, shared by
 * the suites of the per-head and the shared sample (test_kv_tclust.c, test_kv_tshare_step.c). Needs
 * harness.h (fail_msg, assert_ok) and kv_ref.h (kv_gauss, wsum_rows64) first. */
#ifndef KST_TESTS_KV_TC_REF_H
#define KST_TESTS_KV_TC_REF_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "core/half.h"
#include "index/kv.h"
#include "index/kv_tclust.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

/* 1 where a GPU pass can run: a CUDA build and a device visible. */
static inline int tc_have_gpu(void) {
#ifdef KST_CUDA
    return kst_kv_cuda_devices() > 0;
#else
    return 0;
#endif
}

#define TOL_A 2e-5
#define TOL_R 1e-4

/* The data's choices (kv_gauss draws the values): each test seeds both states itself
 * (tc_seed), so that its data and figures do not depend on the tests run before it. */
static uint64_t tc_rng = 0x2545f4914f6cdd1dull;
static inline void tc_seed(uint64_t s) {
    kv_rng = 0x9e3779b97f4a7c15ull ^ (s * 0xbf58476d1ce4e5b9ull);
    tc_rng = 0x2545f4914f6cdd1dull ^ (s * 0x94d049bb133111ebull);
}
/* A uniform integer below n. */
static inline size_t tc_below(size_t n) {
    tc_rng ^= tc_rng << 13;
    tc_rng ^= tc_rng >> 7;
    tc_rng ^= tc_rng << 17;
    return (size_t)((tc_rng >> 11) % n);
}

/* Keys of H KV heads around ncent centres each: centre (H, ncent, d) N(0, cs^2) a dimension,
 * token t's key in head h its centre (uniform) + N(0, ks^2); values 1 + N(0, 1); K, V (n, H, d). */
static inline void mix_data(float *K, float *V, float *cen, size_t n, size_t H, size_t d, size_t ncent, double cs,
                     double ks) {
    for (size_t i = 0; i < H * ncent * d; i++) cen[i] = (float)(cs * kv_gauss());
    for (size_t t = 0; t < n; t++)
        for (size_t h = 0; h < H; h++) {
            const float *c = cen + (h * ncent + tc_below(ncent)) * d;
            for (size_t i = 0; i < d; i++) K[(t * H + h) * d + i] = c[i] + (float)(ks * kv_gauss());
        }
    for (size_t i = 0; i < n * H * d; i++) V[i] = (float)(1.0 + kv_gauss());
}

/* Queries (nq, QH, d): query head hq near a centre of its KV head hq / (QH / H), a * (centre +
 * N(0, 0.3^2)), a drawn from {0.5, 1, 2}. */
static inline void mix_queries(float *Q, const float *cen, size_t nq, size_t QH, size_t H, size_t d, size_t ncent) {
    static const double amp[3] = {0.5, 1.0, 2.0};
    for (size_t s = 0; s < nq; s++)
        for (size_t hq = 0; hq < QH; hq++) {
            const float *c = cen + ((hq / (QH / H)) * ncent + tc_below(ncent)) * d;
            double a = amp[tc_below(3)];
            for (size_t i = 0; i < d; i++) Q[(s * QH + hq) * d + i] = (float)(a * (c[i] + 0.3 * kv_gauss()));
        }
}

/* float16 bits of x (n values) into h, and x rounded to them (the float64 references read x). */
static inline void round_f16(uint16_t *h, float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h[i] = kst_f32_to_f16(x[i]);
        x[i] = kst_f16_to_f32(h[i]);
    }
}

/* Rows of KV head h (n, d) out of (n, H, d). */
static inline void head_rows(float *dst, const float *src, size_t n, size_t H, size_t h, size_t d) {
    for (size_t t = 0; t < n; t++) memcpy(dst + t * d, src + (t * H + h) * d, d * sizeof(float));
}

/* <a, b> over n floats, in float64. */
static inline double dot64(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* The exact part of a step's float64 references: l (n) the scaled scores of q against the rows
 * of K (n, d), ret (nidx) 1 for the m retrieved positions pos (each checked to lie in the
 * index), w (n, zeroed) exp(l - max) for the exact tokens (sinks, those from sinks + nidx on, the
 * retrieved ones). Returns the max. */
static inline double tc_exact64(double *l, double *w, uint8_t *ret, const float *q, const float *K, size_t n, size_t d,
                                double scale, size_t sinks, size_t nidx, const int64_t *pos, size_t m) {
    double mx = -INFINITY;
    for (size_t t = 0; t < n; t++) {
        l[t] = dot64(q, K + t * d, d) * scale;
        mx = l[t] > mx ? l[t] : mx;
    }
    for (size_t i = 0; i < m; i++) {
        if (!(pos[i] >= (int64_t)sinks && pos[i] < (int64_t)(sinks + nidx)))
            fail_msg("retrieved position %lld outside the index [%zu, %zu)", (long long)pos[i], sinks, sinks + nidx);
        ret[pos[i] - (int64_t)sinks] = 1;
    }
    for (size_t t = 0; t < n; t++)
        if (t < sinks || t >= sinks + nidx || ret[t - sinks]) w[t] = exp(l[t] - mx);
    return mx;
}

/* The clustered estimator's float64 reference for one query head (kv_tclust.h): positions below
 * sinks and from sinks + nidx on (sinks, pending tokens, window) and the m retrieved positions
 * pos exact; in cluster c of T (ns NULL: no estimate) its first ns[c] members not retrieved, each
 * weighted r_c / ns[c], r_c its members not retrieved (counted here), or, where it scores above
 * tau, the least retrieved score, weighing exp(l) + lambda (r_c / ns[c] - 1) exp(tau): itself
 * once, the rest of its ratio at tau's weight, lambda = cap_shrink64(the such samples with r_c >
 * ns[c]) (kst_kvtc_partial with the cap, the library's default). K, V: the KV head's rows (n, d).
 * Returns the keys sampled. */
static size_t tc_tau_ones; /* samples tc_ref64 capped (above tau), for the suites to report */
static inline size_t tc_ref64(double *out, const float *q, const float *K, const float *V, size_t n, size_t d, double scale,
                       size_t sinks, size_t nidx, const int64_t *pos, size_t m, const kst_kvtc *T,
                       const uint32_t *ns) {
    double *l = malloc(n * sizeof *l), *w = calloc(n, sizeof *w), mx = -INFINITY;
    uint8_t *ret = calloc(nidx + 1, 1);
    size_t got_all = 0;
    mx = tc_exact64(l, w, ret, q, K, n, d, scale, sinks, nidx, pos, m);
    double tau = INFINITY;
    for (size_t i = 0; i < m; i++) tau = l[pos[i]] < tau ? l[pos[i]] : tau;
    size_t nac = 0; /* (the samples above tau given a part at tau's weight) */
    for (int pass = 0; pass < 2; pass++)
        for (size_t c = 0; ns && c < T->C; c++) {
            if (!ns[c]) continue;
            size_t rc = 0, got = 0;
            for (uint32_t i = 0; i < T->len[c]; i++) rc += !ret[T->mem[c][i]];
            double ratio = (double)rc / (double)ns[c];
            for (uint32_t i = 0; i < T->len[c] && got < ns[c]; i++) {
                uint32_t x = T->mem[c][i];
                if (ret[x]) continue;
                if (x >= nidx) fail_msg("cluster %zu holds node %u of %zu indexed", c, x, nidx);
                got++;
                if (pass == 0) {
                    nac += l[sinks + x] > tau && ratio > 1;
                    continue;
                }
                tc_tau_ones += l[sinks + x] > tau;
                w[sinks + x] = l[sinks + x] > tau ? exp(l[sinks + x] - mx) + cap_shrink64(nac) * (ratio - 1) * exp(tau - mx)
                                                  : ratio * exp(l[sinks + x] - mx);
            }
            if (got != ns[c]) fail_msg("cluster %zu: %u samples planned, %zu keys not retrieved", c, ns[c], got);
            if (pass == 1) got_all += got;
        }
    wsum_rows64(out, w, V, n, d);
    free(l);
    free(w);
    free(ret);
    return got_all;
}

/* Appends n more tokens (rows at K, V of the (n, H, d) arrays; float16 when the cache is,
 * rounded in place). */
static inline void append_rows(kst_kvc *c, float *K, float *V, size_t n) {
    const kst_kvc_opts *o = kst_kvc_opts_of(c);
    size_t nv = n * o->kv_heads * o->head_dim;
    kst_error err;
    if (o->f16) {
        uint16_t *K16 = malloc(nv * sizeof *K16), *V16 = malloc(nv * sizeof *V16);
        round_f16(K16, K, nv);
        round_f16(V16, V, nv);
        assert_ok(kst_kvc_append(c, 0, K16, V16, n, &err), &err);
        free(K16);
        free(V16);
    } else {
        assert_ok(kst_kvc_append(c, 0, K, V, n, &err), &err);
    }
}

/* One decode step of layer 0 of c (K, V: its n tokens (n, H, d) as the references read them)
 * checked against the float64 estimator of every query head: the retrieved keys reproduced by
 * kst_kvc_search (the same top_k and ef), n_c by kst_kvtc_plan (kst_kvtc_scores) with temp; stats.sampled the
 * estimator's keys; out_keep (q_heads, d; NULL: none) gets the step's output. Returns the step's
 * sum of n_c. */
static inline size_t check_step(kst_kvc *c, const float *K, const float *V, size_t n, const float *q, size_t top_k,
                                size_t ef, float temp, float *out_keep, const char *what) {
    const kst_kvc_opts *o = kst_kvc_opts_of(c);
    size_t H = o->kv_heads, QH = o->q_heads, G = QH / H, d = o->head_dim, sinks = o->sinks, B = o->tail_samples;
    float *out = malloc(QH * d * sizeof *out), *Kh = malloc(n * d * sizeof *Kh), *Vh = malloc(n * d * sizeof *Vh);
    double ref[512];
    kst_kvc_stats st;
    kst_error err;
    assert_ok(kst_kvc_attend(c, 0, q, top_k, ef, out, &st, &err), &err);
    size_t nidx = kst_kvc_indexed(c, 0), k = top_k < nidx ? top_k : nidx, tot = 0;
    assert_int_equal(st.tokens, n);
    assert_int_equal(st.indexed, nidx);
    int64_t *pos = malloc((k + 1) * sizeof *pos);
    uint32_t *rid = malloc((k + 1) * sizeof *rid);
    for (size_t h = 0; h < QH; h++) {
        const float *qh = q + h * d;
        head_rows(Kh, K, n, H, h / G, d);
        head_rows(Vh, V, n, H, h / G, d);
        size_t found = 0;
        if (k) assert_ok(kst_kvc_search(c, 0, h, qh, k, ef, pos, &found, NULL, &err), &err);
        for (size_t i = 0; i < found; i++) rid[i] = (uint32_t)(pos[i] - (int64_t)sinks);
        const kst_kvtc *T = kst_kvc_tail_clusters(c, 0, h / G);
        uint32_t *ns = NULL, *rcl = NULL;
        float *sc = NULL, *cs = NULL;
        if (T && B > 0 && found < nidx) {
            assert_int_equal(T->na, nidx);
            ns = malloc(T->C * sizeof *ns);
            rcl = malloc(T->C * sizeof *rcl);
            sc = malloc(2 * T->C * sizeof *sc);
            cs = malloc(T->C * sizeof *cs);
            kst_kvtc_scores(T, qh, 1, o->scale, cs);
            kst_kvtc_plan(T, cs, temp, rid, found, B, ns, rcl, sc);
        }
        tot += tc_ref64(ref, qh, Kh, Vh, n, d, o->scale, sinks, nidx, pos, found, T, ns);
        for (size_t j = 0; j < d; j++)
            if (!(fabs(out[h * d + j] - ref[j]) <= TOL_A + TOL_R * fabs(ref[j])))
                fail_msg("%s: head %zu, dim %zu: %.7g, float64 estimator %.7g (%zu indexed, %zu retrieved)", what, h, j,
                         out[h * d + j], ref[j], nidx, found);
        free(ns);
        free(rcl);
        free(sc);
        free(cs);
    }
    if (st.sampled != tot) fail_msg("%s: stats.sampled %zu, the estimator's samples %zu", what, st.sampled, tot);
    if (out_keep) memcpy(out_keep, out, QH * d * sizeof *out);
    free(out);
    free(Kh);
    free(Vh);
    free(pos);
    free(rid);
    return tot;
}

/* The shared plan ns (tot samples in all) of nr query rows Q (nr, d) against float64
 * (kv_tclust.h): cluster c weighted len_c sum_r exp(temp s_rc) / Z_r, s_rc = scale <q_r,
 * centroid_c> (float64), Z_r = sum_c len_c exp(temp s_rc); min(B, sum len) water-filled (a
 * cluster whose share reaches len_c taken whole, the rest shared again); each n_c within 1 of its
 * share, n_c <= len_c, the total exact. Returns the largest |n_c - share|. */
static inline double tc_plan64(const kst_kvtc *T, const uint32_t *ns, size_t tot, const float *Q, size_t nr,
                               double scale, double temp, size_t B, const char *what) {
    size_t C = T->C, d = T->d, all = 0;
    double maxoff = 0;
    double *lw = calloc(C, sizeof *lw), *s = malloc(C * sizeof *s), *x = calloc(C, sizeof *x), *w = malloc(C * sizeof *w);
    char *open = malloc(C);
    for (size_t c = 0; c < C; c++) {
        all += T->len[c];
        open[c] = T->len[c] > 0;
    }
    for (size_t r = 0; r < nr; r++) {
        double m = -INFINITY, Z = 0;
        for (size_t c = 0; c < C; c++) {
            double a = 0;
            for (size_t i = 0; i < d; i++) a += (double)Q[r * d + i] * T->cent[c * d + i];
            s[c] = temp * scale * a;
            if (T->len[c] && s[c] > m) m = s[c];
        }
        for (size_t c = 0; c < C; c++) Z += (double)T->len[c] * exp(s[c] - m);
        for (size_t c = 0; c < C; c++) lw[c] += exp(s[c] - m) / Z;
    }
    size_t want = B < all ? B : all;
    double left = (double)want;
    while (left > 0) {
        double W = 0;
        for (size_t c = 0; c < C; c++) {
            w[c] = open[c] ? (double)T->len[c] * lw[c] : 0;
            W += w[c];
        }
        if (!(W > 0)) break;
        int closed = 0;
        for (size_t c = 0; c < C; c++)
            if (open[c] && left * w[c] / W >= (double)T->len[c]) {
                x[c] = T->len[c];
                open[c] = 0;
                closed = 1;
            }
        if (!closed) {
            for (size_t c = 0; c < C; c++)
                if (open[c]) x[c] = left * w[c] / W;
            break;
        }
        left = (double)want;
        for (size_t c = 0; c < C; c++)
            if (!open[c]) left -= x[c];
    }
    size_t sum = 0;
    for (size_t c = 0; c < C; c++) {
        if (ns[c] > T->len[c]) fail_msg("%s: cluster %zu: %u samples of %u members", what, c, ns[c], T->len[c]);
        double off = fabs((double)ns[c] - x[c]);
        if (!(off <= 1 + 1e-4 * x[c] + 1e-6))
            fail_msg("%s: cluster %zu gets %u samples, its float64 share %.4f (budget %zu of %zu, %zu query rows)", what, c,
                     ns[c], x[c], B, all, nr);
        maxoff = off > maxoff ? off : maxoff;
        sum += ns[c];
    }
    if (sum != want || tot != want)
        fail_msg("%s: the plan has %zu samples (tot %zu), expected min(%zu, %zu)", what, sum, tot, B, all);
    free(lw);
    free(s);
    free(x);
    free(w);
    free(open);
    return maxoff;
}

/* A test's wall time: tc_clock(0) at its start, tc_clock(1) at its end prints it. */
static inline void tc_clock(int end) {
    static double t0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double t = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    if (end) print_message("(%.2f s)\n", t - t0);
    else t0 = t;
}

/* The options the tests start from: one layer, H KV heads x QH query heads, 4 sinks, window 64,
 * top_k 16, ef 48, the key-only index unless queries are given. */
static inline kst_kvc_opts tc_base_opts(size_t d, int f16, kst_kvc_index index, size_t tail, size_t H, size_t QH) {
    kst_kvc_opts o = {0};
    o.layers = 1;
    o.kv_heads = H;
    o.q_heads = QH;
    o.head_dim = d;
    o.f16 = f16;
    o.sinks = 4;
    o.window = 64;
    o.top_k = 16;
    o.ef = 48;
    o.degree = 16;
    o.build_top = 16;
    o.entries = 8;
    o.efc = 64;
    o.index = index;
    o.tail_samples = tail;
    o.codes = d % 32 == 0 && d >= 64;
    return o;
}

#endif
