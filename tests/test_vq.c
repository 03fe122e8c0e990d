/* test_vq.c - Distill-VQ (train/vq.c): gradients against PyTorch autograd, the loss falls, the
 * learned centroids and codebooks are what FAISS reads back, and FAISS's search scores are the
 * scores the trainer predicts, with and without OPQ.
 *
 * References: tests/fixtures/vq (PyTorch autograd, float64, fx_vq.py) for the loss and gradients;
 * libfaiss itself (its IndexIVFPQ search and its C-API reads) for the written index. Tolerances:
 * losses 1e-5 relative (float sums against float64); gradients 2e-5 absolute + 1e-4 relative
 * (float accumulation over up to 57 candidates); FAISS scores 1e-4 absolute (FAISS sums q.c and
 * the look-up table terms in another order than q.(c + decode)). */
#include "harness.h"

#include <omp.h>
#include <unistd.h>

#include <faiss/c_api/Index_c.h>

#include "core/gpu.h"
#include "core/mem.h"
#include "core/npy.h"
#include "index/ann.h"
#include "index/faiss_ext.h"
#include "train/teacher.h"
#include "train/vq.h"
#include "train/vq_code.h"
#include "tests/vq_fixture.h"

#define FX "tests/fixtures/vq/"

static kst_npy load(const char *name) { return vq_fixture_load(FX, name); }

/* ---- gradients ------------------------------------------------------------------------------ */

static void test_batch_matches_autograd(void **state) {
    (void)state;
    kst_npy y = load("y"), C = load("C"), B = load("B"), tau = load("tau"), q = load("q"),
            off = load("off"), cand = load("cand"), teacher = load("teacher"),
            assign = load("assign"), sc = load("scalars"), dC = load("dC"), dB = load("dB");
    kst_vq_model m;
    vq_model_from_fixture(&m, &y, &C, &B, &tau);
    const float *s = sc.data;
    size_t nb = off.count - 1, n = y.shape[0];

    /* The IVF assignment is FAISS's IndexFlatIP argmax (numpy's argmax in the fixture). */
    int32_t *a = malloc(n * sizeof *a);
    kst_vq_assign(&m, n, y.data, a);
    assert_memory_equal(a, assign.data, n * sizeof *a);

    size_t offs[8];
    for (size_t i = 0; i <= nb; i++) offs[i] = (size_t)((int64_t *)off.data)[i];
    float *grad = calloc(m.nparams, sizeof(float));
    double li, lp;
    kst_error err;
    assert_ok(kst_vq_batch(&m, nb, q.data, offs, cand.data, teacher.data, n, y.data, a, s[0], s[1],
                           s[2], grad, &li, &lp, &err),
              &err);
    float got[2] = {(float)li, (float)lp}, want[2] = {s[3], s[4]};
    assert_close_f32("loss (ivf, pq)", got, want, 2, 0, 1e-5);
    assert_close_f32("dL/dC", grad, dC.data, dC.count, 2e-5, 1e-4);
    assert_close_f32("dL/dB", grad + C.count, dB.data, dB.count, 2e-5, 1e-4);

    /* Forward only gives the same losses and leaves no gradient behind. */
    double li2, lp2;
    assert_ok(kst_vq_batch(&m, nb, q.data, offs, cand.data, teacher.data, n, y.data, a, s[0], s[1],
                           s[2], NULL, &li2, &lp2, &err),
              &err);
    assert_true(li2 == li && lp2 == lp);

    /* An empty candidate list is refused. */
    size_t bad[3] = {0, 0, 5};
    assert_int_equal(kst_vq_batch(&m, 2, q.data, bad, cand.data, teacher.data, n, y.data, a, 0.1,
                                  1, 1, grad, &li, &lp, &err),
                     KST_ERR_INVALID);
    assert_msg_has(err.msg, "no candidates");

    free(grad);
    free(a);
    free(m.params);
    kst_npy *all[] = {&y, &C, &B, &tau, &q, &off, &cand, &teacher, &assign, &sc, &dC, &dB};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) kst_npy_free(all[i]);
}

/* ---- training and write-back ---------------------------------------------------------------- */

#define SN 1500
#define SD 32

static float *synthetic(size_t n, uint64_t seed) { return vq_synthetic(n, SD, seed); }

static kst_ann *trained(const char *factory, const float *x, int64_t *ids) {
    kst_ann *a = NULL;
    kst_error err;
    assert_ok(kst_ann_create(factory, SD, &a, &err), &err);
    assert_ok(kst_ann_train(a, SN, SD, x, &err), &err);
    assert_ok(kst_ann_add(a, SN, SD, x, ids, &err), &err);
    return a;
}

static void check_written(const char *factory, double score_weight) {
    float *x = synthetic(SN, 11), *q = synthetic(40, 12);
    int64_t *ids = malloc(SN * sizeof *ids);
    for (size_t i = 0; i < SN; i++) ids[i] = 1000 + 3 * (int64_t)i;
    kst_ann *src = trained(factory, x, ids);
    kst_vq_model m, m2;
    kst_error err;
    assert_ok(kst_vq_model_from_index(src, &m, &err), &err);
    assert_ok(kst_vq_model_from_index(src, &m2, &err), &err);
    float *init = malloc(m.nparams * sizeof(float));
    memcpy(init, m.params, m.nparams * sizeof(float));

    kst_vq_opts o = kst_vq_opts_default();
    o.epochs = 3, o.max_queries = 256, o.candidates = 50, o.lr_ivf = o.lr_pq = 2e-3, o.seed = 5;
    o.score_weight = score_weight;
    kst_vq_result r, r2;
    assert_ok(kst_vq_train(&m, SN, x, 0, NULL, NULL, NULL, &o, &r, &err), &err);
    fprintf(stderr, "  %s: loss ivf %.4f -> %.4f, pq %.4f -> %.4f; epochs %.4f %.4f %.4f\n",
            factory, r.loss_init_ivf, r.loss_final_ivf, r.loss_init_pq, r.loss_final_pq,
            r.epoch_loss[0], r.epoch_loss[1], r.epoch_loss[2]);
    /* The loss falls: on the same queries and candidates (the sum, and the PQ student's; the IVF
     * student's alone need not, as documents change lists between epochs), and epoch over epoch. */
    assert_true(r.loss_final_pq < r.loss_init_pq);
    assert_true(r.loss_final_ivf + r.loss_final_pq < r.loss_init_ivf + r.loss_init_pq);
    assert_true(r.epoch_loss[2] < r.epoch_loss[0]);
    assert_true(memcmp(init, m.params, m.nparams * sizeof(float)) != 0);
    /* Determinism: the same seed gives the same parameters, bit for bit. */
    assert_ok(kst_vq_train(&m2, SN, x, 0, NULL, NULL, NULL, &o, &r2, &err), &err);
    assert_memory_equal(m.params, m2.params, m.nparams * sizeof(float));
    /* Query-weighted codes: the metric is stored and the refits lowered e^T W e. */
    assert_true((m.wq != NULL) == (score_weight > 0));
    if (score_weight > 0) {
        fprintf(stderr, "  %s: e^T W e %.5f -> %.5f over %ld refits\n", factory, r.werr_init,
                r.werr_final, r.refits);
        assert_int_equal(r.refits, o.refit_rounds);
        assert_true(r.werr_final < r.werr_init);
        assert_memory_equal(m.wq, m2.wq, (size_t)m.d * m.d * sizeof(float));
    }

    /* Written into FAISS, saved and read back: FAISS holds exactly the learned parameters. */
    kst_ann *w = NULL, *back = NULL;
    assert_ok(kst_vq_write_index(&m, src, SN, x, ids, &w, &err), &err);
    assert_int_equal(kst_ann_count(w), SN);
    char path[] = "/tmp/kst_test_vq_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_ok(kst_ann_write(w, path, &err), &err);
    assert_ok(kst_ann_read(path, KST_ANN_MMAP_NEVER, &back, &err), &err);
    unlink(path);
    FaissIndex *fb = (FaissIndex *)kst_ann_faiss(back);
    float *c = malloc(m.nlist * SD * sizeof(float)), *b = malloc(m.M * m.ksub * m.dsub * sizeof(float));
    assert_int_equal(kst_faiss_ivf_centroids_get(fb, c), 0);
    assert_int_equal(kst_faiss_pq_codebook_get(fb, b), 0);
    assert_memory_equal(c, m.centroids, m.nlist * SD * sizeof(float));
    assert_memory_equal(b, m.codebook, m.M * m.ksub * m.dsub * sizeof(float));
    if (m.rot) {
        float *A = malloc(SD * SD * sizeof(float));
        assert_int_equal(kst_faiss_opq_matrix_get(fb, A), 0);
        assert_memory_equal(A, m.rot, SD * SD * sizeof(float));
        free(A);
    }
    /* The source index is untouched. */
    assert_int_equal(kst_faiss_ivf_centroids_get((FaissIndex *)kst_ann_faiss(src), c), 0);
    assert_memory_equal(c, init, m.nlist * SD * sizeof(float));

    /* FAISS's scores (all lists probed) are the trainer's q.(C[a] + decode(codes)). */
    size_t K = 100, nq = 40;
    float *fs = malloc(nq * K * sizeof(float)), *yq = malloc(nq * SD * sizeof(float)),
          *yx = malloc(SN * SD * sizeof(float)), *rec = malloc(SN * SD * sizeof(float));
    int64_t *fi = malloc(nq * K * sizeof(int64_t));
    int32_t *as = malloc(SN * sizeof(int32_t));
    kst_ann_search_opts so = {(int)m.nlist, 0};
    assert_ok(kst_ann_search(back, (int64_t)nq, SD, q, (int64_t)K, &so, fs, fi, &err), &err);
    kst_vq_rotate(&m, nq, q, yq);
    kst_vq_rotate(&m, SN, x, yx);
    kst_vq_assign(&m, SN, yx, as);
    kst_vq_reconstruct(&m, SN, yx, as, rec, NULL);
    double maxd = 0;
    for (size_t i = 0; i < nq * K; i++) {
        assert_true(fi[i] >= 1000 && (fi[i] - 1000) % 3 == 0);
        size_t row = (size_t)(fi[i] - 1000) / 3;
        float pred = 0;
        for (int j = 0; j < SD; j++) pred += yq[(i / K) * SD + j] * rec[row * SD + j];
        double dd = fabs((double)pred - fs[i]);
        if (dd > maxd) maxd = dd;
    }
    fprintf(stderr, "  %s: FAISS vs trainer scores: max |diff| %.2g over %zu hits\n", factory,
            maxd, nq * K);
    assert_true(maxd < 1e-4);

    free(fs), free(yq), free(yx), free(rec), free(fi), free(as), free(c), free(b), free(init);
    kst_free(r.epoch_loss);
    kst_free(r2.epoch_loss);
    kst_vq_model_free(&m);
    kst_vq_model_free(&m2);
    kst_ann_free(w);
    kst_ann_free(back);
    kst_ann_free(src);
    free(x), free(q), free(ids);
}

static void test_train_ivfpq(void **state) {
    (void)state;
    check_written("IVF16,PQ8", 0.0); /* FAISS's own encoder writes the codes */
}

static void test_train_opq(void **state) {
    (void)state;
    check_written("OPQ8,IVF16,PQ8", 0.0);
}

/* The default: query-weighted codes (train/vq_code.h), stored by kst_faiss_ivf_add_encoded. */
static void test_train_weighted(void **state) {
    (void)state;
    check_written("IVF16,PQ8", 0.5);
    check_written("OPQ8,IVF16,PQ8", 0.5);
}

/* Validation keep-best: with a learning rate far too large the training queries' loss may fall
 * while the held-out queries' rises; then the start is kept, bit for bit, and the reported
 * validation loss is the start's. With a sane rate on the same data an epoch is kept and its
 * validation loss is below the start's. The validation loss is a forward pass, checked against
 * PyTorch in test_batch_matches_autograd. */
static void test_keep_best(void **state) {
    (void)state;
    float *x = synthetic(SN, 11);
    int64_t *ids = malloc(SN * sizeof *ids);
    for (int i = 0; i < SN; i++) ids[i] = i;
    kst_ann *src = NULL;
    kst_error err;
    assert_ok(kst_ann_create("IVF16,PQ8", SD, &src, &err), &err);
    assert_ok(kst_ann_train(src, SN, SD, x, &err), &err);
    kst_vq_model m;
    assert_ok(kst_vq_model_from_index(src, &m, &err), &err);
    float *init = malloc(m.nparams * sizeof(float));
    memcpy(init, m.params, m.nparams * sizeof(float));
    kst_vq_opts o = kst_vq_opts_default();
    o.epochs = 2, o.max_queries = 200, o.candidates = 30, o.seed = 7, o.val_fraction = 0.25;
    o.lr_ivf = o.lr_pq = 3.0; /* every step overshoots: the codebooks leave the data */
    o.lr_backoff = 0;         /* no second chance at smaller rates */
    o.score_weight = 0;       /* the distillation alone (the refit would move the codebooks) */
    kst_vq_result r;
    assert_ok(kst_vq_train(&m, SN, x, 0, NULL, NULL, NULL, &o, &r, &err), &err);
    fprintf(stderr, "  lr 3: validation %.4f -> %.4f, kept epoch %ld; mse %.4f -> %.4f\n",
            r.val_init, r.val_best, r.best_epoch, r.mse_init, r.mse_final);
    assert_int_equal(r.val_queries, 50);
    assert_int_equal(r.best_epoch, 0);
    assert_true(r.val_best == r.val_init);
    assert_memory_equal(m.params, init, m.nparams * sizeof(float));
    kst_free(r.epoch_loss);

    o.lr_ivf = o.lr_pq = 2e-3;
    assert_ok(kst_vq_train(&m, SN, x, 0, NULL, NULL, NULL, &o, &r, &err), &err);
    fprintf(stderr, "  lr 2e-3: validation %.4f -> %.4f, kept epoch %ld\n", r.val_init,
            r.val_best, r.best_epoch);
    assert_true(r.best_epoch >= 1);
    assert_true(r.val_best < r.val_init);
    kst_free(r.epoch_loss);

    /* Backoff: the same overshooting rate, but each worsening epoch is undone and the rates cut
     * tenfold; 3 -> 0.3 -> 0.03 -> 3e-3 reaches a rate that helps within 5 epochs. */
    memcpy(m.params, init, m.nparams * sizeof(float));
    o.lr_ivf = o.lr_pq = 3.0, o.lr_backoff = 0.1, o.epochs = 5;
    assert_ok(kst_vq_train(&m, SN, x, 0, NULL, NULL, NULL, &o, &r, &err), &err);
    fprintf(stderr, "  lr 3 with backoff: validation %.4f -> %.4f, kept epoch %ld, %ld backoffs, "
            "rate x %.0e\n", r.val_init, r.val_best, r.best_epoch, r.backoffs, r.lr_scale);
    assert_true(r.backoffs >= 1);
    assert_true(r.lr_scale < 1.0);
    assert_true(r.best_epoch > 1); /* an epoch after the first backoff was kept */
    assert_true(r.val_best < r.val_init);
    kst_free(r.epoch_loss);
    o.epochs = 2;

    /* The reconstruction anchor alone (no distillation) is k-means's objective: it lowers the
     * reconstruction error FAISS's k-means left (measured on the same document sample). */
    memcpy(m.params, init, m.nparams * sizeof(float));
    o.w_ivf = o.w_pq = 0, o.w_rec = 1, o.val_fraction = 0, o.lr_ivf = o.lr_pq = 1e-3;
    assert_ok(kst_vq_train(&m, SN, x, 0, NULL, NULL, NULL, &o, &r, &err), &err);
    fprintf(stderr, "  anchor only: mse %.5f -> %.5f\n", r.mse_init, r.mse_final);
    assert_true(r.mse_final < r.mse_init);
    kst_free(r.epoch_loss);
    kst_vq_model_free(&m);
    kst_ann_free(src);
    free(init), free(x), free(ids);
}

/* Query-weighted codes and refit against NumPy (vq_fixture.h). */
static void test_code_matches_numpy(void **state) {
    (void)state;
    vq_code_fixture_check(KST_DEV_CPU);
}

static void test_unsupported(void **state) {
    (void)state;
    kst_ann *a = NULL;
    kst_vq_model m;
    kst_error err;
    assert_ok(kst_ann_create("Flat", SD, &a, &err), &err);
    assert_int_equal(kst_vq_model_from_index(a, &m, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "IVF-PQ");
    kst_ann_free(a);
    assert_ok(kst_ann_create("IVF4,PQ8", SD, &a, &err), &err);
    assert_int_equal(kst_vq_model_from_index(a, &m, &err), KST_ERR_MISUSE);
    assert_msg_has(err.msg, "not trained");
    kst_ann_free(a);
    assert_ok(kst_ann_create("IVF4,PQ8x4", SD, &a, &err), &err);
    float *x = synthetic(SN, 3);
    assert_ok(kst_ann_train(a, SN, SD, x, &err), &err);
    assert_int_equal(kst_vq_model_from_index(a, &m, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "8-bit");
    kst_ann_free(a);
    free(x);
}

int main(void) {
    /* One thread: FAISS's OPQ training is a long chain of small OpenMP k-means runs, whose
     * barriers spin for a descheduled partner on a loaded 2-core CI box (minutes instead of
     * seconds); results do not depend on the thread count. */
    omp_set_num_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_matches_autograd),
        cmocka_unit_test(test_train_ivfpq),
        cmocka_unit_test(test_train_opq),
        cmocka_unit_test(test_train_weighted),
        cmocka_unit_test(test_code_matches_numpy),
        cmocka_unit_test(test_keep_best),
        cmocka_unit_test(test_unsupported),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
