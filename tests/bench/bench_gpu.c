/* bench_gpu.c - the GPU backend's speed on one GPU, each figure printed as JSON for
 * tests/gpu/report.py to set beside its PyTorch anchor measured in the same run
 * (tests/bench/bench_gpu_torch.py). Built and run by tests/gpu/run_all.sh.
 *
 * usage:
 *   bench_gpu search DB.npy Q.npy K REPS FP16 [ANCHOR_IDS.npy]
 *       kst_gpu_flat over DB (n, d) float32 (kept as float16 when FP16 = 1), all of Q searched
 *       per call (host queries in, host results out, as torch.mm + torch.topk with .cuda() and
 *       .cpu()); one warm-up call, REPS timed; median. ANCHOR_IDS (nq', K) int64: PyTorch's ids
 *       for the first nq' queries: the fraction identical is printed.
 *   bench_gpu encode MODEL_DIR B T REPS [IDS.npy VALID.npy HIDDEN.npy]
 *       kst_bert_gpu_forward on a (B, T) batch of random ids, all T valid (the last hidden states
 *       stay on the GPU, as the anchor's), 3 warm-ups, REPS timed; median. The optional files:
 *       a padded batch (ids (b, t) int64, valid (b) int64) and PyTorch's float32 last hidden
 *       states (b, t, C) for it: min cosine over the valid token rows is printed. With
 *       KESTREL_GPU_PROFILE=1 also the mean milliseconds a layer of each step (kst_bert_gpu_profile);
 *       KST_BENCH_VARIANT names the variant in the output; KST_BENCH_NCU=1 runs one more forward
 *       between cudaProfilerStart and cudaProfilerStop (for `ncu --profile-from-start off`).
 *   bench_gpu ivfpq DB.npy Q.npy FACTORY NPROBES BW_GB_S
 *       FAISS IVF-PQ (FACTORY, e.g. IVF1024,PQ48) trained and filled on the CPU from DB; for each
 *       nprobe in NPROBES (comma separated): CPU FAISS search on all cores (kst_ann_search, the
 *       anchor) and the GPU search of the same index, all of Q, k = 10: queries/s, recall@10
 *       against the exact top 10 (GPU flat search), and the GPU's code bytes scanned per second
 *       as a fraction of BW_GB_S (the measured device copy bandwidth).
 *   bench_gpu embed MODEL_DIR N WORDS BATCH
 *       kst_model_embed on the GPU over N synthetic texts of WORDS words drawn from the model's
 *       vocab.txt (the whole path: tokenization, padding, forward, copy back, pooling), with the
 *       pipeline (tokenization and heads on the CPU while the GPU runs the next batch) and with
 *       KESTREL_GPU_PIPELINE=0 (one batch at a time), and tokenization alone on one core.
 * FLOPs per sequence: L * (2*T*(4C^2 + 2*C*FF) + 4*T^2*C), as tests/bench/README.md. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/kestrel.h"
#include "core/gpu.h"
#include "core/npy.h"
#include "encoders/bert_gpu.h"
#include "encoders/encoder.h"
#include "index/ann.h"
#include "index/faiss_ext.h"
#include "index/gpu_search.h"
#include <omp.h>

/* cuda_profiler_api.h's two calls (the CUDA headers are not on this file's include path):
 * KST_BENCH_NCU=1 brackets one more forward after the timed ones, for `ncu --profile-from-start off` */
int cudaProfilerStart(void);
int cudaProfilerStop(void);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
static void die(const char *what, const kst_error *err) {
    fprintf(stderr, "bench_gpu: %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

static int search_main(int argc, char **argv) {
    if (argc < 7) return fprintf(stderr, "usage: bench_gpu search DB.npy Q.npy K REPS FP16 [ANCHOR_IDS.npy]\n"), 2;
    kst_error err;
    kst_npy db, q;
    if (kst_npy_read(argv[2], &db, &err) != KST_OK) die(argv[2], &err);
    if (kst_npy_read(argv[3], &q, &err) != KST_OK) die(argv[3], &err);
    int k = atoi(argv[4]), reps = atoi(argv[5]), fp16 = atoi(argv[6]);
    size_t n = db.shape[0], d = db.shape[1], nq = q.shape[0];
    kst_gpu_flat *g = NULL;
    double t0 = now();
    if (kst_gpu_flat_create((int)d, fp16, &g, &err) != KST_OK) die("create", &err);
    if (kst_gpu_flat_add(g, (int64_t)n, db.data, NULL, &err) != KST_OK) die("add", &err);
    double upload = now() - t0;
    float *sc = malloc(nq * (size_t)k * sizeof(float));
    int64_t *ids = malloc(nq * (size_t)k * sizeof(int64_t));
    if (kst_gpu_flat_search(g, (int64_t)nq, q.data, k, sc, ids, &err) != KST_OK) die("search", &err);
    double *t = malloc((size_t)reps * sizeof(double));
    for (int r = 0; r < reps; r++) {
        double a = now();
        if (kst_gpu_flat_search(g, (int64_t)nq, q.data, k, sc, ids, &err) != KST_OK) die("search", &err);
        t[r] = now() - a;
    }
    double med = median(t, reps);
    double same = -1;
    if (argc > 7) {
        kst_npy an;
        if (kst_npy_read(argv[7], &an, &err) != KST_OK) die(argv[7], &err);
        size_t m = an.shape[0] < nq ? an.shape[0] : nq, eq = 0;
        const int64_t *ai = an.data;
        for (size_t i = 0; i < m; i++)
            for (int r = 0; r < k; r++)
                for (int r2 = 0; r2 < k; r2++)
                    if (ids[i * k + r] == ai[i * an.shape[1] + r2]) {
                        eq++;
                        break;
                    }
        same = (double)eq / (double)(m * (size_t)k);
        kst_npy_free(&an);
    }
    printf("{\"bench\": \"search\", \"fp16\": %d, \"n\": %zu, \"d\": %zu, \"nq\": %zu, \"k\": %d, "
           "\"seconds\": %.6f, \"qps\": %.1f, \"upload_s\": %.3f, \"gpu_bytes\": %zu, "
           "\"overlap_with_anchor_ids\": %.6f}\n",
           fp16, n, d, nq, k, med, nq / med, upload, kst_gpu_flat_bytes(g), same);
    kst_gpu_flat_free(g);
    kst_npy_free(&db);
    kst_npy_free(&q);
    free(sc), free(ids), free(t);
    return 0;
}

static int encode_main(int argc, char **argv) {
    if (argc < 6) return fprintf(stderr, "usage: bench_gpu encode MODEL_DIR B T REPS [IDS VALID HIDDEN]\n"), 2;
    kst_error err;
    kst_encoder *e = NULL;
    if (kst_encoder_open(argv[2], KST_ROLE_AUTO, &e, &err) != KST_OK) die(argv[2], &err);
    size_t B = (size_t)atol(argv[3]), T = (size_t)atol(argv[4]);
    int reps = atoi(argv[5]);
    const kst_bert_config *c = &e->bert.cfg;
    kst_bert_gpu *g = NULL;
    if (kst_bert_gpu_create(&e->bert, &g, &err) != KST_OK) die("GPU encoder", &err);
    double parity = -1, maxabs = -1;
    if (argc > 8) {
        kst_npy ids, valid, hid;
        if (kst_npy_read(argv[6], &ids, &err) != KST_OK) die(argv[6], &err);
        if (kst_npy_read(argv[7], &valid, &err) != KST_OK) die(argv[7], &err);
        if (kst_npy_read(argv[8], &hid, &err) != KST_OK) die(argv[8], &err);
        size_t b = ids.shape[0], t = ids.shape[1], C = c->C;
        int32_t *i32 = malloc(b * t * 4);
        int *v = malloc(b * sizeof(int));
        for (size_t i = 0; i < b * t; i++) i32[i] = (int32_t)((int64_t *)ids.data)[i];
        for (size_t i = 0; i < b; i++) v[i] = (int)((int64_t *)valid.data)[i];
        float *out = malloc(b * t * C * sizeof(float));
        if (kst_bert_gpu_forward(g, out, i32, NULL, v, b, t, &err) != KST_OK) die("parity forward", &err);
        parity = 1;
        const float *ref = hid.data;
        for (size_t s = 0; s < b; s++)
            for (size_t p = 0; p < (size_t)v[s]; p++) {
                const float *x = out + (s * t + p) * C, *y = ref + (s * t + p) * C;
                double xy = 0, xx = 0, yy = 0;
                for (size_t j = 0; j < C; j++) xy += (double)x[j] * y[j], xx += (double)x[j] * x[j], yy += (double)y[j] * y[j];
                double cs = xy / sqrt(xx * yy + 1e-30);
                if (cs < parity) parity = cs;
                for (size_t j = 0; j < C; j++)
                    if (fabs((double)x[j] - y[j]) > maxabs) maxabs = fabs((double)x[j] - y[j]);
            }
        free(i32), free(v), free(out);
        kst_npy_free(&ids), kst_npy_free(&valid), kst_npy_free(&hid);
    }
    int32_t *ids = malloc(B * T * 4);
    int *valid = malloc(B * sizeof(int));
    uint32_t seed = 12345;
    for (size_t b = 0; b < B; b++) {
        valid[b] = (int)T;
        for (size_t t = 0; t < T; t++) {
            seed = seed * 1664525u + 1013904223u;
            ids[b * T + t] = t == 0 ? 101 : t + 1 == T ? 102 : (int32_t)(1000 + (seed >> 8) % 20000);
        }
    }
    for (int w = 0; w < 3; w++) {
        if (kst_bert_gpu_forward(g, NULL, ids, NULL, valid, B, T, &err) != KST_OK) die("forward", &err);
        if (kst_bert_gpu_sync(g, &err) != KST_OK) die("forward", &err);
    }
    double *tm = malloc((size_t)reps * sizeof(double));
    double pms[KST_PROF_STEPS];
    kst_bert_gpu_profile(g, pms); /* KESTREL_GPU_PROFILE=1: drop the warm-ups' step times */
    for (int r = 0; r < reps; r++) {
        double a = now();
        if (kst_bert_gpu_forward(g, NULL, ids, NULL, valid, B, T, &err) != KST_OK) die("forward", &err);
        if (kst_bert_gpu_sync(g, &err) != KST_OK) die("forward", &err);
        tm[r] = now() - a;
    }
    double med = median(tm, reps);
    if (getenv("KST_BENCH_NCU")) {
        cudaProfilerStart();
        if (kst_bert_gpu_forward(g, NULL, ids, NULL, valid, B, T, &err) != KST_OK) die("forward", &err);
        if (kst_bert_gpu_sync(g, &err) != KST_OK) die("forward", &err);
        cudaProfilerStop();
    }
    double C = (double)c->C, FF = (double)c->FF, L = (double)c->L, Td = (double)T;
    double flop = L * (2 * Td * (4 * C * C + 2 * C * FF) + 4 * Td * Td * C) * (double)B;
    /* which path (encoders/bert_gpu.cu's knobs), so that report.py can set them side by side */
    const char *fu = getenv("KESTREL_GPU_FUSED"), *xg = getenv("KESTREL_GPU_EXACT_GELU");
    const char *tu = getenv("KESTREL_GPU_GEMM_TUNE");
    const char *rl = getenv("KESTREL_GPU_RES_IN_LN"), *b16 = getenv("KESTREL_GPU_BIAS16");
    const char *att = getenv("KESTREL_GPU_ATT"), *kc = getenv("KESTREL_GPU_FC1_KCOL");
    const char *variant = getenv("KST_BENCH_VARIANT") ? getenv("KST_BENCH_VARIANT")
                          : fu && strcmp(fu, "0") == 0 ? "unfused"
                          : kc && strcmp(kc, "0") == 0 ? "fused_fc1_bias_epilogue"
                          : xg && strcmp(xg, "1") == 0 ? "fused_erf_gelu"
                          : tu && strcmp(tu, "0") == 0 ? "fused_heuristic"
                          : rl && strcmp(rl, "1") == 0 ? "fused_res_in_ln"
                          : b16 && strcmp(b16, "1") == 0 ? "fused_bias16"
                          : att && strcmp(att, "1") == 0 ? "fused_attention_wg"
                          : att && strcmp(att, "2") == 0 ? "fused_attention2"
                          : att && strcmp(att, "5") == 0 ? "fused_attention_wg128"
                          : att && strcmp(att, "6") == 0 ? "fused_attention_wg128_pingpong"
                          : att && strcmp(att, "7") == 0 ? "fused_attention_ws"
                          : att && strcmp(att, "8") == 0 ? "fused_attention_ws_pingpong"
                                                       : "fused";
    if (kst_bert_gpu_profile(g, pms) == KST_PROF_STEPS) {
        /* per-layer milliseconds of each step (CUDA events between them) */
        static const char *step[KST_PROF_STEPS] = {"qkv", "attention", "proj", "ln1", "fc1", "fc2", "ln2"};
        printf("{\"bench\": \"encode_profile\", \"variant\": \"%s\", \"model\": \"%s\", \"B\": %zu, \"T\": %zu", variant,
               argv[2], B, T);
        double sum = 0;
        for (int i = 0; i < KST_PROF_STEPS; i++) printf(", \"%s_ms\": %.4f", step[i], pms[i]), sum += pms[i];
        printf(", \"layer_ms\": %.4f}\n", sum);
    }
    printf("{\"bench\": \"encode\", \"variant\": \"%s\", \"model\": \"%s\", \"B\": %zu, \"T\": %zu, \"seconds\": %.6f, "
           "\"docs_per_s\": %.1f, \"tflops\": %.2f, \"gpu_peak_bytes\": %zu, \"parity_min_cos\": %.6f, "
           "\"parity_max_abs\": %.6f}\n",
           variant, argv[2], B, T, med, (double)B / med, flop / med / 1e12, kst_bert_gpu_peak_bytes(g), parity, maxabs);
    kst_bert_gpu_free(g);
    kst_encoder_free(e);
    free(ids), free(valid), free(tm);
    return 0;
}

static double recall10(const int64_t *got, const int64_t *exact, size_t nq) {
    size_t hit = 0;
    for (size_t i = 0; i < nq; i++)
        for (int r = 0; r < 10; r++)
            for (int r2 = 0; r2 < 10; r2++)
                if (got[i * 10 + r2] == exact[i * 10 + r]) {
                    hit++;
                    break;
                }
    return 100.0 * (double)hit / (double)(nq * 10);
}

static int ivfpq_main(int argc, char **argv) {
    if (argc < 7) return fprintf(stderr, "usage: bench_gpu ivfpq DB.npy Q.npy FACTORY NPROBES BW_GB_S\n"), 2;
    kst_error err;
    kst_npy db, q;
    if (kst_npy_read(argv[2], &db, &err) != KST_OK) die(argv[2], &err);
    if (kst_npy_read(argv[3], &q, &err) != KST_OK) die(argv[3], &err);
    size_t n = db.shape[0], d = db.shape[1], nq = q.shape[0];
    double bw = atof(argv[6]);
    /* exact top 10 */
    int64_t *ex = malloc(nq * 10 * 8), *gi = malloc(nq * 10 * 8), *ci = malloc(nq * 10 * 8);
    float *sc = malloc(nq * 10 * 4);
    kst_gpu_flat *fl = NULL;
    if (kst_gpu_flat_create((int)d, 0, &fl, &err) != KST_OK || kst_gpu_flat_add(fl, (int64_t)n, db.data, NULL, &err) != KST_OK ||
        kst_gpu_flat_search(fl, (int64_t)nq, q.data, 10, sc, ex, &err) != KST_OK)
        die("exact search", &err);
    kst_gpu_flat_free(fl);
    int64_t *ids = malloc(n * 8);
    for (size_t i = 0; i < n; i++) ids[i] = (int64_t)i;
    kst_ann *a = NULL;
    double t0 = now();
    if (kst_ann_create(argv[4], (int)d, &a, &err) != KST_OK || kst_ann_train(a, (int64_t)n, (int)d, db.data, &err) != KST_OK ||
        kst_ann_add(a, (int64_t)n, (int)d, db.data, ids, &err) != KST_OK)
        die("building the IVF-PQ index", &err);
    double build = now() - t0;
    kst_faiss_layout lay;
    kst_faiss_layout_get(kst_ann_faiss(a), &lay);
    fprintf(stderr, "bench_gpu: %s built in %.1f s on the CPU\n", argv[4], build);
    char *list = strdup(argv[5]);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        int np = atoi(tok);
        kst_ann_search_opts so = {np, 0};
        if (kst_ann_set_device(a, 0, 0, &err) != KST_OK) die("cpu", &err);
        kst_ann_search(a, (int64_t)(nq < 100 ? nq : 100), (int)d, q.data, 10, &so, sc, ci, &err);
        double c0 = now();
        if (kst_ann_search(a, (int64_t)nq, (int)d, q.data, 10, &so, sc, ci, &err) != KST_OK) die("CPU search", &err);
        double tc = now() - c0;
        if (kst_ann_set_device(a, 1, 0, &err) != KST_OK) die("gpu", &err);
        if (kst_ann_search(a, (int64_t)nq, (int)d, q.data, 10, &so, sc, gi, &err) != KST_OK) die("GPU search", &err);
        double tg[5];
        for (int r = 0; r < 5; r++) {
            double g0 = now();
            if (kst_ann_search(a, (int64_t)nq, (int)d, q.data, 10, &so, sc, gi, &err) != KST_OK) die("GPU search", &err);
            tg[r] = now() - g0;
        }
        double tgm = median(tg, 5);
        double scanned = (double)nq * np * ((double)n / (double)lay.nlist) * (double)lay.pq_M;
        printf("{\"bench\": \"ivfpq\", \"factory\": \"%s\", \"nprobe\": %d, \"nq\": %zu, \"cpu_threads\": %d, "
               "\"cpu_qps\": %.1f, \"gpu_qps\": %.1f, \"cpu_recall10\": %.2f, \"gpu_recall10\": %.2f, "
               "\"gpu_code_gb_s\": %.1f, \"of_bw\": %.3f, \"build_s\": %.1f}\n",
               argv[4], np, nq, omp_get_max_threads(), nq / tc, nq / tgm, recall10(ci, ex, nq), recall10(gi, ex, nq),
               scanned / tgm / 1e9, scanned / tgm / 1e9 / bw, build);
        fflush(stdout);
    }
    free(list);
    kst_ann_free(a);
    kst_npy_free(&db), kst_npy_free(&q);
    free(ex), free(gi), free(ci), free(sc), free(ids);
    return 0;
}

static int embed_main(int argc, char **argv) {
    if (argc < 6) return fprintf(stderr, "usage: bench_gpu embed MODEL_DIR N WORDS BATCH\n"), 2;
    const char *dir = argv[2];
    size_t n = (size_t)atol(argv[3]), words = (size_t)atol(argv[4]), batch = (size_t)atol(argv[5]);
    kst_error err;
    char path[1024];
    snprintf(path, sizeof path, "%s/vocab.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) return fprintf(stderr, "bench_gpu: cannot open %s\n", path), 1;
    char line[256], **vocab = malloc(40000 * sizeof *vocab);
    size_t nv = 0;
    while (nv < 40000 && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        int ok = strlen(line) >= 3;
        for (char *c = line; *c; c++) ok &= *c >= 'a' && *c <= 'z';
        if (ok) vocab[nv++] = strdup(line);
    }
    fclose(f);
    if (nv == 0) return fprintf(stderr, "bench_gpu: no words in %s\n", path), 1;
    char **texts = malloc(n * sizeof *texts);
    uint32_t seed = 7;
    for (size_t i = 0; i < n; i++) {
        size_t cap = words * 257 + 1, len = 0; /* a vocab line is shorter than 256 bytes */
        texts[i] = malloc(cap);
        texts[i][0] = 0;
        /* lengths vary from words/2 to words, as real collections' do */
        size_t w = words / 2 + (size_t)(i * 2654435761u % (words / 2 + 1));
        for (size_t k = 0; k < w; k++) {
            seed = seed * 1664525u + 1013904223u;
            const char *v = vocab[(seed >> 8) % nv];
            size_t vl = strlen(v);
            if (k) texts[i][len++] = ' ';
            memcpy(texts[i] + len, v, vl + 1);
            len += vl;
        }
    }
    kst_model_opts mo = kst_model_opts_default();
    mo.device = KST_DEVICE_CUDA;
    kst_model *m = NULL;
    if (kst_model_open(dir, &mo, &m, &err) != KST_OK) die(dir, &err);
    size_t dim = kst_model_dim(m);
    float *out = malloc(n * dim * sizeof(float));
    kst_encode_opts eo = kst_encode_opts_default();
    eo.batch_size = batch;
    eo.max_len = 256;
    /* warm-up: kernels, plans, buffers at the largest shape */
    if (kst_model_embed(m, (const char *const *)texts, NULL, n < 4 * batch ? n : 4 * batch, &eo, out, &err) != KST_OK)
        die("embed", &err);
    double t[2][3];
    for (int r = 0; r < 3; r++)
        for (int mode = 0; mode < 2; mode++) {
            setenv("KESTREL_GPU_PIPELINE", mode ? "0" : "1", 1);
            double a = now();
            if (kst_model_embed(m, (const char *const *)texts, NULL, n, &eo, out, &err) != KST_OK) die("embed", &err);
            t[mode][r] = now() - a;
        }
    unsetenv("KESTREL_GPU_PIPELINE");
    kst_encoder *e = NULL;
    if (kst_encoder_open(dir, KST_ROLE_AUTO, &e, &err) != KST_OK) die(dir, &err);
    double a = now();
    size_t toks = 0;
    for (size_t i = 0; i < n; i++) {
        kst_ids ids = {0};
        if (kst_encoder_tokenize(e, texts[i], strlen(texts[i]), NULL, 0, 0, 256, &ids, &err) != KST_OK) die("tokenize", &err);
        toks += ids.len;
        kst_ids_free(&ids);
    }
    double tt = now() - a;
    printf("{\"bench\": \"embed_pipeline\", \"model\": \"%s\", \"n\": %zu, \"batch\": %zu, \"mean_tokens\": %.1f, "
           "\"docs_per_s\": %.1f, \"docs_per_s_serial\": %.1f, \"tokenize_per_s\": %.1f}\n",
           dir, n, batch, (double)toks / (double)n, n / median(t[0], 3), n / median(t[1], 3), n / tt);
    kst_encoder_free(e);
    kst_model_close(m);
    for (size_t i = 0; i < n; i++) free(texts[i]);
    for (size_t i = 0; i < nv; i++) free(vocab[i]);
    free(texts), free(vocab), free(out);
    return 0;
}

int main(int argc, char **argv) {
    kst_error err;
    if (kst_gpu_check(&err) != KST_OK) {
        fprintf(stderr, "bench_gpu: %s\n", err.msg);
        return 3;
    }
    fprintf(stderr, "bench_gpu: %s\n", kst_gpu_describe());
    if (argc > 1 && strcmp(argv[1], "search") == 0) return search_main(argc, argv);
    if (argc > 1 && strcmp(argv[1], "encode") == 0) return encode_main(argc, argv);
    if (argc > 1 && strcmp(argv[1], "ivfpq") == 0) return ivfpq_main(argc, argv);
    if (argc > 1 && strcmp(argv[1], "embed") == 0) return embed_main(argc, argv);
    fprintf(stderr, "usage: bench_gpu search|encode ...\n");
    return 2;
}
