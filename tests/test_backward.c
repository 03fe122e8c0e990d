/* test_backward.c - every backward pass against finite differences, and the whole model's
 * gradients against PyTorch autograd (tests/fixtures/grad/, written by fx_grad.py).
 *
 * Finite differences: central, eps 1e-2 (1e-3 near kinks), on float forward passes whose loss
 * sum(out * R) (R random) is summed in double; agreement is measured as ||g - fd|| / ||fd|| per
 * tensor and must be under 2e-3: the float32 forward leaves about 1e-5 of noise in each
 * difference quotient, and the O(eps^2) truncation error of smooth ops is under 1e-4. */
#include "harness.h"

#include "core/mem.h"
#include "core/npy.h"
#include "core/ops_backward.h"
#include "encoders/bert_train.h"
#include "encoders/encoder.h"

/* ------------------------------------------------------------------------------------------ */
/* helpers */

static uint64_t rng_state = 88172645463325252ull;
static float frand(void) { /* uniform [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) / 8388608.0 - 1.0);
}
static float *rnd(size_t n, float scale) {
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = frand() * scale;
    return v;
}
static float *zeros(size_t n) { return calloc(n ? n : 1, sizeof(float)); }
static double dotd(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

typedef double (*loss_fn)(void *ctx);

/* Compares the analytic gradient g of loss with respect to x (n) to central differences. */
static double fd_check(const char *name, float *x, const float *g, size_t n, loss_fn f, void *ctx,
                       float eps, double tol) {
    double num = 0, den = 0, maxd = 0;
    for (size_t i = 0; i < n; i++) {
        float keep = x[i];
        x[i] = keep + eps;
        double lp = f(ctx);
        x[i] = keep - eps;
        double lm = f(ctx);
        x[i] = keep;
        double fd = (lp - lm) / (2.0 * (double)eps);
        double d = (double)g[i] - fd;
        num += d * d;
        den += fd * fd;
        if (fabs(d) > maxd) maxd = fabs(d);
    }
    double rel = sqrt(num) / (sqrt(den) + 1e-30);
    printf("  fd %-28s n %5zu  rel %.2e  max|diff| %.2e\n", name, n, rel, maxd);
    if (!(rel < tol)) fail_msg("%s: finite-difference rel error %.3g >= %.1g", name, rel, tol);
    return rel;
}

#define FD_TOL 2e-3

/* ------------------------------------------------------------------------------------------ */
/* matmul */

typedef struct { float *out, *inp, *w, *b, *R; size_t N, C, OC; } mm_ctx;
static double mm_loss(void *v) {
    mm_ctx *c = v;
    kst_matmul_forward(c->out, c->inp, c->w, c->b, c->N, c->C, c->OC);
    return dotd(c->out, c->R, c->N * c->OC);
}
static void test_matmul(void **state) {
    mm_ctx c = {0};
    c.N = 5, c.C = 7, c.OC = 4;
    c.inp = rnd(c.N * c.C, 1), c.w = rnd(c.OC * c.C, 1), c.b = rnd(c.OC, 1), c.R = rnd(c.N * c.OC, 1);
    c.out = zeros(c.N * c.OC);
    float *di = zeros(c.N * c.C), *dw = zeros(c.OC * c.C), *db = zeros(c.OC);
    kst_matmul_backward(di, dw, db, c.R, c.inp, c.w, c.N, c.C, c.OC);
    fd_check("matmul dinp", c.inp, di, c.N * c.C, mm_loss, &c, 1e-2f, FD_TOL);
    fd_check("matmul dweight", c.w, dw, c.OC * c.C, mm_loss, &c, 1e-2f, FD_TOL);
    fd_check("matmul dbias", c.b, db, c.OC, mm_loss, &c, 1e-2f, FD_TOL);
    /* Backward adds: a second call doubles every gradient. */
    float *dw2 = malloc(c.OC * c.C * sizeof(float));
    memcpy(dw2, dw, c.OC * c.C * sizeof(float));
    kst_matmul_backward(NULL, dw, NULL, c.R, c.inp, c.w, c.N, c.C, c.OC);
    for (size_t i = 0; i < c.OC * c.C; i++) assert_true(fabsf(dw[i] - 2 * dw2[i]) <= 1e-5f * (1 + fabsf(dw[i])));
    free(c.inp), free(c.w), free(c.b), free(c.R), free(c.out), free(di), free(dw), free(db), free(dw2);
}

/* ------------------------------------------------------------------------------------------ */
/* layernorm */

typedef struct { float *out, *inp, *w, *b, *R, *mean, *rstd; size_t N, C; } ln_ctx;
static double ln_loss(void *v) {
    ln_ctx *c = v;
    kst_layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C, 1e-5f);
    return dotd(c->out, c->R, c->N * c->C);
}
static void test_layernorm(void **state) {
    ln_ctx c = {0};
    c.N = 4, c.C = 9;
    c.inp = rnd(c.N * c.C, 2), c.w = rnd(c.C, 1), c.b = rnd(c.C, 1), c.R = rnd(c.N * c.C, 1);
    c.out = zeros(c.N * c.C), c.mean = zeros(c.N), c.rstd = zeros(c.N);
    ln_loss(&c);
    float *di = zeros(c.N * c.C), *dw = zeros(c.C), *db = zeros(c.C);
    kst_layernorm_backward(di, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, c.N, c.C);
    fd_check("layernorm dinp", c.inp, di, c.N * c.C, ln_loss, &c, 1e-2f, FD_TOL);
    fd_check("layernorm dweight", c.w, dw, c.C, ln_loss, &c, 1e-2f, FD_TOL);
    fd_check("layernorm dbias", c.b, db, c.C, ln_loss, &c, 1e-2f, FD_TOL);
    free(c.inp), free(c.w), free(c.b), free(c.R), free(c.out), free(c.mean), free(c.rstd);
    free(di), free(dw), free(db);
}

/* ------------------------------------------------------------------------------------------ */
/* activations, residual, dropout */

typedef struct { float *out, *inp, *R; size_t N; kst_act act; const float *mask; } act_ctx;
static double act_loss(void *v) {
    act_ctx *c = v;
    if (c->mask) kst_dropout_forward(c->out, c->inp, c->mask, c->N);
    else kst_act_forward(c->out, c->inp, c->N, c->act);
    return dotd(c->out, c->R, c->N);
}
static void test_activations(void **state) {
    static const char *names[] = {"gelu (erf)", "gelu (tanh)", "relu", "tanh", "identity"};
    act_ctx c = {0};
    c.N = 64;
    c.inp = rnd(c.N, 3), c.R = rnd(c.N, 1), c.out = zeros(c.N);
    for (size_t i = 0; i < c.N; i++) /* keep away from ReLU's kink */
        if (fabsf(c.inp[i]) < 0.05f) c.inp[i] = 0.3f;
    for (int a = 0; a <= KST_ACT_IDENTITY; a++) {
        c.act = (kst_act)a;
        float *d = zeros(c.N);
        kst_act_backward(d, c.R, c.inp, c.N, c.act);
        fd_check(names[a], c.inp, d, c.N, act_loss, &c, 1e-2f, FD_TOL);
        free(d);
    }
    /* residual: both inputs get dout */
    float *da = zeros(c.N), *db = zeros(c.N);
    kst_residual_backward(da, db, c.R, c.N);
    assert_memory_equal(da, c.R, c.N * sizeof(float));
    assert_memory_equal(db, c.R, c.N * sizeof(float));
    /* dropout: a seeded mask (same seed, same mask), 0 or 1/(1-p), backward through it */
    float *m1 = zeros(c.N), *m2 = zeros(c.N);
    uint64_t s1 = kst_rng_seed(7), s2 = kst_rng_seed(7);
    kst_dropout_mask(m1, c.N, 0.25f, &s1);
    kst_dropout_mask(m2, c.N, 0.25f, &s2);
    assert_memory_equal(m1, m2, c.N * sizeof(float));
    size_t zero = 0;
    for (size_t i = 0; i < c.N; i++) {
        assert_true(m1[i] == 0.0f || fabsf(m1[i] - 1.0f / 0.75f) < 1e-6f);
        zero += m1[i] == 0.0f;
    }
    assert_true(zero > 4 && zero < 32);
    c.mask = m1;
    float *dd = zeros(c.N);
    kst_dropout_backward(dd, c.R, m1, c.N);
    fd_check("dropout", c.inp, dd, c.N, act_loss, &c, 1e-2f, FD_TOL);
    free(c.inp), free(c.R), free(c.out), free(da), free(db), free(m1), free(m2), free(dd);
}

/* ------------------------------------------------------------------------------------------ */
/* attention */

typedef struct {
    float *out, *att, *scratch, *bscratch, *qkv, *R, *drop;
    int valid[3];
    size_t B, T, C, NH;
} at_ctx;
static double at_loss(void *v) {
    at_ctx *c = v;
    kst_attention_forward(c->out, c->att, NULL, c->qkv, c->valid, c->B, c->T, c->C, c->NH);
    if (c->drop)
        kst_attention_values(c->out, c->bscratch, c->att, c->drop, c->qkv, c->valid, c->B, c->T,
                             c->C, c->NH);
    return dotd(c->out, c->R, c->B * c->T * c->C);
}
static void test_attention(void **state) {
    at_ctx c = {0};
    c.B = 3, c.T = 6, c.C = 8, c.NH = 2;
    c.valid[0] = 6, c.valid[1] = 3, c.valid[2] = 1; /* full, padded, one token */
    size_t BT = c.B * c.T, A = c.B * c.NH * c.T * c.T;
    c.qkv = rnd(BT * 3 * c.C, 1.5f), c.R = rnd(BT * c.C, 1), c.out = zeros(BT * c.C);
    c.att = zeros(A), c.bscratch = zeros(kst_attention_backward_scratch_floats(c.T));
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) { /* with attention dropout */
            c.drop = zeros(A);
            uint64_t s = kst_rng_seed(3);
            kst_dropout_mask(c.drop, A, 0.2f, &s);
        }
        at_loss(&c);
        float *d = zeros(BT * 3 * c.C);
        kst_attention_backward(d, c.bscratch, c.R, c.qkv, c.att, c.drop, c.valid, c.B, c.T, c.C, c.NH);
        fd_check(pass ? "attention dqkv (dropout)" : "attention dqkv", c.qkv, d, BT * 3 * c.C,
                 at_loss, &c, 1e-2f, FD_TOL);
        /* Keys and values past valid[b] get exactly no gradient. */
        for (size_t b = 0; b < c.B; b++)
            for (size_t t = (size_t)c.valid[b]; t < c.T; t++)
                for (size_t k = c.C; k < 3 * c.C; k++) assert_true(d[(b * c.T + t) * 3 * c.C + k] == 0.0f);
        free(d);
    }
    free(c.qkv), free(c.R), free(c.out), free(c.att), free(c.bscratch), free(c.drop);
}

/* ------------------------------------------------------------------------------------------ */
/* embeddings */

typedef struct { float *out, *wte, *wpe, *wtt, *R; int32_t ids[8], types[8]; size_t B, T, C; } em_ctx;
static double em_loss(void *v) {
    em_ctx *c = v;
    kst_embedding_forward(c->out, c->ids, c->types, c->wte, c->wpe, c->wtt, c->B, c->T, c->C);
    return dotd(c->out, c->R, c->B * c->T * c->C);
}
static void test_embeddings(void **state) {
    em_ctx c = {0};
    c.B = 2, c.T = 4, c.C = 3;
    int32_t ids[8] = {1, 5, 5, 0, 1, 9, 2, 0}, types[8] = {0, 0, 1, 1, 0, 1, 1, 0};
    memcpy(c.ids, ids, sizeof ids);
    memcpy(c.types, types, sizeof types);
    c.wte = rnd(10 * c.C, 1), c.wpe = rnd(c.T * c.C, 1), c.wtt = rnd(2 * c.C, 1);
    c.R = rnd(c.B * c.T * c.C, 1), c.out = zeros(c.B * c.T * c.C);
    float *dte = zeros(10 * c.C), *dpe = zeros(c.T * c.C), *dtt = zeros(2 * c.C);
    kst_embedding_backward(dte, dpe, dtt, c.R, c.ids, c.types, c.B, c.T, c.C);
    fd_check("embedding dwte", c.wte, dte, 10 * c.C, em_loss, &c, 1e-2f, FD_TOL);
    fd_check("embedding dwpe", c.wpe, dpe, c.T * c.C, em_loss, &c, 1e-2f, FD_TOL);
    fd_check("embedding dwtt", c.wtt, dtt, 2 * c.C, em_loss, &c, 1e-2f, FD_TOL);
    free(c.wte), free(c.wpe), free(c.wtt), free(c.R), free(c.out), free(dte), free(dpe), free(dtt);
}

/* ------------------------------------------------------------------------------------------ */
/* pooling, L2 normalize, MaxSim */

typedef struct { float *out, *inp, *R; int valid[2]; unsigned modes; size_t B, T, C; } pl_ctx;
static double pl_loss(void *v) {
    pl_ctx *c = v;
    kst_pool_forward(c->out, c->inp, c->valid, c->modes, c->B, c->T, c->C);
    return dotd(c->out, c->R, c->B * kst_pool_dim(c->modes, c->C));
}
static void test_pooling(void **state) {
    static const struct { unsigned modes; const char *name; } cases[] = {
        {1, "pool cls"}, {2, "pool max"}, {4, "pool mean"}, {8, "pool mean_sqrt_len"}, {15, "pool all four"}};
    pl_ctx c = {0};
    c.B = 2, c.T = 5, c.C = 4;
    c.valid[0] = 5, c.valid[1] = 2;
    c.inp = rnd(c.B * c.T * c.C, 1), c.R = rnd(c.B * 4 * c.C, 1), c.out = zeros(c.B * 4 * c.C);
    for (size_t i = 0; i < 5; i++) {
        c.modes = cases[i].modes;
        float *d = zeros(c.B * c.T * c.C);
        kst_pool_backward(d, c.R, c.inp, c.valid, c.modes, c.B, c.T, c.C);
        /* eps 1e-3: max pooling switches rows only if two values are that close */
        fd_check(cases[i].name, c.inp, d, c.B * c.T * c.C, pl_loss, &c, 1e-3f, FD_TOL);
        free(d);
    }
    free(c.inp), free(c.R), free(c.out);
}

typedef struct { float *out, *norm, *inp, *R; size_t N, D; } l2_ctx;
static double l2_loss(void *v) {
    l2_ctx *c = v;
    kst_l2norm_forward(c->out, c->norm, c->inp, c->N, c->D);
    return dotd(c->out, c->R, c->N * c->D);
}
static void test_l2norm(void **state) {
    l2_ctx c = {0};
    c.N = 3, c.D = 6;
    c.inp = rnd(c.N * c.D, 1), c.R = rnd(c.N * c.D, 1), c.out = zeros(c.N * c.D), c.norm = zeros(c.N);
    l2_loss(&c);
    float *d = zeros(c.N * c.D);
    kst_l2norm_backward(d, c.R, c.out, c.norm, c.N, c.D);
    fd_check("l2 normalize", c.inp, d, c.N * c.D, l2_loss, &c, 1e-3f, FD_TOL);
    free(c.inp), free(c.R), free(c.out), free(c.norm), free(d);
}

typedef struct { float *q, *d; int argmax[4]; unsigned char keep[5]; size_t nq, nd, D; } ms_ctx;
static double ms_loss(void *v) {
    ms_ctx *c = v;
    return 0.7 * kst_maxsim_forward(c->argmax, c->q, c->d, c->keep, c->nq, c->nd, c->D);
}
static void test_maxsim(void **state) {
    ms_ctx c = {0};
    c.nq = 4, c.nd = 5, c.D = 6;
    unsigned char keep[5] = {1, 0, 1, 1, 1};
    memcpy(c.keep, keep, sizeof keep);
    c.q = rnd(c.nq * c.D, 1), c.d = rnd(c.nd * c.D, 1);
    ms_loss(&c);
    for (size_t i = 0; i < c.nq; i++) assert_true(c.argmax[i] != 1); /* dropped token never wins */
    float *dq = zeros(c.nq * c.D), *dd = zeros(c.nd * c.D);
    kst_maxsim_backward(dq, dd, 0.7f, c.argmax, c.q, c.d, c.nq, c.D);
    fd_check("maxsim dq", c.q, dq, c.nq * c.D, ms_loss, &c, 1e-3f, FD_TOL);
    fd_check("maxsim dd", c.d, dd, c.nd * c.D, ms_loss, &c, 1e-3f, FD_TOL);
    free(c.q), free(c.d), free(dq), free(dd);
}

/* ------------------------------------------------------------------------------------------ */
/* Gradient parity with PyTorch autograd (tests/fixtures/grad/, see the fixtures README) */

#define GRAD "tests/fixtures/grad"
#define MODELS "tests/fixtures/models"

/* The gradient slice a checkpoint tensor name denotes ("bert." prefix optional), or NULL. */
static float *grad_slot(kst_bert *g, const char *name, size_t *n) {
    const kst_bert_config *c = &g->cfg;
    kst_bert_params *p = &g->params;
    size_t C = c->C, FF = c->FF, l = 0;
    int at = 0;
    if (strncmp(name, "bert.", 5) == 0) name += 5;
    static const struct { const char *name; int idx; } flat[] = {
        {"embeddings.word_embeddings.weight", 0}, {"embeddings.position_embeddings.weight", 1},
        {"embeddings.token_type_embeddings.weight", 2}, {"embeddings.LayerNorm.weight", 3},
        {"embeddings.LayerNorm.bias", 4}, {"linear.weight", 21}};
    float *ptrs[KST_BERT_NPARAMS] = {p->wte, p->wpe, p->wtt, p->emblnw, p->emblnb, [21] = p->projw};
    for (size_t i = 0; i < sizeof flat / sizeof flat[0]; i++)
        if (strcmp(name, flat[i].name) == 0) {
            *n = g->param_sizes[flat[i].idx];
            return ptrs[flat[i].idx];
        }
    if (sscanf(name, "encoder.layer.%zu.%n", &l, &at) != 1 || at == 0 || l >= c->L) return NULL;
    const char *r = name + at;
    static const char *qkv[3] = {"query", "key", "value"};
    char buf[128];
    for (size_t k = 0; k < 3; k++) {
        snprintf(buf, sizeof buf, "attention.self.%s.weight", qkv[k]);
        if (strcmp(r, buf) == 0) return *n = C * C, p->qkvw + (l * 3 + k) * C * C;
        snprintf(buf, sizeof buf, "attention.self.%s.bias", qkv[k]);
        if (strcmp(r, buf) == 0) return *n = C, p->qkvb + (l * 3 + k) * C;
    }
    struct { const char *suffix; float *ptr; size_t size; } per[] = {
        {"attention.output.dense.weight", p->attprojw + l * C * C, C * C},
        {"attention.output.dense.bias", p->attprojb + l * C, C},
        {"attention.output.LayerNorm.weight", p->ln1w + l * C, C},
        {"attention.output.LayerNorm.bias", p->ln1b + l * C, C},
        {"intermediate.dense.weight", p->fcw + l * FF * C, FF * C},
        {"intermediate.dense.bias", p->fcb + l * FF, FF},
        {"output.dense.weight", p->fcprojw + l * C * FF, C * FF},
        {"output.dense.bias", p->fcprojb + l * C, C},
        {"output.LayerNorm.weight", p->ln2w + l * C, C},
        {"output.LayerNorm.bias", p->ln2b + l * C, C}};
    for (size_t i = 0; i < sizeof per / sizeof per[0]; i++)
        if (strcmp(r, per[i].suffix) == 0) return *n = per[i].size, per[i].ptr;
    return NULL;
}

typedef struct { int q, p, n; float tp, tn; } triple;

static size_t read_triples(const char *dir, triple *t) {
    char path[512], **lines;
    snprintf(path, sizeof path, "%s/triples.txt", dir);
    size_t n = read_lines(path, &lines);
    assert_true(n <= 4);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(sscanf(lines[i], "%d %d %d %f %f", &t[i].q, &t[i].p, &t[i].n, &t[i].tp, &t[i].tn), 5);
    free_lines(lines, n);
    return n;
}

/* A padded batch of the id lines rows[0..B) (pad id 0); valid = each line's length. */
static size_t make_batch(char **lines, const int *rows, size_t B, int32_t *ids, int *valid) {
    int32_t tmp[4][128];
    size_t T = 0, len[4];
    for (size_t b = 0; b < B; b++) {
        len[b] = 0;
        for (char *s = lines[rows[b]], *e; *s; s = e) {
            long v = strtol(s, &e, 10);
            if (e == s) break;
            tmp[b][len[b]++] = (int32_t)v;
        }
        if (len[b] > T) T = len[b];
    }
    for (size_t b = 0; b < B; b++) {
        for (size_t t = 0; t < T; t++) ids[b * T + t] = t < len[b] ? tmp[b][t] : 0;
        valid[b] = (int)len[b];
    }
    return T;
}

/* Compares every tensor of names.txt with the C gradients; returns the worst relative error. */
static double compare_grads(const char *dir, kst_bert *g, float loss) {
    char path[512], **names;
    kst_error err;
    kst_npy want, wids;
    snprintf(path, sizeof path, "%s/loss.npy", dir);
    assert_ok(kst_npy_read(path, &want, &err), &err);
    printf("  %s: loss C %.7f torch %.7f\n", dir, loss, ((float *)want.data)[0]);
    assert_close_f32("loss", &loss, want.data, 1, 0, 1e-5);
    kst_npy_free(&want);
    snprintf(path, sizeof path, "%s/names.txt", dir);
    size_t nn = read_lines(path, &names);
    snprintf(path, sizeof path, "%s/embeddings.word_embeddings.ids.npy", dir);
    assert_ok(kst_npy_read(path, &wids, &err), &err);
    double worst = 0;
    for (size_t i = 0; i < nn; i++) {
        size_t n = 0;
        float *got = grad_slot(g, names[i], &n);
        if (!got) fail_msg("%s: no gradient slot for \"%s\"", dir, names[i]);
        snprintf(path, sizeof path, "%s/%s.npy", dir, names[i]);
        assert_ok(kst_npy_read(path, &want, &err), &err);
        float *sel = NULL;
        if (strstr(names[i], "word_embeddings")) { /* only the rows of the ids used were saved */
            size_t C = g->cfg.C;
            sel = malloc(wids.count * C * sizeof(float));
            for (size_t r = 0; r < wids.count; r++)
                memcpy(sel + r * C, got + (size_t)((int64_t *)wids.data)[r] * C, C * sizeof(float));
            got = sel, n = wids.count * C;
        }
        assert_int_equal(want.count, n);
        const float *w = want.data;
        double num = 0, den = 0;
        for (size_t k = 0; k < n; k++) {
            num += ((double)got[k] - w[k]) * ((double)got[k] - w[k]);
            den += (double)w[k] * w[k];
        }
        /* The key bias's true gradient is exactly 0 (softmax ignores a shift common to a row's
         * scores); both sides hold only rounding noise (~1e-8), so it is held to 1e-6 absolute. */
        int zero = sqrt(den) < 1e-6;
        double rel = zero ? sqrt(num) * 1e3 : sqrt(num) / sqrt(den);
        printf("    %-52s n %6zu  %s %.2e\n", names[i], n, zero ? "abs" : "rel", zero ? sqrt(num) : rel);
        if (!zero && rel > worst) worst = rel;
        /* 1e-3 per tensor (the bound): float32 against float32 with other summation
         * orders; the observed errors are 1e-6 to 1e-5. */
        if (!(rel < 1e-3)) assert_close_f32(names[i], got, w, n, 0, 0);
        free(sel);
        kst_npy_free(&want);
    }
    printf("  %s: %zu tensors, worst rel %.2e\n", dir, nn, worst);
    kst_npy_free(&wids);
    free_lines(names, nn);
    return worst;
}

/* Margin-MSE: loss = mean_b (sp - sn - (tp - tn))^2; dsp = -dsn = 2 (...) / B. */
static float margin_mse(const float *sp, const float *sn, const triple *t, size_t B, float *dsp) {
    double loss = 0;
    for (size_t b = 0; b < B; b++) {
        double d = ((double)sp[b] - sn[b]) - ((double)t[b].tp - t[b].tn);
        loss += d * d;
        dsp[b] = (float)(2 * d / (double)B);
    }
    return (float)(loss / (double)B);
}

static void test_parity_dense(void **state) {
    kst_encoder *e = NULL;
    kst_error err;
    assert_ok(kst_encoder_open(MODELS "/st_bert_mean", KST_ROLE_DENSE, &e, &err), &err);
    kst_bert *m = &e->bert, g;
    assert_ok(kst_bert_grads_alloc(&g, m, &err), &err);
    triple tr[4];
    size_t B = read_triples(GRAD "/dense", tr);
    char **lines;
    size_t nl = read_lines(MODELS "/st_bert_mean/kestrel_ref/ids.txt", &lines);
    assert_true(nl == 12);
    size_t C = m->cfg.C, D = e->dim;
    kst_bert_train_acts acts[3] = {{0}};
    kst_head_acts heads[3] = {{0}};
    int32_t ids[3][4 * 128];
    int valid[3][4];
    size_t T[3];
    const float *vec[3];
    for (int k = 0; k < 3; k++) {
        int rows[4];
        for (size_t b = 0; b < B; b++) rows[b] = k == 0 ? tr[b].q : k == 1 ? tr[b].p : tr[b].n;
        T[k] = make_batch(lines, rows, B, ids[k], valid[k]);
        assert_ok(kst_bert_train_forward(m, &acts[k], ids[k], NULL, valid[k], B, T[k], 0, NULL, &err), &err);
        assert_ok(kst_dense_head_forward(m, &heads[k], kst_bert_train_hidden(m, &acts[k]), valid[k],
                                         e->pool_modes, e->normalize, B, T[k], &err), &err);
        vec[k] = heads[k].out;
    }
    float sp[4], sn[4], dsp[4];
    for (size_t b = 0; b < B; b++) {
        sp[b] = (float)dotd(vec[0] + b * D, vec[1] + b * D, D);
        sn[b] = (float)dotd(vec[0] + b * D, vec[2] + b * D, D);
    }
    float loss = margin_mse(sp, sn, tr, B, dsp);
    float *dv[3];
    for (int k = 0; k < 3; k++) dv[k] = zeros(B * D);
    for (size_t b = 0; b < B; b++)
        for (size_t i = 0; i < D; i++) {
            dv[0][b * D + i] = dsp[b] * (vec[1][b * D + i] - vec[2][b * D + i]);
            dv[1][b * D + i] = dsp[b] * vec[0][b * D + i];
            dv[2][b * D + i] = -dsp[b] * vec[0][b * D + i];
        }
    kst_bert_grads_zero(&g);
    for (int k = 0; k < 3; k++) {
        float *dh = zeros(B * T[k] * C);
        kst_dense_head_backward(m, &g, &heads[k], dh, dv[k], kst_bert_train_hidden(m, &acts[k]), valid[k],
                                e->pool_modes, e->normalize, B, T[k]);
        kst_bert_train_backward(m, &g, &acts[k], dh);
        free(dh);
        free(dv[k]);
        kst_head_acts_free(&heads[k]);
        kst_bert_train_acts_free(&acts[k]);
    }
    compare_grads(GRAD "/dense", &g, loss);
    free_lines(lines, nl);
    kst_bert_free(&g);
    kst_encoder_free(e);
}

static void test_parity_colbert(void **state) {
    kst_encoder *e = NULL;
    kst_error err;
    assert_ok(kst_encoder_open(MODELS "/colbert", KST_ROLE_COLBERT, &e, &err), &err);
    kst_bert *m = &e->bert, g;
    assert_ok(kst_bert_grads_alloc(&g, m, &err), &err);
    triple tr[4];
    size_t B = read_triples(GRAD "/colbert", tr);
    char **ql, **qm, **dl, **km;
    size_t nq = read_lines(MODELS "/colbert/kestrel_ref/query_ids.txt", &ql);
    size_t nqm = read_lines(MODELS "/colbert/kestrel_ref/query_attention_mask.txt", &qm);
    size_t nd = read_lines(MODELS "/colbert/kestrel_ref/doc_ids.txt", &dl);
    size_t nk = read_lines(MODELS "/colbert/kestrel_ref/doc_keep_mask.txt", &km);
    size_t C = m->cfg.C, D = e->dim;
    kst_bert_train_acts acts[3] = {{0}};
    kst_head_acts heads[3] = {{0}};
    int32_t ids[3][4 * 128];
    int valid[3][4];
    size_t T[3];
    for (int k = 0; k < 3; k++) {
        int rows[4];
        for (size_t b = 0; b < B; b++) rows[b] = k == 0 ? tr[b].q : k == 1 ? tr[b].p : tr[b].n;
        T[k] = make_batch(k == 0 ? ql : dl, rows, B, ids[k], valid[k]);
        if (k == 0) { /* queries attend only to their unmasked tokens; all vectors score */
            int32_t mask[4 * 128];
            int len[4];
            make_batch(qm, rows, B, mask, len);
            for (size_t b = 0; b < B; b++) {
                valid[0][b] = 0;
                for (size_t t = 0; t < T[0]; t++) valid[0][b] += mask[b * T[0] + t];
            }
        }
        assert_ok(kst_bert_train_forward(m, &acts[k], ids[k], NULL, valid[k], B, T[k], 0, NULL, &err), &err);
        assert_ok(kst_colbert_head_forward(m, &heads[k], kst_bert_train_hidden(m, &acts[k]), B, T[k], &err), &err);
    }
    float s[2][4], dsp[4];
    int argmax[2][4][128];
    for (int k = 1; k <= 2; k++)
        for (size_t b = 0; b < B; b++) {
            int32_t keep32[128];
            int kl;
            int row = k == 1 ? tr[b].p : tr[b].n;
            make_batch(km, &row, 1, keep32, &kl);
            unsigned char keep[128] = {0};
            for (int t = 0; t < kl; t++) keep[t] = (unsigned char)keep32[t];
            s[k - 1][b] = kst_maxsim_forward(argmax[k - 1][b], heads[0].out + b * T[0] * D,
                                             heads[k].out + b * T[k] * D, keep, T[0], T[k], D);
        }
    float loss = margin_mse(s[0], s[1], tr, B, dsp);
    float *dv[3];
    for (int k = 0; k < 3; k++) dv[k] = zeros(B * T[k] * D);
    for (int k = 1; k <= 2; k++)
        for (size_t b = 0; b < B; b++)
            kst_maxsim_backward(dv[0] + b * T[0] * D, dv[k] + b * T[k] * D, k == 1 ? dsp[b] : -dsp[b],
                                argmax[k - 1][b], heads[0].out + b * T[0] * D, heads[k].out + b * T[k] * D,
                                T[0], D);
    kst_bert_grads_zero(&g);
    for (int k = 0; k < 3; k++) {
        float *dh = zeros(B * T[k] * C);
        kst_colbert_head_backward(m, &g, &heads[k], dh, dv[k], kst_bert_train_hidden(m, &acts[k]), B, T[k]);
        kst_bert_train_backward(m, &g, &acts[k], dh);
        free(dh);
        free(dv[k]);
        kst_head_acts_free(&heads[k]);
        kst_bert_train_acts_free(&acts[k]);
    }
    compare_grads(GRAD "/colbert", &g, loss);
    free_lines(ql, nq), free_lines(qm, nqm), free_lines(dl, nd), free_lines(km, nk);
    kst_bert_free(&g);
    kst_encoder_free(e);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),     cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_activations), cmocka_unit_test(test_attention),
        cmocka_unit_test(test_embeddings), cmocka_unit_test(test_pooling),
        cmocka_unit_test(test_l2norm),     cmocka_unit_test(test_maxsim),
        cmocka_unit_test(test_parity_dense), cmocka_unit_test(test_parity_colbert),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
