/* test_engine.c - index folders end to end through the public API: build, search stages against
 * the models computed directly, replace, delete, model mismatch, bad input, crash, threads.
 *
 * Models are the small fixture checkpoints (tests/fixtures/models); the collection is the first
 * 200 documents of BEIR SciFact. The expected values come from the encoders themselves, which
 * test_encoders.c holds to transformers / sentence-transformers / colbert-ai. */
#include "harness.h"

#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "api/kestrel.h"

#define FX "tests/fixtures/models/"
#define NDOCS 200

static char g_dir[256], g_corpus[512];

static void make_corpus(const char *path, size_t n) {
    FILE *in = fopen(shared_path("beir-scifact/corpus.jsonl"), "rb");
    FILE *out = fopen(path, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char *line = NULL;
    size_t cap = 0;
    for (size_t i = 0; i < n && getline(&line, &cap, in) > 0; i++) fputs(line, out);
    free(line);
    fclose(in);
    fclose(out);
}

static kst_index *build(const char *dir, const char *factory, int colbert, int cross) {
    kst_index_opts o = kst_index_opts_default();
    o.model = FX "st_bert_mean";
    if (colbert) o.colbert = FX "colbert";
    if (cross) o.cross = FX "cross_bert";
    if (factory) o.factory = factory;
    kst_index *ix = NULL;
    kst_error err;
    assert_ok(kst_index_create(dir, &o, &ix, &err), &err);
    kst_add_stats st;
    assert_ok(kst_index_add_file(ix, g_corpus, NULL, NULL, NULL, &st, &err), &err);
    assert_int_equal(st.docs, NDOCS);
    return ix;
}

static int setup(void **s) {
    (void)s;
    snprintf(g_dir, sizeof g_dir, "/tmp/kst_engine_XXXXXX");
    assert_non_null(mkdtemp(g_dir));
    snprintf(g_corpus, sizeof g_corpus, "%s/corpus.jsonl", g_dir);
    make_corpus(g_corpus, NDOCS);
    return 0;
}

static int teardown(void **s) {
    (void)s;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *sub(const char *name) {
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_dir, name);
    return buf[k];
}

/* The document texts as the index encodes them ("title text"), by external id order of file. */
static size_t corpus_texts(char ***ids, char ***texts) {
    char **lines;
    size_t n = read_lines(g_corpus, &lines);
    *ids = malloc(n * sizeof **ids);
    *texts = malloc(n * sizeof **texts);
    for (size_t i = 0; i < n; i++) {
        cJSON *j = cJSON_Parse(lines[i]);
        const char *id = cJSON_GetObjectItem(j, "_id")->valuestring;
        const char *t = cJSON_GetObjectItem(j, "title")->valuestring;
        const char *x = cJSON_GetObjectItem(j, "text")->valuestring;
        (*ids)[i] = strdup(id);
        size_t len = strlen(t) + strlen(x) + 2;
        (*texts)[i] = malloc(len);
        snprintf((*texts)[i], len, "%s%s%s", t, *t && *x ? " " : "", x);
        cJSON_Delete(j);
    }
    free_lines(lines, n);
    return n;
}

static const char *QUERY = "vitamin D deficiency and bone health in older adults";

/* ids_only searches return the very ids and scores of the full search, without title and text
 * (the dense stage reads them from the id map beside the FAISS file, index/idmap.h). */
static void assert_ids_only_same(kst_index *ix, const char *query, kst_search_opts so) {
    kst_error err;
    kst_hits *full, *ids;
    so.ids_only = 0;
    assert_ok(kst_index_search(ix, query, &so, &full, &err), &err);
    so.ids_only = 1;
    assert_ok(kst_index_search(ix, query, &so, &ids, &err), &err);
    assert_int_equal(ids->n, full->n);
    for (size_t i = 0; i < full->n; i++) {
        if (strcmp(ids->hit[i].id, full->hit[i].id) != 0)
            fail_msg("rank %zu: ids_only gives %s, the full search %s", i, ids->hit[i].id, full->hit[i].id);
        assert_true(ids->hit[i].score == full->hit[i].score);
        assert_int_equal(ids->hit[i].stage, full->hit[i].stage);
        assert_null(ids->hit[i].title);
        assert_null(ids->hit[i].text);
    }
    kst_hits_free(full);
    kst_hits_free(ids);
}

/* Names of the files in `dir` ending in `suffix`, counted; the last one into last. */
static int count_files(const char *dir, const char *suffix, char *last, size_t cap) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "ls '%s' | grep -c '%s$' > '%s/.count'; ls '%s' | grep '%s$' | tail -1 > '%s/.last'",
             dir, suffix, g_dir, dir, suffix, g_dir);
    assert_int_equal(system(cmd), 0);
    char path[600];
    snprintf(path, sizeof path, "%s/.count", g_dir);
    FILE *f = fopen(path, "r");
    int n = -1;
    assert_int_equal(fscanf(f, "%d", &n), 1);
    fclose(f);
    snprintf(path, sizeof path, "%s/.last", g_dir);
    f = fopen(path, "r");
    if (!fgets(last, (int)cap, f)) last[0] = '\0';
    last[strcspn(last, "\n")] = '\0';
    fclose(f);
    return n;
}

/* Dense stage of a Flat index = exhaustive inner product over the model's own vectors. */
static void test_dense_equals_exhaustive(void **s) {
    (void)s;
    kst_index *ix = build(sub("flat"), "Flat", 0, 0);
    kst_error err;
    kst_model *m;
    assert_ok(kst_model_open(FX "st_bert_mean", NULL, &m, &err), &err);
    char **ids, **texts;
    size_t n = corpus_texts(&ids, &texts);
    size_t dim = kst_model_dim(m);
    float *dv = malloc(n * dim * sizeof(float)), qv[64];
    assert_ok(kst_model_embed(m, (const char *const *)texts, NULL, n, NULL, dv, &err), &err);
    kst_encode_opts qo = kst_encode_opts_default();
    qo.is_query = 1;
    const char *q = QUERY;
    assert_ok(kst_model_embed(m, &q, NULL, 1, &qo, qv, &err), &err);
    double best[10];
    size_t besti[10];
    for (int r = 0; r < 10; r++) {
        best[r] = -1e30;
        for (size_t i = 0; i < n; i++) {
            int taken = 0;
            for (int p = 0; p < r; p++) taken |= besti[p] == i;
            if (taken) continue;
            double d = 0;
            for (size_t k = 0; k < dim; k++) d += (double)qv[k] * dv[i * dim + k];
            if (d > best[r]) {
                best[r] = d;
                besti[r] = i;
            }
        }
    }
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE;
    kst_hits *h;
    assert_ok(kst_index_search(ix, QUERY, &so, &h, &err), &err);
    assert_int_equal(h->n, 10);
    for (int r = 0; r < 10; r++) {
        if (strcmp(h->hit[r].id, ids[besti[r]]) != 0)
            fail_msg("rank %d: index says %s (%.6f), exhaustive %s (%.6f)", r, h->hit[r].id, h->hit[r].score,
                     ids[besti[r]], best[r]);
        assert_true(fabs(h->hit[r].score - best[r]) < 1e-5);
        assert_int_equal(h->hit[r].stage, KST_SEARCH_DENSE);
    }
    kst_hits_free(h);
    so.ids_only = 1;
    assert_ok(kst_index_search(ix, QUERY, &so, &h, &err), &err);
    assert_int_equal(h->n, 10);
    for (int r = 0; r < 10; r++) {
        assert_string_equal(h->hit[r].id, ids[besti[r]]);
        assert_true(fabs(h->hit[r].score - best[r]) < 1e-5);
        assert_null(h->hit[r].text);
    }
    kst_hits_free(h);
    kst_index_info in;
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    assert_int_equal(in.docs, NDOCS);
    assert_int_equal(in.vectors, NDOCS);
    assert_string_equal(in.factory, "Flat");
    kst_index_close(ix);
    kst_model_close(m);
    free(dv);
    for (size_t i = 0; i < n; i++) {
        free(ids[i]);
        free(texts[i]);
    }
    free(ids);
    free(texts);
}

/* MaxSim and cross-encoder stages score exactly what the models score for (query, document). */
static void test_rerank_stages(void **s) {
    (void)s;
    kst_index *ix = build(sub("full"), "Flat", 1, 1);
    kst_error err;
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE | KST_SEARCH_BM25 | KST_SEARCH_MAXSIM;
    so.k = 5;
    kst_hits *h;
    assert_ok(kst_index_search(ix, QUERY, &so, &h, &err), &err);
    assert_int_equal(h->n, 5);
    kst_model *cb, *ce;
    assert_ok(kst_model_open(FX "colbert", NULL, &cb, &err), &err);
    assert_ok(kst_model_open(FX "cross_bert", NULL, &ce, &err), &err);
    for (size_t i = 0; i < h->n; i++) {
        char text[65536];
        snprintf(text, sizeof text, "%s%s%s", h->hit[i].title ? h->hit[i].title : "", h->hit[i].title ? " " : "", h->hit[i].text);
        const char *q = QUERY, *p = text;
        float want;
        assert_ok(kst_model_score(cb, &q, NULL, &p, NULL, 1, NULL, &want, &err), &err);
        /* token vectors are stored as float16: MaxSim over 12 query vectors moves by < 1e-2 */
        if (fabs(h->hit[i].score - want) > 1e-2)
            fail_msg("MaxSim of %s: index %.6f, model %.6f", h->hit[i].id, h->hit[i].score, want);
        assert_int_equal(h->hit[i].stage, KST_SEARCH_MAXSIM);
        if (i) assert_true(h->hit[i - 1].score >= h->hit[i].score);
    }
    kst_hits_free(h);
    so.stages = KST_SEARCH_DENSE | KST_SEARCH_CROSS;
    so.cross_k = 8;
    assert_ok(kst_index_search(ix, QUERY, &so, &h, &err), &err);
    for (size_t i = 0; i < h->n; i++) {
        char text[65536];
        snprintf(text, sizeof text, "%s%s%s", h->hit[i].title ? h->hit[i].title : "", h->hit[i].title ? " " : "", h->hit[i].text);
        const char *q = QUERY, *p = text;
        float want;
        assert_ok(kst_model_score(ce, &q, NULL, &p, NULL, 1, NULL, &want, &err), &err);
        assert_true(fabs(h->hit[i].score - want) <= 1e-5 + 1e-4 * fabs(want));
        assert_int_equal(h->hit[i].stage, KST_SEARCH_CROSS);
    }
    kst_hits_free(h);
    kst_model_close(cb);
    kst_model_close(ce);
    kst_index_close(ix);
}

/* Re-adding an id replaces the document everywhere; deleting removes it everywhere. */
static void test_replace_and_delete(void **s) {
    (void)s;
    kst_index *ix = build(sub("upd"), NULL, 1, 0);
    kst_error err;
    const char *upd = sub("upd.tsv");
    FILE *fp = fopen(upd, "w");
    fprintf(fp, "4983\tZebra stripes\tquokka marsupials photographed in the xylophone desert\n");
    fprintf(fp, "new-doc-1\tfresh\tan entirely new quokka document\n");
    fclose(fp);
    kst_add_stats st;
    assert_ok(kst_index_add_file(ix, upd, "tsv", NULL, NULL, &st, &err), &err);
    assert_int_equal(st.docs, 2);
    assert_int_equal(st.replaced, 1);
    kst_search_opts all = kst_search_opts_default();
    all.stages = KST_SEARCH_DENSE;
    all.k = all.dense_n = NDOCS + 1;
    assert_ids_only_same(ix, "xylophone quokka", all);
    kst_index_info in;
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    assert_int_equal(in.docs, NDOCS + 1);
    assert_int_equal(in.vectors, NDOCS + 1);
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_BM25;
    kst_hits *h;
    assert_ok(kst_index_search(ix, "xylophone quokka", &so, &h, &err), &err);
    assert_int_equal(h->n, 2);
    assert_string_equal(h->hit[0].id, "4983");
    kst_hits_free(h);
    /* MaxSim over the replaced document reads its new token vectors */
    so.stages = KST_SEARCH_BM25 | KST_SEARCH_MAXSIM;
    assert_ok(kst_index_search(ix, "xylophone quokka", &so, &h, &err), &err);
    assert_int_equal(h->n, 2);
    kst_hits_free(h);
    const char *gone[] = {"4983", "new-doc-1", "no-such-id"};
    size_t removed = 0;
    assert_ok(kst_index_delete(ix, gone, 3, &removed, &err), &err);
    assert_int_equal(removed, 2);
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    assert_int_equal(in.docs, NDOCS - 1);
    assert_int_equal(in.vectors, NDOCS - 1);
    so.stages = KST_SEARCH_BM25;
    assert_ok(kst_index_search(ix, "xylophone quokka", &so, &h, &err), &err);
    assert_int_equal(h->n, 0);
    kst_hits_free(h);
    so.stages = KST_SEARCH_DENSE;
    so.k = NDOCS;
    so.dense_n = NDOCS;
    assert_ok(kst_index_search(ix, "anything", &so, &h, &err), &err);
    assert_int_equal(h->n, NDOCS - 1);
    for (size_t i = 0; i < h->n; i++) assert_true(strcmp(h->hit[i].id, "4983") != 0);
    kst_hits_free(h);
    assert_ids_only_same(ix, "anything", so);
    so.stages = KST_SEARCH_DENSE | KST_SEARCH_BM25 | KST_SEARCH_MAXSIM;
    assert_ids_only_same(ix, "vitamin quokka", so);
    kst_index_close(ix);
    /* reopened from disk: the same state */
    kst_index_opts ro = kst_index_opts_default();
    ro.readonly = 1;
    assert_ok(kst_index_open(sub("upd"), &ro, &ix, &err), &err);
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    assert_int_equal(in.docs, NDOCS - 1);
    assert_int_equal(in.vectors, NDOCS - 1);
    so.stages = KST_SEARCH_DENSE;
    assert_ids_only_same(ix, "anything", so);
    kst_index_close(ix);
    /* three writes, one map per FAISS file: the current generation's and the one before */
    char last[256], faiss_last[256];
    assert_int_equal(count_files(sub("upd"), ".ids", last, sizeof last), 2);
    assert_int_equal(count_files(sub("upd"), ".faiss", faiss_last, sizeof faiss_last), 2);
    assert_int_equal(strncmp(last, faiss_last, strlen(last) - 4), 0);
}

/* Opening with another dense model than the index was built with is refused, saying so. */
static void test_model_mismatch(void **s) {
    (void)s;
    kst_index *ix = build(sub("mm"), NULL, 0, 0);
    kst_index_close(ix);
    kst_index_opts o = kst_index_opts_default();
    o.model = FX "st_bert_cls_dense";
    kst_error err;
    assert_int_equal(kst_index_open(sub("mm"), &o, &ix, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "fingerprint");
    assert_msg_has(err.msg, "rebuild the index");
    assert_null(ix);
}

/* A malformed line stops the add with file and line; nothing of that add is kept. */
static void test_bad_collection_keeps_index(void **s) {
    (void)s;
    kst_index *ix = build(sub("bad"), NULL, 1, 0);
    kst_error err;
    kst_index_info before, after;
    assert_ok(kst_index_info_get(ix, &before, &err), &err);
    const char *bad = sub("bad.jsonl");
    FILE *fp = fopen(bad, "w");
    fprintf(fp, "{\"_id\": \"a1\", \"title\": \"\", \"text\": \"fine\"}\n{\"_id\": \"a2\", \"text\": 5}\n");
    fclose(fp);
    assert_int_equal(kst_index_add_file(ix, bad, NULL, NULL, NULL, NULL, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "line 2");
    assert_ok(kst_index_info_get(ix, &after, &err), &err);
    assert_int_equal(after.docs, before.docs);
    assert_int_equal(after.vectors, before.vectors);
    assert_int_equal(after.generation, before.generation);
    kst_index_close(ix);
    /* and the folder is refused as a target for a new build */
    assert_int_equal(kst_index_create(sub("bad"), NULL, &ix, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "not empty");
}

/* Reopens the crash-test index: it must hold want_a or want_b documents, with SQLite, FAISS and
 * the token store in agreement. Returns the count. */
static int64_t check_after_kill(const char *label, int64_t want_a, int64_t want_b) {
    kst_index *ix;
    kst_error err;
    assert_ok(kst_index_open(sub("crash"), NULL, &ix, &err), &err);
    kst_index_info in;
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    printf("  %s: %lld documents, generation %lld\n", label, (long long)in.docs, (long long)in.generation);
    if (in.docs != want_a && in.docs != want_b)
        fail_msg("%s: %lld documents, expected %lld or %lld", label, (long long)in.docs, (long long)want_a, (long long)want_b);
    assert_int_equal(in.vectors, in.docs);
    /* every vector maps to a live document, and its token vectors read back */
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE | KST_SEARCH_MAXSIM;
    so.k = 50;
    kst_hits *h;
    assert_ok(kst_index_search(ix, "crash document", &so, &h, &err), &err);
    assert_int_equal(h->n, 50);
    kst_hits_free(h);
    so.stages = KST_SEARCH_DENSE;
    assert_ids_only_same(ix, "crash document", so);
    kst_index_close(ix);
    return in.docs;
}

/* Runs `kestrel index add` on `path` in a child process killed after delay_ms (or by the
 * engine's own kill hook). A fresh process, not a bare fork: OpenMP's thread pool does not
 * survive fork, so a forked child of this (multi-threaded) test would hang. */
static void add_in_child(const char *path_in, int delay_ms, const char *kill_hook) {
    char path[512], dir[512]; /* own copies: sub() reuses its buffers */
    snprintf(path, sizeof path, "%s", path_in);
    snprintf(dir, sizeof dir, "%s", sub("crash"));
    const char *kestrel = getenv("KESTREL");
    if (!kestrel || !*kestrel) kestrel = "build/kestrel";
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (kill_hook) setenv("KESTREL_TEST_KILL", kill_hook, 1);
        execl(kestrel, kestrel, "index", "add", "--index", dir, "--collection", path,
              "--format", "tsv", (char *)NULL);
        _exit(127);
    }
    if (delay_ms >= 0) {
        usleep((useconds_t)delay_ms * 1000);
        kill(pid, SIGKILL);
    }
    int status;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127) fail_msg("cannot run %s (set KESTREL)", kestrel);
    if (kill_hook && !(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
        fail_msg("the add with KESTREL_TEST_KILL=%s ended with %s %d instead of being killed", kill_hook,
                 WIFEXITED(status) ? "exit code" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
}

/* kill -9 during an add: the index reopens with the old or the new content, never a mix, and
 * SQLite, FAISS and the token store agree. */
static void test_crash_during_add(void **s) {
    (void)s;
    kst_index *ix = build(sub("crash"), NULL, 1, 0);
    kst_index_close(ix);
    char big[512], more[512];
    snprintf(big, sizeof big, "%s", sub("big.tsv"));
    snprintf(more, sizeof more, "%s", sub("more.tsv"));
    FILE *fp = fopen(big, "w");
    for (int i = 0; i < 1500; i++) fprintf(fp, "c%d\tcrash doc %d\tthe text of crash document number %d\n", i, i, i);
    fclose(fp);
    fp = fopen(more, "w");
    for (int i = 0; i < 30; i++) fprintf(fp, "m%d\tmore %d\tanother crash document %d\n", i, i, i);
    fclose(fp);
    int delays_ms[] = {20, 80};
    char label[64];
    int64_t n = NDOCS;
    for (size_t t = 0; t < 2; t++) {
        add_in_child(big, delays_ms[t], NULL);
        snprintf(label, sizeof label, "killed after %d ms", delays_ms[t]);
        n = check_after_kill(label, n, NDOCS + 1500);
    }
    /* the two sides of the commit, exactly */
    add_in_child(more, -1, "before_commit");
    check_after_kill("killed just before the commit", n, n);
    add_in_child(more, -1, "after_commit");
    check_after_kill("killed just after the commit", n + 30, n + 30);
}

/* One open index, many threads searching at once: the same hits as one thread alone. */
typedef struct job {
    kst_index *ix;
    const char *query;
    char first[64];
    double score;
    int rc;
} job;

static void *search_thread(void *arg) {
    job *j = arg;
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE | KST_SEARCH_BM25 | KST_SEARCH_MAXSIM | KST_SEARCH_CROSS;
    for (int rep = 0; rep < 5; rep++) {
        kst_hits *h = NULL;
        kst_error err;
        j->rc = kst_index_search(j->ix, j->query, &so, &h, &err);
        if (j->rc != KST_OK) return NULL;
        snprintf(j->first, sizeof j->first, "%s", h->n ? h->hit[0].id : "");
        j->score = h->n ? h->hit[0].score : 0;
        kst_hits_free(h);
    }
    return NULL;
}

static void test_concurrent_searches(void **s) {
    (void)s;
    kst_index *ix = build(sub("threads"), NULL, 1, 1);
    const char *queries[] = {QUERY, "cancer cells and tumor growth", "protein folding", "gene expression in mice"};
    enum { NT = 8 };
    job serial[NT], par[NT];
    pthread_t th[NT];
    for (int i = 0; i < NT; i++) {
        serial[i] = (job){ix, queries[i % 4], "", 0, 0};
        search_thread(&serial[i]);
        assert_int_equal(serial[i].rc, KST_OK);
        par[i] = (job){ix, queries[i % 4], "", 0, 0};
    }
    for (int i = 0; i < NT; i++) pthread_create(&th[i], NULL, search_thread, &par[i]);
    for (int i = 0; i < NT; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < NT; i++) {
        assert_int_equal(par[i].rc, KST_OK);
        assert_string_equal(par[i].first, serial[i].first);
        assert_true(par[i].score == serial[i].score);
    }
    kst_index_close(ix);
}

/* The id map beside the FAISS file: a truncated one is refused at open naming it; without one
 * (an index written before it existed) searches read external ids from SQLite, same hits. */
static void test_idmap_damage(void **s) {
    (void)s;
    kst_index *ix = build(sub("idmap"), "Flat", 0, 0);
    kst_index_close(ix);
    char name[256], path[600], cmd[2000];
    assert_int_equal(count_files(sub("idmap"), ".ids", name, sizeof name), 1);
    snprintf(path, sizeof path, "%s/%s", sub("idmap"), name);
    snprintf(cmd, sizeof cmd, "cp '%s' '%s.bak' && truncate -s -3 '%s'", path, path, path);
    assert_int_equal(system(cmd), 0);
    kst_error err;
    kst_index_opts ro = kst_index_opts_default();
    ro.readonly = 1;
    assert_int_equal(kst_index_open(sub("idmap"), &ro, &ix, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, name);
    assert_msg_has(err.msg, "truncated");
    snprintf(cmd, sizeof cmd, "printf 'not a map at all, forty-some bytes of text......' > '%s'", path);
    assert_int_equal(system(cmd), 0);
    assert_int_equal(kst_index_open(sub("idmap"), &ro, &ix, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "not a kestrel id map");
    /* no map: the ids come from SQLite, the same as the full search's */
    unlink(path);
    assert_ok(kst_index_open(sub("idmap"), &ro, &ix, &err), &err);
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE;
    so.k = so.dense_n = NDOCS;
    assert_ids_only_same(ix, QUERY, so);
    kst_index_close(ix);
    /* and the intact map gives them too */
    snprintf(cmd, sizeof cmd, "mv '%s.bak' '%s'", path, path);
    assert_int_equal(system(cmd), 0);
    assert_ok(kst_index_open(sub("idmap"), &ro, &ix, &err), &err);
    assert_ids_only_same(ix, QUERY, so);
    kst_index_close(ix);
}

/* A BM25-only index needs no model; asking it for the dense stage says what is missing. */
static void test_bm25_only(void **s) {
    (void)s;
    kst_index *ix = NULL;
    kst_error err;
    assert_ok(kst_index_create(sub("bm25"), NULL, &ix, &err), &err);
    assert_ok(kst_index_add_file(ix, g_corpus, "beir", NULL, NULL, NULL, &err), &err);
    kst_hits *h;
    assert_ok(kst_index_search(ix, "vitamin D", NULL, &h, &err), &err);
    assert_true(h->n > 0);
    assert_int_equal(h->hit[0].stage, KST_SEARCH_BM25);
    kst_hits_free(h);
    kst_search_opts so = kst_search_opts_default();
    assert_ids_only_same(ix, "vitamin D", so);
    so.stages = KST_SEARCH_DENSE;
    assert_int_equal(kst_index_search(ix, "vitamin D", &so, &h, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "dense model");
    kst_index_close(ix);
}

/* IVF-PQ through the factory string: trained on the collection, searched with nprobe. */
static void test_ivfpq_factory(void **s) {
    (void)s;
    kst_index *ix = build(sub("ivf"), "IVF4,PQ4x4", 0, 0);
    kst_error err;
    kst_index_info in;
    assert_ok(kst_index_info_get(ix, &in, &err), &err);
    assert_int_equal(in.vectors, NDOCS);
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE;
    so.nprobe = 4; /* every list: the ranking is then PQ's only */
    kst_hits *h;
    assert_ok(kst_index_search(ix, QUERY, &so, &h, &err), &err);
    assert_int_equal(h->n, 10);
    kst_hits_free(h);
    kst_index_close(ix);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dense_equals_exhaustive),
        cmocka_unit_test(test_rerank_stages),
        cmocka_unit_test(test_replace_and_delete),
        cmocka_unit_test(test_model_mismatch),
        cmocka_unit_test(test_bad_collection_keeps_index),
        cmocka_unit_test(test_crash_during_add),
        cmocka_unit_test(test_concurrent_searches),
        cmocka_unit_test(test_bm25_only),
        cmocka_unit_test(test_ivfpq_factory),
        cmocka_unit_test(test_idmap_damage),
    };
    return cmocka_run_group_tests_name("engine", tests, setup, teardown);
}
