/* train_cross.c - `kestrel train cross` (cross-encoder training) and `kestrel train self-distill`
 * (the bi <-> cross-encoder loop). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "index/collection.h"
#include "rank/metrics.h"
#include "rank/trec.h"
#include "train/cross.h"
#include "train/selfdistill.h"

int cmd_train_cross(int argc, char **argv);
int cmd_train_self_distill(int argc, char **argv);

static const char *CROSS_HELP =
    "usage: kestrel train cross --model CROSS_DIR --out OUT_DIR\n"
    "         (--pairs FILE | --teacher-scores FILE [--queries F --collection F] [--loss margin-mse|mse]\n"
    "          | --triples FILE)\n"
    "         [--max-len N] [--batch-size N] [--steps N | --epochs N] [--lr X] [--optimizer adamw|sgd]\n"
    "         [--weight-decay X] [--warmup N] [--schedule linear|cosine] [--grad-clip X] [--dropout P]\n"
    "         [--seed N] [--no-shuffle] [--format hofstaetter|matchmaker|nway]\n"
    "\n"
    "Trains a cross-encoder (BertForSequenceClassification or DistilBertForSequenceClassification\n"
    "with one logit) on (query, passage) pairs, and writes OUT_DIR in the transformers layout\n"
    "(float32 safetensors, tokenizer files copied) with OUT_DIR/train_log.jsonl. Data, one of:\n"
    "  --pairs FILE           query<TAB>passage<TAB>label, label in [0, 1];\n"
    "                         loss = mean binary cross-entropy with logits\n"
    "  --teacher-scores FILE  a teacher file (hofstaetter with --queries/--collection, matchmaker,\n"
    "                         nway); loss = Margin-MSE on the logits of the positive and the negatives,\n"
    "                         or with --loss mse the MSE between each logit and its teacher score\n"
    "  --triples FILE         query<TAB>positive<TAB>negative; loss = cross-entropy over the\n"
    "                         (positive, negative) logits, the positive as the label\n"
    "\n"
    "  --max-len N              tokens per pair ([CLS] query [SEP] passage [SEP]; default the model's)\n"
    "  --steps N / --epochs N   optimizer steps, or passes over the data (default 1 epoch)\n"
    "  --lr X                   peak learning rate (2e-5); linear warm-up over --warmup steps, then\n"
    "                           linear (or --schedule cosine) decay to 0\n"
    "  --optimizer adamw|sgd    AdamW (no decay on biases and LayerNorm) or plain SGD\n"
    "  --grad-clip X            global-norm clipping (off)\n"
    "  --dropout P              dropout everywhere (default: the checkpoint's, classifier_dropout\n"
    "                           / seq_classif_dropout for the head)\n"
    "  --no-shuffle             file order: the first batch is the first --batch-size lines\n";

/* Parses one of the options `train margin-mse` shares; 1 consumed, 0 not ours, -1 bad value. */
static int common_option(kst_train_opts *o, const char *cmd, const char *a, const char *v) {
    size_t n;
    char *end = NULL;
    if (strcmp(a, "--model") == 0) o->model_dir = v;
    else if (strcmp(a, "--out") == 0) o->out_dir = v;
    else if (strcmp(a, "--optimizer") == 0) {
        if (strcmp(v, "adamw") == 0) o->sgd = 0;
        else if (strcmp(v, "sgd") == 0) o->sgd = 1;
        else return cli_usage_error(cmd, "--optimizer expects adamw or sgd"), -1;
    } else if (strcmp(a, "--schedule") == 0) {
        if (strcmp(v, "linear") == 0) o->cosine = 0;
        else if (strcmp(v, "cosine") == 0) o->cosine = 1;
        else return cli_usage_error(cmd, "--schedule expects linear or cosine"), -1;
    } else if (strcmp(a, "--lr") == 0 || strcmp(a, "--weight-decay") == 0 || strcmp(a, "--grad-clip") == 0 ||
               strcmp(a, "--dropout") == 0) {
        double x = strtod(v, &end);
        if (!*v || *end || x < 0) return cli_usage_error(cmd, "%s expects a non-negative number, got \"%s\"", a, v), -1;
        if (a[2] == 'l') o->lr = x;
        else if (a[2] == 'w') o->weight_decay = x;
        else if (a[2] == 'g') o->grad_clip = x;
        else {
            if (x >= 1) return cli_usage_error(cmd, "--dropout must be below 1"), -1;
            o->dropout = x;
        }
    } else if (strcmp(a, "--batch-size") == 0 || strcmp(a, "--steps") == 0 || strcmp(a, "--epochs") == 0 ||
               strcmp(a, "--warmup") == 0 || strcmp(a, "--seed") == 0) {
        if (cli_size_value(a, v, &n) != 0) return -1;
        if (!strcmp(a, "--batch-size")) {
            if (!n) return cli_usage_error(cmd, "--batch-size must be at least 1"), -1;
            o->batch_size = n;
        } else if (!strcmp(a, "--steps")) o->steps = (long)n;
        else if (!strcmp(a, "--epochs")) o->epochs = (long)n;
        else if (!strcmp(a, "--warmup")) o->warmup = (long)n;
        else o->seed = n;
    } else {
        return 0;
    }
    return 1;
}

int cmd_train_cross(int argc, char **argv) {
    const char *cmd = "train cross";
    kst_cross_opts o = kst_cross_opts_default();
    int ndata = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(CROSS_HELP, stdout);
            return 0;
        }
        if (strcmp(a, "--no-shuffle") == 0) {
            o.train.no_shuffle = 1;
            continue;
        }
        if (!v) return cli_usage_error(cmd, "%s needs a value (or is unknown)", a);
        i++;
        int c = common_option(&o.train, cmd, a, v);
        if (c < 0) return KST_EXIT_USAGE;
        if (c) continue;
        if (strcmp(a, "--pairs") == 0 || strcmp(a, "--teacher-scores") == 0 || strcmp(a, "--triples") == 0) {
            o.train.teacher_path = v;
            o.data = a[3] == 'a' ? KST_CROSS_PAIRS : a[3] == 'e' ? KST_CROSS_TEACHER : KST_CROSS_TRIPLES;
            ndata++;
        } else if (strcmp(a, "--queries") == 0) o.train.queries_path = v;
        else if (strcmp(a, "--collection") == 0) o.train.collection_path = v;
        else if (strcmp(a, "--format") == 0) {
            kst_error err;
            if (kst_teacher_format_parse(v, &o.train.format, &err) != KST_OK) return cli_usage_error(cmd, "%s", err.msg);
        } else if (strcmp(a, "--loss") == 0) {
            if (strcmp(v, "mse") == 0) o.loss_mse = 1;
            else if (strcmp(v, "margin-mse") == 0) o.loss_mse = 0;
            else return cli_usage_error(cmd, "--loss expects margin-mse or mse");
        } else if (strcmp(a, "--max-len") == 0) {
            if (cli_size_value(a, v, &o.max_len) != 0) return KST_EXIT_USAGE;
        } else {
            return cli_usage_error(cmd, "unknown option \"%s\"", a);
        }
    }
    if (!o.train.model_dir || !o.train.out_dir)
        return cli_usage_error(cmd, "--model and --out are required");
    if (ndata != 1) return cli_usage_error(cmd, "give exactly one of --pairs, --teacher-scores, --triples");
    if (o.loss_mse && o.data != KST_CROSS_TEACHER) return cli_usage_error(cmd, "--loss applies to --teacher-scores");
    kst_train_result r;
    kst_error err;
    int rc = kst_train_cross(&o, &r, &err);
    if (rc != KST_OK) return cli_report(cmd, rc, &err);
    fprintf(stderr, "kestrel train cross: %ld steps in %.1fs (%.1f pairs/s); loss %.4f -> %.4f; saved %s\n", r.steps,
            r.seconds, r.triples_per_s, r.first_loss, r.last_loss, o.train.out_dir);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* kestrel train self-distill */

static const char *SD_HELP =
    "usage: kestrel train self-distill --bi DIR [--bi DIR ...] --cross DIR [--cross DIR ...]\n"
    "         --pairs FILE --out DIR [--cycles N]\n"
    "         [--dev-queries F --dev-qrels F --dev-collection F]\n"
    "         [--max-len N] [--batch-size N] [--steps N | --epochs N] [--lr X] [--bi-lr X] [--cross-lr X]\n"
    "         [--optimizer adamw|sgd] [--weight-decay X] [--warmup N] [--schedule linear|cosine]\n"
    "         [--grad-clip X] [--dropout P] [--seed N] [--no-shuffle]\n"
    "\n"
    "Bi-encoder <-> cross-encoder self-distillation without labels (Trans-Encoder). Each cycle:\n"
    "  1. the bi-encoder labels every pair with its cosine similarity (clipped to [0, 1]);\n"
    "  2. the cross-encoder trains on those labels (binary cross-entropy on its logit), every pair\n"
    "     in both orders;\n"
    "  3. the cross-encoder re-labels the pairs: sigmoid(logit), mean of both orders;\n"
    "  4. the bi-encoder trains on the new labels (MSE between its cosine and the label).\n"
    "Mutual distillation: with several --bi or --cross (or A||B, the Trans-Encoder spelling, as the\n"
    "value), the labels are the mean of their predictions and every model trains on them.\n"
    "--pairs holds text1<TAB>text2 lines (or text1||text2). With a dev set (queries, qrels and the\n"
    "collection, TSV or BEIR; qrels TREC or BEIR) the bi-encoders' nDCG@10 (exact search over the\n"
    "collection) is printed before the first cycle and after each, and the best cycle is saved;\n"
    "without one, the last. OUT/bi and OUT/cross (OUT/bi-1, OUT/bi-2, ... when several) keep their\n"
    "sources' layouts; OUT/self_distill_log.jsonl logs every stage.\n"
    "Training flags apply to each stage (default: 1 epoch over the pairs per stage, lr 2e-5).\n";


typedef struct dev_set {
    char **doc_ids, **doc_text, **q_ids, **q_text;
    size_t *doc_len, *q_len, nd, nq;
    kst_qrels *qrels;
    size_t max_len;
} dev_set;

static void dev_free(dev_set *d) {
    for (size_t i = 0; i < d->nd; i++) free(d->doc_ids[i]), free(d->doc_text[i]);
    for (size_t i = 0; i < d->nq; i++) free(d->q_ids[i]), free(d->q_text[i]);
    free(d->doc_ids), free(d->doc_text), free(d->q_ids), free(d->q_text), free(d->doc_len), free(d->q_len);
    kst_qrels_free(d->qrels);
}

static int push(char ***ids, char ***texts, size_t **lens, size_t *n, const char *id, size_t idl, const char *t1,
                size_t l1, const char *t2, size_t l2) {
    if ((*n & (*n - 1)) == 0) { /* grow at powers of two */
        size_t cap = *n ? 2 * *n : 1;
        char **a = realloc(*ids, cap * sizeof *a), **b = a ? realloc(*texts, cap * sizeof *b) : NULL;
        if (a) *ids = a;
        if (b) *texts = b;
        size_t *c = b ? realloc(*lens, cap * sizeof *c) : NULL;
        if (!c) return -1;
        *lens = c;
    }
    char *i = strndup(id, idl), *t = malloc(l1 + l2 + 2);
    if (!i || !t) return free(i), free(t), -1;
    memcpy(t, t1, l1);
    size_t k = l1;
    if (l2) {
        if (l1) t[k++] = ' ';
        memcpy(t + k, t2, l2);
        k += l2;
    }
    t[k] = '\0';
    (*ids)[*n] = i, (*texts)[*n] = t, (*lens)[*n] = k;
    (*n)++;
    return 0;
}

static int dev_load(dev_set *d, const char *qp, const char *qrp, const char *cp, kst_error *err) {
    kst_docs *dr = NULL;
    kst_queries *qr = NULL;
    int rc = kst_docs_open(cp, KST_FORMAT_AUTO, &dr, err);
    while (rc == KST_OK) {
        kst_doc doc;
        rc = kst_docs_next(dr, &doc, err);
        if (rc != KST_OK || !doc.id) break;
        if (push(&d->doc_ids, &d->doc_text, &d->doc_len, &d->nd, doc.id, doc.id_len, doc.title, doc.title_len, doc.text,
                 doc.text_len) != 0)
            rc = KST_ERR_NOMEM;
    }
    kst_docs_close(dr);
    if (rc == KST_OK) rc = kst_queries_open(qp, KST_FORMAT_AUTO, &qr, err);
    while (rc == KST_OK) {
        kst_query q;
        rc = kst_queries_next(qr, &q, err);
        if (rc != KST_OK || !q.id) break;
        if (push(&d->q_ids, &d->q_text, &d->q_len, &d->nq, q.id, q.id_len, q.text, q.text_len, "", 0) != 0)
            rc = KST_ERR_NOMEM;
    }
    kst_queries_close(qr);
    if (rc == KST_OK) rc = kst_qrels_read(qrp, KST_QRELS_AUTO, &d->qrels, err);
    if (rc == KST_OK && (!d->nd || !d->nq)) {
        snprintf(err->msg, sizeof err->msg, "the dev set has %zu documents and %zu queries", d->nd, d->nq);
        rc = KST_ERR_FORMAT;
    }
    return rc;
}

/* nDCG@10 (trec_eval's ndcg_cut.10) of exact search with bi over the dev collection, averaged over
 * the qrels queries that are in the queries file. */
static int dev_eval(void *ctx, kst_encoder *bi, double *score, kst_error *err) {
    dev_set *d = ctx;
    size_t D = bi->dim;
    int rc = KST_OK;
    float *dv = malloc(d->nd * D * sizeof *dv), *qv = malloc(d->nq * D * sizeof *qv), *s = malloc(d->nd * sizeof *s);
    if (!dv || !qv || !s) {
        rc = KST_ERR_NOMEM;
        goto out;
    }
    rc = kst_encoder_embed(bi, (const char *const *)d->doc_text, d->doc_len, d->nd, 0, d->max_len, 0, dv, err);
    if (rc == KST_OK)
        rc = kst_encoder_embed(bi, (const char *const *)d->q_text, d->q_len, d->nq, 1, d->max_len, 0, qv, err);
    if (rc != KST_OK) goto out;
    if (bi->similarity == KST_SIM_COSINE) { /* normalise both sides once */
        for (int side = 0; side < 2; side++) {
            float *v = side ? qv : dv;
            size_t n = side ? d->nq : d->nd;
            for (size_t i = 0; i < n; i++) {
                double nn = 0;
                for (size_t k = 0; k < D; k++) nn += (double)v[i * D + k] * v[i * D + k];
                nn = sqrt(nn) > 1e-12 ? sqrt(nn) : 1e-12;
                for (size_t k = 0; k < D; k++) v[i * D + k] = (float)(v[i * D + k] / nn);
            }
        }
    }
    kst_metric m = {KST_METRIC_NDCG_CUT, 10};
    double sum = 0;
    size_t counted = 0;
    for (size_t qi = 0; qi < d->qrels->nq; qi++) {
        const char *qid = d->qrels->qids[qi];
        size_t x = 0;
        while (x < d->nq && strcmp(d->q_ids[x], qid) != 0) x++;
        if (x == d->nq) continue;
        for (size_t j = 0; j < d->nd; j++) {
            double dot = 0;
            for (size_t k = 0; k < D; k++) dot += (double)qv[x * D + k] * dv[j * D + k];
            s[j] = (float)dot;
        }
        size_t top[10], nt = 0;
        for (size_t j = 0; j < d->nd; j++) { /* top 10, ties by docid descending as trec_eval */
            size_t at = nt;
            while (at > 0 && (s[j] > s[top[at - 1]] ||
                              (s[j] == s[top[at - 1]] && strcmp(d->doc_ids[j], d->doc_ids[top[at - 1]]) > 0)))
                at--;
            if (at >= 10) continue;
            if (nt < 10) nt++;
            memmove(top + at + 1, top + at, (nt - 1 - at) * sizeof *top);
            top[at] = j;
        }
        int ranked[10], gains[4096];
        size_t ng = 0, nrel = 0, o0 = d->qrels->off[qi], o1 = d->qrels->off[qi + 1];
        for (size_t r = 0; r < nt; r++) {
            ranked[r] = -1;
            for (size_t j = o0; j < o1; j++)
                if (strcmp(d->qrels->docids[j], d->doc_ids[top[r]]) == 0) ranked[r] = d->qrels->rel[j];
        }
        for (size_t j = o0; j < o1 && ng < 4096; j++) {
            if (d->qrels->rel[j] > 0) gains[ng++] = d->qrels->rel[j];
            if (d->qrels->rel[j] >= 1) nrel++;
        }
        for (size_t i = 1; i < ng; i++) /* descending */
            for (size_t j = i; j > 0 && gains[j] > gains[j - 1]; j--) {
                int t = gains[j];
                gains[j] = gains[j - 1], gains[j - 1] = t;
            }
        kst_query_rels qr = {ranked, nt, gains, ng, nrel};
        sum += kst_metric_value(&m, &qr, 1);
        counted++;
    }
    *score = counted ? sum / (double)counted : 0;
out:
    free(dv), free(qv), free(s);
    return rc;
}

/* Adds "A||B" or "A" to list. */
static int add_dirs(const char **list, size_t *n, size_t cap, char *v) {
    for (char *p = v;;) {
        char *sep = strstr(p, "||");
        if (sep) *sep = '\0';
        if (*n == cap || !*p) return -1;
        list[(*n)++] = p;
        if (!sep) return 0;
        p = sep + 2;
    }
}

int cmd_train_self_distill(int argc, char **argv) {
    const char *cmd = "train self-distill";
    kst_selfdistill_opts o = kst_selfdistill_opts_default();
    const char *bi[16], *cr[16], *dq = NULL, *dqr = NULL, *dc = NULL;
    size_t nb = 0, nc = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(SD_HELP, stdout);
            return 0;
        }
        if (strcmp(a, "--no-shuffle") == 0) {
            o.train.no_shuffle = 1;
            continue;
        }
        if (!v) return cli_usage_error(cmd, "%s needs a value (or is unknown)", a);
        i++;
        if (strcmp(a, "--model") == 0) return cli_usage_error(cmd, "give the models with --bi and --cross");
        int c = common_option(&o.train, cmd, a, v);
        if (c < 0) return KST_EXIT_USAGE;
        if (c) continue;
        size_t n;
        if (strcmp(a, "--bi") == 0) {
            if (add_dirs(bi, &nb, 16, v) != 0) return cli_usage_error(cmd, "--bi: an empty name, or more than 16 models");
        } else if (strcmp(a, "--cross") == 0) {
            if (add_dirs(cr, &nc, 16, v) != 0) return cli_usage_error(cmd, "--cross: an empty name, or more than 16 models");
        } else if (strcmp(a, "--pairs") == 0) o.pairs_path = v;
        else if (strcmp(a, "--dev-queries") == 0) dq = v;
        else if (strcmp(a, "--dev-qrels") == 0) dqr = v;
        else if (strcmp(a, "--dev-collection") == 0) dc = v;
        else if (strcmp(a, "--cycles") == 0 || strcmp(a, "--max-len") == 0) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            if (a[2] == 'c') {
                if (!n) return cli_usage_error(cmd, "--cycles must be at least 1");
                o.cycles = (long)n;
            } else o.max_len = n;
        } else if (strcmp(a, "--bi-lr") == 0 || strcmp(a, "--cross-lr") == 0) {
            char *end = NULL;
            double x = strtod(v, &end);
            if (!*v || *end || !(x > 0)) return cli_usage_error(cmd, "%s expects a positive number", a);
            if (a[2] == 'b') o.bi_lr = x;
            else o.cross_lr = x;
        } else {
            return cli_usage_error(cmd, "unknown option \"%s\"", a);
        }
    }
    o.out_dir = o.train.out_dir;
    if (!nb || !nc || !o.pairs_path || !o.out_dir)
        return cli_usage_error(cmd, "--bi, --cross, --pairs and --out are required");
    if ((dq || dqr || dc) && !(dq && dqr && dc))
        return cli_usage_error(cmd, "a dev set needs --dev-queries, --dev-qrels and --dev-collection");
    o.bi_dirs = bi, o.n_bi = nb, o.cross_dirs = cr, o.n_cross = nc;
    dev_set dev;
    memset(&dev, 0, sizeof dev);
    kst_error err;
    int rc = KST_OK;
    if (dq) {
        rc = dev_load(&dev, dq, dqr, dc, &err);
        if (rc != KST_OK) {
            dev_free(&dev);
            return cli_report(cmd, rc, &err);
        }
        dev.max_len = 0; /* the dev set is encoded as the model would be used: its own length */
        o.eval = dev_eval, o.eval_ctx = &dev, o.eval_name = "nDCG@10";
    }
    kst_selfdistill_result r;
    rc = kst_self_distill(&o, &r, &err);
    dev_free(&dev);
    if (rc != KST_OK) return cli_report(cmd, rc, &err);
    if (dq)
        fprintf(stderr, "kestrel self-distill: saved cycle %ld to %s (nDCG@10 %.4f, before %.4f)\n", r.best_cycle, o.out_dir,
                r.dev_best, r.dev_before);
    else
        fprintf(stderr, "kestrel self-distill: saved cycle %ld to %s\n", r.best_cycle, o.out_dir);
    return 0;
}
