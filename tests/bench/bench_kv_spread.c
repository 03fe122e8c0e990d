/* bench_kv_spread.c - a CPU-time proxy for the spread-attention budgets of round 17
 * (kst_kvc_set_spread_budget: the search's second tier, the stratified tail sample): one KV head
 * of the synthetic Llama-3-8B layer (bench_kv_gen.h, KV_GEN=real by default: 4 query heads, d 128,
 * float16, sinks 4, window 1,024) at N tokens, built once from head 0's group of prefill queries;
 * then for each budget row the median CPU time of kst_kvc_attend over KVB_NT decode steps (the
 * process's; OMP_NUM_THREADS=1: one thread's per step, the tail sample scored on the CPU too), per
 * query head, with
 * the keys scanned and the output error against float64 full attention over 8 steps. The same
 * cache for every row, the rows interleaved over KV_PASSES passes (noise on a shared box).
 *
 *   bench_kv_spread N [N...]
 *   KV_ROWS "ef:tier:strata[:clusters[:tail]];..." (default "128:0:0;128:256:0;128:0:2;128:256:2;256:512:2";
 *   clusters n > 0: the clustered tail estimate, kst_kvc_set_tail_clusters, the cache built with the
 *   rows' largest n; tail: tail_samples, default 2048)
 *
 * Nothing is asserted. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/kv_attn.h"
#include "index/kv.h"
#define KVB_PROG "bench_kv_spread"
#include "tests/bench/bench_kv_util.h"
#include "tests/bench/bench_kv_gen.h"

/* CPU seconds of the process (OMP_NUM_THREADS=1: the step's thread; other jobs on a shared box
 * do not inflate it as they do wall time) */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_kv_spread N [N...]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const size_t D = KVB_D, G = KVB_G, QH = KVB_QH, NT = KVB_NT, NPRE = KVB_NPRE, NREF = 8;
    const char *rows = getenv("KV_ROWS") ? getenv("KV_ROWS") : "128:0:0;128:256:0;128:0:2;128:256:2;256:512:2";
    int passes = getenv("KV_PASSES") ? atoi(getenv("KV_PASSES")) : 3;
    int diffuse = getenv("KV_GEN") && strcmp(getenv("KV_GEN"), "diffuse") == 0;
    size_t nr = 0, ef[16], tier[16], tcl[16], tail[16], tcmax = 0;
    float strata[16];
    for (const char *p = rows; *p && nr < 16; nr++) {
        char *e;
        ef[nr] = strtoul(p, &e, 10);
        if (*e != ':') die("KV_ROWS: expected ef:tier:strata;...", NULL);
        tier[nr] = strtoul(e + 1, &e, 10);
        if (*e != ':') die("KV_ROWS: expected ef:tier:strata;...", NULL);
        strata[nr] = strtof(e + 1, &e);
        tcl[nr] = *e == ':' ? strtoul(e + 1, &e, 10) : 0;
        tail[nr] = *e == ':' ? strtoul(e + 1, &e, 10) : 2048;
        tcmax = tcl[nr] > tcmax ? tcl[nr] : tcmax;
        p = e + (*e == ';');
    }
    for (int a = 1; a < argc; a++) {
        size_t N = strtoul(argv[a], NULL, 10);
        int perm[KVB_KVH][KVB_D];
        float sgn[KVB_KVH][KVB_D];
        kvb_perms(perm, sgn);
        kvb_data g;
        kvb_gen(N, 0.7f, 0.0f, diffuse, 384, 20.8f, 3.5f, perm, sgn, &g);
        kst_error e;
        kst_kvc_opts o = {1, 1, G, D, 1, 0, KVB_SINKS, 1024, 100, 128, 32, 32, 0, 32, 64, KST_KVC_INDEX_ATTN, 0, 2048, 0, 1, 64, 0, 0};
        kst_kvc *c;
        if (kst_kvc_create(&o, &c, &e)) die("create", &e);
        kst_kvc_set_tail_clusters(c, tcmax, 0);
        float *Qp = malloc(NPRE * G * D * sizeof *Qp), *Qd = malloc(NT * G * D * sizeof *Qd);
        for (size_t t = 0; t < NPRE; t++) memcpy(Qp + t * G * D, g.Qpre + t * QH * D, G * D * sizeof(float));
        for (size_t t = 0; t < NT; t++) memcpy(Qd + t * G * D, g.Qd0 + t * QH * D, G * D * sizeof(float));
        double t0 = now_s();
        if (kst_kvc_append(c, 0, g.K0, g.V0, N, &e) || kst_kvc_build(c, 0, Qp, NPRE, &e)) die("prefill", &e);
        if (kst_kvc_flush(c, 0, &e)) die("flush", &e);
        double build = now_s() - t0;
        double *ref = malloc(NREF * G * D * sizeof *ref), scale = 1.0 / sqrt((double)D);
#pragma omp parallel
        {
            double *s = malloc(N * sizeof *s);
#pragma omp for schedule(dynamic)
            for (size_t i = 0; i < NREF * G; i++) full_attn(ref + i * D, Qd + i * D, g.K0, g.V0, 1, N, D, scale, s);
            free(s);
        }
        printf("== %zu tokens (%s keys), one KV head x %zu query heads, d %zu, float16, window 1024, top_k 100,"
               " tail 2048; built in %.1f s; %d threads, %d passes\n", N, diffuse ? "diffuse" : "real", G, D, build,
               omp_get_max_threads(), passes);
        printf("%5s %5s %7s %8s %6s %12s %12s %10s %10s %9s\n", "ef", "tier", "strata", "clusters", "tail",
               "cpu us/head", "min", "rel.err", "scanned", "attended");
        float *out = malloc(G * D * sizeof *out);
        double *ts = malloc(passes * NT * sizeof *ts), (*all)[64] = calloc(nr, sizeof *all);
        double err[16] = {0}, scan[16] = {0}, att[16] = {0};
        for (int ps = 0; ps < passes; ps++)
            for (size_t r = 0; r < nr; r++) {
                kst_kvc_set_spread_budget(c, strata[r], tier[r]);
                kst_kvc_set_tail_clusters(c, tcl[r], 0);
                kst_kvc_set_tail_samples(c, tail[r]);
                kst_kvc_stats st;
                for (size_t i = 0; i < 3; i++) kst_kvc_attend(c, 0, Qd, 0, ef[r], out, NULL, &e); /* warm, redraw */
                for (size_t i = 0; i < NT; i++) {
                    double ta = cpu_s();
                    if (kst_kvc_attend(c, 0, Qd + i * G * D, 0, ef[r], out, &st, &e)) die("attend", &e);
                    ts[i] = cpu_s() - ta;
                    if (ps == 0 && i < NREF) {
                        for (size_t h = 0; h < G; h++) err[r] += rel_l2(out + h * D, ref + (i * G + h) * D, D) / (NREF * G);
                        scan[r] += (double)st.scanned / G / st.indexed / NREF;
                        att[r] += (double)st.retrieved / G / NREF;
                    }
                }
                qsort(ts, NT, sizeof *ts, cmp_d);
                all[r][ps] = ts[NT / 2];
            }
        for (size_t r = 0; r < nr; r++) {
            qsort(all[r], passes, sizeof(double), cmp_d);
            printf("%5zu %5zu %7.2f %8zu %6zu %12.1f %12.1f %10.3e %9.2f%% %10.0f\n", ef[r], tier[r], strata[r], tcl[r], tail[r],
                   1e6 * all[r][passes / 2] / G, 1e6 * all[r][0] / G, err[r], 100 * scan[r], att[r]);
        }
        free(out), free(ts), free(all), free(ref), free(Qp), free(Qd);
        free(g.K0), free(g.V0), free(g.Qpre), free(g.Qd0), free(g.Qd);
        kst_kvc_free(c);
    }
    return 0;
}
