/* eval.c - nDCG@10 and MRR@10 of a student on a small corpus by exhaustive search (eval.h). */
#include "eval.h"

#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/mem.h"
#include "core/ops_backward.h"
#include "index/collection.h"
#include "rank/metrics.h"
#include "rank/trec.h"

#define EVAL_K 10

struct kst_train_eval {
    size_t nd, nq;
    char **doc_ids, **doc_texts; /* (nd) */
    size_t *doc_lens;
    char **q_texts;              /* (nq) */
    size_t *q_lens;
    long *q_rel;                 /* (nq) index of the query in qrels */
    kst_qrels *qrels;
};

void kst_train_eval_free(kst_train_eval *ev) {
    if (!ev) return;
    for (size_t i = 0; i < ev->nd; i++) {
        kst_free(ev->doc_ids[i]);
        kst_free(ev->doc_texts[i]);
    }
    for (size_t i = 0; i < ev->nq; i++) kst_free(ev->q_texts[i]);
    kst_free(ev->doc_ids);
    kst_free(ev->doc_texts);
    kst_free(ev->doc_lens);
    kst_free(ev->q_texts);
    kst_free(ev->q_lens);
    kst_free(ev->q_rel);
    kst_qrels_free(ev->qrels);
    kst_free(ev);
}

static char *join_title(const kst_doc *d, size_t *len, kst_error *err) {
    size_t tl = d->title_len, xl = d->text_len, at = 0;
    char *s = kst_malloc(tl + xl + 2, 1, "eval corpus", err);
    if (!s) return NULL;
    if (tl) {
        memcpy(s, d->title, tl);
        at = tl;
        if (xl) s[at++] = ' ';
    }
    memcpy(s + at, d->text, xl);
    s[at + xl] = '\0';
    *len = at + xl;
    return s;
}

int kst_train_eval_open(const char *queries, const char *qrels, const char *corpus,
                        kst_train_eval **out, kst_error *err) {
    int rc = KST_OK;
    kst_docs *dr = NULL;
    kst_queries *qr = NULL;
    *out = NULL;
    kst_train_eval *ev = kst_calloc(1, sizeof *ev, "eval set", err);
    if (!ev) return KST_ERR_NOMEM;
    KST_TRY(kst_qrels_read(qrels, KST_QRELS_AUTO, &ev->qrels, err));
    /* corpus */
    size_t cap = 0;
    KST_TRY(kst_docs_open(corpus, KST_FORMAT_AUTO, &dr, err));
    for (;;) {
        kst_doc d;
        KST_TRY(kst_docs_next(dr, &d, err));
        if (!d.id) break;
        if (ev->nd == cap) {
            cap = cap ? 2 * cap : 1024;
            KST_TRY(kst_realloc((void **)&ev->doc_ids, cap, sizeof(char *), "eval corpus", err));
            KST_TRY(kst_realloc((void **)&ev->doc_texts, cap, sizeof(char *), "eval corpus", err));
            KST_TRY(kst_realloc((void **)&ev->doc_lens, cap, sizeof(size_t), "eval corpus", err));
        }
        ev->doc_ids[ev->nd] = kst_strndup(d.id, d.id_len, err);
        ev->doc_texts[ev->nd] = join_title(&d, &ev->doc_lens[ev->nd], err);
        if (!ev->doc_ids[ev->nd] || !ev->doc_texts[ev->nd]) {
            ev->nd++;
            rc = KST_ERR_NOMEM;
            goto done;
        }
        ev->nd++;
    }
    if (ev->nd == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: the evaluation corpus has no documents", corpus);
        goto done;
    }
    /* judged queries */
    cap = 0;
    KST_TRY(kst_queries_open(queries, KST_FORMAT_AUTO, &qr, err));
    for (;;) {
        kst_query q;
        KST_TRY(kst_queries_next(qr, &q, err));
        if (!q.id) break;
        long at = kst_qrels_find(ev->qrels, q.id);
        if (at < 0) continue;
        if (ev->nq == cap) {
            cap = cap ? 2 * cap : 256;
            KST_TRY(kst_realloc((void **)&ev->q_texts, cap, sizeof(char *), "eval queries", err));
            KST_TRY(kst_realloc((void **)&ev->q_lens, cap, sizeof(size_t), "eval queries", err));
            KST_TRY(kst_realloc((void **)&ev->q_rel, cap, sizeof(long), "eval queries", err));
        }
        ev->q_texts[ev->nq] = kst_strndup(q.text, q.text_len, err);
        if (!ev->q_texts[ev->nq]) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        ev->q_lens[ev->nq] = q.text_len;
        ev->q_rel[ev->nq++] = at;
    }
    if (ev->nq == 0) {
        rc = kst_fail(err, KST_ERR_INVALID, "%s: no query has a judgment in %s (do the qids match?)", queries, qrels);
        goto done;
    }
done:
    kst_docs_close(dr);
    kst_queries_close(qr);
    if (rc != KST_OK) {
        kst_train_eval_free(ev);
        return rc;
    }
    *out = ev;
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */

typedef struct hit {
    float score;
    size_t doc;
} hit;

/* trec_eval's order: score descending, then docid descending. */
static int hit_before(const kst_train_eval *ev, const hit *a, const hit *b) {
    if (a->score != b->score) return a->score > b->score;
    return strcmp(ev->doc_ids[a->doc], ev->doc_ids[b->doc]) > 0;
}

/* Keeps the best EVAL_K of the offered hits in top[0..*n), in order. */
static void top_offer(const kst_train_eval *ev, hit *top, size_t *n, hit h) {
    if (*n == EVAL_K && !hit_before(ev, &h, &top[EVAL_K - 1])) return;
    size_t i = *n < EVAL_K ? (*n)++ : EVAL_K - 1;
    while (i > 0 && hit_before(ev, &h, &top[i - 1])) {
        top[i] = top[i - 1];
        i--;
    }
    top[i] = h;
}

static int cmp_int_desc(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x < y) - (x > y);
}

/* Relevance of doc for query q (qrels index), -1 when unjudged. */
static int relevance(const kst_qrels *qr, long q, const char *doc) {
    size_t lo = qr->off[q], hi = qr->off[q + 1];
    while (lo < hi) { /* judgments are sorted by docid */
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(qr->docids[mid], doc);
        if (c == 0) return qr->rel[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

int kst_train_eval_run(kst_train_eval *ev, kst_encoder *e, size_t query_max_len,
                       size_t doc_max_len, kst_train_eval_result *res, kst_error *err) {
    int rc = KST_OK;
    float *dv = NULL, *qv = NULL;
    int64_t *doff = NULL, *qoff = NULL;
    int *gains = NULL;
    size_t D = e->dim, dtot = 0, qtot = 0, maxg = 0;
    int colbert = e->role == KST_ROLE_COLBERT;
    memset(res, 0, sizeof *res);
    if (colbert) {
        if (!(doff = kst_malloc(ev->nd + 1, sizeof *doff, "eval", err)) ||
            !(qoff = kst_malloc(ev->nq + 1, sizeof *qoff, "eval", err))) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(kst_encoder_embed_tokens(e, (const char *const *)ev->doc_texts, ev->doc_lens, ev->nd, 0, doc_max_len,
                                         32, &dv, &dtot, doff, err));
        KST_TRY(kst_encoder_embed_tokens(e, (const char *const *)ev->q_texts, ev->q_lens, ev->nq, 1, query_max_len,
                                         32, &qv, &qtot, qoff, err));
    } else {
        if (!(dv = kst_malloc(ev->nd * D, sizeof *dv, "eval vectors", err)) ||
            !(qv = kst_malloc(ev->nq * D, sizeof *qv, "eval vectors", err))) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(kst_encoder_embed(e, (const char *const *)ev->doc_texts, ev->doc_lens, ev->nd, 0, doc_max_len, 32, dv, err));
        KST_TRY(kst_encoder_embed(e, (const char *const *)ev->q_texts, ev->q_lens, ev->nq, 1, query_max_len, 32, qv, err));
    }
    for (size_t q = 0; q < ev->nq; q++) {
        size_t n = ev->qrels->off[ev->q_rel[q] + 1] - ev->qrels->off[ev->q_rel[q]];
        if (n > maxg) maxg = n;
    }
    if (!(gains = kst_malloc(maxg ? maxg : 1, sizeof *gains, "eval", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    kst_metric ndcg = {KST_METRIC_NDCG_CUT, EVAL_K}, mrr = {KST_METRIC_RECIP_RANK, EVAL_K};
    double sn = 0, sm = 0;
    for (size_t q = 0; q < ev->nq; q++) {
        hit top[EVAL_K];
        size_t ntop = 0;
        for (size_t d = 0; d < ev->nd; d++) {
            hit h = {0, d};
            if (colbert) {
                h.score = kst_maxsim_forward(NULL, qv + (size_t)qoff[q] * D, dv + (size_t)doff[d] * D, NULL,
                                             (size_t)(qoff[q + 1] - qoff[q]), (size_t)(doff[d + 1] - doff[d]), D);
            } else {
                const float *a = qv + q * D, *b = dv + d * D;
                double s = 0;
                for (size_t k = 0; k < D; k++) s += (double)a[k] * b[k];
                h.score = (float)s;
            }
            top_offer(ev, top, &ntop, h);
        }
        const kst_qrels *qr = ev->qrels;
        long qi = ev->q_rel[q];
        int ranked[EVAL_K];
        for (size_t i = 0; i < ntop; i++) ranked[i] = relevance(qr, qi, ev->doc_ids[top[i].doc]);
        size_t ng = 0, nrel = 0;
        for (size_t j = qr->off[qi]; j < qr->off[qi + 1]; j++) {
            if (qr->rel[j] > 0) gains[ng++] = qr->rel[j];
            if (qr->rel[j] >= 1) nrel++;
        }
        qsort(gains, ng, sizeof *gains, cmp_int_desc);
        kst_query_rels rels = {ranked, ntop, gains, ng, nrel};
        sn += kst_metric_value(&ndcg, &rels, 1);
        sm += kst_metric_value(&mrr, &rels, 1);
    }
    res->ndcg10 = sn / (double)ev->nq;
    res->mrr10 = sm / (double)ev->nq;
    res->queries = ev->nq;
    res->docs = ev->nd;
done:
    kst_free(dv);
    kst_free(qv);
    kst_free(doff);
    kst_free(qoff);
    kst_free(gains);
    return rc;
}
