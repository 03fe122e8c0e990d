/* cross.c - cross-encoder training: pairs (BCE), teacher scores (Margin-MSE / MSE), triples (CE). */
#include "cross.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"
#include "core/mem.h"
#include "core/ops_backward.h"
#include "core/progress.h"
#include "core/stream.h"
#include "encoders/bert_train.h"
#include "encoders/checkpoint.h"
#include "train/loss.h"
#include "train/optim.h"
#include "train/teacher.h"

kst_cross_opts kst_cross_opts_default(void) {
    kst_cross_opts o;
    memset(&o, 0, sizeof o);
    o.train = kst_train_opts_default();
    o.data = KST_CROSS_PAIRS;
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* pairs and triples files */

/* Splits line (len bytes, NUL-terminated, modified) at tabs into at most `want + 1` fields. */
static size_t split_tabs(char *line, size_t len, char **f, size_t *fl, size_t want) {
    size_t k = 0;
    char *s = line, *end = line + len;
    while (k <= want) {
        char *tab = memchr(s, '\t', (size_t)(end - s));
        f[k] = s;
        fl[k] = (size_t)((tab ? tab : end) - s);
        k++;
        if (!tab) break;
        *tab = '\0';
        s = tab + 1;
    }
    return k;
}

int kst_cross_examples_load(const char *path, int triple, kst_cross_example **out, size_t *nout,
                            char **bufout, kst_error *err) {
    *out = NULL, *nout = 0, *bufout = NULL;
    kst_stream *s = NULL;
    int rc = kst_stream_open(path, &s, err);
    if (rc != KST_OK) return rc;
    kst_cross_example *ex = NULL;
    char *buf = NULL;
    size_t n = 0, cap = 0, used = 0, bcap = 0;
    const char *what = triple ? "query<TAB>positive<TAB>negative" : "query<TAB>passage<TAB>label";
    /* First pass copies lines into one growing buffer and remembers offsets (pointers come
     * after, since the buffer moves as it grows). */
    size_t *offs = NULL;
    for (;;) {
        const char *line;
        size_t len;
        KST_TRY(kst_stream_getline(s, &line, &len, err));
        if (!line) break;
        size_t lineno = kst_stream_lineno(s);
        size_t ws = 0;
        while (ws < len && (line[ws] == ' ' || line[ws] == '\t' || line[ws] == '\r')) ws++;
        if (ws == len) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            KST_TRY(kst_realloc((void **)&ex, cap, sizeof *ex, "examples", err));
            KST_TRY(kst_realloc((void **)&offs, cap * 4, sizeof *offs, "examples", err));
        }
        if (used + len + 1 > bcap) {
            size_t nc = bcap ? 2 * bcap : (1u << 20);
            while (nc < used + len + 1) nc *= 2;
            KST_TRY(kst_realloc((void **)&buf, nc, 1, "examples", err));
            bcap = nc;
        }
        char *l = buf + used;
        memcpy(l, line, len);
        l[len] = '\0';
        char *f[4];
        size_t fl[4];
        size_t k = split_tabs(l, len, f, fl, 3);
        if (k != 3) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: %zu column%s, expected 3 (%s)", path, lineno, k,
                          k == 1 ? "" : "s", what);
            goto done;
        }
        for (size_t i = 0; i < 3; i++)
            if (fl[i] == 0 && (triple || i < 2)) {
                rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: column %zu is empty (%s)", path, lineno, i + 1, what);
                goto done;
            }
        memset(&ex[n], 0, sizeof ex[n]);
        if (!triple) {
            char *e = NULL;
            double y = strtod(f[2], &e);
            if (e == f[2] || *e || !isfinite(y) || y < 0 || y > 1) {
                rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: label \"%.*s\" is not a number in [0, 1]", path,
                              lineno, (int)(fl[2] > 40 ? 40 : fl[2]), f[2]);
                goto done;
            }
            ex[n].label = (float)y;
        }
        for (size_t i = 0; i < 3; i++) offs[n * 4 + i] = (size_t)(f[i] - buf);
        ex[n].alen = fl[0], ex[n].blen = fl[1], ex[n].clen = triple ? fl[2] : 0;
        used += len + 1;
        n++;
    }
    if (n == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: has no training rows (expected %s lines)", path, what);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        ex[i].a = buf + offs[i * 4];
        ex[i].b = buf + offs[i * 4 + 1];
        ex[i].c = triple ? buf + offs[i * 4 + 2] : NULL;
    }
    *out = ex, *nout = n, *bufout = buf;
    ex = NULL, buf = NULL;
done:
    kst_free(offs);
    kst_free(ex);
    kst_free(buf);
    kst_stream_close(s);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* example sources: in memory (pairs, triples) or a streamed teacher file */

typedef struct source {
    /* in memory */
    const kst_cross_example *ex;
    size_t n, pos, *order;
    int triple;
    /* teacher */
    kst_teacher *tr;
    kst_teacher_opts topts;
    const char *tpath;
    uint64_t seed;
    long epoch;
    int no_shuffle;
} source;

static void shuffle(source *s) {
    for (size_t i = 0; i < s->n; i++) s->order[i] = i;
    if (s->no_shuffle) return;
    kst_xoshiro r;
    kst_xoshiro_seed(&r, s->seed + (uint64_t)s->epoch);
    for (size_t i = s->n; i > 1; i--) { /* Fisher-Yates */
        size_t j = (size_t)kst_xoshiro_below(&r, i);
        size_t t = s->order[i - 1];
        s->order[i - 1] = s->order[j];
        s->order[j] = t;
    }
}

/* The batch being assembled: rows sequences (query, passage) and per-row targets; nper passages
 * per example (1 pairs, 2 triples, n teacher). Teacher texts are copied (owned). */
typedef struct batch {
    const char **q, **p;
    size_t *ql, *pl;
    float *target;
    char **owned;
    size_t nowned, cap, b, nper;
} batch;

static void batch_release(batch *bt) {
    for (size_t i = 0; i < bt->nowned; i++) kst_free(bt->owned[i]);
    bt->nowned = 0;
}

static void batch_free(batch *bt) {
    batch_release(bt);
    kst_free(bt->q), kst_free(bt->p), kst_free(bt->ql), kst_free(bt->pl);
    kst_free(bt->target), kst_free(bt->owned);
}

static int batch_reserve(batch *bt, size_t rows, kst_error *err) {
    int rc = KST_OK;
    if (rows <= bt->cap) return KST_OK;
    KST_TRY(kst_realloc((void **)&bt->q, rows, sizeof *bt->q, "batch", err));
    KST_TRY(kst_realloc((void **)&bt->p, rows, sizeof *bt->p, "batch", err));
    KST_TRY(kst_realloc((void **)&bt->ql, rows, sizeof *bt->ql, "batch", err));
    KST_TRY(kst_realloc((void **)&bt->pl, rows, sizeof *bt->pl, "batch", err));
    KST_TRY(kst_realloc((void **)&bt->target, rows, sizeof *bt->target, "batch", err));
    KST_TRY(kst_realloc((void **)&bt->owned, 2 * rows, sizeof *bt->owned, "batch", err));
    bt->cap = rows;
done:
    return rc;
}

/* Fills up to B examples, stopping early at the end of an epoch (the next call starts the next
 * one, reshuffled). *got = 0 never happens on success: an empty source fails at open. */
static int source_next(source *s, batch *bt, size_t B, kst_error *err) {
    int rc = KST_OK;
    batch_release(bt);
    bt->b = 0;
    if (s->ex) {
        bt->nper = s->triple ? 2 : 1;
        KST_TRY(batch_reserve(bt, B * bt->nper, err));
        if (s->pos == s->n) {
            s->epoch++;
            shuffle(s);
            s->pos = 0;
        }
        while (bt->b < B && s->pos < s->n) {
            const kst_cross_example *x = &s->ex[s->order[s->pos++]];
            size_t r = bt->b * bt->nper;
            bt->q[r] = x->a, bt->ql[r] = x->alen, bt->p[r] = x->b, bt->pl[r] = x->blen;
            bt->target[r] = x->label;
            if (s->triple) {
                bt->q[r + 1] = x->a, bt->ql[r + 1] = x->alen, bt->p[r + 1] = x->c, bt->pl[r + 1] = x->clen;
                bt->target[r + 1] = 0;
            }
            bt->b++;
        }
        return KST_OK;
    }
    kst_teacher_record rec;
    for (int reopened = 0; bt->b < B;) {
        KST_TRY(kst_teacher_next(s->tr, &rec, err));
        if (!rec.query) {
            if (bt->b > 0 || reopened) break;
            kst_teacher_close(s->tr);
            s->tr = NULL;
            s->topts.seed = s->seed + (uint64_t)(++s->epoch);
            KST_TRY(kst_teacher_open(s->tpath, &s->topts, NULL, &s->tr, err));
            reopened = 1;
            continue;
        }
        if (bt->b == 0) {
            bt->nper = rec.n;
            KST_TRY(batch_reserve(bt, B * rec.n, err));
        } else if (rec.n != bt->nper) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: %zu passages, but earlier records have %zu", s->tpath,
                          rec.line, rec.n, bt->nper);
            goto done;
        }
        char *qt = kst_strndup(rec.query, rec.query_len, err);
        if (!qt) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        bt->owned[bt->nowned++] = qt;
        for (size_t i = 0; i < rec.n; i++) {
            size_t r = bt->b * rec.n + i;
            char *pt = kst_strndup(rec.passages[i], rec.passage_lens[i], err);
            if (!pt) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            /* owned holds 2 * rows slots: one query per record plus n passages fit */
            bt->owned[bt->nowned++] = pt;
            bt->q[r] = qt, bt->ql[r] = rec.query_len, bt->p[r] = pt, bt->pl[r] = rec.passage_lens[i];
            bt->target[r] = rec.scores[i];
        }
        bt->b++;
    }
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* one optimizer step */

/* Which parameter tensors get weight decay: matrices and embeddings, not biases or LayerNorms
 * (same table as the student trainer; the pooler and classifier weights decay). */
static const int DECAY[KST_BERT_NPARAMS] = {1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1,
                                            0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0};

typedef struct stepper {
    kst_encoder *e;
    kst_bert grads;
    float *mom, *vel;
    unsigned char *decay;
    kst_bert_train_acts acts;
    kst_cross_head_acts head;
    int32_t *ids, *types;
    int *valid;
    float *dlogits, *dhidden;
    size_t cap_rows, cap_tok;
    uint64_t rng;
    float dropout, head_dropout;
} stepper;

static void stepper_free(stepper *s) {
    kst_bert_free(&s->grads);
    kst_free(s->mom), kst_free(s->vel), kst_free(s->decay);
    kst_bert_train_acts_free(&s->acts);
    kst_cross_head_acts_free(&s->head);
    kst_free(s->ids), kst_free(s->types), kst_free(s->valid);
    kst_free(s->dlogits), kst_free(s->dhidden);
}

/* Tokenizes the rows (query, passage) pairs into a padded batch with their token types. */
static int tokenize_pairs(stepper *s, const batch *bt, size_t rows, size_t max_len, size_t *Tout,
                          kst_error *err) {
    kst_encoder *e = s->e;
    int rc = KST_OK;
    kst_ids *v = kst_calloc(rows, sizeof *v, "token ids", err);
    if (!v) return KST_ERR_NOMEM;
    size_t T = 1;
    for (size_t r = 0; r < rows; r++) {
        KST_TRY(kst_encoder_tokenize(e, bt->q[r], bt->ql[r], bt->p[r], bt->pl[r], 0, max_len, &v[r], err));
        if (v[r].len > T) T = v[r].len;
    }
    if (rows > s->cap_rows) {
        KST_TRY(kst_realloc((void **)&s->valid, rows, sizeof *s->valid, "batch", err));
        KST_TRY(kst_realloc((void **)&s->dlogits, rows, sizeof *s->dlogits, "batch", err));
        s->cap_rows = rows;
    }
    if (rows * T > s->cap_tok) {
        KST_TRY(kst_realloc((void **)&s->ids, rows * T, sizeof *s->ids, "batch", err));
        KST_TRY(kst_realloc((void **)&s->types, rows * T, sizeof *s->types, "batch", err));
        KST_TRY(kst_realloc((void **)&s->dhidden, rows * T * e->bert.cfg.C, sizeof *s->dhidden, "gradients", err));
        s->cap_tok = rows * T;
    }
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t r = 0; r < rows; r++) {
        s->valid[r] = (int)v[r].len;
        for (size_t t = 0; t < T; t++) {
            s->ids[r * T + t] = t < v[r].len ? v[r].ids[t] : (sp.pad >= 0 ? sp.pad : 0);
            s->types[r * T + t] = t < v[r].len ? v[r].type_ids[t] : 0;
        }
    }
    *Tout = T;
done:
    for (size_t r = 0; r < rows; r++) kst_ids_free(&v[r]);
    kst_free(v);
    return rc;
}

/* Cross-entropy over each row of (B, n) logits with the label in column 0:
 * mean_b logsumexp(s_b) - s_b0 (torch.nn.CrossEntropyLoss with target 0). ds += dloss * grad. */
static float ce_first(const float *s, float *ds, size_t B, size_t n) {
    double loss = 0;
    for (size_t b = 0; b < B; b++) {
        const float *r = s + b * n;
        double mx = r[0], z = 0;
        for (size_t i = 1; i < n; i++) mx = r[i] > mx ? r[i] : mx;
        for (size_t i = 0; i < n; i++) z += exp((double)r[i] - mx);
        loss += mx + log(z) - r[0];
        if (ds)
            for (size_t i = 0; i < n; i++)
                ds[b * n + i] += (float)((exp((double)r[i] - mx) / z - (i == 0)) / (double)B);
    }
    return (float)(loss / (double)B);
}

/* Forward, loss, backward and update over one batch; *loss gets the batch loss. */
static int step_once(stepper *s, const kst_cross_opts *o, batch *bt, long step, long total,
                     float *loss, float *gnorm, double *lr_out, kst_error *err) {
    kst_encoder *e = s->e;
    const kst_bert *m = &e->bert;
    size_t rows = bt->b * bt->nper, T = 0, C = m->cfg.C;
    int rc = tokenize_pairs(s, bt, rows, o->max_len, &T, err);
    if (rc != KST_OK) return rc;
    rc = kst_bert_train_forward(m, &s->acts, s->ids, s->types, s->valid, rows, T, s->dropout, &s->rng, err);
    if (rc != KST_OK) return rc;
    const float *hidden = kst_bert_train_hidden(m, &s->acts);
    rc = kst_cross_head_forward(m, &s->head, hidden, rows, T, s->head_dropout, &s->rng, err);
    if (rc != KST_OK) return rc;
    const float *x = s->head.logits; /* (rows, 1) */
    memset(s->dlogits, 0, rows * sizeof *s->dlogits);
    switch (o->data) {
    case KST_CROSS_PAIRS:
        *loss = kst_bce_logits_forward(x, bt->target, rows);
        kst_bce_logits_backward(s->dlogits, x, bt->target, rows, 1.0f);
        break;
    case KST_CROSS_TRIPLES:
        *loss = ce_first(x, s->dlogits, bt->b, bt->nper);
        break;
    case KST_CROSS_TEACHER:
        if (o->loss_mse) {
            *loss = kst_mse_forward(x, bt->target, rows);
            kst_mse_backward(s->dlogits, x, bt->target, rows, 1.0f);
        } else {
            *loss = kst_margin_mse_forward(x, bt->target, bt->b, bt->nper);
            kst_margin_mse_backward(s->dlogits, x, bt->target, bt->b, bt->nper, 1.0f);
        }
        break;
    }
    kst_bert_grads_zero(&s->grads);
    memset(s->dhidden, 0, rows * T * C * sizeof(float));
    kst_cross_head_backward(m, &s->grads, &s->head, s->dhidden, s->dlogits, T);
    kst_bert_train_backward(m, &s->grads, &s->acts, s->dhidden);
    size_t NP = m->num_params;
    const kst_train_opts *t = &o->train;
    *gnorm = t->grad_clip > 0 ? kst_clip_grad_norm(s->grads.param_mem, NP, (float)t->grad_clip) : 0.0f;
    double lr = kst_lr_at(t->cosine ? KST_LR_COSINE : KST_LR_LINEAR, t->lr, step, t->warmup, total);
    *lr_out = lr;
    if (t->sgd) {
        kst_sgd_update(e->bert.param_mem, s->grads.param_mem, NP, lr);
    } else {
        kst_adamw_config ac = kst_adamw_defaults();
        ac.weight_decay = t->weight_decay;
        kst_adamw_update(e->bert.param_mem, s->mom, s->vel, s->grads.param_mem, s->decay, NP, step + 1, lr, &ac);
    }
    if (!isfinite(*loss))
        return kst_fail(err, KST_ERR_INVALID, "step %ld: the loss is not finite (%g); lower --lr or set --grad-clip",
                        step + 1, (double)*loss);
    return KST_OK;
}

/* Dropout from config.json: the encoder's (hidden_dropout_prob / dropout) and the classifier's
 * (classifier_dropout, else hidden_dropout_prob; DistilBERT: seq_classif_dropout). */
static void config_dropouts(const char *dir, float *body, float *head) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    cJSON *j = NULL;
    double p = 0.1, h = -1;
    if (kst_json_load(path, &j, NULL) == KST_OK) {
        kst_json_num(j, "hidden_dropout_prob", &p, path, NULL);
        kst_json_num(j, "dropout", &p, path, NULL);
        const cJSON *cd = cJSON_GetObjectItemCaseSensitive(j, "classifier_dropout");
        if (cJSON_IsNumber(cd)) h = cd->valuedouble;
        kst_json_num(j, "seq_classif_dropout", &h, path, NULL);
        cJSON_Delete(j);
    }
    *body = (float)p;
    *head = (float)(h >= 0 ? h : p);
}

static int stepper_init(stepper *s, kst_encoder *e, const kst_cross_opts *o, kst_error *err) {
    memset(s, 0, sizeof *s);
    s->e = e;
    if (e->role != KST_ROLE_CROSS)
        return kst_fail(err, KST_ERR_INVALID, "%s is a %s model, not a cross-encoder (a *ForSequenceClassification "
                        "config.json); `kestrel train margin-mse` trains dense and ColBERT students", e->dir,
                        kst_role_name(e->role));
    if (e->bert.cfg.NL != 1)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "%s: num_labels is %zu; `kestrel train cross` trains models with one "
                        "relevance logit (num_labels 1)", e->dir, e->bert.cfg.NL);
    int rc = kst_bert_grads_alloc(&s->grads, &e->bert, err);
    if (rc != KST_OK) return rc;
    size_t NP = e->bert.num_params;
    if (!o->train.sgd) {
        s->mom = kst_calloc(NP, sizeof *s->mom, "AdamW moments", err);
        s->vel = kst_calloc(NP, sizeof *s->vel, "AdamW moments", err);
        s->decay = kst_malloc(NP, 1, "decay mask", err);
        if (!s->mom || !s->vel || !s->decay) return KST_ERR_NOMEM;
        kst_decay_mask_fill(s->decay, e->bert.param_sizes, DECAY, KST_BERT_NPARAMS);
    }
    config_dropouts(e->dir, &s->dropout, &s->head_dropout);
    if (o->train.dropout >= 0) s->dropout = s->head_dropout = (float)o->train.dropout;
    s->rng = kst_rng_seed(o->train.seed);
    return KST_OK;
}

/* Runs `total` steps over src. */
static int fit_loop(stepper *st, const kst_cross_opts *o, source *src, long total, FILE *log,
                    kst_train_result *res, kst_error *err) {
    int rc = KST_OK;
    batch bt = {0};
    size_t B = o->train.batch_size ? o->train.batch_size : 32;
    kst_progress bar;
    kst_progress_begin(&bar, "train cross", (size_t)total);
    if (o->train.quiet) bar.enabled = 0;
    double t0 = kst_now(), first = 0, last = 0;
    long first_n = 0;
    size_t pairs = 0;
    for (long step = 0; step < total; step++) {
        KST_TRY(source_next(src, &bt, B, err));
        if (bt.b == 0) break;
        float loss = 0, gnorm = 0;
        double lr = 0;
        KST_TRY(step_once(st, o, &bt, step, total, &loss, &gnorm, &lr, err));
        pairs += bt.b * bt.nper;
        double el = kst_now() - t0, rate = el > 0 ? (double)pairs / el : 0.0;
        res->steps = step + 1;
        if (first_n < 10) first += loss, first_n++;
        last = step == 0 ? loss : 0.9 * last + 0.1 * loss;
        res->last_loss = loss;
        if (log)
            fprintf(log, "{\"step\": %ld, \"loss\": %.6g, \"lr\": %.6g, \"grad_norm\": %.6g, \"pairs_per_s\": %.3f}\n",
                    step + 1, (double)loss, lr, (double)gnorm, rate);
        snprintf(bar.suffix, sizeof bar.suffix, "step %ld loss %.4f lr %.2e %.1f pairs/s", step + 1, (double)loss,
                 lr, rate);
        kst_progress_add(&bar, 1);
    }
    kst_progress_end(&bar);
    res->first_loss = first_n ? first / (double)first_n : 0;
    res->seconds = kst_now() - t0;
    res->triples_per_s = res->seconds > 0 ? (double)pairs / res->seconds : 0; /* pairs/s here */
done:
    batch_free(&bt);
    return rc;
}

static long steps_for(const kst_train_opts *t, size_t n, size_t B) {
    if (t->steps > 0) return t->steps;
    return (long)((n + B - 1) / B) * (t->epochs > 0 ? t->epochs : 1);
}

int kst_cross_fit(kst_encoder *e, const kst_cross_opts *o, const kst_cross_example *ex, size_t n,
                  FILE *log, kst_train_result *res, kst_error *err) {
    memset(res, 0, sizeof *res);
    if (n == 0) return kst_fail(err, KST_ERR_INVALID, "no training examples");
    stepper st;
    source src;
    memset(&src, 0, sizeof src);
    int rc = stepper_init(&st, e, o, err);
    if (rc != KST_OK) goto done;
    src.ex = ex, src.n = n, src.triple = o->data == KST_CROSS_TRIPLES;
    src.seed = o->train.seed, src.no_shuffle = o->train.no_shuffle;
    src.order = kst_malloc(n, sizeof *src.order, "example order", err);
    if (!src.order) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    shuffle(&src);
    size_t B = o->train.batch_size ? o->train.batch_size : 32;
    rc = fit_loop(&st, o, &src, steps_for(&o->train, n, B), log, res, err);
done:
    kst_free(src.order);
    stepper_free(&st);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* kestrel train cross */

int kst_train_cross(const kst_cross_opts *o, kst_train_result *res, kst_error *err) {
    const kst_train_opts *t = &o->train;
    int rc = KST_OK;
    kst_encoder *e = NULL;
    kst_cross_example *ex = NULL;
    char *buf = NULL;
    size_t n = 0;
    kst_textmap *qmap = NULL, *cmap = NULL;
    stepper st;
    source src;
    FILE *log = NULL;
    char logpath[4096];
    memset(&st, 0, sizeof st);
    memset(&src, 0, sizeof src);
    memset(res, 0, sizeof *res);
    if (!t->model_dir || !t->out_dir || !t->teacher_path)
        return kst_fail(err, KST_ERR_INVALID, "training needs a model, an output folder and a data file");
    KST_TRY(kst_encoder_open(t->model_dir, KST_ROLE_AUTO, &e, err));
    KST_TRY(stepper_init(&st, e, o, err));
    size_t B = t->batch_size ? t->batch_size : 32;
    long total;
    if (o->data == KST_CROSS_TEACHER) {
        kst_teacher_opts *to = &src.topts;
        to->format = t->format;
        if (!to->format) to->format = t->queries_path ? KST_TEACHER_HOFSTAETTER : KST_TEACHER_MATCHMAKER;
        if (to->format == KST_TEACHER_HOFSTAETTER || to->format == KST_TEACHER_NWAY) {
            if (!t->queries_path || !t->collection_path) {
                rc = kst_fail(err, KST_ERR_INVALID, "%s: the %s format names queries and passages by id: give --queries and --collection",
                              t->teacher_path, kst_teacher_format_name(to->format));
                goto done;
            }
            KST_TRY(kst_textmap_load(t->queries_path, 1, &qmap, err));
            KST_TRY(kst_textmap_load(t->collection_path, 0, &cmap, err));
        }
        to->queries = qmap, to->collection = cmap;
        to->shuffle_buffer = t->shuffle_buffer, to->no_shuffle = t->no_shuffle, to->seed = t->seed;
        src.tpath = t->teacher_path, src.seed = t->seed;
        KST_TRY(kst_teacher_open(t->teacher_path, to, NULL, &src.tr, err));
        total = t->steps;
        if (total <= 0) { /* count the records once for the epochs */
            size_t nrec = 0;
            kst_teacher_record rec;
            for (;;) {
                KST_TRY(kst_teacher_next(src.tr, &rec, err));
                if (!rec.query) break;
                nrec++;
            }
            kst_teacher_close(src.tr);
            src.tr = NULL;
            KST_TRY(kst_teacher_open(t->teacher_path, to, NULL, &src.tr, err));
            total = steps_for(t, nrec, B);
        }
    } else {
        KST_TRY(kst_cross_examples_load(t->teacher_path, o->data == KST_CROSS_TRIPLES, &ex, &n, &buf, err));
        src.ex = ex, src.n = n, src.triple = o->data == KST_CROSS_TRIPLES;
        src.seed = t->seed, src.no_shuffle = t->no_shuffle;
        src.order = kst_malloc(n, sizeof *src.order, "example order", err);
        if (!src.order) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        shuffle(&src);
        total = steps_for(t, n, B);
    }
    KST_TRY(kst_mkdirs(t->out_dir, err));
    KST_TRY(kst_path_join(logpath, sizeof logpath, t->out_dir, "train_log.jsonl", err));
    log = fopen(logpath, "w");
    if (!log) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create", logpath);
        goto done;
    }
    KST_TRY(fit_loop(&st, o, &src, total, log, res, err));
    if (fclose(log) != 0) {
        log = NULL;
        rc = kst_fail(err, KST_ERR_IO, "%s: write failed", logpath);
        goto done;
    }
    log = NULL;
    KST_TRY(kst_checkpoint_save(e, t->out_dir, err));
done:
    if (log) fclose(log);
    stepper_free(&st);
    kst_free(src.order);
    kst_teacher_close(src.tr);
    kst_textmap_free(qmap);
    kst_textmap_free(cmap);
    kst_free(ex);
    kst_free(buf);
    kst_encoder_free(e);
    return rc;
}
