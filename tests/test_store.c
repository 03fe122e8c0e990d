/* test_store.c - the SQLite store: schema, add/replace/delete with FTS5 in step, BM25 against the
 * formula FTS5 documents, query-syntax injection, bad input, manifest, concurrency, crash safety,
 * allocation failures. */
#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <sqlite3.h>

#include "core/file.h"
#include "core/mem.h"
#include "index/idmap.h"
#include "index/sha256.h"
#include "index/store.h"

/* ---- helpers ---- */

static int rm_entry(const char *p, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(p);
}

/* A fresh temporary folder; the index lives in <tmp>/ix (created by the store). */
typedef struct {
    char tmp[256];
    char ix[300];
} tmpdir;

static void tmp_make(tmpdir *t) {
    snprintf(t->tmp, sizeof t->tmp, "/tmp/kst_store_XXXXXX");
    if (!mkdtemp(t->tmp)) fail_msg("mkdtemp: %s", strerror(errno));
    snprintf(t->ix, sizeof t->ix, "%s/ix", t->tmp);
}

static void tmp_remove(tmpdir *t) { nftw(t->tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static kst_store *open_ok(const char *dir, int flags) {
    kst_error err = {0};
    kst_store *s = NULL;
    assert_ok(kst_store_open(dir, flags, &s, &err), &err);
    return s;
}

static int64_t add_ok(kst_store *s, const char *ext, const char *title, const char *text) {
    kst_error err = {0};
    int64_t id = -1, old = -2;
    assert_ok(kst_store_add(s, ext, title, text, NULL, &id, &old, &err), &err);
    return id;
}

static int64_t count_of(kst_store *s) {
    kst_error err = {0};
    int64_t n = -1;
    assert_ok(kst_store_count(s, &n, &err), &err);
    return n;
}

static kst_store_hits *bm25_ok(kst_store *s, const char *q, size_t k) {
    kst_error err = {0};
    kst_store_hits *h = NULL;
    assert_ok(kst_store_bm25(s, q, k, &h, &err), &err);
    assert_non_null(h);
    return h;
}

/* SQLite's own checks on the file, through a separate connection: the b-trees
 * (PRAGMA integrity_check) and the full-text index against its content table (FTS5
 * 'integrity-check' with rank = 1 also compares every row's tokens with documents). Also checks
 * that the manifest's doc_count matches the rows. */
static void check_integrity(const char *ixdir) {
    char path[512];
    snprintf(path, sizeof path, "%s/docs.sqlite", ixdir);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "ok");
    sqlite3_finalize(st);
    char *msg = NULL;
    int rc = sqlite3_exec(db, "INSERT INTO documents_fts(documents_fts, rank) "
                              "VALUES ('integrity-check', 1)", NULL, NULL, &msg);
    if (rc != SQLITE_OK) fail_msg("FTS5 integrity-check: %s", msg ? msg : "?");
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT (SELECT count(*) FROM documents), "
                                            "(SELECT value FROM manifest WHERE key='doc_count')",
                                        -1, &st, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1));
    sqlite3_finalize(st);
    sqlite3_close(db);
}

/* Runs one SQL statement on the index file directly (to fake other versions, corrupt, etc.). */
static void raw_sql(const char *ixdir, const char *sql) {
    char path[512];
    snprintf(path, sizeof path, "%s/docs.sqlite", ixdir);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) fail_msg("%s: %s", sql, msg);
    sqlite3_close(db);
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, n, fp), n);
    fclose(fp);
}

/* ---- schema, open, reopen ---- */

static void test_create_and_reopen(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = NULL;

    /* Missing index without CREATE: NOTFOUND naming the folder. */
    assert_int_equal(kst_store_open(t.ix, 0, &s, &err), KST_ERR_NOTFOUND);
    assert_null(s);
    assert_msg_has(err.msg, t.ix);
    assert_int_equal(kst_store_open(t.ix, KST_STORE_CREATE | KST_STORE_READONLY, &s, &err),
                     KST_ERR_MISUSE);

    s = open_ok(t.ix, KST_STORE_CREATE);
    kst_store_manifest m;
    assert_ok(kst_store_manifest_read(s, &m, &err), &err);
    assert_int_equal(m.schema_version, KST_STORE_SCHEMA_VERSION);
    assert_string_equal(m.model_fingerprint, "");
    assert_int_equal(m.doc_count, 0);
    assert_int_equal(m.generation, 0);
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "d1", "Title one", "hello world");
    assert_ok(kst_store_commit(s, &err), &err);
    kst_store_close(s);

    /* Reopen read-write, and with CREATE again (no-op on an existing index), and read-only. */
    s = open_ok(t.ix, 0);
    assert_int_equal(count_of(s), 1);
    kst_store_close(s);
    s = open_ok(t.ix, KST_STORE_CREATE);
    assert_int_equal(count_of(s), 1);
    kst_store_close(s);
    s = open_ok(t.ix, KST_STORE_READONLY);
    assert_int_equal(count_of(s), 1);
    kst_store_hits *h = bm25_ok(s, "hello", 10);
    assert_int_equal(h->n, 1);
    kst_store_hits_free(h);
    /* A read-only handle refuses to write. */
    assert_int_equal(kst_store_begin(s, &err), KST_ERR_MISUSE);
    assert_msg_has(err.msg, "read-only");
    kst_store_close(s);

    /* WAL mode and user_version are in the file. */
    char path[512];
    snprintf(path, sizeof path, "%s/docs.sqlite", t.ix);
    sqlite3 *db;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_stmt *st;
    sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "wal");
    sqlite3_finalize(st);
    sqlite3_close(db);

    /* A newer schema version is a clear error naming both versions. */
    raw_sql(t.ix, "PRAGMA user_version = 99");
    assert_int_equal(kst_store_open(t.ix, 0, &s, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "schema version 99");
    assert_msg_has(err.msg, "reads version 1");
    assert_msg_has(err.msg, "upgrade Kestrel");
    raw_sql(t.ix, "PRAGMA user_version = 1");

    /* Another program's SQLite file is not a Kestrel index. */
    raw_sql(t.ix, "PRAGMA application_id = 0");
    assert_int_equal(kst_store_open(t.ix, 0, &s, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "not a Kestrel index");
    tmp_remove(&t);

    /* Another program's database is refused and left as it was, even with CREATE. */
    tmp_make(&t);
    mkdir(t.ix, 0777);
    raw_sql(t.ix, "CREATE TABLE theirs(x); PRAGMA journal_mode = DELETE");
    assert_int_equal(kst_store_open(t.ix, KST_STORE_CREATE, &s, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "not a Kestrel index");
    snprintf(path, sizeof path, "%s/docs.sqlite", t.ix);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "delete");
    sqlite3_finalize(st);
    sqlite3_close(db);
    tmp_remove(&t);

    /* A file that is not SQLite at all. */
    tmp_make(&t);
    mkdir(t.ix, 0777);
    char junk[512];
    snprintf(junk, sizeof junk, "%s/docs.sqlite", t.ix);
    const char text[] = "this is not an SQLite database, it is a text file of some length.....";
    char big[8192];
    for (size_t i = 0; i < sizeof big; i++) big[i] = text[i % (sizeof text - 1)];
    write_bytes(junk, big, sizeof big);
    assert_int_equal(kst_store_open(t.ix, 0, &s, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "not an SQLite database");
    assert_msg_has(err.msg, junk);
    assert_int_equal(kst_store_open(t.ix, KST_STORE_READONLY, &s, &err), KST_ERR_FORMAT);
    assert_null(s);
    tmp_remove(&t);
}

/* ---- add / replace / delete keep FTS5 in step ---- */

static void test_add_replace_delete(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);

    /* Writes need a transaction. */
    assert_int_equal(kst_store_add(s, "x", NULL, "y", NULL, NULL, NULL, &err), KST_ERR_MISUSE);
    assert_msg_has(err.msg, "kst_store_begin");
    assert_int_equal(kst_store_commit(s, &err), KST_ERR_MISUSE);

    assert_ok(kst_store_begin(s, &err), &err);
    assert_int_equal(kst_store_begin(s, &err), KST_ERR_MISUSE);
    int64_t a = add_ok(s, "A", "apples", "red apples grow on trees");
    int64_t b = add_ok(s, "B", NULL, "bananas are yellow");
    int64_t c = -1, old = 0;
    assert_ok(kst_store_add(s, "C", "cherries", "cherries are small", "{\"year\": 2020}", &c, &old,
                            &err),
              &err);
    assert_int_equal(old, -1);
    assert_true(a < b && b < c);
    assert_ok(kst_store_commit(s, &err), &err);
    assert_int_equal(count_of(s), 3);

    kst_store_doc d;
    assert_ok(kst_store_get(s, c, &d, &err), &err);
    assert_string_equal(d.ext_id, "C");
    assert_string_equal(d.title, "cherries");
    assert_string_equal(d.text, "cherries are small");
    assert_string_equal(d.meta, "{\"year\": 2020}");
    kst_store_doc_free(&d);
    assert_ok(kst_store_get(s, b, &d, &err), &err);
    assert_null(d.title);
    assert_null(d.meta);
    kst_store_doc_free(&d);
    char ext[8];
    assert_ok(kst_store_ext_id(s, a, ext, sizeof ext, &err), &err);
    assert_string_equal(ext, "A");
    assert_int_equal(kst_store_ext_id(s, a, ext, 1, &err), KST_ERR_INVALID);
    int64_t found = 0;
    assert_ok(kst_store_lookup(s, "B", &found, &err), &err);
    assert_int_equal(found, b);
    assert_int_equal(kst_store_lookup(s, "nope", &found, &err), KST_ERR_NOTFOUND);

    /* Replace A: a new internal id, the old one reported; old words no longer hit. */
    assert_ok(kst_store_begin(s, &err), &err);
    int64_t a2 = -1;
    assert_ok(kst_store_add(s, "A", "apricots", "orange apricots", NULL, &a2, &old, &err), &err);
    assert_int_equal(old, a);
    assert_true(a2 > c);
    assert_ok(kst_store_commit(s, &err), &err);
    assert_int_equal(count_of(s), 3);
    kst_store_hits *h = bm25_ok(s, "apples trees", 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    h = bm25_ok(s, "apricots", 10);
    assert_int_equal(h->n, 1);
    assert_int_equal(h->hit[0].id, a2);
    kst_store_hits_free(h);
    assert_int_equal(kst_store_get(s, a, &d, &err), KST_ERR_NOTFOUND);
    assert_msg_has(err.msg, "internal id");

    /* Delete B and an unknown id: B's words never hit again; the unknown one reads -1. */
    assert_ok(kst_store_begin(s, &err), &err);
    const char *del[] = {"B", "unknown"};
    int64_t removed[2];
    size_t nrem = 9;
    assert_ok(kst_store_delete(s, del, 2, removed, &nrem, &err), &err);
    assert_int_equal(nrem, 1);
    assert_int_equal(removed[0], b);
    assert_int_equal(removed[1], -1);
    assert_ok(kst_store_commit(s, &err), &err);
    h = bm25_ok(s, "bananas yellow", 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    assert_int_equal(count_of(s), 2);

    /* Ids are never reused: delete the newest, then add. */
    assert_ok(kst_store_begin(s, &err), &err);
    const char *delA[] = {"A"};
    assert_ok(kst_store_delete(s, delA, 1, removed, &nrem, &err), &err);
    int64_t e = add_ok(s, "E", NULL, "elderberries");
    assert_true(e > a2);
    assert_ok(kst_store_commit(s, &err), &err);

    /* Rollback discards everything since begin, FTS5 included. */
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "F", NULL, "figs");
    const char *delC[] = {"C"};
    assert_ok(kst_store_delete(s, delC, 1, removed, &nrem, &err), &err);
    assert_ok(kst_store_rollback(s, &err), &err);
    h = bm25_ok(s, "figs", 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    h = bm25_ok(s, "cherries", 10);
    assert_int_equal(h->n, 1);
    kst_store_hits_free(h);

    /* Generation: one per committed write; an empty commit and a rollback add nothing. */
    kst_store_manifest m;
    assert_ok(kst_store_manifest_read(s, &m, &err), &err);
    assert_int_equal(m.generation, 4);
    assert_ok(kst_store_begin(s, &err), &err);
    assert_ok(kst_store_commit(s, &err), &err);
    assert_ok(kst_store_manifest_read(s, &m, &err), &err);
    assert_int_equal(m.generation, 4);
    assert_int_equal(m.doc_count, 2);

    /* Bad arguments. */
    assert_ok(kst_store_begin(s, &err), &err);
    assert_int_equal(kst_store_add(s, "", NULL, "x", NULL, NULL, NULL, &err), KST_ERR_INVALID);
    assert_int_equal(kst_store_add(s, NULL, NULL, "x", NULL, NULL, NULL, &err), KST_ERR_INVALID);
    assert_int_equal(kst_store_add(s, "G", NULL, "x", "{\"a\": ", NULL, NULL, &err),
                     KST_ERR_FORMAT);
    assert_msg_has(err.msg, "document \"G\": meta");
    assert_int_equal(kst_store_meta_set(s, "generation", "7", &err), KST_ERR_INVALID);
    /* A failed add leaves the transaction as it was: the replaced document is still there. */
    assert_int_equal(kst_store_add(s, "C", NULL, "x", "[1,", NULL, NULL, &err), KST_ERR_FORMAT);
    assert_ok(kst_store_commit(s, &err), &err);
    assert_ok(kst_store_lookup(s, "C", &found, &err), &err);
    assert_int_equal(found, c);

    kst_store_close(s);
    check_integrity(t.ix);
    tmp_remove(&t);
}

/* ---- BM25 against the formula ---- */

/* One term's BM25 contribution as FTS5's bm25() computes it (ext/fts5/fts5_aux.c, and the
 * formula on sqlite.org/fts5.html): k1 = 1.2, b = 0.75,
 * IDF = ln((N - n + 0.5) / (n + 0.5)), replaced by 1e-6 when <= 0. */
static double bm25_term(double N, double n, double tf, double D, double avgdl) {
    const double k1 = 1.2, b = 0.75;
    double idf = log((N - n + 0.5) / (n + 0.5));
    if (idf <= 0) idf = 1e-6;
    return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * D / avgdl));
}

/* kst_store_get_many returns rows in the order asked, across its 16-id statements, with repeats,
 * and fails whole (every slot zeroed) when an id has no document. */
static void test_get_many(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    enum { N = 40 };
    int64_t id[N];
    char ext[N][16], text[N][32]; /* room for any int: gcc -O1 checks the format widths */
    assert_ok(kst_store_begin(s, &err), &err);
    for (int i = 0; i < N; i++) {
        snprintf(ext[i], sizeof ext[i], "d%d", i);
        snprintf(text[i], sizeof text[i], "text of document %d", i);
        id[i] = add_ok(s, ext[i], i % 3 ? NULL : "title", text[i]);
    }
    assert_ok(kst_store_commit(s, &err), &err);
    /* 35 ids: reversed, then a repeat of the first; crosses two statement boundaries */
    int64_t ask[35];
    int want[35];
    for (int i = 0; i < 34; i++) ask[i] = id[want[i] = N - 1 - i];
    ask[34] = id[want[34] = N - 1];
    kst_store_doc d[35];
    assert_ok(kst_store_get_many(s, ask, 35, d, &err), &err);
    for (int i = 0; i < 35; i++) {
        assert_int_equal(d[i].id, ask[i]);
        assert_string_equal(d[i].ext_id, ext[want[i]]);
        assert_string_equal(d[i].text, text[want[i]]);
        if (want[i] % 3) assert_null(d[i].title);
        else assert_string_equal(d[i].title, "title");
        kst_store_doc_free(&d[i]);
    }
    assert_ok(kst_store_get_many(s, ask, 0, d, &err), &err);
    ask[20] = id[N - 1] + 1000;
    assert_int_equal(kst_store_get_many(s, ask, 35, d, &err), KST_ERR_NOTFOUND);
    assert_msg_has(err.msg, "internal id");
    for (int i = 0; i < 35; i++) assert_null(d[i].ext_id);
    kst_store_close(s);
    tmp_remove(&t);
}

static void test_bm25_reference(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(s, &err), &err);
    /* Words porter leaves unchanged. Lengths count title + text tokens:
     *   d1  "cat" | "cat dog"                  D=3  cat 2, dog 1
     *   d2  -     | "dog dog bird"             D=3  dog 2, bird 1
     *   d3  "fish"| "bird fish fish fish cat"  D=6  fish 4, bird 1, cat 1
     *   d4  -     | "mouse"                    D=1
     *   d5  -     | "horse mouse bird"         D=3  bird 1
     * N = 5, 16 tokens, avgdl = 3.2. Document frequencies: cat 2, dog 2, bird 3, fish 1. */
    int64_t d1 = add_ok(s, "d1", "cat", "cat dog");
    int64_t d2 = add_ok(s, "d2", NULL, "dog dog bird");
    int64_t d3 = add_ok(s, "d3", "fish", "bird fish fish fish cat");
    add_ok(s, "d4", NULL, "mouse");
    int64_t d5 = add_ok(s, "d5", NULL, "horse mouse bird");
    assert_ok(kst_store_commit(s, &err), &err);
    const double N = 5, avg = 16.0 / 5;

    /* "cat fish": d3 = cat(tf 1) + fish(tf 4), d1 = cat(tf 2). */
    kst_store_hits *h = bm25_ok(s, "cat fish", 10);
    assert_int_equal(h->n, 2);
    double want_d3 = bm25_term(N, 2, 1, 6, avg) + bm25_term(N, 1, 4, 6, avg);
    double want_d1 = bm25_term(N, 2, 2, 3, avg);
    assert_int_equal(h->hit[0].id, d3);
    assert_int_equal(h->hit[1].id, d1);
    assert_true(h->hit[0].score > 0);
    assert_true(fabs(h->hit[0].score - want_d3) <= 1e-9 * want_d3);
    assert_true(fabs(h->hit[1].score - want_d1) <= 1e-9 * want_d1);
    kst_store_hits_free(h);

    /* "bird" is in 3 of 5 documents: ln(2.5/3.5) < 0, so FTS5 floors the IDF at 1e-6. The
     * shorter documents rank first (d2, d5 with D=3, then d3 with D=6); d2 and d5 tie and are
     * ordered by id. */
    h = bm25_ok(s, "bird", 10);
    assert_int_equal(h->n, 3);
    assert_int_equal(h->hit[0].id, d2);
    assert_int_equal(h->hit[1].id, d5);
    assert_int_equal(h->hit[2].id, d3);
    double want = bm25_term(N, 3, 1, 3, avg);
    assert_true(fabs(h->hit[0].score - want) <= 1e-9 * want);
    assert_true(fabs(h->hit[0].score - 1e-6 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 3 / 3.2))) < 1e-15);
    kst_store_hits_free(h);

    /* "dog bird" checks a sum with a floored term: d2 = dog(tf 2) + bird(tf 1). */
    h = bm25_ok(s, "dog bird", 10);
    want = bm25_term(N, 2, 2, 3, avg) + bm25_term(N, 3, 1, 3, avg);
    assert_int_equal(h->hit[0].id, d2);
    assert_true(fabs(h->hit[0].score - want) <= 1e-9 * want);
    kst_store_hits_free(h);

    /* A repeated query word counts once per occurrence (as Lucene's bag-of-words boost does),
     * case folded: "Cat CAT" scores d1 twice "cat". */
    h = bm25_ok(s, "Cat CAT", 10);
    assert_int_equal(h->hit[0].id, d1);
    want = 2 * bm25_term(N, 2, 2, 3, avg);
    assert_true(fabs(h->hit[0].score - want) <= 1e-9 * want);
    kst_store_hits_free(h);

    /* Porter stemming: "cats" and "fishes" find the singular forms; k limits the list. */
    h = bm25_ok(s, "cats fishes", 1);
    assert_int_equal(h->n, 1);
    assert_int_equal(h->hit[0].id, d3);
    kst_store_hits_free(h);
    /* Diacritics fold: "cät" is "cat". */
    h = bm25_ok(s, "c\xc3\xa4t", 10);
    assert_int_equal(h->n, 2);
    kst_store_hits_free(h);
    kst_store_close(s);
    tmp_remove(&t);
}

/* ---- FTS5 query syntax in user text has no effect ---- */

static void test_query_injection(void **state) {
    (void)state;
    kst_error err = {0};
    char *q = NULL;
    assert_ok(kst_store_fts_query("a\"b NEAR(c* -d title:e {text}: ^f AND OR NOT", &q, &err), &err);
    assert_string_equal(q, "\"a\" OR \"b\" OR \"NEAR\" OR \"c\" OR \"d\" OR \"title\" OR \"e\" "
                           "OR \"text\" OR \"f\" OR \"AND\" OR \"OR\" OR \"NOT\"");
    kst_free(q);
    /* Non-ASCII words stay whole; punctuation outside ASCII separates. */
    assert_ok(kst_store_fts_query("na\xc3\xafve\xe2\x80\x94\xe6\x97\xa5\xe6\x9c\xac", &q, &err), &err);
    assert_string_equal(q, "\"na\xc3\xafve\" OR \"\xe6\x97\xa5\xe6\x9c\xac\"");
    kst_free(q);

    tmpdir t;
    tmp_make(&t);
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "d1", "cat", "cat dog");
    add_ok(s, "d2", NULL, "dog dog bird");
    add_ok(s, "d3", "fish", "bird fish fish fish cat near and or not");
    assert_ok(kst_store_commit(s, &err), &err);

    /* Each hostile text must give exactly the hits of its words searched plainly. */
    static const char *cases[][2] = {
        {"cat AND dog", "cat and dog"},
        {"cat NOT dog", "cat not dog"},
        {"NEAR(cat dog, 1)", "near cat dog 1"},
        {"\"cat dog", "cat dog"},
        {"cat\"\" OR \"\"dog", "cat or dog"},
        {"cat*", "cat"},
        {"-cat", "cat"},
        {"title:fish", "title fish"},
        {"{title text}: fish", "title text fish"},
        {"- title : fish", "title fish"},
        {"^cat", "cat"},
        {"(cat OR", "cat or"},
        {")", ""},
        {"cat + dog", "cat dog"},
        {"rowid:1", "rowid 1"},
        {"documents_fts: cat", "documents_fts cat"},
        {"'; DROP TABLE documents; --", "drop table documents"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kst_store_hits *h1 = NULL, *h2 = NULL;
        int rc = kst_store_bm25(s, cases[i][0], 10, &h1, &err);
        if (rc != KST_OK) fail_msg("query <%s> failed: %s", cases[i][0], err.msg);
        h2 = bm25_ok(s, cases[i][1], 10);
        if (h1->n != h2->n) fail_msg("query <%s>: %zu hits, plain <%s>: %zu", cases[i][0], h1->n,
                                     cases[i][1], h2->n);
        for (size_t j = 0; j < h1->n; j++) {
            assert_int_equal(h1->hit[j].id, h2->hit[j].id);
            assert_true(fabs(h1->hit[j].score - h2->hit[j].score) <= 1e-12);
        }
        kst_store_hits_free(h1);
        kst_store_hits_free(h2);
    }
    assert_int_equal(count_of(s), 3);
    kst_store_close(s);
    tmp_remove(&t);
}

/* ---- empty queries, huge text, invalid UTF-8 ---- */

static void test_edge_inputs(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "d1", "cat", "cat dog");

    /* 4 MiB of text with a rare word at the very end. */
    size_t big_n = 4u << 20;
    char *big = malloc(big_n + 32);
    for (size_t i = 0; i < big_n; i += 12) memcpy(big + i, "alpha beta  ", 12);
    strcpy(big + big_n, " zyzzyva");
    int64_t big_id = add_ok(s, "big", "huge", big);

    /* Invalid UTF-8 in any field is refused with the field and the byte offset, and nothing is
     * written. */
    static const struct { const char *text, *want; } bad[] = {
        {"caf\xc3", "byte offset 3 of 4"},          /* truncated sequence */
        {"x\xc0\xaf", "byte offset 1"},              /* overlong '/' */
        {"ab\xed\xa0\x80", "byte offset 2"},         /* UTF-16 surrogate */
        {"\xf4\x90\x80\x80", "byte offset 0"},       /* past U+10FFFF */
        {"ok \xff", "bad byte 0xff"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(kst_store_add(s, "u", NULL, bad[i].text, NULL, NULL, NULL, &err),
                         KST_ERR_FORMAT);
        assert_msg_has(err.msg, "document \"u\": text is not valid UTF-8");
        assert_msg_has(err.msg, bad[i].want);
    }
    assert_int_equal(kst_store_add(s, "u", "t\xfe", "x", NULL, NULL, NULL, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "title is not valid UTF-8");
    assert_int_equal(kst_store_add(s, "u\xfe", NULL, "x", NULL, NULL, NULL, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "ext_id is not valid UTF-8");
    /* Valid multi-byte text round-trips byte for byte. */
    const char *utf = "\xf0\x9f\x90\x88 caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e";
    int64_t u = add_ok(s, "utf", NULL, utf);
    assert_ok(kst_store_commit(s, &err), &err);
    assert_int_equal(count_of(s), 3);

    kst_store_doc d;
    assert_ok(kst_store_get(s, big_id, &d, &err), &err);
    assert_int_equal(strlen(d.text), strlen(big));
    assert_memory_equal(d.text, big, strlen(big));
    kst_store_doc_free(&d);
    assert_ok(kst_store_get(s, u, &d, &err), &err);
    assert_string_equal(d.text, utf);
    kst_store_doc_free(&d);
    kst_store_hits *h = bm25_ok(s, "zyzzyva", 10);
    assert_int_equal(h->n, 1);
    assert_int_equal(h->hit[0].id, big_id);
    kst_store_hits_free(h);
    h = bm25_ok(s, "cafe", 10);
    assert_int_equal(h->n, 1);
    assert_int_equal(h->hit[0].id, u);
    kst_store_hits_free(h);

    /* Queries without words: no hits, no error. Also k = 0 and NULL text. */
    static const char *empty[] = {"", "   ", "!!! --- ??? \"\" ()", "\xff\xfe", "\xcc\x80"};
    for (size_t i = 0; i < sizeof empty / sizeof empty[0]; i++) {
        h = bm25_ok(s, empty[i], 10);
        assert_int_equal(h->n, 0);
        kst_store_hits_free(h);
    }
    h = bm25_ok(s, NULL, 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    h = bm25_ok(s, "cat", 0);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    /* Invalid UTF-8 in a query separates words. */
    h = bm25_ok(s, "zyzzyva\xff\xfe" "cat", 10);
    assert_int_equal(h->n, 2);
    kst_store_hits_free(h);

    /* The longest query allowed (KST_STORE_MAX_QUERY_WORDS words) works; one more word is a
     * clear error, not minutes of doclist reads. */
    size_t qcap = (KST_STORE_MAX_QUERY_WORDS + 1) * 8 + 1, qn = 0;
    char *qq = malloc(qcap);
    qn += (size_t)sprintf(qq + qn, "cat");
    for (int i = 1; i < KST_STORE_MAX_QUERY_WORDS; i++) qn += (size_t)sprintf(qq + qn, " w%d", i);
    h = bm25_ok(s, qq, 10);
    assert_int_equal(h->n, 1);
    kst_store_hits_free(h);
    strcpy(qq + qn, " beta");
    h = NULL;
    assert_int_equal(kst_store_bm25(s, qq, 10, &h, &err), KST_ERR_INVALID);
    assert_null(h);
    assert_msg_has(err.msg, "more than 1024 words");
    free(qq);
    free(big);
    kst_store_close(s);
    check_integrity(t.ix);
    tmp_remove(&t);
}

/* ---- fingerprints and the manifest check ---- */

static void test_fingerprint_and_manifest(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    char p1[400], p2[400], p3[400], hex[65], hex2[65];
    snprintf(p1, sizeof p1, "%s/a.bin", t.tmp);
    snprintf(p2, sizeof p2, "%s/bc.bin", t.tmp);
    snprintf(p3, sizeof p3, "%s/empty.bin", t.tmp);
    write_bytes(p1, "a", 1);
    write_bytes(p2, "bc", 2);
    write_bytes(p3, "", 0);
    /* FIPS 180-2 test vectors: SHA-256("abc") and of the empty string; "a" then "bc" hashes as
     * their concatenation. */
    const char *abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const char *paths[] = {p1, p2};
    assert_ok(kst_store_fingerprint_files(paths, 2, hex, &err), &err);
    assert_string_equal(hex, abc);
    const char *pe[] = {p3};
    assert_ok(kst_store_fingerprint_files(pe, 1, hex, &err), &err);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");

    /* One million 'a' (the FIPS long vector) split over two files, the second one crossing the
     * 1 MiB read size when doubled below. */
    size_t mn = 1000000;
    char *ma = malloc(2 * mn);
    memset(ma, 'a', 2 * mn);
    write_bytes(p1, ma, 600000);
    write_bytes(p2, ma, 400000);
    assert_ok(kst_store_fingerprint_files(paths, 2, hex, &err), &err);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* A 2.5 MB file streamed in 1 MiB reads equals OpenSSL's one-shot digest of the buffer. */
    size_t ln = 2500000;
    char *lb = malloc(ln);
    for (size_t i = 0; i < ln; i++) lb[i] = (char)(i * 131 + (i >> 11));
    write_bytes(p1, lb, ln);
    unsigned char md[32];
    unsigned int mdl = 0;
    EVP_Digest(lb, ln, md, &mdl, EVP_sha256(), NULL);
    kst_sha256_hex(md, hex2);
    const char *one[] = {p1};
    assert_ok(kst_store_fingerprint_files(one, 1, hex, &err), &err);
    assert_string_equal(hex, hex2);
    free(lb);
    free(ma);

    /* Unreadable inputs name the file. */
    char missing[400];
    snprintf(missing, sizeof missing, "%s/missing.safetensors", t.tmp);
    const char *pm[] = {p1, missing};
    assert_int_equal(kst_store_fingerprint_files(pm, 2, hex, &err), KST_ERR_IO);
    assert_msg_has(err.msg, missing);
    const char *pd[] = {t.tmp};
    assert_int_equal(kst_store_fingerprint_files(pd, 1, hex, &err), KST_ERR_IO);
    assert_msg_has(err.msg, t.tmp);
    assert_int_equal(kst_store_fingerprint_files(pd, 0, hex, &err), KST_ERR_INVALID);

    /* The manifest records the model; a different one is refused, naming both. */
    const char *fa = abc;
    const char *fb = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_int_equal(kst_store_check_model(s, fa, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "without a model");
    assert_int_equal(kst_store_set_model(s, fa, 384, "IVF16,PQ8", &err), KST_ERR_MISUSE);
    assert_ok(kst_store_begin(s, &err), &err);
    assert_int_equal(kst_store_set_model(s, "ABC", 384, NULL, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "64 lowercase hex");
    assert_int_equal(kst_store_set_model(s, fa, 0, NULL, &err), KST_ERR_INVALID);
    assert_ok(kst_store_set_model(s, fa, 384, "IVF16,PQ8", &err), &err);
    assert_ok(kst_store_meta_set(s, "faiss_generation", "1", &err), &err);
    assert_ok(kst_store_commit(s, &err), &err);
    kst_store_close(s);

    s = open_ok(t.ix, KST_STORE_READONLY);
    kst_store_manifest m;
    assert_ok(kst_store_manifest_read(s, &m, &err), &err);
    assert_string_equal(m.model_fingerprint, fa);
    assert_int_equal(m.dims, 384);
    assert_string_equal(m.faiss_factory, "IVF16,PQ8");
    assert_int_equal(m.generation, 1);
    assert_ok(kst_store_check_model(s, fa, &err), &err);
    assert_int_equal(kst_store_check_model(s, fb, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, fa);
    assert_msg_has(err.msg, fb);
    assert_msg_has(err.msg, "docs.sqlite");
    assert_msg_has(err.msg, "rebuild the index with this model or pass the model it was built with");
    char *v = NULL;
    assert_ok(kst_store_meta_get(s, "faiss_generation", &v, &err), &err);
    assert_string_equal(v, "1");
    kst_free(v);
    assert_ok(kst_store_meta_get(s, "tokenizer", &v, &err), &err);
    assert_string_equal(v, "porter unicode61 remove_diacritics 2");
    kst_free(v);
    assert_int_equal(kst_store_meta_get(s, "nope", &v, &err), KST_ERR_NOTFOUND);
    kst_store_close(s);
    tmp_remove(&t);
}

/* ---- readers during a write; one writer at a time ---- */

static void test_concurrent_reader_and_writer(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *w = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(w, &err), &err);
    add_ok(w, "old", NULL, "an old document");
    assert_ok(kst_store_commit(w, &err), &err);

    kst_store *r = open_ok(t.ix, KST_STORE_READONLY);
    kst_store *w2 = open_ok(t.ix, 0);
    kst_store_set_busy_timeout(w2, 50);

    /* Writer inside an open transaction, with enough data to spill to the WAL. */
    assert_ok(kst_store_begin(w, &err), &err);
    int64_t zid = add_ok(w, "zebra", NULL, "a zebra document");
    char ext[32], text[64];
    for (int i = 0; i < 2000; i++) {
        snprintf(ext, sizeof ext, "bulk%d", i);
        snprintf(text, sizeof text, "bulk filler number %d zebra", i);
        add_ok(w, ext, NULL, text);
    }
    const char *del[] = {"old"};
    assert_ok(kst_store_delete(w, del, 1, NULL, NULL, &err), &err);

    /* The reader sees the last commit: the old document, no zebra. */
    assert_int_equal(count_of(r), 1);
    kst_store_hits *h = bm25_ok(r, "zebra", 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    h = bm25_ok(r, "old", 10);
    assert_int_equal(h->n, 1);
    kst_store_hits_free(h);
    kst_store_doc d;
    assert_int_equal(kst_store_get(r, zid, &d, &err), KST_ERR_NOTFOUND);

    /* A second writer waits out its busy timeout and gets a clear error. */
    assert_int_equal(kst_store_begin(w2, &err), KST_ERR_IO);
    assert_msg_has(err.msg, "another writer");
    assert_msg_has(err.msg, "50 ms");

    /* A read snapshot outlives the commit. */
    assert_ok(kst_store_read_begin(r, &err), &err);
    assert_ok(kst_store_commit(w, &err), &err);
    assert_int_equal(count_of(r), 1);
    h = bm25_ok(r, "zebra", 10);
    assert_int_equal(h->n, 0);
    kst_store_hits_free(h);
    kst_store_read_end(r);
    assert_int_equal(count_of(r), 2001);
    h = bm25_ok(r, "zebra", 3);
    assert_int_equal(h->n, 3);
    assert_int_equal(h->hit[0].id, zid); /* shortest document containing it */
    kst_store_hits_free(h);

    /* Now the second writer gets the lock. */
    assert_ok(kst_store_begin(w2, &err), &err);
    add_ok(w2, "w2", NULL, "second writer");
    assert_ok(kst_store_commit(w2, &err), &err);
    assert_int_equal(count_of(r), 2002);
    kst_store_close(w2);
    kst_store_close(r);
    kst_store_close(w);
    check_integrity(t.ix);
    tmp_remove(&t);
}

/* ---- crash safety: SIGKILL a writer ---- */

#define BATCH 25

/* Child: adds batches of BATCH documents, one transaction each, writing one byte to `fd` after
 * every commit and, when `signal_inside` is set, a byte from inside the next transaction half-way
 * through it. Never returns. */
static void crash_child(const char *ix, int fd, int signal_inside, int round) {
    kst_error err = {0};
    kst_store *s = NULL;
    if (kst_store_open(ix, 0, &s, &err) != KST_OK) _exit(2);
    char ext[64], text[128];
    for (int batch = 0;; batch++) {
        if (kst_store_begin(s, &err) != KST_OK) _exit(3);
        for (int i = 0; i < BATCH; i++) {
            snprintf(ext, sizeof ext, "r%d-b%d-%d", round, batch, i);
            snprintf(text, sizeof text, "crash r%db%d item%d payload words", round, batch, i);
            if (kst_store_add(s, ext, NULL, text, NULL, NULL, NULL, &err) != KST_OK) _exit(4);
            if (signal_inside && i == BATCH / 2) {
                if (write(fd, "i", 1) != 1) _exit(5);
                for (;;) pause(); /* killed here, inside the transaction */
            }
        }
        if (kst_store_commit(s, &err) != KST_OK) _exit(6);
        if (write(fd, "c", 1) != 1) _exit(5);
    }
}

/* Checks the state after a kill: every batch is whole or absent, and the generation matches. */
static void check_after_crash(const char *ix, int round, int64_t base_docs, int64_t base_gen,
                              int64_t *batches_out) {
    check_integrity(ix);
    kst_error err = {0};
    kst_store *s = open_ok(ix, 0);
    int64_t n = count_of(s);
    kst_store_manifest m;
    assert_ok(kst_store_manifest_read(s, &m, &err), &err);
    int64_t added = n - base_docs;
    if (added % BATCH != 0) fail_msg("after kill: %lld documents added, not whole batches of %d",
                                     (long long)added, BATCH);
    int64_t batches = added / BATCH;
    assert_int_equal(m.generation - base_gen, batches);
    /* Each committed batch is fully searchable; the next one is not there at all. */
    char q[64];
    for (int64_t b = 0; b <= batches; b++) {
        snprintf(q, sizeof q, "r%db%lld", round, (long long)b);
        kst_store_hits *h = bm25_ok(s, q, 1000);
        assert_int_equal(h->n, b < batches ? BATCH : 0);
        kst_store_hits_free(h);
    }
    kst_store_close(s);
    *batches_out = batches;
}

static void run_crash(const char *ix, int round, int signal_inside, int commits_before_kill,
                      int64_t *batches) {
    int64_t base_docs, base_gen;
    {
        kst_error err = {0};
        kst_store *s = open_ok(ix, 0);
        kst_store_manifest m;
        assert_ok(kst_store_manifest_read(s, &m, &err), &err);
        base_docs = m.doc_count;
        base_gen = m.generation;
        kst_store_close(s);
    }
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        crash_child(ix, fds[1], signal_inside, round);
    }
    close(fds[1]);
    char c;
    int commits = 0;
    for (;;) {
        ssize_t r = read(fds[0], &c, 1);
        if (r != 1) fail_msg("crash child ended early");
        if (c == 'i') break;
        if (++commits >= commits_before_kill) break;
    }
    /* Kill at once: with signal_inside the child is inside its transaction; otherwise it is
     * already writing the next batch (or committing it). */
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    close(fds[0]);
    check_after_crash(ix, round, base_docs, base_gen, batches);
    fprintf(stderr, "crash round %d: SIGKILL %s after %d commits signalled; reopened index holds "
            "%lld whole batches of %d, integrity ok\n", round,
            signal_inside ? "inside a transaction" : "while streaming batches", commits,
            (long long)*batches, BATCH);
}

static void test_crash_safety(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "seed", NULL, "seed document");
    assert_ok(kst_store_commit(s, &err), &err);
    kst_store_close(s);

    /* 1. Killed inside its first transaction: the old content only. */
    int64_t batches = -1;
    run_crash(t.ix, 0, 1, 0, &batches);
    assert_int_equal(batches, 0);

    /* 2. Killed while streaming commits, several times at different points: always whole
     * batches (the old or the new content), never a part. */
    for (int round = 1; round <= 4; round++) {
        run_crash(t.ix, round, 0, round * 3, &batches);
        assert_true(batches >= round * 3);
    }
    /* 3. After the crashes the index still takes writes. */
    s = open_ok(t.ix, 0);
    assert_ok(kst_store_begin(s, &err), &err);
    add_ok(s, "after", NULL, "after the crashes");
    assert_ok(kst_store_commit(s, &err), &err);
    kst_store_close(s);
    check_integrity(t.ix);
    tmp_remove(&t);
}

/* ---- allocation failures ---- */

/* Runs `op` with the Nth allocation failing, for N = 1, 2, ... until it succeeds; every failure
 * must be KST_ERR_NOMEM with a message (ASan reports any leak at exit). */
#define INJECT(label, op)                                                                      \
    do {                                                                                       \
        int done_ = 0;                                                                         \
        for (long n_ = 1; n_ < 200 && !done_; n_++) {                                          \
            kst_error e_ = {0};                                                                \
            kst_mem_fail_after(n_);                                                            \
            int rc_ = (op);                                                                    \
            kst_mem_fail_after(0);                                                             \
            if (rc_ == KST_OK) {                                                               \
                done_ = 1;                                                                     \
            } else if (rc_ != KST_ERR_NOMEM || !e_.msg[0]) {                                   \
                fail_msg("%s: allocation %ld failing gave %s: %s", label, n_,                  \
                         kst_status_name(rc_), e_.msg);                                        \
            }                                                                                  \
        }                                                                                      \
        if (!done_) fail_msg("%s never succeeded", label);                                     \
    } while (0)

/* The id map (index/idmap.h) holds what SQLite holds: every id's external id, none for the gaps
 * that deletes leave, the uncommitted rows of the writer's transaction included. Damaged files
 * are refused at open, or (an offset out of range) at the lookup that reads it. */
static void test_idmap(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = open_ok(t.ix, KST_STORE_CREATE);
    assert_ok(kst_store_begin(s, &err), &err);
    char ext[32];
    for (int i = 0; i < 50; i++) {
        snprintf(ext, sizeof ext, i % 7 ? "doc-%d" : "d\xc3\xa9j\xc3\xa0-%d", i); /* some UTF-8 */
        add_ok(s, ext, NULL, "text");
    }
    assert_ok(kst_store_commit(s, &err), &err);
    assert_ok(kst_store_begin(s, &err), &err);
    const char *gone[] = {"doc-3", "doc-10", "doc-11", "doc-48"};
    int64_t removed[4];
    size_t nrem = 0;
    assert_ok(kst_store_delete(s, gone, 4, removed, &nrem, &err), &err);
    assert_int_equal(nrem, 4);
    add_ok(s, "doc-5", NULL, "replaced: a new internal id"); /* uncommitted, still seen */
    char path[600];
    snprintf(path, sizeof path, "%s/dense.1.ids", t.tmp);
    assert_ok(kst_idmap_write(s, path, &err), &err);
    kst_idmap *m = NULL;
    assert_ok(kst_idmap_open(path, &m, &err), &err);
    int64_t count = 0;
    assert_ok(kst_store_count(s, &count, &err), &err);
    assert_int_equal(kst_idmap_count(m), (uint64_t)count);
    size_t found = 0;
    for (int64_t id = -1; id < 70; id++) {
        size_t len;
        const char *e = kst_idmap_get(m, id, &len);
        char *want = NULL;
        int rc = kst_store_ext_id_dup(s, id, &want, &err);
        if (rc == KST_ERR_NOTFOUND) {
            if (e) fail_msg("id %lld: the map says %.*s, SQLite has no such document", (long long)id, (int)len, e);
            assert_int_equal(len, 0);
            continue;
        }
        assert_ok(rc, &err);
        assert_non_null(e);
        assert_int_equal(len, strlen(want));
        assert_memory_equal(e, want, len);
        kst_free(want);
        found++;
    }
    assert_int_equal(found, (size_t)count);
    kst_idmap_close(m);
    assert_ok(kst_store_commit(s, &err), &err);

    /* damaged files */
    size_t n = 0;
    char *bytes = NULL;
    assert_ok(kst_read_file(path, &bytes, &n, &err), &err);
    char bad[700];
    snprintf(bad, sizeof bad, "%s.bad", path);
    write_bytes(bad, bytes, n - 1);
    assert_int_equal(kst_idmap_open(bad, &m, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "dense.1.ids.bad");
    assert_msg_has(err.msg, "truncated");
    write_bytes(bad, "KSTIDMAX", 8);
    assert_int_equal(kst_idmap_open(bad, &m, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "not a kestrel id map");
    write_bytes(bad, "", 0);
    assert_int_equal(kst_idmap_open(bad, &m, &err), KST_ERR_FORMAT);
    bytes[8] = 9; /* version */
    write_bytes(bad, bytes, n);
    assert_int_equal(kst_idmap_open(bad, &m, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "version 9");
    bytes[8] = 1;
    memset(bytes + 40 + 8 * 20, 0xff, 8); /* off[20]: past the blob */
    write_bytes(bad, bytes, n);
    assert_ok(kst_idmap_open(bad, &m, &err), &err);
    size_t len = 0;
    assert_null(kst_idmap_get(m, 20, &len));
    assert_int_equal(len, SIZE_MAX);
    assert_null(kst_idmap_get(m, 19, &len));
    assert_int_equal(len, SIZE_MAX);
    assert_non_null(kst_idmap_get(m, 21, &len));
    kst_idmap_close(m);
    kst_free(bytes);
    assert_int_equal(kst_idmap_open(path + 1, &m, &err), KST_ERR_IO);
    kst_store_close(s);
    tmp_remove(&t);
}

static void test_allocation_failures(void **state) {
    (void)state;
    tmpdir t;
    tmp_make(&t);
    kst_error err = {0};
    kst_store *s = NULL;
    INJECT("open/create", kst_store_open(t.ix, KST_STORE_CREATE, &s, &e_));
    kst_store_close(s);
    s = NULL;
    INJECT("open", kst_store_open(t.ix, 0, &s, &e_));

    assert_ok(kst_store_begin(s, &err), &err);
    int64_t id = -1;
    INJECT("add with meta", kst_store_add(s, "m", "t", "meta words", "{\"k\": [1, 2, {\"x\": 3}]}",
                                          &id, NULL, &e_));
    assert_ok(kst_store_commit(s, &err), &err);
    assert_int_equal(count_of(s), 1);

    kst_store_hits *h = NULL;
    INJECT("bm25", kst_store_bm25(s, "meta words", 10, &h, &e_));
    assert_int_equal(h->n, 1);
    kst_store_hits_free(h);
    /* Growing past the first 64 hits reallocates. */
    assert_ok(kst_store_begin(s, &err), &err);
    char ext[32];
    for (int i = 0; i < 100; i++) {
        snprintf(ext, sizeof ext, "w%d", i);
        add_ok(s, ext, NULL, "words");
    }
    assert_ok(kst_store_commit(s, &err), &err);
    h = NULL;
    INJECT("bm25 100 hits", kst_store_bm25(s, "words", 1000, &h, &e_));
    assert_int_equal(h->n, 101);
    kst_store_hits_free(h);

    kst_store_doc d = {0};
    INJECT("get", kst_store_get(s, id, &d, &e_));
    assert_string_equal(d.meta, "{\"k\": [1, 2, {\"x\": 3}]}");
    kst_store_doc_free(&d);
    char *v = NULL;
    INJECT("meta_get", kst_store_meta_get(s, "tokenizer", &v, &e_));
    kst_free(v);
    char *q = NULL;
    INJECT("fts_query", kst_store_fts_query("a b c", &q, &e_));
    kst_free(q);
    kst_store_close(s);

    char p1[400], hex[65];
    snprintf(p1, sizeof p1, "%s/w.bin", t.tmp);
    write_bytes(p1, "abc", 3);
    const char *paths[] = {p1};
    INJECT("fingerprint", kst_store_fingerprint_files(paths, 1, hex, &e_));
    s = open_ok(t.ix, 0);
    char mp[400];
    snprintf(mp, sizeof mp, "%s/dense.7.ids", t.tmp);
    INJECT("idmap write", kst_idmap_write(s, mp, &e_));
    kst_idmap *m = NULL;
    INJECT("idmap open", kst_idmap_open(mp, &m, &e_));
    assert_int_equal(kst_idmap_count(m), 101);
    kst_idmap_close(m);
    kst_store_close(s);
    check_integrity(t.ix);
    tmp_remove(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_and_reopen),
        cmocka_unit_test(test_add_replace_delete),
        cmocka_unit_test(test_get_many),
        cmocka_unit_test(test_bm25_reference),
        cmocka_unit_test(test_query_injection),
        cmocka_unit_test(test_edge_inputs),
        cmocka_unit_test(test_fingerprint_and_manifest),
        cmocka_unit_test(test_concurrent_reader_and_writer),
        cmocka_unit_test(test_crash_safety),
        cmocka_unit_test(test_idmap),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
