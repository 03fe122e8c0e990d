/* bench_kv_util.h - helpers shared by the KV-retrieval benchmarks (bench_kv.c, bench_kv_group.c,
 * bench_kv_gpu.c): a clock, a fatal-error exit, the npy loader of the dumped heads, a seeded
 * normal generator, float64 reference attention and its relative L2 error. Define KVB_PROG (the
 * program's name, for messages) before including it. */
#ifndef KST_BENCH_KV_UTIL_H
#define KST_BENCH_KV_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"
#include "core/half.h"
#include "core/npy.h"

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void die(const char *what, const kst_error *e) {
    if (e) fprintf(stderr, KVB_PROG ": %s: %s\n", what, e->msg);
    else fprintf(stderr, KVB_PROG ": %s\n", what);
    exit(2);
}

/* DIR/L{L}H{H}_{k}.npy, as kv_dump.py and kv_dump_llm.py write them: (rows, d) float32 */
static inline float *load(const char *dir, int L, int H, const char *k, size_t *rows, size_t *d) {
    char p[4096];
    snprintf(p, sizeof p, "%s/L%dH%d_%s.npy", dir, L, H, k);
    kst_npy a;
    kst_error e;
    if (kst_npy_read(p, &a, &e) != KST_OK) die(p, &e);
    *rows = a.shape[0];
    *d = a.shape[1];
    return a.data;
}

/* DIR/L{L}_inv_freq.npy, the layer's RoPE inverse frequencies (kv_dump_llm.py writes them; for
 * kst_kv_set_rope), or NULL where the dump has none or KV_ROPE=0 (the prefill queries then
 * used only as given, as before round 39). *nf: their count. */
static inline float *load_rope(const char *dir, int L, size_t *nf) {
    char p[4096];
    *nf = 0;
    if (getenv("KV_ROPE") && atoi(getenv("KV_ROPE")) == 0) return NULL;
    snprintf(p, sizeof p, "%s/L%d_inv_freq.npy", dir, L);
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    fclose(f);
    kst_npy a;
    kst_error e;
    if (kst_npy_read(p, &a, &e) != KST_OK) die(p, &e);
    *nf = a.shape[0];
    return a.data;
}

/* The comma list of head numbers in arg into hs (at most max); returns the count. */
static inline size_t parse_heads(const char *arg, int *hs, size_t max) {
    size_t G = 0;
    for (const char *p = arg; *p && G < max;) {
        char *end;
        hs[G++] = (int)strtol(p, &end, 10);
        if (end == p) die("heads: expected a comma list of integers", NULL);
        p = end + (*end == ',');
    }
    return G;
}
/* One GQA group of a dump: the KV head's keys and values (rows, d) and each listed query head's
 * queries (Qa[g], rows x d; malloc'ed); dies unless the listed heads share one KV head and shape. */
static inline float **load_group(const char *dir, int L, const int *hs, size_t G, float **K, float **V,
                                 size_t *rows, size_t *d) {
    size_t r2, d2;
    *K = load(dir, L, hs[0], "k", rows, d);
    *V = load(dir, L, hs[0], "v", &r2, &d2);
    if (r2 != *rows || d2 != *d) die("keys and values of different shapes", NULL);
    float **Qa = malloc(G * sizeof *Qa);
    if (!Qa) die("out of memory", NULL);
    for (size_t g = 0; g < G; g++) {
        Qa[g] = load(dir, L, hs[g], "q", &r2, &d2);
        if (r2 != *rows || d2 != *d) die("heads of different shapes", NULL);
        if (g) {
            size_t r3, d3;
            float *K2 = load(dir, L, hs[g], "k", &r3, &d3);
            if (r3 != *rows || memcmp(K2, *K, *rows * *d * sizeof(float)) != 0)
                die("the listed heads read different KV heads", NULL);
            free(K2);
        }
    }
    return Qa;
}

/* The command line shared by the dump benches, "PROG DIR L H0,H1,... [ctx] [nq]": the group (as
 * load_group), the cached tokens *n (default ctx0, 0: the dump's rows - 256) and the decode
 * queries *nt (default 200); exits with the usage or a message on bad arguments. */
typedef struct kv_group_args {
    int L, hs[64];
    size_t G, rows, d, n, nt;
    float *K, *V, **Qa;
} kv_group_args;

static inline void group_args(int argc, char **argv, const char *prog, size_t ctx0, kv_group_args *a) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s DIR L H0,H1,... [ctx] [nq]\n", prog);
        exit(2);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    a->L = atoi(argv[2]);
    a->G = parse_heads(argv[3], a->hs, 64);
    a->Qa = load_group(argv[1], a->L, a->hs, a->G, &a->K, &a->V, &a->rows, &a->d);
    a->n = argc > 4 ? (size_t)atol(argv[4]) : ctx0 ? ctx0 : a->rows - 256;
    a->nt = argc > 5 ? (size_t)atol(argv[5]) : 200;
    if (a->n == 0 || a->nt == 0 || a->n + a->nt > a->rows) die("ctx + nq exceed the dumped tokens (or are 0)", NULL);
}

static uint64_t rng = 88172645463325252ull;
static inline double urand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (rng >> 11) * (1.0 / 9007199254740992.0);
}
static inline float nrand(void) {
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2 * log(u)) * cos(2 * M_PI * v));
}

static inline int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Element i of a float32 (f16 = 0) or float16 (f16 = 1) array, as a double. */
static inline double kv_elem(const void *a, int f16, size_t i) {
    return f16 ? (double)kst_f16_to_f32(((const uint16_t *)a)[i]) : (double)((const float *)a)[i];
}

/* Full attention of q over all n keys in float64, keys and values float32 or float16 (f16); s: n
 * doubles of scratch (NULL: allocated here). */
static inline void full_attn(double *out, const float *q, const void *K, const void *V, int f16, size_t n,
                             size_t d, double scale, double *s) {
    double mx = -INFINITY, sum = 0, *own = s ? NULL : malloc(n * sizeof *own);
    if (!s) s = own;
    for (size_t j = 0; j < n; j++) {
        double a = 0;
        for (size_t i = 0; i < d; i++) a += (double)q[i] * kv_elem(K, f16, j * d + i);
        s[j] = a * scale;
        if (s[j] > mx) mx = s[j];
    }
    memset(out, 0, d * sizeof *out);
    for (size_t j = 0; j < n; j++) {
        double w = exp(s[j] - mx);
        sum += w;
        for (size_t i = 0; i < d; i++) out[i] += w * kv_elem(V, f16, j * d + i);
    }
    for (size_t i = 0; i < d; i++) out[i] /= sum;
    free(own);
}

/* ||out - ref|| / ||ref|| over d values */
static inline double rel_l2(const float *out, const double *ref, size_t d) {
    double num = 0, den = 0;
    for (size_t j = 0; j < d; j++) {
        num += (out[j] - ref[j]) * (out[j] - ref[j]);
        den += ref[j] * ref[j];
    }
    return sqrt(num / den);
}

#endif
