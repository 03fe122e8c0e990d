/* test_cross_train.c - cross-encoder training against PyTorch autograd: one SGD step with lr 1 and
 * no dropout through kst_train_cross must move every weight by minus PyTorch's gradient of the
 * same loss (tests/fixtures/grad/cross_*, written by fx_cross_grad.py), for BCE on pairs and
 * Margin-MSE on teacher scores (BERT: pooler tanh, token types) and cross-entropy on triples
 * (DistilBERT: pre_classifier ReLU). Also the data readers' errors. */
#include "harness.h"

#include <float.h>
#include <unistd.h>

#include "core/mem.h"
#include "core/npy.h"
#include "encoders/safetensors.h"
#include "train/cross.h"

#define GRAD "tests/fixtures/grad"

static char tmpdir[64];

static int setup(void **state) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kst_cross_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static float *tensor_f32(const kst_safetensors *st, const char *name, size_t *n) {
    const kst_st_tensor *t = kst_safetensors_find(st, name);
    if (!t) fail_msg("%s: no tensor \"%s\"", st->path, name);
    float *v = malloc(t->count * sizeof(float));
    kst_error err;
    assert_ok(kst_st_tensor_to_f32(st, t, t->ndim, t->shape, v, &err), &err);
    *n = t->count;
    return v;
}

/* Runs one SGD step (lr 1, batch = the whole file, file order, dropout 0) and compares
 * before - after with the fixture's gradients, tensor by tensor. */
static void sgd_step_parity(const char *name, const char *model, kst_cross_data data) {
    char dir[256], path[1024], out[512], **names, **args;
    kst_error err;
    snprintf(dir, sizeof dir, GRAD "/%s", name);
    snprintf(path, sizeof path, "%s/args.txt", dir);
    size_t na = read_lines(path, &args);
    assert_int_equal(na, 1);
    kst_cross_opts o = kst_cross_opts_default();
    snprintf(path, sizeof path, "%s/data.tsv", dir);
    snprintf(out, sizeof out, "%s/%s", tmpdir, name);
    o.train.model_dir = model;
    o.train.out_dir = out;
    o.train.teacher_path = path;
    o.train.sgd = 1;
    o.train.lr = 1;
    o.train.steps = 1;
    o.train.batch_size = 4;
    o.train.dropout = 0;
    o.train.no_shuffle = 1;
    o.train.quiet = 1;
    o.data = data;
    o.max_len = (size_t)atoi(args[0]);
    free_lines(args, na);
    kst_train_result r;
    assert_ok(kst_train_cross(&o, &r, &err), &err);
    assert_int_equal(r.steps, 1);
    kst_npy want;
    snprintf(path, sizeof path, "%s/loss.npy", dir);
    assert_ok(kst_npy_read(path, &want, &err), &err);
    float loss = (float)r.last_loss;
    printf("  %s: loss C %.7f torch %.7f\n", name, loss, ((float *)want.data)[0]);
    assert_close_f32("loss", &loss, want.data, 1, 0, 1e-5);
    kst_npy_free(&want);

    kst_safetensors a = {0}, b = {0};
    snprintf(path, sizeof path, "%s/model.safetensors", model);
    assert_ok(kst_safetensors_open(path, &a, &err), &err);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    assert_ok(kst_safetensors_open(path, &b, &err), &err);
    kst_npy wids;
    snprintf(path, sizeof path, "%s/word_ids.npy", dir);
    assert_ok(kst_npy_read(path, &wids, &err), &err);
    snprintf(path, sizeof path, "%s/names.txt", dir);
    size_t nn = read_lines(path, &names);
    assert_true(nn > 30);
    double worst = 0;
    for (size_t i = 0; i < nn; i++) {
        size_t n0, n1;
        float *p0 = tensor_f32(&a, names[i], &n0), *p1 = tensor_f32(&b, names[i], &n1);
        assert_int_equal(n0, n1);
        float *delta = malloc(n0 * sizeof(float));
        for (size_t k = 0; k < n0; k++) delta[k] = p0[k] - p1[k];
        snprintf(path, sizeof path, "%s/%s.npy", dir, names[i]);
        kst_npy g;
        assert_ok(kst_npy_read(path, &g, &err), &err);
        const float *d = delta, *w = g.data;
        float *sel = NULL, *psel = NULL;
        const float *pin = p0;
        size_t n = n0;
        if (strstr(names[i], "word_embeddings")) {
            /* Only the rows of ids in the batch have a gradient: every other row is untouched. */
            size_t C = n0 / 30522, nr = wids.count;
            const int64_t *ids = wids.data;
            sel = malloc(nr * C * sizeof(float));
            psel = malloc(nr * C * sizeof(float));
            unsigned char *used = calloc(30522, 1);
            for (size_t row = 0; row < nr; row++) {
                memcpy(sel + row * C, delta + (size_t)ids[row] * C, C * sizeof(float));
                memcpy(psel + row * C, p0 + (size_t)ids[row] * C, C * sizeof(float));
                used[ids[row]] = 1;
            }
            for (size_t v = 0; v < 30522; v++)
                if (!used[v])
                    for (size_t k = 0; k < C; k++)
                        if (delta[v * C + k] != 0.0f) fail_msg("%s: row %zu moved without a gradient", names[i], v);
            free(used);
            d = sel, pin = psel, n = nr * C;
        }
        assert_int_equal(g.count, n);
        double num = 0, den = 0, pn = 0;
        for (size_t k = 0; k < n; k++) {
            num += ((double)d[k] - w[k]) * ((double)d[k] - w[k]);
            den += (double)w[k] * w[k];
            pn += (double)pin[k] * pin[k];
        }
        /* The bound is 1e-3 relative per tensor. before - after carries the rounding of the
         * two float32 weights (at most one ulp of |p| each), so a tensor whose gradient is tiny
         * next to its weights (the key bias's is exactly 0) is allowed that much on top. */
        double rel = sqrt(num) / (sqrt(den) + 1e-30), slack = 2.0 * FLT_EPSILON * sqrt(pn);
        printf("    %-52s n %6zu  rel %.2e  |g| %.2e\n", names[i], n, rel, sqrt(den));
        /* Tensors whose true gradient is exactly 0 (the key bias: softmax ignores a shift common
         * to a row; the classifier bias under a loss of logit differences) hold rounding noise
         * (~1e-8) on both sides: held to 1e-6 absolute, as test_backward does. */
        int zero = sqrt(den) < 1e-6;
        double bound = zero ? 1e-6 + slack : 1e-3 * sqrt(den) + slack;
        if (sqrt(num) > bound) assert_close_f32(names[i], d, w, n, 0, 0);
        if (!zero && sqrt(den) > 100 * slack && rel > worst) worst = rel;
        free(sel), free(psel), free(delta), free(p0), free(p1);
        kst_npy_free(&g);
    }
    printf("  %s: %zu tensors, worst rel %.2e\n", name, nn, worst);
    free_lines(names, nn);
    kst_npy_free(&wids);
    kst_safetensors_close(&a);
    kst_safetensors_close(&b);
}

static void test_bert_pairs_bce(void **state) {
    sgd_step_parity("cross_bert_pairs", "tests/fixtures/models/cross_bert", KST_CROSS_PAIRS);
}
static void test_bert_teacher_margin_mse(void **state) {
    sgd_step_parity("cross_bert_teacher", "tests/fixtures/models/cross_bert", KST_CROSS_TEACHER);
}
static void test_distilbert_triples_ce(void **state) {
    sgd_step_parity("cross_distilbert", GRAD "/cross_distilbert/model", KST_CROSS_TRIPLES);
}

/* ------------------------------------------------------------------------------------------ */
/* data errors */

static void expect_load_error(const char *text, int triple, const char *needle) {
    char path[256];
    snprintf(path, sizeof path, "%s/bad.tsv", tmpdir);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
    kst_cross_example *ex = NULL;
    char *buf = NULL;
    size_t n = 0;
    kst_error err;
    int rc = kst_cross_examples_load(path, triple, &ex, &n, &buf, &err);
    assert_int_equal(rc, KST_ERR_FORMAT);
    assert_msg_has(err.msg, needle);
    assert_null(ex);
}

static void test_data_errors(void **state) {
    expect_load_error("q\tp\t1\nq\tp\n", 0, "line 2: 2 columns, expected 3");
    expect_load_error("q\tp\t1.5\n", 0, "line 1: label \"1.5\" is not a number in [0, 1]");
    expect_load_error("q\tp\tnan\n", 0, "is not a number");
    expect_load_error("q\tp\tn\textra\n", 1, "4 columns");
    expect_load_error("q\t\tn\n", 1, "column 2 is empty");
    expect_load_error("\n  \n", 0, "has no training rows");
    /* good rows, blank lines skipped, CRLF */
    char path[256];
    snprintf(path, sizeof path, "%s/good.tsv", tmpdir);
    FILE *f = fopen(path, "w");
    fputs("a\tb\t0.5\r\n\nc\td\t1\n", f);
    fclose(f);
    kst_cross_example *ex = NULL;
    char *buf = NULL;
    size_t n = 0;
    kst_error err;
    assert_ok(kst_cross_examples_load(path, 0, &ex, &n, &buf, &err), &err);
    assert_int_equal(n, 2);
    assert_true(ex[0].label == 0.5f && ex[1].label == 1.0f);
    assert_true(ex[1].alen == 1 && ex[1].a[0] == 'c' && ex[1].blen == 1 && ex[1].b[0] == 'd');
    kst_free(ex);
    kst_free(buf);
}

static void test_wrong_models(void **state) {
    kst_cross_opts o = kst_cross_opts_default();
    char out[256];
    snprintf(out, sizeof out, "%s/x", tmpdir);
    o.train.model_dir = "tests/fixtures/models/cross_distilbert"; /* 2 labels */
    o.train.out_dir = out;
    o.train.teacher_path = GRAD "/cross_bert_pairs/data.tsv";
    o.train.quiet = 1;
    kst_train_result r;
    kst_error err;
    assert_int_equal(kst_train_cross(&o, &r, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "num_labels is 2");
    o.train.model_dir = "tests/fixtures/models/st_bert_mean";
    assert_int_equal(kst_train_cross(&o, &r, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "not a cross-encoder");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bert_pairs_bce),
        cmocka_unit_test(test_bert_teacher_margin_mse),
        cmocka_unit_test(test_distilbert_triples_ce),
        cmocka_unit_test(test_data_errors),
        cmocka_unit_test(test_wrong_models),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
