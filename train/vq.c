/* vq.c - Distill-VQ: the students' forward/backward, the training loop, and the write-back into a
 * FAISS IndexIVFPQ (see vq.h for the method). */
#define _POSIX_C_SOURCE 200809L
#include "vq.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "core/progress.h"
#include "index/faiss_ext.h"
#include "train/optim.h"
#include "train/teacher.h"
#include "train/vq_code.h"
#include "train/vq_gpu.h"
#include "train/vq_qenc.h"

/* ---------------------------------------------------------------------------------------------
 * Model
 * ------------------------------------------------------------------------------------------- */

static int faiss_fail(kst_error *err, int code, const char *what) {
    const char *msg = faiss_get_last_error();
    return kst_fail(err, code, "%s: %s", what, msg ? msg : "FAISS failed without a message");
}

void kst_vq_model_free(kst_vq_model *m) {
    if (!m) return;
    kst_free(m->params);
    kst_free(m->rot);
    kst_free(m->tau);
    kst_free(m->wq);
    memset(m, 0, sizeof *m);
}

int kst_vq_model_from_index(kst_ann *ann, kst_vq_model *out, kst_error *err) {
    memset(out, 0, sizeof *out);
    FaissIndex *fi = (FaissIndex *)kst_ann_faiss(ann);
    kst_faiss_layout l;
    if (kst_faiss_layout_get(fi, &l) != 0) return faiss_fail(err, KST_ERR_INTERNAL, "layout");
    if (!l.nlist || !l.pq_M)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "Distill-VQ needs an IVF-PQ index (IVFn,PQm or OPQm,IVFn,PQm); this one "
                        "has %s", !l.nlist ? "no IVF layer (Flat/HNSW: nothing to learn)" : "no PQ");
    if (!l.is_trained) return kst_fail(err, KST_ERR_MISUSE, "the IVF-PQ index is not trained");
    if (l.metric != METRIC_INNER_PRODUCT)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "metric %d: Distill-VQ here is for inner product",
                        l.metric);
    if (l.pq_nbits != 8)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "PQ codes of %zu bits: only 8-bit codes (PQmx8)",
                        l.pq_nbits);
    if (!l.by_residual)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "the PQ encodes vectors, not residuals "
                                                  "(by_residual off)");
    if (l.opq_d_in && (l.opq_d_in != l.d || l.opq_d_out != l.d))
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "pre-transform %d -> %d: only a square OPQ rotation is supported",
                        l.opq_d_in, l.opq_d_out);
    out->d_in = l.d;
    out->d = l.ivf_d;
    out->nlist = l.nlist;
    out->M = l.pq_M;
    out->ksub = l.pq_ksub;
    out->dsub = l.pq_dsub;
    out->nparams = l.nlist * (size_t)l.ivf_d + l.pq_M * l.pq_ksub * l.pq_dsub;
    int rc = KST_OK;
    out->params = kst_malloc(out->nparams, sizeof(float), "Distill-VQ parameters", err);
    out->tau = kst_malloc(l.pq_M, sizeof(float), "Distill-VQ temperatures", err);
    if (!out->params || !out->tau) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    out->centroids = out->params;
    out->codebook = out->params + l.nlist * (size_t)l.ivf_d;
    for (size_t m = 0; m < l.pq_M; m++) out->tau[m] = 1.0f;
    if (kst_faiss_ivf_centroids_get(fi, out->centroids) != 0) {
        rc = faiss_fail(err, KST_ERR_INVALID, "IVF centroids");
        goto done;
    }
    if (kst_faiss_pq_codebook_get(fi, out->codebook) != 0) {
        rc = faiss_fail(err, KST_ERR_INVALID, "PQ codebook");
        goto done;
    }
    if (l.opq_d_in) {
        out->rot = kst_malloc((size_t)l.d * (size_t)l.d, sizeof(float), "OPQ matrix", err);
        if (!out->rot) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        if (kst_faiss_opq_matrix_get(fi, out->rot) != 0) {
            rc = faiss_fail(err, KST_ERR_INVALID, "OPQ matrix");
            goto done;
        }
    }
done:
    if (rc != KST_OK) kst_vq_model_free(out);
    return rc;
}

void kst_vq_rotate(const kst_vq_model *m, size_t n, const float *x, float *y) {
    if (!n) return;
    if (!m->rot) {
        memcpy(y, x, n * (size_t)m->d * sizeof(float));
        return;
    }
    kst_sgemm(0, 1, (int)n, m->d, m->d_in, 1.0f, x, m->d_in, m->rot, m->d_in, 0.0f, y, m->d);
}

static float dot(const float *a, const float *b, size_t n) {
    float s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

#define ASSIGN_BLOCK 512

void kst_vq_assign(const kst_vq_model *m, size_t n, const float *y, int32_t *assign) {
    size_t nl = m->nlist, d = (size_t)m->d;
    float *s = kst_malloc(ASSIGN_BLOCK * nl, sizeof(float), "assign", NULL);
    for (size_t i0 = 0; i0 < n; i0 += ASSIGN_BLOCK) {
        size_t b = n - i0 < ASSIGN_BLOCK ? n - i0 : ASSIGN_BLOCK;
        if (s) kst_sgemm(0, 1, (int)b, (int)nl, (int)d, 1.0f, y + i0 * d, (int)d, m->centroids,
                         (int)d, 0.0f, s, (int)nl);
        for (size_t i = 0; i < b; i++) {
            int32_t best = 0;
            float bv = -FLT_MAX;
            for (size_t j = 0; j < nl; j++) {
                float v = s ? s[i * nl + j] : dot(y + (i0 + i) * d, m->centroids + j * d, d);
                if (v > bv) bv = v, best = (int32_t)j;
            }
            assign[i0 + i] = best;
        }
    }
    kst_free(s);
}

/* Hard PQ code of residual sub-vector r (dsub) in codebook cb (ksub, dsub). */
static int nearest_code(const float *r, const float *cb, size_t ksub, size_t dsub) {
    int best = 0;
    float bd = FLT_MAX;
    for (size_t k = 0; k < ksub; k++) {
        float dd = 0;
        for (size_t i = 0; i < dsub; i++) {
            float t = r[i] - cb[k * dsub + i];
            dd += t * t;
        }
        if (dd < bd) bd = dd, best = (int)k;
    }
    return best;
}

/* r = y - C[a]; rho = decode(hard codes of r) (both d). */
static void residual_and_code(const kst_vq_model *m, const float *y, int32_t a, float *r,
                              float *rho, uint8_t *codes) {
    size_t d = (size_t)m->d, ds = m->dsub;
    const float *c = m->centroids + (size_t)a * d;
    for (size_t i = 0; i < d; i++) r[i] = y[i] - c[i];
    for (size_t s = 0; s < m->M; s++) {
        const float *cb = m->codebook + s * m->ksub * ds;
        int k = nearest_code(r + s * ds, cb, m->ksub, ds);
        if (codes) codes[s] = (uint8_t)k;
        memcpy(rho + s * ds, cb + (size_t)k * ds, ds * sizeof(float));
    }
}

void kst_vq_reconstruct(const kst_vq_model *m, size_t n, const float *y, const int32_t *assign,
                        float *recon, uint8_t *codes) {
    size_t d = (size_t)m->d;
    if (m->wq) {
        uint8_t *cw = codes ? codes : kst_malloc(n > 0 ? n * m->M : 1, 1, "codes", NULL);
        if (!cw || kst_vq_encode(m, n, y, assign, cw, NULL, NULL) != KST_OK) {
            if (cw != codes) kst_free(cw);
            return;
        }
        for (size_t i = 0; i < n; i++) {
            const float *c = m->centroids + (size_t)assign[i] * d;
            for (size_t s = 0; s < m->M; s++) {
                const float *cb = m->codebook + (s * m->ksub + cw[i * m->M + s]) * m->dsub;
                for (size_t j = 0; j < m->dsub; j++)
                    recon[i * d + s * m->dsub + j] = c[s * m->dsub + j] + cb[j];
            }
        }
        if (cw != codes) kst_free(cw);
        return;
    }
    float *r = kst_malloc(d, sizeof(float), "residual", NULL);
    if (!r) return;
    for (size_t i = 0; i < n; i++) {
        float *out = recon + i * d;
        residual_and_code(m, y + i * d, assign[i], r, out, codes ? codes + i * m->M : NULL);
        const float *c = m->centroids + (size_t)assign[i] * d;
        for (size_t j = 0; j < d; j++) out[j] += c[j];
    }
    kst_free(r);
}

/* ---------------------------------------------------------------------------------------------
 * One batch: forward and backward
 * ------------------------------------------------------------------------------------------- */

/* Cross-entropy between softmax(t/T) and softmax(s/T) over n scores; g (may be NULL) gets
 * d CE / d s = (softmax(s/T) - softmax(t/T)) / T. */
static double listwise_ce(const float *t, const float *s, size_t n, double T, float *g) {
    double tmax = -DBL_MAX, smax = -DBL_MAX;
    for (size_t i = 0; i < n; i++) {
        if (t[i] > tmax) tmax = t[i];
        if (s[i] > smax) smax = s[i];
    }
    double zt = 0, zs = 0;
    for (size_t i = 0; i < n; i++) {
        zt += exp((t[i] - tmax) / T);
        zs += exp((s[i] - smax) / T);
    }
    double lzs = log(zs), loss = 0;
    for (size_t i = 0; i < n; i++) {
        double p = exp((t[i] - tmax) / T) / zt;
        double logq = (s[i] - smax) / T - lzs;
        loss -= p * logq;
        if (g) g[i] = (float)((exp(logq) - p) / T);
    }
    return loss;
}

int kst_vq_batch(const kst_vq_model *m, size_t B, const float *q, const size_t *off,
                 const int64_t *cand, const float *teacher, size_t ndocs, const float *y,
                 const int32_t *assign, double T, double w_ivf, double w_pq, float *grad,
                 double *loss_ivf, double *loss_pq, kst_error *err) {
    return kst_vq_batch_q(m, B, q, off, cand, teacher, ndocs, y, assign, T, w_ivf, w_pq, grad,
                          NULL, loss_ivf, loss_pq, err);
}

int kst_vq_batch_q(const kst_vq_model *m, size_t B, const float *q, const size_t *off,
                   const int64_t *cand, const float *teacher, size_t ndocs, const float *y,
                   const int32_t *assign, double T, double w_ivf, double w_pq, float *grad,
                   float *dq, double *loss_ivf, double *loss_pq, kst_error *err) {
    size_t d = (size_t)m->d, N = off[B], ds = m->dsub, K = m->ksub;
    for (size_t b = 0; b < B; b++)
        if (off[b + 1] <= off[b])
            return kst_fail(err, KST_ERR_INVALID, "Distill-VQ: query %zu has no candidates", b);
    int rc = KST_OK;
    int32_t *slot = kst_malloc(ndocs, sizeof(int32_t), "doc slots", err);
    int64_t *uniq = kst_malloc(N, sizeof(int64_t), "batch docs", err);
    int32_t *cslot = kst_malloc(N, sizeof(int32_t), "candidate slots", err);
    float *s = kst_malloc(4 * N, sizeof(float), "scores", err);
    float *R = NULL, *RHO = NULL, *V = NULL, *DR = NULL, *P = NULL, *VB = NULL, *BN = NULL;
    uint8_t *CODE = NULL;
    if (!slot || !uniq || !cslot || !s) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < ndocs; i++) slot[i] = -1;
    size_t U = 0;
    for (size_t j = 0; j < N; j++) {
        int64_t doc = cand[j];
        if (doc < 0 || (size_t)doc >= ndocs) {
            rc = kst_fail(err, KST_ERR_INVALID, "Distill-VQ: candidate %lld out of range (%zu docs)",
                          (long long)doc, ndocs);
            goto done;
        }
        if (slot[doc] < 0) slot[doc] = (int32_t)U, uniq[U++] = doc;
        cslot[j] = slot[doc];
    }
    R = kst_malloc(U * d, sizeof(float), "residuals", err);
    RHO = kst_malloc(U * d, sizeof(float), "PQ reconstructions", err);
    CODE = kst_malloc(U * m->M, 1, "PQ codes", err);
    if (!R || !RHO || !CODE) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    /* Residuals, then each sub-quantizer's hard codes from one GEMM: argmin_k |B_k|^2 - 2 r.B_k
     * (the scalar search of residual_and_code, ~10x slower, dominated the step at 100K+). */
    for (size_t u = 0; u < U; u++) {
        const float *yu = y + (size_t)uniq[u] * d, *c = m->centroids + (size_t)assign[uniq[u]] * d;
        for (size_t i = 0; i < d; i++) R[u * d + i] = yu[i] - c[i];
    }
    P = kst_malloc(U * K, sizeof(float), "soft assignments", err);
    VB = kst_malloc(K, sizeof(float), "codeword norms", err);
    if (!P || !VB) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t sm = 0; sm < m->M; sm++) {
        const float *cb = m->codebook + sm * K * ds;
        for (size_t k = 0; k < K; k++) VB[k] = dot(cb + k * ds, cb + k * ds, ds);
        kst_sgemm(0, 1, (int)U, (int)K, (int)ds, 1.0f, R + sm * ds, (int)d, cb, (int)ds, 0.0f, P,
                  (int)K);
        for (size_t u = 0; u < U; u++) {
            const float *pu = P + u * K;
            size_t kh = 0;
            float best = FLT_MAX;
            for (size_t k = 0; k < K; k++) {
                float dist = VB[k] - 2.0f * pu[k];
                if (dist < best) best = dist, kh = k;
            }
            memcpy(RHO + u * d + sm * ds, cb + kh * ds, ds * sizeof(float));
            CODE[u * m->M + sm] = (uint8_t)kh;
        }
    }
    kst_free(P);
    kst_free(VB);
    P = VB = NULL;

    /* Scores and the listwise losses. s: [s_ivf | s_pq | g_ivf | g_pq], each (N). */
    float *s_ivf = s, *s_pq = s + N, *g_ivf = s + 2 * N, *g_pq = s + 3 * N;
    double li = 0, lp = 0;
    for (size_t b = 0; b < B; b++) {
        const float *qb = q + b * d;
        for (size_t j = off[b]; j < off[b + 1]; j++) {
            size_t u = (size_t)cslot[j];
            s_ivf[j] = dot(qb, m->centroids + (size_t)assign[uniq[u]] * d, d);
            s_pq[j] = s_ivf[j] + dot(qb, RHO + u * d, d);
        }
        size_t n = off[b + 1] - off[b];
        li += listwise_ce(teacher + off[b], s_ivf + off[b], n, T, g_ivf + off[b]);
        lp += listwise_ce(teacher + off[b], s_pq + off[b], n, T, g_pq + off[b]);
    }
    if (loss_ivf) *loss_ivf = li / (double)B;
    if (loss_pq) *loss_pq = lp / (double)B;
    /* The students' scores are linear in q: dL/dq_b = sum_j (w_ivf g_ivf + w_pq g_pq) C[a_j]
     * + w_pq g_pq rho_j, over B (the batch mean). */
    for (size_t b = 0; dq && b < B; b++) {
        float *g = dq + b * d;
        for (size_t j = off[b]; j < off[b + 1]; j++) {
            size_t u = (size_t)cslot[j];
            float gc = (float)((w_ivf * g_ivf[j] + w_pq * g_pq[j]) / (double)B);
            float gr = (float)(w_pq * g_pq[j] / (double)B);
            const float *c = m->centroids + (size_t)assign[uniq[u]] * d, *rho = RHO + u * d;
            for (size_t i = 0; i < d; i++) g[i] += gc * c[i] + gr * rho[i];
        }
    }
    if (!grad) goto done;

    /* Backward. dC[a] gets q times both students' score gradients; V (U, d) collects the
     * gradient reaching rho (the PQ student only). */
    float *dC = grad, *dB = grad + m->nlist * d;
    V = kst_calloc(U * d, sizeof(float), "rho gradients", err);
    DR = kst_calloc(U * d, sizeof(float), "residual gradients", err);
    if (!V || !DR) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t b = 0; b < B; b++) {
        const float *qb = q + b * d;
        for (size_t j = off[b]; j < off[b + 1]; j++) {
            size_t u = (size_t)cslot[j];
            float gc = (float)((w_ivf * g_ivf[j] + w_pq * g_pq[j]) / (double)B);
            float gr = (float)(w_pq * g_pq[j] / (double)B);
            float *dc = dC + (size_t)assign[uniq[u]] * d, *v = V + u * d;
            for (size_t i = 0; i < d; i++) dc[i] += gc * qb[i], v[i] += gr * qb[i];
        }
    }
    /* Straight-through through the soft assignment: soft = sum_k p_k B_k, p = softmax(l),
     * l_k = -|r - B_k|^2 / tau. With v = dL/d soft and u_k = p_k (v.B_k - v.soft):
     *   dL/dB_k += p_k v + u_k * 2 (r - B_k) / tau,   dL/dr = 2/tau sum_k u_k B_k
     * (the -2/tau r sum_k u_k term vanishes: sum_k u_k = 0), plus v on the hard codeword. Per
     * sub-quantizer m, over the batch's U documents, as GEMMs (R_m, V_m: (U, dsub), stride d):
     *   P = softmax_k(-(|r|^2 - 2 R_m B_m^T + |B|^2) / tau)        (U, K)
     *   W = P o (V_m B_m^T - rowsum(P o V_m B_m^T))                 (U, K)   u_k per document
     *   dB_m += P^T V_m + 2/tau (W^T R_m - colsum(W) o B_m),   dR_m = 2/tau W B_m */
    P = kst_malloc(U * K, sizeof(float), "soft assignments", err);
    VB = kst_malloc(U * K, sizeof(float), "soft products", err);
    BN = kst_malloc(K, sizeof(float), "codeword norms", err);
    if (!P || !VB || !BN) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t sm = 0; sm < m->M; sm++) {
        const float *cb = m->codebook + sm * K * ds, *Rm = R + sm * ds, *Vm = V + sm * ds;
        float *dcb = dB + sm * K * ds;
        float tau = m->tau[sm];
        for (size_t k = 0; k < K; k++) {
            double bnk = 0;
            for (size_t i = 0; i < ds; i++) bnk += (double)cb[k * ds + i] * cb[k * ds + i];
            BN[k] = (float)bnk;
        }
        kst_sgemm(0, 1, (int)U, (int)K, (int)ds, 1.0f, Rm, (int)d, cb, (int)ds, 0.0f, P, (int)K);
        kst_sgemm(0, 1, (int)U, (int)K, (int)ds, 1.0f, Vm, (int)d, cb, (int)ds, 0.0f, VB, (int)K);
        for (size_t u = 0; u < U; u++) {
            const float *r = Rm + u * d;
            float *pu = P + u * K, *vb = VB + u * K;
            double rn = 0, lmax = -DBL_MAX, z = 0, vs = 0;
            for (size_t i = 0; i < ds; i++) rn += (double)r[i] * r[i];
            int kh = CODE[u * m->M + sm]; /* the forward's hard code */
            for (size_t k = 0; k < K; k++) {
                double dist = rn - 2.0 * pu[k] + BN[k];
                double l = -dist / tau;
                pu[k] = (float)l;
                if (l > lmax) lmax = l;
            }
            for (size_t k = 0; k < K; k++) {
                double e = exp(pu[k] - lmax);
                pu[k] = (float)e;
                z += e;
            }
            for (size_t k = 0; k < K; k++) {
                pu[k] = (float)(pu[k] / z);
                vs += (double)pu[k] * vb[k];
            }
            for (size_t k = 0; k < K; k++) vb[k] = (float)(pu[k] * (vb[k] - vs)); /* W */
            /* The hard codeword is indexed from B too: it gets v directly (as C[a] does). */
            const float *v = Vm + u * d;
            for (size_t i = 0; i < ds; i++) dcb[(size_t)kh * ds + i] += v[i];
        }
        float two_tau = 2.0f / tau;
        kst_sgemm(1, 0, (int)K, (int)ds, (int)U, 1.0f, P, (int)K, Vm, (int)d, 1.0f, dcb, (int)ds);
        kst_sgemm(1, 0, (int)K, (int)ds, (int)U, two_tau, VB, (int)K, Rm, (int)d, 1.0f, dcb,
                  (int)ds);
        for (size_t k = 0; k < K; k++) {
            double cs = 0;
            for (size_t u = 0; u < U; u++) cs += VB[u * K + k];
            for (size_t i = 0; i < ds; i++) dcb[k * ds + i] -= (float)(two_tau * cs) * cb[k * ds + i];
        }
        kst_sgemm(0, 0, (int)U, (int)ds, (int)K, two_tau, VB, (int)K, cb, (int)ds, 0.0f,
                  DR + sm * ds, (int)d);
    }
    /* r = y - C[a]: dC[a] -= dL/dr. */
    for (size_t u = 0; u < U; u++) {
        float *dc = dC + (size_t)assign[uniq[u]] * d;
        const float *dr = DR + u * d;
        for (size_t i = 0; i < d; i++) dc[i] -= dr[i];
    }
done:
    kst_free(slot);
    kst_free(uniq);
    kst_free(cslot);
    kst_free(s);
    kst_free(R);
    kst_free(RHO);
    kst_free(V);
    kst_free(DR);
    kst_free(P);
    kst_free(VB);
    kst_free(BN);
    kst_free(CODE);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Training loop
 * ------------------------------------------------------------------------------------------- */

kst_vq_opts kst_vq_opts_default(void) {
    kst_vq_opts o;
    memset(&o, 0, sizeof o);
    o.epochs = 3;
    o.lr_ivf = 1e-3;
    o.lr_pq = 1e-3;
    o.temperature = 0.05;
    o.tau_scale = 1.0;
    o.candidates = 200;
    o.batch = 32;
    o.max_queries = 2048;
    o.w_ivf = 1.0;
    o.w_pq = 1.0;
    o.dense_adam = 0;
    o.w_rec = 0.0;
    o.rec_docs = 256;
    o.val_fraction = 0.1;
    o.score_weight = 0.5;
    o.refit_rounds = 8;
    o.refit_docs = 32768;
    o.lr_backoff = 0.1;
    return o;
}

/* Puts (s, id) at the root of the min-heap hs/hi of m entries and sifts it down. */
static void sift_down(float *hs, int64_t *hi, size_t m, float s, int64_t id) {
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, c = i;
        float cv = s;
        if (l < m && hs[l] < cv) c = l, cv = hs[l];
        if (r < m && hs[r] < cv) c = r;
        if (c == i) break;
        hs[i] = hs[c], hi[i] = hi[c], i = c;
    }
    hs[i] = s, hi[i] = id;
}

/* Min-heap of (score, id) of size k: the k best seen so far. */
static void heap_push(float *hs, int64_t *hi, size_t *n, size_t k, float s, int64_t id) {
    size_t i;
    if (*n < k) {
        i = (*n)++;
        while (i > 0) {
            size_t p = (i - 1) / 2;
            if (hs[p] <= s) break;
            hs[i] = hs[p], hi[i] = hi[p], i = p;
        }
        hs[i] = s, hi[i] = id;
        return;
    }
    if (s > hs[0]) sift_down(hs, hi, k, s, id);
}

#define TOPK_QB 256
#define TOPK_DB 8192

/* Exact top-k of each query (nq, d) over y (n, d): ids and scores (nq, k), best first. */
static int exact_topk(size_t nq, const float *q, size_t n, const float *y, size_t d, size_t k,
                      int64_t *ids, float *scores, kst_error *err) {
    float *s = kst_malloc((size_t)TOPK_QB * TOPK_DB, sizeof(float), "exact scores", err);
    size_t *cnt = kst_calloc(TOPK_QB, sizeof(size_t), "heap sizes", err);
    int rc = (!s || !cnt) ? KST_ERR_NOMEM : KST_OK;
    for (size_t q0 = 0; rc == KST_OK && q0 < nq; q0 += TOPK_QB) {
        size_t qb = nq - q0 < TOPK_QB ? nq - q0 : TOPK_QB;
        memset(cnt, 0, TOPK_QB * sizeof(size_t));
        for (size_t d0 = 0; d0 < n; d0 += TOPK_DB) {
            size_t db = n - d0 < TOPK_DB ? n - d0 : TOPK_DB;
            kst_sgemm(0, 1, (int)qb, (int)db, (int)d, 1.0f, q + q0 * d, (int)d, y + d0 * d, (int)d,
                      0.0f, s, (int)db);
            for (size_t i = 0; i < qb; i++)
                for (size_t j = 0; j < db; j++)
                    heap_push(scores + (q0 + i) * k, ids + (q0 + i) * k, &cnt[i], k, s[i * db + j],
                              (int64_t)(d0 + j));
        }
        /* Heap order -> best first (pop the minimum to the end). */
        for (size_t i = 0; i < qb; i++) {
            float *hs = scores + (q0 + i) * k;
            int64_t *hi = ids + (q0 + i) * k;
            for (size_t e = cnt[i]; e > 1; e--) {
                float ts = hs[0];
                int64_t ti = hi[0];
                size_t m = e - 1;
                float ls = hs[m];
                int64_t li = hi[m];
                hs[m] = ts, hi[m] = ti;
                sift_down(hs, hi, m, ls, li);
            }
        }
    }
    kst_free(s);
    kst_free(cnt);
    return rc;
}

typedef struct vq_data {
    size_t n, nq, k, d;
    const float *y;      /* (n, d) rotated documents */
    const float *qy;     /* (nq, d) rotated queries: the teacher's */
    const float *qs;     /* (nq, d) the students' (qy, or the jointly trained query encoder's) */
    int64_t *top;        /* (nq, k) */
    float *top_s;        /* (nq, k) */
    const size_t *pos_off;
    const int64_t *pos;
    int64_t *self;       /* (nq) the document a sampled query was, never its own candidate; NULL
                          * for given queries */
    int32_t *assign;     /* (n) */
} vq_data;

/* Candidates of the queries order[b0 .. b0+B): own top-k, the other queries' top-1 (in-batch),
 * positives; duplicates and the query's own document (sampled queries) dropped. Fills off (B + 1), cand, teacher (capacity B * (k + B + npos)),
 * and q (B, d). */
static void batch_candidates(const vq_data *v, const size_t *order, size_t B, size_t *off,
                             int64_t *cand, float *teacher, float *q) {
    size_t at = 0, d = v->d;
    for (size_t b = 0; b < B; b++) {
        size_t qi = order[b];
        const float *qv = v->qy + qi * d;
        memcpy(q + b * d, v->qs + qi * d, d * sizeof(float));
        off[b] = at;
        int64_t self = v->self ? v->self[qi] : -1;
        for (size_t j = 0; j < v->k; j++) {
            if (v->top[qi * v->k + j] == self) continue;
            cand[at] = v->top[qi * v->k + j];
            teacher[at++] = v->top_s[qi * v->k + j];
        }
        size_t nextra = B + (v->pos_off ? v->pos_off[qi + 1] - v->pos_off[qi] : 0);
        for (size_t e = 0; e < nextra; e++) {
            int64_t doc;
            if (e < B) {
                if (e == b) continue;
                doc = v->top[order[e] * v->k];
            } else {
                doc = v->pos[v->pos_off[qi] + (e - B)];
            }
            int dup = doc == self;
            for (size_t j = off[b]; j < at && !dup; j++) dup = cand[j] == doc;
            if (dup) continue;
            cand[at] = doc;
            teacher[at++] = dot(qv, v->y + (size_t)doc * d, d);
        }
    }
    off[B] = at;
}

/* Mean loss over the queries idx (nidx), forward only, in that order (batches of opts->batch). */
static int eval_loss(const kst_vq_model *m, const vq_data *v, const kst_vq_opts *o, kst_vq_gpu *g,
                     const size_t *idx, size_t nidx, size_t *off, int64_t *cand, float *teacher,
                     float *q, double *li, double *lp, kst_error *err) {
    double si = 0, sp = 0;
    size_t nb = 0;
    for (size_t b0 = 0; b0 < nidx; b0 += o->batch) {
        size_t B = nidx - b0 < o->batch ? nidx - b0 : o->batch;
        batch_candidates(v, idx + b0, B, off, cand, teacher, q);
        double a, c;
        int rc = g ? kst_vq_gpu_batch(g, B, q, off, cand, teacher, o->temperature, o->w_ivf,
                                      o->w_pq, 0, &a, &c, err)
                   : kst_vq_batch(m, B, q, off, cand, teacher, v->n, v->y, v->assign,
                                  o->temperature, o->w_ivf, o->w_pq, NULL, &a, &c, err);
        if (rc != KST_OK) return rc;
        si += a * (double)B, sp += c * (double)B, nb += B;
    }
    *li = si / (double)nb;
    *lp = sp / (double)nb;
    return KST_OK;
}

/* tau_m = scale * mean over (up to 4096) documents of the squared distance from the residual
 * sub-vector to its nearest codeword: the soft assignment is then sharp around the hard code but
 * still reaches the runners-up. */
static void init_tau(kst_vq_model *m, const vq_data *v, double scale) {
    size_t d = (size_t)m->d, ds = m->dsub, ns = v->n < 4096 ? v->n : 4096;
    double *acc = kst_calloc(m->M, sizeof(double), "tau", NULL);
    float *r = kst_malloc(2 * d, sizeof(float), "tau", NULL);
    if (!acc || !r) {
        kst_free(acc);
        kst_free(r);
        return; /* tau stays 1 */
    }
    for (size_t i = 0; i < ns; i++) {
        size_t doc = i * v->n / ns;
        residual_and_code(m, v->y + doc * d, v->assign[doc], r, r + d, NULL);
        for (size_t s = 0; s < m->M; s++) {
            double e = 0;
            for (size_t j = s * ds; j < (s + 1) * ds; j++) e += (double)(r[j] - r[d + j]) * (r[j] - r[d + j]);
            acc[s] += e;
        }
    }
    for (size_t s = 0; s < m->M; s++) {
        double t = scale * acc[s] / (double)ns;
        m->tau[s] = (float)(t > 1e-8 ? t : 1e-8);
    }
    kst_free(acc);
    kst_free(r);
}

/* Mean squared reconstruction error |y - (C[a] + decode(codes))|^2 over up to 4096 evenly spaced
 * documents, and FAISS's imbalance factor of the lists (nlist * sum size^2 / n^2). */
static void quant_stats(const kst_vq_model *m, const vq_data *v, double *mse, double *imbalance) {
    size_t d = (size_t)m->d, ns = v->n < 4096 ? v->n : 4096;
    float *r = kst_malloc(2 * d, sizeof(float), "stats", NULL);
    size_t *cnt = kst_calloc(m->nlist, sizeof(size_t), "stats", NULL);
    *mse = *imbalance = 0;
    if (!r || !cnt) goto done;
    double acc = 0;
    for (size_t i = 0; i < ns; i++) {
        size_t doc = i * v->n / ns;
        residual_and_code(m, v->y + doc * d, v->assign[doc], r, r + d, NULL);
        for (size_t j = 0; j < d; j++) acc += (double)(r[j] - r[d + j]) * (r[j] - r[d + j]);
    }
    *mse = acc / (double)ns;
    for (size_t i = 0; i < v->n; i++) cnt[v->assign[i]]++;
    double sq = 0;
    for (size_t j = 0; j < m->nlist; j++) sq += (double)cnt[j] * (double)cnt[j];
    *imbalance = sq * (double)m->nlist / ((double)v->n * (double)v->n);
done:
    kst_free(r);
    kst_free(cnt);
}

/* The reconstruction anchor: ADDS into grad the gradient of
 *   w / (R * mse_ref) * sum_i |y_i - C[a_i] - B[code_i]|^2
 * over R documents drawn uniformly (hard codes, as k-means: the code is held fixed), so the
 * quantizer stays faithful to the documents no training query reaches. Returns the term's value.
 * r (2 d) and codes (M) are scratch. */
static double rec_anchor(const kst_vq_model *m, const vq_data *v, size_t R, double w,
                         double mse_ref, kst_xoshiro *rng, float *grad, float *r, uint8_t *codes) {
    size_t d = (size_t)m->d, ds = m->dsub;
    float *dC = grad, *dB = grad + m->nlist * d;
    double loss = 0, sc = w / ((double)R * mse_ref);
    for (size_t i = 0; i < R; i++) {
        size_t doc = (size_t)kst_xoshiro_below(rng, v->n);
        int32_t a = v->assign[doc];
        residual_and_code(m, v->y + doc * d, a, r, r + d, codes);
        float *dc = dC + (size_t)a * d;
        for (size_t sm = 0; sm < m->M; sm++) {
            float *db = dB + (sm * m->ksub + codes[sm]) * ds;
            for (size_t j = sm * ds; j < (sm + 1) * ds; j++) {
                double e = (double)r[j] - r[d + j];
                loss += e * e;
                float g = (float)(-2.0 * sc * e);
                dc[j] += g;
                db[j - sm * ds] += g;
            }
        }
    }
    return loss * sc;
}

/* The student queries of joint training: every query text through the current encoder (raw,
 * (nq, d_in)), rotated into out (nq, d). */
static int students(const kst_vq_model *m, kst_vq_qenc *qe, float *raw, float *out,
                    kst_error *err) {
    int rc = kst_vq_qenc_embed(qe, NULL, qe->nq, raw, err);
    if (rc == KST_OK) kst_vq_rotate(m, qe->nq, raw, out);
    return rc;
}

/* Lazy Adam (torch.optim.SparseAdam's rule) on the rows (rows, width) of p: a row whose gradient
 * is all zero keeps its value and moments, so a centroid no query reached in this batch does not
 * coast on its old momentum (with dense Adam, one noisy gradient moves a row ~30 lr over the next
 * steps, and at 1,000+ lists most rows see a gradient only every few dozen steps). */
static void lazy_adam_rows(float *p, float *mom, float *vel, const float *g, size_t rows,
                           size_t width, long step, double lr, const kst_adamw_config *ac) {
    for (size_t i = 0; i < rows; i++) {
        const float *gi = g + i * width;
        size_t j = 0;
        while (j < width && gi[j] == 0.0f) j++;
        if (j == width) continue;
        kst_adamw_update(p + i * width, mom + i * width, vel + i * width, gi, NULL, width, step,
                         lr, ac);
    }
}

/* The query-weighted codes (train/vq_code.h): W from the training queries (given; the student
 * queries, i.e. the tuned query encoder's when one is trained), or from up
 * to refit_docs evenly spaced documents (label-free: the documents stand for the queries, as the
 * sampled-document queries do), stored in m; then refit_rounds times: encode a sample of the
 * documents under W, refit the codebooks to those codes. */
static int score_codes(kst_vq_model *m, const vq_data *v, const kst_vq_opts *o, kst_vq_result *res,
                       kst_error *err) {
    size_t d = (size_t)m->d, n = v->n;
    size_t ns = o->refit_docs && o->refit_docs < n ? o->refit_docs : n;
    int rc = KST_OK;
    float *ys = kst_malloc(ns * d, sizeof(float), "refit sample", err);
    int32_t *as = kst_malloc(ns, sizeof(int32_t), "refit lists", err);
    uint8_t *codes = kst_malloc(ns * m->M, 1, "refit codes", err);
    if (!m->wq) m->wq = kst_malloc(d * d, sizeof(float), "score metric", err);
    if (!ys || !as || !codes || !m->wq) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < ns; i++) {
        size_t doc = i * n / ns;
        memcpy(ys + i * d, v->y + doc * d, d * sizeof(float));
        as[i] = v->assign[doc];
    }
    if (v->self) /* label-free: the documents' own second moment */
        rc = kst_vq_score_metric(d, ns, ys, o->score_weight, m->wq, err);
    else
        rc = kst_vq_score_metric(d, v->nq, v->qs, o->score_weight, m->wq, err);
    if (rc != KST_OK) goto done;
    m->wq_iters = 3;
    for (long r = 0; r < o->refit_rounds; r++) {
        double before, after;
        KST_TRY(kst_vq_encode(m, ns, ys, as, codes, NULL, err));
        KST_TRY(kst_vq_refit(m, ns, ys, as, codes, &before, &after, err));
        if (r == 0) res->werr_init = before;
        res->werr_final = after;
        res->refits++;
    }
done:
    kst_free(ys);
    kst_free(as);
    kst_free(codes);
    if (rc != KST_OK) {
        kst_free(m->wq);
        m->wq = NULL;
    }
    return rc;
}

/* Every document's IVF list with the current centroids: on the GPU with its parameters when g. */
static int assign_docs(const kst_vq_model *m, const vq_data *v, kst_vq_gpu *g, kst_error *err) {
    if (g) return kst_vq_gpu_assign(g, v->assign, err);
    kst_vq_assign(m, v->n, v->y, v->assign);
    return KST_OK;
}

int kst_vq_train(kst_vq_model *m, size_t n, const float *x, size_t nq, const float *q,
                 const size_t *pos_off, const int64_t *pos, const kst_vq_opts *opts,
                 kst_vq_result *out, kst_error *err) {
    kst_vq_opts o = opts ? *opts : kst_vq_opts_default();
    kst_vq_result res;
    memset(&res, 0, sizeof res);
    if (out) memset(out, 0, sizeof *out);
    if (n < 2) return kst_fail(err, KST_ERR_INVALID, "Distill-VQ: %zu documents; need at least 2", n);
    if (o.batch < 1 || o.epochs < 0 || o.temperature <= 0 || o.candidates < 1)
        return kst_fail(err, KST_ERR_INVALID,
                        "Distill-VQ: batch, candidates and temperature must be positive");
    if (pos_off && nq == 0)
        return kst_fail(err, KST_ERR_INVALID, "Distill-VQ: positives given without queries");
    if (o.device == KST_DEV_CUDA) {
        if (o.qenc)
            return kst_fail(err, KST_ERR_UNSUPPORTED, "Distill-VQ on the GPU: the query encoder "
                            "trains jointly on the CPU only; drop --device cuda (or "
                            "--train-query-encoder)");
        if (o.w_rec > 0)
            return kst_fail(err, KST_ERR_UNSUPPORTED, "Distill-VQ on the GPU: the reconstruction "
                            "anchor runs on the CPU only; drop --device cuda (or --anchor)");
        int grc = kst_gpu_check(err);
        if (grc != KST_OK) return grc;
    }
    m->device = o.device;
    double t_start = kst_now();
    kst_vq_gpu *g = NULL;
    size_t d = (size_t)m->d, k = o.candidates < n ? o.candidates : n;
    int rc = KST_OK;
    float *yrot = NULL, *qy = NULL, *grad = NULL, *mom = NULL, *vel = NULL, *teacher = NULL,
          *qb = NULL, *best = NULL, *rscratch = NULL, *qstu = NULL, *qraw = NULL;
    kst_vq_qenc *qe = o.qenc;
    if (qe && (nq == 0 || qe->nq != nq))
        return kst_fail(err, KST_ERR_INVALID, "Distill-VQ: the query encoder has %zu query texts "
                        "for %zu query vectors; joint training needs the texts of the queries",
                        qe->nq, nq);
    size_t *order_all = NULL, *off = NULL, *qorder = NULL;
    uint8_t *codes = NULL;
    int64_t *cand = NULL;
    vq_data v = {0};
    v.n = n, v.k = k, v.d = d, v.pos_off = pos_off, v.pos = pos;
    if (m->rot) {
        yrot = kst_malloc(n * d, sizeof(float), "rotated documents", err);
        if (!yrot) return KST_ERR_NOMEM;
        kst_vq_rotate(m, n, x, yrot);
        v.y = yrot;
    } else {
        v.y = x;
    }
    /* Queries: given (rotated), or sampled documents (label-free). */
    if (nq > 0) {
        v.nq = nq;
        qy = kst_malloc(nq * d, sizeof(float), "rotated queries", err);
        if (!qy) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        kst_vq_rotate(m, nq, q, qy);
    } else {
        v.nq = o.max_queries < n ? o.max_queries : n;
        size_t *perm = kst_malloc(n, sizeof(size_t), "sample", err);
        qy = kst_malloc(v.nq * d, sizeof(float), "sampled queries", err);
        v.self = kst_malloc(v.nq, sizeof(int64_t), "sampled rows", err);
        if (!perm || !qy || !v.self) {
            kst_free(perm);
            rc = KST_ERR_NOMEM;
            goto done;
        }
        kst_xoshiro rng;
        kst_xoshiro_seed(&rng, o.seed);
        for (size_t i = 0; i < n; i++) perm[i] = i;
        for (size_t i = 0; i < v.nq; i++) {
            size_t j = i + (size_t)kst_xoshiro_below(&rng, n - i);
            size_t t = perm[i];
            perm[i] = perm[j], perm[j] = t;
            memcpy(qy + i * d, v.y + perm[i] * d, d * sizeof(float));
            v.self[i] = (int64_t)perm[i];
        }
        kst_free(perm);
    }
    v.qy = qy;
    v.qs = qy;
    if (qe) {
        qstu = kst_malloc(nq * d, sizeof(float), "student queries", err);
        qraw = kst_malloc(nq * (size_t)m->d_in, sizeof(float), "student queries", err);
        if (!qstu || !qraw) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(students(m, qe, qraw, qstu, err));
        v.qs = qstu;
    } else if (o.q_student && nq > 0) {
        qstu = kst_malloc(nq * d, sizeof(float), "student queries", err);
        if (!qstu) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        kst_vq_rotate(m, nq, o.q_student, qstu);
        v.qs = qstu;
    }
    if (v.self && k < n) v.k = ++k; /* one more: the query's own document is dropped */
    size_t maxpos = 0;
    if (pos_off)
        for (size_t i = 0; i < v.nq; i++)
            if (pos_off[i + 1] - pos_off[i] > maxpos) maxpos = pos_off[i + 1] - pos_off[i];
    for (size_t i = 0; pos_off && i < pos_off[v.nq]; i++)
        if (pos[i] < 0 || (size_t)pos[i] >= n) {
            rc = kst_fail(err, KST_ERR_INVALID, "Distill-VQ: positive %lld out of range (%zu docs)",
                          (long long)pos[i], n);
            goto done;
        }
    v.top = kst_malloc(v.nq * k, sizeof(int64_t), "exact top-k", err);
    v.top_s = kst_malloc(v.nq * k, sizeof(float), "exact top-k scores", err);
    v.assign = kst_malloc(n, sizeof(int32_t), "IVF lists", err);
    size_t cap = o.batch * (k + o.batch + maxpos);
    cand = kst_malloc(cap, sizeof(int64_t), "candidates", err);
    teacher = kst_malloc(cap, sizeof(float), "teacher scores", err);
    off = kst_malloc(o.batch + 1, sizeof(size_t), "offsets", err);
    order_all = kst_malloc(v.nq, sizeof(size_t), "queries", err);
    qorder = kst_malloc(v.nq, sizeof(size_t), "query order", err);
    rscratch = kst_malloc(2 * d, sizeof(float), "anchor scratch", err);
    codes = kst_malloc(m->M, 1, "anchor codes", err);
    qb = kst_malloc(o.batch * d, sizeof(float), "batch queries", err);
    grad = kst_malloc(m->nparams, sizeof(float), "gradients", err);
    mom = kst_calloc(m->nparams, sizeof(float), "Adam m", err);
    vel = kst_calloc(m->nparams, sizeof(float), "Adam v", err);
    res.epoch_loss = kst_calloc(o.epochs ? (size_t)o.epochs : 1, sizeof(double), "epoch losses", err);
    if (!v.top || !v.top_s || !v.assign || !cand || !teacher || !off || !order_all || !qorder ||
        !qb || !grad || !mom || !vel || !res.epoch_loss || !rscratch || !codes) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(exact_topk(v.nq, qy, n, v.y, d, k, v.top, v.top_s, err));
    if (o.device == KST_DEV_CUDA) KST_TRY(kst_vq_gpu_create(m, n, v.y, o.batch, cap, &g, err));
    KST_TRY(assign_docs(m, &v, g, err));
    init_tau(m, &v, o.tau_scale);
    if (g) KST_TRY(kst_vq_gpu_set_tau(g, m->tau, err));
    quant_stats(m, &v, &res.mse_init, &res.imbalance_init);
    res.seconds_setup = kst_now() - t_start;
    /* Validation: a seeded share of the queries never trained on; after every epoch the loss on
     * them decides which parameters are kept (the start counts, so training cannot make the
     * index worse on them). The rest are the training queries. */
    kst_xoshiro rng;
    kst_xoshiro_seed(&rng, o.seed ^ 0x9e3779b97f4a7c15ull);
    for (size_t i = 0; i < v.nq; i++) qorder[i] = i;
    for (size_t i = v.nq; i > 1; i--) {
        size_t j = (size_t)kst_xoshiro_below(&rng, i);
        size_t t = qorder[i - 1];
        qorder[i - 1] = qorder[j], qorder[j] = t;
    }
    size_t nval = (size_t)(o.val_fraction * (double)v.nq + 0.5);
    if (o.val_fraction <= 0 || nval < 1 || nval >= v.nq) nval = 0;
    size_t ntr = v.nq - nval;
    const size_t *val_idx = qorder + ntr;
    res.val_queries = nval;
    res.best_epoch = 0;
    if (nval) {
        double a, c;
        KST_TRY(eval_loss(m, &v, &o, g, val_idx, nval, off, cand, teacher, qb, &a, &c, err));
        res.val_init = res.val_best = o.w_ivf * a + o.w_pq * c;
        best = kst_malloc(m->nparams, sizeof(float), "best parameters", err);
        if (!best) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        memcpy(best, m->params, m->nparams * sizeof(float));
        if (g) KST_TRY(kst_vq_gpu_keep(g, err));
        if (qe) KST_TRY(kst_vq_qenc_keep(qe, err));
    }
    for (size_t i = 0; i < v.nq; i++) order_all[i] = i;
    KST_TRY(eval_loss(m, &v, &o, g, order_all, v.nq, off, cand, teacher, qb, &res.loss_init_ivf,
                      &res.loss_init_pq, err));

    kst_adamw_config ac = kst_adamw_defaults();
    ac.weight_decay = 0;
    size_t nC = m->nlist * d, nB = m->nparams - nC;
    size_t steps_per_epoch = (ntr + o.batch - 1) / o.batch;
    kst_progress bar;
    if (o.progress) kst_progress_begin(&bar, "train vq", steps_per_epoch * (size_t)o.epochs);
    size_t ncand = 0;
    double lr_scale = 1.0;
    long astep = 0; /* Adam's step count (restarts with the moments after a backoff) */
    for (long ep = 0; ep < o.epochs; ep++) {
        for (size_t i = ntr; i > 1; i--) {
            size_t j = (size_t)kst_xoshiro_below(&rng, i);
            size_t t = qorder[i - 1];
            qorder[i - 1] = qorder[j], qorder[j] = t;
        }
        double sum = 0;
        for (size_t b0 = 0; b0 < ntr; b0 += o.batch) {
            size_t B = ntr - b0 < o.batch ? ntr - b0 : o.batch;
            batch_candidates(&v, qorder + b0, B, off, cand, teacher, qb);
            ncand += off[B];
            double li, lp;
            if (g) {
                KST_TRY(kst_vq_gpu_batch(g, B, qb, off, cand, teacher, o.temperature, o.w_ivf,
                                         o.w_pq, 1, &li, &lp, err));
                res.steps++, astep++;
                KST_TRY(kst_vq_gpu_adam(g, o.dense_adam, astep, o.lr_ivf * lr_scale,
                                        o.lr_pq * lr_scale, &ac, err));
                sum += (o.w_ivf * li + o.w_pq * lp) * (double)B;
                if (o.progress) {
                    snprintf(bar.suffix, sizeof bar.suffix, "loss ivf %.4f pq %.4f", li, lp);
                    kst_progress_add(&bar, 1);
                }
                continue;
            }
            kst_grad_zero(grad, m->nparams);
            if (qe)
                KST_TRY(kst_vq_joint_batch(m, qe, qorder + b0, B, off, cand, teacher, n, v.y,
                                           v.assign, o.temperature, o.w_ivf, o.w_pq, grad, &li,
                                           &lp, err));
            else
                KST_TRY(kst_vq_batch(m, B, qb, off, cand, teacher, n, v.y, v.assign,
                                     o.temperature, o.w_ivf, o.w_pq, grad, &li, &lp, err));
            if (o.w_rec > 0 && res.mse_init > 0)
                rec_anchor(m, &v, o.rec_docs, o.w_rec, res.mse_init, &rng, grad, rscratch, codes);
            res.steps++, astep++;
            if (o.dense_adam)
                kst_adamw_update(m->params, mom, vel, grad, NULL, nC, astep, o.lr_ivf * lr_scale,
                                 &ac);
            else
                lazy_adam_rows(m->params, mom, vel, grad, m->nlist, d, astep, o.lr_ivf * lr_scale,
                               &ac);
            kst_adamw_update(m->codebook, mom + nC, vel + nC, grad + nC, NULL, nB, astep,
                             o.lr_pq * lr_scale, &ac);
            if (qe) kst_vq_qenc_step(qe, lr_scale);
            sum += (o.w_ivf * li + o.w_pq * lp) * (double)B;
            if (o.progress) {
                snprintf(bar.suffix, sizeof bar.suffix, "loss ivf %.4f pq %.4f", li, lp);
                kst_progress_add(&bar, 1);
            }
        }
        res.epoch_loss[ep] = sum / (double)ntr;
        KST_TRY(assign_docs(m, &v, g, err)); /* the lists the next epoch (and FAISS) will use */
        if (qe) KST_TRY(students(m, qe, qraw, qstu, err));
        if (nval) {
            double a, c;
            KST_TRY(eval_loss(m, &v, &o, g, val_idx, nval, off, cand, teacher, qb, &a, &c, err));
            if (o.w_ivf * a + o.w_pq * c < res.val_best) {
                res.val_best = o.w_ivf * a + o.w_pq * c;
                res.best_epoch = ep + 1;
                if (g) KST_TRY(kst_vq_gpu_keep(g, err));
                else memcpy(best, m->params, m->nparams * sizeof(float));
                if (qe) KST_TRY(kst_vq_qenc_keep(qe, err));
            } else if (o.lr_backoff > 0) {
                /* Too large a step for this collection (at 200K documents and 1,024 lists, 1e-3
                 * overshoots where 1e-4 helps): undo the epoch, restart Adam's moments, go on
                 * with smaller rates. */
                memcpy(m->params, best, m->nparams * sizeof(float));
                memset(mom, 0, m->nparams * sizeof(float));
                memset(vel, 0, m->nparams * sizeof(float));
                if (g) KST_TRY(kst_vq_gpu_restore(g, 1, err));
                KST_TRY(assign_docs(m, &v, g, err));
                if (qe) {
                    kst_vq_qenc_restore(qe);
                    KST_TRY(students(m, qe, qraw, qstu, err));
                }
                lr_scale *= o.lr_backoff;
                astep = 0;
                res.backoffs++;
            }
        }
    }
    if (o.progress) kst_progress_end(&bar);
    if (nval && res.best_epoch != o.epochs) {
        memcpy(m->params, best, m->nparams * sizeof(float));
        if (g) KST_TRY(kst_vq_gpu_restore(g, 0, err));
        KST_TRY(assign_docs(m, &v, g, err));
        if (qe) {
            kst_vq_qenc_restore(qe);
            KST_TRY(students(m, qe, qraw, qstu, err));
        }
    }
    if (!nval) res.best_epoch = o.epochs;
    res.lr_scale = lr_scale;
    if (g) KST_TRY(kst_vq_gpu_get_params(g, m->params, err)); /* the kept parameters */
    quant_stats(m, &v, &res.mse_final, &res.imbalance_final);
    KST_TRY(eval_loss(m, &v, &o, g, order_all, v.nq, off, cand, teacher, qb, &res.loss_final_ivf,
                      &res.loss_final_pq, err));
    res.seconds_epochs = kst_now() - t_start - res.seconds_setup;
    if (g) {
        res.gpu_bytes = kst_vq_gpu_bytes(g);
        kst_vq_gpu_free(g); /* the refits below hold their own (smaller) buffers */
        g = NULL;
    }
    double t_codes = kst_now();
    if (o.score_weight > 0) KST_TRY(score_codes(m, &v, &o, &res, err));
    res.seconds_codes = kst_now() - t_codes;
    if (o.device == KST_DEV_CUDA && kst_vq_gpu_coder_peak_bytes() > res.gpu_bytes)
        res.gpu_bytes = kst_vq_gpu_coder_peak_bytes();
    res.epochs = o.epochs;
    res.queries = v.nq;
    res.candidates_mean = res.steps ? ncand / (ntr * (size_t)o.epochs) : k;
    res.seconds = kst_now() - t_start;
done:
    kst_vq_gpu_free(g);
    kst_free(yrot);
    kst_free(qy);
    kst_free(qstu);
    kst_free(qraw);
    kst_free(v.top);
    kst_free(v.top_s);
    kst_free(v.assign);
    kst_free(v.self);
    kst_free(cand);
    kst_free(teacher);
    kst_free(off);
    kst_free(order_all);
    kst_free(qorder);
    kst_free(best);
    kst_free(rscratch);
    kst_free(codes);
    kst_free(qb);
    kst_free(grad);
    kst_free(mom);
    kst_free(vel);
    if (rc == KST_OK && out) *out = res;
    else kst_free(res.epoch_loss);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Write-back
 * ------------------------------------------------------------------------------------------- */

#define WRITE_BLOCK 65536

/* Adds the documents with their query-weighted codes (m->wq), block by block: rotate, assign the
 * list (as FAISS's flat quantizer: the largest inner product), encode, hand FAISS the codes. */
static int add_weighted(const kst_vq_model *m, kst_ann *a, size_t n, const float *x,
                        const int64_t *ids, kst_error *err) {
    size_t d = (size_t)m->d, bs = n < WRITE_BLOCK ? (n ? n : 1) : WRITE_BLOCK;
    int rc = KST_OK;
    float *y = kst_malloc(bs * d, sizeof(float), "write block", err);
    int32_t *as = kst_malloc(bs, sizeof(int32_t), "write lists", err);
    int64_t *lists = kst_malloc(bs, sizeof(int64_t), "write lists", err);
    uint8_t *codes = kst_malloc(bs * m->M, 1, "write codes", err);
    if (!y || !as || !lists || !codes) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i0 = 0; i0 < n; i0 += bs) {
        size_t nb = n - i0 < bs ? n - i0 : bs;
        kst_vq_rotate(m, nb, x + i0 * (size_t)m->d_in, y);
        kst_vq_assign(m, nb, y, as);
        KST_TRY(kst_vq_encode(m, nb, y, as, codes, NULL, err));
        for (size_t i = 0; i < nb; i++) lists[i] = as[i];
        if (kst_faiss_ivf_add_encoded((FaissIndex *)kst_ann_faiss(a), (idx_t)nb, lists, codes,
                                      ids + i0) != 0) {
            rc = faiss_fail(err, KST_ERR_INVALID, "adding the query-weighted codes");
            goto done;
        }
    }
done:
    kst_free(y);
    kst_free(as);
    kst_free(lists);
    kst_free(codes);
    return rc;
}

int kst_vq_write_index(const kst_vq_model *m, kst_ann *src, size_t n, const float *x,
                       const int64_t *ids, kst_ann **out, kst_error *err) {
    *out = NULL;
    kst_ann *a = NULL;
    int rc = kst_ann_clone_empty(src, &a, err);
    if (rc != KST_OK) return rc;
    FaissIndex *fi = (FaissIndex *)kst_ann_faiss(a);
    if (kst_faiss_ivf_centroids_set(fi, m->centroids) != 0) {
        rc = faiss_fail(err, KST_ERR_INVALID, "writing the learned IVF centroids");
        goto done;
    }
    if (kst_faiss_pq_codebook_set(fi, m->codebook) != 0) {
        rc = faiss_fail(err, KST_ERR_INVALID, "writing the learned PQ codebooks");
        goto done;
    }
    if (m->wq)
        KST_TRY(add_weighted(m, a, n, x, ids, err));
    else
        KST_TRY(kst_ann_add(a, (int64_t)n, m->d_in, x, ids, err));
done:
    if (rc != KST_OK) {
        kst_ann_free(a);
        return rc;
    }
    *out = a;
    return KST_OK;
}
