/* vq_code.c - query-weighted PQ codes and codebooks (see vq_code.h). Blocks of documents, every
 * product a GEMM (core/blas.h): e^T W e couples the sub-quantizers through W, so each document
 * keeps g = W e up to date as its codes change. */
#define _POSIX_C_SOURCE 200809L
#include "vq_code.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "train/vq_gpu.h"

int kst_vq_score_metric(size_t d, size_t n, const float *v, double lambda, float *W,
                        kst_error *err) {
    if (!(lambda >= 0 && lambda <= 1))
        return kst_fail(err, KST_ERR_INVALID, "score weight %g: expected a value in [0, 1]", lambda);
    if (lambda > 0 && n == 0)
        return kst_fail(err, KST_ERR_INVALID, "score weight %g needs query vectors; none given",
                        lambda);
    memset(W, 0, d * d * sizeof(float));
    if (lambda > 0)
        kst_sgemm(1, 0, (int)d, (int)d, (int)n, (float)(1.0 / (double)n), v, (int)d, v, (int)d,
                  0.0f, W, (int)d);
    double tr = 0;
    for (size_t i = 0; i < d; i++) tr += W[i * d + i];
    double sc = (lambda > 0 && tr > 0) ? lambda * (double)d / tr : 0;
    for (size_t i = 0; i < d * d; i++) W[i] = (float)(W[i] * sc);
    for (size_t i = 0; i < d; i++) W[i * d + i] += (float)(1.0 - lambda);
    /* Symmetric to the bit (the GEMM's two triangles may round differently). */
    for (size_t i = 0; i < d; i++)
        for (size_t j = i + 1; j < d; j++) W[j * d + i] = W[i * d + j];
    return KST_OK;
}

#define CODE_BLOCK 256

/* Scratch of one block of documents. */
typedef struct blk {
    float *R, *RHO, *G, *H, *S, *D, *BN; /* (nb,d) x3, (nb,ds), (nb,K), (nb,ds), (M,K) */
} blk;

static void blk_free(blk *b) {
    kst_free(b->R), kst_free(b->RHO), kst_free(b->G), kst_free(b->H), kst_free(b->S),
        kst_free(b->D), kst_free(b->BN);
    memset(b, 0, sizeof *b);
}

static int blk_alloc(blk *b, const kst_vq_model *m, size_t nb, kst_error *err) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    memset(b, 0, sizeof *b);
    b->R = kst_malloc(nb * d, sizeof(float), "PQ code residuals", err);
    b->RHO = kst_malloc(nb * d, sizeof(float), "PQ code reconstructions", err);
    b->G = kst_malloc(nb * d, sizeof(float), "PQ code weighted errors", err);
    b->H = kst_malloc(nb * ds, sizeof(float), "PQ code targets", err);
    b->S = kst_malloc(nb * K, sizeof(float), "PQ code scores", err);
    b->D = kst_malloc(nb * ds, sizeof(float), "PQ code changes", err);
    b->BN = kst_malloc(m->M * K, sizeof(float), "codeword norms", err);
    if (!b->R || !b->RHO || !b->G || !b->H || !b->S || !b->D || !b->BN) {
        blk_free(b);
        return KST_ERR_NOMEM;
    }
    return KST_OK;
}

/* BN[m,k] = B[m,k]^T W_mm B[m,k] (W NULL: |B[m,k]|^2). tmp: (K, ds). */
static void codeword_norms(const kst_vq_model *m, const float *W, float *BN, float *tmp) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    for (size_t sm = 0; sm < m->M; sm++) {
        const float *cb = m->codebook + sm * K * ds;
        const float *bw = cb;
        if (W) {
            kst_sgemm(0, 0, (int)K, (int)ds, (int)ds, 1.0f, cb, (int)ds, W + sm * ds * d + sm * ds,
                      (int)d, 0.0f, tmp, (int)ds);
            bw = tmp;
        }
        for (size_t k = 0; k < K; k++) {
            double s = 0;
            for (size_t i = 0; i < ds; i++) s += (double)bw[k * ds + i] * cb[k * ds + i];
            BN[sm * K + k] = (float)s;
        }
    }
}

/* Rows i0 .. i0+nb: R = y - C[a]; codes (nb, M) nearest (|.|^2) unless keep; RHO from codes. */
static void block_start(const kst_vq_model *m, const float *y, const int32_t *assign, size_t i0,
                        size_t nb, uint8_t *codes, int keep, blk *b, const float *BN_l2) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    for (size_t u = 0; u < nb; u++) {
        const float *yu = y + (i0 + u) * d, *c = m->centroids + (size_t)assign[i0 + u] * d;
        for (size_t i = 0; i < d; i++) b->R[u * d + i] = yu[i] - c[i];
    }
    for (size_t sm = 0; sm < m->M; sm++) {
        const float *cb = m->codebook + sm * K * ds;
        if (!keep) {
            kst_sgemm(0, 1, (int)nb, (int)K, (int)ds, 1.0f, b->R + sm * ds, (int)d, cb, (int)ds,
                      0.0f, b->S, (int)K);
            for (size_t u = 0; u < nb; u++) {
                const float *su = b->S + u * K;
                size_t kh = 0;
                float best = FLT_MAX;
                for (size_t k = 0; k < K; k++) {
                    float dist = BN_l2[sm * K + k] - 2.0f * su[k];
                    if (dist < best) best = dist, kh = k;
                }
                codes[(i0 + u) * m->M + sm] = (uint8_t)kh;
            }
        }
        for (size_t u = 0; u < nb; u++)
            memcpy(b->RHO + u * d + sm * ds, cb + (size_t)codes[(i0 + u) * m->M + sm] * ds,
                   ds * sizeof(float));
    }
}

/* G = (R - RHO) W for the block (W NULL: G = R - RHO), as R W - RHO W (no copy of E needed). */
static void block_g(const kst_vq_model *m, size_t nb, const float *W, blk *b) {
    size_t d = (size_t)m->d;
    for (size_t i = 0; i < nb * d; i++) b->G[i] = b->R[i] - b->RHO[i];
    if (!W) return;
    kst_sgemm(0, 0, (int)nb, (int)d, (int)d, 1.0f, b->R, (int)d, W, (int)d, 0.0f, b->G, (int)d);
    kst_sgemm(0, 0, (int)nb, (int)d, (int)d, -1.0f, b->RHO, (int)d, W, (int)d, 1.0f, b->G, (int)d);
}

/* H = G_m + RHO_m W_mm (nb, ds): the W-weighted target of sub-quantizer sm. */
static void block_h(const kst_vq_model *m, size_t nb, const float *W, size_t sm, blk *b) {
    size_t d = (size_t)m->d, ds = m->dsub;
    for (size_t u = 0; u < nb; u++) memcpy(b->H + u * ds, b->G + u * d + sm * ds, ds * sizeof(float));
    if (W)
        kst_sgemm(0, 0, (int)nb, (int)ds, (int)ds, 1.0f, b->RHO + sm * ds, (int)d,
                  W + sm * ds * d + sm * ds, (int)d, 1.0f, b->H, (int)ds);
    else
        for (size_t u = 0; u < nb; u++)
            for (size_t i = 0; i < ds; i++) b->H[u * ds + i] += b->RHO[u * d + sm * ds + i];
}

/* G += D W[sm rows] (D (nb, ds): the change of e_m). */
static void block_g_update(const kst_vq_model *m, size_t nb, const float *W, size_t sm, blk *b) {
    size_t d = (size_t)m->d, ds = m->dsub;
    if (W)
        kst_sgemm(0, 0, (int)nb, (int)d, (int)ds, 1.0f, b->D, (int)ds, W + sm * ds * d, (int)d,
                  1.0f, b->G, (int)d);
    else
        for (size_t u = 0; u < nb; u++)
            for (size_t i = 0; i < ds; i++) b->G[u * d + sm * ds + i] += b->D[u * ds + i];
}

int kst_vq_encode(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                  uint8_t *codes, long *rounds, kst_error *err) {
    if (m->device == KST_DEV_CUDA) return kst_vq_gpu_encode(m, n, y, assign, codes, rounds, err);
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    const float *W = m->wq;
    if (rounds) *rounds = 0;
    blk b;
    if (blk_alloc(&b, m, n < CODE_BLOCK ? (n ? n : 1) : CODE_BLOCK, err) != KST_OK)
        return KST_ERR_NOMEM;
    float *BN_l2 = kst_malloc(m->M * K, sizeof(float), "codeword norms", err);
    float *tmp = kst_malloc(K * ds, sizeof(float), "codeword products", err);
    if (!BN_l2 || !tmp) {
        kst_free(BN_l2), kst_free(tmp), blk_free(&b);
        return KST_ERR_NOMEM;
    }
    codeword_norms(m, NULL, BN_l2, tmp);
    if (W) codeword_norms(m, W, b.BN, tmp);
    for (size_t i0 = 0; i0 < n; i0 += CODE_BLOCK) {
        size_t nb = n - i0 < CODE_BLOCK ? n - i0 : CODE_BLOCK;
        block_start(m, y, assign, i0, nb, codes, 0, &b, BN_l2);
        if (!W || m->wq_iters <= 0) continue;
        block_g(m, nb, W, &b);
        long it;
        for (it = 0; it < m->wq_iters; it++) {
            size_t changed = 0;
            for (size_t sm = 0; sm < m->M; sm++) {
                const float *cb = m->codebook + sm * K * ds, *bn = b.BN + sm * K;
                block_h(m, nb, W, sm, &b);
                kst_sgemm(0, 1, (int)nb, (int)K, (int)ds, 1.0f, b.H, (int)ds, cb, (int)ds, 0.0f,
                          b.S, (int)K);
                memset(b.D, 0, nb * ds * sizeof(float));
                size_t ch = 0;
                for (size_t u = 0; u < nb; u++) {
                    const float *su = b.S + u * K;
                    uint8_t *cu = codes + (i0 + u) * m->M + sm;
                    size_t kc = *cu, kh = kc;
                    float best = bn[kc] - 2.0f * su[kc];
                    for (size_t k = 0; k < K; k++) {
                        float c = bn[k] - 2.0f * su[k];
                        if (c < best) best = c, kh = k;
                    }
                    if (kh == kc) continue;
                    /* e_m = r_m - B_k: it changes by B_old - B_new. */
                    for (size_t i = 0; i < ds; i++)
                        b.D[u * ds + i] = cb[kc * ds + i] - cb[kh * ds + i];
                    memcpy(b.RHO + u * d + sm * ds, cb + kh * ds, ds * sizeof(float));
                    *cu = (uint8_t)kh;
                    ch++;
                }
                if (ch) block_g_update(m, nb, W, sm, &b);
                changed += ch;
            }
            if (!changed) break;
        }
        if (rounds && it > *rounds) *rounds = it;
    }
    kst_free(BN_l2), kst_free(tmp), blk_free(&b);
    return KST_OK;
}

double kst_vq_weighted_error(const kst_vq_model *m, size_t n, const float *y,
                             const int32_t *assign, const uint8_t *codes) {
    size_t d = (size_t)m->d;
    blk b;
    if (n == 0 || blk_alloc(&b, m, n < CODE_BLOCK ? n : CODE_BLOCK, NULL) != KST_OK) return 0;
    double acc = 0;
    for (size_t i0 = 0; i0 < n; i0 += CODE_BLOCK) {
        size_t nb = n - i0 < CODE_BLOCK ? n - i0 : CODE_BLOCK;
        block_start(m, y, assign, i0, nb, (uint8_t *)codes, 1, &b, NULL);
        block_g(m, nb, m->wq, &b);
        for (size_t i = 0; i < nb * d; i++) acc += (double)(b.R[i] - b.RHO[i]) * b.G[i];
    }
    blk_free(&b);
    return acc / (double)n;
}

/* Solves A x = b for the symmetric positive definite A (n, n) by Cholesky, in double; A is
 * overwritten by its factor, b (n) by x. Returns 0, or -1 when A is not positive definite. */
static int chol_factor(double *A, size_t n) {
    for (size_t j = 0; j < n; j++) {
        double s = A[j * n + j];
        for (size_t k = 0; k < j; k++) s -= A[j * n + k] * A[j * n + k];
        if (!(s > 0)) return -1;
        A[j * n + j] = sqrt(s);
        for (size_t i = j + 1; i < n; i++) {
            double t = A[i * n + j];
            for (size_t k = 0; k < j; k++) t -= A[i * n + k] * A[j * n + k];
            A[i * n + j] = t / A[j * n + j];
        }
    }
    return 0;
}

static void chol_solve(const double *L, size_t n, double *b) {
    for (size_t i = 0; i < n; i++) {
        double s = b[i];
        for (size_t k = 0; k < i; k++) s -= L[i * n + k] * b[k];
        b[i] = s / L[i * n + i];
    }
    for (size_t i = n; i-- > 0;) {
        double s = b[i];
        for (size_t k = i + 1; k < n; k++) s -= L[k * n + i] * b[k];
        b[i] = s / L[i * n + i];
    }
}

int kst_vq_refit_solve(const kst_vq_model *m, size_t sm, const double *acc, const size_t *cnt,
                       float *newb, kst_error *err) {
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub;
    const float *W = m->wq, *cb = m->codebook + sm * K * ds;
    if (ds > 256) return kst_fail(err, KST_ERR_UNSUPPORTED, "refit: sub-vectors of %zu > 256", ds);
    double x[256];
    double *F = kst_malloc(ds * ds, sizeof(double), "refit factor", err);
    if (!F) return KST_ERR_NOMEM;
    for (size_t i = 0; i < ds; i++)
        for (size_t j = 0; j < ds; j++)
            F[i * ds + j] = W ? (double)W[(sm * ds + i) * d + sm * ds + j] : (double)(i == j);
    if (chol_factor(F, ds) != 0) {
        kst_free(F);
        return kst_fail(err, KST_ERR_INVALID, "refit: the score metric's block %zu is not "
                        "positive definite (use a score weight below 1)", sm);
    }
    memcpy(newb, cb, K * ds * sizeof(float));
    for (size_t k = 0; k < K; k++) {
        if (!cnt[k]) continue;
        for (size_t i = 0; i < ds; i++) x[i] = acc[k * ds + i] / (double)cnt[k];
        chol_solve(F, ds, x);
        for (size_t i = 0; i < ds; i++) newb[k * ds + i] = (float)x[i];
    }
    kst_free(F);
    return KST_OK;
}

int kst_vq_refit(kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                 const uint8_t *codes, double *obj_before, double *obj_after, kst_error *err) {
    if (m->device == KST_DEV_CUDA)
        return kst_vq_gpu_refit(m, n, y, assign, codes, obj_before, obj_after, err);
    size_t d = (size_t)m->d, ds = m->dsub, K = m->ksub, M = m->M;
    const float *W = m->wq;
    if (obj_before) *obj_before = kst_vq_weighted_error(m, n, y, assign, codes);
    if (n == 0) {
        if (obj_after) *obj_after = 0;
        return KST_OK;
    }
    /* All documents at once: G and RHO of every document (n, d) stay current across the
     * sub-quantizers (the caller bounds n: train/vq.c refits on a sample). */
    int rc = KST_OK;
    blk b;
    memset(&b, 0, sizeof b);
    double *acc = kst_calloc(K * ds, sizeof(double), "refit sums", err);
    size_t *cnt = kst_calloc(K, sizeof(size_t), "refit counts", err);
    float *newb = kst_malloc(K * ds, sizeof(float), "refit codewords", err);
    if (!acc || !cnt || !newb || blk_alloc(&b, m, n, err) != KST_OK) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    block_start(m, y, assign, 0, n, (uint8_t *)codes, 1, &b, NULL);
    block_g(m, n, W, &b);
    for (size_t sm = 0; sm < M; sm++) {
        float *cb = m->codebook + sm * K * ds;
        block_h(m, n, W, sm, &b);
        memset(acc, 0, K * ds * sizeof(double));
        memset(cnt, 0, K * sizeof(size_t));
        for (size_t u = 0; u < n; u++) {
            size_t k = codes[u * M + sm];
            cnt[k]++;
            for (size_t i = 0; i < ds; i++) acc[k * ds + i] += b.H[u * ds + i];
        }
        KST_TRY(kst_vq_refit_solve(m, sm, acc, cnt, newb, err));
        /* e_m changes by B_old - B_new for every document; G and RHO follow. */
        for (size_t u = 0; u < n; u++) {
            size_t k = codes[u * M + sm];
            for (size_t i = 0; i < ds; i++) b.D[u * ds + i] = cb[k * ds + i] - newb[k * ds + i];
            memcpy(b.RHO + u * d + sm * ds, newb + k * ds, ds * sizeof(float));
        }
        block_g_update(m, n, W, sm, &b);
        memcpy(cb, newb, K * ds * sizeof(float));
    }
    if (obj_after) *obj_after = kst_vq_weighted_error(m, n, y, assign, codes);
done:
    kst_free(acc), kst_free(cnt), kst_free(newb), blk_free(&b);
    return rc;
}
