/* trainer.c - Margin-MSE distillation of dense and ColBERT students from teacher score files. */
#include "trainer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/check.h"
#include "core/file.h"
#include "core/gpu.h"
#include "core/json.h"
#include "core/mem.h"
#include "core/ops_backward.h"
#include "core/progress.h"
#include "encoders/bert_train.h"
#include "encoders/checkpoint.h"
#include "encoders/encoder.h"
#include "train/loss.h"
#include "train/eval.h"
#include "train/optim.h"
#include "train/state.h"
#include "train/trainer_gpu.h"

kst_train_opts kst_train_opts_default(void) {
    kst_train_opts o;
    memset(&o, 0, sizeof o);
    o.batch_size = 32;
    o.epochs = 1;
    o.lr = 2e-5;
    o.weight_decay = 0.01;
    o.dropout = -1;
    o.seed = 42;
    o.shuffle_buffer = 10000;
    return o;
}

/* One side of a batch (queries, or passages) in the student: ids, the training forward and the
 * head's output vectors. */
typedef struct side {
    int32_t *ids, *types;
    int *valid;     /* (rows) tokens attended to */
    int *len;       /* (rows) tokens in the sequence (ColBERT queries: query_maxlen) */
    size_t rows, T, cap_tok, cap_rows;
    kst_bert_train_acts acts;
    kst_head_acts head;
    float *dvec;    /* d loss / d head output */
    float *dhidden; /* (rows, T, C) */
    size_t cap_dvec, cap_dh;
} side;

static void side_free(side *s) {
    kst_free(s->ids);
    kst_free(s->types);
    kst_free(s->valid);
    kst_free(s->len);
    kst_free(s->dvec);
    kst_free(s->dhidden);
    kst_bert_train_acts_free(&s->acts);
    kst_head_acts_free(&s->head);
}

/* Tokenizes `rows` texts into a padded batch. */
static int side_tokenize(kst_encoder *e, side *s, const char *const *texts, const size_t *lens,
                         size_t rows, int is_query, size_t max_len, kst_error *err) {
    int rc = KST_OK;
    kst_ids *v = kst_calloc(rows, sizeof *v, "token ids", err);
    if (!v) return KST_ERR_NOMEM;
    size_t T = 1;
    for (size_t r = 0; r < rows; r++) {
        KST_TRY(kst_encoder_tokenize(e, texts[r], lens[r], NULL, 0, is_query, max_len, &v[r], err));
        if (v[r].len > T) T = v[r].len;
    }
    if (rows > s->cap_rows) {
        KST_TRY(kst_realloc((void **)&s->valid, rows, sizeof *s->valid, "batch", err));
        KST_TRY(kst_realloc((void **)&s->len, rows, sizeof *s->len, "batch", err));
        s->cap_rows = rows;
    }
    if (rows * T > s->cap_tok) {
        KST_TRY(kst_realloc((void **)&s->ids, rows * T, sizeof *s->ids, "batch", err));
        KST_TRY(kst_realloc((void **)&s->types, rows * T, sizeof *s->types, "batch", err));
        s->cap_tok = rows * T;
    }
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t r = 0; r < rows; r++) {
        size_t n = v[r].len, attended = n;
        /* ColBERT queries: [MASK] padding is encoded but not attended to (attend_to_mask_tokens). */
        if (e->role == KST_ROLE_COLBERT && is_query && !e->attend_to_mask)
            while (attended > 0 && v[r].ids[attended - 1] == sp.mask) attended--;
        s->valid[r] = (int)attended;
        s->len[r] = (int)n;
        for (size_t t = 0; t < T; t++) {
            s->ids[r * T + t] = t < n ? v[r].ids[t] : (sp.pad >= 0 ? sp.pad : 0);
            s->types[r * T + t] = 0;
        }
    }
    s->rows = rows;
    s->T = T;
done:
    for (size_t r = 0; r < rows; r++) kst_ids_free(&v[r]);
    kst_free(v);
    return rc;
}

static int side_forward(kst_encoder *e, side *s, float dropout, uint64_t *rng, kst_error *err) {
    const kst_bert *m = &e->bert;
    int rc = kst_bert_train_forward(m, &s->acts, s->ids, s->types, s->valid, s->rows, s->T, dropout, rng, err);
    if (rc != KST_OK) return rc;
    const float *h = kst_bert_train_hidden(m, &s->acts);
    if (e->role == KST_ROLE_COLBERT) return kst_colbert_head_forward(m, &s->head, h, s->rows, s->T, err);
    return kst_dense_head_forward(m, &s->head, h, s->valid, e->pool_modes, e->normalize, s->rows, s->T, err);
}

/* Rows of head output for sequence r: dense 1 vector, ColBERT T (one per position). */
static size_t side_vecs(const kst_encoder *e, const side *s) {
    return e->role == KST_ROLE_COLBERT ? s->rows * s->T : s->rows;
}

static int side_prepare_grad(kst_encoder *e, side *s, kst_error *err) {
    size_t nv = side_vecs(e, s) * e->dim, nh = s->rows * s->T * e->bert.cfg.C;
    if (nv > s->cap_dvec) {
        int rc = kst_realloc((void **)&s->dvec, nv, sizeof(float), "gradients", err);
        if (rc != KST_OK) return rc;
        s->cap_dvec = nv;
    }
    if (nh > s->cap_dh) {
        int rc = kst_realloc((void **)&s->dhidden, nh, sizeof(float), "gradients", err);
        if (rc != KST_OK) return rc;
        s->cap_dh = nh;
    }
    memset(s->dvec, 0, nv * sizeof(float));
    memset(s->dhidden, 0, nh * sizeof(float));
    return KST_OK;
}

static void side_backward(kst_encoder *e, kst_bert *grads, side *s) {
    const kst_bert *m = &e->bert;
    const float *h = kst_bert_train_hidden(m, &s->acts);
    if (e->role == KST_ROLE_COLBERT)
        kst_colbert_head_backward(m, grads, &s->head, s->dhidden, s->dvec, h, s->rows, s->T);
    else
        kst_dense_head_backward(m, grads, &s->head, s->dhidden, s->dvec, h, s->valid, e->pool_modes,
                                e->normalize, s->rows, s->T);
    kst_bert_train_backward(m, grads, &s->acts, s->dhidden);
}

/* ------------------------------------------------------------------------------------------ */
/* scores: dense dot products or ColBERT MaxSim, forward and backward */

typedef struct scorer {
    kst_encoder *e;
    unsigned char *keep; /* (T) document tokens entering MaxSim */
    int *argmax;         /* (query_maxlen) */
    size_t cap_keep, cap_arg;
    unsigned char *keep_all; /* (rows, T) every passage's mask, for the GPU step */
    size_t cap_keep_all;
} scorer;

/* ColBERT's document mask: not padding, not punctuation; within the sequence. */
static int doc_keep(scorer *sc, const side *p, size_t r, kst_error *err) {
    kst_encoder *e = sc->e;
    if (p->T > sc->cap_keep) {
        int rc = kst_realloc((void **)&sc->keep, p->T, 1, "MaxSim mask", err);
        if (rc != KST_OK) return rc;
        sc->cap_keep = p->T;
    }
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t t = 0; t < p->T; t++) {
        int32_t id = p->ids[r * p->T + t];
        sc->keep[t] = (int)t < p->len[r] && id != sp.pad && !e->skip[id];
    }
    return KST_OK;
}

/* doc_keep for every row of p into sc->keep_all (the GPU step's MaxSim mask). */
static int doc_keep_all(scorer *sc, const side *p, kst_error *err) {
    size_t need = p->rows * p->T;
    if (need > sc->cap_keep_all) {
        int rc = kst_realloc((void **)&sc->keep_all, need, 1, "MaxSim mask", err);
        if (rc != KST_OK) return rc;
        sc->cap_keep_all = need;
    }
    for (size_t r = 0; r < p->rows; r++) {
        int rc = doc_keep(sc, p, r, err);
        if (rc != KST_OK) return rc;
        memcpy(sc->keep_all + r * p->T, sc->keep, p->T);
    }
    return KST_OK;
}

static int score_pair(scorer *sc, const side *q, size_t qr, const side *p, size_t pr, float *out,
                      kst_error *err) {
    kst_encoder *e = sc->e;
    size_t D = e->dim;
    if (e->role != KST_ROLE_COLBERT) {
        const float *a = q->head.out + qr * D, *b = p->head.out + pr * D;
        double s = 0;
        for (size_t k = 0; k < D; k++) s += (double)a[k] * b[k];
        *out = (float)s;
        return KST_OK;
    }
    int rc = doc_keep(sc, p, pr, err);
    if (rc != KST_OK) return rc;
    if ((size_t)q->len[qr] > sc->cap_arg) {
        rc = kst_realloc((void **)&sc->argmax, (size_t)q->len[qr], sizeof(int), "MaxSim", err);
        if (rc != KST_OK) return rc;
        sc->cap_arg = (size_t)q->len[qr];
    }
    *out = kst_maxsim_forward(sc->argmax, q->head.out + qr * q->T * D, p->head.out + pr * p->T * D, sc->keep,
                              (size_t)q->len[qr], p->T, D);
    return KST_OK;
}

/* Adds dscore * d score / d vectors into q->dvec and p->dvec. */
static int score_pair_backward(scorer *sc, side *q, size_t qr, side *p, size_t pr, float dscore,
                               kst_error *err) {
    kst_encoder *e = sc->e;
    size_t D = e->dim;
    if (e->role != KST_ROLE_COLBERT) {
        const float *a = q->head.out + qr * D, *b = p->head.out + pr * D;
        float *da = q->dvec + qr * D, *db = p->dvec + pr * D;
        for (size_t k = 0; k < D; k++) {
            da[k] += dscore * b[k];
            db[k] += dscore * a[k];
        }
        return KST_OK;
    }
    float dummy;
    int rc = score_pair(sc, q, qr, p, pr, &dummy, err); /* refreshes argmax and keep */
    if (rc != KST_OK) return rc;
    kst_maxsim_backward(q->dvec + qr * q->T * D, p->dvec + pr * p->T * D, dscore, sc->argmax,
                        q->head.out + qr * q->T * D, p->head.out + pr * p->T * D, (size_t)q->len[qr], D);
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* resumable state */

#define STATE_FILE "train_state.bin"
#define STATE_JSON_VERSION 1

/* What the loop carries from step to step besides the weights and moments. */
typedef struct run_pos {
    long step, total, epoch;
    uint64_t rng;        /* dropout RNG */
    double loss_first;   /* sum over the first (up to 10) steps */
    long first_n;
    double loss_last;
    long log_bytes;      /* train_log.jsonl length at this step */
} run_pos;

/* The options that shape the trajectory, spelled as their flags (without "--"): a resumed run must
 * repeat them. */
static cJSON *options_json(const kst_train_opts *o, kst_teacher_format fmt, long total, float dropout) {
    cJSON *j = cJSON_CreateObject();
    char seed[32];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)o->seed);
    cJSON_AddStringToObject(j, "model", o->model_dir);
    cJSON_AddStringToObject(j, "teacher-scores", o->teacher_path);
    if (o->queries_path) cJSON_AddStringToObject(j, "queries", o->queries_path);
    else cJSON_AddNullToObject(j, "queries");
    if (o->collection_path) cJSON_AddStringToObject(j, "collection", o->collection_path);
    else cJSON_AddNullToObject(j, "collection");
    cJSON_AddStringToObject(j, "format", kst_teacher_format_name(fmt));
    cJSON_AddNumberToObject(j, "batch-size", (double)o->batch_size);
    cJSON_AddNumberToObject(j, "steps", (double)total);
    cJSON_AddNumberToObject(j, "lr", o->lr);
    cJSON_AddStringToObject(j, "optimizer", o->sgd ? "sgd" : "adamw");
    cJSON_AddNumberToObject(j, "weight-decay", o->weight_decay);
    cJSON_AddNumberToObject(j, "warmup", (double)o->warmup);
    cJSON_AddStringToObject(j, "schedule", o->cosine ? "cosine" : "linear");
    cJSON_AddNumberToObject(j, "grad-clip", o->grad_clip);
    cJSON_AddNumberToObject(j, "dropout", (double)dropout);
    cJSON_AddStringToObject(j, "seed", seed);
    cJSON_AddBoolToObject(j, "no-shuffle", o->no_shuffle);
    cJSON_AddNumberToObject(j, "shuffle-buffer", (double)o->shuffle_buffer);
    cJSON_AddNumberToObject(j, "query-max-len", (double)o->query_max_len);
    cJSON_AddNumberToObject(j, "doc-max-len", (double)o->doc_max_len);
    cJSON_AddNumberToObject(j, "in-batch-weight", o->in_batch_weight);
    return j;
}

static int save_state(const char *out_dir, const run_pos *ps, const cJSON *options, const kst_teacher *tr,
                      const kst_encoder *e, const float *mom, const float *vel, kst_error *err) {
    int rc = KST_OK;
    char path[4096], hex[20], *tstate = NULL, *text = NULL;
    cJSON *j = cJSON_CreateObject(), *t = NULL;
    KST_TRY(kst_path_join(path, sizeof path, out_dir, STATE_FILE, err));
    KST_TRY(kst_teacher_state(tr, &tstate, err));
    if (!(t = cJSON_Parse(tstate))) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "teacher reader state is not JSON");
        goto done;
    }
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)ps->rng);
    cJSON_AddNumberToObject(j, "version", STATE_JSON_VERSION);
    cJSON_AddNumberToObject(j, "step", (double)ps->step);
    cJSON_AddNumberToObject(j, "total", (double)ps->total);
    cJSON_AddNumberToObject(j, "epoch", (double)ps->epoch);
    cJSON_AddStringToObject(j, "dropout_rng", hex);
    cJSON_AddNumberToObject(j, "loss_first_sum", ps->loss_first);
    cJSON_AddNumberToObject(j, "loss_first_n", (double)ps->first_n);
    cJSON_AddNumberToObject(j, "loss_last", ps->loss_last);
    cJSON_AddNumberToObject(j, "log_bytes", (double)ps->log_bytes);
    cJSON_AddItemReferenceToObject(j, "options", (cJSON *)options);
    cJSON_AddItemToObject(j, "teacher", t);
    t = NULL;
    if (!(text = cJSON_Print(j))) {
        rc = kst_fail(err, KST_ERR_NOMEM, "out of memory writing the training state");
        goto done;
    }
    const float *blocks[3] = {e->bert.param_mem, mom, vel};
    KST_TRY(kst_train_state_write(path, text, blocks, 3, e->bert.num_params, err));
done:
    cJSON_Delete(j);
    cJSON_Delete(t);
    kst_free(tstate);
    if (text) cJSON_free(text);
    return rc;
}

static int state_long(const cJSON *j, const char *key, long *out, const char *path, kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 0)
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" missing or not a non-negative number", path, key);
    *out = (long)v->valuedouble;
    return KST_OK;
}

static int state_double(const cJSON *j, const char *key, double *out, const char *path, kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    if (!cJSON_IsNumber(v)) return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" missing or not a number", path, key);
    *out = v->valuedouble;
    return KST_OK;
}

/* Reads RESUME_DIR/train_state.bin: weights into e, moments into mom/vel, the position into *ps,
 * the teacher reader state into *tstate (kst_free). Checks the saved options against `options`. */
static int load_state(const char *dir, const cJSON *options, kst_encoder *e, float *mom, float *vel,
                      run_pos *ps, char **tstate, kst_error *err) {
    int rc = KST_OK;
    char path[4096], *text = NULL, *a = NULL, *b = NULL;
    cJSON *j = NULL;
    *tstate = NULL;
    KST_TRY(kst_path_join(path, sizeof path, dir, STATE_FILE, err));
    float *blocks[3] = {e->bert.param_mem, mom, vel};
    rc = kst_train_state_read(path, &text, blocks, 3, e->bert.num_params, err);
    if (rc == KST_ERR_NOTFOUND) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no training state to resume (runs with --save-every N write one)", path);
        goto done;
    }
    if (rc != KST_OK) goto done;
    KST_TRY(kst_json_parse(text, strlen(text), path, &j, err));
    long version = 0;
    KST_TRY(state_long(j, "version", &version, path, err));
    if (version != STATE_JSON_VERSION) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: state version %ld (this build reads %d)", path, version, STATE_JSON_VERSION);
        goto done;
    }
    const cJSON *saved = cJSON_GetObjectItemCaseSensitive(j, "options");
    if (!cJSON_IsObject(saved)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"options\" missing", path);
        goto done;
    }
    for (const cJSON *want = options->child; want; want = want->next) {
        const cJSON *got = cJSON_GetObjectItemCaseSensitive(saved, want->string);
        if (got && cJSON_Compare(got, want, 1)) continue;
        a = cJSON_PrintUnformatted(want);
        b = got ? cJSON_PrintUnformatted(got) : NULL;
        rc = kst_fail(err, KST_ERR_INVALID,
                      "--%s is %s here but %s in the run saved in %s: resume with the same options (or train into a new --out)",
                      want->string, a ? a : "?", b ? b : "(missing)", path);
        goto done;
    }
    KST_TRY(state_long(j, "step", &ps->step, path, err));
    KST_TRY(state_long(j, "total", &ps->total, path, err));
    KST_TRY(state_long(j, "epoch", &ps->epoch, path, err));
    KST_TRY(state_long(j, "loss_first_n", &ps->first_n, path, err));
    KST_TRY(state_long(j, "log_bytes", &ps->log_bytes, path, err));
    KST_TRY(state_double(j, "loss_first_sum", &ps->loss_first, path, err));
    KST_TRY(state_double(j, "loss_last", &ps->loss_last, path, err));
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(j, "dropout_rng");
    char *end = NULL;
    if (!cJSON_IsString(r) || strlen(r->valuestring) != 16 ||
        (ps->rng = strtoull(r->valuestring, &end, 16), *end)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"dropout_rng\" must be 16 hex digits", path);
        goto done;
    }
    if (ps->step > ps->total) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: step %ld beyond the run's %ld", path, ps->step, ps->total);
        goto done;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "teacher");
    if (!cJSON_IsObject(t) || !(*tstate = cJSON_PrintUnformatted(t))) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"teacher\" reader state missing", path);
        goto done;
    }
done:
    if (a) cJSON_free(a);
    if (b) cJSON_free(b);
    cJSON_Delete(j);
    kst_free(text);
    return rc;
}

/* The saved run's log up to its state: *out (kst_free) holds the first `bytes` bytes of
 * DIR/train_log.jsonl (empty when the log is gone). */
static int log_prefix(const char *dir, long bytes, char **out, size_t *len, kst_error *err) {
    char path[4096];
    int rc = kst_path_join(path, sizeof path, dir, "train_log.jsonl", err);
    if (rc != KST_OK) return rc;
    *out = NULL;
    *len = 0;
    if (!kst_path_exists(path)) return KST_OK;
    size_t n = 0;
    KST_TRY(kst_read_file(path, out, &n, err));
    if ((long)n < bytes) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: %zu bytes, shorter than the %ld the training state recorded", path, n, bytes);
        goto done;
    }
    *len = (size_t)bytes;
done:
    if (rc != KST_OK) {
        kst_free(*out);
        *out = NULL;
    }
    return rc;
}

/* 1 when a and b name the same existing folder. */
static int same_dir(const char *a, const char *b) {
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

/* ------------------------------------------------------------------------------------------ */
/* the loop */

/* Which parameter tensors get weight decay: matrices and embeddings, not biases or LayerNorms. */
static const int DECAY[KST_BERT_NPARAMS] = {1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1,
                                            0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0};

static double config_dropout(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    cJSON *j = NULL;
    double p = 0.1;
    if (kst_json_load(path, &j, NULL) == KST_OK) {
        kst_json_num(j, "hidden_dropout_prob", &p, path, NULL);
        kst_json_num(j, "dropout", &p, path, NULL);
        cJSON_Delete(j);
    }
    return p;
}

/* One evaluation: a log line, a line on stderr, and the result's figures. */
static int evaluate(const kst_train_opts *o, kst_train_eval *ev, kst_encoder *e, long step, FILE *log,
                    int over_bar, kst_train_result *res, const char *logpath, kst_error *err) {
    kst_train_eval_result r;
    int rc = kst_train_eval_run(ev, e, o->query_max_len, o->doc_max_len, &r, err);
    if (rc != KST_OK) return rc;
    if (fprintf(log, "{\"step\": %ld, \"eval_ndcg@10\": %.6f, \"eval_mrr@10\": %.6f, \"eval_queries\": %zu, \"eval_docs\": %zu}\n",
                step, r.ndcg10, r.mrr10, r.queries, r.docs) < 0)
        return kst_fail(err, KST_ERR_IO, "%s: write failed", logpath);
    if (!o->quiet)
        fprintf(stderr, "%skestrel train: eval at step %ld: nDCG@10 %.4f  MRR@10 %.4f  (%zu queries, %zu documents)%s\n",
                over_bar ? "\r" : "", step, r.ndcg10, r.mrr10, r.queries, r.docs, over_bar ? "\033[K" : "");
    if (!res->evaluated) {
        res->evaluated = 1;
        res->eval_first_ndcg10 = r.ndcg10;
        res->eval_first_mrr10 = r.mrr10;
    }
    res->eval_last_ndcg10 = r.ndcg10;
    res->eval_last_mrr10 = r.mrr10;
    return KST_OK;
}

/* Reads the whole teacher file once: every line checked (errors name the line), records counted. */
static int teacher_precheck(const kst_train_opts *o, const kst_teacher_opts *to, size_t *nrec, kst_error *err) {
    int rc = KST_OK;
    kst_teacher *tr = NULL;
    kst_teacher_opts plain = *to;
    plain.no_shuffle = 1;
    *nrec = 0;
    KST_TRY(kst_teacher_open(o->teacher_path, &plain, NULL, &tr, err));
    for (;;) {
        kst_teacher_record rec;
        KST_TRY(kst_teacher_next(tr, &rec, err));
        if (!rec.query) break;
        (*nrec)++;
    }
done:
    kst_teacher_close(tr);
    return rc;
}

/* The host side of a batch: the records' texts (copied: a record's pointers die at the next
 * call) and teacher scores, and the CPU path's score buffers, sized at the first record (n
 * passages each). */
typedef struct batch_buf {
    size_t B, n;
    const char **qtexts, **ptexts;
    size_t *qlens, *plens;
    float *s, *t, *ds, *S, *dS;
} batch_buf;

static void batch_buf_free(batch_buf *bb) {
    kst_free(bb->qtexts), kst_free(bb->qlens), kst_free(bb->ptexts), kst_free(bb->plens);
    kst_free(bb->s), kst_free(bb->t), kst_free(bb->ds), kst_free(bb->S), kst_free(bb->dS);
    memset(bb, 0, sizeof *bb);
}

/* Gathers up to bb->B records (reopening the teacher file for the next epoch when it runs out,
 * unless the run is one pass) and tokenizes them into q and p, their teacher scores into bb->t;
 * *got = 0 at the end of the data. */
static int read_batch(const kst_train_opts *o, kst_encoder *e, kst_teacher **tr, kst_teacher_opts *to,
                      run_pos *ps, batch_buf *bb, side *q, side *p, size_t *got_out, kst_error *err) {
    int rc = KST_OK;
    size_t B = bb->B, got = 0;
    kst_teacher_record rec;
    *got_out = 0;
    while (got < B) {
        KST_TRY(kst_teacher_next(*tr, &rec, err));
        if (!rec.query) {
            if (got > 0 || o->steps <= 0) break;
            kst_teacher_close(*tr);
            *tr = NULL;
            to->seed = o->seed + (uint64_t)(++ps->epoch);
            KST_TRY(kst_teacher_open(o->teacher_path, to, NULL, tr, err));
            continue;
        }
        if (bb->n == 0) {
            size_t n = rec.n;
            bb->n = n;
            bb->qtexts = kst_calloc(B, sizeof *bb->qtexts, "batch", err);
            bb->qlens = kst_malloc(B, sizeof *bb->qlens, "batch", err);
            bb->ptexts = kst_calloc(B * n, sizeof *bb->ptexts, "batch", err);
            bb->plens = kst_malloc(B * n, sizeof *bb->plens, "batch", err);
            bb->s = kst_malloc(B * n, sizeof *bb->s, "scores", err);
            bb->t = kst_malloc(B * n, sizeof *bb->t, "scores", err);
            bb->ds = kst_malloc(B * n, sizeof *bb->ds, "scores", err);
            bb->S = kst_malloc(B * B * n, sizeof *bb->S, "scores", err);
            bb->dS = kst_malloc(B * B * n, sizeof *bb->dS, "scores", err);
            if (!bb->qtexts || !bb->qlens || !bb->ptexts || !bb->plens || !bb->s || !bb->t || !bb->ds || !bb->S || !bb->dS) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
        } else if (rec.n != bb->n) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s line %zu: %zu passages, but earlier records have %zu",
                          o->teacher_path, rec.line, rec.n, bb->n);
            goto done;
        }
        size_t n = bb->n;
        bb->qtexts[got] = kst_strndup(rec.query, rec.query_len, err);
        bb->qlens[got] = rec.query_len;
        for (size_t i = 0; i < n; i++) {
            bb->ptexts[got * n + i] = kst_strndup(rec.passages[i], rec.passage_lens[i], err);
            bb->plens[got * n + i] = rec.passage_lens[i];
            bb->t[got * n + i] = rec.scores[i];
        }
        got++;
    }
    if (got > 0) {
        rc = side_tokenize(e, q, bb->qtexts, bb->qlens, got, 1, o->query_max_len, err);
        if (rc == KST_OK) rc = side_tokenize(e, p, bb->ptexts, bb->plens, got * bb->n, 0, o->doc_max_len, err);
        if (rc == KST_OK) *got_out = got;
    }
done:
    for (size_t i = 0; i < got; i++) {
        kst_free((void *)bb->qtexts[i]);
        bb->qtexts[i] = NULL;
        for (size_t k = 0; k < bb->n; k++) {
            kst_free((void *)bb->ptexts[i * bb->n + k]);
            bb->ptexts[i * bb->n + k] = NULL;
        }
    }
    return rc;
}

int kst_train_margin_mse(const kst_train_opts *o, kst_train_result *res, kst_error *err) {
    int rc = KST_OK;
    kst_encoder *e = NULL;
    kst_bert grads = {0};
    float *mom = NULL, *vel = NULL, *s = NULL, *t = NULL, *ds = NULL, *S = NULL, *dS = NULL;
    unsigned char *decay = NULL;
    kst_textmap *qmap = NULL, *cmap = NULL;
    kst_teacher *tr = NULL;
    side q = {0}, p = {0};
    kst_gpu_trainer *gt = NULL; /* --device cuda */
    scorer sc = {0};
    FILE *log = NULL;
    batch_buf bb;
    memset(&bb, 0, sizeof bb);
    char logpath[4096], statepath[4096];
    char *tstate = NULL, *logtext = NULL;
    size_t loglen = 0;
    cJSON *options = NULL;
    kst_train_eval *ev = NULL;
    run_pos ps;
    memset(&ps, 0, sizeof ps);
    memset(res, 0, sizeof *res);
    if (!o->model_dir || !o->out_dir || !o->teacher_path)
        return kst_fail(err, KST_ERR_INVALID, "training needs a model, an output folder and a teacher file");
    size_t B = o->batch_size ? o->batch_size : 32;
    bb.B = B;
    KST_TRY(kst_path_join(statepath, sizeof statepath, o->out_dir, STATE_FILE, err));
    if (kst_path_exists(statepath) && !(o->resume_dir && same_dir(o->resume_dir, o->out_dir))) {
        rc = kst_fail(err, KST_ERR_INVALID,
                      "%s already holds a training state (%s): pass --resume %s to continue that run, or choose another --out",
                      o->out_dir, STATE_FILE, o->out_dir);
        goto done;
    }
    KST_TRY(kst_encoder_open(o->model_dir, KST_ROLE_AUTO, &e, err));
    if (e->role == KST_ROLE_CROSS) {
        rc = kst_fail(err, KST_ERR_INVALID, "%s is a cross-encoder; `kestrel train margin-mse` trains dense or ColBERT students (cross-encoders: `kestrel train cross`)", o->model_dir);
        goto done;
    }
    sc.e = e;
    KST_TRY(kst_bert_grads_alloc(&grads, &e->bert, err));
    size_t NP = e->bert.num_params;
    mom = kst_calloc(NP, sizeof *mom, "AdamW moments", err);
    vel = kst_calloc(NP, sizeof *vel, "AdamW moments", err);
    decay = kst_malloc(NP, 1, "decay mask", err);
    if (!mom || !vel || !decay) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    kst_decay_mask_fill(decay, e->bert.param_sizes, DECAY, KST_BERT_NPARAMS);
    if (o->device == KST_DEV_CUDA) {
        rc = kst_gpu_trainer_create(&e->bert, e->pool_modes, e->normalize, decay, &gt, err);
        if (rc == KST_ERR_UNSUPPORTED && err && !strstr(err->msg, "--device cpu")) {
            size_t at = strlen(err->msg);
            snprintf(err->msg + at, sizeof err->msg - at, "; train on the CPU with --device cpu");
        }
        if (rc != KST_OK) goto done;
        kst_gpu_trainer_set_in_batch(gt, (float)o->in_batch_weight);
    }
    /* teacher file */
    kst_teacher_opts to;
    memset(&to, 0, sizeof to);
    to.format = o->format;
    if (!to.format) to.format = o->queries_path ? KST_TEACHER_HOFSTAETTER : KST_TEACHER_MATCHMAKER;
    if (to.format == KST_TEACHER_HOFSTAETTER || to.format == KST_TEACHER_NWAY) {
        if (!o->queries_path || !o->collection_path) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s: the %s format names queries and passages by id: give --queries and --collection",
                          o->teacher_path, kst_teacher_format_name(to.format));
            goto done;
        }
        KST_TRY(kst_textmap_load(o->queries_path, 1, &qmap, err));
        KST_TRY(kst_textmap_load(o->collection_path, 0, &cmap, err));
    }
    to.queries = qmap;
    to.collection = cmap;
    to.shuffle_buffer = o->shuffle_buffer;
    to.no_shuffle = o->no_shuffle;
    to.seed = o->seed;
    /* every line checked before anything is written; the count gives the epochs' steps */
    size_t nrec = 0;
    KST_TRY(teacher_precheck(o, &to, &nrec, err));
    long total = o->steps;
    if (total <= 0) total = (long)((nrec + B - 1) / B) * (o->epochs > 0 ? o->epochs : 1);
    if (o->eval_queries || o->eval_qrels) {
        const char *corpus = o->eval_collection ? o->eval_collection : o->collection_path;
        if (!o->eval_queries || !o->eval_qrels || !corpus) {
            rc = kst_fail(err, KST_ERR_INVALID, "evaluation needs --eval-queries, --eval-qrels and a corpus (--eval-collection, or --collection)");
            goto done;
        }
        KST_TRY(kst_train_eval_open(o->eval_queries, o->eval_qrels, corpus, &ev, err));
    }
    float dropout = (float)(o->dropout >= 0 ? o->dropout : config_dropout(o->model_dir));
    options = options_json(o, to.format, total, dropout);
    if (!options) {
        rc = kst_fail(err, KST_ERR_NOMEM, "out of memory");
        goto done;
    }
    ps.total = total;
    ps.rng = kst_rng_seed(o->seed);
    if (o->resume_dir) {
        KST_TRY(load_state(o->resume_dir, options, e, mom, vel, &ps, &tstate, err));
        KST_TRY(log_prefix(o->resume_dir, ps.log_bytes, &logtext, &loglen, err));
        to.seed = o->seed + (uint64_t)ps.epoch;
    }
    if (gt) KST_TRY(kst_gpu_trainer_set_state(gt, e->bert.param_mem, mom, vel, err));
    KST_TRY(kst_teacher_open(o->teacher_path, &to, tstate, &tr, err));
    kst_adamw_config ac = kst_adamw_defaults();
    ac.weight_decay = o->weight_decay;
    KST_TRY(kst_mkdirs(o->out_dir, err));
    KST_TRY(kst_path_join(logpath, sizeof logpath, o->out_dir, "train_log.jsonl", err));
    log = fopen(logpath, "w");
    if (!log || (loglen && fwrite(logtext, 1, loglen, log) != loglen)) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create", logpath);
        goto done;
    }
    kst_progress bar;
    kst_progress_begin(&bar, "train", (size_t)total);
    if (o->quiet) bar.enabled = 0;
    if (ps.step > 0) kst_progress_add(&bar, (size_t)ps.step);
    if (ev && ps.step == 0) {
        KST_TRY(evaluate(o, ev, e, 0, log, bar.enabled, res, logpath, err));
    }
    double t_start = kst_now();
    long start_step = ps.step;
    size_t n = 0;
    res->steps = ps.step;
    /* --device cuda: the next batch is read and tokenized while the GPU runs the step (its size,
     * or -1: none ahead); KESTREL_GPU_TRAIN_OVERLAP=0 reads each batch after the step's wait */
    long ahead = -1;
    const char *ov = getenv("KESTREL_GPU_TRAIN_OVERLAP");
    int overlap = !(ov && !strcmp(ov, "0"));
    for (long step = ps.step; step < total; step++) {
        size_t b;
        if (ahead >= 0) {
            b = (size_t)ahead;
            ahead = -1;
        } else {
            KST_TRY(read_batch(o, e, &tr, &to, &ps, &bb, &q, &p, &b, err));
        }
        if (b == 0) break;
        n = bb.n, s = bb.s, t = bb.t, ds = bb.ds, S = bb.S, dS = bb.dS;
        float loss = 0, gnorm = 0;
        double lr = kst_lr_at(o->cosine ? KST_LR_COSINE : KST_LR_LINEAR, o->lr, step, o->warmup, total);
        if (gt) { /* the same step on the GPU (train/trainer_gpu.h) */
            kst_gpu_batch gq = {q.ids, q.types, q.valid, q.rows, q.T, NULL, NULL};
            kst_gpu_batch gp = {p.ids, p.types, p.valid, p.rows, p.T, NULL, NULL};
            if (e->role == KST_ROLE_COLBERT) { /* MaxSim's query lengths and passage masks */
                KST_TRY(doc_keep_all(&sc, &p, err));
                gq.len = q.len, gp.len = p.len, gp.keep = sc.keep_all;
            }
            uint64_t seed_q = ps.rng = kst_rng_seed(ps.rng), seed_p = ps.rng = kst_rng_seed(ps.rng);
            KST_TRY(kst_gpu_trainer_forward_backward(gt, &gq, &gp, t, n, dropout, seed_q, seed_p, err));
            KST_TRY(kst_gpu_trainer_update_enqueue(gt, o->sgd, lr, step + 1, &ac, o->grad_clip, err));
            /* q, p and t are free again (staged): read the next batch meanwhile, unless this step
             * ends the run or saves the state (which records the teacher file's position) */
            long next = step + 1;
            int saves = (o->save_every > 0 && (next % o->save_every == 0 || next == total)) ||
                        (o->stop_after > 0 && next >= o->stop_after && next < total);
            if (overlap && next < total && !saves) {
                size_t nb = 0;
                KST_TRY(read_batch(o, e, &tr, &to, &ps, &bb, &q, &p, &nb, err));
                ahead = (long)nb;
            }
            KST_TRY(kst_gpu_trainer_wait(gt, &loss, &gnorm, err));
        } else {
            KST_TRY(side_forward(e, &q, dropout, &ps.rng, err));
            KST_TRY(side_forward(e, &p, dropout, &ps.rng, err));
            for (size_t i = 0; i < b; i++)
                for (size_t k = 0; k < n; k++) KST_TRY(score_pair(&sc, &q, i, &p, i * n + k, &s[i * n + k], err));
            loss = kst_margin_mse_forward(s, t, b, n);
            memset(ds, 0, b * n * sizeof *ds);
            kst_margin_mse_backward(ds, s, t, b, n, 1.0f);
            KST_TRY(side_prepare_grad(e, &q, err));
            KST_TRY(side_prepare_grad(e, &p, err));
            for (size_t i = 0; i < b; i++)
                for (size_t k = 0; k < n; k++)
                    KST_TRY(score_pair_backward(&sc, &q, i, &p, i * n + k, ds[i * n + k], err));
            if (o->in_batch_weight > 0 && b > 1) {
                for (size_t i = 0; i < b; i++)
                    for (size_t j = 0; j < b * n; j++) KST_TRY(score_pair(&sc, &q, i, &p, j, &S[i * b * n + j], err));
                loss += kst_inbatch_ce_forward(S, b, n, 0, (float)o->in_batch_weight);
                memset(dS, 0, b * b * n * sizeof *dS);
                kst_inbatch_ce_backward(dS, S, b, n, 0, (float)o->in_batch_weight, 1.0f);
                for (size_t i = 0; i < b; i++)
                    for (size_t j = 0; j < b * n; j++)
                        if (dS[i * b * n + j] != 0.0f) KST_TRY(score_pair_backward(&sc, &q, i, &p, j, dS[i * b * n + j], err));
            }
            kst_bert_grads_zero(&grads);
            side_backward(e, &grads, &q);
            side_backward(e, &grads, &p);
            gnorm = o->grad_clip > 0 ? kst_clip_grad_norm(grads.param_mem, NP, (float)o->grad_clip) : 0.0f;
            if (o->sgd) kst_sgd_update(e->bert.param_mem, grads.param_mem, NP, lr);
            else kst_adamw_update(e->bert.param_mem, mom, vel, grads.param_mem, decay, NP, step + 1, lr, &ac);
        }
        if (!isfinite(loss)) {
            rc = kst_fail(err, KST_ERR_INVALID, "step %ld: the loss is not finite (%g); lower --lr or set --grad-clip", step + 1, (double)loss);
            goto done;
        }
        double el = kst_now() - t_start;
        double tps = el > 0 ? (double)((step + 1 - start_step) * (long)B) / el : 0.0;
        ps.step = step + 1;
        res->steps = ps.step;
        if (ps.first_n < 10) {
            ps.loss_first += loss;
            ps.first_n++;
        }
        ps.loss_last = ps.loss_last == 0 ? loss : 0.9 * ps.loss_last + 0.1 * loss;
        fprintf(log, "{\"step\": %ld, \"loss\": %.6g, \"lr\": %.6g, \"grad_norm\": %.6g, \"triples_per_s\": %.3f}\n",
                step + 1, (double)loss, lr, (double)gnorm, tps);
        snprintf(bar.suffix, sizeof bar.suffix, "step %ld loss %.4f lr %.2e %.1f triples/s", step + 1,
                 (double)loss, lr, tps);
        kst_progress_add(&bar, 1);
        res->last_loss = loss;
        int stop = o->stop_after > 0 && ps.step >= o->stop_after && ps.step < total;
        if (ev && ((o->eval_every > 0 && ps.step % o->eval_every == 0) || ps.step == total || stop)) {
            double te = kst_now();
            if (gt) KST_TRY(kst_gpu_trainer_get_state(gt, e->bert.param_mem, NULL, NULL, err));
            KST_TRY(evaluate(o, ev, e, ps.step, log, bar.enabled, res, logpath, err));
            t_start += kst_now() - te; /* triples/s counts training only */
        }
        if ((o->save_every > 0 && (ps.step % o->save_every == 0 || ps.step == total)) || stop) {
            if (fflush(log) != 0) {
                rc = kst_fail(err, KST_ERR_IO, "%s: write failed", logpath);
                goto done;
            }
            ps.log_bytes = ftell(log);
            if (gt) KST_TRY(kst_gpu_trainer_get_state(gt, e->bert.param_mem, mom, vel, err));
            KST_TRY(save_state(o->out_dir, &ps, options, tr, e, mom, vel, err));
        }
        if (stop) break;
    }
    kst_progress_end(&bar);
    res->first_loss = ps.first_n ? ps.loss_first / (double)ps.first_n : 0;
    res->seconds = kst_now() - t_start;
    res->triples_per_s = res->seconds > 0 ? (double)(res->steps - start_step) * (double)B / res->seconds : 0;
    if (fclose(log) != 0) {
        log = NULL;
        rc = kst_fail(err, KST_ERR_IO, "%s: write failed", logpath);
        goto done;
    }
    log = NULL;
    if (o->save_every > 0 && start_step == total) /* resumed a finished run: keep its state */
        KST_TRY(save_state(o->out_dir, &ps, options, tr, e, mom, vel, err));
    if (gt) KST_TRY(kst_gpu_trainer_get_state(gt, e->bert.param_mem, mom, vel, err));
    KST_TRY(kst_checkpoint_save(e, o->out_dir, err));
done:
    if (log) fclose(log);
    side_free(&q);
    side_free(&p);
    kst_free(sc.keep);
    kst_free(sc.argmax);
    kst_free(sc.keep_all);
    batch_buf_free(&bb);
    kst_free(mom);
    kst_free(vel);
    kst_free(decay);
    kst_free(tstate);
    kst_free(logtext);
    cJSON_Delete(options);
    kst_train_eval_free(ev);
    kst_bert_free(&grads);
    kst_teacher_close(tr);
    kst_textmap_free(qmap);
    kst_textmap_free(cmap);
    kst_gpu_trainer_free(gt);
    kst_encoder_free(e);
    return rc;
}
