/* test_vq_gpu.c - Distill-VQ on the GPU (train/vq_gpu.h) against the references the CPU trainer is
 * held to, and against the CPU trainer itself:
 *   - one batch's losses and gradients against PyTorch autograd (tests/fixtures/vq, fx_vq.py),
 *     with the CPU test's tolerances (losses 1e-5 relative; gradients 2e-5 absolute + 1e-4
 *     relative: float sums in another order, and atomics where candidates share a centroid);
 *   - the query-weighted codes and the refit against the NumPy reference (tests/fixtures/vq_code,
 *     fx_vq_code.py): the codes exactly (the same float formulas decide, no near ties in the
 *     fixture: test_vq.c holds the CPU to the same), the refit codebooks within 1e-4 (the CPU
 *     test's: float32 products, the small solves in double) and e^T W e within 1e-5 relative;
 *   - a whole kst_vq_train + write-back on the GPU against the CPU run from the same start
 *     (label-free, IVF-PQ and OPQ): the same kept epoch, the final losses within 2% relative and
 *     the recall@10 of the written index (of the exact top-10 of held-out queries) within 0.03.
 *     Trajectories may part where a document's arg-max list or code flips on a float rounding,
 *     which is why these are closeness checks, not equality.
 * Built in every build: without `make CUDA=1` or a GPU the GPU tests skip with the reason, and
 * asking for the GPU must fail with a clear error (checked). */
#include "harness.h"

#include <omp.h>

#include "core/gpu.h"
#include "core/mem.h"
#include "core/npy.h"
#include "index/ann.h"
#include "train/vq.h"
#include "train/vq_code.h"
#include "train/vq_gpu.h"
#include "tests/vq_fixture.h"

#include "gpu_setup.h"

#define NEED_GPU()                                                  \
    do {                                                            \
        if (!g_have_gpu) skip_because("no GPU: %s", g_why);         \
    } while (0)

static int setup(void **s) {
    (void)s;
    gpu_setup();
    return 0;
}

/* ---- one batch against autograd ---------------------------------------------------------- */

static void test_batch_matches_autograd(void **state) {
    (void)state;
    NEED_GPU();
    const char *dir = "tests/fixtures/vq/";
    kst_npy y = vq_fixture_load(dir, "y"), C = vq_fixture_load(dir, "C"),
            B = vq_fixture_load(dir, "B"), tau = vq_fixture_load(dir, "tau"),
            q = vq_fixture_load(dir, "q"), off = vq_fixture_load(dir, "off"),
            cand = vq_fixture_load(dir, "cand"), teacher = vq_fixture_load(dir, "teacher"),
            assign = vq_fixture_load(dir, "assign"), sc = vq_fixture_load(dir, "scalars"),
            dC = vq_fixture_load(dir, "dC"), dB = vq_fixture_load(dir, "dB");
    kst_vq_model m;
    vq_model_from_fixture(&m, &y, &C, &B, &tau);
    const float *s = sc.data;
    size_t nb = off.count - 1, n = y.shape[0];
    size_t offs[8];
    for (size_t i = 0; i <= nb; i++) offs[i] = (size_t)((int64_t *)off.data)[i];
    kst_vq_gpu *g = NULL;
    kst_error err;
    assert_ok(kst_vq_gpu_create(&m, n, y.data, nb, offs[nb], &g, &err), &err);
    int32_t *a = malloc(n * sizeof *a);
    assert_ok(kst_vq_gpu_assign(g, a, &err), &err);
    assert_memory_equal(a, assign.data, n * sizeof *a);

    double li, lp;
    assert_ok(kst_vq_gpu_batch(g, nb, q.data, offs, cand.data, teacher.data, s[0], s[1], s[2], 1,
                               &li, &lp, &err),
              &err);
    float *grad = malloc(m.nparams * sizeof(float));
    assert_ok(kst_vq_gpu_get_grad(g, grad, &err), &err);
    float got[2] = {(float)li, (float)lp}, want[2] = {s[3], s[4]};
    fprintf(stderr, "  GPU loss ivf %.7f pq %.7f (autograd %.7f %.7f)\n", li, lp, s[3], s[4]);
    assert_close_f32("loss (ivf, pq)", got, want, 2, 0, 1e-5);
    assert_close_f32("dL/dC", grad, dC.data, dC.count, 2e-5, 1e-4);
    assert_close_f32("dL/dB", grad + C.count, dB.data, dB.count, 2e-5, 1e-4);

    /* Forward only: the same losses, and the gradient is left as it was. */
    double li2, lp2;
    assert_ok(kst_vq_gpu_batch(g, nb, q.data, offs, cand.data, teacher.data, s[0], s[1], s[2], 0,
                               &li2, &lp2, &err),
              &err);
    assert_true(fabs(li2 - li) <= 1e-12 * fabs(li) && fabs(lp2 - lp) <= 1e-12 * fabs(lp));
    float *grad2 = malloc(m.nparams * sizeof(float));
    assert_ok(kst_vq_gpu_get_grad(g, grad2, &err), &err);
    assert_memory_equal(grad, grad2, m.nparams * sizeof(float));

    /* Bad input: an empty candidate list, a candidate out of range. */
    size_t bad[3] = {0, 0, 5};
    assert_int_equal(kst_vq_gpu_batch(g, 2, q.data, bad, cand.data, teacher.data, 0.1, 1, 1, 1,
                                      &li, &lp, &err),
                     KST_ERR_INVALID);
    assert_msg_has(err.msg, "no candidates");
    int64_t far[2] = {0, (int64_t)n};
    size_t o2[2] = {0, 2};
    assert_int_equal(kst_vq_gpu_batch(g, 1, q.data, o2, far, teacher.data, 0.1, 1, 1, 1, &li, &lp,
                                      &err),
                     KST_ERR_INVALID);
    assert_msg_has(err.msg, "out of range");

    kst_vq_gpu_free(g);
    free(grad), free(grad2), free(a), free(m.params);
    kst_npy *all[] = {&y, &C, &B, &tau, &q, &off, &cand, &teacher, &assign, &sc, &dC, &dB};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) kst_npy_free(all[i]);
}

/* ---- query-weighted codes and refit against NumPy ----------------------------------------- */

static void test_code_matches_numpy(void **state) {
    (void)state;
    NEED_GPU();
    vq_code_fixture_check(KST_DEV_CUDA);
}

/* ---- a whole training run: GPU against CPU ------------------------------------------------ */

#define SN 3000
#define SD 32
#define NQ 100

/* Recall@10 of the index's top-10 (all lists probed: what the quantization itself keeps) against
 * the exact top-10 of the queries. */
static double recall10(kst_ann *a, const float *x, const float *q) {
    kst_ann *flat = NULL;
    kst_error err;
    int64_t *ids = malloc(SN * sizeof *ids), *got = malloc(NQ * 10 * sizeof *got),
            *truth = malloc(NQ * 10 * sizeof *truth);
    float *s = malloc(NQ * 10 * sizeof *s);
    for (int i = 0; i < SN; i++) ids[i] = i;
    assert_ok(kst_ann_create("Flat", SD, &flat, &err), &err);
    assert_ok(kst_ann_add(flat, SN, SD, x, ids, &err), &err);
    assert_ok(kst_ann_search(flat, NQ, SD, q, 10, NULL, s, truth, &err), &err);
    kst_ann_search_opts so = {16, 0}; /* every list */
    assert_ok(kst_ann_search(a, NQ, SD, q, 10, &so, s, got, &err), &err);
    size_t hit = 0;
    for (size_t i = 0; i < NQ; i++)
        for (size_t u = 0; u < 10; u++)
            for (size_t v = 0; v < 10; v++) hit += got[i * 10 + u] == truth[i * 10 + v];
    kst_ann_free(flat);
    free(ids), free(got), free(truth), free(s);
    return (double)hit / (NQ * 10.0);
}

static void gpu_vs_cpu(const char *factory) {
    float *x = vq_synthetic(SN, SD, 21), *q = vq_synthetic(NQ, SD, 22);
    int64_t *ids = malloc(SN * sizeof *ids);
    for (int i = 0; i < SN; i++) ids[i] = i;
    kst_ann *src = NULL, *wc = NULL, *wg = NULL;
    kst_error err;
    assert_ok(kst_ann_create(factory, SD, &src, &err), &err);
    assert_ok(kst_ann_train(src, SN, SD, x, &err), &err);
    kst_vq_model mc, mg;
    assert_ok(kst_vq_model_from_index(src, &mc, &err), &err);
    assert_ok(kst_vq_model_from_index(src, &mg, &err), &err);
    kst_vq_opts o = kst_vq_opts_default();
    o.epochs = 3, o.max_queries = 400, o.candidates = 60, o.lr_ivf = o.lr_pq = 2e-3, o.seed = 3;
    kst_vq_result rc, rg;
    assert_ok(kst_vq_train(&mc, SN, x, 0, NULL, NULL, NULL, &o, &rc, &err), &err);
    o.device = KST_DEV_CUDA;
    assert_ok(kst_vq_train(&mg, SN, x, 0, NULL, NULL, NULL, &o, &rg, &err), &err);
    assert_int_equal(mg.device, KST_DEV_CUDA);
    assert_ok(kst_vq_write_index(&mc, src, SN, x, ids, &wc, &err), &err);
    assert_ok(kst_vq_write_index(&mg, src, SN, x, ids, &wg, &err), &err);
    double rcpu = recall10(wc, x, q), rgpu = recall10(wg, x, q);
    double maxd = 0;
    for (size_t i = 0; i < mc.nparams; i++)
        if (fabs(mc.params[i] - mg.params[i]) > maxd) maxd = fabs(mc.params[i] - mg.params[i]);
    fprintf(stderr,
            "  %s: loss pq %.5f -> cpu %.5f gpu %.5f; ivf cpu %.5f gpu %.5f; val cpu %.5f gpu "
            "%.5f (epoch %ld / %ld); e^T W e cpu %.5f gpu %.5f; recall@10 cpu %.3f gpu %.3f; "
            "max |param diff| %.2g; GPU %.1f MiB\n",
            factory, rc.loss_init_pq, rc.loss_final_pq, rg.loss_final_pq, rc.loss_final_ivf,
            rg.loss_final_ivf, rc.val_best, rg.val_best, rc.best_epoch, rg.best_epoch,
            rc.werr_final, rg.werr_final, rcpu, rgpu, maxd, rg.gpu_bytes / 1048576.0);
    assert_true(fabs(rg.loss_init_pq - rc.loss_init_pq) <= 1e-4 * rc.loss_init_pq);
    assert_true(fabs(rg.loss_init_ivf - rc.loss_init_ivf) <= 1e-4 * rc.loss_init_ivf);
    assert_int_equal(rg.best_epoch, rc.best_epoch);
    assert_int_equal(rg.steps, rc.steps);
    assert_true(fabs(rg.loss_final_pq - rc.loss_final_pq) <= 0.02 * rc.loss_final_pq);
    assert_true(fabs(rg.loss_final_ivf - rc.loss_final_ivf) <= 0.02 * rc.loss_final_ivf);
    assert_true(fabs(rg.val_best - rc.val_best) <= 0.02 * rc.val_best);
    assert_true(fabs(rg.werr_final - rc.werr_final) <= 0.02 * rc.werr_final);
    assert_true(rg.loss_final_pq < rg.loss_init_pq);
    assert_true(fabs(rgpu - rcpu) <= 0.03);
    assert_true(rg.gpu_bytes > 0);
    kst_free(rc.epoch_loss), kst_free(rg.epoch_loss);
    kst_vq_model_free(&mc), kst_vq_model_free(&mg);
    kst_ann_free(wc), kst_ann_free(wg), kst_ann_free(src);
    free(x), free(q), free(ids);
}

static void test_train_gpu_vs_cpu(void **state) {
    (void)state;
    NEED_GPU();
    gpu_vs_cpu("IVF16,PQ8");
    gpu_vs_cpu("OPQ8,IVF16,PQ8");
}

/* ---- refusals ------------------------------------------------------------------------------ */

/* Without a GPU (or a CUDA=1 build) the GPU is refused with the reason; with one, what stays on
 * the CPU (the reconstruction anchor) is refused by name. Nothing is trained either way. */
static void test_refusals(void **state) {
    (void)state;
    float *x = vq_synthetic(600, SD, 5);
    kst_ann *src = NULL;
    kst_error err;
    assert_ok(kst_ann_create("IVF8,PQ8", SD, &src, &err), &err);
    assert_ok(kst_ann_train(src, 600, SD, x, &err), &err);
    kst_vq_model m;
    assert_ok(kst_vq_model_from_index(src, &m, &err), &err);
    float *init = malloc(m.nparams * sizeof(float));
    memcpy(init, m.params, m.nparams * sizeof(float));
    kst_vq_opts o = kst_vq_opts_default();
    o.device = KST_DEV_CUDA, o.max_queries = 50, o.candidates = 20;
    kst_vq_result r;
    if (!g_have_gpu) {
        assert_int_equal(kst_vq_train(&m, 600, x, 0, NULL, NULL, NULL, &o, &r, &err),
                         KST_ERR_UNSUPPORTED);
        fprintf(stderr, "  refused: %s\n", err.msg);
        assert_msg_has(err.msg, "device cuda");
    }
    o.w_rec = 1;
    assert_int_equal(kst_vq_train(&m, 600, x, 0, NULL, NULL, NULL, &o, &r, &err),
                     KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "anchor");
    assert_memory_equal(m.params, init, m.nparams * sizeof(float));
    kst_vq_model_free(&m);
    kst_ann_free(src);
    free(x), free(init);
}

int main(void) {
    omp_set_num_threads(1); /* as test_vq.c: FAISS's OPQ training on a loaded 2-core box */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_matches_autograd),
        cmocka_unit_test(test_code_matches_numpy),
        cmocka_unit_test(test_train_gpu_vs_cpu),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
