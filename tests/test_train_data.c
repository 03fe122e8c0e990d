/* test_train_data.c - teacher-score readers (train/teacher): the three formats and gzip, file
 * order, seeded shuffling (same seed = same order, different seed = different, every record
 * once), resume equality at many stopping points, every malformed-row error, and allocation
 * failures on the maps and readers. Fixtures: the .tsv, .tsv.gz and .jsonl files in tests/fixtures/train (hand-written,
 * small); bad inputs are written to a temp folder by the tests. */
#include "harness.h"

#include <unistd.h>

#include "core/mem.h"
#include "train/teacher.h"

#define FX "tests/fixtures/train"

static char g_tmp[256];
static kst_textmap *g_q, *g_c;

static const char *tmp_file(const char *name, const char *content) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_tmp, name);
    FILE *fp = fopen(buf[k], "wb");
    if (!fp) fail_msg("cannot create %s", buf[k]);
    fputs(content, fp);
    fclose(fp);
    return buf[k];
}

static kst_teacher_opts opts_for(kst_teacher_format f, size_t K, uint64_t seed) {
    kst_teacher_opts o = {0};
    o.format = f;
    o.queries = g_q;
    o.collection = g_c;
    o.shuffle_buffer = K;
    o.seed = seed;
    return o;
}

/* Reads up to max records (all when max == 0) and appends their line numbers to lines[];
 * also checks each record's shape. Returns how many were read. */
static size_t drain(kst_teacher *r, size_t *lines, size_t max) {
    size_t n = 0;
    kst_error err;
    for (;;) {
        if (max && n == max) break;
        kst_teacher_record rec;
        assert_ok(kst_teacher_next(r, &rec, &err), &err);
        if (!rec.query) break;
        assert_true(rec.n >= 2);
        for (size_t i = 0; i < rec.n; i++) {
            assert_non_null(rec.passages[i]);
            assert_int_equal(strlen(rec.passages[i]), rec.passage_lens[i]);
            assert_true(isfinite(rec.scores[i]));
        }
        lines[n++] = rec.line;
    }
    return n;
}

static size_t read_all(const char *path, const kst_teacher_opts *o, size_t *lines) {
    kst_teacher *r;
    kst_error err;
    assert_ok(kst_teacher_open(path, o, NULL, &r, &err), &err);
    size_t n = drain(r, lines, 0);
    kst_teacher_close(r);
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * Formats
 * ------------------------------------------------------------------------------------------- */

static void test_rng(void **state) {
    (void)state;
    /* splitmix64 from 0 then xoshiro256**: reference values computed from the published C code
     * (prng.di.unimi.it): splitmix64(0) first output is 0xe220a8397b1dcdaf. */
    kst_xoshiro a, b;
    kst_xoshiro_seed(&a, 0);
    assert_true(a.s[0] == 0xe220a8397b1dcdafULL);
    assert_true(a.s[1] == 0x6e789e6aa1b965f4ULL);
    kst_xoshiro_seed(&b, 0);
    for (int i = 0; i < 100; i++) assert_true(kst_xoshiro_next(&a) == kst_xoshiro_next(&b));
    size_t hist[5] = {0};
    for (int i = 0; i < 5000; i++) hist[kst_xoshiro_below(&a, 5)]++;
    for (int i = 0; i < 5; i++) assert_true(hist[i] > 850 && hist[i] < 1150);
    assert_int_equal(kst_xoshiro_below(&a, 1), 0);
}

static void test_hofstaetter(void **state) {
    (void)state;
    kst_teacher_opts o = opts_for(KST_TEACHER_HOFSTAETTER, 0, 1);
    kst_teacher *r;
    kst_error err;
    assert_ok(kst_teacher_open(FX "/hofstaetter.tsv", &o, NULL, &r, &err), &err);
    kst_teacher_record rec;
    assert_ok(kst_teacher_next(r, &rec, &err), &err);
    /* line 1: 12.9519 9.1368 q10 116 122 */
    assert_string_equal(rec.query, "what is query number 10");
    assert_int_equal(rec.n, 2);
    assert_string_equal(rec.passages[0], "passage 16 says something about topic 2");
    assert_string_equal(rec.passages[1], "passage 22 says something about topic 1");
    assert_float_equal(rec.scores[0], 12.9519f, 0);
    assert_float_equal(rec.scores[1], 9.1368f, 0);
    assert_int_equal(rec.line, 1);
    size_t lines[64];
    size_t n = drain(r, lines, 0);
    assert_int_equal(n, 24);
    /* file order, the blank line 11 skipped */
    for (size_t i = 0; i < n; i++) assert_int_equal(lines[i], i + 2 + (i + 2 >= 11));
    assert_int_equal(kst_teacher_emitted(r), 25);
    assert_ok(kst_teacher_next(r, &rec, &err), &err); /* the end stays the end */
    assert_null(rec.query);
    kst_teacher_close(r);

    /* gzip gives the same records; --no-shuffle wins over a buffer size */
    size_t a[64], b[64];
    o.shuffle_buffer = 8;
    o.no_shuffle = 1;
    assert_int_equal(read_all(FX "/hofstaetter.tsv.gz", &o, a), 25);
    o.no_shuffle = 0;
    o.shuffle_buffer = 1;
    assert_int_equal(read_all(FX "/hofstaetter.tsv", &o, b), 25);
    assert_memory_equal(a, b, 25 * sizeof *a);
}

static void test_matchmaker_and_nway(void **state) {
    (void)state;
    kst_teacher_opts o = opts_for(KST_TEACHER_MATCHMAKER, 0, 1);
    o.queries = o.collection = NULL; /* not needed */
    kst_teacher *r, *h;
    kst_error err;
    assert_ok(kst_teacher_open(FX "/matchmaker.tsv", &o, NULL, &r, &err), &err);
    kst_teacher_opts oh = opts_for(KST_TEACHER_HOFSTAETTER, 0, 1);
    assert_ok(kst_teacher_open(FX "/hofstaetter.tsv", &oh, NULL, &h, &err), &err);
    /* matchmaker.tsv is hofstaetter.tsv with the texts inline: same records */
    for (int k = 0; k < 25; k++) {
        kst_teacher_record a, b;
        assert_ok(kst_teacher_next(r, &a, &err), &err);
        assert_ok(kst_teacher_next(h, &b, &err), &err);
        assert_non_null(a.query);
        assert_string_equal(a.query, b.query);
        assert_int_equal(a.query_len, b.query_len);
        for (int i = 0; i < 2; i++) {
            assert_string_equal(a.passages[i], b.passages[i]);
            assert_float_equal(a.scores[i], b.scores[i], 0);
        }
    }
    kst_teacher_close(r);
    kst_teacher_close(h);

    kst_teacher_opts on = opts_for(KST_TEACHER_NWAY, 0, 1);
    assert_ok(kst_teacher_open(FX "/nway.jsonl", &on, NULL, &r, &err), &err);
    kst_teacher_record rec;
    assert_ok(kst_teacher_next(r, &rec, &err), &err);
    /* ["q5", ["129", 11.686], ["126", 6.575], ["109", 9.025], ["103", 2.013]] */
    assert_string_equal(rec.query, "what is query number 5");
    assert_int_equal(rec.n, 4);
    assert_string_equal(rec.passages[0], "passage 29 says something about topic 1");
    assert_string_equal(rec.passages[3], "passage 3 says something about topic 3");
    assert_float_equal(rec.scores[0], 11.686f, 0);
    assert_float_equal(rec.scores[3], 2.013f, 0);
    assert_ok(kst_teacher_next(r, &rec, &err), &err); /* integer pids */
    assert_string_equal(rec.passages[0], "passage 8 says something about topic 1");
    assert_float_equal(rec.scores[0], -0.468f, 0);
    kst_teacher_close(r);
    size_t lines[64];
    on.nway = 2; /* the first two pairs, as ColBERT's LazyBatcher */
    assert_ok(kst_teacher_open(FX "/nway.jsonl", &on, NULL, &r, &err), &err);
    assert_ok(kst_teacher_next(r, &rec, &err), &err);
    assert_int_equal(rec.n, 2);
    assert_float_equal(rec.scores[1], 6.575f, 0);
    assert_int_equal(drain(r, lines, 0), 19);
    kst_teacher_close(r);
}

/* ---------------------------------------------------------------------------------------------
 * Shuffling and resuming
 * ------------------------------------------------------------------------------------------- */

static void test_shuffle(void **state) {
    (void)state;
    size_t a[64], b[64], c[64], seen[64] = {0};
    kst_teacher_opts o = opts_for(KST_TEACHER_HOFSTAETTER, 8, 42);
    assert_int_equal(read_all(FX "/hofstaetter.tsv", &o, a), 25);
    assert_int_equal(read_all(FX "/hofstaetter.tsv", &o, b), 25);
    assert_memory_equal(a, b, sizeof(size_t) * 25);
    o.seed = 43;
    assert_int_equal(read_all(FX "/hofstaetter.tsv", &o, c), 25);
    assert_memory_not_equal(a, c, sizeof(size_t) * 25);
    int in_order = 1;
    for (int i = 0; i < 25; i++) {
        seen[a[i]]++;
        if (i && a[i] < a[i - 1]) in_order = 0;
    }
    assert_false(in_order);
    for (size_t l = 1; l <= 26; l++) assert_int_equal(seen[l], l == 11 ? 0 : 1);
    /* a buffer larger than the file is a full shuffle and still yields each record once */
    o.shuffle_buffer = 1000;
    assert_int_equal(read_all(FX "/hofstaetter.tsv", &o, c), 25);
}

/* Reads `stop` records, saves the state, reopens from it and reads the rest; the whole must be
 * what one uninterrupted reader gives. */
static void check_resume(const char *path, kst_teacher_opts o, size_t stop) {
    size_t want[64], got[64];
    size_t total = read_all(path, &o, want);
    kst_teacher *r;
    kst_error err;
    assert_ok(kst_teacher_open(path, &o, NULL, &r, &err), &err);
    size_t n = drain(r, got, stop);
    char *st;
    assert_ok(kst_teacher_state(r, &st, &err), &err);
    kst_teacher_close(r);
    /* Twice from the same state (a state is reusable) */
    for (int rep = 0; rep < 2; rep++) {
        assert_ok(kst_teacher_open(path, &o, st, &r, &err), &err);
        assert_int_equal(kst_teacher_emitted(r), n);
        size_t m = drain(r, got + n, 0);
        kst_teacher_close(r);
        assert_int_equal(n + m, total);
        if (memcmp(got, want, total * sizeof *got)) fail_msg("resume after %zu of %s (K=%zu) differs; state %s", stop, path, o.shuffle_buffer, st);
    }
    kst_free(st);
}

static void test_resume(void **state) {
    (void)state;
    size_t Ks[] = {0, 1, 3, 8, 100}, stops[] = {0, 1, 2, 7, 13, 24, 25};
    for (size_t i = 0; i < sizeof Ks / sizeof *Ks; i++)
        for (size_t j = 0; j < sizeof stops / sizeof *stops; j++) {
            check_resume(FX "/hofstaetter.tsv", opts_for(KST_TEACHER_HOFSTAETTER, Ks[i], 9), stops[j]);
            check_resume(FX "/hofstaetter.tsv.gz", opts_for(KST_TEACHER_HOFSTAETTER, Ks[i], 10), stops[j]);
            kst_teacher_opts m = opts_for(KST_TEACHER_MATCHMAKER, Ks[i], 11);
            check_resume(FX "/matchmaker.tsv", m, stops[j]);
            check_resume(FX "/nway.jsonl", opts_for(KST_TEACHER_NWAY, Ks[i], 12), stops[j] % 21);
        }
    /* A state that does not fit: other buffer size, other format, a shorter file, garbage. */
    kst_teacher_opts o = opts_for(KST_TEACHER_HOFSTAETTER, 4, 1);
    kst_teacher *r;
    kst_error err;
    char *st;
    size_t lines[64];
    assert_ok(kst_teacher_open(FX "/hofstaetter.tsv", &o, NULL, &r, &err), &err);
    drain(r, lines, 20);
    assert_ok(kst_teacher_state(r, &st, &err), &err);
    kst_teacher_close(r);
    o.shuffle_buffer = 5;
    assert_int_equal(kst_teacher_open(FX "/hofstaetter.tsv", &o, st, &r, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "shuffle buffer");
    o.shuffle_buffer = 4;
    o.format = KST_TEACHER_MATCHMAKER;
    assert_int_equal(kst_teacher_open(FX "/hofstaetter.tsv", &o, st, &r, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "format is hofstaetter");
    o.format = KST_TEACHER_HOFSTAETTER;
    const char *shortf = tmp_file("short.tsv", "1\t2\tq1\t100\t101\n");
    assert_int_equal(kst_teacher_open(shortf, &o, st, &r, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "has 1 lines");
    assert_int_equal(kst_teacher_open(FX "/hofstaetter.tsv", &o, "{\"version\": 1}", &r, &err),
                     KST_ERR_INVALID);
    assert_int_equal(kst_teacher_open(FX "/hofstaetter.tsv", &o, "not json", &r, &err), KST_ERR_FORMAT);
    assert_null(r);
    kst_free(st);
}

/* ---------------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------------- */

typedef struct bad_case {
    kst_teacher_format f;
    const char *content;
    const char *needles[3];
} bad_case;

static void test_errors(void **state) {
    (void)state;
    const kst_teacher_format H = KST_TEACHER_HOFSTAETTER, M = KST_TEACHER_MATCHMAKER,
                             N = KST_TEACHER_NWAY;
    static const bad_case cases[] = {
        {H, "", {"has no training rows"}},
        {H, "\n  \n", {"has no training rows"}},
        {N, "", {"has no training rows"}},
        {H, "1\t2\tq1\t100\t101\n1\t2\tq1\t100\n", {"line 2", "missing column 5 (neg_pid)", "found 4"}},
        {H, "1\t2\tq1\n", {"line 1", "missing column 4 (pos_pid)"}},
        {H, "1\t2\tq1\t100\t101\t7\n", {"line 1", "more than 5"}},
        {M, "1\t2\tquery\tpos\n", {"line 1", "missing column 5 (neg_text)"}},
        {H, "1\t2\tq99\t100\t101\n", {"line 1", "unknown qid \"q99\"", "queries.tsv"}},
        {H, "1\t2\tq1\t100\t999\n", {"line 1", "column 5 (neg_pid)", "unknown pid \"999\""}},
        {H, "1\t2\tq1\t77\t101\n", {"column 4 (pos_pid)", "unknown pid \"77\"", "collection.tsv"}},
        {H, "nan\t2\tq1\t100\t101\n", {"line 1", "column 1 (pos_score)", "must be finite"}},
        {H, "1\tinf\tq1\t100\t101\n", {"column 2 (neg_score)", "must be finite"}},
        {H, "1\t1e39\tq1\t100\t101\n", {"column 2 (neg_score)", "out of float range"}},
        {M, "abc\t2\tq\tp\tn\n", {"line 1", "column 1 (pos_score)", "\"abc\" is not a number"}},
        {M, "1.5x\t2\tq\tp\tn\n", {"\"1.5x\" is not a number"}},
        {M, "\t2\tq\tp\tn\n", {"column 1 (pos_score) is empty"}},
        {N, "[\"q1\", [100, 1.0], [101, 2.0]]\n{\"a\": 1}\n", {"line 2", "found an object", "[qid, [pid, score]"}},
        {N, "[\"q1\", [100, 1.0], [101, 2.0\n", {"line 1", "invalid JSON"}},
        {N, "[\"q1\", [100, 1.0]]\n", {"line 1", "1 [pid, score] pair,", "at least 2"}},
        {N, "[\"q1\", [100, 1.0], 101]\n", {"element 3 is a number", "[pid, score] pair"}},
        {N, "[\"q1\", [100, 1.0], [101, \"x\"]]\n", {"element 3: the score is a string"}},
        {N, "[\"q1\", [100, 1.0], [101, 1e999]]\n", {"element 3", "not finite"}},
        {N, "[\"q7x\", [100, 1.0], [101, 2]]\n", {"element 1", "unknown qid \"q7x\""}},
        {N, "[\"q1\", [100, 1.0], [555, 2]]\n", {"element 3", "unknown pid \"555\""}},
        {N, "[1.5, [100, 1.0], [101, 2]]\n", {"element 1 (qid) must be a string or an integer"}},
        {N, "[\"q1\", [100, 1], [101, 2]]\n[\"q1\", [100, 1], [101, 2], [102, 3]]\n", {"line 2", "3 [pid, score] pairs", "earlier lines have 2"}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const bad_case *c = &cases[i];
        const char *path = tmp_file("bad.txt", c->content);
        kst_teacher_opts o = opts_for(c->f, i % 2 ? 4 : 0, 1);
        kst_teacher *r = NULL;
        kst_error err = {0};
        int rc = kst_teacher_open(path, &o, NULL, &r, &err);
        if (rc == KST_OK) { /* the error may come later when the buffer is small */
            kst_teacher_record rec;
            while ((rc = kst_teacher_next(r, &rec, &err)) == KST_OK && rec.query) {
            }
            if (rc != KST_OK) { /* sticky */
                kst_error again;
                assert_int_equal(kst_teacher_next(r, &rec, &again), rc);
                assert_string_equal(again.msg, err.msg);
                char *st;
                assert_int_equal(kst_teacher_state(r, &st, &again), KST_ERR_MISUSE);
            }
            kst_teacher_close(r);
        }
        if (rc != KST_ERR_FORMAT) fail_msg("case %zu: %s (%s)", i, kst_status_name(rc), err.msg);
        assert_msg_has(err.msg, "bad.txt");
        for (int k = 0; k < 3 && c->needles[k]; k++) assert_msg_has(err.msg, c->needles[k]);
    }
    /* Options */
    kst_teacher *r;
    kst_error err;
    kst_teacher_opts o = opts_for(KST_TEACHER_HOFSTAETTER, 0, 1);
    o.collection = NULL;
    assert_int_equal(kst_teacher_open(FX "/hofstaetter.tsv", &o, NULL, &r, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "needs a queries file and a collection");
    o = opts_for(KST_TEACHER_HOFSTAETTER, 0, 1);
    assert_int_not_equal(kst_teacher_open(FX "/missing.tsv", &o, NULL, &r, &err), KST_OK);
    assert_msg_has(err.msg, "missing.tsv");
    kst_teacher_format f;
    assert_ok(kst_teacher_format_parse("nway", &f, &err), &err);
    assert_int_equal(f, KST_TEACHER_NWAY);
    assert_int_equal(kst_teacher_format_parse("tsv", &f, &err), KST_ERR_INVALID);
    /* Maps: duplicate id */
    kst_textmap *m;
    assert_int_equal(kst_textmap_load(tmp_file("dup.tsv", "q1\ta\nq2\tb\nq1\tc\n"), 1, &m, &err),
                     KST_ERR_FORMAT);
    assert_msg_has(err.msg, "line 3");
    assert_msg_has(err.msg, "duplicate id \"q1\"");
    assert_null(m);
    assert_ok(kst_textmap_load(tmp_file("titles.tsv", "d1\tTitle\tbody text\n"), 0, &m, &err), &err);
    const char *t;
    size_t tl;
    assert_true(kst_textmap_find(m, "d1", 2, &t, &tl));
    assert_string_equal(t, "Title body text");
    assert_int_equal(tl, 15);
    assert_false(kst_textmap_find(m, "d", 1, &t, &tl));
    kst_textmap_free(m);
}

/* ---------------------------------------------------------------------------------------------
 * Allocation failures
 * ------------------------------------------------------------------------------------------- */

/* Everything a training run does with the data, as one fallible sequence. */
static int data_round(kst_teacher_format f, const char *path, size_t K) {
    kst_error err;
    kst_textmap *q = NULL, *c = NULL;
    kst_teacher *r = NULL;
    char *st = NULL;
    int rc;
    if ((rc = kst_textmap_load(FX "/queries.tsv", 1, &q, &err))) goto done;
    if ((rc = kst_textmap_load(FX "/collection.tsv", 0, &c, &err))) goto done;
    kst_teacher_opts o = {f, q, c, K, 0, 3, 0};
    if ((rc = kst_teacher_open(path, &o, NULL, &r, &err))) goto done;
    kst_teacher_record rec;
    for (int i = 0; i < 5; i++)
        if ((rc = kst_teacher_next(r, &rec, &err))) goto done;
    if ((rc = kst_teacher_state(r, &st, &err))) goto done;
    kst_teacher_close(r);
    r = NULL;
    if ((rc = kst_teacher_open(path, &o, st, &r, &err))) goto done;
    do {
        if ((rc = kst_teacher_next(r, &rec, &err))) goto done;
    } while (rec.query);
done:
    if (rc != KST_OK && rc != KST_ERR_NOMEM) fail_msg("%s: %s", kst_status_name(rc), err.msg);
    kst_free(st);
    kst_teacher_close(r);
    kst_textmap_free(q);
    kst_textmap_free(c);
    return rc;
}

static void test_alloc_failures(void **state) {
    (void)state;
    struct { kst_teacher_format f; const char *path; size_t K; } runs[] = {
        {KST_TEACHER_HOFSTAETTER, FX "/hofstaetter.tsv", 4},
        {KST_TEACHER_MATCHMAKER, FX "/matchmaker.tsv", 4},
        {KST_TEACHER_NWAY, FX "/nway.jsonl", 0},
        {KST_TEACHER_HOFSTAETTER, FX "/hofstaetter.tsv.gz", 0},
    };
    for (size_t k = 0; k < sizeof runs / sizeof *runs; k++) {
        long n;
        for (n = 1; n < 100000; n++) {
            kst_mem_fail_after(n);
            int rc = data_round(runs[k].f, runs[k].path, runs[k].K);
            kst_mem_fail_after(0);
            if (rc == KST_OK) break;
        }
        assert_true(n > 5 && n < 100000);
    }
}

/* ---------------------------------------------------------------------------------------------
 * main
 * ------------------------------------------------------------------------------------------- */

static int setup(void **state) {
    (void)state;
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kst_train_data_XXXXXX");
    if (!mkdtemp(g_tmp)) return -1;
    kst_error err;
    if (kst_textmap_load(FX "/queries.tsv", 1, &g_q, &err) ||
        kst_textmap_load(FX "/collection.tsv", 0, &g_c, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    return kst_textmap_count(g_q) == 10 && kst_textmap_count(g_c) == 40 ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    kst_textmap_free(g_q);
    kst_textmap_free(g_c);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_hofstaetter),
        cmocka_unit_test(test_matchmaker_and_nway),
        cmocka_unit_test(test_shuffle),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
