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

#include "core/npy.h"
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

#endif
