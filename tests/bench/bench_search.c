/* bench_search.c - search and indexing through the public API (kst_index_*), each figure beside an
 * anchor measured in the same process: raw FAISS on the very same index file, the dense stage
 * alone, and `kestrel embed` of the same texts. Prints a text table on stdout; asserts nothing.
 *
 * usage: bench_search KESTREL_BIN DATA_DIR OUT_DIR THREADS MINILM_DIR|-
 *   DATA_DIR  ../shared/data (minilm-reference-embeddings/, beir-scifact/)
 *   MINILM_DIR the real all-MiniLM-L6-v2 folder, or "-" when absent (its parts are skipped)
 * Environment (defaults): KESTREL_BENCH_SEARCH_N (1000000 synthetic vectors), _FACTORY
 *   (IVF1024,PQ48), _ROUNDS (3), _QUERIES (1000 vector queries), _TEXT_QUERIES (300),
 *   _MAXSIM_DOCS (3000), _MAXSIM_MINILM_DOCS (1000; 0 skips), _SECTIONS ("dense,maxsim,index").
 *
 * How the query encoding is factored out without touching library code: this program is linked
 * with -Wl,--wrap=kst_encoder_embed (and a few more --wrap's that only time calls), so every call
 * the library makes to the dense encoder lands in __wrap_kst_encoder_embed below. That function
 * (a) for a query, when the bench has set g_query, copies that precomputed vector instead of
 * running the model, else runs the model, times it and keeps a copy of the vector; (b) for a
 * document whose text is "v<i>" while g_table is set, writes vector i of the bench's vector set
 * (the 778 real MiniLM embeddings, or the synthetic 1M set) instead of running the model. The
 * rest of kst_index_add_file / kst_index_search (SQLite, FTS5, FAISS train/add/write, reader
 * pool, candidate handling, document fetch) is the library's own code path.
 *
 * The synthetic set: vector i = normalise(c + 0.03 * g), c one of the 778 real embeddings picked
 * by a hash of i, g a standard Gaussian in 384 dimensions (splitmix64 + Box-Muller, so the same
 * on every run); queries are drawn the same way from indices 2^40 + j. The 0.03 per dimension
 * gives each point a cosine of about 0.86 to its centre.
 */
#define _POSIX_C_SOURCE 200809L
#include <cjson/cJSON.h>
#include <dirent.h>
#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/index_io_c.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "api/kestrel.h"
#include "encoders/encoder.h"
#include "index/ann.h"
#include "index/store.h"
#include "index/tokens.h"

#define DIM 384
#define NREAL 778
#define SIGMA 0.03f

/* ------------------------------------------------------------------------------------------ */
/* helpers */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const kst_error *e) {
    fprintf(stderr, "bench_search: %s: %s\n", what, e ? e->msg : "");
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "bench_search: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static long env_long(const char *name, long def) {
    const char *s = getenv(name);
    return s && *s ? strtol(s, NULL, 10) : def;
}

static const char *env_str(const char *name, const char *def) {
    const char *s = getenv(name);
    return s && *s ? s : def;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (p in (0, 1]) of v (n), sorting v. */
static double pct(double *v, size_t n, double p) {
    qsort(v, n, sizeof *v, cmp_double);
    size_t r = (size_t)ceil(p * (double)n);
    return v[r ? r - 1 : 0];
}

static double mean(const double *v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += v[i];
    return n ? s / (double)n : 0;
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double unif(uint64_t *s) { return ((double)(splitmix(s) >> 11) + 0.5) / 9007199254740992.0; }

static float *g_real; /* (NREAL, DIM) the real all-MiniLM-L6-v2 embeddings */

/* Vector i of the synthetic set (see the top comment). */
static void synth_vec(uint64_t i, float *out) {
    uint64_t s = i * 0xD1B54A32D192ED03ull + 12345;
    const float *c = g_real + (splitmix(&s) % NREAL) * DIM;
    double nn = 0;
    for (int d = 0; d < DIM; d += 2) {
        double r = sqrt(-2.0 * log(unif(&s))), th = 6.283185307179586 * unif(&s);
        out[d] = c[d] + SIGMA * (float)(r * cos(th));
        out[d + 1] = c[d + 1] + SIGMA * (float)(r * sin(th));
        nn += (double)out[d] * out[d] + (double)out[d + 1] * out[d + 1];
    }
    float inv = (float)(1.0 / sqrt(nn));
    for (int d = 0; d < DIM; d++) out[d] *= inv;
}

/* ------------------------------------------------------------------------------------------ */
/* the wrapped library entry points (-Wl,--wrap=...) */

enum { TABLE_OFF = 0, TABLE_REAL, TABLE_SYNTH };
static int g_table;            /* documents "v<i>" get vector i of this set */
static const float *g_query;   /* a query gets this vector instead of being encoded */
static float g_captured[4096]; /* the last query vector the model produced */
static int g_timing;           /* accumulate the timers below */
static double t_encode, t_ann, t_get, t_colbert_q, t_get_tokens, t_tokens_read;

int __real_kst_encoder_embed(kst_encoder *e, const char *const *texts, const size_t *lens, size_t n,
                             int is_query, size_t max_len, size_t batch, float *out, kst_error *err);
int __wrap_kst_encoder_embed(kst_encoder *e, const char *const *texts, const size_t *lens, size_t n,
                             int is_query, size_t max_len, size_t batch, float *out, kst_error *err) {
    if (is_query && g_query && n == 1) {
        memcpy(out, g_query, e->dim * sizeof(float));
        return KST_OK;
    }
    if (!is_query && g_table) {
        if (e->dim != DIM) die("the dense model is not 384-d; the vector sets need a 384-d model", NULL);
        int bad = 0;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            const char *t = texts[i];
            char *end;
            unsigned long long v = t[0] == 'v' ? strtoull(t + 1, &end, 10) : 0;
            if (t[0] != 'v' || *end || (g_table == TABLE_REAL && v >= NREAL)) {
                bad = 1;
                continue;
            }
            if (g_table == TABLE_REAL) memcpy(out + i * DIM, g_real + v * DIM, DIM * sizeof(float));
            else synth_vec(v, out + i * DIM);
        }
        if (bad) die("a document text is not \"v<i>\" while the vector table is on", NULL);
        return KST_OK;
    }
    double t0 = now();
    int rc = __real_kst_encoder_embed(e, texts, lens, n, is_query, max_len, batch, out, err);
    if (g_timing) t_encode += now() - t0;
    if (rc == KST_OK && is_query && n == 1 && e->dim <= 4096) memcpy(g_captured, out, e->dim * sizeof(float));
    return rc;
}

int __real_kst_encoder_embed_tokens(kst_encoder *e, const char *const *texts, const size_t *lens,
                                    size_t n, int is_query, size_t max_len, size_t batch, float **vecs,
                                    size_t *total, int64_t *offsets, kst_error *err);
int __wrap_kst_encoder_embed_tokens(kst_encoder *e, const char *const *texts, const size_t *lens,
                                    size_t n, int is_query, size_t max_len, size_t batch, float **vecs,
                                    size_t *total, int64_t *offsets, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_encoder_embed_tokens(e, texts, lens, n, is_query, max_len, batch, vecs, total,
                                             offsets, err);
    if (g_timing && is_query) t_colbert_q += now() - t0;
    return rc;
}

int __real_kst_ann_search(const kst_ann *a, int64_t nq, int dim, const float *q, int64_t k,
                          const kst_ann_search_opts *opts, float *scores, int64_t *ids, kst_error *err);
int __wrap_kst_ann_search(const kst_ann *a, int64_t nq, int dim, const float *q, int64_t k,
                          const kst_ann_search_opts *opts, float *scores, int64_t *ids, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_ann_search(a, nq, dim, q, k, opts, scores, ids, err);
    if (g_timing) t_ann += now() - t0;
    return rc;
}

int __real_kst_store_get(kst_store *s, int64_t id, kst_store_doc *out, kst_error *err);
int __wrap_kst_store_get(kst_store *s, int64_t id, kst_store_doc *out, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_store_get(s, id, out, err);
    if (g_timing) t_get += now() - t0;
    return rc;
}

int __real_kst_store_get_many(kst_store *s, const int64_t *ids, size_t n, kst_store_doc *out, kst_error *err);
int __wrap_kst_store_get_many(kst_store *s, const int64_t *ids, size_t n, kst_store_doc *out, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_store_get_many(s, ids, n, out, err);
    if (g_timing) t_get += now() - t0;
    return rc;
}

int __real_kst_store_get_tokens(kst_store *s, int64_t id, uint64_t *first, uint64_t *count, kst_error *err);
int __wrap_kst_store_get_tokens(kst_store *s, int64_t id, uint64_t *first, uint64_t *count, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_store_get_tokens(s, id, first, count, err);
    if (g_timing) t_get_tokens += now() - t0;
    return rc;
}

int __real_kst_tokens_read(kst_tokens *t, uint64_t first, size_t n, float *out, kst_error *err);
int __wrap_kst_tokens_read(kst_tokens *t, uint64_t first, size_t n, float *out, kst_error *err) {
    double t0 = now();
    int rc = __real_kst_tokens_read(t, first, n, out, err);
    if (g_timing) t_tokens_read += now() - t0;
    return rc;
}

static void timers_reset(void) { t_encode = t_ann = t_get = t_colbert_q = t_get_tokens = t_tokens_read = 0; }

/* ------------------------------------------------------------------------------------------ */
/* inputs */

static float *read_real(const char *data) {
    char path[4096];
    snprintf(path, sizeof path, "%s/minilm-reference-embeddings/embeddings.bin", data);
    FILE *f = fopen(path, "rb");
    float *v = xmalloc((size_t)NREAL * DIM * sizeof(float));
    if (!f || fread(v, sizeof(float), (size_t)NREAL * DIM, f) != (size_t)NREAL * DIM) {
        fprintf(stderr, "bench_search: cannot read %d x %d float32 from %s\n", NREAL, DIM, path);
        exit(1);
    }
    fclose(f);
    return v;
}

/* The first n query texts of a BEIR queries.jsonl (malloc'd strings); *got how many. */
static char **read_queries(const char *path, size_t n, size_t *got) {
    FILE *f = fopen(path, "r");
    if (!f) die(path, NULL);
    char **q = xmalloc(n * sizeof *q);
    char *line = NULL;
    size_t cap = 0;
    *got = 0;
    while (*got < n && getline(&line, &cap, f) > 0) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *t = j ? cJSON_GetObjectItemCaseSensitive(j, "text") : NULL;
        if (cJSON_IsString(t)) q[(*got)++] = strdup(t->valuestring);
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    return q;
}

static void rm_rf(const char *dir) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) die("rm -rf failed", NULL);
}

/* The one committed FAISS file of an index folder. */
static void faiss_file(const char *dir, char *out, size_t cap) {
    DIR *d = opendir(dir);
    struct dirent *e;
    out[0] = '\0';
    while (d && (e = readdir(d)))
        if (strncmp(e->d_name, "dense.", 6) == 0 && strstr(e->d_name, ".faiss") &&
            !strstr(e->d_name, "tmp"))
            snprintf(out, cap, "%s/%s", dir, e->d_name);
    if (d) closedir(d);
    if (!out[0]) die("no dense.*.faiss in the index folder", NULL);
}

static kst_index *build(const char *dir, const char *model, const char *colbert, const char *factory,
                        const char *coll, const char *format, int threads, kst_add_stats *st,
                        double *wall) {
    kst_error err;
    kst_index *ix = NULL;
    rm_rf(dir);
    kst_index_opts o = kst_index_opts_default();
    o.model = model;
    o.colbert = colbert;
    o.factory = factory;
    o.num_threads = threads;
    if (kst_index_create(dir, &o, &ix, &err) != KST_OK) die(dir, &err);
    double t0 = now();
    if (kst_index_add_file(ix, coll, format, NULL, NULL, st, &err) != KST_OK) die(coll, &err);
    *wall = now() - t0;
    kst_index_close(ix);
    o.readonly = 1;
    o.model = o.colbert = NULL;
    o.factory = NULL;
    if (kst_index_open(dir, &o, &ix, &err) != KST_OK) die(dir, &err);
    return ix;
}

static void print_add_stats(const char *what, const kst_add_stats *s, double wall, int encode_real) {
    double n = (double)s->docs;
#define RATE(x) ((x) > 0 ? n / (x) : INFINITY)
    printf("  %s: %zu docs in %.2f s wall = %.0f docs/s\n", what, s->docs, wall, n / wall);
    printf("    per stage (docs/s over that stage's seconds): read %.0f (%.2f s) | store %.0f (%.2f s) | "
           "encode %s | train %.0f (%.2f s) | add %.0f (%.2f s) | write %.0f (%.2f s)\n",
           RATE(s->read_s), s->read_s, RATE(s->store_s), s->store_s,
           encode_real ? "see below" : "substituted by the bench's vector set", RATE(s->train_s),
           s->train_s, RATE(s->add_s), s->add_s, RATE(s->write_s), s->write_s);
    if (s->note[0]) printf("    note: %s\n", s->note);
#undef RATE
}

/* ------------------------------------------------------------------------------------------ */
/* 1. dense search: kst_index_search against raw FAISS on the same file */

static void dense_set(const char *label, const char *dir, const char *factory, int threads,
                      const float *qv, size_t nq, char **tq, size_t ntq, int rounds) {
    kst_error err;
    char path[4200];
    faiss_file(dir, path, sizeof path);
    kst_index *ix = NULL;
    kst_index_opts o = kst_index_opts_default();
    o.readonly = 1;
    o.num_threads = threads;
    if (kst_index_open(dir, &o, &ix, &err) != KST_OK) die(dir, &err);
    kst_index_info info;
    if (kst_index_info_get(ix, &info, &err) != KST_OK) die(dir, &err);

    FaissIndex *fx = NULL;
    if (faiss_read_index_fname(path, 0, &fx) != 0) die(faiss_get_last_error(), NULL);
    int is_ivf = strstr(info.factory, "IVF") != NULL;
    if (is_ivf) {
        FaissParameterSpace *ps = NULL;
        if (faiss_ParameterSpace_new(&ps) != 0 || faiss_ParameterSpace_set_index_parameter(ps, fx, "nprobe", 16) != 0)
            die(faiss_get_last_error(), NULL);
        faiss_ParameterSpace_free(ps);
    }
    kst_ann *ann = NULL;
    if (kst_ann_read(path, KST_ANN_MMAP_AUTO, &ann, &err) != KST_OK) die(path, &err);
    kst_ann_search_opts ao = {16, 64};

    const int64_t K = 100;
    float *D = xmalloc(K * sizeof *D);
    int64_t *L = xmalloc(K * sizeof *L);
    kst_search_opts so = kst_search_opts_default();
    so.stages = KST_SEARCH_DENSE;
    so.k = 10;
    so.dense_n = (size_t)K;
    so.nprobe = 16;
    double *traw = xmalloc(nq * rounds * sizeof(double)), *tann = xmalloc(nq * rounds * sizeof(double)),
           *tkst = xmalloc(nq * rounds * sizeof(double)), *tids = xmalloc(nq * rounds * sizeof(double));
    double ann_in_kst = 0, get_in_kst = 0;
    kst_search_opts sio = so;
    sio.ids_only = 1;

    /* warm-up pass, which also checks that the public API returns raw FAISS's top 10 */
    size_t agree = 0;
    for (size_t q = 0; q < nq; q++) {
        const float *x = qv + q * DIM;
        if (faiss_Index_search(fx, 1, x, K, D, L) != 0) die(faiss_get_last_error(), NULL);
        if (__real_kst_ann_search(ann, 1, DIM, x, K, &ao, D, L, &err) != KST_OK) die("kst_ann_search", &err);
        g_query = x;
        kst_hits *h = NULL;
        if (kst_index_search(ix, "q", &so, &h, &err) != KST_OK) die("kst_index_search", &err);
        g_query = NULL;
        int same = h->n == 10;
        for (size_t i = 0; same && i < h->n; i++) {
            char want[32];
            snprintf(want, sizeof want, "d%lld", (long long)(L[i] - 1)); /* internal ids start at 1 */
            same = strcmp(h->hit[i].id, want) == 0 || fabs(h->hit[i].score - D[i]) < 1e-6;
        }
        kst_hits *hi = NULL;
        g_query = x;
        if (kst_index_search(ix, "q", &sio, &hi, &err) != KST_OK) die("kst_index_search ids_only", &err);
        g_query = NULL;
        same = same && hi->n == h->n;
        for (size_t i = 0; same && i < h->n; i++) same = strcmp(h->hit[i].id, hi->hit[i].id) == 0;
        kst_hits_free(hi);
        agree += (size_t)same;
        kst_hits_free(h);
    }
    /* timed rounds: the four calls interleaved per query, their order rotated per round */
    g_timing = 1;
    for (int r = 0; r < rounds; r++) {
        for (size_t q = 0; q < nq; q++) {
            const float *x = qv + q * DIM;
            size_t at = (size_t)r * nq + q;
            for (int j = 0; j < 4; j++) {
                int which = (j + r + (int)q) % 4;
                double t0 = now();
                if (which == 0) {
                    if (faiss_Index_search(fx, 1, x, K, D, L) != 0) die(faiss_get_last_error(), NULL);
                    traw[at] = now() - t0;
                } else if (which == 1) {
                    if (__real_kst_ann_search(ann, 1, DIM, x, K, &ao, D, L, &err) != KST_OK) die("ann", &err);
                    tann[at] = now() - t0;
                } else if (which == 3) {
                    g_query = x;
                    kst_hits *h = NULL;
                    t0 = now();
                    if (kst_index_search(ix, "q", &sio, &h, &err) != KST_OK) die("kst_index_search ids_only", &err);
                    kst_hits_free(h);
                    tids[at] = now() - t0;
                    g_query = NULL;
                } else {
                    timers_reset();
                    g_query = x;
                    kst_hits *h = NULL;
                    t0 = now();
                    if (kst_index_search(ix, "q", &so, &h, &err) != KST_OK) die("kst_index_search", &err);
                    kst_hits_free(h);
                    tkst[at] = now() - t0;
                    g_query = NULL;
                    ann_in_kst += t_ann;
                    get_in_kst += t_get;
                }
            }
        }
    }
    size_t ns = nq * (size_t)rounds;
    double mraw = mean(traw, ns), mann = mean(tann, ns), mkst = mean(tkst, ns);
    double mann_k = ann_in_kst / (double)ns, mget_k = get_in_kst / (double)ns;
    double praw = pct(traw, ns, 0.5), pann = pct(tann, ns, 0.5), pkst = pct(tkst, ns, 0.5);
    double mids = mean(tids, ns), pids = pct(tids, ns, 0.5);
    printf("\n  %s: %lld vectors, %s, nprobe 16 (IVF), k = 100 from FAISS (kst_index_search returns the top 10 of "
           "those 100); %zu query vectors x %d rounds, interleaved\n",
           label, (long long)info.vectors, info.factory, nq, rounds);
    printf("    raw FAISS faiss_Index_search       mean %8.1f us  p50 %8.1f us   (anchor)\n", 1e6 * mraw, 1e6 * praw);
    printf("    kst_ann_search (index/ann.c)       mean %8.1f us  p50 %8.1f us | ratio %.3f (mean) %.3f (p50)\n",
           1e6 * mann, 1e6 * pann, mann / mraw, pann / praw);
    printf("    kst_index_search, vector given     mean %8.1f us  p50 %8.1f us | ratio %.3f (mean) %.3f (p50)  "
           "(target < 1.05)\n", 1e6 * mkst, 1e6 * pkst, mkst / mraw, pkst / praw);
    printf("    kst_index_search, ids_only = 1     mean %8.1f us  p50 %8.1f us | ratio %.3f (mean) %.3f (p50)  "
           "(target < 1.05; ids from the map beside the FAISS file, no row read)\n",
           1e6 * mids, 1e6 * pids, mids / mraw, pids / praw);
    printf("      inside it: FAISS (kst_ann_search) %.1f us, fetching the 10 hits (kst_store_get_many) %.1f us, "
           "the rest (reader pool, candidates, copies) %.1f us\n",
           1e6 * mann_k, 1e6 * mget_k, 1e6 * (mkst - mann_k - mget_k));
    printf("    check: kst_index_search's top 10 (full and ids_only) = raw FAISS's top 10 on %zu of %zu queries\n", agree, nq);

    /* text queries: the model encodes them inside kst_index_search; raw FAISS then searches the
     * very vector the model produced */
    if (ntq) {
        double *te = xmalloc(ntq * sizeof(double)), *tt = xmalloc(ntq * sizeof(double)),
               *tr = xmalloc(ntq * sizeof(double));
        for (size_t q = 0; q < ntq; q++) { /* warm-up */
            kst_hits *h = NULL;
            if (kst_index_search(ix, tq[q], &so, &h, &err) != KST_OK) die("kst_index_search", &err);
            kst_hits_free(h);
        }
        for (size_t q = 0; q < ntq; q++) {
            timers_reset();
            kst_hits *h = NULL;
            double t0 = now();
            if (kst_index_search(ix, tq[q], &so, &h, &err) != KST_OK) die("kst_index_search", &err);
            tt[q] = now() - t0;
            kst_hits_free(h);
            te[q] = t_encode;
            t0 = now();
            if (faiss_Index_search(fx, 1, g_captured, K, D, L) != 0) die(faiss_get_last_error(), NULL);
            tr[q] = now() - t0;
        }
        double me = mean(te, ntq), mt = mean(tt, ntq), mr = mean(tr, ntq);
        printf("    text queries (%zu SciFact claims; the index's model encodes them in the call):\n", ntq);
        printf("      kst_index_search %8.1f us = query encode %8.1f us (%.0f%%) + search path %6.1f us | "
               "raw FAISS on the same vectors %6.1f us | search path / raw FAISS = %.3f\n",
               1e6 * mt, 1e6 * me, 100 * me / mt, 1e6 * (mt - me), 1e6 * mr, (mt - me) / mr);
        free(te);
        free(tt);
        free(tr);
    }
    g_timing = 0;
    free(traw);
    free(tann);
    free(tkst);
    free(tids);
    free(D);
    free(L);
    kst_ann_free(ann);
    faiss_Index_free(fx);
    kst_index_close(ix);
}

static void section_dense(const char *data, const char *out, int threads, const char *minilm) {
    char dir[4096], coll[4096], qpath[4096];
    long n1m = env_long("KESTREL_BENCH_SEARCH_N", 1000000);
    const char *fac = env_str("KESTREL_BENCH_SEARCH_FACTORY", "IVF1024,PQ48");
    int rounds = (int)env_long("KESTREL_BENCH_SEARCH_ROUNDS", 3);
    size_t nq = (size_t)env_long("KESTREL_BENCH_SEARCH_QUERIES", 1000);
    size_t ntq = (size_t)env_long("KESTREL_BENCH_SEARCH_TEXT_QUERIES", 300), got = 0;
    snprintf(qpath, sizeof qpath, "%s/beir-scifact/queries.jsonl", data);
    char **tq = read_queries(qpath, ntq, &got);
    printf("\n1. Dense-only search: kst_index_search (public API) vs raw FAISS (faiss_Index_search through the "
           "FAISS C API on libfaiss) on the very same index file, %d threads\n", threads);
    printf("   The index's dense model is all-MiniLM-L6-v2; its document vectors are the bench's vector set and "
           "query vectors are given (the encoder call is wrapped, see bench_search.c), so the first rows compare "
           "the search path alone.\n");

    /* (a) the 778 real embeddings; queries: the same 778 vectors */
    snprintf(coll, sizeof coll, "%s/real778.tsv", out);
    FILE *f = fopen(coll, "w");
    if (!f) die(coll, NULL);
    for (int i = 0; i < NREAL; i++) fprintf(f, "d%d\tv%d\n", i, i);
    fclose(f);
    snprintf(dir, sizeof dir, "%s/ix_real778", out);
    kst_add_stats st;
    double wall;
    g_table = TABLE_REAL;
    kst_index *ix = build(dir, minilm, NULL, "auto", coll, "tsv", threads, &st, &wall);
    g_table = TABLE_OFF;
    kst_index_close(ix);
    dense_set("(a) 778 real all-MiniLM-L6-v2 embeddings (factory auto)", dir, "auto", threads, g_real, NREAL,
              tq, got, rounds);

    /* (b) the synthetic set */
    snprintf(coll, sizeof coll, "%s/synth.tsv", out);
    f = fopen(coll, "w");
    if (!f) die(coll, NULL);
    for (long i = 0; i < n1m; i++) fprintf(f, "d%ld\tv%ld\n", i, i);
    fclose(f);
    snprintf(dir, sizeof dir, "%s/ix_synth", out);
    g_table = TABLE_SYNTH;
    ix = build(dir, minilm, NULL, fac, coll, "tsv", threads, &st, &wall);
    g_table = TABLE_OFF;
    kst_index_close(ix);
    float *qv = xmalloc(nq * DIM * sizeof(float));
    for (size_t q = 0; q < nq; q++) synth_vec(((uint64_t)1 << 40) + q, qv + q * DIM);
    char label[256];
    snprintf(label, sizeof label, "(b) %ld synthetic vectors (Gaussian mixture around the 778, sigma %.2f per dim, "
             "normalised)", n1m, (double)SIGMA);
    dense_set(label, dir, fac, threads, qv, nq, tq, got, rounds);
    printf("    building (b) through kst_index_add_file (%s; FAISS trains on its own sample of at most 256 points "
           "per centroid):\n", fac);
    print_add_stats("    (b) index build", &st, wall, 0);
    free(qv);
    for (size_t i = 0; i < got; i++) free(tq[i]);
    free(tq);
}

/* ------------------------------------------------------------------------------------------ */
/* 2. single-query latency with MaxSim re-ranking of 100 candidates */

static void maxsim_set(const char *label, const char *data, const char *out, const char *dense,
                       const char *colbert, long ndocs, int threads, int rounds) {
    char dir[4096], coll[4096], src[4096], qpath[4096];
    snprintf(src, sizeof src, "%s/beir-scifact/corpus.jsonl", data);
    snprintf(coll, sizeof coll, "%s/scifact_%ld.jsonl", out, ndocs);
    FILE *in = fopen(src, "r"), *f = fopen(coll, "w");
    if (!in || !f) die(src, NULL);
    char *line = NULL;
    size_t cap = 0;
    long n = 0;
    while (n < ndocs && getline(&line, &cap, in) > 0) {
        fputs(line, f);
        n++;
    }
    free(line);
    fclose(in);
    fclose(f);
    snprintf(dir, sizeof dir, "%s/ix_maxsim_%s", out, strstr(label, "MiniLM") ? "minilm" : "fixture");
    kst_add_stats st;
    double wall;
    kst_index *ix = build(dir, dense, colbert, "auto", coll, "beir", threads, &st, &wall);
    kst_index_info info;
    kst_error err;
    if (kst_index_info_get(ix, &info, &err) != KST_OK) die(dir, &err);
    size_t nq = (size_t)env_long("KESTREL_BENCH_SEARCH_TEXT_QUERIES", 300), got = 0;
    snprintf(qpath, sizeof qpath, "%s/beir-scifact/queries.jsonl", data);
    char **tq = read_queries(qpath, nq, &got);
    kst_search_opts sd = kst_search_opts_default(), sm;
    sd.stages = KST_SEARCH_DENSE;
    sd.k = 10;
    sd.dense_n = 100;
    sm = sd;
    sm.stages = KST_SEARCH_DENSE | KST_SEARCH_MAXSIM;
    sm.maxsim_m = 100;
    size_t ns = got * (size_t)rounds;
    double *td = xmalloc(ns * sizeof(double)), *tm = xmalloc(ns * sizeof(double));
    double enc_d = 0, enc_m = 0, cq = 0, gt = 0, tr = 0;
    for (size_t q = 0; q < got; q++) { /* warm-up */
        kst_hits *h = NULL;
        if (kst_index_search(ix, tq[q], &sm, &h, &err) != KST_OK) die("kst_index_search", &err);
        kst_hits_free(h);
    }
    g_timing = 1;
    for (int r = 0; r < rounds; r++)
        for (size_t q = 0; q < got; q++)
            for (int j = 0; j < 2; j++) {
                int m = (j + r + (int)q) % 2;
                kst_hits *h = NULL;
                timers_reset();
                double t0 = now();
                if (kst_index_search(ix, tq[q], m ? &sm : &sd, &h, &err) != KST_OK) die("kst_index_search", &err);
                double t = now() - t0;
                if (m && h->n && h->hit[0].stage != KST_SEARCH_MAXSIM) die("the MaxSim stage did not run", NULL);
                kst_hits_free(h);
                if (m) {
                    tm[(size_t)r * got + q] = t;
                    enc_m += t_encode;
                    cq += t_colbert_q;
                    gt += t_get_tokens;
                    tr += t_tokens_read;
                } else {
                    td[(size_t)r * got + q] = t;
                    enc_d += t_encode;
                }
            }
    g_timing = 0;
    double dn = (double)ns, md = mean(td, ns), mm = mean(tm, ns);
    double d50 = pct(td, ns, 0.5), d99 = pct(td, ns, 0.99), m50 = pct(tm, ns, 0.5), m99 = pct(tm, ns, 0.99);
    printf("\n  %s: %lld SciFact docs (%s, %zu ColBERT token vectors), %zu queries x %d rounds, "
           "interleaved\n", label, (long long)info.docs, info.factory, st.tokens, got, rounds);
    printf("    dense only (anchor)            p50 %8.2f ms  p99 %8.2f ms  mean %8.2f ms\n", 1e3 * d50, 1e3 * d99, 1e3 * md);
    printf("    dense + MaxSim of top 100      p50 %8.2f ms  p99 %8.2f ms  mean %8.2f ms | ratio p50 %.2f  p99 %.2f  mean %.2f\n",
           1e3 * m50, 1e3 * m99, 1e3 * mm, m50 / d50, m99 / d99, mm / md);
    double extra = mm - md, other = extra - (cq + gt + tr) / dn - (enc_m - enc_d) / dn;
    printf("    MaxSim's extra %.2f ms per query: ColBERT query encode %.2f ms, token-row lookups in SQLite "
           "(100 x kst_store_get_tokens) %.2f ms, float16 rows read (kst_tokens_read) %.2f ms, "
           "MaxSim arithmetic and sort (the rest) %.2f ms\n",
           1e3 * extra, 1e3 * cq / dn, 1e3 * gt / dn, 1e3 * tr / dn, 1e3 * other);
    printf("    the dense stage's query encode: %.2f ms of the dense-only %.2f ms\n", 1e3 * enc_d / dn, 1e3 * md);
    printf("    (index built in %.1f s: %.0f docs/s)\n", wall, (double)st.docs / wall);
    free(td);
    free(tm);
    for (size_t i = 0; i < got; i++) free(tq[i]);
    free(tq);
    kst_index_close(ix);
}

static void section_maxsim(const char *data, const char *out, int threads, const char *minilm) {
    int rounds = (int)env_long("KESTREL_BENCH_SEARCH_ROUNDS", 3);
    long nd = env_long("KESTREL_BENCH_SEARCH_MAXSIM_DOCS", 3000);
    long nm = env_long("KESTREL_BENCH_SEARCH_MAXSIM_MINILM_DOCS", 1000);
    printf("\n2. Single-query latency through kst_index_search, k = 10, dense top 100 then MaxSim re-ranking of all 100 "
           "(query text to hits, encoding included), %d threads; anchor: the same queries, dense stage only\n", threads);
    maxsim_set("(a) dense st_bert_mean + ColBERT colbert (test fixtures, hidden 16)", data, out,
               "tests/fixtures/models/st_bert_mean", "tests/fixtures/models/colbert", nd, threads, rounds);
    if (minilm && nm > 0)
        maxsim_set("(b) dense all-MiniLM-L6-v2 + ColBERT colbert (fixture)", data, out, minilm,
                   "tests/fixtures/models/colbert", nm, threads, rounds);
}

/* ------------------------------------------------------------------------------------------ */
/* 3. indexing throughput */

static double wall_of(const char *cmd) {
    double t0 = now();
    if (system(cmd) != 0) {
        fprintf(stderr, "bench_search: failed: %s\n", cmd);
        exit(1);
    }
    return now() - t0;
}

static void section_index(const char *kestrel, const char *data, const char *out, int threads,
                          const char *minilm) {
    char dir[4096], coll[4096], texts[4096], cmd[16384];
    printf("\n3. Indexing throughput: kst_index_add_file of BEIR SciFact (corpus.jsonl) with all-MiniLM-L6-v2, "
           "factory auto, %d threads; anchor: `kestrel embed` of the same texts (\"title text\", one per line)\n",
           threads);
    snprintf(coll, sizeof coll, "%s/beir-scifact/corpus.jsonl", data);
    snprintf(texts, sizeof texts, "%s/scifact_texts.txt", out);
    /* the texts kst_ix_doc_text makes ("title text"), one line each */
    FILE *in = fopen(coll, "r"), *f = fopen(texts, "w");
    if (!in || !f) die(coll, NULL);
    char *line = NULL;
    size_t cap = 0, nlines = 0;
    while (getline(&line, &cap, in) > 0) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *ti = cJSON_GetObjectItemCaseSensitive(j, "title"), *tx = cJSON_GetObjectItemCaseSensitive(j, "text");
        const char *a = cJSON_IsString(ti) ? ti->valuestring : "", *b = cJSON_IsString(tx) ? tx->valuestring : "";
        for (const char *s = a; *s; s++) fputc(*s == '\n' || *s == '\r' ? ' ' : *s, f);
        if (*a && *b) fputc(' ', f);
        for (const char *s = b; *s; s++) fputc(*s == '\n' || *s == '\r' ? ' ' : *s, f);
        fputc('\n', f);
        nlines++;
        cJSON_Delete(j);
    }
    free(line);
    fclose(in);
    fclose(f);

    snprintf(dir, sizeof dir, "%s/ix_scifact_minilm", out);
    kst_add_stats st;
    double wall;
    kst_index *ix = build(dir, minilm, NULL, "auto", coll, "beir", threads, &st, &wall);
    kst_index_close(ix);
    snprintf(cmd, sizeof cmd, "head -n 1 '%s' | '%s' embed --model '%s' --out '%s/one.npy' --threads %d 2>'%s/embed.log'",
             texts, kestrel, minilm, out, threads, out);
    double load = wall_of(cmd);
    snprintf(cmd, sizeof cmd, "'%s' embed --model '%s' --out '%s/scifact_embed.npy' --threads %d < '%s' 2>>'%s/embed.log'",
             kestrel, minilm, out, threads, texts, out);
    double emb = wall_of(cmd);
    double n = (double)st.docs, erate = (double)nlines / emb;
    print_add_stats("kst_index_add_file", &st, wall, 1);
    printf("    encode stage         %6.1f docs/s (%.2f s) | kestrel embed %6.1f docs/s (%zu texts, %.2f s wall incl. "
           "load %.2f s) | ratio %.3f\n", n / st.encode_s, st.encode_s, erate, nlines, emb, load,
           (n / st.encode_s) / erate);
    printf("    whole add, end to end %6.1f docs/s (%.2f s)                                       | ratio %.3f "
           "(indexing beyond encoding costs %.1f%%)\n",
           n / wall, wall, (n / wall) / erate, 100.0 * (wall - emb) / emb);
}

/* ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: bench_search KESTREL_BIN DATA_DIR OUT_DIR THREADS MINILM_DIR|-\n");
        return 2;
    }
    const char *kestrel = argv[1], *data = argv[2], *out = argv[3];
    int threads = atoi(argv[4]);
    const char *minilm = strcmp(argv[5], "-") ? argv[5] : NULL;
    const char *sections = env_str("KESTREL_BENCH_SEARCH_SECTIONS", "dense,maxsim,index");
    mkdir(out, 0755);
    g_real = read_real(data);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("Kestrel search and indexing benchmark - %d threads on %ld cores; %s\n", threads,
           (long)sysconf(_SC_NPROCESSORS_ONLN), kst_build_info());
    double t0 = now();
    if (strstr(sections, "dense")) {
        if (minilm) section_dense(data, out, threads, minilm);
        else printf("\n1. skipped: needs a 384-d dense model folder (all-MiniLM-L6-v2) for the index\n");
    }
    if (strstr(sections, "maxsim")) section_maxsim(data, out, threads, minilm);
    if (strstr(sections, "index")) {
        if (minilm) section_index(kestrel, data, out, threads, minilm);
        else printf("\n3. skipped: all-MiniLM-L6-v2 is not installed\n");
    }
    printf("\n(bench_search ran %.0f s)\n", now() - t0);
    free(g_real);
    return 0;
}
