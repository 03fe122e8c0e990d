/* test_kv_tshare_step.c - the decode step (kst_kvc_attend) with the shared clustered tail sample
 * (kst_kvc_set_tail_clusters + kst_kvc_set_tail_share; kv_tclust.h's kst_kvtc_group_*) against
 * float64 references written here from its definition:
 * - the plan of KV head kh: ns = kst_kvtc_group_plan over the centroid scores of its G query
 *   heads (kst_kvtc_scores), itself checked against a float64 water-filling of the budget in
 *   proportion to len_c sum_g exp(temp cs_gc) / Z_g (within 1 a cluster, the total exact);
 * - each query head's output: sinks, the exact tail (window, pending) and its retrieved keys
 *   (kst_kvc_search, the same top_k and ef) exact; then, Horvitz-Thompson, every member of the
 *   first ns_c places of a cluster c that was not retrieved, weighted len_c / ns_c (a cluster
 *   whose sample retrieval took whole, or that the plan left out, contributes nothing);
 *   stats.sampled = the number of such members over the heads.
 * Tests: 1 the step against it (float32 / float16, both indexes, G = 2 and 4; 6 the same with the
 * static tokens on the GPU where a device is), 2 the budget past the rest (full attention), 3
 * appends (new members sampled), 4 shared against per-head samples at the same rows read on
 * clustered data, 5 the switches (KESTREL_KV_TSHARE, G = 1, tail_samples 0), 8 rebuilds with
 * other cluster counts, the group search, sharp queries and budgets of 1 and 3, 10 two layers, 9
 * the adaptive budget staying off, 7 OpenMP teams of 1, 3, 8 and 16 threads, 11 a retrieved key
 * that dominates its head and is its cluster's one sample.
 * Tolerances: outputs 2e-5 absolute + 1e-4 relative (as test_kv_tclust). */
#include <omp.h>
#include <time.h>

#include "harness.h"
#include "kv_ref.h"

#include "core/half.h"
#include "index/kv.h"
#include "index/kv_tclust.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

#include "kv_tc_ref.h"

/* What the references saw (coverage: the tests assert that the estimator's branches ran). */
static struct {
    size_t insample;  /* retrieved keys in their cluster's sample (their terms taken out, a head each) */
    size_t emptied;   /* clusters whose sample was all retrieved while keys outside R were left (no term) */
    size_t touched;   /* clusters whose sample held retrieved keys and others */
    size_t anew;      /* heads whose retrieved sampled keys held all but under 1e-6 (and over 0) of
                         their weighted sample's sum (kv_tclust.c then sums the head anew) */
    size_t gone;      /* heads whose every sampled key was retrieved (no estimate) */
    size_t plain;     /* clusters whose sample held no retrieved key */
    double lrem;      /* the least log10 of a head's remainder (its weighted sample's sum outside R
                         over its sum; 0 after the memset: remainder 1) */
    size_t newseen;   /* sampled nodes indexed after the build (test 3) */
    size_t plans;     /* plans checked against float64 */
    double maxoff;    /* the largest |n_c - float64 share| */
} g_cnt;


/* The shared estimator's float64 reference for one query head (the definition above): exact as
 * tc_ref64; then each member x of the first ns[c] places of a cluster c of T (ns: the KV head's
 * shared plan; NULL: no estimate) that was not retrieved, weighted len_c / ns[c]. Sampled nodes
 * >= newfrom are counted in g_cnt.newseen. Returns the sampled members not retrieved. */
static size_t tsh_ref64(double *out, const float *q, const float *K, const float *V, size_t n, size_t d, double scale,
                        size_t sinks, size_t nidx, const int64_t *pos, size_t m, const kst_kvtc *T,
                        const uint32_t *ns, uint32_t newfrom) {
    double *l = malloc(n * sizeof *l), *w = calloc(n, sizeof *w), mx = -INFINITY, s_all = 0, s_left = 0;
    uint8_t *ret = calloc(nidx + 1, 1);
    size_t used = 0, inr_all = 0;
    mx = tc_exact64(l, w, ret, q, K, n, d, scale, sinks, nidx, pos, m);
    for (size_t c = 0; ns && c < T->C; c++) {
        if (!ns[c]) continue;
        if (ns[c] > T->len[c]) fail_msg("cluster %zu: %u samples planned of %u members", c, ns[c], T->len[c]);
        size_t rc = 0, inr = 0;
        for (uint32_t i = 0; i < T->len[c]; i++) {
            uint32_t x = T->mem[c][i];
            if (x >= nidx) fail_msg("cluster %zu holds node %u of %zu indexed", c, x, nidx);
            rc += !ret[x];
        }
        double wc = (double)T->len[c] / (double)ns[c];
        for (uint32_t i = 0; i < ns[c]; i++) {
            uint32_t x = T->mem[c][i];
            double e = wc * exp(l[sinks + x] - mx);
            s_all += e;
            if (ret[x]) {
                inr++;
                continue;
            }
            s_left += e;
            w[sinks + x] = e;
            g_cnt.newseen += x >= newfrom;
            used++;
        }
        inr_all += inr;
        if (!inr) g_cnt.plain++;
        else if (inr < ns[c]) g_cnt.touched++;
        else g_cnt.emptied += rc > 0;
    }
    g_cnt.insample += inr_all;
    if (inr_all && s_left > 0 && s_left < 1e-6 * s_all) g_cnt.anew++;
    g_cnt.gone += inr_all && !(s_left > 0);
    if (s_left > 0) g_cnt.lrem = fmin(g_cnt.lrem, log10(s_left / s_all));
    wsum_rows64(out, w, V, n, d);
    free(l);
    free(w);
    free(ret);
    return used;
}

/* The shared plan of KV head's G query rows against float64 (kv_tc_ref.h, tc_plan64), counted. */
static void check_plan64(const kst_kvtc *T, const uint32_t *ns, size_t tot, const float *Q, size_t G, double scale,
                         double temp, size_t B, const char *what) {
    double off = tc_plan64(T, ns, tot, Q, G, scale, temp, B, what);
    if (off > g_cnt.maxoff) g_cnt.maxoff = off;
    g_cnt.plans++;
}

/* The layer check_step_sh steps (0 but in test 10). */
static size_t g_layer;

/* One decode step of layer g_layer of c (K, V: its n tokens (n, H, d) as the references read them)
 * against the shared estimator of every query head: per KV head the plan by kst_kvtc_group_plan
 * (its G heads' kst_kvtc_scores; checked by check_plan64), the retrieved keys reproduced by
 * kst_kvc_search (the same top_k and ef); stats.sampled the sampled members not retrieved, over
 * the heads. out (may be NULL): the step's output. Returns that count. */
static size_t check_step_sh(kst_kvc *c, const float *K, const float *V, size_t n, const float *q, size_t top_k,
                            size_t ef, float temp, uint32_t newfrom, float *out_keep, const char *what) {
    const kst_kvc_opts *o = kst_kvc_opts_of(c);
    size_t H = o->kv_heads, QH = o->q_heads, G = QH / H, d = o->head_dim, sinks = o->sinks, B = o->tail_samples;
    float *out = malloc(QH * d * sizeof *out), *Kh = malloc(n * d * sizeof *Kh), *Vh = malloc(n * d * sizeof *Vh);
    double ref[512];
    kst_kvc_stats st;
    kst_error err;
    assert_ok(kst_kvc_attend(c, g_layer, q, top_k, ef, out, &st, &err), &err);
    size_t nidx = kst_kvc_indexed(c, g_layer), k = top_k < nidx ? top_k : nidx, tot = 0;
    assert_int_equal(st.tokens, n);
    assert_int_equal(st.indexed, nidx);
    if (st.widened) fail_msg("%s: %zu searches widened (with tail_clusters none should be)", what, st.widened);
    int64_t *pos = malloc((k + 1) * sizeof *pos), *posg = malloc((G * k + 1) * sizeof *posg);
    assert_true(G <= 16);
    for (size_t kh = 0; kh < H; kh++) {
        const kst_kvtc *T = kst_kvc_tail_clusters(c, g_layer, kh);
        kst_kvtc_group A = {0};
        float *cs = NULL;
        head_rows(Kh, K, n, H, kh, d);
        head_rows(Vh, V, n, H, kh, d);
        if (B > 0 && nidx > 0) {
            if (!T) fail_msg("%s: KV head %zu has no clusters", what, kh);
            assert_int_equal(T->na, nidx);
            cs = malloc(G * T->C * sizeof *cs);
            kst_kvtc_scores(T, q + kh * G * d, G, o->scale, cs);
            assert_ok(kst_kvtc_group_plan(T, &A, cs, G, temp, B, &err), &err);
            check_plan64(T, A.ns, A.tot, q + kh * G * d, G, o->scale, temp, B, what);
        }
        size_t fg[16] = {0};
        if (k && o->group_search) /* the searches of the group as the step runs them */
            assert_ok(kst_kvc_search_group(c, g_layer, kh, q + kh * G * d, k, ef, posg, fg, NULL, &err), &err);
        for (size_t g = 0; g < G; g++) {
            size_t h = kh * G + g, found = 0;
            const float *qh = q + h * d;
            if (k && o->group_search) {
                found = fg[g];
                memcpy(pos, posg + g * k, found * sizeof *pos);
            } else if (k) {
                assert_ok(kst_kvc_search(c, g_layer, h, qh, k, ef, pos, &found, NULL, &err), &err);
            }
            tot += tsh_ref64(ref, qh, Kh, Vh, n, d, o->scale, sinks, nidx, pos, found, T, cs ? A.ns : NULL, newfrom);
            for (size_t j = 0; j < d; j++)
                if (!(fabs(out[h * d + j] - ref[j]) <= TOL_A + TOL_R * fabs(ref[j]))) {
                    /* the diagnosis: is it the step without the tail estimate? */
                    double ref0[512];
                    size_t same = 1;
                    tsh_ref64(ref0, qh, Kh, Vh, n, d, o->scale, sinks, nidx, pos, found, T, NULL, newfrom);
                    for (size_t i = 0; i < d; i++) same &= fabs(out[h * d + i] - ref0[i]) <= TOL_A + TOL_R * fabs(ref0[i]);
                    fail_msg("%s: head %zu, dim %zu: %.7g, float64 shared estimator %.7g (%zu indexed, %zu retrieved, "
                             "%zu samples, %d OpenMP threads)%s",
                             what, h, j, out[h * d + j], ref[j], nidx, found, B, omp_get_max_threads(),
                             same ? ": the head's output is the static and retrieved keys' alone (its tail estimate "
                                    "skipped)"
                                  : "");
                }
        }
        kst_kvtc_group_free(&A);
        free(cs);
    }
    if (st.sampled != tot) fail_msg("%s: stats.sampled %zu, the shared estimator's %zu", what, st.sampled, tot);
    if (out_keep) memcpy(out_keep, out, QH * d * sizeof *out);
    free(out);
    free(Kh);
    free(Vh);
    free(pos);
    free(posg);
    return tot;
}



/* A cache of n tokens (K, V (n, H, d) float32; float16 when o->f16, rounded in place), built with
 * nq prefill queries Qp (attention-aware) or none, tail_clusters C at temp, the shared sample on
 * (share) or off. */
static kst_kvc *make_cache(const kst_kvc_opts *o, float *K, float *V, size_t n, const float *Qp, size_t nq,
                           size_t C, float temp, int share) {
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(o, &c, &err), &err);
    kst_kvc_set_tail_clusters(c, C, temp);
    kst_kvc_set_tail_share(c, share);
    append_rows(c, K, V, n);
    assert_ok(kst_kvc_build(c, 0, Qp, nq, &err), &err);
    return c;
}



/* 1 (and 6). One step equals the shared estimator for every query head: 2,000 indexed keys in 32
 * clusters per KV head (2 KV heads), float32 at d 32 and float16 at d 64 (codes), the
 * attention-aware index (48 prefill queries) and the key-only one, G = 2 and 4; the CPU path
 * and (CUDA builds with a device) the static tokens on the GPU. Each cache 4 steps: top_k / ef /
 * budget 16 / 48 / 256, 4 / 16 / 256, 64 / 128 / 32 and 32 / 64 / 8 (few samples a cluster:
 * asserted reached, retrieved keys in samples (200 at least; their terms taken out), samples
 * holding retrieved keys and others, and whole samples retrieved while keys outside R are left
 * (no term)). */
static void run_step_equals_estimator(int gpu) {
    tc_seed(1);
    const size_t n = 2000 + 4 + 64, ncent = 32, nq = 48, H = 2;
    static const size_t tk[4] = {16, 4, 64, 32}, ef[4] = {48, 16, 128, 64}, bud[4] = {256, 256, 32, 8};
    size_t steps = 0, sampled = 0;
    memset(&g_cnt, 0, sizeof g_cnt);
    for (int run = 0; run < 8; run++) {
        int f16 = run & 1, keys = (run >> 1) & 1;
        size_t G = run & 4 ? 4 : 2, QH = H * G, d = f16 ? 64 : 32;
        float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V),
              *cen = malloc(H * ncent * d * sizeof *cen), *Qp = malloc(nq * QH * d * sizeof *Qp),
              *Q = malloc(4 * QH * d * sizeof *Q);
        mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
        mix_queries(Qp, cen, nq, QH, H, d, ncent);
        mix_queries(Q, cen, 4, QH, H, d, ncent);
        kst_kvc_opts o = tc_base_opts(d, f16, keys ? KST_KVC_INDEX_KEYS : KST_KVC_INDEX_ATTN, 256, H, QH);
        o.gpu = gpu;
        kst_kvc *c = make_cache(&o, K, V, n, keys ? NULL : Qp, keys ? 0 : nq, 32, 0.5f, 1);
        assert_int_equal(kst_kvc_indexed(c, 0), 2000);
        assert_int_equal(kst_kvc_tail_clusters(c, 0, 0)->C, 32);
        assert_non_null(kst_kvc_tail_clusters(c, 0, 1));
        for (size_t s = 0; s < 4; s++) {
            char what[128];
            snprintf(what, sizeof what, "%s, %s index, G %zu, %s, step %zu (top_k %zu, %zu samples)",
                     f16 ? "float16" : "float32", keys ? "key-only" : "attention-aware", G, gpu ? "gpu" : "cpu", s, tk[s],
                     bud[s]);
            kst_kvc_set_tail_samples(c, bud[s]);
            size_t got = check_step_sh(c, K, V, n, Q + s * QH * d, tk[s], ef[s], 0.5f, UINT32_MAX, NULL, what);
            /* each head's samples outside R at most the KV head's budget */
            if (got > QH * bud[s]) fail_msg("%s: %zu samples used of %zu a head", what, got, bud[s]);
            sampled += got;
            steps++;
        }
        kst_kvc_free(c);
        free(K);
        free(V);
        free(cen);
        free(Qp);
        free(Q);
    }
    print_message("shared step (%s): %zu steps equal to the float64 estimator, %zu keys used; %zu retrieved keys in "
                  "samples (their terms taken out); clusters: %zu plain, %zu with retrieved samples and others, %zu whole "
                  "samples retrieved (no term); %zu heads under 1e-6 of their sum left (least remainder 1e%.1f); %zu "
                  "plans within %.3f of float64\n",
                  gpu ? "gpu" : "cpu", steps, sampled, g_cnt.insample, g_cnt.plain, g_cnt.touched, g_cnt.emptied,
                  g_cnt.anew, g_cnt.lrem, g_cnt.plans, g_cnt.maxoff);
    if (!g_cnt.touched) fail_msg("no sample held retrieved keys and others: the subtraction is not tested");
    if (g_cnt.insample < 200) fail_msg("only %zu retrieved keys in samples (200 wanted)", g_cnt.insample);
    if (!g_cnt.emptied) fail_msg("no sample was all retrieved: a planned cluster without a term is not tested");
}

static void test_step_equals_estimator(void **state) {
    (void)state;
    run_step_equals_estimator(0);
}

/* 6. Test 1 with the static tokens on the GPU (CUDA builds with a device; skipped here). */
static void test_step_gpu(void **state) {
    (void)state;
    if (!tc_have_gpu()) skip_because("no CUDA device (or not a CUDA build): the GPU path of the shared step not run");
    run_step_equals_estimator(1);
}

/* 2. A budget covering everything (tail_samples = indexed, and 3,000 past it): every cluster
 * sampled whole, each head's estimate exact: float64 full attention, stats.sampled + retrieved =
 * q_heads x indexed. Queries at the usual scale and x20 (where float32's weights of all but the
 * best clusters underflow: the plan must still take every cluster whole). float32 attention-aware
 * and float16 key-only, G = 2 and 4. */
static void test_budget_covers_all(void **state) {
    (void)state;
    tc_seed(2);
    const size_t n = 1500 + 4 + 64, d = 32, ncent = 24, nq = 32, H = 2, nidx = 1500;
    kst_error err;
    for (int run = 0; run < 4; run++) {
        int f16 = run & 1;
        size_t G = run & 2 ? 4 : 2, QH = H * G;
        float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V),
              *cen = malloc(H * ncent * d * sizeof *cen), *Qp = malloc(nq * QH * d * sizeof *Qp),
              *Q = malloc(4 * QH * d * sizeof *Q), *Kh = malloc(n * d * sizeof *Kh), *Vh = malloc(n * d * sizeof *Vh),
              *out = malloc(QH * d * sizeof *out);
        mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
        mix_queries(Qp, cen, nq, QH, H, d, ncent);
        mix_queries(Q, cen, 4, QH, H, d, ncent);
        for (size_t i = 2 * QH * d; i < 4 * QH * d; i++) Q[i] *= 20; /* steps 2, 3: sharp */
        kst_kvc_opts o = tc_base_opts(d, f16, f16 ? KST_KVC_INDEX_KEYS : KST_KVC_INDEX_ATTN, nidx, H, QH);
        kst_kvc *c = make_cache(&o, K, V, n, f16 ? NULL : Qp, f16 ? 0 : nq, 32, 0.5f, 1);
        assert_int_equal(kst_kvc_indexed(c, 0), nidx);
        for (size_t s = 0; s < 4; s++) {
            size_t B = s % 2 ? nidx + 3000 : nidx;
            kst_kvc_set_tail_samples(c, B);
            kst_kvc_stats st;
            assert_ok(kst_kvc_attend(c, 0, Q + s * QH * d, 16, 48, out, &st, &err), &err);
            if (st.sampled + st.retrieved != QH * nidx)
                fail_msg("G %zu, %zu samples, step %zu: %zu sampled + %zu retrieved, expected %zu", G, B, s, st.sampled,
                         st.retrieved, QH * nidx);
            for (size_t h = 0; h < QH; h++) {
                double ref[32];
                head_rows(Kh, K, n, H, h / G, d);
                head_rows(Vh, V, n, H, h / G, d);
                full_attn64(ref, Q + (s * QH + h) * d, Kh, Vh, n, d, 1.0 / sqrt((double)d));
                for (size_t j = 0; j < d; j++)
                    if (!(fabs(out[h * d + j] - ref[j]) <= TOL_A + TOL_R * fabs(ref[j])))
                        fail_msg("budget past the rest (%s, G %zu, %zu samples, step %zu), head %zu, dim %zu: %.7g, full "
                                 "attention %.7g",
                                 f16 ? "float16" : "float32", G, B, s, h, j, out[h * d + j], ref[j]);
            }
            /* and the estimator's reference agrees (the plan whole) */
            check_step_sh(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, "budget past the rest");
        }
        kst_kvc_free(c);
        free(K);
        free(V);
        free(cen);
        free(Qp);
        free(Q);
        free(Kh);
        free(Vh);
        free(out);
    }
}

/* 3. Appends: 1,500 tokens built (key-only index), then (a) float32, G 2, append_batch 1: 30
 * tokens one at a time, a step, 120 in one call, a step (each linked at once); (b) float16, G 4,
 * append_batch 16: 40 tokens one at a time (some pending), a step, kst_kvc_flush, a step. After
 * each the step equals the shared estimator (with the pending tokens exact and the new nodes in
 * the clusters: T->na = indexed), and the new nodes are sampled. */
static void test_appends(void **state) {
    (void)state;
    tc_seed(3);
    const size_t n0 = 1500 + 4 + 64, d = 32, ncent = 24, nmax = n0 + 300, H = 2;
    size_t newseen = 0, steps = 0;
    memset(&g_cnt, 0, sizeof g_cnt);
    for (int batch = 0; batch < 2; batch++) {
        int f16 = batch;
        size_t G = batch ? 4 : 2, QH = H * G;
        float *K = malloc(nmax * H * d * sizeof *K), *V = malloc(nmax * H * d * sizeof *V),
              *cen = malloc(H * ncent * d * sizeof *cen), *Q = malloc(8 * QH * d * sizeof *Q);
        mix_data(K, V, cen, nmax, H, d, ncent, 1.0, 0.5);
        mix_queries(Q, cen, 8, QH, H, d, ncent);
        kst_kvc_opts o = tc_base_opts(d, f16, KST_KVC_INDEX_KEYS, 192, H, QH);
        o.append_batch = batch ? 16 : 1;
        kst_kvc *c = make_cache(&o, K, V, n0, NULL, 0, 24, 0.5f, 1);
        size_t at = n0, qi = 0;
        const uint32_t nb = (uint32_t)kst_kvc_indexed(c, 0);
        char what[96];
        check_step_sh(c, K, V, at, Q + (qi++ % 8) * QH * d, 16, 48, 0.5f, nb, NULL, "appends: before");
        for (int phase = 0; phase < 2; phase++) {
            if (phase == 0) {
                size_t add = batch ? 40 : 30;
                for (size_t i = 0; i < add; i++) append_rows(c, K + (at + i) * H * d, V + (at + i) * H * d, 1);
                at += add;
            } else if (!batch) {
                append_rows(c, K + at * H * d, V + at * H * d, 120);
                at += 120;
            } else {
                kst_error err;
                assert_ok(kst_kvc_flush(c, 0, &err), &err);
                assert_int_equal(kst_kvc_pending(c, 0), 0);
            }
            size_t nidx = kst_kvc_indexed(c, 0);
            if (!batch) assert_int_equal(nidx, at - 4 - 64);
            if (phase == 1) assert_int_equal(nidx, at - 4 - 64);
            snprintf(what, sizeof what, "%s, G %zu, append_batch %zu, phase %d (%zu indexed, %zu pending)",
                     f16 ? "float16" : "float32", G, o.append_batch, phase, nidx, kst_kvc_pending(c, 0));
            size_t before = g_cnt.newseen;
            check_step_sh(c, K, V, at, Q + (qi++ % 8) * QH * d, 16, 48, 0.5f, nb, NULL, what);
            check_step_sh(c, K, V, at, Q + (qi++ % 8) * QH * d, 4, 16, 0.5f, nb, NULL, what);
            steps += 2;
            if (nidx > nb + 16 && g_cnt.newseen == before)
                fail_msg("%s: %zu nodes indexed since the build, none sampled", what, nidx - nb);
        }
        assert_int_equal(kst_kvc_indexed(c, 0), at - 4 - 64);
        newseen = g_cnt.newseen;
        kst_kvc_free(c);
        free(K);
        free(V);
        free(cen);
        free(Q);
    }
    print_message("appends: %zu steps equal to the shared estimator, %zu samples of nodes indexed after the build\n", steps,
                  newseen);
}

/* Keys in nc clusters of ~per around random centres (one KV head's rows (n, d)); values 1 + N(0, 1). */
static void clustered_keys(float *K, float *V, float *cen, size_t n, size_t d, size_t nc) {
    for (size_t i = 0; i < nc * d; i++) cen[i] = (float)kv_gauss();
    for (size_t t = 0; t < n; t++) {
        const float *c = cen + tc_below(nc) * d;
        for (size_t i = 0; i < d; i++) K[t * d + i] = c[i] + (float)(0.45 * kv_gauss());
    }
    for (size_t i = 0; i < n * d; i++) V[i] = (float)(1.0 + kv_gauss());
}

/* 4. Shared against per-head at the same rows read: one KV head of 3,840 indexed keys (d 32) in
 * 64 clusters of ~60 around random centres, G = 4 query heads, top_k 16, 64 clusters, the default
 * temperature; 32 steps whose 4 heads look at the same centre or pair of centres (each its own
 * noise and scale) or, every fourth step, each at its own. The shared sample of B = 256 rows (read
 * once for the 4 heads) against the per-head samples of B / 4 = 64 each (256 rows in all): the
 * mean relative L2 error against float64 full attention over the 128 head outputs. Measured
 * shared / per-head 0.41 (0.38-0.54 over the data seeds 40-49, TSK_SEED=n; the steps whose heads
 * look at their own centres alone 0.81-1.05: the gain is where the heads' attention overlaps);
 * asserted under 0.8 (with the two swapped the assertion fails). Then the per-head samples at
 * the full B a head (4x the rows) beat the shared one: measured 0.67-0.77x its error, asserted
 * under 1x. */
static void test_shared_vs_per_head(void **state) {
    (void)state;
    tc_seed(getenv("TSK_SEED") ? (uint64_t)atol(getenv("TSK_SEED")) : 40);
    const size_t nc = 64, per = 60, d = 32, sinks = 4, window = 64, nq = 32, G = 4, B = 256;
    size_t n = sinks + nc * per + window;
    float *K = malloc(n * d * sizeof *K), *V = malloc(n * d * sizeof *V), *cen = malloc(nc * d * sizeof *cen),
          *Q = malloc(nq * G * d * sizeof *Q), out[4 * 32];
    clustered_keys(K, V, cen, n, d, nc);
    for (size_t s = 0; s < nq; s++) {
        size_t a = tc_below(nc), b = tc_below(nc);
        for (size_t g = 0; g < G; g++) {
            if (s % 4 == 3) { /* each head its own centre */
                a = tc_below(nc);
                b = a;
            }
            double amp = 1.0 + 0.5 * (double)tc_below(3);
            for (size_t i = 0; i < d; i++)
                Q[(s * G + g) * d + i] =
                    (float)(amp * (s % 2 ? cen[a * d + i] : 0.6 * (cen[a * d + i] + cen[b * d + i])) + 0.2 * kv_gauss());
        }
    }
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, B, 1, G);
    kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 64, 0.0f, 1);
    assert_int_equal(kst_kvc_indexed(c, 0), nc * per);
    kst_error err;
    /* mode 0: shared at B; 1: per-head at B / G; 2: per-head at B */
    double e[3] = {0, 0, 0}, eown[2] = {0, 0};
    size_t smp[3] = {0, 0, 0};
    for (int mode = 0; mode < 3; mode++) {
        kst_kvc_set_tail_share(c, mode == 0);
        kst_kvc_set_tail_samples(c, mode == 1 ? B / G : B);
        for (size_t s = 0; s < nq; s++) {
            kst_kvc_stats st;
            assert_ok(kst_kvc_attend(c, 0, Q + s * G * d, 0, 0, out, &st, &err), &err);
            smp[mode] += st.sampled;
            for (size_t g = 0; g < G; g++) {
                double ref[32];
                full_attn64(ref, Q + (s * G + g) * d, K, V, n, d, 1.0 / sqrt((double)d));
                double er = rel_err64(out + g * d, ref, d) / (double)(nq * G);
                e[mode] += er;
                if (s % 4 == 3 && mode < 2) eown[mode] += er;
            }
        }
    }
    print_message("shared B %zu vs per-head B/G %zu (same rows read), G %zu, 64 clusters: mean rel. error shared %.3e, "
                  "per-head %.3e (ratio %.3f; heads at their own centres: %.3f); per-head at B %.3e (%.3fx shared); "
                  "samples used %zu, %zu, %zu\n",
                  B, B / G, G, e[0], e[1], e[0] / e[1], eown[0] / eown[1], e[2], e[2] / e[0], smp[0], smp[1], smp[2]);
    if (!(e[0] < 0.8 * e[1]))
        fail_msg("shared sample of %zu: error %.3e, per-head of %zu: %.3e (expected under 0.8x at the same rows read)", B,
                 e[0], B / G, e[1]);
    if (!(e[2] < e[0]))
        fail_msg("per-head at the full budget %zu: error %.3e, shared %.3e (expected under 1x)", B, e[2], e[0]);
    kst_kvc_free(c);
    free(K);
    free(V);
    free(cen);
    free(Q);
}

/* 5. The switches: (a) KESTREL_KV_TSHARE=0 (set before kst_kvc_set_tail_share(c, 1)) turns the
 * shared sample off: the step is the per-head estimator (and differs from the shared one, which
 * the same cache gives once the call is repeated without the environment); KESTREL_KV_TSHARE=1
 * turns it on over kst_kvc_set_tail_share(c, 0); (b) G = 1 (2 KV heads, 2 query heads): share on
 * is the per-head path, output identical to share off; (c) tail_samples 0 with share on: no
 * estimate (the static and retrieved keys alone), stats.sampled 0. */
static void test_switches(void **state) {
    (void)state;
    tc_seed(5);
    const size_t d = 32, ncent = 16, n = 1500 + 4 + 64, H = 2, QH = 4;
    float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Q = malloc(4 * QH * d * sizeof *Q), *o1 = malloc(QH * d * sizeof *o1), *o2 = malloc(QH * d * sizeof *o2),
          *Kh = malloc(n * d * sizeof *Kh), *Vh = malloc(n * d * sizeof *Vh);
    mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
    mix_queries(Q, cen, 4, QH, H, d, ncent);
    kst_error err;
    /* (a) the environment */
    {
        kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
        kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 32, 0.5f, 0);
        setenv("KESTREL_KV_TSHARE", "0", 1);
        kst_kvc_set_tail_share(c, 1);
        unsetenv("KESTREL_KV_TSHARE");
        double maxdev = 0;
        for (size_t s = 0; s < 2; s++) {
            check_step(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, o1, "KESTREL_KV_TSHARE=0 over share 1");
            /* on again (no environment): the shared estimator, and a different output */
            kst_kvc_set_tail_share(c, 1);
            check_step_sh(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, UINT32_MAX, o2, "share 1 after KESTREL_KV_TSHARE=0");
            for (size_t i = 0; i < QH * d; i++) {
                double dev = fabs(o1[i] - o2[i]) / (TOL_A + TOL_R * fabs(o2[i]));
                maxdev = dev > maxdev ? dev : maxdev;
            }
            setenv("KESTREL_KV_TSHARE", "0", 1);
            kst_kvc_set_tail_share(c, 1);
            unsetenv("KESTREL_KV_TSHARE");
        }
        print_message("KESTREL_KV_TSHARE=0: per-head output, differing from the shared one by up to %.0f tolerances\n",
                      maxdev);
        if (!(maxdev > 10)) fail_msg("shared and per-head outputs within %.1f tolerances: the switch is not tested", maxdev);
        setenv("KESTREL_KV_TSHARE", "1", 1);
        kst_kvc_set_tail_share(c, 0);
        unsetenv("KESTREL_KV_TSHARE");
        check_step_sh(c, K, V, n, Q + 2 * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, "KESTREL_KV_TSHARE=1 over share 0");
        kst_kvc_free(c);
    }
    /* (b) G = 1: the per-head path */
    {
        kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, H);
        kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 32, 0.5f, 1);
        for (size_t s = 0; s < 3; s++) {
            const float *q = Q + s * QH * d; /* (the first 2 heads' rows) */
            kst_kvc_set_tail_share(c, 1);
            check_step(c, K, V, n, q, 16, 48, 0.5f, o1, "G 1, share 1");
            kst_kvc_set_tail_share(c, 0);
            check_step(c, K, V, n, q, 16, 48, 0.5f, o2, "G 1, share 0");
            if (memcmp(o1, o2, H * d * sizeof *o1) != 0) fail_msg("G 1, step %zu: share 1 and 0 differ", s);
        }
        kst_kvc_free(c);
    }
    /* (c) tail_samples 0: no estimate */
    {
        kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 0, H, QH);
        kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 32, 0.5f, 1);
        assert_non_null(kst_kvc_tail_clusters(c, 0, 0));
        for (size_t s = 0; s < 2; s++) {
            kst_kvc_stats st;
            assert_ok(kst_kvc_attend(c, 0, Q + s * QH * d, 16, 48, o1, &st, &err), &err);
            assert_int_equal(st.sampled, 0);
            for (size_t h = 0; h < QH; h++) {
                double ref[32];
                int64_t pos[16];
                size_t found = 0;
                head_rows(Kh, K, n, H, h / 2, d);
                head_rows(Vh, V, n, H, h / 2, d);
                assert_ok(kst_kvc_search(c, 0, h, Q + (s * QH + h) * d, 16, 48, pos, &found, NULL, &err), &err);
                tsh_ref64(ref, Q + (s * QH + h) * d, Kh, Vh, n, d, 1.0 / sqrt((double)d), 4, 1500, pos, found, NULL, NULL,
                          UINT32_MAX);
                for (size_t j = 0; j < d; j++)
                    if (!(fabs(o1[h * d + j] - ref[j]) <= TOL_A + TOL_R * fabs(ref[j])))
                        fail_msg("tail_samples 0, head %zu, dim %zu: %.7g, retrieved and static keys alone %.7g", h, j,
                                 o1[h * d + j], ref[j]);
            }
        }
        kst_kvc_free(c);
    }
    free(K);
    free(V);
    free(cen);
    free(Q);
    free(o1);
    free(o2);
    free(Kh);
    free(Vh);
}

/* 7. The OpenMP team's size: the shared sample's gather is split in 16 pieces a KV head, taken by
 * any thread, and each head's estimate finished by the thread that runs its search. With 1, 3, 8
 * and 16 threads (one KV head of 8 query heads, then 2 of 4), 3 steps each on one cache: every
 * step the shared estimator (check_step_sh: stats.sampled and every head's output). */
static void test_threads(void **state) {
    (void)state;
    tc_seed(7);
    const size_t n = 1200 + 4 + 64, d = 32, ncent = 16, QH = 8;
    static const int teams[4] = {1, 3, 8, 16};
    int was = omp_get_max_threads();
    for (size_t H = 1; H <= 2; H++) {
        float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V),
              *cen = malloc(H * ncent * d * sizeof *cen), *Q = malloc(12 * QH * d * sizeof *Q);
        mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
        mix_queries(Q, cen, 12, QH, H, d, ncent);
        for (size_t ti = 0; ti < 4; ti++) {
            /* (set before the cache is made: it sizes its per-thread scratch by the team then) */
            omp_set_num_threads(teams[ti]);
            kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
            kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 32, 0.5f, 1);
            for (size_t s = 0; s < 3; s++) {
                char what[96];
                snprintf(what, sizeof what, "%zu KV heads x %zu, %d threads, step %zu", H, QH / H, teams[ti], s);
                check_step_sh(c, K, V, n, Q + (3 * ti + s) * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, what);
            }
            kst_kvc_free(c);
            omp_set_num_threads(was);
        }
        free(K);
        free(V);
        free(cen);
        free(Q);
    }
}

/* 8. Rebuilds, the group search and sharp queries (2 KV heads x 4, d 32, 1,500 indexed keys, the
 * attention-aware index): built with 16 clusters, then rebuilt with 48 (the shared plans' arrays
 * grow) and with 8, steps after each; then opts.group_search 1 (the reference's retrieval by
 * kst_kvc_search_group); queries at the usual scale and x4, x8 (the retrieved keys in samples
 * then hold nearly all of a head's weighted sample sum), budgets 64, 256, 1 and 3, top_k 16 and
 * 48. Every step the shared estimator. */
static void test_rebuild_group_sharp(void **state) {
    (void)state;
    tc_seed(8);
    const size_t n = 1500 + 4 + 64, d = 32, ncent = 16, nq = 32, H = 2, QH = 8;
    float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Qp = malloc(nq * QH * d * sizeof *Qp), *Q = malloc(12 * QH * d * sizeof *Q);
    mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
    mix_queries(Qp, cen, nq, QH, H, d, ncent);
    mix_queries(Q, cen, 12, QH, H, d, ncent);
    for (size_t s = 0; s < 12; s++)
        for (size_t i = 0; i < QH * d; i++) Q[s * QH * d + i] *= (float)(s % 3 == 0 ? 1 : s % 3 == 1 ? 4 : 8);
    memset(&g_cnt, 0, sizeof g_cnt);
    kst_error err;
    size_t steps = 0;
    for (int grp = 0; grp < 2; grp++) {
        kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_ATTN, 64, H, QH);
        o.group_search = grp;
        kst_kvc *c = make_cache(&o, K, V, n, Qp, nq, 16, 0.5f, 1);
        static const size_t Cs[3] = {16, 48, 8};
        for (size_t b = 0; b < 3; b++) {
            if (b) {
                kst_kvc_set_tail_clusters(c, Cs[b], 0.5f);
                assert_ok(kst_kvc_build(c, 0, Qp, nq, &err), &err);
            }
            assert_int_equal(kst_kvc_tail_clusters(c, 0, 1)->C, Cs[b]);
            for (size_t s = 0; s < 4; s++) {
                size_t qi = (4 * b + s) % 12, B = (size_t[]){64, 256, 1, 3}[s], tk = s / 2 ? 48 : 16;
                char what[128];
                snprintf(what, sizeof what, "%s, %zu clusters, query x%d, %zu samples, top_k %zu",
                         grp ? "group search" : "one search a head", Cs[b], qi % 3 == 0 ? 1 : qi % 3 == 1 ? 4 : 8, B, tk);
                kst_kvc_set_tail_samples(c, B);
                check_step_sh(c, K, V, n, Q + qi * QH * d, tk, 2 * tk + 16, 0.5f, UINT32_MAX, NULL, what);
                steps++;
            }
        }
        kst_kvc_free(c);
    }
    print_message("rebuilds, group search, sharp queries: %zu steps; %zu retrieved keys in samples; clusters: %zu plain, "
                  "%zu with retrieved samples and others, %zu whole samples retrieved; %zu heads under 1e-6 of their sum "
                  "left (least remainder 1e%.1f), %zu whose every sample was retrieved\n",
                  steps, g_cnt.insample, g_cnt.plain, g_cnt.touched, g_cnt.emptied, g_cnt.anew, g_cnt.lrem, g_cnt.gone);
    if (!g_cnt.anew) fail_msg("no head whose retrieved sampled keys held all but 1e-6 of its sum");
    free(K);
    free(V);
    free(cen);
    free(Qp);
    free(Q);
}

/* 9. The adaptive budget (opts.widen) with the shared sample: with tail_clusters it does not widen
 * (kv.h: its prediction reads the evenly spaced sample's best rows, which the clustered estimate
 * does not make). A cache (1 KV head x 4, d 32, 1,500 indexed keys, widen 0.01) first steps with
 * the evenly spaced sample (no clusters: these may widen), then is rebuilt with 32 clusters: with
 * the per-head sample and then the shared one, every step has stats.widened 0 and is its
 * estimator (the top_k retrieval). */
static void test_widen_off(void **state) {
    (void)state;
    tc_seed(9);
    const size_t n = 1500 + 4 + 64, d = 32, ncent = 16, H = 1, QH = 4;
    float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Q = malloc(12 * QH * d * sizeof *Q), *out = malloc(QH * d * sizeof *out);
    mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
    mix_queries(Q, cen, 12, QH, H, d, ncent);
    /* the evenly spaced sample's steps sharp (x4), the clustered ones' flat (x0.5) */
    for (size_t i = 0; i < 12 * QH * d; i++) Q[i] *= i < 4 * QH * d ? 4.0f : 0.5f;
    kst_error err;
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 256, H, QH);
    o.widen = 0.01f;
    /* 4 threads (set before the cache is made): which thread's state a head finds depends on the
     * schedule; with 4 the shared steps widened 7-26 searches in every run here (2 threads: most
     * runs; 1: none) */
    int was = omp_get_max_threads();
    omp_set_num_threads(4);
    kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 0, 0.5f, 1);
    assert_null(kst_kvc_tail_clusters(c, 0, 0));
    size_t wid0 = 0;
    for (size_t s = 0; s < 4; s++) {
        kst_kvc_stats st;
        assert_ok(kst_kvc_attend(c, 0, Q + s * QH * d, 16, 48, out, &st, &err), &err);
        wid0 += st.widened;
    }
    kst_kvc_set_tail_clusters(c, 32, 0.5f);
    assert_ok(kst_kvc_build(c, 0, NULL, 0, &err), &err);
    assert_non_null(kst_kvc_tail_clusters(c, 0, 0));
    size_t wid[2] = {0, 0};
    for (int pass = 0; pass < 2; pass++) { /* shared first (right after the evenly spaced steps) */
        int share = !pass;
        kst_kvc_set_tail_share(c, share);
        for (size_t s = 4; s < 8; s++) {
            char what[96];
            snprintf(what, sizeof what, "widen 0.01, clusters, %s sample, step %zu", share ? "shared" : "per-head", s);
            kst_kvc_stats st;
            assert_ok(kst_kvc_attend(c, 0, Q + s * QH * d, 16, 48, out, &st, &err), &err);
            wid[share] += st.widened;
            if (st.widened) continue; /* (reported below) */
            if (share) check_step_sh(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, what);
            else check_step(c, K, V, n, Q + s * QH * d, 16, 48, 0.5f, NULL, what);
        }
    }
    print_message("widen 0.01: %zu searches widened with the evenly spaced sample; with clusters: %zu per-head, %zu "
                  "shared\n",
                  wid0, wid[0], wid[1]);
    kst_kvc_free(c);
    omp_set_num_threads(was);
    if (wid[0] || wid[1])
        fail_msg("with tail_clusters the adaptive budget widened %zu searches (per-head sample) and %zu (shared sample)",
                 wid[0], wid[1]);
    free(K);
    free(V);
    free(cen);
    free(Q);
    free(out);
}

/* 10. Two layers of different sizes (2 KV heads x 4, d 32): layer 0 2,000 indexed keys in 32
 * clusters, layer 1 400 (25 clusters: the shared plans' arrays, kept a KV head across layers, and
 * the threads' counts sized by the larger); steps alternate between them, budgets 128 and 256.
 * Every step the shared estimator of its layer. */
static void test_two_layers(void **state) {
    (void)state;
    tc_seed(10);
    const size_t d = 32, ncent = 16, H = 2, QH = 8, n0 = 2000 + 4 + 64, n1 = 400 + 4 + 64;
    float *K0 = malloc(n0 * H * d * sizeof *K0), *V0 = malloc(n0 * H * d * sizeof *V0),
          *K1 = malloc(n1 * H * d * sizeof *K1), *V1 = malloc(n1 * H * d * sizeof *V1),
          *cen = malloc(H * ncent * d * sizeof *cen), *Q = malloc(6 * QH * d * sizeof *Q);
    mix_data(K0, V0, cen, n0, H, d, ncent, 1.0, 0.5);
    mix_data(K1, V1, cen, n1, H, d, ncent, 1.0, 0.5); /* (new centres: Q near layer 1's) */
    mix_queries(Q, cen, 6, QH, H, d, ncent);
    kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, 128, H, QH);
    o.layers = 2;
    kst_error err;
    kst_kvc *c;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    kst_kvc_set_tail_clusters(c, 32, 0.5f);
    kst_kvc_set_tail_share(c, 1);
    assert_ok(kst_kvc_append(c, 0, K0, V0, n0, &err), &err);
    assert_ok(kst_kvc_append(c, 1, K1, V1, n1, &err), &err);
    assert_ok(kst_kvc_build(c, 0, NULL, 0, &err), &err);
    assert_ok(kst_kvc_build(c, 1, NULL, 0, &err), &err);
    assert_int_equal(kst_kvc_tail_clusters(c, 0, 0)->C, 32);
    assert_int_equal(kst_kvc_tail_clusters(c, 1, 0)->C, 25);
    static const size_t order[6] = {1, 0, 1, 0, 0, 1};
    for (size_t s = 0; s < 6; s++) {
        char what[64];
        g_layer = order[s];
        kst_kvc_set_tail_samples(c, s % 2 ? 256 : 128);
        snprintf(what, sizeof what, "two layers: layer %zu, step %zu", g_layer, s);
        if (g_layer) check_step_sh(c, K1, V1, n1, Q + s * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, what);
        else check_step_sh(c, K0, V0, n0, Q + s * QH * d, 16, 48, 0.5f, UINT32_MAX, NULL, what);
    }
    g_layer = 0;
    kst_kvc_free(c);
    free(K0);
    free(V0);
    free(K1);
    free(V1);
    free(cen);
    free(Q);
}

/* 11. A retrieved key that dominates its head and is its cluster's one sample (weight len_c, ~100):
 * 1 KV head x 4 (d 32, 1,500 indexed keys, 16 clusters, budget 4, top_k 16), head 0's query
 * along the key of a cluster's first member x (the cluster planned: its centroid scores best),
 * x scoring 20, 25, 30 and 35; 8 data seeds, x in clusters 0 .. 3 (the steps where the plan leaves
 * x's cluster out skipped: 100 or so left). Every head's
 * output the shared estimator (all steps run, then failed). The finish takes x's weighted term
 * (~len_c of the head's sampled sum) out of float sums whose rounding is ~|s| eps32 of it: past
 * the 1e-6 that sums the head anew, that noise becomes its estimate, merged with the weight of
 * ~1e-6 len_c (kv_tclust.c, kst_kvtc_group_finish; test_kv_tshare's test_cancellation). */
static void test_dominant_sample(void **state) {
    (void)state;
    const size_t d = 32, ncent = 16, H = 1, QH = 4, n = 1500 + 4 + 64, nidx = 1500, B = 4;
    size_t steps = 0, bad = 0, anew = 0, missed = 0;
    double worst = 0;
    float *K = malloc(n * H * d * sizeof *K), *V = malloc(n * H * d * sizeof *V), *cen = malloc(H * ncent * d * sizeof *cen),
          *Q = malloc(QH * d * sizeof *Q), *out = malloc(QH * d * sizeof *out);
    kst_error err;
    for (uint64_t seed = 100; seed < 108; seed++) {
        tc_seed(seed);
        mix_data(K, V, cen, n, H, d, ncent, 1.0, 0.5);
        mix_queries(Q, cen, 1, QH, H, d, ncent);
        kst_kvc_opts o = tc_base_opts(d, 0, KST_KVC_INDEX_KEYS, B, H, QH);
        kst_kvc *c = make_cache(&o, K, V, n, NULL, 0, 16, 0.5f, 1);
        const kst_kvtc *T = kst_kvc_tail_clusters(c, 0, 0);
        const float scale = kst_kvc_opts_of(c)->scale;
        for (size_t cx = 0; cx < 4; cx++) {
            if (!T->len[cx]) continue;
            uint32_t x = T->mem[cx][0];
            const float *kx = K + (4 + x) * d;
            double kk = 0;
            for (size_t i = 0; i < d; i++) kk += (double)kx[i] * kx[i];
            for (int a = 0; a < 4; a++) {
                double sx = 20 + 5 * a;
                for (size_t i = 0; i < d; i++) Q[i] = (float)(sx / scale * kx[i] / kk);
                kst_kvc_stats st;
                assert_ok(kst_kvc_attend(c, 0, Q, 16, 48, out, &st, &err), &err);
                kst_kvtc_group A = {0};
                float cs[4 * 16];
                kst_kvtc_scores(T, Q, QH, scale, cs);
                assert_ok(kst_kvtc_group_plan(T, &A, cs, QH, 0.5f, B, &err), &err);
                if (!A.ns[cx]) { /* (x not sampled: not this test's case) */
                    kst_kvtc_group_free(&A);
                    continue;
                }
                size_t tot = 0, a0 = g_cnt.anew, nb = 0;
                double dev = 0;
                for (size_t h = 0; h < QH; h++) {
                    int64_t pos[16];
                    size_t found = 0;
                    double ref[32];
                    assert_ok(kst_kvc_search(c, 0, h, Q + h * d, 16, 48, pos, &found, NULL, &err), &err);
                    if (h == 0) {
                        int got = 0;
                        for (size_t i = 0; i < found; i++) got |= pos[i] == (int64_t)(4 + x);
                        missed += !got;
                    }
                    tot += tsh_ref64(ref, Q + h * d, K, V, n, d, scale, 4, nidx, pos, found, T, A.ns, UINT32_MAX);
                    for (size_t j = 0; j < d; j++) {
                        double e = fabs(out[h * d + j] - ref[j]) / (TOL_A + TOL_R * fabs(ref[j]));
                        dev = e > dev ? e : dev;
                        nb += e > 1;
                    }
                }
                if (st.sampled != tot) fail_msg("seed %llu: stats.sampled %zu, the estimator's %zu", (unsigned long long)seed, st.sampled, tot);
                anew += g_cnt.anew > a0;
                if (nb) {
                    if (bad < 6)
                        print_message("seed %llu, x (cluster %zu, 1 of %u keys sampled) scoring %.0f: %zu values off, up to "
                                      "%.2f tolerances%s\n", (unsigned long long)seed, cx, T->len[cx], sx, nb, dev,
                                      g_cnt.anew > a0 ? " (head 0 under 1e-6 of its sum left)" : "");
                    bad++;
                }
                worst = dev > worst ? dev : worst;
                steps++;
                kst_kvtc_group_free(&A);
            }
        }
        kst_kvc_free(c);
    }
    free(K);
    free(V);
    free(cen);
    free(Q);
    free(out);
    print_message("dominant sampled key: %zu steps (%zu with head 0 under 1e-6 of its sum left; x not retrieved in %zu), "
                  "%zu off the float64 estimator, up to %.2f tolerances\n", steps, anew, missed, bad, worst);
    if (anew < 16) fail_msg("only %zu steps left a head under 1e-6 of its sum", anew);
    if (bad) fail_msg("%zu of %zu steps off the shared estimator (up to %.2f tolerances)", bad, steps, worst);
}

/* Each test's wall time (kv_tc_ref.h: printed, the suite runs under the sanitizers in CI too). */
static int t_begin(void **state) {
    (void)state;
    g_layer = 0;
    tc_clock(0);
    return 0;
}
static int t_end(void **state) {
    (void)state;
    tc_clock(1);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_step_equals_estimator, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_budget_covers_all, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_appends, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_shared_vs_per_head, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_switches, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_rebuild_group_sharp, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_two_layers, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_widen_off, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_threads, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_dominant_sample, t_begin, t_end),
        cmocka_unit_test_setup_teardown(test_step_gpu, t_begin, t_end),
    };
    return cmocka_run_group_tests_name("kv_tshare_step", tests, NULL, NULL);
}
