/* test_metrics.c - qrels/run readers, the run writer and trec_eval's metrics against pytrec_eval
 * (fixtures by tests/fixtures/fx_eval.py), Cranfield qrels, bad input, allocation failures and the
 * `kestrel eval` command in-process. */
#include "harness.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include "core/mem.h"
#include "rank/metrics.h"
#include "rank/trec.h"

/* The command is tested in-process (main.c registers it separately). */
#include "../api/cli/common.c"
#include "../api/cli/eval.c"

#define FX "tests/fixtures/eval/"

static char tmpdir[64];

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

static const char *tmp_path(const char *name) {
    static char buf[2][256];
    static int which;
    which ^= 1;
    snprintf(buf[which], sizeof buf[which], "%s/%s", tmpdir, name);
    return buf[which];
}

static const char *write_tmp(const char *name, const char *text) {
    const char *p = tmp_path(name);
    FILE *fp = fopen(p, "wb");
    if (!fp) fail_msg("cannot create %s", p);
    fputs(text, fp);
    fclose(fp);
    return p;
}

/* The metrics fx_eval.py writes, by their printed names. */
static const char *ALL_METRICS =
    "recip_rank.10,ndcg_cut.10,recall.100,recall.1000,map,recip_rank,P.10";

static kst_qrels *load_qrels(const char *path, kst_qrels_format f) {
    kst_error err = {0};
    kst_qrels *q = NULL;
    assert_ok(kst_qrels_read(path, f, &q, &err), &err);
    return q;
}

static kst_run *load_run(const char *path) {
    kst_error err = {0};
    kst_run *r = NULL;
    assert_ok(kst_run_read(path, &r, &err), &err);
    return r;
}

/* Index of qid in the evaluation, or -1. */
static long eval_row(const kst_eval *e, const char *qid) {
    for (size_t k = 0; k < e->nq; k++)
        if (strcmp(e->qids[k], qid) == 0) return (long)k;
    return -1;
}

/* Compares every expected.tsv row of (case, level) with the evaluation. Tolerance 1e-12 absolute:
 * each value is the same double arithmetic as trec_eval's in the same order; only the means may
 * be summed in another order. Returns the number of rows checked. */
static size_t check_against_reference(const char *cas, int level, const kst_eval *e,
                                      const kst_eval *complete) {
    char **lines;
    size_t n = read_lines(FX "expected.tsv", &lines), checked = 0;
    char name[64];
    for (size_t i = 0; i < n; i++) {
        char c[32], metric[32], qid[64];
        int lv;
        double want;
        if (lines[i][0] == '#') continue;
        if (sscanf(lines[i], "%31[^\t]\t%d\t%31[^\t]\t%63[^\t]\t%lf", c, &lv, metric, qid, &want) != 5)
            fail_msg("expected.tsv line %zu unreadable", i + 1);
        if (strcmp(c, cas) != 0 || lv != level) continue;
        const kst_eval *src = strcmp(qid, "all_complete") == 0 ? complete : e;
        size_t m = 0;
        for (; m < src->nmetrics; m++) {
            kst_metric_name(&src->metrics[m], name, sizeof name);
            if (strcmp(name, metric) == 0) break;
        }
        if (m == src->nmetrics) fail_msg("metric %s not computed", metric);
        double got;
        if (strncmp(qid, "all", 3) == 0) {
            got = src->mean[m];
        } else {
            long k = eval_row(src, qid);
            if (k < 0) fail_msg("%s level %d: query %s not evaluated", cas, level, qid);
            got = src->values[(size_t)k * src->nmetrics + m];
        }
        if (!(fabs(got - want) <= 1e-12))
            fail_msg("%s level %d %s query %s: got %.17g want %.17g (pytrec_eval)", cas, level,
                     metric, qid, got, want);
        checked++;
    }
    free_lines(lines, n);
    return checked;
}

static void evaluate_case(const char *cas, const char *qrels_path, kst_qrels_format f,
                          const char *run_path, int level, size_t expect_rows) {
    kst_error err = {0};
    kst_qrels *q = load_qrels(qrels_path, f);
    kst_run *r = load_run(run_path);
    kst_metric *ms = NULL;
    size_t nm = 0;
    assert_ok(kst_metric_parse_list(ALL_METRICS, &ms, &nm, &err), &err);
    kst_eval_opts o = kst_eval_opts_default();
    o.relevance_level = level;
    kst_eval *e = NULL, *c = NULL;
    assert_ok(kst_evaluate(q, r, ms, nm, &o, &e, &err), &err);
    o.complete = 1;
    assert_ok(kst_evaluate(q, r, ms, nm, &o, &c, &err), &err);
    assert_int_equal(c->nq, q->nq);
    size_t rows = check_against_reference(cas, level, e, c);
    assert_int_equal(rows, expect_rows);
    kst_eval_free(e);
    kst_eval_free(c);
    kst_free(ms);
    kst_run_free(r);
    kst_qrels_free(q);
}

/* ---------------------------------------------------------------------------------------------
 * Against pytrec_eval
 * ------------------------------------------------------------------------------------------- */

static void test_reference_cases(void **state) {
    (void)state;
    /* 8 evaluated queries x 7 metrics + 7 x (all, all_complete) = 70 rows per level. */
    for (int level = 1; level <= 2; level++) {
        evaluate_case("cases", FX "cases.qrels", KST_QRELS_AUTO, FX "cases.run", level, 70);
        evaluate_case("cases", FX "cases.beir.tsv", KST_QRELS_AUTO, FX "cases.run", level, 70);
        evaluate_case("cases", FX "cases.beir.tsv", KST_QRELS_BEIR, FX "cases.run", level, 70);
    }
}

static void test_reference_random(void **state) {
    (void)state;
    /* 16 queries x 7 + 14 = 126 rows per level; the run is gzipped and has two queries past
     * 1000 documents (recall_1000 and map differ there). */
    evaluate_case("random", FX "random.qrels", KST_QRELS_TREC, FX "random.run.gz", 1, 126);
    evaluate_case("random", FX "random.qrels", KST_QRELS_AUTO, FX "random.run.gz", 3, 126);
}

/* The rules checked by hand (the numbers in the fixture's comments). */
static void test_hand_checked(void **state) {
    (void)state;
    kst_error err = {0};
    kst_qrels *q = load_qrels(FX "cases.qrels", KST_QRELS_AUTO);
    kst_run *r = load_run(FX "cases.run");
    /* Ties broken by docid descending (strcmp): d5 d4 d3 d2 d10 d1, then d7 (lower score). */
    long t = kst_run_find(r, "ties");
    assert_true(t >= 0);
    const char *want[] = {"d5", "d4", "d3", "d2", "d10", "d1", "d7"};
    assert_int_equal(r->off[t + 1] - r->off[t], 7);
    for (size_t i = 0; i < 7; i++) assert_string_equal(r->docids[r->off[t] + i], want[i]);
    /* The rank field is ignored: by score k4 (0.95) k1 k2 k3 k5. */
    long k = kst_run_find(r, "rank");
    const char *by_score[] = {"k4", "k1", "k2", "k3", "k5"};
    for (size_t i = 0; i < 5; i++) assert_string_equal(r->docids[r->off[k] + i], by_score[i]);
    /* Query ids in strcmp order ("10" before "9"); interleaved lines grouped. */
    assert_string_equal(r->qids[0], "10");
    assert_string_equal(r->qids[1], "9");
    assert_int_equal(r->off[1] - r->off[0], 2);
    assert_string_equal(r->tag, "cases");
    assert_true(kst_run_find(r, "nope") < 0);
    assert_true(kst_qrels_find(q, "qrelsonly") >= 0);

    kst_metric ms[3];
    assert_ok(kst_metric_parse("MRR@10", &ms[0], &err), &err);
    assert_ok(kst_metric_parse("map", &ms[1], &err), &err);
    assert_ok(kst_metric_parse("recall_1000", &ms[2], &err), &err);
    kst_eval *e = NULL;
    assert_ok(kst_evaluate(q, r, ms, 3, NULL, &e, &err), &err);
    /* Queries in both files: runonly and qrelsonly are out. */
    assert_int_equal(e->nq, 8);
    assert_true(eval_row(e, "runonly") < 0 && eval_row(e, "qrelsonly") < 0);
    long ti = eval_row(e, "ties");
    /* ties: relevant d2, d10, d7 at ranks 4, 5, 7: rr 1/4; AP (1/4 + 2/5 + 3/7) / 3. */
    assert_true(fabs(e->values[ti * 3 + 0] - 0.25) < 1e-15);
    assert_true(fabs(e->values[ti * 3 + 1] - (0.25 + 0.4 + 3.0 / 7) / 3) < 1e-15);
    /* big: relevant at 50, 150, 999, 1000, 1001, 1400 and 2 unretrieved: 4 of 8 by 1000; the
     * first at 50 is past 10, so MRR@10 is 0 though recip_rank is 1/50. */
    long bi = eval_row(e, "big");
    assert_true(e->values[bi * 3 + 0] == 0.0);
    assert_true(fabs(e->values[bi * 3 + 2] - 0.5) < 1e-15);
    /* norel scores 0 and is averaged in. */
    long ni = eval_row(e, "norel");
    assert_true(ni >= 0 && e->values[ni * 3 + 1] == 0.0);
    kst_eval_free(e);

    /* -M 1000 drops big's ranks past 1000: AP loses 1001 and 1400. */
    kst_eval_opts o = kst_eval_opts_default();
    o.max_per_query = 1000;
    assert_ok(kst_evaluate(q, r, ms, 3, &o, &e, &err), &err);
    double ap = (1.0 / 50 + 2.0 / 150 + 3.0 / 999 + 4.0 / 1000) / 8;
    assert_true(fabs(e->values[eval_row(e, "big") * 3 + 1] - ap) < 1e-15);
    kst_eval_free(e);
    kst_run_free(r);
    kst_qrels_free(q);
}

/* nDCG@10 on a hand-made query: gains 3 at rank 1 and 2 at rank 3, ideal 3, 2, 1. */
static void test_ndcg_by_hand(void **state) {
    (void)state;
    int ranked[] = {3, -1, 2, 0};
    int gains[] = {3, 2, 1};
    kst_query_rels q = {ranked, 4, gains, 3, 3};
    kst_metric m = {KST_METRIC_NDCG_CUT, 10};
    double dcg = 3 + 2 / log2(4.0), idcg = 3 + 2 / log2(3.0) + 1 / log2(4.0);
    assert_true(fabs(kst_metric_value(&m, &q, 1) - dcg / idcg) < 1e-15);
    m.cutoff = 1; /* only rank 1: 3 / 3 */
    assert_true(fabs(kst_metric_value(&m, &q, 1) - 1.0) < 1e-15);
    kst_metric p = {KST_METRIC_P, 10};
    assert_true(fabs(kst_metric_value(&p, &q, 2) - 0.2) < 1e-15);
    /* Level 0: judged 0 counts as relevant, unjudged (-1) does not. */
    assert_true(fabs(kst_metric_value(&p, &q, 0) - 0.3) < 1e-15);
}

/* ---------------------------------------------------------------------------------------------
 * Formats
 * ------------------------------------------------------------------------------------------- */

static void assert_same_qrels(const kst_qrels *a, const kst_qrels *b) {
    assert_int_equal(a->nq, b->nq);
    assert_int_equal(a->n, b->n);
    for (size_t k = 0; k < a->nq; k++) {
        assert_string_equal(a->qids[k], b->qids[k]);
        assert_int_equal(a->off[k], b->off[k]);
    }
    for (size_t j = 0; j < a->n; j++) {
        assert_string_equal(a->docids[j], b->docids[j]);
        assert_int_equal(a->rel[j], b->rel[j]);
    }
}

static void test_beir_equals_trec(void **state) {
    (void)state;
    kst_qrels *t = load_qrels(FX "cases.qrels", KST_QRELS_TREC);
    kst_qrels *b = load_qrels(FX "cases.beir.tsv", KST_QRELS_AUTO);
    assert_same_qrels(t, b);
    /* Negative and zero values are kept as read. */
    long k = kst_qrels_find(t, "neg");
    assert_int_equal(t->rel[t->off[k]], -1);     /* n1 */
    assert_int_equal(t->rel[t->off[k] + 3], -2); /* n4 */
    /* Write as TREC, read back: the same. */
    kst_error err = {0};
    assert_ok(kst_qrels_write(b, tmp_path("w.qrels"), &err), &err);
    kst_qrels *w = load_qrels(tmp_path("w.qrels"), KST_QRELS_AUTO);
    assert_same_qrels(t, w);
    kst_qrels_free(w);
    kst_qrels_free(b);
    kst_qrels_free(t);
}

static void test_cranfield_sample(void **state) {
    (void)state;
    kst_error err = {0};
    kst_qrels *q = NULL;
    assert_ok(kst_qrels_read_cranfield(FX "cranqrel.sample", &q, &err), &err);
    /* 1 184 2 -> 3; 1 29 2 -> 3; 1 31 2 -> 3; 1 57 -1 -> 0; 2 12 3 -> 2; 2 15 1 -> 4;
     * 2 184 4 -> 1; 10 3 -1 -> 0 (last line without newline, trailing space). */
    assert_int_equal(q->nq, 3);
    assert_int_equal(q->n, 8);
    assert_string_equal(q->qids[0], "1");
    assert_string_equal(q->qids[1], "10");
    assert_string_equal(q->qids[2], "2");
    const char *d1[] = {"184", "29", "31", "57"};
    const int g1[] = {3, 3, 3, 0};
    for (size_t j = 0; j < 4; j++) {
        assert_string_equal(q->docids[j], d1[j]);
        assert_int_equal(q->rel[j], g1[j]);
    }
    assert_int_equal(q->rel[q->off[1]], 0);
    const char *d2[] = {"12", "15", "184"};
    const int g2[] = {2, 4, 1};
    for (size_t j = 0; j < 3; j++) {
        assert_string_equal(q->docids[q->off[2] + j], d2[j]);
        assert_int_equal(q->rel[q->off[2] + j], g2[j]);
    }
    /* Converted file reads back as TREC qrels. */
    assert_ok(kst_qrels_write(q, tmp_path("cran.qrels"), &err), &err);
    kst_qrels *t = load_qrels(tmp_path("cran.qrels"), KST_QRELS_AUTO);
    assert_same_qrels(q, t);
    kst_qrels_free(t);
    kst_qrels_free(q);
}

/* The real cranqrel: counts from ../shared/data/README.md (1:128, 2:387, 3:734, 4:363, -1:225;
 * 1,837 lines; 225 queries). */
static void test_cranfield_real(void **state) {
    (void)state;
    char path[4096];
    snprintf(path, sizeof path, "%s", shared_path("cranfield/cranqrel"));
    if (access(path, R_OK) != 0) skip_because("no %s", path);
    kst_error err = {0};
    kst_qrels *q = NULL;
    assert_ok(kst_qrels_read_cranfield(path, &q, &err), &err);
    assert_int_equal(q->nq, 225);
    assert_int_equal(q->n, 1837);
    size_t count[5] = {0};
    for (size_t j = 0; j < q->n; j++) {
        assert_true(q->rel[j] >= 0 && q->rel[j] <= 4);
        count[q->rel[j]]++;
    }
    assert_int_equal(count[4], 128); /* code 1 */
    assert_int_equal(count[3], 387); /* code 2 */
    assert_int_equal(count[2], 734); /* code 3 */
    assert_int_equal(count[1], 363); /* code 4 */
    assert_int_equal(count[0], 225); /* code -1 */
    assert_true(kst_qrels_find(q, "225") >= 0 && kst_qrels_find(q, "226") < 0);
    kst_qrels_free(q);
}

static void test_run_writer_round_trip(void **state) {
    (void)state;
    kst_error err = {0};
    kst_run_writer w;
    char path[256];
    snprintf(path, sizeof path, "%s", tmp_path("w.run"));
    assert_ok(kst_run_writer_open(&w, path, "kestrel", &err), &err);
    /* Scores that %.6f would merge (1.0000001 vs 1.0000002) must read back distinct. */
    const char *d1[] = {"a", "b", "c", "d"};
    double s1[] = {1.0000002, 1.0000001, 1.0000001, -3e-20};
    assert_ok(kst_run_writer_add(&w, "q1", d1, s1, 4, &err), &err);
    const char *d2[] = {"x"};
    double s2[] = {0.1};
    assert_ok(kst_run_writer_add(&w, "q2", d2, s2, 1, &err), &err);
    /* Refused, and nothing written for it: increasing scores, a docid with a space. */
    double up[] = {1, 2};
    assert_int_equal(kst_run_writer_add(&w, "q3", d1, up, 2, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "non-increasing");
    const char *bad[] = {"has space"};
    assert_int_equal(kst_run_writer_add(&w, "q3", bad, s2, 1, &err), KST_ERR_INVALID);
    assert_int_equal(kst_run_writer_add(&w, "", d2, s2, 1, &err), KST_ERR_INVALID);
    assert_int_equal(access(path, F_OK), -1); /* not there until finish */
    assert_ok(kst_run_writer_finish(&w, &err), &err);
    kst_run *r = load_run(path);
    assert_int_equal(r->nq, 2);
    assert_int_equal(r->n, 5);
    assert_string_equal(r->tag, "kestrel");
    /* Ties c/b at 1.0000001: docid descending, c first. */
    const char *order[] = {"a", "c", "b", "d", "x"};
    const double sc[] = {1.0000002, 1.0000001, 1.0000001, -3e-20, 0.1};
    for (size_t i = 0; i < 5; i++) {
        assert_string_equal(r->docids[i], order[i]);
        assert_true(r->scores[i] == sc[i]);
    }
    kst_run_free(r);
    char **lines;
    size_t n = read_lines(path, &lines);
    assert_int_equal(n, 5);
    assert_string_equal(lines[0], "q1 Q0 a 1 1.0000002 kestrel");
    assert_string_equal(lines[4], "q2 Q0 x 1 0.1 kestrel");
    free_lines(lines, n);
    /* Abort leaves nothing behind. */
    assert_ok(kst_run_writer_open(&w, tmp_path("aborted.run"), "t", &err), &err);
    assert_ok(kst_run_writer_add(&w, "q", d2, s2, 1, &err), &err);
    kst_run_writer_abort(&w);
    assert_int_equal(access(tmp_path("aborted.run"), F_OK), -1);
    assert_int_equal(kst_run_writer_open(&w, path, "two words", &err), KST_ERR_INVALID);
}

/* ---------------------------------------------------------------------------------------------
 * Bad input
 * ------------------------------------------------------------------------------------------- */

static void expect_run_error(const char *text, int code, const char *needle) {
    const char *p = write_tmp("bad.run", text);
    kst_error err = {0};
    kst_run *r = (kst_run *)1;
    assert_int_equal(kst_run_read(p, &r, &err), code);
    assert_null(r);
    assert_msg_has(err.msg, needle);
}

static void expect_qrels_error(const char *text, kst_qrels_format f, int code, const char *needle) {
    const char *p = write_tmp("bad.qrels", text);
    kst_error err = {0};
    kst_qrels *q = (kst_qrels *)1;
    assert_int_equal(kst_qrels_read(p, f, &q, &err), code);
    assert_null(q);
    assert_msg_has(err.msg, needle);
}

static void test_bad_runs(void **state) {
    (void)state;
    expect_run_error("1 Q0 a 1 2.0 t\n1 Q0 b 2\n", KST_ERR_FORMAT,
                     "bad.run line 2: expected 6 fields (qid Q0 docid rank score tag), found 4");
    expect_run_error("# c\n\n1 Q0 a 1 high t\n", KST_ERR_FORMAT,
                     "bad.run line 3: expected a finite number as the score");
    expect_run_error("1 Q0 a 1 nan t\n", KST_ERR_FORMAT, "found \"nan\"");
    expect_run_error("1 Q0 a 1 1e999 t\n", KST_ERR_FORMAT, "line 1: expected a finite number");
    expect_run_error("1 Q0 a 1 2 t\n2 Q0 a 1 2 t\n1 Q0 a 2 1 t\n", KST_ERR_FORMAT,
                     "line 3: document \"a\" appears twice for query \"1\" (first at line 1)");
    expect_run_error("# only a comment\n\n", KST_ERR_FORMAT, "no results found");
    expect_run_error("", KST_ERR_FORMAT, "no results found");
    /* Extra fields after the tag are ignored, as trec_eval does; CRLF accepted. */
    const char *p = write_tmp("ok.run", "1 Q0 a 1 2 t extra\r\n1 Q0 b 2 +3.5 t2\r\n");
    kst_run *r = load_run(p);
    assert_string_equal(r->docids[0], "b");
    assert_string_equal(r->tag, "t2"); /* the last line's, as trec_eval keeps it */
    kst_run_free(r);

    kst_error err = {0};
    kst_run *none = NULL;
    assert_int_equal(kst_run_read(tmp_path("missing.run"), &none, &err), KST_ERR_NOTFOUND);
    assert_msg_has(err.msg, "missing.run: cannot open");
    /* A truncated gzip stream. */
    gzFile gz = gzopen(tmp_path("cut.run.gz"), "wb");
    for (int i = 0; i < 2000; i++) gzprintf(gz, "1 Q0 d%d %d %d t\n", i, i + 1, 5000 - i);
    gzclose(gz);
    FILE *fp = fopen(tmp_path("cut.run.gz"), "r+b");
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fclose(fp);
    assert_int_equal(truncate(tmp_path("cut.run.gz"), size / 2), 0);
    assert_int_not_equal(kst_run_read(tmp_path("cut.run.gz"), &none, &err), KST_OK);
    assert_msg_has(err.msg, "cut.run.gz line");
}

static void test_bad_qrels(void **state) {
    (void)state;
    expect_qrels_error("1 0 a 1\n1 0 b\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "bad.qrels line 2: expected 4 fields (qid iter docid rel), found 3");
    expect_qrels_error("1 0 a 1\n1 0 b 1 x\n", KST_QRELS_TREC, KST_ERR_FORMAT, "found 5");
    expect_qrels_error("1 0 a 1.5\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "line 1: expected an integer relevance, found \"1.5\"");
    expect_qrels_error("1 0 a high\n", KST_QRELS_AUTO, KST_ERR_FORMAT, "found \"high\"");
    expect_qrels_error("1 0 a 1\n2 0 a 1\n1 Q0 a 0\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "line 3: document \"a\" appears twice for query \"1\" (first at line 1)");
    expect_qrels_error("\n# nothing\n", KST_QRELS_AUTO, KST_ERR_FORMAT, "no judgments");
    expect_qrels_error("query-id\tcorpus-id\tscore\n1\ta\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "line 2: expected 3 tab-separated fields (query-id corpus-id score), found 2");
    expect_qrels_error("query-id\tcorpus-id\tscore\n1\ta\t0.5\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "line 2: expected an integer relevance score, found \"0.5\"");
    expect_qrels_error("query-id\tcorpus-id\tscore\n\ta\t1\n", KST_QRELS_AUTO, KST_ERR_FORMAT,
                       "line 2: empty query-id");
    expect_qrels_error("1\ta\t1\n", KST_QRELS_BEIR, KST_ERR_FORMAT, "line 1: expected the BEIR header");
    expect_qrels_error("1 184 5 \n", KST_QRELS_CRANFIELD, KST_ERR_FORMAT,
                       "line 1: expected a relevance code 1..4 or -1, found \"5\"");
    expect_qrels_error("1 184 0 \n", KST_QRELS_CRANFIELD, KST_ERR_FORMAT, "found \"0\"");
    expect_qrels_error("1 0 184 2\n", KST_QRELS_CRANFIELD, KST_ERR_FORMAT,
                       "expected 3 fields (qid docid code)");
    expect_qrels_error("q1 184 2\n", KST_QRELS_CRANFIELD, KST_ERR_FORMAT,
                       "expected positive integer query and document numbers");
    /* cranqrel read as TREC: the hint names the cranfield format. */
    expect_qrels_error("1 184 2 \n", KST_QRELS_AUTO, KST_ERR_FORMAT, "cranfield format");
}

static void test_bad_metrics_and_eval(void **state) {
    (void)state;
    kst_error err = {0};
    kst_metric m;
    const char *bad[] = {"ndcg", "foo", "map@10", "recall.0", "P.-1", "recall.x", "", "R"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(kst_metric_parse(bad[i], &m, &err), KST_ERR_INVALID);
        assert_msg_has(err.msg, bad[i]);
    }
    const struct {
        const char *name, *printed;
    } ok[] = {{"MAP", "map"},          {"mrr", "recip_rank"},       {"MRR@10", "recip_rank_10"},
              {"nDCG@10", "ndcg_cut_10"}, {"ndcg_cut_20", "ndcg_cut_20"}, {"R@100", "recall_100"},
              {"Recall@1000", "recall_1000"}, {"P@5", "P_5"},        {"P.10", "P_10"}};
    char name[64];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        assert_ok(kst_metric_parse(ok[i].name, &m, &err), &err);
        kst_metric_name(&m, name, sizeof name);
        assert_string_equal(name, ok[i].printed);
    }
    kst_metric *ms;
    size_t n;
    assert_int_equal(kst_metric_parse_list("map,,P@5", &ms, &n, &err), KST_ERR_INVALID);
    assert_int_equal(kst_metric_parse_list("map,MAP", &ms, &n, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "twice");

    kst_qrels *q = load_qrels(FX "cases.qrels", KST_QRELS_AUTO);
    kst_run *r = load_run(write_tmp("other.run", "zz Q0 a 1 1 t\n"));
    kst_eval *e = NULL;
    m = (kst_metric){KST_METRIC_MAP, 0};
    assert_int_equal(kst_evaluate(q, r, &m, 1, NULL, &e, &err), KST_ERR_NOTFOUND);
    assert_msg_has(err.msg, "no query is in both");
    assert_null(e);
    kst_eval_opts o = kst_eval_opts_default();
    o.complete = 1; /* every qrels query scores 0 */
    assert_ok(kst_evaluate(q, r, &m, 1, &o, &e, &err), &err);
    assert_int_equal(e->nq, q->nq);
    assert_true(e->mean[0] == 0.0);
    kst_eval_free(e);
    o = kst_eval_opts_default();
    o.relevance_level = -1;
    assert_int_equal(kst_evaluate(q, r, &m, 1, &o, &e, &err), KST_ERR_INVALID);
    assert_int_equal(kst_evaluate(q, r, &m, 0, NULL, &e, &err), KST_ERR_INVALID);
    kst_metric p0 = {KST_METRIC_P, 0}; /* P needs a cutoff (it divides by it) */
    assert_int_equal(kst_evaluate(q, r, &p0, 1, NULL, &e, &err), KST_ERR_INVALID);
    kst_run_free(r);
    kst_qrels_free(q);
}

/* ---------------------------------------------------------------------------------------------
 * Allocation failures: every allocation in turn fails cleanly (ASan checks for leaks)
 * ------------------------------------------------------------------------------------------- */

static void test_alloc_failures(void **state) {
    (void)state;
    int done = 0;
    for (long nth = 1; !done && nth < 10000; nth++) {
        kst_error err = {0};
        kst_qrels *q = NULL, *c = NULL;
        kst_run *r = NULL;
        kst_eval *e = NULL;
        kst_metric *ms = NULL;
        size_t nm = 0;
        kst_run_writer w;
        const char *d[] = {"a", "b"};
        double s[] = {2, 1};
        kst_mem_fail_after(nth);
        int rc = kst_qrels_read(FX "random.qrels", KST_QRELS_AUTO, &q, &err);
        if (rc == KST_OK) rc = kst_qrels_read_cranfield(FX "cranqrel.sample", &c, &err);
        if (rc == KST_OK) rc = kst_run_read(FX "random.run.gz", &r, &err);
        if (rc == KST_OK) rc = kst_metric_parse_list(ALL_METRICS, &ms, &nm, &err);
        if (rc == KST_OK) rc = kst_evaluate(q, r, ms, nm, NULL, &e, &err);
        if (rc == KST_OK) rc = kst_run_writer_open(&w, tmp_path("nomem.run"), "t", &err);
        if (rc == KST_OK) {
            rc = kst_run_writer_add(&w, "q", d, s, 2, &err);
            if (rc == KST_OK) rc = kst_run_writer_finish(&w, &err);
            else kst_run_writer_abort(&w);
        }
        kst_mem_fail_after(0);
        if (rc == KST_OK) {
            done = 1;
            fprintf(stderr, "[          ] succeeded once allocation %ld could succeed\n", nth - 1);
        }
        else if (rc != KST_ERR_NOMEM) fail_msg("allocation %ld: %s", nth, err.msg);
        kst_eval_free(e);
        kst_free(ms);
        kst_run_free(r);
        kst_qrels_free(c);
        kst_qrels_free(q);
    }
    assert_true(done);
}

/* ---------------------------------------------------------------------------------------------
 * `kestrel eval`, in-process
 * ------------------------------------------------------------------------------------------- */

/* Runs cmd_eval with stdout and stderr sent to files; returns the exit code. */
static int run_eval(const char *const *args, size_t n) {
    char *argv[32];
    argv[0] = "eval";
    for (size_t i = 0; i < n; i++) argv[i + 1] = (char *)args[i];
    fflush(stdout);
    fflush(stderr);
    int so = dup(1), se = dup(2);
    int fo = open(tmp_path("eval.out"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int fe = open(tmp_path("eval.err"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fo, 1);
    dup2(fe, 2);
    int code = cmd_eval((int)n + 1, argv);
    fflush(stdout);
    fflush(stderr);
    dup2(so, 1);
    dup2(se, 2);
    close(so);
    close(se);
    close(fo);
    close(fe);
    return code;
}

static char *slurp(const char *path) {
    kst_error err = {0};
    char *s = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) fail_msg("no %s", path);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    s = kst_malloc((size_t)n + 1, 1, "slurp", &err);
    assert_int_equal(fread(s, 1, (size_t)n, fp), (size_t)n);
    s[n] = '\0';
    fclose(fp);
    return s;
}

static void test_cli(void **state) {
    (void)state;
    const char *a1[] = {"--qrels", FX "cases.qrels", "--run", FX "cases.run"};
    assert_int_equal(run_eval(a1, 4), 0);
    char *out = slurp(tmp_path("eval.out"));
    /* trec_eval's layout: name padded to 22, tab, qid, tab, value with 4 decimals. */
    assert_msg_has(out, "runid                 \tall\tcases\n");
    assert_msg_has(out, "num_q                 \tall\t8\n");
    assert_msg_has(out, "recip_rank_10         \tall\t0.3750\n");
    assert_msg_has(out, "ndcg_cut_10           \tall\t0.3973\n");
    assert_msg_has(out, "recall_100            \tall\t0.6781\n");
    assert_msg_has(out, "recall_1000           \tall\t0.7250\n");
    assert_msg_has(out, "map                   \tall\t0.3159\n");
    kst_free(out);
    out = slurp(tmp_path("eval.err"));
    assert_msg_has(out, "1 of 9 run queries have no judgments");
    kst_free(out);

    const char *a2[] = {"--qrels", FX "cases.beir.tsv", "--run", FX "cases.run", "-q",
                        "--metrics", "MRR@10,P@10", "--digits", "6", "-c"};
    assert_int_equal(run_eval(a2, 10), 0);
    out = slurp(tmp_path("eval.out"));
    assert_msg_has(out, "recip_rank_10         \tties\t0.250000\n");
    assert_msg_has(out, "P_10                  \tqrelsonly\t0.000000\n");
    assert_msg_has(out, "num_q                 \tall\t9\n");
    assert_msg_has(out, "recip_rank_10         \tall\t0.333333\n");
    kst_free(out);

    /* The Cranfield converter. */
    char conv[256];
    snprintf(conv, sizeof conv, "%s", tmp_path("conv.qrels")); /* tmp_path's buffers rotate */
    const char *a3[] = {"--qrels", FX "cranqrel.sample", "--qrels-format", "cranfield",
                        "--write-qrels", conv};
    assert_int_equal(run_eval(a3, 6), 0);
    out = slurp(conv);
    assert_string_equal(out, "1 0 184 3\n1 0 29 3\n1 0 31 3\n1 0 57 0\n10 0 3 0\n"
                             "2 0 12 2\n2 0 15 4\n2 0 184 1\n");
    kst_free(out);

    /* Exit codes: usage 64, missing file 5, malformed 3. */
    const char *u1[] = {"--run", FX "cases.run"};
    assert_int_equal(run_eval(u1, 2), KST_EXIT_USAGE);
    const char *u2[] = {"--qrels", FX "cases.qrels", "--run", FX "cases.run", "--metrics", "foo"};
    assert_int_equal(run_eval(u2, 6), KST_EXIT_USAGE);
    const char *u3[] = {"--qrels", FX "cases.qrels", "--run", FX "cases.run", "--level", "-1"};
    assert_int_equal(run_eval(u3, 6), KST_EXIT_USAGE);
    const char *u4[] = {"--qrels", FX "cases.qrels", "--run", "nope.run"};
    assert_int_equal(run_eval(u4, 4), -KST_ERR_NOTFOUND);
    char bad[256];
    snprintf(bad, sizeof bad, "%s", write_tmp("cli_bad.run", "1 Q0 a 1\n"));
    const char *u5[] = {"--qrels", FX "cases.qrels", "--run", bad};
    assert_int_equal(run_eval(u5, 4), -KST_ERR_FORMAT);
    out = slurp(tmp_path("eval.err"));
    assert_msg_has(out, "kestrel eval: ");
    assert_msg_has(out, "cli_bad.run line 1: expected 6 fields");
    kst_free(out);
    const char *h[] = {"--help"};
    assert_int_equal(run_eval(h, 1), 0);
    out = slurp(tmp_path("eval.out"));
    assert_msg_has(out, "usage: kestrel eval");
    kst_free(out);
}

/* ---------------------------------------------------------------------------------------------
 * Runner
 * ------------------------------------------------------------------------------------------- */

static int setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kst_test_metrics.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_cases),
        cmocka_unit_test(test_reference_random),
        cmocka_unit_test(test_hand_checked),
        cmocka_unit_test(test_ndcg_by_hand),
        cmocka_unit_test(test_beir_equals_trec),
        cmocka_unit_test(test_cranfield_sample),
        cmocka_unit_test(test_cranfield_real),
        cmocka_unit_test(test_run_writer_round_trip),
        cmocka_unit_test(test_bad_runs),
        cmocka_unit_test(test_bad_qrels),
        cmocka_unit_test(test_bad_metrics_and_eval),
        cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_cli),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
