/* bench_vq.c - Distill-VQ against FAISS IVF-PQ (k-means) and OPQ + IVF-PQ at equal bytes per vector
 * and equal nprobe (tests/bench/vq.sh runs it; see tests/bench/README.md, "Distill-VQ").
 *
 * usage: bench_vq NAME DOCS.npy QUERIES.npy OUT_DIR [DOC_IDS.txt QIDS.txt]
 * Prints, for each PQ size (KESTREL_BENCH_VQ_BYTES, default "8 16 32 48") and method, recall@10 and
 * recall@100 of the exact inner-product top-10 / top-100 of QUERIES (never used for training:
 * Distill-VQ trains label-free on sampled documents), and with ids writes a TREC run per method
 * (OUT_DIR/NAME.METHOD.BYTES.run) for `kestrel eval`. Settings (environment):
 *   KESTREL_BENCH_VQ_NLIST   IVF lists (default ~4 sqrt(n), a power of two, >= 39 points each)
 *   KESTREL_BENCH_VQ_NPROBE  lists visited per query, the same for every method (default nlist/8)
 *   KESTREL_BENCH_VQ_EPOCHS, _QUERIES, _CANDIDATES, _LR  Distill-VQ settings (3, 1024, 100, 1e-3)
 *   KESTREL_BENCH_VQ_TRAIN   training sample of every index (40000, evenly spaced)
 *   KESTREL_BENCH_VQ_OPQ=0 / _DVQ=0 / _OPQ_DVQ=0  skip OPQ (and Distill-VQ from it), Distill-VQ
 *                            from IVF-PQ, Distill-VQ from OPQ; _IVFPQ=0 with _DVQ=0: no k-means
 *                            IVF-PQ either
 *   KESTREL_BENCH_VQ_SW, _REFITS  the query-weighted codes' weight and refits (kst_vq_opts
 *                            defaults: 0.5, 3; SW=0 is FAISS's nearest codes)
 *   KESTREL_BENCH_VQ_DEV     development queries (.npy): their recall@10 is printed too ("dev"),
 *                            so settings can be chosen without looking at the test queries
 *   KESTREL_BENCH_VQ_TRAIN_Q Distill-VQ's training queries (.npy, a query log that holds no test
 *                            query); default: sampled documents
 *   KESTREL_BENCH_VQ_CACHE=0 rebuild the FAISS indexes instead of reading OUT_DIR/NAME.N.FACTORY.faiss
 *                            (written after each build; the k-means / OPQ results are deterministic) */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/mem.h"
#include "core/npy.h"
#include "core/progress.h"
#include "index/ann.h"
#include "train/vq.h"

static long env_long(const char *k, long def) {
    const char *v = getenv(k);
    return v && *v ? strtol(v, NULL, 10) : def;
}
static double env_double(const char *k, double def) {
    const char *v = getenv(k);
    return v && *v ? strtod(v, NULL) : def;
}

static void die(const char *what, const kst_error *e) {
    fprintf(stderr, "bench_vq: %s: %s\n", what, e ? e->msg : "");
    exit(1);
}

/* Exact top-k by brute force (nq, k). */
static void exact(size_t n, const float *x, size_t nq, const float *q, size_t d, size_t k,
                  int64_t *ids) {
    kst_ann *a = NULL;
    kst_error e;
    if (kst_ann_create("Flat", (int)d, &a, &e) != KST_OK) die("Flat", &e);
    int64_t *id = malloc(n * sizeof *id);
    for (size_t i = 0; i < n; i++) id[i] = (int64_t)i;
    if (kst_ann_add(a, (int64_t)n, (int)d, x, id, &e) != KST_OK) die("Flat add", &e);
    float *s = malloc(nq * k * sizeof *s);
    if (kst_ann_search(a, (int64_t)nq, (int)d, q, (int64_t)k, NULL, s, ids, &e) != KST_OK)
        die("Flat search", &e);
    free(s);
    free(id);
    kst_ann_free(a);
}

static double recall(const int64_t *got, const int64_t *truth, size_t nq, size_t K, size_t at) {
    double sum = 0;
    for (size_t i = 0; i < nq; i++) {
        size_t hit = 0;
        for (size_t a = 0; a < at; a++)
            for (size_t b = 0; b < at; b++)
                if (got[i * K + a] == truth[i * K + b] && got[i * K + a] >= 0) {
                    hit++;
                    break;
                }
        sum += (double)hit / (double)at;
    }
    return sum / (double)nq;
}

static char **read_lines(const char *path, size_t *n) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "bench_vq: cannot open %s\n", path);
        exit(1);
    }
    size_t cap = 1024;
    char **l = malloc(cap * sizeof *l), buf[4096];
    *n = 0;
    while (fgets(buf, sizeof buf, f)) {
        buf[strcspn(buf, "\r\n")] = 0;
        if (*n == cap) l = realloc(l, (cap *= 2) * sizeof *l);
        l[(*n)++] = strdup(buf);
    }
    fclose(f);
    return l;
}

typedef struct ctx {
    const char *name, *out;
    size_t n, nq, d;
    const float *x, *q;
    int64_t *ids, *truth;
    char **docids, **qids;
    size_t nprobe;
    size_t ndev;
    const float *dev;
    int64_t *dev_truth;
} ctx;

static void report(const ctx *c, const char *method, int bytes, kst_ann *a, double train_s,
                   const char *extra) {
    size_t K = 100;
    float *s = malloc(c->nq * K * sizeof *s);
    int64_t *got = malloc(c->nq * K * sizeof *got);
    kst_ann_search_opts so = {(int)c->nprobe, 0};
    kst_error e;
    if (kst_ann_search(a, (int64_t)c->nq, (int)c->d, c->q, (int64_t)K, &so, s, got, &e) != KST_OK)
        die("search", &e);
    double r10 = recall(got, c->truth, c->nq, K, 10), r100 = recall(got, c->truth, c->nq, K, 100);
    char dev[64] = "";
    if (c->ndev) {
        float *ds = malloc(c->ndev * K * sizeof *ds);
        int64_t *dg = malloc(c->ndev * K * sizeof *dg);
        if (kst_ann_search(a, (int64_t)c->ndev, (int)c->d, c->dev, (int64_t)K, &so, ds, dg, &e) !=
            KST_OK)
            die("dev search", &e);
        snprintf(dev, sizeof dev, "  dev@10 %.4f", recall(dg, c->dev_truth, c->ndev, K, 10));
        free(ds);
        free(dg);
    }
    printf("%-10s %3d B  %-22s recall@10 %.4f  recall@100 %.4f%s  train %.1f s%s\n", c->name,
           bytes, method, r10, r100, dev, train_s, extra);
    fflush(stdout);
    if (c->docids) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.%s.%d.run", c->out, c->name, method, bytes);
        FILE *f = fopen(path, "w");
        for (size_t i = 0; f && i < c->nq; i++)
            for (size_t j = 0; j < K; j++)
                if (got[i * K + j] >= 0)
                    fprintf(f, "%s Q0 %s %zu %.6f %s\n", c->qids[i], c->docids[got[i * K + j]],
                            j + 1, s[i * K + j], method);
        if (f) fclose(f);
    }
    free(s);
    free(got);
}

static kst_ann *build(const ctx *c, const char *factory, double *secs) {
    kst_ann *a = NULL;
    kst_error e;
    double t0 = kst_now();
    char cache[4096];
    snprintf(cache, sizeof cache, "%s/%s.%zu.%s.faiss", c->out, c->name, c->n, factory);
    int use_cache = env_long("KESTREL_BENCH_VQ_CACHE", 1) != 0 && strcmp(factory, "Flat") != 0;
    if (use_cache && kst_ann_read(cache, KST_ANN_MMAP_NEVER, &a, &e) == KST_OK) {
        *secs = 0; /* read from the cache: no build time to show */
        return a;
    }
    if (kst_ann_create(factory, (int)c->d, &a, &e) != KST_OK) die(factory, &e);
    /* Every method trains on the same evenly spaced sample (OPQ's 50 rounds of PQ k-means on
     * FAISS's own 65,536-point cap would dominate the run on 2 cores). */
    size_t ns = (size_t)env_long("KESTREL_BENCH_VQ_TRAIN", 40000);
    if (ns > c->n) ns = c->n;
    float *sample = malloc(ns * c->d * sizeof *sample);
    for (size_t i = 0; i < ns; i++)
        memcpy(sample + i * c->d, c->x + (i * c->n / ns) * c->d, c->d * sizeof(float));
    if (kst_ann_train(a, (int64_t)ns, (int)c->d, sample, &e) != KST_OK) die("train", &e);
    free(sample);
    if (kst_ann_add(a, (int64_t)c->n, (int)c->d, c->x, c->ids, &e) != KST_OK) die("add", &e);
    *secs = kst_now() - t0;
    if (use_cache && kst_ann_write(a, cache, &e) != KST_OK) die("cache write", &e);
    return a;
}

static void distill(const ctx *c, const char *method, int bytes, kst_ann *src) {
    kst_vq_model m;
    kst_error e;
    if (kst_vq_model_from_index(src, &m, &e) != KST_OK) die("model", &e);
    kst_vq_opts o = kst_vq_opts_default();
    o.epochs = env_long("KESTREL_BENCH_VQ_EPOCHS", o.epochs);
    o.max_queries = (size_t)env_long("KESTREL_BENCH_VQ_QUERIES", 1024);
    o.candidates = (size_t)env_long("KESTREL_BENCH_VQ_CANDIDATES", 100);
    o.lr_ivf = o.lr_pq = env_double("KESTREL_BENCH_VQ_LR", o.lr_ivf);
    o.lr_ivf = env_double("KESTREL_BENCH_VQ_LR_IVF", o.lr_ivf);
    o.lr_pq = env_double("KESTREL_BENCH_VQ_LR_PQ", o.lr_pq);
    o.w_ivf = env_double("KESTREL_BENCH_VQ_W_IVF", o.w_ivf);
    o.w_pq = env_double("KESTREL_BENCH_VQ_W_PQ", o.w_pq);
    o.batch = (size_t)env_long("KESTREL_BENCH_VQ_BATCH", (long)o.batch);
    o.dense_adam = (int)env_long("KESTREL_BENCH_VQ_DENSE_ADAM", o.dense_adam);
    o.w_rec = env_double("KESTREL_BENCH_VQ_W_REC", o.w_rec);
    o.val_fraction = env_double("KESTREL_BENCH_VQ_VAL", o.val_fraction);
    o.lr_backoff = env_double("KESTREL_BENCH_VQ_BACKOFF", o.lr_backoff);
    o.temperature = env_double("KESTREL_BENCH_VQ_T", o.temperature);
    o.tau_scale = env_double("KESTREL_BENCH_VQ_TAU", o.tau_scale);
    o.score_weight = env_double("KESTREL_BENCH_VQ_SW", o.score_weight);
    o.refit_rounds = env_long("KESTREL_BENCH_VQ_REFITS", o.refit_rounds);
    /* Training queries: a query log (KESTREL_BENCH_VQ_TRAIN_Q, .npy; never the test queries) or,
     * by default, sampled documents (label-free). */
    kst_npy TQ = {0};
    const char *tq = getenv("KESTREL_BENCH_VQ_TRAIN_Q");
    if (tq && *tq && kst_npy_read(tq, &TQ, &e) != KST_OK) die(tq, &e);
    kst_vq_result r;
    if (kst_vq_train(&m, c->n, c->x, TQ.data ? TQ.shape[0] : 0, TQ.data, NULL, NULL, &o, &r, &e) !=
        KST_OK)
        die("vq train", &e);
    kst_npy_free(&TQ);
    kst_ann *a = NULL;
    double t0 = kst_now();
    if (kst_vq_write_index(&m, src, c->n, c->x, c->ids, &a, &e) != KST_OK) die("vq write", &e);
    char extra[512];
    snprintf(extra, sizeof extra,
             "  [loss ivf %.3f -> %.3f, pq %.3f -> %.3f; val %.4f -> %.4f (epoch %ld of %ld, "
             "%ld backoffs); "
             "mse %.4f -> %.4f; imbalance %.2f -> %.2f; W-err %.4f -> %.4f (%ld refits, "
             "weight %.2f); re-encode %.1f s]",
             r.loss_init_ivf, r.loss_final_ivf, r.loss_init_pq, r.loss_final_pq, r.val_init,
             r.val_best, r.best_epoch, r.epochs, r.backoffs, r.mse_init, r.mse_final, r.imbalance_init,
             r.imbalance_final, r.werr_init, r.werr_final, r.refits, o.score_weight,
             kst_now() - t0);
    report(c, method, bytes, a, r.seconds, extra);
    kst_free(r.epoch_loss);
    kst_ann_free(a);
    kst_vq_model_free(&m);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: bench_vq NAME DOCS.npy QUERIES.npy OUT_DIR [DOC_IDS QIDS]\n");
        return 64;
    }
    ctx c = {0};
    c.name = argv[1];
    c.out = argv[4];
    kst_npy X, Q;
    kst_error e;
    if (kst_npy_read(argv[2], &X, &e) != KST_OK) die(argv[2], &e);
    if (kst_npy_read(argv[3], &Q, &e) != KST_OK) die(argv[3], &e);
    c.n = X.shape[0], c.d = X.shape[1], c.nq = Q.shape[0];
    c.x = X.data, c.q = Q.data;
    if (argc >= 7) {
        size_t nd, nqq;
        c.docids = read_lines(argv[5], &nd);
        c.qids = read_lines(argv[6], &nqq);
        if (nd != c.n || nqq != c.nq) {
            fprintf(stderr, "bench_vq: %zu doc ids for %zu docs, %zu qids for %zu queries\n", nd,
                    c.n, nqq, c.nq);
            return 1;
        }
    }
    c.ids = malloc(c.n * sizeof *c.ids);
    for (size_t i = 0; i < c.n; i++) c.ids[i] = (int64_t)i;
    c.truth = malloc(c.nq * 100 * sizeof *c.truth);
    exact(c.n, c.x, c.nq, c.q, c.d, 100, c.truth);
    kst_npy D = {0};
    const char *devp = getenv("KESTREL_BENCH_VQ_DEV");
    if (devp && *devp) {
        if (kst_npy_read(devp, &D, &e) != KST_OK) die(devp, &e);
        if (D.shape[1] != c.d) die("dev queries have another dimension", NULL);
        c.ndev = D.shape[0], c.dev = D.data;
        c.dev_truth = malloc(c.ndev * 100 * sizeof *c.dev_truth);
        exact(c.n, c.x, c.ndev, c.dev, c.d, 100, c.dev_truth);
    }
    size_t nlist = 1;
    /* ~4 sqrt(n), a power of two, with FAISS's 39 training points per list in the sample. */
    size_t ns = (size_t)env_long("KESTREL_BENCH_VQ_TRAIN", 40000);
    if (ns > c.n) ns = c.n;
    while (nlist * 2 <= 4 * sqrt((double)c.n) * 1.41421356 && nlist * 2 * 39 <= ns) nlist *= 2;
    nlist = (size_t)env_long("KESTREL_BENCH_VQ_NLIST", (long)nlist);
    c.nprobe = (size_t)env_long("KESTREL_BENCH_VQ_NPROBE", (long)(nlist / 8 ? nlist / 8 : 1));
    printf("%s: %zu docs x %zu, %zu queries; IVF%zu, nprobe %zu (all methods)\n", c.name, c.n, c.d,
           c.nq, nlist, c.nprobe);
    {
        double secs;
        kst_ann *flat = build(&c, "Flat", &secs);
        report(&c, "exact", (int)(4 * c.d), flat, secs, "  (uncompressed float32: the teacher)");
        kst_ann_free(flat);
    }
    const char *bytes = getenv("KESTREL_BENCH_VQ_BYTES");
    char list[64];
    snprintf(list, sizeof list, "%s", bytes && *bytes ? bytes : "8 16 32 48");
    int opq_dvq = env_long("KESTREL_BENCH_VQ_OPQ_DVQ", 1) != 0;
    int with_opq = env_long("KESTREL_BENCH_VQ_OPQ", 1) != 0;
    for (char *tok = strtok(list, " ,"); tok; tok = strtok(NULL, " ,")) {
        int M = atoi(tok);
        if (M < 1 || c.d % (size_t)M) {
            printf("%-10s %3d B  skipped: %zu dimensions are not divisible by %d\n", c.name, M, c.d, M);
            continue;
        }
        char f[128];
        double secs;
        snprintf(f, sizeof f, "IVF%zu,PQ%d", nlist, M);
        /* KESTREL_BENCH_VQ_IVFPQ=0 skips the k-means IVF-PQ (with _DVQ=0 nothing needs it). */
        kst_ann *ivfpq = NULL;
        if (env_long("KESTREL_BENCH_VQ_IVFPQ", 1) || env_long("KESTREL_BENCH_VQ_DVQ", 1)) {
            ivfpq = build(&c, f, &secs);
            report(&c, "ivfpq", M, ivfpq, secs, "");
        }
        kst_ann *opq = NULL;
        if (with_opq) {
            snprintf(f, sizeof f, "OPQ%d,IVF%zu,PQ%d", M, nlist, M);
            opq = build(&c, f, &secs);
            report(&c, "opq+ivfpq", M, opq, secs, "");
        }
        if (env_long("KESTREL_BENCH_VQ_DVQ", 1)) distill(&c, "distill-vq", M, ivfpq);
        if (opq && opq_dvq) distill(&c, "opq+distill-vq", M, opq);
        kst_ann_free(ivfpq);
        kst_ann_free(opq);
    }
    return 0;
}
