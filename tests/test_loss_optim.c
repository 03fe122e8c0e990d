/* test_loss_optim.c - train/loss and train/optim against PyTorch: loss values and autograd
 * gradients for several (B, n), and 20-step AdamW / SGD trajectories under transformers'
 * warm-up + linear / cosine schedules with clip_grad_norm_. Fixtures: tests/fixtures/fx_train.py.
 *
 * Tolerances (per tensor, relative unless said):
 *   losses and d loss / d scores: rtol 1e-5, atol 1e-7. The reference is float64 autograd on the
 *     same float32 inputs, rounded once to float32; the C code sums in double and rounds once, so
 *     the only gaps are two float roundings (~1.2e-7 relative) plus exp/log differences.
 *     atol covers gradient entries that are tiny differences of near-equal softmax terms.
 *   learning rates: rtol 1e-7 (both compute the same double formula, then round to float).
 *   clip norms: rtol 1e-6 (torch sums per tensor in float32 and takes the norm of norms; we sum
 *     in double: a few float ulps apart).
 *   AdamW m, v, params: rtol 2e-6, atol 1e-7 after 20 steps. The element-wise arithmetic matches
 *     torch's kernels in order, but torch's vectorised kernels may fuse multiply-adds and its
 *     clipping coefficient comes from a float32 norm of norms; those ulp-level differences are
 *     carried and slightly grown over 20 steps (division by sqrt(v)+eps). atol for elements
 *     near zero.
 *   SGD params: rtol 1e-6, atol 1e-7 (p - lr*g per step, one ulp at most per step). */
#include "harness.h"

#include "core/npy.h"
#include "train/loss.h"
#include "train/optim.h"

#define FX "tests/fixtures/train"

static float *load(const char *dir, const char *name, size_t *count) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.npy", dir, name);
    kst_npy a;
    kst_error err;
    assert_ok(kst_npy_read(path, &a, &err), &err);
    assert_int_equal(a.dtype, KST_NPY_F32);
    if (count) *count = a.count;
    return a.data; /* owned: freed with kst_free via kst_npy_free's allocator */
}

static void release(float *p) {
    kst_npy a = {0};
    a.data = p;
    kst_npy_free(&a);
}

/* ---------------------------------------------------------------------------------------------
 * Losses
 * ------------------------------------------------------------------------------------------- */

static void check_case(size_t B, size_t n) {
    char dir[256];
    snprintf(dir, sizeof dir, FX "/loss/b%zu_n%zu", B, n);
    size_t N = B * n, W = B * n;
    float *s = load(dir, "s", NULL), *t = load(dir, "t", NULL), *S = load(dir, "S", NULL);
    float *y = load(dir, "y", NULL), *vals = load(dir, "values", NULL);
    float *g = calloc(B * W, sizeof *g);
    const double rt = 1e-5, at = 1e-7;
    float got[7];
    char label[400];
#define GRAD(idx, gname, size, call)                                      \
    do {                                                                  \
        memset(g, 0, (size) * sizeof *g);                                 \
        call;                                                             \
        float *want = load(dir, gname, NULL);                             \
        snprintf(label, sizeof label, "%s %s", dir, gname);               \
        assert_close_f32(label, g, want, (size), at, rt);                 \
        release(want);                                                    \
    } while (0)

    got[0] = kst_margin_mse_forward(s, t, B, n);
    GRAD(0, "g_mmse", N, kst_margin_mse_backward(g, s, t, B, n, 1.0f));
    got[1] = kst_kl_forward(s, t, B, n, 1.0f);
    GRAD(1, "g_kl", N, kst_kl_backward(g, s, t, B, n, 1.0f, 1.0f));
    got[2] = kst_kl_forward(s, t, B, n, 2.0f);
    GRAD(2, "g_kl2", N, kst_kl_backward(g, s, t, B, n, 2.0f, 1.0f));
    got[3] = kst_inbatch_ce_forward(S, B, n, 0, 0.3f);
    GRAD(3, "g_ib", B * W, kst_inbatch_ce_backward(g, S, B, n, 0, 0.3f, 1.0f));
    got[4] = kst_inbatch_ce_forward(S, B, n, 1, 0.3f);
    GRAD(4, "g_ibx", B * W, kst_inbatch_ce_backward(g, S, B, n, 1, 0.3f, 1.0f));
    got[5] = kst_mse_forward(s, t, N);
    GRAD(5, "g_mse", N, kst_mse_backward(g, s, t, N, 1.0f));
    got[6] = kst_bce_logits_forward(s, y, N);
    GRAD(6, "g_bce", N, kst_bce_logits_backward(g, s, y, N, 1.0f));
#undef GRAD
    snprintf(label, sizeof label, "%s values", dir);
    assert_close_f32(label, got, vals, 7, 0, rt);

    /* Backward accumulates and scales by dloss: two calls with 0.25 and 0.75 give one call. */
    float *g1 = calloc(N, sizeof *g1), *g2 = calloc(N, sizeof *g2);
    kst_margin_mse_backward(g1, s, t, B, n, 1.0f);
    kst_margin_mse_backward(g2, s, t, B, n, 0.25f);
    kst_margin_mse_backward(g2, s, t, B, n, 0.75f);
    assert_close_f32("accumulated g_mmse", g2, g1, N, 1e-7, 1e-6);
    free(g1);
    free(g2);

    free(g);
    release(s), release(t), release(S), release(y), release(vals);
}

static void test_losses_vs_torch(void **state) {
    (void)state;
    check_case(1, 2);
    check_case(4, 2);
    check_case(3, 5);
    check_case(8, 8);
}

/* Hand-checked values that do not need a fixture. */
static void test_losses_by_hand(void **state) {
    (void)state;
    /* Margin-MSE: student margin 1, teacher margin 3 -> (1-3)^2 = 4; gradient 2*(-2) = -4 on
     * the positive, +4 on the negative. */
    float s[2] = {2, 1}, t[2] = {5, 2}, g[2] = {0, 0};
    assert_float_equal(kst_margin_mse_forward(s, t, 1, 2), 4.0f, 1e-6);
    kst_margin_mse_backward(g, s, t, 1, 2, 1.0f);
    assert_float_equal(g[0], -4.0f, 1e-6);
    assert_float_equal(g[1], 4.0f, 1e-6);
    /* KL of identical distributions is 0 with a zero gradient. */
    float a[3] = {1, 2, 3}, ga[3] = {0, 0, 0};
    assert_float_equal(kst_kl_forward(a, a, 1, 3, 1.0f), 0.0f, 1e-7);
    kst_kl_backward(ga, a, a, 1, 3, 1.0f, 1.0f);
    for (int i = 0; i < 3; i++) assert_float_equal(ga[i], 0.0f, 1e-7);
    /* Large logits stay finite. */
    float big[2] = {1000, -1000}, yy[2] = {1, 0};
    float l = kst_bce_logits_forward(big, yy, 2);
    assert_true(isfinite(l) && l < 1e-6f);
    assert_true(isfinite(kst_kl_forward(big, yy, 1, 2, 1.0f)));
}

/* ---------------------------------------------------------------------------------------------
 * Schedules and optimizers
 * ------------------------------------------------------------------------------------------- */

static void run_optim(const char *name, int adamw, kst_lr_kind kind) {
    char dir[256];
    snprintf(dir, sizeof dir, FX "/optim/%s", name);
    size_t ng, np;
    float *grads = load(dir, "grads", &ng), *params = load(dir, "params", &np);
    float *lrs = load(dir, "lrs", NULL), *norms = load(dir, "norms", NULL);
    float *cfgv = load(dir, "config", NULL);
    const size_t P = 37, steps = ng / P;
    assert_int_equal(np, (steps + 1) * P);
    /* The fixture stores the hyper-parameters as float32; torch used these Python values. */
    double base_lr = adamw ? 0.01 : 0.05;
    float max_norm = cfgv[3];
    long warmup = (long)cfgv[1], total = (long)cfgv[2];
    kst_adamw_config cfg = kst_adamw_defaults();
    cfg.lr = base_lr, cfg.weight_decay = 0.1, cfg.beta1 = 0.9, cfg.beta2 = 0.999, cfg.eps = 1e-8;
    assert_float_equal(cfgv[0], (float)base_lr, 0);
    assert_float_equal(cfgv[4], 0.1f, 0);
    float *ms = adamw ? load(dir, "m", NULL) : NULL, *vs = adamw ? load(dir, "v", NULL) : NULL;

    /* Two tensors: 30 elements with decay, 7 without (a bias / LayerNorm stand-in). */
    unsigned char mask[37];
    size_t sizes[2] = {30, 7};
    int decay[2] = {1, 0};
    kst_decay_mask_fill(mask, sizes, decay, 2);
    float p[37], m[37] = {0}, v[37] = {0}, g[37], got_lr[64], got_norm[64];
    memcpy(p, params, sizeof p);
    char label[300];
    for (size_t k = 0; k < steps; k++) {
        memcpy(g, grads + k * P, sizeof g);
        got_norm[k] = kst_clip_grad_norm(g, P, max_norm);
        got_lr[k] = (float)kst_lr_at(kind, base_lr, (long)k, warmup, total);
        if (adamw)
            kst_adamw_update(p, m, v, g, mask, P, (long)k + 1, kst_lr_at(kind, base_lr, (long)k, warmup, total), &cfg);
        else
            kst_sgd_update(p, g, P, kst_lr_at(kind, base_lr, (long)k, warmup, total));
        snprintf(label, sizeof label, "%s params after step %zu", name, k + 1);
        assert_close_f32(label, p, params + (k + 1) * P, P, 1e-7, adamw ? 2e-6 : 1e-6);
        if (adamw) {
            snprintf(label, sizeof label, "%s m after step %zu", name, k + 1);
            assert_close_f32(label, m, ms + k * P, P, 1e-7, 2e-6);
            snprintf(label, sizeof label, "%s v after step %zu", name, k + 1);
            assert_close_f32(label, v, vs + k * P, P, 1e-9, 2e-6);
        }
    }
    snprintf(label, sizeof label, "%s lrs", name);
    assert_close_f32(label, got_lr, lrs, steps, 0, 1e-7);
    snprintf(label, sizeof label, "%s norms", name);
    assert_close_f32(label, got_norm, norms, steps, 0, 1e-6);
    release(grads), release(params), release(lrs), release(norms), release(cfgv);
    if (ms) release(ms), release(vs);
}

static void test_optim_vs_torch(void **state) {
    (void)state;
    run_optim("adamw_linear_clip1", 1, KST_LR_LINEAR);
    run_optim("adamw_cosine_clip100", 1, KST_LR_COSINE);
    run_optim("sgd_linear_clip1", 0, KST_LR_LINEAR);
    run_optim("sgd_cosine_clip05", 0, KST_LR_COSINE);
}

static void test_schedule_edges(void **state) {
    (void)state;
    /* transformers: step 0 of a warm-up is lr 0; the end of training is 0; past it stays 0. */
    assert_true(kst_lr_multiplier(KST_LR_LINEAR, 0, 10, 100) == 0.0);
    assert_true(kst_lr_multiplier(KST_LR_LINEAR, 10, 10, 100) == 1.0);
    assert_true(kst_lr_multiplier(KST_LR_LINEAR, 100, 10, 100) == 0.0);
    assert_true(kst_lr_multiplier(KST_LR_LINEAR, 150, 10, 100) == 0.0);
    assert_true(kst_lr_multiplier(KST_LR_COSINE, 10, 10, 100) == 1.0);
    assert_true(fabs(kst_lr_multiplier(KST_LR_COSINE, 55, 10, 100) - 0.5) < 1e-12);
    assert_true(kst_lr_multiplier(KST_LR_COSINE, 100, 10, 100) < 1e-15);
    /* warmup 0: full rate from the first step. */
    assert_true(kst_lr_multiplier(KST_LR_LINEAR, 0, 0, 10) == 1.0);
    assert_true(kst_lr_multiplier(KST_LR_CONSTANT, 3, 2, 10) == 1.0);
    /* Clipping under the limit still multiplies by max/(norm+1e-6) clamped to 1: unchanged. */
    float g[2] = {3, 4};
    assert_float_equal(kst_clip_grad_norm(g, 2, 10.0f), 5.0f, 1e-6);
    assert_float_equal(g[0], 3.0f, 0);
    assert_float_equal(kst_clip_grad_norm(g, 2, 1.0f), 5.0f, 1e-6);
    assert_float_equal(g[0], 0.6f, 1e-6);
    kst_grad_scale(g, 2, 0.5f);
    assert_float_equal(g[1], 0.4f, 1e-6);
    kst_grad_zero(g, 2);
    assert_float_equal(g[0] + g[1], 0.0f, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_losses_vs_torch),
        cmocka_unit_test(test_losses_by_hand),
        cmocka_unit_test(test_optim_vs_torch),
        cmocka_unit_test(test_schedule_edges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
