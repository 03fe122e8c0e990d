/* trainer_gpu.cu - the Margin-MSE step of a dense or ColBERT student on the GPU: scores (the
 * dense own-passage path here, ColBERT MaxSim and the in-batch negatives in train/scores_gpu.cu),
 * loss and its gradient, global-norm clipping and AdamW / SGD as one kernel over the flat
 * parameter buffer. */
#include "core/gpu_util.cuh"

#include <cuda_bf16.h>
#include <math.h>
#include <string.h>

extern "C" {
#include "core/mem.h"
#include "encoders/bert_gpu_train.h"
#include "train/scores_gpu.h"
#include "train/trainer_gpu.h"
}

struct kst_gpu_trainer {
    kst_bert_gpu_train *g;
    size_t NP, D;
    int colbert;             /* ColBERT student: token vectors and MaxSim */
    float ib_weight;         /* in-batch negatives cross-entropy weight (0: off) */
    cudaStream_t stream;
    float *m, *v;            /* AdamW moments (NP) */
    unsigned char *decay;    /* (NP) or NULL */
    float *s, *t, *ds;       /* (B, W) scores (W = n, or B n with in-batch negatives), teacher
                              * scores (B, n), d loss / d scores (B, W) */
    float *dq, *dp;          /* d loss / d vectors: (B, D), (B n, D); ColBERT (B Tq, D), (B n Tp, D) */
    int *argmax;             /* ColBERT: (B, W, Tq) MaxSim's choice */
    int *qlen;               /* ColBERT: (B) query tokens entering MaxSim */
    unsigned char *keep;     /* ColBERT: (B n, Tp) passage tokens entering MaxSim */
    size_t cap_s, cap_ds, cap_t, cap_dq, cap_dp, cap_arg, cap_qlen, cap_keep; /* in elements */
    float *dloss;            /* the step's loss (1) */
    double *dss;             /* sum of squared gradients (1) */
    float *hloss;            /* pinned: loss */
    double *hss;             /* pinned: sum of squares */
    int clip;                /* the queued update clips (its norm is reported) */
    /* pinned staging of a step's host inputs (ids, types, lengths of both sides, teacher
     * scores): the copies to the GPU are truly asynchronous, and the caller's buffers are free
     * again when forward_backward returns; the next step's staging waits for `staged` */
    unsigned char *hin;
    size_t hin_cap;
    cudaEvent_t staged;
    int staged_pending;
    size_t B, n, W, Tq;
    size_t bytes;
};

/* ------------------------------------------------------------------------------------------ */
/* kernels */

/* One warp per pair: s[b n + k] = q[b] . p[b n + k]. */
__global__ void pair_scores(float *s, const float *q, const float *p, int B, int n, int D) {
    int pr = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (pr >= B * n) return;
    const float *a = q + (size_t)(pr / n) * D, *b = p + (size_t)pr * D;
    float acc = 0;
    for (int k = lane; k < D; k += 32) acc += a[k] * b[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) s[pr] = acc;
}

/* One block: loss = mean_{b, i >= 1} ((s0 - si) - (t0 - ti))^2 and ds = its gradient (written),
 * as train/loss.c (sums in double). */
__global__ void margin_mse(float *loss, float *ds, const float *s, const float *t, int B, int n) {
    __shared__ double part[256];
    double c = 2.0 / (double)(B * (n - 1)), acc = 0;
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
        const float *sb = s + (size_t)b * n, *tb = t + (size_t)b * n;
        double dpos = 0;
        for (int i = 1; i < n; i++) {
            double e = ((double)sb[0] - sb[i]) - ((double)tb[0] - tb[i]);
            acc += e * e;
            dpos += c * e;
            ds[(size_t)b * n + i] = (float)(-c * e);
        }
        ds[(size_t)b * n] = (float)dpos;
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) *loss = (float)(part[0] / (double)(B * (n - 1)));
}

/* dq[b] = sum_k ds[b, k] p[b n + k]; dp[b n + k] = ds[b, k] q[b]; one thread per element. */
__global__ void score_bwd(float *dq, float *dp, const float *ds, const float *q, const float *p, int B,
                          int n, int D) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, nq = (size_t)B * D;
    if (i < nq) {
        size_t b = i / D, k = i % D;
        float a = 0;
        for (int j = 0; j < n; j++) a += ds[b * n + j] * p[(b * n + j) * D + k];
        dq[i] = a;
    } else if (i < nq + (size_t)B * n * D) {
        size_t e = i - nq, pr = e / D, k = e % D;
        dp[e] = ds[pr] * q[(pr / n) * D + k];
    }
}

/* *ss += sum g^2 (float partials per thread, double across blocks). */
__global__ void sum_squares(double *ss, const float *g, size_t n) {
    __shared__ float part[256];
    float acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += g[i] * g[i];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(ss, (double)part[0]);
}

struct adamw_args {
    float shrink, w1, beta2, w2, step_size, bc2_sqrt, eps, lr, max_norm;
    int sgd;
};

/* One update over the flat buffer: the clipping coefficient from *ss (torch's
 * clip_grad_norm_), then AdamW as kst_adamw_update (or SGD), and the bf16 copy of the weight. */
__global__ void adamw_step(float *params, __nv_bfloat16 *pb16, float *m, float *v, const float *grads,
                           const unsigned char *decay, size_t n, adamw_args a, const double *ss) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i];
    if (a.max_norm > 0) {
        float total = (float)sqrt(*ss);
        float coef = a.max_norm / (total + 1e-6f);
        if (coef > 1.0f) coef = 1.0f;
        if (total != total) coef = NAN;
        g *= coef;
    }
    float p = params[i];
    if (a.sgd) {
        p = p + (-a.lr) * g;
    } else {
        if (!decay || decay[i]) p = p * a.shrink;
        float mi = m[i], w1 = a.w1;
        mi = w1 < 0.5f ? mi + w1 * (g - mi) : g - (g - mi) * (1.0f - w1);
        float vi = v[i] * a.beta2 + a.w2 * g * g;
        float denom = sqrtf(vi) / a.bc2_sqrt + a.eps;
        p = p + (-a.step_size) * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
    params[i] = p;
    pb16[i] = __float2bfloat16(p);
}

/* ------------------------------------------------------------------------------------------ */
/* API */

static unsigned nblocks(size_t n, unsigned per) { return (unsigned)((n + per - 1) / per); }

static int talloc(kst_gpu_trainer *t, void **p, size_t bytes, const char *what, kst_error *err) {
    int rc = kst_gpu_alloc(p, bytes, what, err);
    if (rc == KST_OK) t->bytes += bytes;
    return rc;
}

extern "C" void kst_gpu_trainer_free(kst_gpu_trainer *t) {
    if (!t) return;
    if (t->stream) cudaStreamSynchronize(t->stream);
    void *bufs[] = {t->m, t->v, t->decay, t->s, t->t, t->ds, t->dq, t->dp, t->dloss, t->dss, t->argmax, t->qlen, t->keep};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) cudaFree(bufs[i]);
    if (t->hloss) cudaFreeHost(t->hloss);
    if (t->hss) cudaFreeHost(t->hss);
    if (t->hin) cudaFreeHost(t->hin);
    if (t->staged) cudaEventDestroy(t->staged);
    kst_bert_gpu_train_free(t->g);
    kst_free(t);
}

extern "C" int kst_gpu_trainer_create(const kst_bert *m, unsigned pool_modes, int normalize,
                                      const unsigned char *decay, kst_gpu_trainer **out, kst_error *err) {
    *out = NULL;
    int rc = KST_OK;
    kst_gpu_trainer *t = (kst_gpu_trainer *)kst_calloc(1, sizeof *t, "GPU trainer", err);
    if (!t) return KST_ERR_NOMEM;
    KST_TRY(kst_bert_gpu_train_create(m, pool_modes, normalize, &t->g, err));
    t->NP = kst_bert_gpu_train_num_params(t->g);
    t->D = kst_bert_gpu_train_dim(t->g);
    t->colbert = m->cfg.proj_dim > 0;
    t->stream = (cudaStream_t)kst_bert_gpu_train_stream(t->g);
    KST_TRY(talloc(t, (void **)&t->m, t->NP * sizeof(float), "AdamW moments", err));
    KST_TRY(talloc(t, (void **)&t->v, t->NP * sizeof(float), "AdamW moments", err));
    CU_TRY(cudaMemsetAsync(t->m, 0, t->NP * sizeof(float), t->stream), "zeroing the moments");
    CU_TRY(cudaMemsetAsync(t->v, 0, t->NP * sizeof(float), t->stream), "zeroing the moments");
    if (decay) {
        KST_TRY(talloc(t, (void **)&t->decay, t->NP, "the weight-decay mask", err));
        /* on the trainer's stream: a plain cudaMemcpy may return before its DMA lands */
        CU_TRY(cudaMemcpyAsync(t->decay, decay, t->NP, cudaMemcpyHostToDevice, t->stream),
               "copying the weight-decay mask");
        CU_TRY(cudaStreamSynchronize(t->stream), "copying the weight-decay mask");
    }
    KST_TRY(talloc(t, (void **)&t->dloss, sizeof(float), "the loss", err));
    KST_TRY(talloc(t, (void **)&t->dss, sizeof(double), "the gradient norm", err));
    CU_TRY(cudaMallocHost((void **)&t->hloss, sizeof(float)), "pinned memory");
    CU_TRY(cudaMallocHost((void **)&t->hss, sizeof(double)), "pinned memory");
    CU_TRY(cudaEventCreateWithFlags(&t->staged, cudaEventDisableTiming), "creating an event");
    CU_TRY(cudaStreamSynchronize(t->stream), "GPU trainer");
    *out = t;
    return KST_OK;
done:
    kst_gpu_trainer_free(t);
    return rc;
}

/* Grows *p (device, *cap elements of size el) to hold need elements; contents are not kept. */
static int grow(kst_gpu_trainer *t, void **p, size_t *cap, size_t need, size_t el, const char *what, kst_error *err) {
    if (need <= *cap) return KST_OK;
    cudaStreamSynchronize(t->stream);
    if (*p) cudaFree(*p);
    *p = NULL;
    t->bytes -= *cap * el;
    *cap = 0;
    int rc = talloc(t, p, need * el, what, err);
    if (rc == KST_OK) *cap = need;
    return rc;
}

/* Grows the score buffers for B queries of n passages (W score columns a query; ColBERT: Tq
 * and Tp tokens a query and a passage). */
static int pairs_reserve(kst_gpu_trainer *t, size_t B, size_t n, size_t W, size_t Tq, size_t Tp, kst_error *err) {
    int rc = KST_OK;
    size_t pairs = B * W, tq = t->colbert ? Tq : 1, tp = t->colbert ? Tp : 1;
    KST_TRY(grow(t, (void **)&t->s, &t->cap_s, pairs, sizeof(float), "scores", err));
    KST_TRY(grow(t, (void **)&t->ds, &t->cap_ds, pairs, sizeof(float), "scores", err));
    KST_TRY(grow(t, (void **)&t->t, &t->cap_t, B * n, sizeof(float), "scores", err));
    KST_TRY(grow(t, (void **)&t->dq, &t->cap_dq, B * tq * t->D, sizeof(float), "vector gradients", err));
    KST_TRY(grow(t, (void **)&t->dp, &t->cap_dp, B * n * tp * t->D, sizeof(float), "vector gradients", err));
    if (t->colbert) {
        KST_TRY(grow(t, (void **)&t->argmax, &t->cap_arg, pairs * Tq, sizeof(int), "MaxSim", err));
        KST_TRY(grow(t, (void **)&t->qlen, &t->cap_qlen, B, sizeof(int), "MaxSim", err));
        KST_TRY(grow(t, (void **)&t->keep, &t->cap_keep, B * n * Tp, 1, "MaxSim", err));
    }
done:
    return rc;
}

/* Copies one side's batch into the pinned buffer at *at (16-byte aligned pieces); out: the same
 * batch over the pinned copies. */
static void stage_side(unsigned char *base, size_t *at, const kst_gpu_batch *in, kst_gpu_batch *out) {
    size_t tok = in->rows * in->T;
    *out = *in;
    int32_t *ids = (int32_t *)(base + *at);
    memcpy(ids, in->ids, tok * sizeof *ids);
    *at += (tok * sizeof *ids + 15) & ~(size_t)15;
    out->ids = ids;
    if (in->types) {
        int32_t *types = (int32_t *)(base + *at);
        memcpy(types, in->types, tok * sizeof *types);
        *at += (tok * sizeof *types + 15) & ~(size_t)15;
        out->types = types;
    }
    int *valid = (int *)(base + *at);
    memcpy(valid, in->valid, in->rows * sizeof *valid);
    *at += (in->rows * sizeof *valid + 15) & ~(size_t)15;
    out->valid = valid;
    if (in->len) {
        int *len = (int *)(base + *at);
        memcpy(len, in->len, in->rows * sizeof *len);
        *at += (in->rows * sizeof *len + 15) & ~(size_t)15;
        out->len = len;
    }
    if (in->keep) {
        unsigned char *keep = base + *at;
        memcpy(keep, in->keep, tok);
        *at += (tok + 15) & ~(size_t)15;
        out->keep = keep;
    }
}

static size_t side_bytes(const kst_gpu_batch *b) {
    size_t tok = b->rows * b->T, rows16 = (b->rows * sizeof(int) + 15) & ~(size_t)15;
    return ((tok * 4 + 15) & ~(size_t)15) * (b->types ? 2 : 1) + rows16 * (b->len ? 2 : 1) +
           (b->keep ? (tok + 15) & ~(size_t)15 : 0);
}

extern "C" int kst_gpu_trainer_forward_backward(kst_gpu_trainer *t, const kst_gpu_batch *q,
                                                const kst_gpu_batch *p, const float *teacher, size_t n,
                                                float dropout, uint64_t seed_q, uint64_t seed_p,
                                                kst_error *err) {
    int rc = KST_OK;
    size_t B = q->rows, D = t->D;
    if (n < 2 || p->rows != B * n)
        return kst_fail(err, KST_ERR_SHAPE, "GPU training: %zu passages for %zu queries of %zu passages each (need n >= 2)",
                        p->rows, B, n);
    if (t->colbert && !p->keep)
        return kst_fail(err, KST_ERR_MISUSE, "GPU training: a ColBERT step needs the passages' MaxSim mask (kst_gpu_batch.keep)");
    int all = t->ib_weight > 0 && B > 1; /* in-batch negatives: every query against every passage */
    size_t W = all ? B * n : n, Tq = q->T, Tp = p->T;
    KST_TRY(pairs_reserve(t, B, n, W, Tq, Tp, err));
    t->B = B, t->n = n, t->W = W, t->Tq = Tq;
    /* stage the host inputs (after the previous step's copies from the staging buffer ran) */
    kst_gpu_batch sq, sp;
    float *steacher;
    {
        size_t need = side_bytes(q) + side_bytes(p) + B * n * sizeof(float), at = 0;
        if (t->staged_pending) CU_TRY(cudaEventSynchronize(t->staged), "GPU training (staging)");
        t->staged_pending = 0;
        if (need > t->hin_cap) {
            if (t->hin) cudaFreeHost(t->hin);
            t->hin = NULL, t->hin_cap = 0;
            CU_TRY(cudaMallocHost((void **)&t->hin, need), "pinned memory for the batch");
            t->hin_cap = need;
        }
        stage_side(t->hin, &at, q, &sq);
        stage_side(t->hin, &at, p, &sp);
        steacher = (float *)(t->hin + at);
        memcpy(steacher, teacher, B * n * sizeof(float));
    }
    KST_TRY(kst_bert_gpu_train_zero_grads(t->g, err));
    /* ColBERT: the query's [MASK] rows (up to len) get MaxSim gradients though not attended to */
    KST_TRY(kst_bert_gpu_train_forward_rows(t->g, 0, sq.ids, sq.types, sq.valid, t->colbert ? sq.len : NULL, sq.rows, sq.T,
                                            dropout, seed_q, err));
    KST_TRY(kst_bert_gpu_train_forward_rows(t->g, 1, sp.ids, sp.types, sp.valid, t->colbert ? sp.len : NULL, sp.rows, sp.T,
                                            dropout, seed_p, err));
    {
        const float *qv = kst_bert_gpu_train_vectors(t->g, 0), *pv = kst_bert_gpu_train_vectors(t->g, 1);
        CU_TRY(cudaMemcpyAsync(t->t, steacher, B * n * sizeof(float), cudaMemcpyHostToDevice, t->stream), "copying teacher scores");
        if (t->colbert) {
            CU_TRY(cudaMemcpyAsync(t->qlen, sq.len ? sq.len : sq.valid, B * sizeof(int), cudaMemcpyHostToDevice, t->stream),
                   "copying query lengths");
            CU_TRY(cudaMemcpyAsync(t->keep, sp.keep, B * n * Tp, cudaMemcpyHostToDevice, t->stream), "copying the MaxSim mask");
        }
        CU_TRY(cudaEventRecord(t->staged, t->stream), "recording an event");
        t->staged_pending = 1;
        if (t->colbert) {
            KST_TRY(kst_gpu_maxsim_forward(t->s, t->argmax, qv, pv, t->qlen, t->keep, B, n, Tq, Tp, D, all, t->stream, err));
            KST_TRY(kst_gpu_mmse_ib_loss(t->dloss, t->ds, t->s, t->t, B, n, all, t->ib_weight, t->stream, err));
            KST_TRY(kst_gpu_maxsim_backward(t->dq, t->dp, t->ds, t->argmax, qv, pv, t->qlen, B, n, Tq, Tp, D, all, t->stream,
                                            err));
        } else if (all) {
            KST_TRY(kst_gpu_dense_all_forward(t->s, qv, pv, B, n, D, t->stream, err));
            KST_TRY(kst_gpu_mmse_ib_loss(t->dloss, t->ds, t->s, t->t, B, n, all, t->ib_weight, t->stream, err));
            KST_TRY(kst_gpu_dense_all_backward(t->dq, t->dp, t->ds, qv, pv, B, n, D, t->stream, err));
        } else {
            pair_scores<<<nblocks(B * n, 8), 256, 0, t->stream>>>(t->s, qv, pv, (int)B, (int)n, (int)D);
            CU_LAUNCHED("scores");
            margin_mse<<<1, 256, 0, t->stream>>>(t->dloss, t->ds, t->s, t->t, (int)B, (int)n);
            CU_LAUNCHED("Margin-MSE");
            score_bwd<<<nblocks(B * D + B * n * D, 256), 256, 0, t->stream>>>(t->dq, t->dp, t->ds, qv, pv, (int)B, (int)n, (int)D);
            CU_LAUNCHED("score backward");
        }
    }
    KST_TRY(kst_bert_gpu_train_backward(t->g, 0, t->dq, err));
    KST_TRY(kst_bert_gpu_train_backward(t->g, 1, t->dp, err));
done:
    return rc;
}

extern "C" void kst_gpu_trainer_set_in_batch(kst_gpu_trainer *t, float weight) { t->ib_weight = weight > 0 ? weight : 0.0f; }

extern "C" int kst_gpu_trainer_update_enqueue(kst_gpu_trainer *t, int sgd, double lr, long step,
                                              const kst_adamw_config *ac, double grad_clip, kst_error *err) {
    int rc = KST_OK;
    float *params = kst_bert_gpu_train_params(t->g), *grads = kst_bert_gpu_train_grads(t->g);
    __nv_bfloat16 *pb16 = (__nv_bfloat16 *)kst_bert_gpu_train_params_bf16(t->g);
    adamw_args a;
    memset(&a, 0, sizeof a);
    /* the scalars as kst_adamw_update forms them (double, then float) */
    double b1 = ac->beta1, b2 = ac->beta2;
    a.shrink = (float)(1.0 - lr * ac->weight_decay);
    a.w1 = (float)(1.0 - b1);
    a.beta2 = (float)b2;
    a.w2 = (float)(1.0 - b2);
    a.step_size = (float)(lr / (1.0 - pow(b1, (double)step)));
    a.bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)step));
    a.eps = (float)ac->eps;
    a.lr = (float)lr;
    a.max_norm = (float)grad_clip;
    a.sgd = sgd;
    CU_TRY(cudaMemsetAsync(t->dss, 0, sizeof(double), t->stream), "zeroing the norm");
    if (grad_clip > 0) {
        sum_squares<<<1024, 256, 0, t->stream>>>(t->dss, grads, t->NP);
        CU_LAUNCHED("gradient norm");
    }
    adamw_step<<<nblocks(t->NP, 256), 256, 0, t->stream>>>(params, pb16, t->m, t->v, grads, t->decay, t->NP, a, t->dss);
    CU_LAUNCHED("AdamW");
    CU_TRY(cudaMemcpyAsync(t->hloss, t->dloss, sizeof(float), cudaMemcpyDeviceToHost, t->stream), "copying the loss");
    CU_TRY(cudaMemcpyAsync(t->hss, t->dss, sizeof(double), cudaMemcpyDeviceToHost, t->stream), "copying the norm");
    t->clip = grad_clip > 0;
done:
    return rc;
}

extern "C" int kst_gpu_trainer_wait(kst_gpu_trainer *t, float *loss, float *gnorm, kst_error *err) {
    int rc = KST_OK;
    CU_TRY(cudaStreamSynchronize(t->stream), "GPU training step");
    if (loss) *loss = *t->hloss;
    if (gnorm) *gnorm = t->clip ? (float)sqrt(*t->hss) : 0.0f;
done:
    return rc;
}

extern "C" int kst_gpu_trainer_update(kst_gpu_trainer *t, int sgd, double lr, long step,
                                      const kst_adamw_config *ac, double grad_clip, float *loss,
                                      float *gnorm, kst_error *err) {
    int rc = kst_gpu_trainer_update_enqueue(t, sgd, lr, step, ac, grad_clip, err);
    return rc == KST_OK ? kst_gpu_trainer_wait(t, loss, gnorm, err) : rc;
}

extern "C" int kst_gpu_trainer_grads(kst_gpu_trainer *t, float *grads, float *loss, kst_error *err) {
    int rc = KST_OK;
    KST_TRY(kst_bert_gpu_train_get_grads(t->g, grads, err));
    CU_TRY(cudaMemcpyAsync(t->hloss, t->dloss, sizeof(float), cudaMemcpyDeviceToHost, t->stream), "copying the loss");
    CU_TRY(cudaStreamSynchronize(t->stream), "copying the loss");
    if (loss) *loss = *t->hloss;
done:
    return rc;
}

extern "C" int kst_gpu_trainer_maxsim_choices(kst_gpu_trainer *t, int *argmax, size_t cap, size_t *W, kst_error *err) {
    int rc = KST_OK;
    size_t need = t->B * t->W * t->Tq;
    if (!t->colbert || !t->B) return kst_fail(err, KST_ERR_MISUSE, "GPU training: no ColBERT step to read MaxSim's choices of");
    if (cap < need) return kst_fail(err, KST_ERR_MISUSE, "GPU training: %zu MaxSim choices, room for %zu", need, cap);
    CU_TRY(cudaMemcpyAsync(argmax, t->argmax, need * sizeof(int), cudaMemcpyDeviceToHost, t->stream), "copying MaxSim's choices");
    CU_TRY(cudaStreamSynchronize(t->stream), "copying MaxSim's choices");
    *W = t->W;
done:
    return rc;
}

extern "C" int kst_gpu_trainer_get_state(kst_gpu_trainer *t, float *params, float *m, float *v, kst_error *err) {
    int rc = KST_OK;
    if (m) CU_TRY(cudaMemcpyAsync(m, t->m, t->NP * sizeof(float), cudaMemcpyDeviceToHost, t->stream), "copying the moments back");
    if (v) CU_TRY(cudaMemcpyAsync(v, t->v, t->NP * sizeof(float), cudaMemcpyDeviceToHost, t->stream), "copying the moments back");
    KST_TRY(kst_bert_gpu_train_get_params(t->g, params, err)); /* waits */
done:
    return rc;
}

extern "C" int kst_gpu_trainer_set_state(kst_gpu_trainer *t, const float *params, const float *m,
                                         const float *v, kst_error *err) {
    int rc = KST_OK;
    if (m) CU_TRY(cudaMemcpyAsync(t->m, m, t->NP * sizeof(float), cudaMemcpyHostToDevice, t->stream), "copying the moments");
    if (v) CU_TRY(cudaMemcpyAsync(t->v, v, t->NP * sizeof(float), cudaMemcpyHostToDevice, t->stream), "copying the moments");
    KST_TRY(kst_bert_gpu_train_set_params(t->g, params, err)); /* waits */
done:
    return rc;
}

extern "C" size_t kst_gpu_trainer_peak_bytes(const kst_gpu_trainer *t) {
    return t->bytes + kst_bert_gpu_train_peak_bytes(t->g);
}
