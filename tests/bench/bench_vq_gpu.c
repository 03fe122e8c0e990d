/* bench_vq_gpu.c - Distill-VQ on the GPU (`kestrel train vq --device cuda`) against the CPU trainer
 * (all cores) in the same run, from the same FAISS IVF-PQ start: wall time of each phase and in
 * total, recall@10 of the written index, peak GPU memory (tests/bench/vq_gpu.sh runs it; see
 * tests/bench/README.md, "Distill-VQ on the GPU").
 *
 * usage: bench_vq_gpu NAME DOCS.npy QUERIES.npy
 * Phases: setup (rotation, exact top-k of the training queries, lists, statistics: the top-k stays
 * on the CPU in both), epochs (the distillation with its validations), codes (the query-weighted
 * codes and codebook refits), write (re-encoding every document into the new FAISS index).
 * recall@10: of the index's top-10 at nprobe against the exact inner-product top-10 of QUERIES
 * (never trained on: the training is label-free, sampled documents). Settings (environment):
 *   KESTREL_BENCH_VQ_NLIST    IVF lists (default ~4 sqrt(n), a power of two)
 *   KESTREL_BENCH_VQ_M        PQ bytes per vector (16)
 *   KESTREL_BENCH_VQ_NPROBE   lists visited per query (nlist / 8)
 *   KESTREL_BENCH_VQ_TRAIN    FAISS training sample (40000, evenly spaced)
 *   KESTREL_BENCH_VQ_EPOCHS, _QUERIES, _CANDIDATES  (the `kestrel train vq` defaults: 3, 2048, 200)
 *   KESTREL_BENCH_VQ_DEVICES  "cpu cuda" (the devices, in the order they run) */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "core/npy.h"
#include "core/progress.h"
#include "index/ann.h"
#include "train/vq.h"
#include "train/vq_gpu.h"

static long env_long(const char *k, long def) {
    const char *v = getenv(k);
    return v && *v ? strtol(v, NULL, 10) : def;
}

static void die(const char *what, const kst_error *e) {
    fprintf(stderr, "bench_vq_gpu: %s: %s\n", what, e ? e->msg : "");
    exit(1);
}

static double recall10(const int64_t *got, const int64_t *truth, size_t nq) {
    size_t hit = 0;
    for (size_t i = 0; i < nq; i++)
        for (size_t a = 0; a < 10; a++)
            for (size_t b = 0; b < 10; b++) hit += got[i * 10 + a] == truth[i * 10 + b] && got[i * 10 + a] >= 0;
    return (double)hit / (10.0 * (double)nq);
}

typedef struct res {
    double setup, epochs, codes, write, total, recall, loss0, loss1;
    size_t gpu_bytes;
    long kept;
    int ran;
} res;

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: bench_vq_gpu NAME DOCS.npy QUERIES.npy\n");
        return 2;
    }
    kst_error e;
    kst_npy X, Q;
    if (kst_npy_read(argv[2], &X, &e) != KST_OK) die(argv[2], &e);
    if (kst_npy_read(argv[3], &Q, &e) != KST_OK) die(argv[3], &e);
    size_t n = X.shape[0], d = X.shape[1], nq = Q.shape[0];
    long nl = env_long("KESTREL_BENCH_VQ_NLIST", 0);
    if (!nl) {
        nl = 1;
        while ((double)nl * 2 <= 4 * sqrt((double)n)) nl *= 2;
    }
    long M = env_long("KESTREL_BENCH_VQ_M", 16), nprobe = env_long("KESTREL_BENCH_VQ_NPROBE", nl / 8);
    size_t ntrain = (size_t)env_long("KESTREL_BENCH_VQ_TRAIN", 40000);
    if (ntrain > n) ntrain = n;
    const char *devs = getenv("KESTREL_BENCH_VQ_DEVICES");
    if (!devs || !*devs) devs = "cpu cuda";
    int64_t *ids = malloc(n * sizeof *ids), *truth = malloc(nq * 10 * sizeof *truth),
            *got = malloc(nq * 10 * sizeof *got);
    float *sc = malloc(nq * 10 * sizeof *sc), *xt = malloc(ntrain * d * sizeof(float));
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)i;
    double t0 = kst_now();
    kst_ann *flat = NULL, *src = NULL;
    if (kst_ann_create("Flat", (int)d, &flat, &e) != KST_OK) die("Flat", &e);
    if (kst_ann_add(flat, (int64_t)n, (int)d, X.data, ids, &e) != KST_OK) die("Flat add", &e);
    if (kst_ann_search(flat, (int64_t)nq, (int)d, Q.data, 10, NULL, sc, truth, &e) != KST_OK)
        die("Flat search", &e);
    kst_ann_free(flat);
    char factory[64];
    snprintf(factory, sizeof factory, "IVF%ld,PQ%ld", nl, M);
    for (size_t i = 0; i < ntrain; i++)
        memcpy(xt + i * d, (float *)X.data + (i * n / ntrain) * d, d * sizeof(float));
    if (kst_ann_create(factory, (int)d, &src, &e) != KST_OK) die(factory, &e);
    if (kst_ann_train(src, (int64_t)ntrain, (int)d, xt, &e) != KST_OK) die("train", &e);
    printf("%s: %zu x %zu documents, %zu queries, %s (k-means on %zu), nprobe %ld; exact and "
           "k-means %.1f s\n", argv[1], n, d, nq, factory, ntrain, nprobe, kst_now() - t0);
    if (kst_gpu_built()) printf("GPU: %s\n", kst_gpu_describe());
    kst_vq_opts o = kst_vq_opts_default();
    o.epochs = env_long("KESTREL_BENCH_VQ_EPOCHS", o.epochs);
    o.max_queries = (size_t)env_long("KESTREL_BENCH_VQ_QUERIES", (long)o.max_queries);
    o.candidates = (size_t)env_long("KESTREL_BENCH_VQ_CANDIDATES", (long)o.candidates);
    res r[2];
    memset(r, 0, sizeof r);
    const char *pc = strstr(devs, "cpu"), *pg = strstr(devs, "cuda");
    int gpu_first = pg && (!pc || pg < pc);
    for (int pass = 0; pass < 2; pass++) {
        int dv = gpu_first ? 1 - pass : pass;
        const char *name = dv ? "cuda" : "cpu";
        if (!strstr(devs, name)) continue;
        kst_vq_model m;
        kst_vq_result vr;
        kst_ann *w = NULL;
        if (kst_vq_model_from_index(src, &m, &e) != KST_OK) die("model", &e);
        o.device = dv ? KST_DEV_CUDA : KST_DEV_CPU;
        double a = kst_now();
        if (kst_vq_train(&m, n, X.data, 0, NULL, NULL, NULL, &o, &vr, &e) != KST_OK) {
            fprintf(stderr, "bench_vq_gpu: %s: %s\n", name, e.msg);
            kst_vq_model_free(&m);
            continue;
        }
        double b = kst_now();
        if (kst_vq_write_index(&m, src, n, X.data, ids, &w, &e) != KST_OK) die("write", &e);
        double c = kst_now();
        kst_ann_search_opts so = {(int)nprobe, 0};
        if (kst_ann_search(w, (int64_t)nq, (int)d, Q.data, 10, &so, sc, got, &e) != KST_OK)
            die("search", &e);
        res *x = &r[dv];
        x->ran = 1;
        x->setup = vr.seconds_setup, x->epochs = vr.seconds_epochs, x->codes = vr.seconds_codes;
        x->write = c - b, x->total = c - a, x->recall = recall10(got, truth, nq);
        x->loss0 = vr.loss_init_pq, x->loss1 = vr.loss_final_pq, x->kept = vr.best_epoch;
        x->gpu_bytes = vr.gpu_bytes;
        if (dv && kst_vq_gpu_coder_peak_bytes() > x->gpu_bytes)
            x->gpu_bytes = kst_vq_gpu_coder_peak_bytes();
        printf("%s %-4s setup %7.2f s  epochs %7.2f s  codes %7.2f s  write %7.2f s  total %7.2f s"
               "  loss pq %.4f -> %.4f (epoch %ld)  recall@10 %.4f%s", argv[1], name, x->setup,
               x->epochs, x->codes, x->write, x->total, x->loss0, x->loss1, x->kept, x->recall,
               dv ? "" : "\n");
        if (dv) printf("  GPU peak %.0f MiB\n", x->gpu_bytes / 1048576.0);
        fflush(stdout);
        kst_free(vr.epoch_loss);
        kst_ann_free(w);
        kst_vq_model_free(&m);
    }
    if (r[0].ran && r[1].ran)
        printf("%s cpu/gpu time: setup %.1fx  epochs %.1fx  codes %.1fx  write %.1fx  total %.1fx;"
               "  recall@10 gpu - cpu %+.4f\n", argv[1], r[0].setup / r[1].setup,
               r[0].epochs / r[1].epochs, r[0].codes / r[1].codes, r[0].write / r[1].write,
               r[0].total / r[1].total, r[1].recall - r[0].recall);
    kst_ann_free(src);
    kst_npy_free(&X), kst_npy_free(&Q);
    free(ids), free(truth), free(got), free(sc), free(xt);
    return 0;
}
