/* kv_tclust.c - the clustered tail estimate of the KV cache (kv_tclust.h). */
#include "kv_tclust.h"

#include <math.h>
#include <string.h>

#include <faiss/c_api/error_c.h>

#include "core/check.h"
#include "core/half.h"
#include "core/kv_attn.h"
#include "core/mem.h"
#include "index/faiss_ext.h"

#define TC_ITER 8      /* k-means iterations */
#define TC_PER 64      /* training keys per cluster at most */
#define TC_MIN 16      /* keys per cluster at least (else fewer clusters) */
#define TC_BLOCK 256   /* keys assigned per scoring block */
#define TC_PB 16       /* samples per block of the estimate (kst_kvtc_partial) */

static uint32_t tc_next(kst_kvtc *T, uint32_t below) {
    T->rng ^= T->rng << 13;
    T->rng ^= T->rng >> 7;
    T->rng ^= T->rng << 17;
    return (uint32_t)((T->rng >> 11) % below);
}

/* Node x joins cluster c at a uniformly random place of its order (inside-out shuffle). */
static int tc_join(kst_kvtc *T, uint32_t c, uint32_t x, kst_error *err) {
    if (T->len[c] == T->mcap[c]) {
        uint32_t cap = T->mcap[c] ? 2 * T->mcap[c] : 16;
        int rc = kst_realloc((void **)&T->mem[c], cap, sizeof(uint32_t), "tail cluster members", err);
        if (rc != KST_OK) return rc;
        T->mcap[c] = cap;
    }
    uint32_t n = T->len[c]++, j = tc_next(T, n + 1);
    if (j < n) { /* (j == n: x joins at the end) */
        T->mem[c][n] = T->mem[c][j];
        T->pos[T->mem[c][n]] = n;
    }
    T->mem[c][j] = x;
    T->pos[x] = j;
    return KST_OK;
}

void kst_kvtc_free(kst_kvtc *T) {
    if (!T) return;
    for (size_t c = 0; T->mem && c < T->C; c++) kst_free(T->mem[c]);
    kst_free(T->mem);
    kst_free(T->len);
    kst_free(T->mcap);
    kst_free(T->cent);
    kst_free(T->cent_t);
    kst_free(T->hn2);
    kst_free(T->of);
    kst_free(T->pos);
    memset(T, 0, sizeof *T);
}

size_t kst_kvtc_bytes(const kst_kvtc *T) {
    size_t b = T->C * (2 * T->d + 1) * sizeof(float) + 2 * T->ncap * sizeof(uint32_t) +
               T->C * (sizeof(uint32_t *) + 2 * sizeof(uint32_t));
    for (size_t c = 0; c < T->C; c++) b += (size_t)T->mcap[c] * sizeof(uint32_t);
    return b;
}

int kst_kvtc_add(kst_kvtc *T, const void *K, int f16, size_t n, kst_error *err) {
    if (!T->C || n <= T->na) return KST_OK;
    size_t d = T->d, lo = T->na, cnt = n - lo;
    int rc = KST_OK;
    if (T->ncap < n) {
        size_t cap = n + n / 4 + 64;
        KST_TRY(kst_realloc((void **)&T->of, cap, sizeof(uint32_t), "tail cluster assignments", err));
        KST_TRY(kst_realloc((void **)&T->pos, cap, sizeof(uint32_t), "tail cluster assignments", err));
        T->ncap = cap;
    }
    size_t nb = (cnt + TC_BLOCK - 1) / TC_BLOCK;
    int fail = 0;
    /* nearest centroid by <k, c> - |c|^2 / 2: one block of keys against every centroid at a time */
#pragma omp parallel if (cnt * T->C * d > 4000000)
    {
        float *x = kst_malloc(TC_BLOCK * d, sizeof(float), "tail cluster keys", NULL);
        float *s = kst_malloc(TC_BLOCK * T->C, sizeof(float), "tail cluster scores", NULL);
        if (!x || !s) __atomic_store_n(&fail, 1, __ATOMIC_RELAXED);
#pragma omp for schedule(dynamic)
        for (size_t b = 0; b < nb; b++) {
            if (!x || !s) continue;
            size_t i0 = lo + b * TC_BLOCK, nr = n - i0 < TC_BLOCK ? n - i0 : TC_BLOCK;
            kst_kv_rows_f32(x, K, f16, i0, nr, d);
            kst_kv_scores_multi(s, x, nr, T->cent, 0, T->C, d, 1.0f);
            for (size_t i = 0; i < nr; i++) {
                const float *si = s + i * T->C;
                size_t best = 0;
                float bv = -INFINITY;
                for (size_t c = 0; c < T->C; c++) {
                    float v = si[c] - T->hn2[c];
                    if (v > bv) {
                        bv = v;
                        best = c;
                    }
                }
                T->of[i0 + i] = (uint32_t)best;
            }
        }
        kst_free(x);
        kst_free(s);
    }
    if (fail) return kst_fail(err, KST_ERR_NOMEM, "out of memory assigning keys to tail clusters");
    for (size_t i = lo; i < n; i++) KST_TRY(tc_join(T, T->of[i], (uint32_t)i, err));
    T->na = n;
done:
    return rc;
}

int kst_kvtc_build(kst_kvtc *T, const void *K, int f16, size_t n, size_t d, size_t C, uint64_t seed,
                   kst_error *err) {
    kst_kvtc_free(T);
    if (C == 0 || n == 0) return KST_OK;
    if (C > n / TC_MIN) C = n / TC_MIN ? n / TC_MIN : 1;
    int rc = KST_OK;
    size_t ntr = C * TC_PER < n ? C * TC_PER : n;
    float *x = kst_malloc(ntr * d, sizeof(float), "tail cluster training keys", err);
    if (!x) return KST_ERR_NOMEM;
    for (size_t i = 0; i < ntr; i++) kst_kv_rows_f32(x + i * d, K, f16, i * n / ntr, 1, d);
    T->C = C;
    T->d = d;
    T->rng = seed ? seed : 0x9e3779b97f4a7c15ull;
    T->cent = kst_malloc(C * d, sizeof(float), "tail cluster centroids", err);
    T->cent_t = kst_malloc(C * d, sizeof(float), "tail cluster centroids", err);
    T->hn2 = kst_malloc(C, sizeof(float), "tail cluster centroids", err);
    T->mem = kst_calloc(C, sizeof *T->mem, "tail cluster members", err);
    T->len = kst_calloc(C, sizeof *T->len, "tail cluster members", err);
    T->mcap = kst_calloc(C, sizeof *T->mcap, "tail cluster members", err);
    if (!T->cent || !T->cent_t || !T->hn2 || !T->mem || !T->len || !T->mcap) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (C == 1) {
        for (size_t i = 0; i < d; i++) T->cent[i] = 0;
        for (size_t j = 0; j < ntr; j++)
            for (size_t i = 0; i < d; i++) T->cent[i] += x[j * d + i] / (float)ntr;
    } else if (kst_faiss_kmeans(d, ntr, C, x, TC_ITER, TC_PER, (int)(seed & 0x7fffffff), T->cent) != 0) {
        const char *m = faiss_get_last_error();
        rc = kst_fail(err, KST_ERR_INTERNAL, "tail clusters: k-means of %zu keys into %zu clusters failed: %s", ntr, C,
                      m ? m : "unknown error");
        goto done;
    }
    for (size_t c = 0; c < C; c++) {
        double s = 0;
        if (f16) /* (float16 values, as the keys: the GPU holds them so, and scores what the CPU does) */
            for (size_t i = 0; i < d; i++) T->cent[c * d + i] = kst_f16_to_f32(kst_f32_to_f16(T->cent[c * d + i]));
        for (size_t i = 0; i < d; i++) s += (double)T->cent[c * d + i] * T->cent[c * d + i];
        T->hn2[c] = (float)(s / 2);
        for (size_t i = 0; i < d; i++) T->cent_t[i * C + c] = T->cent[c * d + i];
    }
    rc = kst_kvtc_add(T, K, f16, n, err);
done:
    kst_free(x);
    if (rc != KST_OK) kst_kvtc_free(T);
    return rc;
}

/* S (G, C) = scale * <Q_g, centroid_c> from the transposed centroids ct (d, C): four rows of ct
 * per pass (16 KB at 1,024 clusters, kept in L1 for the G queries), so that ct (512 KB at 1,024
 * clusters of head dim 128) is streamed once for the G query heads of a KV head. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) static void tc_scores_avx2(float *S, const float *Q, size_t G, const float *ct,
                                                                size_t C, size_t d) {
    size_t i = 0;
    for (; i + 4 <= d; i += 4) {
        const float *r0 = ct + i * C, *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
        for (size_t g = 0; g < G; g++) {
            const float *q = Q + g * d;
            float a0 = q[i], a1 = q[i + 1], a2 = q[i + 2], a3 = q[i + 3], *s = S + g * C;
#pragma omp simd
            for (size_t j = 0; j < C; j++) s[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
        }
    }
    for (; i < d; i++)
        for (size_t g = 0; g < G; g++)
            for (size_t j = 0; j < C; j++) S[g * C + j] += Q[g * d + i] * ct[i * C + j];
}
#endif
void kst_kvtc_scores(const kst_kvtc *T, const float *Q, size_t G, float scale, float *S) {
    size_t C = T->C, d = T->d;
    memset(S, 0, G * C * sizeof(float));
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        tc_scores_avx2(S, Q, G, T->cent_t, C, d);
    } else
#endif
    {
        for (size_t i = 0; i < d; i++)
            for (size_t g = 0; g < G; g++)
                for (size_t j = 0; j < C; j++) S[g * C + j] += Q[g * d + i] * T->cent_t[i * C + j];
    }
    for (size_t j = 0; j < G * C; j++) S[j] *= scale;
}

/* The plan's water-filling and rounding (kst_kvtc_plan) of the budget over C clusters of rc[c]
 * keys each, cluster c weighted rc[c] exp(x[c]) (x: log weights; then the shares); w: scratch
 * of C floats. */
static size_t tc_fill_w(size_t C, const uint32_t *rc, float *x, float *w, size_t budget, uint32_t *ns, int wgiven);
static size_t tc_fill(size_t C, const uint32_t *rc, float *x, float *w, size_t budget, uint32_t *ns) {
    return tc_fill_w(C, rc, x, w, budget, ns, 0);
}
size_t kst_kvtc_fill(size_t C, const uint32_t *cap, float *w, float *sh, size_t budget, uint32_t *ns) {
    return tc_fill_w(C, cap, sh, w, budget, ns, 1);
}
/* (wgiven: w holds the weights already, x is only where the shares go) */
static size_t tc_fill_w(size_t C, const uint32_t *rc, float *x, float *w, size_t budget, uint32_t *ns, int wgiven) {
    size_t rest = 0;
    for (size_t c = 0; c < C; c++) rest += rc[c];
    size_t B = budget < rest ? budget : rest;
    memset(ns, 0, C * sizeof *ns);
    if (B == 0) return 0;
    /* x: the clusters' scores temp * scale * <q, centroid> while the budget is shared (then
     * their shares); w: r_c exp(x_c - mx), made once (again only where every open weight has
     * underflowed to 0 once the best clusters are taken whole: mx then the largest open score) */
    float mx = -INFINITY;
    if (wgiven) {
#pragma omp simd
        for (size_t c = 0; c < C; c++) w[c] = rc[c] && w[c] > 0 ? w[c] : 0;
    } else {
        for (size_t c = 0; c < C; c++)
            if (rc[c] && x[c] > mx) mx = x[c];
        memcpy(w, x, C * sizeof *w);
        kst_kv_exp_shift(w, C, mx);
        for (size_t c = 0; c < C; c++) w[c] = rc[c] ? w[c] * (float)rc[c] : 0;
    }
    /* water-filling: a cluster whose share reaches its keys is taken whole (ns = rc, w = 0), the
     * budget left shared again over the others (open: w > 0); one pass a round closes clusters
     * and sums the open ones' weights and the closed ones' keys for the next */
    double left = (double)B, W = 0;
#pragma omp simd reduction(+ : W)
    for (size_t c = 0; c < C; c++) W += w[c];
    for (;;) {
        if (!(W > 0) && wgiven) { /* (no scores to weigh the rest by: the budget left unplanned) */
            for (size_t c = 0; c < C; c++) x[c] = 0;
            break;
        }
        if (!(W > 0)) {
            mx = -INFINITY;
            for (size_t c = 0; c < C; c++)
                if (rc[c] && !ns[c] && x[c] > mx) mx = x[c];
            if (mx == -INFINITY) {
                for (size_t c = 0; c < C; c++) x[c] = 0;
                break;
            }
            memcpy(w, x, C * sizeof *w);
            kst_kv_exp_shift(w, C, mx);
            W = 0;
            for (size_t c = 0; c < C; c++) {
                w[c] = rc[c] && !ns[c] ? w[c] * (float)rc[c] : 0;
                W += w[c];
            }
        }
        double lw = left / W, Wn = 0;
        uint64_t took = 0;
        int closed = kst_kv_fill_round(C, rc, w, ns, (float)lw, &Wn, &took);
        if (!closed) {
#pragma omp simd
            for (size_t c = 0; c < C; c++) x[c] = (float)(lw * w[c]);
            break;
        }
        left -= (double)took;
        W = Wn;
        if (!(left > 0)) {
            for (size_t c = 0; c < C; c++) x[c] = 0;
            break;
        }
    }
    /* the open clusters' shares rounded by cumulative sums: floor(F_c + 1/2) - floor(F_(c-1) + 1/2)
     * (each within 1 of its share, below its keys, and the total exact) */
    size_t tot = 0;
#pragma omp simd reduction(+ : tot)
    for (size_t c = 0; c < C; c++) tot += ns[c];
    double F = 0.5;
    size_t prev = 0;
    for (size_t c = 0; c < C; c++) {
        if (!(x[c] > 0)) continue;
        F += x[c];
        size_t cur = (size_t)F;
        size_t a = cur - prev;
        if (a > rc[c]) a = rc[c];
        ns[c] = (uint32_t)a;
        tot += a;
        prev = cur;
    }
    /* float rounding may leave the total one off the budget: settled on the largest open cluster */
    while (tot < B) {
        size_t bc = C;
        for (size_t c = 0; c < C; c++)
            if (ns[c] < rc[c] && (bc == C || x[c] > x[bc])) bc = c;
        if (bc == C) break;
        ns[bc]++;
        tot++;
    }
    while (tot > B) {
        size_t bc = C;
        for (size_t c = 0; c < C; c++)
            if (ns[c] > 0 && ns[c] < rc[c] && (bc == C || x[c] > x[bc])) bc = c;
        if (bc == C) break;
        ns[bc]--;
        tot--;
    }
    return tot;
}

size_t kst_kvtc_plan(const kst_kvtc *T, const float *cs, float temp, const uint32_t *rid, size_t m, size_t budget,
                     uint32_t *ns, uint32_t *rc, float *sc) {
    size_t C = T->C;
    if (!C) return 0;
    for (size_t c = 0; c < C; c++) rc[c] = T->len[c];
    for (size_t i = 0; i < m; i++)
        if (rid[i] < T->na) rc[T->of[rid[i]]]--;
    for (size_t c = 0; c < C; c++) sc[C + c] = temp * cs[c];
    return tc_fill(C, rc, sc + C, sc, budget, ns);
}

size_t kst_kvtc_partial(const kst_kvtc *T, const float *q, const void *K, const void *V, int f16, size_t d,
                        float scale, size_t row0, const uint8_t *mark, const uint32_t *ns,
                        const uint32_t *rc, float tau, int cap, int64_t *rows, float *s, float *sc, float *o,
                        float *lse) {
    size_t n = 0;
    /* the samples, each with its cluster's log ratio (in s until scored) */
    for (size_t c = 0; c < T->C; c++) {
        if (!ns[c]) continue;
        float lr = logf((float)rc[c] / (float)ns[c]) / scale;
        const uint32_t *mem = T->mem[c];
        for (uint32_t i = 0, got = 0; i < T->len[c] && got < ns[c]; i++) {
            if (mark[mem[i]]) continue;
            rows[n] = (int64_t)(row0 + mem[i]);
            s[n++] = lr;
            got++;
        }
    }
    if (n == 0) {
        memset(o, 0, d * sizeof(float));
        *lse = -INFINITY;
        return 0;
    }
    /* Blocks of TC_PB samples: the block's key rows scored while its value rows and the next
     * block's key rows are fetched, then its weights and value rows summed (online: the running
     * sums rescaled where a block raises the maximum), so that key and value reads overlap. */
    const size_t rowb = d * (f16 ? 2 : 4);
    const char *Kb = K, *Vb = V;
    float mx = -INFINITY;
    double sum = 0;
    kst_kv_cap cp; /* (the samples above tau: the rest of their ratio rc / ns at tau's weight) */
    memset(o, 0, d * sizeof(float));
    kst_kv_cap_init(&cp, d);
    for (size_t j = 0; j < TC_PB && j < n; j++)
        for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Kb + (size_t)rows[j] * rowb + b);
    for (size_t j0 = 0; j0 < n; j0 += TC_PB) {
        size_t nb = n - j0 < TC_PB ? n - j0 : TC_PB;
        float bm = -INFINITY, *w = sc + j0;
        for (size_t j = j0; j < j0 + nb; j++) {
            for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Vb + (size_t)rows[j] * rowb + b);
            if (j + TC_PB < n)
                for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Kb + (size_t)rows[j + TC_PB] * rowb + b);
            float r = scale * kst_kv_dot(q, Kb + (size_t)rows[j] * rowb, f16, d);
            w[j - j0] = r > tau ? r : r + scale * s[j]; /* (above tau: itself once; with the cap, below) */
            if (cap && r > tau) {
                float r1 = expm1f(scale * s[j]);
                if (kst_kv_cap_take(&cp, r1)) kst_kv_axpy(cp.o, r1, Vb + (size_t)rows[j] * rowb, f16, d);
            }
            if (w[j - j0] > bm) bm = w[j - j0];
        }
        if (bm > mx) {
            if (mx > -INFINITY) {
                float r = expf(mx - bm);
                for (size_t i = 0; i < d; i++) o[i] *= r;
                sum *= r;
            }
            mx = bm;
        }
        kst_kv_exp_shift(w, nb, mx);
        for (size_t j = 0; j < nb; j++) {
            sum += w[j];
            kst_kv_axpy(o, w[j], Vb + (size_t)rows[j0 + j] * rowb, f16, d);
        }
    }
    float inv = (float)(1.0 / sum);
    for (size_t i = 0; i < d; i++) o[i] *= inv;
    *lse = mx + (float)log(sum);
    kst_kv_cap_merge(&cp, o, lse, tau, d);
    return n;
}

void kst_kvtc_group_free(kst_kvtc_group *A) {
    if (!A) return;
    kst_free(A->ns);
    kst_free(A->item);
    kst_free(A->pt);
    kst_free(A->x);
    memset(A, 0, sizeof *A);
}

int kst_kvtc_group_plan(const kst_kvtc *T, kst_kvtc_group *A, const float *cs, size_t G, float temp,
                        size_t budget, kst_error *err) {
    size_t C = T->C, d = T->d;
    int rc = KST_OK;
    A->ni = A->tot = A->nmax = A->pmax = 0;
    for (size_t p = 0; p <= KST_KVTC_PIECES; p++) A->pb[p] = 0;
    if (!C || !G) return KST_OK;
    if (A->C < C) {
        KST_TRY(kst_realloc((void **)&A->ns, C, sizeof(uint32_t), "shared tail plan", err));
        KST_TRY(kst_realloc((void **)&A->item, C, sizeof(uint32_t), "shared tail plan", err));
        KST_TRY(kst_realloc((void **)&A->x, 3 * C, sizeof(float), "shared tail plan", err));
        A->C = C;
    }
    if (A->gcap < G || A->dcap < d) {
        size_t Gm = A->gcap > G ? A->gcap : G, dm = A->dcap > d ? A->dcap : d;
        KST_TRY(kst_realloc((void **)&A->pt, KST_KVTC_PIECES * Gm, (dm + 2) * sizeof(double), "shared tail sums", err));
        A->gcap = Gm;
        A->dcap = dm;
    }
    A->G = G;
    A->d = d;
    /* x_c = log sum_g exp(a_gc), a_gc = temp cs_gc - L_g, L_g = log sum_c len_c exp(temp cs_gc):
     * the heads' normalized allocations averaged (the constant 1/G left out), summed in the
     * frame of the cluster's largest a_gc (lm_c), so that no weight underflows (the budget left
     * once the best clusters are taken whole still goes by score, as the per-head plan's does);
     * two vectorized exponential passes a head */
    float *x = A->x, *lm = x + C, *e = lm + C;
    for (size_t c = 0; c < C; c++) {
        x[c] = 0;
        lm[c] = -INFINITY;
    }
    float Ls[64];
    for (int pass = 0; pass < 2; pass++)
        for (size_t g = 0; g < G; g++) {
            const float *cg = cs + g * C;
            float L;
            if (pass == 1 && g < 64) {
                L = Ls[g];
            } else { /* L_g */
                float m = -INFINITY;
                for (size_t c = 0; c < C; c++) {
                    e[c] = temp * cg[c];
                    if (T->len[c] && e[c] > m) m = e[c];
                }
                if (m == -INFINITY) return KST_OK; /* (no keys: nothing planned) */
                kst_kv_exp_shift(e, C, m);
                double Z = 0;
                for (size_t c = 0; c < C; c++) Z += (double)T->len[c] * e[c];
                L = m + (float)log(Z);
                if (g < 64) Ls[g] = L;
            }
            if (pass == 0) {
                for (size_t c = 0; c < C; c++) {
                    float v = temp * cg[c] - L;
                    lm[c] = v > lm[c] ? v : lm[c];
                }
            } else {
                for (size_t c = 0; c < C; c++) e[c] = temp * cg[c] - L - lm[c];
                kst_kv_exp_shift(e, C, 0.0f);
#pragma omp simd
                for (size_t c = 0; c < C; c++) x[c] += e[c];
            }
        }
    for (size_t c = 0; c < C; c++) x[c] = x[c] > 0 ? lm[c] + logf(x[c]) : -INFINITY;
    A->tot = tc_fill(C, T->len, x, e, budget, A->ns);
    /* the items, and the pieces cut where the samples so far pass tot p / PIECES */
    size_t cum = 0, p = 1;
    A->pb[0] = 0;
    for (size_t c = 0; c < C; c++)
        if (A->ns[c]) {
            if (A->ns[c] > A->nmax) A->nmax = A->ns[c];
            A->item[A->ni++] = (uint32_t)c;
            cum += A->ns[c];
            while (p < KST_KVTC_PIECES && cum * KST_KVTC_PIECES >= A->tot * p) A->pb[p++] = A->ni;
        }
    while (p <= KST_KVTC_PIECES) A->pb[p++] = A->ni;
    for (p = 0; p < KST_KVTC_PIECES; p++) {
        size_t k = 0;
        for (size_t i = A->pb[p]; i < A->pb[p + 1]; i++) k += A->ns[A->item[i]];
        if (k > A->pmax) A->pmax = k;
    }
done:
    return rc;
}

/* The samples of items i0 .. i1 - 1 of A's plan (cluster c's first ns[c] members; where mark is
 * given, the marked ones left out) summed for the G queries Q, each weighted len_c / ns[c], as
 * kst_kvtc_partial sums one head's: their rows listed first (rows, lf: each one's log weight),
 * then streamed in blocks of TC_PB, each block's key rows scored for the G heads while its value
 * rows and the next block's key rows are fetched, the running sums (mx, sum, acc (G, d)) rescaled
 * where a block raises a head's maximum. w: scratch of G TC_PB floats. */
static void tc_stream(const kst_kvtc *T, const kst_kvtc_group *A, size_t i0, size_t i1, size_t G, const float *Q,
                      const char *Kb, const char *Vb, int f16, float scale, size_t row0, const uint8_t *mark,
                      int64_t *rows, float *lf, float *w, float *mx, double *sum, float *acc) {
    size_t d = T->d, n = 0;
    const size_t rowb = d * (f16 ? 2 : 4);
    for (size_t i = i0; i < i1; i++) {
        uint32_t c = A->item[i], k = A->ns[c];
        float l = logf((float)T->len[c] / (float)k);
        for (uint32_t j = 0; j < k; j++) {
            uint32_t x = T->mem[c][j];
            if (mark && mark[x]) continue;
            rows[n] = (int64_t)(row0 + x);
            lf[n++] = l;
        }
    }
    for (size_t j = 0; j < TC_PB && j < n; j++)
        for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Kb + (size_t)rows[j] * rowb + b);
    for (size_t j0 = 0; j0 < n; j0 += TC_PB) {
        size_t nb = n - j0 < TC_PB ? n - j0 : TC_PB;
        for (size_t j = j0; j < j0 + nb; j++) {
            for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Vb + (size_t)rows[j] * rowb + b);
            if (j + TC_PB < n)
                for (size_t b = 0; b < rowb; b += 64) __builtin_prefetch(Kb + (size_t)rows[j + TC_PB] * rowb + b);
            const char *kr = Kb + (size_t)rows[j] * rowb;
            for (size_t g = 0; g < G; g++) w[g * TC_PB + (j - j0)] = scale * kst_kv_dot(Q + g * d, kr, f16, d) + lf[j];
        }
        for (size_t g = 0; g < G; g++) {
            float *wg = w + g * TC_PB, bm = -INFINITY;
            for (size_t j = 0; j < nb; j++) bm = wg[j] > bm ? wg[j] : bm;
            if (bm > mx[g]) {
                if (mx[g] > -INFINITY) {
                    float r = expf(mx[g] - bm);
                    sum[g] *= r;
                    for (size_t k = 0; k < d; k++) acc[g * d + k] *= r;
                }
                mx[g] = bm;
            }
            kst_kv_exp_shift(wg, nb, mx[g]);
            double sg = 0;
            for (size_t j = 0; j < nb; j++) sg += wg[j];
            sum[g] += sg;
        }
        for (size_t j = j0; j < j0 + nb; j++) {
            const char *vr = Vb + (size_t)rows[j] * rowb;
            for (size_t g = 0; g < G; g++) {
                float wj = w[g * TC_PB + (j - j0)];
                if (wj > 0) kst_kv_axpy(acc + g * d, wj, vr, f16, d);
            }
        }
    }
}

void kst_kvtc_group_gather(const kst_kvtc *T, kst_kvtc_group *A, size_t p, const float *Q, const void *K,
                           const void *V, int f16, float scale, size_t row0, float *sc) {
    size_t G = A->G, d = A->d, i0 = A->pb[p], i1 = A->pb[p + 1];
    double *pt = A->pt + p * G * (d + 2);
    /* scratch: rows (pmax int64), lf (pmax), w (gm TC_PB), acc (gm d), gm = min(G, 64) */
    size_t gm = G < 64 ? G : 64;
    int64_t *rows = (int64_t *)(void *)sc;
    float *lf = sc + 2 * A->pmax, *w = lf + A->pmax, *acc = w + gm * TC_PB, mx[64];
    double sum[64];
    for (size_t g0 = 0; g0 < G; g0 += 64) { /* (64 heads a pass) */
        size_t Gp = G - g0 < 64 ? G - g0 : 64;
        for (size_t g = 0; g < Gp; g++) {
            mx[g] = -INFINITY;
            sum[g] = 0;
        }
        memset(acc, 0, Gp * d * sizeof(float));
        tc_stream(T, A, i0, i1, Gp, Q + g0 * d, K, V, f16, scale, row0, NULL, rows, lf, w, mx, sum, acc);
        for (size_t g = 0; g < Gp; g++) {
            double *h = pt + (g0 + g) * (d + 2);
            h[0] = mx[g];
            h[1] = sum[g];
            for (size_t k = 0; k < d; k++) h[2 + k] = acc[g * d + k];
        }
    }
}

size_t kst_kvtc_group_finish(const kst_kvtc *T, const kst_kvtc_group *A, size_t g, const float *q,
                             const void *K, const void *V, int f16, float scale, size_t row0,
                             const uint32_t *rid, size_t m, const uint8_t *mark, float *sc, float *o,
                             float *lse) {
    size_t G = A->G, d = A->d, out = 0;
    if (!T->C) {
        *lse = -INFINITY;
        return 0;
    }
    const size_t rowb = d * (f16 ? 2 : 4);
    const char *Kb = K, *Vb = V;
    double mx = -INFINITY, sum = 0, acc[512], s0;
    memset(acc, 0, d * sizeof(double));
    for (size_t p = 0; p < KST_KVTC_PIECES; p++) {
        const double *h = A->pt + (p * G + g) * (d + 2);
        if (!(h[1] > 0)) continue;
        if (h[0] > mx) {
            double r = mx == -INFINITY ? 0 : exp(mx - h[0]);
            sum *= r;
            for (size_t k = 0; k < d; k++) acc[k] *= r;
            mx = h[0];
        }
        double a = exp(h[0] - mx);
        sum += a * h[1];
        for (size_t k = 0; k < d; k++) acc[k] += a * h[2 + k];
    }
    s0 = sum;
    /* the sampled members of R taken out (their scores as the gather made them; their weighted
     * value rows summed in float, as the pieces were) */
    float *sub = sc;
    memset(sub, 0, d * sizeof(float));
    for (size_t i = 0; i < m && mx > -INFINITY; i++) {
        uint32_t x = rid[i];
        if (x >= T->na) continue;
        uint32_t c = T->of[x];
        if (T->pos[x] >= A->ns[c]) continue;
        out++;
        float w = expf(scale * kst_kv_dot(q, Kb + (row0 + x) * rowb, f16, d) +
                       logf((float)T->len[c] / (float)A->ns[c]) - (float)mx);
        sum -= w;
        kst_kv_axpy(sub, w, Vb + (row0 + x) * rowb, f16, d);
    }
    for (size_t k = 0; k < d; k++) acc[k] -= sub[k];
    if (out && !(sum > s0 * 1e-3)) { /* summed anew, R's members left out */
        mx = -INFINITY;
        sum = 0;
        memset(acc, 0, d * sizeof(double));
        int64_t *rows = (int64_t *)(void *)sc;
        float *lf = sc + 2 * A->tot, *w = lf + A->tot, *oi = w + TC_PB, mi = -INFINITY;
        double si = 0;
        memset(oi, 0, d * sizeof(float));
        tc_stream(T, A, 0, A->ni, 1, q, Kb, Vb, f16, scale, row0, mark, rows, lf, w, &mi, &si, oi);
        mx = mi;
        sum = si;
        for (size_t k = 0; k < d; k++) acc[k] = oi[k];
    }
    if (!(sum > 0)) {
        memset(o, 0, d * sizeof(float));
        *lse = -INFINITY;
        return A->tot - out;
    }
    for (size_t k = 0; k < d; k++) o[k] = (float)(acc[k] / sum);
    *lse = (float)(mx + log(sum));
    return A->tot - out;
}
