/* eval.c - `kestrel eval`: score a TREC run against qrels as trec_eval does (MRR@10, nDCG@10,
 * Recall@100, Recall@1000, MAP by default). Uses rank/ directly until kestrel.h has an
 * evaluation API. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/mem.h"
#include "rank/metrics.h"
#include "rank/trec.h"

static const char *HELP =
    "usage: kestrel eval --qrels FILE --run FILE [--per-query] [--metrics LIST] [--level N]\n"
    "                    [--complete] [--max-per-query N] [--qrels-format F] [--digits N]\n"
    "       kestrel eval --qrels FILE --qrels-format cranfield --write-qrels OUT\n"
    "\n"
    "Scores a run against relevance judgments exactly as trec_eval 9 does, and prints a table\n"
    "like trec_eval's: `metric<TAB>all<TAB>value` (the name padded to 22 characters), preceded\n"
    "by runid and num_q (the number of queries averaged over).\n"
    "\n"
    "  --qrels FILE        judgments: TREC `qid iter docid rel`, or BEIR's TSV with the header\n"
    "                      query-id<TAB>corpus-id<TAB>score (detected); .gz files are read too\n"
    "  --run FILE          TREC run `qid Q0 docid rank score tag` (.gz too). Each query is\n"
    "                      re-ranked by score, ties by docid descending; the rank field is ignored\n"
    "  --per-query, -q     also print `metric<TAB>qid<TAB>value` for every query, before the means\n"
    "  --metrics LIST      comma-separated (default recip_rank.10,ndcg_cut.10,recall.100,\n"
    "                      recall.1000,map). Names: map, recip_rank[.K] (MRR@K: the first\n"
    "                      relevant doc within the top K), ndcg_cut.K (gain = relevance value,\n"
    "                      log2 discount), recall.K, P.K; also MAP, MRR@K, nDCG@K, Recall@K, R@K,\n"
    "                      P@K\n"
    "  --level N, -l N     relevance level: a judgment counts as relevant when rel >= N\n"
    "                      (trec_eval -l; default 1; nDCG gains ignore it)\n"
    "  --complete, -c      average over every query of the qrels, a query missing from the run\n"
    "                      scoring 0 (trec_eval -c). Default: the queries in both files; queries\n"
    "                      with no relevant document count (score 0), run queries without\n"
    "                      judgments are ignored, as trec_eval does\n"
    "  --max-per-query N   only each query's top N documents count (trec_eval -M; default all)\n"
    "  --qrels-format F    auto (default), trec, beir, or cranfield: Cranfield's cranqrel\n"
    "                      (`qid docid code`), read with gain = 5 - code for codes 1..4 and 0\n"
    "                      for -1; query ids are positions in cran.qry\n"
    "  --write-qrels OUT   write the qrels in TREC form to OUT (the Cranfield converter); with\n"
    "                      no --run, nothing is evaluated\n"
    "  --digits N          decimals printed (default 4, as trec_eval)\n"
    "\n"
    "Negative relevance values are never relevant. A duplicate (qid, docid) in either file is an\n"
    "error, as in trec_eval. Exit codes: 0 success, 2 I/O error, 3 malformed file, 4 out of\n"
    "memory, 5 file not found or no query in both files, 64 usage error.\n";

/* Prints the library's message and returns the exit code of status rc. */
static int report(int rc, const kst_error *err) {
    fprintf(stderr, "kestrel eval: %s\n", err->msg[0] ? err->msg : kst_status_str(rc));
    return -rc;
}

static int int_value(const char *opt, const char *val, long min, long *out) {
    if (!val) {
        fprintf(stderr, "kestrel eval: %s needs a value\n", opt);
        return -1;
    }
    char *end;
    errno = 0;
    long v = strtol(val, &end, 10);
    if (errno || *end || !*val || v < min || v > 1000000000L) {
        fprintf(stderr, "kestrel eval: %s expects an integer >= %ld, got \"%s\"\n", opt, min, val);
        return -1;
    }
    *out = v;
    return 0;
}

static void print_row(const char *name, const char *qid, double v, int digits) {
    printf("%-22s\t%s\t%.*f\n", name, qid, digits, v);
}

int cmd_eval(int argc, char **argv) {
    const char *qrels_path = NULL, *run_path = NULL, *metrics_list = KST_METRIC_DEFAULTS;
    const char *write_qrels = NULL;
    int per_query = 0;
    long digits = 4, v;
    kst_qrels_format fmt = KST_QRELS_AUTO;
    kst_eval_opts o = kst_eval_opts_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        } else if (strcmp(a, "--per-query") == 0 || strcmp(a, "-q") == 0) {
            per_query = 1;
        } else if (strcmp(a, "--complete") == 0 || strcmp(a, "-c") == 0) {
            o.complete = 1;
        } else if (strcmp(a, "--qrels") == 0 || strcmp(a, "--run") == 0 ||
                   strcmp(a, "--metrics") == 0 || strcmp(a, "--write-qrels") == 0 ||
                   strcmp(a, "--qrels-format") == 0) {
            if (!val) return cli_usage_error("eval", "%s needs a value", a);
            i++;
            if (strcmp(a, "--qrels") == 0) qrels_path = val;
            else if (strcmp(a, "--run") == 0) run_path = val;
            else if (strcmp(a, "--metrics") == 0) metrics_list = val;
            else if (strcmp(a, "--write-qrels") == 0) write_qrels = val;
            else if (strcmp(val, "auto") == 0) fmt = KST_QRELS_AUTO;
            else if (strcmp(val, "trec") == 0) fmt = KST_QRELS_TREC;
            else if (strcmp(val, "beir") == 0) fmt = KST_QRELS_BEIR;
            else if (strcmp(val, "cranfield") == 0) fmt = KST_QRELS_CRANFIELD;
            else
                return cli_usage_error("eval",
                                       "--qrels-format expects auto, trec, beir or cranfield, "
                                       "got \"%s\"",
                                       val);
        } else if (strcmp(a, "--level") == 0 || strcmp(a, "-l") == 0) {
            if (int_value(a, val, 0, &v) != 0) return KST_EXIT_USAGE;
            o.relevance_level = (int)v;
            i++;
        } else if (strcmp(a, "--max-per-query") == 0 || strcmp(a, "-M") == 0) {
            if (int_value(a, val, 1, &v) != 0) return KST_EXIT_USAGE;
            o.max_per_query = (size_t)v;
            i++;
        } else if (strcmp(a, "--digits") == 0) {
            if (int_value(a, val, 0, &digits) != 0 || digits > 17) {
                if (digits > 17) fprintf(stderr, "kestrel eval: --digits expects 0..17\n");
                return KST_EXIT_USAGE;
            }
            i++;
        } else {
            return cli_usage_error("eval", "unknown option \"%s\"", a);
        }
    }
    if (!qrels_path) return cli_usage_error("eval", "--qrels FILE is required");
    if (!run_path && !write_qrels) return cli_usage_error("eval", "--run FILE is required");

    kst_error err = {0};
    kst_metric *metrics = NULL;
    size_t nmetrics = 0;
    int rc = kst_metric_parse_list(metrics_list, &metrics, &nmetrics, &err);
    if (rc == KST_ERR_INVALID) return cli_usage_error("eval", "--metrics: %s", err.msg);
    if (rc != KST_OK) return report(rc, &err);

    kst_qrels *qrels = NULL;
    kst_run *run = NULL;
    kst_eval *ev = NULL;
    int code = 0;
    rc = kst_qrels_read(qrels_path, fmt, &qrels, &err);
    if (rc == KST_OK && write_qrels) rc = kst_qrels_write(qrels, write_qrels, &err);
    if (rc == KST_OK && run_path) rc = kst_run_read(run_path, &run, &err);
    if (rc == KST_OK && run) rc = kst_evaluate(qrels, run, metrics, nmetrics, &o, &ev, &err);
    if (rc != KST_OK) {
        code = report(rc, &err);
        goto done;
    }
    if (!ev) goto done;

    size_t ignored = 0;
    for (size_t k = 0; k < run->nq; k++) ignored += kst_qrels_find(qrels, run->qids[k]) < 0;
    if (ignored)
        fprintf(stderr, "kestrel eval: note: %zu of %zu run queries have no judgments and are "
                        "ignored (as trec_eval does)\n",
                ignored, run->nq);
    size_t evaluated = ev->nq;
    for (size_t k = 0; k < ev->nq; k++) evaluated -= !ev->in_run[k];
    if (qrels->nq > evaluated)
        fprintf(stderr, "kestrel eval: note: %zu of %zu judged queries are missing from the run%s\n",
                qrels->nq - evaluated, qrels->nq,
                o.complete ? " and score 0 (--complete)" : "; --complete averages them in as 0");

    char name[64];
    if (per_query)
        for (size_t k = 0; k < ev->nq; k++)
            for (size_t m = 0; m < nmetrics; m++) {
                kst_metric_name(&metrics[m], name, sizeof name);
                print_row(name, ev->qids[k], ev->values[k * nmetrics + m], (int)digits);
            }
    printf("%-22s\tall\t%s\n", "runid", run->tag);
    printf("%-22s\tall\t%zu\n", "num_q", ev->nq);
    for (size_t m = 0; m < nmetrics; m++) {
        kst_metric_name(&metrics[m], name, sizeof name);
        print_row(name, "all", ev->mean[m], (int)digits);
    }
    if (fflush(stdout) != 0) code = -KST_ERR_IO;
done:
    kst_eval_free(ev);
    kst_run_free(run);
    kst_qrels_free(qrels);
    kst_free(metrics);
    return code < 0 ? -code : code;
}
