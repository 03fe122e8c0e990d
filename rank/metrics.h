/* metrics.h - ranking metrics exactly as trec_eval 9.x defines them: map, recip_rank (MRR@k),
 * ndcg_cut.k, recall.k, P.k; per query and averaged over queries as trec_eval averages.
 *
 * Definitions (usnistgov/trec_eval, m_map.c, m_recip_rank.c, m_ndcg_cut.c, m_recall.c, m_P.c over
 * form_res_rels.c; checked against pytrec_eval in tests/test_metrics.c):
 * - Ranking: each query's documents sorted by score descending, ties by docid descending
 *   (kst_run keeps them so); the rank field of the run file plays no part.
 * - A document is relevant when its qrels relevance is >= the relevance level (trec_eval -l,
 *   default 1). Documents missing from the qrels and negative relevance values (trec_eval:
 *   "judged unjudged") are never relevant and have no gain. num_rel counts the relevant
 *   judgments of the query, retrieved or not.
 * - map: sum over relevant retrieved docs of (relevant so far / rank), divided by num_rel.
 * - recip_rank: 1 / rank of the first relevant doc, 0 if none. With a cutoff k (MRR@k) only the
 *   top k count: trec_eval's recip_rank with -M k, the MS MARCO MRR@10.
 * - ndcg_cut.k: DCG over the top k with gain = the relevance value when > 0 (graded; the level
 *   does not apply) and discount log2(rank + 1); divided by the ideal DCG at k, made from all the
 *   query's positive relevance values in descending order. 0 when the ideal is 0.
 * - recall.k: relevant docs in the top k / num_rel; 0 when num_rel is 0.
 * - P.k: relevant docs in the top k / k (missing ranks count as non-relevant).
 * Averaging (trec_eval's default): over the queries present in both the qrels and the run, queries
 * with no relevant judgment included (they score 0); run queries absent from the qrels are
 * ignored. With `complete` (trec_eval -c) every qrels query counts, those missing from the run
 * scoring 0.
 */
#ifndef KST_RANK_METRICS_H
#define KST_RANK_METRICS_H

#include <stddef.h>

#include "core/error.h"
#include "rank/trec.h"

typedef enum kst_metric_kind {
    KST_METRIC_MAP,         /* map */
    KST_METRIC_RECIP_RANK,  /* recip_rank; cutoff k > 0 for MRR@k */
    KST_METRIC_NDCG_CUT,    /* ndcg_cut.k */
    KST_METRIC_RECALL,      /* recall.k */
    KST_METRIC_P            /* P.k */
} kst_metric_kind;

typedef struct kst_metric {
    kst_metric_kind kind;
    long cutoff; /* 0: none (map, recip_rank over the whole run); > 0 otherwise */
} kst_metric;

/* The default metrics of `kestrel eval`: MRR@10, nDCG@10, Recall@100, Recall@1000, MAP. */
#define KST_METRIC_DEFAULTS "recip_rank.10,ndcg_cut.10,recall.100,recall.1000,map"

/* Parses one metric name: trec_eval's spelling (map, recip_rank, ndcg_cut.10, recall.100, P.10,
 * and the printed forms ndcg_cut_10 ...; recip_rank.10 is MRR@10) or the usual names, case
 * ignored (MAP, MRR, MRR@10, nDCG@10, Recall@100, R@100, P@10). KST_ERR_INVALID names the
 * metric and lists the accepted ones; a cutoff must be a positive integer. */
int kst_metric_parse(const char *name, kst_metric *out, kst_error *err);
/* Parses a comma-separated list into *out (free with kst_free), *n its length. Duplicates are
 * refused (KST_ERR_INVALID). */
int kst_metric_parse_list(const char *list, kst_metric **out, size_t *n, kst_error *err);
/* The name trec_eval prints: "map", "recip_rank", "recip_rank_10", "ndcg_cut_10", "recall_100",
 * "P_10". Cannot fail (cut to cap). */
void kst_metric_name(const kst_metric *m, char *buf, size_t cap);

/* One query as trec_eval's RES_RELS sees it. */
typedef struct kst_query_rels {
    const int *ranked;  /* (nret) relevance of each retrieved doc in rank order; < 0: unjudged */
    size_t nret;
    const int *gains;   /* (ngains) the query's positive relevance values, descending */
    size_t ngains;
    size_t num_rel;     /* judgments with relevance >= level */
} kst_query_rels;

/* One metric of one query; level is the relevance level (>= 0). Cannot fail. */
double kst_metric_value(const kst_metric *m, const kst_query_rels *q, int level);

typedef struct kst_eval_opts {
    int relevance_level;   /* trec_eval -l: relevant when relevance >= this; default 1, >= 0 */
    int complete;          /* trec_eval -c: average over every qrels query; default 0 */
    size_t max_per_query;  /* trec_eval -M: only each query's top N count; default 0 = all */
} kst_eval_opts;

kst_eval_opts kst_eval_opts_default(void);

/* Per-query values and their means. Queries in qrels order (qid, strcmp). */
typedef struct kst_eval {
    size_t nmetrics;
    kst_metric *metrics;  /* (nmetrics) */
    size_t nq;            /* the queries averaged over */
    char **qids;          /* (nq) */
    int *in_run;          /* (nq) 0 for a qrels query missing from the run (complete only) */
    double *values;       /* (nq, nmetrics) */
    double *mean;         /* (nmetrics) */
} kst_eval;

/* Evaluates `run` against `qrels`. opts may be NULL (defaults). *out is set only on success; free
 * with kst_eval_free. Errors: KST_ERR_INVALID (no metrics, a metric without its cutoff, a
 * negative relevance level),
 * KST_ERR_NOTFOUND when no query is in both files (trec_eval: "No queries with both results and
 * relevance info"; with `complete` this cannot happen), KST_ERR_NOMEM. The inputs are not
 * changed. */
int kst_evaluate(const kst_qrels *qrels, const kst_run *run, const kst_metric *metrics,
                 size_t nmetrics, const kst_eval_opts *opts, kst_eval **out, kst_error *err);
/* NULL is a no-op. */
void kst_eval_free(kst_eval *e);

#endif
