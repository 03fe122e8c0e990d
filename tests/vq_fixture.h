/* vq_fixture.h - the Distill-VQ model of a tests/fixtures/fx_vq*.py fixture: centroids C (nlist, d)
 * and codebooks B (M, ksub, dsub) copied into one parameter buffer (freed by the caller), the
 * temperatures tau; y gives the dimension. Shared by test_vq.c and test_vq_qenc.c; include it after
 * harness.h (assert_ok). */
#ifndef KST_TESTS_VQ_FIXTURE_H
#define KST_TESTS_VQ_FIXTURE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <math.h>

#include "core/gpu.h"
#include "core/npy.h"
#include "train/vq_code.h"
#include "train/teacher.h"
#include "train/vq.h"

/* DIR/NAME.npy, which must read (a failed read fails the test) */
static inline kst_npy vq_fixture_load(const char *dir, const char *name) {
    char p[256];
    snprintf(p, sizeof p, "%s%s.npy", dir, name);
    kst_npy a;
    kst_error err;
    assert_ok(kst_npy_read(p, &a, &err), &err);
    return a;
}

static inline void vq_model_from_fixture(kst_vq_model *m, const kst_npy *y, const kst_npy *C, const kst_npy *B,
                                         const kst_npy *tau) {
    memset(m, 0, sizeof *m);
    m->d_in = m->d = (int)y->shape[1];
    m->nlist = C->shape[0];
    m->M = B->shape[0], m->ksub = B->shape[1], m->dsub = B->shape[2];
    m->nparams = C->count + B->count;
    m->params = malloc(m->nparams * sizeof(float));
    memcpy(m->params, C->data, C->count * sizeof(float));
    memcpy(m->params + C->count, B->data, B->count * sizeof(float));
    m->centroids = m->params, m->codebook = m->params + C->count;
    m->tau = tau->data;
}

/* Clustered, anisotropic unit vectors (n, SD) (at most 64 dimensions): 24 centres, per-centre
 * noise scaled per dimension. Shared by test_vq.c and test_vq_gpu.c (malloc'd). */
static inline float *vq_synthetic(size_t n, int SD, uint64_t seed) {
    kst_xoshiro r;
    kst_xoshiro_seed(&r, seed);
    float *x = malloc(n * SD * sizeof(float)), cen[24][64];
#define U01() ((double)(kst_xoshiro_next(&r) >> 11) / 9007199254740992.0)
#define GAUSS() (sqrt(-2 * log(U01() + 1e-12)) * cos(6.283185307179586 * U01()))
    for (int c = 0; c < 24; c++)
        for (int j = 0; j < SD; j++) cen[c][j] = (float)GAUSS();
    for (size_t i = 0; i < n; i++) {
        int c = (int)(kst_xoshiro_next(&r) % 24);
        double nn = 0;
        for (int j = 0; j < SD; j++) {
            float v = cen[c][j] + (float)(GAUSS() * (0.3 + 0.7 * (j % 4) / 3.0));
            x[i * SD + j] = v;
            nn += (double)v * v;
        }
        for (int j = 0; j < SD; j++) x[i * SD + j] /= (float)sqrt(nn);
    }
#undef GAUSS
#undef U01
    return x;
}

/* Query-weighted codes and codebook refit on `device` against the NumPy reference
 * (tests/fixtures/vq_code, fx_vq_code.py): the same metric W, the same codes (the reference
 * evaluates every candidate's e^T W e in full), the same refit codebooks (solved there by least
 * squares, here by the normal equations) and objectives; off the CPU, the CPU's codes too.
 * Shared by test_vq.c (CPU) and test_vq_gpu.c (GPU). */
static inline void vq_code_fixture_check(int device) {
    const char *dir = "tests/fixtures/vq_code/";
    kst_npy y = vq_fixture_load(dir, "y"), C = vq_fixture_load(dir, "C"), B = vq_fixture_load(dir, "B"),
            q = vq_fixture_load(dir, "q"), assign = vq_fixture_load(dir, "assign"),
            W = vq_fixture_load(dir, "W"), codes = vq_fixture_load(dir, "codes"),
            B1 = vq_fixture_load(dir, "B1"), sc = vq_fixture_load(dir, "scalars");
    const float *s = sc.data;
    size_t n = y.shape[0], d = y.shape[1];
    float *tau = calloc(B.shape[0], sizeof(float));
    kst_npy tn = {0};
    tn.data = tau;
    kst_vq_model m;
    vq_model_from_fixture(&m, &y, &C, &B, &tn);
    m.device = device;
    kst_error err;
    float *w = malloc(d * d * sizeof(float));
    assert_ok(kst_vq_score_metric(d, q.shape[0], q.data, s[0], w, &err), &err);
    assert_close_f32("W", w, W.data, d * d, 1e-5, 1e-5);
    const int32_t *a = (const int32_t *)(const void *)assign.data;
    uint8_t *got = malloc(n * m.M);
    /* Without a metric: the nearest codes, and e^T I e is the reconstruction error. */
    assert_ok(kst_vq_encode(&m, n, y.data, a, got, NULL, &err), &err);
    m.wq = w, m.wq_iters = (long)s[1];
    double e0 = kst_vq_weighted_error(&m, n, y.data, a, got);
    assert_true(fabs(e0 - s[2]) < 1e-5 * (1 + fabs(s[2])));
    long rounds;
    assert_ok(kst_vq_encode(&m, n, y.data, a, got, &rounds, &err), &err);
    const int32_t *want = (const int32_t *)(const void *)codes.data;
    size_t diff = 0;
    for (size_t i = 0; i < n * m.M; i++) diff += got[i] != want[i];
    fprintf(stderr, "  %s codes: %zu of %zu differ from NumPy's; %ld rounds\n",
            kst_device_name(device), diff, n * m.M, rounds);
    assert_int_equal(diff, 0);
    assert_true(rounds >= 1 && rounds <= m.wq_iters);
    double before, after;
    assert_ok(kst_vq_refit(&m, n, y.data, a, got, &before, &after, &err), &err);
    fprintf(stderr, "  %s e^T W e: nearest %.6f, encoded %.6f (ref %.6f), refit %.6f (ref %.6f)\n",
            kst_device_name(device), e0, before, s[3], after, s[4]);
    assert_true(fabs(before - s[3]) < 1e-5 * (1 + s[3]));
    assert_true(fabs(after - s[4]) < 1e-5 * (1 + s[4]));
    assert_close_f32("refit B", m.codebook, B1.data, B1.count, 1e-4, 1e-4);
    if (device != KST_DEV_CPU) { /* the CPU twin gives the same codes with the refit codebooks */
        uint8_t *cpu = malloc(n * m.M);
        m.device = KST_DEV_CPU;
        assert_ok(kst_vq_encode(&m, n, y.data, a, cpu, NULL, &err), &err);
        m.device = device;
        assert_ok(kst_vq_encode(&m, n, y.data, a, got, NULL, &err), &err);
        assert_memory_equal(cpu, got, n * m.M);
        free(cpu);
    }
    /* Bad input: a weight outside [0, 1]. */
    assert_int_equal(kst_vq_score_metric(d, q.shape[0], q.data, 1.5, w, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "[0, 1]");
    free(m.params), free(w), free(got), free(tau);
    kst_npy_free(&y), kst_npy_free(&C), kst_npy_free(&B), kst_npy_free(&q), kst_npy_free(&assign);
    kst_npy_free(&W), kst_npy_free(&codes), kst_npy_free(&B1), kst_npy_free(&sc);
}

#endif
