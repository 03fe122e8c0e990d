/* test_kv_idle.c - batch appends planned in the engine's idle time (kst_kvc_work, kst_kv_work;
 * index/kv.h): the decode steps still equal float64 full attention where every indexed key is
 * attended; the idle calls really plan and link the batches (the appending calls then plan
 * none); a call stops within one plan of `more` saying no; and after kst_kvc_flush the index is
 * the same (the same keys found, the same keys scored, by every search) whether the batches were
 * planned by the appending calls, by background planner threads or in idle time. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "kv_ref.h"

#include "api/kestrel.h"
#include "core/half.h"
#include "index/kv.h"
#ifdef KST_CUDA
#include "index/kv_cuda.h"
#endif

#define KVH 2
#define QH 4
#define D 32

/* float64 full attention of each query head over the first n tokens of K, V (n, KVH, D). */
static void ref_attn(double *ref, const float *q, const float *K, const float *V, size_t n) {
    double *s = malloc(n * sizeof *s);
    for (size_t h = 0; h < QH; h++) {
        size_t g = h / (QH / KVH);
        double mx = -INFINITY, z = 0;
        for (size_t j = 0; j < n; j++) {
            double a = 0;
            for (size_t i = 0; i < D; i++) a += (double)q[h * D + i] * K[(j * KVH + g) * D + i];
            s[j] = a / sqrt((double)D);
            if (s[j] > mx) mx = s[j];
        }
        for (size_t i = 0; i < D; i++) ref[h * D + i] = 0;
        for (size_t j = 0; j < n; j++) {
            double w = exp(s[j] - mx);
            z += w;
            for (size_t i = 0; i < D; i++) ref[h * D + i] += w * V[(j * KVH + g) * D + i];
        }
        for (size_t i = 0; i < D; i++) ref[h * D + i] /= z;
    }
    free(s);
}

/* more(): yes `left` times, then no (counts its calls). */
typedef struct budget {
    long left, calls;
} budget;
static int more_budget(void *arg) {
    budget *b = arg;
    b->calls++;
    return b->left-- > 0;
}

/* more(): yes until `us` microseconds after the call that set the deadline (an engine's GPU
 * time, as cudaEventQuery would say). */
static double mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e6 * (double)ts.tv_sec + 1e-3 * (double)ts.tv_nsec;
}
static int more_until(void *arg) { return mono_us() < *(double *)arg; }

static void fill(float *a, size_t n, double sd) {
    for (size_t i = 0; i < n; i++) a[i] = (float)(sd * kv_gauss());
}

/* Appends in idle mode, kst_kvc_work between the steps (for `us` microseconds each, 0: until
 * nothing is left): each step against float64 full attention (top_k 10 and a tail sample as large
 * as the index: every indexed key attended once), the lag within 4B, and the counters: with all
 * the time needed (us 0) the idle calls planned and linked every batch (no appending call planned
 * one: a kst_kvc_work that does nothing fails this), a batch linked by the call after its
 * append, in ceil(B / piece) pieces (kst_kvc_set_link_piece; a piece that links the whole batch
 * fails this); with little time, the batches land whoever finishes them (steps between a batch's
 * pieces attend to an index holding part of it). */
static void run_idle(int gpu, size_t B, double us, size_t piece) {
    const size_t n0 = 300, steps = 140, sinks = 4, window = 16, n = n0 + steps;
    float *K = malloc(n * KVH * D * sizeof *K), *V = malloc(n * KVH * D * sizeof *V), *Qp = malloc(n0 * QH * D * sizeof *Qp);
    fill(K, n * KVH * D, 1);
    fill(V, n * KVH * D, 1);
    fill(Qp, n0 * QH * D, 1);
    kst_kvc_opts o = {1, KVH, QH, D, 0, 0, sinks, window, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, gpu, 100000, 0, 1, B, 0, 0};
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    kst_kvc_set_append_idle(c, 1);
    kst_kvc_set_link_piece(c, piece);
    kst_kvc_prof pf;
    memset(&pf, 0, sizeof pf);
    kst_kvc_set_prof(c, &pf);
    assert_ok(kst_kvc_append(c, 0, K, V, n0, &err), &err);
    assert_ok(kst_kvc_build(c, 0, Qp, n0, &err), &err);
    size_t at = n0, landed = 0, last = kst_kvc_indexed(c, 0), planned_sum = 0, max_pend = 0;
    for (size_t s = 0; s < steps; s++) {
        assert_ok(kst_kvc_append(c, 0, K + at * KVH * D, V + at * KVH * D, 1, &err), &err);
        at++;
        size_t pend = kst_kvc_pending(c, 0), idx = kst_kvc_indexed(c, 0);
        assert_int_equal(pend + idx + sinks + window, at);
        if (pend > 4 * B) fail_msg("%zu tokens pending after %zu appended (at most 4B = %zu)", pend, at - n0, 4 * B);
        if (pend > max_pend) max_pend = pend;
        if (idx != last) {
            if (piece == 0 && (idx - last) % B) fail_msg("the index grew by %zu, not a multiple of the batch %zu", idx - last, B);
            landed += idx - last; /* tokens (batches below) */
            last = idx;
        }
        float q[QH * D], out[QH * D];
        double ref[QH * D];
        fill(q, QH * D, 0.5);
        kst_kvc_stats st;
        assert_ok(kst_kvc_attend(c, 0, q, 10, 32, out, &st, &err), &err);
        assert_int_equal(st.exact + st.indexed, at);
        ref_attn(ref, q, K, V, at);
        for (size_t i = 0; i < QH * D; i++)
            if (!(fabs(out[i] - ref[i]) <= 2e-5 + 1e-4 * fabs(ref[i])))
                fail_msg("idle planning (gpu %d, B %zu, %.0f us), %zu tokens (%zu pending), element %zu: %.7g,"
                         " float64 full attention %.7g", gpu, B, us, at, pend, i, out[i], ref[i]);
        /* the GPU's time after the step: the engine lends it */
        double until = mono_us() + us;
        size_t planned = 0;
        assert_ok(kst_kvc_work(c, us > 0 ? more_until : NULL, &until, &planned, &err), &err);
        planned_sum += planned;
        idx = kst_kvc_indexed(c, 0);
        if (idx != last) {
            landed += idx - last;
            last = idx;
        }
    }
    landed /= B; /* whole batches (the last may be partly linked) */
    print_message("idle planning (gpu %d, B %zu, %.0f us, pieces of %zu): %zu batches landed, %zu plans in idle time,"
                  " %zu batches linked there (%zu pieces), %zu by appends (planned: %zu by appends), at most %zu"
                  " pending\n", gpu, B, us, piece, landed, pf.idle_plans, pf.idle_batches, pf.idle_pieces,
                  pf.app_wbatches, pf.app_batches, max_pend);
    if (landed < 3) fail_msg("only %zu batches landed over %zu appended tokens (batch %zu)", landed, steps, B);
    assert_int_equal(pf.idle_plans, planned_sum);
    assert_int_equal(pf.idle_batches + pf.app_wbatches + pf.app_batches, landed);
    if (pf.idle_plans == 0) fail_msg("no plan made in idle time (%zu batches planned by appends)", pf.app_batches);
    /* all the time needed: the idle calls did all the planning and linking (no appending call
     * planned or linked a batch; every landed batch's plans, KVH per token, came from them) */
    if (us == 0 && (pf.app_batches || pf.app_wbatches || pf.idle_batches != landed || pf.idle_plans != landed * B * KVH ||
                    max_pend > B))
        fail_msg("unbounded idle time: %zu of %zu batches linked in it, %zu plans there (%zu wanted), %zu batches"
                 " planned by appends, %zu pending at most", pf.idle_batches, landed, pf.idle_plans, landed * B * KVH,
                 pf.app_batches, max_pend);
    size_t per = piece ? (B + piece - 1) / piece : 1;
    if (us == 0 && pf.idle_pieces != landed * per)
        fail_msg("unbounded idle time, pieces of %zu: %zu pieces linked for %zu batches of %zu (%zu wanted)", piece,
                 pf.idle_pieces, landed, B, landed * per);
    kst_kvc_set_prof(c, NULL);
    kst_kvc_free(c);
    free(K);
    free(V);
    free(Qp);
}

static void test_idle_equals_full_attention(void **state) {
    (void)state;
    run_idle(0, 8, 0, 3);   /* all the idle time needed; batches linked 3 tokens at a time */
    run_idle(0, 8, 0, 0);   /* whole batches (rounds 13-15) */
    run_idle(0, 8, 100, 3); /* 100 us a step: batches may take several steps, appends link some */
    run_idle(0, 3, 30, 2);
    run_idle(0, 8, 30, 0);
#ifdef KST_CUDA
    if (kst_kv_cuda_devices() > 0) {
        run_idle(1, 8, 0, 3);
        run_idle(1, 8, 100, 3);
        run_idle(1, 8, 100, 0);
    }
#endif
}

/* A call stops within one plan of more() saying no: on one thread, more() yes 3 times then no
 * gives exactly 3 plans (asked before each); more() no at once, none, and nothing linked. */
static void test_idle_slices(void **state) {
    (void)state;
    const size_t n0 = 200, sinks = 4, window = 16, B = 8;
    float *K = malloc((n0 + B) * KVH * D * sizeof *K), *V = malloc((n0 + B) * KVH * D * sizeof *V), *Qp = malloc(n0 * QH * D * sizeof *Qp);
    fill(K, (n0 + B) * KVH * D, 1);
    fill(V, (n0 + B) * KVH * D, 1);
    fill(Qp, n0 * QH * D, 1);
    kst_kvc_opts o = {1, KVH, QH, D, 0, 0, sinks, window, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, 0, 0, 0, 0, B, 0, 0};
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    kst_kvc_set_append_idle(c, 1);
    assert_ok(kst_kvc_append(c, 0, K, V, n0, &err), &err);
    assert_ok(kst_kvc_build(c, 0, Qp, n0, &err), &err);
    assert_ok(kst_kvc_append(c, 0, K + n0 * KVH * D, V + n0 * KVH * D, B, &err), &err); /* one batch queued */
    size_t idx0 = kst_kvc_indexed(c, 0), planned = 99;
    assert_int_equal(kst_kvc_pending(c, 0), B);
    budget b = {0, 0};
    assert_ok(kst_kvc_work(c, more_budget, &b, &planned, &err), &err);
    assert_int_equal(planned, 0);
    assert_int_equal(kst_kvc_indexed(c, 0), idx0);
    int nth = omp_get_max_threads();
    omp_set_num_threads(1);
    b.left = 3;
    b.calls = 0;
    assert_ok(kst_kvc_work(c, more_budget, &b, &planned, &err), &err);
    assert_int_equal(planned, 3);
    assert_int_equal(b.calls, 4);
    /* pieces of 3 tokens: the rest of the plans (more() asked before each) and one piece with
     * one more yes; then one piece a yes; every head's index holding the same tokens */
    kst_kvc_set_link_piece(c, 3);
    b.left = (long)(B * KVH - 3) + 1;
    assert_ok(kst_kvc_work(c, more_budget, &b, &planned, &err), &err);
    assert_int_equal(planned, B * KVH - 3);
    assert_int_equal(kst_kvc_indexed(c, 0), idx0 + 3);
    assert_int_equal(kst_kvc_pending(c, 0), B - 3);
    b.left = 1;
    assert_ok(kst_kvc_work(c, more_budget, &b, &planned, &err), &err);
    assert_int_equal(planned, 0);
    assert_int_equal(kst_kvc_indexed(c, 0), idx0 + 6);
    omp_set_num_threads(nth);
    /* the rest of the batch linked in by the next call */
    assert_ok(kst_kvc_work(c, NULL, NULL, &planned, &err), &err);
    assert_int_equal(planned, 0);
    assert_int_equal(kst_kvc_indexed(c, 0), idx0 + B);
    assert_int_equal(kst_kvc_pending(c, 0), 0);
    assert_ok(kst_kvc_work(c, NULL, NULL, &planned, &err), &err); /* nothing left */
    assert_int_equal(planned, 0);
    assert_int_equal(kst_kvc_work(NULL, NULL, NULL, &planned, &err), KST_ERR_MISUSE);
    kst_kvc_free(c);
    free(K);
    free(V);
    free(Qp);
}

/* The same index whoever planned: three caches fed the same tokens (f16, codes: the code-steered
 * insertion from the entry tables), decode steps between the appends; batches planned by the
 * appending calls, by two background planners (time between steps), in idle time (6 slices a
 * step on one thread; none in the last 3B steps, so that the flush finds 2B+ tokens pending). After
 * kst_kvc_flush every search (300 queries x 4 heads, top 10; half along the appended keys)
 * returns the same positions and scores the same number of keys in all three. */
static void test_idle_same_index(void **state) {
    (void)state;
    const size_t n0 = 400, steps = 150, sinks = 4, window = 16, B = 8, n = n0 + steps;
    uint16_t *K = malloc(n * KVH * D * 2), *V = malloc(n * KVH * D * 2);
    float *Qp = malloc(n0 * QH * D * sizeof *Qp);
    for (size_t i = 0; i < n * KVH * D; i++) {
        K[i] = kst_f32_to_f16((float)kv_gauss());
        V[i] = kst_f32_to_f16((float)kv_gauss());
    }
    fill(Qp, n0 * QH * D, 1);
    kst_kvc *c[3];
    kst_error err;
    for (int m = 0; m < 3; m++) {
        kst_kvc_opts o = {1, KVH, QH, D, 1, 0, sinks, window, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, 0, 0, 0, 1, B, 0, 0};
        assert_ok(kst_kvc_create(&o, &c[m], &err), &err);
        kst_kvc_set_append_worker(c[m], m == 1 ? 2 : 0);
        kst_kvc_set_append_idle(c[m], m == 2);
        kst_kvc_set_link_piece(c[m], m == 2 ? 3 : 0); /* the idle cache links 3 tokens at a time */
        kst_kvc_set_spread(c[m], 32, 4);
        assert_ok(kst_kvc_append(c[m], 0, K, V, n0, &err), &err);
        assert_ok(kst_kvc_build(c[m], 0, Qp, n0, &err), &err);
    }
    kst_kvc_prof pf;
    memset(&pf, 0, sizeof pf);
    kst_kvc_set_prof(c[2], &pf);
    size_t differ = 0;
    for (size_t s = 0; s < steps; s++) {
        float q[QH * D], out[3][QH * D];
        fill(q, QH * D, 0.5);
        for (int m = 0; m < 3; m++) {
            assert_ok(kst_kvc_append(c[m], 0, K + (n0 + s) * KVH * D, V + (n0 + s) * KVH * D, 1, &err), &err);
            assert_ok(kst_kvc_attend(c[m], 0, q, 10, 32, out[m], NULL, &err), &err);
        }
        differ += kst_kvc_indexed(c[2], 0) != kst_kvc_indexed(c[0], 0);
        /* six slices a step on one thread (a count, not a time, so the same on a loaded CI box;
         * with a team, thread 0 asks more() while the others plan), so the idle cache lags; none
         * in the last 3B steps: the flush then finds a batch queued and 2B+ more pending */
        budget b = {6, 0};
        int nth = omp_get_max_threads();
        omp_set_num_threads(1);
        if (s + 3 * B < steps) assert_ok(kst_kvc_work(c[2], more_budget, &b, NULL, &err), &err);
        omp_set_num_threads(nth);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    kst_kvc_set_prof(c[2], NULL);
    /* the idle cache really lagged and linked in pieces (else the comparison is that of one
     * path with itself) */
    if (differ == 0 || pf.idle_plans == 0 || pf.idle_pieces <= pf.idle_batches)
        fail_msg("idle cache: indexed count never differed from the inline one (%zu steps), %zu idle plans, %zu"
                 " pieces for %zu batches", differ, pf.idle_plans, pf.idle_pieces, pf.idle_batches);
    for (int m = 0; m < 3; m++) assert_ok(kst_kvc_flush(c[m], 0, &err), &err);
    for (int m = 1; m < 3; m++) assert_int_equal(kst_kvc_indexed(c[m], 0), kst_kvc_indexed(c[0], 0));
    size_t same = 0, total = 0;
    for (size_t t = 0; t < 2 * steps; t++) {
        /* random queries, and queries along the appended keys (their searches pass the new links) */
        float q[D];
        fill(q, D, 1);
        if (t % 2)
            for (size_t i = 0; i < D; i++) q[i] = 3.0f * kst_f16_to_f32(K[((n0 + t / 2) * KVH + t % KVH) * D + i]);
        for (size_t h = 0; h < QH; h++) {
            int64_t pos[3][10];
            size_t found[3], scanned[3];
            for (int m = 0; m < 3; m++)
                assert_ok(kst_kvc_search(c[m], 0, h, q, 10, 32, pos[m], &found[m], &scanned[m], &err), &err);
            for (int m = 1; m < 3; m++) {
                total++;
                if (found[m] != found[0] || scanned[m] != scanned[0] || memcmp(pos[m], pos[0], found[0] * sizeof(int64_t)))
                    fail_msg("query %zu head %zu: cache %d (%s) found %zu scanned %zu, the inline one %zu / %zu", t, h, m,
                             m == 1 ? "planner threads" : "idle time", found[m], scanned[m], found[0], scanned[0]);
                same++;
            }
        }
    }
    print_message("same index: %zu of %zu searches identical; the idle cache lagged in %zu of %zu steps\n", same,
                  total, differ, steps);
    for (int m = 0; m < 3; m++) kst_kvc_free(c[m]);
    free(K);
    free(V);
    free(Qp);
}

/* The public API: opts.append_idle and kst_kv_work (more NULL: everything queued done). */
static void test_kv_work_api(void **state) {
    (void)state;
    const size_t n0 = 200, B = 8, steps = 3 * B;
    kst_kv_opts o = kst_kv_opts_default();
    o.layers = 2;
    o.kv_heads = KVH;
    o.q_heads = QH;
    o.head_dim = D;
    o.window = 16;
    o.append_batch = B;
    o.append_idle = 1;
    kst_kv *kv;
    kst_error err;
    float *K = malloc((n0 + steps) * KVH * D * sizeof *K), *V = malloc((n0 + steps) * KVH * D * sizeof *V), *Qp = malloc(n0 * QH * D * sizeof *Qp);
    fill(K, (n0 + steps) * KVH * D, 1);
    fill(V, (n0 + steps) * KVH * D, 1);
    fill(Qp, n0 * QH * D, 1);
    assert_ok(kst_kv_create(&o, &kv, &err), &err);
    for (size_t l = 0; l < 2; l++) {
        assert_ok(kst_kv_append(kv, l, K, V, n0, &err), &err);
        assert_ok(kst_kv_build(kv, l, Qp, n0, &err), &err);
    }
    size_t idx0 = kst_kv_indexed(kv, 1);
    for (size_t s = 0; s < steps; s++)
        for (size_t l = 0; l < 2; l++)
            assert_ok(kst_kv_append(kv, l, K + (n0 + s) * KVH * D, V + (n0 + s) * KVH * D, 1, &err), &err);
    /* queued, not planned: the appends left it to kst_kv_work (3B pending, within 4B) */
    assert_int_equal(kst_kv_indexed(kv, 1), idx0);
    assert_ok(kst_kv_work(kv, NULL, NULL, &err), &err);
    for (size_t l = 0; l < 2; l++) assert_int_equal(kst_kv_indexed(kv, l), idx0 + steps);
    assert_int_equal(kst_kv_work(NULL, NULL, NULL, &err), KST_ERR_MISUSE);
    kst_kv_free(kv);
    free(K);
    free(V);
    free(Qp);
}

#ifdef KST_CUDA
/* The GPU partial launched through a chain queued in advance by kst_kvc_work (kst_kvc_set_gpu_arm;
 * kv_cuda.h, kst_kvgpu_arm): the same decode steps as launched plainly (off), each equal to
 * float64 full attention (top_k 10, the tail sample the whole index, redrawn as the index grows:
 * a table upload releases the chain), with appends of one token (staged in
 * pinned memory, copied in by the step's first kernel), one append of 40 tokens (more than
 * KST_KVGPU_DMAX: the chain released first) and a kst_kvc_gpu_release midway. Where the device
 * takes stream waits on host memory, steps must have gone through armed chains (a kst_kvgpu_arm
 * that queues nothing fails this); the free with a chain queued must return (two layers, layer
 * 1 used: layer 0's cudaFree would wait for layer 1's queued chain forever, were it not released
 * first). */
static void run_arm(int on, float *outs, size_t steps, size_t *armed) {
    const size_t n0 = 300, sinks = 4, window = 16, B = 8, n = n0 + steps + 40;
    kv_rng = 0x2545f4914f6cdd1dull;
    float *K = malloc(n * KVH * D * sizeof *K), *V = malloc(n * KVH * D * sizeof *V), *Qp = malloc(n0 * QH * D * sizeof *Qp);
    fill(K, n * KVH * D, 1);
    fill(V, n * KVH * D, 1);
    fill(Qp, n0 * QH * D, 1);
    kst_kvc_opts o = {2, KVH, QH, D, 0, 0, sinks, window, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, 1, 100000, 0, 1, B, 0, 0};
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    kst_kvc_set_append_idle(c, 1);
    kst_kvc_set_gpu_arm(c, on);
    kst_kvc_prof pf;
    memset(&pf, 0, sizeof pf);
    kst_kvc_set_prof(c, &pf);
    assert_ok(kst_kvc_append(c, 1, K, V, n0, &err), &err);
    assert_ok(kst_kvc_build(c, 1, Qp, n0, &err), &err);
    size_t at = n0;
    for (size_t s = 0; s < steps; s++) {
        size_t na = s == steps / 3 ? 40 : 1;
        assert_ok(kst_kvc_append(c, 1, K + at * KVH * D, V + at * KVH * D, na, &err), &err);
        at += na;
        float *q = outs + s * 2 * QH * D, *out = q + QH * D;
        double ref[QH * D];
        fill(q, QH * D, 0.5);
        assert_ok(kst_kvc_attend(c, 1, q, 10, 32, out, NULL, &err), &err);
        ref_attn(ref, q, K, V, at);
        for (size_t i = 0; i < QH * D; i++)
            if (!(fabs(out[i] - ref[i]) <= 2e-5 + 1e-4 * fabs(ref[i])))
                fail_msg("armed launch (%d), step %zu (%zu tokens), element %zu: %.7g, float64 full attention %.7g",
                         on, s, at, i, out[i], ref[i]);
        assert_ok(kst_kvc_work(c, NULL, NULL, NULL, &err), &err);
        if (s == steps / 2) assert_ok(kst_kvc_gpu_release(c, &err), &err);
    }
    *armed = pf.gpu_armed;
    kst_kvc_set_prof(c, NULL);
    kst_kvc_free(c); /* (with layer 1's chain queued: layer 0 is freed first) */
    free(K);
    free(V);
    free(Qp);
}

/* tail_q8 staged (KST_KVC_Q8_STAGED) over 4 layers of the same tokens, one appended to each a
 * step, each layer attended in turn with kst_kvc_work after it, arming asked for (on) or not:
 * outs (steps, 4 layers, QH, D); every key sampled, so each head's output is float64 full
 * attention within the 8-bit table's error (relative L2 2e-2 at d 32; a wrong table gives 0.1 and
 * more). */
static void run_arm_staged(int on, float *outs, size_t steps, size_t *armed, size_t *staged) {
    const size_t n0 = 300, sinks = 4, window = 16, B = 8, n = n0 + steps, NL = 4;
    kv_rng = 0x2545f4914f6cdd1dull;
    float *K = malloc(n * KVH * D * sizeof *K), *V = malloc(n * KVH * D * sizeof *V), *Qp = malloc(n0 * QH * D * sizeof *Qp);
    fill(K, n * KVH * D, 1);
    fill(V, n * KVH * D, 1);
    fill(Qp, n0 * QH * D, 1);
    kst_kvc_opts o = {NL, KVH, QH, D, 0, 0, sinks, window, 10, 32, 16, 16, 0, 8, 64, KST_KVC_INDEX_ATTN, 1, 100000, 0, 1, B, 0, 0};
    kst_kvc *c;
    kst_error err;
    assert_ok(kst_kvc_create(&o, &c, &err), &err);
    assert_ok(kst_kvc_set_tail_q8(c, KST_KVC_Q8_STAGED, &err), &err);
    kst_kvc_set_append_idle(c, 1);
    kst_kvc_set_gpu_arm(c, on);
    kst_kvc_prof pf;
    memset(&pf, 0, sizeof pf);
    kst_kvc_set_prof(c, &pf);
    for (size_t l = 0; l < NL; l++) {
        assert_ok(kst_kvc_append(c, l, K, V, n0, &err), &err);
        assert_ok(kst_kvc_build(c, l, Qp, n0, &err), &err);
    }
    *staged = 0;
    for (size_t s = 0; s < steps; s++) {
        float q[QH * D];
        double ref[QH * D];
        fill(q, QH * D, 0.5);
        ref_attn(ref, q, K, V, n0 + s + 1);
        for (size_t l = 0; l < NL; l++) {
            float *out = outs + (s * NL + l) * QH * D;
            kst_kvc_stats st;
            assert_ok(kst_kvc_append(c, l, K + (n0 + s) * KVH * D, V + (n0 + s) * KVH * D, 1, &err), &err);
            assert_ok(kst_kvc_attend(c, l, q, 10, 32, out, &st, &err), &err);
            *staged += st.staged;
            for (size_t h = 0; h < QH; h++)
                if (!(rel_err64(out + h * D, ref + h * D, D) < 2e-2))
                    fail_msg("staged tail (armed %d), step %zu layer %zu head %zu: relative error %.3e", on, s, l, h,
                             rel_err64(out + h * D, ref + h * D, D));
            assert_ok(kst_kvc_work(c, NULL, NULL, NULL, &err), &err);
        }
    }
    *armed = pf.gpu_armed;
    kst_kvc_set_prof(c, NULL);
    kst_kvc_free(c);
    free(K);
    free(V);
    free(Qp);
}

static void test_gpu_arm(void **state) {
    (void)state;
    if (kst_kv_cuda_devices() == 0) skip();
    const size_t steps = 60;
    kst_kvgpu *g;
    kst_error err;
    assert_ok(kst_kvgpu_create(QH, KVH, D, 4, 16, 0, 1.0f, &g, &err), &err);
    int can = kst_kvgpu_can_arm(g);
    kst_kvgpu_free(g);
    float *o0 = malloc(steps * 2 * QH * D * sizeof *o0), *o1 = malloc(steps * 2 * QH * D * sizeof *o1);
    size_t a0, a1;
    run_arm(0, o0, steps, &a0);
    assert_int_equal(a0, 0);
    run_arm(1, o1, steps, &a1);
    for (size_t i = 0; i < steps * 2 * QH * D; i++)
        if (!(fabs(o1[i] - o0[i]) <= 1e-6 + 1e-6 * fabs(o0[i])))
            fail_msg("armed launch: step %zu, %s element %zu: %.9g, launched plainly %.9g", i / (2 * QH * D),
                     i % (2 * QH * D) < QH * D ? "query" : "output", i % (QH * D), o1[i], o0[i]);
    print_message("armed launch: %zu of %zu steps launched through a queued chain (device can arm: %d)\n", a1, steps,
                  can);
    /* every step but the first, the one after the release, a few after the table uploads and
     * the 40-token append: at least half */
    if (can && a1 < steps / 2) fail_msg("%zu of %zu steps armed", a1, steps);
    if (!can) assert_int_equal(a1, 0);
    free(o0);
    free(o1);
    /* the tail staged a layer ahead: arming asked for, none armed (kv_cuda.h: a queued step would
     * hold its slot a layer's cycle), the same outputs (within 1e-5: the GPU's tail items sum a
     * chunk's warps in any order), never stuck; steps found their table in their slot, copied
     * ahead, unless the sample was remade in the step (every key sampled: at each batch of 8) */
    const size_t ss = 24, NL = 4;
    size_t s0, s1;
    o0 = malloc(ss * NL * QH * D * sizeof *o0);
    o1 = malloc(ss * NL * QH * D * sizeof *o1);
    run_arm_staged(0, o0, ss, &a0, &s0);
    assert_int_equal(a0, 0);
    run_arm_staged(1, o1, ss, &a1, &s1);
    double dm = 0;
    for (size_t i = 0; i < ss * NL * QH * D; i++) dm = fabs(o1[i] - o0[i]) > dm ? fabs(o1[i] - o0[i]) : dm;
    print_message("staged tail: %zu of %zu steps armed; %zu and %zu staged ahead; arming asked for against not, max |d| "
                  "%.3g\n", a1, ss * NL, s1, s0, dm);
    assert_true(dm <= 1e-5);
    assert_int_equal(a1, 0);
    if (!(s0 >= ss * NL / 2 && s1 >= ss * NL / 2)) fail_msg("staged tail: %zu and %zu of %zu steps staged", s0, s1, ss * NL);
    free(o0);
    free(o1);
}
#endif

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idle_equals_full_attention),
        cmocka_unit_test(test_idle_slices),
        cmocka_unit_test(test_idle_same_index),
        cmocka_unit_test(test_kv_work_api),
#ifdef KST_CUDA
        cmocka_unit_test(test_gpu_arm),
#endif
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
