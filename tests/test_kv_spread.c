/* test_kv_spread.c - spread attention at a fixed budget (round 17; index/kv.h
 * kst_kvc_set_spread_budget, kst_kv_opts.tail_strata and .tier; kst_kvg_scratch.tier) against
 * float64 references written here from their definitions:
 * - the tail sample stratified by position: the library's output equals the stratified
 *   estimator computed in float64 (strata bounds, systematic positions within each, one ratio per
 *   stratum, sampled keys above the least retrieved attended once), across appends, on the CPU
 *   and (CUDA builds with a device) the GPU path; it differs from the uniform estimator; and on
 *   attention that decays with the distance to the window it is closer to full attention;
 * - the second tier: the search returns its pool's and its tier's keys with their exact scores,
 *   best first, and its k best are no worse than without the tier; attended with every indexed
 *   key sampled, the output is full attention (tier keys are not counted twice); on a head whose
 *   attention is spread over a shoulder of keys it lowers the error. */
#include "harness.h"
#include "kv_ref.h"

#include "api/kestrel.h"
#include "index/kv_graph.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

/* Keys whose attention decays with the distance to the window (a decoder's recency): dimension 0
 * of key t holds 6 exp(-(distance) / 600), the queries weigh it by ~4; the rest noise. */
static void recency_data(float *K, float *V, float *Q, size_t n, size_t nq, size_t d, size_t window) {
    for (size_t i = 0; i < n * d; i++) K[i] = (float)(0.8 * kv_gauss());
    for (size_t i = 0; i < n * d; i++) V[i] = (float)(1.0 + kv_gauss());
    for (size_t t = 0; t < n; t++) {
        double dist = t + window >= n ? 0 : (double)(n - window - t);
        K[t * d] = (float)(6.0 * exp(-dist / 600.0));
    }
    for (size_t s = 0; s < nq; s++)
        for (size_t i = 0; i < d; i++) Q[s * d + i] = (float)(0.8 * kv_gauss()) + (i == 0 ? 4.0f : 0.0f);
}

/* The stratified tail sample (f = 2, 1,536 samples: 3 strata of 4/7, 2/7, 1/7 of the keys):
 * equal to strata_ref64 before and after appends (40 tokens: the sample kept, the new keys in the
 * last stratum; 160 more: drawn anew), with searches that find the top 16 and ones that miss (ef
 * 16: sampled keys above tau), on the CPU and the GPU path; and not the uniform estimator. */
static void test_tail_strata_equals_reference(void **state) {
    (void)state;
    const size_t n0 = 4096, extra = 200, d = 32, sinks = 4, window = 32, ns = 1536, m = 16;
    size_t n = n0 + extra;
    float *K = malloc(n * d * sizeof *K), *V = malloc(n * d * sizeof *V), *Q = malloc(24 * d * sizeof *Q);
    recency_data(K, V, Q, n, 24, d, window + extra);
    kst_error err;
    double maxdiff_uni = 0;
    size_t above = 0;
    for (int gpu = 0; gpu < 2; gpu++) {
#ifdef KST_CUDA
        if (gpu && kst_kv_cuda_devices() == 0) break;
#else
        if (gpu) break;
#endif
        kst_kv_opts o = kst_kv_opts_default();
        o.layers = o.kv_heads = o.q_heads = 1;
        o.head_dim = d;
        o.sinks = sinks;
        o.window = window;
        o.degree = 16;
        o.index = KST_KV_INDEX_KEYS;
        o.tail_samples = ns;
        o.tail_strata = 2;
        o.append_batch = 1;
        o.gpu = gpu;
        kst_kv *kv;
        assert_ok(kst_kv_create(&o, &kv, &err), &err);
        assert_ok(kst_kv_append(kv, 0, K, V, n0, &err), &err);
        assert_ok(kst_kv_build(kv, 0, NULL, 0, &err), &err);
        size_t nd = n0 - sinks - window, at = n0;
        const size_t steps[3] = {0, 40, 160};
        for (int s = 0; s < 3; s++) {
            if (steps[s]) {
                assert_ok(kst_kv_append(kv, 0, K + at * d, V + at * d, steps[s], &err), &err);
                at += steps[s];
            }
            if (s == 2) nd = at - sinks - window;
            for (int qi = 0; qi < 8; qi++) {
                const float *q = Q + (s * 8 + qi) * d;
                float out[32];
                double ref[32], uni[32];
                kst_kv_stats st;
                int64_t rid[16];
                size_t found = 0, ef = qi < 2 ? 256 : 16;
                assert_ok(kst_kv_attend(kv, 0, q, m, ef, out, &st, &err), &err);
                assert_ok(kst_kv_search(kv, 0, 0, q, m, ef, rid, &found, NULL, &err), &err);
                assert_int_equal(found, m);
                size_t na = 0, na_u = 0;
                size_t kept = tail_ref64(ref, q, K, V, at, d, sinks, window, rid, m, nd, ns, 2, &na);
                tail_ref64(uni, q, K, V, at, d, sinks, window, rid, m, nd, ns, 1, &na_u);
                above += na;
                if (st.sampled != kept)
                    fail_msg("strata (%s), %zu appended: %zu sampled, the reference keeps %zu", gpu ? "gpu" : "cpu",
                             at - n0, st.sampled, kept);
                for (size_t j = 0; j < d; j++) {
                    if (!(fabs(out[j] - ref[j]) <= 2e-5 + 1e-4 * fabs(ref[j])))
                        fail_msg("strata (%s), %zu appended, query %d (ef %zu), dim %zu: %.7g, float64 estimator %.7g",
                                 gpu ? "gpu" : "cpu", at - n0, qi, ef, j, out[j], ref[j]);
                    double du = fabs(ref[j] - uni[j]) / (2e-5 + 1e-4 * fabs(uni[j]));
                    maxdiff_uni = du > maxdiff_uni ? du : maxdiff_uni;
                }
            }
        }
        kst_kv_free(kv);
    }
    print_message("strata: the stratified and uniform estimators differ by up to %.0f tolerances\n", maxdiff_uni);
    if (!(maxdiff_uni > 10)) fail_msg("the stratified estimate is the uniform one within %.1f tolerances", maxdiff_uni);
    if (above == 0) fail_msg("no key above tau: the test does not reach the rule");
    free(K);
    free(V);
    free(Q);
}

/* Attention decaying with the distance to the window (the recency_data keys, 16,000 tokens, 2,048
 * samples: 4 strata of 8/15 .. 1/15 of the keys): against float64 full attention the stratified
 * sample's mean error must be under 0.7x the plain uniform sample's, and the uniform sample's
 * with the tail's control variate (opts.tail_cv) under 0.8x; with every key
 * sampled all are full attention (the strata fall back to one sample). */
static void test_tail_strata_recency(void **state) {
    (void)state;
    const size_t n = 16000, d = 32, window = 64, nq = 12;
    float *K = malloc(n * d * sizeof *K), *V = malloc(n * d * sizeof *V), *Q = malloc(nq * d * sizeof *Q);
    recency_data(K, V, Q, n, nq, d, window);
    kst_error err;
    double e[3] = {0, 0, 0};
    for (int st = 0; st < 3; st++) { /* uniform without the control variate, stratified, uniform with it */
        kst_kv_opts o = kst_kv_opts_default();
        o.layers = o.kv_heads = o.q_heads = 1;
        o.head_dim = d;
        o.window = window;
        o.degree = 16;
        o.index = KST_KV_INDEX_KEYS;
        o.tail_strata = st == 1 ? 2.0f : 0;
        o.tail_cv = st == 2;
        kst_kv *kv;
        assert_ok(kst_kv_create(&o, &kv, &err), &err);
        assert_ok(kst_kv_append(kv, 0, K, V, n, &err), &err);
        assert_ok(kst_kv_build(kv, 0, NULL, 0, &err), &err);
        float out[32];
        double ref[32];
        for (size_t s = 0; s < nq; s++) {
            full_attn64(ref, Q + s * d, K, V, n, d, 1.0 / sqrt((double)d));
            assert_ok(kst_kv_set_tail_samples(kv, 2048, &err), &err);
            assert_ok(kst_kv_attend(kv, 0, Q + s * d, 16, 64, out, NULL, &err), &err);
            e[st] += rel_err64(out, ref, d) / nq;
            if (s == 0) {
                kst_kv_stats ss;
                assert_ok(kst_kv_set_tail_samples(kv, n, &err), &err);
                assert_ok(kst_kv_attend(kv, 0, Q + s * d, 16, 64, out, &ss, &err), &err);
                assert_int_equal(ss.sampled, ss.indexed - ss.retrieved);
                for (size_t j = 0; j < d; j++)
                    if (!(fabs(out[j] - ref[j]) <= 2e-5 + 1e-4 * fabs(ref[j])))
                        fail_msg("every key sampled (strata %d), dim %zu: %.7g, full attention %.7g", st, j, out[j], ref[j]);
            }
        }
        kst_kv_free(kv);
    }
    print_message("recency-weighted attention, 2,048 samples: mean rel. error uniform %.3e, stratified %.3e, uniform with "
                  "the control variate %.3e\n", e[0], e[1], e[2]);
    if (!(e[1] < 0.7 * e[0])) fail_msg("stratified %.3e against uniform %.3e (expected under 0.7x)", e[1], e[0]);
    if (!(e[2] < 0.8 * e[0]))
        fail_msg("the control variate: %.3e against %.3e without it (expected under 0.8x)", e[2], e[0]);
    free(K);
    free(V);
    free(Q);
}

/* The second tier of kst_kvg_search_multi (codes, d 64): with tier 128 a search returns up to ef +
 * 128 distinct keys with their exact scores, the first ef best first and no worse than the tier's
 * others, its ef-th best no worse than without the tier. */
static void test_search_tier(void **state) {
    (void)state;
    const size_t n = 4000, d = 64, ef = 64, tier = 128;
    float *K = malloc(n * d * sizeof *K), *Q = malloc(8 * d * sizeof *Q);
    for (size_t i = 0; i < n * d; i++) K[i] = (float)kv_gauss();
    for (size_t i = 0; i < 8 * d; i++) Q[i] = (float)kv_gauss();
    kst_kvg g = {0};
    kst_error err;
    assert_ok(kst_kvg_init(&g, 16, 16, 64, &err), &err);
    g.codes_on = 1;
    assert_ok(kst_kvg_build_keys(&g, K, 0, n, d, &err), &err);
    if (!g.codes) {
        kst_kvg_free(&g);
        free(K);
        free(Q);
        skip();
    }
    kst_kvg_scratch s = {0}, *sp = &s;
    uint32_t ids[64 + 128], ids0[64];
    float sc[64 + 128], sc0[64];
    size_t found, found0, more = 0;
    for (size_t qi = 0; qi < 8; qi++) {
        const float *q = Q + qi * d;
        s.tier = 0;
        assert_ok(kst_kvg_search_multi(&g, K, 0, d, q, 1, ef, ef, 0, 1, &sp, ids0, sc0, &found0), &err);
        s.tier = tier;
        assert_ok(kst_kvg_search_multi(&g, K, 0, d, q, 1, ef + tier, ef, 0, 1, &sp, ids, sc, &found), &err);
        assert_int_equal(found0, ef);
        if (!(found > ef && found <= ef + tier)) fail_msg("query %zu: %zu found with the tier (ef %zu)", qi, found, ef);
        more += found - ef;
        for (size_t i = 0; i < found; i++) {
            double a = 0;
            for (size_t j = 0; j < d; j++) a += (double)q[j] * K[ids[i] * d + j];
            if (!(fabs(a - sc[i]) <= 1e-4 * (1 + fabs(a)))) fail_msg("query %zu, result %zu: score %.6g, exact %.6g", qi, i, sc[i], a);
            /* the first ef best first, the tier's others after them in no order */
            if (i && !(sc[i] <= sc[i < ef ? i - 1 : ef - 1])) fail_msg("query %zu: results %zu, %zu not in order", qi, i - 1, i);
            for (size_t j = 0; j < i; j++)
                if (ids[j] == ids[i]) fail_msg("query %zu: key %u returned twice", qi, ids[i]);
        }
        if (!(sc[ef - 1] >= sc0[ef - 1])) fail_msg("query %zu: the %zu-th best %.6g with the tier, %.6g without", qi, ef, sc[ef - 1], sc0[ef - 1]);
    }
    print_message("second tier: %zu keys beyond the pool over 8 searches\n", more);
    kst_kvg_scratch_free(&s);
    kst_kvg_free(&g);
    free(K);
    free(Q);
}

/* The second tier in the decode step (d 64, codes on, the attention-aware index; top_k 16, ef 64,
 * tier 256): one query head spread over a shoulder of 600 keys, one concentrated. Every indexed
 * key sampled: full attention for both (the tier's keys are taken out of the sample), on the CPU
 * and the GPU path; 64 samples: the spread head's error with the tier under 0.7x the one
 * without; more keys attended than ef. */
static void test_tier_attend(void **state) {
    (void)state;
    const size_t n = 6000, d = 64, nq = 4, np = 64, sinks = 4, window = 32;
    float *K = malloc(n * d * sizeof *K), *V = malloc(n * d * sizeof *V), *Q = malloc((nq + np) * 2 * d * sizeof *Q);
    for (size_t i = 0; i < n * d; i++) K[i] = (float)(0.3 * kv_gauss());
    for (size_t i = 0; i < n * d; i++) V[i] = (float)(1.0 + kv_gauss());
    for (size_t t = sinks; t < n - window; t++) K[t * d + 1] += (t - sinks) % 9 == 4 && t < sinks + 9 * 600 ? 2.0f : -2.0f;
    for (size_t j = 0; j < 8; j++) K[(100 + 700 * j) * d] += 8.0f;
    for (size_t s = 0; s < nq + np; s++)
        for (size_t i = 0; i < 2 * d; i++)
            Q[s * 2 * d + i] = (float)(0.2 * kv_gauss()) + (i == 0 ? 12.0f : i == d + 1 ? 16.0f : 0.0f);
    kst_error err;
    double e[2] = {0, 0};
    size_t att[2] = {0, 0};
    for (int run = 0; run < 4; run++) {
        int ti = run & 1, gpu = run >> 1;
#ifdef KST_CUDA
        if (gpu && kst_kv_cuda_devices() == 0) break;
#else
        if (gpu) break;
#endif
        kst_kv_opts o = kst_kv_opts_default();
        o.layers = o.kv_heads = 1;
        o.q_heads = 2;
        o.head_dim = d;
        o.sinks = sinks;
        o.window = window;
        o.degree = 16;
        o.top_k = 16;
        o.ef = 64;
        o.gpu = gpu;
        o.tier = ti ? 256 : 0;
        kst_kv *kv;
        assert_ok(kst_kv_create(&o, &kv, &err), &err);
        assert_ok(kst_kv_append(kv, 0, K, V, n, &err), &err);
        assert_ok(kst_kv_build(kv, 0, Q + nq * 2 * d, np, &err), &err);
        float out[2 * 64];
        double ref[64];
        for (size_t s = 0; s < nq; s++) {
            const float *q = Q + s * 2 * d;
            kst_kv_stats st;
            assert_ok(kst_kv_set_tail_samples(kv, 64, &err), &err);
            assert_ok(kst_kv_attend(kv, 0, q, 0, 0, out, &st, &err), &err);
            full_attn64(ref, q + d, K, V, n, d, 1.0 / sqrt((double)d));
            if (!gpu) {
                att[ti] += st.retrieved;
                e[ti] += rel_err64(out + d, ref, d) / nq;
            }
            assert_ok(kst_kv_set_tail_samples(kv, n, &err), &err);
            assert_ok(kst_kv_attend(kv, 0, q, 0, 0, out, &st, &err), &err);
            assert_int_equal(st.sampled + st.retrieved, 2 * st.indexed);
            for (size_t g = 0; g < 2; g++) {
                full_attn64(ref, q + g * d, K, V, n, d, 1.0 / sqrt((double)d));
                for (size_t j = 0; j < d; j++)
                    if (!(fabs(out[g * d + j] - ref[j]) <= 2e-5 + 1e-4 * fabs(ref[j])))
                        fail_msg("every key sampled (%s), tier %d, step %zu, head %zu, dim %zu: %.7g, full attention %.7g",
                                 gpu ? "gpu" : "cpu", ti ? 256 : 0, s, g, j, out[g * d + j], ref[j]);
            }
        }
        kst_kv_free(kv);
    }
    print_message("second tier: spread head rel. error %.3e -> %.3e; keys attended %zu -> %zu\n", e[0], e[1], att[0], att[1]);
    assert_int_equal(att[0], nq * 2 * 16);
    if (!(att[1] > nq * 2 * 64)) fail_msg("with the tier %zu keys attended over %zu steps (expected over ef per head)", att[1], nq);
    if (!(e[1] < 0.7 * e[0])) fail_msg("spread head: %.3e with the tier, %.3e without (expected under 0.7x)", e[1], e[0]);
    free(K);
    free(V);
    free(Q);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tail_strata_equals_reference),
        cmocka_unit_test(test_tail_strata_recency),
        cmocka_unit_test(test_search_tier),
        cmocka_unit_test(test_tier_attend),
    };
    return cmocka_run_group_tests_name("kv_spread", tests, NULL, NULL);
}
