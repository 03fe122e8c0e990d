/* test_gpu.c - the CUDA backend against the CPU references: exact GPU search against FAISS
 * IndexFlatIP (CPU), and the GPU encoder against the transformers / sentence-transformers
 * outputs committed for the CPU tests (tests/fixtures/models, cosine >= 0.999: bf16 arithmetic).
 *
 * Built in every build; without `make CUDA=1`, or without a CUDA device, the GPU tests skip with
 * the reason (asking for the GPU must then fail with a clear KST_ERR_UNSUPPORTED, checked here).
 * tests/gpu/run_all.sh runs this on a GPU machine, also under compute-sanitizer. */
#include "harness.h"

#include "api/kestrel.h"
#include "core/gpu.h"
#include "core/npy.h"
#include "encoders/bert_gpu.h"
#include "encoders/encoder.h"
#include "index/ann.h"
#include "index/gpu_search.h"

#include "gpu_setup.h"

#define FIX "tests/fixtures/models"

static int setup(void **s) {
    (void)s;
    gpu_setup();
    return 0;
}

#define NEED_GPU()                                                  \
    do {                                                            \
        if (!g_have_gpu) skip_because("no GPU: %s", g_why);         \
    } while (0)

/* xorshift: deterministic data without libc's rand */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}
static float *rand_mat(size_t n, size_t d) {
    float *x = malloc(n * d * sizeof(float));
    for (size_t i = 0; i < n * d; i++) x[i] = frand();
    return x;
}

/* Asking for the GPU where there is none is a clear error, whatever the build. */
static void test_device_errors(void **s) {
    (void)s;
    int dev = -1;
    kst_error err;
    assert_int_equal(kst_device_parse("cuda", &dev, &err), KST_OK);
    assert_int_equal(dev, KST_DEV_CUDA);
    assert_int_equal(kst_device_parse("tpu", &dev, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "expected cpu or cuda");
    printf("build: %s; GPU: %s\n", kst_gpu_built() ? "CUDA=1" : "CPU only", kst_gpu_describe());
    if (g_have_gpu) return;
    kst_model_opts o = kst_model_opts_default();
    o.device = KST_DEVICE_CUDA;
    kst_model *m = NULL;
    assert_int_equal(kst_model_open(FIX "/st_bert_mean", &o, &m, &err), KST_ERR_UNSUPPORTED);
    assert_null(m);
    assert_msg_has(err.msg, "device cuda");
    if (!kst_gpu_built()) assert_msg_has(err.msg, "make CUDA=1");
    kst_gpu_flat *g = NULL;
    assert_int_equal(kst_gpu_flat_create(8, 0, &g, &err), KST_ERR_UNSUPPORTED);
    assert_null(g);
}

/* GPU results against FAISS Flat on the CPU: scores within tol (relative to the row's best), and
 * ids equal wherever the neighbouring scores are not within tol of each other (a near-tie may
 * order either way). Returns the fraction of ids equal. */
static double compare_search(const char *what, const float *gs, const int64_t *gi, const float *cs,
                             const int64_t *ci, size_t nq, size_t k, double tol) {
    size_t same = 0, bad_score = 0, bad_id = 0;
    for (size_t q = 0; q < nq; q++) {
        double scale = fabs(cs[q * k]) > 1 ? fabs(cs[q * k]) : 1;
        for (size_t r = 0; r < k; r++) {
            size_t at = q * k + r;
            if (!(fabs((double)gs[at] - cs[at]) <= tol * scale)) {
                if (bad_score++ < 3)
                    fprintf(stderr, "%s: query %zu rank %zu: GPU score %.7g, FAISS %.7g\n", what, q, r, gs[at], cs[at]);
            }
            if (gi[at] == ci[at]) {
                same++;
                continue;
            }
            int near_tie = (r > 0 && fabs(cs[at] - cs[at - 1]) <= 2 * tol * scale) ||
                           (r + 1 < k && fabs(cs[at] - cs[at + 1]) <= 2 * tol * scale);
            if (!near_tie && bad_id++ < 3)
                fprintf(stderr, "%s: query %zu rank %zu: GPU id %lld, FAISS id %lld (score %.7g)\n", what, q, r,
                        (long long)gi[at], (long long)ci[at], cs[at]);
        }
    }
    if (bad_score) fail_msg("%s: %zu scores differ from FAISS beyond %.1e", what, bad_score, tol);
    if (bad_id) fail_msg("%s: %zu ids differ from FAISS (not at near-ties)", what, bad_id);
    return (double)same / (double)(nq * k);
}

static void flat_case(size_t n, size_t d, size_t nq, size_t k, int fp16) {
    kst_error err;
    float *x = rand_mat(n, d), *q = rand_mat(nq, d);
    int64_t *ids = malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)(1000 + 3 * i);
    kst_ann *a = NULL;
    assert_ok(kst_ann_create("Flat", (int)d, &a, &err), &err);
    assert_ok(kst_ann_add(a, (int64_t)n, (int)d, x, ids, &err), &err);
    float *cs = malloc(nq * k * sizeof(float)), *gs = malloc(nq * k * sizeof(float));
    int64_t *ci = malloc(nq * k * sizeof(int64_t)), *gi = malloc(nq * k * sizeof(int64_t));
    assert_ok(kst_ann_search(a, (int64_t)nq, (int)d, q, (int64_t)k, NULL, cs, ci, &err), &err);
    kst_gpu_flat *g = NULL;
    assert_ok(kst_gpu_flat_create((int)d, fp16, &g, &err), &err);
    /* two adds: the store grows */
    assert_ok(kst_gpu_flat_add(g, (int64_t)(n / 3), x, ids, &err), &err);
    assert_ok(kst_gpu_flat_add(g, (int64_t)(n - n / 3), x + (n / 3) * d, ids + n / 3, &err), &err);
    assert_int_equal(kst_gpu_flat_count(g), n);
    for (size_t i = 0; i < nq * k; i++) gs[i] = NAN, gi[i] = -7;
    assert_ok(kst_gpu_flat_search(g, (int64_t)nq, q, (int64_t)k, gs, gi, &err), &err);
    char what[128];
    snprintf(what, sizeof what, "flat n=%zu d=%zu k=%zu %s", n, d, k, fp16 ? "fp16" : "fp32");
    if (!fp16) {
        double same = compare_search(what, gs, gi, cs, ci, nq, k, 1e-5);
        printf("  %s: %.4f of ids identical to FAISS\n", what, same);
    } else {
        /* half-precision vectors: scores within 2e-3 of the row's scale; recall of FAISS's ids */
        size_t hit = 0, bad = 0;
        for (size_t qq = 0; qq < nq; qq++) {
            double scale = fabs(cs[qq * k]) > 1 ? fabs(cs[qq * k]) : 1;
            for (size_t r = 0; r < k; r++) {
                if (!(fabs((double)gs[qq * k + r] - cs[qq * k + r]) <= 4e-3 * scale)) bad++;
                for (size_t r2 = 0; r2 < k; r2++)
                    if (gi[qq * k + r2] == ci[qq * k + r]) {
                        hit++;
                        break;
                    }
            }
        }
        double recall = (double)hit / (double)(nq * k);
        printf("  %s: recall of FAISS's ids %.4f, %zu scores off by more than 4e-3\n", what, recall, bad);
        if (bad) fail_msg("%s: %zu scores off", what, bad);
        if (recall < 0.97) fail_msg("%s: recall %.4f < 0.97", what, recall);
    }
    kst_gpu_flat_free(g);
    kst_ann_free(a);
    free(x), free(q), free(ids), free(cs), free(gs), free(ci), free(gi);
}

static void test_flat_small(void **s) {
    (void)s;
    NEED_GPU();
    flat_case(2000, 64, 37, 10, 0);    /* survivors fit at once */
    flat_case(3000, 48, 5, 1024, 0);   /* k at its maximum */
    flat_case(5, 16, 3, 8, 0);         /* fewer vectors than k: -1 ids */
}

static void test_flat_large(void **s) {
    (void)s;
    NEED_GPU();
    flat_case(300000, 32, 16, 100, 0); /* histogram passes before the compaction */
    flat_case(100001, 96, 9, 1000, 0); /* odd width of the score matrix */
    flat_case(50000, 64, 20, 50, 1);   /* float16 storage */
}

/* Many equal scores: the k best are the equal ones, lowest positions first (FAISS's order for
 * ties is its heap's; ours is documented in gpu_search.h). */
static void test_flat_ties(void **s) {
    (void)s;
    NEED_GPU();
    size_t n = 20000, d = 8, k = 64;
    float *x = calloc(n * d, sizeof(float)), q[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    for (size_t i = 0; i < n; i++) x[i * d] = (i % 7 == 3) ? 0.5f : 0.25f; /* 2857 rows tie at 0.5 */
    kst_error err;
    kst_gpu_flat *g = NULL;
    assert_ok(kst_gpu_flat_create((int)d, 0, &g, &err), &err);
    assert_ok(kst_gpu_flat_add(g, (int64_t)n, x, NULL, &err), &err);
    float sc[64];
    int64_t id[64];
    assert_ok(kst_gpu_flat_search(g, 1, q, (int64_t)k, sc, id, &err), &err);
    for (size_t r = 0; r < k; r++) {
        assert_float_equal(sc[r], 0.5f, 0);
        assert_int_equal(id[r] % 7, 3);
        if (r) assert_true(id[r] > id[r - 1]);
    }
    /* more ties than the selection keeps in shared memory: still the lowest positions */
    for (size_t i = 0; i < n; i++) x[i * d] = (i % 2 == 1) ? 0.5f : 0.25f;
    kst_gpu_flat_reset(g);
    assert_ok(kst_gpu_flat_add(g, (int64_t)n, x, NULL, &err), &err);
    assert_ok(kst_gpu_flat_search(g, 1, q, (int64_t)k, sc, id, &err), &err);
    for (size_t r = 0; r < k; r++) {
        assert_float_equal(sc[r], 0.5f, 0);
        assert_int_equal(id[r], 2 * r + 1);
    }
    kst_gpu_flat_free(g);
    free(x);
}

/* kst_ann on the GPU: same results as on the CPU, also after removes and adds. */
static void test_ann_device(void **s) {
    (void)s;
    NEED_GPU();
    size_t n = 5000, d = 32, nq = 10, k = 20;
    float *x = rand_mat(n, d), *q = rand_mat(nq, d);
    int64_t *ids = malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)i * 2;
    kst_error err;
    kst_ann *cpu = NULL, *gpu = NULL;
    assert_ok(kst_ann_create("Flat", (int)d, &cpu, &err), &err);
    assert_ok(kst_ann_create("Flat", (int)d, &gpu, &err), &err);
    assert_ok(kst_ann_set_device(gpu, KST_DEV_CUDA, 0, &err), &err);
    assert_true(kst_ann_on_gpu(gpu));
    float cs[200], gs[200];
    int64_t ci[200], gi[200];
    for (int round = 0; round < 3; round++) {
        size_t lo = round == 0 ? 0 : n / 2, cnt = round == 0 ? n / 2 : n / 4;
        if (round == 2) lo = 3 * n / 4;
        assert_ok(kst_ann_add(cpu, (int64_t)cnt, (int)d, x + lo * d, ids + lo, &err), &err);
        assert_ok(kst_ann_add(gpu, (int64_t)cnt, (int)d, x + lo * d, ids + lo, &err), &err);
        if (round == 1) {
            int64_t gone[100];
            for (int i = 0; i < 100; i++) gone[i] = ids[i * 7];
            assert_ok(kst_ann_remove(cpu, 100, gone, NULL, &err), &err);
            assert_ok(kst_ann_remove(gpu, 100, gone, NULL, &err), &err);
        }
        assert_ok(kst_ann_search(cpu, (int64_t)nq, (int)d, q, (int64_t)k, NULL, cs, ci, &err), &err);
        assert_ok(kst_ann_search(gpu, (int64_t)nq, (int)d, q, (int64_t)k, NULL, gs, gi, &err), &err);
        compare_search("kst_ann on the GPU", gs, gi, cs, ci, nq, k, 1e-5);
    }
    /* an IVF index without PQ stays on the CPU, with a note */
    kst_ann *ivf = NULL;
    assert_ok(kst_ann_create("IVF4,Flat", (int)d, &ivf, &err), &err);
    assert_ok(kst_ann_set_device(ivf, KST_DEV_CUDA, 0, &err), &err);
    assert_false(kst_ann_on_gpu(ivf));
    assert_msg_has(kst_ann_note(ivf), "CPU");
    kst_ann_free(ivf);
    kst_ann_free(cpu);
    kst_ann_free(gpu);
    free(x), free(q), free(ids);
}

/* IVF-PQ on the GPU against FAISS's own IVF-PQ search of the same index, at the same nprobe:
 * ids equal (except at near-ties) and recall@10 against the exact neighbours within 0.5 points;
 * again after removes and adds (the GPU copy is rebuilt). */
static void ivfpq_case(const char *factory, size_t n, size_t d, int nprobe) {
    size_t nq = 200, k = 10;
    float *x = rand_mat(n, d), *q = rand_mat(nq, d);
    int64_t *ids = malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)(5 * i + 1);
    kst_error err;
    kst_ann *a = NULL, *flat = NULL;
    assert_ok(kst_ann_create(factory, (int)d, &a, &err), &err);
    assert_ok(kst_ann_train(a, (int64_t)n, (int)d, x, &err), &err);
    assert_ok(kst_ann_create("Flat", (int)d, &flat, &err), &err);
    float *cs = malloc(nq * k * 4), *gs = malloc(nq * k * 4), *es = malloc(nq * k * 4);
    int64_t *ci = malloc(nq * k * 8), *gi = malloc(nq * k * 8), *ei = malloc(nq * k * 8);
    kst_ann_search_opts so = {nprobe, 0};
    for (int round = 0; round < 2; round++) {
        if (round == 0) {
            assert_ok(kst_ann_add(a, (int64_t)(n - 1000), (int)d, x, ids, &err), &err);
            assert_ok(kst_ann_add(flat, (int64_t)(n - 1000), (int)d, x, ids, &err), &err);
        } else {
            int64_t gone[300];
            for (int i = 0; i < 300; i++) gone[i] = ids[i * 11];
            assert_ok(kst_ann_remove(a, 300, gone, NULL, &err), &err);
            assert_ok(kst_ann_remove(flat, 300, gone, NULL, &err), &err);
            assert_ok(kst_ann_add(a, 1000, (int)d, x + (n - 1000) * d, ids + n - 1000, &err), &err);
            assert_ok(kst_ann_add(flat, 1000, (int)d, x + (n - 1000) * d, ids + n - 1000, &err), &err);
        }
        assert_ok(kst_ann_set_device(a, KST_DEV_CPU, 0, &err), &err);
        assert_ok(kst_ann_search(a, (int64_t)nq, (int)d, q, (int64_t)k, &so, cs, ci, &err), &err);
        assert_ok(kst_ann_set_device(a, KST_DEV_CUDA, 0, &err), &err);
        assert_true(kst_ann_on_gpu(a));
        assert_ok(kst_ann_search(a, (int64_t)nq, (int)d, q, (int64_t)k, &so, gs, gi, &err), &err);
        assert_ok(kst_ann_search(flat, (int64_t)nq, (int)d, q, (int64_t)k, NULL, es, ei, &err), &err);
        char what[128];
        snprintf(what, sizeof what, "%s nprobe %d round %d", factory, nprobe, round);
        double same = compare_search(what, gs, gi, cs, ci, nq, k, 1e-4);
        size_t hc = 0, hg = 0;
        for (size_t i = 0; i < nq; i++)
            for (size_t r = 0; r < k; r++)
                for (size_t r2 = 0; r2 < k; r2++) {
                    hc += ci[i * k + r2] == ei[i * k + r];
                    hg += gi[i * k + r2] == ei[i * k + r];
                }
        double rc_ = 100.0 * hc / (nq * k), rg = 100.0 * hg / (nq * k);
        printf("  %s: ids identical to FAISS %.4f, recall@10 GPU %.2f CPU FAISS %.2f\n", what, same, rg, rc_);
        if (fabs(rg - rc_) > 0.5) fail_msg("%s: recall@10 %.2f on the GPU, %.2f on the CPU", what, rg, rc_);
    }
    kst_ann_free(a);
    kst_ann_free(flat);
    free(x), free(q), free(ids), free(cs), free(gs), free(es), free(ci), free(gi), free(ei);
}

static void test_ivfpq(void **s) {
    (void)s;
    NEED_GPU();
    ivfpq_case("IVF64,PQ16", 20000, 64, 8);
    ivfpq_case("OPQ8,IVF32,PQ8", 12000, 32, 4);
    ivfpq_case("IVF16,PQ6", 6000, 24, 16); /* M not a multiple of 4 */
}

/* ------------------------------------------------------------------------------------------ */
/* encoders */

static kst_model *open_gpu(const char *name) {
    char dir[512];
    snprintf(dir, sizeof dir, FIX "/%s", name);
    kst_model_opts o = kst_model_opts_default();
    o.device = KST_DEVICE_CUDA;
    kst_model *m = NULL;
    kst_error err;
    assert_ok(kst_model_open(dir, &o, &m, &err), &err);
    return m;
}

static void check_dense_gpu(const char *name) {
    kst_model *m = open_gpu(name);
    char path[512];
    snprintf(path, sizeof path, FIX "/%s/kestrel_ref/texts.txt", name);
    char **texts;
    size_t n = read_lines(path, &texts);
    snprintf(path, sizeof path, FIX "/%s/kestrel_ref/emb.npy", name);
    kst_npy want;
    kst_error err;
    assert_ok(kst_npy_read(path, &want, &err), &err);
    size_t dim = kst_model_dim(m);
    float *got = malloc(n * dim * sizeof(float));
    kst_encode_opts o = kst_encode_opts_default();
    o.batch_size = 5;
    assert_ok(kst_model_embed(m, (const char *const *)texts, NULL, n, &o, got, &err), &err);
    double worst = 1;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double c = cosine_f32(got + i * dim, (const float *)want.data + i * dim, dim);
        if (!(c >= 0.999)) printf("  %s text %zu: cosine %.6f\n", name, i, c);
        if (!(c >= worst)) worst = c, at = i;
    }
    printf("  %s on the GPU: %zu texts, min cosine %.6f (text %zu)\n", name, n, worst, at);
    if (!(worst >= 0.999)) fail_msg("%s: GPU embedding cosine %.6f < 0.999 (text %zu)", name, worst, at);
    free(got);
    kst_npy_free(&want);
    free_lines(texts, n);
    kst_model_close(m);
}

/* The GPU forward against the float32 CPU forward (kst_bert_forward) on a padded batch, row by
 * row over the valid positions. */
static void forward_case(const char *name, size_t B, size_t T, const int *valid) {
    char dir[512];
    snprintf(dir, sizeof dir, FIX "/%s", name);
    kst_encoder *e = NULL;
    kst_error err;
    assert_ok(kst_encoder_open(dir, KST_ROLE_AUTO, &e, &err), &err);
    size_t C = e->bert.cfg.C;
    int32_t *ids = malloc(B * T * sizeof(int32_t));
    for (size_t i = 0; i < B * T; i++) ids[i] = (i % T) == 0 ? 101 : (int32_t)(1000 + (i * 7919) % 20000);
    float *cpu = malloc(B * T * C * sizeof(float)), *gpu = malloc(B * T * C * sizeof(float));
    kst_bert_acts acts = {0};
    assert_ok(kst_bert_forward(&e->bert, &acts, cpu, ids, NULL, valid, B, T, &err), &err);
    kst_bert_acts_free(&acts);
    assert_ok(kst_encoder_set_device(e, KST_DEV_CUDA, &err), &err);
    assert_ok(kst_bert_gpu_forward(e->gpu, gpu, ids, NULL, valid, B, T, &err), &err);
    double worst = 1;
    for (size_t b = 0; b < B; b++) {
        double wb = 1;
        for (size_t t = 0; t < (size_t)valid[b]; t++) {
            double c = cosine_f32(gpu + (b * T + t) * C, cpu + (b * T + t) * C, C);
            if (!(c >= wb)) wb = c;
        }
        if (!(wb >= 0.999)) printf("  %s B=%zu T=%zu: sequence %zu (valid %d): min row cosine %.6f\n", name, B, T, b, valid[b], wb);
        if (!(wb >= worst)) worst = wb;
    }
    printf("  %s GPU vs CPU forward, B=%zu T=%zu: min row cosine %.6f\n", name, B, T, worst);
    if (!(worst >= 0.999)) fail_msg("%s: GPU forward differs from the CPU's (cosine %.6f)", name, worst);
    free(ids), free(cpu), free(gpu);
    kst_encoder_free(e);
}

/* The fused path's GELU comes from cuBLASLt's GELU_BIAS epilogue. BERT's hidden_act "gelu" is
 * the erf form (transformers' GELUActivation); the epilogue computes the tanh form (its values
 * lie on the tanh curve: measured here against both, in double), which differs from erf GELU by
 * at most 4.7e-4 (at |x| = 2.7), a sixteenth of a bf16 step there. The encoder parity tests
 * above and the benchmark's parity column check what that does to whole models. */
static void test_gelu_epilogue(void **s) {
    (void)s;
    NEED_GPU();
    enum { N = 1024 };
    float x[N], y[N];
    for (int i = 0; i < N; i++) {
        /* -8 .. 8, rounded to bf16 (the product's input type), so that x is what the GPU sees */
        float f = -8.0f + (float)i / 64.0f;
        uint32_t u;
        memcpy(&u, &f, 4);
        u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        memcpy(&x[i], &u, 4);
    }
    kst_error err;
    assert_ok(kst_bert_gpu_gelu_probe(x, y, N, &err), &err);
    double de = 0, dt = 0, at = 0;
    for (int i = 0; i < N; i++) {
        double v = x[i];
        double ge = 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
        double gt = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)));
        if (fabs(y[i] - ge) > de) de = fabs(y[i] - ge);
        if (fabs(y[i] - gt) > dt) dt = fabs(y[i] - gt), at = v;
    }
    printf("  cuBLASLt GELU epilogue: max |d| to erf GELU %.3g, to tanh GELU %.3g (at x = %.3f)\n", de, dt, at);
    printf("  the epilogue's GELU is %s form\n", dt < de ? "closer to the tanh" : "closer to the erf");
    /* what the parity of whole models rests on: the tanh form's 4.7e-4, plus float32 rounding */
    if (!(de < 1e-3)) fail_msg("GELU epilogue differs from erf GELU by %.3g", de);
}

static void test_forward_vs_cpu(void **s) {
    (void)s;
    NEED_GPU();
    int v1[5] = {2, 3, 7, 11, 12};
    forward_case("st_bert_mean", 5, 12, v1);
    int v2[3] = {64, 1, 40};
    forward_case("st_bert_mean", 3, 64, v2);
    forward_case("st_distilbert_max", 5, 12, v1);
    forward_case("cross_bert", 5, 12, v1);
}

/* Head sizes 32 and 64 (the MiniLM and BERT-base heads; the fixtures' heads are 8 wide) over
 * 300 tokens: several key tiles and query tiles, a sequence of one token, lengths off the tile
 * edges. Random weights (uniform in [-0.1, 0.1], LayerNorm weights 1 +- 0.1), GPU forward against
 * the float32 CPU forward, with the residual added in the products' epilogues (the default) and in
 * the LayerNorm kernel (KESTREL_GPU_RES_IN_LN=1). */
/* test_fc1_bias_column's: FC1's biases drawn this wide instead (0: as the other weights), and
 * whether the GPU encoder must have taken them as an input column (-1: either) */
static float g_fc1_bias = 0;
static int g_want_kcol = -1;

static void wide_heads_case_ln(size_t C, size_t NH, const char *res_in_ln, const char *att, const char *blocks,
                               const char *lnfold, float lnspread) {
    enum { B = 5, T = 300 };
    kst_bert_config c;
    memset(&c, 0, sizeof c);
    c.arch = KST_ARCH_BERT, c.V = 211, c.P = T, c.TT = 2, c.C = C, c.L = 2, c.NH = NH, c.FF = 2 * C;
    c.act = KST_ACT_GELU, c.eps = 1e-12f;
    kst_bert m;
    kst_error err;
    assert_ok(kst_bert_alloc(&m, &c, &err), &err);
    g_rng = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < m.num_params; i++) m.param_mem[i] = 0.1f * frand();
    float *lnw[] = {m.params.emblnw, m.params.ln1w, m.params.ln2w};
    size_t lnn[] = {C, c.L * C, c.L * C};
    for (int j = 0; j < 3; j++)
        for (size_t i = 0; i < lnn[j]; i++) lnw[j][i] = 1.0f + lnspread * frand();
    float *lnb[] = {m.params.emblnb, m.params.ln1b, m.params.ln2b};
    if (lnspread > 0.1f) /* LayerNorm biases of the same spread (else the weights' 0.1) */
        for (int j = 0; j < 3; j++)
            for (size_t i = 0; i < lnn[j]; i++) lnb[j][i] = lnspread * frand();
    for (size_t i = 0; g_fc1_bias > 0 && i < c.L * c.FF; i++) m.params.fcb[i] = g_fc1_bias * frand();
    int valid[B] = {T, 1, 65, 129, 200};
    int32_t *ids = malloc(B * T * sizeof(int32_t));
    for (size_t i = 0; i < B * T; i++) ids[i] = (int32_t)((i * 7919) % c.V);
    float *cpu = malloc(B * T * C * sizeof(float)), *gpu = malloc(B * T * C * sizeof(float));
    kst_bert_acts acts = {0};
    assert_ok(kst_bert_forward(&m, &acts, cpu, ids, NULL, valid, B, T, &err), &err);
    kst_bert_acts_free(&acts);
    /* the knobs are read at create; whatever the caller set is restored after (NULL: left as it is) */
    const char *knob[4] = {"KESTREL_GPU_RES_IN_LN", "KESTREL_GPU_ATT", "KESTREL_GPU_ATT_BLOCKS", "KESTREL_GPU_LNFOLD"};
    const char *val[4] = {res_in_ln, att, blocks, lnfold};
    char *was[4];
    for (int k = 0; k < 4; k++) {
        was[k] = getenv(knob[k]) ? strdup(getenv(knob[k])) : NULL;
        if (val[k]) setenv(knob[k], val[k], 1);
    }
    kst_bert_gpu *g = NULL;
    int rc = kst_bert_gpu_create(&m, &g, &err);
    for (int k = 0; k < 4; k++) {
        if (was[k]) setenv(knob[k], was[k], 1);
        else unsetenv(knob[k]);
        free(was[k]);
    }
    assert_ok(rc, &err);
    int folded = kst_bert_gpu_lnfold(g);
    if (lnfold && strcmp(lnfold, "1") == 0 && folded != 1) {
        printf("  C=%zu: LayerNorm-folded products not run (%s)\n", C,
               folded < 0 ? "this build has no CUTLASS" : "not an sm_90 GPU");
        kst_bert_gpu_free(g);
        free(ids), free(cpu), free(gpu);
        kst_bert_free(&m);
        return;
    }
    assert_ok(kst_bert_gpu_forward(g, gpu, ids, NULL, valid, B, T, &err), &err);
    int kcol = kst_bert_gpu_fc1_kcol(g);
    if (g_want_kcol >= 0 && kcol != g_want_kcol)
        fail_msg("C=%zu: FC1's bias %s an input column, expected %s", C, kcol ? "taken as" : "not taken as",
                 g_want_kcol ? "one" : "none");
    double worst = 1;
    size_t wb = 0, wt = 0;
    for (size_t b = 0; b < B; b++)
        for (size_t t = 0; t < (size_t)valid[b]; t++) {
            double cs = cosine_f32(gpu + (b * T + t) * C, cpu + (b * T + t) * C, C);
            if (!(cs >= worst)) worst = cs, wb = b, wt = t;
        }
    printf("  C=%zu, %zu heads of %zu, T=%d, residual in LN %s, attention %s (blocks %s), LayerNorm %s (weights 1 "
           "+- %.1f), FC1 bias %s: GPU vs CPU min row cosine %.6f (sequence %zu of length %d, token %zu)\n",
           C, NH, C / NH, T, res_in_ln, att ? att : "default", blocks ? blocks : "default",
           folded == 1 ? "folded" : "kernel", lnspread, kcol ? "column" : "epilogue", worst, wb, valid[wb], wt);
    if (!(worst >= 0.999)) fail_msg("head size %zu: GPU forward differs from the CPU's (cosine %.6f)", C / NH, worst);
    kst_bert_gpu_free(g);
    free(ids), free(cpu), free(gpu);
    kst_bert_free(&m);
}

static void wide_heads_case(size_t C, size_t NH, const char *res_in_ln, const char *att, const char *blocks) {
    wide_heads_case_ln(C, NH, res_in_ln, att, blocks, NULL, 0.1f);
}

static void test_forward_wide_heads(void **s) {
    (void)s;
    NEED_GPU();
    wide_heads_case(128, 2, "0", NULL, NULL);
    wide_heads_case(64, 2, "0", NULL, NULL);
    wide_heads_case(128, 2, "1", NULL, NULL);
    /* the wgmma kernel with key tiles of 64 (the default before attention_ws_kernel) */
    wide_heads_case(128, 2, "0", "1", NULL);
    /* the wgmma kernel with key tiles of 128 (64-dim heads, KESTREL_GPU_ATT=5): 3, 1, 1, 2 and 2
     * key tiles a sequence, the two K/V slots reused once; the same with ping-pong (6) */
    wide_heads_case(128, 2, "0", "5", NULL);
    wide_heads_case(128, 2, "0", "6", NULL);
    /* the warp-specialized kernel (7, the default where the driver makes tensor maps; 8 with
     * ping-pong): 30 work items (3 query tiles, 2 heads, 5 sequences) on 30 blocks, then on 4 and
     * 3 blocks (7 to 10 items a block: its Q buffers and K/V stages reused across items, the
     * mbarrier phases running on) */
    wide_heads_case(128, 2, "0", "7", NULL);
    wide_heads_case(128, 2, "0", "7", "4");
    wide_heads_case(128, 2, "0", "8", "3");
    /* the LayerNorms folded into CUTLASS products (KESTREL_GPU_LNFOLD=1; skipped without CUTLASS or
     * an sm_90 GPU), LayerNorm weights 1 +- 0.5 and biases +- 0.5, so that a fold that dropped
     * either (or the normalisation) would move the outputs well off the CPU's */
    wide_heads_case_ln(128, 2, "0", NULL, NULL, "1", 0.5f);
    wide_heads_case_ln(64, 2, "0", NULL, NULL, "1", 0.5f);
}

/* FC1's bias as an input column (the fused path's default, kst_bert_gpu_fc1_kcol), its biases
 * +- 1 so that a bias lost or counted twice moves the outputs well off the CPU's: with every
 * product's algorithms timed at its first call (KESTREL_GPU_GEMM_TUNE=2; FC2 then adds its
 * residual in place, from a copy while it is timed), with the heuristic's first choice, and with
 * the bias in the GELU epilogue again (KESTREL_GPU_FC1_KCOL=0). */
static void test_fc1_bias_column(void **s) {
    (void)s;
    NEED_GPU();
    /* (whatever the caller set is restored after) */
    char *was_kc = getenv("KESTREL_GPU_FC1_KCOL") ? strdup(getenv("KESTREL_GPU_FC1_KCOL")) : NULL;
    char *was_tu = getenv("KESTREL_GPU_GEMM_TUNE") ? strdup(getenv("KESTREL_GPU_GEMM_TUNE")) : NULL;
    g_fc1_bias = 1.0f;
    const char *tune[] = {"2", "0"};
    setenv("KESTREL_GPU_FC1_KCOL", "1", 1);
    g_want_kcol = 1;
    for (int i = 0; i < 2; i++) {
        setenv("KESTREL_GPU_GEMM_TUNE", tune[i], 1);
        wide_heads_case(128, 2, "0", NULL, NULL);
        wide_heads_case(64, 2, "0", NULL, NULL);
    }
    unsetenv("KESTREL_GPU_GEMM_TUNE");
    setenv("KESTREL_GPU_FC1_KCOL", "0", 1);
    g_want_kcol = 0;
    wide_heads_case(128, 2, "0", NULL, NULL);
    g_want_kcol = -1;
    g_fc1_bias = 0;
    if (was_kc) setenv("KESTREL_GPU_FC1_KCOL", was_kc, 1);
    else unsetenv("KESTREL_GPU_FC1_KCOL");
    if (was_tu) setenv("KESTREL_GPU_GEMM_TUNE", was_tu, 1);
    free(was_kc);
    free(was_tu);
}

/* The same texts through the CPU and the GPU model, one at a time and batched. */
static void embed_both(const char *name) {
    char dir[512], path[512];
    snprintf(dir, sizeof dir, FIX "/%s", name);
    snprintf(path, sizeof path, FIX "/%s/kestrel_ref/texts.txt", name);
    char **texts;
    size_t n = read_lines(path, &texts);
    kst_model *mc = NULL, *mg = open_gpu(name);
    kst_error err;
    assert_ok(kst_model_open(dir, NULL, &mc, &err), &err);
    size_t dim = kst_model_dim(mc);
    float *a = malloc(n * dim * 4), *b = malloc(n * dim * 4);
    size_t bs[2] = {1, 5};
    for (int t = 0; t < 2; t++) {
        kst_encode_opts o = kst_encode_opts_default();
        o.batch_size = bs[t];
        assert_ok(kst_model_embed(mc, (const char *const *)texts, NULL, n, &o, a, &err), &err);
        assert_ok(kst_model_embed(mg, (const char *const *)texts, NULL, n, &o, b, &err), &err);
        double worst = 1;
        for (size_t i = 0; i < n; i++) {
            double c = cosine_f32(a + i * dim, b + i * dim, dim);
            if (!(c >= worst)) worst = c;
        }
        printf("  %s, batches of %zu: GPU vs CPU embeddings, min cosine %.6f\n", name, bs[t], worst);
        if (!(worst >= 0.999)) fail_msg("%s: GPU embeddings differ from the CPU's (cosine %.6f)", name, worst);
    }
    free(a), free(b);
    free_lines(texts, n);
    kst_model_close(mc);
    kst_model_close(mg);
}

/* More texts than one tokenization chunk: the next chunk is tokenized while the GPU encodes. */
static void test_encoder_chunks(void **s) {
    (void)s;
    NEED_GPU();
    char **lines;
    size_t nl = read_lines(FIX "/st_bert_mean/kestrel_ref/texts.txt", &lines);
    size_t n = 9000;
    const char **texts = malloc(n * sizeof *texts);
    for (size_t i = 0; i < n; i++) texts[i] = lines[(i * 7) % nl];
    kst_model *mc = NULL, *mg = open_gpu("st_bert_mean");
    kst_error err;
    assert_ok(kst_model_open(FIX "/st_bert_mean", NULL, &mc, &err), &err);
    size_t dim = kst_model_dim(mc);
    float *a = malloc(n * dim * 4), *b = malloc(n * dim * 4);
    assert_ok(kst_model_embed(mc, texts, NULL, n, NULL, a, &err), &err);
    assert_ok(kst_model_embed(mg, texts, NULL, n, NULL, b, &err), &err);
    double worst = 1;
    for (size_t i = 0; i < n; i++) {
        double c = cosine_f32(a + i * dim, b + i * dim, dim);
        if (!(c >= worst)) worst = c;
    }
    printf("  %zu texts in tokenization chunks: GPU vs CPU min cosine %.6f\n", n, worst);
    if (!(worst >= 0.999)) fail_msg("chunked GPU embedding differs from the CPU's (cosine %.6f)", worst);
    free(a), free(b), free(texts);
    free_lines(lines, nl);
    kst_model_close(mc);
    kst_model_close(mg);
}

static void test_encoder_dense(void **s) {
    (void)s;
    NEED_GPU();
    embed_both("st_bert_mean");
    check_dense_gpu("st_bert_mean");
    check_dense_gpu("st_bert_cls_dense");
    check_dense_gpu("st_distilbert_max");
    check_dense_gpu("st_bert_sqrtlen_tokjson");
    check_dense_gpu("bare_bert");
}

/* Cross-encoder logits: within bf16 tolerance of transformers' (relative to the logits' spread). */
static void test_encoder_cross(void **s) {
    (void)s;
    NEED_GPU();
    const char *names[] = {"cross_bert", "cross_distilbert"};
    for (int t = 0; t < 2; t++) {
        kst_model *m = open_gpu(names[t]);
        char path[512];
        snprintf(path, sizeof path, FIX "/%s/kestrel_ref/pairs.tsv", names[t]);
        char **lines;
        size_t n = read_lines(path, &lines);
        const char **q = malloc(n * sizeof *q), **p = malloc(n * sizeof *p);
        for (size_t i = 0; i < n; i++) {
            char *tab = strchr(lines[i], '\t');
            assert_non_null(tab);
            *tab = '\0';
            q[i] = lines[i];
            p[i] = tab + 1;
        }
        size_t ns = kst_model_num_scores(m);
        snprintf(path, sizeof path, FIX "/%s/kestrel_ref/scores.npy", names[t]);
        kst_npy want;
        kst_error err;
        assert_ok(kst_npy_read(path, &want, &err), &err);
        float *got = malloc(n * ns * sizeof(float));
        assert_ok(kst_model_score(m, q, NULL, p, NULL, n, NULL, got, &err), &err);
        double c = cosine_f32(got, want.data, n * ns);
        printf("  %s on the GPU: %zu logits, cosine %.6f to transformers'\n", names[t], n * ns, c);
        if (!(c >= 0.999)) fail_msg("%s: GPU logits cosine %.6f < 0.999", names[t], c);
        free(got);
        kst_npy_free(&want);
        free(q);
        free(p);
        free_lines(lines, n);
        kst_model_close(m);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_device_errors),
        cmocka_unit_test(test_flat_small),
        cmocka_unit_test(test_flat_large),
        cmocka_unit_test(test_flat_ties),
        cmocka_unit_test(test_ann_device),
        cmocka_unit_test(test_ivfpq),
        cmocka_unit_test(test_gelu_epilogue),
        cmocka_unit_test(test_forward_vs_cpu),
        cmocka_unit_test(test_forward_wide_heads),
        cmocka_unit_test(test_fc1_bias_column),
        cmocka_unit_test(test_encoder_dense),
        cmocka_unit_test(test_encoder_chunks),
        cmocka_unit_test(test_encoder_cross),
    };
    return cmocka_run_group_tests_name("gpu", tests, setup, NULL);
}
