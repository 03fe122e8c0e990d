/* selfdistill.c - the bi <-> cross-encoder self-distillation loop (Trans-Encoder). */
#include "selfdistill.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/file.h"
#include "core/mem.h"
#include "core/ops_backward.h"
#include "core/progress.h"
#include "core/stream.h"
#include "encoders/bert_train.h"
#include "encoders/checkpoint.h"
#include "train/cross.h"
#include "train/loss.h"
#include "train/optim.h"
#include "train/teacher.h"

kst_selfdistill_opts kst_selfdistill_opts_default(void) {
    kst_selfdistill_opts o;
    memset(&o, 0, sizeof o);
    o.cycles = 1;
    o.train = kst_train_opts_default();
    o.eval_name = "dev";
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* pairs */

int kst_selfdistill_pairs_load(const char *path, const char ***aout, size_t **alout,
                               const char ***bout, size_t **blout, size_t *nout, char **bufout,
                               kst_error *err) {
    *aout = *bout = NULL, *alout = *blout = NULL, *nout = 0, *bufout = NULL;
    kst_stream *s = NULL;
    int rc = kst_stream_open(path, &s, err);
    if (rc != KST_OK) return rc;
    char *buf = NULL;
    size_t used = 0, bcap = 0, n = 0, cap = 0, *off = NULL, *len = NULL;
    for (;;) {
        const char *line;
        size_t ll;
        KST_TRY(kst_stream_getline(s, &line, &ll, err));
        if (!line) break;
        size_t ws = 0;
        while (ws < ll && (line[ws] == ' ' || line[ws] == '\t' || line[ws] == '\r')) ws++;
        if (ws == ll) continue;
        size_t lineno = kst_stream_lineno(s);
        const char *tab = memchr(line, '\t', ll), *sep = tab;
        size_t seplen = 1;
        if (!tab) {
            for (size_t i = 0; i + 1 < ll; i++)
                if (line[i] == '|' && line[i + 1] == '|') {
                    sep = line + i, seplen = 2;
                    break;
                }
        }
        if (!sep) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: expected text1<TAB>text2 (or text1||text2)", path, lineno);
            goto done;
        }
        size_t l1 = (size_t)(sep - line), rest = ll - l1 - seplen;
        const char *t2 = sep + seplen, *tab2 = memchr(t2, '\t', rest);
        size_t l2 = tab2 ? (size_t)(tab2 - t2) : rest;
        if (l1 == 0 || l2 == 0) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: text %d of the pair is empty", path, lineno, l1 ? 2 : 1);
            goto done;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            KST_TRY(kst_realloc((void **)&off, cap * 2, sizeof *off, "pairs", err));
            KST_TRY(kst_realloc((void **)&len, cap * 2, sizeof *len, "pairs", err));
        }
        if (used + l1 + l2 + 2 > bcap) {
            size_t nc = bcap ? 2 * bcap : (1u << 20);
            while (nc < used + l1 + l2 + 2) nc *= 2;
            KST_TRY(kst_realloc((void **)&buf, nc, 1, "pairs", err));
            bcap = nc;
        }
        memcpy(buf + used, line, l1);
        buf[used + l1] = '\0';
        memcpy(buf + used + l1 + 1, t2, l2);
        buf[used + l1 + 1 + l2] = '\0';
        off[2 * n] = used, len[2 * n] = l1;
        off[2 * n + 1] = used + l1 + 1, len[2 * n + 1] = l2;
        used += l1 + l2 + 2;
        n++;
    }
    if (n == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: has no pairs (expected text1<TAB>text2 lines)", path);
        goto done;
    }
    const char **a = kst_malloc(n, sizeof *a, "pairs", err), **b = kst_malloc(n, sizeof *b, "pairs", err);
    size_t *al = kst_malloc(n, sizeof *al, "pairs", err), *bl = kst_malloc(n, sizeof *bl, "pairs", err);
    if (!a || !b || !al || !bl) {
        kst_free(a), kst_free(b), kst_free(al), kst_free(bl);
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        a[i] = buf + off[2 * i], al[i] = len[2 * i];
        b[i] = buf + off[2 * i + 1], bl[i] = len[2 * i + 1];
    }
    *aout = a, *bout = b, *alout = al, *blout = bl, *nout = n, *bufout = buf;
    buf = NULL;
done:
    kst_free(off);
    kst_free(len);
    kst_free(buf);
    kst_stream_close(s);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* bi-encoder training: MSE between cos(u, v) and the label */

typedef struct bi_side {
    int32_t *ids;
    int *valid;
    size_t rows, T, cap;
    kst_bert_train_acts acts;
    kst_head_acts head;
    float *dvec, *dhidden;
    size_t cap_v, cap_h;
} bi_side;

static void bi_side_free(bi_side *s) {
    kst_free(s->ids), kst_free(s->valid), kst_free(s->dvec), kst_free(s->dhidden);
    kst_bert_train_acts_free(&s->acts);
    kst_head_acts_free(&s->head);
}

static int bi_side_run(kst_encoder *e, bi_side *s, const char *const *t, const size_t *tl, size_t rows,
                       size_t max_len, float dropout, uint64_t *rng, kst_error *err) {
    int rc = KST_OK;
    kst_ids *v = kst_calloc(rows, sizeof *v, "token ids", err);
    if (!v) return KST_ERR_NOMEM;
    size_t T = 1;
    for (size_t r = 0; r < rows; r++) {
        KST_TRY(kst_encoder_tokenize(e, t[r], tl[r], NULL, 0, 0, max_len, &v[r], err));
        if (v[r].len > T) T = v[r].len;
    }
    if (rows * T > s->cap || rows > s->cap) {
        size_t c = rows * T;
        KST_TRY(kst_realloc((void **)&s->ids, c, sizeof *s->ids, "batch", err));
        KST_TRY(kst_realloc((void **)&s->valid, c, sizeof *s->valid, "batch", err));
        s->cap = c;
    }
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t r = 0; r < rows; r++) {
        s->valid[r] = (int)v[r].len;
        for (size_t k = 0; k < T; k++) s->ids[r * T + k] = k < v[r].len ? v[r].ids[k] : (sp.pad >= 0 ? sp.pad : 0);
    }
    s->rows = rows, s->T = T;
    KST_TRY(kst_bert_train_forward(&e->bert, &s->acts, s->ids, NULL, s->valid, rows, T, dropout, rng, err));
    KST_TRY(kst_dense_head_forward(&e->bert, &s->head, kst_bert_train_hidden(&e->bert, &s->acts), s->valid,
                                   e->pool_modes, e->normalize, rows, T, err));
    size_t nv = rows * e->dim, nh = rows * T * e->bert.cfg.C;
    if (nv > s->cap_v) {
        KST_TRY(kst_realloc((void **)&s->dvec, nv, sizeof(float), "gradients", err));
        s->cap_v = nv;
    }
    if (nh > s->cap_h) {
        KST_TRY(kst_realloc((void **)&s->dhidden, nh, sizeof(float), "gradients", err));
        s->cap_h = nh;
    }
    memset(s->dvec, 0, nv * sizeof(float));
    memset(s->dhidden, 0, nh * sizeof(float));
done:
    for (size_t r = 0; r < rows; r++) kst_ids_free(&v[r]);
    kst_free(v);
    return rc;
}

static void bi_side_backward(kst_encoder *e, kst_bert *g, bi_side *s) {
    const float *h = kst_bert_train_hidden(&e->bert, &s->acts);
    kst_dense_head_backward(&e->bert, g, &s->head, s->dhidden, s->dvec, h, s->valid, e->pool_modes, e->normalize,
                            s->rows, s->T);
    kst_bert_train_backward(&e->bert, g, &s->acts, s->dhidden);
}

/* cos(u, v) as torch.cosine_similarity (norms clamped at 1e-8); adds dloss * dcos/du, dv. */
static float cosine(const float *u, const float *v, size_t D, float *du, float *dv, float dloss) {
    double uv = 0, uu = 0, vv = 0;
    for (size_t k = 0; k < D; k++) uv += (double)u[k] * v[k], uu += (double)u[k] * u[k], vv += (double)v[k] * v[k];
    double nu = sqrt(uu) > 1e-8 ? sqrt(uu) : 1e-8, nv = sqrt(vv) > 1e-8 ? sqrt(vv) : 1e-8, c = uv / (nu * nv);
    if (du)
        for (size_t k = 0; k < D; k++) {
            du[k] += (float)(dloss * (v[k] / (nu * nv) - c * u[k] / (nu * nu)));
            dv[k] += (float)(dloss * (u[k] / (nu * nv) - c * v[k] / (nv * nv)));
        }
    return (float)c;
}

static const int DECAY[KST_BERT_NPARAMS] = {1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1,
                                            0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0};

/* One pass of MSE training of bi-encoder e on (a, b, label). Returns the mean loss in *loss. */
static int bi_fit(kst_encoder *e, const kst_selfdistill_opts *o, const char *const *a, const size_t *al,
                  const char *const *b, const size_t *bl, const float *label, size_t n, uint64_t seed,
                  double *loss_out, kst_error *err) {
    int rc = KST_OK;
    const kst_train_opts *t = &o->train;
    size_t B = t->batch_size ? t->batch_size : 32, NP = e->bert.num_params, D = e->dim;
    kst_bert g = {0};
    bi_side sa = {0}, sb = {0};
    float *mom = NULL, *vel = NULL;
    unsigned char *decay = NULL;
    size_t *order = kst_malloc(n, sizeof *order, "order", err);
    const char **ba = kst_malloc(B, sizeof *ba, "batch", err), **bb = kst_malloc(B, sizeof *bb, "batch", err);
    size_t *bal = kst_malloc(B, sizeof *bal, "batch", err), *bbl = kst_malloc(B, sizeof *bbl, "batch", err);
    float *by = kst_malloc(B, sizeof *by, "batch", err);
    if (!order || !ba || !bb || !bal || !bbl || !by) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(kst_bert_grads_alloc(&g, &e->bert, err));
    if (!t->sgd) {
        mom = kst_calloc(NP, sizeof *mom, "AdamW moments", err);
        vel = kst_calloc(NP, sizeof *vel, "AdamW moments", err);
        decay = kst_malloc(NP, 1, "decay mask", err);
        if (!mom || !vel || !decay) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        kst_decay_mask_fill(decay, e->bert.param_sizes, DECAY, KST_BERT_NPARAMS);
    }
    float dropout = (float)(t->dropout >= 0 ? t->dropout : 0.1);
    uint64_t rng = kst_rng_seed(seed);
    long epochs = t->epochs > 0 ? t->epochs : 1;
    long per = (long)((n + B - 1) / B), total = t->steps > 0 ? t->steps : per * epochs;
    double lr0 = o->bi_lr > 0 ? o->bi_lr : t->lr, sum = 0;
    kst_adamw_config ac = kst_adamw_defaults();
    ac.weight_decay = t->weight_decay;
    kst_xoshiro xr;
    size_t pos = n;
    long epoch = -1;
    kst_progress bar;
    kst_progress_begin(&bar, "bi-encoder", (size_t)total);
    for (long step = 0; step < total; step++) {
        if (pos >= n) {
            for (size_t i = 0; i < n; i++) order[i] = i;
            kst_xoshiro_seed(&xr, seed + (uint64_t)(++epoch));
            if (!t->no_shuffle)
                for (size_t i = n; i > 1; i--) {
                    size_t j = (size_t)kst_xoshiro_below(&xr, i), tmp = order[i - 1];
                    order[i - 1] = order[j], order[j] = tmp;
                }
            pos = 0;
        }
        size_t k = 0;
        for (; k < B && pos < n; k++, pos++) {
            size_t i = order[pos];
            ba[k] = a[i], bal[k] = al[i], bb[k] = b[i], bbl[k] = bl[i], by[k] = label[i];
        }
        KST_TRY(bi_side_run(e, &sa, ba, bal, k, o->max_len, dropout, &rng, err));
        KST_TRY(bi_side_run(e, &sb, bb, bbl, k, o->max_len, dropout, &rng, err));
        double loss = 0;
        for (size_t r = 0; r < k; r++) {
            float c = cosine(sa.head.out + r * D, sb.head.out + r * D, D, NULL, NULL, 0);
            loss += ((double)c - by[r]) * ((double)c - by[r]);
            /* d mean (c - y)^2 / dc = 2 (c - y) / k */
            cosine(sa.head.out + r * D, sb.head.out + r * D, D, sa.dvec + r * D, sb.dvec + r * D,
                   (float)(2.0 * ((double)c - by[r]) / (double)k));
        }
        loss /= (double)k;
        sum += loss;
        kst_bert_grads_zero(&g);
        bi_side_backward(e, &g, &sa);
        bi_side_backward(e, &g, &sb);
        if (t->grad_clip > 0) kst_clip_grad_norm(g.param_mem, NP, (float)t->grad_clip);
        double lr = kst_lr_at(t->cosine ? KST_LR_COSINE : KST_LR_LINEAR, lr0, step, t->warmup, total);
        if (t->sgd) kst_sgd_update(e->bert.param_mem, g.param_mem, NP, lr);
        else kst_adamw_update(e->bert.param_mem, mom, vel, g.param_mem, decay, NP, step + 1, lr, &ac);
        if (!isfinite(loss)) {
            rc = kst_fail(err, KST_ERR_INVALID, "bi-encoder step %ld: the loss is not finite; lower --lr", step + 1);
            goto done;
        }
        snprintf(bar.suffix, sizeof bar.suffix, "step %ld mse %.4f", step + 1, loss);
        kst_progress_add(&bar, 1);
    }
    kst_progress_end(&bar);
    *loss_out = total ? sum / (double)total : 0;
done:
    bi_side_free(&sa), bi_side_free(&sb);
    kst_bert_free(&g);
    kst_free(mom), kst_free(vel), kst_free(decay), kst_free(order);
    kst_free(ba), kst_free(bb), kst_free(bal), kst_free(bbl), kst_free(by);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* labels */

/* label[i] = mean over the bi-encoders of clip(cos(a_i, b_i), 0, 1). */
static int bi_labels(kst_encoder **bi, size_t nb, const kst_selfdistill_opts *o, const char *const *a,
                     const size_t *al, const char *const *b, const size_t *bl, size_t n, float *label,
                     float *tmp, kst_error *err) {
    memset(label, 0, n * sizeof *label);
    for (size_t k = 0; k < nb; k++) {
        int rc = kst_encoder_score(bi[k], a, al, b, bl, n, o->max_len, 0, tmp, err);
        if (rc != KST_OK) return rc;
        for (size_t i = 0; i < n; i++) label[i] += (tmp[i] < 0 ? 0 : tmp[i] > 1 ? 1 : tmp[i]) / (float)nb;
    }
    return KST_OK;
}

/* label[i] = mean over the cross-encoders and both orders of sigmoid(logit). */
static int cross_labels(kst_encoder **cr, size_t nc, const kst_selfdistill_opts *o, const char *const *a,
                        const size_t *al, const char *const *b, const size_t *bl, size_t n, float *label,
                        float *tmp, kst_error *err) {
    memset(label, 0, n * sizeof *label);
    for (size_t k = 0; k < nc; k++)
        for (int order = 0; order < 2; order++) {
            int rc = order ? kst_encoder_score(cr[k], b, bl, a, al, n, o->max_len, 0, tmp, err)
                           : kst_encoder_score(cr[k], a, al, b, bl, n, o->max_len, 0, tmp, err);
            if (rc != KST_OK) return rc;
            for (size_t i = 0; i < n; i++)
                label[i] += (float)(1.0 / (1.0 + exp(-(double)tmp[i])) / (2.0 * (double)nc));
        }
    return KST_OK;
}

static double mean_of(const float *v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += v[i];
    return n ? s / (double)n : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the loop */

static int save_all(kst_encoder **m, size_t n, const char *out, const char *name, kst_error *err) {
    for (size_t k = 0; k < n; k++) {
        char dir[4096];
        if (n == 1) snprintf(dir, sizeof dir, "%s/%s", out, name);
        else snprintf(dir, sizeof dir, "%s/%s-%zu", out, name, k + 1);
        int rc = kst_checkpoint_save(m[k], dir, err);
        if (rc != KST_OK) return rc;
    }
    return KST_OK;
}

static int dev_score(const kst_selfdistill_opts *o, kst_encoder **bi, size_t nb, double *mean, kst_error *err) {
    double s = 0;
    for (size_t k = 0; k < nb; k++) {
        double v = 0;
        int rc = o->eval(o->eval_ctx, bi[k], &v, err);
        if (rc != KST_OK) return rc;
        if (nb > 1) fprintf(stderr, "kestrel self-distill:   bi-encoder %zu %s %.4f\n", k + 1, o->eval_name, v);
        s += v;
    }
    *mean = s / (double)nb;
    return KST_OK;
}

int kst_self_distill(const kst_selfdistill_opts *o, kst_selfdistill_result *res, kst_error *err) {
    int rc = KST_OK;
    memset(res, 0, sizeof *res);
    res->dev_before = res->dev_best = NAN;
    if (!o->n_bi || !o->n_cross || !o->pairs_path || !o->out_dir)
        return kst_fail(err, KST_ERR_INVALID, "self-distillation needs a bi-encoder, a cross-encoder, pairs and an output folder");
    kst_encoder **bi = kst_calloc(o->n_bi, sizeof *bi, "models", err);
    kst_encoder **cr = kst_calloc(o->n_cross, sizeof *cr, "models", err);
    const char **a = NULL, **b = NULL;
    size_t *al = NULL, *bl = NULL, n = 0;
    char *buf = NULL;
    float *label = NULL, *tmp = NULL;
    kst_cross_example *ex = NULL;
    FILE *log = NULL;
    if (!bi || !cr) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t k = 0; k < o->n_bi; k++) {
        KST_TRY(kst_encoder_open(o->bi_dirs[k], KST_ROLE_AUTO, &bi[k], err));
        if (bi[k]->role != KST_ROLE_DENSE) {
            rc = kst_fail(err, KST_ERR_INVALID, "--bi %s is a %s model; the bi-encoder must be a dense "
                          "(sentence-transformers) model", o->bi_dirs[k], kst_role_name(bi[k]->role));
            goto done;
        }
    }
    for (size_t k = 0; k < o->n_cross; k++) {
        KST_TRY(kst_encoder_open(o->cross_dirs[k], KST_ROLE_AUTO, &cr[k], err));
        if (cr[k]->role != KST_ROLE_CROSS || cr[k]->bert.cfg.NL != 1) {
            rc = kst_fail(err, KST_ERR_INVALID, "--cross %s must be a cross-encoder with one logit "
                          "(a *ForSequenceClassification folder with num_labels 1)", o->cross_dirs[k]);
            goto done;
        }
    }
    KST_TRY(kst_selfdistill_pairs_load(o->pairs_path, &a, &al, &b, &bl, &n, &buf, err));
    label = kst_malloc(n, sizeof *label, "labels", err);
    tmp = kst_malloc(n, sizeof *tmp, "labels", err);
    ex = kst_malloc(2 * n, sizeof *ex, "examples", err);
    if (!label || !tmp || !ex) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(kst_mkdirs(o->out_dir, err));
    char logpath[4096];
    KST_TRY(kst_path_join(logpath, sizeof logpath, o->out_dir, "self_distill_log.jsonl", err));
    log = fopen(logpath, "w");
    if (!log) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create", logpath);
        goto done;
    }
    fprintf(stderr, "kestrel self-distill: %zu pairs, %zu bi-encoder%s, %zu cross-encoder%s, %ld cycle%s\n", n, o->n_bi,
            o->n_bi > 1 ? "s" : "", o->n_cross, o->n_cross > 1 ? "s" : "", o->cycles, o->cycles > 1 ? "s" : "");
    double best = -INFINITY;
    if (o->eval) {
        KST_TRY(dev_score(o, bi, o->n_bi, &res->dev_before, err));
        fprintf(stderr, "kestrel self-distill: cycle 0 (before): bi-encoder %s %.4f\n", o->eval_name, res->dev_before);
        fprintf(log, "{\"cycle\": 0, \"stage\": \"dev\", \"%s\": %.6f}\n", o->eval_name, res->dev_before);
    }
    long cycles = o->cycles > 0 ? o->cycles : 1;
    for (long c = 1; c <= cycles; c++) {
        uint64_t seed = o->train.seed + (uint64_t)c * 1000;
        /* 1. bi-encoders label */
        KST_TRY(bi_labels(bi, o->n_bi, o, a, al, b, bl, n, label, tmp, err));
        fprintf(log, "{\"cycle\": %ld, \"stage\": \"bi-labels\", \"mean_label\": %.6f}\n", c, mean_of(label, n));
        /* 2. cross-encoders train on both orders */
        for (size_t i = 0; i < n; i++) {
            ex[2 * i] = (kst_cross_example){a[i], b[i], NULL, al[i], bl[i], 0, label[i]};
            ex[2 * i + 1] = (kst_cross_example){b[i], a[i], NULL, bl[i], al[i], 0, label[i]};
        }
        for (size_t k = 0; k < o->n_cross; k++) {
            kst_cross_opts co = kst_cross_opts_default();
            co.train = o->train;
            co.train.lr = o->cross_lr > 0 ? o->cross_lr : o->train.lr;
            co.train.seed = seed + k;
            co.data = KST_CROSS_PAIRS;
            co.max_len = o->max_len;
            kst_train_result r;
            KST_TRY(kst_cross_fit(cr[k], &co, ex, 2 * n, NULL, &r, err));
            fprintf(stderr, "kestrel self-distill: cycle %ld: cross-encoder %zu trained, %ld steps, BCE %.4f -> %.4f\n", c,
                    k + 1, r.steps, r.first_loss, r.last_loss);
            fprintf(log, "{\"cycle\": %ld, \"stage\": \"cross-train\", \"model\": %zu, \"steps\": %ld, \"first_loss\": %.6f, \"last_loss\": %.6f}\n",
                    c, k + 1, r.steps, r.first_loss, r.last_loss);
        }
        /* 3. cross-encoders re-label */
        KST_TRY(cross_labels(cr, o->n_cross, o, a, al, b, bl, n, label, tmp, err));
        fprintf(log, "{\"cycle\": %ld, \"stage\": \"cross-labels\", \"mean_label\": %.6f}\n", c, mean_of(label, n));
        /* 4. bi-encoders train with MSE */
        for (size_t k = 0; k < o->n_bi; k++) {
            double mse = 0;
            KST_TRY(bi_fit(bi[k], o, a, al, b, bl, label, n, seed + 100 + k, &mse, err));
            fprintf(stderr, "kestrel self-distill: cycle %ld: bi-encoder %zu trained, mean MSE %.4f\n", c, k + 1, mse);
            fprintf(log, "{\"cycle\": %ld, \"stage\": \"bi-train\", \"model\": %zu, \"mean_loss\": %.6f}\n", c, k + 1, mse);
        }
        int keep = 1;
        if (o->eval) {
            double d = 0;
            KST_TRY(dev_score(o, bi, o->n_bi, &d, err));
            keep = d > best;
            fprintf(stderr, "kestrel self-distill: cycle %ld: bi-encoder %s %.4f (before %.4f)%s\n", c, o->eval_name, d,
                    res->dev_before, keep ? ", best so far: saved" : "");
            fprintf(log, "{\"cycle\": %ld, \"stage\": \"dev\", \"%s\": %.6f}\n", c, o->eval_name, d);
            if (keep) best = d, res->dev_best = d;
        }
        fflush(log);
        if (o->eval ? keep : c == cycles) { /* the best cycle so far, or the last without a dev set */
            KST_TRY(save_all(bi, o->n_bi, o->out_dir, "bi", err));
            KST_TRY(save_all(cr, o->n_cross, o->out_dir, "cross", err));
            res->best_cycle = c;
        }
    }
done:
    if (log) fclose(log);
    if (bi)
        for (size_t k = 0; k < o->n_bi; k++) kst_encoder_free(bi[k]);
    if (cr)
        for (size_t k = 0; k < o->n_cross; k++) kst_encoder_free(cr[k]);
    kst_free(bi), kst_free(cr);
    kst_free(a), kst_free(b), kst_free(al), kst_free(bl), kst_free(buf);
    kst_free(label), kst_free(tmp), kst_free(ex);
    return rc;
}
