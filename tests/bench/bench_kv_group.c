/* bench_kv_group.c - one GQA group of real decoder heads (tests/bench/kv.sh): the query heads that
 * share a KV head, searched one by one or together (group_search), with and without 4-bit codes,
 * at a list of budgets: recall@100 of each head's exact top-100, keys scanned, attention output
 * error against float64 full attention, and the decode step's CPU time. Nothing is asserted.
 *
 *   bench_kv_group DIR L H0,H1,... [ctx] [nq]
 *
 * DIR holds kv_dump_llm.py's files (L<l>H<h>_{q,k,v}.npy; every listed head must read the same
 * KV head). Budgets: KV_BUDGETS "top_k:ef:tail;..." (default below); KV_MODES (default
 * "head,group,head+codes,group+codes"); KV_SINKS, KV_WINDOW. Standalone (the kv sources only). */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/kv_attn.h"
#include "core/npy.h"
#include "index/kv.h"
#include "index/kv_graph.h"

#define TOPK 100
#define KVB_PROG "bench_kv_group"
#include "tests/bench/bench_kv_util.h"

int main(int argc, char **argv) {
    kv_group_args a;
    group_args(argc, argv, "bench_kv_group", 7936, &a);
    kst_error e;
    const int L = a.L;
    const size_t G = a.G, rows = a.rows, d = a.d, n = a.n, nt = a.nt;
    float *K = a.K, *V = a.V, **Qa = a.Qa;
    size_t sinks = getenv("KV_SINKS") ? (size_t)atol(getenv("KV_SINKS")) : 4;
    size_t window = getenv("KV_WINDOW") ? (size_t)atol(getenv("KV_WINDOW")) : 512;
    size_t nidx = n - sinks - window;
    /* prefill queries (n, G, d) and decode queries (nt, G, d): evenly spaced tokens after ctx */
    float *Qp = malloc(n * G * d * sizeof *Qp), *Qt = malloc(nt * G * d * sizeof *Qt);
    for (size_t t = 0; t < n; t++)
        for (size_t g = 0; g < G; g++) memcpy(Qp + (t * G + g) * d, Qa[g] + t * d, d * sizeof(float));
    for (size_t i = 0; i < nt; i++)
        for (size_t g = 0; g < G; g++)
            memcpy(Qt + (i * G + g) * d, Qa[g] + (n + i * (rows - n) / nt) * d, d * sizeof(float));
    printf("== L%d heads %s (GQA group of %zu), %zu keys, d %zu; %zu decode queries; sinks %zu, window %zu, indexed %zu; %d threads\n",
           L, argv[3], G, n, d, nt, sinks, window, nidx, omp_get_max_threads());
    /* exact top-100 per (query, head), their pairwise overlap and union */
    uint32_t *want = malloc(nt * G * TOPK * sizeof *want);
    if (kst_kvg_exact_topk(K + sinks * d, 0, nidx, d, Qt, nt * G, TOPK, want, NULL, &e)) die("exact", &e);
    double ov = 0, un = 0;
    size_t npair = 0;
    {
        uint8_t *seen = calloc(nidx, 1);
        for (size_t i = 0; i < nt; i++) {
            size_t u = 0;
            for (size_t g = 0; g < G; g++)
                for (size_t j = 0; j < TOPK; j++) {
                    uint32_t x = want[(i * G + g) * TOPK + j];
                    if (!seen[x]) { seen[x] = 1; u++; }
                }
            for (size_t g = 0; g < G; g++)
                for (size_t j = 0; j < TOPK; j++) seen[want[(i * G + g) * TOPK + j]] = 0;
            un += (double)u / TOPK;
            for (size_t a = 0; a < G; a++)
                for (size_t b = a + 1; b < G; b++, npair++) {
                    size_t c = 0;
                    for (size_t x = 0; x < TOPK; x++)
                        for (size_t y = 0; y < TOPK; y++) c += want[(i * G + a) * TOPK + x] == want[(i * G + b) * TOPK + y];
                    ov += (double)c / TOPK;
                }
        }
        free(seen);
    }
    printf("exact top-100: pairwise overlap %.1f%%, union of the group %.2fx one head's\n",
           npair ? 100 * ov / npair : 0.0, un / nt);
    /* float64 references */
    size_t ne = nt < 100 ? nt : 100;
    double *ref = malloc(ne * G * d * sizeof *ref), scale = 1.0 / sqrt((double)d);
#pragma omp parallel
    {
        double *s = malloc(n * sizeof *s);
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < ne * G; i++) full_attn(ref + i * d, Qt + i * d, K, V, 0, n, d, scale, s);
        free(s);
    }
    kst_kvc_opts o = {1, 1, G, d, 0, 0, sinks, window, TOPK, 256, 32, 32, 32768, 32, 64,
                      KST_KVC_INDEX_ATTN, 0, 0, 0, 1, 0, 0, 0};
    kst_kvc *c;
    if (kst_kvc_create(&o, &c, &e)) die("create", &e);
    if (kst_kvc_append(c, 0, K, V, n, &e)) die("append", &e);
    double t0 = now_s();
    if (kst_kvc_build(c, 0, Qp, n, &e)) die("build", &e);
    printf("attention-aware graph built in %.1f s from %zu prefill queries; index %.1f KB beyond keys and values (%.1f KB)\n",
           now_s() - t0, n * G < 32768 ? n * G : 32768, kst_kvc_index_bytes(c, 0) / 1024.0,
           2.0 * n * d * 4 / 1024.0);
    const char *budgets = getenv("KV_BUDGETS")
                              ? getenv("KV_BUDGETS")
                              : "100:100:0;100:256:0;100:256:1024;256:512:0;500:1024:0;1000:2048:0";
    const char *modes = getenv("KV_MODES") ? getenv("KV_MODES") : "head,group,head+codes,group+codes";
    printf("%-26s %6s %6s %6s %10s %12s %12s %10s %10s %10s\n", "mode", "top_k", "ef", "tail", "recall@100",
           "scan/search", "scan/head", "rel.err", "attended", "cpu_us");
    float *out = malloc(G * d * sizeof *out);
    int64_t *pos = malloc(G * 4096 * sizeof *pos);
    size_t found[64];
    for (const char *mp = modes; *mp;) {
        char mode[64];
        size_t ml = strcspn(mp, ",");
        snprintf(mode, sizeof mode, "%.*s", (int)(ml < 63 ? ml : 63), mp);
        mp += ml + (mp[ml] == ',');
        int grp = strstr(mode, "group") != NULL, cod = strstr(mode, "codes") != NULL;
        kst_kvc_set_search(c, grp, cod);
        /* "/il0": the earlier heap-based per-head search (default: the pool search) */
        kst_kvc_set_interleave(c, strstr(mode, "/il0") ? 0 : 1);
        /* "/x2": expansion width; "/sp1024/sk8": per-query entries from 1,024 spaced keys, the
         * best 8 ("/spA": KST_KVC_SPREAD_AUTO), as bench_kv_gpu's modes (default: the library's) */
        if (strstr(mode, "/x")) kst_kvc_set_expand(c, (size_t)atol(strstr(mode, "/x") + 2));
        if (strstr(mode, "/sp")) {
            const char *sp = strstr(mode, "/sp");
            kst_kvc_set_spread(c, sp[3] == 'A' ? KST_KVC_SPREAD_AUTO : (size_t)atol(sp + 3),
                               strstr(mode, "/sk") ? (size_t)atol(strstr(mode, "/sk") + 3) : 0);
        }
        for (const char *bp = budgets; *bp;) {
            size_t k = strtoul(bp, (char **)&bp, 10);
            size_t ef = strtoul(bp + 1, (char **)&bp, 10);
            size_t tail = strtoul(bp + 1, (char **)&bp, 10);
            if (*bp == ';') bp++;
            kst_kvc_set_tail_samples(c, tail);
            double rec = 0, ssearch = 0, shead = 0, err = 0, att = 0;
            for (size_t i = 0; i < nt; i++) {
                size_t sc;
                if (kst_kvc_search_group(c, 0, 0, Qt + i * G * d, TOPK, ef, pos, found, &sc, &e)) die("search", &e);
                for (size_t g = 0; g < G; g++) {
                    size_t hit = 0;
                    for (size_t a = 0; a < TOPK; a++)
                        for (size_t b = 0; b < found[g]; b++)
                            if ((uint64_t)pos[g * TOPK + b] == want[(i * G + g) * TOPK + a] + sinks) { hit++; break; }
                    rec += (double)hit / TOPK / G;
                }
                if (i >= ne) continue;
                kst_kvc_stats st;
                if (kst_kvc_attend(c, 0, Qt + i * G * d, k, ef, out, &st, &e)) die("attend", &e);
                ssearch += (double)st.scanned / st.searches / st.indexed;
                shead += (double)st.scanned / G / st.indexed;
                att += (double)(st.exact + (st.retrieved + st.sampled) / G) / n;
                for (size_t g = 0; g < G; g++) {
                    err += rel_l2(out + g * d, ref + (i * G + g) * d, d) / G;
                }
            }
            /* CPU time of the decode step (one thread per search; noisy on a shared box) */
            double ts[50];
            for (size_t i = 0; i < 50; i++) {
                double a = now_s();
                if (kst_kvc_attend(c, 0, Qt + (i % nt) * G * d, k, ef, out, NULL, &e)) die("attend", &e);
                ts[i] = now_s() - a;
            }
            qsort(ts, 50, sizeof *ts, cmp_d);
            printf("%-26s %6zu %6zu %6zu %10.3f %11.2f%% %11.2f%% %10.2e %9.1f%% %10.1f\n", mode, k, ef, tail,
                   rec / nt, 100 * ssearch / ne, 100 * shead / ne, err / ne, 100 * att / ne, ts[25] * 1e6);
        }
    }
    kst_kvc_free(c);
    return 0;
}
