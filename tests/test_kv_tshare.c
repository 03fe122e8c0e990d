/* test_kv_tshare.c - the shared tail sample of a KV head (index/kv_tclust.h: kst_kvtc_group_plan,
 * kst_kvtc_group_gather, kst_kvtc_group_finish) against float64 references written here from its
 * definition (kv_tclust.h's header), never against the code's own earlier output:
 * - the clusters' orders: every node at its place (mem[of[x]][pos[x]] == x) after a build and
 *   after appends (finish reads pos to find the retrieved members of a sample);
 * - the plan: n_c within 1 of the water-filled share of min(B, n) in proportion to
 *   len_c (1/G) sum_g exp(temp cs_gc) / Z_g (float64, solved for its level directly, not by the
 *   code's rounds), clusters clearly past their keys taken whole, the items the planned
 *   clusters ascending, the 16 pieces cut by samples (pb: 0 .. ni, nondecreasing, the samples
 *   before piece p within nmax of tot p / 16); at queries x50 (test 1b) the same checks and G = 1
 *   against kst_kvtc_plan, apart (they fail: the group plan's float32 mixture weights underflow);
 * - gather + finish: head g's (o, lse) equal to the float64 Horvitz-Thompson estimator over the
 *   retrieved ids R (each planned cluster's first n_c members outside R, weighted len_c / n_c;
 *   no other term: a cluster whose sample R took whole contributes nothing), float32 and
 *   float16 rows, the 16 pieces gathered on two threads (or one, in reverse order) into sums
 *   poisoned before, R with whole samples, whole clusters and ids past the index;
 * - a retrieved sampled member holding all but f of the head's weighted sum: f 1e-7 .. 1e-12
 *   (under the 1e-6 at which finish sums the head anew from its samples outside R) asserted to
 *   the float64 estimator (f 1e-10 fails: the subtraction's rounding exceeds 1e-6 there);
 *   f 1e-1 .. 2e-6 (subtracted) measured and bounded by 8 eps32 |log weight| / f;
 * - a budget covering every key: exact attention over the keys outside R;
 * - over 400 random orders (8 k-means builds, 50 shuffles each), the mean of exp(lse) over the
 *   planned clusters' sum of exp(s) outside R is 1 within 5 standard errors, each trial the
 *   float64 estimator, and two wrong weights computed from the same samples (r_c / n_c,
 *   len_c / n'_c) are not;
 * - edges: G = 1 is kst_kvtc_plan's plan, budget 0, clusters not built, every key retrieved, one
 *   group reused over heads of other sizes, empty clusters.
 * Tolerances: o 1e-5 relative L2, lse 1e-5 absolute (float32 sums of at most a few thousand
 * terms; measured errors printed). */
#include <omp.h>

#include "harness.h"
#include "kv_ref.h"
#include "kv_tc_ref.h"

#include "core/half.h"
#include "core/ops.h"
#include "index/kv_tclust.h"

#define TOL_O 1e-5
#define TOL_LSE 1e-5

/* One KV head's rows: node i at row row0 + i of K, V ((row0 + n, d) float32; when f16 rounded to
 * float16, whose bits K16, V16 the code reads); lab (n) the centre each key was drawn around. */
typedef struct {
    size_t n, d, row0;
    int f16;
    float *K, *V;
    uint16_t *K16, *V16;
    uint32_t *lab;
} ts_rows;

/* Keys around ncent centres (cen (ncent, d) N(0, cs^2) a dimension): each key a uniformly chosen
 * centre + N(0, ks^2); values 1 + N(0, 1); the rows before row0 filled with noise (never read). */
static void rows_make(ts_rows *R, float *cen, size_t n, size_t d, size_t row0, int f16, size_t ncent, double cs,
                      double ks) {
    size_t N = (row0 + n) * d;
    R->n = n;
    R->d = d;
    R->row0 = row0;
    R->f16 = f16;
    R->K = malloc(N * sizeof *R->K);
    R->V = malloc(N * sizeof *R->V);
    R->K16 = f16 ? malloc(N * sizeof *R->K16) : NULL;
    R->V16 = f16 ? malloc(N * sizeof *R->V16) : NULL;
    R->lab = malloc(n * sizeof *R->lab);
    for (size_t i = 0; i < ncent * d; i++) cen[i] = (float)(cs * kv_gauss());
    for (size_t i = 0; i < row0 * d; i++) {
        R->K[i] = (float)(100 * kv_gauss());
        R->V[i] = (float)(100 * kv_gauss());
    }
    for (size_t t = 0; t < n; t++) {
        R->lab[t] = (uint32_t)tc_below(ncent);
        const float *c = cen + R->lab[t] * d;
        for (size_t i = 0; i < d; i++) R->K[(row0 + t) * d + i] = c[i] + (float)(ks * kv_gauss());
    }
    for (size_t i = row0 * d; i < N; i++) R->V[i] = (float)(1.0 + kv_gauss());
    if (f16)
        for (size_t i = 0; i < N; i++) {
            R->K16[i] = kst_f32_to_f16(R->K[i]);
            R->K[i] = kst_f16_to_f32(R->K16[i]);
            R->V16[i] = kst_f32_to_f16(R->V[i]);
            R->V[i] = kst_f16_to_f32(R->V16[i]);
        }
}

/* Node x's key set to k (rounded to float16 when the rows are). */
static void rows_set_key(ts_rows *R, size_t x, const float *k) {
    size_t at = (R->row0 + x) * R->d;
    for (size_t i = 0; i < R->d; i++) {
        R->K[at + i] = k[i];
        if (R->f16) {
            R->K16[at + i] = kst_f32_to_f16(k[i]);
            R->K[at + i] = kst_f16_to_f32(R->K16[at + i]);
        }
    }
}

/* The rows as the code reads them (row0 included) and the nodes' rows (node 0 first). */
static const void *rows_K(const ts_rows *R) { return R->f16 ? (const void *)R->K16 : (const void *)R->K; }
static const void *rows_V(const ts_rows *R) { return R->f16 ? (const void *)R->V16 : (const void *)R->V; }
static const void *rows_K0(const ts_rows *R) {
    return R->f16 ? (const void *)(R->K16 + R->row0 * R->d) : (const void *)(R->K + R->row0 * R->d);
}

static void rows_free(ts_rows *R) {
    free(R->K);
    free(R->V);
    free(R->K16);
    free(R->V16);
    free(R->lab);
}

static void build(kst_kvtc *T, const ts_rows *R, size_t C, uint64_t seed) {
    kst_error err;
    assert_ok(kst_kvtc_build(T, rows_K0(R), R->f16, R->n, R->d, C, seed, &err), &err);
}

/* G queries (G, d): head g a * (a random centre + N(0, 0.3^2)), a from amp (or {0.5, 1, 2}
 * drawn when amp is 0). */
static void make_queries(float *Q, const float *cen, size_t G, size_t d, size_t ncent, double amp) {
    static const double amps[3] = {0.5, 1.0, 2.0};
    for (size_t g = 0; g < G; g++) {
        const float *c = cen + tc_below(ncent) * d;
        double a = amp > 0 ? amp : amps[tc_below(3)];
        for (size_t i = 0; i < d; i++) Q[g * d + i] = (float)(a * (c[i] + 0.3 * kv_gauss()));
    }
}

/* scale * <q, node x's key> in float64. */
static double score64(const ts_rows *R, const float *q, size_t x, double scale) {
    const float *k = R->K + (R->row0 + x) * R->d;
    double a = 0;
    for (size_t i = 0; i < R->d; i++) a += (double)q[i] * k[i];
    return a * scale;
}

/* ---------------------------------------------------------------------------------------------
 * float64 references */

/* The shared plan's shares (kv_tclust.h) in float64: cluster c weighted
 * w_c = len_c (1/G) sum_g exp(temp cs_gc) / Z_g, Z_g = sum_c len_c exp(temp cs_gc) (cs: the
 * float scores the code is given), B = min(budget, n) water-filled: x_c = min(len_c, lambda w_c)
 * with sum x_c = B. Solved for lambda directly: a cluster is whole once log lambda reaches
 * t_c = log(len_c / w_c), so with the clusters sorted by t_c the level is the first k whole whose
 * log lambda (the rest of B over the open weights) stays below the next t. lm (C): log of
 * lambda w_c / len_c (>= 0: whole; its margin either way). Returns B. */
static size_t gplan_ref64(double *x, double *lm, const kst_kvtc *T, const float *cs, size_t G, double temp,
                          size_t budget) {
    size_t C = T->C, n = 0, K = 0;
    double *lw = malloc(C * sizeof *lw), *t = malloc(C * sizeof *t), *L = malloc(G * sizeof *L);
    size_t *ord = malloc(C * sizeof *ord);
    for (size_t c = 0; c < C; c++) n += T->len[c];
    for (size_t g = 0; g < G; g++) { /* L_g = log Z_g */
        double m = -INFINITY, z = 0;
        for (size_t c = 0; c < C; c++)
            if (T->len[c] && temp * cs[g * C + c] > m) m = temp * cs[g * C + c];
        for (size_t c = 0; c < C; c++)
            if (T->len[c]) z += T->len[c] * exp(temp * cs[g * C + c] - m);
        L[g] = m + log(z);
    }
    for (size_t c = 0; c < C; c++) { /* lw_c = log w_c */
        x[c] = 0;
        lm[c] = -INFINITY;
        if (!T->len[c]) continue;
        double m = -INFINITY, z = 0;
        for (size_t g = 0; g < G; g++) m = fmax(m, temp * cs[g * C + c] - L[g]);
        for (size_t g = 0; g < G; g++) z += exp(temp * cs[g * C + c] - L[g] - m);
        lw[c] = log((double)T->len[c]) + m + log(z / (double)G);
        t[c] = log((double)T->len[c]) - lw[c];
        /* insertion by t */
        size_t j = K++;
        while (j > 0 && t[ord[j - 1]] > t[c]) {
            ord[j] = ord[j - 1];
            j--;
        }
        ord[j] = c;
    }
    size_t B = budget < n ? budget : n;
    if (B == n) {
        for (size_t c = 0; c < C; c++) x[c] = T->len[c], lm[c] = T->len[c] ? INFINITY : -INFINITY;
    } else if (B > 0) {
        double whole = 0, ll = 0;
        size_t k = 0;
        for (; k < K; k++) { /* k clusters (the k smallest t) whole */
            double m = -INFINITY, z = 0;
            for (size_t j = k; j < K; j++) m = fmax(m, lw[ord[j]]);
            for (size_t j = k; j < K; j++) z += exp(lw[ord[j]] - m);
            ll = log((double)B - whole) - log(z) - m;
            if (ll < t[ord[k]]) break;
            whole += T->len[ord[k]];
        }
        if (k == K) fail_msg("plan reference: every cluster whole below the keys (B %zu of %zu)", B, n);
        for (size_t j = 0; j < K; j++) {
            size_t c = ord[j];
            lm[c] = ll - t[c];
            x[c] = j < k ? (double)T->len[c] : exp(ll + lw[c]);
        }
    }
    free(lw);
    free(t);
    free(L);
    free(ord);
    return B;
}

/* Head g's estimate (kv_tclust.h, kst_kvtc_group_finish) in float64, Horvitz-Thompson, from the
 * plan ns: each member x in the first ns[c] places of a cluster c (ns[c] > 0) that is outside R
 * (mark) weighted len_c / ns[c]; lse = log sum w exp(s), o = sum w exp(s) v / sum w exp(s) (o 0
 * and lse -inf when no such member). Nothing else: a cluster whose sample R took whole, or that
 * the plan left out, contributes nothing. wt (may be 0): the weight len_c / ns[c] replaced by
 * wt(len_c, r_c, ns[c], n'_c) (r_c: its keys outside R, n'_c: its samples outside R; test 4's
 * wrong weights). *frac (may be NULL): the weighted sum left over that of the whole sample (R's
 * members in; the code sums the head anew from its samples under 1e-6; 0 with no sample).
 * Returns the sampled members outside R. */
typedef double (*ts_weight)(size_t len, size_t r, size_t ns, size_t np);
static size_t finish_ref64w(double *o, double *lse, double *frac, const kst_kvtc *T, const uint32_t *ns,
                            const ts_rows *R, const float *q, double scale, const uint8_t *mark, ts_weight wt) {
    size_t d = R->d, used = 0;
    double mx = -INFINITY, all = 0, sum = 0, *lw = malloc((T->C ? T->C : 1) * sizeof *lw);
    for (size_t i = 0; i < d; i++) o[i] = 0;
    for (size_t c = 0; c < T->C; c++) { /* the log weights, and the largest log term of the whole sample */
        lw[c] = -INFINITY;
        if (!ns[c]) continue;
        if (ns[c] > T->len[c]) fail_msg("finish reference: cluster %zu has %u samples of %u keys", c, ns[c], T->len[c]);
        size_t r = 0, np = 0;
        for (uint32_t j = 0; j < T->len[c]; j++) r += !mark[T->mem[c][j]], np += j < ns[c] && !mark[T->mem[c][j]];
        double w = wt ? wt(T->len[c], r, ns[c], np) : (double)T->len[c] / (double)ns[c];
        lw[c] = w > 0 ? log(w) : -INFINITY;
        for (uint32_t j = 0; j < ns[c]; j++) mx = fmax(mx, score64(R, q, T->mem[c][j], scale) + lw[c]);
    }
    for (size_t c = 0; c < T->C; c++)
        for (uint32_t j = 0; j < ns[c]; j++) {
            uint32_t x = T->mem[c][j];
            double e = exp(score64(R, q, x, scale) + lw[c] - mx);
            all += e;
            if (mark[x]) continue;
            used++;
            sum += e;
            const float *v = R->V + (R->row0 + x) * d;
            for (size_t i = 0; i < d; i++) o[i] += e * v[i];
        }
    free(lw);
    if (frac) *frac = all > 0 ? sum / all : 0;
    if (!(sum > 0)) {
        for (size_t i = 0; i < d; i++) o[i] = 0;
        *lse = -INFINITY;
        return used;
    }
    for (size_t i = 0; i < d; i++) o[i] /= sum;
    *lse = mx + log(sum);
    return used;
}
static size_t finish_ref64(double *o, double *lse, double *frac, const kst_kvtc *T, const uint32_t *ns,
                           const ts_rows *R, const float *q, double scale, const uint8_t *mark) {
    return finish_ref64w(o, lse, frac, T, ns, R, q, scale, mark, NULL);
}

/* Exact attention of q over the nodes outside R (mark): o, lse in float64; returns their count. */
static size_t exact_ref64(double *o, double *lse, const ts_rows *R, const float *q, double scale, const uint8_t *mark) {
    size_t n = R->n, d = R->d, cnt = 0;
    double *s = malloc(n * sizeof *s), mx = -INFINITY, sum = 0;
    for (size_t x = 0; x < n; x++) {
        s[x] = score64(R, q, x, scale);
        if (!mark[x]) mx = fmax(mx, s[x]);
    }
    for (size_t i = 0; i < d; i++) o[i] = 0;
    for (size_t x = 0; x < n; x++) {
        if (mark[x]) continue;
        double e = exp(s[x] - mx);
        sum += e;
        cnt++;
        for (size_t i = 0; i < d; i++) o[i] += e * R->V[(R->row0 + x) * d + i];
    }
    free(s);
    if (!cnt) {
        *lse = -INFINITY;
        return 0;
    }
    for (size_t i = 0; i < d; i++) o[i] /= sum;
    *lse = mx + log(sum);
    return cnt;
}

/* ---------------------------------------------------------------------------------------------
 * calling the code */

/* Plans A for the G queries Q (kst_kvtc_scores into cs (G, C), kept for the caller). */
static size_t plan(const kst_kvtc *T, kst_kvtc_group *A, const float *Q, size_t G, float scale, float temp,
                   size_t budget, float *cs) {
    kst_error err;
    kst_kvtc_scores(T, Q, G, scale, cs);
    assert_ok(kst_kvtc_group_plan(T, A, cs, G, temp, budget, &err), &err);
    return A->tot;
}

/* A's piece sums (16 pieces x G heads x (d + 2)) set to NaN before a gather: a piece left
 * unwritten, or a head's sums written into another's, then shows in finish's output. */
static void poison(kst_kvtc_group *A) {
    if (!A->pt) return;
    size_t nv = KST_KVTC_PIECES * A->G * (A->d + 2);
    for (size_t i = 0; i < nv; i++) A->pt[i] = NAN;
}

/* The gather's scratch: exactly KST_KVTC_GATHER_SC(A) floats (kv_tclust.h), stale (0x7f
 * bytes), its own allocation (ASan sees an overrun). */
static float *gather_scratch(const kst_kvtc_group *A) {
    size_t sz = KST_KVTC_GATHER_SC(A);
    float *sc = malloc(sz ? sz * sizeof(float) : 1);
    memset(sc, 0x7f, sz * sizeof(float));
    return sc;
}

/* Gathers A's 16 pieces on two threads (thread t pieces t, t + 2, ...), each with its own scratch. */
static void gather2(const kst_kvtc *T, kst_kvtc_group *A, const float *Q, const ts_rows *R, float scale) {
    float *sc[2] = {gather_scratch(A), gather_scratch(A)};
    poison(A);
#pragma omp parallel num_threads(2)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (size_t p = (size_t)t; p < KST_KVTC_PIECES; p += (size_t)nt)
            kst_kvtc_group_gather(T, A, p, Q, rows_K(R), rows_V(R), R->f16, scale, R->row0, sc[t]);
    }
    free(sc[0]);
    free(sc[1]);
}

/* Gathers A's 16 pieces on this thread, the last first, one scratch. */
static void gather1(const kst_kvtc *T, kst_kvtc_group *A, const float *Q, const ts_rows *R, float scale) {
    float *sc = gather_scratch(A);
    poison(A);
    for (size_t p = KST_KVTC_PIECES; p-- > 0;)
        kst_kvtc_group_gather(T, A, p, Q, rows_K(R), rows_V(R), R->f16, scale, R->row0, sc);
    free(sc);
}

/* Head g's finish (o (d), *lse; returns its count) with scratch of exactly KST_KVTC_FINISH_SC(A)
 * floats (kv_tclust.h; stale, its own allocation). */
static size_t finish(const kst_kvtc *T, const kst_kvtc_group *A, size_t g, const float *q, const ts_rows *R,
                     float scale, const uint32_t *rid, size_t m, const uint8_t *mark, float *o, float *lse) {
    size_t sz = KST_KVTC_FINISH_SC(A);
    float *sc = malloc(sz * sizeof *sc);
    memset(sc, 0x7f, sz * sizeof *sc);
    size_t got = kst_kvtc_group_finish(T, A, g, q, rows_K(R), rows_V(R), R->f16, scale, R->row0, rid, m, mark, sc, o,
                                       lse);
    free(sc);
    return got;
}

/* (o, lse, count) against a float64 reference; returns o's relative L2 error. The reference's
 * lse -inf: o all 0 and lse -inf. */
static double check_out(const char *what, const float *o, float lse, size_t got, const double *ro, double rlse,
                        size_t rgot, size_t d, double *lse_err) {
    if (got != rgot) fail_msg("%s: %zu samples stood for the rest, the reference's %zu", what, got, rgot);
    if (rlse == -INFINITY) {
        if (lse != -INFINITY) fail_msg("%s: lse %.7g where nothing is left (-inf)", what, lse);
        for (size_t i = 0; i < d; i++)
            if (o[i] != 0) fail_msg("%s: o[%zu] = %.7g where nothing is left (0)", what, i, o[i]);
        return 0;
    }
    double e = rel_err64(o, ro, d), le = fabs(lse - rlse);
    if (!(e < TOL_O)) fail_msg("%s: o's relative L2 error %.3g (tolerance %.0e)", what, e, TOL_O);
    if (!(le < TOL_LSE)) fail_msg("%s: lse %.9g, float64 %.9g (error %.3g)", what, lse, rlse, le);
    if (lse_err && le > *lse_err) *lse_err = le;
    return e;
}

/* rid (m ids, shuffled) and mark (>= n bytes) from a list of nodes (duplicates dropped). */
static size_t add_id(uint32_t *rid, size_t m, uint8_t *mark, uint32_t x) {
    if (mark[x]) return m;
    mark[x] = 1;
    rid[m] = x;
    return m + 1;
}
static void shuffle_ids(uint32_t *rid, size_t m) {
    for (size_t i = m; i > 1; i--) {
        size_t j = tc_below(i);
        uint32_t t = rid[i - 1];
        rid[i - 1] = rid[j];
        rid[j] = t;
    }
}

/* ---------------------------------------------------------------------------------------------
 * tests */

/* Every node at its place: the member lists a partition of the na nodes, of[] each list's
 * cluster, mem[of[x]][pos[x]] == x. */
static void check_places(const kst_kvtc *T, const char *what) {
    uint8_t *seen = calloc(T->na ? T->na : 1, 1);
    size_t tot = 0;
    for (size_t c = 0; c < T->C; c++)
        for (uint32_t j = 0; j < T->len[c]; j++, tot++) {
            uint32_t x = T->mem[c][j];
            if (x >= T->na) fail_msg("%s: cluster %zu holds node %u of %zu", what, c, x, T->na);
            if (seen[x]) fail_msg("%s: node %u listed twice", what, x);
            seen[x] = 1;
            if (T->of[x] != c) fail_msg("%s: node %u in cluster %zu's list, of[] says %u", what, x, c, T->of[x]);
            if (T->pos[x] != j) fail_msg("%s: node %u at place %u of cluster %zu, pos[] says %u", what, x, j, c, T->pos[x]);
        }
    if (tot != T->na) fail_msg("%s: the lists hold %zu nodes of %zu", what, tot, T->na);
    free(seen);
}

/* 0. The places finish relies on (pos): after builds of 4,000 keys (float32, float16; 64 and 1
 * clusters) and after 300 appends one at a time and 500 at once. */
static void test_places(void **state) {
    (void)state;
    tc_seed(10);
    const size_t n = 4800, d = 32, ncent = 24;
    float *cen = malloc(ncent * d * sizeof *cen);
    for (int f16 = 0; f16 < 2; f16++) {
        ts_rows R;
        rows_make(&R, cen, n, d, 0, f16, ncent, 1.0, 0.5);
        for (size_t C = 64; C >= 1; C = C == 64 ? 1 : 0) {
            kst_kvtc T = {0};
            kst_error err;
            assert_ok(kst_kvtc_build(&T, rows_K0(&R), f16, 4000, d, C, 3 + C, &err), &err);
            assert_int_equal(T.C, C);
            check_places(&T, "after the build");
            for (size_t i = 4001; i <= 4300; i++) assert_ok(kst_kvtc_add(&T, rows_K0(&R), f16, i, &err), &err);
            check_places(&T, "after 300 appends");
            assert_ok(kst_kvtc_add(&T, rows_K0(&R), f16, n, &err), &err);
            assert_int_equal(T.na, n);
            check_places(&T, "after 500 appended at once");
            kst_kvtc_free(&T);
        }
        rows_free(&R);
    }
    free(cen);
}

/* The pieces of a plan (kv_tclust.h): pb[0] = 0, pb[16] = ni, nondecreasing; the samples of
 * items 0 .. pb[p] - 1 within nmax of tot p / 16 (a piece cut where the samples pass it, a
 * cluster not split). */
static void check_pieces(const kst_kvtc_group *A, const char *what) {
    if (A->pb[0] != 0) fail_msg("%s: pb[0] = %zu", what, A->pb[0]);
    if (A->pb[KST_KVTC_PIECES] != A->ni) fail_msg("%s: pb[%d] = %zu, %zu items", what, KST_KVTC_PIECES, A->pb[KST_KVTC_PIECES], A->ni);
    size_t cum = 0, i = 0;
    for (size_t p = 0; p <= KST_KVTC_PIECES; p++) {
        if (p && A->pb[p] < A->pb[p - 1]) fail_msg("%s: pb[%zu] = %zu below pb[%zu] = %zu", what, p, A->pb[p], p - 1, A->pb[p - 1]);
        for (; i < A->pb[p]; i++) cum += A->ns[A->item[i]];
        double off = fabs((double)cum - (double)A->tot * (double)p / KST_KVTC_PIECES);
        if (!(off <= (double)A->nmax))
            fail_msg("%s: %zu samples before piece %zu, tot %zu x %zu / %d: off by %.2f (nmax %zu)", what, cum, p, A->tot, p,
                     KST_KVTC_PIECES, off, A->nmax);
    }
    if (cum != A->tot) fail_msg("%s: the items hold %zu samples, tot %zu", what, cum, A->tot);
}

/* 1. The plan against its definition (gplan_ref64): 4,000 keys (d 64) in 64 clusters, G = 3
 * query heads (and 1, 2, 4 on the same group, which then grows), queries scaled 0.3 .. 50 (at 50
 * the float32 weights of all but the best clusters underflow), temp 0 .. 2, budgets 1 .. past
 * the keys: n_c within 1 of its float64 share (1e-4 relative slack for the float32 weights),
 * n_c <= len_c, sum = min(B, n) = tot, clusters 1e-4 past their keys (log margin) taken whole,
 * each head's 1/G of its own proportional share kept (within 1), item = the planned clusters
 * ascending, ni, nmax, the pieces (check_pieces). */
static void plan_definition(int sharp) {
    tc_seed(1);
    const size_t n = 4000, d = 64, C = 64, ncent = 40;
    float *cen = malloc(ncent * d * sizeof *cen), Q[4 * 64], *cs = malloc(4 * C * sizeof *cs);
    ts_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent, 1.0, 0.5);
    kst_kvtc T = {0};
    build(&T, &R, C, 11);
    assert_int_equal(T.C, C);
    assert_int_equal(T.na, n);
    const float scale = (float)(1.0 / sqrt((double)d));
    static const double amps[4] = {0.3, 1.0, 3.0, 50.0};
    static const float temps[5] = {0.0f, 0.5f, 0.7f, 1.0f, 2.0f};
    static const size_t Gs[4] = {3, 1, 4, 2};
    const size_t budgets[8] = {1, 37, 256, 600, 2048, n - 1, n, n + 500};
    double x[64], lm[64], maxoff = 0;
    size_t checks = 0, whole = 0, open = 0, edge = 0;
    kst_kvtc_group A = {0};
    for (size_t trial = 0; trial < 32; trial++) {
        size_t G = trial < 16 ? 3 : Gs[trial % 4];
        double a = amps[trial % 4];
        make_queries(Q, cen, G, d, ncent, a);
        if ((a == 50.0) != sharp) continue; /* (the x50 trials: test_plan_sharp) */
        for (size_t bi = 0; bi < 8; bi++) {
            size_t B = budgets[bi];
            float temp = temps[(trial + bi) % 5];
            size_t tot = plan(&T, &A, Q, G, scale, temp, B, cs);
            size_t want = gplan_ref64(x, lm, &T, cs, G, temp, B), sum = 0, ni = 0, nmax = 0;
            assert_int_equal(A.G, G);
            for (size_t c = 0; c < C; c++) {
                uint32_t ns = A.ns[c];
                if (ns > T.len[c]) fail_msg("trial %zu: cluster %zu gets %u samples of its %u keys", trial, c, ns, T.len[c]);
                double off = fabs((double)ns - x[c]);
                if (!(off <= 1 + 1e-4 * x[c] + 1e-6))
                    fail_msg("trial %zu (G %zu, x%.1f, temp %.1f, budget %zu): cluster %zu (%u keys) gets %u samples, "
                             "its float64 share %.4f",
                             trial, G, a, temp, B, c, T.len[c], ns, x[c]);
                if (lm[c] > 1e-4 && ns != T.len[c])
                    fail_msg("trial %zu (G %zu, temp %.1f, budget %zu): cluster %zu's share is past its %u keys "
                             "(log margin %.3g) but it gets %u samples",
                             trial, G, temp, B, c, T.len[c], lm[c], ns);
                if (lm[c] >= 0) whole++;
                else if (x[c] > 0) open++;
                if (fabs(lm[c]) <= 1e-4) edge++;
                maxoff = off > maxoff ? off : maxoff;
                sum += ns;
                /* the items: the planned clusters, ascending */
                if (ns) {
                    if (ni >= A.ni || A.item[ni] != c) fail_msg("trial %zu: item %zu is not cluster %zu", trial, ni, c);
                    ni++;
                    nmax = ns > nmax ? ns : nmax;
                }
            }
            /* the header's promise: each head at least 1/G of its own proportional share,
             * min(len_c, B len_c p_gc / G), p_gc = exp(temp cs_gc) / Z_g (the level only rises
             * above B where clusters are taken whole) */
            for (size_t g = 0; g < G; g++) {
                double mz = -INFINITY, z = 0;
                for (size_t c = 0; c < C; c++)
                    if (T.len[c]) mz = fmax(mz, (double)temp * cs[g * C + c]);
                for (size_t c = 0; c < C; c++)
                    if (T.len[c]) z += T.len[c] * exp((double)temp * cs[g * C + c] - mz);
                for (size_t c = 0; c < C; c++) {
                    double own = (double)want * T.len[c] * exp((double)temp * cs[g * C + c] - mz) / z / (double)G;
                    own = fmin(own, (double)T.len[c]);
                    if (!(A.ns[c] + 1 + 1e-4 * own >= own))
                        fail_msg("trial %zu (G %zu, temp %.1f, budget %zu): cluster %zu gets %u samples, under 1/G of "
                                 "head %zu's own share (%.3f)", trial, G, temp, B, c, A.ns[c], g, own);
                }
            }
            if (sum != want || tot != want || A.tot != want)
                fail_msg("trial %zu (budget %zu): %zu samples (tot %zu), expected min(%zu, %zu) = %zu", trial, B, sum, tot, B,
                         n, want);
            assert_int_equal(A.ni, ni);
            assert_int_equal(A.nmax, nmax);
            check_pieces(&A, "plan");
            checks++;
        }
    }
    print_message("plan%s: %zu plans, largest |n_c - share| %.3f, %zu clusters whole, %zu open, %zu within 1e-4 of "
                  "whole\n", sharp ? " (x50)" : "", checks, maxoff, whole, open, edge);
    if (!whole || !open) fail_msg("the plans did not both take clusters whole and share them");
    kst_kvtc_group_free(&A);
    kst_kvtc_group_free(&A); /* twice: freed state */
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(cs);
}

static void test_plan_definition(void **state) {
    (void)state;
    plan_definition(0);
}

/* G = 1 plans against kst_kvtc_plan with nothing retrieved (the same ns): 20 queries (one head,
 * d 64, 64 clusters of T) scaled 0.3, 1, 3 and 50 in turn, temps 0 .. 2, budgets 1 .. past the
 * keys; sharp: only the x50 queries checked, else only the others (the queries all drawn, so
 * that either draws the same). Returns the clusters whose samples differ (sharp: counted; else
 * the first fails). */
static size_t g1_plans(const kst_kvtc *T, const float *cen, size_t ncent, float scale, int sharp, size_t *plans) {
    size_t C = T->C, d = T->d, n = T->na, diff = 0;
    float Q[64], *cs = malloc(C * sizeof *cs), *sc1 = malloc(2 * C * sizeof *sc1);
    uint32_t *ns1 = malloc(C * sizeof *ns1), *rc1 = malloc(C * sizeof *rc1);
    kst_kvtc_group A = {0};
    static const float temps[5] = {0.0f, 0.5f, 0.7f, 1.0f, 2.0f};
    static const double amps[4] = {0.3, 1.0, 3.0, 50.0};
    const size_t budgets[6] = {1, 37, 256, 600, n - 1, n + 10};
    for (size_t trial = 0; trial < 20; trial++) {
        make_queries(Q, cen, 1, d, ncent, amps[trial % 4]);
        if ((amps[trial % 4] == 50.0) != sharp) continue;
        for (size_t bi = 0; bi < 6; bi++) {
            float temp = temps[(trial + bi) % 5];
            size_t tot = plan(T, &A, Q, 1, scale, temp, budgets[bi], cs);
            size_t tot1 = kst_kvtc_plan(T, cs, temp, NULL, 0, budgets[bi], ns1, rc1, sc1);
            assert_int_equal(tot, tot1);
            check_pieces(&A, "G = 1");
            for (size_t c = 0; c < C; c++) {
                if (A.ns[c] != ns1[c] && !sharp)
                    fail_msg("G = 1 (trial %zu, x%.1f, temp %.1f, budget %zu): cluster %zu gets %u samples, kst_kvtc_plan %u",
                             trial, amps[trial % 4], temp, budgets[bi], c, A.ns[c], ns1[c]);
                if (A.ns[c] != ns1[c] && diff < 3)
                    print_message("G = 1 (trial %zu, x%.1f, temp %.1f, budget %zu): cluster %zu gets %u samples, "
                                  "kst_kvtc_plan %u\n", trial, amps[trial % 4], temp, budgets[bi], c, A.ns[c], ns1[c]);
                diff += A.ns[c] != ns1[c];
            }
            ++*plans;
        }
    }
    kst_kvtc_group_free(&A);
    free(cs);
    free(sc1);
    free(ns1);
    free(rc1);
    return diff;
}

/* 1b. The plan at queries x50 (where float32's exp of all but the best clusters' scores
 * underflows): G = 1 against kst_kvtc_plan (g1_plans, test 5's data), then the definition
 * (test 1's checks on its x50 trials). Fails where the group plan's mixture weights underflow
 * to -inf (kv_tclust.c, kst_kvtc_group_plan: x_c = log sum_g e_gc / Z_g in float): once the
 * best clusters are taken whole the budget left goes to the other clusters in index order
 * (tc_fill's settling loop over x = 0), not by score as kst_kvtc_plan and the definition share
 * it. */
static void test_plan_sharp(void **state) {
    (void)state;
    tc_seed(5);
    const size_t n = 4000, d = 64, C = 64, ncent = 40;
    float *cen = malloc(ncent * d * sizeof *cen);
    ts_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent, 1.0, 0.5);
    kst_kvtc T = {0};
    build(&T, &R, C, 51);
    size_t plans = 0, diff = g1_plans(&T, cen, ncent, (float)(1.0 / sqrt((double)d)), 1, &plans);
    print_message("x50, G = 1: %zu plans, %zu clusters' samples differ from kst_kvtc_plan's\n", plans, diff);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    plan_definition(1);
    if (diff) fail_msg("x50, G = 1: %zu clusters' samples differ from kst_kvtc_plan's", diff);
}

/* 2. Gather + finish equal the float64 estimator of each of G = 3 heads (finish_ref64): 4,000
 * keys (d 64, rows from row 7 on) in 64 clusters, budget 600, temp 0.7; float32 and float16
 * rows; the pieces gathered on two threads (step 0) or one, the last first (step 1), into
 * poisoned sums. Two steps each:
 * (a) R: 150 random ids; the whole sample of the cluster head 1's centroid scores best (short of
 *     the cluster: that cluster then contributes nothing, though it holds keys outside R); every
 *     member of head 2's best; the first member of head 0's best cluster's sample; two ids past
 *     the index;
 * (b) other queries, 150 random ids.
 * (A retrieved member that holds nearly all of a head's sum, once part of (a): test 2b.) */
static void test_gather_finish(void **state) {
    (void)state;
    const size_t n = 4000, d = 64, C = 64, G = 3, ncent = 40, B = 600, row0 = 7;
    const float scale = (float)(1.0 / sqrt((double)d)), temp = 0.7f;
    float *cen = malloc(ncent * d * sizeof *cen), Q[3 * 64], *cs = malloc(G * C * sizeof *cs), o[64], lse;
    uint32_t *rid = malloc((n + 8) * sizeof *rid);
    uint8_t *mark = malloc(n);
    double ro[64], rlse, emax = 0, lmax = 0, fmin = 1, fsub = 1;
    size_t anew = 0, steps = 0, whole = 0, in_all = 0;
    for (int f16 = 0; f16 < 2; f16++) {
        tc_seed(2);
        ts_rows R;
        rows_make(&R, cen, n, d, row0, f16, ncent, 1.0, 0.5);
        kst_kvtc T = {0};
        build(&T, &R, C, 21);
        kst_kvtc_group A = {0};
        for (int step = 0; step < 2; step++) {
            make_queries(Q, cen, G, d, ncent, 0);
            size_t tot = plan(&T, &A, Q, G, scale, temp, B, cs);
            assert_int_equal(tot, B);
            check_pieces(&A, "gather + finish");
            memset(mark, 0, n);
            size_t m = 0, c1 = C, c2 = C, c3 = C;
            if (step == 0) {
                /* c1: a sample of 2+ whose first member is retrieved; c2: a sample short of its
                 * cluster, retrieved whole; c3: a planned cluster retrieved whole */
                for (size_t c = 0; c < C; c++) /* each where its head's centroid scores best */
                    if (A.ns[c] >= 2 && A.ns[c] < T.len[c] && (c1 == C || cs[c] > cs[c1])) c1 = c;
                for (size_t c = 0; c < C; c++)
                    if (c != c1 && A.ns[c] && A.ns[c] < T.len[c] && (c2 == C || cs[C + c] > cs[C + c2])) c2 = c;
                for (size_t c = 0; c < C; c++)
                    if (c != c1 && c != c2 && A.ns[c] && (c3 == C || cs[2 * C + c] > cs[2 * C + c3])) c3 = c;
                if (c1 == C || c2 == C || c3 == C) fail_msg("fewer than 3 planned clusters (%zu items)", A.ni);
                m = add_id(rid, m, mark, T.mem[c1][0]);
                for (uint32_t j = 0; j < A.ns[c2]; j++) m = add_id(rid, m, mark, T.mem[c2][j]);
                for (uint32_t j = 0; j < T.len[c3]; j++) m = add_id(rid, m, mark, T.mem[c3][j]);
                whole++;
            }
            for (size_t i = 0; i < 150; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(n));
            size_t in_samples = 0;
            for (size_t i = 0; i < m; i++) in_samples += T.pos[rid[i]] < A.ns[T.of[rid[i]]];
            in_all += in_samples;
            if (step == 0) {
                rid[m++] = (uint32_t)n; /* past the index: ignored (mark not read for them) */
                rid[m++] = (uint32_t)(n + 77);
            }
            shuffle_ids(rid, m);
            if (step == 0) gather2(&T, &A, Q, &R, scale);
            else gather1(&T, &A, Q, &R, scale);
            for (size_t g = 0; g < G; g++) {
                char what[128];
                snprintf(what, sizeof what, "%s, step %d, head %zu (%zu retrieved, %zu in samples)",
                         f16 ? "float16" : "float32", step, g, m, in_samples);
                double frac;
                size_t rgot = finish_ref64(ro, &rlse, &frac, &T, A.ns, &R, Q + g * d, scale, mark);
                if (rgot + in_samples != A.tot) fail_msg("%s: the reference counts %zu samples outside R", what, rgot);
                size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, m, mark, o, &lse);
                double e = check_out(what, o, lse, got, ro, rlse, rgot, d, &lmax);
                emax = e > emax ? e : emax;
                anew += frac < 1e-6;
                fmin = frac < fmin ? frac : fmin;
                if (frac >= 1e-6) fsub = frac < fsub ? frac : fsub;
            }
            if (in_samples < 10) fail_msg("only %zu retrieved ids in samples", in_samples);
            steps++;
        }
        kst_kvtc_group_free(&A);
        kst_kvtc_free(&T);
        rows_free(&R);
    }
    print_message("gather + finish: %zu steps x %zu heads, largest o error %.2e, lse error %.2e; %zu retrieved ids in "
                  "samples; %zu heads summed anew (smallest remainder %.1e; subtracted down to %.1e); %zu whole samples "
                  "retrieved\n", steps, G, emax, lmax, in_all, anew, fmin, fsub, whole);
    free(cen);
    free(cs);
    free(rid);
    free(mark);
}

/* 2b. Cancellation: R = 30 random ids and the first member x of the sample of the cluster head
 * 0's centroid scores best, x's key set so that x's weighted term holds all but f of head 0's
 * weighted sum over the whole sample (G = 3 heads, 2,000 keys, d 64, 32 clusters, budget 400;
 * float32 and float16 rows). f = 1e-7 .. 1e-12, under the 1e-6 where finish sums the head anew
 * from its samples outside R: asserted to the float64 estimator at the usual tolerance (the
 * subtraction would leave errors of eps32 / f there, 1e-1 .. 1e4). f = 1e-1 .. 2e-6: R's terms
 * subtracted from the float sums, so the estimate keeps an error of about u / f, u the float
 * rounding of x's log weight (its score + log(len_c / n_c), ~1e-6 at |s| ~ 20): measured and
 * printed; asserted under 1e-5 + 8 eps32 max(1, |s_x|) / f (o and lse). */
static void test_cancellation(void **state) {
    (void)state;
    tc_seed(6);
    const size_t n = 2000, d = 64, C = 32, ncent = 20, B = 400, G = 3;
    const float scale = (float)(1.0 / sqrt((double)d));
    float *cen = malloc(ncent * d * sizeof *cen), Q[3 * 64], cs[3 * 32], o[64], lse;
    uint8_t *mark = calloc(n, 1);
    uint32_t rid[64];
    double ro[64], rlse, worst[2] = {0, 0};
    static const double fr[10] = {1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 2e-6, 1e-7, 1e-8, 1e-10, 1e-12};
    size_t anew = 0, bad = 0;
    for (int f16 = 0; f16 < 2; f16++) {
        ts_rows R;
        rows_make(&R, cen, n, d, 0, f16, ncent, 1.0, 0.5);
        kst_kvtc T = {0};
        build(&T, &R, C, 61);
        kst_kvtc_group A = {0};
        make_queries(Q, cen, G, d, ncent, 1.0);
        plan(&T, &A, Q, G, scale, 0.7f, B, cs);
        size_t c1 = C;
        for (size_t c = 0; c < C; c++)
            if (A.ns[c] >= 4 && A.ns[c] < T.len[c] && (c1 == C || cs[c] > cs[c1])) c1 = c;
        if (c1 == C) fail_msg("no planned cluster of 4 samples");
        uint32_t x = T.mem[c1][0];
        size_t m = add_id(rid, 0, mark, x);
        for (size_t i = 0; i < 30; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(n));
        shuffle_ids(rid, m);
        /* head 0's weighted sum over the samples outside R (exp(s) (len_c / n_c), float64) */
        double so = 0, qq = 0, wx = (double)T.len[c1] / (double)A.ns[c1];
        for (size_t c = 0; c < C; c++)
            for (uint32_t j = 0; j < A.ns[c]; j++)
                if (!mark[T.mem[c][j]]) so += (double)T.len[c] / (double)A.ns[c] * exp(score64(&R, Q, T.mem[c][j], scale));
        for (size_t i = 0; i < d; i++) qq += (double)Q[i] * Q[i];
        for (size_t k = 0; k < 10; k++) {
            double f = fr[k], sx = log(so * (1 - f) / f / wx);
            float key[64];
            for (size_t i = 0; i < d; i++) key[i] = (float)(sx * Q[i] / (scale * qq));
            rows_set_key(&R, x, key);
            if (k % 2) gather1(&T, &A, Q, &R, scale);
            else gather2(&T, &A, Q, &R, scale);
            for (size_t g = 0; g < G; g++) {
                char what[128];
                double fx;
                size_t rgot = finish_ref64(ro, &rlse, &fx, &T, A.ns, &R, Q + g * d, scale, mark);
                size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, m, mark, o, &lse);
                snprintf(what, sizeof what, "%s, f %.0e, head %zu (remainder %.2e)", f16 ? "float16" : "float32", f, g, fx);
                if (g == 0 && !(fx > 0.5 * f && fx < 2 * f)) fail_msg("%s: the key missed its remainder", what);
                if (fx < 0.8e-6) { /* summed anew: the usual tolerance (all run, then failed) */
                    double e = rel_err64(o, ro, d), le = fabs(lse - rlse);
                    int ok = got == rgot && e < TOL_O && le < TOL_LSE;
                    if (g == 0 || !ok)
                        print_message("%s: summed anew? o error %.2e, lse %.7g (float64 %.7g)%s\n", what, e, lse, rlse,
                                      ok ? "" : ": FAILS");
                    bad += !ok;
                    anew++;
                    continue;
                }
                assert_int_equal(got, rgot);
                double sxg = fabs(score64(&R, Q + g * d, x, scale)) + fabs(log(wx));
                double e = rel_err64(o, ro, d), le = fabs(lse - rlse),
                       bound = 1e-5 + 8 * 5.96e-8 * fmax(1, sxg) / fx;
                if (g == 0)
                    print_message("%s: x's log weight %.1f: o error %.2e, lse error %.2e (bound %.1e)\n", what, sxg, e, le,
                                  bound);
                worst[0] = fmax(worst[0], e * fx / fmax(1, sxg));
                worst[1] = fmax(worst[1], le * fx / fmax(1, sxg));
                if (!(e <= bound && le <= bound))
                    fail_msg("%s: o error %.3g, lse error %.3g (bound %.3g)", what, e, le, bound);
            }
        }
        for (size_t i = 0; i < m; i++) mark[rid[i]] = 0;
        kst_kvtc_group_free(&A);
        kst_kvtc_free(&T);
        rows_free(&R);
    }
    print_message("cancellation: %zu heads summed anew, at the tolerance; subtracted: error x remainder / max(1, |log "
                  "weight|) at most %.2e (o), %.2e (lse) = %.1f, %.1f eps32\n",
                  anew, worst[0], worst[1], worst[0] / 5.96e-8, worst[1] / 5.96e-8);
    free(cen);
    free(mark);
    if (anew < 8) fail_msg("only %zu heads summed anew", anew);
    if (bad)
        fail_msg("%zu of the %zu heads that R's member leaves under 1e-6 of their sum are not the float64 estimator "
                 "(kv_tclust.c, kst_kvtc_group_finish: the subtraction's float rounding, ~|s| eps32, exceeds the 1e-6 "
                 "that sums the head anew)", bad, anew);
}

/* 3. A budget covering every key (n and n + 100): every cluster whole (ns = len, weights 1, ni
 * = the clusters), and each head's finish exact attention over the keys outside R (exact_ref64):
 * R empty, and R of 150 random ids, a whole cluster and a member whose key dominates head 1 (its
 * estimate then summed anew). */
static void test_exact(void **state) {
    (void)state;
    tc_seed(3);
    const size_t n = 3000, d = 64, C = 48, G = 3, ncent = 30;
    const float scale = (float)(1.0 / sqrt((double)d));
    float *cen = malloc(ncent * d * sizeof *cen), Q[3 * 64], *cs = malloc(G * C * sizeof *cs), o[64], lse;
    uint32_t *rid = malloc(n * sizeof *rid);
    uint8_t *mark = malloc(n);
    double ro[64], rlse, emax = 0, lmax = 0;
    ts_rows R;
    rows_make(&R, cen, n, d, 3, 0, ncent, 1.0, 0.5);
    kst_kvtc T = {0};
    build(&T, &R, C, 31);
    kst_kvtc_group A = {0};
    for (int run = 0; run < 4; run++) {
        size_t B = run % 2 ? n + 100 : n;
        make_queries(Q, cen, G, d, ncent, 0);
        assert_int_equal(plan(&T, &A, Q, G, scale, 0.7f, B, cs), n);
        size_t nonempty = 0;
        for (size_t c = 0; c < C; c++) {
            assert_int_equal(A.ns[c], T.len[c]);
            nonempty += T.len[c] > 0;
        }
        assert_int_equal(A.ni, nonempty);
        check_pieces(&A, "budget past the keys");
        memset(mark, 0, n);
        size_t m = 0;
        if (run >= 2) {
            size_t cw = tc_below(C), x = tc_below(n);
            float k[64];
            double qq = 0;
            for (size_t i = 0; i < d; i++) qq += (double)Q[d + i] * Q[d + i];
            for (size_t i = 0; i < d; i++) k[i] = (float)(40.0 * Q[d + i] / (scale * qq));
            rows_set_key(&R, x, k);
            m = add_id(rid, m, mark, (uint32_t)x);
            for (uint32_t j = 0; j < T.len[cw]; j++) m = add_id(rid, m, mark, T.mem[cw][j]);
            for (size_t i = 0; i < 150; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(n));
            shuffle_ids(rid, m);
        }
        if (run % 2) gather1(&T, &A, Q, &R, scale);
        else gather2(&T, &A, Q, &R, scale);
        for (size_t g = 0; g < G; g++) {
            char what[96];
            snprintf(what, sizeof what, "budget %zu, %zu retrieved, head %zu", B, m, g);
            size_t rgot = exact_ref64(ro, &rlse, &R, Q + g * d, scale, mark);
            size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, m, mark, o, &lse);
            double e = check_out(what, o, lse, got, ro, rlse, rgot, d, &lmax);
            emax = e > emax ? e : emax;
        }
    }
    print_message("budget past the keys: exact attention, largest o error %.2e, lse error %.2e\n", emax, lmax);
    kst_kvtc_group_free(&A);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(cs);
    free(rid);
    free(mark);
}

/* The weights test 4 shows to be biased (finish_ref64w): r_c / n_c (the keys outside R over the
 * whole sample) and len_c / n'_c (the keys over the samples outside R); and the ratio estimator
 * r_c / n'_c without a term for a sample R took whole (printed only: its bias is small). */
static double wt_r_ns(size_t len, size_t r, size_t ns, size_t np) {
    (void)len, (void)np;
    return (double)r / (double)ns;
}
static double wt_len_np(size_t len, size_t r, size_t ns, size_t np) {
    (void)r, (void)ns;
    return np ? (double)len / (double)np : 0;
}
static double wt_r_np(size_t len, size_t r, size_t ns, size_t np) {
    (void)len, (void)ns;
    return np ? (double)r / (double)np : 0;
}

/* 4. Unbiasedness: 1,200 keys (d 16) around 8 centres in 16 clusters, 400 random orders: 8
 * builds (k-means and shuffles seeded anew), each then reassigned 49 times with other shuffle
 * seeds (na and the lengths reset, kst_kvtc_add: the same clusters, new orders; k-means 400
 * times takes seconds under ASan), budget 96, temp 0.7; R: every other key of centres 0 and 1 (about
 * half of the clusters there, where head 0's query and most of its mass are) and 20 random ids.
 * Each trial's (o, lse) the float64 estimator (finish_ref64). For heads 0 and 1 the ratio of
 * exp(lse) to the exact sum of exp(s) over the planned clusters' keys outside R has mean 1
 * within 5 standard errors (each ratio's expectation 1 given the clusters: a member lies in its
 * cluster's first n_c places with probability n_c / len_c whatever R is). The power to see a
 * wrong weight, on the same samples (float64): r_c / n_c and len_c / n'_c must each be 5
 * standard errors off on some head (measured: head 0 0.54, -78 SE, and 1.86, +47 SE; the ratio
 * r_c / n'_c without a term for an emptied sample 1.002, too close to see). By hand, the code's
 * weight changed to len_c / (n_c + 1) in gather and finish (kv_tclust.c): the per-trial check
 * fails; the means alone 0.957 (-4.2 SE) and 0.969 (-2.7 SE), under the 5 SE bar (a bias of 4%
 * is the deterministic checks' to see). The standard error is also asserted under 0.03. */
static void test_unbiased(void **state) {
    (void)state;
    tc_seed(4);
    const size_t n = 1200, d = 16, C = 16, G = 2, ncent = 8, trials = 400, B = 96, NW = 4;
    const float scale = (float)(1.0 / sqrt((double)d));
    float *cen = malloc(ncent * d * sizeof *cen), Q[2 * 16], cs[2 * 16], o[16], lse;
    uint32_t *rid = malloc(n * sizeof *rid);
    uint8_t *mark = calloc(n, 1);
    ts_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent, 1.5, 0.6);
    for (size_t g = 0; g < G; g++) /* head 0 near centre 0, head 1 near centre 2 */
        for (size_t i = 0; i < d; i++) Q[g * d + i] = (float)(1.2 * cen[(2 * g) * d + i] + 0.2 * kv_gauss());
    size_t m = 0, half = 0;
    for (size_t x = 0; x < n; x++)
        if (R.lab[x] <= 1 && half++ % 2 == 0) m = add_id(rid, m, mark, (uint32_t)x);
    for (size_t i = 0; i < 20; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(n));
    /* per head and estimator (0 the code, then HT's weight in float64, then the wrong ones) the
     * sums of the ratio and its square */
    static const ts_weight wts[4] = {NULL, NULL, wt_r_ns, wt_len_np};
    static const char *names[5] = {"the code (len_c / n_c)", "float64 len_c / n_c", "r_c / n_c", "len_c / n'_c",
                                   "r_c / n'_c (no term for an emptied sample)"};
    double *s = malloc(n * sizeof *s), sum[2][5] = {{0}}, sum2[2][5] = {{0}}, share[2] = {0, 0}, ro[16], rlse, emax = 0,
           lmax = 0;
    size_t emptied = 0; /* planned clusters whose sample R took whole (no term) while keys outside R are left */
    kst_kvtc T = {0};
    kst_kvtc_group A = {0};
    kst_error err;
    for (size_t t = 0; t < trials; t++) {
        if (t % 50 == 0) {
            build(&T, &R, C, 1000 + 7 * t);
            assert_int_equal(T.C, C);
        } else { /* the same clusters in new orders: every node assigned anew, from shuffles seeded anew */
            T.na = 0;
            memset(T.len, 0, C * sizeof *T.len);
            T.rng = 0x5851f42d4c957f2dull * (t + 1);
            assert_ok(kst_kvtc_add(&T, R.K, 0, n, &err), &err);
        }
        if (t % 50 < 2) check_places(&T, "unbiasedness' orders");
        plan(&T, &A, Q, G, scale, 0.7f, B, cs);
        for (size_t c = 0; c < C; c++) {
            size_t left = 0, r = 0;
            for (uint32_t j = 0; j < T.len[c]; j++) r += !mark[T.mem[c][j]], left += j < A.ns[c] && !mark[T.mem[c][j]];
            emptied += A.ns[c] && r && !left;
        }
        if (t % 2) gather1(&T, &A, Q, &R, scale);
        else gather2(&T, &A, Q, &R, scale);
        for (size_t g = 0; g < G; g++) {
            double mx = -INFINITY, ex = 0, rt = 0, est[5];
            for (size_t x = 0; x < n; x++) s[x] = score64(&R, Q + g * d, x, scale), mx = fmax(mx, s[x]);
            for (size_t x = 0; x < n; x++)
                if (!mark[x]) {
                    rt += exp(s[x] - mx);
                    if (A.ns[T.of[x]]) ex += exp(s[x] - mx);
                }
            size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, m, mark, o, &lse);
            est[0] = exp((double)lse - mx);
            for (size_t w = 1; w < NW + 1; w++) {
                size_t rgot = finish_ref64w(ro, &rlse, NULL, &T, A.ns, &R, Q + g * d, scale, mark,
                                            w < NW ? wts[w] : wt_r_np);
                est[w] = exp(rlse - mx);
                if (w == 1) {
                    char what[64];
                    snprintf(what, sizeof what, "unbiasedness, trial %zu, head %zu", t, g);
                    double e = check_out(what, o, lse, got, ro, rlse, rgot, d, &lmax);
                    emax = e > emax ? e : emax;
                }
            }
            for (size_t w = 0; w < NW + 1; w++) {
                sum[g][w] += est[w] / ex;
                sum2[g][w] += est[w] / ex * est[w] / ex;
            }
            share[g] += ex / rt / (double)trials;
        }
    }
    print_message("unbiasedness: %zu trials (each the float64 estimator: o error %.1e, lse %.1e), %zu planned clusters "
                  "whose sample was all retrieved\n", trials, emax, lmax, emptied);
    if (!emptied) fail_msg("no sample all retrieved: the clusters that then contribute nothing are not reached");
    int caught[5] = {0};
    for (size_t g = 0; g < G; g++) {
        print_message("head %zu (the planned clusters hold %.3f of the sum outside R):\n", g, share[g]);
        for (size_t w = 0; w < NW + 1; w++) {
            double mean = sum[g][w] / (double)trials,
                   var = (sum2[g][w] - trials * mean * mean) / (double)(trials - 1), se = sqrt(var / (double)trials);
            print_message("  %-44s mean estimate / exact %.4f, standard error %.4f (%+.1f SE)\n", names[w], mean, se,
                          (mean - 1) / se);
            int off = !(fabs(mean - 1) <= 5 * se);
            caught[w] |= off;
            if (w < 2 && off) fail_msg("head %zu, %s: mean ratio %.4f is %.1f standard errors from 1", g, names[w], mean,
                                       (mean - 1) / se);
            if (w < 2 && !(se < 0.03)) fail_msg("head %zu: standard error %.4f too wide to catch a wrong weight", g, se);
        }
    }
    for (size_t w = 2; w < NW; w++)
        if (!caught[w]) fail_msg("the wrong weight %s is within 5 standard errors on both heads: no power", names[w]);
    kst_kvtc_group_free(&A);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(rid);
    free(mark);
    free(s);
}

/* 5. Edges: (a) G = 1 plans as kst_kvtc_plan with nothing retrieved (same ns; its pieces),
 * budgets 1 .. past the keys, temps 0 .. 2; (b) budget 0: tot 0, ni 0, pb all 0, the 16 empty
 * pieces gathered, finish lse -inf and o 0; (c) clusters not built (C 0): the plan KST_OK with
 * ni 0, the pieces gathered (nothing), finish's lse -inf (o untouched: T->d is 0); (d) every key
 * retrieved: -inf; (e) one group reused over a head of d 16, 16 clusters, G 4 and back (d 64, 64
 * clusters, G 2): each finish the float64 estimator; (f) empty clusters (400 keys at 3 points,
 * 16 clusters): none planned, finish the estimator (budget 50) and exact (budget 400). */
static void test_edges(void **state) {
    (void)state;
    tc_seed(5);
    const size_t n = 4000, d = 64, C = 64, ncent = 40;
    const float scale = (float)(1.0 / sqrt((double)d));
    float *cen = malloc(ncent * d * sizeof *cen), Q[4 * 64], *cs = malloc(4 * C * sizeof *cs), o[64], lse;
    uint32_t *rid = malloc(n * sizeof *rid);
    uint8_t *mark = calloc(n, 1);
    double ro[64], rlse;
    ts_rows R;
    rows_make(&R, cen, n, d, 0, 0, ncent, 1.0, 0.5);
    kst_kvtc T = {0};
    build(&T, &R, C, 51);
    kst_kvtc_group A = {0};
    kst_error err;
    /* (a) G = 1 against the per-head plan (x50: test_plan_sharp) */
    size_t plans = 0, diff = g1_plans(&T, cen, ncent, scale, 0, &plans);
    /* (b) budget 0 */
    make_queries(Q, cen, 3, d, ncent, 0);
    assert_int_equal(plan(&T, &A, Q, 3, scale, 0.7f, 0, cs), 0);
    assert_int_equal(A.ni, 0);
    assert_int_equal(A.tot, 0);
    for (size_t c = 0; c < C; c++) assert_int_equal(A.ns[c], 0);
    for (size_t p = 0; p <= KST_KVTC_PIECES; p++) assert_int_equal(A.pb[p], 0);
    gather2(&T, &A, Q, &R, scale);
    for (size_t i = 0; i < 10; i++) rid[i] = (uint32_t)(i * 97), mark[i * 97] = 1;
    for (size_t g = 0; g < 3; g++) {
        memset(o, 0x7f, sizeof o);
        size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, 10, mark, o, &lse);
        check_out("budget 0", o, lse, got, ro, -INFINITY, 0, d, NULL);
    }
    for (size_t i = 0; i < 10; i++) mark[i * 97] = 0;
    /* (c) not built */
    {
        kst_kvtc T0 = {0};
        assert_ok(kst_kvtc_build(&T0, rows_K0(&R), 0, n, d, 0, 1, &err), &err);
        assert_int_equal(T0.C, 0);
        kst_kvtc_group A0 = {0};
        float cs0[1] = {0};
        assert_ok(kst_kvtc_group_plan(&T0, &A0, cs0, 3, 0.7f, 600, &err), &err);
        assert_int_equal(A0.ni, 0);
        assert_int_equal(A0.tot, 0);
        for (size_t p = 0; p <= KST_KVTC_PIECES; p++) assert_int_equal(A0.pb[p], 0);
        float sc[64 + 1];
        for (size_t p = 0; p < KST_KVTC_PIECES; p++)
            kst_kvtc_group_gather(&T0, &A0, p, Q, rows_K(&R), rows_V(&R), 0, scale, 0, sc);
        memset(o, 0x7f, sizeof o);
        rid[0] = 5;
        size_t got = kst_kvtc_group_finish(&T0, &A0, 0, Q, rows_K(&R), rows_V(&R), 0, scale, 0, rid, 1, mark, sc, o, &lse);
        /* lse -inf (a merge then ignores o); o itself is left as it was: finish knows d from T,
         * whose d is 0 before a build */
        assert_int_equal(got, 0);
        if (lse != -INFINITY) fail_msg("clusters not built: lse %.7g (-inf)", lse);
        kst_kvtc_group_free(&A0);
        kst_kvtc_free(&T0);
    }
    /* (d) every key retrieved */
    assert_int_equal(plan(&T, &A, Q, 3, scale, 0.7f, 600, cs), 600);
    gather2(&T, &A, Q, &R, scale);
    for (size_t x = 0; x < n; x++) rid[x] = (uint32_t)x, mark[x] = 1;
    shuffle_ids(rid, n);
    for (size_t g = 0; g < 3; g++) {
        size_t got = finish(&T, &A, g, Q + g * d, &R, scale, rid, n, mark, o, &lse);
        check_out("every key retrieved", o, lse, got, ro, -INFINITY, 0, d, NULL);
    }
    memset(mark, 0, n);
    /* (e) the group reused over another head's sizes and back */
    {
        const size_t n2 = 1500, d2 = 16, C2 = 16;
        float cen2[12 * 16], Q2[4 * 16], cs2[4 * 16];
        ts_rows R2;
        rows_make(&R2, cen2, n2, d2, 2, 1, 12, 1.0, 0.5);
        kst_kvtc T2 = {0};
        build(&T2, &R2, C2, 52);
        const float scale2 = 0.25f;
        for (int pass = 0; pass < 3; pass++) {
            const kst_kvtc *Tp = pass == 1 ? &T2 : &T;
            ts_rows *Rp = pass == 1 ? &R2 : &R;
            size_t Gp = pass == 0 ? 3 : pass == 1 ? 4 : 2, dp = Rp->d, np = Rp->n, m = 0;
            float sp = pass == 1 ? scale2 : scale, *Qp = pass == 1 ? Q2 : Q;
            make_queries(Qp, pass == 1 ? cen2 : cen, Gp, dp, pass == 1 ? 12 : ncent, 0);
            plan(Tp, &A, Qp, Gp, sp, 0.7f, pass == 1 ? 200 : 600, pass == 1 ? cs2 : cs);
            gather2(Tp, &A, Qp, Rp, sp);
            for (size_t i = 0; i < 60; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(np));
            for (size_t g = 0; g < Gp; g++) {
                char what[64];
                snprintf(what, sizeof what, "group reused, pass %d, head %zu", pass, g);
                size_t rgot = finish_ref64(ro, &rlse, NULL, Tp, A.ns, Rp, Qp + g * dp, sp, mark);
                size_t got = finish(Tp, &A, g, Qp + g * dp, Rp, sp, rid, m, mark, o, &lse);
                check_out(what, o, lse, got, ro, rlse, rgot, dp, NULL);
            }
            for (size_t i = 0; i < m; i++) mark[rid[i]] = 0;
        }
        kst_kvtc_free(&T2);
        rows_free(&R2);
    }
    /* (f) empty clusters: 400 keys at 3 points in 16 clusters */
    size_t empty = 0;
    {
        const size_t n3 = 400, d3 = 16, C3 = 16;
        float cen3[3 * 16], Q3[2 * 16], cs3[2 * 16];
        ts_rows R3;
        rows_make(&R3, cen3, n3, d3, 0, 0, 3, 1.0, 0.0);
        kst_kvtc T3 = {0};
        build(&T3, &R3, C3, 53);
        assert_int_equal(T3.C, C3);
        for (size_t c = 0; c < C3; c++) empty += T3.len[c] == 0;
        for (size_t pass = 0; pass < 2; pass++) {
            size_t B3 = pass ? n3 : 50, m = 0;
            make_queries(Q3, cen3, 2, d3, 3, 0);
            assert_int_equal(plan(&T3, &A, Q3, 2, 0.25f, 0.7f, B3, cs3), B3);
            for (size_t c = 0; c < C3; c++)
                if (!T3.len[c] && A.ns[c]) fail_msg("empty cluster %zu gets %u samples", c, A.ns[c]);
            gather2(&T3, &A, Q3, &R3, 0.25f);
            for (size_t i = 0; i < 40; i++) m = add_id(rid, m, mark, (uint32_t)tc_below(n3));
            for (size_t g = 0; g < 2; g++) {
                char what[64];
                snprintf(what, sizeof what, "empty clusters, budget %zu, head %zu", B3, g);
                size_t rgot = pass ? exact_ref64(ro, &rlse, &R3, Q3 + g * d3, 0.25, mark)
                                   : finish_ref64(ro, &rlse, NULL, &T3, A.ns, &R3, Q3 + g * d3, 0.25, mark);
                size_t got = finish(&T3, &A, g, Q3 + g * d3, &R3, 0.25f, rid, m, mark, o, &lse);
                check_out(what, o, lse, got, ro, rlse, rgot, d3, NULL);
            }
            for (size_t i = 0; i < m; i++) mark[rid[i]] = 0;
        }
        kst_kvtc_free(&T3);
        rows_free(&R3);
    }
    print_message("edges: G = 1 equals kst_kvtc_plan in %zu plans (%zu clusters differ); %zu of 16 clusters empty\n",
                  plans, diff, empty);
    if (!empty) fail_msg("keys at 3 points left no cluster empty: the empty clusters are not tested");
    kst_kvtc_group_free(&A);
    kst_kvtc_free(&T);
    rows_free(&R);
    free(cen);
    free(cs);
    free(rid);
    free(mark);
}

int main(void) {
    /* one thread for the library's own teams (k-means, BLAS; not under test here): 400 k-means of
     * 1,024 keys (test_unbiased) are barriers more than work, seconds on a loaded machine */
    kst_set_num_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_places),
        cmocka_unit_test(test_plan_definition),
        cmocka_unit_test(test_plan_sharp),
        cmocka_unit_test(test_gather_finish),
        cmocka_unit_test(test_cancellation),
        cmocka_unit_test(test_exact),
        cmocka_unit_test(test_unbiased),
        cmocka_unit_test(test_edges),
    };
    return cmocka_run_group_tests_name("kv_tshare", tests, NULL, NULL);
}
