/* metrics.c - trec_eval's map, recip_rank, ndcg_cut, recall and P, per query and averaged. */
#include "metrics.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/check.h"
#include "core/mem.h"

/* ---------------------------------------------------------------------------------------------
 * Names
 * ------------------------------------------------------------------------------------------- */

static const char *METRIC_HELP =
    "map, recip_rank[.K], ndcg_cut.K, recall.K, P.K (or MAP, MRR[@K], nDCG@K, Recall@K, R@K, "
    "P@K)";

/* Reads a positive cutoff from s (the whole string). */
static int parse_cutoff(const char *s, long *out) {
    if (!isdigit((unsigned char)*s)) return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*end || errno || v <= 0) return 0;
    *out = v;
    return 1;
}

int kst_metric_parse(const char *name, kst_metric *out, kst_error *err) {
    /* trec_eval names take the cutoff after '.' (ndcg_cut.10) or, as printed, '_' (ndcg_cut_10);
     * the usual names after '@' (nDCG@10). */
    static const struct {
        const char *prefix;
        kst_metric_kind kind;
        int needs_cutoff;
    } names[] = {
        {"map", KST_METRIC_MAP, -1},          {"recip_rank", KST_METRIC_RECIP_RANK, 0},
        {"mrr", KST_METRIC_RECIP_RANK, 0},    {"ndcg_cut", KST_METRIC_NDCG_CUT, 1},
        {"ndcg", KST_METRIC_NDCG_CUT, 1},     {"recall", KST_METRIC_RECALL, 1},
        {"r", KST_METRIC_RECALL, 1},          {"p", KST_METRIC_P, 1},
    };
    const char *sep = strpbrk(name, ".@");
    size_t plen = sep ? (size_t)(sep - name) : strlen(name);
    const char *cut = sep ? sep + 1 : NULL;
    /* The printed form: the last '_' followed by digits only. */
    if (!sep) {
        const char *us = strrchr(name, '_');
        if (us && us[1] && strspn(us + 1, "0123456789") == strlen(us + 1)) {
            plen = (size_t)(us - name);
            cut = us + 1;
        }
    }
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strlen(names[i].prefix) != plen || strncasecmp(name, names[i].prefix, plen) != 0)
            continue;
        kst_metric m = {names[i].kind, 0};
        if (cut) {
            if (names[i].needs_cutoff < 0 || !parse_cutoff(cut, &m.cutoff))
                break;
        } else if (names[i].needs_cutoff > 0) {
            return kst_fail(err, KST_ERR_INVALID, "metric \"%s\" needs a cutoff (e.g. %s@10)",
                            name, name);
        }
        *out = m;
        return KST_OK;
    }
    return kst_fail(err, KST_ERR_INVALID, "unknown metric \"%s\"; expected one of %s", name,
                    METRIC_HELP);
}

int kst_metric_parse_list(const char *list, kst_metric **out, size_t *n, kst_error *err) {
    *out = NULL;
    *n = 0;
    size_t cap = 1;
    for (const char *p = list; *p; p++) cap += *p == ',';
    kst_metric *v = kst_malloc(cap, sizeof *v, "metric list", err);
    if (!v) return KST_ERR_NOMEM;
    size_t k = 0;
    const char *p = list;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char name[64];
        if (len == 0 || len >= sizeof name) {
            kst_free(v);
            return kst_fail(err, KST_ERR_INVALID, "metric list \"%s\": %s", list,
                            len ? "a name is too long" : "empty name");
        }
        memcpy(name, p, len);
        name[len] = '\0';
        int rc = kst_metric_parse(name, &v[k], err);
        if (rc != KST_OK) {
            kst_free(v);
            return rc;
        }
        for (size_t j = 0; j < k; j++)
            if (v[j].kind == v[k].kind && v[j].cutoff == v[k].cutoff) {
                kst_free(v);
                return kst_fail(err, KST_ERR_INVALID, "metric list \"%s\": \"%s\" is listed twice",
                                list, name);
            }
        k++;
        if (!comma) break;
        p = comma + 1;
    }
    *out = v;
    *n = k;
    return KST_OK;
}

void kst_metric_name(const kst_metric *m, char *buf, size_t cap) {
    static const char *base[] = {"map", "recip_rank", "ndcg_cut", "recall", "P"};
    if (m->cutoff > 0) snprintf(buf, cap, "%s_%ld", base[m->kind], m->cutoff);
    else snprintf(buf, cap, "%s", base[m->kind]);
}

/* ---------------------------------------------------------------------------------------------
 * One query
 * ------------------------------------------------------------------------------------------- */

/* The number of ranks a cutoff covers (all of them when k is 0). */
static size_t top(size_t n, long k) { return k > 0 && (size_t)k < n ? (size_t)k : n; }

double kst_metric_value(const kst_metric *m, const kst_query_rels *q, int level) {
    size_t n = top(q->nret, m->cutoff);
    size_t rel_so_far = 0;
    double sum = 0;
    switch (m->kind) {
    case KST_METRIC_MAP: /* m_map.c */
        for (size_t i = 0; i < q->nret; i++)
            if (q->ranked[i] >= level && q->ranked[i] >= 0)
                sum += (double)++rel_so_far / (double)(i + 1);
        return rel_so_far ? sum / (double)q->num_rel : 0.0;
    case KST_METRIC_RECIP_RANK: /* m_recip_rank.c, over the top `cutoff` when given */
        for (size_t i = 0; i < n; i++)
            if (q->ranked[i] >= level && q->ranked[i] >= 0) return 1.0 / (double)(i + 1);
        return 0.0;
    case KST_METRIC_NDCG_CUT: { /* m_ndcg_cut.c: gain = relevance, rank r discounted by log2(r+1) */
        for (size_t i = 0; i < n; i++)
            if (q->ranked[i] > 0) sum += q->ranked[i] / log2((double)(i + 2));
        double ideal = 0;
        size_t ni = top(q->ngains, m->cutoff);
        for (size_t i = 0; i < ni; i++) ideal += q->gains[i] / log2((double)(i + 2));
        return ideal > 0 ? sum / ideal : sum;
    }
    case KST_METRIC_RECALL: /* m_recall.c */
        if (q->num_rel == 0) return 0.0;
        for (size_t i = 0; i < n; i++) rel_so_far += q->ranked[i] >= level && q->ranked[i] >= 0;
        return (double)rel_so_far / (double)q->num_rel;
    case KST_METRIC_P: /* m_P.c: divided by the cutoff even when fewer docs were retrieved */
        for (size_t i = 0; i < n; i++) rel_so_far += q->ranked[i] >= level && q->ranked[i] >= 0;
        return (double)rel_so_far / (double)m->cutoff;
    }
    return 0.0;
}

/* ---------------------------------------------------------------------------------------------
 * A run against qrels
 * ------------------------------------------------------------------------------------------- */

kst_eval_opts kst_eval_opts_default(void) { return (kst_eval_opts){1, 0, 0}; }

static int cmp_int_desc(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x < y) - (x > y);
}

/* Relevance of docid among the judgments lo..hi-1 (sorted by docid), or -1 when unjudged. */
static int lookup_rel(const kst_qrels *qr, size_t lo, size_t hi, const char *docid) {
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(qr->docids[mid], docid);
        if (c == 0) return qr->rel[mid] < 0 ? -1 : qr->rel[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

void kst_eval_free(kst_eval *e) {
    if (!e) return;
    if (e->qids)
        for (size_t i = 0; i < e->nq; i++) kst_free(e->qids[i]);
    kst_free(e->qids);
    kst_free(e->in_run);
    kst_free(e->metrics);
    kst_free(e->values);
    kst_free(e->mean);
    kst_free(e);
}

int kst_evaluate(const kst_qrels *qrels, const kst_run *run, const kst_metric *metrics,
                 size_t nmetrics, const kst_eval_opts *opts, kst_eval **out, kst_error *err) {
    *out = NULL;
    kst_eval_opts o = opts ? *opts : kst_eval_opts_default();
    if (nmetrics == 0) return kst_fail(err, KST_ERR_INVALID, "no metrics to compute");
    if (o.relevance_level < 0)
        return kst_fail(err, KST_ERR_INVALID,
                        "relevance level %d: expected 0 or more (negative relevance values mean "
                        "unjudged)",
                        o.relevance_level);
    for (size_t m = 0; m < nmetrics; m++) {
        kst_metric_kind k = metrics[m].kind;
        int needs_cut = k == KST_METRIC_NDCG_CUT || k == KST_METRIC_RECALL || k == KST_METRIC_P;
        if ((unsigned)k > KST_METRIC_P || metrics[m].cutoff < 0 ||
            (needs_cut && metrics[m].cutoff == 0) || (k == KST_METRIC_MAP && metrics[m].cutoff))
            return kst_fail(err, KST_ERR_INVALID, "metric %zu: kind %d with cutoff %ld is not "
                            "one kst_metric_parse makes", m, (int)k, metrics[m].cutoff);
    }
    int rc = KST_OK;
    int *ranked = NULL, *gains = NULL;
    kst_eval *e = kst_calloc(1, sizeof *e, "evaluation", err);
    if (!e) return KST_ERR_NOMEM;

    /* Which qrels queries count, and scratch sizes. */
    size_t nq = 0, max_ret = 1, max_judged = 1;
    for (size_t k = 0; k < qrels->nq; k++) {
        long r = kst_run_find(run, qrels->qids[k]);
        if (r < 0 && !o.complete) continue;
        nq++;
        if (r >= 0 && run->off[r + 1] - run->off[r] > max_ret) max_ret = run->off[r + 1] - run->off[r];
        if (qrels->off[k + 1] - qrels->off[k] > max_judged)
            max_judged = qrels->off[k + 1] - qrels->off[k];
    }
    if (nq == 0) {
        rc = kst_fail(err, KST_ERR_NOTFOUND,
                      "no query is in both the run (%zu queries) and the qrels (%zu queries); "
                      "check that both use the same query ids",
                      run->nq, qrels->nq);
        goto done;
    }
    e->nmetrics = nmetrics;
    e->metrics = kst_malloc(nmetrics, sizeof *e->metrics, "metrics", err);
    e->qids = kst_calloc(nq, sizeof *e->qids, "query ids", err);
    e->in_run = kst_malloc(nq, sizeof *e->in_run, "query flags", err);
    e->values = kst_malloc(nq, nmetrics * sizeof *e->values, "metric values", err);
    e->mean = kst_calloc(nmetrics, sizeof *e->mean, "metric means", err);
    ranked = kst_malloc(max_ret, sizeof *ranked, "ranked relevance", err);
    gains = kst_malloc(max_judged, sizeof *gains, "ideal gains", err);
    if (!e->metrics || !e->qids || !e->in_run || !e->values || !e->mean || !ranked || !gains) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    memcpy(e->metrics, metrics, nmetrics * sizeof *metrics);

    size_t at = 0;
    for (size_t k = 0; k < qrels->nq; k++) {
        long r = kst_run_find(run, qrels->qids[k]);
        if (r < 0 && !o.complete) continue;
        size_t lo = qrels->off[k], hi = qrels->off[k + 1];
        kst_query_rels q = {ranked, 0, gains, 0, 0};
        for (size_t j = lo; j < hi; j++) {
            if (qrels->rel[j] > 0) gains[q.ngains++] = qrels->rel[j];
            if (qrels->rel[j] >= 0 && qrels->rel[j] >= o.relevance_level) q.num_rel++;
        }
        qsort(gains, q.ngains, sizeof *gains, cmp_int_desc);
        if (r >= 0) {
            size_t b = run->off[r], n = run->off[r + 1] - b;
            if (o.max_per_query && n > o.max_per_query) n = o.max_per_query;
            for (size_t i = 0; i < n; i++) ranked[i] = lookup_rel(qrels, lo, hi, run->docids[b + i]);
            q.nret = n;
        }
        e->qids[at] = kst_strndup(qrels->qids[k], (size_t)-1, err);
        if (!e->qids[at]) {
            e->nq = at;
            rc = KST_ERR_NOMEM;
            goto done;
        }
        e->in_run[at] = r >= 0;
        for (size_t m = 0; m < nmetrics; m++) {
            double v = kst_metric_value(&metrics[m], &q, o.relevance_level);
            e->values[at * nmetrics + m] = v;
            e->mean[m] += v;
        }
        at++;
    }
    e->nq = nq;
    for (size_t m = 0; m < nmetrics; m++) e->mean[m] /= (double)nq;
    *out = e;
    e = NULL;
done:
    kst_eval_free(e);
    kst_free(ranked);
    kst_free(gains);
    return rc;
}
